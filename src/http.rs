//! The only place ureq is touched: blocking HTTP with timeouts always set, and errors reduced to what callers
//! decide on. Callers run these functions through `smol::unblock` (see ARCHITECTURE.md).

use std::time::Duration;

use ureq::http::Uri;

use crate::config::HttpConfig;
use crate::error::Cause;

/// Larger bodies are refused rather than buffered: a Mimecast page of 500 records is well under a megabyte.
const MAX_BODY: u64 = 64 * 1024 * 1024;

/// The connection is made within `http.timeout_secs`, and within this at most: a host that does not answer the
/// connection at all is given up on sooner than one that is slow to answer a request.
const CONNECT_TIMEOUT_CAP: Duration = Duration::from_secs(10);

/// A complete response of any status.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// A response built by hand, for unit tests of the code that reads responses.
    #[cfg(test)]
    pub(crate) fn fake(status: u16, headers: &[(&str, &str)], body: &str) -> Response {
        Response {
            status,
            headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            body: body.as_bytes().to_vec(),
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The start of the body, for error messages: enough to diagnose, never a whole page.
    pub fn excerpt(&self) -> String {
        printable(&String::from_utf8_lossy(&self.body), 200)
    }

    /// Replaces every occurrence of our own secrets in the body and the header values, spelled as we sent them
    /// or percent-encoded (a form, a query string: hex digits in either case, `+` or `%20` for a space), so the
    /// guarantee does not depend on how ureq or the server encodes. A server may echo a request back (a 401 that
    /// quotes the form it got, a proxy that shows the headers), and whatever it says ends up in logs and
    /// `status`. Secrets shorter than 4 bytes are not searched for: they would match noise.
    pub fn scrub(mut self, secrets: &[&str]) -> Response {
        for secret in secrets.iter().filter(|s| s.len() >= 4) {
            self.body = redact(&self.body, secret.as_bytes());
            for (_, v) in &mut self.headers {
                *v = redact_text(v, secret);
            }
        }
        self
    }

    /// The `Location` header of a redirect, for error messages: without control characters, with the
    /// `user:password@` of a URL redacted, cut to 200 characters. The server chose it; what does not parse as a
    /// URL (a relative path is fine) is shown as it is.
    pub fn location(&self) -> Option<String> {
        let loc: String = self.header("Location")?.chars().filter(|c| !c.is_control()).collect();
        let loc = loc.parse::<Uri>().ok().and_then(|uri| userinfo_redacted(&loc, &uri)).unwrap_or(loc);
        Some(loc.chars().take(200).collect())
    }
}

/// An absolute `http://` or `https://` URL with a host, parsed once by ureq's `http::Uri`: the config's
/// `base_url`, `intake_url` and `proxy`. Its text has no trailing `/`, so that request paths are appended to it.
/// `Display` and `Debug` hide a `user:password@` part (a proxy URL may carry credentials); [`Url::as_str`] is the
/// whole text, for making requests.
#[derive(Clone, PartialEq, Eq)]
pub struct Url {
    text: String,
    uri: ureq::http::Uri,
}

/// Why a text is not a [`Url`].
#[derive(Debug)]
pub enum UrlError {
    Syntax(ureq::http::uri::InvalidUri),
    /// A scheme other than `http` or `https`, or none.
    Scheme,
    NoHost,
    /// Something after the host's `:` that is not a port number (`http::Uri` leaves ports to the connector).
    Port,
}

impl Url {
    pub fn parse(text: &str) -> Result<Url, UrlError> {
        let uri: ureq::http::Uri = text.parse().map_err(UrlError::Syntax)?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) {
            return Err(UrlError::Scheme);
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(UrlError::NoHost);
        }
        let host_port = uri.authority().map_or("", |a| a.as_str().rsplit('@').next().unwrap_or(""));
        let port = host_port.rsplit_once(':').filter(|(host, _)| !host.starts_with('[') || host.ends_with(']'));
        if port.is_some_and(|(_, port)| port.parse::<u16>().is_err()) {
            return Err(UrlError::Port);
        }
        // Rebuilt from the parts: the scheme in lower case, and `/` after the host only where a path follows.
        let path = match uri.path_and_query().map(|p| p.as_str()).unwrap_or("") {
            p if uri.query().is_none() => p.trim_end_matches('/'),
            p => p,
        };
        let text = format!("{}{path}", Url::origin_of(&uri));
        Ok(Url { text, uri })
    }

    /// The whole URL, credentials included: for requests, never for messages.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// `scheme://host[:port]`, with any credentials.
    pub fn origin(&self) -> String {
        Url::origin_of(&self.uri)
    }

    /// This URL's origin with `path` (which starts with `/`) instead of its own path and query.
    pub fn with_path(&self, path: &str) -> Result<Url, UrlError> {
        Url::parse(&format!("{}{path}", self.origin()))
    }

    fn origin_of(uri: &ureq::http::Uri) -> String {
        let scheme = uri.scheme_str().unwrap_or_default();
        format!("{scheme}://{}", uri.authority().map(|a| a.as_str()).unwrap_or_default())
    }
}

impl std::fmt::Display for Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.uri.authority().and_then(|a| a.as_str().rsplit_once('@')) {
            Some((_, host)) => {
                let scheme = self.uri.scheme_str().unwrap_or_default();
                write!(f, "{scheme}://[redacted]@{host}{}", &self.text[self.origin().len()..])
            }
            None => f.write_str(&self.text),
        }
    }
}

/// As `Display`: what the config shows (`check-config`) never holds a password.
impl serde::Serialize for Url {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl std::fmt::Debug for Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.to_string())
    }
}

impl std::fmt::Display for UrlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UrlError::Syntax(e) => write!(f, "{e}"),
            UrlError::Scheme => f.write_str("the scheme is not http or https"),
            UrlError::NoHost => f.write_str("no host"),
            UrlError::Port => f.write_str("the port is not a number from 0 to 65535"),
        }
    }
}

impl std::error::Error for UrlError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            UrlError::Syntax(e) => Some(e),
            UrlError::Scheme | UrlError::NoHost | UrlError::Port => None,
        }
    }
}

/// A URL with its `user:password@` part redacted, for text that is not a valid [`Url`] (an error message about it).
/// It is read with the parser ureq reads proxies with; text that does not parse as a URL with a host is shown only
/// if it has no `@` that could end a password.
pub fn without_password(url: &str) -> String {
    match url.parse::<Uri>() {
        Ok(uri) if uri.authority().is_some() => userinfo_redacted(url, &uri).unwrap_or_else(|| url.to_owned()),
        _ if url.contains('@') => "[redacted]".to_owned(),
        _ => url.to_owned(),
    }
}

/// `text` with `[redacted]` for the user info of its authority, if the URL it parses as (`uri`) has one.
fn userinfo_redacted(text: &str, uri: &Uri) -> Option<String> {
    let authority = uri.authority()?.as_str();
    // A parsed authority's user info is everything up to its last `@` (the host and port cannot hold one). The
    // authority is the first part of the text that can hold an `@` (a scheme cannot), so the first match is it.
    let (_, host_port) = authority.rsplit_once('@')?;
    Some(text.replacen(authority, &format!("[redacted]@{host_port}"), 1))
}

/// Server text made safe to print: at most `max` characters, control characters (newlines, escape sequences
/// that could redraw an operator's terminal) shown as spaces.
pub fn printable(text: &str, max: usize) -> String {
    text.chars().take(max).map(|c| if c.is_control() { ' ' } else { c }).collect()
}

/// `haystack` with every spelling of `secret` (see [`Response::scrub`]) replaced by `[redacted]`.
/// `text` with `secret` redacted as [`Response::scrub`] does it (secrets under 4 bytes are not searched for).
pub(crate) fn redact_text(text: &str, secret: &str) -> String {
    if secret.len() < 4 {
        return text.to_owned();
    }
    String::from_utf8_lossy(&redact(text.as_bytes(), secret.as_bytes())).into_owned()
}

fn redact(haystack: &[u8], secret: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(haystack.len());
    let mut i = 0;
    while i < haystack.len() {
        let rest = &haystack[i..];
        match if rest.starts_with(secret) { Some(secret.len()) } else { encoded_at(rest, secret) } {
            Some(len) => {
                out.extend_from_slice(b"[redacted]");
                i += len;
            }
            None => {
                out.push(haystack[i]);
                i += 1;
            }
        }
    }
    out
}

/// The length of `secret` percent-encoded at the start of `text`; `None` if it is not there. Encoders differ in
/// which bytes they leave as they are, so any byte may be either, except `%`, which is always encoded (that is
/// what makes the encoding unambiguous); a space may also be `+`.
fn encoded_at(text: &[u8], secret: &[u8]) -> Option<usize> {
    let mut i = 0;
    for &b in secret {
        i += match text.get(i..)? {
            [b'%', hi, lo, ..] if hex(*hi).zip(hex(*lo)).is_some_and(|(hi, lo)| hi << 4 | lo == b) => 3,
            [c, ..] if b != b'%' && (*c == b || (b == b' ' && *c == b'+')) => 1,
            _ => return None,
        };
    }
    Some(i)
}

fn hex(digit: u8) -> Option<u8> {
    char::from(digit).to_digit(16).map(|d| d as u8)
}

/// A non-negative number a server sent in a header: digits first (no sign, no `inf` or `NaN` words), any size or
/// exponent. Beyond f64's range it reads as infinity, which the caps then bound.
pub fn server_number(text: &str) -> Option<f64> {
    let text = text.trim();
    if !text.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    text.parse::<f64>().ok().filter(|v| !v.is_nan())
}

/// A wait a server asked for (`Retry-After`, `X-RateLimit-Reset`), already capped: a server's number must never
/// overflow `Instant` arithmetic or pause the agent for decades.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ServerWait {
    /// What the agent will wait: at most the cap.
    pub wait: Duration,
    /// What the server asked for, in seconds (finite, non-negative; may be astronomically large).
    pub asked_secs: f64,
}

impl ServerWait {
    /// Caps `asked_secs` (NaN and negatives count as 0) at `cap`. Never panics.
    pub fn capped(asked_secs: f64, cap: Duration) -> ServerWait {
        let asked_secs = if asked_secs.is_nan() || asked_secs < 0.0 { 0.0 } else { asked_secs };
        let cap_secs = cap.as_secs_f64();
        let wait =
            if asked_secs >= cap_secs { cap } else { Duration::try_from_secs_f64(asked_secs).unwrap_or(cap).min(cap) };
        ServerWait { wait, asked_secs }
    }

    /// The server asked for more than the cap allows.
    pub fn was_capped(&self) -> bool {
        self.asked_secs > self.wait.as_secs_f64()
    }
}

impl std::fmt::Display for ServerWait {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.was_capped() {
            let asked = if self.asked_secs < 1e6 {
                format!("{:.0}", self.asked_secs)
            } else {
                format!("{:.1e}", self.asked_secs)
            };
            write!(f, "server asked {asked} s; waiting the {} s cap", self.wait.as_secs())
        } else {
            write!(f, "{:.1}s", self.wait.as_secs_f64())
        }
    }
}

/// Why no response arrived. Every variant is worth a retry; none carries a secret. The error behind each is
/// its `source()`; the message already quotes it, as operators read only the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpError {
    Timeout(Cause),
    Connect(Cause),
    /// The connection broke mid-exchange, or the peer spoke broken HTTP or sent a truncated body.
    Transport(Cause),
    /// Bad URL, proxy or TLS settings: a configuration problem, reported as such. `what` names the setting ("" when
    /// the cause says it all); `cause` is the error it gave, if any.
    Setup {
        what: String,
        cause: Option<Cause>,
    },
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HttpError::Timeout(c) => write!(f, "timed out: {c}"),
            HttpError::Connect(c) => write!(f, "could not connect: {c}"),
            HttpError::Transport(c) => write!(f, "connection failed: {c}"),
            HttpError::Setup { what, cause: None } => write!(f, "bad HTTP settings: {what}"),
            HttpError::Setup { what, cause: Some(c) } if what.is_empty() => write!(f, "bad HTTP settings: {c}"),
            HttpError::Setup { what, cause: Some(c) } => write!(f, "bad HTTP settings: {what}: {c}"),
        }
    }
}

impl std::error::Error for HttpError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            HttpError::Timeout(c) | HttpError::Connect(c) | HttpError::Transport(c) => Some(c.get()),
            HttpError::Setup { cause, .. } => cause.as_ref().map(Cause::get),
        }
    }
}

impl HttpError {
    fn setup(what: String, cause: impl std::error::Error + Send + Sync + 'static) -> HttpError {
        HttpError::Setup { what, cause: Some(Cause::new(cause)) }
    }
}

/// A limit of [`Http::new`] that ran out, said in an operator's words: what did not happen in time, within how
/// long, and the setting that sets it. ureq says only which of its limits it was (`timeout: global`). The cause of
/// [`HttpError::Timeout`] when ureq names one of the limits the agent sets; ureq's error says nothing more, so it
/// is not kept as a source, which `error::describe` would repeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimedOut {
    /// The limit ureq named: [`ureq::Timeout::Global`] (or `PerCall`) or [`ureq::Timeout::Connect`].
    pub limit: ureq::Timeout,
    /// How long it was.
    pub after: Duration,
}

impl TimedOut {
    /// The limit `e` names, with its length in `timeouts` (the agent's), if it is one the agent sets.
    fn of(e: &ureq::Error, timeouts: &ureq::config::Timeouts) -> Option<TimedOut> {
        let ureq::Error::Timeout(limit) = e else { return None };
        let after = match limit {
            ureq::Timeout::Global => timeouts.global,
            ureq::Timeout::PerCall => timeouts.per_call.or(timeouts.global),
            ureq::Timeout::Connect => timeouts.connect,
            _ => None,
        }?;
        Some(TimedOut { limit: *limit, after })
    }
}

impl std::fmt::Display for TimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.after.as_secs_f64();
        match self.limit {
            ureq::Timeout::Connect => write!(
                f,
                "no connection within {secs} s (http.timeout_secs, at most {} s for connecting)",
                CONNECT_TIMEOUT_CAP.as_secs()
            ),
            _ => write!(f, "no complete answer within {secs} s (http.timeout_secs)"),
        }
    }
}

impl std::error::Error for TimedOut {}

/// A cloneable blocking client (ureq's Agent shares its connection pool between clones), or a simulated one: the
/// deterministic simulator answers every request itself ([`Transport`]), so that the code above this module runs
/// unchanged against simulated peers.
#[derive(Clone)]
pub struct Http {
    inner: Inner,
}

#[derive(Clone)]
enum Inner {
    Ureq(ureq::Agent),
    Simulated(std::sync::Arc<dyn Transport>),
}

/// A request as a [`Transport`] sees it. A form is sent encoded, with its Content-Type, as ureq sends it.
#[derive(Debug)]
pub struct Exchange<'a> {
    pub method: &'static str,
    pub url: &'a str,
    pub headers: &'a [(&'a str, &'a str)],
    pub body: &'a [u8],
}

/// What answers requests in place of the network: the simulator's peers. It must answer at once (the simulator
/// delivers the answer at a simulated time of its own) and may fail as the network does ([`HttpError`]).
pub trait Transport: Send + Sync {
    fn exchange(&self, request: Exchange<'_>) -> Result<Response, HttpError>;
}

impl Http {
    pub fn new(cfg: &HttpConfig) -> Result<Http, HttpError> {
        let timeout = cfg.timeout();
        let mut builder = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(timeout))
            .timeout_connect(Some(timeout.min(CONNECT_TIMEOUT_CAP)))
            .user_agent(concat!("mimecast-forwarder/", env!("CARGO_PKG_VERSION")))
            .max_redirects(0);
        if let Some(proxy) = &cfg.proxy {
            let p = ureq::Proxy::new(proxy.as_str()).map_err(|e| HttpError::setup(format!("proxy {proxy}"), e))?;
            builder = builder.proxy(Some(p));
        }
        if let Some(path) = &cfg.ca_file {
            let pem =
                std::fs::read(path).map_err(|e| HttpError::setup(format!("reading ca_file {}", path.display()), e))?;
            let certs: Vec<_> = ureq::tls::parse_pem(&pem)
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                    _ => None,
                })
                .collect();
            if certs.is_empty() {
                let what = format!("ca_file {} holds no PEM certificate", path.display());
                return Err(HttpError::Setup { what, cause: None });
            }
            let tls = ureq::tls::TlsConfig::builder().root_certs(ureq::tls::RootCerts::new_with_certs(&certs)).build();
            builder = builder.tls_config(tls);
        }
        Ok(Http { inner: Inner::Ureq(builder.build().new_agent()) })
    }

    /// A client whose every request `transport` answers: the simulator's seam.
    pub fn simulated(transport: std::sync::Arc<dyn Transport>) -> Http {
        Http { inner: Inner::Simulated(transport) }
    }

    pub fn post(&self, url: &str, headers: &[(&str, &str)], body: Vec<u8>) -> Result<Response, HttpError> {
        match &self.inner {
            Inner::Ureq(agent) => finish(agent, with_headers(agent.post(url), headers).send(&body[..])),
            Inner::Simulated(t) => t.exchange(Exchange { method: "POST", url, headers, body: &body }),
        }
    }

    /// POSTs `form` as `application/x-www-form-urlencoded` (ureq encodes it and sets the Content-Type).
    pub fn post_form(&self, url: &str, headers: &[(&str, &str)], form: &[(&str, &str)]) -> Result<Response, HttpError> {
        match &self.inner {
            Inner::Ureq(agent) => finish(agent, with_headers(agent.post(url), headers).send_form(form.iter().copied())),
            Inner::Simulated(t) => {
                let body = form_encode(form);
                let mut all = headers.to_vec();
                all.push(("Content-Type", "application/x-www-form-urlencoded"));
                t.exchange(Exchange { method: "POST", url, headers: &all, body: body.as_bytes() })
            }
        }
    }

    pub fn get(&self, url: &str, headers: &[(&str, &str)]) -> Result<Response, HttpError> {
        match &self.inner {
            Inner::Ureq(agent) => finish(agent, with_headers(agent.get(url), headers).call()),
            Inner::Simulated(t) => t.exchange(Exchange { method: "GET", url, headers, body: &[] }),
        }
    }
}

/// `application/x-www-form-urlencoded`, as ureq encodes a form: unreserved bytes as they are, a space as `+`,
/// every other byte as `%XX`.
fn form_encode(form: &[(&str, &str)]) -> String {
    let enc = |text: &str| {
        let mut out = String::new();
        for b in text.bytes() {
            match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => out.push(char::from(b)),
                b' ' => out.push('+'),
                _ => out.push_str(&format!("%{b:02X}")),
            }
        }
        out
    };
    form.iter().map(|(k, v)| format!("{}={}", enc(k), enc(v))).collect::<Vec<_>>().join("&")
}

fn with_headers<B>(mut req: ureq::RequestBuilder<B>, headers: &[(&str, &str)]) -> ureq::RequestBuilder<B> {
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req
}

/// The response read whole, or the error classified; a timeout is said with `agent`'s limits.
fn finish(
    agent: &ureq::Agent,
    result: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
) -> Result<Response, HttpError> {
    let timeouts = agent.config().timeouts();
    let mut resp = result.map_err(|e| classify(e, &timeouts))?;
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    let body = resp.body_mut().with_config().limit(MAX_BODY).read_to_vec().map_err(|e| classify(e, &timeouts))?;
    Ok(Response { status, headers, body })
}

/// What callers decide on, from ureq's error; `timeouts` are the agent's, which a timeout's message quotes.
fn classify(e: ureq::Error, timeouts: &ureq::config::Timeouts) -> HttpError {
    if let Some(t) = TimedOut::of(&e, timeouts) {
        return HttpError::Timeout(Cause::new(t));
    }
    let kind: fn(Cause) -> HttpError = match &e {
        ureq::Error::Timeout(_) => HttpError::Timeout,
        ureq::Error::HostNotFound | ureq::Error::ConnectionFailed => HttpError::Connect,
        ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => HttpError::Connect,
        ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => HttpError::Timeout,
        ureq::Error::BadUri(_) | ureq::Error::InvalidProxyUrl | ureq::Error::Http(_) => {
            return HttpError::setup(String::new(), e);
        }
        _ => HttpError::Transport,
    };
    kind(Cause::new(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echoed_secrets_are_scrubbed_and_control_characters_never_printed() {
        let r = Response {
            status: 401,
            headers: vec![("X-Echo".into(), "DD-API-KEY: s3cr3t-key".into())],
            body: b"invalid_client for client_secret=s3cr3t-key%21&x \x1b[2J\x07".to_vec(),
        }
        .scrub(&["s3cr3t-key", "ab"]);
        let all = format!("{} {:?}", r.excerpt(), r.headers);
        assert!(!all.contains("s3cr3t"), "{all}");
        assert!(r.excerpt().contains("client_secret=[redacted]"), "{}", r.excerpt());
        assert!(!r.excerpt().contains(['\x1b', '\x07']), "{:?}", r.excerpt());
        assert_eq!(printable("a\nb\u{9b}c", 10), "a b c");
    }

    #[test]
    fn a_secret_is_scrubbed_however_it_is_encoded() {
        let secret = "p@ss w0rd&=/+%é";
        let scrub = |text: &str| {
            let r = Response::fake(401, &[("X-Echo", text)], text).scrub(&[secret]);
            (String::from_utf8_lossy(&r.body).into_owned(), r.headers[0].1.clone())
        };
        for spelled in [
            "p@ss w0rd&=/+%é",
            "p%40ss+w0rd%26%3D%2F%2B%25%C3%A9",
            "p%40ss%20w0rd%26%3d%2f%2b%25%c3%a9",
            "%70%40%73%73%20%77%30%72%64%26%3D%2F%2B%25%C3%A9",
            "p@ss+w0rd&=/%2B%25%C3%a9",
        ] {
            let (body, header) = scrub(&format!("client_secret={spelled}&grant_type=x"));
            assert_eq!(body, "client_secret=[redacted]&grant_type=x", "{spelled}");
            assert_eq!(header, body, "{spelled}");
        }
        // Near misses stay as they are, and odd text never panics.
        for kept in ["p@ss w0rd&=/+%", "p@ss w0rd&=/+%%C3%A9", "p%4", "p%4Gss", "%", "p@ss", "\u{e9}", ""] {
            assert_eq!(scrub(kept).0, kept);
        }
        assert_eq!(scrub("xp@ss w0rd&=/+%éx%").0, "x[redacted]x%");
    }

    #[test]
    fn urls_are_parsed_once_and_never_show_a_password() {
        let check = |text: &str, whole: &str, shown: &str, origin: &str| {
            let u = Url::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!((u.as_str(), u.to_string().as_str(), u.origin().as_str()), (whole, shown, origin), "{text}");
            assert_eq!(format!("{u:?}"), format!("{shown:?}"));
        };
        check(
            "https://api.services.mimecast.com",
            "https://api.services.mimecast.com",
            "https://api.services.mimecast.com",
            "https://api.services.mimecast.com",
        );
        check(
            "https://api.services.mimecast.com/",
            "https://api.services.mimecast.com",
            "https://api.services.mimecast.com",
            "https://api.services.mimecast.com",
        );
        check(
            "HTTP://127.0.0.1:9/api/v2/logs/",
            "http://127.0.0.1:9/api/v2/logs",
            "http://127.0.0.1:9/api/v2/logs",
            "http://127.0.0.1:9",
        );
        check(
            "http://u:p@proxy:3128",
            "http://u:p@proxy:3128",
            "http://[redacted]@proxy:3128",
            "http://u:p@proxy:3128",
        );
        check("https://h/x/?a=b/", "https://h/x/?a=b/", "https://h/x/?a=b/", "https://h");
        check("http://[::1]:8080/p", "http://[::1]:8080/p", "http://[::1]:8080/p", "http://[::1]:8080");
        let u = Url::parse("http://127.0.0.1:9/api/v2/logs").unwrap();
        assert_eq!(u.with_path("/api/v1/validate").unwrap().as_str(), "http://127.0.0.1:9/api/v1/validate");
        for bad in [
            "",
            "https://",
            "api.services.mimecast.com",
            "/api",
            "ftp://h/x",
            "https://exa mple.com",
            " https://h",
            "https://h:port/",
            "http://h:/",
            "http://h:99999",
            "http://[::1]:x/",
            "file:///etc/passwd",
            "http://h\n",
        ] {
            assert!(Url::parse(bad).is_err(), "{bad:?} parsed");
        }
        use std::error::Error as _;
        assert!(Url::parse("https://exa mple.com").unwrap_err().source().is_some());
        assert!(matches!(Url::parse("ftp://h/x"), Err(UrlError::Scheme)), "the scheme is checked, not a prefix");
    }

    #[test]
    fn server_waits_are_capped_and_say_so() {
        let cap = Duration::from_secs(300);
        let w = ServerWait::capped(1.8e16, cap);
        assert_eq!(w.wait, cap);
        assert_eq!(w.to_string(), "server asked 1.8e16 s; waiting the 300 s cap");
        let w = ServerWait::capped(2.5, cap);
        assert_eq!((w.wait, w.was_capped(), w.to_string()), (Duration::from_millis(2500), false, "2.5s".into()));
        for odd in [f64::NAN, -1.0, f64::INFINITY, f64::MAX, 0.0] {
            assert!(ServerWait::capped(odd, cap).wait <= cap, "{odd}");
        }
        assert_eq!(ServerWait::capped(f64::INFINITY, cap).wait, cap);
        assert_eq!(server_number(" 12 "), Some(12.0));
        assert_eq!(server_number("1e400"), Some(f64::INFINITY));
        for bad in ["", "-1", "+1", "inf", "NaN", ".5", "1 2", "soon"] {
            assert_eq!(server_number(bad), None, "{bad}");
        }
    }

    #[test]
    fn errors_keep_what_caused_them_and_say_it_once() {
        use std::error::Error as _;
        let cfg = |ca_file: Option<&str>| HttpConfig {
            timeout_secs: 5,
            proxy: None,
            ca_file: ca_file.map(std::path::PathBuf::from),
        };
        let Err(e) = Http::new(&cfg(Some("/nonexistent/ca.pem"))) else { panic!("a missing ca_file") };
        let source = e.source().expect("the io error");
        assert!(source.downcast_ref::<std::io::Error>().is_some(), "{source:?}");
        assert!(e.to_string().starts_with("bad HTTP settings: reading ca_file /nonexistent/ca.pem: "), "{e}");
        assert_eq!(crate::error::describe(&e), e.to_string(), "the cause is said once");

        // Nothing listens on port 1 of the loopback address.
        let http = Http::new(&cfg(None)).unwrap();
        let e = http.get("http://127.0.0.1:1/", &[]).unwrap_err();
        assert!(matches!(e, HttpError::Connect(_)), "{e:?}");
        assert!(e.source().is_some_and(|s| s.downcast_ref::<ureq::Error>().is_some()), "{e:?}");
        assert_eq!(crate::error::describe(&e), e.to_string());
    }

    /// A timeout says which limit ran out, how long it was and the setting behind it, once: not ureq's
    /// "timeout: global".
    #[test]
    fn a_timeout_says_what_ran_out_of_time_in_words() {
        use std::error::Error as _;
        // A server that takes the connection and never answers: the whole exchange runs out of time.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/", silent.local_addr().unwrap());
        let http = Http::new(&HttpConfig { timeout_secs: 1, proxy: None, ca_file: None }).unwrap();
        let e = http.get(&url, &[]).unwrap_err();
        assert!(matches!(e, HttpError::Timeout(_)), "{e:?}");
        assert_eq!(e.to_string(), "timed out: no complete answer within 1 s (http.timeout_secs)");
        assert_eq!(crate::error::describe(&e), e.to_string(), "said once");
        assert!(e.source().is_some_and(|s| s.downcast_ref::<TimedOut>().is_some()), "{e:?}");
        drop(silent);

        // Each limit ureq names, as the agent sets them: the whole exchange within timeout_secs, the connection
        // within it too but at most 10 s. Any other is said as ureq says it.
        let said = |secs: i64, e: ureq::Error| {
            let http = Http::new(&HttpConfig { timeout_secs: secs, proxy: None, ca_file: None }).unwrap();
            let Inner::Ureq(agent) = &http.inner else { unreachable!("Http::new builds a ureq agent") };
            let e = classify(e, &agent.config().timeouts());
            assert!(matches!(e, HttpError::Timeout(_)), "{e:?}");
            assert_eq!(crate::error::describe(&e), e.to_string(), "said once");
            e.to_string()
        };
        use ureq::Timeout::{Connect, Global, PerCall, RecvBody};
        assert_eq!(
            said(30, ureq::Error::Timeout(Global)),
            "timed out: no complete answer within 30 s (http.timeout_secs)"
        );
        assert_eq!(
            said(30, ureq::Error::Timeout(PerCall)),
            "timed out: no complete answer within 30 s (http.timeout_secs)"
        );
        assert_eq!(
            said(30, ureq::Error::Timeout(Connect)),
            "timed out: no connection within 10 s (http.timeout_secs, at most 10 s for connecting)"
        );
        assert_eq!(
            said(4, ureq::Error::Timeout(Connect)),
            "timed out: no connection within 4 s (http.timeout_secs, at most 10 s for connecting)"
        );
        assert_eq!(said(30, ureq::Error::Timeout(RecvBody)), "timed out: timeout: receive body");
        // The system's own connect timeout, which ureq passes on as an I/O error.
        let os = std::io::Error::new(std::io::ErrorKind::TimedOut, "Connection timed out (os error 110)");
        assert_eq!(said(30, ureq::Error::Io(os)), "timed out: io: Connection timed out (os error 110)");
    }

    #[test]
    fn passwords_in_urls_are_redacted_whatever_the_url() {
        let check = |url: &str, want: &str| assert_eq!(without_password(url), want, "{url:?}");
        check("http://u:p@proxy:3128/x", "http://[redacted]@proxy:3128/x");
        check("http://u:p@proxy:3128", "http://[redacted]@proxy:3128");
        check("socks5://user:p%40ss@10.0.0.1:1080", "socks5://[redacted]@10.0.0.1:1080");
        check("http://user@proxy", "http://[redacted]@proxy");
        check("http://u:p@[::1]:3128/", "http://[redacted]@[::1]:3128/");
        check("u:p@proxy:3128", "[redacted]@proxy:3128");
        check("http://proxy:3128", "http://proxy:3128");
        check("http://proxy:3128/?from=a@b", "http://proxy:3128/?from=a@b");
        check("proxy.internal:3128", "proxy.internal:3128");
        // Text the parser refuses: shown unless an `@` could end a password in it.
        check("http://u:p@ss@proxy:3128", "http://[redacted]@proxy:3128");
        check("http://u:pa ss@proxy", "[redacted]");
        check("http://pro xy:3128", "http://pro xy:3128");
        check("", "");
        // Whatever the parser makes of it, a password never shows, and nothing panics.
        for odd in [
            "http://u:SECRET@",
            "http://:SECRET@/",
            "SECRET@",
            "u:SECRET@",
            "http://[::1]:SECRET@y",
            "http://u:SECRET@host:99999999",
            "http://u:SECRET@host\u{7f}",
            "é:SECRET@é",
            "http://u:SECRET@@host",
            "//u:SECRET@host/x",
            "http://u:SECRET@host#frag",
            "http://u:SECRET@host/a@b",
            "ftp://u:SECRET@host",
        ] {
            assert!(!without_password(odd).contains("SECRET"), "{odd:?}: {}", without_password(odd));
        }
    }

    #[test]
    fn location_is_cut_and_cleaned() {
        let location = |value: String| {
            Response { status: 302, headers: vec![("location".into(), value)], body: vec![] }
                .location()
                .expect("has a location")
        };
        let loc = location(format!("https://portal.example/\u{7}{}", "x".repeat(500)));
        assert!(loc.starts_with("https://portal.example/x") && loc.chars().count() == 200);
        assert_eq!(location("https://sso:t0ken@login.example/a?b=c".into()), "https://[redacted]@login.example/a?b=c");
        assert_eq!(location("/login?next=%2F".into()), "/login?next=%2F");
        assert_eq!(location("not a url @ all".into()), "not a url @ all", "the server's own words");
    }
}
