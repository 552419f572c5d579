//! Hostile peers end to end: the loopback simulators (and a rewriting proxy in front of them) answer what a broken
//! API, proxy or network answers, over real HTTP, and the whole agent (in-process, or the real binary where the
//! behaviour is the process's) must neither crash, lose, duplicate, stall nor hide what happened. Each test says
//! which defect it guards: removing that fix makes it fail.

use std::collections::HashMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::bin::{SpawnDaemon, cmd, no_secret, run, signal, stderr_lines, wait_exit, wait_for, write_config};
use crate::common::{Rig, assert_delivered_once, fast_tuning, once_within, queue_direct, run_daemon_until};
use mimecast_forwarder::agent::Tuning;
use mimecast_forwarder::config::{Config, HttpConfig};
use mimecast_forwarder::datetime;
use mimecast_forwarder::http::{Http, Response};
use mimecast_forwarder::mimecast::{Feed, wire};
use mimecast_forwarder::sim::datadog::{self as dd, Fault as DdFault};
use mimecast_forwarder::sim::http::{Reply, Request, Server};
use mimecast_forwarder::sim::mimecast::{Fault, Logged};
use mimecast_forwarder::sim::records;
use serde_json::Value;

/// The status report `mimecast-forwarder status --json` prints, read in-process.
fn status(rig: &Rig, cfg: &Config) -> Value {
    serde_json::from_str(&report(rig, cfg).to_json()).unwrap()
}

fn report(rig: &Rig, cfg: &Config) -> mimecast_forwarder::status::Report {
    mimecast_forwarder::status::gather(&rig.store(), cfg, datetime::now()).unwrap()
}

fn feed_error(rig: &Rig, cfg: &Config, feed: Feed) -> String {
    let s = status(rig, cfg);
    s["feeds"][feed.name()]["last_error"].as_str().unwrap_or_else(|| panic!("{feed} has no last_error: {s}")).to_owned()
}

fn requests_of(rig: &Rig, feed: Feed) -> Vec<Logged> {
    rig.mc.requests().into_iter().filter(|r| r.feed == Some(feed)).collect()
}

/// Every log Datadog accepted carries a record that is a JSON object in its `message`.
fn assert_messages_are_objects(rig: &Rig) {
    for log in rig.dd.accepted() {
        let message = log["message"].as_str().unwrap_or_else(|| panic!("no message string: {log}"));
        let record: Value = serde_json::from_str(message).unwrap_or_else(|e| panic!("{e}: {message}"));
        assert!(record.is_object(), "a non-object was sent to Datadog: {message}");
    }
}

/// `n` records of `feed`, one every `step` seconds, the newest `newest_age` seconds old; returns them with keys.
fn spaced(feed: Feed, n: u64, step: i64, newest_age: i64) -> (Vec<(i64, Value)>, HashMap<String, Feed>) {
    let now = datetime::now();
    let recs: Vec<(i64, Value)> = (0..n)
        .map(|i| {
            let t = now - newest_age - (n as i64 - 1 - i as i64) * step;
            (t, records::generate(feed, i, t, 300))
        })
        .collect();
    let keys = recs.iter().map(|(_, r)| (wire::record_key(feed, r), feed)).collect();
    (recs, keys)
}

/// One window holding every record: the faults below then land on a known page of a known window.
const ONE_WINDOW: &str = "max_window_secs = 7400";

// ---- 1. Absurd numbers from both peers: the real binary ----

/// Guards: `Instant + Duration::from_secs(Retry-After)` and `now + expires_in` overflowed on u64::MAX and panicked,
/// which under `panic = "abort"` killed the daemon with SIGABRT on one header.
#[test]
fn absurd_retry_after_and_token_lifetime_do_not_crash_the_binary() {
    let rig = Rig::new();
    let expected = rig.add_records(&[Feed::Audit, Feed::Dlp], 40, 300);
    rig.mc.set_token_expires_in_raw(Some("18446744073709551615"));
    rig.dd.fault(DdFault::RetryAfterRaw("18446744073709551615".into()));
    let path = write_config(&rig, &[("mimecast", "log_types = [\"audit\", \"dlp\"]")]);
    let p = path.to_str().unwrap();
    let mut child = cmd(&["run", "--once", "--config", p]).stderr(Stdio::piped()).spawn_daemon();
    let log = stderr_lines(&mut child);
    let mut exited = None;
    wait_for("the 429 to be handled", Duration::from_secs(30), || {
        exited = child.try_wait().unwrap();
        exited.is_some() || log.lock().unwrap().contains("waiting the 120 s cap")
    });
    assert!(exited.is_none(), "exited early with {exited:?}:\n{}", log.lock().unwrap());
    // The pass now waits the capped 120 s for Datadog; stopping it keeps the records for the next run.
    signal(&child, "-TERM");
    let code = wait_exit(&mut child, "the pass to stop", Duration::from_secs(60));
    let text = log.lock().unwrap().clone();
    assert_eq!(code.code(), Some(75), "{code:?}:\n{text}");
    assert!(!text.contains("panicked"), "{text}");
    assert!(text.contains("Retry-After: server asked 1.8e19 s; waiting the 120 s cap"), "{text}");
    no_secret(&text);

    let (code, out, err) = run(&["run", "--once", "--config", p]);
    assert_eq!(code, 0, "{err}");
    no_secret(&(out + &err));
    assert_delivered_once(&rig.dd, &expected);
}

// ---- 2. Absurd waits are capped, honoured and shown ----

/// Guards: `X-RateLimit-Reset: 1e300` was either unreadable (retried at once, hammering a rate-limited API) or an
/// uncapped wait of 10^297 s that no one could see; now it is the 300 s cap, said in the feed's error, and the
/// other feeds keep being polled meanwhile.
#[test]
fn a_rate_limit_reset_of_1e300_waits_the_300_s_cap_and_says_so() {
    let rig = Rig::new();
    let audit = rig.add_records(&[Feed::Audit], 30, 300);
    let dlp = rig.add_records(&[Feed::Dlp], 30, 300);
    rig.mc.fault(Some(Feed::Audit), Fault::RateLimit("1e300".into()));
    let cfg = rig.config(&[("mimecast", "log_types = [\"audit\", \"dlp\"]")]);
    // Dlp delivered, then polled again at least twice after its first window, while audit waits its 300 s: the
    // daemon is not asleep. (The limit is a hang guard, well below the 300 s a starved dlp would wait.)
    run_daemon_until(
        &cfg,
        || dd::record_keys(&rig.dd.accepted()).len() >= dlp.len() && requests_of(&rig, Feed::Dlp).len() >= 4,
        Duration::from_secs(120),
    );
    assert_delivered_once(&rig.dd, &dlp);
    let audit_requests = requests_of(&rig, Feed::Audit);
    assert_eq!(audit_requests.len(), 1, "audit was asked again within the 300 s the server's reset allows");
    assert_eq!(audit_requests[0].status, 429);
    let err = feed_error(&rig, &cfg, Feed::Audit);
    assert_eq!(err, "HTTP 429 rate limited; reset: server asked 1.0e297 s; waiting the 300 s cap");
    assert!(audit.keys().all(|k| !dd::record_keys(&rig.dd.accepted()).contains_key(k)));
}

/// Guards: `Retry-After: 999999999` was honoured uncapped (the intake silent for 31 years) or overflowed; now the
/// sink waits the 120 s cap, `status` says so, and polling goes on meanwhile.
#[test]
fn a_retry_after_of_999999999_waits_the_120_s_cap_and_says_so() {
    let rig = Rig::new();
    rig.add_records(&[Feed::Audit], 30, 300);
    rig.dd.fault(DdFault::RetryAfterRaw("999999999".into()));
    let cfg = rig.config(&[("mimecast", "log_types = [\"audit\"]")]);
    // Mimecast is the clock: the daemon runs until it has polled three more times after the 429 (one poll a
    // second), far longer than a retry that ignored the Retry-After would take (a 200 ms backoff at most).
    let mut polls_at_refusal = None;
    run_daemon_until(
        &cfg,
        || {
            let polls = rig.mc.requests().len();
            if polls_at_refusal.is_none() && rig.dd.requests() > 0 {
                polls_at_refusal = Some(polls);
            }
            polls_at_refusal.is_some_and(|n| polls >= n + 3)
        },
        Duration::from_secs(120),
    );
    assert_eq!(rig.dd.requests(), 1, "the intake was asked again before the capped Retry-After");
    assert_eq!(rig.queued().len(), 30, "everything stays queued");
    let s = status(&rig, &cfg);
    let err = s["datadog"]["last_error"].as_str().unwrap();
    assert!(err.ends_with("; Retry-After: server asked 1.0e9 s; waiting the 120 s cap"), "{err}");
    assert!(err.starts_with("HTTP 429"), "{err}");
    // Polling Mimecast went on (poll_interval_secs = 1) while the sink waited: the run's end condition.
    let later = rig.mc.requests().len() - polls_at_refusal.unwrap();
    assert!(later >= 3, "{later} polls after the 429");
}

// ---- 3. Pages that are not pages ----

/// Guards: a page without `meta` was read as a last page (no `next`), moving the cursor past the window's later
/// pages, and records that are not objects were queued and sent to Datadog. Now both are failed calls: the window
/// stays where it was, and the next pass reads the rest exactly once.
#[test]
fn a_page_without_meta_or_with_non_objects_moves_no_cursor_and_sends_only_objects() {
    let rig = Rig::new();
    let mut expected = rig.add_records(&[Feed::Audit], 100, 300);
    expected.extend(rig.add_records(&[Feed::Dlp], 100, 300));
    // Page 3 of each feed's only window is malformed on every attempt of the first pass.
    for skip in [2, 0, 0] {
        rig.mc.fault_after(Some(Feed::Audit), skip, Fault::MissingMeta);
        rig.mc.fault_after(Some(Feed::Dlp), skip, Fault::NonObjects);
    }
    let cfg = rig.config(&[("mimecast", &format!("page_size = 20\n{ONE_WINDOW}\nlog_types = [\"audit\", \"dlp\"]"))]);
    let start = datetime::now() - 7200;
    let out = once_within(&cfg, &fast_tuning(), Duration::from_secs(30));
    assert!(out.gave_up, "three malformed answers in a row end the feed's pass");
    assert_eq!(feed_error(&rig, &cfg, Feed::Audit), "malformed response: no meta object");
    assert_eq!(
        feed_error(&rig, &cfg, Feed::Dlp),
        "malformed response: a record in data[].dlpLogs is not an object: a number"
    );
    for feed in [Feed::Audit, Feed::Dlp] {
        let cursor = rig.store().cursor(feed).unwrap().unwrap();
        let (_, token) = cursor.window.clone().unwrap_or_else(|| panic!("{feed}: the window was closed: {cursor:?}"));
        assert!(token.is_some(), "{feed}: resumes at the malformed page, not the window's start");
        assert!(cursor.watermark <= start + 2, "{feed}: the watermark moved");
    }
    assert_eq!(dd::record_keys(&rig.dd.accepted()).len(), 80, "pages 1 and 2 of each feed only");

    let out = once_within(&cfg, &fast_tuning(), Duration::from_secs(30));
    assert!(!out.gave_up && out.queued == 0, "{out:?}");
    assert_delivered_once(&rig.dd, &expected);
    assert_messages_are_objects(&rig);
    assert!(status(&rig, &cfg)["feeds"]["audit"]["last_error"].is_null(), "a finished window clears the error");
}

// ---- 4. Page tokens that cycle ----

/// Guards: a `next` that points back at an earlier page (A → B → A) was followed forever, burning the quota and
/// never ending `--once`. Now it is an error naming the cycle, requests stay few, and nothing is lost.
#[test]
fn page_tokens_that_cycle_are_an_error_not_an_endless_loop() {
    let rig = Rig::new();
    let expected = rig.add_records(&[Feed::Audit], 100, 300);
    rig.mc.set_token_cycle(true);
    let cfg = rig.config(&[("mimecast", &format!("page_size = 10\n{ONE_WINDOW}\nlog_types = [\"audit\"]"))]);
    let out = once_within(&cfg, &fast_tuning(), Duration::from_secs(30));
    assert!(out.gave_up);
    let n = rig.mc.requests().len();
    assert!(n < 30, "{n} requests in one pass");
    let err = feed_error(&rig, &cfg, Feed::Audit);
    assert!(err.contains("pagination cycle") && err.contains("already given"), "{err}");
    assert_eq!(dd::record_keys(&rig.dd.accepted()).len(), 20, "pages 1 and 2 only");

    rig.mc.set_token_cycle(false);
    let out = once_within(&cfg, &fast_tuning(), Duration::from_secs(30));
    assert_eq!(out.queued, 0);
    assert_delivered_once(&rig.dd, &expected);
}

// ---- 5. A page token refused every time ----

/// Guards: a refused page token restarts the window, and page 1's success reset the failure count, so a token
/// refused every time restarted the window at full speed forever and `--once` never ended. Now restarts are
/// counted per window: they back off and the pass gives up after `once_attempts`.
#[test]
fn a_page_token_refused_every_time_backs_off_and_gives_up() {
    let rig = Rig::new();
    let expected = rig.add_records(&[Feed::Audit], 100, 300);
    rig.mc.set_always(Some(Fault::RefusePageToken));
    let cfg = rig.config(&[("mimecast", &format!("page_size = 20\n{ONE_WINDOW}\nlog_types = [\"audit\"]"))]);
    let tuning = Tuning {
        mimecast_backoff: mimecast_forwarder::backoff::Backoff {
            base: Duration::from_millis(10),
            cap: Duration::from_secs(10),
        },
        once_attempts: 8,
        ..fast_tuning()
    };
    let out = once_within(&cfg, &tuning, Duration::from_secs(60));
    assert!(out.gave_up);
    let log = rig.mc.requests();
    assert_eq!(log.len(), 16, "page 1 and a refused page 2, eight times");
    let refused: Vec<usize> = (0..log.len()).filter(|&i| log[i].status == 400).collect();
    assert_eq!(refused.len(), 8);
    // The delays themselves are drawn with full jitter (random, and stretched by a loaded machine), so they are
    // not asserted here: the bound is the count above, and that the pass gave up instead of looping.
    assert!(feed_error(&rig, &cfg, Feed::Audit).contains("err_invalid_page_token"));

    rig.mc.set_always(None);
    assert_eq!(once_within(&cfg, &fast_tuning(), Duration::from_secs(30)).queued, 0);
    assert_delivered_once(&rig.dd, &expected);
}

// ---- 6. A slow Mimecast ----

/// Guards: `--once` read windows up to the moving clock, so a slow API made every window end past the last one
/// and the pass chased "now" with ever more requests. Now a pass reads up to where it started: one request per
/// page, whatever the latency.
#[test]
fn a_slow_mimecast_costs_one_request_per_page_in_a_once_pass() {
    let rig = Rig::new();
    let (recs, expected) = spaced(Feed::Audit, 48, 120, 30);
    rig.mc.add(Feed::Audit, recs.iter().map(|(_, r)| r.clone()));
    rig.mc.set_always(Some(Fault::Delay(Duration::from_millis(300))));
    let cfg = rig
        .config(&[("mimecast", "page_size = 10\nsettle_secs = 1\npoll_interval_secs = 3600\nlog_types = [\"audit\"]")]);
    let t0 = datetime::now();
    let out = once_within(&cfg, &fast_tuning(), Duration::from_secs(60));
    assert_eq!(out.queued, 0);
    assert_delivered_once(&rig.dd, &expected);
    let spec = Feed::Audit.spec();
    let mut per_window: HashMap<(i64, i64), usize> = HashMap::new();
    for r in rig.mc.requests() {
        let f = r.filter.unwrap();
        let time = |k: &str| datetime::parse(f[k].as_str().unwrap()).unwrap();
        *per_window.entry((time(spec.from_field), time(spec.to_field))).or_default() += 1;
    }
    for (&(from, to), &n) in &per_window {
        assert!(to <= t0, "a window ends past the pass's start: {to} > {t0}");
        let inside = recs.iter().filter(|(t, _)| *t >= from && *t <= to).count();
        // Full pages, then the partial (or, for a full last page, the empty) page that ends the window.
        assert_eq!(n, inside / 10 + 1, "window {from}..{to} with {inside} records took {n} requests");
    }
}

/// Guards: a daemon counted the time its pages took as being behind, so a slow API was polled again at once,
/// continuously. Now a caught-up daemon waits `poll_interval_secs` however long the window took to read.
#[test]
fn a_slow_mimecast_is_polled_every_poll_interval_not_continuously() {
    let rig = Rig::new();
    let (recs, expected) = spaced(Feed::Audit, 40, 10, 20);
    rig.mc.add(Feed::Audit, recs.into_iter().map(|(_, r)| r));
    rig.mc.set_always(Some(Fault::Delay(Duration::from_millis(300))));
    let cfg = rig.config(&[(
        "mimecast",
        "page_size = 10\nsettle_secs = 1\npoll_interval_secs = 30\ninitial_lookback_secs = 600\nlog_types = [\"audit\"]",
    )]);
    // Run until the window is read and delivered, then watch a quiet spell of ten page latencies: a daemon that
    // polled continuously would ask again within one. The spell is what the test observes (nothing happening),
    // not a wait for something to happen; it starts from the event, so a slow machine cannot cut it short.
    let mut read_at = None;
    run_daemon_until(
        &cfg,
        || {
            if read_at.is_none()
                && rig.mc.requests().len() >= 5
                && dd::record_keys(&rig.dd.accepted()).len() >= expected.len()
            {
                read_at = Some(Instant::now());
            }
            read_at.is_some_and(|t| t.elapsed() >= Duration::from_secs(3))
        },
        Duration::from_secs(120),
    );
    assert_delivered_once(&rig.dd, &expected);
    let log = rig.mc.requests();
    assert_eq!(log.len(), 5, "four full pages and the empty one, then nothing until the poll interval");
    assert!(log.iter().all(|r| r.filter == log[0].filter), "a second window was read at once");
}

// ---- 7. A captive portal ----

/// Guards: any 2xx from the intake counted as delivered, so a captive portal's HTML 200 deleted every batch
/// unsent. Now only Datadog's 202 deletes; the records wait, and arrive once the portal is gone.
#[test]
fn a_captive_portal_200_delivers_nothing_and_keeps_every_record() {
    let rig = Rig::new();
    let expected = rig.add_records(&[Feed::Audit, Feed::TtpUrl], 40, 300);
    rig.dd.set_captive_portal(true);
    let cfg = rig.config(&[("mimecast", "log_types = [\"audit\", \"ttp-url\"]")]);
    let out = once_within(&cfg, &fast_tuning(), Duration::from_secs(30));
    assert!(out.gave_up);
    assert_eq!(out.queued, 80);
    assert_eq!(rig.queued().len(), 80);
    assert_eq!(rig.store().counters().unwrap().delivered, 0);
    assert!(rig.dd.requests() >= 3 && rig.dd.accepted().is_empty());
    let s = status(&rig, &cfg);
    let err = s["datadog"]["last_error"].as_str().unwrap();
    assert!(err.contains("HTTP 200 that is not Datadog's answer (text/html"), "{err}");
    assert!(err.contains("Guest Wi-Fi") && err.contains("the batch stays queued"), "{err}");
    assert!(s["datadog"]["last_success"].is_null());

    rig.dd.set_captive_portal(false);
    assert_eq!(once_within(&cfg, &fast_tuning(), Duration::from_secs(30)).queued, 0);
    assert_delivered_once(&rig.dd, &expected);
}

// ---- 8. Redirects ----

/// Guards: a 302 (a login page or proxy in front of the API) was reported as a failed call "with fail[]" and an
/// empty message, which sent operators looking at Mimecast; now the error says redirect and where to.
#[test]
fn redirects_from_the_api_and_the_token_endpoint_say_where_to() {
    let rig = Rig::new();
    let expected = rig.add_records(&[Feed::Audit, Feed::Dlp], 20, 300);
    rig.mc.fault(Some(Feed::Audit), Fault::Redirect("https://login.example/sso?from=api".into()));
    let cfg = rig.config(&[("mimecast", "log_types = [\"audit\", \"dlp\"]")]);
    let out = once_within(&cfg, &fast_tuning(), Duration::from_secs(30));
    assert!(out.gave_up, "a redirect needs an operator: the pass gives up on the feed");
    let err = feed_error(&rig, &cfg, Feed::Audit);
    assert!(err.starts_with("HTTP 302: redirected to https://login.example/sso?from=api;"), "{err}");
    assert!(err.contains("mimecast.base_url") && !err.contains("fail[]"), "{err}");
    assert_eq!(requests_of(&rig, Feed::Audit).len(), 1, "not retried within the pass");

    // Now the token endpoint itself redirects: every feed says so.
    let rig = Rig::new();
    rig.add_records(&[Feed::Audit, Feed::Dlp], 20, 300);
    rig.mc.set_token_redirect(Some("https://idp.example/login?app=mimecast"));
    let cfg = rig.config(&[("mimecast", "log_types = [\"audit\", \"dlp\"]")]);
    let out = once_within(&cfg, &fast_tuning(), Duration::from_secs(30));
    assert!(out.gave_up);
    for feed in [Feed::Audit, Feed::Dlp] {
        let err = feed_error(&rig, &cfg, feed);
        assert!(
            err.starts_with(
                "POST /oauth/token answered HTTP 302: redirected to https://idp.example/login?app=mimecast;"
            ),
            "{feed}: {err}"
        );
        assert!(!err.contains("fail[]") && !err.contains("refused the client credentials"), "{err}");
    }
    assert!(rig.mc.requests().is_empty(), "no page is asked without a token");
    rig.mc.set_token_redirect(None);
    assert_eq!(once_within(&cfg, &fast_tuning(), Duration::from_secs(30)).queued, 0);
    assert_eq!(dd::record_keys(&rig.dd.accepted()).len(), expected.len());
}

// ---- 9. The other spelling of the rate-limit headers ----

/// Guards: only `X-RateLimit-*` was read, so a 429 carrying `X-Rate-Limit-Reset` was retried after the short
/// backoff instead of the reset the server asked for.
#[test]
fn a_429_with_x_rate_limit_reset_waits_the_reset() {
    let rig = Rig::new();
    let expected = rig.add_records(&[Feed::Audit], 30, 300);
    rig.mc.fault(Some(Feed::Audit), Fault::AltRateHeaders("1200".into()));
    let cfg = rig.config(&[("mimecast", "log_types = [\"audit\"]")]);
    once_within(&cfg, &fast_tuning(), Duration::from_secs(30));
    assert_delivered_once(&rig.dd, &expected);
    let log = rig.mc.requests();
    assert_eq!(log[0].status, 429);
    let waited = log[1].at - log[0].at;
    assert!(waited >= Duration::from_millis(1200), "retried after {waited:?}, before the reset");
    assert_eq!(log[0].filter, log[1].filter, "the same page is asked again");
}

// ---- Beyond the list: a rewriting proxy in front of the simulators ----

type Before = Box<dyn Fn(&mut Request) + Send + Sync>;
type After = Box<dyn Fn(&Request, Response) -> Reply + Send + Sync>;

/// Forwards every request to `upstream` (after `before` may change it) and answers what `after` makes of the
/// upstream's response: a proxy, CDN or broken gateway between the agent and a peer.
fn proxy(upstream: String, before: Before, after: After) -> Server {
    let http = Http::new(&HttpConfig { timeout_secs: 10, proxy: None, ca_file: None }).unwrap();
    Server::start(move |req| {
        let mut req = req.clone();
        before(&mut req);
        let skip = ["host", "content-length", "connection", "accept-encoding", "user-agent"];
        let headers: Vec<(&str, &str)> = req
            .headers
            .iter()
            .filter(|(k, _)| !skip.contains(&k.to_ascii_lowercase().as_str()))
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let url = format!("{upstream}{}", req.path);
        let resp =
            if req.method == "GET" { http.get(&url, &headers) } else { http.post(&url, &headers, req.body.clone()) };
        match resp {
            Ok(r) => after(&req, r),
            Err(_) => Reply::Drop,
        }
    })
    .unwrap()
}

/// The upstream's answer as it came, less the framing headers the proxy's server writes itself.
fn relay(r: Response) -> Reply {
    let headers = r
        .headers
        .into_iter()
        .filter(|(k, _)| {
            !["content-length", "connection", "transfer-encoding"].contains(&k.to_ascii_lowercase().as_str())
        })
        .collect();
    Reply::Respond { status: r.status, headers, body: r.body }
}

/// A proxy in front of the Mimecast simulator that changes only the answers to page requests.
fn pages_via(rig: &Rig, change: impl Fn(&mut Response) + Send + Sync + 'static) -> Server {
    proxy(
        rig.mc.url(),
        Box::new(|_| {}),
        Box::new(move |req, mut r| {
            if req.path != "/oauth/token" {
                change(&mut r);
            }
            relay(r)
        }),
    )
}

/// One feed's pass through `mc` (a proxy's URL, or the simulator's own).
fn audit_config(rig: &Rig, mc: &str) -> Config {
    rig.config(&[("mimecast", &format!("base_url = {mc:?}\npage_size = 10\nlog_types = [\"audit\"]"))])
}

fn recent_audit(rig: &Rig, n: u64) -> HashMap<String, Feed> {
    let (recs, keys) = spaced(Feed::Audit, n, 5, 30);
    rig.mc.add(Feed::Audit, recs.into_iter().map(|(_, r)| r));
    keys
}

fn gzip(body: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    // The default level: zlib-rs's fastest one (static Huffman codes) needs over 1 MB for the 200 MB bomb.
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(body).unwrap();
    e.finish().unwrap()
}

/// Guards: a page token is opaque and may be long; one cut anywhere (a column size, an excerpt taken for a log
/// line, a header limit) would be refused and the window restarted forever. A 1 MB `next` goes back byte for byte.
#[test]
fn a_page_token_of_1_mb_is_sent_back_intact() {
    let rig = Rig::new();
    let expected = recent_audit(&rig, 25);
    let pad = "T".repeat(1 << 20);
    let (strip, add) = (pad.clone(), pad);
    // The proxy lengthens every `next` by 1 MB and takes the padding off again on the way back.
    let p = proxy(
        rig.mc.url(),
        Box::new(move |req| {
            let Ok(mut v) = serde_json::from_slice::<Value>(&req.body) else { return };
            if let Some(Value::String(t)) = v.pointer_mut("/meta/pagination/pageToken") {
                *t = t.strip_prefix(strip.as_str()).unwrap_or("cut-short").to_owned();
            }
            req.body = v.to_string().into_bytes();
        }),
        Box::new(move |_, mut r| {
            if let Ok(mut v) = serde_json::from_slice::<Value>(&r.body)
                && let Some(Value::String(t)) = v.pointer_mut("/meta/pagination/next")
            {
                *t = format!("{add}{t}");
                r.body = v.to_string().into_bytes();
            }
            relay(r)
        }),
    );
    let cfg = audit_config(&rig, &p.url());
    let out = once_within(&cfg, &fast_tuning(), Duration::from_secs(30));
    assert!(!out.gave_up && out.queued == 0, "{out:?}");
    assert_delivered_once(&rig.dd, &expected);
    let log = rig.mc.requests();
    assert!(log.iter().all(|r| r.status == 200), "a token was refused: {log:?}");
    assert_eq!(log.iter().filter(|r| r.page_token.is_some()).count(), 2, "pages 2 and 3 of 10 + 10 + 5");
}

/// Guards: a token answer that is valid JSON but not an object (`[{…}]`) must be a failed token call (named, no
/// token cached, retried), never a panic or a request sent with an empty bearer.
#[test]
fn a_token_answer_that_is_an_array_is_a_named_error() {
    let rig = Rig::new();
    let expected = recent_audit(&rig, 5);
    let p = proxy(
        rig.mc.url(),
        Box::new(|_| {}),
        Box::new(|req, mut r| {
            if req.path == "/oauth/token" {
                r.body = [&b"["[..], &r.body, b"]"].concat();
            }
            relay(r)
        }),
    );
    let cfg = audit_config(&rig, &p.url());
    let out = once_within(&cfg, &fast_tuning(), Duration::from_secs(30));
    assert!(out.gave_up);
    assert_eq!(feed_error(&rig, &cfg, Feed::Audit), "POST /oauth/token failed: token response has no access_token");
    assert!(rig.mc.requests().is_empty(), "no page was asked without a token");
    assert_eq!(once_within(&audit_config(&rig, &rig.mc.url()), &fast_tuning(), Duration::from_secs(30)).queued, 0);
    assert_delivered_once(&rig.dd, &expected);
}

/// Guards: a gzip-encoded page (a CDN or proxy compressing) must be read, not taken for garbage; and a gzip bomb
/// or a 70 MB answer must be refused at the 64 MB body limit, not inflated into memory, with the limit named.
#[test]
fn gzip_pages_are_read_and_bombs_and_huge_bodies_are_refused_at_the_limit() {
    let rig = Rig::new();
    let expected = recent_audit(&rig, 25);
    let p = pages_via(&rig, |r| {
        r.body = gzip(&r.body);
        r.headers.push(("Content-Encoding".into(), "gzip".into()));
    });
    let out = once_within(&audit_config(&rig, &p.url()), &fast_tuning(), Duration::from_secs(30));
    assert!(!out.gave_up && out.queued == 0, "{out:?}");
    assert_delivered_once(&rig.dd, &expected);

    // 200 MB of spaces in under 1 MB of gzip, and 70 MB sent as is.
    let bomb = gzip(&vec![b' '; 200 << 20]);
    assert!(bomb.len() < 1 << 20);
    let huge = vec![b' '; 70 << 20];
    for (name, body, encoding) in [("bomb", bomb, Some("gzip")), ("70 MB", huge, None)] {
        let rig = Rig::new();
        let expected = recent_audit(&rig, 5);
        let p = pages_via(&rig, move |r| {
            r.body = body.clone();
            if let Some(e) = encoding {
                r.headers.push(("Content-Encoding".into(), e.into()));
            }
        });
        let cfg = audit_config(&rig, &p.url());
        let out = once_within(&cfg, &fast_tuning(), Duration::from_secs(120));
        assert!(out.gave_up, "{name}");
        // Refused at the limit each time: one page request per attempt, and the pass gave up after three.
        assert_eq!(requests_of(&rig, Feed::Audit).len(), 3, "{name}");
        let err = feed_error(&rig, &cfg, Feed::Audit);
        assert!(err.contains("larger than") && err.contains("67108864"), "{name}: {err}");
        assert_eq!(rig.store().cursor(Feed::Audit).unwrap().unwrap().last_success, None, "{name}");
        assert_eq!(once_within(&audit_config(&rig, &rig.mc.url()), &fast_tuning(), Duration::from_secs(30)).queued, 0);
        assert_delivered_once(&rig.dd, &expected);
    }
}

/// Guards: a response header of 200 KB (a broken gateway) and a `Location` with terminal control characters
/// must be refused as a bad answer and retried: no crash, no window moved, and no control character carried into
/// `status` or the log.
#[test]
fn huge_headers_and_control_characters_in_location_are_refused_cleanly() {
    let rig = Rig::new();
    let expected = recent_audit(&rig, 5);
    let p = pages_via(&rig, |r| r.headers.push(("X-Padding".into(), "p".repeat(200_000))));
    let cfg = audit_config(&rig, &p.url());
    assert!(once_within(&cfg, &fast_tuning(), Duration::from_secs(30)).gave_up);
    let err = feed_error(&rig, &cfg, Feed::Audit);
    assert!(err.contains("header is too big"), "{err}");

    rig.mc.set_always(Some(Fault::Redirect("https://portal.example/\u{1b}[2J\u{7}\u{7f}login".into())));
    let cfg = audit_config(&rig, &rig.mc.url());
    assert!(once_within(&cfg, &fast_tuning(), Duration::from_secs(30)).gave_up);
    let err = feed_error(&rig, &cfg, Feed::Audit);
    assert!(!err.chars().any(char::is_control), "{err:?}");
    assert!(err.contains("invalid header value"), "{err}");
    rig.mc.set_always(None);
    assert_eq!(once_within(&cfg, &fast_tuning(), Duration::from_secs(30)).queued, 0);
    assert_delivered_once(&rig.dd, &expected);
}

/// Guards: the same record twice in one page (a paging bug upstream) is one record: queued and delivered once,
/// and the page commit does not fail on its own duplicate key.
#[test]
fn the_same_record_twice_in_one_page_is_delivered_once() {
    let rig = Rig::new();
    let (recs, expected) = spaced(Feed::Audit, 8, 5, 30);
    let recs: Vec<Value> = recs.into_iter().map(|(_, r)| r).collect();
    rig.mc.add(Feed::Audit, recs.iter().cloned().chain(recs.iter().cloned()));
    let cfg = rig.config(&[("mimecast", "page_size = 100\nlog_types = [\"audit\"]")]);
    let out = once_within(&cfg, &fast_tuning(), Duration::from_secs(30));
    assert!(!out.gave_up && out.queued == 0, "{out:?}");
    assert!(rig.mc.requests().iter().any(|r| r.records == 16), "both copies came in one page");
    assert_delivered_once(&rig.dd, &expected);
    assert_eq!(rig.dd.accepted().len(), 8);
}

/// Guards: a record with 300 fields (every field becomes a log attribute) is delivered whole: no field dropped
/// from the message, none lost to a reserved-name clash.
#[test]
fn a_record_with_300_fields_is_delivered_whole() {
    let rig = Rig::new();
    let mut r = records::generate(Feed::Audit, 1, datetime::now() - 30, 100);
    for i in 0..300 {
        r[format!("field{i:03}")] = Value::String(format!("v{i}"));
    }
    r["host"] = "mail.example".into();
    rig.mc.add(Feed::Audit, [r.clone()]);
    let cfg = rig.config(&[("mimecast", "log_types = [\"audit\"]")]);
    assert_eq!(once_within(&cfg, &fast_tuning(), Duration::from_secs(30)).queued, 0);
    let logs = rig.dd.accepted();
    assert_eq!(logs.len(), 1);
    let message: Value = serde_json::from_str(logs[0]["message"].as_str().unwrap()).unwrap();
    assert_eq!(message, r, "the message is the record, verbatim");
    assert_eq!(logs[0]["field299"], "v299");
    assert_eq!(
        (&logs[0]["mimecast.host"], &logs[0]["hostname"]),
        (&Value::from("mail.example"), &Value::from("test-host"))
    );
}

/// Guards: a server that echoes the request in its error (a token endpoint quoting the form it got, a proxy that
/// shows the request headers) must not put our secrets into the log, `status` or a dead letter; and terminal
/// control characters in a server's text must not reach an operator's terminal through `status`.
#[test]
fn echoed_secrets_and_control_characters_never_reach_the_log_or_status() {
    let rig = Rig::new();
    recent_audit(&rig, 5);
    let echo_token = proxy(
        rig.mc.url(),
        Box::new(|_| {}),
        Box::new(|req, r| {
            if req.path == "/oauth/token" {
                let body = format!("invalid_client for request {} \x1b[2J\x07", String::from_utf8_lossy(&req.body));
                return Reply::Respond { status: 401, headers: vec![], body: body.into_bytes() };
            }
            relay(r)
        }),
    );
    let echo_headers = proxy(
        rig.dd.intake_url().trim_end_matches("/api/v2/logs").to_owned(),
        Box::new(|_| {}),
        Box::new(|req, _| {
            let shown: Vec<String> = req.headers.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            let body = format!("<html>\x1b]0;pwned\x07 upstream down; you sent {}</html>", shown.join("; "));
            Reply::Respond { status: 503, headers: vec![], body: body.into_bytes() }
        }),
    );
    let cfg = rig.config(&[
        ("mimecast", &format!("base_url = {:?}\nlog_types = [\"audit\"]", echo_token.url())),
        ("datadog", &format!("intake_url = \"{}/api/v2/logs\"", echo_headers.url())),
    ]);
    queue_direct(&rig, Feed::Dlp, &[serde_json::json!({"eventTime": "2026-11-28T00:00:00+0000", "x": 1})]);
    let out = once_within(&cfg, &fast_tuning(), Duration::from_secs(30));
    assert_eq!(out.queued, 1);
    let s = status(&rig, &cfg).to_string();
    let text = mimecast_forwarder::status::render(&report(&rig, &cfg), mimecast_forwarder::datetime::now());
    for shown in [&s, &text] {
        assert!(shown.contains("[redacted]"), "the echo is there, scrubbed: {shown}");
        assert!(!shown.contains(mimecast_forwarder::sim::mimecast::CLIENT_SECRET), "{shown}");
        assert!(!shown.contains(mimecast_forwarder::sim::datadog::API_KEY), "{shown}");
        assert!(!shown.contains(['\x1b', '\x07']), "{shown:?}");
    }
}

/// A page's body is data: a record holding the access token's text by chance reaches Datadog as Mimecast sent it
/// (the response used to be scrubbed whole, which altered such a record and could lose a page token), while what
/// an error quotes of a page (a `fail[]` echoing the request's Authorization header) is still scrubbed.
#[test]
fn a_pages_records_are_never_scrubbed_but_what_an_error_quotes_of_a_page_is() {
    let rig = Rig::new();
    // The simulator's first token is sim-token-1: a record that holds it, in a URL as a session parameter might.
    let (recs, _) = spaced(Feed::Audit, 1, 5, 30);
    let mut record = recs[0].1.clone();
    record["url"] = Value::from("https://example.com/?session=sim-token-1&x=1");
    rig.mc.add(Feed::Audit, [record.clone()]);
    let cfg = audit_config(&rig, &rig.mc.url());
    let out = once_within(&cfg, &fast_tuning(), Duration::from_secs(30));
    let got = rig.dd.accepted();
    assert!(!out.gave_up && got.len() == 1, "{out:?}, {} delivered", got.len());
    let message: Value = serde_json::from_str(got[0]["message"].as_str().unwrap()).unwrap();
    assert_eq!(message["url"], record["url"], "the record is delivered as Mimecast sent it");

    // A 200 whose fail[] quotes the Authorization header it got: the error in status is scrubbed.
    let rig = Rig::new();
    recent_audit(&rig, 3);
    let echo = proxy(
        rig.mc.url(),
        Box::new(|_| {}),
        Box::new(|req, r| {
            if req.path == "/oauth/token" {
                return relay(r);
            }
            let auth = req.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("authorization"));
            let said = auth.map_or(String::new(), |(_, v)| v.clone());
            let body = serde_json::json!({"meta": {"status": 200}, "data": [],
                "fail": [{"errors": [{"code": "err_denied", "message": format!("you sent {said}"), "retryable": false}]}]});
            Reply::Respond { status: 200, headers: vec![], body: body.to_string().into_bytes() }
        }),
    );
    let cfg = audit_config(&rig, &echo.url());
    once_within(&cfg, &fast_tuning(), Duration::from_secs(30));
    let error = feed_error(&rig, &cfg, Feed::Audit);
    assert!(error.contains("you sent Bearer [redacted]") && !error.contains("sim-token"), "{error}");
}
