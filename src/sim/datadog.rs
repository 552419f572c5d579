//! A Datadog logs intake simulator: gzip/deflate/identity bodies, the documented limits enforced (1000 logs,
//! 5,000,000 bytes), 202/400/403/413/429/503 on demand, dropped and stalled connections, hostile answers (any
//! `Retry-After`, a captive portal's HTML 200, redirects), requests held until the test releases them, and a
//! record of every log it accepted.

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
    portal: bool,
    poison: Option<String>,
    requests: usize,
    /// Count accepted logs without keeping them (benchmarks, where memory is measured).
    count_only: bool,
    counted: usize,
    /// How long every intake request waits before it is handled: a distant intake (see
    /// [`DatadogSim::set_latency`]).
    latency: Duration,
}

/// The running simulator.
pub struct DatadogSim {
    server: Server,
    state: Arc<Mutex<State>>,
    gate: Arc<Gate>,
}

impl DatadogSim {
    pub fn start() -> std::io::Result<DatadogSim> {
        let state = Arc::new(Mutex::new(State { api_key: API_KEY.into(), ..State::default() }));
        let gate = Arc::new(Gate::default());
        let (s, g) = (state.clone(), gate.clone());
        let server = Server::start(move |req| handle(&s, &g, req))?;
        Ok(DatadogSim { server, state, gate })
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
}
