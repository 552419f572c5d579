//! The log object Datadog's Mimecast pipeline expects, built from one queued record. Pure.

use std::borrow::Cow;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::config::{LateRecords, LogShape};
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
    pub log_shape: LogShape,
}

impl Shape {
    pub fn of(cfg: &crate::config::DatadogConfig) -> Shape {
        Shape {
            hostname: cfg.hostname.clone(),
            ddtags: cfg.tags.join(","),
            late_records: cfg.late_records,
            max_event_age_secs: cfg.max_event_age_secs,
            log_shape: cfg.log_shape,
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
    let mut out = Vec::with_capacity(2 * body.len() + 160);
    let late = write(&mut out, feed, body, event_time, shape, now);
    // Only valid UTF-8 is ever written: slices of `body`, and serde_json's own output.
    let json = String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
    Built { json, late }
}

/// Appends the log object for a record of `feed` whose queued body is `body` to `out`, and says how the record's
/// age was handled.
///
/// A record sent with its own time (nearly all) is not parsed into a tree: its top-level fields are read as
/// borrowed slices of `body` and copied out as they are, and `message` is `body` escaped once. The queue holds
/// what serde_json wrote (compact, one spelling per value), so this gives the same bytes as parsing the record
/// and serializing the object, which a test proves; a restamped record, a body with a repeated top-level name and
/// one that is not a JSON object take that slower path.
pub fn write(out: &mut Vec<u8>, feed: Feed, body: &str, event_time: Option<i64>, shape: &Shape, now: i64) -> Late {
    let late = is_late(event_time, now, shape.max_event_age_secs);
    if !(late && shape.late_records == LateRecords::Restamp)
        && let Some(fields) = Fields::of(body)
    {
        write_head(out, feed, shape);
        out.extend_from_slice(b",\"message\":");
        json_string(out, body);
        if shape.log_shape == LogShape::Full || fields.renamed {
            for (name, value) in &fields.fields {
                out.push(b',');
                json_string(out, name);
                out.push(b':');
                out.extend_from_slice(value.get().as_bytes());
            }
        }
        out.push(b'}');
        return if late { Late::Kept } else { Late::OnTime };
    }
    write_parsed(out, feed, body, event_time, shape, now)
}

/// `{"ddsource":"mimecast","service":…,"hostname":…` and `"ddtags":…` when there are tags, unclosed.
fn write_head(out: &mut Vec<u8>, feed: Feed, shape: &Shape) {
    out.extend_from_slice(b"{\"ddsource\":\"mimecast\",\"service\":");
    json_string(out, feed.name());
    out.extend_from_slice(b",\"hostname\":");
    json_string(out, &shape.hostname);
    if !shape.ddtags.is_empty() {
        out.extend_from_slice(b",\"ddtags\":");
        json_string(out, &shape.ddtags);
    }
}

/// Appends `s` as a JSON string, escaped exactly as serde_json escapes it.
fn json_string(out: &mut Vec<u8>, s: &str) {
    // Writing into a Vec cannot fail, and a str always serializes.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// A record's top-level fields as the log object names them, each value a slice of the queued text.
struct Fields<'a> {
    fields: Vec<(Cow<'a, str>, &'a RawValue)>,
    /// A name was reserved and is prefixed: the record's fields must go at top level, under their new names.
    renamed: bool,
}

/// The top-level fields of a JSON object as they are written, before any is renamed.
struct Object<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'a> Fields<'a> {
    /// The fields of `body` when it is a JSON object whose names stay distinct once reserved names are prefixed;
    /// `None` otherwise (not an object, not JSON, a repeated name), for the parsing path to handle.
    fn of(body: &'a str) -> Option<Fields<'a>> {
        let Object(mut fields) = serde_json::from_str::<Object<'a>>(body).ok()?;
        let mut renamed = false;
        for (name, _) in &mut fields {
            if RESERVED.contains(&name.as_ref()) {
                *name = Cow::Owned(format!("mimecast.{name}"));
                renamed = true;
            }
        }
        let mut names: Vec<&str> = fields.iter().map(|(n, _)| n.as_ref()).collect();
        names.sort_unstable();
        names.windows(2).all(|w| w[0] != w[1]).then_some(Fields { fields, renamed })
    }
}

impl<'de> Deserialize<'de> for Object<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Object<'de>, D::Error> {
        struct Fields;
        impl<'de> Visitor<'de> for Fields {
            type Value = Object<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Object<'de>, A::Error> {
                let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(24));
                while let Some(Name(name)) = map.next_key()? {
                    fields.push((name, map.next_value()?));
                }
                Ok(Object(fields))
            }
        }
        d.deserialize_map(Fields)
    }
}

/// A field name, borrowed from the text unless it holds an escape.
struct Name<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Name<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Name<'de>, D::Error> {
        struct Str;
        impl<'de> Visitor<'de> for Str {
            type Value = Name<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: serde::de::Error>(self, s: &'de str) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Borrowed(s)))
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Owned(s.to_owned())))
            }
            fn visit_string<E: serde::de::Error>(self, s: String) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Owned(s)))
            }
        }
        d.deserialize_str(Str)
    }
}

/// The log object built through a parsed tree: restamped records, and bodies the fast path leaves alone.
fn write_parsed(out: &mut Vec<u8>, feed: Feed, body: &str, event_time: Option<i64>, shape: &Shape, now: i64) -> Late {
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
    let lean = shape.log_shape == LogShape::Message
        && record.as_object().is_some_and(|m| !m.keys().any(|k| RESERVED.contains(&k.as_str())));
    if !lean && let Value::Object(fields) = record {
        for (k, v) in fields {
            let k = if RESERVED.contains(&k.as_str()) || log.contains_key(&k) { format!("mimecast.{k}") } else { k };
            log.insert(k, v);
        }
    }
    // Writing into a Vec cannot fail, and a Value always serializes.
    let _ = serde_json::to_writer(&mut *out, &Value::Object(log));
    late
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
pub(crate) mod tests {
    use super::*;

    fn shape(late: LateRecords) -> Shape {
        Shape {
            hostname: "gw-01".into(),
            ddtags: "env:prod,site:berlin".into(),
            late_records: late,
            max_event_age_secs: 61200,
            log_shape: LogShape::Full,
        }
    }

    fn lean(late: LateRecords) -> Shape {
        Shape { log_shape: LogShape::Message, ..shape(late) }
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
    fn the_message_shape_carries_the_record_once_unless_a_name_is_reserved() {
        let now = datetime::parse("2024-05-27T10:00:00Z").unwrap();
        let o =
            obj(&build(Feed::TtpUrl, URL, datetime::parse("2024-05-27T09:04:25+0000"), &lean(LateRecords::Keep), now));
        let keys = |o: &Map<String, Value>| {
            let mut k: Vec<String> = o.keys().cloned().collect();
            k.sort();
            k
        };
        assert_eq!(keys(&o), ["ddsource", "ddtags", "hostname", "message", "service"]);
        assert_eq!(o["message"], URL);
        // Datadog would read `status` as the log's status: such a record keeps the full shape, renamed.
        let body = r#"{"status":"s","eventTime":"2024-05-27T09:04:25+0000"}"#;
        for (event_time, late) in [(None, Late::OnTime), (Some(now - 20 * 3600), Late::Restamped)] {
            let b = build(Feed::Audit, body, event_time, &lean(LateRecords::Restamp), now);
            assert_eq!((b.late, &obj(&b)["mimecast.status"]), (late, &Value::from("s")));
        }
        // A restamped record: its time at top level, the renamed field in the message only.
        let b = build(Feed::TtpUrl, URL, Some(now - 20 * 3600), &lean(LateRecords::Restamp), now);
        let o = obj(&b);
        assert_eq!(keys(&o), ["ddsource", "ddtags", "hostname", "message", "mimecast_late", "service", "timestamp"]);
        let msg: Value = serde_json::from_str(o["message"].as_str().unwrap()).unwrap();
        assert_eq!(msg["original_date"], "2024-05-27T09:04:25+0000");
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

    /// Both paths, on the same queued body: the fast path must give the parsing path's bytes exactly.
    fn same_bytes(feed: Feed, body: &str, event_time: Option<i64>, shape: &Shape, now: i64) {
        let (mut fast, mut parsed) = (Vec::new(), Vec::new());
        let late = write(&mut fast, feed, body, event_time, shape, now);
        let late_parsed = write_parsed(&mut parsed, feed, body, event_time, shape, now);
        assert_eq!(
            (String::from_utf8_lossy(&fast), late),
            (String::from_utf8_lossy(&parsed), late_parsed),
            "{feed:?} {body}"
        );
    }

    /// Queued bodies as the agent writes them: serde_json's compact text of a parsed record.
    fn queued_bodies() -> Vec<(Feed, String)> {
        let mut out: Vec<(Feed, String)> =
            crate::sim::records::fixtures().into_iter().map(|(feed, r)| (feed, r.to_string())).collect();
        for feed in Feed::ALL {
            for i in 0..10 {
                out.push((feed, crate::sim::records::generate(feed, i, 1_700_000_000, 200 * i as usize).to_string()));
            }
        }
        for text in [
            r#"{}"#,
            r#"{"message":"m","status":"s","service":"x","host":"h","source":"src","ddsource":1,"ddtags":[],"hostname":null,"timestamp":{"a":1}}"#,
            r#"{"message":"m","mimecast.message":"n"}"#,
            r#"{"mimecast.message":"n","message":"m"}"#,
            r#"{"mimecast_late":true,"original_date":"x","date":"2024-05-27T09:04:25+0000"}"#,
            r#"{"k\"ey":"\u0000\u001f\u007f\b\f\n\r\t\"\\/ é 日本 \ud83d\ude00","":"","é":[1.50,-0,1E+5,123456789012345678901234567890]}"#,
            r#"{"a":{"message":1,"b":[{"status":2}]},"n":-12.5e-3,"t":true,"f":false,"z":null}"#,
        ] {
            for feed in Feed::ALL {
                out.push((feed, serde_json::from_str::<Value>(text).unwrap().to_string()));
            }
        }
        out
    }

    #[test]
    fn the_fast_path_gives_the_parsed_paths_bytes() {
        let now = datetime::parse("2024-05-27T10:00:00Z").unwrap();
        let mut no_tags = shape(LateRecords::Keep);
        no_tags.ddtags = String::new();
        no_tags.hostname = "h\"ost\u{1}é".into();
        let bodies = queued_bodies();
        for (feed, body) in &bodies {
            for shape in [&shape(LateRecords::Restamp), &shape(LateRecords::Keep), &no_tags] {
                for event_time in [None, Some(now - 60), Some(now - 20 * 3600), Some(now + 3 * 3600)] {
                    same_bytes(*feed, body, event_time, shape, now);
                }
            }
        }
        // Duplicate names (never in what the agent queues) and bodies that are not objects take the parsing path.
        for body in [r#"{"a":1,"a":2}"#, r#"{"message":1,"mimecast.message":2}"#, "[1]", r#""s""#, "7", "", "{", "{} x"]
        {
            same_bytes(Feed::Audit, body, None, &shape(LateRecords::Keep), now);
            assert!(Fields::of(body).is_none(), "{body}");
        }
        // Only the two chosen bodies that hold both `message` and `mimecast.message` miss the fast path, in each feed.
        assert_eq!(bodies.iter().filter(|(_, b)| Fields::of(b).is_none()).count(), 2 * Feed::ALL.len());
    }

    proptest::proptest! {
        #[test]
        fn any_queued_record_gets_the_parsed_paths_bytes(record in json::object(), late in proptest::bool::ANY) {
            let body = record.to_string();
            let now = 1_800_000_000;
            let t = if late { now - 100_000 } else { now };
            same_bytes(Feed::Dlp, &body, Some(t), &shape(LateRecords::Keep), now);
            same_bytes(Feed::TtpUrl, &body, Some(t), &shape(LateRecords::Restamp), now);
        }
    }

    /// Arbitrary JSON with reserved and awkward names, escapes and numbers as written.
    pub(crate) mod json {
        use proptest::prelude::*;
        use serde_json::{Map, Value};

        fn name() -> impl Strategy<Value = String> {
            prop_oneof![
                proptest::sample::select(vec![
                    "message",
                    "status",
                    "host",
                    "source",
                    "service",
                    "timestamp",
                    "ddtags",
                    "mimecast.message",
                    "mimecast.status",
                    "mimecast_late",
                    "date",
                    "eventTime",
                    "id",
                    "",
                    "é",
                    "a\"b",
                    "\\",
                    "\u{1}",
                ])
                .prop_map(str::to_owned),
                "[a-z]{1,3}",
                any::<String>(),
            ]
        }

        fn scalar() -> impl Strategy<Value = Value> {
            prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(Value::from),
                proptest::sample::select(vec![
                    "1.50",
                    "-0",
                    "0.0",
                    "1e5",
                    "1E+5",
                    "-12.5e-3",
                    "123456789012345678901234567890"
                ])
                .prop_map(|n| serde_json::from_str(n).unwrap()),
                any::<String>().prop_map(Value::String),
                "[ -~\t\n\u{7f}\u{e9}\u{2028}\u{1f600}]{0,12}".prop_map(Value::String),
            ]
        }

        pub fn value() -> impl Strategy<Value = Value> {
            scalar().prop_recursive(4, 40, 6, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                    proptest::collection::vec((name(), inner), 0..6)
                        .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<String, Value>>())),
                ]
            })
        }

        pub fn object() -> impl Strategy<Value = Value> {
            proptest::collection::vec((name(), value()), 0..12)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<String, Value>>()))
        }
    }
}
