//! The core context of one worker: its ring, submission with in-flight accounting,
//! cancellation, the clock, the counters and the rate-limited log.
//!
//! Every subsystem (TCP, UDP) takes `&mut Core` for the duration of one event, so
//! the worker can hand its fields out as disjoint borrows (`self.tcp.on_cqe(&mut
//! self.core, ..)`) instead of taking a subsystem out and putting it back.

#[allow(unsafe_code)]
pub mod ring;
pub mod token;

use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use io_uring::{opcode, squeue, types};

use crate::config::Config;
use crate::flowlog::FlowRecord;
use crate::policy::Policy;
use crate::stats::CoreStats;
use ring::{Completion, DeadRing, Ring};
use token::{Op, Token};

/// What every subsystem of a worker shares.
pub struct Core {
    pub ring: Ring,
    pub cfg: Arc<Config>,
    pub cpu: usize,
    pub stats: Arc<CoreStats>,
    /// The decision point: asked once per new connection and per new flow.
    pub policy: Box<dyn Policy>,
    /// Seconds since start, advanced by the periodic timer.
    pub tick: u64,
    /// The worker is stopping: no new connections or flows.
    pub stopping: bool,
    /// The connect timeout every connect's `LINK_TIMEOUT` points at. Boxed so its
    /// address is stable; it lives as long as the core, which outlives every op.
    pub connect_ts: Box<types::Timespec>,
    /// The sniffing phase's deadline every sniff timer points at (same reasoning).
    pub sniff_ts: Box<types::Timespec>,
    /// This core's queue to the flow log writer, if flow logs are on.
    pub flowlog: Option<SyncSender<FlowRecord>>,
    /// Ops submitted whose final completion has not been seen yet.
    in_flight: usize,
    started: Instant,
    /// [`Core::now_ms`] when the current completion batch was reaped.
    batch_ms: u64,
    /// Tick of the last rate-limited log line.
    last_log_tick: u64,
}

impl Core {
    /// A core context around a new ring.
    pub fn new(
        ring: Ring,
        cfg: Arc<Config>,
        cpu: usize,
        stats: Arc<CoreStats>,
        policy: Box<dyn Policy>,
    ) -> Core {
        let connect_ts = Box::new(
            types::Timespec::new()
                .sec(cfg.connect_timeout_ms / 1000)
                .nsec(((cfg.connect_timeout_ms % 1000) * 1_000_000) as u32),
        );
        let sniff_ts = Box::new(
            types::Timespec::new()
                .sec(cfg.sniff_timeout_ms / 1000)
                .nsec(((cfg.sniff_timeout_ms % 1000) * 1_000_000) as u32),
        );
        Core {
            ring,
            cfg,
            cpu,
            stats,
            policy,
            tick: 0,
            stopping: false,
            connect_ts,
            sniff_ts,
            flowlog: None,
            in_flight: 0,
            started: Instant::now(),
            batch_ms: 0,
            last_log_tick: u64::MAX,
        }
    }

    /// Queues an op that will post exactly one final completion, and counts it in
    /// flight in the same call, so no caller can push without counting.
    pub fn submit(&mut self, sqe: squeue::Entry) {
        if let Err(e) = self.ring.push(sqe) {
            self.dead_ring(e);
        }
        self.in_flight += 1;
    }

    /// Queues a chain of linked ops (each posts one final completion).
    pub fn submit_linked(&mut self, sqes: &[squeue::Entry]) {
        if let Err(e) = self.ring.push_chain(sqes) {
            self.dead_ring(e);
        }
        self.in_flight += sqes.len();
    }

    /// Cancels the op submitted with `user_data` (a hash lookup in the kernel,
    /// unlike cancel-by-fd, which walks every armed poll of the ring). The target's
    /// own completion (`-ECANCELED`, or its result if it won the race) still comes.
    pub fn cancel(&mut self, user_data: u64) {
        let sqe = opcode::AsyncCancel::new(user_data)
            .build()
            .user_data(Token::global(Op::Cancel).encode());
        self.submit(sqe);
    }

    /// Cancels every op submitted with `user_data` (`IORING_ASYNC_CANCEL_ALL`, 5.19):
    /// for ops that share one, like a listener's single-shot accepts.
    pub fn cancel_all(&mut self, user_data: u64) {
        let sqe = opcode::AsyncCancel2::new(types::CancelBuilder::user_data(user_data).all())
            .build()
            .user_data(Token::global(Op::Cancel).encode());
        self.submit(sqe);
    }

    /// Accounts one completion: a final one (no `IORING_CQE_F_MORE`) ends its op.
    pub fn completed(&mut self, c: &Completion) {
        if !c.more() {
            self.in_flight = self
                .in_flight
                .checked_sub(1)
                .expect("a completion for an op that was never counted in flight");
        }
    }

    /// Ops in flight on this ring.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Milliseconds since the worker started (monotonic).
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// [`Core::now_ms`] when the current completion batch was reaped: one clock read
    /// per batch instead of one per datagram. Good for idle and expiry timestamps,
    /// whose unit is far longer than a batch.
    pub fn batch_ms(&self) -> u64 {
        self.batch_ms
    }

    /// A new completion batch was reaped: read the clock once for it.
    pub fn start_batch(&mut self) {
        self.batch_ms = self.now_ms();
    }

    /// Microseconds since the worker started (monotonic).
    pub fn now_us(&self) -> u64 {
        self.started.elapsed().as_micros() as u64
    }

    /// The ring cannot be entered any more while the kernel may still be writing
    /// into memory this process owns (buffers, sockaddrs, msghdrs of ops in flight).
    /// Unwinding or returning would free that memory under the kernel, so the only
    /// sound way out is to end the process here.
    pub fn dead_ring(&self, e: DeadRing) -> ! {
        crate::log::error(
            "dead_ring",
            format_args!(
                "{e} with {} ops in flight: aborting (freeing their memory would be \
                 unsound)",
                self.in_flight
            ),
            &[("cpu", &self.cpu)],
        );
        std::process::abort();
    }

    /// Hands a flow log record to the writer, if flow logs are on; `make` gets the
    /// wall clock and this core's clock (µs). Never blocks: a full queue drops the
    /// record and counts it (`flowlog_dropped`).
    pub fn log_flow(&self, make: impl FnOnce(SystemTime, u64) -> FlowRecord) {
        let Some(tx) = &self.flowlog else {
            return;
        };
        let rec = make(SystemTime::now(), self.now_us());
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = tx.try_send(rec) {
            self.stats
                .flowlog_dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Logs at most one line per core per second: bad input or a failing upstream
    /// must not flood the log (the counters have the totals).
    pub fn log_limited(&mut self, msg: std::fmt::Arguments<'_>) {
        if self.last_log_tick != self.tick {
            self.last_log_tick = self.tick;
            crate::log::warn("data_plane", msg, &[("cpu", &self.cpu)]);
        }
    }
}

impl Drop for Core {
    fn drop(&mut self) {
        if self.in_flight > 0 {
            // Only reachable through a panic on the worker thread (the loop ends
            // with nothing in flight): the same argument as `dead_ring`.
            crate::log::error(
                "dead_worker",
                format_args!(
                    "worker ending with {} ops in flight: aborting",
                    self.in_flight
                ),
                &[("cpu", &self.cpu)],
            );
            std::process::abort();
        }
    }
}
