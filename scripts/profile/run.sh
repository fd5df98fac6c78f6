#!/usr/bin/env bash
# Where the proxy core's time goes: runs one bench scenario per target (the bench's
# lab, pinning and receive steering), records the proxy core with `perf record` in
# the middle of the window, and sorts its samples (self time) into kinds of work:
# the kernel's TCP/IP and UDP stack, io_uring, epoll, splice and pipes, copies to
# and from user memory, syscall entry, the scheduler and wakeups, memory
# management, the proxy's own code, and the rest.
#
#   sudo scripts/profile/run.sh                      tcp-rr on engine-splice, engine-copy, haproxy
#   sudo SCENARIO=udp-pps SIZE=64 TARGETS=engine-splice scripts/profile/run.sh
#
# Needs root, perf, and the release binaries (cargo build --release --workspace).
# Prints one table per target (share of the core's samples per kind) and leaves the
# raw `perf report` of each in $OUT (default target/profile).
set -euo pipefail
cd "$(dirname "$0")/../.."
SCENARIO=${SCENARIO:-tcp-rr}
TARGETS=${TARGETS:-engine-splice,engine-copy,haproxy}
CORE=${CORE:-$(( $(nproc) - 1 ))}
SECONDS_RECORDED=${SECONDS_RECORDED:-4}
OUT=${OUT:-target/profile}
[ "$(id -u)" = 0 ] || { echo "profile: needs root (network namespaces, perf -C)" >&2; exit 1; }
command -v perf >/dev/null || { echo "profile: perf missing: apt-get install linux-perf" >&2; exit 1; }
[ -x target/release/bench ] || { echo "profile: target/release/bench missing: cargo build --release --workspace" >&2; exit 1; }
mkdir -p "$OUT"
size_args=()
[ -n "${SIZE:-}" ] && size_args=(--size "$SIZE")
IFS=, read -ra targets <<<"$TARGETS"
window=$(( SECONDS_RECORDED + 8 ))
for t in "${targets[@]}"; do
    target/release/bench run --scenario "$SCENARIO" "${size_args[@]}" --target "$t" \
        --engine-cores "$CORE" --duration "${window}s" --json "$OUT/$t.json" \
        >"$OUT/$t.bench.log" 2>&1 &
    bench=$!
    # Record inside the window: the lab takes a while (wait for the target to be
    # armed), the proxy's start and the ramp about 3 s more; the window is
    # SECONDS_RECORDED + 8 s, so the recording ends well before it does.
    for _ in $(seq 600); do
        grep -q "\[$t\] arming" "$OUT/$t.bench.log" 2>/dev/null && break
        kill -0 "$bench" 2>/dev/null || break
        sleep 0.1
    done
    grep -q "\[$t\] arming" "$OUT/$t.bench.log" || {
        echo "profile: bench for $t never armed it, see $OUT/$t.bench.log" >&2
        exit 1
    }
    sleep 3
    perf record -q -C "$CORE" -o "$OUT/$t.perf.data" -- sleep "$SECONDS_RECORDED" >/dev/null 2>&1
    wait "$bench" || { echo "profile: bench for $t failed, see $OUT/$t.bench.log" >&2; exit 1; }
    perf report -i "$OUT/$t.perf.data" --no-children --sort dso,sym --stdio 2>/dev/null \
        >"$OUT/$t.report.txt"
    echo "== $SCENARIO on $t (core $CORE, ${SECONDS_RECORDED} s; $OUT/$t.report.txt)"
    python3 scripts/profile/kinds.py "$t" <"$OUT/$t.report.txt"
done
