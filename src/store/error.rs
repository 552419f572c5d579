//! What can go wrong with the queue database, said so that the operator knows what to do about it.
//! SQLite reports a full disk, a lock held elsewhere, missing write access and damage by result code; [`classify`]
//! turns those codes into their own variants, and every public `Store` method passes its errors through it.

use std::path::{Path, PathBuf};

use super::SCHEMA_VERSION;

/// A database problem, with the path and what we were doing.
#[derive(Debug)]
pub enum StoreError {
    /// The file is not a SQLite database or is damaged (found at open by `PRAGMA quick_check`, or later when a
    /// damaged page is read).
    Corrupt { path: PathBuf, detail: String },
    /// Written by a newer version of the agent.
    TooNew { path: PathBuf, version: i64 },
    /// Written by an older version, and opened read-only (`status`, `dead-letters list`): `run` migrates it.
    TooOld { path: PathBuf, version: i64 },
    /// The queue's filesystem is full (SQLITE_FULL). Transient: delivery frees space.
    Full { path: PathBuf, free_bytes: Option<u64> },
    /// Another process held the database lock for longer than the busy timeout (a backup, `sqlite3` by hand).
    /// Transient.
    Busy { path: PathBuf },
    /// This process may not write the database file or its directory (SQLite also creates `-wal` and `-shm`
    /// files beside it). `foreign` is the first of the queue's files that belongs to another user, when one does
    /// (a run as root created it).
    ReadOnly { path: PathBuf, user: String, foreign: Option<Foreign> },
    /// Any other SQLite failure, with what we were doing.
    Sql { context: &'static str, error: rusqlite::Error },
    /// A file operation on the queue's files outside SQLite (creating a new queue) failed otherwise than for a
    /// full disk or missing write access.
    Io { path: PathBuf, doing: &'static str, error: std::io::Error },
}

impl StoreError {
    /// Whether trying again later may succeed without anyone changing anything (a full disk, a lock).
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Full { .. } | StoreError::Busy { .. })
    }

    pub fn is_disk_full(&self) -> bool {
        matches!(self, StoreError::Full { .. })
    }
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Corrupt { path, detail } => write!(
                f,
                "queue database {} is damaged or not a database ({detail}); stop the service, move the file aside \
                 with any -wal and -shm files beside it (its records may be recoverable with sqlite3 .recover) and \
                 start again to create a new queue",
                path.display()
            ),
            StoreError::TooNew { path, version } => write!(
                f,
                "queue database {} has schema version {version}, newer than this build's {SCHEMA_VERSION}; \
                 install the newer mimecast-forwarder again",
                path.display()
            ),
            StoreError::TooOld { path, version } => write!(
                f,
                "queue database {} has schema version {version}, older than this build's {SCHEMA_VERSION}; \
                 `mimecast-forwarder run` (the service) upgrades it when it starts: restart the service, then \
                 try again",
                path.display()
            ),
            StoreError::Full { path, free_bytes } => {
                write!(f, "no space left on the filesystem of queue database {}", path.display())?;
                if let Some(free) = free_bytes {
                    write!(f, " ({free} bytes free)")?;
                }
                write!(f, "; free space there or grow the filesystem")
            }
            StoreError::Busy { path } => write!(
                f,
                "queue database {} is locked by another process for longer than the busy timeout (a backup, or \
                 sqlite3 by hand?); try again once it lets go",
                path.display()
            ),
            StoreError::ReadOnly { path, user, foreign: Some(foreign) } => write!(
                f,
                "queue database {} cannot be written by this process, running as {user}: {foreign}",
                path.display()
            ),
            StoreError::ReadOnly { path, user, foreign: None } => write!(
                f,
                "queue database {} cannot be written by this process, running as {user}: the file and its \
                 directory must be writable by that user (SQLite creates the -wal and -shm files beside it); fix \
                 the ownership, for the packaged layout `chown -R mimecast-forwarder: /var/lib/mimecast-forwarder`",
                path.display()
            ),
            StoreError::Sql { context, error } => write!(f, "{context}: {error}"),
            StoreError::Io { path, doing, error } => write!(f, "queue database {}: {doing}: {error}", path.display()),
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StoreError::Sql { error, .. } => Some(error),
            StoreError::Io { error, .. } => Some(error),
            _ => None,
        }
    }
}

pub(crate) trait Context<T> {
    fn ctx(self, context: &'static str) -> Result<T, StoreError>;
}

impl<T> Context<T> for Result<T, rusqlite::Error> {
    fn ctx(self, context: &'static str) -> Result<T, StoreError> {
        self.map_err(|error| StoreError::Sql { context, error })
    }
}

/// Turns an `Sql` error whose SQLite code calls for action into the variant that says which; any other error is
/// returned as it is. The one place where SQLite codes are interpreted.
/// The free space it reports comes from `fs`, where the queue is.
pub(crate) fn classify(fs: &dyn super::Fs, path: &Path, e: StoreError) -> StoreError {
    use rusqlite::ErrorCode as C;
    let StoreError::Sql { context, error } = &e else { return e };
    let path = path.to_path_buf();
    match error.sqlite_error_code() {
        Some(C::DiskFull) => {
            let free_bytes = fs.free_bytes(&path);
            StoreError::Full { path, free_bytes }
        }
        Some(C::DatabaseBusy | C::DatabaseLocked) => StoreError::Busy { path },
        Some(C::ReadOnly | C::CannotOpen | C::PermissionDenied | C::AuthorizationForStatementDenied) => {
            read_only(&path)
        }
        Some(C::DatabaseCorrupt | C::NotADatabase) => {
            StoreError::Corrupt { path, detail: format!("{context}: {error}") }
        }
        _ => e,
    }
}

/// A failed file operation on the queue `path` outside SQLite, said as SQLite's failure of the same kind would be:
/// missing write access names the user and the fix, a full disk the free space.
pub(crate) fn io(fs: &dyn super::Fs, path: &Path, doing: &'static str, error: std::io::Error) -> StoreError {
    use std::io::ErrorKind as K;
    match error.kind() {
        K::PermissionDenied | K::ReadOnlyFilesystem => read_only(path),
        K::StorageFull => StoreError::Full { path: path.into(), free_bytes: fs.free_bytes(path) },
        _ => StoreError::Io { path: path.into(), doing, error },
    }
}

/// Bytes available to this process on the filesystem holding the database `path`, if the system says.
pub(crate) fn free_bytes(path: &Path) -> Option<u64> {
    let s = rustix::fs::statvfs(super::dir_of(path)).ok()?;
    Some(s.f_bavail.saturating_mul(s.f_frsize))
}

/// [`StoreError::ReadOnly`] for the queue at `path`, naming a file of it that belongs to another user.
pub(crate) fn read_only(path: &Path) -> StoreError {
    let foreign = super::SQLITE_SUFFIXES.into_iter().find_map(|suffix| Foreign::of(&super::beside(path, suffix), path));
    StoreError::ReadOnly { path: path.into(), user: process_user(), foreign }
}

/// A file of the queue that belongs to another user than this process's, which therefore may not write it: a
/// run as root (`sudo mimecast-forwarder run`) left it for the service's user. Says whose it is and how to give
/// the queue's files back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Foreign {
    pub file: PathBuf,
    /// Its owner, "root (uid 0)".
    pub owner: String,
    /// `chown mimecast-forwarder: /var/lib/mimecast-forwarder/queue.db*`: the database, its `-wal` and `-shm`
    /// and its `.lock`, to this process's user.
    pub fix: String,
}

impl Foreign {
    /// `file`, of the queue at `queue`, if it exists and belongs to another user than this process's.
    pub(crate) fn of(file: &Path, queue: &Path) -> Option<Foreign> {
        use std::os::unix::fs::MetadataExt;
        let uid = std::fs::metadata(file).ok()?.uid();
        (uid != rustix::process::geteuid().as_raw()).then(|| Foreign {
            file: file.into(),
            owner: user_of(uid),
            fix: format!("chown {} {}*", chown_spec(), queue.display()),
        })
    }
}

impl std::fmt::Display for Foreign {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} belongs to {} (left by a run as another user, such as root?); give the queue's files back to this \
             user, as root: `{}`",
            self.file.display(),
            self.owner,
            self.fix
        )
    }
}

/// This process's user, as "name (uid N)", or "uid N" when /etc/passwd does not name it.
pub(crate) fn process_user() -> String {
    user_of(rustix::process::getuid().as_raw())
}

/// A user, as "name (uid N)", or "uid N" when /etc/passwd does not name it.
pub fn user_of(uid: u32) -> String {
    user_name(&std::fs::read_to_string("/etc/passwd").unwrap_or_default(), uid)
}

/// The name /etc/passwd gives `uid`.
pub(crate) fn name_of(uid: u32) -> Option<String> {
    name_in(&std::fs::read_to_string("/etc/passwd").unwrap_or_default(), uid).map(str::to_owned)
}

/// This process's user for `chown`: `name:` (the user and its login group), or `uid:gid` without a name.
fn chown_spec() -> String {
    let uid = rustix::process::geteuid().as_raw();
    name_of(uid).map_or_else(|| format!("{uid}:{}", rustix::process::getegid().as_raw()), |name| format!("{name}:"))
}

fn name_in(passwd: &str, uid: u32) -> Option<&str> {
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        (fields.nth(1)?.parse::<u32>().ok()? == uid).then_some(name)
    })
}

fn user_name(passwd: &str, uid: u32) -> String {
    match name_in(passwd, uid) {
        Some(name) => format!("{name} (uid {uid})"),
        None => format!("uid {uid}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sql(code: std::ffi::c_int) -> StoreError {
        let error = rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), Some("from SQLite".into()));
        classify(&crate::store::RealFs, Path::new("/q/queue.db"), StoreError::Sql { context: "doing a thing", error })
    }

    #[test]
    fn sqlite_codes_become_what_to_do() {
        use rusqlite::ffi;
        let full = sql(ffi::SQLITE_FULL);
        assert!(matches!(&full, StoreError::Full { path, .. } if path == Path::new("/q/queue.db")), "{full}");
        assert!(full.is_disk_full() && full.is_transient());
        assert!(full.to_string().contains("/q/queue.db"), "{full}");
        for code in [ffi::SQLITE_BUSY, ffi::SQLITE_LOCKED, ffi::SQLITE_BUSY_SNAPSHOT] {
            let e = sql(code);
            assert!(matches!(e, StoreError::Busy { .. }) && e.is_transient() && !e.is_disk_full(), "{e}");
        }
        for code in [
            ffi::SQLITE_READONLY,
            ffi::SQLITE_READONLY_DBMOVED,
            ffi::SQLITE_READONLY_CANTINIT,
            ffi::SQLITE_CANTOPEN,
            ffi::SQLITE_PERM,
            ffi::SQLITE_AUTH,
        ] {
            let e = sql(code);
            assert!(matches!(e, StoreError::ReadOnly { .. }) && !e.is_transient(), "{code}: {e}");
            let text = e.to_string();
            assert!(text.contains("/q/queue.db") && text.contains("running as ") && text.contains("chown -R"));
        }
        for code in [ffi::SQLITE_CORRUPT, ffi::SQLITE_NOTADB, ffi::SQLITE_CORRUPT_INDEX] {
            let e = sql(code);
            assert!(matches!(&e, StoreError::Corrupt { detail, .. } if detail.contains("doing a thing")), "{e}");
            assert!(e.to_string().contains("damaged") && !e.is_transient());
        }
        for code in [ffi::SQLITE_CONSTRAINT, ffi::SQLITE_ERROR, ffi::SQLITE_IOERR] {
            assert!(matches!(sql(code), StoreError::Sql { .. }), "{code}");
        }
    }

    #[test]
    fn the_sqlite_error_is_the_source_and_said_once() {
        use std::error::Error as _;
        let sqlite = rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CONSTRAINT);
        let error = rusqlite::Error::SqliteFailure(sqlite, Some("UNIQUE constraint failed: queue.key".into()));
        let e = StoreError::Sql { context: "queueing a page", error };
        assert!(e.source().is_some_and(|s| s.downcast_ref::<rusqlite::Error>().is_some()), "{e:?}");
        let line = crate::error::describe(anyhow::Error::from(e).context("polling audit").as_ref());
        assert!(line.starts_with("polling audit: queueing a page: UNIQUE constraint failed: queue.key"), "{line}");
        assert_eq!(line.matches("UNIQUE").count(), 1, "{line}");
    }

    #[test]
    fn names_the_user_from_passwd() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\nmimecast-forwarder:x:998:998::/var/lib:/usr/sbin/nologin\n";
        assert_eq!(user_name(passwd, 998), "mimecast-forwarder (uid 998)");
        assert_eq!(user_name(passwd, 0), "root (uid 0)");
        assert_eq!(user_name(passwd, 1234), "uid 1234");
        assert_eq!(user_name("garbage\n::\n", 5), "uid 5");
        assert!(process_user().contains("uid "));
    }

    #[test]
    fn a_file_of_another_user_is_named_with_the_chown_that_gives_it_back() {
        let dir = tempfile::tempdir().unwrap();
        let queue = dir.path().join("queue.db");
        std::fs::write(&queue, b"").unwrap();
        assert_eq!(Foreign::of(&queue, &queue), None, "this process's own file");
        assert_eq!(Foreign::of(&dir.path().join("absent"), &queue), None);
        assert!(matches!(read_only(&queue), StoreError::ReadOnly { foreign: None, .. }));
        if !rustix::process::geteuid().is_root() {
            eprintln!("SKIPPED: not root, so no file of another user can be made here");
            return;
        }
        std::os::unix::fs::chown(&queue, Some(65534), None).unwrap();
        let foreign = Foreign::of(&queue, &queue).expect("another user's file");
        assert_eq!(foreign.fix, format!("chown root: {}*", queue.display()));
        assert!(foreign.owner.ends_with("(uid 65534)") || foreign.owner == "uid 65534", "{foreign:?}");
        let text = read_only(&queue).to_string();
        assert!(text.contains(&format!("{} belongs to ", queue.display())) && text.contains(&foreign.fix), "{text}");
    }

    #[test]
    fn free_bytes_of_the_queue_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert!(free_bytes(&dir.path().join("queue.db")).is_some_and(|b| b > 0));
        assert!(free_bytes(Path::new("queue.db")).is_some(), "a bare file name is in the current directory");
    }
}
