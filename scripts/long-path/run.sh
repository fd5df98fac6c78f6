#!/usr/bin/env bash
# Downloads over a long path through the engine: what the stall bound
# (--stall-buffer-bytes, grown up to --stall-buffer-max-bytes) costs a single TCP
# download from a server a round trip of 2 x DELAY_MS away, next to kernel forwarding.
# This kernel has no sch_netem: a userspace delay line (delay_line.py) between the
# lab's server namespace and an extra "far" namespace makes the distance.
#
#   sudo scripts/long-path/run.sh            DELAY_MS=10 SECONDS_EACH=8 by default
#
# Needs root and the release binaries (cargo build --release --workspace). Prints
# one line per variant: MB/s overall and in each second, and the engine's
# stall_bounds_raised. Removes everything it made, also on failure or Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/../.."
DELAY_MS=${DELAY_MS:-10}
SECONDS_EACH=${SECONDS_EACH:-8}
[ "$(id -u)" = 0 ] || { echo "long-path: needs root (network namespaces)" >&2; exit 1; }
for b in engine setup bench; do
    [ -x "target/release/$b" ] || { echo "long-path: target/release/$b missing: cargo build --release --workspace" >&2; exit 1; }
done
work=$(mktemp -d)
export RINGRELAY_STATE_DIR=$work/state
mkdir -p "$RINGRELAY_STATE_DIR"
prefix=$(target/release/bench lab up | head -1)
cli=$prefix-cli rtr=$prefix-rtr srv=$prefix-srv far=$prefix-far
pids=()
cleanup() {
    set +e
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
    ip netns exec "$rtr" target/release/setup teardown >/dev/null 2>&1
    ip netns del "$far" 2>/dev/null
    target/release/bench lab down "$prefix" >/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# Waits up to 5 s for a file to exist; fails the run naming what never came up.
wait_for() {
    for _ in $(seq 50); do [ -e "$1" ] && return 0; sleep 0.1; done
    echo "long-path: $2 did not come up within 5 s" >&2
    exit 1
}
tun_a=rrdla$$ tun_b=rrdlb$$
python3 scripts/long-path/delay_line.py "$tun_a" "$tun_b" "$(awk "BEGIN{print $DELAY_MS/1000}")" "$work/delay.ready" &
pids+=($!)
wait_for "$work/delay.ready" "the delay line"
ip netns add "$far"
ip -n "$far" link set lo up
ip link set "$tun_a" netns "$srv"
ip link set "$tun_b" netns "$far"
ip -n "$srv" addr add 10.77.0.1 peer 10.77.0.2 dev "$tun_a"
ip -n "$srv" link set "$tun_a" up
ip -n "$far" addr add 10.77.0.2 peer 10.77.0.1 dev "$tun_b"
ip -n "$far" link set "$tun_b" up
ip -n "$far" route add default dev "$tun_b"
ip netns exec "$srv" sysctl -qw net.ipv4.ip_forward=1
ip -n "$rtr" route add 10.77.0.0/24 via 198.18.1.2
ip netns exec "$far" python3 scripts/long-path/download.py server 10.77.0.2 5201 "$work/server.ready" &
pids+=($!)
wait_for "$work/server.ready" "the far server"

download() { ip netns exec "$cli" python3 scripts/long-path/download.py client 10.77.0.2 5201 "$SECONDS_EACH"; }
echo "long-path: round trip $((2 * DELAY_MS)) ms, ${SECONDS_EACH} s per variant"
echo "kernel forwarding: $(download)"
ip netns exec "$rtr" target/release/setup apply --in-iface veth-c >/dev/null 2>&1
variant() {
    local label=$1; shift
    ip netns exec "$rtr" target/release/engine --cores 1 --port 15001 "$@" >"$work/engine.log" 2>&1 &
    local pid=$!
    pids+=("$pid")
    # Without a ready engine, setup's fail-open rules would let the download through
    # kernel forwarding, and it would be printed under the engine's label.
    for _ in $(seq 50); do grep -q '^ready:' "$work/engine.log" && break; sleep 0.1; done
    grep -q '^ready:' "$work/engine.log" || {
        echo "long-path: $label: the engine did not start:" >&2
        cat "$work/engine.log" >&2
        exit 1
    }
    local rate; rate=$(download)
    kill -USR1 "$pid"; sleep 0.3
    local accepted; accepted=$(awk '$1 == "accepted" {print $NF}' "$work/engine.log" | tail -1)
    [ "${accepted:-0}" -gt 0 ] || {
        echo "long-path: $label: the engine relayed nothing (the download bypassed it)" >&2
        exit 1
    }
    local raised; raised=$(awk '$1 == "stall_bounds_raised" {print $NF}' "$work/engine.log" | tail -1)
    kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
    echo "$label: $rate; stall_bounds_raised ${raised:-0}"
}
variant "engine (default: 64 KiB, grows to 4 MiB)"
variant "engine --stall-buffer-bytes 262144 --stall-buffer-max-bytes 262144 (the old fixed bound)" \
    --stall-buffer-bytes 262144 --stall-buffer-max-bytes 262144
variant "engine --stall-buffer-bytes 65536 --stall-buffer-max-bytes 65536 (fixed)" \
    --stall-buffer-bytes 65536 --stall-buffer-max-bytes 65536
variant "engine --stall-buffer-bytes 0 (kernel autotuning)" --stall-buffer-bytes 0
