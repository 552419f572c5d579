//! argv → config → logging → run → exit code; nothing else.

use std::io::Write;

use mimecast_forwarder::agent::{self, Mode, Tuning};
use mimecast_forwarder::cli::{self, Command};
use mimecast_forwarder::{exit, signals};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // The demo prints its own account of what flows, on stdout; the agent's info lines, and the warnings of the
    // retries the demo makes it meet, would drown it on a terminal (RUST_LOG=warn shows them, on stderr).
    init_logging(if args.first().map(String::as_str) == Some("demo") { "error" } else { "info" });
    let code = match cli::parse(&args) {
        Ok(Command::Help(text)) => {
            mimecast_forwarder::say!("{}", text.trim_end());
            exit::OK
        }
        Ok(Command::Version) => {
            mimecast_forwarder::say!("mimecast-forwarder {}", env!("CARGO_PKG_VERSION"));
            exit::OK
        }
        Ok(Command::Run { config, once, allow_root }) => run(&cli::config_path(config), once, allow_root),
        Ok(Command::CheckConfig { config, connect }) => cli::check_config(&cli::config_path(config), connect),
        Ok(Command::Status { config, json }) => cli::status(&cli::config_path(config), json),
        Ok(Command::DeadLetters { config, action, json }) => {
            cli::dead_letters(&cli::config_path(config), &action, json)
        }
        Ok(Command::Demo) => mimecast_forwarder::demo::run(),
        Err(e) => {
            eprintln!("error: {e}\n\n{}", cli::USAGE);
            64 // EX_USAGE
        }
    };
    std::process::exit(code);
}

fn run(path: &std::path::Path, once: bool, allow_root: bool) -> i32 {
    let cfg = match cli::load_config(path) {
        Ok(c) => c,
        Err(e) => {
            log::error!("config error: {e}");
            return exit::CONFIG;
        }
    };
    match mimecast_forwarder::instance::root_may_use(&cfg.queue.path, &cli::command_line()) {
        Err(refused) if !allow_root => {
            log::error!("{refused}");
            return exit::NO_PERM;
        }
        Err(refused) => log::warn!(
            "running as root on {} (--allow-root), which belongs to {}: give its files back before the service \
             starts again: `{}`",
            refused.file.display(),
            mimecast_forwarder::store::user_of(refused.owner),
            refused.give_back()
        ),
        Ok(()) => {}
    }
    let mode = if once { Mode::Once } else { Mode::Daemon };
    let signals = signals::shutdown().and_then(|stop| {
        let reload = agent::Reload { path: path.to_owned(), signal: signals::Hangups::new()? };
        Ok((stop, reload))
    });
    let result = signals.map_err(anyhow::Error::from).and_then(|(stop, reload)| {
        let notify = mimecast_forwarder::sd_notify::Notifier::from_env();
        smol::block_on(agent::run_with_reload(&cfg, &Tuning::default(), mode, stop, Some(reload), notify))
    });
    match result {
        Ok(outcome) if once && outcome.queued > 0 => {
            log::warn!("{} records remain queued; run again later", outcome.queued);
            exit::TEMP_FAIL
        }
        Ok(outcome) if once && outcome.gave_up => {
            log::error!("the queue is empty, but a feed or the intake gave up during this pass (see above)");
            exit::UNAVAILABLE
        }
        Ok(_) => exit::OK,
        // `--once` by a clock that is not set yet did nothing: try again once it is.
        Err(e) if e.downcast_ref::<agent::ClockUnset>().is_some() => {
            log::error!("{e}");
            exit::TEMP_FAIL
        }
        // Another run holds the queue, or the database stayed locked or the disk full: try again later.
        Err(e)
            if matches!(e.downcast_ref(), Some(mimecast_forwarder::instance::LockError::Held { .. }))
                || e.downcast_ref::<mimecast_forwarder::store::StoreError>().is_some_and(|s| s.is_transient()) =>
        {
            log::error!("{}", mimecast_forwarder::error::describe(e.as_ref()));
            exit::TEMP_FAIL
        }
        Err(e) => {
            log::error!("{}", mimecast_forwarder::error::describe(e.as_ref()));
            exit::SOFTWARE
        }
    }
}

/// env_logger at `info` unless RUST_LOG says otherwise (a level, or `module=level` pairs). Under systemd
/// (JOURNAL_STREAM set) journald adds the time, so lines carry only the syslog priority prefix that journald
/// understands; elsewhere (a terminal, cron mail) they carry the time in UTC, env_logger's own layout.
fn init_logging(default: &str) {
    let mut b = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default));
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        b.format(|buf, record| {
            let prio = match record.level() {
                log::Level::Error => 3,
                log::Level::Warn => 4,
                log::Level::Info => 6,
                _ => 7,
            };
            writeln!(buf, "<{prio}>{}", record.args())
        });
    } else {
        b.format(|buf, record| {
            let time = mimecast_forwarder::datetime::rfc3339(mimecast_forwarder::datetime::now());
            writeln!(buf, "[{time} {:<5} {}] {}", record.level(), record.target(), record.args())
        });
    }
    b.init();
}
