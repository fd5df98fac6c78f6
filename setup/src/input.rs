//! The box's own firewall: would its input hook drop the packets tproxy hands to the
//! engine?
//!
//! A TPROXY-delivered packet is routed locally (`local default dev lo` in the policy
//! table) and so traverses the INPUT hook before it reaches the engine's socket, with
//! the interception mark set and its original (not local) destination address. A
//! router whose input chain has `policy drop` (the usual hand-built nft or iptables
//! firewall) drops every intercepted flow the moment the rules are in place, unless it
//! accepts the mark first: `meta mark & 0x1 == 0x1 accept`, or in iptables
//! `-m mark --mark 0x1/0x1 -j ACCEPT`.
//!
//! This module reads the live rule sets (`nft list ruleset`, `iptables-save -t filter`),
//! models each input base chain as a list of rules, and evaluates it for the packets
//! that matter: each intercepted family, protocol and interface, as the first packet of
//! a flow (conntrack `new`) and as a later one (`established`). It understands the
//! matches input chains are built from (interface, protocol, family, mark, conntrack
//! state, packet type) and treats any other match as "not every intercepted packet":
//! such a rule is assumed not to match, so a finding means "at least the packets not
//! singled out by some rule are dropped". Every base chain on the hook must let a
//! packet through (an accept in one chain does not stop the next), so each chain is
//! checked on its own and the fix goes into that chain.

use crate::config::Mark;
use crate::error::SetupError;
use crate::host::{run_any, run_checked};
use crate::plan::{Family, L4};
use crate::runner::{Cmd, Runner};
use std::fmt;

/// The comment on the accept rule `setup apply --accept-input` inserts; teardown finds
/// the rule by it (with or without the state file).
pub const ACCEPT_COMMENT: &str = "ringrelay: setup apply --accept-input";

/// A chain that can receive our accept rule.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum InputTarget {
    /// An nft base chain: `family table chain` (`inet filter input`).
    Nft {
        /// `ip`, `ip6` or `inet`.
        family: String,
        /// Table name.
        table: String,
        /// Chain name.
        chain: String,
    },
    /// The iptables (v4) or ip6tables (v6) filter table's `INPUT` chain.
    Iptables(Family),
}

impl fmt::Display for InputTarget {
    /// `nft chain inet filter input` / `iptables filter chain INPUT`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InputTarget::Nft {
                family,
                table,
                chain,
            } => write!(f, "nft chain {family} {table} {chain}"),
            InputTarget::Iptables(fam) => write!(f, "{} filter chain INPUT", fam.iptables()),
        }
    }
}

impl InputTarget {
    /// The state-file form: `nft inet filter input` / `iptables v4`.
    pub fn render(&self) -> String {
        match self {
            InputTarget::Nft {
                family,
                table,
                chain,
            } => format!("nft {family} {table} {chain}"),
            InputTarget::Iptables(fam) => format!("iptables {}", fam.name()),
        }
    }

    /// Parses [`render`](Self::render)'s words.
    pub fn parse(words: &[&str]) -> Option<InputTarget> {
        match words {
            ["nft", family, table, chain] => Some(InputTarget::Nft {
                family: family.to_string(),
                table: table.to_string(),
                chain: chain.to_string(),
            }),
            ["iptables", fam] => Family::from_name(fam).map(InputTarget::Iptables),
            _ => None,
        }
    }

    /// The families whose packets pass this chain.
    pub fn families(&self) -> Vec<Family> {
        match self {
            InputTarget::Nft { family, .. } => nft_families(family),
            InputTarget::Iptables(f) => vec![*f],
        }
    }

    /// The accept rule in this chain's syntax.
    pub fn rule_text(&self, mark: Mark) -> String {
        match self {
            InputTarget::Nft { .. } => {
                format!("meta mark & {:#x} == {:#x} accept", mark.mask, mark.value)
            }
            InputTarget::Iptables(_) => format!("-m mark --mark {mark} -j ACCEPT"),
        }
    }

    /// The command an operator types to fix it by hand (what `--accept-input` does,
    /// minus the comment).
    pub fn manual_fix(&self, mark: Mark) -> String {
        match self {
            InputTarget::Nft {
                family,
                table,
                chain,
            } => format!(
                "nft insert rule {family} {table} {chain} 'meta mark & {:#x} == {:#x} accept'",
                mark.mask, mark.value
            ),
            InputTarget::Iptables(fam) => format!(
                "{} -I INPUT -m mark --mark {mark} -j ACCEPT",
                fam.iptables()
            ),
        }
    }
}

fn nft_families(family: &str) -> Vec<Family> {
    match family {
        "ip" => vec![Family::V4],
        "ip6" => vec![Family::V6],
        "inet" => vec![Family::V4, Family::V6],
        _ => Vec::new(),
    }
}

// ---- the rule model -----------------------------------------------------------------

/// One condition of a rule, as far as it decides something for intercepted packets.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Cond {
    /// Incoming interface in (or, negated, not in) these names; `*` (nft) or `+`
    /// (iptables) at the end matches a prefix.
    Iif { names: Vec<String>, neg: bool },
    /// Transport protocol in these (`tcp`, `udp`, numbers).
    L4 { protos: Vec<String>, neg: bool },
    /// The family (`meta nfproto`, or implied by `ip protocol` / `ip6 nexthdr`).
    Family(Family),
    /// `(mark & mask) == value` (or `!=`).
    Mark { mask: u32, value: u32, neg: bool },
    /// Conntrack state in these (`new`, `established`, ...).
    Ct { states: Vec<String>, neg: bool },
    /// Decided without looking at the packet.
    Const(bool),
}

/// What a rule does when it matches.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Action {
    Accept,
    Drop,
    Return,
    Jump(String),
    Goto(String),
    /// Nothing that ends the chain (`counter`, `log`, `-j LOG`, no verdict).
    Continue,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Rule {
    /// As listed, for messages.
    text: String,
    /// `None`: a match this model does not know; assumed not to match.
    conds: Option<Vec<Cond>>,
    action: Action,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Chain {
    name: String,
    /// Hook and policy of a base chain.
    base: Option<(String, bool)>,
    rules: Vec<Rule>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Table {
    /// nft family (`ip`, `ip6`, `inet`, ...) or `iptables-v4` / `iptables-v6`.
    family: String,
    name: String,
    chains: Vec<Chain>,
}

/// The packet being decided on.
#[derive(Clone, Debug)]
struct Packet<'a> {
    family: Family,
    l4: L4,
    iface: &'a str,
    mark: u32,
    established: bool,
}

impl Cond {
    fn holds(&self, p: &Packet) -> bool {
        match self {
            Cond::Iif { names, neg } => names.iter().any(|n| iface_matches(n, p.iface)) != *neg,
            Cond::L4 { protos, neg } => {
                let (name, num) = match p.l4 {
                    L4::Tcp => ("tcp", "6"),
                    L4::Udp => ("udp", "17"),
                };
                protos.iter().any(|x| x == name || x == num) != *neg
            }
            Cond::Family(f) => *f == p.family,
            Cond::Mark { mask, value, neg } => (p.mark & mask == *value) != *neg,
            Cond::Ct { states, neg } => {
                let s = if p.established { "established" } else { "new" };
                states.iter().any(|x| x == s) != *neg
            }
            Cond::Const(b) => *b,
        }
    }
}

fn iface_matches(pattern: &str, iface: &str) -> bool {
    match pattern
        .strip_suffix('*')
        .or_else(|| pattern.strip_suffix('+'))
    {
        Some(prefix) => iface.starts_with(prefix),
        None => pattern == iface,
    }
}

/// How a chain ended for one packet.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    Accept,
    /// Dropped (or rejected) by this rule text, or `policy drop`.
    Drop(String),
    /// Fell off the end or returned.
    FellThrough,
}

impl Table {
    fn chain(&self, name: &str) -> Option<&Chain> {
        self.chains.iter().find(|c| c.name == name)
    }

    /// Runs a chain; jumps and gotos are followed (at most 16 deep, as a guard
    /// against loops the kernel would have refused anyway).
    fn run(&self, chain: &Chain, p: &Packet, depth: usize) -> Outcome {
        if depth > 16 {
            return Outcome::FellThrough;
        }
        for rule in &chain.rules {
            let Some(conds) = &rule.conds else { continue };
            if !conds.iter().all(|c| c.holds(p)) {
                continue;
            }
            match &rule.action {
                Action::Accept => return Outcome::Accept,
                Action::Drop => return Outcome::Drop(rule.text.clone()),
                Action::Return => return Outcome::FellThrough,
                Action::Continue => {}
                Action::Jump(target) => {
                    if let Some(c) = self.chain(target) {
                        match self.run(c, p, depth + 1) {
                            Outcome::FellThrough => {}
                            end => return end,
                        }
                    }
                }
                Action::Goto(target) => {
                    return match self.chain(target) {
                        Some(c) => self.run(c, p, depth + 1),
                        None => Outcome::FellThrough,
                    };
                }
            }
        }
        Outcome::FellThrough
    }

    /// A base chain's verdict: its policy when nothing decided.
    fn verdict(&self, chain: &Chain, p: &Packet) -> Outcome {
        match self.run(chain, p, 0) {
            Outcome::FellThrough => match chain.base {
                Some((_, true)) => Outcome::Drop("policy drop".to_string()),
                _ => Outcome::Accept,
            },
            o => o,
        }
    }
}

// ---- tokens -------------------------------------------------------------------------

/// Splits a rule line into words; a quoted string and a `{ ... }` set are one word
/// each (quotes kept, so a quoted `"accept"` is never taken for a verdict).
fn tokens(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut depth = 0usize;
    let mut quoted = false;
    for ch in line.chars() {
        match ch {
            '"' => {
                quoted = !quoted;
                cur.push(ch);
            }
            '{' if !quoted => {
                depth += 1;
                cur.push(ch);
            }
            '}' if !quoted => {
                depth = depth.saturating_sub(1);
                cur.push(ch);
            }
            c if c.is_whitespace() && !quoted && depth == 0 => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The values of a word: `"eth0"`, `{ "a", "b" }`, `established,related`.
fn values(word: &str) -> Vec<String> {
    let inner = word
        .strip_prefix('{')
        .and_then(|w| w.strip_suffix('}'))
        .unwrap_or(word);
    inner
        .split([',', ' '])
        .map(|v| v.trim().trim_matches('"').to_string())
        .filter(|v| !v.is_empty())
        .collect()
}

fn parse_num(s: &str) -> Option<u32> {
    crate::config::parse_u32(s)
}

// ---- nft ----------------------------------------------------------------------------

/// Parses `nft list ruleset` into tables with their chains (sets, maps, flowtables
/// and the like are skipped).
fn parse_nft(listing: &str) -> Vec<Table> {
    let mut tables = Vec::new();
    let mut table: Option<Table> = None;
    let mut chain: Option<Chain> = None;
    // Depth of braces we are skipping (inside a set, map, ...), beyond table/chain.
    let mut skip = 0usize;
    for raw in listing.lines() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let opens = brace_balance(line);
        if skip > 0 {
            skip = (skip as isize + opens).max(0) as usize;
            continue;
        }
        let w = tokens(line);
        let words: Vec<&str> = w.iter().map(String::as_str).collect();
        match (&mut table, &mut chain) {
            (None, _) => {
                if let ["table", family, name, "{"] = words.as_slice() {
                    table = Some(Table {
                        family: family.to_string(),
                        name: name.to_string(),
                        chains: Vec::new(),
                    });
                }
            }
            (Some(_), None) => {
                if line == "}" {
                    tables.extend(table.take());
                } else if let ["chain", name, "{"] = words.as_slice() {
                    chain = Some(Chain {
                        name: name.to_string(),
                        base: None,
                        rules: Vec::new(),
                    });
                } else if opens > 0 {
                    skip = opens as usize;
                }
            }
            (Some(t), Some(c)) => {
                if line == "}" {
                    t.chains.extend(chain.take());
                } else if words.first() == Some(&"type") && words.contains(&"hook") {
                    let hook = words
                        .iter()
                        .position(|x| *x == "hook")
                        .and_then(|i| words.get(i + 1))
                        .map(|h| h.trim_end_matches(';').to_string())
                        .unwrap_or_default();
                    let drop = line.contains("policy drop");
                    c.base = Some((hook, drop));
                } else if words.first() == Some(&"policy") {
                    // Some versions print `policy drop;` on a line of its own.
                    if let Some(base) = &mut c.base {
                        base.1 = line.starts_with("policy drop");
                    }
                } else if words.first() == Some(&"comment") || words.first() == Some(&"devices") {
                } else {
                    c.rules.push(parse_nft_rule(line, &words));
                }
            }
        }
    }
    tables
}

/// Net count of `{` minus `}` outside quotes.
fn brace_balance(line: &str) -> isize {
    let mut quoted = false;
    let mut n = 0isize;
    for ch in line.chars() {
        match ch {
            '"' => quoted = !quoted,
            '{' if !quoted => n += 1,
            '}' if !quoted => n -= 1,
            _ => {}
        }
    }
    n
}

const NFT_VERDICTS: [&str; 8] = [
    "accept", "drop", "reject", "return", "jump", "goto", "queue", "continue",
];

fn parse_nft_rule(line: &str, w: &[&str]) -> Rule {
    let text = line.to_string();
    let Some(vi) = w.iter().position(|x| NFT_VERDICTS.contains(x)) else {
        // No verdict at all (`counter`, `log`): it changes nothing, unless it is a
        // verdict map, whose outcome depends on the packet.
        let action = Action::Continue;
        let conds = (!w.contains(&"vmap")).then(Vec::new);
        return Rule {
            text,
            conds,
            action,
        };
    };
    let action = match w[vi] {
        "accept" => Action::Accept,
        "drop" | "reject" => Action::Drop,
        "return" => Action::Return,
        "jump" => Action::Jump(w.get(vi + 1).unwrap_or(&"").to_string()),
        "goto" => Action::Goto(w.get(vi + 1).unwrap_or(&"").to_string()),
        "continue" => Action::Continue,
        // queue: userspace decides; model it as a match we cannot follow.
        _ => {
            return Rule {
                text,
                conds: None,
                action: Action::Continue,
            }
        }
    };
    let conds = parse_nft_conds(&w[..vi]);
    Rule {
        text,
        conds,
        action,
    }
}

/// Conditions of the words before the verdict; `None` at the first word not modelled.
fn parse_nft_conds(w: &[&str]) -> Option<Vec<Cond>> {
    let mut conds = Vec::new();
    let mut i = 0;
    // `[==|!=] VALUE` after a selector: (negated, value).
    let operand = |i: &mut usize| -> Option<(bool, String)> {
        let mut neg = false;
        match w.get(*i) {
            Some(&"!=") => {
                neg = true;
                *i += 1;
            }
            Some(&"==") => *i += 1,
            _ => {}
        }
        let v = w.get(*i)?.to_string();
        *i += 1;
        Some((neg, v))
    };
    while i < w.len() {
        let word = w[i];
        let next = w.get(i + 1).copied();
        match (word, next) {
            ("meta", Some("iifname" | "iif")) | ("iifname" | "iif", _) => {
                i += if word == "meta" { 2 } else { 1 };
                let (neg, v) = operand(&mut i)?;
                if v.starts_with('@') {
                    return None;
                }
                conds.push(Cond::Iif {
                    names: values(&v),
                    neg,
                });
            }
            ("meta", Some("l4proto")) | ("ip", Some("protocol")) | ("ip6", Some("nexthdr")) => {
                match word {
                    "ip" => conds.push(Cond::Family(Family::V4)),
                    "ip6" => conds.push(Cond::Family(Family::V6)),
                    _ => {}
                }
                i += 2;
                let (neg, v) = operand(&mut i)?;
                conds.push(Cond::L4 {
                    protos: values(&v),
                    neg,
                });
            }
            ("meta", Some("nfproto")) => {
                i += 2;
                let (neg, v) = operand(&mut i)?;
                let fams: Vec<String> = values(&v);
                let has = |f: &str| fams.iter().any(|x| x == f);
                conds.push(match (has("ipv4"), has("ipv6"), neg) {
                    (true, true, false) | (false, false, true) => Cond::Const(true),
                    (true, false, false) | (false, true, true) => Cond::Family(Family::V4),
                    (false, true, false) | (true, false, true) => Cond::Family(Family::V6),
                    _ => Cond::Const(false),
                });
            }
            ("meta", Some("mark")) | ("mark", _) => {
                i += if word == "meta" { 2 } else { 1 };
                let mut mask = u32::MAX;
                if w.get(i) == Some(&"&") || w.get(i) == Some(&"and") {
                    mask = parse_num(w.get(i + 1)?)?;
                    i += 2;
                }
                let (neg, v) = operand(&mut i)?;
                conds.push(Cond::Mark {
                    mask,
                    value: parse_num(&v)?,
                    neg,
                });
            }
            ("meta", Some("pkttype")) | ("pkttype", _) => {
                i += if word == "meta" { 2 } else { 1 };
                let (neg, v) = operand(&mut i)?;
                // Intercepted packets are unicast to this box's MAC: PACKET_HOST.
                conds.push(Cond::Const(values(&v).iter().any(|x| x == "host") != neg));
            }
            ("ct", Some("state")) => {
                i += 2;
                let (neg, v) = operand(&mut i)?;
                conds.push(Cond::Ct {
                    states: values(&v),
                    neg,
                });
            }
            ("fib", _) if w.get(i..i + 4) == Some(&["fib", "daddr", "type", "local"]) => {
                // The destination is the original one, not an address of this box.
                conds.push(Cond::Const(false));
                i += 4;
            }
            ("counter", _) => {
                i += 1;
                if w.get(i) == Some(&"packets") {
                    i += 4; // packets N bytes N
                }
            }
            ("log", _) => {
                i += 1;
                while let Some(opt) = w.get(i) {
                    if matches!(
                        *opt,
                        "prefix" | "level" | "flags" | "group" | "snaplen" | "queue-threshold"
                    ) {
                        i += 2;
                    } else {
                        break;
                    }
                }
            }
            ("comment", _) => i += 2,
            _ => return None,
        }
    }
    Some(conds)
}

// ---- iptables -----------------------------------------------------------------------

/// Parses the `*filter` section of `iptables-save` into one table.
fn parse_iptables(save: &str, family: Family) -> Option<Table> {
    let mut in_filter = false;
    let mut chains: Vec<Chain> = Vec::new();
    for line in save.lines().map(str::trim) {
        if let Some(t) = line.strip_prefix('*') {
            in_filter = t == "filter";
            continue;
        }
        if !in_filter || line == "COMMIT" {
            continue;
        }
        if let Some(decl) = line.strip_prefix(':') {
            let mut it = decl.split_whitespace();
            let name = it.next().unwrap_or("").to_string();
            let policy = it.next().unwrap_or("-");
            let base = (policy != "-").then(|| (name.to_lowercase(), policy == "DROP"));
            chains.push(Chain {
                name,
                base,
                rules: Vec::new(),
            });
        }
    }
    if chains.is_empty() {
        return None;
    }
    let names: Vec<String> = chains.iter().map(|c| c.name.clone()).collect();
    let mut in_filter = false;
    for line in save.lines().map(str::trim) {
        if let Some(t) = line.strip_prefix('*') {
            in_filter = t == "filter";
            continue;
        }
        let Some(rest) = line.strip_prefix("-A ").filter(|_| in_filter) else {
            continue;
        };
        let w = tokens(rest);
        let Some(chain_name) = w.first() else {
            continue;
        };
        let rule = parse_iptables_rule(line, &w[1..], &names);
        if let Some(c) = chains.iter_mut().find(|c| &c.name == chain_name) {
            c.rules.push(rule);
        }
    }
    Some(Table {
        family: format!("iptables-{}", family.name()),
        name: "filter".to_string(),
        chains,
    })
}

fn parse_iptables_rule(line: &str, w: &[String], chains: &[String]) -> Rule {
    let text = line.to_string();
    let mut conds = Some(Vec::new());
    let mut action = Action::Continue;
    let mut i = 0;
    let mut neg = false;
    while i < w.len() {
        let opt = w[i].as_str();
        let arg = w.get(i + 1).map(|s| s.trim_matches('"').to_string());
        let mut push = |c: Cond| {
            if let Some(v) = conds.as_mut() {
                v.push(c);
            }
        };
        match opt {
            "!" => {
                neg = true;
                i += 1;
                continue;
            }
            "-i" | "--in-interface" => push(Cond::Iif {
                names: vec![arg.unwrap_or_default()],
                neg,
            }),
            "-p" | "--protocol" => {
                let p = arg.unwrap_or_default();
                if p == "all" || p == "0" {
                    push(Cond::Const(!neg));
                } else {
                    push(Cond::L4 {
                        protos: vec![p],
                        neg,
                    });
                }
            }
            "-s" | "-d" | "--source" | "--destination" => {
                let any = matches!(arg.as_deref(), Some("0.0.0.0/0" | "::/0"));
                if !any {
                    conds = None;
                }
            }
            "-m" | "--match" => {
                if !matches!(
                    arg.as_deref(),
                    Some("tcp" | "udp" | "mark" | "conntrack" | "state" | "comment")
                ) {
                    conds = None;
                }
            }
            "--mark" => {
                let a = arg.unwrap_or_default();
                let parsed = crate::config::parse_mark(&a).ok().map(|m| {
                    // `--mark V` alone means mask 0xffffffff.
                    let mask = if a.contains('/') { m.mask } else { u32::MAX };
                    Cond::Mark {
                        mask,
                        value: m.value,
                        neg,
                    }
                });
                match parsed {
                    Some(c) => push(c),
                    None => conds = None,
                }
            }
            "--ctstate" | "--state" => push(Cond::Ct {
                states: values(&arg.unwrap_or_default().to_lowercase()),
                neg,
            }),
            "--comment" => {}
            "-j" | "--jump" | "-g" | "--goto" => {
                let target = arg.unwrap_or_default();
                action = match target.as_str() {
                    "ACCEPT" => Action::Accept,
                    "DROP" | "REJECT" => Action::Drop,
                    "RETURN" => Action::Return,
                    t if chains.iter().any(|c| c == t) => {
                        if opt.starts_with("-g") || opt == "--goto" {
                            Action::Goto(t.to_string())
                        } else {
                            Action::Jump(t.to_string())
                        }
                    }
                    // LOG, MARK, NFLOG ... do not end the chain; anything else
                    // (NFQUEUE) cannot be followed.
                    "LOG" | "NFLOG" | "MARK" | "CONNMARK" | "TRACE" | "AUDIT" => Action::Continue,
                    _ => {
                        conds = None;
                        Action::Continue
                    }
                };
                // Target options follow; nothing after them is a match.
                break;
            }
            _ => conds = None,
        }
        neg = false;
        i += 2;
    }
    Rule {
        text,
        conds,
        action,
    }
}

// ---- reading the box ----------------------------------------------------------------

/// One input base chain with the table it lives in.
#[derive(Clone, Debug)]
struct InputChain {
    target: InputTarget,
    table: Table,
    chain: String,
}

/// Table names iptables-nft creates in families `ip` / `ip6`: with iptables-nft
/// installed they are read (and fixed) through `iptables-save` / `iptables`, not nft.
const XTABLES: [&str; 5] = ["filter", "mangle", "raw", "security", "nat"];

/// What the box's input hook consists of.
#[derive(Clone, Debug, Default)]
pub struct InputHook {
    chains: Vec<InputChain>,
    /// Rule sets that could not be read (`nft list ruleset: ...`), for the report.
    pub unreadable: Vec<String>,
}

/// Whether `iptables -V` names the nf_tables variant (`None`: no iptables).
fn iptables_variant_nft(runner: &dyn Runner) -> Option<bool> {
    runner.find_program("iptables")?;
    let out = runner.run(&crate::iptables::version_cmd()).ok()?;
    Some(crate::iptables::is_nf_tables_variant(&out.stdout))
}

/// Reads every input base chain: all nft tables (except iptables-nft's own, when
/// iptables-nft is installed), and the iptables / ip6tables filter `INPUT` chain.
pub fn read(runner: &dyn Runner) -> Result<InputHook, SetupError> {
    let mut hook = InputHook::default();
    let ipt_nft = iptables_variant_nft(runner);
    if runner.find_program("nft").is_some() {
        let cmd = Cmd::new("nft", &["list", "ruleset"]);
        let out = run_any(runner, &cmd)?;
        if out.success() {
            for table in parse_nft(&out.stdout) {
                let xtables = ipt_nft == Some(true)
                    && (table.family == "ip" || table.family == "ip6")
                    && XTABLES.contains(&table.name.as_str());
                if xtables || nft_families(&table.family).is_empty() {
                    continue;
                }
                for c in &table.chains {
                    if matches!(&c.base, Some((hook, _)) if hook == "input") {
                        hook.chains.push(InputChain {
                            target: InputTarget::Nft {
                                family: table.family.clone(),
                                table: table.name.clone(),
                                chain: c.name.clone(),
                            },
                            table: table.clone(),
                            chain: c.name.clone(),
                        });
                    }
                }
            }
        } else {
            let msg = crate::host::one_line(&out);
            if crate::host::is_eperm(&msg) {
                return Err(crate::host::command_error(&cmd, &out));
            }
            hook.unreadable.push(format!("`{cmd}`: {msg}"));
        }
    }
    if ipt_nft.is_some() {
        for family in [Family::V4, Family::V6] {
            if runner.find_program(family.iptables_save()).is_none() {
                continue;
            }
            let cmd = Cmd::new(family.iptables_save(), &["-t", "filter"]);
            let out = run_any(runner, &cmd)?;
            if !out.success() {
                let msg = crate::host::one_line(&out);
                if crate::host::is_eperm(&msg) {
                    return Err(crate::host::command_error(&cmd, &out));
                }
                hook.unreadable.push(format!("`{cmd}`: {msg}"));
                continue;
            }
            if let Some(table) = parse_iptables(&out.stdout, family) {
                if table.chain("INPUT").is_some_and(|c| c.base.is_some()) {
                    hook.chains.push(InputChain {
                        target: InputTarget::Iptables(family),
                        table,
                        chain: "INPUT".to_string(),
                    });
                }
            }
        }
    }
    Ok(hook)
}

/// A base chain that drops intercepted packets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blocking {
    /// Where.
    pub target: InputTarget,
    /// The first rule (or `policy drop`) that drops them.
    pub by: String,
    /// Which packets: `IPv4 TCP`, ...
    pub what: Vec<String>,
    /// On which intercepted interfaces (all of them when it does not depend on it).
    pub ifaces: Vec<String>,
    /// Only later packets of a flow (conntrack `established`) are dropped.
    pub established_only: bool,
}

/// What the intercepted packets look like to the input hook.
#[derive(Clone, Debug)]
pub struct Intercepted<'a> {
    /// Families intercepted.
    pub families: &'a [Family],
    /// Protocols intercepted.
    pub l4: Vec<L4>,
    /// Interfaces whose traffic is intercepted.
    pub ifaces: Vec<String>,
    /// The interception mark.
    pub mark: Mark,
}

impl InputHook {
    /// Every base chain that drops some intercepted packets.
    pub fn blocking(&self, what: &Intercepted) -> Vec<Blocking> {
        let mut out = Vec::new();
        for ic in &self.chains {
            let Some(chain) = ic.table.chain(&ic.chain) else {
                continue;
            };
            let mut by = None;
            let mut kinds = Vec::new();
            let mut ifaces: Vec<String> = Vec::new();
            let mut new_dropped = false;
            for &family in what.families {
                if !ic.target.families().contains(&family) {
                    continue;
                }
                for &l4 in &what.l4 {
                    for iface in &what.ifaces {
                        for established in [false, true] {
                            let p = Packet {
                                family,
                                l4,
                                iface,
                                mark: what.mark.value,
                                established,
                            };
                            if let Outcome::Drop(rule) = ic.table.verdict(chain, &p) {
                                by.get_or_insert(rule);
                                let kind = format!(
                                    "{} {}",
                                    match family {
                                        Family::V4 => "IPv4",
                                        Family::V6 => "IPv6",
                                    },
                                    l4.name().to_uppercase()
                                );
                                if !kinds.contains(&kind) {
                                    kinds.push(kind);
                                }
                                if !ifaces.contains(iface) {
                                    ifaces.push(iface.clone());
                                }
                                new_dropped |= !established;
                            }
                        }
                    }
                }
            }
            if let Some(by) = by {
                ifaces.sort();
                out.push(Blocking {
                    target: ic.target.clone(),
                    by,
                    what: kinds,
                    ifaces,
                    established_only: !new_dropped,
                });
            }
        }
        out
    }

    /// The chains that hold our accept rule (found by its comment).
    pub fn with_accept_rule(&self) -> Vec<InputTarget> {
        self.chains
            .iter()
            .filter(|ic| {
                ic.table
                    .chain(&ic.chain)
                    .is_some_and(|c| c.rules.iter().any(|r| r.text.contains(ACCEPT_COMMENT)))
            })
            .map(|ic| ic.target.clone())
            .collect()
    }
}

impl Blocking {
    /// The status / apply line: what drops, which packets, and both fixes.
    pub fn message(&self, mark: Mark, all_ifaces: usize) -> String {
        let on = if self.ifaces.len() == all_ifaces {
            "on every intercepted interface".to_string()
        } else {
            format!("arriving on {}", self.ifaces.join(", "))
        };
        let which = if self.established_only {
            "later packets of intercepted flows"
        } else {
            "intercepted packets"
        };
        format!(
            "{} (input hook) drops {which} ({} {on}) at `{}`: TPROXY delivers them through the input hook, so they never reach the engine; fix: `{}`, or re-run `setup apply --accept-input` to have setup insert it (teardown removes it)",
            self.target,
            self.what.join(", "),
            self.by,
            self.target.manual_fix(mark)
        )
    }
}

// ---- installing and removing our accept rule ----------------------------------------

/// Inserts `meta mark & M == V accept` (with our comment) at the top of the chain
/// (equivalent to [`InputTarget::manual_fix`]).
pub fn insert_cmd(target: &InputTarget, mark: Mark) -> Cmd {
    match target {
        InputTarget::Nft {
            family,
            table,
            chain,
        } => Cmd::new("nft", &["-f", "-"]).with_stdin(format!(
            "insert rule {family} {table} {chain} meta mark & {:#x} == {:#x} accept comment \"{ACCEPT_COMMENT}\"\n",
            mark.mask, mark.value
        )),
        InputTarget::Iptables(fam) => Cmd::new(
            fam.iptables(),
            &[
                "-w",
                "-I",
                "INPUT",
                "1",
                "-m",
                "mark",
                "--mark",
                &mark.to_string(),
                "-m",
                "comment",
                "--comment",
                ACCEPT_COMMENT,
                "-j",
                "ACCEPT",
            ],
        ),
    }
}

/// Inserts our accept rule into `target`.
pub fn insert(runner: &dyn Runner, target: &InputTarget, mark: Mark) -> Result<(), SetupError> {
    run_checked(runner, &insert_cmd(target, mark)).map(drop)
}

/// Removes every rule carrying our comment from `target` (none there, or the chain
/// gone: nothing to do). Returns how many were removed.
pub fn remove(runner: &dyn Runner, target: &InputTarget) -> Result<usize, SetupError> {
    match target {
        InputTarget::Nft {
            family,
            table,
            chain,
        } => {
            let list = Cmd::new("nft", &["-a", "list", "chain", family, table, chain]);
            let out = run_any(runner, &list)?;
            if !out.success() {
                // No such table or chain: the rule went with it.
                return Ok(0);
            }
            let handles: Vec<String> = out
                .stdout
                .lines()
                .filter(|l| l.contains(ACCEPT_COMMENT))
                .filter_map(|l| {
                    l.rsplit_once("# handle ")
                        .map(|(_, h)| h.trim().to_string())
                })
                .collect();
            for h in &handles {
                run_checked(
                    runner,
                    &Cmd::new(
                        "nft",
                        &["delete", "rule", family, table, chain, "handle", h],
                    ),
                )?;
            }
            Ok(handles.len())
        }
        InputTarget::Iptables(fam) => {
            let save = run_any(runner, &Cmd::new(fam.iptables_save(), &["-t", "filter"]))?;
            if !save.success() {
                return Ok(0);
            }
            let mut n = 0;
            for line in save.stdout.lines() {
                let Some(rest) = line.strip_prefix("-A INPUT ") else {
                    continue;
                };
                if !line.contains(ACCEPT_COMMENT) {
                    continue;
                }
                // Delete by the exact rule spec iptables-save printed.
                let mut args = vec!["-w".to_string(), "-D".to_string(), "INPUT".to_string()];
                args.extend(
                    tokens(rest)
                        .into_iter()
                        .map(|t| t.trim_matches('"').to_string()),
                );
                run_checked(runner, &Cmd::new(fam.iptables(), &args))?;
                n += 1;
            }
            Ok(n)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MARK: Mark = Mark { value: 1, mask: 1 };

    fn hook_of(listing: &str) -> InputHook {
        let mut hook = InputHook::default();
        for table in parse_nft(listing) {
            for c in &table.chains {
                if matches!(&c.base, Some((h, _)) if h == "input") {
                    hook.chains.push(InputChain {
                        target: InputTarget::Nft {
                            family: table.family.clone(),
                            table: table.name.clone(),
                            chain: c.name.clone(),
                        },
                        table: table.clone(),
                        chain: c.name.clone(),
                    });
                }
            }
        }
        hook
    }

    fn ipt_hook(save: &str, family: Family) -> InputHook {
        InputHook {
            chains: vec![InputChain {
                target: InputTarget::Iptables(family),
                table: parse_iptables(save, family).unwrap(),
                chain: "INPUT".into(),
            }],
            unreadable: Vec::new(),
        }
    }

    fn check(hook: &InputHook, ifaces: &[&str]) -> Vec<Blocking> {
        hook.blocking(&Intercepted {
            families: &[Family::V4, Family::V6],
            l4: vec![L4::Tcp, L4::Udp],
            ifaces: ifaces.iter().map(|s| s.to_string()).collect(),
            mark: MARK,
        })
    }

    /// Arch Linux's default /etc/nftables.conf, as `nft list ruleset` prints it.
    const ARCH: &str = r#"table inet filter {
	chain input {
		type filter hook input priority filter; policy drop;
		ct state invalid drop comment "early drop of invalid connections"
		ct state { established, related } accept comment "allow tracked connections"
		iifname "lo" accept comment "allow from loopback"
		ip protocol icmp accept comment "allow icmp"
		meta l4proto ipv6-icmp accept comment "allow icmp v6"
		tcp dport 22 accept comment "allow sshd"
		meta pkttype host limit rate 5/second burst 5 packets counter packets 0 bytes 0 reject with icmpx admin-prohibited
		counter packets 12 bytes 3400
	}

	chain forward {
		type filter hook forward priority filter; policy drop;
	}
	set blocked {
		type ipv4_addr
		elements = { 10.0.0.1 }
	}
}
table inet ringrelay {
	comment "ringrelay"
	chain prerouting {
		type filter hook prerouting priority mangle; policy accept;
		iifname "lo" return
	}
}
"#;

    #[test]
    fn policy_drop_firewall_blocks_new_flows() {
        let hook = hook_of(ARCH);
        let b = check(&hook, &["eth0", "eth1"]);
        assert_eq!(b.len(), 1, "{b:?}");
        let b = &b[0];
        assert_eq!(
            b.target,
            InputTarget::Nft {
                family: "inet".into(),
                table: "filter".into(),
                chain: "input".into()
            }
        );
        assert_eq!(b.by, "policy drop");
        assert_eq!(b.what, vec!["IPv4 TCP", "IPv4 UDP", "IPv6 TCP", "IPv6 UDP"]);
        assert!(
            !b.established_only,
            "established flows are accepted, new ones not"
        );
        let msg = b.message(MARK, 2);
        assert!(msg.starts_with("nft chain inet filter input (input hook) drops intercepted packets (IPv4 TCP, IPv4 UDP, IPv6 TCP, IPv6 UDP on every intercepted interface) at `policy drop`"), "{msg}");
        assert!(
            msg.contains(
                "fix: `nft insert rule inet filter input 'meta mark & 0x1 == 0x1 accept'`"
            ),
            "{msg}"
        );
        assert!(msg.contains("setup apply --accept-input"), "{msg}");
    }

    #[test]
    fn accepting_the_mark_or_the_interface_unblocks() {
        let fixed = ARCH.replace(
            "\t\tct state invalid drop",
            "\t\tmeta mark & 0x00000001 == 0x00000001 accept comment \"ringrelay: setup apply --accept-input\" # handle 9\n\t\tct state invalid drop",
        );
        let hook = hook_of(&fixed);
        assert_eq!(check(&hook, &["eth0"]), vec![]);
        assert_eq!(hook.with_accept_rule().len(), 1);
        // A LAN accepted by interface: only the other interface is blocked.
        let lan = ARCH.replace(
            "\t\tiifname \"lo\" accept",
            "\t\tiifname { \"lo\", \"lan*\" } accept",
        );
        let b = check(&hook_of(&lan), &["lan0", "wan0"]);
        assert_eq!(b[0].ifaces, vec!["wan0"]);
        assert!(b[0].message(MARK, 2).contains("arriving on wan0"));
        // A mark that is not ours does not help; an exact `meta mark 0x1` does.
        let other = ARCH.replace(
            "\t\tct state invalid drop",
            "\t\tmeta mark 0x00000002 accept\n\t\tct state invalid drop",
        );
        assert_eq!(check(&hook_of(&other), &["eth0"]).len(), 1);
        let exact = ARCH.replace(
            "\t\tct state invalid drop",
            "\t\tmark 0x00000001 accept\n\t\tct state invalid drop",
        );
        assert_eq!(check(&hook_of(&exact), &["eth0"]), vec![]);
    }

    #[test]
    fn accept_policy_with_final_reject_and_jumps() {
        // firewalld's shape: policy accept, a jump, then an unconditional reject.
        let fw = r#"table inet firewalld {
	chain filter_INPUT {
		type filter hook input priority filter + 10; policy accept;
		ct state { established, related } accept
		ct status dnat accept
		iifname "lo" accept
		jump filter_INPUT_ZONES
		ct state { invalid } drop
		reject with icmpx admin-prohibited
	}
	chain filter_INPUT_ZONES {
		iifname "eth0" goto filter_IN_public
		goto filter_IN_public
	}
	chain filter_IN_public {
		tcp dport 22 accept
		meta l4proto { icmp, ipv6-icmp } accept
	}
}
"#;
        let b = check(&hook_of(fw), &["eth0"]);
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].by, "reject with icmpx admin-prohibited");
        // The same with a zone that accepts the mark.
        let ok = fw.replace(
            "\t\ttcp dport 22 accept",
            "\t\tmeta mark & 0x1 == 0x1 accept",
        );
        assert_eq!(check(&hook_of(&ok), &["eth0"]), vec![]);
        // A plain accepting firewall and families that do not apply.
        let open = "table ip filter {\n\tchain INPUT {\n\t\ttype filter hook input priority filter; policy accept;\n\t\tiifname \"eth9\" drop\n\t}\n}\n";
        assert_eq!(check(&hook_of(open), &["eth0"]), vec![]);
        let v6 = "table ip6 f {\n\tchain in {\n\t\ttype filter hook input priority 0; policy drop;\n\t}\n}\n";
        let b = check(&hook_of(v6), &["eth0"]);
        assert_eq!(b[0].what, vec!["IPv6 TCP", "IPv6 UDP"]);
        assert_eq!(b[0].target.families(), vec![Family::V6]);
    }

    #[test]
    fn unknown_matches_are_assumed_not_to_match() {
        let t = "table inet f {\n\tchain in {\n\t\ttype filter hook input priority 0; policy accept;\n\t\tip saddr 10.0.0.0/8 drop\n\t\ttcp dport 80 drop\n\t\tiifname @wan drop\n\t\tct state vmap { invalid : drop, new : drop }\n\t}\n}\n";
        assert_eq!(check(&hook_of(t), &["eth0"]), vec![]);
        // But a definite drop of later packets is told apart.
        let t = "table inet f {\n\tchain in {\n\t\ttype filter hook input priority 0; policy accept;\n\t\tct state established drop\n\t}\n}\n";
        let b = check(&hook_of(t), &["eth0"]);
        assert!(b[0].established_only);
        assert!(b[0]
            .message(MARK, 1)
            .contains("drops later packets of intercepted flows"));
    }

    const IPT: &str = "# Generated by iptables-save v1.8.9 (nf_tables)
*filter
:INPUT DROP [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:SSH - [0:0]
-A INPUT -i lo -j ACCEPT
-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A INPUT -p tcp -m tcp --dport 22 -j SSH
-A INPUT -m limit --limit 5/min -j LOG --log-prefix \"in: \"
-A SSH -j ACCEPT
COMMIT
";

    #[test]
    fn iptables_input_policy_drop() {
        let b = check(&ipt_hook(IPT, Family::V4), &["eth0"]);
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].target, InputTarget::Iptables(Family::V4));
        assert_eq!(b[0].what, vec!["IPv4 TCP", "IPv4 UDP"]);
        let msg = b[0].message(MARK, 1);
        assert!(
            msg.starts_with("iptables filter chain INPUT (input hook) drops intercepted packets"),
            "{msg}"
        );
        assert!(
            msg.contains("fix: `iptables -I INPUT -m mark --mark 0x1/0x1 -j ACCEPT`"),
            "{msg}"
        );
        let fixed = IPT.replace(
            "-A INPUT -i lo -j ACCEPT",
            "-A INPUT -m mark --mark 0x1/0x1 -m comment --comment \"ringrelay: setup apply --accept-input\" -j ACCEPT\n-A INPUT -i lo -j ACCEPT",
        );
        let hook = ipt_hook(&fixed, Family::V4);
        assert_eq!(check(&hook, &["eth0"]), vec![]);
        assert_eq!(
            hook.with_accept_rule(),
            vec![InputTarget::Iptables(Family::V4)]
        );
        // `! -i eth0 -j DROP` with policy ACCEPT drops only the other interfaces.
        let neg = "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT ! -i eth0 -j DROP\nCOMMIT\n";
        let b = check(&ipt_hook(neg, Family::V6), &["eth0", "eth1"]);
        assert_eq!(b[0].ifaces, vec!["eth1"]);
        assert_eq!(b[0].by, "-A INPUT ! -i eth0 -j DROP");
    }

    #[test]
    fn targets_round_trip_and_commands() {
        for t in [
            InputTarget::Nft {
                family: "inet".into(),
                table: "filter".into(),
                chain: "input".into(),
            },
            InputTarget::Iptables(Family::V6),
        ] {
            let r = t.render();
            let w: Vec<&str> = r.split_whitespace().collect();
            assert_eq!(InputTarget::parse(&w), Some(t));
        }
        let nft = insert_cmd(
            &InputTarget::Nft {
                family: "ip".into(),
                table: "fw".into(),
                chain: "in".into(),
            },
            MARK,
        );
        assert_eq!(
            nft.stdin.unwrap(),
            "insert rule ip fw in meta mark & 0x1 == 0x1 accept comment \"ringrelay: setup apply --accept-input\"\n"
        );
        assert_eq!(
            insert_cmd(&InputTarget::Iptables(Family::V4), MARK).to_string(),
            "iptables -w -I INPUT 1 -m mark --mark 0x1/0x1 -m comment --comment 'ringrelay: setup apply --accept-input' -j ACCEPT"
        );
    }
}
