//! The agent's synchronous core: every decision of the main loop, and nothing that awaits, sleeps, reads a clock
//! or draws a random number it was not handed. The async shell ([`super`]) reads the clocks once per event, asks
//! the core what to start ([`Core::turn`]), runs the [`Job`]s it returns on smol's blocking pool, and hands each
//! answer back ([`Core::handle`]). The deterministic simulator (`tests/simulate`) drives the same core by simulated
//! clocks and peers.
//!
//! The core owns the SQLite store and the three policy machines of [`crate::policy`], and carries out what they
//! ask for: fetch, commit, send, remove, dead-letter, record an error, wait.

use std::time::{Duration, Instant};

use crate::config::Config;
use crate::datadog::batch::{self, MAX_LOG_BYTES, MAX_LOGS, MAX_PAYLOAD_BYTES};
use crate::datadog::bisect::Half;
use crate::datadog::logobj::Shape;
use crate::datadog::sink::{self, Sent};
use crate::datetime;
use crate::health;
use crate::http::Http;
use crate::mimecast::auth::{self, Accounts, AuthError, Token};
use crate::mimecast::client::{self, FetchError, Fetched, PageRequest};
use crate::mimecast::window::{self, Settings};
use crate::mimecast::{Feed, wire};
use crate::policy::poller::{Action as PollAction, Poller, PollerSettings};
use crate::policy::pressure::{self, Pause, Pressure, Room, SenderPause, Side, StoreFault};
use crate::policy::sender::{Action as SendAction, Batch, IntakeChange, Next, Sender, SenderSettings, Summary};
use crate::policy::{self, Mode, Now, PassState, Retries};
use crate::store::{InFlight, NewRecord, Note, PageCommit, Store, StoreError};

use super::{Outcome, RunError, Tuning};

/// Work the core asks for: blocking HTTP (and the parsing of what comes back) that the caller runs off the loop,
/// then hands back to [`Core::handle`] as the [`Done`] it returns. The shell runs it on smol's blocking pool; the
/// simulator runs it at a simulated time against simulated peers.
pub struct Job {
    pub kind: JobKind,
    work: Box<dyn FnOnce() -> Done + Send>,
}

/// What a [`Job`] is, for the caller: fetches are abandoned at shutdown (nothing of them is committed), sends are
/// awaited up to the grace (so that their batches leave the queue).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    /// A Mimecast token or page for this feed.
    Fetch(Feed),
    /// A batch to the Datadog intake, of this many logs.
    Send(usize),
}

impl Job {
    fn fetch(feed: Feed, work: impl FnOnce() -> Fetch + Send + 'static) -> Job {
        Job { kind: JobKind::Fetch(feed), work: Box::new(move || Done::Fetched(work())) }
    }

    /// Does the work (blocking), and returns what [`Core::handle`] takes.
    pub fn run(self) -> Done {
        (self.work)()
    }
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Job({:?})", self.kind)
    }
}

/// A job's answer.
pub enum Done {
    /// A token or a page came back.
    Fetched(Fetch),
    Sent(Batch, Sent),
}

impl Done {
    /// A short, stable description for a simulator's trace: what came back, without secrets or record text.
    pub fn describe(&self) -> String {
        match self {
            Done::Fetched(Fetch::Token(req, _, t)) => format!("token {} ok={}", req.feed, t.is_ok()),
            Done::Fetched(Fetch::Page(req, _, f, records)) => {
                let token = req.page_token.as_deref().map_or_else(|| "-".to_owned(), |t| crate::http::printable(t, 24));
                let result = match &f.result {
                    Ok(p) => format!("ok next={}", p.next.is_some()),
                    Err(e) => crate::http::printable(&e.to_string(), 80),
                };
                let keys: Vec<&str> = records.iter().map(|r| r.key.get(..12).unwrap_or(&r.key)).collect();
                let (from, to) = (req.window.from, req.window.to);
                format!("page {} [{from}, {to}] token={token} -> {result} records={keys:?}", req.feed)
            }
            Done::Sent(b, s) => format!("sent {} logs: {}", b.seqs.len(), s.detail),
        }
    }
}

/// What one turn of the loop asks the caller for.
#[derive(Debug)]
pub struct Turn {
    /// Work to start now.
    pub jobs: Vec<Job>,
    /// When to turn again if no job has come back by then.
    pub wake: Instant,
    /// `--once`: the pass is over; the caller stops.
    pub over: bool,
}

/// The retry rules of the store's pressure machine, which the shell also needs before the core exists.
pub(super) fn store_retries(cfg: &Config, tuning: &Tuning, mode: Mode) -> Retries {
    settings(cfg, tuning, mode).2
}

/// The machines' settings from the config and the tuning.
fn settings(cfg: &Config, tuning: &Tuning, mode: Mode) -> (PollerSettings, SenderSettings, Retries) {
    let retries = |backoff| Retries {
        mode,
        backoff,
        slow_retry: tuning.slow_retry,
        once_attempts: tuning.once_attempts,
        jitter: tuning.jitter,
    };
    let m = &cfg.mimecast;
    let poll_interval = m.poll_interval();
    let poller = PollerSettings {
        retries: retries(tuning.mimecast_backoff),
        window: Settings {
            overlap_secs: m.overlap_secs,
            settle_secs: m.settle_secs,
            max_window_secs: m.max_window_secs,
        },
        poll_interval,
        clock_floor: window::CLOCK_FLOOR,
    };
    let sender = SenderSettings {
        retries: retries(tuning.datadog_backoff),
        idle: poll_interval,
        summary_every: tuning.summary_every,
        max_in_flight: usize::try_from(cfg.datadog.sends_in_flight).unwrap_or(1),
    };
    (poller, sender, retries(tuning.mimecast_backoff))
}

/// The loop's state: the store, the HTTP client and the tokens it owns, and the three policy machines it feeds.
pub struct Core {
    cfg: Config,
    tuning: Tuning,
    mode: Mode,
    store: Store,
    http: Http,
    /// The Mimecast API applications the feeds poll under, and their tokens.
    accounts: Accounts,
    shape: Shape,
    poller: Poller,
    sender: Sender,
    pressure: Pressure,
    /// `--once`: polling gave up on a disk that stays full.
    disk_gave_up: bool,
    /// The most WAL a page commit has taken so far: how much room the next one may need.
    page_wal: u64,
    /// A "disk full" note for `status` may be stored: clear it at the next page committed.
    disk_note: bool,
    /// Bumped when a reload changes the Mimecast credentials; a fetch started under other ones brings back a
    /// token that is not kept.
    creds_generation: u64,
    /// Polling and delivery wait for the clock to be set ([`Poller::clock_unset`]), as the log said.
    clock_held: bool,
    /// The jobs handed out and not yet handed back: fetches and sends.
    fetches: usize,
    sends: usize,
    /// The queue changed since the idle shrink last found nothing to give back: look again when it is empty.
    shrink_due: bool,
}

impl Core {
    /// The core over an open store. A feed without a cursor gets one ([`Core::init_cursors`]).
    pub fn open(
        cfg: Config,
        tuning: Tuning,
        mode: Mode,
        store: Store,
        http: Http,
        now: Now,
    ) -> Result<Core, StoreError> {
        let (poller, sender, store_retries) = settings(&cfg, &tuning, mode);
        let mut core = Core {
            accounts: Accounts::of(&cfg.mimecast),
            shape: Shape::of(&cfg.datadog),
            poller: Poller::new(poller, &cfg.mimecast.feeds, now),
            sender: Sender::new(sender, now),
            pressure: Pressure::new(store_retries),
            cfg,
            tuning,
            mode,
            store,
            http,
            disk_gave_up: false,
            page_wal: 256 * 1024,
            disk_note: true,
            creds_generation: 0,
            clock_held: false,
            fetches: 0,
            sends: 0,
            shrink_due: true,
        };
        let (feeds, lookback) = (core.cfg.mimecast.feeds.clone(), core.cfg.mimecast.initial_lookback_secs);
        core.init_cursors(&feeds, now, lookback)?;
        Ok(core)
    }

    /// The one home of cursor creation: a feed without a cursor starts `initial_lookback_secs` behind the clock,
    /// and not by a clock that reads earlier than its floor (the feed's first poll creates its cursor then).
    fn init_cursors(&mut self, feeds: &[Feed], now: Now, lookback_secs: i64) -> Result<(), StoreError> {
        if self.poller.clock_unset(now).is_some() {
            return Ok(());
        }
        let start = now.unix - lookback_secs;
        for &feed in feeds {
            self.store.init_cursor(feed, start)?;
        }
        Ok(())
    }

    /// Jobs handed out and not yet handed back.
    pub fn in_flight(&self) -> usize {
        self.fetches + self.sends
    }

    /// How the run ended, for the caller.
    pub fn outcome(&self) -> Result<Outcome, StoreError> {
        Ok(Outcome { queued: self.store.counters()?.queue_records, gave_up: self.gave_up() })
    }

    /// The queue's counters, as `status` reads them (the simulator watches drops with them).
    pub fn counters(&self) -> Result<crate::store::Counters, StoreError> {
        self.store.counters()
    }

    fn gave_up(&self) -> bool {
        self.poller.gave_up() || self.sender.done() || self.disk_gave_up
    }

    /// One turn of the loop: measures the queue, starts every fetch and send that is due, and says when to turn
    /// again. In `--once` mode with nothing in flight, it also says whether the pass is over.
    pub fn turn(&mut self, now: Now) -> Result<Turn, RunError> {
        let mut jobs = Vec::new();
        // The queue's size against `max_bytes`, once: nothing is committed until the next event.
        let measured = self.measure_queue();
        self.absorb(measured, now, Side::Polling)?;
        loop {
            let started = self.start_fetch(now);
            match self.absorb(started, now, Side::Polling)?.flatten() {
                Some(job) => jobs.push(self.started(job)),
                None => break,
            }
        }
        loop {
            let started = self.start_send(now);
            match self.absorb(started, now, Side::Sending)?.flatten() {
                Some(job) => jobs.push(self.started(job)),
                None => break,
            }
        }
        let mut over = false;
        if self.mode == Mode::Once && self.in_flight() == 0 {
            let pass = self.pass_over();
            over = self.absorb(pass, now, Side::Polling)? == Some(true);
        }
        // A feed whose token is being fetched waits for that fetch, not for a timer.
        let (accounts, margin) = (&self.accounts, self.tuning.token_margin);
        let wake = policy::next_wake(
            now.at,
            self.poller
                .next_wake_where(now, |f| !accounts.waiting(f, now.at, margin))
                .filter(|_| !self.pressure.queue_full()),
            self.pressure.until(),
            self.sender.next_wake().filter(|_| !self.clock_held),
        );
        Ok(Turn { jobs, wake, over })
    }

    /// A job came back: the machines decide, the core commits, removes or records. It may ask for more work (a
    /// page read ahead, the page after a token).
    pub fn handle(&mut self, now: Now, done: Done) -> Result<Vec<Job>, RunError> {
        // Only an answer changes the queue (a page committed, a batch removed, a dead letter).
        self.shrink_due = true;
        let next = match done {
            Done::Fetched(fetch) => {
                self.fetches = self.fetches.saturating_sub(1);
                let handled = match fetch {
                    Fetch::Token(req, generation, token) => self.on_token(now, req, generation, token),
                    Fetch::Page(req, generation, f, records) => self.on_fetched(now, req, generation, f, records),
                };
                self.absorb(handled, now, Side::Polling)?.flatten()
            }
            Done::Sent(b, s) => {
                self.sends = self.sends.saturating_sub(1);
                let handled = self.on_sent(now, b, s);
                self.absorb(handled, now, Side::Sending)?;
                None
            }
        };
        Ok(next.into_iter().map(|job| self.started(job)).collect())
    }

    /// Counts a job handed out.
    fn started(&mut self, job: Job) -> Job {
        match job.kind {
            JobKind::Fetch(_) => self.fetches += 1,
            JobKind::Send(_) => self.sends += 1,
        }
        job
    }

    /// The jobs the caller dropped without running them to the end (a shutdown, a crash): their answers never
    /// come. Fetches left nothing committed, and sends are sent again.
    pub fn abandon_jobs(&mut self) {
        (self.fetches, self.sends) = (0, 0);
    }

    /// At shutdown, after the sends in flight were answered or abandoned: what stays behind, in the log.
    pub fn shutting_down(&self, unanswered: usize) {
        if unanswered > 0 {
            log::warn!(
                "shutting down with {unanswered} Datadog request(s) unanswered: those batches will be sent again"
            );
        }
        let undeleted = self.sender.undeleted();
        if undeleted > 0 {
            log::warn!(
                "shutting down with {undeleted} delivered records still in the queue (it could not be written): \
                 they will be sent again"
            );
        }
        match self.store.counters() {
            Ok(c) => log::info!("shutting down; {} records stay queued", c.queue_records),
            Err(e) => log::info!("shutting down ({e})"),
        }
    }

    /// The `STATUS=` line for systemd, when the store can be read now (the line only informs).
    pub fn status_line(&self, now: Now) -> Option<String> {
        match crate::status::gather(&self.store, &self.cfg, now.unix) {
            Ok(r) => Some(crate::status::one_line(&r.by_clock(now.unix), now.unix)),
            Err(e) => {
                log::debug!("no STATUS= for systemd this time: {e}");
                None
            }
        }
    }

    /// The daemon's health report to Datadog, when one is due ([`health::Reporter`]): gathered here from the store
    /// (a few indexed reads, once per interval) and sent by the reporter's own task, which nothing awaits. A store
    /// that cannot be read now skips the report; nothing here fails the loop or waits.
    pub fn report_health(&self, health: &mut health::Reporter, now: Now) {
        if self.mode == Mode::Once || !health.due(now.at, &self.cfg.telemetry) {
            return;
        }
        let live =
            health::Live { datadog_refused: self.sender.refused(), feeds_refused: self.poller.refused().collect() };
        match crate::status::gather(&self.store, &self.cfg, now.unix) {
            Ok(report) => health.send(&self.http, &self.cfg, &report, &live, now.unix),
            Err(e) => log::debug!("health report skipped: {e}"),
        }
    }

    /// SIGHUP: `cfg` takes effect at once, with `http` built from its `[http]`. The queue path cannot change under
    /// a running agent (the lock and the open database belong to the old one): such a config is refused and the
    /// running one stays, as is one whose new feeds' cursors the store cannot take now.
    pub fn reload(&mut self, cfg: Config, http: Http, from: &std::path::Path, now: Now) -> Result<(), RunError> {
        let refuse = |why: &dyn std::fmt::Display| {
            log::error!("reload: {why}; the running configuration stays in effect");
        };
        if cfg.queue.path != self.cfg.queue.path {
            refuse(&format!(
                "queue.path changed from {} to {}, which needs a restart",
                self.cfg.queue.path.display(),
                cfg.queue.path.display()
            ));
            return Ok(());
        }
        // New feeds' cursors first: if the store cannot take them now (disk full, locked), nothing has changed.
        let added: Vec<Feed> =
            cfg.mimecast.feeds.iter().copied().filter(|f| !self.poller.feeds().any(|s| s == *f)).collect();
        match self.init_cursors(&added, now, cfg.mimecast.initial_lookback_secs) {
            Err(e) if e.is_transient() => {
                refuse(&e);
                return Ok(());
            }
            Err(e) => return Err(e.into()),
            Ok(()) => {}
        }
        let (poller, sender, store_retries) = settings(&cfg, &self.tuning, self.mode);
        // Read before the accounts take the new credentials: a feed given other ones ends a slow retry.
        let new_creds: Vec<Feed> = (cfg.mimecast.feeds.iter().copied())
            .filter(|&f| self.accounts.creds(f).is_some_and(|c| *c != auth::Credentials::of(&cfg.mimecast, f)))
            .collect();
        self.poller.reconfigure(poller, &cfg.mimecast.feeds, now);
        for feed in new_creds {
            self.poller.on_new_credentials(feed, now);
        }
        self.sender.reconfigure(sender, now);
        let (old, new) = (&self.cfg, &cfg);
        self.sender.on_new_intake(
            IntakeChange {
                key: new.datadog.api_key != old.datadog.api_key,
                route: new.datadog.intake_url != old.datadog.intake_url
                    || new.http.proxy != old.http.proxy
                    || new.http.ca_file != old.http.ca_file
                    || new.http.timeout_secs != old.http.timeout_secs,
            },
            now,
        );
        self.pressure.reconfigure(store_retries);
        if self.accounts.reconfigure(&cfg.mimecast) {
            self.creds_generation += 1;
        }
        self.http = http;
        self.shape = Shape::of(&cfg.datadog);
        self.cfg = cfg;
        self.measure_queue()?;
        log::info!(
            "reload: configuration read again from {}; feeds: {}",
            from.display(),
            self.poller.feeds().map(Feed::name).collect::<Vec<_>>().join(", ")
        );
        Ok(())
    }

    /// Lets a transient store error (disk full, database locked by another process) pause the agent instead of
    /// ending it; every other error ends the run. Nothing is lost either way: what failed was not committed. The
    /// pressure machine says what the error costs polling and the sender on the loop's `side`
    /// ([`Pressure::on_store_error`]); this carries it out.
    fn absorb<T>(&mut self, result: Result<T, RunError>, now: Now, side: Side) -> Result<Option<T>, RunError> {
        let store_error = match result {
            Ok(v) => return Ok(Some(v)),
            Err(RunError::Store(e)) if e.is_transient() => e,
            Err(e) => return Err(e),
        };
        let fault = if store_error.is_disk_full() { StoreFault::DiskFull } else { StoreFault::Busy };
        let reaction = self.pressure.on_store_error(now, fault, side);
        if reaction.checkpoint {
            let _ = self.store.checkpoint();
        }
        match fault {
            StoreFault::DiskFull => self.disk_full_said(&store_error.to_string(), now, reaction.pause),
            StoreFault::Busy => {
                log::warn!("{store_error}; retrying in {:.1}s", reaction.pause.delay.as_secs_f64());
                self.stop_polling_if(reaction.pause);
            }
        }
        match reaction.sender {
            SenderPause::None => {}
            SenderPause::Failed => {
                self.sender.failed(now, Duration::ZERO);
            }
            SenderPause::Until(until) => self.sender.wait_until(until),
        }
        Ok(None)
    }

    /// A full disk is back-pressure: polling waits until a delivery frees space (or the wait passes); delivery
    /// goes on, since it is what frees space.
    fn disk_full(&mut self, why: &str, now: Now) {
        let pause = self.pressure.on_disk_full(now);
        self.disk_full_said(why, now, pause);
    }

    /// Says that the disk is full, in the log and for `status`, and stops a `--once` pass's polling if `pause` says so.
    fn disk_full_said(&mut self, why: &str, now: Now, pause: Pause) {
        let msg = format!(
            "disk full: {why}; polling Mimecast paused until delivery frees space (or {}s pass); delivery goes on; \
             nothing is lost",
            pause.delay.as_secs()
        );
        if pause.first {
            log::error!("{msg}");
        } else {
            log::debug!("{msg}");
        }
        self.stop_polling_if(pause);
        // Recorded for `status` if the disk still takes this small write; status also reads the free space.
        let _ = self.store.set_note(Note::DiskFull, now.unix, &msg);
        self.disk_note = true;
    }

    /// `--once` does not wait on the store for ever: polling stops for this pass when the pause says so.
    fn stop_polling_if(&mut self, pause: Pause) {
        if pause.give_up && self.poller.stop_all() {
            log::error!(
                "polling stops for this pass: the queue database could not take pages {} times",
                pause.failures
            );
        }
    }

    /// Whether the queue's filesystem has room for another page and what follows it ([`pressure::room`]): the
    /// agent checkpoints and gives free pages back first, and stops polling while a page would not fit, so it
    /// never fills the disk itself, and deletes (delivery) and checkpoints always have room.
    /// `pages`: the pages in flight and the one about to start, each of which may need that room.
    fn room_for_pages(&mut self, now: Now, pages: u64) -> Result<bool, RunError> {
        let (mut checkpointed, mut released) = (false, false);
        loop {
            let space = self.store.space()?;
            match pressure::room(space, self.page_wal.saturating_mul(pages), checkpointed, released) {
                Room::Fits => return Ok(true),
                Room::Checkpoint => {
                    self.store.checkpoint()?;
                    checkpointed = true;
                }
                Room::Release(bytes) => {
                    self.store.release_free_pages(bytes)?;
                    released = true;
                }
                Room::Full { need } => {
                    let why = format!(
                        "the filesystem of queue database {} has {} bytes free ({} reusable inside the queue), less \
                         than the {need} that the next page may need",
                        self.store.path().display(),
                        space.fs_free.unwrap_or(0),
                        space.reusable,
                    );
                    self.disk_full(&why, now);
                    return Ok(false);
                }
            }
        }
    }

    /// Writes a line of state that only informs `status`; a full disk or a held lock must not stop the work it
    /// describes.
    fn remember(&mut self, note: Note, at: i64, message: &str) -> Result<(), RunError> {
        informational(self.store.set_note(note, at, message))
    }

    /// `--once`: whether the pass is over ([`policy::pass_over`]).
    fn pass_over(&mut self) -> Result<bool, RunError> {
        let queue_empty = self.store.counters()?.queue_records == 0 && !self.sender.is_bisecting();
        let (over, disk_gave_up) = policy::pass_over(PassState {
            feeds_done: self.poller.all_done(),
            sender_done: self.sender.done(),
            queue_empty,
            waiting_for_room: self.pressure.waiting_for_room(),
            disk_full: self.pressure.disk_full(),
        });
        if disk_gave_up && !self.disk_gave_up {
            log::error!("polling stopped for this pass: the disk stays full with nothing left to deliver");
            self.disk_gave_up = true;
        }
        Ok(over)
    }

    /// Measures the queue against `max_bytes` for the pressure machine; says whether it is full.
    fn measure_queue(&mut self) -> Result<bool, RunError> {
        let c = self.store.counters()?;
        let full = self.cfg.queue.paused_at(c.queue_bytes);
        match self.pressure.on_queue_size(full) {
            Some(true) => log::warn!(
                "queue full ({} bytes of max_bytes {}): polling Mimecast paused until Datadog drains it; Mimecast \
                 keeps the data and no cursor moves",
                c.queue_bytes,
                self.cfg.queue.max_bytes
            ),
            Some(false) => log::info!("queue below max_bytes again: polling resumed"),
            None => {}
        }
        Ok(full)
    }

    /// Asks the poller which feed is due and starts fetching its next page. One fetch per feed may be in flight.
    /// Without a fresh token, the first fetch fetches one on its own (a task of its own, so that a page that hangs
    /// afterwards holds up no other feed), and the other feeds of the same API application wait for it.
    fn start_fetch(&mut self, now: Now) -> Result<Option<Job>, RunError> {
        if self.clock_unset(now) || !self.pressure.may_poll(now) {
            return Ok(None);
        }
        let margin = self.tuning.token_margin;
        while let Some(feed) = self.poller.due_where(now, |f| !self.accounts.waiting(f, now.at, margin)) {
            let cursor = match self.store.cursor(feed)? {
                Some(cursor) => cursor,
                // A feed enabled while the clock was not set yet.
                None => {
                    self.init_cursors(&[feed], now, self.cfg.mimecast.initial_lookback_secs)?;
                    self.store.cursor(feed)?.ok_or(RunError::Broken("cursor row missing"))?
                }
            };
            let Some(plan) = self.poller.plan(now, feed, cursor.watermark, cursor.keys_since, cursor.window) else {
                continue;
            };
            if !self.room_for_pages(now, self.fetches as u64 + 1)? {
                return Ok(None);
            }
            self.poller.on_fetching(feed);
            let req = PageRequest {
                feed,
                window: plan.window,
                page_token: plan.page_token,
                page_size: self.cfg.mimecast.page_size,
            };
            if !self.accounts.fresh(feed, now.at, margin) {
                let creds = self
                    .accounts
                    .creds(feed)
                    .ok_or(RunError::Broken("credentials missing for an enabled feed"))?
                    .clone();
                self.accounts.on_fetching(feed);
                let (http, generation) = (self.http.clone(), self.creds_generation);
                return Ok(Some(Job::fetch(feed, move || {
                    let token = auth::fetch_token(&http, &creds, now.at);
                    Fetch::Token(req, generation, token)
                })));
            }
            return self.fetch_page(now, req).map(Some);
        }
        Ok(None)
    }

    /// Whether polling and delivery wait for the clock to be set: the poller has no feed due while the clock reads
    /// earlier than its floor, and [`Core::start_send`] starts nothing. Said once in the log when it starts and when
    /// it ends; `status` says it from its own clock.
    fn clock_unset(&mut self, now: Now) -> bool {
        let said = self.poller.clock_unset(now);
        match (&said, self.clock_held) {
            (Some(said), false) => log::error!("{said}"),
            (None, true) => {
                log::info!("the system clock reads {}: polling Mimecast resumes", datetime::rfc3339(now.unix))
            }
            _ => {}
        }
        self.clock_held = said.is_some();
        self.clock_held
    }

    /// Starts the fetch of a page with the token in hand (a 401 still fetches a new one and retries once).
    fn fetch_page(&self, now: Now, req: PageRequest) -> Result<Job, RunError> {
        let creds =
            self.accounts.creds(req.feed).ok_or(RunError::Broken("credentials missing for an enabled feed"))?.clone();
        let (http, token, generation, margin) = (
            self.http.clone(),
            self.accounts.token(req.feed).cloned(),
            self.creds_generation,
            self.tuning.token_margin,
        );
        Ok(Job::fetch(req.feed, move || {
            let mut f = client::fetch_page(&http, &creds, token, &req, margin, now.at, now.unix.saturating_mul(1000));
            // Each record's key, time and queued text are made here, on the pool, while the loop commits the page
            // before; each parsed record is dropped as soon as it is done with. The page keeps the digest of its
            // keys, for the poller to tell a page that only repeats the one before.
            let records = f.result.as_mut().ok().map(|page| {
                let records = prepare(req.feed, std::mem::take(&mut page.records));
                page.keys = Some(wire::keys_digest(records.iter().map(|r| r.key.as_str())));
                records
            });
            Fetch::Page(req, generation, f, records.unwrap_or_default())
        }))
    }

    /// A token came back for the fetch of `req`: keep it and fetch the page, or count the failure against the
    /// feed. A token fetched under credentials a reload has replaced is dropped, and the feed tries again.
    fn on_token(
        &mut self,
        now: Now,
        req: PageRequest,
        generation: u64,
        token: Result<Token, AuthError>,
    ) -> Result<Option<Job>, RunError> {
        // Credentials a reload replaced, or a feed it disabled meanwhile (whose credentials may be gone).
        if generation != self.creds_generation || !self.poller.feeds().any(|f| f == req.feed) {
            self.poller.on_abandoned(req.feed);
            return Ok(None);
        }
        self.accounts.on_fetched(req.feed, token.as_ref().ok().cloned());
        match token {
            Ok(_) => self.fetch_page(now, req).map(Some),
            Err(e) => {
                let fetched = Fetched { result: Err(FetchError::Auth(e)), new_token: None, throttle: None };
                self.on_fetched(now, req, generation, fetched, Vec::new())
            }
        }
    }

    /// A page or a failure came back: the poller decides, the loop commits or records. The next page of the
    /// window is fetched while this one is committed (read-ahead): that fetch comes back as the task.
    fn on_fetched(
        &mut self,
        now: Now,
        req: PageRequest,
        generation: u64,
        fetched: Fetched,
        mut records: Vec<NewRecord>,
    ) -> Result<Option<Job>, RunError> {
        if let Some(t) = fetched.new_token.filter(|_| generation == self.creds_generation) {
            self.accounts.renewed(req.feed, t);
        }
        let page = fetched.result.as_ref().map_err(Clone::clone);
        let mut ahead = None;
        for action in self.poller.on_page(now, &req, page, fetched.throttle) {
            match action {
                PollAction::Commit { next_token, forget_before } => {
                    if fetched.result.is_err() {
                        continue;
                    }
                    if self.pressure.queue_full() {
                        // The queue filled while this page was in flight (a page read ahead, or another feed's):
                        // it is not stored, the cursor stays, and the page is read again once there is room.
                        log::debug!("{}: queue full; a page that came back is read again later", req.feed);
                        self.poller.on_abandoned(req.feed);
                        continue;
                    }
                    if !self.follows_cursor(&req)? {
                        log::warn!(
                            "{}: a page came back that no longer follows the stored cursor; it is not stored, and \
                             the feed goes on from the cursor",
                            req.feed
                        );
                        self.poller.on_abandoned(req.feed);
                        continue;
                    }
                    ahead = self.read_ahead(now, req.feed)?;
                    if let Err(e) = self.commit(now, &req, std::mem::take(&mut records), next_token, forget_before) {
                        // The page read ahead follows one that is not stored: drop it; the feed starts again from
                        // the cursor when it may.
                        if ahead.take().is_some() {
                            self.poller.on_abandoned(req.feed);
                        }
                        return Err(e);
                    }
                }
                PollAction::RecordError(msg) => informational(self.store.feed_error(req.feed, &msg, now.unix))?,
                PollAction::RestartWindow => self.store.restart_window(req.feed)?,
            }
        }
        Ok(ahead)
    }

    /// Whether the stored cursor points at the page `req` read: the window in progress and the token it was read
    /// with, or no window in progress for a window's first page. Every page passes but one read ahead of a page
    /// whose commit failed, or one a reload left behind: the loop is the queue's only writer, so this read is as
    /// good as a check inside the commit.
    fn follows_cursor(&self, req: &PageRequest) -> Result<bool, RunError> {
        let cursor = self.store.cursor(req.feed)?.ok_or(RunError::Broken("cursor row missing"))?;
        Ok(match &cursor.window {
            Some((w, token)) => *w == req.window && *token == req.page_token,
            None => req.page_token.is_none(),
        })
    }

    /// Starts fetching the page after the one about to be committed, if the poller allows it, the feed's token is
    /// fresh, and the disk has room for both pages without a checkpoint or a release (those are for
    /// [`Core::start_fetch`] to do).
    fn read_ahead(&mut self, now: Now, feed: Feed) -> Result<Option<Job>, RunError> {
        if !self.pressure.may_poll(now) || !self.accounts.fresh(feed, now.at, self.tuning.token_margin) {
            return Ok(None);
        }
        // The fetches in flight, the page about to be committed and the one read ahead.
        let pages = self.poller.fetching() as u64 + 2;
        if pressure::room(self.store.space()?, self.page_wal.saturating_mul(pages), true, true) != Room::Fits {
            return Ok(None);
        }
        let Some(plan) = self.poller.read_ahead(feed) else { return Ok(None) };
        let req = PageRequest {
            feed,
            window: plan.window,
            page_token: plan.page_token,
            page_size: self.cfg.mimecast.page_size,
        };
        self.fetch_page(now, req).map(Some)
    }

    /// Stores a page's records and the feed's next token in one transaction.
    fn commit(
        &mut self,
        now: Now,
        req: &PageRequest,
        records: Vec<NewRecord>,
        next_token: Option<String>,
        forget_before: i64,
    ) -> Result<(), RunError> {
        let commit = PageCommit { feed: req.feed, window: req.window, next_token, records, forget_before };
        let wal_before = self.store.wal_bytes();
        // `drop-oldest` leaves what is in flight (per feed, every record up to the highest one sent) and what was
        // delivered but is still to be removed: dropping those would count as dropped records that Datadog has.
        let in_flight = InFlight::new(|feed| self.sender.sent_up_to(feed), self.sender.undeleted_seqs());
        let (max_bytes, when_full) = (self.cfg.queue.max_bytes, self.cfg.queue.when_full);
        let out = self.store.commit_page(&commit, now.unix, max_bytes, when_full, &in_flight)?;
        self.page_wal = self.page_wal.max(self.store.wal_bytes().saturating_sub(wal_before));
        if out.dropped > 0 {
            log::warn!(
                "queue full: dropped the {} oldest records (when_full = \"drop-oldest\"); {} dropped in total",
                out.dropped,
                self.store.counters()?.dropped
            );
        }
        if out.queued > 0 {
            self.sender.on_queued(now);
        }
        self.poller.on_committed(now, req.feed, out.queued, out.skipped);
        if self.pressure.on_page_committed() {
            log::info!("queue database takes pages again: polling resumed");
        }
        // The note may be left from an earlier run, even when this one never saw the disk full.
        if std::mem::take(&mut self.disk_note) {
            informational(self.store.clear_note(Note::DiskFull))?;
        }
        Ok(())
    }

    /// Asks the sender what to do: remove a delivered batch, or load, pack and send the next one.
    fn start_send(&mut self, now: Now) -> Result<Option<Job>, RunError> {
        // By a clock that is not set yet, every queued record would be "in the future" and restamped to it, which
        // Datadog drops as too old: the queue waits for the clock, as polling does.
        if self.clock_held {
            return Ok(None);
        }
        // A piece goes whole, as it was cut from a batch; only a fresh batch is packed under the learnt limit.
        let (records, half, limit) = loop {
            match self.sender.next(now) {
                None => return Ok(None),
                Some(Next::Remove(b)) => {
                    self.remove_delivered(now, b)?;
                    return Ok(None);
                }
                Some(Next::Piece(piece)) => {
                    let records = self.store.load(&piece.seqs)?;
                    if !records.is_empty() {
                        break (records, piece.half, MAX_PAYLOAD_BYTES);
                    }
                }
                Some(Next::Fresh) => {
                    let after = |feed| self.sender.sent_up_to(feed);
                    // A body is at most its log's size, so this reads what the packer can take, and under a learnt
                    // limit one log more (at most 1 MB), the companion of a first log over the limit.
                    let limit = self.sender.payload_limit(now);
                    let read = limit.saturating_add(MAX_LOG_BYTES).min(MAX_PAYLOAD_BYTES);
                    let candidates = self.store.candidates_within(MAX_LOGS, read, after)?;
                    break (batch::fair_order(candidates), Half::Whole, limit);
                }
            }
        };
        let order: Vec<(i64, Feed)> = records.iter().map(|q| (q.seq, q.feed)).collect();
        let had_records = !records.is_empty();
        let packed = batch::pack_within(records, &self.shape, now.unix, limit);
        for t in &packed.too_large {
            let reason = format!("log of {} bytes exceeds Datadog's 1 MB limit; not sent", t.bytes);
            self.store.dead_letter(t.seq, &reason, now.unix)?;
            log::error!("{}: record {} {reason}; kept as a dead letter", t.feed, crate::http::printable(&t.key, 200));
        }
        if packed.seqs.is_empty() {
            if let Some(s) = self.sender.on_nothing_sent(now, had_records) {
                self.log_summary(s);
            }
            if !had_records && self.sender.in_flight() == 0 && self.shrink_due {
                // The queue is empty: what is left of a backlog's space goes back, up to 128 MiB per look (a few
                // hundred milliseconds of a loop that has nothing else to do), until a look gives nothing back.
                let shrunk = self.store.shrink(16_384);
                self.shrink_due = shrunk.as_ref().map_or(true, |&bytes| bytes > 0);
                informational(shrunk.map(drop))?;
            }
            return Ok(None);
        }
        let last = last_per_feed(&order, packed.seqs.last().copied().unwrap_or(i64::MIN));
        let bytes = packed.payload.len();
        let b = Batch { seqs: packed.seqs, restamped: packed.restamped, kept: packed.kept, bytes, half, last };
        self.sender.on_sending(&b);
        let (http, url, key, payload) = (
            self.http.clone(),
            self.cfg.datadog.intake_url.as_str().to_owned(),
            self.cfg.datadog.api_key.clone(),
            packed.payload,
        );
        Ok(Some(Job {
            kind: JobKind::Send(b.seqs.len()),
            work: Box::new(move || {
                let sent = sink::send(&http, &url, &key, payload);
                Done::Sent(b, sent)
            }),
        }))
    }

    /// The intake answered: the sender decides, the loop removes, dead-letters or records.
    fn on_sent(&mut self, now: Now, b: Batch, sent: Sent) -> Result<(), RunError> {
        for action in self.sender.on_answer(now, b, &sent) {
            match action {
                SendAction::Remove(b) => self.remove_delivered(now, b)?,
                SendAction::DeadLetter { seqs, reason } => {
                    for seq in seqs {
                        self.store.dead_letter(seq, &reason, now.unix)?;
                        log::error!("{reason}; kept as a dead letter (see `mimecast-forwarder dead-letters list`)");
                    }
                }
                SendAction::RecordError(msg) => self.remember(Note::DatadogLastError, now.unix, &msg)?,
            }
        }
        Ok(())
    }

    /// Removes a batch Datadog accepted. If the store cannot take the write now (disk full, locked), the sender
    /// keeps it and asks for its removal again before anything else is sent: sending more would send it twice.
    fn remove_delivered(&mut self, now: Now, mut b: Batch) -> Result<(), RunError> {
        let mut result = self.store.delivered(&b.seqs, b.restamped, b.kept, now.unix);
        if result.as_ref().is_err_and(StoreError::is_disk_full) {
            // One transaction deleting a whole batch needs WAL room for every page it touches. On a full disk,
            // delete it in small steps, each followed by a checkpoint that gives the WAL's space back.
            result = self.remove_in_steps(&mut b, now);
        }
        let removed = match result {
            Ok(n) => n,
            Err(e) if e.is_transient() => {
                let n = b.seqs.len();
                let delay = self.sender.on_remove_failed(now, b);
                log::error!(
                    "Datadog accepted {n} records, but removing them from the queue failed: {e}; retrying the removal \
                     in {:.1}s before anything else is sent",
                    delay.as_secs_f64()
                );
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        if b.kept > 0 {
            log::warn!("sent {} late records unchanged (late_records = \"keep\"): Datadog may drop them", b.kept);
        }
        if let Some(s) = self.sender.on_removed(now, removed) {
            self.log_summary(s);
        }
        self.pressure.on_delivered(now);
        // A drained backlog gives its space back, 2 MiB per batch (nothing happens while one is still draining);
        // like a note, this must not stop delivery when the disk or the lock says no.
        informational(self.store.shrink(256).map(drop))?;
        Ok(())
    }

    /// Removes a delivered batch from the queue a few records per transaction. What was removed leaves `b`, so
    /// a failure part way keeps only the rest for the retry.
    fn remove_in_steps(&mut self, b: &mut Batch, now: Now) -> Result<u64, StoreError> {
        const STEP: usize = 32;
        let mut removed = 0;
        self.store.checkpoint()?;
        while !b.seqs.is_empty() {
            let step: Vec<i64> = b.seqs.iter().copied().take(STEP).collect();
            removed += self.store.delivered(&step, b.restamped, b.kept, now.unix)?;
            b.seqs.drain(..step.len());
            (b.restamped, b.kept) = (0, 0);
            self.store.checkpoint()?;
        }
        Ok(removed)
    }

    /// The drain's summary line.
    fn log_summary(&self, s: Summary) {
        let queued = self.store.counters().map(|c| c.queue_records).unwrap_or(-1);
        log::info!(
            "delivered {} records to Datadog in {:.1}s ({:.0}/s); {queued} queued",
            s.delivered,
            s.elapsed.as_secs_f64(),
            s.delivered as f64 / s.elapsed.as_secs_f64().max(0.001)
        );
    }
}

/// What a fetch job brings back, with the credentials generation it started under.
pub enum Fetch {
    Token(PageRequest, u64, Result<Token, AuthError>),
    /// The page, with its records taken out and made ready for the queue.
    Page(PageRequest, u64, Fetched, Vec<NewRecord>),
}

/// Each record of a page as the queue keeps it: its key, its time and its compact text.
fn prepare(feed: Feed, records: Vec<serde_json::Value>) -> Vec<NewRecord> {
    records
        .into_iter()
        .map(|r| NewRecord {
            key: wire::record_key(feed, &r),
            event_time: wire::record_time(feed, &r),
            body: wire::body(&r),
        })
        .collect()
}

/// The highest sequence number of each feed among `order` up to and including `upto` (a batch packs a prefix of
/// its candidates, less those set aside as too large).
fn last_per_feed(order: &[(i64, Feed)], upto: i64) -> Vec<(Feed, i64)> {
    let mut last: Vec<(Feed, i64)> = Vec::new();
    for &(seq, feed) in order {
        match last.iter_mut().find(|(f, _)| *f == feed) {
            Some((_, s)) => *s = (*s).max(seq),
            None => last.push((feed, seq)),
        }
        if seq == upto {
            break;
        }
    }
    last
}

/// The result of a write that only informs `status` (an error line, a note): a full disk or a held lock is
/// ignored, since it must not stop the work the line describes; any other store error still counts.
fn informational(written: Result<(), StoreError>) -> Result<(), RunError> {
    match written {
        Err(e) if !e.is_transient() => Err(e.into()),
        _ => Ok(()),
    }
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
