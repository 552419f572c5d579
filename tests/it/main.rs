//! The integration tests, as one binary: `common` (the rig and the helpers that drive the real binary) is
//! compiled and linked once, and the tests of every module run in one process, in parallel.
//!
//! Against the loopback simulators, in-process: `collect`, `deliver`, `hostile_peers`. Against the real binary:
//! `cli`, `adversity`, `dead_letters`, `health` (the agent's own metrics and service checks, and the shipped
//! dashboard and monitors), `systemd` (the notification protocol, with the test as the service manager). The
//! proof suite: `proof_crash`, `store_props`, `hostile_wire`. And `docs`, which keeps the README's example config
//! and the man page true.

#![allow(clippy::unwrap_used)]

mod common;

mod adversity;
mod cli;
mod collect;
mod dead_letters;
mod deliver;
mod docs;
mod health;
mod hostile_peers;
mod hostile_wire;
mod proof_crash;
mod store_props;
mod systemd;
