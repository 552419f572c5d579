//! Power loss at a random write or sync inside random transactions, over many seeds: with honest syncs SQLite
//! keeps every committed transaction and never corrupts; without them the model catches the loss.

mod common;

use common::{Mode, Outcome, power_loss_seed};

const SEEDS: u64 = 200;

/// Runs the seeds and returns (durable, lost, corrupt) counts, printing the first failures. Also fails when a lost
/// commit is anything but the last one (`only_last`).
fn run(mode: Mode) -> (u64, u64, u64) {
    run_checking(mode, false)
}

fn run_checking(mode: Mode, only_last: bool) -> (u64, u64, u64) {
    let (mut durable, mut lost, mut corrupt) = (0, 0, 0);
    for seed in 0..SEEDS {
        match power_loss_seed(seed, mode).0 {
            Outcome::Durable { .. } => durable += 1,
            Outcome::Lost { committed, found_txn, detail } => {
                if only_last {
                    assert_eq!(found_txn, Some(committed - 1), "{mode:?} seed {seed}: more than the last commit lost");
                }
                if lost < 3 {
                    println!(
                        "{mode:?} seed {seed}: lost: {committed} committed, found state of {found_txn:?}: {detail}"
                    );
                }
                lost += 1;
            }
            Outcome::Corrupt(e) => {
                if corrupt < 3 {
                    println!("{mode:?} seed {seed}: corrupt: {e}");
                }
                corrupt += 1;
            }
        }
    }
    println!("{mode:?}: {SEEDS} seeds, {durable} durable, {lost} lost a commit, {corrupt} corrupt");
    (durable, lost, corrupt)
}

#[test]
fn wal_full_survives_power_loss() {
    let (_, lost, corrupt) = run(Mode { journal: "WAL", synchronous: "FULL" });
    assert_eq!((lost, corrupt), (0, 0));
}

/// In DELETE mode the commit point is the journal's unlink, which `FULL` does not sync into the directory; `EXTRA`
/// does (xDelete's dirSync), and is what DELETE mode needs to be durable.
#[test]
fn delete_extra_survives_power_loss() {
    let (_, lost, corrupt) = run(Mode { journal: "DELETE", synchronous: "EXTRA" });
    assert_eq!((lost, corrupt), (0, 0));
}

/// FULL in DELETE mode: never corrupt, but the last transaction's commit may be undone (the journal's unlink is
/// not durable, and the journal comes back hot). Only the last one: the next journal's first sync syncs the
/// directory. This is SQLite's documented difference between FULL and EXTRA.
#[test]
fn delete_full_never_corrupts() {
    let (_, lost, corrupt) = run_checking(Mode { journal: "DELETE", synchronous: "FULL" }, true);
    assert_eq!(corrupt, 0);
    println!("DELETE/FULL: {lost} of {SEEDS} seeds lost their last commit (EXTRA is needed for durability)");
}

#[test]
fn wal_without_sync_is_caught() {
    let (_, lost, corrupt) = run(Mode { journal: "WAL", synchronous: "OFF" });
    println!("WAL/OFF: {} of {SEEDS} seeds catch the missing fsync", lost + corrupt);
    assert!(lost + corrupt > 0, "the model must catch a missing fsync");
}

#[test]
fn delete_without_sync_is_caught() {
    let (_, lost, corrupt) = run(Mode { journal: "DELETE", synchronous: "OFF" });
    println!("DELETE/OFF: {} of {SEEDS} seeds catch the missing fsync", lost + corrupt);
    assert!(lost + corrupt > 0, "the model must catch a missing fsync");
}

/// The simulator's `synchronous = NORMAL` mutant: in WAL mode a commit is not synced (the WAL is, before each
/// checkpoint), so a power loss undoes recent commits, without corrupting.
#[test]
fn wal_normal_loses_commits_but_never_corrupts() {
    let (_, lost, corrupt) = run(Mode { journal: "WAL", synchronous: "NORMAL" });
    println!("WAL/NORMAL: {lost} of {SEEDS} seeds lose a commit");
    assert_eq!(corrupt, 0);
    assert!(lost > 0, "the model must catch commits that were never synced");
}
