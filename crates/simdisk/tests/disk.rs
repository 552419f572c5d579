//! The disk's model, feature by feature: directory durability, capacity, locks and simulated sleep, independent
//! disks on threads, the crash point.

mod common;

use std::time::{Duration, Instant};

use common::{DB, Mode, Rows, fresh, open, power_loss_seed, read_rows, workload};
use rusqlite::{Connection, ErrorCode, OpenFlags};
use simdisk::SimDisk;

fn disk() -> SimDisk {
    let disk = SimDisk::new(1 << 20, 7);
    disk.create_dir_all("/q").expect("mkdir");
    disk
}

#[test]
fn a_new_name_needs_a_directory_sync() {
    let disk = disk();
    disk.write_file("/q/a", b"alpha").expect("write");
    disk.sync_file("/q/a").expect("sync");
    let loss = disk.power_loss();
    assert!(!disk.exists("/q/a"), "synced, but its directory was not: {loss}");
    assert_eq!(loss.entries_lost, ["/q/a"]);

    disk.write_file("/q/a", b"alpha").expect("write");
    disk.sync_file("/q/a").expect("sync");
    disk.sync_dir("/q").expect("dirsync");
    disk.power_loss();
    assert_eq!(disk.read_file("/q/a").expect("kept"), b"alpha");
}

#[test]
fn unsynced_contents_may_go_but_a_sync_keeps_them() {
    let disk = disk();
    disk.write_file("/q/a", b"old").expect("write");
    disk.sync_file("/q/a").expect("sync");
    disk.sync_dir("/q").expect("dirsync");
    // Many seeds of the disk's choice: an unsynced rewrite is sometimes lost, a synced one never.
    let mut lost = 0;
    for seed in 0..32 {
        let disk = SimDisk::new(1 << 20, seed);
        disk.create_dir_all("/q").expect("mkdir");
        disk.write_file("/q/a", &[1; 2048]).expect("write");
        disk.sync_file("/q/a").expect("sync");
        disk.sync_dir("/q").expect("dirsync");
        disk.write_file("/q/a", &[2; 2048]).expect("write");
        disk.power_loss();
        let after = disk.read_file("/q/a").expect("the name was synced");
        lost += u32::from(after != [2; 2048]);
        disk.write_file("/q/a", &[3; 2048]).expect("write");
        disk.sync_file("/q/a").expect("sync");
        disk.power_loss();
        assert_eq!(disk.read_file("/q/a").expect("kept"), [3; 2048]);
    }
    assert!(lost > 0, "an unsynced write is lost under some seed");
}

#[test]
fn rename_and_unlink_revert_without_a_directory_sync() {
    let disk = disk();
    disk.write_file("/q/a.new", b"new").expect("write");
    disk.write_file("/q/a", b"old").expect("write");
    disk.sync_file("/q/a.new").expect("sync");
    disk.sync_file("/q/a").expect("sync");
    disk.sync_dir("/q").expect("dirsync");

    disk.rename("/q/a.new", "/q/a").expect("rename");
    assert_eq!(disk.read_file("/q/a").expect("renamed"), b"new");
    assert!(!disk.exists("/q/a.new"));
    disk.power_loss();
    assert_eq!(disk.read_file("/q/a").expect("back"), b"old", "the rename reverts");
    assert_eq!(disk.read_file("/q/a.new").expect("back"), b"new");

    disk.rename("/q/a.new", "/q/a").expect("rename");
    disk.sync_dir("/q").expect("dirsync");
    disk.power_loss();
    assert_eq!(disk.read_file("/q/a").expect("kept"), b"new");
    assert!(!disk.exists("/q/a.new"));

    disk.remove("/q/a").expect("unlink");
    assert!(!disk.exists("/q/a"));
    disk.power_loss();
    assert_eq!(disk.read_file("/q/a").expect("an unsynced unlink reverts"), b"new");
}

#[test]
fn a_crash_keeps_everything() {
    let disk = disk();
    disk.write_file("/q/a", b"written").expect("write");
    disk.write_file("/q/b", b"renamed").expect("write");
    disk.rename("/q/b", "/q/c").expect("rename");
    disk.crash();
    assert_eq!(disk.read_file("/q/a").expect("kept"), b"written");
    assert_eq!(disk.read_file("/q/c").expect("kept"), b"renamed");
    // ... and durably: a power loss now changes nothing.
    let loss = disk.power_loss();
    assert_eq!(loss, simdisk::PowerLoss::default());
    assert_eq!(disk.read_file("/q/c").expect("kept"), b"renamed");
}

#[test]
fn a_new_wal_is_in_its_directory_after_its_first_sync() {
    // unixOpen marks a WAL opened to create UNIXFILE_DIRSYNC; its first sync syncs the directory.
    let mode = Mode { journal: "WAL", synchronous: "FULL" };
    let disk = fresh(3, mode);
    let mut conn = open(&disk, mode).expect("open");
    conn.execute("INSERT INTO t VALUES (1, x'00')", []).expect("insert");
    let tx = conn.transaction().expect("begin");
    tx.execute("INSERT INTO t VALUES (2, x'00')", []).expect("insert");
    tx.commit().expect("commit");
    drop(conn);
    // The connection's close checkpointed and unlinked the WAL; without a dir sync the unlink is not durable.
    disk.power_loss();
    assert!(disk.exists("/q/test.db-wal"), "the WAL's entry was synced by its first xSync");
    let rows = read_rows(&disk, mode).expect("intact");
    assert_eq!(rows.keys().copied().collect::<Vec<_>>(), [1, 2]);
}

#[test]
fn the_disk_fills_and_frees() {
    let disk = SimDisk::new(256 << 10, 1);
    disk.create_dir_all("/q").expect("mkdir");
    let conn = Connection::open_with_flags_and_vfs(DB, OpenFlags::default(), disk.vfs_name()).expect("open");
    let _: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)).expect("wal");
    conn.execute_batch("PRAGMA synchronous = FULL; CREATE TABLE t (body BLOB)").expect("schema");
    let mut inserted = 0;
    let err = loop {
        match conn.execute("INSERT INTO t VALUES (zeroblob(8000))", []) {
            Ok(_) => inserted += 1,
            Err(e) => break e,
        }
        assert!(inserted < 1000, "the disk never filled");
    };
    assert_eq!(err.sqlite_error_code(), Some(ErrorCode::DiskFull), "{err}");
    assert!(inserted > 0);
    let (db, wal) = (disk.file_len(DB), disk.file_len("/q/test.db-wal"));
    assert!(wal > 0, "the WAL's size is visible");
    assert_eq!(disk.used_bytes(), db + wal);
    assert_eq!(disk.free_bytes(), disk.capacity() - db - wal);
    assert!(disk.free_bytes() < 8000 + 2 * 4096, "full: {} bytes free", disk.free_bytes());

    disk.set_capacity(1 << 20);
    conn.execute("INSERT INTO t VALUES (zeroblob(8000))", []).expect("room again");
    let n: i64 = conn.query_row("SELECT count(*) FROM t", [], |r| r.get(0)).expect("count");
    assert_eq!(n, inserted + 1, "the failed insert changed nothing");
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())).expect("checkpoint");
    assert_eq!(disk.file_len("/q/test.db-wal"), 0, "a truncating checkpoint gives the WAL's space back");

    // A write the API makes is refused the same way, and changes nothing.
    disk.set_capacity(disk.used_bytes() + 10);
    let err = disk.write_file("/q/big", &[0; 100]).expect_err("no room");
    assert_eq!(err.kind(), std::io::ErrorKind::StorageFull);
    assert!(!disk.exists("/q/big"));
}

fn busy_case(journal: &str) {
    let disk = disk();
    let open = || {
        let c = Connection::open_with_flags_and_vfs(DB, OpenFlags::default(), disk.vfs_name()).expect("open");
        c.busy_timeout(Duration::from_secs(5)).expect("timeout");
        c
    };
    let writer = open();
    let _: String = writer.query_row(&format!("PRAGMA journal_mode = {journal}"), [], |r| r.get(0)).expect("mode");
    writer.execute_batch("CREATE TABLE t (x)").expect("schema");
    writer.execute_batch("BEGIN IMMEDIATE; INSERT INTO t VALUES (1)").expect("hold the write lock");

    let other = open();
    let started = Instant::now();
    let err = other.execute("INSERT INTO t VALUES (2)", []).expect_err("locked");
    assert_eq!(err.sqlite_error_code(), Some(ErrorCode::DatabaseBusy), "{err}");
    assert!(disk.slept_us() >= 4_900_000, "the busy handler waited {} us of simulated time", disk.slept_us());
    assert!(disk.now_ms() >= 4_900, "and the simulated clock moved");
    assert!(started.elapsed() < Duration::from_secs(2), "no real sleep: {:?}", started.elapsed());
    assert!(disk.busy_count() > 0);

    writer.execute_batch("COMMIT").expect("commit");
    other.execute("INSERT INTO t VALUES (2)", []).expect("free again");
}

#[test]
fn a_second_writer_waits_in_simulated_time_wal() {
    busy_case("WAL");
}

#[test]
fn a_second_writer_waits_in_simulated_time_delete() {
    busy_case("DELETE");
}

#[test]
fn two_disks_on_two_threads() {
    let mode = Mode { journal: "WAL", synchronous: "FULL" };
    let runs: Vec<_> = (0..2u64)
        .map(|t| {
            std::thread::spawn(move || {
                let mut names = Vec::new();
                for seed in 0..20 {
                    let (outcome, disk) = power_loss_seed(seed * 2 + t, mode);
                    assert!(matches!(outcome, common::Outcome::Durable { .. }), "seed {seed}: {outcome:?}");
                    names.push(disk.vfs_name().to_string());
                }
                names
            })
        })
        .collect();
    let names: Vec<Vec<String>> = runs.into_iter().map(|r| r.join().expect("no panic")).collect();
    assert!(names[0].iter().all(|n| !names[1].contains(n)), "each disk has its own VFS");
}

#[test]
fn the_crash_point_freezes_everything_after_it() {
    let mode = Mode { journal: "WAL", synchronous: "FULL" };
    let disk = fresh(5, mode);
    let before = disk.ops();
    disk.crash_after_ops(3);
    disk.write_file("/q/x", b"1").expect("op 1 and 2: create and write");
    assert!(!disk.frozen());
    disk.sync_file("/q/x").expect_err("op 3 fails");
    assert!(disk.frozen());
    assert_eq!(disk.ops(), before + 2, "the failing op is not counted");
    assert!(disk.read_file("/q/x").is_err(), "reads fail too");
    assert!(
        Connection::open_with_flags_and_vfs(DB, OpenFlags::default(), disk.vfs_name())
            .and_then(|c| c.query_row("SELECT count(*) FROM t", [], |r| r.get::<_, i64>(0)))
            .is_err()
    );
    disk.crash();
    assert!(!disk.frozen());
    assert_eq!(disk.read_file("/q/x").expect("a crash keeps it"), b"1");
}

#[test]
fn connections_left_open_are_invalidated() {
    let mode = Mode { journal: "WAL", synchronous: "FULL" };
    let disk = fresh(9, mode);
    let conn = open(&disk, mode).expect("open");
    conn.execute("INSERT INTO t VALUES (1, x'01')", []).expect("insert");
    let loss = disk.power_loss();
    assert!(loss.handles_invalidated > 0);
    assert!(conn.execute("INSERT INTO t VALUES (2, x'02')", []).is_err(), "a dead handle fails");
    drop(conn);
    assert_eq!(disk.open_files(), 0);
    let rows: Rows = read_rows(&disk, mode).expect("intact");
    assert_eq!(rows.keys().copied().collect::<Vec<_>>(), [1], "the committed insert was synced");
}

#[test]
fn the_workload_runs_whole_without_a_crash_point() {
    let mode = Mode { journal: "DELETE", synchronous: "FULL" };
    let disk = fresh(11, mode);
    let (states, in_flight, ops) = workload(&disk, 11, mode, None);
    assert!(in_flight.is_none());
    assert!(ops > 100, "{ops} ops");
    disk.crash();
    assert_eq!(&read_rows(&disk, mode).expect("intact"), states.last().expect("states"));
}
