//! One `run` per queue: an exclusive `flock` on `<queue>.lock`, held for the life of the process.
//!
//! Two runs on one queue would read the same records and send them twice. The lock is a separate file because
//! SQLite's own POSIX locks on the database are dropped when any descriptor of that file is closed. The kernel
//! releases a `flock` when the process dies, however it dies, so a `kill -9` never leaves a stale lock; the pid
//! written into the file is only there to name the holder in the refusal.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use crate::store::{Foreign, SQLITE_SUFFIXES, beside, dir_of};

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
    /// The lock file could not be opened or locked at all; `foreign` when it belongs to another user (a run as
    /// root made it).
    Io { path: PathBuf, error: std::io::Error, foreign: Option<Foreign> },
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
            LockError::Io { path, error, foreign: Some(foreign) } => write!(
                f,
                "cannot create or lock {}: {error}; this process runs as {}, and {foreign}",
                path.display(),
                crate::store::process_user()
            ),
            LockError::Io { path, error, .. } if error.kind() == std::io::ErrorKind::PermissionDenied => write!(
                f,
                "cannot create or lock {}: {error}; this process runs as {}, and the queue's directory must be \
                 writable by that user (for the packaged layout `chown -R mimecast-forwarder: \
                 /var/lib/mimecast-forwarder`)",
                path.display(),
                crate::store::process_user()
            ),
            LockError::Io { path, error, .. } => write!(f, "cannot create or lock {}: {error}", path.display()),
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

/// Why root may not use a queue: it belongs to another user, presumably the service's. The files root would
/// create there (the database, its lock) would be root's, and that user could not open them any more; and root
/// should not write into a directory another user controls.
#[derive(Debug)]
pub struct RootRefused {
    pub queue: PathBuf,
    /// The queue's directory, or the first of its files, that belongs to `owner`.
    pub file: PathBuf,
    pub owner: u32,
    /// This command line, to run again as `owner`.
    pub command: String,
}

impl RootRefused {
    /// `owner`'s name, or `#uid` (as `sudo -u` takes it).
    fn owner_name(&self) -> String {
        crate::store::name_of(self.owner).unwrap_or_else(|| format!("#{}", self.owner))
    }

    /// The command that gives the queue's files back to their owner after a run as root.
    pub fn give_back(&self) -> String {
        let who = crate::store::name_of(self.owner).map_or_else(|| format!("{}", self.owner), |n| format!("{n}:"));
        format!("chown {who} {}*", self.queue.display())
    }
}

impl std::fmt::Display for RootRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = self.owner_name();
        write!(
            f,
            "refusing to run as root on queue {}: {} belongs to {}, and the files root would create there (the \
             database, its lock) would be root's, which {name} could not open any more. Run it as that user: \
             `sudo -u {name} {}`. To run as root all the same, add --allow-root, and give the files back before \
             {name} uses the queue again: `{}`",
            self.queue.display(),
            self.file.display(),
            crate::store::user_of(self.owner),
            self.command,
            self.give_back()
        )
    }
}

impl std::error::Error for RootRefused {}

/// When this process runs as root: refuses a queue whose directory or files belong to another user. `command`
/// is this command line, which the refusal suggests running as that user.
pub fn root_may_use(queue: &Path, command: &str) -> Result<(), RootRefused> {
    if !rustix::process::geteuid().is_root() {
        return Ok(());
    }
    let files = SQLITE_SUFFIXES.map(|suffix| beside(queue, suffix));
    let owned = [dir_of(queue).to_path_buf()].into_iter().chain(files).chain([lock_path(queue)]).find_map(|file| {
        use std::os::unix::fs::MetadataExt;
        let owner = std::fs::metadata(&file).ok()?.uid();
        (owner != 0).then_some((file, owner))
    });
    match owned {
        None => Ok(()),
        Some((file, owner)) => Err(RootRefused { queue: queue.into(), file, owner, command: command.into() }),
    }
}

/// The lock file of a queue database.
pub fn lock_path(queue: &Path) -> PathBuf {
    beside(queue, ".lock")
}

/// Takes the queue's lock without waiting, and writes this process's pid and start time into it.
pub fn acquire(queue: &Path, now: i64) -> Result<Instance, LockError> {
    if let Some(dir) = queue.parent().filter(|d| !d.as_os_str().is_empty()) {
        // systemd's StateDirectory= creates the directory in production; this covers tests and manual runs.
        let _ = std::fs::create_dir_all(dir);
    }
    // One lock per database file, however it is named: a symlink or a relative path finds the same lock.
    let real = std::fs::canonicalize(queue)
        .ok()
        .or_else(|| Some(std::fs::canonicalize(dir_of(queue)).ok()?.join(queue.file_name()?)));
    let real = real.as_deref().unwrap_or(queue);
    let path = lock_path(real);
    let io = |error: std::io::Error| {
        let foreign =
            (error.kind() == std::io::ErrorKind::PermissionDenied).then(|| Foreign::of(&path, real)).flatten();
        LockError::Io { path: path.clone(), error, foreign }
    };
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
