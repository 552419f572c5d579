//! Throughput and memory figures, printed (not asserted): `cargo bench --bench throughput`.
//! Runs the release binary against the in-process simulators, as a user would run it.
//!
//! 1. Collect: 60,000 records of ~1 KB over six feeds, 500 per page, from the Mimecast simulator into the queue.
//! 2. Deliver: a queue of 100,000 records of ~1 KB drained to the Datadog simulator; peak RSS of the agent.

#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mimecast_forwarder::mimecast::window::Window;
use mimecast_forwarder::mimecast::{Feed, wire};
use mimecast_forwarder::sim::datadog::{self as dd, DatadogSim};
use mimecast_forwarder::sim::mimecast::{self as mc, MimecastSim};
use mimecast_forwarder::sim::records::generate;
use mimecast_forwarder::store::{NewRecord, PageCommit, Store};
use mimecast_forwarder::{config::WhenFull, datetime};

const BIN: &str = env!("CARGO_BIN_EXE_mimecast-forwarder");

fn config(dir: &std::path::Path, mc_url: &str, dd_url: &str, log_types: &str) -> std::path::PathBuf {
    let text = format!(
        "[mimecast]\nbase_url = \"{mc_url}\"\nclient_id = \"{}\"\nclient_secret = \"{}\"\nlog_types = {log_types}\n\
         page_size = 500\ninitial_lookback_secs = 7200\nsettle_secs = 1\nmax_window_secs = 7400\n\
         [datadog]\nintake_url = \"{dd_url}\"\napi_key = \"{}\"\n[queue]\npath = \"{}\"\nmax_bytes = 10000000000\n",
        mc::CLIENT_ID,
        mc::CLIENT_SECRET,
        dd::API_KEY,
        dir.join("queue.db").display()
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs `run --once`, sampling the child's peak resident set (VmHWM) until it exits.
fn run_once(config: &std::path::Path) -> (Duration, u64, i32) {
    let start = Instant::now();
    let mut child = Command::new(BIN)
        .args(["run", "--once", "--config", config.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let status_path = format!("/proc/{}/status", child.id());
    let mut peak_kb = 0;
    loop {
        if let Ok(s) = std::fs::read_to_string(&status_path)
            && let Some(kb) = s.lines().find_map(|l| l.strip_prefix("VmHWM:"))
        {
            peak_kb = peak_kb.max(kb.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0));
        }
        if let Some(status) = child.try_wait().unwrap() {
            return (start.elapsed(), peak_kb, status.code().unwrap_or(-1));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn collect() {
    let dir = tempfile::tempdir().unwrap();
    let mimecast = MimecastSim::start().unwrap();
    let datadog = DatadogSim::start().unwrap();
    datadog.refuse_connections(true); // Measure polling alone: everything stays queued.
    let now = datetime::now();
    let per_feed = 10_000;
    for feed in Feed::ALL {
        mimecast.add(feed, (0..per_feed).map(|i| generate(feed, i, now - 7000 + (i as i64 % 6900), 1000)));
    }
    let cfg = config(
        dir.path(),
        &mimecast.url(),
        &datadog.intake_url(),
        "[\"audit\", \"dlp\", \"rejection\", \"ttp-attachment-protection\", \"ttp-impersonation\", \"ttp-url\"]",
    );
    let (elapsed, peak_kb, code) = run_once(&cfg);
    let store = Store::open(&dir.path().join("queue.db")).unwrap();
    let c = store.counters().unwrap();
    let log = mimecast.requests();
    let polling = log.last().unwrap().at - log.first().unwrap().at;
    println!(
        "collect: {} records ({} bytes) queued from {} page requests in {:.2}s of polling ({:.0} records/s); \
         whole run {:.2}s incl. giving up on the refused intake; peak RSS {} KiB; exit {code}",
        c.queue_records,
        c.queue_bytes,
        log.len(),
        polling.as_secs_f64(),
        c.queue_records as f64 / polling.as_secs_f64(),
        elapsed.as_secs_f64(),
        peak_kb
    );
    assert_eq!(c.queue_records, 6 * per_feed as i64);
}

fn deliver() {
    let dir = tempfile::tempdir().unwrap();
    let mimecast = MimecastSim::start().unwrap();
    let datadog = DatadogSim::start().unwrap();
    datadog.set_count_only(true);
    let cfg = config(dir.path(), &mimecast.url(), &datadog.intake_url(), "[\"audit\"]");
    let n = 100_000u64;
    {
        let mut store = Store::open(&dir.path().join("queue.db")).unwrap();
        let now = datetime::now();
        for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
            let feed = Feed::ALL[(chunk[0] / 1000 % 6) as usize];
            let records = chunk
                .iter()
                .map(|&i| {
                    let r = generate(feed, i, now - 600, 1000);
                    NewRecord {
                        key: wire::record_key(feed, &r),
                        event_time: wire::record_time(feed, &r),
                        body: r.to_string(),
                    }
                })
                .collect();
            let page = PageCommit {
                feed,
                window: Window { from: 0, to: 0 },
                next_token: None,
                records,
                forget_before: i64::MIN,
            };
            store.commit_page(&page, now, u64::MAX, WhenFull::Pause).unwrap();
        }
    }
    let (elapsed, peak_kb, code) = run_once(&cfg);
    let batches = datadog.batches();
    println!(
        "deliver: {} records in {} batches in {:.2}s ({:.0} records/s, {:.1} MB/s of JSON); peak RSS {} KiB; exit {code}",
        datadog.accepted_count(),
        batches.len(),
        elapsed.as_secs_f64(),
        datadog.accepted_count() as f64 / elapsed.as_secs_f64(),
        batches.iter().map(|b| b.1).sum::<usize>() as f64 / 1e6 / elapsed.as_secs_f64(),
        peak_kb
    );
    assert_eq!(datadog.accepted_count(), n as usize);
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` would pass nothing: both just run.
    collect();
    deliver();
}
