//! Validated options for `setup apply`, with the shared defaults of `docs/CONTRACTS.md`.

use crate::ports::PortSel;
use std::fmt;
use std::str::FromStr;
use thiserror::Error;

/// The transparent port the engine listens on (TCP and UDP, IPv4 and IPv6).
pub const DEFAULT_PORT: u16 = 15001;
/// The interception fwmark value set by the tproxy rule and routed by the ip rule.
pub const DEFAULT_FWMARK: u32 = 0x1;
/// The mask of the interception fwmark: only this bit is ours.
pub const DEFAULT_FWMARK_MASK: u32 = 0x1;
/// The policy routing table that holds `local default dev lo`.
pub const DEFAULT_TABLE: u32 = 100;
/// The `SO_MARK` the engine puts on its upstream sockets; never intercepted.
pub const DEFAULT_BYPASS_MARK: u32 = 0x2;

/// Which firewall front end programs the interception rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// One dedicated `inet ringrelay` table through `nft -f -`.
    Nft,
    /// Dedicated `RINGRELAY*` chains in the mangle table through
    /// `iptables-restore --noflush` and `ip6tables-restore --noflush`.
    Iptables,
}

impl Backend {
    /// The name used on the command line and in the state file.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Nft => "nft",
            Backend::Iptables => "iptables",
        }
    }
}

impl FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "nft" => Ok(Backend::Nft),
            "iptables" => Ok(Backend::Iptables),
            other => Err(format!("unknown backend {other:?}: use nft or iptables")),
        }
    }
}

/// What happens to traffic selected for interception while nothing listens on the port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailMode {
    /// Forwarded untouched, as if no rule existed (nft `tproxy` does not match when no
    /// transparent socket is found). Keeps the network up when the engine is down.
    Open,
    /// Dropped. nft: an explicit `drop` after the tproxy rules; iptables: the `TPROXY`
    /// target itself drops when it finds no socket.
    Closed,
}

impl FailMode {
    /// The name used on the command line and in the state file.
    pub fn name(self) -> &'static str {
        match self {
            FailMode::Open => "open",
            FailMode::Closed => "closed",
        }
    }
}

impl FailMode {
    /// The default for a backend: fail-open with nft (availability first: the engine
    /// relays, it does not enforce policy), fail-closed with iptables because its
    /// `TPROXY` target drops packets by itself when nothing listens.
    pub fn default_for(backend: Backend) -> FailMode {
        match backend {
            Backend::Nft => FailMode::Open,
            Backend::Iptables => FailMode::Closed,
        }
    }
}

impl FromStr for FailMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "open" => Ok(FailMode::Open),
            "closed" => Ok(FailMode::Closed),
            other => Err(format!("unknown fail mode {other:?}: use open or closed")),
        }
    }
}

/// Which source address the engine's upstream connections and datagrams carry
/// (`engine --source`), and so whether servers' replies need a return path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Source {
    /// The router's own address: replies are addressed to the box and delivered
    /// locally like any other traffic for it. No return path (the default).
    #[default]
    Router,
    /// The client's address with a port the engine picks: servers see the client.
    /// Replies are addressed to the client and need the return path.
    ClientIp,
    /// The client's address and port: the upstream flow has the client's own 4-tuple.
    /// Needs the same return path as `ClientIp`.
    Client,
}

impl Source {
    /// The name used on the command line (`--source`) and in the state file.
    pub fn name(self) -> &'static str {
        match self {
            Source::Router => "router",
            Source::ClientIp => "client-ip",
            Source::Client => "client",
        }
    }

    /// Whether upstream sockets are bound to client addresses, so that replies from
    /// servers must be delivered to them by the return-path rule.
    pub fn needs_return_path(self) -> bool {
        self != Source::Router
    }
}

impl FromStr for Source {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "router" => Ok(Source::Router),
            "client-ip" => Ok(Source::ClientIp),
            "client" => Ok(Source::Client),
            other => Err(format!(
                "unknown source {other:?}: use router, client-ip or client"
            )),
        }
    }
}

/// A packet mark value and the mask of the bits it owns (`fwmark 0x1/0x1`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mark {
    /// The bits set.
    pub value: u32,
    /// The bits owned; `value` lies inside it.
    pub mask: u32,
}

impl fmt::Display for Mark {
    /// `0x1/0x1`, the syntax of `ip rule ... fwmark` and `--tproxy-mark`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}/{:#x}", self.value, self.mask)
    }
}

/// Parses `0x1`, `1`, `0x1/0x1` or `1/1`; without a mask the mask equals the value.
pub fn parse_mark(text: &str) -> Result<Mark, ConfigError> {
    let bad = || ConfigError::BadMark {
        text: text.to_string(),
    };
    let (v, m) = match text.split_once('/') {
        Some((v, m)) => (v, Some(m)),
        None => (text, None),
    };
    let value = parse_u32(v).ok_or_else(bad)?;
    let mask = match m {
        Some(m) => parse_u32(m).ok_or_else(bad)?,
        None => value,
    };
    Ok(Mark { value, mask })
}

/// Parses a decimal or `0x` hexadecimal u32.
pub fn parse_u32(text: &str) -> Option<u32> {
    let t = text.trim();
    match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) if !hex.is_empty() => u32::from_str_radix(hex, 16).ok(),
        Some(_) => None,
        None if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) => t.parse().ok(),
        None => None,
    }
}

/// Everything `setup apply` needs to build a plan. Built by the CLI, recorded in the
/// state file, and rebuilt from it by `status` and `teardown`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Firewall front end.
    pub backend: Backend,
    /// The engine's transparent port.
    pub port: u16,
    /// TCP ports intercepted; `None` = TCP is not intercepted.
    pub tcp: Option<PortSel>,
    /// UDP ports intercepted; `None` = UDP is not intercepted.
    pub udp: Option<PortSel>,
    /// Whether IPv6 is intercepted too (IPv4 always is).
    pub ipv6: bool,
    /// Interfaces whose incoming traffic is intercepted; empty = every interface but `lo`.
    pub in_ifaces: Vec<String>,
    /// Interception mark set by the tproxy rule and matched by the ip rule.
    pub fwmark: Mark,
    /// Policy routing table for `local default dev lo`.
    pub table: u32,
    /// The engine's upstream `SO_MARK`; packets carrying these bits are never intercepted.
    pub bypass_mark: u32,
    /// Behaviour while nothing listens on `port`.
    pub fail_mode: FailMode,
    /// Insert `meta mark & MASK == VALUE accept` into input-hook chains that would
    /// drop intercepted packets (`--accept-input`).
    pub accept_input: bool,
    /// The engine's `--source`: with `client-ip` or `client` the plan also holds the
    /// return path for replies addressed to client addresses.
    pub source: Source,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            backend: Backend::Nft,
            port: DEFAULT_PORT,
            tcp: Some(PortSel::All),
            udp: Some(PortSel::All),
            ipv6: true,
            in_ifaces: Vec::new(),
            fwmark: Mark {
                value: DEFAULT_FWMARK,
                mask: DEFAULT_FWMARK_MASK,
            },
            table: DEFAULT_TABLE,
            bypass_mark: DEFAULT_BYPASS_MARK,
            fail_mode: FailMode::Open,
            accept_input: false,
            source: Source::Router,
        }
    }
}

/// A combination of options that can never work, found without touching the system.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// A mark that is neither decimal nor `0x` hexadecimal.
    #[error("invalid mark {text:?}: expected a number like 0x1 or 0x1/0x1 (value/mask)")]
    BadMark {
        /// The text given.
        text: String,
    },
    /// The interception mark is zero, or has bits outside its mask.
    #[error("invalid --fwmark {mark}: the value must be non-zero and lie inside the mask")]
    FwmarkOutsideMask {
        /// The mark given.
        mark: Mark,
    },
    /// The bypass mark is zero or shares bits with the interception mask (CONTRACTS.md:
    /// the policy rule would route the engine's own upstream traffic to `lo`).
    #[error(
        "invalid --bypass-mark {bypass:#x}: it must be non-zero and share no bit with the interception mask {mask:#x}, or the engine's upstream traffic would be routed back to itself"
    )]
    BypassOverlapsFwmark {
        /// The bypass mark given.
        bypass: u32,
        /// The interception mask.
        mask: u32,
    },
    /// Table 0 is "unspecified" and 253-255 are the kernel's default, main and local.
    #[error("invalid --table {table}: 0, 253 (default), 254 (main) and 255 (local) are reserved; pick a free table such as 100")]
    ReservedTable {
        /// The table given.
        table: u32,
    },
    /// Port 0 cannot be listened on.
    #[error("invalid --port 0: give the engine's listening port (1-65535)")]
    ZeroPort,
    /// Both `--no-tcp` and `--no-udp`: nothing would be intercepted.
    #[error("nothing to intercept: --no-tcp and --no-udp were both given; drop one of them")]
    NothingToIntercept,
    /// `lo` named with `--in-iface`: loopback is never intercepted.
    #[error("--in-iface lo: loopback traffic is never intercepted (TPROXY only sees packets routed in from outside); name the interfaces clients arrive on")]
    LoopbackInterface,
    /// An interface name the kernel would never accept.
    #[error("invalid interface name {name:?} for --in-iface: at most 15 bytes, no '/', ':' or whitespace")]
    BadInterfaceName {
        /// The name given.
        name: String,
    },
    /// Explicit fail-open with the iptables backend, which cannot do it.
    #[error("--fail-mode open is not possible with --backend iptables: the iptables TPROXY target drops intercepted packets when nothing listens on the port; use --backend nft for fail-open, or --fail-mode closed")]
    FailOpenNeedsNft,
    /// `--source client-ip|client` without `--in-iface`: the return path has no side
    /// it could safely run on.
    #[error("--source {given} needs --in-iface: the return path matches replies to client addresses on the interfaces clients do not arrive on (the server side); with every interface intercepted there is no such side, and a socket match on the client side breaks port reuse (a SYN that reuses a client port goes to the engine's TIME_WAIT socket, which resets it) and diverts client datagrams to the engine's UDP reply sockets; name the client-side interfaces, e.g. `--in-iface lan0`")]
    ReturnPathNeedsInIface {
        /// The `--source` given.
        given: &'static str,
    },
}

impl Config {
    /// Checks everything that can be checked without looking at the system.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.port == 0 {
            return Err(ConfigError::ZeroPort);
        }
        let fw = self.fwmark;
        if fw.value == 0 || fw.mask == 0 || fw.value & !fw.mask != 0 {
            return Err(ConfigError::FwmarkOutsideMask { mark: fw });
        }
        if self.bypass_mark == 0 || self.bypass_mark & fw.mask != 0 {
            return Err(ConfigError::BypassOverlapsFwmark {
                bypass: self.bypass_mark,
                mask: fw.mask,
            });
        }
        if matches!(self.table, 0 | 253..=255) {
            return Err(ConfigError::ReservedTable { table: self.table });
        }
        if self.tcp.is_none() && self.udp.is_none() {
            return Err(ConfigError::NothingToIntercept);
        }
        for name in &self.in_ifaces {
            if name == "lo" {
                return Err(ConfigError::LoopbackInterface);
            }
            if !valid_ifname(name) {
                return Err(ConfigError::BadInterfaceName { name: name.clone() });
            }
        }
        if self.backend == Backend::Iptables && self.fail_mode == FailMode::Open {
            return Err(ConfigError::FailOpenNeedsNft);
        }
        if self.source.needs_return_path() && self.in_ifaces.is_empty() {
            return Err(ConfigError::ReturnPathNeedsInIface {
                given: self.source.name(),
            });
        }
        Ok(())
    }

    /// The interfaces named with `--in-iface`, sorted and without duplicates.
    pub fn normalize(&mut self) {
        self.in_ifaces.sort();
        self.in_ifaces.dedup();
    }
}

/// The kernel's `dev_valid_name()`: 1-15 bytes, not `.`/`..`, no `/`, `:` or whitespace.
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c == '"' || c.is_control())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_parse() {
        assert_eq!(parse_mark("0x1").unwrap(), Mark { value: 1, mask: 1 });
        assert_eq!(
            parse_mark("0x10/0xf0").unwrap(),
            Mark {
                value: 0x10,
                mask: 0xf0
            }
        );
        assert_eq!(parse_mark("3/3").unwrap(), Mark { value: 3, mask: 3 });
        assert_eq!(
            parse_mark("one").unwrap_err().to_string(),
            "invalid mark \"one\": expected a number like 0x1 or 0x1/0x1 (value/mask)"
        );
        assert!(parse_mark("0x").is_err());
        assert!(parse_mark("0x1/").is_err());
        assert_eq!(Mark { value: 1, mask: 1 }.to_string(), "0x1/0x1");
    }

    #[test]
    fn defaults_follow_contracts() {
        let c = Config::default();
        assert_eq!(c.port, 15001);
        assert_eq!(c.fwmark, Mark { value: 1, mask: 1 });
        assert_eq!(c.table, 100);
        assert_eq!(c.bypass_mark, 2);
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn rejects_impossible_combinations() {
        let base = Config::default();
        let with = |f: &dyn Fn(&mut Config)| {
            let mut c = base.clone();
            f(&mut c);
            c.validate().unwrap_err()
        };
        assert_eq!(
            with(&|c| c.bypass_mark = 0x3),
            ConfigError::BypassOverlapsFwmark { bypass: 3, mask: 1 }
        );
        assert_eq!(
            with(&|c| c.fwmark = Mark { value: 2, mask: 1 }),
            ConfigError::FwmarkOutsideMask {
                mark: Mark { value: 2, mask: 1 }
            }
        );
        assert_eq!(
            with(&|c| c.table = 254),
            ConfigError::ReservedTable { table: 254 }
        );
        assert_eq!(
            with(&|c| {
                c.tcp = None;
                c.udp = None
            }),
            ConfigError::NothingToIntercept
        );
        assert_eq!(
            with(&|c| c.in_ifaces = vec!["lo".into()]),
            ConfigError::LoopbackInterface
        );
        assert_eq!(
            with(&|c| c.in_ifaces = vec!["a/b".into()]),
            ConfigError::BadInterfaceName { name: "a/b".into() }
        );
        assert_eq!(
            with(&|c| c.backend = Backend::Iptables),
            ConfigError::FailOpenNeedsNft
        );
        assert_eq!(with(&|c| c.port = 0), ConfigError::ZeroPort);
        assert_eq!(
            with(&|c| c.source = Source::ClientIp),
            ConfigError::ReturnPathNeedsInIface { given: "client-ip" }
        );
        assert_eq!(
            with(&|c| c.source = Source::Client),
            ConfigError::ReturnPathNeedsInIface { given: "client" }
        );
        let mut ok = base.clone();
        ok.source = Source::ClientIp;
        ok.in_ifaces = vec!["lan0".into()];
        assert_eq!(ok.validate(), Ok(()));
    }

    #[test]
    fn sources_parse_and_name_themselves() {
        for s in [Source::Router, Source::ClientIp, Source::Client] {
            assert_eq!(s.name().parse::<Source>(), Ok(s));
        }
        assert_eq!(Source::default(), Source::Router);
        assert!(!Source::Router.needs_return_path());
        assert!(Source::ClientIp.needs_return_path() && Source::Client.needs_return_path());
        assert!("client_ip"
            .parse::<Source>()
            .unwrap_err()
            .contains("client-ip"));
    }
}
