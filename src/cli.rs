//! The command line: parsing (pure) and the subcommands other than `run`'s main loop.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::config::{self, Config, ConfigError};
use crate::exit;

/// A parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Run { config: Option<PathBuf>, once: bool },
    CheckConfig { config: Option<PathBuf>, connect: bool },
    Status { config: Option<PathBuf>, json: bool },
    Demo,
    Help(&'static str),
    Version,
}

pub const USAGE: &str = "\
mimecast-forwarder: forwards Mimecast security logs to Datadog through a durable on-disk queue

Usage:
  mimecast-forwarder run [--config PATH] [--once]
  mimecast-forwarder check-config [--config PATH] [--connect]
  mimecast-forwarder status [--config PATH] [--json]
  mimecast-forwarder demo
  mimecast-forwarder --version

--config defaults to $MIMECAST_FORWARDER_CONFIG, else /etc/mimecast-forwarder/config.toml.
Log level: RUST_LOG (default info). Run `mimecast-forwarder COMMAND --help` for one command.
";

const RUN_HELP: &str = "\
mimecast-forwarder run [--config PATH] [--once]

Polls the enabled Mimecast feeds into the SQLite queue and drains the queue to Datadog, in the foreground,
logging to stderr. SIGTERM or SIGINT stops it cleanly.
  --once   one pass: poll every feed up to now, drain until empty or refused, exit.
Exit codes: 0 clean stop (--once: queue empty); 75 records remain queued (--once); 78 bad config; 70 internal error.
";

const CHECK_HELP: &str = "\
mimecast-forwarder check-config [--config PATH] [--connect]

Validates the config and prints the effective settings with secrets redacted.
  --connect   also fetch a Mimecast token and validate the Datadog API key.
Exit codes: 0 valid; 78 invalid; 69 --connect could not authenticate.
";

const STATUS_HELP: &str = "\
mimecast-forwarder status [--config PATH] [--json]

What is queued, how old and how big; each feed's watermark, last success and last error; dead letters; drops.
Read-only and safe while `run` is running.
  --json   one JSON object, for scripts.
Exit codes: 0; 78 bad config; 66 no queue database yet.
";

const DEMO_HELP: &str = "\
mimecast-forwarder demo

Runs the whole pipeline on this machine with no accounts: loopback simulators of Mimecast (six feeds,
pagination, token expiry, a 429) and of Datadog (with an outage in the middle), in a temporary directory.
Ends by itself within about 30 s with a summary. Exit code 0 only if nothing was lost.
";

/// Parses the arguments after the program name.
pub fn parse(args: &[String]) -> Result<Command, String> {
    let mut it = args.iter().map(String::as_str);
    let sub = match it.next() {
        None | Some("-h" | "--help" | "help") => return Ok(Command::Help(USAGE)),
        Some("-V" | "--version") => return Ok(Command::Version),
        Some(s) => s,
    };
    let (mut config, mut once, mut connect, mut json) = (None, false, false, false);
    let help = match sub {
        "run" => RUN_HELP,
        "check-config" => CHECK_HELP,
        "status" => STATUS_HELP,
        "demo" => DEMO_HELP,
        other => return Err(format!("unknown command {other:?}")),
    };
    while let Some(arg) = it.next() {
        match (sub, arg) {
            (_, "-h" | "--help") => return Ok(Command::Help(help)),
            ("run" | "check-config" | "status", "--config") => {
                config = Some(PathBuf::from(it.next().ok_or("--config needs a path")?));
            }
            ("run" | "check-config" | "status", a) if a.starts_with("--config=") => {
                config = Some(PathBuf::from(&a["--config=".len()..]));
            }
            ("run", "--once") => once = true,
            ("check-config", "--connect") => connect = true,
            ("status", "--json") => json = true,
            (_, a) => return Err(format!("unexpected argument {a:?} for {sub}")),
        }
    }
    Ok(match sub {
        "run" => Command::Run { config, once },
        "check-config" => Command::CheckConfig { config, connect },
        "status" => Command::Status { config, json },
        _ => Command::Demo,
    })
}

/// `--config`, else `$MIMECAST_FORWARDER_CONFIG`, else the packaged path.
pub fn config_path(given: Option<PathBuf>) -> PathBuf {
    given
        .or_else(|| std::env::var_os("MIMECAST_FORWARDER_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(config::DEFAULT_PATH))
}

fn real_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Loads the config and logs its warnings (secrets readable by others).
pub fn load_config(path: &Path) -> Result<Config, ConfigError> {
    let loaded = config::load(path, &real_env)?;
    for w in &loaded.warnings {
        log::warn!("{w}");
    }
    Ok(loaded.config)
}

/// `check-config`.
pub fn check_config(path: &Path, connect: bool) -> i32 {
    let cfg = match load_config(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("config error: {e}");
            return exit::CONFIG;
        }
    };
    crate::say!("# {} is valid; effective settings (secrets redacted):\n{}", path.display(), cfg.render());
    if !connect {
        return exit::OK;
    }
    let http = match crate::http::Http::new(&cfg.http) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("config error: {e}");
            return exit::CONFIG;
        }
    };
    let creds = crate::mimecast::auth::Credentials::of(&cfg.mimecast);
    let mut ok = true;
    match crate::mimecast::auth::fetch_token(&http, &creds, Instant::now()) {
        Ok(_) => crate::say!("mimecast: OK, a token was issued by {}", cfg.mimecast.base_url),
        Err(e) => {
            ok = false;
            crate::say!("mimecast: FAILED: {e}");
        }
    }
    match crate::datadog::sink::validate_key(&http, &cfg.datadog.validate_url, &cfg.datadog.api_key) {
        Ok(()) => crate::say!("datadog: OK, the API key is valid ({})", cfg.datadog.validate_url),
        Err(e) => {
            ok = false;
            crate::say!("datadog: FAILED: {e}");
        }
    }
    if ok { exit::OK } else { exit::UNAVAILABLE }
}

/// `status`. Credentials are not needed to read the queue, so missing ones are not an error here.
pub fn status(path: &Path, json: bool) -> i32 {
    let placeholder = |name: &str| {
        real_env(name).or_else(|| {
            matches!(name, "MIMECAST_CLIENT_ID" | "MIMECAST_CLIENT_SECRET" | "DD_API_KEY").then(|| "-".to_owned())
        })
    };
    let cfg = match config::load(path, &placeholder) {
        Ok(l) => l.config,
        Err(e) => {
            eprintln!("config error: {e}");
            return exit::CONFIG;
        }
    };
    if !cfg.queue.path.exists() {
        eprintln!("no queue database at {} yet: `mimecast-forwarder run` creates it", cfg.queue.path.display());
        return exit::NO_INPUT;
    }
    let report = crate::store::Store::open_read_only(&cfg.queue.path)
        .and_then(|s| crate::status::gather(&s, &cfg, crate::datetime::now()));
    match report {
        Ok(r) if json => {
            crate::say!("{r}");
            exit::OK
        }
        Ok(r) => {
            crate::say!("{}", crate::status::render(&r, crate::datetime::now()).trim_end());
            exit::OK
        }
        Err(e) => {
            eprintln!("error: {e}");
            exit::SOFTWARE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Command, String> {
        parse(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn parses_the_documented_commands() {
        assert_eq!(p(&["run"]), Ok(Command::Run { config: None, once: false }));
        assert_eq!(p(&["run", "--once", "--config", "/c"]), Ok(Command::Run { config: Some("/c".into()), once: true }));
        assert_eq!(p(&["check-config", "--connect"]), Ok(Command::CheckConfig { config: None, connect: true }));
        assert_eq!(
            p(&["status", "--json", "--config=/x"]),
            Ok(Command::Status { config: Some("/x".into()), json: true })
        );
        assert_eq!(p(&["demo"]), Ok(Command::Demo));
        assert_eq!(p(&["--version"]), Ok(Command::Version));
        assert_eq!(p(&[]), Ok(Command::Help(USAGE)));
        assert_eq!(p(&["status", "--help"]), Ok(Command::Help(STATUS_HELP)));
        assert!(p(&["run", "--json"]).is_err());
        assert!(p(&["frobnicate"]).is_err());
        assert!(p(&["run", "--config"]).is_err());
    }
}
