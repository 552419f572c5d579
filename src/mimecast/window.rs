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

/// The next window after `watermark`: it re-reads `overlap` behind the watermark, ends `settle` behind now, and is
/// cut to `max_window`. `None` when nothing past the watermark has settled yet.
pub fn next_window(watermark: i64, now: i64, s: Settings) -> Option<Window> {
    let from = watermark - s.overlap_secs;
    let to = (now - s.settle_secs).min(from + s.max_window_secs);
    (to > watermark).then_some(Window { from, to })
}

/// The overlap alone: the window that re-reads `overlap` behind the watermark when nothing past it has settled
/// (`--once` reads it once per pass, for records indexed late). `None` without an overlap.
pub fn overlap(watermark: i64, s: Settings) -> Option<Window> {
    (s.overlap_secs > 0).then(|| Window { from: watermark - s.overlap_secs, to: watermark })
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
        check(10_000, 9_000, None);
        assert_eq!(overlap(10_000, S), Some(Window { from: 9_700, to: 10_000 }));
        assert_eq!(overlap(10_000, Settings { overlap_secs: 0, ..S }), None);
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
