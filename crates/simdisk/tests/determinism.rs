//! The same seed and the same calls give the same files, bit for bit. Alone in its test binary: SQLite's PRNG (WAL
//! salts, journal nonces) is global to the process, and seeded here.

mod common;

use common::{Mode, Rng, fresh, workload};
use simdisk::PowerLoss;

/// The files right after a power loss at a seeded op (the WAL or journal included, before SQLite recovers them),
/// and what the power loss did.
fn files_after(seed: u64, mode: Mode) -> (Vec<(String, Vec<u8>)>, PowerLoss) {
    simdisk::seed_sqlite_prng(0x5151);
    let disk = fresh(seed, mode);
    workload(&disk, seed, mode, Some(1 + Rng::new(seed).below(300)));
    let loss = disk.power_loss();
    let files = disk.list("/q").into_iter().map(|p| (p.clone(), disk.read_file(&p).expect("listed"))).collect();
    (files, loss)
}

/// One test only: a second one would run on another thread and draw from SQLite's PRNG meanwhile.
#[test]
fn the_same_seed_gives_the_same_bytes() {
    for mode in [Mode { journal: "WAL", synchronous: "NORMAL" }, Mode { journal: "DELETE", synchronous: "FULL" }] {
        let mut with_log = 0;
        for seed in 0..10 {
            let first = files_after(seed, mode);
            with_log += usize::from(first.0.len() > 1);
            assert!(first == files_after(seed, mode), "{mode:?} seed {seed}: the files differ");
        }
        assert!(with_log > 0, "{mode:?}: some seeds compare a WAL or journal too");
    }
    let mode = Mode { journal: "WAL", synchronous: "OFF" };
    assert!(files_after(1, mode) != files_after(2, mode), "another seed, other files");
}
