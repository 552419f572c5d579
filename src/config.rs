//! The TOML config: parsed strictly (unknown keys refused) into `RawConfig`, then validated into `Config`.
//! Secrets live in [`Secret`], whose `Debug` and `Display` never show the value.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::http::{Url, UrlError};
use crate::mimecast::Feed;

mod wants;

/// A credential. Its value is reachable only through [`Secret::expose`], so it cannot reach a log by accident:
/// `Debug`, `Display` and `Serialize` (what `check-config` prints) all give `[redacted]`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: String) -> Secret {
        Secret(s)
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("[redacted]")
    }
}

/// Where the config comes from when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/mimecast-forwarder/config.toml";

/// Datadog sites and their intake hosts (datadog-intake.md).
pub const SITES: [&str; 9] = [
    "datadoghq.com",
    "us3.datadoghq.com",
    "us5.datadoghq.com",
    "datadoghq.eu",
    "ap1.datadoghq.com",
    "ap2.datadoghq.com",
    "uk1.datadoghq.com",
    "ddog-gov.com",
    "us2.ddog-gov.com",
];

/// Datadog drops logs older than 18 h at intake; a larger `max_event_age_secs` would let records vanish.
const DATADOG_MAX_AGE_SECS: i64 = 18 * 3600;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    mimecast: RawMimecast,
    #[serde(default)]
    datadog: RawDatadog,
    #[serde(default)]
    queue: RawQueue,
    #[serde(default)]
    http: RawHttp,
    #[serde(default)]
    telemetry: RawTelemetry,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMimecast {
    base_url: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
    client_secret_file: Option<PathBuf>,
    log_types: Option<Vec<Feed>>,
    poll_interval_secs: Option<i64>,
    page_size: Option<u32>,
    initial_lookback_secs: Option<i64>,
    settle_secs: Option<i64>,
    overlap_secs: Option<i64>,
    max_window_secs: Option<i64>,
    /// `[mimecast.feeds.<feed>]`: credentials of the feed's own.
    feeds: Option<BTreeMap<Feed, RawCredentials>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredentials {
    client_id: Option<String>,
    client_secret: Option<String>,
    client_secret_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatadog {
    site: Option<String>,
    intake_url: Option<String>,
    api_key: Option<String>,
    api_key_file: Option<PathBuf>,
    hostname: Option<String>,
    tags: Option<Vec<String>>,
    late_records: Option<LateRecords>,
    max_event_age_secs: Option<i64>,
    sends_in_flight: Option<u32>,
    log_shape: Option<LogShape>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQueue {
    path: Option<PathBuf>,
    max_bytes: Option<u64>,
    when_full: Option<WhenFull>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    timeout_secs: Option<i64>,
    proxy: Option<String>,
    ca_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTelemetry {
    enabled: Option<bool>,
    interval_secs: Option<i64>,
    api_url: Option<String>,
}

/// The validated configuration. Durations are whole seconds as `i64`, the unit of the clock, the store and the
/// window arithmetic that use them; the two that are added to `Instant`s are also given as a `Duration`
/// ([`MimecastConfig::poll_interval`], [`HttpConfig::timeout`]). Every value is in its range, so no user casts.
/// It serializes to the keys of the file it came from, secrets and URL passwords redacted: `check-config` prints
/// it so, and what it prints reads back as the same config.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub mimecast: MimecastConfig,
    pub datadog: DatadogConfig,
    pub queue: QueueConfig,
    pub http: HttpConfig,
    pub telemetry: TelemetryConfig,
}

#[derive(Debug, Clone, Serialize)]
pub struct MimecastConfig {
    pub base_url: Url,
    pub client_id: String,
    pub client_secret: Secret,
    #[serde(rename = "log_types")]
    pub feeds: Vec<Feed>,
    /// 1 to 86400.
    pub poll_interval_secs: i64,
    pub page_size: u32,
    /// 0 to 10 years.
    pub initial_lookback_secs: i64,
    /// 0 to 86400.
    pub settle_secs: i64,
    /// 0 to 7 days.
    pub overlap_secs: i64,
    /// More than `overlap_secs`.
    pub max_window_secs: i64,
    /// `[mimecast.feeds.<feed>]`: feeds that poll under an API application of their own (its own quota). The
    /// others use `client_id` and `client_secret` above.
    #[serde(rename = "feeds", skip_serializing_if = "BTreeMap::is_empty")]
    pub own_credentials: BTreeMap<Feed, FeedCredentials>,
}

/// A feed's own API application.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FeedCredentials {
    pub client_id: String,
    pub client_secret: Secret,
}

impl MimecastConfig {
    /// The client id and secret `feed` polls with: its own, or those of `[mimecast]`.
    pub fn credentials(&self, feed: Feed) -> (&str, &Secret) {
        match self.own_credentials.get(&feed) {
            Some(own) => (&own.client_id, &own.client_secret),
            None => (&self.client_id, &self.client_secret),
        }
    }

    /// `poll_interval_secs` as a `Duration`, for `Instant` arithmetic.
    pub fn poll_interval(&self) -> Duration {
        // Validated from 1 to 86400: never negative.
        Duration::from_secs(self.poll_interval_secs.unsigned_abs())
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DatadogConfig {
    pub site: String,
    pub intake_url: Url,
    /// `GET …/api/v1/validate`, used by `check-config --connect`: not a key of its own.
    #[serde(skip)]
    pub validate_url: Url,
    pub api_key: Secret,
    pub hostname: String,
    pub tags: Vec<String>,
    pub late_records: LateRecords,
    /// 60 to 64800 (18 h).
    pub max_event_age_secs: i64,
    /// Batches sent at once, 1 to 16: at most this many are sent again after a crash.
    pub sends_in_flight: u32,
    pub log_shape: LogShape,
}

/// `datadog.log_shape`: how much of a record a log object carries besides its `message`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogShape {
    /// `message` and every field of the record at top level (the spec's shape; about 2.3x the record's bytes).
    Full,
    /// `message` only: Datadog's intake turns a JSON `message` into attributes itself. A record with a field of
    /// a reserved name still goes in the full shape, so that the field cannot overwrite the reserved attribute.
    Message,
}

/// `datadog.late_records`: what to do with a record Datadog would drop for its age.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LateRecords {
    Restamp,
    Keep,
}

#[derive(Debug, Clone, Serialize)]
pub struct QueueConfig {
    pub path: PathBuf,
    pub max_bytes: u64,
    pub when_full: WhenFull,
}

impl QueueConfig {
    /// Whether polling pauses with this many queued bytes (only `when_full = "pause"` ever pauses).
    pub fn paused_at(&self, queue_bytes: i64) -> bool {
        self.when_full == WhenFull::Pause && u64::try_from(queue_bytes).is_ok_and(|b| b >= self.max_bytes)
    }
}

/// `queue.when_full`: what happens when the queue holds `max_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WhenFull {
    Pause,
    DropOldest,
}

#[derive(Debug, Clone, Serialize)]
pub struct HttpConfig {
    /// 1 to 600.
    pub timeout_secs: i64,
    pub proxy: Option<Url>,
    pub ca_file: Option<PathBuf>,
}

impl HttpConfig {
    /// `timeout_secs` as a `Duration`.
    pub fn timeout(&self) -> Duration {
        // Validated from 1 to 600: never negative.
        Duration::from_secs(self.timeout_secs.unsigned_abs())
    }
}

/// `[telemetry]`: the agent's own metrics and service checks ([`crate::health`]), sent to the Datadog API of the
/// same site with the same key.
#[derive(Debug, Clone, Serialize)]
pub struct TelemetryConfig {
    pub enabled: bool,
    /// 1 to 3600.
    pub interval_secs: i64,
    /// Where the API is: `https://api.{site}`, or the origin of `datadog.intake_url` when that is set.
    pub api_url: Url,
    /// `POST …/api/v2/series`: the metrics. Not a key of its own.
    #[serde(skip)]
    pub series_url: Url,
    /// `POST …/api/v1/check_run`: the service checks. Not a key of its own.
    #[serde(skip)]
    pub check_run_url: Url,
}

impl TelemetryConfig {
    /// `interval_secs` as a `Duration`, for `Instant` arithmetic.
    pub fn interval(&self) -> Duration {
        // Validated from 1 to 3600: never negative.
        Duration::from_secs(self.interval_secs.unsigned_abs())
    }
}

/// A config that cannot be used. The message names the key, the value and what is expected, never a secret.
#[derive(Debug)]
pub enum ConfigError {
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// Not TOML, or a value of the wrong type or spelling. `message` is the `toml` error reduced by
    /// [`describe`]; the error itself is not kept, since its text quotes the offending line, which may hold a
    /// secret.
    Parse {
        path: PathBuf,
        message: String,
    },
    Invalid {
        key: &'static str,
        value: String,
        expected: String,
    },
    /// Not an `http://` or `https://` URL; `value` is shown without a password.
    Url {
        key: &'static str,
        value: String,
        error: UrlError,
    },
    Missing {
        key: &'static str,
        how: &'static str,
    },
    /// A `*_file` secret that cannot be read.
    SecretFile {
        key: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    /// More than one of the above, in one message: every missing or unreadable credential, and the first other
    /// problem, so that a new install learns all it lacks from one run.
    Several(Vec<ConfigError>),
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigError::Read { path, error } => write!(f, "cannot read {}: {error}", path.display()),
            ConfigError::Parse { path, message } => write!(f, "{}: {}", path.display(), message.trim_end()),
            ConfigError::Invalid { key, value, expected } => {
                write!(f, "invalid {key} = {value}: expected {expected}")
            }
            ConfigError::Url { key, value, error } => {
                write!(f, "invalid {key} = {value:?}: expected an http:// or https:// URL ({error})")
            }
            ConfigError::Missing { key, how } => write!(f, "missing {key}: set {how}"),
            ConfigError::SecretFile { key, path, error } => {
                write!(f, "invalid {key} = {}: expected a readable file ({error})", path.display())
            }
            ConfigError::Several(all) => {
                write!(f, "{} problems: ", all.len())?;
                for (i, e) in all.iter().enumerate() {
                    write!(f, "{}{e}", if i == 0 { "" } else { "; " })?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ConfigError::Read { error, .. } | ConfigError::SecretFile { error, .. } => Some(error),
            ConfigError::Url { error, .. } => Some(error),
            ConfigError::Parse { .. }
            | ConfigError::Invalid { .. }
            | ConfigError::Missing { .. }
            | ConfigError::Several(_) => None,
        }
    }
}

/// A config and the warnings found while loading it (secrets readable by others).
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    pub warnings: Vec<String>,
}

/// Reads and validates the config at `path`; `env` looks up environment variables (a parameter for tests).
pub fn load(path: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<Loaded, ConfigError> {
    let text = read_small(path, MAX_CONFIG_BYTES).map_err(|error| ConfigError::Read { path: path.into(), error })?;
    let raw = parse(&text, path)?;
    let mut warnings = Vec::new();
    let holds_secret = raw.mimecast.client_secret.is_some() || raw.datadog.api_key.is_some();
    if holds_secret && readable_by_others(path) {
        warnings.push(format!(
            "{} holds a secret and is readable by others: chmod o-rwx it (or use *_file keys)",
            path.display()
        ));
    }
    let config = validate(raw, env, &mut warnings)?;
    Ok(Loaded { config, warnings })
}

/// Parses TOML text without secrets from the environment; for tests and the shipped example.
pub fn from_str(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
    let raw = parse(text, Path::new("<string>"))?;
    validate(raw, env, &mut Vec::new())
}

fn parse(text: &str, path: &Path) -> Result<RawConfig, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse { path: path.into(), message: describe(&e, text) })
}

/// A TOML error without the source excerpt that `toml` prints by default: the excerpt is the offending line,
/// and that line may hold a secret (an unquoted `client_secret`, `api_key = ["…"]`, a duplicated key). The
/// message names the line and the key with its table (`queue.when_full`); a value is shown only when its key is
/// not a secret's.
fn describe(e: &toml::de::Error, text: &str) -> String {
    let message = e.message().trim();
    let Some(span) = e.span() else { return scrub_all(message, text) };
    let start = span.start.min(text.len());
    let line_no = text[..start].matches('\n').count() + 1;
    let line = text.lines().nth(line_no - 1).unwrap_or("");
    let key_of = |l: &str| l.split('=').next().unwrap_or("").trim().to_owned();
    // The line names its key, opens a table (an unknown `[section]`), or continues a value split over lines (an
    // array), whose key is on the last line above that holds one.
    let key = match line {
        l if table_header(l).is_some() => String::new(),
        l if l.contains('=') => key_of(l),
        _ => key_of(text.lines().take(line_no).filter(|l| l.contains('=')).last().unwrap_or(line)),
    };
    if is_secret_key(&key) {
        return format!(
            "line {line_no}: the value of a secret key is not valid TOML or not a string; it is not shown here"
        );
    }
    if key.is_empty() {
        return format!("line {line_no}: {}", scrub_all(message, text));
    }
    let table = text.lines().take(line_no).filter_map(table_header).last();
    let key = match table {
        Some(t) => format!("{t}.{key}"),
        None => key,
    };
    // serde names types (`expected u32`); say what the key takes instead.
    let message = wants::reword(&key, message).unwrap_or_else(|| message.to_owned());
    format!("line {line_no} ({key}): {}", scrub_all(&message, text))
}

/// The name of the table a `[table]` line opens. Quoted names are not taken for headers: a line of a value
/// split over lines (`["…"],` in an array) must not pass for one and escape the secret-key check.
fn table_header(line: &str) -> Option<&str> {
    let (name, rest) = line.trim().strip_prefix('[')?.split_once(']')?;
    let rest = rest.trim_start_matches(']').trim_start();
    let bare = name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ' '));
    (bare && !name.trim().is_empty() && (rest.is_empty() || rest.starts_with('#'))).then(|| name.trim())
}

/// Removes from `message` every value written on a secret's line of `text`.
fn scrub_all(message: &str, text: &str) -> String {
    let mut out = message.to_owned();
    for line in text.lines() {
        let Some((key, value)) = line.split_once('=') else { continue };
        if !is_secret_key(key) {
            continue;
        }
        let value = value.trim().trim_matches(|c| matches!(c, '"' | '\'' | '[' | ']' | ' '));
        if value.len() >= 3 {
            out = out.replace(value, "[redacted]");
        }
    }
    out
}

/// Key names that hold a secret, misspelled ones included: `client_secret`, `api_key`, `client_secert`, …
fn is_secret_key(key: &str) -> bool {
    let k = key.trim().to_ascii_lowercase();
    !k.ends_with("_file")
        && ["secret", "secert", "api_key", "apikey", "api-key", "token", "password"].iter().any(|s| k.contains(s))
}

fn readable_by_others(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).map(|m| m.permissions().mode() & 0o007 != 0).unwrap_or(false)
}

fn invalid(key: &'static str, value: impl std::fmt::Display, expected: &str) -> ConfigError {
    ConfigError::Invalid { key, value: value.to_string(), expected: expected.into() }
}

/// The largest config file read: far above any real one, so that `/dev/zero` or a log named by mistake is
/// refused at once instead of filling memory.
const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// The largest secret file read (a Mimecast secret or a Datadog key is under 100 bytes).
const MAX_SECRET_BYTES: u64 = 64 << 10;

/// A regular file's text, refused when it is something else (a FIFO would block, a device never ends) or
/// larger than `max` bytes.
fn read_small(path: &Path, max: u64) -> std::io::Result<String> {
    use std::io::{Error, ErrorKind, Read};
    // Looked at before it is opened too: opening a FIFO to read waits for a writer.
    let not_regular = || Error::new(ErrorKind::InvalidInput, "not a regular file");
    if !std::fs::metadata(path)?.is_file() {
        return Err(not_regular());
    }
    let file = std::fs::File::open(path)?;
    if !file.metadata()?.is_file() {
        return Err(not_regular());
    }
    let mut text = String::new();
    file.take(max + 1).read_to_string(&mut text)?;
    if text.len() as u64 > max {
        return Err(Error::new(ErrorKind::InvalidData, format!("larger than {} KiB", max >> 10)));
    }
    Ok(text)
}

/// A secret from its file, the config, or the environment, in that order of preference. Surrounding white space
/// is dropped wherever it came from (a file's or a shell's trailing newline, a CRLF); a control character left
/// inside could not go into an HTTP header or a form, so it is refused here, by key, without the value.
fn secret(
    key: &'static str,
    file: Option<PathBuf>,
    inline: Option<String>,
    env_name: Option<&'static str>,
    how: &'static str,
    env: &dyn Fn(&str) -> Option<String>,
    warnings: &mut Vec<String>,
) -> Result<Secret, ConfigError> {
    let value = if let Some(path) = file {
        if readable_by_others(&path) {
            warnings.push(format!("{} is readable by others: chmod o-rwx it", path.display()));
        }
        match read_small(&path, MAX_SECRET_BYTES) {
            Ok(text) if text.trim().is_empty() => {
                let error = std::io::Error::new(std::io::ErrorKind::InvalidData, "the file is empty or white space");
                return Err(ConfigError::SecretFile { key, path, error });
            }
            Ok(text) => text,
            Err(error) => return Err(ConfigError::SecretFile { key, path, error }),
        }
    } else if let Some(v) = inline {
        v
    } else {
        env_name.and_then(env).unwrap_or_default()
    };
    let value = value.trim();
    if value.is_empty() {
        return Err(ConfigError::Missing { key, how });
    }
    // Keys and secrets are printable ASCII: anything else (a line break, a zero-width space pasted with it) is a
    // copying accident that would be sent as part of the secret and refused as a wrong one.
    if !value.chars().all(|c| c.is_ascii_graphic()) {
        return Err(invalid(
            key,
            "[redacted]",
            "printable ASCII without spaces (a line break or an invisible character inside it?)",
        ));
    }
    Ok(Secret(value.to_owned()))
}

/// The `[mimecast.feeds.<feed>]` tables: each holds a client id and a secret (from `client_secret_file` or
/// `client_secret`; no environment variable, which could not say which feed it is for).
fn own_credentials(
    raw: BTreeMap<Feed, RawCredentials>,
    enabled: &[Feed],
    env: &dyn Fn(&str) -> Option<String>,
    warnings: &mut Vec<String>,
) -> Result<BTreeMap<Feed, FeedCredentials>, ConfigError> {
    let mut own = BTreeMap::new();
    for (feed, c) in raw {
        if !enabled.contains(&feed) {
            warnings.push(format!("[mimecast.feeds.{0}] is not used: {0} is not in mimecast.log_types", feed.name()));
        }
        let [id_key, secret_key] = own_keys(feed);
        const HOW: &str = "client_id and client_secret_file (or client_secret) in the feed's table, or remove the \
                           table to use [mimecast]'s";
        let client_id = c
            .client_id
            .map(|id| id.trim().to_owned())
            .filter(|id| !id.is_empty())
            .ok_or(ConfigError::Missing { key: id_key, how: HOW })?;
        let client_secret = secret(secret_key, c.client_secret_file, c.client_secret, None, HOW, env, warnings)?;
        own.insert(feed, FeedCredentials { client_id, client_secret });
    }
    Ok(own)
}

/// The names of a feed's own credential keys, for errors (which name their key as a `&'static str`).
fn own_keys(feed: Feed) -> [&'static str; 2] {
    match feed {
        Feed::Audit => ["mimecast.feeds.audit.client_id", "mimecast.feeds.audit.client_secret"],
        Feed::Dlp => ["mimecast.feeds.dlp.client_id", "mimecast.feeds.dlp.client_secret"],
        Feed::Rejection => ["mimecast.feeds.rejection.client_id", "mimecast.feeds.rejection.client_secret"],
        Feed::TtpAttachment => [
            "mimecast.feeds.ttp-attachment-protection.client_id",
            "mimecast.feeds.ttp-attachment-protection.client_secret",
        ],
        Feed::TtpImpersonation => {
            ["mimecast.feeds.ttp-impersonation.client_id", "mimecast.feeds.ttp-impersonation.client_secret"]
        }
        Feed::TtpUrl => ["mimecast.feeds.ttp-url.client_id", "mimecast.feeds.ttp-url.client_secret"],
    }
}

fn range<T: PartialOrd + std::fmt::Display>(key: &'static str, v: T, lo: T, hi: T) -> Result<T, ConfigError> {
    if v < lo || v > hi {
        return Err(invalid(key, v, &format!("a whole number from {lo} to {hi}")));
    }
    Ok(v)
}

fn url(key: &'static str, v: &str) -> Result<Url, ConfigError> {
    Url::parse(v).map_err(|error| ConfigError::Url { key, value: crate::http::without_password(v), error })
}

/// The credentials, the only keys without a default.
struct Credentials {
    client_id: String,
    client_secret: Secret,
    api_key: Secret,
    own: BTreeMap<Feed, FeedCredentials>,
}

/// Validates `raw`. Every missing or unreadable credential is reported, together with the first other problem
/// (a fresh install lacks all three credentials: one run names them all).
fn validate(
    mut raw: RawConfig,
    env: &dyn Fn(&str) -> Option<String>,
    warnings: &mut Vec<String>,
) -> Result<Config, ConfigError> {
    let mut problems = Vec::new();
    let keep = |r: Result<Secret, ConfigError>, problems: &mut Vec<ConfigError>| {
        r.unwrap_or_else(|e| {
            problems.push(e);
            Secret(String::new())
        })
    };
    let (m, d) = (&mut raw.mimecast, &mut raw.datadog);
    let client_id = m.client_id.take().or_else(|| env("MIMECAST_CLIENT_ID")).unwrap_or_default().trim().to_owned();
    if client_id.is_empty() {
        problems.push(ConfigError::Missing {
            key: "mimecast.client_id",
            how: "mimecast.client_id or the environment variable MIMECAST_CLIENT_ID",
        });
    }
    let client_secret = keep(
        secret(
            "mimecast.client_secret",
            m.client_secret_file.take(),
            m.client_secret.take(),
            Some("MIMECAST_CLIENT_SECRET"),
            "mimecast.client_secret_file, mimecast.client_secret or the environment variable MIMECAST_CLIENT_SECRET",
            env,
            warnings,
        ),
        &mut problems,
    );
    let api_key = keep(
        secret(
            "datadog.api_key",
            d.api_key_file.take(),
            d.api_key.take(),
            Some("DD_API_KEY"),
            "datadog.api_key_file, datadog.api_key or the environment variable DD_API_KEY",
            env,
            warnings,
        ),
        &mut problems,
    );
    // A feed's own credentials: a table for a feed that is not polled is only warned about.
    let enabled = m.log_types.clone().unwrap_or_else(|| Feed::ALL.to_vec());
    let own = own_credentials(m.feeds.take().unwrap_or_default(), &enabled, env, warnings).unwrap_or_else(|e| {
        problems.push(e);
        BTreeMap::new()
    });
    let checked = validate_settings(raw, Credentials { client_id, client_secret, api_key, own });
    match (checked, problems.len()) {
        (Ok(config), 0) => Ok(config),
        (Ok(_), 1) => Err(problems.remove(0)),
        (Ok(_), _) => Err(ConfigError::Several(problems)),
        (Err(e), 0) => Err(e),
        (Err(e), _) => {
            problems.push(e);
            Err(ConfigError::Several(problems))
        }
    }
}

/// Validates everything but the credentials.
fn validate_settings(raw: RawConfig, creds: Credentials) -> Result<Config, ConfigError> {
    let Credentials { client_id, client_secret, api_key, own } = creds;
    let m = raw.mimecast;
    let base_url = url("mimecast.base_url", m.base_url.as_deref().unwrap_or("https://api.services.mimecast.com"))?;
    let mut feeds = Vec::new();
    for feed in m.log_types.unwrap_or_else(|| Feed::ALL.to_vec()) {
        if feeds.contains(&feed) {
            return Err(invalid("mimecast.log_types", format!("{:?}", feed.name()), "each log type once"));
        }
        feeds.push(feed);
    }
    if feeds.is_empty() {
        return Err(invalid("mimecast.log_types", "[]", "at least one log type"));
    }
    let overlap_secs = range("mimecast.overlap_secs", m.overlap_secs.unwrap_or(300), 0, 7 * 86400)?;
    let max_window_secs = m.max_window_secs.unwrap_or(3600);
    if max_window_secs <= overlap_secs {
        return Err(invalid(
            "mimecast.max_window_secs",
            max_window_secs,
            &format!("more than mimecast.overlap_secs ({overlap_secs}), or windows would never advance"),
        ));
    }
    let mimecast = MimecastConfig {
        base_url,
        client_id,
        client_secret,
        feeds,
        poll_interval_secs: range("mimecast.poll_interval_secs", m.poll_interval_secs.unwrap_or(60), 1, 86400)?,
        page_size: range("mimecast.page_size", m.page_size.unwrap_or(500), 1, 1000)?,
        initial_lookback_secs: range(
            "mimecast.initial_lookback_secs",
            m.initial_lookback_secs.unwrap_or(86400),
            0,
            10 * 365 * 86400,
        )?,
        settle_secs: range("mimecast.settle_secs", m.settle_secs.unwrap_or(60), 0, 86400)?,
        overlap_secs,
        max_window_secs,
        own_credentials: own,
    };

    let d = raw.datadog;
    let site = d.site.unwrap_or_else(|| "datadoghq.com".into());
    if !SITES.contains(&site.as_str()) {
        return Err(invalid("datadog.site", format!("{site:?}"), &format!("one of {}", SITES.join(", "))));
    }
    let (intake_url, validate_url) = match d.intake_url {
        Some(u) => {
            let u = url("datadog.intake_url", &u)?;
            let validate = u.with_path("/api/v1/validate").map_err(|error| ConfigError::Url {
                key: "datadog.intake_url",
                value: u.to_string(),
                error,
            })?;
            (u, validate)
        }
        None => (
            url("datadog.site", &format!("https://http-intake.logs.{site}/api/v2/logs"))?,
            url("datadog.site", &format!("https://api.{site}/api/v1/validate"))?,
        ),
    };
    let hostname = match d.hostname {
        Some(h) if h.trim().is_empty() => return Err(invalid("datadog.hostname", "\"\"", "a non-empty host name")),
        Some(h) => h,
        None => machine_hostname(),
    };
    let tags = d.tags.unwrap_or_default();
    if tags.len() > 100 {
        return Err(invalid("datadog.tags", format!("{} tags", tags.len()), "at most 100 tags"));
    }
    if let Some(t) = tags.iter().find(|t| t.is_empty() || t.len() > 256 || t.contains(',')) {
        return Err(invalid("datadog.tags", format!("{t:?}"), "tags of 1 to 256 characters without commas"));
    }
    let datadog = DatadogConfig {
        site,
        intake_url,
        validate_url,
        api_key,
        hostname,
        tags,
        late_records: d.late_records.unwrap_or(LateRecords::Restamp),
        max_event_age_secs: range(
            "datadog.max_event_age_secs",
            d.max_event_age_secs.unwrap_or(61200),
            60,
            DATADOG_MAX_AGE_SECS,
        )?,
        sends_in_flight: range("datadog.sends_in_flight", d.sends_in_flight.unwrap_or(4), 1, 16)?,
        log_shape: d.log_shape.unwrap_or(LogShape::Full),
    };

    let q = raw.queue;
    let queue = QueueConfig {
        path: q.path.unwrap_or_else(|| PathBuf::from("/var/lib/mimecast-forwarder/queue.db")),
        max_bytes: range("queue.max_bytes", q.max_bytes.unwrap_or(1 << 30), 1, u64::MAX / 2)?,
        when_full: q.when_full.unwrap_or(WhenFull::Pause),
    };
    if queue.path.as_os_str().is_empty() {
        return Err(invalid("queue.path", "\"\"", "a file path"));
    }

    let h = raw.http;
    let http = HttpConfig {
        timeout_secs: range("http.timeout_secs", h.timeout_secs.unwrap_or(30), 1, 600)?,
        proxy: h.proxy.map(|p| url("http.proxy", &p)).transpose()?,
        ca_file: h.ca_file,
    };
    let telemetry = telemetry(raw.telemetry, &datadog)?;
    Ok(Config { mimecast, datadog, queue, http, telemetry })
}

/// `[telemetry]`. The API is `https://api.{site}`, or the origin of `datadog.intake_url` when that is set
/// (proxies, tests), as for `check-config --connect`'s key check, unless `api_url` names another (a relay, which
/// may have a path of its own: the endpoints' paths are appended to it).
fn telemetry(t: RawTelemetry, datadog: &DatadogConfig) -> Result<TelemetryConfig, ConfigError> {
    let key = "telemetry.api_url";
    let api_url = url(key, &t.api_url.unwrap_or_else(|| datadog.validate_url.origin()))?;
    if api_url.as_str().contains(['?', '#']) {
        return Err(invalid(key, format!("{:?}", api_url.to_string()), "a URL without a query or fragment"));
    }
    let at = |path: &str| {
        Url::parse(&format!("{}{path}", api_url.as_str())).map_err(|error| ConfigError::Url {
            key,
            value: api_url.to_string(),
            error,
        })
    };
    Ok(TelemetryConfig {
        enabled: t.enabled.unwrap_or(true),
        interval_secs: range("telemetry.interval_secs", t.interval_secs.unwrap_or(60), 1, 3600)?,
        series_url: at("/api/v2/series")?,
        check_run_url: at("/api/v1/check_run")?,
        api_url,
    })
}

/// This machine's host name, from the kernel.
pub fn machine_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

impl Config {
    /// The effective settings as TOML, secrets redacted: what `check-config` prints.
    pub fn render(&self) -> String {
        // Paths are the only values TOML could refuse (not UTF-8), and they came from TOML or are constants.
        let mut out =
            toml::to_string(self).unwrap_or_else(|e| format!("# the settings cannot be shown as TOML: {e}\n"));
        if self.http.proxy.is_none() {
            out.push_str("# http.proxy is not set: HTTPS_PROXY from the environment is honoured\n");
        }
        if self.http.ca_file.is_none() {
            out.push_str("# http.ca_file is not set: the built-in trust roots are used\n");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str =
        "[mimecast]\nclient_id = \"id\"\nclient_secret = \"s3cr3t-mc\"\n[datadog]\napi_key = \"s3cr3t-dd\"\n";

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn err(text: &str) -> String {
        err_with(text, &no_env)
    }

    fn err_with(text: &str, env: &dyn Fn(&str) -> Option<String>) -> String {
        from_str(text, env).unwrap_err().to_string()
    }

    #[test]
    fn defaults() {
        let c = from_str(MINIMAL, &no_env).unwrap();
        assert_eq!(c.mimecast.base_url.as_str(), "https://api.services.mimecast.com");
        assert_eq!(c.mimecast.feeds, Feed::ALL.to_vec());
        assert_eq!((c.mimecast.poll_interval_secs, c.mimecast.page_size), (60, 500));
        assert_eq!((c.mimecast.settle_secs, c.mimecast.overlap_secs, c.mimecast.max_window_secs), (60, 300, 3600));
        assert_eq!(c.datadog.intake_url.as_str(), "https://http-intake.logs.datadoghq.com/api/v2/logs");
        assert_eq!(c.datadog.validate_url.as_str(), "https://api.datadoghq.com/api/v1/validate");
        assert_eq!((c.datadog.late_records, c.datadog.max_event_age_secs), (LateRecords::Restamp, 61200));
        assert_eq!((c.queue.max_bytes, c.queue.when_full), (1 << 30, WhenFull::Pause));
        assert_eq!(c.http.timeout_secs, 30);
        assert_eq!((c.telemetry.enabled, c.telemetry.interval()), (true, Duration::from_secs(60)));
        assert_eq!(c.telemetry.api_url.as_str(), "https://api.datadoghq.com");
    }

    #[test]
    fn telemetry_goes_to_the_api_of_the_site_or_of_the_intake_url() {
        let urls = |text: &str| {
            let t = from_str(text, &no_env).unwrap().telemetry;
            (t.series_url.as_str().to_owned(), t.check_run_url.as_str().to_owned())
        };
        for site in SITES {
            let (series, checks) = urls(&format!("{MINIMAL}site = \"{site}\"\n"));
            assert_eq!(series, format!("https://api.{site}/api/v2/series"));
            assert_eq!(checks, format!("https://api.{site}/api/v1/check_run"));
        }
        let (series, checks) = urls(&format!("{MINIMAL}intake_url = \"http://127.0.0.1:9/api/v2/logs\"\n"));
        assert_eq!(
            (series.as_str(), checks.as_str()),
            ("http://127.0.0.1:9/api/v2/series", "http://127.0.0.1:9/api/v1/check_run")
        );
        let relay = format!(
            "{MINIMAL}intake_url = \"http://127.0.0.1:9/logs\"\n[telemetry]\napi_url = \"https://relay:8443/dd/\"\n"
        );
        assert_eq!(urls(&relay).0, "https://relay:8443/dd/api/v2/series");
        let c = from_str(&format!("{MINIMAL}[telemetry]\nenabled = false\ninterval_secs = 1\n"), &no_env).unwrap();
        assert_eq!((c.telemetry.enabled, c.telemetry.interval_secs), (false, 1));
        for (line, says) in [
            ("interval_secs = 0", "telemetry.interval_secs = 0: expected a whole number from 1 to 3600"),
            ("interval_secs = 3601", "from 1 to 3600"),
            ("api_url = \"api.datadoghq.com\"", "invalid telemetry.api_url"),
            ("api_url = \"https://relay/?x=1\"", "without a query"),
            ("enabled = \"yes\"", "(telemetry.enabled)"),
        ] {
            let e = err(&format!("{MINIMAL}[telemetry]\n{line}\n"));
            assert!(e.contains(says), "{line}: {e}");
        }
    }

    #[test]
    fn every_site_maps_to_its_intake() {
        for site in SITES {
            let c = from_str(&format!("{MINIMAL}site = \"{site}\"\n"), &no_env).unwrap();
            assert_eq!(c.datadog.intake_url.as_str(), format!("https://http-intake.logs.{site}/api/v2/logs"));
            assert_eq!(c.datadog.validate_url.as_str(), format!("https://api.{site}/api/v1/validate"));
        }
        let c = from_str(&format!("{MINIMAL}intake_url = \"http://127.0.0.1:9/api/v2/logs/\"\n"), &no_env).unwrap();
        assert_eq!(c.datadog.intake_url.as_str(), "http://127.0.0.1:9/api/v2/logs");
        assert_eq!(c.datadog.validate_url.as_str(), "http://127.0.0.1:9/api/v1/validate");
    }

    #[test]
    fn errors_name_the_key_value_and_expectation() {
        let e = err(&format!("{MINIMAL}[queue]\nwhen_ful = \"pause\"\n"));
        assert!(e.contains("when_ful"), "{e}");
        let e = err(&format!("{MINIMAL}[queue]\nwhen_full = \"block\"\n"));
        assert!(e.contains("line 7 (queue.when_full)") && e.contains("block") && e.contains("drop-oldest"), "{e}");
        let e = err(&format!("{MINIMAL}site = \"datadoghq.org\"\n"));
        assert!(e.contains("datadog.site"), "{e}");
        let e = err(&MINIMAL.replace("[datadog]", "log_types = [\"audit\", \"spam\"]\n[datadog]"));
        assert!(e.contains("mimecast.log_types") && e.contains("spam"), "{e}");
        let e = err(&MINIMAL.replace("[datadog]", "overlap_secs = 600\nmax_window_secs = 600\n[datadog]"));
        assert!(e.contains("mimecast.max_window_secs"), "{e}");
        let e = err(&MINIMAL.replace("[datadog]", "page_size = \"big\"\n[datadog]"));
        assert!(e.contains("page_size"), "{e}");
        let e = err(&format!("{MINIMAL}max_event_age_secs = 90000\n"));
        assert!(e.contains("datadog.max_event_age_secs") && e.contains("64800"), "{e}");
        let e = err("[mimecast]\nclient_id = \"id\"\n");
        assert!(e.contains("mimecast.client_secret") && e.contains("MIMECAST_CLIENT_SECRET"), "{e}");
    }

    #[test]
    fn every_missing_credential_is_reported_at_once_with_the_first_other_problem() {
        let keys = ["mimecast.client_id", "mimecast.client_secret", "datadog.api_key"];
        let e = from_str("", &no_env).unwrap_err();
        assert!(matches!(&e, ConfigError::Several(all) if all.len() == 3), "{e:?}");
        let text = e.to_string();
        assert!(text.starts_with("3 problems: missing mimecast.client_id: set "), "{text}");
        assert!(keys.iter().all(|k| text.contains(&format!("missing {k}: set "))), "{text}");
        // With a bad value too: that one is said as well.
        let e = err("[mimecast]\npage_size = 0\n");
        assert!(e.starts_with("4 problems: ") && e.contains("mimecast.page_size = 0"), "{e}");
        // An unreadable secret file is one of them; one problem alone is said as it is.
        let e = err("[mimecast]\nclient_secret_file = \"/nonexistent/secret\"\n");
        assert!(e.starts_with("3 problems: ") && e.contains("/nonexistent/secret"), "{e}");
        let env = |k: &str| (k != "DD_API_KEY").then(|| "from-env".to_string());
        let e = from_str("", &env).unwrap_err();
        assert!(matches!(e, ConfigError::Missing { key: "datadog.api_key", .. }), "{e:?}");
        assert!(from_str("", &|_| Some("x".to_string())).is_ok());
    }

    #[test]
    fn secrets_come_from_file_then_config_then_env_and_never_show() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("dd");
        std::fs::write(&file, "from-file\n").unwrap();
        let text = format!("{MINIMAL}api_key_file = {:?}\n", file.display().to_string());
        let c = from_str(&text, &no_env).unwrap();
        assert_eq!(c.datadog.api_key.expose(), "from-file");
        let env = |k: &str| (k == "DD_API_KEY" || k == "MIMECAST_CLIENT_SECRET").then(|| "from-env".to_string());
        let c = from_str("[mimecast]\nclient_id = \"id\"\n", &env).unwrap();
        assert_eq!(c.datadog.api_key.expose(), "from-env");
        let c = from_str(MINIMAL, &env).unwrap();
        assert_eq!(c.datadog.api_key.expose(), "s3cr3t-dd");
        for shown in [format!("{c:?}"), c.render()] {
            assert!(!shown.contains("s3cr3t"), "{shown}");
        }
    }

    #[test]
    fn secrets_lose_surrounding_white_space_wherever_they_come_from_and_a_line_break_inside_is_refused() {
        let env = |k: &str| match k {
            "DD_API_KEY" => Some("dd-key\n".to_string()),
            "MIMECAST_CLIENT_SECRET" => Some("mc-secret\r\n".to_string()),
            "MIMECAST_CLIENT_ID" => Some(" mc-id\n".to_string()),
            _ => None,
        };
        let c = from_str("", &env).unwrap();
        assert_eq!(c.datadog.api_key.expose(), "dd-key");
        assert_eq!(c.mimecast.client_secret.expose(), "mc-secret");
        assert_eq!(c.mimecast.client_id, "mc-id");
        let env = |k: &str| (k == "DD_API_KEY").then(|| "dd\r\nX-Injected: 1".to_string());
        let e = err_with("[mimecast]\nclient_id = \"id\"\nclient_secret = \"s\"\n", &env);
        assert!(e.contains("datadog.api_key = [redacted]") && e.contains("printable ASCII"), "{e}");
        assert!(!e.contains("Injected"), "{e}");
        let env = |k: &str| (k == "DD_API_KEY").then(|| "dd\u{200b}key".to_string());
        let e = err_with("[mimecast]\nclient_id = \"id\"\nclient_secret = \"s\"\n", &env);
        assert!(e.contains("datadog.api_key = [redacted]") && e.contains("invisible"), "a zero-width space: {e}");
        // Blank in the environment is missing, and says where a value may come from.
        let env = |k: &str| (k == "DD_API_KEY").then(|| " \n".to_string());
        let e = err_with("[mimecast]\nclient_id = \"id\"\nclient_secret = \"s\"\n", &env);
        assert!(e.contains("missing datadog.api_key: set datadog.api_key_file"), "{e}");
    }

    #[test]
    fn secret_and_config_files_must_be_small_regular_files_and_an_empty_one_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        let with = |file: &Path| format!("{MINIMAL}api_key_file = {:?}\n", file.display().to_string());
        let e = err(&with(&empty));
        assert!(e.contains("datadog.api_key") && e.contains("the file is empty or white space"), "{e}");
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'k'; 65 << 10]).unwrap();
        let e = err(&with(&big));
        assert!(e.contains("larger than 64 KiB"), "{e}");
        // A device never ends and a FIFO blocks: both are refused before a byte is read.
        let e = err(&with(Path::new("/dev/zero")));
        assert!(e.contains("not a regular file"), "{e}");
        let e = load(Path::new("/dev/zero"), &no_env).unwrap_err().to_string();
        assert!(e.starts_with("cannot read /dev/zero: not a regular file"), "{e}");
        let fifo = dir.path().join("fifo");
        if std::process::Command::new("mkfifo").arg(&fifo).status().is_ok_and(|s| s.success()) {
            let e = load(&fifo, &no_env).unwrap_err().to_string();
            assert!(e.contains("not a regular file"), "{e}");
        } else {
            eprintln!("SKIPPED the FIFO case: mkfifo is not available here");
        }
        let huge = dir.path().join("huge.toml");
        std::fs::write(&huge, vec![b'#'; (1 << 20) + 1]).unwrap();
        let e = load(&huge, &no_env).unwrap_err().to_string();
        assert!(e.contains("larger than 1024 KiB"), "{e}");
    }

    #[test]
    fn syntax_errors_never_show_a_secret() {
        let cases = [
            "[mimecast]\nclient_id = \"id\"\nclient_secret = hunter2hunter2\n",
            "[mimecast]\nclient_id = \"id\"\nclient_secret = \"hunter2hunter2\"\n[datadog]\napi_key = [\"hunter2hunter2\"]\n",
            "[mimecast]\nclient_id = \"id\"\nclient_secret = \"hunter2hunter2\"\nclient_secret = \"hunter2hunter2\"\n",
            "[mimecast]\nclient_id = \"id\"\nclient_secert = \"hunter2hunter2\"\n",
            "[mimecast]\nclient_id = \"id\"\nclient_secret = 31337313373\n",
            "[datadog]\napi_key = [\n  \"hunter2hunter2\",\n  3,\n]\n",
            "[mimecast]\nclient_secret = \"hunter2hunter2\"\npoll_interval_secs = \"hunter2hunter2\"\n",
            "[mimecast]\nclient_secret = \"hunter2hunter2\n",
            "[datadog]\napi_key = [\n  [\"hunter2hunter2\"],\n]\n",
        ];
        for text in cases {
            let e = err(text);
            assert!(!e.contains("hunter2") && !e.contains("31337"), "{text}\n=> {e}");
            assert!(e.contains("line "), "{e}");
        }
        // Errors elsewhere still say what is wrong, and where.
        let e = err(&format!("{MINIMAL}[queue]\nmax_bytes = \"lots\"\n"));
        assert!(e.contains("line 7 (queue.max_bytes)") && e.contains("lots"), "{e}");
        let e = err(&format!("{MINIMAL}[telemetri] # misspelt\nenabled = true\n"));
        assert!(e.starts_with("<string>: line 6: unknown field `telemetri`"), "{e}");
        let e = err(&format!("{MINIMAL}tags = [\n  \"env:prod\",\n  3,\n]\n"));
        assert!(e.contains("(datadog.tags)"), "{e}");
    }

    #[test]
    fn urls_are_parsed_and_a_proxy_password_never_shows() {
        let c = from_str(&format!("{MINIMAL}[http]\nproxy = \"http://me:pw-123@proxy:3128\"\n"), &no_env).unwrap();
        assert_eq!(c.http.proxy.as_ref().map(Url::as_str), Some("http://me:pw-123@proxy:3128"));
        for shown in [format!("{c:?}"), c.render()] {
            assert!(!shown.contains("pw-123") && shown.contains("http://[redacted]@proxy:3128"), "{shown}");
        }
        let mimecast = |line: &str| MINIMAL.replace("[datadog]", &format!("{line}\n[datadog]"));
        for (text, value) in [
            (mimecast("base_url = \"api.services.mimecast.com\""), "api.services.mimecast.com"),
            (mimecast("base_url = \"ftp://h\""), "ftp://h"),
            (format!("{MINIMAL}intake_url = \"https://exa mple.com/api\"\n"), "https://exa mple.com/api"),
            (format!("{MINIMAL}[http]\nproxy = \"http://me:pw-123@proxy:port\"\n"), "http://[redacted]@proxy:port"),
        ] {
            let e = err(&text);
            assert!(e.contains(&format!("= {value:?}: expected an http:// or https:// URL (")), "{e}");
            assert!(!e.contains("pw-123"), "{e}");
        }
        use std::error::Error as _;
        let e = from_str(&format!("{MINIMAL}intake_url = \"ftp://h\"\n"), &no_env).unwrap_err();
        assert!(e.source().is_some_and(|s| s.is::<UrlError>()), "{e:?}");
    }

    #[test]
    fn typed_values_and_error_sources() {
        let c = from_str(&MINIMAL.replace("[datadog]", "poll_interval_secs = 90\n[datadog]"), &no_env).unwrap();
        assert_eq!(c.mimecast.poll_interval(), Duration::from_secs(90));
        assert_eq!(c.http.timeout(), Duration::from_secs(30));
        let c = from_str(&format!("{MINIMAL}late_records = \"keep\"\n[queue]\nwhen_full = \"drop-oldest\"\n"), &no_env);
        let c = c.unwrap();
        assert_eq!((c.datadog.late_records, c.queue.when_full), (LateRecords::Keep, WhenFull::DropOldest));
        let e = err(&MINIMAL.replace("[datadog]", "settle_secs = -1\n[datadog]"));
        assert!(e.contains("mimecast.settle_secs = -1") && e.contains("from 0 to 86400"), "{e}");

        use std::error::Error as _;
        let e = load(Path::new("/nonexistent/config.toml"), &no_env).unwrap_err();
        assert!(e.source().is_some_and(|s| s.is::<std::io::Error>()), "{e:?}");
        let text = format!("{MINIMAL}api_key_file = \"/nonexistent/dd_api_key\"\n");
        let e = from_str(&text, &no_env).unwrap_err();
        assert!(matches!(e, ConfigError::SecretFile { key: "datadog.api_key", .. }), "{e:?}");
        assert!(e.to_string().contains("/nonexistent/dd_api_key") && e.source().is_some(), "{e}");
        // A syntax error keeps no source: the `toml` error quotes the line, which may hold a secret.
        assert!(from_str("[mimecast\n", &no_env).unwrap_err().source().is_none());
    }

    #[test]
    fn warns_when_a_secret_is_readable_by_others() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, MINIMAL).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let loaded = load(&path, &no_env).unwrap();
        assert_eq!(loaded.warnings.len(), 1, "{:?}", loaded.warnings);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(load(&path, &no_env).unwrap().warnings.is_empty());

        let secret = dir.path().join("dd_api_key");
        std::fs::write(&secret, "k\n").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o604)).unwrap();
        let text =
            format!("[mimecast]\nclient_id = \"i\"\n[datadog]\napi_key_file = {:?}\n", secret.display().to_string());
        std::fs::write(&path, text).unwrap();
        let env = |k: &str| (k == "MIMECAST_CLIENT_SECRET").then(|| "s".to_string());
        let warnings = load(&path, &env).unwrap().warnings;
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("dd_api_key") && !warnings[0].contains("k\n"), "{warnings:?}");
    }

    #[test]
    fn renders_as_toml_that_reads_back_as_the_same_config_without_secrets() {
        let extra = "tags = [\"env:prod\"]\nlate_records = \"keep\"\n[queue]\nwhen_full = \"drop-oldest\"\n\
                     [http]\nproxy = \"http://me:pw-123@proxy:3128\"\n";
        let text = MINIMAL.replace(
            "[datadog]",
            "log_types = [\"ttp-url\", \"ttp-attachment\"]\n\
             [mimecast.feeds.ttp-url]\nclient_id = \"url-app\"\nclient_secret = \"s3cr3t-url\"\n[datadog]",
        );
        for c in [from_str(MINIMAL, &no_env).unwrap(), from_str(&format!("{text}{extra}"), &no_env).unwrap()] {
            let rendered = c.render();
            for secret in ["s3cr3t", "pw-123"] {
                assert!(!rendered.contains(secret), "{rendered}");
            }
            let back: toml::Value = toml::from_str(&rendered).unwrap();
            assert_eq!(back["mimecast"]["client_secret"].as_str(), Some("[redacted]"));
            assert_eq!(back["datadog"]["api_key"].as_str(), Some("[redacted]"));
            assert_eq!(back["queue"]["when_full"].as_str(), Some(serde_plain(c.queue.when_full).as_str()));
            assert_eq!(back["mimecast"]["poll_interval_secs"].as_integer(), Some(60));
            // Every key is one of the file's (the config's own parser refuses others), with the same values.
            let again = from_str(&rendered, &no_env).unwrap();
            assert_eq!(again.render(), rendered);
            assert_eq!(again.mimecast.client_secret.expose(), "[redacted]");
        }
        let c = from_str(&format!("{text}{extra}"), &no_env).unwrap();
        let rendered = c.render();
        assert!(rendered.contains("log_types = [\"ttp-url\", \"ttp-attachment-protection\"]"), "{rendered}");
        assert!(rendered.contains("proxy = \"http://[redacted]@proxy:3128\"\n"), "{rendered}");
        assert!(!rendered.contains("validate"), "{rendered}");
        assert!(from_str(MINIMAL, &no_env).unwrap().render().contains("# http.proxy is not set"));
    }

    #[test]
    fn a_feed_may_poll_under_its_own_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("url_secret");
        std::fs::write(&file, "s3cr3t-url\n").unwrap();
        let table = |body: &str| MINIMAL.replace("[datadog]", &format!("[mimecast.feeds.ttp-url]\n{body}[datadog]"));
        let c =
            from_str(&table(&format!("client_id = \"url-app\"\nclient_secret_file = {file:?}\n")), &no_env).unwrap();
        let (id, secret) = c.mimecast.credentials(Feed::TtpUrl);
        assert_eq!((id, secret.expose()), ("url-app", "s3cr3t-url"));
        let (id, secret) = c.mimecast.credentials(Feed::Audit);
        assert_eq!((id, secret.expose()), ("id", "s3cr3t-mc"));
        // A table holds both, and its secret never comes from [mimecast]'s or the environment.
        let env = |name: &str| (name == "MIMECAST_CLIENT_SECRET").then(|| "from-env".to_owned());
        let e = from_str(&table("client_id = \"url-app\"\n"), &env).unwrap_err().to_string();
        assert!(e.contains("mimecast.feeds.ttp-url.client_secret") && e.contains("feed's table"), "{e}");
        let e = err(&table("client_secret = \"s3cr3t-url\"\n"));
        assert!(e.contains("mimecast.feeds.ttp-url.client_id") && !e.contains("s3cr3t"), "{e}");
        assert!(err(&table("client_id = \"a\"\nclient_secret = \"b\"\nclientid = \"c\"\n")).contains("clientid"));
        assert!(
            err(&MINIMAL.replace("[datadog]", "[mimecast.feeds.ttp-nope]\nclient_id = \"a\"\n[datadog]"))
                .contains("ttp-nope")
        );
        // A table for a feed that is not polled is kept and warned about.
        let text = table("client_id = \"url-app\"\nclient_secret = \"s\"\n")
            .replace("[mimecast.feeds", "log_types = [\"audit\"]\n[mimecast.feeds");
        let mut warnings = Vec::new();
        validate(toml::from_str(&text).unwrap(), &no_env, &mut warnings).unwrap();
        assert!(warnings.iter().any(|w| w.contains("[mimecast.feeds.ttp-url] is not used")), "{warnings:?}");
    }

    fn serde_plain(v: impl Serialize) -> String {
        serde_json::to_value(v).unwrap().as_str().unwrap().to_owned()
    }
}
