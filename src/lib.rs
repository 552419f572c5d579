//! mimecast-forwarder: pulls six Mimecast security log feeds into a durable SQLite queue and drains that queue
//! to Datadog's logs intake, so that nothing is lost while Datadog or the network is down.
//!
//! Modules in reading order:
//! - [`cli`]: argument parsing and the `check-config` and `status` commands.
//! - [`config`]: the TOML file, validated into a [`config::Config`] with redacted secrets.
//! - [`mimecast`]: the six feeds as one table, the wire format, OAuth and the window/page cursor logic.
//! - [`store`]: the SQLite queue, cursors, dead letters and counters.
//! - [`datadog`]: the log object, batch packing, what each intake status means, and sending.
//! - [`policy`]: the agent's decisions as pure state machines (poller, sender, store pressure), table-tested.
//! - [`agent`]: the main loop: reads the clock, feeds the machines events, carries out their actions; [`signals`]
//!   are what stops it and what makes it read the config again; [`sd_notify`] tells systemd it is ready, alive
//!   (the watchdog), what it is doing, and stopping.
//! - [`instance`]: the lock that lets only one `run` use a queue.
//! - [`http`]: the only place ureq is used; [`backoff`] and [`datetime`] are small pure helpers; [`error`] holds
//!   what the error enums share.
//! - [`status`]: the read-only report behind `mimecast-forwarder status`.
//! - [`health`]: the same report as the agent's own metrics and service checks in Datadog.
//! - [`sim`]: loopback simulators of Mimecast and Datadog, used by `demo` and the tests.
//! - [`demo`]: the whole pipeline against the simulators.

#![forbid(unsafe_code)]

/// `println!` that ignores a closed stdout (`status | head -1`) instead of panicking.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

pub mod agent;
pub mod backoff;
pub mod cli;
pub mod config;
pub mod datadog;
pub mod datetime;
pub mod demo;
pub mod error;
pub mod health;
pub mod http;
pub mod instance;
pub mod mimecast;
pub mod policy;
pub mod sd_notify;
pub mod signals;
pub mod sim;
pub mod status;
pub mod store;

/// Exit codes from sysexits.h that packages, systemd and scripts rely on (interface.md).
pub mod exit {
    pub const OK: i32 = 0;
    pub const NO_INPUT: i32 = 66;
    pub const UNAVAILABLE: i32 = 69;
    pub const SOFTWARE: i32 = 70;
    /// EX_NOPERM: root refused to use another user's queue.
    pub const NO_PERM: i32 = 77;
    pub const TEMP_FAIL: i32 = 75;
    pub const CONFIG: i32 = 78;
}
