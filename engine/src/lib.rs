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
//! stats, config, addrs, cpus
//! ```

#![deny(unsafe_code)]

pub mod addrs;
pub mod config;
#[allow(unsafe_code)]
pub mod core;
pub mod cpus;
pub mod metrics;
pub mod policy;
pub mod stats;
#[allow(unsafe_code)]
pub mod sys;
pub mod tcp;
pub mod udp;
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
}

impl Engine {
    /// Starts one worker per core of `cfg` and waits until every one listens.
    /// If any fails, the others are stopped and the first error is returned.
    pub fn start(cfg: Config, policy: PolicyFactory) -> Result<Engine, StartError> {
        let cfg = Arc::new(cfg);
        let (tx, rx) = mpsc::channel();
        let mut engine = Engine {
            cfg: cfg.clone(),
            workers: Vec::new(),
            ring_flags: String::new(),
            started: Instant::now(),
        };
        for &cpu in &cfg.cores {
            let stats = Arc::new(CoreStats::default());
            let os = |what| move |source| StartError::Os { what, source };
            let control = sys::eventfd().map_err(os("eventfd"))?;
            let worker_control = control.try_clone().map_err(os("dup eventfd"))?;
            let (c, s, t, p) = (cfg.clone(), stats.clone(), tx.clone(), policy(cpu));
            let thread = std::thread::Builder::new()
                .name(format!("ringrelay-cpu{cpu}"))
                .spawn(move || worker::thread_main(c, cpu, s, worker_control, p, t))
                .map_err(os("spawning a worker thread"))?;
            engine.workers.push(WorkerHandle {
                cpu,
                stats,
                control,
                thread,
            });
        }
        drop(tx);
        let mut failure = None;
        for _ in 0..engine.workers.len() {
            match rx.recv_timeout(Duration::from_secs(10)) {
                Ok(Ok(flags)) => engine.ring_flags = flags,
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
        for w in &self.workers {
            let _ = sys::eventfd_write(w.control.as_fd(), 1);
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
        // Read after the joins: these are final.
        let rows = stats.iter().map(|(cpu, s)| (*cpu, s.snapshot())).collect();
        if panicked {
            Err(rows)
        } else {
            Ok(rows)
        }
    }
}
