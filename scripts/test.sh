#!/usr/bin/env bash
# The test suite: formatting and lint gates, unit tests, golden tests, the
# namespace integration tests (real engine, real setup, real sockets) and the Debian
# package (built, installed, checked, purged: scripts/test-package.sh). Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
# The namespace tests run the real binaries: build them first.
cargo build --workspace --quiet
cargo test --workspace --no-fail-fast -- --test-threads=2 "$@"
# The TCP and UDP suites again with the io_uring fallbacks an older kernel (6.0)
# gets (no DEFER_TASKRUN, no multishot timeout) and without UDP GSO, as on a route
# that refuses it: every datagram sent on its own (engine/src/core/ring.rs, Features).
if [ $# -eq 0 ]; then
    RINGRELAY_DISABLE=defer-taskrun,multishot-timeout,udp-gso \
        cargo test -p ringrelay-tests --test tcp --test udp -- --test-threads=2
    # The Debian package: build it, install it, check the installed files, purge it.
    ./scripts/test-package.sh
fi
