//! Datagrams of one completion batch, gathered per destination so that a burst to
//! one destination leaves in one `sendmsg` with `UDP_SEGMENT` (GSO).
//!
//! Sending one datagram costs a full pass through the kernel's UDP and IP output
//! path: route, netfilter hooks, qdisc. With GSO the kernel makes that pass once
//! for a run of equal-sized datagrams and cuts the run into datagrams at the end
//! (in the NIC, or in software just before the device). The receiver sees the same
//! datagrams, in the same order, with the same sizes.
//!
//! A run is the payloads, copied back to back, of consecutive datagrams of one
//! flow in one direction: every one as long as the first (the segment size)
//! except the last, which may be shorter and ends the run. Nothing waits for a
//! run to fill: the worker sends every run at the end of the completion batch
//! it was gathered in, so batching adds no latency beyond the batch itself. A
//! lone datagram goes out as a plain `send`.
//!
//! This module is the bookkeeping only (no I/O); `super` sends the runs.

use std::net::SocketAddr;
use std::os::fd::RawFd;

use super::flows::{Dir, FlowId};

/// Most datagrams in one GSO send. The kernel's limit (`UDP_MAX_SEGMENTS`) is 64
/// up to 6.x and larger since; 64 fits every kernel the engine runs on.
pub const MAX_SEGMENTS: usize = 64;
/// Most payload bytes in one GSO send: the UDP length field (65535) less the
/// headers, with room to spare for IPv6.
pub const MAX_RUN_BYTES: usize = 65000;
/// Largest datagram gathered into runs: one that fits a 1500-byte MTU after the
/// IPv4 (IPv6) and UDP headers. The kernel refuses a segment larger than the path
/// MTU allows (EINVAL), so larger datagrams are sent one by one, as before; on a
/// path with a smaller MTU the refusal is counted and the flow stops gathering.
pub const MAX_SEGMENT: usize = 1472;
/// [`MAX_SEGMENT`] for IPv6: its header is 20 bytes longer.
pub const MAX_SEGMENT_V6: usize = 1452;
/// Most runs open at once; gathering one more sends the oldest first.
pub const MAX_RUNS: usize = 32;
/// Buffers kept for reuse between batches.
const SPARE_BUFFERS: usize = MAX_RUNS;

/// Whether a datagram of `len` bytes sent over IPv6 (`v6`) or IPv4 may join a run.
/// An empty datagram cannot be a GSO segment; a large one could exceed the path
/// MTU.
pub fn gatherable(len: usize, v6: bool) -> bool {
    len >= 1 && len <= if v6 { MAX_SEGMENT_V6 } else { MAX_SEGMENT }
}

/// Consecutive datagrams of one flow and direction, payloads back to back.
#[derive(Debug)]
pub struct Run {
    /// The flow, for accounting once the run is sent.
    pub flow: FlowId,
    pub dir: Dir,
    /// The socket it leaves by: the flow's upstream socket (to the server) or the
    /// reply socket of the original destination (to the client). Valid while the
    /// flow lives: a flow's runs are sent before it is retired.
    pub fd: RawFd,
    /// `sendto` destination (the client, or a full-cone flow's target); `None`:
    /// the connected upstream socket's peer.
    pub to: Option<SocketAddr>,
    /// Segment size: the length of every datagram but the last.
    pub seg: usize,
    /// Datagrams in the run.
    pub count: usize,
    /// The payloads.
    pub buf: Vec<u8>,
    /// The last datagram was shorter than `seg`: nothing more may follow it.
    closed: bool,
}

impl Run {
    /// The datagrams of the run, one slice each.
    pub fn datagrams(&self) -> impl Iterator<Item = &[u8]> {
        self.buf.chunks(self.seg.max(1))
    }

    fn same_route(&self, flow: FlowId, dir: Dir, fd: RawFd, to: Option<SocketAddr>) -> bool {
        self.flow == flow && self.dir == dir && self.fd == fd && self.to == to
    }

    fn accepts(&self, len: usize) -> bool {
        !self.closed
            && len <= self.seg
            && self.count < MAX_SEGMENTS
            && self.buf.len() + len <= MAX_RUN_BYTES
    }
}

/// The runs of the current batch.
#[derive(Debug, Default)]
pub struct Batch {
    /// Open runs, oldest first.
    runs: Vec<Run>,
    spare: Vec<Vec<u8>>,
}

impl Batch {
    /// Whether any run waits to be sent.
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Adds a datagram (`gatherable(payload.len(), _)`) for `flow` in direction `dir`.
    /// Returns a run that must be sent before anything else, in this order: the
    /// route's previous run, when the datagram cannot join it (order within a flow
    /// is kept), or the oldest run when [`MAX_RUNS`] are open.
    pub fn push(
        &mut self,
        flow: FlowId,
        dir: Dir,
        fd: RawFd,
        to: Option<SocketAddr>,
        payload: &[u8],
    ) -> Option<Run> {
        debug_assert!(gatherable(payload.len(), false));
        let len = payload.len();
        let mut first = None;
        if let Some(i) = self.position(flow, dir, fd, to) {
            let run = &mut self.runs[i];
            if run.accepts(len) {
                run.buf.extend_from_slice(payload);
                run.count += 1;
                run.closed = len < run.seg;
                return None;
            }
            first = Some(self.runs.remove(i));
        } else if self.runs.len() >= MAX_RUNS {
            first = Some(self.runs.remove(0));
        }
        let mut buf = self.spare.pop().unwrap_or_default();
        buf.extend_from_slice(payload);
        self.runs.push(Run {
            flow,
            dir,
            fd,
            to,
            seg: len,
            count: 1,
            buf,
            closed: false,
        });
        first
    }

    /// Takes the run of a route, to send it before a datagram that cannot join a
    /// run (empty or large) goes out on its own.
    pub fn take_route(
        &mut self,
        flow: FlowId,
        dir: Dir,
        fd: RawFd,
        to: Option<SocketAddr>,
    ) -> Option<Run> {
        self.position(flow, dir, fd, to)
            .map(|i| self.runs.remove(i))
    }

    /// Takes every run, oldest first.
    pub fn take_all(&mut self) -> Vec<Run> {
        std::mem::take(&mut self.runs)
    }

    /// Takes the runs `pick` chooses, oldest first, and keeps the others.
    pub fn take_where(&mut self, mut pick: impl FnMut(&Run) -> bool) -> Vec<Run> {
        let (taken, kept) = std::mem::take(&mut self.runs)
            .into_iter()
            .partition(|r| pick(r));
        self.runs = kept;
        taken
    }

    /// Gives a sent run's buffer back for reuse.
    pub fn recycle(&mut self, mut run: Run) {
        // A buffer grown by jumbo runs is not worth keeping.
        if self.spare.len() < SPARE_BUFFERS && run.buf.capacity() <= 2 * MAX_RUN_BYTES {
            run.buf.clear();
            self.spare.push(run.buf);
        }
    }

    fn position(&self, flow: FlowId, dir: Dir, fd: RawFd, to: Option<SocketAddr>) -> Option<usize> {
        self.runs
            .iter()
            .position(|r| r.same_route(flow, dir, fd, to))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(i: u32) -> FlowId {
        FlowId {
            index: i,
            generation: 1,
        }
    }

    #[test]
    fn only_datagrams_that_fit_a_1500_byte_mtu_are_gathered() {
        assert!(!gatherable(0, false) && !gatherable(0, true));
        assert!(gatherable(1, false) && gatherable(1, true));
        assert!(gatherable(1472, false) && !gatherable(1473, false));
        assert!(gatherable(1452, true) && !gatherable(1453, true));
    }

    #[test]
    fn equal_datagrams_make_one_run_and_a_short_one_ends_it() {
        let mut b = Batch::default();
        for _ in 0..3 {
            assert!(b.push(id(1), Dir::ToServer, 7, None, &[1; 100]).is_none());
        }
        assert!(b.push(id(1), Dir::ToServer, 7, None, &[2; 40]).is_none());
        // After the short one, a new run: the old one is handed back first.
        let first = b.push(id(1), Dir::ToServer, 7, None, &[3; 100]).unwrap();
        assert_eq!((first.count, first.seg, first.buf.len()), (4, 100, 340));
        let sizes: Vec<_> = first.datagrams().map(<[u8]>::len).collect();
        assert_eq!(sizes, [100, 100, 100, 40]);
        let rest = b.take_all();
        assert_eq!(rest.len(), 1);
        assert_eq!((rest[0].count, rest[0].buf[0]), (1, 3));
    }

    #[test]
    fn a_longer_datagram_starts_a_new_run() {
        let mut b = Batch::default();
        b.push(id(1), Dir::ToClient, 7, None, &[1; 64]);
        let first = b.push(id(1), Dir::ToClient, 7, None, &[1; 65]).unwrap();
        assert_eq!(first.count, 1);
        assert_eq!(b.take_all()[0].seg, 65);
    }

    #[test]
    fn routes_do_not_mix() {
        let mut b = Batch::default();
        let a: SocketAddr = "10.0.0.1:53".parse().unwrap();
        b.push(id(1), Dir::ToServer, 7, None, &[1; 10]);
        b.push(id(1), Dir::ToClient, 8, Some(a), &[1; 10]);
        b.push(id(2), Dir::ToServer, 9, None, &[1; 10]);
        b.push(id(1), Dir::ToServer, 7, None, &[1; 10]);
        let runs = b.take_all();
        let counts: Vec<_> = runs.iter().map(|r| r.count).collect();
        assert_eq!(counts, [2, 1, 1]);
        assert!(b.take_route(id(1), Dir::ToServer, 7, None).is_none());
    }

    #[test]
    fn runs_stop_at_the_segment_and_byte_limits() {
        let mut b = Batch::default();
        let mut handed = vec![];
        for _ in 0..MAX_SEGMENTS + 1 {
            handed.extend(b.push(id(1), Dir::ToServer, 7, None, &[0; 8]));
        }
        assert_eq!(handed.len(), 1);
        assert_eq!(handed[0].count, MAX_SEGMENTS);
        let mut b = Batch::default();
        let mut handed = vec![];
        for _ in 0..50 {
            handed.extend(b.push(id(1), Dir::ToServer, 7, None, &[0; MAX_SEGMENT]));
        }
        assert_eq!(handed[0].count, MAX_RUN_BYTES / MAX_SEGMENT);
        assert!(handed[0].buf.len() <= MAX_RUN_BYTES);
    }

    #[test]
    fn too_many_routes_hand_back_the_oldest() {
        let mut b = Batch::default();
        for i in 0..MAX_RUNS as u32 {
            assert!(b.push(id(i), Dir::ToServer, 7, None, &[0; 8]).is_none());
        }
        let oldest = b.push(id(99), Dir::ToServer, 7, None, &[0; 8]).unwrap();
        assert_eq!(oldest.flow, id(0));
    }

    proptest! {
        /// Whatever the interleaving of flows and sizes, the runs handed back and
        /// left over carry every datagram exactly once, in its flow's order, and
        /// each run is valid for GSO (equal segments, a shorter last one).
        #[test]
        fn every_datagram_leaves_once_in_order(
            dgrams in proptest::collection::vec((0u32..4, 1usize..200), 0..400)
        ) {
            let mut b = Batch::default();
            let mut sent: Vec<Run> = vec![];
            for (n, (flow, len)) in dgrams.iter().enumerate() {
                // Each payload carries its index, so order can be checked.
                let mut p = vec![0u8; *len];
                p[0] = (n % 251) as u8;
                sent.extend(b.push(id(*flow), Dir::ToServer, *flow as i32, None, &p));
            }
            sent.extend(b.take_all());
            for flow in 0..4 {
                let want: Vec<(usize, u8)> = dgrams.iter().enumerate()
                    .filter(|(_, (f, _))| *f == flow)
                    .map(|(n, (_, len))| (*len, (n % 251) as u8))
                    .collect();
                let mut got = vec![];
                for r in sent.iter().filter(|r| r.flow == id(flow)) {
                    prop_assert!(r.count <= MAX_SEGMENTS && r.buf.len() <= MAX_RUN_BYTES);
                    let parts: Vec<&[u8]> = r.datagrams().collect();
                    prop_assert_eq!(parts.len(), r.count);
                    for (k, p) in parts.iter().enumerate() {
                        if k + 1 < parts.len() {
                            prop_assert_eq!(p.len(), r.seg);
                        } else {
                            prop_assert!(p.len() <= r.seg);
                        }
                        got.push((p.len(), p[0]));
                    }
                }
                prop_assert_eq!(got, want);
            }
        }
    }
}
