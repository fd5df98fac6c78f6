//! Renders the plan as `iptables-restore --noflush` / `ip6tables-restore --noflush`
//! input (the iptables backend).
//!
//! `--noflush` leaves every chain the input does not name alone; the chains it names
//! are flushed and refilled, and one table section (`*mangle` ... `COMMIT`) is applied
//! as one commit. Our rules live in two dedicated mangle chains; the only thing we add
//! to a shared chain is one `-j RINGRELAY` jump from `PREROUTING`, and only when it is
//! missing.
//!
//! The `TPROXY` target differs from nft `tproxy`: it is terminal (accepts on success)
//! and DROPS the packet when it finds no socket, so this backend is always fail-closed.
//! Rules are written in the canonical form `iptables-save` prints them back in
//! (`-p udp -m udp --dport 53`, `--on-ip 0.0.0.0`).

use crate::plan::{
    Family, FirewallPlan, IfaceSel, Match, Plan, Rule, Verdict, IPT_CHAIN, IPT_TPROXY_CHAIN,
};
use crate::ports::{multiport_chunks, PortRange};
use crate::runner::Cmd;
use std::fmt::Write;

/// `iptables-restore --noflush` (or the ip6 twin) with `input` on stdin.
pub fn restore_cmd(family: Family, input: String) -> Cmd {
    Cmd::new(family.iptables_restore(), &["--noflush"]).with_stdin(input)
}

/// `iptables-save -t mangle` (or the ip6 twin).
pub fn save_cmd(family: Family) -> Cmd {
    Cmd::new(family.iptables_save(), &["-t", "mangle"])
}

/// `iptables -V`: prints `(nf_tables)` or `(legacy)` after the version.
pub fn version_cmd() -> Cmd {
    Cmd::new("iptables", &["-V"])
}

/// The jump line as `iptables-save` prints it.
pub fn jump_line() -> String {
    format!("-A PREROUTING -j {IPT_CHAIN}")
}

/// The restore input for one family. `add_jump`: whether `PREROUTING` still lacks the
/// jump (found by [`parse_save`] just before); it is inserted first in the chain so
/// that other mangle rules cannot change the packet before we see it.
pub fn render_apply(plan: &Plan, family: Family, add_jump: bool) -> String {
    let fw = &plan.firewall;
    let c = &plan.config;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# ringrelay: TPROXY interception for the ringrelay engine ({}), written by `setup apply`.",
        match family {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    );
    let _ = writeln!(
        s,
        "# port {}, interception mark {}, policy table {}, bypass mark {:#x}.",
        c.port, c.fwmark, c.table, c.bypass_mark
    );
    let _ = writeln!(
        s,
        "# Fail-closed: the TPROXY target drops a packet when nothing listens on port {}.",
        c.port
    );
    let _ = writeln!(
        s,
        "# Fed to `{} --noflush`: only the chains named here change, in one commit.",
        family.iptables_restore()
    );
    let _ = writeln!(s, "*mangle");
    let _ = writeln!(s, ":{IPT_CHAIN} - [0:0]");
    let _ = writeln!(s, ":{IPT_TPROXY_CHAIN} - [0:0]");
    let _ = writeln!(s, "-F {IPT_CHAIN}");
    let _ = writeln!(s, "-F {IPT_TPROXY_CHAIN}");
    for rule in &fw.exclusions {
        write_rule(&mut s, IPT_CHAIN, rule, family);
    }
    write_dispatch(&mut s, fw);
    // After the dispatch, which sent the client-side interfaces away for good (`-g`):
    // what reaches these rules arrived on another interface.
    for rule in &fw.return_path {
        write_comment(&mut s, &format!("{}\n{RETURN_PATH_NOTE}", rule.why));
        for line in render_rule(IPT_CHAIN, rule, family) {
            let _ = writeln!(s, "{line}");
        }
    }
    for rule in fw.intercept.iter().filter(|r| r.family() == Some(family)) {
        write_rule(&mut s, IPT_TPROXY_CHAIN, rule, family);
    }
    if fw.intercept.iter().any(|r| r.verdict == Verdict::Drop) {
        write_comment(
            &mut s,
            "Fail-closed needs no drop rule: TPROXY drops packets it finds no socket for.",
        );
    }
    if add_jump {
        let _ = writeln!(s, "# The one jump from PREROUTING (it was missing).");
        let _ = writeln!(s, "-I PREROUTING 1 -j {IPT_CHAIN}");
    }
    let _ = writeln!(s, "COMMIT");
    s
}

/// What the iptables form of the return-path rule tests, and what it cannot.
const RETURN_PATH_NOTE: &str =
    "-m socket skips sockets bound to the wildcard address, so the engine's\n\
listeners never take server-side traffic. iptables has no route lookup match\n\
(nft also requires the destination to be routed to a client-side interface):\n\
a datagram that arrives on another non-client interface for a destination\n\
clients talk to over UDP goes to the engine's reply socket bound to it.\n\
MARK does not end the chain, but RINGRELAY ends here: the mark routes it.";

fn write_comment(s: &mut String, why: &str) {
    for line in why.lines() {
        let _ = writeln!(s, "# {line}");
    }
}

fn write_dispatch(s: &mut String, fw: &FirewallPlan) {
    match &fw.ifaces {
        IfaceSel::AllButLo => {
            write_comment(
                s,
                "Every interface but lo is intercepted (lo returned above).",
            );
            let _ = writeln!(s, "-A {IPT_CHAIN} -j {IPT_TPROXY_CHAIN}");
        }
        IfaceSel::Only(names) if fw.has_return_path() => {
            write_comment(
                s,
                &format!(
                    "Only traffic arriving on {} is intercepted. Goto (-g), not jump: it never\ncomes back to the return path below, which is for the other interfaces.",
                    names.join(", ")
                ),
            );
            for name in names {
                let _ = writeln!(s, "-A {IPT_CHAIN} -i {name} -g {IPT_TPROXY_CHAIN}");
            }
        }
        IfaceSel::Only(names) => {
            write_comment(
                s,
                &format!(
                    "Only traffic arriving on {} is intercepted.",
                    names.join(", ")
                ),
            );
            for name in names {
                let _ = writeln!(s, "-A {IPT_CHAIN} -i {name} -j {IPT_TPROXY_CHAIN}");
            }
        }
    }
}

fn write_rule(s: &mut String, chain: &str, rule: &Rule, family: Family) {
    if let Verdict::Drop = rule.verdict {
        // TPROXY already dropped what it could not deliver; nothing reaches here.
        return;
    }
    write_comment(s, &rule.why);
    for line in render_rule(chain, rule, family) {
        let _ = writeln!(s, "{line}");
    }
}

/// The `-A` lines of one rule: several when a port list needs more than one
/// multiport match, when several address types need one addrtype match each, or when
/// several protocols need one `-p` each. Matches keep their order, so the lines come
/// out in the canonical form `iptables-save` prints.
pub fn render_rule(chain: &str, rule: &Rule, family: Family) -> Vec<String> {
    // Each match is one slot of words; at most one slot has alternatives, and each
    // alternative makes one rule line.
    let mut slots: Vec<Vec<String>> = Vec::new();
    let mut proto = "";
    for m in &rule.matches {
        match m {
            Match::IifName(name) => slots.push(vec![format!("-i {name}")]),
            Match::MarkBits(bits) => {
                slots.push(vec![format!("-m mark --mark {bits:#x}/{bits:#x}")])
            }
            Match::DstAddrType(types) => slots.push(
                types
                    .iter()
                    .filter(|t| t.in_family(family))
                    .map(|t| format!("-m addrtype --dst-type {}", t.iptables()))
                    .collect(),
            ),
            // The binary (iptables or ip6tables) selects the family.
            Match::Family(_) => {}
            Match::L4(p) => {
                proto = p.name();
                slots.push(vec![format!("-p {proto}")]);
            }
            Match::DstPorts(ranges) => slots.push(
                multiport_chunks(ranges)
                    .iter()
                    .map(|chunk| port_match(proto, chunk))
                    .collect(),
            ),
            // The interface dispatch before the rule took the client-side interfaces
            // away with `-g` (see `render_apply`).
            Match::IifNameNot(_) => {}
            // No route lookup match in iptables (see RETURN_PATH_NOTE).
            Match::RouteOifName(_) => {}
            Match::Protos(protos) => slots.push(
                protos
                    .iter()
                    .filter(|p| p.in_family(family))
                    .map(|p| format!("-p {}", p.name()))
                    .collect(),
            ),
            Match::TransparentSocket => slots.push(vec!["-m socket --transparent".to_string()]),
        }
    }
    debug_assert!(slots.iter().filter(|s| s.len() > 1).count() <= 1);
    let target = match &rule.verdict {
        Verdict::Return => "-j RETURN".to_string(),
        Verdict::Drop => "-j DROP".to_string(),
        Verdict::Tproxy { port, mark, .. } => format!(
            "-j TPROXY --on-port {port} --on-ip {} --tproxy-mark {mark}",
            match family {
                Family::V4 => "0.0.0.0",
                Family::V6 => "::",
            }
        ),
        // --set-xmark clears the mask's bits, then sets the value's: other bits stay.
        Verdict::Mark(mark) => format!("-j MARK --set-xmark {mark}"),
    };
    let alternatives = slots.iter().position(|s| s.len() != 1);
    let choices: Vec<usize> = match alternatives {
        Some(i) => (0..slots[i].len()).collect(),
        None => vec![0],
    };
    choices
        .into_iter()
        .map(|choice| {
            let mut words = vec![format!("-A {chain}")];
            for (i, slot) in slots.iter().enumerate() {
                words.push(if Some(i) == alternatives {
                    slot[choice].clone()
                } else {
                    slot[0].clone()
                });
            }
            words.push(target.clone());
            words.join(" ")
        })
        .collect()
}

/// `-m tcp --dport 80` for one port or range, else `-m multiport --dports 80,443,8000:8100`.
fn port_match(proto: &str, chunk: &[PortRange]) -> String {
    if let [one] = chunk {
        format!("-m {proto} --dport {}", one.render(':'))
    } else {
        let list: Vec<String> = chunk.iter().map(|r| r.render(':')).collect();
        format!("-m multiport --dports {}", list.join(","))
    }
}

/// What `iptables-save -t mangle` says about our objects.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SavedMangle {
    /// How many `-A PREROUTING -j RINGRELAY` lines there are.
    pub jumps: usize,
    /// Which of our chains exist.
    pub chains: Vec<String>,
    /// Our lines (chain rules and jumps), for the fingerprint.
    pub lines: Vec<String>,
}

/// Finds our chains, rules and jumps in `iptables-save -t mangle` output.
pub fn parse_save(save: &str) -> SavedMangle {
    let ours = |chain: &str| chain == IPT_CHAIN || chain == IPT_TPROXY_CHAIN;
    let jump = jump_line();
    let mut out = SavedMangle::default();
    for line in save.lines().map(str::trim) {
        if let Some(decl) = line.strip_prefix(':') {
            let name = decl.split_whitespace().next().unwrap_or("");
            if ours(name) {
                out.chains.push(name.to_string());
            }
        } else if let Some(rest) = line.strip_prefix("-A ") {
            let chain = rest.split_whitespace().next().unwrap_or("");
            if line == jump {
                out.jumps += 1;
                out.lines.push(line.to_string());
            } else if ours(chain) {
                out.lines.push(line.to_string());
            }
        }
    }
    out
}

/// The restore input that removes our jump(s) and chains, given what exists now;
/// `None` when nothing of ours is left.
pub fn render_teardown(saved: &SavedMangle) -> Option<String> {
    if saved.jumps == 0 && saved.chains.is_empty() {
        return None;
    }
    let mut s =
        String::from("# ringrelay: remove the interception chains (setup teardown)\n*mangle\n");
    for _ in 0..saved.jumps {
        let _ = writeln!(s, "-D PREROUTING -j {IPT_CHAIN}");
    }
    // Flush both before deleting either: RINGRELAY refers to RINGRELAY_TPROXY.
    for chain in [IPT_CHAIN, IPT_TPROXY_CHAIN] {
        if saved.chains.iter().any(|c| c == chain) {
            let _ = writeln!(s, "-F {chain}");
        }
    }
    for chain in [IPT_CHAIN, IPT_TPROXY_CHAIN] {
        if saved.chains.iter().any(|c| c == chain) {
            let _ = writeln!(s, "-X {chain}");
        }
    }
    let _ = writeln!(s, "COMMIT");
    Some(s)
}

/// Whether `iptables -V` names the nf_tables variant (iptables-nft), whose mangle
/// table is an nft `table ip mangle` that `nft list ruleset` shows.
pub fn is_nf_tables_variant(version_output: &str) -> bool {
    version_output.contains("nf_tables")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVE: &str = "# Generated by iptables-save v1.8.9 (nf_tables)
*mangle
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:RINGRELAY - [0:0]
:RINGRELAY_TPROXY - [0:0]
:OTHER - [0:0]
-A PREROUTING -j RINGRELAY
-A PREROUTING -j OTHER
-A RINGRELAY -i lo -j RETURN
-A RINGRELAY_TPROXY -p tcp -j TPROXY --on-port 15001 --on-ip 0.0.0.0 --tproxy-mark 0x1/0x1
-A OTHER -j RETURN
COMMIT
";

    #[test]
    fn parses_our_objects_only() {
        let saved = parse_save(SAVE);
        assert_eq!(saved.jumps, 1);
        assert_eq!(saved.chains, vec!["RINGRELAY", "RINGRELAY_TPROXY"]);
        assert_eq!(saved.lines.len(), 3);
        assert!(!saved.lines.iter().any(|l| l.contains("OTHER")));
    }

    #[test]
    fn teardown_removes_what_exists() {
        let saved = parse_save(SAVE);
        assert_eq!(
            render_teardown(&saved).unwrap(),
            "# ringrelay: remove the interception chains (setup teardown)\n*mangle\n-D PREROUTING -j RINGRELAY\n-F RINGRELAY\n-F RINGRELAY_TPROXY\n-X RINGRELAY\n-X RINGRELAY_TPROXY\nCOMMIT\n"
        );
        assert_eq!(render_teardown(&SavedMangle::default()), None);
    }

    #[test]
    fn variant_detection() {
        assert!(is_nf_tables_variant("iptables v1.8.9 (nf_tables)"));
        assert!(!is_nf_tables_variant("iptables v1.8.9 (legacy)"));
    }
}
