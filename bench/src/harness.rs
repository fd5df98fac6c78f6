//! The benchmark matrix: for each target, arm the router, run every scenario variant,
//! disarm; baseline and proxies back to back on the same namespaces (style lesson 12).

use std::time::Duration;

use crate::cpu::{self, CpuProbe};
use crate::lab::Lab;
use crate::load::{self, Family, LoadSpec, Outcome, Scenario, Variant};
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
            server_cores: load_cores.clone(),
            engine_cores,
            load_cores,
            family: Family::Ipv4,
            port: DEFAULT_PORT,
            rounds: 1,
        }
    }
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
    if s.trim() == "all" {
        return Ok(if with_baseline {
            Target::ALL_WITH_BASELINE.to_vec()
        } else {
            Target::ALL.to_vec()
        });
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

/// Parses `2`, `2s`, `0.3s`, `500ms`.
pub fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let s = s.trim();
    let (num, scale) = if let Some(ms) = s.strip_suffix("ms") {
        (ms, 1e-3)
    } else if let Some(sec) = s.strip_suffix('s') {
        (sec, 1.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("bad duration {s:?}: use 2s, 0.5s or 500ms"))?;
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
    let arm_opts = ArmOptions {
        engine_cores: cfg.engine_cores.clone(),
        port: cfg.port,
    };
    let plan: Vec<(Scenario, Vec<Variant>)> = cfg
        .scenarios
        .iter()
        .map(|s| (*s, s.variants(cfg.conns, cfg.size)))
        .collect();

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
            let key = if target.is_baseline() {
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
        };
        for (scenario, variants) in plan {
            for v in variants {
                if crate::stop_requested() {
                    rep.interrupted = true;
                    break;
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
                let rec = match load::run(lab, *scenario, v, &spec) {
                    Ok(out) => {
                        let mut r = to_record(*scenario, v, target, cfg.family, &out);
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
    r
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
        assert!(parse_duration("x").is_err());
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
