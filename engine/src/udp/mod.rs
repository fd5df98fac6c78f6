//! The UDP subsystem of a worker: batched receive, a bounded flow table, replies
//! from the original destination.
//!
//! Design, per core:
//!
//! * Two tproxy sockets (v4, v6) with `IP_TRANSPARENT`, `SO_REUSEPORT` and
//!   `IP_RECVORIGDSTADDR`/`IPV6_RECVORIGDSTADDR`, each with one multishot `RECVMSG`
//!   over a provided buffer ring: one SQE yields a stream of datagrams, each with its
//!   source (the client) and the original destination in a cmsg.
//! * A flow per (client, original destination), created when its first datagram
//!   arrives and the policy lets it through, owns one upstream socket: marked
//!   (`SO_MARK`), connected to the original destination (or the policy's target),
//!   with a multishot `RECV` on the same buffer ring. The connected socket
//!   demultiplexes the server's answers to the right client without any lookup.
//! * Replies go out through the reply socket bound to the original destination
//!   (`replies.rs`), so they carry its address and port.
//! * Each datagram is copied out of its receive buffer in the completion handler,
//!   so the buffer goes back to the kernel at once, into this batch's run for its
//!   flow and direction (`batch.rs`). At the end of the completion batch each run
//!   leaves in one non-blocking `sendmsg` with `UDP_SEGMENT` (GSO), or a plain
//!   `send`/`sendto` for a lone datagram. Empty and large datagrams are sent at
//!   once, after their flow's run.
//! * Stopping closes the tproxy sockets at once (with nft's fail-open rules new
//!   datagrams then bypass the engine, or go to the successor after a takeover),
//!   keeps the flows so that answers to what was
//!   already forwarded still reach their clients, ends answered single exchanges at
//!   the next tick and other flows once quiet for a second, and ends the rest at the
//!   drain deadline.

pub mod batch;
pub mod flows;
pub mod replies;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use io_uring::{opcode, types};
use socket2::{SockRef, Type};

use crate::config::{SourceMode, UdpNat};
use crate::core::ring::{BufGroup, Completion};
use crate::core::token::{Op, Token, GENERATION_MASK};
use crate::core::Core;
use crate::fdpool::{Class, Credit};
use crate::flowlog::{FlowProto, FlowRecord};
use crate::policy::{FlowMeta, RuleName, UdpVerdict};
use crate::stats::FlowEnd;
use crate::sys::{self, cmsg};
use crate::upstream::{self, Bound, UpstreamError};
use batch::{Batch, Run};
use flows::{ClientAddr, Dir, FlowId, FlowKey, FlowTable, InsertOutcome, OrigDst};
use replies::Replies;

/// While stopping, a flow that has been quiet this long ends.
const STOPPING_QUIET_MS: u64 = 1000;

/// Provided buffer group of UDP receives (tproxy sockets and upstream sockets).
pub const GROUP_UDP: u16 = 1;

/// Largest UDP payload (IPv6 jumbograms aside): 65535 - 8 byte UDP header.
const MAX_PAYLOAD: usize = 65527;
/// Room for the `io_uring_recvmsg_out` header (16), the name (sockaddr_in6, 28) and
/// the control data in front of the payload, rounded up.
const RECVMSG_OVERHEAD: usize = 256;
/// Provided buffers shared by the tproxy sockets and every upstream socket of a core.
/// A buffer is held only while its datagram is being forwarded (synchronously), so
/// this bounds one batch, not the number of flows.
pub const BUFFERS: u16 = 256;

/// The provided buffers UDP needs in the ring.
pub fn buffer_group() -> BufGroup {
    BufGroup {
        name: "UDP",
        group: GROUP_UDP,
        entries: BUFFERS,
        buf_size: MAX_PAYLOAD + RECVMSG_OVERHEAD,
    }
}

struct TproxySocket {
    fd: Option<OwnedFd>,
    /// Kernel reads `msg_namelen`/`msg_controllen` from here (boxed: stable address).
    msghdr: Box<libc::msghdr>,
    armed: bool,
}

/// One flow's upstream side.
struct Flow {
    upstream: OwnedFd,
    /// `user_data` of the multishot recv armed on `upstream`.
    recv_ud: u64,
    armed: bool,
    /// Where the upstream socket sends (the original destination, or the policy's
    /// target), and when the flow started (core clock, µs), for the flow log.
    target: SocketAddr,
    started_us: u64,
    /// Payload bytes and datagrams relayed: client to server, server to client.
    bytes: [u64; 2],
    dgrams: [u64; 2],
    /// `--udp-nat full-cone`: the upstream socket is not connected; where the
    /// client sends and who may answer.
    cone: Option<Box<Cone>>,
    /// The rule that decided the flow (a full-cone flow: its first destination).
    rule: Option<RuleName>,
    /// The kernel refused a GSO send of this flow (`udp_gso_fallbacks`): it sends
    /// one datagram per call from then on.
    no_gso: bool,
    /// Its own id once in the table: its runs of this batch are found by it when it
    /// is retired.
    id: Option<FlowId>,
    /// The upstream socket's credit in the fd pool, given back when the flow is
    /// dropped (when it is retired): after `upstream` (declared before it) is
    /// closed.
    _credit: Credit,
}

/// Most destinations, and most other remotes, one full-cone flow keeps track of;
/// past that a new one evicts the oldest (counted, `udp_cone_evictions`).
const CONE_PEERS: usize = 64;

/// The state of a full-cone flow: one upstream socket (one mapping) for every
/// destination of one client source (endpoint-independent mapping), open to
/// datagrams from any remote (endpoint-independent filtering).
struct Cone {
    /// Read by the kernel for the upstream socket's multishot recvmsg (the name
    /// length): lives in this box, which lives until that recv's final completion.
    msghdr: libc::msghdr,
    /// Destinations the client sent to: (original destination, where it goes, or
    /// `None` when the policy dropped it). Each kept entry holds a reference on the
    /// reply socket of its original destination.
    dsts: Vec<(SocketAddr, Option<SocketAddr>)>,
    /// Other remotes that sent to the mapping; each holds a reply socket reference
    /// on its own address, so their datagrams reach the client from them.
    remotes: Vec<SocketAddr>,
}

/// The UDP part of a worker.
pub struct Udp {
    sockets: Vec<TproxySocket>,
    flows: FlowTable<Flow>,
    replies: Replies,
    /// Removed flows whose recv is being cancelled, by the recv's `user_data`: what
    /// the kernel may still read (a full-cone recv's msghdr), kept until the final
    /// completion. Their socket's fd is closed at once: the armed recv holds its
    /// own reference to the socket, so the fd number and its credit are free while
    /// the cancel runs, and an evicting flow gets the credit it evicted for.
    closing: HashMap<u64, Option<Box<Cone>>>,
    /// Tproxy sockets or flows whose multishot recv ended and must be re-armed
    /// after the buffers of this batch are back in the ring.
    rearm: Vec<Token>,
    expired: Vec<(FlowKey, Flow)>,
    idle_ms: u64,
    single_ms: u64,
    /// Tick at which a stop ends every flow.
    stop_deadline: Option<u64>,
    /// Datagrams of this completion batch, per flow and direction, sent at its end.
    batch: Batch,
    /// UDP GSO is on (`Features::udp_gso`).
    gso: bool,
}

/// What sending one run achieved.
#[derive(Debug, Default)]
struct Sent {
    dgrams: u64,
    bytes: u64,
    /// Datagrams lost, and the last error.
    dropped: u64,
    err: Option<io::Error>,
    /// The kernel refused GSO for this route: the flow stops using it.
    gso_refused: bool,
}

impl Udp {
    /// Takes the tproxy sockets. The buffers ([`buffer_group`]) are registered
    /// with the ring when it is built.
    pub fn new(core: &mut Core, tproxy_sockets: Vec<OwnedFd>) -> Result<Udp, String> {
        let cfg = core.cfg.clone();
        let mut sockets = Vec::new();
        for fd in tproxy_sockets {
            // Multishot recvmsg reads only the name and control lengths from it.
            let mut msghdr = Box::new(sys::zeroed_msghdr());
            msghdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
            msghdr.msg_controllen = cmsg::CONTROL_LEN;
            sockets.push(TproxySocket {
                fd: Some(fd),
                msghdr,
                armed: false,
            });
        }
        Ok(Udp {
            sockets,
            flows: FlowTable::new(cfg.udp_max_flows_per_core),
            replies: Replies::default(),
            closing: HashMap::new(),
            rearm: Vec::new(),
            expired: Vec::new(),
            idle_ms: cfg.udp_idle_timeout_s * 1000,
            single_ms: cfg.udp_single_exchange_timeout_s * 1000,
            stop_deadline: None,
            batch: Batch::default(),
            gso: cfg.features.udp_gso,
        })
    }

    /// Arms the multishot recvmsg of every tproxy socket.
    pub fn start(&mut self, core: &mut Core) {
        for i in 0..self.sockets.len() {
            self.arm_socket(core, i);
        }
    }

    fn arm_socket(&mut self, core: &mut Core, i: usize) {
        let s = &mut self.sockets[i];
        let Some(fd) = s.fd.as_ref() else {
            return;
        };
        if s.armed || core.stopping {
            return;
        }
        s.armed = true;
        let sqe = opcode::RecvMsgMulti::new(
            types::Fd(fd.as_raw_fd()),
            &*s.msghdr as *const libc::msghdr,
            GROUP_UDP,
        )
        .build()
        .user_data(Token::new(Op::UdpListen, i as u32, 0).encode());
        core.submit(sqe);
    }

    /// Arms a flow's upstream recv. Flows stay armed while stopping: answers to
    /// datagrams already forwarded must still reach their clients.
    fn arm_flow(&mut self, core: &mut Core, id: FlowId) {
        let Some(flow) = self.flows.get_mut(id) else {
            return;
        };
        if flow.armed {
            return;
        }
        flow.armed = true;
        let fd = types::Fd(flow.upstream.as_raw_fd());
        let sqe = match &flow.cone {
            // Full cone: the source of each datagram matters (recvmsg's name).
            Some(cone) => {
                opcode::RecvMsgMulti::new(fd, &cone.msghdr as *const libc::msghdr, GROUP_UDP)
                    .build()
            }
            None => opcode::RecvMulti::new(fd, GROUP_UDP).build(),
        };
        core.submit(sqe.user_data(flow.recv_ud));
    }

    /// Re-arms receives that ended in this batch (recycled buffers are already
    /// visible to the kernel: `BufRing::recycle` publishes at once).
    fn rearm_pending(&mut self, core: &mut Core) {
        let pending = std::mem::take(&mut self.rearm);
        for t in pending {
            match t.op {
                Op::UdpListen => self.arm_socket(core, t.slot as usize),
                _ => {
                    if let Some(id) = self.live_flow(t) {
                        self.arm_flow(core, id);
                    }
                }
            }
        }
    }

    fn live_flow(&self, t: Token) -> Option<FlowId> {
        let id = self.flows.id_at(t.slot)?;
        (id.generation & GENERATION_MASK == t.generation).then_some(id)
    }

    /// A UDP completion.
    pub fn on_cqe(&mut self, core: &mut Core, tok: Token, c: Completion) {
        let bid = c.buffer_id();
        match tok.op {
            Op::UdpListen => self.on_client_datagram(core, tok, c, bid),
            _ => self.on_server_datagram(core, tok, c, bid),
        }
        if let Some(b) = bid {
            core.ring.buffers(GROUP_UDP).recycle(b);
        }
        if !self.rearm.is_empty() {
            self.rearm_pending(core);
        }
    }

    fn on_client_datagram(&mut self, core: &mut Core, tok: Token, c: Completion, bid: Option<u16>) {
        let i = tok.slot as usize;
        if !c.more() {
            self.sockets[i].armed = false;
            if core.stopping {
                self.sockets[i].fd = None;
            } else {
                self.rearm.push(tok);
            }
        }
        if c.result < 0 {
            recv_error(core, -c.result, "recvmsg");
            return;
        }
        let Some(b) = bid else {
            return;
        };
        let stats = core.stats.clone();
        let data = core.ring.buffers(GROUP_UDP).data(b, c.result as usize);
        let (client, orig, payload) = match parse_datagram(data, &self.sockets[i].msghdr) {
            Ok(d) => d,
            Err(Malformed::Truncated) => {
                stats.udp_drop_truncated.fetch_add(1, Relaxed);
                return;
            }
            Err(Malformed::NoOrigDst) => {
                stats.udp_drop_no_origdst.fetch_add(1, Relaxed);
                core.log_limited(format_args!(
                    "udp: datagram without an original destination dropped"
                ));
                return;
            }
            Err(Malformed::BadSource) => {
                stats.udp_drop_bad_source.fetch_add(1, Relaxed);
                return;
            }
        };
        let cone = core.cfg.udp_nat == UdpNat::FullCone;
        let key = FlowKey {
            client: ClientAddr(client),
            // Full cone: one flow per client source, whatever it sends to.
            orig_dst: OrigDst(if cone { cone_key(client) } else { orig }),
        };
        let now = core.batch_ms();
        // While stopping this can still open a flow (a datagram delivered before the
        // cancel of the tproxy receive took effect, or taken over by a successor in
        // the same instant): it is armed and drains like the others, so its answer
        // still reaches the client.
        let id = match self.flows.lookup(&key) {
            Some(id) => id,
            None => match self.open_flow(core, key, orig, now) {
                Some(id) => id,
                None => return,
            },
        };
        let to = if cone {
            match self.cone_target(core, id, key.client, orig) {
                Some(t) => Some(t),
                None => return, // dropped by the policy (counted)
            }
        } else {
            None
        };
        let fd = self.flows.get(id).expect("live flow").upstream.as_raw_fd();
        self.flows.touch(id, now, Dir::ToServer);
        let route = (id, Dir::ToServer, fd, to);
        self.relay(core, route, Some((b, c.result as usize)), payload);
    }

    /// Relays one datagram of a flow: `buf` is its receive buffer (id, length; `None`
    /// for an empty datagram) and `payload` its place in it. Gathered into this
    /// batch's run for the route, or, when it cannot join one, sent at once after
    /// the route's run.
    fn relay(
        &mut self,
        core: &mut Core,
        (id, dir, fd, to): (FlowId, Dir, RawFd, Option<SocketAddr>),
        buf: Option<(u16, usize)>,
        payload: Range<usize>,
    ) {
        // The family it leaves by (the target's to the server, the client's back),
        // and whether the flow may gather.
        let Some((v6, gso)) = self
            .flows
            .get(id)
            .map(|f| (to.unwrap_or(f.target).is_ipv6(), self.gso && !f.no_gso))
        else {
            return;
        };
        let data = match buf {
            Some((b, len)) => &core.ring.buffers(GROUP_UDP).data(b, len)[payload.clone()],
            None => &[][..],
        };
        if gso && batch::gatherable(data.len(), v6) {
            if let Some(first) = self.batch.push(id, dir, fd, to, data) {
                self.send_run(core, first);
            }
            return;
        }
        if let Some(first) = self.batch.take_route(id, dir, fd, to) {
            self.send_run(core, first);
        }
        // Re-borrow: sending the run needed `core` mutably.
        let data = match buf {
            Some((b, len)) => &core.ring.buffers(GROUP_UDP).data(b, len)[payload],
            None => &[][..],
        };
        let mut sent = Sent::default();
        send_one(fd, to.as_ref(), data, &mut sent);
        self.sent(core, id, dir, sent);
    }

    /// Sends every run of this completion batch.
    pub fn end_of_batch(&mut self, core: &mut Core) {
        if self.batch.is_empty() {
            return;
        }
        for run in self.batch.take_all() {
            self.send_run(core, run);
        }
    }

    /// Sends a run of a live flow and accounts for it.
    fn send_run(&mut self, core: &mut Core, run: Run) {
        let no_gso = self.flows.get(run.flow).is_none_or(|f| f.no_gso);
        let sent = transmit(core, &run, self.gso && !no_gso);
        let (id, dir) = (run.flow, run.dir);
        self.batch.recycle(run);
        self.sent(core, id, dir, sent);
    }

    /// Counts what a send achieved, for the flow and the core; a lasting error to
    /// the server retires the flow (the next datagram opens a new one).
    fn sent(&mut self, core: &mut Core, id: FlowId, dir: Dir, sent: Sent) {
        count_sent(core, dir, &sent);
        let Some(f) = self.flows.get_mut(id) else {
            return;
        };
        account(f, dir, &sent);
        let target = f.target;
        let Some(e) = sent.err else {
            return;
        };
        let key = self.flows.key_of(id).expect("live flow");
        match dir {
            Dir::ToServer => {
                core.log_limited(format_args!("udp: send to {target}: {e}"));
                if is_lasting_send_error(&e) {
                    if let Some(f) = self.flows.remove(id) {
                        self.retire(core, f, FlowEnd::SendError);
                    }
                }
            }
            Dir::ToClient => {
                core.log_limited(format_args!("udp: reply to {}: {e}", key.client.0));
            }
        }
    }

    /// The policy's verdict for `client` sending to `orig`: where it goes, or `None`
    /// (dropped, counted).
    fn verdict(
        core: &mut Core,
        client: ClientAddr,
        orig: SocketAddr,
    ) -> Option<(SocketAddr, Option<RuleName>)> {
        let meta = FlowMeta {
            client,
            orig_dst: OrigDst(orig),
        };
        let decided = core.policy.udp(&meta);
        if let Some(rule) = &decided.rule {
            core.stats.count_rule(rule, 1, 0);
        }
        let target = match decided.verdict {
            UdpVerdict::Relay => orig,
            UdpVerdict::RelayTo(to) => to,
            UdpVerdict::Drop => {
                core.stats.udp_drop_policy.fetch_add(1, Relaxed);
                return None;
            }
        };
        if target.port() == core.cfg.port && sys::is_local_address(target.ip()) {
            // Addressed to the engine's own port on this host: would loop forever.
            core.stats.udp_drop_loop.fetch_add(1, Relaxed);
            return None;
        }
        Some((target, decided.rule))
    }

    /// Creates the flow for `key`, whose first datagram goes to `orig`: policy,
    /// upstream socket, reply socket, recv.
    fn open_flow(
        &mut self,
        core: &mut Core,
        key: FlowKey,
        orig: SocketAddr,
        now: u64,
    ) -> Option<FlowId> {
        let (target, rule) = Self::verdict(core, key.client, orig)?;
        let cone = core.cfg.udp_nat == UdpNat::FullCone;
        let credit = self.take_credit(core, true)?;
        let upstream = match upstream::socket(
            Type::DGRAM,
            target,
            key.client.0,
            core.cfg.source,
            core.cfg.mark,
        ) {
            Ok((s, bound)) => {
                if bound == Bound::Router && core.cfg.source != SourceMode::Router {
                    core.stats.source_fallback.fetch_add(1, Relaxed);
                }
                s
            }
            Err(e) => {
                let counter = match e {
                    UpstreamError::Source(_) => &core.stats.udp_drop_source,
                    UpstreamError::Socket(_) => &core.stats.udp_drop_no_socket,
                };
                counter.fetch_add(1, Relaxed);
                core.log_limited(format_args!("udp: upstream socket to {target}: {e}"));
                return None;
            }
        };
        let connected = if cone {
            // Unconnected, but with its port (the mapping) fixed now, so that every
            // destination sees the same one from the first datagram on.
            match SockRef::from(&upstream).local_addr() {
                Ok(a) if a.as_socket().is_some_and(|s| s.port() != 0) => Ok(()),
                _ => SockRef::from(&upstream).bind(&sys::unspecified(target.is_ipv6(), 0).into()),
            }
        } else {
            SockRef::from(&upstream).connect(&target.into())
        };
        if let Err(e) = connected {
            core.stats.udp_drop_no_socket.fetch_add(1, Relaxed);
            core.log_limited(format_args!("udp: upstream socket to {target}: {e}"));
            return None;
        }
        // Symmetric: the one destination answers from itself. Full cone: the first
        // destination's verdict is the first entry of the flow's list. The new flow
        // is not in the table yet: an eviction for a credit cannot take it.
        if !self.take_reply(core, orig, true) {
            return None;
        }
        let cone = cone.then(|| {
            let mut msghdr = sys::zeroed_msghdr();
            msghdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
            Box::new(Cone {
                msghdr,
                dsts: vec![(orig, Some(target))],
                remotes: Vec::new(),
            })
        });
        let flow = Flow {
            upstream,
            recv_ud: 0,
            armed: false,
            target,
            started_us: core.now_us(),
            bytes: [0; 2],
            dgrams: [0; 2],
            cone,
            rule,
            no_gso: false,
            id: None,
            _credit: credit,
        };
        let id = match self.flows.insert(key, flow, now) {
            InsertOutcome::Inserted(id) => id,
            InsertOutcome::Evicted { id, evicted } => {
                self.retire(core, evicted, FlowEnd::Evicted);
                id
            }
            InsertOutcome::Occupied { id, value } => {
                // Cannot happen (looked up first); undo what was taken above.
                self.release_refs(core, &key, &value);
                drop(value);
                id
            }
        };
        core.stats.udp_flows_created.fetch_add(1, Relaxed);
        core.stats.udp_flows_active.fetch_add(1, Relaxed);
        let ud = Token::new(Op::UdpUpstream, id.index, id.generation).encode();
        let f = self.flows.get_mut(id).expect("inserted");
        f.recv_ud = ud;
        f.id = Some(id);
        self.arm_flow(core, id);
        Some(id)
    }

    /// Full cone: where a datagram of flow `id` to `orig` goes (asking the policy
    /// the first time the client sends there), or `None` if it is dropped.
    fn cone_target(
        &mut self,
        core: &mut Core,
        id: FlowId,
        client: ClientAddr,
        orig: SocketAddr,
    ) -> Option<SocketAddr> {
        let cone = self.flows.get_mut(id)?.cone.as_mut()?;
        if let Some((_, t)) = cone.dsts.iter().find(|(d, _)| *d == orig) {
            if t.is_none() {
                core.stats.udp_drop_policy.fetch_add(1, Relaxed);
            }
            return *t;
        }
        let target = Self::verdict(core, client, orig).map(|(t, _)| t);
        if target.is_some() && !self.take_reply(core, orig, false) {
            return None;
        }
        let cone = self.flows.get_mut(id)?.cone.as_mut()?;
        if let Some((old, t)) = push_bounded(&mut cone.dsts, (orig, target)) {
            core.stats.udp_cone_evictions.fetch_add(1, Relaxed);
            if t.is_some() {
                self.release_reply(core, OrigDst(old));
            }
        }
        target
    }

    /// Full cone: the address a datagram from `remote` must reach the client from:
    /// the original destination the client sent to when `remote` is where that went
    /// (a redirect answers as the address the client talked to), else `remote`
    /// itself, taking a reply socket on it the first time. `None`: no reply socket.
    fn cone_reply_from(
        &mut self,
        core: &mut Core,
        id: FlowId,
        remote: SocketAddr,
    ) -> Option<SocketAddr> {
        let cone = self.flows.get_mut(id)?.cone.as_mut()?;
        if let Some((orig, _)) = cone.dsts.iter().find(|(_, t)| *t == Some(remote)) {
            return Some(*orig);
        }
        if cone.remotes.contains(&remote) {
            return Some(remote);
        }
        if !self.take_reply(core, remote, false) {
            return None;
        }
        let cone = self.flows.get_mut(id)?.cone.as_mut()?;
        if let Some(old) = push_bounded(&mut cone.remotes, remote) {
            core.stats.udp_cone_evictions.fetch_add(1, Relaxed);
            self.release_reply(core, OrigDst(old));
        }
        Some(remote)
    }

    /// One credit of the fd pool for a new socket. When the pool has none and
    /// `evict` allows it, this core's least recently used flow is evicted (counted
    /// as evicted) to give its credits back: its upstream socket's at once (its fd
    /// closes while its recv is cancelled, see `closing`), its reply socket's if no
    /// other flow shares it. When even that frees none (this core has no flow, the
    /// other cores hold the credits) the datagram is dropped
    /// (`udp_drop_no_fd_credit`). Only where the flow asking is not in the table yet
    /// may it evict: a live flow could otherwise evict itself.
    fn take_credit(&mut self, core: &mut Core, evict: bool) -> Option<Credit> {
        if let Some(c) = core.cfg.fds.take(1, Class::Udp) {
            return Some(c);
        }
        if evict {
            if let Some(lru) = self.flows.evict_lru() {
                self.retire(core, lru, FlowEnd::Evicted);
                if let Some(c) = core.cfg.fds.take(1, Class::Udp) {
                    return Some(c);
                }
            }
        }
        core.stats.udp_drop_no_fd_credit.fetch_add(1, Relaxed);
        None
    }

    /// Takes a reference on the reply socket that answers from `from` (with a new
    /// socket's credit, `evict` as in [`Self::take_credit`]); on failure (fd
    /// credits, fds, permissions) counts and logs it and returns false.
    fn take_reply(&mut self, core: &mut Core, from: SocketAddr, evict: bool) -> bool {
        let credit = if self.replies.needs_socket(&OrigDst(from)) {
            match self.take_credit(core, evict) {
                Some(c) => Some(c),
                None => return false,
            }
        } else {
            None
        };
        match self
            .replies
            .acquire(&core.stats, OrigDst(from), core.cfg.mark, credit)
        {
            Ok(()) => true,
            Err(e) => {
                core.stats.udp_drop_no_socket.fetch_add(1, Relaxed);
                core.log_limited(format_args!("udp: reply socket on {from}: {e}"));
                false
            }
        }
    }

    /// Drops the reply socket references a flow holds.
    fn release_refs(&mut self, core: &mut Core, key: &FlowKey, flow: &Flow) {
        match &flow.cone {
            None => self.release_reply(core, key.orig_dst),
            Some(cone) => {
                for (d, t) in &cone.dsts {
                    if t.is_some() {
                        self.release_reply(core, OrigDst(*d));
                    }
                }
                for r in &cone.remotes {
                    self.release_reply(core, OrigDst(*r));
                }
            }
        }
    }

    /// Drops one reference on a reply socket. The last one closes it, so runs that
    /// would leave by it are sent first: its fd number may be reused at once.
    fn release_reply(&mut self, core: &mut Core, from: OrigDst) {
        if let Some(fd) = self.replies.fd(&from).filter(|_| !self.batch.is_empty()) {
            for run in self.batch.take_where(|r| r.fd == fd) {
                self.send_run(core, run);
            }
        }
        self.replies.release(&core.stats, from);
    }

    /// Takes a removed flow out of service: sends what it gathered in this batch,
    /// counts why, cancels its recv and closes its socket's fd (the recv keeps its
    /// own reference to the socket until the cancel completes).
    fn retire(&mut self, core: &mut Core, (key, mut flow): (FlowKey, Flow), why: FlowEnd) {
        // Its datagrams of this batch leave before its socket (and maybe its reply
        // socket) closes.
        if !self.batch.is_empty() {
            for run in self.batch.take_where(|r| Some(r.flow) == flow.id) {
                let sent = transmit(core, &run, self.gso && !flow.no_gso);
                count_sent(core, run.dir, &sent);
                account(&mut flow, run.dir, &sent);
                self.batch.recycle(run);
            }
        }
        core.stats.udp_flows_active.fetch_sub(1, Relaxed);
        core.stats.count_flow_end(why, 1);
        self.release_refs(core, &key, &flow);
        if let Some(rule) = &flow.rule {
            core.stats
                .count_rule(rule, 0, flow.bytes[0] + flow.bytes[1]);
        }
        let verdict = if flow.cone.is_some() || flow.target == key.orig_dst.0 {
            "relay"
        } else {
            "redirect"
        };
        core.log_flow(|ended, now_us| FlowRecord {
            proto: FlowProto::Udp,
            ended,
            duration: Duration::from_micros(now_us.saturating_sub(flow.started_us)),
            client: key.client.0,
            orig_dst: key.orig_dst.0,
            upstream: flow.target,
            name: None,
            rule: flow.rule.clone(),
            verdict,
            bytes_c2s: flow.bytes[0],
            bytes_s2c: flow.bytes[1],
            dgrams: Some((flow.dgrams[0], flow.dgrams[1])),
            reason: why.name(),
            errno: None,
        });
        if flow.armed {
            core.cancel(flow.recv_ud);
            self.closing.insert(flow.recv_ud, flow.cone.take());
        }
        // Dropping `flow` closes the socket's fd and gives its credit back.
    }

    fn on_server_datagram(&mut self, core: &mut Core, tok: Token, c: Completion, bid: Option<u16>) {
        let Some(id) = self.live_flow(tok) else {
            // A retired flow's recv: close its socket on the final completion.
            if !c.more() {
                self.closing.remove(&tok.encode());
            }
            return;
        };
        if !c.more() {
            if let Some(f) = self.flows.get_mut(id) {
                f.armed = false;
            }
            self.rearm.push(tok);
        }
        if c.result < 0 {
            recv_error(core, -c.result, "recv");
            return;
        }
        // A zero-length datagram picks no buffer (the kernel ends the multishot recv
        // with result 0): it is relayed as one, like the other direction does.
        if bid.is_none() && c.result != 0 {
            return;
        }
        let key = self.flows.key_of(id).expect("live flow");
        let stats = core.stats.clone();
        let (reply_from, range) = match self.flows.get(id).and_then(|f| f.cone.as_deref()) {
            None => (key.orig_dst.0, None),
            Some(cone) => {
                // Full cone: a recvmsg buffer; the name says which remote sent it.
                let Some(b) = bid else { return };
                let data = core.ring.buffers(GROUP_UDP).data(b, c.result as usize);
                let Ok(out) = types::RecvMsgOut::parse(data, &cone.msghdr) else {
                    stats.udp_drop_truncated.fetch_add(1, Relaxed);
                    return;
                };
                if out.is_payload_truncated() {
                    stats.udp_drop_truncated.fetch_add(1, Relaxed);
                    return;
                }
                let Some(remote) = cmsg::decode_sockaddr(out.name_data()) else {
                    stats.udp_drop_bad_source.fetch_add(1, Relaxed);
                    return;
                };
                let p = out.payload_data();
                let start = p.as_ptr() as usize - data.as_ptr() as usize;
                let range = start..start + p.len();
                match self.cone_reply_from(core, id, remote) {
                    Some(from) => (from, Some(range)),
                    None => return,
                }
            }
        };
        let Some(reply_fd) = self.replies.fd(&OrigDst(reply_from)) else {
            return;
        };
        let now = core.batch_ms();
        self.flows.touch(id, now, Dir::ToClient);
        let len = c.result.max(0) as usize;
        let buf = bid.map(|b| (b, len));
        let payload = range.unwrap_or(0..if buf.is_some() { len } else { 0 });
        let route = (id, Dir::ToClient, reply_fd, Some(key.client.0));
        self.relay(core, route, buf, payload);
    }

    /// Once a second: expire idle flows; while stopping, quiet ones sooner, and all
    /// of them at the drain deadline.
    pub fn on_tick(&mut self, core: &mut Core) {
        let now = core.batch_ms();
        let mut out = std::mem::take(&mut self.expired);
        if self.stop_deadline.is_some_and(|t| core.tick >= t) {
            for f in self.flows.drain_all() {
                self.retire(core, f, FlowEnd::Drain);
            }
        } else {
            // While stopping, an answered single exchange has nothing left to wait
            // for, and any other flow ends once quiet for a second (an answer to
            // what was forwarded comes within that, or the client asks again, and
            // that new datagram bypasses a fail-open engine or goes to its successor).
            let (idle_ms, single_ms) = if core.stopping {
                (self.idle_ms.min(self.single_ms).min(STOPPING_QUIET_MS), 0)
            } else {
                (self.idle_ms, self.single_ms)
            };
            let n = self.flows.expire(now, idle_ms, single_ms, &mut out);
            let mut ends = std::iter::repeat_n(FlowEnd::SingleExchange, n.single_exchange)
                .chain(std::iter::repeat_n(FlowEnd::Idle, n.idle));
            // `out` is in LRU order, not by kind; only the counts per kind matter.
            for f in out.drain(..) {
                let why = ends.next().unwrap_or(FlowEnd::Idle);
                self.retire(core, f, why);
            }
        }
        self.expired = out;
    }

    /// Stops receiving from clients and starts the drain of the flows.
    pub fn stop(&mut self, core: &mut Core) {
        self.stop_deadline = Some(core.tick + core.cfg.drain_timeout_s);
        for i in 0..self.sockets.len() {
            if self.sockets[i].armed {
                core.cancel(Token::new(Op::UdpListen, i as u32, 0).encode());
            } else {
                self.sockets[i].fd = None;
            }
        }
    }

    /// Nothing left in flight or open (for the final wind-down).
    pub fn is_drained(&self) -> bool {
        self.flows.is_empty() && self.closing.is_empty() && self.sockets.iter().all(|s| !s.armed)
    }
}

/// Appends `item`, first taking out (and returning) the oldest entry when `v`
/// already holds [`CONE_PEERS`].
fn push_bounded<T>(v: &mut Vec<T>, item: T) -> Option<T> {
    let evicted = (v.len() >= CONE_PEERS).then(|| v.remove(0));
    v.push(item);
    evicted
}

/// The flow key's destination part for a full-cone flow: one flow per client
/// source, whatever it sends to.
fn cone_key(client: SocketAddr) -> SocketAddr {
    sys::unspecified(client.is_ipv6(), 0)
}

/// Why a received datagram cannot be relayed.
enum Malformed {
    /// Payload larger than the buffer, or the buffer too short for the header.
    Truncated,
    /// Control data truncated, or no original destination in it.
    NoOrigDst,
    /// The source address could not be decoded.
    BadSource,
}

/// Splits a multishot recvmsg buffer into (client, original destination, payload
/// range within `data`).
fn parse_datagram(
    data: &[u8],
    msghdr: &libc::msghdr,
) -> Result<(SocketAddr, SocketAddr, std::ops::Range<usize>), Malformed> {
    let out = types::RecvMsgOut::parse(data, msghdr).map_err(|_| Malformed::Truncated)?;
    if out.is_payload_truncated() {
        return Err(Malformed::Truncated);
    }
    let flags = if out.is_control_data_truncated() {
        libc::MSG_CTRUNC
    } else {
        0
    };
    let meta = cmsg::decode(out.control_data(), flags);
    let orig = meta
        .orig_dst
        .filter(|_| !meta.truncated_ctrl)
        .ok_or(Malformed::NoOrigDst)?;
    let client = cmsg::decode_sockaddr(out.name_data()).ok_or(Malformed::BadSource)?;
    let payload = out.payload_data();
    let start = payload.as_ptr() as usize - data.as_ptr() as usize;
    Ok((client, orig, start..start + payload.len()))
}

/// Sends a run: with GSO in one call when it holds more than one datagram (and
/// `gso`), else one call per datagram. A GSO send the kernel refuses is counted
/// and redone datagram by datagram.
fn transmit(core: &mut Core, run: &Run, gso: bool) -> Sent {
    let mut sent = Sent::default();
    if run.count > 1 && gso {
        match sys::send_segments(run.fd, &run.buf, run.seg as u16, run.to.as_ref()) {
            Ok(_) => {
                core.stats.udp_gso_sends.fetch_add(1, Relaxed);
                sent.dgrams = run.count as u64;
                sent.bytes = run.buf.len() as u64;
                return sent;
            }
            Err(e) if is_gso_refusal(&e) => {
                core.stats.udp_gso_fallbacks.fetch_add(1, Relaxed);
                core.log_limited(format_args!(
                    "udp: GSO send of {} datagrams of {} bytes refused ({e}); the flow \
                     sends them one by one",
                    run.count, run.seg
                ));
                sent.gso_refused = true;
            }
            Err(e) => {
                sent.dropped = run.count as u64;
                sent.err = Some(e);
                return sent;
            }
        }
    }
    for d in run.datagrams() {
        send_one(run.fd, run.to.as_ref(), d, &mut sent);
    }
    sent
}

/// Sends one datagram with a plain `send`/`sendto` and adds the outcome to `sent`.
fn send_one(fd: RawFd, to: Option<&SocketAddr>, d: &[u8], sent: &mut Sent) {
    let result = match to {
        Some(t) => sys::send_to(fd, d, t),
        None => sys::send(fd, d),
    };
    match result {
        Ok(_) => {
            sent.dgrams += 1;
            sent.bytes += d.len() as u64;
        }
        Err(e) => {
            sent.dropped += 1;
            sent.err = Some(e);
        }
    }
}

/// The core's counters for a send.
fn count_sent(core: &Core, dir: Dir, sent: &Sent) {
    let s = &core.stats;
    let (dgrams, bytes, drops) = match dir {
        Dir::ToServer => (
            &s.udp_dgrams_c2s,
            &s.udp_bytes_c2s,
            &s.udp_drop_send_upstream,
        ),
        Dir::ToClient => (&s.udp_dgrams_s2c, &s.udp_bytes_s2c, &s.udp_drop_send_client),
    };
    if sent.dgrams > 0 {
        dgrams.fetch_add(sent.dgrams, Relaxed);
        bytes.fetch_add(sent.bytes, Relaxed);
    }
    if sent.dropped > 0 {
        drops.fetch_add(sent.dropped, Relaxed);
    }
}

/// A flow's own counters for a send (for the flow log).
fn account(f: &mut Flow, dir: Dir, sent: &Sent) {
    let i = match dir {
        Dir::ToServer => 0,
        Dir::ToClient => 1,
    };
    f.bytes[i] += sent.bytes;
    f.dgrams[i] += sent.dgrams;
    f.no_gso |= sent.gso_refused;
}

/// A GSO send the kernel will not make on this route, where datagrams sent one by
/// one do go: a segment above the path MTU (EMSGSIZE; EINVAL on older kernels), a
/// socket without checksums (EINVAL), an IPsec route or a device that cannot
/// checksum (EIO), or no GSO at all (EOPNOTSUPP, ENOPROTOOPT).
fn is_gso_refusal(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMSGSIZE)
            | Some(libc::EINVAL)
            | Some(libc::EIO)
            | Some(libc::EOPNOTSUPP)
            | Some(libc::ENOPROTOOPT)
    )
}

/// A send error after which the flow's upstream socket is of no more use.
fn is_lasting_send_error(e: &io::Error) -> bool {
    !matches!(
        e.raw_os_error(),
        // Transient: a full socket buffer or device queue, or an ICMP error of an
        // earlier datagram reported on this one (the server may come up).
        Some(libc::EAGAIN)
            | Some(libc::ENOBUFS)
            | Some(libc::ENOMEM)
            | Some(libc::ECONNREFUSED)
            | Some(libc::EHOSTUNREACH)
            | Some(libc::ENETUNREACH)
            | Some(libc::EINTR)
    )
}

/// A failed (or finished) multishot receive; the caller re-arms it.
fn recv_error(core: &mut Core, errno: i32, op: &str) {
    match errno {
        // Every provided buffer was in use: re-armed once this batch returned them.
        libc::ENOBUFS => {
            core.stats.udp_enobufs.fetch_add(1, Relaxed);
        }
        libc::ECANCELED => {}
        // ICMP port/host unreachable reported on a connected upstream socket: the
        // server is not there (yet); the flow stays and expires if nothing comes back.
        libc::ECONNREFUSED | libc::EHOSTUNREACH | libc::ENETUNREACH => {}
        e => core.log_limited(format_args!(
            "udp: {op}: {}",
            io::Error::from_raw_os_error(e)
        )),
    }
}
