//! One pinned worker: `Worker { core, tcp, udp }` and its event loop.
//!
//! Event loop shape: submit and wait, drain the CQ into a batch, advance it once,
//! dispatch each completion on its token's subsystem, then let the subsystems finish
//! the batch (relay directions that used up their budget run again). A worker ends
//! when it was told to stop and nothing of its is in flight any more.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc;
use std::sync::Arc;

use io_uring::{opcode, types};

use crate::config::Config;
use crate::core::ring::{Completion, Ring};
use crate::core::token::{Op, Subsystem, Token};
use crate::core::Core;
use crate::policy::Policy;
use crate::sockets::{Listen, Proto};
use crate::stats::CoreStats;
use crate::tcp::Tcp;
use crate::udp::Udp;

/// Sent by a worker to the main thread once it is listening, or failed to start.
pub type Ready = Result<String, String>;

/// SQ entries per ring: the most SQEs one batch of completions queues before the
/// next enter (a full SQ is flushed or backlogged, never fatal).
const SQ_ENTRIES: u32 = 4096;

/// CQ entries for a core: enough for every op that can complete between two reaps.
/// A connection has at most four ops armed at once (two polls and two relay ops,
/// or a connect and its timeout), a flow one multishot receive; each tproxy socket's
/// multishot receive can post one completion per provided buffer.
pub fn cq_entries(cfg: &Config) -> u32 {
    let conns = if cfg.tcp { cfg.max_conns_per_core } else { 0 };
    let flows = if cfg.udp {
        cfg.udp_max_flows_per_core
    } else {
        0
    };
    let udp_bufs = if cfg.udp {
        2 * usize::from(crate::udp::BUFFERS)
    } else {
        0
    };
    let want = 4 * conns + flows + udp_bufs + 1024;
    (want
        .next_power_of_two()
        .clamp(8 * SQ_ENTRIES as usize, 1 << 16)) as u32
}

/// Everything one core owns. The core (and with it the ring) drops first.
pub struct Worker {
    core: Core,
    tcp: Option<Tcp>,
    udp: Option<Udp>,
    /// The periodic timer's interval, read by the kernel (boxed: stable address).
    tick_ts: Box<types::Timespec>,
    /// Stop requests from the main thread.
    control: OwnedFd,
    control_buf: Box<[u8; 8]>,
    /// The periodic timer was cancelled for the final wind-down.
    tick_cancelled: bool,
}

impl Worker {
    /// Builds the worker on the current (already pinned) thread.
    pub fn new(s: Spawn) -> Result<Worker, String> {
        let Spawn {
            cfg,
            cpu,
            stats,
            control,
            policy,
            sockets,
            flowlog,
        } = s;
        let ring = Ring::new(SQ_ENTRIES, cq_entries(&cfg), &cfg.features)
            .map_err(|e| format!("cpu {cpu}: io_uring_setup: {e}"))?;
        let mut core = Core::new(ring, cfg.clone(), cpu, stats, policy);
        core.flowlog = flowlog;
        let (tcp_fds, udp_fds): (Vec<_>, Vec<_>) =
            sockets.into_iter().partition(|l| l.proto == Proto::Tcp);
        let tcp = if cfg.tcp {
            let fds = tcp_fds.into_iter().map(|l| l.fd).collect();
            Some(Tcp::new(&mut core, fds).map_err(|e| format!("cpu {cpu}: {e}"))?)
        } else {
            None
        };
        let udp = if cfg.udp {
            let fds = udp_fds.into_iter().map(|l| l.fd).collect();
            Some(Udp::new(&mut core, fds).map_err(|e| format!("cpu {cpu}: UDP: {e}"))?)
        } else {
            None
        };
        Ok(Worker {
            core,
            tcp,
            udp,
            tick_ts: Box::new(types::Timespec::new().sec(1)),
            control,
            control_buf: Box::new([0; 8]),
            tick_cancelled: false,
        })
    }

    /// Arms the 1 s housekeeping timer: multishot where the kernel has it (6.4),
    /// else single-shot, re-armed by `on_tick` on every completion.
    fn arm_tick(&mut self) {
        let t = opcode::Timeout::new(&*self.tick_ts as *const types::Timespec).count(0);
        let t = if self.core.cfg.features.multishot_timeout {
            t.flags(types::TimeoutFlags::MULTISHOT)
        } else {
            t
        };
        self.core
            .submit(t.build().user_data(Token::global(Op::Tick).encode()));
    }

    fn arm_control(&mut self) {
        let sqe = opcode::Read::new(
            types::Fd(self.control.as_raw_fd()),
            self.control_buf.as_mut_ptr(),
            8,
        )
        .build()
        .user_data(Token::global(Op::Control).encode());
        self.core.submit(sqe);
    }

    /// Runs until stopped and drained. Consumes the worker.
    pub fn run(mut self, ready: mpsc::Sender<Ready>) {
        self.arm_tick();
        self.arm_control();
        if let Some(tcp) = self.tcp.as_mut() {
            tcp.start(&mut self.core);
        }
        if let Some(udp) = self.udp.as_mut() {
            udp.start(&mut self.core);
        }
        if let Err(e) = self.core.ring.submit() {
            // Nothing reached the kernel: nothing is in flight.
            let _ = ready.send(Err(format!("cpu {}: first submit: {e}", self.core.cpu)));
            self.core.dead_ring(e);
        }
        let _ = ready.send(Ok(self.core.ring.flags_description.clone()));
        drop(ready);

        let mut batch: Vec<Completion> = Vec::with_capacity(1024);
        loop {
            // Directions still in the run queue: poll the ring without blocking.
            let wait = if self.tcp.as_ref().is_some_and(|t| t.has_queued()) {
                0
            } else {
                1
            };
            if let Err(e) = self.core.ring.submit_and_wait(wait) {
                self.core.dead_ring(e);
            }
            batch.clear();
            self.core.ring.drain(&mut batch);
            for c in batch.iter().copied() {
                self.dispatch(c);
            }
            if let Some(tcp) = self.tcp.as_mut() {
                tcp.end_of_batch(&mut self.core);
            }
            self.maybe_wind_down();
            if self.core.stopping && self.core.in_flight() == 0 {
                break;
            }
        }
        // Tells a watchdog this worker ended on purpose (see `Engine::liveness`).
        self.core
            .stats
            .heartbeat
            .store(crate::stats::HEARTBEAT_ENDED, Relaxed);
        // Nothing of ours is referenced by the kernel any more (in flight == 0), so
        // dropping the ring and its buffers is sound.
    }

    fn dispatch(&mut self, c: Completion) {
        let Some(tok) = Token::decode(c.user_data) else {
            crate::log::error(
                "unknown_completion",
                format_args!("completion with unknown user_data {:#x}", c.user_data),
                &[("cpu", &self.core.cpu)],
            );
            return;
        };
        self.core.completed(&c);
        match tok.op.subsystem() {
            Subsystem::Tcp => {
                let tcp = self.tcp.as_mut().expect("TCP ops only when TCP is on");
                tcp.on_cqe(&mut self.core, tok, c);
            }
            Subsystem::Udp => {
                let udp = self.udp.as_mut().expect("UDP ops only when UDP is on");
                udp.on_cqe(&mut self.core, tok, c);
            }
            Subsystem::Core => match tok.op {
                Op::Tick => self.on_tick(c),
                Op::Control => self.on_control(c),
                _ => {} // a cancel's own completion
            },
        }
    }

    fn on_tick(&mut self, c: Completion) {
        if !c.more() && !self.tick_cancelled {
            // A single-shot tick, or a multishot timer the kernel ended: re-arm.
            self.arm_tick();
        }
        self.core.tick += 1;
        self.core.stats.heartbeat.store(self.core.tick, Relaxed);
        if let Some(tcp) = self.tcp.as_mut() {
            tcp.on_tick(&mut self.core);
        }
        if let Some(udp) = self.udp.as_mut() {
            udp.on_tick(&mut self.core);
        }
        let overflow = u64::from(self.core.ring.cq_overflow());
        let s = &self.core.stats;
        s.ring_in_flight
            .store(self.core.in_flight() as u64, Relaxed);
        s.ring_cq_overflow.store(overflow, Relaxed);
        s.ring_backlog
            .store(self.core.ring.backlog_len() as u64, Relaxed);
    }

    fn on_control(&mut self, c: Completion) {
        if c.result >= 0 && !self.core.stopping {
            self.begin_stop();
        } else if c.result < 0 && c.result != -libc::ECANCELED && !self.core.stopping {
            self.arm_control();
        }
    }

    /// Stops accepting and receiving; live connections and flows drain until the
    /// drain deadline.
    fn begin_stop(&mut self) {
        self.core.stopping = true;
        if let Some(tcp) = self.tcp.as_mut() {
            tcp.stop(&mut self.core);
        }
        if let Some(udp) = self.udp.as_mut() {
            udp.stop(&mut self.core);
        }
    }

    /// Once nothing is left while stopping, cancels the timer so the loop can end
    /// with nothing in flight.
    fn maybe_wind_down(&mut self) {
        let tcp_done = self.tcp.as_ref().is_none_or(|t| t.is_drained());
        let udp_done = self.udp.as_ref().is_none_or(|u| u.is_drained());
        if self.core.stopping && tcp_done && udp_done && !self.tick_cancelled {
            self.tick_cancelled = true;
            let sqe = opcode::TimeoutRemove::new(Token::global(Op::Tick).encode())
                .build()
                .user_data(Token::global(Op::Cancel).encode());
            self.core.submit(sqe);
        }
    }
}

/// Everything a worker thread starts from.
pub struct Spawn {
    pub cfg: Arc<Config>,
    pub cpu: usize,
    pub stats: Arc<CoreStats>,
    /// Stop requests from the main thread.
    pub control: OwnedFd,
    pub policy: Box<dyn Policy>,
    /// Its listening sockets.
    pub sockets: Vec<Listen>,
    /// Its queue to the flow log writer.
    pub flowlog: Option<std::sync::mpsc::SyncSender<crate::flowlog::FlowRecord>>,
}

/// Body of a worker thread: pin, build, report readiness, run.
pub fn thread_main(s: Spawn, ready: mpsc::Sender<Ready>) {
    let cpu = s.cpu;
    if !core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
        let _ = ready.send(Err(format!("cannot pin the worker thread to CPU {cpu}")));
        return;
    }
    match Worker::new(s) {
        Ok(w) => w.run(ready),
        Err(e) => {
            let _ = ready.send(Err(e));
        }
    }
}
