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
use crate::core::ring::{self, BufGroup, Completion, Ring};
use crate::core::token::{Op, Subsystem, Token};
use crate::core::Core;
use crate::policy::Policy;
use crate::sockets::{Listen, Proto};
use crate::stats::CoreStats;
use crate::tcp::Tcp;
use crate::udp::Udp;

/// Sent by a worker to the main thread once it is listening (its ring's setup
/// flags and CQ size), or failed to start.
pub type Ready = Result<(String, u32), String>;

/// SQ entries per ring: the most SQEs one batch of completions queues before the
/// next enter (a full SQ is flushed or backlogged, never fatal).
const SQ_ENTRIES: u32 = 4096;

/// The smallest CQ a worker accepts when ring memory is short ([`Ring::build`]):
/// no smaller than the SQ (the kernel's own floor).
const MIN_CQ_ENTRIES: u32 = SQ_ENTRIES;

/// CQ entries the connection and flow budget asks for: enough for every op that can
/// complete between two reaps. A connection has at most four ops armed at once (two
/// polls and two relay ops, or a connect and its timeout), a flow one multishot
/// receive; each tproxy socket's multishot receive can post one completion per
/// provided buffer.
fn budget_cq_entries(cfg: &Config) -> u32 {
    // The connection cap is global: one core may hold all of them.
    let conns = if cfg.tcp { cfg.max_conns } else { 0 };
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

/// The provided-buffer groups a core's ring is built with.
fn buffer_groups(cfg: &Config) -> Vec<BufGroup> {
    [
        cfg.tcp.then(|| crate::tcp::buffer_group(cfg)).flatten(),
        cfg.udp.then(crate::udp::buffer_group),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// How big each core's CQ will be asked to be ([`cq_plan`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CqPlan {
    /// What the connection and flow budget asks for.
    pub budget: u32,
    /// What each core asks for: `budget`, or less where ring memory counts against
    /// `RLIMIT_MEMLOCK` and `cores` rings of the budget's size would not fit in it.
    pub planned: u32,
    /// The `RLIMIT_MEMLOCK` that cut it, in bytes.
    pub memlock: Option<u64>,
}

/// Sizes the CQ of every core before they start, so that where ring memory is
/// charged to `RLIMIT_MEMLOCK` (no `CAP_IPC_LOCK`) the cores split the limit evenly
/// instead of the first ones taking it all. Each core still shrinks its own ring
/// further if the kernel says `ENOMEM` ([`Ring::build`]): other rings of the same
/// user (a draining predecessor, another process) share the limit.
pub fn cq_plan(cfg: &Config) -> CqPlan {
    let budget = budget_cq_entries(cfg);
    let memlock = if crate::sys::has_ipc_lock() {
        None
    } else {
        crate::sys::memlock_limit().ok().flatten()
    };
    let planned = match memlock {
        Some(limit) => fit_cq(
            budget,
            limit / cfg.cores.len().max(1) as u64,
            &buffer_groups(cfg),
        ),
        None => budget,
    };
    CqPlan {
        budget,
        planned,
        memlock: memlock.filter(|_| planned < budget),
    }
}

/// The largest CQ (a power of two from `budget` down to [`MIN_CQ_ENTRIES`]) whose ring
/// fits in `share` bytes of locked memory; the minimum when none does (the kernel
/// then decides).
fn fit_cq(budget: u32, share: u64, groups: &[BufGroup]) -> u32 {
    let mut cq = budget.max(MIN_CQ_ENTRIES);
    while cq > MIN_CQ_ENTRIES && ring::locked_bytes(SQ_ENTRIES, cq, groups) as u64 > share {
        cq /= 2;
    }
    cq
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
            cq_entries,
        } = s;
        let groups = buffer_groups(&cfg);
        let built = Ring::build(
            SQ_ENTRIES,
            cq_entries,
            MIN_CQ_ENTRIES,
            &cfg.features,
            &groups,
        )
        .map_err(|e| format!("cpu {cpu}: {e}"))?;
        let mut ring = built.ring;
        ring.set_batch_wait(cfg.batch_wait_us);
        if let Some((wanted, e)) = built.shrunk {
            let got = ring.cq_entries();
            let need = ring::locked_bytes(SQ_ENTRIES, wanted, &groups).div_ceil(1024);
            crate::log::warn(
                "ring",
                format_args!(
                    "the ring was made smaller than asked: a CQ of {wanted} entries \
                     ({need} KiB of ring memory with the SQ and buffer rings) got {e}; \
                     {}. Completions beyond the CQ wait in the kernel and are counted \
                     as ring_cq_overflow",
                    if crate::sys::has_ipc_lock() {
                        "the kernel found no memory for it in one piece (low or \
                         fragmented memory)"
                    } else {
                        "without CAP_IPC_LOCK ring memory counts against RLIMIT_MEMLOCK: \
                         raise it (systemd: LimitMEMLOCK=infinity) for the full size"
                    }
                ),
                &[("cpu", &cpu), ("cq", &got), ("cq_wanted", &wanted)],
            );
        }
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
        let ring = &self.core.ring;
        let _ = ready.send(Ok((ring.flags_description.clone(), ring.cq_entries())));
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
            self.core.start_batch();
            for c in batch.iter().copied() {
                self.dispatch(c);
            }
            if let Some(tcp) = self.tcp.as_mut() {
                tcp.end_of_batch(&mut self.core);
            }
            if let Some(udp) = self.udp.as_mut() {
                udp.end_of_batch(&mut self.core);
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
    /// The CQ size to ask for, planned once for every core ([`cq_plan`]).
    pub cq_entries: u32,
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

#[cfg(test)]
mod tests {
    use super::*;

    const GROUPS: [BufGroup; 2] = [
        BufGroup {
            name: "TCP copy",
            group: 0,
            entries: 512,
            buf_size: 65536,
        },
        BufGroup {
            name: "UDP",
            group: 1,
            entries: 256,
            buf_size: 65783,
        },
    ];

    #[test]
    fn locked_bytes_counts_pages_of_every_region() {
        // 1 MiB of CQEs + 16 KiB SQ array + header: 261 pages; 256 KiB of SQEs;
        // 8 KiB and 4 KiB of buffer ring entries.
        assert_eq!(
            ring::locked_bytes(4096, 65536, &GROUPS),
            (261 + 64 + 2 + 1) * 4096
        );
        assert_eq!(ring::locked_bytes(4096, 4096, &[]), (21 + 64) * 4096);
    }

    #[test]
    fn fit_cq_halves_to_the_share_and_stops_at_the_floor() {
        let mib = 1 << 20;
        // Enough room: the budget stands.
        assert_eq!(fit_cq(65536, 8 * mib, &GROUPS), 65536);
        // 1.3 MiB does not fit in 1 MiB; 32768 entries (0.8 MiB) do.
        assert_eq!(fit_cq(65536, mib, &GROUPS), 32768);
        // Whatever fits, the largest power of two does: one step smaller exceeds.
        for share in [400 * 1024, 600 * 1024, 3 * mib / 2] {
            let cq = fit_cq(65536, share, &GROUPS);
            assert!(ring::locked_bytes(SQ_ENTRIES, cq, &GROUPS) as u64 <= share);
            assert!(ring::locked_bytes(SQ_ENTRIES, cq * 2, &GROUPS) as u64 > share);
        }
        // Nothing fits: the floor, and the kernel has the last word.
        assert_eq!(fit_cq(65536, 64 * 1024, &GROUPS), MIN_CQ_ENTRIES);
        assert_eq!(fit_cq(1024, 8 * mib, &GROUPS), MIN_CQ_ENTRIES);
    }
}
