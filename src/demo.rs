//! `mimecast-forwarder demo`: the whole pipeline on this machine, against the loopback simulators, with an
//! expired token, a 429, a `fail[]` on HTTP 200, records indexed late, and a Datadog outage in the middle.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::agent::{self, Mode, Tuning};
use crate::backoff::Backoff;
use crate::config::{self, Config};
use crate::mimecast::{Feed, wire};
use crate::sim::datadog::{self as dd, DatadogSim};
use crate::sim::mimecast::{self as mc, Fault, MimecastSim};
use crate::sim::records;

/// What the demo saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub generated: usize,
    pub delivered: usize,
    pub duplicates: usize,
    pub lost: usize,
}

const PER_FEED: u64 = 400;
const LATE: u64 = 25;

/// How long the demo may take: it ends by itself within this, with its summary (it takes about 10 s on the
/// 2-core development machine). `demo --help` and the README say so, and tests hold them to it.
pub const LIMIT: Duration = Duration::from_secs(30);

/// Runs the demo, prints as it goes, and returns the exit code: 0 only if nothing was lost.
pub fn run() -> i32 {
    match run_demo(LIMIT) {
        Ok(s) => {
            crate::say!(
                "\nsummary: generated {} / delivered {} / duplicates {} / lost {}",
                s.generated,
                s.delivered,
                s.duplicates,
                s.lost
            );
            if s.lost == 0 { 0 } else { 1 }
        }
        Err(e) => {
            eprintln!("demo failed: {}", crate::error::describe(e.as_ref()));
            crate::exit::SOFTWARE
        }
    }
}

/// The demo itself, ending when everything arrived or after `limit`.
pub fn run_demo(limit: Duration) -> anyhow::Result<Summary> {
    let dir = TempDir::new()?;
    let mimecast = MimecastSim::start()?;
    let datadog = DatadogSim::start()?;
    let now = crate::datetime::now();
    let mut expected: HashMap<String, Feed> = HashMap::new();
    for feed in Feed::ALL {
        let recs: Vec<Value> =
            (0..PER_FEED).map(|i| records::generate(feed, i, now - 7000 + (i as i64 * 17) % 6900, 600)).collect();
        for r in &recs {
            expected.insert(wire::record_key(feed, r), feed);
        }
        mimecast.add(feed, recs);
    }
    // Records that Mimecast indexes late: they appear after their window was read, inside the overlap.
    let late: Vec<Value> = (0..LATE).map(|i| records::generate(Feed::Audit, 10_000 + i, now - 20, 600)).collect();
    for r in &late {
        expected.insert(wire::record_key(Feed::Audit, r), Feed::Audit);
    }
    mimecast.set_token_lifetime(Duration::from_secs(3));
    mimecast.fault_after(Some(Feed::TtpUrl), 2, Fault::RateLimit("800".into()));
    mimecast.fault_after(Some(Feed::Dlp), 1, Fault::FailOk { retryable: true });

    let cfg = demo_config(&mimecast, &datadog, &dir.0)?;
    let tuning = Tuning {
        mimecast_backoff: Backoff { base: Duration::from_millis(200), cap: Duration::from_secs(2) },
        datadog_backoff: Backoff { base: Duration::from_millis(250), cap: Duration::from_secs(2) },
        slow_retry: Duration::from_secs(5),
        token_margin: Duration::from_secs(1),
        summary_every: Duration::from_secs(3),
        ..Tuning::default()
    };
    crate::say!(
        "demo: {} records in six feeds at a simulated Mimecast ({}), {LATE} more indexed late; \
         a simulated Datadog intake ({}) will go down for a while",
        expected.len() - LATE as usize,
        mimecast.url(),
        datadog.intake_url()
    );
    let start = Instant::now();
    let total = expected.len();
    let (mut phase, mut late_added, mut next_print) = (0, false, Duration::ZERO);
    let watch = async {
        loop {
            smol::Timer::after(Duration::from_millis(100)).await;
            let t = start.elapsed();
            // The script: an outage of 503s, then refused connections, then recovery; late records meanwhile.
            if phase == 0 && t > Duration::from_millis(300) {
                crate::say!("t+{:>4.1}s  Datadog starts answering 503", t.as_secs_f64());
                datadog.set_down(Some(503));
                phase = 1;
            } else if phase == 1 && t > Duration::from_secs(3) {
                crate::say!("t+{:>4.1}s  Datadog refuses connections", t.as_secs_f64());
                datadog.set_down(None);
                datadog.refuse_connections(true);
                phase = 2;
            } else if phase == 2 && t > Duration::from_secs(5) {
                crate::say!("t+{:>4.1}s  Datadog is back", t.as_secs_f64());
                datadog.refuse_connections(false);
                phase = 3;
            }
            if !late_added && t > Duration::from_secs(2) {
                crate::say!("t+{:>4.1}s  Mimecast indexes {LATE} audit records late (20 s old)", t.as_secs_f64());
                mimecast.add(Feed::Audit, late.clone());
                late_added = true;
            }
            let arrived = dd::record_keys(&datadog.accepted()).len();
            if t >= next_print {
                crate::say!("t+{:>4.1}s  delivered {arrived} of {total}", t.as_secs_f64());
                next_print += Duration::from_secs(1);
            }
            if (phase == 3 && late_added && arrived >= total) || t > limit {
                break;
            }
        }
    };
    smol::block_on(agent::run(&cfg, &tuning, Mode::Daemon, watch))?;
    let accepted = datadog.accepted();
    let keys = dd::record_keys(&accepted);
    let delivered = keys.keys().filter(|k| expected.contains_key(*k)).count();
    // The last progress line says what the summary will: sends that were in flight at the end have landed.
    crate::say!("t+{:>4.1}s  delivered {delivered} of {total}", start.elapsed().as_secs_f64());
    Ok(Summary { generated: total, delivered, duplicates: accepted.len() - keys.len(), lost: total - delivered })
}

fn demo_config(mimecast: &MimecastSim, datadog: &DatadogSim, dir: &std::path::Path) -> anyhow::Result<Config> {
    let text = format!(
        r#"
[mimecast]
base_url = "{}"
client_id = "{}"
client_secret = "{}"
poll_interval_secs = 1
page_size = 100
initial_lookback_secs = 7200
settle_secs = 2
overlap_secs = 60
max_window_secs = 1800

[datadog]
intake_url = "{}"
api_key = "{}"
hostname = "demo"
tags = ["env:demo"]

[queue]
path = "{}"
"#,
        mimecast.url(),
        mc::CLIENT_ID,
        mc::CLIENT_SECRET,
        datadog.intake_url(),
        dd::API_KEY,
        dir.join("queue.db").display()
    );
    Ok(config::from_str(&text, &|_| None)?)
}

/// A directory removed when dropped (the demo leaves nothing behind).
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> std::io::Result<TempDir> {
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let dir = std::env::temp_dir().join(format!("mimecast-forwarder-demo-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
