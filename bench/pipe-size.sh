#!/usr/bin/env bash
# Splice pipe size A/B: the engine-splice target with --pipe-size 0 (kernel default,
# 64 KiB), 256 KiB, 512 KiB and 1 MiB, alternating within each round so drift of a
# noisy machine hits every size alike. Writes one JSON + Markdown per size and round
# and OUTDIR/summary.md (engine-splice headline of each scenario, one value per round).
# Usage (as root, release binaries built): bench/pipe-size.sh OUTDIR [ROUNDS] [DURATION]
set -euo pipefail
out=${1:?usage: bench/pipe-size.sh OUTDIR [ROUNDS] [DURATION]}
rounds=${2:-3}
dur=${3:-3s}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
engine=$PWD/target/release/engine
sizes=(0 262144 524288 1048576)
# One wrapper per size, so that bench runs the engine with that --pipe-size.
wrappers=$(mktemp -d)
trap 'rm -rf "$wrappers"' EXIT
for s in "${sizes[@]}"; do
    printf '#!/bin/sh\nexec %s --pipe-size %s "$@"\n' "$engine" "$s" > "$wrappers/engine-$s"
    chmod +x "$wrappers/engine-$s"
done
# PIPE_SIZE_SUMMARY_ONLY=1 re-renders summary.md from the files of an earlier run.
for r in $(seq 1 "$rounds"); do
    [ "${PIPE_SIZE_SUMMARY_ONLY:-0}" = 1 ] && break
    for s in "${sizes[@]}"; do
        RINGRELAY_ENGINE=$wrappers/engine-$s target/release/bench run \
            --scenario tcp-bulk,tcp-crr,tcp-rr --target engine-splice --duration "$dur" \
            --json "$out/$s-r$r.json" --markdown "$out/$s-r$r.md" > "$out/$s-r$r.log" 2>&1
    done
done
# Summary: the engine-splice column (4th field) of every scenario row, per round.
{
    echo "| --pipe-size | scenario | unit | rounds 1..$rounds |"
    echo "|---|---|---|---|"
    for s in "${sizes[@]}"; do
        for r in $(seq 1 "$rounds"); do
            # Headline rows only: | scenario | unit | value | (latency rows have no unit).
            awk -F'|' -v s="$s" '/^\| tcp-/ && NF == 5 { for (i = 2; i <= 4; i++)
                gsub(/^ +| +$/, "", $i); print s "|" $2 "|" $3 "|" $4 }' "$out/$s-r$r.md"
        done
    done | awk -F'|' '{ k = $1 "|" $2 "|" $3;
                        if (c[k]++ == 0) { order[n++] = k; v[k] = $4 } else v[k] = v[k] " / " $4 }
                      END { for (i = 0; i < n; i++) { split(order[i], f, "|");
                            printf "| %s | %s | %s | %s |\n", f[1], f[2], f[3], v[order[i]] } }'
} > "$out/summary.md"
cat "$out/summary.md"
