#!/usr/bin/env bash
# The main job: builds ringrelay, then builds a client/router/server namespace lab,
# programs the router with `setup`, runs the engine and drives TCP and UDP load
# through it next to kernel forwarding and HAProxy, prints the comparison and
# tears everything down (also on Ctrl-C). Extra arguments go to `bench demo`.
#
#   ./scripts/demo.sh --installed [ARGS]   the same with the binaries of the installed
#                                          Debian package (/usr/bin/ringrelay-engine,
#                                          /usr/bin/ringrelay-setup); only the bench
#                                          harness is built
#
# RINGRELAY_ENGINE / RINGRELAY_SETUP point the demo at any other engine or setup.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
if [ "${1:-}" = "--installed" ]; then
    shift
    export RINGRELAY_ENGINE=/usr/bin/ringrelay-engine RINGRELAY_SETUP=/usr/bin/ringrelay-setup
    for bin in "$RINGRELAY_ENGINE" "$RINGRELAY_SETUP"; do
        if [ ! -x "$bin" ]; then
            echo "ringrelay: $bin is not installed: build the package with scripts/package.sh and install it with dpkg -i" >&2
            exit 1
        fi
    done
    echo "ringrelay: demo with the installed package: $(dpkg-query -W -f='${Package} ${Version}' ringrelay 2>/dev/null || echo 'not from a package')" >&2
    cargo build --release --quiet -p ringrelay-bench
else
    cargo build --release --workspace --quiet
fi
exec target/release/bench demo "$@"
