//! One page fetch against Mimecast, blocking: token, request, one retry on 401, and the answer classified.

use std::time::{Duration, Instant};

use super::Feed;
use super::auth::{self, AuthError, Credentials, Token};
use super::window::Window;
use super::wire::{self, Page, WireError};
use crate::error::Cause;
use crate::http::{Http, HttpError, Response, ServerWait};

/// The longest the agent waits because Mimecast said so (`X-RateLimit-Reset`): the Mimecast backoff cap. A larger
/// value is a broken or hostile header, not a plan; it is capped and the cap is said in the error.
pub const MAX_SERVER_WAIT: Duration = Duration::from_secs(300);

/// What to fetch: one page of one feed's window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRequest {
    pub feed: Feed,
    pub window: Window,
    pub page_token: Option<String>,
    pub page_size: u32,
}

/// Why a page fetch failed. The caller decides what to do through [`FetchError::retry`].
#[derive(Debug, Clone, PartialEq)]
pub enum FetchError {
    Auth(AuthError),
    /// A freshly fetched token was refused with 401 as well.
    Unauthorized,
    /// 403: the API application lacks this feed's permission.
    Forbidden(Feed),
    /// 429, with the wait from `X-RateLimit-Reset` (capped at [`MAX_SERVER_WAIT`]) when it was readable.
    RateLimited(Option<ServerWait>),
    /// `fail[]` (with HTTP 200 or 4xx) or another 4xx. `code` holds the `fail[]` error codes ("" without `fail[]`).
    Failed {
        status: u16,
        retryable: bool,
        code: String,
        message: String,
    },
    /// 3xx: `base_url` points at something that redirects (a login page, a proxy), not at the API.
    Redirect {
        status: u16,
        location: Option<String>,
    },
    /// 408 or 5xx.
    Server {
        status: u16,
        detail: String,
    },
    Network(HttpError),
    Malformed(String),
    /// Well-formed pages that would never end the window: a page token handed out again, the same records again
    /// under a new token, more pages than any window needs. Said as the poller words it.
    Pagination(String),
    /// A 2xx whose body is not JSON at all: the parser's error.
    NotJson(Cause),
}

impl FetchError {
    /// The error with `secret` redacted from every text the server chose (`fail[]` codes and messages, an excerpt,
    /// a location): a page's body is parsed unscrubbed, so what an error quotes of it is scrubbed here.
    fn scrubbed(self, secret: &str) -> FetchError {
        let clean = |text: String| crate::http::redact_text(&text, secret);
        match self {
            FetchError::Failed { status, retryable, code, message } => {
                FetchError::Failed { status, retryable, code: clean(code), message: clean(message) }
            }
            FetchError::Server { status, detail } => FetchError::Server { status, detail: clean(detail) },
            FetchError::Redirect { status, location } => FetchError::Redirect { status, location: location.map(clean) },
            FetchError::Malformed(m) => FetchError::Malformed(clean(m)),
            FetchError::Pagination(m) => FetchError::Pagination(clean(m)),
            other => other,
        }
    }
}

/// How the poller should retry a failed fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Exponential backoff with jitter.
    Backoff,
    /// An operator must act (credentials, permissions): retry slowly, never spin.
    Slow,
    /// Not before this long (rate limit), and at least the backoff.
    AtLeast(Duration),
    /// The page token was refused: read the window again from its first page (duplicates are skipped).
    RestartWindow,
}

impl FetchError {
    /// How to retry. Only a refusal of the page token itself restarts the window (when one was sent): any other
    /// non-retryable failure needs an operator, and re-reading the window would not help.
    pub fn retry(&self, had_page_token: bool) -> Retry {
        match self {
            FetchError::Auth(AuthError::Refused { .. } | AuthError::Redirect { .. })
            | FetchError::Unauthorized
            | FetchError::Forbidden(_)
            | FetchError::Redirect { .. } => Retry::Slow,
            FetchError::RateLimited(Some(w)) => Retry::AtLeast(w.wait),
            FetchError::Failed { retryable: false, code, message, .. }
                if had_page_token && about_page_token(code, message) =>
            {
                Retry::RestartWindow
            }
            FetchError::Failed { retryable: false, .. } => Retry::Slow,
            _ => Retry::Backoff,
        }
    }
}

/// Whether a failure is about the page token. Mimecast's code vocabulary is unconfirmed, so the code and the
/// message are both read: `err_invalid_page_token`, "pageToken", or "page" and "token" together.
fn about_page_token(code: &str, message: &str) -> bool {
    let text = format!("{code} {message}").to_ascii_lowercase();
    text.contains("page") && text.contains("token")
}

impl std::fmt::Display for FetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FetchError::Auth(e) => e.fmt(f),
            FetchError::Unauthorized => write!(f, "HTTP 401 even with a fresh token"),
            FetchError::Forbidden(feed) => write!(
                f,
                "HTTP 403: the API application lacks the permission \"{}\" needed for the {feed} feed",
                feed.spec().permission
            ),
            FetchError::RateLimited(Some(w)) if w.was_capped() => write!(f, "HTTP 429 rate limited; reset: {w}"),
            FetchError::RateLimited(Some(w)) => write!(f, "HTTP 429 rate limited; reset in {w}"),
            FetchError::RateLimited(None) => write!(f, "HTTP 429 rate limited"),
            FetchError::Failed { status, retryable, message, .. } => write!(
                f,
                "HTTP {status} with fail[] ({}): {message}",
                if *retryable { "retryable" } else { "not retryable" }
            ),
            FetchError::Redirect { status, location } => write!(
                f,
                "HTTP {status}: redirected to {}; mimecast.base_url must point at the API itself (not a login page or proxy)",
                location.as_deref().unwrap_or("(no Location header)")
            ),
            FetchError::Server { status, detail } => write!(f, "HTTP {status}: {detail}"),
            FetchError::Network(e) => e.fmt(f),
            FetchError::Malformed(m) => write!(f, "malformed response: {m}"),
            FetchError::Pagination(m) => f.write_str(m),
            FetchError::NotJson(e) => write!(f, "malformed response: {e}"),
        }
    }
}

impl std::error::Error for FetchError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            // Said in the wrapped error's own words, so its causes are ours.
            FetchError::Auth(e) => e.source(),
            FetchError::Network(e) => e.source(),
            FetchError::NotJson(e) => Some(e.get()),
            FetchError::Unauthorized
            | FetchError::Forbidden(_)
            | FetchError::RateLimited(_)
            | FetchError::Failed { .. }
            | FetchError::Redirect { .. }
            | FetchError::Server { .. }
            | FetchError::Malformed(_)
            | FetchError::Pagination(_) => None,
        }
    }
}

/// The outcome of one fetch, plus a token the fetch obtained (to be cached by the caller) and a pause the
/// rate-limit headers ask for before the next call.
#[derive(Debug)]
pub struct Fetched {
    pub result: Result<Page, FetchError>,
    pub new_token: Option<Token>,
    pub throttle: Option<Duration>,
}

/// Fetches one page. Blocking: run through `smol::unblock`.
///
/// The caller's clock is the only one: `now` decides whether the cached token is fresh and when a new one expires,
/// `unix_ms` (the wall clock, in milliseconds) is what an epoch `X-RateLimit-Reset` is measured from. Both are
/// read when the fetch starts; the exchange itself takes at most the HTTP timeout, so a token is taken to expire
/// that much early at worst, and a reset waited for that much longer.
pub fn fetch_page(
    http: &Http,
    creds: &Credentials,
    cached: Option<Token>,
    req: &PageRequest,
    margin: Duration,
    now: Instant,
    unix_ms: i64,
) -> Fetched {
    let mut new_token = None;
    let mut token = match cached.filter(|t| t.fresh(now, margin)) {
        Some(t) => t,
        None => match auth::fetch_token(http, creds, now) {
            Ok(t) => {
                new_token = Some(t.clone());
                t
            }
            Err(e) => return Fetched { result: Err(FetchError::Auth(e)), new_token, throttle: None },
        },
    };
    let url = format!("{}{}", creds.base_url, req.feed.spec().path);
    let body = wire::page_request(req.feed, req.window, req.page_size, req.page_token.as_deref());
    let mut resp = post(http, &url, &token, body.clone());
    if matches!(&resp, Ok(r) if r.status == 401) {
        // Expired or revoked: fetch a new token and retry the call once.
        match auth::fetch_token(http, creds, now) {
            Ok(t) => {
                token = t.clone();
                new_token = Some(t);
                resp = post(http, &url, &token, body);
            }
            Err(e) => return Fetched { result: Err(FetchError::Auth(e)), new_token, throttle: None },
        }
    }
    let (result, throttle) = match resp {
        Ok(r) => {
            let throttle = throttle_wait(&r, unix_ms);
            if let Some(w) = throttle.filter(ServerWait::was_capped) {
                log::warn!("{}: X-RateLimit-Reset: {w}", req.feed);
            }
            let result = classify(req.feed, &r, unix_ms).map_err(|e| e.scrubbed(token.access.expose()));
            (result, throttle.map(|w| w.wait))
        }
        Err(e) => (Err(FetchError::Network(e)), None),
    };
    Fetched { result, new_token, throttle }
}

fn post(http: &Http, url: &str, token: &Token, body: Vec<u8>) -> Result<Response, HttpError> {
    let bearer = format!("Bearer {}", token.access.expose());
    let headers =
        [("Authorization", bearer.as_str()), ("Content-Type", "application/json"), ("Accept", "application/json")];
    // A page's body is data and is parsed as Mimecast sent it: a record, or the next page token, may hold the
    // token's text by chance, and redacting it there would alter the record or lose the page. Any other answer is
    // scrubbed whole; what an error quotes of a page is scrubbed by `fetch_page`.
    http.post(url, &headers, body)
        .map(|r| if (200..=299).contains(&r.status) { r } else { r.scrub(&[token.access.expose()]) })
}

/// Maps a response to a page or an error. Pure: `unix_ms` is the wall clock in milliseconds, for an epoch
/// `X-RateLimit-Reset`.
pub fn classify(feed: Feed, r: &Response, unix_ms: i64) -> Result<Page, FetchError> {
    match r.status {
        200..=299 => wire::parse_page(feed, &r.body).map_err(|e| match e {
            WireError::Malformed(m) => FetchError::Malformed(m),
            WireError::NotJson(e) => FetchError::NotJson(e),
            WireError::Failed { retryable, code, message } => {
                FetchError::Failed { status: r.status, retryable, code, message }
            }
        }),
        300..=399 => Err(FetchError::Redirect { status: r.status, location: r.location() }),
        401 => Err(FetchError::Unauthorized),
        403 => Err(FetchError::Forbidden(feed)),
        429 => Err(FetchError::RateLimited(rate_header(r, "Reset").and_then(|v| reset_asked(v, unix_ms)))),
        408 | 500..=599 => Err(FetchError::Server { status: r.status, detail: r.excerpt() }),
        status => match wire::parse_page(feed, &r.body) {
            Err(WireError::Failed { retryable, code, message }) => {
                Err(FetchError::Failed { status, retryable, code, message })
            }
            _ => Err(FetchError::Failed { status, retryable: false, code: String::new(), message: r.excerpt() }),
        },
    }
}

/// One of the rate-limit headers, `name` being "Reset", "Remaining" or "Limit". Mimecast documents
/// `X-RateLimit-*`; whether the API 2.0 gateway spells them `X-Rate-Limit-*` is unconfirmed, so both are read.
pub fn rate_header<'a>(r: &'a Response, name: &str) -> Option<&'a str> {
    r.header(&format!("X-RateLimit-{name}")).or_else(|| r.header(&format!("X-Rate-Limit-{name}")))
}

/// `X-RateLimit-Reset` read both ways seen in the wild: Mimecast documents milliseconds to wait; one API 2.0
/// client reads an epoch. Above 10^12 it is epoch milliseconds, above 10^9 epoch seconds, else a delay in ms.
/// At most [`MAX_SERVER_WAIT`]; `None` when the value is not a non-negative number.
pub fn reset_wait(value: &str, now_ms: i64) -> Option<Duration> {
    reset_asked(value, now_ms).map(|w| w.wait)
}

/// [`reset_wait`] with what the server asked for, so a capped wait can be reported as such.
pub fn reset_asked(value: &str, now_ms: i64) -> Option<ServerWait> {
    let v = crate::http::server_number(value)?;
    let ms = if v > 1e12 {
        v - now_ms as f64
    } else if v > 1e9 {
        v * 1000.0 - now_ms as f64
    } else {
        v
    };
    Some(ServerWait::capped(ms / 1000.0, MAX_SERVER_WAIT))
}

/// Spend the quota gently: once less than a tenth of it is left, spread the remaining calls over the time to the
/// reset, and wait for the reset itself when the last call is used. At most [`MAX_SERVER_WAIT`].
pub fn throttle(r: &Response, now_ms: i64) -> Option<Duration> {
    throttle_wait(r, now_ms).map(|w| w.wait)
}

fn throttle_wait(r: &Response, now_ms: i64) -> Option<ServerWait> {
    let remaining: u64 = rate_header(r, "Remaining")?.trim().parse().ok()?;
    let limit: u64 = rate_header(r, "Limit").and_then(|l| l.trim().parse().ok()).unwrap_or(0);
    if remaining > (limit / 10).max(1) {
        return None;
    }
    let reset = rate_header(r, "Reset").and_then(|v| reset_asked(v, now_ms))?;
    if remaining <= 1 {
        return Some(reset);
    }
    // `remaining` is at least 2 here; a huge one saturates the divisor rather than wrapping to zero.
    let share = u32::try_from(remaining).unwrap_or(u32::MAX);
    Some(ServerWait { wait: reset.wait / share, asked_secs: reset.asked_secs / remaining as f64 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_is_read_both_ways() {
        let now = 1_700_000_000_000;
        let check = |v: &str, want: Option<u64>| {
            assert_eq!(reset_wait(v, now), want.map(Duration::from_millis), "{v}");
        };
        check("1500", Some(1500));
        check("0", Some(0));
        check("1700000005", Some(5000));
        check("1700000002500", Some(2500));
        check("1600000000", Some(0));
        check("soon", None);
        check("-5", None);
        // Server-given waits are capped: no overflow, no decades-long pause.
        check("18446744073709551615", Some(300_000));
        check("999999999", Some(300_000));
        check("1e300", Some(300_000));
        check("1e400", Some(300_000));
        check("inf", None);
        check("NaN", None);
        check("4102444800", Some(300_000)); // epoch seconds in 2100
        let w = reset_asked("18446744073709551615", now).expect("a number");
        assert_eq!(w.to_string(), "server asked 1.8e16 s; waiting the 300 s cap");
        let e = FetchError::RateLimited(Some(w));
        assert_eq!(e.retry(false), Retry::AtLeast(MAX_SERVER_WAIT));
        assert!(e.to_string().contains("waiting the 300 s cap"), "{e}");
    }

    #[test]
    fn an_epoch_reset_is_measured_from_the_callers_clock() {
        let r = Response::fake(429, &[("X-RateLimit-Reset", "1700000005")], "");
        let wait = |unix_ms| match classify(Feed::Audit, &r, unix_ms) {
            Err(FetchError::RateLimited(Some(w))) => w.wait,
            other => panic!("{other:?}"),
        };
        assert_eq!(wait(1_700_000_000_000), Duration::from_secs(5));
        assert_eq!(wait(1_700_000_004_000), Duration::from_secs(1));
        assert_eq!(wait(1_800_000_000_000), Duration::ZERO, "a reset in the past is no wait");
    }

    #[test]
    fn rate_headers_are_read_in_both_spellings() {
        let e = classify(Feed::Audit, &Response::fake(429, &[("X-Rate-Limit-Reset", "1500")], ""), 0).unwrap_err();
        assert_eq!(e.retry(false), Retry::AtLeast(Duration::from_millis(1500)));
        let r = Response::fake(200, &[("x-rate-limit-remaining", "0"), ("X-Rate-Limit-Reset", "700")], "");
        assert_eq!(throttle(&r, 0), Some(Duration::from_millis(700)));
        // The documented spelling wins when both come.
        let r = Response::fake(
            200,
            &[("X-Rate-Limit-Remaining", "0"), ("X-RateLimit-Reset", "5"), ("X-Rate-Limit-Reset", "9")],
            "",
        );
        assert_eq!(throttle(&r, 0), Some(Duration::from_millis(5)));
    }

    #[test]
    fn only_page_token_failures_restart_the_window() {
        let failed = |code: &str, message: &str| FetchError::Failed {
            status: 400,
            retryable: false,
            code: code.into(),
            message: message.into(),
        };
        for (code, message) in [
            ("err_invalid_page_token", "x"),
            ("err_validation", "err_invalid_page_token: the page token does not belong to this filter"),
            ("?", "Invalid pageToken"),
            ("ERR_PAGETOKEN_EXPIRED", ""),
        ] {
            assert_eq!(failed(code, message).retry(true), Retry::RestartWindow, "{code} {message}");
            assert_eq!(failed(code, message).retry(false), Retry::Slow, "{code} {message}");
        }
        for (code, message) in [("err_validation", "from must be a datetime"), ("", "<html>Bad Request</html>")] {
            assert_eq!(failed(code, message).retry(true), Retry::Slow, "{code} {message}");
        }
        let other = r#"{"fail":[{"errors":[{"code":"err_validation","message":"bad filter","retryable":false}]}]}"#;
        assert_eq!(classify(Feed::Dlp, &Response::fake(400, &[], other), 0).unwrap_err().retry(true), Retry::Slow);
    }

    #[test]
    fn redirects_name_where_to() {
        let e = classify(Feed::Audit, &Response::fake(302, &[("Location", "https://login.example/sso")], "<html>"), 0)
            .unwrap_err();
        assert_eq!(e, FetchError::Redirect { status: 302, location: Some("https://login.example/sso".into()) });
        assert_eq!(e.retry(true), Retry::Slow);
        assert_eq!(
            e.to_string(),
            "HTTP 302: redirected to https://login.example/sso; mimecast.base_url must point at the API itself \
             (not a login page or proxy)"
        );
        let e = classify(Feed::Audit, &Response::fake(307, &[], ""), 0).unwrap_err();
        assert!(e.to_string().contains("(no Location header)"), "{e}");
        let auth = FetchError::Auth(AuthError::Redirect { status: 301, location: None });
        assert_eq!(auth.retry(false), Retry::Slow);
    }

    #[test]
    fn wrapped_errors_keep_their_causes() {
        use std::error::Error as _;
        let e = classify(Feed::Audit, &Response::fake(200, &[], "<html>"), 0).unwrap_err();
        assert!(matches!(e, FetchError::NotJson(_)), "{e:?}");
        assert!(e.source().is_some_and(|s| s.downcast_ref::<serde_json::Error>().is_some()), "{e:?}");
        assert_eq!(e.retry(true), Retry::Backoff);
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = FetchError::Auth(AuthError::Network(HttpError::Connect(Cause::new(refused))));
        assert_eq!(e.to_string(), "POST /oauth/token failed: could not connect: refused");
        assert!(e.source().is_some_and(|s| s.downcast_ref::<HttpError>().is_some()), "{e:?}");
        assert_eq!(crate::error::describe(&e), e.to_string(), "each cause said once");
        assert_eq!(e.retry(false), Retry::Backoff);
        let e = FetchError::Network(HttpError::Timeout(Cause::new(std::io::Error::other("deadline"))));
        assert!(e.source().is_some_and(|s| s.downcast_ref::<std::io::Error>().is_some()), "{e:?}");
        assert_eq!(e.to_string(), "timed out: deadline");
    }

    #[test]
    fn statuses_map_to_errors() {
        let f = Feed::Dlp;
        assert!(classify(f, &Response::fake(200, &[], r#"{"meta":{},"data":[]}"#), 0).is_ok());
        assert!(matches!(classify(f, &Response::fake(200, &[], r#"{"data":[]}"#), 0), Err(FetchError::Malformed(_))));
        assert_eq!(classify(f, &Response::fake(403, &[], ""), 0), Err(FetchError::Forbidden(f)));
        assert_eq!(
            classify(f, &Response::fake(429, &[("x-ratelimit-reset", "250")], ""), 0),
            Err(FetchError::RateLimited(Some(ServerWait { wait: Duration::from_millis(250), asked_secs: 0.25 })))
        );
        assert!(matches!(classify(f, &Response::fake(503, &[], ""), 0), Err(FetchError::Server { status: 503, .. })));
        let bad_token = r#"{"fail":[{"errors":[{"code":"err_invalid_page_token","message":"x","retryable":false}]}]}"#;
        let e = classify(f, &Response::fake(400, &[], bad_token), 0).unwrap_err();
        assert_eq!(e.retry(true), Retry::RestartWindow);
        assert_eq!(e.retry(false), Retry::Slow);
        let fail_200 = r#"{"data":[],"fail":[{"errors":[{"code":"x","message":"y","retryable":true}]}]}"#;
        assert_eq!(classify(f, &Response::fake(200, &[], fail_200), 0).unwrap_err().retry(false), Retry::Backoff);
        assert_eq!(FetchError::Forbidden(f).retry(false), Retry::Slow);
        assert!(FetchError::Forbidden(f).to_string().contains("Data Leak Prevention"));
    }

    #[test]
    fn throttles_when_quota_runs_out() {
        let r = Response::fake(200, &[("X-RateLimit-Remaining", "1"), ("X-RateLimit-Reset", "700")], "");
        assert_eq!(throttle(&r, 0), Some(Duration::from_millis(700)));
        let r = Response::fake(200, &[("X-RateLimit-Remaining", "50"), ("X-RateLimit-Reset", "700")], "");
        assert_eq!(throttle(&r, 0), None);
        let quota = |remaining: &str| {
            let h =
                [("X-RateLimit-Limit", "1000"), ("X-RateLimit-Remaining", remaining), ("X-RateLimit-Reset", "60000")];
            throttle(&Response::fake(200, &h, ""), 0)
        };
        assert_eq!(quota("500"), None);
        assert_eq!(quota("100"), Some(Duration::from_millis(600)), "the last tenth is spread to the reset");
        assert_eq!(quota("10"), Some(Duration::from_secs(6)));
        assert_eq!(quota("0"), Some(Duration::from_secs(60)));
        // A limit no real quota has must not wrap the divisor to zero.
        let h = [
            ("X-RateLimit-Limit", "18446744073709551615"),
            ("X-RateLimit-Remaining", "4294967296"),
            ("X-RateLimit-Reset", "60000"),
        ];
        assert!(throttle(&Response::fake(200, &h, ""), 0).is_some_and(|w| w < Duration::from_micros(1)));
        let h = [("X-RateLimit-Remaining", "0"), ("X-RateLimit-Reset", "1e300")];
        assert_eq!(throttle(&Response::fake(200, &h, ""), 0), Some(MAX_SERVER_WAIT));
    }
}
