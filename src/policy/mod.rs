//! The agent's policy as pure state machines, in the style of ntpd-rs's `ntp-proto`: events in, actions out, no
//! I/O and no clock of their own. The main loop in [`crate::agent`] reads the clock once per event, feeds the
//! machines what happened, and carries out what they ask for (fetch, commit, send, remove, dead-letter, record an
//! error, wait).
//!
//! - [`poller::Poller`]: which feed is due, which window and page it reads, what a failed page costs (a delay, a
//!   window restart, a give-up in `--once`), when a feed has caught up.
//! - [`sender::Sender`]: when the next batch may go, what each intake answer means (remove, bisect, dead-letter,
//!   hold, back off), a delivered batch whose removal failed, a give-up in `--once`.
//! - [`pressure::Pressure`]: back-pressure from the store (a full queue, a full disk, a locked database).
//!
//! [`next_wake`] and [`pass_over`] combine them. Each machine has table tests: sequences of events at fake instants
//! and the actions expected.

use std::time::{Duration, Instant};

pub mod poller;
pub mod pressure;
pub mod sender;

/// How long the agent runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Run until shut down.
    Daemon,
    /// Poll every feed up to now, drain until empty or refused, stop.
    Once,
}

/// One reading of the clock, taken by the main loop for each event: a monotonic instant for delays and the
/// wall-clock time in Unix seconds for windows and queue times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub at: Instant,
    pub unix: i64,
}

impl Now {
    /// `secs` seconds after `self`, both clocks moved alike (for tests).
    pub fn after(self, d: Duration) -> Now {
        Now { at: self.at + d, unix: self.unix.saturating_add_unsigned(d.as_secs()) }
    }
}

/// The retry rules shared by the machines.
#[derive(Debug, Clone, Copy)]
pub struct Retries {
    pub mode: Mode,
    pub backoff: crate::backoff::Backoff,
    /// The retry interval when an operator must act: refused credentials, a missing permission, a refused key.
    pub slow_retry: Duration,
    /// In `--once` mode, give up after this many consecutive failures.
    pub once_attempts: u32,
    /// The jitter draw in `[0, 1)`: random in the agent, fixed in tests.
    pub jitter: fn() -> f64,
}

impl Retries {
    /// The backoff after `failures` failures in a row, with jitter.
    pub fn backoff(&self, failures: u32) -> Duration {
        self.backoff.delay(failures, (self.jitter)())
    }

    /// Whether a `--once` pass gives up after `failures` failures in a row.
    pub fn gives_up(&self, failures: u32) -> bool {
        self.mode == Mode::Once && failures >= self.once_attempts
    }
}

/// The earliest moment the loop has something to start. Only what could start counts: the poller while no fetch
/// is in flight and the store lets it poll, the sender while no send is in flight. Counting the others would wake
/// the loop at once, again and again, while it can only wait. With nothing to start, the loop wakes in a minute.
pub fn next_wake(now: Instant, poll: Option<Instant>, store_until: Option<Instant>, send: Option<Instant>) -> Instant {
    let poll = poll.map(|p| store_until.map_or(p, |u| p.max(u)));
    poll.into_iter().chain(send).min().unwrap_or(now + Duration::from_secs(60)).max(now)
}

/// What the end of a `--once` pass looks like, with nothing in flight.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PassState {
    /// Every feed finished its pass (caught up, or gave up).
    pub feeds_done: bool,
    /// The sender gave up for this pass.
    pub sender_done: bool,
    /// Nothing is queued and no bisection is pending.
    pub queue_empty: bool,
    /// Polling waits for delivery to make room: the queue is at `max_bytes`, or the disk is full.
    pub waiting_for_room: bool,
    pub disk_full: bool,
}

/// `--once`: whether the pass is over, and whether it ends by giving up on a full disk. Polling that waits for
/// delivery to make room is over too once delivery cannot make any: the intake gave up, or the queue is empty
/// (for a disk, what fills it is not ours, and the pass gives up).
pub fn pass_over(s: PassState) -> (bool, bool) {
    let drained = s.sender_done || s.queue_empty;
    let stuck = s.waiting_for_room && drained;
    ((stuck || s.feeds_done) && drained, stuck && s.disk_full)
}

/// The retry rules of the table tests: exact delays (the ceiling of each backoff), a 300 s slow retry and three
/// attempts in `--once`.
#[cfg(test)]
pub(crate) fn exact_retries(mode: Mode, base_secs: u64, cap_secs: u64) -> Retries {
    Retries {
        mode,
        backoff: crate::backoff::Backoff { base: Duration::from_secs(base_secs), cap: Duration::from_secs(cap_secs) },
        slow_retry: Duration::from_secs(300),
        once_attempts: 3,
        jitter: || 1.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wakes_for_what_can_start_and_never_in_the_past() {
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        // (poll due, store pause until, send due) -> wake
        type Row = (Option<u64>, Option<u64>, Option<u64>, u64);
        let rows: &[Row] = &[
            (Some(5), None, Some(3), 3),
            (Some(5), None, None, 5),
            (Some(5), Some(9), None, 9),
            // The store's pause holds polling, not sending.
            (Some(5), Some(9), Some(7), 7),
            // Due in the past: now, not earlier.
            (Some(0), None, None, 0),
            // Nothing can start: a minute.
            (None, Some(9), None, 60),
        ];
        for &(poll, until, send, want) in rows {
            let now = t0;
            let got = next_wake(now, poll.map(s), until.map(s), send.map(s));
            assert_eq!(got, s(want), "{poll:?} {until:?} {send:?}");
        }
    }

    #[test]
    fn once_ends_when_feeds_are_done_and_the_queue_is_drained_or_refused() {
        let p = PassState::default;
        let rows = [
            (PassState { feeds_done: true, queue_empty: true, ..p() }, (true, false)),
            (PassState { feeds_done: true, sender_done: true, ..p() }, (true, false)),
            // Records still to send, and the sender has not given up: not over.
            (PassState { feeds_done: true, ..p() }, (false, false)),
            (PassState { queue_empty: true, ..p() }, (false, false)),
            // Waiting for room that delivery cannot make: over.
            (PassState { waiting_for_room: true, sender_done: true, ..p() }, (true, false)),
            (PassState { waiting_for_room: true, queue_empty: true, disk_full: true, ..p() }, (true, true)),
            // Waiting for room while delivery can still make it: not over.
            (PassState { waiting_for_room: true, disk_full: true, ..p() }, (false, false)),
        ];
        for (s, want) in rows {
            assert_eq!(pass_over(s), want, "{s:?}");
        }
    }
}
