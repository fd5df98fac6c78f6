//! ringrelay engine: a thread-per-core io_uring transparent proxy.
//!
//! `main` resolves the configuration, checks the machine (privileges, io_uring
//! features, the port, the fd limit) with actionable errors, starts one pinned worker
//! per core and then only handles signals: SIGUSR1 prints the per-core counters,
//! SIGINT/SIGTERM drain and stop the workers and print a summary. With `--metrics`
//! a thread of its own serves the same counters to Prometheus.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use clap::Parser;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1, SIGUSR2};
use socket2::{Domain, Socket, Type};

use ringrelay_engine::config::{self, Args, Config, RelayMode};
use ringrelay_engine::notify::{self, Notifier};
use ringrelay_engine::policy::{rules::Rules, RulesHandle};
use ringrelay_engine::{
    core::ring, cpus, flowlog, log, metrics, policy, stats, sys, takeover, Engine,
};

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(path) = &args.check_config {
        return check_config(path);
    }
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("engine: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Checks that the process may create transparent, marked sockets.
fn check_privileges(mark: u32) -> Result<()> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, None).context("creating a probe socket")?;
    let hint = "run as root, or grant CAP_NET_ADMIN (and CAP_NET_RAW), e.g. systemd \
                AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW CAP_NET_BIND_SERVICE";
    if let Err(e) = s.set_ip_transparent_v4(true) {
        if e.raw_os_error() == Some(libc::EPERM) {
            bail!("missing CAP_NET_ADMIN/CAP_NET_RAW: setting IP_TRANSPARENT was refused; {hint}");
        }
        bail!("setting IP_TRANSPARENT failed: {e}");
    }
    if mark != 0 {
        if let Err(e) = s.set_mark(mark) {
            if e.raw_os_error() == Some(libc::EPERM) {
                bail!("missing CAP_NET_ADMIN: setting SO_MARK {mark:#x} was refused; {hint}");
            }
            bail!("setting SO_MARK failed: {e}");
        }
    }
    Ok(())
}

/// Fails if anything already listens on the port. Workers bind with SO_REUSEPORT,
/// which another process of the same user could share silently, so probe without it.
fn check_port_free(cfg: &Config) -> Result<()> {
    for v6 in cfg.families() {
        let addr: SocketAddr = sys::unspecified(v6, cfg.port);
        let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
        let mut kinds = Vec::new();
        if cfg.tcp {
            kinds.push((Type::STREAM, "TCP", "ltnp"));
        }
        if cfg.udp {
            kinds.push((Type::DGRAM, "UDP", "lunp"));
        }
        for (ty, name, ss) in kinds {
            let s = match Socket::new(domain, ty, None) {
                Ok(s) => s,
                Err(e) if v6 && e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
                    bail!("IPv6 is disabled on this host; start with --no-ipv6")
                }
                Err(e) => return Err(e).context("creating a probe socket"),
            };
            if v6 {
                s.set_only_v6(true)?;
            }
            s.set_reuse_address(true)?;
            if let Err(e) = s.bind(&addr.into()) {
                if e.raw_os_error() == Some(libc::EADDRINUSE) {
                    bail!(
                        "port {} is already in use ({name} on {addr}): another engine or \
                         service holds it; find it with `ss -{ss} 'sport = :{}'` or choose \
                         another --port (and the same `setup --port`)",
                        cfg.port,
                        cfg.port
                    );
                }
                return Err(e).with_context(|| format!("binding a probe socket to {addr}"));
            }
        }
    }
    Ok(())
}

/// Splice relays: makes one pipe of `--pipe-size` and warns when the kernel granted
/// less. Without CAP_SYS_RESOURCE, `fs.pipe-max-size` caps each pipe and, once the
/// user's pipes add up to `fs.pipe-user-pages-soft` pages, new pipes get 8 KiB:
/// the relay still works, just slower (counted as `pipes_undersized`).
fn check_pipe_size(cfg: &Config) -> Result<()> {
    let (true, RelayMode::Splice, Some(want)) = (cfg.tcp, cfg.relay, cfg.pipe_size) else {
        return Ok(());
    };
    let pipe = sys::Pipe::new(Some(want)).context("creating a pipe for the splice relay")?;
    if pipe.capacity < want {
        let read = |k: &str| {
            std::fs::read_to_string(format!("/proc/sys/fs/{k}"))
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "?".into())
        };
        log::warn(
            "pipe_size_not_granted",
            format_args!(
                "--pipe-size {want} not granted, pipes get {} bytes: without \
             CAP_SYS_RESOURCE the kernel caps a pipe at fs.pipe-max-size ({}) and shrinks new \
             pipes once this user's add up to fs.pipe-user-pages-soft ({} pages); raise \
             those sysctls, grant CAP_SYS_RESOURCE, or pass a smaller --pipe-size",
                pipe.capacity,
                read("pipe-max-size"),
                read("pipe-user-pages-soft"),
            ),
            &[],
        );
    }
    Ok(())
}

/// Largest `--pipe-size`: 1 GiB (the kernel refuses more than 2 GiB; past
/// `fs.pipe-max-size` it needs CAP_SYS_RESOURCE anyway).
const MAX_PIPE_SIZE: usize = 1 << 30;
/// Largest `--copy-buf-size`: 1 MiB, i.e. 512 MiB of provided buffers per core.
const MAX_COPY_BUF_SIZE: usize = 1 << 20;

fn resolve(args: &Args, features: ring::Features) -> Result<(Config, u64)> {
    let allowed = cpus::allowed();
    let cores = match &args.cores {
        Some(text) => {
            let list = cpus::parse(text).map_err(|e| anyhow::anyhow!("--cores {text}: {e}"))?;
            cpus::validate(&list, &allowed).map_err(|e| anyhow::anyhow!("--cores {text}: {e}"))?;
            list
        }
        None if allowed.is_empty() => bail!("cannot read this process's CPU affinity"),
        None => allowed,
    };
    if !args.no_tcp && args.pipe_size != 0 && !(4096..=MAX_PIPE_SIZE).contains(&args.pipe_size) {
        bail!(
            "--pipe-size {} is out of range (4096 to {MAX_PIPE_SIZE}, or 0 for the kernel's \
             default)",
            args.pipe_size
        );
    }
    if !args.no_tcp && !(4096..=MAX_COPY_BUF_SIZE).contains(&args.copy_buf_size) {
        bail!(
            "--copy-buf-size {} is out of range (4096 to {MAX_COPY_BUF_SIZE}; each core \
             allocates 512 of them)",
            args.copy_buf_size
        );
    }
    if args.stall_buffer_bytes != 0 && args.stall_buffer_max_bytes < args.stall_buffer_bytes {
        bail!(
            "--stall-buffer-max-bytes {} is below --stall-buffer-bytes {}: the bound \
             starts at the second and grows to the first",
            args.stall_buffer_max_bytes,
            args.stall_buffer_bytes
        );
    }
    if args.no_tcp && args.no_udp {
        bail!("--no-tcp and --no-udp together leave nothing to relay");
    }
    let nofile = sys::raise_nofile_to_hard().context("raising RLIMIT_NOFILE")?;
    // Ring memory counts against RLIMIT_MEMLOCK where the engine lacks CAP_IPC_LOCK
    // (worker::cq_plan): take all the hard limit allows.
    sys::raise_memlock_to_hard().context("raising RLIMIT_MEMLOCK")?;
    let n = cores.len();
    let budget = config::fd_budget(nofile as usize, n, args.relay, !args.no_udp);
    let max_conns = args.max_conns.unwrap_or(budget.conns);
    let max_flows = args.udp_max_flows.unwrap_or(budget.flows);
    let max_pipes = args.max_pipes.unwrap_or(budget.pipes);
    if args.max_conns == Some(0) && !args.no_tcp {
        bail!("--max-conns 0 accepts no connection; use --no-tcp to relay UDP only");
    }
    if args.udp_max_flows == Some(0) && !args.no_udp {
        bail!("--udp-max-flows 0 leaves UDP no flow; use --no-udp instead");
    }
    if !args.no_tcp && max_conns == 0 {
        bail!(
            "RLIMIT_NOFILE is {nofile}: {} fds are kept aside for {n} cores, leaving no \
             room for a connection; raise LimitNOFILE (systemd) or `ulimit -n`",
            config::fd_reserve(n)
        );
    }
    if args.max_pipes == Some(0) {
        bail!("--max-pipes 0 leaves the splice relay no pipe; use --relay copy instead");
    }
    if args.max_conns.is_some() && max_conns > budget.conns {
        // Not an error: the pool bounds them first, and never lets fds run out.
        log::warn(
            "max_conns_over_budget",
            format_args!(
                "--max-conns {max_conns} needs {} fds but RLIMIT_NOFILE {nofile} leaves \
                 {} credits for TCP: at most {} connections will be admitted",
                max_conns * config::FDS_PER_CONN,
                budget.credits - budget.udp_floor,
                budget.conns
            ),
            &[],
        );
    }
    // The limit the ready line and the metrics state is the one that holds.
    let max_conns = max_conns.min(budget.conns);
    let fds = ringrelay_engine::fdpool::FdPool::new(budget.credits, budget.udp_floor, max_conns);
    Ok((
        Config {
            cores,
            port: args.port,
            relay: args.relay,
            mark: args.mark,
            source: args.source,
            udp_nat: args.udp_nat,
            connect_timeout_ms: args.connect_timeout_ms.max(1),
            idle_timeout_s: (args.idle_timeout_s != 0).then_some(args.idle_timeout_s),
            half_closed_timeout_s: (args.half_closed_timeout_s != 0)
                .then_some(args.half_closed_timeout_s),
            keepalive_s: (args.keepalive_s != 0).then_some(args.keepalive_s),
            stall_buffer_bytes: (args.stall_buffer_bytes != 0).then_some(args.stall_buffer_bytes),
            stall_buffer_max_bytes: args.stall_buffer_max_bytes.min(i32::MAX as usize / 2),
            batch_wait_us: if features.min_wait {
                args.batch_wait_us
            } else {
                0
            },
            max_conns,
            fds,
            max_pipes_per_core: max_pipes.div_ceil(n).max(1),
            park_max_per_core: (config::PARK_TOTAL / n).max(1),
            drain_timeout_s: args.drain_timeout_s,
            pipe_size: (args.pipe_size != 0).then_some(args.pipe_size),
            copy_buf_size: args.copy_buf_size,
            ipv6: !args.no_ipv6,
            tcp: !args.no_tcp,
            udp: !args.no_udp,
            udp_idle_timeout_s: args.udp_idle_timeout_s.max(1),
            udp_single_exchange_timeout_s: args
                .udp_single_exchange_timeout_s
                .clamp(1, args.udp_idle_timeout_s.max(1)),
            udp_max_flows_per_core: max_flows.div_ceil(n).max(1),
            features,
            flow_log: args.flow_log.as_deref().map(flowlog::Target::parse),
            sniff_timeout_ms: args.sniff_timeout_ms.max(1),
            metrics: args.metrics,
        },
        nofile,
    ))
}

/// A worker whose 1 s tick has not run for this long is stuck (watchdog).
const WATCHDOG_STALL: Duration = Duration::from_secs(3);

/// A one-line summary for systemd's `STATUS=`.
fn status_line(engine: &Engine) -> String {
    let mut t = stats::Snapshot::default();
    for (_, s) in engine.counters() {
        t.add(&s);
    }
    format!(
        "{} connections, {} UDP flows; {} accepted, {} flows created since start",
        t.active, t.udp_flows_active, t.accepted, t.udp_flows_created
    )
}

/// Starts draining: no new connections or flows, live ones finish.
fn begin_stop(engine: &Engine, notifier: &Notifier, why: &str) {
    let drain_s = engine.config().drain_timeout_s;
    log::info(
        "stopping",
        format_args!("{why}; draining for up to {drain_s} s"),
        &[("drain_timeout_s", &drain_s)],
    );
    let _ = notifier.send("STOPPING=1\nSTATUS=draining");
    engine.stop();
}

/// SIGUSR2: starts this engine again, from the binary now installed at the same
/// path (an upgrade), with the same arguments; with `--takeover` it takes the
/// sockets over and this one drains. The successor reports itself to systemd
/// (`MAINPID=`, needs `NotifyAccess=all`); `WATCHDOG_PID` names this process, so
/// it is not passed on.
fn restart_in_place(args: &Args) -> Result<std::process::Child> {
    if args.takeover.is_none() {
        bail!("it needs --takeover PATH (the new engine takes the sockets over through it)");
    }
    let exe = std::fs::read_link("/proc/self/exe").context("reading /proc/self/exe")?;
    // After a package upgrade the running file is gone: "PATH (deleted)", and PATH
    // now holds the new binary.
    let exe = std::path::PathBuf::from(
        exe.to_string_lossy()
            .trim_end_matches(" (deleted)")
            .to_string(),
    );
    std::process::Command::new(&exe)
        .args(std::env::args_os().skip(1))
        .env_remove("WATCHDOG_PID")
        .stdin(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))
}

fn print_counters(rows: &[(usize, stats::Snapshot)]) {
    print!("{}", stats::render(rows));
}

/// Per-rule counters, all cores together, after the counter table.
fn print_rules(reader: &ringrelay_engine::CountersReader) {
    let mut total: std::collections::BTreeMap<std::sync::Arc<str>, stats::RuleCount> =
        Default::default();
    for (_, name, c) in reader.rule_counts() {
        let t = total.entry(name).or_default();
        t.matches += c.matches;
        t.bytes += c.bytes;
    }
    if total.is_empty() {
        return;
    }
    println!("{:<32}{:>14}{:>18}", "rule", "matches", "bytes");
    for (name, c) in total {
        println!("{name:<32}{:>14}{:>18}", c.matches, c.bytes);
    }
}

/// `RINGRELAY_DISABLE`: optional io_uring features to leave off (fallback tests).
fn disabled_features() -> Option<String> {
    std::env::var("RINGRELAY_DISABLE").ok()
}

/// `engine --version`: version, git revision, build profile, kernel and the
/// io_uring features this kernel has.
fn print_version() {
    let kernel = sys::kernel_version().map_or("unknown".into(), |(a, b)| format!("{a}.{b}"));
    println!(
        "engine {} (git {}, {} build)",
        env!("CARGO_PKG_VERSION"),
        env!("RINGRELAY_GIT_REV"),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    println!("kernel {kernel}");
    match ring::probe(disabled_features().as_deref()) {
        Ok(f) => println!("io_uring: {}", f.describe()),
        Err(e) => println!("io_uring: unusable: {e}"),
    }
}

/// Starts the metrics thread on the engine's counters (a reader of each core's
/// own counters; nothing shared with the workers but those atomics).
fn start_metrics(server: metrics::Server, engine: &Engine) -> Result<()> {
    let cfg = engine.config();
    let started = SystemTime::now()
        .checked_sub(engine.uptime())
        .unwrap_or_else(SystemTime::now);
    let info = metrics::EngineInfo::new(cfg, started);
    let spare = metrics::spare_cpus(&cpus::allowed(), &cfg.cores);
    let addr = server.local_addr();
    let reader = engine.counters_reader();
    server
        .spawn(info, spare, cfg.fds.clone(), move || {
            Some((reader.counters(), reader.rule_counts()))
        })
        .context("starting the metrics thread")?;
    println!("metrics: http://{addr}/metrics");
    Ok(())
}

/// Loads a rules file, or says every error as FILE:LINE:COL: message.
fn load_rules(path: &std::path::Path) -> std::result::Result<Rules, String> {
    Rules::load(path).map_err(|errs| {
        errs.iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    })
}

/// `engine --check-config FILE`.
fn check_config(path: &std::path::Path) -> ExitCode {
    match load_rules(path) {
        Ok(r) => {
            println!("{}: OK, {} rules", path.display(), r.len());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// SIGHUP with `--config`: a valid file replaces the rules on every core as one
/// snapshot; an invalid one is refused, logged, counted, and the old rules stay.
fn reload(path: &std::path::Path, handle: &RulesHandle) {
    use std::sync::atomic::Ordering::Relaxed;
    match load_rules(path) {
        Ok(r) => {
            let n = r.len();
            handle.replace(r);
            policy::RELOADS.0.fetch_add(1, Relaxed);
            log::info(
                "reload",
                format_args!("reloaded {}: {n} rules", path.display()),
                &[("path", &path.display()), ("rules", &n)],
            );
        }
        Err(e) => {
            policy::RELOADS.1.fetch_add(1, Relaxed);
            log::error(
                "reload_refused",
                format_args!(
                    "reload of {} refused, the old rules stay:\n{e}",
                    path.display()
                ),
                &[("path", &path.display())],
            );
        }
    }
}

fn run(args: Args) -> Result<()> {
    if args.version {
        print_version();
        return Ok(());
    }
    log::init(args.log_level, args.log_format);
    let features = ring::probe(disabled_features().as_deref()).map_err(|e| anyhow::anyhow!(e))?;
    let (cfg, nofile) = resolve(&args, features)?;
    let mut inherited = match &args.takeover {
        Some(path) => takeover::take_over(path)?,
        None => None,
    };
    if args.batch_wait_us > 0 && !features.min_wait {
        log::warn(
            "batch_wait_unsupported",
            format_args!(
                "--batch-wait-us {} needs io_uring min-wait (Linux 6.12+), which this \
                 kernel lacks: workers wake at the first completion",
                args.batch_wait_us
            ),
            &[],
        );
    }
    if !(features.defer_taskrun && features.multishot_timeout && features.udp_gso) {
        log::warn(
            "kernel_fallback",
            format_args!("io_uring features: {}", features.describe()),
            &[],
        );
    }
    check_privileges(cfg.mark)?;
    match &inherited {
        Some(inh) if inh.port != cfg.port => bail!(
            "the engine serving --takeover (pid {}) listens on port {}, this one is \
             configured for --port {}; start it with the same port",
            inh.pid,
            inh.port,
            cfg.port
        ),
        Some(_) => {} // its sockets are ours now: the port is in use by design
        None => check_port_free(&cfg)?,
    }
    check_pipe_size(&cfg)?;
    // Bound before the workers start: a taken address is a startup error.
    let metrics_server = match cfg.metrics {
        Some(addr) => Some(metrics::Server::bind(addr).map_err(|e| anyhow::anyhow!(e))?),
        None => None,
    };

    let mut signals =
        signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGUSR1, SIGUSR2, SIGHUP])
            .context("installing signal handlers")?;
    let fds_at_start = sys::open_fd_count();
    let sockets = inherited
        .as_mut()
        .map(|inh| std::mem::take(&mut inh.sockets))
        .unwrap_or_default();
    let rules = match &args.config {
        Some(path) => Some(RulesHandle::new(
            load_rules(path).map_err(|e| anyhow::anyhow!("--config:\n{e}"))?,
        )),
        None => None,
    };
    let factory = rules
        .as_ref()
        .map_or_else(policy::relay_all, |h| h.factory());
    let engine = Engine::start_with(cfg, factory, sockets)?;
    if let Some(server) = metrics_server {
        if let Err(e) = start_metrics(server, &engine) {
            engine.stop();
            return Err(e);
        }
    }
    let cfg = engine.config();

    let protos = match (cfg.tcp, cfg.udp) {
        (true, true) => "tcp+udp",
        (true, false) => "tcp",
        _ => "udp",
    };
    println!(
        "ready: port {} {protos} {} cores {} relay {} buf {} mark {:#x} max_conns {} \
         max_pipes {} udp_max_flows {} nofile {nofile} ring {}",
        cfg.port,
        if cfg.ipv6 { "ipv4+ipv6" } else { "ipv4" },
        cpus::format(&cfg.cores),
        cfg.relay,
        match cfg.relay {
            RelayMode::Splice => cfg.pipe_size.map_or("kernel".into(), |n| n.to_string()),
            RelayMode::Copy => cfg.copy_buf_size.to_string(),
        },
        cfg.mark,
        cfg.max_conns,
        match cfg.relay {
            RelayMode::Splice => cfg.max_pipes_per_core * cfg.cores.len(),
            RelayMode::Copy => 0,
        },
        cfg.udp_max_flows_per_core * cfg.cores.len(),
        engine.ring_flags(),
    );

    if let Some(inh) = inherited {
        let pid = inh.pid;
        match inh.release() {
            Ok(()) => log::info(
                "takeover",
                format_args!("took the sockets over from pid {pid}; it drains"),
                &[("from_pid", &pid)],
            ),
            Err(e) => log::warn(
                "takeover_release",
                format_args!("{e} (pid {pid} may still be accepting)"),
                &[("from_pid", &pid)],
            ),
        }
    }
    let (takeover_tx, takeover_rx) = std::sync::mpsc::channel();
    if let Some(path) = &args.takeover {
        takeover::serve(path, engine.handover(), cfg.port, takeover_tx)
            .with_context(|| format!("serving --takeover {}", path.display()))?;
    }

    let notifier = Notifier::from_env().context("NOTIFY_SOCKET")?;
    let _ = notifier.send(&format!(
        "READY=1\nMAINPID={}\nSTATUS={}",
        std::process::id(),
        status_line(&engine)
    ));
    if let Some(interval) = notify::watchdog_interval() {
        let n = Notifier::from_env().context("NOTIFY_SOCKET")?;
        notify::spawn_watchdog(n, interval, engine.liveness(WATCHDOG_STALL))
            .context("starting the watchdog thread")?;
    }

    let mut stopping = false;
    let mut successor: Option<std::process::Child> = None;
    let mut last_status = std::time::Instant::now();
    loop {
        while let Ok(ev) = takeover_rx.try_recv() {
            match ev {
                takeover::Event::HandedOver { pid } if !stopping => {
                    stopping = true;
                    begin_stop(
                        &engine,
                        &notifier,
                        &format!("handed the sockets over to pid {pid}"),
                    );
                }
                takeover::Event::HandedOver { .. } => {}
                takeover::Event::Failed(e) => log::warn(
                    "takeover_failed",
                    format_args!("a takeover failed ({e}); still serving"),
                    &[],
                ),
            }
        }
        for sig in signals.pending() {
            match sig {
                SIGUSR1 => {
                    print_counters(&engine.counters());
                    print_rules(&engine.counters_reader());
                }
                SIGHUP => {
                    engine.reopen_logs();
                    match (&args.config, &rules) {
                        (Some(path), Some(handle)) => reload(path, handle),
                        _ => log::info(
                            "sighup",
                            format_args!(
                                "SIGHUP: flow log reopened; no rules file to reload \
                                 (--config); still running"
                            ),
                            &[],
                        ),
                    }
                }
                SIGUSR2 if stopping => log::warn(
                    "sigusr2",
                    format_args!("SIGUSR2 while stopping: ignored"),
                    &[],
                ),
                SIGUSR2 => match restart_in_place(&args) {
                    Ok(child) => {
                        log::info(
                            "restart_in_place",
                            format_args!("SIGUSR2: started pid {} to take over", child.id()),
                            &[("pid", &child.id())],
                        );
                        successor = Some(child);
                    }
                    Err(e) => log::error(
                        "restart_in_place",
                        format_args!("SIGUSR2: cannot restart in place: {e:#}"),
                        &[],
                    ),
                },
                _ if !stopping => {
                    stopping = true;
                    begin_stop(&engine, &notifier, "stopping: no new connections");
                }
                _ => {
                    log::warn("exit_now", format_args!("second signal: exiting now"), &[]);
                    print_counters(&engine.counters());
                    std::process::exit(1);
                }
            }
        }
        if let Some(child) = successor.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                if !stopping {
                    log::warn(
                        "takeover_failed",
                        format_args!(
                            "the successor (pid {}) exited ({status}) before taking over; \
                             still serving",
                            child.id()
                        ),
                        &[("pid", &child.id())],
                    );
                }
                successor = None;
            }
        }
        if engine.is_finished() {
            break;
        }
        if !stopping && engine.any_finished() {
            log::error(
                "worker_exited",
                format_args!("a worker exited unexpectedly; stopping the others"),
                &[],
            );
            stopping = true;
            engine.stop();
        }
        if !stopping && last_status.elapsed() >= Duration::from_secs(10) {
            last_status = std::time::Instant::now();
            let _ = notifier.send(&format!("STATUS={}", status_line(&engine)));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (ran_s, cores, relay) = (
        engine.uptime().as_secs_f64(),
        cpus::format(&engine.config().cores),
        engine.config().relay,
    );
    let reader = engine.counters_reader();
    let result = engine.join();
    let rows = match &result {
        Ok(rows) | Err(rows) => rows,
    };
    println!(
        "summary: ran {ran_s:.1} s on cores {cores} ({relay} relay); fds at start \
         {fds_at_start}, at exit {}",
        sys::open_fd_count(),
    );
    print_counters(rows);
    print_rules(&reader);
    if result.is_err() || !stopping {
        bail!("a worker failed; see the messages above");
    }
    Ok(())
}
