//! OAuth 2.0 client credentials: fetching and caching the bearer token.

use std::time::{Duration, Instant};

use crate::config::{MimecastConfig, Secret};
use crate::http::{Http, HttpError};

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
    /// Another status, a malformed answer or no answer: worth a retry.
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
            AuthError::Transient(m) => write!(f, "POST /oauth/token failed: {m}"),
        }
    }
}

/// The client credentials of `[mimecast]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    pub base_url: String,
    pub client_id: String,
    pub client_secret: Secret,
}

impl Credentials {
    pub fn of(cfg: &MimecastConfig) -> Credentials {
        Credentials {
            base_url: cfg.base_url.as_str().to_owned(),
            client_id: cfg.client_id.clone(),
            client_secret: cfg.client_secret.clone(),
        }
    }
}

/// Fetches a new token. Blocking: run through `smol::unblock`.
pub fn fetch_token(http: &Http, creds: &Credentials, now: Instant) -> Result<Token, AuthError> {
    let secret = creds.client_secret.expose();
    let encoded = form_encode(secret);
    let body =
        format!("client_id={}&client_secret={encoded}&grant_type=client_credentials", form_encode(&creds.client_id));
    let url = format!("{}/oauth/token", creds.base_url);
    let resp = http
        .post(
            &url,
            &[("Content-Type", "application/x-www-form-urlencoded"), ("Accept", "application/json")],
            body.into_bytes(),
        )
        .map_err(|e: HttpError| AuthError::Transient(e.to_string()))?
        .scrub(&[secret, &encoded]);
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
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| AuthError::Transient(format!("malformed token response: {e}")))?;
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

/// `application/x-www-form-urlencoded` for one value.
fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => out.push(b as char),
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
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
        assert!(parse_token(b"not json", now).is_err());
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
        let t = parse_token(br#"{"access_token":"abc"}"#, Instant::now()).expect("no expires_in");
        assert!(t.fresh(Instant::now(), Duration::from_secs(1700)));
        // Margins no Instant can hold never panic; they just say "not fresh".
        assert!(!t.fresh(Instant::now(), Duration::MAX));
    }

    #[test]
    fn form_encoding() {
        assert_eq!(form_encode("a b&c=d/é"), "a+b%26c%3Dd%2F%C3%A9");
    }
}
