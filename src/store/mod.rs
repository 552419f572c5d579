//! The SQLite database: the record queue, the per-feed cursors, the seen-key set, dead letters and counters.
//! One connection, owned by the agent's thread. Every change that must be atomic is one transaction here.

mod cursor;
mod dead_letter;
mod error;
mod note;
mod queue;
mod seen;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

pub use cursor::{Cursor, reread_within_keys};
pub use dead_letter::{DeadLetter, Requeued};
pub(crate) use error::Context;
use error::classify;
pub use error::user_of;
pub use error::{Foreign, StoreError};
pub(crate) use error::{name_of, process_user};
pub use note::Note;
pub use queue::{Counters, InFlight, NewRecord, PageCommit, PageOutcome, Queued};

/// The schema version this build writes, kept in `PRAGMA user_version`.
pub const SCHEMA_VERSION: i64 = 4;

/// Migrations in order: `MIGRATIONS[n]` takes the schema from version n to n+1. Each runs in one transaction
/// with the version it reaches; a database is never left between two versions.
const MIGRATIONS: [&str; 4] = [
    r"
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
",
    // 1 -> 2: `state` rows (the notes of `note.rs`) keep their time in a column of its own. Version 1 wrote
    // "<unix secs> <message>" in `value` (the Datadog error, the full disk), or the time alone (the last success),
    // and '' for a cleared note; a row in no such form was not written by the agent, and is dropped.
    r"
    CREATE TABLE state_2 (name TEXT PRIMARY KEY, at INTEGER NOT NULL, message TEXT NOT NULL) WITHOUT ROWID;
    INSERT INTO state_2 (name, at, message)
        SELECT name, CAST(substr(value, 1, instr(value, ' ') - 1) AS INTEGER), substr(value, instr(value, ' ') + 1)
        FROM state
        WHERE instr(value, ' ') > 1 AND substr(value, 1, instr(value, ' ') - 1) NOT GLOB '*[^0-9]*';
    INSERT INTO state_2 (name, at, message)
        SELECT name, CAST(value AS INTEGER), '' FROM state WHERE value <> '' AND value NOT GLOB '*[^0-9]*';
    DROP TABLE state;
    ALTER TABLE state_2 RENAME TO state;
",
    // 2 -> 3: seen keys in two tables, a small one that takes new keys and the main one they move into (see
    // `seen.rs`), and no index on their horizon (pruning scans a feed's keys, at most once an hour for the main
    // table). The queue's index carries each record's size, so that a batch is chosen without reading a record.
    r"
    DROP INDEX seen_horizon;
    ALTER TABLE seen RENAME TO seen_main;
    CREATE TABLE seen_recent (
        feed TEXT NOT NULL,
        key TEXT NOT NULL,
        horizon INTEGER NOT NULL,
        PRIMARY KEY (feed, key)
    ) WITHOUT ROWID;
    CREATE VIEW seen (feed, key, horizon) AS
        SELECT feed, key, horizon FROM seen_main UNION ALL SELECT feed, key, horizon FROM seen_recent;
    DROP INDEX queue_feed_seq;
    CREATE INDEX queue_feed_seq_bytes ON queue (feed, seq, bytes);
",
    // 3 -> 4: each cursor keeps from when on its feed's seen keys are complete (`cursor::reread_within_keys`).
    // Earlier builds forgot keys without saying up to when: NULL, set when the feed's next window completes.
    r"
    ALTER TABLE cursor ADD COLUMN keys_since INTEGER;
",
];

/// The page size of new queues. Records of about 1 KB left a sixth of each 4 KiB page (SQLite's default, which
/// holds three of them) empty; 8 KiB pages hold seven. Larger pages gain little more and make every page a
/// delete or a seen key touches costlier to write.
const PAGE_SIZE: i64 = 8192;

/// A queue file of an older layout (4 KiB pages, or no incremental vacuum: files made before schema version 3
/// or before incremental vacuum) is rewritten in the new one by `VACUUM`, which copies the pages in use twice
/// (a temporary copy, then back through the rollback journal) and blocks the store meanwhile: 0.4 s for a queue
/// of 45,000 records of 1.1 KB (62 MB in use) on this machine type with the file in the page cache
/// (`examples/store_rates.rs`); an emptied queue (its seen keys) takes a few hundredths. It happens at open, and
/// in `shrink` once the queue is empty, only while the pages in use hold at most this and the filesystem has
/// room for both copies.
const RELAYOUT_MAX_BYTES: u64 = 64 << 20;

/// How long a statement waits for a lock held by another process (`status`, `dead-letters`, a backup) before
/// giving [`StoreError::Busy`].
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// See [`Store::space`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Space {
    /// `None` where the filesystem cannot say.
    pub fs_free: Option<u64>,
    pub reusable: u64,
    /// The WAL file's size: what a checkpoint may need as new space in the database file, at most.
    pub wal: u64,
}

/// What SQLite keeps of a database `queue.db`: the file itself, `queue.db-wal` and `queue.db-shm`.
pub(crate) const SQLITE_SUFFIXES: [&str; 3] = ["", "-wal", "-shm"];

/// A new queue `queue.db` is built as `queue.db.new` and renamed into place (see [`create`]): beside it, so that
/// the rename stays on its filesystem, and covered by the `queue.db*` that the ownership fix names.
const CREATING: &str = ".new";

/// `path` with `suffix` added to its name: a file SQLite keeps beside the database, or the instance's lock.
pub(crate) fn beside(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// The directory that holds the file `path` (`.` for a bare file name).
pub(crate) fn dir_of(path: &Path) -> &Path {
    path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// How many prepared statements a connection keeps: more than the store's distinct statements.
const STATEMENT_CACHE: usize = 64;

/// What the store does with the filesystem beside SQLite, and the SQLite VFS it opens the queue with: the real ones
/// in production ([`RealFs`]); the simulator's disk (`crates/simdisk`), where power loss drops what was not synced.
pub trait Fs: Send + Sync {
    /// The SQLite VFS to open the queue with (`None`: SQLite's default, the real filesystem).
    fn vfs(&self) -> Option<&str> {
        None
    }
    /// Bytes available on the filesystem that holds `path`, if the system says.
    fn free_bytes(&self, path: &Path) -> Option<u64>;
    /// The size of the file at `path` (0 when there is none).
    fn file_len(&self, path: &Path) -> u64;
    /// The size of the file at `path`, following links (`NotFound` when there is none).
    fn len(&self, path: &Path) -> std::io::Result<u64>;
    /// Whether there is an entry at `path`, a link to nothing included.
    fn entry_exists(&self, path: &Path) -> bool;
    /// Where the link at `path` points, if it is one.
    fn read_link(&self, path: &Path) -> Option<PathBuf>;
    fn create_dir_all(&self, dir: &Path) -> std::io::Result<()>;
    fn remove_file(&self, path: &Path) -> std::io::Result<()>;
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()>;
    /// Makes the file's contents durable (`fsync`).
    fn sync_file(&self, path: &Path) -> std::io::Result<()>;
    /// Makes the directory's entries durable: a file created, renamed or removed in it.
    fn sync_dir(&self, dir: &Path) -> std::io::Result<()>;
}

/// The filesystem as the system has it.
pub struct RealFs;

impl Fs for RealFs {
    fn free_bytes(&self, path: &Path) -> Option<u64> {
        error::free_bytes(path)
    }

    fn file_len(&self, path: &Path) -> u64 {
        file_len(path)
    }

    fn len(&self, path: &Path) -> std::io::Result<u64> {
        std::fs::metadata(path).map(|m| m.len())
    }

    fn entry_exists(&self, path: &Path) -> bool {
        path.symlink_metadata().is_ok()
    }

    fn read_link(&self, path: &Path) -> Option<PathBuf> {
        path.is_symlink().then(|| std::fs::read_link(path).unwrap_or_default())
    }

    fn create_dir_all(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)
    }

    fn remove_file(&self, path: &Path) -> std::io::Result<()> {
        std::fs::remove_file(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        std::fs::rename(from, to)
    }

    fn sync_file(&self, path: &Path) -> std::io::Result<()> {
        std::fs::File::open(path).and_then(|f| f.sync_all())
    }

    fn sync_dir(&self, dir: &Path) -> std::io::Result<()> {
        self.sync_file(dir)
    }
}

/// Opens a connection to `path` on `fs`'s VFS.
fn connect(fs: &dyn Fs, path: &Path, flags: OpenFlags) -> Result<Connection, rusqlite::Error> {
    match fs.vfs() {
        Some(vfs) => Connection::open_with_flags_and_vfs(path, flags, vfs),
        None => Connection::open_with_flags(path, flags),
    }
}

/// The open database.
pub struct Store {
    conn: Connection,
    path: PathBuf,
    seen: seen::Seen,
    fs: Arc<dyn Fs>,
}

impl Store {
    /// Opens the queue at `path`, in WAL mode with `synchronous = FULL`, migrates it and checks it with `PRAGMA
    /// quick_check`. Where there is no file it creates a new queue, whole ([`create`]); an empty file, or one
    /// without a schema version, is damage ([`unversioned`]), not a new queue: starting one would drop the
    /// cursors, and read everything since `initial_lookback_secs` again, without a word.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Store::open_on(path, Arc::new(RealFs))
    }

    /// [`Store::open`] on the filesystem `fs` (the simulator's disk).
    pub fn open_on(path: &Path, fs: Arc<dyn Fs>) -> Result<Store, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // systemd's StateDirectory= creates the directory in production; this covers tests and manual runs.
            let _ = fs.create_dir_all(dir);
        }
        match fs.len(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match refused_creation(&*fs, path) {
                Some(refused) => return Err(refused),
                None => create(&*fs, path)?,
            },
            // Before SQLite opens it: SQLite takes an empty file for a new database, and deletes a `-wal` beside it.
            Ok(0) => return Err(unversioned(path, true)),
            // Anything else is for SQLite's open to say.
            _ => {}
        }
        // Without SQLITE_OPEN_CREATE: a file that went away meanwhile is an error, not an empty new database.
        Store::open_with(path, OpenFlags::default().difference(OpenFlags::SQLITE_OPEN_CREATE), fs)
    }

    /// `open` with the given flags; tests use it to see how a read-only file is reported.
    fn open_with(path: &Path, flags: OpenFlags, fs: Arc<dyn Fs>) -> Result<Store, StoreError> {
        let mut conn =
            connect(&*fs, path, flags).ctx("opening the queue database").map_err(|e| classify(&*fs, path, e))?;
        // Every transaction takes the write lock when it begins. A deferred one that reads first and then writes
        // gets SQLITE_BUSY at once, without waiting, when another process (`dead-letters`, the agent) wrote in
        // between: SQLite cannot upgrade a read snapshot that is no longer the latest.
        conn.set_transaction_behavior(rusqlite::TransactionBehavior::Immediate);
        // Every statement the loop runs stays prepared (rusqlite keeps 16 by default, fewer than the store has,
        // and a statement evicted is parsed again on its next use).
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        let store = Store::new(conn, path.into(), fs);
        store.read(|conn| {
            // SQLite opens a file it may not write read-only without a word; say so now, not at the first write.
            if conn.is_readonly(rusqlite::MAIN_DB).ctx("opening the queue database")? {
                return Err(error::read_only(path));
            }
            if schema_version(conn)? == 0 {
                // `create` makes every queue with its schema: a file without one was not made whole. Said before
                // WAL mode or a migration writes anything, so the file stays as it was.
                return Err(unversioned(path, false));
            }
            setup(conn).ctx("setting up the queue database")?;
            migrate(conn, path)?;
            relayout(conn, path, &*store.fs, RELAYOUT_MAX_BYTES)?;
            quick_check(conn, path)
        })?;
        Ok(store)
    }

    /// Opens an existing queue read-only, for `status` while `run` is running. Checks it like `open` does, so
    /// that damage in the middle of the file is reported.
    pub fn open_read_only(path: &Path) -> Result<Store, StoreError> {
        if std::fs::metadata(path).is_ok_and(|m| m.len() == 0) {
            return Err(unversioned(path, true));
        }
        let conn =
            Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
                .ctx("opening the queue database")
                .map_err(|e| classify(&RealFs, path, e))?;
        let store = Store::new(conn, path.into(), Arc::new(RealFs));
        store.read(|conn| {
            conn.busy_timeout(BUSY_TIMEOUT).ctx("setting busy timeout")?;
            let version = schema_version(conn)?;
            if version > SCHEMA_VERSION {
                return Err(StoreError::TooNew { path: path.into(), version });
            }
            if version == 0 {
                return Err(unversioned(path, false));
            }
            if version < SCHEMA_VERSION {
                // Only `run` migrates (a read-only reader must not change the file under a running older agent).
                return Err(StoreError::TooOld { path: path.into(), version });
            }
            quick_check(conn, path)
        })?;
        Ok(store)
    }

    /// An in-memory store for unit tests of the store logic.
    #[cfg(test)]
    pub fn in_memory() -> Store {
        let conn = Connection::open_in_memory().expect("in-memory SQLite opens");
        let path = PathBuf::from(":memory:");
        migrate(&conn, &path).expect("migrations apply to an empty database");
        Store::new(conn, path, Arc::new(RealFs))
    }

    fn new(conn: Connection, path: PathBuf, fs: Arc<dyn Fs>) -> Store {
        Store { conn, path, seen: seen::Seen::default(), fs }
    }

    /// The database file this store was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes available on the filesystem holding the database, if the system says.
    pub fn free_bytes(&self) -> Option<u64> {
        self.fs.free_bytes(&self.path)
    }

    /// Room for the next writes: the filesystem's free bytes, and the bytes of free pages inside the database
    /// that new records reuse without growing the file (every write still goes through the WAL first).
    pub fn space(&self) -> Result<Space, StoreError> {
        let reusable = self.read(|conn| {
            let layout = Layout::of(conn)?;
            Ok(layout.free_pages.saturating_mul(layout.page_size))
        })?;
        Ok(Space { fs_free: self.free_bytes(), reusable, wal: self.wal_bytes() })
    }

    /// The WAL file's size (0 when there is none): one `stat`, cheap enough around every page commit.
    pub fn wal_bytes(&self) -> u64 {
        self.fs.file_len(&beside(&self.path, "-wal"))
    }

    /// Folds the WAL into the database and truncates it, giving its space back to the filesystem. SQLite only
    /// does this by itself every 1000 pages; on a nearly full disk the WAL is what holds the last free space.
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        self.read(truncate_wal)
    }

    /// Gives up to `max_bytes` of free pages back to the filesystem: the file shrinks at the checkpoint that
    /// follows. A queue file of the older layout keeps its free pages until it is rewritten (see
    /// [`Store::shrink`]). Returns whether this queue can release pages at all.
    pub fn release_free_pages(&self, max_bytes: u64) -> Result<bool, StoreError> {
        self.read(|conn| {
            let mode: i64 = conn.query_row("PRAGMA auto_vacuum", [], |r| r.get(0)).ctx("reading auto_vacuum")?;
            if mode != 2 {
                return Ok(false);
            }
            let size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0)).ctx("reading the page size")?;
            let pages = max_bytes.div_ceil(u64::try_from(size).unwrap_or(4096).max(512)).max(1);
            // The pragma frees one page per step of its statement: step it to the end.
            let mut stmt = conn.prepare(&format!("PRAGMA incremental_vacuum({pages})")).ctx("releasing free pages")?;
            let mut rows = stmt.query([]).ctx("releasing free pages")?;
            while rows.next().ctx("releasing free pages")?.is_some() {}
            truncate_wal(conn)?;
            Ok(true)
        })
    }

    /// Gives space back to the filesystem once a backlog has drained, a little at a time: up to `max_pages`
    /// free pages (8 KiB each) at the end of the file are released (`PRAGMA incremental_vacuum`, which first
    /// moves pages in use from the end of the file into free ones) and the WAL is checkpointed, so the file
    /// shrinks now. Returns by how many bytes the database file shrank.
    ///
    /// Cheap to call often: it does nothing while there is nothing to release, or while the queued records take
    /// more than a quarter of the free space (a backlog still draining: new records reuse free pages, and moving
    /// the pages in use would cost more than it gives). A queue file of an older layout is rewritten instead
    /// (the same `VACUUM` as at open) once the queue is empty and small enough.
    pub fn shrink(&mut self, max_pages: u32) -> Result<u64, StoreError> {
        let (path, fs) = (self.path.clone(), self.fs.clone());
        let before = fs.file_len(&path);
        self.read(|conn| {
            let layout = Layout::of(conn)?;
            if !layout.is_current() {
                let queued: i64 = conn
                    .query_row("SELECT EXISTS (SELECT 1 FROM queue)", [], |r| r.get(0))
                    .ctx("looking at the queue")?;
                if queued == 0 && relayout(conn, &path, &*fs, RELAYOUT_MAX_BYTES)? {
                    return Ok(());
                }
            }
            if layout.auto_vacuum != 2 {
                return Ok(());
            }
            let queue_bytes = queue::queue_bytes(conn)?;
            let free = layout.free_pages.saturating_mul(layout.page_size);
            if max_pages == 0 || free == 0 || u64::try_from(queue_bytes).unwrap_or(0) > free / 4 {
                return Ok(());
            }
            let mut stmt =
                conn.prepare_cached(&format!("PRAGMA incremental_vacuum({max_pages})")).ctx("releasing free pages")?;
            // The pragma frees one page per step of its statement: step it to the end.
            let mut rows = stmt.query([]).ctx("releasing free pages")?;
            while rows.next().ctx("releasing free pages")?.is_some() {}
            truncate_wal(conn)
        })?;
        Ok(before.saturating_sub(fs.file_len(&path)))
    }

    /// How long a statement waits for another process's lock before giving [`StoreError::Busy`] (5 s unless
    /// changed; tests shorten it).
    pub fn set_busy_timeout(&self, timeout: Duration) -> Result<(), StoreError> {
        self.read(|conn| conn.busy_timeout(timeout).ctx("setting busy timeout"))
    }

    /// Runs `f` on the connection and classifies its error; every public method that only reads goes through here.
    fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T, StoreError>) -> Result<T, StoreError> {
        f(&self.conn).map_err(|e| classify(&*self.fs, &self.path, e))
    }

    /// `read` for methods that write (a transaction needs the connection mutably).
    fn write<T>(&mut self, f: impl FnOnce(&mut Connection) -> Result<T, StoreError>) -> Result<T, StoreError> {
        f(&mut self.conn).map_err(|e| classify(&*self.fs, &self.path, e))
    }

    #[cfg(test)]
    pub(crate) fn conn(&self) -> &Connection {
        &self.conn
    }
}

/// Creates a new queue at `path`, whole: its schema is built in `queue.db.new` beside it ([`CREATING`]), which is
/// synced and renamed to `path`, and the directory is synced, so that `path` never exists without its schema, even
/// after a crash or a power loss during the first start. (SQLite alone creates an empty file first and the schema
/// after it, so a crash in between would leave what is otherwise damage.) A `queue.db.new` left by such a crash is
/// discarded first. Only `run`, under its instance lock, creates a queue (`status` and `dead-letters` need one).
fn create(fs: &dyn Fs, path: &Path) -> Result<(), StoreError> {
    let temp = beside(path, CREATING);
    for suffix in ["", "-journal", "-wal", "-shm"] {
        match fs.remove_file(&beside(&temp, suffix)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(error::io(fs, path, "removing a queue database left half made", e));
            }
            _ => {}
        }
    }
    let built = (|| {
        let conn = connect(fs, &temp, OpenFlags::default()).ctx("creating the queue database")?;
        // Before the first table (and the page size before auto_vacuum, or SQLite keeps its default): see
        // `PAGE_SIZE`, and free pages can be given back to the filesystem (`shrink`, `release_free_pages`), which a
        // queue needs once delivery has emptied it. The file stays in rollback mode, so that everything is in it
        // when it is closed; `setup` turns WAL mode on at the first open.
        conn.pragma_update(None, "page_size", PAGE_SIZE).ctx("setting the page size")?;
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL").ctx("enabling incremental vacuum")?;
        migrate(&conn, path)?;
        conn.close().map_err(|(_, e)| e).ctx("closing the new queue database")
    })();
    built.map_err(|e| classify(fs, path, e))?;
    fs.sync_file(&temp).map_err(|e| error::io(fs, path, "syncing the new queue database", e))?;
    fs.rename(&temp, path).map_err(|e| error::io(fs, path, "moving the new queue database into place", e))?;
    fs.sync_dir(dir_of(path)).map_err(|e| error::io(fs, path, "syncing the queue's directory", e))
}

/// Why no new queue may be made at `path`, where there is no queue file, or `None`. `status` and `dead-letters`
/// ask too, so that they say what `run` would say instead of "no queue yet".
/// - A link to nothing: its target is elsewhere (a volume not mounted yet), and a new queue in its place would
///   read again from `initial_lookback_secs` and orphan the real one.
/// - A WAL or a rollback journal left without its database: SQLite recovers one it finds beside a database into
///   it, whatever database it was of, so it would be applied to the new queue.
pub fn not_to_create(path: &Path) -> Option<StoreError> {
    refused_creation(&RealFs, path)
}

fn refused_creation(fs: &dyn Fs, path: &Path) -> Option<StoreError> {
    if let Some(target) = fs.read_link(path) {
        let why = format!("a symbolic link to {}, which does not exist (a filesystem not mounted?)", target.display());
        return Some(error::io(fs, path, "opening the queue", std::io::Error::new(std::io::ErrorKind::NotFound, why)));
    }
    ["-wal", "-journal"].into_iter().map(|suffix| beside(path, suffix)).find(|s| fs.entry_exists(s)).map(|stray| {
        StoreError::Corrupt { path: stray, detail: format!("left without its database {}", path.display()) }
    })
}

/// The error for a queue file without a schema version: empty, or made by an earlier build that was stopped
/// between creating the file and its schema. Not a queue to start again: it may have been one.
fn unversioned(path: &Path, empty: bool) -> StoreError {
    let detail = if empty { "an empty file, no schema version" } else { "no schema version" };
    StoreError::Corrupt { path: path.into(), detail: detail.into() }
}

/// WAL lets `status` read while `run` writes. `synchronous = FULL` makes every commit durable on return
/// (ARCHITECTURE.md explains the choice).
fn setup(conn: &Connection) -> Result<(), rusqlite::Error> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        log::warn!("SQLite refused WAL mode (got {mode}); status may wait for the writer");
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    Ok(())
}

fn schema_version(conn: &Connection) -> Result<i64, StoreError> {
    conn.query_row("PRAGMA user_version", [], |r| r.get(0)).ctx("reading the schema version")
}

fn migrate(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let version = schema_version(conn)?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::TooNew { path: path.into(), version });
    }
    for (v, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.unchecked_transaction().ctx("starting migration")?;
        tx.execute_batch(sql).ctx("migrating the schema")?;
        tx.pragma_update(None, "user_version", v as i64 + 1).ctx("recording schema version")?;
        tx.commit().ctx("committing migration")?;
    }
    Ok(())
}

/// `wal_checkpoint(TRUNCATE)`: the WAL folded into the database and cut to nothing.
fn truncate_wal(conn: &Connection) -> Result<(), StoreError> {
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())).ctx("checkpointing the WAL")
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// How the database file is laid out.
#[derive(Debug, Clone, Copy)]
struct Layout {
    page_size: u64,
    /// `PRAGMA auto_vacuum`: 2 is incremental.
    auto_vacuum: i64,
    pages: u64,
    free_pages: u64,
}

impl Layout {
    fn of(conn: &Connection) -> Result<Layout, StoreError> {
        let pragma = |name: &'static str| -> Result<i64, StoreError> {
            // Cached: `shrink` and `space` read the layout around every batch and page.
            conn.prepare_cached(name).and_then(|mut s| s.query_row([], |r| r.get(0))).ctx("reading the database layout")
        };
        let count = |v: i64| u64::try_from(v).unwrap_or(0);
        Ok(Layout {
            page_size: count(pragma("PRAGMA page_size")?),
            auto_vacuum: pragma("PRAGMA auto_vacuum")?,
            pages: count(pragma("PRAGMA page_count")?),
            free_pages: count(pragma("PRAGMA freelist_count")?),
        })
    }

    fn is_current(&self) -> bool {
        self.page_size == PAGE_SIZE as u64 && self.auto_vacuum == 2
    }

    /// Bytes in pages that hold something.
    fn in_use(&self) -> u64 {
        self.pages.saturating_sub(self.free_pages).saturating_mul(self.page_size)
    }
}

/// Rewrites a queue file of an older layout in the current one ([`PAGE_SIZE`], incremental vacuum) with
/// `VACUUM`, when the pages in use hold at most `max_bytes`, the filesystem has room for two copies of them, and
/// no other process has the file open (leaving WAL mode, which a page size change needs, takes the file for
/// itself: the attempt does not wait). Otherwise, or when the `VACUUM` fails (a full disk, a lock met half way,
/// a temporary directory it may not write: it rolls back), it says why and leaves the file as it is, to be tried
/// again at the next open or [`Store::shrink`]. Returns whether the file was rewritten.
fn relayout(conn: &Connection, path: &Path, fs: &dyn Fs, max_bytes: u64) -> Result<bool, StoreError> {
    let layout = Layout::of(conn)?;
    if layout.is_current() {
        return Ok(false);
    }
    let in_use = layout.in_use();
    let later = "it is rewritten at a later start, or once the queue is empty";
    if in_use > max_bytes {
        log::info!(
            "queue database {} keeps its older layout for now ({} byte pages{}, {in_use} bytes in use): {later}",
            path.display(),
            layout.page_size,
            if layout.auto_vacuum == 2 { "" } else { ", no incremental vacuum" },
        );
        return Ok(false);
    }
    if fs.free_bytes(path).is_some_and(|free| free < in_use.saturating_mul(2) + (8 << 20)) {
        log::info!("queue database {}: no room to rewrite it in the new layout now; {later}", path.display());
        return Ok(false);
    }
    let (started, before) = (std::time::Instant::now(), fs.file_len(path));
    // Leaving WAL mode waits for no one: another process using the file (`status`, a running agent) means later.
    conn.busy_timeout(Duration::ZERO).ctx("setting busy timeout")?;
    let mode = conn.query_row("PRAGMA journal_mode = DELETE", [], |r| r.get::<_, String>(0));
    conn.busy_timeout(BUSY_TIMEOUT).ctx("setting busy timeout")?;
    if !mode.as_deref().is_ok_and(|m| m.eq_ignore_ascii_case("delete")) {
        log::info!("queue database {} is open in another process; {later}", path.display());
        setup(conn).ctx("setting up the queue database")?;
        return Ok(false);
    }
    let vacuumed = conn
        .execute_batch(&format!("PRAGMA page_size = {PAGE_SIZE}; PRAGMA auto_vacuum = INCREMENTAL; VACUUM;"))
        .ctx("rewriting the queue database in the new layout")
        .map_err(|e| classify(fs, path, e));
    setup(conn).ctx("setting up the queue database")?;
    match vacuumed {
        Ok(()) => {
            log::info!(
                "queue database {} rewritten with {PAGE_SIZE} byte pages and incremental vacuum in {:.1}s: {before} \
                 -> {} bytes",
                path.display(),
                started.elapsed().as_secs_f64(),
                fs.file_len(path)
            );
            Ok(true)
        }
        // A full disk, a lock, or a temporary directory SQLite may not write: the queue works in its old layout.
        // Damage would be reported by the `quick_check` that follows at open.
        Err(e) => {
            log::warn!("queue database {} keeps its older layout: {e}; {later}", path.display());
            Ok(false)
        }
    }
}

/// Damage in the middle of the file shows only when a damaged page is read; `quick_check` reads them all
/// (without the slower index cross-checks of `integrity_check`).
fn quick_check(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let mut stmt = conn.prepare("PRAGMA quick_check(5)").ctx("checking the queue database")?;
    let answer: Vec<String> = stmt
        .query_map([], |r| r.get(0))
        .ctx("checking the queue database")?
        .collect::<Result<_, _>>()
        .ctx("checking the queue database")?;
    if answer == ["ok"] {
        return Ok(());
    }
    // The first line of a report names the schema ("*** in database main ***"), which says nothing here.
    let findings: Vec<&str> = answer.iter().map(String::as_str).filter(|l| !l.starts_with("***")).collect();
    Err(StoreError::Corrupt { path: path.into(), detail: format!("quick_check: {}", findings.join("; ")) })
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
    fn free_pages_go_back_to_the_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.db");
        let mut s = Store::open(&path).unwrap();
        let seqs = fill(&mut s, 2000);
        s.delivered(&seqs, 0, 0, 2).unwrap();
        s.checkpoint().unwrap();
        let before = s.space().unwrap().reusable;
        let size_before = std::fs::metadata(&path).unwrap().len();
        assert!(before > 1_000_000, "{before}");
        assert!(s.release_free_pages(before / 2).unwrap());
        let after = s.space().unwrap().reusable;
        assert!(after <= before / 2 + 4096, "released {} of {before}", before - after);
        assert!(std::fs::metadata(&path).unwrap().len() < size_before - before / 3, "the file shrank");
    }

    /// A queue of `n` records of about 1 KB in one page of the audit feed.
    fn fill(s: &mut Store, n: usize) -> Vec<i64> {
        use crate::config::WhenFull;
        use crate::mimecast::{Feed, window::Window};
        s.init_cursor(Feed::Audit, 0).unwrap();
        let records = (0..n)
            .map(|i| NewRecord {
                key: format!("k{i}-{}", fastrand::u64(..)),
                event_time: Some(10),
                body: format!("{{\"p\":\"{}\"}}", "x".repeat(1000)),
            })
            .collect();
        let page = PageCommit {
            feed: Feed::Audit,
            window: Window { from: 0, to: 1 },
            next_token: None,
            records,
            forget_before: 0,
        };
        s.commit_page(&page, 1, u64::MAX, WhenFull::Pause, &InFlight::NONE).unwrap();
        s.candidates(usize::MAX >> 1).unwrap().concat().iter().map(|q| q.seq).collect()
    }

    fn layout(path: &Path) -> (i64, i64, String) {
        let c = Connection::open(path).unwrap();
        let get = |p: &str| c.query_row(&format!("PRAGMA {p}"), [], |r| r.get::<_, rusqlite::types::Value>(0)).unwrap();
        let int = |v| match v {
            rusqlite::types::Value::Integer(i) => i,
            other => panic!("{other:?}"),
        };
        let mode = match get("journal_mode") {
            rusqlite::types::Value::Text(t) => t,
            other => panic!("{other:?}"),
        };
        (int(get("page_size")), int(get("auto_vacuum")), mode)
    }

    /// A current queue as a build before this layout made it: 4 KiB pages, no incremental vacuum.
    fn old_layout_queue(path: &Path, records: usize) -> Vec<i64> {
        let conn = Connection::open(path).unwrap();
        setup(&conn).unwrap();
        migrate(&conn, path).unwrap();
        drop(conn);
        assert_eq!(layout(path), (4096, 0, "wal".into()));
        let mut s = Store::new(Connection::open(path).unwrap(), path.into(), Arc::new(RealFs));
        fill(&mut s, records)
    }

    #[test]
    fn new_queues_have_8_kib_pages_and_incremental_vacuum() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.db");
        drop(Store::open(&path).unwrap());
        assert_eq!(layout(&path), (PAGE_SIZE, 2, "wal".into()));
    }

    #[test]
    fn an_older_layout_is_rewritten_at_open_when_small_and_keeps_everything() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.db");
        let seqs = old_layout_queue(&path, 300);
        let s = Store::open(&path).unwrap();
        assert_eq!(layout(&path), (PAGE_SIZE, 2, "wal".into()));
        let after: Vec<i64> = s.candidates(1000).unwrap().concat().iter().map(|q| q.seq).collect();
        assert_eq!(after, seqs);
        assert_eq!(s.counters().unwrap().queue_records, 300);
    }

    #[test]
    fn an_older_layout_waits_while_large_or_open_elsewhere() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.db");
        old_layout_queue(&path, 300);
        let conn = Connection::open(&path).unwrap();
        assert!(!relayout(&conn, &path, &RealFs, 100_000).unwrap(), "300 KB in use is more than 100 KB");
        assert_eq!(layout(&path), (4096, 0, "wal".into()));

        // Another process reading: no wait, no error, nothing changed, and both go on.
        let other = Connection::open(&path).unwrap();
        let n: i64 = other.query_row("SELECT COUNT(*) FROM queue", [], |r| r.get(0)).unwrap();
        let started = std::time::Instant::now();
        assert!(!relayout(&conn, &path, &RealFs, RELAYOUT_MAX_BYTES).unwrap());
        assert!(started.elapsed() < BUSY_TIMEOUT, "it did not wait for the other process");
        let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
        assert_eq!(mode, "wal");
        conn.execute("INSERT INTO counter VALUES ('x', 1)", []).unwrap();
        let m: i64 = other.query_row("SELECT COUNT(*) FROM queue", [], |r| r.get(0)).unwrap();
        assert_eq!((n, m), (300, 300));
        drop(other);
        assert!(relayout(&conn, &path, &RealFs, RELAYOUT_MAX_BYTES).unwrap());
        assert_eq!(layout(&path), (PAGE_SIZE, 2, "wal".into()));
    }

    #[test]
    fn shrink_gives_space_back_once_the_backlog_has_drained() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.db");
        let mut s = Store::open(&path).unwrap();
        let seqs = fill(&mut s, 3000);
        assert_eq!(s.shrink(100).unwrap(), 0, "nothing free");
        s.delivered(&seqs[..1000], 0, 0, 2).unwrap();
        s.checkpoint().unwrap();
        assert!(s.space().unwrap().reusable > 1_000_000);
        assert_eq!(s.shrink(100).unwrap(), 0, "two thirds still queued: a backlog draining");
        s.delivered(&seqs[1000..2900], 0, 0, 2).unwrap();
        s.checkpoint().unwrap();
        let full = file_len(&path);
        let given = s.shrink(100).unwrap();
        assert_eq!(given, 100 * PAGE_SIZE as u64, "a little at a time");
        assert_eq!(file_len(&path), full - given);
        while s.shrink(100).unwrap() > 0 {}
        let queued = s.counters().unwrap().queue_bytes as u64;
        assert!(s.space().unwrap().reusable < 4 * queued, "free pages left: a few, next to what is queued");
        assert!(file_len(&path) < full / 4, "{} of {full}", file_len(&path));
        assert_eq!(s.candidates(1000).unwrap().concat().len(), 100, "the rest is still queued");
        assert_eq!(s.wal_bytes(), 0, "checkpointed");
    }

    #[test]
    fn shrink_rewrites_an_older_layout_once_the_queue_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.db");
        let seqs = old_layout_queue(&path, 2000);
        let conn = Connection::open(&path).unwrap();
        let mut s = Store::new(conn, path.clone(), Arc::new(RealFs));
        s.delivered(&seqs[..1900], 0, 0, 2).unwrap();
        assert_eq!(s.shrink(100).unwrap(), 0, "records queued: not yet");
        assert_eq!(layout(&path).0, 4096);
        s.delivered(&seqs[1900..], 0, 0, 2).unwrap();
        let full = file_len(&path);
        let given = s.shrink(100).unwrap();
        assert!(given > full / 2, "{given} of {full}");
        assert_eq!(layout(&path), (PAGE_SIZE, 2, "wal".into()));
        let out = s.commit_page(
            &PageCommit {
                feed: crate::mimecast::Feed::Audit,
                window: crate::mimecast::window::Window { from: 0, to: 1 },
                next_token: None,
                records: vec![NewRecord { key: "new".into(), event_time: None, body: "{}".into() }],
                forget_before: 0,
            },
            3,
            u64::MAX,
            crate::config::WhenFull::Pause,
            &InFlight::NONE,
        );
        assert_eq!(out.unwrap().queued, 1, "the store goes on after the rewrite");
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

    /// An empty `queue.db` (a crash of an earlier build during its first start, or `: > queue.db`), or one
    /// without a schema version, is damage for `run` as for `status`, and is left as it was: not a new queue that
    /// would start again from `initial_lookback_secs` without a word.
    #[test]
    fn an_empty_or_unversioned_file_is_damage_not_a_new_queue() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.db");
        std::fs::write(&path, b"").unwrap();
        for e in [Store::open(&path).err().unwrap(), Store::open_read_only(&path).err().unwrap()] {
            assert!(matches!(&e, StoreError::Corrupt { path: p, .. } if *p == path), "{e}");
            assert!(e.to_string().contains("an empty file, no schema version"), "{e}");
            assert!(e.to_string().contains("move the file aside"), "{e}");
        }
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0, "the empty file is left as it was");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["queue.db"], "nothing created beside it");

        // A database with tables but no schema version: not ours, or not made whole.
        std::fs::remove_file(&path).unwrap();
        Connection::open(&path).unwrap().execute_batch("CREATE TABLE t (x)").unwrap();
        let before = std::fs::read(&path).unwrap();
        for e in [Store::open(&path).err().unwrap(), Store::open_read_only(&path).err().unwrap()] {
            assert!(matches!(&e, StoreError::Corrupt { detail, .. } if detail == "no schema version"), "{e}");
        }
        assert_eq!(std::fs::read(&path).unwrap(), before, "left as it was");
    }

    /// A new queue is built beside its path and renamed into place, so that the path never holds a file without
    /// its schema; what a crash during that left is discarded at the next start, but a WAL or a journal left
    /// without its database is refused rather than recovered into the new queue.
    /// A `queue.db` that links to a file that is not there (a volume not mounted yet) is an error, and the link is
    /// left as it was: a new queue in its place would start over and orphan the real one.
    #[test]
    fn a_link_to_a_missing_queue_is_refused_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.db");
        let target = dir.path().join("volume/queue.db");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        let e = Store::open(&path).err().unwrap().to_string();
        assert!(e.contains("a symbolic link to") && e.contains("volume/queue.db"), "{e}");
        assert!(path.is_symlink() && !target.exists(), "the link is left as it was");
        std::fs::create_dir(dir.path().join("volume")).unwrap();
        drop(Store::open(&target).unwrap());
        drop(Store::open(&path).unwrap());
        assert!(path.is_symlink(), "a link to a queue is opened through");
    }

    #[test]
    fn a_new_queue_is_made_whole_and_a_half_made_one_is_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.db");
        let temp = beside(&path, CREATING);
        std::fs::write(&temp, b"half a queue").unwrap();
        std::fs::write(beside(&temp, "-journal"), b"its journal").unwrap();
        let s = Store::open(&path).unwrap();
        assert_eq!(schema_version(s.conn()).unwrap(), SCHEMA_VERSION);
        drop(s);
        let mut names: Vec<_> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        assert_eq!(names, ["queue.db"], "the leftovers are gone, and the closed queue has no -wal or -shm");
        assert_eq!(layout(&path), (PAGE_SIZE, 2, "wal".into()));

        for stray in ["-wal", "-journal"] {
            std::fs::remove_file(&path).unwrap();
            let stray = beside(&path, stray);
            std::fs::write(&stray, b"a log of another database").unwrap();
            let e = Store::open(&path).err().unwrap();
            assert!(matches!(&e, StoreError::Corrupt { path: p, .. } if *p == stray), "{e}");
            assert!(e.to_string().contains("left without its database") && !path.exists(), "{e}");
            std::fs::remove_file(&stray).unwrap();
            drop(Store::open(&path).unwrap());
        }
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

    /// A database as version 1 left it: notes as "<secs> <message>" text, a cleared one, a record and a cursor.
    #[test]
    fn a_version_1_database_is_migrated_with_its_notes_and_records() {
        use crate::mimecast::Feed;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.db");
        let old = Connection::open(&path).unwrap();
        old.execute_batch(MIGRATIONS[0]).unwrap();
        old.execute_batch(
            "PRAGMA user_version = 1;
             INSERT INTO state VALUES ('datadog_last_success', '1700000000');
             INSERT INTO state VALUES ('datadog_last_error', '1700000100 HTTP 503: {\"errors\": [\"down\"]}');
             INSERT INTO state VALUES ('disk_full', '');
             INSERT INTO state VALUES ('hand_made', 'not a note');
             INSERT INTO cursor (feed, watermark) VALUES ('audit', 1699990000);
             INSERT INTO queue (feed, key, event_time, queued_at, bytes, body) VALUES ('audit', 'k', 1, 2, 2, '{}');
             INSERT INTO counter VALUES ('queue_records', 1), ('queue_bytes', 2);",
        )
        .unwrap();
        drop(old);

        // A reader must not migrate under a running older agent: it says what to do instead.
        let e = Store::open_read_only(&path).err().unwrap();
        assert!(matches!(e, StoreError::TooOld { version: 1, .. }), "{e}");
        assert!(e.to_string().contains("schema version 1") && e.to_string().contains("restart the service"), "{e}");

        let s = Store::open(&path).unwrap();
        let v: i64 = s.conn().query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        assert_eq!(s.note(Note::DatadogLastSuccess).unwrap(), Some((1_700_000_000, String::new())));
        let error = s.note(Note::DatadogLastError).unwrap();
        assert_eq!(error, Some((1_700_000_100, "HTTP 503: {\"errors\": [\"down\"]}".into())));
        assert_eq!(s.note(Note::DiskFull).unwrap(), None, "a cleared note stays cleared");
        let rows: i64 = s.conn().query_row("SELECT COUNT(*) FROM state", [], |r| r.get(0)).unwrap();
        assert_eq!(rows, 2, "the row in no note's form is dropped");
        assert_eq!(s.counters().unwrap().queue_records, 1);
        assert_eq!(s.candidates(10).unwrap()[0][0].key, "k");
        assert_eq!(s.cursor(Feed::Audit).unwrap().unwrap().watermark, 1_699_990_000);
        drop(s);
        assert!(Store::open_read_only(&path).is_ok(), "migrated once, read-only opens work");
    }

    /// A database as version 2 left it: queued records, a cursor in the middle of a window, seen keys (one also
    /// queued, one whose record was delivered), a dead letter, counters and a note.
    #[test]
    fn a_version_2_database_keeps_its_records_cursors_seen_keys_and_dead_letters() {
        use crate::config::WhenFull;
        use crate::mimecast::{Feed, window::Window};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.db");
        let old = Connection::open(&path).unwrap();
        old.execute_batch(MIGRATIONS[0]).unwrap();
        old.execute_batch(MIGRATIONS[1]).unwrap();
        old.execute_batch(
            "PRAGMA user_version = 2;
             INSERT INTO cursor VALUES ('dlp', 1699990000, 1699990000, 1699990300, 'page-2', 1699989000, NULL, NULL);
             INSERT INTO cursor (feed, watermark) VALUES ('audit', 1699980000);
             INSERT INTO queue (feed, key, event_time, queued_at, bytes, body) VALUES
                 ('dlp', 'h:a', 1699990010, 1699990400, 9, '{\"n\":\"a\"}'),
                 ('audit', 'id:x/h', NULL, 1699990400, 9, '{\"n\":\"x\"}');
             INSERT INTO seen VALUES ('dlp', 'h:a', 1699990010), ('dlp', 'h:gone', 1699990005),
                 ('audit', 'id:x/h', 1699980000);
             INSERT INTO dead_letter (feed, key, event_time, body, reason, at)
                 VALUES ('dlp', 'h:dead', 1699990001, '{\"n\":\"d\"}', 'HTTP 400: bad', 1699990500);
             INSERT INTO counter VALUES ('queue_records', 2), ('queue_bytes', 18), ('delivered', 1),
                 ('dead_letters', 1);
             INSERT INTO state VALUES ('datadog_last_success', 1699990450, '');",
        )
        .unwrap();
        drop(old);
        let e = Store::open_read_only(&path).err().unwrap();
        assert!(matches!(e, StoreError::TooOld { version: 2, .. }), "{e}");

        let mut s = Store::open(&path).unwrap();
        let v: i64 = s.conn().query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        assert_eq!(layout(&path), (PAGE_SIZE, 2, "wal".into()), "small: rewritten in the new layout at open");
        let queued: Vec<(Feed, String, Option<i64>, String)> =
            s.candidates(10).unwrap().concat().into_iter().map(|q| (q.feed, q.key, q.event_time, q.body)).collect();
        assert_eq!(
            queued,
            [
                (Feed::Audit, "id:x/h".into(), None, "{\"n\":\"x\"}".into()),
                (Feed::Dlp, "h:a".into(), Some(1_699_990_010), "{\"n\":\"a\"}".into()),
            ]
        );
        let c = s.counters().unwrap();
        assert_eq!((c.queue_records, c.queue_bytes, c.delivered, c.dead_letters), (2, 18, 1, 1));
        let cursor = s.cursor(Feed::Dlp).unwrap().unwrap();
        let window = Window { from: 1_699_990_000, to: 1_699_990_300 };
        assert_eq!((cursor.watermark, cursor.window), (1_699_990_000, Some((window, Some("page-2".into())))));
        assert_eq!(s.cursor(Feed::Audit).unwrap().unwrap().watermark, 1_699_980_000);
        assert_eq!(cursor.keys_since, None, "an earlier build did not say when it forgot keys");
        let dead = s.dead_letters().unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!((dead[0].key.as_str(), dead[0].reason.as_str()), ("h:dead", "HTTP 400: bad"));
        assert_eq!(s.note(Note::DatadogLastSuccess).unwrap(), Some((1_699_990_450, String::new())));

        // The seen keys still skip their records, the one whose record was delivered too; a new key queues.
        let record = |key: &str| NewRecord { key: key.into(), event_time: Some(1_699_990_100), body: "{}".into() };
        let page = PageCommit {
            feed: Feed::Dlp,
            window,
            next_token: Some("page-3".into()),
            records: vec![record("h:a"), record("h:gone"), record("h:new")],
            forget_before: 0,
        };
        let out = s.commit_page(&page, 1_699_990_600, u64::MAX, WhenFull::Pause, &InFlight::NONE).unwrap();
        assert_eq!((out.queued, out.skipped), (1, 2));
        let seen: i64 = s.conn().query_row("SELECT COUNT(*) FROM seen", [], |r| r.get(0)).unwrap();
        assert_eq!(seen, 4);
        drop(s);
        assert!(Store::open_read_only(&path).is_ok(), "migrated once, read-only opens work");
    }

    /// A queue file of a few thousand records, closed, with `pages` pages in its middle overwritten.
    pub(crate) fn damaged_queue(dir: &Path, pages: u64) -> PathBuf {
        use std::io::{Seek, SeekFrom, Write};
        let path = dir.join("queue.db");
        let mut s = Store::open(&path).unwrap();
        s.init_cursor(crate::mimecast::Feed::Audit, 0).unwrap();
        let records = (0..3000)
            .map(|i| NewRecord { key: format!("k{i}"), event_time: Some(i), body: format!("{{\"n\":{i}}}").repeat(20) })
            .collect();
        let page = PageCommit {
            feed: crate::mimecast::Feed::Audit,
            window: crate::mimecast::window::Window { from: 0, to: 10 },
            next_token: None,
            records,
            forget_before: 0,
        };
        s.commit_page(&page, 1, u64::MAX, crate::config::WhenFull::Pause, &InFlight::NONE).unwrap();
        drop(s);
        let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let len = f.metadata().unwrap().len();
        assert!(len > 100 * 4096, "the queue spans many pages ({len} bytes)");
        f.seek(SeekFrom::Start(len / 2 / 4096 * 4096)).unwrap();
        f.write_all(&vec![0x5a; 4096 * pages as usize]).unwrap();
        path
    }

    #[test]
    fn damage_in_the_middle_is_found_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = damaged_queue(dir.path(), 3);
        for e in [Store::open(&path).err().unwrap(), Store::open_read_only(&path).err().unwrap()] {
            assert!(matches!(&e, StoreError::Corrupt { path: p, .. } if *p == path), "{e}");
            assert!(e.to_string().contains(&path.display().to_string()) && e.to_string().contains("damaged"));
        }
    }

    #[test]
    fn damage_met_later_is_corrupt_too() {
        let dir = tempfile::tempdir().unwrap();
        let path = damaged_queue(dir.path(), 3);
        // As if the damage happened after a clean open: no quick_check on this connection.
        let store = Store::new(Connection::open(&path).unwrap(), path.clone(), Arc::new(RealFs));
        let e = store.candidates(10_000).err().unwrap();
        assert!(
            matches!(&e, StoreError::Corrupt { path: p, detail } if *p == path && detail.contains("candidate")),
            "{e}"
        );
    }

    #[test]
    fn a_file_opened_read_only_is_reported_with_the_user() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.db");
        drop(Store::open(&path).unwrap());
        let e = Store::open_with(&path, OpenFlags::SQLITE_OPEN_READ_ONLY, Arc::new(RealFs)).err().unwrap();
        assert!(
            matches!(&e, StoreError::ReadOnly { path: p, user, foreign: None } if *p == path && user.contains("uid ")),
            "{e}"
        );
        assert!(e.to_string().contains("chown -R mimecast-forwarder:"), "{e}");
    }

    #[test]
    fn a_lock_held_elsewhere_gives_busy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.db");
        let mut s = Store::open(&path).unwrap();
        let other = Connection::open(&path).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        s.set_busy_timeout(Duration::from_millis(20)).unwrap();
        let e = s.set_note(Note::DiskFull, 1, "y").err().unwrap();
        assert!(matches!(&e, StoreError::Busy { path: p } if *p == path) && e.is_transient(), "{e}");
        assert_eq!(s.note(Note::DiskFull).unwrap(), None, "reads go on meanwhile (WAL)");
        other.execute_batch("ROLLBACK").unwrap();
        s.set_note(Note::DiskFull, 1, "y").unwrap();
    }
}
