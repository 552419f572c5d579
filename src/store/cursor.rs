//! Per-feed cursors: the watermark, the window in progress with its page token, from when on the feed's seen keys
//! are complete, and the feed's health.

use rusqlite::{OptionalExtension, params};

use super::{Context, Store, StoreError};
use crate::mimecast::Feed;
use crate::mimecast::window::Window;

/// A feed's cursor as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// Everything up to here has been read (all pages of every window ending here).
    pub watermark: i64,
    /// The window being read and the token of its next page, when a window is in progress.
    pub window: Option<(Window, Option<String>)>,
    /// The feed's seen keys are complete from this time on: every record that Mimecast returned for a time from
    /// here on and that was queued still has its key (see [`reread_within_keys`]). `None` while no window of the
    /// feed has completed, and in a queue of an earlier build until its feed's next window completes.
    pub keys_since: Option<i64>,
    pub last_success: Option<i64>,
    pub last_error: Option<String>,
    pub last_error_at: Option<i64>,
}

/// The window `planned` after `watermark`, its start moved up to `keys_since` (the cursor's) where it reaches back
/// before it: what must be read so that no record is queued twice because `mimecast.overlap_secs` was raised.
///
/// A completed window forgets the seen keys whose horizon is more than the overlap of its day and an hour behind
/// its end (`seen.rs`). A window planned with a larger overlap, once `overlap_secs` is raised, reaches back before
/// that, into records whose keys are gone: all of them would be queued and delivered again. The store keeps, per
/// feed, the latest time its keys were forgotten before (`keys_since`), and a window starts no earlier than that.
/// Nothing is read less than the smaller overlap read: its windows started an hour after `keys_since` (at the
/// watermark less that overlap), so the window still reaches back an hour further than they did. What Mimecast
/// indexes later than that behind its own time is missed as it was before the raise. The larger overlap is read
/// whole once `watermark - overlap_secs` has passed `keys_since`, which does not move while the keys are forgotten
/// behind the larger overlap: that is `overlap_secs` less the old overlap and an hour after the raise.
///
/// A window that ends before `watermark` (the clock went back: it re-reads the time behind `now - settle_secs`,
/// where records may have come since that time was read by a clock ahead) is left as planned, as is a window in
/// progress: its filter must not change between its pages. The caller is the planner ([`Poller::plan`]), for the
/// windows it plans itself, before it remembers one as its own.
///
/// [`Poller::plan`]: crate::policy::poller::Poller::plan
pub fn reread_within_keys(planned: Window, watermark: i64, keys_since: Option<i64>) -> Window {
    match keys_since {
        Some(since) if planned.to >= watermark && planned.from < since && since < planned.to => {
            Window { from: since, ..planned }
        }
        _ => planned,
    }
}

impl Store {
    /// Creates the cursor of a feed that has none yet, starting at `watermark`.
    pub fn init_cursor(&mut self, feed: Feed, watermark: i64) -> Result<(), StoreError> {
        self.write(|conn| {
            conn.prepare_cached("INSERT OR IGNORE INTO cursor (feed, watermark) VALUES (?1, ?2)")
                .and_then(|mut s| s.execute(params![feed.name(), watermark]))
                .ctx("creating a cursor")?;
            Ok(())
        })
    }

    pub fn cursor(&self, feed: Feed) -> Result<Option<Cursor>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT watermark, window_from, window_to, page_token, last_success, last_error, \
                     last_error_at, keys_since FROM cursor WHERE feed = ?1",
                )
                .ctx("reading a cursor")?;
            stmt.query_row([feed.name()], |r| {
                let from: Option<i64> = r.get(1)?;
                let to: Option<i64> = r.get(2)?;
                let token: Option<String> = r.get(3)?;
                Ok(Cursor {
                    watermark: r.get(0)?,
                    window: from.zip(to).map(|(from, to)| (Window { from, to }, token)),
                    keys_since: r.get(7)?,
                    last_success: r.get(4)?,
                    last_error: r.get(5)?,
                    last_error_at: r.get(6)?,
                })
            })
            .optional()
            .ctx("reading a cursor")
        })
    }

    /// Records a feed's failure for `status`; the cursor itself does not move.
    pub fn feed_error(&mut self, feed: Feed, message: &str, now: i64) -> Result<(), StoreError> {
        self.write(|conn| {
            conn.prepare_cached("UPDATE cursor SET last_error = ?2, last_error_at = ?3 WHERE feed = ?1")
                .and_then(|mut s| s.execute(params![feed.name(), message, now]))
                .ctx("recording a feed error")?;
            Ok(())
        })
    }

    /// Forgets the page token of the window in progress, so the window is read again from its first page.
    pub fn restart_window(&mut self, feed: Feed) -> Result<(), StoreError> {
        self.write(|conn| {
            conn.prepare_cached("UPDATE cursor SET page_token = NULL WHERE feed = ?1")
                .and_then(|mut s| s.execute([feed.name()]))
                .ctx("restarting a window")?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::WhenFull;
    use crate::store::{InFlight, PageCommit};

    #[test]
    fn a_window_reaches_back_no_further_than_the_keys_are_complete() {
        let w = |from, to| Window { from, to };
        let check = |planned: Window, since: Option<i64>, want: Window| {
            let got = reread_within_keys(planned, 10_000, since);
            assert_eq!(got, want, "{planned:?}, watermark 10000, keys since {since:?}");
        };
        // The overlap raised to 9,000 s from 300 s: the keys are complete from 6,100 (10,000 - 300 - 3,600) on.
        check(w(1_000, 10_300), Some(6_100), w(6_100, 10_300));
        // `--once` reads the overlap alone, which ends at the watermark.
        check(w(1_000, 10_000), Some(6_100), w(6_100, 10_000));
        // The overlap does not reach back as far: as planned.
        check(w(9_700, 10_300), Some(6_100), w(9_700, 10_300));
        check(w(6_100, 10_300), Some(6_100), w(6_100, 10_300));
        // Nothing forgotten yet, or by an earlier build: as planned.
        check(w(1_000, 10_300), None, w(1_000, 10_300));
        // The clock went back: the window behind now - settle ends before the watermark and is read whole.
        check(w(1_000, 9_000), Some(6_100), w(1_000, 9_000));
        // A value no window can start at (a damaged row): as planned, never an empty window.
        check(w(1_000, 10_300), Some(10_300), w(1_000, 10_300));
        check(w(1_000, 10_300), Some(i64::MAX), w(1_000, 10_300));
    }

    /// `keys_since` is the latest `forget_before` of a completed window, and that window's own when the watermark
    /// moves back.
    #[test]
    fn keys_are_complete_since_the_latest_forget_before() {
        let mut s = Store::in_memory();
        s.init_cursor(Feed::Dlp, 0).unwrap();
        let mut commit = |from: i64, to: i64, last: bool, forget_before: i64| {
            let next_token = (!last).then(|| "t".to_owned());
            let page =
                PageCommit { feed: Feed::Dlp, window: Window { from, to }, next_token, records: vec![], forget_before };
            s.commit_page(&page, 1, u64::MAX, WhenFull::Pause, &InFlight::NONE).unwrap();
            s.cursor(Feed::Dlp).unwrap().unwrap().keys_since
        };
        assert_eq!(commit(0, 5_000, false, 1_000), None, "a window in progress forgets nothing");
        assert_eq!(commit(0, 5_000, true, 1_000), Some(1_000));
        assert_eq!(commit(4_700, 9_000, true, 5_100), Some(5_100), "overlap 300 s");
        assert_eq!(commit(0, 10_000, true, -3_600), Some(5_100), "overlap raised to 10,000 s: forgets nothing new");
        assert_eq!(commit(6_000, 20_000, true, 6_400), Some(6_400), "the raised overlap moves past it");
        assert_eq!(commit(7_000, 8_000, true, 3_400), Some(3_400), "the clock went back: the watermark moves back");
        assert_eq!(s.cursor(Feed::Dlp).unwrap().unwrap().watermark, 8_000);
        s.init_cursor(Feed::Audit, 0).unwrap();
        assert_eq!(s.cursor(Feed::Audit).unwrap().unwrap().keys_since, None, "a new feed forgot nothing");
    }
}
