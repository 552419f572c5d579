//! OAuth 2.0 client credentials: fetching and caching the bearer token.

use std::time::{Duration, Instant};

use crate::config::{MimecastConfig, Secret};
use crate::error::Cause;
use crate::http::{Http, HttpError};
use crate::mimecast::Feed;

/// Bounds on a token lifetime the server gives: at least a minute (a shorter one would refetch on every call), at
/// most a day (a longer one is a broken value, and a token is refreshed on its first 401 anyway).
pub const MIN_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Mimecast's documented ~30 minutes, assumed when `expires_in` is missing or not a number.
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(1799);

/// A bearer token and when it stops being usable.
#[derive(Clone)]
pub struct Token {
    pub access: Secret,
    pub expires_at: Instant,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token").field("access", &self.access).field("expires_at", &self.expires_at).finish()
    }
}

impl Token {
    /// Usable for a call now: not within `margin` of expiry (we refresh ahead rather than race the clock).
    pub fn fresh(&self, now: Instant, margin: Duration) -> bool {
        now.checked_add(margin).is_some_and(|t| t < self.expires_at)
    }
}

/// Why no token could be had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// 400/401/403 from the token endpoint: the client id or secret is wrong or revoked.
    Refused { status: u16, detail: String },
    /// 3xx from the token endpoint: `base_url` points at a login page or a proxy, not at the API.
    Redirect { status: u16, location: Option<String> },
    /// No answer from the token endpoint: worth a retry.
    Network(HttpError),
    /// An answer that is not JSON (a proxy's page, a cut body): worth a retry.
    NotJson(Cause),
    /// Another status, or JSON without a usable token: worth a retry.
    Transient(String),
}

impl std::fmt::Display for AuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuthError::Refused { status, detail } => write!(
                f,
                "POST /oauth/token refused the client credentials (HTTP {status}): {detail}; check client_id and the client secret"
            ),
            AuthError::Redirect { status, location } => write!(
                f,
                "POST /oauth/token answered HTTP {status}: redirected to {}; mimecast.base_url must point at the API \
                 itself (not a login page or proxy)",
                location.as_deref().unwrap_or("(no Location header)")
            ),
            AuthError::Network(e) => write!(f, "POST /oauth/token failed: {e}"),
            AuthError::NotJson(e) => write!(f, "POST /oauth/token failed: malformed token response: {e}"),
            AuthError::Transient(m) => write!(f, "POST /oauth/token failed: {m}"),
        }
    }
}

impl std::error::Error for AuthError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            AuthError::Network(e) => Some(e),
            AuthError::NotJson(e) => Some(e.get()),
            AuthError::Refused { .. } | AuthError::Redirect { .. } | AuthError::Transient(_) => None,
        }
    }
}

/// The client credentials a feed polls with: `[mimecast]`'s, or its own `[mimecast.feeds.<feed>]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    pub base_url: String,
    pub client_id: String,
    pub client_secret: Secret,
}

impl Credentials {
    pub fn of(cfg: &MimecastConfig, feed: Feed) -> Credentials {
        let (client_id, client_secret) = cfg.credentials(feed);
        Credentials {
            base_url: cfg.base_url.as_str().to_owned(),
            client_id: client_id.to_owned(),
            client_secret: client_secret.clone(),
        }
    }
}

/// The API applications the enabled feeds poll under, each with its token, and whether a fetch of its token is
/// in flight. Feeds that share credentials share one token. Pure state: the loop fetches the tokens.
#[derive(Debug, Default)]
pub struct Accounts {
    accounts: Vec<Account>,
    of: Vec<(Feed, usize)>,
}

#[derive(Debug)]
struct Account {
    creds: Credentials,
    token: Option<Token>,
    fetching: bool,
}

impl Accounts {
    pub fn of(cfg: &MimecastConfig) -> Accounts {
        let mut a = Accounts::default();
        for &feed in &cfg.feeds {
            let creds = Credentials::of(cfg, feed);
            let i = match a.accounts.iter().position(|acc| acc.creds == creds) {
                Some(i) => i,
                None => {
                    a.accounts.push(Account { creds, token: None, fetching: false });
                    a.accounts.len() - 1
                }
            };
            a.of.push((feed, i));
        }
        a
    }

    /// The same accounts for `cfg`, keeping the tokens of credentials that did not change. Says whether any
    /// feed's credentials changed: a token in flight may then belong to credentials no longer used.
    pub fn reconfigure(&mut self, cfg: &MimecastConfig) -> bool {
        let mut new = Accounts::of(cfg);
        let changed = cfg.feeds.iter().any(|&f| self.account(f).is_some_and(|a| a.creds != Credentials::of(cfg, f)));
        for acc in &mut new.accounts {
            acc.token = self.accounts.iter().find(|old| old.creds == acc.creds).and_then(|old| old.token.clone());
        }
        *self = new;
        changed
    }

    /// Each API application once, with the feeds that poll under it, in the order of the config's feeds.
    pub fn applications(&self) -> impl Iterator<Item = (&Credentials, Vec<Feed>)> {
        self.accounts
            .iter()
            .enumerate()
            .map(|(i, a)| (&a.creds, self.of.iter().filter(|&&(_, j)| j == i).map(|&(feed, _)| feed).collect()))
    }

    fn account(&self, feed: Feed) -> Option<&Account> {
        self.of.iter().find(|(f, _)| *f == feed).and_then(|&(_, i)| self.accounts.get(i))
    }

    fn account_mut(&mut self, feed: Feed) -> Option<&mut Account> {
        self.of.iter().find(|(f, _)| *f == feed).and_then(|&(_, i)| self.accounts.get_mut(i))
    }

    /// The credentials `feed` polls with (`None` for a feed not enabled).
    pub fn creds(&self, feed: Feed) -> Option<&Credentials> {
        self.account(feed).map(|a| &a.creds)
    }

    pub fn token(&self, feed: Feed) -> Option<&Token> {
        self.account(feed).and_then(|a| a.token.as_ref())
    }

    pub fn fresh(&self, feed: Feed, now: Instant, margin: Duration) -> bool {
        self.token(feed).is_some_and(|t| t.fresh(now, margin))
    }

    /// `feed` has no fresh token and one is being fetched for its credentials: it waits for that fetch.
    pub fn waiting(&self, feed: Feed, now: Instant, margin: Duration) -> bool {
        !self.fresh(feed, now, margin) && self.account(feed).is_some_and(|a| a.fetching)
    }

    /// A fetch of `feed`'s token started, or came back (with the token, if one was issued).
    pub fn on_fetching(&mut self, feed: Feed) {
        if let Some(a) = self.account_mut(feed) {
            a.fetching = true;
        }
    }

    pub fn on_fetched(&mut self, feed: Feed, token: Option<Token>) {
        if let Some(a) = self.account_mut(feed) {
            a.fetching = false;
            if token.is_some() {
                a.token = token;
            }
        }
    }

    /// A token issued while fetching a page of `feed` (its token had expired).
    pub fn renewed(&mut self, feed: Feed, token: Token) {
        if let Some(a) = self.account_mut(feed) {
            a.token = Some(token);
        }
    }
}

/// Fetches a new token. Blocking: run through `smol::unblock`.
pub fn fetch_token(http: &Http, creds: &Credentials, now: Instant) -> Result<Token, AuthError> {
    let secret = creds.client_secret.expose();
    let form =
        [("client_id", creds.client_id.as_str()), ("client_secret", secret), ("grant_type", "client_credentials")];
    let url = format!("{}/oauth/token", creds.base_url);
    // An answer that echoes the form is scrubbed of the secret in every encoding (see `Response::scrub`).
    let resp =
        http.post_form(&url, &[("Accept", "application/json")], &form).map_err(AuthError::Network)?.scrub(&[secret]);
    match resp.status {
        200 => parse_token(&resp.body, now),
        300..=399 => Err(AuthError::Redirect { status: resp.status, location: resp.location() }),
        400 | 401 | 403 => Err(AuthError::Refused { status: resp.status, detail: resp.excerpt() }),
        s => Err(AuthError::Transient(format!("HTTP {s}: {}", resp.excerpt()))),
    }
}

/// Reads a token response. `expires_in` is clamped to [`MIN_TOKEN_LIFETIME`, `MAX_TOKEN_LIFETIME`]: a number of
/// any JSON kind (negative, zero, fractional, beyond u64) or a numeric string is clamped; a missing or non-numeric
/// value means [`DEFAULT_TOKEN_LIFETIME`]. No input panics.
pub fn parse_token(body: &[u8], now: Instant) -> Result<Token, AuthError> {
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| AuthError::NotJson(Cause::new(e)))?;
    let access = v
        .get("access_token")
        .and_then(|t| t.as_str())
        .filter(|t| !t.is_empty())
        .ok_or_else(|| AuthError::Transient("token response has no access_token".into()))?;
    // It goes into an Authorization header: a token with spaces or control characters could never be sent, and
    // would be cached as fresh until it expires.
    if !access.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(AuthError::Transient("token response has an access_token that cannot be sent in a header".into()));
    }
    let lifetime = token_lifetime(v.get("expires_in"));
    // The lifetime is at most a day; an Instant that cannot hold a day more is read as "expires now".
    let expires_at = now.checked_add(lifetime).unwrap_or(now);
    Ok(Token { access: Secret::new(access.to_owned()), expires_at })
}

/// `expires_in`, clamped; see [`parse_token`].
pub fn token_lifetime(expires_in: Option<&serde_json::Value>) -> Duration {
    let secs = match expires_in {
        // With arbitrary_precision, as_f64 is None beyond f64's range; the text then reads as ±infinity.
        Some(serde_json::Value::Number(n)) => n.as_f64().or_else(|| n.to_string().parse::<f64>().ok()),
        Some(serde_json::Value::String(s)) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    match secs.filter(|s| !s.is_nan()) {
        None => DEFAULT_TOKEN_LIFETIME,
        Some(s) => {
            let clamped = s.clamp(MIN_TOKEN_LIFETIME.as_secs_f64(), MAX_TOKEN_LIFETIME.as_secs_f64());
            Duration::from_secs(clamped as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_parsing_and_freshness() {
        let now = Instant::now();
        let t = parse_token(br#"{"access_token":"abc","token_type":"Bearer","expires_in":600}"#, now).unwrap();
        assert_eq!(t.access.expose(), "abc");
        assert!(t.fresh(now, Duration::from_secs(120)));
        assert!(!t.fresh(now + Duration::from_secs(500), Duration::from_secs(120)));
        assert!(parse_token(b"{}", now).is_err());
        assert!(parse_token(b"{\"access_token\":\"a\\r\\nX-Evil: 1\"}", now).is_err());
        assert!(parse_token(b"{\"access_token\":\"a b\"}", now).is_err());
        let e = parse_token(b"not json", now).unwrap_err();
        assert!(matches!(e, AuthError::NotJson(_)), "{e:?}");
        let source = std::error::Error::source(&e).expect("the JSON error");
        assert!(source.downcast_ref::<serde_json::Error>().is_some(), "{source:?}");
        assert!(e.to_string().starts_with("POST /oauth/token failed: malformed token response: "), "{e}");
        assert!(!format!("{t:?}").contains("abc"));
    }

    #[test]
    fn token_lifetimes_are_clamped() {
        let check = |expires_in: &str, want: u64| {
            let body = format!(r#"{{"access_token":"abc","expires_in":{expires_in}}}"#);
            let now = Instant::now();
            let t = parse_token(body.as_bytes(), now).expect(expires_in);
            assert_eq!(t.expires_at - now, Duration::from_secs(want), "{expires_in}");
        };
        check("1799", 1799);
        check("18446744073709551615", 86400);
        check("1e300", 86400);
        check("1e400", 86400);
        check("-1e400", 60);
        check("99999999999999999999999999", 86400);
        check("-5", 60);
        check("0", 60);
        check("1799.9", 1799);
        check(r#""3600""#, 3600);
        check(r#""soon""#, 1799);
        check("null", 1799);
        check("[1]", 1799);
        let now = Instant::now();
        let t = parse_token(br#"{"access_token":"abc"}"#, now).expect("no expires_in");
        assert!(t.fresh(now, Duration::from_secs(1700)));
        assert!(!t.fresh(now + Duration::from_secs(1700), Duration::from_secs(100)));
        // Margins no Instant can hold never panic; they just say "not fresh".
        assert!(!t.fresh(now, Duration::MAX));
    }

    /// A token endpoint that refuses with the form it got quoted back, and grants a token only for the form it
    /// expects, byte for byte.
    fn echoing_token_endpoint(expected_form: &'static str) -> crate::sim::http::Server {
        use crate::sim::http::Reply;
        crate::sim::http::Server::start(move |req| {
            let form = String::from_utf8_lossy(&req.body).into_owned();
            let form_type = req.header("Content-Type") == Some("application/x-www-form-urlencoded");
            if req.path == "/oauth/token" && form_type && form == expected_form {
                return Reply::json(200, &serde_json::json!({"access_token": "tok", "expires_in": 600}));
            }
            let body = format!("invalid_client: you sent {form} with {:?}", req.headers);
            Reply::Respond { status: 401, headers: vec![("X-Echo".into(), form)], body: body.into_bytes() }
        })
        .expect("a loopback server")
    }

    #[test]
    fn the_client_secret_is_form_encoded_and_never_shown() {
        let secret = "s3cr3t p@ss&=/+%é";
        let encoded = "s3cr3t+p%40ss%26%3D%2F%2B%25%C3%A9";
        let server = echoing_token_endpoint(
            "client_id=my+id%26co&client_secret=s3cr3t+p%40ss%26%3D%2F%2B%25%C3%A9&grant_type=client_credentials",
        );
        let http = Http::new(&crate::config::HttpConfig { timeout_secs: 5, proxy: None, ca_file: None }).unwrap();
        let creds = |client_secret: &str| Credentials {
            base_url: server.url(),
            client_id: "my id&co".into(),
            client_secret: Secret::new(client_secret.into()),
        };
        let now = Instant::now();
        let t = fetch_token(&http, &creds(secret), now).expect("the form is what the endpoint expects");
        assert_eq!(t.access.expose(), "tok");

        // Refused: the endpoint quotes the whole form, in its body and a header.
        let wrong = "wr0ng p@ss&=/+%é";
        let e = fetch_token(&http, &creds(wrong), now).unwrap_err();
        assert!(matches!(e, AuthError::Refused { status: 401, .. }), "{e:?}");
        let shown = format!("{e} {e:?} {}", crate::error::describe(&e));
        assert!(shown.contains("client_secret=[redacted]&grant_type"), "{shown}");
        for leak in [wrong, "wr0ng+p%40ss%26%3D%2F%2B%25%C3%A9", "wr0ng", secret, encoded] {
            assert!(!shown.contains(leak), "{leak} in {shown}");
        }
    }

    #[test]
    fn feeds_share_an_applications_token_and_a_reload_keeps_the_unchanged_ones() {
        let cfg = |url_secret: &str| {
            let text = format!(
                "[mimecast]\nclient_id = \"main\"\nclient_secret = \"s\"\n\
                 [mimecast.feeds.ttp-url]\nclient_id = \"url\"\nclient_secret = {url_secret:?}\n\
                 [datadog]\napi_key = \"k\"\n"
            );
            crate::config::from_str(&text, &|_| None).unwrap().mimecast
        };
        let (now, margin) = (Instant::now(), Duration::from_secs(120));
        let token =
            |access: &str| Token { access: Secret::new(access.into()), expires_at: now + Duration::from_secs(600) };
        let mut a = Accounts::of(&cfg("u1"));
        assert_eq!(a.creds(Feed::TtpUrl).unwrap().client_id, "url");
        assert_eq!(a.creds(Feed::Audit).unwrap().client_id, "main");
        let apps: Vec<(&str, Vec<Feed>)> = a.applications().map(|(c, f)| (c.client_id.as_str(), f)).collect();
        let main = Feed::ALL.into_iter().filter(|&f| f != Feed::TtpUrl).collect();
        assert_eq!(apps, [("main", main), ("url", vec![Feed::TtpUrl])]);
        // A token fetch for the main application: its feeds wait for it; the URL feed does not.
        a.on_fetching(Feed::Audit);
        assert!(a.waiting(Feed::Dlp, now, margin) && !a.waiting(Feed::TtpUrl, now, margin));
        a.on_fetched(Feed::Audit, Some(token("m")));
        assert!(a.fresh(Feed::Dlp, now, margin) && !a.waiting(Feed::Dlp, now, margin));
        a.renewed(Feed::TtpUrl, token("u"));
        // A failed fetch ends the wait without a token.
        a.on_fetching(Feed::TtpUrl);
        a.on_fetched(Feed::TtpUrl, None);
        assert_eq!(a.token(Feed::TtpUrl).unwrap().access.expose(), "u");
        // A reload that changes nothing keeps both tokens; one that changes the URL application drops its token only.
        assert!(!a.reconfigure(&cfg("u1")));
        assert!(a.fresh(Feed::TtpUrl, now, margin) && a.fresh(Feed::Audit, now, margin));
        assert!(a.reconfigure(&cfg("u2")));
        assert!(!a.fresh(Feed::TtpUrl, now, margin) && a.fresh(Feed::Audit, now, margin));
    }
}
