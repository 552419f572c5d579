//! A Mimecast API 2.0 simulator: OAuth tokens that expire, the six feeds with time-window filtering, opaque page
//! tokens bound to their filter, both orderings, and on-demand faults (429 with `X-RateLimit-Reset`, `fail[]`
//! with HTTP 200, 5xx, dropped connections, stalls, expired tokens, 403 per feed), one-shot or persistent, and
//! hostile answers (pages without `meta`, records that are not objects, redirects, any rate-limit header value in
//! either spelling, slow pages, absurd token lifetimes, page tokens that cycle, the same page again under new
//! tokens). Every request is logged with the fault it took, and a held page waits until the test releases it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::http::{Gate, Reply, Request, Server};
use crate::datetime;
use crate::mimecast::Feed;

pub const CLIENT_ID: &str = "sim-client-id";
pub const CLIENT_SECRET: &str = "sim-client-secret";

/// A one-shot fault for a request of a feed (or of any feed).
#[derive(Debug, Clone)]
pub enum Fault {
    /// 429 with this `X-RateLimit-Reset` header value.
    RateLimit(String),
    /// HTTP 200 with a non-empty `fail[]`.
    FailOk {
        retryable: bool,
    },
    Status(u16),
    Drop,
    Stall(Duration),
    /// Every issued token expires just before this request is checked.
    ExpireTokens,
    /// HTTP 200 whose JSON body is cut in half (a proxy or a link that gave up).
    Truncated,
    /// A page whose `next` is the page token of the request itself.
    RepeatToken,
    /// The window's first page whatever the page token asked for, with a `next` never handed out before: a
    /// server that ignores the token it is given and makes up a new one, so that following it never ends.
    SameRecordsNewToken,
    /// HTTP 200 page without its `meta` object.
    MissingMeta,
    /// HTTP 200 page whose records are replaced by `[1,"two",null]` (in the feed's own shape).
    NonObjects,
    /// 302 to this `Location`, as a login page or proxy in front of the API would answer.
    Redirect(String),
    /// 429 with this reset value under the `X-Rate-Limit-*` spelling (instead of `X-RateLimit-*`).
    AltRateHeaders(String),
    /// Wait, then answer as usual (a slow page).
    Delay(Duration),
    /// 400 `err_invalid_page_token` if the request carries a page token; a first page is served as usual.
    RefusePageToken,
    /// Wait until [`MimecastSim::release`], then answer as usual: a stalled API whose stall ends when the test
    /// says so. [`MimecastSim::held`] counts the requests waiting.
    Hold,
}

/// One request the simulator served, for assertions.
#[derive(Debug, Clone)]
pub struct Logged {
    pub feed: Option<Feed>,
    pub at: Instant,
    pub filter: Option<Value>,
    pub page_token: Option<String>,
    pub status: u16,
    pub records: usize,
    /// The fault this request took, if any: how a test knows a fault was applied.
    pub fault: Option<Fault>,
    /// The API application whose token the request carried, if it carried a live one.
    pub client: Option<String>,
}

struct Pending {
    feed: Option<Feed>,
    skip: usize,
    fault: Fault,
}

struct State {
    records: HashMap<Feed, Vec<(i64, Value)>>,
    /// Live tokens: when each expires and the application it was issued to.
    tokens: HashMap<String, (Instant, String)>,
    /// API applications besides the default one: client id and secret.
    apps: HashMap<String, String>,
    token_lifetime: Duration,
    issued: u64,
    faults: Vec<Pending>,
    forbidden: Vec<Feed>,
    rejection_flat: bool,
    /// A fault every request of a feed (any feed if `None`) gets, after the one-shot faults.
    always: Option<(Option<Feed>, Fault)>,
    /// The token answer's `expires_in`, as raw JSON text, instead of the real lifetime.
    expires_in_raw: Option<String>,
    token_redirect: Option<String>,
    token_cycle: bool,
    /// Page tokens made up by [`Fault::SameRecordsNewToken`] so far.
    made_up: u64,
    /// Token requests wait until [`MimecastSim::release`] (a slow or hanging token endpoint).
    hold_tokens: bool,
    log: Vec<Logged>,
    secret: String,
    /// How long every page request waits before it is answered (see [`MimecastSim::set_latency`]).
    latency: Duration,
}

/// The running simulator.
pub struct MimecastSim {
    server: Server,
    state: Arc<Mutex<State>>,
    gate: Arc<Gate>,
}

impl MimecastSim {
    pub fn start() -> std::io::Result<MimecastSim> {
        let state = Arc::new(Mutex::new(State {
            records: HashMap::new(),
            tokens: HashMap::new(),
            apps: HashMap::new(),
            token_lifetime: Duration::from_secs(1799),
            issued: 0,
            faults: Vec::new(),
            forbidden: Vec::new(),
            rejection_flat: false,
            always: None,
            expires_in_raw: None,
            token_redirect: None,
            token_cycle: false,
            made_up: 0,
            hold_tokens: false,
            log: Vec::new(),
            secret: CLIENT_SECRET.into(),
            latency: Duration::ZERO,
        }));
        let gate = Arc::new(Gate::default());
        let (s, g) = (state.clone(), gate.clone());
        let server = Server::start(move |req| handle(&s, &g, req))?;
        Ok(MimecastSim { server, state, gate })
    }

    pub fn url(&self) -> String {
        self.server.url()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Makes records visible in the API (their time is their own time field). Adding records later, with times
    /// in the past, is how a test indexes them late.
    pub fn add(&self, feed: Feed, records: impl IntoIterator<Item = Value>) {
        let timed = records.into_iter().map(|r| {
            let t = r.get(feed.spec().time_field).and_then(Value::as_str).and_then(datetime::parse).unwrap_or(0);
            (t, r)
        });
        self.add_at(feed, timed);
    }

    /// Makes records visible in the API at the given Unix times, which the window filters match, whatever their
    /// own time field says: Mimecast filtering on another time than the record's (its time-zone-lag bug, where a
    /// US tenant's local time labelled `+0000` reads hours old).
    pub fn add_at(&self, feed: Feed, records: impl IntoIterator<Item = (i64, Value)>) {
        let mut st = self.lock();
        let list = st.records.entry(feed).or_default();
        list.extend(records);
        // Kept in time order, records of equal time in insertion order (a stable sort), so that a page is a
        // binary search and a slice rather than a sort of every record per request.
        list.sort_by_key(|(t, _)| *t);
    }

    /// The next request of `feed` (any feed if `None`) after `skip` others gets `fault`.
    pub fn fault_after(&self, feed: Option<Feed>, skip: usize, fault: Fault) {
        self.lock().faults.push(Pending { feed, skip, fault });
    }

    pub fn fault(&self, feed: Option<Feed>, fault: Fault) {
        self.fault_after(feed, 0, fault);
    }

    /// Every request of every feed gets `fault` (after any one-shot fault), until `set_always(None)`. For example
    /// `set_always(Some(Fault::RefusePageToken))` refuses the page token of every page from the second on.
    pub fn set_always(&self, fault: Option<Fault>) {
        self.set_always_for(None, fault);
    }

    /// [`MimecastSim::set_always`] for one feed only (`None`: every feed).
    pub fn set_always_for(&self, feed: Option<Feed>, fault: Option<Fault>) {
        self.lock().always = fault.map(|f| (feed, f));
    }

    /// Token answers carry this raw JSON as `expires_in` (e.g. `18446744073709551615`, `-5`, `"soon"`); the
    /// token itself still lives as long as [`MimecastSim::set_token_lifetime`] says. `None`: the real lifetime.
    pub fn set_token_expires_in_raw(&self, raw: Option<&str>) {
        self.lock().expires_in_raw = raw.map(str::to_owned);
    }

    /// The token endpoint answers 302 to this `Location` (a login page in front of the API), or works again.
    pub fn set_token_redirect(&self, location: Option<&str>) {
        self.lock().token_redirect = location.map(str::to_owned);
    }

    /// Page tokens cycle A → B → A: the page after page 2 returns page 1's `next` again, so a window never ends
    /// (it needs more than two pages of records). A `next` equal to the request's own token is `RepeatToken`.
    pub fn set_token_cycle(&self, on: bool) {
        self.lock().token_cycle = on;
    }

    /// Token requests wait until [`MimecastSim::release`] while on; [`MimecastSim::held`] counts them too.
    pub fn set_hold_tokens(&self, on: bool) {
        self.lock().hold_tokens = on;
    }

    /// Answers 403 for this feed, as when the API application lacks its permission.
    pub fn forbid(&self, feed: Feed, on: bool) {
        let mut st = self.lock();
        st.forbidden.retain(|f| *f != feed);
        if on {
            st.forbidden.push(feed);
        }
    }

    pub fn set_token_lifetime(&self, d: Duration) {
        self.lock().token_lifetime = d;
    }

    pub fn set_client_secret(&self, s: &str) {
        self.lock().secret = s.into();
    }

    /// Another API application of the same account (large tenants give busy feeds their own, for its quota).
    pub fn add_app(&self, client_id: &str, secret: &str) {
        self.lock().apps.insert(client_id.into(), secret.into());
    }

    /// Serves rejections as a flat `data[]` instead of `data[0].rejections[]`.
    pub fn set_rejection_flat(&self, on: bool) {
        self.lock().rejection_flat = on;
    }

    /// Every page request of every feed waits `latency` before it is answered, on top of any fault (a
    /// [`Fault::Delay`] adds to it); token requests do not wait. The time a distant or busy API takes per page,
    /// for the benchmark. Requests wait side by side, each on its own connection's thread, so pages of several
    /// feeds in flight overlap their waits. `ZERO` (the default) answers at once.
    pub fn set_latency(&self, latency: Duration) {
        self.lock().latency = latency;
    }

    pub fn requests(&self) -> Vec<Logged> {
        self.lock().log.clone()
    }

    pub fn tokens_issued(&self) -> u64 {
        self.lock().issued
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
}

impl Drop for MimecastSim {
    fn drop(&mut self) {
        // A test that ends (or fails) with a request held must not leave its thread waiting.
        self.gate.release();
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

fn fail(code: &str, message: &str, retryable: bool) -> Value {
    json!({"meta": {"status": 200}, "data": [], "fail": [{"key": {}, "errors": [{"code": code, "message": message, "retryable": retryable}]}]})
}

fn handle(state: &Mutex<State>, gate: &Gate, req: &Request) -> Reply {
    if req.path == "/oauth/token" {
        if lock(state).hold_tokens {
            gate.hold();
        }
        return token(state, req);
    }
    let Some(feed) = Feed::ALL.into_iter().find(|f| f.spec().path == req.path) else {
        return Reply::json(
            404,
            &json!({"fail": [{"errors": [{"code": "err_not_found", "message": "no such path"}]}]}),
        );
    };
    let mut st = lock(state);
    if !st.latency.is_zero() {
        let latency = st.latency;
        drop(st);
        std::thread::sleep(latency);
        st = lock(state);
    }
    let body: Option<Value> = serde_json::from_slice(&req.body).ok();
    let filter = body.as_ref().and_then(|b| b.get("data")).and_then(|d| d.get(0)).cloned();
    let page_token =
        body.as_ref().and_then(|b| b.pointer("/meta/pagination/pageToken")).and_then(Value::as_str).map(str::to_owned);
    let mut fault = take_fault(&mut st, feed);
    let taken = fault.clone();
    if let Some(Fault::Delay(_) | Fault::Hold) = fault {
        drop(st);
        match fault {
            Some(Fault::Delay(d)) => std::thread::sleep(d),
            _ => gate.hold(),
        }
        st = lock(state);
        fault = None;
    }
    if matches!(fault, Some(Fault::ExpireTokens)) {
        st.tokens.clear();
    }
    let client = client(&st, req);
    let (reply, records) = answer(&mut st, feed, req, body.as_ref(), fault);
    let status = match &reply {
        Reply::Respond { status, .. } => *status,
        _ => 0,
    };
    st.log.push(Logged {
        feed: Some(feed),
        at: Instant::now(),
        filter,
        page_token,
        status,
        records,
        fault: taken,
        client,
    });
    drop(st);
    if let Reply::Stall(d) = reply {
        std::thread::sleep(d);
        return Reply::Drop;
    }
    reply
}

fn take_fault(st: &mut State, feed: Feed) -> Option<Fault> {
    let always = st.always.as_ref().filter(|(f, _)| f.is_none_or(|f| f == feed)).map(|(_, fault)| fault.clone());
    let Some(i) = st.faults.iter().position(|p| p.feed.is_none_or(|f| f == feed)) else {
        return always;
    };
    if st.faults[i].skip > 0 {
        st.faults[i].skip -= 1;
        return always;
    }
    Some(st.faults.remove(i).fault)
}

fn token(state: &Mutex<State>, req: &Request) -> Reply {
    let form = String::from_utf8_lossy(&req.body).into_owned();
    let field =
        |name: &str| form.split('&').find_map(|kv| kv.strip_prefix(&format!("{name}="))).map(|v| v.replace('+', " "));
    let mut st = lock(state);
    if let Some(location) = &st.token_redirect {
        return Reply::redirect(302, location);
    }
    let client = field("client_id").unwrap_or_default();
    let secret = if client == CLIENT_ID { Some(&st.secret) } else { st.apps.get(&client) };
    let ok = field("grant_type").as_deref() == Some("client_credentials")
        && secret.is_some_and(|s| field("client_secret").as_deref() == Some(s.as_str()));
    if !ok {
        return Reply::json(401, &json!({"error": "invalid_client", "error_description": "bad client credentials"}));
    }
    st.issued += 1;
    let token = format!("sim-token-{}", st.issued);
    let lifetime = st.token_lifetime;
    st.tokens.insert(token.clone(), (Instant::now() + lifetime, client));
    let expires_in = st.expires_in_raw.clone().unwrap_or_else(|| lifetime.as_secs().to_string());
    // Written by hand so that any JSON number text (beyond u64, exponents) reaches the client as sent.
    let body =
        format!(r#"{{"access_token":{},"token_type":"Bearer","expires_in":{expires_in},"scope":""}}"#, json!(token));
    Reply::Respond {
        status: 200,
        headers: vec![("Content-Type".into(), "application/json".into())],
        body: body.into_bytes(),
    }
}

/// The application whose live token `req` carries.
fn client(st: &State, req: &Request) -> Option<String> {
    let token = req.header("Authorization").and_then(|h| h.strip_prefix("Bearer "))?;
    st.tokens.get(token).filter(|(exp, _)| *exp > Instant::now()).map(|(_, client)| client.clone())
}

fn answer(st: &mut State, feed: Feed, req: &Request, body: Option<&Value>, fault: Option<Fault>) -> (Reply, usize) {
    if client(st, req).is_none() {
        return (Reply::json(401, &fail("err_auth_token_expired", "token missing or expired", false)), 0);
    }
    match fault {
        Some(Fault::RateLimit(reset)) => {
            let reply = Reply::json(429, &json!({"detail": "Over throttling limit"}))
                .with_header("X-RateLimit-Limit", "100")
                .with_header("X-RateLimit-Remaining", "0")
                .with_header("X-RateLimit-Reset", &reset);
            return (reply, 0);
        }
        Some(Fault::FailOk { retryable }) => {
            return (Reply::json(200, &fail("err_service_unavailable", "temporarily unavailable", retryable)), 0);
        }
        Some(Fault::Status(s)) => return (Reply::json(s, &json!({"meta": {"status": s}})), 0),
        Some(Fault::Drop) => return (Reply::Drop, 0),
        Some(Fault::Stall(d)) => return (Reply::Stall(d), 0),
        Some(Fault::Redirect(location)) => return (Reply::redirect(302, &location), 0),
        Some(Fault::AltRateHeaders(reset)) => {
            let reply = Reply::json(429, &json!({"detail": "Over throttling limit"}))
                .with_header("X-Rate-Limit-Limit", "100")
                .with_header("X-Rate-Limit-Remaining", "0")
                .with_header("X-Rate-Limit-Reset", &reset);
            return (reply, 0);
        }
        Some(Fault::RefusePageToken) if body.and_then(|b| b.pointer("/meta/pagination/pageToken")).is_some() => {
            let refusal = fail("err_invalid_page_token", "the page token is invalid or expired", false);
            return (Reply::json(400, &refusal), 0);
        }
        Some(
            Fault::ExpireTokens
            | Fault::Truncated
            | Fault::RepeatToken
            | Fault::SameRecordsNewToken
            | Fault::MissingMeta
            | Fault::NonObjects
            | Fault::Delay(_)
            | Fault::Hold
            | Fault::RefusePageToken,
        )
        | None => {}
    }
    if st.forbidden.contains(&feed) {
        return (Reply::json(403, &fail("err_forbidden", "the application lacks this permission", false)), 0);
    }
    if let Some(Fault::SameRecordsNewToken) = fault {
        // Page 1 of the filter, as though no token had come, and a token that has never been seen.
        let mut first = body.cloned();
        if let Some(p) = first.as_mut().and_then(|b| b.pointer_mut("/meta/pagination")).and_then(Value::as_object_mut) {
            p.remove("pageToken");
        }
        return match page(st, feed, first.as_ref()) {
            Ok((mut v, n)) => {
                st.made_up += 1;
                v["meta"]["pagination"]["next"] = Value::String(format!("made-up-{}", st.made_up));
                (Reply::json(200, &v), n)
            }
            Err(message) => (Reply::json(400, &fail("err_validation", &message, false)), 0),
        };
    }
    match page(st, feed, body) {
        Ok((v, _)) if matches!(fault, Some(Fault::Truncated)) => {
            let text = v.to_string();
            let half = text.as_bytes()[..text.len() / 2].to_vec();
            (
                Reply::Respond {
                    status: 200,
                    headers: vec![("Content-Type".into(), "application/json".into())],
                    body: half,
                },
                0,
            )
        }
        Ok((mut v, n)) if matches!(fault, Some(Fault::RepeatToken)) => {
            if let Some(t) = body.and_then(|b| b.pointer("/meta/pagination/pageToken")) {
                v["meta"]["pagination"]["next"] = t.clone();
            }
            (Reply::json(200, &v), n)
        }
        Ok((mut v, n)) if matches!(fault, Some(Fault::MissingMeta)) => {
            if let Some(o) = v.as_object_mut() {
                o.remove("meta");
            }
            (Reply::json(200, &v), n)
        }
        Ok((mut v, _)) if matches!(fault, Some(Fault::NonObjects)) => {
            let junk = json!([1, "two", null]);
            match feed.spec().records_key {
                Some(key) if v["data"].get(0).is_some_and(|d| d.get(key).is_some()) => v["data"][0][key] = junk,
                _ => v["data"] = junk,
            }
            (Reply::json(200, &v), 0)
        }
        Ok((v, n)) => (Reply::json(200, &v), n),
        Err(message) => (Reply::json(400, &fail("err_validation", &message, false)), 0),
    }
}

fn page(st: &State, feed: Feed, body: Option<&Value>) -> Result<(Value, usize), String> {
    let list = st.records.get(&feed).map_or(&[][..], Vec::as_slice);
    serve_page(list, feed, body, Quirks { token_cycle: st.token_cycle, rejection_flat: st.rejection_flat })
}

/// Optional misbehaviour of [`serve_page`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Quirks {
    /// Page 3 and later point back at page 2.
    pub token_cycle: bool,
    /// Rejection records in a flat `data[]`.
    pub rejection_flat: bool,
}

/// The page a request body asks for, from `list` (records sorted by the time Mimecast filters on): the filter's
/// window, opaque page tokens bound to the filter, both orderings, and `next` on a full last page and on the empty
/// page after it, as the real API does. The answer's body and its record count; `Err` is a validation message.
/// Pure, so that the deterministic simulator serves pages exactly as this loopback one does.
pub fn serve_page(
    list: &[(i64, Value)],
    feed: Feed,
    body: Option<&Value>,
    quirks: Quirks,
) -> Result<(Value, usize), String> {
    let spec = feed.spec();
    let body = body.ok_or("body is not JSON")?;
    let data = body.get("data").and_then(Value::as_array).ok_or("data must be an array")?;
    if data.len() != 1 {
        return Err("data must hold exactly one filter".into());
    }
    let filter = &data[0];
    let time = |k: &str| filter.get(k).and_then(Value::as_str).and_then(datetime::parse);
    let (from, to) = time(spec.from_field)
        .zip(time(spec.to_field))
        .ok_or_else(|| format!("{} and {} are required datetimes", spec.from_field, spec.to_field))?;
    for (k, _) in spec.extra {
        if filter.get(*k).is_none() {
            return Err(format!("missing filter {k}"));
        }
    }
    let page_size =
        body.pointer("/meta/pagination/pageSize").and_then(Value::as_u64).unwrap_or(100).clamp(1, 1000) as usize;
    let fingerprint = {
        let d = Sha256::digest(filter.to_string().as_bytes());
        d[..6].iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    let offset = match body.pointer("/meta/pagination/pageToken").and_then(Value::as_str) {
        None => 0,
        Some(t) => t
            .strip_prefix(&format!("{fingerprint}."))
            .and_then(|o| o.parse::<usize>().ok())
            .ok_or("err_invalid_page_token: the page token does not belong to this filter")?,
    };
    let oldest_first = filter.get("oldestFirst").and_then(Value::as_bool).unwrap_or(false);
    let (lo, hi) = (list.partition_point(|(t, _)| *t < from), list.partition_point(|(t, _)| *t <= to));
    let matching = list.get(lo..hi).unwrap_or_default();
    let total = matching.len();
    // Either way, records of equal time keep insertion order, which makes pages deterministic.
    let slice: Vec<Value> = if oldest_first {
        matching.iter().skip(offset).take(page_size).map(|(_, v)| v.clone()).collect()
    } else {
        matching
            .chunk_by(|a, b| a.0 == b.0)
            .rev()
            .flatten()
            .skip(offset)
            .take(page_size)
            .map(|(_, v)| v.clone())
            .collect()
    };
    let n = slice.len();
    // Quirk of the real API: `next` also comes on a full last page and on the empty page after it.
    let mut next = (offset + n < total || n == page_size || n == 0).then(|| format!("{fingerprint}.{}", offset + n));
    if quirks.token_cycle && offset >= 2 * page_size && next.is_some() {
        // Page 3 (and any later one) points back at page 2: A → B → A → …
        next = Some(format!("{fingerprint}.{page_size}"));
    }
    let data = match spec.records_key {
        None => Value::Array(slice),
        Some(_) if feed == Feed::Rejection && quirks.rejection_flat => Value::Array(slice),
        Some(key) if feed == Feed::TtpImpersonation => json!([{ key: slice, "resultCount": n }]),
        Some(key) => json!([{ key: slice }]),
    };
    let mut pagination = json!({"pageSize": page_size, "totalCount": total});
    if let Some(next) = next {
        pagination["next"] = Value::String(next);
    }
    Ok((json!({"meta": {"status": 200, "pagination": pagination}, "data": data, "fail": []}), n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_delays_page_requests_only() {
        let sim = MimecastSim::start().unwrap();
        sim.set_latency(Duration::from_millis(120));
        let form = format!("grant_type=client_credentials&client_id={CLIENT_ID}&client_secret={CLIENT_SECRET}");
        let token = ureq::post(&format!("{}/oauth/token", sim.url()))
            .header("Content-Type", "application/x-www-form-urlencoded")
            .send(form.as_str());
        assert_eq!(token.unwrap().status(), 200);
        let start = Instant::now();
        // A page request without a token: answered 401, after the latency.
        let page = ureq::post(&format!("{}{}", sim.url(), Feed::Audit.spec().path))
            .config()
            .http_status_as_error(false)
            .build()
            .send("{}");
        assert_eq!(page.unwrap().status(), 401);
        assert!(start.elapsed() >= Duration::from_millis(120), "{:?}", start.elapsed());
        assert_eq!(sim.requests().len(), 1, "one page request logged");
    }
}
