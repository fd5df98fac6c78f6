//! A seeded fake kernel that runs [`ConnMachine`] through random schedules.
//!
//! [`Kernel`] implements [`Effects`] over a model of the two sockets of one relayed
//! connection, the peers behind them, the pipes, the provided-buffer pool and the
//! ring. [`Sim`] feeds the machine events in an order a seed fixes (ops completing
//! in any order, peers that write, read, stall, half-close and reset, a connect
//! that succeeds, fails or times out, buffer wake-ups, run-queue turns, aborts) and
//! checks after every step that:
//!
//! 1. the machine frees the connection only with nothing pending, and nothing is
//!    delivered after;
//! 2. its armed set is exactly the set of ops the kernel has pending;
//! 3. every byte reaches the other peer once and in order, and a clean close
//!    delivered both streams and both FINs;
//! 4. a clean close follows only from both FINs, with the reason naming the first,
//!    and anything that went wrong ends in `reset_sockets` and a reason naming it;
//! 5. pipes and buffers are where the machine says, go back once, a pipe to the
//!    pool only empty, a buffer never under a pending send;
//! 6. every schedule ends in `Step::Free`: when nothing can happen, either the
//!    peers explain it (a stalled reader, an idle open peer: the reader resumes or
//!    the idle timeout aborts) or the machine is stuck, which fails.
//!
//! Two modelling choices matter. Completions are delivered in the order they were
//! posted: the completion queue is FIFO, and the machine relies on that (a wakeup
//! posted after a recv's EAGAIN must be seen after it). And a reset after the
//! engine's last call on that socket (its FIN read, the other FIN written) may end
//! cleanly: nothing the machine does can see it before it closes.
//!
//! Byte streams are tracked as offsets: every queue of the model (a socket's
//! receive or send buffer, a pipe, a provided buffer) holds a contiguous range of
//! one peer's stream, whose byte `i` stands for a pattern byte `f(peer, i)`. A write
//! that does not continue what its destination already holds (a byte lost,
//! duplicated, reordered, or taken from the other stream) fails at the step that
//! makes it, where the trace is most useful; copying bytes would find nothing
//! more and cost most of the time budget.
//!
//! A failure panics with its seed; `SEED=<n> cargo test replay -- --nocapture`
//! reruns that seed in both relay modes and prints a trace of every step.

use std::collections::VecDeque;
use std::panic::{self, AssertUnwindSafe};
use std::time::Instant;

use super::direction::{Io, State};
use super::machine::{ConnMachine, Effects, Held, Phase, SendArgs, Side, SniffStep, Step};
use crate::config::RelayMode;
use crate::core::token::ConnOp;
use crate::stats::CloseReason;

/// Random schedules per relay mode and `cargo test`. For a longer soak, `SEEDS=n`
/// runs seeds `0..n`, and `SEEDS=a..b` seeds `a..b`.
const SEEDS_PER_MODE: u64 = 5000;

/// Socket and peer indices. Direction `d` reads socket `d` and writes `1 - d`,
/// as [`super::machine::source`] says.
const CLIENT: usize = 0;
const SERVER: usize = 1;

const P_IN: i32 = libc::POLLIN as i32;
const P_OUT: i32 = libc::POLLOUT as i32;
const P_ERR: i32 = libc::POLLERR as i32;
const P_HUP: i32 = libc::POLLHUP as i32;
const P_RDHUP: i32 = libc::POLLRDHUP as i32;

fn side(s: usize) -> Side {
    if s == CLIENT {
        Side::Client
    } else {
        Side::Server
    }
}

fn sock_of(s: Side) -> usize {
    match s {
        Side::Client => CLIENT,
        Side::Server => SERVER,
    }
}

fn reset_reason(s: usize) -> CloseReason {
    if s == CLIENT {
        CloseReason::ClientReset
    } else {
        CloseReason::ServerReset
    }
}

/// `ConnOp::ALL` is in bit order, so an op's bit number indexes it.
fn op_index(op: ConnOp) -> usize {
    op.bit().trailing_zeros() as usize
}

fn multishot(op: ConnOp) -> bool {
    matches!(op, ConnOp::PollIn(_) | ConnOp::ErrWatch(_))
}

/// The events a poll reports. The kernel adds `POLLERR | POLLHUP | POLLRDHUP` to
/// every io_uring poll, whatever the driver asked for.
fn interest(op: ConnOp) -> i32 {
    match op {
        ConnOp::PollIn(_) => P_IN | P_RDHUP | P_ERR | P_HUP,
        ConnOp::ErrWatch(_) => P_ERR | P_HUP | P_RDHUP,
        ConnOp::PollOut(_) => P_OUT | P_ERR | P_HUP,
        _ => 0,
    }
}

/// The socket a poll waits on.
fn poll_sock(op: ConnOp) -> usize {
    match op {
        ConnOp::PollIn(d) | ConnOp::ErrWatch(d) => d,
        ConnOp::PollOut(d) => 1 - d,
        _ => unreachable!("{op:?} is not a poll"),
    }
}

fn reason_bit(r: CloseReason) -> u32 {
    1 << (r as u32)
}

/// splitmix64: small, fast, and every seed gives a different stream.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }

    /// Uniform in `lo..=hi`.
    fn between(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below((hi - lo) as u64 + 1) as usize
    }

    fn pct(&mut self, p: u32) -> bool {
        self.below(100) < u64::from(p)
    }

    /// In `1..=max`, each power of two about as likely as the next, so small sizes
    /// (short reads, tiny windows) are as common as large ones.
    fn log_uniform(&mut self, max: usize) -> usize {
        let bits = usize::BITS - max.max(1).leading_zeros();
        let lo = 1usize << self.below(u64::from(bits));
        let hi = (2 * lo - 1).min(max);
        self.between(lo.min(hi), hi)
    }

    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize]
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Connected,
    Refused,
    Unreachable,
    TimedOut,
    /// Any other connect error.
    Failed,
}

/// When a peer resets its connection.
#[derive(Clone, Copy, Debug)]
struct ResetPlan {
    /// Not before this step.
    at: u64,
    /// Only after its own FIN (a reset after a half-close).
    after_fin: bool,
    /// The socket error the engine's socket gets.
    errno: i32,
}

/// Everything a seed decides up front.
#[derive(Clone, Debug)]
struct Params {
    mode: RelayMode,
    /// Bytes each peer sends.
    len: [u64; 2],
    /// Whether each peer half-closes after its data.
    fin: [bool; 2],
    reset: [Option<ResetPlan>; 2],
    /// The step at which a peer stops reading (until liveness needs it again).
    stall_at: [Option<u64>; 2],
    /// Receive window of each engine-facing socket (how far its peer runs ahead).
    rx_cap: [usize; 2],
    /// Send buffer of each engine-facing socket (what the engine may write ahead of
    /// the peer's reads).
    tx_cap: [usize; 2],
    /// Pipe capacities are drawn from `pipe.0..=pipe.1`.
    pipe: (usize, usize),
    /// `ConnMachine::new`'s capacity; the provided buffers' size in copy mode.
    capacity: usize,
    connect: Outcome,
    /// A reset socket reports its error to every call, or only to the first, as
    /// Linux does (`sk_err` is consumed: later reads see EOF, writes EPIPE).
    sticky: bool,
    /// Percent of moves shorter than they could be.
    short_pct: u32,
    /// Percent of `take_pipe` calls that fail with EMFILE.
    emfile_pct: u32,
    /// Percent of `take_pipe` calls that find the pool empty (EAGAIN: read
    /// without a pipe).
    pool_empty_pct: u32,
    bufs: usize,
    /// Buffers other connections may take from the shared pool.
    phantom_takes: u32,
    /// Sockets are non-blocking: a recv or send with nothing to do may fail with
    /// EAGAIN instead of waiting.
    eagain: bool,
    /// Percent of multishot poll completions that are final.
    poll_end_pct: u32,
    /// Multishot polls the kernel may end on its own, without an event.
    poll_ends: u32,
    /// Wakeups of multishot polls that nothing changed (another wakeup on the
    /// socket's wait queue while the polled state holds).
    spurious: u32,
    abort: Option<(u64, CloseReason)>,
    /// Weight of delivering a completion against everything else (10): low values
    /// let several completions pile up.
    deliver_weight: u32,
}

impl Params {
    fn random(mode: RelayMode, rng: &mut Rng) -> Params {
        let mut len = [0u64; 2];
        for l in &mut len {
            if !rng.pct(15) {
                *l = rng.log_uniform(300_000) as u64;
            }
        }
        let total = (len[0] + len[1]) as usize;
        // Moves are at least 1/64 (rarely 1/512) of the longest stream, so even a
        // 300 KB schedule stays within a few thousand steps.
        let floor = len[0].max(len[1]) as usize / if rng.pct(10) { 512 } else { 64 } + 1;
        let top = rng.log_uniform(65536).max(floor);
        let size = |rng: &mut Rng| floor + rng.log_uniform(2 * top + 1 - floor) - 1;
        let horizon = (40 + 8 * (total / top) as u64).min(20_000);
        let mut reset = [None; 2];
        let mut stall_at = [None; 2];
        let mut fin = [false; 2];
        for s in 0..2 {
            fin[s] = rng.pct(80);
            if rng.pct(20) {
                reset[s] = Some(ResetPlan {
                    at: rng.below(horizon),
                    after_fin: fin[s] && rng.pct(40),
                    errno: rng.pick(&[
                        libc::ECONNRESET,
                        libc::ECONNRESET,
                        libc::EPIPE,
                        libc::ETIMEDOUT,
                    ]),
                });
            }
            if rng.pct(20) {
                stall_at[s] = Some(rng.below(horizon));
            }
        }
        let rx_cap = [size(rng), size(rng)];
        let tx_cap = [size(rng), size(rng)];
        let a = size(rng);
        let b = size(rng);
        Params {
            mode,
            len,
            fin,
            reset,
            stall_at,
            rx_cap,
            tx_cap,
            pipe: (a.min(b), a.max(b)),
            capacity: size(rng),
            connect: match rng.below(100) {
                0..=79 => Outcome::Connected,
                80..=86 => Outcome::Refused,
                87..=91 => Outcome::Unreachable,
                92..=97 => Outcome::TimedOut,
                _ => Outcome::Failed,
            },
            sticky: rng.pct(70),
            short_pct: rng.pick(&[0, 20, 60]),
            emfile_pct: if rng.pct(8) { rng.pick(&[10, 30]) } else { 0 },
            pool_empty_pct: if rng.pct(25) {
                rng.pick(&[30, 90, 100])
            } else {
                0
            },
            bufs: rng.between(1, 4),
            phantom_takes: rng.pick(&[0, 0, 2, 8]),
            eagain: rng.pct(30),
            poll_end_pct: rng.pick(&[0, 0, 5, 25]),
            poll_ends: rng.pick(&[0, 1, 3]),
            spurious: rng.pick(&[0, 4, 40]),
            abort: if rng.pct(12) {
                let r = rng.pick(&[
                    CloseReason::IdleTimeout,
                    CloseReason::DrainDeadline,
                    CloseReason::Stopping,
                ]);
                Some((rng.below(horizon), r))
            } else {
                None
            },
            deliver_weight: rng.pick(&[2, 10, 30]),
        }
    }

    /// No randomness that a directed test does not ask for: full moves, roomy
    /// windows, a connect that succeeds, well-behaved peers.
    fn quiet(mode: RelayMode) -> Params {
        Params {
            mode,
            len: [0; 2],
            fin: [false; 2],
            reset: [None; 2],
            stall_at: [None; 2],
            rx_cap: [1 << 20; 2],
            tx_cap: [1 << 20; 2],
            pipe: (65536, 65536),
            capacity: 65536,
            connect: Outcome::Connected,
            sticky: true,
            short_pct: 0,
            emfile_pct: 0,
            pool_empty_pct: 0,
            bufs: 4,
            phantom_takes: 0,
            eagain: false,
            poll_end_pct: 0,
            poll_ends: 0,
            spurious: 0,
            abort: None,
            deliver_weight: 10,
        }
    }
}

/// A range of one peer's stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Span {
    start: u64,
    end: u64,
}

impl Span {
    fn at(start: u64) -> Span {
        Span { start, end: start }
    }

    fn len(&self) -> usize {
        (self.end - self.start) as usize
    }
}

/// An engine-facing socket (the accepted one or the upstream one).
#[derive(Debug)]
struct Sock {
    /// Its peer's stream: read by the engine up to `start`, sent up to `end`.
    rx: Span,
    rx_cap: usize,
    /// Its peer's FIN arrived.
    rx_fin: bool,
    /// The other peer's stream: read by this peer up to `start`, written by the
    /// engine up to `end`.
    tx: Span,
    tx_cap: usize,
    /// The engine shut its write side down.
    tx_fin: bool,
    reset: bool,
    /// The pending socket error (`sk_err`).
    err: Option<i32>,
}

impl Sock {
    fn new(rx_cap: usize, tx_cap: usize) -> Sock {
        Sock {
            rx: Span::default(),
            rx_cap,
            rx_fin: false,
            tx: Span::default(),
            tx_cap,
            tx_fin: false,
            reset: false,
            err: None,
        }
    }

    fn room(&self) -> usize {
        self.tx_cap.saturating_sub(self.tx.len())
    }

    /// What `poll` reports now (as `tcp_poll` does).
    fn mask(&self) -> i32 {
        if self.reset {
            let err = if self.err.is_some() { P_ERR } else { 0 };
            return err | P_HUP | P_IN | P_RDHUP | P_OUT;
        }
        let mut m = 0;
        if self.rx.len() > 0 || self.rx_fin {
            m |= P_IN;
        }
        if self.rx_fin {
            m |= P_RDHUP;
        }
        if self.room() > 0 {
            m |= P_OUT;
        }
        if self.rx_fin && self.tx_fin {
            m |= P_HUP;
        }
        m
    }
}

#[derive(Debug, Default)]
struct Peer {
    fin_sent: bool,
    reset: bool,
    stalled: bool,
    stall_applied: bool,
    /// Read the FIN the engine passed on.
    saw_fin: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Owner {
    Free,
    /// Held by another connection of the core.
    Phantom,
    /// Picked by a recv of direction `d` whose completion is not delivered yet.
    Cqe(usize),
    /// Given to direction `d` of the machine.
    Conn(usize),
}

#[derive(Clone, Copy, Debug)]
struct Buf {
    owner: Owner,
    /// The bytes the recv put there (of stream `data_of`).
    data: Span,
    data_of: usize,
    /// Bytes the machine was told were sent (completions delivered).
    acked: usize,
}

#[derive(Clone, Copy, Debug)]
struct Cqe {
    res: i32,
    more: bool,
    bid: Option<u16>,
}

/// One op of the connection as the kernel sees it (while in `Kernel::live`).
#[derive(Debug, Default)]
struct Slot {
    cancel: bool,
    /// The final completion is posted: the kernel is done with the op.
    done: bool,
    /// Its completions in the completion queue.
    queued: u32,
    send: Option<SendArgs>,
}

/// The model of the kernel and the peers; the machine's [`Effects`].
struct Kernel {
    seed: u64,
    p: Params,
    rng: Rng,
    step: u64,
    ops: [Slot; 12],
    /// One bit per op (of `ConnOp::ALL`) submitted whose final completion is not
    /// delivered yet.
    live: u16,
    /// Posted completions, in order: the ring's completion queue is FIFO, and the
    /// machine relies on it (a wakeup posted after a recv's EAGAIN is seen after
    /// it). Ops complete in a random order; their completions do not overtake.
    cq: VecDeque<(usize, Cqe)>,
    connect_done: bool,
    /// The second of the connect's two completions, posted at a later step.
    connect_later: Option<(usize, i32)>,
    /// The upstream connection exists (so the server peer can act).
    upstream: bool,
    socks: [Sock; 2],
    peers: [Peer; 2],
    pipes: [Option<Span>; 2],
    pipe_cap: [usize; 2],
    bufs: Vec<Buf>,
    /// Copy relay: what a direction moved out of a provided buffer after a send
    /// that could not deliver everything (its own buffer), not yet written.
    spills: [Option<Span>; 2],
    phantom_left: u32,
    poll_ends_left: u32,
    spurious_left: u32,
    waiters: VecDeque<usize>,
    runq: VecDeque<usize>,
    queued: [bool; 2],
    resets: u32,
    established: u32,
    /// Bytes of direction `d` written to its destination, and reported delivered.
    moved: [u64; 2],
    reported: [u64; 2],
    /// Sources whose EOF the machine saw, in order.
    eofs: Vec<usize>,
    /// Close reasons that what went wrong so far may end the connection with; 0 if
    /// nothing did.
    allowed: u32,
    /// Something went wrong that must end the connection with a reset (anything
    /// but a late reset).
    must_fail: bool,
    /// The kernel read the FIN of socket `s` (the machine may not have seen it yet).
    eof_read: [bool; 2],
    abort_done: bool,
    /// Ops submitted during the current step.
    submitted: u32,
    cov: Coverage,
    trace: Option<Vec<String>>,
}

impl Kernel {
    fn new(seed: u64, p: Params, trace: bool) -> Kernel {
        let bufs = match p.mode {
            RelayMode::Copy => p.bufs,
            RelayMode::Splice => 0,
        };
        Kernel {
            seed,
            rng: Rng(seed ^ 0x5eed_fa4e_0000_0000),
            step: 0,
            ops: std::array::from_fn(|_| Slot::default()),
            live: 0,
            cq: VecDeque::new(),
            connect_done: false,
            connect_later: None,
            upstream: false,
            socks: [
                Sock::new(p.rx_cap[0], p.tx_cap[0]),
                Sock::new(p.rx_cap[1], p.tx_cap[1]),
            ],
            peers: Default::default(),
            pipes: [None; 2],
            pipe_cap: [0; 2],
            spills: [None, None],
            bufs: vec![
                Buf {
                    owner: Owner::Free,
                    data: Span::default(),
                    data_of: 0,
                    acked: 0,
                };
                bufs
            ],
            phantom_left: p.phantom_takes,
            poll_ends_left: p.poll_ends,
            spurious_left: p.spurious,
            waiters: VecDeque::new(),
            runq: VecDeque::new(),
            queued: [false; 2],
            resets: 0,
            established: 0,
            moved: [0; 2],
            reported: [0; 2],
            eofs: Vec::new(),
            allowed: 0,
            must_fail: false,
            eof_read: [false; 2],
            abort_done: false,
            submitted: 0,
            cov: Coverage::default(),
            trace: trace.then(Vec::new),
            p,
        }
    }

    #[track_caller]
    fn fail(&self, msg: &str) -> ! {
        if let Some(t) = &self.trace {
            for line in t {
                eprintln!("{line}");
            }
        }
        panic!(
            "fake kernel, seed {} ({:?}), step {}: {msg}\n  rerun: SEED={} cargo test replay -- --nocapture",
            self.seed, self.p.mode, self.step, self.seed
        );
    }

    fn note(&mut self, f: impl FnOnce() -> String) {
        if let Some(t) = &mut self.trace {
            let line = f();
            t.push(format!("{:>6} {line}", self.step));
        }
    }

    /// Something went wrong that must end the connection with a reset, and may
    /// end it with `r`.
    fn misbehave(&mut self, r: CloseReason) {
        self.allowed |= reason_bit(r);
        self.must_fail = true;
    }

    /// A move of at most `max` bytes: sometimes shorter, as sockets and pipes do.
    fn amount(&mut self, max: usize) -> usize {
        if max > 1 && self.rng.pct(self.p.short_pct) {
            self.rng.between(1, max)
        } else {
            max
        }
    }

    /// A free buffer, any of them (the kernel's ring hands them out in the order
    /// they came back, which is as good as random here).
    fn free_buf(&mut self) -> Option<usize> {
        let free = self.bufs.iter().filter(|b| b.owner == Owner::Free).count();
        let nth = self.rng.below(free as u64) as usize;
        (free > 0).then(|| {
            (0..self.bufs.len())
                .filter(|&b| self.bufs[b].owner == Owner::Free)
                .nth(nth)
                .expect("counted")
        })
    }

    fn has_free_buf(&self) -> bool {
        self.bufs.iter().any(|b| b.owner == Owner::Free)
    }

    /// A read on a reset socket: its error, or EOF once a reader took the error.
    /// An inline read of up to `len` bytes from `d`'s source: the result, and the
    /// span of the stream it took (where the caller keeps it: a pipe or its own
    /// buffer).
    fn read_source(&mut self, d: usize, len: usize) -> (Io, Option<Span>) {
        let mut got = None;
        let r = if self.socks[d].reset {
            self.read_err(d)
        } else {
            let rx = self.socks[d].rx;
            if rx.len() > 0 {
                let n = self.amount(rx.len().min(len));
                self.socks[d].rx.start += n as u64;
                got = Some(Span {
                    start: rx.start,
                    end: rx.start + n as u64,
                });
                Io::Done(n)
            } else if self.socks[d].rx_fin {
                self.eof_read[d] = true;
                Io::Done(0)
            } else {
                Io::WouldBlock
            }
        };
        if r == Io::Done(0) && !self.eofs.contains(&d) {
            self.eofs.push(d);
        }
        (r, got)
    }

    /// An inline write of up to `len` bytes of `held` (what direction `d` holds: its
    /// pipe or its own buffer) to `d`'s destination: the result, and what `d` then
    /// holds if anything was written.
    fn write_held(&mut self, d: usize, held: Span, len: usize) -> (Io, Option<Span>) {
        let t = 1 - d;
        if self.socks[t].tx_fin {
            self.fail(&format!(
                "direction {d} writes after shutting its destination down"
            ));
        }
        if self.socks[t].reset {
            (Io::Err(self.write_err(t)), None)
        } else if self.socks[t].room() == 0 {
            (Io::WouldBlock, None)
        } else {
            let n = self.amount(len.min(self.socks[t].room()));
            self.write_dst(
                d,
                Span {
                    start: held.start,
                    end: held.start + n as u64,
                },
            );
            let rest = Span {
                start: held.start + n as u64,
                end: held.end,
            };
            (Io::Done(n), Some(rest))
        }
    }

    fn read_err(&mut self, s: usize) -> Io {
        let sock = &mut self.socks[s];
        let e = if self.p.sticky {
            sock.err
        } else {
            sock.err.take()
        };
        e.map_or(Io::Done(0), Io::Err)
    }

    /// A write on a reset socket: its error (or EPIPE), EPIPE once a call took it.
    fn write_err(&mut self, s: usize) -> i32 {
        let sticky = self.p.sticky;
        let epipe = self.rng.pct(30);
        let sock = &mut self.socks[s];
        let e = if sticky { sock.err } else { sock.err.take() };
        match e {
            Some(_) if epipe => libc::EPIPE,
            Some(e) => e,
            None => libc::EPIPE,
        }
    }

    /// Direction `d` writes `span` of its source's stream to its destination.
    fn write_dst(&mut self, d: usize, span: Span) {
        let t = 1 - d;
        let tx = self.socks[t].tx;
        if span.start != tx.end {
            self.fail(&format!(
                "direction {d} writes bytes {}..{} of its stream after {}: lost, duplicated \
                 or reordered",
                span.start, span.end, tx.end
            ));
        }
        if span.end > self.p.len[d] {
            self.fail(&format!("direction {d} writes past the end of its stream"));
        }
        self.socks[t].tx.end = span.end;
        self.moved[d] += span.len() as u64;
    }

    fn post(&mut self, i: usize, res: i32, more: bool, bid: Option<u16>) {
        debug_assert!(self.is_live(i) && !self.ops[i].done);
        if more {
            if let Some(&(j, last)) = self.cq.back() {
                // One wakeup's completion covers the next, as the kernel's poll
                // coalesces wakeups that come before its task work runs.
                if j == i && last.more && last.res == res {
                    return;
                }
            }
        } else {
            self.ops[i].done = true;
        }
        self.ops[i].queued += 1;
        self.cq.push_back((i, Cqe { res, more, bid }));
        let op = ConnOp::ALL[i];
        self.note(|| format!("  post {op:?} res {res} more {more} bid {bid:?}"));
    }

    /// Socket `s` changed (data, FIN, reset): its multishot polls wake up.
    fn wake_polls(&mut self, s: usize) {
        for op in [ConnOp::PollIn(s), ConnOp::ErrWatch(s)] {
            let i = op_index(op);
            if self.is_live(i) && !self.ops[i].done {
                self.fire(op);
            }
        }
    }

    /// A multishot poll reports its socket's state, if any of it is of interest.
    fn fire(&mut self, op: ConnOp) {
        let m = self.socks[poll_sock(op)].mask() & interest(op);
        if m != 0 {
            let last = self.rng.pct(self.p.poll_end_pct);
            if last {
                self.cov.poll_ends += 1;
            }
            self.post(op_index(op), m, !last, None);
        }
    }

    /// Whether op `i` (armed, not done) can complete now.
    fn ready(&self, i: usize) -> bool {
        let cancel = self.ops[i].cancel;
        let op = ConnOp::ALL[i];
        match op {
            // The connect completes on its outcome (`Ev::Connect`), the other op of
            // the pair after it.
            ConnOp::Connect | ConnOp::ConnectTimeout => {
                self.connect_later.is_some_and(|(j, _)| j == i)
            }
            // Multishot polls complete on events, or once cancelled.
            ConnOp::PollIn(_) | ConnOp::ErrWatch(_) => cancel,
            _ if cancel => true,
            ConnOp::PollOut(_) => self.socks[poll_sock(op)].mask() & interest(op) != 0,
            ConnOp::Recv(d) => {
                let s = &self.socks[d];
                s.reset || s.rx.len() > 0 || s.rx_fin || !self.has_free_buf() || self.p.eagain
            }
            ConnOp::Send(d) => {
                let t = &self.socks[1 - d];
                t.reset || t.room() > 0 || self.p.eagain
            }
            ConnOp::SniffTimer => self.fail("a sniff timer outside a sniffing connection"),
        }
    }

    /// The kernel completes op `i` (see [`Kernel::ready`]).
    fn progress(&mut self, i: usize) {
        let op = ConnOp::ALL[i];
        let cancel = self.ops[i].cancel;
        // A cancelled op that could complete on its own may still do so: the
        // cancel lost the race.
        let real = !cancel || self.rng.pct(30);
        match op {
            ConnOp::SniffTimer => self.fail("a sniff timer outside a sniffing connection"),
            ConnOp::PollIn(_) | ConnOp::ErrWatch(_) | ConnOp::PollOut(_) => {
                let m = self.socks[poll_sock(op)].mask() & interest(op);
                if m != 0 && real {
                    if cancel {
                        self.cov.cancel_races += 1;
                    }
                    self.post(i, m, false, None);
                } else {
                    self.post(i, -libc::ECANCELED, false, None);
                }
            }
            ConnOp::Recv(d) => {
                let can = {
                    let s = &self.socks[d];
                    s.reset || s.rx.len() > 0 || s.rx_fin || !self.has_free_buf()
                };
                if cancel && !(can && real) {
                    self.post(i, -libc::ECANCELED, false, None);
                    return;
                }
                if cancel {
                    self.cov.cancel_races += 1;
                }
                let (res, bid) = self.recv(d);
                self.post(i, res, false, bid);
            }
            ConnOp::Send(d) => {
                let can = {
                    let t = &self.socks[1 - d];
                    t.reset || t.room() > 0
                };
                if cancel && !(can && real) {
                    self.post(i, -libc::ECANCELED, false, None);
                    return;
                }
                if cancel {
                    self.cov.cancel_races += 1;
                }
                let res = self.send(d);
                self.post(i, res, false, None);
            }
            ConnOp::Connect | ConnOp::ConnectTimeout => {
                let (j, res) = self.connect_later.take().expect("ready");
                self.post(j, res, false, None);
            }
        }
    }

    /// A buffer-select recv on socket `d`: the buffer is picked first (no buffer,
    /// no recv), then the socket is read.
    fn recv(&mut self, d: usize) -> (i32, Option<u16>) {
        let Some(bid) = self.free_buf() else {
            self.cov.enobufs += 1;
            return (-libc::ENOBUFS, None);
        };
        if self.socks[d].reset {
            return match self.read_err(d) {
                Io::Err(e) => (-e, None),
                _ => (0, None),
            };
        }
        let rx = self.socks[d].rx;
        if rx.len() > 0 {
            let n = self.amount(rx.len().min(self.p.capacity));
            let data = Span {
                start: rx.start,
                end: rx.start + n as u64,
            };
            self.socks[d].rx.start = data.end;
            self.bufs[bid] = Buf {
                owner: Owner::Cqe(d),
                data,
                data_of: d,
                acked: 0,
            };
            return (n as i32, Some(bid as u16));
        }
        if self.socks[d].rx_fin {
            self.eof_read[d] = true;
            // The kernel may consume a buffer for an empty read: it must come back.
            if self.rng.pct(50) {
                self.bufs[bid] = Buf {
                    owner: Owner::Cqe(d),
                    data: Span::at(rx.start),
                    data_of: d,
                    acked: 0,
                };
                return (0, Some(bid as u16));
            }
            return (0, None);
        }
        self.cov.eagain += 1;
        (-libc::EAGAIN, None)
    }

    /// A send of direction `d`'s buffer (MSG_WAITALL: all of it, unless the
    /// destination has no room for more, or an error).
    fn send(&mut self, d: usize) -> i32 {
        let a = self.ops[op_index(ConnOp::Send(d))]
            .send
            .expect("a send has its arguments");
        let t = 1 - d;
        if self.socks[t].tx_fin {
            self.fail(&format!(
                "direction {d} sends after shutting its destination down"
            ));
        }
        if self.socks[t].reset {
            return -self.write_err(t);
        }
        let room = self.socks[t].room();
        if room == 0 {
            self.cov.eagain += 1;
            return -libc::EAGAIN;
        }
        let n = if room >= a.len && self.rng.pct(80) {
            a.len
        } else {
            self.amount(a.len.min(room))
        };
        if n < a.len {
            self.cov.short_sends += 1;
        }
        let b = self.bufs[a.bid as usize];
        if b.data_of != d {
            self.fail(&format!(
                "direction {d} sends buffer {} of the other stream",
                a.bid
            ));
        }
        let start = b.data.start + a.off as u64;
        self.write_dst(
            d,
            Span {
                start,
                end: start + n as u64,
            },
        );
        n as i32
    }

    /// The connect (and its link timeout) completes.
    fn connect(&mut self) {
        let cancel = self.ops[op_index(ConnOp::Connect)].cancel;
        self.connect_done = true;
        let (c, t) = if cancel && self.rng.pct(70) {
            (-libc::ECANCELED, -libc::ECANCELED)
        } else {
            match self.p.connect {
                Outcome::Connected => {
                    self.upstream = true;
                    (0, -libc::ECANCELED)
                }
                Outcome::Refused => {
                    self.misbehave(CloseReason::ConnectRefused);
                    (-libc::ECONNREFUSED, -libc::ECANCELED)
                }
                Outcome::Unreachable => {
                    self.misbehave(CloseReason::Unreachable);
                    (-libc::EHOSTUNREACH, -libc::ECANCELED)
                }
                Outcome::TimedOut => {
                    self.misbehave(CloseReason::ConnectTimeout);
                    (-libc::ECANCELED, -libc::ETIME)
                }
                Outcome::Failed => {
                    self.misbehave(CloseReason::ConnectError);
                    (-libc::ECONNRESET, -libc::ECANCELED)
                }
            }
        };
        // Whichever op finished first posts first; the other follows, maybe after
        // completions of other ops.
        let (c, t) = (
            (op_index(ConnOp::Connect), c),
            (op_index(ConnOp::ConnectTimeout), t),
        );
        let (first, later) = if t.1 == -libc::ETIME && self.rng.pct(50) {
            (t, c)
        } else {
            (c, t)
        };
        self.post(first.0, first.1, false, None);
        self.connect_later = Some(later);
    }

    fn peer_active(&self, s: usize) -> bool {
        !self.peers[s].reset && (s == CLIENT || self.upstream)
    }

    fn peer_send(&mut self, s: usize) {
        let sock = &self.socks[s];
        let max = (self.p.len[s] - sock.rx.end).min((sock.rx_cap - sock.rx.len()) as u64);
        let n = self.amount(max as usize) as u64;
        self.socks[s].rx.end += n;
        self.wake_polls(s);
    }

    fn peer_fin(&mut self, s: usize) {
        self.peers[s].fin_sent = true;
        self.socks[s].rx_fin = true;
        self.wake_polls(s);
    }

    fn peer_read(&mut self, s: usize) {
        let n = self.amount(self.socks[s].tx.len()) as u64;
        let sock = &mut self.socks[s];
        sock.tx.start += n;
        if sock.tx.len() == 0 && sock.tx_fin {
            self.peers[s].saw_fin = true;
        }
    }

    fn peer_reset(&mut self, s: usize, errno: i32) {
        self.peers[s].reset = true;
        self.socks[s].reset = true;
        self.socks[s].err = Some(errno);
        if self.eof_read[s] && self.socks[s].tx_fin {
            // Late: the engine's last calls on this socket (reading its FIN, writing
            // the other's) are done, so nothing the machine does can notice the
            // reset; it races with the close, and a clean close is as right.
            self.allowed |= reason_bit(reset_reason(s));
        } else {
            self.misbehave(reset_reason(s));
        }
        self.wake_polls(s);
    }

    fn is_live(&self, i: usize) -> bool {
        self.live & (1 << i) != 0
    }
}

impl Effects for Kernel {
    fn now(&self) -> u64 {
        self.step / 8
    }

    fn submit_connect(&mut self) {
        for op in [ConnOp::Connect, ConnOp::ConnectTimeout] {
            if self.is_live(op_index(op)) {
                self.fail("connect submitted twice");
            }
            self.live |= 1 << op_index(op);
        }
        self.submitted += 2;
        self.note(|| "  submit connect".into());
    }

    fn submit(&mut self, op: ConnOp, send: Option<SendArgs>) {
        let i = op_index(op);
        if self.is_live(i) {
            self.fail(&format!(
                "{op:?} submitted while the previous one is pending"
            ));
        }
        if send.is_some() != matches!(op, ConnOp::Send(_)) {
            self.fail(&format!("{op:?} submitted with send arguments {send:?}"));
        }
        let copy = self.p.mode == RelayMode::Copy;
        match op {
            ConnOp::Connect | ConnOp::ConnectTimeout => {
                self.fail("the connect goes through submit_connect")
            }
            ConnOp::Recv(d) => {
                if !copy {
                    self.fail("recv in splice mode");
                }
                if self.bufs.iter().any(|b| b.owner == Owner::Conn(d)) {
                    self.fail(&format!("direction {d} reads while it holds a buffer"));
                }
            }
            ConnOp::Send(d) => {
                if !copy {
                    self.fail("send in splice mode");
                }
                let a = send.expect("checked above");
                let Some(b) = self.bufs.get(a.bid as usize).copied() else {
                    self.fail(&format!("send of unknown buffer {}", a.bid));
                };
                if b.owner != Owner::Conn(d) {
                    self.fail(&format!(
                        "direction {d} sends buffer {} it does not hold ({:?})",
                        a.bid, b.owner
                    ));
                }
                if a.len == 0 || a.off != b.acked || a.off + a.len != b.data.len() {
                    self.fail(&format!(
                        "send {a:?} of a buffer with {} bytes, {} sent",
                        b.data.len(),
                        b.acked
                    ));
                }
            }
            _ => {}
        }
        self.live |= 1 << i;
        self.ops[i].send = send;
        self.submitted += 1;
        self.note(|| format!("  submit {op:?} {send:?}"));
        if multishot(op) {
            // Arming checks the socket at once.
            self.fire(op);
        }
    }

    fn cancel(&mut self, op: ConnOp) {
        if op == ConnOp::ConnectTimeout {
            self.fail("cancel of the link timeout (the kernel cannot find it)");
        }
        let i = op_index(op);
        if !self.is_live(i) {
            self.fail(&format!("cancel of {op:?}, which is not pending"));
        }
        if self.ops[i].cancel {
            self.fail(&format!("{op:?} cancelled twice"));
        }
        self.ops[i].cancel = true;
        self.note(|| format!("  cancel {op:?}"));
    }

    fn splice_in(&mut self, d: usize, len: usize) -> Io {
        if self.p.mode != RelayMode::Splice {
            self.fail("splice in copy mode");
        }
        let Some(pipe) = self.pipes[d] else {
            self.fail(&format!("direction {d} splices in without a pipe"));
        };
        if pipe.len() != 0 {
            self.fail(&format!(
                "direction {d} reads with {} bytes in its pipe",
                pipe.len()
            ));
        }
        if len == 0 || len > self.pipe_cap[d] {
            self.fail(&format!(
                "direction {d} splices {len} bytes into a pipe of {}",
                self.pipe_cap[d]
            ));
        }
        let (r, got) = self.read_source(d, len);
        if got.is_some() {
            self.pipes[d] = got;
        }
        self.note(|| format!("  splice_in {d} {len} -> {r:?}"));
        r
    }

    fn read_prefix(&mut self, d: usize, len: usize) -> Io {
        if self.p.mode != RelayMode::Splice {
            self.fail("read_prefix in copy mode");
        }
        if self.pipes[d].is_some() || self.spills[d].is_some() {
            self.fail(&format!(
                "direction {d} reads into its own buffer while holding {:?} / {:?}",
                self.pipes[d], self.spills[d]
            ));
        }
        if len == 0 || len > super::machine::FALLBACK_READ_MAX {
            self.fail(&format!(
                "direction {d} reads {len} bytes into its own buffer"
            ));
        }
        let (r, got) = self.read_source(d, len);
        if got.is_some() {
            self.spills[d] = got;
            self.cov.fallbacks += 1;
        }
        self.note(|| format!("  read_prefix {d} {len} -> {r:?}"));
        r
    }

    fn splice_out(&mut self, d: usize, len: usize) -> Io {
        if self.p.mode != RelayMode::Splice {
            self.fail("splice in copy mode");
        }
        let Some(pipe) = self.pipes[d] else {
            self.fail(&format!("direction {d} splices out without a pipe"));
        };
        if len == 0 || len != pipe.len() {
            self.fail(&format!(
                "direction {d} splices out {len} bytes of a pipe holding {}",
                pipe.len()
            ));
        }
        let (r, rest) = self.write_held(d, pipe, len);
        if matches!(r, Io::Done(n) if n < len) {
            self.cov.short_sends += 1;
        }
        if rest.is_some() {
            self.pipes[d] = rest;
        }
        self.note(|| format!("  splice_out {d} {len} -> {r:?}"));
        r
    }

    fn shutdown_write(&mut self, d: usize) -> Io {
        let t = 1 - d;
        if self.socks[t].tx_fin {
            self.fail(&format!("direction {d} shuts its destination down twice"));
        }
        if !self.eofs.contains(&d) {
            self.fail(&format!(
                "direction {d} passes on a FIN its source never sent"
            ));
        }
        if self.socks[t].tx.end != self.socks[d].rx.start {
            self.fail(&format!(
                "direction {d} passes its FIN on with {} bytes read and {} written",
                self.socks[d].rx.start, self.socks[t].tx.end
            ));
        }
        // Linux: a reset socket is TCP_CLOSE, and shutdown() of one is ENOTCONN.
        let r = if self.socks[t].reset {
            Io::Err(libc::ENOTCONN)
        } else {
            self.socks[t].tx_fin = true;
            Io::Done(0)
        };
        self.note(|| format!("  shutdown_write {d} -> {r:?}"));
        r
    }

    fn take_pipe(&mut self, d: usize) -> Result<usize, i32> {
        if self.p.mode != RelayMode::Splice {
            self.fail("take_pipe in copy mode");
        }
        if self.pipes[d].is_some() {
            self.fail(&format!("direction {d} takes a second pipe"));
        }
        if self.rng.pct(self.p.emfile_pct) {
            self.misbehave(CloseReason::LocalError);
            self.note(|| format!("  take_pipe {d} -> EMFILE"));
            return Err(libc::EMFILE);
        }
        if self.rng.pct(self.p.pool_empty_pct) {
            self.note(|| format!("  take_pipe {d} -> EAGAIN (pool empty)"));
            return Err(libc::EAGAIN);
        }
        let cap = self.rng.between(self.p.pipe.0, self.p.pipe.1);
        self.pipes[d] = Some(Span::at(self.socks[d].rx.start));
        self.pipe_cap[d] = cap;
        self.cov.pipes += 1;
        self.note(|| format!("  take_pipe {d} -> {cap}"));
        Ok(cap)
    }

    fn put_pipe(&mut self, d: usize, empty: bool) {
        let Some(pipe) = self.pipes[d].take() else {
            self.fail(&format!("direction {d} returns a pipe it does not hold"));
        };
        if empty && pipe.len() != 0 {
            self.fail(&format!(
                "direction {d} returns a pipe with {} bytes to the pool",
                pipe.len()
            ));
        }
        self.note(|| format!("  put_pipe {d} empty {empty} (holds {})", pipe.len()));
    }

    fn put_buf(&mut self, bid: u16) {
        let Some(b) = self.bufs.get(bid as usize).copied() else {
            self.fail(&format!("returns unknown buffer {bid}"));
        };
        if !matches!(b.owner, Owner::Conn(_)) {
            self.fail(&format!(
                "returns buffer {bid}, which it does not hold ({:?})",
                b.owner
            ));
        }
        for d in 0..2 {
            let i = op_index(ConnOp::Send(d));
            if self.is_live(i) && self.ops[i].send.is_some_and(|a| a.bid == bid) {
                self.fail(&format!("returns buffer {bid} while Send({d}) reads it"));
            }
        }
        self.bufs[bid as usize].owner = Owner::Free;
        self.note(|| format!("  put_buf {bid}"));
    }

    fn wait_buf(&mut self, d: usize) {
        if self.p.mode != RelayMode::Copy {
            self.fail("wait_buf in splice mode");
        }
        self.waiters.push_back(d);
        self.note(|| format!("  wait_buf {d}"));
    }

    fn requeue(&mut self, d: usize) {
        if self.queued[d] {
            self.fail(&format!("direction {d} requeued twice"));
        }
        self.queued[d] = true;
        self.runq.push_back(d);
        self.cov.requeues += 1;
        self.note(|| format!("  requeue {d}"));
    }

    fn reset_sockets(&mut self) {
        self.resets += 1;
        if self.resets > 1 {
            self.fail("reset_sockets called twice");
        }
        self.note(|| "  reset_sockets".into());
    }

    fn socket_error(&mut self, s: Side) -> Option<i32> {
        let i = sock_of(s);
        let sock = &mut self.socks[i];
        let e = if self.p.sticky {
            sock.err
        } else {
            sock.err.take()
        };
        self.note(|| format!("  socket_error {s:?} -> {e:?}"));
        e
    }

    fn established(&mut self) {
        self.established += 1;
        self.note(|| "  established".into());
    }

    fn delivered(&mut self, d: usize, n: usize) {
        self.reported[d] += n as u64;
        if self.reported[d] > self.moved[d] {
            self.fail(&format!(
                "direction {d} reports {} bytes delivered, {} were written",
                self.reported[d], self.moved[d]
            ));
        }
    }

    // The fake models connections that connect at once; the sniffing phase (no I/O
    // of its own beyond one recv) is covered by the namespace tests.
    fn sniff(&mut self, _timed_out: bool) -> SniffStep {
        self.fail("sniff() outside a sniffing connection")
    }

    fn write_prefix(&mut self, d: usize, _off: usize, len: usize) -> Io {
        let Some(spill) = self.spills[d] else {
            self.fail(&format!("direction {d} writes its own buffer without one"));
        };
        if len == 0 || len != spill.len() {
            self.fail(&format!(
                "direction {d} writes {len} bytes of its own buffer holding {}",
                spill.len()
            ));
        }
        let (r, rest) = self.write_held(d, spill, len);
        if rest.is_some() {
            self.spills[d] = rest;
        }
        self.note(|| format!("  write_prefix {d} {len} -> {r:?}"));
        r
    }

    fn drop_prefix(&mut self, d: usize) {
        if self.spills[d].is_none() {
            self.fail(&format!(
                "direction {d} frees an own buffer it does not have"
            ));
        }
        self.spills[d] = None;
        self.note(|| format!("  drop_prefix {d}"));
    }

    fn spill(&mut self, d: usize, bid: u16, off: usize, len: usize) {
        if self.p.mode != RelayMode::Copy {
            self.fail("spill in splice mode");
        }
        let Some(b) = self.bufs.get(bid as usize).copied() else {
            self.fail(&format!("spill of unknown buffer {bid}"));
        };
        if b.owner != Owner::Conn(d) || b.data_of != d || b.acked != off {
            self.fail(&format!(
                "direction {d} spills buffer {bid} from {off} ({b:?})"
            ));
        }
        if off + len != b.data.len() || len == 0 {
            self.fail(&format!(
                "spill of {len} bytes from {off} of a buffer with {}",
                b.data.len()
            ));
        }
        if self.spills[d].is_some() {
            self.fail(&format!("direction {d} spills twice"));
        }
        self.spills[d] = Some(Span {
            start: b.data.start + off as u64,
            end: b.data.end,
        });
        self.cov.spills += 1;
        self.note(|| format!("  spill {d} {bid} {off}+{len}"));
    }
}

/// One thing that happens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ev {
    /// The connect and its link timeout complete.
    Connect,
    /// The kernel completes op `i` of `ConnOp::ALL` (posts its completion).
    Progress(usize),
    /// The driver hands the completion at the head of the queue to the machine.
    Deliver,
    /// The kernel ends multishot poll `i` on its own.
    PollEnd(usize),
    /// Multishot poll `i` wakes up without a change.
    Spurious(usize),
    PeerSend(usize),
    PeerFin(usize),
    PeerRead(usize),
    PeerReset(usize),
    /// The run queue gives a direction its turn.
    Resume,
    /// A buffer is free: the core wakes the first waiter.
    Wake,
    PhantomTake,
    PhantomGive,
    /// Stalled readers read again (liveness).
    Unstall,
    Abort(CloseReason),
}

impl Ev {
    /// Events of the kernel and the driver, not of the peers.
    fn is_kernel(self) -> bool {
        matches!(
            self,
            Ev::Connect | Ev::Progress(_) | Ev::Deliver | Ev::Resume | Ev::Wake
        )
    }
}

/// What the schedules exercised, summed over seeds, so a generator that stops
/// reaching a case is noticed.
#[derive(Debug, Default)]
struct Coverage {
    schedules: u64,
    steps: u64,
    max_steps: u64,
    reasons: [u32; CloseReason::ALL.len()],
    enobufs: u32,
    eagain: u32,
    requeues: u32,
    poll_ends: u32,
    cancel_races: u32,
    short_sends: u32,
    spills: u32,
    pipes: u32,
    fallbacks: u32,
    wakes: u32,
    idle_aborts: u32,
}

impl Coverage {
    fn add(&mut self, o: &Coverage) {
        self.schedules += o.schedules;
        self.steps += o.steps;
        self.max_steps = self.max_steps.max(o.max_steps);
        for (a, b) in self.reasons.iter_mut().zip(o.reasons) {
            *a += b;
        }
        self.enobufs += o.enobufs;
        self.eagain += o.eagain;
        self.requeues += o.requeues;
        self.poll_ends += o.poll_ends;
        self.cancel_races += o.cancel_races;
        self.short_sends += o.short_sends;
        self.spills += o.spills;
        self.pipes += o.pipes;
        self.fallbacks += o.fallbacks;
        self.wakes += o.wakes;
        self.idle_aborts += o.idle_aborts;
    }

    fn reason(&self, r: CloseReason) -> u32 {
        self.reasons[r as usize]
    }
}

/// The machine and the model, stepped together.
struct Sim {
    k: Kernel,
    m: ConnMachine,
    freed: bool,
    close_checked: bool,
    steps: u64,
    evs: Vec<(Ev, u32)>,
}

impl Sim {
    fn new(seed: u64, p: Params, trace: bool) -> Sim {
        let mut k = Kernel::new(seed, p, trace);
        let mut m = ConnMachine::new(k.p.mode, k.p.capacity, 0);
        k.note(|| "start".into());
        m.start(&mut k);
        let mut sim = Sim {
            k,
            m,
            freed: false,
            close_checked: false,
            steps: 0,
            evs: Vec::new(),
        };
        sim.check(Step::Continue, Phase::Connecting);
        sim
    }

    fn random(seed: u64, mode: RelayMode, trace: bool) -> Sim {
        let mut rng = Rng(seed);
        let p = Params::random(mode, &mut rng);
        let sim = Sim::new(seed, p, trace);
        if trace {
            eprintln!("seed {seed} {mode:?}: {:?}", sim.k.p);
        }
        sim
    }

    /// Runs random events until the machine frees the connection.
    fn run(&mut self) {
        let total = self.k.p.len[0] + self.k.p.len[1];
        let limit = 20_000 + 64 * total / self.k.p.pipe.0.min(self.k.p.capacity) as u64;
        while !self.freed {
            if self.steps > limit {
                self.k
                    .fail(&format!("not freed after {} steps", self.steps));
            }
            self.collect();
            let ev = if self.evs.is_empty() {
                self.idle()
            } else {
                let sum: u32 = self.evs.iter().map(|e| e.1).sum();
                let mut x = self.k.rng.below(u64::from(sum)) as u32;
                let mut pick = self.evs[0].0;
                for &(ev, w) in &self.evs {
                    if x < w {
                        pick = ev;
                        break;
                    }
                    x -= w;
                }
                pick
            };
            self.ev(ev);
        }
    }

    /// Applies kernel and driver events (never the peers') until none is left.
    fn settle(&mut self) {
        self.settle_where(|_| true);
    }

    /// Like `settle`, but only completes and delivers ops that `only` accepts.
    fn settle_where(&mut self, only: impl Fn(ConnOp) -> bool) {
        for _ in 0..10_000 {
            if self.freed {
                return;
            }
            self.collect();
            let next = self.evs.iter().map(|e| e.0).find(|&ev| {
                ev.is_kernel()
                    && match ev {
                        Ev::Progress(i) => only(ConnOp::ALL[i]),
                        Ev::Deliver => only(ConnOp::ALL[self.k.cq[0].0]),
                        _ => true,
                    }
            });
            match next {
                Some(ev) => self.ev(ev),
                None => return,
            }
        }
        self.k.fail("settle does not settle");
    }

    /// The events that can happen now, with their weights.
    fn collect(&mut self) {
        let k = &mut self.k;
        let step = self.steps;
        self.evs.clear();
        let evs = &mut self.evs;
        if !k.connect_done && k.is_live(op_index(ConnOp::Connect)) {
            evs.push((Ev::Connect, 10));
        }
        if !k.cq.is_empty() {
            evs.push((Ev::Deliver, k.p.deliver_weight));
        }
        let mut live = k.live;
        while live != 0 {
            let i = live.trailing_zeros() as usize;
            live &= live - 1;
            let op = ConnOp::ALL[i];
            let slot = &k.ops[i];
            if !slot.done && k.ready(i) {
                evs.push((Ev::Progress(i), 10));
            }
            if !slot.done && multishot(op) {
                if k.poll_ends_left > 0 {
                    evs.push((Ev::PollEnd(i), 1));
                }
                let m = k.socks[poll_sock(op)].mask() & interest(op);
                if k.spurious_left > 0 && m != 0 {
                    evs.push((Ev::Spurious(i), 2));
                }
            }
        }
        for s in 0..2 {
            if !k.peer_active(s) {
                continue;
            }
            if let Some(at) = k.p.stall_at[s] {
                if step >= at && !k.peers[s].stall_applied {
                    k.peers[s].stall_applied = true;
                    k.peers[s].stalled = true;
                }
            }
            let sock = &k.socks[s];
            if sock.rx.end < k.p.len[s] && sock.rx.len() < sock.rx_cap {
                evs.push((Ev::PeerSend(s), 10));
            }
            if k.p.fin[s] && sock.rx.end == k.p.len[s] && !k.peers[s].fin_sent {
                evs.push((Ev::PeerFin(s), 10));
            }
            let peer = &k.peers[s];
            if !peer.stalled && (sock.tx.len() > 0 || (sock.tx_fin && !peer.saw_fin)) {
                evs.push((Ev::PeerRead(s), 10));
            }
            if let Some(plan) = k.p.reset[s] {
                if step >= plan.at && (!plan.after_fin || peer.fin_sent) {
                    evs.push((Ev::PeerReset(s), 5));
                }
            }
        }
        if !k.runq.is_empty() {
            evs.push((Ev::Resume, 10));
        }
        if !k.waiters.is_empty() && k.has_free_buf() {
            evs.push((Ev::Wake, 10));
        }
        if k.phantom_left > 0 && k.has_free_buf() {
            evs.push((Ev::PhantomTake, 3));
        }
        if k.bufs.iter().any(|b| b.owner == Owner::Phantom) {
            evs.push((Ev::PhantomGive, 5));
        }
        if let Some((at, r)) = k.p.abort {
            if step >= at && !k.abort_done {
                evs.push((Ev::Abort(r), 10));
            }
        }
    }

    /// Nothing can happen by itself: either the peers explain it (a stalled reader,
    /// a peer that keeps the connection open and quiet), and the idle timeout or the
    /// reader resumes, or the machine is stuck.
    fn idle(&mut self) -> Ev {
        let k = &mut self.k;
        let phase = self.m.phase();
        let stalled = (0..2).any(|s| k.peers[s].stalled && !k.peers[s].reset);
        if stalled {
            if phase == Phase::Relaying && k.rng.pct(25) {
                k.cov.idle_aborts += 1;
                return Ev::Abort(CloseReason::IdleTimeout);
            }
            return Ev::Unstall;
        }
        if phase != Phase::Relaying {
            k.fail(&format!(
                "stuck in {phase:?}: an op never completes (not cancelled?)"
            ));
        }
        for s in 0..2 {
            if k.socks[s].reset {
                k.fail(&format!(
                    "{:?} reset and nothing noticed it with every reader reading",
                    side(s)
                ));
            }
        }
        // Quiet: every byte sent was passed on and read, every FIN sent was passed
        // on and seen, and some peer keeps its side open.
        let mut open = false;
        for s in 0..2 {
            let sock = &k.socks[s];
            let fin_passed = !k.peers[s].fin_sent || k.peers[1 - s].saw_fin;
            if sock.rx.end != k.p.len[s] || sock.rx.len() > 0 || sock.tx.len() > 0 || !fin_passed {
                k.fail(&format!(
                    "stuck relaying: {:?} socket {sock:?}, peers {:?}",
                    side(s),
                    k.peers
                ));
            }
            open |= !k.peers[s].fin_sent;
        }
        if !open {
            k.fail("both FINs were passed on and seen, but the connection is not closed");
        }
        k.cov.idle_aborts += 1;
        Ev::Abort(CloseReason::IdleTimeout)
    }

    /// Applies one event, then checks every invariant.
    fn ev(&mut self, ev: Ev) {
        self.k.submitted = 0;
        let prev = self.m.phase();
        self.k.note(|| format!("{ev:?} ({prev:?})"));
        let step = self.apply(ev);
        self.check(step, prev);
        self.steps += 1;
        self.k.step = self.steps;
    }

    fn apply(&mut self, ev: Ev) -> Step {
        let k = &mut self.k;
        match ev {
            Ev::Connect => k.connect(),
            Ev::Progress(i) => k.progress(i),
            Ev::Deliver => return self.deliver(),
            Ev::PollEnd(i) => {
                k.poll_ends_left -= 1;
                let op = ConnOp::ALL[i];
                let m = k.socks[poll_sock(op)].mask() & interest(op);
                let res = if m != 0 && k.rng.pct(50) {
                    m
                } else {
                    -libc::ECANCELED
                };
                k.cov.poll_ends += 1;
                k.post(i, res, false, None);
            }
            Ev::Spurious(i) => {
                k.spurious_left -= 1;
                k.fire(ConnOp::ALL[i]);
            }
            Ev::PeerSend(s) => k.peer_send(s),
            Ev::PeerFin(s) => k.peer_fin(s),
            Ev::PeerRead(s) => k.peer_read(s),
            Ev::PeerReset(s) => {
                let plan = k.p.reset[s].expect("a reset is planned");
                k.peer_reset(s, plan.errno);
            }
            Ev::Resume => {
                let d = k.runq.pop_front().expect("queued");
                k.queued[d] = false;
                return self.m.resume(d, k);
            }
            Ev::Wake => {
                k.cov.wakes += 1;
                while let Some(d) = k.waiters.pop_front() {
                    let (took, step) = self.m.on_buffer(d, k);
                    k.note(|| format!("  on_buffer {d} -> {took}"));
                    if took {
                        return step;
                    }
                    if step != Step::Continue {
                        k.fail("a wake-up not taken frees the connection");
                    }
                }
            }
            Ev::PhantomTake => {
                let b = k.free_buf().expect("a free buffer");
                k.bufs[b].owner = Owner::Phantom;
                k.phantom_left -= 1;
            }
            Ev::PhantomGive => {
                let b = k
                    .bufs
                    .iter()
                    .position(|b| b.owner == Owner::Phantom)
                    .expect("a phantom buffer");
                k.bufs[b].owner = Owner::Free;
            }
            Ev::Unstall => {
                for p in &mut k.peers {
                    p.stalled = false;
                }
            }
            Ev::Abort(r) => {
                k.abort_done = true;
                k.misbehave(r);
                return self.m.abort(r, k);
            }
        }
        Step::Continue
    }

    fn deliver(&mut self) -> Step {
        let k = &mut self.k;
        let (i, cqe) = k.cq.pop_front().expect("a pending completion");
        let op = ConnOp::ALL[i];
        let send = k.ops[i].send;
        k.ops[i].queued -= 1;
        if !cqe.more {
            if k.ops[i].queued != 0 {
                k.fail(&format!("{op:?} has completions after its final one"));
            }
            k.ops[i] = Slot::default();
            k.live &= !(1 << i);
        }
        let phase = self.m.phase();
        if let Some(b) = cqe.bid {
            let d = match op {
                ConnOp::Recv(d) => d,
                _ => k.fail(&format!("{op:?} completes with a buffer")),
            };
            let owner = k.bufs[b as usize].owner;
            if owner != Owner::Cqe(d) {
                k.fail(&format!("buffer {b} delivered while {owner:?}"));
            }
            k.bufs[b as usize].owner = Owner::Conn(d);
        }
        match op {
            ConnOp::Send(_) if cqe.res > 0 => {
                let a = send.expect("a send has its arguments");
                k.bufs[a.bid as usize].acked += cqe.res as usize;
            }
            ConnOp::Recv(d) if cqe.res == 0 && phase == Phase::Relaying && !k.eofs.contains(&d) => {
                k.eofs.push(d);
            }
            _ => {}
        }
        let established = k.established;
        k.note(|| {
            format!(
                "  deliver {op:?} res {} more {} bid {:?}",
                cqe.res, cqe.more, cqe.bid
            )
        });
        let step = self.m.on_completion(op, cqe.res, cqe.more, cqe.bid, k);
        let expect = u32::from(op == ConnOp::Connect && cqe.res == 0 && phase == Phase::Connecting);
        if k.established != established + expect {
            k.fail(&format!(
                "established called {} times for {op:?} res {} in {phase:?}",
                k.established - established,
                cqe.res
            ));
        }
        step
    }

    /// The invariants, after every step.
    fn check(&mut self, step: Step, prev: Phase) {
        let k = &self.k;
        let m = &self.m;
        let phase = m.phase();
        // 1 and 2: the machine's armed set is exactly what the kernel has pending.
        for (i, &op) in ConnOp::ALL.iter().enumerate() {
            if m.is_armed(op) != k.is_live(i) {
                k.fail(&format!(
                    "{op:?}: armed {} in the machine, pending {} in the kernel",
                    m.is_armed(op),
                    k.is_live(i)
                ));
            }
        }
        let live = k.live.count_ones();
        if m.in_flight() != live {
            k.fail(&format!(
                "in_flight {} with {live} ops pending",
                m.in_flight()
            ));
        }
        match step {
            Step::Free if live != 0 => k.fail(&format!("freed with {live} ops pending")),
            Step::Free if phase != Phase::Freed => k.fail(&format!("freed in {phase:?}")),
            Step::Continue if phase == Phase::Freed => k.fail("Freed without Step::Free"),
            _ => {}
        }
        let order = |p: Phase| p as u8;
        if order(phase) < order(prev) {
            k.fail(&format!("phase went back from {prev:?} to {phase:?}"));
        }
        if matches!(prev, Phase::Closing | Phase::Freed) && k.submitted > 0 {
            k.fail("an op was submitted while closing");
        }
        if matches!(phase, Phase::Closing | Phase::Freed) != m.reason().is_some() {
            k.fail(&format!("{phase:?} with reason {:?}", m.reason()));
        }
        if !self.close_checked {
            if let Some(r) = m.reason() {
                self.close_checked = true;
                self.check_close(r);
            }
        }
        self.check_resources();
        if step == Step::Free {
            self.freed = true;
            self.check_freed();
        }
    }

    /// 4: the reason and the reset follow from what went wrong before the close.
    fn check_close(&self, r: CloseReason) {
        let k = &self.k;
        if r.is_clean() {
            if k.must_fail || k.resets != 0 {
                k.fail(&format!(
                    "closed with {r:?} ({} resets) after a failure",
                    k.resets
                ));
            }
            let first = match k.eofs.first() {
                Some(&CLIENT) => CloseReason::ClientFin,
                Some(_) => CloseReason::ServerFin,
                None => k.fail("clean close without any EOF"),
            };
            if r != first {
                k.fail(&format!("{r:?}, but the first FIN came from {:?}", k.eofs));
            }
            for d in 0..2 {
                if self.m.state(d) != State::Done {
                    k.fail(&format!(
                        "clean close with direction {d} {:?}",
                        self.m.state(d)
                    ));
                }
            }
        } else {
            if k.allowed == 0 {
                k.fail(&format!("closed with {r:?}, but nothing went wrong"));
            }
            if k.resets != 1 {
                k.fail(&format!("closed with {r:?} after {} resets", k.resets));
            }
            if k.allowed & reason_bit(r) == 0 {
                let names: Vec<_> = CloseReason::ALL
                    .into_iter()
                    .filter(|&x| k.allowed & reason_bit(x) != 0)
                    .collect();
                k.fail(&format!(
                    "closed with {r:?}, but what went wrong was {names:?}"
                ));
            }
        }
    }

    /// 5: what each direction holds matches the pools.
    fn check_resources(&self) {
        let k = &self.k;
        let m = &self.m;
        for d in 0..2 {
            if m.phase() == Phase::Relaying {
                // A failure closes at once, even with an op in flight.
                if m.state(d) == State::Failed {
                    k.fail(&format!(
                        "direction {d} failed and the connection relays on"
                    ));
                }
                // Only a direction waiting for its turn may hold an empty pipe (the
                // budget ran out right after taking it).
                if m.held(d) == Held::Pipe && m.buffered(d) == 0 && !k.queued[d] {
                    k.fail(&format!("direction {d} sits on an empty pipe"));
                }
            }
            match (k.p.mode, m.held(d)) {
                (RelayMode::Splice, Held::Pipe) => match k.pipes[d] {
                    Some(p) if p.len() == m.buffered(d) => {}
                    p => k.fail(&format!(
                        "direction {d} holds a pipe with {} bytes buffered; kernel: {p:?}",
                        m.buffered(d)
                    )),
                },
                (RelayMode::Splice, Held::Nothing) => {
                    if k.pipes[d].is_some() {
                        k.fail(&format!(
                            "direction {d} dropped its pipe without returning it"
                        ));
                    }
                    if k.spills[d].is_some() {
                        k.fail(&format!("direction {d} dropped its own buffer unfreed"));
                    }
                }
                (RelayMode::Copy, Held::Buf { bid, off }) => {
                    let b = k.bufs[bid as usize];
                    if b.owner != Owner::Conn(d) || b.acked != off {
                        k.fail(&format!("direction {d} holds buffer {bid} at {off}: {b:?}"));
                    }
                    if m.phase() == Phase::Relaying && b.data.len() - off != m.buffered(d) {
                        k.fail(&format!(
                            "direction {d} buffers {} bytes, its buffer has {} unsent",
                            m.buffered(d),
                            b.data.len() - off
                        ));
                    }
                }
                (RelayMode::Copy, Held::Nothing) => {
                    if k.spills[d].is_some() {
                        k.fail(&format!("direction {d} dropped its own buffer unfreed"));
                    }
                }
                // Copy: the rest of a blocked send; splice: a read while the pipe
                // pool was empty.
                (_, Held::Prefix { .. }) => match k.spills[d] {
                    // Its own buffer holds exactly what is left to write.
                    Some(s) if m.phase() != Phase::Relaying || s.len() == m.buffered(d) => {}
                    s => k.fail(&format!(
                        "direction {d} has {} bytes buffered in its own buffer; kernel: {s:?}",
                        m.buffered(d)
                    )),
                },
                (mode, held) => k.fail(&format!("direction {d} holds {held:?} in {mode:?}")),
            }
            let owned = k.bufs.iter().filter(|b| b.owner == Owner::Conn(d)).count();
            if owned != usize::from(matches!(m.held(d), Held::Buf { .. })) {
                k.fail(&format!(
                    "direction {d} was given {owned} buffers and holds {:?}",
                    m.held(d)
                ));
            }
        }
    }

    /// 1, 3 and 5 once freed: nothing pending or held, and a clean close delivered
    /// every byte and FIN.
    fn check_freed(&mut self) {
        let k = &mut self.k;
        if k.pipes.iter().any(Option::is_some) {
            k.fail(&format!("freed holding pipes {:?}", k.pipes));
        }
        if k.spills.iter().any(Option::is_some) {
            k.fail(&format!("freed holding its own buffers {:?}", k.spills));
        }
        if let Some(b) = k
            .bufs
            .iter()
            .position(|b| matches!(b.owner, Owner::Conn(_) | Owner::Cqe(_)))
        {
            k.fail(&format!("freed without returning buffer {b}"));
        }
        if !k.cq.is_empty() {
            k.fail(&format!("freed with completions queued: {:?}", k.cq));
        }
        if k.moved != k.reported {
            k.fail(&format!(
                "wrote {:?} bytes, reported {:?}",
                k.moved, k.reported
            ));
        }
        let r = self.m.reason().expect("a freed connection has a reason");
        k.cov.reasons[r as usize] += 1;
        if k.resets != u32::from(!r.is_clean()) {
            k.fail(&format!("freed with {r:?} after {} resets", k.resets));
        }
        if !r.is_clean() {
            return;
        }
        // The sockets close gracefully: each peer reads what is left.
        for s in 0..2 {
            let sock = &mut k.socks[s];
            sock.tx.start = sock.tx.end;
            let saw_fin = sock.tx_fin;
            let got = sock.tx.end;
            let want = k.p.len[1 - s];
            if got != want || !saw_fin || !k.peers[1 - s].fin_sent {
                k.fail(&format!(
                    "clean close, but {:?} got {got} of {want} bytes, FIN {saw_fin}",
                    side(s)
                ));
            }
        }
    }
}

fn trace_wanted() -> Option<u64> {
    std::env::var("SEED").ok().map(|s| {
        s.trim()
            .parse()
            .unwrap_or_else(|_| panic!("SEED must be a number, not {s:?}"))
    })
}

/// Runs one seeded schedule; a panic (the fake's or the machine's own) names it.
fn run_seed(seed: u64, mode: RelayMode, trace: bool) -> Coverage {
    let r = panic::catch_unwind(AssertUnwindSafe(|| {
        let mut sim = Sim::random(seed, mode, trace);
        sim.run();
        let mut cov = std::mem::take(&mut sim.k.cov);
        cov.schedules = 1;
        cov.steps = sim.steps;
        cov.max_steps = sim.steps;
        cov
    }));
    match r {
        Ok(cov) => cov,
        Err(e) => {
            eprintln!(
                "schedule failed: seed {seed}, {mode:?}; rerun with \
                 SEED={seed} cargo test replay -- --nocapture"
            );
            panic::resume_unwind(e)
        }
    }
}

fn run_seeds(mode: RelayMode) -> Coverage {
    let (first, n) = match std::env::var("SEEDS") {
        Err(_) => (0, SEEDS_PER_MODE),
        Ok(s) => {
            let num = |x: &str| -> u64 {
                x.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("SEEDS must be n or a..b, not {s:?}"))
            };
            match s.split_once("..") {
                Some((a, b)) => (num(a), num(b)),
                None => (0, num(&s)),
            }
        }
    };
    let t = Instant::now();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let mut cov = Coverage::default();
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|w| {
                scope.spawn(move || {
                    let mut cov = Coverage::default();
                    let mut seed = first + w;
                    while seed < n {
                        cov.add(&run_seed(seed, mode, false));
                        seed += threads;
                    }
                    cov
                })
            })
            .collect();
        for w in workers {
            match w.join() {
                Ok(c) => cov.add(&c),
                Err(e) => panic::resume_unwind(e),
            }
        }
    });
    eprintln!(
        "{mode:?}: {} seeds, {} steps (max {}) in {:.2?}; {cov:?}",
        cov.schedules,
        cov.steps,
        cov.max_steps,
        t.elapsed()
    );
    cov
}

/// The random schedules must keep reaching the cases they exist for.
fn assert_coverage(cov: &Coverage, mode: RelayMode) {
    for r in [
        CloseReason::ClientFin,
        CloseReason::ServerFin,
        CloseReason::ClientReset,
        CloseReason::ServerReset,
        CloseReason::ConnectRefused,
        CloseReason::ConnectTimeout,
        CloseReason::Unreachable,
        CloseReason::ConnectError,
        CloseReason::IdleTimeout,
        CloseReason::DrainDeadline,
    ] {
        assert!(cov.reason(r) > 0, "{mode:?}: no schedule ended with {r:?}");
    }
    assert!(cov.poll_ends > 0 && cov.cancel_races > 0 && cov.short_sends > 0);
    match mode {
        RelayMode::Splice => {
            assert!(
                cov.reason(CloseReason::LocalError) > 0 && cov.requeues > 0 && cov.fallbacks > 0,
                "{cov:?}"
            );
        }
        RelayMode::Copy => assert!(
            cov.enobufs > 0 && cov.wakes > 0 && cov.eagain > 0 && cov.spills > 0,
            "{cov:?}"
        ),
    }
}

#[test]
fn random_schedules_splice() {
    let cov = run_seeds(RelayMode::Splice);
    assert_coverage(&cov, RelayMode::Splice);
}

#[test]
fn random_schedules_copy() {
    let cov = run_seeds(RelayMode::Copy);
    assert_coverage(&cov, RelayMode::Copy);
}

/// `SEED=<n> cargo test replay -- --nocapture`: one schedule, traced.
#[test]
fn replay() {
    if let Some(seed) = trace_wanted() {
        for mode in [RelayMode::Splice, RelayMode::Copy] {
            run_seed(seed, mode, true);
            eprintln!("seed {seed} {mode:?}: passed");
        }
    }
}

// Directed schedules for known edge cases.

const MODES: [RelayMode; 2] = [RelayMode::Splice, RelayMode::Copy];

fn directed(mode: RelayMode, p: impl FnOnce(&mut Params)) -> Sim {
    let mut params = Params::quiet(mode);
    p(&mut params);
    Sim::new(0, params, false)
}

impl Sim {
    fn connect(&mut self) {
        self.ev(Ev::Connect);
        self.settle();
    }

    fn assert_freed(&self, r: CloseReason) {
        assert!(self.freed, "not freed: {:?}", self.m);
        assert_eq!(self.m.reason(), Some(r));
        assert_eq!(self.k.resets, u32::from(!r.is_clean()));
    }
}

#[test]
fn reset_after_half_close_reaches_the_other_peer() {
    // Data and FIN before the connect completes: the EOF is read without a wait,
    // so only the error watch can see the reset.
    for mode in MODES {
        for early in [true, false] {
            let mut s = directed(mode, |p| {
                p.len = [1000, 0];
                p.fin = [true, false];
            });
            if !early {
                s.connect();
            }
            s.ev(Ev::PeerSend(CLIENT));
            s.ev(Ev::PeerFin(CLIENT));
            if early {
                s.connect();
            }
            s.settle();
            s.ev(Ev::PeerRead(SERVER));
            assert_eq!(s.m.state(0), State::Done, "{mode:?}");
            assert!(s.k.peers[SERVER].saw_fin);
            s.k.peer_reset(CLIENT, libc::ECONNRESET);
            s.settle();
            s.assert_freed(CloseReason::ClientReset);
        }
    }
}

#[test]
fn reset_after_half_close_is_not_hidden_by_the_last_fin() {
    // The client half-closes; the server's FIN is already in the completion queue
    // when the client resets, so the shutdown towards the client (ENOTCONN) is the
    // machine's first contact with the reset socket.
    for mode in MODES {
        let mut s = directed(mode, |p| {
            p.len = [1000, 0];
            p.fin = [true, true];
        });
        s.ev(Ev::PeerSend(CLIENT));
        s.ev(Ev::PeerFin(CLIENT));
        s.connect();
        s.ev(Ev::PeerRead(SERVER));
        assert_eq!(s.m.state(0), State::Done, "{mode:?}");
        s.ev(Ev::PeerFin(SERVER));
        if mode == RelayMode::Copy {
            s.ev(Ev::Progress(op_index(ConnOp::Recv(1))));
        }
        s.k.peer_reset(CLIENT, libc::ECONNRESET);
        s.settle();
        s.assert_freed(CloseReason::ClientReset);
    }
}

#[test]
fn enobufs_then_buffer_returned() {
    let mut s = directed(RelayMode::Copy, |p| {
        p.len = [100, 0];
        p.fin = [true, true];
        p.bufs = 1;
        p.phantom_takes = 1;
    });
    s.ev(Ev::PhantomTake);
    s.connect();
    assert!(s.k.cov.enobufs >= 2, "both directions ran out of buffers");
    assert!(!s.m.is_armed(ConnOp::Recv(0)) && !s.m.is_armed(ConnOp::Recv(1)));
    s.ev(Ev::PeerSend(CLIENT));
    s.settle();
    assert_eq!(
        s.k.socks[SERVER].tx.end, 0,
        "nothing moves without a buffer"
    );
    s.ev(Ev::PhantomGive);
    s.settle();
    assert_eq!(s.k.socks[SERVER].tx.end, 100);
    assert!(s.k.cov.wakes > 0);
    s.ev(Ev::PeerFin(CLIENT));
    s.ev(Ev::PeerFin(SERVER));
    s.settle();
    s.assert_freed(CloseReason::ClientFin);
}

#[test]
fn error_while_blocked_on_the_destination_resets_without_waiting() {
    // The server reads nothing: direction 0's send delivers 10 bytes, the rest
    // moves into the direction's own buffer (the provided one goes back) and it
    // waits for POLLOUT. A first recv that found nothing (EAGAIN) left a multishot
    // POLLIN on the client, which sees the client's reset: direction 0 fails while
    // blocked on its destination.
    let mut s = directed(RelayMode::Copy, |p| {
        p.len = [1000, 0];
        p.tx_cap[SERVER] = 10;
        p.stall_at[SERVER] = Some(0);
        p.eagain = true;
    });
    s.connect();
    assert!(s.m.is_armed(ConnOp::PollIn(0)));
    s.k.p.eagain = false;
    s.ev(Ev::PeerSend(CLIENT));
    s.settle();
    assert!(
        s.m.is_armed(ConnOp::PollOut(0)) && matches!(s.m.held(0), Held::Prefix { .. }),
        "blocked on the server, holding no provided buffer"
    );
    assert_eq!(s.k.socks[SERVER].tx.end, 10);
    s.k.peer_reset(CLIENT, libc::ECONNRESET);
    s.settle();
    s.assert_freed(CloseReason::ClientReset);
    assert_eq!(s.k.socks[SERVER].tx.start, 0, "the server never read");
}

#[test]
fn error_in_the_other_direction_does_not_wait_for_a_blocked_one() {
    // The server reads nothing, so direction 0 waits on it; the client's reset,
    // seen by Send(1), must not wait for that.
    let mut s = directed(RelayMode::Copy, |p| {
        p.len = [1000, 50];
        p.tx_cap[SERVER] = 10;
        p.stall_at[SERVER] = Some(0);
    });
    s.connect();
    s.ev(Ev::PeerSend(CLIENT));
    s.settle();
    assert!(
        s.m.is_armed(ConnOp::PollOut(0)) && matches!(s.m.held(0), Held::Prefix { .. }),
        "blocked on the server, holding no provided buffer"
    );
    assert_eq!(s.k.socks[SERVER].tx.end, 10);
    s.ev(Ev::PeerSend(SERVER));
    s.settle_where(|op| op == ConnOp::Recv(1));
    assert!(s.m.is_armed(ConnOp::Send(1)));
    s.k.peer_reset(CLIENT, libc::ECONNRESET);
    s.settle();
    s.assert_freed(CloseReason::ClientReset);
    assert_eq!(s.k.socks[SERVER].tx.start, 0, "the server never read");
}

#[test]
fn error_watch_ended_by_the_kernel_is_rearmed() {
    for mode in MODES {
        let mut s = directed(mode, |p| {
            p.len = [1000, 0];
            p.fin = [true, false];
        });
        s.ev(Ev::PeerSend(CLIENT));
        s.ev(Ev::PeerFin(CLIENT));
        s.connect();
        let watch = ConnOp::ErrWatch(0);
        assert!(
            s.m.is_armed(watch),
            "{mode:?}: EOF without a wait arms the watch"
        );
        // The kernel ends the watch, with an event and without one.
        for res in [P_RDHUP, -libc::ECANCELED] {
            s.k.post(op_index(watch), res, false, None);
            s.settle();
            assert!(s.m.is_armed(watch), "{mode:?}: re-armed after {res}");
        }
        s.k.peer_reset(CLIENT, libc::ECONNRESET);
        s.settle();
        s.assert_freed(CloseReason::ClientReset);
    }
}

#[test]
fn abort_while_connecting() {
    for mode in MODES {
        // Before the connect completes, after it succeeded unseen, and after its
        // timeout fired unseen.
        for outcome in [None, Some(Outcome::Connected), Some(Outcome::TimedOut)] {
            let mut s = directed(mode, |p| {
                p.connect = outcome.unwrap_or(Outcome::Connected);
            });
            if outcome.is_some() {
                s.ev(Ev::Connect);
            }
            s.ev(Ev::Abort(CloseReason::Stopping));
            assert!(s.m.is_armed(ConnOp::ConnectTimeout));
            s.settle();
            s.assert_freed(CloseReason::Stopping);
            assert_eq!(s.k.established, 0);
        }
    }
}

#[test]
fn connect_failures_reset_the_client() {
    for mode in MODES {
        for (outcome, r) in [
            (Outcome::Refused, CloseReason::ConnectRefused),
            (Outcome::Unreachable, CloseReason::Unreachable),
            (Outcome::TimedOut, CloseReason::ConnectTimeout),
        ] {
            let mut s = directed(mode, |p| p.connect = outcome);
            s.connect();
            s.assert_freed(r);
        }
    }
}

#[test]
fn clean_close_relays_everything() {
    for mode in MODES {
        let mut s = directed(mode, |p| {
            p.len = [5000, 7000];
            p.fin = [true, true];
            p.capacity = 1024;
            p.pipe = (1024, 1024);
        });
        s.connect();
        s.ev(Ev::PeerSend(SERVER));
        s.ev(Ev::PeerFin(SERVER));
        s.settle();
        s.ev(Ev::PeerSend(CLIENT));
        s.ev(Ev::PeerFin(CLIENT));
        s.settle();
        s.assert_freed(CloseReason::ServerFin);
    }
}
