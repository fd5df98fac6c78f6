//! `setup apply` / `status` / `teardown` against a real router namespace: teardown
//! leaves no rule, policy route or namespace behind, and interception really stops.
//!
//! Needs root; without it each test prints `SKIPPED: <name>: needs root ...`.
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use anyhow::ensure;
use ringrelay_tests::*;

/// Everything in the router that interception consists of, as text.
struct RouterView {
    ruleset: String,
    rules4: String,
    rules6: String,
    routes4: String,
    routes6: String,
}

fn view(rig: &Rig) -> RouterView {
    let r = &rig.lab.router;
    RouterView {
        ruleset: r.sh("nft list ruleset").unwrap(),
        rules4: r.ip(&["-4", "rule", "show"]).unwrap(),
        rules6: r.ip(&["-6", "rule", "show"]).unwrap(),
        routes4: r
            .ip(&["-4", "route", "show", "table", "100"])
            .unwrap_or_default(),
        routes6: r
            .ip(&["-6", "route", "show", "table", "100"])
            .unwrap_or_default(),
    }
}

/// One echo exchange to `dst` from the client namespace.
fn ping(rig: &Rig, dst: SocketAddr) {
    rig.lab
        .client
        .run(move || -> anyhow::Result<()> {
            let mut s = tcp_connect(dst)?;
            s.write_all(b"hi")?;
            s.shutdown(Shutdown::Write)?;
            let mut v = Vec::new();
            s.read_to_end(&mut v)?;
            ensure!(v == b"hi", "echo {v:?}");
            Ok(())
        })
        .unwrap();
}

fn teardown_leaves_nothing(test: &str, backend: Backend) {
    let Some(mut rig) = Rig::start(test, RigConfig::new().backend(backend)) else {
        return;
    };
    let prefix = rig.lab.prefix().to_string();
    let mark_words = match backend {
        Backend::Nft => "table inet ringrelay",
        Backend::Iptables => "RINGRELAY",
    };

    // Applied: everything is there, status agrees, and traffic goes through the engine.
    let status = rig.setup(&["status"]).unwrap();
    assert!(
        status.status.success(),
        "setup status after apply: {}\n{}",
        status.stdout,
        status.stderr
    );
    let on = view(&rig);
    assert!(on.ruleset.contains(mark_words), "{}", on.ruleset);
    assert!(
        on.rules4.contains("fwmark 0x1/0x1 lookup 100"),
        "{}",
        on.rules4
    );
    assert!(
        on.rules6.contains("fwmark 0x1/0x1 lookup 100"),
        "{}",
        on.rules6
    );
    assert!(
        on.routes4.contains("local default dev lo"),
        "{}",
        on.routes4
    );
    assert!(
        on.routes6.contains("local default dev lo"),
        "{}",
        on.routes6
    );
    for family in [Family::V4, Family::V6] {
        let dst = SocketAddr::new(family.server_a(), 5010);
        let srv = TcpServer::echo(&rig.lab.server, dst).unwrap();
        ping(&rig, dst);
        assert_eq!(srv.accepted()[0].peer.ip(), family.router_s(), "{family:?}");
    }
    let accepted = rig.engine_mut().counters().get("accepted");
    assert_eq!(accepted, 2);

    rig.setup(&["teardown"])
        .unwrap()
        .ok("setup teardown")
        .unwrap();
    let off = view(&rig);
    assert!(
        !off.ruleset.to_lowercase().contains("ringrelay"),
        "rules left after teardown:\n{}",
        off.ruleset
    );
    assert!(!off.rules4.contains("fwmark"), "{}", off.rules4);
    assert!(!off.rules6.contains("fwmark"), "{}", off.rules6);
    assert!(off.routes4.trim().is_empty(), "table 100: {}", off.routes4);
    assert!(off.routes6.trim().is_empty(), "table 100: {}", off.routes6);
    // Forwarding itself still works, now without the engine (it is still running).
    for family in [Family::V4, Family::V6] {
        let dst = SocketAddr::new(family.server_b(), 5011);
        let srv = TcpServer::echo(&rig.lab.server, dst).unwrap();
        ping(&rig, dst);
        assert_eq!(srv.accepted()[0].peer.ip(), family.client(), "{family:?}");
    }
    assert_eq!(rig.engine_mut().counters().get("accepted"), accepted);
    // Status now reports "not ready" (exit 1), and a second teardown is harmless.
    let status = rig.setup(&["status"]).unwrap();
    assert_eq!(status.status.code(), Some(1), "{}", status.stdout);
    rig.setup(&["teardown"])
        .unwrap()
        .ok("second teardown")
        .unwrap();

    drop(rig);
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(
        !list.lines().any(|l| l.starts_with(&prefix)),
        "namespaces of {prefix} left:\n{list}"
    );
}

#[test]
fn setup_teardown_leaves_nothing_nft() {
    teardown_leaves_nothing("setup_teardown_leaves_nothing_nft", Backend::Nft);
}

#[test]
fn setup_teardown_leaves_nothing_iptables() {
    teardown_leaves_nothing("setup_teardown_leaves_nothing_iptables", Backend::Iptables);
}

/// One echo exchange to `dst` from the client, with a short connect timeout; `Err`
/// when the connection does not get through.
fn try_ping(rig: &Rig, dst: SocketAddr) -> anyhow::Result<()> {
    rig.lab.client.run(move || -> anyhow::Result<()> {
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"hi")?;
        s.shutdown(Shutdown::Write)?;
        let mut v = Vec::new();
        s.read_to_end(&mut v)?;
        ensure!(v == b"hi", "echo {v:?}");
        Ok(())
    })
}

/// `setup status` in the router: (exit code, stdout).
fn status(rig: &Rig) -> (i32, String) {
    let out = rig.setup(&["status"]).unwrap();
    (out.status.code().unwrap_or(-1), out.stdout)
}

/// What status says matches what traffic does: exit 3 exactly while intercepted flows
/// miss the engine (no engine: forwarded untouched; src_valid_mark=1: dropped as
/// martians), 0 once they reach it. Status used to say "ready" in both cases.
#[test]
fn setup_status_matches_what_traffic_does() {
    let test = "setup_status_matches_what_traffic_does";
    let Some(mut rig) = Rig::start(test, RigConfig::new().without_engine()) else {
        return;
    };
    // Rules in place, no engine: fail-open forwards the flow untouched.
    let (code, text) = status(&rig);
    assert_eq!(code, 3, "{text}");
    assert!(
        text.contains("BLOCKED: nothing listens on TCP port 15001 (IPv4 and IPv6) in this network namespace: intercepted traffic is forwarded untouched (fail-open), not relayed"),
        "{text}"
    );
    let dst = SocketAddr::new(Family::V4.server_a(), 5020);
    let srv = TcpServer::echo(&rig.lab.server, dst).unwrap();
    ping(&rig, dst);
    assert_eq!(
        srv.accepted()[0].peer.ip(),
        Family::V4.client(),
        "bypassed the engine"
    );

    // The engine starts: ready, and the flow is relayed.
    let cores = rig.config.cores.clone();
    rig.engine = Some(rig.start_engine(&cores, &[]).unwrap());
    let (code, text) = status(&rig);
    assert_eq!(code, 0, "{text}");
    ping(&rig, dst);
    assert_eq!(
        srv.accepted()[1].peer.ip(),
        Family::V4.router_s(),
        "relayed"
    );

    // A VPN tool sets src_valid_mark: intercepted IPv4 vanishes before the engine.
    rig.lab
        .router
        .sysctl("net.ipv4.conf.all.src_valid_mark", "1")
        .unwrap();
    let (code, text) = status(&rig);
    assert_eq!(code, 3, "{text}");
    assert!(
        text.contains("BLOCKED: src_valid_mark=1 (net.ipv4.conf.all.src_valid_mark)"),
        "{text}"
    );
    let accepted = rig.engine_mut().counters().get("accepted");
    assert!(
        try_ping(&rig, dst).is_err(),
        "got through with src_valid_mark=1"
    );
    assert_eq!(rig.engine_mut().counters().get("accepted"), accepted);
    // IPv6 has no src_valid_mark: still relayed.
    let dst6 = SocketAddr::new(Family::V6.server_a(), 5021);
    let srv6 = TcpServer::echo(&rig.lab.server, dst6).unwrap();
    ping(&rig, dst6);
    assert_eq!(srv6.accepted()[0].peer.ip(), Family::V6.router_s());

    // The fix status names for a VPN that needs the mark: accept_local on the interface.
    rig.lab
        .router
        .sysctl("net.ipv4.conf.veth-c.accept_local", "1")
        .unwrap();
    rig.lab
        .router
        .sysctl("net.ipv4.conf.veth-s.accept_local", "1")
        .unwrap();
    let (code, text) = status(&rig);
    assert_eq!(code, 0, "{text}");
    try_ping(&rig, dst).unwrap();
    assert_eq!(
        srv.accepted().last().unwrap().peer.ip(),
        Family::V4.router_s()
    );
}

/// The router's own firewall drops input by default: every intercepted flow dies in the
/// input hook the moment the engine starts, while status used to say "ready". Now
/// status exits 3 naming the chain and the rule; `setup apply --accept-input` inserts
/// it and the flows reach the engine; teardown gives the firewall back unchanged.
fn input_firewall(test: &str, backend: Backend, firewall: &str, listing: &str, fix: &str) {
    let Some(mut rig) = Rig::start(test, RigConfig::new().backend(backend)) else {
        return;
    };
    let router = rig.lab.router.clone();
    router.sh(firewall).unwrap();
    let fw_before = router.sh(listing).unwrap();

    let (code, text) = status(&rig);
    assert_eq!(code, 3, "{text}");
    assert!(text.contains(fix), "wanted {fix:?} in:\n{text}");
    let accepted = rig.engine_mut().counters().get("accepted");
    for family in [Family::V4, Family::V6] {
        let dst = SocketAddr::new(family.server_a(), 5030);
        let _srv = TcpServer::echo(&rig.lab.server, dst).unwrap();
        assert!(
            try_ping(&rig, dst).is_err(),
            "{family:?} got through a policy-drop input chain"
        );
    }
    assert_eq!(rig.engine_mut().counters().get("accepted"), accepted);

    rig.setup(&["apply", "--backend", backend.name(), "--accept-input"])
        .unwrap()
        .ok("setup apply --accept-input")
        .unwrap();
    let (code, text) = status(&rig);
    assert_eq!(code, 0, "{text}");
    for family in [Family::V4, Family::V6] {
        let dst = SocketAddr::new(family.server_a(), 5031);
        let srv = TcpServer::echo(&rig.lab.server, dst).unwrap();
        try_ping(&rig, dst).unwrap();
        assert_eq!(srv.accepted()[0].peer.ip(), family.router_s(), "{family:?}");
    }
    assert_eq!(rig.engine_mut().counters().get("accepted"), accepted + 2);

    rig.setup(&["teardown"])
        .unwrap()
        .ok("setup teardown")
        .unwrap();
    let normalize = |t: &str| -> Vec<String> {
        t.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.split(" [").next().unwrap_or(l).to_string())
            .collect()
    };
    assert_eq!(
        normalize(&router.sh(listing).unwrap()),
        normalize(&fw_before),
        "the firewall changed"
    );
}

#[test]
fn setup_accept_input_lets_flows_through_a_policy_drop_firewall_nft() {
    input_firewall(
        "setup_accept_input_lets_flows_through_a_policy_drop_firewall_nft",
        Backend::Nft,
        "nft -f - <<'EOF'
table inet fw {
	chain input {
		type filter hook input priority filter; policy drop;
		ct state established,related accept
		iifname \"lo\" accept
		tcp dport 22 accept
	}
}
EOF",
        "nft list table inet fw",
        "BLOCKED: nft chain inet fw input (input hook) drops intercepted packets (IPv4 TCP, IPv4 UDP, IPv6 TCP, IPv6 UDP on every intercepted interface) at `policy drop`: TPROXY delivers them through the input hook, so they never reach the engine; fix: `nft insert rule inet fw input 'meta mark & 0x1 == 0x1 accept'`, or re-run `setup apply --accept-input`",
    );
}

#[test]
fn setup_accept_input_lets_flows_through_a_policy_drop_firewall_iptables() {
    input_firewall(
        "setup_accept_input_lets_flows_through_a_policy_drop_firewall_iptables",
        Backend::Iptables,
        "for t in iptables ip6tables; do $t -A INPUT -i lo -j ACCEPT && $t -A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT && $t -A INPUT -p tcp --dport 22 -j ACCEPT && $t -P INPUT DROP || exit 1; done",
        "iptables-save -t filter; ip6tables-save -t filter",
        "BLOCKED: iptables filter chain INPUT (input hook) drops intercepted packets (IPv4 TCP, IPv4 UDP on every intercepted interface) at `policy drop`: TPROXY delivers them through the input hook, so they never reach the engine; fix: `iptables -I INPUT -m mark --mark 0x1/0x1 -j ACCEPT`",
    );
}
