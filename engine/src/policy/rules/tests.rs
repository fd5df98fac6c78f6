use super::*;

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Instant;

use proptest::prelude::*;

use crate::addrs::{ClientAddr, OrigDst};
use crate::policy::sniff::tests::{config, mutate};

fn rules(text: &str) -> Rules {
    match Rules::parse(text, "t.toml") {
        Ok(r) => r,
        Err(e) => panic!("{}", lines(&e)),
    }
}

fn errors(text: &str) -> Vec<String> {
    match Rules::parse(text, "t.toml") {
        Ok(_) => panic!("parsed: {text}"),
        Err(e) => e.iter().map(|e| e.to_string()).collect(),
    }
}

fn lines(e: &[ConfigError]) -> String {
    e.iter().map(|e| format!("{e}\n")).collect()
}

fn conn(client: &str, dst: &str) -> ConnMeta {
    ConnMeta {
        client: ClientAddr(client.parse().unwrap()),
        orig_dst: OrigDst(dst.parse().unwrap()),
    }
}

fn flow(client: &str, dst: &str) -> FlowMeta {
    let c = conn(client, dst);
    FlowMeta {
        client: c.client,
        orig_dst: c.orig_dst,
    }
}

fn id(r: &Rules, name: &str) -> Option<u32> {
    Some(r.rule_names().iter().position(|n| n == name).unwrap() as u32)
}

fn verdict(action: Action, rule: Option<u32>) -> Verdict {
    Verdict { action, rule }
}

/// The decision for a connection, sniffing `sni`/`host` only if asked to.
fn tcp(r: &Rules, c: &ConnMeta, sni: Option<&str>, host: Option<&str>) -> Verdict {
    match r.decide_tcp(c) {
        TcpDecision::Decided(v) => v,
        TcpDecision::NeedsName => r.decide_tcp_named(c, sni, host),
    }
}

const BRIEF: &str = include_str!("../../../tests/corpus/rules/ok-brief.toml");

#[test]
fn the_brief_example_decides_as_documented() {
    let r = rules(BRIEF);
    assert_eq!(r.rule_names(), ["no-telemetry", "lab-mirror", "dns"]);
    assert_eq!(r.len(), 3);
    assert!(r.needs_names());
    let (tele, lab, dns) = (id(&r, "no-telemetry"), id(&r, "lab-mirror"), id(&r, "dns"));
    // no-telemetry: TCP to the range on the listed ports, v4 and v6.
    let c = conn("192.0.2.1:40000", "198.51.100.9:8050");
    assert_eq!(
        r.decide_tcp(&c),
        TcpDecision::Decided(verdict(Action::Reject, tele))
    );
    let c = conn("[2001:db8::1]:40000", "[2001:db8:bad:1::5]:443");
    assert_eq!(
        r.decide_tcp(&c),
        TcpDecision::Decided(verdict(Action::Reject, tele))
    );
    let c = conn("192.0.2.1:40000", "198.51.100.9:80");
    assert_eq!(
        r.decide_tcp(&c),
        TcpDecision::Decided(verdict(Action::Relay, None))
    );
    // The same address over UDP is not for a tcp rule.
    let f = flow("192.0.2.1:40000", "198.51.100.9:443");
    assert_eq!(r.decide_udp(&f), verdict(Action::Relay, None));
    // lab-mirror: needs the name, from that source only.
    let c = conn("198.18.0.9:40000", "192.0.2.80:443");
    assert_eq!(r.decide_tcp(&c), TcpDecision::NeedsName);
    let to = Action::RelayTo("198.19.1.3:8443".parse().unwrap());
    assert_eq!(
        r.decide_tcp_named(&c, Some("a.b.example.com"), None),
        verdict(to, lab)
    );
    assert_eq!(
        r.decide_tcp_named(&c, Some("Example.ORG."), None),
        verdict(to, lab)
    );
    assert_eq!(
        r.decide_tcp_named(&c, None, Some("example.com")),
        verdict(to, lab)
    );
    // Each name list is for its own protocol: the Host "example.org" is not listed.
    assert_eq!(
        r.decide_tcp_named(&c, None, Some("example.org")),
        verdict(Action::Relay, None)
    );
    assert_eq!(
        r.decide_tcp_named(&c, Some("example.com"), None),
        verdict(Action::Relay, None)
    );
    assert_eq!(
        r.decide_tcp_named(&c, None, None),
        verdict(Action::Relay, None)
    );
    let c = conn("198.18.1.9:40000", "192.0.2.80:443");
    assert_eq!(
        r.decide_tcp(&c),
        TcpDecision::Decided(verdict(Action::Relay, None))
    );
    // dns: UDP only.
    let f = flow("192.0.2.1:5353", "192.0.2.53:53");
    assert_eq!(r.decide_udp(&f), verdict(Action::Relay, dns));
    let c = conn("192.0.2.1:5353", "192.0.2.53:53");
    assert_eq!(
        r.decide_tcp(&c),
        TcpDecision::Decided(verdict(Action::Relay, None))
    );
}

#[test]
fn the_appliance_example_in_dist_parses_and_decides() {
    let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../dist/engine.toml"));
    let r = Rules::load(path).unwrap_or_else(|e| panic!("{}", lines(&e)));
    assert_eq!(r.default_action(), Action::Relay);
    let f = flow("192.0.2.100:5353", "203.0.113.53:53");
    assert_eq!(r.decide_udp(&f), verdict(Action::Relay, id(&r, "dns")));
    let c = conn("192.0.2.100:40000", "203.0.113.7:22");
    assert_eq!(
        tcp(&r, &c, None, None),
        verdict(Action::Reject, id(&r, "blocked-range"))
    );
    let f = flow("192.0.2.100:40000", "203.0.113.7:4500");
    assert_eq!(
        r.decide_udp(&f),
        verdict(Action::Drop, id(&r, "blocked-range"))
    );
    let moved = Action::RelayTo("192.0.2.80:443".parse().unwrap());
    let c = conn("192.0.2.100:40000", "198.51.100.10:80");
    assert_eq!(
        tcp(&r, &c, None, None),
        verdict(moved, id(&r, "intranet-moved"))
    );
    let c = conn("192.0.2.100:40000", "192.0.2.200:443");
    assert_eq!(r.decide_tcp(&c), TcpDecision::NeedsName);
    let got = r.decide_tcp_named(&c, Some("wiki.intranet.example.com"), None);
    assert_eq!(got, verdict(moved, id(&r, "intranet-by-name")));
    let got = r.decide_tcp_named(&c, Some("telemetry.example.net"), None);
    assert_eq!(got, verdict(Action::Reject, id(&r, "no-telemetry")));
    let f = flow("192.0.2.100:123", "192.0.2.123:123");
    assert_eq!(
        r.decide_udp(&f),
        verdict(Action::Relay, id(&r, "ntp-local"))
    );
    let f = flow("192.0.2.100:123", "198.51.100.1:123");
    assert_eq!(r.decide_udp(&f), verdict(Action::Drop, id(&r, "ntp-other")));
    // Disabled: the SMTP rule is there (its counter exists) but never matches.
    assert!(r.rule_names().iter().any(|n| n == "block-legacy-smtp"));
    let c = conn("192.0.2.100:40000", "198.51.100.25:25");
    assert_eq!(tcp(&r, &c, None, None), verdict(Action::Relay, None));
}

fn corpus_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/corpus/rules"))
}

use std::path::PathBuf;

/// Every `(file name, text)` of the rules corpus.
fn corpus() -> Vec<(String, String)> {
    let mut out: Vec<_> = std::fs::read_dir(corpus_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".toml"))
        .map(|n| {
            let text = std::fs::read_to_string(corpus_dir().join(&n)).unwrap();
            (n, text)
        })
        .collect();
    out.sort();
    assert!(out.len() >= 5);
    out
}

/// `ok-*.toml` loads; `bad-*.toml` fails with exactly its `.err` file (rewrite them
/// with UPDATE_GOLDEN=1 after a deliberate change, and read the diff).
#[test]
fn corpus_files_load_or_fail_with_their_golden_errors() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    for (name, text) in corpus() {
        let got = Rules::parse(&text, &name);
        if name.starts_with("ok-") {
            assert!(got.is_ok(), "{name}: {}", lines(&got.unwrap_err()));
            continue;
        }
        assert!(name.starts_with("bad-"), "{name}: ok-* or bad-*");
        let got = lines(&got.expect_err(&name));
        let golden = corpus_dir().join(name.replace(".toml", ".err"));
        if update {
            std::fs::write(&golden, &got).unwrap();
        }
        let want = std::fs::read_to_string(&golden).unwrap_or_default();
        assert_eq!(
            got, want,
            "{name} (UPDATE_GOLDEN=1 rewrites the .err files)"
        );
    }
}

#[test]
fn every_field_form_is_understood() {
    let text = &corpus()
        .into_iter()
        .find(|(n, _)| n == "ok-every-field.toml")
        .unwrap()
        .1;
    let r = rules(text);
    assert_eq!(r.default_action(), Action::Reject);
    let first = id(&r, "v6-mapped.and_bare");
    // A mapped v6 prefix in a rule and a mapped client: both taken as IPv4.
    let c = conn("[::ffff:192.0.2.7]:40000", "203.0.113.9:8005");
    assert_eq!(tcp(&r, &c, None, None), verdict(Action::Relay, first));
    let c = conn("192.0.2.7:40000", "[::ffff:203.0.113.9]:22");
    assert_eq!(tcp(&r, &c, None, None), verdict(Action::Relay, first));
    let c = conn("192.0.2.7:40000", "[2001:db8::1]:9000");
    assert_eq!(tcp(&r, &c, None, None), verdict(Action::Relay, first));
    // Wrong source port, port outside the lists.
    let c = conn("192.0.2.7:40001", "203.0.113.9:22");
    assert_eq!(tcp(&r, &c, None, None), verdict(Action::Reject, None));
    let c = conn("192.0.2.7:40000", "203.0.113.9:8011");
    assert_eq!(tcp(&r, &c, None, None), verdict(Action::Reject, None));
    // Disabled rule: skipped.
    let c = conn("192.0.2.8:1", "203.0.113.9:1");
    assert_eq!(r.decide_tcp(&c), TcpDecision::NeedsName); // "names" is next and has no address
    let v6 = Action::RelayTo("[2001:db8::7]:8443".parse().unwrap());
    let names = id(&r, "names");
    assert_eq!(
        r.decide_tcp_named(&c, Some("x.EXAMPLE.com"), None),
        verdict(v6, names)
    );
    assert_eq!(
        r.decide_tcp_named(&c, Some("example.com"), None),
        verdict(Action::Reject, None)
    );
    assert_eq!(
        r.decide_tcp_named(&c, None, Some("a.b.cdn.example.")),
        verdict(v6, names)
    );
    assert_eq!(
        r.decide_tcp_named(&c, None, Some("www.example.net")),
        verdict(v6, names)
    );
    assert_eq!(
        r.decide_tcp_named(&c, None, Some("cdn.example")),
        verdict(Action::Reject, None)
    );
    // UDP: drop, redirect, and a default of reject drops.
    let f = flow("192.0.2.8:1", "198.51.100.1:123");
    assert_eq!(r.decide_udp(&f), verdict(Action::Drop, id(&r, "drop-ntp")));
    let f = flow("192.0.2.8:1", "198.51.100.53:53");
    let to = Action::RelayTo("192.0.2.53:53".parse().unwrap());
    assert_eq!(r.decide_udp(&f), verdict(to, id(&r, "udp-redirect")));
    let f = flow("192.0.2.8:1", "198.51.100.54:53");
    assert_eq!(r.decide_udp(&f), verdict(Action::Drop, None));
}

#[test]
fn first_match_wins_and_names_wait_only_when_they_come_first() {
    let r = rules(
        r#"
        [[rule]]
        name = "a-by-name"
        dst_port = "443"
        sni = "a.example"
        action = "reject"

        [[rule]]
        name = "web"
        dst_port = "80,443"
        action = "relay"

        [[rule]]
        name = "b-by-name"
        sni = "b.example"
        action = "reject"

        [[rule]]
        name = "udp-reject"
        proto = "udp"
        action = "reject"
        "#,
    );
    let web = id(&r, "web");
    // 443: "a-by-name" comes before the decisive "web": the name is needed.
    let c = conn("192.0.2.1:1", "198.51.100.1:443");
    assert_eq!(r.decide_tcp(&c), TcpDecision::NeedsName);
    let got = r.decide_tcp_named(&c, Some("a.example"), None);
    assert_eq!(got, verdict(Action::Reject, id(&r, "a-by-name")));
    // "b-by-name" comes after "web", which wins first.
    assert_eq!(
        r.decide_tcp_named(&c, Some("b.example"), None),
        verdict(Action::Relay, web)
    );
    assert_eq!(
        r.decide_tcp_named(&c, None, None),
        verdict(Action::Relay, web)
    );
    // 80: "web" decides at once, and the names would not change it.
    let c = conn("192.0.2.1:1", "198.51.100.1:80");
    assert_eq!(
        r.decide_tcp(&c),
        TcpDecision::Decided(verdict(Action::Relay, web))
    );
    assert_eq!(
        r.decide_tcp_named(&c, Some("b.example"), None),
        verdict(Action::Relay, web)
    );
    // 22: only "b-by-name" could match.
    let c = conn("192.0.2.1:1", "198.51.100.1:22");
    assert_eq!(r.decide_tcp(&c), TcpDecision::NeedsName);
    let b = id(&r, "b-by-name");
    assert_eq!(
        r.decide_tcp_named(&c, Some("B.example."), None),
        verdict(Action::Reject, b)
    );
    assert_eq!(
        r.decide_tcp_named(&c, None, Some("b.example")),
        verdict(Action::Relay, None)
    );
    // UDP reject is a drop; the name rules are not for UDP.
    let f = flow("192.0.2.1:1", "198.51.100.1:53");
    assert_eq!(
        r.decide_udp(&f),
        verdict(Action::Drop, id(&r, "udp-reject"))
    );
    // "web" is proto any: UDP to 443 is relayed by it.
    let f = flow("192.0.2.1:1", "198.51.100.1:443");
    assert_eq!(r.decide_udp(&f), verdict(Action::Relay, web));
}

#[test]
fn a_file_without_name_rules_never_needs_names() {
    let r = rules("[[rule]]\nname = \"x\"\ndst = \"192.0.2.0/24\"\naction = \"reject\"\n");
    assert!(!r.needs_names());
    let off = rules(
        "[[rule]]\nname = \"x\"\nenabled = false\nsni = \"a.example\"\naction = \"reject\"\n",
    );
    assert!(!off.needs_names());
    let c = conn("192.0.2.1:1", "198.51.100.1:443");
    assert_eq!(
        off.decide_tcp(&c),
        TcpDecision::Decided(verdict(Action::Relay, None))
    );
    let empty = Rules::relay_all();
    assert!(empty.is_empty());
    assert_eq!(
        empty.decide_udp(&flow("192.0.2.1:1", "[::1]:53")),
        verdict(Action::Relay, None)
    );
}

#[test]
fn the_reloadable_policy_decides_names_and_swaps_snapshots() {
    use crate::policy::{RulesHandle, TcpDecision};
    let handle = RulesHandle::new(rules(BRIEF));
    let make = handle.factory();
    let mut p = make(0);
    let c = conn("192.0.2.1:40000", "198.51.100.9:443");
    let TcpDecision::Decided(d) = p.tcp(&c) else {
        panic!("a CIDR rule needs no name")
    };
    assert_eq!(d.verdict, TcpVerdict::Reject);
    assert_eq!(d.rule.as_deref(), Some("no-telemetry"));
    // lab-mirror needs a name: the first step says so, the named step decides.
    let m = conn("198.18.0.9:40000", "192.0.2.80:443");
    assert_eq!(p.tcp(&m), TcpDecision::NeedsName);
    let named = p.tcp_named(&m, Some("a.example.com"), None);
    assert_eq!(named.rule.as_deref(), Some("lab-mirror"));
    assert_eq!(p.tcp_named(&m, None, None).rule, None);
    assert_eq!(
        p.udp(&flow("192.0.2.1:5353", "192.0.2.53:53")).verdict,
        UdpVerdict::Relay
    );
    // A reload swaps the snapshot for the next decision on every core.
    handle.replace(rules("default = \"reject\""));
    assert_eq!(
        p.udp(&flow("192.0.2.1:5353", "192.0.2.53:53")).verdict,
        UdpVerdict::Drop
    );
    let TcpDecision::Decided(d) = p.tcp(&c) else {
        panic!("no rules left")
    };
    assert_eq!((d.verdict, d.rule), (TcpVerdict::Reject, None));
    fn shared<T: Send + Sync>() {}
    shared::<Rules>();
    shared::<RulesHandle>();
}

#[test]
fn errors_point_at_the_value_and_come_all_at_once() {
    let text = "default = \"relay\"\n[[rule]]\nname = \"x\"\ndst = [\"10.0.0.0/8\", \"10.1.2.3/8\"]\naction = \"rejct\"\n";
    let e = errors(text);
    assert_eq!(
        e,
        [
            "t.toml:4:22: `dst`: \"10.1.2.3/8\" has bits set past its /8: did you mean \"10.0.0.0/8\"?",
            "t.toml:5:10: `action` must be \"relay\", \"reject\", \"redirect\" or \"drop\", not \"rejct\"",
        ]
    );
    // Columns count characters, not bytes.
    let e = errors("[[rule]]\ncomment = \"ü\"; name = 1\n");
    assert!(e[0].starts_with("t.toml:2:"), "{e:?}");
    let e = errors("[[rule]]\nname = \"ü\"\naction = \"relay\"\n");
    assert!(e[0].starts_with("t.toml:2:8: rule name \"ü\""), "{e:?}");
    let e = errors("[[rule]]\nname = \"a\"\n  comment = \"é\"  dst = \"x\"\n");
    assert!(e[0].starts_with("t.toml:3:"), "{e:?}");
}

#[test]
fn each_kind_of_error_says_what_and_where() {
    let cases: &[(&str, &str)] = &[
        ("[[rule]]\naction = \"relay\"\n", "t.toml:1:1: this rule has no `name`"),
        ("[[rule]]\nname = \"a\"\n", "t.toml:1:1: this rule has no `action`"),
        ("[[rule]]\nname = \"a\"\naction = \"relay\"\ndport = 1\n", "t.toml:4:1: unknown field `dport` in a rule; did you mean `dst_port`?"),
        ("[[rule]]\nname = \"a\"\naction = \"relay\"\ndst_prot = 1\n", "did you mean `dst_port`?"),
        ("[[rule]]\nname = \"a\"\naction = \"redirect\"\n", "t.toml:3:10: `action = \"redirect\"` needs `to"),
        ("[[rule]]\nname = \"a\"\naction = \"relay\"\nto = \"192.0.2.1:1\"\n", "t.toml:4:6: `to` is only for action = \"redirect\""),
        ("[[rule]]\nname = \"a\"\nproto = \"tcp\"\naction = \"drop\"\n", "t.toml:4:10: `drop` is for UDP only"),
        ("[[rule]]\nname = \"a\"\naction = \"drop\"\n", "`drop` is for UDP only"),
        ("[[rule]]\nname = \"a\"\nsni = []\naction = \"relay\"\n", "t.toml:3:7: `sni` is an empty list"),
        ("[[rule]]\nname = \"a\"\nhost = \"a.*.com\"\naction = \"relay\"\n", "t.toml:3:8: `host`: \"a.*.com\": '*' is allowed only as the whole first label"),
        ("[[rule]]\nname = \"a\"\nsni = \"*\"\naction = \"relay\"\n", "'*' is allowed only"),
        ("[[rule]]\nname = \"a\"\nsni = \"*.\"\naction = \"relay\"\n", "\"*.\": empty name"),
        ("[[rule]]\nname = \"a\"\nproto = \"udp\"\nhost = \"a.b\"\naction = \"relay\"\n", "t.toml:4:8: `host` only matches TCP"),
        ("[[rule]]\nname = \"a\"\ndst_port = \"8100-8000\"\naction = \"relay\"\n", "t.toml:3:12: `dst_port`: the range 8100-8000 runs backwards"),
        ("[[rule]]\nname = \"a\"\ndst_port = \"0\"\naction = \"relay\"\n", "port 0 never matches"),
        ("[[rule]]\nname = \"a\"\nsrc_port = 65536\naction = \"relay\"\n", "t.toml:3:12: `src_port`: 65536 is not a port number"),
        ("[[rule]]\nname = \"a\"\ndst_port = \"80,\"\naction = \"relay\"\n", "has an empty item"),
        ("[[rule]]\nname = \"a\"\nsrc = \"192.0.2.0/33\"\naction = \"relay\"\n", "t.toml:3:7: `src`: \"192.0.2.0/33\": the prefix length must be 0 to 32"),
        ("[[rule]]\nname = \"a\"\nsrc = \"example.com\"\naction = \"relay\"\n", "is not a CIDR or an IP address"),
        ("[[rule]]\nname = \"a\"\nsrc = [1]\naction = \"relay\"\n", "t.toml:3:8: `src` takes CIDRs like \"192.0.2.0/24\", not an integer"),
        ("[[rule]]\nname = \"a\"\naction = \"redirect\"\nto = \"[::1]:0\"\n", "has port 0"),
        ("[[rule]]\nname = \"a\"\naction = \"redirect\"\nto = \"::1\"\n", "`to` must be IP:port"),
        ("[[rule]]\nname = \"a\"\nenabled = 1\naction = \"relay\"\n", "`enabled` must be true or false, not an integer"),
        ("[[rule]]\nname = \"a b\"\naction = \"relay\"\n", "t.toml:2:8: rule name \"a b\""),
        ("[[rule]]\nname = \"a\"\naction = \"relay\"\n[[rule]]\nname = \"a\"\naction = \"relay\"\n", "t.toml:5:8: duplicate rule name \"a\" (first at line 2, column 8)"),
        ("default = \"drop\"\n", "t.toml:1:11: `default` must be \"relay\" or \"reject\", not \"drop\""),
        ("defaults = \"relay\"\n", "t.toml:1:1: unknown field `defaults` at the top level; did you mean `default`?"),
        ("[rule]\nname = \"a\"\naction = \"relay\"\n", "t.toml:1:1: `rule` must be a list of tables: write [[rule]], not [rule]"),
        ("rule = 3\n", "`rule` must be a list of [[rule]] tables, not an integer"),
        ("rule = [3]\n", "t.toml:1:9: each rule must be a table"),
        ("[[rule]]\nname = \"a\"\naction = \"relay\n", "t.toml:3:16: invalid TOML: invalid basic string"),
        ("[[rule]]\nname = \"a\"\nname = \"b\"\n", "t.toml:3:1: invalid TOML: duplicate key"),
    ];
    for (text, want) in cases {
        let e = errors(text);
        assert!(
            e.iter().any(|e| e.contains(want)),
            "{text:?}\nwant {want:?}\ngot {e:#?}"
        );
        for e in &e {
            assert!(e.starts_with("t.toml:"), "{e}");
        }
    }
}

#[test]
fn many_errors_are_capped_with_a_count() {
    let mut text = String::new();
    for i in 0..(MAX_ERRORS + 5) {
        text += &format!("[[rule]]\nname = \"r{i}\"\ndst = \"bad\"\naction = \"relay\"\n");
    }
    let e = errors(&text);
    assert_eq!(e.len(), MAX_ERRORS + 1);
    assert!(
        e[MAX_ERRORS].ends_with("5 more errors from here on not shown"),
        "{}",
        e[MAX_ERRORS]
    );
}

#[test]
fn load_says_which_file_and_where() {
    let dir = std::env::temp_dir().join(format!("ringrelay-rules-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let missing = dir.join("missing.toml");
    let e = Rules::load(&missing).unwrap_err();
    let shown = e[0].to_string();
    assert!(
        shown.starts_with(&format!(
            "{}: cannot read the rules file:",
            missing.display()
        )),
        "{shown}"
    );
    let bin = dir.join("binary.toml");
    std::fs::write(&bin, b"default = \"relay\"\n# \xff\n").unwrap();
    let e = Rules::load(&bin).unwrap_err();
    assert_eq!(
        e[0].to_string(),
        format!("{}:2:3: not UTF-8 text", bin.display())
    );
    let ok = dir.join("ok.toml");
    std::fs::write(&ok, BRIEF).unwrap();
    assert_eq!(Rules::load(&ok).unwrap().len(), 3);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn cidrs_and_ports_parse_strictly() {
    assert_eq!(
        parse_net("192.0.2.1").unwrap(),
        "192.0.2.1/32".parse::<IpNet>().unwrap()
    );
    assert_eq!(
        parse_net(" 2001:db8::/32 ").unwrap(),
        "2001:db8::/32".parse::<IpNet>().unwrap()
    );
    assert_eq!(
        parse_net("::ffff:192.0.2.0/120").unwrap(),
        "192.0.2.0/24".parse::<IpNet>().unwrap()
    );
    assert_eq!(
        parse_net("::ffff:0:0/96").unwrap(),
        "0.0.0.0/0".parse::<IpNet>().unwrap()
    );
    assert_eq!(parse_net("::/0").unwrap(), "::/0".parse::<IpNet>().unwrap());
    for bad in [
        "010.0.0.1",
        "1.2.3.4/",
        "1.2.3.4/-1",
        "fe80::1%eth0",
        "1.2.3.0/24/8",
        "",
    ] {
        assert!(parse_net(bad).is_err(), "{bad:?}");
    }
    assert_eq!(
        parse_ports("443, 8000-8100").unwrap(),
        [(443, 443), (8000, 8100)]
    );
    assert_eq!(parse_ports("1-65535").unwrap(), [(1, 65535)]);
    for bad in ["", ",", "1-", "-1", "1-2-3", "a", "65536", "0-10", "10-9"] {
        assert!(parse_ports(bad).is_err(), "{bad:?}");
    }
    let p = Ports(merge(vec![(10, 20), (21, 30), (5, 12), (40, 40)]));
    assert_eq!(p.0, [(5, 30), (40, 40)]);
    assert!(p.contains(5) && p.contains(30) && p.contains(40));
    assert!(!p.contains(4) && !p.contains(31) && !p.contains(41));
    assert_eq!(merge(vec![(0u16, u16::MAX), (3, 4)]), [(0, u16::MAX)]);
}

#[test]
fn port_blocks_cover_exactly_their_ranges() {
    let specs = [
        "1-65535",
        "8000-8100",
        "53",
        "1024-65535",
        "22,80-90,443",
        "65535",
        "2-3,5-9",
        "32768-32769",
    ];
    let mut ix = PortIndex::default();
    let ports: Vec<Ports> = specs
        .iter()
        .map(|s| Ports(merge(parse_ports(s).unwrap())))
        .collect();
    for (id, p) in ports.iter().enumerate() {
        ix.file(p, id as u32);
    }
    // Every port: the lists the index probes hold exactly the rules that contain it
    // (a predicate that never matches makes the scan visit every list in full).
    for port in 1..=u16::MAX {
        let mut seen = Vec::new();
        let mut first = First::new(|i| {
            seen.push(i);
            false
        });
        ix.scan(&mut first, port);
        seen.sort_unstable();
        let want: Vec<u32> = (0..ports.len() as u32)
            .filter(|&i| ports[i as usize].contains(port))
            .collect();
        assert_eq!(seen, want, "port {port}");
    }
    let blocks = |s: &str| {
        let mut ix = PortIndex::default();
        ix.file(&Ports(merge(parse_ports(s).unwrap())), 0);
        ix.blocks.len()
    };
    assert_eq!(blocks("8000-8100"), 4);
    assert_eq!(blocks("1-65535"), 16);
}

/// A file of `n` rules: dst CIDRs (/24s of 10.0.0.0/8, each with a second /32 in
/// 172.16.0.0/12), every 10th with a port list, every 100th a v6 prefix, and every
/// 1000th with only a `src_port`; the last one matches 192.0.2.1 only.
fn big_file(n: usize) -> String {
    let mut t = String::from("default = \"relay\"\n");
    for i in 0..n - 1 {
        let (a, b) = (i / 256 % 256, i % 256);
        t += &format!("[[rule]]\nname = \"r{i}\"\nproto = \"tcp\"\n");
        if i % 100 == 99 {
            t += &format!("dst = \"2001:db8:{:x}:{:x}::/64\"\n", i >> 16, i & 0xffff);
        } else if i % 1000 == 500 {
            t += "src_port = \"1\"\n"; // no address: filed under its port
        } else {
            t += &format!("dst = [\"10.{a}.{b}.0/24\", \"172.16.{a}.{b}\"]\n");
        }
        if i % 10 == 3 {
            t += "dst_port = \"22,8000-8080\"\n";
        }
        t += "action = \"reject\"\n";
    }
    t += "[[rule]]\nname = \"last\"\ndst = \"192.0.2.1\"\naction = \"redirect\"\nto = \"198.51.100.1:80\"\n";
    t
}

#[test]
fn ten_thousand_rules_decide_right() {
    let n = 10_000;
    let r = rules(&big_file(n));
    assert_eq!(r.len(), n);
    let last = Some(n as u32 - 1);
    let to = Action::RelayTo("198.51.100.1:80".parse().unwrap());
    let c = conn("198.18.0.1:40000", "192.0.2.1:443");
    assert_eq!(r.decide_tcp(&c), TcpDecision::Decided(verdict(to, last)));
    assert_eq!(
        r.decide_udp(&flow("198.18.0.1:40000", "192.0.2.1:443")),
        verdict(to, last)
    );
    let c = conn("198.18.0.1:40000", "192.0.2.2:443");
    assert_eq!(
        r.decide_tcp(&c),
        TcpDecision::Decided(verdict(Action::Relay, None))
    );
    // A rule in the middle, by its /24 and by its /32; one with ports.
    let i = 7777; // 7777 = 30 * 256 + 97
    let c = conn("198.18.0.1:40000", "10.30.97.200:443");
    assert_eq!(
        r.decide_tcp(&c),
        TcpDecision::Decided(verdict(Action::Reject, Some(i)))
    );
    let c = conn("198.18.0.1:40000", "172.16.30.97:443");
    assert_eq!(
        r.decide_tcp(&c),
        TcpDecision::Decided(verdict(Action::Reject, Some(i)))
    );
    let c = conn("198.18.0.1:40000", "10.0.3.1:443"); // rule 3 wants 22,8000-8080
    assert_eq!(
        r.decide_tcp(&c),
        TcpDecision::Decided(verdict(Action::Relay, None))
    );
    let c = conn("198.18.0.1:40000", "10.0.3.1:8080");
    assert_eq!(
        r.decide_tcp(&c),
        TcpDecision::Decided(verdict(Action::Reject, Some(3)))
    );
    let c = conn("[2001:db8::5]:2", "[2001:db8:0:1e13::1]:443"); // 0x1e13 = 7699
    assert_eq!(
        r.decide_tcp(&c),
        TcpDecision::Decided(verdict(Action::Reject, Some(7699)))
    );
    // The rules filed under src_port 1 come first for a client on port 1.
    let c = conn("198.18.0.1:1", "192.0.2.1:443");
    assert_eq!(
        r.decide_tcp(&c),
        TcpDecision::Decided(verdict(Action::Reject, Some(500)))
    );
}

/// Decision time with 1 rule and with 10,000 and 100,000 (the match at the end), by
/// hand:
///   cargo test -p ringrelay-engine --release --lib decide_time -- --ignored --nocapture
#[test]
#[ignore]
fn decide_time() {
    let conns = |dst: &dyn Fn(u32) -> SocketAddr| -> Vec<ConnMeta> {
        (0..1024u32)
            .map(|i| ConnMeta {
                client: ClientAddr(SocketAddr::from((Ipv4Addr::from(0xc612_0000 + i), 40000))),
                orig_dst: OrigDst(dst(i)),
            })
            .collect()
    };
    let kinds: [(&str, Vec<ConnMeta>); 3] = [
        (
            "to the last rule",
            conns(&|_| SocketAddr::from(([192, 0, 2, 1], 443))),
        ),
        (
            "into 10/8, spread",
            conns(&|i| SocketAddr::from((Ipv4Addr::from(0x0a00_0000 + i * 9973), 443))),
        ),
        (
            "no match",
            conns(&|i| SocketAddr::from((Ipv4Addr::from(0xcb00_7100 + i), 443))),
        ),
    ];
    for n in [1, 10_000, 100_000] {
        let t0 = Instant::now();
        let r = if n == 1 {
            rules("[[rule]]\nname = \"last\"\ndst = \"192.0.2.1\"\naction = \"redirect\"\nto = \"198.51.100.1:80\"\n")
        } else {
            rules(&big_file(n))
        };
        let load = t0.elapsed();
        let mut line = format!(
            "{n:>7} rules (parse+compile {:>8.1} ms):",
            load.as_secs_f64() * 1e3
        );
        for (what, conns) in &kinds {
            // The best of 5 runs: the machine may be busy with other work.
            let rounds = 500;
            let best = (0..5)
                .map(|_| {
                    let t0 = Instant::now();
                    for _ in 0..rounds {
                        for c in conns {
                            std::hint::black_box(r.decide_tcp(std::hint::black_box(c)));
                        }
                    }
                    t0.elapsed()
                })
                .min()
                .unwrap();
            let per = best.as_nanos() as f64 / (rounds * conns.len()) as f64;
            line += &format!("  {what}: {per:5.0} ns");
        }
        println!("{line}");
    }
}

// ---------------------------------------------------------------------------------
// Properties: the indexed decisions equal a plain first-match scan over the rules;
// the parser never panics and its errors are well-formed. PROPTEST_CASES for long
// runs (see sniff/tests.rs).

/// The reference: every rule in order, each field checked with ipnet's own `contains`
/// and plain loops, nothing shared with the index but the parsed rules.
fn reference_field_match(r: &Rule, client: SocketAddr, dst: SocketAddr) -> bool {
    let net_ok = |nets: &Option<Nets>, ip: IpAddr| {
        nets.as_ref()
            .is_none_or(|n| n.nets.iter().any(|net| net.contains(&canon(ip))))
    };
    let port_ok = |ports: &Option<Ports>, p: u16| {
        ports
            .as_ref()
            .is_none_or(|ps| ps.0.iter().any(|&(a, b)| a <= p && p <= b))
    };
    net_ok(&r.dst, dst.ip())
        && net_ok(&r.src, client.ip())
        && port_ok(&r.dst_port, dst.port())
        && port_ok(&r.src_port, client.port())
}

fn reference_name(n: &Option<Names>, name: Option<&str>) -> bool {
    let (Some(n), Some(name)) = (n, name) else {
        return false;
    };
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    n.exact.contains(&name) || n.suffixes.iter().any(|s| name.ends_with(&format!(".{s}")))
}

fn reference_tcp(rs: &Rules, c: &ConnMeta, sni: Option<&str>, host: Option<&str>) -> Verdict {
    let hit = rs.rules.iter().position(|r| {
        r.enabled
            && r.proto != Proto::Udp
            && reference_field_match(r, c.client.0, c.orig_dst.0)
            && (!r.named() || reference_name(&r.sni, sni) || reference_name(&r.host, host))
    });
    rs.tcp_verdict(hit.map(|i| i as u32))
}

fn reference_udp(rs: &Rules, f: &FlowMeta) -> Verdict {
    let hit = rs.rules.iter().position(|r| {
        r.enabled
            && r.proto != Proto::Tcp
            && !r.named()
            && reference_field_match(r, f.client.0, f.orig_dst.0)
    });
    rs.udp_verdict(hit.map(|i| i as u32))
}

/// Addresses and names from small pools, so that rules and connections meet often.
const V4: &[&str] = &[
    "10.0.0.0/8",
    "10.1.0.0/16",
    "10.1.2.0/24",
    "10.1.2.3",
    "192.0.2.0/25",
    "0.0.0.0/0",
    "::ffff:10.1.0.0/112",
];
const V6: &[&str] = &["2001:db8::/32", "2001:db8:1::/48", "2001:db8:1::5", "::/0"];
const PORTS: &[&str] = &["80", "443", "1-1024", "22,80-90", "8000-8100", "53"];
const NAMES: &[&str] = &[
    "a.example",
    "*.example",
    "b.a.example",
    "*.a.example",
    "other.test",
    "A.Example.",
];
const ADDRS: &[&str] = &[
    "10.1.2.3",
    "10.1.2.4",
    "10.1.9.9",
    "10.9.9.9",
    "192.0.2.1",
    "192.0.2.200",
    "::ffff:10.1.2.3",
    "2001:db8:1::5",
    "2001:db8:2::1",
    "2001:dead::1",
];
const CONN_PORTS: &[u16] = &[22, 53, 80, 85, 443, 1024, 8050, 9999];
const LOOKUPS: &[&str] = &[
    "a.example",
    "b.a.example",
    "c.b.a.example",
    "example",
    "x.other.test",
    "other.test",
    "A.EXAMPLE.",
    "z.example",
];

fn pick<T: Clone + std::fmt::Debug>(pool: &'static [T]) -> impl Strategy<Value = T> {
    prop::sample::select(pool)
}

fn list(pool: &'static [&'static str]) -> impl Strategy<Value = Option<Vec<&'static str>>> {
    prop::option::weighted(0.4, prop::collection::vec(pick(pool), 1..3))
}

/// One rule as TOML text.
fn rule_text() -> impl Strategy<Value = String> {
    (
        0u8..3,
        list(V4),
        list(V6),
        list(V4),
        prop::option::weighted(0.3, pick(PORTS)),
        prop::option::weighted(0.1, pick(PORTS)),
        list(NAMES),
        list(NAMES),
        0u8..4,
        prop::option::weighted(0.1, Just(false)),
    )
        .prop_map(
            |(proto, dst4, dst6, src, dport, sport, sni, host, action, enabled)| {
                let q = |v: &[&str]| {
                    v.iter()
                        .map(|s| format!("{s:?}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let named = sni.is_some() || host.is_some();
                let proto = match proto {
                    0 if !named => "udp",
                    1 => "tcp",
                    _ => "any",
                };
                let mut t = format!("proto = \"{proto}\"\n");
                let dst: Vec<&str> = dst4.into_iter().chain(dst6).flatten().collect();
                if !dst.is_empty() {
                    t += &format!("dst = [{}]\n", q(&dst));
                }
                if let Some(s) = src {
                    t += &format!("src = [{}]\n", q(&s));
                }
                if let Some(p) = dport {
                    t += &format!("dst_port = {p:?}\n");
                }
                if let Some(p) = sport {
                    t += &format!("src_port = {p:?}\n");
                }
                if let Some(n) = sni {
                    t += &format!("sni = [{}]\n", q(&n));
                }
                if let Some(n) = host {
                    t += &format!("host = [{}]\n", q(&n));
                }
                t += match action {
                    0 => "action = \"relay\"\n",
                    1 => "action = \"reject\"\n",
                    2 => "action = \"redirect\"\nto = \"192.0.2.99:8080\"\n",
                    _ if proto == "udp" => "action = \"drop\"\n",
                    _ => "action = \"reject\"\n",
                };
                if enabled.is_some() {
                    t += "enabled = false\n";
                }
                t
            },
        )
}

fn rules_file() -> impl Strategy<Value = String> {
    (prop::collection::vec(rule_text(), 0..12), any::<bool>()).prop_map(|(rules, reject)| {
        let mut t = format!(
            "default = \"{}\"\n",
            if reject { "reject" } else { "relay" }
        );
        for (i, r) in rules.iter().enumerate() {
            t += &format!("[[rule]]\nname = \"r{i}\"\n{r}");
        }
        t
    })
}

fn meta() -> impl Strategy<Value = (SocketAddr, SocketAddr)> {
    (pick(ADDRS), pick(CONN_PORTS), pick(ADDRS), pick(CONN_PORTS)).prop_map(|(c, cp, d, dp)| {
        let c: IpAddr = c.parse().unwrap();
        let d: IpAddr = d.parse().unwrap();
        (SocketAddr::new(c, cp), SocketAddr::new(d, dp))
    })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn indexed_decisions_equal_a_plain_first_match(
        text in rules_file(),
        metas in prop::collection::vec(meta(), 1..16),
        sni in prop::option::of(pick(LOOKUPS)),
        host in prop::option::of(pick(LOOKUPS)),
    ) {
        let rs = Rules::parse(&text, "gen.toml").map_err(|e| TestCaseError::fail(format!("{}\n{text}", lines(&e))))?;
        for (client, dst) in metas {
            let c = ConnMeta { client: ClientAddr(client), orig_dst: OrigDst(dst) };
            let f = FlowMeta { client: c.client, orig_dst: c.orig_dst };
            let named = rs.decide_tcp_named(&c, sni, host);
            prop_assert_eq!(named, reference_tcp(&rs, &c, sni, host), "{:?} {:?} {:?}\n{}", c, sni, host, text);
            prop_assert_eq!(rs.decide_udp(&f), reference_udp(&rs, &f), "{:?}\n{}", f, text);
            match rs.decide_tcp(&c) {
                // Decided: the names would not change it.
                TcpDecision::Decided(v) => {
                    prop_assert_eq!(v, named);
                    prop_assert_eq!(v, reference_tcp(&rs, &c, None, None));
                }
                // NeedsName: the first rule that matches but for names has names.
                TcpDecision::NeedsName => {
                    let first = rs.rules.iter().find(|r| {
                        r.enabled && r.proto != Proto::Udp && reference_field_match(r, client, dst)
                    });
                    prop_assert!(first.is_some_and(Rule::named), "{:?}\n{}", c, text);
                }
            }
        }
    }

    #[test]
    fn mutated_rules_files_never_panic_and_errors_are_well_formed(
        seed in any::<prop::sample::Index>(),
        edits in prop::collection::vec(any::<(u8, usize, u8)>(), 0..6),
    ) {
        let files = corpus();
        let (_, text) = &files[seed.index(files.len())];
        let bytes = mutate(text.clone().into_bytes(), &edits);
        let Ok(text) = String::from_utf8(bytes) else { return Ok(()) };
        check_parse(&text)?;
    }

    #[test]
    fn random_rules_text_never_panics(text in "(\\[\\[rule\\]\\]\n|name = \"[a-z]{1,3}\"\n|[a-z_]{1,8} = (\"[ -~]{0,12}\"|[0-9]{1,6}|\\[\"[0-9./:a-f]{0,20}\"\\]|true)\n|[ -~\n]{0,20}){0,12}") {
        check_parse(&text)?;
    }
}

/// Parses `text`: no panic, and every error inside the text with a message.
fn check_parse(text: &str) -> Result<(), TestCaseError> {
    let line_count = text.split('\n').count();
    match Rules::parse(text, "m.toml") {
        Ok(r) => prop_assert_eq!(r.rule_names().len(), r.len()),
        Err(errs) => {
            prop_assert!(!errs.is_empty());
            prop_assert!(errs.len() <= MAX_ERRORS + 1);
            for e in &errs {
                prop_assert!(e.line >= 1 && e.line <= line_count, "{} in\n{}", e, text);
                prop_assert!(e.col >= 1, "{}", e);
                prop_assert!(!e.message.is_empty());
                let prefix = format!("m.toml:{}:{}: ", e.line, e.col);
                prop_assert!(e.to_string().starts_with(&prefix));
            }
        }
    }
    Ok(())
}

#[test]
fn v6_and_v4_tries_are_apart() {
    let r = rules("[[rule]]\nname = \"v6\"\ndst = \"::/0\"\naction = \"reject\"\n");
    let v4 = conn("192.0.2.1:1", "192.0.2.2:80");
    assert_eq!(
        r.decide_tcp(&v4),
        TcpDecision::Decided(verdict(Action::Relay, None))
    );
    let mapped = ConnMeta {
        client: ClientAddr(SocketAddr::from((Ipv6Addr::LOCALHOST, 1))),
        orig_dst: OrigDst(SocketAddr::from((
            Ipv4Addr::new(192, 0, 2, 2).to_ipv6_mapped(),
            80,
        ))),
    };
    // A mapped address is IPv4 to the rules: ::/0 does not take it.
    assert_eq!(
        r.decide_tcp(&mapped),
        TcpDecision::Decided(verdict(Action::Relay, None))
    );
    let v6 = conn("[::1]:1", "[2001:db8::1]:80");
    assert_eq!(
        r.decide_tcp(&v6),
        TcpDecision::Decided(verdict(Action::Reject, Some(0)))
    );
}

#[test]
fn names_given_in_odd_forms_still_match() {
    let r = rules(
        "[[rule]]\nname = \"n\"\nsni = [\"*.Example.com\", \"exact.test.\"]\naction = \"reject\"\n",
    );
    let c = conn("192.0.2.1:1", "192.0.2.2:443");
    let hit = verdict(Action::Reject, Some(0));
    assert_eq!(r.decide_tcp_named(&c, Some("A.EXAMPLE.COM."), None), hit);
    assert_eq!(r.decide_tcp_named(&c, Some("exact.test"), None), hit);
    assert_eq!(r.decide_tcp_named(&c, Some("EXACT.TEST."), None), hit);
    let miss = verdict(Action::Relay, None);
    for name in [
        "example.com",
        "",
        ".",
        "xexample.com",
        "exact.test..",
        "a.exact.test",
    ] {
        assert_eq!(r.decide_tcp_named(&c, Some(name), None), miss, "{name:?}");
    }
    let long = format!("{}.example.com", "a.".repeat(200));
    assert_eq!(r.decide_tcp_named(&c, Some(&long), None), miss);
}
