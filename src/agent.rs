//! The main loop: one smol executor on one thread owns the SQLite store and all state. Blocking HTTP runs on
//! smol's blocking pool through `smol::unblock`: one Mimecast fetch per feed and up to `datadog.sends_in_flight`
//! Datadog sends are in flight, and every task is awaited in the loop below, none detached. Every decision is
//! made on this thread, between awaits, from one closed set of [`Event`]s, by the machines of [`crate::policy`];
//! the loop reads the clock once per event and carries out what they ask for. The daemon's health report to
//! Datadog ([`health`]) is one more task, held by the loop and dropped with it, but never awaited: it cannot
//! hold up a send.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use smol::Task;
use smol::future::FutureExt as _;

use crate::backoff::Backoff;
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
pub use crate::policy::Mode;
use crate::policy::poller::{Action as PollAction, Poller, PollerSettings};
use crate::policy::pressure::{self, Pause, Pressure, Room};
use crate::policy::sender::{Action as SendAction, Batch, Next, Sender, SenderSettings, Summary};
use crate::policy::{self, Now, PassState, Retries};
use crate::sd_notify::Notifier;
use crate::store::{InFlight, NewRecord, Note, PageCommit, Store, StoreError};

/// The wall clock in Unix seconds, as a parameter so that tests can move time instead of sleeping.
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> i64 + Send + Sync>);

impl Clock {
    pub fn system() -> Clock {
        Clock(Arc::new(datetime::now))
    }

    /// The system clock shifted by a number of seconds that the caller can change at any time.
    pub fn shifted(offset: Arc<AtomicI64>) -> Clock {
        Clock(Arc::new(move || datetime::now() + offset.load(Ordering::SeqCst)))
    }

    pub fn now(&self) -> i64 {
        (self.0)()
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Clock({})", self.now())
    }
}

/// Timing knobs that are not user settings. Tests and `demo` shorten them; the daemon uses the defaults.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// Where window ends, queue times and late-record decisions get "now" from.
    pub clock: Clock,
    pub mimecast_backoff: Backoff,
    pub datadog_backoff: Backoff,
    /// The retry interval when an operator must act: refused credentials, a missing permission, a refused key.
    pub slow_retry: Duration,
    /// Refresh the Mimecast token this long before it expires.
    pub token_margin: Duration,
    /// In `--once` mode, give up on a feed or on Datadog after this many consecutive failures.
    pub once_attempts: u32,
    /// On shutdown, wait this long for a Datadog send in flight so its batch is not sent twice.
    pub shutdown_grace: Duration,
    /// How often a busy drain logs its summary line.
    pub summary_every: Duration,
    /// The jitter of every backoff, a draw in `[0, 1)`: random, so that agents that failed together do not
    /// retry together.
    pub jitter: fn() -> f64,
}

impl Default for Tuning {
    fn default() -> Tuning {
        Tuning {
            clock: Clock::system(),
            mimecast_backoff: Backoff { base: Duration::from_secs(2), cap: Duration::from_secs(300) },
            datadog_backoff: Backoff { base: Duration::from_secs(1), cap: Duration::from_secs(120) },
            slow_retry: Duration::from_secs(300),
            token_margin: Duration::from_secs(120),
            once_attempts: 3,
            shutdown_grace: Duration::from_secs(5),
            summary_every: Duration::from_secs(60),
            jitter: fastrand::f64,
        }
    }
}

/// `run --once` by a clock that reads earlier than [`window::CLOCK_FLOOR`]: nothing was done (try again later, once
/// the clock is set). Its message is what the daemon logs while it waits for the clock.
#[derive(Debug)]
pub struct ClockUnset(pub String);

impl std::fmt::Display for ClockUnset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ClockUnset {}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Records still queued at exit.
    pub queued: i64,
    /// `--once`: a feed or the intake gave up during this pass (a cron user must see it: exit 69).
    pub gave_up: bool,
}

/// Everything that can wake the main loop.
enum Event {
    Shutdown,
    /// SIGHUP: read the config file again.
    Reload,
    /// A token or a page came back.
    Fetched(Fetch),
    Sent(Batch, Sent),
    /// A timer fired: a feed or the sender may be due.
    Wake,
}

/// The loop's state: the store, the HTTP client and the tokens it owns, and the three policy machines it feeds.
struct Agent {
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
}

/// SIGHUP and the config file it makes the agent read again (`systemctl reload`).
pub struct Reload {
    pub path: PathBuf,
    pub signal: crate::signals::Hangups,
}

/// Runs the agent until `shutdown` resolves (or, in `--once` mode, until the pass is over).
pub async fn run(
    cfg: &Config,
    tuning: &Tuning,
    mode: Mode,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<Outcome> {
    run_with_reload(cfg, tuning, mode, shutdown, None, Notifier::disabled()).await
}

/// [`run`], re-reading the config file on each SIGHUP that `reload` receives, and telling systemd through
/// `notify` when it is ready, that it is alive (the watchdog), what it is doing, and when it stops.
pub async fn run_with_reload(
    cfg: &Config,
    tuning: &Tuning,
    mode: Mode,
    shutdown: impl Future<Output = ()>,
    reload: Option<Reload>,
    mut notify: Notifier,
) -> anyhow::Result<Outcome> {
    // A pass by a clock that is not set yet would move the watermarks back to it: it does nothing, not even take
    // the lock, and says to try again later.
    if let Some(said) = window::clock_unset(tuning.clock.now(), window::CLOCK_FLOOR).filter(|_| mode == Mode::Once) {
        return Err(ClockUnset(said).into());
    }
    let _instance = crate::instance::acquire(&cfg.queue.path, tuning.clock.now())?;
    let http = Http::new(&cfg.http).context("setting up HTTP")?;
    let mut shutdown = pin!(shutdown);
    // A database locked by another process, or a full disk, at start is waited out like any later one: the same
    // pressure rule, its backoff and its `--once` give-up.
    let mut pressure = Pressure::new(settings(cfg, tuning, mode).2);
    let mut agent = loop {
        let now = Now { at: Instant::now(), unix: tuning.clock.now() };
        let opened = Store::open(&cfg.queue.path)
            .and_then(|store| Agent::new(cfg.clone(), tuning.clone(), mode, store, http.clone(), now));
        let e = match opened {
            Ok(agent) => break agent,
            Err(e) if e.is_transient() => e,
            Err(e) => return Err(e.into()),
        };
        let pause = pressure.on_busy(now);
        if pause.give_up {
            return Err(e.into());
        }
        log::warn!("{e}; trying again in {:.1}s", pause.delay.as_secs_f64());
        notify.status(now.at, &format!("waiting for the queue database: {e}"));
        let stopped = async {
            (&mut shutdown).await;
            true
        }
        .or(async {
            // Waiting is not being stuck: the watchdog is pinged through the wait.
            let until = now.at + pause.delay;
            while Instant::now() < until {
                smol::Timer::at(notify.wake_by(until)).await;
                notify.on_turn(Instant::now());
            }
            false
        });
        if stopped.await {
            notify.stopping();
            return Ok(Outcome { queued: 0, gave_up: false });
        }
    };
    notify.ready();
    let ended = agent.main_loop(shutdown, reload, &mut notify).await;
    notify.stopping();
    ended?;
    Ok(Outcome { queued: agent.store.counters()?.queue_records, gave_up: agent.gave_up() })
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

impl Agent {
    fn new(
        cfg: Config,
        tuning: Tuning,
        mode: Mode,
        mut store: Store,
        http: Http,
        now: Now,
    ) -> Result<Agent, StoreError> {
        let (poller, sender, store_retries) = settings(&cfg, &tuning, mode);
        // A new feed starts `initial_lookback_secs` behind the clock: not a clock that is not set yet (the feed's
        // first poll creates its cursor then).
        if now.unix >= poller.clock_floor {
            let start = now.unix - cfg.mimecast.initial_lookback_secs;
            for &feed in &cfg.mimecast.feeds {
                store.init_cursor(feed, start)?;
            }
        }
        Ok(Agent {
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
        })
    }

    /// The one reading of the clocks for an event. Nothing below the loop reads a clock.
    fn now(&self) -> Now {
        Now { at: Instant::now(), unix: self.tuning.clock.now() }
    }

    fn gave_up(&self) -> bool {
        self.poller.gave_up() || self.sender.done() || self.disk_gave_up
    }

    async fn main_loop(
        &mut self,
        shutdown: impl Future<Output = ()>,
        reload: Option<Reload>,
        notify: &mut Notifier,
    ) -> anyhow::Result<()> {
        let mut shutdown = pin!(shutdown);
        // Every task is awaited here or dropped at shutdown; none is detached.
        let mut fetches: Vec<Task<Fetch>> = Vec::new();
        let mut sends: Vec<Task<(Batch, Sent)>> = Vec::new();
        // The agent's own health: its one task is never awaited, so it cannot hold up anything here.
        let mut health = health::Reporter::default();
        let once = self.mode == Mode::Once;
        loop {
            let now = self.now();
            self.tell_systemd(notify, now);
            // The queue's size against `max_bytes`, once: nothing is committed until the next event.
            let measured = self.measure_queue();
            self.absorb(measured, now, false)?;
            loop {
                let started = self.start_fetch(now, fetches.len());
                match self.absorb(started, now, false)?.flatten() {
                    Some(t) => fetches.push(t),
                    None => break,
                }
            }
            loop {
                let started = self.start_send(now);
                match self.absorb(started, now, true)?.flatten() {
                    Some(t) => sends.push(t),
                    None => break,
                }
            }
            self.report_health(&mut health, now);
            if once && fetches.is_empty() && sends.is_empty() {
                let over = self.pass_over();
                if self.absorb(over, now, false)? == Some(true) {
                    return Ok(());
                }
            }
            // A feed whose token is being fetched waits for that fetch, not for a timer.
            let (accounts, margin) = (&self.accounts, self.tuning.token_margin);
            let wake = notify.wake_by(policy::next_wake(
                now.at,
                self.poller
                    .next_wake_where(now, |f| !accounts.waiting(f, now.at, margin))
                    .filter(|_| !self.pressure.queue_full()),
                self.pressure.until(),
                self.sender.next_wake().filter(|_| !self.clock_held),
            ));
            let wake = health.next_wake().map_or(wake, |h| wake.min(h));
            let event = async { Event::Fetched(first(&mut fetches).await) }
                .or(async {
                    let (b, s) = first(&mut sends).await;
                    Event::Sent(b, s)
                })
                .or(async {
                    (&mut shutdown).await;
                    Event::Shutdown
                })
                .or(async {
                    match &reload {
                        Some(r) => {
                            r.signal.next().await;
                            Event::Reload
                        }
                        None => std::future::pending().await,
                    }
                })
                .or(async {
                    smol::Timer::at(wake).await;
                    Event::Wake
                })
                .await;
            let now = self.now();
            match event {
                Event::Fetched(Fetch::Token(req, generation, token)) => {
                    let handled = self.on_token(now, req, generation, token);
                    fetches.extend(self.absorb(handled, now, false)?.flatten());
                }
                Event::Fetched(Fetch::Page(req, generation, f, records)) => {
                    let handled = self.on_fetched(now, req, generation, f, records);
                    fetches.extend(self.absorb(handled, now, false)?.flatten());
                }
                Event::Sent(b, s) => {
                    let handled = self.on_sent(now, b, s);
                    self.absorb(handled, now, true)?;
                }
                Event::Wake => {}
                Event::Reload => {
                    if let Some(r) = &reload {
                        self.reload(&r.path, now)?;
                    }
                }
                Event::Shutdown => {
                    notify.stopping();
                    // Fetches in flight are abandoned: nothing of them is committed, so they are read again.
                    drop(fetches);
                    self.finish_sends(sends).await?;
                    let undeleted = self.sender.undeleted();
                    if undeleted > 0 {
                        log::warn!(
                            "shutting down with {undeleted} delivered records still in the queue (it could not be \
                             written): they will be sent again"
                        );
                    }
                    match self.store.counters() {
                        Ok(c) => log::info!("shutting down; {} records stay queued", c.queue_records),
                        Err(e) => log::info!("shutting down ({e})"),
                    }
                    return Ok(());
                }
            }
        }
    }

    /// The loop turn's word to systemd: the watchdog's ping (only here, so a loop that stops turning is restarted)
    /// and, every few seconds, the `STATUS=` line if it changed. The line only informs: a store that cannot be
    /// read now leaves the last one standing.
    fn tell_systemd(&self, notify: &mut Notifier, now: Now) {
        notify.on_turn(now.at);
        if notify.status_due(now.at) {
            match crate::status::gather(&self.store, &self.cfg, now.unix) {
                Ok(r) => notify.status(now.at, &crate::status::one_line(&r.by_clock(now.unix), now.unix)),
                Err(e) => log::debug!("no STATUS= for systemd this time: {e}"),
            }
        }
    }

    /// At shutdown, the sends in flight are awaited up to the grace, so that their batches leave the queue and are
    /// not sent again; the rest are abandoned and will be.
    async fn finish_sends(&mut self, mut sends: Vec<Task<(Batch, Sent)>>) -> anyhow::Result<()> {
        let deadline = Instant::now() + self.tuning.shutdown_grace;
        while !sends.is_empty() {
            let answered = async { Some(first(&mut sends).await) }.or(async {
                smol::Timer::at(deadline).await;
                None
            });
            let Some((b, s)) = answered.await else {
                log::warn!(
                    "shutting down with {} Datadog request(s) unanswered: those batches will be sent again",
                    sends.len()
                );
                break;
            };
            let now = self.now();
            let handled = self.on_sent(now, b, s);
            self.absorb(handled, now, true)?;
        }
        Ok(())
    }

    /// SIGHUP: a valid config takes effect at once; an invalid one is refused and the running one stays. The
    /// queue path cannot change under a running agent (the lock and the open database belong to the old one).
    fn reload(&mut self, path: &Path, now: Now) -> anyhow::Result<()> {
        let refuse = |why: &dyn std::fmt::Display| {
            log::error!("reload: {why}; the running configuration stays in effect");
        };
        let cfg = match crate::cli::load_config(path) {
            Ok(c) => c,
            Err(e) => {
                refuse(&format!("config error: {e}"));
                return Ok(());
            }
        };
        if cfg.queue.path != self.cfg.queue.path {
            refuse(&format!(
                "queue.path changed from {} to {}, which needs a restart",
                self.cfg.queue.path.display(),
                cfg.queue.path.display()
            ));
            return Ok(());
        }
        let http = match Http::new(&cfg.http) {
            Ok(h) => h,
            Err(e) => {
                refuse(&e);
                return Ok(());
            }
        };
        let start = now.unix - cfg.mimecast.initial_lookback_secs;
        // New feeds' cursors first: if the store cannot take them now (disk full, locked), nothing has changed. Not
        // by a clock that is not set yet: the feed's first poll creates its cursor then.
        let clock_set = self.poller.clock_unset(now).is_none();
        for &feed in cfg.mimecast.feeds.iter().filter(|f| clock_set && !self.poller.feeds().any(|s| s == **f)) {
            if let Err(e) = self.store.init_cursor(feed, start) {
                if e.is_transient() {
                    refuse(&e);
                    return Ok(());
                }
                return Err(e.into());
            }
        }
        let (poller, sender, store_retries) = settings(&cfg, &self.tuning, self.mode);
        self.poller.reconfigure(poller, &cfg.mimecast.feeds, now);
        self.sender.reconfigure(sender, now);
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
            path.display(),
            self.poller.feeds().map(Feed::name).collect::<Vec<_>>().join(", ")
        );
        Ok(())
    }

    /// Lets a transient store error (disk full, database locked by another process) pause the agent instead of
    /// ending it; every other error ends the run. Nothing is lost either way: what failed was not committed.
    /// `sending`: the error came from the send path, which must then back off too rather than retry at once.
    fn absorb<T>(&mut self, result: anyhow::Result<T>, now: Now, sending: bool) -> anyhow::Result<Option<T>> {
        let e = match result {
            Ok(v) => return Ok(Some(v)),
            Err(e) => e,
        };
        let Some(store_error) = e.downcast_ref::<StoreError>().filter(|s| s.is_transient()) else {
            return Err(e);
        };
        if store_error.is_disk_full() {
            let msg = store_error.to_string();
            // Something else filled the disk: the WAL may hold space that a checkpoint gives back.
            let _ = self.store.checkpoint();
            self.disk_full(&msg, now);
            if sending {
                // A dead letter that did not fit, say: not again at once, again and again.
                self.sender.failed(now, Duration::ZERO);
            }
            return Ok(None);
        }
        let pause = self.pressure.on_busy(now);
        log::warn!("{store_error}; retrying in {:.1}s", pause.delay.as_secs_f64());
        self.stop_polling_if(pause);
        // The send path shares the database: it gets the same pause.
        self.sender.wait_until(now.at + pause.delay);
        Ok(None)
    }

    /// A full disk is back-pressure: polling waits until a delivery frees space (or the wait passes); delivery
    /// goes on, since it is what frees space.
    fn disk_full(&mut self, why: &str, now: Now) {
        let pause = self.pressure.on_disk_full(now);
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
    fn room_for_pages(&mut self, now: Now, pages: u64) -> anyhow::Result<bool> {
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
    fn remember(&mut self, note: Note, at: i64, message: &str) -> anyhow::Result<()> {
        informational(self.store.set_note(note, at, message))
    }

    /// The daemon's health report to Datadog, when one is due ([`health::Reporter`]): gathered here from the store
    /// (a few indexed reads, once per interval) and sent on the blocking pool by a task the loop never awaits. A
    /// store that cannot be read now skips the report; nothing here fails the loop or waits.
    fn report_health(&self, health: &mut health::Reporter, now: Now) {
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

    /// `--once`: whether the pass is over ([`policy::pass_over`]).
    fn pass_over(&mut self) -> anyhow::Result<bool> {
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
    fn measure_queue(&mut self) -> anyhow::Result<bool> {
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
    fn start_fetch(&mut self, now: Now, in_flight: usize) -> anyhow::Result<Option<Task<Fetch>>> {
        if self.clock_unset(now) || !self.pressure.may_poll(now) {
            return Ok(None);
        }
        let margin = self.tuning.token_margin;
        while let Some(feed) = self.poller.due_where(now, |f| !self.accounts.waiting(f, now.at, margin)) {
            let cursor = match self.store.cursor(feed)? {
                Some(cursor) => cursor,
                // A feed enabled while the clock was not set yet.
                None => {
                    self.store.init_cursor(feed, now.unix - self.cfg.mimecast.initial_lookback_secs)?;
                    self.store.cursor(feed)?.context("cursor row missing")?
                }
            };
            let Some(plan) = self.poller.plan(now, feed, cursor.watermark, cursor.window) else { continue };
            if !self.room_for_pages(now, in_flight as u64 + 1)? {
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
                let creds = self.accounts.creds(feed).context("credentials missing for an enabled feed")?.clone();
                self.accounts.on_fetching(feed);
                let (http, generation) = (self.http.clone(), self.creds_generation);
                return Ok(Some(smol::unblock(move || {
                    let token = auth::fetch_token(&http, &creds, now.at);
                    Fetch::Token(req, generation, token)
                })));
            }
            return self.fetch_page(now, req).map(Some);
        }
        Ok(None)
    }

    /// Whether polling and delivery wait for the clock to be set: the poller has no feed due while the clock reads
    /// earlier than its floor, and [`Agent::start_send`] starts nothing. Said once in the log when it starts and when
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
    fn fetch_page(&self, now: Now, req: PageRequest) -> anyhow::Result<Task<Fetch>> {
        let creds = self.accounts.creds(req.feed).context("credentials missing for an enabled feed")?.clone();
        let (http, token, generation, margin) = (
            self.http.clone(),
            self.accounts.token(req.feed).cloned(),
            self.creds_generation,
            self.tuning.token_margin,
        );
        Ok(smol::unblock(move || {
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
    ) -> anyhow::Result<Option<Task<Fetch>>> {
        if generation != self.creds_generation {
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
    ) -> anyhow::Result<Option<Task<Fetch>>> {
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
    fn follows_cursor(&self, req: &PageRequest) -> anyhow::Result<bool> {
        let cursor = self.store.cursor(req.feed)?.context("cursor row missing")?;
        Ok(match &cursor.window {
            Some((w, token)) => *w == req.window && *token == req.page_token,
            None => req.page_token.is_none(),
        })
    }

    /// Starts fetching the page after the one about to be committed, if the poller allows it, the feed's token is
    /// fresh, and the disk has room for both pages without a checkpoint or a release (those are for
    /// [`Agent::start_fetch`] to do).
    fn read_ahead(&mut self, now: Now, feed: Feed) -> anyhow::Result<Option<Task<Fetch>>> {
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
    ) -> anyhow::Result<()> {
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
    fn start_send(&mut self, now: Now) -> anyhow::Result<Option<Task<(Batch, Sent)>>> {
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
            if !had_records && self.sender.in_flight() == 0 {
                // The queue is empty: what is left of a backlog's space goes back, up to 128 MiB per look (a few
                // hundred milliseconds of a loop that has nothing else to do).
                informational(self.store.shrink(16_384).map(drop))?;
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
        Ok(Some(smol::unblock(move || {
            let sent = sink::send(&http, &url, &key, payload);
            (b, sent)
        })))
    }

    /// The intake answered: the sender decides, the loop removes, dead-letters or records.
    fn on_sent(&mut self, now: Now, b: Batch, sent: Sent) -> anyhow::Result<()> {
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
    fn remove_delivered(&mut self, now: Now, mut b: Batch) -> anyhow::Result<()> {
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

/// What a fetch task brings back, with the credentials generation it started under.
enum Fetch {
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

/// The first of `tasks` to finish, taken out of the list; pending for ever while there is none. Dropped before it
/// resolves, it takes nothing: the tasks stay in the list.
async fn first<T>(tasks: &mut Vec<Task<T>>) -> T {
    std::future::poll_fn(|cx| {
        for i in 0..tasks.len() {
            if let Poll::Ready(v) = Pin::new(&mut tasks[i]).poll(cx) {
                drop(tasks.swap_remove(i));
                return Poll::Ready(v);
            }
        }
        Poll::Pending
    })
    .await
}

/// The result of a write that only informs `status` (an error line, a note): a full disk or a held lock is
/// ignored, since it must not stop the work the line describes; any other store error still counts.
fn informational(written: Result<(), StoreError>) -> anyhow::Result<()> {
    match written {
        Err(e) if !e.is_transient() => Err(e.into()),
        _ => Ok(()),
    }
}
