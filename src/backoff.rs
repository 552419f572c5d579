//! Exponential backoff with full jitter: pure, with the random draw passed in.

use std::time::Duration;

/// Base and cap of an exponential backoff.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

impl Backoff {
    /// The ceiling after `failures` consecutive failures: `base * 2^(failures-1)`, at most `cap`.
    pub fn ceiling(&self, failures: u32) -> Duration {
        let exp = failures.saturating_sub(1).min(30);
        self.base.saturating_mul(1u32 << exp).min(self.cap)
    }

    /// Full jitter: a delay drawn uniformly from `[0, ceiling]`, with `unit` in `[0, 1)`.
    /// Full jitter spreads the retries of many agents that failed together (AWS's analysis of backoff).
    pub fn delay(&self, failures: u32, unit: f64) -> Duration {
        self.ceiling(failures).mul_f64(unit.clamp(0.0, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_caps() {
        let b = Backoff { base: Duration::from_secs(1), cap: Duration::from_secs(120) };
        let check = |n: u32, secs: u64| assert_eq!(b.ceiling(n), Duration::from_secs(secs), "failures {n}");
        check(0, 1);
        check(1, 1);
        check(2, 2);
        check(3, 4);
        check(7, 64);
        check(8, 120);
        check(1000, 120);
        assert_eq!(b.delay(3, 0.5), Duration::from_secs(2));
        assert_eq!(b.delay(3, 0.0), Duration::ZERO);
        assert_eq!(b.delay(8, 0.999), Duration::from_secs(120).mul_f64(0.999));
    }
}
