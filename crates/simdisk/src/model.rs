//! The disk itself, without any FFI: files (inodes) with durable bytes and the operations since their last sync,
//! the namespace as it is and as it would be found after a power loss, locks, shared memory, the fault switches.
//! Everything here runs under the disk's one mutex; `vfs.rs` and the `SimDisk` methods only translate.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// The sector size: a torn write keeps or loses whole 512-byte sectors (what `xSectorSize` says too).
pub const SECTOR: u64 = 512;

pub(crate) type Ino = u64;
pub(crate) type HandleId = u64;
pub(crate) type ShmId = u64;

/// SQLite's file lock levels (`SQLITE_LOCK_*`).
pub(crate) const NONE: i32 = 0;
pub(crate) const SHARED: i32 = 1;
pub(crate) const RESERVED: i32 = 2;
pub(crate) const PENDING: i32 = 3;
pub(crate) const EXCLUSIVE: i32 = 4;

/// The number of shared-memory lock slots (`SQLITE_SHM_NLOCK`).
pub(crate) const SHM_NLOCK: usize = 8;

/// Why an operation failed, before it is turned into an SQLite code or an `io::Error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fail {
    /// The disk froze (`crash_after_ops`) or the handle outlived a crash or power loss.
    Io,
    /// No room: the operation would take the disk past its capacity.
    Full,
    /// No such file or directory.
    NotFound,
    /// The file exists (an exclusive create).
    Exists,
    /// Another handle holds a conflicting lock.
    Busy,
    /// The handle was opened read-only.
    ReadOnly,
}

/// An operation on a file since its last sync.
#[derive(Debug, Clone)]
pub(crate) enum Pending {
    Write { offset: u64, bytes: Vec<u8> },
    Truncate { len: u64 },
}

/// A file: what a power loss would find at worst (`durable`), what reads see (`data`), and what lies between.
#[derive(Debug, Default)]
pub(crate) struct Node {
    pub durable: Vec<u8>,
    pub data: Vec<u8>,
    pub pending: Vec<Pending>,
    /// The SQLite lock level of each handle that holds one.
    pub locks: BTreeMap<HandleId, i32>,
    /// The shared memory (the `-shm` of a WAL database) while some handle maps it.
    pub shm: Option<ShmId>,
}

/// An open file of SQLite's.
#[derive(Debug)]
pub(crate) struct Handle {
    pub ino: Ino,
    /// The name it was opened by (None: a temporary file SQLite asked for without a name).
    pub path: Option<String>,
    /// Sync the directory at the first sync (`UNIXFILE_DIRSYNC` of unixOpen: a journal or WAL opened to create).
    pub dirsync: bool,
    pub delete_on_close: bool,
    pub read_only: bool,
    /// Outlived a crash or a power loss: everything but close fails.
    pub dead: bool,
    pub shm: Option<ShmId>,
}

/// One region of shared memory, allocated as u64s so that it is 8-byte aligned as SQLite requires, and never moved
/// while mapped: SQLite reads and writes it through the pointer `xShmMap` gave.
pub(crate) struct Region {
    ptr: *mut u64,
    words: usize,
}

// SAFETY: a Region owns its allocation outright (like a Box<[u64]>); the raw pointer is only there so that SQLite
// may write through it without Rust references aliasing those writes.
unsafe impl Send for Region {}

impl Region {
    fn new(bytes: usize) -> Region {
        let words = bytes.div_ceil(8);
        let ptr = Box::into_raw(vec![0u64; words].into_boxed_slice()).cast::<u64>();
        Region { ptr, words }
    }

    pub fn ptr(&self) -> *mut u8 {
        self.ptr.cast()
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: ptr and words came from Box::into_raw of a boxed slice of exactly `words` u64s in `new`, and are
        // dropped once; no connection maps the region any more (a Shm is dropped when its last handle unmaps it).
        unsafe { drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(self.ptr, self.words))) }
    }
}

/// The shared memory of one database: heap regions and the eight WAL locks.
#[derive(Default)]
pub(crate) struct Shm {
    pub regions: Vec<Region>,
    pub exclusive: [Option<HandleId>; SHM_NLOCK],
    pub shared: [BTreeSet<HandleId>; SHM_NLOCK],
    /// The handles that map it; it is freed when the last one unmaps (as unix's dead-man switch resets the `-shm`
    /// file when the first connection opens it after all closed).
    pub users: BTreeSet<HandleId>,
}

/// What a power loss did, for the simulator to print beside a failure.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PowerLoss {
    /// Unsynced writes kept whole.
    pub writes_kept: u64,
    /// Unsynced writes lost whole.
    pub writes_dropped: u64,
    /// Unsynced writes of which some sectors were kept and others lost.
    pub writes_torn: u64,
    pub truncates_kept: u64,
    pub truncates_dropped: u64,
    /// Paths whose directory entry was not durable: created or renamed to and gone now (or back to an older file).
    pub entries_lost: Vec<String>,
    /// Paths unlinked or renamed away without a directory sync, and back now with their durable contents.
    pub entries_restored: Vec<String>,
    /// Handles still open, now dead (every later operation on them fails).
    pub handles_invalidated: u64,
}

impl fmt::Display for PowerLoss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "power loss: writes kept {}, dropped {}, torn {}; truncates kept {}, dropped {}",
            self.writes_kept, self.writes_dropped, self.writes_torn, self.truncates_kept, self.truncates_dropped
        )?;
        if !self.entries_lost.is_empty() {
            write!(f, "; entries lost {:?}", self.entries_lost)?;
        }
        if !self.entries_restored.is_empty() {
            write!(f, "; entries restored {:?}", self.entries_restored)?;
        }
        if self.handles_invalidated > 0 {
            write!(f, "; {} handles left open invalidated", self.handles_invalidated)?;
        }
        Ok(())
    }
}

/// splitmix64: small, fast, and the same on every platform.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// The whole disk.
pub(crate) struct State {
    pub capacity: u64,
    pub rng: Rng,
    pub now_us: i64,
    pub slept_us: u64,
    /// Writes, truncates, syncs and directory changes done so far.
    pub ops: u64,
    /// The value of `ops + 1` at which the disk freezes.
    pub crash_at: Option<u64>,
    pub frozen: bool,
    /// Lock requests refused with SQLITE_BUSY (file and shared-memory locks).
    pub busy: u64,
    pub dirs: BTreeSet<String>,
    /// The namespace as it is: path -> file.
    pub current: BTreeMap<String, Ino>,
    /// The namespace as a power loss would leave it: each directory's entries as of its last sync.
    pub durable: BTreeMap<String, Ino>,
    pub nodes: BTreeMap<Ino, Node>,
    pub handles: BTreeMap<HandleId, Handle>,
    pub shms: BTreeMap<ShmId, Shm>,
    pub next_id: u64,
}

/// The directory of `path` ("/" for a file at the root).
pub(crate) fn parent(path: &str) -> &str {
    match path.rfind('/') {
        Some(0) | None => "/",
        Some(i) => &path[..i],
    }
}

/// Applies one operation to file contents.
fn apply(buf: &mut Vec<u8>, op: &Pending) {
    match op {
        Pending::Write { offset, bytes } => write_at(buf, *offset, bytes),
        Pending::Truncate { len } => buf.resize(to_usize(*len), 0),
    }
}

fn write_at(buf: &mut Vec<u8>, offset: u64, bytes: &[u8]) {
    let start = to_usize(offset);
    if start >= buf.len() {
        // An append (a WAL frame, a checkpoint growing the database): the gap zeroed, the bytes copied once.
        buf.resize(start, 0);
        buf.extend_from_slice(bytes);
        return;
    }
    let inside = (buf.len() - start).min(bytes.len());
    buf[start..start + inside].copy_from_slice(&bytes[..inside]);
    buf.extend_from_slice(&bytes[inside..]);
}

fn to_usize(n: u64) -> usize {
    usize::try_from(n).expect("a simulated file fits in memory")
}

impl State {
    pub fn new(capacity: u64, seed: u64) -> State {
        State {
            capacity,
            rng: Rng::new(seed),
            now_us: 0,
            slept_us: 0,
            ops: 0,
            crash_at: None,
            frozen: false,
            busy: 0,
            dirs: BTreeSet::from(["/".to_string()]),
            current: BTreeMap::new(),
            durable: BTreeMap::new(),
            nodes: BTreeMap::new(),
            handles: BTreeMap::new(),
            shms: BTreeMap::new(),
            next_id: 1,
        }
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Counts one write, truncate, sync or directory change, or freezes the disk at the chosen one (which then fails
    /// and changes nothing, like every later one).
    pub fn op(&mut self) -> Result<(), Fail> {
        if self.frozen {
            return Err(Fail::Io);
        }
        if self.crash_at == Some(self.ops + 1) {
            self.frozen = true;
            return Err(Fail::Io);
        }
        self.ops += 1;
        Ok(())
    }

    /// Fails when the disk is frozen, for the operations that are not counted (reads, lookups).
    pub fn alive(&self) -> Result<(), Fail> {
        if self.frozen { Err(Fail::Io) } else { Ok(()) }
    }

    /// Bytes taken: the current size of every file that has a name or is open.
    pub fn used(&self) -> u64 {
        let mut live: BTreeSet<Ino> = self.current.values().copied().collect();
        live.extend(self.handles.values().filter(|h| !h.dead).map(|h| h.ino));
        live.iter().filter_map(|ino| self.nodes.get(ino)).map(|n| n.data.len() as u64).sum()
    }

    pub fn free(&self) -> u64 {
        self.capacity.saturating_sub(self.used())
    }

    /// Fails with `Full` when growing `ino` from its current size to `new_len` would pass the capacity.
    fn room(&self, ino: Ino, new_len: u64) -> Result<(), Fail> {
        let len = self.nodes.get(&ino).map_or(0, |n| n.data.len() as u64);
        if new_len > len && self.used() + (new_len - len) > self.capacity {
            return Err(Fail::Full);
        }
        Ok(())
    }

    pub fn dir_exists(&self, dir: &str) -> bool {
        self.dirs.contains(dir)
    }

    /// Drops the files nothing refers to any more: no name, durable or current, and no live handle.
    pub fn collect(&mut self) {
        let mut live: BTreeSet<Ino> = self.current.values().copied().collect();
        live.extend(self.durable.values().copied());
        live.extend(self.handles.values().filter(|h| !h.dead).map(|h| h.ino));
        self.nodes.retain(|ino, _| live.contains(ino));
    }

    // --- files by handle ------------------------------------------------------------------------------------------

    /// Opens `path` (None: an anonymous temporary file). Creating a file is a directory change, and counted.
    pub fn open(
        &mut self,
        path: Option<&str>,
        create: bool,
        exclusive: bool,
        read_only: bool,
        delete_on_close: bool,
        dirsync: bool,
    ) -> Result<HandleId, Fail> {
        self.alive()?;
        let ino = match path {
            None => {
                self.op()?;
                let ino = self.id();
                self.nodes.insert(ino, Node::default());
                ino
            }
            Some(p) => match self.current.get(p) {
                Some(_) if create && exclusive => return Err(Fail::Exists),
                Some(&ino) => ino,
                None if !create => return Err(Fail::NotFound),
                None => {
                    if !self.dir_exists(parent(p)) {
                        return Err(Fail::NotFound);
                    }
                    self.op()?;
                    let ino = self.id();
                    self.nodes.insert(ino, Node::default());
                    self.current.insert(p.to_string(), ino);
                    ino
                }
            },
        };
        let id = self.id();
        let handle =
            Handle { ino, path: path.map(str::to_string), dirsync, delete_on_close, read_only, dead: false, shm: None };
        self.handles.insert(id, handle);
        Ok(id)
    }

    /// The live handle `id` and its file.
    fn live(&self, id: HandleId) -> Result<&Handle, Fail> {
        match self.handles.get(&id) {
            Some(h) if !h.dead && self.nodes.contains_key(&h.ino) => Ok(h),
            _ => Err(Fail::Io),
        }
    }

    fn node_of(&mut self, id: HandleId) -> Result<&mut Node, Fail> {
        let ino = self.live(id)?.ino;
        self.nodes.get_mut(&ino).ok_or(Fail::Io)
    }

    /// Reads into `out`; returns how many bytes the file had (the rest of `out` is zeroed).
    pub fn read(&mut self, id: HandleId, offset: u64, out: &mut [u8]) -> Result<usize, Fail> {
        self.alive()?;
        let node = self.node_of(id)?;
        let start = to_usize(offset).min(node.data.len());
        let n = (node.data.len() - start).min(out.len());
        out[..n].copy_from_slice(&node.data[start..start + n]);
        out[n..].fill(0);
        Ok(n)
    }

    pub fn write(&mut self, id: HandleId, offset: u64, bytes: &[u8]) -> Result<(), Fail> {
        let h = self.live(id)?;
        if h.read_only {
            return Err(Fail::ReadOnly);
        }
        let ino = h.ino;
        self.alive()?;
        self.room(ino, offset + bytes.len() as u64)?;
        self.op()?;
        self.write_ino(ino, offset, bytes);
        Ok(())
    }

    fn write_ino(&mut self, ino: Ino, offset: u64, bytes: &[u8]) {
        if let Some(node) = self.nodes.get_mut(&ino) {
            write_at(&mut node.data, offset, bytes);
            node.pending.push(Pending::Write { offset, bytes: bytes.to_vec() });
        }
    }

    pub fn truncate(&mut self, id: HandleId, len: u64) -> Result<(), Fail> {
        let h = self.live(id)?;
        if h.read_only {
            return Err(Fail::ReadOnly);
        }
        let ino = h.ino;
        self.alive()?;
        self.room(ino, len)?;
        self.op()?;
        self.truncate_ino(ino, len);
        Ok(())
    }

    fn truncate_ino(&mut self, ino: Ino, len: u64) {
        if let Some(node) = self.nodes.get_mut(&ino) {
            let op = Pending::Truncate { len };
            apply(&mut node.data, &op);
            node.pending.push(op);
        }
    }

    /// `xSync`: the file's pending operations become durable, and the directory too the first time for a journal or
    /// WAL SQLite created (unixSync's one-time `UNIXFILE_DIRSYNC`).
    pub fn sync(&mut self, id: HandleId) -> Result<(), Fail> {
        let h = self.live(id)?;
        let (ino, dir) = (h.ino, h.path.as_deref().filter(|_| h.dirsync).map(|p| parent(p).to_string()));
        self.op()?;
        self.sync_ino(ino);
        if let Some(dir) = dir {
            self.sync_dir_entries(&dir);
            if let Some(h) = self.handles.get_mut(&id) {
                h.dirsync = false;
            }
        }
        Ok(())
    }

    fn sync_ino(&mut self, ino: Ino) {
        if let Some(node) = self.nodes.get_mut(&ino) {
            for op in std::mem::take(&mut node.pending) {
                apply(&mut node.durable, &op);
            }
            debug_assert_eq!(node.durable.len(), node.data.len());
        }
    }

    pub fn size(&mut self, id: HandleId) -> Result<u64, Fail> {
        self.alive()?;
        Ok(self.node_of(id)?.data.len() as u64)
    }

    /// Closes a handle: its locks and shared memory go, and a delete-on-close file is unlinked (unless the disk is
    /// frozen: a dead process deletes nothing).
    pub fn close(&mut self, id: HandleId) {
        self.release(id);
        if let Some(h) = self.handles.remove(&id)
            && h.delete_on_close
            && !h.dead
            && !self.frozen
            && let Some(p) = h.path
            && self.current.get(&p) == Some(&h.ino)
        {
            self.current.remove(&p);
        }
        self.collect();
    }

    /// Drops every lock and shared-memory mapping the handle holds.
    fn release(&mut self, id: HandleId) {
        let Some(h) = self.handles.get(&id) else { return };
        let ino = h.ino;
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.locks.remove(&id);
        }
        self.shm_unmap(id);
    }

    // --- locks ----------------------------------------------------------------------------------------------------

    /// `xLock`, with unixLock's rules: SHARED waits for no PENDING or EXCLUSIVE elsewhere; RESERVED for no RESERVED
    /// or above elsewhere; EXCLUSIVE takes PENDING first (new readers are kept out) and waits for the readers to go.
    pub fn lock(&mut self, id: HandleId, level: i32) -> Result<(), Fail> {
        let node = self.node_of(id)?;
        let mine = node.locks.get(&id).copied().unwrap_or(NONE);
        if mine >= level {
            return Ok(());
        }
        let others_max = node.locks.iter().filter(|(h, _)| **h != id).map(|(_, l)| *l).max().unwrap_or(NONE);
        let result = match level {
            SHARED if others_max >= PENDING => Err(Fail::Busy),
            SHARED => {
                node.locks.insert(id, SHARED);
                Ok(())
            }
            RESERVED if others_max >= RESERVED => Err(Fail::Busy),
            RESERVED => {
                node.locks.insert(id, RESERVED);
                Ok(())
            }
            _ => {
                // EXCLUSIVE (PENDING is never asked for by itself).
                if others_max >= PENDING {
                    Err(Fail::Busy)
                } else if others_max >= SHARED {
                    node.locks.insert(id, PENDING);
                    Err(Fail::Busy)
                } else {
                    node.locks.insert(id, EXCLUSIVE);
                    Ok(())
                }
            }
        };
        if result == Err(Fail::Busy) {
            self.busy += 1;
        }
        result
    }

    pub fn unlock(&mut self, id: HandleId, level: i32) {
        if let Ok(node) = self.node_of(id) {
            if level == NONE {
                node.locks.remove(&id);
            } else if let Some(l) = node.locks.get_mut(&id) {
                *l = (*l).min(level);
            }
        }
    }

    pub fn reserved(&mut self, id: HandleId) -> Result<bool, Fail> {
        let node = self.node_of(id)?;
        Ok(node.locks.values().any(|l| *l >= RESERVED))
    }

    // --- shared memory --------------------------------------------------------------------------------------------

    /// `xShmMap`: the region's address, or None when it does not exist and `extend` is false.
    pub fn shm_map(&mut self, id: HandleId, region: usize, size: usize, extend: bool) -> Result<Option<*mut u8>, Fail> {
        let ino = self.live(id)?.ino;
        let shm_id = match self.handles.get(&id).and_then(|h| h.shm) {
            Some(s) => s,
            None => {
                let existing = self.nodes.get(&ino).and_then(|n| n.shm);
                let s = match existing {
                    Some(s) => s,
                    None => {
                        let s = self.id();
                        self.shms.insert(s, Shm::default());
                        if let Some(n) = self.nodes.get_mut(&ino) {
                            n.shm = Some(s);
                        }
                        s
                    }
                };
                if let Some(h) = self.handles.get_mut(&id) {
                    h.shm = Some(s);
                }
                s
            }
        };
        let shm = self.shms.get_mut(&shm_id).ok_or(Fail::Io)?;
        shm.users.insert(id);
        if region >= shm.regions.len() {
            if !extend {
                return Ok(None);
            }
            while shm.regions.len() <= region {
                shm.regions.push(Region::new(size));
            }
        }
        Ok(Some(shm.regions[region].ptr()))
    }

    /// `xShmLock` on slots `offset..offset + n`: all or nothing.
    pub fn shm_lock(&mut self, id: HandleId, offset: usize, n: usize, lock: bool, exclusive: bool) -> Result<(), Fail> {
        let h = self.handles.get(&id).ok_or(Fail::Io)?;
        let dead = h.dead;
        let Some(shm_id) = h.shm else { return if lock { Err(Fail::Io) } else { Ok(()) } };
        let shm = self.shms.get_mut(&shm_id).ok_or(Fail::Io)?;
        let slots = offset..(offset + n).min(SHM_NLOCK);
        if !lock {
            for s in slots {
                if shm.exclusive[s] == Some(id) {
                    shm.exclusive[s] = None;
                }
                shm.shared[s].remove(&id);
            }
            return Ok(());
        }
        if dead {
            return Err(Fail::Io);
        }
        let free = slots.clone().all(|s| {
            let excl_other = shm.exclusive[s].is_some_and(|h| h != id);
            let shared_other = shm.shared[s].iter().any(|h| *h != id);
            !(excl_other || (exclusive && shared_other))
        });
        if !free {
            self.busy += 1;
            return Err(Fail::Busy);
        }
        for s in slots {
            if exclusive {
                shm.shared[s].remove(&id);
                shm.exclusive[s] = Some(id);
            } else {
                shm.shared[s].insert(id);
            }
        }
        Ok(())
    }

    /// `xShmUnmap`: the handle's shared-memory locks go; the memory goes with its last user.
    pub fn shm_unmap(&mut self, id: HandleId) {
        let Some(shm_id) = self.handles.get_mut(&id).and_then(|h| h.shm.take()) else { return };
        let Some(shm) = self.shms.get_mut(&shm_id) else { return };
        for s in 0..SHM_NLOCK {
            if shm.exclusive[s] == Some(id) {
                shm.exclusive[s] = None;
            }
            shm.shared[s].remove(&id);
        }
        shm.users.remove(&id);
        if shm.users.is_empty() {
            self.shms.remove(&shm_id);
            for node in self.nodes.values_mut() {
                if node.shm == Some(shm_id) {
                    node.shm = None;
                }
            }
        }
    }

    // --- files by name --------------------------------------------------------------------------------------------

    pub fn exists(&self, path: &str) -> Result<bool, Fail> {
        self.alive()?;
        Ok(self.current.contains_key(path) || self.dirs.contains(path))
    }

    pub fn len(&self, path: &str) -> u64 {
        self.current.get(path).and_then(|ino| self.nodes.get(ino)).map_or(0, |n| n.data.len() as u64)
    }

    /// Creates `path` empty, or empties it (`File::create`). Unsynced, like everything.
    pub fn create(&mut self, path: &str) -> Result<Ino, Fail> {
        self.alive()?;
        if self.dirs.contains(path) || !self.dir_exists(parent(path)) {
            return Err(Fail::NotFound);
        }
        match self.current.get(path).copied() {
            Some(ino) => {
                self.op()?;
                self.truncate_ino(ino, 0);
                Ok(ino)
            }
            None => {
                self.op()?;
                let ino = self.id();
                self.nodes.insert(ino, Node::default());
                self.current.insert(path.to_string(), ino);
                Ok(ino)
            }
        }
    }

    /// Replaces the contents of `path` (creating it): a truncate and a write, both pending until a sync.
    pub fn write_whole(&mut self, path: &str, bytes: &[u8]) -> Result<(), Fail> {
        self.alive()?;
        let existing = self.current.get(path).copied();
        let growth = (bytes.len() as u64).saturating_sub(existing.map_or(0, |ino| self.len_of(ino)));
        if self.used() + growth > self.capacity {
            return Err(Fail::Full);
        }
        let ino = self.create(path)?;
        self.op()?;
        self.write_ino(ino, 0, bytes);
        Ok(())
    }

    fn len_of(&self, ino: Ino) -> u64 {
        self.nodes.get(&ino).map_or(0, |n| n.data.len() as u64)
    }

    pub fn read_whole(&self, path: &str) -> Result<Vec<u8>, Fail> {
        self.alive()?;
        let ino = self.current.get(path).ok_or(Fail::NotFound)?;
        Ok(self.nodes.get(ino).map(|n| n.data.clone()).unwrap_or_default())
    }

    pub fn sync_path(&mut self, path: &str) -> Result<(), Fail> {
        self.alive()?;
        if self.dirs.contains(path) {
            return self.sync_dir(path);
        }
        let ino = *self.current.get(path).ok_or(Fail::NotFound)?;
        self.op()?;
        self.sync_ino(ino);
        Ok(())
    }

    pub fn rename(&mut self, from: &str, to: &str) -> Result<(), Fail> {
        self.alive()?;
        let ino = *self.current.get(from).ok_or(Fail::NotFound)?;
        if !self.dir_exists(parent(to)) || self.dirs.contains(to) {
            return Err(Fail::NotFound);
        }
        self.op()?;
        self.current.remove(from);
        self.current.insert(to.to_string(), ino);
        self.collect();
        Ok(())
    }

    pub fn unlink(&mut self, path: &str) -> Result<(), Fail> {
        self.alive()?;
        if !self.current.contains_key(path) {
            return Err(Fail::NotFound);
        }
        self.op()?;
        self.current.remove(path);
        self.collect();
        Ok(())
    }

    /// fsync of a directory: its entries as they are become what a power loss finds.
    pub fn sync_dir(&mut self, dir: &str) -> Result<(), Fail> {
        self.alive()?;
        if !self.dirs.contains(dir) {
            return Err(Fail::NotFound);
        }
        self.op()?;
        self.sync_dir_entries(dir);
        Ok(())
    }

    fn sync_dir_entries(&mut self, dir: &str) {
        self.durable.retain(|p, _| parent(p) != dir);
        for (p, ino) in &self.current {
            if parent(p) == dir {
                self.durable.insert(p.clone(), *ino);
            }
        }
        self.collect();
    }

    /// Directories are made durable at once (the agent's state directory exists before it starts).
    pub fn create_dir_all(&mut self, path: &str) -> Result<(), Fail> {
        self.alive()?;
        let mut at = String::new();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            at.push('/');
            at.push_str(part);
            if self.current.contains_key(&at) {
                return Err(Fail::Exists);
            }
            self.dirs.insert(at.clone());
        }
        Ok(())
    }

    pub fn list(&self, dir: &str) -> Vec<String> {
        self.current.keys().filter(|p| parent(p) == dir).cloned().collect()
    }

    // --- faults ---------------------------------------------------------------------------------------------------

    /// Every open handle is dead from now on: its locks go (the process that held them is gone), and the shared
    /// memory is no longer the file's (a new connection starts on fresh memory and recovers the WAL). The memory
    /// itself stays allocated until the dead handles unmap it: their connection may still read it.
    fn invalidate_handles(&mut self) -> u64 {
        let ids: Vec<HandleId> = self.handles.iter().filter(|(_, h)| !h.dead).map(|(id, _)| *id).collect();
        for id in &ids {
            let Some(h) = self.handles.get_mut(id) else { continue };
            h.dead = true;
            let (ino, shm) = (h.ino, h.shm);
            if let Some(node) = self.nodes.get_mut(&ino) {
                node.locks.remove(id);
            }
            if let Some(shm) = shm.and_then(|s| self.shms.get_mut(&s)) {
                for s in 0..SHM_NLOCK {
                    if shm.exclusive[s] == Some(*id) {
                        shm.exclusive[s] = None;
                    }
                    shm.shared[s].remove(id);
                }
            }
        }
        for node in self.nodes.values_mut() {
            node.shm = None;
        }
        ids.len() as u64
    }

    /// The process dies; the kernel writes everything out.
    pub fn crash(&mut self) -> u64 {
        let n = self.invalidate_handles();
        let inos: Vec<Ino> = self.nodes.keys().copied().collect();
        for ino in inos {
            self.sync_ino(ino);
        }
        self.durable = self.current.clone();
        self.frozen = false;
        self.crash_at = None;
        self.collect();
        n
    }

    /// The power goes: each unsynced write kept, dropped or torn; unsynced directory changes lost.
    pub fn power_loss(&mut self) -> PowerLoss {
        let mut report = PowerLoss { handles_invalidated: self.invalidate_handles(), ..PowerLoss::default() };
        let rng = &mut self.rng;
        for node in self.nodes.values_mut() {
            for op in std::mem::take(&mut node.pending) {
                match op {
                    Pending::Truncate { .. } => {
                        if rng.below(2) == 0 {
                            apply(&mut node.durable, &op);
                            report.truncates_kept += 1;
                        } else {
                            report.truncates_dropped += 1;
                        }
                    }
                    Pending::Write { offset, ref bytes } => match rng.below(3) {
                        0 => {
                            apply(&mut node.durable, &op);
                            report.writes_kept += 1;
                        }
                        1 => report.writes_dropped += 1,
                        _ => {
                            // Each sector the write touches, kept or not on its own.
                            let end = offset + bytes.len() as u64;
                            let mut at = offset;
                            while at < end {
                                let next = ((at / SECTOR + 1) * SECTOR).min(end);
                                if rng.below(2) == 0 {
                                    let part = &bytes[to_usize(at - offset)..to_usize(next - offset)];
                                    write_at(&mut node.durable, at, part);
                                }
                                at = next;
                            }
                            report.writes_torn += 1;
                        }
                    },
                }
            }
            node.data = node.durable.clone();
        }
        for (p, ino) in &self.current {
            if self.durable.get(p) != Some(ino) {
                report.entries_lost.push(p.clone());
            }
        }
        for (p, ino) in &self.durable {
            if self.current.get(p) != Some(ino) {
                report.entries_restored.push(p.clone());
            }
        }
        self.current = self.durable.clone();
        self.frozen = false;
        self.crash_at = None;
        self.collect();
        report
    }
}
