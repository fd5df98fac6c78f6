//! The command line of the `setup` binary, as clap definitions. They live in the
//! library so that tools other than the binary can reach them: the man page
//! generator (`dist/mangen`) renders `ringrelay-setup(8)` from [`Cli`].
//!
//! The doc comments on these types and fields are the `--help` text (clap derive
//! reads them), so items that have no help of their own (the subcommand slot, the
//! flattened apply options, the value enums' variants) carry no doc comment, and
//! `missing_docs` is allowed on them.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

use crate::config::{self, Backend, Config, FailMode, Mark, Source};
use crate::ports::{parse_port_list, PortSel};

const ABOUT: &str =
    "Hand forwarded TCP and UDP to the ringrelay engine through TPROXY (IPv4 and IPv6)";

const LONG_ABOUT: &str = "\
Hand forwarded TCP and UDP to the ringrelay engine through TPROXY (IPv4 and IPv6).

  setup apply      install the firewall rules (one transaction), the policy routing
                   for the interception mark, and the sysctls; --dry-run prints them
  setup status     exit 0 only when everything is in place and an engine would get
                   the traffic; otherwise one line per finding with its fix (exit 1:
                   rules missing or wrong, 3: traffic would not reach an engine)
  setup teardown   remove exactly what apply added and restore the sysctls

Traffic addressed to the box itself, loopback, and packets carrying the engine's
bypass mark are never intercepted. Locally generated traffic is not intercepted.

Fail mode: by default (nft) the setup FAILS OPEN: while the engine is not listening,
nft tproxy finds no socket and the traffic is forwarded untouched, so an engine crash
or restart does not cut the network. Use --fail-closed when bypassing the engine is
worse than an outage. The iptables TPROXY target always drops when nothing listens,
so --backend iptables is fail-closed (and refuses --fail-mode open).

The box's own firewall: TPROXY-delivered packets traverse the INPUT hook. apply and
status name every input chain that would drop them, with the rule that fixes it;
apply --accept-input inserts that rule (teardown removes it).

State: /run/ringrelay/setup-netns-<inode>.state (directory from $RINGRELAY_STATE_DIR),
one per network namespace; --state-file overrides it. apply journals each step in
<state>.journal before it runs it: after a killed apply, the next apply or teardown
recovers (undoes the half-done apply), and status says so.";

const STATUS_ABOUT: &str = "\
Check the rules and the data path, one line per finding with its fix.

It compares the live firewall rules, ip rules, routes and sysctls with what the last
`setup apply` recorded, and checks that intercepted traffic would reach an engine:
a transparent socket on the rules' port for every intercepted protocol and family,
no sysctl that drops marked packets (src_valid_mark), and no input-hook firewall
chain that drops them.

Exit codes:
  0  ready
  1  rules missing or wrong (MISSING / CONFLICT lines), or apply has not run
  2  could not check (e.g. not root: listing rules needs CAP_NET_ADMIN)
  3  rules in place, but intercepted traffic would not reach an engine (BLOCKED lines)";

#[derive(Parser, Debug)]
#[command(name = "setup", version, about = ABOUT, long_about = LONG_ABOUT)]
#[allow(missing_docs)] // see the module comment
pub struct Cli {
    /// State file recording what apply changed [default: $RINGRELAY_STATE_DIR or
    /// /run/ringrelay, then setup-netns-<netns inode>.state]
    #[arg(long, global = true, value_name = "PATH")]
    pub state_file: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
#[allow(missing_docs)] // see the module comment
pub enum Command {
    /// Install interception: firewall rules, policy routing, sysctls (atomic, idempotent)
    Apply {
        #[command(flatten)]
        plan: PlanArgs,
        /// Print the exact commands and rules apply would send, change nothing
        #[arg(long)]
        dry_run: bool,
    },
    /// Check the rules and the data path (exit 0 ready, 1 rules missing or wrong,
    /// 2 could not check, 3 no engine would get the traffic)
    #[command(long_about = STATUS_ABOUT)]
    Status,
    /// Remove exactly what apply added and restore sysctls; safe to run twice
    Teardown,
}

#[derive(Args, Debug)]
#[allow(missing_docs)] // see the module comment
pub struct PlanArgs {
    /// The engine's transparent port (TCP and UDP)
    #[arg(long, default_value_t = config::DEFAULT_PORT)]
    pub port: u16,
    /// TCP destination ports to intercept, e.g. 80,443,8000-8100 [default: all]
    #[arg(long, value_name = "LIST", value_parser = parse_port_list)]
    pub tcp_ports: Option<PortSel>,
    /// UDP destination ports to intercept, e.g. 53,443 [default: all]
    #[arg(long, value_name = "LIST", value_parser = parse_port_list)]
    pub udp_ports: Option<PortSel>,
    /// Do not intercept TCP
    #[arg(long, conflicts_with = "tcp_ports")]
    pub no_tcp: bool,
    /// Do not intercept UDP
    #[arg(long, conflicts_with = "udp_ports")]
    pub no_udp: bool,
    /// IPv4 only: no IPv6 rules, ip -6 rule/route or IPv6 forwarding
    #[arg(long)]
    no_ipv6: bool,
    /// Intercept only traffic arriving on this interface (repeatable, or comma-separated)
    /// [default: every interface but lo]
    #[arg(long = "in-iface", value_name = "IF", value_delimiter = ',')]
    pub in_ifaces: Vec<String>,
    /// Firewall front end: nft (table inet ringrelay) or iptables (mangle chains RINGRELAY*)
    #[arg(long, value_enum, default_value_t = BackendArg::Nft)]
    pub backend: BackendArg,
    /// Interception mark set by the tproxy rule and routed by the ip rule
    #[arg(long, value_name = "MARK[/MASK]", default_value = "0x1/0x1", value_parser = parse_mark_arg)]
    pub fwmark: Mark,
    /// Policy routing table holding `local default dev lo`
    #[arg(long, default_value_t = config::DEFAULT_TABLE)]
    pub table: u32,
    /// The engine's upstream SO_MARK (engine --mark); never intercepted
    #[arg(long, value_name = "MARK", default_value = "0x2", value_parser = parse_u32_arg)]
    pub bypass_mark: u32,
    /// What intercepted traffic does while nothing listens on the port
    /// [default: open with nft, closed with iptables]
    ///
    /// open: nft tproxy finds no socket, does not match, and the packet is forwarded
    /// as if no rule existed; an engine crash or restart degrades to plain routing
    /// (the default: the engine relays, it enforces no policy). Connections opened
    /// while the engine was down are reset when it comes back (their next segment
    /// reaches its listener).
    ///
    /// closed: such packets are dropped (nft: a drop rule after the tproxy rules);
    /// choose it when traffic must never bypass the engine. The iptables TPROXY target
    /// drops by itself, so --backend iptables is always closed.
    #[arg(long, value_enum)]
    pub fail_mode: Option<FailModeArg>,
    /// Same as --fail-mode closed
    #[arg(long, conflicts_with = "fail_mode")]
    pub fail_closed: bool,
    /// Insert `meta mark & 0x1 == 0x1 accept` (iptables: `-m mark --mark 0x1/0x1 -j
    /// ACCEPT`) at the top of every input-hook chain of this box's own firewall that
    /// would drop intercepted packets; teardown removes it
    ///
    /// TPROXY-delivered packets traverse the INPUT hook: a firewall with `policy drop`
    /// on input drops every intercepted flow unless it accepts the interception mark.
    /// Without this option apply and status only report such chains, with the rule.
    #[arg(long)]
    pub accept_input: bool,
    /// The engine's --source: router (its own address), client-ip (the client's
    /// address) or client (its address and port); the last two also install the
    /// return path and need --in-iface
    ///
    /// With client-ip or client, servers answer to client addresses. The return path
    /// delivers those replies (TCP, UDP and the ICMP errors about them) to the engine's
    /// upstream sockets: packets that arrive on the other interfaces, are routed to a
    /// client-side interface (nft only) and belong to a transparent socket get the
    /// interception mark. It never runs on the client side, so --in-iface is required.
    /// Servers must reach the clients through this box.
    #[arg(long, value_enum, default_value_t = SourceArg::Router)]
    pub source: SourceArg,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
#[allow(missing_docs)] // see the module comment
pub enum SourceArg {
    Router,
    ClientIp,
    Client,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
#[allow(missing_docs)] // see the module comment
pub enum BackendArg {
    Nft,
    Iptables,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
#[allow(missing_docs)] // see the module comment
pub enum FailModeArg {
    Open,
    Closed,
}

fn parse_mark_arg(s: &str) -> Result<Mark, String> {
    config::parse_mark(s).map_err(|e| e.to_string())
}

fn parse_u32_arg(s: &str) -> Result<u32, String> {
    config::parse_u32(s).ok_or_else(|| format!("invalid mark {s:?}: expected a number like 0x2"))
}

impl PlanArgs {
    /// The library config; the second value says whether the fail mode was defaulted
    /// to closed because of the iptables backend.
    pub fn to_config(&self) -> (Config, bool) {
        let backend = match self.backend {
            BackendArg::Nft => Backend::Nft,
            BackendArg::Iptables => Backend::Iptables,
        };
        let explicit = match (self.fail_mode, self.fail_closed) {
            (_, true) | (Some(FailModeArg::Closed), _) => Some(FailMode::Closed),
            (Some(FailModeArg::Open), _) => Some(FailMode::Open),
            (None, false) => None,
        };
        let fail_mode = explicit.unwrap_or(FailMode::default_for(backend));
        let mut c = Config {
            backend,
            port: self.port,
            tcp: (!self.no_tcp).then(|| self.tcp_ports.clone().unwrap_or(PortSel::All)),
            udp: (!self.no_udp).then(|| self.udp_ports.clone().unwrap_or(PortSel::All)),
            ipv6: !self.no_ipv6,
            in_ifaces: self.in_ifaces.clone(),
            fwmark: self.fwmark,
            table: self.table,
            bypass_mark: self.bypass_mark,
            fail_mode,
            accept_input: self.accept_input,
            source: match self.source {
                SourceArg::Router => Source::Router,
                SourceArg::ClientIp => Source::ClientIp,
                SourceArg::Client => Source::Client,
            },
        };
        c.normalize();
        let defaulted_closed = explicit.is_none() && fail_mode == FailMode::Closed;
        (c, defaulted_closed)
    }
}
