#!/usr/bin/env bash
# Builds the Debian package target/debian/ringrelay_<version>_<arch>.deb: the release
# binaries, the man pages (dist/mangen, gzipped), then cargo-deb, which it installs
# first if missing (pinned version below; a one-time build of a few minutes). The
# package's contents are listed in [package.metadata.deb] of engine/Cargo.toml;
# /etc/ringrelay/engine.toml is added when dist/engine.toml exists.
#
# Needs a Rust toolchain, not root. The last line of output is the path of the .deb.
# Installing it (dpkg -i) enables and starts nothing: see docs/deployment.md.
set -euo pipefail
cd "$(dirname "$0")/.."

# 3.8.0: the current cargo-deb, builds with the toolchains we support (1.85+), and
# its `merge-assets` lets the rules-file variant add one file to the base assets.
CARGO_DEB_VERSION=3.8.0

if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
command -v cargo >/dev/null 2>&1 || {
    echo "package: no Rust toolchain: install one with rustup (https://rustup.rs)" >&2
    exit 1
}

# The workspace's target directory (CARGO_TARGET_DIR and .cargo/config.toml included).
target_dir=$(cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
[ -n "$target_dir" ] || { echo "package: cannot find the target directory" >&2; exit 1; }

# Reproducible dates (man pages, file times in the archive): the commit's time.
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
    SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null || date +%s)
    export SOURCE_DATE_EPOCH
fi

echo "package: building release binaries" >&2
cargo build --release --locked --quiet \
    -p ringrelay-engine -p ringrelay-setup -p ringrelay-mangen --bins

echo "package: writing man pages" >&2
man_dir="$target_dir/release/man"
rm -rf "$man_dir"
"$target_dir/release/mangen" "$man_dir" >/dev/null
gzip -9 -n -f "$man_dir"/*.8

if [ "$(cargo deb --version 2>/dev/null)" != "cargo-deb $CARGO_DEB_VERSION" ]; then
    echo "package: installing cargo-deb $CARGO_DEB_VERSION (once; a few minutes)" >&2
    cargo install cargo-deb --version "=$CARGO_DEB_VERSION" --locked --quiet
fi

variant=()
if [ -f dist/engine.toml ]; then
    echo "package: dist/engine.toml found: adding /etc/ringrelay/engine.toml" >&2
    variant=(--variant rules-file)
fi

echo "package: running cargo-deb" >&2
# cargo-deb prints the path of the .deb it wrote on stdout, warnings on stderr (not
# --quiet: it would hide them, e.g. that dpkg-shlibdeps is missing and libc6 with it).
deb=$(cargo deb -p ringrelay-engine --no-build "${variant[@]}")
echo "$deb"
