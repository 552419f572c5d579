//! The simulated peers: Mimecast API 2.0 and Datadog's logs intake, answering the agent's requests through the
//! HTTP seam ([`Http::simulated`]) at once, by the simulated clock, with the faults of the seed's mix. The time an
//! exchange takes is added up in `State::elapsed`; the simulator hands the job's answer back that much later.

use std::collections::HashMap;
use std::io::Read as _;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use mimecast_forwarder::datetime;
use mimecast_forwarder::error::Cause;
use mimecast_forwarder::http::{Exchange, HttpError, Response, Transport};
use mimecast_forwarder::mimecast::{Feed, wire};
use mimecast_forwarder::sim::mimecast::{Quirks, serve_page};
use serde_json::{Value, json};

pub const CLIENT_ID: &str = "sim-client";
pub const CLIENT_SECRET: &str = "sim-secret";
pub const API_KEY: &str = "sim-api-key-0123456789";
/// A record carrying this text in a field is refused by the intake with 400 (a poison log).
pub const POISON: &str = "POISON-LOG";
/// The agent's HTTP timeout in the simulator (`http.timeout_secs`).
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// Which faults a seed enables, and how often each fires: swarm testing (each seed a random subset).
#[derive(Debug, Clone, Default)]
pub struct Faults {
    pub mc_429: f64,
    pub mc_5xx: f64,
    pub mc_fail_ok: f64,
    pub mc_truncated: f64,
    pub mc_timeout: f64,
    pub mc_drop: f64,
    pub mc_expire: f64,
    pub mc_new_token_loop: f64,
    pub mc_forbid: Option<Feed>,
    pub dd_5xx: f64,
    pub dd_429: f64,
    pub dd_timeout: f64,
    pub dd_drop: f64,
    pub dd_accept_then_drop: f64,
    pub dd_not_datadog: f64,
    /// A proxy in front of the intake refuses bodies above this many gzipped bytes with 413.
    pub dd_max_body: Option<usize>,
}

/// Fault kinds, for the coverage table.
pub const KINDS: &[&str] = &[
    "mc_429",
    "mc_5xx",
    "mc_fail_ok",
    "mc_truncated",
    "mc_timeout",
    "mc_drop",
    "mc_token_expired",
    "mc_pagination_loop",
    "mc_forbidden",
    "dd_5xx",
    "dd_429",
    "dd_timeout",
    "dd_drop",
    "dd_accepted_then_dropped",
    "dd_not_datadog",
    "dd_413",
    "dd_400_poison",
];

/// One record Mimecast holds.
pub struct Held {
    pub feed: Feed,
    pub key: String,
    pub record: Value,
    /// The time Mimecast filters on.
    pub filter_time: i64,
    /// When Mimecast first shows it (simulated seconds since the start).
    pub visible_at: Duration,
    /// Within the contract: indexed no later than `overlap_secs` after its filter time, and not a poison log (the
    /// simulator also leaves out what was indexed behind a clock that ran ahead: `behind_a_clock_ahead`).
    pub in_contract: bool,
    pub poison: bool,
}

/// One request the intake accepted, with what became of its answer.
pub struct Accepted {
    pub keys: Vec<String>,
    /// The agent was handed a 202 for it. Otherwise (a crash or shutdown with it in flight, an answer lost after
    /// the intake kept the logs) the agent could not know, and each of its logs may come again.
    pub acknowledged: bool,
    /// The agent was handed its 202, but the batch was still queued when the process ended: its removal failed
    /// (the queue locked), and its logs come again.
    pub removal_failed: bool,
}

#[derive(Default)]
pub struct State {
    pub faults: Faults,
    pub quiet: bool,
    pub rng: Option<fastrand::Rng>,
    /// The simulated time, in seconds since the start (and exactly), and the Unix time Mimecast keeps (the true one).
    pub t: u64,
    pub now: Duration,
    pub unix0: i64,
    pub held: Vec<Held>,
    /// Where each record key is in `held`.
    pub held_index: HashMap<String, usize>,
    /// Logs the intake accepted whose record differs from the one Mimecast served.
    pub altered: Vec<String>,
    /// Each feed's records, sorted by the time Mimecast filters on, added when Mimecast first shows them.
    pub by_feed: HashMap<Feed, Vec<(i64, Value)>>,
    pub tokens: HashMap<String, u64>,
    pub issued: u64,
    pub token_lifetime: u64,
    pub made_up: u64,
    /// Feeds whose server goes round (ignores page tokens) until a simulated time.
    pub looping: HashMap<Feed, u64>,
    /// Page requests per window (feed and filter), and the most of any window.
    /// Page requests per window (feed and filter) by the process running now: a `--once` pass, or a restart, may
    /// read the same window again whole (the overlap, when nothing new settled).
    pub per_window: HashMap<(Feed, String), u64>,
    pub most_per_window: u64,
    pub accepted: Vec<Accepted>,
    /// The intake's request currently being answered (for the job in progress) and its index in `accepted`.
    pub last_accepted: Option<usize>,
    pub fired: HashMap<&'static str, u64>,
    pub elapsed: Duration,
    pub requests: u64,
    /// Logs per request the intake saw, to spot a bisection down to one log.
    pub single_log_after_400: bool,
    pub saw_400: bool,
    /// The intake accepted a request after refusing one with 413: the agent learnt the proxy's limit.
    pub saw_413: bool,
    pub accepted_after_413: bool,
    /// Feeds whose window is part read (the last page served pointed at a next one).
    pub mid_window: std::collections::HashSet<Feed>,
    /// A token was issued while a feed was part way through a window.
    pub token_mid_window: bool,
    /// When the agent asked for each feed's first page of a window (a request without a page token), and the
    /// window's end (Unix).
    pub new_windows: HashMap<Feed, Vec<(Duration, i64)>>,
}

#[derive(Clone)]
pub struct Net(pub Arc<Mutex<State>>);

impl Net {
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn timeout() -> HttpError {
    HttpError::Timeout(Cause::new(std::io::Error::new(std::io::ErrorKind::TimedOut, "simulated timeout")))
}

fn dropped() -> HttpError {
    HttpError::Transport(Cause::new(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "simulated reset")))
}

fn json(status: u16, body: &Value) -> Response {
    Response {
        status,
        headers: vec![("Content-Type".into(), "application/json".into())],
        body: body.to_string().into_bytes(),
    }
}

fn fail(code: &str, retryable: bool) -> Value {
    json!({"meta": {"status": 200}, "data": [], "fail": [{"key": {}, "errors": [{"code": code, "message": "simulated", "retryable": retryable}]}]})
}

impl State {
    /// The key of every log the intake accepted, whatever became of the answer.
    pub fn keys_at_intake(&self) -> std::collections::HashSet<&str> {
        self.accepted.iter().flat_map(|a| a.keys.iter().map(String::as_str)).collect()
    }

    fn draw(&mut self, p: f64) -> bool {
        !self.quiet && p > 0.0 && self.rng.as_mut().is_some_and(|r| r.f64() < p)
    }

    fn fire(&mut self, kind: &'static str) {
        *self.fired.entry(kind).or_insert(0) += 1;
    }

    fn latency(&mut self) -> Duration {
        let ms = self.rng.as_mut().map_or(50, |r| r.u64(5..400));
        Duration::from_millis(ms)
    }

    fn token(&mut self, body: &[u8]) -> Response {
        let form = String::from_utf8_lossy(body);
        let field = |name: &str| form.split('&').find_map(|kv| kv.strip_prefix(&format!("{name}=")));
        if field("client_id") != Some(CLIENT_ID) || field("client_secret") != Some(CLIENT_SECRET) {
            return json(401, &json!({"error": "invalid_client"}));
        }
        self.issued += 1;
        self.token_mid_window |= !self.mid_window.is_empty();
        let token = format!("sim-token-{}", self.issued);
        self.tokens.insert(token.clone(), self.t + self.token_lifetime);
        json(200, &json!({"access_token": token, "token_type": "Bearer", "expires_in": self.token_lifetime}))
    }

    fn mimecast(&mut self, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Result<Response, HttpError> {
        if path == "/oauth/token" {
            return Ok(self.token(body));
        }
        let Some(feed) = Feed::ALL.into_iter().find(|f| f.spec().path == path) else {
            return Ok(json(404, &json!({"fail": []})));
        };
        let bearer = headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("Authorization")).map(|(_, v)| *v);
        let live = bearer.and_then(|b| b.strip_prefix("Bearer ")).and_then(|t| self.tokens.get(t)).copied();
        if self.draw(self.faults.mc_expire) {
            self.fire("mc_token_expired");
            self.tokens.clear();
        }
        if live.is_none_or(|exp| exp <= self.t) || self.tokens.is_empty() {
            return Ok(json(401, &fail("err_auth_token_expired", false)));
        }
        if self.draw(self.faults.mc_timeout) {
            self.fire("mc_timeout");
            self.elapsed += TIMEOUT;
            return Err(timeout());
        }
        if self.draw(self.faults.mc_drop) {
            self.fire("mc_drop");
            return Err(dropped());
        }
        if self.draw(self.faults.mc_429) {
            self.fire("mc_429");
            let reset_ms = (self.unix0 + self.t as i64 + 5) * 1000;
            let mut r = json(429, &json!({"detail": "Over throttling limit"}));
            r.headers.push(("X-RateLimit-Reset".into(), reset_ms.to_string()));
            return Ok(r);
        }
        if self.draw(self.faults.mc_5xx) {
            self.fire("mc_5xx");
            return Ok(json(503, &json!({"meta": {"status": 503}})));
        }
        if self.draw(self.faults.mc_fail_ok) {
            self.fire("mc_fail_ok");
            return Ok(json(200, &fail("err_service_unavailable", true)));
        }
        if self.faults.mc_forbid == Some(feed) && !self.quiet {
            self.fire("mc_forbidden");
            return Ok(json(403, &fail("err_forbidden", false)));
        }
        let body: Option<Value> = serde_json::from_slice(body).ok();
        let token = body.as_ref().and_then(|b| b.pointer("/meta/pagination/pageToken")).and_then(Value::as_str);
        let to = body.as_ref().and_then(|b| b.pointer("/data/0")).and_then(|f| f.get(feed.spec().to_field));
        if let Some(to) =
            to.and_then(Value::as_str).and_then(datetime::parse).filter(|_| token.is_none_or(str::is_empty))
        {
            let now = self.now;
            self.new_windows.entry(feed).or_default().push((now, to));
        }
        let mut answer_body = body.clone();
        // A server that ignores the page token it is given, for a while (up to half an hour), and makes up a new
        // one each time: following it never ends the window.
        if self.draw(self.faults.mc_new_token_loop) {
            let span = self.rng.as_mut().map_or(300, |r| r.u64(60..1800));
            self.looping.insert(feed, self.t + span);
        }
        let pagination_loop = self.looping.get(&feed).is_some_and(|&until| self.t < until && !self.quiet);
        // Requests per window (its filter): bounded however the server behaves.
        let filter = body.as_ref().and_then(|b| b.pointer("/data/0")).map(Value::to_string).unwrap_or_default();
        let n = self.per_window.entry((feed, filter)).or_insert(0);
        *n += 1;
        self.most_per_window = self.most_per_window.max(*n);
        if pagination_loop {
            // The window's first page again under a token never handed out before.
            self.fire("mc_pagination_loop");
            if let Some(p) =
                answer_body.as_mut().and_then(|b| b.pointer_mut("/meta/pagination")).and_then(Value::as_object_mut)
            {
                p.remove("pageToken");
            }
        }
        // A record is added when Mimecast first shows it, so every record held is visible.
        let visible = self.by_feed.get(&feed).map_or(&[][..], Vec::as_slice);
        match serve_page(visible, feed, answer_body.as_ref(), Quirks::default()) {
            Ok((mut v, _)) => {
                if pagination_loop {
                    self.made_up += 1;
                    v["meta"]["pagination"]["next"] = Value::String(format!("made-up-{}", self.made_up));
                }
                let more = v.pointer("/meta/pagination/next").and_then(Value::as_str).is_some_and(|n| !n.is_empty())
                    && v.pointer("/data/0").is_some();
                if more {
                    self.mid_window.insert(feed);
                } else {
                    self.mid_window.remove(&feed);
                }
                if self.draw(self.faults.mc_truncated) {
                    self.fire("mc_truncated");
                    let text = v.to_string();
                    let mut r = json(200, &Value::Null);
                    r.body = text.as_bytes()[..text.len() / 2].to_vec();
                    return Ok(r);
                }
                Ok(json(200, &v))
            }
            Err(m) => Ok(json(400, &fail(&m, false))),
        }
    }

    fn intake(&mut self, headers: &[(&str, &str)], body: &[u8]) -> Result<Response, HttpError> {
        self.last_accepted = None;
        let key = headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("DD-API-KEY")).map(|(_, v)| *v);
        if key != Some(API_KEY) {
            return Ok(json(403, &json!({"errors": ["Forbidden"]})));
        }
        if self.draw(self.faults.dd_timeout) {
            self.fire("dd_timeout");
            self.elapsed += TIMEOUT;
            return Err(timeout());
        }
        if self.draw(self.faults.dd_drop) {
            self.fire("dd_drop");
            return Err(dropped());
        }
        // A proxy's body limit is configuration, not a passing fault: it stays through the quiet phase.
        if let Some(max) = self.faults.dd_max_body.filter(|&m| body.len() > m) {
            self.fire("dd_413");
            self.saw_413 = true;
            return Ok(json(413, &json!({"errors": [format!("body over {max} bytes")]})));
        }
        if self.draw(self.faults.dd_5xx) {
            self.fire("dd_5xx");
            return Ok(json(503, &json!({"errors": ["unavailable"]})));
        }
        if self.draw(self.faults.dd_429) {
            self.fire("dd_429");
            let mut r = json(429, &json!({"errors": ["rate limited"]}));
            r.headers.push(("Retry-After".into(), "3".into()));
            return Ok(r);
        }
        if self.draw(self.faults.dd_not_datadog) {
            self.fire("dd_not_datadog");
            return Ok(Response {
                status: 200,
                headers: vec![("Content-Type".into(), "text/html".into())],
                body: b"<html>portal</html>".to_vec(),
            });
        }
        let mut text = Vec::new();
        if flate2::read::GzDecoder::new(body).read_to_end(&mut text).is_err() {
            return Ok(json(400, &json!({"errors": ["bad gzip"]})));
        }
        let Ok(Value::Array(logs)) = serde_json::from_slice::<Value>(&text) else {
            return Ok(json(400, &json!({"errors": ["not a JSON array"]})));
        };
        if logs.iter().any(|l| l.to_string().contains(POISON)) {
            self.fire("dd_400_poison");
            self.saw_400 = true;
            return Ok(json(400, &json!({"errors": ["invalid log"]})));
        }
        if self.saw_400 && logs.len() == 1 {
            self.single_log_after_400 = true;
        }
        let keys: Vec<String> = logs.iter().map(log_key).collect();
        for (log, key) in logs.iter().zip(&keys) {
            let sent = sent_record(log);
            if let Some(&i) = self.held_index.get(key)
                && sent.as_ref() != Some(&self.held[i].record)
            {
                self.altered.push(key.clone());
            }
        }
        self.accepted_after_413 |= self.saw_413;
        self.accepted.push(Accepted { keys, acknowledged: false, removal_failed: false });
        self.last_accepted = Some(self.accepted.len() - 1);
        if self.draw(self.faults.dd_accept_then_drop) {
            self.fire("dd_accepted_then_dropped");
            self.last_accepted = None;
            return Err(dropped());
        }
        Ok(json(202, &json!({})))
    }
}

/// A log's record key ("?" when the log holds no record the agent could have sent: the oracle reports it).
pub fn log_key(log: &Value) -> String {
    let feed = log.get("service").and_then(Value::as_str).and_then(Feed::from_name);
    match (feed, sent_record(log)) {
        (Some(feed), Some(record)) => format!("{}|{}", feed.name(), wire::record_key(feed, &record)),
        _ => format!("?{}", log.to_string().chars().take(200).collect::<String>()),
    }
}

/// The record a log carries, as Mimecast served it: a late record's time field, which the agent renames to
/// `original_<field>` when it restamps the log (`mimecast_late`), gets its name back.
fn sent_record(log: &Value) -> Option<Value> {
    let mut record = log.get("message").and_then(Value::as_str).and_then(|m| serde_json::from_str::<Value>(m).ok())?;
    let feed = log.get("service").and_then(Value::as_str).and_then(Feed::from_name);
    if let (Some(feed), Some(true), Value::Object(m)) =
        (feed, log.get("mimecast_late").and_then(Value::as_bool), &mut record)
    {
        let field = feed.spec().time_field;
        let renamed = format!("original_{field}");
        *m = std::mem::take(m)
            .into_iter()
            .map(|(k, v)| if k == renamed { (field.to_owned(), v) } else { (k, v) })
            .collect();
    }
    Some(record)
}

impl Transport for Net {
    fn exchange(&self, req: Exchange<'_>) -> Result<Response, HttpError> {
        let mut st = self.lock();
        st.requests += 1;
        let latency = st.latency();
        st.elapsed += latency;
        if let Some(path) = req.url.strip_prefix("http://mimecast.sim") {
            st.mimecast(path, req.headers, req.body)
        } else if req.url.starts_with("http://intake.sim") {
            st.intake(req.headers, req.body)
        } else {
            Err(HttpError::Connect(Cause::new(std::io::Error::other(format!("no simulated host for {}", req.url)))))
        }
    }
}
