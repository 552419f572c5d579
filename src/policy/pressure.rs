//! Back-pressure from the store: a queue at `max_bytes`, a full disk, a database locked by another process.
//! Pure; the loop measures and reports.
//!
//! Invariants it keeps:
//! - polling waits while the queue is at `max_bytes` (Mimecast keeps the data and no cursor moves) and while the
//!   disk cannot take a page; delivery goes on, since it is what frees space;
//! - a full disk's wait grows with each failure up to the slow retry, and a delivery ends it at once;
//! - a locked database pauses polling and sending alike, with a backoff; it is never an exit;
//! - a full disk met on the send path (a dead letter that did not fit) is a failure of the sender's own, with its
//!   backoff, so the write is not tried again at once; met on the polling path, it leaves delivery alone;
//! - in `--once`, polling gives up after `once_attempts` store failures in a row.

use std::time::{Duration, Instant};

use super::{Now, Retries};
use crate::store::Space;

/// Room for deletes and state lines besides a page; a delivered batch on a full disk is removed in small steps.
pub const MARGIN: u64 = 64 * 1024;

#[derive(Debug, Clone, Copy)]
struct Trouble {
    until: Instant,
    failures: u32,
    disk_full: bool,
}

#[derive(Debug)]
pub struct Pressure {
    retries: Retries,
    trouble: Option<Trouble>,
    /// The queue is at `max_bytes`.
    queue_full: bool,
}

/// What a store failure means for the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pause {
    /// Nothing is polled before this long.
    pub delay: Duration,
    /// The first failure of a run of them: worth an error line; the rest are debug lines.
    pub first: bool,
    /// Store failures in a row so far.
    pub failures: u32,
    /// `--once`: polling gives up for this pass.
    pub give_up: bool,
}

/// A write the store cannot take now, which a wait may cure: the disk is full, or another process holds the
/// database's lock past the busy timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreFault {
    DiskFull,
    Busy,
}

/// Which of the loop's paths met the store fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Measuring the queue, starting a fetch, committing a page, ending a `--once` pass.
    Polling,
    /// Loading, dead-lettering or removing a batch.
    Sending,
}

/// What the sender does about a store fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SenderPause {
    /// Nothing: delivery goes on, since it is what frees space.
    None,
    /// A failure of its own, with its backoff: a write that did not fit is not tried again at once.
    Failed,
    /// No send starts before then: the send path shares the locked database.
    Until(Instant),
}

/// What the loop does about a store error that a wait may cure ([`Pressure::on_store_error`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reaction {
    /// Polling's pause.
    pub pause: Pause,
    /// Fold the WAL into the database first: something else filled the disk, and the WAL may hold space that a
    /// checkpoint gives back.
    pub checkpoint: bool,
    pub sender: SenderPause,
}

impl Pressure {
    pub fn new(retries: Retries) -> Pressure {
        Pressure { retries, trouble: None, queue_full: false }
    }

    pub fn reconfigure(&mut self, retries: Retries) {
        self.retries = retries;
    }

    /// Whether a fetch may start now.
    pub fn may_poll(&self, now: Now) -> bool {
        !self.queue_full && self.trouble.is_none_or(|t| t.until <= now.at)
    }

    /// Polling waits for room: the queue is full or the disk is.
    pub fn waiting_for_room(&self) -> bool {
        self.queue_full || self.disk_full()
    }

    pub fn queue_full(&self) -> bool {
        self.queue_full
    }

    pub fn disk_full(&self) -> bool {
        self.trouble.is_some_and(|t| t.disk_full)
    }

    /// Polling waits until then for the store.
    pub fn until(&self) -> Option<Instant> {
        self.trouble.map(|t| t.until)
    }

    /// The queue's size against `max_bytes`. Returns `Some(full)` when that changed (for the log line).
    pub fn on_queue_size(&mut self, full: bool) -> Option<bool> {
        (full != std::mem::replace(&mut self.queue_full, full)).then_some(full)
    }

    /// The database is locked by another process: polling and sending pause with a backoff.
    pub fn on_busy(&mut self, now: Now) -> Pause {
        let first = self.trouble.is_none();
        let t = self.trouble.get_or_insert(Trouble { until: now.at, failures: 0, disk_full: false });
        t.failures += 1;
        let delay = self.retries.backoff(t.failures);
        t.until = now.at + delay;
        Pause { delay, first, failures: t.failures, give_up: self.retries.gives_up(t.failures) }
    }

    /// The disk cannot take a page: polling waits until a delivery frees space, or the wait passes. An empty
    /// queue has no delivery to end it, so the wait itself grows, up to the slow retry.
    pub fn on_disk_full(&mut self, now: Now) -> Pause {
        let first = !self.disk_full();
        let t = self.trouble.get_or_insert(Trouble { until: now.at, failures: 0, disk_full: true });
        t.failures += 1;
        t.disk_full = true;
        let delay = self.retries.backoff.ceiling(t.failures).min(self.retries.slow_retry);
        t.until = now.at + delay;
        Pause { delay, first, failures: t.failures, give_up: self.retries.gives_up(t.failures) }
    }

    /// A store write failed with `fault` on the loop's `side`: polling pauses ([`Pressure::on_disk_full`],
    /// [`Pressure::on_busy`]), and the sender fails or waits as the fault asks.
    pub fn on_store_error(&mut self, now: Now, fault: StoreFault, side: Side) -> Reaction {
        match fault {
            StoreFault::DiskFull => {
                let sender = match side {
                    Side::Sending => SenderPause::Failed,
                    Side::Polling => SenderPause::None,
                };
                Reaction { pause: self.on_disk_full(now), checkpoint: true, sender }
            }
            StoreFault::Busy => {
                let pause = self.on_busy(now);
                Reaction { pause, checkpoint: false, sender: SenderPause::Until(now.at + pause.delay) }
            }
        }
    }

    /// A page was committed: the store's trouble is over. Says whether there was any.
    pub fn on_page_committed(&mut self) -> bool {
        self.trouble.take().is_some()
    }

    /// A delivered batch was removed: space was freed (polling may try again at once), or the lock is gone.
    pub fn on_delivered(&mut self, now: Now) {
        match &mut self.trouble {
            Some(t) if t.disk_full => t.until = now.at,
            _ => self.trouble = None,
        }
    }
}

/// Whether the next page fits on the queue's filesystem, and what to try first if not. A page first grows the
/// WAL, then, at a checkpoint, the database file (less what it reuses of free pages); a checkpoint may need as
/// much new space as the WAL holds. `page` is the most WAL a page commit has taken so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Room {
    Fits,
    /// Fold the WAL into the database while the free space can still take it, then measure again.
    Checkpoint,
    /// Give this many bytes of free pages inside the file back to the filesystem, then measure again.
    Release(u64),
    /// No room: the bytes the next page may need.
    Full {
        need: u64,
    },
}

/// The next step towards room for a page, given the space now and what was already tried.
pub fn room(space: Space, page: u64, checkpointed: bool, released: bool) -> Room {
    let Some(free) = space.fs_free else { return Room::Fits };
    let need = space.wal + page + page.saturating_sub(space.reusable) + MARGIN;
    if free >= need {
        Room::Fits
    } else if space.wal > 0 && !checkpointed {
        Room::Checkpoint
    } else if space.reusable > 0 && !released {
        // Moving a page costs a WAL frame: release a step the free space can take.
        Room::Release((free / 2).min(space.reusable))
    } else {
        Room::Full { need }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Mode;

    fn retries(mode: Mode) -> Retries {
        crate::policy::exact_retries(mode, 2, 600)
    }

    fn now() -> Now {
        Now { at: Instant::now(), unix: 0 }
    }

    #[test]
    fn a_full_disk_waits_longer_each_time_up_to_the_slow_retry_and_a_delivery_ends_the_wait() {
        let mut p = Pressure::new(retries(Mode::Daemon));
        let t = now();
        let delays: Vec<(u64, bool)> =
            (0..10).map(|_| p.on_disk_full(t)).map(|x| (x.delay.as_secs(), x.first)).collect();
        assert_eq!(
            delays,
            [
                (2, true),
                (4, false),
                (8, false),
                (16, false),
                (32, false),
                (64, false),
                (128, false),
                (256, false),
                (300, false),
                (300, false)
            ]
        );
        assert!(!p.may_poll(t) && p.waiting_for_room());
        p.on_delivered(t);
        assert!(p.may_poll(t), "a delivery frees space: poll again at once");
        assert!(p.disk_full(), "until a page fits, the disk counts as full");
        assert!(p.on_page_committed());
        assert!(!p.disk_full() && !p.on_page_committed());
    }

    #[test]
    fn a_locked_database_backs_off_and_once_gives_up() {
        let mut p = Pressure::new(retries(Mode::Once));
        let t = now();
        let pauses: Vec<Pause> = (0..3).map(|_| p.on_busy(t)).collect();
        assert_eq!(pauses.iter().map(|x| x.delay.as_secs()).collect::<Vec<_>>(), [2, 4, 8]);
        assert_eq!(pauses.iter().map(|x| x.give_up).collect::<Vec<_>>(), [false, false, true]);
        assert!(!p.may_poll(t) && p.may_poll(t.after(Duration::from_secs(8))));
        // A delivery means the lock is gone.
        p.on_delivered(t);
        assert!(p.may_poll(t) && p.until().is_none());
    }

    #[test]
    fn a_store_error_pauses_polling_and_fails_or_holds_the_sender_by_its_kind() {
        use Side::{Polling, Sending};
        use StoreFault::{Busy, DiskFull};
        let t = now();
        let at = |secs| t.at + Duration::from_secs(secs);
        // Store errors in a row, and for each: (polling's pause in seconds, checkpoint first, the sender's part,
        // first of a run, `--once` gives up). Mimecast's backoff here: 2 s doubling, to a 300 s slow retry.
        type Row<'a> = (Mode, &'a [(StoreFault, Side)], &'a [(u64, bool, SenderPause, bool, bool)]);
        let rows: &[Row<'_>] = &[
            // A lock holds the sender for polling's pause, whichever path met it.
            (Mode::Daemon, &[(Busy, Polling)], &[(2, false, SenderPause::Until(at(2)), true, false)]),
            (Mode::Daemon, &[(Busy, Sending)], &[(2, false, SenderPause::Until(at(2)), true, false)]),
            // A full disk checkpoints first; only a write of the send path counts against the sender.
            (Mode::Daemon, &[(DiskFull, Polling)], &[(2, true, SenderPause::None, true, false)]),
            (Mode::Daemon, &[(DiskFull, Sending)], &[(2, true, SenderPause::Failed, true, false)]),
            // The pause grows with the failures in a row, whatever their kind; a full disk after a lock is news.
            (
                Mode::Daemon,
                &[(Busy, Polling), (Busy, Sending), (DiskFull, Polling)],
                &[
                    (2, false, SenderPause::Until(at(2)), true, false),
                    (4, false, SenderPause::Until(at(4)), false, false),
                    (8, true, SenderPause::None, true, false),
                ],
            ),
            // `--once` gives polling up after three.
            (
                Mode::Once,
                &[(DiskFull, Polling), (Busy, Polling), (Busy, Sending)],
                &[
                    (2, true, SenderPause::None, true, false),
                    (4, false, SenderPause::Until(at(4)), false, false),
                    (8, false, SenderPause::Until(at(8)), false, true),
                ],
            ),
        ];
        for (mode, events, want) in rows {
            let mut p = Pressure::new(retries(*mode));
            let got: Vec<_> = events
                .iter()
                .map(|&(fault, side)| p.on_store_error(t, fault, side))
                .map(|r| (r.pause.delay.as_secs(), r.checkpoint, r.sender, r.pause.first, r.pause.give_up))
                .collect();
            assert_eq!(got, *want, "{mode:?} {events:?}");
            let (last, _) = events[events.len() - 1];
            assert!(!p.may_poll(t), "{events:?}");
            assert_eq!(p.disk_full(), events.iter().any(|&(k, _)| k == DiskFull), "{events:?}");
            if last == Busy {
                // Only a lock's pause ends by itself; a full disk's also ends at a delivery.
                assert!(p.may_poll(t.after(Duration::from_secs(want[want.len() - 1].0))), "{events:?}");
            }
        }
    }

    #[test]
    fn a_full_queue_holds_polling_until_it_drains() {
        let mut p = Pressure::new(retries(Mode::Daemon));
        let t = now();
        assert_eq!(p.on_queue_size(false), None);
        assert_eq!(p.on_queue_size(true), Some(true));
        assert_eq!(p.on_queue_size(true), None);
        assert!(!p.may_poll(t) && p.waiting_for_room() && !p.disk_full());
        assert_eq!(p.on_queue_size(false), Some(false));
        assert!(p.may_poll(t));
    }

    #[test]
    fn room_checkpoints_then_releases_then_reports_the_need() {
        let s = |fs_free: Option<u64>, reusable: u64, wal: u64| Space { fs_free, reusable, wal };
        const P: u64 = 100_000;
        let rows = [
            (s(None, 0, 0), false, false, Room::Fits),
            (s(Some(10_000_000), 0, 0), false, false, Room::Fits),
            // Reusable pages inside the file lower the need.
            (s(Some(P + MARGIN), P, 0), false, false, Room::Fits),
            (s(Some(P), 0, 50_000), false, false, Room::Checkpoint),
            (s(Some(P), 80_000, 50_000), true, false, Room::Release(50_000)),
            (s(Some(P), 80_000, 50_000), true, true, Room::Full { need: 50_000 + P + 20_000 + MARGIN }),
            (s(Some(0), 0, 0), false, false, Room::Full { need: 2 * P + MARGIN }),
        ];
        for (space, checkpointed, released, want) in rows {
            assert_eq!(room(space, P, checkpointed, released), want, "{space:?} {checkpointed} {released}");
        }
    }
}
