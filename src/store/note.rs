//! Notes for `status`: the last thing of a kind that happened (Datadog's last success and last error, a full
//! disk), when, and what was said. Each note is one row of the `state` table, its time in its own column.

use rusqlite::{OptionalExtension, params};

use super::{Context, Store, StoreError};

/// The kinds of note. Each is kept once: a new one replaces the last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Note {
    /// Datadog accepted a batch (no message).
    DatadogLastSuccess,
    /// Datadog refused or did not answer; cleared by the next success.
    DatadogLastError,
    /// The queue's filesystem was full; cleared when a page is committed again.
    DiskFull,
}

impl Note {
    /// The row's name in the `state` table.
    fn name(self) -> &'static str {
        match self {
            Note::DatadogLastSuccess => "datadog_last_success",
            Note::DatadogLastError => "datadog_last_error",
            Note::DiskFull => "disk_full",
        }
    }
}

impl Store {
    /// Records that `note` happened at `at` (Unix seconds), saying `message`.
    pub fn set_note(&mut self, note: Note, at: i64, message: &str) -> Result<(), StoreError> {
        self.write(|conn| {
            let tx = conn.transaction().ctx("starting a note transaction")?;
            set(&tx, note, at, message)?;
            tx.commit().ctx("committing a note")
        })
    }

    /// Forgets `note`: what it said is over.
    pub fn clear_note(&mut self, note: Note) -> Result<(), StoreError> {
        self.write(|conn| {
            let tx = conn.transaction().ctx("starting a note transaction")?;
            clear(&tx, note)?;
            tx.commit().ctx("committing a note")
        })
    }

    /// When `note` last happened and what it said, unless it was cleared since.
    pub fn note(&self, note: Note) -> Result<Option<(i64, String)>, StoreError> {
        self.read(|conn| {
            conn.prepare_cached("SELECT at, message FROM state WHERE name = ?1")
                .ctx("preparing a note")?
                .query_row([note.name()], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
                .ctx("reading a note")
        })
    }
}

/// `set_note` within a transaction of the caller's (a delivery notes its success in its own).
pub(super) fn set(tx: &rusqlite::Transaction, note: Note, at: i64, message: &str) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT INTO state (name, at, message) VALUES (?1, ?2, ?3) \
         ON CONFLICT (name) DO UPDATE SET at = ?2, message = ?3",
    )
    .ctx("preparing a note")?
    .execute(params![note.name(), at, message])
    .ctx("writing a note")?;
    Ok(())
}

/// `clear_note` within a transaction of the caller's.
pub(super) fn clear(tx: &rusqlite::Transaction, note: Note) -> Result<(), StoreError> {
    tx.prepare_cached("DELETE FROM state WHERE name = ?1")
        .ctx("preparing a note")?
        .execute([note.name()])
        .ctx("clearing a note")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::InFlight;

    #[test]
    fn notes_keep_their_time_apart_and_the_last_one_wins() {
        let mut s = Store::in_memory();
        assert_eq!(s.note(Note::DiskFull).unwrap(), None);
        s.set_note(Note::DiskFull, 100, "no space left: 3 bytes free").unwrap();
        s.set_note(Note::DatadogLastError, 90, "HTTP 503").unwrap();
        s.set_note(Note::DiskFull, 120, "no space left: 0 bytes free").unwrap();
        assert_eq!(s.note(Note::DiskFull).unwrap(), Some((120, "no space left: 0 bytes free".into())));
        assert_eq!(s.note(Note::DatadogLastError).unwrap(), Some((90, "HTTP 503".into())));
        // A message that starts with a number stays whole: nothing is split off it.
        s.set_note(Note::DatadogLastError, 95, "503 Service Unavailable").unwrap();
        assert_eq!(s.note(Note::DatadogLastError).unwrap(), Some((95, "503 Service Unavailable".into())));
        s.clear_note(Note::DiskFull).unwrap();
        s.clear_note(Note::DiskFull).unwrap();
        assert_eq!(s.note(Note::DiskFull).unwrap(), None);
        assert!(s.note(Note::DatadogLastError).unwrap().is_some(), "only the cleared note went");
    }

    #[test]
    fn a_delivery_notes_its_success_and_ends_the_last_error() {
        use crate::mimecast::{Feed, window::Window};
        use crate::store::{NewRecord, PageCommit};
        let mut s = Store::in_memory();
        s.init_cursor(Feed::Audit, 0).unwrap();
        let page = PageCommit {
            feed: Feed::Audit,
            window: Window { from: 0, to: 1 },
            next_token: None,
            records: vec![NewRecord { key: "k".into(), event_time: None, body: "{}".into() }],
            forget_before: 0,
        };
        s.commit_page(&page, 1, u64::MAX, crate::config::WhenFull::Pause, &InFlight::NONE).unwrap();
        s.set_note(Note::DatadogLastError, 5, "HTTP 503").unwrap();
        let seqs: Vec<i64> = s.candidates(10).unwrap()[0].iter().map(|q| q.seq).collect();
        s.delivered(&seqs, 0, 0, 7).unwrap();
        assert_eq!(s.note(Note::DatadogLastSuccess).unwrap(), Some((7, String::new())));
        assert_eq!(s.note(Note::DatadogLastError).unwrap(), None);
    }
}
