//! Rows inserted per second, in transactions of 100 rows of ~1 KB, in WAL mode with `synchronous = FULL`: on the
//! simulated disk against a real file in a temporary directory. `cargo run -p simdisk --example speed`.

use std::time::Instant;

use rusqlite::{Connection, OpenFlags};
use simdisk::SimDisk;

const TRANSACTIONS: usize = 200;
const ROWS: usize = 100;

fn run(conn: &mut Connection, synchronous: &str) -> f64 {
    let _: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)).expect("wal");
    conn.pragma_update(None, "synchronous", synchronous).expect("synchronous");
    conn.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, body TEXT)").expect("schema");
    let body = "x".repeat(1000);
    let started = Instant::now();
    for _ in 0..TRANSACTIONS {
        let tx = conn.transaction().expect("begin");
        {
            let mut stmt = tx.prepare_cached("INSERT INTO t (body) VALUES (?1)").expect("prepare");
            for _ in 0..ROWS {
                stmt.execute([&body]).expect("insert");
            }
        }
        tx.commit().expect("commit");
    }
    (TRANSACTIONS * ROWS) as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let disk = SimDisk::new(1 << 30, 1);
    disk.create_dir_all("/q").expect("mkdir");
    let mut conn =
        Connection::open_with_flags_and_vfs("/q/queue.db", OpenFlags::default(), disk.vfs_name()).expect("open");
    let sim = run(&mut conn, "FULL");
    drop(conn);
    let mut conn =
        Connection::open_with_flags_and_vfs("/q/nosync.db", OpenFlags::default(), disk.vfs_name()).expect("open");
    let sim_nosync = run(&mut conn, "OFF");
    drop(conn);

    let dir = tempfile::tempdir().expect("tempdir");
    let mut conn = Connection::open(dir.path().join("queue.db")).expect("open");
    let real = run(&mut conn, "FULL");
    drop(conn);
    // SQLite's own work, without a sync: the ceiling for any disk.
    let mut conn = Connection::open(dir.path().join("nosync.db")).expect("open");
    let nosync = run(&mut conn, "OFF");

    println!("rows/s, transactions of {ROWS} rows of ~1 KB, WAL, synchronous = FULL:");
    println!("  simulated disk: {sim:>9.0}");
    println!("  real file:      {real:>9.0}  (in {})", dir.path().display());
    println!("  ratio:          {:>9.1}x", sim / real);
    println!("  synchronous = OFF (no sync at all): simulated disk {sim_nosync:.0}, real file {nosync:.0}");
}
