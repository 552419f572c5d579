//! Queue operations: committing a page with its cursor, choosing what to send, and removing what was sent.

use rusqlite::{OptionalExtension, params};

use super::note::{self, Note};
use super::{Context, Store, StoreError, seen};
use crate::config::WhenFull;
use crate::mimecast::Feed;
use crate::mimecast::window::Window;

/// A record ready to be queued.
#[derive(Debug, Clone)]
pub struct NewRecord {
    pub key: String,
    pub event_time: Option<i64>,
    /// The record as compact JSON, verbatim.
    pub body: String,
}

/// One fetched page and where it leaves its feed's cursor.
#[derive(Debug, Clone)]
pub struct PageCommit {
    pub feed: Feed,
    pub window: Window,
    /// The token of the next page, or `None` when this was the window's last page.
    pub next_token: Option<String>,
    pub records: Vec<NewRecord>,
    /// Seen keys with a horizon before this are forgotten when the window completes.
    pub forget_before: i64,
}

/// What a page commit did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageOutcome {
    pub queued: u64,
    pub skipped: u64,
    pub dropped: u64,
}

/// The records `drop-oldest` must leave in the queue: those in flight to Datadog, and those Datadog accepted whose
/// removal failed and is to be retried. Dropping one would count as dropped a record that Datadog has, and its
/// removal would then find nothing to count as delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InFlight {
    /// Per feed (`Feed as usize`), the highest sequence number that may be in flight: every record of the feed up to
    /// it is kept. `i64::MIN` when none is.
    up_to: [i64; 6],
    /// Records accepted whose removal is still to come, sorted.
    accepted: Vec<i64>,
}

impl InFlight {
    /// Nothing in flight: `drop-oldest` may drop any record.
    pub const NONE: InFlight = InFlight { up_to: [i64::MIN; 6], accepted: Vec::new() };

    /// Every record of a feed up to `up_to(feed)` (the agent passes `Sender::sent_up_to`, which covers every batch
    /// in flight: a new batch only takes records after it), and the records `accepted`.
    pub fn new(up_to: impl Fn(Feed) -> i64, accepted: impl IntoIterator<Item = i64>) -> InFlight {
        let mut accepted: Vec<i64> = accepted.into_iter().collect();
        accepted.sort_unstable();
        InFlight { up_to: Feed::ALL.map(up_to), accepted }
    }

    /// Whether this record of `feed` must stay.
    fn holds(&self, feed: Option<Feed>, seq: i64) -> bool {
        feed.is_some_and(|f| seq <= self.up_to[f as usize]) || self.accepted.binary_search(&seq).is_ok()
    }
}

/// A queued record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    pub seq: i64,
    pub feed: Feed,
    pub key: String,
    pub event_time: Option<i64>,
    pub body: String,
}

/// The running totals kept in the `counter` table, each updated in the transaction that changes what it counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub queue_records: i64,
    pub queue_bytes: i64,
    pub delivered: i64,
    pub dropped: i64,
    pub restamped: i64,
    pub kept: i64,
    pub dead_letters: i64,
}

pub(super) fn bump(tx: &rusqlite::Transaction, name: &str, by: i64) -> Result<(), StoreError> {
    if by != 0 {
        tx.prepare_cached(
            "INSERT INTO counter (name, value) VALUES (?1, ?2) ON CONFLICT (name) DO UPDATE SET value = value + ?2",
        )
        .ctx("preparing a counter update")?
        .execute(params![name, by])
        .ctx("updating a counter")?;
    }
    Ok(())
}

impl Store {
    /// Queues a page's new records and moves the feed's cursor, in one transaction: after a crash either both
    /// happened or neither did. Records whose key is already known for the feed are skipped; the keys of the others
    /// are recorded as seen in the same transaction (`seen.rs`). With `drop-oldest`, the oldest records not
    /// `in_flight` are then dropped until the queue fits in `max_bytes`, or until only records in flight are left
    /// to drop: the page is stored all the same, and the queue exceeds `max_bytes` by at most those until their
    /// answers come.
    pub fn commit_page(
        &mut self,
        page: &PageCommit,
        now: i64,
        max_bytes: u64,
        when_full: WhenFull,
        in_flight: &InFlight,
    ) -> Result<PageOutcome, StoreError> {
        let recent = match self.seen.recent {
            Some(n) => n,
            None => self.read(seen::count_recent)?,
        };
        let last_page = page.next_token.is_none();
        let prune_main = last_page && self.seen.main_prune_due(page.feed, page.forget_before);
        let merge_at = self.seen.merge_at;
        let done = self.write(|conn| {
            let feed = page.feed.name();
            let tx = conn.transaction().ctx("starting a page transaction")?;
            let mut out = PageOutcome::default();
            let mut bytes = 0i64;
            {
                let mut keys = seen::Keys::new(&tx)?;
                let mut queue = Insert::new(&tx)?;
                for r in &page.records {
                    if !keys.add(feed, &r.key, seen::horizon(r.event_time, page.window))? {
                        out.skipped += 1;
                        continue;
                    }
                    bytes += queue.insert(feed, &r.key, r.event_time, now, &r.body)?;
                    out.queued += 1;
                }
            }
            let mut recent = recent + out.queued;
            bump(&tx, "queue_records", out.queued as i64)?;
            bump(&tx, "queue_bytes", bytes)?;
            match &page.next_token {
                Some(token) => {
                    tx.prepare_cached(
                        "UPDATE cursor SET window_from = ?2, window_to = ?3, page_token = ?4 WHERE feed = ?1",
                    )
                    .ctx("preparing the page token")?
                    .execute(params![feed, page.window.from, page.window.to, token])
                    .ctx("saving the page token")?;
                }
                None => {
                    // The keys are complete from the latest `forget_before` on (`cursor::reread_within_keys`): one
                    // behind a larger overlap than before forgets nothing more. A watermark that moves back (the
                    // clock went back) starts over from this window's: the time it re-reads was read by a clock
                    // ahead, and records may have come since.
                    tx.prepare_cached(
                        "UPDATE cursor SET watermark = ?2, window_from = NULL, window_to = NULL, page_token = NULL, \
                         last_success = ?3, last_error = NULL, last_error_at = NULL, \
                         keys_since = CASE WHEN ?2 < watermark OR keys_since IS NULL THEN ?4 \
                         ELSE max(keys_since, ?4) END \
                         WHERE feed = ?1",
                    )
                    .ctx("preparing the watermark")?
                    .execute(params![feed, page.window.to, now, page.forget_before])
                    .ctx("advancing the watermark")?;
                    recent = recent.saturating_sub(seen::forget(&tx, feed, page.forget_before, prune_main)?);
                }
            }
            if when_full == WhenFull::DropOldest {
                out.dropped = drop_oldest(&tx, max_bytes, in_flight)?;
            }
            if recent >= merge_at {
                seen::merge(&tx)?;
                recent = 0;
            }
            tx.commit().ctx("committing a page")?;
            Ok((out, recent))
        });
        match done {
            Ok((out, recent)) => {
                self.seen.recent = Some(recent);
                if prune_main {
                    self.seen.main_pruned[page.feed as usize] = Some(page.forget_before);
                }
                Ok(out)
            }
            Err(e) => {
                self.seen.recent = None;
                Err(e)
            }
        }
    }

    /// The queue's running totals.
    pub fn counters(&self) -> Result<Counters, StoreError> {
        self.read(|conn| {
            let mut c = Counters::default();
            let mut stmt = conn.prepare_cached("SELECT name, value FROM counter").ctx("reading counters")?;
            let rows =
                stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))).ctx("reading counters")?;
            for row in rows {
                let (name, value) = row.ctx("reading a counter")?;
                match name.as_str() {
                    "queue_records" => c.queue_records = value,
                    "queue_bytes" => c.queue_bytes = value,
                    "delivered" => c.delivered = value,
                    "dropped" => c.dropped = value,
                    "restamped" => c.restamped = value,
                    "kept" => c.kept = value,
                    "dead_letters" => c.dead_letters = value,
                    _ => {}
                }
            }
            Ok(c)
        })
    }

    /// Up to `per_feed` of the oldest records of each feed, oldest first within a feed.
    pub fn candidates(&self, per_feed: usize) -> Result<Vec<Vec<Queued>>, StoreError> {
        self.candidates_after(per_feed, |_| i64::MIN)
    }

    /// [`Store::candidates`] after a sequence number per feed: the records up to it are in flight.
    pub fn candidates_after(
        &self,
        per_feed: usize,
        after: impl Fn(Feed) -> i64,
    ) -> Result<Vec<Vec<Queued>>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT seq, key, event_time, body FROM queue WHERE feed = ?1 AND seq > ?3 ORDER BY seq LIMIT ?2",
                )
                .ctx("preparing candidates")?;
            let mut all = Vec::new();
            for feed in Feed::ALL {
                let rows = stmt
                    .query_map(params![feed.name(), per_feed as i64, after(feed)], |r| {
                        Ok(Queued { seq: r.get(0)?, feed, key: r.get(1)?, event_time: r.get(2)?, body: r.get(3)? })
                    })
                    .ctx("reading candidates")?
                    .collect::<Result<Vec<_>, _>>()
                    .ctx("reading a candidate")?;
                if !rows.is_empty() {
                    all.push(rows);
                }
            }
            Ok(all)
        })
    }

    /// The records the next batch can hold, chosen from their sizes before any body is read: each feed's oldest
    /// records after `after(feed)` (the records up to it are in flight), as many as fair order
    /// ([`crate::datadog::batch::fair_order`]: one of each feed in turn) reaches before `max_logs` records or
    /// `max_bytes` of bodies (the record that crosses `max_bytes` is included, so that a record larger than a
    /// whole batch still comes up, to be refused as too large). Returns, per feed that has such records, that many
    /// of them, oldest first: what `candidates_after(max_logs, after)` returns, less what fair order would not
    /// reach.
    pub fn candidates_within(
        &self,
        max_logs: usize,
        max_bytes: usize,
        after: impl Fn(Feed) -> i64,
    ) -> Result<Vec<Vec<Queued>>, StoreError> {
        self.read(|conn| {
            // Sizes only: the index (feed, seq, bytes) answers this without reading a record's page.
            let mut sizes = conn
                .prepare_cached("SELECT seq, bytes FROM queue WHERE feed = ?1 AND seq > ?3 ORDER BY seq LIMIT ?2")
                .ctx("preparing candidate sizes")?;
            // Per feed with records: the feed, its mark, and (seq, bytes) of its oldest records after the mark.
            type Sizes = (Feed, i64, Vec<(i64, i64)>);
            let mut per_feed: Vec<Sizes> = Vec::new();
            for feed in Feed::ALL {
                let after = after(feed);
                let rows = sizes
                    .query_map(params![feed.name(), max_logs as i64, after], |r| Ok((r.get(0)?, r.get(1)?)))
                    .ctx("reading candidate sizes")?
                    .collect::<Result<Vec<(i64, i64)>, _>>()
                    .ctx("reading a candidate size")?;
                if !rows.is_empty() {
                    per_feed.push((feed, after, rows));
                }
            }
            // Fair order, round by round, until a limit is reached: how many of each feed's oldest it takes.
            let mut taken = vec![0usize; per_feed.len()];
            let (mut count, mut bytes) = (0usize, 0usize);
            'rounds: for round in 0.. {
                let mut any = false;
                for (i, (_, _, rows)) in per_feed.iter().enumerate() {
                    let Some(&(_, b)) = rows.get(round) else { continue };
                    if count == max_logs || (count > 0 && bytes >= max_bytes) {
                        break 'rounds;
                    }
                    any = true;
                    taken[i] += 1;
                    count += 1;
                    bytes = bytes.saturating_add(usize::try_from(b).unwrap_or(0));
                }
                if !any {
                    break;
                }
            }
            // The bodies of exactly those: each feed's records after `after` up to the last one taken.
            let mut load = conn
                .prepare_cached(
                    "SELECT seq, key, event_time, body FROM queue WHERE feed = ?1 AND seq > ?2 AND seq <= ?3 \
                     ORDER BY seq LIMIT ?4",
                )
                .ctx("preparing candidates")?;
            let mut all = Vec::with_capacity(per_feed.len());
            for ((feed, after, rows), n) in per_feed.into_iter().zip(taken) {
                let Some(&(last, _)) = n.checked_sub(1).and_then(|i| rows.get(i)) else { continue };
                let records = load
                    .query_map(params![feed.name(), after, last, n as i64], |r| {
                        Ok(Queued { seq: r.get(0)?, feed, key: r.get(1)?, event_time: r.get(2)?, body: r.get(3)? })
                    })
                    .ctx("reading candidates")?
                    .collect::<Result<Vec<_>, _>>()
                    .ctx("reading a candidate")?;
                all.push(records);
            }
            Ok(all)
        })
    }

    /// The records with these sequence numbers that are still queued, in sequence order.
    pub fn load(&self, seqs: &[i64]) -> Result<Vec<Queued>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT seq, feed, key, event_time, body FROM queue \
                     WHERE seq IN (SELECT value FROM json_each(?1)) ORDER BY seq",
                )
                .ctx("preparing load")?;
            let rows = stmt
                .query_map([json_array(seqs)], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })
                .ctx("loading records")?;
            let mut out = Vec::with_capacity(seqs.len());
            for row in rows {
                let (seq, feed, key, event_time, body) = row.ctx("loading a record")?;
                if let Some(feed) = Feed::from_name(&feed) {
                    out.push(Queued { seq, feed, key, event_time, body });
                }
            }
            Ok(out)
        })
    }

    /// Removes records that Datadog accepted, in one transaction, and counts late ones.
    pub fn delivered(&mut self, seqs: &[i64], restamped: i64, kept: i64, now: i64) -> Result<u64, StoreError> {
        self.write(|conn| {
            let tx = conn.transaction().ctx("starting a delivery transaction")?;
            let n = remove(&tx, seqs, "delivered")?;
            bump(&tx, "restamped", restamped)?;
            bump(&tx, "kept", kept)?;
            note::set(&tx, Note::DatadogLastSuccess, now, "")?;
            note::clear(&tx, Note::DatadogLastError)?;
            tx.commit().ctx("committing a delivery")?;
            Ok(n)
        })
    }

    /// Moves one record to the dead-letter table, kept with the reason, in one transaction.
    pub fn dead_letter(&mut self, seq: i64, reason: &str, now: i64) -> Result<bool, StoreError> {
        self.write(|conn| {
            let tx = conn.transaction().ctx("starting a dead-letter transaction")?;
            let moved = tx
                .execute(
                    "INSERT INTO dead_letter (feed, key, event_time, body, reason, at) \
                     SELECT feed, key, event_time, body, ?2, ?3 FROM queue WHERE seq = ?1",
                    params![seq, reason, now],
                )
                .ctx("copying a dead letter")?;
            if moved == 1 {
                remove(&tx, &[seq], "dead_letters")?;
            }
            tx.commit().ctx("committing a dead letter")?;
            Ok(moved == 1)
        })
    }

    /// `queued_at` of the oldest queued record.
    pub fn oldest_queued_at(&self) -> Result<Option<i64>, StoreError> {
        self.read(|conn| {
            conn.prepare_cached("SELECT queued_at FROM queue ORDER BY seq LIMIT 1")
                .and_then(|mut s| s.query_row([], |r| r.get(0)))
                .optional()
                .ctx("reading the oldest record")
        })
    }
}

/// Adds records to the queue table. The caller bumps `queue_records` and `queue_bytes` in the same transaction
/// (as `remove` does for removals); every insertion into the queue goes through here.
pub(super) struct Insert<'t>(rusqlite::CachedStatement<'t>);

impl<'t> Insert<'t> {
    pub(super) fn new(tx: &'t rusqlite::Transaction) -> Result<Insert<'t>, StoreError> {
        tx.prepare_cached(
            "INSERT INTO queue (feed, key, event_time, queued_at, bytes, body) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )
        .map(Insert)
        .ctx("preparing queue insert")
    }

    /// Queues one record and returns its size.
    pub(super) fn insert(
        &mut self,
        feed: &str,
        key: &str,
        event_time: Option<i64>,
        now: i64,
        body: &str,
    ) -> Result<i64, StoreError> {
        let len = body.len() as i64;
        self.0.execute(params![feed, key, event_time, now, len, body]).ctx("queueing a record")?;
        Ok(len)
    }
}

/// Deletes the oldest records that are not `in_flight` until the queue fits in `max_bytes`, or none is left;
/// returns how many went.
fn drop_oldest(tx: &rusqlite::Transaction, max_bytes: u64, in_flight: &InFlight) -> Result<u64, StoreError> {
    let total = queue_bytes(tx)?;
    let mut excess = total.saturating_sub(i64::try_from(max_bytes).unwrap_or(i64::MAX));
    if excess <= 0 {
        return Ok(0);
    }
    let mut victims = Vec::new();
    {
        let mut oldest = tx.prepare_cached("SELECT seq, feed, bytes FROM queue ORDER BY seq").ctx("preparing drop")?;
        let mut rows = oldest.query([]).ctx("reading the oldest records")?;
        while excess > 0 {
            let Some(row) = rows.next().ctx("reading an old record")? else { break };
            let (seq, bytes): (i64, i64) = (row.get(0).ctx("seq")?, row.get(2).ctx("bytes")?);
            let feed = row.get_ref(1).ctx("feed")?.as_str().ok().and_then(Feed::from_name);
            if in_flight.holds(feed, seq) {
                continue;
            }
            victims.push(seq);
            excess -= bytes;
        }
    }
    remove(tx, &victims, "dropped")
}

/// Deletes queued records and keeps `queue_records` and `queue_bytes` true in the same transaction; `counter`
/// counts why they left (delivered, dead letters, dropped). Every removal from the queue goes through here: one
/// statement for the whole set, whose `RETURNING` gives the count and the bytes that left.
/// The `queue_bytes` counter: what the queued records occupy.
pub(super) fn queue_bytes(conn: &rusqlite::Connection) -> Result<i64, StoreError> {
    conn.prepare_cached("SELECT COALESCE((SELECT value FROM counter WHERE name = 'queue_bytes'), 0)")
        .and_then(|mut s| s.query_row([], |r| r.get(0)))
        .ctx("reading queue bytes")
}

fn remove(tx: &rusqlite::Transaction, seqs: &[i64], counter: &str) -> Result<u64, StoreError> {
    let (mut n, mut bytes) = (0i64, 0i64);
    {
        let mut del = tx
            .prepare_cached("DELETE FROM queue WHERE seq IN (SELECT value FROM json_each(?1)) RETURNING bytes")
            .ctx("preparing delete")?;
        let mut rows = del.query([json_array(seqs)]).ctx("deleting records")?;
        while let Some(row) = rows.next().ctx("deleting a record")? {
            n += 1;
            bytes += row.get::<_, i64>(0).ctx("deleting a record")?;
        }
    }
    bump(tx, "queue_records", -n)?;
    bump(tx, "queue_bytes", -bytes)?;
    bump(tx, counter, n)?;
    Ok(n as u64)
}

/// Sequence numbers as a JSON array, the one parameter of a set-based statement (`json_each`).
fn json_array(seqs: &[i64]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(2 + seqs.len() * 8);
    out.push('[');
    for (i, seq) in seqs.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{seq}");
    }
    out.push(']');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(key: &str, body: &str) -> NewRecord {
        NewRecord { key: key.into(), event_time: Some(100), body: body.into() }
    }

    fn page(records: Vec<NewRecord>, next: Option<&str>) -> PageCommit {
        PageCommit {
            feed: Feed::Dlp,
            window: Window { from: 0, to: 1000 },
            next_token: next.map(str::to_owned),
            records,
            forget_before: -1,
        }
    }

    fn sum_bytes(s: &Store) -> i64 {
        s.conn().query_row("SELECT COALESCE(SUM(bytes), 0) FROM queue", [], |r| r.get(0)).unwrap()
    }

    #[test]
    fn skips_known_keys_and_counts_bytes() {
        let mut s = Store::in_memory();
        s.init_cursor(Feed::Dlp, 0).unwrap();
        let out = s
            .commit_page(
                &page(vec![rec("a", "{}"), rec("b", "{\"x\":1}")], Some("t")),
                1,
                u64::MAX,
                WhenFull::Pause,
                &InFlight::NONE,
            )
            .unwrap();
        assert_eq!(out, PageOutcome { queued: 2, skipped: 0, dropped: 0 });
        let out = s
            .commit_page(
                &page(vec![rec("b", "{\"x\":1}"), rec("c", "[]")], None),
                1,
                u64::MAX,
                WhenFull::Pause,
                &InFlight::NONE,
            )
            .unwrap();
        assert_eq!(out, PageOutcome { queued: 1, skipped: 1, dropped: 0 });
        let c = s.counters().unwrap();
        assert_eq!((c.queue_records, c.queue_bytes), (3, sum_bytes(&s)));
        let cur = s.cursor(Feed::Dlp).unwrap().unwrap();
        assert_eq!((cur.watermark, cur.window), (1000, None));
    }

    #[test]
    fn delivery_and_dead_letters_keep_counters_true() {
        let mut s = Store::in_memory();
        s.init_cursor(Feed::Dlp, 0).unwrap();
        s.commit_page(
            &page(vec![rec("a", "{}"), rec("b", "{\"x\":1}"), rec("c", "[1]")], None),
            1,
            u64::MAX,
            WhenFull::Pause,
            &InFlight::NONE,
        )
        .unwrap();
        let cands = s.candidates(10).unwrap();
        assert_eq!(cands.len(), 1);
        let seqs: Vec<i64> = cands[0].iter().map(|q| q.seq).collect();
        assert!(s.dead_letter(seqs[1], "HTTP 400", 5).unwrap());
        assert_eq!(s.delivered(&seqs, 1, 0, 6).unwrap(), 2);
        let c = s.counters().unwrap();
        assert_eq!((c.queue_records, c.queue_bytes, c.delivered, c.dead_letters, c.restamped), (0, 0, 2, 1, 1));
        assert_eq!(s.note(Note::DatadogLastSuccess).unwrap(), Some((6, String::new())));
    }

    /// Records of three feeds: 5 of DLP, 2 of audit, 4 of TTP URL, each `size` bytes, committed page by page.
    fn three_feeds(size: usize) -> Store {
        let mut s = Store::in_memory();
        for (feed, n) in [(Feed::Dlp, 5), (Feed::Audit, 2), (Feed::TtpUrl, 4)] {
            s.init_cursor(feed, 0).unwrap();
            let recs = (0..n).map(|i| rec(&format!("{}{i}", feed.name()), &"x".repeat(size))).collect();
            s.commit_page(&PageCommit { feed, ..page(recs, None) }, 1, u64::MAX, WhenFull::Pause, &InFlight::NONE)
                .unwrap();
        }
        s
    }

    fn seqs_of(batch: Vec<Queued>) -> Vec<i64> {
        batch.into_iter().map(|q| q.seq).collect()
    }

    #[test]
    fn candidates_within_are_what_fair_order_reaches() {
        use crate::datadog::batch::fair_order;
        let s = three_feeds(10);
        let everything = seqs_of(fair_order(s.candidates(100).unwrap()));
        assert_eq!(everything.len(), 11);
        for max_logs in 0..13 {
            let within = s.candidates_within(max_logs, usize::MAX, |_| i64::MIN).unwrap();
            assert!(within.iter().all(|f| !f.is_empty()), "no empty feed lists");
            let expected = &everything[..max_logs.min(11)];
            assert_eq!(seqs_of(fair_order(within)), expected, "max_logs {max_logs}");
        }
        // By bytes: a record is taken while less than max_bytes is taken, so the one that crosses it comes too.
        for (max_bytes, n) in [(1, 1), (10, 1), (11, 2), (30, 3), (31, 4), (10_000, 11)] {
            let within = s.candidates_within(1000, max_bytes, |_| i64::MIN).unwrap();
            assert_eq!(seqs_of(fair_order(within)), &everything[..n], "max_bytes {max_bytes}");
        }
        let bodies: Vec<String> =
            s.candidates_within(3, usize::MAX, |_| i64::MIN).unwrap().concat().into_iter().map(|q| q.body).collect();
        assert_eq!(bodies, ["x".repeat(10), "x".repeat(10), "x".repeat(10)], "the bodies come with them");
        assert!(Store::in_memory().candidates_within(1000, 1000, |_| i64::MIN).unwrap().is_empty());

        // After what is in flight: each feed's records past its mark, as candidates_after gives them.
        let dlp = s.candidates(100).unwrap().concat().into_iter().find(|q| q.feed == Feed::Dlp).unwrap().seq;
        let mark = |feed| match feed {
            Feed::Dlp => dlp + 1,
            Feed::TtpUrl => i64::MAX,
            _ => i64::MIN,
        };
        let rest = seqs_of(fair_order(s.candidates_after(100, mark).unwrap()));
        assert_eq!(rest.len(), 5, "3 of DLP, 2 of audit, none of TTP URL");
        for max_logs in 0..7 {
            let within = s.candidates_within(max_logs, usize::MAX, mark).unwrap();
            assert_eq!(seqs_of(fair_order(within)), &rest[..max_logs.min(5)], "max_logs {max_logs} after the mark");
        }
    }

    #[test]
    fn load_returns_what_is_still_queued_in_sequence_order() {
        let mut s = three_feeds(3);
        let all = seqs_of(s.candidates(100).unwrap().concat());
        s.delivered(&[all[1]], 0, 0, 2).unwrap();
        let loaded = s.load(&[all[4], all[1], all[0], i64::MAX, all[4]]).unwrap();
        let mut expected = [all[0], all[4]];
        expected.sort_unstable();
        assert_eq!(seqs_of(loaded), expected);
        assert!(s.load(&[]).unwrap().is_empty());
    }

    #[test]
    fn a_set_removal_counts_each_record_once() {
        let mut s = three_feeds(7);
        let all = seqs_of(s.candidates(100).unwrap().concat());
        let picked = [all[0], all[3], all[3], all[9], i64::MAX, -1];
        assert_eq!(s.delivered(&picked, 0, 0, 2).unwrap(), 3);
        let c = s.counters().unwrap();
        assert_eq!((c.queue_records, c.queue_bytes, c.delivered), (8, 56, 3));
        assert_eq!(c.queue_bytes, sum_bytes(&s));
        assert_eq!(s.delivered(&[], 0, 0, 3).unwrap(), 0);
        assert_eq!(s.delivered(&all, 0, 0, 3).unwrap(), 8);
        assert_eq!(s.counters().unwrap().queue_bytes, 0);
    }

    #[test]
    fn drop_oldest_makes_room_and_counts() {
        let mut s = Store::in_memory();
        s.init_cursor(Feed::Dlp, 0).unwrap();
        let body = "x".repeat(100);
        let recs: Vec<_> = (0..10).map(|i| rec(&format!("k{i}"), &body)).collect();
        let out = s.commit_page(&page(recs, None), 1, 450, WhenFull::DropOldest, &InFlight::NONE).unwrap();
        assert_eq!(out.dropped, 6);
        let c = s.counters().unwrap();
        assert_eq!((c.queue_records, c.queue_bytes, c.dropped), (4, 400, 6));
        let left: Vec<String> = s.candidates(10).unwrap()[0].iter().map(|q| q.key.clone()).collect();
        assert_eq!(left, ["k6", "k7", "k8", "k9"]);
    }

    /// `drop-oldest` drops the oldest records that are not in flight (per feed up to a mark, and accepted records
    /// whose removal is to come); when only those are left over the limit, the page is stored all the same and the
    /// queue exceeds the limit by at most them. Every record queued is then delivered, dropped or still queued.
    #[test]
    fn drop_oldest_leaves_the_records_in_flight() {
        let mut s = Store::in_memory();
        let body = "x".repeat(100);
        let recs = |keys: &[&str]| keys.iter().map(|k| rec(k, &body)).collect::<Vec<_>>();
        for (feed, keys) in [(Feed::Dlp, ["d0", "d1", "d2", "d3"]), (Feed::Audit, ["a0", "a1", "a2", "a3"])] {
            s.init_cursor(feed, 0).unwrap();
            let p = PageCommit { feed, ..page(recs(&keys), None) };
            s.commit_page(&p, 1, u64::MAX, WhenFull::DropOldest, &InFlight::NONE).unwrap();
        }
        let seq: std::collections::HashMap<String, i64> =
            s.candidates(10).unwrap().concat().into_iter().map(|q| (q.key, q.seq)).collect();
        // A DLP batch up to d1 is in flight; a2 was accepted and its removal failed.
        let in_flight = InFlight::new(|f| if f == Feed::Dlp { seq["d1"] } else { i64::MIN }, [seq["a2"]]);
        let keys =
            |s: &Store| -> Vec<String> { s.candidates(10).unwrap().concat().into_iter().map(|q| q.key).collect() };

        // 1000 bytes for 450: the six oldest of the others go, d4 (of the new page) among them.
        let out = s.commit_page(&page(recs(&["d4", "d5"]), None), 1, 450, WhenFull::DropOldest, &in_flight).unwrap();
        assert_eq!((out.queued, out.dropped), (2, 6));
        assert_eq!(keys(&s), ["a2", "d0", "d1", "d5"]);

        // Over the limit with only records in flight left to drop: the page is stored, the queue stays over.
        let out = s.commit_page(&page(recs(&["d6"]), None), 1, 250, WhenFull::DropOldest, &in_flight).unwrap();
        assert_eq!((out.queued, out.dropped), (1, 2));
        assert_eq!(keys(&s), ["a2", "d0", "d1"]);
        let c = s.counters().unwrap();
        assert_eq!((c.queue_records, c.queue_bytes, c.dropped), (3, 300, 8));
        assert_eq!(c.queue_bytes, sum_bytes(&s));

        // Their answers come: delivered, as Datadog has them; every record queued is counted once.
        assert_eq!(s.delivered(&[seq["d0"], seq["d1"], seq["a2"]], 0, 0, 2).unwrap(), 3);
        let c = s.counters().unwrap();
        assert_eq!((c.delivered, c.dropped, c.queue_records), (3, 8, 0));
        assert_eq!(c.delivered + c.dropped + c.dead_letters + c.queue_records, 11);

        // Nothing in flight: the oldest go, whatever they are.
        let mut s = three_feeds(100);
        let out = s.commit_page(&page(vec![], None), 1, 300, WhenFull::DropOldest, &InFlight::NONE).unwrap();
        assert_eq!(out.dropped, 8);
    }

    /// A key lives until `forget_before` passes the later of its record's own time and its window's end: a record
    /// whose own time is hours behind the time Mimecast filters it by (the time-zone-lag bug) is returned again by
    /// every window that overlaps its own, and must be skipped by each.
    #[test]
    fn seen_keys_are_forgotten_behind_the_later_of_own_time_and_window_end() {
        // (own time, forget_before of the window that completes next, whether the key is still there after it).
        let check = |event_time: Option<i64>, forget_before: i64, kept: bool| {
            let mut s = Store::in_memory();
            s.init_cursor(Feed::Dlp, 0).unwrap();
            let mut p = page(vec![NewRecord { key: "k".into(), event_time, body: "{}".into() }], None);
            assert_eq!(s.commit_page(&p, 1, u64::MAX, WhenFull::Pause, &InFlight::NONE).unwrap().queued, 1);
            p.forget_before = forget_before;
            p.window = Window { from: 940, to: 2000 };
            let out = s.commit_page(&p, 1, u64::MAX, WhenFull::Pause, &InFlight::NONE).unwrap();
            assert_eq!(out.skipped, 1, "{event_time:?}: the window that forgets still skips it");
            let left: i64 = s.conn().query_row("SELECT COUNT(*) FROM seen WHERE key = 'k'", [], |r| r.get(0)).unwrap();
            assert_eq!(left == 1, kept, "own time {event_time:?}, forget before {forget_before}");
        };
        // The window that returned it ends at 1000.
        for event_time in [Some(10), Some(-30_000), Some(1000), None] {
            check(event_time, 999, true);
            check(event_time, 1000, true);
            check(event_time, 1001, false);
        }
        // An own time after the window's end (a clock ahead) holds it longer.
        check(Some(1500), 1001, true);
        check(Some(1500), 1501, false);
    }
}
