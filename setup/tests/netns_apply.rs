//! End-to-end: the built `setup` binary in a fresh network namespace, for both
//! backends. apply -> status 0 -> apply again (nothing duplicated) -> teardown (every
//! snapshot back to the pre-apply one, foreign objects untouched) -> teardown again
//! (exit 0) -> status non-zero. Needs root; without it each test prints SKIPPED.
//!
//! The iptables tests FAIL (not skip) when iptables is not installed: CI installs it.

use socket2::{Domain, Protocol, Socket, Type};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The setup binary under test: this build's, or `$RINGRELAY_SETUP` (e.g. an older
/// build, to see which tests it fails).
fn setup_bin() -> String {
    std::env::var("RINGRELAY_SETUP").unwrap_or_else(|_| env!("CARGO_BIN_EXE_setup").to_string())
}
static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Effective uid from /proc/self/status (no unsafe `geteuid()` needed).
fn euid() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(u32::MAX)
}

fn need_root(test: &str) -> bool {
    if euid() != 0 {
        // Straight to the stderr handle: libtest captures `eprintln!` of passing
        // tests, and a skip must never look like a silent pass.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: {test}: needs root to create network namespaces"
        );
        return false;
    }
    true
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .env("LC_ALL", "C")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

fn must(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "`{program} {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace deleted on drop, even when the test panics.
struct Netns {
    name: String,
    state_dir: PathBuf,
}

impl Netns {
    fn new() -> Netns {
        let name = format!(
            "rrsetup{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        must("ip", &["netns", "add", &name]);
        let state_dir = std::env::temp_dir().join(format!("{name}-state"));
        let _ = std::fs::remove_dir_all(&state_dir);
        let ns = Netns { name, state_dir };
        // lo up (the IPv6 local route needs it); two veth ends, left down so that no
        // link event changes the snapshots behind our back.
        ns.sh("ip link set lo up && ip link add rrv0 type veth peer name rrv1");
        // Strict rp_filter on all and one interface, so teardown has something to restore.
        ns.sh("echo 1 > /proc/sys/net/ipv4/conf/all/rp_filter && echo 1 > /proc/sys/net/ipv4/conf/rrv0/rp_filter");
        ns
    }

    /// Runs a shell command in the namespace; it must succeed.
    fn sh(&self, script: &str) -> String {
        must("ip", &["netns", "exec", &self.name, "sh", "-c", script])
    }

    /// Runs the built `setup` binary in the namespace.
    fn setup(&self, args: &[&str]) -> Output {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, &setup_bin()])
            .args(args)
            .env("RINGRELAY_STATE_DIR", &self.state_dir)
            .output()
            .expect("run setup");
        eprintln!(
            "--- setup {} -> {:?}\n{}{}",
            args.join(" "),
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn setup_ok(&self, args: &[&str]) -> String {
        let out = self.setup(args);
        assert!(out.status.success(), "setup {} failed", args.join(" "));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn state_files(&self) -> Vec<String> {
        std::fs::read_dir(&self.state_dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Everything apply may touch, normalised (counters and timestamps removed).
    fn snapshot(&self) -> Vec<(&'static str, String)> {
        let parts: [(&'static str, &str); 6] = [
            ("nft list ruleset", "nft list ruleset"),
            ("ip rule", "ip rule"),
            ("ip -6 rule", "ip -6 rule"),
            ("ip route show table all", "ip route show table all"),
            ("ip -6 route show table all", "ip -6 route show table all"),
            (
                "sysctls",
                "for f in /proc/sys/net/ipv4/ip_forward /proc/sys/net/ipv4/conf/*/rp_filter /proc/sys/net/ipv4/conf/*/forwarding /proc/sys/net/ipv4/conf/*/src_valid_mark /proc/sys/net/ipv6/conf/*/forwarding; do echo \"$f=$(cat $f)\"; done",
            ),
        ];
        parts
            .iter()
            .map(|(label, cmd)| (*label, normalize(&self.sh(cmd))))
            .collect()
    }

    /// A snapshot taken twice in a row with the same result.
    fn stable_snapshot(&self) -> Vec<(&'static str, String)> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut last = self.snapshot();
        loop {
            std::thread::sleep(Duration::from_millis(50));
            let now = self.snapshot();
            if now == last || Instant::now() > deadline {
                return now;
            }
            last = now;
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

/// Drops packet/byte counters and comment lines, which change on their own.
fn normalize(text: &str) -> String {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .map(|l| {
            let mut words: Vec<&str> = Vec::new();
            let mut it = l.split_whitespace().peekable();
            while let Some(w) = it.next() {
                if w == "packets" || w == "bytes" {
                    it.next();
                    continue;
                }
                words.push(w);
            }
            words.join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn assert_same(before: &[(&'static str, String)], after: &[(&'static str, String)], when: &str) {
    for ((label, a), (_, b)) in before.iter().zip(after) {
        assert_eq!(
            a, b,
            "{label} differs {when}\n--- before\n{a}\n--- after\n{b}"
        );
    }
}

/// Sockets standing in for the engine: what `nft tproxy` looks up (TCP listeners and
/// UDP sockets on the wildcard address, IPv4 and v6-only IPv6, `IP_TRANSPARENT` unless
/// asked not to). They live in the namespace until dropped.
struct StandIn {
    _sockets: Vec<Socket>,
}

impl StandIn {
    fn engine(ns: &Netns, port: u16) -> StandIn {
        StandIn::new(ns, port, true, &[true, true], &[Type::STREAM, Type::DGRAM])
    }

    /// `families`: [IPv4, IPv6] on or off; `types`: STREAM and/or DGRAM.
    fn new(
        ns: &Netns,
        port: u16,
        transparent: bool,
        families: &[bool; 2],
        types: &[Type],
    ) -> StandIn {
        let path = format!("/run/netns/{}", ns.name);
        let families = *families;
        let types = types.to_vec();
        let sockets = std::thread::spawn(move || -> std::io::Result<Vec<Socket>> {
            let f = std::fs::File::open(&path)?;
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)?;
            let mut v = Vec::new();
            for (on, v6) in families.iter().zip([false, true]) {
                if !on {
                    continue;
                }
                for &ty in &types {
                    let addr: SocketAddr = if v6 {
                        format!("[::]:{port}").parse().unwrap()
                    } else {
                        format!("0.0.0.0:{port}").parse().unwrap()
                    };
                    let proto = if ty == Type::STREAM {
                        Protocol::TCP
                    } else {
                        Protocol::UDP
                    };
                    let s = Socket::new(Domain::for_address(addr), ty, Some(proto))?;
                    if v6 {
                        s.set_only_v6(true)?;
                        s.set_ip_transparent_v6(transparent)?;
                    } else {
                        s.set_ip_transparent_v4(transparent)?;
                    }
                    s.set_reuse_address(true)?;
                    s.bind(&addr.into())?;
                    if ty == Type::STREAM {
                        s.listen(16)?;
                    }
                    v.push(s);
                }
            }
            Ok(v)
        })
        .join()
        .unwrap()
        .expect("stand-in sockets");
        StandIn { _sockets: sockets }
    }
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

fn require_iptables() {
    let out = Command::new("iptables").arg("-V").output();
    match out {
        Ok(o) if o.status.success() => {
            eprintln!("using {}", String::from_utf8_lossy(&o.stdout).trim());
        }
        _ => panic!("iptables is not installed (or `iptables -V` fails): the iptables backend test needs it; install the iptables package"),
    }
}

/// Adds objects that are not ours and must survive apply and teardown.
fn add_foreign(ns: &Netns) {
    ns.sh("nft add table inet foreign && nft add chain inet foreign pre '{ type filter hook prerouting priority 0; policy accept; }' && nft add rule inet foreign pre iifname rrv0 counter");
    ns.sh("ip rule add fwmark 0x8 lookup 200 pref 1000 && ip route add unreachable 203.0.113.0/24 table 200");
}

fn lifecycle(ns: &Netns, apply_args: &[&str]) {
    let before = ns.stable_snapshot();

    ns.setup_ok(apply_args);
    assert_eq!(
        ns.state_files().len(),
        1,
        "one state file, named after the netns"
    );
    assert!(ns.state_files()[0].starts_with("setup-netns-"));
    // Rules in place, no engine: status says the traffic would not reach one (exit 3).
    let status = ns.setup(&["status"]);
    assert_eq!(status.status.code(), Some(3), "status without an engine");
    assert!(String::from_utf8_lossy(&status.stdout)
        .contains("BLOCKED: nothing listens on TCP port 15001"));
    let engine = StandIn::engine(ns, 15001);
    ns.setup_ok(&["status"]);
    let rules = ns.sh("ip rule");
    assert_eq!(count(&rules, "fwmark 0x1/0x1 lookup 100"), 1, "{rules}");
    assert_eq!(count(&ns.sh("ip -6 rule"), "fwmark 0x1/0x1 lookup 100"), 1);
    assert!(ns
        .sh("ip route show table 100")
        .contains("local default dev lo"));
    assert!(ns
        .sh("ip -6 route show table 100")
        .contains("local default dev lo"));
    assert_eq!(ns.sh("cat /proc/sys/net/ipv4/ip_forward").trim(), "1");
    assert_eq!(
        ns.sh("cat /proc/sys/net/ipv4/conf/rrv0/rp_filter").trim(),
        "2"
    );

    let applied = ns.snapshot();
    ns.setup_ok(apply_args);
    let reapplied = ns.snapshot();
    assert_same(
        &applied,
        &reapplied,
        "after applying twice (duplicated rules?)",
    );
    ns.setup_ok(&["status"]);
    drop(engine);

    ns.setup_ok(&["teardown"]);
    assert!(
        ns.state_files().is_empty(),
        "teardown removes the state file"
    );
    assert_same(&before, &ns.snapshot(), "after teardown");

    ns.setup_ok(&["teardown"]);
    let status = ns.setup(&["status"]);
    assert_eq!(
        status.status.code(),
        Some(1),
        "status after teardown must fail"
    );
    assert_same(
        &before,
        &ns.snapshot(),
        "after the second teardown and status",
    );
}

#[test]
fn nft_backend_apply_status_teardown() {
    if !need_root("nft_backend_apply_status_teardown") {
        return;
    }
    let ns = Netns::new();
    add_foreign(&ns);
    lifecycle(&ns, &["apply"]);
    // While applied the table held what the plan says (checked once more here).
    ns.setup_ok(&[
        "apply",
        "--tcp-ports",
        "80,443,8000-8100",
        "--udp-ports",
        "53",
    ]);
    let table = ns.sh("nft list table inet ringrelay");
    assert!(table.contains("tproxy ip to :15001"), "{table}");
    assert!(table.contains("tproxy ip6 to :15001"), "{table}");
    assert!(table.contains("fib daddr type { local, broadcast, anycast, multicast } return"));
    assert!(
        !table.contains("socket"),
        "no socket pre-match (TIME_WAIT trap)"
    );
    assert!(ns
        .sh("nft list table inet foreign")
        .contains("iifname \"rrv0\""));
    ns.setup_ok(&["teardown"]);
}

#[test]
fn iptables_backend_apply_status_teardown() {
    if !need_root("iptables_backend_apply_status_teardown") {
        return;
    }
    require_iptables();
    let ns = Netns::new();
    add_foreign(&ns);
    lifecycle(&ns, &["apply", "--backend", "iptables"]);
}

/// `--source client-ip`: the return path is part of setup's own rules, so the same
/// lifecycle (apply, status, apply again, teardown twice) leaves every snapshot as it
/// was; while applied status checks the rule, and says MISSING (exit 1) with the fix
/// once it is deleted.
fn client_ip_lifecycle(backend: &str, delete_rule: &str, rule_text: &str) {
    let ns = Netns::new();
    add_foreign(&ns);
    let apply = [
        "apply",
        "--backend",
        backend,
        "--source",
        "client-ip",
        "--in-iface",
        "rrv0",
    ];
    let before = ns.stable_snapshot();
    lifecycle(&ns, &apply);

    ns.setup_ok(&apply);
    let listing = ns.sh("nft list ruleset; iptables-save -t mangle; ip6tables-save -t mangle");
    assert!(listing.contains(rule_text), "{listing}");
    {
        let _engine = StandIn::engine(&ns, 15001);
        let st = ns.setup_ok(&["status"]);
        assert!(
            st.contains("ok: applied: backend ") && st.contains(", source client-ip (state"),
            "{st}"
        );
        assert!(
            st.contains("ok: return path of --source client-ip: replies to client addresses that arrive on interfaces other than rrv0 go to the engine's upstream sockets"),
            "{st}"
        );
        ns.sh(delete_rule);
        let out = ns.setup(&["status"]);
        let text = stdout(&out);
        assert_eq!(out.status.code(), Some(1), "{text}");
        assert!(
            text.contains("MISSING: return path of --source client-ip: ")
                && text.contains("fix: re-run `setup apply --source client-ip --in-iface rrv0`"),
            "{text}"
        );
    }
    // A re-apply puts it back; teardown restores the namespace exactly.
    ns.setup_ok(&apply);
    assert!(ns
        .sh("nft list ruleset; iptables-save -t mangle; ip6tables-save -t mangle")
        .contains(rule_text));
    ns.setup_ok(&["teardown"]);
    assert_same(&before, &ns.snapshot(), "after the client-ip teardown");
    assert!(ns.state_files().is_empty());
}

#[test]
fn nft_backend_client_ip_apply_status_teardown() {
    if !need_root("nft_backend_client_ip_apply_status_teardown") {
        return;
    }
    client_ip_lifecycle(
        "nft",
        "h=$(nft -a list chain inet ringrelay prerouting | sed -n 's/.*socket transparent 1.* handle \\([0-9]*\\)$/\\1/p') && [ -n \"$h\" ] && nft delete rule inet ringrelay prerouting handle $h",
        "iifname != \"rrv0\" fib daddr oifname \"rrv0\" meta l4proto { icmp, tcp, udp, ipv6-icmp } socket transparent 1 socket wildcard 0 meta mark set meta mark | 0x00000001 accept",
    );
}

#[test]
fn iptables_backend_client_ip_apply_status_teardown() {
    if !need_root("iptables_backend_client_ip_apply_status_teardown") {
        return;
    }
    require_iptables();
    client_ip_lifecycle(
        "iptables",
        "ip6tables -t mangle -D RINGRELAY -p udp -m socket --transparent -j MARK --set-xmark 0x1/0x1",
        "-A RINGRELAY -p ipv6-icmp -m socket --transparent -j MARK --set-xmark 0x1/0x1",
    );
}

/// `--source client-ip` without `--in-iface`: refused with one line, nothing changed.
#[test]
fn client_ip_without_in_iface_changes_nothing() {
    if !need_root("client_ip_without_in_iface_changes_nothing") {
        return;
    }
    let ns = Netns::new();
    let before = ns.stable_snapshot();
    let out = ns.setup(&["apply", "--source", "client-ip"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("setup: error: --source client-ip needs --in-iface"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert_same(&before, &ns.snapshot(), "after a refused apply");
    assert!(ns.state_files().is_empty());
}

#[test]
fn iptables_backend_keeps_foreign_mangle_rules_and_rules_it_found() {
    if !need_root("iptables_backend_keeps_foreign_mangle_rules_and_rules_it_found") {
        return;
    }
    require_iptables();
    let ns = Netns::new();
    // A mangle rule of someone else, and our ip rule already there before apply.
    ns.sh("iptables -t mangle -A PREROUTING -i rrv0 -j MARK --set-mark 0x8");
    ns.sh("ip6tables -t mangle -A PREROUTING -i rrv0 -j MARK --set-mark 0x8");
    ns.sh("ip rule add fwmark 0x1/0x1 lookup 100");
    let mangle_before = normalize(&ns.sh("iptables-save -t mangle"));
    lifecycle(
        &ns,
        &["apply", "--backend", "iptables", "--tcp-ports", "80,443"],
    );
    assert_eq!(normalize(&ns.sh("iptables-save -t mangle")), mangle_before);
}

#[test]
fn unknown_interface_changes_nothing() {
    if !need_root("unknown_interface_changes_nothing") {
        return;
    }
    let ns = Netns::new();
    let before = ns.stable_snapshot();
    let out = ns.setup(&["apply", "--in-iface", "nosuch0"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("nosuch0"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one clear line: {stderr}");
    assert_same(&before, &ns.snapshot(), "after a refused apply");
    assert!(ns.state_files().is_empty());

    let out = ns.setup(&["apply", "--tcp-ports", "80,,443"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("empty entry in port list"));
    assert_same(&before, &ns.snapshot(), "after a refused port list");
}

/// An operator and a systemd unit (say) run setup at the same moment: the runs take
/// turns on the state directory's lock, so the box ends in the applied state, status
/// is ready, and one teardown restores the snapshot. Without the lock, one run's
/// rollback deleted the table another had just installed and an ip rule outlived
/// teardown.
#[test]
fn concurrent_runs_take_turns() {
    if !need_root("concurrent_runs_take_turns") {
        return;
    }
    let ns = Netns::new();
    let before = ns.stable_snapshot();
    let runs: Vec<Output> = std::thread::scope(|s| {
        let ns = &ns;
        let handles: Vec<_> = (0..4)
            .map(|i| {
                s.spawn(move || {
                    if i == 3 {
                        ns.setup(&["status"])
                    } else {
                        ns.setup(&["apply"])
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, out) in runs.iter().enumerate().take(3) {
        assert!(out.status.success(), "concurrent apply {i} failed");
    }
    // The status ran before, between or after the applies: never an error (exit 2).
    assert_ne!(runs[3].status.code(), Some(2), "concurrent status errored");
    let _engine = StandIn::engine(&ns, 15001);
    ns.setup_ok(&["status"]);
    assert_eq!(count(&ns.sh("ip rule"), "fwmark 0x1/0x1 lookup 100"), 1);
    assert_eq!(count(&ns.sh("ip -6 rule"), "fwmark 0x1/0x1 lookup 100"), 1);
    ns.setup_ok(&["teardown"]);
    assert_same(
        &before,
        &ns.snapshot(),
        "after concurrent applies and teardown",
    );
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Status checks the data path, not just the rules: exit 3 (with the fix) whenever the
/// rules are in place but no engine would get the traffic, 0 only when a transparent
/// socket serves every intercepted protocol and family. It used to exit 0 in all of
/// these cases.
#[test]
fn status_exit_3_unless_an_engine_would_get_the_traffic() {
    if !need_root("status_exit_3_unless_an_engine_would_get_the_traffic") {
        return;
    }
    let ns = Netns::new();
    ns.setup_ok(&["apply", "--fail-closed"]);
    let expect = |code: i32, needle: &str| {
        let out = ns.setup(&["status"]);
        let text = stdout(&out);
        assert_eq!(out.status.code(), Some(code), "{text}");
        assert!(text.contains(needle), "wanted {needle:?} in:\n{text}");
    };
    expect(
        3,
        "BLOCKED: nothing listens on UDP port 15001 (IPv4 and IPv6) in this network namespace: intercepted traffic is DROPPED (fail-closed); fix: start the engine",
    );
    {
        // An engine on the wrong port.
        let _e = StandIn::engine(&ns, 15002);
        expect(3, "a transparent TCP socket listens on port 15002 instead");
    }
    {
        // Something that is not transparent holds the port.
        let _e = StandIn::new(
            &ns,
            15001,
            false,
            &[true, true],
            &[Type::STREAM, Type::DGRAM],
        );
        expect(
            3,
            "BLOCKED: TCP port 15001 (IPv4) is held by a socket without IP_TRANSPARENT",
        );
    }
    {
        // An engine started with --no-ipv6.
        let _e = StandIn::new(
            &ns,
            15001,
            true,
            &[true, false],
            &[Type::STREAM, Type::DGRAM],
        );
        expect(3, "fix: the engine seems to run with --no-ipv6");
    }
    let _e = StandIn::engine(&ns, 15001);
    expect(
        0,
        "ok: transparent listeners on port 15001: IPv4 TCP, IPv6 TCP, IPv4 UDP, IPv6 UDP",
    );
    // A VPN tool sets src_valid_mark: marked packets would vanish as martians.
    ns.sh("echo 1 > /proc/sys/net/ipv4/conf/all/src_valid_mark");
    expect(3, "BLOCKED: src_valid_mark=1 (net.ipv4.conf.all.src_valid_mark) on intercepted interfaces rrv0, rrv1");
    ns.sh("echo 0 > /proc/sys/net/ipv4/conf/all/src_valid_mark");
    expect(0, "ringrelay: ready");
    // Rules missing wins over the data path: exit 1.
    ns.sh("nft delete table inet ringrelay");
    expect(1, "NOT READY");
    ns.setup_ok(&["teardown"]);
}

/// `setup status --help` lists what status uses, not apply's options.
#[test]
fn status_help_lists_no_apply_options() {
    let out = Command::new(setup_bin())
        .args(["status", "--help"])
        .output()
        .unwrap();
    let help = stdout(&out);
    assert!(out.status.success(), "{help}");
    for apply_only in [
        "--port",
        "--tcp-ports",
        "--in-iface",
        "--backend",
        "--fail-closed",
        "--no-ipv6",
        "--dry-run",
        "--accept-input",
    ] {
        assert!(
            !help.contains(apply_only),
            "status --help lists {apply_only}:\n{help}"
        );
    }
    assert!(
        help.contains("3  rules in place, but intercepted traffic would not reach an engine"),
        "{help}"
    );
    let apply = stdout(
        &Command::new(setup_bin())
            .args(["apply", "--help"])
            .output()
            .unwrap(),
    );
    assert!(
        apply.contains("--tcp-ports") && apply.contains("--dry-run"),
        "{apply}"
    );
}

/// A hand-built firewall with `policy drop` on input, as on many routers.
const INPUT_DROP_NFT: &str = "nft -f - <<'EOF'
table inet fw {
	chain input {
		type filter hook input priority filter; policy drop;
		ct state established,related accept
		iifname \"lo\" accept
		tcp dport 22 accept
	}
}
EOF";

/// The box's own input firewall: status says it drops intercepted packets (exit 3)
/// and names the rule; `apply --accept-input` inserts it, status is then ready, a
/// re-apply does not duplicate it, an apply without the option takes it out again,
/// and teardown leaves the firewall exactly as it was.
#[test]
fn input_policy_drop_is_reported_and_accept_input_fixes_it_nft() {
    if !need_root("input_policy_drop_is_reported_and_accept_input_fixes_it_nft") {
        return;
    }
    let ns = Netns::new();
    ns.sh(INPUT_DROP_NFT);
    let before = ns.stable_snapshot();
    let _engine = StandIn::engine(&ns, 15001);

    let out = ns.setup(&["apply"]);
    assert!(out.status.success());
    let fix = "fix: `nft insert rule inet fw input 'meta mark & 0x1 == 0x1 accept'`, or re-run `setup apply --accept-input`";
    let warned = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(warned.contains("setup: warning: nft chain inet fw input (input hook) drops intercepted packets (IPv4 TCP, IPv4 UDP, IPv6 TCP, IPv6 UDP on every intercepted interface) at `policy drop`"), "{warned}");
    assert!(warned.contains(fix), "{warned}");
    let st = ns.setup(&["status"]);
    assert_eq!(st.status.code(), Some(3));
    assert!(stdout(&st)
        .contains("BLOCKED: nft chain inet fw input (input hook) drops intercepted packets"));
    assert!(stdout(&st).contains(fix));

    let out = ns.setup_ok(&["apply", "--accept-input"]);
    assert!(out.contains("nft chain inet fw input: inserted `meta mark & 0x1 == 0x1 accept` at the top (it dropped intercepted packets at `policy drop`)"), "{out}");
    let chain = ns.sh("nft list chain inet fw input");
    let first_rule = chain.lines().nth(3).unwrap_or("").trim().to_string();
    assert!(
        first_rule.starts_with("meta mark & 0x00000001 == 0x00000001 accept"),
        "{chain}"
    );
    let st = ns.setup_ok(&["status"]);
    assert!(
        st.contains("ok: nft chain inet fw input accepts the interception mark"),
        "{st}"
    );

    ns.setup_ok(&["apply", "--accept-input"]);
    assert_eq!(
        count(&ns.sh("nft list chain inet fw input"), "ringrelay"),
        1,
        "no duplicate"
    );

    // Without the option the rule goes again (like every other option's objects).
    ns.setup_ok(&["apply"]);
    assert_eq!(
        count(&ns.sh("nft list chain inet fw input"), "ringrelay"),
        0
    );
    assert_eq!(ns.setup(&["status"]).status.code(), Some(3));

    ns.setup_ok(&["apply", "--accept-input"]);
    let out = ns.setup_ok(&["teardown"]);
    assert!(
        out.contains("nft chain inet fw input: accept rule removed"),
        "{out}"
    );
    assert_same(&before, &ns.snapshot(), "after teardown");
}

/// The same with iptables: `iptables -P INPUT DROP` (legacy or nft variant) and its
/// ip6tables twin; fixed through `iptables -I INPUT ...`.
#[test]
fn input_policy_drop_is_reported_and_accept_input_fixes_it_iptables() {
    if !need_root("input_policy_drop_is_reported_and_accept_input_fixes_it_iptables") {
        return;
    }
    require_iptables();
    let ns = Netns::new();
    ns.sh("iptables -P INPUT DROP && iptables -A INPUT -i lo -j ACCEPT && ip6tables -P INPUT DROP");
    let filter_before = (
        normalize(&ns.sh("iptables-save -t filter")),
        normalize(&ns.sh("ip6tables-save -t filter")),
    );
    let _engine = StandIn::engine(&ns, 15001);

    ns.setup_ok(&["apply", "--backend", "iptables"]);
    let st = ns.setup(&["status"]);
    let text = stdout(&st);
    assert_eq!(st.status.code(), Some(3), "{text}");
    assert!(text.contains("BLOCKED: iptables filter chain INPUT (input hook) drops intercepted packets (IPv4 TCP, IPv4 UDP on every intercepted interface) at `policy drop`"), "{text}");
    assert!(
        text.contains("fix: `iptables -I INPUT -m mark --mark 0x1/0x1 -j ACCEPT`"),
        "{text}"
    );
    assert!(text.contains("BLOCKED: ip6tables filter chain INPUT (input hook) drops intercepted packets (IPv6 TCP, IPv6 UDP"), "{text}");

    let out = ns.setup_ok(&["apply", "--backend", "iptables", "--accept-input"]);
    assert!(
        out.contains(
            "iptables filter chain INPUT: inserted `-m mark --mark 0x1/0x1 -j ACCEPT` at the top"
        ),
        "{out}"
    );
    let saved = ns.sh("iptables-save -t filter");
    let first = saved
        .lines()
        .find(|l| l.starts_with("-A INPUT"))
        .unwrap_or("");
    assert!(
        first.contains("--mark 0x1/0x1") && first.contains("-j ACCEPT"),
        "{saved}"
    );
    ns.setup_ok(&["status"]);
    ns.setup_ok(&["teardown"]);
    assert_eq!(
        (
            normalize(&ns.sh("iptables-save -t filter")),
            normalize(&ns.sh("ip6tables-save -t filter"))
        ),
        filter_before
    );
}

/// Someone else's `table inet ringrelay`: apply refuses (naming the table) and
/// changes nothing, status says why, teardown without a state file leaves it. Before,
/// apply replaced it and the user's rules were gone after teardown.
#[test]
fn foreign_ringrelay_table_is_never_replaced() {
    if !need_root("foreign_ringrelay_table_is_never_replaced") {
        return;
    }
    let ns = Netns::new();
    ns.sh("nft add table inet ringrelay && nft add chain inet ringrelay mine '{ type filter hook input priority 0; policy accept; }' && nft add rule inet ringrelay mine iifname rrv0 counter");
    let before = ns.stable_snapshot();
    let out = ns.setup(&["apply"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nft table inet ringrelay already exists and setup did not create it"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert_same(&before, &ns.snapshot(), "after a refused apply");
    assert!(ns.state_files().is_empty());

    let st = ns.setup(&["status"]);
    assert_eq!(st.status.code(), Some(1));
    assert!(stdout(&st)
        .contains("CONFLICT: nft table inet ringrelay exists but setup did not create it"));

    let out = ns.setup(&["teardown"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("left alone: it lacks setup's marker comment"));
    assert_same(&before, &ns.snapshot(), "after teardown");
    assert!(ns
        .sh("nft list table inet ringrelay")
        .contains("chain mine"));
}

/// Setup's own table is recognised by its marker even when the state file is gone:
/// apply replaces it, teardown without state removes it.
#[test]
fn own_table_is_recognised_without_state() {
    if !need_root("own_table_is_recognised_without_state") {
        return;
    }
    let ns = Netns::new();
    ns.setup_ok(&["apply"]);
    let _ = std::fs::remove_dir_all(&ns.state_dir);
    ns.setup_ok(&["apply"]);
    let _ = std::fs::remove_dir_all(&ns.state_dir);
    let out = ns.setup_ok(&["teardown"]);
    assert!(
        out.contains("leftover table inet ringrelay deleted (it carries setup's marker)"),
        "{out}"
    );
    assert!(ns.sh("nft list tables").trim().is_empty());
}

/// IPv6 disabled by sysctl: apply used to fail half-way (`ip -6 route add` refused,
/// "IPv6 is disabled on nexthop device") with an unclear message. Now it sees it up
/// front, warns, and sets up IPv4 only; status and teardown agree.
#[test]
fn ipv6_disabled_by_sysctl_is_skipped_up_front() {
    if !need_root("ipv6_disabled_by_sysctl_is_skipped_up_front") {
        return;
    }
    let ns = Netns::new();
    ns.sh("echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6");
    let before = ns.stable_snapshot();
    let out = ns.setup(&["apply"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("setup: warning: IPv6 is disabled here (net.ipv6.conf.all.disable_ipv6=1"),
        "{err}"
    );
    assert!(
        err.contains("setting up IPv4 only; pass --no-ipv6 to say so"),
        "{err}"
    );
    assert_eq!(count(&ns.sh("ip -6 rule"), "lookup 100"), 0);
    assert!(!ns.sh("nft list table inet ringrelay").contains("ip6 to"));
    let _engine = StandIn::new(
        &ns,
        15001,
        true,
        &[true, false],
        &[Type::STREAM, Type::DGRAM],
    );
    let st = ns.setup_ok(&["status"]);
    assert!(
        st.contains("ok: IPv4 only: IPv6 is disabled here (net.ipv6.conf.all.disable_ipv6=1"),
        "{st}"
    );
    ns.setup_ok(&["teardown"]);
    assert_same(&before, &ns.snapshot(), "after teardown");
    // And the dry run says the same.
    let dry = ns.setup_ok(&["apply", "--dry-run"]);
    assert!(dry.contains("# NOTE: IPv6 is disabled here"), "{dry}");
}

/// Teardown without the state file (lost, or /run wiped) finds setup's own objects by
/// name and tag and says what it removed: the marked table, the RINGRELAY chains, the
/// ip rules and routes tagged proto 114, the --accept-input rules. It used to leave
/// rules and routes behind without a word.
#[test]
fn teardown_without_state_removes_what_is_setups() {
    if !need_root("teardown_without_state_removes_what_is_setups") {
        return;
    }
    let ns = Netns::new();
    add_foreign(&ns);
    ns.sh("ip rule add fwmark 0x1/0x1 lookup 100 pref 500");
    ns.sh("iptables -P INPUT DROP");
    let before = ns.stable_snapshot();
    for args in [
        &["apply", "--table", "123", "--accept-input"][..],
        &["apply", "--backend", "iptables", "--accept-input"][..],
    ] {
        ns.setup_ok(args);
        let _ = std::fs::remove_dir_all(&ns.state_dir);
        let out = ns.setup_ok(&["teardown"]);
        // With table 100 the IPv4 rule was already there (pref 500, not tagged): apply
        // did not add it, so it is not setup's to remove.
        let v4_rule = if args.contains(&"123") {
            "fwmark 0x1/0x1 lookup 123   (leftover"
        } else {
            "ip -6 rule del pref"
        };
        for removed in [
            v4_rule,
            "ip -6 rule del pref",
            "ip route del local 0.0.0.0/0 dev lo table",
            "ip -6 route del local ::/0 dev lo table",
            "iptables filter chain INPUT: leftover accept rule removed",
            "sysctls (ip_forward, forwarding, rp_filter) are left as they are",
        ] {
            assert!(
                out.contains(removed),
                "{args:?}: wanted {removed:?} in:\n{out}"
            );
        }
        // Everything but the sysctls (whose old values were in the state) is back;
        // iptables-nft's empty mangle tables stay, with a note how to remove them.
        if args.contains(&"iptables") {
            assert!(out.contains("ip mangle: left in place, empty"), "{out}");
            ns.sh("nft delete table ip mangle && nft delete table ip6 mangle");
        }
        let now = ns.snapshot();
        assert_same(&before[..5], &now[..5], "after a teardown without state");
        // The rule that was there before (untagged, same selector) is still there.
        assert!(ns
            .sh("ip rule")
            .contains("500:\tfrom all fwmark 0x1/0x1 lookup 100"));
        let again = ns.setup_ok(&["teardown"]);
        assert!(again.contains("found nothing of setup's"), "{again}");
    }
}

/// Wrappers for `ip` and `nft` in a directory put first in setup's PATH: when their
/// arguments contain `$RR_KILL_AT`, they `kill -9` their parent (setup) before running
/// the real command (`RR_KILL_MODE=before`) or right after it (`after`).
fn kill_wrappers(dir: &std::path::Path) {
    std::fs::create_dir_all(dir).unwrap();
    for prog in ["ip", "nft"] {
        let real = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
            .iter()
            .map(|d| format!("{d}/{prog}"))
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or_else(|| panic!("{prog} not found"));
        let script = format!(
            "#!/bin/sh\ncase \" $* \" in\n  *\" $RR_KILL_AT \"*)\n    if [ \"$RR_KILL_MODE\" = after ]; then {real} \"$@\"; fi\n    kill -9 $PPID\n    exit 1;;\nesac\nexec {real} \"$@\"\n"
        );
        let path = dir.join(prog);
        std::fs::write(&path, script).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

impl Netns {
    /// `setup apply` killed with SIGKILL at the command matching `at`.
    fn killed_apply(&self, wrappers: &std::path::Path, args: &[&str], at: &str, mode: &str) {
        let path = format!(
            "{}:{}",
            wrappers.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let out = Command::new("/usr/sbin/ip")
            .args(["netns", "exec", &self.name, &setup_bin(), "apply"])
            .args(args)
            .env("RINGRELAY_STATE_DIR", &self.state_dir)
            .env("PATH", path)
            .env("RR_KILL_AT", at)
            .env("RR_KILL_MODE", mode)
            .output()
            .expect("run setup");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            out.status.signal(),
            Some(9),
            "setup apply was not killed at {at:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `kill -9` of a real `setup apply` in a namespace, during `ip rule add` (before the
/// rule is in) and during `ip -6 route add` (after the route is in), and during the
/// nft transaction: the next status says so (exit 1), the next teardown leaves the
/// namespace as it was, and the next apply recovers and applies. Before the journal,
/// the nft table (and the rules and routes done so far) stayed behind with no state.
#[test]
fn kill_9_during_apply_is_recovered_in_a_real_namespace() {
    if !need_root("kill_9_during_apply_is_recovered_in_a_real_namespace") {
        return;
    }
    let ns = Netns::new();
    let wrappers = std::env::temp_dir().join(format!("{}-wrappers", ns.name));
    kill_wrappers(&wrappers);
    struct Remove(std::path::PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Remove(wrappers.clone());
    let before = ns.stable_snapshot();
    for (at, mode) in [
        ("rule add", "before"),
        ("-6 route add", "after"),
        ("-f -", "after"),
    ] {
        ns.killed_apply(&wrappers, &[], at, mode);
        let st = ns.setup(&["status"]);
        let text = stdout(&st);
        assert_eq!(st.status.code(), Some(1), "{at}: {text}");
        assert!(
            text.contains("an earlier `setup apply` was interrupted"),
            "{at}: {text}"
        );
        let out = ns.setup_ok(&["teardown"]);
        assert!(
            out.contains("recovered from an interrupted `setup apply`"),
            "{at}: {out}"
        );
        assert_same(
            &before,
            &ns.snapshot(),
            &format!("after a kill at {at:?} and teardown"),
        );
        assert!(ns.state_files().is_empty(), "{at}: {:?}", ns.state_files());

        ns.killed_apply(&wrappers, &[], at, mode);
        let out = ns.setup_ok(&["apply"]);
        assert!(
            out.contains("recovered from an interrupted `setup apply`"),
            "{at}: {out}"
        );
        assert_eq!(
            count(&ns.sh("ip rule"), "fwmark 0x1/0x1 lookup 100"),
            1,
            "{at}"
        );
        assert_eq!(
            count(&ns.sh("ip -6 rule"), "fwmark 0x1/0x1 lookup 100"),
            1,
            "{at}"
        );
        {
            let _engine = StandIn::engine(&ns, 15001);
            ns.setup_ok(&["status"]);
        }
        ns.setup_ok(&["teardown"]);
        assert_same(
            &before,
            &ns.snapshot(),
            &format!("after a kill at {at:?}, apply, teardown"),
        );
    }
    // A kill during a re-apply with other options (the previous apply's state is in
    // place): recovery puts the previous apply's table back and removes the new rules.
    ns.setup_ok(&["apply"]);
    let applied = ns.snapshot();
    ns.killed_apply(
        &wrappers,
        &["--table", "123", "--fail-closed"],
        "-6 route add",
        "before",
    );
    assert_eq!(ns.setup(&["status"]).status.code(), Some(1));
    ns.setup_ok(&["apply"]);
    assert_same(
        &applied,
        &ns.snapshot(),
        "after a killed re-apply and apply",
    );
    ns.setup_ok(&["teardown"]);
    assert_same(&before, &ns.snapshot(), "after the final teardown");
}
