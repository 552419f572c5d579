//! The agent's own health in Datadog, through the real binary against the simulators: the metrics and service
//! checks arrive with their tags, say CRITICAL when the intake refuses the key or a feed is refused, stop when
//! turned off, and a health API that hangs or fails holds up no log. And the dashboard and monitors the packages
//! ship, and the README, name only (and every) metric and check the agent sends.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use crate::common::Rig;
use crate::common::bin::{Daemon, SpawnDaemon, cmd, no_secret, stderr_lines, wait_for};
use mimecast_forwarder::health::{self, CAN_DELIVER, CHECKS, FEED_CAN_POLL, FEED_ERROR, FEED_LAG, METRICS};
use mimecast_forwarder::mimecast::{Feed, wire};
use mimecast_forwarder::sim::datadog::DatadogSim;
use mimecast_forwarder::sim::records;
use serde_json::Value;

/// A failure bound, far above what a loaded machine needs: the tests wait for events, not for this.
const LIMIT: Duration = Duration::from_secs(60);

/// Writes the rig's config with two feeds, a `[telemetry]` section and `extra` lines; returns its path.
fn config(rig: &Rig, telemetry: &str, extra: &[(&str, &str)]) -> PathBuf {
    let mut lines = vec![("mimecast", "log_types = [\"audit\", \"ttp-url\"]")];
    lines.extend_from_slice(extra);
    let text = format!("{}[telemetry]\n{telemetry}\n", rig.config_text(&lines));
    let path = rig.dir.path().join("config.toml");
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// Starts `run` on the config, with `RUST_LOG` as given; its stderr is collected.
fn start(path: &std::path::Path, rust_log: &str) -> (Daemon, std::sync::Arc<std::sync::Mutex<String>>) {
    let mut child = cmd(&["run", "--config", path.to_str().unwrap()])
        .env("RUST_LOG", rust_log)
        .stderr(Stdio::piped())
        .spawn_daemon();
    let log = stderr_lines(&mut child);
    (child, log)
}

/// `n` records per feed, timed a few seconds ago: a running daemon reads them at its next poll, inside the
/// overlap it re-reads.
fn recent_records(rig: &Rig, feeds: &[Feed], n: u64) -> HashMap<String, Feed> {
    let now = mimecast_forwarder::datetime::now();
    let mut keys = HashMap::new();
    for &feed in feeds {
        let recs: Vec<Value> = (0..n).map(|i| records::generate(feed, i, now - 5, 400)).collect();
        keys.extend(recs.iter().map(|r| (wire::record_key(feed, r), feed)));
        rig.mc.add(feed, recs);
    }
    keys
}

fn tags(v: &Value) -> Vec<&str> {
    v["tags"].as_array().map(|t| t.iter().filter_map(Value::as_str).collect()).unwrap_or_default()
}

/// The latest value of a series with this metric and (if given) this tag.
fn latest(dd: &DatadogSim, metric: &str, tag: Option<&str>) -> Option<f64> {
    let series = dd.series();
    let s = series.iter().rev().find(|s| s["metric"] == metric && tag.is_none_or(|t| tags(s).contains(&t)))?;
    s["points"][0]["value"].as_f64()
}

/// The latest status of a check with this name and (if given) this tag, with its message.
fn check(dd: &DatadogSim, name: &str, tag: Option<&str>) -> Option<(u64, String)> {
    let checks = dd.checks();
    let c = checks.iter().rev().find(|c| c["check"] == name && tag.is_none_or(|t| tags(c).contains(&t)))?;
    Some((c["status"].as_u64()?, c["message"].as_str().unwrap_or("").to_owned()))
}

#[test]
fn the_daemon_reports_every_metric_and_check_with_its_feed_and_the_configured_tags() {
    let rig = Rig::new();
    let expected = rig.add_records(&[Feed::Audit, Feed::TtpUrl], 40, 300);
    let path = config(&rig, "interval_secs = 1", &[]);
    let (_child, log) = start(&path, "info");
    // A report after the delivery shows it: the values are the agent's, not a constant.
    wait_for("a report that counts every record delivered", LIMIT, || {
        latest(&rig.dd, health::DELIVERED, None) == Some(expected.len() as f64)
    });
    let series = rig.dd.series();
    for metric in METRICS {
        assert!(series.iter().any(|s| s["metric"] == *metric), "{metric} never sent: {series:?}");
    }
    for s in &series {
        let t = tags(s);
        assert!(t.contains(&"env:test"), "the configured tags on every series: {s}");
        assert_eq!(s["resources"][0]["name"], "test-host", "{s}");
        let feed_tags: Vec<&&str> = t.iter().filter(|t| t.starts_with("feed:")).collect();
        let per_feed = s["metric"] == FEED_LAG || s["metric"] == FEED_ERROR;
        assert_eq!(feed_tags.len(), usize::from(per_feed), "a feed tag on the per-feed metrics only: {s}");
        assert!(feed_tags.iter().all(|f| ["feed:audit", "feed:ttp-url"].contains(f)), "enabled feeds only: {s}");
    }
    assert_eq!(latest(&rig.dd, FEED_ERROR, Some("feed:ttp-url")), Some(0.0));
    // The records lie in the first of two hours to catch up: the lag shrinks as the later windows are read.
    wait_for("audit's lag under an hour", LIMIT, || {
        latest(&rig.dd, FEED_LAG, Some("feed:audit")).is_some_and(|lag| lag < 3600.0)
    });
    assert_eq!(check(&rig.dd, CAN_DELIVER, None).map(|c| c.0), Some(0));
    for feed in ["feed:audit", "feed:ttp-url"] {
        assert_eq!(check(&rig.dd, FEED_CAN_POLL, Some(feed)).map(|c| c.0), Some(0), "{feed}");
    }
    for c in rig.dd.checks() {
        assert!(CHECKS.contains(&c["check"].as_str().unwrap()) && tags(&c).contains(&"env:test"), "{c}");
        assert_eq!(c["host_name"], "test-host", "{c}");
    }
    // Each metric and feed tag is one timeseries (the configured tags and the host are the same throughout):
    // the count the README gives for two feeds.
    let mut timeseries: Vec<(String, Vec<&str>)> = series.iter().map(|s| (s["metric"].to_string(), tags(s))).collect();
    timeseries.sort();
    timeseries.dedup();
    assert_eq!(timeseries.len(), health::timeseries(2), "{timeseries:?}");
    no_secret(&log.lock().unwrap());
}

#[test]
fn a_refused_logs_key_and_a_refused_feed_are_critical() {
    let rig = Rig::new();
    rig.add_records(&[Feed::TtpUrl], 20, 300);
    // The intake refuses the key (its API endpoints still take the health report); audit lacks its permission.
    rig.dd.set_down(Some(403));
    rig.mc.forbid(Feed::Audit, true);
    let path = config(&rig, "interval_secs = 1", &[]);
    let (_child, log) = start(&path, "info");
    wait_for("can_deliver CRITICAL and audit's can_poll CRITICAL", LIMIT, || {
        check(&rig.dd, CAN_DELIVER, None).is_some_and(|c| c.0 == 2)
            && check(&rig.dd, FEED_CAN_POLL, Some("feed:audit")).is_some_and(|c| c.0 == 2)
    });
    let (_, message) = check(&rig.dd, CAN_DELIVER, None).unwrap();
    assert!(message.contains("HTTP 403") && message.contains("records wait in the queue"), "{message}");
    let (_, message) = check(&rig.dd, FEED_CAN_POLL, Some("feed:audit")).unwrap();
    assert!(message.contains("HTTP 403") && message.contains("an operator must act"), "{message}");
    assert_eq!(latest(&rig.dd, FEED_ERROR, Some("feed:audit")), Some(2.0));
    wait_for("ttp-url polling OK while audit is refused", LIMIT, || {
        check(&rig.dd, FEED_CAN_POLL, Some("feed:ttp-url")).is_some_and(|c| c.0 == 0)
    });
    no_secret(&log.lock().unwrap());
}

#[test]
fn turned_off_it_sends_nothing() {
    let rig = Rig::new();
    let expected = rig.add_records(&[Feed::Audit, Feed::TtpUrl], 20, 300);
    let path = config(&rig, "enabled = false\ninterval_secs = 1", &[]);
    let (_child, _log) = start(&path, "info");
    wait_for("every record delivered", LIMIT, || rig.dd.accepted_count() == expected.len());
    // Three more polls of a caught-up feed are at least two poll intervals (1 s each), twice the telemetry
    // interval: an agent that reported would have sent by then (its first report goes at start).
    let audit_polls = || rig.mc.requests().iter().filter(|r| r.feed == Some(Feed::Audit)).count();
    let polls = audit_polls();
    wait_for("three more polls of audit", LIMIT, || audit_polls() >= polls + 3);
    assert_eq!((rig.dd.health_requests(), rig.dd.series().len(), rig.dd.checks().len()), (0, 0, 0));
}

#[test]
fn a_hung_health_api_holds_up_no_log_and_no_second_report() {
    let rig = Rig::new();
    rig.dd.set_health_hold(true);
    // The HTTP timeout far above the test: the held report is still waiting when delivery is done.
    let path = config(&rig, "interval_secs = 1", &[("http", "timeout_secs = 600")]);
    let (_child, log) = start(&path, "info,mimecast_forwarder::health=debug");
    wait_for("the first report held and a tick skipped for it", LIMIT, || {
        rig.dd.health_held() == 1 && log.lock().unwrap().contains("health report skipped: the previous one is still")
    });
    let expected = recent_records(&rig, &[Feed::Audit, Feed::TtpUrl], 150);
    wait_for("every record delivered while the report hangs", LIMIT, || rig.dd.accepted_count() == expected.len());
    crate::common::assert_delivered_once(&rig.dd, &expected);
    assert_eq!((rig.dd.health_held(), rig.dd.health_requests()), (1, 1), "one report in flight, never a second");
    // Let go, the held report goes through and the next ones follow at their interval.
    rig.dd.set_health_hold(false);
    wait_for("reports again", LIMIT, || rig.dd.health_requests() >= 4 && !rig.dd.checks().is_empty());
}

#[test]
fn a_failing_health_api_is_logged_once_and_delays_no_log() {
    let rig = Rig::new();
    rig.dd.set_health_down(Some(500));
    let path = config(&rig, "interval_secs = 1", &[]);
    let (_child, log) = start(&path, "info");
    let expected = recent_records(&rig, &[Feed::Audit, Feed::TtpUrl], 100);
    // Each report is two requests: three reports failed.
    wait_for("three failed reports and every record delivered", LIMIT, || {
        rig.dd.health_requests() >= 6 && rig.dd.accepted_count() == expected.len()
    });
    let failed = |log: &str| log.lines().filter(|l| l.contains("health report not sent")).count();
    let text = log.lock().unwrap().clone();
    assert_eq!(failed(&text), 1, "one warning, not one per report:\n{text}");
    assert!(text.contains("HTTP 500") && text.contains("log delivery is not affected"), "{text}");
    rig.dd.set_health_down(None);
    wait_for("a report through again", LIMIT, || {
        log.lock().unwrap().contains("Datadog takes the agent's metrics and service checks again")
    });
    assert!(!rig.dd.series().is_empty());
    no_secret(&log.lock().unwrap());
}

/// Every `mimecast_forwarder.*` name in a JSON document's strings.
fn names(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => {
            for (i, _) in s.match_indices("mimecast_forwarder.") {
                let name: String =
                    s[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.')).collect();
                out.push(name.trim_end_matches('.').to_owned());
            }
        }
        Value::Array(a) => a.iter().for_each(|v| names(v, out)),
        Value::Object(o) => o.values().for_each(|v| names(v, out)),
        _ => {}
    }
}

/// The metric names a dashboard's widgets query (group widgets included), each request checked to be in the
/// formulas-and-functions style the Datadog UI exports: `queries` (one metric each, in `query`) that `formulas`
/// use, a `response_format` that fits the widget, never the older `q` string. Check names go to `checks`.
fn dashboard_names(widgets: &Value, metrics: &mut Vec<String>, checks: &mut Vec<String>) {
    for widget in widgets.as_array().expect("widgets is a list") {
        let def = &widget["definition"];
        let (kind, title) = (def["type"].as_str().unwrap_or(""), def["title"].as_str().unwrap_or("(untitled)"));
        match kind {
            "group" => dashboard_names(&def["widgets"], metrics, checks),
            "check_status" => checks.push(def["check"].as_str().expect("a check_status names its check").to_owned()),
            _ => {}
        }
        let Some(requests) = def.get("requests") else { continue };
        for request in requests.as_array().unwrap() {
            assert!(request.get("q").is_none(), "{title}: a request in the older `q` style: {request}");
            let format = match kind {
                "query_value" | "toplist" => "scalar",
                "timeseries" => "timeseries",
                other => panic!("{title}: a {other} widget; say here which response_format it takes"),
            };
            assert_eq!(request["response_format"], format, "{title}: {request}");
            if kind == "timeseries" {
                assert!(request["display_type"].is_string(), "{title}: no display_type: {request}");
            }
            let queries = request["queries"].as_array().filter(|q| !q.is_empty());
            let queries = queries.unwrap_or_else(|| panic!("{title}: a request without queries: {request}"));
            let formulas: Vec<&str> = request["formulas"].as_array().map_or(Vec::new(), |f| {
                f.iter().map(|f| f["formula"].as_str().expect("a formula is a string")).collect()
            });
            assert!(!formulas.is_empty(), "{title}: a request without formulas: {request}");
            let used = |name: &str| formulas.iter().any(|f| words(f).any(|w| w == name));
            let mut declared = Vec::new();
            for query in queries {
                assert_eq!(query["data_source"], "metrics", "{title}: {query}");
                let name = query["name"].as_str().unwrap_or_else(|| panic!("{title}: a query without a name"));
                assert!(used(name), "{title}: no formula uses {name}: {request}");
                declared.push(name);
                if format == "scalar" {
                    assert!(query["aggregator"].is_string(), "{title}: a scalar query without aggregator: {query}");
                }
                let mut found = Vec::new();
                names(&query["query"], &mut found);
                assert_eq!(found.len(), 1, "{title}: one metric per query: {query}");
                metrics.append(&mut found);
            }
            for formula in &formulas {
                assert!(words(formula).any(|w| declared.contains(&w)), "{title}: {formula} uses none of {declared:?}");
            }
        }
    }
}

/// The identifiers in a formula: query names and function names.
fn words(formula: &str) -> impl Iterator<Item = &str> {
    formula.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| !w.is_empty())
}

fn json_files(dir: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
}

#[test]
fn the_shipped_dashboard_and_monitors_name_only_what_the_agent_sends() {
    let known: Vec<&str> = METRICS.iter().chain(CHECKS).copied().collect();
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string("packaging/datadog/dashboard.json").unwrap()).unwrap();
    assert_eq!(dashboard["title"], "Mimecast forwarder health");
    assert!(dashboard["layout_type"].is_string() && dashboard["widgets"].as_array().is_some_and(|w| !w.is_empty()));
    let (mut queried, mut checked) = (Vec::new(), Vec::new());
    dashboard_names(&dashboard["widgets"], &mut queried, &mut checked);
    for (sent, shown, what) in [(METRICS, &queried, "metric"), (CHECKS, &checked, "service check")] {
        for name in sent {
            assert!(shown.iter().any(|s| s == name), "the dashboard does not show the {what} {name}");
        }
        for name in shown {
            assert!(sent.contains(&name.as_str()), "the dashboard shows {name}, not a {what} the agent sends");
        }
    }
    // And no other name anywhere in it (a title, the description).
    let mut shown = Vec::new();
    names(&dashboard, &mut shown);
    let monitors = json_files("packaging/datadog/monitors");
    assert!(monitors.len() >= 4, "{monitors:?}");
    let mut shipped = vec![PathBuf::from("packaging/datadog/dashboard.json")];
    for path in &monitors {
        let m: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        for key in ["name", "type", "query", "message"] {
            assert!(m[key].as_str().is_some_and(|v| !v.is_empty()), "{}: no {key}", path.display());
        }
        let mut used = Vec::new();
        names(&m["query"], &mut used);
        assert_eq!(used.len(), 1, "{}: one metric or check per monitor: {used:?}", path.display());
        let want: &[&str] = if m["type"] == "service check" { CHECKS } else { METRICS };
        assert!(
            want.contains(&used[0].as_str()),
            "{}: {} is not a {} the agent sends",
            path.display(),
            used[0],
            m["type"]
        );
        names(&m, &mut shown);
        shipped.push(path.clone());
    }
    for name in &shown {
        assert!(known.contains(&name.as_str()), "{name} is shipped but the agent does not send it");
    }
    // Both packages install each of them under /usr/share/doc/mimecast-forwarder/datadog/.
    let cargo: toml::Value = toml::from_str(&std::fs::read_to_string("Cargo.toml").unwrap()).unwrap();
    let meta = &cargo["package"]["metadata"];
    let deb: Vec<(String, String)> = meta["deb"]["assets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a[0].as_str().unwrap().to_owned(), a[1].as_str().unwrap().to_owned()))
        .collect();
    let rpm: Vec<(String, String)> = meta["generate-rpm"]["assets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["source"].as_str().unwrap().to_owned(), a["dest"].as_str().unwrap().to_owned()))
        .collect();
    for path in shipped {
        let source = path.to_str().unwrap();
        let dest = format!("usr/share/doc/mimecast-forwarder/{}", source.trim_start_matches("packaging/"));
        assert!(deb.contains(&(source.to_owned(), dest.clone())), "{source} is not installed by the .deb as {dest}");
        assert!(rpm.contains(&(source.to_owned(), format!("/{dest}"))), "{source} is not installed by the .rpm");
    }
}

#[test]
fn the_readme_lists_every_name_and_the_timeseries_count() {
    let readme = std::fs::read_to_string("README.md").unwrap();
    let section = readme.split("## Health in Datadog").nth(1).and_then(|s| s.split("\n## ").next()).unwrap();
    for name in METRICS.iter().chain(CHECKS) {
        assert!(section.contains(&format!("| `{name}` |")), "README's health tables lack {name}");
    }
    let (global, per_feed) = (health::timeseries(0), health::timeseries(1) - health::timeseries(0));
    assert!(section.contains(&format!("**{global} + {per_feed} × (enabled feeds)**")), "the formula");
    assert!(section.contains(&format!("**{}** with all six feeds", health::timeseries(6))), "the count for six");
}
