//! Dead letters: logs that Datadog refused one by one, kept with the reason, listed by `dead-letters list` and
//! moved back into the queue by `dead-letters requeue` once the cause is fixed.

use rusqlite::{OptionalExtension, params};

use super::queue::{Insert, bump};
use super::{Context, Store, StoreError};

/// A log that Datadog refused, as kept in the dead-letter table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub id: i64,
    /// The feed's name, as in the config (`audit`, `ttp-url`, …).
    pub feed: String,
    pub key: String,
    pub event_time: Option<i64>,
    /// Why Datadog refused it (status and its answer).
    pub reason: String,
    /// When it was dead-lettered, in Unix seconds.
    pub at: i64,
    /// The size of its body, counted as `queue.bytes` counts it.
    pub bytes: i64,
}

/// What [`Store::requeue`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Requeued {
    /// Dead letters moved back into the queue.
    pub records: u64,
    pub bytes: u64,
    /// Asked-for ids that are not dead letters (never were, or were requeued already), in ascending order. The
    /// ids that were found are requeued all the same.
    pub not_found: Vec<i64>,
}

impl Store {
    /// Every dead letter, by id.
    pub fn dead_letters(&self) -> Result<Vec<DeadLetter>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT id, feed, key, event_time, reason, at, length(CAST(body AS BLOB)) \
                     FROM dead_letter ORDER BY id",
                )
                .ctx("preparing the dead-letter list")?;
            stmt.query_map([], |r| {
                Ok(DeadLetter {
                    id: r.get(0)?,
                    feed: r.get(1)?,
                    key: r.get(2)?,
                    event_time: r.get(3)?,
                    reason: r.get(4)?,
                    at: r.get(5)?,
                    bytes: r.get(6)?,
                })
            })
            .ctx("listing dead letters")?
            .collect::<Result<_, _>>()
            .ctx("reading a dead letter")
        })
    }

    /// Moves the dead letters with these ids (`None`: all of them) back into the queue, queued at `now`, in one
    /// transaction, in id order. The queue's counters grow and `dead_letters` shrinks by the number moved, so
    /// that it stays the current count. Unknown ids do not stop the others; they are returned in
    /// [`Requeued::not_found`].
    pub fn requeue(&mut self, ids: Option<&[i64]>, now: i64) -> Result<Requeued, StoreError> {
        self.write(|conn| {
            let tx = conn.transaction().ctx("starting a requeue transaction")?;
            let ids: Vec<i64> = match ids {
                Some(ids) => {
                    let mut ids = ids.to_vec();
                    ids.sort_unstable();
                    ids.dedup();
                    ids
                }
                None => tx
                    .prepare_cached("SELECT id FROM dead_letter ORDER BY id")
                    .ctx("preparing the dead-letter ids")?
                    .query_map([], |r| r.get(0))
                    .ctx("reading the dead-letter ids")?
                    .collect::<Result<_, _>>()
                    .ctx("reading a dead-letter id")?,
            };
            let mut out = Requeued::default();
            {
                let mut take = tx
                    .prepare_cached("DELETE FROM dead_letter WHERE id = ?1 RETURNING feed, key, event_time, body")
                    .ctx("preparing the dead-letter delete")?;
                let mut queue = Insert::new(&tx)?;
                for id in ids {
                    let row = take
                        .query_row(params![id], |r| {
                            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get(2)?, r.get::<_, String>(3)?))
                        })
                        .optional()
                        .ctx("taking a dead letter")?;
                    match row {
                        Some((feed, key, event_time, body)) => {
                            out.bytes += queue.insert(&feed, &key, event_time, now, &body)? as u64;
                            out.records += 1;
                        }
                        None => out.not_found.push(id),
                    }
                }
            }
            bump(&tx, "queue_records", out.records as i64)?;
            bump(&tx, "queue_bytes", out.bytes as i64)?;
            bump(&tx, "dead_letters", -(out.records as i64))?;
            tx.commit().ctx("committing a requeue")?;
            Ok(out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::WhenFull;
    use crate::mimecast::Feed;
    use crate::mimecast::window::Window;
    use crate::store::{InFlight, NewRecord, PageCommit};

    /// A store with records a, b, c, d of the DLP feed, of which b, c and d are dead letters 1, 2 and 3.
    fn store_with_dead_letters() -> Store {
        let mut s = Store::in_memory();
        s.init_cursor(Feed::Dlp, 0).unwrap();
        let records = ["a", "b", "c", "d"].map(|k| NewRecord {
            key: k.into(),
            event_time: Some(7),
            body: format!("{{\"k\":\"{k}é\"}}"),
        });
        let page = PageCommit {
            feed: Feed::Dlp,
            window: Window { from: 0, to: 10 },
            next_token: None,
            records: records.into(),
            forget_before: 0,
        };
        s.commit_page(&page, 1, u64::MAX, WhenFull::Pause, &InFlight::NONE).unwrap();
        for q in &s.candidates(10).unwrap()[0][1..] {
            assert!(s.dead_letter(q.seq, "HTTP 400: bad", 5).unwrap());
        }
        s
    }

    fn check_counters(s: &Store) {
        let c = s.counters().unwrap();
        let (n, bytes, dead): (i64, i64, i64) = s
            .conn()
            .query_row(
                "SELECT COUNT(*), COALESCE(SUM(bytes), 0), (SELECT COUNT(*) FROM dead_letter) FROM queue",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!((c.queue_records, c.queue_bytes, c.dead_letters), (n, bytes, dead));
    }

    #[test]
    fn lists_dead_letters_with_their_size_in_bytes() {
        let s = store_with_dead_letters();
        let list = s.dead_letters().unwrap();
        assert_eq!(list.iter().map(|d| d.id).collect::<Vec<_>>(), [1, 2, 3]);
        let b = &list[0];
        assert_eq!(
            (b.feed.as_str(), b.key.as_str(), b.event_time, b.reason.as_str(), b.at),
            ("dlp", "b", Some(7), "HTTP 400: bad", 5)
        );
        assert_eq!(b.bytes, "{\"k\":\"bé\"}".len() as i64, "bytes, not characters");
        check_counters(&s);
    }

    #[test]
    fn requeue_moves_back_reports_unknown_ids_and_keeps_counters_true() {
        let mut s = store_with_dead_letters();
        let out = s.requeue(Some(&[3, 99, 3]), 50).unwrap();
        assert_eq!(out, Requeued { records: 1, bytes: "{\"k\":\"dé\"}".len() as u64, not_found: vec![99] });
        check_counters(&s);
        let queued: Vec<String> = s.candidates(10).unwrap()[0].iter().map(|q| q.key.clone()).collect();
        assert_eq!(queued, ["a", "d"], "a requeued record goes to the back of the queue");
        let at: i64 = s.conn().query_row("SELECT queued_at FROM queue WHERE key = 'd'", [], |r| r.get(0)).unwrap();
        assert_eq!(at, 50);

        let out = s.requeue(None, 60).unwrap();
        assert_eq!((out.records, out.not_found.len()), (2, 0));
        check_counters(&s);
        assert!(s.dead_letters().unwrap().is_empty());
        let queued: Vec<String> = s.candidates(10).unwrap()[0].iter().map(|q| q.key.clone()).collect();
        assert_eq!(queued, ["a", "d", "b", "c"]);
        assert_eq!(s.requeue(None, 70).unwrap(), Requeued::default());
        assert_eq!(s.requeue(Some(&[1]), 70).unwrap().not_found, [1]);
    }
}
