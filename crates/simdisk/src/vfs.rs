//! The SQLite side: the `sqlite3_vfs` and `sqlite3_io_methods` callbacks, each a thin translation to `model.rs`
//! under the disk's mutex. No callback calls back into SQLite, so the mutex is never held across SQLite code.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::sync::Arc;

use rusqlite::ffi;

use crate::Inner;
use crate::model::{Fail, HandleId};

/// The file object SQLite allocates (`szOsFile` bytes) and `xOpen` fills in.
#[repr(C)]
pub(crate) struct SimFile {
    base: ffi::sqlite3_file,
    /// One strong count of the disk, from `Arc::into_raw`, given back at `xClose`: the disk (and its registered
    /// `sqlite3_vfs`) outlives every open file.
    disk: *const Inner,
    id: HandleId,
}

pub(crate) const MAX_PATHNAME: c_int = 512;

/// The `sqlite3_vfs` for `inner`, to be registered by the caller. `pAppData` points to the disk.
pub(crate) fn vfs(name: *const c_char, inner: *const Inner) -> ffi::sqlite3_vfs {
    ffi::sqlite3_vfs {
        iVersion: 2,
        szOsFile: c_int::try_from(size_of::<SimFile>()).expect("a small struct"),
        mxPathname: MAX_PATHNAME,
        pNext: std::ptr::null_mut(),
        zName: name,
        pAppData: inner.cast_mut().cast(),
        xOpen: Some(x_open),
        xDelete: Some(x_delete),
        xAccess: Some(x_access),
        xFullPathname: Some(x_full_pathname),
        xDlOpen: None,
        xDlError: None,
        xDlSym: None,
        xDlClose: None,
        xRandomness: Some(x_randomness),
        xSleep: Some(x_sleep),
        xCurrentTime: Some(x_current_time),
        xGetLastError: Some(x_get_last_error),
        xCurrentTimeInt64: Some(x_current_time_int64),
        xSetSystemCall: None,
        xGetSystemCall: None,
        xNextSystemCall: None,
    }
}

static IO_METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    // 2: shared memory (WAL); no xFetch/xUnfetch (version 3), so SQLite never memory-maps the file.
    iVersion: 2,
    xClose: Some(x_close),
    xRead: Some(x_read),
    xWrite: Some(x_write),
    xTruncate: Some(x_truncate),
    xSync: Some(x_sync),
    xFileSize: Some(x_file_size),
    xLock: Some(x_lock),
    xUnlock: Some(x_unlock),
    xCheckReservedLock: Some(x_check_reserved_lock),
    xFileControl: Some(x_file_control),
    xSectorSize: Some(x_sector_size),
    xDeviceCharacteristics: Some(x_device_characteristics),
    xShmMap: Some(x_shm_map),
    xShmLock: Some(x_shm_lock),
    xShmBarrier: Some(x_shm_barrier),
    xShmUnmap: Some(x_shm_unmap),
    xFetch: None,
    xUnfetch: None,
};

/// The disk a VFS callback is for.
///
/// # Safety
/// `vfs` is the `sqlite3_vfs` this crate registered: its `pAppData` points to a live `Inner` (the struct is unregistered
/// in `Inner::drop`, before the disk is freed, and SQLite only calls a VFS that is registered or in use by an open
/// file, which holds a strong count).
unsafe fn disk_of_vfs<'a>(vfs: *mut ffi::sqlite3_vfs) -> &'a Inner {
    // SAFETY: see the function's contract.
    unsafe { &*((*vfs).pAppData as *const Inner) }
}

/// The disk and handle of an open file.
///
/// # Safety
/// `file` was filled in by a successful `x_open` and not closed yet: its `disk` holds a strong count.
unsafe fn file<'a>(file: *mut ffi::sqlite3_file) -> (&'a Inner, HandleId) {
    // SAFETY: see the function's contract; SimFile starts with the sqlite3_file SQLite passes (repr(C)).
    unsafe {
        let f = file.cast::<SimFile>();
        (&*(*f).disk, (*f).id)
    }
}

/// A path SQLite passes, as UTF-8 (SQLite's names here are the ones `x_full_pathname` returned, plus suffixes).
///
/// # Safety
/// `name` is null or a NUL-terminated string.
unsafe fn path<'a>(name: *const c_char) -> Option<&'a str> {
    if name.is_null() {
        return None;
    }
    // SAFETY: see the function's contract.
    unsafe { CStr::from_ptr(name) }.to_str().ok()
}

fn code(fail: Fail, io: c_int) -> c_int {
    match fail {
        Fail::Full => ffi::SQLITE_FULL,
        Fail::Busy => ffi::SQLITE_BUSY,
        Fail::ReadOnly => ffi::SQLITE_READONLY,
        Fail::NotFound | Fail::Exists | Fail::Io => io,
    }
}

unsafe extern "C" fn x_open(
    vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    out: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    // SAFETY: called by SQLite on our registered VFS.
    let inner = unsafe { disk_of_vfs(vfs) };
    // SAFETY: SQLite passes a NUL-terminated name or null (a temporary file).
    let path = unsafe { path(name) };
    if !name.is_null() && path.is_none() {
        return ffi::SQLITE_CANTOPEN;
    }
    let create = flags & ffi::SQLITE_OPEN_CREATE != 0;
    // unixOpen's isNewJrnl: a journal or WAL opened with O_CREAT gets UNIXFILE_DIRSYNC.
    let dirsync = create
        && [ffi::SQLITE_OPEN_MAIN_JOURNAL, ffi::SQLITE_OPEN_SUPER_JOURNAL, ffi::SQLITE_OPEN_WAL]
            .iter()
            .any(|t| flags & t != 0);
    let opened = inner.state().open(
        path,
        create || path.is_none(),
        flags & ffi::SQLITE_OPEN_EXCLUSIVE != 0,
        flags & ffi::SQLITE_OPEN_READONLY != 0,
        flags & ffi::SQLITE_OPEN_DELETEONCLOSE != 0 || path.is_none(),
        dirsync,
    );
    match opened {
        Ok(id) => {
            // The file keeps the disk alive until xClose.
            let disk = Arc::into_raw(inner.me());
            // SAFETY: `out` points to szOsFile (= size_of::<SimFile>()) writable bytes SQLite allocated, suitably
            // aligned for a sqlite3_file (SQLite allocates with 8-byte alignment, SimFile's alignment).
            unsafe {
                out.cast::<SimFile>().write(SimFile { base: ffi::sqlite3_file { pMethods: &IO_METHODS }, disk, id })
            };
            if !out_flags.is_null() {
                // SAFETY: SQLite passes a valid pointer or null.
                unsafe { *out_flags = flags };
            }
            ffi::SQLITE_OK
        }
        Err(_) => {
            // SAFETY: as above; a null pMethods tells SQLite there is nothing to close.
            unsafe { (*out).pMethods = std::ptr::null() };
            ffi::SQLITE_CANTOPEN
        }
    }
}

unsafe extern "C" fn x_delete(vfs: *mut ffi::sqlite3_vfs, name: *const c_char, dir_sync: c_int) -> c_int {
    // SAFETY: called by SQLite on our registered VFS, with a NUL-terminated name.
    let (inner, path) = unsafe { (disk_of_vfs(vfs), path(name)) };
    let Some(path) = path else { return ffi::SQLITE_IOERR_DELETE };
    let mut st = inner.state();
    match st.unlink(path) {
        Err(Fail::NotFound) => ffi::SQLITE_IOERR_DELETE_NOENT,
        Err(_) => ffi::SQLITE_IOERR_DELETE,
        // unixDelete: the directory is synced after the unlink when SQLite asks (synchronous = EXTRA does, for a
        // rollback journal), and a failure then is SQLITE_IOERR_DIR_FSYNC.
        Ok(()) if dir_sync & 1 != 0 => match st.sync_dir(crate::model::parent(path)) {
            Ok(()) => ffi::SQLITE_OK,
            Err(_) => ffi::SQLITE_IOERR_DIR_FSYNC,
        },
        Ok(()) => ffi::SQLITE_OK,
    }
}

unsafe extern "C" fn x_access(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    _flags: c_int,
    out: *mut c_int,
) -> c_int {
    // SAFETY: called by SQLite on our registered VFS, with a NUL-terminated name.
    let (inner, path) = unsafe { (disk_of_vfs(vfs), path(name)) };
    // Every file is readable and writable: EXISTS, READWRITE and READ all ask whether it exists.
    let found = match path.map(|p| inner.state().exists(p)) {
        Some(Ok(found)) => found,
        Some(Err(_)) => return ffi::SQLITE_IOERR_ACCESS,
        None => false,
    };
    // SAFETY: SQLite passes a valid out pointer.
    unsafe { *out = c_int::from(found) };
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_full_pathname(
    _vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    n_out: c_int,
    out: *mut c_char,
) -> c_int {
    // SAFETY: SQLite passes a NUL-terminated name.
    let Some(path) = (unsafe { path(name) }) else { return ffi::SQLITE_CANTOPEN };
    let full = if path.starts_with('/') { path.to_string() } else { format!("/{path}") };
    let cap = usize::try_from(n_out).unwrap_or(0);
    if full.len() + 1 > cap {
        return ffi::SQLITE_CANTOPEN;
    }
    // SAFETY: `out` has room for n_out bytes (SQLite's contract), and full.len() + 1 <= n_out.
    unsafe {
        std::ptr::copy_nonoverlapping(full.as_ptr(), out.cast::<u8>(), full.len());
        *out.add(full.len()) = 0;
    }
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_randomness(vfs: *mut ffi::sqlite3_vfs, n: c_int, out: *mut c_char) -> c_int {
    // SAFETY: called by SQLite on our registered VFS.
    let inner = unsafe { disk_of_vfs(vfs) };
    let n = usize::try_from(n).unwrap_or(0);
    let mut st = inner.state();
    for i in 0..n {
        // SAFETY: `out` has room for n bytes.
        unsafe { *out.add(i) = st.rng.next_u64() as u8 as c_char };
    }
    c_int::try_from(n).unwrap_or(0)
}

unsafe extern "C" fn x_sleep(vfs: *mut ffi::sqlite3_vfs, micros: c_int) -> c_int {
    // SAFETY: called by SQLite on our registered VFS.
    let inner = unsafe { disk_of_vfs(vfs) };
    let mut st = inner.state();
    let us = u64::try_from(micros).unwrap_or(0);
    st.slept_us += us;
    st.now_us += i64::from(micros.max(0));
    micros
}

/// Unix epoch in Julian days, and in Julian milliseconds (what xCurrentTimeInt64 counts).
const UNIX_EPOCH_JD: f64 = 2_440_587.5;
const UNIX_EPOCH_JD_MS: i64 = 210_866_760_000_000;

unsafe extern "C" fn x_current_time(vfs: *mut ffi::sqlite3_vfs, out: *mut f64) -> c_int {
    // SAFETY: called by SQLite on our registered VFS, with a valid out pointer.
    unsafe {
        let ms = disk_of_vfs(vfs).state().now_us.div_euclid(1000);
        *out = UNIX_EPOCH_JD + ms as f64 / 86_400_000.0;
    }
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_current_time_int64(vfs: *mut ffi::sqlite3_vfs, out: *mut ffi::sqlite3_int64) -> c_int {
    // SAFETY: called by SQLite on our registered VFS, with a valid out pointer.
    unsafe { *out = UNIX_EPOCH_JD_MS + disk_of_vfs(vfs).state().now_us.div_euclid(1000) };
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_get_last_error(_vfs: *mut ffi::sqlite3_vfs, _n: c_int, _out: *mut c_char) -> c_int {
    0
}

unsafe extern "C" fn x_close(f: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: SQLite closes a file we opened, once.
    let (inner, id) = unsafe { file(f) };
    inner.state().close(id);
    // SAFETY: the strong count `x_open` took with Arc::into_raw, given back once; the mutex guard above is dropped,
    // so the disk may be freed here (and its VFS unregistered) when this was the last reference.
    unsafe { drop(Arc::from_raw((*f.cast::<SimFile>()).disk)) };
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_read(f: *mut ffi::sqlite3_file, buf: *mut c_void, amt: c_int, offset: i64) -> c_int {
    // SAFETY: an open file of ours; SQLite's buffer has room for `amt` bytes.
    let ((inner, id), out) =
        unsafe { (file(f), std::slice::from_raw_parts_mut(buf.cast::<u8>(), usize::try_from(amt).unwrap_or(0))) };
    match inner.state().read(id, u64::try_from(offset).unwrap_or(0), out) {
        Ok(n) if n == out.len() => ffi::SQLITE_OK,
        // SQLite requires the rest zeroed on a short read; `read` did.
        Ok(_) => ffi::SQLITE_IOERR_SHORT_READ,
        Err(e) => code(e, ffi::SQLITE_IOERR_READ),
    }
}

unsafe extern "C" fn x_write(f: *mut ffi::sqlite3_file, buf: *const c_void, amt: c_int, offset: i64) -> c_int {
    // SAFETY: an open file of ours; SQLite's buffer holds `amt` bytes.
    let ((inner, id), bytes) =
        unsafe { (file(f), std::slice::from_raw_parts(buf.cast::<u8>(), usize::try_from(amt).unwrap_or(0))) };
    match inner.state().write(id, u64::try_from(offset).unwrap_or(0), bytes) {
        Ok(()) => ffi::SQLITE_OK,
        Err(e) => code(e, ffi::SQLITE_IOERR_WRITE),
    }
}

unsafe extern "C" fn x_truncate(f: *mut ffi::sqlite3_file, size: i64) -> c_int {
    // SAFETY: an open file of ours.
    let (inner, id) = unsafe { file(f) };
    match inner.state().truncate(id, u64::try_from(size).unwrap_or(0)) {
        Ok(()) => ffi::SQLITE_OK,
        Err(e) => code(e, ffi::SQLITE_IOERR_TRUNCATE),
    }
}

unsafe extern "C" fn x_sync(f: *mut ffi::sqlite3_file, _flags: c_int) -> c_int {
    // SAFETY: an open file of ours.
    let (inner, id) = unsafe { file(f) };
    // NORMAL, FULL and DATAONLY alike: on Linux every one is an fdatasync/fsync that makes the file's data durable.
    match inner.state().sync(id) {
        Ok(()) => ffi::SQLITE_OK,
        Err(e) => code(e, ffi::SQLITE_IOERR_FSYNC),
    }
}

unsafe extern "C" fn x_file_size(f: *mut ffi::sqlite3_file, out: *mut i64) -> c_int {
    // SAFETY: an open file of ours.
    let (inner, id) = unsafe { file(f) };
    match inner.state().size(id) {
        Ok(n) => {
            // SAFETY: SQLite passes a valid out pointer.
            unsafe { *out = i64::try_from(n).unwrap_or(i64::MAX) };
            ffi::SQLITE_OK
        }
        Err(e) => code(e, ffi::SQLITE_IOERR_FSTAT),
    }
}

unsafe extern "C" fn x_lock(f: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    // SAFETY: an open file of ours.
    let (inner, id) = unsafe { file(f) };
    match inner.state().lock(id, level) {
        Ok(()) => ffi::SQLITE_OK,
        Err(e) => code(e, ffi::SQLITE_IOERR_LOCK),
    }
}

unsafe extern "C" fn x_unlock(f: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    // SAFETY: an open file of ours.
    let (inner, id) = unsafe { file(f) };
    inner.state().unlock(id, level);
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_check_reserved_lock(f: *mut ffi::sqlite3_file, out: *mut c_int) -> c_int {
    // SAFETY: an open file of ours.
    let (inner, id) = unsafe { file(f) };
    match inner.state().reserved(id) {
        Ok(r) => {
            // SAFETY: SQLite passes a valid out pointer.
            unsafe { *out = c_int::from(r) };
            ffi::SQLITE_OK
        }
        Err(e) => code(e, ffi::SQLITE_IOERR_CHECKRESERVEDLOCK),
    }
}

unsafe extern "C" fn x_file_control(_f: *mut ffi::sqlite3_file, _op: c_int, _arg: *mut c_void) -> c_int {
    ffi::SQLITE_NOTFOUND
}

unsafe extern "C" fn x_sector_size(_f: *mut ffi::sqlite3_file) -> c_int {
    crate::model::SECTOR as c_int
}

unsafe extern "C" fn x_device_characteristics(_f: *mut ffi::sqlite3_file) -> c_int {
    // No promise at all (no atomic or safe-append writes, no powersafe overwrite): the worst case SQLite handles.
    0
}

unsafe extern "C" fn x_shm_map(
    f: *mut ffi::sqlite3_file,
    region: c_int,
    size: c_int,
    extend: c_int,
    out: *mut *mut c_void,
) -> c_int {
    // SAFETY: an open file of ours.
    let (inner, id) = unsafe { file(f) };
    let mapped = inner.state().shm_map(
        id,
        usize::try_from(region).unwrap_or(0),
        usize::try_from(size).unwrap_or(0),
        extend != 0,
    );
    let ptr = match mapped {
        Ok(Some(p)) => p.cast::<c_void>(),
        Ok(None) => std::ptr::null_mut(),
        Err(e) => return code(e, ffi::SQLITE_IOERR_SHMMAP),
    };
    // SAFETY: SQLite passes a valid out pointer. The region stays allocated until this handle unmaps it.
    unsafe { *out = ptr };
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_shm_lock(f: *mut ffi::sqlite3_file, offset: c_int, n: c_int, flags: c_int) -> c_int {
    // SAFETY: an open file of ours.
    let (inner, id) = unsafe { file(f) };
    let lock = flags & ffi::SQLITE_SHM_LOCK != 0;
    let exclusive = flags & ffi::SQLITE_SHM_EXCLUSIVE != 0;
    let (offset, n) = (usize::try_from(offset).unwrap_or(0), usize::try_from(n).unwrap_or(0));
    match inner.state().shm_lock(id, offset, n, lock, exclusive) {
        Ok(()) => ffi::SQLITE_OK,
        Err(e) => code(e, ffi::SQLITE_IOERR_SHMLOCK),
    }
}

unsafe extern "C" fn x_shm_barrier(f: *mut ffi::sqlite3_file) {
    // SAFETY: an open file of ours.
    let (inner, _) = unsafe { file(f) };
    // unixShmBarrier: a full fence, and the mutex taken and released.
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    drop(inner.state());
}

unsafe extern "C" fn x_shm_unmap(f: *mut ffi::sqlite3_file, _delete: c_int) -> c_int {
    // SAFETY: an open file of ours.
    let (inner, id) = unsafe { file(f) };
    // Whether or not SQLite asks to delete it, the memory goes with its last user (see `Shm::users`).
    inner.state().shm_unmap(id);
    ffi::SQLITE_OK
}
