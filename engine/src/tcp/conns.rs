//! The connection table: a slab of boxed connections with generation-checked slots.
//!
//! A slot is named in `user_data` by (slot, generation); a completion for a slot
//! since freed and reused carries the old generation and resolves to `None`.
//! Connections are boxed so that what the kernel reads from them (the connect
//! sockaddr) never moves while the slab grows.

use std::os::fd::OwnedFd;

use super::machine::ConnMachine;
use crate::addrs::{ClientAddr, OrigDst, UpstreamAddr};
use crate::core::token::next_generation;
use crate::fdpool::ConnCredit;
use crate::policy::RuleName;
use crate::sys::Pipe;

/// The sockets and kernel-facing memory of one connection, next to its machine.
pub struct ConnIo {
    pub client: OwnedFd,
    /// `None` while sniffing: nothing is connected before the verdict.
    pub upstream: Option<OwnedFd>,
    pub client_addr: ClientAddr,
    pub orig_dst: OrigDst,
    /// Where the engine connects: the original destination, or the policy's
    /// redirect target.
    pub upstream_addr: UpstreamAddr,
    /// The connect's sockaddr, read by the kernel until the connect completes.
    pub connect_addr: (libc::sockaddr_storage, libc::socklen_t),
    /// Splice: the pipe of each direction, only while it holds bytes.
    pub pipes: [Option<Pipe>; 2],
    /// When the connection was accepted (the core's clock, microseconds).
    pub started_us: u64,
    /// The rule that decided (`None`: the default), for counters and the flow log.
    pub rule: Option<RuleName>,
    /// The TLS SNI or HTTP Host the sniff found.
    pub name: Option<Box<str>>,
    /// Each direction's own buffer: direction 0's sniffed bytes until they are sent
    /// upstream, or what a copy-relay send could not deliver at once.
    pub spill: [Vec<u8>; 2],
    /// The upstream socket's receive bound, bytes, once connected; grown by
    /// `bound::on_tick`. 0: none (no bound). The client side's is its listener's,
    /// fixed at the handshake, so only this one is tracked.
    pub upstream_bound: u32,
    /// Bytes the server-to-client direction had delivered at the last tick.
    pub s2c_at_tick: u64,
}

/// One relayed TCP connection.
pub struct Conn {
    pub generation: u32,
    pub machine: ConnMachine,
    pub io: ConnIo,
    /// Its place under `--max-conns` and the fd credits of its two sockets: given
    /// back when the connection is dropped, after `io` (declared before it) closed
    /// them.
    pub credit: ConnCredit,
}

/// Slab of connections with generation-checked slots and a free list.
pub struct ConnTable {
    slots: Vec<Option<Box<Conn>>>,
    generations: Vec<u32>,
    free: Vec<u32>,
    len: usize,
}

impl ConnTable {
    /// A table that will hold up to `cap` connections without reallocating.
    pub fn with_capacity(cap: usize) -> ConnTable {
        ConnTable {
            slots: Vec::with_capacity(cap),
            generations: Vec::with_capacity(cap),
            free: Vec::new(),
            len: 0,
        }
    }

    /// Open connections.
    pub fn len(&self) -> usize {
        self.len
    }

    /// No connection open.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Stores a connection; returns its (slot, generation).
    pub fn insert(&mut self, mut conn: Box<Conn>) -> (u32, u32) {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(None);
                self.generations.push(0);
                (self.slots.len() - 1) as u32
            }
        };
        let g = next_generation(self.generations[slot as usize]);
        self.generations[slot as usize] = g;
        conn.generation = g;
        self.slots[slot as usize] = Some(conn);
        self.len += 1;
        (slot, g)
    }

    /// The live connection a token names, or `None` if the slot was freed or reused.
    pub fn get(&mut self, slot: u32, generation: u32) -> Option<&mut Conn> {
        match self.slots.get_mut(slot as usize) {
            Some(Some(c)) if c.generation == generation => Some(c),
            _ => None,
        }
    }

    /// Takes a connection out of the table, freeing its slot.
    pub fn remove(&mut self, slot: u32) -> Option<Box<Conn>> {
        let c = self.slots.get_mut(slot as usize)?.take()?;
        self.free.push(slot);
        self.len -= 1;
        Some(c)
    }

    /// (slot, generation) of every live connection.
    pub fn live(&self) -> Vec<(u32, u32)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.as_ref().map(|c| (i as u32, c.generation)))
            .collect()
    }
}
