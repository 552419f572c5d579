//! The log object Datadog's Mimecast pipeline expects, built from one queued record. Pure.

use serde_json::{Map, Value};

use crate::config::LateRecords;
use crate::datetime;
use crate::mimecast::Feed;

/// Keys the agent sets itself; a record field of the same name is kept as `mimecast.<name>` instead.
pub const RESERVED: [&str; 9] =
    ["ddsource", "ddtags", "hostname", "service", "message", "status", "timestamp", "host", "source"];

/// Datadog accepts timestamps up to 2 h in the future.
const MAX_FUTURE_SECS: i64 = 2 * 3600;

/// The parts of a log object that come from the config.
#[derive(Debug, Clone)]
pub struct Shape {
    pub hostname: String,
    /// Comma-joined tags, or empty.
    pub ddtags: String,
    pub late_records: LateRecords,
    pub max_event_age_secs: i64,
}

impl Shape {
    pub fn of(cfg: &crate::config::DatadogConfig) -> Shape {
        Shape {
            hostname: cfg.hostname.clone(),
            ddtags: cfg.tags.join(","),
            late_records: cfg.late_records,
            max_event_age_secs: cfg.max_event_age_secs,
        }
    }
}

/// How a record's age was handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Late {
    OnTime,
    Restamped,
    /// Sent unchanged although Datadog may drop it (`late_records = "keep"`).
    Kept,
}

/// One log object, serialized.
#[derive(Debug, Clone)]
pub struct Built {
    pub json: String,
    pub late: Late,
}

/// Whether an event at `event_time` would fall outside Datadog's accepted window when sent at `now`.
pub fn is_late(event_time: Option<i64>, now: i64, max_age_secs: i64) -> bool {
    event_time.is_some_and(|t| t < now - max_age_secs || t > now + MAX_FUTURE_SECS)
}

/// Builds the log object for a record of `feed` whose queued body is `body` (compact JSON).
pub fn build(feed: Feed, body: &str, event_time: Option<i64>, shape: &Shape, now: i64) -> Built {
    let record: Value = match serde_json::from_str(body) {
        Ok(v) => v,
        // The queue only holds JSON the agent serialized itself; if a byte rotted on disk, still deliver it.
        Err(_) => Value::String(body.to_owned()),
    };
    let late = match (is_late(event_time, now, shape.max_event_age_secs), shape.late_records) {
        (false, _) => Late::OnTime,
        (true, LateRecords::Restamp) if record.is_object() => Late::Restamped,
        (true, _) => Late::Kept,
    };
    let record = if late == Late::Restamped { restamp(feed, record) } else { record };

    let mut log = Map::new();
    log.insert("ddsource".into(), "mimecast".into());
    log.insert("service".into(), feed.name().into());
    log.insert("hostname".into(), shape.hostname.clone().into());
    if !shape.ddtags.is_empty() {
        log.insert("ddtags".into(), shape.ddtags.clone().into());
    }
    let message = if late == Late::Restamped || record.is_object() { record.to_string() } else { body.to_owned() };
    log.insert("message".into(), message.into());
    if late == Late::Restamped {
        log.insert("timestamp".into(), datetime::rfc3339(now).into());
        log.insert("mimecast_late".into(), true.into());
    }
    if let Value::Object(fields) = record {
        for (k, v) in fields {
            let k = if RESERVED.contains(&k.as_str()) || log.contains_key(&k) { format!("mimecast.{k}") } else { k };
            log.insert(k, v);
        }
    }
    Built { json: Value::Object(log).to_string(), late }
}

/// Renames the feed's time field to `original_<field>`, in place, so the original time stays searchable.
fn restamp(feed: Feed, record: Value) -> Value {
    let field = feed.spec().time_field;
    match record {
        Value::Object(m) => Value::Object(
            m.into_iter().map(|(k, v)| if k == field { (format!("original_{k}"), v) } else { (k, v) }).collect(),
        ),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(late: LateRecords) -> Shape {
        Shape {
            hostname: "gw-01".into(),
            ddtags: "env:prod,site:berlin".into(),
            late_records: late,
            max_event_age_secs: 61200,
        }
    }

    fn obj(b: &Built) -> Map<String, Value> {
        serde_json::from_str::<Value>(&b.json).unwrap().as_object().unwrap().clone()
    }

    const URL: &str =
        r#"{"date":"2024-05-27T09:04:25+0000","scanResult":"clean","emailPartsDescription":["Body"],"n":1.50}"#;

    #[test]
    fn shape_of_a_log() {
        let now = datetime::parse("2024-05-27T10:00:00Z").unwrap();
        let b =
            build(Feed::TtpUrl, URL, datetime::parse("2024-05-27T09:04:25+0000"), &shape(LateRecords::Restamp), now);
        let o = obj(&b);
        assert_eq!(b.late, Late::OnTime);
        assert_eq!(o["ddsource"], "mimecast");
        assert_eq!(o["service"], "ttp-url");
        assert_eq!(o["hostname"], "gw-01");
        assert_eq!(o["ddtags"], "env:prod,site:berlin");
        assert_eq!(o["message"], URL);
        assert_eq!(o["emailPartsDescription"], serde_json::json!(["Body"]));
        assert_eq!(o["n"].to_string(), "1.50", "numbers keep their spelling");
        assert!(!o.contains_key("timestamp"));
    }

    #[test]
    fn reserved_names_do_not_overwrite() {
        let body = r#"{"message":"m","status":"s","service":"x","eventTime":"2024-05-27T09:04:25+0000"}"#;
        let o = obj(&build(Feed::Audit, body, None, &shape(LateRecords::Restamp), 0));
        assert_eq!(o["service"], "audit");
        assert_eq!(o["message"], body);
        assert_eq!(o["mimecast.message"], "m");
        assert_eq!(o["mimecast.status"], "s");
        assert_eq!(o["mimecast.service"], "x");
    }

    #[test]
    fn late_records_are_restamped_or_kept() {
        let t = datetime::parse("2024-05-27T09:04:25+0000").unwrap();
        let now = t + 20 * 3600;
        let b = build(Feed::TtpUrl, URL, Some(t), &shape(LateRecords::Restamp), now);
        let o = obj(&b);
        assert_eq!(b.late, Late::Restamped);
        assert_eq!(o["timestamp"], datetime::rfc3339(now));
        assert_eq!(o["mimecast_late"], true);
        assert_eq!(o["original_date"], "2024-05-27T09:04:25+0000");
        assert!(!o.contains_key("date"));
        let msg: Value = serde_json::from_str(o["message"].as_str().unwrap()).unwrap();
        assert_eq!(msg["original_date"], "2024-05-27T09:04:25+0000");
        assert!(msg.get("date").is_none());

        let b = build(Feed::TtpUrl, URL, Some(t), &shape(LateRecords::Keep), now);
        assert_eq!(b.late, Late::Kept);
        assert_eq!(obj(&b)["date"], "2024-05-27T09:04:25+0000");
        assert!(is_late(Some(now + 3 * 3600), now, 61200));
        assert!(!is_late(Some(now - 61200), now, 61200));
        assert!(!is_late(None, now, 61200));
    }
}
