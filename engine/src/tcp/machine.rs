//! One relayed TCP connection as a state machine without I/O.
//!
//! [`ConnMachine`] holds everything that decides what happens to a connection: the
//! phase, both relay [`Direction`]s, which ring ops are armed (one bit per
//! [`ConnOp`], so the in-flight count is derived and can never go negative or
//! drift), which pipe or provided buffer each direction holds, who ended the
//! connection and why. It is fed events (completions, the results of inline
//! syscalls, wake-ups, ticks, aborts) and acts only through [`Effects`], a sink of
//! actions: submit or cancel an op, splice, shut down, take or return a pipe or a
//! buffer, reset the sockets. Inline actions (splice, shutdown, taking a pipe)
//! return their result at once; everything else is fire-and-forget. The io_uring
//! driver (`driver.rs`) implements `Effects` over real sockets; the tests implement
//! it over a seeded fake kernel and check the invariants after every step.
//!
//! The rules that keep the relay exact and io_uring memory-safe live here, once:
//!
//! * Both directions done (each passed its EOF on as `shutdown(SHUT_WR)`): close
//!   cleanly. The reason is the side whose FIN came first.
//! * One direction failed: reset both sides (`SO_LINGER {1, 0}`), with the side
//!   that failed as the reason. A failure wins over an op in flight: that op is
//!   cancelled rather than waited for.
//! * Closing cancels exactly the ops that are armed, by `user_data`. The
//!   connection is freed ([`Step::Free`]) only once no op is armed, and only then
//!   are its pipes and buffers returned: a pipe goes back to the pool only empty.
//! * Every read happens only while nothing is buffered (backpressure), so a
//!   direction holds at most one pipe or one provided buffer (or, once its bytes
//!   could not stay in either, its own buffer: a blocked copy send's rest, or a
//!   splice read while the pipe pool is empty).

use super::direction::{Direction, Io, State, Want};
use crate::config::RelayMode;
use crate::core::token::ConnOp;
use crate::stats::CloseReason;

/// Each pump moves at most this many chunks before yielding to other
/// connections, so one fast stream cannot starve the core.
pub const PUMP_BUDGET: u32 = 8;

/// Largest read of a splice direction that found no pipe (into its own buffer).
pub const FALLBACK_READ_MAX: usize = 64 * 1024;

/// One of the two peers of a relayed connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The client (the accepted socket).
    Client,
    /// The server (the upstream socket).
    Server,
}

/// The side direction `d` reads from: direction 0 is client to server.
pub fn source(d: usize) -> Side {
    if d == 0 {
        Side::Client
    } else {
        Side::Server
    }
}

/// The side direction `d` writes to.
pub fn destination(d: usize) -> Side {
    source(1 - d)
}

fn reset_reason(side: Side) -> CloseReason {
    match side {
        Side::Client => CloseReason::ClientReset,
        Side::Server => CloseReason::ServerReset,
    }
}

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Reading the client's first bytes for the policy (TLS SNI, HTTP Host); nothing
    /// is connected yet.
    Sniffing,
    /// The upstream connect (and its link timeout) is in flight.
    Connecting,
    /// Both directions relay.
    Relaying,
    /// Closed or reset; waiting for the armed ops to complete.
    Closing,
    /// Everything released; the driver drops the sockets.
    Freed,
}

/// What a direction holds of the core's pools.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Held {
    /// Nothing: an idle direction costs no pipe and no buffer.
    Nothing,
    /// Splice: a pipe with the direction's in-flight bytes.
    Pipe,
    /// Copy: provided buffer `bid`, of which bytes before `off` are sent.
    Buf { bid: u16, off: usize },
    /// Bytes in the direction's own buffer, of which `off` are sent: direction 0's
    /// sniffed bytes, or what a copy-relay send could not deliver at once (spilled
    /// out of the provided buffer so that a stalled reader holds none of the pool).
    Prefix { off: usize },
}

/// The outcome of reading the client's first bytes ([`Effects::sniff`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SniffStep {
    /// Not decided yet: wait for more bytes (or the sniff timer).
    More,
    /// Decided: connect (the driver has set the target and the upstream socket);
    /// `prefix` sniffed bytes go upstream first.
    Connect { prefix: usize },
    /// Decided not to relay (policy reject, loop, no upstream socket): reset the client.
    Refuse(CloseReason),
    /// Reading failed (the client reset): the errno.
    Failed(i32),
}

/// What a copy-relay `SEND` writes: `len` bytes of buffer `bid` from `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SendArgs {
    pub bid: u16,
    pub off: usize,
    pub len: usize,
}

/// What the driver must do after an event.
#[must_use = "a freed connection must be removed from its table"]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The connection lives on.
    Continue,
    /// Nothing is armed any more and every resource is returned: drop the sockets
    /// (which sends the RST if `reset_sockets` was called) and free the slot.
    Free,
}

/// The actions a connection machine takes. Inline ones return their result.
pub trait Effects {
    /// The core's clock, in ticks (seconds), for idle accounting.
    fn now(&self) -> u64;
    /// Submits the upstream connect linked to its timeout: two ops, both counted
    /// armed by the machine before the call.
    fn submit_connect(&mut self);
    /// Submits `op` (counted armed before the call). `Send` carries its buffer.
    fn submit(&mut self, op: ConnOp, send: Option<SendArgs>);
    /// Asks the kernel to cancel the armed `op` (by its `user_data`).
    fn cancel(&mut self, op: ConnOp);
    /// `splice(source of d -> pipe of d, len)`, non-blocking.
    fn splice_in(&mut self, d: usize, len: usize) -> Io;
    /// `splice(pipe of d -> destination of d, len)`, non-blocking.
    fn splice_out(&mut self, d: usize, len: usize) -> Io;
    /// `shutdown(destination of d, SHUT_WR)`.
    fn shutdown_write(&mut self, d: usize) -> Io;
    /// Gives direction `d` a pipe; its capacity, or the errno of making one
    /// (`EAGAIN`: the pool has none to give now, read with
    /// [`read_prefix`](Self::read_prefix) instead).
    fn take_pipe(&mut self, d: usize) -> Result<usize, i32>;
    /// Splice relay without a pipe: reads up to `len` bytes of `d`'s source into
    /// `d`'s own buffer (non-blocking); on anything but bytes the buffer is freed.
    fn read_prefix(&mut self, d: usize, len: usize) -> Io;
    /// Takes direction `d`'s pipe back: to the pool if `empty`, else closed.
    fn put_pipe(&mut self, d: usize, empty: bool);
    /// Returns provided buffer `bid` to the kernel.
    fn put_buf(&mut self, bid: u16);
    /// Direction `d` found no provided buffer: wake it ([`ConnMachine::on_buffer`])
    /// when one comes back.
    fn wait_buf(&mut self, d: usize);
    /// Direction `d` used up its budget: resume it ([`ConnMachine::resume`]) after
    /// the current batch of completions.
    fn requeue(&mut self, d: usize);
    /// Arms `SO_LINGER {1, 0}` on both sockets so their close sends a RST.
    fn reset_sockets(&mut self);
    /// Takes the pending error (`SO_ERROR`) of a side's socket.
    fn socket_error(&mut self, side: Side) -> Option<i32>;
    /// The upstream connect succeeded (socket options for the relay phase).
    fn established(&mut self);
    /// `n` bytes of direction `d` reached its destination.
    fn delivered(&mut self, d: usize, n: usize);
    /// Sniffing: reads what the client sent so far and decides if it can, or, with
    /// `timed_out`, decides with what there is.
    fn sniff(&mut self, timed_out: bool) -> SniffStep;
    /// Writes `len` bytes of direction `d`'s own buffer from `off` to its
    /// destination (non-blocking).
    fn write_prefix(&mut self, d: usize, off: usize, len: usize) -> Io;
    /// Direction `d`'s own buffer is all sent (or the connection is gone): free it.
    fn drop_prefix(&mut self, d: usize);
    /// Copies `len` bytes of provided buffer `bid` from `off` into direction `d`'s own
    /// buffer (the buffer itself is returned separately with `put_buf`).
    fn spill(&mut self, d: usize, bid: u16, off: usize, len: usize);
}

#[derive(Debug)]
struct Dir {
    flow: Direction,
    held: Held,
    /// Waiting for a provided buffer (copy relay, after `ENOBUFS`).
    waiting_buf: bool,
    /// Waiting in the run queue for another turn.
    queued: bool,
}

/// One relayed TCP connection. See the module documentation.
#[derive(Debug)]
pub struct ConnMachine {
    mode: RelayMode,
    phase: Phase,
    dirs: [Dir; 2],
    /// One bit per armed [`ConnOp`].
    armed: u16,
    reason: Option<CloseReason>,
    /// The side whose FIN came first.
    first_fin: Option<Side>,
    /// The first failure: who failed, and the errno.
    failure: Option<(CloseReason, i32)>,
    last_active: u64,
}

impl ConnMachine {
    /// A connection about to connect upstream; each direction reads up to
    /// `capacity` bytes at a time (pipe or buffer size).
    pub fn new(mode: RelayMode, capacity: usize, now: u64) -> ConnMachine {
        let dir = || Dir {
            flow: Direction::new(capacity),
            held: Held::Nothing,
            waiting_buf: false,
            queued: false,
        };
        ConnMachine {
            mode,
            phase: Phase::Connecting,
            dirs: [dir(), dir()],
            armed: 0,
            reason: None,
            first_fin: None,
            failure: None,
            last_active: now,
        }
    }

    /// Current phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Why the connection ended (set once closing starts).
    pub fn reason(&self) -> Option<CloseReason> {
        self.reason
    }

    /// The first failure's errno, if the connection failed.
    pub fn errno(&self) -> Option<i32> {
        self.failure.map(|(_, e)| e)
    }

    /// Whether `op` is armed.
    pub fn is_armed(&self, op: ConnOp) -> bool {
        self.armed & op.bit() != 0
    }

    /// Ops armed (in flight) for this connection.
    pub fn in_flight(&self) -> u32 {
        self.armed.count_ones()
    }

    /// What direction `d` holds.
    pub fn held(&self, d: usize) -> Held {
        self.dirs[d].held
    }

    /// Bytes buffered in direction `d` (read, not yet written).
    pub fn buffered(&self, d: usize) -> usize {
        self.dirs[d].flow.buffered()
    }

    /// Bytes direction `d` delivered.
    pub fn delivered(&self, d: usize) -> u64 {
        self.dirs[d].flow.delivered()
    }

    /// The relay state of direction `d`.
    pub fn state(&self, d: usize) -> State {
        self.dirs[d].flow.state()
    }

    /// One direction has passed its FIN on and the other is still open.
    pub fn is_half_closed(&self) -> bool {
        self.phase == Phase::Relaying
            && (self.dirs[0].flow.state() == State::Done)
                != (self.dirs[1].flow.state() == State::Done)
    }

    /// Tick of the last byte moved (or of the connect).
    pub fn last_active(&self) -> u64 {
        self.last_active
    }

    fn arm(&mut self, op: ConnOp) {
        debug_assert!(!self.is_armed(op), "{op:?} armed twice");
        self.armed |= op.bit();
    }

    fn disarm(&mut self, op: ConnOp) {
        assert!(
            self.is_armed(op),
            "final completion of {op:?}, which is not armed"
        );
        self.armed &= !op.bit();
    }

    /// Starts the upstream connect.
    pub fn start(&mut self, fx: &mut impl Effects) {
        debug_assert_eq!(self.phase, Phase::Connecting);
        self.arm(ConnOp::Connect);
        self.arm(ConnOp::ConnectTimeout);
        fx.submit_connect();
    }

    /// Starts by reading the client's first bytes for the policy: waits for them
    /// (the client's POLLIN, which direction 0 keeps using afterwards) and for the
    /// sniff timer, whichever comes first.
    pub fn start_sniffing(&mut self, fx: &mut impl Effects) {
        debug_assert_eq!(self.phase, Phase::Connecting);
        self.phase = Phase::Sniffing;
        self.arm(ConnOp::PollIn(0));
        fx.submit(ConnOp::PollIn(0), None);
        self.arm(ConnOp::SniffTimer);
        fx.submit(ConnOp::SniffTimer, None);
    }

    fn on_sniff(&mut self, step: SniffStep, fx: &mut impl Effects) {
        match step {
            SniffStep::More => {
                if !self.is_armed(ConnOp::PollIn(0)) {
                    self.arm(ConnOp::PollIn(0));
                    fx.submit(ConnOp::PollIn(0), None);
                }
            }
            SniffStep::Connect { prefix } => {
                if self.is_armed(ConnOp::SniffTimer) {
                    fx.cancel(ConnOp::SniffTimer);
                }
                if prefix > 0 {
                    let cap = self.dirs[0].flow.capacity();
                    self.dirs[0].flow = Direction::with_buffered(cap, prefix);
                    self.dirs[0].held = Held::Prefix { off: 0 };
                }
                self.phase = Phase::Connecting;
                self.start(fx);
            }
            SniffStep::Refuse(reason) => self.close(reason, true, fx),
            SniffStep::Failed(errno) => {
                self.note_failure(CloseReason::ClientReset, errno);
                self.close(CloseReason::ClientReset, true, fx);
            }
        }
    }

    /// A completion of one of this connection's ops. `more` is
    /// `IORING_CQE_F_MORE` (a multishot op stays armed); `bid` the provided buffer
    /// the kernel picked, if any.
    pub fn on_completion(
        &mut self,
        op: ConnOp,
        res: i32,
        more: bool,
        bid: Option<u16>,
        fx: &mut impl Effects,
    ) -> Step {
        if !more {
            self.disarm(op);
        }
        match op {
            ConnOp::Connect => self.on_connect(res, fx),
            // Fired (the connect then fails with ECANCELED) or cancelled: nothing.
            ConnOp::ConnectTimeout => {}
            ConnOp::PollIn(d) | ConnOp::PollOut(d) | ConnOp::ErrWatch(d) => {
                self.on_poll(op, d, res, fx)
            }
            ConnOp::Recv(d) => self.on_recv(d, res, bid, fx),
            ConnOp::Send(d) => self.on_send(d, res, fx),
            ConnOp::SniffTimer => {
                // Fired (-ETIME): decide without a name. Cancelled: decided already.
                if self.phase == Phase::Sniffing && res != -libc::ECANCELED {
                    let step = fx.sniff(true);
                    self.on_sniff(step, fx);
                }
            }
        }
        self.settle(fx)
    }

    /// A provided buffer came back. Returns whether this connection was waiting in
    /// direction `d` (and so took the wake-up).
    pub fn on_buffer(&mut self, d: usize, fx: &mut impl Effects) -> (bool, Step) {
        if self.phase != Phase::Relaying || !self.dirs[d].waiting_buf {
            return (false, Step::Continue);
        }
        self.dirs[d].waiting_buf = false;
        self.pump(d, fx);
        (true, self.settle(fx))
    }

    /// Another turn for a direction that used up its budget.
    pub fn resume(&mut self, d: usize, fx: &mut impl Effects) -> Step {
        self.dirs[d].queued = false;
        self.pump(d, fx);
        self.settle(fx)
    }

    /// Ends the connection from outside (idle timeout, drain deadline, stop):
    /// reset both sides with `reason`.
    pub fn abort(&mut self, reason: CloseReason, fx: &mut impl Effects) -> Step {
        self.close(reason, true, fx);
        self.settle(fx)
    }

    fn on_connect(&mut self, res: i32, fx: &mut impl Effects) {
        if self.phase != Phase::Connecting {
            return; // aborted meanwhile: the close already decided everything
        }
        if res < 0 {
            self.failure = Some((CloseReason::from_connect_errno(-res), -res));
            self.close(CloseReason::from_connect_errno(-res), true, fx);
            return;
        }
        self.phase = Phase::Relaying;
        self.last_active = fx.now();
        fx.established();
        self.pump(0, fx);
        self.pump(1, fx);
    }

    fn on_poll(&mut self, op: ConnOp, d: usize, res: i32, fx: &mut impl Effects) {
        if self.phase == Phase::Sniffing && op == ConnOp::PollIn(0) {
            let step = if res < 0 && res != -libc::ECANCELED {
                SniffStep::Failed(-res)
            } else if res >= 0 && res & libc::POLLERR as i32 != 0 {
                SniffStep::Failed(fx.socket_error(Side::Client).unwrap_or(libc::ECONNRESET))
            } else {
                fx.sniff(false)
            };
            self.on_sniff(step, fx);
            return;
        }
        if self.phase != Phase::Relaying {
            return;
        }
        let side = match op {
            ConnOp::PollOut(_) => destination(d),
            _ => source(d),
        };
        if res < 0 {
            if res != -libc::ECANCELED {
                self.fail(d, reset_reason(side), -res);
            }
            // ECANCELED while relaying was not asked for by us (the kernel ended
            // the poll): the pump below re-arms whatever is still wanted.
        } else if res & libc::POLLERR as i32 != 0 {
            // The socket has a pending error: its peer reset (or the path died).
            // Seen here even when this direction is finished or waiting for the
            // other side, so a reset after a half-close still reaches the other peer.
            let errno = fx.socket_error(side).unwrap_or(libc::ECONNRESET);
            self.fail(d, reset_reason(side), errno);
        } else {
            match op {
                ConnOp::PollIn(_) => self.dirs[d].flow.on_readable(),
                ConnOp::PollOut(_) => self.dirs[d].flow.on_writable(),
                // The error watch also wakes on RDHUP/HUP, which mean nothing here.
                _ => {}
            }
        }
        self.pump(d, fx);
    }

    fn on_recv(&mut self, d: usize, res: i32, bid: Option<u16>, fx: &mut impl Effects) {
        if self.phase != Phase::Relaying {
            if let Some(b) = bid {
                fx.put_buf(b);
            }
            return;
        }
        if res == -libc::ENOBUFS {
            // Every provided buffer is in use: retry when one comes back.
            self.dirs[d].flow.retry();
            self.dirs[d].waiting_buf = true;
            fx.wait_buf(d);
            return;
        }
        if res > 0 {
            let bid = bid.expect("a successful buffer-select recv names its buffer");
            self.dirs[d].held = Held::Buf { bid, off: 0 };
        } else if let Some(b) = bid {
            fx.put_buf(b); // EOF or an error holds no data
        }
        self.after_read(d, Io::from_cqe(res), fx);
        self.pump(d, fx);
    }

    fn on_send(&mut self, d: usize, res: i32, fx: &mut impl Effects) {
        if res > 0 {
            let n = res as usize;
            if let Held::Buf { off, .. } = &mut self.dirs[d].held {
                *off += n;
            }
            self.last_active = fx.now();
            fx.delivered(d, n);
        }
        self.after_write(d, Io::from_cqe(res));
        let dir = &mut self.dirs[d];
        if let Held::Buf { bid, off } = dir.held {
            // The send is over, so the kernel no longer reads the buffer. If bytes
            // are left (the destination is full: a short send or EAGAIN), they move
            // to the direction's own buffer and the provided one goes back at once:
            // a peer that does not read must not hold buffers every other
            // connection of the core needs.
            let left = dir.flow.buffered();
            if left > 0 && !dir.flow.is_finished() {
                fx.spill(d, bid, off, left);
                dir.held = Held::Prefix { off: 0 };
            } else {
                dir.held = Held::Nothing;
            }
            fx.put_buf(bid);
        }
        if self.phase == Phase::Relaying {
            self.pump(d, fx);
        }
    }

    /// Feeds a read result to direction `d`, noting the first FIN and who failed.
    fn after_read(&mut self, d: usize, r: Io, fx: &mut impl Effects) {
        if matches!(r, Io::Done(n) if n > 0) {
            self.last_active = fx.now();
        }
        self.dirs[d].flow.on_read(r);
        match (r, self.dirs[d].flow.state()) {
            (Io::Done(0), State::ShutdownPending) => {
                self.first_fin.get_or_insert(source(d));
            }
            (Io::Err(e), State::Failed) => self.note_failure(reset_reason(source(d)), e),
            _ => {}
        }
    }

    /// Feeds a write result to direction `d`.
    fn after_write(&mut self, d: usize, r: Io) {
        self.dirs[d].flow.on_write(r);
        if self.dirs[d].flow.state() == State::Failed {
            let e = match r {
                Io::Err(e) => e,
                _ => libc::EPIPE,
            };
            self.note_failure(reset_reason(destination(d)), e);
        }
    }

    fn note_failure(&mut self, reason: CloseReason, errno: i32) {
        self.failure.get_or_insert((reason, errno));
    }

    fn fail(&mut self, d: usize, reason: CloseReason, errno: i32) {
        self.note_failure(reason, errno);
        self.dirs[d].flow.fail(errno);
    }

    /// Drives direction `d` as far as it can go without waiting.
    fn pump(&mut self, d: usize, fx: &mut impl Effects) {
        let mut budget = PUMP_BUDGET;
        loop {
            if self.phase != Phase::Relaying {
                return;
            }
            match self.dirs[d].flow.want() {
                Want::Reset => {
                    let reason = self.failure.map_or(CloseReason::LocalError, |(r, _)| r);
                    self.close(reason, true, fx);
                    return;
                }
                Want::InFlight => return,
                Want::Read(max) => {
                    let dir = &mut self.dirs[d];
                    if dir.waiting_buf {
                        return;
                    }
                    if budget == 0 {
                        if !dir.queued {
                            dir.queued = true;
                            fx.requeue(d);
                        }
                        return;
                    }
                    budget -= 1;
                    match self.mode {
                        RelayMode::Splice => {
                            if dir.held != Held::Pipe {
                                match fx.take_pipe(d) {
                                    Ok(cap) => {
                                        dir.held = Held::Pipe;
                                        dir.flow.set_capacity(cap);
                                    }
                                    Err(libc::EAGAIN) => {
                                        // No pipe to be had: copy this once, through
                                        // the direction's own buffer, and try for a
                                        // pipe again at the next read.
                                        let r = fx.read_prefix(d, max.min(FALLBACK_READ_MAX));
                                        self.after_read(d, r, fx);
                                        if matches!(r, Io::Done(n) if n > 0) {
                                            self.dirs[d].held = Held::Prefix { off: 0 };
                                        }
                                    }
                                    Err(e) => self.fail(d, CloseReason::LocalError, e),
                                }
                                continue;
                            }
                            let r = fx.splice_in(d, max);
                            self.after_read(d, r, fx);
                            let dir = &mut self.dirs[d];
                            if dir.flow.buffered() == 0 {
                                // Nothing read (would block, EOF or error): an idle
                                // direction must not sit on a pipe (2 fds and pinned
                                // kernel memory) while it waits.
                                dir.held = Held::Nothing;
                                fx.put_pipe(d, true);
                            }
                        }
                        RelayMode::Copy => {
                            self.arm(ConnOp::Recv(d));
                            self.dirs[d].flow.begin();
                            fx.submit(ConnOp::Recv(d), None);
                            return;
                        }
                    }
                }
                Want::Write(len) if matches!(self.dirs[d].held, Held::Prefix { .. }) => {
                    let Held::Prefix { off } = self.dirs[d].held else {
                        unreachable!()
                    };
                    let r = fx.write_prefix(d, off, len);
                    self.after_write(d, r);
                    if let Io::Done(n) = r {
                        self.last_active = fx.now();
                        fx.delivered(d, n);
                        self.dirs[d].held = if self.dirs[d].flow.buffered() == 0 {
                            fx.drop_prefix(d);
                            Held::Nothing
                        } else {
                            Held::Prefix { off: off + n }
                        };
                    }
                }
                Want::Write(len) => match self.mode {
                    RelayMode::Splice => {
                        let r = fx.splice_out(d, len);
                        self.after_write(d, r);
                        if let Io::Done(n) = r {
                            self.last_active = fx.now();
                            fx.delivered(d, n);
                            let dir = &mut self.dirs[d];
                            if dir.flow.buffered() == 0 {
                                dir.held = Held::Nothing;
                                fx.put_pipe(d, true);
                            }
                        }
                    }
                    RelayMode::Copy => {
                        let Held::Buf { bid, off } = self.dirs[d].held else {
                            unreachable!("buffered bytes of the copy relay are in a buffer");
                        };
                        self.arm(ConnOp::Send(d));
                        self.dirs[d].flow.begin();
                        fx.submit(ConnOp::Send(d), Some(SendArgs { bid, off, len }));
                        // The send may wait long on a slow reader: meanwhile watch
                        // the source, or its reset would go unnoticed until then.
                        self.watch_source(d, fx);
                        return;
                    }
                },
                Want::PollReadable => {
                    // Multishot: armed once, it stays on the socket's wait queue
                    // and posts a completion per wakeup. Only a wait that follows a
                    // read that would block is served by it, so no data can arrive
                    // unnoticed; wakeups while busy change nothing.
                    if !self.is_armed(ConnOp::PollIn(d)) {
                        self.arm(ConnOp::PollIn(d));
                        fx.submit(ConnOp::PollIn(d), None);
                    }
                    return;
                }
                Want::PollWritable => {
                    if !self.is_armed(ConnOp::PollOut(d)) {
                        self.arm(ConnOp::PollOut(d));
                        fx.submit(ConnOp::PollOut(d), None);
                    }
                    // Blocked on the destination: nothing reads the source, so watch
                    // it for a reset (a stalled reader could hold this for hours).
                    self.watch_source(d, fx);
                    return;
                }
                Want::ShutdownWrite => {
                    let r = fx.shutdown_write(d);
                    self.dirs[d].flow.on_shutdown(r);
                    if let (Io::Err(e), State::Failed) = (r, self.dirs[d].flow.state()) {
                        self.note_failure(reset_reason(destination(d)), e);
                        continue;
                    }
                    if self.dirs[0].flow.state() == State::Done
                        && self.dirs[1].flow.state() == State::Done
                    {
                        let reason = match self.first_fin {
                            Some(Side::Server) => CloseReason::ServerFin,
                            _ => CloseReason::ClientFin,
                        };
                        self.close(reason, false, fx);
                        return;
                    }
                }
                Want::Nothing => {
                    // After its EOF nothing may be armed on a source (copy relay
                    // always, splice when the EOF came without a wait), so a later
                    // reset by that peer would go unnoticed while the other
                    // direction idles. Watch it for errors, and again whenever the
                    // kernel ends the watch (`pump` runs on its final completion).
                    if self.dirs[d].flow.state() == State::Done {
                        self.watch_source(d, fx);
                    }
                    return;
                }
            }
        }
    }

    /// Arms the error watch on direction `d`'s source unless something already
    /// watches it (its POLLIN, or the watch itself).
    fn watch_source(&mut self, d: usize, fx: &mut impl Effects) {
        if !self.is_armed(ConnOp::ErrWatch(d)) && !self.is_armed(ConnOp::PollIn(d)) {
            self.arm(ConnOp::ErrWatch(d));
            fx.submit(ConnOp::ErrWatch(d), None);
        }
    }

    /// Starts closing: with `reset`, both sides get a RST.
    fn close(&mut self, reason: CloseReason, reset: bool, fx: &mut impl Effects) {
        if matches!(self.phase, Phase::Closing | Phase::Freed) {
            return;
        }
        self.phase = Phase::Closing;
        self.reason = Some(reason);
        if reset {
            fx.reset_sockets();
            for dir in &mut self.dirs {
                if !dir.flow.is_finished() {
                    dir.flow.fail(libc::ECONNRESET);
                }
            }
        }
        for dir in &mut self.dirs {
            // A stale entry may stay in the core's waiter queue; it no longer claims
            // a wake-up (`on_buffer` answers false).
            dir.waiting_buf = false;
        }
        for op in ConnOp::ALL {
            // The link timeout goes with its connect (cancelling the connect
            // completes both); the kernel cannot find a linked timeout by user_data.
            if op != ConnOp::ConnectTimeout && self.is_armed(op) {
                fx.cancel(op);
            }
        }
    }

    /// Frees a closing connection once no op is armed: returns what it holds.
    fn settle(&mut self, fx: &mut impl Effects) -> Step {
        if self.phase != Phase::Closing || self.armed != 0 {
            return Step::Continue;
        }
        for d in 0..2 {
            match std::mem::replace(&mut self.dirs[d].held, Held::Nothing) {
                Held::Nothing => {}
                // Only an empty pipe may be reused; one with stale bytes is closed.
                Held::Pipe => fx.put_pipe(d, self.dirs[d].flow.buffered() == 0),
                Held::Buf { bid, .. } => fx.put_buf(bid),
                Held::Prefix { .. } => fx.drop_prefix(d),
            }
        }
        self.phase = Phase::Freed;
        Step::Free
    }
}
