//! The per-core UDP flow table.
//!
//! A UDP "flow" is what the engine relays between one client and one original
//! destination: `(ClientAddr, OrigDst)`. Each flow owns one upstream socket
//! (held in the caller's value type `V`), connected to the original
//! destination, because replies must come back to the client from the
//! original destination's address AND port (a transparent socket's `IP_PKTINFO` sets the source address only), and the
//! upstream socket's own source port is what lets the server's replies be
//! told apart per client. One socket per flow is also what sing-box, Xray,
//! mihomo and shadowsocks-rust do.
//!
//! That design costs one fd per flow, and UDP has no connection teardown, so
//! the table is bounded and forgets flows in two ways:
//!
//! * **LRU eviction.** The table holds at most `capacity` flows. Inserting
//!   into a full table evicts the least-recently-used flow. A flood of new
//!   client source ports (scans, spoofed sources, a NAT rebinding storm) thus
//!   costs a bounded number of fds and bytes and pushes out the stalest flows
//!   instead of failing new ones; the issue trackers of the proxies above are
//!   full of UDP fd and port exhaustion from unbounded per-flow sockets.
//! * **Idle expiry.** [`FlowTable::expire`] drops flows idle for longer than
//!   their timeout. A flow that saw exactly one datagram to the server and at
//!   least one reply (a DNS-like single exchange) gets a shorter timeout, so
//!   the common query/response pattern gives its fd back quickly.
//!
//! The table does no I/O. Every flow that leaves it (evicted, expired,
//! removed, drained) is handed back to the caller as `(FlowKey, V)`: the
//! caller closes the upstream socket, and if an io_uring operation still
//! references memory owned by `V` it must keep `V` alive until that
//! operation's final CQE.
//!
//! # Layout
//!
//! Flows live in a slab (`Vec` of slots) that grows lazily up to `capacity`
//! and never shrinks; a `HashMap` (pre-sized to twice `capacity` so that
//! churn never makes it grow, default SipHash hasher because client ports are
//! attacker-chosen) maps a key to its slot index. Occupied slots form an intrusive doubly-linked list by index, most
//! recently used at the head; free slots form a singly-linked free list. So
//! lookup, touch, insert, evict and remove are O(1), and after warm-up no
//! operation allocates.
//!
//! A [`FlowId`] names a slot plus its generation, which is bumped whenever the
//! slot is freed. An io_uring completion that carries the id of a flow since
//! evicted, even if its slot now holds another flow, resolves to `None`.
//!
//! # Expiry order
//!
//! The timestamp given to a touched or inserted flow is clamped to never
//! decrease (`max(now_ms, latest timestamp so far)`), so walking the LRU list
//! from the tail visits flows in non-decreasing last-activity order. Because
//! the two timeouts differ, that is not expiry order: a long-timeout flow
//! near the tail may survive while a single-exchange flow behind it expires.
//! `expire` therefore walks from the tail, removes each flow past its own
//! timeout, skips the others, and stops at the first flow whose idle time is
//! within the shorter of the two timeouts: it and every flow after it are
//! too recent to expire under either timeout. The cost is the number of flows
//! idle longer than the shorter timeout, at worst a full scan, which is
//! cheap at a few thousand flows per core once per second.

use std::collections::HashMap;

pub use crate::addrs::{ClientAddr, OrigDst};

/// What identifies a UDP flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Source of the client's datagrams.
    pub client: ClientAddr,
    /// Destination the client addressed.
    pub orig_dst: OrigDst,
}

/// A stable handle to a flow: slot index plus the slot's generation.
///
/// Ids are cheap to copy into io_uring `user_data`. Every access checks the
/// generation, so an id outliving its flow (or a fabricated one) is harmless:
/// it resolves to `None`. Generations wrap after 2^32 reuses of one slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowId {
    /// Slot index, below the table's capacity.
    pub index: u32,
    /// Generation of the slot when the flow was inserted.
    pub generation: u32,
}

/// Direction of a relayed datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// Client to server (towards the [`OrigDst`]).
    ToServer,
    /// Server to client (towards the [`ClientAddr`]).
    ToClient,
}

/// Per-flow activity the table tracks for LRU and expiry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowActivity {
    /// Timestamp (caller's monotonic clock, ms) of the last insert or touch,
    /// clamped to never go backwards across the table.
    pub last_active_ms: u64,
    /// Datagrams relayed client to server ([`Dir::ToServer`] touches).
    pub to_server: u64,
    /// Datagrams relayed server to client ([`Dir::ToClient`] touches).
    pub to_client: u64,
}

impl FlowActivity {
    /// Exactly one request and at least one reply: a DNS-like exchange that
    /// is probably over, so it expires after the shorter timeout.
    pub fn is_single_exchange(&self) -> bool {
        self.to_server == 1 && self.to_client >= 1
    }
}

/// Lifetime counters of a table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowStats {
    /// Flows inserted.
    pub created: u64,
    /// Flows removed by [`FlowTable::expire`].
    pub expired: u64,
    /// Flows evicted: by an insert into a full table, or by `evict_lru`.
    pub evicted: u64,
    /// Flows removed by [`FlowTable::remove`] or [`FlowTable::drain_all`].
    pub removed: u64,
}

/// How many flows [`FlowTable::expire`] removed, by the timeout that ended them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Expired {
    /// Past the idle timeout.
    pub idle: usize,
    /// Single exchanges past the shorter timeout.
    pub single_exchange: usize,
}

impl Expired {
    /// Both together.
    pub fn total(&self) -> usize {
        self.idle + self.single_exchange
    }
}

/// Result of [`FlowTable::insert`].
#[must_use = "an evicted or rejected value holds resources (an fd) the caller must release"]
#[derive(Debug, PartialEq, Eq)]
pub enum InsertOutcome<V> {
    /// The flow was stored; the table had room.
    Inserted(FlowId),
    /// The flow was stored after evicting the least-recently-used flow, which
    /// is handed back: close its upstream socket.
    Evicted {
        /// Id of the new flow.
        id: FlowId,
        /// The evicted flow.
        evicted: (FlowKey, V),
    },
    /// A flow with this key already exists; nothing changed (not even its
    /// recency) and the new value is handed back.
    Occupied {
        /// Id of the existing flow.
        id: FlowId,
        /// The value that was not stored.
        value: V,
    },
}

impl<V> InsertOutcome<V> {
    /// Id of the flow now stored under the key (new or existing).
    #[cfg(test)]
    pub fn id(&self) -> FlowId {
        match self {
            Self::Inserted(id) | Self::Evicted { id, .. } | Self::Occupied { id, .. } => *id,
        }
    }
}

/// Link value meaning "no slot".
const NIL: u32 = u32::MAX;

/// Largest supported capacity: slot indices are `u32` and `u32::MAX` is
/// reserved as the null link.
pub const MAX_CAPACITY: usize = (u32::MAX - 1) as usize;

#[derive(Debug)]
struct Flow<V> {
    key: FlowKey,
    value: V,
    activity: FlowActivity,
}

#[derive(Debug)]
struct Slot<V> {
    /// Bumped each time the slot is freed.
    generation: u32,
    /// Neighbour towards the MRU head (occupied slots only).
    prev: u32,
    /// Neighbour towards the LRU tail, or next free slot when free.
    next: u32,
    flow: Option<Flow<V>>,
}

/// A bounded UDP flow table with LRU eviction and idle expiry; see the module
/// documentation for the design.
#[derive(Debug)]
pub struct FlowTable<V> {
    slots: Vec<Slot<V>>,
    index: HashMap<FlowKey, u32>,
    /// Most recently used flow.
    head: u32,
    /// Least recently used flow: the next to evict.
    tail: u32,
    /// First free slot.
    free: u32,
    len: usize,
    capacity: usize,
    /// Latest activity timestamp given out, so that timestamps along the LRU
    /// list never decrease even if the caller's clock does.
    clock_ms: u64,
    stats: FlowStats,
}

impl<V> FlowTable<V> {
    /// Creates a table holding at most `capacity` flows, allocating the slab
    /// and the key index for all of them up front.
    ///
    /// # Panics
    ///
    /// If `capacity` is 0 or above [`MAX_CAPACITY`]: a configuration error
    /// the command line should reject first.
    pub fn new(capacity: usize) -> Self {
        assert!(
            (1..=MAX_CAPACITY).contains(&capacity),
            "flow table capacity must be between 1 and {MAX_CAPACITY}, got {capacity}"
        );
        Self {
            slots: Vec::with_capacity(capacity),
            // Twice the flows: with insert/remove churn the map fills with
            // tombstones, and std's hashbrown then rehashes in place only if
            // it is at most half full; otherwise it grows (allocates).
            index: HashMap::with_capacity(capacity.saturating_mul(2)),
            head: NIL,
            tail: NIL,
            free: NIL,
            len: 0,
            capacity,
            clock_ms: 0,
            stats: FlowStats::default(),
        }
    }

    /// Number of flows.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the table holds no flow.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Maximum number of flows.
    #[cfg(test)]
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Lifetime counters.
    #[cfg(test)]
    pub fn stats(&self) -> FlowStats {
        self.stats
    }

    /// The id of the flow for `key`, if any. Does not count as activity.
    pub fn lookup(&self, key: &FlowKey) -> Option<FlowId> {
        let index = *self.index.get(key)?;
        let slot = self.slots.get(index as usize)?;
        Some(FlowId {
            index,
            generation: slot.generation,
        })
    }

    /// The id of the flow currently in slot `index`, if the slot holds one
    /// (io_uring tokens carry only the low bits of the generation; the caller
    /// compares those).
    pub fn id_at(&self, index: u32) -> Option<FlowId> {
        let slot = self.slots.get(index as usize)?;
        slot.flow.as_ref()?;
        Some(FlowId {
            index,
            generation: slot.generation,
        })
    }

    /// The value of flow `id`, or `None` if `id` is stale.
    pub fn get(&self, id: FlowId) -> Option<&V> {
        self.flow(id).map(|f| &f.value)
    }

    /// The value of flow `id`, mutably, or `None` if `id` is stale.
    pub fn get_mut(&mut self, id: FlowId) -> Option<&mut V> {
        self.flow_mut(id).map(|f| &mut f.value)
    }

    /// The key of flow `id`, or `None` if `id` is stale.
    pub fn key_of(&self, id: FlowId) -> Option<FlowKey> {
        self.flow(id).map(|f| f.key)
    }

    /// The activity counters of flow `id`, or `None` if `id` is stale.
    #[cfg(test)]
    pub fn activity(&self, id: FlowId) -> Option<FlowActivity> {
        self.flow(id).map(|f| f.activity)
    }

    /// Inserts a new flow, last active at `now_ms`, with no datagrams counted
    /// yet: call [`touch`](Self::touch) with [`Dir::ToServer`] for the
    /// datagram that created it.
    ///
    /// If the table is full, the least-recently-used flow is evicted and
    /// returned in [`InsertOutcome::Evicted`]. If `key` is already present,
    /// nothing changes and `value` comes back in [`InsertOutcome::Occupied`].
    pub fn insert(&mut self, key: FlowKey, value: V, now_ms: u64) -> InsertOutcome<V> {
        if let Some(id) = self.lookup(&key) {
            return InsertOutcome::Occupied { id, value };
        }
        let evicted = if self.len >= self.capacity {
            let evicted = self.evict_lru();
            debug_assert!(evicted.is_some(), "a full table has an LRU flow");
            evicted
        } else {
            None
        };

        let index = self.alloc_slot();
        let stamp = self.stamp(now_ms);
        let slot = &mut self.slots[index as usize];
        slot.flow = Some(Flow {
            key,
            value,
            activity: FlowActivity {
                last_active_ms: stamp,
                to_server: 0,
                to_client: 0,
            },
        });
        let id = FlowId {
            index,
            generation: slot.generation,
        };
        self.push_front(index);
        self.index.insert(key, index);
        self.len += 1;
        self.stats.created += 1;

        match evicted {
            Some(evicted) => InsertOutcome::Evicted { id, evicted },
            None => InsertOutcome::Inserted(id),
        }
    }

    /// Records one datagram on flow `id` in direction `dir` at `now_ms` and
    /// makes it the most recently used flow. Returns `false` (and does
    /// nothing) if `id` is stale.
    pub fn touch(&mut self, id: FlowId, now_ms: u64, dir: Dir) -> bool {
        let stamp = self.clock_ms.max(now_ms);
        let Some(flow) = self.flow_mut(id) else {
            return false;
        };
        let activity = &mut flow.activity;
        activity.last_active_ms = stamp;
        match dir {
            Dir::ToServer => activity.to_server = activity.to_server.saturating_add(1),
            Dir::ToClient => activity.to_client = activity.to_client.saturating_add(1),
        }
        self.clock_ms = stamp;
        if self.head != id.index {
            self.unlink(id.index);
            self.push_front(id.index);
        }
        true
    }

    /// Removes the least-recently-used flow and hands it back (counted as evicted),
    /// or `None` if the table is empty: for a caller that needs its resources (the
    /// fd pool had no credit for a new flow).
    pub fn evict_lru(&mut self) -> Option<(FlowKey, V)> {
        let evicted = self.take(self.tail)?;
        self.stats.evicted += 1;
        Some(evicted)
    }

    /// Removes flow `id` and hands it back, or `None` if `id` is stale.
    pub fn remove(&mut self, id: FlowId) -> Option<(FlowKey, V)> {
        self.flow(id)?;
        let removed = self.take(id.index)?;
        self.stats.removed += 1;
        Some(removed)
    }

    /// Removes every flow idle for longer than its timeout at `now_ms`,
    /// appending them to `out` least recently used first, and returns how
    /// many were removed under each timeout.
    ///
    /// A single-exchange flow ([`FlowActivity::is_single_exchange`]) times out
    /// after `single_exchange_idle_ms`, every other flow after `idle_ms`; a
    /// flow expires when `now_ms - last_active_ms` is strictly greater than
    /// its timeout. See the module documentation for why the walk from the
    /// LRU tail may stop early.
    pub fn expire(
        &mut self,
        now_ms: u64,
        idle_ms: u64,
        single_exchange_idle_ms: u64,
        out: &mut Vec<(FlowKey, V)>,
    ) -> Expired {
        let shorter_ms = idle_ms.min(single_exchange_idle_ms);
        let mut removed = Expired::default();
        let mut cursor = self.tail;
        while let Some(slot) = self.slots.get(cursor as usize) {
            let Some(flow) = &slot.flow else { break };
            let idle = now_ms.saturating_sub(flow.activity.last_active_ms);
            if idle <= shorter_ms {
                // This flow and all more recent ones are within both timeouts.
                break;
            }
            let single = flow.activity.is_single_exchange();
            let timeout = if single {
                single_exchange_idle_ms
            } else {
                idle_ms
            };
            let towards_head = slot.prev;
            if idle > timeout {
                if let Some(expired) = self.take(cursor) {
                    out.push(expired);
                    self.stats.expired += 1;
                    if single {
                        removed.single_exchange += 1;
                    } else {
                        removed.idle += 1;
                    }
                }
            }
            cursor = towards_head;
        }
        removed
    }

    /// Removes every flow, least recently used first, for shutdown. The table
    /// stays usable; ids issued before are stale.
    pub fn drain_all(&mut self) -> Vec<(FlowKey, V)> {
        let mut out = Vec::with_capacity(self.len);
        while self.tail != NIL {
            match self.take(self.tail) {
                Some(flow) => out.push(flow),
                None => break,
            }
        }
        self.stats.removed += out.len() as u64;
        out
    }

    /// Clamps `now_ms` so that activity timestamps never decrease.
    fn stamp(&mut self, now_ms: u64) -> u64 {
        self.clock_ms = self.clock_ms.max(now_ms);
        self.clock_ms
    }

    fn flow(&self, id: FlowId) -> Option<&Flow<V>> {
        let slot = self.slots.get(id.index as usize)?;
        if slot.generation != id.generation {
            return None;
        }
        slot.flow.as_ref()
    }

    fn flow_mut(&mut self, id: FlowId) -> Option<&mut Flow<V>> {
        let slot = self.slots.get_mut(id.index as usize)?;
        if slot.generation != id.generation {
            return None;
        }
        slot.flow.as_mut()
    }

    /// A free slot index: from the free list, else a new slot (the `Vec` was
    /// allocated for `capacity` slots, so pushing does not reallocate).
    fn alloc_slot(&mut self) -> u32 {
        if self.free != NIL {
            let index = self.free;
            self.free = self.slots[index as usize].next;
            return index;
        }
        let index = self.slots.len() as u32;
        self.slots.push(Slot {
            generation: 0,
            prev: NIL,
            next: NIL,
            flow: None,
        });
        index
    }

    /// Empties occupied slot `index`: unlinks it, drops its key from the
    /// index, bumps its generation and puts it on the free list.
    fn take(&mut self, index: u32) -> Option<(FlowKey, V)> {
        let flow = self.slots.get_mut(index as usize)?.flow.take()?;
        self.unlink(index);
        self.index.remove(&flow.key);
        let slot = &mut self.slots[index as usize];
        slot.generation = slot.generation.wrapping_add(1);
        slot.next = self.free;
        self.free = index;
        self.len -= 1;
        Some((flow.key, flow.value))
    }

    /// Detaches `index` from the LRU list.
    fn unlink(&mut self, index: u32) {
        let (prev, next) = {
            let slot = &self.slots[index as usize];
            (slot.prev, slot.next)
        };
        match prev {
            NIL => self.head = next,
            p => self.slots[p as usize].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.slots[n as usize].prev = prev,
        }
        let slot = &mut self.slots[index as usize];
        slot.prev = NIL;
        slot.next = NIL;
    }

    /// Makes detached `index` the most recently used flow.
    fn push_front(&mut self, index: u32) {
        let old_head = self.head;
        {
            let slot = &mut self.slots[index as usize];
            slot.prev = NIL;
            slot.next = old_head;
        }
        match old_head {
            NIL => self.tail = index,
            h => self.slots[h as usize].prev = index,
        }
        self.head = index;
    }

    /// Ids from least to most recently used.
    #[cfg(test)]
    fn lru_order(&self) -> Vec<FlowId> {
        let mut ids = Vec::new();
        let mut cursor = self.tail;
        while cursor != NIL {
            let slot = &self.slots[cursor as usize];
            ids.push(FlowId {
                index: cursor,
                generation: slot.generation,
            });
            cursor = slot.prev;
        }
        ids
    }

    /// Checks every structural invariant; panics on the first violation.
    #[cfg(test)]
    fn check_invariants(&self) {
        assert!(self.len <= self.capacity);
        assert!(self.slots.len() <= self.capacity);
        assert_eq!(self.slots.capacity(), self.capacity.max(self.slots.len()));
        assert_eq!(self.index.len(), self.len);
        // Forward walk: links agree, timestamps decrease towards the tail.
        let mut count = 0;
        let mut prev = NIL;
        let mut cursor = self.head;
        let mut newer = u64::MAX;
        while cursor != NIL {
            let slot = &self.slots[cursor as usize];
            assert_eq!(slot.prev, prev);
            let flow = slot.flow.as_ref().expect("listed slot is occupied");
            assert_eq!(self.index.get(&flow.key), Some(&cursor));
            assert!(flow.activity.last_active_ms <= newer);
            assert!(flow.activity.last_active_ms <= self.clock_ms);
            newer = flow.activity.last_active_ms;
            count += 1;
            assert!(count <= self.len);
            prev = cursor;
            cursor = slot.next;
        }
        assert_eq!(self.tail, prev);
        assert_eq!(count, self.len);
        // Free list holds exactly the empty slots.
        let mut free = 0;
        let mut cursor = self.free;
        while cursor != NIL {
            let slot = &self.slots[cursor as usize];
            assert!(slot.flow.is_none());
            free += 1;
            assert!(free <= self.slots.len());
            cursor = slot.next;
        }
        assert_eq!(free + self.len, self.slots.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn key(client_port: u16, dst_port: u16) -> FlowKey {
        FlowKey {
            client: ClientAddr(SocketAddr::from(([10, 0, 0, 1], client_port))),
            orig_dst: OrigDst(SocketAddr::from(([192, 0, 2, 1], dst_port))),
        }
    }

    fn inserted<V: std::fmt::Debug>(outcome: InsertOutcome<V>) -> FlowId {
        match outcome {
            InsertOutcome::Inserted(id) => id,
            other => panic!("expected Inserted, got {other:?}"),
        }
    }

    #[test]
    fn insert_lookup_get() {
        let mut t = FlowTable::new(4);
        assert!(t.is_empty());
        let a = inserted(t.insert(key(1, 53), "a", 10));
        let b = inserted(t.insert(key(2, 53), "b", 11));
        assert_ne!(a, b);
        assert_eq!(t.len(), 2);
        assert_eq!(t.capacity(), 4);
        assert_eq!(t.lookup(&key(1, 53)), Some(a));
        assert_eq!(t.lookup(&key(2, 53)), Some(b));
        assert_eq!(t.lookup(&key(1, 54)), None);
        assert_eq!(t.get(a), Some(&"a"));
        assert_eq!(t.key_of(b), Some(key(2, 53)));
        *t.get_mut(b).unwrap() = "B";
        assert_eq!(t.get(b), Some(&"B"));
        let act = t.activity(a).unwrap();
        assert_eq!(
            act,
            FlowActivity {
                last_active_ms: 10,
                to_server: 0,
                to_client: 0
            }
        );
        assert_eq!(t.stats().created, 2);
        t.check_invariants();
    }

    #[test]
    fn keys_differ_by_each_address() {
        let mut t = FlowTable::new(8);
        let base = key(1000, 53);
        let other_client = FlowKey {
            client: ClientAddr("[2001:db8::1]:1000".parse().unwrap()),
            ..base
        };
        let other_dst = FlowKey {
            orig_dst: OrigDst("192.0.2.2:53".parse().unwrap()),
            ..base
        };
        for k in [base, other_client, other_dst] {
            let _ = inserted(t.insert(k, (), 0));
        }
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn duplicate_insert_hands_value_back() {
        let mut t = FlowTable::new(2);
        let a = inserted(t.insert(key(1, 1), 1, 0));
        let _b = inserted(t.insert(key(2, 1), 2, 1));
        let out = t.insert(key(1, 1), 99, 5);
        assert_eq!(out.id(), a);
        assert_eq!(out, InsertOutcome::Occupied { id: a, value: 99 });
        assert_eq!(t.get(a), Some(&1));
        // Recency untouched: `a` is still the LRU.
        assert_eq!(t.lru_order()[0], a);
        assert_eq!(t.stats().created, 2);
        t.check_invariants();
    }

    #[test]
    fn touch_moves_to_mru_and_counts() {
        let mut t = FlowTable::new(4);
        let a = inserted(t.insert(key(1, 1), 'a', 0));
        let b = inserted(t.insert(key(2, 1), 'b', 1));
        let c = inserted(t.insert(key(3, 1), 'c', 2));
        assert_eq!(t.lru_order(), vec![a, b, c]);
        assert!(t.touch(a, 3, Dir::ToServer));
        assert_eq!(t.lru_order(), vec![b, c, a]);
        assert!(t.touch(c, 4, Dir::ToClient));
        assert_eq!(t.lru_order(), vec![b, a, c]);
        assert!(t.touch(c, 5, Dir::ToClient)); // already MRU
        assert_eq!(t.lru_order(), vec![b, a, c]);
        assert!(t.touch(b, 6, Dir::ToServer));
        assert_eq!(t.lru_order(), vec![a, c, b]);
        assert_eq!(
            t.activity(c).unwrap(),
            FlowActivity {
                last_active_ms: 5,
                to_server: 0,
                to_client: 2
            }
        );
        assert_eq!(t.activity(a).unwrap().to_server, 1);
        t.check_invariants();
    }

    #[test]
    fn eviction_returns_true_lru_and_counts() {
        let mut t = FlowTable::new(3);
        let a = inserted(t.insert(key(1, 1), 'a', 0));
        let b = inserted(t.insert(key(2, 1), 'b', 1));
        let c = inserted(t.insert(key(3, 1), 'c', 2));
        assert!(t.touch(a, 3, Dir::ToServer));
        // LRU is now b.
        let d = match t.insert(key(4, 1), 'd', 4) {
            InsertOutcome::Evicted { id, evicted } => {
                assert_eq!(evicted, (key(2, 1), 'b'));
                id
            }
            other => panic!("expected eviction, got {other:?}"),
        };
        assert_eq!(t.len(), 3);
        assert_eq!(t.get(b), None);
        assert_eq!(t.lookup(&key(2, 1)), None);
        assert_eq!(t.lru_order(), vec![c, a, d]);
        // The evicted slot was reused with a new generation.
        assert_eq!(d.index, b.index);
        assert_ne!(d.generation, b.generation);
        let stats = t.stats();
        assert_eq!(stats.evicted, 1);
        assert_eq!(stats.created, 4);
        t.check_invariants();
    }

    #[test]
    fn evict_lru_takes_the_least_recently_used() {
        let mut t = FlowTable::new(4);
        assert!(t.evict_lru().is_none(), "an empty table evicts nothing");
        let a = inserted(t.insert(key(1, 1), 'a', 0));
        inserted(t.insert(key(2, 1), 'b', 1));
        t.touch(a, 2, Dir::ToServer);
        assert_eq!(t.evict_lru(), Some((key(2, 1), 'b')));
        assert_eq!(t.evict_lru(), Some((key(1, 1), 'a')));
        assert!(t.evict_lru().is_none());
        assert_eq!(t.stats().evicted, 2);
        t.check_invariants();
        inserted(t.insert(key(3, 1), 'c', 3));
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn capacity_one() {
        let mut t = FlowTable::new(1);
        let a = inserted(t.insert(key(1, 1), 1, 0));
        assert!(t.touch(a, 1, Dir::ToServer));
        let out = t.insert(key(2, 1), 2, 2);
        let b = out.id();
        assert!(matches!(
            out,
            InsertOutcome::Evicted {
                evicted: (k, 1),
                ..
            } if k == key(1, 1)
        ));
        assert_eq!(t.len(), 1);
        assert_eq!(t.get(a), None);
        assert_eq!(t.get(b), Some(&2));
        assert_eq!(t.lru_order(), vec![b]);
        assert_eq!(t.remove(b), Some((key(2, 1), 2)));
        assert!(t.is_empty());
        let c = inserted(t.insert(key(3, 1), 3, 3));
        assert_eq!(t.get(c), Some(&3));
        assert_eq!(t.stats().evicted, 1);
        t.check_invariants();
    }

    #[test]
    #[should_panic(expected = "capacity")]
    fn capacity_zero_is_rejected() {
        let _ = FlowTable::<()>::new(0);
    }

    #[test]
    fn stale_id_after_reuse() {
        let mut t = FlowTable::new(1);
        let a = inserted(t.insert(key(1, 1), 'a', 0));
        let InsertOutcome::Evicted { id: b, .. } = t.insert(key(2, 1), 'b', 1) else {
            panic!("expected eviction");
        };
        assert_eq!(a.index, b.index);
        assert_eq!(t.get(a), None);
        assert_eq!(t.get_mut(a), None);
        assert_eq!(t.key_of(a), None);
        assert_eq!(t.activity(a), None);
        assert!(!t.touch(a, 2, Dir::ToServer));
        assert_eq!(t.remove(a), None);
        // The stale touch did not count against the live flow.
        assert_eq!(t.activity(b).unwrap().to_server, 0);
        assert_eq!(t.get(b), Some(&'b'));
        // Out-of-range and fabricated ids.
        let bogus = FlowId {
            index: 7,
            generation: 0,
        };
        assert_eq!(t.get(bogus), None);
        assert!(!t.touch(bogus, 3, Dir::ToClient));
        let future = FlowId {
            index: b.index,
            generation: b.generation + 1,
        };
        assert_eq!(t.get(future), None);
        t.check_invariants();
    }

    #[test]
    fn remove_then_reuse_slot() {
        let mut t = FlowTable::new(4);
        let a = inserted(t.insert(key(1, 1), 'a', 0));
        let b = inserted(t.insert(key(2, 1), 'b', 0));
        assert_eq!(t.remove(a), Some((key(1, 1), 'a')));
        assert_eq!(t.remove(a), None);
        assert_eq!(t.lookup(&key(1, 1)), None);
        assert_eq!(t.len(), 1);
        let c = inserted(t.insert(key(3, 1), 'c', 1));
        assert_eq!(c.index, a.index, "freed slot is reused first");
        assert_ne!(c.generation, a.generation);
        assert_eq!(t.get(a), None);
        assert_eq!(t.get(c), Some(&'c'));
        assert_eq!(t.lru_order(), vec![b, c]);
        // The same key can come back after removal.
        let a2 = inserted(t.insert(key(1, 1), 'A', 2));
        assert_eq!(t.lookup(&key(1, 1)), Some(a2));
        assert_eq!(t.stats().removed, 1);
        t.check_invariants();
    }

    #[test]
    fn expiry_uses_both_timeouts() {
        const IDLE: u64 = 30_000;
        const SINGLE: u64 = 5_000;
        let mut t = FlowTable::new(16);
        // DNS-like: one query, one answer.
        let dns = inserted(t.insert(key(1, 53), "dns", 0));
        assert!(t.touch(dns, 0, Dir::ToServer));
        assert!(t.touch(dns, 1, Dir::ToClient));
        // One query, several answers: still a single exchange.
        let multi = inserted(t.insert(key(2, 53), "multi", 1));
        assert!(t.touch(multi, 1, Dir::ToServer));
        assert!(t.touch(multi, 1, Dir::ToClient));
        assert!(t.touch(multi, 1, Dir::ToClient));
        // Two queries: long timeout.
        let two = inserted(t.insert(key(3, 53), "two", 0));
        assert!(t.touch(two, 0, Dir::ToServer));
        assert!(t.touch(two, 0, Dir::ToClient));
        assert!(t.touch(two, 1, Dir::ToServer));
        // A query without answer yet: long timeout.
        let pending = inserted(t.insert(key(4, 53), "pending", 1));
        assert!(t.touch(pending, 1, Dir::ToServer));
        // Sits behind the long-timeout flows in LRU order.
        assert_eq!(t.lru_order(), vec![dns, multi, two, pending]);

        let mut out = Vec::new();
        // Exactly at the timeout: not expired (strictly greater is needed).
        assert_eq!(t.expire(1 + SINGLE, IDLE, SINGLE, &mut out).total(), 0);
        assert_eq!(t.expire(2 + SINGLE, IDLE, SINGLE, &mut out).total(), 2);
        assert_eq!(out, vec![(key(1, 53), "dns"), (key(2, 53), "multi")]);
        assert_eq!(t.get(dns), None);
        assert_eq!(t.len(), 2);

        out.clear();
        assert_eq!(t.expire(1 + IDLE, IDLE, SINGLE, &mut out).total(), 0);
        assert_eq!(t.expire(2 + IDLE, IDLE, SINGLE, &mut out).total(), 2);
        assert_eq!(out, vec![(key(3, 53), "two"), (key(4, 53), "pending")]);
        assert!(t.is_empty());
        assert_eq!(t.stats().expired, 4);
        t.check_invariants();
    }

    #[test]
    fn single_exchange_behind_long_timeout_flow_expires() {
        // The walk must skip a surviving long-timeout flow at the LRU tail.
        let mut t = FlowTable::new(4);
        let long = inserted(t.insert(key(1, 1), 1, 0));
        assert!(t.touch(long, 0, Dir::ToServer));
        let dns = inserted(t.insert(key(2, 53), 2, 100));
        assert!(t.touch(dns, 100, Dir::ToServer));
        assert!(t.touch(dns, 100, Dir::ToClient));
        let fresh = inserted(t.insert(key(3, 53), 3, 1_000));
        let mut out = Vec::new();
        assert_eq!(t.expire(700, 10_000, 500, &mut out).total(), 1);
        assert_eq!(out, vec![(key(2, 53), 2)]);
        assert_eq!(t.lru_order(), vec![long, fresh]);
        t.check_invariants();
    }

    #[test]
    fn single_timeout_longer_than_idle_still_works() {
        // Misconfiguration must not make expiry miss flows.
        let mut t = FlowTable::new(4);
        let dns = inserted(t.insert(key(1, 53), (), 0));
        assert!(t.touch(dns, 0, Dir::ToServer));
        assert!(t.touch(dns, 0, Dir::ToClient));
        let plain = inserted(t.insert(key(2, 53), (), 0));
        let mut out = Vec::new();
        assert_eq!(t.expire(150, 100, 200, &mut out).total(), 1);
        assert_eq!(t.get(plain), None);
        assert_eq!(t.expire(201, 100, 200, &mut out).total(), 1);
        assert!(t.is_empty());
    }

    #[test]
    fn clock_going_backwards_keeps_order() {
        let mut t = FlowTable::new(4);
        let a = inserted(t.insert(key(1, 1), (), 1_000));
        let b = inserted(t.insert(key(2, 1), (), 500));
        assert_eq!(t.activity(b).unwrap().last_active_ms, 1_000);
        assert!(t.touch(a, 10, Dir::ToServer));
        assert_eq!(t.activity(a).unwrap().last_active_ms, 1_000);
        t.check_invariants();
        let mut out = Vec::new();
        assert_eq!(t.expire(0, 0, 0, &mut out).total(), 0);
        assert_eq!(t.expire(1_001, 0, 0, &mut out).total(), 2);
    }

    #[test]
    fn drain_all_empties_and_table_stays_usable() {
        let mut t = FlowTable::new(3);
        let a = inserted(t.insert(key(1, 1), 'a', 0));
        let b = inserted(t.insert(key(2, 1), 'b', 0));
        let c = inserted(t.insert(key(3, 1), 'c', 0));
        assert!(t.touch(a, 1, Dir::ToServer));
        let drained = t.drain_all();
        assert_eq!(
            drained,
            vec![(key(2, 1), 'b'), (key(3, 1), 'c'), (key(1, 1), 'a')]
        );
        assert!(t.is_empty());
        for id in [a, b, c] {
            assert_eq!(t.get(id), None);
        }
        assert_eq!(t.lookup(&key(1, 1)), None);
        assert_eq!(t.stats().removed, 3);
        t.check_invariants();
        let d = inserted(t.insert(key(4, 1), 'd', 2));
        assert_eq!(t.get(d), Some(&'d'));
        assert!(t.drain_all().len() == 1 && t.drain_all().is_empty());
        t.check_invariants();
    }

    #[test]
    fn no_reallocation_after_warm_up() {
        let cap = 64;
        let mut t = FlowTable::new(cap);
        let slab_ptr = t.slots.as_ptr();
        let index_cap = t.index.capacity();
        assert!(index_cap >= cap);
        for i in 0..10_000u16 {
            let id = t.insert(key(i, 1), i, u64::from(i)).id();
            assert!(t.touch(id, u64::from(i), Dir::ToServer));
            if i % 3 == 0 {
                let _ = t.remove(id);
            }
        }
        assert_eq!(t.slots.as_ptr(), slab_ptr);
        assert_eq!(t.slots.capacity(), cap);
        // hashbrown may rehash into a larger table once under tombstone churn
        // (depends on the random hash seed); what matters is that it stays bounded.
        assert!(
            t.index.capacity() <= index_cap * 2,
            "{} > 2 x {index_cap}",
            t.index.capacity()
        );
        t.check_invariants();
    }

    /// xorshift64: deterministic randomness without extra crates.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// The obviously-correct reference: a `Vec` in LRU order (front = LRU).
    struct ModelFlow {
        id: FlowId,
        key: FlowKey,
        value: u64,
        activity: FlowActivity,
    }

    #[derive(Default)]
    struct Model {
        flows: Vec<ModelFlow>,
        clock_ms: u64,
        stats: FlowStats,
    }

    impl Model {
        fn pos(&self, id: FlowId) -> Option<usize> {
            self.flows.iter().position(|f| f.id == id)
        }

        fn stamp(&mut self, now: u64) -> u64 {
            self.clock_ms = self.clock_ms.max(now);
            self.clock_ms
        }
    }

    fn run_against_model(seed: u64, capacity: usize, ops: usize) {
        let mut rng = Rng(seed);
        let mut t = FlowTable::new(capacity);
        let mut m = Model::default();
        let mut dead: Vec<FlowId> = Vec::new();
        let mut now: u64 = 0;
        let mut next_value = 0u64;
        let key_space = (capacity as u64) * 3 + 2;
        let mut out = Vec::new();

        for step in 0..ops {
            // Time mostly advances a little, sometimes jumps, rarely goes back.
            now = match rng.below(20) {
                0 => now.saturating_sub(rng.below(50)),
                1 => now + rng.below(2_000),
                _ => now + rng.below(20),
            };
            // Pick an id: usually a live one, sometimes a stale one.
            let pick = |rng: &mut Rng, m: &Model, dead: &[FlowId]| -> Option<FlowId> {
                if !dead.is_empty() && (m.flows.is_empty() || rng.below(5) == 0) {
                    Some(dead[rng.below(dead.len() as u64) as usize])
                } else if !m.flows.is_empty() {
                    Some(m.flows[rng.below(m.flows.len() as u64) as usize].id)
                } else {
                    None
                }
            };
            match rng.below(100) {
                0..=34 => {
                    let k = rng.below(key_space) as u16;
                    let fk = key(k, 53 + (k % 3));
                    let value = next_value;
                    next_value += 1;
                    let outcome = t.insert(fk, value, now);
                    if let Some(p) = m.flows.iter().position(|f| f.key == fk) {
                        let id = m.flows[p].id;
                        assert_eq!(outcome, InsertOutcome::Occupied { id, value });
                        continue;
                    }
                    let id = outcome.id();
                    assert!(m.pos(id).is_none(), "new id collides with a live one");
                    if m.flows.len() == capacity {
                        let lru = m.flows.remove(0);
                        m.stats.evicted += 1;
                        dead.push(lru.id);
                        assert_eq!(
                            outcome,
                            InsertOutcome::Evicted {
                                id,
                                evicted: (lru.key, lru.value)
                            },
                            "step {step}"
                        );
                    } else {
                        assert_eq!(outcome, InsertOutcome::Inserted(id), "step {step}");
                    }
                    let stamp = m.stamp(now);
                    m.flows.push(ModelFlow {
                        id,
                        key: fk,
                        value,
                        activity: FlowActivity {
                            last_active_ms: stamp,
                            ..FlowActivity::default()
                        },
                    });
                    m.stats.created += 1;
                }
                35..=79 => {
                    let Some(id) = pick(&mut rng, &m, &dead) else {
                        continue;
                    };
                    let dir = if rng.below(2) == 0 {
                        Dir::ToServer
                    } else {
                        Dir::ToClient
                    };
                    let live = m.pos(id);
                    assert_eq!(t.touch(id, now, dir), live.is_some(), "step {step}");
                    if let Some(p) = live {
                        let stamp = m.stamp(now);
                        let mut f = m.flows.remove(p);
                        f.activity.last_active_ms = stamp;
                        match dir {
                            Dir::ToServer => f.activity.to_server += 1,
                            Dir::ToClient => f.activity.to_client += 1,
                        }
                        m.flows.push(f);
                    }
                }
                80..=89 => {
                    let Some(id) = pick(&mut rng, &m, &dead) else {
                        continue;
                    };
                    match m.pos(id) {
                        Some(p) => {
                            let f = m.flows.remove(p);
                            assert_eq!(t.remove(id), Some((f.key, f.value)));
                            m.stats.removed += 1;
                            dead.push(id);
                        }
                        None => assert_eq!(t.remove(id), None),
                    }
                }
                90..=97 => {
                    let idle = 1 + rng.below(300);
                    let single = 1 + rng.below(300);
                    out.clear();
                    let n = t.expire(now, idle, single, &mut out).total();
                    let mut want = Vec::new();
                    m.flows.retain(|f| {
                        let timeout = if f.activity.is_single_exchange() {
                            single
                        } else {
                            idle
                        };
                        let expired = now.saturating_sub(f.activity.last_active_ms) > timeout;
                        if expired {
                            want.push((f.key, f.value));
                            dead.push(f.id);
                        }
                        !expired
                    });
                    m.stats.expired += want.len() as u64;
                    assert_eq!(n, want.len(), "step {step}");
                    assert_eq!(out, want, "step {step}");
                }
                _ => {
                    let drained = t.drain_all();
                    let want: Vec<_> = m.flows.iter().map(|f| (f.key, f.value)).collect();
                    assert_eq!(drained, want);
                    dead.extend(m.flows.iter().map(|f| f.id));
                    m.stats.removed += m.flows.len() as u64;
                    m.flows.clear();
                }
            }

            // Compare the whole observable state.
            assert_eq!(t.len(), m.flows.len(), "step {step}");
            assert_eq!(t.stats(), m.stats, "step {step}");
            let order: Vec<FlowId> = m.flows.iter().map(|f| f.id).collect();
            assert_eq!(t.lru_order(), order, "step {step}");
            for f in &m.flows {
                assert_eq!(t.lookup(&f.key), Some(f.id));
                assert_eq!(t.get(f.id), Some(&f.value));
                assert_eq!(t.key_of(f.id), Some(f.key));
                assert_eq!(t.activity(f.id), Some(f.activity));
            }
            for &id in dead.iter().rev().take(16) {
                assert_eq!(t.get(id), None, "stale id {id:?} resolved");
            }
            if dead.len() > 4_096 {
                dead.drain(..2_048);
            }
            if step % 64 == 0 {
                t.check_invariants();
            }
        }
        t.check_invariants();
    }

    #[test]
    fn randomized_against_reference_model() {
        for (seed, capacity) in [(1, 1), (2, 2), (3, 7), (4, 16), (5, 64), (0xdead_beef, 33)] {
            run_against_model(seed, capacity, 5_000);
        }
    }
}
