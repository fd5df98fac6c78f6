//! One pinned worker: its ring, its listeners, its connections and flows.
//!
//! Event loop shape: submit and wait, drain the CQ into a batch, advance it once,
//! dispatch each completion with one `match` on its token, then run relay directions
//! that used up their budget in the previous round. `res < 0` goes to a per-op error
//! path before the success path.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::mpsc;
use std::sync::Arc;

use io_uring::{opcode, types};

use crate::config::{Config, RelayMode};
use crate::ring::{BufRing, Completion, Ring};
use crate::stats::CoreStats;
use crate::sys;
use crate::tcp::ConnTable;
use crate::token::{Op, Token};
use crate::udp::UdpState;

/// Sent by a worker to the main thread once it is listening, or failed to start.
pub type Ready = Result<String, String>;

/// Provided buffer group of the TCP copy relay.
pub const GROUP_TCP_COPY: u16 = 0;
/// Provided buffer group of UDP receives (tproxy sockets and upstream sockets).
pub const GROUP_UDP: u16 = 1;

/// A TCP listener of this worker.
pub struct Listener {
    /// `None` once closed while stopping.
    pub fd: Option<OwnedFd>,
    /// An accept is in flight (set on submit, cleared on its final CQE).
    pub armed: bool,
    /// The accept in flight is multishot (else single-shot).
    pub multishot: bool,
    /// A cancel of the multishot accept has been submitted.
    pub cancelling: bool,
}

/// A multishot accept is armed only while at least this many connection slots are
/// free. Closer to the limit each listener has one single-shot accept at a time and
/// only while a slot is free, so the limit is overshot by at most one connection per
/// listener (parked until a slot frees): waiting clients stay in the kernel's listen
/// backlog instead of being reset.
pub const MULTISHOT_HEADROOM: usize = 64;

/// Everything one core owns. Field order is drop order: the ring goes first so the
/// kernel has let go of every buffer ring before the buffers are freed.
pub struct Worker {
    pub ring: Ring,
    pub copy_bufs: Option<BufRing>,
    pub cfg: Arc<Config>,
    pub cpu: usize,
    pub stats: Arc<CoreStats>,
    pub listeners: Vec<Listener>,
    pub conns: ConnTable,
    /// Idle pipes of the splice relay, reused LIFO (warm in cache).
    pub pipes: Vec<sys::Pipe>,
    /// Pipes taken from the pool or created since the last tick.
    pipes_taken: u64,
    /// Copy-relay directions waiting for a provided buffer (ENOBUFS).
    pub buf_waiters: VecDeque<(u32, u32, usize)>,
    /// Copy relay: buffers freed in this batch while nobody waited for one. An
    /// `ENOBUFS` later in the same batch was produced before they came back, so its
    /// direction is woken at the end of the batch (see `wake_for_unclaimed`).
    pub bufs_unclaimed: usize,
    /// Relay directions that used up their budget and must be pumped again.
    pub runq: VecDeque<(u32, u32, usize)>,
    pub udp: Option<UdpState>,
    /// Seconds since start, advanced by the periodic timer.
    pub tick: u64,
    tick_ts: Box<types::Timespec>,
    pub connect_ts: Box<types::Timespec>,
    control: OwnedFd,
    control_buf: Box<[u8; 8]>,
    pub stopping: bool,
    stop_deadline: u64,
    /// Accepted clients waiting for a connection slot (see [`crate::config::PARK_TOTAL`]).
    pub parked: VecDeque<OwnedFd>,
    /// The connection limit is reached (for counting pauses once each).
    pub at_limit: bool,
    /// Accepting is paused after EMFILE/ENFILE until a connection closes or a tick.
    pub accept_starved: bool,
    /// Ops submitted whose final completion has not been seen yet.
    pub in_flight: usize,
    /// The periodic timer was cancelled for the final wind-down.
    tick_cancelled: bool,
    /// Tick of the last rate-limited log line.
    last_log_tick: u64,
}

/// Most idle pipes kept per core; more are closed when returned.
const PIPE_POOL_MAX: usize = 256;

impl Worker {
    /// Builds the worker on the current (already pinned) thread.
    pub fn new(
        cfg: Arc<Config>,
        cpu: usize,
        stats: Arc<CoreStats>,
        control: OwnedFd,
    ) -> Result<Worker, String> {
        let ring = Ring::new(4096).map_err(|e| format!("cpu {cpu}: io_uring_setup: {e}"))?;
        let copy_bufs = if cfg.tcp && cfg.relay == RelayMode::Copy {
            // 512 buffers: idle connections hold none, so this caps bytes in flight
            // per core, not connections.
            Some(
                BufRing::new(&ring, GROUP_TCP_COPY, 512, cfg.copy_buf_size)
                    .map_err(|e| format!("cpu {cpu}: registering the copy buffer ring: {e}"))?,
            )
        } else {
            None
        };
        let mut listeners = Vec::new();
        if cfg.tcp {
            for v6 in families(&cfg) {
                let fd = crate::tcp::listener(v6, cfg.port).map_err(|e| {
                    format!(
                        "cpu {cpu}: TCP listener on {}: {e}",
                        sys::unspecified(v6, cfg.port)
                    )
                })?;
                listeners.push(Listener {
                    fd: Some(fd),
                    armed: false,
                    multishot: false,
                    cancelling: false,
                });
            }
        }
        let udp = if cfg.udp {
            Some(UdpState::new(&ring, &cfg).map_err(|e| format!("cpu {cpu}: UDP: {e}"))?)
        } else {
            None
        };
        let connect_ts = Box::new(
            types::Timespec::new()
                .sec(cfg.connect_timeout_ms / 1000)
                .nsec(((cfg.connect_timeout_ms % 1000) * 1_000_000) as u32),
        );
        let max = cfg.max_conns_per_core;
        Ok(Worker {
            ring,
            copy_bufs,
            cfg,
            cpu,
            stats,
            listeners,
            conns: ConnTable::with_capacity(max),
            pipes: Vec::new(),
            pipes_taken: 0,
            buf_waiters: VecDeque::new(),
            bufs_unclaimed: 0,
            runq: VecDeque::new(),
            udp,
            tick: 0,
            tick_ts: Box::new(types::Timespec::new().sec(1)),
            connect_ts,
            control,
            control_buf: Box::new([0; 8]),
            stopping: false,
            stop_deadline: 0,
            parked: VecDeque::new(),
            at_limit: false,
            accept_starved: false,
            in_flight: 0,
            tick_cancelled: false,
            last_log_tick: u64::MAX,
        })
    }

    /// Queues an op that will post exactly one final completion.
    pub fn submit(&mut self, sqe: io_uring::squeue::Entry) {
        if let Err(e) = self.ring.push(&sqe) {
            // Only a dead ring fails here; nothing sensible is left to do on this core.
            panic!("cpu {}: io_uring submission failed: {e}", self.cpu);
        }
        self.in_flight += 1;
    }

    /// Queues linked ops (each posts one final completion).
    pub fn submit_linked(&mut self, sqes: &[io_uring::squeue::Entry]) {
        if let Err(e) = self.ring.push_linked(sqes) {
            panic!("cpu {}: io_uring submission failed: {e}", self.cpu);
        }
        self.in_flight += sqes.len();
    }

    /// Connection slots still free (parked clients count as taken).
    pub fn headroom(&self) -> usize {
        self.cfg
            .max_conns_per_core
            .saturating_sub(self.conns.len() + self.parked.len())
    }

    /// Arms an accept on every idle listener: multishot while there is plenty of
    /// headroom, single-shot (one per free slot) near the limit, none at the limit.
    pub fn arm_accepts(&mut self) {
        if self.stopping || self.accept_starved {
            return;
        }
        for i in 0..self.listeners.len() {
            if self.listeners[i].armed {
                continue;
            }
            let Some(fd) = self.listeners[i].fd.as_ref().map(|f| f.as_raw_fd()) else {
                continue;
            };
            let headroom = self.headroom();
            let ud = Token::new(Op::Accept, i as u32, 0).encode();
            // SOCK_NONBLOCK: splice takes its blocking mode from the socket file.
            let flags = libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
            let sqe = if headroom >= MULTISHOT_HEADROOM {
                self.listeners[i].multishot = true;
                opcode::AcceptMulti::new(types::Fd(fd))
                    .flags(flags)
                    .build()
                    .user_data(ud)
            } else if headroom > 0 {
                // One per listener: reserving slots per listener would let an idle
                // family's accept starve the busy one.
                self.listeners[i].multishot = false;
                opcode::Accept::new(types::Fd(fd), std::ptr::null_mut(), std::ptr::null_mut())
                    .flags(flags)
                    .build()
                    .user_data(ud)
            } else {
                // At the limit: new clients wait in the listen backlog.
                continue;
            };
            self.listeners[i].armed = true;
            self.listeners[i].cancelling = false;
            self.submit(sqe);
        }
    }

    /// Cancels multishot accepts once headroom is too small for them.
    pub fn check_accept_headroom(&mut self) {
        if self.headroom() < MULTISHOT_HEADROOM {
            self.cancel_accepts(true);
        }
    }

    /// Cancels the armed accepts (all of them, or only the multishot ones).
    pub fn cancel_accepts(&mut self, only_multishot: bool) {
        for i in 0..self.listeners.len() {
            let l = &mut self.listeners[i];
            if l.armed && !l.cancelling && (l.multishot || !only_multishot) {
                l.cancelling = true;
                let ud = Token::new(Op::Accept, i as u32, 0).encode();
                let sqe = opcode::AsyncCancel::new(ud)
                    .build()
                    .user_data(Token::global(Op::Cancel).encode());
                self.submit(sqe);
            }
        }
    }

    fn arm_tick(&mut self) {
        let sqe = opcode::Timeout::new(&*self.tick_ts as *const types::Timespec)
            .count(0)
            .flags(types::TimeoutFlags::MULTISHOT)
            .build()
            .user_data(Token::global(Op::Tick).encode());
        self.submit(sqe);
    }

    fn arm_control(&mut self) {
        let sqe = opcode::Read::new(
            types::Fd(self.control.as_raw_fd()),
            self.control_buf.as_mut_ptr(),
            8,
        )
        .build()
        .user_data(Token::global(Op::Control).encode());
        self.submit(sqe);
    }

    /// Runs until stopped and drained. Consumes the worker.
    pub fn run(mut self, ready: mpsc::Sender<Ready>) {
        self.arm_tick();
        self.arm_control();
        self.arm_accepts();
        if let Some(mut udp) = self.udp.take() {
            udp.arm_all(&mut self);
            self.udp = Some(udp);
        }
        if let Err(e) = self.ring.submit() {
            let _ = ready.send(Err(format!("cpu {}: first submit: {e}", self.cpu)));
            return;
        }
        let _ = ready.send(Ok(self.ring.flags_description.clone()));
        drop(ready);

        let mut batch: Vec<Completion> = Vec::with_capacity(1024);
        loop {
            let wait = if self.runq.is_empty() { 1 } else { 0 };
            if let Err(e) = self.ring.submit_and_wait(wait) {
                eprintln!("cpu {}: io_uring_enter: {e}", self.cpu);
                break;
            }
            batch.clear();
            self.ring.drain(&mut batch);
            for c in batch.iter().copied() {
                self.dispatch(c);
            }
            self.run_queue();
            self.wake_for_unclaimed();
            if self.stopping && self.finished() {
                break;
            }
        }
        // Nothing of ours is referenced by the kernel any more (in_flight == 0, or
        // the loop broke on a dead ring), so dropping the ring and buffers is sound.
    }

    fn finished(&self) -> bool {
        self.in_flight == 0
    }

    fn dispatch(&mut self, c: Completion) {
        let Some(tok) = Token::decode(c.user_data) else {
            eprintln!(
                "cpu {}: completion with unknown user_data {:#x}",
                self.cpu, c.user_data
            );
            return;
        };
        if !c.more() {
            self.in_flight -= 1;
        }
        match tok.op {
            Op::Accept => self.on_accept(tok, c),
            Op::Connect => self.on_connect(tok, c),
            Op::ConnectTimeout => self.on_connect_timeout(tok),
            Op::PollIn0 | Op::PollIn1 | Op::PollOut0 | Op::PollOut1 => self.on_poll(tok, c),
            Op::Recv0 | Op::Recv1 => self.on_recv(tok, c),
            Op::Send0 | Op::Send1 => self.on_send(tok, c),
            Op::Cancel => {}
            Op::Tick => self.on_tick(c),
            Op::Control => self.on_control(c),
            Op::UdpListen | Op::UdpUpstream => {
                if let Some(mut udp) = self.udp.take() {
                    udp.on_completion(self, tok, c);
                    self.udp = Some(udp);
                    if self.stopping {
                        self.maybe_wind_down();
                    }
                }
            }
        }
    }

    fn on_tick(&mut self, c: Completion) {
        if !c.more() {
            // The multishot timer ended (only when cancelled at exit); re-arm unless
            // the worker is winding down.
            if !self.tick_cancelled {
                self.arm_tick();
            }
        }
        self.tick += 1;
        if self.pipes_taken == 0 {
            // A quiet second: give idle pipes back (2 fds and up to --pipe-size of pinned
            // kernel memory each), so an idle engine holds what it held at start.
            self.pipes.clear();
        }
        self.pipes_taken = 0;
        self.expire_idle_conns();
        if self.accept_starved {
            // EMFILE/ENFILE or another accept error earlier: try again once a second,
            // never in a tight loop.
            self.accept_starved = false;
            self.arm_accepts();
        }
        if let Some(mut udp) = self.udp.take() {
            udp.on_tick(self);
            self.udp = Some(udp);
        }
        if self.stopping {
            if self.tick >= self.stop_deadline {
                self.reset_all_conns();
            }
            self.maybe_wind_down();
        }
    }

    fn on_control(&mut self, c: Completion) {
        if c.result >= 0 && !self.stopping {
            self.begin_stop();
        } else if c.result < 0 && c.result != -libc::ECANCELED && !self.stopping {
            self.arm_control();
        }
    }

    /// Stops accepting and starts the drain deadline.
    fn begin_stop(&mut self) {
        self.stopping = true;
        self.stop_deadline = self.tick + self.cfg.drain_timeout_s;
        self.cancel_accepts(false);
        // Listeners with an accept armed close on its final completion; close the
        // others (paused at the limit or for lack of fds) now, so that with nft's
        // fail-open tproxy new connections bypass the stopping engine instead of
        // queueing in a backlog that is reset at exit.
        for l in &mut self.listeners {
            if !l.armed {
                l.fd = None;
            }
        }
        // Clients that never got a slot are reset rather than left waiting.
        for fd in self.parked.drain(..) {
            let _ = sys::set_linger_zero(std::os::fd::AsFd::as_fd(&fd));
        }
        if let Some(mut udp) = self.udp.take() {
            udp.stop(self);
            self.udp = Some(udp);
        }
        self.maybe_wind_down();
    }

    /// Once no connection is left while stopping, cancels the timer so the loop can
    /// end with nothing in flight.
    pub fn maybe_wind_down(&mut self) {
        let udp_idle = self.udp.as_ref().is_none_or(|u| u.is_drained());
        if self.stopping && self.conns.is_empty() && udp_idle && !self.tick_cancelled {
            self.tick_cancelled = true;
            let sqe = opcode::TimeoutRemove::new(Token::global(Op::Tick).encode())
                .build()
                .user_data(Token::global(Op::Cancel).encode());
            self.submit(sqe);
        }
    }

    /// Logs at most one line per core per second: bad input or a failing upstream
    /// must not flood the log (the counters have the totals).
    pub fn log_limited(&mut self, msg: std::fmt::Arguments<'_>) {
        if self.last_log_tick != self.tick {
            self.last_log_tick = self.tick;
            eprintln!("cpu {}: {msg}", self.cpu);
        }
    }

    /// Takes a pipe from the pool or makes one.
    pub fn take_pipe(&mut self) -> io::Result<sys::Pipe> {
        self.pipes_taken += 1;
        match self.pipes.pop() {
            Some(p) => Ok(p),
            None => {
                let p = sys::Pipe::new(self.cfg.pipe_size)?;
                self.stats
                    .pipes_created
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if self.cfg.pipe_size.is_some_and(|want| p.capacity < want) {
                    self.stats
                        .pipes_undersized
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(p)
            }
        }
    }

    /// Returns an EMPTY pipe to the pool (a pipe with data in it must be dropped).
    pub fn give_pipe(&mut self, p: sys::Pipe) {
        if self.pipes.len() < PIPE_POOL_MAX {
            self.pipes.push(p);
        }
    }
}

/// The address families to listen on.
pub fn families(cfg: &Config) -> Vec<bool> {
    if cfg.ipv6 {
        vec![false, true]
    } else {
        vec![false]
    }
}

/// Body of a worker thread: pin, build, report readiness, run.
pub fn thread_main(
    cfg: Arc<Config>,
    cpu: usize,
    stats: Arc<CoreStats>,
    control: OwnedFd,
    ready: mpsc::Sender<Ready>,
) {
    if !core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
        let _ = ready.send(Err(format!("cannot pin the worker thread to CPU {cpu}")));
        return;
    }
    match Worker::new(cfg, cpu, stats, control) {
        Ok(w) => w.run(ready),
        Err(e) => {
            let _ = ready.send(Err(e));
        }
    }
}
