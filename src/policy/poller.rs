//! The poller: which feed reads what next, and what a failure costs. Pure; the loop fetches and commits.
//!
//! Events: [`Poller::due`] and [`Poller::plan`] (may a feed fetch, and which page), [`Poller::on_page`] (a page
//! or a failure came back), [`Poller::on_committed`] (its records are stored), [`Poller::stop_all`] (the store
//! gives up a `--once` pass), [`Poller::reconfigure`] and [`Poller::on_new_credentials`] (SIGHUP). Invariants it
//! keeps:
//! - every failure sets a delay before the feed's next fetch: a backoff that grows with the failures in a row,
//!   the server's rate-limit wait when longer, or the slow retry when an operator must act; never zero twice;
//!   a reload ends none of them, nor resets the failures in a row, except that new credentials end a slow retry;
//! - a refused page token restarts the window, and restarts are counted per window, so a token refused every
//!   time backs off like any failure instead of re-reading page 1 at full speed;
//! - a page token seen before in the window is a failure (a pagination cycle), not progress; so is a page that
//!   holds the same records as the page before it under a new token, and a window that runs past
//!   [`MAX_PAGES_PER_WINDOW`] (a loop of tokens never seen before); so a window always ends, in pages and in the
//!   memory of its tokens;
//! - in `--once`, a feed gives up after `once_attempts` failures in a row, or at once where an operator must
//!   act, and a pass reads up to the moment it started, so a slow pass cannot chase a moving end;
//! - a daemon that is behind by less than one poll interval waits for it;
//! - a watermark later than now less `settle_secs` was set by a clock ahead of this one: the window is the overlap
//!   behind now less `settle_secs` instead, whose completion moves the watermark back, so no window it plans ends
//!   later than that; a watermark more than a minute in the future is said (the log once, then `status`);
//! - while the clock reads earlier than `clock_floor` ([`window::CLOCK_FLOOR`]: a clock not set yet) no feed is due,
//!   so no window is planned and no cursor moves by it, and the loop is woken every [`CLOCK_RECHECK`] instead of
//!   when a feed would be due;
//! - each feed has at most one fetch in flight, so a slow or hanging feed never holds up the others, and a feed a
//!   reload disables keeps its state, so enabled again it waits for its fetch in flight (whose answer is dropped
//!   while it is disabled) and for its wait; a wait the server asks for (a 429's reset, a low
//!   `X-RateLimit-Remaining`) holds the feed whose call was answered so. Mimecast applies its quota per API user
//!   and "differently per resource": another feed that shares an exhausted quota gets its own 429 (a call not
//!   executed) and waits in turn, one refused call per feed, while a hostile reset on one feed cannot stop the
//!   others.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::{Mode, Now, Retries};
use crate::datetime;
use crate::mimecast::Feed;
use crate::mimecast::client::{FetchError, PageRequest, Retry};
use crate::mimecast::window::{self, Settings, Window};
use crate::mimecast::wire::{KeysDigest, Page};

/// The most pages one window may take: a window still handing out a next page after this many is a pagination loop
/// (a failure like a repeated token), however new each token looks. It bounds what one window costs in requests,
/// and what the poller remembers of it: per page, a `TokenDigest` of its token (16 bytes) and a [`KeysDigest`] of
/// its records (32 bytes), whatever the size of the token or the page, so a feed's window holds at most 10,000 × 48
/// bytes in two hash sets, under 1 MiB with their overhead, and the six feeds under 6 MiB. Beyond that, a feed holds
/// one token whole, the next page's, until it is fetched. No window a configuration allows should need so many:
/// Mimecast's quota is per API user and was seen at 10,000 calls an hour, shared by the six feeds, so a window of
/// 10,000 pages would take more than an hour of the whole quota to read; at the default page of 500 records it holds
/// 5 million records, over 1,300 a second for the default one-hour window, far beyond a tenant's security logs.
pub const MAX_PAGES_PER_WINDOW: usize = 10_000;

/// How often the loop looks at the clock again while it reads earlier than `clock_floor`: NTP sets a clock within
/// seconds to minutes of boot, and polling should start soon after, without the loop spinning meanwhile.
pub const CLOCK_RECHECK: Duration = Duration::from_secs(30);

/// The poller's settings, from `[mimecast]` and the tuning.
#[derive(Debug, Clone, Copy)]
pub struct PollerSettings {
    pub retries: Retries,
    pub window: Settings,
    pub poll_interval: Duration,
    /// No feed is polled while the clock reads earlier than this: [`window::CLOCK_FLOOR`] (tests with small fake
    /// times set 0).
    pub clock_floor: i64,
}

/// What the loop must do after a page came back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Store the page's records, with the window's next page token (`None`: the window is complete and the
    /// watermark moves to its end), in one transaction; then report [`Poller::on_committed`]. Seen keys whose
    /// time is before `forget_before` may go: no future window starts that early.
    Commit { next_token: Option<String>, forget_before: i64 },
    /// Keep this error on the feed's cursor for `status`.
    RecordError(String),
    /// Forget the window's page token: the window is read again from its first page.
    RestartWindow,
}

/// The page the loop should fetch for a feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub window: Window,
    pub page_token: Option<String>,
}

#[derive(Debug)]
struct FeedState {
    feed: Feed,
    /// The config enables the feed. A feed a reload disables is kept, disabled, for its fetch in flight and its
    /// wait (see [`Poller::reconfigure`]); it is neither due nor listed.
    enabled: bool,
    due: Instant,
    failures: u32,
    /// Times the window in progress was restarted because its page token was refused; reset when it completes.
    restarts: u32,
    /// The page tokens Mimecast handed out in the window in progress, each as its digest: one seen again is a cycle,
    /// not progress. At most [`MAX_PAGES_PER_WINDOW`].
    tokens: HashSet<TokenDigest>,
    /// Where the pages remembered lead: the window in progress and its next page's token, as last committed (`None`
    /// until a page with a next one is). Only a page read there is compared with them: one read elsewhere is not
    /// the window's next page, and the loop drops it as one that does not follow the cursor.
    at: Option<(Window, TokenDigest)>,
    /// The record keys of each page of the window committed so far (each page's set, in any order): a page with
    /// the same ones again, under a new token, is a loop (of one page or of several), not progress. At most
    /// [`MAX_PAGES_PER_WINDOW`].
    pages_seen: HashSet<KeysDigest>,
    /// `--once`: this feed has finished its pass (caught up, or gave up).
    done: bool,
    /// A fetch of this feed is in flight.
    fetching: bool,
    /// `--once`: the window this pass planned itself (from the watermark, so over the overlap), and whether it
    /// has read one to its end. A pass does not end on a window it only resumed, nor before it read one of its
    /// own: records Mimecast indexed late behind the watermark would wait for the next pass.
    own: Option<Window>,
    read_own: bool,
    /// A page waiting for its commit.
    pending: Option<Pending>,
    /// The clock went back: the stored watermark was in the future by more than the tolerance, and the window
    /// planned from the clock instead is being read.
    clock_back: Option<ClockBack>,
    pages: u64,
    queued: u64,
    skipped: u64,
    /// A failure needed an operator (credentials, a permission) or gave the `--once` pass up, and no page was
    /// committed since: for the agent's health report.
    refused: bool,
    /// The last failure, with no page committed since, needed an operator: the feed waits out a slow retry, which
    /// new credentials end.
    slow: bool,
}

impl FeedState {
    fn new(feed: Feed, due: Instant) -> FeedState {
        FeedState {
            feed,
            enabled: true,
            due,
            failures: 0,
            restarts: 0,
            tokens: HashSet::new(),
            at: None,
            pages_seen: HashSet::new(),
            done: false,
            fetching: false,
            own: None,
            read_own: false,
            pending: None,
            clock_back: None,
            pages: 0,
            queued: 0,
            skipped: 0,
            refused: false,
            slow: false,
        }
    }
}

/// A page token as a window remembers it: the first 16 bytes of its SHA-256. A token's length has no limit but the
/// page's (100 KB tokens were seen to take the agent from 25 to 149 MB in 1,334 pages when the window kept them
/// whole), and a window remembers each one it was handed, so it keeps this instead. Two tokens of a window share
/// a digest with a chance of about 2^-128 a pair: a false cycle, which would fail that page, is not a risk worth
/// more bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct TokenDigest([u8; 16]);

impl TokenDigest {
    fn of(token: &str) -> TokenDigest {
        let hash = Sha256::digest(token.as_bytes());
        let mut digest = [0; 16];
        digest.copy_from_slice(&hash[..16]);
        TokenDigest(digest)
    }
}

/// A page waiting for its commit: its window, its next page's token (`None`: the last page), the wait the server
/// asked for, and its record keys.
#[derive(Debug)]
struct Pending {
    window: Window,
    next: Option<String>,
    throttle: Duration,
    keys: Option<KeysDigest>,
}

/// A watermark found later than the clock allows, and the window read from the clock instead.
#[derive(Debug)]
struct ClockBack {
    /// The watermark as found: a watermark said once is not said again while it stands.
    watermark: i64,
    window: Window,
    /// For `status`, once that window is read: the feed's error, since its completion clears the one before.
    note: String,
}

#[derive(Debug)]
pub struct Poller {
    s: PollerSettings,
    feeds: Vec<FeedState>,
    /// `--once`: the wall-clock time the pass started; windows end no later than this (less `settle_secs`).
    pass_start: i64,
    gave_up: bool,
}

impl Poller {
    /// Every feed is due at once.
    pub fn new(s: PollerSettings, feeds: &[Feed], now: Now) -> Poller {
        Poller {
            s,
            feeds: feeds.iter().map(|&f| FeedState::new(f, now.at)).collect(),
            pass_start: now.unix,
            gave_up: false,
        }
    }

    /// SIGHUP: the feeds kept keep their state, their waits included (a backoff, a server's rate-limit wait, a slow
    /// retry) and their failures in a row, so that reloading is no way round what Mimecast answered (100 reloads
    /// once made 636 calls into a Mimecast answering 429); a feed never enabled before is due at once. The loop
    /// then tells the feeds whose credentials changed ([`Poller::on_new_credentials`]).
    ///
    /// A feed the reload disables keeps its state too, disabled (at most one per [`Feed`]): its fetch in flight,
    /// whose answer is dropped while it is disabled, and its wait. Enabled again, it starts no second fetch before
    /// the first is answered (both pages would come back with the same next token, the second taken for a
    /// pagination cycle), and it waits out what it was waiting out.
    pub fn reconfigure(&mut self, s: PollerSettings, feeds: &[Feed], now: Now) {
        let mut states = Vec::new();
        for &feed in feeds {
            let i = self.feeds.iter().position(|f| f.feed == feed);
            let mut state = i.map_or_else(|| FeedState::new(feed, now.at), |i| self.feeds.remove(i));
            state.enabled = true;
            states.push(state);
        }
        for mut state in self.feeds.drain(..) {
            state.enabled = false;
            states.push(state);
        }
        self.feeds = states;
        self.s = s;
    }

    /// A reload gave `feed` other credentials (client id, secret or base URL): a slow retry it waits out ends at
    /// once, since the failure it waits for may be what they mend (credentials refused, a permission the API
    /// application lacks, a redirect, a request refused as not retryable). Any other wait stands: a backoff or a
    /// rate-limit wait is about the server, and a new secret of the same API user shares that user's quota.
    pub fn on_new_credentials(&mut self, feed: Feed, now: Now) {
        if let Some(f) = self.state(feed).filter(|f| f.slow) {
            f.due = f.due.min(now.at);
        }
    }

    /// The feeds enabled, in the config's order.
    pub fn feeds(&self) -> impl Iterator<Item = Feed> + '_ {
        self.enabled().map(|f| f.feed)
    }

    fn enabled(&self) -> impl Iterator<Item = &FeedState> {
        self.feeds.iter().filter(|f| f.enabled)
    }

    /// The feed due soonest with no fetch in flight among those `ready` allows (the loop leaves out a feed whose
    /// API application's token is being fetched: it waits for that fetch, not for a timer).
    /// None while the clock reads earlier than `clock_floor`.
    pub fn due_where(&self, now: Now, ready: impl Fn(Feed) -> bool) -> Option<Feed> {
        if now.unix < self.s.clock_floor {
            return None;
        }
        self.polling().filter(|f| f.due <= now.at && ready(f.feed)).min_by_key(|f| f.due).map(|f| f.feed)
    }

    /// When the next feed with no fetch in flight that `ready` allows is due; while the clock reads earlier than
    /// `clock_floor`, when to look at it again instead (none is due until then).
    pub fn next_wake_where(&self, now: Now, ready: impl Fn(Feed) -> bool) -> Option<Instant> {
        if now.unix < self.s.clock_floor {
            return Some(now.at + CLOCK_RECHECK);
        }
        self.polling().filter(|f| ready(f.feed)).map(|f| f.due).min()
    }

    /// What to say while the clock reads earlier than `clock_floor` and nothing is polled; `None` otherwise.
    pub fn clock_unset(&self, now: Now) -> Option<String> {
        window::clock_unset(now.unix, self.s.clock_floor)
    }

    fn polling(&self) -> impl Iterator<Item = &FeedState> {
        self.enabled().filter(|f| !f.done && !f.fetching)
    }

    /// The loop started fetching the feed's planned page.
    pub fn on_fetching(&mut self, feed: Feed) {
        if let Some(f) = self.state(feed) {
            f.fetching = true;
        }
    }

    /// The loop dropped the feed's fetch or its page (its token belonged to replaced credentials; a page read
    /// ahead no longer follows the stored cursor, or the page before it was not stored): the feed is due again as
    /// it was, and plans its next page from the stored cursor.
    pub fn on_abandoned(&mut self, feed: Feed) {
        if let Some(f) = self.feeds.iter_mut().find(|f| f.feed == feed) {
            f.fetching = false;
            f.pending = None;
        }
    }

    /// Read-ahead: the page after the one waiting for its commit, fetched while that commit runs, so that the
    /// commit and the next round trip overlap. Only when that page has a next page, the server asked for no wait,
    /// and nothing of the feed is in flight. The loop stores the page fetched so only if the cursor still points
    /// at it once it comes back, and calls [`Poller::on_abandoned`] otherwise.
    pub fn read_ahead(&mut self, feed: Feed) -> Option<Plan> {
        let f = self.state(feed)?;
        let Pending { window, next: Some(token), throttle, .. } = f.pending.as_ref()? else { return None };
        if f.fetching || f.done || !throttle.is_zero() {
            return None;
        }
        let plan = Plan { window: *window, page_token: Some(token.clone()) };
        f.fetching = true;
        Some(plan)
    }

    /// Fetches in flight, of disabled feeds too.
    pub fn fetching(&self) -> usize {
        self.feeds.iter().filter(|f| f.fetching).count()
    }

    /// Every feed finished its `--once` pass.
    pub fn all_done(&self) -> bool {
        self.enabled().all(|f| f.done)
    }

    /// The feeds refused until an operator acts (credentials, a permission), or given up for this pass.
    pub fn refused(&self) -> impl Iterator<Item = Feed> + '_ {
        self.enabled().filter(|f| f.refused).map(|f| f.feed)
    }

    /// A feed or the whole poller gave up in this `--once` pass.
    pub fn gave_up(&self) -> bool {
        self.gave_up
    }

    /// "Now" for window ends: the clock, except that a `--once` pass reads up to the moment it started.
    fn horizon(&self, now: Now) -> i64 {
        match self.s.retries.mode {
            Mode::Once => self.pass_start.min(now.unix),
            Mode::Daemon => now.unix,
        }
    }

    /// The page a due feed reads next, from its stored cursor: the window in progress, or the next window after
    /// the watermark. `None` when nothing new has settled: the feed idles (its `--once` pass is over).
    ///
    /// `keys_since`: the time before which the store no longer holds the feed's seen keys (`Cursor::keys_since`). A
    /// window of its own that would re-read before it (the overlap was raised) starts there instead
    /// ([`crate::store::reread_within_keys`]), so that what was delivered is not queued again; it is clamped here,
    /// before the window is remembered as the pass's own.
    pub fn plan(
        &mut self,
        now: Now,
        feed: Feed,
        watermark: i64,
        keys_since: Option<i64>,
        in_progress: Option<(Window, Option<String>)>,
    ) -> Option<Plan> {
        if let Some((window, page_token)) = in_progress {
            return Some(Plan { window, page_token });
        }
        let once = self.s.retries.mode == Mode::Once;
        let (horizon, settings) = (self.horizon(now), self.s.window);
        let next = window::next_window(watermark, horizon, settings);
        let f = self.state(feed)?;
        // `--once` with nothing new settled still reads the overlap once, for what was indexed late behind it.
        let window = next.or_else(|| window::overlap(watermark, settings).filter(|_| once && !f.read_own));
        let window = window.map(|w| crate::store::reread_within_keys(w, watermark, keys_since));
        match window {
            Some(mut window) => {
                // The re-read a clock that went back started, planned again after its first page failed, keeps the
                // start it was given (within `max_window_secs`): planned from the later clock, it would skip what
                // Mimecast indexed meanwhile behind the watermark the clock ahead left.
                if let Some(c) = f.clock_back.as_ref().filter(|c| c.watermark == watermark && watermark > window.to)
                    && window.to.saturating_sub(c.window.from) <= settings.max_window_secs
                {
                    window.from = window.from.min(c.window.from);
                }
                f.own = Some(window);
                if watermark > window.to {
                    clock_went_back(f, watermark, horizon, window);
                }
                Some(Plan { window, page_token: None })
            }
            None => {
                self.idle(feed, now);
                None
            }
        }
    }

    fn idle(&mut self, feed: Feed, now: Now) {
        let (mode, interval) = (self.s.retries.mode, self.s.poll_interval);
        if let Some(f) = self.state(feed) {
            match mode {
                Mode::Once => f.done = true,
                Mode::Daemon => f.due = now.at + interval,
            }
        }
    }

    /// The state of an enabled feed.
    fn state(&mut self, feed: Feed) -> Option<&mut FeedState> {
        self.feeds.iter_mut().find(|f| f.feed == feed && f.enabled)
    }

    /// A fetch of a planned page came back. `throttle` is the wait the server asked for even on success (its rate-limit
    /// headers). A feed a reload disabled meanwhile gets nothing: its page or failure is dropped without effect, but
    /// for the end of its fetch.
    pub fn on_page(
        &mut self,
        now: Now,
        req: &PageRequest,
        page: Result<&Page, FetchError>,
        throttle: Option<Duration>,
    ) -> Vec<Action> {
        let feed = req.feed;
        let Some(f) = self.feeds.iter_mut().find(|f| f.feed == feed) else { return Vec::new() };
        f.fetching = false;
        if !f.enabled {
            log::info!("{feed}: disabled by a reload; its page in flight is not kept");
            return Vec::new();
        }
        let mut retry = None;
        let page = page.and_then(|page| match pagination_loop(f, req, page) {
            Some((e, how)) => {
                retry = Some(how);
                Err(FetchError::Pagination(e))
            }
            None => Ok(page),
        });
        match page {
            Ok(page) => {
                if page.repaired > 0 {
                    log::warn!(
                        "{feed}: a page held {} character(s) no JSON reader accepts (invalid UTF-8, unpaired UTF-16 \
                         surrogates); they were replaced with U+FFFD so the feed goes on",
                        page.repaired
                    );
                }
                let next_token = if page.is_last() { None } else { page.next.clone() };
                f.pending = Some(Pending {
                    window: req.window,
                    next: next_token.clone(),
                    throttle: throttle.unwrap_or_default(),
                    keys: page.keys,
                });
                // The last page of the window read because the clock went back: `status` says so after the
                // commit, which clears the feed's error.
                let note = f.clock_back.as_ref().filter(|c| next_token.is_none() && c.window == req.window);
                let note = note.map(|c| Action::RecordError(c.note.clone()));
                let commit = Action::Commit { next_token, forget_before: self.forget_before(req.window) };
                [commit].into_iter().chain(note).collect()
            }
            Err(e) => self.failed(now, feed, req.page_token.is_some(), e, retry),
        }
    }

    /// The seen-key horizon: a key whose time is more than `overlap` and an hour of slack before a window's end
    /// can never be read again, since every later window starts after it.
    fn forget_before(&self, w: Window) -> i64 {
        w.to - self.s.window.overlap_secs - 3600
    }

    /// The page of the last [`Action::Commit`] is stored: the feed goes on (at once, or after the server's wait,
    /// unless its next page is already in flight), or, at the window's last page, idles unless it is behind.
    pub fn on_committed(&mut self, now: Now, feed: Feed, queued: u64, skipped: u64) {
        let (mode, interval, settings) = (self.s.retries.mode, self.s.poll_interval, self.s.window);
        let horizon = self.horizon(now);
        let Some(f) = self.state(feed) else { return };
        let Some(Pending { window: w, next, throttle, keys }) = f.pending.take() else { return };
        (f.failures, f.refused, f.slow) = (0, false, false);
        f.pages += 1;
        f.queued += queued;
        f.skipped += skipped;
        f.due = now.at + throttle;
        if let Some(next) = next {
            let next = TokenDigest::of(&next);
            f.tokens.insert(next);
            f.at = Some((w, next));
            f.pages_seen.extend(keys);
            return;
        }
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
        f.at = None;
        f.pages_seen.clear();
        if f.clock_back.as_ref().is_some_and(|c| c.window == w) {
            f.clock_back = None;
        }
        // A daemon behind by less than one poll interval waits for it: how long the pages took must not decide
        // how often the feed is read. A `--once` pass goes on until it reached where it started.
        let slack = match mode {
            Mode::Once => 0,
            Mode::Daemon => i64::try_from(interval.as_secs()).unwrap_or(i64::MAX),
        };
        // A `--once` pass that only finished a window it resumed plans one of its own next (see `own`).
        f.read_own |= f.own == Some(w);
        if !window::behind(w, horizon, settings, slack) && (mode == Mode::Daemon || f.read_own) {
            self.idle(feed, now);
        }
    }

    /// `how`: the retry a pagination failure calls for, which the error alone does not say.
    fn failed(&mut self, now: Now, feed: Feed, had_token: bool, e: FetchError, how: Option<Retry>) -> Vec<Action> {
        let r = self.s.retries;
        let Some(f) = self.state(feed) else { return Vec::new() };
        f.pending = None;
        let retry = how.unwrap_or_else(|| e.retry(had_token));
        // A restart reads page 1 again, whose success resets `failures`: restarts are counted per window instead,
        // so a token that is refused every time backs off rather than looping at full speed.
        let attempts = if retry == Retry::RestartWindow {
            f.restarts += 1;
            f.tokens.clear();
            f.at = None;
            f.pages_seen.clear();
            f.restarts
        } else {
            f.failures += 1;
            f.failures
        };
        let backoff = r.backoff(attempts);
        let delay = match retry {
            Retry::Backoff | Retry::RestartWindow => backoff,
            Retry::Slow => r.slow_retry,
            Retry::AtLeast(wait) => wait.max(backoff),
        };
        f.due = now.at + delay;
        let gave_up = r.mode == Mode::Once && (retry == Retry::Slow || attempts >= r.once_attempts);
        f.done |= gave_up;
        f.refused |= retry == Retry::Slow || gave_up;
        f.slow = retry == Retry::Slow;
        self.gave_up |= gave_up;
        let mut actions = vec![Action::RecordError(e.to_string())];
        if retry == Retry::Slow {
            log::error!("{feed}: {e}; retrying in {}s", delay.as_secs());
        } else {
            log::warn!("{feed}: {e}; attempt {attempts} failed, retrying in {:.1}s", delay.as_secs_f64());
        }
        if retry == Retry::RestartWindow {
            log::warn!("{feed}: reading the window again from its first page");
            actions.push(Action::RestartWindow);
        }
        if gave_up {
            log::error!("{feed}: giving up for this pass after {attempts} failure(s)");
        }
        actions
    }

    /// `--once`: the store cannot take pages (disk full, locked) and polling stops for this pass. Says whether
    /// a feed was still polling.
    pub fn stop_all(&mut self) -> bool {
        let polling = self.enabled().any(|f| !f.done);
        if polling {
            self.feeds.iter_mut().for_each(|f| f.done = true);
            self.gave_up = true;
        }
        polling
    }
}

/// A feed's window is planned from the clock because its watermark is later than the clock allows (now less
/// `settle_secs`). When the watermark is in the future by more than the tolerance, a person should know: the log
/// says it once for that watermark, and `status` once the window is read. Less is the clock's routine correction,
/// or `settle_secs` raised.
fn clock_went_back(f: &mut FeedState, watermark: i64, now: i64, window: Window) {
    let Some(ahead) = window::clock_went_back(watermark, now) else {
        log::debug!("{}: the watermark is later than now less settle_secs; reading from the clock", f.feed);
        return;
    };
    let why = "the clock went back (or the queue came from a machine whose clock was ahead)";
    let (from, to) = (datetime::rfc3339(window.from), datetime::rfc3339(window.to));
    let found = format!("read up to {}, {ahead}s ahead of the clock", datetime::rfc3339(watermark));
    if f.clock_back.as_ref().is_none_or(|c| c.watermark != watermark) {
        log::warn!(
            "{}: {why}: the feed was {found}; reading {from} .. {to} and moving the watermark back to its end; \
             records already queued are skipped",
            f.feed
        );
    }
    let note = format!(
        "{why}: this feed had been {found}; it was read again from {from} and its watermark moved back to {to}"
    );
    f.clock_back = Some(ClockBack { watermark, window, note });
}

/// What makes a well-formed page that points at a next one a loop rather than progress, if anything. Each of these,
/// followed, would read pages for ever without the window ending (nor `--once`), burning the quota and growing the
/// window's token set; instead it is a failure, backed off and shown, and the feed goes on from its cursor. A last
/// page never loops: that includes an empty page that still carries a `next` (the API's quirk), which ends its
/// window, so an empty page is never "the same records" either.
fn pagination_loop(f: &FeedState, req: &PageRequest, page: &Page) -> Option<(String, Retry)> {
    let next = page.next.as_ref().filter(|_| !page.is_last())?;
    // The window's pages are those that lead to this one only if it was read where they lead; otherwise it is a
    // page of a fetch the feed no longer follows (the cursor moved on), which proves nothing about Mimecast.
    let read_there = |(w, token): (Window, TokenDigest)| {
        w == req.window && req.page_token.as_deref().map(TokenDigest::of) == Some(token)
    };
    let remembered = f.at.is_none_or(read_there);
    // The token just used, or an earlier one (A -> B -> A).
    if req.page_token.as_ref() == Some(next) || remembered && f.tokens.contains(&TokenDigest::of(next)) {
        return Some((
            format!(
                "Mimecast handed out a page token it had already given in this window ({}): a pagination cycle; the \
                 window is not advanced",
                excerpt(next)
            ),
            Retry::Backoff,
        ));
    }
    // An earlier page's records again (the page before's, or one further back, in any order), under a token never
    // seen: a server that ignores the token it was given, or goes round a few pages.
    if remembered && page.keys.is_some_and(|k| f.pages_seen.contains(&k)) {
        // Restarted, not retried: records indexed meanwhile ahead of the page read push the later ones back, so a
        // page may bring an earlier page's records again under a true token, and that token brings the same page
        // for ever. The simulator found a feed stuck so for hours, losing what came after (seeds 518, 594). A
        // server that does go round is backed off as restarts count.
        return Some((
            format!(
                "Mimecast sent the same {} records again with a new page token ({}): a pagination loop, or records \
                 indexed meanwhile that pushed the rest back; the window is read again from its first page",
                page.held,
                excerpt(next)
            ),
            Retry::RestartWindow,
        ));
    }
    // Tokens that are all new and records that all differ, without end: the page before the token set would outgrow
    // its bound is the last one followed. This page is the window's `tokens.len() + 1`th.
    if remembered && f.tokens.len() + 1 >= MAX_PAGES_PER_WINDOW {
        return Some((
            format!(
                "Mimecast handed out a next page after {MAX_PAGES_PER_WINDOW} pages of one window, more than any \
                 window needs: a pagination loop; the window is not advanced"
            ),
            Retry::Backoff,
        ));
    }
    None
}

/// The start of a server-given string, for a log line: enough to recognise it, never a page of it.
fn excerpt(s: &str) -> String {
    let cut = crate::http::printable(s, 40);
    if cut.len() < s.len() { format!("{cut}…") } else { cut }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::http::ServerWait;
    use crate::mimecast::auth::AuthError;
    use serde_json::json;

    const HOUR: i64 = 3600;
    const T0: i64 = 1_800_000_000;

    /// The loop's questions with every feed ready (none waits for a token), as the tables ask them.
    impl Poller {
        fn due(&self, now: Now) -> Option<Feed> {
            self.due_where(now, |_| true)
        }

        fn next_wake(&self, now: Now) -> Option<Instant> {
            self.next_wake_where(now, |_| true)
        }
    }

    fn settings(mode: Mode) -> PollerSettings {
        PollerSettings {
            retries: crate::policy::exact_retries(mode, 2, 300),
            window: Settings { overlap_secs: 300, settle_secs: 60, max_window_secs: HOUR },
            poll_interval: Duration::from_secs(60),
            clock_floor: window::CLOCK_FLOOR,
        }
    }

    /// What a test feeds the poller, one event per row.
    #[derive(Clone)]
    enum Ev {
        /// Seconds pass.
        Wait(u64),
        /// A page with records never served before and a next token (`None`: the last page).
        Page(Option<&'static str>),
        /// A page with the records of the page served before it, and a next token.
        Same(Option<&'static str>),
        /// A page without records, and a next token (the API's quirk on an empty last page).
        Empty(Option<&'static str>),
        /// A fetch failed.
        Fail(FetchError),
        /// SIGHUP: the feeds enabled now.
        Reload(&'static [Feed]),
        /// The reload gave the feed new credentials.
        NewCredentials,
        /// The feed's next page is fetched, and stays in flight until [`Ev::Answer`].
        Fetch,
        /// The fetch in flight comes back: a page with records never served before and a next token, or a failure.
        Answer(Result<Option<&'static str>, FetchError>),
    }

    /// What a row expects: the actions, and the delay until the feed is due again (`None`: not due, done).
    type Want = (Vec<Action>, Option<u64>);

    /// A feed's cursor, kept by the test as the store would.
    struct Rig {
        p: Poller,
        now: Now,
        watermark: i64,
        window: Option<(Window, Option<String>)>,
        /// Pages served so far: each [`Ev::Page`] holds a record of its own.
        served: u64,
        mode: Mode,
        /// The request of [`Ev::Fetch`], until its [`Ev::Answer`].
        in_flight: Option<PageRequest>,
    }

    impl Rig {
        fn new(mode: Mode, behind: i64) -> Rig {
            let now = Now { at: Instant::now(), unix: T0 };
            let p = Poller::new(settings(mode), &[Feed::Audit], now);
            Rig { p, now, watermark: T0 - behind, window: None, served: 0, mode, in_flight: None }
        }

        /// The request for the feed's next page, from the cursor as the store would keep it.
        fn plan(&mut self) -> PageRequest {
            let feed = Feed::Audit;
            assert_eq!(self.p.due(self.now), Some(feed), "the feed must be due for a fetch");
            let plan =
                self.p.plan(self.now, feed, self.watermark, None, self.window.clone()).expect("a window to read");
            PageRequest { feed, window: plan.window, page_token: plan.page_token, page_size: 100 }
        }

        /// Fetches the next page: `held` records (0 or 1), new ones or those of the page served before, and
        /// `next`; commits it if the poller says so.
        fn page(&mut self, next: Option<String>, held: usize, new: bool) -> Vec<Action> {
            let req = self.plan();
            self.answer(&req, next, held, new)
        }

        /// The page of `req` comes back; it is committed if the poller says so and it follows the cursor (the loop
        /// drops a page that does not, and says so with [`Poller::on_abandoned`]).
        fn answer(&mut self, req: &PageRequest, next: Option<String>, held: usize, new: bool) -> Vec<Action> {
            self.served += u64::from(new && held > 0);
            let key = format!("id:{}", self.served);
            let keys = Some(crate::mimecast::wire::keys_digest([key.as_str()].into_iter().take(held)));
            // The records are taken out before the poller sees the page, as the fetch task does.
            let page = Page { held, records: Vec::new(), next, repaired: 0, keys };
            let actions = self.p.on_page(self.now, req, Ok(&page), None);
            if actions.contains(&Action::RestartWindow) {
                self.window = self.window.take().map(|(w, _)| (w, None));
            }
            let follows = match &self.window {
                Some((w, token)) => *w == req.window && *token == req.page_token,
                None => req.page_token.is_none(),
            };
            if let (Some(Action::Commit { .. }), false) = (actions.first(), follows) {
                self.p.on_abandoned(req.feed);
            } else if let Some(Action::Commit { next_token, .. }) = actions.first() {
                self.window = next_token.clone().map(|t| (req.window, Some(t)));
                if next_token.is_none() {
                    self.watermark = req.window.to;
                }
                self.p.on_committed(self.now, req.feed, 1, 0);
            }
            actions
        }

        /// The fetch of `req` failed.
        fn fail(&mut self, req: &PageRequest, e: FetchError) -> Vec<Action> {
            let actions = self.p.on_page(self.now, req, Err(e), None);
            if actions.contains(&Action::RestartWindow) {
                self.window = self.window.take().map(|(w, _)| (w, None));
            }
            actions
        }

        /// Runs one event and returns the actions and when the feed is due again, relative to now.
        fn step(&mut self, ev: Ev) -> Want {
            let plan = |r: &mut Rig| r.plan();
            let actions = match ev {
                Ev::Wait(s) => {
                    self.now = self.now.after(Duration::from_secs(s));
                    Vec::new()
                }
                Ev::Page(next) => self.page(next.map(String::from), 1, true),
                Ev::Same(next) => self.page(next.map(String::from), 1, false),
                Ev::Empty(next) => self.page(next.map(String::from), 0, true),
                Ev::Fail(e) => {
                    let plan = plan(self);
                    self.fail(&plan, e)
                }
                Ev::Reload(feeds) => {
                    self.p.reconfigure(settings(self.mode), feeds, self.now);
                    Vec::new()
                }
                Ev::NewCredentials => {
                    self.p.on_new_credentials(Feed::Audit, self.now);
                    Vec::new()
                }
                Ev::Fetch => {
                    let req = plan(self);
                    self.p.on_fetching(req.feed);
                    self.in_flight = Some(req);
                    Vec::new()
                }
                Ev::Answer(answer) => {
                    let req = self.in_flight.take().expect("a fetch in flight");
                    match answer {
                        Ok(next) => self.answer(&req, next.map(String::from), 1, true),
                        Err(e) => self.fail(&req, e),
                    }
                }
            };
            let due = self.p.next_wake(self.now).map(|d| d.saturating_duration_since(self.now.at).as_secs());
            (actions, due)
        }
    }

    /// Runs the events in order and checks each row's actions and delay.
    fn check(mode: Mode, behind: i64, rows: &[(Ev, Want)]) -> Rig {
        let mut rig = Rig::new(mode, behind);
        for (i, (ev, want)) in rows.iter().enumerate() {
            let got = rig.step(ev.clone());
            let got = (got.0.into_iter().map(strip).collect::<Vec<_>>(), got.1);
            assert_eq!(&got, want, "row {i}");
        }
        rig
    }

    /// Error texts and the seen-key horizon are checked on their own: rows compare the action kind and token.
    fn strip(a: Action) -> Action {
        match a {
            Action::RecordError(_) => Action::RecordError(String::new()),
            Action::Commit { next_token, .. } => Action::Commit { next_token, forget_before: 0 },
            a => a,
        }
    }

    fn strip_all(actions: Vec<Action>) -> Vec<Action> {
        actions.into_iter().map(strip).collect()
    }

    fn commit(t: Option<&str>) -> Action {
        Action::Commit { next_token: t.map(String::from), forget_before: 0 }
    }

    fn err() -> Action {
        Action::RecordError(String::new())
    }

    fn failed(retryable: bool, code: &str, message: &str) -> FetchError {
        FetchError::Failed { status: 200, code: code.into(), message: message.into(), retryable }
    }

    fn page_token_refused() -> FetchError {
        failed(false, "err_invalid_page_token", "invalid pageToken")
    }

    #[test]
    fn pages_follow_their_tokens_and_a_caught_up_daemon_waits_one_interval() {
        check(
            Mode::Daemon,
            600,
            &[
                (Ev::Page(Some("A")), (vec![commit(Some("A"))], Some(0))),
                (Ev::Page(Some("B")), (vec![commit(Some("B"))], Some(0))),
                (Ev::Page(None), (vec![commit(None)], Some(60))),
            ],
        );
    }

    #[test]
    fn a_daemon_behind_goes_on_at_once() {
        let rig = check(Mode::Daemon, 3 * HOUR, &[(Ev::Page(None), (vec![commit(None)], Some(0)))]);
        assert_eq!(rig.watermark, T0 - 3 * HOUR + HOUR - 300);
    }

    #[test]
    fn rate_limited_then_success() {
        let wait = ServerWait { wait: Duration::from_secs(40), asked_secs: 40.0 };
        check(
            Mode::Daemon,
            600,
            &[
                // The server's wait, when longer than the backoff.
                (Ev::Fail(FetchError::RateLimited(Some(wait))), (vec![err()], Some(40))),
                (Ev::Wait(40), (vec![], Some(0))),
                // The backoff, when longer than the server's wait (the second failure: 4 s).
                (
                    Ev::Fail(FetchError::RateLimited(Some(ServerWait {
                        wait: Duration::from_secs(1),
                        asked_secs: 1.0,
                    }))),
                    (vec![err()], Some(4)),
                ),
                // No wait given: the backoff (third failure: 8 s).
                (Ev::Wait(4), (vec![], Some(0))),
                (Ev::Fail(FetchError::RateLimited(None)), (vec![err()], Some(8))),
                (Ev::Wait(8), (vec![], Some(0))),
                // Success resets the count: the next failure waits the base again.
                (Ev::Page(Some("A")), (vec![commit(Some("A"))], Some(0))),
                (Ev::Fail(FetchError::Server { status: 503, detail: "unavailable".into() }), (vec![err()], Some(2))),
            ],
        );
    }

    #[test]
    fn a_refused_page_token_restarts_the_window_with_growing_delays() {
        check(
            Mode::Daemon,
            600,
            &[
                (Ev::Page(Some("A")), (vec![commit(Some("A"))], Some(0))),
                (Ev::Page(Some("B")), (vec![commit(Some("B"))], Some(0))),
                // Page 3 refused: restart from page 1, after a delay.
                (Ev::Fail(page_token_refused()), (vec![err(), Action::RestartWindow], Some(2))),
                (Ev::Wait(2), (vec![], Some(0))),
                (Ev::Page(Some("A")), (vec![commit(Some("A"))], Some(0))),
                (Ev::Page(Some("B")), (vec![commit(Some("B"))], Some(0))),
                // Refused again: the page-1 successes did not reset the count; the delay grows.
                (Ev::Fail(page_token_refused()), (vec![err(), Action::RestartWindow], Some(4))),
                (Ev::Wait(4), (vec![], Some(0))),
                // The window completes: the count is reset for the next one.
                (Ev::Page(None), (vec![commit(None)], Some(60))),
            ],
        );
    }

    #[test]
    fn a_page_token_error_on_page_one_is_not_a_restart() {
        // No token was sent: re-reading from page 1 would be the same request. An operator must act.
        check(Mode::Daemon, 600, &[(Ev::Fail(page_token_refused()), (vec![err()], Some(300)))]);
    }

    #[test]
    fn forbidden_and_refused_credentials_retry_slowly() {
        let refused = FetchError::Auth(AuthError::Refused { status: 401, detail: "invalid_client".into() });
        check(
            Mode::Daemon,
            600,
            &[
                (Ev::Fail(FetchError::Forbidden(Feed::Audit)), (vec![err()], Some(300))),
                (Ev::Wait(300), (vec![], Some(0))),
                (Ev::Fail(refused), (vec![err()], Some(300))),
                (Ev::Wait(300), (vec![], Some(0))),
                // A fail[] that says not retryable and is not about the page token: slow too.
                (Ev::Fail(failed(false, "err_validation", "bad request")), (vec![err()], Some(300))),
            ],
        );
    }

    #[test]
    fn a_feed_is_refused_from_a_failure_that_needs_an_operator_until_a_page_is_committed() {
        let refused = |rig: &Rig| rig.p.refused().collect::<Vec<_>>();
        let net = || FetchError::Server { status: 503, detail: "unavailable".into() };
        let mut rig = check(Mode::Daemon, 600, &[(Ev::Fail(net()), (vec![err()], Some(2)))]);
        assert_eq!(refused(&rig), [], "a transient failure is not a refusal");
        rig.step(Ev::Wait(2));
        rig.step(Ev::Fail(FetchError::Forbidden(Feed::Audit)));
        assert_eq!(refused(&rig), [Feed::Audit]);
        rig.step(Ev::Wait(300));
        rig.step(Ev::Fail(net()));
        assert_eq!(refused(&rig), [Feed::Audit], "nothing has shown that the permission was granted");
        rig.step(Ev::Wait(300));
        rig.step(Ev::Page(Some("A")));
        assert_eq!(refused(&rig), []);
        // In --once, a feed that gave up is refused for the rest of the pass.
        let net = || FetchError::Server { status: 502, detail: "bad gateway".into() };
        let mut rig = check(Mode::Once, 600, &[(Ev::Fail(net()), (vec![err()], Some(2)))]);
        for _ in 0..2 {
            assert_eq!(refused(&rig), []);
            rig.step(Ev::Wait(10));
            rig.step(Ev::Fail(net()));
        }
        assert!(rig.p.gave_up());
        assert_eq!(refused(&rig), [Feed::Audit]);
    }

    #[test]
    fn a_token_cycle_is_an_error_not_progress() {
        check(
            Mode::Daemon,
            600,
            &[
                (Ev::Page(Some("A")), (vec![commit(Some("A"))], Some(0))),
                (Ev::Page(Some("B")), (vec![commit(Some("B"))], Some(0))),
                // B -> A: a cycle. Nothing is committed and the feed backs off.
                (Ev::Page(Some("A")), (vec![err()], Some(2))),
                (Ev::Wait(2), (vec![], Some(0))),
                // The same token handed back for itself.
                (Ev::Page(Some("B")), (vec![err()], Some(4))),
            ],
        );
    }

    #[test]
    fn the_same_records_under_a_new_token_are_an_error_not_progress() {
        let restart = || vec![err(), Action::RestartWindow];
        let rig = check(
            Mode::Daemon,
            600,
            &[
                (Ev::Page(Some("A")), (vec![commit(Some("A"))], Some(0))),
                // Page A's records again, under a token never seen: a loop, or records indexed meanwhile that pushed
                // the rest back. Nothing is committed, and the window is read again from its first page, not from
                // the token that brought the same page (which would bring it for ever).
                (Ev::Same(Some("B")), (restart(), Some(2))),
                (Ev::Wait(2), (vec![], Some(0))),
                // The first page again: a page of the window read afresh, not a loop.
                (Ev::Same(Some("C")), (vec![commit(Some("C"))], Some(0))),
                // Its records once more under yet another token: restarted again, and the delay grows.
                (Ev::Same(Some("D")), (restart(), Some(4))),
                (Ev::Wait(4), (vec![], Some(0))),
                // New records: the window goes on.
                (Ev::Page(Some("B")), (vec![commit(Some("B"))], Some(0))),
                // An empty page with a `next` is the window's last page, never "the same records".
                (Ev::Empty(Some("C")), (vec![commit(None)], Some(60))),
                // The next window's first page re-reads the overlap: the previous window's last records again are
                // a page of a new window, not a loop.
                (Ev::Wait(60), (vec![], Some(0))),
                (Ev::Same(Some("D")), (vec![commit(Some("D"))], Some(0))),
                // A last page that repeats the one before ends its window: nothing loops.
                (Ev::Same(None), (vec![commit(None)], Some(60))),
            ],
        );
        // Both windows were read to their ends: settle behind the clock, which moved on 2 + 4 + 60 s.
        assert_eq!(rig.watermark, T0 + 66 - 60);

        // The error says what Mimecast did, and restarts count towards `--once`'s give-up like any failure.
        let mut rig = Rig::new(Mode::Once, 600);
        rig.step(Ev::Page(Some("A")));
        let (actions, due) = rig.step(Ev::Same(Some("B")));
        let want = "Mimecast sent the same 1 records again with a new page token (B): a pagination loop, or records \
                    indexed meanwhile that pushed the rest back; the window is read again from its first page";
        assert_eq!((actions, due), (vec![Action::RecordError(want.into()), Action::RestartWindow], Some(2)));
        for (wait, due) in [(2, Some(4)), (4, None)] {
            rig.step(Ev::Wait(wait));
            assert_eq!(strip_all(rig.step(Ev::Same(Some("C"))).0), vec![commit(Some("C"))]);
            let (actions, got) = rig.step(Ev::Same(Some("D")));
            assert_eq!((strip_all(actions), got), (restart(), due));
        }
        assert!(rig.p.gave_up() && rig.p.all_done());
        assert_eq!(rig.window.map(|(_, t)| t), Some(None), "the cursor is back at the window's first page");
    }

    /// A server that goes round a few pages (A, B, A, … under tokens never seen) is caught when the first page comes
    /// back, not after the window's page bound: every page's records are remembered for the window.
    #[test]
    fn an_earlier_pages_records_again_are_a_loop_too() {
        let mut rig = Rig::new(Mode::Daemon, 600);
        assert_eq!(strip_all(rig.step(Ev::Page(Some("A"))).0), vec![commit(Some("A"))]);
        assert_eq!(strip_all(rig.step(Ev::Page(Some("B"))).0), vec![commit(Some("B"))]);
        // The first page's records again, under a new token.
        rig.served = 0;
        assert_eq!(strip_all(rig.step(Ev::Page(Some("C"))).0), vec![err(), Action::RestartWindow]);
    }

    #[test]
    fn a_window_past_max_pages_is_an_error_and_its_tokens_stay_bounded() {
        let mut rig = Rig::new(Mode::Once, 600);
        // Pages 1 .. MAX - 1, every one with new records and a new token: followed.
        for i in 1..MAX_PAGES_PER_WINDOW {
            let actions = rig.page(Some(format!("t{i}")), 1, true);
            assert_eq!(
                strip_all(actions),
                vec![Action::Commit { next_token: Some(format!("t{i}")), forget_before: 0 }]
            );
        }
        let tokens = |rig: &Rig| rig.p.feeds[0].tokens.len();
        assert_eq!(tokens(&rig), MAX_PAGES_PER_WINDOW - 1);
        // Page MAX hands out yet another next page: a loop, failed like any other, and the set does not grow.
        let want = format!(
            "Mimecast handed out a next page after {MAX_PAGES_PER_WINDOW} pages of one window, more than any window \
             needs: a pagination loop; the window is not advanced"
        );
        assert_eq!(rig.page(Some("more".into()), 1, true), vec![Action::RecordError(want)]);
        for wait in [2, 4] {
            rig.step(Ev::Wait(wait));
            assert_eq!(strip_all(rig.page(Some(format!("more{wait}")), 1, true)), vec![err()]);
        }
        assert_eq!(tokens(&rig), MAX_PAGES_PER_WINDOW - 1);
        assert!(rig.p.gave_up(), "--once gives up on it after its attempts");

        // A window of exactly MAX pages ends: its last page has no next.
        let mut rig = Rig::new(Mode::Daemon, 600);
        for i in 1..MAX_PAGES_PER_WINDOW {
            rig.page(Some(format!("t{i}")), 1, true);
        }
        assert_eq!(strip_all(rig.page(None, 1, true)), vec![commit(None)]);
        assert_eq!((tokens(&rig), rig.watermark), (0, T0 - 60), "the window completed; its tokens are forgotten");
    }

    /// The heap a remembered page token takes in the poller, whatever form it is kept in.
    trait Held {
        fn held(&self) -> usize;
    }

    impl Held for TokenDigest {
        fn held(&self) -> usize {
            std::mem::size_of::<TokenDigest>()
        }
    }

    /// A window remembers each page token in a few bytes whatever its length: what a window keeps is bounded by its
    /// pages alone (100 KB tokens once took the agent from 25 to 149 MB in 1,334 pages).
    #[test]
    fn a_window_remembers_each_page_token_in_a_few_bytes_however_long() {
        const PAGES: usize = 50;
        for len in [100_000, 8] {
            let token = |i: usize| format!("{i}{}", "t".repeat(len));
            let mut rig = Rig::new(Mode::Daemon, 600);
            for i in 0..PAGES {
                assert_eq!(strip_all(rig.page(Some(token(i)), 1, true)), vec![commit(Some(&token(i)))], "page {i}");
            }
            let held: usize = rig.p.feeds[0].tokens.iter().map(Held::held).sum();
            assert!(held <= PAGES * 16, "{len}-byte tokens: {held} bytes held for {PAGES} pages");
            // Still a cycle: the first token again, and the one just used.
            assert_eq!(strip_all(rig.page(Some(token(0)), 1, true)), vec![err()], "{len}-byte tokens");
            rig.step(Ev::Wait(2));
            assert_eq!(strip_all(rig.page(Some(token(PAGES - 1)), 1, true)), vec![err()], "{len}-byte tokens");
        }
    }

    #[test]
    fn once_gives_up_after_its_attempts_and_at_once_where_an_operator_must_act() {
        let net = || FetchError::Server { status: 502, detail: "bad gateway".into() };
        let rig = check(
            Mode::Once,
            600,
            &[
                (Ev::Fail(net()), (vec![err()], Some(2))),
                (Ev::Wait(2), (vec![], Some(0))),
                (Ev::Fail(net()), (vec![err()], Some(4))),
                (Ev::Wait(4), (vec![], Some(0))),
                // The third failure: the feed is done for this pass.
                (Ev::Fail(net()), (vec![err()], None)),
            ],
        );
        assert!(rig.p.gave_up() && rig.p.all_done());

        let rig = check(Mode::Once, 600, &[(Ev::Fail(FetchError::Forbidden(Feed::Audit)), (vec![err()], None))]);
        assert!(rig.p.gave_up());

        // A token refused on every window restart gives up too: restarts count as attempts.
        let rig = check(
            Mode::Once,
            600,
            &[
                (Ev::Page(Some("A")), (vec![commit(Some("A"))], Some(0))),
                (Ev::Fail(page_token_refused()), (vec![err(), Action::RestartWindow], Some(2))),
                (Ev::Wait(2), (vec![], Some(0))),
                (Ev::Page(Some("A")), (vec![commit(Some("A"))], Some(0))),
                (Ev::Fail(page_token_refused()), (vec![err(), Action::RestartWindow], Some(4))),
                (Ev::Wait(4), (vec![], Some(0))),
                (Ev::Page(Some("A")), (vec![commit(Some("A"))], Some(0))),
                (Ev::Fail(page_token_refused()), (vec![err(), Action::RestartWindow], None)),
            ],
        );
        assert!(rig.p.gave_up());
    }

    #[test]
    fn once_reads_up_to_where_the_pass_started_then_is_done() {
        let rig = check(
            Mode::Once,
            2 * HOUR,
            &[
                (Ev::Page(None), (vec![commit(None)], Some(0))),
                // Time passes during the pass; the pass still ends where it started (less settle).
                (Ev::Wait(3 * HOUR as u64), (vec![], Some(0))),
                (Ev::Page(None), (vec![commit(None)], Some(0))),
                // Caught up with where the pass started: the feed is done, not given up.
                (Ev::Page(None), (vec![commit(None)], None)),
            ],
        );
        assert_eq!(rig.watermark, T0 - 60);
        assert!(rig.p.all_done() && !rig.p.gave_up());
    }

    #[test]
    fn a_daemon_with_nothing_settled_idles_one_interval() {
        // Read up to now - settle: nothing new has settled.
        let mut rig = Rig::new(Mode::Daemon, 60);
        assert_eq!(rig.p.plan(rig.now, Feed::Audit, rig.watermark, None, None), None);
        assert_eq!(rig.p.due(rig.now), None);
        assert_eq!(rig.p.next_wake(rig.now), Some(rig.now.at + Duration::from_secs(60)));
        rig.now = rig.now.after(Duration::from_secs(60));
        assert_eq!(rig.p.due(rig.now), Some(Feed::Audit));
    }

    #[test]
    fn once_with_nothing_settled_reads_the_overlap_once_then_is_done() {
        // Read up to now - settle: nothing new has settled; the overlap behind the watermark is read, once.
        let rig = check(Mode::Once, 60, &[(Ev::Page(None), (vec![commit(None)], None))]);
        assert_eq!(rig.watermark, T0 - 60, "the overlap ends at the watermark");
        assert!(rig.p.all_done() && !rig.p.gave_up());
        let mut rig = rig;
        assert_eq!(rig.p.plan(rig.now, Feed::Audit, rig.watermark, None, None), None, "once per pass");
        // A failed fetch of that window does not count as having read it: the retry reads it.
        let server = || FetchError::Server { status: 503, detail: "unavailable".into() };
        let rows = [
            (Ev::Fail(server()), (vec![err()], Some(2))),
            (Ev::Wait(2), (vec![], Some(0))),
            (Ev::Page(None), (vec![commit(None)], None)),
        ];
        let rig = check(Mode::Once, 60, &rows);
        assert!(rig.p.all_done() && !rig.p.gave_up());
        // A daemon with nothing settled waits for its next poll instead.
        let mut rig = Rig::new(Mode::Daemon, 60);
        assert_eq!(rig.p.plan(rig.now, Feed::Audit, rig.watermark, None, None), None);
    }

    #[test]
    fn a_watermark_in_the_future_is_read_again_from_the_clock_and_said() {
        // Two hours in the future (the clock went back): the window is the overlap behind now - settle, not one
        // after the watermark (none would settle for two hours) nor the overlap behind it (entirely in the future).
        for (mode, due) in [(Mode::Daemon, Some(60)), (Mode::Once, None)] {
            let mut rig = Rig::new(mode, -2 * HOUR);
            assert_eq!(rig.plan().window, Window { from: T0 - 60 - 300, to: T0 - 60 });
            let rows = [
                (Ev::Page(Some("A")), (vec![commit(Some("A"))], Some(0))),
                // Its last page: committed (the watermark moves back to its end), then `status` hears of it, after
                // the commit that clears the feed's error.
                (Ev::Page(None), (vec![commit(None), err()], due)),
            ];
            for (i, (ev, want)) in rows.into_iter().enumerate() {
                let (actions, got) = rig.step(ev);
                assert_eq!((strip_all(actions.clone()), got), want, "{mode:?} row {i}");
                if let Some(Action::RecordError(note)) = actions.get(1) {
                    let want = "the clock went back (or the queue came from a machine whose clock was ahead): this \
                                feed had been read up to 2027-01-15T10:00:00Z, 7200s ahead of the clock; it was read \
                                again from 2027-01-15T07:54:00Z and its watermark moved back to \
                                2027-01-15T07:59:00Z";
                    assert_eq!(note, want);
                }
            }
            assert_eq!(rig.watermark, T0 - 60, "{mode:?}");
            assert_eq!(rig.p.all_done(), mode == Mode::Once);
            assert!(!rig.p.gave_up());
        }

        // The window fails: read again from the clock (said once in the log), and said when it is read.
        let server = || FetchError::Server { status: 503, detail: "unavailable".into() };
        let rows = [
            (Ev::Fail(server()), (vec![err()], Some(2))),
            (Ev::Wait(2), (vec![], Some(0))),
            (Ev::Page(None), (vec![commit(None), err()], Some(60))),
            // Back to normal: the next window follows the watermark and says nothing.
            (Ev::Wait(60), (vec![], Some(0))),
            (Ev::Page(None), (vec![commit(None)], Some(60))),
        ];
        let rig = check(Mode::Daemon, -2 * HOUR, &rows);
        assert_eq!(rig.watermark, T0 + 2 + 60 - 60);
        // The window tried again keeps its start, so what the clock ahead may have cost is read however long the
        // retries took; one that would pass `max_window_secs` starts from the clock again.
        for (wait, from) in [(2_i64, T0 - 60 - 300), (2 * HOUR, T0 + 2 * HOUR - 60 - 300)] {
            let mut rig = Rig::new(Mode::Daemon, -3 * HOUR);
            let first = rig.plan();
            rig.fail(&first, server());
            rig.step(Ev::Wait(wait.unsigned_abs()));
            assert_eq!(rig.plan().window, Window { from, to: T0 + wait - 60 }, "after {wait} s");
        }

        // 30 s in the future, and 30 s later than now - settle but not in the future (as `settle_secs` raised
        // leaves it): read from the clock all the same, without a word.
        for behind in [-30, 30] {
            for (mode, due) in [(Mode::Daemon, Some(60)), (Mode::Once, None)] {
                let rig = check(mode, behind, &[(Ev::Page(None), (vec![commit(None)], due))]);
                assert_eq!(rig.watermark, T0 - 60, "{mode:?}, {behind} s behind");
            }
        }
        // Equal to now - settle: nothing to read for a daemon; `--once` reads the overlap behind it.
        let mut rig = Rig::new(Mode::Daemon, 60);
        assert_eq!(rig.p.plan(rig.now, Feed::Audit, rig.watermark, None, None), None);
        let mut rig = Rig::new(Mode::Once, 60);
        assert_eq!(rig.plan().window, Window { from: T0 - 360, to: T0 - 60 });
    }

    #[test]
    fn once_never_plans_a_window_that_ends_after_its_start_less_settle() {
        // Wherever the watermark is, and however late in the pass: the pass's horizon bounds every window.
        for behind in [-3 * HOUR, -2 * HOUR, -61, -30, 0, 30, 59, 60, 61, 600, 5 * HOUR] {
            let mut rig = Rig::new(Mode::Once, behind);
            rig.now = rig.now.after(Duration::from_secs(3600));
            while let Some(plan) = rig.p.plan(rig.now, Feed::Audit, rig.watermark, None, None) {
                assert!(plan.window.to <= T0 - 60, "{behind} s behind: {:?}", plan.window);
                rig.watermark = plan.window.to;
                rig.p.on_fetching(Feed::Audit);
                let req = PageRequest { feed: Feed::Audit, window: plan.window, page_token: None, page_size: 100 };
                let page = Page { records: vec![], held: 0, next: None, repaired: 0, keys: None };
                rig.p.on_page(rig.now, &req, Ok(&page), None);
                rig.p.on_committed(rig.now, Feed::Audit, 0, 0);
            }
            assert!(rig.p.all_done(), "{behind} s behind");
            assert_eq!(rig.watermark, T0 - 60, "{behind} s behind");
        }
    }

    #[test]
    fn once_does_not_end_on_a_window_it_only_resumed() {
        // A window a killed daemon left half read, ending where this pass's horizon does: finished, then the
        // overlap is read in a window of the pass's own, for records indexed late behind the pages read before.
        let mut rig = Rig::new(Mode::Once, 30);
        let resumed = Window { from: T0 - 400, to: T0 - 60 };
        rig.window = Some((resumed, Some("A".into())));
        let (actions, due) = rig.step(Ev::Page(None));
        assert_eq!((actions.into_iter().map(strip).collect::<Vec<_>>(), due), (vec![commit(None)], Some(0)));
        assert_eq!(rig.watermark, T0 - 60);
        let plan = rig.p.plan(rig.now, Feed::Audit, rig.watermark, None, None).expect("the overlap");
        assert_eq!((plan.window, plan.page_token), (Window { from: T0 - 360, to: T0 - 60 }, None));
        assert!(!rig.p.all_done());
    }

    #[test]
    fn a_window_of_its_own_does_not_re_read_before_the_keys_the_store_holds() {
        // The pass's overlap window, as planned with every key held.
        let planned =
            Rig::new(Mode::Once, 60).p.plan(Now { at: Instant::now(), unix: T0 }, Feed::Audit, T0 - 60, None, None);
        let planned = planned.expect("the overlap").window;
        assert_eq!(planned, Window { from: T0 - 360, to: T0 - 60 });
        // The overlap was raised past what the store kept keys for: the window starts where the keys start, and it
        // is still the pass's own, so `--once` ends on it.
        let mut rig = Rig::new(Mode::Once, 60);
        let since = planned.from + 200;
        let plan = rig.p.plan(rig.now, Feed::Audit, rig.watermark, Some(since), None).expect("the overlap");
        assert_eq!(plan.window, Window { from: since, to: planned.to });
        rig.window = Some((plan.window, None));
        rig.step(Ev::Page(None));
        assert!(rig.p.all_done(), "the clamped window is the pass's own");
        // Keys held from before the overlap: the window is planned as before.
        let mut rig = Rig::new(Mode::Once, 60);
        let plan = rig.p.plan(rig.now, Feed::Audit, rig.watermark, Some(planned.from - 1), None).expect("a window");
        assert_eq!(plan.window, planned);
    }

    #[test]
    fn server_wait_on_success_delays_the_next_page() {
        let mut rig = Rig::new(Mode::Daemon, 600);
        let plan = rig.p.plan(rig.now, Feed::Audit, rig.watermark, None, None).expect("a window");
        let req = PageRequest { feed: Feed::Audit, window: plan.window, page_token: None, page_size: 100 };
        let page = Page { records: vec![json!({})], held: 1, next: Some("A".into()), repaired: 0, keys: None };
        let actions = rig.p.on_page(rig.now, &req, Ok(&page), Some(Duration::from_secs(7)));
        // Seen keys are kept for the overlap plus an hour behind the window's end.
        let forget_before = plan.window.to - 300 - 3600;
        assert_eq!(actions, vec![Action::Commit { next_token: Some("A".into()), forget_before }]);
        rig.p.on_committed(rig.now, Feed::Audit, 1, 0);
        assert_eq!(rig.p.next_wake(rig.now), Some(rig.now.at + Duration::from_secs(7)));
    }

    #[test]
    fn reload_keeps_state_and_adds_feeds() {
        let mut rig = Rig::new(Mode::Daemon, 600);
        rig.step(Ev::Fail(FetchError::Forbidden(Feed::Audit)));
        assert_eq!(rig.p.due(rig.now), None);
        rig.p.reconfigure(settings(Mode::Daemon), &[Feed::Audit, Feed::Dlp], rig.now);
        assert_eq!(rig.p.feeds().collect::<Vec<_>>(), [Feed::Audit, Feed::Dlp]);
        assert!(rig.p.due(rig.now).is_some());
        // A page of a feed the reload removed is not kept.
        rig.p.reconfigure(settings(Mode::Daemon), &[Feed::Dlp], rig.now);
        let req =
            PageRequest { feed: Feed::Audit, window: Window { from: 0, to: 1 }, page_token: None, page_size: 100 };
        let page = Page { records: vec![], held: 0, next: None, repaired: 0, keys: None };
        assert_eq!(rig.p.on_page(rig.now, &req, Ok(&page), None), vec![]);
    }

    /// SIGHUP is no way round a wait: 100 reloads once made 636 calls into a Mimecast answering 429, each reload
    /// making every feed that had failed due at once, with its count of failures back to 0.
    #[test]
    fn a_reload_keeps_each_feeds_wait_and_count_of_failures() {
        let limited = |secs: u64| {
            FetchError::RateLimited(Some(ServerWait { wait: Duration::from_secs(secs), asked_secs: secs as f64 }))
        };
        let net = || FetchError::Server { status: 503, detail: "unavailable".into() };
        let rig = check(
            Mode::Daemon,
            600,
            &[
                // A 429 that asks for 40 s: reloads do not end the wait.
                (Ev::Fail(limited(40)), (vec![err()], Some(40))),
                (Ev::Reload(&[Feed::Audit]), (vec![], Some(40))),
                (Ev::Wait(10), (vec![], Some(30))),
                (Ev::Reload(&[Feed::Audit]), (vec![], Some(30))),
                (Ev::Wait(30), (vec![], Some(0))),
                // Nor do they forget the failures in a row: the second backs off 4 s, the third 8 s.
                (Ev::Fail(net()), (vec![err()], Some(4))),
                (Ev::Reload(&[Feed::Audit]), (vec![], Some(4))),
                (Ev::Wait(4), (vec![], Some(0))),
                (Ev::Fail(net()), (vec![err()], Some(8))),
                (Ev::Wait(8), (vec![], Some(0))),
                // A slow retry (a permission missing) is a wait like any other.
                (Ev::Fail(FetchError::Forbidden(Feed::Audit)), (vec![err()], Some(300))),
                (Ev::Reload(&[Feed::Audit]), (vec![], Some(300))),
                (Ev::Wait(300), (vec![], Some(0))),
                // After the wait, a page: the count is reset, and the next failure waits the base again.
                (Ev::Page(Some("A")), (vec![commit(Some("A"))], Some(0))),
                (Ev::Fail(net()), (vec![err()], Some(2))),
            ],
        );
        // A feed the reload adds is due at once, while the one kept goes on waiting.
        let mut rig = rig;
        rig.step(Ev::Reload(&[Feed::Audit, Feed::Dlp]));
        assert_eq!(rig.p.due(rig.now), Some(Feed::Dlp));
        let audit = rig.p.next_wake_where(rig.now, |f| f == Feed::Audit);
        assert_eq!(audit, Some(rig.now.at + Duration::from_secs(2)));
    }

    /// New credentials may mend what a slow retry waits for (credentials refused, a permission the API application
    /// lacks, a base URL that redirects), so they end it; a backoff or a rate-limit wait is about the server and
    /// stands (a new secret of the same API user shares its quota).
    #[test]
    fn new_credentials_end_a_slow_retry_and_no_other_wait() {
        let limited = FetchError::RateLimited(Some(ServerWait { wait: Duration::from_secs(40), asked_secs: 40.0 }));
        let net = FetchError::Server { status: 503, detail: "unavailable".into() };
        let refused = FetchError::Auth(AuthError::Refused { status: 401, detail: "invalid_client".into() });
        check(
            Mode::Daemon,
            600,
            &[
                (Ev::Fail(limited), (vec![err()], Some(40))),
                (Ev::NewCredentials, (vec![], Some(40))),
                (Ev::Wait(40), (vec![], Some(0))),
                (Ev::Fail(net), (vec![err()], Some(4))),
                (Ev::NewCredentials, (vec![], Some(4))),
                (Ev::Wait(4), (vec![], Some(0))),
                (Ev::Fail(FetchError::Forbidden(Feed::Audit)), (vec![err()], Some(300))),
                (Ev::Reload(&[Feed::Audit]), (vec![], Some(300))),
                (Ev::NewCredentials, (vec![], Some(0))),
                (Ev::Fail(refused), (vec![err()], Some(300))),
                (Ev::Wait(100), (vec![], Some(200))),
                (Ev::NewCredentials, (vec![], Some(0))),
                (Ev::Page(Some("A")), (vec![commit(Some("A"))], Some(0))),
            ],
        );
    }

    /// A feed disabled while its page is in flight, and enabled again before the page comes back, starts no second
    /// fetch of it: the two pages came back with the same next token, and the second was taken for a pagination
    /// cycle. A page or a failure that comes back while the feed is disabled is dropped without effect.
    #[test]
    fn a_feed_disabled_and_enabled_again_by_reloads_waits_for_its_fetch_in_flight() {
        let limited = || FetchError::RateLimited(Some(ServerWait { wait: Duration::from_secs(40), asked_secs: 40.0 }));
        check(
            Mode::Daemon,
            600,
            &[
                (Ev::Page(Some("A")), (vec![commit(Some("A"))], Some(0))),
                // Page A is in flight when one reload disables the feed (Dlp instead) and another enables it again.
                (Ev::Fetch, (vec![], None)),
                (Ev::Reload(&[Feed::Dlp]), (vec![], Some(0))),
                (Ev::Reload(&[Feed::Audit]), (vec![], None)),
                // Page A comes back: the window goes on from it, nothing is taken for a cycle.
                (Ev::Answer(Ok(Some("B"))), (vec![commit(Some("B"))], Some(0))),
                (Ev::Page(Some("C")), (vec![commit(Some("C"))], Some(0))),
                // Disabled while a fetch is in flight: its page comes back to nothing, and the feed enabled again
                // reads it from the cursor.
                (Ev::Fetch, (vec![], None)),
                (Ev::Reload(&[Feed::Dlp]), (vec![], Some(0))),
                (Ev::Answer(Ok(Some("D"))), (vec![], Some(0))),
                (Ev::Reload(&[Feed::Audit]), (vec![], Some(0))),
                (Ev::Page(Some("D")), (vec![commit(Some("D"))], Some(0))),
                // A failure that comes back while the feed is disabled costs it nothing either.
                (Ev::Fetch, (vec![], None)),
                (Ev::Reload(&[Feed::Dlp]), (vec![], Some(0))),
                (Ev::Answer(Err(limited())), (vec![], Some(0))),
                (Ev::Reload(&[Feed::Audit]), (vec![], Some(0))),
                // Disabled and enabled again while waiting out a failure, the feed still waits: the wait is
                // Mimecast's, not the config's.
                (Ev::Fail(limited()), (vec![err()], Some(40))),
                (Ev::Reload(&[Feed::Dlp]), (vec![], Some(0))),
                (Ev::Reload(&[Feed::Audit]), (vec![], Some(40))),
                (Ev::Wait(40), (vec![], Some(0))),
                (Ev::Page(None), (vec![commit(None)], Some(60))),
            ],
        );
    }

    /// However it came about, a page that comes back for a place in the window the feed no longer reads (page A
    /// again, once A and B are committed) is not compared with the window's pages as if it were the next one, which
    /// would take its next token for a cycle: the loop drops it as one that does not follow the cursor.
    #[test]
    fn a_page_the_feed_no_longer_reads_is_no_pagination_failure() {
        let mut rig = check(
            Mode::Daemon,
            600,
            &[
                (Ev::Page(Some("A")), (vec![commit(Some("A"))], Some(0))),
                (Ev::Page(Some("B")), (vec![commit(Some("B"))], Some(0))),
            ],
        );
        let (window, _) = rig.window.clone().expect("a window in progress");
        let stale = PageRequest { feed: Feed::Audit, window, page_token: Some("A".into()), page_size: 100 };
        assert_eq!(strip_all(rig.answer(&stale, Some("B".into()), 1, true)), vec![commit(Some("B"))]);
        assert_eq!(rig.p.refused().count(), 0);
        assert_eq!(strip_all(rig.step(Ev::Page(Some("C"))).0), vec![commit(Some("C"))], "the feed goes on at once");
    }

    #[test]
    fn stop_all_ends_the_pass_once() {
        let mut rig = Rig::new(Mode::Once, 600);
        assert!(rig.p.stop_all());
        assert!(rig.p.all_done() && rig.p.gave_up());
        assert!(!rig.p.stop_all(), "already stopped");
        assert_eq!(rig.p.next_wake(rig.now), None);
    }

    #[test]
    fn each_feed_has_one_fetch_in_flight_and_a_slow_one_holds_up_no_other() {
        let now = Now { at: Instant::now(), unix: T0 };
        let mut p = Poller::new(settings(Mode::Daemon), &[Feed::Audit, Feed::Dlp], now);
        let first = p.due(now).expect("a feed is due");
        p.on_fetching(first);
        let second = p.due(now).expect("the other feed is due too");
        assert_ne!(first, second);
        p.on_fetching(second);
        assert_eq!((p.due(now), p.fetching(), p.next_wake(now)), (None, 2, None), "one fetch per feed");
        // One answers (a 429 with a long wait): only that feed waits; the other is still in flight.
        let req = PageRequest { feed: first, window: Window { from: 0, to: 1 }, page_token: None, page_size: 100 };
        let wait = ServerWait { wait: Duration::from_secs(300), asked_secs: 1e300 };
        p.on_page(now, &req, Err(FetchError::RateLimited(Some(wait))), None);
        assert_eq!(p.fetching(), 1);
        assert_eq!(p.next_wake(now), Some(now.at + Duration::from_secs(300)));
        let req = PageRequest { feed: second, ..req };
        let page = Page { records: vec![json!({})], held: 1, next: Some("A".into()), repaired: 0, keys: None };
        p.on_page(now, &req, Ok(&page), None);
        p.on_committed(now, second, 1, 0);
        assert_eq!(p.due(now), Some(second), "the other feed goes on at once");
    }

    #[test]
    fn the_next_page_is_read_ahead_only_after_a_page_with_a_next_and_no_wait() {
        let now = Now { at: Instant::now(), unix: T0 };
        let mut p = Poller::new(settings(Mode::Daemon), &[Feed::Audit], now);
        let req = PageRequest { feed: Feed::Audit, window: Window { from: 0, to: 1 }, page_token: None, page_size: 1 };
        let page = |next: Option<&str>| Page {
            records: vec![json!({})],
            held: 1,
            next: next.map(String::from),
            repaired: 0,
            keys: None,
        };
        assert_eq!(p.read_ahead(Feed::Audit), None, "nothing waits for its commit");
        p.on_fetching(Feed::Audit);
        p.on_page(now, &req, Ok(&page(Some("A"))), None);
        let plan = p.read_ahead(Feed::Audit).expect("page A is read ahead");
        assert_eq!((plan.window, plan.page_token.as_deref()), (req.window, Some("A")));
        assert_eq!(p.read_ahead(Feed::Audit), None, "one fetch per feed in flight");
        // The commit of the page before: the feed is not due, since its next page is in flight.
        p.on_committed(now, Feed::Audit, 1, 0);
        assert_eq!((p.due(now), p.next_wake(now), p.fetching()), (None, None, 1));
        // Page A came back but its predecessor was not stored: abandoned, the feed plans from its cursor again.
        let req_a = PageRequest { page_token: Some("A".into()), ..req.clone() };
        p.on_page(now, &req_a, Ok(&page(Some("B"))), None);
        p.on_abandoned(Feed::Audit);
        assert_eq!(p.read_ahead(Feed::Audit), None, "the abandoned page's next is not read ahead");
        assert_eq!(p.due(now), Some(Feed::Audit));
        // No read-ahead after the window's last page, or when the server asked for a wait.
        p.on_fetching(Feed::Audit);
        p.on_page(now, &req_a, Ok(&page(None)), None);
        assert_eq!(p.read_ahead(Feed::Audit), None);
        p.on_committed(now, Feed::Audit, 1, 0);
        let mut p = Poller::new(settings(Mode::Daemon), &[Feed::Audit], now);
        p.on_fetching(Feed::Audit);
        p.on_page(now, &req, Ok(&page(Some("A"))), Some(Duration::from_secs(2)));
        assert_eq!(p.read_ahead(Feed::Audit), None);
    }

    #[test]
    fn a_feed_the_loop_holds_back_is_neither_due_nor_woken_for() {
        let now = Now { at: Instant::now(), unix: T0 };
        let p = Poller::new(settings(Mode::Daemon), &[Feed::Audit, Feed::Dlp], now);
        let not_audit = |f: Feed| f != Feed::Audit;
        assert_eq!(p.due_where(now, not_audit), Some(Feed::Dlp));
        assert_eq!(p.due_where(now, |_| false), None);
        assert_eq!((p.next_wake_where(now, not_audit), p.next_wake_where(now, |_| false)), (Some(now.at), None));
    }

    #[test]
    fn no_feed_is_due_while_the_clock_reads_earlier_than_the_floor() {
        const FLOOR: i64 = window::CLOCK_FLOOR;
        let recheck = CLOCK_RECHECK.as_secs();
        // (the clock, the floor) -> (a feed due, the wake in seconds, said)
        type Row = ((i64, i64), (bool, u64, bool));
        let rows: &[Row] = &[
            // A dead hardware clock at boot, and a second before the floor: held, a look at the clock every 30 s.
            ((86_400, FLOOR), (false, recheck, true)),
            ((0, FLOOR), (false, recheck, true)),
            ((i64::MIN, FLOOR), (false, recheck, true)),
            ((FLOOR - 1, FLOOR), (false, recheck, true)),
            // At the floor and after: polled as ever.
            ((FLOOR, FLOOR), (true, 0, false)),
            ((T0, FLOOR), (true, 0, false)),
            // Tests with small fake times set the floor to 0.
            ((86_400, 0), (true, 0, false)),
        ];
        for &((clock, floor), want) in rows {
            let now = Now { at: Instant::now(), unix: clock };
            let p = Poller::new(PollerSettings { clock_floor: floor, ..settings(Mode::Daemon) }, &[Feed::Audit], now);
            let wake = p.next_wake(now).map(|w| w.saturating_duration_since(now.at).as_secs());
            let got = (p.due(now).is_some(), wake.unwrap_or(u64::MAX), p.clock_unset(now).is_some());
            assert_eq!(got, want, "clock {clock}, floor {floor}");
        }

        // A daemon read up to T0 - 60; the clock is then found at 1970 (a reboot with a dead hardware clock): no
        // feed is due however long that lasts, so no window is planned by that clock. Once it is set, the feed goes on from its watermark: no catch-up from 1970. (A
        // `--once` pass does not start by such a clock: the agent exits with 75 first.)
        let mut rig = Rig::new(Mode::Daemon, 60);
        let at = rig.now.at;
        rig.p = Poller::new(settings(Mode::Daemon), &[Feed::Audit], Now { at, unix: 86_400 });
        for secs in [0, 29, 30, 3_600] {
            let now = Now { at: at + Duration::from_secs(secs), unix: 86_400 + secs as i64 };
            assert_eq!(rig.p.due(now), None, "{secs} s later");
            assert_eq!(rig.p.next_wake(now), Some(now.at + CLOCK_RECHECK), "{secs} s later");
        }
        rig.now = Now { at: at + Duration::from_secs(3_630), unix: T0 + 60 };
        assert_eq!(rig.p.clock_unset(rig.now), None);
        assert_eq!(rig.plan().window, Window { from: T0 - 60 - 300, to: T0 });
    }
}
