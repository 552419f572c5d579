//! `dead-letters list|requeue` and `status` through the real binary, on a queue made with the store's API; and
//! `status` on a database damaged in the middle.

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use crate::common::Rig;
use crate::common::bin::{SpawnDaemon, cmd, run, status_json, stderr_lines, wait_exit, wait_for, write_config};
use mimecast_forwarder::config::WhenFull;
use mimecast_forwarder::mimecast::Feed;
use mimecast_forwarder::mimecast::window::Window;
use mimecast_forwarder::store::{InFlight, NewRecord, PageCommit, Store};
use serde_json::Value;

/// Commits `n` audit records to the queue at `path`; returns their sequence numbers.
fn queue_records(path: &Path, n: usize, size: usize) -> (Store, Vec<i64>) {
    let mut store = Store::open(path).unwrap();
    store.init_cursor(Feed::Audit, 0).unwrap();
    let records = (0..n)
        .map(|i| NewRecord {
            key: format!("k{i}"),
            event_time: Some(1_700_000_000),
            body: format!("{{\"i\":{i},\"p\":\"{}\"}}", "x".repeat(size)),
        })
        .collect();
    let page = PageCommit {
        feed: Feed::Audit,
        window: Window { from: 0, to: 10 },
        next_token: None,
        records,
        forget_before: 0,
    };
    store.commit_page(&page, 1_700_000_100, u64::MAX, WhenFull::Pause, &InFlight::NONE).unwrap();
    let seqs = store.candidates(n).unwrap()[0].iter().map(|q| q.seq).collect();
    (store, seqs)
}

#[test]
fn list_requeue_and_status_agree() {
    let rig = Rig::new();
    let config = write_config(&rig, &[]);
    let c = config.to_str().unwrap();
    assert_eq!(run(&["dead-letters", "list", "--config", c]).0, 66, "no queue database yet");

    let (mut store, seqs) = queue_records(&rig.db_path(), 3, 10);
    assert!(store.dead_letter(seqs[0], "HTTP 400: {\"errors\":[\"bad\"]}\nsecond line", 1_700_000_200).unwrap());
    assert!(store.dead_letter(seqs[2], "HTTP 400: too big", 1_700_000_300).unwrap());
    drop(store);

    let (code, out, err) = run(&["dead-letters", "list", "--json", "--config", c]);
    assert_eq!(code, 0, "{err}");
    let list: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    assert_eq!(list[0]["id"], 1);
    assert_eq!(list[0]["feed"], "audit");
    assert_eq!(list[0]["key"], "k0");
    assert_eq!(list[0]["at"], "2023-11-14T22:16:40Z");
    assert_eq!(list[0]["event_time"], "2023-11-14T22:13:20Z");
    assert_eq!(list[0]["bytes"], 24);
    assert_eq!(list[1]["reason"], "HTTP 400: too big");

    let (code, text, _) = run(&["dead-letters", "list", "--config", c]);
    assert_eq!(code, 0);
    assert!(text.contains("HTTP 400: {\"errors\":[\"bad\"]} second line"), "one line per dead letter:\n{text}");
    assert!(text.contains("2 dead letter(s)"), "{text}");

    let s = status_json(c);
    assert_eq!((s["dead_letters"]["records"].as_i64(), s["queue"]["records"].as_i64()), (Some(2), Some(1)));

    let (code, out, err) = run(&["dead-letters", "requeue", "1", "--config", c]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("requeued 1 dead letter(s), 24 bytes") && out.contains("run"), "{out}");
    let s = status_json(c);
    assert_eq!((s["dead_letters"]["records"].as_i64(), s["queue"]["records"].as_i64()), (Some(1), Some(2)));
    assert_eq!(s["queue"]["bytes"], 48);

    let (code, _, err) = run(&["dead-letters", "requeue", "1", "--config", c]);
    assert_eq!(code, 65, "an id that is no longer a dead letter");
    assert!(err.contains("no dead letter with id 1"), "{err}");
    assert_eq!(run(&["dead-letters", "requeue", "--config", c]).0, 64, "ids or --all");

    let (code, out, err) = run(&["dead-letters", "requeue", "--all", "--json", "--config", c]);
    assert_eq!(code, 0, "{err}");
    let out: Value = serde_json::from_str(&out).unwrap();
    assert_eq!((out["requeued"].as_u64(), out["not_found"].as_array().map(Vec::len)), (Some(1), Some(0)));
    let s = status_json(c);
    assert_eq!((s["dead_letters"]["records"].as_i64(), s["queue"]["records"].as_i64()), (Some(0), Some(3)));
    assert_eq!(s["queue"]["bytes"], 72);
    assert!(s["queue"]["free_bytes"].as_u64().is_some_and(|b| b > 0), "{s}");
    assert!(s["queue"]["disk_full"].is_null());
    assert_eq!(run(&["dead-letters", "list", "--config", c]).1.trim(), "no dead letters");
}

/// With `--json`, `dead-letters list` and `requeue` print one JSON value on stdout however they end, as `status
/// --json` does: on a failure `{"error": "…"}`, the message stderr gives too; the exit code and stderr are those of
/// the text form, which prints nothing on stdout then.
#[test]
fn dead_letters_json_is_one_value_even_when_it_fails() {
    let rig = Rig::new();
    let good = write_config(&rig, &[]);
    let p = good.to_str().unwrap();
    let bad = rig.dir.path().join("bad.toml");
    std::fs::write(&bad, rig.config_text(&[("queue", "max_bytes = 0")])).unwrap();
    let check = |what: &str, config: &str, expected: i32, says: &str| {
        for action in [&["list"][..], &["requeue", "--all"], &["requeue", "1", "2"]] {
            let text = [&["dead-letters"][..], action, &["--config", config]].concat();
            let (code, out, err) = run(&[&text[..], &["--json"]].concat());
            assert_eq!(code, expected, "{what}, {action:?}: {out}{err}");
            let json: Value = serde_json::from_str(&out)
                .unwrap_or_else(|e| panic!("{what}, {action:?}: not one JSON value ({e}): {out:?}"));
            let error = json["error"].as_str().unwrap_or_else(|| panic!("{what}, {action:?}: no error in {json}"));
            assert_eq!(json.as_object().map(|o| o.len()), Some(1), "{what}, {action:?}: {json}");
            assert!(error.contains(says) && err.contains(error), "{what}, {action:?}: {json}\n{err}");
            // The text form: the same code and stderr, nothing on stdout.
            assert_eq!(run(&text), (code, String::new(), err), "{what}, {action:?}: the text form");
        }
    };
    check("no queue yet", p, 66, "no queue database");
    check("a bad config", bad.to_str().unwrap(), 78, "max_bytes");
    std::fs::write(rig.db_path(), vec![0x5a_u8; 16384]).unwrap();
    check("a damaged database", p, 70, "damaged");

    // On a queue that opens, what requeue printed before: its object, also when ids are not dead letters (65).
    std::fs::remove_file(rig.db_path()).unwrap();
    drop(rig.store());
    let (code, out, err) = run(&["dead-letters", "requeue", "7", "--json", "--config", p]);
    assert_eq!(code, 65, "{err}");
    let out: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(out, serde_json::json!({"requeued": 0, "bytes": 0, "not_found": [7]}));
    assert!(err.contains("no dead letter with id 7"), "{err}");
    let (code, out, _) = run(&["dead-letters", "list", "--json", "--config", p]);
    assert_eq!((code, serde_json::from_str::<Value>(&out).unwrap()), (0, serde_json::json!([])));
    // A queue that opens but fails when it is read or written: the store's error, as JSON too.
    rusqlite::Connection::open(rig.db_path()).unwrap().execute_batch("DROP TABLE dead_letter").unwrap();
    check("a store that fails", p, 70, "no such table: dead_letter");
}

#[test]
fn requeue_waits_out_another_writer() {
    let rig = Rig::new();
    let config = write_config(&rig, &[]);
    let (mut store, seqs) = queue_records(&rig.db_path(), 1, 10);
    store.dead_letter(seqs[0], "HTTP 400", 1).unwrap();
    // Like `run` in the middle of a commit: the write lock is held for a moment.
    let other = rusqlite::Connection::open(rig.db_path()).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let mut child = cmd(&["dead-letters", "requeue", "--all", "--config", config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn_daemon();
    let err = stderr_lines(&mut child);
    // The lock is let go only once `requeue` has met it: it is asleep in SQLite's busy handler (the process's
    // only sleep), where a requeue that did not wait would have failed at once.
    wait_for("requeue to wait for the lock", Duration::from_secs(60), || {
        assert!(child.try_wait().unwrap().is_none(), "requeue ended under the lock: {}", err.lock().unwrap());
        in_nanosleep(child.id())
    });
    other.execute_batch("COMMIT").unwrap();
    let status = wait_exit(&mut child, "requeue to end", Duration::from_secs(60));
    assert_eq!(status.code(), Some(0), "{}", err.lock().unwrap());
    assert_eq!(store.counters().unwrap().queue_records, 1);
}

/// Whether process `pid` is asleep in `nanosleep` (its kernel wait channel), as SQLite's busy handler sleeps.
fn in_nanosleep(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/wchan")).is_ok_and(|w| w.contains("nanosleep"))
}

/// A queue database of many pages, closed, with a few pages in its middle overwritten.
fn damaged_queue(path: &Path) {
    drop(queue_records(path, 3000, 200));
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let len = f.metadata().unwrap().len();
    f.seek(SeekFrom::Start(len / 2 / 4096 * 4096)).unwrap();
    f.write_all(&[0x5a; 3 * 4096]).unwrap();
}

#[test]
fn status_on_a_database_damaged_in_the_middle_exits_70() {
    let rig = Rig::new();
    let db = rig.dir.path().join("damaged/queue.db");
    std::fs::create_dir_all(db.parent().unwrap()).unwrap();
    damaged_queue(&db);
    let config = write_config(&rig, &[("queue", &format!("path = {:?}", db.display().to_string()))]);
    let c = config.to_str().unwrap();
    for args in
        [&["status", "--config", c][..], &["status", "--json", "--config", c], &["dead-letters", "list", "--config", c]]
    {
        let (code, out, err) = run(args);
        assert_eq!(code, 70, "{args:?}: {out}{err}");
        assert!(
            err.contains("damaged") && err.contains(&db.display().to_string()) && err.contains("move the file aside"),
            "{err}"
        );
    }
}
