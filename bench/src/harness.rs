//! The benchmark matrix: for each target, arm the router, run every scenario variant,
//! disarm; baseline and proxies back to back on the same namespaces (style lesson 12).

use std::time::Duration;

use anyhow::Context;

use crate::cpu::{self, CpuProbe};
use crate::lab::Lab;
use crate::load::{self, Family, IdleConns, LoadSpec, Outcome, Scenario, Variant};
use crate::report::{Env, Record, Report, Status};
use crate::targets::{ArmError, ArmOptions, Armed, Target, Tools, DEFAULT_PORT};

/// What to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Scenarios, in order.
    pub scenarios: Vec<Scenario>,
    /// Targets, in order (put `direct` first: it needs a router without rules).
    pub targets: Vec<Target>,
    /// Measurement window per variant.
    pub duration: Duration,
    /// Overrides every scenario's default connection count.
    pub conns: Option<usize>,
    /// Overrides every scenario's default size.
    pub size: Option<usize>,
    /// Idle connections for `tcp-crr`'s idle variant (`--idle-conns`, or
    /// [`load::DEFAULT_IDLE_CONNS`] with `--scenario tcp-crr-idle`); `None`: no
    /// such variant.
    pub idle_conns: Option<usize>,
    /// `tcp-crr` runs only its idle variant (`tcp-crr-idle` was named, `tcp-crr`
    /// was not).
    pub idle_only: bool,
    /// Engine (and HAProxy thread) cores.
    pub engine_cores: Vec<usize>,
    /// Client load cores.
    pub load_cores: Vec<usize>,
    /// Server cores.
    pub server_cores: Vec<usize>,
    /// Address family of the load.
    pub family: Family,
    /// Transparent port.
    pub port: u16,
    /// How many times the whole target sequence is repeated. Targets alternate
    /// within each round, so slow drift of a noisy machine hits all of them alike;
    /// tables show the median round.
    pub rounds: usize,
    /// Receive processing of the client's and server's interfaces runs on their
    /// cores (RPS, [`Lab::steer_receive`]), not on the proxy's.
    pub steer_receive: bool,
}

impl Config {
    /// Everything, with the default pinning, for `duration` per variant.
    pub fn all(duration: Duration) -> Config {
        let (engine_cores, load_cores) = default_cores();
        Config {
            scenarios: Scenario::ALL.to_vec(),
            targets: Target::ALL.to_vec(),
            duration,
            conns: None,
            size: None,
            idle_conns: None,
            idle_only: false,
            server_cores: load_cores.clone(),
            engine_cores,
            load_cores,
            family: Family::Ipv4,
            port: DEFAULT_PORT,
            rounds: 1,
            steer_receive: true,
        }
    }
}

impl Config {
    /// Each scenario with its variants, in order: the defaults (or `conns` and
    /// `size`), and for `tcp-crr` the idle variant after its plain twin (or alone,
    /// with `idle_only`).
    pub fn plan(&self) -> Vec<(Scenario, Vec<Variant>)> {
        self.scenarios
            .iter()
            .map(|s| {
                let mut vs = s.variants(self.conns, self.size);
                if *s == Scenario::TcpCrr {
                    if let Some(n) = self.idle_conns.filter(|n| *n > 0) {
                        let idle: Vec<Variant> = vs.iter().map(|v| v.with_idle(n)).collect();
                        if self.idle_only {
                            vs = idle;
                        } else {
                            vs.extend(idle);
                        }
                    }
                }
                (*s, vs)
            })
            .collect()
    }
}

/// What `--scenario` and `--idle-conns` select.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    /// The scenarios, in the order first named, each once.
    pub scenarios: Vec<Scenario>,
    /// [`Config::idle_conns`].
    pub idle_conns: Option<usize>,
    /// [`Config::idle_only`].
    pub idle_only: bool,
}

/// The `--scenario` name of `tcp-crr`'s idle variant alone.
pub const TCP_CRR_IDLE: &str = "tcp-crr-idle";

/// Parses `--scenario` (names, comma-separated, or `all`) with `--idle-conns`.
/// `tcp-capacity` runs only when named: `all` is [`Scenario::ALL`].
/// `tcp-crr-idle` is `tcp-crr`'s idle variant: alone it runs without the plain one,
/// next to `tcp-crr` (or `all`) both run; its N is `idle_conns` or
/// [`load::DEFAULT_IDLE_CONNS`]. `--idle-conns N` with `tcp-crr` adds the idle
/// variant; it needs `tcp-crr` or `tcp-crr-idle` among the scenarios, and at most
/// [`load::max_idle_conns`] for this process's `fd_limit`.
pub fn parse_scenarios(
    s: &str,
    idle_conns: Option<usize>,
    fd_limit: u64,
) -> anyhow::Result<Selection> {
    let mut scenarios = Vec::new();
    let (mut plain_crr, mut idle_named) = (false, false);
    let names: Vec<&str> = s.split(',').map(str::trim).collect();
    for name in names {
        let picked: Vec<Scenario> = if name == "all" {
            plain_crr = true;
            Scenario::ALL.to_vec()
        } else if name == TCP_CRR_IDLE {
            idle_named = true;
            vec![Scenario::TcpCrr]
        } else {
            let sc = Scenario::parse(name).ok_or_else(|| {
                anyhow::anyhow!(
                    "unknown scenario {name:?} (tcp-bulk, tcp-crr, tcp-crr-idle, tcp-rr, \
                     udp-pps, udp-rr, tcp-capacity, all)"
                )
            })?;
            plain_crr |= sc == Scenario::TcpCrr;
            vec![sc]
        };
        for sc in picked {
            if !scenarios.contains(&sc) {
                scenarios.push(sc);
            }
        }
    }
    anyhow::ensure!(
        idle_conns.is_none() || plain_crr || idle_named,
        "--idle-conns applies to tcp-crr, which is not among the scenarios"
    );
    anyhow::ensure!(
        idle_conns != Some(0),
        "--idle-conns 0: leave it out to run tcp-crr without idle connections"
    );
    let idle = match (idle_conns, idle_named) {
        (Some(n), _) => Some(n),
        (None, true) => Some(load::DEFAULT_IDLE_CONNS),
        (None, false) => None,
    };
    if let Some(n) = idle {
        let max = load::max_idle_conns(fd_limit);
        anyhow::ensure!(
            n <= max,
            "{n} idle connections: bench holds both ends of each (2 fds), and with \
             RLIMIT_NOFILE {fd_limit} it has room for {max}"
        );
    }
    Ok(Selection {
        scenarios,
        idle_conns: idle,
        idle_only: idle_named && !plain_crr,
    })
}

/// Default pinning: the engine on the last core, load and servers on all the others
/// (on a 2-core machine: engine core 1, clients and servers core 0). With a single
/// core everything shares it.
pub fn default_cores() -> (Vec<usize>, Vec<usize>) {
    let n = core_affinity::get_core_ids().map_or(1, |v| v.len()).max(1);
    if n == 1 {
        return (vec![0], vec![0]);
    }
    (vec![n - 1], (0..n - 1).collect())
}

/// The engine's and the load's cores from `--engine-cores` / `--load-cores`: each
/// as given, else the engine on the last core and the load on all but the engine's
/// (all of them when that leaves none), as [`default_cores`] pins them.
pub fn engine_and_load_cores(
    engine: Option<&str>,
    load: Option<&str>,
) -> anyhow::Result<(Vec<usize>, Vec<usize>)> {
    let (default_engine, default_load) = default_cores();
    let engine_cores = match engine {
        Some(s) => parse_cores(s).context("--engine-cores")?,
        None => default_engine,
    };
    let load_cores = match load {
        Some(s) => parse_cores(s).context("--load-cores")?,
        None if engine.is_some() => {
            let n = core_affinity::get_core_ids().map_or(1, |v| v.len());
            let rest: Vec<usize> = (0..n).filter(|c| !engine_cores.contains(c)).collect();
            if rest.is_empty() {
                engine_cores.clone()
            } else {
                rest
            }
        }
        None => default_load,
    };
    Ok((engine_cores, load_cores))
}

/// Parses `1`, `0-3`, `1,3,5-6`.
pub fn parse_cores(s: &str) -> anyhow::Result<Vec<usize>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.trim().parse()?, b.trim().parse()?);
                anyhow::ensure!(a <= b, "bad core range {part}");
                out.extend(a..=b);
            }
            None => out.push(part.parse()?),
        }
    }
    anyhow::ensure!(!out.is_empty(), "empty core list {s:?}");
    Ok(out)
}

/// Parses `--target`: names, comma-separated, or `all`. The `base-*` targets need a
/// baseline engine (`with_baseline`); `all` includes them only then, each right
/// after its current-engine twin.
pub fn parse_targets(s: &str, with_baseline: bool) -> anyhow::Result<Vec<Target>> {
    parse_targets_with(s, with_baseline, &[])
}

/// [`parse_targets`] where `all` also includes `variants` (engine-splice's variants
/// picked by `--policy` and `--source-variant`), right after engine-splice (and its
/// baseline twin), so that they run back to back with it. Named, the variants need
/// no flag.
pub fn parse_targets_with(
    s: &str,
    with_baseline: bool,
    variants: &[Target],
) -> anyhow::Result<Vec<Target>> {
    if s.trim() == "all" {
        let mut all = if with_baseline {
            Target::ALL_WITH_BASELINE.to_vec()
        } else {
            Target::ALL.to_vec()
        };
        let after = all
            .iter()
            .rposition(|t| t.current() == Target::EngineSplice)
            .map_or(all.len(), |i| i + 1);
        let vs: Vec<Target> = Target::SPLICE_VARIANTS
            .into_iter()
            .filter(|t| variants.contains(t))
            .collect();
        all.splice(after..after, vs);
        return Ok(all);
    }
    let mut out = Vec::new();
    for name in s.split(',').map(str::trim) {
        let t = Target::parse(name).ok_or_else(|| anyhow::anyhow!("unknown target {name:?}"))?;
        anyhow::ensure!(
            with_baseline || !t.is_baseline(),
            "target {name} needs --baseline-engine PATH (an engine built from the older commit)"
        );
        out.push(t);
    }
    Ok(out)
}

/// Parses `2`, `2s`, `0.3s`, `500ms`, `10m`.
pub fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let s = s.trim();
    let (num, scale) = if let Some(ms) = s.strip_suffix("ms") {
        (ms, 1e-3)
    } else if let Some(min) = s.strip_suffix('m') {
        (min, 60.0)
    } else if let Some(sec) = s.strip_suffix('s') {
        (sec, 1.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("bad duration {s:?}: use 2s, 0.5s, 500ms or 10m"))?;
    anyhow::ensure!(
        v > 0.0 && v * scale <= 3600.0,
        "duration {s:?} out of range"
    );
    Ok(Duration::from_secs_f64(v * scale))
}

/// Runs the matrix on `lab` and returns the report. `log` gets one progress line per
/// step. Stops early (marking the report interrupted) on Ctrl-C / SIGTERM.
pub fn run_matrix(lab: &Lab, cfg: &Config, tools: &Tools, log: &mut dyn FnMut(&str)) -> Report {
    let mut rep = Report {
        env: Env::probe(),
        ..Report::default()
    };
    rep.env.engine_cores = cfg.engine_cores.clone();
    rep.env.load_cores = cfg.load_cores.clone();
    rep.env.server_cores = cfg.server_cores.clone();
    rep.env.family = cfg.family.name().into();
    rep.env.duration_s = cfg.duration.as_secs_f64();
    let rounds = cfg.rounds.max(1);
    rep.env.rounds = rounds;
    rep.env.engine = tools.engine.as_ref().ok().map(|p| p.display().to_string());
    rep.env.engine_build = tools.engine_build().into();
    rep.env.setup = tools.setup.as_ref().ok().map(|p| p.display().to_string());
    rep.env.haproxy = tools.haproxy_version.clone();
    rep.env.baseline_engine = tools
        .baseline_engine
        .as_ref()
        .and_then(|f| f.as_ref().ok())
        .map(|p| p.display().to_string());
    rep.env.baseline_engine_build = tools.baseline_engine_build().map(str::to_string);
    rep.env.user_hz = cpu::user_hz();
    let runs = |pick: fn(Target) -> bool| cfg.targets.iter().any(|t| pick(*t));
    let runs_engine = runs(|t| t.is_engine() && !t.is_baseline());
    if runs_engine && tools.engine.is_ok() && tools.engine_build() == "debug" {
        let w = "engine is a DEBUG build: its figures mean nothing; use `cargo build --release`"
            .to_string();
        log(&format!("warning: {w}"));
        rep.notes.push(w);
    }
    if runs(Target::is_baseline) && tools.baseline_engine_build() == Some("debug") {
        let w = "baseline engine is a DEBUG build: its figures mean nothing; build it with \
                 `cargo build --release`"
            .to_string();
        log(&format!("warning: {w}"));
        rep.notes.push(w);
    }
    if cfg
        .engine_cores
        .iter()
        .any(|c| cfg.load_cores.contains(c) || cfg.server_cores.contains(c))
    {
        rep.notes.push(format!(
            "engine cores {:?} overlap load cores {:?} / server cores {:?}: the CPU figures \
             of the proxy cores include load and server threads",
            cfg.engine_cores, cfg.load_cores, cfg.server_cores
        ));
    }
    if cfg.steer_receive {
        let mut cores = cfg.load_cores.clone();
        cores.extend(&cfg.server_cores);
        cores.sort_unstable();
        cores.dedup();
        match lab.steer_receive(&cores) {
            Ok(()) => rep.env.receive_steering = Some(cores),
            Err(e) => {
                let w = format!(
                    "receive steering (RPS) failed, so the proxy cores also run the client's \
                     and server's receive path: {e:#}"
                );
                log(&format!("warning: {w}"));
                rep.notes.push(w);
            }
        }
    }
    let arm_opts = ArmOptions {
        engine_cores: cfg.engine_cores.clone(),
        port: cfg.port,
        engine_args: Vec::new(),
    };
    let plan = cfg.plan();

    for round in 0..rounds {
        let first = rep.records.len();
        if rounds > 1 {
            log(&format!("round {} of {rounds}", round + 1));
        }
        run_round(lab, cfg, tools, &arm_opts, &plan, &mut rep, log);
        for r in &mut rep.records[first..] {
            r.round = round;
        }
        if rep.interrupted {
            break;
        }
    }
    if crate::stop_requested() {
        rep.interrupted = true;
    }
    rep
}

/// One pass over every target.
fn run_round(
    lab: &Lab,
    cfg: &Config,
    tools: &Tools,
    arm_opts: &ArmOptions,
    plan: &[(Scenario, Vec<Variant>)],
    rep: &mut Report,
    log: &mut dyn FnMut(&str),
) {
    let family = cfg.family.name();
    for (ti, &target) in cfg.targets.iter().enumerate() {
        if crate::stop_requested() {
            rep.interrupted = true;
            break;
        }
        log(&format!("[{}] arming", target.name()));
        let mut armed = match Armed::arm(lab, target, tools, arm_opts) {
            Ok(a) => a,
            Err(e) => {
                let status = match e {
                    ArmError::Skipped(_) => Status::Skipped,
                    ArmError::Failed(_) => Status::Failed,
                };
                log(&format!("[{}] {:?}: {e}", target.name(), status));
                for (s, vs) in plan {
                    for v in vs {
                        rep.records.push(Record::not_run(
                            *s,
                            v,
                            target,
                            family,
                            status,
                            e.to_string(),
                        ));
                    }
                }
                continue;
            }
        };
        if target.is_engine() {
            // The current engine's keys stay `splice` / `copy`; the baseline's are
            // its target names.
            let key = if target.is_baseline() || target.is_splice_variant() {
                target.name()
            } else {
                target.relay()
            };
            rep.env
                .engine_startup
                .insert(key.to_string(), armed.startup.clone());
        }
        let spec = LoadSpec {
            duration: cfg.duration,
            family: cfg.family,
            load_cores: cfg.load_cores.clone(),
            server_cores: cfg.server_cores.clone(),
            probe: Some(lab.router.clone()),
            crr_ports: load::crr_port_range(ti),
            cpu: CpuProbe {
                cores: cfg.engine_cores.clone(),
                pid: armed.pid(),
            },
            proxy_limit: armed.conn_limit(),
            preamble: (target == Target::EngineSni).then(crate::policy::bench_client_hello),
        };
        if let Some(w) = limit_warning(target, armed.conn_limit(), plan) {
            log(&format!("[{}] warning: {w}", target.name()));
            rep.notes.push(format!("{}: {w}", target.name()));
        }
        for (scenario, variants) in plan {
            for v in variants {
                if crate::stop_requested() {
                    rep.interrupted = true;
                    break;
                }
                if let Some(why) = target.skips(*scenario, v.idle > 0) {
                    rep.records.push(Record::not_run(
                        *scenario,
                        v,
                        target,
                        family,
                        Status::Skipped,
                        why.into(),
                    ));
                    continue;
                }
                if target == Target::Haproxy && scenario.is_udp() {
                    rep.records.push(Record::not_run(
                        *scenario,
                        v,
                        target,
                        family,
                        Status::Skipped,
                        "HAProxy does not relay UDP".into(),
                    ));
                    continue;
                }
                if let Err(why) = armed.check_alive() {
                    log(&format!("[{}] {why}", target.name()));
                    rep.records.push(Record::not_run(
                        *scenario,
                        v,
                        target,
                        family,
                        Status::Failed,
                        why,
                    ));
                    continue;
                }
                let measured = if *scenario == Scenario::TcpCapacity {
                    crate::capacity::run(lab, v, &spec, &armed, log)
                        .map(|c| crate::capacity::to_record(v, target, cfg.family, c))
                } else {
                    load::run(lab, *scenario, v, &spec)
                        .map(|out| to_record(*scenario, v, target, cfg.family, &out))
                };
                let rec = match measured {
                    Ok(mut r) => {
                        // A proxy that died mid-run explains whatever errors it caused.
                        if let Err(why) = armed.check_alive() {
                            r.status = Status::Failed;
                            r.reason = Some(why);
                        }
                        r
                    }
                    Err(e) => Record::not_run(
                        *scenario,
                        v,
                        target,
                        family,
                        Status::Failed,
                        format!("{e:#}"),
                    ),
                };
                log(&format!("[{}] {}", target.name(), summary(&rec)));
                rep.records.push(rec);
            }
        }
        log(&format!("[{}] disarming", target.name()));
        let (notes, summary) = armed.disarm();
        for n in notes {
            log(&format!("[{}] {n}", target.name()));
            rep.notes.push(format!("{}: {n}", target.name()));
        }
        if !summary.is_empty() {
            rep.proxy_summaries
                .insert(target.name().to_string(), summary);
        }
    }
}

/// A warning when a variant asks for more idle connections (plus its churning
/// clients) than the proxy says it holds.
fn limit_warning(
    target: Target,
    limit: Option<usize>,
    plan: &[(Scenario, Vec<Variant>)],
) -> Option<String> {
    let limit = limit?;
    let v = plan
        .iter()
        .flat_map(|(_, vs)| vs)
        .filter(|v| v.idle > 0)
        .max_by_key(|v| v.idle + v.conns)?;
    (v.idle + v.conns > limit).then(|| {
        format!(
            "{} holds at most {limit} connections, fewer than the {} idle + {} clients of \
             tcp-crr {}: expect refusals",
            target.name(),
            v.idle,
            v.conns,
            v.label
        )
    })
}

/// Turns a load outcome into a record, judging it: a proxy target whose flows never
/// touched the router's sockets was not measured at all (nft `tproxy` fails open
/// when nothing listens), and the kernel baseline must not be intercepted.
pub fn to_record(
    scenario: Scenario,
    v: &Variant,
    target: Target,
    family: Family,
    out: &Outcome,
) -> Record {
    let secs = out.elapsed.as_secs_f64().max(1e-9);
    let mut r = Record::not_run(
        scenario,
        v,
        target,
        family.name(),
        Status::Ok,
        String::new(),
    );
    r.reason = None;
    r.duration_s = secs;
    r.bytes = out.bytes;
    r.ops = out.ops;
    r.errors = out.error_count();
    r.error_kinds = out.errors.clone();
    r.server_saw = out.peers.iter().map(|p| p.to_string()).collect();
    r.cpu = out.cpu.clone().map(|c| {
        c.with_work(scenario, out.bytes, out.ops)
            .judge(target.is_proxy())
    });
    let rate = out.ops as f64 / secs;
    match scenario {
        Scenario::TcpBulk => r.gbit_s = Some(out.bytes as f64 * 8.0 / secs / 1e9),
        Scenario::TcpCrr => r.conn_s = Some(rate),
        Scenario::TcpRr | Scenario::UdpRr => r.req_s = Some(rate),
        // Its records come from `crate::capacity::to_record`.
        Scenario::TcpCapacity => {}
        Scenario::UdpPps => {
            r.pps = Some(rate);
            r.gbit_s = Some(out.bytes as f64 * 8.0 / secs / 1e9);
            r.sent = Some(out.sent);
            r.loss = Some(if out.sent > 0 {
                (1.0 - out.ops as f64 / out.sent as f64).max(0.0)
            } else {
                0.0
            });
        }
    }
    if let Some(h) = out.latency.as_ref().filter(|h| !h.is_empty()) {
        let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        r.p50_us = Some(us(0.50));
        r.p99_us = Some(us(0.99));
        r.p999_us = Some(us(0.999));
    }
    let client = family.client_ip().to_string();
    let saw_other = r.server_saw.iter().any(|p| p != &client);
    r.intercepted = match (out.probe_sockets, scenario.is_udp()) {
        (Some(n), false) => Some(n > 0),
        // A UDP relay may reply through sockets /proc does not tie to the port (or
        // keep none between datagrams): only a positive sign counts.
        (Some(n), true) if n > 0 || saw_other => Some(true),
        _ if saw_other => Some(true),
        (Some(_), true) if target == Target::Direct => Some(false),
        _ => None,
    };
    if target.is_proxy() && r.intercepted == Some(false) {
        r.status = Status::Failed;
        r.reason = Some(format!(
            "not intercepted: no socket on port {} in the router during the run, so the traffic was \
             forwarded by the kernel (nft tproxy fails open when nothing listens)",
            scenario.port()
        ));
    } else if target == Target::Direct && r.intercepted == Some(true) {
        r.status = Status::Failed;
        r.reason =
            Some("kernel baseline was intercepted: the router still has rules or a proxy".into());
    } else if out.ops == 0 && out.bytes == 0 {
        r.status = Status::Failed;
        r.reason = Some(format!("nothing got through; errors: {:?}", out.errors));
    }
    r.idle = out.idle.clone();
    if let Some(why) = idle_verdict(v, target, out.idle.as_ref()) {
        // First: it explains the churn's errors when a proxy at its limit refused.
        r.reason = Some(match r.reason.take() {
            Some(prev) if r.status == Status::Failed => format!("{why}. Also: {prev}"),
            _ => why,
        });
        r.status = Status::Failed;
    }
    r
}

/// Why a variant's idle connections make its record a failure: not all of them held
/// through the window (a proxy at its limit, one that drops idle connections), or
/// they went another way than the target's (not intercepted by a proxy, intercepted
/// without one).
fn idle_verdict(v: &Variant, target: Target, idle: Option<&IdleConns>) -> Option<String> {
    if v.idle == 0 {
        return None;
    }
    let Some(i) = idle else {
        return Some("the idle connections were not opened".into());
    };
    if let Some(why) = i.shortfall(v.idle, v.conns) {
        return Some(why);
    }
    match i.router_sockets {
        Some(0) if target.is_proxy() => Some(format!(
            "idle connections not intercepted: no socket on port {} in the router",
            load::PORT_TCP_IDLE
        )),
        Some(n) if n > 0 && !target.is_proxy() => Some(format!(
            "idle connections intercepted: {n} sockets on port {} in the router of the kernel \
             baseline",
            load::PORT_TCP_IDLE
        )),
        _ => None,
    }
}

/// One progress line.
fn summary(r: &Record) -> String {
    let head = match (r.status, r.headline()) {
        (Status::Ok, Some(v)) => {
            format!("{} {}", crate::report::fmt_num(v), r.scenario.headline().1)
        }
        _ => format!("{:?}: {}", r.status, r.reason.as_deref().unwrap_or("")),
    };
    let mut s = format!("{} {}: {head}", r.scenario.name(), r.variant);
    if let (Some(p50), Some(p99)) = (r.p50_us, r.p99_us) {
        s.push_str(&format!(", p50 {p50:.0} µs p99 {p99:.0} µs"));
    }
    if let Some(l) = r.loss {
        s.push_str(&format!(", loss {:.2}%", l * 100.0));
    }
    if let Some(c) = r.cpu.as_ref().filter(|_| r.status == Status::Ok) {
        s.push_str(&format!(
            ", cores {:?} {:.0}% busy",
            c.cores,
            c.util * 100.0
        ));
        if let Some(p) = c.proxy_share() {
            s.push_str(&format!(" ({:.0}% in the proxy)", p * 100.0));
        }
        if let Some(u) = c.per_unit {
            s.push_str(&format!(" = {} {}", crate::report::fmt_num(u), c.unit));
        }
    }
    if r.errors > 0 {
        s.push_str(&format!(", errors {:?}", r.error_kinds));
    }
    if let Some(i) = &r.idle {
        s.push_str(&format!(
            "; idle {}/{} held (opened in {:.1} s, closed in {:.1} s)",
            i.held, r.idle_conns, i.open_s, i.close_s
        ));
    }
    if let Some(c) = &r.capacity {
        s.push_str(&format!("; {}", c.summary()));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        assert_eq!(parse_cores("1").unwrap(), vec![1]);
        assert_eq!(parse_cores("0-2,5").unwrap(), vec![0, 1, 2, 5]);
        assert!(parse_cores("").is_err());
        assert_eq!(parse_duration("0.3s").unwrap(), Duration::from_millis(300));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert!(parse_duration("x").is_err());
    }

    #[test]
    fn splice_variants_join_all_only_when_asked() {
        use Target::*;
        assert_eq!(
            parse_targets_with("all", false, &[]).unwrap(),
            Target::ALL.to_vec()
        );
        assert_eq!(
            parse_targets_with("all", false, &[EngineClientIp, EngineRules10k, EngineSni]).unwrap(),
            vec![
                Direct,
                EngineSplice,
                EngineRules10k,
                EngineSni,
                EngineClientIp,
                EngineCopy,
                Haproxy
            ]
        );
        assert_eq!(
            parse_targets_with("all", true, &Target::SOURCE_VARIANT).unwrap(),
            vec![
                Direct,
                EngineSplice,
                BaseSplice,
                EngineClientIp,
                EngineCopy,
                BaseCopy,
                Haproxy
            ]
        );
        // Named, they need no flag.
        assert_eq!(
            parse_targets(
                "engine-splice,engine-rules10k,engine-sni,engine-clientip",
                false
            )
            .unwrap(),
            vec![EngineSplice, EngineRules10k, EngineSni, EngineClientIp]
        );
        for t in Target::SPLICE_VARIANTS {
            assert_eq!(t.relay(), "splice");
            assert!(t.is_engine() && !t.is_baseline() && t.is_splice_variant());
            assert_eq!(Target::parse(t.name()), Some(t));
        }
        // engine-sni runs only the loads that send a ClientHello.
        assert!(EngineSni.skips(Scenario::TcpCrr, false).is_none());
        assert!(EngineSni.skips(Scenario::TcpRr, false).is_none());
        assert!(EngineSni.skips(Scenario::TcpCrr, true).is_some());
        assert!(EngineSni.skips(Scenario::TcpBulk, false).is_some());
        assert!(EngineSni.skips(Scenario::UdpRr, false).is_some());
        assert!(EngineRules10k.skips(Scenario::UdpPps, false).is_none());
        assert!(EngineClientIp.skips(Scenario::TcpBulk, false).is_none());
    }

    #[test]
    fn base_targets_only_with_a_baseline_engine() {
        assert_eq!(parse_targets("all", false).unwrap(), Target::ALL.to_vec());
        assert_eq!(
            parse_targets("all", true).unwrap(),
            vec![
                Target::Direct,
                Target::EngineSplice,
                Target::BaseSplice,
                Target::EngineCopy,
                Target::BaseCopy,
                Target::Haproxy,
            ]
        );
        assert_eq!(
            parse_targets("direct, base-copy", true).unwrap(),
            vec![Target::Direct, Target::BaseCopy]
        );
        let e = parse_targets("engine-splice,base-splice", false).unwrap_err();
        assert!(e.to_string().contains("--baseline-engine"), "{e}");
        assert!(parse_targets("engine", true).is_err());
    }

    #[test]
    fn idle_variant_selection() {
        let sel = |s: &str, n: Option<usize>| parse_scenarios(s, n, 20000);
        // Existing names keep their meaning: no idle variant.
        let all = sel("all", None).unwrap();
        assert_eq!(all.scenarios, Scenario::ALL.to_vec());
        assert_eq!((all.idle_conns, all.idle_only), (None, false));
        assert_eq!(
            sel("tcp-crr,tcp-rr", None).unwrap().scenarios,
            vec![Scenario::TcpCrr, Scenario::TcpRr]
        );
        // --idle-conns N next to tcp-crr (or all): both variants.
        let both = sel("tcp-crr", Some(1500)).unwrap();
        assert_eq!(both.scenarios, vec![Scenario::TcpCrr]);
        assert_eq!((both.idle_conns, both.idle_only), (Some(1500), false));
        assert_eq!(sel("all", Some(10)).unwrap().idle_conns, Some(10));
        // tcp-crr-idle alone: only the idle variant, default N unless given.
        let only = sel("tcp-crr-idle", None).unwrap();
        assert_eq!(only.scenarios, vec![Scenario::TcpCrr]);
        assert_eq!(
            (only.idle_conns, only.idle_only),
            (Some(load::DEFAULT_IDLE_CONNS), true)
        );
        assert_eq!(
            sel("tcp-crr-idle", Some(300)).unwrap().idle_conns,
            Some(300)
        );
        // Both names: both variants, tcp-crr once.
        let named = sel("tcp-crr-idle, tcp-crr", None).unwrap();
        assert_eq!(named.scenarios, vec![Scenario::TcpCrr]);
        assert!(!named.idle_only);
        assert_eq!(
            sel("tcp-rr,tcp-crr-idle,udp-rr", None).unwrap().scenarios,
            vec![Scenario::TcpRr, Scenario::TcpCrr, Scenario::UdpRr]
        );
        // Refused: idle connections without tcp-crr, zero, past the fd budget.
        let e = sel("tcp-rr", Some(100)).unwrap_err();
        assert!(e.to_string().contains("tcp-crr"), "{e}");
        assert!(sel("tcp-crr", Some(0)).is_err());
        let e = sel("tcp-crr", Some(9500)).unwrap_err();
        assert!(e.to_string().contains("room for 9488"), "{e}");
        assert!(sel("tcp-crr-idle", None).is_ok());
        let e = parse_scenarios("tcp-crr-idle", None, 4000).unwrap_err();
        assert!(e.to_string().contains("RLIMIT_NOFILE 4000"), "{e}");
        assert!(sel("tcp-crr-idel", None).is_err());
    }

    #[test]
    fn tcp_capacity_runs_only_when_named() {
        let sel = |s: &str| parse_scenarios(s, None, 20000);
        assert!(!sel("all")
            .unwrap()
            .scenarios
            .contains(&Scenario::TcpCapacity));
        assert!(!Config::all(Duration::from_secs(1))
            .scenarios
            .contains(&Scenario::TcpCapacity));
        assert_eq!(
            sel("tcp-capacity").unwrap().scenarios,
            vec![Scenario::TcpCapacity]
        );
        let both = sel("all,tcp-capacity").unwrap().scenarios;
        assert_eq!(both.len(), Scenario::ALL.len() + 1);
        assert_eq!(both.last(), Some(&Scenario::TcpCapacity));
        let e = parse_scenarios("tcp-capacity", Some(10), 20000).unwrap_err();
        assert!(e.to_string().contains("tcp-crr"), "{e}");
        let e = sel("tcp-capcity").unwrap_err();
        assert!(e.to_string().contains("tcp-capacity"), "{e}");
        // --conns is its most connections, --size its relay check's message.
        let mut cfg = Config::all(Duration::from_secs(1));
        cfg.scenarios = vec![Scenario::TcpCapacity];
        cfg.conns = Some(200);
        let plan = cfg.plan();
        let v = &plan[0].1[0];
        assert_eq!(
            (v.label.as_str(), v.conns, v.size, v.idle),
            ("up to 200", 200, 16, 0)
        );
        cfg.size = Some(3);
        assert_eq!(cfg.plan()[0].1[0].size, 8);
    }

    #[test]
    fn plan_puts_the_idle_variant_after_its_twin() {
        let mut cfg = Config::all(Duration::from_secs(1));
        cfg.scenarios = vec![Scenario::TcpCrr, Scenario::TcpRr];
        let labels = |cfg: &Config| -> Vec<(String, usize)> {
            cfg.plan()
                .iter()
                .flat_map(|(_, vs)| vs.iter().map(|v| (v.label.clone(), v.idle)))
                .collect()
        };
        assert_eq!(
            labels(&cfg),
            vec![("16 clients".into(), 0), ("8 conns".into(), 0)]
        );
        cfg.idle_conns = Some(2000);
        assert_eq!(
            labels(&cfg),
            vec![
                ("16 clients".into(), 0),
                ("16 clients, idle 2000".into(), 2000),
                ("8 conns".into(), 0)
            ]
        );
        cfg.idle_only = true;
        cfg.conns = Some(4);
        assert_eq!(
            labels(&cfg),
            vec![("4 clients, idle 2000".into(), 2000), ("4 conns".into(), 0)]
        );
        let v = &cfg.plan()[0].1[0];
        assert_eq!((v.conns, v.size), (4, 64));
    }

    #[test]
    fn a_limit_below_the_idle_connections_is_warned_about() {
        let mut cfg = Config::all(Duration::from_secs(1));
        cfg.scenarios = vec![Scenario::TcpCrr];
        cfg.idle_conns = Some(2430);
        let plan = cfg.plan();
        let w = limit_warning(Target::EngineSplice, Some(2436), &plan).unwrap();
        assert!(w.contains("at most 2436"), "{w}");
        assert!(w.contains("2430 idle + 16 clients"), "{w}");
        assert_eq!(limit_warning(Target::EngineCopy, Some(7308), &plan), None);
        assert_eq!(limit_warning(Target::Direct, None, &plan), None);
        cfg.idle_conns = None;
        assert_eq!(
            limit_warning(Target::EngineSplice, Some(10), &cfg.plan()),
            None
        );
    }

    fn crr_outcome(idle: Option<IdleConns>) -> Outcome {
        Outcome {
            elapsed: Duration::from_secs(1),
            ops: 5_000,
            bytes: 5_000 * 192,
            probe_sockets: Some(40),
            idle,
            ..Outcome::default()
        }
    }

    fn all_held(n: usize, router_sockets: usize) -> IdleConns {
        IdleConns {
            opened: n,
            held: n,
            server_held: n,
            router_sockets: Some(router_sockets),
            proxy_limit: Some(2436),
            open_s: 0.4,
            close_s: 0.1,
            ..IdleConns::default()
        }
    }

    #[test]
    fn idle_connections_are_judged_and_recorded() {
        let plain = Scenario::TcpCrr.variants(None, None).remove(0);
        let idle = plain.with_idle(2000);
        let rec = |v: &Variant, t: Target, i: Option<IdleConns>| {
            let mut o = crr_outcome(i);
            if !t.is_proxy() {
                o.probe_sockets = Some(0);
            }
            to_record(Scenario::TcpCrr, v, t, Family::Ipv4, &o)
        };
        // Every one held, through the proxy: ok, and the record says how many.
        let r = rec(&idle, Target::EngineCopy, Some(all_held(2000, 2000)));
        assert_eq!(r.status, Status::Ok, "{r:?}");
        assert_eq!(
            (r.variant.as_str(), r.idle_conns),
            ("16 clients, idle 2000", 2000)
        );
        assert_eq!(r.idle.as_ref().unwrap().held, 2000);
        assert!(
            summary(&r).contains("idle 2000/2000 held"),
            "{}",
            summary(&r)
        );
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(j["idle_conns"], 2000);
        assert_eq!(j["idle"]["router_sockets"], 2000);
        assert_eq!(j["idle"]["proxy_limit"], 2436);
        // The kernel baseline holds them with no router socket.
        let r = rec(&idle, Target::Direct, Some(all_held(2000, 0)));
        assert_eq!(r.status, Status::Ok, "{r:?}");
        // A plain variant has none, and says so.
        let r = rec(&plain, Target::EngineCopy, None);
        assert_eq!((r.status, r.idle_conns), (Status::Ok, 0));
        assert!(serde_json::to_value(&r).unwrap()["idle"].is_null());
        // A proxy at its limit: refused ones are counted and the limit named.
        let mut short = all_held(2500, 2436);
        short.opened = 2436;
        short.held = 2436;
        short.server_held = 2436;
        short.errors.insert("no_response".into(), 64);
        let r = rec(&plain.with_idle(2500), Target::EngineSplice, Some(short));
        assert_eq!(r.status, Status::Failed);
        let why = r.reason.as_deref().unwrap();
        assert!(why.contains("2436 of 2500 held"), "{why}");
        assert!(why.contains("no_response 64"), "{why}");
        assert!(
            why.contains("limit is 2436 connections, fewer than 2500 idle + 16"),
            "{why}"
        );
        // Dropped during the window, at either end.
        let mut dropped = all_held(2000, 2000);
        dropped.held = 1990;
        dropped.errors.insert("dropped_closed".into(), 10);
        let r = rec(&idle, Target::Haproxy, Some(dropped));
        assert_eq!(r.status, Status::Failed);
        assert!(
            r.reason.as_deref().unwrap().contains("1990 of 2000"),
            "{r:?}"
        );
        let mut server_side = all_held(2000, 2000);
        server_side.server_held = 1999;
        let r = rec(&idle, Target::EngineCopy, Some(server_side));
        assert!(r
            .reason
            .as_deref()
            .unwrap()
            .contains("1999 open at the server"));
        // Held, but not through the proxy / through a proxy on direct.
        let r = rec(&idle, Target::BaseCopy, Some(all_held(2000, 0)));
        assert_eq!(r.status, Status::Failed);
        assert!(
            r.reason.as_deref().unwrap().contains("not intercepted"),
            "{r:?}"
        );
        let r = rec(&idle, Target::Direct, Some(all_held(2000, 2000)));
        assert_eq!(r.status, Status::Failed);
        // Opening failed outright (no outcome for them at all).
        let r = rec(&idle, Target::EngineCopy, None);
        assert_eq!(r.status, Status::Failed);
        // The idle verdict comes first when the churn failed too.
        let mut o = crr_outcome(Some(IdleConns::default()));
        o.ops = 0;
        o.bytes = 0;
        let r = to_record(
            Scenario::TcpCrr,
            &idle,
            Target::EngineCopy,
            Family::Ipv4,
            &o,
        );
        let why = r.reason.unwrap();
        assert!(why.starts_with("idle connections: 0 of 2000"), "{why}");
        assert!(why.contains("nothing got through"), "{why}");
    }

    #[test]
    fn records_carry_cpu_per_unit_of_the_counted_work() {
        let t0 = std::time::Instant::now();
        let snap = |text: &str, dt: u64| cpu::Snapshot {
            at: t0 + Duration::from_secs(dt),
            cpus: cpu::parse_proc_stat(text),
            proxy_ticks: None,
        };
        // Core 1 busy 80 of 100 ticks (60 system, 20 softirq) over 1 s.
        let a = snap("cpu0 0 0 0 0\ncpu1 100 0 200 300 0 0 50 0\n", 0);
        let b = snap("cpu0 0 0 0 100\ncpu1 100 0 260 320 0 0 70 0\n", 1);
        let used = cpu::CpuUse::between(&[1], &a, &b, 100);
        let var = Variant {
            label: "16 clients".into(),
            conns: 16,
            size: 64,
            idle: 0,
        };
        let out = Outcome {
            elapsed: Duration::from_secs(1),
            ops: 10_000,
            bytes: 10_000 * 192,
            probe_sockets: Some(3),
            cpu: used,
            ..Outcome::default()
        };
        let r = to_record(
            Scenario::TcpCrr,
            &var,
            Target::EngineSplice,
            Family::Ipv4,
            &out,
        );
        assert_eq!(r.status, Status::Ok, "{r:?}");
        let c = r.cpu.as_ref().unwrap();
        assert_eq!(c.unit, "µs/conn");
        // 0.8 s of core time for 10 000 connections: 80 µs each, at 80 % busy.
        assert!((c.per_unit.unwrap() - 80.0).abs() < 1e-9, "{c:?}");
        assert!((c.util - 0.8).abs() < 1e-9);
        assert!((c.softirq_s - 0.2).abs() < 1e-9);
        assert_eq!(c.rest_util, Some(0.0));
        assert!(
            summary(&r).contains("cores [1] 80% busy = 80.0 µs/conn"),
            "{}",
            summary(&r)
        );
        // No process time for a proxy: not judged.
        assert!(!c.contended);
    }
}
