//! Rules files: what `engine --config FILE` runs and `engine --check-config FILE`
//! checks, compiled into an immutable [`Rules`] that every core shares through an
//! `Arc`. No I/O but [`Rules::load`] reading the file.
//!
//! # The file
//!
//! ```toml
//! default = "relay"                 # when no rule matches: relay | reject (default relay)
//!
//! [[rule]]
//! name = "no-telemetry"             # required, unique: counters and flow logs show it
//! proto = "tcp"                     # tcp | udp | any (default any)
//! dst = ["198.51.100.0/24", "2001:db8:bad::/48"]
//! dst_port = "443,8000-8100"
//! action = "reject"
//! ```
//!
//! A rule's fields (all optional but `name` and `action`; any other field is an error):
//!
//! | field | value | matches |
//! |---|---|---|
//! | `name` | letters, digits, `-`, `_`, `.`; at most 64 | (its id in counters and logs) |
//! | `comment` | any string | (ignored) |
//! | `enabled` | `true` (default) or `false` | `false`: checked, but never matches |
//! | `proto` | `"tcp"`, `"udp"`, `"any"` | the transport |
//! | `src`, `dst` | a CIDR or a list of them, v4 and v6; a bare address is a /32 or /128 | the client's address; the original destination's |
//! | `src_port`, `dst_port` | `"443,8000-8100"`, `53`, or a list of those | the client's port; the original destination's |
//! | `sni` | a name or a list: `"example.org"`, `"*.example.com"` | the TLS ClientHello's server name |
//! | `host` | as `sni` | the HTTP/1.x request's host |
//! | `action` | `"relay"`, `"reject"`, `"redirect"`, `"drop"` | |
//! | `to` | `"IP:port"`, v6 as `"[addr]:port"` | (where `redirect` connects) |
//!
//! * A CIDR may not have bits set past its length (`10.1.2.3/8` is an error: the
//!   intent is unclear). IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`), in rules and in
//!   connections, are matched as the IPv4 address they carry.
//! * Names are compared as [`sniff::normalize_name`](super::sniff::normalize_name)
//!   leaves them: case-insensitive, a trailing dot ignored. `*.example.com` matches
//!   `a.example.com` and `a.b.example.com`, not `example.com` (list both for both); `*`
//!   is allowed only as the whole first label.
//! * Every list must have at least one item: an empty one would never match.
//!
//! # Matching
//!
//! Every given field must match (an absent one matches anything); rules are tried in
//! file order and the first that matches decides. No match: `default`.
//!
//! * `relay`: to the original destination. `redirect`: to `to` instead (for UDP the
//!   replies still come from the original destination's address, see
//!   [`UdpVerdict::RelayTo`]).
//! * `reject`: TCP: the client is reset, nothing is connected upstream; UDP: the
//!   datagram is dropped and no flow opens. `default = "reject"` is the same.
//! * `drop`: UDP only; a rule with `drop` must say `proto = "udp"`, because what a TCP
//!   "drop" should mean (reset? silence until the client times out?) is better said
//!   with `reject`.
//! * A rule with `sni` or `host` only matches TCP, and only once the client's first
//!   bytes named a server (see the two steps below). With both, the rule matches if
//!   either matches: the SNI against `sni`, or the Host against `host` (a connection
//!   carries one or the other). `proto = "udp"` with `sni`/`host` is an error;
//!   `proto = "any"` with them means TCP.
//!
//! # The two-step TCP decision
//!
//! [`Rules::decide_tcp`] runs at the accept. It finds the first rule (TCP-capable,
//! enabled) whose fields other than `sni`/`host` match. If there is none, or it has no
//! `sni`/`host`, that is the verdict: [`TcpDecision::Decided`]. If it has, the name
//! decides whether it or a later rule applies: [`TcpDecision::NeedsName`], and the
//! caller reads the client's first bytes ([`super::sniff::sniff`]) and calls
//! [`Rules::decide_tcp_named`] with what it found. That is the full first-match over
//! all rules with the name known; a rule with `sni`/`host` matches only if its name
//! matches, so with `(None, None)` (no name, not TLS or HTTP, or the sniff timed out)
//! name rules never match. For a connection that `decide_tcp` decided,
//! `decide_tcp_named` gives the same verdict whatever the names.
//!
//! [`Rules::decide_udp`] runs once per flow and ignores name rules.
//!
//! # Cost
//!
//! A decision costs about the same with 1 rule or 100,000. Each rule is filed under
//! one key: its `dst` prefixes (in a prefix trie per family), else its `src` prefixes,
//! else its `dst_port` ranges, else its `src_port` ranges (each range as aligned
//! power-of-two blocks in a hash map), else a list of rules with none of those, which
//! match anything and so end a scan at once. A decision walks the tries down the
//! address (one visit per covering prefix: at most 33 or 129), probes the port maps (one
//! probe per block size in use, at most 17), and checks only the rules found there,
//! each list in rule order and only until its first full match or a rule later than
//! the best so far. Name rules are filed under their names too: an exact-name hash map
//! and a suffix hash map, looked up once per label of the name. Within a rule, a long
//! CIDR or port list is a sorted range list, searched in O(log n).
//!
//! What it does not bound: many rules under the same key that differ only in other
//! fields (10,000 rules for one `dst` with different `src_port`s) are checked one by
//! one, in that key's list, until one matches.
//!
//! # Errors
//!
//! Every error names the place: `FILE:LINE:COL: message` ([`ConfigError`]), at the
//! offending value (or key, or the rule's `[[rule]]` header for a missing field).
//! One pass reports every error it finds, up to [`MAX_ERRORS`]; a TOML syntax error
//! stops the check at the first one (what follows it is not reliable).

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::Path;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use prefix_trie::{Prefix, PrefixMap};
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use super::sniff::{check_name, MAX_NAME};
use super::{ConnMeta, FlowMeta, TcpVerdict, UdpVerdict};

/// One problem in a rules file, shown as `FILE:LINE:COL: message`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The file, as the caller named it.
    pub file: String,
    /// 1-based; 0 when the error is about the whole file (it could not be read), and
    /// then it shows as `FILE: message`.
    pub line: usize,
    /// 1-based, in characters.
    pub col: usize,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file, self.line, self.col, self.message
            )
        }
    }
}

impl std::error::Error for ConfigError {}

/// What to do with a connection or flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Relay to the original destination.
    Relay,
    /// Relay to this address instead.
    RelayTo(SocketAddr),
    /// TCP only: reset the client, connect nothing.
    Reject,
    /// UDP only: drop the datagram, open no flow.
    Drop,
}

impl Action {
    /// As the engine's TCP verdict. A TCP decision never yields `Drop`; were it given
    /// one, it would reject.
    pub fn tcp(self) -> TcpVerdict {
        match self {
            Action::Relay => TcpVerdict::Relay,
            Action::RelayTo(a) => TcpVerdict::RelayTo(a),
            Action::Reject | Action::Drop => TcpVerdict::Reject,
        }
    }

    /// As the engine's UDP verdict. A UDP decision never yields `Reject`; were it
    /// given one, it would drop.
    pub fn udp(self) -> UdpVerdict {
        match self {
            Action::Relay => UdpVerdict::Relay,
            Action::RelayTo(a) => UdpVerdict::RelayTo(a),
            Action::Reject | Action::Drop => UdpVerdict::Drop,
        }
    }
}

/// A decision: the action, and the rule that gave it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// From [`Rules::decide_tcp`] / [`Rules::decide_tcp_named`]: `Relay`, `RelayTo` or
    /// `Reject`. From [`Rules::decide_udp`]: `Relay`, `RelayTo` or `Drop`.
    pub action: Action,
    /// The matching rule's id, an index into [`Rules::rule_names`]; `None` when no
    /// rule matched and this is the default.
    pub rule: Option<u32>,
}

/// The first step of a TCP decision (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpDecision {
    /// Final: act on it now.
    Decided(Verdict),
    /// The verdict depends on the server name: sniff the client's first bytes, then
    /// ask [`Rules::decide_tcp_named`].
    NeedsName,
}

/// At most this many errors are reported, then one line saying how many more.
pub const MAX_ERRORS: usize = 100;

/// Rule ids are `u32`; this many is far more than a file should hold.
pub const MAX_RULES: usize = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proto {
    Tcp,
    Udp,
    Any,
}

/// A compiled rule.
#[derive(Debug)]
struct Rule {
    proto: Proto,
    enabled: bool,
    src: Option<Nets>,
    dst: Option<Nets>,
    src_port: Option<Ports>,
    dst_port: Option<Ports>,
    sni: Option<Names>,
    host: Option<Names>,
    action: Action,
}

impl Rule {
    fn tcp(&self) -> bool {
        self.enabled && self.proto != Proto::Udp
    }

    fn udp(&self) -> bool {
        self.enabled && self.proto != Proto::Tcp && !self.named()
    }

    fn named(&self) -> bool {
        self.sni.is_some() || self.host.is_some()
    }

    /// Every field but the protocol (which the index a rule is found in settles) and
    /// the names.
    fn matches(&self, client: SocketAddr, dst: SocketAddr) -> bool {
        self.dst.as_ref().is_none_or(|n| n.contains(dst.ip()))
            && self.src.as_ref().is_none_or(|n| n.contains(client.ip()))
            && self
                .dst_port
                .as_ref()
                .is_none_or(|p| p.contains(dst.port()))
            && self
                .src_port
                .as_ref()
                .is_none_or(|p| p.contains(client.port()))
    }
}

/// The address as rules see it: an IPv4-mapped IPv6 address is its IPv4 address.
fn canon(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(a) => a.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// A CIDR list: the prefixes as written (for the index) and merged sorted ranges (for
/// an O(log n) membership test).
#[derive(Debug)]
struct Nets {
    nets: Vec<IpNet>,
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
}

impl Nets {
    fn new(nets: Vec<IpNet>) -> Nets {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for n in &nets {
            match n {
                IpNet::V4(n) => v4.push((n.network().into(), n.broadcast().into())),
                IpNet::V6(n) => v6.push((n.network().into(), n.broadcast().into())),
            }
        }
        Nets {
            nets,
            v4: merge(v4),
            v6: merge(v6),
        }
    }

    fn contains(&self, ip: IpAddr) -> bool {
        match canon(ip) {
            IpAddr::V4(a) => in_ranges(&self.v4, u32::from(a)),
            IpAddr::V6(a) => in_ranges(&self.v6, u128::from(a)),
        }
    }
}

/// A port list as merged sorted ranges.
#[derive(Debug)]
struct Ports(Vec<(u16, u16)>);

impl Ports {
    fn contains(&self, port: u16) -> bool {
        in_ranges(&self.0, port)
    }
}

/// Sorts inclusive ranges and merges the ones that overlap or touch.
fn merge<T: Copy + Ord + num_like::Step>(mut v: Vec<(T, T)>) -> Vec<(T, T)> {
    v.sort_unstable();
    let mut out: Vec<(T, T)> = Vec::with_capacity(v.len());
    for (a, b) in v {
        match out.last_mut() {
            Some(last) if a <= last.1.saturating_next() => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

fn in_ranges<T: Copy + Ord>(ranges: &[(T, T)], x: T) -> bool {
    let i = ranges.partition_point(|&(a, _)| a <= x);
    i > 0 && x <= ranges[i - 1].1
}

mod num_like {
    /// The next value, saturating: for merging ranges that touch.
    pub trait Step {
        fn saturating_next(self) -> Self;
    }
    macro_rules! step {
        ($($t:ty),*) => {$(
            impl Step for $t {
                fn saturating_next(self) -> Self {
                    self.saturating_add(1)
                }
            }
        )*};
    }
    step!(u16, u32, u128);
}

/// A rule's `sni` or `host` names: exact ones and `*.` suffixes, normalised.
#[derive(Debug)]
struct Names {
    exact: Vec<String>,
    /// `*.example.com` is kept as `example.com`.
    suffixes: Vec<String>,
}

/// Rule ids filed under one key each (see "Cost" in the module docs). Every list is in
/// rule order.
struct AddrIndex {
    dst4: PrefixMap<Ipv4Net, Vec<u32>>,
    dst6: PrefixMap<Ipv6Net, Vec<u32>>,
    src4: PrefixMap<Ipv4Net, Vec<u32>>,
    src6: PrefixMap<Ipv6Net, Vec<u32>>,
    dst_port: PortIndex,
    src_port: PortIndex,
    /// Rules with no address and no port: each matches anything its index is for, so
    /// a scan of this list stops at its first entry.
    rest: Vec<u32>,
}

/// Rules filed under port ranges, each range split into aligned power-of-two blocks
/// (`8000-8100` is 8000-8063, 8064-8095, 8096-8099 and 8100): a lookup probes
/// one block per block size in use, at most 17, however many rules there are.
#[derive(Default)]
struct PortIndex {
    /// (log2 of the block size, first port of the block) → rules.
    blocks: HashMap<(u8, u16), Vec<u32>>,
    /// Bit k: some block of size 2^k exists.
    sizes: u32,
}

impl PortIndex {
    fn file(&mut self, ports: &Ports, id: u32) {
        for &(a, b) in &ports.0 {
            let (mut lo, hi) = (u32::from(a), u32::from(b));
            while lo <= hi {
                // The largest block that starts at `lo` (aligned) and ends by `hi`.
                let mut k = lo.trailing_zeros().min(16);
                while lo + (1 << k) - 1 > hi {
                    k -= 1;
                }
                file(self.blocks.entry((k as u8, lo as u16)).or_default(), id);
                self.sizes |= 1 << k;
                lo += 1 << k;
            }
        }
    }

    fn scan<F: FnMut(u32) -> bool>(&self, first: &mut First<F>, port: u16) {
        let mut sizes = self.sizes;
        while sizes != 0 {
            let k = sizes.trailing_zeros();
            sizes &= sizes - 1;
            let base = (u32::from(port) >> k << k) as u16;
            if let Some(l) = self.blocks.get(&(k as u8, base)) {
                first.scan(l);
            }
        }
    }
}

/// Files `id` last in a list, once.
fn file(list: &mut Vec<u32>, id: u32) {
    if list.last() != Some(&id) {
        list.push(id);
    }
}

/// The best (lowest) rule id found so far that fully matches.
struct First<F> {
    best: u32,
    matches: F,
}

impl<F: FnMut(u32) -> bool> First<F> {
    fn new(matches: F) -> First<F> {
        First {
            best: u32::MAX,
            matches,
        }
    }

    /// Checks a list in order, up to its first full match or the best so far: a later
    /// rule cannot win.
    fn scan(&mut self, list: &[u32]) {
        for &id in list {
            if id >= self.best {
                return;
            }
            if (self.matches)(id) {
                self.best = id;
                return;
            }
        }
    }

    fn found(&self) -> Option<u32> {
        (self.best != u32::MAX).then_some(self.best)
    }
}

impl AddrIndex {
    fn build(rules: &[Rule], take: impl Fn(&Rule) -> bool) -> AddrIndex {
        let mut ix = AddrIndex {
            dst4: PrefixMap::new(),
            dst6: PrefixMap::new(),
            src4: PrefixMap::new(),
            src6: PrefixMap::new(),
            dst_port: PortIndex::default(),
            src_port: PortIndex::default(),
            rest: Vec::new(),
        };
        for (id, r) in rules.iter().enumerate() {
            if !take(r) {
                continue;
            }
            let id = id as u32; // MAX_RULES fits
            if let Some(d) = &r.dst {
                for n in &d.nets {
                    match n {
                        IpNet::V4(n) => file(ix.dst4.entry(*n).or_default(), id),
                        IpNet::V6(n) => file(ix.dst6.entry(*n).or_default(), id),
                    }
                }
            } else if let Some(s) = &r.src {
                for n in &s.nets {
                    match n {
                        IpNet::V4(n) => file(ix.src4.entry(*n).or_default(), id),
                        IpNet::V6(n) => file(ix.src6.entry(*n).or_default(), id),
                    }
                }
            } else if let Some(p) = &r.dst_port {
                ix.dst_port.file(p, id);
            } else if let Some(p) = &r.src_port {
                ix.src_port.file(p, id);
            } else {
                ix.rest.push(id);
            }
        }
        ix
    }

    fn scan<F: FnMut(u32) -> bool>(
        &self,
        first: &mut First<F>,
        client: SocketAddr,
        dst: SocketAddr,
    ) {
        match canon(dst.ip()) {
            IpAddr::V4(a) => covering(&self.dst4, a.into(), |l| first.scan(l)),
            IpAddr::V6(a) => covering(&self.dst6, a.into(), |l| first.scan(l)),
        }
        match canon(client.ip()) {
            IpAddr::V4(a) => covering(&self.src4, a.into(), |l| first.scan(l)),
            IpAddr::V6(a) => covering(&self.src6, a.into(), |l| first.scan(l)),
        }
        self.dst_port.scan(first, dst.port());
        self.src_port.scan(first, client.port());
        first.scan(&self.rest);
    }
}

/// Every value of `map` whose prefix contains `key`, longest prefix first: a chain of
/// longest-prefix matches, each on the prefix just above the last one found. The same
/// as `PrefixMap::cover_values`, which allocates a Vec per call: that was most of a
/// decision's time (180 ns for a cover against 45 for a `get_lpm`, measured).
fn covering<P: Prefix, T>(map: &PrefixMap<P, T>, key: P, mut each: impl FnMut(&T)) {
    let mut key = key;
    while let Some((found, value)) = map.get_lpm(&key) {
        each(value);
        let len = found.prefix_len();
        if len == 0 {
            return;
        }
        key = P::from_repr_len(found.repr(), len - 1);
    }
}

/// Name rules filed under each of their names (`sni` or `host`).
#[derive(Default)]
struct NameIndex {
    exact: HashMap<String, Vec<u32>>,
    /// `*.example.com` under `example.com`.
    suffix: HashMap<String, Vec<u32>>,
}

impl NameIndex {
    fn build(rules: &[Rule], names: impl Fn(&Rule) -> Option<&Names>) -> NameIndex {
        let mut ix = NameIndex::default();
        for (id, r) in rules.iter().enumerate() {
            let Some(n) = names(r).filter(|_| r.tcp()) else {
                continue;
            };
            for e in &n.exact {
                file(ix.exact.entry(e.clone()).or_default(), id as u32);
            }
            for s in &n.suffixes {
                file(ix.suffix.entry(s.clone()).or_default(), id as u32);
            }
        }
        ix
    }

    /// `name` exactly, then every proper suffix after a dot: `a.b.example.com` tries
    /// `b.example.com`, `example.com` and `com` in the suffix map.
    fn scan<F: FnMut(u32) -> bool>(&self, first: &mut First<F>, name: &str) {
        if self.exact.is_empty() && self.suffix.is_empty() {
            return;
        }
        let name = lookup_form(name);
        if name.is_empty() || name.len() > MAX_NAME {
            return; // no rule has such a name; and this bounds the work
        }
        if let Some(l) = self.exact.get(name.as_ref()) {
            first.scan(l);
        }
        if self.suffix.is_empty() {
            return;
        }
        for (i, b) in name.bytes().enumerate() {
            if b == b'.' {
                if let Some(l) = self.suffix.get(&name[i + 1..]) {
                    first.scan(l);
                }
            }
        }
    }
}

/// A name as the index keeps them: lowercase, without one trailing dot. The sniffers
/// already give names in this form; anything else a caller passes is made so.
fn lookup_form(name: &str) -> Cow<'_, str> {
    let bare = name.strip_suffix('.').unwrap_or(name);
    if bare.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(bare.to_ascii_lowercase())
    } else {
        Cow::Borrowed(bare)
    }
}

/// A compiled rules file: immutable, `Send + Sync`, shared by every core.
pub struct Rules {
    names: Vec<String>,
    rules: Vec<Rule>,
    /// `Relay` or `Reject`.
    default: Action,
    /// TCP-capable enabled rules, with or without names: the first step.
    tcp_first: AddrIndex,
    /// TCP-capable enabled rules without names: the second step, with `sni`, `host`.
    tcp_plain: AddrIndex,
    sni: NameIndex,
    host: NameIndex,
    udp: AddrIndex,
    /// Some enabled rule has `sni` or `host`.
    needs_names: bool,
}

impl fmt::Debug for Rules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rules")
            .field("default", &self.default)
            .field("rules", &self.names)
            .finish_non_exhaustive()
    }
}

impl Rules {
    /// Parses and checks a rules file's text. `path` is only for the errors.
    pub fn parse(text: &str, path: &str) -> Result<Rules, Vec<ConfigError>> {
        let mut p = Parser::new(text, path);
        let rules = p.document();
        match rules {
            Some(r) if p.errors.is_empty() => Ok(r),
            _ => Err(p.finish()),
        }
    }

    /// Reads and parses a rules file.
    pub fn load(path: &Path) -> Result<Rules, Vec<ConfigError>> {
        let shown = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| {
            vec![ConfigError {
                file: shown.clone(),
                line: 0,
                col: 0,
                message: format!("cannot read the rules file: {e}"),
            }]
        })?;
        match std::str::from_utf8(&bytes) {
            Ok(text) => Rules::parse(text, &shown),
            Err(e) => {
                let valid = std::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or_default();
                let mut p = Parser::new(valid, &shown);
                p.error(valid.len()..valid.len(), "not UTF-8 text");
                Err(p.finish())
            }
        }
    }

    /// A rule set with no rules: `default` for everything.
    pub fn relay_all() -> Rules {
        Rules::compile(Vec::new(), Vec::new(), Action::Relay)
    }

    fn compile(names: Vec<String>, rules: Vec<Rule>, default: Action) -> Rules {
        Rules {
            tcp_first: AddrIndex::build(&rules, Rule::tcp),
            tcp_plain: AddrIndex::build(&rules, |r| r.tcp() && !r.named()),
            sni: NameIndex::build(&rules, |r| r.sni.as_ref()),
            host: NameIndex::build(&rules, |r| r.host.as_ref()),
            udp: AddrIndex::build(&rules, Rule::udp),
            needs_names: rules.iter().any(|r| r.tcp() && r.named()),
            names,
            rules,
            default,
        }
    }

    /// Every rule's name, in file order: a rule's id is its index here (also for
    /// disabled rules, which never match).
    pub fn rule_names(&self) -> &[String] {
        &self.names
    }

    /// The number of rules, disabled ones included.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// No rules: every decision is the default.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The verdict when no rule matches, as a TCP action: `Relay` or `Reject` (which
    /// UDP takes as `Drop`).
    pub fn default_action(&self) -> Action {
        self.default
    }

    /// Whether some enabled rule has `sni` or `host`: if not, [`Rules::decide_tcp`]
    /// never answers `NeedsName` and no connection needs sniffing.
    pub fn needs_names(&self) -> bool {
        self.needs_names
    }

    fn tcp_verdict(&self, rule: Option<u32>) -> Verdict {
        let action = match rule {
            Some(id) => self.rules[id as usize].action,
            None => self.default,
        };
        let action = match action {
            Action::Drop => Action::Reject,
            a => a,
        };
        Verdict { action, rule }
    }

    fn udp_verdict(&self, rule: Option<u32>) -> Verdict {
        let action = match rule {
            Some(id) => self.rules[id as usize].action,
            None => self.default,
        };
        let action = match action {
            Action::Reject => Action::Drop,
            a => a,
        };
        Verdict { action, rule }
    }

    /// The first step for a TCP connection, at the accept (see the module docs).
    pub fn decide_tcp(&self, conn: &ConnMeta) -> TcpDecision {
        let (client, dst) = (conn.client.0, conn.orig_dst.0);
        let mut first = First::new(|id| self.rules[id as usize].matches(client, dst));
        self.tcp_first.scan(&mut first, client, dst);
        match first.found() {
            Some(id) if self.rules[id as usize].named() => TcpDecision::NeedsName,
            rule => TcpDecision::Decided(self.tcp_verdict(rule)),
        }
    }

    /// The TCP verdict with the sniffed names: `sni` from a TLS ClientHello, `host`
    /// from an HTTP/1.x request, `None` for what was not found (see the module docs).
    /// Names are compared case-insensitively, a trailing dot ignored.
    pub fn decide_tcp_named(
        &self,
        conn: &ConnMeta,
        sni: Option<&str>,
        host: Option<&str>,
    ) -> Verdict {
        let (client, dst) = (conn.client.0, conn.orig_dst.0);
        let mut first = First::new(|id| self.rules[id as usize].matches(client, dst));
        self.tcp_plain.scan(&mut first, client, dst);
        if let Some(n) = sni {
            self.sni.scan(&mut first, n);
        }
        if let Some(n) = host {
            self.host.scan(&mut first, n);
        }
        self.tcp_verdict(first.found())
    }

    /// The verdict for a new UDP flow.
    pub fn decide_udp(&self, flow: &FlowMeta) -> Verdict {
        let (client, dst) = (flow.client.0, flow.orig_dst.0);
        let mut first = First::new(|id| self.rules[id as usize].matches(client, dst));
        self.udp.scan(&mut first, client, dst);
        self.udp_verdict(first.found())
    }
}

// ---------------------------------------------------------------------------------
// Parsing and checking. toml's own spanned document (every key and value a
// `toml::Spanned`) rather than a serde-derived struct: serde stops at the first
// error, and the file should be fixable in one round.

type Span = Range<usize>;
type Value<'i> = Spanned<DeValue<'i>>;

const TOP_FIELDS: &[&str] = &["default", "rule"];
const RULE_FIELDS: &[&str] = &[
    "name", "comment", "enabled", "proto", "src", "dst", "src_port", "dst_port", "sni", "host",
    "action", "to",
];
/// Keys people write for a field, by habit from other tools.
const ALIASES: &[(&str, &str)] = &[
    ("dport", "dst_port"),
    ("dest_port", "dst_port"),
    ("port", "dst_port"),
    ("ports", "dst_port"),
    ("sport", "src_port"),
    ("source_port", "src_port"),
    ("dest", "dst"),
    ("destination", "dst"),
    ("source", "src"),
    ("protocol", "proto"),
    ("target", "to"),
    ("redirect", "to"),
    ("server_name", "sni"),
    ("servername", "sni"),
    ("hostname", "host"),
    ("disabled", "enabled"),
    ("description", "comment"),
];

struct Parser<'a> {
    text: &'a str,
    path: &'a str,
    /// Byte offset of every line start, for LINE:COL.
    lines: Vec<usize>,
    errors: Vec<(usize, String)>,
}

/// A rule's fields as found, before they are checked against each other.
#[derive(Default)]
struct RawRule<'i> {
    name: Option<Value<'i>>,
    comment: Option<Value<'i>>,
    enabled: Option<Value<'i>>,
    proto: Option<Value<'i>>,
    src: Option<Value<'i>>,
    dst: Option<Value<'i>>,
    src_port: Option<Value<'i>>,
    dst_port: Option<Value<'i>>,
    sni: Option<Value<'i>>,
    host: Option<Value<'i>>,
    action: Option<Value<'i>>,
    to: Option<Value<'i>>,
}

/// The action as written, before `to` joins it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ActionWord {
    Relay,
    Reject,
    Redirect,
    Drop,
}

fn kind(v: &DeValue<'_>) -> &'static str {
    match v {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a date-time",
        DeValue::Array(_) => "a list",
        DeValue::Table(_) => "a table",
    }
}

impl<'a> Parser<'a> {
    fn new(text: &'a str, path: &'a str) -> Parser<'a> {
        let mut lines = vec![0];
        lines.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Parser {
            text,
            path,
            lines,
            errors: Vec::new(),
        }
    }

    fn error(&mut self, span: Span, message: impl Into<String>) {
        self.errors.push((span.start, message.into()));
    }

    /// The errors in file order, as `FILE:LINE:COL: message`, at most MAX_ERRORS and a
    /// line for the rest.
    fn finish(mut self) -> Vec<ConfigError> {
        self.errors.sort_by_key(|&(at, _)| at); // stable: one place keeps its order
        let more = self.errors.len().saturating_sub(MAX_ERRORS);
        let mut out: Vec<ConfigError> = self
            .errors
            .iter()
            .take(MAX_ERRORS)
            .map(|(at, msg)| self.at(*at, msg.clone()))
            .collect();
        if more > 0 {
            let at = self.errors[MAX_ERRORS].0;
            out.push(self.at(at, format!("{more} more errors from here on not shown")));
        }
        out
    }

    fn at(&self, offset: usize, message: String) -> ConfigError {
        let offset = offset.min(self.text.len());
        let line = self.lines.partition_point(|&s| s <= offset);
        let start = self.lines[line - 1];
        let col = match self.text.get(start..offset) {
            Some(s) => s.chars().count() + 1,
            None => offset - start + 1,
        };
        ConfigError {
            file: self.path.to_string(),
            line,
            col,
            message,
        }
    }

    fn unknown(&mut self, key: &Spanned<Cow<'_, str>>, known: &[&str], what: &str) {
        let k = key.get_ref().as_ref();
        let hint = ALIASES
            .iter()
            .find(|(alias, _)| *alias == k)
            .map(|(_, f)| *f)
            .filter(|f| known.contains(f))
            .or_else(|| known.iter().copied().find(|f| edit_distance(f, k) <= 2));
        let mut msg = format!("unknown field `{k}` {what}");
        if let Some(h) = hint {
            msg += &format!("; did you mean `{h}`?");
        }
        msg += &format!(" (known: {})", known.join(", "));
        self.error(key.span(), msg);
    }

    fn document(&mut self) -> Option<Rules> {
        let doc = match DeTable::parse(self.text) {
            Ok(doc) => doc.into_inner(),
            Err(e) => {
                let at = e.span().map_or(0, |s| s.start);
                let msg = e.message().replace('\n', "; ");
                self.error(at..at, format!("invalid TOML: {msg}"));
                return None;
            }
        };
        let mut default = Action::Relay;
        let mut rules_value = None;
        for (key, value) in doc {
            match key.get_ref().as_ref() {
                "default" => match value.get_ref() {
                    DeValue::String(s) if s == "relay" => default = Action::Relay,
                    DeValue::String(s) if s == "reject" => default = Action::Reject,
                    v => {
                        let got = match v {
                            DeValue::String(s) => format!("{s:?}"),
                            v => kind(v).to_string(),
                        };
                        self.error(
                            value.span(),
                            format!("`default` must be \"relay\" or \"reject\", not {got}"),
                        );
                    }
                },
                "rule" => rules_value = Some(value),
                _ => self.unknown(&key, TOP_FIELDS, "at the top level"),
            }
        }
        let mut names = Vec::new();
        let mut rules = Vec::new();
        let mut seen: HashMap<String, usize> = HashMap::new();
        if let Some(value) = rules_value {
            let span = value.span();
            match value.into_inner() {
                DeValue::Array(items) => {
                    for item in items.into_iter() {
                        let span = item.span();
                        let DeValue::Table(t) = item.into_inner() else {
                            self.error(span, "each rule must be a table: write [[rule]] blocks");
                            continue;
                        };
                        let (name, rule) = self.rule(span, t);
                        // Names are checked for duplicates even in rules with other
                        // errors: one round of fixes should be enough.
                        if let Some((name, name_span)) = &name {
                            if let Some(&first) = seen.get(name) {
                                let f = self.at(first, String::new());
                                self.error(
                                    name_span.clone(),
                                    format!(
                                        "duplicate rule name {name:?} (first at line {}, column {})",
                                        f.line, f.col
                                    ),
                                );
                            } else {
                                seen.insert(name.clone(), name_span.start);
                            }
                        }
                        if let (Some((name, _)), Some(rule)) = (name, rule) {
                            names.push(name);
                            rules.push(rule);
                        }
                    }
                }
                DeValue::Table(_) => self.error(
                    span,
                    "`rule` must be a list of tables: write [[rule]], not [rule]",
                ),
                v => self.error(
                    span,
                    format!("`rule` must be a list of [[rule]] tables, not {}", kind(&v)),
                ),
            }
        }
        if rules.len() > MAX_RULES {
            self.error(0..0, format!("more than {MAX_RULES} rules"));
        }
        if !self.errors.is_empty() {
            return None;
        }
        Some(Rules::compile(names, rules, default))
    }

    /// Checks one `[[rule]]` (at `span`, its header): its name and the name's place if
    /// the name is right, and the rule if everything is (the errors say what is not).
    fn rule(&mut self, span: Span, table: DeTable<'_>) -> (Option<(String, Span)>, Option<Rule>) {
        let before = self.errors.len();
        let mut raw = RawRule::default();
        for (key, value) in table {
            let slot = match key.get_ref().as_ref() {
                "name" => &mut raw.name,
                "comment" => &mut raw.comment,
                "enabled" => &mut raw.enabled,
                "proto" => &mut raw.proto,
                "src" => &mut raw.src,
                "dst" => &mut raw.dst,
                "src_port" => &mut raw.src_port,
                "dst_port" => &mut raw.dst_port,
                "sni" => &mut raw.sni,
                "host" => &mut raw.host,
                "action" => &mut raw.action,
                "to" => &mut raw.to,
                _ => {
                    self.unknown(&key, RULE_FIELDS, "in a rule");
                    continue;
                }
            };
            *slot = Some(value);
        }

        let name = match &raw.name {
            None => {
                self.error(
                    span.clone(),
                    "this rule has no `name` (every rule needs one, unique)",
                );
                None
            }
            Some(v) => self.rule_name(v),
        };
        if let Some(v) = &raw.comment {
            self.string(v, "comment");
        }
        let enabled = match &raw.enabled {
            None => true,
            Some(v) => match v.get_ref() {
                DeValue::Boolean(b) => *b,
                other => {
                    let msg = format!("`enabled` must be true or false, not {}", kind(other));
                    self.error(v.span(), msg);
                    true
                }
            },
        };
        let proto = match &raw.proto {
            None => Some(Proto::Any),
            Some(v) => match self.string(v, "proto") {
                Some("tcp") => Some(Proto::Tcp),
                Some("udp") => Some(Proto::Udp),
                Some("any") => Some(Proto::Any),
                Some(s) => {
                    let msg = format!("`proto` must be \"tcp\", \"udp\" or \"any\", not {s:?}");
                    self.error(v.span(), msg);
                    None
                }
                None => None,
            },
        };
        let src = raw.src.as_ref().map(|v| self.nets(v, "src"));
        let dst = raw.dst.as_ref().map(|v| self.nets(v, "dst"));
        let src_port = raw.src_port.as_ref().map(|v| self.ports(v, "src_port"));
        let dst_port = raw.dst_port.as_ref().map(|v| self.ports(v, "dst_port"));
        let sni = raw.sni.as_ref().map(|v| self.names(v, "sni"));
        let host = raw.host.as_ref().map(|v| self.names(v, "host"));
        let word = match &raw.action {
            None => {
                self.error(
                    span.clone(),
                    "this rule has no `action` (relay, reject, redirect or drop)",
                );
                None
            }
            Some(v) => match self.string(v, "action") {
                Some("relay") => Some(ActionWord::Relay),
                Some("reject") => Some(ActionWord::Reject),
                Some("redirect") => Some(ActionWord::Redirect),
                Some("drop") => Some(ActionWord::Drop),
                Some(s) => {
                    let msg = format!(
                        "`action` must be \"relay\", \"reject\", \"redirect\" or \"drop\", not {s:?}"
                    );
                    self.error(v.span(), msg);
                    None
                }
                None => None,
            },
        };
        let to = raw.to.as_ref().and_then(|v| self.socket_addr(v));

        // Fields against each other, where each parsed.
        if let (Some(w), Some(v)) = (word, &raw.action) {
            if w == ActionWord::Redirect && raw.to.is_none() {
                self.error(
                    v.span(),
                    "`action = \"redirect\"` needs `to = \"IP:port\"`, where to connect instead",
                );
            }
            if w == ActionWord::Drop && proto.is_some_and(|p| p != Proto::Udp) {
                self.error(
                    v.span(),
                    "`drop` is for UDP only: add proto = \"udp\", or use \"reject\" \
                     (TCP: reset the client; UDP: drop)",
                );
            }
            if let (Some(t), true) = (&raw.to, w != ActionWord::Redirect) {
                let msg = "`to` is only for action = \"redirect\"";
                self.error(t.span(), msg);
            }
        }
        if proto == Some(Proto::Udp) {
            for (field, v) in [("sni", &raw.sni), ("host", &raw.host)] {
                if let Some(v) = v {
                    let msg =
                        format!("`{field}` only matches TCP, and this rule has proto = \"udp\"");
                    self.error(v.span(), msg);
                }
            }
        }
        if self.errors.len() > before {
            return (name, None);
        }
        // No error: every field given also parsed, so `flatten` only drops absent ones.
        let rule = || {
            Some(Rule {
                proto: proto?,
                enabled,
                src: src.flatten(),
                dst: dst.flatten(),
                src_port: src_port.flatten(),
                dst_port: dst_port.flatten(),
                sni: sni.flatten(),
                host: host.flatten(),
                action: match word? {
                    ActionWord::Relay => Action::Relay,
                    ActionWord::Reject => Action::Reject,
                    ActionWord::Redirect => Action::RelayTo(to?),
                    ActionWord::Drop => Action::Drop,
                },
            })
        };
        (name, rule())
    }

    /// A string value, or an error naming the field.
    fn string<'v>(&mut self, v: &'v Value<'_>, field: &str) -> Option<&'v str> {
        match v.get_ref() {
            DeValue::String(s) => Some(s.as_ref()),
            other => {
                let msg = format!("`{field}` must be a string, not {}", kind(other));
                self.error(v.span(), msg);
                None
            }
        }
    }

    fn rule_name(&mut self, v: &Value<'_>) -> Option<(String, Span)> {
        let s = self.string(v, "name")?;
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !ok {
            let msg = format!(
                "rule name {s:?}: use 1 to 64 letters, digits, '-', '_' or '.' \
                 (it appears in counters and flow logs)"
            );
            self.error(v.span(), msg);
            return None;
        }
        Some((s.to_string(), v.span()))
    }

    /// The items of a field that takes one item or a list of them; `None` (after an
    /// error) for the wrong type or an empty list.
    fn items<'v, 'i>(
        &mut self,
        v: &'v Value<'i>,
        field: &str,
        what: &str,
    ) -> Option<Vec<&'v Value<'i>>> {
        match v.get_ref() {
            DeValue::Array(a) if a.is_empty() => {
                let msg = format!(
                    "`{field}` is an empty list, which would never match: \
                     list at least one {what}, or leave `{field}` out to match any"
                );
                self.error(v.span(), msg);
                None
            }
            DeValue::Array(a) => Some(a.iter().collect()),
            _ => Some(vec![v]),
        }
    }

    fn nets(&mut self, v: &Value<'_>, field: &str) -> Option<Nets> {
        let mut nets = Vec::new();
        let mut ok = true;
        for item in self.items(v, field, "CIDR")? {
            let Some(s) = self.item_string(item, field, "CIDRs like \"192.0.2.0/24\"") else {
                ok = false;
                continue;
            };
            match parse_net(s) {
                Ok(n) => nets.push(n),
                Err(e) => {
                    self.error(item.span(), format!("`{field}`: {e}"));
                    ok = false;
                }
            }
        }
        ok.then(|| Nets::new(nets))
    }

    /// An item that must be a string.
    fn item_string<'v>(&mut self, item: &'v Value<'_>, field: &str, what: &str) -> Option<&'v str> {
        match item.get_ref() {
            DeValue::String(s) => Some(s.as_ref()),
            other => {
                let msg = format!("`{field}` takes {what}, not {}", kind(other));
                self.error(item.span(), msg);
                None
            }
        }
    }

    fn ports(&mut self, v: &Value<'_>, field: &str) -> Option<Ports> {
        let mut ranges = Vec::new();
        let mut ok = true;
        for item in self.items(v, field, "port")? {
            let parsed = match item.get_ref() {
                DeValue::String(s) => parse_ports(s),
                DeValue::Integer(i) => match i64::from_str_radix(i.as_str(), i.radix()) {
                    Ok(n) => port_number(n).map(|p| vec![(p, p)]),
                    Err(_) => Err("not a port number (1 to 65535)".to_string()),
                },
                other => Err(format!(
                    "takes ports like \"443,8000-8100\" or 53, not {}",
                    kind(other)
                )),
            };
            match parsed {
                Ok(r) => ranges.extend(r),
                Err(e) => {
                    self.error(item.span(), format!("`{field}`: {e}"));
                    ok = false;
                }
            }
        }
        ok.then(|| Ports(merge(ranges)))
    }

    fn names(&mut self, v: &Value<'_>, field: &str) -> Option<Names> {
        let mut names = Names {
            exact: Vec::new(),
            suffixes: Vec::new(),
        };
        let mut ok = true;
        for item in self.items(v, field, "name")? {
            let Some(s) = self.item_string(
                item,
                field,
                "names like \"example.com\" or \"*.example.com\"",
            ) else {
                ok = false;
                continue;
            };
            match parse_pattern(s) {
                Ok(Pattern::Exact(n)) => names.exact.push(n),
                Ok(Pattern::Suffix(n)) => names.suffixes.push(n),
                Err(e) => {
                    self.error(item.span(), format!("`{field}`: {e}"));
                    ok = false;
                }
            }
        }
        ok.then_some(names)
    }

    fn socket_addr(&mut self, v: &Value<'_>) -> Option<SocketAddr> {
        let s = self.string(v, "to")?;
        let msg = match s.trim().parse::<SocketAddr>() {
            Ok(a) if a.port() == 0 => format!("`to`: {s:?} has port 0; give the port to connect to"),
            Ok(a) if a.ip().is_unspecified() => {
                format!("`to`: {s:?} is the unspecified address; give the address to connect to")
            }
            Ok(a) => return Some(a),
            Err(_) => format!(
                "`to` must be IP:port, as in \"198.51.100.7:8443\" or \"[2001:db8::7]:8443\", not {s:?}"
            ),
        };
        self.error(v.span(), msg);
        None
    }
}

/// A CIDR, or a bare address as a /32 or /128; IPv4-mapped IPv6 ones become IPv4.
fn parse_net(s: &str) -> Result<IpNet, String> {
    let t = s.trim();
    let net = match t.split_once('/') {
        Some((addr, len)) => {
            let ip: IpAddr = addr
                .parse()
                .map_err(|_| format!("{addr:?} in {s:?} is not an IP address"))?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let len: u8 = len
                .parse()
                .ok()
                .filter(|&l| l <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to {max}"))?;
            let net = IpNet::new(ip, len).map_err(|e| format!("{s:?}: {e}"))?;
            if net.trunc() != net {
                return Err(format!(
                    "{s:?} has bits set past its /{len}: did you mean \"{}\"?",
                    net.trunc()
                ));
            }
            net
        }
        None => IpNet::from(
            t.parse::<IpAddr>()
                .map_err(|_| format!("{s:?} is not a CIDR or an IP address"))?,
        ),
    };
    Ok(match net {
        IpNet::V6(n) if n.prefix_len() >= 96 => match n.addr().to_ipv4_mapped() {
            Some(a) => Ipv4Net::new(a, n.prefix_len() - 96).map_or(net, IpNet::V4),
            None => net,
        },
        _ => net,
    })
}

fn port_number(n: i64) -> Result<u16, String> {
    match u16::try_from(n) {
        Ok(0) => Err("port 0 never matches; ports are 1 to 65535".to_string()),
        Ok(p) => Ok(p),
        Err(_) => Err(format!("{n} is not a port number (1 to 65535)")),
    }
}

/// `"443,8000-8100"`: ports and inclusive ranges, commas between, spaces allowed.
fn parse_ports(s: &str) -> Result<Vec<(u16, u16)>, String> {
    let one = |p: &str| -> Result<u16, String> {
        let p = p.trim();
        match p.parse::<i64>() {
            Ok(n) => port_number(n),
            Err(_) => Err(format!("{p:?} is not a port number (1 to 65535)")),
        }
    };
    let mut out = Vec::new();
    for item in s.split(',') {
        if item.trim().is_empty() {
            return Err(format!(
                "{s:?} has an empty item; write ports like \"443,8000-8100\""
            ));
        }
        match item.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (one(a)?, one(b)?);
                if a > b {
                    return Err(format!("the range {a}-{b} runs backwards"));
                }
                out.push((a, b));
            }
            None => {
                let p = one(item)?;
                out.push((p, p));
            }
        }
    }
    Ok(out)
}

enum Pattern {
    Exact(String),
    Suffix(String),
}

/// `example.com` or `*.example.com`, normalised.
fn parse_pattern(s: &str) -> Result<Pattern, String> {
    let bad = |why: String| format!("{s:?}: {why}");
    if let Some(rest) = s.strip_prefix("*.") {
        if rest.contains('*') {
            return Err(bad(WILDCARD.into()));
        }
        return check_name(rest).map(Pattern::Suffix).map_err(bad);
    }
    if s.contains('*') {
        return Err(bad(WILDCARD.into()));
    }
    check_name(s).map(Pattern::Exact).map_err(bad)
}

const WILDCARD: &str = "'*' is allowed only as the whole first label, as in \"*.example.com\"";

/// Levenshtein distance, for "did you mean" on short field names.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests;
