//! Unit tests of the core's own decisions: the real [`Core`] over a real SQLite queue in a temporary directory, at
//! fake instants, with Mimecast and Datadog answering through the HTTP seam ([`Http::simulated`]) from a script. A
//! job runs only when a test runs it, so a test can hold a fetch or a send in flight as long as it needs, and
//! nothing sleeps. The machines have table tests of their own; these pin what the core does with their answers and
//! with the store's (a lock, a full disk, a full queue, an unset clock).

use std::collections::HashMap;
use std::io::Read as _;
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{Value, json};

use super::*;
use crate::http::{Exchange, HttpError, Response, Transport};
use crate::sim::mimecast::{Quirks, serve_page};
use crate::sim::records;

/// 2027-01-15: what the wall clock reads when a test starts, unless it is not set.
const UNIX0: i64 = 1_800_000_000;
/// What an unset clock reads at the start: a day after the epoch, as a dead hardware clock does at boot.
const UNSET0: i64 = 86_400;
const POLL: Duration = Duration::from_secs(60);
/// Mimecast's backoff in these tests: the pauses of the store's pressure machine follow it.
const MIMECAST_BASE: Duration = Duration::from_secs(2);

/// Mimecast and Datadog as the tests script them.
#[derive(Default)]
struct Peers {
    /// Each feed's records with the time Mimecast filters on, sorted by it.
    records: HashMap<Feed, Vec<(i64, Value)>>,
    tokens: u32,
    pages: u32,
    /// The status the intake answers instead of 202, when set (a 503, a 403).
    intake_status: Option<u16>,
    intake_requests: u32,
    /// Each request the intake accepted: the text of each of its logs' records.
    accepted: Vec<Vec<String>>,
}

#[derive(Clone, Default)]
struct Net(Arc<Mutex<Peers>>);

impl Net {
    fn lock(&self) -> MutexGuard<'_, Peers> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn json_response(status: u16, body: &Value) -> Response {
    Response {
        status,
        headers: vec![("Content-Type".into(), "application/json".into())],
        body: body.to_string().into_bytes(),
    }
}

impl Transport for Net {
    fn exchange(&self, req: Exchange<'_>) -> Result<Response, HttpError> {
        let mut peers = self.lock();
        if req.url.ends_with("/oauth/token") {
            peers.tokens += 1;
            let token = format!("token-{}", peers.tokens);
            return Ok(json_response(200, &json!({"access_token": token, "token_type": "Bearer", "expires_in": 3600})));
        }
        if let Some(feed) = Feed::ALL.into_iter().find(|f| req.url.ends_with(f.spec().path)) {
            peers.pages += 1;
            let body: Option<Value> = serde_json::from_slice(req.body).ok();
            let list = peers.records.get(&feed).map_or(&[][..], Vec::as_slice);
            return Ok(match serve_page(list, feed, body.as_ref(), Quirks::default()) {
                Ok((page, _)) => json_response(200, &page),
                Err(m) => json_response(400, &json!({"fail": [{"errors": [{"code": m}]}]})),
            });
        }
        peers.intake_requests += 1;
        if let Some(status) = peers.intake_status {
            return Ok(json_response(status, &json!({"errors": ["scripted"]})));
        }
        let mut text = Vec::new();
        let logs: Vec<Value> = flate2::read::GzDecoder::new(req.body)
            .read_to_end(&mut text)
            .ok()
            .and_then(|_| serde_json::from_slice(&text).ok())
            .unwrap_or_default();
        let messages = logs.iter().map(|l| l["message"].as_str().unwrap_or_default().to_owned()).collect();
        peers.accepted.push(messages);
        Ok(json_response(202, &json!({})))
    }
}

/// What a test sets up: the config's knobs that the core's decisions read.
struct Setup {
    mode: Mode,
    feeds: Vec<Feed>,
    page_size: u32,
    sends_in_flight: u32,
    /// `queue.max_bytes` and `queue.when_full`.
    queue: Option<(u64, &'static str)>,
    /// The wall clock reads 1970 at the start.
    clock_unset: bool,
}

impl Default for Setup {
    fn default() -> Setup {
        Setup {
            mode: Mode::Daemon,
            feeds: vec![Feed::Audit],
            page_size: 100,
            sends_in_flight: 4,
            queue: None,
            clock_unset: false,
        }
    }
}

/// A core over a queue of its own, the scripted peers, and a fake clock.
struct Rig {
    dir: tempfile::TempDir,
    net: Net,
    core: Core,
    base: Instant,
    /// The time since the start, on both clocks.
    t: Duration,
    /// The wall clock reads 1970 (not set yet) while this holds.
    clock_unset: bool,
}

impl Rig {
    fn new(setup: Setup) -> Rig {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("queue.db");
        let feeds: Vec<String> = setup.feeds.iter().map(|f| format!("{:?}", f.name())).collect();
        let queue =
            setup.queue.map_or(String::new(), |(max, when)| format!("max_bytes = {max}\nwhen_full = {when:?}\n"));
        let text = format!(
            "[mimecast]\nbase_url = \"http://mimecast.test\"\nclient_id = \"id\"\nclient_secret = \"mc-secret\"\n\
             log_types = [{}]\npoll_interval_secs = {}\ninitial_lookback_secs = 3600\nsettle_secs = 0\n\
             overlap_secs = 0\nmax_window_secs = 3600\npage_size = {}\n\
             [datadog]\nintake_url = \"http://intake.test/api/v2/logs\"\napi_key = \"dd-api-key-0123\"\n\
             hostname = \"test\"\nsends_in_flight = {}\n[queue]\npath = {:?}\n{queue}",
            feeds.join(", "),
            POLL.as_secs(),
            setup.page_size,
            setup.sends_in_flight,
            path.display().to_string(),
        );
        let cfg = crate::config::from_str(&text, &|_| None).expect("the test's config is valid");
        let store = Store::open(&path).expect("a new queue opens");
        // A lock held by the test is reported at once rather than after the 5 s a daemon waits.
        store.set_busy_timeout(Duration::from_millis(20)).expect("the busy timeout is set");
        let tuning = Tuning {
            mimecast_backoff: crate::backoff::Backoff { base: MIMECAST_BASE, cap: Duration::from_secs(300) },
            datadog_backoff: crate::backoff::Backoff { base: Duration::from_secs(1), cap: Duration::from_secs(120) },
            // The ceiling of every backoff: exact delays.
            jitter: || 1.0,
            ..Tuning::default()
        };
        let net = Net::default();
        let http = Http::simulated(Arc::new(net.clone()));
        let base = Instant::now();
        let now = Now { at: base, unix: if setup.clock_unset { UNSET0 } else { UNIX0 } };
        let core = Core::open(cfg, tuning, setup.mode, store, http, now).expect("the core opens");
        Rig { dir, net, core, base, t: Duration::ZERO, clock_unset: setup.clock_unset }
    }

    fn now(&self) -> Now {
        let secs = i64::try_from(self.t.as_secs()).expect("a test's time fits");
        Now { at: self.base + self.t, unix: if self.clock_unset { UNSET0 + secs } else { UNIX0 + secs } }
    }

    /// Moves both clocks on to `at` (never back).
    fn advance_to(&mut self, at: Instant) {
        self.t = self.t.max(at.saturating_duration_since(self.base));
    }

    fn advance(&mut self, d: Duration) {
        self.t += d;
    }

    /// `n` records of `feed`, about 300 bytes each, that Mimecast filters at `unix`.
    fn add(&self, feed: Feed, n: u64, unix: i64) {
        self.add_sized(feed, n, unix, 300);
    }

    fn add_sized(&self, feed: Feed, n: u64, unix: i64, size: usize) {
        let mut peers = self.net.lock();
        let list = peers.records.entry(feed).or_default();
        let first = list.len() as u64;
        for i in first..first + n {
            list.push((unix, records::generate(feed, i, unix, size)));
        }
        list.sort_by_key(|(t, _)| *t);
    }

    fn turn(&mut self) -> Turn {
        let now = self.now();
        self.core.turn(now).expect("the turn runs")
    }

    /// Runs `job` now and hands its answer back; returns the jobs the core asks for next.
    fn answer(&mut self, job: Job) -> Vec<Job> {
        let done = job.run();
        let now = self.now();
        self.core.handle(now, done).expect("the answer is handled")
    }

    /// Answers each of `jobs` in turn; returns the jobs their answers ask for, unstarted.
    fn answer_all(&mut self, jobs: Vec<Job>) -> Vec<Job> {
        jobs.into_iter().flat_map(|job| self.answer(job)).collect::<Vec<_>>()
    }

    /// Turns and answers every job at once, with the jobs those ask for, until a turn starts nothing.
    fn settle(&mut self) {
        for _ in 0..1000 {
            let mut jobs = self.turn().jobs;
            if jobs.is_empty() {
                return;
            }
            while let Some(job) = jobs.pop() {
                jobs.extend(self.answer(job));
            }
        }
        panic!("the core never stopped starting jobs");
    }

    /// Settles, then moves the clocks on to each wake, until `done` holds (within a simulated hour).
    fn drive(&mut self, done: impl Fn(&Rig) -> bool) {
        let end = self.t + Duration::from_secs(3600);
        while self.t < end {
            self.settle();
            if done(self) {
                return;
            }
            let wake = self.turn().wake;
            self.advance_to(wake.max(self.now().at + Duration::from_millis(1)));
        }
        panic!("not done within a simulated hour");
    }

    fn counters(&self) -> crate::store::Counters {
        self.core.store.counters().expect("the counters read")
    }

    fn cursor(&self, feed: Feed) -> Option<crate::store::Cursor> {
        self.core.store.cursor(feed).expect("the cursor reads")
    }

    /// A second connection to the queue, as `sqlite3` by hand or a backup would hold one.
    fn other_connection(&self) -> rusqlite::Connection {
        rusqlite::Connection::open(self.dir.path().join("queue.db")).expect("a second connection opens")
    }

    fn accepted_logs(&self) -> usize {
        self.net.lock().accepted.iter().map(Vec::len).sum()
    }
}

fn fetches(jobs: &[Job]) -> Vec<Feed> {
    jobs.iter()
        .filter_map(|j| match j.kind {
            JobKind::Fetch(f) => Some(f),
            JobKind::Send(_) => None,
        })
        .collect()
}

fn sends(jobs: &[Job]) -> Vec<usize> {
    jobs.iter()
        .filter_map(|j| match j.kind {
            JobKind::Send(n) => Some(n),
            JobKind::Fetch(_) => None,
        })
        .collect()
}

/// Splits `jobs` into fetches and sends.
fn split(jobs: Vec<Job>) -> (Vec<Job>, Vec<Job>) {
    jobs.into_iter().partition(|j| matches!(j.kind, JobKind::Fetch(_)))
}

#[test]
fn a_turn_with_nothing_due_starts_nothing_and_wakes_when_the_next_poll_is_due() {
    let mut rig = Rig::new(Setup::default());
    rig.settle();
    assert_eq!(rig.cursor(Feed::Audit).map(|c| c.watermark), Some(UNIX0), "the first window was read");
    let turn = rig.turn();
    assert!(turn.jobs.is_empty() && !turn.over, "{:?}", turn.jobs);
    assert_eq!(turn.wake, rig.now().at + POLL, "the next poll, a poll interval after the window's end");
    // Turning again before then, as a spurious wake does, starts nothing either.
    rig.advance(POLL - Duration::from_millis(1));
    let early = rig.turn();
    assert!(early.jobs.is_empty(), "{:?}", early.jobs);
    assert_eq!(early.wake, turn.wake);
    rig.advance_to(turn.wake);
    assert_eq!(fetches(&rig.turn().jobs), [Feed::Audit], "due at its wake");
}

#[test]
fn each_feed_has_one_fetch_in_flight_and_waits_for_its_applications_token() {
    let mut rig = Rig::new(Setup { feeds: vec![Feed::Audit, Feed::Dlp], page_size: 5, ..Setup::default() });
    rig.add(Feed::Audit, 12, UNIX0 - 1800);
    rig.add(Feed::Dlp, 12, UNIX0 - 1800);
    // No token yet: one feed fetches it, the other feed of the same API application waits for it.
    let first = rig.turn().jobs;
    let [token] = <[Job; 1]>::try_from(first).expect("one token fetch");
    let JobKind::Fetch(a) = token.kind else { panic!("{token:?}") };
    assert!(rig.turn().jobs.is_empty(), "the other feed waits for the token, and {a} is in flight");
    let page_a = rig.answer(token);
    assert_eq!(fetches(&page_a), [a], "the token brings the page it was fetched for");
    assert_eq!(rig.net.lock().tokens, 1);
    let page_b = rig.turn().jobs;
    let b = fetches(&page_b);
    assert!(b.len() == 1 && b[0] != a, "the other feed now has a token: {b:?}");
    assert!(fetches(&rig.turn().jobs).is_empty(), "both feeds have a fetch in flight");
    // A page with a next page: that page is read ahead while this one is committed, one fetch per feed still.
    let ahead = rig.answer(page_a.into_iter().next().expect("a page job"));
    assert_eq!(fetches(&ahead), [a]);
    assert_eq!(rig.counters().queue_records, 5);
    let turn = rig.turn();
    assert!(fetches(&turn.jobs).is_empty(), "{:?}", turn.jobs);
    assert_eq!(sends(&turn.jobs), [5], "what was queued goes at once");
    assert_eq!(rig.net.lock().tokens, 1, "one token for the application");
}

#[test]
fn no_more_than_sends_in_flight_batches_go_at_once() {
    let mut rig = Rig::new(Setup { sends_in_flight: 2, page_size: 1000, ..Setup::default() });
    rig.add(Feed::Audit, 2500, UNIX0 - 1800);
    let mut held: Vec<Job> = Vec::new();
    // Polls the whole window, holding every send.
    for _ in 0..20 {
        let (mut fetch, send) = split(rig.turn().jobs);
        held.extend(send);
        assert!(held.len() <= 2, "{held:?}");
        if fetch.is_empty() {
            break;
        }
        while let Some(job) = fetch.pop() {
            let (more, send) = split(rig.answer(job));
            fetch.extend(more);
            held.extend(send);
        }
    }
    assert_eq!(rig.counters().queue_records, 2500, "the window is queued");
    assert_eq!(sends(&held), [1000, 1000], "two batches out, the third waits");
    let turn = rig.turn();
    assert!(turn.jobs.is_empty(), "{:?}", turn.jobs);
    let first = held.remove(0);
    assert!(rig.answer(first).is_empty());
    let third = rig.turn().jobs;
    assert_eq!(sends(&third), [500], "an answer makes room for one more");
    for job in held.into_iter().chain(third) {
        rig.answer(job);
    }
    rig.settle();
    let peers = rig.net.lock();
    let all: std::collections::HashSet<&String> = peers.accepted.iter().flatten().collect();
    assert_eq!((peers.accepted.len(), all.len()), (3, 2500), "three requests, no record in two of them");
    drop(peers);
    assert_eq!(rig.counters().queue_records, 0);
}

#[test]
fn a_locked_database_pauses_polling_and_sending_with_a_backoff_and_both_resume_when_it_is_free() {
    let mut rig = Rig::new(Setup { page_size: 5, ..Setup::default() });
    rig.add(Feed::Audit, 10, UNIX0 - 1800);
    let token = rig.turn().jobs;
    let page = rig.answer_all(token);
    let ahead = rig.answer_all(page);
    assert_eq!((fetches(&ahead), rig.counters().queue_records), (vec![Feed::Audit], 5));
    let page_2 = rig.cursor(Feed::Audit).and_then(|c| c.window);
    let other = rig.other_connection();
    other.execute_batch("BEGIN IMMEDIATE").expect("the other connection takes the write lock");
    // The page read ahead cannot be committed: nothing of it is stored, and the cursor stays.
    assert!(rig.answer_all(ahead).is_empty());
    assert_eq!(rig.counters().queue_records, 5, "the second page was not committed");
    assert_eq!(rig.cursor(Feed::Audit).and_then(|c| c.window), page_2, "the cursor did not move");
    // Polling and sending share the database: both wait out the pause, though five records wait to be sent.
    let turn = rig.turn();
    assert!(turn.jobs.is_empty(), "{:?}", turn.jobs);
    assert_eq!(turn.wake, rig.now().at + MIMECAST_BASE, "the first pause");
    // Still locked when the pause is over: the page is read again and a batch goes (reads need no lock).
    rig.advance_to(turn.wake);
    let (fetch, send) = split(rig.turn().jobs);
    assert_eq!((fetches(&fetch), sends(&send)), (vec![Feed::Audit], vec![5]));
    assert!(rig.answer_all(fetch).is_empty());
    let turn = rig.turn();
    assert!(turn.jobs.is_empty(), "{:?}", turn.jobs);
    assert_eq!(turn.wake, rig.now().at + 2 * MIMECAST_BASE, "the pause grows");
    assert_eq!(rig.counters().queue_records, 5);
    // The lock goes: the batch's removal and the next poll after the pause go through.
    other.execute_batch("ROLLBACK").expect("the lock is released");
    assert!(rig.answer_all(send).is_empty());
    assert_eq!(rig.counters().delivered, 5);
    rig.advance_to(turn.wake);
    rig.settle();
    let c = rig.counters();
    assert_eq!((c.delivered, c.queue_records), (10, 0), "committed and delivered once the lock was gone");
    assert_eq!(rig.cursor(Feed::Audit).map(|c| (c.watermark, c.window)), Some((UNIX0, None)));
    let peers = rig.net.lock();
    let all: std::collections::HashSet<&String> = peers.accepted.iter().flatten().collect();
    assert_eq!((all.len(), peers.tokens), (10, 1), "each record once, with one token");
}

#[test]
fn a_delivered_batch_the_locked_store_cannot_remove_is_removed_before_anything_else_is_sent() {
    let mut rig = Rig::new(Setup { page_size: 10, ..Setup::default() });
    rig.add(Feed::Audit, 10, UNIX0 - 1800);
    let token = rig.turn().jobs;
    let page = rig.answer(token.into_iter().next().expect("a token fetch"));
    // The page is full, so a next page is read ahead; it comes back empty and ends the window.
    let mut jobs = rig.answer(page.into_iter().next().expect("a page fetch"));
    while let Some(job) = jobs.pop() {
        jobs.extend(rig.answer(job));
    }
    let send = rig.turn().jobs;
    assert_eq!(sends(&send), [10]);
    let other = rig.other_connection();
    other.execute_batch("BEGIN IMMEDIATE").expect("the other connection takes the write lock");
    rig.answer(send.into_iter().next().expect("a send"));
    assert_eq!(rig.net.lock().accepted.len(), 1, "the intake accepted the batch");
    let c = rig.counters();
    assert_eq!((c.queue_records, c.delivered), (10, 0), "but the queue could not take its removal");
    // A send of the same records now would deliver them twice: nothing goes while the removal fails.
    rig.add(Feed::Audit, 5, UNIX0 + 30);
    for _ in 0..3 {
        let turn = rig.turn();
        assert!(sends(&turn.jobs).is_empty(), "{:?}", turn.jobs);
        rig.advance_to(turn.wake);
    }
    assert_eq!(rig.net.lock().intake_requests, 1);
    other.execute_batch("ROLLBACK").expect("the lock is released");
    rig.drive(|r| r.counters().delivered == 15);
    let c = rig.counters();
    assert_eq!(c.delivered, 15, "removed once the lock was gone, then the rest delivered");
    assert_eq!(c.queue_records, 0);
    let peers = rig.net.lock();
    assert_eq!(peers.accepted.iter().map(Vec::len).collect::<Vec<_>>(), [10, 5], "nothing was sent twice");
}

#[test]
fn a_full_disk_holds_polling_until_its_pause_passes() {
    let mut rig = Rig::new(Setup::default());
    rig.add_sized(Feed::Audit, 10, UNIX0 - 1800, 5000);
    // The queue may not grow: SQLite says the disk is full, as it does on a full filesystem.
    let conn = rig.core.store.conn();
    let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0)).expect("the page count reads");
    conn.pragma_update(None, "max_page_count", pages).expect("the limit is set");
    let token = rig.turn().jobs;
    let page = rig.answer(token.into_iter().next().expect("a token fetch"));
    assert!(rig.answer(page.into_iter().next().expect("a page fetch")).is_empty());
    assert_eq!(rig.counters().queue_records, 0);
    assert!(rig.core.pressure.disk_full());
    let turn = rig.turn();
    assert!(turn.jobs.is_empty(), "{:?}", turn.jobs);
    assert_eq!(turn.wake, rig.now().at + MIMECAST_BASE);
    rig.core.store.conn().pragma_update(None, "max_page_count", 1 << 30).expect("the limit is lifted");
    rig.advance_to(turn.wake);
    rig.settle();
    assert_eq!(rig.counters().delivered, 10, "polled, committed and delivered once the pause passed");
    assert!(!rig.core.pressure.disk_full(), "a page committed ends the trouble");
}

#[test]
fn a_delivery_ends_the_pause_of_a_full_disk_at_once() {
    let mut rig = Rig::new(Setup::default());
    rig.add_sized(Feed::Audit, 10, UNIX0 - 1800, 5000);
    let mut held = Vec::new();
    let token = rig.turn().jobs;
    let page = rig.answer(token.into_iter().next().expect("a token fetch"));
    assert!(rig.answer(page.into_iter().next().expect("a page fetch")).is_empty());
    held.extend(rig.turn().jobs);
    assert_eq!(sends(&held), [10]);
    // The next poll's page finds the disk full.
    rig.add_sized(Feed::Audit, 10, UNIX0 + 30, 5000);
    let conn = rig.core.store.conn();
    let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0)).expect("the page count reads");
    conn.pragma_update(None, "max_page_count", pages).expect("the limit is set");
    rig.advance(POLL);
    let poll = rig.turn().jobs;
    assert_eq!(fetches(&poll), [Feed::Audit]);
    for job in poll {
        assert!(rig.answer(job).is_empty());
    }
    assert_eq!(rig.counters().queue_records, 10);
    assert!(rig.core.pressure.disk_full());
    assert!(fetches(&rig.turn().jobs).is_empty(), "polling waits");
    // The batch in flight is accepted and removed: its space is free, and polling goes on at the same instant.
    assert!(rig.answer(held.remove(0)).is_empty());
    assert_eq!(rig.counters().delivered, 10);
    let poll = rig.turn().jobs;
    assert_eq!(fetches(&poll), [Feed::Audit], "the delivery ended the wait");
    for job in poll {
        rig.answer(job);
    }
    assert_eq!(rig.counters().queue_records, 10, "the page fits in the space the delivery freed");
    assert!(!rig.core.pressure.disk_full());
}

#[test]
fn a_page_that_comes_back_to_a_full_queue_is_read_again_once_it_drains() {
    let mut rig = Rig::new(Setup { page_size: 5, queue: Some((1, "pause")), ..Setup::default() });
    rig.add(Feed::Audit, 12, UNIX0 - 1800);
    let token = rig.turn().jobs;
    let page = rig.answer(token.into_iter().next().expect("a token fetch"));
    let ahead = rig.answer(page.into_iter().next().expect("a page fetch"));
    assert_eq!(fetches(&ahead), [Feed::Audit], "the second page is read ahead");
    // The turn finds the queue at max_bytes: polling pauses, delivery goes on.
    let send = rig.turn().jobs;
    assert!(rig.core.pressure.queue_full());
    assert_eq!(sends(&send), [5]);
    let page_2 = rig.cursor(Feed::Audit).and_then(|c| c.window).and_then(|(_, t)| t);
    assert!(page_2.is_some());
    // The page read ahead comes back to the full queue: not stored, and the cursor stays where it was.
    assert!(rig.answer(ahead.into_iter().next().expect("the page read ahead")).is_empty());
    assert_eq!(rig.counters().queue_records, 5);
    assert_eq!(rig.cursor(Feed::Audit).and_then(|c| c.window).and_then(|(_, t)| t), page_2);
    let turn = rig.turn();
    assert!(turn.jobs.is_empty(), "no fetch while the queue is full: {:?}", turn.jobs);
    assert!(turn.wake > rig.now().at, "and no wake for a feed that may not poll");
    // The batch is delivered: the queue drains, and the page is read again from the cursor.
    for job in send {
        rig.answer(job);
    }
    assert_eq!(rig.counters().queue_records, 0);
    let poll = rig.turn().jobs;
    assert_eq!(fetches(&poll), [Feed::Audit], "polling resumes once the queue is below max_bytes");
    assert!(!rig.core.pressure.queue_full());
    let ahead = rig.answer_all(poll);
    let c = rig.counters();
    assert_eq!((c.queue_records, c.delivered), (5, 5), "the second page, stored this time");
    assert_ne!(rig.cursor(Feed::Audit).and_then(|c| c.window).and_then(|(_, t)| t), page_2);
    rig.answer_all(ahead);
    rig.drive(|r| r.counters().delivered == 12);
    let peers = rig.net.lock();
    let all: std::collections::HashSet<&String> = peers.accepted.iter().flatten().collect();
    assert_eq!((all.len(), peers.accepted.iter().map(Vec::len).sum::<usize>()), (12, 12), "each record once");
}

#[test]
fn drop_oldest_makes_room_for_a_page_but_never_drops_what_is_in_flight() {
    // Ten records of 300 bytes fit.
    let mut rig = Rig::new(Setup { page_size: 10, queue: Some((3000, "drop-oldest")), ..Setup::default() });
    rig.add(Feed::Audit, 30, UNIX0 - 1800);
    let token = rig.turn().jobs;
    let page = rig.answer(token.into_iter().next().expect("a token fetch"));
    let ahead = rig.answer(page.into_iter().next().expect("a page fetch"));
    assert_eq!(rig.counters().queue_bytes, 3000);
    // The second page comes back before any send started: the first page's records make room for it.
    let ahead = rig.answer_all(ahead);
    let c = rig.counters();
    assert_eq!((c.queue_records, c.dropped), (10, 10));
    assert!(!rig.core.pressure.queue_full(), "drop-oldest never pauses polling");
    let send = rig.turn().jobs;
    assert_eq!(sends(&send), [10], "the second page's records in flight");
    // The third page: only records not in flight may go, which are its own.
    let rest = rig.answer_all(ahead);
    let c = rig.counters();
    assert_eq!((c.queue_records, c.dropped), (10, 20), "the records in flight stay");
    for job in send {
        assert!(rig.answer(job).is_empty());
    }
    let c = rig.counters();
    assert_eq!((c.delivered, c.queue_records), (10, 0), "what was in flight is delivered and counted once");
    rig.answer_all(rest);
    rig.drive(|r| {
        r.counters().queue_records == 0
            && r.cursor(Feed::Audit).is_some_and(|c| c.watermark == UNIX0 && c.window.is_none())
    });
    let c = rig.counters();
    assert_eq!(c.delivered + c.dropped + c.queue_records, 30, "every record counted once: {c:?}");
}

#[test]
fn a_record_too_large_for_the_intake_becomes_a_dead_letter_and_the_rest_are_sent() {
    let mut rig = Rig::new(Setup::default());
    rig.add(Feed::Audit, 2, UNIX0 - 1800);
    rig.add_sized(Feed::Audit, 1, UNIX0 - 1700, crate::datadog::batch::MAX_LOG_BYTES + 1000);
    rig.add(Feed::Audit, 2, UNIX0 - 1600);
    let token = rig.turn().jobs;
    let page = rig.answer(token.into_iter().next().expect("a token fetch"));
    assert!(rig.answer(page.into_iter().next().expect("a page fetch")).is_empty());
    assert_eq!(rig.counters().queue_records, 5);
    let send = rig.turn().jobs;
    assert_eq!(sends(&send), [4], "the large record is not sent");
    let c = rig.counters();
    assert_eq!((c.dead_letters, c.queue_records), (1, 4));
    for job in send {
        rig.answer(job);
    }
    let c = rig.counters();
    assert_eq!((c.delivered, c.queue_records, c.dead_letters), (4, 0, 1));
    let peers = rig.net.lock();
    assert!(peers.accepted.iter().flatten().all(|m| m.len() < 1000), "the intake got only the small ones");
}

#[test]
fn an_unset_clock_holds_polling_and_creates_no_cursor_until_it_is_set() {
    let mut rig = Rig::new(Setup { clock_unset: true, ..Setup::default() });
    rig.add(Feed::Audit, 5, UNIX0 - 1800);
    assert!(rig.cursor(Feed::Audit).is_none(), "no cursor by a clock of 1970");
    for _ in 0..20 {
        let turn = rig.turn();
        assert!(turn.jobs.is_empty(), "{:?}", turn.jobs);
        assert_eq!(turn.wake, rig.now().at + crate::policy::poller::CLOCK_RECHECK, "the clock is looked at again");
        rig.advance_to(turn.wake);
    }
    let peers = rig.net.lock();
    assert_eq!((peers.tokens, peers.pages), (0, 0), "nothing was asked of Mimecast");
    drop(peers);
    assert!(rig.cursor(Feed::Audit).is_none());
    // NTP sets the clock: polling starts, from the lookback behind the clock as it now reads.
    rig.clock_unset = false;
    let start = rig.now().unix;
    rig.drive(|r| r.counters().delivered == 5);
    assert_eq!(rig.cursor(Feed::Audit).map(|c| c.watermark), Some(start), "read up to the clock as set");
}

#[test]
fn an_unset_clock_holds_sending_too_and_the_queue_goes_once_it_is_set() {
    let mut rig = Rig::new(Setup::default());
    rig.add(Feed::Audit, 5, UNIX0 - 1800);
    rig.net.lock().intake_status = Some(503);
    rig.settle();
    assert_eq!((rig.net.lock().intake_requests, rig.counters().queue_records), (1, 5));
    // The clock reads 1970 (a step back to a dead hardware clock): every record would be restamped to it.
    rig.clock_unset = true;
    for _ in 0..10 {
        let turn = rig.turn();
        assert!(turn.jobs.is_empty(), "{:?}", turn.jobs);
        assert!(turn.wake <= rig.now().at + crate::policy::poller::CLOCK_RECHECK);
        rig.advance_to(turn.wake);
    }
    assert_eq!(rig.net.lock().intake_requests, 1, "nothing was sent by the unset clock");
    rig.net.lock().intake_status = None;
    rig.clock_unset = false;
    let turn = rig.turn();
    assert_eq!(sends(&turn.jobs), [5], "the clock is set: the queue goes at once");
    rig.answer_all(turn.jobs);
    assert_eq!(rig.counters().delivered, 5);
}

/// Runs a `--once` pass: turns and answers every job at once, until a turn says the pass is over.
fn once_pass(rig: &mut Rig) -> usize {
    for turns in 1..1000 {
        let turn = rig.turn();
        if turn.over {
            assert!(turn.jobs.is_empty(), "{:?}", turn.jobs);
            return turns;
        }
        let mut jobs = turn.jobs;
        while let Some(job) = jobs.pop() {
            jobs.extend(rig.answer(job));
        }
        rig.advance_to(turn.wake);
    }
    panic!("the pass never ended");
}

#[test]
fn once_ends_only_when_everything_settled() {
    let mut rig = Rig::new(Setup { mode: Mode::Once, ..Setup::default() });
    rig.add(Feed::Audit, 10, UNIX0 - 1800);
    let token = rig.turn();
    assert!(!token.over);
    assert!(!rig.turn().over, "a token fetch in flight");
    let page = rig.answer(token.jobs.into_iter().next().expect("a token fetch"));
    assert!(!rig.turn().over, "a page in flight");
    assert!(rig.answer(page.into_iter().next().expect("a page fetch")).is_empty());
    assert!(rig.core.poller.all_done(), "the feed read its pass");
    let send = rig.turn();
    assert!(!send.over, "records queued");
    assert_eq!(sends(&send.jobs), [10]);
    assert!(!rig.turn().over, "a send in flight");
    rig.answer_all(send.jobs);
    let last = rig.turn();
    assert!(last.over && last.jobs.is_empty());
    assert_eq!(rig.core.outcome().ok(), Some(Outcome { queued: 0, gave_up: false }));
}

#[test]
fn once_gives_up_on_the_intake_and_says_what_stays_queued() {
    // (intake status, requests until the pass ends): a refused key at once, a 503 after `once_attempts`.
    for (status, requests) in [(403, 1), (503, 3)] {
        let mut rig = Rig::new(Setup { mode: Mode::Once, ..Setup::default() });
        rig.add(Feed::Audit, 10, UNIX0 - 1800);
        rig.net.lock().intake_status = Some(status);
        once_pass(&mut rig);
        assert_eq!(rig.net.lock().intake_requests, requests, "{status}");
        assert_eq!(rig.core.outcome().ok(), Some(Outcome { queued: 10, gave_up: true }), "{status}");
    }
}

#[test]
fn once_reads_every_feed_and_delivers_before_it_ends() {
    let mut rig =
        Rig::new(Setup { mode: Mode::Once, feeds: vec![Feed::Audit, Feed::Dlp], page_size: 4, ..Setup::default() });
    rig.add(Feed::Audit, 9, UNIX0 - 1800);
    rig.add(Feed::Dlp, 3, UNIX0 - 600);
    once_pass(&mut rig);
    assert_eq!(rig.core.outcome().ok(), Some(Outcome { queued: 0, gave_up: false }));
    assert_eq!(rig.accepted_logs(), 12);
}

#[test]
fn a_page_is_read_ahead_only_when_the_disk_has_room_for_both_pages() {
    let mut rig = Rig::new(Setup { page_size: 5, ..Setup::default() });
    rig.add(Feed::Audit, 12, UNIX0 - 1800);
    let free = rig.core.store.space().expect("the space reads").fs_free.expect("the filesystem says its free space");
    // Room for one page (twice its WAL), not for two.
    rig.core.page_wal = free / 3;
    let token = rig.turn().jobs;
    assert_eq!(fetches(&token), [Feed::Audit], "room for the first page");
    let page = rig.answer_all(token);
    assert_eq!(fetches(&page), [Feed::Audit]);
    assert!(rig.answer_all(page).is_empty(), "no room to read the next page ahead");
    assert_eq!(rig.counters().queue_records, 5);
    let next = rig.turn().jobs;
    assert_eq!(fetches(&next), [Feed::Audit], "the next page, once the one before is committed");
    assert!(rig.answer_all(next).is_empty(), "still no room to read ahead");
    let c = rig.counters();
    assert_eq!(c.queue_records + c.delivered, 10, "the second page is stored: {c:?}");
    assert!(!rig.core.pressure.disk_full());
}

#[test]
fn no_fetch_starts_without_room_for_its_page_and_polling_pauses_as_for_a_full_disk() {
    let mut rig = Rig::new(Setup::default());
    rig.add(Feed::Audit, 5, UNIX0 - 1800);
    rig.core.page_wal = u64::MAX / 8;
    let turn = rig.turn();
    assert!(turn.jobs.is_empty(), "{:?}", turn.jobs);
    assert!(rig.core.pressure.disk_full());
    assert_eq!(turn.wake, rig.now().at + MIMECAST_BASE);
    assert_eq!(rig.net.lock().tokens, 0);
    // Room again (another process freed it): polling resumes when the pause is over.
    rig.core.page_wal = 256 * 1024;
    rig.advance_to(turn.wake);
    rig.settle();
    assert_eq!(rig.counters().delivered, 5);
    assert!(!rig.core.pressure.disk_full());
}

#[test]
fn a_drained_queue_gives_its_space_back_and_the_idle_shrink_runs_only_after_a_change() {
    let mut rig = Rig::new(Setup { page_size: 1000, ..Setup::default() });
    rig.add_sized(Feed::Audit, 400, UNIX0 - 1800, 20_000);
    let len = |r: &Rig| std::fs::metadata(r.dir.path().join("queue.db")).map(|m| m.len()).unwrap_or(0);
    let token = rig.turn().jobs;
    let page = rig.answer_all(token);
    let ahead = rig.answer_all(page);
    rig.answer_all(ahead);
    rig.core.store.checkpoint().expect("the WAL is folded in");
    let full = len(&rig);
    assert!(full > 8_000_000, "{full}");
    // Deliver it all, without a turn after the last answer.
    while rig.counters().queue_records > 0 {
        let turn = rig.turn();
        assert!(!turn.jobs.is_empty());
        rig.answer_all(turn.jobs);
    }
    let drained = len(&rig);
    assert!(rig.core.shrink_due);
    // The idle turn finds the queue empty: the rest of the space goes back.
    let turn = rig.turn();
    assert!(turn.jobs.is_empty());
    let shrunk = len(&rig);
    assert!(drained > 2_000_000 && shrunk < 1_000_000, "{full} {drained} {shrunk}");
    // The next look at the empty queue finds nothing more to give back, and the looks stop until the queue changes.
    rig.advance_to(turn.wake);
    let poll = rig.turn().jobs;
    assert_eq!(fetches(&poll), [Feed::Audit]);
    assert!(!rig.core.shrink_due, "nothing more to give back");
    rig.answer_all(poll);
    assert!(rig.core.shrink_due, "an answer may change the queue");
}

#[test]
fn once_waits_for_the_sends_in_flight_even_after_giving_up() {
    let mut rig = Rig::new(Setup { mode: Mode::Once, sends_in_flight: 2, page_size: 1000, ..Setup::default() });
    rig.add(Feed::Audit, 1500, UNIX0 - 1800);
    let token = rig.turn().jobs;
    let mut jobs = rig.answer_all(token);
    while let Some(job) = jobs.pop() {
        jobs.extend(rig.answer(job));
    }
    assert!(rig.core.poller.all_done());
    let send = rig.turn();
    assert_eq!(sends(&send.jobs), [1000, 500]);
    // The intake refuses the key: the sender gives up at the first answer, with the other batch still out.
    rig.net.lock().intake_status = Some(403);
    let mut send = send.jobs.into_iter();
    rig.answer_all(send.next().into_iter().collect());
    assert!(rig.core.sender.done());
    let turn = rig.turn();
    assert!(!turn.over && turn.jobs.is_empty(), "a send is still in flight");
    rig.answer_all(send.collect());
    assert!(rig.turn().over);
    assert_eq!(rig.core.outcome().ok(), Some(Outcome { queued: 1500, gave_up: true }));
}
