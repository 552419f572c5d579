//! The agent's own health in Datadog: gauges of the queue, the counters and each feed's lag and error state
//! (`POST /api/v2/series`), and service checks that say whether it can deliver and whether each feed can poll
//! (`POST /api/v1/check_run`), to the site and with the API key that the logs go to.
//!
//! [`payloads`] builds both bodies from a [`Report`] (what `status` shows), what the machines know that
//! the store does not ([`Live`]: a refusal that needs an operator), the time, the host and the tags. It is pure.
//! [`Reporter`] is the shell around it: when a report is due, at most one in flight on the blocking pool, and how
//! a failure is logged. Telemetry never waits on or delays a log send: the loop only reads the report (a few
//! indexed reads, once per interval) and starts a task it never awaits; a send that fails is logged and dropped,
//! never queued or retried, since a gap in the metrics is itself the signal.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde_json::{Value, json};
use smol::Task;

use crate::config::{Config, Secret, TelemetryConfig};
use crate::http::{Http, Url};
use crate::mimecast::Feed;
use crate::status::{FeedReport, Report};

/// Records in the queue.
pub const QUEUE_RECORDS: &str = "mimecast_forwarder.queue.records";
/// Bytes the queued records take (what `queue.max_bytes` limits).
pub const QUEUE_BYTES: &str = "mimecast_forwarder.queue.bytes";
/// How long the oldest queued record has waited, in seconds; 0 when the queue is empty.
pub const QUEUE_OLDEST_AGE: &str = "mimecast_forwarder.queue.oldest_age_secs";
/// Records delivered since the queue was created (monotonic: graph it with `monotonic_diff`).
pub const DELIVERED: &str = "mimecast_forwarder.delivered.records";
/// Records in the dead-letter table now.
pub const DEAD_LETTERS: &str = "mimecast_forwarder.dead_letters.records";
/// Records dropped by `when_full = "drop-oldest"` since the queue was created (monotonic).
pub const DROPPED: &str = "mimecast_forwarder.dropped.records";
/// Late records sent with a new timestamp since the queue was created (monotonic).
pub const LATE_RESTAMPED: &str = "mimecast_forwarder.late.restamped";
/// Late records sent unchanged (`late_records = "keep"`), at risk of Datadog's silent drop (monotonic).
pub const LATE_KEPT: &str = "mimecast_forwarder.late.kept";
/// Per feed (`feed:<name>`): seconds between now and the feed's watermark.
pub const FEED_LAG: &str = "mimecast_forwarder.feed.lag_secs";
/// Per feed (`feed:<name>`): 0 polling, 1 failing and retrying, 2 refused until an operator acts (the status of
/// its service check, less the pauses that concern every feed).
pub const FEED_ERROR: &str = "mimecast_forwarder.feed.error";

/// The metrics sent once per enabled feed, tagged `feed:<name>`; the others in [`METRICS`] go once per report.
const PER_FEED: [&str; 2] = [FEED_LAG, FEED_ERROR];

/// Every metric name the agent sends: the shipped dashboard and monitors may use these and no others.
pub const METRICS: &[&str] = &[
    QUEUE_RECORDS,
    QUEUE_BYTES,
    QUEUE_OLDEST_AGE,
    DELIVERED,
    DEAD_LETTERS,
    DROPPED,
    LATE_RESTAMPED,
    LATE_KEPT,
    FEED_LAG,
    FEED_ERROR,
];

/// CRITICAL while the intake refuses the key or the URL; WARNING while the oldest queued record is older than
/// [`OLD_QUEUE_SECS`]; OK otherwise. Tagged with the configured tags.
pub const CAN_DELIVER: &str = "mimecast_forwarder.can_deliver";
/// Per enabled feed (`feed:<name>`): CRITICAL while the feed is refused until an operator acts (credentials, a
/// permission), WARNING while it fails and retries or while polling is paused (queue or disk full), OK otherwise.
pub const FEED_CAN_POLL: &str = "mimecast_forwarder.feed.can_poll";

/// Every service check the agent sends.
pub const CHECKS: &[&str] = &[CAN_DELIVER, FEED_CAN_POLL];

/// `can_deliver` warns when the oldest queued record has waited longer than this (the shipped monitor's
/// threshold too).
pub const OLD_QUEUE_SECS: i64 = 3600;

/// Datadog cuts service-check messages longer than this.
const MAX_MESSAGE: usize = 500;

/// How many timeseries (custom metrics, which Datadog bills) one agent creates with `feeds` feeds enabled, for
/// one combination of host name and configured tags.
pub const fn timeseries(feeds: usize) -> usize {
    METRICS.len() - PER_FEED.len() + PER_FEED.len() * feeds
}

/// What the machines know that the store does not.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Live {
    /// The intake refuses the key or the URL, and has accepted nothing since (`Sender::refused`).
    pub datadog_refused: bool,
    /// Feeds refused until an operator acts, or given up (`Poller::refused`).
    pub feeds_refused: Vec<Feed>,
}

/// A service check's status, as Datadog numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    Ok = 0,
    Warning = 1,
    Critical = 2,
}

/// The two request bodies of one report.
#[derive(Debug, Clone, PartialEq)]
pub struct Payloads {
    /// For `POST /api/v2/series`: `{"series": [...]}`.
    pub series: Value,
    /// For `POST /api/v1/check_run`: an array of checks.
    pub checks: Value,
}

/// Builds one report's metrics and service checks. Pure: everything comes in as parameters. Only enabled feeds
/// are reported; `tags` (the configured ones) go on every series and check.
pub fn payloads(r: &Report, live: &Live, now: i64, host: &str, tags: &[String]) -> Payloads {
    let gauge = |metric: &str, value: i64, extra: Option<&str>| {
        let tags: Vec<&str> = extra.into_iter().chain(tags.iter().map(String::as_str)).collect();
        json!({"metric": metric, "type": 3, "points": [{"timestamp": now, "value": value as f64}], "tags": tags,
               "resources": [{"name": host, "type": "host"}]})
    };
    let check = |name: &str, (status, message): (Status, String), extra: Option<&str>| {
        let tags: Vec<&str> = extra.into_iter().chain(tags.iter().map(String::as_str)).collect();
        json!({"check": name, "host_name": host, "status": status as u8, "timestamp": now,
               "message": cut(&message, MAX_MESSAGE), "tags": tags})
    };
    let q = &r.queue;
    let mut series = vec![
        gauge(QUEUE_RECORDS, q.records, None),
        gauge(QUEUE_BYTES, q.bytes, None),
        gauge(QUEUE_OLDEST_AGE, q.oldest_age_secs.unwrap_or(0), None),
        gauge(DELIVERED, r.delivered.records, None),
        gauge(DEAD_LETTERS, r.dead_letters.records, None),
        gauge(DROPPED, r.dropped.records, None),
        gauge(LATE_RESTAMPED, r.late.restamped, None),
        gauge(LATE_KEPT, r.late.kept, None),
    ];
    let mut checks = vec![check(CAN_DELIVER, can_deliver(r, live), None)];
    for f in r.feeds.iter().filter(|f| f.enabled) {
        let tag = format!("feed:{}", f.feed.name());
        let refused = live.feeds_refused.contains(&f.feed);
        if let Some(w) = f.watermark {
            series.push(gauge(FEED_LAG, now.saturating_sub(w.0).max(0), Some(&tag)));
        }
        series.push(gauge(FEED_ERROR, feed_state(f, refused).0 as i64, Some(&tag)));
        checks.push(check(FEED_CAN_POLL, can_poll(r, f, refused), Some(&tag)));
    }
    Payloads { series: json!({ "series": series }), checks: Value::Array(checks) }
}

/// Whether the agent can deliver: the intake's refusal first, then the age of the queue.
fn can_deliver(r: &Report, live: &Live) -> (Status, String) {
    let q = &r.queue;
    let last_error = r.datadog.last_error.as_deref().map(|e| format!("; last error: {e}")).unwrap_or_default();
    if live.datadog_refused {
        let why = r.datadog.last_error.as_deref().unwrap_or("Datadog refused the API key or the intake URL");
        return (Status::Critical, format!("{why}; {} records wait in the queue", q.records));
    }
    match q.oldest_age_secs {
        Some(age) if age > OLD_QUEUE_SECS => (
            Status::Warning,
            format!(
                "the oldest of {} queued records has waited {age} s (over {OLD_QUEUE_SECS} s){last_error}",
                q.records
            ),
        ),
        _ => (Status::Ok, format!("{} records queued", q.records)),
    }
}

/// A feed's own state: refused, failing, or polling, with its last error.
fn feed_state(f: &FeedReport, refused: bool) -> (Status, String) {
    let name = f.feed.name();
    match (&f.last_error, refused) {
        (e, true) => (
            Status::Critical,
            format!("{name}: {}; an operator must act", e.as_deref().unwrap_or("refused or given up")),
        ),
        (Some(e), false) => (Status::Warning, format!("{name}: {e}; retrying")),
        (None, false) => (Status::Ok, format!("{name}: polling")),
    }
}

/// Whether a feed can poll: its own state, or a pause of all polling when that is worse.
fn can_poll(r: &Report, f: &FeedReport, refused: bool) -> (Status, String) {
    let (status, message) = feed_state(f, refused);
    if status > Status::Ok {
        return (status, message);
    }
    let q = &r.queue;
    match (&q.disk_full, q.paused) {
        (Some(why), _) => (Status::Warning, format!("{}: polling paused: {why}", f.feed.name())),
        (None, true) => (
            Status::Warning,
            format!(
                "{}: polling paused: the queue holds max_bytes ({}) until Datadog drains it",
                f.feed.name(),
                q.max_bytes
            ),
        ),
        (None, false) => (status, message),
    }
}

/// `text` cut to at most `max` characters, with `…` when cut.
fn cut(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut out: String = text.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// The shell around [`payloads`]: when the next report is due, the one in flight, and how failures are logged.
/// Owned by the main loop, which asks [`Reporter::due`] once per turn and adds [`Reporter::next_wake`] to its
/// timers. The task is never awaited: a later tick finds it finished, or skips while it is not.
#[derive(Default)]
pub struct Reporter {
    due: Option<Instant>,
    in_flight: Option<Task<()>>,
    /// The last report failed: the next failure is logged at debug only, the next success at info.
    failing: Arc<AtomicBool>,
}

impl Reporter {
    /// Whether a report should be gathered and sent now: the telemetry is on, its interval has come, and the
    /// previous report is not still in flight (a tick is skipped if it is). The first report goes at once.
    pub fn due(&mut self, now: Instant, cfg: &TelemetryConfig) -> bool {
        if !cfg.enabled {
            self.due = None;
            return false;
        }
        if *self.due.get_or_insert(now) > now {
            return false;
        }
        self.due = Some(now + cfg.interval());
        if self.in_flight.as_ref().is_some_and(|t| !t.is_finished()) {
            log::debug!("health report skipped: the previous one is still in flight");
            return false;
        }
        true
    }

    /// When the next report is due; `None` while the telemetry is off.
    pub fn next_wake(&self) -> Option<Instant> {
        self.due
    }

    /// Builds the report's payloads and sends them on the blocking pool, replacing the finished task.
    pub fn send(&mut self, http: &Http, cfg: &Config, report: &Report, live: &Live, now: i64) {
        let p = payloads(report, live, now, &cfg.datadog.hostname, &cfg.datadog.tags);
        let (http, key, failing) = (http.clone(), cfg.datadog.api_key.clone(), self.failing.clone());
        let (series_url, checks_url) = (cfg.telemetry.series_url.clone(), cfg.telemetry.check_run_url.clone());
        self.in_flight = Some(smol::unblock(move || {
            // Both are tried: a refused metrics API says nothing about the service checks.
            let series = post(&http, &series_url, &key, &p.series);
            let checks = post(&http, &checks_url, &key, &p.checks);
            log_outcome(series.and(checks), &failing);
        }));
    }
}

/// POSTs one body; an error says what failed, never the key.
fn post(http: &Http, url: &Url, key: &Secret, body: &Value) -> Result<(), String> {
    let bytes = serde_json::to_vec(body).expect("a JSON value serializes: its keys are strings");
    let headers = [("DD-API-KEY", key.expose()), ("Content-Type", "application/json")];
    match http.post(url.as_str(), &headers, bytes).map(|r| r.scrub(&[key.expose()])) {
        // Datadog answers 202 with a JSON object; a 2xx from anything else (a portal) is not a delivery.
        Ok(r) if crate::datadog::sink::is_datadog_ack(&r) => Ok(()),
        Ok(r) => Err(format!("POST {url} answered HTTP {}: {}", r.status, r.excerpt())),
        Err(e) => Err(format!("POST {url}: {e}")),
    }
}

/// One warning when reports start failing, debug lines while they go on failing, one line when they work again.
fn log_outcome(result: Result<(), String>, failing: &AtomicBool) {
    match result {
        Ok(()) if failing.swap(false, Ordering::Relaxed) => {
            log::info!("health report: Datadog takes the agent's metrics and service checks again")
        }
        Ok(()) => log::debug!("health report sent"),
        Err(e) if !failing.swap(true, Ordering::Relaxed) => log::warn!(
            "health report not sent: {e}; it is dropped, the next goes at its interval (failures are logged at debug \
             until one goes through); log delivery is not affected"
        ),
        Err(e) => log::debug!("health report not sent: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::status::{DatadogReport, LateReport, QueueReport, Records, Stamp};

    const NOW: i64 = 1_800_000_000;

    /// Audit and TTP URL enabled, the other feeds not; nothing wrong.
    fn report() -> Report {
        let feed = |feed: Feed, enabled: bool, watermark: Option<i64>| FeedReport {
            feed,
            enabled,
            watermark: watermark.map(Stamp),
            last_success: None,
            last_error: None,
            last_error_at: None,
            window_in_progress: None,
        };
        Report {
            queue: QueueReport {
                records: 120,
                bytes: 130_000,
                max_bytes: 1 << 30,
                oldest_age_secs: Some(42),
                paused: false,
                path: "/q.db".into(),
                free_bytes: Some(1 << 40),
                disk_full: None,
                disk_full_at: None,
            },
            delivered: Records { records: 9_000 },
            dead_letters: Records { records: 3 },
            dropped: Records { records: 4 },
            late: LateReport { restamped: 5, kept: 6 },
            datadog: DatadogReport { last_success: Some(Stamp(NOW - 5)), last_error: None, last_error_at: None },
            feeds: Feed::ALL
                .iter()
                .map(|&f| match f {
                    Feed::Audit => feed(f, true, Some(NOW - 130)),
                    Feed::TtpUrl => feed(f, true, Some(NOW - 7_200)),
                    _ => feed(f, false, Some(NOW - 99_999)),
                })
                .collect(),
            clock: None,
        }
    }

    fn tags() -> Vec<String> {
        vec!["env:prod".into(), "site:berlin".into()]
    }

    /// The gauges as (metric, feed tag or "", value).
    fn gauges(p: &Payloads) -> Vec<(String, String, f64)> {
        let series = p.series["series"].as_array().unwrap();
        series
            .iter()
            .map(|s| {
                let tags: Vec<&str> = s["tags"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
                let feed = tags.iter().find(|t| t.starts_with("feed:")).copied().unwrap_or("");
                (s["metric"].as_str().unwrap().to_owned(), feed.to_owned(), s["points"][0]["value"].as_f64().unwrap())
            })
            .collect()
    }

    /// Each check as (check, feed tag or "", status, message).
    fn checks(p: &Payloads) -> Vec<(String, String, u64, String)> {
        p.checks
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                let feed =
                    c["tags"].as_array().unwrap().iter().filter_map(Value::as_str).find(|t| t.starts_with("feed:"));
                (
                    c["check"].as_str().unwrap().to_owned(),
                    feed.unwrap_or("").to_owned(),
                    c["status"].as_u64().unwrap(),
                    c["message"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn every_metric_of_the_report_with_its_feed_the_configured_tags_and_the_host() {
        let p = payloads(&report(), &Live::default(), NOW, "gw-01", &tags());
        let g = |m: &str, feed: &str, v: f64| (m.to_owned(), feed.to_owned(), v);
        assert_eq!(
            gauges(&p),
            [
                g(QUEUE_RECORDS, "", 120.0),
                g(QUEUE_BYTES, "", 130_000.0),
                g(QUEUE_OLDEST_AGE, "", 42.0),
                g(DELIVERED, "", 9_000.0),
                g(DEAD_LETTERS, "", 3.0),
                g(DROPPED, "", 4.0),
                g(LATE_RESTAMPED, "", 5.0),
                g(LATE_KEPT, "", 6.0),
                g(FEED_LAG, "feed:audit", 130.0),
                g(FEED_ERROR, "feed:audit", 0.0),
                g(FEED_LAG, "feed:ttp-url", 7_200.0),
                g(FEED_ERROR, "feed:ttp-url", 0.0),
            ]
        );
        assert_eq!(gauges(&p).len(), timeseries(2), "the documented count");
        for s in p.series["series"].as_array().unwrap() {
            assert_eq!((s["type"].as_u64(), s["points"][0]["timestamp"].as_i64()), (Some(3), Some(NOW)), "{s}");
            assert_eq!(s["resources"], json!([{"name": "gw-01", "type": "host"}]), "{s}");
            let t = s["tags"].as_array().unwrap();
            assert!(t.ends_with(&[json!("env:prod"), json!("site:berlin")]), "{s}");
            assert!(METRICS.contains(&s["metric"].as_str().unwrap()), "{s}");
        }
        for c in p.checks.as_array().unwrap() {
            assert_eq!((c["host_name"].as_str(), c["timestamp"].as_i64()), (Some("gw-01"), Some(NOW)), "{c}");
            assert!(c["tags"].as_array().unwrap().ends_with(&[json!("env:prod"), json!("site:berlin")]), "{c}");
            assert!(CHECKS.contains(&c["check"].as_str().unwrap()), "{c}");
        }
        let all_ok: Vec<_> = checks(&p).into_iter().map(|(c, f, s, _)| (c, f, s)).collect();
        let ok = |c: &str, feed: &str| (c.to_owned(), feed.to_owned(), 0);
        assert_eq!(all_ok, [ok(CAN_DELIVER, ""), ok(FEED_CAN_POLL, "feed:audit"), ok(FEED_CAN_POLL, "feed:ttp-url")]);
    }

    #[test]
    fn an_empty_queue_is_age_zero_and_a_feed_without_a_watermark_has_no_lag() {
        let mut r = report();
        r.queue.oldest_age_secs = None;
        r.feeds[0].watermark = None;
        r.feeds[5].watermark = Some(Stamp(NOW + 30)); // A clock stepped back: never a negative lag.
        let g = gauges(&payloads(&r, &Live::default(), NOW, "h", &[]));
        assert!(g.contains(&(QUEUE_OLDEST_AGE.into(), "".into(), 0.0)), "{g:?}");
        assert!(!g.iter().any(|(m, f, _)| m == FEED_LAG && f == "feed:audit"), "{g:?}");
        assert!(g.contains(&(FEED_LAG.into(), "feed:ttp-url".into(), 0.0)), "{g:?}");
        assert!(g.contains(&(FEED_ERROR.into(), "feed:audit".into(), 0.0)), "{g:?}");
    }

    /// The statuses: (what changes, can_deliver, audit's can_poll, ttp-url's can_poll, audit's error gauge, text
    /// that a message must hold).
    #[test]
    fn service_checks_say_critical_warning_or_ok_with_why() {
        type Setup = fn(&mut Report, &mut Live);
        let cases: [(&str, Setup, [u64; 3], f64, &str); 8] = [
            ("nothing wrong", |_, _| {}, [0, 0, 0], 0.0, "120 records queued"),
            (
                "the intake refuses the key",
                |r, l| {
                    r.datadog.last_error = Some("Datadog refused the API key or the intake URL (HTTP 403)".into());
                    l.datadog_refused = true;
                },
                [2, 0, 0],
                0.0,
                "(HTTP 403); 120 records wait in the queue",
            ),
            (
                "a transient intake error with a young queue",
                |r, _| r.datadog.last_error = Some("HTTP 503: unavailable".into()),
                [0, 0, 0],
                0.0,
                "120 records queued",
            ),
            (
                "an old queue",
                |r, _| {
                    r.queue.oldest_age_secs = Some(OLD_QUEUE_SECS + 1);
                    r.datadog.last_error = Some("HTTP 503: unavailable".into());
                },
                [1, 0, 0],
                0.0,
                "has waited 3601 s (over 3600 s); last error: HTTP 503",
            ),
            (
                "a feed fails and retries",
                |r, _| r.feeds[0].last_error = Some("HTTP 502: bad gateway".into()),
                [0, 1, 0],
                1.0,
                "audit: HTTP 502: bad gateway; retrying",
            ),
            (
                "a feed is refused",
                |r, l| {
                    r.feeds[0].last_error = Some("HTTP 403: the API application lacks the permission".into());
                    l.feeds_refused = vec![Feed::Audit];
                },
                [0, 2, 0],
                2.0,
                "audit: HTTP 403: the API application lacks the permission; an operator must act",
            ),
            (
                "the queue is full",
                |r, _| r.queue.paused = true,
                [0, 1, 1],
                0.0,
                "ttp-url: polling paused: the queue holds max_bytes (1073741824)",
            ),
            (
                "the disk is full, while a feed is refused",
                |r, l| {
                    r.queue.disk_full = Some("disk full: no room".into());
                    l.feeds_refused = vec![Feed::Audit];
                },
                [0, 2, 1],
                2.0,
                "ttp-url: polling paused: disk full: no room",
            ),
        ];
        for (what, setup, want, audit_error, says) in cases {
            let (mut r, mut live) = (report(), Live::default());
            setup(&mut r, &mut live);
            let p = payloads(&r, &live, NOW, "h", &[]);
            let got: Vec<u64> = checks(&p).iter().map(|c| c.2).collect();
            assert_eq!(got, want, "{what}");
            assert!(checks(&p).iter().any(|c| c.3.contains(says)), "{what}: {:?}", checks(&p));
            assert!(gauges(&p).contains(&(FEED_ERROR.into(), "feed:audit".into(), audit_error)), "{what}");
        }
    }

    #[test]
    fn messages_are_cut_to_what_datadog_keeps() {
        let mut r = report();
        r.feeds[0].last_error = Some("é".repeat(2_000));
        let p = payloads(&r, &Live::default(), NOW, "h", &[]);
        let message = &checks(&p)[1].3;
        assert_eq!(message.chars().count(), MAX_MESSAGE);
        assert!(message.ends_with('…'));
        assert_eq!(cut("short", 5), "short");
        assert_eq!(cut("longer", 5), "long…");
    }

    #[test]
    fn the_names_and_the_count_of_timeseries() {
        assert!(PER_FEED.iter().all(|m| METRICS.contains(m)), "the per-feed metrics are among METRICS");
        let mut all = METRICS.to_vec();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), METRICS.len(), "each name once");
        assert!(METRICS.iter().chain(CHECKS).all(|m| m.starts_with("mimecast_forwarder.")));
        assert_eq!((timeseries(1), timeseries(6)), (10, 20));
    }

    #[test]
    fn a_tick_is_skipped_while_the_report_before_is_in_flight() {
        let base = "[mimecast]\nclient_id = \"i\"\nclient_secret = \"s\"\n[datadog]\napi_key = \"k\"\n[telemetry]\n";
        let cfg = |extra: &str| crate::config::from_str(&format!("{base}{extra}"), &|_| None).unwrap().telemetry;
        let (on, off) = (cfg("interval_secs = 10\n"), cfg("enabled = false\n"));
        let t0 = Instant::now();
        let mut r = Reporter::default();
        assert_eq!(r.next_wake(), None, "nothing is due before the loop asks");
        assert!(r.due(t0, &on), "the first report goes at once");
        assert!(!r.due(t0 + Duration::from_secs(9), &on));
        assert_eq!(r.next_wake(), Some(t0 + Duration::from_secs(10)));
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        r.in_flight = Some(smol::unblock(move || {
            let _ = rx.recv();
        }));
        assert!(!r.due(t0 + Duration::from_secs(10), &on), "skipped: the one before is in flight");
        assert_eq!(r.next_wake(), Some(t0 + Duration::from_secs(20)), "and the next is at its interval");
        tx.send(()).unwrap();
        smol::block_on(r.in_flight.as_mut().unwrap());
        assert!(r.due(t0 + Duration::from_secs(20), &on));
        assert!(!r.due(t0 + Duration::from_secs(40), &off));
        assert_eq!(r.next_wake(), None, "off: no timer");
        assert!(r.due(t0 + Duration::from_secs(41), &on), "on again (a reload): at once");
    }

    #[test]
    fn failures_are_logged_once_and_never_show_the_key() {
        use crate::sim::http::{Reply, Server};
        let key = Secret::new("0123456789abcdef-key".into());
        let server = Server::start(|req| match req.path.as_str() {
            "/ok" => Reply::json(202, &json!({"errors": []})),
            "/portal" => Reply::html(200, "<html>log in</html>"),
            // Echoes the key, as a proxy that shows the request might.
            _ => Reply::json(403, &json!({"errors": [format!("Forbidden {:?}", req.header("DD-API-KEY"))]})),
        })
        .unwrap();
        let http = Http::new(&crate::config::HttpConfig { timeout_secs: 5, proxy: None, ca_file: None }).unwrap();
        let url = |path: &str| Url::parse(&format!("{}{path}", server.url())).unwrap();
        assert_eq!(post(&http, &url("/ok"), &key, &json!({})), Ok(()));
        let e = post(&http, &url("/portal"), &key, &json!({})).unwrap_err();
        assert!(e.contains("answered HTTP 200: <html>log in"), "{e}");
        let e = post(&http, &url("/refused"), &key, &json!({})).unwrap_err();
        assert!(e.contains("HTTP 403") && e.contains("[redacted]") && !e.contains(key.expose()), "{e}");
        let e = post(&http, &Url::parse("http://127.0.0.1:1/api/v2/series").unwrap(), &key, &json!({})).unwrap_err();
        assert!(e.starts_with("POST http://127.0.0.1:1/api/v2/series: could not connect"), "{e}");

        let failing = AtomicBool::new(false);
        log_outcome(Err("x".into()), &failing);
        assert!(failing.load(Ordering::Relaxed));
        log_outcome(Ok(()), &failing);
        assert!(!failing.load(Ordering::Relaxed));
    }
}
