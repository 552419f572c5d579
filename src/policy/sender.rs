//! The sender: when the next batch may go and what each intake answer means. Pure; the loop loads, packs,
//! sends and removes.
//!
//! Events: [`Sender::next`] (what to do now), [`Sender::on_answer`] (the intake answered a batch),
//! [`Sender::on_removed`] / [`Sender::on_remove_failed`] (the store removed a delivered batch, or could not),
//! [`Sender::on_nothing_sent`] (nothing to send), [`Sender::failed`] and [`Sender::wait_until`] (the store
//! failed under the send path). Invariants it keeps:
//! - a batch is removed only on Datadog's answer (a 202 with a JSON object: [`disposition`]);
//! - at most `max_in_flight` batches are in flight, so a crash sends at most that many again; a new batch takes
//!   only records after those in flight (per feed), so no record is in two requests at once; the pieces of a
//!   bisection go one at a time, with nothing else in flight, so each answer is compared with those next to it;
//! - a delivered batch whose removal failed is removed before anything else is sent, so it is not sent twice;
//! - every failure sets a delay before the next send (the backoff, at least the server's `Retry-After`, or the
//!   slow retry for a refused key); the only sends at once follow a success, a refused piece or a dead letter,
//!   and each of those makes progress (a removal, a piece fewer to send, a record set aside), so no loop spins
//!   in place;
//! - a refused piece of several logs is split again (400 or 413), no deeper than one log, and a log is
//!   dead-lettered only as [`Bisection`] proves it bad: refused next to a log the intake accepted. Pieces shrink
//!   at every step, so a batch of n logs costs at most 2n - 1 requests (and one more per log a hold set aside);
//!   an intake that refuses everything holds within log2(n) + 3 of them, and at least as often after;
//! - after a 413 on a request within the payload limit, new batches are packed under half that request's size
//!   ([`Sender::payload_limit`]) for an hour, so that a proxy's body limit is paid for once, not by every batch;
//! - in `--once`, the sender gives up after `once_attempts` failures in a row, or at once on a refused key; sends
//!   in flight that fail together are one failure (see [`Sender::on_answer`]), for that count and the backoff.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::{Mode, Now, Retries};
use crate::datadog::batch::MAX_PAYLOAD_BYTES;
use crate::datadog::bisect::{Bisection, Half, Held, Piece, Verdict};
use crate::datadog::disposition::{Disposition, Refusal, disposition};
use crate::datadog::sink::Sent;
use crate::mimecast::Feed;

/// How long a payload limit learnt from a 413 holds. A proxy's body limit is configuration and rarely changes, so
/// learning it again costs a few refused requests an hour (a batch split down to a size that passes), while a
/// limit that was raised, or a guess that was too low (half a refused request), is given up within the hour.
pub const LEARNT_LIMIT_HOLDS: Duration = Duration::from_secs(3600);

/// A batch: sent, in flight, or delivered and waiting for its removal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub seqs: Vec<i64>,
    /// Late records sent with a new timestamp, and sent unchanged, for the counters.
    pub restamped: i64,
    pub kept: i64,
    /// The payload's size in bytes (the JSON array, before gzip).
    pub bytes: usize,
    /// Where the batch stands in a bisection of a refused one.
    pub half: Half,
    /// The highest sequence number of each feed in the batch.
    pub last: Vec<(Feed, i64)>,
}

/// What the loop does next for the sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Remove this delivered batch from the queue (a removal that failed before), then report it.
    Remove(Batch),
    /// Load and send this piece of a refused batch (if its records are gone, ask again).
    Piece(Piece),
    /// Load and send the oldest records, fairly across feeds.
    Fresh,
}

/// What the loop must do after an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Datadog has the batch: remove it from the queue, then report [`Sender::on_removed`] or
    /// [`Sender::on_remove_failed`].
    Remove(Batch),
    /// Keep these records in the dead-letter table with this reason.
    DeadLetter { seqs: Vec<i64>, reason: String },
    /// Keep this error for `status`.
    RecordError(String),
}

/// The sender's settings.
#[derive(Debug, Clone, Copy)]
pub struct SenderSettings {
    pub retries: Retries,
    /// How long an empty queue waits before it is looked at again (a page commit wakes it sooner).
    pub idle: Duration,
    /// How often a busy drain logs its summary line.
    pub summary_every: Duration,
    /// Batches in flight at most (`datadog.sends_in_flight`).
    pub max_in_flight: usize,
}

/// What a reload changed on the way to the intake; the loop compares the config it had with the new one and
/// passes this to [`Sender::on_new_intake`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IntakeChange {
    /// `datadog.api_key`: a refused key may have been fixed.
    pub key: bool,
    /// `datadog.intake_url` (which `datadog.site` sets), or the HTTP settings (`http.proxy`, `http.ca_file`,
    /// `http.timeout_secs`): another way to the intake, which may answer where the old one failed, and may take
    /// more or less in one request.
    pub route: bool,
}

/// A drain summary to log: records delivered over a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub delivered: u64,
    pub elapsed: Duration,
}

#[derive(Debug)]
pub struct Sender {
    s: SenderSettings,
    due: Option<Instant>,
    /// Failures in a row: the backoff's exponent, and what `--once` counts.
    failures: u32,
    /// Send failures recorded so far, never reset: a send started when fewer were recorded was in flight when the
    /// last one was, and its failure is the same attempt's.
    send_failures: u64,
    /// The first record of each send in flight, and `send_failures` when it started.
    started: HashMap<i64, u64>,
    /// Pieces of a refused batch (413, or 400 to isolate a bad log), sent before anything new.
    bisection: Bisection,
    /// `--once`: gave up for this pass.
    done: bool,
    /// Batches Datadog accepted whose removal from the queue failed (disk full, database locked).
    undeleted: Vec<Batch>,
    in_flight: usize,
    /// Everything left to send is in flight: nothing starts until an answer comes or a page queues more.
    starved: bool,
    /// The highest sequence number of each feed sent since nothing was last in flight: a new batch takes records
    /// after these only.
    sent_up_to: HashMap<Feed, i64>,
    delivered_since: u64,
    since: Option<Instant>,
    /// The intake's last word was a refusal that needs an operator (401/403, a wrong URL), and nothing was
    /// accepted since: for the agent's health report.
    refused: bool,
    /// A payload limit below Datadog's, learnt from a 413, and until when it holds.
    learnt: Option<(usize, Instant)>,
    /// The answer of the last refused piece: the reason of a single log it proves bad once its sibling passes.
    last_refusal: String,
}

impl Sender {
    /// Due at once.
    pub fn new(s: SenderSettings, now: Now) -> Sender {
        Sender {
            s,
            due: Some(now.at),
            failures: 0,
            send_failures: 0,
            started: HashMap::new(),
            bisection: Bisection::default(),
            done: false,
            undeleted: Vec::new(),
            in_flight: 0,
            starved: false,
            sent_up_to: HashMap::new(),
            delivered_since: 0,
            since: None,
            refused: false,
            learnt: None,
            last_refusal: String::new(),
        }
    }

    /// SIGHUP: new settings. The sender keeps its wait, its failures in a row and the payload limit it learnt:
    /// they are what the intake answered, and these settings (sends in flight, idle look, summaries, the backoff's
    /// rules) do not change the intake. Retrying at once on every reload sent a request per reload to an intake
    /// answering 401, and reset its backoff. A new key or a new way to the intake is [`Sender::on_new_intake`].
    pub fn reconfigure(&mut self, s: SenderSettings, _now: Now) {
        self.s = s;
    }

    /// A reload changed the API key or the way to the intake: what the sender learnt of the old ones no longer
    /// holds. The wait ends now and the failures in a row count from nothing again (a refused key may have been
    /// fixed; another URL or proxy may answer), and a bisection's run ends, as after a wait: the new intake's
    /// answers do not judge the logs the old one refused. Another way to the intake also forgets the payload limit
    /// learnt from a 413 (a proxy's body limit); a new key keeps it. Nothing changed: nothing happens.
    pub fn on_new_intake(&mut self, change: IntakeChange, now: Now) {
        if change == IntakeChange::default() {
            return;
        }
        self.due = Some(now.at);
        self.failures = 0;
        self.bisection.interrupt();
        if change.route {
            self.learnt = None;
        }
    }

    /// The most payload bytes a new batch may hold: Datadog's 5 MB, or less for [`LEARNT_LIMIT_HOLDS`] after a 413
    /// on a request within the limit showed that the way to the intake takes less (a proxy's body limit). A log
    /// larger than the limit still goes, with one more log (see [`crate::datadog::batch::Packer`]).
    pub fn payload_limit(&self, now: Now) -> usize {
        match self.learnt {
            Some((bytes, until)) if now.at < until => bytes,
            _ => MAX_PAYLOAD_BYTES,
        }
    }

    /// What to do now, if anything: `None` while waiting, when given up, while `max_in_flight` batches are in
    /// flight, or while a bisection waits for the answers in flight.
    pub fn next(&mut self, now: Now) -> Option<Next> {
        if self.done || self.due.is_none_or(|d| d > now.at) {
            return None;
        }
        if let Some(b) = self.undeleted.pop() {
            return Some(Next::Remove(b));
        }
        if self.blocked() {
            return None;
        }
        Some(self.bisection.next_piece().map_or(Next::Fresh, Next::Piece))
    }

    /// The loop sent this batch.
    pub fn on_sending(&mut self, b: &Batch) {
        self.in_flight += 1;
        if let Some(&first) = b.seqs.first() {
            self.started.insert(first, self.send_failures);
        }
        for &(feed, seq) in &b.last {
            let up_to = self.sent_up_to.entry(feed).or_insert(seq);
            *up_to = (*up_to).max(seq);
        }
    }

    /// A new batch takes this feed's records after this sequence number only (those up to it may be in flight).
    pub fn sent_up_to(&self, feed: Feed) -> i64 {
        self.sent_up_to.get(&feed).copied().unwrap_or(i64::MIN)
    }

    /// Batches in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// When the sender next has something to start: nothing while the batches in flight are all it may have.
    pub fn next_wake(&self) -> Option<Instant> {
        self.due.filter(|_| !self.done && (!self.blocked() || !self.undeleted.is_empty()))
    }

    /// Only an answer in flight can let the next batch start.
    fn blocked(&self) -> bool {
        self.in_flight >= self.s.max_in_flight || (self.in_flight > 0 && (self.starved || self.bisection.is_active()))
    }

    /// `--once`: gave up for this pass.
    pub fn done(&self) -> bool {
        self.done
    }

    /// The intake refuses the key or the URL (an operator must act) and has accepted nothing since.
    pub fn refused(&self) -> bool {
        self.refused
    }

    /// Pieces of a refused batch are still waiting.
    pub fn is_bisecting(&self) -> bool {
        self.bisection.is_active()
    }

    /// Delivered records waiting for their removal (for the shutdown warning).
    pub fn undeleted(&self) -> usize {
        self.undeleted.iter().map(|b| b.seqs.len()).sum()
    }

    /// The sequence numbers of those records (`drop-oldest` must leave them).
    pub fn undeleted_seqs(&self) -> impl Iterator<Item = i64> + '_ {
        self.undeleted.iter().flat_map(|b| b.seqs.iter().copied())
    }

    /// A page queued records: send them now, unless the sender is backing off.
    pub fn on_queued(&mut self, now: Now) {
        self.starved = false;
        if self.failures == 0 && self.due.is_none_or(|d| d > now.at) {
            self.due = Some(now.at);
        }
    }

    /// Nothing was sent: every candidate went to dead letters (look again at once), everything queued is in
    /// flight (wait for an answer), or the queue is empty (look again after `idle`, or when a page queues
    /// something). An empty queue ends a drain: its summary.
    pub fn on_nothing_sent(&mut self, now: Now, had_records: bool) -> Option<Summary> {
        if had_records {
            self.wait_until(now.at);
            return None;
        }
        if self.in_flight > 0 {
            self.starved = true;
            return None;
        }
        self.due = Some(now.at + self.s.idle);
        self.summary(now, true)
    }

    /// The intake answered a batch. A failure of a send that was started before the last send failure was
    /// recorded is that same failure: sends in flight together fail together (a network blip), and counting each
    /// as an attempt would give `--once` up after one blip with `once_attempts` sends in flight.
    pub fn on_answer(&mut self, now: Now, b: Batch, sent: &Sent) -> Vec<Action> {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.starved = false;
        // Sent before the last failure was recorded: if it failed, it failed with that one.
        let with_last = b.seqs.first().and_then(|s| self.started.remove(s)).is_some_and(|n| n < self.send_failures);
        if self.in_flight == 0 {
            self.sent_up_to.clear();
            self.started.clear();
        }
        match disposition(sent.answer, b.seqs.len()) {
            Disposition::Delete => {
                self.refused = false;
                // The refused first half of this pair: its sibling is accepted, so the fault is in it.
                let proven_bad = self.bisection.accepted(b.half);
                let mut actions = vec![Action::Remove(b)];
                if !proven_bad.is_empty() {
                    let detail =
                        format!("{} (on its own, while the rest of its batch was accepted)", self.last_refusal);
                    actions.push(self.dead_letters(now, proven_bad, &detail));
                }
                actions
            }
            Disposition::Split(refusal) | Disposition::DeadLetter(refusal) => {
                self.on_refused(now, b, sent, refusal, with_last)
            }
            Disposition::Hold => {
                self.bisection.put_back(Piece { seqs: b.seqs, half: b.half });
                if !with_last {
                    self.send_failures += 1;
                    self.failures += 1;
                }
                self.refused = true;
                let msg = format!(
                    "Datadog refused the API key or the intake URL ({}); every record stays queued; fix \
                     datadog.api_key or datadog.site/intake_url; retrying in {}s",
                    sent.detail,
                    self.s.retries.slow_retry.as_secs()
                );
                log::error!("{msg}");
                self.due = Some(now.at + self.s.retries.slow_retry);
                if self.s.retries.mode == Mode::Once {
                    self.done = true;
                }
                vec![Action::RecordError(msg)]
            }
            Disposition::Retry(after) => {
                self.bisection.put_back(Piece { seqs: b.seqs, half: b.half });
                let delay = self.send_failed(now, with_last, after.unwrap_or_default());
                log::warn!(
                    "Datadog intake: {}; attempt {} failed{}, retrying in {:.1}s; records stay queued",
                    sent.detail,
                    self.failures,
                    if with_last { " (a send in flight with it)" } else { "" },
                    delay.as_secs_f64()
                );
                vec![Action::RecordError(sent.detail.clone())]
            }
        }
    }

    /// Datadog refused a batch or a piece with 400 or 413: the bisection says what that means, and a 413 on a
    /// request within the payload limit lowers the limit for new batches.
    fn on_refused(&mut self, now: Now, b: Batch, sent: &Sent, refusal: Refusal, with_last: bool) -> Vec<Action> {
        let (n, bytes) = (b.seqs.len(), b.bytes);
        self.last_refusal.clone_from(&sent.detail);
        // A request refused as too large within the limit shows that the way to the intake takes less. One over
        // it (packed before the limit was lowered, or a log over the limit with its companion) says nothing new.
        let learnt = (refusal == Refusal::TooLarge && n > 1 && bytes <= self.payload_limit(now)).then(|| {
            let limit = bytes.div_ceil(2);
            self.learnt = Some((limit, now.at + LEARNT_LIMIT_HOLDS));
            limit
        });
        match self.bisection.refused(Piece { seqs: b.seqs, half: b.half }, refusal) {
            Verdict::DeadLetters(seqs) => vec![self.dead_letters(now, seqs, &sent.detail)],
            Verdict::Continue => {
                if let Some(limit) = learnt {
                    log::warn!(
                        "Datadog refused {n} logs ({bytes} bytes) as too large ({}); sending them in two halves, and \
                         new batches under {limit} bytes for the next {} min (a proxy's body size limit?)",
                        sent.detail,
                        LEARNT_LIMIT_HOLDS.as_secs() / 60
                    );
                } else if n > 1 {
                    log::warn!("Datadog refused {n} logs ({}); sending them in two halves", sent.detail);
                }
                self.wait_until(now.at);
                Vec::new()
            }
            Verdict::Hold(held) => {
                let delay = self.send_failed(now, with_last, Duration::ZERO);
                let why = match (held, refusal) {
                    (Held::Lone, Refusal::TooLarge) => format!(
                        "Datadog refused a single log of {bytes} bytes as too large ({}): the intake, or a proxy in \
                         front of it (nginx's client_max_body_size?), takes less than this log; it stays queued and is \
                         not dead-lettered (there is no other log to compare it with)",
                        sent.detail
                    ),
                    (Held::Lone, Refusal::Malformed) => format!(
                        "Datadog refused a batch of a single log ({}); there is no other log to compare it with, so it \
                         stays queued and is not dead-lettered",
                        sent.detail
                    ),
                    (Held::Refusing, Refusal::TooLarge) => format!(
                        "Datadog refused single logs as too large and accepted nothing since ({}): the intake, or a \
                         proxy in front of it (nginx's client_max_body_size?), takes less than one log; the records \
                         stay queued, none is dead-lettered",
                        sent.detail
                    ),
                    (Held::Refusing, Refusal::Malformed) => format!(
                        "Datadog refused a single log and the pieces sent after it alike ({}), accepting nothing: the \
                         fault is not in one log (a proxy or an intake change?); the records stay queued, none is \
                         dead-lettered",
                        sent.detail
                    ),
                    (Held::Unjudged, _) => format!(
                        "Datadog refused the last logs of a split batch ({}) and accepted nothing since the last \
                         wait; there is no other log to compare them with, so they stay queued and are not \
                         dead-lettered",
                        sent.detail
                    ),
                };
                let msg = format!("{why}; retrying in {:.0}s", delay.as_secs_f64());
                log::error!("{msg}");
                vec![Action::RecordError(msg)]
            }
        }
    }

    fn dead_letters(&mut self, now: Now, seqs: Vec<i64>, detail: &str) -> Action {
        self.wait_until(now.at);
        Action::DeadLetter { seqs, reason: format!("Datadog refused this log: {detail}") }
    }

    /// A delivered batch is out of the queue: the next goes at once, unless a wait asked for by another answer
    /// is still running. Returns a drain summary when one is due.
    pub fn on_removed(&mut self, now: Now, removed: u64) -> Option<Summary> {
        self.failures = 0;
        self.wait_until(now.at);
        self.delivered_since += removed;
        self.since.get_or_insert(now.at);
        self.summary(now, false)
    }

    /// A delivered batch could not be removed (disk full, database locked): it is removed before anything else
    /// is sent, after a backoff. Returns the delay, for the log line.
    pub fn on_remove_failed(&mut self, now: Now, b: Batch) -> Duration {
        self.undeleted.push(b);
        self.failed(now, Duration::ZERO)
    }

    /// A send failed. One started before the last send failure was recorded (`with_last`) failed with it, in the
    /// same attempt: it waits as long, but neither grows the backoff nor counts towards `--once` giving up.
    /// Returns the wait.
    fn send_failed(&mut self, now: Now, with_last: bool, at_least: Duration) -> Duration {
        if !with_last {
            self.send_failures += 1;
            return self.failed(now, at_least);
        }
        let delay = at_least.max(self.s.retries.backoff(self.failures.max(1)));
        self.wait_until(now.at + delay);
        delay
    }

    /// The sender failed again (an answer, or the store under the send path): it waits the backoff, and at least
    /// `at_least`; a `--once` pass gives up after `once_attempts` failures in a row. Returns the wait.
    pub fn failed(&mut self, now: Now, at_least: Duration) -> Duration {
        self.failures += 1;
        let delay = at_least.max(self.s.retries.backoff(self.failures));
        self.wait_until(now.at + delay);
        if self.s.retries.gives_up(self.failures) && !self.done {
            // A failure here may be the queue's (a removal the lock refused), not the intake's: say both.
            let unremoved: usize = self.undeleted.iter().map(|b| b.seqs.len()).sum();
            let again = if unremoved > 0 {
                format!(
                    "; {unremoved} records Datadog accepted could not be removed from the queue and will be sent again \
                     by the next pass"
                )
            } else {
                String::new()
            };
            log::error!("delivery: giving up for this pass after {} failures in a row{again}", self.failures);
            self.done = true;
        }
        delay
    }

    /// The sender starts nothing before `until`; a later wait already set stands.
    pub fn wait_until(&mut self, until: Instant) {
        self.due = Some(self.due.map_or(until, |d| d.max(until)));
    }

    /// One summary per drain: when the queue runs empty, or every `summary_every` while it is busy.
    fn summary(&mut self, now: Now, emptied: bool) -> Option<Summary> {
        let elapsed = now.at.saturating_duration_since(self.since?);
        if !emptied && elapsed < self.s.summary_every {
            return None;
        }
        self.since = None;
        Some(Summary { delivered: std::mem::take(&mut self.delivered_since), elapsed })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datadog::batch::Packer;
    use crate::datadog::disposition::Answer;

    fn settings(mode: Mode) -> SenderSettings {
        SenderSettings {
            retries: crate::policy::exact_retries(mode, 1, 120),
            idle: Duration::from_secs(60),
            summary_every: Duration::from_secs(60),
            max_in_flight: 1,
        }
    }

    /// One event of a table row.
    #[derive(Debug, Clone, Copy)]
    enum Ev {
        Wait(u64),
        /// The intake answers the batch the sender asked for with this status (`Retry-After` in seconds).
        Answer(u16, Option<u64>),
        /// A proxy that refuses with 413 a payload of more than this many bytes, in front of an intake that
        /// accepts it (202) otherwise.
        Proxy(usize),
        /// An intake that refuses with 400 a payload holding any of these logs ("poison" logs), and accepts (202)
        /// the others.
        Poison(&'static [i64]),
        /// No HTTP answer at all.
        Dropped,
        /// The store fails to remove a delivered batch.
        RemoveFails,
        /// SIGHUP: the same settings read again.
        Reload,
        /// SIGHUP with a new API key, or a new way to the intake.
        NewIntake(IntakeChange),
    }

    /// What a row saw: the batch or piece sent (its seqs), the action kinds, and the delay until the next send
    /// (`None`: given up).
    #[derive(Debug, PartialEq, Eq)]
    struct Seen {
        sent: Vec<i64>,
        actions: Vec<&'static str>,
        next_in: Option<u64>,
    }

    /// Each log's size in the payload, unless a test sets another ([`Rig::sizes`]).
    const LOG: usize = 100;

    /// A queue of records `1..=n`, as the store would hold them.
    struct Rig {
        s: Sender,
        now: Now,
        queue: Vec<i64>,
        dead: Vec<i64>,
        remove_fails: bool,
        /// Logs of another size than [`LOG`].
        sizes: HashMap<i64, usize>,
    }

    impl Rig {
        fn new(mode: Mode, n: i64) -> Rig {
            let now = Now { at: Instant::now(), unix: 1_800_000_000 };
            Rig {
                s: Sender::new(settings(mode), now),
                now,
                queue: (1..=n).collect(),
                dead: Vec::new(),
                remove_fails: false,
                sizes: HashMap::new(),
            }
        }

        fn size(&self, seq: i64) -> usize {
            self.sizes.get(&seq).copied().unwrap_or(LOG)
        }

        /// A batch of these records, its payload's bytes as [`crate::datadog::batch::payload`] makes them.
        fn made(&self, seqs: Vec<i64>, half: Half) -> Batch {
            let bytes = 1 + seqs.iter().map(|&s| self.size(s) + 1).sum::<usize>();
            Batch { seqs, restamped: 0, kept: 0, bytes, half, last: Vec::new() }
        }

        /// What the loop would send now, or `None`.
        fn batch(&mut self) -> Option<Batch> {
            loop {
                match self.s.next(self.now)? {
                    Next::Remove(b) => {
                        self.remove(b);
                        continue;
                    }
                    Next::Piece(p) => {
                        let seqs: Vec<i64> = p.seqs.into_iter().filter(|s| self.queue.contains(s)).collect();
                        if !seqs.is_empty() {
                            return Some(self.made(seqs, p.half));
                        }
                    }
                    Next::Fresh => {
                        // Packed as the loop packs: under the sender's payload limit.
                        let mut packer = Packer::within(self.s.payload_limit(self.now));
                        let seqs: Vec<i64> =
                            self.queue.iter().copied().take_while(|&s| packer.try_add(self.size(s))).collect();
                        if seqs.is_empty() {
                            self.s.on_nothing_sent(self.now, false);
                            return None;
                        }
                        return Some(self.made(seqs, Half::Whole));
                    }
                }
            }
        }

        fn remove(&mut self, b: Batch) {
            if std::mem::take(&mut self.remove_fails) {
                self.s.on_remove_failed(self.now, b);
            } else {
                self.queue.retain(|s| !b.seqs.contains(s));
                self.s.on_removed(self.now, b.seqs.len() as u64);
            }
        }

        fn step(&mut self, ev: Ev) -> Seen {
            match ev {
                Ev::Wait(s) => {
                    self.now = self.now.after(Duration::from_secs(s));
                    return Seen { sent: vec![], actions: vec![], next_in: self.next_in() };
                }
                Ev::RemoveFails => {
                    self.remove_fails = true;
                    return Seen { sent: vec![], actions: vec![], next_in: self.next_in() };
                }
                Ev::Reload => {
                    self.s.reconfigure(settings(Mode::Daemon), self.now);
                    return Seen { sent: vec![], actions: vec![], next_in: self.next_in() };
                }
                Ev::NewIntake(change) => {
                    self.s.reconfigure(settings(Mode::Daemon), self.now);
                    self.s.on_new_intake(change, self.now);
                    return Seen { sent: vec![], actions: vec![], next_in: self.next_in() };
                }
                Ev::Answer(..) | Ev::Proxy(_) | Ev::Poison(_) | Ev::Dropped => {}
            }
            let b = self.batch().expect("the sender must be ready to send");
            let answer = match ev {
                Ev::Answer(code, after) => Answer::Status { code, retry_after: after.map(Duration::from_secs) },
                Ev::Proxy(max) => Answer::Status { code: if b.bytes > max { 413 } else { 202 }, retry_after: None },
                Ev::Poison(bad) => {
                    let code = if b.seqs.iter().any(|s| bad.contains(s)) { 400 } else { 202 };
                    Answer::Status { code, retry_after: None }
                }
                _ => Answer::NoAnswer,
            };
            self.s.on_sending(&b);
            let seqs = b.seqs.clone();
            let actions = self.s.on_answer(self.now, b, &Sent { answer, detail: "detail".into() });
            let mut kinds = Vec::new();
            for a in actions {
                kinds.push(match a {
                    Action::Remove(b) => {
                        self.remove(b);
                        "remove"
                    }
                    Action::DeadLetter { seqs, .. } => {
                        self.queue.retain(|s| !seqs.contains(s));
                        self.dead.extend(seqs);
                        "dead-letter"
                    }
                    Action::RecordError(_) => "error",
                });
            }
            Seen { sent: seqs, actions: kinds, next_in: self.next_in() }
        }

        fn next_in(&self) -> Option<u64> {
            self.s.next_wake().map(|d| d.saturating_duration_since(self.now.at).as_secs())
        }
    }

    fn check(mode: Mode, n: i64, rows: &[(Ev, Seen)]) -> Rig {
        let mut rig = Rig::new(mode, n);
        for (i, (ev, want)) in rows.iter().enumerate() {
            assert_eq!(&rig.step(*ev), want, "row {i}: {ev:?}");
        }
        rig
    }

    fn seen(sent: &[i64], actions: &[&'static str], next_in: Option<u64>) -> Seen {
        Seen { sent: sent.to_vec(), actions: actions.to_vec(), next_in }
    }

    const ALL4: &[i64] = &[1, 2, 3, 4];

    #[test]
    fn accepted_batches_are_removed_and_the_next_goes_at_once() {
        let rig = check(Mode::Daemon, 4, &[(Ev::Answer(202, None), seen(ALL4, &["remove"], Some(0)))]);
        assert!(rig.queue.is_empty());
    }

    #[test]
    fn a_429_then_success() {
        check(
            Mode::Daemon,
            4,
            &[
                // Retry-After longer than the backoff wins.
                (Ev::Answer(429, Some(30)), seen(ALL4, &["error"], Some(30))),
                (Ev::Wait(30), seen(&[], &[], Some(0))),
                // The backoff (second failure: 2 s) when longer than Retry-After.
                (Ev::Answer(503, Some(1)), seen(ALL4, &["error"], Some(2))),
                (Ev::Wait(2), seen(&[], &[], Some(0))),
                (Ev::Dropped, seen(ALL4, &["error"], Some(4))),
                (Ev::Wait(4), seen(&[], &[], Some(0))),
                (Ev::Answer(202, None), seen(ALL4, &["remove"], Some(0))),
            ],
        );
    }

    #[test]
    fn a_captive_portals_200_is_not_a_delivery() {
        let rig = check(Mode::Daemon, 4, &[(Ev::Answer(200, None), seen(ALL4, &["error"], Some(1)))]);
        assert_eq!(rig.queue.len(), 4);
    }

    #[test]
    fn a_refused_key_holds_everything_and_retries_slowly() {
        let mut rig = check(Mode::Daemon, 4, &[(Ev::Answer(403, None), seen(ALL4, &["error"], Some(300)))]);
        assert_eq!(rig.queue.len(), 4);
        assert!(!rig.s.done());
        // The health report says so until the intake accepts something; a transient failure does not clear it.
        assert!(rig.s.refused());
        let rows = [
            (Ev::Wait(300), seen(&[], &[], Some(0))),
            (Ev::Answer(503, None), seen(ALL4, &["error"], Some(2))),
            (Ev::Wait(2), seen(&[], &[], Some(0))),
        ];
        for (i, (ev, want)) in rows.into_iter().enumerate() {
            assert_eq!(rig.step(ev), want, "row {i}: {ev:?}");
        }
        assert!(rig.s.refused());
        assert_eq!(rig.step(Ev::Answer(202, None)), seen(ALL4, &["remove"], Some(0)));
        assert!(!rig.s.refused());
        // In --once, a refused key ends the pass at once.
        let rig = check(Mode::Once, 4, &[(Ev::Answer(401, None), seen(ALL4, &["error"], None))]);
        assert!(rig.s.done());
    }

    #[test]
    fn a_reload_keeps_the_wait_the_failures_and_the_learnt_limit() {
        // An intake answering 401: a reload (SIGHUP) does not cut the slow retry short, however many come.
        let mut rows = vec![(Ev::Answer(401, None), seen(ALL4, &["error"], Some(300)))];
        for _ in 0..100 {
            rows.push((Ev::Reload, seen(&[], &[], Some(300))));
        }
        rows.extend([
            (Ev::Wait(100), seen(&[], &[], Some(200))),
            (Ev::Reload, seen(&[], &[], Some(200))),
            (Ev::Wait(200), seen(&[], &[], Some(0))),
            // Nor a backoff, and the failures in a row stay counted: the next one waits the third backoff, 4 s.
            (Ev::Answer(503, None), seen(ALL4, &["error"], Some(2))),
            (Ev::Reload, seen(&[], &[], Some(2))),
            (Ev::Wait(2), seen(&[], &[], Some(0))),
            (Ev::Answer(503, None), seen(ALL4, &["error"], Some(4))),
            (Ev::Wait(4), seen(&[], &[], Some(0))),
            // A payload limit learnt from a 413 stays too.
            (Ev::Proxy(203), seen(ALL4, &[], Some(0))),
            (Ev::Reload, seen(&[], &[], Some(0))),
            (Ev::Proxy(203), seen(&[1, 2], &["remove"], Some(0))),
            (Ev::Proxy(203), seen(&[3, 4], &["remove"], Some(0))),
            (Ev::Reload, seen(&[], &[], Some(0))),
        ]);
        let mut rig = check(Mode::Daemon, 4, &rows);
        assert_eq!(rig.s.payload_limit(rig.now), 203);
        // New records after the reload are packed under it, and pass.
        rig.queue.extend(5..=8);
        rig.s.on_queued(rig.now);
        assert_eq!(rig.step(Ev::Proxy(203)), seen(&[5, 6], &["remove"], Some(0)));
    }

    #[test]
    fn a_new_key_or_way_to_the_intake_is_tried_at_once_and_counts_failures_afresh() {
        const KEY: IntakeChange = IntakeChange { key: true, route: false };
        const ROUTE: IntakeChange = IntakeChange { key: false, route: true };
        let mut rig = check(
            Mode::Daemon,
            4,
            &[
                (Ev::Answer(401, None), seen(ALL4, &["error"], Some(300))),
                // Nothing changed about the intake: the wait stands.
                (Ev::NewIntake(IntakeChange::default()), seen(&[], &[], Some(300))),
                // A new key may be the fix: tried at once.
                (Ev::NewIntake(KEY), seen(&[], &[], Some(0))),
                (Ev::Answer(503, None), seen(ALL4, &["error"], Some(1))),
                (Ev::Wait(1), seen(&[], &[], Some(0))),
                (Ev::Answer(503, None), seen(ALL4, &["error"], Some(2))),
                // Another URL or proxy: tried at once, and its failures count from the first.
                (Ev::NewIntake(ROUTE), seen(&[], &[], Some(0))),
                (Ev::Answer(503, None), seen(ALL4, &["error"], Some(1))),
                (Ev::Wait(1), seen(&[], &[], Some(0))),
                // A limit learnt from a 413 is kept for a new key, forgotten for a new way.
                (Ev::Proxy(203), seen(ALL4, &[], Some(0))),
            ],
        );
        assert_eq!(rig.step(Ev::NewIntake(KEY)), seen(&[], &[], Some(0)));
        assert_eq!(rig.s.payload_limit(rig.now), 203);
        assert_eq!(rig.step(Ev::NewIntake(ROUTE)), seen(&[], &[], Some(0)));
        assert_eq!(rig.s.payload_limit(rig.now), MAX_PAYLOAD_BYTES);
        // The new intake's answers do not judge a log the old one refused: it is sent to the new one again.
        let rig = check(
            Mode::Daemon,
            4,
            &[
                (Ev::Answer(400, None), seen(ALL4, &[], Some(0))),
                (Ev::Answer(400, None), seen(&[1, 2], &[], Some(0))),
                (Ev::Answer(400, None), seen(&[1], &[], Some(0))),
                (Ev::NewIntake(ROUTE), seen(&[], &[], Some(0))),
                (Ev::Answer(202, None), seen(&[2], &["remove"], Some(0))),
                (Ev::Answer(202, None), seen(&[1], &["remove"], Some(0))),
                (Ev::Answer(202, None), seen(&[3, 4], &["remove"], Some(0))),
            ],
        );
        assert!(rig.dead.is_empty() && rig.queue.is_empty());
    }

    #[test]
    fn a_400_isolates_the_bad_log_and_sends_the_rest() {
        // Records 1..4; record 3 is refused wherever it goes.
        let rig = check(
            Mode::Daemon,
            4,
            &[
                (Ev::Answer(400, None), seen(ALL4, &[], Some(0))),
                (Ev::Answer(202, None), seen(&[1, 2], &["remove"], Some(0))),
                (Ev::Answer(400, None), seen(&[3, 4], &[], Some(0))),
                (Ev::Answer(400, None), seen(&[3], &[], Some(0))),
                // Its sibling is accepted: 3 is proven bad.
                (Ev::Answer(202, None), seen(&[4], &["remove", "dead-letter"], Some(0))),
            ],
        );
        assert!(rig.queue.is_empty());
        assert_eq!(rig.dead, [3]);
    }

    #[test]
    fn a_log_refused_as_the_second_half_after_its_sibling_was_accepted_is_a_dead_letter() {
        // Records 1..4; record 4 is refused wherever it goes.
        let rig = check(
            Mode::Daemon,
            4,
            &[
                (Ev::Answer(400, None), seen(ALL4, &[], Some(0))),
                (Ev::Answer(202, None), seen(&[1, 2], &["remove"], Some(0))),
                (Ev::Answer(400, None), seen(&[3, 4], &[], Some(0))),
                (Ev::Answer(202, None), seen(&[3], &["remove"], Some(0))),
                (Ev::Answer(400, None), seen(&[4], &["dead-letter"], Some(0))),
            ],
        );
        assert!(rig.queue.is_empty());
        assert_eq!(rig.dead, [4]);
        assert!(!rig.s.is_bisecting());
    }

    #[test]
    fn poison_logs_in_both_halves_are_dead_letters_and_the_rest_is_delivered() {
        // Records 1..8; 2 and 7 are refused wherever they go, one in each half: both halves are refused, and each
        // refused piece is split again, down to single logs. None of it holds, even in --once.
        const BAD: &[i64] = &[2, 7];
        let rig = check(
            Mode::Once,
            8,
            &[
                (Ev::Poison(BAD), seen(&[1, 2, 3, 4, 5, 6, 7, 8], &[], Some(0))),
                (Ev::Poison(BAD), seen(&[1, 2, 3, 4], &[], Some(0))),
                (Ev::Poison(BAD), seen(&[1, 2], &[], Some(0))),
                (Ev::Poison(BAD), seen(&[1], &["remove"], Some(0))),
                // Refused right after the log before it passed: a dead letter.
                (Ev::Poison(BAD), seen(&[2], &["dead-letter"], Some(0))),
                (Ev::Poison(BAD), seen(&[3, 4], &["remove"], Some(0))),
                (Ev::Poison(BAD), seen(&[5, 6, 7, 8], &[], Some(0))),
                (Ev::Poison(BAD), seen(&[5, 6], &["remove"], Some(0))),
                (Ev::Poison(BAD), seen(&[7, 8], &[], Some(0))),
                (Ev::Poison(BAD), seen(&[7], &[], Some(0))),
                // Refused, then the log after it passed: a dead letter too.
                (Ev::Poison(BAD), seen(&[8], &["remove", "dead-letter"], Some(0))),
            ],
        );
        assert!(rig.queue.is_empty() && !rig.s.done());
        assert_eq!(rig.dead, BAD);
    }

    #[test]
    fn one_log_in_a_hundred_refused_stops_nothing_even_in_once() {
        // 5000 records (five batches of 1000), one in a hundred refused wherever it goes, two of them side by side
        // (2060, 2061) and three (3037..=3039): every good record delivered in one --once pass, every bad one a
        // dead letter, each batch of n logs in at most 2n - 1 requests and one more per log set aside, and a
        // single hold, for the three in a row (a single log and the two pieces after it refused).
        const N: i64 = 5000;
        let bad: &'static [i64] =
            Vec::leak((1..=N).filter(|s| s % 100 == 37 || [2060, 2061, 3038, 3039].contains(s)).collect::<Vec<i64>>());
        let mut rig = Rig::new(Mode::Once, N);
        let (mut requests, mut holds) = (0, 0);
        while !rig.queue.is_empty() {
            let s = rig.step(Ev::Poison(bad));
            requests += 1;
            match s.next_in {
                Some(0) => {}
                Some(wait) => {
                    holds += 1;
                    rig.step(Ev::Wait(wait));
                }
                None => panic!("request {requests}: gave up: {s:?}"),
            }
            assert!(requests < 2 * N, "{requests} requests");
        }
        assert_eq!(holds, 1);
        rig.dead.sort();
        assert_eq!(rig.dead, bad);
    }

    #[test]
    fn candidates_that_all_went_to_dead_letters_are_followed_by_a_look_at_once() {
        let mut rig = Rig::new(Mode::Daemon, 0);
        assert_eq!(rig.s.on_nothing_sent(rig.now, true), None);
        assert_eq!(rig.next_in(), Some(0));
    }

    #[test]
    fn a_400_whose_halves_both_fail_holds_and_backs_off_without_dead_letters() {
        let rig = check(
            Mode::Daemon,
            4,
            &[
                (Ev::Answer(400, None), seen(ALL4, &[], Some(0))),
                (Ev::Answer(400, None), seen(&[1, 2], &[], Some(0))),
                (Ev::Answer(400, None), seen(&[1], &[], Some(0))),
                (Ev::Answer(400, None), seen(&[2], &[], Some(0))),
                // A single log and the two pieces after it refused, nothing accepted: not one bad log. Hold, back off.
                (Ev::Answer(400, None), seen(&[3, 4], &["error"], Some(1))),
                (Ev::Wait(1), seen(&[], &[], Some(0))),
                // The last logs, refused with nothing accepted since the wait: held again, the backoff grows, still
                // no dead letter.
                (Ev::Answer(400, None), seen(&[3], &[], Some(0))),
                (Ev::Answer(400, None), seen(&[4], &["error"], Some(2))),
                (Ev::Wait(2), seen(&[], &[], Some(0))),
                // The bisection is over: the batch goes again whole once the wait is over.
                (Ev::Answer(400, None), seen(ALL4, &[], Some(0))),
            ],
        );
        assert!(rig.dead.is_empty());
        assert_eq!(rig.queue.len(), 4);
    }

    #[test]
    fn a_413_on_a_single_log_is_held_not_dead_lettered_and_not_looped() {
        let rig = check(
            Mode::Daemon,
            1,
            &[
                (Ev::Answer(413, None), seen(&[1], &["error"], Some(1))),
                (Ev::Wait(1), seen(&[], &[], Some(0))),
                (Ev::Answer(413, None), seen(&[1], &["error"], Some(2))),
            ],
        );
        assert!(rig.dead.is_empty());
    }

    #[test]
    fn a_split_never_goes_deeper_than_one_log() {
        // An intake that refuses everything: every piece is smaller than the last, and the run of sends at once
        // ends at single logs with a hold (a delay), never an endless split. With 413 too, where halves that are
        // still too large are split again: the first half goes first, so single logs come in log2 steps.
        for code in [400, 413] {
            let mut rig = Rig::new(Mode::Daemon, 1000);
            let (mut at_once, mut holds) = (0, 0);
            for _ in 0..300 {
                let s = rig.step(Ev::Answer(code, None));
                assert!(!s.sent.is_empty());
                match s.next_in {
                    Some(0) => {
                        at_once += 1;
                        assert!(at_once < 25, "{code}: a split that does not end");
                    }
                    Some(delay) => {
                        (at_once, holds) = (0, holds + 1);
                        rig.step(Ev::Wait(delay));
                    }
                    None => panic!("{code}: a daemon never gives up"),
                }
            }
            assert!(rig.dead.is_empty(), "{code}: nothing proves a log bad");
            assert!(holds > 300 / 25, "{code}: {holds} holds");
        }
    }

    #[test]
    fn a_413_splits_again_until_the_pieces_pass_and_later_batches_are_packed_under_them() {
        // Logs of 100 bytes: a payload of two is 203 bytes, of four 405, of eight 809. A proxy takes two.
        let mut rig = check(
            Mode::Daemon,
            8,
            &[
                // 809 bytes refused within the 5 MB limit: new batches go under 405 bytes.
                (Ev::Answer(413, None), seen(&[1, 2, 3, 4, 5, 6, 7, 8], &[], Some(0))),
                // Both halves are refused too: split again, no hold. 405 bytes refused within 405: under 203.
                (Ev::Answer(413, None), seen(&[1, 2, 3, 4], &[], Some(0))),
                (Ev::Answer(202, None), seen(&[1, 2], &["remove"], Some(0))),
                (Ev::Answer(202, None), seen(&[3, 4], &["remove"], Some(0))),
                (Ev::Answer(413, None), seen(&[5, 6, 7, 8], &[], Some(0))),
                (Ev::Answer(202, None), seen(&[5, 6], &["remove"], Some(0))),
                (Ev::Answer(202, None), seen(&[7, 8], &["remove"], Some(0))),
            ],
        );
        assert!(rig.queue.is_empty() && rig.dead.is_empty());
        assert_eq!(rig.s.payload_limit(rig.now), 203);
        // New records go two at a time, and are not split again.
        rig.queue.extend(9..=14);
        rig.s.on_queued(rig.now);
        for pair in [[9, 10], [11, 12], [13, 14]] {
            assert_eq!(rig.step(Ev::Proxy(203)), seen(&pair, &["remove"], Some(0)));
        }
        // An hour later the limit is gone: the next batch is packed to Datadog's size, and the proxy teaches it again.
        rig.step(Ev::Wait(LEARNT_LIMIT_HOLDS.as_secs() - 1));
        assert_eq!(rig.s.payload_limit(rig.now), 203);
        rig.step(Ev::Wait(1));
        assert_eq!(rig.s.payload_limit(rig.now), MAX_PAYLOAD_BYTES);
        rig.queue.extend(15..=18);
        assert_eq!(rig.step(Ev::Proxy(203)), seen(&[15, 16, 17, 18], &[], Some(0)));
        assert_eq!(rig.s.payload_limit(rig.now), 203);
        // A reload keeps it; another intake URL or proxy forgets it: the way to the intake may take more.
        rig.s.reconfigure(settings(Mode::Daemon), rig.now);
        assert_eq!(rig.s.payload_limit(rig.now), 203);
        rig.s.on_new_intake(IntakeChange { key: false, route: true }, rig.now);
        assert_eq!(rig.s.payload_limit(rig.now), MAX_PAYLOAD_BYTES);
    }

    #[test]
    fn under_a_proxy_limit_only_the_first_batch_is_split() {
        // 3000 logs of 100 bytes behind a proxy that takes three (304 bytes): no hold, no dead letter, each log
        // once, at most two requests per log, and of the fresh batches only the first is refused.
        let mut rig = Rig::new(Mode::Daemon, 3000);
        let (mut requests, mut fresh_refused) = (0, 0);
        while !rig.queue.is_empty() {
            let fresh = !rig.s.is_bisecting();
            let s = rig.step(Ev::Proxy(304));
            requests += 1;
            assert_eq!(s.next_in, Some(0), "request {requests}: {s:?}");
            if fresh && s.actions.is_empty() {
                fresh_refused += 1;
            }
            assert!(requests < 2 * 3000, "{requests} requests");
        }
        assert!(rig.dead.is_empty());
        assert_eq!(fresh_refused, 1);
        let limit = rig.s.payload_limit(rig.now);
        assert!((203..=304).contains(&limit), "a limit of {limit} bytes: two or three logs");
    }

    #[test]
    fn a_log_over_the_learnt_limit_goes_with_another_and_is_proven_too_large() {
        // Learn a limit of 203 bytes (two logs of 100), then a log of 300 bytes that the proxy never takes.
        let mut rig = Rig::new(Mode::Daemon, 4);
        rig.step(Ev::Proxy(250));
        while !rig.queue.is_empty() {
            rig.step(Ev::Proxy(250));
        }
        assert_eq!(rig.s.payload_limit(rig.now), 203);
        rig.queue.extend(5..=7);
        rig.sizes.insert(5, 300);
        rig.s.on_queued(rig.now);
        // Alone it would be held with nothing to compare it with, batch after batch. With its companion: refused
        // (over the limit, which stays), split, refused on its own while its sibling passes: a dead letter.
        assert_eq!(rig.step(Ev::Proxy(250)), seen(&[5, 6], &[], Some(0)));
        assert_eq!(rig.s.payload_limit(rig.now), 203, "a request over the limit teaches nothing");
        assert_eq!(rig.step(Ev::Proxy(250)), seen(&[5], &[], Some(0)));
        assert_eq!(rig.step(Ev::Proxy(250)), seen(&[6], &["remove", "dead-letter"], Some(0)));
        assert_eq!(rig.step(Ev::Proxy(250)), seen(&[7], &["remove"], Some(0)));
        assert_eq!(rig.dead, [5]);
    }

    #[test]
    fn a_lone_log_refused_as_too_large_says_so() {
        let (mut s, now) = several(1);
        s.next(now);
        let mut b = batch(1..=1);
        b.bytes = 700_000;
        s.on_sending(&b);
        let actions = s.on_answer(
            now,
            b,
            &Sent { answer: Answer::Status { code: 413, retry_after: None }, detail: "HTTP 413: too large".into() },
        );
        let [Action::RecordError(msg)] = &actions[..] else { panic!("{actions:?}") };
        assert!(msg.contains("single log of 700000 bytes as too large (HTTP 413: too large)"), "{msg}");
        assert!(
            msg.contains("stays queued") && msg.contains("retrying in 1s") && !msg.contains("both halves"),
            "{msg}"
        );
        assert_eq!(s.payload_limit(now), MAX_PAYLOAD_BYTES, "one log refused teaches nothing about batches");
    }

    #[test]
    fn a_400_inside_a_413_split_is_still_isolated() {
        // Records 1..8, two logs a request at most; record 6 is refused with 400 wherever it goes.
        let rig = check(
            Mode::Daemon,
            8,
            &[
                (Ev::Answer(413, None), seen(&[1, 2, 3, 4, 5, 6, 7, 8], &[], Some(0))),
                (Ev::Answer(413, None), seen(&[1, 2, 3, 4], &[], Some(0))),
                (Ev::Answer(202, None), seen(&[1, 2], &["remove"], Some(0))),
                (Ev::Answer(202, None), seen(&[3, 4], &["remove"], Some(0))),
                (Ev::Answer(413, None), seen(&[5, 6, 7, 8], &[], Some(0))),
                // Small enough for the proxy, but the intake finds a bad log: bisect it as for any 400.
                (Ev::Answer(400, None), seen(&[5, 6], &[], Some(0))),
                (Ev::Answer(202, None), seen(&[5], &["remove"], Some(0))),
                (Ev::Answer(400, None), seen(&[6], &["dead-letter"], Some(0))),
                (Ev::Answer(202, None), seen(&[7, 8], &["remove"], Some(0))),
            ],
        );
        assert!(rig.queue.is_empty());
        assert_eq!(rig.dead, [6]);
    }

    #[test]
    fn a_413_beside_a_400_splits_and_a_413_whose_pieces_all_get_400_holds() {
        // Records 1..8; the first half gets 400, the second 413: each is split again (a 413 says nothing of the
        // logs), and nothing holds.
        let rig = check(
            Mode::Daemon,
            8,
            &[
                (Ev::Answer(400, None), seen(&[1, 2, 3, 4, 5, 6, 7, 8], &[], Some(0))),
                (Ev::Answer(400, None), seen(&[1, 2, 3, 4], &[], Some(0))),
                // The first half's pieces: one bad log in 1..4.
                (Ev::Answer(202, None), seen(&[1, 2], &["remove"], Some(0))),
                (Ev::Answer(400, None), seen(&[3, 4], &[], Some(0))),
                (Ev::Answer(202, None), seen(&[3], &["remove"], Some(0))),
                (Ev::Answer(400, None), seen(&[4], &["dead-letter"], Some(0))),
                (Ev::Answer(413, None), seen(&[5, 6, 7, 8], &[], Some(0))),
                (Ev::Answer(202, None), seen(&[5, 6], &["remove"], Some(0))),
                (Ev::Answer(202, None), seen(&[7, 8], &["remove"], Some(0))),
            ],
        );
        assert_eq!(rig.dead, [4]);
        // A batch too large whose pieces are all refused with 400, down to a single log and the two pieces after
        // it: hold, no dead letter.
        let rig = check(
            Mode::Daemon,
            8,
            &[
                (Ev::Answer(413, None), seen(&[1, 2, 3, 4, 5, 6, 7, 8], &[], Some(0))),
                (Ev::Answer(400, None), seen(&[1, 2, 3, 4], &[], Some(0))),
                (Ev::Answer(400, None), seen(&[1, 2], &[], Some(0))),
                (Ev::Answer(400, None), seen(&[1], &[], Some(0))),
                (Ev::Answer(400, None), seen(&[2], &[], Some(0))),
                (Ev::Answer(400, None), seen(&[3, 4], &["error"], Some(1))),
            ],
        );
        assert!(rig.dead.is_empty());
        // A piece too large whose sibling is then refused with 400 is split like any piece.
        let rig = check(
            Mode::Daemon,
            8,
            &[
                (Ev::Answer(413, None), seen(&[1, 2, 3, 4, 5, 6, 7, 8], &[], Some(0))),
                (Ev::Answer(413, None), seen(&[1, 2, 3, 4], &[], Some(0))),
                (Ev::Answer(202, None), seen(&[1, 2], &["remove"], Some(0))),
                (Ev::Answer(202, None), seen(&[3, 4], &["remove"], Some(0))),
                (Ev::Answer(400, None), seen(&[5, 6, 7, 8], &[], Some(0))),
                (Ev::Answer(202, None), seen(&[5, 6], &["remove"], Some(0))),
                (Ev::Answer(400, None), seen(&[7, 8], &[], Some(0))),
                (Ev::Answer(400, None), seen(&[7], &[], Some(0))),
                (Ev::Answer(202, None), seen(&[8], &["remove", "dead-letter"], Some(0))),
            ],
        );
        assert_eq!(rig.dead, [7]);
    }

    #[test]
    fn a_delivered_batch_whose_removal_fails_is_removed_before_anything_is_sent() {
        let rig = check(
            Mode::Daemon,
            4,
            &[
                (Ev::RemoveFails, seen(&[], &[], Some(0))),
                // Accepted, but the removal fails: a backoff, and nothing is sent before it is removed.
                (Ev::Answer(202, None), seen(ALL4, &["remove"], Some(1))),
                (Ev::Wait(1), seen(&[], &[], Some(0))),
            ],
        );
        let mut rig = rig;
        assert_eq!(rig.s.undeleted(), 4);
        assert_eq!(rig.batch(), None, "the removal comes first, then an empty queue: nothing is sent again");
        assert!(rig.queue.is_empty());
    }

    #[test]
    fn once_gives_up_after_its_attempts() {
        let rig = check(
            Mode::Once,
            4,
            &[
                (Ev::Answer(503, None), seen(ALL4, &["error"], Some(1))),
                (Ev::Wait(1), seen(&[], &[], Some(0))),
                (Ev::Answer(503, None), seen(ALL4, &["error"], Some(2))),
                (Ev::Wait(2), seen(&[], &[], Some(0))),
                (Ev::Answer(503, None), seen(ALL4, &["error"], None)),
            ],
        );
        assert!(rig.s.done());
    }

    #[test]
    fn an_empty_queue_idles_and_a_page_wakes_it_unless_backing_off() {
        let mut rig = Rig::new(Mode::Daemon, 0);
        assert_eq!(rig.batch(), None);
        assert_eq!(rig.next_in(), Some(60));
        rig.s.on_queued(rig.now);
        assert_eq!(rig.next_in(), Some(0));
        // Backing off: a page does not cut the wait short.
        rig.s.failed(rig.now, Duration::ZERO);
        rig.s.on_queued(rig.now);
        assert_eq!(rig.next_in(), Some(1));
        // A store pause pushes the next send back; an earlier wait does not shorten it.
        rig.s.wait_until(rig.now.at + Duration::from_secs(9));
        rig.s.wait_until(rig.now.at + Duration::from_secs(3));
        assert_eq!(rig.next_in(), Some(9));
    }

    #[test]
    fn a_drain_summary_comes_when_the_queue_empties_or_every_interval() {
        let mut rig = Rig::new(Mode::Daemon, 0);
        assert_eq!(rig.s.on_removed(rig.now, 10), None);
        rig.now = rig.now.after(Duration::from_secs(61));
        assert_eq!(rig.s.on_removed(rig.now, 5), Some(Summary { delivered: 15, elapsed: Duration::from_secs(61) }));
        assert_eq!(rig.s.on_removed(rig.now, 7), None);
        rig.now = rig.now.after(Duration::from_secs(2));
        assert_eq!(
            rig.s.on_nothing_sent(rig.now, false),
            Some(Summary { delivered: 7, elapsed: Duration::from_secs(2) })
        );
        assert_eq!(rig.s.on_nothing_sent(rig.now, false), None, "no drain since");
    }

    /// A sender with `max` in flight and a batch of `seqs` of one feed.
    fn several(max: usize) -> (Sender, Now) {
        let now = Now { at: Instant::now(), unix: 1_800_000_000 };
        (Sender::new(SenderSettings { max_in_flight: max, ..settings(Mode::Daemon) }, now), now)
    }

    fn batch(seqs: std::ops::RangeInclusive<i64>) -> Batch {
        let last = vec![(Feed::TtpUrl, *seqs.end())];
        Batch { seqs: seqs.collect(), restamped: 0, kept: 0, bytes: 0, half: Half::Whole, last }
    }

    fn answer(code: u16) -> Sent {
        Sent { answer: Answer::Status { code, retry_after: None }, detail: String::new() }
    }

    #[test]
    fn several_batches_go_at_once_up_to_the_limit_each_after_those_in_flight() {
        let (mut s, now) = several(3);
        for (i, range) in [1..=10, 11..=20, 21..=30].into_iter().enumerate() {
            assert_eq!(s.next(now), Some(Next::Fresh), "batch {i}");
            s.on_sending(&batch(range.clone()));
            assert_eq!(s.sent_up_to(Feed::TtpUrl), *range.end(), "the next batch starts after this one");
        }
        assert_eq!(s.sent_up_to(Feed::Audit), i64::MIN, "other feeds start at their oldest");
        assert_eq!((s.next(now), s.next_wake(), s.in_flight()), (None, None, 3), "the limit: wait for an answer");
        // An answer frees a place; the records of those still in flight stay excluded.
        assert_eq!(s.on_answer(now, batch(11..=20), &answer(202)), vec![Action::Remove(batch(11..=20))]);
        assert_eq!(s.next(now), Some(Next::Fresh));
        assert_eq!(s.sent_up_to(Feed::TtpUrl), 30);
        // When nothing is in flight any more, a failed batch's records are candidates again.
        s.on_answer(now, batch(1..=10), &answer(202));
        s.on_answer(now, batch(21..=30), &answer(503));
        assert_eq!(s.sent_up_to(Feed::TtpUrl), i64::MIN);
    }

    /// One event of a table row with several sends in flight.
    #[derive(Debug, Clone)]
    enum Fl {
        /// The loop starts the next fresh batch, of these records.
        Start(std::ops::RangeInclusive<i64>),
        /// The intake answers the batch of these records with this status.
        Answer(std::ops::RangeInclusive<i64>, u16),
        /// Time passes, in milliseconds.
        Wait(u64),
    }

    /// Runs rows of events against a sender with `max` in flight; each row expects the sender's next wake after
    /// it, in milliseconds (`None`: nothing to start before an answer, or given up) and whether it gave up.
    fn in_flight(mode: Mode, max: usize, rows: &[(Fl, Option<u64>, bool)]) {
        let mut now = Now { at: Instant::now(), unix: 1_800_000_000 };
        let mut s = Sender::new(SenderSettings { max_in_flight: max, ..settings(mode) }, now);
        for (i, (ev, next_in, done)) in rows.iter().enumerate() {
            match ev.clone() {
                Fl::Start(range) => {
                    assert_eq!(s.next(now), Some(Next::Fresh), "row {i}: {ev:?}");
                    s.on_sending(&batch(range));
                }
                Fl::Answer(range, code) => {
                    for a in s.on_answer(now, batch(range.clone()), &answer(code)) {
                        if let Action::Remove(b) = a {
                            s.on_removed(now, b.seqs.len() as u64);
                        }
                    }
                }
                Fl::Wait(ms) => now = now.after(Duration::from_millis(ms)),
            }
            let wake = s.next_wake().map(|w| w.saturating_duration_since(now.at).as_millis() as u64);
            assert_eq!((wake, s.done()), (*next_in, *done), "row {i}: {ev:?}");
        }
    }

    #[test]
    fn sends_that_fail_together_are_one_attempt() {
        // --once, three sends in flight when the network blips for 0.2 s: all three fail, but they are one failure,
        // not three attempts in a row (which gave up while the next send would have passed). Failures of sends
        // started after it was recorded count again, and the third such round gives up.
        in_flight(
            Mode::Once,
            3,
            &[
                (Fl::Start(1..=10), Some(0), false),
                (Fl::Start(11..=20), Some(0), false),
                (Fl::Start(21..=30), None, false),
                (Fl::Wait(200), None, false),
                (Fl::Answer(1..=10, 503), Some(1000), false),
                (Fl::Answer(11..=20, 503), Some(1000), false),
                (Fl::Answer(21..=30, 503), Some(1000), false),
                (Fl::Wait(1000), Some(0), false),
                // The second attempt: its backoff is the second's, 2 s, for each of the sends that fail with it.
                (Fl::Start(1..=10), Some(0), false),
                (Fl::Start(11..=20), Some(0), false),
                (Fl::Answer(1..=10, 503), Some(2000), false),
                (Fl::Answer(11..=20, 503), Some(2000), false),
                (Fl::Wait(2000), Some(0), false),
                (Fl::Start(1..=10), Some(0), false),
                (Fl::Answer(1..=10, 503), None, true),
            ],
        );
        // A success in between resets the count; a send of the same blip failing after it still waits.
        in_flight(
            Mode::Once,
            3,
            &[
                (Fl::Start(1..=10), Some(0), false),
                (Fl::Start(11..=20), Some(0), false),
                (Fl::Start(21..=30), None, false),
                (Fl::Answer(1..=10, 503), Some(1000), false),
                (Fl::Answer(11..=20, 202), Some(1000), false),
                (Fl::Answer(21..=30, 503), Some(1000), false),
                (Fl::Wait(1000), Some(0), false),
                (Fl::Start(1..=10), Some(0), false),
                (Fl::Answer(1..=10, 202), Some(0), false),
            ],
        );
    }

    #[test]
    fn with_everything_in_flight_the_sender_waits_for_an_answer_or_a_page_not_a_timer() {
        let (mut s, now) = several(4);
        assert_eq!(s.next(now), Some(Next::Fresh));
        s.on_sending(&batch(1..=10));
        assert_eq!(s.next(now), Some(Next::Fresh));
        // Nothing after what is in flight: no idle interval, no spinning either.
        assert_eq!(s.on_nothing_sent(now, false), None);
        assert_eq!((s.next(now), s.next_wake()), (None, None));
        // A page queued more: look again at once.
        s.on_queued(now);
        assert_eq!(s.next(now), Some(Next::Fresh));
        s.on_nothing_sent(now, false);
        // An answer: look again at once too.
        s.on_answer(now, batch(1..=10), &answer(202));
        assert_eq!(s.next(now), Some(Next::Fresh));
    }

    #[test]
    fn a_bisection_waits_for_the_batches_in_flight_then_sends_its_pieces_one_at_a_time() {
        let (mut s, now) = several(4);
        for range in [1..=4, 5..=8] {
            s.next(now);
            s.on_sending(&batch(range));
        }
        // The first is refused: its halves wait for the other batch in flight.
        assert_eq!(s.on_answer(now, batch(1..=4), &answer(400)), vec![]);
        assert!(s.is_bisecting());
        assert_eq!((s.next(now), s.next_wake()), (None, None));
        s.on_answer(now, batch(5..=8), &answer(202));
        let Some(Next::Piece(p)) = s.next(now) else { panic!("the first half goes next") };
        assert_eq!((p.seqs, p.half), (vec![1, 2], Half::First));
        s.on_sending(&Batch { seqs: vec![1, 2], restamped: 0, kept: 0, bytes: 0, half: Half::First, last: vec![] });
        assert_eq!(s.next(now), None, "one piece at a time, though three places are free");
    }

    #[test]
    fn a_success_in_flight_does_not_cut_short_a_wait_another_answer_asked_for() {
        let (mut s, now) = several(2);
        for range in [1..=4, 5..=8] {
            s.next(now);
            s.on_sending(&batch(range));
        }
        let limited = Sent {
            answer: Answer::Status { code: 429, retry_after: Some(Duration::from_secs(30)) },
            detail: String::new(),
        };
        s.on_answer(now, batch(1..=4), &limited);
        s.on_answer(now, batch(5..=8), &answer(202));
        s.on_removed(now, 4);
        assert_eq!(s.next_wake(), Some(now.at + Duration::from_secs(30)));
    }

    #[test]
    fn removals_that_failed_are_retried_one_by_one_before_anything_is_sent() {
        let (mut s, now) = several(2);
        s.on_remove_failed(now, batch(1..=4));
        s.on_remove_failed(now, batch(5..=8));
        assert_eq!(s.undeleted(), 8);
        let later = now.after(Duration::from_secs(10));
        assert!(matches!(s.next(later), Some(Next::Remove(_))));
        assert!(matches!(s.next(later), Some(Next::Remove(_))));
        assert_eq!((s.next(later), s.undeleted()), (Some(Next::Fresh), 0));
    }
}
