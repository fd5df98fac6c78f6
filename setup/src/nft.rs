//! Renders the plan as one `nft -f -` script (the nft backend).
//!
//! Everything lives in one dedicated `inet` table, so one transaction can replace it
//! and teardown can delete it without looking at anything else on the box. An `inet`
//! table sees IPv4 and IPv6; `tproxy ip to` / `tproxy ip6 to` pick the family and need
//! the `meta nfproto` match in front of them.

use crate::config::{FailMode, Mark};
use crate::plan::{
    AddrType, FirewallPlan, IfaceSel, Match, Plan, Rule, Verdict, NFT_CHAIN, NFT_TABLE,
    NFT_TABLE_COMMENT,
};
use crate::ports::PortRange;
use crate::runner::Cmd;
use std::fmt::Write;

/// `nft -f -`: reads the script from stdin and commits it as one transaction.
pub fn apply_cmd(script: String) -> Cmd {
    Cmd::new("nft", &["-f", "-"]).with_stdin(script)
}

/// `nft list table inet ringrelay`: what the kernel holds, normalised by nft.
pub fn list_cmd() -> Cmd {
    Cmd::new("nft", &["list", "table", "inet", NFT_TABLE])
}

/// The script that deletes our table whether or not it exists: declaring an empty
/// table is a no-op when it exists, so the delete in the same transaction never fails.
/// (`destroy table` does the same but needs nft 1.0.8 and Linux 6.3.)
pub fn teardown_script() -> String {
    format!(
        "# ringrelay: remove the interception table (setup teardown)\ntable inet {NFT_TABLE} {{}}\ndelete table inet {NFT_TABLE}\n"
    )
}

/// The whole apply script. `--dry-run` prints exactly this.
pub fn render_apply(plan: &Plan) -> String {
    let fw = &plan.firewall;
    let c = &plan.config;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# ringrelay: TPROXY interception for the ringrelay engine, written by `setup apply`."
    );
    let _ = writeln!(
        s,
        "# port {}, interception mark {}, policy table {}, bypass mark {:#x}.",
        c.port, c.fwmark, c.table, c.bypass_mark
    );
    if fw.has_return_path() {
        let _ = writeln!(
            s,
            "# Source {}: upstream connections carry the client's address; the return path\n# below delivers the servers' replies to them.",
            c.source.name()
        );
    }
    match fw.fail_mode {
        FailMode::Open => {
            let _ = writeln!(
                s,
                "# Fail-open: while nothing listens on port {}, tproxy finds no socket, does not\n# match, and the traffic is forwarded untouched.",
                c.port
            );
        }
        FailMode::Closed => {
            let _ = writeln!(
                s,
                "# Fail-closed: while nothing listens on port {}, intercepted traffic is dropped.",
                c.port
            );
        }
    }
    let _ = writeln!(
        s,
        "# Do not edit: re-run `setup apply`; `setup teardown` deletes the table."
    );
    let _ = writeln!(s, "#");
    let _ = writeln!(
        s,
        "# One transaction: declaring the table first lets the delete succeed whether or not\n# it exists, so re-applying replaces the table and never duplicates a rule."
    );
    let _ = writeln!(s, "table inet {NFT_TABLE} {{}}");
    let _ = writeln!(s, "delete table inet {NFT_TABLE}");
    let _ = writeln!(s);
    let _ = writeln!(s, "table inet {NFT_TABLE} {{");
    let _ = writeln!(
        s,
        "\t# The marker that tells setup this table is its own (it refuses to replace a\n\t# table of the same name that lacks it)."
    );
    let _ = writeln!(s, "\tcomment \"{NFT_TABLE_COMMENT}\"");
    let _ = writeln!(s, "\tchain {NFT_CHAIN} {{");
    let _ = writeln!(
        s,
        "\t\t# Priority mangle (-150): after conntrack (-200), before the routing decision\n\t\t# that the interception mark steers."
    );
    let _ = writeln!(
        s,
        "\t\ttype filter hook prerouting priority mangle; policy accept;"
    );
    for rule in &fw.exclusions {
        write_rule(&mut s, rule);
    }
    for rule in &fw.return_path {
        write_comment(
            &mut s,
            &format!("{}\n{}", rule.why, return_path_note(c.port)),
        );
        let _ = writeln!(s, "\t\t{}", render_rule(rule));
    }
    write_iface_filter(&mut s, fw);
    for rule in &fw.intercept {
        write_rule(&mut s, rule);
    }
    let _ = writeln!(s, "\t}}");
    let _ = writeln!(s, "}}");
    s
}

/// What the nft form of the return-path rule tests beyond the socket, and why.
fn return_path_note(port: u16) -> String {
    format!(
        "`fib daddr oifname`: only packets routed to the client side, so a datagram from\n\
         another non-client interface to a destination clients talk to is not taken by\n\
         the engine's reply socket bound to that destination.\n\
         `socket wildcard 0`: never the engine's listeners on 0.0.0.0 and :: port {port},\n\
         which would take server-side connections to port {port} of any address."
    )
}

fn write_comment(s: &mut String, why: &str) {
    if why.is_empty() {
        return;
    }
    let _ = writeln!(s);
    for line in why.lines() {
        let _ = writeln!(s, "\t\t# {line}");
    }
}

fn write_iface_filter(s: &mut String, fw: &FirewallPlan) {
    match &fw.ifaces {
        IfaceSel::AllButLo => {
            write_comment(
                s,
                "Every interface but lo is intercepted (lo returned above).",
            );
        }
        IfaceSel::Only(names) => {
            write_comment(
                s,
                &format!(
                    "Only traffic arriving on {} is intercepted.",
                    names.join(", ")
                ),
            );
            let _ = writeln!(s, "\t\tiifname != {} return", set_of_names(names));
        }
    }
}

fn write_rule(s: &mut String, rule: &Rule) {
    write_comment(s, &rule.why);
    let _ = writeln!(s, "\t\t{}", render_rule(rule));
}

/// One rule on one line, without indentation.
pub fn render_rule(rule: &Rule) -> String {
    let mut parts: Vec<String> = rule.matches.iter().map(render_match).collect();
    parts.push(render_verdict(&rule.verdict));
    parts.join(" ")
}

fn render_match(m: &Match) -> String {
    match m {
        Match::IifName(name) => format!("iifname {}", quote(name)),
        Match::MarkBits(bits) => format!("meta mark & {bits:#x} == {bits:#x}"),
        Match::DstAddrType(types) => {
            let names: Vec<&str> = types.iter().map(|t: &AddrType| t.nft()).collect();
            format!("fib daddr type {}", set_or_single(&names))
        }
        Match::Family(f) => format!("meta nfproto {}", f.nfproto()),
        Match::L4(p) => format!("meta l4proto {}", p.name()),
        Match::DstPorts(ranges) => {
            let items: Vec<String> = ranges.iter().map(|r: &PortRange| r.render('-')).collect();
            let refs: Vec<&str> = items.iter().map(String::as_str).collect();
            format!("th dport {}", set_or_single(&refs))
        }
        Match::IifNameNot(names) => format!("iifname != {}", set_of_names(names)),
        Match::RouteOifName(names) => format!("fib daddr oifname {}", set_of_names(names)),
        Match::Protos(protos) => {
            let names: Vec<&str> = protos.iter().map(|p| p.name()).collect();
            format!("meta l4proto {}", set_or_single(&names))
        }
        // Each `socket` expression looks the socket up; `wildcard` needs a full socket
        // (not TIME_WAIT) and is false for one bound to a specific address.
        Match::TransparentSocket => "socket transparent 1 socket wildcard 0".to_string(),
    }
}

fn render_verdict(v: &Verdict) -> String {
    match v {
        Verdict::Return => "return".to_string(),
        Verdict::Drop => "drop".to_string(),
        // tproxy is not terminal and sets no mark: set the mark and accept explicitly.
        Verdict::Tproxy { family, port, mark } => format!(
            "tproxy {} to :{} meta mark set {} accept",
            family.nft_family(),
            port,
            mark_set_expr(*mark)
        ),
        Verdict::Mark(mark) => format!("meta mark set {} accept", mark_set_expr(*mark)),
    }
}

/// `meta mark | 0x1` when the mask equals the value, else `meta mark & ~mask | value`:
/// only the bits of the interception mask change, other marks on the packet survive.
fn mark_set_expr(mark: Mark) -> String {
    if mark.value == mark.mask {
        format!("meta mark | {:#x}", mark.value)
    } else {
        format!("meta mark & {:#x} | {:#x}", !mark.mask, mark.value)
    }
}

fn set_or_single(items: &[&str]) -> String {
    if items.len() == 1 {
        items[0].to_string()
    } else {
        format!("{{ {} }}", items.join(", "))
    }
}

fn set_of_names(names: &[String]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| quote(n)).collect();
    let refs: Vec<&str> = quoted.iter().map(String::as_str).collect();
    set_or_single(&refs)
}

/// Interface names are validated (no quotes, no whitespace), so plain quoting is safe.
fn quote(name: &str) -> String {
    format!("\"{name}\"")
}

/// Whether an `nft list table` listing carries setup's marker comment.
pub fn has_marker(listing: &str) -> bool {
    listing
        .lines()
        .any(|l| l.trim() == format!("comment \"{NFT_TABLE_COMMENT}\""))
}

/// The comparable form of an `nft list table` listing: trimmed, non-empty lines.
pub fn fingerprint(listing: &str) -> Vec<String> {
    listing
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::plan::build;

    #[test]
    fn mark_expressions() {
        assert_eq!(mark_set_expr(Mark { value: 1, mask: 1 }), "meta mark | 0x1");
        assert_eq!(
            mark_set_expr(Mark {
                value: 0x10,
                mask: 0xf0
            }),
            "meta mark & 0xffffff0f | 0x10"
        );
    }

    #[test]
    fn script_replaces_table_atomically() {
        let script = render_apply(&build(&Config::default(), &[]));
        let first: Vec<&str> = script
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .take(3)
            .collect();
        assert_eq!(
            first,
            vec![
                "table inet ringrelay {}",
                "delete table inet ringrelay",
                "table inet ringrelay {"
            ]
        );
        assert!(script.contains(
            "meta nfproto ipv4 meta l4proto tcp tproxy ip to :15001 meta mark set meta mark | 0x1 accept"
        ));
        assert!(script.contains(
            "meta nfproto ipv6 meta l4proto udp tproxy ip6 to :15001 meta mark set meta mark | 0x1 accept"
        ));
        // The TIME_WAIT trap: no socket pre-match anywhere.
        assert!(!script
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .any(|l| l.contains("socket")));
    }

    #[test]
    fn return_path_rule_comes_before_the_interface_filter() {
        let config = Config {
            source: crate::config::Source::ClientIp,
            in_ifaces: vec!["lan0".into(), "lan1".into()],
            ..Config::default()
        };
        let script = render_apply(&build(&config, &[]));
        let rules: Vec<&str> = script
            .lines()
            .map(str::trim)
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .collect();
        let rp = "iifname != { \"lan0\", \"lan1\" } fib daddr oifname { \"lan0\", \"lan1\" } meta l4proto { tcp, udp, icmp, ipv6-icmp } socket transparent 1 socket wildcard 0 meta mark set meta mark | 0x1 accept";
        let at = |needle: &str| rules.iter().position(|l| *l == needle).unwrap();
        assert!(at("meta mark & 0x2 == 0x2 return") < at(rp), "{script}");
        assert!(
            at(rp) < at("iifname != { \"lan0\", \"lan1\" } return"),
            "{script}"
        );
        // Only that one rule looks at sockets.
        assert_eq!(rules.iter().filter(|l| l.contains("socket")).count(), 1);
    }

    #[test]
    fn fingerprint_ignores_layout() {
        assert_eq!(
            fingerprint("table inet x {\n\tchain c {\n\n\t}\n}\n# Warning\n"),
            vec!["table inet x {", "chain c {", "}", "}"]
        );
    }
}
