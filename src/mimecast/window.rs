//! Pure cursor arithmetic: which time window a feed reads next.

/// A closed time window `[from, to]` in Unix seconds, both ends inclusive (Mimecast does not say; we assume
/// inclusive and deduplicate).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub from: i64,
    pub to: i64,
}

/// The window settings of `[mimecast]`.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub overlap_secs: i64,
    pub settle_secs: i64,
    pub max_window_secs: i64,
}

/// How far in the future a watermark may be before the agent says that the clock went back. A clock that NTP slews
/// is never more than milliseconds off (ntpd and chrony step it instead, once it is 128 ms or a second off), and
/// small steps are routine (a suspended VM resumed, a drifting clock corrected): the next window starts from the
/// clock all the same and its overlap covers the step, so saying it would only be noise. A minute or more means the
/// clock was wrong for a while (a boot before NTP, a bad hardware clock, a queue copied from another machine),
/// which a person should know.
pub const CLOCK_TOLERANCE_SECS: i64 = 60;

/// 2026-01-01T00:00:00Z: this code was written after it, so it cannot run before it, and a clock that reads earlier
/// is wrong (a dead hardware clock at boot, before NTP sets it, reads 1970). Polling by such a clock would move every
/// watermark back to it (see [`next_window`]), and once the clock is set the feeds would catch up from there a
/// `max_window_secs` at a time: for 1970, hundreds of thousands of requests, days of the API user's quota, new
/// records waiting meanwhile. The agent does not poll while the clock reads earlier ([`clock_unset`]).
pub const CLOCK_FLOOR: i64 = 1_767_225_600;

/// What the agent says while the clock reads earlier than `floor` ([`CLOCK_FLOOR`] outside tests); `None` once it
/// does not.
pub fn clock_unset(now: i64, floor: i64) -> Option<String> {
    (now < floor).then(|| {
        format!(
            "the system clock reads {}, before {}: not polling Mimecast nor delivering to Datadog until the clock is set (is NTP running?)",
            crate::datetime::rfc3339(now),
            crate::datetime::rfc3339(floor)
        )
    })
}

/// The next window after `watermark`: it re-reads `overlap` behind the watermark, ends `settle` behind now, and is
/// cut to `max_window`. `None` when nothing past the watermark has settled yet.
///
/// A watermark later than `now - settle` was set by a clock ahead of this one: the clock went back, or the queue
/// comes from a machine whose clock was ahead. Waiting until the clock reaches it would read nothing meanwhile and
/// then lose what came since, so the window is the overlap behind `now - settle` instead, and the watermark moves
/// back to its end when it completes (what is read again was queued already and is skipped by its key).
pub fn next_window(watermark: i64, now: i64, s: Settings) -> Option<Window> {
    let horizon = now.saturating_sub(s.settle_secs);
    if watermark > horizon {
        return Some(Window { from: horizon.saturating_sub(s.overlap_secs), to: horizon });
    }
    let from = watermark.saturating_sub(s.overlap_secs);
    let to = horizon.min(from.saturating_add(s.max_window_secs));
    (to > watermark).then_some(Window { from, to })
}

/// How far `watermark` is later than `now`, when by more than [`CLOCK_TOLERANCE_SECS`]: the clock went back (or the
/// queue came from a machine whose clock was ahead), since nothing else sets a watermark in the future. One later
/// than `now - settle` only is also what raising `settle_secs` leaves: [`next_window`] reads it from the clock all
/// the same, and there is nothing to say.
pub fn clock_went_back(watermark: i64, now: i64) -> Option<i64> {
    let ahead = watermark.saturating_sub(now);
    (ahead > CLOCK_TOLERANCE_SECS).then_some(ahead)
}

/// The overlap alone: the window that re-reads `overlap` behind the watermark when nothing past it has settled
/// (`--once` reads it once per pass, for records indexed late). `None` without an overlap.
pub fn overlap(watermark: i64, s: Settings) -> Option<Window> {
    (s.overlap_secs > 0).then(|| Window { from: watermark.saturating_sub(s.overlap_secs), to: watermark })
}

/// Whether more than `slack` seconds of settled time remain after this window: a catch-up that should continue
/// at once. The daemon passes its poll interval as `slack`, so a window that merely took a while to read (its
/// end fixed, `now` moving on) does not count as behind; `--once` passes 0 and a fixed `now`.
pub fn behind(window: Window, now: i64, s: Settings, slack: i64) -> bool {
    window.to < now.saturating_sub(s.settle_secs).saturating_sub(slack)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Settings = Settings { overlap_secs: 300, settle_secs: 60, max_window_secs: 3600 };

    #[test]
    fn windows() {
        let check = |wm: i64, now: i64, want: Option<(i64, i64)>| {
            assert_eq!(next_window(wm, now, S).map(|w| (w.from, w.to)), want, "wm {wm} now {now}");
        };
        // Steady state: overlap behind the watermark up to settle behind now.
        check(10_000, 10_120, Some((9_700, 10_060)));
        // Catch-up is cut to max_window.
        check(10_000, 100_000, Some((9_700, 13_300)));
        // Nothing settled past the watermark yet.
        check(10_000, 10_060, None);
        // The watermark later than now - settle: the clock went back. The window is the overlap behind now -
        // settle, whatever the difference, and never ends later than it.
        check(10_030, 10_060, Some((9_700, 10_000)));
        check(10_000, 9_000, Some((8_640, 8_940)));
        check(10_000 + 7_200, 10_060, Some((9_700, 10_000)));
        assert_eq!(overlap(10_000, S), Some(Window { from: 9_700, to: 10_000 }));
        assert_eq!(overlap(10_000, Settings { overlap_secs: 0, ..S }), None);
    }

    #[test]
    fn a_watermark_at_the_ends_of_time_does_not_wrap() {
        // A damaged row: the window saturates instead of wrapping round to the other end of time.
        assert_eq!(next_window(i64::MIN, 100_000, S), Some(Window { from: i64::MIN, to: i64::MIN + 3_600 }));
        assert_eq!(overlap(i64::MIN, S), Some(Window { from: i64::MIN, to: i64::MIN }));
        let late = Settings { settle_secs: 0, ..S };
        assert_eq!(next_window(i64::MAX - 10, i64::MAX, late), Some(Window { from: i64::MAX - 310, to: i64::MAX }));
        assert_eq!(next_window(i64::MAX, 100_000, S), Some(Window { from: 99_640, to: 99_940 }));
    }

    #[test]
    fn a_clock_before_the_floor_is_said_with_both_times() {
        assert_eq!(clock_unset(CLOCK_FLOOR, CLOCK_FLOOR), None);
        assert_eq!(clock_unset(i64::MAX, CLOCK_FLOOR), None);
        assert_eq!(clock_unset(0, 0), None, "tests with small fake times set the floor to 0");
        let said = clock_unset(86_400, CLOCK_FLOOR).expect("1970 is before the floor");
        assert_eq!(
            said,
            "the system clock reads 1970-01-02T00:00:00Z, before 2026-01-01T00:00:00Z: not polling Mimecast nor delivering to Datadog until \
             the clock is set (is NTP running?)"
        );
        assert!(clock_unset(CLOCK_FLOOR - 1, CLOCK_FLOOR).is_some());
    }

    #[test]
    fn the_clock_went_back_only_for_a_watermark_in_the_future_past_the_tolerance() {
        assert_eq!(clock_went_back(10_000, 10_000), None, "equal");
        assert_eq!(clock_went_back(9_970, 10_000), None, "behind now, though ahead of now - settle: settle raised");
        assert_eq!(clock_went_back(10_030, 10_000), None, "30 s ahead: within the tolerance");
        assert_eq!(clock_went_back(10_000 + CLOCK_TOLERANCE_SECS, 10_000), None);
        assert_eq!(clock_went_back(10_001 + CLOCK_TOLERANCE_SECS, 10_000), Some(CLOCK_TOLERANCE_SECS + 1));
        assert_eq!(clock_went_back(17_200, 10_000), Some(7_200), "two hours");
        assert_eq!(clock_went_back(i64::MAX, i64::MIN), Some(i64::MAX));
    }

    #[test]
    fn no_window_ends_later_than_now_less_settle_wherever_the_watermark_is() {
        let now = 100_000;
        for wm in [0, 50_000, now - 3_600, now - 61, now - 60, now - 59, now, now + 30, now + 7_200, i64::MAX / 2] {
            let w = next_window(wm, now, S).or_else(|| overlap(wm, S)).expect("a window");
            assert!(w.to <= now - 60, "watermark {wm}: {w:?}");
            assert!(w.from <= wm - 300 && w.to - w.from <= 3_600 && w.from < w.to, "watermark {wm}: {w:?}");
        }
    }

    #[test]
    fn catch_up_progresses_until_caught_up() {
        let now = 100_000;
        let mut wm = 50_000;
        let mut windows = 0;
        while let Some(w) = next_window(wm, now, S) {
            assert!(w.from <= wm && w.to > wm && w.to - w.from <= 3600);
            wm = w.to;
            windows += 1;
            if !behind(w, now, S, 0) {
                break;
            }
        }
        assert_eq!(wm, now - 60);
        assert_eq!(windows, 16);
    }

    #[test]
    fn a_window_that_took_a_while_to_read_is_not_behind() {
        let w = Window { from: 9_700, to: 10_060 };
        // Read in 20 s: `now - settle` moved past the window's end, by less than one poll interval.
        assert!(!behind(w, 10_140, S, 60));
        assert!(behind(w, 10_140, S, 0));
        // A real backlog is still behind.
        assert!(behind(w, 20_000, S, 60));
    }
}
