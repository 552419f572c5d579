//! Every value a server sends is hostile until checked. Generated input drives the pure parsers (pages, waits,
//! tokens, intake answers) and asserts: never a panic, never a record invented or dropped, never a wait past its
//! cap, never a batch deleted on an answer that is not Datadog's. A few real-HTTP checks then drive the
//! simulators' hostile answers through the client and the sink.

use std::time::{Duration, Instant};

use mimecast_forwarder::config::{HttpConfig, Secret};
use mimecast_forwarder::datadog::disposition::{self, Answer, Disposition, disposition};
use mimecast_forwarder::datadog::sink;
use mimecast_forwarder::http::{Http, Response};
use mimecast_forwarder::mimecast::auth::{self, AuthError, Credentials, MAX_TOKEN_LIFETIME, MIN_TOKEN_LIFETIME};
use mimecast_forwarder::mimecast::client::{self, FetchError, PageRequest, Retry};
use mimecast_forwarder::mimecast::window::Window;
use mimecast_forwarder::mimecast::{Feed, wire};
use mimecast_forwarder::sim::datadog::{self as dd, DatadogSim};
use mimecast_forwarder::sim::mimecast::{self as mc, Fault, MimecastSim};
use mimecast_forwarder::sim::records;
use proptest::prelude::*;
use serde_json::{Map, Value, json};

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>().prop_filter("JSON has no NaN or infinity", |f| f.is_finite()).prop_map(|f| json!(f)),
        ".{0,12}".prop_map(Value::String),
        // The envelope's own words, so generated values sometimes look like pages.
        prop::sample::select(vec!["meta", "data", "fail", "pagination", "next", "dlpLogs", "rejections", "clickLogs"])
            .prop_map(|s| Value::String(s.to_owned())),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..6).prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// Keys: short lowercase names (never a wrapper key such as `dlpLogs` or `rejections`), plus the envelope's.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z]{1,8}",
        1 => prop::sample::select(vec!["meta", "data", "fail", "pagination", "next", "dlpLogs", "rejections", "attachmentLogs", "impersonationLogs", "clickLogs", "errors", "code"])
            .prop_map(str::to_owned),
    ]
}

fn record() -> impl Strategy<Value = Value> {
    prop::collection::vec(("[a-z]{1,8}", json_value()), 0..5).prop_map(|kv| Value::Object(kv.into_iter().collect()))
}

/// Something shaped like an envelope, with every part possibly wrong: gets past the first checks far more often
/// than arbitrary JSON does.
fn envelope() -> impl Strategy<Value = Value> {
    let part = || prop_oneof![json_value(), record(), Just(Value::Null)];
    let data = prop_oneof![
        2 => prop::collection::vec(prop_oneof![3 => record(), 1 => json_leaf()], 0..4).prop_map(Value::Array),
        1 => prop::collection::vec(
            (prop::sample::select(Feed::ALL.map(|f| f.spec().records_key.unwrap_or("data")).to_vec()), part()),
            0..3
        )
        .prop_map(|items| Value::Array(items.into_iter().map(|(k, v)| json!({ k: v })).collect())),
        2 => prop::collection::vec((prop::sample::select(Feed::ALL.map(|f| f.spec().records_key.unwrap_or("data")).to_vec()), prop::collection::vec(prop_oneof![3 => record(), 1 => json_leaf()], 0..4)), 0..3)
            .prop_map(|items| Value::Array(items.into_iter().map(|(k, v)| json!({ k: v })).collect())),
        1 => json_value(),
    ];
    let next = prop_oneof![json_value(), ".{0,6}".prop_map(Value::String)];
    let meta = prop_oneof![
        3 => next.prop_map(|n| json!({"status": 200, "pagination": {"next": n}})),
        2 => Just(json!({"status": 200})),
        1 => part().prop_map(|p| json!({ "pagination": p })),
        1 => part(),
    ];
    let fail = prop_oneof![Just(json!([])), part()];
    let (meta, data, fail) =
        (prop::option::weighted(0.9, meta), prop::option::weighted(0.9, data), prop::option::weighted(0.3, fail));
    (meta, data, fail).prop_map(|(meta, data, fail)| {
        let mut m = Map::new();
        meta.map(|v| m.insert("meta".into(), v));
        data.map(|v| m.insert("data".into(), v));
        fail.map(|v| m.insert("fail".into(), v));
        Value::Object(m)
    })
}

/// Every value inside `v`, itself included.
fn all_values(v: &Value, out: &mut Vec<Value>) {
    out.push(v.clone());
    match v {
        Value::Array(a) => a.iter().for_each(|x| all_values(x, out)),
        Value::Object(o) => o.values().for_each(|x| all_values(x, out)),
        _ => {}
    }
}

/// `parse_page` never panics, and an `Ok` page holds only objects that were in the input.
fn check_no_invention(feed: Feed, bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(page) = wire::parse_page(feed, bytes) {
        let Ok(input) = serde_json::from_slice::<Value>(bytes) else {
            // Only a page with characters no parser takes (replaced with U+FFFD) is read from invalid JSON.
            prop_assert!(page.repaired > 0, "{feed:?}: a page read from invalid JSON without saying so");
            return Ok(());
        };
        let mut inside = Vec::new();
        all_values(&input, &mut inside);
        for r in &page.records {
            prop_assert!(r.is_object(), "{feed:?}: record {r} is not an object");
            prop_assert!(inside.contains(r), "{feed:?}: record {r} is not in the input");
        }
        prop_assert!(page.next.as_deref() != Some(""), "an empty next is no next");
    }
    Ok(())
}

/// A well-formed page of `records` in `feed`'s own shape, the records spread over `wrappers` data[] items.
fn page_body(feed: Feed, records: &[Value], next: Option<&str>, wrappers: usize, rejection_flat: bool) -> Vec<u8> {
    let data = match feed.spec().records_key {
        Some(key) if !(feed == Feed::Rejection && rejection_flat) => {
            let per = records.len().div_ceil(wrappers.max(1)).max(1);
            let mut items: Vec<Value> =
                records.chunks(per).map(|c| json!({ key: c, "resultCount": c.len() })).collect();
            if items.is_empty() {
                items.push(json!({ key: [] }));
            }
            Value::Array(items)
        }
        _ => Value::Array(records.to_vec()),
    };
    let mut pagination = json!({"pageSize": 500, "totalCount": records.len()});
    if let Some(n) = next {
        pagination["next"] = json!(n);
    }
    json!({"meta": {"status": 200, "pagination": pagination}, "data": data, "fail": []}).to_string().into_bytes()
}

fn feed() -> impl Strategy<Value = Feed> {
    prop::sample::select(Feed::ALL.to_vec())
}

fn header_text() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,24}",
        "[0-9]{1,30}",
        "-?[0-9]{0,20}(\\.[0-9]{0,6})?([eE][-+]?[0-9]{1,4})?",
        Just("18446744073709551615".to_owned()),
        Just("1e300".to_owned()),
        Just("inf".to_owned()),
        Just("NaN".to_owned()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|n| n.to_string()),
    ]
}

fn resp(status: u16, headers: Vec<(String, String)>, body: Vec<u8>) -> Response {
    Response { status, headers, body }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    // (a) Arbitrary bytes and arbitrary JSON: never a panic, never an invented record.
    #[test]
    fn pages_from_arbitrary_bytes(feed in feed(), bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        check_no_invention(feed, &bytes)?;
    }

    #[test]
    fn pages_from_arbitrary_json(feed in feed(), v in prop_oneof![json_value(), envelope()]) {
        check_no_invention(feed, v.to_string().as_bytes())?;
    }

    // (b) Well-formed pages round-trip exactly: same records, same order, next as given.
    #[test]
    fn well_formed_pages_round_trip(
        feed in feed(),
        records in prop::collection::vec(record(), 0..6),
        next in prop::option::of("[A-Za-z0-9._-]{1,16}"),
        wrappers in 1usize..3,
        flat in any::<bool>(),
    ) {
        let page = wire::parse_page(feed, &page_body(feed, &records, next.as_deref(), wrappers, flat));
        let page = page.map_err(|e| TestCaseError::fail(format!("{feed:?}: {e}")))?;
        prop_assert_eq!(&page.records, &records);
        prop_assert_eq!(page.next.as_deref(), next.as_deref());
        prop_assert_eq!(page.is_last(), next.is_none() || records.is_empty());
    }

    // (c) A page cut anywhere is an error, never a shorter page.
    #[test]
    fn truncated_pages_are_errors(
        feed in feed(),
        records in prop::collection::vec(record(), 0..4),
        next in prop::option::of("[a-z0-9]{1,8}"),
    ) {
        let body = page_body(feed, &records, next.as_deref(), 1, false);
        for cut in 0..body.len() {
            let got = wire::parse_page(feed, &body[..cut]);
            prop_assert!(got.is_err(), "{feed:?} cut at {cut}/{}: {got:?}", body.len());
        }
    }

    // (d) Server-given waits never exceed their caps, whatever the text and the clock.
    #[test]
    fn waits_are_capped(text in header_text(), now_ms in any::<i64>(), other in header_text(), third in header_text()) {
        if let Some(w) = client::reset_wait(&text, now_ms) {
            prop_assert!(w <= client::MAX_SERVER_WAIT, "reset {text}: {w:?}");
        }
        if let Some(w) = disposition::retry_after(Some(&text)) {
            prop_assert!(w <= disposition::MAX_SERVER_WAIT, "retry-after {text}: {w:?}");
        }
        for spelling in ["X-RateLimit-", "X-Rate-Limit-"] {
            let headers = vec![
                (format!("{spelling}Remaining"), other.clone()),
                (format!("{spelling}Limit"), third.clone()),
                (format!("{spelling}Reset"), text.clone()),
            ];
            let r = resp(200, headers.clone(), Vec::new());
            if let Some(w) = client::throttle(&r, now_ms) {
                prop_assert!(w <= client::MAX_SERVER_WAIT, "throttle {headers:?}: {w:?}");
            }
            let r = resp(429, headers.clone(), Vec::new());
            if let Err(FetchError::RateLimited(Some(w))) = client::classify(Feed::Audit, &r, now_ms) {
                prop_assert!(w.wait <= client::MAX_SERVER_WAIT);
                prop_assert!(matches!(FetchError::RateLimited(Some(w)).retry(true), Retry::AtLeast(d) if d <= client::MAX_SERVER_WAIT));
            }
        }
        let r = resp(429, vec![("Retry-After".into(), text.clone())], Vec::new());
        if let Answer::Status { retry_after: Some(w), .. } = sink::answer(&r).answer {
            prop_assert!(w <= disposition::MAX_SERVER_WAIT);
        }
    }

    // (e) Token answers never panic, and any lifetime they give is within the clamp.
    #[test]
    fn token_lifetimes_are_clamped(
        body in prop_oneof![
            json_value().prop_map(|v| v.to_string()),
            json_value().prop_map(|e| json!({"access_token": "t", "expires_in": e}).to_string()),
            header_text().prop_map(|e| format!(r#"{{"access_token":"t","expires_in":{e}}}"#)),
        ],
        margin_secs in any::<u64>(),
    ) {
        let now = Instant::now();
        if let Ok(t) = auth::parse_token(body.as_bytes(), now) {
            let life = t.expires_at - now;
            prop_assert!((MIN_TOKEN_LIFETIME..=MAX_TOKEN_LIFETIME).contains(&life), "{body}: {life:?}");
            let _ = t.fresh(now, Duration::from_secs(margin_secs));
        }
    }

    // (f) An intake answer deletes the batch only when it is Datadog's: 202 with a JSON object.
    #[test]
    fn only_datadogs_answer_deletes(
        status in any::<u16>(),
        body in prop_oneof![json_value().prop_map(|v| v.to_string().into_bytes()), prop::collection::vec(any::<u8>(), 0..64)],
        retry_after in header_text(),
        batch in 1usize..1000,
    ) {
        let r = resp(status, vec![("Retry-After".into(), retry_after)], body.clone());
        let sent = sink::answer(&r);
        if disposition(sent.answer, batch) == Disposition::Delete {
            prop_assert_eq!(status, 202);
            prop_assert!(serde_json::from_slice::<Value>(&body).is_ok_and(|v| v.is_object()));
        }
    }
}

#[test]
fn no_status_but_202_deletes() {
    for code in 0..=u16::MAX {
        for retry_after in [None, Some(Duration::from_secs(1))] {
            for batch in [1, 2, 1000] {
                let d = disposition(Answer::Status { code, retry_after }, batch);
                assert_eq!(d == Disposition::Delete, code == 202, "{code}");
                assert_ne!(disposition(Answer::NotDatadog { code }, batch), Disposition::Delete);
            }
        }
    }
}

// The simulators' hostile answers, through the real client and sink over loopback HTTP.

fn http() -> Http {
    Http::new(&HttpConfig { timeout_secs: 5, proxy: None, ca_file: None }).unwrap()
}

fn creds(sim: &MimecastSim) -> Credentials {
    Credentials {
        base_url: sim.url(),
        client_id: mc::CLIENT_ID.into(),
        client_secret: Secret::new(mc::CLIENT_SECRET.into()),
    }
}

/// A simulator holding `n` audit records in one window, and the request for its first page of 2.
fn audit_sim(n: u64) -> (MimecastSim, PageRequest) {
    let sim = MimecastSim::start().unwrap();
    let t0 = 1_700_000_000;
    sim.add(Feed::Audit, (0..n).map(|i| records::generate(Feed::Audit, i, t0 + i as i64, 0)));
    let req = PageRequest {
        feed: Feed::Audit,
        window: Window { from: t0 - 10, to: t0 + 1000 },
        page_token: None,
        page_size: 2,
    };
    (sim, req)
}

fn fetch(sim: &MimecastSim, req: &PageRequest) -> client::Fetched {
    client::fetch_page(
        &http(),
        &creds(sim),
        None,
        req,
        Duration::from_secs(1),
        Instant::now(),
        mimecast_forwarder::datetime::now() * 1000,
    )
}

#[test]
fn mimecast_sim_hostile_answers_are_failed_calls() {
    let (sim, req) = audit_sim(5);
    sim.fault(None, Fault::MissingMeta);
    assert!(matches!(fetch(&sim, &req).result, Err(FetchError::Malformed(m)) if m.contains("meta")));
    sim.fault(None, Fault::NonObjects);
    assert!(matches!(fetch(&sim, &req).result, Err(FetchError::Malformed(m)) if m.contains("not an object")));
    sim.fault(None, Fault::Redirect("https://login.example/".into()));
    let e = fetch(&sim, &req).result.unwrap_err();
    assert_eq!(e, FetchError::Redirect { status: 302, location: Some("https://login.example/".into()) });
    sim.fault(None, Fault::AltRateHeaders("1e300".into()));
    let e = fetch(&sim, &req).result.unwrap_err();
    assert_eq!(e.retry(false), Retry::AtLeast(client::MAX_SERVER_WAIT));
    assert!(e.to_string().contains("waiting the 300 s cap"), "{e}");
    sim.fault(None, Fault::RateLimit("18446744073709551615".into()));
    assert_eq!(fetch(&sim, &req).result.unwrap_err().retry(false), Retry::AtLeast(client::MAX_SERVER_WAIT));
    // A slow page is still a page: the simulator says it served this one late.
    sim.fault(None, Fault::Delay(Duration::from_millis(150)));
    assert_eq!(fetch(&sim, &req).result.unwrap().records.len(), 2);
    let served = sim.requests().pop().unwrap();
    assert!(matches!(served.fault, Some(Fault::Delay(_))) && served.status == 200, "{served:?}");
}

#[test]
fn mimecast_sim_tokens_and_page_tokens() {
    let (sim, mut req) = audit_sim(8);
    // An absurd lifetime is clamped to a day, and the token works.
    sim.set_token_expires_in_raw(Some("18446744073709551615"));
    let f = fetch(&sim, &req);
    let page1 = f.result.unwrap();
    let t = f.new_token.unwrap();
    assert!(t.expires_at <= Instant::now() + MAX_TOKEN_LIFETIME);
    // Page tokens cycle A → B → A.
    sim.set_token_cycle(true);
    let a = page1.next.clone().unwrap();
    req.page_token = Some(a.clone());
    let b = fetch(&sim, &req).result.unwrap().next.unwrap();
    req.page_token = Some(b.clone());
    assert_eq!(fetch(&sim, &req).result.unwrap().next, Some(a.clone()));
    assert_ne!(a, b);
    // A persistent page-token refusal: the first page is served, every later one refused and restarted.
    sim.set_always(Some(Fault::RefusePageToken));
    req.page_token = None;
    assert!(fetch(&sim, &req).result.is_ok());
    req.page_token = Some(a);
    assert_eq!(fetch(&sim, &req).result.unwrap_err().retry(true), Retry::RestartWindow);
    sim.set_always(None);
    assert!(fetch(&sim, &req).result.is_ok());
    // A redirecting token endpoint is named as such.
    sim.set_token_redirect(Some("https://sso.example/login"));
    let e = fetch(&sim, &req).result.unwrap_err();
    assert!(
        matches!(&e, FetchError::Auth(AuthError::Redirect { status: 302, location: Some(l) }) if l == "https://sso.example/login")
    );
    assert_eq!(e.retry(false), Retry::Slow);
    assert!(e.to_string().contains("redirected to https://sso.example/login"), "{e}");
}

#[test]
fn datadog_sim_hostile_answers_keep_the_batch() {
    let sim = DatadogSim::start().unwrap();
    let key = Secret::new(dd::API_KEY.into());
    let send = || sink::send(&http(), &sim.intake_url(), &key, br#"[{"message":"m"}]"#.to_vec());
    sim.fault(dd::Fault::CaptivePortal);
    let s = send();
    assert_eq!(disposition(s.answer, 1), Disposition::Retry(None));
    assert!(s.detail.contains("HTTP 200 that is not Datadog's answer (text/html"), "{}", s.detail);
    sim.fault(dd::Fault::RetryAfterRaw("18446744073709551615".into()));
    let s = send();
    assert_eq!(disposition(s.answer, 1), Disposition::Retry(Some(disposition::MAX_SERVER_WAIT)));
    assert!(s.detail.contains("waiting the 120 s cap"), "{}", s.detail);
    sim.fault(dd::Fault::Redirect("https://portal.example/".into()));
    let s = send();
    assert_eq!(disposition(s.answer, 1), Disposition::Hold);
    assert!(s.detail.contains("redirected to https://portal.example/"), "{}", s.detail);
    sim.set_captive_portal(true);
    assert_eq!(disposition(send().answer, 1), Disposition::Retry(None));
    sim.set_captive_portal(false);
    assert_eq!(disposition(send().answer, 1), Disposition::Delete);
    assert_eq!(sim.accepted().len(), 1, "only the last send was accepted");
}
