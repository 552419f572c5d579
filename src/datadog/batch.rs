//! Pure batch packing: fair order across feeds, how many logs fit in one request, and the request itself.

use super::logobj::{self, Late, Shape};
use crate::mimecast::Feed;
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
    /// A payload limit below Datadog's, learnt from a 413 (`Sender::payload_limit`).
    max_bytes: usize,
}

impl Default for Packer {
    fn default() -> Packer {
        Packer::within(MAX_PAYLOAD_BYTES)
    }
}

impl Packer {
    /// A packer for requests of at most `max_bytes` (and never more than Datadog's limits). Under a limit below
    /// Datadog's, the first log always goes, and a first log larger than the limit takes one more with it: alone
    /// and refused, it would be held with nothing to compare it with, batch after batch; beside a log that passes,
    /// the bisection proves it too large and the queue goes on.
    pub fn within(max_bytes: usize) -> Packer {
        Packer { bytes: 2, count: 0, max_bytes } // the brackets
    }

    /// Adds a log of `size` serialized bytes if it still fits; says whether it did.
    pub fn try_add(&mut self, size: usize) -> bool {
        let add = size + usize::from(self.count > 0);
        let under_limit =
            self.bytes + add <= self.max_bytes || self.count == 0 || (self.count == 1 && self.bytes > self.max_bytes);
        if self.count == MAX_LOGS || self.bytes + add > MAX_PAYLOAD_BYTES || !under_limit {
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

/// One request's worth of logs, built from queued records in order.
#[derive(Debug, Default)]
pub struct Packed {
    /// The queue sequence numbers sent, in payload order.
    pub seqs: Vec<i64>,
    /// Late records given a new timestamp, and sent unchanged (`late_records = "keep"`).
    pub restamped: i64,
    pub kept: i64,
    /// The JSON array; empty when no log was packed.
    pub payload: Vec<u8>,
    /// Records whose log exceeds Datadog's per-log limit: never sent, so they never block the rest.
    pub too_large: Vec<TooLarge>,
}

/// A record too large for Datadog, for the dead-letter table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TooLarge {
    pub seq: i64,
    pub feed: Feed,
    pub key: String,
    pub bytes: usize,
}

/// Builds log objects from `records` in order until a request limit is reached. Pure: the caller stores the
/// dead letters and sends the payload. Each log is written straight into the payload and taken back out if it
/// does not fit.
pub fn pack(records: Vec<Queued>, shape: &Shape, now: i64) -> Packed {
    pack_within(records, shape, now, MAX_PAYLOAD_BYTES)
}

/// [`pack`] under a payload limit of `max_bytes` (see [`Packer::within`]).
pub fn pack_within(records: Vec<Queued>, shape: &Shape, now: i64, max_bytes: usize) -> Packed {
    let mut out = Packed::default();
    // A log object holds its record about twice (attributes and message) and ~150 bytes of its own.
    let estimate = records.iter().map(|q| 2 * q.body.len() + 160).sum::<usize>();
    let mut payload = Vec::with_capacity(estimate.min(MAX_PAYLOAD_BYTES) + 2);
    payload.push(b'[');
    let mut packer = Packer::within(max_bytes);
    for q in records {
        let before = payload.len();
        if !out.seqs.is_empty() {
            payload.push(b',');
        }
        let start = payload.len();
        let late = logobj::write(&mut payload, q.feed, &q.body, q.event_time, shape, now);
        let size = payload.len() - start;
        if size > MAX_LOG_BYTES {
            payload.truncate(before);
            out.too_large.push(TooLarge { seq: q.seq, feed: q.feed, key: q.key, bytes: size });
            continue;
        }
        if !packer.try_add(size) {
            payload.truncate(before);
            break;
        }
        match late {
            Late::Restamped => out.restamped += 1,
            Late::Kept => out.kept += 1,
            Late::OnTime => {}
        }
        out.seqs.push(q.seq);
    }
    if !out.seqs.is_empty() {
        payload.push(b']');
        out.payload = payload;
    }
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
        let within = |max: usize, sizes: &[usize]| {
            let mut p = Packer::within(max);
            sizes.iter().take_while(|&&s| p.try_add(s)).count()
        };
        // Under a learnt limit: 2 + 100 + 1 + 100 = 203 bytes.
        assert_eq!(within(203, &[100; 5]), 2);
        assert_eq!(within(202, &[100; 5]), 1);
        // The first log always goes; one larger than the limit takes exactly one more with it, whatever its size.
        assert_eq!(within(50, &[100; 5]), 2);
        assert_eq!(within(50, &[100, 900, 10]), 2);
        assert_eq!(within(150, &[100, 10, 10]), 3);
        // Datadog's limits still hold.
        assert_eq!(within(50, &[2_499_999, 2_499_999]), 1);
        assert_eq!(within(50, &[]), 0);
        assert_eq!(payload(["{}", "{\"a\":1}"]), b"[{},{\"a\":1}]");
        assert_eq!(payload(["{}"; 2]).len(), 2 + 2 * 2 + 1);
    }

    #[test]
    fn pack_sets_aside_logs_over_the_limit_and_counts_late_ones() {
        use crate::config::LateRecords;
        let shape = Shape {
            hostname: "h".into(),
            ddtags: String::new(),
            late_records: LateRecords::Restamp,
            max_event_age_secs: 3600,
            log_shape: crate::config::LogShape::Full,
        };
        let now = 1_800_000_000;
        let rec = |seq: i64, body: String, event_time: Option<i64>| Queued {
            seq,
            feed: Feed::Audit,
            key: format!("k{seq}"),
            event_time,
            body,
        };
        let huge = format!("{{\"x\":\"{}\"}}", "a".repeat(MAX_LOG_BYTES));
        let packed = pack(
            vec![rec(1, "{}".into(), Some(now)), rec(2, huge, Some(now)), rec(3, "{}".into(), Some(now - 7200))],
            &shape,
            now,
        );
        assert_eq!(packed.seqs, [1, 3]);
        assert_eq!((packed.restamped, packed.kept), (1, 0));
        assert_eq!(packed.too_large.len(), 1);
        assert_eq!((packed.too_large[0].seq, packed.too_large[0].key.as_str()), (2, "k2"));
        assert!(packed.too_large[0].bytes > MAX_LOG_BYTES);
        let logs: Vec<serde_json::Value> = serde_json::from_slice(&packed.payload).expect("a JSON array");
        assert_eq!(logs.len(), 2);
        assert!(pack(Vec::new(), &shape, now).payload.is_empty());
    }

    #[test]
    fn the_payload_is_the_logs_joined_and_stops_at_the_byte_limit() {
        use crate::config::LateRecords;
        let shape = Shape {
            hostname: "h".into(),
            ddtags: "a:b".into(),
            late_records: LateRecords::Restamp,
            max_event_age_secs: 3600,
            log_shape: crate::config::LogShape::Full,
        };
        let now = 1_800_000_000;
        let records: Vec<Queued> = (0..1200)
            .map(|i| {
                let feed = Feed::ALL[i % 6];
                let r = crate::sim::records::generate(feed, i as u64, now - 7000 + 20 * i as i64, 3000 + i * 7);
                Queued {
                    seq: i as i64,
                    feed,
                    key: String::new(),
                    event_time: Some(now - 7000 + 20 * i as i64),
                    body: r.to_string(),
                }
            })
            .collect();
        let packed = pack(records.clone(), &shape, now);
        let logs: Vec<String> =
            records.iter().map(|q| logobj::build(q.feed, &q.body, q.event_time, &shape, now).json).collect();
        let mut packer = Packer::default();
        let n = logs.iter().take_while(|l| packer.try_add(l.len())).count();
        assert!(n > 100 && n < 1000, "the byte limit, not the count, ends this batch: {n}");
        assert_eq!(packed.seqs, (0..n as i64).collect::<Vec<_>>());
        assert!(packed.payload.len() <= MAX_PAYLOAD_BYTES);
        assert_eq!(packed.payload, payload(logs[..n].iter().map(String::as_str)));
        assert!(packed.restamped > 0 && packed.restamped < n as i64, "{}", packed.restamped);
    }
}
