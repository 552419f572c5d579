//! Sending one payload to the intake, blocking: gzip, headers, and the answer reduced to a [`Answer`].

use std::io::Write;

use flate2::Compression;
use flate2::write::GzEncoder;

use super::disposition::{self, Answer};
use crate::config::Secret;
use crate::http::Http;

/// The answer, with a short description for logs and `status`.
#[derive(Debug, Clone)]
pub struct Sent {
    pub answer: Answer,
    pub detail: String,
}

/// Gzips and posts a JSON array payload. Blocking: run through `smol::unblock`.
pub fn send(http: &Http, url: &str, api_key: &Secret, payload: &[u8]) -> Sent {
    let body = match gzip(payload) {
        Ok(b) => b,
        Err(e) => return Sent { answer: Answer::NoAnswer, detail: format!("gzip failed: {e}") },
    };
    let headers =
        [("DD-API-KEY", api_key.expose()), ("Content-Type", "application/json"), ("Content-Encoding", "gzip")];
    match http.post(url, &headers, body) {
        Ok(r) => Sent {
            answer: Answer::Status { code: r.status, retry_after: disposition::retry_after(r.header("Retry-After")) },
            detail: format!("HTTP {}: {}", r.status, r.excerpt()),
        },
        Err(e) => Sent { answer: Answer::NoAnswer, detail: e.to_string() },
    }
}

/// Checks the API key with `GET /api/v1/validate`, for `check-config --connect`.
pub fn validate_key(http: &Http, url: &str, api_key: &Secret) -> Result<(), String> {
    match http.get(url, &[("DD-API-KEY", api_key.expose()), ("Accept", "application/json")]) {
        Ok(r) if r.status == 200 => Ok(()),
        Ok(r) => Err(format!("GET {url} answered HTTP {}: {}", r.status, r.excerpt())),
        Err(e) => Err(format!("GET {url}: {e}")),
    }
}

fn gzip(payload: &[u8]) -> std::io::Result<Vec<u8>> {
    // Level 3: most of the ratio of the default at about half the CPU, which matters on small appliances.
    let mut enc = GzEncoder::new(Vec::with_capacity(payload.len() / 4), Compression::new(3));
    enc.write_all(payload)?;
    enc.finish()
}
