#!/usr/bin/env bash
# The test suite: formatting and lint gates, unit tests, golden tests and the
# namespace integration tests (real engine, real setup, real sockets). Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
# The namespace tests run the real binaries: build them first.
cargo build --workspace --quiet
cargo test --workspace --no-fail-fast -- --test-threads=2 "$@"
