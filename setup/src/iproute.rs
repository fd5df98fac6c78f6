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
//!
//! Every rule and route setup adds carries the routing protocol [`RT_PROTO`]
//! (`proto 114`, Linux 4.17 and iproute2 4.17 for rules): rules and routes have no
//! names, and the tag is how teardown finds setup's own after the state file is lost
//! (and how apply recognises them as its own).

use crate::config::Mark;
use crate::plan::{Family, IpRule, LocalRoute};
use crate::runner::Cmd;

/// The routing protocol number on every rule and route setup adds (`proto 114`; 114 is
/// 'r', and unassigned in iproute2's `rt_protos`). Name it in
/// `/etc/iproute2/rt_protos.d/ringrelay.conf` (`114 ringrelay`) to see a name.
pub const RT_PROTO: u8 = 114;

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
            "rule add fwmark {} lookup {} proto {RT_PROTO}",
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
            "route add local {} dev lo table {} proto {RT_PROTO}",
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

/// `ip -4|-6 -N route show table all proto 114`: every route setup added, in any table.
pub fn tagged_routes_cmd(family: Family) -> Cmd {
    let fam = match family {
        Family::V4 => "-4",
        Family::V6 => "-6",
    };
    Cmd::new(
        "ip",
        &[
            fam,
            "-N",
            "route",
            "show",
            "table",
            "all",
            "proto",
            &RT_PROTO.to_string(),
        ],
    )
}

/// The tables of the `local default dev lo` routes in [`tagged_routes_cmd`]'s output
/// (`2 default dev lo table 100 scope 254`: with `-N` the type `local` is `2`).
pub fn parse_tagged_routes(text: &str) -> Vec<u32> {
    let mut tables: Vec<u32> = text
        .lines()
        .filter_map(|line| {
            let w: Vec<&str> = line.split_whitespace().collect();
            let local = matches!(w.first(), Some(&"local" | &"2"));
            if !local || w.get(1..4) != Some(&["default", "dev", "lo"]) {
                return None;
            }
            let i = w.iter().position(|x| *x == "table")?;
            w.get(i + 1)?.parse().ok()
        })
        .collect();
    tables.sort_unstable();
    tables.dedup();
    tables
}

/// `ip [-6] route del local default dev lo table TABLE`.
pub fn route_del_in_table_cmd(family: Family, table: u32) -> Cmd {
    route_del_cmd(&LocalRoute { family, table })
}

/// A rule setup added, found by its tag: priority, mark as shown, table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaggedRule {
    /// Priority.
    pub pref: u32,
    /// `0x1/0x1` as `ip rule` shows it.
    pub mark: String,
    /// The table looked up.
    pub table: String,
}

/// The `fwmark M lookup T proto 114` rules among `ip rule show`'s.
pub fn tagged_rules(shown: &[ShownRule]) -> Vec<TaggedRule> {
    shown
        .iter()
        .filter(|s| is_tagged(s))
        .filter_map(|s| {
            let at = |k: &str| {
                s.words
                    .iter()
                    .position(|w| w == k)
                    .and_then(|i| s.words.get(i + 1))
                    .cloned()
            };
            Some(TaggedRule {
                pref: s.pref,
                mark: at("fwmark")?,
                table: at("lookup")?,
            })
        })
        .collect()
}

/// `ip [-6] rule del pref N fwmark M lookup T`.
pub fn tagged_rule_del_cmd(family: Family, rule: &TaggedRule) -> Cmd {
    ip(
        family,
        &words(&format!(
            "rule del pref {} fwmark {} lookup {}",
            rule.pref, rule.mark, rule.table
        )),
    )
}

/// Whether a shown rule carries setup's tag (`proto 114`).
pub fn is_tagged(shown: &ShownRule) -> bool {
    let p = RT_PROTO.to_string();
    shown.words.windows(2).any(|w| w[0] == "proto" && w[1] == p)
}

/// The command without setup's tag, for messages (`ip rule fwmark ...`).
pub fn untagged(cmd: &Cmd) -> String {
    cmd.to_string().replace(&format!(" proto {RT_PROTO}"), "")
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
    /// ... and carries setup's tag (`proto 114`): setup added it.
    pub tagged: bool,
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
            let p = RT_PROTO.to_string();
            out.tagged |= w.windows(2).any(|x| x[0] == "proto" && x[1] == p);
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
            "ip rule add fwmark 0x1/0x1 lookup 100 proto 114"
        );
        assert_eq!(
            untagged(&rule_add_cmd(&rule(Family::V4))),
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
            "ip -6 route add local ::/0 dev lo table 100 proto 114"
        );
        assert_eq!(
            tagged_routes_cmd(Family::V4).to_string(),
            "ip -4 -N route show table all proto 114"
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
    fn finds_tagged_rules_and_routes() {
        let shown = parse_rules(
            "0:\tfrom all lookup 255\n32765:\tfrom all fwmark 0x1/0x1 lookup 100 proto 114\n32764:\tfrom all fwmark 0x1/0x1 lookup 100\n32766:\tfrom all lookup 254\n",
        );
        let tagged = tagged_rules(&shown);
        assert_eq!(
            tagged,
            vec![TaggedRule {
                pref: 32765,
                mark: "0x1/0x1".into(),
                table: "100".into()
            }]
        );
        assert_eq!(
            tagged_rule_del_cmd(Family::V6, &tagged[0]).to_string(),
            "ip -6 rule del pref 32765 fwmark 0x1/0x1 lookup 100"
        );
        assert_eq!(
            parse_tagged_routes(
                "2 default dev lo table 100 scope 254 \n2 default dev lo table 123 metric 1024 pref medium\n2 default dev lo table 100 scope 254\nunreachable default table 7\n"
            ),
            vec![100, 123]
        );
        let t = parse_table("local default dev lo proto 114 scope host \n");
        assert!(t.ours && t.tagged);
        assert!(!parse_table("local default dev lo scope host\n").tagged);
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
