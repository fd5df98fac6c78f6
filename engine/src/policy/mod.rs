//! The decision point: one verdict per TCP connection and per UDP flow.
//!
//! A worker asks its own [`Policy`] object (one per core, no sharing, no locks)
//! exactly once per connection, right after the accept, when the client's address
//! and the original destination are known and before anything is connected; and
//! once per UDP flow, when its first datagram arrives. Never per packet or per read.
//! Live connections and flows keep the verdict they got.
//!
//! The built-in [`RelayAll`] relays everything to its original destination, which is
//! what the engine did before policies existed. A rules file plugs in here.
//!
//! Room for verdicts that need the client's first bytes (TLS SNI, HTTP Host): the
//! connection machine starts in `Connecting`; such a verdict adds a phase before it
//! in which direction 0 reads into a buffer, asks [`Policy::tcp`] again with those
//! bytes, then connects and writes them first (see docs/architecture.md).

use std::net::SocketAddr;

pub mod rules;
pub mod sniff;

use crate::addrs::{ClientAddr, OrigDst};

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

/// A per-core decision maker.
pub trait Policy: Send {
    /// The verdict for a newly accepted connection.
    fn tcp(&mut self, conn: &ConnMeta) -> TcpVerdict;
    /// The verdict for a new UDP flow.
    fn udp(&mut self, flow: &FlowMeta) -> UdpVerdict;
}

/// Makes the policy of each worker, given its CPU.
pub type PolicyFactory = std::sync::Arc<dyn Fn(usize) -> Box<dyn Policy> + Send + Sync>;

/// Relays every connection and flow to its original destination.
#[derive(Clone, Copy, Debug, Default)]
pub struct RelayAll;

impl Policy for RelayAll {
    fn tcp(&mut self, _: &ConnMeta) -> TcpVerdict {
        TcpVerdict::Relay
    }

    fn udp(&mut self, _: &FlowMeta) -> UdpVerdict {
        UdpVerdict::Relay
    }
}

/// A factory of [`RelayAll`], the built-in default.
pub fn relay_all() -> PolicyFactory {
    std::sync::Arc::new(|_| Box::new(RelayAll))
}
