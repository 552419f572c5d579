#!/usr/bin/env bash
# Builds the .deb and the .rpm: target/debian/*.deb and target/generate-rpm/*.rpm.
# Needs cargo-deb and cargo-generate-rpm (`cargo install --locked cargo-deb cargo-generate-rpm`).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked
cargo deb --no-build
cargo generate-rpm
ls -l target/debian/*.deb target/generate-rpm/*.rpm
