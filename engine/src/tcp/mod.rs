//! The TCP subsystem of a worker: accepting, the connection table, and the relays.
//!
//! Life of a connection:
//!
//! 1. An accept completion (`accept.rs`) yields a client fd. Its local address
//!    (`getsockname`) is the destination the client originally asked for.
//! 2. The policy gives its verdict ([`crate::policy`]): relay to the original
//!    destination, relay to another address, or reject (the client is reset,
//!    nothing is connected).
//! 3. An upstream socket carrying the engine's `SO_MARK` connects through the ring,
//!    linked to a `LINK_TIMEOUT`. Refused, unreachable or timed out: the client is
//!    reset at once (`SO_LINGER {1, 0}` + close), never left hanging.
//! 4. Both directions relay (splice or copy) until each has passed its EOF on as
//!    `shutdown(SHUT_WR)`; an error on either side resets both.
//! 5. Closing cancels exactly the ops still armed; the slot, fds, pipes and buffers
//!    are released only when the last of them has completed.
//!
//! Steps 3 to 5 are decided by the connection machine (`machine.rs`), which does no
//! I/O; `driver.rs` carries its actions out. This module routes completions to the
//! right connection, owns the pools the drivers share, and keeps the accounting:
//! every accepted connection ends with exactly one [`CloseReason`], counted once,
//! so `accepted == active + sum(close_*)` holds at every moment.

pub mod accept;
pub mod bound;
pub mod conns;
pub mod copy;
pub mod direction;
pub mod driver;
#[cfg(test)]
mod fake_kernel;
pub mod machine;
pub mod splice;

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, SystemTime};

use socket2::Type;

use crate::addrs::{ClientAddr, OrigDst, UpstreamAddr};
use crate::config::{Config, RelayMode, SourceMode};
use crate::core::ring::{BufGroup, Completion};
use crate::core::token::{Op, Token};
use crate::core::Core;
use crate::fdpool::ConnCredit;
use crate::flowlog::{FlowProto, FlowRecord};
use crate::policy::{ConnMeta, RuleName, TcpDecision, TcpVerdict};
use crate::stats::CloseReason;
use crate::sys;
use crate::upstream::{self, Bound, UpstreamError};
use accept::Acceptor;
use conns::{Conn, ConnIo, ConnTable};
use copy::{BufWaiters, COPY_BUFFERS, GROUP_TCP_COPY};
use driver::Driver;
use machine::{ConnMachine, Step};
use splice::{PipePool, KERNEL_PIPE_SIZE};

/// The provided buffers the TCP relay needs in the ring: the copy relay's, none
/// for splice.
pub fn buffer_group(cfg: &Config) -> Option<BufGroup> {
    (cfg.relay == RelayMode::Copy).then_some(BufGroup {
        name: "TCP copy",
        group: GROUP_TCP_COPY,
        entries: COPY_BUFFERS,
        buf_size: cfg.copy_buf_size,
    })
}

/// The TCP part of a worker.
pub struct Tcp {
    acceptor: Acceptor,
    conns: ConnTable,
    pipes: PipePool,
    waiters: BufWaiters,
    /// Relay directions that used up their budget and must be pumped again.
    runq: VecDeque<(u32, u32, usize)>,
    /// Per direction read size: pipe or buffer capacity.
    capacity: usize,
    /// Tick at which a stop resets whatever is still open.
    stop_deadline: Option<u64>,
}

impl Tcp {
    /// Takes the listeners. The copy relay's buffers ([`buffer_group`]) are
    /// registered with the ring when it is built.
    pub fn new(core: &mut Core, listeners: Vec<OwnedFd>) -> Result<Tcp, String> {
        let cfg = core.cfg.clone();
        let capacity = match cfg.relay {
            RelayMode::Splice => cfg.pipe_size.unwrap_or(KERNEL_PIPE_SIZE),
            RelayMode::Copy => cfg.copy_buf_size,
        };
        Ok(Tcp {
            acceptor: Acceptor::new(&cfg, listeners),
            // The cap is global; an even share is where the table starts.
            conns: ConnTable::with_capacity(cfg.max_conns.div_ceil(cfg.cores.len().max(1))),
            pipes: PipePool::new(cfg.max_pipes_per_core, cfg.fds.clone()),
            waiters: BufWaiters::default(),
            runq: VecDeque::new(),
            capacity,
            stop_deadline: None,
        })
    }

    /// Connections that could still be admitted, all cores together (the fd pool's
    /// cap and credits, `crate::fdpool`, with those of this core's idle pipes, which
    /// admission frees when it needs them), less this core's parked clients, which
    /// wait for one of them.
    fn headroom(&self, core: &Core) -> usize {
        core.cfg
            .fds
            .conn_headroom(self.pipes.idle_credits())
            .saturating_sub(self.acceptor.parked())
    }

    /// Admits a connection ([`crate::fdpool::FdPool::admit_conn`]), closing this
    /// core's idle pipes first if their credits are what it lacks (not when the
    /// connection cap is what refused it: the pipes would not help).
    fn admit(&mut self, core: &Core) -> Option<ConnCredit> {
        let fds = &core.cfg.fds;
        fds.admit_conn().or_else(|| {
            let credits_short = fds.conns() < fds.max_conns();
            (credits_short && self.pipes.trim() > 0)
                .then(|| fds.admit_conn())
                .flatten()
        })
    }

    /// Starts parked clients while the pool admits connections. Another core may
    /// take what this one saw free (then the client parks again, at the back), so
    /// each parked client gets one try per call.
    fn start_parked(&mut self, core: &mut Core) {
        for _ in 0..self.acceptor.parked() {
            if core.cfg.fds.conn_headroom(self.pipes.idle_credits()) == 0 {
                break;
            }
            let Some(client) = self.acceptor.unpark() else {
                break;
            };
            self.start_conn(core, client, true);
        }
    }

    /// Arms the accepts.
    pub fn start(&mut self, core: &mut Core) {
        let h = self.headroom(core);
        self.acceptor.arm(core, h);
    }

    /// A completion of a TCP op: an accept, or an op of a connection.
    pub fn on_cqe(&mut self, core: &mut Core, tok: Token, c: Completion) {
        if tok.op == Op::Accept {
            if let Some(fd) = self.acceptor.on_completion(core, &c, tok) {
                core.stats.accepted.fetch_add(1, Relaxed);
                core.stats.active.fetch_add(1, Relaxed);
                self.start_conn(core, fd, false);
            }
            let h = self.headroom(core);
            self.acceptor.finish(core, &c, tok, h);
            return;
        }
        let op = tok
            .op
            .conn_op()
            .expect("a TCP op is an accept or a connection op");
        let found = self.with_conn(core, tok.slot, tok.generation, |m, fx| {
            m.on_completion(op, c.result, c.more(), c.buffer_id(), fx)
        });
        if !found {
            // Cannot happen while slots are freed only with nothing armed; a picked
            // buffer must never leak all the same.
            if let Some(b) = c.buffer_id() {
                core.ring.buffers(GROUP_TCP_COPY).recycle(b);
            }
        }
    }

    /// Runs the machine of one connection with its driver; frees it on
    /// [`Step::Free`], then hands returned buffers to waiting directions. Returns
    /// whether the connection was live.
    fn with_conn(
        &mut self,
        core: &mut Core,
        slot: u32,
        generation: u32,
        f: impl FnOnce(&mut ConnMachine, &mut Driver<'_>) -> Step,
    ) -> bool {
        let found = self.with_conn_raw(core, slot, generation, f);
        self.hand_on_buffers(core);
        found
    }

    fn with_conn_raw(
        &mut self,
        core: &mut Core,
        slot: u32,
        generation: u32,
        f: impl FnOnce(&mut ConnMachine, &mut Driver<'_>) -> Step,
    ) -> bool {
        let Some(conn) = self.conns.get(slot, generation) else {
            return false;
        };
        let Conn { machine, io, .. } = conn;
        let mut fx = Driver {
            core: &mut *core,
            io,
            pipes: &mut self.pipes,
            waiters: &mut self.waiters,
            runq: &mut self.runq,
            slot,
            generation,
        };
        if f(machine, &mut fx) == Step::Free {
            self.free(core, slot);
        }
        true
    }

    /// Copy relay: each buffer returned during the last event wakes the oldest live
    /// direction waiting for one.
    fn hand_on_buffers(&mut self, core: &mut Core) {
        loop {
            let n = self.waiters.take_returned();
            if n == 0 {
                return;
            }
            for _ in 0..n {
                if !self.wake_buf_waiter(core) {
                    self.waiters.add_unclaimed(1);
                }
            }
        }
    }

    /// Wakes the oldest live direction waiting for a buffer; false if none waits.
    fn wake_buf_waiter(&mut self, core: &mut Core) -> bool {
        while let Some((slot, g, d)) = self.waiters.pop() {
            let mut claimed = false;
            self.with_conn_raw(core, slot, g, |m, fx| {
                let (took, step) = m.on_buffer(d, fx);
                claimed = took;
                step
            });
            if claimed {
                return true;
            }
        }
        false
    }

    /// End of a batch of completions: directions that used up their budget get
    /// another turn, and a direction parked on `ENOBUFS` after a buffer came back in
    /// the same batch (its receive failed before the recycle) is woken, once per
    /// such buffer; later `ENOBUFS` are genuine and wait for the next recycle.
    pub fn end_of_batch(&mut self, core: &mut Core) {
        for _ in 0..self.runq.len() {
            let Some((slot, g, d)) = self.runq.pop_front() else {
                break;
            };
            self.with_conn(core, slot, g, |m, fx| m.resume(d, fx));
        }
        for _ in 0..self.waiters.take_unclaimed() {
            if !self.wake_buf_waiter(core) {
                break;
            }
        }
        self.hand_on_buffers(core);
        let _ = self.waiters.take_unclaimed();
    }

    /// Refuses a client before any relaying: resets it (unless it is already gone)
    /// and counts its close.
    fn refuse(core: &Core, client: OwnedFd, reason: CloseReason) {
        if reason != CloseReason::ClientGone {
            let _ = sys::set_linger_zero(client.as_fd());
        }
        drop(client);
        core.stats.count_close(reason);
        core.stats.active.fetch_sub(1, Relaxed);
    }

    /// Flow log record of a connection refused once its addresses were known.
    fn log_refused(
        core: &Core,
        meta: &ConnMeta,
        upstream: SocketAddr,
        verdict: &'static str,
        reason: CloseReason,
        rule: Option<RuleName>,
    ) {
        core.log_flow(|ended, _| FlowRecord {
            proto: FlowProto::Tcp,
            ended,
            duration: Duration::ZERO,
            client: meta.client.0,
            orig_dst: meta.orig_dst.0,
            upstream,
            name: None,
            rule,
            verdict,
            bytes_c2s: 0,
            bytes_s2c: 0,
            dgrams: None,
            reason: reason.name(),
            errno: None,
        });
    }

    /// Takes an accepted client (`was_parked`: one that waited for a slot already,
    /// and is counted in `accept_parked` already): limit, addresses, policy,
    /// upstream connect.
    fn start_conn(&mut self, core: &mut Core, client: OwnedFd, was_parked: bool) {
        if core.stopping {
            return Self::refuse(core, client, CloseReason::Stopping);
        }
        // Admission: a place under --max-conns and 2 fd credits, held until the
        // connection is freed; dropped (given back) on every refusal below.
        let Some(credit) = self.admit(core) else {
            // Accepted past the limit: a multishot burst before its cancel took
            // effect, a single-shot in flight, or another core took the last credits.
            match self.acceptor.park(client) {
                Ok(()) if !was_parked => {
                    core.stats.accept_parked.fetch_add(1, Relaxed);
                }
                Ok(()) => {}
                Err(client) => return Self::refuse(core, client, CloseReason::Limit),
            }
            return;
        };
        let (Ok(orig), Ok(peer)) = (
            sys::local_addr(client.as_fd()),
            sys::peer_addr(client.as_fd()),
        ) else {
            // The client is already gone (reset before we looked); nothing to relay.
            return Self::refuse(core, client, CloseReason::ClientGone);
        };
        let meta = ConnMeta {
            client: ClientAddr(peer),
            orig_dst: OrigDst(orig),
        };
        let decision = core.policy.tcp(&meta);
        let mut io = ConnIo {
            client,
            upstream: None,
            client_addr: meta.client,
            orig_dst: meta.orig_dst,
            upstream_addr: UpstreamAddr(orig),
            connect_addr: sys::cmsg::encode_sockaddr(&orig),
            pipes: [None, None],
            started_us: core.now_us(),
            rule: None,
            name: None,
            spill: [Vec::new(), Vec::new()],
            // The upstream socket gets its bound once connected.
            upstream_bound: 0,
            s2c_at_tick: 0,
        };
        let sniff = match decision {
            TcpDecision::NeedsName => true,
            TcpDecision::Decided(d) => {
                io.rule = d.rule.clone();
                if let Err((reason, target)) = io.connect_to(core, d.verdict) {
                    let verdict = if reason == CloseReason::Rejected {
                        "reject"
                    } else {
                        "relay"
                    };
                    Self::log_refused(core, &meta, target, verdict, reason, io.rule.clone());
                    return Self::refuse(core, io.client, reason);
                }
                false
            }
        };
        let conn = Box::new(Conn {
            generation: 0,
            machine: ConnMachine::new(core.cfg.relay, self.capacity, core.tick),
            io,
            credit,
        });
        let (slot, g) = self.conns.insert(conn);
        let h = self.headroom(core);
        self.acceptor.note_headroom(core, h);
        self.with_conn_raw(core, slot, g, |m, fx| {
            if sniff {
                m.start_sniffing(fx);
            } else {
                m.start(fx);
            }
            Step::Continue
        });
    }

    /// Removes a freed connection: counts its close, closes its sockets (a RST if
    /// the machine reset them), starts parked clients and re-arms the accepts.
    fn free(&mut self, core: &mut Core, slot: u32) {
        let conn = self.conns.remove(slot).expect("freeing a live connection");
        let reason = conn
            .machine
            .reason()
            .expect("a freed connection has a reason");
        if matches!(
            reason,
            CloseReason::ConnectRefused
                | CloseReason::ConnectTimeout
                | CloseReason::Unreachable
                | CloseReason::ConnectError
        ) {
            let (client, target) = (conn.io.client_addr.0, conn.io.upstream_addr.0);
            let why = match conn.machine.errno() {
                Some(libc::ECANCELED) | None => {
                    format!("no answer within {} ms", core.cfg.connect_timeout_ms)
                }
                Some(e) => io::Error::from_raw_os_error(e).to_string(),
            };
            core.log_limited(format_args!(
                "tcp: {client} -> {target}: connect failed: {why}; client reset"
            ));
        }
        core.stats.count_close(reason);
        core.stats.active.fetch_sub(1, Relaxed);
        let lived_us = core.now_us().saturating_sub(conn.io.started_us);
        core.stats.conn_duration.observe_us(lived_us);
        if let Some(rule) = &conn.io.rule {
            let bytes = conn.machine.delivered(0) + conn.machine.delivered(1);
            core.stats.count_rule(rule, 0, bytes);
        }
        core.log_flow(|ended, _| tcp_record(&conn, reason, ended, lived_us));
        let mut conn = conn;
        // The machine returns its pipes before it frees; one left over must not
        // keep its credits (closed: its bytes, if any, are stale).
        for p in conn.io.pipes.iter_mut() {
            if let Some(p) = p.take() {
                self.pipes.give(p, false);
            }
        }
        // Closes both sockets, then gives the connection's credits back.
        drop(conn);
        // Parked clients take the freed slot (one that went meanwhile takes none, and
        // the next one tries).
        self.start_parked(core);
        let h = self.headroom(core);
        self.acceptor.note_headroom(core, h);
        self.acceptor.unstarve();
        self.acceptor.arm(core, h);
    }

    /// Once a second: pipe pool trim, idle timeouts, paused accepts, drain deadline.
    pub fn on_tick(&mut self, core: &mut Core) {
        self.pipes.on_tick();
        let (idle, in_use) = self.pipes.counts();
        core.stats.pipes_idle.store(idle as u64, Relaxed);
        core.stats.pipes_in_use.store(in_use as u64, Relaxed);
        core.stats
            .tcp_parked
            .store(self.acceptor.parked() as u64, Relaxed);
        // Credits given back on other cores wake nobody here: parked clients and
        // accepts paused at the limit try again once a second.
        if !core.stopping {
            self.start_parked(core);
        }
        let h = self.headroom(core);
        self.acceptor.on_tick(core, h);
        let deadline_passed = self.stop_deadline.is_some_and(|t| core.tick >= t);
        let (idle, half_closed) = (core.cfg.idle_timeout_s, core.cfg.half_closed_timeout_s);
        if self.conns.is_empty() {
            return;
        }
        let max_bound = core.cfg.stall_buffer_max_bytes as u32;
        let mut raised = 0;
        for (slot, g) in self.conns.live() {
            if let Some(conn) = self.conns.get(slot, g) {
                raised += u64::from(bound::on_tick(conn, max_bound));
            }
            let tick = core.tick;
            self.with_conn(core, slot, g, |m, fx| {
                let quiet = tick.saturating_sub(m.last_active());
                if deadline_passed {
                    m.abort(CloseReason::DrainDeadline, fx)
                } else if idle.is_some_and(|t| quiet >= t) {
                    m.abort(CloseReason::IdleTimeout, fx)
                } else if half_closed.is_some_and(|t| quiet >= t) && m.is_half_closed() {
                    m.abort(CloseReason::HalfClosedTimeout, fx)
                } else {
                    Step::Continue
                }
            });
        }
        core.stats.stall_bounds_raised.fetch_add(raised, Relaxed);
    }

    /// Stops accepting, resets parked clients and starts the drain deadline.
    pub fn stop(&mut self, core: &mut Core) {
        self.stop_deadline = Some(core.tick + core.cfg.drain_timeout_s);
        for client in self.acceptor.stop(core) {
            Self::refuse(core, client, CloseReason::Stopping);
        }
    }

    /// No connection open and no accept in flight.
    pub fn is_drained(&self) -> bool {
        self.conns.is_empty() && self.acceptor.is_idle()
    }

    /// Relay directions wait in the run queue for another turn.
    pub fn has_queued(&self) -> bool {
        !self.runq.is_empty()
    }
}

/// The receive bound an upstream socket starts with (`--stall-buffer-bytes`; 0:
/// none, the kernel autotunes).
pub fn stall_bound(cfg: &Config) -> u32 {
    cfg.stall_buffer_bytes
        .map_or(0, |b| b.min(cfg.stall_buffer_max_bytes) as u32)
}

/// The flow log record of a finished connection.
fn tcp_record(conn: &Conn, reason: CloseReason, ended: SystemTime, lived_us: u64) -> FlowRecord {
    let io = &conn.io;
    FlowRecord {
        proto: FlowProto::Tcp,
        ended,
        duration: Duration::from_micros(lived_us),
        client: io.client_addr.0,
        orig_dst: io.orig_dst.0,
        upstream: io.upstream_addr.0,
        name: io.name.clone(),
        rule: io.rule.clone(),
        verdict: if reason == CloseReason::Rejected {
            "reject"
        } else if io.upstream_addr.0 == io.orig_dst.0 {
            "relay"
        } else {
            "redirect"
        },
        bytes_c2s: conn.machine.delivered(0),
        bytes_s2c: conn.machine.delivered(1),
        dgrams: None,
        reason: reason.name(),
        errno: conn.machine.errno(),
    }
}

impl ConnIo {
    /// Carries out a verdict: the target, and an upstream socket towards it (marked,
    /// bound as `--source` says). `Err`: why not, and the target it was for.
    pub fn connect_to(
        &mut self,
        core: &mut Core,
        verdict: TcpVerdict,
    ) -> Result<(), (CloseReason, SocketAddr)> {
        let orig = self.orig_dst.0;
        if let Some(rule) = &self.rule {
            core.stats.count_rule(rule, 1, 0);
        }
        let target = match verdict {
            TcpVerdict::Relay => orig,
            TcpVerdict::RelayTo(to) => {
                core.stats.policy_redirected.fetch_add(1, Relaxed);
                to
            }
            TcpVerdict::Reject => return Err((CloseReason::Rejected, orig)),
        };
        if target.port() == core.cfg.port && sys::is_local_address(target.ip()) {
            // Someone connected to the engine's own port directly (or was redirected
            // there): relaying would connect the engine to itself, forever.
            return Err((CloseReason::Loop, target));
        }
        let (upstream, bound) = match upstream::socket(
            Type::STREAM,
            target,
            self.client_addr.0,
            core.cfg.source,
            core.cfg.mark,
        ) {
            Ok(s) => s,
            Err(e) => {
                core.log_limited(format_args!("tcp: upstream socket to {target}: {e}"));
                let reason = match e {
                    UpstreamError::Source(_) => CloseReason::SourceUnavailable,
                    UpstreamError::Socket(_) => CloseReason::ConnectError,
                };
                return Err((reason, target));
            }
        };
        if bound == Bound::Router && core.cfg.source != SourceMode::Router {
            core.stats.source_fallback.fetch_add(1, Relaxed);
        }
        if core.cfg.keepalive_s.is_some() {
            let _ = crate::sockets::set_keepalive(upstream.as_fd(), core.cfg.keepalive_s);
        }
        // The receive bound follows once the handshake is done (`Driver::established`).
        if let Some(b) = core.cfg.stall_buffer_bytes {
            let _ = sys::set_send_bound(upstream.as_fd(), b);
        }
        self.upstream = Some(upstream);
        self.upstream_addr = UpstreamAddr(target);
        self.connect_addr = sys::cmsg::encode_sockaddr(&target);
        Ok(())
    }
}
