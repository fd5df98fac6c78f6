//! The apply / teardown / status flow against the recording fake runner: which
//! commands are sent, in which order, with which stdin; idempotency; rollback; and
//! bad input that must change nothing. No root needed.

use ringrelay_setup::config::{Backend, Config, FailMode, Source};
use ringrelay_setup::plan::{Family, L4};
use ringrelay_setup::runner::{Event, Output, RecordingRunner};
use ringrelay_setup::sockdiag::{DiagSocket, STATE_CLOSE, STATE_LISTEN};
use ringrelay_setup::state::State;
use ringrelay_setup::{ops, status};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

/// The namespace identity the fake runs in.
const NS: &str = "4026532177-57985-boot";
const RULES_DEFAULT: &str =
    "0:\tfrom all lookup 255\n32766:\tfrom all lookup 254\n32767:\tfrom all lookup 253\n";
const RULES_OURS: &str = "0:\tfrom all lookup 255\n32765:\tfrom all fwmark 0x1/0x1 lookup 100\n32766:\tfrom all lookup 254\n32767:\tfrom all lookup 253\n";
const ROUTE_OURS: &str = "local default dev lo scope host \n";
/// The marker comment of our nft table, as `nft list table` prints it.
const MARKER: &str = "comment \"ringrelay: managed by setup apply, deleted by setup teardown\"";

/// A router with lo, eth0 and eth1; forwarding off; strict rp_filter on all and eth1.
fn fake_host() -> RecordingRunner {
    let r = RecordingRunner::new();
    for (iface, flags) in [("lo", "0x9"), ("eth0", "0x1003"), ("eth1", "0x1003")] {
        r.set_file(&format!("/sys/class/net/{iface}/flags"), flags);
    }
    r.set_file(
        "/proc/self/status",
        "Name:\tsetup\nCapEff:\t000001ffffffffff\n",
    );
    r.set_file("/proc/sys/net/ipv4/ip_forward", "0");
    for iface in ["all", "default", "lo", "eth0", "eth1"] {
        let rp = if iface == "all" || iface == "eth1" {
            "1"
        } else {
            "0"
        };
        r.set_file(&format!("/proc/sys/net/ipv4/conf/{iface}/rp_filter"), rp);
        r.set_file(&format!("/proc/sys/net/ipv4/conf/{iface}/forwarding"), "0");
        r.set_file(
            &format!("/proc/sys/net/ipv4/conf/{iface}/src_valid_mark"),
            "0",
        );
        r.set_file(&format!("/proc/sys/net/ipv6/conf/{iface}/forwarding"), "0");
    }
    r.respond("ip -N rule show", Output::ok(RULES_DEFAULT));
    r.respond("ip -N -6 rule show", Output::ok(RULES_DEFAULT));
    r
}

/// After apply, the fake's `ip` answers show our rules and routes.
fn show_ours(r: &RecordingRunner) {
    r.respond("ip -N rule show", Output::ok(RULES_OURS));
    r.respond("ip -N -6 rule show", Output::ok(RULES_OURS));
    r.respond("ip route show table 100", Output::ok(ROUTE_OURS));
    r.respond("ip -6 route show table 100", Output::ok(ROUTE_OURS));
}

/// A private state directory, removed when the test ends (even on panic).
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn state_path(name: &str) -> (TempDir, PathBuf) {
    let dir = std::env::temp_dir().join(format!("rrsetup-fake-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let path = dir.join("setup.state");
    (TempDir(dir), path)
}

/// Commands that change something (not the listings apply reads).
fn changes(r: &RecordingRunner) -> Vec<String> {
    r.events()
        .iter()
        .filter_map(|e| match e {
            Event::Run(c) => {
                let line = c.to_string();
                let mutating = c.stdin.is_some()
                    || line.contains(" add ")
                    || line.contains(" del ")
                    || line.starts_with("nft delete");
                mutating.then_some(line)
            }
            Event::Write { path, contents } => {
                Some(format!("write {}={}", path.display(), contents.trim_end()))
            }
        })
        .collect()
}

fn stdin_of(r: &RecordingRunner, program: &str) -> Vec<String> {
    r.events()
        .iter()
        .filter_map(|e| match e {
            Event::Run(c) if c.program == program => c.stdin.clone(),
            _ => None,
        })
        .collect()
}

fn golden(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden")
            .join(name),
    )
    .unwrap()
}

#[test]
fn apply_sends_exactly_the_plan_in_order() {
    let r = fake_host();
    let (_dir, path) = state_path("apply");
    let report = ops::apply(&r, &Config::default(), &path, NS).unwrap();
    assert_eq!(
        changes(&r),
        vec![
            "nft -f -",
            "ip rule add fwmark 0x1/0x1 lookup 100 proto 114",
            "ip -6 rule add fwmark 0x1/0x1 lookup 100 proto 114",
            "ip route add local 0.0.0.0/0 dev lo table 100 proto 114",
            "ip -6 route add local ::/0 dev lo table 100 proto 114",
            "write /proc/sys/net/ipv4/ip_forward=1",
            "write /proc/sys/net/ipv6/conf/all/forwarding=1",
            "write /proc/sys/net/ipv4/conf/all/rp_filter=2",
            "write /proc/sys/net/ipv4/conf/eth1/rp_filter=2",
        ]
    );
    // The script sent is the golden one, byte for byte.
    assert_eq!(stdin_of(&r, "nft"), vec![golden("defaults.nft")]);
    let st = State::load(&path).unwrap().unwrap();
    assert_eq!(st.netns, NS);
    assert!(st.rules.iter().all(|x| x.added) && st.routes.iter().all(|x| x.added));
    let originals: Vec<(String, String, String)> = st
        .sysctls
        .iter()
        .map(|s| (s.key.dotted(), s.original.clone(), s.written.clone()))
        .collect();
    assert_eq!(
        originals,
        vec![
            ("net.ipv4.ip_forward".into(), "0".into(), "1".into()),
            (
                "net.ipv6.conf.all.forwarding".into(),
                "0".into(),
                "1".into()
            ),
            ("net.ipv4.conf.all.rp_filter".into(), "1".into(), "2".into()),
            (
                "net.ipv4.conf.eth1.rp_filter".into(),
                "1".into(),
                "2".into()
            ),
        ]
    );
    // Forwarding writes rewrite every interface: their values are kept to restore.
    assert_eq!(st.sysctls[0].side.len(), 4);
    assert!(report
        .warnings
        .iter()
        .any(|w| w.contains("nothing listens on TCP port 15001")));
}

#[test]
fn reapply_changes_nothing_twice() {
    let r = fake_host();
    let (_dir, path) = state_path("reapply");
    ops::apply(&r, &Config::default(), &path, NS).unwrap();
    let first = State::load(&path).unwrap().unwrap();
    show_ours(&r);
    r.clear_events();
    ops::apply(&r, &Config::default(), &path, NS).unwrap();
    // Only the table replacement (one transaction, same text); no rule, route or
    // sysctl is added or written again.
    assert_eq!(changes(&r), vec!["nft -f -"]);
    assert_eq!(stdin_of(&r, "nft"), vec![golden("defaults.nft")]);
    // The originals of the first apply are still the ones teardown restores.
    assert_eq!(State::load(&path).unwrap().unwrap().sysctls, first.sysctls);
}

#[test]
fn teardown_removes_exactly_what_apply_added_and_twice_is_fine() {
    let r = fake_host();
    let (_dir, path) = state_path("teardown");
    ops::apply(&r, &Config::default(), &path, NS).unwrap();
    show_ours(&r);
    r.clear_events();
    ops::teardown(&r, &path, NS).unwrap();
    assert_eq!(
        changes(&r),
        vec![
            "nft -f -",
            "ip rule del fwmark 0x1/0x1 lookup 100",
            "ip -6 rule del fwmark 0x1/0x1 lookup 100",
            "ip route del local 0.0.0.0/0 dev lo table 100",
            "ip -6 route del local ::/0 dev lo table 100",
            "write /proc/sys/net/ipv4/conf/eth1/rp_filter=1",
            "write /proc/sys/net/ipv4/conf/all/rp_filter=1",
            "write /proc/sys/net/ipv6/conf/all/forwarding=0",
            "write /proc/sys/net/ipv4/ip_forward=0",
        ]
    );
    assert_eq!(
        stdin_of(&r, "nft"),
        vec!["# ringrelay: remove the interception table (setup teardown)\ntable inet ringrelay {}\ndelete table inet ringrelay\n"]
    );
    assert!(!path.exists());
    assert_eq!(
        r.file("/proc/sys/net/ipv4/conf/all/rp_filter").unwrap(),
        "1"
    );
    // Second teardown: nothing recorded, nothing to do, not an error.
    let again = ops::teardown(&r, &path, NS).unwrap();
    assert!(again.lines[0].starts_with("no state file"));
}

#[test]
fn teardown_leaves_sysctls_changed_since_apply() {
    let r = fake_host();
    let (_dir, path) = state_path("changed");
    ops::apply(&r, &Config::default(), &path, NS).unwrap();
    show_ours(&r);
    r.set_file("/proc/sys/net/ipv4/conf/all/rp_filter", "0");
    r.clear_events();
    let report = ops::teardown(&r, &path, NS).unwrap();
    assert!(!changes(&r).iter().any(|c| c.contains("conf/all/rp_filter")));
    assert!(report
        .warnings
        .iter()
        .any(|w| w.contains("net.ipv4.conf.all.rp_filter is 0")));
}

#[test]
fn failure_midway_rolls_back_what_was_done() {
    let r = fake_host();
    // Before the add the kernel has nothing; afterwards it shows what apply added.
    r.respond_once("ip -N rule show", Output::ok(RULES_DEFAULT));
    r.respond("ip -N rule show", Output::ok(RULES_OURS));
    r.respond_once("ip -N -6 rule show", Output::ok(RULES_DEFAULT));
    r.respond("ip -N -6 rule show", Output::ok(RULES_OURS));
    r.respond_once("ip route show table 100", Output::ok("")); // preflight
    r.respond_once("ip route show table 100", Output::ok("")); // apply check
    r.respond("ip route show table 100", Output::ok(ROUTE_OURS));
    r.respond(
        "ip -6 route add",
        Output::fail(2, "RTNETLINK answers: No such device\n"),
    );
    let (_dir, path) = state_path("rollback");
    let err = ops::apply(&r, &Config::default(), &path, NS).unwrap_err();
    assert_eq!(
        err.to_string(),
        "`ip -6 route add local ::/0 dev lo table 100 proto 114` failed (exit 2): RTNETLINK answers: No such device; everything apply had changed was rolled back"
    );
    assert_eq!(
        changes(&r),
        vec![
            "nft -f -",
            "ip rule add fwmark 0x1/0x1 lookup 100 proto 114",
            "ip -6 rule add fwmark 0x1/0x1 lookup 100 proto 114",
            "ip route add local 0.0.0.0/0 dev lo table 100 proto 114",
            "ip -6 route add local ::/0 dev lo table 100 proto 114",
            // rollback, newest first
            "ip route del local 0.0.0.0/0 dev lo table 100",
            "ip -6 rule del pref 32765 fwmark 0x1/0x1 lookup 100",
            "ip rule del pref 32765 fwmark 0x1/0x1 lookup 100",
            "nft -f -",
        ]
    );
    assert!(stdin_of(&r, "nft")[1].contains("delete table inet ringrelay"));
    assert!(!path.exists(), "no state file after a failed apply");
}

#[test]
fn sysctl_failure_restores_earlier_sysctls() {
    let r = fake_host();
    r.deny_write("/proc/sys/net/ipv4/conf/eth1/rp_filter");
    let (_dir, path) = state_path("sysctl");
    let err = ops::apply(&r, &Config::default(), &path, NS).unwrap_err();
    assert!(
        err.to_string().starts_with(
            "writing /proc/sys/net/ipv4/conf/eth1/rp_filter: operation not permitted: run as root or with CAP_NET_ADMIN; everything apply had changed was rolled back"
        ),
        "{err}"
    );
    for (key, value) in [
        ("net/ipv4/ip_forward", "0"),
        ("net/ipv6/conf/all/forwarding", "0"),
        ("net/ipv4/conf/all/rp_filter", "1"),
    ] {
        assert_eq!(r.file(&format!("/proc/sys/{key}")).unwrap(), value, "{key}");
    }
    assert!(!path.exists());
}

fn assert_refused_untouched(r: &RecordingRunner, config: &Config, want: &str) {
    let (_dir, path) = state_path("refused");
    let err = ops::apply(r, config, &path, NS).unwrap_err();
    assert_eq!(err.to_string(), want);
    assert_eq!(changes(r), Vec::<String>::new(), "nothing may change");
    assert!(!path.exists());
}

#[test]
fn stale_state_of_a_deleted_namespace_is_ignored() {
    let r = fake_host();
    let (_dir, path) = state_path("stale");
    ops::apply(&r, &Config::default(), &path, NS).unwrap();
    // The namespace is deleted without teardown; a new one gets the same inode and
    // sets forwarding itself. Its teardown must not "restore" ip_forward=0.
    let other = "4026532177-60001-boot";
    r.clear_events();
    let report = ops::teardown(&r, &path, other).unwrap();
    assert!(
        report.lines[0].contains("earlier network namespace"),
        "{report:?}"
    );
    assert!(!changes(&r).iter().any(|c| c.starts_with("write")));
    assert!(!path.exists());
    // And apply in the new namespace records that namespace's own originals.
    ops::apply(&r, &Config::default(), &path, NS).unwrap();
    r.set_file("/proc/sys/net/ipv4/ip_forward", "0");
    let report = ops::apply(&r, &Config::default(), &path, other).unwrap();
    assert!(report
        .warnings
        .iter()
        .any(|w| w.contains("earlier network namespace")));
    assert_eq!(State::load(&path).unwrap().unwrap().netns, other);
}

#[test]
fn bad_input_changes_nothing() {
    let r = fake_host();
    assert_refused_untouched(
        &r,
        &Config {
            in_ifaces: vec!["nosuch0".into()],
            ..Config::default()
        },
        "unknown interface \"nosuch0\" for --in-iface: there is no /sys/class/net/nosuch0 in this network namespace; check the name with `ip link`",
    );

    let r = fake_host();
    r.remove_program("nft");
    assert_refused_untouched(
        &r,
        &Config::default(),
        "nft not found in PATH: install the nftables package, or use --backend iptables",
    );

    let r = fake_host();
    r.remove_program("ip6tables-restore");
    assert_refused_untouched(
        &r,
        &Config {
            backend: Backend::Iptables,
            fail_mode: FailMode::Closed,
            ..Config::default()
        },
        "ip6tables-restore not found in PATH: install the iptables package, or use --backend nft",
    );

    let r = fake_host();
    r.set_file("/proc/self/status", "CapEff:\t0000000000000000\n");
    assert_refused_untouched(
        &r,
        &Config::default(),
        "setup apply: operation not permitted: run as root or with CAP_NET_ADMIN",
    );

    let r = fake_host();
    r.set_file("/sys/class/net/lo/flags", "0x8");
    assert_refused_untouched(
        &r,
        &Config::default(),
        "the loopback interface lo is down, and the interception route `local default dev lo` needs it: run `ip link set lo up`",
    );

    let r = fake_host();
    r.respond(
        "ip route show table 100",
        Output::ok("10.0.0.0/8 via 192.0.2.1 dev eth0 \n"),
    );
    assert_refused_untouched(
        &r,
        &Config::default(),
        "routing table 100 already holds routes that setup did not add (10.0.0.0/8 via 192.0.2.1 dev eth0): marked packets would follow them; pick a free table with --table",
    );
}

#[test]
fn eperm_from_nft_names_the_fix_and_changes_nothing() {
    let r = fake_host();
    r.respond(
        "nft -f -",
        Output::fail(
            1,
            "netlink: Error: cache initialization failed: Operation not permitted\n",
        ),
    );
    let (_dir, path) = state_path("eperm");
    let err = ops::apply(&r, &Config::default(), &path, NS).unwrap_err();
    assert_eq!(
        err.to_string(),
        "`nft -f -`: operation not permitted: run as root or with CAP_NET_ADMIN; nothing was changed"
    );
}

#[test]
fn iptables_backend_sends_golden_input_and_cleans_iptables_nft_tables() {
    let r = fake_host();
    r.respond("iptables -V", Output::ok("iptables v1.8.9 (nf_tables)\n"));
    // iptables-nft has not created the mangle tables yet.
    r.respond(
        "nft list",
        Output::fail(1, "Error: No such file or directory\n"),
    );
    let config = Config {
        backend: Backend::Iptables,
        fail_mode: FailMode::Closed,
        ..Config::default()
    };
    let (_dir, path) = state_path("ipt");
    ops::apply(&r, &config, &path, NS).unwrap();
    assert_eq!(
        stdin_of(&r, "iptables-restore"),
        vec![golden("defaults-v4.ipt")]
    );
    assert_eq!(
        stdin_of(&r, "ip6tables-restore"),
        vec![golden("defaults-v6.ipt")]
    );
    let st = State::load(&path).unwrap().unwrap();
    assert_eq!(st.mangle.len(), 2);
    assert!(st
        .mangle
        .iter()
        .all(|m| !m.table_existed && !m.prerouting_existed));

    // Re-apply with the jump present: no second jump.
    show_ours(&r);
    let saved = "*mangle\n:PREROUTING ACCEPT [0:0]\n:RINGRELAY - [0:0]\n:RINGRELAY_TPROXY - [0:0]\n-A PREROUTING -j RINGRELAY\n-A RINGRELAY -i lo -j RETURN\nCOMMIT\n";
    r.respond("iptables-save -t mangle", Output::ok(saved));
    r.respond("ip6tables-save -t mangle", Output::ok(saved));
    r.clear_events();
    ops::apply(&r, &config, &path, NS).unwrap();
    for input in stdin_of(&r, "iptables-restore") {
        assert!(!input.contains("-I PREROUTING"), "{input}");
    }

    // Teardown: remove jump and chains, then the now-empty tables iptables-nft made.
    r.respond(
        "nft list table ip mangle",
        Output::ok("table ip mangle {\n}\n"),
    );
    r.respond(
        "nft list table ip6 mangle",
        Output::ok("table ip6 mangle {\n}\n"),
    );
    r.respond(
        "nft list chain",
        Output::ok("table ip mangle {\n\tchain PREROUTING {\n\t}\n}\n"),
    );
    r.clear_events();
    ops::teardown(&r, &path, NS).unwrap();
    let ch = changes(&r);
    assert_eq!(
        &ch[..6],
        &[
            "iptables-restore --noflush",
            "nft delete chain ip mangle PREROUTING",
            "nft delete table ip mangle",
            "ip6tables-restore --noflush",
            "nft delete chain ip6 mangle PREROUTING",
            "nft delete table ip6 mangle",
        ]
    );
    assert_eq!(
        stdin_of(&r, "iptables-restore")[0],
        "# ringrelay: remove the interception chains (setup teardown)\n*mangle\n-D PREROUTING -j RINGRELAY\n-F RINGRELAY\n-F RINGRELAY_TPROXY\n-X RINGRELAY\n-X RINGRELAY_TPROXY\nCOMMIT\n"
    );
}

#[test]
fn iptables_tables_that_existed_are_never_deleted() {
    let r = fake_host();
    r.respond("iptables -V", Output::ok("iptables v1.8.9 (nf_tables)\n"));
    r.respond("nft list", Output::ok("table ip mangle {\n}\n"));
    let config = Config {
        backend: Backend::Iptables,
        fail_mode: FailMode::Closed,
        ..Config::default()
    };
    let (_dir, path) = state_path("ipt-existed");
    ops::apply(&r, &config, &path, NS).unwrap();
    r.clear_events();
    ops::teardown(&r, &path, NS).unwrap();
    assert!(!changes(&r).iter().any(|c| c.starts_with("nft delete")));
}

#[test]
fn status_reports_ready_missing_and_conflicts() {
    let r = fake_host();
    let (_dir, path) = state_path("status");
    // Before apply: not ready, and it says why.
    let before = status::status(&r, &path, NS, &Config::default()).unwrap();
    assert!(!before.ready());
    assert!(before.render().contains("MISSING: setup apply has not run"));

    r.respond(
        "nft list table inet ringrelay",
        Output::ok(&format!(
            "table inet ringrelay {{\n\t{MARKER}\n\tchain prerouting {{\n\t}}\n}}\n"
        )),
    );
    ops::apply(&r, &Config::default(), &path, NS).unwrap();
    show_ours(&r);
    r.set_sockets(engine_sockets(15001));
    let ok = status::status(&r, &path, NS, &Config::default()).unwrap();
    assert!(ok.ready(), "{}", ok.render());
    assert!(ok.render().ends_with("ringrelay: ready\n"));

    // Someone edits the table, turns forwarding off, sets src_valid_mark.
    r.respond(
        "nft list table inet ringrelay",
        Output::ok(&format!(
            "table inet ringrelay {{\n\t{MARKER}\n\tchain prerouting {{\n\t\tdrop\n\t}}\n}}\n"
        )),
    );
    r.set_file("/proc/sys/net/ipv4/ip_forward", "0");
    r.set_file("/proc/sys/net/ipv4/conf/all/src_valid_mark", "1");
    r.respond("ip -N -6 rule show", Output::ok(RULES_DEFAULT));
    let bad = status::status(&r, &path, NS, &Config::default()).unwrap();
    let text = bad.render();
    assert!(!bad.ready());
    assert!(text.contains("CONFLICT: nft table inet ringrelay changed since apply (line 4: expected `}`, found `drop`)"), "{text}");
    assert!(
        text.contains("CONFLICT: net.ipv4.ip_forward is 0, needs 1"),
        "{text}"
    );
    assert!(
        text.contains("MISSING: ip -6 rule fwmark 0x1/0x1 lookup 100"),
        "{text}"
    );
    assert!(
        text.contains("BLOCKED: src_valid_mark=1 (net.ipv4.conf.all.src_valid_mark)"),
        "{text}"
    );
    assert!(
        text.ends_with("ringrelay: NOT READY (3 problems)\n"),
        "{text}"
    );
    assert_eq!(bad.exit_code(), status::EXIT_NOT_READY);
}

/// The sockets a running engine has: TCP listeners and UDP sockets on the wildcard
/// address, v4 and v6-only v6, all transparent.
fn engine_sockets(port: u16) -> Vec<DiagSocket> {
    let mut v = Vec::new();
    for (family, addr) in [
        (Family::V4, IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        (Family::V6, IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
    ] {
        for (l4, state) in [(L4::Tcp, STATE_LISTEN), (L4::Udp, STATE_CLOSE)] {
            v.push(DiagSocket {
                family,
                l4,
                state,
                addr,
                port,
                v6only: (family == Family::V6).then_some(true),
                transparent: Some(true),
                inode: 1000 + v.len() as u32,
            });
        }
    }
    v
}

/// Rules in place, but the data path does not end in an engine: exit 3, one BLOCKED
/// line per finding with its fix. Before this check status said "ready" in every case.
#[test]
fn status_exit_3_when_traffic_would_not_reach_an_engine() {
    let r = fake_host();
    let (_dir, path) = state_path("blocked");
    r.respond(
        "nft list table inet ringrelay",
        Output::ok(&format!(
            "table inet ringrelay {{\n\t{MARKER}\n\tchain prerouting {{\n\t}}\n}}\n"
        )),
    );
    ops::apply(&r, &Config::default(), &path, NS).unwrap();
    show_ours(&r);
    let check = |want: u8| {
        let rep = status::status(&r, &path, NS, &Config::default()).unwrap();
        let text = rep.render();
        assert_eq!(rep.exit_code(), want, "{text}");
        text
    };

    // No engine at all.
    r.set_sockets(Vec::new());
    let text = check(status::EXIT_NOT_DELIVERING);
    assert!(text.contains("BLOCKED: nothing listens on TCP port 15001 (IPv4 and IPv6) in this network namespace: intercepted traffic is forwarded untouched (fail-open), not relayed; fix: start the engine in this network namespace: `engine --port 15001`"), "{text}");
    assert!(
        text.contains("BLOCKED: nothing listens on UDP port 15001 (IPv4 and IPv6)"),
        "{text}"
    );
    assert!(text.ends_with("ringrelay: NOT DELIVERING (2 findings): the rules are in place, but intercepted traffic would not reach an engine\n"), "{text}");

    // The engine runs, on another port.
    r.set_sockets(engine_sockets(15002));
    let text = check(status::EXIT_NOT_DELIVERING);
    assert!(text.contains("a transparent TCP socket listens on port 15002 instead: an engine with `--port 15002`? then re-apply with `setup apply --port 15002` or restart it with `--port 15001`"), "{text}");

    // Something else holds the port, without IP_TRANSPARENT.
    let mut plain = engine_sockets(15001);
    plain[0].transparent = Some(false);
    r.set_sockets(plain);
    let text = check(status::EXIT_NOT_DELIVERING);
    assert!(text.contains("BLOCKED: TCP port 15001 (IPv4) is held by a socket without IP_TRANSPARENT (inode 1000)"), "{text}");

    // An engine started with --no-ipv6 (or --no-udp).
    let v4only: Vec<DiagSocket> = engine_sockets(15001)
        .into_iter()
        .filter(|s| s.family == Family::V4)
        .collect();
    r.set_sockets(v4only);
    let text = check(status::EXIT_NOT_DELIVERING);
    assert!(text.contains("nothing listens on TCP port 15001 (IPv6) in this network namespace: intercepted traffic is forwarded untouched (fail-open), not relayed; fix: the engine seems to run with --no-ipv6"), "{text}");
    let tcponly: Vec<DiagSocket> = engine_sockets(15001)
        .into_iter()
        .filter(|s| s.l4 == L4::Tcp)
        .collect();
    r.set_sockets(tcponly);
    let text = check(status::EXIT_NOT_DELIVERING);
    assert!(text.contains("fix: the engine seems to run with --no-udp: restart it without, or stop intercepting UDP with `setup apply --no-udp`"), "{text}");

    // A dual-stack [::] listener serves IPv4 as well.
    let mut dual = engine_sockets(15001);
    dual.retain(|s| s.family == Family::V6);
    for s in &mut dual {
        s.v6only = Some(false);
    }
    r.set_sockets(dual);
    let text = check(status::EXIT_READY);
    assert!(
        text.contains(
            "ok: transparent listeners on port 15001: IPv4 TCP, IPv6 TCP, IPv4 UDP, IPv6 UDP"
        ),
        "{text}"
    );

    // src_valid_mark on an intercepted interface; accept_local lets it through.
    r.set_sockets(engine_sockets(15001));
    r.set_file("/proc/sys/net/ipv4/conf/eth1/src_valid_mark", "1");
    r.set_file("/proc/sys/net/ipv4/conf/all/accept_local", "0");
    r.set_file("/proc/sys/net/ipv4/conf/eth1/accept_local", "0");
    let text = check(status::EXIT_NOT_DELIVERING);
    assert!(text.contains("BLOCKED: src_valid_mark=1 (net.ipv4.conf.eth1.src_valid_mark) on intercepted interfaces eth1: the reverse-path check routes the client's address with the interception mark, finds `local default dev lo` in table 100 and drops intercepted IPv4 packets as martians"), "{text}");
    assert!(
        text.contains("fix: `sysctl -w net.ipv4.conf.eth1.src_valid_mark=0`"),
        "{text}"
    );
    r.set_file("/proc/sys/net/ipv4/conf/eth1/accept_local", "1");
    check(status::EXIT_READY);
}

/// Fail-closed with no engine: status says the traffic is dropped (it used to say ready).
#[test]
fn status_fail_closed_without_engine_says_dropped() {
    let r = fake_host();
    let (_dir, path) = state_path("closed");
    let config = Config {
        fail_mode: FailMode::Closed,
        ..Config::default()
    };
    ops::apply(&r, &config, &path, NS).unwrap();
    show_ours(&r);
    r.set_sockets(Vec::new());
    let rep = status::status(&r, &path, NS, &Config::default()).unwrap();
    assert!(
        rep.render()
            .contains("in this network namespace: intercepted traffic is DROPPED (fail-closed); fix: start the engine"),
        "{}",
        rep.render()
    );
}

/// `--dry-run` shows the input-hook problem, and with `--accept-input` the exact rule
/// it would insert.
#[test]
fn dry_run_shows_the_input_hook_fix() {
    let r = fake_host();
    r.respond(
        "nft list ruleset",
        Output::ok("table ip fw {\n\tchain in {\n\t\ttype filter hook input priority filter; policy drop;\n\t\tiifname \"lo\" accept\n\t}\n}\n"),
    );
    let path = Path::new("/run/ringrelay/x.state");
    let text = ops::dry_run(&r, &Config::default(), path).unwrap();
    assert!(
        text.contains("# NOTE: nft chain ip fw in (input hook) drops intercepted packets (IPv4 TCP, IPv4 UDP on every intercepted interface) at `policy drop`"),
        "{text}"
    );
    let config = Config {
        accept_input: true,
        ..Config::default()
    };
    let text = ops::dry_run(&r, &config, path).unwrap();
    assert!(
        text.contains("nft -f - <<'EOF'\ninsert rule ip fw in meta mark & 0x1 == 0x1 accept comment \"ringrelay: setup apply --accept-input\"\nEOF\n"),
        "{text}"
    );
}

/// A `table inet ringrelay` that setup did not create (no marker, no state) is never
/// replaced: apply refuses naming it, and teardown without a state file leaves it.
#[test]
fn foreign_table_is_refused_and_left_alone() {
    let r = fake_host();
    r.respond(
        "nft list table inet ringrelay",
        Output::ok("table inet ringrelay {\n\tchain mine {\n\t\ttype filter hook input priority 0; policy accept;\n\t}\n}\n"),
    );
    assert_refused_untouched(
        &r,
        &Config::default(),
        "nft table inet ringrelay already exists and setup did not create it (it lacks the comment \"ringrelay: managed by setup apply, deleted by setup teardown\" and no state file records it): apply would replace it and its rules would be lost; rename or move that table, or if it is a leftover of an older setup, delete it with `nft delete table inet ringrelay`",
    );
    let (_dir, path) = state_path("foreign");
    let report = ops::teardown(&r, &path, NS).unwrap();
    assert!(changes(&r).is_empty(), "{:?}", changes(&r));
    assert!(
        report
            .warnings
            .iter()
            .any(|w| w
                .contains("nft table inet ringrelay left alone: it lacks setup's marker comment")),
        "{report:?}"
    );
    let st = status::status(&r, &path, NS, &Config::default()).unwrap();
    assert!(
        st.render()
            .contains("CONFLICT: nft table inet ringrelay exists but setup did not create it"),
        "{}",
        st.render()
    );
    // A table setup installed before it had the marker is its own by the state file.
    let (_dir, path) = state_path("recorded");
    r.respond(
        "nft list table inet ringrelay",
        Output::ok("table inet ringrelay {\n\tchain prerouting {\n\t}\n}\n"),
    );
    r.respond_once(
        "nft list table inet ringrelay",
        Output::fail(1, "Error: No such file or directory\n"),
    );
    ops::apply(&r, &Config::default(), &path, NS).unwrap();
    ops::apply(&r, &Config::default(), &path, NS).unwrap();
}

/// `--source client-ip --in-iface eth1`: the client side is eth1, eth0 faces servers.
fn client_ip(backend: Backend) -> Config {
    Config {
        backend,
        fail_mode: FailMode::default_for(backend),
        in_ifaces: vec!["eth1".into()],
        source: Source::ClientIp,
        ..Config::default()
    }
}

/// The nft listing of a table with the return-path rule (as `nft list` prints it).
fn listing_with_return_path(with_rule: bool) -> String {
    let rule = if with_rule {
        "\t\tiifname != \"eth1\" fib daddr oifname \"eth1\" meta l4proto { icmp, tcp, udp, ipv6-icmp } socket transparent 1 socket wildcard 0 meta mark set meta mark | 0x00000001 accept\n"
    } else {
        ""
    };
    format!("table inet ringrelay {{\n\t{MARKER}\n\tchain prerouting {{\n{rule}\t\tiifname != \"eth1\" return\n\t}}\n}}\n")
}

/// The return path is one more rule in setup's own table: apply sends it in the same
/// transaction, writes no extra sysctl (rp_filter on the server side makes no
/// difference, measured in the lab), records the source, and teardown removes it
/// with the table.
#[test]
fn client_ip_apply_sends_the_return_path_and_teardown_removes_it() {
    let router = {
        let r = fake_host();
        let (_dir, path) = state_path("router-eth1");
        let config = Config {
            in_ifaces: vec!["eth1".into()],
            ..Config::default()
        };
        ops::apply(&r, &config, &path, NS).unwrap();
        changes(&r)
    };
    let r = fake_host();
    let (_dir, path) = state_path("client-ip");
    let report = ops::apply(&r, &client_ip(Backend::Nft), &path, NS).unwrap();
    assert_eq!(changes(&r), router, "the same steps, the same sysctls");
    let script = stdin_of(&r, "nft").remove(0);
    assert!(script.contains("\t\tiifname != \"eth1\" fib daddr oifname \"eth1\" meta l4proto { tcp, udp, icmp, ipv6-icmp } socket transparent 1 socket wildcard 0 meta mark set meta mark | 0x1 accept\n"), "{script}");
    assert!(
        report.lines[0].contains("with the return path of --source client-ip: replies to client addresses arriving on interfaces other than eth1"),
        "{report:?}"
    );
    let st = State::load(&path).unwrap().unwrap();
    assert_eq!(st.config.source, Source::ClientIp);
    assert!(st.plan().firewall.has_return_path());

    // Back to --source router: the same table without the rule.
    show_ours(&r);
    r.clear_events();
    let config = Config {
        source: Source::Router,
        ..client_ip(Backend::Nft)
    };
    ops::apply(&r, &config, &path, NS).unwrap();
    assert_eq!(changes(&r), vec!["nft -f -"]);
    assert!(!stdin_of(&r, "nft")[0]
        .lines()
        .any(|l| !l.trim_start().starts_with('#') && l.contains("socket")));

    ops::apply(&r, &client_ip(Backend::Nft), &path, NS).unwrap();
    r.clear_events();
    ops::teardown(&r, &path, NS).unwrap();
    assert_eq!(
        stdin_of(&r, "nft"),
        vec![ringrelay_setup::nft::teardown_script()]
    );
    assert!(!path.exists());
}

/// iptables: the dispatch becomes a goto and the `-m socket` rules follow it, per
/// family; the golden files hold the whole input.
#[test]
fn client_ip_iptables_sends_golden_input() {
    let r = fake_host();
    r.respond("iptables -V", Output::ok("iptables v1.8.9 (nf_tables)\n"));
    let (_dir, path) = state_path("client-ip-ipt");
    ops::apply(&r, &client_ip(Backend::Iptables), &path, NS).unwrap();
    let v4 = stdin_of(&r, "iptables-restore").remove(0);
    let v6 = stdin_of(&r, "ip6tables-restore").remove(0);
    for (input, icmp) in [(&v4, "icmp"), (&v6, "ipv6-icmp")] {
        assert!(
            input.contains("-A RINGRELAY -i eth1 -g RINGRELAY_TPROXY\n"),
            "{input}"
        );
        for proto in ["tcp", "udp", icmp] {
            let line = format!(
                "-A RINGRELAY -p {proto} -m socket --transparent -j MARK --set-xmark 0x1/0x1\n"
            );
            assert!(input.contains(&line), "{input}");
        }
    }
    assert!(!v4.contains("ipv6-icmp") && !v6.contains("-p icmp "));
}

/// Without --in-iface there is no server side to match replies on: refused before
/// anything changes, naming why and the fix.
#[test]
fn client_ip_without_in_iface_changes_nothing() {
    for source in [Source::ClientIp, Source::Client] {
        let r = fake_host();
        let config = Config {
            source,
            ..Config::default()
        };
        assert_refused_untouched(
            &r,
            &config,
            &format!("--source {} needs --in-iface: the return path matches replies to client addresses on the interfaces clients do not arrive on (the server side); with every interface intercepted there is no such side, and a socket match on the client side breaks port reuse (a SYN that reuses a client port goes to the engine's TIME_WAIT socket, which resets it) and diverts client datagrams to the engine's UDP reply sockets; name the client-side interfaces, e.g. `--in-iface lan0`", source.name()),
        );
        let err = ops::dry_run(&r, &config, Path::new("/run/ringrelay/x.state")).unwrap_err();
        assert!(err.to_string().starts_with("--source"), "{err}");
    }
}

/// status with `--source client-ip`: ok while the rule is there, MISSING (exit 1)
/// with the fix when it is gone, BLOCKED (exit 3) when src_valid_mark would drop the
/// replies on the server side; for iptables per family.
#[test]
fn status_checks_the_return_path() {
    let r = fake_host();
    let (_dir, path) = state_path("status-rp");
    r.respond(
        "nft list table inet ringrelay",
        Output::ok(&listing_with_return_path(true)),
    );
    ops::apply(&r, &client_ip(Backend::Nft), &path, NS).unwrap();
    show_ours(&r);
    r.set_sockets(engine_sockets(15001));
    let rep = status::status(&r, &path, NS, &Config::default()).unwrap();
    let text = rep.render();
    assert_eq!(rep.exit_code(), status::EXIT_READY, "{text}");
    assert!(
        text.contains("ok: applied: backend nft, port 15001, fail-open, source client-ip (state"),
        "{text}"
    );
    assert!(text.contains("ok: return path of --source client-ip: replies to client addresses that arrive on interfaces other than eth1 go to the engine's upstream sockets (nft socket rule in chain prerouting)"), "{text}");

    // The rule is gone (someone deleted it by handle).
    r.respond(
        "nft list table inet ringrelay",
        Output::ok(&listing_with_return_path(false)),
    );
    let rep = status::status(&r, &path, NS, &Config::default()).unwrap();
    let text = rep.render();
    assert_eq!(rep.exit_code(), status::EXIT_NOT_READY, "{text}");
    assert!(text.contains("MISSING: return path of --source client-ip: nft table inet ringrelay has no `socket transparent 1 socket wildcard 0 ... meta mark set` rule, so servers' replies to client addresses are forwarded to the clients or dropped instead of reaching the engine's upstream sockets: no relayed connection or flow gets an answer; fix: re-run `setup apply --source client-ip --in-iface eth1` with the other options of the last apply"), "{text}");

    // src_valid_mark on the server-facing eth0 (not on the intercepted eth1).
    r.respond(
        "nft list table inet ringrelay",
        Output::ok(&listing_with_return_path(true)),
    );
    r.set_file("/proc/sys/net/ipv4/conf/eth0/src_valid_mark", "1");
    r.set_file("/proc/sys/net/ipv4/conf/all/accept_local", "0");
    r.set_file("/proc/sys/net/ipv4/conf/eth0/accept_local", "0");
    let rep = status::status(&r, &path, NS, &Config::default()).unwrap();
    let text = rep.render();
    assert_eq!(rep.exit_code(), status::EXIT_NOT_DELIVERING, "{text}");
    assert!(text.contains("BLOCKED: src_valid_mark=1 (net.ipv4.conf.eth0.src_valid_mark) on server-facing interfaces eth0: the return path of --source client-ip marks servers' replies to client addresses"), "{text}");
    assert!(text.contains("fix: `sysctl -w net.ipv4.conf.eth0.src_valid_mark=0`, or if a VPN needs it, `sysctl -w net.ipv4.conf.IF.accept_local=1` on those interfaces"), "{text}");
    assert!(!text.contains("on intercepted interfaces"), "{text}");
    r.set_file("/proc/sys/net/ipv4/conf/eth0/accept_local", "1");
    let rep = status::status(&r, &path, NS, &Config::default()).unwrap();
    assert_eq!(rep.exit_code(), status::EXIT_READY, "{}", rep.render());

    // Without the return path (--source router) eth0's src_valid_mark is no concern.
    r.set_file("/proc/sys/net/ipv4/conf/eth0/accept_local", "0");
    let config = Config {
        source: Source::Router,
        ..client_ip(Backend::Nft)
    };
    r.respond(
        "nft list table inet ringrelay",
        Output::ok(&listing_with_return_path(false)),
    );
    ops::apply(&r, &config, &path, NS).unwrap();
    let rep = status::status(&r, &path, NS, &Config::default()).unwrap();
    assert_eq!(rep.exit_code(), status::EXIT_READY, "{}", rep.render());
    assert!(!rep.render().contains("return path"), "{}", rep.render());
}

#[test]
fn status_checks_the_return_path_iptables() {
    let r = fake_host();
    r.respond("iptables -V", Output::ok("iptables v1.8.9 (nf_tables)\n"));
    let chains = ":PREROUTING ACCEPT [0:0]\n:RINGRELAY - [0:0]\n:RINGRELAY_TPROXY - [0:0]\n-A PREROUTING -j RINGRELAY\n-A RINGRELAY -i eth1 -g RINGRELAY_TPROXY\n";
    let rp = |icmp: &str| {
        format!("-A RINGRELAY -p tcp -m socket --transparent -j MARK --set-xmark 0x1/0x1\n-A RINGRELAY -p udp -m socket --transparent -j MARK --set-xmark 0x1/0x1\n-A RINGRELAY -p {icmp} -m socket --transparent -j MARK --set-xmark 0x1/0x1\n")
    };
    r.respond(
        "iptables-save -t mangle",
        Output::ok(&format!("*mangle\n{chains}{}COMMIT\n", rp("icmp"))),
    );
    r.respond(
        "ip6tables-save -t mangle",
        Output::ok(&format!("*mangle\n{chains}{}COMMIT\n", rp("ipv6-icmp"))),
    );
    let (_dir, path) = state_path("status-rp-ipt");
    ops::apply(&r, &client_ip(Backend::Iptables), &path, NS).unwrap();
    show_ours(&r);
    r.set_sockets(engine_sockets(15001));
    let rep = status::status(&r, &path, NS, &Config::default()).unwrap();
    let text = rep.render();
    assert_eq!(rep.exit_code(), status::EXIT_READY, "{text}");
    assert!(
        text.contains("(iptables -m socket rules in chain RINGRELAY)"),
        "{text}"
    );
    assert!(
        text.contains("(ip6tables -m socket rules in chain RINGRELAY)"),
        "{text}"
    );

    // The IPv6 UDP rule is gone.
    r.respond(
        "ip6tables-save -t mangle",
        Output::ok(&format!(
            "*mangle\n{chains}{}COMMIT\n",
            rp("ipv6-icmp").replace(
                "-A RINGRELAY -p udp -m socket --transparent -j MARK --set-xmark 0x1/0x1\n",
                ""
            )
        )),
    );
    let rep = status::status(&r, &path, NS, &Config::default()).unwrap();
    let text = rep.render();
    assert_eq!(rep.exit_code(), status::EXIT_NOT_READY, "{text}");
    assert!(text.contains("MISSING: return path of --source client-ip: ip6tables mangle chain RINGRELAY lacks `-A RINGRELAY -p udp -m socket --transparent -j MARK --set-xmark 0x1/0x1`, so servers' replies"), "{text}");
    assert!(text.contains("ok: return path of --source client-ip: replies to client addresses that arrive on interfaces other than eth1 go to the engine's upstream sockets (iptables -m socket rules"), "{text}");
}
