//! Per-feed cursors: the watermark, the window in progress with its page token, and the feed's health.

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
    pub last_success: Option<i64>,
    pub last_error: Option<String>,
    pub last_error_at: Option<i64>,
}

impl Store {
    /// Creates the cursor of a feed that has none yet, starting at `watermark`.
    pub fn init_cursor(&mut self, feed: Feed, watermark: i64) -> Result<(), StoreError> {
        self.write(|conn| {
            conn.execute(
                "INSERT OR IGNORE INTO cursor (feed, watermark) VALUES (?1, ?2)",
                params![feed.name(), watermark],
            )
            .ctx("creating a cursor")?;
            Ok(())
        })
    }

    pub fn cursor(&self, feed: Feed) -> Result<Option<Cursor>, StoreError> {
        self.read(|conn| {
            conn.query_row(
                "SELECT watermark, window_from, window_to, page_token, last_success, last_error, last_error_at \
                 FROM cursor WHERE feed = ?1",
                [feed.name()],
                |r| {
                    let from: Option<i64> = r.get(1)?;
                    let to: Option<i64> = r.get(2)?;
                    let token: Option<String> = r.get(3)?;
                    Ok(Cursor {
                        watermark: r.get(0)?,
                        window: from.zip(to).map(|(from, to)| (Window { from, to }, token)),
                        last_success: r.get(4)?,
                        last_error: r.get(5)?,
                        last_error_at: r.get(6)?,
                    })
                },
            )
            .optional()
            .ctx("reading a cursor")
        })
    }

    /// Records a feed's failure for `status`; the cursor itself does not move.
    pub fn feed_error(&mut self, feed: Feed, message: &str, now: i64) -> Result<(), StoreError> {
        self.write(|conn| {
            conn.execute(
                "UPDATE cursor SET last_error = ?2, last_error_at = ?3 WHERE feed = ?1",
                params![feed.name(), message, now],
            )
            .ctx("recording a feed error")?;
            Ok(())
        })
    }

    /// Forgets the page token of the window in progress, so the window is read again from its first page.
    pub fn restart_window(&mut self, feed: Feed) -> Result<(), StoreError> {
        self.write(|conn| {
            conn.execute("UPDATE cursor SET page_token = NULL WHERE feed = ?1", [feed.name()])
                .ctx("restarting a window")?;
            Ok(())
        })
    }
}
