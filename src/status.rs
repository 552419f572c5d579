//! `mimecast-forwarder status`: what is queued, each feed's cursor and health, dead letters and drops.
//! Reads the database read-only, so it is safe while `run` is running.
//!
//! [`gather`] builds one typed [`Report`]; `--json` is its serialization and [`render`] the text for a person,
//! so both say the same thing, and a field renamed or gone fails to compile instead of printing 0 or null.

use serde::{Serialize, Serializer};

use crate::config::Config;
use crate::datetime;
use crate::mimecast::{Feed, window};
use crate::store::{Note, Store, StoreError};

/// The whole report. Its JSON form is interface.md's `status --json` object: these field names are a contract.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub queue: QueueReport,
    pub delivered: Records,
    pub dead_letters: Records,
    pub dropped: Records,
    pub late: LateReport,
    pub datadog: DatadogReport,
    /// Every feed, enabled or not, in `Feed::ALL` order; in JSON an object keyed by the feed's name.
    #[serde(serialize_with = "by_name")]
    pub feeds: Vec<FeedReport>,
    /// What is wrong with the clock that reads this report ([`Report::by_clock`]): one that reads earlier than
    /// [`window::CLOCK_FLOOR`] is not set yet, and the agent polls nothing by it. Text only: not in the JSON.
    #[serde(skip)]
    pub clock: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueueReport {
    pub records: i64,
    /// What the queued records occupy (what `max_bytes` limits), not the file size.
    pub bytes: i64,
    pub max_bytes: u64,
    /// How long the oldest queued record has waited; `None` when the queue is empty.
    pub oldest_age_secs: Option<i64>,
    /// Polling waits for the queue to drain (`when_full = "pause"` and `max_bytes` reached).
    pub paused: bool,
    pub path: String,
    /// Free bytes on the queue's filesystem, when the system says.
    pub free_bytes: Option<u64>,
    /// The agent's note from when the disk was full, until a page is committed again.
    pub disk_full: Option<String>,
    pub disk_full_at: Option<Stamp>,
}

/// A count of records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Records {
    pub records: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LateReport {
    pub restamped: i64,
    pub kept: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DatadogReport {
    pub last_success: Option<Stamp>,
    /// Cleared by the next success.
    pub last_error: Option<String>,
    pub last_error_at: Option<Stamp>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FeedReport {
    /// The key of this entry in JSON.
    #[serde(skip)]
    pub feed: Feed,
    pub enabled: bool,
    /// How far the feed has been read; `None` before its first run.
    pub watermark: Option<Stamp>,
    pub last_success: Option<Stamp>,
    /// Cleared when a window completes.
    pub last_error: Option<String>,
    pub last_error_at: Option<Stamp>,
    pub window_in_progress: Option<WindowReport>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct WindowReport {
    pub from: Stamp,
    pub to: Stamp,
}

/// A moment in Unix seconds; in JSON RFC 3339 in UTC (`"2026-11-27T10:00:00Z"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp(pub i64);

impl Serialize for Stamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&datetime::rfc3339(self.0))
    }
}

fn by_name<S: Serializer>(feeds: &[FeedReport], s: S) -> Result<S::Ok, S::Error> {
    s.collect_map(feeds.iter().map(|f| (f.feed.name(), f)))
}

/// Gathers the report from the store and the config.
pub fn gather(store: &Store, cfg: &Config, now: i64) -> Result<Report, StoreError> {
    let c = store.counters()?;
    let mut feeds = Vec::new();
    for feed in Feed::ALL {
        let cursor = store.cursor(feed)?;
        feeds.push(FeedReport {
            feed,
            enabled: cfg.mimecast.feeds.contains(&feed),
            watermark: cursor.as_ref().map(|c| Stamp(c.watermark)),
            last_success: cursor.as_ref().and_then(|c| c.last_success).map(Stamp),
            last_error: cursor.as_ref().and_then(|c| c.last_error.clone()),
            last_error_at: cursor.as_ref().and_then(|c| c.last_error_at).map(Stamp),
            window_in_progress: cursor
                .as_ref()
                .and_then(|c| c.window.as_ref())
                .map(|(w, _)| WindowReport { from: Stamp(w.from), to: Stamp(w.to) }),
        });
    }
    let (dd_error_at, dd_error) = store.note(Note::DatadogLastError)?.unzip();
    let (disk_full_at, disk_full) = store.note(Note::DiskFull)?.unzip();
    Ok(Report {
        queue: QueueReport {
            records: c.queue_records,
            bytes: c.queue_bytes,
            max_bytes: cfg.queue.max_bytes,
            oldest_age_secs: store.oldest_queued_at()?.map(|t| now.saturating_sub(t).max(0)),
            paused: cfg.queue.paused_at(c.queue_bytes),
            path: cfg.queue.path.display().to_string(),
            free_bytes: store.free_bytes(),
            disk_full,
            disk_full_at: disk_full_at.map(Stamp),
        },
        delivered: Records { records: c.delivered },
        dead_letters: Records { records: c.dead_letters },
        dropped: Records { records: c.dropped },
        late: LateReport { restamped: c.restamped, kept: c.kept },
        datadog: DatadogReport {
            last_success: store.note(Note::DatadogLastSuccess)?.map(|(at, _)| Stamp(at)),
            last_error: dd_error,
            last_error_at: dd_error_at.map(Stamp),
        },
        feeds,
        clock: None,
    })
}

impl Report {
    /// The report as read by a clock that reads `now` (the system clock, which `status` and the agent share): one
    /// earlier than [`window::CLOCK_FLOOR`] is listed under `ATTENTION` until it is set, the agent polling nothing
    /// meanwhile. [`gather`] leaves it to the caller, so tests with small fake times are read as ever.
    pub fn by_clock(mut self, now: i64) -> Report {
        self.clock = window::clock_unset(now, window::CLOCK_FLOOR);
        self
    }

    /// `status --json`: one line, one object.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a report serializes: its map keys are strings and its values plain")
    }
}

/// Below this much free space on the queue's filesystem, `status` reports the disk as full.
const DISK_LOW_BYTES: u64 = 1 << 20;

/// The report for a person at 3 a.m.: the verdict first, then the numbers.
pub fn render(r: &Report, now: i64) -> String {
    let mut out = String::new();
    let problems = problems(r, now);
    if problems.is_empty() {
        out.push_str("OK: no errors recorded\n");
    } else {
        out.push_str("ATTENTION:\n");
        for p in problems {
            out.push_str(&format!("  - {p}\n"));
        }
    }
    let q = &r.queue;
    let ago = |t: Stamp| match now.saturating_sub(t.0) {
        // A time ahead of the clock reading it: the clock went back since it was written.
        secs if secs < 0 => format!("{} ({} in the future)", datetime::rfc3339(t.0), human(secs.saturating_neg())),
        secs => format!("{} ({} ago)", datetime::rfc3339(t.0), human(secs)),
    };
    let age = |t: Option<Stamp>| t.map_or_else(|| "never".into(), ago);
    let share = 100.0 * q.bytes as f64 / q.max_bytes.max(1) as f64;
    let oldest = q.oldest_age_secs.map(|a| format!(", oldest queued {} ago", human(a))).unwrap_or_default();
    out.push_str(&format!(
        "\nqueue        {} records, {} bytes ({share:.1}% of max_bytes){oldest}\n",
        q.records, q.bytes
    ));
    if let Some(b) = q.free_bytes {
        out.push_str(&format!("free space   {b} bytes on the filesystem of {}\n", q.path));
    }
    out.push_str(&format!("delivered    {} records in total\n", r.delivered.records));
    out.push_str(&format!("late         {} restamped, {} sent unchanged (at risk)\n", r.late.restamped, r.late.kept));
    out.push_str(&format!("datadog      last success {}\n", age(r.datadog.last_success)));
    out.push_str("\nfeed                        enabled  read up to (watermark)                last success\n");
    for f in &r.feeds {
        out.push_str(&format!(
            "{:<27} {:<8} {:<37} {}\n",
            f.feed.name(),
            if f.enabled { "yes" } else { "no" },
            f.watermark.map_or_else(|| "-".into(), ago),
            age(f.last_success),
        ));
    }
    out
}

/// What needs a person, one line each.
fn problems(r: &Report, now: i64) -> Vec<String> {
    let when = |t: Option<Stamp>| {
        t.map(|t| format!(" (at {}, {} ago)", datetime::rfc3339(t.0), human(now.saturating_sub(t.0))))
            .unwrap_or_default()
    };
    let mut problems = Vec::new();
    problems.extend(r.clock.clone());
    if let Some(e) = &r.datadog.last_error {
        problems.push(format!("Datadog{}: {e}", when(r.datadog.last_error_at)));
    }
    for f in &r.feeds {
        if let Some(e) = &f.last_error {
            problems.push(format!("feed {}{}: {e}", f.feed.name(), when(f.last_error_at)));
        }
        let ahead = f.watermark.filter(|_| f.enabled).and_then(|w| window::clock_went_back(w.0, now));
        if let (Some(w), Some(ahead)) = (f.watermark, ahead) {
            problems.push(format!(
                "feed {}: read up to {}, {} ahead of the clock: the clock went back (or the queue came from a machine \
                 whose clock was ahead); the agent reads the feed again from the clock at its next poll",
                f.feed.name(),
                datetime::rfc3339(w.0),
                human(ahead)
            ));
        }
    }
    let q = &r.queue;
    if q.free_bytes.is_some_and(|b| b < DISK_LOW_BYTES) || q.disk_full.is_some() {
        let has = match (q.free_bytes, &q.disk_full) {
            (Some(b), _) => format!("{} has {b} bytes free", q.path),
            (None, Some(msg)) => format!("{}: {msg}", q.path),
            (None, None) => q.path.clone(),
        };
        problems
            .push(format!("disk full: {has}; polling is paused until delivery frees space{}", when(q.disk_full_at)));
    }
    if q.paused {
        problems.push("queue is full: polling Mimecast is paused until Datadog drains it".into());
    }
    if r.dead_letters.records > 0 {
        problems.push(format!(
            "{} record(s) in dead letters: Datadog refused them; they are kept in the queue database",
            r.dead_letters.records
        ));
    }
    if r.dropped.records > 0 {
        problems.push(format!("{} record(s) dropped because the queue was full (drop-oldest)", r.dropped.records));
    }
    problems
}

/// The one line systemd shows for the service (`STATUS=`, in `systemctl status`): how much is queued, how old the
/// oldest record is, and the most recent error still standing (Datadog's, a feed's or a full disk), if any.
pub fn one_line(r: &Report, now: i64) -> String {
    let q = &r.queue;
    let mut line = format!("{} records queued", q.records);
    if let Some(age) = q.oldest_age_secs {
        line.push_str(&format!(", oldest {}", human(age)));
    }
    if q.paused {
        line.push_str(", queue full (polling paused)");
    }
    if r.clock.is_some() {
        line.push_str(", clock not set (polling waits for it)");
    }
    let feeds = r.feeds.iter().map(|f| (f.last_error_at, format!("feed {}", f.feed.name()), &f.last_error));
    let errors = [(r.datadog.last_error_at, "Datadog".to_string(), &r.datadog.last_error)]
        .into_iter()
        .chain(feeds)
        .chain([(q.disk_full_at, "disk full".to_string(), &q.disk_full)]);
    let latest =
        errors.filter_map(|(at, what, e)| Some((at.map_or(i64::MIN, |t| t.0), what, e.as_ref()?))).max_by_key(|e| e.0);
    match latest {
        Some((i64::MIN, what, e)) => line.push_str(&format!("; last error: {what}: {e}")),
        Some((at, what, e)) => {
            line.push_str(&format!("; last error {} ago: {what}: {e}", human(now.saturating_sub(at))))
        }
        None => line.push_str("; no errors"),
    }
    line
}

fn human(secs: i64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::mimecast::window::Window;
    use crate::store::{InFlight, NewRecord, PageCommit};

    const CONFIG: &str =
        "[mimecast]\nclient_id = \"i\"\nclient_secret = \"s\"\nlog_types = [\"audit\"]\n[datadog]\napi_key = \"k\"\n";

    fn json(r: &Report) -> serde_json::Value {
        serde_json::from_str(&r.to_json()).unwrap()
    }

    /// A store with one queued record, read up to 2000 with a window in progress on dlp.
    fn store() -> Store {
        let mut store = Store::in_memory();
        store.init_cursor(Feed::Audit, 1_000).unwrap();
        let record = NewRecord { key: "k".into(), event_time: Some(1_000), body: "{\"id\":\"k\"}".into() };
        let page = PageCommit {
            feed: Feed::Audit,
            window: Window { from: 900, to: 2_000 },
            next_token: None,
            records: vec![record],
            forget_before: 0,
        };
        store.commit_page(&page, 2_000, u64::MAX, crate::config::WhenFull::Pause, &InFlight::NONE).unwrap();
        store.init_cursor(Feed::Dlp, 1_500).unwrap();
        let page = PageCommit {
            feed: Feed::Dlp,
            window: Window { from: 1_200, to: 1_800 },
            next_token: Some("t".into()),
            records: vec![],
            forget_before: 0,
        };
        store.commit_page(&page, 2_000, u64::MAX, crate::config::WhenFull::Pause, &InFlight::NONE).unwrap();
        store
    }

    /// The JSON shape scripts rely on (interface.md), key for key: a renamed or dropped field fails here.
    #[test]
    fn json_has_the_documented_shape() {
        let cfg = crate::config::from_str(CONFIG, &|_| None).unwrap();
        let mut store = store();
        store.set_note(Note::DatadogLastError, 2_010, "HTTP 503").unwrap();
        let mut r = gather(&store, &cfg, 2_060).unwrap();
        r.queue.free_bytes = Some(5_000_000);
        let none = json!({"enabled": false, "watermark": null, "last_success": null, "last_error": null,
                          "last_error_at": null, "window_in_progress": null});
        let expected = json!({
            "queue": {"records": 1, "bytes": 10, "max_bytes": 1u64 << 30, "oldest_age_secs": 60, "paused": false,
                      "path": "/var/lib/mimecast-forwarder/queue.db", "free_bytes": 5_000_000, "disk_full": null,
                      "disk_full_at": null},
            "delivered": {"records": 0},
            "dead_letters": {"records": 0},
            "dropped": {"records": 0},
            "late": {"restamped": 0, "kept": 0},
            "datadog": {"last_success": null, "last_error": "HTTP 503", "last_error_at": "1970-01-01T00:33:30Z"},
            "feeds": {
                "audit": {"enabled": true, "watermark": "1970-01-01T00:33:20Z", "last_success": "1970-01-01T00:33:20Z",
                          "last_error": null, "last_error_at": null, "window_in_progress": null},
                "dlp": {"enabled": false, "watermark": "1970-01-01T00:25:00Z", "last_success": null, "last_error": null,
                        "last_error_at": null,
                        "window_in_progress": {"from": "1970-01-01T00:20:00Z", "to": "1970-01-01T00:30:00Z"}},
                "rejection": none, "ttp-attachment-protection": none, "ttp-impersonation": none, "ttp-url": none,
            },
        });
        assert_eq!(json(&r), expected);
        let names: Vec<String> = json(&r)["feeds"].as_object().unwrap().keys().cloned().collect();
        assert_eq!(names, Feed::ALL.map(|f| f.name().to_owned()), "in the feeds' own order");
    }

    /// Text and JSON are two views of one report: every value set in it shows in both.
    #[test]
    fn text_and_json_come_from_the_same_report() {
        let cfg = crate::config::from_str(CONFIG, &|_| None).unwrap();
        let mut r = gather(&store(), &cfg, 2_060).unwrap();
        r.queue.records = 4321;
        r.queue.bytes = 98_765;
        r.queue.free_bytes = Some(7_654_321);
        r.delivered.records = 1111;
        r.late = LateReport { restamped: 22, kept: 33 };
        r.dead_letters.records = 44;
        r.dropped.records = 55;
        r.datadog.last_success = Some(Stamp(1_990));
        r.datadog.last_error = Some("HTTP 429 from the intake".into());
        r.datadog.last_error_at = Some(Stamp(2_000));
        r.feeds[5].last_error = Some("HTTP 403: no permission".into());
        r.feeds[5].last_error_at = Some(Stamp(2_050));
        let (text, j) = (render(&r, 2_060), json(&r));
        let pairs = [
            ("4321 records", &j["queue"]["records"], json!(4321)),
            ("98765 bytes", &j["queue"]["bytes"], json!(98_765)),
            ("7654321 bytes on the filesystem", &j["queue"]["free_bytes"], json!(7_654_321)),
            ("1111 records in total", &j["delivered"]["records"], json!(1111)),
            ("22 restamped, 33 sent unchanged", &j["late"]["restamped"], json!(22)),
            ("44 record(s) in dead letters", &j["dead_letters"]["records"], json!(44)),
            ("55 record(s) dropped", &j["dropped"]["records"], json!(55)),
            (
                "last success 1970-01-01T00:33:10Z (70s ago)",
                &j["datadog"]["last_success"],
                json!("1970-01-01T00:33:10Z"),
            ),
            (
                "Datadog (at 1970-01-01T00:33:20Z, 60s ago): HTTP 429 from the intake",
                &j["datadog"]["last_error"],
                json!("HTTP 429 from the intake"),
            ),
            (
                "feed ttp-url (at 1970-01-01T00:34:10Z, 10s ago): HTTP 403",
                &j["feeds"]["ttp-url"]["last_error"],
                json!("HTTP 403: no permission"),
            ),
        ];
        for (in_text, in_json, value) in pairs {
            assert!(text.contains(in_text), "{in_text:?} not in\n{text}");
            assert_eq!(*in_json, value, "{in_text}");
        }
        assert!(text.starts_with("ATTENTION:\n"), "{text}");
    }

    #[test]
    fn a_verdict_first() {
        let cfg = crate::config::from_str(CONFIG, &|_| None).unwrap();
        let mut store = store();
        let mut r = gather(&store, &cfg, 2_060).unwrap();
        r.queue.free_bytes = None;
        let text = render(&r, 2_060);
        assert!(text.starts_with("OK: no errors recorded\n"), "{text}");
        assert!(text.contains("\naudit                       yes      1970-01-01T00:33:20Z (60s ago)"), "{text}");
        assert!(
            text.contains("\nrejection                   no       -                                     never\n"),
            "{text}"
        );

        store.feed_error(Feed::Audit, "HTTP 403: no permission", 2_050).unwrap();
        let text = render(&gather(&store, &cfg, 2_060).unwrap(), 2_060);
        assert!(
            text.starts_with("ATTENTION") && text.contains("feed audit (at 1970-01-01T00:34:10Z, 10s ago): HTTP 403"),
            "{text}"
        );
        // A watermark in the future: the clock went back. Said as such, not as "-7200s ago"; within the tolerance
        // of a clock's routine correction, nothing is said.
        let mut ahead = r.clone();
        ahead.feeds[0].watermark = Some(Stamp(2_060 + 7_200));
        let text = render(&ahead, 2_060);
        let said = "feed audit: read up to 1970-01-01T02:34:20Z, 2h ahead of the clock: the clock went back (or the queue \
                    came from a machine whose clock was ahead); the agent reads the feed again from the clock at its \
                    next poll";
        assert!(text.starts_with("ATTENTION") && text.contains(said), "{text}");
        assert!(
            text.contains("\naudit                       yes      1970-01-01T02:34:20Z (2h in the future)"),
            "{text}"
        );
        ahead.feeds[0].watermark = Some(Stamp(2_060 + window::CLOCK_TOLERANCE_SECS));
        assert!(render(&ahead, 2_060).starts_with("OK"));
        ahead.feeds[0].watermark = Some(Stamp(2_060 + 7_200));
        ahead.feeds[0].enabled = false;
        assert!(render(&ahead, 2_060).starts_with("OK"), "a feed that is not polled has no clock to go back");
        // A stored time far off (a damaged row, a clock reset) is shown, not a panic.
        r.datadog.last_success = Some(Stamp(i64::MIN));
        r.feeds[0].watermark = Some(Stamp(i64::MAX));
        assert!(render(&r, 2_060).contains("datadog      last success"));
    }

    #[test]
    fn one_line_for_systemd_says_the_queue_and_the_latest_error() {
        let cfg = crate::config::from_str(CONFIG, &|_| None).unwrap();
        let mut store = store();
        let check = |store: &Store, expected: &str| {
            assert_eq!(one_line(&gather(store, &cfg, 2_060).unwrap(), 2_060), expected);
        };
        check(&store, "1 records queued, oldest 60s; no errors");
        store.set_note(Note::DatadogLastError, 2_010, "HTTP 503").unwrap();
        check(&store, "1 records queued, oldest 60s; last error 50s ago: Datadog: HTTP 503");
        store.feed_error(Feed::Dlp, "HTTP 403: no permission", 2_040).unwrap();
        check(&store, "1 records queued, oldest 60s; last error 20s ago: feed dlp: HTTP 403: no permission");
        store.set_note(Note::DiskFull, 2_050, "no space left").unwrap();
        check(&store, "1 records queued, oldest 60s; last error 10s ago: disk full: no space left");
        let mut r = gather(&Store::in_memory(), &cfg, 2_060).unwrap();
        r.queue.paused = true;
        assert_eq!(one_line(&r, 2_060), "0 records queued, queue full (polling paused); no errors");
    }

    #[test]
    fn a_full_disk_is_reported_with_the_path() {
        let cfg = crate::config::from_str(CONFIG, &|_| None).unwrap();
        let mut store = Store::in_memory();
        let mut r = gather(&store, &cfg, 2_000).unwrap();
        assert!(r.queue.free_bytes.is_some(), "{r:?}");
        assert_eq!((&r.queue.disk_full, r.queue.disk_full_at), (&None, None));
        let path = cfg.queue.path.display().to_string();

        // Little space left, though the agent has not hit it yet.
        r.queue.free_bytes = Some(4096);
        let text = render(&r, 2_000);
        let line = format!("disk full: {path} has 4096 bytes free; polling is paused until delivery frees space");
        assert!(text.starts_with("ATTENTION") && text.contains(&line), "{text}");
        r.queue.free_bytes = Some(DISK_LOW_BYTES);
        assert!(render(&r, 2_000).starts_with("OK"));

        // The agent met SQLITE_FULL: reported even when space came back in the meantime.
        store.set_note(Note::DiskFull, 1990, "no space left on the filesystem of queue database /q").unwrap();
        let mut r = gather(&store, &cfg, 2_000).unwrap();
        assert_eq!(json(&r)["queue"]["disk_full"], "no space left on the filesystem of queue database /q");
        assert_eq!(json(&r)["queue"]["disk_full_at"], "1970-01-01T00:33:10Z");
        r.queue.free_bytes = Some(5_000_000_000);
        let text = render(&r, 2_000);
        assert!(text.contains(&format!("disk full: {path} has 5000000000 bytes free")), "{text}");
        assert!(text.contains("(at 1970-01-01T00:33:10Z, 10s ago)"), "{text}");
        r.queue.free_bytes = None;
        assert!(render(&r, 2_000).contains(&format!("disk full: {path}: no space left")));
        store.clear_note(Note::DiskFull).unwrap();
        assert!(json(&gather(&store, &cfg, 2_000).unwrap())["queue"]["disk_full"].is_null());
    }
}
