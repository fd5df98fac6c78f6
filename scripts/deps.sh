#!/usr/bin/env bash
# Installs what ringrelay's demo and tests need on a Debian machine, only what is
# missing. Sourced by demo.sh and test.sh; safe to run on its own (as root).
set -euo pipefail

need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "ringrelay: run this as root: network namespaces, nftables and TPROXY need it" >&2
        exit 1
    fi
}

# command -> Debian package that provides it
declare -A PKG=(
    [ip]=iproute2
    [nft]=nftables
    [iptables]=iptables
    [haproxy]=haproxy
    [dnsmasq]=dnsmasq-base
    [dig]=bind9-dnsutils
    [cc]=gcc
    [pkill]=procps
    [systemd-analyze]=systemd
    # The policy tests: a TLS client and server (SNI), an HTTP client (Host).
    [openssl]=openssl
    [curl]=curl
    # promtool validates the engine's /metrics output; the tests also run the
    # prometheus server from the same package (its Debian service is not needed).
    [promtool]=prometheus
    # The package test (scripts/test-package.sh): cargo-deb finds the shared-library
    # dependencies with dpkg-shlibdeps; the installed man pages are checked with man.
    [dpkg-shlibdeps]=dpkg-dev
    [man]=man-db
)

install_missing() {
    local missing=()
    for cmd in "${!PKG[@]}"; do
        command -v "$cmd" >/dev/null 2>&1 || missing+=("${PKG[$cmd]}")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "ringrelay: installing missing packages: ${missing[*]}" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
        # Debian's prometheus package enables and starts a server on :9090; the tests
        # run their own inside a namespace, so switch off the one we just installed.
        if [[ " ${missing[*]} " == *" prometheus "* ]] && [ -d /run/systemd/system ]; then
            systemctl disable --now prometheus.service >/dev/null 2>&1 || true
        fi
    fi
    # Kernel modules some distributions build as modules (built in here).
    for m in nft_tproxy nf_tproxy_ipv4 nf_tproxy_ipv6 nft_socket nft_fib_inet veth; do
        modprobe -q "$m" 2>/dev/null || true
    done
}

check_rust() {
    if ! command -v cargo >/dev/null 2>&1; then
        # rustup puts cargo here; a root login shell may not have it on PATH yet.
        [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
    fi
    if ! command -v cargo >/dev/null 2>&1; then
        echo "ringrelay: no Rust toolchain: install one with rustup (https://rustup.rs), Rust 1.88 or newer" >&2
        exit 1
    fi
    local v
    v=$(rustc --version | awk '{print $2}')
    if [ "$(printf '%s\n1.88.0\n' "$v" | sort -V | head -n1)" != "1.88.0" ]; then
        echo "ringrelay: rustc $v is too old: need 1.88 or newer (rustup update)" >&2
        exit 1
    fi
}

need_root
install_missing
check_rust
