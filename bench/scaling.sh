#!/usr/bin/env bash
# Core-scaling check of the engine on a larger machine: the same load through
# `engine --cores 0` and `engine --cores 0-7`, next to kernel forwarding, in one run.
# Usage (as root, release binaries built): bench/scaling.sh OUTDIR [DURATION]
# Needs 16 CPUs: the engine gets 0 or 0-7, clients and servers get 8-15.
set -euo pipefail
out=${1:?usage: bench/scaling.sh OUTDIR [DURATION]}
dur=${2:-3s}
mkdir -p "$out"
cd "$(dirname "$0")/.."
{ uname -r; nproc; grep -m1 'model name' /proc/cpuinfo || true; } > "$out/machine.txt"
# Offline machines: install carried Debian packages when a tool is missing.
if ! command -v nft >/dev/null || ! command -v ip >/dev/null; then
    dpkg -i target/device-debs/*.deb > "$out/dpkg.log" 2>&1 || true
fi
for c in ip nft haproxy; do echo "$c: $(command -v $c || echo missing)"; done >> "$out/machine.txt"
B=target/release/bench
for cores in 0 0-7; do
    tag=cores-${cores}
    $B run --scenario tcp-bulk,tcp-crr,udp-pps --target direct,engine-splice,haproxy \
        --engine-cores "$cores" --load-cores 8-15 --conns 16 --duration "$dur" \
        --json "$out/$tag.json" --markdown "$out/$tag.md" > "$out/$tag.log" 2>&1 || true
done
cat "$out/machine.txt"; tail -n 30 "$out"/*.md
