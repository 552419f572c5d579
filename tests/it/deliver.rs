//! Delivering the queue to the Datadog intake simulator over real HTTP.

use std::collections::HashMap;
use std::time::Duration;

use crate::common::bin::{poll_until, wait_for};
use crate::common::{Rig, assert_delivered_once, fast_tuning, once_within, queue_direct, run_daemon_until};
use mimecast_forwarder::datetime;
use mimecast_forwarder::mimecast::{Feed, wire};
use mimecast_forwarder::sim::datadog::{self as dd, Fault};
use mimecast_forwarder::sim::records::generate;
use mimecast_forwarder::store::Note;
use serde_json::Value;

fn recent(feed: Feed, n: u64, size: usize) -> Vec<Value> {
    let now = datetime::now();
    (0..n).map(|i| generate(feed, i, now - 600 + (i as i64 % 500), size)).collect()
}

/// Queues the one sample per log type of Datadog's pipeline tests; gives back each with its `service`.
fn queue_pipeline_samples(rig: &Rig) -> Vec<(String, Value)> {
    let samples: Value =
        serde_json::from_str(&std::fs::read_to_string("tests/data/datadog_pipeline_samples.json").unwrap()).unwrap();
    let samples: Vec<(String, Value)> = samples
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (s["service"].as_str().unwrap().to_owned(), serde_json::from_str(s["sample"].as_str().unwrap()).unwrap())
        })
        .collect();
    for (service, sample) in &samples {
        queue_direct(rig, Feed::from_name(service).unwrap(), std::slice::from_ref(sample));
    }
    samples
}

#[test]
fn datadogs_own_pipeline_samples_arrive_with_every_attribute() {
    let rig = Rig::new();
    let samples = queue_pipeline_samples(&rig);
    // The samples are from 2024: keep them as they are to compare every attribute.
    let out = rig.once(&rig.config(&[("datadog", "late_records = \"keep\"")]));
    assert_eq!(out.queued, 0);
    let logs = rig.dd.accepted();
    assert_eq!(logs.len(), 6);
    for (service, sample) in &samples {
        let log =
            logs.iter().find(|l| l["service"] == service.as_str()).unwrap_or_else(|| panic!("no log for {service}"));
        assert_eq!(log["ddsource"], "mimecast");
        assert_eq!(log["hostname"], "test-host");
        assert_eq!(log["ddtags"], "env:test");
        for (k, v) in sample.as_object().unwrap() {
            assert_eq!(&log[k], v, "{service}.{k} keeps its value and JSON type");
        }
        let message: Value = serde_json::from_str(log["message"].as_str().unwrap()).unwrap();
        assert_eq!(&message, sample);
    }
    assert_eq!(rig.store().counters().unwrap().kept, 6);
}

/// `log_shape = "message"`: the record goes once, as `message`, which Datadog's intake turns into the same
/// attributes (its pipeline tests feed each sample in as the message); the log is about half the bytes.
#[test]
fn the_message_shape_sends_each_pipeline_sample_once_as_its_message() {
    let rig = Rig::new();
    let samples = queue_pipeline_samples(&rig);
    let out = rig.once(&rig.config(&[("datadog", "late_records = \"keep\"\nlog_shape = \"message\"")]));
    assert_eq!(out.queued, 0);
    let logs = rig.dd.accepted();
    assert_eq!(logs.len(), 6);
    let (mut record_bytes, mut log_bytes) = (0, 0);
    for (service, sample) in &samples {
        let log =
            logs.iter().find(|l| l["service"] == service.as_str()).unwrap_or_else(|| panic!("no log for {service}"));
        let mut keys: Vec<&str> = log.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["ddsource", "ddtags", "hostname", "message", "service"], "{service}");
        let message: Value = serde_json::from_str(log["message"].as_str().unwrap()).unwrap();
        assert_eq!(&message, sample, "{service}: every field with its JSON type, in the message");
        record_bytes += sample.to_string().len();
        log_bytes += log.to_string().len();
    }
    eprintln!("message shape: {:.2}x the records' bytes", log_bytes as f64 / record_bytes as f64);
    assert!(log_bytes < 2 * record_bytes, "{log_bytes} bytes of logs for {record_bytes} of records");
}

#[test]
fn an_outage_in_the_middle_of_a_drain_loses_nothing() {
    let rig = Rig::new();
    let mut expected = HashMap::new();
    for feed in Feed::ALL {
        expected.extend(queue_direct(&rig, feed, &recent(feed, 1667, 1000)));
    }
    let cfg = rig.config(&[]);
    let total = expected.len();
    // Each phase of the outage lasts until the agent has met it, however slow the machine.
    std::thread::scope(|s| {
        s.spawn(|| {
            wait_for("the drain to be under way", Duration::from_secs(60), || rig.dd.accepted_count() >= 2000);
            rig.dd.set_down(Some(503));
            let asked = rig.dd.requests();
            wait_for("two requests answered 503", Duration::from_secs(60), || rig.dd.requests() >= asked + 2);
            rig.dd.set_down(None);
            rig.dd.refuse_connections(true);
            let met = poll_until(Duration::from_secs(60), || {
                rig.store().note(Note::DatadogLastError).unwrap().is_some_and(|(_, e)| e.contains("connect"))
            });
            rig.dd.fault(Fault::AcceptThenDrop); // The one batch in flight that may arrive twice.
            rig.dd.refuse_connections(false);
            assert!(met, "no send met the closed port");
        });
        // Until every record arrived and the queue is empty: the batch accepted then dropped is sent again, and
        // with several in flight that may come after the last new record arrived.
        let drained =
            || dd::record_keys(&rig.dd.accepted()).len() >= total && rig.store().counters().unwrap().queue_records == 0;
        run_daemon_until(&cfg, drained, Duration::from_secs(120));
    });
    let got = dd::record_keys(&rig.dd.accepted());
    assert_eq!(got.len(), total, "every record arrived");
    assert!(expected.keys().all(|k| got.contains_key(k)));
    let dups: usize = got.values().map(|n| n - 1).sum();
    assert!(dups <= 1000, "{dups} duplicates: more than the one batch in flight");
    assert_eq!(rig.store().counters().unwrap().queue_records, 0);
}

#[test]
fn a_413_splits_and_delivers() {
    let rig = Rig::new();
    let expected = queue_direct(&rig, Feed::TtpUrl, &recent(Feed::TtpUrl, 100, 500));
    rig.dd.fault(Fault::Status(413));
    assert_eq!(rig.once(&rig.config(&[])).queued, 0);
    assert_delivered_once(&rig.dd, &expected);
    assert_eq!(rig.dd.batches().iter().map(|b| b.0).collect::<Vec<_>>(), [50, 50]);
}

/// `n` records of `feed`, each `size` bytes of JSON whose padding is random letters and digits, which gzip shrinks
/// only to about three quarters: a limit on the compressed body then bites at a known number of logs.
fn incompressible(feed: Feed, n: u64, size: usize) -> Vec<Value> {
    let mut rng = fastrand::Rng::with_seed(n);
    let pad_field = if feed == Feed::Audit { "eventInfo" } else { "subject" };
    recent(feed, n, size)
        .into_iter()
        .map(|mut r| {
            let len = r[pad_field].as_str().unwrap().len();
            r[pad_field] = Value::String((0..len).map(|_| rng.alphanumeric()).collect());
            r
        })
        .collect()
}

#[test]
fn a_proxy_limit_below_the_batch_size_is_split_down_to_and_then_packed_under() {
    // Logs of ~600 KB (each carries its 300 KB record twice), ~450 KB gzipped; behind nginx's default
    // client_max_body_size of 1m, two logs pass and three do not. A fresh batch holds 8 (5 MB).
    // One send at a time: the first batch of 8 is refused, then both its halves of 4; its pieces of 2 pass, and
    // every later batch is packed under what that taught and is never refused. Four at a time: the batches sent
    // before the first answer (all three here) and their halves, at most.
    for (in_flight, most_refused) in [(1, 3), (4, 9)] {
        let rig = Rig::new();
        let expected = queue_direct(&rig, Feed::TtpUrl, &incompressible(Feed::TtpUrl, 24, 300_000));
        rig.dd.set_max_body(Some(1 << 20));
        let out = rig.once(&rig.config(&[("datadog", &format!("sends_in_flight = {in_flight}"))]));
        assert_eq!(out.queued, 0, "{in_flight} in flight: records left queued");
        assert_delivered_once(&rig.dd, &expected);
        let c = rig.store().counters().unwrap();
        assert_eq!((c.dead_letters, c.delivered), (0, 24), "{in_flight} in flight: nothing dead-lettered");
        assert_eq!(rig.store().note(Note::DatadogLastError).unwrap(), None, "{in_flight} in flight: nothing held");
        let sizes: Vec<usize> = rig.dd.batches().iter().map(|b| b.0).collect();
        assert_eq!(sizes, [2; 12], "{in_flight} in flight: only two logs pass the proxy, and two always go");
        let refused = rig.dd.too_large();
        assert!((1..=most_refused).contains(&refused), "{in_flight} in flight: {refused} requests refused");
        if in_flight == 1 {
            assert_eq!(refused, most_refused, "one split of the first batch, then none");
        }
    }
}

#[test]
fn a_400_isolates_the_bad_log_into_dead_letters() {
    let rig = Rig::new();
    let mut recs = recent(Feed::Dlp, 200, 300);
    recs[137]["subject"] = Value::String("POISON pill".into());
    let mut expected = queue_direct(&rig, Feed::Dlp, &recs);
    expected.remove(&wire::record_key(Feed::Dlp, &recs[137]));
    rig.dd.set_poison(Some("POISON"));
    assert_eq!(rig.once(&rig.config(&[])).queued, 0);
    assert_delivered_once(&rig.dd, &expected);
    let c = rig.store().counters().unwrap();
    assert_eq!((c.dead_letters, c.delivered), (1, 199));
}

#[test]
fn two_bad_logs_in_different_halves_are_both_isolated() {
    let rig = Rig::new();
    let mut recs = recent(Feed::Dlp, 200, 300);
    // One in each half of the first split: both halves are refused alike, yet the rest must still arrive.
    for i in [20, 170] {
        recs[i]["subject"] = Value::String("POISON pill".into());
    }
    let mut expected = queue_direct(&rig, Feed::Dlp, &recs);
    for i in [20, 170] {
        expected.remove(&wire::record_key(Feed::Dlp, &recs[i]));
    }
    rig.dd.set_poison(Some("POISON"));
    let cfg = rig.config(&[]);
    // The first pass may hold after both halves were refused alike; cron would run it again.
    let mut passes = 0;
    while rig.once(&cfg).queued > 0 {
        passes += 1;
        assert!(passes < 5, "still queued after {passes} passes");
    }
    assert_delivered_once(&rig.dd, &expected);
    let c = rig.store().counters().unwrap();
    assert_eq!((c.dead_letters, c.delivered), (2, 198));
}

#[test]
fn a_persistent_400_holds_the_queue_and_dead_letters_nothing() {
    let rig = Rig::new();
    let expected = queue_direct(&rig, Feed::Audit, &recent(Feed::Audit, 300, 300));
    // A proxy or an intake change that refuses everything with 400: not one bad log.
    rig.dd.set_down(Some(400));
    let cfg = rig.config(&[]);
    // The bound is the request count and that the pass ends (a pass that never ends fails at the hang guard).
    assert_eq!(once_within(&cfg, &fast_tuning(), Duration::from_secs(60)).queued, 300);
    // The pass gives up after three holds (once_attempts), each within log2(300) + 3 requests of the first
    // refusal or of the wait before it: split down to a single log, then it and the two pieces after it refused.
    let requests = rig.dd.requests();
    assert!(requests <= 3 * (8 + 3), "{requests} requests: bisected far past the single logs");
    let c = rig.store().counters().unwrap();
    assert_eq!(c.dead_letters, 0, "nothing dead-lettered for a fault that is not in one log");
    let err = rig.store().note(Note::DatadogLastError).unwrap().unwrap().1;
    assert!(err.contains("not in one log") && err.contains("400"), "{err}");
    // A lone record refused on its own is held too, not dead-lettered.
    rig.dd.set_down(None);
    assert_eq!(rig.once(&cfg).queued, 0);
    assert_delivered_once(&rig.dd, &expected);
}

#[test]
fn a_lone_log_refused_is_held_not_dead_lettered() {
    for (status, says) in [(400, "batch of a single log (HTTP 400"), (413, "as too large (HTTP 413")] {
        let rig = Rig::new();
        let expected = queue_direct(&rig, Feed::Audit, &recent(Feed::Audit, 1, 300));
        rig.dd.set_down(Some(status));
        let cfg = rig.config(&[]);
        assert_eq!(rig.once(&cfg).queued, 1);
        assert_eq!(rig.store().counters().unwrap().dead_letters, 0);
        let err = rig.store().note(Note::DatadogLastError).unwrap().unwrap().1;
        assert!(err.contains(says) && err.contains("not dead-lettered") && !err.contains("both halves"), "{err}");
        rig.dd.set_down(None);
        assert_eq!(rig.once(&cfg).queued, 0);
        assert_delivered_once(&rig.dd, &expected);
    }
}

#[test]
fn a_refused_key_keeps_everything_until_it_is_accepted() {
    let rig = Rig::new();
    let expected = queue_direct(&rig, Feed::Audit, &recent(Feed::Audit, 300, 300));
    rig.dd.set_api_key("a-different-key");
    let cfg = rig.config(&[]);
    assert_eq!(rig.once(&cfg).queued, 300);
    assert_eq!(rig.dd.accepted_count(), 0);
    let err = rig.store().note(Note::DatadogLastError).unwrap().unwrap().1;
    assert!(err.contains("403") && err.contains("API key"), "{err}");
    assert!(!err.contains(dd::API_KEY));
    rig.dd.set_api_key(dd::API_KEY);
    assert_eq!(rig.once(&cfg).queued, 0);
    assert_delivered_once(&rig.dd, &expected);
    assert_eq!(rig.store().note(Note::DatadogLastError).unwrap(), None);
}

#[test]
fn records_20_hours_old_are_restamped_by_default() {
    let rig = Rig::new();
    let now = datetime::now();
    let recs: Vec<Value> = (0..10).map(|i| generate(Feed::TtpUrl, i, now - 20 * 3600, 300)).collect();
    queue_direct(&rig, Feed::TtpUrl, &recs);
    rig.once(&rig.config(&[]));
    let logs = rig.dd.accepted();
    assert_eq!(logs.len(), 10);
    for log in &logs {
        let ts = datetime::parse(log["timestamp"].as_str().unwrap()).unwrap();
        assert!((ts - datetime::now()).abs() < 120, "timestamp is the send time");
        assert_eq!(log["mimecast_late"], true);
        assert_eq!(log["original_date"], datetime::mimecast(now - 20 * 3600));
        assert!(log.get("date").is_none());
        let msg: Value = serde_json::from_str(log["message"].as_str().unwrap()).unwrap();
        assert_eq!(msg["original_date"], log["original_date"]);
    }
    assert_eq!(rig.store().counters().unwrap().restamped, 10);
}

#[test]
fn records_20_hours_old_go_unchanged_with_keep() {
    let rig = Rig::new();
    let now = datetime::now();
    let recs: Vec<Value> = (0..10).map(|i| generate(Feed::Audit, i, now - 20 * 3600, 300)).collect();
    queue_direct(&rig, Feed::Audit, &recs);
    rig.once(&rig.config(&[("datadog", "late_records = \"keep\"")]));
    let logs = rig.dd.accepted();
    assert_eq!(logs.len(), 10);
    for log in &logs {
        assert_eq!(log["eventTime"], datetime::mimecast(now - 20 * 3600));
        assert!(log.get("timestamp").is_none() && log.get("mimecast_late").is_none());
    }
    assert_eq!(rig.store().counters().unwrap().kept, 10);
}

#[test]
fn seeded_random_batches_keep_the_limits_and_send_each_record_once_in_order() {
    for seed in [1u64, 7, 42] {
        let rig = Rig::new();
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut sent_order: HashMap<Feed, Vec<String>> = HashMap::new();
        let mut oversize = 0;
        for feed in Feed::ALL {
            let n = rng.u64(0..900);
            let recs: Vec<Value> = (0..n)
                .map(|i| {
                    let size = match rng.u32(0..1000) {
                        0..=984 => rng.usize(200..3000),
                        985..=997 => rng.usize(100_000..480_000),
                        _ => rng.usize(500_001..700_000),
                    };
                    generate(feed, i, datetime::now() - rng.i64(0..3600), size)
                })
                .collect();
            for r in &recs {
                // The log object carries the record twice (attributes and message): over 1 MB is refused.
                if r.to_string().len() * 2 > 1_000_000 {
                    oversize += 1;
                } else {
                    sent_order.entry(feed).or_default().push(wire::record_key(feed, r));
                }
            }
            queue_direct(&rig, feed, &recs);
        }
        // One batch at a time, so that the order Datadog accepts them in is the queue's order (with several in
        // flight, batches may be accepted out of order; each keeps its own order).
        assert_eq!(rig.once(&rig.config(&[("datadog", "sends_in_flight = 1")])).queued, 0, "seed {seed}");
        let batches = rig.dd.batches();
        assert_eq!(rig.dd.requests(), batches.len(), "seed {seed}: no request was refused (no 413)");
        for (logs, bytes) in &batches {
            assert!(*logs <= 1000 && *bytes <= 5_000_000, "seed {seed}: batch of {logs} logs, {bytes} bytes");
        }
        let mut got: HashMap<Feed, Vec<String>> = HashMap::new();
        for log in rig.dd.accepted() {
            let feed = Feed::from_name(log["service"].as_str().unwrap()).unwrap();
            let rec: Value = serde_json::from_str(log["message"].as_str().unwrap()).unwrap();
            got.entry(feed).or_default().push(wire::record_key(feed, &rec));
        }
        assert_eq!(got, sent_order, "seed {seed}: each record once, in queue order per feed");
        assert_eq!(rig.store().counters().unwrap().dead_letters, oversize, "seed {seed}");
    }
}

#[test]
fn a_flood_of_url_clicks_does_not_starve_audit() {
    let rig = Rig::new();
    queue_direct(&rig, Feed::TtpUrl, &recent(Feed::TtpUrl, 3000, 300));
    queue_direct(&rig, Feed::Audit, &recent(Feed::Audit, 5, 300));
    // One batch at a time: with several in flight, the first built need not be the first to arrive.
    rig.once(&rig.config(&[("datadog", "sends_in_flight = 1")]));
    let first_batch: Vec<Value> = rig.dd.accepted().into_iter().take(rig.dd.batches()[0].0).collect();
    let audits = first_batch.iter().filter(|l| l["service"] == "audit").count();
    assert_eq!(audits, 5, "the audit records ride in the first batch");
}

#[test]
fn a_stalled_datadog_does_not_stall_polling() {
    let rig = Rig::new();
    let expected = rig.add_records(&Feed::ALL, 100, 300);
    // The first send is held until every feed has been polled and queued; the HTTP timeout is far above the
    // test, so the agent does not give up on that send meanwhile.
    // One send at a time: the held one is then the only one (several in flight are the subject of other tests).
    rig.dd.fault(Fault::Hold);
    let cfg = rig.config(&[("http", "timeout_secs = 300"), ("datadog", "sends_in_flight = 1")]);
    std::thread::scope(|s| {
        s.spawn(|| {
            let polled = poll_until(Duration::from_secs(60), || {
                rig.dd.held() == 1 && rig.mc.requests().len() >= 6 && rig.queued().len() >= 600
            });
            let intake = (rig.dd.held(), rig.dd.requests(), rig.dd.accepted_count());
            rig.dd.release(); // Whatever happened: the daemon can then finish, and the test fails at once.
            assert!(polled, "the feeds were not all polled and queued while the send was held");
            assert_eq!(intake, (1, 1, 0), "the send was still held, the only one, with nothing accepted");
        });
        run_daemon_until(
            &cfg,
            || dd::record_keys(&rig.dd.accepted()).len() >= expected.len(),
            Duration::from_secs(120),
        );
    });
    assert_delivered_once(&rig.dd, &expected);
}

#[test]
fn a_stalled_mimecast_does_not_stall_delivery() {
    let rig = Rig::new();
    let expected = queue_direct(&rig, Feed::Dlp, &recent(Feed::Dlp, 500, 300));
    // The first page request is held until the whole queue has been delivered.
    rig.mc.fault(None, mimecast_forwarder::sim::mimecast::Fault::Hold);
    let cfg = rig.config(&[("http", "timeout_secs = 300")]);
    run_daemon_until(
        &cfg,
        || {
            let delivered = rig.dd.accepted_count() >= 500;
            if delivered {
                assert_eq!(rig.mc.held(), 1, "delivered, but not while the page request was held");
                rig.mc.release();
            }
            delivered
        },
        Duration::from_secs(120),
    );
    assert_delivered_once(&rig.dd, &expected);
}

#[test]
fn an_intake_that_starts_refusing_everything_mid_bisection_dead_letters_nothing() {
    let rig = Rig::new();
    let expected = queue_direct(&rig, Feed::Audit, &recent(Feed::Audit, 8, 300));
    // The batch of 8 is refused, its first half accepted, then the intake refuses every piece that follows
    // (a proxy, an intake change): B, B1, B2, and the four single logs of B.
    rig.dd.fault(Fault::Status(400));
    rig.dd.fault(Fault::Delay(Duration::ZERO));
    for _ in 0..7 {
        rig.dd.fault(Fault::Status(400));
    }
    let cfg = rig.config(&[]);
    let mut passes = 0;
    while rig.once(&cfg).queued > 0 {
        passes += 1;
        assert!(passes < 5, "still queued after {passes} passes");
    }
    assert_eq!(rig.store().counters().unwrap().dead_letters, 0, "good logs were dead-lettered");
    assert_delivered_once(&rig.dd, &expected);
}

#[test]
fn several_batches_are_in_flight_at_once_and_each_record_is_sent_once() {
    let rig = Rig::new();
    let expected = queue_direct(&rig, Feed::TtpUrl, &recent(Feed::TtpUrl, 3500, 300));
    // The first three sends are held: all three must be in flight together before any is answered.
    for _ in 0..3 {
        rig.dd.fault(Fault::Hold);
    }
    let cfg = rig.config(&[("http", "timeout_secs = 300"), ("datadog", "sends_in_flight = 3")]);
    std::thread::scope(|s| {
        s.spawn(|| {
            let all_held = poll_until(Duration::from_secs(60), || rig.dd.held() == 3);
            let requests = rig.dd.requests();
            rig.dd.release();
            assert!(all_held, "three sends were not in flight together");
            assert_eq!(requests, 3, "no fourth send while three were in flight");
        });
        let out = rig.once(&cfg);
        assert_eq!(out.queued, 0);
    });
    assert_eq!(rig.dd.batches().iter().map(|b| b.0).sum::<usize>(), 3500, "each record in one accepted batch");
    assert_delivered_once(&rig.dd, &expected);
}

#[test]
fn a_drained_backlog_gives_its_space_back() {
    let rig = Rig::new();
    let expected = queue_direct(&rig, Feed::TtpUrl, &recent(Feed::TtpUrl, 8000, 1000));
    let size = || std::fs::metadata(rig.db_path()).unwrap().len();
    let full = size();
    assert!(full > 8_000_000, "the backlog takes {full} bytes");
    assert_eq!(rig.once(&rig.config(&[])).queued, 0);
    assert_delivered_once(&rig.dd, &expected);
    let drained = size();
    assert!(drained < full / 4, "the queue file kept {drained} of {full} bytes after draining");
}
