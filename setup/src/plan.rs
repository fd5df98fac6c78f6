//! The typed plan: every object `setup apply` installs, built from a [`Config`] without
//! reading the system. The renderers ([`crate::nft`], [`crate::iptables`],
//! [`crate::iproute`]) turn it into text; `--dry-run` prints that text.

use crate::config::{Config, FailMode, Mark};
use crate::ports::{PortRange, PortSel};
use crate::sysctl::SysctlKey;

/// Name of the dedicated nft table (`table inet ringrelay`). Nothing else on the box
/// should use it: `setup apply` replaces it and `setup teardown` deletes it.
pub const NFT_TABLE: &str = "ringrelay";
/// The comment on our nft table: setup's marker of ownership. apply replaces (and
/// teardown without a state file deletes) a `table inet ringrelay` only when it
/// carries it, or when the state file records that setup installed the table.
pub const NFT_TABLE_COMMENT: &str = "ringrelay: managed by setup apply, deleted by setup teardown";
/// Name of the base chain in the nft table.
pub const NFT_CHAIN: &str = "prerouting";
/// The iptables mangle chain jumped to from `PREROUTING`: exclusions and the
/// interface dispatch.
pub const IPT_CHAIN: &str = "RINGRELAY";
/// The iptables mangle chain that holds the `TPROXY` rules.
pub const IPT_TPROXY_CHAIN: &str = "RINGRELAY_TPROXY";

/// An address family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    /// `v4` / `v6`, as in the state file.
    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "v4",
            Family::V6 => "v6",
        }
    }

    /// Parses [`name`](Self::name).
    pub fn from_name(s: &str) -> Option<Family> {
        match s {
            "v4" => Some(Family::V4),
            "v6" => Some(Family::V6),
            _ => None,
        }
    }

    /// `meta nfproto` value: `ipv4` / `ipv6`.
    pub fn nfproto(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }

    /// The family word of nft `tproxy ip to` / `tproxy ip6 to`, and of the nft table
    /// family iptables-nft uses (`table ip mangle` / `table ip6 mangle`).
    pub fn nft_family(self) -> &'static str {
        match self {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        }
    }

    /// The `/proc/sys/net/<dir>` of the family.
    pub fn sysctl_dir(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }

    /// `iptables` / `ip6tables`.
    pub fn iptables(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    /// `iptables-restore` / `ip6tables-restore`.
    pub fn iptables_restore(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }

    /// `iptables-save` / `ip6tables-save`.
    pub fn iptables_save(self) -> &'static str {
        match self {
            Family::V4 => "iptables-save",
            Family::V6 => "ip6tables-save",
        }
    }

    /// The whole address space: `0.0.0.0/0` / `::/0`.
    pub fn any_prefix(self) -> &'static str {
        match self {
            Family::V4 => "0.0.0.0/0",
            Family::V6 => "::/0",
        }
    }
}

/// A transport protocol handed to the engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum L4 {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl L4 {
    /// `tcp` / `udp`.
    pub fn name(self) -> &'static str {
        match self {
            L4::Tcp => "tcp",
            L4::Udp => "udp",
        }
    }
}

/// An IP protocol the return path matches: the engine's transports, and the ICMP
/// errors that quote their packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum IpProto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP (IPv4).
    Icmp,
    /// ICMPv6.
    Icmpv6,
}

impl IpProto {
    /// The name nft (`meta l4proto`) and iptables (`-p`) use.
    pub fn name(self) -> &'static str {
        match self {
            IpProto::Tcp => "tcp",
            IpProto::Udp => "udp",
            IpProto::Icmp => "icmp",
            IpProto::Icmpv6 => "ipv6-icmp",
        }
    }

    /// Whether the protocol exists in the family (ICMP is IPv4's, ICMPv6 IPv6's).
    pub fn in_family(self, family: Family) -> bool {
        !matches!(
            (self, family),
            (IpProto::Icmp, Family::V6) | (IpProto::Icmpv6, Family::V4)
        )
    }
}

impl From<L4> for IpProto {
    fn from(l4: L4) -> IpProto {
        match l4 {
            L4::Tcp => IpProto::Tcp,
            L4::Udp => IpProto::Udp,
        }
    }
}

/// A destination address type from the FIB (`RTN_*`), for "is this for the box itself".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddrType {
    /// `RTN_LOCAL`: an address of this box.
    Local,
    /// `RTN_BROADCAST`: IPv4 broadcast (DHCP, subnet broadcast).
    Broadcast,
    /// `RTN_ANYCAST`: IPv6 anycast such as the subnet-router address.
    Anycast,
    /// `RTN_MULTICAST`.
    Multicast,
}

impl AddrType {
    /// nft `fib daddr type` keyword.
    pub fn nft(self) -> &'static str {
        match self {
            AddrType::Local => "local",
            AddrType::Broadcast => "broadcast",
            AddrType::Anycast => "anycast",
            AddrType::Multicast => "multicast",
        }
    }

    /// iptables `-m addrtype --dst-type` keyword.
    pub fn iptables(self) -> &'static str {
        match self {
            AddrType::Local => "LOCAL",
            AddrType::Broadcast => "BROADCAST",
            AddrType::Anycast => "ANYCAST",
            AddrType::Multicast => "MULTICAST",
        }
    }

    /// Whether the type exists in the family (IPv6 has no broadcast, and IPv4 anycast
    /// routes are practically never used; ip6tables' addrtype knows LOCAL, ANYCAST and
    /// MULTICAST).
    pub fn in_family(self, family: Family) -> bool {
        !matches!(
            (self, family),
            (AddrType::Broadcast, Family::V6) | (AddrType::Anycast, Family::V4)
        )
    }
}

/// One match of a rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Match {
    /// Arrived on this interface: nft `iifname "lo"`, iptables `-i lo`.
    IifName(String),
    /// Packet mark has all these bits: nft `meta mark & M == M`, iptables
    /// `-m mark --mark M/M`.
    MarkBits(u32),
    /// Destination address has one of these FIB types: nft `fib daddr type { ... }`,
    /// iptables `-m addrtype --dst-type T` (one rule per type).
    DstAddrType(Vec<AddrType>),
    /// Address family: nft `meta nfproto ipv4`; iptables picks the binary.
    Family(Family),
    /// Transport protocol: nft `meta l4proto tcp`, iptables `-p tcp`.
    L4(L4),
    /// Destination ports: nft `th dport { 80, 8000-8100 }`, iptables
    /// `-m multiport --dports 80,8000:8100` (split at 15 slots).
    DstPorts(Vec<PortRange>),
    /// Did not arrive on any of these interfaces: nft `iifname != { "lan0" }`.
    /// iptables has no negated interface set: there the interface dispatch goes to
    /// the tproxy chain first (`-g`), so only the other interfaces reach such a rule.
    IifNameNot(Vec<String>),
    /// The destination is routed out of one of these interfaces: nft
    /// `fib daddr oifname { "lan0" }` (a lookup in the routing table, as forwarding
    /// would do). iptables has no match for it and renders nothing.
    RouteOifName(Vec<String>),
    /// One of these protocols: nft `meta l4proto { tcp, udp }`, iptables one rule
    /// per protocol of the family (`-p tcp`).
    Protos(Vec<IpProto>),
    /// The packet belongs to a transparent socket of this box bound to a specific
    /// address (an ICMP error: the socket of the packet it quotes). nft
    /// `socket transparent 1 socket wildcard 0`; iptables `-m socket --transparent`,
    /// which skips sockets bound to the wildcard address unless `--nowildcard`.
    TransparentSocket,
}

/// What a matching rule does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Stop looking at our rules; the packet goes on untouched.
    Return,
    /// Hand the packet to the transparent socket on `port` and set the interception
    /// mark so the policy rule routes it to `lo`. nft `tproxy ip to :PORT meta mark set
    /// ... accept` (tproxy is not terminal and sets no mark by itself); iptables
    /// `-j TPROXY --on-port PORT --tproxy-mark MARK` (terminal; drops when no socket).
    Tproxy {
        /// `tproxy ip` or `tproxy ip6`.
        family: Family,
        /// The engine's port.
        port: u16,
        /// The interception mark.
        mark: Mark,
    },
    /// Drop (fail-closed: reached only when tproxy found no socket).
    Drop,
    /// Set the interception mark, so the policy rule routes the packet to `lo` and it
    /// is delivered to the socket it belongs to, and stop looking at our rules: nft
    /// `meta mark set ... accept`; iptables `-j MARK --set-xmark MARK/MASK` (not
    /// terminal, but our chain ends right after it).
    Mark(Mark),
}

/// One firewall rule with the reason it exists, rendered as a comment above it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Why: one or more lines, kernel behaviour first.
    pub why: String,
    /// All must match.
    pub matches: Vec<Match>,
    /// What happens then.
    pub verdict: Verdict,
}

impl Rule {
    /// The family the rule is limited to, if any.
    pub fn family(&self) -> Option<Family> {
        self.matches.iter().find_map(|m| match m {
            Match::Family(f) => Some(*f),
            _ => None,
        })
    }
}

/// Which incoming interfaces are intercepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IfaceSel {
    /// Everything but `lo` (the default).
    AllButLo,
    /// Only these (sorted, non-empty).
    Only(Vec<String>),
}

/// The firewall part of the plan, evaluated in the prerouting hook at mangle priority
/// (-150): after conntrack (-200), before the routing decision the mark steers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FirewallPlan {
    /// Rules that let traffic through untouched, evaluated first.
    pub exclusions: Vec<Rule>,
    /// The return path of `--source client-ip|client`: replies addressed to clients
    /// that belong to the engine's upstream sockets, evaluated after the exclusions
    /// and before the interface filter. Empty with `--source router`.
    pub return_path: Vec<Rule>,
    /// The interfaces whose traffic reaches `intercept`.
    pub ifaces: IfaceSel,
    /// The tproxy rules, then the fail-closed drops if any.
    pub intercept: Vec<Rule>,
    /// Recorded for renderers' header comments.
    pub fail_mode: FailMode,
    /// Families with rules (IPv4, and IPv6 unless `--no-ipv6`).
    pub families: Vec<Family>,
}

/// `ip rule add fwmark MARK/MASK lookup TABLE` (with `-6` for IPv6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpRule {
    /// Family.
    pub family: Family,
    /// The interception mark.
    pub mark: Mark,
    /// The table looked up.
    pub table: u32,
}

/// `ip route add local 0.0.0.0/0 dev lo table TABLE` (`local ::/0` for IPv6): every
/// address is local in that table, so a marked packet is delivered to the socket
/// tproxy assigned instead of being forwarded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalRoute {
    /// Family.
    pub family: Family,
    /// The table.
    pub table: u32,
}

/// What a sysctl should be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SysctlWant {
    /// Exactly this value.
    Value(String),
    /// An `rp_filter` that is not strict: `1` becomes `2` (loose); `0` (off) and `2`
    /// stay as they are.
    NotStrictRpFilter,
}

/// A sysctl to set, with the reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SysctlItem {
    /// The sysctl.
    pub key: SysctlKey,
    /// Its wanted value.
    pub want: SysctlWant,
    /// Why setup touches it.
    pub why: &'static str,
}

impl SysctlItem {
    /// The value to write given the current one, or `None` when it is fine as it is.
    pub fn needed_write(&self, current: &str) -> Option<String> {
        match &self.want {
            SysctlWant::Value(v) => (current.trim() != v).then(|| v.clone()),
            SysctlWant::NotStrictRpFilter => (current.trim() == "1").then(|| "2".to_string()),
        }
    }
}

/// Everything `setup apply` installs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The options the plan was built from.
    pub config: Config,
    /// Firewall rules.
    pub firewall: FirewallPlan,
    /// Policy rules, one per family.
    pub ip_rules: Vec<IpRule>,
    /// Local routes, one per family.
    pub routes: Vec<LocalRoute>,
    /// Sysctls.
    pub sysctls: Vec<SysctlItem>,
    /// Interfaces whose `rp_filter` the plan manages.
    pub rp_ifaces: Vec<String>,
}

impl FirewallPlan {
    /// Whether the plan holds the return path of `--source client-ip|client`.
    pub fn has_return_path(&self) -> bool {
        !self.return_path.is_empty()
    }
}

impl Plan {
    /// Families the plan covers.
    pub fn families(&self) -> &[Family] {
        &self.firewall.families
    }
}

const WHY_LOOPBACK: &str = "Loopback is never intercepted: local traffic, and anything the engine\nsends to itself, re-enters prerouting on lo.";
const WHY_TCP: &str = "TCP: no `socket transparent 1` pre-match on purpose. tproxy itself first finds an\nestablished socket, then handles a SYN that hits a TIME_WAIT socket\n(nf_tproxy_handle_time_wait), then the listener. A blanket socket pre-match would\nhand a SYN that reuses a client port to the engine's TIME_WAIT socket, which\nanswers with a reset (docs/deployment.md, port reuse).";
const WHY_UDP: &str = "UDP: no socket pre-match either: it would divert client datagrams to the\nengine's reply sockets bound to original destinations.";

/// Why the return-path rule exists and why it never runs on the client side. The
/// renderers add what is particular to their match (nft: the route and wildcard
/// tests; iptables: what it cannot test).
fn why_return_path(config: &Config) -> String {
    format!(
        "Return path (--source {source}): the engine's upstream sockets are transparent\n\
         and bound to the client's address, so servers answer to that address. Replies\n\
         arrive on the server side (not on {ifaces}) and would be forwarded to the\n\
         client, whose stack resets them, or dropped. When one belongs to a transparent\n\
         socket of this box (an engine upstream socket), the interception mark routes it\n\
         to lo (table {table}) and it is delivered to that socket. ICMP errors (port\n\
         unreachable, fragmentation needed) are looked up by the packet they quote and\n\
         delivered too, so path MTU discovery works for upstream connections.\n\
         Never on the client side: there the engine's client-facing sockets match too,\n\
         and a socket match breaks port reuse (a SYN that reuses a client port goes to\n\
         the engine's TIME_WAIT socket, which resets it) and diverts client datagrams to\n\
         the engine's reply sockets. The engine's own packets (on lo, or carrying the\n\
         bypass mark) were returned above.",
        source = config.source.name(),
        ifaces = config.in_ifaces.join(", "),
        table = config.table,
    )
}

/// The return-path rule for `config` (which names the client-side interfaces).
fn return_path_rule(config: &Config, families: &[Family]) -> Rule {
    let mut matches = Vec::new();
    if families == [Family::V4] {
        matches.push(Match::Family(Family::V4));
    }
    matches.push(Match::IifNameNot(config.in_ifaces.clone()));
    matches.push(Match::RouteOifName(config.in_ifaces.clone()));
    let mut protos: Vec<IpProto> = [(L4::Tcp, &config.tcp), (L4::Udp, &config.udp)]
        .into_iter()
        .filter(|(_, sel)| sel.is_some())
        .map(|(l4, _)| IpProto::from(l4))
        .collect();
    protos.push(IpProto::Icmp);
    if families.contains(&Family::V6) {
        protos.push(IpProto::Icmpv6);
    }
    matches.push(Match::Protos(protos));
    matches.push(Match::TransparentSocket);
    Rule {
        why: why_return_path(config),
        matches,
        verdict: Verdict::Mark(config.fwmark),
    }
}

/// Builds the plan. `host_ifaces` are the interfaces present now; with the default
/// "every interface but lo" they are the ones whose `rp_filter` is managed.
pub fn build(config: &Config, host_ifaces: &[String]) -> Plan {
    let mut families = vec![Family::V4];
    if config.ipv6 {
        families.push(Family::V6);
    }

    let exclusions = vec![
        Rule {
            why: WHY_LOOPBACK.to_string(),
            matches: vec![Match::IifName("lo".to_string())],
            verdict: Verdict::Return,
        },
        Rule {
            why: format!(
                "The engine marks its upstream sockets with SO_MARK {:#x}: never intercept\nthem, or its own connections would loop back into it.",
                config.bypass_mark
            ),
            matches: vec![Match::MarkBits(config.bypass_mark)],
            verdict: Verdict::Return,
        },
        Rule {
            why: "Traffic for the box itself (SSH to the appliance, services it runs) and\nbroadcast/multicast (DHCP, mDNS, ND) is never intercepted.".to_string(),
            matches: vec![Match::DstAddrType(vec![
                AddrType::Local,
                AddrType::Broadcast,
                AddrType::Anycast,
                AddrType::Multicast,
            ])],
            verdict: Verdict::Return,
        },
    ];

    // Validation refuses a return path without --in-iface; without interfaces there
    // is no side it could run on.
    let return_path = if config.source.needs_return_path() && !config.in_ifaces.is_empty() {
        vec![return_path_rule(config, &families)]
    } else {
        Vec::new()
    };

    let ifaces = if config.in_ifaces.is_empty() {
        IfaceSel::AllButLo
    } else {
        IfaceSel::Only(config.in_ifaces.clone())
    };

    let mut intercept = Vec::new();
    let mut drops = Vec::new();
    for (l4, sel, why) in [
        (L4::Tcp, &config.tcp, WHY_TCP),
        (L4::Udp, &config.udp, WHY_UDP),
    ] {
        let Some(sel) = sel else { continue };
        for (i, &family) in families.iter().enumerate() {
            let mut matches = vec![Match::Family(family), Match::L4(l4)];
            if let PortSel::Only(ranges) = sel {
                matches.push(Match::DstPorts(ranges.clone()));
            }
            intercept.push(Rule {
                why: if i == 0 {
                    why.to_string()
                } else {
                    String::new()
                },
                matches: matches.clone(),
                verdict: Verdict::Tproxy {
                    family,
                    port: config.port,
                    mark: config.fwmark,
                },
            });
            if config.fail_mode == FailMode::Closed {
                drops.push(Rule {
                    why: String::new(),
                    matches,
                    verdict: Verdict::Drop,
                });
            }
        }
    }
    if let Some(first) = drops.first_mut() {
        first.why = "Fail-closed: a packet gets here only when tproxy found no transparent socket\n(engine not running); drop it instead of forwarding it untouched.".to_string();
    }
    intercept.extend(drops);

    let ip_rules = families
        .iter()
        .map(|&family| IpRule {
            family,
            mark: config.fwmark,
            table: config.table,
        })
        .collect();
    let routes = families
        .iter()
        .map(|&family| LocalRoute {
            family,
            table: config.table,
        })
        .collect();

    let rp_ifaces: Vec<String> = if config.in_ifaces.is_empty() {
        let mut v: Vec<String> = host_ifaces.iter().filter(|i| *i != "lo").cloned().collect();
        v.sort();
        v.dedup();
        v
    } else {
        config.in_ifaces.clone()
    };

    let mut sysctls = vec![SysctlItem {
        key: SysctlKey::new("net/ipv4/ip_forward"),
        want: SysctlWant::Value("1".to_string()),
        why: "route what is not intercepted (same knob as net.ipv4.conf.all.forwarding)",
    }];
    if config.ipv6 {
        sysctls.push(SysctlItem {
            key: SysctlKey::conf("ipv6", "all", "forwarding"),
            want: SysctlWant::Value("1".to_string()),
            why: "route what is not intercepted (IPv6)",
        });
    }
    let why_rp = "strict rp_filter drops asymmetric flows; the effective value is max(all, iface)";
    sysctls.push(SysctlItem {
        key: SysctlKey::conf("ipv4", "all", "rp_filter"),
        want: SysctlWant::NotStrictRpFilter,
        why: why_rp,
    });
    if config.in_ifaces.is_empty() {
        sysctls.push(SysctlItem {
            key: SysctlKey::conf("ipv4", "default", "rp_filter"),
            want: SysctlWant::NotStrictRpFilter,
            why: "interfaces created later are intercepted too and start from `default`",
        });
    }
    for iface in &rp_ifaces {
        sysctls.push(SysctlItem {
            key: SysctlKey::conf("ipv4", iface, "rp_filter"),
            want: SysctlWant::NotStrictRpFilter,
            why: why_rp,
        });
    }

    Plan {
        config: config.clone(),
        firewall: FirewallPlan {
            exclusions,
            return_path,
            ifaces,
            intercept,
            fail_mode: config.fail_mode,
            families,
        },
        ip_rules,
        routes,
        sysctls,
        rp_ifaces,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Backend, Source};
    use crate::ports::parse_port_list;

    fn ifaces() -> Vec<String> {
        vec!["lo".into(), "eth1".into(), "eth0".into()]
    }

    #[test]
    fn default_plan_shape() {
        let plan = build(&Config::default(), &ifaces());
        assert_eq!(plan.families(), &[Family::V4, Family::V6]);
        assert_eq!(plan.firewall.ifaces, IfaceSel::AllButLo);
        // tcp v4, tcp v6, udp v4, udp v6; fail-open: no drops.
        assert_eq!(plan.firewall.intercept.len(), 4);
        assert!(plan
            .firewall
            .intercept
            .iter()
            .all(|r| matches!(r.verdict, Verdict::Tproxy { port: 15001, .. })));
        assert!(plan
            .firewall
            .intercept
            .iter()
            .all(|r| !r.matches.iter().any(|m| matches!(m, Match::DstPorts(_)))));
        assert_eq!(plan.ip_rules.len(), 2);
        assert_eq!(plan.routes.len(), 2);
        assert_eq!(plan.rp_ifaces, vec!["eth0", "eth1"]);
        let keys: Vec<String> = plan.sysctls.iter().map(|s| s.key.dotted()).collect();
        assert_eq!(
            keys,
            vec![
                "net.ipv4.ip_forward",
                "net.ipv6.conf.all.forwarding",
                "net.ipv4.conf.all.rp_filter",
                "net.ipv4.conf.default.rp_filter",
                "net.ipv4.conf.eth0.rp_filter",
                "net.ipv4.conf.eth1.rp_filter",
            ]
        );
    }

    #[test]
    fn options_shape_the_plan() {
        let config = Config {
            backend: Backend::Nft,
            tcp: Some(parse_port_list("443,80").unwrap()),
            udp: None,
            ipv6: false,
            in_ifaces: vec!["eth2".into()],
            fail_mode: FailMode::Closed,
            ..Config::default()
        };
        let plan = build(&config, &ifaces());
        assert_eq!(plan.families(), &[Family::V4]);
        assert_eq!(plan.firewall.ifaces, IfaceSel::Only(vec!["eth2".into()]));
        let verdicts: Vec<&Verdict> = plan.firewall.intercept.iter().map(|r| &r.verdict).collect();
        assert!(matches!(
            verdicts[0],
            Verdict::Tproxy {
                family: Family::V4,
                ..
            }
        ));
        assert_eq!(verdicts[1], &Verdict::Drop);
        assert_eq!(verdicts.len(), 2);
        assert_eq!(
            plan.firewall.intercept[1].matches[2],
            Match::DstPorts(vec![PortRange::single(80), PortRange::single(443)])
        );
        assert_eq!(plan.rp_ifaces, vec!["eth2"]);
        assert_eq!(plan.ip_rules.len(), 1);
        assert!(!plan.sysctls.iter().any(|s| s.key.rel().contains("default")));
    }

    #[test]
    fn return_path_only_with_a_client_source() {
        let plan = build(&Config::default(), &ifaces());
        assert!(!plan.firewall.has_return_path());
        let config = Config {
            source: Source::ClientIp,
            in_ifaces: vec!["eth0".into()],
            ..Config::default()
        };
        let plan = build(&config, &ifaces());
        assert_eq!(plan.firewall.return_path.len(), 1);
        let rule = &plan.firewall.return_path[0];
        assert_eq!(
            rule.matches,
            vec![
                Match::IifNameNot(vec!["eth0".into()]),
                Match::RouteOifName(vec!["eth0".into()]),
                Match::Protos(vec![
                    IpProto::Tcp,
                    IpProto::Udp,
                    IpProto::Icmp,
                    IpProto::Icmpv6
                ]),
                Match::TransparentSocket,
            ]
        );
        assert_eq!(rule.verdict, Verdict::Mark(config.fwmark));
        // The same sysctls as without it: the return path needs none (see
        // docs/deployment.md, full transparency).
        assert_eq!(
            plan.sysctls,
            build(
                &Config {
                    source: Source::Router,
                    ..config.clone()
                },
                &ifaces()
            )
            .sysctls
        );
        // IPv4 only, TCP only: the rule says so.
        let v4tcp = Config {
            ipv6: false,
            udp: None,
            source: Source::Client,
            ..config
        };
        let rule = &build(&v4tcp, &ifaces()).firewall.return_path[0];
        assert_eq!(rule.matches[0], Match::Family(Family::V4));
        assert_eq!(
            rule.matches[3],
            Match::Protos(vec![IpProto::Tcp, IpProto::Icmp])
        );
        assert!(IpProto::Icmpv6.in_family(Family::V6) && !IpProto::Icmpv6.in_family(Family::V4));
        assert!(IpProto::Icmp.in_family(Family::V4) && !IpProto::Icmp.in_family(Family::V6));
    }

    #[test]
    fn rp_filter_only_loosens_strict() {
        let item = SysctlItem {
            key: SysctlKey::conf("ipv4", "all", "rp_filter"),
            want: SysctlWant::NotStrictRpFilter,
            why: "",
        };
        assert_eq!(item.needed_write("1"), Some("2".into()));
        assert_eq!(item.needed_write("0"), None);
        assert_eq!(item.needed_write("2"), None);
        let fwd = SysctlItem {
            key: SysctlKey::new("net/ipv4/ip_forward"),
            want: SysctlWant::Value("1".into()),
            why: "",
        };
        assert_eq!(fwd.needed_write("0\n"), Some("1".into()));
        assert_eq!(fwd.needed_write("1\n"), None);
    }
}
