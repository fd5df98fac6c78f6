//! ringrelay engine: a thread-per-core io_uring transparent proxy, as a library.
//!
//! [`Engine::start`] runs one pinned worker per configured core, each with its own
//! ring, listeners, connections and flows, and a [`policy::Policy`] of its own that
//! gives every new connection and flow its verdict. The `engine` binary is a thin
//! CLI around it (arguments, startup checks, signals).
//!
//! Layout (one module per concern, dependencies point down only):
//!
//! ```text
//! worker      Worker { core, tcp, udp }: the loop, dispatch on the token's subsystem
//! tcp/        accept (limit, park), conns (slab), machine (sans-IO connection),
//!             direction (one relay direction), driver (Effects over io_uring),
//!             splice (pipe pool), copy (provided buffers)
//! udp/        flows (bounded LRU table), replies (sockets bound to original
//!             destinations), the datagram path
//! policy      the decision point
//! core/       Core (ring, submit + in-flight count, cancel, clock, stats, log),
//!             ring (io_uring + owned buffer rings), token (user_data codec)
//! sys/        thin checked syscalls, cmsg and sockaddr codec (the unsafe lives here
//!             and in core/ring)
//! metrics     Prometheus text format on --metrics ADDR, from its own thread
//! fdpool      the process-wide fd credit pool every core draws on
//! stats, config, addrs, cpus
//! ```

#![deny(unsafe_code)]

pub mod addrs;
pub mod config;
pub mod core;
pub mod cpus;
pub mod fdpool;
pub mod flowlog;
pub mod log;
pub mod metrics;
pub mod notify;
pub mod policy;
pub mod sockets;
pub mod stats;
#[allow(unsafe_code)]
pub mod sys;
pub mod takeover;
pub mod tcp;
pub mod udp;
pub mod upstream;
pub mod worker;

use std::os::fd::{AsFd, OwnedFd};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

pub use config::{Config, RelayMode};
pub use policy::{Policy, PolicyFactory};
pub use stats::{CloseReason, CoreStats, FlowEnd, Snapshot};

/// Errors of [`Engine::start`].
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A worker could not be set up (ring, listeners, pinning); the text says which
    /// core and what failed.
    #[error("{0}")]
    Worker(String),
    /// Creating the control eventfd or spawning a thread failed.
    #[error("{what}: {source}")]
    Os {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Counters of every worker, with its CPU.
pub type CoreCounters = Vec<(usize, Snapshot)>;

/// How the workers ended: `Err` if one panicked. Both carry the final counters.
pub type Outcome = Result<CoreCounters, CoreCounters>;

/// Reads the counters of every worker ([`Engine::counters_reader`]).
#[derive(Clone)]
pub struct CountersReader(Vec<(usize, Arc<CoreStats>)>);

impl CountersReader {
    /// Per-rule counters of every worker, with its CPU.
    pub fn rule_counts(&self) -> Vec<(usize, Arc<str>, stats::RuleCount)> {
        self.0
            .iter()
            .flat_map(|(cpu, s)| s.rule_counts().into_iter().map(move |(n, c)| (*cpu, n, c)))
            .collect()
    }

    /// A snapshot of every worker's counters, with its CPU.
    pub fn counters(&self) -> CoreCounters {
        self.0.iter().map(|(cpu, s)| (*cpu, s.snapshot())).collect()
    }
}

struct WorkerHandle {
    cpu: usize,
    stats: Arc<CoreStats>,
    control: OwnedFd,
    thread: std::thread::JoinHandle<()>,
}

/// A running engine: its workers and their counters.
pub struct Engine {
    cfg: Arc<Config>,
    workers: Vec<WorkerHandle>,
    ring_flags: String,
    started: Instant,
    /// Duplicates of the listening sockets, for a successor engine (takeover);
    /// dropped when stopping, so that the sockets close once the workers close theirs.
    handover: Arc<std::sync::Mutex<Option<Vec<sockets::Listen>>>>,
    flowlog: Option<flowlog::FlowLog>,
}

impl Engine {
    /// Starts one worker per core of `cfg` and waits until every one listens.
    /// If any fails, the others are stopped and the first error is returned.
    pub fn start(cfg: Config, policy: PolicyFactory) -> Result<Engine, StartError> {
        Engine::start_with(cfg, policy, Vec::new())
    }

    /// [`Engine::start`] over `inherited` listening sockets (a takeover): they are
    /// dealt to the workers first; new ones are opened only where needed.
    pub fn start_with(
        cfg: Config,
        policy: PolicyFactory,
        inherited: Vec<sockets::Listen>,
    ) -> Result<Engine, StartError> {
        let listen = sockets::ListenSet::build(&cfg, inherited).map_err(StartError::Worker)?;
        let handover = listen.dup_all().map_err(|source| StartError::Os {
            what: "duplicating the listening sockets",
            source,
        })?;
        let flowlog = match &cfg.flow_log {
            Some(t) => Some(flowlog::FlowLog::start(t.clone(), cfg.cores.len()).map_err(
                |source| StartError::Os {
                    what: "opening the flow log",
                    source,
                },
            )?),
            None => None,
        };
        let plan = worker::cq_plan(&cfg);
        if let Some(limit) = plan.memlock {
            log::warn(
                "ring",
                format_args!(
                    "RLIMIT_MEMLOCK is {} KiB and the engine lacks CAP_IPC_LOCK, so the \
                     kernel charges ring memory to it: each of the {} cores gets a CQ of \
                     {} entries instead of {}. Raise the limit (systemd: \
                     LimitMEMLOCK=infinity, as the shipped unit sets) for the full size",
                    limit / 1024,
                    cfg.cores.len(),
                    plan.planned,
                    plan.budget
                ),
                &[("cq", &plan.planned), ("cq_wanted", &plan.budget)],
            );
        }
        let cfg = Arc::new(cfg);
        let (tx, rx) = mpsc::channel();
        let mut engine = Engine {
            cfg: cfg.clone(),
            workers: Vec::new(),
            ring_flags: String::new(),
            started: Instant::now(),
            handover: Arc::new(std::sync::Mutex::new(Some(handover))),
            flowlog: None,
        };
        for (i, (&cpu, sockets)) in cfg.cores.iter().zip(listen.per_worker).enumerate() {
            let stats = Arc::new(CoreStats::default());
            let os = |what| move |source| StartError::Os { what, source };
            let control = sys::eventfd().map_err(os("eventfd"))?;
            let worker_control = control.try_clone().map_err(os("dup eventfd"))?;
            let (c, s, t, p) = (cfg.clone(), stats.clone(), tx.clone(), policy(cpu));
            let w = worker::Spawn {
                cfg: c,
                cpu,
                stats: s,
                control: worker_control,
                policy: p,
                sockets,
                flowlog: flowlog.as_ref().map(|f| f.sender(i)),
                cq_entries: plan.planned,
            };
            let thread = std::thread::Builder::new()
                .name(format!("ringrelay-cpu{cpu}"))
                .spawn(move || worker::thread_main(w, t))
                .map_err(os("spawning a worker thread"))?;
            engine.workers.push(WorkerHandle {
                cpu,
                stats,
                control,
                thread,
            });
        }
        drop(tx);
        engine.flowlog = flowlog;
        let mut failure = None;
        let mut smallest_cq = None;
        for _ in 0..engine.workers.len() {
            match rx.recv_timeout(Duration::from_secs(10)) {
                // Cores whose ring memory ran short have a smaller CQ (and said
                // so in the log): the startup line shows the smallest.
                Ok(Ok((flags, cq))) => {
                    if smallest_cq.is_none_or(|c| cq < c) {
                        smallest_cq = Some(cq);
                        engine.ring_flags = flags;
                    }
                }
                Ok(Err(e)) => {
                    failure.get_or_insert(e);
                }
                Err(_) => {
                    failure.get_or_insert("a worker did not start within 10 s".to_string());
                }
            }
        }
        if let Some(e) = failure {
            engine.stop();
            for w in engine.workers.drain(..) {
                let _ = w.thread.join();
            }
            return Err(StartError::Worker(e));
        }
        Ok(engine)
    }

    /// The configuration the workers run with.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The ring setup flags, for the startup line.
    pub fn ring_flags(&self) -> &str {
        &self.ring_flags
    }

    /// Time since start.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// A handle that reads every worker's counters from another thread (metrics):
    /// relaxed loads of each core's own counters, no lock shared with the workers.
    pub fn counters_reader(&self) -> CountersReader {
        CountersReader(
            self.workers
                .iter()
                .map(|w| (w.cpu, w.stats.clone()))
                .collect(),
        )
    }

    /// Per-rule counters of every worker (not summed).
    pub fn rule_counts(&self) -> Vec<(Arc<str>, stats::RuleCount)> {
        self.workers
            .iter()
            .flat_map(|w| w.stats.rule_counts())
            .collect()
    }

    /// A snapshot of every worker's counters, with its CPU.
    pub fn counters(&self) -> CoreCounters {
        self.workers
            .iter()
            .map(|w| (w.cpu, w.stats.snapshot()))
            .collect()
    }

    /// Asks every worker to stop: no new connections or flows, live ones drain
    /// for up to the drain timeout. Returns at once; see [`Engine::is_finished`].
    pub fn stop(&self) {
        self.drop_handover();
        for w in &self.workers {
            let _ = sys::eventfd_write(w.control.as_fd(), 1);
        }
    }

    /// The engine's duplicates of its listening sockets, shared with the takeover
    /// server ([`takeover::serve`]); `None` once stopping.
    pub fn handover(&self) -> Arc<std::sync::Mutex<Option<Vec<sockets::Listen>>>> {
        self.handover.clone()
    }

    fn drop_handover(&self) {
        self.handover
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }

    /// A liveness probe for a watchdog: fails once a worker has not run its 1 s tick
    /// for `stall` (its loop is stuck), or has ended while not asked to stop.
    pub fn liveness(&self, stall: Duration) -> impl FnMut() -> Result<(), String> + Send {
        let stats: Vec<_> = self
            .workers
            .iter()
            .map(|w| (w.cpu, w.stats.clone()))
            .collect();
        let mut seen: Vec<(u64, Instant)> = stats.iter().map(|_| (0, Instant::now())).collect();
        move || {
            for (i, (cpu, s)) in stats.iter().enumerate() {
                let ticks = s.heartbeat.load(std::sync::atomic::Ordering::Relaxed);
                if ticks == stats::HEARTBEAT_ENDED {
                    continue; // drained and ended
                }
                if ticks != seen[i].0 {
                    seen[i] = (ticks, Instant::now());
                } else if seen[i].1.elapsed() > stall {
                    return Err(format!(
                        "the worker on CPU {cpu} has not turned its loop for {:.1} s",
                        seen[i].1.elapsed().as_secs_f64()
                    ));
                }
            }
            Ok(())
        }
    }

    /// Reopens the flow log file (SIGHUP, after logrotate moved it).
    pub fn reopen_logs(&self) {
        if let Some(f) = &self.flowlog {
            f.reopen();
        }
    }

    /// Every worker has ended.
    pub fn is_finished(&self) -> bool {
        self.workers.iter().all(|w| w.thread.is_finished())
    }

    /// Some worker has ended (unexpectedly, unless stopped).
    pub fn any_finished(&self) -> bool {
        self.workers.iter().any(|w| w.thread.is_finished())
    }

    /// Waits for every worker; `Err` if one panicked. Returns the final counters.
    pub fn join(self) -> Outcome {
        let mut panicked = false;
        let mut stats = Vec::new();
        for w in self.workers {
            panicked |= w.thread.join().is_err();
            stats.push((w.cpu, w.stats));
        }
        if let Some(f) = self.flowlog {
            f.finish(); // every worker's queue is closed now: write what is left
        }
        // Read after the joins: these are final.
        let rows = stats.iter().map(|(cpu, s)| (*cpu, s.snapshot())).collect();
        if panicked {
            Err(rows)
        } else {
            Ok(rows)
        }
    }
}
