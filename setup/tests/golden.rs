//! Golden-text tests: the exact nft script and iptables-restore input `setup apply`
//! sends (and `--dry-run` prints) for representative flag sets. No root needed.
//!
//! The goldens live in `tests/golden/`. After an intended change, review the diff and
//! accept it with `UPDATE_GOLDEN=1 cargo test -p ringrelay-setup --test golden`.

use ringrelay_setup::config::{parse_mark, Backend, Config, FailMode, Source};
use ringrelay_setup::ops;
use ringrelay_setup::plan::{build, Family, Plan};
use ringrelay_setup::ports::parse_port_list;
use ringrelay_setup::runner::{Output, RecordingRunner};
use ringrelay_setup::{iptables, nft};
use std::path::{Path, PathBuf};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// Compares `actual` with the golden file, or rewrites it under `UPDATE_GOLDEN=1`.
fn check_golden(name: &str, actual: &str) {
    let path = golden_dir().join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1") {
        std::fs::create_dir_all(golden_dir()).unwrap();
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "golden file {} unreadable ({e}); create it with UPDATE_GOLDEN=1 cargo test -p ringrelay-setup --test golden",
            path.display()
        )
    });
    if expected != actual {
        panic!(
            "rendered text differs from golden file {}\n{}\nIf the change is intended: UPDATE_GOLDEN=1 cargo test -p ringrelay-setup --test golden",
            path.display(),
            line_diff(&expected, actual)
        );
    }
}

/// A small line diff: `-` lines only in the golden, `+` lines only in the output,
/// with the line numbers of both, plus a few lines of context.
fn line_diff(expected: &str, actual: &str) -> String {
    let e: Vec<&str> = expected.lines().collect();
    let a: Vec<&str> = actual.lines().collect();
    // Longest common subsequence table (goldens are small).
    let mut lcs = vec![vec![0usize; a.len() + 1]; e.len() + 1];
    for i in (0..e.len()).rev() {
        for j in (0..a.len()).rev() {
            lcs[i][j] = if e[i] == a[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let mut out = String::from("--- golden\n+++ rendered\n");
    let (mut i, mut j) = (0, 0);
    while i < e.len() || j < a.len() {
        if i < e.len() && j < a.len() && e[i] == a[j] {
            i += 1;
            j += 1;
        } else if i < e.len() && (j == a.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            out.push_str(&format!("-{:>4}: {}\n", i + 1, e[i]));
            i += 1;
        } else {
            out.push_str(&format!("+{:>4}: {}\n", j + 1, a[j]));
            j += 1;
        }
    }
    if expected.ends_with('\n') != actual.ends_with('\n') {
        out.push_str("(final newline differs)\n");
    }
    out
}

fn host_ifaces() -> Vec<String> {
    ["eth0", "eth1", "eth2", "lo"].map(String::from).to_vec()
}

fn plan_of(config: Config) -> Plan {
    config.validate().expect("valid config");
    build(&config, &host_ifaces())
}

fn ports_and_ifaces() -> Config {
    Config {
        tcp: Some(parse_port_list("80,443,8000-8100").unwrap()),
        udp: Some(parse_port_list("53").unwrap()),
        in_ifaces: vec!["eth1".into(), "eth2".into()],
        ..Config::default()
    }
}

fn check_iptables(name: &str, plan: &Plan) {
    for &family in plan.families() {
        let suffix = match family {
            Family::V4 => "v4",
            Family::V6 => "v6",
        };
        check_golden(
            &format!("{name}-{suffix}.ipt"),
            &iptables::render_apply(plan, family, true),
        );
    }
}

#[test]
fn defaults_nft() {
    check_golden(
        "defaults.nft",
        &nft::render_apply(&plan_of(Config::default())),
    );
}

#[test]
fn ports_and_interfaces_nft() {
    check_golden(
        "ports-ifaces.nft",
        &nft::render_apply(&plan_of(ports_and_ifaces())),
    );
}

#[test]
fn fail_closed_nft() {
    let config = Config {
        fail_mode: FailMode::Closed,
        ..ports_and_ifaces()
    };
    check_golden("fail-closed.nft", &nft::render_apply(&plan_of(config)));
    let all = Config {
        fail_mode: FailMode::Closed,
        ..Config::default()
    };
    check_golden("fail-closed-all.nft", &nft::render_apply(&plan_of(all)));
}

#[test]
fn defaults_iptables() {
    let config = Config {
        backend: Backend::Iptables,
        fail_mode: FailMode::Closed,
        ..Config::default()
    };
    check_iptables("defaults", &plan_of(config));
}

#[test]
fn ports_and_interfaces_iptables() {
    let config = Config {
        backend: Backend::Iptables,
        fail_mode: FailMode::Closed,
        ..ports_and_ifaces()
    };
    check_iptables("ports-ifaces", &plan_of(config));
}

#[test]
fn many_ports_iptables_split_at_15_slots() {
    // 18 single ports and 3 ranges = 24 multiport slots: two rules per family.
    let list = "21,22,25,53,80,110,143,443,465,587,993,995,1080,1194,3128,3306,5432,6379,8000-8100,9000-9100,10000-10100";
    let config = Config {
        backend: Backend::Iptables,
        fail_mode: FailMode::Closed,
        tcp: Some(parse_port_list(list).unwrap()),
        udp: None,
        ..Config::default()
    };
    let plan = plan_of(config);
    check_iptables("many-ports", &plan);
    let v4 = iptables::render_apply(&plan, Family::V4, true);
    let multiport: Vec<&str> = v4.lines().filter(|l| l.contains("--dports")).collect();
    assert_eq!(multiport.len(), 2, "{v4}");
    for line in multiport {
        let list = line
            .split("--dports ")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap();
        let slots: usize = list
            .split(',')
            .map(|p| if p.contains(':') { 2 } else { 1 })
            .sum();
        assert!(slots <= 15, "{line}");
    }
    check_golden(
        "many-ports.nft",
        &nft::render_apply(&plan_of(Config {
            backend: Backend::Nft,
            fail_mode: FailMode::Open,
            ..plan.config.clone()
        })),
    );
}

#[test]
fn custom_marks_ipv4_only() {
    let config = Config {
        port: 15002,
        fwmark: parse_mark("0x10/0xf0").unwrap(),
        bypass_mark: 0x200,
        table: 123,
        ipv6: false,
        udp: None,
        in_ifaces: vec!["eth0".into()],
        ..Config::default()
    };
    let plan = plan_of(config.clone());
    check_golden("custom-v4only.nft", &nft::render_apply(&plan));
    let ipt = plan_of(Config {
        backend: Backend::Iptables,
        fail_mode: FailMode::Closed,
        ..config
    });
    check_iptables("custom-v4only", &ipt);
}

/// `--source client-ip` adds the return path: one nft rule before the interface
/// filter; with iptables the dispatch becomes a goto and one `-m socket` rule per
/// protocol follows it.
fn client_ip() -> Config {
    Config {
        source: Source::ClientIp,
        ..ports_and_ifaces()
    }
}

#[test]
fn client_ip_return_path_nft() {
    check_golden("client-ip.nft", &nft::render_apply(&plan_of(client_ip())));
    // IPv4 only, TCP only, the client's port too, other marks: the rule follows.
    let narrow = Config {
        source: Source::Client,
        ipv6: false,
        udp: None,
        fwmark: parse_mark("0x10/0xf0").unwrap(),
        bypass_mark: 0x200,
        table: 123,
        in_ifaces: vec!["eth0".into()],
        ..Config::default()
    };
    check_golden(
        "client-v4only-tcp.nft",
        &nft::render_apply(&plan_of(narrow)),
    );
}

#[test]
fn client_ip_return_path_iptables() {
    let config = Config {
        backend: Backend::Iptables,
        fail_mode: FailMode::Closed,
        ..client_ip()
    };
    check_iptables("client-ip", &plan_of(config));
}

/// The whole `--dry-run` output against a fake host: strict rp_filter on `all` and
/// eth1, forwarding off, the ip rule for IPv4 already present.
#[test]
fn dry_run_output() {
    let r = RecordingRunner::new();
    for iface in ["lo", "eth0", "eth1"] {
        let flags = if iface == "lo" { "0x9" } else { "0x1003" };
        r.set_file(&format!("/sys/class/net/{iface}/flags"), flags);
    }
    for (key, value) in [
        ("net/ipv4/ip_forward", "0"),
        ("net/ipv6/conf/all/forwarding", "0"),
        ("net/ipv4/conf/all/rp_filter", "1"),
        ("net/ipv4/conf/default/rp_filter", "0"),
        ("net/ipv4/conf/eth0/rp_filter", "0"),
        ("net/ipv4/conf/eth1/rp_filter", "1"),
    ] {
        r.set_file(&format!("/proc/sys/{key}"), value);
    }
    r.set_file("/proc/self/status", "CapEff:\t000001ffffffffff\n");
    r.respond(
        "ip -N rule show",
        Output::ok("0:\tfrom all lookup 255\n32765:\tfrom all fwmark 0x1/0x1 lookup 100\n32766:\tfrom all lookup 254\n"),
    );
    r.respond(
        "ip -N -6 rule show",
        Output::ok("0:\tfrom all lookup 255\n32766:\tfrom all lookup 254\n"),
    );
    let text = ops::dry_run(&r, &Config::default(), Path::new("/run/ringrelay/x.state")).unwrap();
    check_golden("defaults.dry-run", &text);
    // A dry run changes nothing.
    assert!(r
        .events()
        .iter()
        .all(|e| matches!(e, ringrelay_setup::runner::Event::Run(c) if c.stdin.is_none())));
}

/// `--dry-run --source client-ip --in-iface eth1`: the header names the source, the
/// script holds the return path, and step 3 says why it needs no sysctl.
#[test]
fn dry_run_output_client_ip() {
    let r = RecordingRunner::new();
    for iface in ["lo", "eth0", "eth1"] {
        let flags = if iface == "lo" { "0x9" } else { "0x1003" };
        r.set_file(&format!("/sys/class/net/{iface}/flags"), flags);
    }
    for (key, value) in [
        ("net/ipv4/ip_forward", "1"),
        ("net/ipv6/conf/all/forwarding", "1"),
        ("net/ipv4/conf/all/rp_filter", "0"),
        ("net/ipv4/conf/eth1/rp_filter", "1"),
    ] {
        r.set_file(&format!("/proc/sys/{key}"), value);
    }
    r.set_file("/proc/self/status", "CapEff:\t000001ffffffffff\n");
    let config = Config {
        source: Source::ClientIp,
        in_ifaces: vec!["eth1".into()],
        ..Config::default()
    };
    let text = ops::dry_run(&r, &config, Path::new("/run/ringrelay/x.state")).unwrap();
    check_golden("client-ip.dry-run", &text);
}

#[test]
fn diff_helper_marks_changed_lines() {
    let d = line_diff("a\nb\nc\n", "a\nx\nc\n");
    assert!(d.contains("-   2: b"), "{d}");
    assert!(d.contains("+   2: x"), "{d}");
}
