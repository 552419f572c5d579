//! Collecting from Mimecast into the queue, against the loopback simulator over real HTTP.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use crate::common::bin::{
    RUN_LIMIT, SpawnDaemon, cmd, poll_until, run, status_json, stderr_lines, wait_for, write_config,
};
use crate::common::{Rig, assert_delivered_once, fast_tuning, run_daemon_until};
use mimecast_forwarder::agent::{Clock, Tuning};
use mimecast_forwarder::mimecast::{Feed, wire};
use mimecast_forwarder::sim::datadog as dd;
use mimecast_forwarder::sim::mimecast::Fault;
use mimecast_forwarder::sim::records;
use mimecast_forwarder::store::Store;
use serde_json::Value;

const SIX_YEARS: &str = "initial_lookback_secs = 189216000\nmax_window_secs = 200000000";

fn fixture_records() -> Vec<(Feed, Value)> {
    let files = [
        ("elastic_audit_test-audit-events.log", Feed::Audit),
        ("elastic_dlp_test-dlp-logs.log", Feed::Dlp),
        ("elastic_ttp_attachment_test-ttp-ap-logs.log", Feed::TtpAttachment),
        ("elastic_ttp_impersonation_test-ttp-ip-logs.log", Feed::TtpImpersonation),
        ("elastic_ttp_url_test-ttp-url-logs.log", Feed::TtpUrl),
    ];
    let mut out = Vec::new();
    for (file, feed) in files {
        let text = std::fs::read_to_string(format!("tests/data/{file}")).unwrap();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: Value = serde_json::from_str(line).unwrap();
            if v.get("meta").is_some() {
                // A whole empty-page envelope that still carries `next`: the quirk must end the window.
                let page = wire::parse_page(feed, line.as_bytes()).unwrap();
                assert!(page.records.is_empty() && page.next.is_some() && page.is_last());
                continue;
            }
            out.push((feed, v));
        }
    }
    let xsoar: Value =
        serde_json::from_str(&std::fs::read_to_string("tests/data/xsoar_audit_raw_response.json").unwrap()).unwrap();
    out.push((Feed::Audit, xsoar["data"][0].clone()));
    let samples: Value =
        serde_json::from_str(&std::fs::read_to_string("tests/data/datadog_pipeline_samples.json").unwrap()).unwrap();
    for s in samples.as_array().unwrap() {
        let feed = Feed::from_name(s["service"].as_str().unwrap()).unwrap();
        out.push((feed, serde_json::from_str(s["sample"].as_str().unwrap()).unwrap()));
    }
    out
}

#[test]
fn every_fixture_record_is_queued_verbatim() {
    let rig = Rig::new();
    let fixtures = fixture_records();
    assert!(fixtures.len() > 50, "{} fixture records", fixtures.len());
    for (feed, v) in &fixtures {
        rig.mc.add(*feed, [v.clone()]);
    }
    rig.dd.refuse_connections(true); // Keep everything in the queue to inspect it.
    let out = rig.once(&rig.config(&[("mimecast", SIX_YEARS)]));
    let queued = rig.queued();
    assert_eq!(out.queued as usize, queued.len());
    let mut want: HashMap<(Feed, String), usize> = HashMap::new();
    for (feed, v) in &fixtures {
        *want.entry((*feed, v.to_string())).or_default() += 1;
    }
    // Records identical in every field are one record (a record's identity is its whole content).
    assert_eq!(queued.len(), want.len());
    for q in &queued {
        let v: Value = serde_json::from_str(&q.body).unwrap();
        assert_eq!(v.to_string(), q.body, "stored compact");
        assert!(want.contains_key(&(q.feed, q.body.clone())), "{} record not equal to any fixture: {}", q.feed, q.body);
    }
}

#[test]
fn six_feeds_over_many_pages_are_queued_and_delivered_exactly_once() {
    let rig = Rig::new();
    let expected = rig.add_records(&Feed::ALL, 730, 300);
    let out = rig.once(&rig.config(&[("mimecast", "page_size = 50")]));
    assert_eq!(out.queued, 0);
    assert_delivered_once(&rig.dd, &expected);
    // Every page of a window repeats the first page's filter exactly; only the page token changes.
    let log = rig.mc.requests();
    let mut pages_by_filter: HashMap<String, usize> = HashMap::new();
    for r in &log {
        let f = r.filter.as_ref().unwrap().to_string();
        if r.page_token.is_some() {
            assert!(pages_by_filter.contains_key(&f), "a follow-up page with a new filter: {f}");
        }
        *pages_by_filter.entry(f).or_default() += 1;
    }
    assert!(log.len() > 6 * 730 / 50, "{} requests", log.len());
}

#[test]
fn a_dropped_connection_mid_window_resumes_at_the_same_page() {
    let rig = Rig::new();
    let expected = rig.add_records(&[Feed::TtpUrl], 500, 300);
    rig.mc.fault_after(Some(Feed::TtpUrl), 3, Fault::Drop);
    rig.mc.fault_after(Some(Feed::TtpUrl), 5, Fault::Status(503));
    let out = rig.once(&rig.config(&[("mimecast", "page_size = 40\nlog_types = [\"ttp-url\"]")]));
    assert_eq!(out.queued, 0);
    assert_delivered_once(&rig.dd, &expected);
    let log = rig.mc.requests();
    let failed: Vec<_> = log.iter().enumerate().filter(|(_, r)| r.status != 200).map(|(i, _)| i).collect();
    assert_eq!(failed.len(), 2);
    for i in failed {
        assert_eq!(log[i].page_token, log[i + 1].page_token, "the retry asks for the same page");
        assert_eq!(log[i].filter, log[i + 1].filter);
    }
}

/// One `--once` pass over `feeds` (DLP among them), on a clock the test moves; then Mimecast shows a DLP record
/// 30 s behind the watermark: its window was read before it was indexed.
struct Late {
    cfg: mimecast_forwarder::config::Config,
    offset: Arc<AtomicI64>,
    tuning: Tuning,
    expected: HashMap<String, Feed>,
    watermark: i64,
}

fn once_then_a_record_indexed_late(rig: &Rig, feeds: &[Feed]) -> Late {
    let mut expected = rig.add_records(feeds, 50, 300);
    let names: Vec<String> = feeds.iter().map(|f| format!("{:?}", f.name())).collect();
    let cfg = rig.config(&[("mimecast", &format!("log_types = [{}]", names.join(", ")))]);
    let offset = Arc::new(AtomicI64::new(0));
    let tuning = Tuning { clock: Clock::shifted(offset.clone()), ..fast_tuning() };
    rig.once_with(&cfg, &tuning);
    let watermark = rig.store().cursor(Feed::Dlp).unwrap().unwrap().watermark;
    let late = mimecast_forwarder::sim::records::generate(Feed::Dlp, 9999, watermark - 30, 300);
    expected.insert(wire::record_key(Feed::Dlp, &late), Feed::Dlp);
    rig.mc.add(Feed::Dlp, [late]);
    Late { cfg, offset, tuning, expected, watermark }
}

#[test]
fn a_record_indexed_late_inside_the_overlap_is_queued_once() {
    let rig = Rig::new();
    let late = once_then_a_record_indexed_late(&rig, &[Feed::Dlp, Feed::Audit]);
    late.offset.store(5, Ordering::SeqCst); // Time passes, so that a next window exists.
    rig.once_with(&late.cfg, &late.tuning);
    late.offset.store(10, Ordering::SeqCst);
    rig.once_with(&late.cfg, &late.tuning);
    assert_delivered_once(&rig.dd, &late.expected);
}

/// Mimecast filters some records on a time hours after the one their own field says (its time-zone-lag bug: a US
/// tenant's local time labelled `+0000` reads 5-8 h old). Every window that overlaps the one that returned such a
/// record returns it again, so its seen key must outlive them all, not only its own time: over the overlapping
/// windows of a pass and over three passes that each read the last overlap again, each is delivered once.
#[test]
fn records_filtered_hours_after_their_own_time_are_delivered_once_across_overlapping_windows() {
    let rig = Rig::new();
    let now = mimecast_forwarder::datetime::now();
    let lag = 6 * 3600;
    let mut expected = HashMap::new();
    for feed in [Feed::Audit, Feed::TtpUrl] {
        // Spread over the first pass's five windows of 1800 s, one in each 60 s overlap of two of them, and three in
        // the last window's overlap, which the next passes read again.
        let times = (0..100).map(|i| now - 7100 + i * 71).chain([now - 30, now - 20, now - 10]);
        let recs: Vec<(i64, Value)> = times
            .enumerate()
            .map(|(i, t)| (t, mimecast_forwarder::sim::records::generate(feed, i as u64, t - lag, 300)))
            .collect();
        for (_, r) in &recs {
            expected.insert(wire::record_key(feed, r), feed);
        }
        rig.mc.add_at(feed, recs);
    }
    let cfg = rig.config(&[("mimecast", "log_types = [\"audit\", \"ttp-url\"]")]);
    let offset = Arc::new(AtomicI64::new(0));
    let tuning = Tuning { clock: Clock::shifted(offset.clone()), ..fast_tuning() };
    for pass in 0..3 {
        offset.store(pass * 5, Ordering::SeqCst); // Time passes, so that a next window exists.
        assert_eq!(rig.once_with(&cfg, &tuning).queued, 0);
    }
    assert_delivered_once(&rig.dd, &expected);
    // Mimecast did return them again: the overlaps inside the first pass, and the last overlap in each pass after.
    let served: usize = rig.mc.requests().iter().map(|r| r.records).sum();
    assert!(served >= expected.len() + 2 * (4 + 3 * 2), "{served} records served for {} distinct", expected.len());
}

/// A `--once` pass that starts before anything new has settled (cron right after a crash, or two passes in a
/// row) still reads the overlap behind the watermark: a record indexed late there is not left for a later pass.
#[test]
fn a_once_pass_with_nothing_new_settled_reads_what_was_indexed_late_behind_the_watermark() {
    let rig = Rig::new();
    let late = once_then_a_record_indexed_late(&rig, &[Feed::Dlp]);
    // The clock stands where the first pass left the watermark (settle_secs = 1): no new window has settled.
    late.offset.store(late.watermark + 1 - mimecast_forwarder::datetime::now(), Ordering::SeqCst);
    let asked = rig.mc.requests().len();
    let out = rig.once_with(&late.cfg, &late.tuning);
    assert_eq!(out.queued, 0);
    assert_delivered_once(&rig.dd, &late.expected);
    assert!(rig.mc.requests().len() > asked, "the second pass read the overlap");
    let watermark = rig.store().cursor(Feed::Dlp).unwrap().unwrap().watermark;
    assert_eq!(watermark, late.watermark, "and left the watermark where it was");
}

#[test]
fn a_truncated_or_malformed_page_is_retried_not_lost() {
    let rig = Rig::new();
    let expected = rig.add_records(&[Feed::TtpAttachment], 120, 300);
    rig.mc.fault_after(Some(Feed::TtpAttachment), 1, Fault::Truncated);
    let out = rig.once(&rig.config(&[("mimecast", "page_size = 50\nlog_types = [\"ttp-attachment-protection\"]")]));
    assert_eq!(out.queued, 0);
    assert_delivered_once(&rig.dd, &expected);
    let log = rig.mc.requests();
    assert_eq!(log[1].page_token, log[2].page_token, "the truncated page is asked again");
}

#[test]
fn a_page_that_repeats_its_own_token_is_an_error_not_a_loop() {
    let rig = Rig::new();
    let expected = rig.add_records(&[Feed::Dlp], 120, 300);
    rig.mc.fault_after(Some(Feed::Dlp), 1, Fault::RepeatToken);
    let cfg = rig.config(&[("mimecast", "page_size = 50\nmax_window_secs = 7400\nlog_types = [\"dlp\"]")]);
    assert_eq!(rig.once(&cfg).queued, 0);
    assert_delivered_once(&rig.dd, &expected);
    let log = rig.mc.requests();
    assert_eq!(log[1].page_token, log[2].page_token, "the page is asked again after the error");
    assert!(log.len() <= 6, "{} requests", log.len());
}

/// Guards: a Mimecast that answers every page with the same records and a `next` it never handed out before was
/// followed for ever (thousands of requests a minute, the window never ending, `run --once` never ending, nothing
/// above debug in the log and "OK" in `status`). Now the page that repeats the one before is an error: the pass
/// ends with 69 after a few requests, and the log and `status` name the loop.
#[test]
fn the_same_records_under_new_page_tokens_end_the_once_pass_with_the_loop_in_status() {
    let rig = Rig::new();
    rig.add_records(&[Feed::TtpUrl, Feed::Audit], 40, 300);
    rig.mc.set_always(Some(Fault::SameRecordsNewToken));
    let path = write_config(&rig, &[("mimecast", "page_size = 10\nlog_types = [\"ttp-url\", \"audit\"]")]);
    let p = path.to_str().unwrap();
    let mut child = cmd(&["run", "--once", "--config", p]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn_daemon();
    let log = stderr_lines(&mut child);
    // Each feed reads its empty windows and the first page of the one with records, then fails three times on the
    // next: a few dozen requests at most. An endless pass fails the test as soon as it has made many more.
    const BOUND: usize = 30;
    let mut exit = None;
    wait_for("the pass to end or to pass its bound of requests", RUN_LIMIT, || {
        exit = child.try_wait().unwrap();
        exit.is_some() || rig.mc.requests().len() > 10 * BOUND
    });
    let n = rig.mc.requests().len();
    let exit = exit.unwrap_or_else(|| panic!("run --once had not ended after {n} requests"));
    assert!(n <= BOUND, "{n} requests");
    assert_eq!(exit.code(), Some(69), "a feed gave up this pass: {}", log.lock().unwrap());
    let status = status_json(p);
    for feed in [Feed::TtpUrl, Feed::Audit] {
        let err = status["feeds"][feed.name()]["last_error"].as_str().unwrap_or_default();
        assert!(
            err.starts_with("Mimecast sent the same 10 records again with a new page token")
                && err.contains("a pagination loop"),
            "{feed}: {status}"
        );
    }
    let log = log.lock().unwrap();
    let warned = |feed: Feed| {
        log.lines().any(|l| {
            (l.contains(" WARN ") || l.contains(" ERROR ")) && l.contains(&format!("] {feed}: Mimecast sent the same"))
        })
    };
    assert!(warned(Feed::TtpUrl) && warned(Feed::Audit), "{log}");
}

/// Guards: a watermark later than the clock (the clock had been hours ahead when the feed was read, then NTP
/// stepped it back) made the feed wait, reading nothing, until the clock caught up with it: `--once` read a window
/// entirely in the future, `status` said OK with the watermark "-7179s ago", and once the clock reached the
/// watermark, reading resumed at the watermark less the overlap, so the records that came in between were never
/// asked for. Now the window is planned from the clock, the watermark moves back, and the log and `status` say that
/// the clock went back.
#[test]
fn a_watermark_hours_in_the_future_is_read_again_from_the_clock_and_said() {
    let rig = Rig::new();
    let path = write_config(&rig, &[("mimecast", "overlap_secs = 900\nlog_types = [\"ttp-url\", \"audit\"]")]);
    let p = path.to_str().unwrap();
    let mut expected = rig.add_records(&[Feed::TtpUrl, Feed::Audit], 50, 300);
    let (code, _, err) = run(&["run", "--once", "--config", p]);
    assert_eq!(code, 0, "{err}");
    // As the repro does: ttp-url was read by a clock two hours ahead.
    let db = rusqlite::Connection::open(rig.db_path()).unwrap();
    db.execute("UPDATE cursor SET watermark = watermark + 7200 WHERE feed = 'ttp-url'", []).unwrap();
    drop(db);
    let ahead = rig.store().cursor(Feed::TtpUrl).unwrap().unwrap().watermark;
    // Since then, Mimecast has had the records of the last ten minutes.
    let now = mimecast_forwarder::datetime::now();
    let recent: Vec<Value> =
        (0..40).map(|i| records::generate(Feed::TtpUrl, 1_000 + i, now - 600 + i as i64 * 14, 300)).collect();
    expected.extend(recent.iter().map(|r| (wire::record_key(Feed::TtpUrl, r), Feed::TtpUrl)));
    rig.mc.add(Feed::TtpUrl, recent);
    let asked = rig.mc.requests().len();

    let (code, _, err) = run(&["run", "--once", "--config", p]);
    let end = mimecast_forwarder::datetime::now();
    assert_eq!(code, 0, "{err}");
    assert_delivered_once(&rig.dd, &expected);
    // Every window ends no later than the clock less settle_secs (the rig's 1 s), and the watermark moved back.
    let horizon = end - 1;
    let spec = Feed::TtpUrl.spec();
    for r in rig.mc.requests()[asked..].iter().filter(|r| r.feed == Some(Feed::TtpUrl)) {
        let to =
            r.filter.as_ref().and_then(|f| f[spec.to_field].as_str()).and_then(mimecast_forwarder::datetime::parse);
        assert!(to.is_some_and(|to| to <= horizon), "a window ending in the future: {:?}", r.filter);
    }
    let watermark = rig.store().cursor(Feed::TtpUrl).unwrap().unwrap().watermark;
    assert!(now - 1 <= watermark && watermark <= horizon, "watermark {watermark}, now {now}");
    let warned = err.lines().filter(|l| l.contains(" WARN ") && l.contains("] ttp-url: the clock went back")).count();
    assert_eq!(warned, 1, "{err}");
    assert!(err.contains(&format!("read up to {}", mimecast_forwarder::datetime::rfc3339(ahead))), "{err}");
    let status = status_json(p);
    let said = status["feeds"]["ttp-url"]["last_error"].as_str().unwrap_or_default();
    assert!(said.starts_with("the clock went back"), "{status}");
    assert!(status["feeds"]["audit"]["last_error"].is_null(), "{status}");
    let (code, text, _) = run(&["status", "--config", p]);
    assert_eq!(code, 0);
    assert!(text.starts_with("ATTENTION") && text.contains("feed ttp-url (at "), "{text}");
    assert!(!text.contains("in the future)"), "the watermark is back behind the clock: {text}");
}

/// Guards: an appliance whose clock read 1970 at boot (a dead hardware clock, before NTP set it) polled by it, which
/// moved the watermark back to 1970; once the clock was set, the feed caught up from 1970 a `max_window_secs` at a
/// time (for the default hour, ~490,000 requests, ~49 h of the API user's quota), new records waiting meanwhile,
/// and `status` said OK. Now nothing is done by a clock before 2026: `--once` does nothing and says to try again
/// later, the daemon polls nothing, writes no cursor and delivers nothing, `status` says why, and once the clock is
/// set the feed goes on from its stored watermark and the queue is delivered.
#[test]
fn a_clock_that_reads_1970_polls_nothing_and_the_feed_goes_on_from_its_watermark_once_it_is_set() {
    use mimecast_forwarder::agent::{self, ClockUnset, Mode};
    use mimecast_forwarder::datetime;
    let rig = Rig::new();
    let mut expected = rig.add_records(&[Feed::Audit], 50, 300);
    let cfg = rig.config(&[("mimecast", "log_types = [\"audit\"]")]);
    let offset = Arc::new(AtomicI64::new(0));
    let tuning = Tuning { clock: Clock::shifted(offset.clone()), ..fast_tuning() };
    assert_eq!(rig.once_with(&cfg, &tuning).queued, 0);
    let watermark = rig.store().cursor(Feed::Audit).unwrap().unwrap().watermark;
    // A record polled before the reboot, not delivered yet.
    let now = datetime::now();
    let waiting = records::generate(Feed::Audit, 5_000, now - 100, 300);
    expected.extend(crate::common::queue_direct(&rig, Feed::Audit, &[waiting]));
    // Queued straight into the store, as a page of the window [0, 0]: the watermark is put back.
    let db = rusqlite::Connection::open(rig.db_path()).unwrap();
    db.execute("UPDATE cursor SET watermark = ?1 WHERE feed = 'audit'", [watermark]).unwrap();
    drop(db);
    let asked = rig.mc.requests().len();

    // The clock reads 1970-01-02.
    let day_two = 86_400;
    offset.store(day_two - now, Ordering::SeqCst);
    let said = "before 2026-01-01T00:00:00Z: not polling Mimecast nor delivering to Datadog until the clock is set (is NTP running?)";
    // `--once` does nothing at all (main exits 75 on this error), not even deliver.
    let (c, t) = (cfg.clone(), tuning.clone());
    let once = std::thread::spawn(move || smol::block_on(agent::run(&c, &t, Mode::Once, std::future::pending())));
    let e = once.join().unwrap().expect_err("a pass by a clock that is not set yet does nothing");
    assert!(e.downcast_ref::<ClockUnset>().is_some(), "{e:#}");
    assert!(e.to_string().starts_with("the system clock reads 1970-01-02T00:00:") && e.to_string().ends_with(said));
    assert_eq!(rig.queued().len(), 1, "nothing was delivered");
    // The daemon polls nothing, and delivers nothing (by this clock the record would be restamped to 1970, which
    // Datadog drops as too old), however many poll intervals (1 s) pass.
    let delivered = rig.dd.accepted().len();
    let start = std::time::Instant::now();
    let stop = async {
        while start.elapsed() < RUN_IDLE {
            smol::Timer::after(Duration::from_millis(20)).await;
        }
    };
    smol::block_on(agent::run(&cfg, &tuning, Mode::Daemon, stop)).unwrap();
    assert_eq!((rig.dd.accepted().len(), rig.queued().len()), (delivered, 1), "the record waits in the queue");
    assert_eq!(rig.mc.requests().len(), asked, "no request to Mimecast by a clock that reads 1970");
    assert_eq!(rig.store().cursor(Feed::Audit).unwrap().unwrap().watermark, watermark);
    let by_1970 = day_two + 5;
    let report = mimecast_forwarder::status::gather(&rig.store(), &cfg, by_1970).unwrap().by_clock(by_1970);
    let text = mimecast_forwarder::status::render(&report, by_1970);
    assert!(
        text.starts_with("ATTENTION:\n  - the system clock reads 1970-01-02T00:00:") && text.contains(said),
        "{text}"
    );

    // The clock is set: the feed goes on from its watermark, in one window, not from 1970, and the queue goes.
    offset.store(0, Ordering::SeqCst);
    let recent: Vec<Value> =
        (0..10).map(|i| records::generate(Feed::Audit, 6_000 + i, now - 50 + i as i64, 300)).collect();
    expected.extend(recent.iter().map(|r| (wire::record_key(Feed::Audit, r), Feed::Audit)));
    rig.mc.add(Feed::Audit, recent);
    assert_eq!(rig.once_with(&cfg, &tuning).queued, 0);
    assert_delivered_once(&rig.dd, &expected);
    let spec = Feed::Audit.spec();
    let since: Vec<_> = rig.mc.requests()[asked..].iter().filter(|r| r.filter.is_some()).cloned().collect();
    assert!(!since.is_empty() && since.len() <= 3, "{} page requests", since.len());
    for r in since {
        let from = r.filter.as_ref().and_then(|f| f[spec.from_field].as_str()).and_then(datetime::parse);
        assert!(from.is_some_and(|from| from >= watermark - 60), "a window from before the watermark: {:?}", r.filter);
    }
    let text = mimecast_forwarder::status::render(
        &mimecast_forwarder::status::gather(&rig.store(), &cfg, datetime::now()).unwrap().by_clock(datetime::now()),
        datetime::now(),
    );
    assert!(text.starts_with("OK"), "{text}");
}

/// The daemon of the test above runs this long by a clock that reads 1970: a few of its poll intervals (1 s).
const RUN_IDLE: Duration = Duration::from_millis(3_500);

/// The same with the real binary, when libfaketime's `faketime` is installed to set its clock to 1970: `run --once`
/// exits 75 and says why, writing nothing, and `status` lists it under ATTENTION.
#[test]
fn the_binary_by_a_clock_that_reads_1970_exits_75_and_status_says_why() {
    if std::process::Command::new("faketime").arg("--help").stdout(Stdio::null()).status().is_err() {
        eprintln!("faketime is not installed: skipped");
        return;
    }
    let by_1970 = |args: &[&str]| {
        let base = cmd(args);
        let mut c = std::process::Command::new("faketime");
        c.args(["-f", "@1970-01-02 00:00:00", crate::common::bin::BIN]).args(base.get_args()).stdin(Stdio::null());
        for (k, v) in base.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        crate::common::bin::output_within(c, RUN_LIMIT)
    };
    let rig = Rig::new();
    rig.add_records(&[Feed::Audit], 20, 300);
    let path = write_config(&rig, &[("mimecast", "log_types = [\"audit\"]")]);
    let p = path.to_str().unwrap();
    let (code, _, err) = run(&["run", "--once", "--config", p]);
    assert_eq!(code, 0, "{err}");
    let watermark = rig.store().cursor(Feed::Audit).unwrap().unwrap().watermark;
    let (asked, modified) = (rig.mc.requests().len(), std::fs::metadata(rig.db_path()).unwrap().modified().unwrap());
    let said = "before 2026-01-01T00:00:00Z: not polling Mimecast nor delivering to Datadog until the clock is set (is NTP running?)";

    let (code, _, err) = by_1970(&["run", "--once", "--config", p]);
    assert_eq!(code, 75, "{err}");
    let line = err.lines().find(|l| l.contains(" ERROR ") && l.contains("the system clock reads 1970-01-02T00:00:"));
    assert!(line.is_some_and(|l| l.ends_with(said)), "{err}");
    assert_eq!(rig.mc.requests().len(), asked);
    assert_eq!(std::fs::metadata(rig.db_path()).unwrap().modified().unwrap(), modified, "the queue was not written");
    assert_eq!(rig.store().cursor(Feed::Audit).unwrap().unwrap().watermark, watermark);
    let (code, text, err) = by_1970(&["status", "--config", p]);
    assert_eq!(code, 0, "{err}");
    assert!(
        text.starts_with("ATTENTION:\n  - the system clock reads 1970-01-02T00:00:") && text.contains(said),
        "{text}"
    );
    let (code, text, _) = run(&["status", "--config", p]);
    assert_eq!(code, 0);
    assert!(text.starts_with("OK"), "by the right clock: {text}");
}

#[test]
fn a_429_waits_at_least_the_reset_time() {
    let rig = Rig::new();
    let expected = rig.add_records(&[Feed::Audit], 30, 300);
    rig.mc.fault(Some(Feed::Audit), Fault::RateLimit("700".into()));
    rig.once(&rig.config(&[("mimecast", "log_types = [\"audit\"]")]));
    assert_delivered_once(&rig.dd, &expected);
    let log = rig.mc.requests();
    assert_eq!(log[0].status, 429);
    let waited = log[1].at - log[0].at;
    assert!(waited >= Duration::from_millis(700), "retried after {waited:?}");
}

#[test]
fn fail_on_http_200_is_retried_not_read_as_an_empty_page() {
    let rig = Rig::new();
    let expected = rig.add_records(&[Feed::Dlp], 30, 300);
    rig.mc.fault(Some(Feed::Dlp), Fault::FailOk { retryable: true });
    rig.once(&rig.config(&[("mimecast", "log_types = [\"dlp\"]")]));
    assert_delivered_once(&rig.dd, &expected);
    let log = rig.mc.requests();
    assert_eq!((log[0].status, log[0].records), (200, 0));
    assert_eq!(log[0].filter, log[1].filter, "the same window is asked again");
}

#[test]
fn an_expired_token_is_refreshed_and_polling_continues() {
    let rig = Rig::new();
    let expected = rig.add_records(&[Feed::TtpImpersonation], 200, 300);
    rig.mc.fault_after(Some(Feed::TtpImpersonation), 2, Fault::ExpireTokens);
    rig.once(&rig.config(&[("mimecast", "page_size = 50\nlog_types = [\"ttp-impersonation\"]")]));
    assert_delivered_once(&rig.dd, &expected);
    assert_eq!(rig.mc.tokens_issued(), 2);
    assert!(rig.mc.requests().iter().any(|r| r.status == 401));
}

#[test]
fn a_feed_without_permission_is_reported_and_the_others_flow() {
    let rig = Rig::new();
    let others: Vec<Feed> = Feed::ALL.into_iter().filter(|f| *f != Feed::Dlp).collect();
    let expected = rig.add_records(&others, 40, 300);
    rig.add_records(&[Feed::Dlp], 40, 300);
    rig.mc.forbid(Feed::Dlp, true);
    let out = rig.once(&rig.config(&[]));
    assert_eq!(out.queued, 0);
    assert_delivered_once(&rig.dd, &expected);
    let cursor = rig.store().cursor(Feed::Dlp).unwrap().unwrap();
    let err = cursor.last_error.unwrap();
    assert!(err.contains("403") && err.contains("Monitoring | Data Leak Prevention | Read"), "{err}");
}

/// `[mimecast.feeds.ttp-url]`: the busy feed polls under an API application of its own (its own quota), the
/// others under `[mimecast]`'s; one token per application; a refused application stops only its own feeds.
#[test]
fn a_feed_with_its_own_credentials_polls_under_them_and_only_it_is_stopped_when_they_are_refused() {
    use mimecast_forwarder::sim::mimecast::CLIENT_ID;
    let rig = Rig::new();
    rig.mc.add_app("url-app", "url-secret");
    let expected = rig.add_records(&Feed::ALL, 40, 300);
    let own = "feeds = { ttp-url = { client_id = \"url-app\", client_secret = \"url-secret\" } }";
    let out = rig.once(&rig.config(&[("mimecast", own)]));
    assert_eq!(out.queued, 0);
    assert_delivered_once(&rig.dd, &expected);
    let requests = rig.mc.requests();
    for r in &requests {
        let want = if r.feed == Some(Feed::TtpUrl) { "url-app" } else { CLIENT_ID };
        assert_eq!(r.client.as_deref(), Some(want), "{:?} polled under the wrong application", r.feed);
    }
    assert_eq!(rig.mc.tokens_issued(), 2, "one token per application, shared by its feeds");

    // The feed's own secret is wrong: that feed reports it, the others go on under theirs.
    let rig = Rig::new();
    rig.mc.add_app("url-app", "the-right-one");
    let others: Vec<Feed> = Feed::ALL.into_iter().filter(|f| *f != Feed::TtpUrl).collect();
    let expected = rig.add_records(&others, 40, 300);
    rig.add_records(&[Feed::TtpUrl], 40, 300);
    rig.once(&rig.config(&[("mimecast", own)]));
    assert_delivered_once(&rig.dd, &expected);
    let cursor = rig.store().cursor(Feed::TtpUrl).unwrap().unwrap();
    let err = cursor.last_error.unwrap();
    assert!(err.contains("/oauth/token") && err.contains("401") && !err.contains("url-secret"), "{err}");
    assert!(cursor.window.is_none() && cursor.last_success.is_none());
}

#[test]
fn bad_credentials_are_reported_without_the_secret_and_nothing_moves() {
    let rig = Rig::new();
    rig.add_records(&[Feed::Audit], 10, 300);
    rig.mc.set_client_secret("the-right-one");
    rig.once(&rig.config(&[("mimecast", "log_types = [\"audit\"]")]));
    let cursor = rig.store().cursor(Feed::Audit).unwrap().unwrap();
    let err = cursor.last_error.unwrap();
    assert!(err.contains("/oauth/token") && err.contains("401"), "{err}");
    assert!(!err.contains(mimecast_forwarder::sim::mimecast::CLIENT_SECRET));
    assert!(cursor.window.is_none() && cursor.last_success.is_none());
    assert_eq!(rig.dd.accepted_count(), 0);
}

#[test]
fn flat_rejections_are_accepted_too() {
    let rig = Rig::new();
    let expected = rig.add_records(&[Feed::Rejection], 60, 300);
    rig.mc.set_rejection_flat(true);
    rig.once(&rig.config(&[("mimecast", "log_types = [\"rejection\"]")]));
    assert_delivered_once(&rig.dd, &expected);
}

#[test]
fn a_full_queue_pauses_polling_without_moving_the_cursor() {
    let rig = Rig::new();
    let expected = rig.add_records(&[Feed::TtpUrl], 300, 1000);
    let cfg = rig.config(&[("mimecast", "page_size = 20\nlog_types = [\"ttp-url\"]"), ("queue", "max_bytes = 30000")]);
    rig.dd.refuse_connections(true);
    let out = rig.once(&cfg);
    let c = rig.store().counters().unwrap();
    assert!(out.queued > 0 && (out.queued as usize) < 300, "{} queued", out.queued);
    assert!(c.queue_bytes >= 30000 && c.queue_bytes < 30000 + 20 * 1100, "{} bytes", c.queue_bytes);
    assert_eq!(c.dropped, 0);
    let requests_when_full = rig.mc.requests().len();
    let cursor = rig.store().cursor(Feed::TtpUrl).unwrap().unwrap();
    assert!(cursor.last_success.is_none(), "the first window did not complete");
    // Datadog back: the queue drains, polling resumes, and everything arrives once.
    rig.dd.refuse_connections(false);
    let out = rig.once(&cfg);
    assert_eq!(out.queued, 0);
    assert_delivered_once(&rig.dd, &expected);
    assert!(rig.mc.requests().len() > requests_when_full);
}

#[test]
fn drop_oldest_drops_and_counts_every_drop() {
    let rig = Rig::new();
    rig.add_records(&[Feed::TtpUrl], 300, 1000);
    let cfg = rig.config(&[
        ("mimecast", "page_size = 50\nlog_types = [\"ttp-url\"]"),
        ("queue", "max_bytes = 30000\nwhen_full = \"drop-oldest\""),
    ]);
    rig.dd.refuse_connections(true);
    rig.once(&cfg);
    let c = rig.store().counters().unwrap();
    assert!(c.queue_bytes <= 30000, "{}", c.queue_bytes);
    assert!(c.dropped > 0);
    assert_eq!(c.dropped + c.queue_records, 300, "every record is either queued or counted as dropped");
    let cursor = rig.store().cursor(Feed::TtpUrl).unwrap().unwrap();
    assert!(cursor.last_success.is_some(), "drop-oldest keeps polling");
}

/// `drop-oldest` never drops a record in flight to Datadog: Datadog has it, so it is delivered, not dropped. The
/// intake holds the first batch until polling has caught up (answering the others slowly), while pages keep
/// arriving over a limit that the batch in flight alone fills; then every record Datadog received is counted
/// delivered, none dropped, and each record queued is counted once: delivered, dropped or still queued.
#[test]
fn drop_oldest_never_drops_a_record_in_flight() {
    let rig = Rig::new();
    let all = rig.add_records(&[Feed::TtpUrl], 300, 1000);
    let cfg = rig.config(&[
        ("mimecast", "page_size = 50\nlog_types = [\"ttp-url\"]"),
        ("queue", "max_bytes = 30000\nwhen_full = \"drop-oldest\""),
        ("http", "timeout_secs = 300"),
    ]);
    rig.dd.fault(dd::Fault::Hold);
    rig.dd.set_latency(Duration::from_millis(20));
    let started = mimecast_forwarder::datetime::now();
    let out = std::thread::scope(|s| {
        s.spawn(|| {
            let caught_up = poll_until(Duration::from_secs(60), || {
                let Ok(store) = Store::open_read_only(&rig.db_path()) else { return false };
                let cursor = store.cursor(Feed::TtpUrl).ok().flatten();
                rig.dd.held() == 1 && cursor.is_some_and(|c| c.window.is_none() && c.watermark >= started - 1)
            });
            let held = rig.dd.held();
            rig.dd.release(); // Whatever happened: the pass can then end, and the test fails at once.
            assert!(caught_up, "polling did not catch up while the first batch was held ({held} held)");
        });
        rig.once(&cfg)
    });
    assert_eq!(out.queued, 0);
    let c = rig.store().counters().unwrap();
    let received = dd::record_keys(&rig.dd.accepted());
    assert!(received.keys().all(|k| all.contains_key(k)), "a record that was never served");
    assert!(received.values().all(|n| *n == 1), "a record received twice");
    assert!(c.dropped > 0, "the queue never overflowed");
    assert_eq!(c.delivered as usize, received.len(), "every record Datadog received is counted delivered");
    assert_eq!(c.delivered + c.dropped + c.dead_letters + c.queue_records, 300, "each record counted once: {c:?}");
}

#[test]
fn a_hanging_feed_holds_up_no_other_feed() {
    let rig = Rig::new();
    let audit = rig.add_records(&[Feed::Audit], 50, 300);
    let others = rig.add_records(&[Feed::Dlp, Feed::TtpUrl], 50, 300);
    // Audit's first page request hangs until the other feeds are delivered.
    rig.mc.fault(Some(Feed::Audit), Fault::Hold);
    let cfg = rig.config(&[("http", "timeout_secs = 300")]);
    let mut held_meanwhile = None;
    run_daemon_until(
        &cfg,
        || {
            let got = dd::record_keys(&rig.dd.accepted());
            if held_meanwhile.is_none() && others.keys().all(|k| got.contains_key(k)) {
                held_meanwhile = Some(rig.mc.held());
                rig.mc.release();
            }
            held_meanwhile.is_some() && audit.keys().all(|k| got.contains_key(k))
        },
        Duration::from_secs(120),
    );
    assert_eq!(held_meanwhile, Some(1), "the other feeds were delivered while audit's page hung");
    let mut all = audit;
    all.extend(others);
    assert_delivered_once(&rig.dd, &all);
}
