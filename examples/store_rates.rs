//! The store's own rates, without HTTP: how fast `commit_page` queues records, how fast delivered batches
//! are picked and deleted, and how many bytes the queue file takes per record. Prints figures; asserts none.
//!
//! `cargo run --release --example store_rates -- [records] [feeds]` (default 200000 records of ~1.1 KB of the
//! TTP URL feed; with `feeds` > 1, pages go to the first `feeds` feeds in turn). The queue file is made in
//! `target/store_rates/`, on the same disk as a real queue would be, and removed at the end.

#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::time::{Duration, Instant};

use mimecast_forwarder::config::WhenFull;
use mimecast_forwarder::datadog::batch;
use mimecast_forwarder::mimecast::window::Window;
use mimecast_forwarder::mimecast::{Feed, wire};
use mimecast_forwarder::sim::records::generate;
use mimecast_forwarder::store::{InFlight, NewRecord, PageCommit, Store};

const PAGE: usize = 500;
const BATCH: usize = 1000;
const WINDOW_PAGES: usize = 10;
const BASE: i64 = 1_700_000_000;
const SHRINK_PAGES: u32 = 256;

/// CPU seconds (user + system) this process used so far, from /proc (10 ms ticks).
fn cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Bytes this process handed to `write` so far (WAL, checkpoints): steadier than time on a busy machine.
fn written() -> u64 {
    let io = std::fs::read_to_string("/proc/self/io").unwrap_or_default();
    io.lines().find_map(|l| l.strip_prefix("wchar: ")).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

fn file_bytes(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Puts the closed queue at `path` back in SQLite's default layout (4 KiB pages, no incremental vacuum), as
/// older builds made it, and times the `Store::open` that rewrites it.
fn relayout_time(path: &std::path::Path, what: &str) {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.execute_batch(
        "PRAGMA journal_mode = DELETE; PRAGMA page_size = 4096; PRAGMA auto_vacuum = NONE; VACUUM; \
         PRAGMA journal_mode = WAL;",
    )
    .unwrap();
    drop(conn);
    let before = file_bytes(path);
    let start = Instant::now();
    drop(Store::open(path).unwrap());
    let took = start.elapsed();
    let conn = rusqlite::Connection::open(path).unwrap();
    let size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0)).unwrap();
    println!(
        "open of {what} in the older layout ({before} bytes): {:.2}s, after it {} bytes in {size} byte pages",
        took.as_secs_f64(),
        file_bytes(path)
    );
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let feeds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1).clamp(1, 6);
    let feed_list: Vec<Feed> =
        std::iter::once(Feed::TtpUrl).chain(Feed::ALL.into_iter().filter(|f| *f != Feed::TtpUrl)).take(feeds).collect();

    // Pages made beforehand, so that only the store is timed: 50 records a second of event time, windows of
    // ten pages, each window's last page forgetting seen keys more than overlap (300 s) + 1 h behind its end.
    let t0 = Instant::now();
    let mut pages = Vec::new();
    let mut sum_bytes = 0u64;
    for (p, chunk) in (0..n).collect::<Vec<_>>().chunks(PAGE).enumerate() {
        let feed = feed_list[p % feeds];
        let window_no = p / WINDOW_PAGES;
        let last = p % WINDOW_PAGES == WINDOW_PAGES - 1 || (p + 1) * PAGE >= n;
        let records: Vec<NewRecord> = chunk
            .iter()
            .map(|&i| {
                let r = generate(feed, i as u64, BASE + i as i64 / 50, 1100);
                let body = r.to_string();
                sum_bytes += body.len() as u64;
                NewRecord { key: wire::record_key(feed, &r), event_time: wire::record_time(feed, &r), body }
            })
            .collect();
        let to = BASE + ((window_no + 1) * WINDOW_PAGES * PAGE / 50) as i64;
        pages.push(PageCommit {
            feed,
            window: Window { from: to - (WINDOW_PAGES * PAGE / 50) as i64, to },
            next_token: (!last).then(|| format!("token-{p}")),
            records,
            forget_before: to - 300 - 3600,
        });
    }
    println!(
        "{n} records of {} feed(s), {:.0} bytes each on average; made in {:.1}s",
        feeds,
        sum_bytes as f64 / n as f64,
        t0.elapsed().as_secs_f64()
    );

    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/store_rates");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("queue.db");
    let mut store = Store::open(&path).unwrap();
    for f in &feed_list {
        store.init_cursor(*f, BASE).unwrap();
    }

    // Fill.
    let (mut commit, mut commit_cpu) = (Duration::ZERO, 0.0);
    let (mut half_ratio, mut bytes_in) = (None, 0u64);
    let w = written();
    for (i, page) in pages.iter().enumerate() {
        let (start, c) = (Instant::now(), cpu());
        store.commit_page(page, BASE, u64::MAX, WhenFull::Pause, &InFlight::NONE).unwrap();
        commit += start.elapsed();
        commit_cpu += cpu() - c;
        bytes_in += page.records.iter().map(|r| r.body.len() as u64).sum::<u64>();
        if (i + 1) * PAGE == n / 2 {
            store.checkpoint().unwrap();
            half_ratio = Some((file_bytes(&path), bytes_in));
        }
    }
    let commit_written = written() - w;
    drop(pages);
    store.checkpoint().unwrap();
    let full = file_bytes(&path);
    if n <= 50_000 {
        drop(store);
        relayout_time(&path, "the full queue");
        store = Store::open(&path).unwrap();
    }
    println!(
        "commit_page: {n} records in {:.2}s: {:.0} records/s, {:.1} µs CPU and {:.0} bytes written per record",
        commit.as_secs_f64(),
        n as f64 / commit.as_secs_f64(),
        commit_cpu * 1e6 / n as f64,
        commit_written as f64 / n as f64
    );
    if let Some((size, bytes)) = half_ratio {
        println!(
            "file at {} records: {size} bytes, {:.3}× the records' {bytes} bytes",
            n / 2,
            size as f64 / bytes as f64
        );
    }
    println!(
        "file at {n} records: {full} bytes, {:.3}× the records' {sum_bytes} bytes",
        full as f64 / sum_bytes as f64
    );

    // Drain: pick a batch as the agent does (fair order, at most 1000 logs), then delete it as delivered.
    let (mut pick, mut delete, mut delivered, mut batches) = (Duration::ZERO, Duration::ZERO, 0u64, 0u64);
    let (c, w) = (cpu(), written());
    loop {
        let start = Instant::now();
        let picked = batch::fair_order(store.candidates_within(BATCH, batch::MAX_PAYLOAD_BYTES, |_| i64::MIN).unwrap());
        let seqs: Vec<i64> = picked.iter().take(BATCH).map(|q| q.seq).collect();
        pick += start.elapsed();
        if seqs.is_empty() {
            break;
        }
        let start = Instant::now();
        delivered += store.delivered(&seqs, 0, 0, BASE).unwrap();
        delete += start.elapsed();
        batches += 1;
    }
    let (drain_cpu, drain_written) = (cpu() - c, written() - w);
    println!(
        "delivered: {delivered} records in {batches} batches: delete {:.2}s ({:.0} records/s), pick {:.2}s ({:.0} \
         records/s); for both {:.1} µs CPU and {:.0} bytes written per record",
        delete.as_secs_f64(),
        delivered as f64 / delete.as_secs_f64(),
        pick.as_secs_f64(),
        delivered as f64 / pick.as_secs_f64(),
        drain_cpu * 1e6 / delivered.max(1) as f64,
        drain_written as f64 / delivered.max(1) as f64
    );
    store.checkpoint().unwrap();
    println!("file after the drain: {} bytes", file_bytes(&path));
    let (start, mut calls, mut given) = (Instant::now(), 0, 0);
    loop {
        let n = store.shrink(SHRINK_PAGES).unwrap();
        if n == 0 {
            break;
        }
        calls += 1;
        given += n;
    }
    println!(
        "file after shrink({SHRINK_PAGES}) until it gave nothing: {} bytes; {given} bytes given back in {calls} calls, \
         {:.2}s ({:.1} ms a call)",
        file_bytes(&path),
        start.elapsed().as_secs_f64(),
        start.elapsed().as_secs_f64() * 1e3 / f64::from(calls.max(1))
    );
    drop(store);
    relayout_time(&path, "the drained queue");
    let _ = std::fs::remove_dir_all(&dir);
}
