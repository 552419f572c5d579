//! One `run` per queue: an exclusive `flock` on `<queue>.lock`, held for the life of the process.
//!
//! Two runs on one queue would read the same records and send them twice. The lock is a separate file because
//! SQLite's own POSIX locks on the database are dropped when any descriptor of that file is closed. The kernel
//! releases a `flock` when the process dies, however it dies, so a `kill -9` never leaves a stale lock; the pid
//! written into the file is only there to name the holder in the refusal.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// The held lock; dropping it (or exiting) releases it.
#[derive(Debug)]
pub struct Instance {
    _file: File,
}

/// Why this process may not use the queue.
#[derive(Debug)]
pub enum LockError {
    /// Another process holds the lock.
    Held { queue: PathBuf, holder: String },
    /// The lock file could not be opened or locked at all.
    Io { path: PathBuf, error: std::io::Error },
}

impl std::fmt::Display for LockError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LockError::Held { queue, holder } => write!(
                f,
                "queue {} is in use by another mimecast-forwarder run ({holder}); only one run (daemon, --once or \
                 cron job) may use a queue at a time: stop the other one or give this one its own queue.path",
                queue.display()
            ),
            LockError::Io { path, error } if error.kind() == std::io::ErrorKind::PermissionDenied => write!(
                f,
                "cannot create or lock {}: {error}; this process runs as {}, and the queue's directory must be \
                 writable by that user (for the packaged layout `chown -R mimecast-forwarder: \
                 /var/lib/mimecast-forwarder`)",
                path.display(),
                crate::store::process_user()
            ),
            LockError::Io { path, error } => write!(f, "cannot create or lock {}: {error}", path.display()),
        }
    }
}

impl std::error::Error for LockError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LockError::Held { .. } => None,
            LockError::Io { error, .. } => Some(error),
        }
    }
}

/// The lock file of a queue database.
pub fn lock_path(queue: &Path) -> PathBuf {
    let mut name = queue.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

/// Takes the queue's lock without waiting, and writes this process's pid and start time into it.
pub fn acquire(queue: &Path, now: i64) -> Result<Instance, LockError> {
    if let Some(dir) = queue.parent().filter(|d| !d.as_os_str().is_empty()) {
        // systemd's StateDirectory= creates the directory in production; this covers tests and manual runs.
        let _ = std::fs::create_dir_all(dir);
    }
    // One lock per database file, however it is named: a symlink or a relative path finds the same lock.
    let real = std::fs::canonicalize(queue).ok().or_else(|| {
        let dir = queue.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        Some(std::fs::canonicalize(dir).ok()?.join(queue.file_name()?))
    });
    let path = lock_path(real.as_deref().unwrap_or(queue));
    let io = |error| LockError::Io { path: path.clone(), error };
    let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            let holder = if holder.is_empty() { "holder unknown".to_owned() } else { holder.to_owned() };
            return Err(LockError::Held { queue: queue.into(), holder });
        }
        Err(TryLockError::Error(e)) => return Err(io(e)),
    }
    let stamp = format!("pid {}, started {}", std::process::id(), crate::datetime::rfc3339(now));
    // The holder's description is a courtesy for the refusal message; failing to write it changes nothing.
    let _ = file.set_len(0).and_then(|_| file.rewind()).and_then(|_| file.write_all(stamp.as_bytes()));
    Ok(Instance { _file: file })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_and_named_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let queue = dir.path().join("queue.db");
        let first = acquire(&queue, 0).unwrap();
        let e = acquire(&queue, 0).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, LockError::Held { .. }), "{msg}");
        assert!(msg.contains("queue.db") && msg.contains(&format!("pid {}", std::process::id())), "{msg}");
        drop(first);
        assert!(acquire(&queue, 0).is_ok());
    }

    #[test]
    fn an_unusable_lock_file_keeps_the_io_error_as_its_source() {
        use std::error::Error as _;
        let dir = tempfile::tempdir().unwrap();
        // A directory where the lock file should be: opening it for writing fails.
        let queue = dir.path().join("queue.db");
        std::fs::create_dir(lock_path(&queue)).unwrap();
        let e = acquire(&queue, 0).unwrap_err();
        assert!(matches!(e, LockError::Io { .. }), "{e}");
        let source = e.source().expect("the io error");
        assert!(source.downcast_ref::<std::io::Error>().is_some(), "{source:?}");
        let line = crate::error::describe(&e);
        assert_eq!(line.matches(&source.to_string()).count(), 1, "{line}");
    }

    #[test]
    fn a_symlink_to_the_queue_finds_the_same_lock() {
        let dir = tempfile::tempdir().unwrap();
        let queue = dir.path().join("queue.db");
        std::fs::write(&queue, b"").unwrap();
        let link = dir.path().join("link.db");
        std::os::unix::fs::symlink(&queue, &link).unwrap();
        let _first = acquire(&queue, 0).unwrap();
        assert!(matches!(acquire(&link, 0), Err(LockError::Held { .. })));
    }
}
