//! The real binary against exhausted and damaged resources: a full disk, a database another process holds
//! locked, a queue it may not write, a database damaged in the middle.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::bin::{
    BIN, Daemon, SpawnDaemon, cmd, no_secret, poll_until, run, run_within, signal, status_json, stderr_lines,
    wait_exit, wait_for, write_config,
};
use crate::common::{Rig, assert_delivered_once};
use mimecast_forwarder::mimecast::Feed;

/// A small tmpfs, unmounted when dropped; `None` (with the reason printed) where this machine refuses to mount.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(at: &Path, size: &str) -> Option<SmallDisk> {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(at).output();
        match out {
            Ok(o) if o.status.success() => Some(SmallDisk(at.to_owned())),
            Ok(o) => {
                eprintln!("SKIPPED: cannot mount a tmpfs here: {}", String::from_utf8_lossy(&o.stderr).trim());
                None
            }
            Err(e) => {
                eprintln!("SKIPPED: cannot run mount: {e}");
                None
            }
        }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// `run` with the agent's debug lines, which include every later meeting with a full disk (only the first is
/// an error line).
fn agent_with_debug_log(config: &str) -> Daemon {
    cmd(&["run", "--config", config])
        .env("RUST_LOG", "info,mimecast_forwarder=debug")
        .stderr(Stdio::piped())
        .spawn_daemon()
}

/// Waits until the agent has met the full disk twice, that is paused polling for it and then come back to
/// find it still full: it outlived the first meeting, which is what must not end the process.
fn meets_a_full_disk_twice(child: &mut Daemon, log: &Arc<Mutex<String>>, what: &str) {
    const PAUSED: &str = "polling Mimecast paused until delivery frees space";
    wait_for("the agent to meet the full disk twice", Duration::from_secs(120), || {
        let text = log.lock().unwrap();
        assert!(child.try_wait().unwrap().is_none(), "{what}:\n{text}");
        text.matches(PAUSED).count() >= 2
    });
}

#[test]
fn a_full_disk_pauses_polling_delivery_frees_space_and_nothing_is_lost() {
    let rig = Rig::new();
    let Some(disk) = SmallDisk::mount(&rig.dir.path().join("small"), "8m") else { return };
    let expected = rig.add_records(&Feed::ALL, 1500, 900); // About 8 MB of records, more with the index, for 8 MB.
    let db = disk.0.join("queue.db");
    let queue = format!("path = {:?}", db.display().to_string());
    let path = write_config(&rig, &[("queue", &queue), ("mimecast", "page_size = 100")]);
    let p = path.to_str().unwrap();
    rig.dd.set_down(Some(503));
    let mut child = agent_with_debug_log(p);
    let log = stderr_lines(&mut child);
    meets_a_full_disk_twice(&mut child, &log, "a full disk must not end the process");

    // A restart while the disk is full starts and keeps going too (systemd would restart a crashed one).
    signal(&child, "-KILL");
    child.wait().unwrap();
    let mut child = agent_with_debug_log(p);
    let log = stderr_lines(&mut child);
    meets_a_full_disk_twice(&mut child, &log, "restarted on a full disk");

    // Near the end, the agent keeps room for every page in flight, then for one, and stops when none fits.
    // Free space alone is no sign of it (the WAL grows and is truncated), so wait for status to say so.
    let mut text = String::new();
    let full = poll_until(Duration::from_secs(90), || {
        assert!(child.try_wait().unwrap().is_none(), "the agent ended:\n{}", log.lock().unwrap());
        text = run(&["status", "--config", p]).1;
        text.contains("ATTENTION") && text.contains("disk full") && text.contains("queue.db")
    });
    assert!(full, "status never said the disk is full:\n{text}\n{}", log.lock().unwrap());

    let started = Instant::now();
    rig.dd.set_down(None);
    // The sender may be in its longest backoff (120 s and jitter) after a long outage on a slow machine.
    let delivered = poll_until(Duration::from_secs(300), || {
        assert!(child.try_wait().unwrap().is_none(), "the agent ended:\n{}", log.lock().unwrap());
        rig.dd.accepted_count() >= expected.len()
    });
    assert!(delivered, "not all delivered; status {}\n{}", status_json(p), log.lock().unwrap());
    let recovered = started.elapsed(); // Reported below, not asserted.
    signal(&child, "-TERM");
    let status = wait_exit(&mut child, "the agent to stop", Duration::from_secs(60));
    assert_eq!(status.code(), Some(0), "{}", log.lock().unwrap());
    eprintln!(
        "full disk: {} records through a 8 MB disk, drained in {recovered:?} after Datadog came back",
        expected.len()
    );
    assert_delivered_once(&rig.dd, &expected);
    no_secret(&log.lock().unwrap());
}

#[test]
fn a_database_locked_by_another_process_is_waited_for_not_fatal() {
    let rig = Rig::new();
    let expected = rig.add_records(&Feed::ALL, 100, 300);
    let path = write_config(&rig, &[]);
    let p = path.to_str().unwrap();
    drop(rig.store()); // Create the queue.
    // A backup or `sqlite3` by hand holds the write lock for longer than the agent's 5 s busy timeout.
    let holder = rusqlite::Connection::open(rig.db_path()).unwrap();
    holder.execute_batch("BEGIN IMMEDIATE").unwrap();
    let mut child = cmd(&["run", "--config", p]).stderr(Stdio::piped()).spawn_daemon();
    let log = stderr_lines(&mut child);
    wait_for("the lock to be noticed", Duration::from_secs(60), || log.lock().unwrap().contains("locked"));
    holder.execute_batch("COMMIT").unwrap();
    drop(holder);
    // The process that met the lock is the one that delivers everything once it is gone: the lock did not end it.
    wait_for("everything delivered", Duration::from_secs(60), || {
        assert!(child.try_wait().unwrap().is_none(), "a held lock must not end the process:\n{}", log.lock().unwrap());
        rig.dd.accepted_count() >= expected.len()
    });
    signal(&child, "-TERM");
    assert_eq!(wait_exit(&mut child, "the agent to stop", Duration::from_secs(60)).code(), Some(0));
    assert_delivered_once(&rig.dd, &expected);
}

/// `run --once` as user nobody: its exit code and stderr.
fn once_as_nobody(config: &Path) -> (Option<i32>, String) {
    let out = Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", BIN, "run", "--once", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn a_queue_this_user_may_not_write_names_the_path_and_the_user() {
    let rig = Rig::new();
    let path = write_config(&rig, &[]);
    drop(rig.store()); // The queue exists, owned by root.
    use std::os::unix::fs::PermissionsExt;
    for p in [rig.dir.path(), path.as_path()] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let probe = Command::new("setpriv").args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "true"]).status();
    if !probe.is_ok_and(|s| s.success()) {
        eprintln!("SKIPPED: cannot run a command as user nobody here (setpriv)");
        return;
    }
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, err) = once_as_nobody(&path);
    assert_eq!(code, Some(70), "{err}");
    assert!(err.contains(&rig.dir.path().display().to_string()), "{err}");
    assert!(err.contains("nobody") && err.contains("65534"), "{err}");

    // The directory writable (the lock file can be made), the database file not: SQLite would open it read-only
    // and fail at the first write with no path; the agent says which file and which user.
    std::fs::set_permissions(rig.dir.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    let (code, err) = once_as_nobody(&path);
    assert_eq!(code, Some(70), "{err}");
    assert!(err.contains(&rig.db_path().display().to_string()) && err.contains("cannot be written"), "{err}");
    assert!(err.contains("nobody") && err.contains("65534"), "{err}");
}

/// Whether this test process can act as root and run commands as user nobody; says why not when it cannot.
fn can_switch_to_nobody() -> bool {
    if !rustix::process::geteuid().is_root() {
        eprintln!("SKIPPED: not running as root, so root's refusal cannot be tried");
        return false;
    }
    let probe = Command::new("setpriv").args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "true"]).status();
    if !probe.is_ok_and(|s| s.success()) {
        eprintln!("SKIPPED: cannot run a command as user nobody here (setpriv)");
        return false;
    }
    true
}

/// `run --once` as root with `extra` arguments: its exit code and stderr.
fn once_as_root(config: &Path, extra: &[&str]) -> (i32, String) {
    let mut args = vec!["run", "--once", "--config", config.to_str().unwrap()];
    args.extend(extra);
    let (code, _, err) = run(&args);
    (code, err)
}

#[test]
fn root_refuses_the_service_users_queue_and_that_user_is_told_how_to_take_it_back() {
    let rig = Rig::new();
    if !can_switch_to_nobody() {
        return;
    }
    let expected = rig.add_records(&[Feed::Audit], 40, 300);
    // The packaged layout: the service's user (here nobody) owns the state directory, 0750.
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let state = rig.dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::os::unix::fs::chown(&state, Some(65534), Some(65534)).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o750)).unwrap();
    std::fs::set_permissions(rig.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let db = state.join("queue.db");
    let queue = format!("path = {:?}", db.display().to_string());
    let path = write_config(&rig, &[("queue", &queue), ("mimecast", "log_types = [\"audit\"]")]);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let db_glob = format!("{}*", db.display());

    // Root refuses, names the directory, its owner and both ways on, and creates nothing.
    let (code, err) = once_as_root(&path, &[]);
    assert_eq!(code, 77, "{err}");
    assert!(err.contains(&format!("{} belongs to nobody (uid 65534)", state.display())), "{err}");
    assert!(err.contains("`sudo -u nobody ") && err.contains(" run --once --config "), "{err}");
    assert!(err.contains("--allow-root") && err.contains(&format!("`chown nobody: {db_glob}`")), "{err}");
    assert_eq!(std::fs::read_dir(&state).unwrap().count(), 0, "root created files in the service's directory");
    let (code, out, _) = run(&["run", "--help"]);
    assert!(out.contains("77") && out.contains("--allow-root"), "{code}: {out}");

    // With --allow-root it runs, warns, and leaves root's files behind.
    let (code, err) = once_as_root(&path, &["--allow-root"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("--allow-root") && err.contains(&format!("`chown nobody: {db_glob}`")), "{err}");
    assert_eq!(std::fs::metadata(&db).unwrap().uid(), 0);
    assert_delivered_once(&rig.dd, &expected);

    // The service's user meets them: the error names the file, its owner and the fix.
    let (code, err) = once_as_nobody(&path);
    assert_eq!(code, Some(70), "{err}");
    assert!(err.contains(&format!("{}.lock belongs to root (uid 0)", db.display())), "{err}");
    let fix = format!("`chown nobody: {db_glob}`");
    assert!(err.contains(&fix), "{err}");
    // The database too, once the lock file is the service user's.
    std::os::unix::fs::chown(format!("{}.lock", db.display()), Some(65534), Some(65534)).unwrap();
    let (code, err) = once_as_nobody(&path);
    assert_eq!(code, Some(70), "{err}");
    assert!(err.contains(&format!("{} belongs to root (uid 0)", db.display())) && err.contains(&fix), "{err}");

    // The fix as said works.
    let said = fix.trim_matches('`');
    assert!(Command::new("sh").args(["-c", said]).status().unwrap().success(), "{said}");
    let (code, err) = once_as_nobody(&path);
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn damage_in_the_middle_of_the_queue_is_reported_with_what_to_do() {
    let rig = Rig::new();
    rig.add_records(&Feed::ALL, 300, 800);
    let path = write_config(&rig, &[]);
    let p = path.to_str().unwrap();
    rig.dd.set_down(Some(503));
    assert_eq!(run(&["run", "--once", "--config", p]).0, 75);
    // Overwrite pages in the middle of the file (after a checkpoint folded the WAL into it).
    let conn = rusqlite::Connection::open(rig.db_path()).unwrap();
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())).unwrap();
    drop(conn);
    let mut bytes = std::fs::read(rig.db_path()).unwrap();
    let mid = bytes.len() / 2 / 4096 * 4096;
    for b in &mut bytes[mid..mid + 3 * 4096] {
        *b = 0xa5;
    }
    std::fs::write(rig.db_path(), &bytes).unwrap();
    let (code, _, err) = run(&["run", "--once", "--config", p]);
    assert_eq!(code, 70, "{err}");
    assert!(err.contains("damaged") && err.contains("queue.db") && err.contains("move the file aside"), "{err}");
    // 70, the code status's help lists for a damaged database.
    let (code, _, err) = run(&["status", "--config", p]);
    assert_eq!(code, 70, "{err}");
    assert!(err.contains("damaged"), "{err}");
}

/// An empty queue.db (`: > queue.db` without its -wal and -shm, or a crash of an earlier build during its first
/// start) is damage: `run` refuses it as `status` does, with the same message and exit code, and leaves it as it
/// was, instead of starting a new queue from `initial_lookback_secs` that drops the cursors without a word.
#[test]
fn an_empty_queue_file_is_refused_as_damage_and_left_as_it_was() {
    let rig = Rig::new();
    rig.add_records(&[Feed::Audit], 20, 300);
    let path = write_config(&rig, &[("mimecast", "log_types = [\"audit\"]")]);
    let p = path.to_str().unwrap();
    assert_eq!(run(&["run", "--once", "--config", p]).0, 0);
    let db = rig.db_path();
    std::fs::write(&db, b"").unwrap();
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    let requests = rig.mc.requests().len();
    let (code, _, status_err) = run(&["status", "--config", p]);
    assert_eq!(code, 70, "{status_err}");
    let message = status_err.trim().strip_prefix("error: ").unwrap_or_else(|| panic!("{status_err}"));
    assert!(message.contains("damaged") && message.contains("empty file") && message.contains("move the file aside"));
    for once in [true, false] {
        let args = if once { vec!["run", "--once", "--config", p] } else { vec!["run", "--config", p] };
        let (code, _, err) = run(&args);
        assert_eq!(code, 70, "{args:?}: {err}");
        assert!(err.contains(message), "{args:?} says what status says ({message}):\n{err}");
        assert_eq!(std::fs::metadata(&db).unwrap().len(), 0, "{args:?} left the file as it was");
        for suffix in ["-wal", "-shm"] {
            assert!(!Path::new(&format!("{}{suffix}", db.display())).exists(), "{args:?} made {suffix}");
        }
    }
    assert_eq!(rig.mc.requests().len(), requests, "nothing was polled into a new queue");
}

/// Where there is no queue file but a link to a missing one (a volume not mounted yet) or a WAL left without its
/// database, `run` makes no new queue (it would start over, and orphan the real one or replay another's log), and
/// `status` and `dead-letters` say the same instead of "`run` creates it".
#[test]
fn a_link_to_a_missing_queue_or_a_wal_without_one_is_refused_by_every_command_alike() {
    let rig = Rig::new();
    rig.add_records(&[Feed::Audit], 5, 300);
    let path = write_config(&rig, &[("mimecast", "log_types = [\"audit\"]")]);
    let p = path.to_str().unwrap();
    let db = rig.db_path();
    let volume = db.parent().unwrap().join("volume/queue.db");
    let wal = PathBuf::from(format!("{}-wal", db.display()));
    let link = |on: bool| {
        if on {
            std::os::unix::fs::symlink(&volume, &db).unwrap();
        } else {
            std::fs::remove_file(&db).unwrap();
        }
    };
    for (case, said) in [("link", "a symbolic link to"), ("wal", "left without its database")] {
        match case {
            "link" => link(true),
            _ => std::fs::write(&wal, vec![7_u8; 4096]).unwrap(),
        }
        for args in [
            vec!["run", "--once", "--config", p],
            vec!["status", "--config", p],
            vec!["dead-letters", "list", "--config", p],
        ] {
            let (code, _, err) = run(&args);
            assert_eq!(code, 70, "{case}: {args:?}: {err}");
            assert!(err.contains(said) && !err.contains("creates it"), "{case}: {args:?}: {err}");
        }
        assert!(rig.mc.requests().is_empty(), "{case}: nothing was polled into a new queue");
        match case {
            "link" => {
                assert!(db.is_symlink() && !volume.exists(), "the link is left as it was");
                link(false);
            }
            _ => assert!(!db.exists() && wal.exists(), "the WAL is left as it was"),
        }
    }
}

/// A first start that crashed while building the new queue leaves `queue.db.new` (and maybe its journal), never
/// a `queue.db` without a schema: the next start discards the leftovers and makes the queue.
#[test]
fn a_queue_left_half_made_by_a_crashed_first_start_does_not_block_the_next() {
    let rig = Rig::new();
    let expected = rig.add_records(&[Feed::Audit], 20, 300);
    let path = write_config(&rig, &[("mimecast", "log_types = [\"audit\"]")]);
    let db = rig.db_path();
    let temp = PathBuf::from(format!("{}.new", db.display()));
    std::fs::write(&temp, vec![0x5a_u8; 8192]).unwrap();
    std::fs::write(format!("{}-journal", temp.display()), vec![0xa5_u8; 4096]).unwrap();
    let (code, _, err) = run(&["run", "--once", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert_delivered_once(&rig.dd, &expected);
    assert!(!temp.exists() && !Path::new(&format!("{}-journal", temp.display())).exists(), "leftovers discarded");
    assert_eq!(rig.store().counters().unwrap().delivered, 20);
}

#[test]
fn once_on_a_disk_too_full_for_a_page_ends_and_says_so() {
    let rig = Rig::new();
    let Some(disk) = SmallDisk::mount(&rig.dir.path().join("tiny"), "400k") else { return };
    rig.add_records(&[Feed::Audit], 50, 300);
    let queue = format!("path = {:?}", disk.0.join("queue.db").display().to_string());
    let path = write_config(&rig, &[("queue", &queue), ("mimecast", "log_types = [\"audit\"]")]);
    // A pass that waited for space would wait the 300 s slow retry: the hang guard is well below it.
    let (code, _, err) = run_within(&["run", "--once", "--config", path.to_str().unwrap()], Duration::from_secs(120));
    assert_eq!(code, 69, "{err}");
    assert!(err.contains("disk full") && err.contains("queue.db"), "{err}");
    assert!(err.contains("polling stop"), "the pass gave up on the disk instead of waiting for space: {err}");
    assert_eq!(rig.mc.requests().len(), 0, "no page fetched that could not be stored");
}
