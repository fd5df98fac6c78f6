#!/usr/bin/env bash
# The main job: builds ringrelay, then builds a client/router/server namespace lab,
# programs the router with `setup`, runs the engine and drives TCP and UDP load
# through it next to kernel forwarding and HAProxy, prints the comparison and
# tears everything down (also on Ctrl-C). Extra arguments go to `bench demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
cargo build --release --workspace --quiet
exec target/release/bench demo "$@"
