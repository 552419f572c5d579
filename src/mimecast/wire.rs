//! Pure Mimecast wire format: the page request, the page response, and a record's stable key and time.

use serde::de::{DeserializeSeed, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::Feed;
use super::window::Window;
use crate::datetime;
use crate::error::Cause;
use crate::http::printable;

/// One parsed page of a feed.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    pub records: Vec<Value>,
    /// How many records the page held: the loop takes `records` out to queue them, and the page still says
    /// whether it was empty.
    pub held: usize,
    pub next: Option<String>,
    /// Characters that no JSON parser accepts (invalid UTF-8, unpaired UTF-16 surrogates) were replaced with
    /// U+FFFD to read this page: how many.
    pub repaired: usize,
    /// The digest of the page's record keys in any order ([`keys_digest`]), set by the fetch task once it has keyed
    /// the records (`None` until then): the poller compares it with the page before, which the records, taken
    /// out to be queued, no longer can.
    pub keys: Option<KeysDigest>,
}

impl Page {
    /// Real responses carry `next` on a final, empty page: stop on a missing `next` or an empty page.
    pub fn is_last(&self) -> bool {
        self.next.is_none() || self.held == 0
    }
}

/// Why a 200 response is not a page.
#[derive(Debug, Clone, PartialEq)]
pub enum WireError {
    /// Not the JSON envelope we expect (truncated, HTML from a proxy, a changed shape, a record that is not an
    /// object). Never read as a last page: that would move the cursor past records never read.
    Malformed(String),
    /// Not JSON at all (truncated, an HTML page), even after repairing characters: the parser's error.
    NotJson(Cause),
    /// A non-empty `fail[]`: the call failed even though HTTP said 200. `code` holds the errors' codes joined by
    /// "; " ("?" for an error without one), kept so the caller can tell a refused page token from the rest.
    Failed { retryable: bool, code: String, message: String },
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireError::Malformed(m) => write!(f, "malformed response: {m}"),
            WireError::NotJson(e) => write!(f, "malformed response: {e}"),
            WireError::Failed { retryable, message, .. } => {
                write!(f, "call failed ({}): {message}", if *retryable { "retryable" } else { "not retryable" })
            }
        }
    }
}

impl std::error::Error for WireError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            WireError::NotJson(e) => Some(e.get()),
            WireError::Malformed(_) | WireError::Failed { .. } => None,
        }
    }
}

/// The request body of one page: the same filter on every page of a window; only `pageToken` changes.
pub fn page_request(feed: Feed, window: Window, page_size: u32, token: Option<&str>) -> Vec<u8> {
    let filter = feed.filter(&datetime::mimecast(window.from), &datetime::mimecast(window.to));
    let mut pagination = json!({ "pageSize": page_size });
    if let Some(t) = token {
        pagination["pageToken"] = Value::String(t.to_owned());
    }
    json!({ "meta": { "pagination": pagination }, "data": [filter] }).to_string().into_bytes()
}

/// Parses a 200 response body into a page, or says why it is not one. Every value is checked: only JSON objects
/// are ever returned as records, and anything that does not look like the documented envelope is `Malformed` or
/// `NotJson` (a failed call, retried), never a last page.
///
/// A page in which one object holds a name twice, at any depth, is `Malformed` too, naming the feed, the name and
/// where it is ([`read`]). JSON leaves such a value undefined (RFC 8259: names SHOULD be unique), and
/// serde_json keeps the last value alone: the record would be queued without the first, altered with nothing
/// said. It is not kept as it came instead: a record is keyed, stored and sent from its parsed value, and what
/// Datadog received would be an object whose reader may keep either value. So the page is not stored and is read
/// again with backoff, as any malformed page, and its feed waits there with the error in `status` until Mimecast
/// sends it otherwise: nothing is lost or altered, and the operator is told. Every depth is checked, not only a
/// record's top level: a repeated name loses a value wherever it is, and in the envelope a repeated `data` (or a
/// wrapper's records array) would lose records whole.
pub fn parse_page(feed: Feed, body: &[u8]) -> Result<Page, WireError> {
    // A serializer that cut a string inside an emoji (an unpaired surrogate) or wrote Latin-1 makes the whole page
    // unreadable, and a page that is never read stops its feed for good: read such a page with the offending
    // characters replaced, and say so, rather than stall. A UTF-8 byte order mark in front is skipped, as RFC 8259
    // allows a parser to.
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    let (doc, repaired): (Value, usize) = match read(feed, body) {
        Ok(doc) => (doc?, 0),
        Err(e) => {
            let (text, repaired) = repair(body);
            match read(feed, text.as_bytes()) {
                Ok(doc) if repaired > 0 => (doc?, repaired),
                _ => return Err(WireError::NotJson(Cause::new(e))),
            }
        }
    };
    // The records are moved out of the parsed document, never copied.
    let Value::Object(mut obj) = doc else { return Err(malformed("not a JSON object")) };
    match obj.get("fail") {
        Some(Value::Array(fails)) if !fails.is_empty() => return Err(failure(fails)),
        Some(Value::Array(_) | Value::Null) | None => {}
        Some(_) => return Err(malformed("fail is not an array")),
    }
    let meta = match obj.remove("meta") {
        Some(Value::Object(m)) => m,
        Some(_) => return Err(malformed("meta is not an object")),
        None => return Err(malformed("no meta object")),
    };
    let data = match obj.remove("data") {
        Some(Value::Array(d)) => d,
        Some(Value::Null) | None => return Err(malformed("no data array")),
        Some(_) => return Err(malformed("data is not an array")),
    };
    let records = match feed.spec().records_key {
        None => objects(data, "data[]")?,
        Some(key) => unwrap_records(feed, key, data)?,
    };
    Ok(Page { held: records.len(), records, next: next_token(&meta)?, repaired, keys: None })
}

fn malformed(m: &str) -> WireError {
    WireError::Malformed(m.to_owned())
}

/// The JSON document `text`, built in one pass that also notices a name held twice by one object: `Err` when
/// `text` is not JSON (the parser's error), `Ok(Err(Malformed))` when it is but repeats a name (see
/// [`parse_page`]).
fn read(feed: Feed, text: &[u8]) -> Result<Result<Value, WireError>, serde_json::Error> {
    let mut found = None;
    let mut de = serde_json::Deserializer::from_slice(text);
    let doc = Build(&mut found, 0).deserialize(&mut de).and_then(|doc| de.end().map(|()| doc));
    match (doc, found) {
        // The build stopped at the repeated name: the rest of the text must be JSON too, or the page is not JSON
        // (and may yet be read once repaired), as the parser that reads it whole says (a rare path: a whole parse).
        (_, Some(r)) => match serde_json::from_slice::<Value>(text) {
            Err(e) => Err(e),
            Ok(_) => Ok(Err(WireError::Malformed(format!(
                "the {feed} page holds the name \"{}\" twice in one object, at {}: a JSON reader keeps one of the \
                 values and loses the other, so the page is not stored",
                printable(&r.name, 100),
                r.at()
            )))),
        },
        (Ok(doc), None) => Ok(Ok(doc)),
        (Err(e), None) => Err(e),
    }
}

/// A name that one object holds twice, and where that object is.
#[derive(Debug)]
struct Repeated {
    name: String,
    /// The steps from the page's top level down to the object, innermost first (as they were found).
    path: Vec<Step>,
}

#[derive(Debug)]
enum Step {
    Name(String),
    Index(usize),
}

impl Repeated {
    /// The object's place, as `data[1].u.v[0]`, or "its top level". Names are the server's: printed safely and cut.
    fn at(&self) -> String {
        let mut at = String::new();
        for step in self.path.iter().rev() {
            match step {
                Step::Index(i) => at.push_str(&format!("[{i}]")),
                Step::Name(name) => {
                    if !at.is_empty() {
                        at.push('.');
                    }
                    at.push_str(&printable(name, 100));
                }
            }
        }
        if at.is_empty() { "its top level".to_owned() } else { at }
    }
}

/// serde_json's private names through which, with `arbitrary_precision` and `raw_value`, its parser hands a number
/// (and its `Value` reads a raw value) to a visitor as an object of one name: read as serde_json's `Value` reads
/// them, so the document built is the one `serde_json::from_slice` gives.
const NUMBER_TOKEN: &str = "$serde_json::private::Number";
const RAW_VALUE_TOKEN: &str = "$serde_json::private::RawValue";

/// Builds a JSON document as serde_json's `Value` does, and notices on the way a name that one object holds twice
/// (as the object's map takes it: names compared as read, escapes undone, so `"id"` and `"\u0069d"` are the same
/// name). On the first such name it fills in the [`Repeated`] and stops with an error, to which each level adds
/// its step on the way out. One pass: the check costs a look at what the map's insert returns.
///
/// The second field is how many names an object is likely to hold: the elements of an array (a page's records)
/// are alike, so each object of an array is made with room for as many names as the one before it held, instead
/// of growing its map four or five times over.
struct Build<'f>(&'f mut Option<Repeated>, usize);

/// At most this much room is made ahead for an object's names (a record has a few dozen): a small object after a
/// huge one, over and over in a hostile page, must not hold the huge one's room each.
const MAX_NAMES_AHEAD: usize = 256;

impl Build<'_> {
    fn step<E>(self, step: impl FnOnce() -> Step, e: E) -> E {
        if let Some(r) = self.0 {
            r.path.push(step());
        }
        e
    }
}

impl<'de> DeserializeSeed<'de> for Build<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Build<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any valid JSON value")
    }

    fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
        Ok(Value::Bool(b))
    }

    fn visit_i64<E>(self, n: i64) -> Result<Value, E> {
        Ok(Value::from(n))
    }

    fn visit_u64<E>(self, n: u64) -> Result<Value, E> {
        Ok(Value::from(n))
    }

    fn visit_f64<E>(self, n: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(n).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, s: &str) -> Result<Value, E> {
        Ok(Value::String(s.to_owned()))
    }

    fn visit_string<E>(self, s: String) -> Result<Value, E> {
        Ok(Value::String(s))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        self.deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        let mut names = 0;
        loop {
            match seq.next_element_seed(Build(&mut *self.0, names)) {
                Ok(Some(v)) => {
                    if let Value::Object(o) = &v {
                        names = o.len();
                    }
                    items.push(v);
                }
                Ok(None) => return Ok(Value::Array(items)),
                Err(e) => return Err(self.step(|| Step::Index(items.len()), e)),
            }
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = serde_json::Map::new();
        let mut first = true;
        while let Some(name) = map.next_key::<String>()? {
            if std::mem::take(&mut first) {
                if name == NUMBER_TOKEN {
                    let text: String = map.next_value()?;
                    return text.parse().map(Value::Number).map_err(A::Error::custom);
                }
                if name == RAW_VALUE_TOKEN {
                    let text: String = map.next_value()?;
                    return serde_json::from_str(&text).map_err(A::Error::custom);
                }
                object = serde_json::Map::with_capacity(self.1.min(MAX_NAMES_AHEAD));
            }
            let value = match map.next_value_seed(Build(&mut *self.0, 0)) {
                Ok(v) => v,
                Err(e) => return Err(self.step(|| Step::Name(name), e)),
            };
            match object.entry(name) {
                serde_json::map::Entry::Vacant(place) => {
                    place.insert(value);
                }
                serde_json::map::Entry::Occupied(held) => {
                    *self.0 = Some(Repeated { name: held.key().clone(), path: Vec::new() });
                    return Err(A::Error::custom("a name repeated in one object"));
                }
            }
        }
        Ok(Value::Object(object))
    }
}

/// `meta.pagination.next`: absent, JSON null or "" mean no next page. A JSON null is read as absent because a
/// serializer that writes unset fields as null says just that, and a null cannot carry a token to go on with.
fn next_token(meta: &serde_json::Map<String, Value>) -> Result<Option<String>, WireError> {
    let pagination = match meta.get("pagination") {
        Some(Value::Object(p)) => p,
        Some(Value::Null) | None => return Ok(None),
        Some(_) => return Err(malformed("meta.pagination is not an object")),
    };
    match pagination.get("next") {
        Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
        Some(Value::String(_) | Value::Null) | None => Ok(None),
        Some(_) => Err(malformed("meta.pagination.next is not a string")),
    }
}

/// The records of one array, each of which must be a JSON object.
fn objects(items: Vec<Value>, place: &str) -> Result<Vec<Value>, WireError> {
    if let Some(other) = items.iter().find(|v| !v.is_object()) {
        return Err(WireError::Malformed(format!("a record in {place} is not an object: {}", kind(other))));
    }
    Ok(items)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn unwrap_records(feed: Feed, key: &str, data: Vec<Value>) -> Result<Vec<Value>, WireError> {
    let mut records = Vec::new();
    for item in data {
        let Value::Object(mut wrapper) = item else {
            return Err(WireError::Malformed(format!("a data[] item is {}, not an object", kind(&item))));
        };
        match wrapper.remove(key) {
            Some(Value::Array(inner)) => records.extend(objects(inner, &format!("data[].{key}"))?),
            Some(Value::Null) => {}
            Some(_) => return Err(WireError::Malformed(format!("data[].{key} is not an array"))),
            // The documented wrapper's counter alone (`{"resultCount": 0}`) holds nothing, on every feed.
            None if is_result_count(&wrapper) => {}
            // Unconfirmed: rejections may come flat in data[]; any other item without the wrapper key is a record,
            // forwarded whatever it holds.
            None if feed == Feed::Rejection => records.push(Value::Object(wrapper)),
            // Elsewhere a wrapper of other counters, or none, holds nothing either.
            None if is_counter_only(&wrapper) => {}
            None => return Err(WireError::Malformed(format!("data[] item has no {key} array"))),
        }
    }
    Ok(records)
}

fn is_counter_only(item: &serde_json::Map<String, Value>) -> bool {
    item.values().all(Value::is_number)
}

fn is_result_count(item: &serde_json::Map<String, Value>) -> bool {
    item.len() == 1 && item.get("resultCount").is_some_and(Value::is_number)
}

fn failure(fails: &[Value]) -> WireError {
    let mut retryable = false;
    let mut parts = Vec::new();
    let mut codes = Vec::new();
    // The server chose these strings: keep a few, shortened, so an error message stays an error message.
    for f in fails.iter().take(10) {
        for e in f.get("errors").and_then(Value::as_array).into_iter().flatten().take(10) {
            retryable |= e.get("retryable").and_then(Value::as_bool).unwrap_or(false);
            let code = printable(e.get("code").and_then(Value::as_str).unwrap_or("?"), 100);
            let msg = printable(e.get("message").and_then(Value::as_str).unwrap_or(""), 300);
            parts.push(format!("{code}: {msg}"));
            codes.push(code);
        }
    }
    if parts.is_empty() {
        parts.push(format!("{} fail[] item(s) without errors", fails.len()));
    }
    WireError::Failed { retryable, code: codes.join("; "), message: parts.join("; ") }
}

/// The body as text with invalid UTF-8 and unpaired `\uD800`..`\uDFFF` escapes replaced by U+FFFD, and how
/// many were replaced. A backslash only ever appears inside a JSON string, so escapes can be read without
/// tracking strings.
fn repair(body: &[u8]) -> (String, usize) {
    let lossy = String::from_utf8_lossy(body);
    let mut repaired = if std::str::from_utf8(body).is_err() { lossy.matches('\u{fffd}').count().max(1) } else { 0 };
    let text = lossy.as_ref();
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let surrogate = |s: &str| -> Option<u16> {
        let hex = s.get(2..6)?;
        let v = u16::from_str_radix(hex, 16).ok()?;
        (s.starts_with("\\u") && (0xD800..=0xDFFF).contains(&v)).then_some(v)
    };
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        match surrogate(rest) {
            Some(0xD800..=0xDBFF) if surrogate(&rest[6..]).is_some_and(|lo| lo >= 0xDC00) => {
                out.push_str(&rest[..12]);
                rest = &rest[12..];
            }
            Some(_) => {
                out.push_str("\\ufffd");
                rest = &rest[6..];
                repaired += 1;
            }
            None => {
                // Any other escape: copy the backslash and the escaped character as they are.
                let n = rest[1..].chars().next().map_or(1, |c| 1 + c.len_utf8());
                out.push_str(&rest[..n]);
                rest = &rest[n..];
            }
        }
    }
    out.push_str(rest);
    (out, repaired)
}

/// The stable per-record key: the feed's id where it has one, plus a SHA-256 of the canonical JSON (content with
/// sorted keys, so the same across builds, versions and field order). The id alone is not enough: real test data
/// shows one id with different content, and a record must never be skipped because another one shared its id.
/// A re-read of the same record gives the same key, which is all deduplication needs.
pub fn record_key(feed: Feed, record: &Value) -> String {
    thread_local! {
        /// The canonical text of the last record keyed on this thread: one buffer, grown once, reused.
        static CANON: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let digest = CANON.with_borrow_mut(|canon| {
        canon.clear();
        canonical(record, canon);
        Sha256::digest(&canon[..])
    });
    let id = feed.spec().id_field.and_then(|f| record.get(f)).and_then(Value::as_str).filter(|id| !id.is_empty());
    let mut key = String::with_capacity(id.map_or(0, str::len) + 36);
    match id {
        Some(id) => {
            key.push_str("id:");
            key.push_str(id);
            key.push('/');
        }
        None => key.push_str("h:"),
    }
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in &digest[..16] {
        key.push(char::from(HEX[usize::from(b >> 4)]));
        key.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    key
}

/// A SHA-256 of a page's record keys in any order: two pages with the same digest hold the same records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeysDigest([u8; 32]);

/// The digest of the record keys of a page, in any order. Each key is hashed with its length first, so that no two
/// different lists of keys hash the same bytes.
pub fn keys_digest<'a>(keys: impl IntoIterator<Item = &'a str>) -> KeysDigest {
    // In any order: a server that sends a page's records again may shuffle them.
    let mut keys: Vec<&str> = keys.into_iter().collect();
    keys.sort_unstable();
    let mut h = Sha256::new();
    for k in keys {
        h.update((k.len() as u64).to_le_bytes());
        h.update(k.as_bytes());
    }
    KeysDigest(h.finalize().into())
}

/// Compact JSON with object keys sorted, recursively, appended to `out`: names and strings escaped as serde_json
/// escapes them, numbers as written.
pub fn canonical(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(m) => {
            let mut fields: Vec<(&String, &Value)> = m.iter().collect();
            fields.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (k, v)) in fields.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                json_string(out, k);
                out.push(b':');
                canonical(v, out);
            }
            out.push(b'}');
        }
        Value::Array(a) => {
            out.push(b'[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical(x, out);
            }
            out.push(b']');
        }
        Value::String(s) => json_string(out, s),
        Value::Number(n) => out.extend_from_slice(n.as_str().as_bytes()),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Null => out.extend_from_slice(b"null"),
    }
}

/// Appends `s` as a JSON string, escaped exactly as serde_json escapes it.
fn json_string(out: &mut Vec<u8>, s: &str) {
    // Writing into a Vec cannot fail, and a str always serializes.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// The text a record is queued as: serde_json's compact serialization, field order and number spelling kept.
/// The same bytes as `record.to_string()`, without going through `fmt::Display`.
pub fn body(record: &Value) -> String {
    serde_json::to_string(record).unwrap_or_else(|_| record.to_string())
}

/// The record's own event time, if its time field holds a datetime we can read.
pub fn record_time(feed: Feed, record: &Value) -> Option<i64> {
    record.get(feed.spec().time_field).and_then(Value::as_str).and_then(datetime::parse)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(feed: Feed, body: &str) -> Result<Page, WireError> {
        parse_page(feed, body.as_bytes())
    }

    #[test]
    fn pages_of_each_shape() {
        let p = parse(Feed::Audit, r#"{"meta":{"pagination":{"next":"t1"}},"data":[{"id":"a"}],"fail":[]}"#).unwrap();
        assert_eq!((p.records.len(), p.next.as_deref(), p.is_last()), (1, Some("t1"), false));

        let p =
            parse(Feed::Dlp, r#"{"meta":{"status":200},"data":[{"dlpLogs":[{"x":1},{"x":2}]}],"fail":[]}"#).unwrap();
        assert_eq!((p.records.len(), p.next.as_deref(), p.is_last()), (2, None, true));

        // `next` on an empty final page still ends the window.
        let p = parse(Feed::TtpUrl, r#"{"meta":{"pagination":{"next":"next"}},"data":[],"fail":[]}"#).unwrap();
        assert!(p.is_last());

        // A wrapper of counters alone holds no record, on the rejection feed too (where an item without the
        // wrapper key is otherwise taken for a flat rejection).
        for feed in [Feed::TtpImpersonation, Feed::Rejection] {
            let p = parse(feed, r#"{"meta":{},"data":[{"resultCount":0}]}"#).unwrap();
            assert!(p.records.is_empty(), "{feed:?}");
        }
        let p = parse(Feed::Rejection, r#"{"meta":{},"data":[{"resultCount":1},{"id":"r1","info":"x"}]}"#).unwrap();
        assert_eq!(p.records.len(), 1);

        // A byte order mark in front of the page is skipped, not a page that stops its feed.
        let p = parse_page(Feed::Audit, b"\xEF\xBB\xBF{\"meta\":{},\"data\":[{\"id\":\"a\"}]}").unwrap();
        assert_eq!(p.records.len(), 1);

        // No pagination, no records: a valid empty last page. A null or empty `next` is no next.
        for body in [
            r#"{"meta":{"status":200},"data":[]}"#,
            r#"{"meta":{"pagination":null},"data":[]}"#,
            r#"{"meta":{"pagination":{"next":null}},"data":[{"id":"a"}]}"#,
            r#"{"meta":{"pagination":{"next":""}},"data":[{"id":"a"}],"fail":null}"#,
        ] {
            assert!(parse(Feed::Audit, body).unwrap().is_last(), "{body}");
        }
    }

    #[test]
    fn the_keys_digest_tells_the_same_records_in_any_order_from_any_other_list() {
        let d = |keys: &[&str]| keys_digest(keys.iter().copied());
        assert_eq!(d(&["a", "b"]), d(&["a", "b"]));
        assert_eq!(d(&["a", "b"]), d(&["b", "a"]), "the order does not count");
        assert_ne!(d(&["a", "b"]), d(&["a", "b", "b"]));
        assert_ne!(d(&["ab"]), d(&["a", "b"]), "keys do not run into each other");
        assert_ne!(d(&["a"]), d(&["a", ""]));
        assert_ne!(d(&[]), d(&[""]));
    }

    #[test]
    fn rejections_accept_both_shapes() {
        let wrapped = parse(Feed::Rejection, r#"{"meta":{},"data":[{"rejections":[{"id":"r1"}]}]}"#).unwrap();
        let flat = parse(Feed::Rejection, r#"{"meta":{},"data":[{"id":"r1"}]}"#).unwrap();
        assert_eq!(wrapped.records, flat.records);
    }

    #[test]
    fn fail_on_200_is_an_error_not_an_empty_page() {
        let body = r#"{"meta":{"status":200},"data":[],"fail":[{"key":{},"errors":[{"code":"err_x","message":"busy","retryable":true}]}]}"#;
        assert_eq!(
            parse(Feed::Dlp, body),
            Err(WireError::Failed { retryable: true, code: "err_x".into(), message: "err_x: busy".into() })
        );
        let body = r#"{"fail":[{"errors":[{"code":"bad","message":"no","retryable":false}]}]}"#;
        assert!(matches!(parse(Feed::Dlp, body), Err(WireError::Failed { retryable: false, .. })));
    }

    #[test]
    fn unreadable_characters_are_replaced_not_a_stalled_feed() {
        let page =
            |s: &[u8]| parse_page(Feed::Audit, &[br#"{"meta":{},"data":[{"id":"a","s":""#, s, br#""}]}"#].concat());
        for (bad, want) in [
            (&br"\ud83d"[..], "\u{fffd}"),
            (&br"x\udc00y"[..], "x\u{fffd}y"),
            (&b"caf\xe9"[..], "caf\u{fffd}"),
            (&br"\ud83d\ude00 ok \\ud83d"[..], "\u{1f600} ok \\ud83d"),
        ] {
            let p = page(bad).unwrap_or_else(|e| panic!("{bad:?}: {e}"));
            assert_eq!(p.records[0]["s"], want, "{bad:?}");
        }
        assert_eq!(page(br"\ud83d").unwrap().repaired, 1);
        assert_eq!(page(br"\ud83d\ude00").unwrap().repaired, 0);
        assert!(page(br"\ud83d\u").is_err(), "other damage is still an error");
    }

    #[test]
    fn malformed_bodies_are_errors() {
        for body in ["[]", r#"{"meta":{}}"#, r#"{"data":{}}"#, r#"{"data":[{"other":[]}]}"#] {
            assert!(matches!(parse(Feed::Dlp, body), Err(WireError::Malformed(_))), "{body}");
        }
        for body in ["", "{", "<html>"] {
            let e = parse(Feed::Dlp, body).unwrap_err();
            assert!(matches!(e, WireError::NotJson(_)), "{body}: {e:?}");
            // The parser's own error is the source, and the message says it once.
            let source = std::error::Error::source(&e).expect("the JSON error");
            assert!(source.downcast_ref::<serde_json::Error>().is_some(), "{source:?}");
            assert_eq!(e.to_string(), format!("malformed response: {source}"));
        }
    }

    /// A name repeated within one object, at any depth of the page, makes the page malformed (serde_json would keep
    /// the last value alone); the same name in different objects, or spelt differently, does not.
    #[test]
    fn a_name_repeated_in_one_object_is_a_malformed_page_naming_it() {
        let check = |feed: Feed, body: &str, want: Option<&str>| {
            let got = parse(feed, body);
            match want {
                None => assert!(got.is_ok(), "{feed:?} {body}: {got:?}"),
                Some(want) => assert_eq!(got, Err(WireError::Malformed(want.into())), "{feed:?} {body}"),
            }
        };
        let twice = |feed: &str, name: &str, at: &str| {
            format!(
                "the {feed} page holds the name \"{name}\" twice in one object, at {at}: a JSON reader keeps one of \
                 the values and loses the other, so the page is not stored"
            )
        };
        // In a record, at its top level and nested, in objects and arrays.
        check(
            Feed::Audit,
            r#"{"meta":{},"data":[{"id":"a","dup":1,"x":2,"dup":3}]}"#,
            Some(&twice("audit", "dup", "data[0]")),
        );
        check(
            Feed::Audit,
            r#"{"meta":{},"data":[{"id":"a"},{"id":"b","u":{"v":[0,{"w":1,"w":2}]}}]}"#,
            Some(&twice("audit", "w", "data[1].u.v[1]")),
        );
        check(
            Feed::Dlp,
            r#"{"meta":{},"data":[{"dlpLogs":[{"x":1},{"x":1,"y":{},"x":1}]}]}"#,
            Some(&twice("dlp", "x", "data[0].dlpLogs[1]")),
        );
        check(
            Feed::Rejection,
            r#"{"meta":{},"data":[{"info":"a","info":"b"}]}"#,
            Some(&twice("rejection", "info", "data[0]")),
        );
        // The same name however it is escaped is the same name.
        check(Feed::Audit, r#"{"meta":{},"data":[{"id":"a","\u0069d":"b"}]}"#, Some(&twice("audit", "id", "data[0]")));
        // In the envelope: a second data array, or a wrapper's records twice, would lose records whole.
        check(
            Feed::Audit,
            r#"{"meta":{},"data":[{"id":"a"}],"data":[]}"#,
            Some(&twice("audit", "data", "its top level")),
        );
        check(
            Feed::Dlp,
            r#"{"meta":{},"data":[{"dlpLogs":[{"x":1}],"dlpLogs":[{"x":2}]}]}"#,
            Some(&twice("dlp", "dlpLogs", "data[0]")),
        );
        check(
            Feed::Audit,
            r#"{"meta":{"pagination":{"next":"a","next":"b"}},"data":[]}"#,
            Some(&twice("audit", "next", "meta.pagination")),
        );
        // A page read with characters repaired is checked the same.
        let repaired = parse_page(Feed::Audit, b"{\"meta\":{},\"data\":[{\"s\":\"caf\xe9\",\"s\":1}]}");
        assert_eq!(repaired, Err(WireError::Malformed(twice("audit", "s", "data[0]"))));
        // A name the server chose is printed safely and cut.
        let long = format!("n\\u001b{}", "x".repeat(300));
        let got = parse(Feed::Audit, &format!(r#"{{"meta":{{}},"data":[{{"{long}":1,"{long}":2}}]}}"#)).unwrap_err();
        assert_eq!(got, WireError::Malformed(twice("audit", &format!("n {}", "x".repeat(98)), "data[0]")));
        // Not repeated: the same name in different objects, at different depths, in other cases, or numbers of any
        // size (serde_json reads those as an object of one name of its own).
        check(
            Feed::Audit,
            r#"{"meta":{},"data":[{"id":"a","x":{"id":"a","x":1}},{"id":"a","x":[{"x":1},{"x":1}]}]}"#,
            None,
        );
        check(Feed::Audit, r#"{"meta":{},"data":[{"id":"a","ID":"b","Id":"c","i d":1,"":0}]}"#, None);
        check(Feed::Audit, r#"{"meta":{},"data":[{"n":123456789012345678901234567890,"m":[1.50,1e5,-0]}]}"#, None);
    }

    #[test]
    fn hostile_envelopes_are_failed_calls_never_last_pages() {
        let malformed = |feed: Feed, body: &str| {
            let got = parse(feed, body);
            assert!(matches!(got, Err(WireError::Malformed(_))), "{feed:?} {body}: {got:?}");
        };
        // meta missing or not an object, even with data that looks like a last page.
        for body in
            [r#"{"data":[]}"#, r#"{"meta":null,"data":[]}"#, r#"{"meta":[],"data":[]}"#, r#"{"meta":"ok","data":[]}"#]
        {
            malformed(Feed::Audit, body);
        }
        // pagination or next of the wrong type.
        malformed(Feed::Audit, r#"{"meta":{"pagination":"t1"},"data":[]}"#);
        malformed(Feed::Audit, r#"{"meta":{"pagination":{"next":7}},"data":[{"id":"a"}]}"#);
        malformed(Feed::Audit, r#"{"meta":{"pagination":{"next":{"t":1}}},"data":[]}"#);
        malformed(Feed::Audit, r#"{"meta":{},"data":[],"fail":"oops"}"#);
        // Records that are not objects, flat and wrapped.
        malformed(Feed::Audit, r#"{"meta":{},"data":[1,"two",null]}"#);
        malformed(Feed::Audit, r#"{"meta":{},"data":[{"id":"a"},[]]}"#);
        malformed(Feed::Dlp, r#"{"meta":{},"data":[{"dlpLogs":[1,"two",null]}]}"#);
        malformed(Feed::Dlp, r#"{"meta":{},"data":[{"dlpLogs":[{"x":1}]},3]}"#);
        malformed(Feed::TtpUrl, r#"{"meta":{},"data":[{"clickLogs":[{"x":1},"y"]}]}"#);
        malformed(Feed::Rejection, r#"{"meta":{},"data":[1,"two",null]}"#);
        malformed(Feed::Rejection, r#"{"meta":{},"data":[{"rejections":[true]}]}"#);
    }

    #[test]
    fn request_keeps_filter_and_changes_only_the_token() {
        let w = Window { from: 1_634_546_702, to: 1_634_550_302 };
        let first: Value = serde_json::from_slice(&page_request(Feed::Dlp, w, 500, None)).unwrap();
        let second: Value = serde_json::from_slice(&page_request(Feed::Dlp, w, 500, Some("tok"))).unwrap();
        assert_eq!(first["data"], second["data"]);
        assert_eq!(first["data"][0]["from"], "2021-10-18T08:45:02+0000");
        assert!(first["meta"]["pagination"].get("pageToken").is_none());
        assert_eq!(second["meta"]["pagination"]["pageToken"], "tok");
    }

    #[test]
    fn keys_are_ids_or_stable_content_hashes() {
        let a: Value = serde_json::from_str(r#"{"id":"X","eventTime":"t"}"#).unwrap();
        let a2: Value = serde_json::from_str(r#"{"id":"X","eventTime":"u"}"#).unwrap();
        assert!(record_key(Feed::Audit, &a).starts_with("id:X/"));
        assert_ne!(record_key(Feed::Audit, &a), record_key(Feed::Audit, &a2), "same id, other content");
        let d1: Value = serde_json::from_str(r#"{"action":"hold","b":[1,{"z":1,"y":2}]}"#).unwrap();
        let d2: Value = serde_json::from_str(r#"{"b":[1,{"y":2,"z":1}],"action":"hold"}"#).unwrap();
        let d3: Value = serde_json::from_str(r#"{"action":"notification","b":[1,{"z":1,"y":2}]}"#).unwrap();
        assert_eq!(record_key(Feed::Dlp, &d1), record_key(Feed::Dlp, &d2));
        assert_ne!(record_key(Feed::Dlp, &d1), record_key(Feed::Dlp, &d3));
        // Pinned: the key must never change across versions, or upgrades would re-send the overlap.
        assert_eq!(record_key(Feed::Dlp, &d1), "h:ba22a6d92508ec3d4f8a6776e4fe6b55");
    }

    /// Every fixture record, and values chosen for their spelling: escapes,
    /// non-ASCII and control characters, numbers as written, nesting, empty containers and odd keys.
    fn pinned_records() -> Vec<(Feed, Value)> {
        let mut out = crate::sim::records::fixtures();
        let xsoar = std::fs::read_to_string("tests/data/xsoar_audit_raw_response.json").unwrap();
        out.push((Feed::Audit, serde_json::from_str(&xsoar).unwrap()));
        for text in [
            r#"{}"#,
            r#"{"id":""}"#,
            r#"{"id":7,"eventTime":null}"#,
            r#"{"id":"a\/b\u00e9\ud83d\ude00","x":"\u0000\u001f\u007f\b\f\n\r\t\"\\/"}"#,
            r#"{"n":[1.50,-0,0.0,1e5,1E+5,-12.5e-3,123456789012345678901234567890,18446744073709551616,-9223372036854775809]}"#,
            r#"{"b":[true,false,null,[],{},[[{}]],{"":""}],"":0,"é":1,"e\u0301":2,"Z":3,"a":4,"\u00e9":5}"#,
            r#"{"z":{"y":{"x":[{"b":1,"a":2},{"a":[3,{"d":4,"c":5}]}]}},"a":"\u2028\u2029 ü 日本 \ud800"}"#,
            r#"{"dup":1,"other":2,"dup":3}"#,
        ] {
            // The repair path reads unpaired surrogates as U+FFFD before keying; here the text parses as is.
            let v: Value = match serde_json::from_str(text) {
                Ok(v) => v,
                Err(_) => serde_json::from_str(&repair(text.as_bytes()).0).unwrap(),
            };
            for feed in Feed::ALL {
                out.push((feed, v.clone()));
            }
        }
        out
    }

    /// The canonical form as first written: a String per name and per scalar. Kept to prove the writer's bytes.
    fn canonical_reference(v: &Value, out: &mut String) {
        match v {
            Value::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                out.push('{');
                for (i, k) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::String(k.clone()).to_string());
                    out.push(':');
                    canonical_reference(&m[k], out);
                }
                out.push('}');
            }
            Value::Array(a) => {
                out.push('[');
                for (i, x) in a.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    canonical_reference(x, out);
                }
                out.push(']');
            }
            other => out.push_str(&other.to_string()),
        }
    }

    fn same_canonical(v: &Value) {
        let (mut reference, mut written) = (String::new(), Vec::new());
        canonical_reference(v, &mut reference);
        canonical(v, &mut written);
        assert_eq!(String::from_utf8_lossy(&written), reference);
    }

    #[test]
    fn the_canonical_writer_gives_the_first_versions_bytes() {
        for (_, r) in pinned_records() {
            same_canonical(&r);
            assert_eq!(body(&r), r.to_string(), "the queued text is unchanged too");
        }
        for feed in Feed::ALL {
            for i in 0..20 {
                same_canonical(&crate::sim::records::generate(feed, i, 1_700_000_000, 100 * i as usize));
            }
        }
    }

    /// The one-pass build gives serde_json's own document, numbers spelt as its parser keeps them, and a text that
    /// is not JSON after a repeated name is not JSON, as when the whole page was parsed before the check.
    #[test]
    fn the_one_pass_build_is_serde_jsons_value() {
        for text in [
            r#"{"n":[1.50,-0,0.0,1e5,1E+5,-12.5e-3,123456789012345678901234567890],"s":"a\u00e9\n","b":[true,null,{}]}"#,
            r#"{"$serde_json::private::Number":"12"}"#,
            r#"[{"a":{"b":[[],{"c":"d"}]}}, 7, "x"]"#,
        ] {
            let want: Value = serde_json::from_str(text).unwrap();
            assert_eq!(read(Feed::Audit, text.as_bytes()).unwrap().unwrap(), want, "{text}");
        }
        for text in [r#"{"a":1,"a":2,"#, r#"{"a":1,"a":2} x"#, r#"{"a":1,"a":2}}"#] {
            let want = serde_json::from_str::<Value>(text).unwrap_err().to_string();
            assert_eq!(read(Feed::Audit, text.as_bytes()).unwrap_err().to_string(), want, "{text}");
        }
    }

    proptest::proptest! {
        #[test]
        fn any_documents_one_pass_build_is_serde_jsons(v in crate::datadog::logobj::tests::json::value()) {
            let text = serde_json::to_vec(&v).unwrap();
            let want: Value = serde_json::from_slice(&text).unwrap();
            proptest::prop_assert_eq!(read(Feed::Audit, &text).unwrap().unwrap(), want);
        }

        #[test]
        fn any_records_canonical_form_is_the_first_versions(v in crate::datadog::logobj::tests::json::value()) {
            same_canonical(&v);
            proptest::prop_assert_eq!(body(&v), v.to_string());
        }
    }

    #[test]
    fn keys_of_fixture_and_chosen_records_are_pinned() {
        let records = pinned_records();
        let keys: Vec<String> = records.iter().map(|(f, r)| record_key(*f, r)).collect();
        // Computed by the first version of `record_key`: a few in full (one per chosen value), then all of them
        // through one digest.
        assert_eq!(keys[0].rsplit('/').next(), Some("3375320f631d56e50d49493306111eb6"));
        assert_eq!(keys[60].rsplit('/').next(), Some("82d7fde4b5acde9a0266997f323ef71a"));
        let chosen: Vec<&str> = keys[keys.len() - 48..].iter().step_by(6).map(String::as_str).collect();
        assert_eq!(
            chosen,
            [
                "h:44136fa355b3678a1146ad16f7e8649e",
                "h:72d427b7264997760074a94dcc1c9e54",
                "h:5376213f392ab330a283c1810338b233",
                "id:a/b\u{e9}\u{1f600}/e0d99dd00d2b1eb264324cb6051898b6",
                "h:97dca82913d524164b4e3b1099b771eb",
                "h:4f2b0c9b964b112b122c60e29515d984",
                "h:075dc88ab6ca7241e3a5c075dd726b22",
                "h:45e6463ee4916d014703e85932dc1b3c",
            ]
        );
        assert_eq!(keys[keys.len() - 29], "h:e0d99dd00d2b1eb264324cb6051898b6", "DLP has no id field");
        let all = Sha256::digest(keys.join("\n").as_bytes());
        let all: String = all.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            (keys.len(), all.as_str()),
            (115, "1ad916ce0485e13e2c3fe7e26d66381d5ca48a0cd7cc8317d43d167374f70c4b")
        );
    }
}
