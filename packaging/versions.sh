# shellcheck shell=bash
# The packaging tools, the build target and the glibc floor, pinned in one place. packaging/build.sh installs
# these versions when they are missing; .ci/run uses the same through packaging/ci-check.sh, which runs build.sh.
CARGO_DEB_VERSION=3.8.0
CARGO_GENERATE_RPM_VERSION=0.21.1
CARGO_ZIGBUILD_VERSION=0.24.1
# zig, the linker cargo-zigbuild drives, from PyPI's ziglang wheel.
ZIGLANG_VERSION=0.17.1
TARGET=x86_64-unknown-linux-gnu
# The newest glibc symbol version the shipped binary may need. Cargo.toml's deb `depends` says the same
# (`libc6 (>= 2.17)`); the rpm's requirements are read from the binary. ci-check.sh fails on any disagreement.
GLIBC_FLOOR=2.17
