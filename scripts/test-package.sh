#!/usr/bin/env bash
# The package test: builds the .deb (scripts/package.sh), checks what is in it,
# installs it with dpkg, runs the installed binaries, checks the man pages and that
# the units are in place but neither enabled nor started, checks that an edited
# conffile survives a reinstall, and purges the package again so the machine is left
# as it was found (also when a check fails or the run is interrupted).
#
# Needs root and dpkg. Prints `SKIPPED: ...` and exits 0 instead when it cannot run,
# or when a ringrelay package or any of its files is already on the machine (it would
# replace them, and the purge would remove them).
set -euo pipefail
cd "$(dirname "$0")/.."

start=$SECONDS
say() { echo "package test: $*"; }
skip() {
    echo "SKIPPED: package test: $*"
    exit 0
}
fail() {
    echo "package test: FAILED: $*" >&2
    exit 1
}

[ "$(id -u)" -eq 0 ] || skip "not root (dpkg -i needs it)"
command -v dpkg >/dev/null 2>&1 || skip "no dpkg here (not a Debian-based system)"
status=$(dpkg-query -W -f='${db:Status-Status}' ringrelay 2>/dev/null || true)
if [ -n "$status" ] && [ "$status" != "not-installed" ]; then
    skip "a ringrelay package is already on this machine (dpkg status: $status); not touching it"
fi

deb=$(./scripts/package.sh | tail -n 1)
[ -f "$deb" ] || fail "scripts/package.sh did not print the path of a .deb (got '$deb')"
case "$(basename "$deb")" in
    ringrelay_*_*.deb) ;;
    *) fail "unexpected package file name $deb" ;;
esac
say "built $deb in $((SECONDS - start)) s"

# --- What is in the package -------------------------------------------------------
listing=$(dpkg-deb -c "$deb")
echo "$listing" | sed 's/^/    /'
files=$(echo "$listing" | awk '$1 !~ /^d/ { print substr($6, 2) }')
want=(
    /usr/bin/ringrelay-engine
    /usr/bin/ringrelay-setup
    /lib/systemd/system/ringrelay-engine.service
    /lib/systemd/system/ringrelay-setup.service
    /usr/share/man/man8/ringrelay-engine.8.gz
    /usr/share/man/man8/ringrelay-setup.8.gz
    /etc/default/ringrelay
    /usr/share/doc/ringrelay/copyright
    /usr/share/doc/ringrelay/README.md
    /usr/share/doc/ringrelay/deployment.md
)
if [ -f dist/engine.toml ]; then
    want+=(/etc/ringrelay/engine.toml)
fi
for f in "${want[@]}"; do
    grep -qxF "$f" <<<"$files" || fail "$f is not in the package"
done
for f in /usr/bin/engine /usr/bin/setup; do
    if grep -qxF "$f" <<<"$files"; then fail "$f is in the package: the names collide on PATH"; fi
done
for f in /usr/bin/ringrelay-engine /usr/bin/ringrelay-setup; do
    echo "$listing" | grep -q "^-rwxr-xr-x .* \.$f\$" || fail "$f is not mode 755"
done
for f in "${want[@]}"; do
    case "$f" in *.md | */copyright) continue ;; esac
    if [ -e "$f" ]; then skip "$f already exists on this machine; installing would replace it"; fi
done

control=$(dpkg-deb --ctrl-tarfile "$deb" | tar -t)
for script in preinst postinst prerm postrm; do
    if grep -qx "\./$script" <<<"$control"; then
        fail "the package has a $script script: installing must not enable or start anything"
    fi
done
conffiles=$(dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./conffiles)
grep -qx /etc/default/ringrelay <<<"$conffiles" || fail "/etc/default/ringrelay is not a conffile"
depends=$(dpkg-deb -f "$deb" Depends)
for dep in "nftables | iptables" iproute2 libc6; do
    grep -qF "$dep" <<<"$depends" || fail "Depends lacks $dep: $depends"
done
say "contents, conffiles (${conffiles//$'\n'/ }), Depends ($depends): ok"

# --- Install ----------------------------------------------------------------------
table_before=no
if command -v nft >/dev/null 2>&1 && nft list table inet ringrelay >/dev/null 2>&1; then
    table_before=yes
fi
units_before=$(find /etc/systemd -name 'ringrelay*' 2>/dev/null | sort)

installed=no
cleanup() {
    if [ "$installed" = yes ]; then
        dpkg --purge ringrelay >/dev/null 2>&1 || echo "package test: dpkg --purge ringrelay failed" >&2
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

installed=yes
dpkg -i "$deb" >/dev/null || fail "dpkg -i $deb"
say "installed"

version=$(ringrelay-engine --version) || fail "ringrelay-engine --version"
echo "$version" | sed 's/^/    /'
pkg_version=$(dpkg-deb -f "$deb" Version)
head -n 1 <<<"$version" | grep -q "^engine $pkg_version " ||
    fail "ringrelay-engine --version does not report $pkg_version"
ringrelay-setup --help | grep -q "setup apply" || fail "ringrelay-setup --help"
ringrelay-setup --version | grep -qx "setup $pkg_version" || fail "ringrelay-setup --version"
ringrelay-setup apply --dry-run >/dev/null || fail "ringrelay-setup apply --dry-run"
say "ringrelay-engine --version, ringrelay-setup --help / --version / apply --dry-run: ok"

if grep -rqs '^path-exclude.*/usr/share/man' /etc/dpkg/dpkg.cfg.d/; then
    echo "SKIPPED: package test: man pages: dpkg excludes /usr/share/man here (path-exclude in /etc/dpkg/dpkg.cfg.d); they are in the package"
else
    for page in ringrelay-engine ringrelay-setup; do
        [ -f "/usr/share/man/man8/$page.8.gz" ] || fail "/usr/share/man/man8/$page.8.gz missing"
        if command -v man >/dev/null 2>&1; then
            where=$(man -w "$page") || fail "man -w $page"
            [ "$where" = "/usr/share/man/man8/$page.8.gz" ] || fail "man -w $page: $where"
            warnings=$(MANWIDTH=80 man --warnings "$page" 2>&1 >/dev/null)
            [ -z "$warnings" ] || fail "man $page: groff warnings: $warnings"
        fi
    done
    MANWIDTH=80 man ringrelay-setup 2>/dev/null | grep -q "ringrelay-setup apply" ||
        fail "man ringrelay-setup has no apply subsection"
    say "man -w, no groff warnings: ok"
fi

for unit in ringrelay-engine.service ringrelay-setup.service; do
    cmp -s "/lib/systemd/system/$unit" "dist/systemd/$unit" ||
        fail "/lib/systemd/system/$unit differs from dist/systemd/$unit"
    state=$(systemctl is-enabled "$unit" 2>/dev/null || true)
    [ "$state" = disabled ] || fail "$unit is '$state' after install, not disabled"
    if [ -d /run/systemd/system ]; then
        active=$(systemctl is-active "$unit" 2>/dev/null || true)
        [ "$active" = inactive ] || fail "$unit is '$active' after install"
    fi
done
units_after=$(find /etc/systemd -name 'ringrelay*' 2>/dev/null | sort)
[ "$units_after" = "$units_before" ] || fail "install changed /etc/systemd: $units_after"
if command -v systemd-analyze >/dev/null 2>&1; then
    # As installed: the real binary paths, and Documentation=man:... pages that exist.
    out=$(systemd-analyze verify /lib/systemd/system/ringrelay-setup.service \
        /lib/systemd/system/ringrelay-engine.service 2>&1) ||
        fail "systemd-analyze verify of the installed units: $out"
    if grep -qE "Unknown key|Invalid|not found" <<<"$out"; then
        fail "systemd-analyze verify of the installed units: $out"
    fi
fi
# (-f: process names are cut at 15 characters.)
if pgrep -f '^/usr/bin/ringrelay-(engine|setup)( |$)' >/dev/null; then
    fail "a ringrelay process runs after install"
fi
if [ "$table_before" = no ] && command -v nft >/dev/null 2>&1 &&
    nft list table inet ringrelay >/dev/null 2>&1; then
    fail "installing created nft table inet ringrelay"
fi
say "units in place, not enabled, nothing started, no rules installed: ok"

# The conffile: an edit survives reinstalling the same package.
echo 'ENGINE_ARGS="--cores 0"  # package test' >>/etc/default/ringrelay
dpkg -i "$deb" >/dev/null </dev/null || fail "dpkg -i (reinstall)"
grep -q '# package test$' /etc/default/ringrelay || fail "reinstall overwrote the edited /etc/default/ringrelay"
say "edited conffile kept on reinstall: ok"

# --- Purge ------------------------------------------------------------------------
dpkg --purge ringrelay >/dev/null || fail "dpkg --purge ringrelay"
installed=no
for f in "${want[@]}"; do
    [ ! -e "$f" ] || fail "$f still exists after dpkg --purge"
done
status=$(dpkg-query -W -f='${db:Status-Status}' ringrelay 2>/dev/null || true)
[ -z "$status" ] || [ "$status" = not-installed ] || fail "dpkg status after purge: $status"
say "purged, nothing left: ok ($((SECONDS - start)) s in all)"
