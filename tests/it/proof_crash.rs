//! The crash proof: `kill -9` of the real daemon at seeded random moments of collection and delivery, under
//! Mimecast faults, Datadog faults and a slow intake; then `--once` drains what is left, as cron would, and what
//! Datadog accepted is compared with what Mimecast served. Nothing may be lost or invented, and every duplicate
//! must be accounted for by the batches a kill can catch in flight (`sends_in_flight` of them, four here), or by an
//! accept-then-drop.
//!
//! The accounting: a record leaves the queue after exactly one acknowledged acceptance, so each extra copy at
//! Datadog is an acceptance the agent never acknowledged. There are two kinds. An orphan: Datadog accepted a
//! batch during a run, and when the run was killed the queue still held its records (the kill came between the
//! acceptance and the deletion). And an accept-then-drop: the batch was accepted but the agent saw a broken
//! connection. The test knows which accepted batch met which injected fault (the simulator takes one fault per
//! request, in order), reads the queue after each kill, and requires the duplicates to equal those two counts
//! exactly, with at most `sends_in_flight` orphaned batches per kill.
//!
//! `PROOF_CRASH_SEED=n` runs another seed. The agents' logs are kept in `target/tmp/proof_crash-<seed>.log`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::Rig;
use crate::common::bin::{SpawnDaemon, cmd, signal, write_config};
use mimecast_forwarder::datadog::batch::MAX_LOGS;
use mimecast_forwarder::mimecast::{Feed, wire};
use mimecast_forwarder::sim::datadog::{self as dd, DatadogSim, record_keys};
use mimecast_forwarder::sim::mimecast::Fault;
use mimecast_forwarder::sim::records;
use mimecast_forwarder::store::Store;
use serde_json::Value;

/// Batches the agent sends at once: the duplicate bound per kill.
const SENDS_IN_FLIGHT: usize = 4;

const SEED: u64 = 20_260_508;
const KILLS: usize = 30;
/// Intake delays are 100–400 ms: long enough that many kills land during a send, and far below the 5 s HTTP
/// timeout, whose expiry would make a duplicate that none of the counts above explains.
const MAX_DELAY_MS: u64 = 400;
const RECORD_BYTES: usize = 300;

/// What the intake simulator does with a request, given the fault it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Accepts,
    AcceptsThenDrops,
    Refuses,
}

/// The intake as the test models it: the injected faults not yet taken, and how far the requests, the accepted
/// batches and the accepted logs were already accounted for.
#[derive(Default)]
struct Intake {
    pending: VecDeque<Answer>,
    requests: usize,
    /// One entry per accepted batch the requests so far must produce: whether it was accepted then dropped.
    batches: Vec<bool>,
    logs: usize,
    seen_batches: usize,
}

/// The batches accepted since the previous look, each with whether the agent saw it dropped.
struct Span(Vec<(bool, Vec<Value>)>);

impl Intake {
    /// Keeps six faults pending: mostly delays of 100–400 ms, so that kills land while a send is in flight.
    fn top_up(&mut self, sim: &DatadogSim, rng: &mut fastrand::Rng) {
        while self.pending.len() < 6 {
            let fault = match rng.u8(0..20) {
                0 | 1 => dd::Fault::Status(503),
                2 => dd::Fault::Drop,
                3 => dd::Fault::Stall(Duration::from_millis(200)),
                4 | 5 => dd::Fault::AcceptThenDrop,
                _ => dd::Fault::Delay(Duration::from_millis(rng.u64(100..=MAX_DELAY_MS))),
            };
            self.push(sim, fault);
        }
    }

    fn push(&mut self, sim: &DatadogSim, fault: dd::Fault) {
        self.pending.push_back(match fault {
            dd::Fault::AcceptThenDrop => Answer::AcceptsThenDrops,
            dd::Fault::Delay(_) => Answer::Accepts,
            dd::Fault::Status(_) | dd::Fault::Drop | dd::Fault::Stall(_) => Answer::Refuses,
            other => panic!("the test does not model {other:?}"),
        });
        sim.fault(fault);
    }

    /// Waits until the intake has answered every request it received (a dead process's slow send included),
    /// then returns the batches accepted since the last call. Only called while no process runs.
    fn settle(&mut self, sim: &DatadogSim) -> Span {
        // A request the process wrote just before it died is still read and answered by the simulator: the
        // simulator says when every connection that reached it has been answered.
        assert!(sim.settle(Duration::from_secs(60)), "the intake did not answer what it holds");
        let requests = sim.requests();
        for _ in self.requests..requests {
            match self.pending.pop_front().unwrap_or(Answer::Accepts) {
                Answer::Refuses => {}
                answer => self.batches.push(answer == Answer::AcceptsThenDrops),
            }
        }
        self.requests = requests;
        let want = self.batches.len();
        let (logs, sizes, dropped) = (sim.accepted(), sim.batches(), sim.dropped_after_accepting());
        assert_eq!(sizes.len(), want, "the intake accepted batches the fault model does not explain");
        // With several sends in flight, batches are accepted in the order they finish, not the order they took
        // their faults: which one was dropped is what the simulator saw, and the counts must agree.
        let drops = |flags: &[bool]| flags.iter().filter(|d| **d).count();
        assert_eq!(drops(&dropped), drops(&self.batches), "accept-then-drops the fault model does not explain");
        self.batches = dropped;
        let mut new = logs[self.logs..].iter();
        let span = (self.seen_batches..want)
            .map(|i| (self.batches[i], new.by_ref().take(sizes[i].0).cloned().collect()))
            .collect();
        (self.logs, self.seen_batches) = (logs.len(), want);
        Span(span)
    }
}

/// What one run left behind.
#[derive(Default)]
struct Kill {
    /// Copies accepted (and answered) during the run of records the queue still held after it, and the batches.
    orphans: usize,
    orphan_batches: usize,
    /// Copies in batches accepted then dropped, and how many such batches.
    dropped: usize,
    accept_then_drops: usize,
    /// The intake accepted a batch after the process was dead: it had been waiting on a slow send.
    after_death: bool,
    /// A page with records was served in the last 100 ms before the kill.
    collecting: bool,
}

impl Kill {
    fn during_send(&self) -> bool {
        self.orphans > 0 || self.after_death
    }

    fn count(&mut self, span: &Span, queued: &HashSet<String>) {
        for (dropped, batch) in &span.0 {
            if *dropped {
                self.dropped += batch.len();
                self.accept_then_drops += 1;
                continue;
            }
            let held: usize = record_keys(batch).iter().filter(|(k, _)| queued.contains(*k)).map(|(_, n)| n).sum();
            self.orphans += held;
            self.orphan_batches += usize::from(held > 0);
        }
    }
}

#[test]
fn kill_9_at_random_moments_under_faults_and_a_slow_intake_loses_nothing() {
    let started = Instant::now();
    let seed = std::env::var("PROOF_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(SEED);
    // Two streams, so that the schedule (records, Mimecast faults, kill moments) is the same in every run of a
    // seed; how many intake faults are drawn before each run depends on how many requests took one.
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut intake_rng = fastrand::Rng::with_seed(seed ^ 0xdd);
    let rig = Rig::new();
    let mut expected = rig.add_records(&Feed::ALL, 1200, RECORD_BYTES);
    let in_flight = format!("sends_in_flight = {SENDS_IN_FLIGHT}");
    let config = write_config(&rig, &[("mimecast", "page_size = 100"), ("datadog", &in_flight)]);
    let config = config.to_str().unwrap();
    let log_path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("proof_crash-{seed}.log"));
    let mut log = File::create(&log_path).unwrap();
    let mut intake = Intake::default();
    let mut kills = Vec::new();
    let mut next_index = 1_000_000;
    for k in 0..KILLS {
        add_live_records(&rig, &mut rng, &mut next_index, &mut expected);
        inject_mimecast_faults(&rig, &mut rng, k);
        intake.top_up(&rig.dd, &mut intake_rng);
        writeln!(log, "=== run {k} (daemon, killed)").unwrap();
        let kill = kill_once(&rig, config, &mut rng, &mut intake, &log);
        assert!(
            kill.orphan_batches <= SENDS_IN_FLIGHT,
            "seed {seed}, kill {k}: {} orphaned copies in {} batches; see {}",
            kill.orphans,
            kill.orphan_batches,
            log_path.display()
        );
        kills.push(kill);
    }
    let (codes, drain) = drain_with_once(&rig, config, &mut intake, &mut log);
    assert_eq!(codes.last(), Some(&0), "seed {seed}: `run --once` exit codes {codes:?}; see {}", log_path.display());

    let got = record_keys(&rig.dd.accepted());
    let lost: Vec<_> = expected.iter().filter(|(k, _)| !got.contains_key(*k)).collect();
    let invented = got.keys().filter(|k| !expected.contains_key(*k)).count();
    let duplicated: usize = got.values().map(|n| n - 1).sum();
    let in_send = kills.iter().filter(|k| k.during_send()).count();
    let sum = |f: fn(&Kill) -> usize| kills.iter().map(f).sum::<usize>() + f(&drain);
    let (orphans, dropped, atds) = (sum(|k| k.orphans), sum(|k| k.dropped), sum(|k| k.accept_then_drops));
    println!(
        "proof_crash: seed {seed}; {KILLS} kills: {in_send} during a send ({} accepted after the death, {} with an \
         orphaned batch: {orphans} copies), {} during collection; {atds} accept-then-drops ({dropped} copies); \
         records expected {}, delivered {}, lost {}, invented {invented}, duplicated {duplicated} (= orphaned + \
         dropped: {}; promise: at most {}); --once exit codes {codes:?}; wall time {:.1}s; log {}",
        kills.iter().filter(|k| k.after_death).count(),
        kills.iter().filter(|k| k.orphans > 0).count(),
        kills.iter().filter(|k| k.collecting).count(),
        expected.len(),
        got.len(),
        lost.len(),
        orphans + dropped,
        MAX_LOGS * (SENDS_IN_FLIGHT * in_send + atds),
        started.elapsed().as_secs_f64(),
        log_path.display(),
    );
    assert!(lost.is_empty(), "seed {seed}: {} records lost, e.g. {:?}; {}", lost.len(), &lost[..lost.len().min(5)], {
        // Where they went: queued once and removed (the key is seen), set aside, or never queued.
        let db = rusqlite::Connection::open(rig.db_path()).unwrap();
        let count = |sql: &str| -> usize {
            lost.iter().filter(|(k, f)| db.query_row(sql, [f.name(), k.as_str()], |_| Ok(())).is_ok()).count()
        };
        format!(
            "{} were queued once (their key is seen), {} are dead letters, {} are still queued; see {}",
            count("SELECT 1 FROM seen WHERE feed = ?1 AND key = ?2"),
            count("SELECT 1 FROM dead_letter WHERE feed = ?1 AND key = ?2"),
            count("SELECT 1 FROM queue WHERE feed = ?1 AND key = ?2"),
            log_path.display()
        )
    });
    assert_eq!(invented, 0, "seed {seed}: records Mimecast never served");
    assert_eq!(duplicated, orphans + dropped, "seed {seed}: duplicates not accounted for by kills or drops");
    assert!(
        duplicated <= MAX_LOGS * (SENDS_IN_FLIGHT * in_send + atds),
        "seed {seed}: more than {SENDS_IN_FLIGHT} batches per kill in flight"
    );
    // The proof is only worth something if kills did land between Datadog's acceptance and the queue's deletion;
    // the slow intake is what makes them.
    assert!(in_send >= KILLS / 5, "seed {seed}: only {in_send} of {KILLS} kills landed during a send");
}

/// Adds a few records to one to three feeds, timed in the last 40 s: within `overlap_secs` of every window read
/// so far, so a later window must pick them up, even across crashes.
fn add_live_records(rig: &Rig, rng: &mut fastrand::Rng, next: &mut u64, expected: &mut HashMap<String, Feed>) {
    let now = mimecast_forwarder::datetime::now();
    for _ in 0..rng.usize(1..4) {
        let feed = Feed::ALL[rng.usize(0..6)];
        let recs: Vec<Value> = (0..rng.u64(5..40))
            .map(|_| {
                *next += 1;
                records::generate(feed, *next, now - rng.i64(2..40), RECORD_BYTES)
            })
            .collect();
        expected.extend(recs.iter().map(|r| (wire::record_key(feed, r), feed)));
        rig.mc.add(feed, recs);
    }
}

/// One or two Mimecast faults on random feeds and requests.
fn inject_mimecast_faults(rig: &Rig, rng: &mut fastrand::Rng, k: usize) {
    // Late runs get no new ones, so that the final `--once` passes do not meet a pile of them.
    if k >= KILLS * 2 / 3 {
        return;
    }
    for _ in 0..rng.usize(1..3) {
        let fault = match rng.u8(0..7) {
            0 => Fault::Drop,
            1 => Fault::Status(503),
            2 => Fault::FailOk { retryable: true },
            3 => Fault::RateLimit("50".into()),
            4 => Fault::Delay(Duration::from_millis(rng.u64(50..250))),
            5 => Fault::Stall(Duration::from_millis(rng.u64(100..300))),
            _ => Fault::Truncated,
        };
        let feed = rng.bool().then(|| Feed::ALL[rng.usize(0..6)]);
        rig.mc.fault_after(feed, rng.usize(0..8), fault);
    }
}

/// Runs the daemon for 100–600 ms, kills it with SIGKILL, lets the intake answer what it was holding, and
/// reads the queue the process left.
fn kill_once(rig: &Rig, config: &str, rng: &mut fastrand::Rng, intake: &mut Intake, log: &File) -> Kill {
    let mut child = cmd(&["run", "--config", config]).stderr(log.try_clone().unwrap()).spawn_daemon();
    std::thread::sleep(Duration::from_millis(rng.u64(100..600)));
    let batches = rig.dd.batches().len();
    let killed_at = Instant::now();
    signal(&child, "-KILL");
    child.wait().unwrap();
    let span = intake.settle(&rig.dd);
    let mut kill = Kill {
        after_death: rig.dd.batches().len() > batches,
        collecting: rig.mc.requests().iter().any(|r| r.records > 0 && r.at + Duration::from_millis(100) >= killed_at),
        ..Kill::default()
    };
    kill.count(&span, &queued_keys(&rig.db_path()));
    kill
}

/// The keys of every record still queued, read as `status` reads them.
fn queued_keys(db: &Path) -> HashSet<String> {
    if !db.exists() {
        return HashSet::new();
    }
    let store = Store::open_read_only(db).unwrap();
    store.candidates(usize::MAX >> 1).unwrap().into_iter().flatten().map(|q| q.key).collect()
}

/// Runs `run --once` until it exits 0 (at most 10 times), as cron would after the crashes.
fn drain_with_once(rig: &Rig, config: &str, intake: &mut Intake, log: &mut File) -> (Vec<i32>, Kill) {
    let mut codes = Vec::new();
    while codes.last() != Some(&0) && codes.len() < 10 {
        writeln!(log, "=== run --once").unwrap();
        let status = cmd(&["run", "--once", "--config", config]).stderr(log.try_clone().unwrap()).status().unwrap();
        codes.push(status.code().unwrap_or(-1));
    }
    let mut drain = Kill::default();
    drain.count(&intake.settle(&rig.dd), &queued_keys(&rig.db_path()));
    (codes, drain)
}
