//! One page fetch against Mimecast, blocking: token, request, one retry on 401, and the answer classified.

use std::time::{Duration, Instant};

use super::Feed;
use super::auth::{self, AuthError, Credentials, Token};
use super::window::Window;
use super::wire::{self, Page, WireError};
use crate::http::{Http, HttpError, Response};

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
    /// 429, with the wait from `X-RateLimit-Reset` when it was readable.
    RateLimited(Option<Duration>),
    /// `fail[]` (with HTTP 200 or 4xx) or another 4xx.
    Failed {
        status: u16,
        retryable: bool,
        message: String,
    },
    /// 408 or 5xx.
    Server {
        status: u16,
        detail: String,
    },
    Network(HttpError),
    Malformed(String),
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
    pub fn retry(&self, had_page_token: bool) -> Retry {
        match self {
            FetchError::Auth(AuthError::Refused { .. }) | FetchError::Unauthorized | FetchError::Forbidden(_) => {
                Retry::Slow
            }
            FetchError::RateLimited(Some(wait)) => Retry::AtLeast(*wait),
            FetchError::Failed { retryable: false, .. } if had_page_token => Retry::RestartWindow,
            FetchError::Failed { retryable: false, .. } => Retry::Slow,
            _ => Retry::Backoff,
        }
    }
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
            FetchError::RateLimited(Some(w)) => write!(f, "HTTP 429 rate limited; reset in {:.1}s", w.as_secs_f64()),
            FetchError::RateLimited(None) => write!(f, "HTTP 429 rate limited"),
            FetchError::Failed { status, retryable, message } => write!(
                f,
                "HTTP {status} with fail[] ({}): {message}",
                if *retryable { "retryable" } else { "not retryable" }
            ),
            FetchError::Server { status, detail } => write!(f, "HTTP {status}: {detail}"),
            FetchError::Network(e) => e.fmt(f),
            FetchError::Malformed(m) => write!(f, "malformed response: {m}"),
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
pub fn fetch_page(
    http: &Http,
    creds: &Credentials,
    cached: Option<Token>,
    req: &PageRequest,
    margin: Duration,
) -> Fetched {
    let mut new_token = None;
    let mut token = match cached.filter(|t| t.fresh(Instant::now(), margin)) {
        Some(t) => t,
        None => match auth::fetch_token(http, creds, Instant::now()) {
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
        match auth::fetch_token(http, creds, Instant::now()) {
            Ok(t) => {
                token = t.clone();
                new_token = Some(t);
                resp = post(http, &url, &token, body);
            }
            Err(e) => return Fetched { result: Err(FetchError::Auth(e)), new_token, throttle: None },
        }
    }
    let (result, throttle) = match resp {
        Ok(r) => (classify(req.feed, &r), throttle(&r, now_ms())),
        Err(e) => (Err(FetchError::Network(e)), None),
    };
    Fetched { result, new_token, throttle }
}

fn post(http: &Http, url: &str, token: &Token, body: Vec<u8>) -> Result<Response, HttpError> {
    let bearer = format!("Bearer {}", token.access.expose());
    http.post(
        url,
        &[("Authorization", &bearer), ("Content-Type", "application/json"), ("Accept", "application/json")],
        body,
    )
}

/// Maps a response to a page or an error. Pure.
pub fn classify(feed: Feed, r: &Response) -> Result<Page, FetchError> {
    match r.status {
        200..=299 => wire::parse_page(feed, &r.body).map_err(|e| match e {
            WireError::Malformed(m) => FetchError::Malformed(m),
            WireError::Failed { retryable, message } => FetchError::Failed { status: r.status, retryable, message },
        }),
        401 => Err(FetchError::Unauthorized),
        403 => Err(FetchError::Forbidden(feed)),
        429 => Err(FetchError::RateLimited(r.header("X-RateLimit-Reset").and_then(|v| reset_wait(v, now_ms())))),
        408 | 500..=599 => Err(FetchError::Server { status: r.status, detail: r.excerpt() }),
        status => match wire::parse_page(feed, &r.body) {
            Err(WireError::Failed { retryable, message }) => Err(FetchError::Failed { status, retryable, message }),
            _ => Err(FetchError::Failed { status, retryable: false, message: r.excerpt() }),
        },
    }
}

/// `X-RateLimit-Reset` read both ways seen in the wild: Mimecast documents milliseconds to wait; one API 2.0
/// client reads an epoch. Above 10^12 it is epoch milliseconds, above 10^9 epoch seconds, else a delay in ms.
pub fn reset_wait(value: &str, now_ms: i64) -> Option<Duration> {
    let v: f64 = value.trim().parse().ok()?;
    if !v.is_finite() || v < 0.0 {
        return None;
    }
    let ms = if v > 1e12 {
        v - now_ms as f64
    } else if v > 1e9 {
        v * 1000.0 - now_ms as f64
    } else {
        v
    };
    Some(Duration::from_millis(ms.max(0.0) as u64))
}

/// Spend the quota gently: once less than a tenth of it is left, spread the remaining calls over the time to the
/// reset, and wait for the reset itself when the last call is used.
fn throttle(r: &Response, now_ms: i64) -> Option<Duration> {
    let remaining: u64 = r.header("X-RateLimit-Remaining")?.trim().parse().ok()?;
    let limit: u64 = r.header("X-RateLimit-Limit").and_then(|l| l.trim().parse().ok()).unwrap_or(0);
    if remaining > (limit / 10).max(1) {
        return None;
    }
    let reset = r.header("X-RateLimit-Reset").and_then(|v| reset_wait(v, now_ms))?;
    Some(if remaining <= 1 { reset } else { reset / remaining as u32 })
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(status: u16, headers: &[(&str, &str)], body: &str) -> Response {
        Response {
            status,
            headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            body: body.as_bytes().to_vec(),
        }
    }

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
    }

    #[test]
    fn statuses_map_to_errors() {
        let f = Feed::Dlp;
        assert!(classify(f, &resp(200, &[], r#"{"data":[]}"#)).is_ok());
        assert_eq!(classify(f, &resp(403, &[], "")), Err(FetchError::Forbidden(f)));
        assert_eq!(
            classify(f, &resp(429, &[("x-ratelimit-reset", "250")], "")),
            Err(FetchError::RateLimited(Some(Duration::from_millis(250))))
        );
        assert!(matches!(classify(f, &resp(503, &[], "")), Err(FetchError::Server { status: 503, .. })));
        let bad_token = r#"{"fail":[{"errors":[{"code":"err_invalid_page_token","message":"x","retryable":false}]}]}"#;
        let e = classify(f, &resp(400, &[], bad_token)).unwrap_err();
        assert_eq!(e.retry(true), Retry::RestartWindow);
        assert_eq!(e.retry(false), Retry::Slow);
        let fail_200 = r#"{"data":[],"fail":[{"errors":[{"code":"x","message":"y","retryable":true}]}]}"#;
        assert_eq!(classify(f, &resp(200, &[], fail_200)).unwrap_err().retry(false), Retry::Backoff);
        assert_eq!(FetchError::Forbidden(f).retry(false), Retry::Slow);
        assert!(FetchError::Forbidden(f).to_string().contains("Data Leak Prevention"));
    }

    #[test]
    fn throttles_when_quota_runs_out() {
        let r = resp(200, &[("X-RateLimit-Remaining", "1"), ("X-RateLimit-Reset", "700")], "");
        assert_eq!(throttle(&r, 0), Some(Duration::from_millis(700)));
        let r = resp(200, &[("X-RateLimit-Remaining", "50"), ("X-RateLimit-Reset", "700")], "");
        assert_eq!(throttle(&r, 0), None);
        let quota = |remaining: &str| {
            let h =
                [("X-RateLimit-Limit", "1000"), ("X-RateLimit-Remaining", remaining), ("X-RateLimit-Reset", "60000")];
            throttle(&resp(200, &h, ""), 0)
        };
        assert_eq!(quota("500"), None);
        assert_eq!(quota("100"), Some(Duration::from_millis(600)), "the last tenth is spread to the reset");
        assert_eq!(quota("10"), Some(Duration::from_secs(6)));
        assert_eq!(quota("0"), Some(Duration::from_secs(60)));
    }
}
