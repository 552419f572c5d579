//! The real binary: exit codes, signals, `kill -9`, `status` while running, `demo`.

use std::process::Stdio;
use std::time::Duration;

use crate::common::bin::{
    SpawnDaemon, cmd, no_secret, output_within, run, signal, stderr_lines, wait_exit, wait_for, write_config,
};
use crate::common::{Rig, assert_delivered_once};
use mimecast_forwarder::mimecast::Feed;
use mimecast_forwarder::sim::datadog as dd;
use mimecast_forwarder::sim::mimecast::Fault;
use serde_json::Value;

#[test]
fn check_config_validates_and_redacts() {
    let rig = Rig::new();
    let path = write_config(&rig, &[]);
    let p = path.to_str().unwrap();
    let (code, out, err) = run(&["check-config", "--config", p]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("client_secret = \"[redacted]\"") && out.contains("api_key = \"[redacted]\""), "{out}");
    // The whole output is TOML (the first line is a comment) with the file's keys and the effective values.
    let back: toml::Table = toml::from_str(&out).unwrap();
    assert_eq!(back["queue"]["path"].as_str(), rig.db_path().to_str(), "{out}");
    assert_eq!(back["mimecast"]["page_size"].as_integer(), Some(500), "{out}");
    no_secret(&(out + &err));

    let (code, out, err) = run(&["check-config", "--config", p, "--connect"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("mimecast: OK") && out.contains("datadog: OK"), "{out}");
    no_secret(&(out + &err));

    rig.dd.set_api_key("another-key");
    let (code, out, err) = run(&["check-config", "--config", p, "--connect"]);
    assert_eq!(code, 69);
    assert!(out.contains("mimecast: OK") && out.contains("datadog: FAILED"), "{out}");
    no_secret(&(out + &err));

    let bad = write_config(&rig, &[("queue", "when_full = \"block\"")]);
    let (code, out, err) = run(&["check-config", "--config", bad.to_str().unwrap()]);
    assert_eq!(code, 78);
    assert!(err.contains("queue.when_full") && err.contains("`block`"), "{err}");
    no_secret(&(out + &err));

    let typo = write_config(&rig, &[("mimecast", "poll_intervall_secs = 5")]);
    let (code, _, err) = run(&["check-config", "--config", typo.to_str().unwrap()]);
    assert_eq!(code, 78);
    assert!(err.contains("poll_intervall_secs"), "{err}");
}

#[test]
fn every_missing_credential_is_named_in_one_run() {
    let rig = Rig::new();
    let path = rig.dir.path().join("config.toml");
    let text = rig.config_text(&[]);
    let secretless: String =
        text.lines().filter(|l| !l.contains("client_") && !l.contains("api_key")).map(|l| format!("{l}\n")).collect();
    std::fs::write(&path, secretless).unwrap();
    for args in [vec!["check-config", "--config"], vec!["run", "--once", "--config"]] {
        let mut args = args.clone();
        args.push(path.to_str().unwrap());
        let (code, _, err) = run(&args);
        assert_eq!(code, 78, "{args:?}: {err}");
        for key in ["mimecast.client_id", "mimecast.client_secret", "datadog.api_key"] {
            assert!(err.contains(&format!("missing {key}")), "{args:?}: {key} not named: {err}");
        }
        assert_eq!(err.lines().count(), 1, "one error line: {err}");
    }
}

#[test]
fn a_value_of_the_wrong_type_is_said_in_words() {
    let rig = Rig::new();
    for ((section, line), says) in [
        (
            ("mimecast", "page_size = \"big\""),
            "(mimecast.page_size): must be a whole number from 1 to 1000, got the string \"big\"",
        ),
        (("mimecast", "poll_interval_secs = 1.5"), "must be a whole number of seconds from 1 to 86400, got 1.5"),
        (("queue", "max_bytes = -1"), "(queue.max_bytes): must be a whole number of bytes from 1 to"),
        (("datadog", "hostname = true"), "(datadog.hostname): must be a host name in quotes, got true"),
        (("queue", "when_full = 1"), "(queue.when_full): must be \"pause\" or \"drop-oldest\""),
    ] {
        let path = write_config(&rig, &[(section, line)]);
        let (code, _, err) = run(&["check-config", "--config", path.to_str().unwrap()]);
        assert_eq!(code, 78, "{line}: {err}");
        assert!(err.contains(says), "{line}: {err}");
        assert!(!["u32", "u64", "i64", "expected"].iter().any(|t| err.contains(t)), "{line}: {err}");
    }
}

#[test]
fn help_version_and_usage_errors() {
    let (code, out, _) = run(&["--version"]);
    assert_eq!((code, out.trim()), (0, concat!("mimecast-forwarder ", env!("CARGO_PKG_VERSION"))));
    for sub in ["run", "check-config", "status", "dead-letters", "demo"] {
        let (code, out, _) = run(&[sub, "--help"]);
        assert_eq!(code, 0);
        assert!(out.contains(&format!("mimecast-forwarder {sub}")), "{out}");
    }
    assert_eq!(run(&["frobnicate"]).0, 64);
    // `help COMMAND` is that command's help, not the general one.
    for sub in ["run", "check-config", "status", "dead-letters", "demo"] {
        let (code, out, _) = run(&["help", sub]);
        assert_eq!((code, &out), (0, &run(&[sub, "--help"]).1), "help {sub}");
        assert!(out.starts_with(&format!("mimecast-forwarder {sub}")), "{out}");
    }
    assert_eq!(run(&["help"]).1, run(&["--help"]).1);
    let (code, _, err) = run(&["help", "frobnicate"]);
    assert_eq!(code, 64);
    assert!(err.contains("unknown command \"frobnicate\""), "{err}");
}

/// The exit codes a text lists: its numbers (the code lists hold no others).
fn codes_in(text: &str) -> std::collections::BTreeSet<i32> {
    text.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse().ok()).collect()
}

/// The exit codes that `COMMAND --help` lists, and those of its rows in the README's table of commands.
fn documented_codes(sub: &str) -> (std::collections::BTreeSet<i32>, std::collections::BTreeSet<i32>) {
    let help = run(&[sub, "--help"]).1;
    let listed = help.split("Exit code").nth(1).unwrap_or_else(|| panic!("no exit codes in {help}"));
    let readme = std::fs::read_to_string("README.md").unwrap();
    let rows: String = readme
        .lines()
        .filter(|l| l.starts_with(&format!("| `{sub} ")) || l.starts_with(&format!("| `{sub}` ")))
        .map(|row| row.rsplit('|').nth(1).unwrap())
        .collect();
    assert!(!rows.is_empty(), "no README row for {sub}");
    (codes_in(listed), codes_in(&rows))
}

#[test]
fn each_commands_help_and_readme_list_the_same_exit_codes() {
    for sub in ["run", "check-config", "status", "dead-letters", "demo"] {
        let (help, readme) = documented_codes(sub);
        assert_eq!(help, readme, "{sub}: its help and the README list other exit codes");
        assert!(help.contains(&0) && help.contains(&64), "{sub}: {help:?}");
    }
}

#[test]
fn status_returns_only_listed_codes_and_json_is_always_one_object() {
    let rig = Rig::new();
    let good = write_config(&rig, &[]);
    let p = good.to_str().unwrap();
    let (help, readme) = documented_codes("status");
    // (what, config, expected code): each way status can end.
    let mut seen = Vec::new();
    let mut check = |what: &str, config: &str, expected: i32| {
        let (code, out, err) = run(&["status", "--json", "--config", config]);
        assert_eq!(code, expected, "{what}: {err}");
        assert!(help.contains(&code) && readme.contains(&code), "{what}: {code} is not listed: {help:?} {readme:?}");
        let json: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {out}"));
        if code != 0 {
            assert!(json["queue"].is_null(), "{what}: {json}");
            let error = json["error"].as_str().unwrap_or_else(|| panic!("{what}: no error in {json}"));
            assert!(!error.is_empty() && err.contains(error), "{what}: {json}\n{err}");
        }
        seen.push((what.to_owned(), json));
    };
    check("no queue yet", p, 66);
    let bad = rig.dir.path().join("bad.toml");
    std::fs::write(&bad, rig.config_text(&[("queue", "max_bytes = 0")])).unwrap();
    check("a bad config", bad.to_str().unwrap(), 78);
    std::fs::write(rig.db_path(), vec![0x5a_u8; 16384]).unwrap();
    check("a damaged database", p, 70);
    std::fs::remove_file(rig.db_path()).unwrap();
    drop(rig.store()); // An empty queue.
    check("an empty queue", p, 0);
    assert!(seen[0].1["error"].as_str().unwrap().contains("no queue database"), "{:?}", seen[0]);
    assert!(seen[2].1["error"].as_str().unwrap().contains("damaged"), "{:?}", seen[2]);
    assert_eq!(seen[3].1["queue"]["records"], 0, "{:?}", seen[3]);
    let (code, _, _) = run(&["status", "--frobnicate"]);
    assert_eq!(code, 64);
    assert!(help.contains(&code) && readme.contains(&code), "{help:?} {readme:?}");
}

/// Guards: env_logger is built without its default features (no regex filters, no colours, no humantime): RUST_LOG
/// still takes a level or module paths, and lines outside systemd still carry their time.
#[test]
fn rust_log_takes_levels_and_module_paths_and_lines_carry_the_time() {
    let log = |filter: &str| {
        let out = cmd(&["run", "--once", "--config", "/nonexistent/config.toml"]).env("RUST_LOG", filter).output();
        String::from_utf8_lossy(&out.unwrap().stderr).into_owned()
    };
    let line = log("info");
    assert!(line.starts_with('[') && line.contains("Z ERROR mimecast_forwarder] config error: "), "{line}");
    assert!(line.get(1..21).and_then(mimecast_forwarder::datetime::parse).is_some(), "{line}");
    for shows in ["mimecast_forwarder=debug", "warn,ureq=debug", "error"] {
        assert!(log(shows).contains("config error"), "{shows}");
    }
    for hides in ["off", "ureq=debug", "error,mimecast_forwarder=off"] {
        assert!(!log(hides).contains("config error"), "{hides}");
    }
}

#[test]
fn a_closed_stdout_is_not_a_crash() {
    // `mimecast-forwarder status | head -1`: the reader is gone before the writer writes.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let status = cmd(&["--help"]).stdout(writer).status().unwrap();
    assert_eq!(status.code(), Some(0));
}

#[test]
fn run_once_delivers_or_exits_75_with_records_kept() {
    let rig = Rig::new();
    let expected = rig.add_records(&Feed::ALL, 120, 500);
    let path = write_config(&rig, &[]);
    let p = path.to_str().unwrap();
    rig.dd.refuse_connections(true);
    let (code, out, err) = run(&["run", "--once", "--config", p]);
    assert_eq!(code, 75, "{err}");
    no_secret(&(out + &err));
    assert!(err.contains("records remain queued"), "{err}");
    let (code, json, _) = run(&["status", "--json", "--config", p]);
    assert_eq!(code, 0);
    let status: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(status["queue"]["records"], 720);
    assert!(status["datadog"]["last_error"].as_str().unwrap().contains("connect"), "{status}");

    rig.dd.refuse_connections(false);
    let (code, out, err) = run(&["run", "--once", "--config", p]);
    assert_eq!(code, 0, "{err}");
    no_secret(&(out + &err));
    assert_delivered_once(&rig.dd, &expected);
}

#[test]
fn a_corrupt_queue_database_is_refused_with_a_clear_error_and_left_alone() {
    let rig = Rig::new();
    let path = write_config(&rig, &[]);
    let garbage = vec![0x5a_u8; 16384];
    std::fs::write(rig.db_path(), &garbage).unwrap();
    let (code, _, err) = run(&["run", "--once", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 70, "{err}");
    assert!(err.contains("damaged or not a database") && err.contains("queue.db"), "{err}");
    assert_eq!(std::fs::read(rig.db_path()).unwrap(), garbage);
}

#[test]
fn sigterm_stops_cleanly_status_works_meanwhile_and_a_restart_carries_on() {
    let rig = Rig::new();
    let expected = rig.add_records(&Feed::ALL, 150, 500);
    let path = write_config(&rig, &[]);
    let p = path.to_str().unwrap();
    rig.dd.set_down(Some(503)); // Records pile up in the queue while `run` runs.
    let mut child = cmd(&["run", "--config", p]).stderr(Stdio::piped()).spawn_daemon();
    wait_for("the queue to fill", Duration::from_secs(20), || {
        rig.db_path().exists() && run(&["status", "--json", "--config", p]).1.contains("\"records\":900")
    });
    let (code, json, err) = run(&["status", "--json", "--config", p]);
    assert_eq!(code, 0, "{err}");
    let s: Value = serde_json::from_str(&json).unwrap();
    for key in ["records", "bytes", "max_bytes", "oldest_age_secs", "paused"] {
        assert!(s["queue"].get(key).is_some(), "queue.{key} missing: {s}");
    }
    assert_eq!(s["queue"]["paused"], false);
    assert!(s["queue"]["bytes"].as_i64().unwrap() > 900 * 400);
    for key in [("dead_letters", "records"), ("dropped", "records"), ("late", "restamped"), ("late", "kept")] {
        assert!(s[key.0][key.1].is_i64(), "{}.{} missing: {s}", key.0, key.1);
    }
    assert!(s["datadog"]["last_error"].as_str().unwrap().contains("503"));
    for feed in Feed::ALL {
        let f = &s["feeds"][feed.name()];
        assert_eq!(f["enabled"], true);
        assert!(f["watermark"].is_string() && f["last_success"].is_string() && f["last_error"].is_null(), "{f}");
    }
    let (code, text, _) = run(&["status", "--config", p]);
    assert_eq!(code, 0);
    assert!(text.contains("ATTENTION") && text.contains("503") && text.contains("900 records"), "{text}");

    // Mimecast is polled every second and Datadog retried with a backoff: an agent that went on after SIGTERM
    // would ask again. At the signal, at most one page fetch (logged when answered) and one send (counted when
    // it arrives) can be on their way.
    let (polls, sends) = (rig.mc.requests().len(), rig.dd.requests());
    signal(&child, "-TERM");
    let status = wait_exit(&mut child, "the agent to stop on SIGTERM", Duration::from_secs(60));
    assert_eq!(status.code(), Some(0));
    let (polls_after, sends_after) = (rig.mc.requests().len() - polls, rig.dd.requests() - sends);
    assert!(polls_after <= 1 && sends_after <= 1, "{polls_after} polls and {sends_after} sends after SIGTERM");
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(err.contains("signal received"), "{err}");
    no_secret(&err);

    rig.dd.set_down(None);
    let (code, _, err) = run(&["run", "--once", "--config", p]);
    assert_eq!(code, 0, "{err}");
    assert_delivered_once(&rig.dd, &expected);
}

/// User plus system CPU time of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_name.split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn waiting_on_a_stalled_intake_or_a_full_queue_burns_no_cpu() {
    let rig = Rig::new();
    rig.add_records(&Feed::ALL, 100, 500);
    // The HTTP timeout far above the test: the held send is still waiting when the measurement ends.
    // One send at a time: the held one stalls delivery (several in flight are the subject of other tests).
    let path = write_config(
        &rig,
        &[("queue", "max_bytes = 20000"), ("http", "timeout_secs = 300"), ("datadog", "sends_in_flight = 1")],
    );
    rig.dd.fault(dd::Fault::Hold);
    let mut child = cmd(&["run", "--config", path.to_str().unwrap()]).stderr(Stdio::piped()).spawn_daemon();
    let log = stderr_lines(&mut child);
    // The queue fills up to max_bytes (polling pauses) while the first send hangs.
    wait_for("the held send and the full queue", Duration::from_secs(60), || {
        rig.dd.held() == 1 && log.lock().unwrap().contains("queue full")
    });
    // The two seconds are the span over which CPU is measured (the input of the test), not a wait for an event.
    let before = cpu_ticks(child.id());
    std::thread::sleep(Duration::from_millis(2000));
    let used = cpu_ticks(child.id()) - before;
    assert_eq!((rig.dd.held(), rig.dd.requests()), (1, 1), "the agent was waiting all along");
    signal(&child, "-KILL");
    child.wait().unwrap();
    // Ticks are 10 ms: a loop that spins would use about 200 of them here.
    assert!(used <= 20, "{used} ticks of CPU in 2 s of waiting");
}

#[test]
fn feeds_waiting_for_the_token_in_flight_burn_no_cpu() {
    let rig = Rig::new();
    let expected = rig.add_records(&Feed::ALL, 20, 300);
    // The token endpoint hangs: the first feed's token request is in flight, the other five feeds are due and
    // must wait for that token, not spin on a timer that fires at once.
    rig.mc.set_hold_tokens(true);
    let path = write_config(&rig, &[("http", "timeout_secs = 300")]);
    let mut child = cmd(&["run", "--config", path.to_str().unwrap()]).stderr(Stdio::piped()).spawn_daemon();
    let log = stderr_lines(&mut child);
    wait_for("the token request to hang", Duration::from_secs(30), || rig.mc.held() == 1);
    // The two seconds are the span over which CPU is measured (the input of the test), not a wait for an event.
    let before = cpu_ticks(child.id());
    std::thread::sleep(Duration::from_millis(2000));
    let used = cpu_ticks(child.id()) - before;
    assert_eq!((rig.mc.held(), rig.mc.tokens_issued()), (1, 0), "one token request, still waiting");
    assert!(rig.mc.requests().is_empty(), "no page was asked for without a token");
    rig.mc.set_hold_tokens(false);
    rig.mc.release();
    wait_for("everything delivered", Duration::from_secs(60), || {
        dd::record_keys(&rig.dd.accepted()).len() >= expected.len()
    });
    signal(&child, "-TERM");
    assert_eq!(wait_exit(&mut child, "the agent to stop", Duration::from_secs(60)).code(), Some(0));
    assert_delivered_once(&rig.dd, &expected);
    assert_eq!(rig.mc.tokens_issued(), 1, "the other feeds used the token the first one brought");
    drop(log);
    // Ticks are 10 ms: a loop that spins would use about 200 of them here.
    assert!(used <= 20, "{used} ticks of CPU in 2 s of waiting for a token");
}

#[test]
fn sigterm_lets_the_send_in_flight_finish_so_nothing_is_sent_twice() {
    let rig = Rig::new();
    let expected = rig.add_records(&[Feed::Audit], 300, 500);
    // One send at a time: with several, one started just before the signal may reach the intake after it, and
    // "no send after the signal" could not be told from the intake's count.
    let path = write_config(&rig, &[("datadog", "sends_in_flight = 1")]);
    rig.dd.fault(dd::Fault::Hold);
    let mut child = cmd(&["run", "--config", path.to_str().unwrap()]).stderr(Stdio::piped()).spawn_daemon();
    let log = stderr_lines(&mut child);
    wait_for("the held send", Duration::from_secs(30), || rig.dd.held() == 1);
    // The send is answered only once the agent has taken the signal: it must wait for it (up to its 5 s grace).
    signal(&child, "-TERM");
    wait_for("the signal to be taken", Duration::from_secs(30), || log.lock().unwrap().contains("signal received"));
    let sent = rig.dd.requests();
    rig.dd.release();
    let status = wait_exit(&mut child, "the agent to stop", Duration::from_secs(60));
    assert_eq!(status.code(), Some(0), "{}", log.lock().unwrap());
    assert_eq!(rig.dd.requests(), sent, "no send was started after the signal");
    let accepted = dd::record_keys(&rig.dd.accepted());
    assert!(!accepted.is_empty(), "the send in flight completed");
    let still_queued = rig.queued().into_iter().filter(|q| accepted.contains_key(&q.key)).count();
    assert_eq!(still_queued, 0, "its batch left the queue before exit");
    let (code, _, err) = run(&["run", "--once", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert_delivered_once(&rig.dd, &expected);
}

#[test]
fn kill_9_after_page_k_resumes_at_page_k_plus_1() {
    let rig = Rig::new();
    let expected = rig.add_records(&[Feed::TtpUrl], 500, 300);
    let path = write_config(&rig, &[("mimecast", "page_size = 50\nmax_window_secs = 7400\nlog_types = [\"ttp-url\"]")]);
    let p = path.to_str().unwrap();
    rig.dd.refuse_connections(true);
    // Pages 1..4 are served; the 5th request hangs, and the process is killed while waiting for it.
    rig.mc.fault_after(Some(Feed::TtpUrl), 4, Fault::Stall(Duration::from_secs(20)));
    let mut child = cmd(&["run", "--config", p]).stderr(Stdio::null()).spawn_daemon();
    wait_for("the 5th page request", Duration::from_secs(20), || rig.mc.requests().len() >= 5);
    signal(&child, "-KILL");
    child.wait().unwrap();
    let store = rig.store();
    assert_eq!(store.counters().unwrap().queue_records, 200, "pages 1-4 were committed");
    let cursor = store.cursor(Feed::TtpUrl).unwrap().unwrap();
    let (_, token) = cursor.window.clone().unwrap();
    assert_eq!(token, rig.mc.requests()[4].page_token, "the cursor holds page 5's token");
    drop(store);

    rig.dd.refuse_connections(false);
    let (code, _, err) = run(&["run", "--once", "--config", p]);
    assert_eq!(code, 0, "{err}");
    let log = rig.mc.requests();
    assert_eq!(log[5].page_token, log[4].page_token, "the restart asks for page 5 again, not page 1");
    assert_delivered_once(&rig.dd, &expected);
}

#[test]
fn demo_runs_and_loses_nothing() {
    // As a new user runs it: no RUST_LOG. A demo that never ends is killed and fails the test; how long it takes
    // is not asserted.
    let mut demo = cmd(&["demo"]);
    demo.env_remove("RUST_LOG");
    let (code, out, err) = output_within(demo, Duration::from_secs(120));
    assert_eq!(code, 0, "{out}\n{err}");
    let summary = out.lines().find(|l| l.starts_with("summary:")).unwrap_or_else(|| panic!("no summary in {out}"));
    assert!(summary.ends_with("duplicates 0 / lost 0"), "{summary}");
    assert!(out.contains("Datadog starts answering 503") && out.contains("Datadog is back"), "{out}");
    // The last progress line, just before the summary, says what the summary says.
    let generated = summary.split(" / ").next().unwrap().trim_start_matches("summary: generated ");
    let last = out.lines().rfind(|l| l.starts_with("t+")).unwrap();
    assert!(last.ends_with(&format!("delivered {generated} of {generated}")), "{last}\n{out}");
    let before_summary = out.lines().rev().skip_while(|l| !l.starts_with("summary:")).skip(1).find(|l| !l.is_empty());
    assert_eq!(before_summary, Some(last), "{out}");
    // The retries the demo makes the agent meet are not warnings on the terminal between the progress lines.
    assert!(!err.contains("WARN") && !err.contains("retrying"), "{err}");
}

#[test]
fn repeated_kill_9_at_random_moments_under_faults_loses_nothing() {
    let rig = Rig::new();
    let expected = rig.add_records(&Feed::ALL, 400, 400);
    let path = write_config(&rig, &[("mimecast", "page_size = 40")]);
    let p = path.to_str().unwrap();
    let mut rng = fastrand::Rng::with_seed(2026);
    let kills = 6;
    let mut drops_after_accept = 0;
    for _ in 0..kills {
        for _ in 0..3 {
            let feed = Feed::ALL[rng.usize(0..6)];
            let fault = match rng.u8(0..4) {
                0 => Fault::Drop,
                1 => Fault::Status(503),
                2 => Fault::FailOk { retryable: true },
                _ => Fault::RateLimit("50".into()),
            };
            rig.mc.fault_after(Some(feed), rng.usize(0..5), fault);
            if rng.bool() {
                rig.dd.fault(dd::Fault::Status(503));
            } else {
                rig.dd.fault(dd::Fault::AcceptThenDrop);
                drops_after_accept += 1;
            }
        }
        let mut child = cmd(&["run", "--config", p]).stderr(Stdio::null()).spawn_daemon();
        std::thread::sleep(Duration::from_millis(rng.u64(50..400)));
        signal(&child, "-KILL");
        child.wait().unwrap();
    }
    // `--once` gives up after three failures in a row, and injected faults may still be pending: run it until it
    // reports an empty queue, as cron would.
    let mut codes = Vec::new();
    while codes.last() != Some(&0) && codes.len() < 10 {
        codes.push(run(&["run", "--once", "--config", p]).0);
    }
    assert_eq!(codes.last(), Some(&0), "exit codes {codes:?}");
    let got = dd::record_keys(&rig.dd.accepted());
    let missing = expected.keys().filter(|k| !got.contains_key(*k)).count();
    assert_eq!(missing, 0, "records lost");
    assert_eq!(got.len(), expected.len(), "records that were never generated");
    // Each kill may resend the batch in flight, and each accept-then-drop is resent once.
    let dups: usize = got.values().map(|n| n - 1).sum();
    assert!(dups <= (kills + drops_after_accept) * 1000, "{dups} duplicates");
}

#[test]
fn a_second_run_on_the_same_queue_is_refused_with_75_and_names_the_holder() {
    let rig = Rig::new();
    let expected = rig.add_records(&Feed::ALL, 100, 300);
    let path = write_config(&rig, &[]);
    let p = path.to_str().unwrap();
    rig.dd.set_down(Some(503));
    let mut daemon = cmd(&["run", "--config", p]).stderr(Stdio::null()).spawn_daemon();
    wait_for("the daemon to take the queue", Duration::from_secs(10), || rig.mc.requests().len() >= 6);
    for args in [vec!["run", "--once", "--config", p], vec!["run", "--config", p]] {
        // Both end while the daemon still holds the queue (a run that waited for it would be killed by run's
        // hang guard and fail), and neither tried again: refused at once.
        let (code, _, err) = run(&args);
        assert_eq!(code, 75, "{args:?}: {err}");
        assert!(!err.contains("trying again"), "{err}");
        assert!(
            err.contains("in use by another mimecast-forwarder run")
                && err.contains(&format!("pid {}", daemon.id()))
                && err.contains("queue.db"),
            "{err}"
        );
    }
    signal(&daemon, "-TERM");
    assert_eq!(wait_exit(&mut daemon, "the daemon to stop", Duration::from_secs(60)).code(), Some(0));
    rig.dd.set_down(None);
    let (code, _, err) = run(&["run", "--once", "--config", p]);
    assert_eq!(code, 0, "the lock went with its holder: {err}");
    assert_delivered_once(&rig.dd, &expected);
}

#[test]
fn once_exits_69_when_a_feed_gave_up_though_the_queue_is_empty() {
    let rig = Rig::new();
    let path = write_config(&rig, &[("mimecast", "base_url = \"http://127.0.0.1:9\"")]);
    let (code, out, err) = run(&["run", "--once", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 69, "{err}");
    assert!(err.contains("gave up"), "{err}");
    no_secret(&(out + &err));
    let (code, out, _) = run(&["run", "--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("69") && out.contains("75"), "{out}");
}

#[test]
fn config_errors_on_secret_lines_never_print_the_secret() {
    let rig = Rig::new();
    let secret_lines = [
        "client_secret = sim-client-secret",
        "client_secret = [\"sim-client-secret\"]",
        "client_secret = \"sim-client-secret\"\nclient_secret = \"sim-client-secret\"",
        "client_secert = \"sim-client-secret\"",
    ];
    for line in secret_lines {
        let path = write_config(&rig, &[("mimecast", line)]);
        for args in [vec!["check-config", "--config"], vec!["run", "--once", "--config"], vec!["status", "--config"]] {
            let mut args = args.clone();
            args.push(path.to_str().unwrap());
            let (code, out, err) = run(&args);
            assert_eq!(code, 78, "{line}: {args:?}: {err}");
            assert!(err.contains("line "), "{err}");
            no_secret(&(out + &err));
        }
    }
}

#[test]
fn sighup_reads_the_config_again_and_a_bad_one_is_refused() {
    let rig = Rig::new();
    rig.add_records(&[Feed::Audit], 20, 300);
    let path = write_config(&rig, &[("mimecast", "log_types = [\"audit\"]")]);
    let mut child = cmd(&["run", "--config", path.to_str().unwrap()]).stderr(Stdio::piped()).spawn_daemon();
    let log = stderr_lines(&mut child);
    wait_for("the first delivery", Duration::from_secs(30), || rig.dd.accepted_count() >= 20);

    // A bad config: refused, the daemon goes on.
    std::fs::write(&path, "[mimecast]\nclient_secret = oops\n").unwrap();
    signal(&child, "-HUP");
    wait_for("the reload to be refused", Duration::from_secs(30), || {
        log.lock().unwrap().contains("running configuration stays")
    });
    assert!(child.try_wait().unwrap().is_none(), "SIGHUP must not stop the daemon");

    // A good one with another feed and another tag: both take effect.
    rig.add_records(&[Feed::Dlp], 15, 300);
    write_config(&rig, &[("mimecast", "log_types = [\"audit\", \"dlp\"]"), ("datadog", "tags = [\"env:reloaded\"]")]);
    signal(&child, "-HUP");
    wait_for("the new feed's records", Duration::from_secs(30), || rig.dd.accepted_count() >= 35);
    let dlp: Vec<Value> = rig.dd.accepted().into_iter().filter(|l| l["service"] == "dlp").collect();
    assert_eq!(dlp.len(), 15);
    assert!(dlp.iter().all(|l| l["ddtags"] == "env:reloaded"), "{:?}", dlp[0]);

    signal(&child, "-TERM");
    assert_eq!(wait_exit(&mut child, "the agent to stop", Duration::from_secs(60)).code(), Some(0));
    let err = log.lock().unwrap().clone();
    assert!(err.contains("reload: config error") && err.contains("running configuration stays"), "{err}");
    assert!(err.contains("reload: configuration read again"), "{err}");
    assert!(!err.contains("oops"), "{err}");
    no_secret(&err);
}
