//! The benchmark of issue 10, `cargo bench --bench throughput` (BENCHMARKS.md says how to read it): the raw
//! SQLite insert and delete rates of the queue's rows (the limit), collect and drain records/s and CPU µs per
//! record, drain at 0 / 50 / 200 ms intake latency, collect over six feeds at 0 / 300 / 1000 ms page latency,
//! peak RSS at 10k / 100k / 1M queued, idle CPU and RSS, and the queue file's size after fill and after drain.
//! Each figure is printed next to its goal. It prints figures; it asserts nothing about timing.
//!
//! The agent is the release binary (`run --once`, or `run` for the idle figure) against the in-process
//! simulators, as a user runs it. Its CPU is the child's own utime + stime (`/proc/<pid>/stat`, read once it has
//! exited and before it is reaped); its peak RSS is `VmHWM`, sampled every few milliseconds while it runs.
//!
//! Environment: `BENCH_QUICK=1` runs a small subset (about 2 minutes); `BENCH_ONLY=raw,collect,drain,feeds,rss,idle`
//! runs only the sections named. Scratch files go to the temp dir (`TMPDIR`); the 1M figure needs ~2 GB free.

#![allow(clippy::unwrap_used, clippy::print_stdout, clippy::print_stderr, clippy::cast_precision_loss)]

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, sync_channel};
use std::time::{Duration, Instant};

use mimecast_forwarder::config::WhenFull;
use mimecast_forwarder::datetime;
use mimecast_forwarder::mimecast::window::Window;
use mimecast_forwarder::mimecast::{Feed, wire};
use mimecast_forwarder::sim::datadog::{self as dd, DatadogSim};
use mimecast_forwarder::sim::mimecast::{self as mc, MimecastSim};
use mimecast_forwarder::sim::records::generate;
use mimecast_forwarder::store::{InFlight, NewRecord, PageCommit, Store};
use rusqlite::ToSql;
use rustix::process::{Pid, Signal, WaitId, WaitIdOptions};

const BIN: &str = env!("CARGO_BIN_EXE_mimecast-forwarder");

/// The reference workload: TTP URL records of about 1.1 KB of JSON.
const FEED: Feed = Feed::TtpUrl;
const RECORD_BYTES: usize = 1100;
/// The agent's default page size, and its batch size (Datadog's limit of 1000 logs per request).
const PAGE: u64 = 500;
const BATCH: u64 = 1000;
/// `/proc/<pid>/stat` counts CPU time in USER_HZ ticks, 100 a second on Linux.
const TICKS_PER_SEC: f64 = 100.0;

/// The goals of issue 10's table, and Fluent Bit's figures on the same workload.
mod goal {
    pub const DRAIN_RATE: f64 = 25_000.0;
    pub const DRAIN_CPU_US: f64 = 25.0;
    pub const COLLECT_RATE: f64 = 20_000.0;
    pub const COLLECT_CPU_US: f64 = 35.0;
    /// Collect and drain at least this share of the raw SQLite insert and delete rates.
    pub const RAW_SHARE: f64 = 0.3;
    pub const DRAIN_200MS_RATE: f64 = 12_000.0;
    pub const SIX_FEEDS_1S_RATE: f64 = 2_500.0;
    pub const RSS_MIB: f64 = 20.0;
    pub const DISK_PER_RECORD: f64 = 1.2;
    /// A 5-million-record backlog at 200 ms intake latency drains in less than this.
    pub const BACKLOG_MINUTES: f64 = 8.0;
    pub const FLUENT_BIT: &str = "Fluent Bit: 18.4k rec/s, 38.8 µs/rec, 68.5 MiB";
}

fn main() {
    // `cargo bench` passes --bench. `cargo test --benches` (or --all-targets) runs this too, with a debug build of
    // the agent and without --bench: figures from that would mean nothing, and take long.
    if !std::env::args().any(|a| a == "--bench") {
        println!("throughput: the figures come from `cargo bench --bench throughput` (BENCHMARKS.md); nothing to test");
        return;
    }
    let began = Instant::now();
    let scale = Scale::from_env();
    let tmp = std::env::temp_dir();
    let mut report = Report::default();
    header(&scale, &tmp);
    if scale.runs("raw") {
        raw(&mut report, &scale, &tmp);
    }
    if scale.runs("collect") {
        collect_then_drain(&mut report, &scale, &tmp);
    }
    let mut templates = Templates::new(&tmp);
    if scale.runs("drain") {
        drain_latency(&mut report, &scale, &mut templates);
    }
    if scale.runs("feeds") {
        six_feeds(&mut report, &scale, &tmp);
    }
    if scale.runs("rss") {
        rss(&mut report, &scale, &mut templates);
    }
    if scale.runs("idle") {
        idle(&mut report, &scale, &tmp);
    }
    drop(templates);
    report.summary();
    println!("\nload average at the end: {}", loadavg());
    println!("whole benchmark: {:.0} s", began.elapsed().as_secs_f64());
}

// ---------------------------------------------------------------------------------------------------------------
// Scale, report, formatting

/// How much work each section does: the full run, or `BENCH_QUICK=1`'s subset; `BENCH_ONLY` picks sections.
struct Scale {
    quick: bool,
    only: Option<Vec<String>>,
    /// Records in the raw SQLite run and in the collect → drain run.
    collect: u64,
    /// Records queued for the drain-latency runs.
    drain: u64,
    /// Records per feed in the six-feed runs.
    per_feed: u64,
    /// Queue sizes for the peak-RSS runs.
    rss: Vec<u64>,
    idle: Duration,
}

impl Scale {
    fn from_env() -> Scale {
        let quick = std::env::var("BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
        let only = std::env::var("BENCH_ONLY")
            .ok()
            .filter(|v| !v.trim().is_empty())
            .map(|v| v.split(',').map(|s| s.trim().to_lowercase()).collect());
        if quick {
            Scale {
                quick,
                only,
                collect: 20_000,
                drain: 20_000,
                per_feed: 1_450,
                rss: vec![10_000, 100_000],
                idle: Duration::from_secs(10),
            }
        } else {
            Scale {
                quick,
                only,
                collect: 200_000,
                drain: 100_000,
                per_feed: 2_900,
                rss: vec![10_000, 100_000, 1_000_000],
                idle: Duration::from_secs(60),
            }
        }
    }

    fn runs(&self, section: &str) -> bool {
        self.only.as_ref().is_none_or(|o| o.iter().any(|s| s == section))
    }
}

/// The figures as printed, kept for the summary table, and the raw rates later goals are relative to.
#[derive(Default)]
struct Report {
    raw_insert: Option<f64>,
    raw_delete: Option<f64>,
    rows: Vec<[String; 3]>,
    /// Drain figures by queue size: (peak RSS KiB, records/s, CPU µs per record).
    drains: BTreeMap<u64, (u64, f64, f64)>,
}

impl Report {
    fn figure(&mut self, name: &str, value: String, goal: String) {
        println!("{name}: {value} ({goal})");
        self.rows.push([name.to_owned(), value, goal]);
    }

    /// "≥ 0.3× raw delete rate = 12.3k", or why there is no such figure in this run.
    fn share(&self, raw: Option<f64>, what: &str) -> String {
        match raw {
            Some(r) => format!("≥ {}× raw {what} rate = {}", goal::RAW_SHARE, k(goal::RAW_SHARE * r)),
            None => format!("≥ {}× raw {what} rate: not measured in this run", goal::RAW_SHARE),
        }
    }

    fn summary(&self) {
        println!("\n## Summary\n\n| figure | measured | goal |\n|---|---:|---|");
        for [name, value, goal] in &self.rows {
            println!("| {name} | {value} | {goal} |");
        }
    }
}

/// 8200.0 → "8.2k", 950.0 → "950".
fn k(x: f64) -> String {
    if x >= 1000.0 { format!("{:.1}k", x / 1000.0) } else { format!("{x:.0}") }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

fn us(cpu_secs: f64, records: u64) -> f64 {
    cpu_secs * 1e6 / records.max(1) as f64
}

fn header(scale: &Scale, tmp: &Path) {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let commit = Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or_else(|| "unknown".into(), |o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    println!("# mimecast-forwarder benchmark (issue 10)\n");
    println!("date: {}", datetime::rfc3339(datetime::now()));
    println!("machine: {nproc} CPUs, {cpu}; load average at the start: {}", loadavg());
    println!("code: {commit}; agent binary: {BIN}");
    println!(
        "scratch: {} ({} free); scale: {}{}",
        tmp.display(),
        free_bytes(tmp).map_or("?".into(), mb),
        if scale.quick { "quick (BENCH_QUICK)" } else { "full" },
        scale.only.as_ref().map_or(String::new(), |o| format!("; sections: {}", o.join(",")))
    );
    println!(
        "workload: {} records of ~{RECORD_BYTES} B of JSON, {PAGE} per Mimecast page; rates are wall-clock (noisy on a \
         shared machine), CPU µs/record is the agent's own; \"issue:\" is the issue's \"today\" column, measured \
         with its own harness and the Datadog mock it used for Fluent Bit\n",
        FEED.name()
    );
}

/// A section's title, with the machine's load as it begins (other work on the machine slows the wall clock).
fn section(title: &str) {
    println!("## {title} (load average {})", loadavg());
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn free_bytes(dir: &Path) -> Option<u64> {
    rustix::fs::statvfs(dir).ok().map(|s| s.f_bavail.saturating_mul(s.f_frsize))
}

// ---------------------------------------------------------------------------------------------------------------
// The agent as a child process

/// What one run of the agent took.
struct Run {
    start: Instant,
    wall: Duration,
    /// The agent's utime + stime, in seconds.
    cpu: f64,
    /// The bench process's own CPU over the run (the simulators, mostly), in seconds.
    sim_cpu: f64,
    hwm_kib: u64,
    code: i32,
    /// When the progress count first moved, and when it last did.
    first: Option<Duration>,
    last: Option<Duration>,
}

/// The unit's `Environment=MALLOC_…=…` lines (glibc's malloc settings; `MALLOC_MMAP_THRESHOLD_` at least): the
/// benchmark runs the agent as the service does, whatever the unit comes to set.
fn unit_malloc_env() -> Vec<(&'static str, &'static str)> {
    let env: Vec<(&str, &str)> = include_str!("../packaging/mimecast-forwarder.service")
        .lines()
        .filter_map(|l| l.strip_prefix("Environment=")?.split_once('='))
        .filter(|(name, _)| name.starts_with("MALLOC_"))
        .collect();
    assert!(env.iter().any(|(name, _)| *name == "MALLOC_MMAP_THRESHOLD_"), "the unit sets MALLOC_MMAP_THRESHOLD_");
    env
}

/// The agent as `BENCH_WRAP` runs it, when set: a heap profiler in front of the binary (`valgrind --tool=massif`), for
/// the profile of a section, whose CPU and RSS figures are then the profiler's; `BENCH_AGENT` names another build
/// of the binary (a debug build, whose symbols the profile can name).
fn agent_command() -> Command {
    let bin = std::env::var("BENCH_AGENT").unwrap_or_else(|_| BIN.to_owned());
    let wrap = std::env::var("BENCH_WRAP").unwrap_or_default();
    let mut words = wrap.split_whitespace();
    match words.next() {
        None => Command::new(bin),
        Some(first) => {
            let mut cmd = Command::new(first);
            cmd.args(words).arg(bin);
            cmd
        }
    }
}

fn spawn(config: &Path, once: bool) -> Child {
    let log = File::create(config.with_file_name("agent.log")).unwrap();
    let mut cmd = agent_command();
    // As the systemd unit runs it: glibc's mmap threshold fixed, so the heap does not grow with a drain's length.
    cmd.envs(unit_malloc_env());
    cmd.arg("run");
    if once {
        cmd.arg("--once");
    }
    cmd.arg("--config").arg(config).env("RUST_LOG", "warn").stdout(Stdio::null()).stderr(log).spawn().unwrap()
}

/// utime + stime of a process (a zombie's too: its threads' times are summed until it is reaped), in seconds.
fn proc_cpu(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces: state is field 3.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / TICKS_PER_SEC)
}

/// A `kB` line of `/proc/<pid>/status` (`VmHWM`, `VmRSS`).
fn proc_kib(pid: &str, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix(field))?;
    line.trim().trim_end_matches("kB").trim().parse().ok()
}

/// Runs `run --once` to its end; `progress` (polled every few ms) is a count whose first and last moves are
/// timed, such as the logs the intake accepted.
fn run_once(config: &Path, progress: &dyn Fn() -> usize) -> Run {
    let sim0 = proc_cpu("self").unwrap_or(0.0);
    let start = Instant::now();
    let mut child = spawn(config, true);
    let pid = child.id().to_string();
    let (mut hwm_kib, mut seen, mut first, mut last) = (0, 0, None, None);
    loop {
        hwm_kib = hwm_kib.max(proc_kib(&pid, "VmHWM:").unwrap_or(0));
        let n = progress();
        if n != seen {
            seen = n;
            last = Some(start.elapsed());
            first = first.or(last);
        }
        // Exited, but left unreaped (WNOWAIT) so that its CPU times can still be read.
        let exited = WaitIdOptions::EXITED | WaitIdOptions::NOWAIT | WaitIdOptions::NOHANG;
        if rustix::process::waitid(WaitId::Pid(Pid::from_child(&child)), exited).unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let wall = start.elapsed();
    let cpu = proc_cpu(&pid).unwrap_or(f64::NAN);
    let code = child.wait().unwrap().code().unwrap_or(-1);
    if progress() != seen {
        last = Some(wall);
        first = first.or(last);
    }
    let sim_cpu = proc_cpu("self").unwrap_or(0.0) - sim0;
    Run { start, wall, cpu, sim_cpu, hwm_kib, code, first, last }
}

/// The agent's log, shown when it exited in a way the figure did not expect.
/// Drains the queue in `dir` with `run --once` into a counting intake: the run, records accepted, batches.
fn drain_once(dir: &Path) -> (Run, u64, usize) {
    let mimecast = MimecastSim::start().unwrap();
    let datadog = DatadogSim::start().unwrap();
    datadog.set_count_only(true);
    let cfg = config(dir, &mimecast, &datadog, &[FEED]);
    let run = run_once(&cfg, &|| datadog.accepted_count());
    check_exit(&run, &cfg, &[0]);
    (run, datadog.accepted_count() as u64, datadog.batches().len())
}

fn check_exit(run: &Run, config: &Path, expected: &[i32]) {
    if !expected.contains(&run.code) {
        let log = std::fs::read_to_string(config.with_file_name("agent.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        println!("    !! the agent exited {} (expected {expected:?}); its log ends:", run.code);
        for l in tail.iter().rev() {
            println!("    !!   {l}");
        }
    }
}

/// A config for the simulators: a `--once` pass reads each feed in one window, page after page, from 2 h (plus
/// the 300 s overlap) back to 1 s before the pass began, which holds every record (1000 to 7000 s old); the
/// queue never fills; defaults elsewhere (`poll_interval_secs` = 60 for the idle daemon).
fn config(dir: &Path, mimecast: &MimecastSim, datadog: &DatadogSim, feeds: &[Feed]) -> PathBuf {
    let names: Vec<String> = feeds.iter().map(|f| format!("\"{}\"", f.name())).collect();
    let text = format!(
        "[mimecast]\nbase_url = \"{}\"\nclient_id = \"{}\"\nclient_secret = \"{}\"\nlog_types = [{}]\n\
         page_size = {PAGE}\ninitial_lookback_secs = 7200\nsettle_secs = 1\nmax_window_secs = 86400\n\
         [datadog]\nintake_url = \"{}\"\napi_key = \"{}\"\n[queue]\npath = \"{}\"\nmax_bytes = 10000000000\n",
        mimecast.url(),
        mc::CLIENT_ID,
        mc::CLIENT_SECRET,
        names.join(", "),
        datadog.intake_url(),
        dd::API_KEY,
        dir.join("queue.db").display()
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn scratch(tmp: &Path) -> tempfile::TempDir {
    tempfile::Builder::new().prefix("mimecast-forwarder-bench-").tempdir_in(tmp).unwrap()
}

// ---------------------------------------------------------------------------------------------------------------
// Records and queue files

/// Record `i` of `n`, 1000 to 7000 s old: inside the first window, outside the overlap of the next.
fn record(feed: Feed, i: u64, n: u64, now: i64) -> serde_json::Value {
    generate(feed, i, now - 7000 + (i * 6000 / n.max(1)) as i64, RECORD_BYTES)
}

/// `n` records of the reference feed as the agent queues them (key, time, compact body), in chunks of `chunk`,
/// generated on a thread of their own so that a fill measures the store.
fn records(n: u64, chunk: u64, now: i64) -> Receiver<Vec<NewRecord>> {
    let (tx, rx) = sync_channel(4);
    std::thread::spawn(move || {
        for start in (0..n).step_by(chunk as usize) {
            let recs = (start..(start + chunk).min(n))
                .map(|i| {
                    let r = record(FEED, i, n, now);
                    NewRecord {
                        key: wire::record_key(FEED, &r),
                        event_time: wire::record_time(FEED, &r),
                        body: r.to_string(),
                    }
                })
                .collect();
            if tx.send(recs).is_err() {
                return;
            }
        }
    });
    rx
}

/// Fills a queue through the `Store` API, 5000 records per page commit (fewer syncs: the fill is preparation, not
/// a figure), and closes it checkpointed.
/// Returns the seconds spent in the store.
fn fill(path: &Path, n: u64) -> f64 {
    let now = datetime::now();
    let mut store = Store::open(path).unwrap();
    let mut in_store = Duration::ZERO;
    for recs in records(n, 5000, now) {
        let page = PageCommit {
            feed: FEED,
            window: Window { from: 0, to: 0 },
            next_token: None,
            records: recs,
            forget_before: i64::MIN,
        };
        let t = Instant::now();
        store.commit_page(&page, now, u64::MAX, WhenFull::Pause, &InFlight::NONE).unwrap();
        in_store += t.elapsed();
    }
    store.checkpoint().unwrap();
    in_store.as_secs_f64()
}

/// The queue file and its WAL, as they are on disk.
fn file_bytes(db: &Path) -> (u64, u64) {
    let len = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    (len(db), len(Path::new(&wal)))
}

/// Queued records, their bytes, and the file's free pages, read after the agent has exited.
fn queue_state(db: &Path) -> (i64, i64, u64) {
    let store = Store::open_read_only(db).unwrap();
    let c = store.counters().unwrap();
    (c.queue_records, c.queue_bytes, store.space().unwrap().reusable)
}

/// "302.1 MB (+ 4.1 MB WAL) = 1510 B per record = 1.37× the record's 1101 B"
fn per_record(db: &Path, records: i64, bytes: i64) -> String {
    let (file, wal) = file_bytes(db);
    let (per, record) = ((file + wal) as f64 / records.max(1) as f64, bytes as f64 / records.max(1) as f64);
    format!(
        "{} (+ {} WAL) = {per:.0} B per record = {:.2}× the record's {record:.0} B",
        mb(file),
        mb(wal),
        per / record
    )
}

/// Queue files filled once through the `Store` API and copied for each run that drains one.
struct Templates {
    tmp: PathBuf,
    dir: tempfile::TempDir,
    filled: BTreeMap<u64, PathBuf>,
}

impl Templates {
    fn new(tmp: &Path) -> Templates {
        Templates { tmp: tmp.to_owned(), dir: scratch(tmp), filled: BTreeMap::new() }
    }

    /// A queue of `n` records at `dest` (a copy of the template, filled the first time it is asked for).
    fn copy(&mut self, n: u64, dest: &Path) {
        let template = self.filled.entry(n).or_insert_with(|| {
            let path = self.dir.path().join(format!("{n}.db"));
            let secs = fill(&path, n);
            println!("    (filled {n} records through the Store API: {} rec/s in the store)", k(n as f64 / secs));
            path
        });
        std::fs::copy(&*template, dest).unwrap();
    }

    /// A queue of `n` records at `dest` for the last time: the template moves there, or the queue is filled
    /// there (no copy of a large file, no second file on the disk).
    fn take(&mut self, n: u64, dest: &Path) {
        match self.filled.remove(&n) {
            Some(template) => std::fs::rename(template, dest).unwrap(),
            None => {
                let secs = fill(dest, n);
                println!("    (filled {n} records through the Store API: {} rec/s in the store)", k(n as f64 / secs));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Sections

/// The limit: the same rows inserted into and deleted from a queue file with the queue's own schema and pragmas,
/// by plain SQL (set-based, one transaction per page of 500 / batch of 1000), and through the `Store` API.
fn raw(report: &mut Report, scale: &Scale, tmp: &Path) {
    section("Raw SQLite: the same rows, the queue's schema and pragmas (WAL, synchronous = FULL)");
    let dir = scratch(tmp);
    let n = scale.collect;
    let (raw_path, store_path) = (dir.path().join("raw.db"), dir.path().join("store.db"));
    // Store::open creates the schema with its indexes, auto_vacuum and WAL mode; synchronous is per connection.
    drop(Store::open(&raw_path).unwrap());
    let mut conn = rusqlite::Connection::open(&raw_path).unwrap();
    conn.pragma_update(None, "synchronous", "FULL").unwrap();
    let queue_cols = columns(&conn, "queue", &["feed", "key", "event_time", "queued_at", "bytes", "body"]);
    // The table new seen keys go into: `seen` itself, or the small table in front of it where the schema has one
    // (`seen` is then a view over both).
    let seen = ["seen_recent", "seen"]
        .into_iter()
        .find(|t| {
            let sql = "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = ?1";
            conn.query_row(sql, [t], |r| r.get::<_, i64>(0)).unwrap() == 1
        })
        .expect("the queue file has a table of seen keys");
    let seen_cols = columns(&conn, seen, &["feed", "key", "horizon"]);
    let insert_sql = |table: &str, cols: &[String]| {
        let marks: Vec<String> = (1..=cols.len()).map(|i| format!("?{i}")).collect();
        format!("INSERT INTO {table} ({}) VALUES ({})", cols.join(", "), marks.join(", "))
    };
    let (queue_sql, seen_sql) = (insert_sql("queue", &queue_cols), insert_sql(seen, &seen_cols));
    let mut store = Store::open(&store_path).unwrap();
    let now = datetime::now();
    let (feed, window) = (FEED.name(), Window { from: 0, to: 0 });
    let (mut raw_insert, mut store_insert, mut body_bytes) = (Duration::ZERO, Duration::ZERO, 0u64);
    // The share of COMMIT (the WAL's sync): what makes these rates follow the disk's mood.
    let (mut insert_commit, mut delete_commit) = (Duration::ZERO, Duration::ZERO);
    for recs in records(n, PAGE, now) {
        let t = Instant::now();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).unwrap();
        {
            let (mut q, mut s) = (tx.prepare_cached(&queue_sql).unwrap(), tx.prepare_cached(&seen_sql).unwrap());
            for r in &recs {
                let bytes = r.body.len() as i64;
                let horizon = r.event_time.unwrap_or(0);
                let value = |c: &str| -> &dyn ToSql {
                    match c {
                        "feed" => &feed,
                        "key" => &r.key,
                        "event_time" => &r.event_time,
                        "queued_at" => &now,
                        "bytes" => &bytes,
                        "horizon" => &horizon,
                        _ => &r.body,
                    }
                };
                s.execute(rusqlite::params_from_iter(seen_cols.iter().map(|c| value(c)))).unwrap();
                q.execute(rusqlite::params_from_iter(queue_cols.iter().map(|c| value(c)))).unwrap();
            }
        }
        let c = Instant::now();
        tx.commit().unwrap();
        insert_commit += c.elapsed();
        raw_insert += t.elapsed();
        body_bytes += recs.iter().map(|r| r.body.len() as u64).sum::<u64>();
        let page = PageCommit { feed: FEED, window, next_token: None, records: recs, forget_before: i64::MIN };
        let t = Instant::now();
        store.commit_page(&page, now, u64::MAX, WhenFull::Pause, &InFlight::NONE).unwrap();
        store_insert += t.elapsed();
    }
    // Outside the timing: the WAL folded into the file, so that the file holds every row.
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())).unwrap();
    let (file, wal) = file_bytes(&raw_path);
    let per = (file + wal) as f64 / n as f64;
    let first: i64 = conn.query_row("SELECT MIN(seq) FROM queue", [], |r| r.get(0)).unwrap();
    let mut raw_delete = Duration::ZERO;
    for start in (first..first + n as i64).step_by(BATCH as usize) {
        let t = Instant::now();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).unwrap();
        tx.prepare_cached("DELETE FROM queue WHERE seq >= ?1 AND seq < ?2")
            .unwrap()
            .execute([start, start + BATCH as i64])
            .unwrap();
        let c = Instant::now();
        tx.commit().unwrap();
        delete_commit += c.elapsed();
        raw_delete += t.elapsed();
    }
    let left: i64 = conn.query_row("SELECT COUNT(*) FROM queue", [], |r| r.get(0)).unwrap();
    let first = store.candidates(1).unwrap()[0][0].seq;
    let mut store_delete = Duration::ZERO;
    for start in (first..first + n as i64).step_by(BATCH as usize) {
        let seqs: Vec<i64> = (start..start + BATCH as i64).collect();
        let t = Instant::now();
        store.delivered(&seqs, 0, 0, now).unwrap();
        store_delete += t.elapsed();
    }
    let store_left = store.counters().unwrap().queue_records;
    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    report.raw_insert = Some(rate(raw_insert));
    report.raw_delete = Some(rate(raw_delete));
    println!(
        "    {n} rows of {:.0} B: queue + {seen} rows inserted {PAGE} per transaction, deleted {BATCH} per set-based \
         DELETE; \
         file after insert {} (+ {} WAL) = {per:.0} B per row = {:.2}× the record; rows left {left}; COMMIT (the \
         sync) took {:.0} % of the insert time and {:.0} % of the delete time",
        body_bytes as f64 / n as f64,
        mb(file),
        mb(wal),
        per / (body_bytes as f64 / n as f64),
        insert_commit.as_secs_f64() * 100.0 / raw_insert.as_secs_f64(),
        delete_commit.as_secs_f64() * 100.0 / raw_delete.as_secs_f64()
    );
    println!(
        "    Store API (commit_page per {PAGE}, delivered per {BATCH}): insert {} rec/s, delete {} rec/s; rows left \
         {store_left}",
        k(rate(store_insert)),
        k(rate(store_delete))
    );
    report.figure(
        "raw SQLite insert",
        format!("{} rec/s", k(rate(raw_insert))),
        "the limit collect is compared with".into(),
    );
    report.figure(
        "raw SQLite delete",
        format!("{} rec/s", k(rate(raw_delete))),
        "the limit drain is compared with".into(),
    );
    println!();
}

/// The columns of `table` to insert, from `PRAGMA table_info`: the `known` ones (the rowid alias left out).
/// A new column without a default stops the benchmark with what to change here.
fn columns(conn: &rusqlite::Connection, table: &str, known: &[&str]) -> Vec<String> {
    let mut stmt = conn.prepare(&format!("PRAGMA table_info({table})")).unwrap();
    let rows: Vec<(String, bool, bool, bool)> = stmt
        .query_map([], |r| {
            Ok((
                r.get(1)?,
                r.get::<_, i64>(3)? != 0,
                r.get::<_, Option<String>>(4)?.is_some(),
                r.get::<_, i64>(5)? != 0,
            ))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let mut out = Vec::new();
    for (name, not_null, default, pk) in rows {
        if known.contains(&name.as_str()) {
            out.push(name);
        } else if not_null && !default && !(pk && table == "queue") {
            panic!("the {table} table has a new column {name}: give it a value in benches/throughput.rs's raw insert");
        }
    }
    out
}

/// Collect: the Mimecast simulator's records into the queue (the intake refuses connections, so everything
/// stays queued); then drain that same queue into the Datadog simulator.
fn collect_then_drain(report: &mut Report, scale: &Scale, tmp: &Path) {
    let n = scale.collect;
    section(&format!("Collect {n} records (one feed, {}), then drain them", FEED.name()));
    let dir = scratch(tmp);
    let db = dir.path().join("queue.db");
    let mimecast = MimecastSim::start().unwrap();
    let datadog = DatadogSim::start().unwrap();
    datadog.refuse_connections(true);
    let now = datetime::now();
    mimecast.add(FEED, (0..n).map(|i| record(FEED, i, n, now)));
    let cfg = config(dir.path(), &mimecast, &datadog, &[FEED]);
    let run = run_once(&cfg, &|| 0);
    check_exit(&run, &cfg, &[69, 75]);
    let log = mimecast.requests();
    let polled = log.iter().map(|l| l.at).max().map_or(run.wall, |at| at - run.start);
    let (queued, bytes, _) = queue_state(&db);
    let q = queued.max(0) as u64;
    let rate = q as f64 / polled.as_secs_f64();
    let cpu = us(run.cpu, q);
    println!(
        "    {queued} records queued from {} page requests; last page answered {:.1} s after start, exit {} after \
         {:.1} s \
         (the refused intake given up on); simulators {:.1} µs/record",
        log.len(),
        polled.as_secs_f64(),
        run.code,
        run.wall.as_secs_f64(),
        us(run.sim_cpu, q)
    );
    report.figure(
        "collect",
        format!("{} rec/s", k(rate)),
        format!("goal ≥ {}; {}; issue: 6.8k", k(goal::COLLECT_RATE), report.share(report.raw_insert, "insert")),
    );
    report.figure(
        "collect CPU",
        format!("{cpu:.1} µs/rec ({:.2} s)", run.cpu),
        format!("goal ≤ {} µs; issue: 98 µs; {}", goal::COLLECT_CPU_US, goal::FLUENT_BIT),
    );
    report.figure("peak RSS, collect", mib(run.hwm_kib), format!("goal ≤ {} MiB; issue: 31.5 MiB", goal::RSS_MIB));
    report.figure(
        &format!("queue file after collecting {}", short(n)),
        per_record(&db, queued, bytes),
        format!("goal ≤ {}× the record; issue: 1.37×", goal::DISK_PER_RECORD),
    );

    let (run, sent, batches) = drain_once(dir.path());
    drain_figures(report, "drain 0 ms", &run, sent, batches);
    let (file, wal) = file_bytes(&db);
    let (left, _, free) = queue_state(&db);
    report.figure(
        &format!("queue file after draining {}", short(n)),
        format!("{} (+ {} WAL), {} of it free pages; {left} records left", mb(file), mb(wal), mb(free)),
        "goal: gives the space back; issue: stays at 302 MB, 99 % free".into(),
    );
    report.drains.insert(n, (run.hwm_kib, sent as f64 / run.wall.as_secs_f64(), us(run.cpu, sent)));
    println!();
}

/// 200000 → "200k", 1000000 → "1M".
fn short(n: u64) -> String {
    match n {
        n if n >= 1_000_000 && n.is_multiple_of(1_000_000) => format!("{}M", n / 1_000_000),
        n if n >= 1000 && n.is_multiple_of(1000) => format!("{}k", n / 1000),
        n => n.to_string(),
    }
}

/// The figures of a drain at 0 ms: records/s, CPU per record, peak RSS, each with its goal.
fn drain_figures(report: &mut Report, name: &str, run: &Run, sent: u64, batches: usize) {
    let rate = sent as f64 / run.wall.as_secs_f64();
    println!(
        "    {sent} records in {batches} batches in {:.1} s, exit {}; first batch accepted at {:.2} s, last at \
         {:.2} s; \
         simulators {:.1} µs/record",
        run.wall.as_secs_f64(),
        run.code,
        run.first.unwrap_or_default().as_secs_f64(),
        run.last.unwrap_or_default().as_secs_f64(),
        us(run.sim_cpu, sent)
    );
    report.figure(
        name,
        format!("{} rec/s", k(rate)),
        format!("goal ≥ {}; {}; issue: 8.2k", k(goal::DRAIN_RATE), report.share(report.raw_delete, "delete")),
    );
    report.figure(
        &format!("{name} CPU"),
        format!("{:.1} µs/rec ({:.2} s)", us(run.cpu, sent), run.cpu),
        format!("goal ≤ {} µs; issue: 77.6 µs; {}", goal::DRAIN_CPU_US, goal::FLUENT_BIT),
    );
    report.figure(
        &format!("{name} peak RSS"),
        mib(run.hwm_kib),
        format!("goal ≤ {} MiB; issue: 17.9 MiB", goal::RSS_MIB),
    );
}

/// Drain a queue filled through the `Store` API, with the intake answering after 0, 50 and 200 ms.
fn drain_latency(report: &mut Report, scale: &Scale, templates: &mut Templates) {
    let n = scale.drain;
    section(&format!("Drain {} queued records at 0 / 50 / 200 ms intake latency", short(n)));
    for ms in [0, 50, 200] {
        let dir = scratch(&templates.tmp);
        templates.copy(n, &dir.path().join("queue.db"));
        let mimecast = MimecastSim::start().unwrap();
        let datadog = DatadogSim::start().unwrap();
        datadog.set_count_only(true);
        datadog.set_latency(Duration::from_millis(ms));
        let cfg = config(dir.path(), &mimecast, &datadog, &[FEED]);
        let run = run_once(&cfg, &|| datadog.accepted_count());
        check_exit(&run, &cfg, &[0]);
        let sent = datadog.accepted_count() as u64;
        let rate = sent as f64 / run.wall.as_secs_f64();
        let batches = datadog.batches().len();
        if ms == 0 {
            drain_figures(report, &format!("drain 0 ms ({})", short(n)), &run, sent, batches);
            report.drains.insert(n, (run.hwm_kib, rate, us(run.cpu, sent)));
            continue;
        }
        // One request in flight: each batch costs the latency plus the local work.
        let serial_bound = BATCH as f64 / (ms as f64 / 1000.0);
        println!(
            "    {sent} records in {batches} batches in {:.1} s, exit {}; {:.1} µs CPU/rec; peak RSS {}; one request \
             in \
             flight can do at most {} rec/s",
            run.wall.as_secs_f64(),
            run.code,
            us(run.cpu, sent),
            mib(run.hwm_kib),
            k(serial_bound)
        );
        let goal = if ms == 200 {
            format!("goal ≥ {}; issue: 2.96k", k(goal::DRAIN_200MS_RATE))
        } else {
            "no goal of its own: between 0 ms and 200 ms".into()
        };
        report.figure(&format!("drain {ms} ms"), format!("{} rec/s", k(rate)), goal);
        if ms == 200 {
            report.figure(
                "5M backlog at 200 ms",
                format!("{:.1} min", 5e6 / rate / 60.0),
                format!("goal < {} min; issue: ~28 min", goal::BACKLOG_MINUTES),
            );
        }
    }
    println!();
}

/// Collect over the six feeds with every Mimecast page answered after 0, 300 and 1000 ms.
fn six_feeds(report: &mut Report, scale: &Scale, tmp: &Path) {
    let n = scale.per_feed;
    section(&format!("Collect over six feeds, {n} records each, at 0 / 300 / 1000 ms page latency"));
    for ms in [0, 300, 1000] {
        let dir = scratch(tmp);
        let mimecast = MimecastSim::start().unwrap();
        let datadog = DatadogSim::start().unwrap();
        datadog.refuse_connections(true);
        let now = datetime::now();
        for feed in Feed::ALL {
            mimecast.add(feed, (0..n).map(|i| record(feed, i, n, now)));
        }
        mimecast.set_latency(Duration::from_millis(ms));
        let cfg = config(dir.path(), &mimecast, &datadog, &Feed::ALL);
        let run = run_once(&cfg, &|| 0);
        check_exit(&run, &cfg, &[69, 75]);
        let log = mimecast.requests();
        let polled = log.iter().map(|l| l.at).max().map_or(run.wall, |at| at - run.start);
        let (queued, _, _) = queue_state(&dir.path().join("queue.db"));
        let q = queued.max(0) as u64;
        let rate = q as f64 / polled.as_secs_f64();
        // Pages served one at a time can do at most a page per latency.
        let serial = if ms > 0 {
            format!("; one page at a time can do at most {} rec/s", k(PAGE as f64 * 1000.0 / ms as f64))
        } else {
            String::new()
        };
        println!(
            "    {queued} records from {} page requests, last answered at {:.1} s; {:.1} µs CPU/rec; peak RSS \
             {}{serial}",
            log.len(),
            polled.as_secs_f64(),
            us(run.cpu, q),
            mib(run.hwm_kib)
        );
        let goal = match ms {
            1000 => format!(
                "goal ≥ {} (each feed its own request in flight); issue: serial ≤ 500",
                k(goal::SIX_FEEDS_1S_RATE)
            ),
            _ => "no goal of its own".into(),
        };
        report.figure(&format!("six feeds, {ms} ms pages"), format!("{} rec/s", k(rate)), goal);
    }
    println!();
}

/// Peak RSS of a drain at 10k / 100k / 1M queued (filled through the `Store` API), with the file sizes.
fn rss(report: &mut Report, scale: &Scale, templates: &mut Templates) {
    section(&format!(
        "Peak RSS of a drain at {} queued",
        scale.rss.iter().map(|&n| short(n)).collect::<Vec<_>>().join(" / ")
    ));
    for &n in &scale.rss {
        if let Some(&(hwm, rate, cpu)) = report.drains.get(&n) {
            println!("    {}: measured above ({} rec/s, {cpu:.1} µs/rec)", short(n), k(rate));
            report.figure(
                &format!("drain peak RSS at {}", short(n)),
                mib(hwm),
                format!("goal ≤ {} MiB, flat", goal::RSS_MIB),
            );
            continue;
        }
        // The file (~1.5 KB a record today) and room for its WAL and checkpoints, with a margin.
        let need = n * 1500 * 2 + (1 << 30);
        let tmp = templates.tmp.clone();
        let free = free_bytes(&tmp).unwrap_or(0);
        if free < need {
            println!(
                "    {}: SKIPPED: {} needs ~{} free in {}, which has {}",
                short(n),
                short(n),
                mb(need),
                tmp.display(),
                mb(free)
            );
            report.figure(
                &format!("drain peak RSS at {}", short(n)),
                "skipped (disk)".into(),
                format!("goal ≤ {} MiB, flat", goal::RSS_MIB),
            );
            continue;
        }
        let dir = scratch(&tmp);
        let db = dir.path().join("queue.db");
        templates.take(n, &db);
        let (queued, bytes, _) = queue_state(&db);
        let after_fill = per_record(&db, queued, bytes);
        let (run, sent, _) = drain_once(dir.path());
        let (file, wal) = file_bytes(&db);
        let (left, _, free) = queue_state(&db);
        println!(
            "    {}: {sent} records in {:.1} s ({} rec/s, first batch at {:.2} s), {:.1} µs CPU/rec; file after fill \
             {after_fill}; \
             after drain {} (+ {} WAL), {} free pages, {left} left",
            short(n),
            run.wall.as_secs_f64(),
            k(sent as f64 / run.wall.as_secs_f64()),
            run.first.unwrap_or_default().as_secs_f64(),
            us(run.cpu, sent),
            mb(file),
            mb(wal),
            mb(free)
        );
        report.drains.insert(n, (run.hwm_kib, sent as f64 / run.wall.as_secs_f64(), us(run.cpu, sent)));
        report.figure(
            &format!("drain peak RSS at {}", short(n)),
            mib(run.hwm_kib),
            format!("goal ≤ {} MiB, flat", goal::RSS_MIB),
        );
    }
    let peaks: Vec<u64> = scale.rss.iter().filter_map(|n| report.drains.get(n).map(|d| d.0)).collect();
    if let (Some(lo), Some(hi)) = (peaks.iter().min(), peaks.iter().max()) {
        report.figure(
            &format!("drain peak RSS from {} to {}", short(scale.rss[0]), short(*scale.rss.last().unwrap())),
            format!("{} to {} ({:.2}×)", mib(*lo), mib(*hi), *hi as f64 / (*lo).max(1) as f64),
            "goal: flat".into(),
        );
    }
    println!();
}

/// The daemon with nothing to do: CPU and RSS over a quiet minute, after its first poll of every feed.
fn idle(report: &mut Report, scale: &Scale, tmp: &Path) {
    section(&format!("Idle: `run` (daemon) with nothing to collect or send, {} s", scale.idle.as_secs()));
    let dir = scratch(tmp);
    let mimecast = MimecastSim::start().unwrap();
    let datadog = DatadogSim::start().unwrap();
    let cfg = config(dir.path(), &mimecast, &datadog, &Feed::ALL);
    let mut child = spawn(&cfg, false);
    let pid = child.id().to_string();
    // Started: every feed has been polled once.
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let log = mimecast.requests();
        if Feed::ALL.iter().all(|f| log.iter().any(|l| l.feed == Some(*f))) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_secs(1));
    let (cpu0, requests0) = (proc_cpu(&pid).unwrap_or(f64::NAN), mimecast.requests().len());
    let switches0 = context_switches(&pid);
    std::thread::sleep(scale.idle);
    let cpu = proc_cpu(&pid).unwrap_or(f64::NAN) - cpu0;
    let switches1 = context_switches(&pid);
    // A thread that lived through the window: its switches in it; one that ended or began meanwhile counts what
    // it did while it was seen.
    let wakeups: u64 = switches1.iter().map(|(tid, n)| n - switches0.get(tid).copied().unwrap_or(0).min(*n)).sum();
    let (rss_kib, hwm_kib) = (proc_kib(&pid, "VmRSS:").unwrap_or(0), proc_kib(&pid, "VmHWM:").unwrap_or(0));
    let polls = mimecast.requests().len() - requests0;
    rustix::process::kill_process(Pid::from_child(&child), Signal::TERM).unwrap();
    let code = child.wait().unwrap().code().unwrap_or(-1);
    println!(
        "    {polls} page requests in the quiet {} s (poll_interval_secs = 60); peak RSS {}; exit {code} on SIGTERM",
        scale.idle.as_secs(),
        mib(hwm_kib)
    );
    report.figure(
        &format!("idle CPU over {} s", scale.idle.as_secs()),
        format!("{:.0} ms ({:.3} % of a CPU; in 10 ms ticks)", cpu * 1000.0, cpu * 100.0 / scale.idle.as_secs_f64()),
        "no goal in the table: watch for regressions".into(),
    );
    report.figure("idle RSS", mib(rss_kib), format!("goal ≤ {} MiB", goal::RSS_MIB));
    report.figure(
        "idle threads, wake-ups",
        format!(
            "{} threads; {:.1} wake-ups/s (context switches of every thread)",
            switches1.len(),
            wakeups as f64 / scale.idle.as_secs_f64()
        ),
        "issue 19: ≤ 4 threads, ≤ 1 wake-up/s".into(),
    );
    println!();
}

/// Each thread of `pid` and its context switches so far (voluntary and not): each one is a wake-up, a sleep ended.
fn context_switches(pid: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let tid = task.file_name().to_string_lossy().into_owned();
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else { continue };
        let n = status
            .lines()
            .filter(|l| l.starts_with("voluntary_ctxt_switches:") || l.starts_with("nonvoluntary_ctxt_switches:"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum();
        out.insert(tid, n);
    }
    out
}
