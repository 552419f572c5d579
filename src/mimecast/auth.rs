//! OAuth 2.0 client credentials: fetching and caching the bearer token.

use std::time::{Duration, Instant};

use crate::config::{MimecastConfig, Secret};
use crate::http::{Http, HttpError};

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
        now + margin < self.expires_at
    }
}

/// Why no token could be had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// 400/401/403 from the token endpoint: the client id or secret is wrong or revoked.
    Refused { status: u16, detail: String },
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
            AuthError::Transient(m) => write!(f, "POST /oauth/token failed: {m}"),
        }
    }
}

/// The client credentials of `[mimecast]`.
#[derive(Clone, Debug)]
pub struct Credentials {
    pub base_url: String,
    pub client_id: String,
    pub client_secret: Secret,
}

impl Credentials {
    pub fn of(cfg: &MimecastConfig) -> Credentials {
        Credentials {
            base_url: cfg.base_url.clone(),
            client_id: cfg.client_id.clone(),
            client_secret: cfg.client_secret.clone(),
        }
    }
}

/// Fetches a new token. Blocking: run through `smol::unblock`.
pub fn fetch_token(http: &Http, creds: &Credentials, now: Instant) -> Result<Token, AuthError> {
    let body = format!(
        "client_id={}&client_secret={}&grant_type=client_credentials",
        form_encode(&creds.client_id),
        form_encode(creds.client_secret.expose())
    );
    let url = format!("{}/oauth/token", creds.base_url);
    let resp = http
        .post(
            &url,
            &[("Content-Type", "application/x-www-form-urlencoded"), ("Accept", "application/json")],
            body.into_bytes(),
        )
        .map_err(|e: HttpError| AuthError::Transient(e.to_string()))?;
    match resp.status {
        200 => parse_token(&resp.body, now),
        400 | 401 | 403 => Err(AuthError::Refused { status: resp.status, detail: resp.excerpt() }),
        s => Err(AuthError::Transient(format!("HTTP {s}: {}", resp.excerpt()))),
    }
}

fn parse_token(body: &[u8], now: Instant) -> Result<Token, AuthError> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| AuthError::Transient(format!("malformed token response: {e}")))?;
    let access = v
        .get("access_token")
        .and_then(|t| t.as_str())
        .filter(|t| !t.is_empty())
        .ok_or_else(|| AuthError::Transient("token response has no access_token".into()))?;
    // Always read expires_in; if it is missing, assume Mimecast's documented ~30 minutes.
    let secs = v.get("expires_in").and_then(|e| e.as_u64()).unwrap_or(1799);
    Ok(Token { access: Secret::new(access.to_owned()), expires_at: now + Duration::from_secs(secs) })
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
        assert!(parse_token(b"not json", now).is_err());
        assert!(!format!("{t:?}").contains("abc"));
    }

    #[test]
    fn form_encoding() {
        assert_eq!(form_encode("a b&c=d/é"), "a+b%26c%3Dd%2F%C3%A9");
    }
}
