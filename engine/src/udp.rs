//! Transparent UDP: batched receive, a bounded flow table, replies from the
//! original destination.
//!
//! Design, per core:
//!
//! * Two tproxy sockets (v4, v6) with `IP_TRANSPARENT`, `SO_REUSEPORT` and
//!   `IP_RECVORIGDSTADDR`/`IPV6_RECVORIGDSTADDR`, each with one multishot `RECVMSG`
//!   over a provided buffer ring: one SQE yields a stream of datagrams, each with its
//!   source (the client) and the original destination in a cmsg.
//! * A flow per (client, original destination) owns one upstream socket: marked
//!   (`SO_MARK`), connected to the original destination, with a multishot `RECV` on
//!   the same buffer ring. The connected socket demultiplexes the server's answers to
//!   the right client without any lookup by address.
//! * Replies to the client must come from the original destination's address AND
//!   port. `IP_PKTINFO` can only set the source address (kernel.md, pitfall 5), so
//!   replies go out through a transparent reply socket bound to the original
//!   destination, shared by every flow towards that destination on this core and
//!   reference-counted. File descriptors are therefore bounded by
//!   `flows + distinct destinations`, and the flow table is bounded (LRU eviction) —
//!   a flood of new source ports evicts old flows instead of exhausting fds.
//! * Datagrams are forwarded with non-blocking `send`/`sendto` right in the
//!   completion handler, so each receive buffer goes back to the kernel at once.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use io_uring::{opcode, types};
use socket2::{Domain, Protocol, Socket, Type};

use crate::cmsg;
use crate::config::Config;
use crate::flows::{ClientAddr, Dir, FlowId, FlowKey, FlowTable, InsertOutcome, OrigDst};
use crate::ring::{BufRing, Completion, Ring};
use crate::sys;
use crate::token::{Op, Token, GENERATION_MASK};
use crate::worker::{Worker, GROUP_UDP};

/// Largest UDP payload (IPv6 jumbograms aside): 65535 - 8 byte UDP header.
const MAX_PAYLOAD: usize = 65527;
/// Room for the `io_uring_recvmsg_out` header (16), the name (sockaddr_in6, 28) and
/// the control data in front of the payload, rounded up.
const RECVMSG_OVERHEAD: usize = 256;
/// Provided buffers shared by the tproxy sockets and every upstream socket of a core.
/// A buffer is held only while its datagram is being forwarded (synchronously), so
/// this bounds one batch, not the number of flows.
const BUFFERS: u16 = 256;

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
}

struct ReplySocket {
    fd: OwnedFd,
    refs: u32,
}

/// The UDP part of a worker.
pub struct UdpState {
    bufs: BufRing,
    sockets: Vec<TproxySocket>,
    flows: FlowTable<Flow>,
    replies: HashMap<OrigDst, ReplySocket>,
    /// Upstream sockets of removed flows whose recv is being cancelled, by the
    /// recv's `user_data`; closed when its final completion arrives.
    closing: HashMap<u64, OwnedFd>,
    /// Tproxy sockets or flows whose multishot recv ended and must be re-armed
    /// after the buffers of this batch are back in the ring.
    rearm: Vec<Token>,
    expired: Vec<(FlowKey, Flow)>,
    started: Instant,
    idle_ms: u64,
    single_ms: u64,
    mark: u32,
    port: u16,
    stopping: bool,
}

fn tproxy_socket(v6: bool, port: u16) -> io::Result<OwnedFd> {
    let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
    let s = Socket::new(domain, Type::DGRAM.nonblocking(), Some(Protocol::UDP))?;
    if v6 {
        s.set_only_v6(true)?;
        s.set_ip_transparent_v6(true)?;
    } else {
        s.set_ip_transparent_v4(true)?;
    }
    sys::set_recv_orig_dst(s.as_fd(), v6)?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    // Bursts land here while the worker is busy with other completions; a queue
    // beyond the default rmem_max (208 KiB, ~150 full-size datagrams) absorbs them.
    let _ = sys::set_recv_buffer_force(s.as_fd(), 8 << 20);
    s.bind(&sys::unspecified(v6, port).into())?;
    Ok(s.into())
}

/// A marked socket connected to the original destination.
fn upstream_socket(orig: &SocketAddr, mark: u32) -> io::Result<OwnedFd> {
    let domain = if orig.is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    };
    let s = Socket::new(domain, Type::DGRAM.nonblocking(), Some(Protocol::UDP))?;
    if mark != 0 {
        s.set_mark(mark)?;
    }
    s.connect(&(*orig).into())?;
    Ok(s.into())
}

/// A transparent socket bound to the original destination, to answer from it.
/// Non-local bind works because of `IP_TRANSPARENT`; `SO_REUSEADDR` lets every core
/// (and a restarted engine) bind the same address. Ports below 1024 need
/// CAP_NET_BIND_SERVICE.
fn reply_socket(orig: &SocketAddr, mark: u32) -> io::Result<OwnedFd> {
    let s = if orig.is_ipv6() {
        let s = Socket::new(Domain::IPV6, Type::DGRAM.nonblocking(), Some(Protocol::UDP))?;
        s.set_only_v6(true)?;
        s.set_ip_transparent_v6(true)?;
        s
    } else {
        let s = Socket::new(Domain::IPV4, Type::DGRAM.nonblocking(), Some(Protocol::UDP))?;
        s.set_ip_transparent_v4(true)?;
        s
    };
    s.set_reuse_address(true)?;
    if mark != 0 {
        s.set_mark(mark)?;
    }
    // It never needs to receive; a tiny queue bounds what could be queued on it.
    let _ = s.set_recv_buffer_size(1);
    s.bind(&(*orig).into())?;
    Ok(s.into())
}

impl UdpState {
    /// Opens the tproxy sockets and registers the buffer ring.
    pub fn new(ring: &Ring, cfg: &Config) -> Result<UdpState, String> {
        let bufs = BufRing::new(ring, GROUP_UDP, BUFFERS, MAX_PAYLOAD + RECVMSG_OVERHEAD)
            .map_err(|e| format!("registering the UDP buffer ring: {e}"))?;
        let mut sockets = Vec::new();
        for v6 in crate::worker::families(cfg) {
            let fd = tproxy_socket(v6, cfg.port)
                .map_err(|e| format!("socket on {}: {e}", sys::unspecified(v6, cfg.port)))?;
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
        Ok(UdpState {
            bufs,
            sockets,
            flows: FlowTable::new(cfg.udp_max_flows_per_core),
            replies: HashMap::new(),
            closing: HashMap::new(),
            rearm: Vec::new(),
            expired: Vec::new(),
            started: Instant::now(),
            idle_ms: cfg.udp_idle_timeout_s * 1000,
            single_ms: cfg.udp_single_exchange_timeout_s * 1000,
            mark: cfg.mark,
            port: cfg.port,
            stopping: false,
        })
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Arms the multishot recvmsg of every tproxy socket.
    pub fn arm_all(&mut self, w: &mut Worker) {
        for i in 0..self.sockets.len() {
            self.arm_socket(w, i);
        }
    }

    fn arm_socket(&mut self, w: &mut Worker, i: usize) {
        let s = &mut self.sockets[i];
        let Some(fd) = s.fd.as_ref() else {
            return;
        };
        if s.armed || self.stopping {
            return;
        }
        s.armed = true;
        let sqe = opcode::RecvMsgMulti::new(
            types::Fd(fd.as_raw_fd()),
            &*s.msghdr as *const libc::msghdr,
            self.bufs.group(),
        )
        .build()
        .user_data(Token::new(Op::UdpListen, i as u32, 0).encode());
        w.submit(sqe);
    }

    fn arm_flow(&mut self, w: &mut Worker, id: FlowId) {
        let group = self.bufs.group();
        let Some(flow) = self.flows.get_mut(id) else {
            return;
        };
        if flow.armed || self.stopping {
            return;
        }
        flow.armed = true;
        let sqe = opcode::RecvMulti::new(types::Fd(flow.upstream.as_raw_fd()), group)
            .build()
            .user_data(flow.recv_ud);
        w.submit(sqe);
    }

    /// Re-arms receives that ended in this batch (recycled buffers are already
    /// visible to the kernel: `BufRing::recycle` publishes at once).
    fn rearm_pending(&mut self, w: &mut Worker) {
        let pending = std::mem::take(&mut self.rearm);
        for t in pending {
            match t.op {
                Op::UdpListen => self.arm_socket(w, t.slot as usize),
                _ => {
                    if let Some(id) = self.live_flow(t) {
                        self.arm_flow(w, id);
                    }
                }
            }
        }
    }

    fn live_flow(&self, t: Token) -> Option<FlowId> {
        let id = self.flows.id_at(t.slot)?;
        (id.generation & GENERATION_MASK == t.generation).then_some(id)
    }

    /// Dispatches a UDP completion.
    pub fn on_completion(&mut self, w: &mut Worker, tok: Token, c: Completion) {
        let bid = c.buffer_id();
        match tok.op {
            Op::UdpListen => self.on_client_datagram(w, tok, c, bid),
            _ => self.on_server_datagram(w, tok, c, bid),
        }
        if let Some(b) = bid {
            self.bufs.recycle(b);
        }
        if !self.rearm.is_empty() {
            self.rearm_pending(w);
        }
    }

    fn on_client_datagram(&mut self, w: &mut Worker, tok: Token, c: Completion, bid: Option<u16>) {
        let i = tok.slot as usize;
        if !c.more() {
            self.sockets[i].armed = false;
            if self.stopping {
                self.sockets[i].fd = None;
            } else {
                self.rearm.push(tok);
            }
        }
        if c.result < 0 {
            recv_error(w, -c.result, "recvmsg");
            return;
        }
        let Some(b) = bid else {
            return;
        };
        let data = self.bufs.data(b, c.result as usize);
        let Ok(out) = types::RecvMsgOut::parse(data, &self.sockets[i].msghdr) else {
            w.stats.udp_drop_truncated.fetch_add(1, Relaxed);
            return;
        };
        if out.is_payload_truncated() {
            w.stats.udp_drop_truncated.fetch_add(1, Relaxed);
            return;
        }
        let flags = if out.is_control_data_truncated() {
            libc::MSG_CTRUNC
        } else {
            0
        };
        let meta = cmsg::decode(out.control_data(), flags);
        let Some(orig) = meta.orig_dst.filter(|_| !meta.truncated_ctrl) else {
            w.stats.udp_drop_no_origdst.fetch_add(1, Relaxed);
            w.log_limited(format_args!(
                "udp: datagram without an original destination dropped"
            ));
            return;
        };
        let Some(client) = cmsg::decode_sockaddr(out.name_data()) else {
            w.stats.udp_drop_bad_source.fetch_add(1, Relaxed);
            return;
        };
        let payload_len = out.payload_data().len();
        let key = FlowKey {
            client: ClientAddr(client),
            orig_dst: OrigDst(orig),
        };
        let now = self.now_ms();
        let id = match self.flows.lookup(&key) {
            Some(id) => id,
            None => match self.open_flow(w, key, now) {
                Some(id) => id,
                None => return,
            },
        };
        let fd = self.flows.get(id).expect("live flow").upstream.as_raw_fd();
        // Re-borrow the payload: `open_flow` needed `self` mutably.
        let data = self.bufs.data(b, c.result as usize);
        let out = types::RecvMsgOut::parse(data, &self.sockets[i].msghdr).expect("parsed above");
        match sys::send(fd, out.payload_data()) {
            Ok(_) => {
                w.stats.udp_dgrams_c2s.fetch_add(1, Relaxed);
                w.stats.udp_bytes_c2s.fetch_add(payload_len as u64, Relaxed);
            }
            Err(e) => {
                w.stats.udp_drop_send_upstream.fetch_add(1, Relaxed);
                w.log_limited(format_args!("udp: send to {orig}: {e}"));
            }
        }
        self.flows.touch(id, now, Dir::ToServer);
    }

    /// Creates the flow for `key`: upstream socket, reply socket reference, recv.
    fn open_flow(&mut self, w: &mut Worker, key: FlowKey, now: u64) -> Option<FlowId> {
        let orig = key.orig_dst.0;
        if orig.port() == self.port && sys::is_local_address(orig.ip()) {
            // Addressed to the engine's own port on this host: would loop forever.
            w.stats.udp_drop_loop.fetch_add(1, Relaxed);
            return None;
        }
        let upstream = match upstream_socket(&orig, self.mark) {
            Ok(s) => s,
            Err(e) => {
                w.stats.udp_drop_no_socket.fetch_add(1, Relaxed);
                w.log_limited(format_args!("udp: upstream socket to {orig}: {e}"));
                return None;
            }
        };
        if let Err(e) = self.acquire_reply(w, key.orig_dst) {
            w.stats.udp_drop_no_socket.fetch_add(1, Relaxed);
            w.log_limited(format_args!("udp: reply socket on {orig}: {e}"));
            return None;
        }
        let flow = Flow {
            upstream,
            recv_ud: 0,
            armed: false,
        };
        let id = match self.flows.insert(key, flow, now) {
            InsertOutcome::Inserted(id) => id,
            InsertOutcome::Evicted { id, evicted } => {
                w.stats.udp_flows_evicted.fetch_add(1, Relaxed);
                self.retire(w, evicted);
                id
            }
            InsertOutcome::Occupied { id, value } => {
                // Cannot happen (looked up first); undo the reference taken above.
                drop(value);
                self.release_reply(w, key.orig_dst);
                id
            }
        };
        w.stats.udp_flows_created.fetch_add(1, Relaxed);
        w.stats.udp_flows_active.fetch_add(1, Relaxed);
        let ud = Token::new(Op::UdpUpstream, id.index, id.generation).encode();
        self.flows.get_mut(id).expect("inserted").recv_ud = ud;
        self.arm_flow(w, id);
        Some(id)
    }

    fn acquire_reply(&mut self, w: &Worker, orig: OrigDst) -> io::Result<()> {
        if let Some(r) = self.replies.get_mut(&orig) {
            r.refs += 1;
            return Ok(());
        }
        let fd = reply_socket(&orig.0, self.mark)?;
        self.replies.insert(orig, ReplySocket { fd, refs: 1 });
        w.stats.udp_reply_sockets.fetch_add(1, Relaxed);
        Ok(())
    }

    fn release_reply(&mut self, w: &Worker, orig: OrigDst) {
        if let Some(r) = self.replies.get_mut(&orig) {
            r.refs -= 1;
            if r.refs == 0 {
                self.replies.remove(&orig);
                w.stats.udp_reply_sockets.fetch_sub(1, Relaxed);
            }
        }
    }

    /// Takes a removed flow out of service: cancel its recv, close it when done.
    fn retire(&mut self, w: &mut Worker, (key, flow): (FlowKey, Flow)) {
        w.stats.udp_flows_active.fetch_sub(1, Relaxed);
        self.release_reply(w, key.orig_dst);
        if flow.armed {
            let sqe = opcode::AsyncCancel::new(flow.recv_ud)
                .build()
                .user_data(Token::global(Op::Cancel).encode());
            w.submit(sqe);
            self.closing.insert(flow.recv_ud, flow.upstream);
        }
        // Not armed: dropping `flow` closes the socket now.
    }

    fn on_server_datagram(&mut self, w: &mut Worker, tok: Token, c: Completion, bid: Option<u16>) {
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
            recv_error(w, -c.result, "recv");
            return;
        }
        // A zero-length datagram picks no buffer (the kernel ends the multishot recv
        // with result 0): it is relayed as one, like the other direction does.
        if bid.is_none() && c.result != 0 {
            return;
        }
        let key = self.flows.key_of(id).expect("live flow");
        let Some(reply) = self.replies.get(&key.orig_dst) else {
            return;
        };
        let payload = match bid {
            Some(b) => self.bufs.data(b, c.result as usize),
            None => &[],
        };
        match sys::send_to(reply.fd.as_raw_fd(), payload, &key.client.0) {
            Ok(_) => {
                w.stats.udp_dgrams_s2c.fetch_add(1, Relaxed);
                w.stats
                    .udp_bytes_s2c
                    .fetch_add(payload.len() as u64, Relaxed);
            }
            Err(e) => {
                w.stats.udp_drop_send_client.fetch_add(1, Relaxed);
                w.log_limited(format_args!("udp: reply to {}: {e}", key.client.0));
            }
        }
        let now = self.now_ms();
        self.flows.touch(id, now, Dir::ToClient);
    }

    /// Expires idle flows (once a second).
    pub fn on_tick(&mut self, w: &mut Worker) {
        let now = self.now_ms();
        let mut expired = std::mem::take(&mut self.expired);
        let n = self
            .flows
            .expire(now, self.idle_ms, self.single_ms, &mut expired);
        w.stats.udp_flows_expired.fetch_add(n as u64, Relaxed);
        for f in expired.drain(..) {
            self.retire(w, f);
        }
        self.expired = expired;
    }

    /// Stops receiving and retires every flow.
    pub fn stop(&mut self, w: &mut Worker) {
        self.stopping = true;
        for i in 0..self.sockets.len() {
            if self.sockets[i].armed {
                let ud = Token::new(Op::UdpListen, i as u32, 0).encode();
                let sqe = opcode::AsyncCancel::new(ud)
                    .build()
                    .user_data(Token::global(Op::Cancel).encode());
                w.submit(sqe);
            } else {
                self.sockets[i].fd = None;
            }
        }
        for f in self.flows.drain_all() {
            self.retire(w, f);
        }
    }

    /// Nothing left in flight or open (for the final wind-down).
    pub fn is_drained(&self) -> bool {
        self.flows.is_empty() && self.closing.is_empty() && self.sockets.iter().all(|s| !s.armed)
    }
}

/// A failed (or finished) multishot receive; the caller re-arms it.
fn recv_error(w: &mut Worker, errno: i32, op: &str) {
    match errno {
        // Every provided buffer was in use: re-armed once this batch returned them.
        libc::ENOBUFS => {
            w.stats.udp_enobufs.fetch_add(1, Relaxed);
        }
        libc::ECANCELED => {}
        // ICMP port/host unreachable reported on a connected upstream socket: the
        // server is not there (yet); the flow stays and expires if nothing comes back.
        libc::ECONNREFUSED | libc::EHOSTUNREACH | libc::ENETUNREACH => {}
        e => w.log_limited(format_args!(
            "udp: {op}: {}",
            io::Error::from_raw_os_error(e)
        )),
    }
}
