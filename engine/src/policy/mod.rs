//! The decision point: one verdict per TCP connection and per UDP flow.
//!
//! A worker asks its own [`Policy`] object (one per core, no sharing, no locks)
//! exactly once per connection, right after the accept, when the client's address
//! and the original destination are known and before anything is connected; and
//! once per UDP flow, when its first datagram arrives. Never per packet or per read.
//! Live connections and flows keep the verdict they got.
//!
//! The built-in [`RelayAll`] relays everything to its original destination, which is
//! what the engine did before policies existed. `engine --config FILE` decides with a
//! rules file ([`rules`], [`RulesHandle`]), reloaded on SIGHUP.
//!
//! A TCP decision that depends on the server name ([`TcpDecision::NeedsName`]) puts
//! the connection in a sniffing phase first: the client's first bytes are read (at
//! most 16 KiB, at most `--sniff-timeout-ms`), [`sniff`] finds the TLS SNI or HTTP
//! Host, [`Policy::tcp_named`] decides, and only then is anything connected; those
//! bytes are the first thing relayed upstream.

pub mod rules;
pub mod sniff;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::addrs::{ClientAddr, OrigDst};
use rules::Rules;

/// What is known about a TCP connection when it is accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnMeta {
    pub client: ClientAddr,
    pub orig_dst: OrigDst,
}

/// What is known about a UDP flow when its first datagram arrives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowMeta {
    pub client: ClientAddr,
    pub orig_dst: OrigDst,
}

/// The verdict for a TCP connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpVerdict {
    /// Connect to the original destination and relay.
    Relay,
    /// Connect to this address instead and relay.
    RelayTo(SocketAddr),
    /// Reset the client at once; nothing is connected upstream.
    Reject,
}

/// The verdict for a UDP flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UdpVerdict {
    /// Relay to the original destination; replies come from it.
    Relay,
    /// Relay to this address instead; replies still come from the original
    /// destination's address and port, which is what the client talks to.
    RelayTo(SocketAddr),
    /// Drop the datagram and open no flow (the next datagram asks again).
    Drop,
}

/// The name of the rule that decided, shared by every connection it decided.
pub type RuleName = Arc<str>;

/// A decision and the rule that made it (`None`: the default).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decided<V> {
    pub verdict: V,
    pub rule: Option<RuleName>,
}

impl<V> Decided<V> {
    /// A decision no rule made.
    pub fn by_default(verdict: V) -> Decided<V> {
        Decided {
            verdict,
            rule: None,
        }
    }
}

/// The first step of a TCP decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TcpDecision {
    /// Final: act on it now.
    Decided(Decided<TcpVerdict>),
    /// The verdict depends on the server name: read the client's first bytes (TLS
    /// SNI, HTTP Host), then ask [`Policy::tcp_named`].
    NeedsName,
}

/// A per-core decision maker.
pub trait Policy: Send {
    /// The decision for a newly accepted connection.
    fn tcp(&mut self, conn: &ConnMeta) -> TcpDecision;
    /// The decision once the client's first bytes named the server (or did not:
    /// both `None` after a timeout or for a protocol without a name).
    fn tcp_named(
        &mut self,
        conn: &ConnMeta,
        sni: Option<&str>,
        host: Option<&str>,
    ) -> Decided<TcpVerdict>;
    /// The decision for a new UDP flow.
    fn udp(&mut self, flow: &FlowMeta) -> Decided<UdpVerdict>;
}

/// Makes the policy of each worker, given its CPU.
pub type PolicyFactory = Arc<dyn Fn(usize) -> Box<dyn Policy> + Send + Sync>;

/// Relays every connection and flow to its original destination.
#[derive(Clone, Copy, Debug, Default)]
pub struct RelayAll;

impl Policy for RelayAll {
    fn tcp(&mut self, _: &ConnMeta) -> TcpDecision {
        TcpDecision::Decided(Decided::by_default(TcpVerdict::Relay))
    }

    fn tcp_named(&mut self, _: &ConnMeta, _: Option<&str>, _: Option<&str>) -> Decided<TcpVerdict> {
        Decided::by_default(TcpVerdict::Relay)
    }

    fn udp(&mut self, _: &FlowMeta) -> Decided<UdpVerdict> {
        Decided::by_default(UdpVerdict::Relay)
    }
}

/// A factory of [`RelayAll`], the built-in default.
pub fn relay_all() -> PolicyFactory {
    Arc::new(|_| Box::new(RelayAll))
}

/// Reloads counted over the life of the process: (applied, refused).
pub static RELOADS: (AtomicU64, AtomicU64) = (AtomicU64::new(0), AtomicU64::new(0));

/// The rule set every core decides with, replaced as one snapshot on reload.
///
/// Cores do not lock on the accept path: each keeps its own `Arc` of the current
/// rules and compares one generation number (a cache line that is only written on a
/// reload) before each decision; only after a reload does it take the lock once to
/// pick the new snapshot up. A connection or flow is decided by exactly one
/// snapshot and keeps its verdict for its life.
pub struct RulesHandle {
    generation: AtomicU64,
    current: Mutex<(Arc<Rules>, Arc<[RuleName]>)>,
}

impl RulesHandle {
    /// A handle on `rules`.
    pub fn new(rules: Rules) -> Arc<RulesHandle> {
        let names = names_of(&rules);
        Arc::new(RulesHandle {
            generation: AtomicU64::new(0),
            current: Mutex::new((Arc::new(rules), names)),
        })
    }

    /// Swaps in a new rule set for every core.
    pub fn replace(&self, rules: Rules) {
        let names = names_of(&rules);
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = (Arc::new(rules), names);
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// The rules now in force.
    pub fn current(&self) -> Arc<Rules> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone()
    }

    /// A factory of per-core policies deciding with these rules.
    pub fn factory(self: &Arc<Self>) -> PolicyFactory {
        let handle = self.clone();
        Arc::new(move |_| Box::new(RulesPolicy::new(handle.clone())))
    }
}

fn names_of(rules: &Rules) -> Arc<[RuleName]> {
    rules
        .rule_names()
        .iter()
        .map(|n| Arc::from(n.as_str()))
        .collect()
}

/// One core's view of a [`RulesHandle`].
pub struct RulesPolicy {
    handle: Arc<RulesHandle>,
    seen: u64,
    rules: Arc<Rules>,
    names: Arc<[RuleName]>,
}

impl RulesPolicy {
    fn new(handle: Arc<RulesHandle>) -> RulesPolicy {
        let (rules, names) = handle
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        RulesPolicy {
            seen: handle.generation.load(Ordering::Acquire),
            handle,
            rules,
            names,
        }
    }

    /// Picks a new snapshot up after a reload.
    fn refresh(&mut self) {
        let g = self.handle.generation.load(Ordering::Acquire);
        if g != self.seen {
            let (rules, names) = self
                .handle
                .current
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            (self.seen, self.rules, self.names) = (g, rules, names);
        }
    }

    fn rule(&self, v: &rules::Verdict) -> Option<RuleName> {
        v.rule.map(|id| self.names[id as usize].clone())
    }
}

impl Policy for RulesPolicy {
    fn tcp(&mut self, conn: &ConnMeta) -> TcpDecision {
        self.refresh();
        match self.rules.decide_tcp(conn) {
            rules::TcpDecision::Decided(v) => TcpDecision::Decided(Decided {
                verdict: v.action.tcp(),
                rule: self.rule(&v),
            }),
            rules::TcpDecision::NeedsName => TcpDecision::NeedsName,
        }
    }

    fn tcp_named(
        &mut self,
        conn: &ConnMeta,
        sni: Option<&str>,
        host: Option<&str>,
    ) -> Decided<TcpVerdict> {
        // No refresh: the connection stays with the snapshot that asked for a name.
        let v = self.rules.decide_tcp_named(conn, sni, host);
        Decided {
            verdict: v.action.tcp(),
            rule: self.rule(&v),
        }
    }

    fn udp(&mut self, flow: &FlowMeta) -> Decided<UdpVerdict> {
        self.refresh();
        let v = self.rules.decide_udp(flow);
        Decided {
            verdict: v.action.udp(),
            rule: self.rule(&v),
        }
    }
}
