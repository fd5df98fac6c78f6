//! Policy routing for the interception mark, through `ip` (iproute2).
//!
//! The tproxy rule only assigns the packet to a socket and marks it; the packet would
//! still be forwarded towards its destination. The policy rule sends marked packets to
//! a table in which every address is local (`local default dev lo`), so the input path
//! delivers them to the assigned socket:
//!
//! ```text
//! ip rule add fwmark 0x1/0x1 lookup 100
//! ip route add local 0.0.0.0/0 dev lo table 100
//! ip -6 rule add fwmark 0x1/0x1 lookup 100
//! ip -6 route add local ::/0 dev lo table 100
//! ```
//!
//! `ip rule add` happily adds an identical rule twice (each gets its own priority), so
//! setup lists the rules first and adds only what is missing.

use crate::config::Mark;
use crate::plan::{Family, IpRule, LocalRoute};
use crate::runner::Cmd;

fn ip(family: Family, args: &[String]) -> Cmd {
    let mut v: Vec<String> = Vec::new();
    if family == Family::V6 {
        v.push("-6".to_string());
    }
    v.extend(args.iter().cloned());
    Cmd::new("ip", &v)
}

fn words(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_string).collect()
}

/// `ip [-6] rule add fwmark MARK/MASK lookup TABLE`.
pub fn rule_add_cmd(rule: &IpRule) -> Cmd {
    ip(
        rule.family,
        &words(&format!(
            "rule add fwmark {} lookup {}",
            rule.mark, rule.table
        )),
    )
}

/// `ip [-6] rule del [pref N] fwmark MARK/MASK lookup TABLE`; with the priority it
/// deletes exactly the rule setup added even if an identical one exists elsewhere.
pub fn rule_del_cmd(rule: &IpRule, pref: Option<u32>) -> Cmd {
    let pref = pref.map(|p| format!("pref {p} ")).unwrap_or_default();
    ip(
        rule.family,
        &words(&format!(
            "rule del {pref}fwmark {} lookup {}",
            rule.mark, rule.table
        )),
    )
}

/// `ip -N [-6] rule show` (`-N`: tables as numbers, not `rt_tables` names).
pub fn rule_show_cmd(family: Family) -> Cmd {
    let mut args = vec!["-N".to_string()];
    if family == Family::V6 {
        args.push("-6".to_string());
    }
    args.extend(words("rule show"));
    Cmd::new("ip", &args)
}

/// `ip [-6] route add local 0.0.0.0/0 dev lo table TABLE`.
pub fn route_add_cmd(route: &LocalRoute) -> Cmd {
    ip(
        route.family,
        &words(&format!(
            "route add local {} dev lo table {}",
            route.family.any_prefix(),
            route.table
        )),
    )
}

/// `ip [-6] route del local 0.0.0.0/0 dev lo table TABLE`.
pub fn route_del_cmd(route: &LocalRoute) -> Cmd {
    ip(
        route.family,
        &words(&format!(
            "route del local {} dev lo table {}",
            route.family.any_prefix(),
            route.table
        )),
    )
}

/// `ip [-6] route show table TABLE`. (Not `-N`: it would print the route type
/// `local` as `2` and the scope as a number.)
pub fn route_show_cmd(family: Family, table: u32) -> Cmd {
    ip(family, &words(&format!("route show table {table}")))
}

/// One line of `ip rule show`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShownRule {
    /// The priority before the colon.
    pub pref: u32,
    /// The selector and action words after it.
    pub words: Vec<String>,
}

/// Parses `ip rule show` output (`32765:\tfrom all fwmark 0x1/0x1 lookup 100`).
pub fn parse_rules(text: &str) -> Vec<ShownRule> {
    text.lines()
        .filter_map(|line| {
            let (pref, rest) = line.split_once(':')?;
            Some(ShownRule {
                pref: pref.trim().parse().ok()?,
                words: words(rest),
            })
        })
        .collect()
}

/// Parses `ip rule`'s mark: `0x1/0x1`, or `0x1` meaning mask 0xffffffff.
fn parse_shown_mark(text: &str) -> Option<Mark> {
    let (v, m) = match text.split_once('/') {
        Some((v, m)) => (v, Some(m)),
        None => (text, None),
    };
    let value = crate::config::parse_u32(v)?;
    let mask = match m {
        Some(m) => crate::config::parse_u32(m)?,
        None => u32::MAX,
    };
    Some(Mark { value, mask })
}

/// Whether a shown rule is exactly ours: `from all fwmark MARK/MASK lookup TABLE` and
/// no other selector (a `proto` annotation is ignored).
pub fn is_our_rule(shown: &ShownRule, rule: &IpRule) -> bool {
    let mut w: Vec<&str> = Vec::new();
    let mut it = shown.words.iter().map(String::as_str);
    while let Some(word) = it.next() {
        if word == "proto" {
            it.next();
        } else {
            w.push(word);
        }
    }
    let table = rule.table.to_string();
    matches!(
        w.as_slice(),
        ["from", "all", "fwmark", mark, "lookup", t]
            if *t == table && parse_shown_mark(mark) == Some(rule.mark)
    )
}

/// The priorities of the rules in `shown` that are exactly `rule`.
pub fn find_rule(shown: &[ShownRule], rule: &IpRule) -> Vec<u32> {
    shown
        .iter()
        .filter(|s| is_our_rule(s, rule))
        .map(|s| s.pref)
        .collect()
}

/// What a policy table holds: whether our local default route is there, and any
/// other route (a conflict: marked packets matching it would not be delivered locally).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableRoutes {
    /// `local default dev lo ...` is present.
    pub ours: bool,
    /// Every other route, one line each.
    pub foreign: Vec<String>,
}

/// Parses `ip route show table N` output.
pub fn parse_table(text: &str) -> TableRoutes {
    let mut out = TableRoutes::default();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let w: Vec<&str> = line.split_whitespace().collect();
        if w.starts_with(&["local", "default", "dev", "lo"]) {
            out.ours = true;
        } else {
            out.foreign.push(line.to_string());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(family: Family) -> IpRule {
        IpRule {
            family,
            mark: Mark { value: 1, mask: 1 },
            table: 100,
        }
    }

    #[test]
    fn commands() {
        assert_eq!(
            rule_add_cmd(&rule(Family::V4)).to_string(),
            "ip rule add fwmark 0x1/0x1 lookup 100"
        );
        assert_eq!(
            rule_del_cmd(&rule(Family::V6), Some(32765)).to_string(),
            "ip -6 rule del pref 32765 fwmark 0x1/0x1 lookup 100"
        );
        let r6 = LocalRoute {
            family: Family::V6,
            table: 100,
        };
        assert_eq!(
            route_add_cmd(&r6).to_string(),
            "ip -6 route add local ::/0 dev lo table 100"
        );
        assert_eq!(rule_show_cmd(Family::V6).to_string(), "ip -N -6 rule show");
        assert_eq!(
            route_show_cmd(Family::V4, 100).to_string(),
            "ip route show table 100"
        );
    }

    #[test]
    fn finds_exactly_our_rule() {
        let shown = parse_rules(
            "0:\tfrom all lookup 255\n32763:\tfrom all fwmark 0x1/0x1 lookup 100\n32764:\tfrom all fwmark 0x1 lookup 100\n32762:\tfrom all fwmark 0x1/0x1 iif eth0 lookup 100\n32761:\tfrom all fwmark 0x1/0x1 lookup 100 proto static\n32766:\tfrom all lookup 254\n",
        );
        assert_eq!(shown.len(), 6);
        assert_eq!(find_rule(&shown, &rule(Family::V4)), vec![32763, 32761]);
    }

    #[test]
    fn table_contents() {
        let t = parse_table("local default dev lo scope host \n10.0.0.0/8 via 1.2.3.4 dev eth0\n");
        assert!(t.ours);
        assert_eq!(t.foreign, vec!["10.0.0.0/8 via 1.2.3.4 dev eth0"]);
        let t6 = parse_table("local default dev lo metric 1024 pref medium\n");
        assert!(t6.ours && t6.foreign.is_empty());
        assert_eq!(parse_table(""), TableRoutes::default());
    }
}
