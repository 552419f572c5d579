//! The SQLite database: the record queue, the per-feed cursors, the seen-key set, dead letters and counters.
//! One connection, owned by the agent's thread. Every change that must be atomic is one transaction here.

mod cursor;
mod queue;

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};

pub use cursor::Cursor;
pub use queue::{Counters, NewRecord, PageCommit, PageOutcome, Queued};

/// The schema version this build writes, kept in `PRAGMA user_version`.
pub const SCHEMA_VERSION: i64 = 1;

/// Migrations in order: `MIGRATIONS[n]` takes the schema from version n to n+1.
const MIGRATIONS: [&str; 1] = [r"
    CREATE TABLE queue (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        feed TEXT NOT NULL,
        key TEXT NOT NULL,
        event_time INTEGER,
        queued_at INTEGER NOT NULL,
        bytes INTEGER NOT NULL,
        body TEXT NOT NULL
    );
    CREATE INDEX queue_feed_seq ON queue (feed, seq);
    CREATE TABLE seen (
        feed TEXT NOT NULL,
        key TEXT NOT NULL,
        horizon INTEGER NOT NULL,
        PRIMARY KEY (feed, key)
    ) WITHOUT ROWID;
    CREATE INDEX seen_horizon ON seen (feed, horizon);
    CREATE TABLE cursor (
        feed TEXT PRIMARY KEY,
        watermark INTEGER NOT NULL,
        window_from INTEGER,
        window_to INTEGER,
        page_token TEXT,
        last_success INTEGER,
        last_error TEXT,
        last_error_at INTEGER
    );
    CREATE TABLE dead_letter (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        feed TEXT NOT NULL,
        key TEXT NOT NULL,
        event_time INTEGER,
        body TEXT NOT NULL,
        reason TEXT NOT NULL,
        at INTEGER NOT NULL
    );
    CREATE TABLE counter (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
    CREATE TABLE state (name TEXT PRIMARY KEY, value TEXT) WITHOUT ROWID;
"];

/// A database problem, with the path and what we were doing.
#[derive(Debug)]
pub enum StoreError {
    /// The file is not a SQLite database or is damaged.
    Corrupt {
        path: PathBuf,
        detail: String,
    },
    /// Written by a newer version of the agent.
    TooNew {
        path: PathBuf,
        version: i64,
    },
    Sql {
        context: &'static str,
        error: rusqlite::Error,
    },
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Corrupt { path, detail } => write!(
                f,
                "queue database {} is damaged or not a database ({detail}); stop the service, move the file aside \
                 (its records may be recoverable with sqlite3 .recover) and start again to create a new queue",
                path.display()
            ),
            StoreError::TooNew { path, version } => write!(
                f,
                "queue database {} has schema version {version}, newer than this build's {SCHEMA_VERSION}; \
                 install the newer mimecast-forwarder again",
                path.display()
            ),
            StoreError::Sql { context, error } => write!(f, "{context}: {error}"),
        }
    }
}

impl std::error::Error for StoreError {}

pub(crate) trait Context<T> {
    fn ctx(self, context: &'static str) -> Result<T, StoreError>;
}

impl<T> Context<T> for Result<T, rusqlite::Error> {
    fn ctx(self, context: &'static str) -> Result<T, StoreError> {
        self.map_err(|error| StoreError::Sql { context, error })
    }
}

/// The open database.
pub struct Store {
    conn: Connection,
}

impl Store {
    /// Opens (creating if needed) the queue at `path`, in WAL mode with `synchronous = FULL`, and migrates it.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // systemd's StateDirectory= creates the directory in production; this covers tests and manual runs.
            let _ = std::fs::create_dir_all(dir);
        }
        let conn = Connection::open(path).map_err(|e| classify_open(path, e))?;
        setup(&conn).map_err(|e| classify_open(path, e))?;
        let store = Store { conn };
        store.migrate(path)?;
        Ok(store)
    }

    /// Opens an existing queue read-only, for `status` while `run` is running.
    pub fn open_read_only(path: &Path) -> Result<Store, StoreError> {
        let conn =
            Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
                .map_err(|e| classify_open(path, e))?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).ctx("setting busy timeout")?;
        let version: i64 =
            conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(|e| classify_open(path, e))?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::TooNew { path: path.into(), version });
        }
        if version < SCHEMA_VERSION {
            return Err(StoreError::Corrupt { path: path.into(), detail: format!("schema version {version}") });
        }
        Ok(Store { conn })
    }

    /// An in-memory store for unit tests of the store logic.
    #[cfg(test)]
    pub fn in_memory() -> Store {
        let conn = Connection::open_in_memory().expect("in-memory SQLite opens");
        let store = Store { conn };
        store.migrate(Path::new(":memory:")).expect("migrations apply to an empty database");
        store
    }

    fn migrate(&self, path: &Path) -> Result<(), StoreError> {
        let version: i64 =
            self.conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(|e| classify_open(path, e))?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::TooNew { path: path.into(), version });
        }
        for (v, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = self.conn.unchecked_transaction().ctx("starting migration")?;
            tx.execute_batch(sql).map_err(|e| classify_open(path, e))?;
            tx.pragma_update(None, "user_version", v as i64 + 1).ctx("recording schema version")?;
            tx.commit().ctx("committing migration")?;
        }
        Ok(())
    }

    #[cfg(test)]
    pub(crate) fn conn(&self) -> &Connection {
        &self.conn
    }
}

/// WAL lets `status` read while `run` writes. `synchronous = FULL` makes every commit durable on return
/// (ARCHITECTURE.md explains the choice).
fn setup(conn: &Connection) -> Result<(), rusqlite::Error> {
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        log::warn!("SQLite refused WAL mode (got {mode}); status may wait for the writer");
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    Ok(())
}

fn classify_open(path: &Path, e: rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode::{DatabaseCorrupt, NotADatabase};
    match e.sqlite_error_code() {
        Some(DatabaseCorrupt | NotADatabase) => StoreError::Corrupt { path: path.into(), detail: e.to_string() },
        _ => StoreError::Sql { context: "opening the queue database", error: e },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_migrates_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/queue.db");
        drop(Store::open(&path).unwrap());
        let s = Store::open(&path).unwrap();
        let v: i64 = s.conn().query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        let mode: String = s.conn().query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
        assert_eq!(mode, "wal");
        assert!(Store::open_read_only(&path).is_ok());
    }

    #[test]
    fn a_corrupt_file_gives_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.db");
        std::fs::write(&path, vec![0x42u8; 8192]).unwrap();
        let e = Store::open(&path).err().unwrap();
        assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
        assert!(e.to_string().contains("move the file aside"));
        assert_eq!(std::fs::read(&path).unwrap(), vec![0x42u8; 8192], "the damaged file is left untouched");
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.db");
        let s = Store::open(&path).unwrap();
        s.conn().pragma_update(None, "user_version", 99).unwrap();
        drop(s);
        assert!(matches!(Store::open(&path), Err(StoreError::TooNew { version: 99, .. })));
    }
}
