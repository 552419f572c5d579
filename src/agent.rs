//! The main loop: one smol executor on one thread owns the SQLite store and all state. Blocking HTTP runs on
//! smol's blocking pool through `smol::unblock`; at most one Mimecast fetch and one Datadog send are in flight,
//! and every task is awaited in the loop below, none detached. Every decision is made on this thread, between
//! awaits, from one closed set of [`Event`]s.

use std::collections::HashSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use smol::Task;
use smol::future::FutureExt as _;

use crate::backoff::Backoff;
use crate::config::Config;
use crate::datadog::batch::{self, MAX_LOG_BYTES, MAX_LOGS};
use crate::datadog::bisect::{Bisection, Half, Piece, Verdict};
use crate::datadog::disposition::{Disposition, disposition};
use crate::datadog::logobj::{self, Late, Shape};
use crate::datadog::sink::{self, Sent};
use crate::datetime;
use crate::http::Http;
use crate::mimecast::auth::{Credentials, Token};
use crate::mimecast::client::{self, Fetched, PageRequest, Retry};
use crate::mimecast::window::{self, Settings, Window};
use crate::mimecast::{Feed, wire};
use crate::store::{NewRecord, PageCommit, Queued, Store, StoreError};

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
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Run until shut down.
    Daemon,
    /// Poll every feed up to now, drain until empty or refused, stop.
    Once,
}

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
    Fetched(PageRequest, Fetched),
    Sent(Batch, Sent),
    /// A timer fired: a feed or the sink may be due.
    Wake,
}

/// A batch in flight.
struct Batch {
    seqs: Vec<i64>,
    restamped: i64,
    kept: i64,
    /// Where the batch stands in a bisection of a refused one.
    half: Half,
}

struct FeedState {
    feed: Feed,
    due: Instant,
    failures: u32,
    /// Times the window in progress was restarted because its page token was refused; reset when it completes.
    restarts: u32,
    /// Page tokens Mimecast handed out in the window in progress: one seen again is a cycle, not progress.
    tokens: HashSet<String>,
    /// `--once`: this feed has finished its pass (caught up, or gave up).
    done: bool,
    pages: u64,
    queued: u64,
    skipped: u64,
}

impl FeedState {
    fn new(feed: Feed, due: Instant) -> FeedState {
        FeedState {
            feed,
            due,
            failures: 0,
            restarts: 0,
            tokens: HashSet::new(),
            done: false,
            pages: 0,
            queued: 0,
            skipped: 0,
        }
    }
}

#[derive(Default)]
struct SinkState {
    due: Option<Instant>,
    failures: u32,
    /// Pieces of a refused batch (413, or 400 to isolate a bad log), sent before anything new.
    bisection: Bisection,
    /// `--once`: gave up for this pass.
    done: bool,
    /// A batch Datadog accepted whose removal from the queue failed (disk full, database locked): removing it is
    /// retried before anything else is sent, so that it is not sent twice.
    undeleted: Option<Batch>,
    delivered_since: u64,
    since: Option<Instant>,
}

/// A transient store problem: the disk is full, or another process holds the database lock past the busy
/// timeout. Polling waits; delivery goes on while the disk is full, since it is what frees space.
struct Trouble {
    until: Instant,
    failures: u32,
    disk_full: bool,
}

struct Agent {
    cfg: Config,
    tuning: Tuning,
    mode: Mode,
    store: Store,
    http: Http,
    creds: Credentials,
    token: Option<Token>,
    feeds: Vec<FeedState>,
    sink: SinkState,
    shape: Shape,
    paused: bool,
    /// `--once`: the wall-clock time the pass started; windows end no later than this (less `settle_secs`).
    pass_start: i64,
    /// `--once`: a feed or the intake gave up this pass.
    gave_up: bool,
    trouble: Option<Trouble>,
    /// The most WAL a page commit has taken so far: how much room the next one may need.
    page_wal: u64,
    /// A "disk full" note for `status` may be stored: clear it at the next page committed.
    disk_note: bool,
    /// Bumped when a reload changes the Mimecast credentials; a fetch started under other ones brings back a
    /// token that is not kept.
    creds_generation: u64,
    fetch_generation: u64,
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
    run_with_reload(cfg, tuning, mode, shutdown, None).await
}

/// [`run`], re-reading the config file on each SIGHUP that `reload` receives.
pub async fn run_with_reload(
    cfg: &Config,
    tuning: &Tuning,
    mode: Mode,
    shutdown: impl Future<Output = ()>,
    reload: Option<Reload>,
) -> anyhow::Result<Outcome> {
    let _instance = crate::instance::acquire(&cfg.queue.path, tuning.clock.now())?;
    let http = Http::new(&cfg.http).context("setting up HTTP")?;
    let mut shutdown = pin!(shutdown);
    // A database locked by another process, or a full disk, at start is waited out like any later one.
    let mut failures = 0;
    let mut agent = loop {
        let opened = Store::open(&cfg.queue.path)
            .and_then(|store| Agent::new(cfg.clone(), tuning.clone(), mode, store, http.clone()));
        match opened {
            Ok(agent) => break agent,
            Err(e) if e.is_transient() && (mode == Mode::Daemon || failures + 1 < tuning.once_attempts) => {
                failures += 1;
                let delay = tuning.mimecast_backoff.next(failures);
                log::warn!("{e}; trying again in {:.1}s", delay.as_secs_f64());
                let stopped = async {
                    (&mut shutdown).await;
                    true
                }
                .or(async {
                    smol::Timer::after(delay).await;
                    false
                });
                if stopped.await {
                    return Ok(Outcome { queued: 0, gave_up: false });
                }
            }
            Err(e) => return Err(e.into()),
        }
    };
    agent.main_loop(shutdown, reload).await?;
    Ok(Outcome { queued: agent.store.counters()?.queue_records, gave_up: agent.gave_up })
}

impl Agent {
    fn new(cfg: Config, tuning: Tuning, mode: Mode, mut store: Store, http: Http) -> Result<Agent, StoreError> {
        let now = Instant::now();
        let start = tuning.clock.now() - cfg.mimecast.initial_lookback_secs as i64;
        let mut feeds = Vec::new();
        for &feed in &cfg.mimecast.feeds {
            store.init_cursor(feed, start)?;
            feeds.push(FeedState::new(feed, now));
        }
        let creds = Credentials::of(&cfg.mimecast);
        let shape = Shape::of(&cfg.datadog);
        let sink = SinkState { due: Some(now), ..SinkState::default() };
        let pass_start = tuning.clock.now();
        Ok(Agent {
            cfg,
            tuning,
            mode,
            store,
            http,
            creds,
            token: None,
            feeds,
            sink,
            shape,
            paused: false,
            pass_start,
            gave_up: false,
            trouble: None,
            page_wal: 256 * 1024,
            disk_note: true,
            creds_generation: 0,
            fetch_generation: 0,
        })
    }

    async fn main_loop(&mut self, shutdown: impl Future<Output = ()>, reload: Option<Reload>) -> anyhow::Result<()> {
        let mut shutdown = pin!(shutdown);
        let mut fetch: Option<Task<(PageRequest, Fetched)>> = None;
        let mut send: Option<Task<(Batch, Sent)>> = None;
        loop {
            let now = Instant::now();
            if fetch.is_none() {
                let started = self.start_fetch(now);
                fetch = self.absorb(started, now, false)?.flatten();
            }
            if send.is_none() {
                let started = self.start_send(now);
                send = self.absorb(started, now, true)?.flatten();
            }
            if self.mode == Mode::Once && fetch.is_none() && send.is_none() {
                let over = self.pass_over();
                if self.absorb(over, now, false)? == Some(true) {
                    return Ok(());
                }
            }
            let wake = self.next_wake(now, fetch.is_some(), send.is_some());
            let event = async {
                match &mut fetch {
                    Some(t) => {
                        let (req, f) = t.await;
                        Event::Fetched(req, f)
                    }
                    None => std::future::pending().await,
                }
            }
            .or(async {
                match &mut send {
                    Some(t) => {
                        let (b, s) = t.await;
                        Event::Sent(b, s)
                    }
                    None => std::future::pending().await,
                }
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
            match event {
                Event::Fetched(req, f) => {
                    fetch = None;
                    let handled = self.on_fetched(req, f);
                    self.absorb(handled, Instant::now(), false)?;
                }
                Event::Sent(b, s) => {
                    send = None;
                    let handled = self.on_sent(b, s);
                    self.absorb(handled, Instant::now(), true)?;
                }
                Event::Wake => {}
                Event::Reload => {
                    if let Some(r) = &reload {
                        self.reload(&r.path)?;
                    }
                }
                Event::Shutdown => {
                    // A fetch in flight is abandoned: nothing of it is committed, so it is read again next time.
                    drop(fetch);
                    if let Some(t) = send {
                        let grace = self.tuning.shutdown_grace;
                        let done = async { Some(t.await) }.or(async {
                            smol::Timer::after(grace).await;
                            None
                        });
                        match done.await {
                            Some((b, s)) => {
                                let handled = self.on_sent(b, s);
                                self.absorb(handled, Instant::now(), true)?;
                            }
                            None => log::warn!(
                                "shutting down with a Datadog request unanswered: that batch will be sent again"
                            ),
                        }
                    }
                    if let Some(b) = &self.sink.undeleted {
                        log::warn!(
                            "shutting down with {} delivered records still in the queue (it could not be written): \
                             they will be sent again",
                            b.seqs.len()
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

    /// SIGHUP: a valid config takes effect at once; an invalid one is refused and the running one stays. The
    /// queue path cannot change under a running agent (the lock and the open database belong to the old one).
    fn reload(&mut self, path: &Path) -> anyhow::Result<()> {
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
        let now = Instant::now();
        let start = self.tuning.clock.now() - cfg.mimecast.initial_lookback_secs as i64;
        // New feeds' cursors first: if the store cannot take them now (disk full, locked), nothing has changed.
        for &feed in cfg.mimecast.feeds.iter().filter(|f| !self.feeds.iter().any(|s| s.feed == **f)) {
            if let Err(e) = self.store.init_cursor(feed, start) {
                if e.is_transient() {
                    refuse(&e);
                    return Ok(());
                }
                return Err(e.into());
            }
        }
        let mut feeds = Vec::new();
        for &feed in &cfg.mimecast.feeds {
            match self.feeds.iter().position(|f| f.feed == feed) {
                Some(i) => feeds.push(self.feeds.swap_remove(i)),
                None => feeds.push(FeedState::new(feed, now)),
            }
        }
        // A feed waiting out a slow retry (refused credentials, a permission) tries again with the new config.
        for f in feeds.iter_mut().filter(|f| f.failures > 0) {
            (f.due, f.failures) = (now, 0);
        }
        let creds = Credentials::of(&cfg.mimecast);
        if creds != self.creds {
            self.token = None;
            self.creds_generation += 1;
        }
        self.feeds = feeds;
        self.creds = creds;
        self.http = http;
        self.shape = Shape::of(&cfg.datadog);
        self.cfg = cfg;
        self.paused = false;
        self.queue_full()?;
        self.sink.due = Some(now);
        log::info!(
            "reload: configuration read again from {}; feeds: {}",
            path.display(),
            self.feeds.iter().map(|f| f.feed.name()).collect::<Vec<_>>().join(", ")
        );
        Ok(())
    }

    /// Lets a transient store error (disk full, database locked by another process) pause the agent instead of
    /// ending it; every other error ends the run. Nothing is lost either way: what failed was not committed.
    /// `sending`: the error came from the send path, which must then back off too rather than retry at once.
    fn absorb<T>(&mut self, result: anyhow::Result<T>, now: Instant, sending: bool) -> anyhow::Result<Option<T>> {
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
                self.sink_failed(Duration::ZERO, now);
            }
            return Ok(None);
        }
        let t = self.trouble.get_or_insert(Trouble { until: now, failures: 0, disk_full: false });
        t.failures += 1;
        let (delay, failures) = (self.tuning.mimecast_backoff.next(t.failures), t.failures);
        t.until = now + delay;
        log::warn!("{store_error}; retrying in {:.1}s", delay.as_secs_f64());
        self.give_up_polling_if_once(failures);
        // The send path shares the database: give it the same pause.
        self.delay_sink(now + delay);
        Ok(None)
    }

    /// A full disk is back-pressure: polling waits until a delivery frees space (or the slow retry passes);
    /// delivery goes on, since it is what frees space.
    fn disk_full(&mut self, why: &str, now: Instant) {
        let first = !self.trouble.as_ref().is_some_and(|t| t.disk_full);
        let t = self.trouble.get_or_insert(Trouble { until: now, failures: 0, disk_full: true });
        t.failures += 1;
        t.disk_full = true;
        // A delivery also ends the wait; an empty queue has none, so the wait itself grows up to the slow retry.
        let delay = self.tuning.mimecast_backoff.ceiling(t.failures).min(self.tuning.slow_retry);
        t.until = now + delay;
        let msg = format!(
            "disk full: {why}; polling Mimecast paused until delivery frees space (or {}s pass); delivery goes on; \
             nothing is lost",
            delay.as_secs()
        );
        if first {
            log::error!("{msg}");
        } else {
            log::debug!("{msg}");
        }
        let failures = t.failures;
        self.give_up_polling_if_once(failures);
        // Recorded for `status` if the disk still takes this small write; status also reads the free space.
        let _ = self.store.set_state("disk_full", &format!("{} {msg}", self.tuning.clock.now()));
        self.disk_note = true;
    }

    /// `--once` does not wait on the store for ever: after as many failures as a feed may have, polling stops for
    /// this pass (delivery goes on where it can), and the pass says so with exit 69 or 75.
    fn give_up_polling_if_once(&mut self, failures: u32) {
        if self.mode == Mode::Once && failures >= self.tuning.once_attempts && self.feeds.iter().any(|f| !f.done) {
            log::error!("polling stops for this pass: the queue database could not take pages {failures} times");
            self.feeds.iter_mut().for_each(|f| f.done = true);
            self.gave_up = true;
        }
    }

    /// Whether the queue's filesystem has room for another page and what follows it. A page first grows the
    /// WAL, then, at a checkpoint, the database file (less what it reuses of free pages); a checkpoint may need
    /// as much new space as the WAL holds. So the agent checkpoints before the WAL could outgrow the free space,
    /// and stops polling while a page would not fit: it never fills the disk itself, and deletes (delivery)
    /// and checkpoints always have room.
    fn room_for_a_page(&mut self, now: Instant) -> anyhow::Result<bool> {
        // Room for deletes and state lines; a delivered batch on a full disk is removed in small steps.
        const MARGIN: u64 = 64 * 1024;
        let page = self.page_wal;
        let mut space = self.store.space()?;
        let Some(free) = space.fs_free else { return Ok(true) };
        let need = |s: crate::store::Space| page + page.saturating_sub(s.reusable) + MARGIN;
        if free < space.wal + need(space) && space.wal > 0 {
            // Fold the WAL into the database while the free space can still take it.
            self.store.checkpoint()?;
            space = self.store.space()?;
        }
        if space.fs_free.is_some_and(|f| f < space.wal + need(space)) && space.reusable > 0 {
            // Delivery emptied pages inside the file, but the WAL needs room on the filesystem: give free pages
            // back, a step that the free space can take (moving a page costs a WAL frame).
            let step = space.fs_free.unwrap_or(0) / 2;
            if self.store.release_free_pages(step.min(space.reusable))? {
                space = self.store.space()?;
            }
        }
        let free = space.fs_free.unwrap_or(free);
        if free >= space.wal + need(space) {
            return Ok(true);
        }
        let why = format!(
            "the filesystem of queue database {} has {free} bytes free ({} reusable inside the queue), less than \
             the {} that the next page may need",
            self.store.path().display(),
            space.reusable,
            space.wal + need(space)
        );
        self.disk_full(&why, now);
        Ok(false)
    }

    /// Writes a line of state that only informs `status`; a full disk or a held lock must not stop the work it
    /// describes.
    fn remember(&mut self, name: &str, value: &str) -> anyhow::Result<()> {
        informational(self.store.set_state(name, value))
    }

    /// A page was committed: the store's trouble is over.
    fn store_recovered(&mut self) -> anyhow::Result<()> {
        if self.trouble.take().is_some() {
            log::info!("queue database takes pages again: polling resumed");
        }
        // The note may be left from an earlier run, even when this one never saw the disk full.
        if std::mem::take(&mut self.disk_note) {
            self.remember("disk_full", "")?;
        }
        Ok(())
    }

    /// The earliest moment a feed or the sink can start something. Only what could start counts: a feed while no
    /// fetch is in flight and the queue is not paused, the sink while no send is in flight. Counting the others
    /// would wake the loop at once, again and again, while it can only wait.
    fn next_wake(&self, now: Instant, fetching: bool, sending: bool) -> Instant {
        let trouble = self.trouble.as_ref().map(|t| t.until);
        let feeds = self
            .feeds
            .iter()
            .filter(|f| !f.done && !fetching && !self.paused)
            .map(|f| f.due.max(trouble.unwrap_or(f.due)));
        let sink = self.sink.due.filter(|_| !sending && !self.sink.done);
        feeds.chain(sink).min().unwrap_or(now + Duration::from_secs(60)).max(now)
    }

    /// `--once`: every feed finished its pass and the queue is empty or Datadog gave up. Polling that waits for
    /// delivery to make room (a full queue or disk) is over too once delivery cannot make any: the intake gave up,
    /// or, for a disk, the queue is empty and what fills the disk is not ours (a pass that gives up).
    fn pass_over(&mut self) -> anyhow::Result<bool> {
        let queue_empty = self.store.counters()?.queue_records == 0 && !self.sink.bisection.is_active();
        let disk_full = self.trouble.as_ref().is_some_and(|t| t.disk_full);
        let stuck = (self.paused || disk_full) && (self.sink.done || queue_empty);
        if stuck && disk_full {
            log::error!("polling stopped for this pass: the disk stays full with nothing left to deliver");
            self.gave_up = true;
        }
        let feeds_done = stuck || self.feeds.iter().all(|f| f.done);
        Ok(feeds_done && (self.sink.done || queue_empty))
    }

    fn queue_full(&mut self) -> anyhow::Result<bool> {
        let c = self.store.counters()?;
        let full = self.cfg.queue.paused_at(c.queue_bytes);
        if full != self.paused {
            if full {
                log::warn!(
                    "queue full ({} bytes of max_bytes {}): polling Mimecast paused until Datadog drains it; \
                     Mimecast keeps the data and no cursor moves",
                    c.queue_bytes,
                    self.cfg.queue.max_bytes
                );
            } else {
                log::info!("queue below max_bytes again: polling resumed");
            }
            self.paused = full;
        }
        Ok(full)
    }

    /// "Now" for window ends: the clock, except that a `--once` pass reads up to the moment it started, so a
    /// slow pass cannot chase a moving end forever.
    fn horizon(&self) -> i64 {
        match self.mode {
            Mode::Once => self.pass_start.min(self.tuning.clock.now()),
            Mode::Daemon => self.tuning.clock.now(),
        }
    }

    fn settings(&self) -> Settings {
        let m = &self.cfg.mimecast;
        Settings {
            overlap_secs: m.overlap_secs as i64,
            settle_secs: m.settle_secs as i64,
            max_window_secs: m.max_window_secs as i64,
        }
    }

    /// Picks the feed that is due soonest and starts fetching its next page.
    fn start_fetch(&mut self, now: Instant) -> anyhow::Result<Option<Task<(PageRequest, Fetched)>>> {
        if self.trouble.as_ref().is_some_and(|t| t.until > now) || self.queue_full()? {
            return Ok(None);
        }
        let settings = self.settings();
        loop {
            let Some(i) = (0..self.feeds.len())
                .filter(|&i| !self.feeds[i].done && self.feeds[i].due <= now)
                .min_by_key(|&i| self.feeds[i].due)
            else {
                return Ok(None);
            };
            let feed = self.feeds[i].feed;
            let cursor = self.store.cursor(feed)?.context("cursor row missing")?;
            let (window, page_token) = match cursor.window {
                Some((w, token)) => (w, token),
                None => match window::next_window(cursor.watermark, self.horizon(), settings) {
                    Some(w) => (w, None),
                    None => {
                        self.idle(i, now);
                        continue;
                    }
                },
            };
            if !self.room_for_a_page(now)? {
                return Ok(None);
            }
            let req = PageRequest { feed, window, page_token, page_size: self.cfg.mimecast.page_size };
            let (http, creds, token, margin) =
                (self.http.clone(), self.creds.clone(), self.token.clone(), self.tuning.token_margin);
            let unix_ms = self.tuning.clock.now().saturating_mul(1000);
            self.fetch_generation = self.creds_generation;
            return Ok(Some(smol::unblock(move || {
                let f = client::fetch_page(&http, &creds, token, &req, margin, now, unix_ms);
                (req, f)
            })));
        }
    }

    /// A feed has nothing new: in `--once` mode its pass is over, else it polls again after the interval.
    fn idle(&mut self, i: usize, now: Instant) {
        let f = &mut self.feeds[i];
        match self.mode {
            Mode::Once => f.done = true,
            Mode::Daemon => f.due = now + Duration::from_secs(self.cfg.mimecast.poll_interval_secs),
        }
    }

    fn on_fetched(&mut self, req: PageRequest, fetched: Fetched) -> anyhow::Result<()> {
        if let Some(t) = fetched.new_token.filter(|_| self.fetch_generation == self.creds_generation) {
            self.token = Some(t);
        }
        let Some(i) = self.feeds.iter().position(|f| f.feed == req.feed) else {
            // The feed was disabled by a reload while its page was in flight: nothing of it is kept.
            log::info!("{}: disabled by a reload; its page in flight is not kept", req.feed);
            return Ok(());
        };
        let now = Instant::now();
        // A `next` seen before in this window (the token just used, or an earlier one: A -> B -> A) would read the
        // same pages forever: make it a visible, backed-off error instead of a silent loop that burns the quota.
        let seen = &self.feeds[i].tokens;
        let result = fetched.result.and_then(|page| match &page.next {
            Some(next) if !page.is_last() && (req.page_token.as_ref() == Some(next) || seen.contains(next)) => {
                Err(client::FetchError::Malformed(format!(
                    "Mimecast handed out a page token it had already given in this window ({}): a pagination \
                     cycle; the window is not advanced",
                    excerpt(next)
                )))
            }
            _ => Ok(page),
        });
        match result {
            Ok(page) => {
                if page.repaired > 0 {
                    log::warn!(
                        "{}: a page held {} character(s) no JSON reader accepts (invalid UTF-8, unpaired UTF-16 \
                         surrogates); they were replaced with U+FFFD so the feed goes on",
                        req.feed,
                        page.repaired
                    );
                }
                let last = page.is_last();
                let records: Vec<NewRecord> = page
                    .records
                    .iter()
                    .map(|r| NewRecord {
                        key: wire::record_key(req.feed, r),
                        event_time: wire::record_time(req.feed, r),
                        body: r.to_string(),
                    })
                    .collect();
                let commit = PageCommit {
                    feed: req.feed,
                    window: req.window,
                    next_token: if last { None } else { page.next },
                    records,
                    // Keys whose time is before every future window's start can never be read again.
                    forget_before: req.window.to - self.cfg.mimecast.overlap_secs as i64 - 3600,
                };
                let wal_before = self.store.wal_bytes();
                let out = self.store.commit_page(
                    &commit,
                    self.tuning.clock.now(),
                    self.cfg.queue.max_bytes,
                    self.cfg.queue.when_full,
                )?;
                self.page_wal = self.page_wal.max(self.store.wal_bytes().saturating_sub(wal_before));
                if out.dropped > 0 {
                    log::warn!(
                        "queue full: dropped the {} oldest records (when_full = \"drop-oldest\"); {} dropped in total",
                        out.dropped,
                        self.store.counters()?.dropped
                    );
                }
                if out.queued > 0 && self.sink.due.is_none_or(|d| d > now) && self.sink.failures == 0 {
                    self.sink.due = Some(now);
                }
                let f = &mut self.feeds[i];
                f.failures = 0;
                f.pages += 1;
                f.queued += out.queued;
                f.skipped += out.skipped;
                f.due = now + fetched.throttle.unwrap_or_default();
                if last {
                    self.window_done(i, req.window, now);
                } else if let Some(next) = &commit.next_token {
                    self.feeds[i].tokens.insert(next.clone());
                }
                self.store_recovered()?;
            }
            Err(e) => self.fetch_failed(i, &req, e, now)?,
        }
        Ok(())
    }

    fn window_done(&mut self, i: usize, w: Window, now: Instant) {
        let settings = self.settings();
        let f = &mut self.feeds[i];
        // A quiet poll is worth a debug line only; one that found records is the info summary of its cycle.
        let level = if f.queued + f.skipped > 0 { log::Level::Info } else { log::Level::Debug };
        log::log!(
            level,
            "{}: read {} .. {} in {} page(s): {} queued, {} already queued",
            f.feed,
            datetime::rfc3339(w.from),
            datetime::rfc3339(w.to),
            f.pages,
            f.queued,
            f.skipped
        );
        (f.pages, f.queued, f.skipped, f.restarts) = (0, 0, 0, 0);
        f.tokens.clear();
        // A daemon that is behind by less than one poll interval waits for it: how long the pages took must not
        // decide how often the feed is read. A `--once` pass goes on until it reached where it started.
        let slack = match self.mode {
            Mode::Once => 0,
            Mode::Daemon => self.cfg.mimecast.poll_interval_secs as i64,
        };
        if !window::behind(w, self.horizon(), settings, slack) {
            self.idle(i, now);
        }
    }

    fn fetch_failed(&mut self, i: usize, req: &PageRequest, e: client::FetchError, now: Instant) -> anyhow::Result<()> {
        let feed = req.feed;
        informational(self.store.feed_error(feed, &e.to_string(), self.tuning.clock.now()))?;
        let f = &mut self.feeds[i];
        let retry = e.retry(req.page_token.is_some());
        // A restart reads page 1 again, whose success resets `failures`: restarts are counted per window instead,
        // so a token that is refused every time backs off rather than looping at full speed.
        let attempts = if retry == Retry::RestartWindow {
            f.restarts += 1;
            f.tokens.clear();
            f.restarts
        } else {
            f.failures += 1;
            f.failures
        };
        let backoff = self.tuning.mimecast_backoff.next(attempts);
        let delay = match retry {
            Retry::Backoff | Retry::RestartWindow => backoff,
            Retry::Slow => self.tuning.slow_retry,
            Retry::AtLeast(wait) => wait.max(backoff),
        };
        f.due = now + delay;
        let give_up = self.mode == Mode::Once && (retry == Retry::Slow || attempts >= self.tuning.once_attempts);
        if retry == Retry::Slow {
            log::error!("{feed}: {e}; retrying in {}s", delay.as_secs());
        } else {
            log::warn!("{feed}: {e}; attempt {attempts} failed, retrying in {:.1}s", delay.as_secs_f64());
        }
        if retry == Retry::RestartWindow {
            log::warn!("{feed}: page token refused; reading the window again from its first page");
            self.store.restart_window(feed)?;
        }
        if give_up {
            log::error!("{feed}: giving up for this pass after {attempts} failure(s)");
            f.done = true;
            self.gave_up = true;
        }
        Ok(())
    }

    /// Builds the next batch (pending split halves first, else the oldest records of every feed, fairly) and
    /// starts sending it.
    fn start_send(&mut self, now: Instant) -> anyhow::Result<Option<Task<(Batch, Sent)>>> {
        if self.sink.done || self.sink.due.is_none_or(|d| d > now) {
            return Ok(None);
        }
        if let Some(b) = self.sink.undeleted.take() {
            self.remove_delivered(b, now)?;
            return Ok(None);
        }
        let mut records = Vec::new();
        let mut half = Half::Whole;
        while let Some(piece) = self.sink.bisection.next_piece() {
            records = self.store.load(&piece.seqs)?;
            if !records.is_empty() {
                half = piece.half;
                break;
            }
        }
        if records.is_empty() {
            records = batch::fair_order(self.store.candidates(MAX_LOGS)?);
        }
        let had_records = !records.is_empty();
        let Some((mut b, payload)) = self.pack(records)? else {
            if had_records {
                // Every candidate went to dead letters (too large): look again at once.
                self.sink.due = Some(now);
            } else {
                // Idle until a page queues something, or `dead-letters requeue` (another process) does.
                self.sink.due = Some(now + Duration::from_secs(self.cfg.mimecast.poll_interval_secs));
                self.log_drain_summary(true);
            }
            return Ok(None);
        };
        b.half = half;
        let (http, url, key) =
            (self.http.clone(), self.cfg.datadog.intake_url.clone(), self.cfg.datadog.api_key.clone());
        Ok(Some(smol::unblock(move || {
            let sent = sink::send(&http, &url, &key, &payload);
            (b, sent)
        })))
    }

    /// Builds log objects in order until a limit is reached. A record too large for Datadog goes to the
    /// dead-letter table instead (kept, counted, shown by `status`), so it never blocks the rest.
    fn pack(&mut self, records: Vec<Queued>) -> anyhow::Result<Option<(Batch, Vec<u8>)>> {
        let now = self.tuning.clock.now();
        let mut logs: Vec<String> = Vec::new();
        let mut b = Batch { seqs: Vec::new(), restamped: 0, kept: 0, half: Half::Whole };
        let mut packer = batch::Packer::default();
        for q in records {
            let built = logobj::build(q.feed, &q.body, q.event_time, &self.shape, now);
            if built.json.len() > MAX_LOG_BYTES {
                let reason = format!("log of {} bytes exceeds Datadog's 1 MB limit; not sent", built.json.len());
                self.store.dead_letter(q.seq, &reason, now)?;
                log::error!(
                    "{}: record {} {reason}; kept as a dead letter",
                    q.feed,
                    crate::http::printable(&q.key, 200)
                );
                continue;
            }
            if !packer.try_add(built.json.len()) {
                break;
            }
            match built.late {
                Late::Restamped => b.restamped += 1,
                Late::Kept => b.kept += 1,
                Late::OnTime => {}
            }
            b.seqs.push(q.seq);
            logs.push(built.json);
        }
        if logs.is_empty() {
            return Ok(None);
        }
        let payload = batch::payload(logs.iter().map(String::as_str));
        Ok(Some((b, payload)))
    }

    fn on_sent(&mut self, b: Batch, sent: Sent) -> anyhow::Result<()> {
        let now = Instant::now();
        let secs = self.tuning.clock.now();
        match disposition(sent.answer, b.seqs.len()) {
            Disposition::Delete => {
                let proven_bad = self.sink.bisection.accepted(b.half);
                self.remove_delivered(b, now)?;
                // The refused first half of this pair: its sibling is accepted, so the fault is in it.
                let detail = "refused on its own while the rest of its batch was accepted";
                self.dead_letters(&proven_bad, detail, now, secs)?;
            }
            Disposition::Split | Disposition::DeadLetter => self.refused(b, &sent, now, secs)?,
            Disposition::Hold => {
                self.sink.bisection.put_back(Piece { seqs: b.seqs, half: b.half });
                self.sink.failures += 1;
                let msg = format!(
                    "Datadog refused the API key or the intake URL ({}); every record stays queued; fix datadog.api_key \
                     or datadog.site/intake_url; retrying in {}s",
                    sent.detail,
                    self.tuning.slow_retry.as_secs()
                );
                log::error!("{msg}");
                self.remember("datadog_last_error", &format!("{secs} {msg}"))?;
                self.sink.due = Some(now + self.tuning.slow_retry);
                self.sink.done = self.mode == Mode::Once;
                self.gave_up |= self.sink.done;
            }
            Disposition::Retry(after) => {
                self.sink.bisection.put_back(Piece { seqs: b.seqs, half: b.half });
                let delay = self.sink_failed(after.unwrap_or_default(), now);
                log::warn!(
                    "Datadog intake: {}; attempt {} failed, retrying in {:.1}s; records stay queued",
                    sent.detail,
                    self.sink.failures,
                    delay.as_secs_f64()
                );
                self.remember("datadog_last_error", &format!("{secs} {}", sent.detail))?;
            }
        }
        Ok(())
    }

    /// Removes a batch Datadog accepted. If the store cannot take the write now (disk full, locked), the batch is
    /// kept aside and its removal retried before anything else is sent: sending more would send it twice.
    fn remove_delivered(&mut self, mut b: Batch, now: Instant) -> anyhow::Result<()> {
        let mut result = self.store.delivered(&b.seqs, b.restamped, b.kept, self.tuning.clock.now());
        if result.as_ref().is_err_and(StoreError::is_disk_full) {
            // One transaction deleting a whole batch needs WAL room for every page it touches. On a full disk,
            // delete it in small steps, each followed by a checkpoint that gives the WAL's space back.
            result = self.remove_in_steps(&mut b);
        }
        let n = match result {
            Ok(n) => n,
            Err(e) if e.is_transient() => {
                let delay = self.sink_failed(Duration::ZERO, now);
                log::error!(
                    "Datadog accepted {} records, but removing them from the queue failed: {e}; retrying the removal \
                     in {:.1}s before anything else is sent",
                    b.seqs.len(),
                    delay.as_secs_f64()
                );
                self.sink.undeleted = Some(b);
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        if b.kept > 0 {
            log::warn!("sent {} late records unchanged (late_records = \"keep\"): Datadog may drop them", b.kept);
        }
        self.sink.failures = 0;
        self.sink.due = Some(now);
        self.sink.delivered_since += n;
        self.sink.since.get_or_insert(now);
        self.log_drain_summary(false);
        // Space was freed (or the lock is gone): polling may try again at once.
        match &mut self.trouble {
            Some(t) if t.disk_full => t.until = now,
            _ => self.trouble = None,
        }
        Ok(())
    }

    /// Removes a delivered batch from the queue a few records per transaction. What was removed leaves `b`, so
    /// a failure part way keeps only the rest for the retry.
    fn remove_in_steps(&mut self, b: &mut Batch) -> Result<u64, StoreError> {
        const STEP: usize = 32;
        let mut removed = 0;
        self.store.checkpoint()?;
        while !b.seqs.is_empty() {
            let step: Vec<i64> = b.seqs.iter().copied().take(STEP).collect();
            removed += self.store.delivered(&step, b.restamped, b.kept, self.tuning.clock.now())?;
            b.seqs.drain(..step.len());
            (b.restamped, b.kept) = (0, 0);
            self.store.checkpoint()?;
        }
        Ok(removed)
    }

    /// Logs the bisection proved bad: kept in the dead-letter table with the intake's reason.
    fn dead_letters(&mut self, seqs: &[i64], detail: &str, now: Instant, secs: i64) -> anyhow::Result<()> {
        let reason = format!("Datadog refused this log: {detail}");
        for &seq in seqs {
            self.store.dead_letter(seq, &reason, secs)?;
            log::error!("{reason}; kept as a dead letter (see `mimecast-forwarder dead-letters list`)");
        }
        self.sink.due = Some(now);
        Ok(())
    }

    /// A 400 or 413: the bisection ([`Bisection`]) says whether to go on, hold, or keep one log aside.
    fn refused(&mut self, b: Batch, sent: &Sent, now: Instant, secs: i64) -> anyhow::Result<()> {
        let n = b.seqs.len();
        match self.sink.bisection.refused(Piece { seqs: b.seqs, half: b.half }) {
            Verdict::DeadLetters(seqs) => self.dead_letters(&seqs, &sent.detail, now, secs)?,
            Verdict::Continue => {
                if n > 1 {
                    log::warn!("Datadog refused {n} logs ({}); sending them in two halves", sent.detail);
                }
                self.sink.due = Some(now);
            }
            Verdict::Hold => {
                let delay = self.sink_failed(Duration::ZERO, now);
                let msg = format!(
                    "Datadog refused both halves of a batch alike ({}): the fault is not in one log (a proxy or an \
                     intake change?); the records stay queued, none is dead-lettered; retrying in {:.0}s",
                    sent.detail,
                    delay.as_secs_f64()
                );
                log::error!("{msg}");
                self.remember("datadog_last_error", &format!("{secs} {msg}"))?;
            }
        }
        Ok(())
    }

    /// The sink failed again: it waits the backoff (and at least `at_least`), and a `--once` pass gives up after
    /// `once_attempts` failures in a row. Returns the wait, for the log line.
    fn sink_failed(&mut self, at_least: Duration, now: Instant) -> Duration {
        self.sink.failures += 1;
        let delay = at_least.max(self.tuning.datadog_backoff.next(self.sink.failures));
        self.delay_sink(now + delay);
        if self.mode == Mode::Once && self.sink.failures >= self.tuning.once_attempts && !self.sink.done {
            log::error!("Datadog intake: giving up for this pass after {} failures", self.sink.failures);
            self.sink.done = true;
            self.gave_up = true;
        }
        delay
    }

    /// The sink starts nothing before `until`; a later wait already set stands.
    fn delay_sink(&mut self, until: Instant) {
        self.sink.due = Some(self.sink.due.map_or(until, |d| d.max(until)));
    }

    /// One info line per drain: when the queue runs empty, or every `summary_every` while it is busy.
    fn log_drain_summary(&mut self, emptied: bool) {
        let Some(since) = self.sink.since else { return };
        let elapsed = since.elapsed();
        if !emptied && elapsed < self.tuning.summary_every {
            return;
        }
        let n = self.sink.delivered_since;
        let queued = self.store.counters().map(|c| c.queue_records).unwrap_or(-1);
        log::info!(
            "delivered {n} records to Datadog in {:.1}s ({:.0}/s); {queued} queued",
            elapsed.as_secs_f64(),
            n as f64 / elapsed.as_secs_f64().max(0.001)
        );
        self.sink.delivered_since = 0;
        self.sink.since = None;
    }
}

/// The result of a write that only informs `status` (an error line, a note): a full disk or a held lock is
/// ignored, since it must not stop the work the line describes; any other store error still counts.
fn informational(written: Result<(), StoreError>) -> anyhow::Result<()> {
    match written {
        Err(e) if !e.is_transient() => Err(e.into()),
        _ => Ok(()),
    }
}

/// The start of a server-given string, for a log line: enough to recognise it, never a page of it.
fn excerpt(s: &str) -> String {
    let cut = crate::http::printable(s, 40);
    if cut.len() < s.len() { format!("{cut}…") } else { cut }
}
