//! What sits in the router while the load runs: nothing (kernel forwarding), the
//! engine in one of its relay modes, or HAProxy; plus finding the binaries.
//!
//! An [`Armed`] target owns the router's state for its lifetime: `setup apply` has run
//! and the proxy is up; dropping it stops the proxy and runs `setup teardown`, so the
//! next target starts from a router without rules.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use nix::sys::signal::Signal;
use serde::Serialize;

use crate::lab::{self, Lab, NsChild};
use crate::load::Scenario;
use crate::policy;

/// The transparent port (docs/CONTRACTS.md).
pub const DEFAULT_PORT: u16 = 15001;
/// How long a proxy may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a proxy may take to drain and exit after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Something to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Target {
    /// Kernel forwarding through the router, no interception rules: the baseline.
    #[serde(rename = "direct")]
    Direct,
    /// `engine --relay splice` behind `setup apply`.
    #[serde(rename = "engine-splice")]
    EngineSplice,
    /// [`Target::EngineSplice`] with the `--baseline-engine` binary (an older build).
    #[serde(rename = "base-splice")]
    BaseSplice,
    /// `engine --relay copy` behind `setup apply`.
    #[serde(rename = "engine-copy")]
    EngineCopy,
    /// [`Target::EngineCopy`] with the `--baseline-engine` binary.
    #[serde(rename = "base-copy")]
    BaseCopy,
    /// HAProxy, transparent bind, `option splice-auto`, behind `setup apply`.
    #[serde(rename = "haproxy")]
    Haproxy,
    /// [`Target::EngineSplice`] with a rules file of [`policy::RULES_10K`] rules, the
    /// one that relays the lab's traffic last (`--policy`).
    #[serde(rename = "engine-rules10k")]
    EngineRules10k,
    /// [`Target::EngineSplice`] with one SNI rule: every connection waits for its
    /// ClientHello; the `tcp-crr` and `tcp-rr` clients send one (`--policy`).
    #[serde(rename = "engine-sni")]
    EngineSni,
    /// [`Target::EngineSplice`] with `--source client-ip` (and its return path:
    /// `setup apply --source client-ip --in-iface veth-c`) (`--source-variant`).
    #[serde(rename = "engine-clientip")]
    EngineClientIp,
}

impl Target {
    /// The targets of `--target all`, baseline first (it runs on a router that never
    /// saw rules).
    pub const ALL: [Target; 4] = [
        Target::Direct,
        Target::EngineSplice,
        Target::EngineCopy,
        Target::Haproxy,
    ];

    /// `--target all` with `--baseline-engine`: each engine target right before its
    /// baseline twin, so that slow drift of the machine hits both alike.
    pub const ALL_WITH_BASELINE: [Target; 6] = [
        Target::Direct,
        Target::EngineSplice,
        Target::BaseSplice,
        Target::EngineCopy,
        Target::BaseCopy,
        Target::Haproxy,
    ];

    /// The policy variants of engine-splice, added to `all` by `--policy`.
    pub const POLICY: [Target; 2] = [Target::EngineRules10k, Target::EngineSni];

    /// The `--source client-ip` variant of engine-splice, added to `all` by
    /// `--source-variant`.
    pub const SOURCE_VARIANT: [Target; 1] = [Target::EngineClientIp];

    /// The variants of engine-splice: each differs from it in one thing, and the
    /// report divides its figures by engine-splice's.
    pub const SPLICE_VARIANTS: [Target; 3] = [
        Target::EngineRules10k,
        Target::EngineSni,
        Target::EngineClientIp,
    ];

    /// Every target, for parsing names.
    pub const EVERY: [Target; 9] = [
        Target::Direct,
        Target::EngineSplice,
        Target::BaseSplice,
        Target::EngineCopy,
        Target::BaseCopy,
        Target::Haproxy,
        Target::EngineRules10k,
        Target::EngineSni,
        Target::EngineClientIp,
    ];

    /// CLI and report name.
    pub fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::EngineSplice => "engine-splice",
            Target::BaseSplice => "base-splice",
            Target::EngineCopy => "engine-copy",
            Target::BaseCopy => "base-copy",
            Target::Haproxy => "haproxy",
            Target::EngineRules10k => "engine-rules10k",
            Target::EngineSni => "engine-sni",
            Target::EngineClientIp => "engine-clientip",
        }
    }

    /// Parses a CLI name.
    pub fn parse(s: &str) -> Option<Target> {
        Target::EVERY.into_iter().find(|t| t.name() == s)
    }

    /// The relay mode recorded with each result.
    pub fn relay(self) -> &'static str {
        match self {
            Target::Direct => "kernel-forwarding",
            Target::EngineSplice
            | Target::BaseSplice
            | Target::EngineRules10k
            | Target::EngineSni
            | Target::EngineClientIp => "splice",
            Target::EngineCopy | Target::BaseCopy => "copy",
            Target::Haproxy => "haproxy-splice-auto",
        }
    }

    /// True for the targets that run an engine binary (current or baseline).
    pub fn is_engine(self) -> bool {
        matches!(
            self,
            Target::EngineSplice
                | Target::EngineCopy
                | Target::BaseSplice
                | Target::BaseCopy
                | Target::EngineRules10k
                | Target::EngineSni
                | Target::EngineClientIp
        )
    }

    /// True for the variants of engine-splice ([`Target::SPLICE_VARIANTS`]).
    pub fn is_splice_variant(self) -> bool {
        Target::SPLICE_VARIANTS.contains(&self)
    }

    /// Why this target does not run `scenario` (`idle`: its idle-connection variant),
    /// if it does not: only the `tcp-crr` and `tcp-rr` clients of `engine-sni` send a
    /// ClientHello, and its rules reject everything else.
    pub fn skips(self, scenario: Scenario, idle: bool) -> Option<&'static str> {
        let sni_load = matches!(scenario, Scenario::TcpCrr | Scenario::TcpRr) && !idle;
        (self == Target::EngineSni && !sni_load).then_some(
            "engine-sni measures tcp-crr and tcp-rr only: other clients send no ClientHello",
        )
    }

    /// What the engine gets besides `--cores --port --relay`, and `setup apply`
    /// besides `--port`.
    fn extra_args(self) -> (&'static [&'static str], &'static [&'static str]) {
        match self {
            Target::EngineClientIp => (
                &["--source", "client-ip"],
                &[
                    "--source",
                    "client-ip",
                    "--in-iface",
                    lab::addrs::ROUTER_IFACE_CLIENT,
                ],
            ),
            _ => (&[], &[]),
        }
    }

    /// The rules file this target runs the engine with, if any.
    fn rules_file(self) -> Option<String> {
        match self {
            Target::EngineRules10k => Some(policy::rules_file(policy::RULES_10K)),
            Target::EngineSni => Some(policy::sni_rules_file()),
            _ => None,
        }
    }

    /// True for the targets that run the `--baseline-engine` binary.
    pub fn is_baseline(self) -> bool {
        matches!(self, Target::BaseSplice | Target::BaseCopy)
    }

    /// The current-engine twin of a baseline target (and of itself otherwise).
    pub fn current(self) -> Target {
        match self {
            Target::BaseSplice => Target::EngineSplice,
            Target::BaseCopy => Target::EngineCopy,
            t => t,
        }
    }

    /// The baseline twin of an engine target, if it has one.
    pub fn baseline(self) -> Option<Target> {
        match self {
            Target::EngineSplice => Some(Target::BaseSplice),
            Target::EngineCopy => Some(Target::BaseCopy),
            _ => None,
        }
    }

    /// True for the targets that need `setup apply` and a proxy.
    pub fn is_proxy(self) -> bool {
        self != Target::Direct
    }
}

/// A tool found on disk, or why not.
pub type Found = Result<PathBuf, String>;

/// The external programs the targets need, located once.
#[derive(Debug, Clone)]
pub struct Tools {
    /// The engine binary (env `RINGRELAY_ENGINE`, else next to this executable).
    pub engine: Found,
    /// The setup binary (env `RINGRELAY_SETUP`, else next to this executable).
    pub setup: Found,
    /// `haproxy` from `PATH`.
    pub haproxy: Found,
    /// `haproxy -v`, first line.
    pub haproxy_version: Option<String>,
    /// The `--baseline-engine` binary, when one was given (targets `base-*`).
    pub baseline_engine: Option<Found>,
}

impl Tools {
    /// Finds the engine, setup and HAProxy, and checks that each answers `--help`
    /// (or `-v`) with the CLI the harness relies on.
    pub fn discover() -> Tools {
        let engine = locate("engine", "RINGRELAY_ENGINE").and_then(|p| {
            check_help(
                &p,
                "--relay",
                "engine binary does not implement `--relay` yet",
            )
        });
        let setup = locate("setup", "RINGRELAY_SETUP")
            .map_err(|_| {
                "setup binary not built (cargo build --release -p ringrelay-setup)".to_string()
            })
            .and_then(|p| check_help(&p, "apply", "setup binary does not implement `apply` yet"));
        let (haproxy, haproxy_version) = match which("haproxy") {
            Some(p) => match run_with_timeout(Command::new(&p).arg("-v"), Duration::from_secs(5)) {
                Ok(out) => {
                    let v = out.lines().next().unwrap_or("").trim().to_string();
                    (Ok(p), Some(v))
                }
                Err(e) => (Err(format!("haproxy -v failed: {e:#}")), None),
            },
            None => (
                Err("haproxy is not installed (apt-get install haproxy)".into()),
                None,
            ),
        };
        Tools {
            engine,
            setup,
            haproxy,
            haproxy_version,
            baseline_engine: None,
        }
    }

    /// Adds the `--baseline-engine` binary, checked like the engine.
    pub fn with_baseline_engine(mut self, p: &Path) -> Tools {
        self.baseline_engine = Some(if p.is_file() {
            check_help(
                p,
                "--relay",
                "baseline engine binary does not implement `--relay`",
            )
        } else {
            Err(format!("baseline engine {} does not exist", p.display()))
        });
        self
    }

    /// The engine binary a target runs.
    pub fn engine_for(&self, target: Target) -> Found {
        if target.is_baseline() {
            self.baseline_engine
                .clone()
                .unwrap_or_else(|| Err("no --baseline-engine PATH given".into()))
        } else {
            self.engine.clone()
        }
    }

    /// Why `target` cannot run, if it cannot.
    pub fn missing_for(&self, target: Target) -> Option<String> {
        let reason = |f: &Found| f.as_ref().err().cloned();
        match target {
            Target::Direct => None,
            Target::EngineSplice
            | Target::EngineCopy
            | Target::BaseSplice
            | Target::BaseCopy
            | Target::EngineRules10k
            | Target::EngineSni
            | Target::EngineClientIp => {
                reason(&self.engine_for(target)).or_else(|| reason(&self.setup))
            }
            Target::Haproxy => reason(&self.haproxy).or_else(|| {
                reason(&self.setup).map(|r| format!("{r} (HAProxy needs its TPROXY rules)"))
            }),
        }
    }

    /// `release`, `debug` or `unknown`, judged by the target directory the engine
    /// binary sits in. Benchmarks of a debug engine are meaningless.
    pub fn engine_build(&self) -> &'static str {
        match &self.engine {
            Ok(p) => build_kind(p),
            Err(_) => "unknown",
        }
    }

    /// [`Tools::engine_build`] of the baseline engine; `None` without one.
    pub fn baseline_engine_build(&self) -> Option<&'static str> {
        match self.baseline_engine.as_ref()? {
            Ok(p) => Some(build_kind(p)),
            Err(_) => Some("unknown"),
        }
    }
}

/// `release`/`debug` from a path such as `target/release/engine`.
pub fn build_kind(p: &Path) -> &'static str {
    let comps: Vec<_> = p
        .components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect();
    if comps.iter().any(|c| c == "debug") {
        "debug"
    } else if comps.iter().any(|c| c == "release") {
        "release"
    } else {
        "unknown"
    }
}

/// The binary named by `env`, else `name` in this executable's directory, else in
/// its parent (test binaries live in `target/<profile>/deps/`).
fn locate(name: &str, env: &str) -> Found {
    if let Some(p) = std::env::var_os(env) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("{env}={} does not exist", p.display()))
        };
    }
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let dir = exe.parent().ok_or("current_exe has no directory")?;
    let mut candidates = vec![dir.join(name)];
    if dir.file_name().is_some_and(|n| n == "deps") {
        if let Some(up) = dir.parent() {
            candidates.push(up.join(name));
        }
    }
    candidates.into_iter().find(|c| c.is_file()).ok_or_else(|| {
        format!(
            "{name} binary not built (looked in {}; set {env})",
            dir.display()
        )
    })
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_string_lossy()
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// Runs `p --help` and requires `needle` in its output: a stub binary exits 0 and
/// prints nothing, and must not be mistaken for a working one.
fn check_help(p: &Path, needle: &str, why: &str) -> Found {
    match run_with_timeout(Command::new(p).arg("--help"), Duration::from_secs(5)) {
        Ok(out) if out.contains(needle) => Ok(p.to_path_buf()),
        Ok(_) => Err(format!("{why} ({} --help)", p.display())),
        Err(e) => Err(format!("{} --help failed: {e:#}", p.display())),
    }
}

/// Runs a short command to completion (bounded), returning stdout+stderr.
fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> anyhow::Result<String> {
    let mut child = NsChild::spawn(
        format!("{cmd:?}"),
        std::mem::replace(cmd, Command::new("true")),
    )?;
    match child.wait_timeout(timeout) {
        Some(st) => {
            child.finish_output();
            let text = format!("{}{}", child.stdout(), child.stderr());
            if st.success() {
                Ok(text)
            } else {
                Err(anyhow!("{st}: {}", text.trim()))
            }
        }
        None => Err(anyhow!("no answer within {timeout:?}")),
    }
}

/// Options for arming a target.
#[derive(Debug, Clone)]
pub struct ArmOptions {
    /// Cores for the engine (`--cores`) or HAProxy (`nbthread` + `cpu-map`).
    pub engine_cores: Vec<usize>,
    /// Transparent port.
    pub port: u16,
    /// Extra engine arguments, after the target's own (`bench soak` shortens the
    /// UDP idle timeout so the drain at the end is quick).
    pub engine_args: Vec<String>,
}

/// Why a target could not be armed.
#[derive(Debug, thiserror::Error)]
pub enum ArmError {
    /// Something it needs is missing: report the target as skipped.
    #[error("{0}")]
    Skipped(String),
    /// It is there but did not come up: report the target as failed.
    #[error("{0:#}")]
    Failed(anyhow::Error),
}

/// A target in place in the router: rules applied, proxy running.
pub struct Armed<'a> {
    lab: &'a Lab,
    target: Target,
    setup: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    /// Where the target's rules file was written, removed on disarm.
    rules_dir: Option<PathBuf>,
    child: Option<NsChild>,
    /// Startup output of the proxy (the engine prints its ring flags there).
    pub startup: Vec<String>,
    /// Problems worth a line in the report (no `ready` line, teardown failure...).
    pub notes: Vec<String>,
    /// What the proxy printed after `ready` (the engine's exit summary).
    pub summary: Vec<String>,
    /// The most TCP connections the proxy says it holds (see [`Armed::conn_limit`]).
    conn_limit: Option<usize>,
    /// The bench asked for counter tables (SIGUSR1): they are not the exit summary.
    asked_counters: AtomicBool,
}

static NEXT_TMP: AtomicU32 = AtomicU32::new(0);

/// A fresh private directory for a HAProxy config or setup's state file.
fn temp_dir(what: &str) -> anyhow::Result<PathBuf> {
    let n = NEXT_TMP.fetch_add(1, Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("ringrelay-bench-{}-{what}-{n}", std::process::id()));
    std::fs::create_dir_all(&d).with_context(|| format!("mkdir {}", d.display()))?;
    Ok(d)
}

/// Comma list of cores, as `engine --cores` takes it.
pub fn core_list(cores: &[usize]) -> String {
    cores
        .iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

impl<'a> Armed<'a> {
    /// Applies the rules and starts the proxy for `target` (nothing for `direct`).
    pub fn arm(
        lab: &'a Lab,
        target: Target,
        tools: &Tools,
        opts: &ArmOptions,
    ) -> Result<Armed<'a>, ArmError> {
        if let Some(why) = tools.missing_for(target) {
            return Err(ArmError::Skipped(why));
        }
        let mut armed = Armed {
            lab,
            target,
            setup: None,
            state_dir: None,
            rules_dir: None,
            child: None,
            startup: Vec::new(),
            notes: Vec::new(),
            summary: Vec::new(),
            conn_limit: None,
            asked_counters: AtomicBool::new(false),
        };
        if target == Target::Direct {
            return Ok(armed);
        }
        let setup = tools.setup.clone().map_err(ArmError::Skipped)?;
        armed.state_dir = Some(temp_dir("setup-state").map_err(ArmError::Failed)?);
        let port = opts.port.to_string();
        let mut apply = vec!["apply", "--port", &port];
        apply.extend_from_slice(target.extra_args().1);
        armed.setup_cmd(&setup, &apply).map_err(ArmError::Failed)?;
        armed.setup = Some(setup);
        let started = match target {
            Target::Haproxy => {
                let haproxy = tools.haproxy.clone().map_err(ArmError::Skipped)?;
                armed.start_haproxy(&haproxy, opts)
            }
            Target::Direct => Ok(()),
            _ => {
                let engine = tools.engine_for(target).map_err(ArmError::Skipped)?;
                armed.start_engine(&engine, opts)
            }
        };
        // On failure `armed` drops here: proxy stopped, rules torn down.
        started.map_err(ArmError::Failed)?;
        Ok(armed)
    }

    /// `setup ARGS` in the router, with a private state directory so that labs of
    /// parallel tests never share setup's state file.
    fn setup_cmd(&self, setup: &Path, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = self.lab.router.command(setup);
        cmd.args(args);
        if let Some(d) = &self.state_dir {
            cmd.env("RINGRELAY_STATE_DIR", d);
        }
        let out = cmd
            .stdin(std::process::Stdio::null())
            .output()
            .with_context(|| format!("starting {}", setup.display()))?;
        if !out.status.success() {
            return Err(anyhow!(
                "`setup {}` in the router failed ({}): {}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn start_engine(&mut self, engine: &Path, opts: &ArmOptions) -> anyhow::Result<()> {
        let mut cmd = self.lab.router.command(engine);
        cmd.args([
            "--cores",
            &core_list(&opts.engine_cores),
            "--port",
            &opts.port.to_string(),
            "--relay",
            self.target.relay(),
        ]);
        cmd.args(self.target.extra_args().0);
        cmd.args(&opts.engine_args);
        let mut label = format!("--relay {}", self.target.relay());
        if let Some(rules) = self.target.rules_file() {
            let dir = temp_dir("rules")?;
            let path = dir.join(format!("{}.toml", self.target.name()));
            self.rules_dir = Some(dir);
            std::fs::write(&path, rules).with_context(|| format!("writing {}", path.display()))?;
            cmd.arg("--config").arg(&path);
            let _ = write!(label, " --config {}", path.display());
        }
        for a in self.target.extra_args().0 {
            let _ = write!(label, " {a}");
        }
        for a in &opts.engine_args {
            let _ = write!(label, " {a}");
        }
        let who = if self.target.is_baseline() {
            "baseline engine"
        } else {
            "engine"
        };
        let child = NsChild::spawn(format!("{who} {label}"), cmd)?;
        self.child = Some(child);
        self.wait_up(opts.port, true)?;
        self.conn_limit = self
            .startup
            .iter()
            .find(|l| l.starts_with("ready"))
            .and_then(|l| ready_max_conns(l));
        Ok(())
    }

    fn start_haproxy(&mut self, haproxy: &Path, opts: &ArmOptions) -> anyhow::Result<()> {
        let dir = temp_dir("haproxy")?;
        let cfg = dir.join("haproxy.cfg");
        std::fs::write(
            &cfg,
            haproxy_config(&opts.engine_cores, opts.port, fd_limit()),
        )
        .with_context(|| format!("writing {}", cfg.display()))?;
        // Validate first: a config error then reads as such, not as "did not start".
        let check = self
            .lab
            .router
            .command(haproxy)
            .arg("-c")
            .arg("-f")
            .arg(&cfg)
            .output()?;
        if !check.status.success() {
            return Err(anyhow!(
                "haproxy -c rejected {}: {}{}",
                cfg.display(),
                String::from_utf8_lossy(&check.stdout).trim(),
                String::from_utf8_lossy(&check.stderr).trim()
            ));
        }
        self.conn_limit = Some(haproxy_maxconn(fd_limit()) as usize);
        let mut cmd = self.lab.router.command(haproxy);
        cmd.arg("-db").arg("-f").arg(&cfg);
        self.child = Some(NsChild::spawn("haproxy", cmd)?);
        self.startup
            .push(format!("haproxy -db -f {}", cfg.display()));
        self.wait_up(opts.port, false)
    }

    /// Waits for the `ready` line (engine) and/or a TCP listener on `port`, whichever
    /// the target provides; fails early if the proxy exits.
    fn wait_up(&mut self, port: u16, expect_ready_line: bool) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut listening_since: Option<Instant> = None;
        let router = self.lab.router.clone();
        let child = self.child.as_mut().context("no proxy child")?;
        loop {
            let out = child.stdout();
            if let Some(line) = out.lines().find(|l| l.starts_with("ready")) {
                self.startup.extend(startup_lines(&out, &child.stderr()));
                let _ = line;
                return Ok(());
            }
            if let Some(st) = child.try_wait() {
                child.finish_output();
                return Err(anyhow!(
                    "{} exited during startup ({st}): {}{}",
                    child.label(),
                    child.stdout().trim(),
                    child.stderr().trim()
                ));
            }
            if lab::wait_tcp_listen(&router, port, Duration::ZERO).is_ok() {
                let since = *listening_since.get_or_insert_with(Instant::now);
                // HAProxy prints nothing; the engine gets a moment to print `ready`
                // after its first listener appears, then the listener is trusted.
                if !expect_ready_line || since.elapsed() > Duration::from_secs(2) {
                    if expect_ready_line {
                        self.notes.push(format!(
                            "{} printed no `ready` line; started on its TCP listener",
                            child.label()
                        ));
                    }
                    self.startup
                        .extend(startup_lines(&child.stdout(), &child.stderr()));
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(anyhow!(
                    "{} not up after {START_TIMEOUT:?}: stdout: {} stderr: {}",
                    child.label(),
                    child.stdout().trim(),
                    child.stderr().trim()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The most TCP connections the proxy holds at once, as it states it: the
    /// engine's `max_conns` (its `ready` line; derived from RLIMIT_NOFILE by default),
    /// HAProxy's `maxconn` (our config). `None` for `direct`, or an engine that did
    /// not say.
    pub fn conn_limit(&self) -> Option<usize> {
        self.conn_limit
    }

    /// What is armed.
    pub fn target(&self) -> Target {
        self.target
    }

    /// The bytes each splice pipe of the engine holds at most ([`ready_pipe_size`] of
    /// its `ready` line); `None` for other targets.
    pub fn pipe_size(&self) -> Option<u64> {
        let ready = self.startup.iter().find(|l| l.starts_with("ready"))?;
        ready_pipe_size(ready)
    }

    /// The proxy's pid (`None` for `direct`).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(NsChild::pid)
    }

    /// Sends `sig` to the proxy (the engine prints its counter table on SIGUSR1).
    pub fn signal(&self, sig: Signal) -> anyhow::Result<()> {
        if sig == Signal::SIGUSR1 {
            self.asked_counters.store(true, Ordering::Relaxed);
        }
        self.child.as_ref().context("no proxy child")?.signal(sig)
    }

    /// Everything the proxy printed on stdout so far.
    pub fn stdout(&self) -> String {
        self.child.as_ref().map(NsChild::stdout).unwrap_or_default()
    }

    /// `Err(reason)` when the proxy has died since it started.
    pub fn check_alive(&mut self) -> Result<(), String> {
        match self.child.as_mut() {
            None => Ok(()),
            Some(c) => match c.try_wait() {
                None => Ok(()),
                Some(st) => {
                    c.finish_output();
                    Err(format!(
                        "{} died ({st}): {}",
                        c.label(),
                        tail(&c.stderr(), 400)
                    ))
                }
            },
        }
    }

    /// Stops the proxy (SIGTERM: the engine drains and prints a summary) and tears the
    /// rules down. Returns the notes and the proxy's output after `ready`.
    pub fn disarm(mut self) -> (Vec<String>, Vec<String>) {
        self.shutdown();
        (
            std::mem::take(&mut self.notes),
            std::mem::take(&mut self.summary),
        )
    }

    fn shutdown(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.signal(Signal::SIGTERM);
            let st = c.wait_timeout(STOP_GRACE);
            match st {
                Some(st) if st.success() => {}
                Some(st) if self.target == Target::Haproxy => {
                    // haproxy -db exits 0 or 143 on SIGTERM depending on version.
                    let _ = st;
                }
                Some(st) => self
                    .notes
                    .push(format!("{} exited with {st} on SIGTERM", c.label())),
                None => {
                    self.notes.push(format!(
                        "{} did not exit within {STOP_GRACE:?} of SIGTERM; killed",
                        c.label()
                    ));
                    c.stop(Duration::ZERO);
                }
            }
            c.finish_output();
            let out = c.stdout();
            let mut after: Vec<&str> = out
                .lines()
                .skip_while(|l| !l.starts_with("ready"))
                .skip(1)
                .collect();
            // Past the tables the bench asked for, the engine's exit summary starts at
            // its `summary:` line.
            if self.asked_counters.load(Ordering::Relaxed) {
                if let Some(i) = after.iter().rposition(|l| l.starts_with("summary:")) {
                    after.drain(..i);
                }
            }
            self.summary = after.into_iter().take(200).map(str::to_string).collect();
        }
        if let Some(setup) = self.setup.take() {
            if let Err(e) = self.setup_cmd(&setup, &["teardown"]) {
                self.notes.push(format!("{e:#}"));
            }
        }
        for d in [self.state_dir.take(), self.rules_dir.take()]
            .into_iter()
            .flatten()
        {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The proxy's startup output worth keeping: everything up to and including `ready`
/// (the engine states its ring flags there), bounded.
fn startup_lines(stdout: &str, stderr: &str) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    for l in stdout.lines() {
        v.push(l.to_string());
        if l.starts_with("ready") {
            break;
        }
    }
    v.extend(stderr.lines().map(|l| format!("stderr: {l}")));
    v.truncate(40);
    v
}

fn tail(s: &str, n: usize) -> String {
    let s = s.trim();
    let start = s.len().saturating_sub(n);
    let start = (start..=s.len())
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(s.len());
    s[start..].to_string()
}

/// RLIMIT_NOFILE (soft) of this process, from `/proc/self/limits`; children inherit it.
pub fn fd_limit() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        })
        .unwrap_or(1024)
}

/// `max_conns N` of the engine's `ready` line: the connections it holds at most, all
/// cores together.
pub fn ready_max_conns(line: &str) -> Option<usize> {
    ready_value(line, "max_conns")?.parse().ok()
}

/// The word after `key` in the engine's `ready` line.
fn ready_value<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let mut words = line.split_whitespace();
    words.find(|w| *w == key)?;
    words.next()
}

/// The size of the engine's splice pipes from its `ready` line (`relay splice buf N`;
/// `buf kernel`: the kernel's default pipe, 16 pages of 4 KiB); `None` for the copy
/// relay, whose `buf` is a user-space buffer.
pub fn ready_pipe_size(line: &str) -> Option<u64> {
    if ready_value(line, "relay")? != "splice" {
        return None;
    }
    match ready_value(line, "buf")? {
        "kernel" => Some(16 * 4096),
        n => n.parse().ok(),
    }
}

/// HAProxy's `maxconn` in our config: each proxied connection holds two sockets
/// plus, while splicing, half a pipe (maxpipes defaults to maxconn/4, two fds each):
/// 2.5 fds per connection, and a margin for listeners and logs. HAProxy refuses to
/// start past the fd limit.
pub fn haproxy_maxconn(fd_limit: u64) -> u64 {
    (fd_limit.saturating_sub(500) * 2 / 5).max(100)
}

/// The HAProxy configuration doing the engine's job: transparent listeners on the
/// TPROXY port for both families, connect to the original destination
/// (`server orig 0.0.0.0:0`), splice when it pays (`option splice-auto`), one thread
/// per engine core pinned like the engine.
pub fn haproxy_config(cores: &[usize], port: u16, fd_limit: u64) -> String {
    let nbthread = cores.len().max(1);
    let maxconn = haproxy_maxconn(fd_limit);
    let cpu_map = if nbthread == 1 {
        format!("cpu-map 1/1 {}", cores.first().copied().unwrap_or(0))
    } else {
        format!(
            "cpu-map auto:1/1-{nbthread} {}",
            cores
                .iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        )
    };
    format!(
        "# Written by ringrelay bench: HAProxy as a transparent proxy, same rules as the engine.
global
    nbthread {nbthread}
    {cpu_map}
    maxconn {maxconn}

defaults
    mode tcp
    option splice-auto
    timeout connect 5s
    timeout client 30s
    timeout server 30s

listen tproxy
    bind :{port} transparent
    bind :::{port} v6only transparent
    # 0.0.0.0:0 = connect to the address and port the client connected to.
    server orig 0.0.0.0:0
"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn haproxy_config_shape() {
        let c = haproxy_config(&[1], 15001, 20000);
        assert!(c.contains("nbthread 1"));
        assert!(c.contains("cpu-map 1/1 1"));
        assert!(c.contains("maxconn 7800"));
        assert!(c.contains("bind :15001 transparent"));
        assert!(c.contains("bind :::15001 v6only transparent"));
        assert!(c.contains("server orig 0.0.0.0:0"));
        let c2 = haproxy_config(&[2, 3], 15001, 20000);
        assert!(c2.contains("cpu-map auto:1/1-2 2 3"));
        assert_eq!(haproxy_maxconn(20000), 7800);
        assert_eq!(haproxy_maxconn(600), 100);
    }

    #[test]
    fn engine_limit_from_its_ready_line() {
        // The current engine's and the baseline's (bc8cce3) ready lines.
        let line = "ready: port 15001 tcp+udp ipv4+ipv6 cores 1 relay splice buf 262144 \
                    mark 0x2 max_conns 2436 udp_max_flows 1827 nofile 20000 ring sqpoll=off";
        assert_eq!(ready_max_conns(line), Some(2436));
        assert_eq!(
            ready_max_conns("ready: port 15001 relay copy max_conns 7308"),
            Some(7308)
        );
        assert_eq!(ready_max_conns("ready: port 15001 relay copy"), None);
        assert_eq!(ready_max_conns("ready: max_conns lots"), None);
        assert_eq!(ready_max_conns("ready: max_conns"), None);
        // And the size of its splice pipes.
        assert_eq!(ready_pipe_size(line), Some(262144));
        assert_eq!(
            ready_pipe_size("ready: port 15001 relay splice buf kernel max_conns 6851"),
            Some(65536)
        );
        assert_eq!(ready_pipe_size("ready: relay copy buf 65536"), None);
        assert_eq!(ready_pipe_size("ready: relay splice"), None);
        assert_eq!(ready_pipe_size("ready: relay splice buf x"), None);
    }

    #[test]
    fn baseline_engine_is_checked_like_the_engine() {
        let tools = Tools {
            engine: Ok(PathBuf::from("/w/target/release/engine")),
            setup: Ok(PathBuf::from("/w/target/release/setup")),
            haproxy: Err("not installed".into()),
            haproxy_version: None,
            baseline_engine: None,
        };
        assert_eq!(tools.missing_for(Target::EngineSplice), None);
        let why = tools.missing_for(Target::BaseSplice).unwrap();
        assert!(why.contains("--baseline-engine"), "{why}");
        assert_eq!(tools.baseline_engine_build(), None);
        let tools = tools.with_baseline_engine(Path::new("/nonexistent/old/engine"));
        let why = tools.missing_for(Target::BaseCopy).unwrap();
        assert!(why.contains("does not exist"), "{why}");
        assert_eq!(tools.engine_for(Target::EngineCopy), tools.engine);
    }

    #[test]
    fn build_kinds() {
        assert_eq!(build_kind(Path::new("/w/target/release/engine")), "release");
        assert_eq!(build_kind(Path::new("/w/target/debug/engine")), "debug");
        assert_eq!(build_kind(Path::new("/usr/bin/engine")), "unknown");
        assert_eq!(Target::parse("engine-copy"), Some(Target::EngineCopy));
        assert_eq!(Target::parse("base-splice"), Some(Target::BaseSplice));
        for t in Target::ALL_WITH_BASELINE {
            assert_eq!(Target::parse(t.name()), Some(t));
            if t.is_baseline() {
                assert_eq!(t.current().baseline(), Some(t));
                assert_eq!(t.relay(), t.current().relay());
                assert!(
                    !Target::ALL.contains(&t),
                    "all includes base-* only on request"
                );
            }
        }
    }
}
