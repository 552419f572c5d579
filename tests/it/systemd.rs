//! The real binary as a `Type=notify` service with a watchdog, without systemd: the test owns the datagram socket
//! that `NOTIFY_SOCKET` names and reads what the agent tells the service manager.

use std::os::linux::net::SocketAddrExt as _;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::Rig;
use crate::common::bin::{Daemon, SpawnDaemon, cmd, run, signal, status_json, wait_exit, wait_for, write_config};

/// A hang guard for each message awaited: far above what any takes, it only bounds a failure.
const LIMIT: Duration = Duration::from_secs(60);

/// The test's side of the protocol: a thread reads every datagram as it comes (the agent must never wait for a
/// full socket), and the test walks through the assignments received, one `KEY=value` per line, in order.
struct Manager {
    seen: Arc<Mutex<Vec<String>>>,
    /// The first assignment not yet walked past.
    next: usize,
    stop: Arc<AtomicBool>,
}

impl Manager {
    fn new(socket: UnixDatagram) -> Manager {
        socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let (seen, stop) = (Arc::new(Mutex::new(Vec::new())), Arc::new(AtomicBool::new(false)));
        let (sink, stopped) = (seen.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !stopped.load(Ordering::Relaxed) {
                if let Ok(n) = socket.recv(&mut buf) {
                    let text = String::from_utf8(buf[..n].to_vec()).expect("notifications are UTF-8");
                    sink.lock().unwrap().extend(text.lines().map(str::to_owned));
                }
            }
        });
        Manager { seen, next: 0, stop }
    }

    /// Walks on to the first assignment that satisfies `want`; returns those walked past, and it.
    fn until(&mut self, what: &str, want: impl Fn(&str) -> bool) -> (Vec<String>, String) {
        let mut found = None;
        wait_for(what, LIMIT, || {
            let seen = self.seen.lock().unwrap();
            if let Some(i) = seen[self.next..].iter().position(|m| want(m)) {
                let i = self.next + i;
                found = Some((seen[self.next..i].to_vec(), seen[i].clone()));
                self.next = i + 1;
            }
            found.is_some()
        });
        found.expect("wait_for returned, so it was found")
    }

    /// The last assignment received that starts with `prefix`.
    fn last(&self, prefix: &str) -> Option<String> {
        self.seen.lock().unwrap().iter().rev().find(|m| m.starts_with(prefix)).cloned()
    }

    /// Forgets what came so far: what follows was sent after this moment.
    fn skip_to_now(&mut self) {
        self.next = self.seen.lock().unwrap().len();
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn start(rig: &Rig, config: &str, notify_socket: &str, watchdog_usec: &str, watchdog_pid: Option<&str>) -> Daemon {
    let mut c = cmd(&["run", "--config", config]);
    c.env("NOTIFY_SOCKET", notify_socket).env("WATCHDOG_USEC", watchdog_usec).stderr(Stdio::null());
    match watchdog_pid {
        Some(pid) => c.env("WATCHDOG_PID", pid),
        None => c.env_remove("WATCHDOG_PID"),
    };
    assert!(!rig.db_path().exists(), "the queue is created by the run under test");
    c.spawn_daemon()
}

#[test]
fn ready_after_the_queue_is_open_watchdog_pings_while_idle_status_and_stopping() {
    let rig = Rig::new();
    rig.add_records(&mimecast_forwarder::mimecast::Feed::ALL, 20, 300);
    // Polling once an hour: once the backlog is read and delivered, nothing but the watchdog wakes the loop.
    let config = write_config(&rig, &[("mimecast", "poll_interval_secs = 3600")]);
    let config = config.to_str().unwrap();
    let path = rig.dir.path().join("notify");
    let mut manager = Manager::new(UnixDatagram::bind(&path).unwrap());
    let mut agent = start(&rig, config, path.to_str().unwrap(), "300000", None);

    manager.until("READY=1", |m| m == "READY=1");
    assert!(rig.db_path().exists(), "READY=1 came before the queue was created");
    // The instance lock is held by then: a second run refuses the queue.
    let (code, _, err) = run(&["run", "--once", "--config", config]);
    assert_eq!(code, 75, "{err}");

    let (_, status) = manager.until("a STATUS= line", |m| m.starts_with("STATUS="));
    assert!(status.contains(" records queued") && status.contains("; "), "{status}");

    // Idle: every feed read, nothing queued. The loop now sleeps until the next poll, an hour away, unless the
    // watchdog's bound wakes it: the pings must go on.
    wait_for("the backlog read and delivered", LIMIT, || {
        let s = status_json(config);
        s["queue"]["records"] == 0 && s["feeds"].as_object().unwrap().values().all(|f| !f["last_success"].is_null())
    });
    manager.skip_to_now();
    for _ in 0..3 {
        manager.until("WATCHDOG=1", |m| m == "WATCHDOG=1");
    }
    // STATUS= is sent when it changes, so the last one sent is the one in force.
    let status = manager.last("STATUS=").expect("STATUS= was sent");
    assert_eq!(status, "STATUS=0 records queued; no errors");

    signal(&agent, "-TERM");
    manager.until("STOPPING=1", |m| m == "STOPPING=1");
    let exit = wait_exit(&mut agent, "the agent to stop", LIMIT);
    assert_eq!(exit.code(), Some(0));
}

#[test]
fn an_abstract_socket_and_a_watchdog_meant_for_another_process() {
    let rig = Rig::new();
    let config = write_config(&rig, &[]);
    let name = format!("mimecast-forwarder-it-{}", std::process::id());
    let mut manager = Manager::new(UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name).unwrap()).unwrap());
    // WATCHDOG_PID names another process (pid 1): the watchdog is not this one's to ping.
    let mut agent = start(&rig, config.to_str().unwrap(), &format!("@{name}"), "300000", Some("1"));

    manager.until("READY=1", |m| m == "READY=1");
    // The first loop turn would ping before it sends STATUS=, so a STATUS= with no ping before it shows that
    // nothing is pinged.
    let (before, _) = manager.until("a STATUS= line", |m| m.starts_with("STATUS="));
    assert!(!before.iter().any(|m| m == "WATCHDOG=1"), "{before:?}");
    signal(&agent, "-TERM");
    manager.until("STOPPING=1", |m| m == "STOPPING=1");
    assert_eq!(wait_exit(&mut agent, "the agent to stop", LIMIT).code(), Some(0));
}
