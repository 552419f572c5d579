//! The store against a model, over a real SQLite file: random sequences of page commits (duplicate keys, with
//! and without a next page, drop-oldest with a small `max_bytes`), deliveries, dead letters, requeues, restarts
//! and commits that fail half way, with the model checked after every step.
//!
//! Failures are provoked without any hook in the product: the test's own connection to the file adds triggers
//! that abort an insert of the record keyed `poison` (half way through a page) or a cursor update to the page
//! token `poison` (after every record of the page), and it holds the write lock to make a commit meet `Busy`.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use mimecast_forwarder::config::WhenFull;
use mimecast_forwarder::mimecast::Feed;
use mimecast_forwarder::mimecast::window::Window;
use mimecast_forwarder::store::{Cursor, InFlight, NewRecord, PageCommit, Store, StoreError};
use proptest::prelude::*;
use rusqlite::Connection;

const FEEDS: [Feed; 2] = [Feed::Audit, Feed::Dlp];
const POISON: &str = "poison";

#[derive(Debug, Clone, Copy)]
enum Fault {
    /// The insert of a record in the middle of the page fails.
    Record,
    /// Every record is in; the cursor update at the end fails.
    Cursor,
    /// Another process holds the write lock.
    Busy,
}

#[derive(Debug, Clone)]
enum Op {
    /// Records as (key number, body padding); `drop_to`: `drop-oldest` with this `max_bytes`.
    Commit {
        feed: usize,
        records: Vec<(u8, u16)>,
        more: bool,
        drop_to: Option<u64>,
        fault: Option<Fault>,
    },
    /// Delivers the queued records picked by the bits of `mask` (in queue order).
    Deliver {
        mask: u64,
    },
    DeadLetter {
        mask: u64,
    },
    /// Requeues all dead letters, or those picked by `mask` (in id order) plus an id that does not exist.
    Requeue {
        all: bool,
        mask: u64,
    },
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    let fault = prop_oneof![
        6 => Just(None),
        1 => Just(Some(Fault::Record)),
        1 => Just(Some(Fault::Cursor)),
        1 => Just(Some(Fault::Busy)),
    ];
    let commit = (0..FEEDS.len(), prop::collection::vec((0u8..24, 0u16..300), 0..8), any::<bool>(), fault, 0u64..6)
        .prop_map(|(feed, records, more, fault, d)| Op::Commit {
            feed,
            records,
            more,
            // One commit in three drops the oldest records to fit in a small max_bytes.
            drop_to: (d < 2).then_some(d * 600 + 200),
            fault,
        });
    prop_oneof![
        4 => commit,
        2 => any::<u64>().prop_map(|mask| Op::Deliver { mask }),
        2 => any::<u64>().prop_map(|mask| Op::DeadLetter { mask }),
        1 => (any::<bool>(), any::<u64>()).prop_map(|(all, mask)| Op::Requeue { all, mask }),
        1 => Just(Op::Restart),
    ]
}

/// A record as the model sees it: feed, key, body.
type Rec = (String, String, String);

#[derive(Default)]
struct Model {
    /// Queued records in sequence order.
    queue: Vec<Rec>,
    /// Dead letters in id order.
    dead: Vec<Rec>,
    delivered: Vec<Rec>,
    dropped: Vec<Rec>,
    /// Every (feed, key) ever committed; the test never lets the store forget seen keys.
    committed: HashSet<(String, String)>,
    cursors: HashMap<&'static str, Cursor>,
}

fn bytes(recs: &[Rec]) -> i64 {
    recs.iter().map(|r| r.2.len() as i64).sum()
}

fn picked<T: Clone>(items: &[T], mask: u64) -> Vec<T> {
    items.iter().enumerate().filter(|(i, _)| *i < 64 && mask & (1 << i) != 0).map(|(_, x)| x.clone()).collect()
}

struct Rig {
    store: Option<Store>,
    /// The test's own connection: faults and checks.
    aux: Connection,
    model: Model,
}

impl Rig {
    fn new(path: &Path) -> Rig {
        let mut store = open(path);
        for feed in FEEDS {
            store.init_cursor(feed, 0).unwrap();
        }
        let aux = Connection::open(path).unwrap();
        aux.execute_batch(&format!(
            "CREATE TRIGGER poison_record BEFORE INSERT ON queue WHEN NEW.key = '{POISON}' \
                 BEGIN SELECT RAISE(ABORT, 'injected fault'); END;
             CREATE TRIGGER poison_cursor BEFORE UPDATE ON cursor WHEN NEW.page_token = '{POISON}' \
                 BEGIN SELECT RAISE(ABORT, 'injected fault'); END;"
        ))
        .unwrap();
        let mut model = Model::default();
        for feed in FEEDS {
            let cursor = Cursor {
                watermark: 0,
                window: None,
                keys_since: None,
                last_success: None,
                last_error: None,
                last_error_at: None,
            };
            model.cursors.insert(feed.name(), cursor);
        }
        Rig { store: Some(store), aux, model }
    }

    fn store(&mut self) -> &mut Store {
        self.store.as_mut().expect("the store is open between steps")
    }

    /// Queued sequence numbers in queue order.
    fn seqs(&mut self) -> Vec<i64> {
        let mut all: Vec<i64> = self.store().candidates(1000).unwrap().into_iter().flatten().map(|q| q.seq).collect();
        all.sort_unstable();
        all
    }

    fn step(&mut self, step: i64, op: &Op, path: &Path) {
        let now = 1_000 + step;
        match op {
            Op::Commit { feed, records, more, drop_to, fault } => {
                self.commit(step, FEEDS[*feed], records, *more, *drop_to, *fault)
            }
            Op::Deliver { mask } => {
                let mut seqs = picked(&self.seqs(), *mask);
                let gone = picked(&self.model.queue, *mask);
                seqs.push(i64::MAX); // not queued: ignored
                assert_eq!(self.store().delivered(&seqs, 0, 0, now).unwrap(), gone.len() as u64);
                self.model.queue.retain(|r| !gone.contains(r));
                self.model.delivered.extend(gone);
            }
            Op::DeadLetter { mask } => {
                let seqs = picked(&self.seqs(), *mask);
                let gone = picked(&self.model.queue, *mask);
                for seq in seqs {
                    assert!(self.store().dead_letter(seq, "HTTP 400: refused", now).unwrap());
                }
                assert!(!self.store().dead_letter(i64::MAX, "HTTP 400", now).unwrap());
                self.model.queue.retain(|r| !gone.contains(r));
                self.model.dead.extend(gone);
            }
            Op::Requeue { all, mask } => {
                let ids: Vec<i64> = self.store().dead_letters().unwrap().iter().map(|d| d.id).collect();
                let (back, out) = if *all {
                    (std::mem::take(&mut self.model.dead), self.store().requeue(None, now).unwrap())
                } else {
                    let mut chosen = picked(&ids, *mask);
                    chosen.push(i64::MAX);
                    let back = picked(&self.model.dead, *mask);
                    self.model.dead.retain(|r| !back.contains(r));
                    let out = self.store().requeue(Some(&chosen), now).unwrap();
                    assert_eq!(out.not_found, [i64::MAX]);
                    (back, out)
                };
                assert_eq!((out.records, out.bytes as i64), (back.len() as u64, bytes(&back)));
                self.model.queue.extend(back);
            }
            Op::Restart => {
                drop(self.store.take());
                self.store = Some(open(path));
            }
        }
    }

    fn commit(
        &mut self,
        step: i64,
        feed: Feed,
        records: &[(u8, u16)],
        more: bool,
        drop_to: Option<u64>,
        fault: Option<Fault>,
    ) {
        let name = feed.name().to_owned();
        let mut records: Vec<NewRecord> = records
            .iter()
            .map(|&(k, pad)| NewRecord {
                key: format!("k{k}"),
                event_time: Some(step),
                body: format!("{{\"k\":{k},\"pad\":\"{}\"}}", "x".repeat(pad as usize)),
            })
            .collect();
        if matches!(fault, Some(Fault::Record)) {
            let poison = NewRecord { key: POISON.into(), event_time: None, body: "{}".into() };
            records.insert(records.len() / 2, poison);
        }
        let token = match fault {
            Some(Fault::Cursor) => Some(POISON.to_owned()),
            _ => more.then(|| format!("t{step}")),
        };
        let window = Window { from: step * 10, to: step * 10 + 10 };
        let page = PageCommit { feed, window, next_token: token.clone(), records, forget_before: i64::MIN };
        let (max_bytes, when_full) = drop_to.map_or((u64::MAX, WhenFull::Pause), |m| (m, WhenFull::DropOldest));
        if matches!(fault, Some(Fault::Busy)) {
            self.aux.execute_batch("BEGIN IMMEDIATE").unwrap();
        }
        let result = self.store().commit_page(&page, 1_000 + step, max_bytes, when_full, &InFlight::NONE);
        if matches!(fault, Some(Fault::Busy)) {
            self.aux.execute_batch("ROLLBACK").unwrap();
        }
        match fault {
            Some(Fault::Busy) => {
                assert!(matches!(&result, Err(e @ StoreError::Busy { .. }) if e.is_transient()), "{result:?}")
            }
            Some(_) => assert!(matches!(&result, Err(StoreError::Sql { .. })), "{result:?}"),
            None => {
                let out = result.unwrap();
                let mut queued = 0;
                for r in &page.records {
                    if self.model.committed.insert((name.clone(), r.key.clone())) {
                        self.model.queue.push((name.clone(), r.key.clone(), r.body.clone()));
                        queued += 1;
                    }
                }
                let mut dropped = 0;
                if let Some(max) = drop_to {
                    let mut excess = bytes(&self.model.queue) - max as i64;
                    while excess > 0 {
                        let r = self.model.queue.remove(0);
                        excess -= r.2.len() as i64;
                        self.model.dropped.push(r);
                        dropped += 1;
                    }
                }
                assert_eq!(
                    (out.queued, out.skipped, out.dropped),
                    (queued, page.records.len() as u64 - queued, dropped)
                );
                let cursor = self.model.cursors.get_mut(feed.name()).unwrap();
                match token {
                    Some(t) => cursor.window = Some((window, Some(t))),
                    None => {
                        // Keys complete since the latest forget_before, or this window's when the watermark moves
                        // back (never here: windows only move on).
                        cursor.keys_since = Some(match cursor.keys_since {
                            Some(since) if window.to >= cursor.watermark => since.max(page.forget_before),
                            _ => page.forget_before,
                        });
                        cursor.watermark = window.to;
                        cursor.window = None;
                        cursor.last_success = Some(1_000 + step);
                    }
                }
            }
        }
    }

    /// The store equals the model, and the model keeps every committed record exactly once.
    fn check(&mut self) {
        let m = &self.model;
        let rows = |sql: &str| -> Vec<Rec> {
            let mut stmt = self.aux.prepare(sql).unwrap();
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).unwrap().collect::<Result<_, _>>().unwrap()
        };
        assert_eq!(rows("SELECT feed, key, body FROM queue ORDER BY seq"), m.queue, "queue");
        assert_eq!(rows("SELECT feed, key, body FROM dead_letter ORDER BY id"), m.dead, "dead letters");
        let (n, sum): (i64, i64) = self
            .aux
            .query_row("SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM queue", [], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap();
        let bad_bytes: i64 = self
            .aux
            .query_row("SELECT COUNT(*) FROM queue WHERE bytes != length(CAST(body AS BLOB))", [], |r| r.get(0))
            .unwrap();
        assert_eq!(bad_bytes, 0, "queue.bytes is each body's size");
        let seen: HashSet<(String, String)> = {
            let mut stmt = self.aux.prepare("SELECT feed, key FROM seen").unwrap();
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().collect::<Result<_, _>>().unwrap()
        };
        assert_eq!(seen, m.committed, "seen keys");

        let c = self.store.as_ref().unwrap().counters().unwrap();
        assert_eq!((c.queue_records, c.queue_bytes), (n, sum), "counters equal the queue table");
        assert_eq!((n, sum), (m.queue.len() as i64, bytes(&m.queue)));
        assert_eq!(c.dead_letters, m.dead.len() as i64);
        assert_eq!(c.delivered, m.delivered.len() as i64);
        assert_eq!(c.dropped, m.dropped.len() as i64);

        // Every committed record is in exactly one place.
        let mut places: HashMap<(String, String), usize> = HashMap::new();
        for r in m.queue.iter().chain(&m.dead).chain(&m.delivered).chain(&m.dropped) {
            *places.entry((r.0.clone(), r.1.clone())).or_default() += 1;
        }
        assert!(places.values().all(|&n| n == 1), "a record in two places");
        assert_eq!(places.keys().cloned().collect::<HashSet<_>>(), m.committed);

        for feed in FEEDS {
            let cursor = self.store.as_ref().unwrap().cursor(feed).unwrap().unwrap();
            assert_eq!(&cursor, &m.cursors[feed.name()], "cursor of {}", feed.name());
        }
    }
}

fn open(path: &Path) -> Store {
    let store = Store::open(path).unwrap();
    // A commit that meets the test's lock should fail at once, not after the 5 s of production.
    store.set_busy_timeout(Duration::from_millis(1)).unwrap();
    store
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn the_store_keeps_every_record_exactly_once(ops in prop::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.db");
        let mut rig = Rig::new(&path);
        for (step, op) in ops.iter().enumerate() {
            rig.step(step as i64, op, &path);
            rig.check();
        }
    }
}
