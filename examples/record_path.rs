//! CPU per record on the record path, printed (not asserted): `cargo run --release --example record_path`.
//!
//! In-process, no HTTP, no SQLite: the pure steps the agent runs for every record, on ~1.1 KB TTP URL records
//! (the generated ones from `sim::records`), 1,000 per page and per batch, the best of several rounds.
//!
//! - collect: parsing a Mimecast page, `record_key`, `record_time` and the queued body of each record;
//! - drain: building the log objects and the payload (`batch::pack`), then gzip at several levels, with the
//!   compression ratio of each.
//!
//! Other builds on the same machine make single runs noisy: run it twice and compare.

#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::io::Write;
use std::time::Instant;

use flate2::Compression;
use flate2::write::GzEncoder;
use mimecast_forwarder::config::{LateRecords, LogShape};
use mimecast_forwarder::datadog::batch;
use mimecast_forwarder::datadog::logobj::Shape;
use mimecast_forwarder::datetime;
use mimecast_forwarder::mimecast::{Feed, wire};
use mimecast_forwarder::sim::records::{self, generate};
use mimecast_forwarder::store::{NewRecord, Queued};
use serde_json::{Value, json};

const N: usize = 1000;
const ROUNDS: usize = 15;
const SIZE: usize = 1100;

/// The best of `ROUNDS` runs of `f`, in µs per record of `N`: the least disturbed by other work on the machine.
fn per_record(mut f: impl FnMut()) -> f64 {
    let mut times: Vec<f64> = (0..ROUNDS)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e6 / N as f64
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[0]
}

fn gzip(payload: &[u8], level: u32) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::with_capacity(payload.len() / 4), Compression::new(level));
    enc.write_all(payload).unwrap();
    enc.finish().unwrap()
}

fn main() {
    let feed = Feed::TtpUrl;
    let now = datetime::now();
    let records: Vec<Value> = (0..N as u64).map(|i| generate(feed, i, now - 600 + (i as i64 % 500), SIZE)).collect();
    let record_bytes = records.iter().map(|r| r.to_string().len()).sum::<usize>() as f64 / N as f64;
    let page = json!({
        "meta": {"status": 200, "pagination": {"pageSize": N, "next": "tok"}},
        "data": [{"clickLogs": records}],
        "fail": []
    })
    .to_string()
    .into_bytes();
    println!("{N} TTP URL records of {record_bytes:.0} bytes of compact JSON each; best of {ROUNDS} rounds");

    // Collect.
    let parse = per_record(|| {
        let p = wire::parse_page(feed, &page).unwrap();
        assert_eq!(p.records.len(), N);
    });
    let parsed = wire::parse_page(feed, &page).unwrap();
    let key = per_record(|| {
        for r in &parsed.records {
            std::hint::black_box(wire::record_key(feed, r));
        }
    });
    let time = per_record(|| {
        for r in &parsed.records {
            std::hint::black_box(wire::record_time(feed, r));
        }
    });
    let body = per_record(|| {
        for r in &parsed.records {
            std::hint::black_box(wire::body(r));
        }
    });

    let commit = per_record(|| {
        let p = wire::parse_page(feed, &page).unwrap();
        let rows: Vec<NewRecord> = p
            .records
            .iter()
            .map(|r| NewRecord {
                key: wire::record_key(feed, r),
                event_time: wire::record_time(feed, r),
                body: wire::body(r),
            })
            .collect();
        std::hint::black_box(rows);
    });
    println!(
        "collect µs/record: parse_page {parse:.2}, record_key {key:.2}, record_time {time:.2}, body {body:.2}; \
         page to rows in all {commit:.2}"
    );

    // Drain: the generated records, then the real fixture records (less repetitive: a fairer ratio).
    let queued: Vec<Queued> = parsed.records.iter().enumerate().map(|(i, r)| queue(i, feed, r)).collect();
    drain("generated TTP URL records", &queued, now);
    let real: Vec<(Feed, Value)> = records::fixtures().into_iter().filter(|(_, r)| r.get("meta").is_none()).collect();
    let queued: Vec<Queued> = real.iter().cycle().take(N).enumerate().map(|(i, (f, r))| queue(i, *f, r)).collect();
    drain(&format!("the {} real fixture records, cycled", real.len()), &queued, now);
}

fn queue(i: usize, feed: Feed, r: &Value) -> Queued {
    Queued {
        seq: i as i64,
        feed,
        key: wire::record_key(feed, r),
        event_time: wire::record_time(feed, r),
        body: r.to_string(),
    }
}

fn drain(what: &str, queued: &[Queued], now: i64) {
    let shape = Shape {
        hostname: "gw-01".into(),
        ddtags: "env:prod".into(),
        late_records: LateRecords::Keep,
        max_event_age_secs: 61200,
        log_shape: LogShape::Full,
    };
    let body = queued.iter().map(|q| q.body.len()).sum::<usize>() as f64 / N as f64;
    let pack = per_record(|| {
        let packed = batch::pack(queued.to_vec(), &shape, now);
        assert_eq!(packed.seqs.len(), N);
        std::hint::black_box(packed);
    });
    let clone = per_record(|| {
        std::hint::black_box(queued.to_vec());
    });
    let restamp = Shape { late_records: LateRecords::Restamp, max_event_age_secs: 60, ..shape.clone() };
    let late: Vec<Queued> = queued.iter().map(|q| Queued { event_time: Some(now - 3600), ..q.clone() }).collect();
    let restamped = per_record(|| {
        let packed = batch::pack(late.clone(), &restamp, now);
        assert_eq!(packed.restamped, N as i64);
        std::hint::black_box(packed);
    });
    let payload = batch::pack(queued.to_vec(), &shape, now).payload;
    println!(
        "drain, {what} ({body:.0} bytes each): log objects + payload {:.2} µs/record (excl. {clone:.2} cloning the \
         input), {:.2} when all are restamped; {:.0} bytes of JSON per record",
        pack - clone,
        restamped - clone,
        payload.len() as f64 / N as f64
    );
    let lean = Shape { log_shape: LogShape::Message, ..shape.clone() };
    let lean_payload = batch::pack(queued.to_vec(), &lean, now).payload;
    println!(
        "  log_shape = \"message\": {:.0} bytes of JSON per record ({:.2}x the record; \"full\": {:.2}x), {:.0} gzipped",
        lean_payload.len() as f64 / N as f64,
        lean_payload.len() as f64 / N as f64 / body,
        payload.len() as f64 / N as f64 / body,
        gzip(&lean_payload, 3).len() as f64 / N as f64
    );
    for level in [1, 2, 3, 4, 6] {
        let us = per_record(|| {
            std::hint::black_box(gzip(&payload, level));
        });
        let out = gzip(&payload, level).len();
        println!(
            "  gzip level {level}{}: {us:.2} µs/record, {:.2} ms CPU per MB of JSON, ratio {:.2} ({:.0} bytes per record)",
            if level == 3 { " (the agent's)" } else { "" },
            us * N as f64 / payload.len() as f64 * 1e3,
            payload.len() as f64 / out as f64,
            out as f64 / N as f64
        );
    }
}
