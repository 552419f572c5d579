//! Shared helpers for the integration tests: both simulators, a temp dir with a queue, a config pointing at them.

pub mod bin;

use std::collections::HashMap;
use std::time::Duration;

use mimecast_forwarder::agent::{self, Mode, Outcome, Tuning};
use mimecast_forwarder::backoff::Backoff;
use mimecast_forwarder::config::{self, Config};
use mimecast_forwarder::mimecast::{Feed, wire};
use mimecast_forwarder::sim::datadog::{self as dd, DatadogSim};
use mimecast_forwarder::sim::mimecast::{self as mc, MimecastSim};
use mimecast_forwarder::sim::records;
use mimecast_forwarder::store::{Queued, Store};
use serde_json::Value;

pub struct Rig {
    pub mc: MimecastSim,
    pub dd: DatadogSim,
    pub dir: tempfile::TempDir,
}

/// Backoffs in milliseconds, so that failure paths run in a test's time.
pub fn fast_tuning() -> Tuning {
    Tuning {
        clock: agent::Clock::system(),
        mimecast_backoff: Backoff { base: Duration::from_millis(20), cap: Duration::from_millis(200) },
        datadog_backoff: Backoff { base: Duration::from_millis(20), cap: Duration::from_millis(200) },
        slow_retry: Duration::from_millis(300),
        token_margin: Duration::from_secs(1),
        once_attempts: 3,
        shutdown_grace: Duration::from_secs(2),
        summary_every: Duration::from_secs(60),
        ..Tuning::default()
    }
}

impl Rig {
    pub fn new() -> Rig {
        Rig { mc: MimecastSim::start().unwrap(), dd: DatadogSim::start().unwrap(), dir: tempfile::tempdir().unwrap() }
    }

    pub fn db_path(&self) -> std::path::PathBuf {
        self.dir.path().join("queue.db")
    }

    /// The config as TOML; `extra` lines per section, (section, lines), replace base lines with the same key.
    pub fn config_text(&self, extra: &[(&str, &str)]) -> String {
        let db = self.db_path().display().to_string();
        let (mc_url, dd_url) = (self.mc.url(), self.dd.intake_url());
        let base: [(&str, Vec<(&str, String)>); 4] = [
            (
                "mimecast",
                vec![
                    ("base_url", format!("{mc_url:?}")),
                    ("client_id", format!("{:?}", mc::CLIENT_ID)),
                    ("client_secret", format!("{:?}", mc::CLIENT_SECRET)),
                    ("poll_interval_secs", "1".into()),
                    ("initial_lookback_secs", "7200".into()),
                    ("settle_secs", "1".into()),
                    ("overlap_secs", "60".into()),
                    ("max_window_secs", "1800".into()),
                ],
            ),
            (
                "datadog",
                vec![
                    ("intake_url", format!("{dd_url:?}")),
                    ("api_key", format!("{:?}", dd::API_KEY)),
                    ("hostname", "\"test-host\"".into()),
                    ("tags", "[\"env:test\"]".into()),
                ],
            ),
            ("queue", vec![("path", format!("{db:?}"))]),
            ("http", vec![("timeout_secs", "5".into())]),
        ];
        let mut text = String::new();
        for (section, lines) in base {
            let extra_lines: Vec<&str> =
                extra.iter().filter(|(s, _)| *s == section).flat_map(|(_, l)| l.lines()).collect();
            let overridden = |k: &str| extra_lines.iter().any(|l| l.split('=').next().map(str::trim) == Some(k));
            text.push_str(&format!("[{section}]\n"));
            for (k, v) in lines.iter().filter(|(k, _)| !overridden(k)) {
                text.push_str(&format!("{k} = {v}\n"));
            }
            for l in extra_lines {
                text.push_str(&format!("{l}\n"));
            }
        }
        text
    }

    pub fn config(&self, extra: &[(&str, &str)]) -> Config {
        config::from_str(&self.config_text(extra), &|_| None).unwrap()
    }

    /// One `--once` pass in-process, with a hang guard ([`once_within`]).
    pub fn once(&self, cfg: &Config) -> Outcome {
        self.once_with(cfg, &fast_tuning())
    }

    pub fn once_with(&self, cfg: &Config, tuning: &Tuning) -> Outcome {
        once_within(cfg, tuning, Duration::from_secs(120))
    }

    pub fn store(&self) -> Store {
        Store::open(&self.db_path()).unwrap()
    }

    /// Every queued record, oldest first per feed.
    pub fn queued(&self) -> Vec<Queued> {
        self.store().candidates(usize::MAX >> 1).unwrap().into_iter().flatten().collect()
    }

    /// Adds `n` generated records per feed spread over the last ~2 hours; returns their keys.
    pub fn add_records(&self, feeds: &[Feed], n: u64, size: usize) -> HashMap<String, Feed> {
        let now = mimecast_forwarder::datetime::now();
        let mut keys = HashMap::new();
        for &feed in feeds {
            let recs: Vec<Value> =
                (0..n).map(|i| records::generate(feed, i, now - 7000 + (i as i64 * 37) % 6900, size)).collect();
            for r in &recs {
                keys.insert(wire::record_key(feed, r), feed);
            }
            self.mc.add(feed, recs);
        }
        keys
    }
}

/// Asserts that Datadog received every expected record exactly once and nothing else.
pub fn assert_delivered_once(dd: &DatadogSim, expected: &HashMap<String, Feed>) {
    let got = dd::record_keys(&dd.accepted());
    let missing: Vec<_> = expected.keys().filter(|k| !got.contains_key(*k)).take(5).collect();
    assert!(
        missing.is_empty(),
        "{} of {} records missing, e.g. {missing:?}",
        expected.len() - got.len().min(expected.len()),
        expected.len()
    );
    let dups: Vec<_> = got.iter().filter(|(_, n)| **n > 1).take(5).collect();
    assert!(dups.is_empty(), "duplicates: {dups:?}");
    assert_eq!(got.len(), expected.len(), "unexpected extra records");
}

/// Queues records straight into the store, as if polled earlier; returns their keys.
pub fn queue_direct(rig: &Rig, feed: Feed, records: &[Value]) -> HashMap<String, Feed> {
    use mimecast_forwarder::mimecast::window::Window;
    use mimecast_forwarder::store::{NewRecord, PageCommit};
    let mut store = rig.store();
    let mut keys = HashMap::new();
    for chunk in records.chunks(500) {
        let recs = chunk
            .iter()
            .map(|r| {
                let key = wire::record_key(feed, r);
                keys.insert(key.clone(), feed);
                NewRecord { key, event_time: wire::record_time(feed, r), body: r.to_string() }
            })
            .collect();
        let page = PageCommit {
            feed,
            window: Window { from: 0, to: 0 },
            next_token: None,
            records: recs,
            forget_before: i64::MIN,
        };
        store
            .commit_page(
                &page,
                mimecast_forwarder::datetime::now(),
                u64::MAX,
                mimecast_forwarder::config::WhenFull::Pause,
                &mimecast_forwarder::store::InFlight::NONE,
            )
            .unwrap();
    }
    keys
}

/// Runs the daemon in this thread until `done()` holds (checked every 20 ms). `limit` is a hang guard: if it
/// passes first, the daemon is stopped and the test fails.
pub fn run_daemon_until(cfg: &Config, mut done: impl FnMut() -> bool, limit: Duration) -> Outcome {
    let deadline = std::time::Instant::now() + limit;
    let mut reached = false;
    let stop = async {
        while !reached && std::time::Instant::now() < deadline {
            reached = done();
            if !reached {
                smol::Timer::after(Duration::from_millis(20)).await;
            }
        }
    };
    let out = smol::block_on(agent::run(cfg, &fast_tuning(), Mode::Daemon, stop)).unwrap();
    assert!(reached, "the daemon's run did not reach its end condition within {limit:?}");
    out
}

/// A `--once` pass on its own thread: a pass that never ends fails the test (after `limit`, a hang guard)
/// instead of hanging the suite.
pub fn once_within(cfg: &Config, tuning: &Tuning, limit: Duration) -> Outcome {
    let (cfg, tuning) = (cfg.clone(), tuning.clone());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let out = smol::block_on(agent::run(&cfg, &tuning, Mode::Once, std::future::pending()));
        let _ = tx.send(out.map_err(|e| format!("{e:#}")));
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.unwrap(),
        Err(_) => panic!("the --once pass did not end within {limit:?}"),
    }
}
