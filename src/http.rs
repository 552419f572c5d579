//! The only place ureq is touched: blocking HTTP with timeouts always set, and errors reduced to what callers
//! decide on. Callers run these functions through `smol::unblock` (see ARCHITECTURE.md).

use std::time::Duration;

use crate::config::HttpConfig;

/// Larger bodies are refused rather than buffered: a Mimecast page of 500 records is well under a megabyte.
const MAX_BODY: u64 = 64 * 1024 * 1024;

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

    /// Replaces every occurrence of our own secrets in the body and the header values. A server may echo a
    /// request back (a 401 that quotes the form it got, a proxy that shows the headers), and whatever it says
    /// ends up in logs and `status`. Secrets shorter than 4 bytes are not searched for: they would match noise.
    pub fn scrub(mut self, secrets: &[&str]) -> Response {
        for secret in secrets.iter().filter(|s| s.len() >= 4) {
            self.body = replace_all(&self.body, secret.as_bytes());
            for (_, v) in &mut self.headers {
                *v = v.replace(secret, "[redacted]");
            }
        }
        self
    }

    /// The `Location` header of a redirect, cut to 200 characters and without control characters: it goes into
    /// error messages and the server chose it.
    pub fn location(&self) -> Option<String> {
        let loc = self.header("Location")?;
        Some(loc.chars().filter(|c| !c.is_control()).take(200).collect())
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
pub fn without_password(url: &str) -> String {
    let start = url.find("://").map_or(0, |i| i + 3);
    let host_end = url[start..].find('/').map_or(url.len(), |i| start + i);
    match url[start..host_end].rfind('@') {
        Some(at) => format!("{}[redacted]@{}", &url[..start], &url[start + at + 1..]),
        None => url.to_owned(),
    }
}

/// Server text made safe to print: at most `max` characters, control characters (newlines, escape sequences
/// that could redraw an operator's terminal) shown as spaces.
pub fn printable(text: &str, max: usize) -> String {
    text.chars().take(max).map(|c| if c.is_control() { ' ' } else { c }).collect()
}

fn replace_all(haystack: &[u8], needle: &[u8]) -> Vec<u8> {
    if !haystack.windows(needle.len()).any(|w| w == needle) {
        return haystack.to_vec();
    }
    let mut out = Vec::with_capacity(haystack.len());
    let mut i = 0;
    while i < haystack.len() {
        if haystack[i..].starts_with(needle) {
            out.extend_from_slice(b"[redacted]");
            i += needle.len();
        } else {
            out.push(haystack[i]);
            i += 1;
        }
    }
    out
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

/// Why no response arrived. Every variant is worth a retry; none carries a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpError {
    Timeout(String),
    Connect(String),
    /// The connection broke mid-exchange, or the peer spoke broken HTTP or sent a truncated body.
    Transport(String),
    /// Bad URL, proxy or TLS settings: a configuration problem, reported as such.
    Setup(String),
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HttpError::Timeout(m) => write!(f, "timed out: {m}"),
            HttpError::Connect(m) => write!(f, "could not connect: {m}"),
            HttpError::Transport(m) => write!(f, "connection failed: {m}"),
            HttpError::Setup(m) => write!(f, "bad HTTP settings: {m}"),
        }
    }
}

impl std::error::Error for HttpError {}

/// A cloneable blocking client (ureq's Agent shares its connection pool between clones).
#[derive(Clone)]
pub struct Http {
    agent: ureq::Agent,
}

impl Http {
    pub fn new(cfg: &HttpConfig) -> Result<Http, HttpError> {
        let timeout = cfg.timeout();
        let mut builder = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(timeout))
            .timeout_connect(Some(timeout.min(Duration::from_secs(10))))
            .user_agent(concat!("mimecast-forwarder/", env!("CARGO_PKG_VERSION")))
            .max_redirects(0);
        if let Some(proxy) = &cfg.proxy {
            let p = ureq::Proxy::new(proxy.as_str()).map_err(|e| HttpError::Setup(format!("proxy {proxy}: {e}")))?;
            builder = builder.proxy(Some(p));
        }
        if let Some(path) = &cfg.ca_file {
            let pem = std::fs::read(path)
                .map_err(|e| HttpError::Setup(format!("reading ca_file {}: {e}", path.display())))?;
            let certs: Vec<_> = ureq::tls::parse_pem(&pem)
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                    _ => None,
                })
                .collect();
            if certs.is_empty() {
                return Err(HttpError::Setup(format!("ca_file {} holds no PEM certificate", path.display())));
            }
            let tls = ureq::tls::TlsConfig::builder().root_certs(ureq::tls::RootCerts::new_with_certs(&certs)).build();
            builder = builder.tls_config(tls);
        }
        Ok(Http { agent: builder.build().new_agent() })
    }

    pub fn post(&self, url: &str, headers: &[(&str, &str)], body: Vec<u8>) -> Result<Response, HttpError> {
        let mut req = self.agent.post(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        finish(req.send(&body[..]))
    }

    pub fn get(&self, url: &str, headers: &[(&str, &str)]) -> Result<Response, HttpError> {
        let mut req = self.agent.get(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        finish(req.call())
    }
}

fn finish(result: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Result<Response, HttpError> {
    let mut resp = result.map_err(classify)?;
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    let body = resp.body_mut().with_config().limit(MAX_BODY).read_to_vec().map_err(classify)?;
    Ok(Response { status, headers, body })
}

fn classify(e: ureq::Error) -> HttpError {
    let msg = e.to_string();
    match e {
        ureq::Error::Timeout(_) => HttpError::Timeout(msg),
        ureq::Error::HostNotFound | ureq::Error::ConnectionFailed => HttpError::Connect(msg),
        ureq::Error::Io(ref io) if io.kind() == std::io::ErrorKind::ConnectionRefused => HttpError::Connect(msg),
        ureq::Error::Io(ref io) if io.kind() == std::io::ErrorKind::TimedOut => HttpError::Timeout(msg),
        ureq::Error::BadUri(_) | ureq::Error::InvalidProxyUrl | ureq::Error::Http(_) => HttpError::Setup(msg),
        _ => HttpError::Transport(msg),
    }
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
        .scrub(&["s3cr3t-key", "s3cr3t-key%21", "ab"]);
        let all = format!("{} {:?}", r.excerpt(), r.headers);
        assert!(!all.contains("s3cr3t"), "{all}");
        assert!(r.excerpt().contains("client_secret=[redacted]"), "{}", r.excerpt());
        assert!(!r.excerpt().contains(['\x1b', '\x07']), "{:?}", r.excerpt());
        assert_eq!(printable("a\nb\u{9b}c", 10), "a b c");
        assert_eq!(without_password("http://u:p@proxy:3128/x"), "http://[redacted]@proxy:3128/x");
        assert_eq!(without_password("http://proxy:3128"), "http://proxy:3128");
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
    fn location_is_cut_and_cleaned() {
        let long = format!("https://portal.example/\u{7}{}", "x".repeat(500));
        let r = Response { status: 302, headers: vec![("location".into(), long)], body: vec![] };
        let loc = r.location().expect("has a location");
        assert!(loc.starts_with("https://portal.example/x") && loc.chars().count() == 200);
    }
}
