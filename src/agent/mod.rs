//! The main loop's async shell: one smol executor on one thread owns the [`Core`] (the SQLite store and all
//! state). The shell reads the clocks once per event, asks the core what to start ([`Core::turn`]), runs each
//! [`Job`] on smol's blocking pool through `smol::unblock` (one Mimecast fetch per feed and up to
//! `datadog.sends_in_flight` Datadog sends in flight), awaits the first of: a job's answer, a timer, SIGHUP,
//! shutdown; and hands it back ([`Core::handle`]). Every task is awaited here or dropped at shutdown, none
//! detached. The daemon's health report to Datadog ([`health`]) is one more task, held by the shell and dropped
//! with it, but never awaited: it cannot hold up a send.
//!
//! Every decision is the core's ([`core`]): nothing there awaits, sleeps or reads a clock, so the deterministic
//! simulator drives the same core by simulated time.

pub mod core;

use std::future::Future;
use std::path::PathBuf;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

use smol::Task;
use smol::future::FutureExt as _;

pub use self::core::{Core, Done, Job, JobKind, Turn};
use crate::backoff::Backoff;
use crate::config::Config;
use crate::datetime;
use crate::health;
use crate::http::Http;
use crate::mimecast::window;
pub use crate::policy::Mode;
use crate::policy::Now;
use crate::policy::pressure::Pressure;
use crate::sd_notify::Notifier;
use crate::store::{Store, StoreError};

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

    /// Any source of Unix seconds (the simulator's).
    pub fn from_fn(f: impl Fn() -> i64 + Send + Sync + 'static) -> Clock {
        Clock(Arc::new(f))
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
    /// retry together. The simulator hands in a seeded one.
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

/// Why the core stops the run. A transient store error (a full disk, a database locked by another process) never
/// gets here while the run can wait it out: the core pauses on it instead ([`Core::turn`]).
#[derive(Debug)]
pub enum RunError {
    Store(StoreError),
    /// A state the core never leaves its store or its machines in: a bug, reported as such.
    Broken(&'static str),
}

impl RunError {
    /// Whether trying again later may succeed (a `--once` pass exits 75 then, instead of 70).
    pub fn is_transient(&self) -> bool {
        matches!(self, RunError::Store(e) if e.is_transient())
    }
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunError::Store(e) => e.fmt(f),
            RunError::Broken(what) => write!(f, "internal error: {what}"),
        }
    }
}

impl std::error::Error for RunError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RunError::Store(e) => Some(e),
            RunError::Broken(_) => None,
        }
    }
}

impl From<StoreError> for RunError {
    fn from(e: StoreError) -> RunError {
        RunError::Store(e)
    }
}

impl RunError {
    /// The error as `main` reports it: a store error stays one, so that `main` finds it (its exit code) and
    /// `describe` its causes.
    fn reported(self) -> anyhow::Error {
        match self {
            RunError::Store(e) => anyhow::Error::new(e),
            broken @ RunError::Broken(_) => anyhow::Error::msg(broken.to_string()),
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Records still queued at exit.
    pub queued: i64,
    /// `--once`: a feed or the intake gave up during this pass (a cron user must see it: exit 69).
    pub gave_up: bool,
}

/// SIGHUP and the config file it makes the agent read again (`systemctl reload`).
pub struct Reload {
    pub path: PathBuf,
    pub signal: crate::signals::Hangups,
}

/// Everything that can wake the main loop.
enum Event {
    Shutdown,
    /// SIGHUP: read the config file again.
    Reload,
    /// A job came back.
    Done(Box<Done>),
    /// A timer fired: a feed or the sender may be due.
    Wake,
}

/// The one reading of the clocks for an event. Nothing below the shell reads a clock.
fn read_clocks(tuning: &Tuning) -> Now {
    Now { at: Instant::now(), unix: tuning.clock.now() }
}

/// A `--once` pass by a clock that is not set yet would move the watermarks back to it: it does nothing, not even
/// take the lock, and says to try again later. The daemon waits for the clock instead.
pub fn once_refused(mode: Mode, unix: i64) -> Option<ClockUnset> {
    window::clock_unset(unix, window::CLOCK_FLOOR).filter(|_| mode == Mode::Once).map(ClockUnset)
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
    use anyhow::Context as _;
    if let Some(unset) = once_refused(mode, tuning.clock.now()) {
        return Err(unset.into());
    }
    let _instance = crate::instance::acquire(&cfg.queue.path, tuning.clock.now())?;
    let http = Http::new(&cfg.http).context("setting up HTTP")?;
    let mut shutdown = pin!(shutdown);
    // A database locked by another process, or a full disk, at start is waited out like any later one: the same
    // pressure rule, its backoff and its `--once` give-up.
    let mut pressure = Pressure::new(self::core::store_retries(cfg, tuning, mode));
    let mut core = loop {
        let now = read_clocks(tuning);
        let opened = Store::open(&cfg.queue.path)
            .and_then(|store| Core::open(cfg.clone(), tuning.clone(), mode, store, http.clone(), now));
        let e = match opened {
            Ok(core) => break core,
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
    let ended = main_loop(&mut core, tuning, shutdown, reload, &mut notify).await;
    notify.stopping();
    ended.map_err(RunError::reported)?;
    Ok(core.outcome()?)
}

/// The main loop: take an event, hand it to the core, start what it asks for.
async fn main_loop(
    core: &mut Core,
    tuning: &Tuning,
    shutdown: impl Future<Output = ()>,
    reload: Option<Reload>,
    notify: &mut Notifier,
) -> Result<(), RunError> {
    let mut shutdown = pin!(shutdown);
    // Every task is awaited here or dropped at shutdown; none is detached.
    let mut fetches: Vec<Task<Done>> = Vec::new();
    let mut sends: Vec<Task<Done>> = Vec::new();
    // The agent's own health: its one task is never awaited, so it cannot hold up anything here.
    let mut health = health::Reporter::default();
    loop {
        let now = read_clocks(tuning);
        tell_systemd(core, notify, now);
        let turn = core.turn(now)?;
        start(turn.jobs, &mut fetches, &mut sends);
        core.report_health(&mut health, now);
        if turn.over {
            return Ok(());
        }
        let wake = notify.wake_by(turn.wake);
        let wake = health.next_wake().map_or(wake, |h| wake.min(h));
        let event = async { Event::Done(Box::new(first(&mut fetches).await)) }
            .or(async { Event::Done(Box::new(first(&mut sends).await)) })
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
        let now = read_clocks(tuning);
        match event {
            Event::Done(done) => {
                let jobs = core.handle(now, *done)?;
                start(jobs, &mut fetches, &mut sends);
            }
            Event::Wake => {}
            Event::Reload => {
                if let Some(r) = &reload {
                    reload_from(core, r, now)?;
                }
            }
            Event::Shutdown => {
                notify.stopping();
                // Fetches in flight are abandoned: nothing of them is committed, so they are read again.
                drop(fetches);
                let unanswered = finish_sends(core, tuning, sends).await?;
                core.abandon_jobs();
                core.shutting_down(unanswered);
                return Ok(());
            }
        }
    }
}

/// Starts each job on smol's blocking pool.
fn start(jobs: Vec<Job>, fetches: &mut Vec<Task<Done>>, sends: &mut Vec<Task<Done>>) {
    for job in jobs {
        let list = match job.kind {
            JobKind::Fetch(_) => &mut *fetches,
            JobKind::Send(_) => &mut *sends,
        };
        list.push(smol::unblock(move || job.run()));
    }
}

/// SIGHUP: a valid config file takes effect at once; an invalid one is refused and the running one stays.
fn reload_from(core: &mut Core, r: &Reload, now: Now) -> Result<(), RunError> {
    let refuse = |why: &dyn std::fmt::Display| {
        log::error!("reload: {why}; the running configuration stays in effect");
    };
    let cfg = match crate::cli::load_config(&r.path) {
        Ok(c) => c,
        Err(e) => {
            refuse(&format!("config error: {e}"));
            return Ok(());
        }
    };
    let http = match Http::new(&cfg.http) {
        Ok(h) => h,
        Err(e) => {
            refuse(&e);
            return Ok(());
        }
    };
    core.reload(cfg, http, &r.path, now)
}

/// The loop turn's word to systemd: the watchdog's ping (only here, so a loop that stops turning is restarted)
/// and, every few seconds, the `STATUS=` line if it changed.
fn tell_systemd(core: &Core, notify: &mut Notifier, now: Now) {
    notify.on_turn(now.at);
    if notify.status_due(now.at)
        && let Some(line) = core.status_line(now)
    {
        notify.status(now.at, &line);
    }
}

/// At shutdown, the sends in flight are awaited up to the grace, so that their batches leave the queue and are
/// not sent again; the rest are abandoned and will be. Returns how many were abandoned.
async fn finish_sends(core: &mut Core, tuning: &Tuning, mut sends: Vec<Task<Done>>) -> Result<usize, RunError> {
    let deadline = Instant::now() + tuning.shutdown_grace;
    while !sends.is_empty() {
        let answered = async { Some(first(&mut sends).await) }.or(async {
            smol::Timer::at(deadline).await;
            None
        });
        let Some(done) = answered.await else { break };
        // What the answer asks for next (nothing: a send's answer starts no job) is not started at shutdown.
        drop(core.handle(read_clocks(tuning), done)?);
    }
    Ok(sends.len())
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
