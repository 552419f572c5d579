//! The bisection of a batch Datadog refused with 400 or 413, as a pure state machine: which piece goes next,
//! and what the refusal of a piece means. No I/O; the agent sends the pieces and reports each answer.
//!
//! The rule: bisect only while the halves behave differently. Pieces are sent oldest split first, so the two
//! halves of a split always go one after the other and each answer can be compared with its sibling's.
//! - One half accepted and the other refused: the fault is in the refused half; split it, and a single log
//!   refused while its sibling was accepted is a dead letter.
//! - Both halves refused alike: the fault may not be in the logs at all (a proxy, an intake change). Hold and
//!   back off as for a 5xx, forget what was accepted so far, and go one level deeper next time, so that several
//!   bad logs are still found once the intake takes the rest.
//! - Two single logs refused alike while the intake accepted other pieces since the last alike pair: both are
//!   bad (two poison logs side by side); they are dead letters, or they would block the queue for ever.
//! - A lone log refused on its own has nothing to be compared with: hold.

use std::collections::VecDeque;

/// Where a batch stands in a bisection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Half {
    /// A batch of its own, not a piece of a split.
    Whole,
    First,
    Second,
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
    pub fn refused(&mut self, piece: Piece) -> Verdict {
        match piece.half {
            Half::Whole if piece.seqs.len() == 1 => Verdict::Hold,
            Half::Whole => {
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

    /// An intake that refuses the pieces holding any of `bad` (or everything, with `bad = None`), driven until
    /// the bisection is over or `limit` answers were given. Returns the verdicts in order and the dead letters.
    fn drive(batch: usize, bad: Option<&[i64]>, limit: usize) -> (Vec<Verdict>, Vec<i64>, usize) {
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
            let refused = bad.is_none_or(|bad| piece.seqs.iter().any(|s| bad.contains(s)));
            if refused {
                let v = b.refused(piece);
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

    #[test]
    fn a_pair_refused_alike_forgets_what_was_accepted() {
        let mut b = Bisection::default();
        let step = |b: &mut Bisection, refuse: bool| {
            let piece = b.next_piece().expect("a piece is waiting");
            if refuse { b.refused(piece) } else { Verdict::DeadLetters(b.accepted(piece.half)) }
        };
        assert_eq!(b.refused(Piece { seqs: (1..=8).collect(), half: Half::Whole }), Verdict::Continue);
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
        b.refused(Piece { seqs: vec![1, 2], half: Half::Whole });
        let first = b.next_piece().unwrap();
        assert_eq!(b.refused(first), Verdict::Continue, "the first half waits for its sibling");
        let second = b.next_piece().unwrap();
        assert_eq!(b.accepted(second.half), vec![1]);
        assert!(!b.is_active());

        let mut b = Bisection::default();
        b.refused(Piece { seqs: vec![1, 2], half: Half::Whole });
        let first = b.next_piece().unwrap();
        assert_eq!(b.accepted(first.half), Vec::<i64>::new());
        let second = b.next_piece().unwrap();
        assert_eq!(b.refused(second), Verdict::DeadLetters(vec![2]));
    }

    #[test]
    fn two_bad_logs_side_by_side_are_dead_letters_once_the_intake_took_others() {
        let (_, mut dead, _) = drive(4, Some(&[2, 3]), 100);
        dead.sort();
        assert_eq!(dead, [2, 3], "or they would block the queue for ever");
    }

    #[test]
    fn a_lone_log_refused_holds_and_is_not_kept_as_a_piece() {
        let mut b = Bisection::default();
        assert_eq!(b.refused(Piece { seqs: vec![7], half: Half::Whole }), Verdict::Hold);
        assert!(!b.is_active(), "it stays in the queue and comes back in the next batch");
    }

    #[test]
    fn a_piece_put_back_is_sent_next_and_a_whole_batch_is_not_kept() {
        let mut b = Bisection::default();
        b.refused(Piece { seqs: vec![1, 2], half: Half::Whole });
        let first = b.next_piece().unwrap();
        b.put_back(first.clone());
        assert_eq!(b.next_piece(), Some(first));
        b.put_back(Piece { seqs: vec![9], half: Half::Whole });
        assert_eq!(b.next_piece().map(|p| p.seqs), Some(vec![2]));
        assert_eq!(b.next_piece(), None);
    }
}
