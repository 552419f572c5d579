//! Seen keys: which records of a feed were queued already, so that a window read again queues nothing twice.
//!
//! Keys are hashes, so consecutive keys land on unrelated pages of a B-tree ordered by key, and SQLite writes
//! every page a transaction touched, whole, to the WAL and again to the database at the checkpoint. With a
//! single table of a few hundred thousand keys, a page of 500 records touched some 500 of its pages: about 10 KB
//! written per record of 1.1 KB, three quarters of it for the seen keys. So the keys are kept in two tables of the
//! same shape, and a key is seen when it is in either (the view `seen` shows both, for reading):
//!
//! - `seen_recent` takes every new key. It holds at most [`MERGE_AT`] keys, so a page's keys touch few pages.
//! - `seen_main` takes them all from `seen_recent` in one statement when that is full, in key order, in the
//!   transaction of the page that filled it: each of its pages is touched once per [`MERGE_AT`] keys.
//!
//! A key's horizon ([`horizon`]) is the later of its record's own time and the end of the window that returned
//! it: Mimecast filters on a time of its own, which can be hours off the record's time field (the time-zone-lag
//! bug: a tenant's local time labelled `+0000`), so a record hours "older" than its window is returned again by
//! every later window that overlaps that one, and its key must outlive them all.
//!
//! Forgetting (`forget`): `seen_recent` is pruned at every completed window, `seen_main` (a scan of the feed's
//! keys, and a write of most of its pages) when its horizon has moved [`MAIN_PRUNE_STEP`] on since it was last
//! pruned, and at the first completed window of the feed after the store is opened. A key is never forgotten
//! before its horizon passes `forget_before`; a key in `seen_main` may be kept up to an hour longer, which
//! changes nothing: no window returns its record again.

use rusqlite::{CachedStatement, Connection, Transaction, params};

use super::{Context, StoreError};
use crate::mimecast::Feed;
use crate::mimecast::window::Window;

/// Keys `seen_recent` holds before they move into `seen_main`.
pub(super) const MERGE_AT: u64 = 16_384;

/// How far (seconds of horizon) a feed's `forget_before` moves on before `seen_main` is pruned again.
pub(super) const MAIN_PRUNE_STEP: i64 = 3600;

/// What the store knows about its seen tables between transactions. Only `run` writes them, through one store.
#[derive(Debug)]
pub(super) struct Seen {
    /// Rows in `seen_recent`, when known: `None` at open and after a failed transaction (counted again then).
    pub(super) recent: Option<u64>,
    /// Per feed (`Feed as usize`), the `forget_before` that `seen_main` was last pruned with since open.
    pub(super) main_pruned: [Option<i64>; 6],
    /// [`MERGE_AT`], and [`MAIN_PRUNE_STEP`]; tests make them small.
    pub(super) merge_at: u64,
    pub(super) main_prune_step: i64,
}

impl Default for Seen {
    fn default() -> Seen {
        Seen { recent: None, main_pruned: [None; 6], merge_at: MERGE_AT, main_prune_step: MAIN_PRUNE_STEP }
    }
}

impl Seen {
    /// Whether a completed window of `feed` that forgets keys before `forget_before` prunes `seen_main` too.
    pub(super) fn main_prune_due(&self, feed: Feed, forget_before: i64) -> bool {
        match self.main_pruned[feed as usize] {
            None => true,
            Some(last) => forget_before >= last.saturating_add(self.main_prune_step),
        }
    }
}

/// The horizon of the key of a record with this own time, returned by `window`: the later of the two. Mimecast
/// returns a record for every window that holds the time it filters on, which lies in `window` whatever the
/// record's own time says, and a window after a completed one starts at most `overlap_secs` before its end. So once
/// a completed window's `forget_before` (its end less `overlap_secs` and an hour) has passed the horizon, no later
/// window returns the record again.
pub(super) fn horizon(event_time: Option<i64>, window: Window) -> i64 {
    event_time.map_or(window.to, |t| t.max(window.to))
}

/// The two statements that record one page's keys, prepared once per page.
pub(super) struct Keys<'t> {
    in_main: CachedStatement<'t>,
    add: CachedStatement<'t>,
}

impl<'t> Keys<'t> {
    pub(super) fn new(tx: &'t Transaction) -> Result<Keys<'t>, StoreError> {
        Ok(Keys {
            in_main: tx
                .prepare_cached("SELECT 1 FROM seen_main WHERE feed = ?1 AND key = ?2")
                .ctx("preparing the seen lookup")?,
            add: tx
                .prepare_cached("INSERT OR IGNORE INTO seen_recent (feed, key, horizon) VALUES (?1, ?2, ?3)")
                .ctx("preparing the seen insert")?,
        })
    }

    /// Records `key` as seen for `feed`; false when it was seen already (the record is then skipped).
    pub(super) fn add(&mut self, feed: &str, key: &str, horizon: i64) -> Result<bool, StoreError> {
        if self.in_main.exists(params![feed, key]).ctx("looking up a seen key")? {
            return Ok(false);
        }
        Ok(self.add.execute(params![feed, key, horizon]).ctx("recording a seen key")? == 1)
    }
}

/// Forgets `feed`'s keys with a horizon before `before`: in `seen_recent`, and in `seen_main` when `main`.
/// Returns how many rows left `seen_recent`.
pub(super) fn forget(tx: &Transaction, feed: &str, before: i64, main: bool) -> Result<u64, StoreError> {
    let recent = tx
        .prepare_cached("DELETE FROM seen_recent WHERE feed = ?1 AND horizon < ?2")
        .ctx("preparing to forget seen keys")?
        .execute(params![feed, before])
        .ctx("forgetting recent seen keys")?;
    if main {
        tx.prepare_cached("DELETE FROM seen_main WHERE feed = ?1 AND horizon < ?2")
            .ctx("preparing to forget seen keys")?
            .execute(params![feed, before])
            .ctx("forgetting old seen keys")?;
    }
    Ok(recent as u64)
}

/// Moves every key of `seen_recent` into `seen_main` (in key order: each page of `seen_main` is written once).
pub(super) fn merge(tx: &Transaction) -> Result<(), StoreError> {
    tx.execute_batch(
        "INSERT OR IGNORE INTO seen_main (feed, key, horizon) SELECT feed, key, horizon FROM seen_recent;
         DELETE FROM seen_recent;",
    )
    .ctx("moving recent seen keys")
}

/// Rows in `seen_recent`.
pub(super) fn count_recent(conn: &Connection) -> Result<u64, StoreError> {
    conn.query_row("SELECT COUNT(*) FROM seen_recent", [], |r| r.get::<_, i64>(0))
        .map(|n| n.max(0) as u64)
        .ctx("counting recent seen keys")
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use crate::config::WhenFull;
    use crate::mimecast::Feed;
    use crate::mimecast::window::Window;
    use crate::store::{InFlight, NewRecord, PageCommit, Store};

    const FEEDS: [Feed; 2] = [Feed::Audit, Feed::TtpUrl];

    fn page(feed: Feed, keys: &[(u8, i64)], last: bool, forget_before: i64) -> PageCommit {
        PageCommit {
            feed,
            window: Window { from: 0, to: 50 },
            next_token: (!last).then(|| "t".to_owned()),
            records: keys
                .iter()
                .map(|&(k, t)| NewRecord {
                    key: format!("k{k}"),
                    event_time: (t >= 0).then_some(t),
                    body: format!("{{\"k\":{k}}}"),
                })
                .collect(),
            forget_before,
        }
    }

    fn store(merge_at: u64, main_prune_step: i64) -> Store {
        let mut s = Store::in_memory();
        for feed in FEEDS {
            s.init_cursor(feed, 0).unwrap();
        }
        s.seen.merge_at = merge_at;
        s.seen.main_prune_step = main_prune_step;
        s
    }

    fn seen_rows(s: &Store, table: &str) -> HashMap<(String, String), i64> {
        let mut stmt = s.conn().prepare(&format!("SELECT feed, key, horizon FROM {table}")).unwrap();
        stmt.query_map([], |r| Ok(((r.get(0)?, r.get(1)?), r.get(2)?))).unwrap().collect::<Result<_, _>>().unwrap()
    }

    fn count(s: &Store, table: &str) -> u64 {
        s.conn().query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get::<_, i64>(0)).unwrap() as u64
    }

    /// One step: a page of (key, event time or -1 for none) for a feed, possibly its window's last, possibly
    /// failing half way (a record keyed `poison`).
    type Step = (usize, Vec<(u8, i64)>, bool, i64, bool);

    fn step() -> impl Strategy<Value = Step> {
        (0..FEEDS.len(), prop::collection::vec((0u8..40, -1i64..100), 0..12), any::<bool>(), 0i64..8, 0u8..8)
            .prop_map(|(f, keys, last, advance, fail)| (f, keys, last, advance, fail == 0))
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

        /// With the main table pruned at every window (step 0), the two tables together are exactly one set of
        /// keys with the horizon each was first seen with, forgotten exactly behind the horizon, whatever the
        /// merges and failed pages in between; the count of recent keys kept in memory stays true.
        #[test]
        fn two_tables_are_one_set_of_seen_keys(merge_at in 1u64..20, steps in prop::collection::vec(step(), 1..40)) {
            let mut s = store(merge_at, 0);
            s.conn()
                .execute_batch(
                    "CREATE TRIGGER poison BEFORE INSERT ON queue WHEN NEW.key = 'kpoison' \
                     BEGIN SELECT RAISE(ABORT, 'injected'); END;",
                )
                .unwrap();
            let mut model: HashMap<(String, String), i64> = HashMap::new();
            let mut forget = [0i64; 2];
            for (f, keys, last, advance, fail) in steps {
                let feed = FEEDS[f];
                forget[f] += advance * 10;
                let mut p = page(feed, &keys, last, forget[f]);
                if fail {
                    let poison = NewRecord { key: "kpoison".into(), event_time: None, body: "{}".into() };
                    p.records.insert(p.records.len() / 2, poison);
                    prop_assert!(s.commit_page(&p, 1, u64::MAX, WhenFull::Pause, &InFlight::NONE).is_err());
                } else {
                    let out = s.commit_page(&p, 1, u64::MAX, WhenFull::Pause, &InFlight::NONE).unwrap();
                    let mut queued = 0;
                    for r in &p.records {
                        let horizon = r.event_time.map_or(p.window.to, |t| t.max(p.window.to));
                        if let std::collections::hash_map::Entry::Vacant(v) =
                            model.entry((feed.name().to_owned(), r.key.clone()))
                        {
                            v.insert(horizon);
                            queued += 1;
                        }
                    }
                    prop_assert_eq!((out.queued, out.skipped), (queued, p.records.len() as u64 - queued));
                    if last {
                        model.retain(|(name, _), h| name != feed.name() || *h >= forget[f]);
                    }
                }
                let (main, recent) = (seen_rows(&s, "seen_main"), seen_rows(&s, "seen_recent"));
                prop_assert!(main.keys().all(|k| !recent.contains_key(k)), "a key in both tables");
                prop_assert_eq!(&seen_rows(&s, "seen"), &model);
                if let Some(n) = s.seen.recent {
                    prop_assert_eq!(n, count(&s, "seen_recent"));
                    prop_assert!(n < merge_at, "merged when full");
                }
            }
        }
    }

    /// A daemon polls one feed every 5 minutes for 16 hours, from a fake Mimecast that returns every record whose
    /// time (Mimecast's own) lies in the window; a fifth of the records have an own time 6 hours behind it (the
    /// time-zone-lag bug). After 6 hours `overlap_secs` goes from 300 s to 4 hours. Whatever the raise re-reads is
    /// queued once; a record indexed late within the old overlap at the raise, and one 2 hours late once the new
    /// overlap is read whole, are still read. Without [`reread_within_keys`] the raise queues records again.
    ///
    /// [`reread_within_keys`]: crate::store::reread_within_keys
    #[test]
    fn raising_the_overlap_queues_nothing_twice() {
        use crate::mimecast::window::{Settings, next_window};
        const T0: i64 = 1_800_000_000;
        const HOUR: i64 = 3600;
        let (raise_at, end) = (T0 + 6 * HOUR, T0 + 16 * HOUR);
        // (Mimecast's time, id, own time, indexed at): a record is returned once Mimecast has indexed it.
        let records: Vec<(i64, u32, i64, i64)> = (0..16 * 60)
            .map(|i| {
                let t = T0 + 60 * i64::from(i) + 7;
                (t, i, if i % 5 == 0 { t - 6 * HOUR } else { t }, t)
            })
            .collect();
        let late_within_old = 100_000;
        let late_within_new = 100_001;
        let run = |clamp: bool, records: &mut Vec<(i64, u32, i64, i64)>| {
            let mut s = Store::in_memory();
            s.init_cursor(Feed::Audit, T0).unwrap();
            let mut now = T0 + 300;
            while now <= end {
                let overlap_secs = if now < raise_at { 300 } else { 4 * HOUR };
                let settings = Settings { overlap_secs, settle_secs: 60, max_window_secs: 6 * HOUR };
                if now == raise_at {
                    // Indexed late, just behind the watermark: the old overlap would have read it.
                    let wm = s.cursor(Feed::Audit).unwrap().unwrap().watermark;
                    records.push((wm - 200, late_within_old, wm - 200, now));
                    // Indexed 2 hours late, once the raised overlap is read whole.
                    records.push((raise_at + 4 * HOUR, late_within_new, raise_at + 4 * HOUR, raise_at + 6 * HOUR));
                }
                let cursor = s.cursor(Feed::Audit).unwrap().unwrap();
                if let Some(mut w) = next_window(cursor.watermark, now, settings) {
                    if clamp {
                        w = crate::store::reread_within_keys(w, cursor.watermark, cursor.keys_since);
                    }
                    let page = PageCommit {
                        feed: Feed::Audit,
                        window: w,
                        next_token: None,
                        records: records
                            .iter()
                            .filter(|&&(t, _, _, indexed)| w.from <= t && t <= w.to && indexed <= now)
                            .map(|&(_, id, own, _)| NewRecord {
                                key: format!("k{id}"),
                                event_time: Some(own),
                                body: format!("{{\"id\":{id}}}"),
                            })
                            .collect(),
                        forget_before: w.to - overlap_secs - HOUR,
                    };
                    s.commit_page(&page, now, u64::MAX, WhenFull::Pause, &InFlight::NONE).unwrap();
                }
                now += 300;
            }
            let mut stmt = s.conn().prepare("SELECT key, COUNT(*) FROM queue GROUP BY key").unwrap();
            let queued: HashMap<String, i64> =
                stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().collect::<Result<_, _>>().unwrap();
            queued
        };

        let queued = run(true, &mut records.clone());
        let twice: Vec<&String> = queued.iter().filter(|&(_, n)| *n > 1).map(|(k, _)| k).collect();
        assert!(twice.is_empty(), "{} records queued more than once: {twice:?}", twice.len());
        let settled: Vec<u32> = records.iter().filter(|r| r.0 <= end - 60).map(|r| r.1).collect();
        let missing: Vec<&u32> = settled.iter().filter(|id| !queued.contains_key(&format!("k{id}"))).collect();
        assert!(missing.is_empty(), "never queued: {missing:?}");
        for id in [late_within_old, late_within_new] {
            assert_eq!(queued.get(&format!("k{id}")), Some(&1), "indexed late: k{id}");
        }
        assert_eq!(queued.len(), settled.len() + 2);

        // The same without moving the window's start: the raise re-reads records whose keys were forgotten.
        let again = run(false, &mut records.clone()).values().filter(|&&n| n > 1).count();
        assert!(again > 100, "{again} records queued twice without the clamp");
    }

    #[test]
    fn keys_move_to_the_main_table_when_the_recent_one_is_full() {
        let mut s = store(5, super::MAIN_PRUNE_STEP);
        let keys: Vec<(u8, i64)> = (0..4).map(|k| (k, 10)).collect();
        s.commit_page(&page(Feed::Audit, &keys, false, 0), 1, u64::MAX, WhenFull::Pause, &InFlight::NONE).unwrap();
        assert_eq!((count(&s, "seen_recent"), count(&s, "seen_main")), (4, 0));
        let keys: Vec<(u8, i64)> = (2..6).map(|k| (k, 10)).collect();
        let out =
            s.commit_page(&page(Feed::Audit, &keys, false, 0), 1, u64::MAX, WhenFull::Pause, &InFlight::NONE).unwrap();
        assert_eq!((out.queued, out.skipped), (2, 2));
        assert_eq!((count(&s, "seen_recent"), count(&s, "seen_main")), (0, 6), "moved at 6 >= 5");
        let out =
            s.commit_page(&page(Feed::Audit, &keys, false, 0), 1, u64::MAX, WhenFull::Pause, &InFlight::NONE).unwrap();
        assert_eq!((out.queued, out.skipped), (0, 4), "keys in the main table are seen");
        let out =
            s.commit_page(&page(Feed::TtpUrl, &keys, false, 0), 1, u64::MAX, WhenFull::Pause, &InFlight::NONE).unwrap();
        assert_eq!((out.queued, out.skipped), (4, 0), "per feed");
    }

    /// The main table is pruned at the feed's first completed window since open, then once its horizon moved
    /// on by the step; the recent table at every completed window. Nothing is forgotten early.
    #[test]
    fn the_main_table_is_pruned_an_hour_at_a_time() {
        let mut s = store(1, 3600);
        let keys: Vec<(u8, i64)> = (0..10).map(|k| (k, i64::from(k) * 1000)).collect();
        s.commit_page(&page(Feed::Audit, &keys, false, 0), 1, u64::MAX, WhenFull::Pause, &InFlight::NONE).unwrap();
        assert_eq!(count(&s, "seen_main"), 10);
        let main_keys = |s: &Store| {
            let mut k: Vec<String> = seen_rows(s, "seen_main").into_keys().map(|(_, k)| k).collect();
            k.sort();
            k
        };
        s.commit_page(&page(Feed::Audit, &[], true, 1500), 1, u64::MAX, WhenFull::Pause, &InFlight::NONE).unwrap();
        assert_eq!(main_keys(&s), ["k2", "k3", "k4", "k5", "k6", "k7", "k8", "k9"], "first window since open");
        s.commit_page(&page(Feed::Audit, &[], true, 4500), 1, u64::MAX, WhenFull::Pause, &InFlight::NONE).unwrap();
        assert_eq!(count(&s, "seen_main"), 8, "less than the step since the last prune: kept");
        s.commit_page(&page(Feed::TtpUrl, &[], true, 9000), 1, u64::MAX, WhenFull::Pause, &InFlight::NONE).unwrap();
        assert_eq!(count(&s, "seen_main"), 8, "another feed's window forgets only its own keys");
        s.commit_page(&page(Feed::Audit, &[(50, 6000)], true, 5100), 1, u64::MAX, WhenFull::Pause, &InFlight::NONE)
            .unwrap();
        assert_eq!(main_keys(&s), ["k50", "k6", "k7", "k8", "k9"], "pruned again once the step is reached");

        // The recent table is pruned at every window.
        let mut s = store(1000, 3600);
        s.commit_page(&page(Feed::Audit, &keys, true, 1500), 1, u64::MAX, WhenFull::Pause, &InFlight::NONE).unwrap();
        s.commit_page(&page(Feed::Audit, &[], true, 1600), 1, u64::MAX, WhenFull::Pause, &InFlight::NONE).unwrap();
        assert_eq!(count(&s, "seen_recent"), 8);
        s.commit_page(&page(Feed::Audit, &[], true, 2500), 1, u64::MAX, WhenFull::Pause, &InFlight::NONE).unwrap();
        assert_eq!(count(&s, "seen_recent"), 7);
    }
}
