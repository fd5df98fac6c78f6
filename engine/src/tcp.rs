//! TCP: transparent listeners, the life of a connection, and the relay drivers.
//!
//! Life of a connection:
//!
//! 1. The multishot accept of a listener yields a client fd. Its local address
//!    (`getsockname`) is the destination the client originally asked for.
//! 2. An upstream socket carrying the engine's `SO_MARK` connects there through the
//!    ring, linked to a `LINK_TIMEOUT`. Refused, unreachable or timed out: the client
//!    is reset at once (`SO_LINGER {1, 0}` + close), never left hanging.
//! 3. Both directions relay (splice or copy, see `relay.rs`) until each has passed its
//!    EOF on as `shutdown(SHUT_WR)`; an error on either side resets both.
//! 4. Closing cancels every op still armed on the two fds; the slot, fds, pipes and
//!    buffers are released only when the last of those ops has completed.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::Ordering::Relaxed;

use io_uring::{opcode, squeue, types};
use socket2::{Domain, Protocol, Socket, Type};

use crate::addrs::{ClientAddr, OrigDst};
use crate::config::RelayMode;
use crate::relay::{Direction, Io, State, Want};
use crate::ring::Completion;
use crate::sys;
use crate::token::{next_generation, Op, Token};
use crate::worker::Worker;

/// A pipe's size when `--pipe-size 0` leaves it to the kernel.
const KERNEL_PIPE_SIZE: usize = 65536;

/// Creates one transparent TCP listener of a worker.
///
/// `IP_TRANSPARENT` must be set before `bind()`: nft `tproxy` only assigns packets to
/// transparent sockets. `SO_REUSEPORT` gives each worker its own listener on the same
/// port; the kernel spreads new connections across them by flow hash (the tproxy
/// listener lookup honours reuseport groups).
pub fn listener(v6: bool, port: u16) -> io::Result<OwnedFd> {
    let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
    let s = Socket::new(domain, Type::STREAM.nonblocking(), Some(Protocol::TCP))?;
    if v6 {
        // v4 has its own listener; a dual-stack socket would see v4 as mapped addresses.
        s.set_only_v6(true)?;
        s.set_ip_transparent_v6(true)?;
    } else {
        s.set_ip_transparent_v4(true)?;
    }
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.bind(&sys::unspecified(v6, port).into())?;
    s.listen(4096)?;
    Ok(s.into())
}

/// Connection phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Upstream connect in flight.
    Connecting,
    /// Both directions relaying.
    Relaying,
    /// Waiting for in-flight ops to complete before the slot is freed.
    Closing,
}

/// Per-direction I/O resources next to the state machine.
#[derive(Debug)]
pub struct DirIo {
    pub machine: Direction,
    /// Splice: the pipe holding this direction's in-flight bytes, only while any.
    pub pipe: Option<sys::Pipe>,
    /// Copy: the provided buffer holding in-flight bytes: (buffer id, offset, end).
    pub buf: Option<(u16, usize, usize)>,
    /// A POLLIN is armed on this direction's source.
    pub poll_in: bool,
    /// A POLLOUT is armed on this direction's destination.
    pub poll_out: bool,
    /// Copy: waiting in `buf_waiters` for a provided buffer.
    pub waiting_buf: bool,
    /// The error watch on the source after its EOF was armed (once).
    pub err_watch: bool,
    /// Queued in the worker's run queue.
    pub queued: bool,
}

impl DirIo {
    fn new(capacity: usize) -> DirIo {
        DirIo {
            machine: Direction::new(capacity),
            pipe: None,
            buf: None,
            poll_in: false,
            poll_out: false,
            waiting_buf: false,
            err_watch: false,
            queued: false,
        }
    }
}

/// One relayed TCP connection. Boxed in the table so that the addresses the kernel
/// reads (the connect sockaddr) never move.
pub struct Conn {
    pub generation: u32,
    pub client: OwnedFd,
    pub upstream: OwnedFd,
    pub client_addr: ClientAddr,
    pub orig_dst: OrigDst,
    dst: (libc::sockaddr_storage, libc::socklen_t),
    pub phase: Phase,
    /// `dirs[0]`: client to server; `dirs[1]`: server to client.
    pub dirs: [DirIo; 2],
    /// Ops naming this connection whose final completion has not arrived.
    pub inflight: u32,
    pub last_tick: u64,
    pub reset: bool,
}

impl Conn {
    /// Source fd of direction `d`.
    fn src(&self, d: usize) -> i32 {
        if d == 0 {
            self.client.as_raw_fd()
        } else {
            self.upstream.as_raw_fd()
        }
    }

    /// Destination fd of direction `d`.
    fn dst(&self, d: usize) -> i32 {
        if d == 0 {
            self.upstream.as_raw_fd()
        } else {
            self.client.as_raw_fd()
        }
    }
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

    fn insert(&mut self, mut conn: Box<Conn>) -> (u32, u32) {
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

    fn remove(&mut self, slot: u32) -> Option<Box<Conn>> {
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

fn dir_token(op: Op, slot: u32, generation: u32) -> u64 {
    Token::new(op, slot, generation).encode()
}

impl Worker {
    /// An accept completion (multishot or single-shot).
    pub fn on_accept(&mut self, tok: Token, c: Completion) {
        let li = tok.slot as usize;
        if !c.more() {
            if let Some(l) = self.listeners.get_mut(li) {
                l.armed = false;
                l.cancelling = false;
            }
        }
        if c.result < 0 {
            match -c.result {
                libc::ECANCELED => {}
                libc::EMFILE | libc::ENFILE => {
                    self.stats.accept_emfile.fetch_add(1, Relaxed);
                    // Stop accepting until a connection closes or the next tick; the
                    // multishot accept may still be armed, so cancel it (no EMFILE spin).
                    if !self.accept_starved {
                        self.accept_starved = true;
                        self.cancel_accepts(false);
                    }
                }
                // The client went away between handshake and accept: nothing to do.
                libc::ECONNABORTED | libc::EINTR | libc::EAGAIN => {}
                e => {
                    // Anything else (ENOMEM, ENOBUFS, an LSM's EPERM...) may persist:
                    // pause accepting until the next tick instead of re-arming at
                    // once, so a lasting error costs one try and one line a second.
                    self.log_limited(format_args!(
                        "accept: {} (accepting paused for a second)",
                        io::Error::from_raw_os_error(e)
                    ));
                    if !self.accept_starved {
                        self.accept_starved = true;
                        self.cancel_accepts(false);
                    }
                }
            }
        } else {
            let fd = sys::take_accepted(c.result);
            self.stats.accepted.fetch_add(1, Relaxed);
            self.start_conn(fd);
        }
        if !c.more() {
            if self.stopping {
                // Close the listener now, so that with nft's fail-open tproxy new
                // connections bypass the stopping engine instead of queueing on it.
                if let Some(l) = self.listeners.get_mut(li) {
                    l.fd = None;
                }
                self.maybe_wind_down();
            } else {
                self.arm_accepts();
            }
        }
    }

    fn start_conn(&mut self, client: OwnedFd) {
        if self.stopping {
            let _ = sys::set_linger_zero(client.as_fd());
            return;
        }
        if self.conns.len() >= self.cfg.max_conns_per_core {
            // A multishot burst accepted past the limit before its cancel took effect.
            if self.parked.len() < self.cfg.park_max_per_core {
                self.stats.accept_parked.fetch_add(1, Relaxed);
                self.parked.push_back(client);
            } else {
                self.stats.over_limit.fetch_add(1, Relaxed);
                let _ = sys::set_linger_zero(client.as_fd());
            }
            return;
        }
        let (Ok(orig), Ok(peer)) = (
            sys::local_addr(client.as_fd()),
            sys::peer_addr(client.as_fd()),
        ) else {
            // The client is already gone (reset before we looked); nothing to relay.
            return;
        };
        if orig.port() == self.cfg.port && sys::is_local_address(orig.ip()) {
            // Someone connected to the engine's own port directly: relaying to the
            // "original destination" would connect the engine to itself, forever.
            self.stats.loop_refused.fetch_add(1, Relaxed);
            let _ = sys::set_linger_zero(client.as_fd());
            return;
        }
        let upstream = match upstream_socket(&orig, self.cfg.mark) {
            Ok(s) => s,
            Err(e) => {
                self.count_connect_error(e.raw_os_error().unwrap_or(libc::EIO));
                let _ = sys::set_linger_zero(client.as_fd());
                return;
            }
        };
        let cap = match self.cfg.relay {
            RelayMode::Splice => self.cfg.pipe_size.unwrap_or(KERNEL_PIPE_SIZE),
            RelayMode::Copy => self.cfg.copy_buf_size,
        };
        let conn = Box::new(Conn {
            generation: 0,
            client,
            upstream,
            client_addr: ClientAddr(peer),
            orig_dst: OrigDst(orig),
            dst: crate::cmsg::encode_sockaddr(&orig),
            phase: Phase::Connecting,
            dirs: [DirIo::new(cap), DirIo::new(cap)],
            inflight: 0,
            last_tick: self.tick,
            reset: false,
        });
        self.stats.active.fetch_add(1, Relaxed);
        let (slot, g) = self.conns.insert(conn);
        if self.headroom() == 0 && !self.at_limit {
            self.at_limit = true;
            self.stats.accept_paused.fetch_add(1, Relaxed);
        }
        self.check_accept_headroom();
        let conn = self.conns.get(slot, g).expect("just inserted");
        let connect = opcode::Connect::new(
            types::Fd(conn.upstream.as_raw_fd()),
            &conn.dst.0 as *const libc::sockaddr_storage as *const libc::sockaddr,
            conn.dst.1,
        )
        .build()
        .flags(squeue::Flags::IO_LINK)
        .user_data(dir_token(Op::Connect, slot, g));
        let timeout = opcode::LinkTimeout::new(&*self.connect_ts as *const types::Timespec)
            .build()
            .user_data(dir_token(Op::ConnectTimeout, slot, g));
        conn.inflight += 2;
        self.submit_linked(&[connect, timeout]);
    }

    fn count_connect_error(&self, errno: i32) {
        let s = &self.stats;
        match errno {
            libc::ECONNREFUSED => s.connect_refused.fetch_add(1, Relaxed),
            // ECANCELED: the linked timeout fired and cancelled the connect.
            libc::ECANCELED | libc::ETIMEDOUT => s.connect_timeout.fetch_add(1, Relaxed),
            libc::EHOSTUNREACH | libc::ENETUNREACH => s.connect_unreachable.fetch_add(1, Relaxed),
            _ => s.connect_other.fetch_add(1, Relaxed),
        };
    }

    /// Completion of an upstream connect.
    pub fn on_connect(&mut self, tok: Token, c: Completion) {
        let Some(conn) = self.conns.get(tok.slot, tok.generation) else {
            return;
        };
        conn.inflight -= 1;
        if conn.phase != Phase::Connecting {
            self.maybe_free(tok.slot, tok.generation);
            return;
        }
        if c.result < 0 {
            let (client, orig) = (conn.client_addr.0, conn.orig_dst.0);
            let err = if c.result == -libc::ECANCELED {
                format!("no answer within {} ms", self.cfg.connect_timeout_ms)
            } else {
                io::Error::from_raw_os_error(-c.result).to_string()
            };
            self.count_connect_error(-c.result);
            self.log_limited(format_args!(
                "tcp: {client} -> {orig}: connect failed: {err}; client reset"
            ));
            self.close(tok.slot, tok.generation, true);
            return;
        }
        conn.phase = Phase::Relaying;
        conn.last_tick = self.tick;
        // Latency over batching: small request/response traffic must not wait for Nagle.
        let _ = socket2::SockRef::from(&conn.client).set_tcp_nodelay(true);
        let _ = socket2::SockRef::from(&conn.upstream).set_tcp_nodelay(true);
        self.pump(tok.slot, tok.generation, 0);
        self.pump(tok.slot, tok.generation, 1);
    }

    /// Completion of a connect's link timeout (fired or cancelled: nothing to do).
    pub fn on_connect_timeout(&mut self, tok: Token) {
        if let Some(conn) = self.conns.get(tok.slot, tok.generation) {
            conn.inflight -= 1;
            self.maybe_free(tok.slot, tok.generation);
        }
    }

    /// A one-shot POLLIN/POLLOUT fired (or was cancelled).
    pub fn on_poll(&mut self, tok: Token, c: Completion) {
        let d = tok.op.direction().expect("poll op has a direction");
        let Some(conn) = self.conns.get(tok.slot, tok.generation) else {
            return;
        };
        let is_in = matches!(tok.op, Op::PollIn0 | Op::PollIn1);
        if !c.more() {
            conn.inflight -= 1;
            if is_in {
                conn.dirs[d].poll_in = false;
            } else {
                conn.dirs[d].poll_out = false;
            }
        }
        if conn.phase != Phase::Relaying {
            self.maybe_free(tok.slot, tok.generation);
            return;
        }
        if c.result < 0 {
            if c.result == -libc::ECANCELED {
                return;
            }
            conn.dirs[d].machine.fail(-c.result);
        } else if c.result & libc::POLLERR as i32 != 0 {
            // The socket has a pending error: its peer reset (or the path died). Seen
            // here even when this direction is finished or waiting for the other
            // side, so a reset after a half-close still reaches the other peer.
            let fd = if is_in { conn.src(d) } else { conn.dst(d) };
            let errno = sys::take_socket_error(fd).unwrap_or(libc::ECONNRESET);
            conn.dirs[d].machine.fail(errno);
        } else if is_in {
            conn.dirs[d].machine.on_readable();
        } else {
            conn.dirs[d].machine.on_writable();
        }
        self.pump(tok.slot, tok.generation, d);
    }

    /// Copy relay: a recv into a provided buffer completed.
    pub fn on_recv(&mut self, tok: Token, c: Completion) {
        let d = tok.op.direction().expect("recv op has a direction");
        let bid = c.buffer_id();
        let Some(conn) = self.conns.get(tok.slot, tok.generation) else {
            // Stale: cannot happen while slots are freed only at inflight == 0, but a
            // picked buffer must never leak.
            if let Some(b) = bid {
                self.give_copy_buf(b);
            }
            return;
        };
        conn.inflight -= 1;
        if conn.phase != Phase::Relaying {
            if let Some(b) = bid {
                self.give_copy_buf(b);
            }
            self.maybe_free(tok.slot, tok.generation);
            return;
        }
        let dir = &mut conn.dirs[d];
        if c.result == -libc::ENOBUFS {
            // Every provided buffer is in use: retry when one comes back.
            dir.machine.retry();
            dir.waiting_buf = true;
            self.buf_waiters.push_back((tok.slot, tok.generation, d));
            return;
        }
        if c.result > 0 {
            let b = bid.expect("a successful buffer-select recv names its buffer");
            dir.buf = Some((b, 0, c.result as usize));
            conn.last_tick = self.tick;
        }
        conn.dirs[d].machine.on_read(Io::from_cqe(c.result));
        self.pump(tok.slot, tok.generation, d);
    }

    /// Copy relay: a send of a provided buffer completed.
    pub fn on_send(&mut self, tok: Token, c: Completion) {
        let d = tok.op.direction().expect("send op has a direction");
        let Some(conn) = self.conns.get(tok.slot, tok.generation) else {
            return;
        };
        conn.inflight -= 1;
        let dir = &mut conn.dirs[d];
        if c.result > 0 {
            let n = c.result as usize;
            if let Some((_, off, _)) = dir.buf.as_mut() {
                *off += n;
            }
            conn.last_tick = self.tick;
            self.account(d, n, RelayMode::Copy);
        }
        let conn = self.conns.get(tok.slot, tok.generation).expect("live");
        let dir = &mut conn.dirs[d];
        dir.machine.on_write(Io::from_cqe(c.result));
        if dir.machine.buffered() == 0 || dir.machine.is_finished() {
            if let Some((b, _, _)) = dir.buf.take() {
                self.give_copy_buf(b);
            }
        }
        let conn = self.conns.get(tok.slot, tok.generation).expect("live");
        if conn.phase != Phase::Relaying {
            self.maybe_free(tok.slot, tok.generation);
            return;
        }
        self.pump(tok.slot, tok.generation, d);
    }

    /// Copy relay: gives a provided buffer back and hands it to the first direction
    /// waiting for one, if any.
    fn give_copy_buf(&mut self, b: u16) {
        if let Some(bufs) = self.copy_bufs.as_mut() {
            bufs.recycle(b);
            if !self.wake_buf_waiter() {
                self.bufs_unclaimed += 1;
            }
        }
    }

    /// Wakes the first live direction waiting for a buffer; false if there was none.
    fn wake_buf_waiter(&mut self) -> bool {
        while let Some((slot, g, d)) = self.buf_waiters.pop_front() {
            if let Some(conn) = self.conns.get(slot, g) {
                if conn.dirs[d].waiting_buf {
                    conn.dirs[d].waiting_buf = false;
                    self.pump(slot, g, d);
                    return true;
                }
            }
        }
        false
    }

    /// End of a batch: a direction parked on `ENOBUFS` after a buffer came back in
    /// the same batch (its receive failed before the recycle) is woken now, once per
    /// such buffer; later `ENOBUFS` are genuine and wait for the next recycle.
    pub fn wake_for_unclaimed(&mut self) {
        while self.bufs_unclaimed > 0 && self.wake_buf_waiter() {
            self.bufs_unclaimed -= 1;
        }
        self.bufs_unclaimed = 0;
    }

    fn account(&self, d: usize, n: usize, mode: RelayMode) {
        let s = &self.stats;
        let n = n as u64;
        if d == 0 {
            s.bytes_c2s.fetch_add(n, Relaxed);
        } else {
            s.bytes_s2c.fetch_add(n, Relaxed);
        }
        match mode {
            RelayMode::Splice => s.splice_bytes.fetch_add(n, Relaxed),
            RelayMode::Copy => s.copy_bytes.fetch_add(n, Relaxed),
        };
    }

    /// Directions that used up their budget get another turn after the CQ batch.
    pub fn run_queue(&mut self) {
        for _ in 0..self.runq.len() {
            let Some((slot, g, d)) = self.runq.pop_front() else {
                break;
            };
            if let Some(conn) = self.conns.get(slot, g) {
                conn.dirs[d].queued = false;
                self.pump(slot, g, d);
            }
        }
    }

    /// Drives direction `d` of a connection as far as it can go without waiting.
    pub fn pump(&mut self, slot: u32, g: u32, d: usize) {
        // Each pump moves at most this many chunks before yielding to other
        // connections, so one fast stream cannot starve the core.
        let mut budget = 8u32;
        loop {
            let mode = self.cfg.relay;
            let Some(conn) = self.conns.get(slot, g) else {
                return;
            };
            if conn.phase != Phase::Relaying {
                return;
            }
            let want = conn.dirs[d].machine.want();
            match want {
                Want::Read(max) => {
                    if conn.dirs[d].waiting_buf {
                        return;
                    }
                    if budget == 0 {
                        if !conn.dirs[d].queued {
                            conn.dirs[d].queued = true;
                            self.runq.push_back((slot, g, d));
                        }
                        return;
                    }
                    budget -= 1;
                    match mode {
                        RelayMode::Splice => {
                            if conn.dirs[d].pipe.is_none() {
                                match self.take_pipe() {
                                    Ok(p) => {
                                        let conn = self.conns.get(slot, g).expect("live");
                                        conn.dirs[d].machine.set_capacity(p.capacity);
                                        conn.dirs[d].pipe = Some(p);
                                    }
                                    Err(e) => {
                                        let conn = self.conns.get(slot, g).expect("live");
                                        conn.dirs[d]
                                            .machine
                                            .fail(e.raw_os_error().unwrap_or(libc::EMFILE));
                                        continue;
                                    }
                                }
                            }
                            let conn = self.conns.get(slot, g).expect("live");
                            let pipe_w =
                                conn.dirs[d].pipe.as_ref().expect("pipe").write.as_raw_fd();
                            let r = sys::splice(conn.src(d), pipe_w, max);
                            if matches!(r, Ok(n) if n > 0) {
                                conn.last_tick = self.tick;
                            }
                            conn.dirs[d].machine.on_read(Io::from_result(r));
                            if conn.dirs[d].machine.buffered() == 0 {
                                // Nothing read (would block, EOF or error): an idle
                                // connection must not sit on a pipe (2 fds + pinned
                                // kernel memory) while it waits.
                                if let Some(p) = conn.dirs[d].pipe.take() {
                                    self.give_pipe(p);
                                }
                            }
                        }
                        RelayMode::Copy => {
                            let bufs = self.copy_bufs.as_ref().expect("copy mode has buffers");
                            let sqe = opcode::Recv::new(
                                types::Fd(conn.src(d)),
                                std::ptr::null_mut(),
                                bufs.buf_size() as u32,
                            )
                            .buf_group(bufs.group())
                            .build()
                            .flags(squeue::Flags::BUFFER_SELECT)
                            .user_data(dir_token(Op::recv(d), slot, g));
                            conn.dirs[d].machine.begin();
                            conn.inflight += 1;
                            self.submit(sqe);
                            return;
                        }
                    }
                }
                Want::Write(len) => match mode {
                    RelayMode::Splice => {
                        let pipe_r = conn.dirs[d].pipe.as_ref().expect("pipe").read.as_raw_fd();
                        let r = Io::from_result(sys::splice(pipe_r, conn.dst(d), len));
                        conn.dirs[d].machine.on_write(r);
                        if let Io::Done(n) = r {
                            conn.last_tick = self.tick;
                            if conn.dirs[d].machine.buffered() == 0 {
                                let p = conn.dirs[d].pipe.take();
                                self.account(d, n, RelayMode::Splice);
                                if let Some(p) = p {
                                    self.give_pipe(p);
                                }
                            } else {
                                self.account(d, n, RelayMode::Splice);
                            }
                        }
                    }
                    RelayMode::Copy => {
                        let (bid, off, _) = conn.dirs[d].buf.expect("buffered data has a buffer");
                        let bufs = self.copy_bufs.as_ref().expect("copy mode has buffers");
                        // SAFETY-relevant: the pointer stays valid until the send's CQE:
                        // the buffer is recycled only after it (see on_send).
                        let ptr = bufs.ptr(bid).wrapping_add(off);
                        // MSG_NOSIGNAL: a peer that went away yields EPIPE, not SIGPIPE.
                        // MSG_WAITALL: io_uring retries short sends itself.
                        let sqe = opcode::Send::new(types::Fd(conn.dst(d)), ptr, len as u32)
                            .flags(libc::MSG_NOSIGNAL | libc::MSG_WAITALL)
                            .build()
                            .user_data(dir_token(Op::send(d), slot, g));
                        conn.dirs[d].machine.begin();
                        conn.inflight += 1;
                        self.submit(sqe);
                        return;
                    }
                },
                Want::PollReadable => {
                    if !conn.dirs[d].poll_in {
                        conn.dirs[d].poll_in = true;
                        conn.inflight += 1;
                        // Multishot: armed once, it stays on the socket's wait queue
                        // and posts a completion per wakeup. Only a wait that follows
                        // a read that would block is ever served by it, so no data can
                        // arrive unnoticed; wakeups while busy are ignored.
                        let sqe = opcode::PollAdd::new(
                            types::Fd(conn.src(d)),
                            (libc::POLLIN | libc::POLLRDHUP) as u32,
                        )
                        .multi(true)
                        .build()
                        .user_data(dir_token(Op::poll_in(d), slot, g));
                        self.submit(sqe);
                    }
                    return;
                }
                Want::PollWritable => {
                    if !conn.dirs[d].poll_out {
                        conn.dirs[d].poll_out = true;
                        conn.inflight += 1;
                        let sqe =
                            opcode::PollAdd::new(types::Fd(conn.dst(d)), libc::POLLOUT as u32)
                                .build()
                                .user_data(dir_token(Op::poll_out(d), slot, g));
                        self.submit(sqe);
                    }
                    return;
                }
                Want::ShutdownWrite => {
                    let r = sys::shutdown_write(conn.dst(d)).map(|_| 0);
                    conn.dirs[d].machine.on_shutdown(Io::from_result(r));
                    if conn.dirs[d].machine.state() == State::Done
                        && conn.dirs[1 - d].machine.state() == State::Done
                    {
                        self.close(slot, g, false);
                        return;
                    }
                }
                Want::Nothing => {
                    // After its EOF nothing may be armed on a source (copy relay
                    // always, splice when the EOF came without a wait), so a later
                    // reset by that peer would go unnoticed while the other direction
                    // idles. Watch it for errors: multishot, because the kernel always
                    // adds POLLRDHUP, which is already true at EOF and posts one CQE
                    // at once; later wakeups by data or writability do not match.
                    let dir = &mut conn.dirs[d];
                    if dir.machine.state() == State::Done && !dir.err_watch && !dir.poll_in {
                        dir.err_watch = true;
                        dir.poll_in = true;
                        conn.inflight += 1;
                        let sqe =
                            opcode::PollAdd::new(types::Fd(conn.src(d)), libc::POLLERR as u32)
                                .multi(true)
                                .build()
                                .user_data(dir_token(Op::poll_in(d), slot, g));
                        self.submit(sqe);
                    }
                    return;
                }
                Want::InFlight => return,
                Want::Reset => {
                    self.close(slot, g, true);
                    return;
                }
            }
        }
    }

    /// Starts closing a connection: with `reset`, both sides get a RST.
    pub fn close(&mut self, slot: u32, g: u32, reset: bool) {
        let Some(conn) = self.conns.get(slot, g) else {
            return;
        };
        if conn.phase == Phase::Closing {
            return;
        }
        conn.phase = Phase::Closing;
        conn.reset = reset;
        if reset {
            let _ = sys::set_linger_zero(conn.client.as_fd());
            let _ = sys::set_linger_zero(conn.upstream.as_fd());
            for d in 0..2 {
                if !conn.dirs[d].machine.is_finished() {
                    conn.dirs[d].machine.fail(libc::ECONNRESET);
                }
            }
        }
        if conn.inflight > 0 {
            let fds = [conn.client.as_raw_fd(), conn.upstream.as_raw_fd()];
            for fd in fds {
                let sqe = opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(fd)).all())
                    .build()
                    .user_data(Token::global(Op::Cancel).encode());
                self.submit(sqe);
            }
        }
        self.maybe_free(slot, g);
    }

    /// Frees a closing connection once no op names it any more.
    fn maybe_free(&mut self, slot: u32, g: u32) {
        let Some(conn) = self.conns.get(slot, g) else {
            return;
        };
        if conn.phase != Phase::Closing || conn.inflight > 0 {
            return;
        }
        let mut conn = self.conns.remove(slot).expect("live");
        // Provided buffers still held (copy relay), given back once the slot is gone.
        let mut freed = [0u16; 2];
        let mut n_freed = 0;
        for dir in conn.dirs.iter_mut() {
            if let Some(p) = dir.pipe.take() {
                // Only an empty pipe may be reused; one with stale bytes is closed.
                if dir.machine.buffered() == 0 {
                    self.give_pipe(p);
                }
            }
            if let Some((b, _, _)) = dir.buf.take() {
                freed[n_freed] = b;
                n_freed += 1;
            }
        }
        self.stats.active.fetch_sub(1, Relaxed);
        if conn.reset {
            self.stats.resets.fetch_add(1, Relaxed);
        } else {
            self.stats.closed.fetch_add(1, Relaxed);
        }
        drop(conn); // closes both sockets (RST if SO_LINGER 0 was armed)
        for &b in &freed[..n_freed] {
            self.give_copy_buf(b);
        }
        // A parked client may have gone meanwhile (start_conn then takes no slot):
        // keep going until a slot is taken again or nobody is parked.
        while self.conns.len() < self.cfg.max_conns_per_core {
            let Some(client) = self.parked.pop_front() else {
                break;
            };
            self.start_conn(client);
        }
        if self.headroom() > 0 {
            self.at_limit = false;
        }
        self.arm_accepts();
        if self.stopping {
            self.maybe_wind_down();
        }
    }

    /// Resets connections idle for longer than the idle timeout.
    pub fn expire_idle_conns(&mut self) {
        if self.conns.is_empty() {
            return;
        }
        let idle = self.cfg.idle_timeout_s;
        for (slot, g) in self.conns.live() {
            let tick = self.tick;
            let Some(conn) = self.conns.get(slot, g) else {
                continue;
            };
            if conn.phase != Phase::Closing && tick.saturating_sub(conn.last_tick) >= idle {
                self.stats.idle_timeouts.fetch_add(1, Relaxed);
                self.close(slot, g, true);
            }
        }
    }

    /// Drain deadline passed: reset whatever is still open.
    pub fn reset_all_conns(&mut self) {
        for (slot, g) in self.conns.live() {
            self.close(slot, g, true);
        }
    }
}

/// An upstream socket towards `orig`, marked so interception rules skip it.
fn upstream_socket(orig: &SocketAddr, mark: u32) -> io::Result<OwnedFd> {
    let domain = if orig.is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    };
    let s = Socket::new(domain, Type::STREAM.nonblocking(), Some(Protocol::TCP))?;
    if mark != 0 {
        s.set_mark(mark)?;
    }
    Ok(s.into())
}
