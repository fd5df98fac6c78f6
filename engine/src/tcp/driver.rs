//! The io_uring driver of a connection: [`Effects`] over real sockets.
//!
//! Thin on purpose: every decision is the machine's (`machine.rs`); this file only
//! turns its actions into SQEs and syscalls on this connection's fds, pipes and
//! the core's provided buffers.

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::Ordering::Relaxed;

use io_uring::{opcode, squeue, types};

use super::conns::ConnIo;
use super::copy::{self, BufWaiters, GROUP_TCP_COPY};
use super::direction::Io;
use super::machine::{Effects, SendArgs, Side, SniffStep};
use super::splice::{self, PipePool};
use crate::config::RelayMode;
use crate::core::token::{ConnOp, Token};
use crate::core::Core;
use crate::policy::{sniff, ConnMeta};
use crate::sys;

/// One connection's view of the worker while the machine handles an event.
pub struct Driver<'a> {
    pub core: &'a mut Core,
    pub io: &'a mut ConnIo,
    pub pipes: &'a mut PipePool,
    pub waiters: &'a mut BufWaiters,
    pub runq: &'a mut VecDeque<(u32, u32, usize)>,
    pub slot: u32,
    pub generation: u32,
}

impl Driver<'_> {
    fn ud(&self, op: ConnOp) -> u64 {
        Token::new(op.op(), self.slot, self.generation).encode()
    }

    /// Fd of a side.
    fn fd(&self, side: Side) -> i32 {
        match side {
            Side::Client => self.io.client.as_raw_fd(),
            Side::Server => self.upstream().as_raw_fd(),
        }
    }

    /// The upstream socket: the machine acts on the server side only once the
    /// verdict made one.
    fn upstream(&self) -> &OwnedFd {
        self.io
            .upstream
            .as_ref()
            .expect("server-side actions come after the verdict")
    }

    /// Source fd of direction `d` (0: client to server).
    fn src(&self, d: usize) -> i32 {
        self.fd(super::machine::source(d))
    }

    /// Destination fd of direction `d`.
    fn dst(&self, d: usize) -> i32 {
        self.fd(super::machine::destination(d))
    }
}

impl Effects for Driver<'_> {
    fn now(&self) -> u64 {
        self.core.tick
    }

    fn submit_connect(&mut self) {
        let connect = opcode::Connect::new(
            types::Fd(self.upstream().as_raw_fd()),
            &self.io.connect_addr.0 as *const libc::sockaddr_storage as *const libc::sockaddr,
            self.io.connect_addr.1,
        )
        .build()
        .flags(squeue::Flags::IO_LINK)
        .user_data(self.ud(ConnOp::Connect));
        let timeout = opcode::LinkTimeout::new(&*self.core.connect_ts as *const types::Timespec)
            .build()
            .user_data(self.ud(ConnOp::ConnectTimeout));
        self.core.submit_linked(&[connect, timeout]);
    }

    fn submit(&mut self, op: ConnOp, send: Option<SendArgs>) {
        let ud = self.ud(op);
        let sqe = match op {
            ConnOp::PollIn(d) => opcode::PollAdd::new(
                types::Fd(self.src(d)),
                (libc::POLLIN | libc::POLLRDHUP) as u32,
            )
            .multi(true)
            .build(),
            ConnOp::PollOut(d) => {
                opcode::PollAdd::new(types::Fd(self.dst(d)), libc::POLLOUT as u32).build()
            }
            // The kernel adds POLLRDHUP/POLLHUP to every poll; at EOF RDHUP is already
            // true and posts one completion at once, later ones come only with a new
            // wakeup. What matters is POLLERR: the peer reset after its FIN.
            ConnOp::ErrWatch(d) => {
                opcode::PollAdd::new(types::Fd(self.src(d)), libc::POLLERR as u32)
                    .multi(true)
                    .build()
            }
            ConnOp::Recv(d) => {
                let fd = self.src(d);
                copy::recv_sqe(fd, self.core.ring.buffers(GROUP_TCP_COPY), ud)
            }
            ConnOp::Send(d) => {
                let a = send.expect("a send names its buffer");
                let fd = self.dst(d);
                let bufs = self.core.ring.buffers(GROUP_TCP_COPY);
                copy::send_sqe(fd, bufs, a.bid, a.off, a.len, ud)
            }
            ConnOp::SniffTimer => {
                opcode::Timeout::new(&*self.core.sniff_ts as *const types::Timespec).build()
            }
            ConnOp::Connect | ConnOp::ConnectTimeout => {
                unreachable!("the connect is submitted by submit_connect")
            }
        };
        self.core.submit(sqe.user_data(ud));
    }

    fn cancel(&mut self, op: ConnOp) {
        let ud = self.ud(op);
        self.core.cancel(ud);
    }

    fn splice_in(&mut self, d: usize, len: usize) -> Io {
        let pipe = self.io.pipes[d].as_ref().expect("a splice read has a pipe");
        splice::splice_in(self.src(d), pipe, len)
    }

    fn splice_out(&mut self, d: usize, len: usize) -> Io {
        let pipe = self.io.pipes[d]
            .as_ref()
            .expect("a splice write has a pipe");
        splice::splice_out(pipe, self.dst(d), len)
    }

    fn shutdown_write(&mut self, d: usize) -> Io {
        Io::from_result(sys::shutdown_write(self.dst(d)).map(|_| 0))
    }

    fn take_pipe(&mut self, d: usize) -> Result<usize, i32> {
        match self.pipes.take(self.core.cfg.pipe_size, &self.core.stats) {
            Ok(p) => {
                let cap = p.capacity;
                self.io.pipes[d] = Some(p);
                Ok(cap)
            }
            // Every pipe of the pool is in use, or the fd pool has no credit left:
            // the machine reads without one.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Err(libc::EAGAIN),
            // Out of descriptors or pipe memory: the same fallback, and say so.
            Err(e) => {
                self.core.log_limited(format_args!(
                    "tcp: cannot make a pipe, copying instead: {e}"
                ));
                Err(libc::EAGAIN)
            }
        }
    }

    fn read_prefix(&mut self, d: usize, len: usize) -> Io {
        let src = self.src(d);
        let buf = &mut self.io.spill[d];
        buf.resize(len, 0);
        let r = Io::from_result(sys::recv(src, buf));
        match r {
            Io::Done(n) if n > 0 => {
                buf.truncate(n);
                self.core.stats.splice_copy_fallbacks.fetch_add(1, Relaxed);
            }
            _ => *buf = Vec::new(),
        }
        r
    }

    fn put_pipe(&mut self, d: usize, empty: bool) {
        if let Some(p) = self.io.pipes[d].take() {
            self.pipes.give(p, empty);
        }
    }

    fn put_buf(&mut self, bid: u16) {
        self.core.ring.buffers(GROUP_TCP_COPY).recycle(bid);
        self.waiters.returned();
    }

    fn wait_buf(&mut self, d: usize) {
        self.waiters.push(self.slot, self.generation, d);
    }

    fn requeue(&mut self, d: usize) {
        self.runq.push_back((self.slot, self.generation, d));
    }

    fn reset_sockets(&mut self) {
        let _ = sys::set_linger_zero(self.io.client.as_fd());
        if let Some(u) = &self.io.upstream {
            let _ = sys::set_linger_zero(u.as_fd());
        }
    }

    fn socket_error(&mut self, side: Side) -> Option<i32> {
        sys::take_socket_error(self.fd(side))
    }

    fn established(&mut self) {
        let us = self.core.now_us().saturating_sub(self.io.started_us);
        self.core.stats.connect_latency.observe_us(us);
        // Latency over batching: small request/response traffic must not wait for Nagle.
        let _ = socket2::SockRef::from(&self.io.client).set_tcp_nodelay(true);
        let _ = socket2::SockRef::from(self.upstream()).set_tcp_nodelay(true);
        let bound = super::stall_bound(&self.core.cfg);
        if bound > 0 && sys::set_receive_bound(self.upstream().as_fd(), bound as usize).is_ok() {
            self.io.upstream_bound = bound;
        }
    }

    fn delivered(&mut self, d: usize, n: usize) {
        let s = &self.core.stats;
        let n = n as u64;
        if d == 0 {
            s.bytes_c2s.fetch_add(n, Relaxed);
        } else {
            s.bytes_s2c.fetch_add(n, Relaxed);
        }
        match self.core.cfg.relay {
            RelayMode::Splice => s.splice_bytes.fetch_add(n, Relaxed),
            RelayMode::Copy => s.copy_bytes.fetch_add(n, Relaxed),
        };
    }

    fn sniff(&mut self, timed_out: bool) -> SniffStep {
        let mut eof = false;
        if !timed_out {
            // Everything the client has sent so far, up to the sniffing limit.
            while self.io.spill[0].len() < sniff::MAX_SNIFF_BYTES {
                let have = self.io.spill[0].len();
                self.io.spill[0].resize(sniff::MAX_SNIFF_BYTES, 0);
                let r = sys::recv(self.io.client.as_raw_fd(), &mut self.io.spill[0][have..]);
                match r {
                    Ok(0) => {
                        self.io.spill[0].truncate(have);
                        eof = true;
                        break;
                    }
                    Ok(n) => self.io.spill[0].truncate(have + n),
                    Err(e) => {
                        self.io.spill[0].truncate(have);
                        if e.kind() == std::io::ErrorKind::WouldBlock {
                            break;
                        }
                        return SniffStep::Failed(e.raw_os_error().unwrap_or(libc::EIO));
                    }
                }
            }
        }
        let found = sniff::sniff(&self.io.spill[0]);
        let full = self.io.spill[0].len() >= sniff::MAX_SNIFF_BYTES;
        if found == sniff::Sniffed::NeedMore && !(timed_out || eof || full) {
            return SniffStep::More;
        }
        let (sni, host) = found.names();
        let s = &self.core.stats;
        match (sni, host) {
            (Some(_), _) => s.sniff_sni.fetch_add(1, Relaxed),
            (None, Some(_)) => s.sniff_host.fetch_add(1, Relaxed),
            _ if timed_out => s.sniff_timeout.fetch_add(1, Relaxed),
            _ => s.sniff_no_name.fetch_add(1, Relaxed),
        };
        let meta = ConnMeta {
            client: self.io.client_addr,
            orig_dst: self.io.orig_dst,
        };
        let decided = self.core.policy.tcp_named(&meta, sni, host);
        self.io.name = sni.or(host).map(Box::from);
        self.io.rule = decided.rule;
        match self.io.connect_to(self.core, decided.verdict) {
            Ok(()) => SniffStep::Connect {
                prefix: self.io.spill[0].len(),
            },
            Err((reason, _)) => SniffStep::Refuse(reason),
        }
    }

    fn write_prefix(&mut self, d: usize, off: usize, len: usize) -> Io {
        let fd = self.dst(d);
        Io::from_result(sys::send(fd, &self.io.spill[d][off..off + len]))
    }

    fn drop_prefix(&mut self, d: usize) {
        self.io.spill[d] = Vec::new();
    }

    fn spill(&mut self, d: usize, bid: u16, off: usize, len: usize) {
        let bufs = self.core.ring.buffers(GROUP_TCP_COPY);
        let data = bufs.data(bid, off + len);
        self.io.spill[d].clear();
        self.io.spill[d].extend_from_slice(&data[off..off + len]);
        self.core.stats.copy_spills.fetch_add(1, Relaxed);
    }
}
