//! A Datadog logs intake simulator: gzip/deflate/identity bodies, the documented limits enforced (1000 logs,
//! 5,000,000 bytes), 202/400/403/413/429/503 on demand, a proxy's smaller body limit in front of it, dropped and
//! stalled connections, hostile answers (any `Retry-After`, a captive portal's HTML 200, redirects), requests held
//! until the test releases them, and a record of every log it accepted.
//!
//! It also answers the API endpoints of the agent's own health, `POST /api/v2/series` (metrics) and
//! `POST /api/v1/check_run` (service checks): the key checked, the JSON checked for the fields Datadog requires,
//! and what they carried kept for tests. Their faults are their own ([`DatadogSim::set_health_down`],
//! [`DatadogSim::set_health_hold`]) and their requests are not counted in [`DatadogSim::requests`], so that the
//! health reports never disturb a test of the intake.

use std::collections::{HashMap, VecDeque};
use std::io::Read;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use flate2::read::{GzDecoder, ZlibDecoder};
use serde_json::{Value, json};

use super::http::{Gate, Reply, Request, Server};
use crate::datadog::batch::{MAX_LOGS, MAX_PAYLOAD_BYTES};
use crate::mimecast::{Feed, wire};

pub const API_KEY: &str = "sim-dd-api-key-0123456789abcdef";

/// A one-shot fault for the next intake request.
#[derive(Debug, Clone)]
pub enum Fault {
    Status(u16),
    /// 429 with `Retry-After: secs`.
    RetryAfter(u64),
    /// 429 with this `Retry-After` value, whatever it is (`18446744073709551615`, `1e300`, a date, garbage).
    RetryAfterRaw(String),
    /// 200 `text/html` from a captive portal; nothing is accepted.
    CaptivePortal,
    /// 302 to this `Location`; nothing is accepted.
    Redirect(String),
    Drop,
    Stall(Duration),
    /// Accept the batch, then drop the connection before answering (the one in-flight duplicate).
    AcceptThenDrop,
    /// Wait, then handle the request as usual (a slow intake).
    Delay(Duration),
    /// Wait until [`DatadogSim::release`], then handle the request as usual: a stalled intake whose stall ends
    /// when the test says so. [`DatadogSim::held`] counts the requests waiting.
    Hold,
}

#[derive(Default)]
struct State {
    api_key: String,
    accepted: Vec<Value>,
    batches: Vec<(usize, usize)>,
    /// For each accepted batch: whether its connection was then dropped ([`Fault::AcceptThenDrop`]).
    dropped: Vec<bool>,
    faults: VecDeque<Fault>,
    down: Option<u16>,
    /// A proxy's limit on the body as it arrives (compressed): see [`DatadogSim::set_max_body`].
    max_body: Option<usize>,
    /// Requests refused with 413 for `max_body`.
    too_large: usize,
    portal: bool,
    poison: Option<String>,
    requests: usize,
    /// Count accepted logs without keeping them (benchmarks, where memory is measured).
    count_only: bool,
    counted: usize,
    /// How long every intake request waits before it is handled: a distant intake (see
    /// [`DatadogSim::set_latency`]).
    latency: Duration,
    health: Health,
}

/// What the health endpoints received, and how they answer.
#[derive(Default)]
struct Health {
    /// Every series accepted, each one metric with its points and tags.
    series: Vec<Value>,
    /// Every service check accepted.
    checks: Vec<Value>,
    /// Requests that reached either endpoint, answered or not.
    requests: usize,
    down: Option<u16>,
    hold: bool,
}

/// The running simulator.
pub struct DatadogSim {
    server: Server,
    state: Arc<Mutex<State>>,
    gate: Arc<Gate>,
    /// Holds health requests while [`DatadogSim::set_health_hold`] is on; apart from the intake's gate.
    health_gate: Arc<Gate>,
}

impl DatadogSim {
    pub fn start() -> std::io::Result<DatadogSim> {
        let state = Arc::new(Mutex::new(State { api_key: API_KEY.into(), ..State::default() }));
        let (gate, health_gate) = (Arc::new(Gate::default()), Arc::new(Gate::default()));
        let (s, g, hg) = (state.clone(), gate.clone(), health_gate.clone());
        let server = Server::start(move |req| match req.path.as_str() {
            SERIES | CHECK_RUN => handle_health(&s, &hg, req),
            _ => handle(&s, &g, req),
        })?;
        Ok(DatadogSim { server, state, gate, health_gate })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// The value for `datadog.intake_url`.
    pub fn intake_url(&self) -> String {
        format!("{}/api/v2/logs", self.server.url())
    }

    /// Every log accepted so far, in arrival order.
    pub fn accepted(&self) -> Vec<Value> {
        self.lock().accepted.clone()
    }

    pub fn accepted_count(&self) -> usize {
        let st = self.lock();
        st.accepted.len() + st.counted
    }

    /// Keep only a count of accepted logs, not the logs.
    pub fn set_count_only(&self, on: bool) {
        self.lock().count_only = on;
    }

    /// Every intake request waits `latency` before it is handled (then any fault applies as usual): the round
    /// trip to a distant intake, for the benchmark. Requests wait side by side, each on its own connection's
    /// thread, so several in flight overlap their waits as they would over a real network. `ZERO` (the
    /// default) answers at once.
    pub fn set_latency(&self, latency: Duration) {
        self.lock().latency = latency;
    }

    /// Every accepted batch as (logs, uncompressed payload bytes).
    pub fn batches(&self) -> Vec<(usize, usize)> {
        self.lock().batches.clone()
    }

    /// For each accepted batch, in the order of [`DatadogSim::batches`]: whether the simulator dropped the
    /// connection instead of answering (the agent never learnt of the acceptance).
    pub fn dropped_after_accepting(&self) -> Vec<bool> {
        self.lock().dropped.clone()
    }

    pub fn requests(&self) -> usize {
        self.lock().requests
    }

    pub fn fault(&self, f: Fault) {
        self.lock().faults.push_back(f);
    }

    /// Answer every request with this status (an outage), or serve normally with `None`.
    pub fn set_down(&self, status: Option<u16>) {
        self.lock().down = status;
    }

    /// Refuse with 413 every intake request whose body, as it arrives (compressed), is larger than `bytes`, as a
    /// proxy in front of the intake does (nginx's `client_max_body_size`, 1m by default, counts the body as sent);
    /// `None` lifts the limit. Datadog's own limits still apply to what passes.
    pub fn set_max_body(&self, bytes: Option<usize>) {
        self.lock().max_body = bytes;
    }

    /// Requests refused with 413 by [`DatadogSim::set_max_body`] so far.
    pub fn too_large(&self) -> usize {
        self.lock().too_large
    }

    /// Answer every request as a captive portal does (200 `text/html`, nothing accepted), or serve normally.
    pub fn set_captive_portal(&self, on: bool) {
        self.lock().portal = on;
    }

    /// Close the port: connections are refused. In effect when this returns.
    pub fn refuse_connections(&self, on: bool) {
        self.server.refuse_connections(on);
    }

    /// Requests waiting in a [`Fault::Hold`] now.
    pub fn held(&self) -> usize {
        self.gate.held()
    }

    /// Lets every request held by [`Fault::Hold`] go on.
    pub fn release(&self) {
        self.gate.release();
    }

    /// Waits (at most `limit`) until every request that reached the intake has been answered, and says whether
    /// it got there: after a client was killed, what it had sent is then counted.
    pub fn settle(&self, limit: Duration) -> bool {
        self.server.settle(limit)
    }

    /// The API key the intake accepts; others get 403.
    pub fn set_api_key(&self, key: &str) {
        self.lock().api_key = key.into();
    }

    /// Refuse with 400 any batch holding a log whose `message` contains this text.
    pub fn set_poison(&self, text: Option<&str>) {
        self.lock().poison = text.map(str::to_owned);
    }

    /// The value for `telemetry.api_url` (the agent derives the same from `intake_url`).
    pub fn api_url(&self) -> String {
        self.server.url()
    }

    /// Every series the metrics endpoint accepted, in arrival order: `{"metric", "type", "points", "tags", …}`.
    pub fn series(&self) -> Vec<Value> {
        self.lock().health.series.clone()
    }

    /// Every service check the check_run endpoint accepted, in arrival order.
    pub fn checks(&self) -> Vec<Value> {
        self.lock().health.checks.clone()
    }

    /// Requests that reached the health endpoints, whatever their answer (a held one included).
    pub fn health_requests(&self) -> usize {
        self.lock().health.requests
    }

    /// Answer every health request with this status, or serve them normally with `None`. The intake is not affected.
    pub fn set_health_down(&self, status: Option<u16>) {
        self.lock().health.down = status;
    }

    /// Hold every health request until this is turned off again (a hung metrics API); the intake is not affected.
    pub fn set_health_hold(&self, on: bool) {
        self.lock().health.hold = on;
        if !on {
            self.health_gate.release();
        }
    }

    /// Health requests held now.
    pub fn health_held(&self) -> usize {
        self.health_gate.held()
    }
}

/// Each accepted log's record key (from its `service` and `message`) with how often it arrived: the way tests
/// and the demo count what was delivered, duplicated or lost.
pub fn record_keys(logs: &[Value]) -> HashMap<String, usize> {
    let mut keys = HashMap::new();
    for log in logs {
        let feed = log.get("service").and_then(Value::as_str).and_then(Feed::from_name);
        let record = log.get("message").and_then(Value::as_str).and_then(|m| serde_json::from_str::<Value>(m).ok());
        if let (Some(feed), Some(record)) = (feed, record) {
            *keys.entry(wire::record_key(feed, &record)).or_insert(0) += 1;
        }
    }
    keys
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

fn error(status: u16, message: &str) -> Reply {
    Reply::json(status, &json!({"errors": [{"status": status.to_string(), "title": message}]}))
}

fn portal() -> Reply {
    Reply::html(200, "<html><head><title>Guest Wi-Fi</title></head><body>Please accept the terms of use.</body></html>")
}

impl Drop for DatadogSim {
    fn drop(&mut self) {
        // A test that ends (or fails) with a request held must not leave its thread waiting.
        self.gate.release();
        self.health_gate.release();
    }
}

fn handle(state: &Mutex<State>, gate: &Gate, req: &Request) -> Reply {
    let mut st = lock(state);
    if req.method == "GET" && req.path == "/api/v1/validate" {
        return if req.header("DD-API-KEY") == Some(st.api_key.as_str()) {
            Reply::json(200, &json!({"valid": true}))
        } else {
            error(403, "Forbidden")
        };
    }
    if req.method != "POST" || req.path != "/api/v2/logs" {
        return error(404, "Not found");
    }
    if !st.latency.is_zero() {
        let latency = st.latency;
        drop(st);
        std::thread::sleep(latency);
        st = lock(state);
    }
    st.requests += 1;
    let fault = st.faults.pop_front();
    match fault {
        Some(Fault::Status(s)) => return error(s, "injected"),
        Some(Fault::RetryAfter(secs)) => {
            return error(429, "Too many requests").with_header("Retry-After", &secs.to_string());
        }
        Some(Fault::RetryAfterRaw(v)) => return error(429, "Too many requests").with_header("Retry-After", &v),
        Some(Fault::CaptivePortal) => return portal(),
        Some(Fault::Redirect(location)) => return Reply::redirect(302, &location),
        Some(Fault::Drop) => return Reply::Drop,
        Some(Fault::Stall(d)) => {
            drop(st);
            std::thread::sleep(d);
            return Reply::Drop;
        }
        Some(Fault::Delay(d)) => {
            drop(st);
            std::thread::sleep(d);
            st = lock(state);
        }
        Some(Fault::Hold) => {
            drop(st);
            gate.hold();
            st = lock(state);
        }
        Some(Fault::AcceptThenDrop) | None => {}
    }
    if st.portal {
        return portal();
    }
    if let Some(s) = st.down {
        return error(s, "Service Unavailable");
    }
    if st.max_body.is_some_and(|max| req.body.len() > max) {
        st.too_large += 1;
        return Reply::html(413, "<html><head><title>413 Request Entity Too Large</title></head></html>");
    }
    if req.header("DD-API-KEY") != Some(st.api_key.as_str()) {
        return error(403, "Forbidden");
    }
    let body = match decode(req) {
        Ok(b) => b,
        Err(m) => return error(400, &m),
    };
    if body.len() > MAX_PAYLOAD_BYTES {
        return error(413, "Payload too large");
    }
    let logs = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Array(a)) => a,
        Ok(_) => return error(400, "payload must be a JSON array"),
        Err(e) => return error(400, &format!("malformed JSON: {e}")),
    };
    if logs.len() > MAX_LOGS {
        return error(413, "too many logs in one request");
    }
    if let Some(p) = &st.poison
        && logs.iter().any(|l| l.get("message").and_then(Value::as_str).is_some_and(|m| m.contains(p.as_str())))
    {
        return error(400, "bad log");
    }
    st.batches.push((logs.len(), body.len()));
    st.dropped.push(matches!(fault, Some(Fault::AcceptThenDrop)));
    if st.count_only {
        st.counted += logs.len();
    } else {
        st.accepted.extend(logs);
    }
    if matches!(fault, Some(Fault::AcceptThenDrop)) {
        return Reply::Drop;
    }
    Reply::json(202, &json!({}))
}

const SERIES: &str = "/api/v2/series";
const CHECK_RUN: &str = "/api/v1/check_run";

/// The metrics and service-check endpoints: the key, the JSON and its required fields checked as Datadog does,
/// and what was accepted kept. Datadog's answers: 202 `{"errors":[]}` and 202 `{"status":"ok"}`.
fn handle_health(state: &Mutex<State>, gate: &Gate, req: &Request) -> Reply {
    let mut st = lock(state);
    st.health.requests += 1;
    if st.health.hold {
        drop(st);
        gate.hold();
        st = lock(state);
    }
    if let Some(s) = st.health.down {
        return error(s, "injected");
    }
    if req.method != "POST" {
        return error(405, "Method not allowed");
    }
    if req.header("DD-API-KEY") != Some(st.api_key.as_str()) {
        return error(403, "Forbidden");
    }
    let body = match decode(req).and_then(|b| serde_json::from_slice::<Value>(&b).map_err(|e| e.to_string())) {
        Ok(b) => b,
        Err(m) => return error(400, &format!("malformed JSON: {m}")),
    };
    if req.path == SERIES {
        match body.get("series").and_then(Value::as_array) {
            Some(series) if series.iter().all(valid_series) => {
                st.health.series.extend(series.iter().cloned());
                Reply::json(202, &json!({"errors": []}))
            }
            _ => {
                error(400, "expected {\"series\": [{\"metric\", \"type\", \"points\": [{\"timestamp\", \"value\"}]}]}")
            }
        }
    } else {
        match body.as_array() {
            Some(checks) if checks.iter().all(valid_check) => {
                st.health.checks.extend(checks.iter().cloned());
                Reply::json(202, &json!({"status": "ok"}))
            }
            _ => error(400, "expected [{\"check\", \"host_name\", \"status\": 0..3, \"timestamp\"}]"),
        }
    }
}

/// A series as `POST /api/v2/series` requires it: a metric name, a type from 0 to 3, and points of a whole
/// timestamp and a number; tags, if any, strings.
fn valid_series(s: &Value) -> bool {
    let point = |p: &Value| p["timestamp"].is_i64() && p["value"].is_number();
    s["metric"].as_str().is_some_and(|m| !m.is_empty())
        && s["type"].as_u64().is_some_and(|t| t <= 3)
        && s["points"].as_array().is_some_and(|p| !p.is_empty() && p.iter().all(point))
        && s.get("tags").is_none_or(|t| t.as_array().is_some_and(|t| t.iter().all(Value::is_string)))
}

/// A service check as `POST /api/v1/check_run` requires it: a name, a host, a status from 0 to 3.
fn valid_check(c: &Value) -> bool {
    c["check"].as_str().is_some_and(|n| !n.is_empty())
        && c["host_name"].is_string()
        && c["status"].as_u64().is_some_and(|s| s <= 3)
        && c.get("timestamp").is_none_or(Value::is_i64)
        && c.get("tags").is_none_or(|t| t.as_array().is_some_and(|t| t.iter().all(Value::is_string)))
}

fn decode(req: &Request) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let limited = |r: &mut dyn Read, out: &mut Vec<u8>| {
        // Read one byte past the limit so an oversized body is seen as such, without inflating a zip bomb.
        r.take(MAX_PAYLOAD_BYTES as u64 + 1).read_to_end(out).map(|_| ()).map_err(|e| format!("bad body encoding: {e}"))
    };
    match req.header("Content-Encoding").unwrap_or("identity") {
        "gzip" => limited(&mut GzDecoder::new(&req.body[..]), &mut out)?,
        "deflate" => limited(&mut ZlibDecoder::new(&req.body[..]), &mut out)?,
        "identity" => out = req.body.clone(),
        other => return Err(format!("unsupported Content-Encoding {other}")),
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    #[test]
    fn latency_delays_every_intake_request_and_then_serves_it() {
        let sim = DatadogSim::start().unwrap();
        sim.set_latency(Duration::from_millis(120));
        for _ in 0..2 {
            let start = Instant::now();
            let answer = ureq::post(&sim.intake_url()).header("DD-API-KEY", API_KEY).send("[{\"message\":\"m\"}]");
            assert_eq!(answer.unwrap().status(), 202);
            assert!(start.elapsed() >= Duration::from_millis(120), "{:?}", start.elapsed());
        }
        assert_eq!((sim.requests(), sim.accepted_count()), (2, 2));
    }

    #[test]
    fn health_endpoints_check_the_key_and_the_json_and_keep_what_they_accepted() {
        let sim = DatadogSim::start().unwrap();
        let post = |path: &str, key: &str, body: &str| {
            let answer = ureq::post(&format!("{}{path}", sim.api_url()))
                .config()
                .http_status_as_error(false)
                .build()
                .header("DD-API-KEY", key)
                .send(body)
                .unwrap();
            answer.status().as_u16()
        };
        let series = r#"{"series":[{"metric":"m","type":3,"points":[{"timestamp":1,"value":2.5}],"tags":["a:b"]}]}"#;
        let checks = r#"[{"check":"c","host_name":"h","status":2,"timestamp":1,"message":"m","tags":[]}]"#;
        assert_eq!(post(SERIES, API_KEY, series), 202);
        assert_eq!(post(CHECK_RUN, API_KEY, checks), 202);
        assert_eq!(post(SERIES, "wrong-key", series), 403);
        assert_eq!(post(SERIES, API_KEY, r#"{"series":[{"metric":"m","type":7,"points":[]}]}"#), 400);
        assert_eq!(post(CHECK_RUN, API_KEY, r#"[{"check":"c","host_name":"h","status":4}]"#), 400);
        assert_eq!(post(CHECK_RUN, API_KEY, "not json"), 400);
        sim.set_health_down(Some(500));
        assert_eq!(post(SERIES, API_KEY, series), 500);
        assert_eq!((sim.series().len(), sim.checks().len(), sim.health_requests()), (1, 1, 7));
        assert_eq!(sim.series()[0]["tags"][0], "a:b");
        assert_eq!(sim.checks()[0]["status"], 2);
        assert_eq!(sim.requests(), 0, "the intake's count is its own");
    }
}
