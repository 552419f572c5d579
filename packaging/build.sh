#!/usr/bin/env bash
# Builds the .deb and the .rpm, target/debian/*.deb and target/generate-rpm/*.rpm, from one release binary linked
# against glibc $GLIBC_FLOOR by cargo-zigbuild, so that they install on older distributions too (README).
# Installs the pinned tools of packaging/versions.sh that are missing or of another version: cargo-deb,
# cargo-generate-rpm and cargo-zigbuild with `cargo install --locked`, and zig from PyPI's ziglang wheel into
# ~/.cache/mimecast-forwarder (pip --target: no Python environment is changed).
# `build.sh --tools` installs the tools and stops there.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=packaging/versions.sh
. packaging/versions.sh

# `cargo install --locked CRATE --version V`, unless the binary CRATE already says it is V.
need() {
    local crate=$1 version=$2
    if ! "$crate" --version 2>/dev/null | grep -qx "$crate $version"; then
        echo "build.sh: installing $crate $version"
        cargo install --locked --quiet "$crate" --version "$version"
    fi
}
need cargo-deb "$CARGO_DEB_VERSION"
need cargo-generate-rpm "$CARGO_GENERATE_RPM_VERSION"
need cargo-zigbuild "$CARGO_ZIGBUILD_VERSION"

zig_dir="${XDG_CACHE_HOME:-$HOME/.cache}/mimecast-forwarder/ziglang-$ZIGLANG_VERSION"
if [ ! -x "$zig_dir/ziglang/zig" ]; then
    echo "build.sh: installing zig $ZIGLANG_VERSION (PyPI ziglang) into $zig_dir"
    if ! python3 -m pip --version >/dev/null 2>&1; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
    fi
    rm -rf "$zig_dir"
    python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$zig_dir" "ziglang==$ZIGLANG_VERSION"
fi
export CARGO_ZIGBUILD_ZIG_PATH="$zig_dir/ziglang/zig"
if [ "${1:-}" = --tools ]; then
    echo "build.sh: cargo-deb $CARGO_DEB_VERSION, cargo-generate-rpm $CARGO_GENERATE_RPM_VERSION," \
        "cargo-zigbuild $CARGO_ZIGBUILD_VERSION, zig $("$CARGO_ZIGBUILD_ZIG_PATH" version)"
    exit 0
fi

# The target's glibc version suffix is cargo-zigbuild's: the binary lands in target/$TARGET/release/, where
# cargo-deb and cargo-generate-rpm look for it when given --target.
cargo zigbuild --release --locked --target "$TARGET.$GLIBC_FLOOR"
# Only this build's packages in the output directories (ci-check.sh installs the one it finds there).
rm -rf target/debian target/generate-rpm
mkdir -p target/man target/generate-rpm
gzip -9n <packaging/mimecast-forwarder.1 >target/man/mimecast-forwarder.1.gz
cargo deb --no-build --target "$TARGET" --output target/debian/
# xz, not the default zstd: every rpm reads xz payloads, while zstd needs an rpm of 4.14 or later built with it.
# target/generate-rpm/ exists (made above): cargo-generate-rpm takes an --output that does not for a file name.
cargo generate-rpm --target "$TARGET" --payload-compress xz --output target/generate-rpm/
ls -l target/debian/*.deb target/generate-rpm/*.rpm
