//! Sending one payload to the intake, blocking: gzip, headers, and the answer reduced to a [`Answer`].

use std::io::Write;

use flate2::Compression;
use flate2::write::GzEncoder;

use super::disposition::{self, Answer};
use crate::config::Secret;
use crate::http::{Http, HttpError, Response};

/// The answer, with a short description for logs and `status`.
#[derive(Debug, Clone)]
pub struct Sent {
    pub answer: Answer,
    pub detail: String,
}

/// Gzips and posts a JSON array payload. Blocking: run through `smol::unblock`. The payload is dropped once it is
/// gzipped, so a send waiting on the intake holds its compressed bytes only (a few hundred KB, not megabytes).
pub fn send(http: &Http, url: &str, api_key: &Secret, payload: Vec<u8>) -> Sent {
    let body = gzip(&payload);
    drop(payload);
    let body = match body {
        Ok(b) => b,
        Err(e) => return Sent { answer: Answer::NoAnswer, detail: format!("gzip failed: {e}") },
    };
    let headers =
        [("DD-API-KEY", api_key.expose()), ("Content-Type", "application/json"), ("Content-Encoding", "gzip")];
    match http.post(url, &headers, body) {
        Ok(r) => answer(&r.scrub(&[api_key.expose()])),
        Err(e) => Sent { answer: Answer::NoAnswer, detail: e.to_string() },
    }
}

/// Reads an intake response. Pure. Everything in it is checked: a 2xx counts only as Datadog's 202 with a JSON
/// object body, a `Retry-After` is capped, and a redirect says where to.
pub fn answer(r: &Response) -> Sent {
    if (200..=299).contains(&r.status) && !is_datadog_ack(r) {
        let kind = r.header("Content-Type").map(|c| c.chars().filter(|c| !c.is_control()).take(60).collect());
        return Sent {
            answer: Answer::NotDatadog { code: r.status },
            detail: format!(
                "HTTP {} that is not Datadog's answer ({}: {}): a captive portal or TLS-inspecting proxy?; the batch \
                 stays queued",
                r.status,
                kind.unwrap_or_else(|| "no Content-Type".to_owned()),
                r.excerpt()
            ),
        };
    }
    let wait = disposition::retry_after_asked(r.header("Retry-After"));
    let mut detail = match (r.status, r.location()) {
        (300..=399, Some(loc)) => format!("HTTP {}: redirected to {loc}", r.status),
        (300..=399, None) => format!("HTTP {}: redirected (no Location header)", r.status),
        _ => format!("HTTP {}: {}", r.status, r.excerpt()),
    };
    if let Some(w) = wait.filter(|w| w.was_capped()) {
        detail.push_str(&format!("; Retry-After: {w}"));
    }
    Sent { answer: Answer::Status { code: r.status, retry_after: wait.map(|w| w.wait) }, detail }
}

/// Datadog accepts with 202 and a JSON object (`{}`); anything else in a 2xx came from something in between.
pub(crate) fn is_datadog_ack(r: &Response) -> bool {
    r.status == 202 && serde_json::from_slice::<serde_json::Value>(&r.body).is_ok_and(|v| v.is_object())
}

/// Why `GET /api/v1/validate` did not confirm the API key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    /// HTTP 200 without Datadog's `{"valid": true}`: a captive portal or a proxy answered.
    NotDatadog { url: String, excerpt: String },
    /// Another status: 403 for a wrong key, 404 for a wrong site.
    Refused { url: String, status: u16, excerpt: String },
    /// No answer.
    Network { url: String, error: HttpError },
}

impl std::fmt::Display for KeyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyError::NotDatadog { url, excerpt } => {
                write!(f, "GET {url} answered HTTP 200 that is not Datadog's: {excerpt}")
            }
            KeyError::Refused { url, status, excerpt } => write!(f, "GET {url} answered HTTP {status}: {excerpt}"),
            KeyError::Network { url, error } => write!(f, "GET {url}: {error}"),
        }
    }
}

impl std::error::Error for KeyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            KeyError::Network { error, .. } => Some(error),
            KeyError::NotDatadog { .. } | KeyError::Refused { .. } => None,
        }
    }
}

/// Checks the API key with `GET /api/v1/validate`, for `check-config --connect`.
pub fn validate_key(http: &Http, url: &str, api_key: &Secret) -> Result<(), KeyError> {
    let url = url.to_owned();
    match http
        .get(&url, &[("DD-API-KEY", api_key.expose()), ("Accept", "application/json")])
        .map(|r| r.scrub(&[api_key.expose()]))
    {
        // A captive portal answers 200 too: only Datadog's `{"valid": true}` counts.
        Ok(r) if r.status == 200 && is_valid(&r.body) => Ok(()),
        Ok(r) if r.status == 200 => Err(KeyError::NotDatadog { url, excerpt: r.excerpt() }),
        Ok(r) => Err(KeyError::Refused { url, status: r.status, excerpt: r.excerpt() }),
        Err(error) => Err(KeyError::Network { url, error }),
    }
}

fn is_valid(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .is_ok_and(|v| v.get("valid") == Some(&serde_json::Value::Bool(true)))
}

fn gzip(payload: &[u8]) -> std::io::Result<Vec<u8>> {
    // Level 3 (zlib-rs), measured by examples/record_path on real fixture records / generated 1.1 KB records:
    // ratio 6.9 / 54 at 4.0 / 0.63 ms of CPU per MB of JSON. Level 1 gives 5.2 / 28 at 1.7 / 0.40 ms, level 6
    // 7.4 / 61 at 6.8 / 2.0 ms; miniz_oxide's level 3 gave 7.2 / 59 at 11 / 3.3 ms.
    let mut enc = GzEncoder::new(Vec::with_capacity(payload.len() / 4), Compression::new(3));
    enc.write_all(payload)?;
    enc.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datadog::disposition::{Disposition, disposition};

    #[test]
    fn only_datadogs_202_deletes() {
        let check = |r: Response, want: Disposition, detail: &str| {
            let sent = answer(&r);
            assert_eq!(disposition(sent.answer, 10), want, "{r:?}");
            assert!(sent.detail.contains(detail), "{}", sent.detail);
        };
        check(Response::fake(202, &[("Content-Type", "application/json")], "{}"), Disposition::Delete, "HTTP 202");
        let portal = "<html><body>Please log in</body></html>";
        check(
            Response::fake(200, &[("Content-Type", "text/html")], portal),
            Disposition::Retry(None),
            "HTTP 200 that is not Datadog's answer (text/html: <html><body>Please log in",
        );
        check(Response::fake(202, &[], portal), Disposition::Retry(None), "(no Content-Type: <html>");
        check(Response::fake(204, &[], ""), Disposition::Retry(None), "captive portal or TLS-inspecting proxy?");
        check(Response::fake(200, &[], "{}"), Disposition::Retry(None), "the batch stays queued");
        check(Response::fake(202, &[], "[]"), Disposition::Retry(None), "not Datadog's answer");
        check(
            Response::fake(302, &[("Location", "https://portal.example/")], ""),
            Disposition::Hold,
            "redirected to https://portal.example/",
        );
        check(
            Response::fake(429, &[("Retry-After", "18446744073709551615")], ""),
            Disposition::Retry(Some(disposition::MAX_SERVER_WAIT)),
            "Retry-After: server asked 1.8e19 s; waiting the 120 s cap",
        );
        check(
            Response::fake(503, &[("Retry-After", "3")], ""),
            Disposition::Retry(Some(std::time::Duration::from_secs(3))),
            "HTTP 503",
        );
    }

    #[test]
    fn validation_needs_datadogs_answer() {
        assert!(is_valid(br#"{"valid":true}"#));
        assert!(!is_valid(br#"{"valid":false}"#));
        assert!(!is_valid(b"<html>"));
    }

    #[test]
    fn a_key_check_says_what_answered_and_never_the_key() {
        use std::error::Error as _;

        use crate::sim::http::{Reply, Server};
        let key = Secret::new("0123456789abcdef-key".into());
        let http = Http::new(&crate::config::HttpConfig { timeout_secs: 5, proxy: None, ca_file: None }).unwrap();
        let check = |status: u16, body: &'static str| {
            let server = Server::start(move |req| {
                // "echo" shows the request's headers in the answer, as some proxies do.
                let body = if body == "echo" { format!("you sent {:?}", req.headers) } else { body.to_owned() };
                Reply::Respond { status, headers: vec![], body: body.into_bytes() }
            })
            .unwrap();
            validate_key(&http, &format!("{}/api/v1/validate", server.url()), &key)
        };
        assert_eq!(check(200, r#"{"valid":true}"#), Ok(()));
        let e = check(200, "<html>log in</html>").unwrap_err();
        assert!(matches!(&e, KeyError::NotDatadog { excerpt, .. } if excerpt.contains("log in")), "{e}");
        let e = check(403, "echo").unwrap_err();
        assert!(matches!(e, KeyError::Refused { status: 403, .. }), "{e}");
        let shown = e.to_string();
        assert!(shown.contains("[redacted]") && !shown.contains(key.expose()), "{shown}");
        let e = validate_key(&http, "http://127.0.0.1:1/api/v1/validate", &key).unwrap_err();
        assert!(matches!(e, KeyError::Network { .. }), "{e}");
        assert!(e.source().is_some_and(|s| s.downcast_ref::<HttpError>().is_some()), "{e:?}");
    }
}
