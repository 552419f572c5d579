//! A seeded workload of random transactions on a simulated disk, a power loss at a random write or sync, and the
//! check of what survived. Shared by the power-loss, threads and determinism tests.

#![allow(dead_code)]

use std::collections::BTreeMap;

use rusqlite::{Connection, OpenFlags};
use simdisk::SimDisk;

pub const DB: &str = "/q/test.db";

/// splitmix64, as the disk's: the workload's choices, from the seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5EED)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % n
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Mode {
    pub journal: &'static str,
    pub synchronous: &'static str,
}

pub type Rows = BTreeMap<i64, Vec<u8>>;

/// How a seed ended.
#[derive(Debug)]
pub enum Outcome {
    /// The database after the power loss holds exactly the last committed state, or the one of the transaction
    /// whose COMMIT was cut short (which may or may not have reached the disk).
    Durable { committed: usize, lost_in_flight: bool },
    /// A transaction whose COMMIT returned Ok is gone, or half of one is there.
    Lost { committed: usize, found_txn: Option<usize>, detail: String },
    /// quick_check failed or the database did not open.
    Corrupt(String),
}

pub fn open(disk: &SimDisk, mode: Mode) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags_and_vfs(DB, OpenFlags::default(), disk.vfs_name())?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    let _: String = conn.query_row(&format!("PRAGMA journal_mode = {}", mode.journal), [], |r| r.get(0))?;
    conn.pragma_update(None, "synchronous", mode.synchronous)?;
    // Small pages and cache: more pages, more writes per transaction, and spills before the commit.
    conn.pragma_update(None, "cache_size", 8)?;
    Ok(conn)
}

/// A fresh disk with the database created and made durable (as the store creates a queue: whole, then synced and
/// its directory synced).
pub fn fresh(seed: u64, mode: Mode) -> SimDisk {
    let disk = SimDisk::new(64 << 20, seed);
    disk.create_dir_all("/q").expect("mkdir");
    {
        let conn = Connection::open_with_flags_and_vfs(DB, OpenFlags::default(), disk.vfs_name()).expect("open");
        conn.pragma_update(None, "page_size", 1024).expect("page size");
        conn.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, body BLOB NOT NULL)").expect("schema");
        let _: String =
            conn.query_row(&format!("PRAGMA journal_mode = {}", mode.journal), [], |r| r.get(0)).expect("mode");
    }
    disk.sync_file(DB).expect("sync");
    disk.sync_dir("/q").expect("dirsync");
    disk
}

fn body(id: i64, version: u64, len: u64) -> Vec<u8> {
    (0..len).map(|i| (id as u64).wrapping_mul(31).wrapping_add(version * 7 + i) as u8).collect()
}

/// One transaction of 1 to 6 random changes, applied to `rows` as the database should then be.
fn transaction(conn: &mut Connection, rng: &mut Rng, rows: &mut Rows, txn: u64) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    for _ in 0..1 + rng.below(6) {
        let existing: Vec<i64> = rows.keys().copied().collect();
        match rng.below(4) {
            0 if !existing.is_empty() => {
                let id = existing[rng.below(existing.len() as u64) as usize];
                tx.execute("DELETE FROM t WHERE id = ?1", [id])?;
                rows.remove(&id);
            }
            1 if !existing.is_empty() => {
                let id = existing[rng.below(existing.len() as u64) as usize];
                let b = body(id, txn, 50 + rng.below(3000));
                tx.execute("UPDATE t SET body = ?2 WHERE id = ?1", rusqlite::params![id, b])?;
                rows.insert(id, b);
            }
            _ => {
                let id = 1 + rng.below(1_000_000) as i64;
                let b = body(id, txn, 50 + rng.below(3000));
                tx.execute("INSERT OR REPLACE INTO t (id, body) VALUES (?1, ?2)", rusqlite::params![id, b])?;
                rows.insert(id, b);
            }
        }
    }
    tx.commit()
}

pub const TRANSACTIONS: u64 = 30;

/// Runs the seed's transactions; with `crash_at`, the disk freezes at that op. Returns the states committed (the
/// first is the empty table), the state of the transaction cut short, if one was, and the ops the workload did.
pub fn workload(disk: &SimDisk, seed: u64, mode: Mode, crash_at: Option<u64>) -> (Vec<Rows>, Option<Rows>, u64) {
    let mut conn = open(disk, mode).expect("open before the workload");
    let start = disk.ops();
    if let Some(k) = crash_at {
        disk.crash_after_ops(k);
    }
    let mut rng = Rng::new(seed);
    let mut states = vec![Rows::new()];
    let mut in_flight = None;
    for txn in 0..TRANSACTIONS {
        let mut rows = states.last().expect("one").clone();
        match transaction(&mut conn, &mut rng, &mut rows, txn) {
            Ok(()) => states.push(rows),
            Err(_) => {
                in_flight = Some(rows);
                break;
            }
        }
        // Now and then a checkpoint, so that power losses also fall in one.
        if rng.below(8) == 0 {
            let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
        }
    }
    drop(conn);
    (states, in_flight, disk.ops() - start)
}

pub fn read_rows(disk: &SimDisk, mode: Mode) -> Result<Rows, String> {
    let conn = open(disk, mode).map_err(|e| format!("open: {e}"))?;
    let check: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0)).map_err(|e| format!("check: {e}"))?;
    if check != "ok" {
        return Err(format!("quick_check: {check}"));
    }
    let mut stmt = conn.prepare("SELECT id, body FROM t").map_err(|e| format!("select: {e}"))?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?)))
        .and_then(|rows| rows.collect::<rusqlite::Result<Rows>>())
        .map_err(|e| format!("read: {e}"))?;
    Ok(rows)
}

/// One seed: a dry run to count the workload's ops, then the same workload frozen at a random one of them (or just
/// past the last), a power loss, and the check. Returns the outcome and the disk.
pub fn power_loss_seed(seed: u64, mode: Mode) -> (Outcome, SimDisk) {
    let total = workload(&fresh(seed, mode), seed, mode, None).2;
    let disk = fresh(seed, mode);
    let k = 1 + Rng::new(seed.wrapping_mul(7919)).below(total + 1);
    let (states, in_flight, _) = workload(&disk, seed, mode, Some(k));
    disk.power_loss();
    let committed = states.len() - 1;
    let found = match read_rows(&disk, mode) {
        Ok(rows) => rows,
        Err(e) => return (Outcome::Corrupt(e), disk),
    };
    let last = states.last().expect("the empty state");
    let outcome = if &found == last {
        Outcome::Durable { committed, lost_in_flight: in_flight.is_some() }
    } else if in_flight.as_ref() == Some(&found) {
        Outcome::Durable { committed: committed + 1, lost_in_flight: false }
    } else {
        let found_txn = states.iter().rposition(|s| s == &found);
        let detail = format!("{} rows found, {} committed", found.len(), last.len());
        Outcome::Lost { committed, found_txn, detail }
    };
    (outcome, disk)
}
