//! A simulated disk under SQLite, for the deterministic simulator: a VFS registered with the bundled SQLite, in the
//! spirit of SQLite's own `test6.c` (crash) and `test_vfs.c` (faults, shared memory on the heap).
//!
//! - Each file keeps its durable bytes and the writes and truncates since its last sync; reads see both.
//! - Directory entries (create, rename, unlink) are durable only after their directory is synced. SQLite's own
//!   directory syncs are those of its unix VFS (see [`SimDisk`]); the agent's file operations go through the
//!   same model by name ([`SimDisk::write_file`], [`SimDisk::rename`], [`SimDisk::sync_dir`], ...).
//! - A capacity: a write past it fails with `SQLITE_FULL` (or `io::ErrorKind::StorageFull`).
//! - Time, sleeps and randomness come from the simulation: a busy handler waits in simulated time.
//! - Faults: [`SimDisk::crash_after_ops`] freezes the disk at the k-th write or sync, [`SimDisk::crash`] is a process
//!   crash (the kernel keeps everything), [`SimDisk::power_loss`] keeps, drops or tears each unsynced write and
//!   forgets unsynced directory changes, [`SimDisk::set_capacity`] fills or frees the disk at any moment.
//!
//! ```ignore
//! let disk = simdisk::SimDisk::new(64 << 20, seed);
//! disk.create_dir_all("/q")?;
//! let conn = rusqlite::Connection::open_with_flags_and_vfs("/q/queue.db", OpenFlags::default(), disk.vfs_name())?;
//! ```
//!
//! The crate README says what is modelled and what is not.

mod model;
mod vfs;

use std::cell::UnsafeCell;
use std::ffi::CString;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use rusqlite::ffi;

use model::{Fail, State};
pub use model::{PowerLoss, SECTOR};

/// A simulated disk: a cheap handle to shared state (clone it freely; all clones are the same disk).
///
/// Each disk registers its own SQLite VFS, named [`SimDisk::vfs_name`] (never the default VFS), and unregisters it
/// when the last handle is dropped *and* the last file SQLite opened on it is closed (an open file keeps the disk
/// alive). Drop the connections before the last `SimDisk`, or keep a clone for as long as they live: a connection
/// whose files are all closed may still call the VFS for time or sleep.
///
/// Disks are independent: several can be used at once on different threads. A connection must not be shared
/// between disks (it is opened on one VFS).
///
/// # SQLite's directory syncs
/// As in SQLite's unix VFS (`unixOpen`, `unixSync`, `unixDelete` in the bundled sqlite3.c):
/// - A rollback journal, super-journal or WAL opened with `SQLITE_OPEN_CREATE` is marked `UNIXFILE_DIRSYNC`; its
///   first `xSync` (whatever its flags, `SQLITE_SYNC_DATAONLY` included) also syncs its directory, once. So a new
///   journal or WAL is in its directory once SQLite has synced it.
/// - `xDelete(path, dirSync)` syncs the directory after the unlink only when `dirSync & 1` (SQLite asks for it with
///   `synchronous = EXTRA`, for the rollback journal whose unlink commits a transaction in DELETE mode).
/// - The main database file is not synced into its directory by SQLite: whoever creates it must sync the directory
///   (the store builds the queue in `.new`, syncs it, renames it and syncs the directory).
///
/// # Open connections and faults
/// [`SimDisk::crash`] and [`SimDisk::power_loss`] may be called with connections still open: every file open at that
/// moment is invalidated (its locks released, its later operations failing with an I/O error; closing it works).
/// Drop those connections and open new ones.
#[derive(Clone)]
pub struct SimDisk {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    state: Mutex<State>,
    /// The VFS SQLite holds a pointer to while it is registered: boxed so it never moves, in an UnsafeCell because
    /// SQLite writes its `pNext` field.
    vfs: Box<UnsafeCell<ffi::sqlite3_vfs>>,
    name: CString,
    me: Weak<Inner>,
}

// SAFETY: the only fields that are not Send + Sync are the `sqlite3_vfs` (raw pointers to `name`, which lives as
// long as it, and to this Inner) and its cell. Rust never reads or writes the struct after registration; SQLite
// writes its pNext under its own global mutex only (sqlite3_vfs_register/unregister). The state is behind a mutex.
unsafe impl Send for Inner {}
// SAFETY: as for Send.
unsafe impl Sync for Inner {}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while the state was locked leaves it as it was at the panic: still usable for a report.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn me(&self) -> Arc<Inner> {
        self.me.upgrade().expect("a disk SQLite calls is alive")
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // SAFETY: the struct was registered in `SimDisk::new` and is still at the same address (boxed). No file is
        // open on it (each holds a strong count), so SQLite is done with it once unregistered.
        unsafe { ffi::sqlite3_vfs_unregister(self.vfs.get()) };
    }
}

static NEXT_DISK: AtomicU64 = AtomicU64::new(1);

impl SimDisk {
    /// A new, empty disk of `capacity` bytes with only the root directory `/`, its faults drawn from `seed`. The
    /// simulated clock starts at 0 (the Unix epoch).
    pub fn new(capacity: u64, seed: u64) -> SimDisk {
        let name =
            CString::new(format!("simdisk-{}", NEXT_DISK.fetch_add(1, Ordering::Relaxed))).expect("no NUL in the name");
        let inner = Arc::new_cyclic(|me: &Weak<Inner>| {
            let vfs = vfs::vfs(name.as_ptr(), me.as_ptr());
            Inner {
                state: Mutex::new(State::new(capacity, seed)),
                vfs: Box::new(UnsafeCell::new(vfs)),
                name: name.clone(),
                me: me.clone(),
            }
        });
        // `name` and `inner.name` are two allocations: point the VFS at the one that lives with it.
        // SAFETY: nothing else has the struct yet (not registered), so this write cannot race.
        unsafe { (*inner.vfs.get()).zName = inner.name.as_ptr() };
        // SAFETY: the struct is boxed (it never moves) and lives until `Inner::drop` unregisters it; pAppData
        // points to the Inner that owns it. makeDflt = 0: never the default VFS.
        let rc = unsafe { ffi::sqlite3_vfs_register(inner.vfs.get(), 0) };
        assert_eq!(rc, ffi::SQLITE_OK, "registering the simulated disk's VFS");
        SimDisk { inner }
    }

    /// The name to open SQLite with: `Connection::open_with_flags_and_vfs(path, flags, disk.vfs_name())`.
    pub fn vfs_name(&self) -> &str {
        self.inner.name.to_str().expect("an ASCII name")
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.state()
    }

    // --- time -----------------------------------------------------------------------------------------------------

    /// Sets the simulated clock that SQLite reads (`xCurrentTime`, `datetime('now')`).
    pub fn set_now_ms(&self, ms: i64) {
        self.state().now_us = ms.saturating_mul(1000);
    }

    /// The simulated clock: the last `set_now_ms` plus what SQLite slept since.
    pub fn now_ms(&self) -> i64 {
        self.state().now_us.div_euclid(1000)
    }

    /// Microseconds SQLite slept in all (busy handlers, WAL retries), in simulated time: no sleep is real. Each
    /// sleep also moves the simulated clock.
    pub fn slept_us(&self) -> u64 {
        self.state().slept_us
    }

    // --- space ----------------------------------------------------------------------------------------------------

    pub fn capacity(&self) -> u64 {
        self.state().capacity
    }

    /// Changes the capacity at once: below the bytes used, the disk is full until files shrink or it grows again.
    pub fn set_capacity(&self, bytes: u64) {
        self.state().capacity = bytes;
    }

    /// The bytes taken: the current size (unsynced writes included) of every file with a name or still open.
    pub fn used_bytes(&self) -> u64 {
        self.state().used()
    }

    /// What `statvfs` would say is free.
    pub fn free_bytes(&self) -> u64 {
        self.state().free()
    }

    /// The current size of the file at `path` (unsynced writes included); 0 when there is none.
    pub fn file_len(&self, path: &str) -> u64 {
        self.state().len(path)
    }

    // --- the agent's file operations ----------------------------------------------------------------------------

    /// `fs::create_dir_all`. Directories are durable at once (the model has no directory of directories).
    pub fn create_dir_all(&self, path: &str) -> io::Result<()> {
        self.state().create_dir_all(path).map_err(|e| error(e, path))
    }

    /// `File::create`: a new empty file, or an existing one emptied. A new name is durable only after `sync_dir`.
    pub fn create_file(&self, path: &str) -> io::Result<()> {
        self.state().create(path).map(drop).map_err(|e| error(e, path))
    }

    /// `fs::write`: the file created or emptied, then `bytes` written; none of it durable before `sync_file`.
    pub fn write_file(&self, path: &str, bytes: &[u8]) -> io::Result<()> {
        self.state().write_whole(path, bytes).map_err(|e| error(e, path))
    }

    /// `fs::read`: the current contents (unsynced writes included).
    pub fn read_file(&self, path: &str) -> io::Result<Vec<u8>> {
        self.state().read_whole(path).map_err(|e| error(e, path))
    }

    /// `File::sync_all` on the file at `path`; on a directory, the same as `sync_dir`.
    pub fn sync_file(&self, path: &str) -> io::Result<()> {
        self.state().sync_path(path).map_err(|e| error(e, path))
    }

    /// `fs::rename`, replacing `to` if it exists. Durable only after `sync_dir` of both directories.
    pub fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        self.state().rename(from, to).map_err(|e| error(e, from))
    }

    /// `fs::remove_file`. Durable only after `sync_dir`: a power loss before brings the file back.
    pub fn remove(&self, path: &str) -> io::Result<()> {
        self.state().unlink(path).map_err(|e| error(e, path))
    }

    /// fsync of the directory `dir`: its entries as they are now survive a power loss.
    pub fn sync_dir(&self, dir: &str) -> io::Result<()> {
        self.state().sync_dir(dir).map_err(|e| error(e, dir))
    }

    /// Whether a file or directory is at `path`. False (not an error) on a frozen disk, like a dead process's stat.
    pub fn exists(&self, path: &str) -> bool {
        self.state().exists(path).unwrap_or(false)
    }

    /// The files directly in `dir`, in name order.
    pub fn list(&self, dir: &str) -> Vec<String> {
        self.state().list(dir)
    }

    // --- faults ---------------------------------------------------------------------------------------------------

    /// Writes, truncates, syncs and directory changes (creates, renames, unlinks, directory syncs) done so far, by
    /// SQLite and by the methods above alike. Reads and lookups are not counted.
    pub fn ops(&self) -> u64 {
        self.state().ops
    }

    /// Freezes the disk at the k-th counted operation from now: the k-1 before it succeed, it fails and changes
    /// nothing, and so does every operation after it, reads included (the process is as good as dead). `k = 0`
    /// freezes at once. Follow with [`SimDisk::crash`] or [`SimDisk::power_loss`], which unfreeze.
    pub fn crash_after_ops(&self, k: u64) {
        let mut st = self.state();
        if k == 0 {
            st.frozen = true;
        } else {
            st.crash_at = Some(st.ops + k);
        }
    }

    /// Whether the disk froze (the crash point of `crash_after_ops` was reached).
    pub fn frozen(&self) -> bool {
        self.state().frozen
    }

    /// Unfreezes the disk without changing anything on it, and disarms the crash point: to look at what a process
    /// that died at the crash point left (its open files stay valid), before [`SimDisk::crash`] or
    /// [`SimDisk::power_loss`] decides what of it survives.
    pub fn thaw(&self) {
        let mut st = self.state();
        st.frozen = false;
        st.crash_at = None;
    }

    /// Whether a crash point is armed and not yet reached.
    pub fn armed(&self) -> bool {
        self.state().crash_at.is_some()
    }

    /// The process dies and the kernel keeps everything: every unsynced write and directory change is made durable.
    /// Files still open are invalidated (see [`SimDisk`]); the shared memory goes with the last of them. Unfreezes.
    /// Returns how many open files were invalidated.
    pub fn crash(&self) -> u64 {
        self.state().crash()
    }

    /// The power goes. Each unsynced write, on its own, is kept, dropped or torn (each 512-byte sector it touches
    /// kept or not); each unsynced truncate kept or dropped; every directory change not synced is undone. Shared
    /// memory is lost. Files still open are invalidated. Unfreezes. The choices are drawn from the disk's seed.
    pub fn power_loss(&self) -> PowerLoss {
        self.state().power_loss()
    }

    /// Lock requests SQLite was refused with SQLITE_BUSY (file and WAL locks): contention between connections.
    pub fn busy_count(&self) -> u64 {
        self.state().busy
    }

    /// Files SQLite has open on this disk (dead ones included until closed).
    pub fn open_files(&self) -> usize {
        self.state().handles.len()
    }
}

impl std::fmt::Debug for SimDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.state();
        f.debug_struct("SimDisk")
            .field("vfs", &self.inner.name)
            .field("used", &st.used())
            .field("capacity", &st.capacity)
            .field("ops", &st.ops)
            .field("frozen", &st.frozen)
            .finish()
    }
}

fn error(fail: Fail, path: &str) -> io::Error {
    let (kind, what) = match fail {
        Fail::Io => (io::ErrorKind::Other, "simulated I/O error (the disk froze at a crash point)"),
        Fail::Full => (io::ErrorKind::StorageFull, "no space left on the simulated device"),
        Fail::NotFound => (io::ErrorKind::NotFound, "no such file or directory"),
        Fail::Exists => (io::ErrorKind::AlreadyExists, "a file is in the way"),
        Fail::Busy => (io::ErrorKind::WouldBlock, "locked"),
        Fail::ReadOnly => (io::ErrorKind::PermissionDenied, "read-only"),
    };
    io::Error::new(kind, format!("{path}: {what}"))
}

/// Seeds SQLite's own PRNG (WAL salts, journal nonces, temporary names) so that the bytes SQLite writes are the same
/// from run to run (`SQLITE_TESTCTRL_PRNG_SEED`). The PRNG is global to the process, shared by every disk and
/// thread: files are byte-identical across runs only when one thread uses SQLite at a time. `seed = 0` goes back
/// to seeding from the default VFS's randomness.
pub fn seed_sqlite_prng(seed: u32) {
    // SAFETY: a documented test control taking (int, sqlite3*); a null db means "use x as is". SQLite serializes the
    // PRNG with its own mutex.
    unsafe {
        ffi::sqlite3_test_control(
            ffi::SQLITE_TESTCTRL_PRNG_SEED,
            std::ffi::c_int::from_ne_bytes(seed.to_ne_bytes()),
            std::ptr::null_mut::<ffi::sqlite3>(),
        );
    }
}
