//! Driving the real binary: a config file for a [`Rig`], commands with a clean environment, signals, waiting.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use mimecast_forwarder::sim::datadog as dd;
use mimecast_forwarder::sim::mimecast as mc;

use super::Rig;

pub const BIN: &str = env!("CARGO_BIN_EXE_mimecast-forwarder");

pub fn write_config(rig: &Rig, extra: &[(&str, &str)]) -> PathBuf {
    let path = rig.dir.path().join("config.toml");
    std::fs::write(&path, rig.config_text(extra)).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

pub fn cmd(args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args)
        .env_remove("MIMECAST_CLIENT_ID")
        .env_remove("MIMECAST_CLIENT_SECRET")
        .env_remove("DD_API_KEY")
        .env_remove("JOURNAL_STREAM")
        // Tests that play the service manager set these themselves; no run may talk to one that started the tests.
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null());
    c
}

/// How long any command a test runs may take before it is killed and the test fails: a hang guard, far above
/// what any of them needs, so that a command that never ends fails its test instead of hanging the suite.
pub const RUN_LIMIT: Duration = Duration::from_secs(180);

/// Runs the binary to its end: exit code, stdout, stderr. Killed, and the test failed, after [`RUN_LIMIT`].
pub fn run(args: &[&str]) -> (i32, String, String) {
    run_within(args, RUN_LIMIT)
}

/// [`run`] with another hang guard: the process is killed, and the test fails, if it has not ended within
/// `limit`. The limit bounds a failure; it does not measure the command.
pub fn run_within(args: &[&str], limit: Duration) -> (i32, String, String) {
    output_within(cmd(args), limit)
}

/// [`run_within`] for a command prepared by the caller (another environment).
pub fn output_within(mut command: Command, limit: Duration) -> (i32, String, String) {
    let what = format!("{:?} to end", command.get_args().collect::<Vec<_>>());
    let mut child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn_daemon();
    let read_all = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            String::from_utf8_lossy(&bytes).into_owned()
        })
    };
    let out = read_all(Box::new(child.stdout.take().expect("stdout is piped")));
    let err = read_all(Box::new(child.stderr.take().expect("stderr is piped")));
    let status = wait_exit(&mut child, &what, limit);
    (status.code().unwrap_or(-1), out.join().unwrap(), err.join().unwrap())
}

/// Waits for a spawned process to exit. `limit` is a hang guard: past it the test fails (and a [`Daemon`] is
/// killed as it drops) instead of waiting for ever; it is not a measure of how fast the process stops.
pub fn wait_exit(child: &mut Child, what: &str, limit: Duration) -> ExitStatus {
    let mut status = None;
    wait_for(what, limit, || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    status.expect("wait_for returned, so the process exited")
}

pub fn no_secret(text: &str) {
    for s in [mc::CLIENT_SECRET, dd::API_KEY] {
        assert!(!text.contains(s), "a secret leaked into output:\n{text}");
    }
}

/// Polls `cond` until it holds. `limit` is a failure bound (the test fails with "timed out waiting for {what}"),
/// not a measurement: set it far above what a loaded machine needs.
pub fn wait_for(what: &str, limit: Duration, cond: impl FnMut() -> bool) {
    assert!(poll_until(limit, cond), "timed out waiting for {what}");
}

/// Polls `cond` every 20 ms until it holds (true) or `limit` passes (false), for a caller that says more than
/// [`wait_for`] when it fails.
pub fn poll_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() >= limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

pub fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill").args([sig, &child.id().to_string()]).status().unwrap();
    assert!(ok.success());
}

/// Collects a child's stderr in the background, for tests that watch a running daemon's log.
pub fn stderr_lines(child: &mut Child) -> std::sync::Arc<std::sync::Mutex<String>> {
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let sink = log.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = std::io::Read::read(&mut stderr, &mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    log
}

/// `status --json`, which must succeed.
pub fn status_json(config: &str) -> serde_json::Value {
    let (code, out, err) = run(&["status", "--json", "--config", config]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

/// A spawned agent that is killed when dropped, so that a failing test never leaves a daemon behind (one would
/// hold the test run's output pipe open, and CI would wait for it forever).
pub struct Daemon(Child);

impl std::ops::Deref for Daemon {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Daemon {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `Command::spawn` into a [`Daemon`].
pub trait SpawnDaemon {
    fn spawn_daemon(&mut self) -> Daemon;
}

impl SpawnDaemon for Command {
    fn spawn_daemon(&mut self) -> Daemon {
        Daemon(self.spawn().expect("the agent starts"))
    }
}
