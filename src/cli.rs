//! The command line: parsing (pure) and the subcommands other than `run`'s main loop.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::config::{self, Config, ConfigError};
use crate::exit;
use crate::store::{DeadLetter, Requeued, Store, StoreError};

/// A parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Run { config: Option<PathBuf>, once: bool, allow_root: bool },
    CheckConfig { config: Option<PathBuf>, connect: bool },
    Status { config: Option<PathBuf>, json: bool },
    DeadLetters { config: Option<PathBuf>, action: DeadLetterAction, json: bool },
    Demo,
    Help(&'static str),
    Version,
}

/// What `dead-letters` does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadLetterAction {
    List,
    /// Requeue these ids, or every dead letter (`--all`) when `None`.
    Requeue(Option<Vec<i64>>),
}

pub const USAGE: &str = "\
mimecast-forwarder: forwards Mimecast security logs to Datadog through a durable on-disk queue

Usage:
  mimecast-forwarder run [--config PATH] [--once] [--allow-root]
  mimecast-forwarder check-config [--config PATH] [--connect]
  mimecast-forwarder status [--config PATH] [--json]
  mimecast-forwarder dead-letters list|requeue [ID…|--all] [--config PATH] [--json]
  mimecast-forwarder demo
  mimecast-forwarder --version

--config defaults to $MIMECAST_FORWARDER_CONFIG, else /etc/mimecast-forwarder/config.toml.
Log level: RUST_LOG (default info). `mimecast-forwarder help COMMAND` (or COMMAND --help) for one command,
with its exit codes; every command exits 64 on a usage error.
";

const RUN_HELP: &str = "\
mimecast-forwarder run [--config PATH] [--once] [--allow-root]

Polls the enabled Mimecast feeds into the SQLite queue and drains the queue to Datadog, in the foreground,
logging to stderr. SIGTERM or SIGINT stops it cleanly; SIGHUP (systemctl reload) reads the config again and
keeps the running one if the new one is invalid. Only one run may use a queue at a time.
  --once         one pass: poll every feed up to now, drain until empty or refused, exit.
  --allow-root   run as root even on a queue whose directory or files belong to another user (the service's
                 user, mimecast-forwarder); without it root refuses, since that user could not open the files
                 root creates there. Give them back afterwards: chown mimecast-forwarder: QUEUE_PATH*
Exit codes: 0 clean stop (--once: queue empty and every feed answered); 75 records remain queued (--once),
another run holds the queue, or (--once) the system clock is not set yet; 69 (--once) the queue is empty but a feed or the intake gave up; 78 bad config;
70 internal error (a damaged or unwritable queue, with what to do); 77 refused to run as root on another user's
queue (without --allow-root); 64 usage.
";

const CHECK_HELP: &str = "\
mimecast-forwarder check-config [--config PATH] [--connect]

Validates the config and prints the effective settings with secrets redacted.
  --connect   also fetch a Mimecast token and validate the Datadog API key.
Exit codes: 0 valid; 78 invalid; 69 --connect could not authenticate; 64 usage.
";

const STATUS_HELP: &str = "\
mimecast-forwarder status [--config PATH] [--json]

What is queued, how old and how big; each feed's watermark, last success and last error; dead letters; drops.
Read-only and safe while `run` is running.
  --json   one JSON object, for scripts; when there is no report to give, {\"queue\": null, \"error\": \"…\"}.
Exit codes: 0; 78 bad config; 66 no queue database yet (`run` creates it); 70 the database is damaged,
unreadable, held locked by another process for too long, or of another version than this build (with what to
do); 64 usage.
";

const DEAD_LETTERS_HELP: &str = "\
mimecast-forwarder dead-letters list|requeue [ID…|--all] [--config PATH] [--json]

Dead letters are logs that Datadog refused one by one (HTTP 400); they are kept in the queue database.
  list               one line per dead letter: id, feed, when it was refused, size, Datadog's reason.
  requeue ID…        move these dead letters back into the queue, once the cause is fixed;
  requeue --all      or all of them. `run` (the running service, or the next start) sends them.
  --json             list: a JSON array; requeue: {\"requeued\": N, \"bytes\": B, \"not_found\": [ID…]}
                     (also on 65); on 66, 70 or 78, {\"error\": \"…\"}, the message on stderr too.
Safe while `run` is running.
Exit codes: 0; 64 usage; 65 some IDs are not dead letters (the others are requeued); 66 no queue database yet;
70 database error; 78 bad config.
";

const DEMO_HELP: &str = "\
mimecast-forwarder demo

Runs the whole pipeline on this machine with no accounts: loopback simulators of Mimecast (six feeds,
pagination, token expiry, a 429) and of Datadog (with an outage in the middle), in a temporary directory.
Prints what was delivered every second; takes about 10 s and ends by itself within 30 s at most, with a
summary. The agent's own log shows errors only; RUST_LOG=warn adds its retries (on stderr).
Exit codes: 0 nothing was lost; 1 records were lost (a bug: please report it); 70 the demo could not run
(no loopback sockets or temporary directory); 64 usage.
";

/// Parses the arguments after the program name.
pub fn parse(args: &[String]) -> Result<Command, String> {
    let mut it = args.iter().map(String::as_str);
    let sub = match it.next() {
        Some("help") => {
            return match (it.next(), it.next()) {
                (None, _) => Ok(Command::Help(USAGE)),
                (Some(sub), None) => help_of(sub).map(Command::Help),
                (Some(_), Some(extra)) => Err(format!("unexpected argument {extra:?} for help")),
            };
        }
        None | Some("-h" | "--help") => return Ok(Command::Help(USAGE)),
        Some("-V" | "--version") => return Ok(Command::Version),
        Some(s) => s,
    };
    let (mut config, mut once, mut connect, mut json, mut allow_root) = (None, false, false, false, false);
    let help = help_of(sub)?;
    // `dead-letters` takes its action first: `dead-letters list`, `dead-letters requeue 3 7`.
    let action = match sub {
        "dead-letters" => match it.next() {
            Some(a @ ("list" | "requeue")) => Some(a),
            Some("-h" | "--help") => return Ok(Command::Help(help)),
            Some(a) => return Err(format!("dead-letters needs list or requeue, not {a:?}")),
            None => return Err("dead-letters needs list or requeue".into()),
        },
        _ => None,
    };
    let (mut ids, mut all) = (Vec::new(), false);
    while let Some(arg) = it.next() {
        match (sub, action, arg) {
            (_, _, "-h" | "--help") => return Ok(Command::Help(help)),
            ("run" | "check-config" | "status" | "dead-letters", _, "--config") => {
                config = Some(PathBuf::from(it.next().ok_or("--config needs a path")?));
            }
            ("run" | "check-config" | "status" | "dead-letters", _, a) if a.starts_with("--config=") => {
                config = Some(PathBuf::from(&a["--config=".len()..]));
            }
            ("run", _, "--once") => once = true,
            ("run", _, "--allow-root") => allow_root = true,
            ("check-config", _, "--connect") => connect = true,
            ("status" | "dead-letters", _, "--json") => json = true,
            ("dead-letters", Some("requeue"), "--all") => all = true,
            ("dead-letters", Some("requeue"), a) if !a.starts_with('-') => {
                ids.push(a.parse().map_err(|_| format!("dead-letters requeue: {a:?} is not a dead-letter id"))?);
            }
            (_, _, a) => return Err(format!("unexpected argument {a:?} for {sub}")),
        }
    }
    Ok(match (sub, action) {
        ("run", _) => Command::Run { config, once, allow_root },
        ("check-config", _) => Command::CheckConfig { config, connect },
        ("status", _) => Command::Status { config, json },
        ("dead-letters", Some("list")) => Command::DeadLetters { config, action: DeadLetterAction::List, json },
        ("dead-letters", _) => {
            let which = match (ids.is_empty(), all) {
                (false, false) => Some(ids),
                (true, true) => None,
                (true, false) => return Err("dead-letters requeue needs dead-letter ids or --all".into()),
                (false, true) => return Err("dead-letters requeue takes ids or --all, not both".into()),
            };
            Command::DeadLetters { config, action: DeadLetterAction::Requeue(which), json }
        }
        _ => Command::Demo,
    })
}

/// The help of one command (`COMMAND --help`, `help COMMAND`).
fn help_of(sub: &str) -> Result<&'static str, String> {
    Ok(match sub {
        "run" => RUN_HELP,
        "check-config" => CHECK_HELP,
        "status" => STATUS_HELP,
        "dead-letters" => DEAD_LETTERS_HELP,
        "demo" => DEMO_HELP,
        other => return Err(format!("unknown command {other:?}")),
    })
}

/// `--config`, else `$MIMECAST_FORWARDER_CONFIG`, else the packaged path.
pub fn config_path(given: Option<PathBuf>) -> PathBuf {
    given
        .or_else(|| std::env::var_os("MIMECAST_FORWARDER_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(config::DEFAULT_PATH))
}

/// This process's command line, quoted for a shell where it needs to be: what an error suggests running again
/// (as another user).
pub fn command_line() -> String {
    let plain = |a: &str| !a.is_empty() && a.chars().all(|c| c.is_ascii_alphanumeric() || "_./:=@%+,-".contains(c));
    let words: Vec<String> =
        std::env::args().map(|a| if plain(&a) { a } else { format!("'{}'", a.replace('\'', "'\\''")) }).collect();
    words.join(" ")
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
    let accounts = crate::mimecast::auth::Accounts::of(&cfg.mimecast);
    let apps: Vec<_> = accounts.applications().collect();
    let mut ok = true;
    for (creds, feeds) in &apps {
        let whose = if apps.len() > 1 {
            let names: Vec<&str> = feeds.iter().map(|f| f.name()).collect();
            format!(" (client id {}: {})", creds.client_id, names.join(", "))
        } else {
            String::new()
        };
        match crate::mimecast::auth::fetch_token(&http, creds, Instant::now()) {
            Ok(_) => crate::say!("mimecast{whose}: OK, a token was issued by {}", cfg.mimecast.base_url),
            Err(e) => {
                ok = false;
                crate::say!("mimecast{whose}: FAILED: {e}");
            }
        }
    }
    match crate::datadog::sink::validate_key(&http, cfg.datadog.validate_url.as_str(), &cfg.datadog.api_key) {
        Ok(()) => crate::say!("datadog: OK, the API key is valid ({})", cfg.datadog.validate_url),
        Err(e) => {
            ok = false;
            crate::say!("datadog: FAILED: {e}");
        }
    }
    if ok { exit::OK } else { exit::UNAVAILABLE }
}

/// Why `status` or `dead-letters` cannot go on: the exit code and what to say.
struct Failure {
    code: i32,
    message: String,
}

impl Failure {
    /// Says it on stderr, and gives back the exit code.
    fn report(self) -> i32 {
        let prefix = match self.code {
            exit::CONFIG => "config error: ",
            exit::SOFTWARE => "error: ",
            _ => "",
        };
        eprintln!("{prefix}{}", self.message);
        self.code
    }
}

/// The config for commands that only read or tidy the queue (`status`, `dead-letters`). They need no
/// credentials, so missing ones get placeholders instead of failing.
fn load_queue_config(path: &Path) -> Result<Config, Failure> {
    let placeholder = |name: &str| {
        real_env(name).or_else(|| {
            matches!(name, "MIMECAST_CLIENT_ID" | "MIMECAST_CLIENT_SECRET" | "DD_API_KEY").then(|| "-".to_owned())
        })
    };
    config::load(path, &placeholder)
        .map(|l| l.config)
        .map_err(|e| Failure { code: exit::CONFIG, message: e.to_string() })
}

/// Opens the configured queue, which must exist already; says why not and gives back the exit code.
fn open_queue(cfg: &Config, read_only: bool) -> Result<Store, Failure> {
    let path = &cfg.queue.path;
    if !path.exists() {
        if let Some(refused) = crate::store::not_to_create(path) {
            return Err(Failure { code: exit::SOFTWARE, message: refused.to_string() });
        }
        let message = format!("no queue database at {} yet: `mimecast-forwarder run` creates it", path.display());
        return Err(Failure { code: exit::NO_INPUT, message });
    }
    let store = if read_only { Store::open_read_only(path) } else { Store::open(path) };
    store.map_err(|e| Failure { code: exit::SOFTWARE, message: e.to_string() })
}

/// `status`. With `--json`, stdout holds one JSON object whatever happens: the report, or
/// `{"queue": null, "error": "…"}` when there is none to give (the exit code says why, the message is on
/// stderr too), so that a script can always parse what it reads.
pub fn status(path: &Path, json: bool) -> i32 {
    let report = load_queue_config(path).and_then(|cfg| {
        let store = open_queue(&cfg, true)?;
        let now = crate::datetime::now();
        crate::status::gather(&store, &cfg, now)
            .map(|r| r.by_clock(now))
            .map_err(|e| Failure { code: exit::SOFTWARE, message: e.to_string() })
    });
    match report {
        Ok(r) if json => crate::say!("{}", r.to_json()),
        Ok(r) => crate::say!("{}", crate::status::render(&r, crate::datetime::now()).trim_end()),
        Err(failure) => {
            if json {
                crate::say!("{}", serde_json::json!({"queue": null, "error": failure.message}));
            }
            return failure.report();
        }
    }
    exit::OK
}

/// sysexits' EX_DATAERR: `dead-letters requeue` was given ids that are not dead letters.
const DATA_ERR: i32 = 65;

/// `dead-letters list|requeue`. Listing opens the queue read-only; requeueing writes, waiting out the running
/// agent's short transactions (the store's busy timeout). With `--json`, stdout holds one JSON value whatever
/// happens, as for `status`: the list or the requeue's object, or `{"error": "…"}` when the queue cannot be
/// opened (no database, a bad config, a damaged or locked one) or the store fails (the exit code says why, the
/// message is on stderr too).
pub fn dead_letters(path: &Path, action: &DeadLetterAction, json: bool) -> i32 {
    let done = load_queue_config(path).and_then(|cfg| {
        let mut store = open_queue(&cfg, *action == DeadLetterAction::List)?;
        let failed = |e: StoreError| Failure { code: exit::SOFTWARE, message: e.to_string() };
        Ok(match action {
            DeadLetterAction::List => list_dead_letters(&store.dead_letters().map_err(failed)?, json),
            DeadLetterAction::Requeue(ids) => {
                report_requeue(&store.requeue(ids.as_deref(), crate::datetime::now()).map_err(failed)?, json)
            }
        })
    });
    done.unwrap_or_else(|failure| {
        if json {
            crate::say!("{}", serde_json::json!({"error": failure.message}));
        }
        failure.report()
    })
}

fn list_dead_letters(list: &[DeadLetter], json: bool) -> i32 {
    use crate::datetime::rfc3339;
    if json {
        let items: Vec<serde_json::Value> = list
            .iter()
            .map(|d| {
                serde_json::json!({
                    "id": d.id, "feed": d.feed, "key": d.key, "event_time": d.event_time.map(rfc3339),
                    "reason": d.reason, "at": rfc3339(d.at), "bytes": d.bytes,
                })
            })
            .collect();
        crate::say!("{}", serde_json::Value::Array(items));
        return exit::OK;
    }
    if list.is_empty() {
        crate::say!("no dead letters");
        return exit::OK;
    }
    crate::say!("{:>8}  {:<26}  {:<20}  {:>9}  reason", "id", "feed", "refused at", "bytes");
    for d in list {
        // One line each: Datadog's answer may span lines; the JSON form has it whole.
        let reason: String = d.reason.split_whitespace().collect::<Vec<_>>().join(" ");
        let reason = match reason.char_indices().nth(120) {
            Some((cut, _)) => format!("{}…", &reason[..cut]),
            None => reason,
        };
        crate::say!("{:>8}  {:<26}  {:<20}  {:>9}  {reason}", d.id, d.feed, rfc3339(d.at), d.bytes);
    }
    crate::say!(
        "{} dead letter(s); `mimecast-forwarder dead-letters requeue ID…|--all` moves them back into the queue",
        list.len()
    );
    exit::OK
}

fn report_requeue(out: &Requeued, json: bool) -> i32 {
    if json {
        crate::say!("{}", serde_json::json!({"requeued": out.records, "bytes": out.bytes, "not_found": out.not_found}));
    } else {
        crate::say!(
            "requeued {} dead letter(s), {} bytes: `mimecast-forwarder run` sends them (a running service at its \
             next poll)",
            out.records,
            out.bytes
        );
    }
    if out.not_found.is_empty() {
        return exit::OK;
    }
    let ids: Vec<String> = out.not_found.iter().map(i64::to_string).collect();
    eprintln!(
        "no dead letter with id {} (requeued already? see `mimecast-forwarder dead-letters list`)",
        ids.join(", ")
    );
    DATA_ERR
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Command, String> {
        parse(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn parses_the_documented_commands() {
        assert_eq!(p(&["run"]), Ok(Command::Run { config: None, once: false, allow_root: false }));
        assert_eq!(
            p(&["run", "--once", "--config", "/c"]),
            Ok(Command::Run { config: Some("/c".into()), once: true, allow_root: false })
        );
        assert_eq!(p(&["run", "--allow-root"]), Ok(Command::Run { config: None, once: false, allow_root: true }));
        assert_eq!(p(&["check-config", "--connect"]), Ok(Command::CheckConfig { config: None, connect: true }));
        assert_eq!(
            p(&["status", "--json", "--config=/x"]),
            Ok(Command::Status { config: Some("/x".into()), json: true })
        );
        assert_eq!(p(&["demo"]), Ok(Command::Demo));
        assert_eq!(p(&["--version"]), Ok(Command::Version));
        assert_eq!(p(&[]), Ok(Command::Help(USAGE)));
        assert_eq!(p(&["status", "--help"]), Ok(Command::Help(STATUS_HELP)));
        assert_eq!(p(&["help"]), Ok(Command::Help(USAGE)));
        assert_eq!(p(&["help", "run"]), Ok(Command::Help(RUN_HELP)));
        assert_eq!(p(&["help", "dead-letters"]), Ok(Command::Help(DEAD_LETTERS_HELP)));
        assert!(p(&["help", "frobnicate"]).is_err());
        assert!(p(&["help", "run", "status"]).is_err());
        assert!(p(&["run", "--json"]).is_err());
        assert!(p(&["frobnicate"]).is_err());
        assert!(p(&["run", "--config"]).is_err());
    }

    #[test]
    fn demo_help_states_the_demos_time_limit() {
        let limit = format!("within {} s at most", crate::demo::LIMIT.as_secs());
        assert!(DEMO_HELP.contains(&limit), "{DEMO_HELP}");
    }

    #[test]
    fn parses_dead_letters() {
        use DeadLetterAction::{List, Requeue};
        let dl = |config: Option<&str>, action, json| {
            Ok(Command::DeadLetters { config: config.map(PathBuf::from), action, json })
        };
        assert_eq!(p(&["dead-letters", "list"]), dl(None, List, false));
        assert_eq!(p(&["dead-letters", "list", "--json", "--config", "/c"]), dl(Some("/c"), List, true));
        assert_eq!(
            p(&["dead-letters", "requeue", "3", "--config=/c", "7"]),
            dl(Some("/c"), Requeue(Some(vec![3, 7])), false)
        );
        assert_eq!(p(&["dead-letters", "requeue", "--all", "--json"]), dl(None, Requeue(None), true));
        assert_eq!(p(&["dead-letters", "--help"]), Ok(Command::Help(DEAD_LETTERS_HELP)));
        assert_eq!(p(&["dead-letters", "requeue", "--help"]), Ok(Command::Help(DEAD_LETTERS_HELP)));
        for bad in [
            &["dead-letters"][..],
            &["dead-letters", "purge"],
            &["dead-letters", "requeue"],
            &["dead-letters", "requeue", "--json"],
            &["dead-letters", "requeue", "1", "--all"],
            &["dead-letters", "requeue", "x1"],
            &["dead-letters", "requeue", "-1"],
            &["dead-letters", "list", "1"],
            &["dead-letters", "list", "--all"],
            &["status", "--all"],
            &["status", "list"],
        ] {
            assert!(p(bad).is_err(), "{bad:?}");
        }
    }
}
