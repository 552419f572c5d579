//! `mimecast-forwarder status`: what is queued, each feed's cursor and health, dead letters and drops.
//! Reads the database read-only, so it is safe while `run` is running.

use serde_json::{Value, json};

use crate::config::Config;
use crate::datetime;
use crate::mimecast::Feed;
use crate::store::{Note, Store, StoreError};

/// Gathers the report as JSON (the documented keys of interface.md, plus a few more).
pub fn gather(store: &Store, cfg: &Config, now: i64) -> Result<Value, StoreError> {
    let c = store.counters()?;
    let oldest_age = store.oldest_queued_at()?.map(|t| (now - t).max(0));
    let paused = cfg.queue.paused_at(c.queue_bytes);
    let ts = |t: Option<i64>| t.map(|t| Value::String(datetime::rfc3339(t))).unwrap_or(Value::Null);
    let mut feeds = serde_json::Map::new();
    for feed in Feed::ALL {
        let cursor = store.cursor(feed)?;
        let enabled = cfg.mimecast.feeds.contains(&feed);
        let entry = match cursor {
            None => json!({"enabled": enabled, "watermark": null, "last_success": null, "last_error": null}),
            Some(cur) => json!({
                "enabled": enabled,
                "watermark": ts(Some(cur.watermark)),
                "last_success": ts(cur.last_success),
                "last_error": cur.last_error,
                "last_error_at": ts(cur.last_error_at),
                "window_in_progress": cur.window.as_ref().map(|(w, _)| json!({"from": ts(Some(w.from)), "to": ts(Some(w.to))})),
            }),
        };
        feeds.insert(feed.name().into(), entry);
    }
    let dd_success = store.note(Note::DatadogLastSuccess)?.map(|(at, _)| at);
    let (dd_error_at, dd_error) = store.note(Note::DatadogLastError)?.unzip();
    let (disk_full_at, disk_full) = store.note(Note::DiskFull)?.unzip();
    Ok(json!({
        "queue": {
            "records": c.queue_records,
            "bytes": c.queue_bytes,
            "max_bytes": cfg.queue.max_bytes,
            "oldest_age_secs": oldest_age,
            "paused": paused,
            "path": cfg.queue.path.display().to_string(),
            "free_bytes": store.free_bytes(),
            "disk_full": disk_full,
            "disk_full_at": ts(disk_full_at),
        },
        "delivered": {"records": c.delivered},
        "dead_letters": {"records": c.dead_letters},
        "dropped": {"records": c.dropped},
        "late": {"restamped": c.restamped, "kept": c.kept},
        "datadog": {
            "last_success": ts(dd_success),
            "last_error": dd_error,
            "last_error_at": ts(dd_error_at),
        },
        "feeds": feeds,
    }))
}

/// Below this much free space on the queue's filesystem, `status` reports the disk as full.
const DISK_LOW_BYTES: u64 = 1 << 20;

/// The report for a person at 3 a.m.: the verdict first, then the numbers.
pub fn render(r: &Value, now: i64) -> String {
    let mut out = String::new();
    let q = &r["queue"];
    let n = |v: &Value| v.as_i64().unwrap_or(0);
    // A report timestamp and how long ago it was, when it is one.
    let stamp = |v: &Value| v.as_str().and_then(|s| Some((s.to_owned(), human(now - datetime::parse(s)?))));
    let ago = |v: &Value| stamp(v).map(|(t, a)| format!("{t} ({a} ago)"));
    let age = |v: &Value| ago(v).unwrap_or_else(|| "never".into());
    let when = |v: &Value| stamp(v).map(|(t, a)| format!(" (at {t}, {a} ago)")).unwrap_or_default();
    let mut problems = Vec::new();
    if let Some(e) = r["datadog"]["last_error"].as_str() {
        problems.push(format!("Datadog{}: {e}", when(&r["datadog"]["last_error_at"])));
    }
    for (name, f) in r["feeds"].as_object().into_iter().flatten() {
        if let Some(e) = f["last_error"].as_str() {
            problems.push(format!("feed {name}{}: {e}", when(&f["last_error_at"])));
        }
    }
    let free = q["free_bytes"].as_u64();
    if free.is_some_and(|b| b < DISK_LOW_BYTES) || q["disk_full"].is_string() {
        let path = q["path"].as_str().unwrap_or("the queue");
        let has = match (free, q["disk_full"].as_str()) {
            (Some(b), _) => format!("{path} has {b} bytes free"),
            (None, Some(msg)) => format!("{path}: {msg}"),
            (None, None) => path.to_owned(),
        };
        problems.push(format!(
            "disk full: {has}; polling is paused until delivery frees space{}",
            when(&q["disk_full_at"])
        ));
    }
    if q["paused"].as_bool() == Some(true) {
        problems.push("queue is full: polling Mimecast is paused until Datadog drains it".into());
    }
    if n(&r["dead_letters"]["records"]) > 0 {
        problems.push(format!(
            "{} record(s) in dead letters: Datadog refused them; they are kept in the queue database",
            n(&r["dead_letters"]["records"])
        ));
    }
    if n(&r["dropped"]["records"]) > 0 {
        problems.push(format!(
            "{} record(s) dropped because the queue was full (drop-oldest)",
            n(&r["dropped"]["records"])
        ));
    }
    if problems.is_empty() {
        out.push_str("OK: no errors recorded\n");
    } else {
        out.push_str("ATTENTION:\n");
        for p in problems {
            out.push_str(&format!("  - {p}\n"));
        }
    }
    let max = n(&q["max_bytes"]).max(1);
    out.push_str(&format!(
        "\nqueue        {} records, {} bytes ({:.1}% of max_bytes){}\n",
        n(&q["records"]),
        n(&q["bytes"]),
        100.0 * n(&q["bytes"]) as f64 / max as f64,
        q["oldest_age_secs"].as_i64().map(|a| format!(", oldest queued {} ago", human(a))).unwrap_or_default()
    ));
    if let Some(b) = free {
        out.push_str(&format!("free space   {b} bytes on the filesystem of {}\n", q["path"].as_str().unwrap_or("")));
    }
    out.push_str(&format!("delivered    {} records in total\n", n(&r["delivered"]["records"])));
    out.push_str(&format!(
        "late         {} restamped, {} sent unchanged (at risk)\n",
        n(&r["late"]["restamped"]),
        n(&r["late"]["kept"])
    ));
    out.push_str(&format!("datadog      last success {}\n", age(&r["datadog"]["last_success"])));
    out.push_str("\nfeed                        enabled  read up to (watermark)                last success\n");
    for (name, f) in r["feeds"].as_object().into_iter().flatten() {
        out.push_str(&format!(
            "{name:<27} {:<8} {:<37} {}\n",
            if f["enabled"].as_bool() == Some(true) { "yes" } else { "no" },
            ago(&f["watermark"]).unwrap_or_else(|| "-".into()),
            age(&f["last_success"]),
        ));
    }
    out
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
    use super::*;
    use crate::mimecast::window::Window;
    use crate::store::{NewRecord, PageCommit};

    const CONFIG: &str =
        "[mimecast]\nclient_id = \"i\"\nclient_secret = \"s\"\nlog_types = [\"audit\"]\n[datadog]\napi_key = \"k\"\n";

    #[test]
    fn report_has_the_documented_keys_and_a_verdict() {
        let cfg = crate::config::from_str(CONFIG, &|_| None).unwrap();
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
        store.commit_page(&page, 2_000, u64::MAX, crate::config::WhenFull::Pause).unwrap();
        let r = gather(&store, &cfg, 2_060).unwrap();
        assert_eq!(r["queue"]["records"], 1);
        assert_eq!(r["queue"]["bytes"], 10);
        assert_eq!(r["queue"]["oldest_age_secs"], 60);
        assert_eq!(r["queue"]["paused"], false);
        assert_eq!(r["feeds"]["audit"]["watermark"], "1970-01-01T00:33:20Z");
        assert_eq!(r["feeds"]["audit"]["enabled"], true);
        assert_eq!(r["feeds"]["dlp"]["enabled"], false);
        assert!(r["datadog"]["last_error"].is_null());
        assert!(render(&r, 2_060).starts_with("OK"));

        store.feed_error(Feed::Audit, "HTTP 403: no permission", 2_050).unwrap();
        let text = render(&gather(&store, &cfg, 2_060).unwrap(), 2_060);
        assert!(
            text.starts_with("ATTENTION") && text.contains("feed audit (at 1970-01-01T00:34:10Z, 10s ago): HTTP 403"),
            "{text}"
        );
    }

    #[test]
    fn a_full_disk_is_reported_with_the_path() {
        let cfg = crate::config::from_str(CONFIG, &|_| None).unwrap();
        let mut store = Store::in_memory();
        let mut r = gather(&store, &cfg, 2_000).unwrap();
        assert!(r["queue"]["free_bytes"].as_u64().is_some(), "{r}");
        assert!(r["queue"]["disk_full"].is_null());
        let path = cfg.queue.path.display().to_string();

        // Little space left, though the agent has not hit it yet.
        r["queue"]["free_bytes"] = json!(4096);
        let text = render(&r, 2_000);
        let line = format!("disk full: {path} has 4096 bytes free; polling is paused until delivery frees space");
        assert!(text.starts_with("ATTENTION") && text.contains(&line), "{text}");
        r["queue"]["free_bytes"] = json!(DISK_LOW_BYTES);
        assert!(render(&r, 2_000).starts_with("OK"));

        // The agent met SQLITE_FULL: reported even when space came back in the meantime.
        store.set_note(Note::DiskFull, 1990, "no space left on the filesystem of queue database /q").unwrap();
        let mut r = gather(&store, &cfg, 2_000).unwrap();
        assert_eq!(r["queue"]["disk_full"], "no space left on the filesystem of queue database /q");
        assert_eq!(r["queue"]["disk_full_at"], "1970-01-01T00:33:10Z");
        r["queue"]["free_bytes"] = json!(5_000_000_000u64);
        let text = render(&r, 2_000);
        assert!(text.contains(&format!("disk full: {path} has 5000000000 bytes free")), "{text}");
        assert!(text.contains("(at 1970-01-01T00:33:10Z, 10s ago)"), "{text}");
        r["queue"]["free_bytes"] = Value::Null;
        assert!(render(&r, 2_000).contains(&format!("disk full: {path}: no space left")));
        store.clear_note(Note::DiskFull).unwrap();
        assert!(gather(&store, &cfg, 2_000).unwrap()["queue"]["disk_full"].is_null());
    }
}
