//! Pure batch packing: fair order across feeds, and how many logs fit in one request.

use crate::store::Queued;

/// Datadog's limits per request and per log (datadog-intake.md).
pub const MAX_LOGS: usize = 1000;
pub const MAX_PAYLOAD_BYTES: usize = 5_000_000;
pub const MAX_LOG_BYTES: usize = 1_000_000;

/// Interleaves the feeds round-robin, each oldest first, so that a flood in one feed cannot starve another.
pub fn fair_order(per_feed: Vec<Vec<Queued>>) -> Vec<Queued> {
    let total = per_feed.iter().map(Vec::len).sum();
    let mut iters: Vec<_> = per_feed.into_iter().map(Vec::into_iter).collect();
    let mut out = Vec::with_capacity(total);
    while out.len() < total {
        for it in &mut iters {
            if let Some(q) = it.next() {
                out.push(q);
            }
        }
    }
    out
}

/// Tracks one request's size against both limits as logs are added. Pure.
#[derive(Debug, Clone, Copy)]
pub struct Packer {
    bytes: usize,
    count: usize,
}

impl Default for Packer {
    fn default() -> Packer {
        Packer { bytes: 2, count: 0 } // the brackets
    }
}

impl Packer {
    /// Adds a log of `size` serialized bytes if it still fits; says whether it did.
    pub fn try_add(&mut self, size: usize) -> bool {
        let add = size + usize::from(self.count > 0);
        if self.count == MAX_LOGS || self.bytes + add > MAX_PAYLOAD_BYTES {
            return false;
        }
        self.bytes += add;
        self.count += 1;
        true
    }
}

/// The JSON array payload of serialized logs.
pub fn payload<'a>(logs: impl IntoIterator<Item = &'a str>) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 * 1024);
    out.push(b'[');
    for (i, log) in logs.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(log.as_bytes());
    }
    out.push(b']');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mimecast::Feed;

    fn q(feed: Feed, seq: i64) -> Queued {
        Queued { seq, feed, key: String::new(), event_time: None, body: String::new() }
    }

    #[test]
    fn round_robin_across_feeds() {
        let urls: Vec<_> = (0..5).map(|i| q(Feed::TtpUrl, 10 + i)).collect();
        let audit = vec![q(Feed::Audit, 100), q(Feed::Audit, 101)];
        let seqs: Vec<i64> = fair_order(vec![audit, urls]).iter().map(|q| q.seq).collect();
        assert_eq!(seqs, [100, 10, 101, 11, 12, 13, 14]);
    }

    fn fits(sizes: Vec<usize>) -> usize {
        let mut p = Packer::default();
        sizes.into_iter().take_while(|&s| p.try_add(s)).count()
    }

    #[test]
    fn packing_respects_both_limits() {
        assert_eq!(fits(vec![10; 5000]), MAX_LOGS);
        // 4 logs of 1,200,000 bytes: 2 + 4*1.2M + 3 commas > 5,000,000.
        assert_eq!(fits(vec![1_200_000; 10]), 4);
        // Exactly 5,000,000 bytes fits; one more does not.
        assert_eq!(fits(vec![2_499_998, 2_499_999]), 2);
        assert_eq!(fits(vec![2_499_999, 2_499_999]), 1);
        assert_eq!(fits(vec![]), 0);
        assert_eq!(payload(["{}", "{\"a\":1}"]), b"[{},{\"a\":1}]");
        assert_eq!(payload(["{}"; 2]).len(), 2 + 2 * 2 + 1);
    }
}
