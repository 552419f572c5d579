//! The bisection of a batch Datadog refused with 400 or 413, as a pure state machine: which piece goes next,
//! and what the refusal of a piece means. No I/O; the agent sends the pieces and reports each answer.
//!
//! A 413 says the request is too large (for the intake, or for a proxy in front of it), not that a log is bad:
//! halves that are still too large are expected to be refused too. So a piece of several logs refused with 413
//! is split again whatever its sibling did, first half first (its halves go to the front), so that the pieces
//! reach a size that passes in log2 steps and the records still go oldest first. Its sibling, which has nothing
//! left to be compared with, goes on as a piece on its own ([`Half::Alone`]). Pieces shrink at every step, so a
//! batch of n logs costs at most 2n - 1 requests. A single log refused with 413 is judged as for 400.
//!
//! For 400 the rule is: bisect only while the halves behave differently. Pieces are sent oldest split first, so
//! the two halves of a split always go one after the other and each answer can be compared with its sibling's.
//! - One half accepted and the other refused: the fault is in the refused half; split it, and a single log
//!   refused while its sibling was accepted is a dead letter.
//! - Both halves refused alike: the fault may not be in the logs at all (a proxy, an intake change). Hold and
//!   back off as for a 5xx, forget what was accepted so far, and go one level deeper next time, so that several
//!   bad logs are still found once the intake takes the rest.
//! - Two single logs refused alike while the intake accepted other pieces since the last alike pair: both are
//!   bad (two poison logs side by side); they are dead letters, or they would block the queue for ever.
//! - A lone log refused on its own (a batch of one, or a single log whose sibling was split again) has nothing
//!   to be compared with: hold. It is not kept as a piece: it comes back in a later batch, beside other logs.

use std::collections::VecDeque;

use super::disposition::Refusal;

/// Where a batch stands in a bisection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Half {
    /// A batch of its own, not a piece of a split.
    Whole,
    First,
    Second,
    /// A piece whose sibling was refused with 413 and split again: it has nothing to be compared with, so it is
    /// judged as a batch of its own would be (a single log refused is held, not proven bad).
    Alone,
}

/// A piece of a refused batch: the queue sequence numbers it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub seqs: Vec<i64>,
    pub half: Half,
}

/// What a refusal means for the sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Send the next piece at once.
    Continue,
    /// Refused alike: not one bad log. Back off as for a 5xx; nothing is dead-lettered.
    Hold,
    /// These logs are refused while others are accepted: keep them as dead letters, then go on.
    DeadLetters(Vec<i64>),
}

/// The pieces waiting to be sent, and what the bisection has seen so far.
#[derive(Debug, Default)]
pub struct Bisection {
    pieces: VecDeque<Piece>,
    /// A piece was accepted since the last pair refused alike.
    accepted: bool,
    /// The first half of the current pair was refused.
    first_refused: bool,
    /// A single log refused as the first half of its pair, waiting for its sibling's answer.
    pending: Option<Piece>,
}

impl Bisection {
    /// Whether pieces are waiting (they go before anything new).
    pub fn is_active(&self) -> bool {
        !self.pieces.is_empty() || self.pending.is_some()
    }

    /// The next piece to send.
    pub fn next_piece(&mut self) -> Option<Piece> {
        let piece = self.pieces.pop_front();
        if piece.is_none() {
            // Over: every piece was sent or dead-lettered. The next refusal starts from nothing.
            *self = Bisection::default();
        }
        piece
    }

    /// A piece that could not be sent this time (no answer, a 5xx, a refused key) goes back to the front.
    pub fn put_back(&mut self, piece: Piece) {
        if piece.half != Half::Whole {
            self.pieces.push_front(piece);
        }
    }

    /// Datadog accepted a batch or a piece. Returns the logs that this proves bad: a single first half refused
    /// while its sibling is accepted.
    pub fn accepted(&mut self, half: Half) -> Vec<i64> {
        if half == Half::Whole {
            return Vec::new();
        }
        self.accepted = true;
        self.first_refused = false;
        match (half, self.pending.take()) {
            (Half::Second, Some(first)) => first.seqs,
            (_, pending) => {
                self.pending = pending;
                Vec::new()
            }
        }
    }

    /// Datadog refused a batch or a piece with 400 or 413.
    pub fn refused(&mut self, piece: Piece, refusal: Refusal) -> Verdict {
        if refusal == Refusal::TooLarge && piece.seqs.len() > 1 {
            return self.too_large(piece);
        }
        match piece.half {
            // A lone log: nothing to compare it with. It stays queued and comes back in a later batch.
            Half::Whole | Half::Alone if piece.seqs.len() == 1 => Verdict::Hold,
            Half::Whole | Half::Alone => {
                self.split(piece.seqs);
                Verdict::Continue
            }
            Half::First => {
                self.first_refused = true;
                if piece.seqs.len() == 1 {
                    self.pending = Some(piece);
                } else {
                    self.split(piece.seqs);
                }
                Verdict::Continue
            }
            Half::Second if !std::mem::take(&mut self.first_refused) => match piece.seqs[..] {
                // Its sibling was accepted: the halves differ, and the fault is here.
                [seq] => Verdict::DeadLetters(vec![seq]),
                _ => {
                    self.split(piece.seqs);
                    Verdict::Continue
                }
            },
            Half::Second => {
                let pending = self.pending.take();
                if let (Some(first), [seq], true) = (&pending, &piece.seqs[..], self.accepted) {
                    return Verdict::DeadLetters(vec![first.seqs[0], *seq]);
                }
                self.accepted = false;
                self.pieces.extend(pending);
                if piece.seqs.len() == 1 {
                    self.pieces.push_back(piece);
                } else {
                    self.split(piece.seqs);
                }
                Verdict::Hold
            }
        }
    }

    /// A piece of several logs refused with 413: split it again, whatever its sibling did. A batch's halves go
    /// after the pieces already waiting (oldest batch first); a piece's halves go first, so the first half is
    /// split down to a size that passes before anything else is sent.
    fn too_large(&mut self, piece: Piece) -> Verdict {
        match piece.half {
            Half::Whole => {
                self.split(piece.seqs);
                return Verdict::Continue;
            }
            // The sibling, next in line, loses the answer it would have been compared with.
            Half::First => {
                if let Some(sibling) = self.pieces.front_mut().filter(|p| p.half == Half::Second) {
                    sibling.half = Half::Alone;
                }
            }
            // Not refused alike: a 413 says nothing about the logs, so the first half's refusal is compared with
            // nothing (its own halves are still to come).
            Half::Second => self.first_refused = false,
            Half::Alone => {}
        }
        let mut first = piece.seqs;
        let second = first.split_off(first.len().div_ceil(2));
        self.pieces.push_front(Piece { seqs: second, half: Half::Second });
        self.pieces.push_front(Piece { seqs: first, half: Half::First });
        Verdict::Continue
    }

    /// Queues the two halves; the first is the larger, so a single first half always has a single sibling.
    fn split(&mut self, mut first: Vec<i64>) {
        let second = first.split_off(first.len().div_ceil(2));
        self.pieces.push_back(Piece { seqs: first, half: Half::First });
        if !second.is_empty() {
            self.pieces.push_back(Piece { seqs: second, half: Half::Second });
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

    #[test]
    fn one_bad_log_is_found_in_log2_steps_and_nothing_holds() {
        let (verdicts, dead, answers) = drive(1000, Some(&[137]), 10_000);
        assert_eq!(dead, [137]);
        assert!(!verdicts.contains(&Verdict::Hold), "{verdicts:?}");
        assert!(answers <= 2 * 11, "{answers} answers");
    }

    #[test]
    fn bad_logs_in_both_halves_hold_then_are_all_found() {
        for bad in [&[20, 170, 900][..], &[0, 999], &[499, 500], &[10, 11], &[1, 2, 3, 4, 5, 6, 7, 8]] {
            let (verdicts, mut dead, answers) = drive(1000, Some(bad), 10_000);
            dead.sort();
            assert_eq!(dead, bad, "{verdicts:?}");
            let holds = verdicts.iter().filter(|v| **v == Verdict::Hold).count();
            assert!(holds <= 10, "{bad:?}: {holds} holds");
            assert!(answers < 200, "{bad:?}: {answers} answers");
        }
    }

    #[test]
    fn an_intake_that_refuses_everything_dead_letters_nothing_and_always_holds() {
        let (verdicts, dead, _) = drive(8, None, 200);
        assert!(dead.is_empty());
        // After the first refusal, every second answer is a pair refused alike: a hold, never a busy loop.
        let holds = verdicts.iter().filter(|v| **v == Verdict::Hold).count();
        assert!(holds >= verdicts.len() / 2 - 1, "{holds} holds in {} refusals", verdicts.len());
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
    fn a_piece_too_large_goes_first_half_first_and_its_sibling_goes_alone() {
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
            [(vec![1, 2], Half::First), (vec![3, 4], Half::Second), (vec![5, 6, 7, 8], Half::Alone)],
            "oldest first; the sibling of a piece split again has nothing to be compared with"
        );
        // A single log alone, refused: held, not kept, as a batch of one is.
        let mut b = Bisection::default();
        assert_eq!(b.refused(Piece { seqs: vec![1, 2, 3], half: Half::Whole }, Refusal::TooLarge), Verdict::Continue);
        let first = b.next_piece().unwrap();
        assert_eq!(b.refused(first, Refusal::TooLarge), Verdict::Continue);
        assert_eq!(b.pieces.back(), Some(&Piece { seqs: vec![3], half: Half::Alone }));
        for _ in 0..2 {
            let piece = b.next_piece().unwrap();
            assert_eq!(b.accepted(piece.half), Vec::<i64>::new());
        }
        let alone = b.next_piece().unwrap();
        assert_eq!(b.refused(alone, Refusal::Malformed), Verdict::Hold);
        assert_eq!(b.next_piece(), None, "it comes back in a later batch, beside other logs");
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
        let first_hold = verdicts.iter().position(|v| *v == Verdict::Hold).expect("a hold");
        assert!(first_hold <= 2 * 11, "the first hold after {first_hold} refusals");
    }

    #[test]
    fn a_pair_refused_alike_forgets_what_was_accepted() {
        let mut b = Bisection::default();
        let step = |b: &mut Bisection, refuse: bool| {
            let piece = b.next_piece().expect("a piece is waiting");
            if refuse { b.refused(piece, Refusal::Malformed) } else { Verdict::DeadLetters(b.accepted(piece.half)) }
        };
        assert_eq!(
            b.refused(Piece { seqs: (1..=8).collect(), half: Half::Whole }, Refusal::Malformed),
            Verdict::Continue
        );
        assert_eq!(step(&mut b, false), Verdict::DeadLetters(vec![]), "1..=4 accepted");
        assert_eq!(step(&mut b, true), Verdict::Continue, "5..=8 refused: its sibling was accepted, split it");
        // From here the intake refuses everything: 5,6 and 7,8 alike, so the evidence of 1..=4 is forgotten …
        assert_eq!(step(&mut b, true), Verdict::Continue);
        assert_eq!(step(&mut b, true), Verdict::Hold);
        // … and the singles that follow are held in pairs, never dead-lettered.
        for _ in 0..3 {
            assert_eq!(step(&mut b, true), Verdict::Continue);
            assert_eq!(step(&mut b, true), Verdict::Hold);
        }
        // Once the intake takes logs again, the held singles go through one by one.
        for _ in 0..4 {
            assert_eq!(step(&mut b, false), Verdict::DeadLetters(vec![]));
        }
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
            assert_eq!(b.refused(Piece { seqs: vec![7], half: Half::Whole }, refusal), Verdict::Hold);
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
