//! The bisection of a batch Datadog refused with 400 or 413, as a pure state machine: which piece goes next,
//! and what the refusal of a piece means. No I/O; the agent sends the pieces and reports each answer.
//!
//! A piece of several logs that is refused is split again, whatever its sibling's answer, first half first (its
//! halves go to the front), so records still go oldest first and single logs are reached in log2 steps. For a
//! 413 that is the whole story (a request too large says nothing about the logs). For a 400 it is what finds
//! several bad logs: with one log in a hundred refused, both halves of a batch, and of most pieces, hold one,
//! and only single logs can tell a bad log from a good one. Every piece is smaller than the one it came from, so
//! a batch of n logs costs at most 2n - 1 requests, plus one for each log a hold sets aside (below).
//!
//! A single log refused is judged by the intake's answers around it in the same run (the pieces sent at once,
//! one after the other, since the bisection began or since its last wait):
//! - refused right after the intake accepted the piece before it: a dead letter;
//! - otherwise it waits for the next answers: the next acceptance makes it a dead letter (with any other log
//!   waiting); if the intake refuses the next two pieces first (three refusals in a row since the first log
//!   waiting, not counting 413s on several logs), it may refuse everything (a proxy, an intake change): hold and
//!   back off as for a 5xx. A hold ends the run: the logs waiting are not judged by answers after the wait (an
//!   intake that refused everything for a while would condemn them as soon as it recovers) but set aside, and
//!   each is sent again right after the intake next accepts a piece, where a refusal proves it bad. A log set
//!   aside is sent again once; those left when the pieces run out stay queued;
//! - when nothing is left to send, logs still waiting are dead letters if the intake accepted a piece earlier in
//!   the run (two bad logs side by side at the end of a batch); if it accepted nothing, there is nothing to
//!   compare them with: hold. They stay queued and come back in a later batch, beside other logs.
//!
//! A batch of one log refused is held likewise. So an intake that refuses everything alike holds within
//! log2(n) + 3 requests of a batch's first refusal, and of each wait, and dead-letters nothing: every run ends
//! in a hold before any log is judged. An intake that starts refusing everything in the middle of a run can only
//! cost the logs refused right after its last acceptance, before the hold: one, or at most three at the very
//! end of a bisection.

use std::collections::VecDeque;

use super::disposition::Refusal;

/// Where a batch stands in a bisection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Half {
    /// A batch of its own, not a piece of a split.
    Whole,
    First,
    Second,
    /// A single log set aside by a hold, sent again right after an acceptance.
    Again,
}

/// A piece of a refused batch: the queue sequence numbers it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub seqs: Vec<i64>,
    pub half: Half,
}

/// Why a refusal holds instead of going on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// A batch of a single log: there is no other log to compare it with.
    Lone,
    /// A single log and the next two pieces refused, nothing accepted in between: the intake may refuse
    /// everything.
    Refusing,
    /// The last logs of the bisection refused, and nothing accepted since its last wait: there is no other log
    /// to compare them with.
    Unjudged,
}

/// What a refusal means for the sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Send the next piece at once.
    Continue,
    /// Not proven to be the logs' fault: back off as for a 5xx; nothing is dead-lettered.
    Hold(Held),
    /// These logs are refused while others are accepted: keep them as dead letters, then go on.
    DeadLetters(Vec<i64>),
}

/// How many refusals in a row, from the first single log waiting for its verdict, end a run in a hold.
const REFUSALS_TO_HOLD: u32 = 3;

/// The pieces waiting to be sent, and what the current run has seen.
#[derive(Debug, Default)]
pub struct Bisection {
    pieces: VecDeque<Piece>,
    /// The intake accepted a piece in this run.
    accepted: bool,
    /// The last answer of this run was an acceptance.
    just_accepted: bool,
    /// Single logs refused in this run, not right after an acceptance: judged by the answers that follow.
    waiting: Vec<i64>,
    /// Refusals since the first log waiting, itself included (413s on several logs left out).
    refusals: u32,
    /// Single logs a hold set aside: each is sent again right after the intake accepts a piece.
    set_aside: VecDeque<i64>,
}

impl Bisection {
    /// Whether pieces are waiting (they go before anything new).
    pub fn is_active(&self) -> bool {
        !self.pieces.is_empty()
    }

    /// The next piece to send.
    pub fn next_piece(&mut self) -> Option<Piece> {
        let piece = self.pieces.pop_front();
        if piece.is_none() {
            // Over: every piece was sent or dead-lettered; logs set aside and not sent again stay queued. The next
            // refusal starts from nothing.
            *self = Bisection::default();
        }
        piece
    }

    /// A piece that could not be sent this time (no answer, a 5xx, a refused key) goes back to the front, and the
    /// run ends: the sender waits before it goes again.
    pub fn put_back(&mut self, piece: Piece) {
        if piece.half != Half::Whole {
            self.pieces.push_front(piece);
        }
        self.interrupt();
    }

    /// The sender waits before the next piece (a backoff, or the intake changed on a reload): answers after the
    /// wait do not judge the logs refused before it, which are set aside to be sent again.
    pub fn interrupt(&mut self) {
        self.set_aside.extend(self.waiting.drain(..));
        (self.accepted, self.just_accepted, self.refusals) = (false, false, 0);
    }

    /// Datadog accepted a batch or a piece. Returns the logs that this proves bad: those waiting in this run.
    pub fn accepted(&mut self, half: Half) -> Vec<i64> {
        if half == Half::Whole {
            return Vec::new();
        }
        (self.accepted, self.just_accepted, self.refusals) = (true, true, 0);
        if let Some(seq) = self.set_aside.pop_front() {
            self.pieces.push_front(Piece { seqs: vec![seq], half: Half::Again });
        }
        std::mem::take(&mut self.waiting)
    }

    /// Datadog refused a batch or a piece with 400 or 413.
    pub fn refused(&mut self, piece: Piece, refusal: Refusal) -> Verdict {
        if piece.half == Half::Whole && piece.seqs.len() == 1 {
            // A lone log: nothing to compare it with. It stays queued and comes back in a later batch.
            return Verdict::Hold(Held::Lone);
        }
        let just_accepted = std::mem::take(&mut self.just_accepted);
        match piece.seqs[..] {
            // Its neighbour passed a moment ago: the fault is in this log.
            [seq] if just_accepted => return Verdict::DeadLetters(vec![seq]),
            [seq] => {
                self.waiting.push(seq);
                self.refusals += 1;
            }
            _ => {
                // A 413 on several logs says nothing about the logs, nor about the intake refusing them.
                if !self.waiting.is_empty() && refusal == Refusal::Malformed {
                    self.refusals += 1;
                }
                self.split(piece);
            }
        }
        if self.refusals >= REFUSALS_TO_HOLD {
            self.interrupt();
            return Verdict::Hold(Held::Refusing);
        }
        if self.pieces.is_empty() && !self.waiting.is_empty() {
            return if self.accepted {
                Verdict::DeadLetters(std::mem::take(&mut self.waiting))
            } else {
                self.waiting.clear();
                Verdict::Hold(Held::Unjudged)
            };
        }
        Verdict::Continue
    }

    /// Queues the two halves of a refused piece; the first is the larger. A batch's halves go after the pieces
    /// already waiting (an older batch's, refused while this one was in flight); a piece's halves go first, so a
    /// piece is split down to single logs before its sibling goes.
    fn split(&mut self, piece: Piece) {
        let mut first = piece.seqs;
        let second = Piece { seqs: first.split_off(first.len().div_ceil(2)), half: Half::Second };
        let first = Piece { seqs: first, half: Half::First };
        if piece.half == Half::Whole {
            self.pieces.push_back(first);
            self.pieces.push_back(second);
        } else {
            self.pieces.push_front(second);
            self.pieces.push_front(first);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An intake that refuses the pieces holding any of `bad` with 400 (or everything, with `bad = None`), driven
    /// until the bisection is over or `limit` answers were given. Returns the verdicts in order and the dead
    /// letters.
    fn drive(batch: usize, bad: Option<&[i64]>, limit: usize) -> (Vec<Verdict>, Vec<i64>, usize) {
        let refuse =
            |seqs: &[i64]| bad.is_none_or(|bad| seqs.iter().any(|s| bad.contains(s))).then_some(Refusal::Malformed);
        drive_with(batch, refuse, limit)
    }

    /// The same against any intake: `answer` says how it refuses a piece, or `None` to accept it.
    fn drive_with(
        batch: usize,
        answer: impl Fn(&[i64]) -> Option<Refusal>,
        limit: usize,
    ) -> (Vec<Verdict>, Vec<i64>, usize) {
        let mut b = Bisection::default();
        let mut verdicts = Vec::new();
        let mut dead = Vec::new();
        let mut next = Some(Piece { seqs: (0..batch as i64).collect(), half: Half::Whole });
        let mut answers = 0;
        while let Some(piece) = next.take() {
            answers += 1;
            if answers > limit {
                break;
            }
            if let Some(refusal) = answer(&piece.seqs) {
                let v = b.refused(piece, refusal);
                if let Verdict::DeadLetters(seqs) = &v {
                    dead.extend(seqs);
                }
                verdicts.push(v);
            } else {
                dead.extend(b.accepted(piece.half));
            }
            next = b.next_piece();
        }
        (verdicts, dead, answers)
    }

    fn is_hold(v: &Verdict) -> bool {
        matches!(v, Verdict::Hold(_))
    }

    /// One log in a hundred refused, spread through the batch as a feed's odd record is: every piece holding one
    /// is refused, both halves of every split included, and each must still end as a dead letter on its own.
    fn scattered(batch: i64) -> Vec<i64> {
        (0..batch).filter(|s| s % 100 == 37 || s % 1000 == 512 || s % 1000 == 513).collect()
    }

    #[test]
    fn scattered_bad_logs_are_all_found_without_holding_in_at_most_2n_requests() {
        let bad = scattered(1000);
        let (verdicts, mut dead, answers) = drive(1000, Some(&bad), 10_000);
        dead.sort();
        assert_eq!(dead, bad, "every bad log a dead letter, no good one");
        assert!(!verdicts.iter().any(is_hold), "{verdicts:?}");
        assert!(answers < 2 * 1000, "{answers} answers");
    }

    #[test]
    fn one_bad_log_is_found_in_log2_steps_and_nothing_holds() {
        let (verdicts, dead, answers) = drive(1000, Some(&[137]), 10_000);
        assert_eq!(dead, [137]);
        assert!(!verdicts.iter().any(is_hold), "{verdicts:?}");
        assert!(answers <= 2 * 11, "{answers} answers");
    }

    #[test]
    fn bad_logs_in_both_halves_hold_then_are_all_found() {
        for bad in [&[20, 170, 900][..], &[0, 999], &[499, 500], &[10, 11], &[1, 2, 3, 4, 5, 6, 7, 8]] {
            let (verdicts, mut dead, answers) = drive(1000, Some(bad), 10_000);
            dead.sort();
            assert_eq!(dead, bad, "{verdicts:?}");
            let holds = verdicts.iter().filter(|v| is_hold(v)).count();
            assert!(holds <= 10, "{bad:?}: {holds} holds");
            assert!(answers < 200, "{bad:?}: {answers} answers");
        }
    }

    #[test]
    fn an_intake_that_refuses_everything_dead_letters_nothing_and_holds_every_few_answers() {
        for batch in [8, 1000] {
            let (verdicts, dead, answers) = drive(batch, None, 10_000);
            assert!(dead.is_empty(), "{batch}: {dead:?}");
            // Never a busy loop: from the first refusal, and from each wait, a hold within log2(n) + 3 answers …
            let most = batch.ilog2() as usize + 4;
            let mut at_once = 0;
            for v in &verdicts {
                at_once = if is_hold(v) { 0 } else { at_once + 1 };
                assert!(at_once < most, "{batch}: {at_once} answers at once: {verdicts:?}");
            }
            // … and the bisection ends on a hold, with each piece sent once: 2n - 1 requests.
            assert!(verdicts.last().is_some_and(is_hold), "{batch}: {verdicts:?}");
            assert_eq!(answers, 2 * batch - 1);
        }
    }

    /// An intake behind a proxy that takes at most `fits` logs a request, and refuses the pieces holding any of
    /// `bad` with 400.
    fn proxy(fits: usize, bad: &[i64]) -> impl Fn(&[i64]) -> Option<Refusal> + '_ {
        move |seqs: &[i64]| {
            if seqs.len() > fits {
                Some(Refusal::TooLarge)
            } else {
                seqs.iter().any(|s| bad.contains(s)).then_some(Refusal::Malformed)
            }
        }
    }

    #[test]
    fn a_413_splits_down_to_what_passes_without_holding_in_at_most_2n_requests() {
        for (batch, fits) in [(16, 2), (16, 1), (1000, 3), (1000, 1), (7, 2), (3, 2)] {
            let (verdicts, dead, answers) = drive_with(batch, proxy(fits, &[]), 10_000);
            assert!(dead.is_empty(), "{batch}/{fits}: {dead:?}");
            assert!(verdicts.iter().all(|v| *v == Verdict::Continue), "{batch}/{fits}: {verdicts:?}");
            assert!(answers < 2 * batch, "{batch}/{fits}: {answers} answers");
        }
        // 16 logs, two a request: 16, 8, 4 refused, 2 and 2 pass, then the other 4, then the other 8 likewise.
        let (verdicts, _, answers) = drive_with(16, proxy(2, &[]), 100);
        assert_eq!((verdicts.len(), answers), (7, 15));
    }

    #[test]
    fn a_piece_too_large_goes_first_half_first_then_its_sibling() {
        let mut b = Bisection::default();
        assert_eq!(
            b.refused(Piece { seqs: (1..=8).collect(), half: Half::Whole }, Refusal::TooLarge),
            Verdict::Continue
        );
        let first = b.next_piece().unwrap();
        assert_eq!(b.refused(first, Refusal::TooLarge), Verdict::Continue);
        let order: Vec<(Vec<i64>, Half)> = b.pieces.iter().map(|p| (p.seqs.clone(), p.half)).collect();
        assert_eq!(
            order,
            [(vec![1, 2], Half::First), (vec![3, 4], Half::Second), (vec![5, 6, 7, 8], Half::Second)],
            "oldest first"
        );
        // A single log refused right after the logs before it passed: a dead letter, whatever its sibling's size.
        let mut b = Bisection::default();
        assert_eq!(b.refused(Piece { seqs: vec![1, 2, 3], half: Half::Whole }, Refusal::TooLarge), Verdict::Continue);
        let first = b.next_piece().unwrap();
        assert_eq!(b.refused(first, Refusal::TooLarge), Verdict::Continue);
        assert_eq!(b.pieces.back(), Some(&Piece { seqs: vec![3], half: Half::Second }));
        for _ in 0..2 {
            let piece = b.next_piece().unwrap();
            assert_eq!(b.accepted(piece.half), Vec::<i64>::new());
        }
        let last = b.next_piece().unwrap();
        assert_eq!(b.refused(last, Refusal::Malformed), Verdict::DeadLetters(vec![3]));
        assert_eq!(b.next_piece(), None);
    }

    #[test]
    fn bad_logs_inside_a_413_split_are_still_found() {
        for bad in [&[137][..], &[0, 999], &[20, 170, 900], &[10, 11]] {
            let (verdicts, mut dead, answers) = drive_with(1000, proxy(4, bad), 10_000);
            dead.sort();
            assert_eq!(dead, bad, "{verdicts:?}");
            assert!(answers < 2 * 1000, "{bad:?}: {answers} answers");
        }
    }

    #[test]
    fn an_intake_that_refuses_everything_with_413_dead_letters_nothing_and_holds_within_log2_steps() {
        let (verdicts, dead, _) = drive_with(1000, |_| Some(Refusal::TooLarge), 400);
        assert!(dead.is_empty());
        let first_hold = verdicts.iter().position(is_hold).expect("a hold");
        assert!(first_hold <= 2 * 11, "the first hold after {first_hold} refusals");
    }

    #[test]
    fn an_intake_that_starts_refusing_everything_holds_and_judges_nothing_across_the_wait() {
        let mut b = Bisection::default();
        let step = |b: &mut Bisection, refuse: bool| {
            let piece = b.next_piece().expect("a piece is waiting");
            let seqs = piece.seqs.clone();
            let v = if refuse {
                b.refused(piece, Refusal::Malformed)
            } else {
                Verdict::DeadLetters(b.accepted(piece.half))
            };
            (seqs, v)
        };
        assert_eq!(
            b.refused(Piece { seqs: (1..=8).collect(), half: Half::Whole }, Refusal::Malformed),
            Verdict::Continue
        );
        assert_eq!(step(&mut b, false), (vec![1, 2, 3, 4], Verdict::DeadLetters(vec![])));
        assert_eq!(step(&mut b, true), (vec![5, 6, 7, 8], Verdict::Continue));
        // From here the intake refuses everything: what it accepted before proves nothing about what follows. A
        // single log and the two pieces after it refused: hold.
        assert_eq!(step(&mut b, true), (vec![5, 6], Verdict::Continue));
        assert_eq!(step(&mut b, true), (vec![5], Verdict::Continue));
        assert_eq!(step(&mut b, true), (vec![6], Verdict::Continue));
        assert_eq!(step(&mut b, true), (vec![7, 8], Verdict::Hold(Held::Refusing)));
        // After the wait the intake takes logs again: 5 and 6, refused before the wait, are not proven bad by it,
        // but sent again, each right after an acceptance, and pass.
        assert_eq!(step(&mut b, false), (vec![7], Verdict::DeadLetters(vec![])));
        assert_eq!(step(&mut b, false), (vec![5], Verdict::DeadLetters(vec![])));
        assert_eq!(step(&mut b, false), (vec![6], Verdict::DeadLetters(vec![])));
        assert_eq!(step(&mut b, false), (vec![8], Verdict::DeadLetters(vec![])));
        assert_eq!(b.next_piece(), None);
        // Had it kept refusing, the last logs would be held with nothing to compare them with, not dead-lettered.
        let mut b = Bisection::default();
        b.refused(Piece { seqs: vec![1, 2], half: Half::Whole }, Refusal::Malformed);
        assert_eq!(step(&mut b, true), (vec![1], Verdict::Continue));
        assert_eq!(step(&mut b, true), (vec![2], Verdict::Hold(Held::Unjudged)));
        assert_eq!(b.next_piece(), None, "they come back in a later batch, beside other logs");
    }

    #[test]
    fn logs_set_aside_by_a_hold_are_sent_again_right_after_an_acceptance_or_stay_queued() {
        // Logs 0..=7 of 16 are bad, at the head of the batch: the intake seems to refuse everything (three holds,
        // 0..=5 set aside), until 8..=15 pass, which proves 6 and 7, refused just before, bad. Of the logs set
        // aside, 0 goes again right after that acceptance and is refused: a dead letter. Nothing is accepted
        // after it, so 1..=5 are neither dead-lettered nor sent again: they stay queued for the next batch.
        let bad: Vec<i64> = (0..8).collect();
        let (verdicts, mut dead, answers) = drive(16, Some(&bad), 100);
        dead.sort();
        assert_eq!(dead, [0, 6, 7]);
        assert_eq!(verdicts.iter().filter(|v| is_hold(v)).count(), 3, "{verdicts:?}");
        assert_eq!(answers, 18, "{verdicts:?}");
        // In a batch of 1000 the acceptances that follow are enough for all of them.
        let (_, mut dead, answers) = drive(1000, Some(&bad), 10_000);
        dead.sort();
        assert_eq!(dead, bad);
        assert!(answers < 2 * 1000, "{answers}");
    }

    #[test]
    fn a_single_refused_while_its_sibling_is_accepted_is_a_dead_letter_either_way_round() {
        let mut b = Bisection::default();
        b.refused(Piece { seqs: vec![1, 2], half: Half::Whole }, Refusal::Malformed);
        let first = b.next_piece().unwrap();
        assert_eq!(b.refused(first, Refusal::Malformed), Verdict::Continue, "the first half waits for its sibling");
        let second = b.next_piece().unwrap();
        assert_eq!(b.accepted(second.half), vec![1]);
        assert!(!b.is_active());

        let mut b = Bisection::default();
        b.refused(Piece { seqs: vec![1, 2], half: Half::Whole }, Refusal::Malformed);
        let first = b.next_piece().unwrap();
        assert_eq!(b.accepted(first.half), Vec::<i64>::new());
        let second = b.next_piece().unwrap();
        assert_eq!(b.refused(second, Refusal::Malformed), Verdict::DeadLetters(vec![2]));
    }

    #[test]
    fn two_bad_logs_side_by_side_are_dead_letters_once_the_intake_took_others() {
        let (_, mut dead, _) = drive(4, Some(&[2, 3]), 100);
        dead.sort();
        assert_eq!(dead, [2, 3], "or they would block the queue for ever");
    }

    #[test]
    fn a_lone_log_refused_holds_and_is_not_kept_as_a_piece() {
        for refusal in [Refusal::Malformed, Refusal::TooLarge] {
            let mut b = Bisection::default();
            assert_eq!(b.refused(Piece { seqs: vec![7], half: Half::Whole }, refusal), Verdict::Hold(Held::Lone));
            assert!(!b.is_active(), "it stays in the queue and comes back in the next batch");
        }
    }

    #[test]
    fn a_piece_put_back_is_sent_next_and_a_whole_batch_is_not_kept() {
        let mut b = Bisection::default();
        b.refused(Piece { seqs: vec![1, 2], half: Half::Whole }, Refusal::Malformed);
        let first = b.next_piece().unwrap();
        b.put_back(first.clone());
        assert_eq!(b.next_piece(), Some(first));
        b.put_back(Piece { seqs: vec![9], half: Half::Whole });
        assert_eq!(b.next_piece().map(|p| p.seqs), Some(vec![2]));
        assert_eq!(b.next_piece(), None);
    }
}
