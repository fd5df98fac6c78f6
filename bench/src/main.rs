//! `bench`: builds the lab, puts kernel forwarding, the engine and HAProxy in the
//! router one after the other, drives TCP and UDP load through each and prints the
//! comparison. See `bench --help`.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use ringrelay_bench::harness::{self, Config};
use ringrelay_bench::lab::{self, Lab};
use ringrelay_bench::load::Family;
use ringrelay_bench::report::Report;
use ringrelay_bench::targets::{fd_limit, Target, Tools, DEFAULT_PORT};

#[derive(Parser)]
#[command(
    name = "bench",
    version,
    about = "ringrelay benchmark: engine vs kernel forwarding vs HAProxy in a namespace lab (needs root)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Short run of every scenario on every target; tears the lab down at the end, on
    /// failure and on Ctrl-C. Writes demo.{json,md,svg} to the output directory.
    Demo {
        /// Shorter windows (0.5 s per variant instead of 2 s).
        #[arg(long)]
        quick: bool,
        /// Drive IPv6 instead of IPv4.
        #[arg(long)]
        ipv6: bool,
        /// Output directory (default: <cargo target dir>/bench).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Run chosen scenarios on chosen targets.
    Run(Box<RunArgs>),
    /// Soak one engine target under mixed hostile load (bulk, tcp-crr, tcp-rr, UDP,
    /// slow readers, RST storms at once), sampling fds, RSS, socket memory and the
    /// engine's counters every second; PASS (exit 0) when nothing grows and nothing
    /// leaks, FAIL (exit 1) with the reasons.
    Soak(SoakArgs),
    /// Build a lab and keep it (`up`), or delete kept or stale labs (`down`).
    Lab {
        #[command(subcommand)]
        action: LabCmd,
    },
}

#[derive(Subcommand)]
enum LabCmd {
    /// Build a lab and leave it up; prints its namespace names.
    Up,
    /// Delete a lab by prefix (`rr123x0`), or every lab whose process is gone.
    Down {
        /// Lab prefix as printed by `bench lab up`; a partial prefix matches all its labs.
        prefix: Option<String>,
    },
}

#[derive(Args)]
struct RunArgs {
    /// Scenario(s): tcp-bulk, tcp-crr, tcp-rr, udp-pps, udp-rr, comma-separated, or all.
    /// tcp-crr-idle is tcp-crr's idle variant (--idle-conns, default 2000): alone it
    /// runs without the plain tcp-crr, next to tcp-crr (or all) both run.
    /// tcp-capacity (only when named, not in all) opens connections until the target
    /// refuses or does not answer, or --conns are held, then measures the proxy's RSS
    /// and the router's socket memory per connection, idle and with up to 1000 of
    /// them stalled, checks that every one relays, and that closing leaks nothing.
    #[arg(long, default_value = "all")]
    scenario: String,
    /// Also run tcp-crr with N idle connections held open through the router during
    /// its window (variant `16 clients, idle N`), next to the plain one. The bench holds
    /// both ends (2 fds each); the proxy must hold N plus the clients: the engine
    /// about 9,400 at RLIMIT_NOFILE 20000 in either relay, HAProxy maxconn 7800. 2000
    /// fits every target.
    #[arg(long, value_name = "N")]
    idle_conns: Option<usize>,
    /// Target(s): direct, engine-splice, engine-copy, haproxy, base-splice, base-copy
    /// (these two need --baseline-engine), engine-rules10k, engine-sni,
    /// engine-clientip, comma-separated, or all (base-* only with --baseline-engine,
    /// the engine-splice variants only with --policy / --source-variant).
    #[arg(long, default_value = "all")]
    target: String,
    /// Add the policy variants of engine-splice to `all`: engine-rules10k (a rules
    /// file of 10,000 rules, the relaying one last) and engine-sni (one SNI rule; its
    /// tcp-crr and tcp-rr clients send a TLS ClientHello first; other scenarios are
    /// skipped there).
    #[arg(long)]
    policy: bool,
    /// Add engine-clientip to `all`: engine-splice with `engine --source client-ip`
    /// and `setup apply --source client-ip --in-iface veth-c`.
    #[arg(long)]
    source_variant: bool,
    /// Leave the client's and server's receive processing where veth puts it: on
    /// the core that sent the packet, so the proxy's core also runs the server's
    /// receive path for what the proxy sends, and the CPU figures include it. By
    /// default RPS steers it to the load and server cores.
    #[arg(long)]
    no_receive_steering: bool,
    /// An engine binary built from an older commit: adds the targets base-splice and
    /// base-copy (engine-splice / engine-copy run with this binary), for before/after
    /// figures taken side by side in one run.
    #[arg(long, value_name = "PATH")]
    baseline_engine: Option<PathBuf>,
    /// Measurement window per variant (5s, 0.5s, 500ms).
    #[arg(long, default_value = "5s")]
    duration: String,
    /// Repeat the whole target sequence this many times (targets alternate within a
    /// round); tables show the median round and the min-max spread.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Streams / connections / client threads / senders (default: per scenario).
    /// tcp-capacity: the most connections to open; by default as many as this
    /// process can hold: it holds both ends of each (2 fds), so (RLIMIT_NOFILE - 400)
    /// / 2, 9800 at 20000.
    #[arg(long)]
    conns: Option<usize>,
    /// Write / request / datagram size in bytes (default: per scenario; tcp-capacity:
    /// the relay check's message, 16).
    #[arg(long)]
    size: Option<usize>,
    /// Cores for the engine and HAProxy, e.g. `1` or `2-3` (default: the last core).
    #[arg(long)]
    engine_cores: Option<String>,
    /// Cores for client load threads (default: all but the engine's).
    #[arg(long)]
    load_cores: Option<String>,
    /// Cores for server threads (default: the load cores).
    #[arg(long)]
    server_cores: Option<String>,
    /// Drive IPv6 instead of IPv4.
    #[arg(long)]
    ipv6: bool,
    /// Transparent port for setup, engine and HAProxy.
    #[arg(long, default_value_t = DEFAULT_PORT)]
    port: u16,
    /// JSON output (default: <cargo target dir>/bench/results.json).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also write the Markdown table here.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Also write the SVG chart here.
    #[arg(long)]
    svg: Option<PathBuf>,
}

#[derive(Args)]
struct SoakArgs {
    /// Load window (20s, 3m, 10m; at most 60m).
    #[arg(long, default_value = "10m")]
    duration: String,
    /// engine-splice or engine-copy.
    #[arg(long, default_value = "engine-splice")]
    target: String,
    /// CSV of the samples (default: <cargo target dir>/bench/soak.csv).
    #[arg(long)]
    csv: Option<PathBuf>,
    /// SVG plot of fds, RSS, socket memory and active connections (default: next to
    /// the CSV).
    #[arg(long)]
    svg: Option<PathBuf>,
    /// Cores for the engine (default: the last core).
    #[arg(long)]
    engine_cores: Option<String>,
    /// Cores for the load's clients and servers (default: all but the engine's).
    #[arg(long)]
    load_cores: Option<String>,
    /// Drive IPv6 instead of IPv4.
    #[arg(long)]
    ipv6: bool,
    /// Transparent port.
    #[arg(long, default_value_t = DEFAULT_PORT)]
    port: u16,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = ringrelay_bench::install_signal_handlers() {
        eprintln!("bench: cannot install signal handlers: {e:#}");
        return ExitCode::FAILURE;
    }
    // The release profile aborts on panic, so no Drop would delete the namespaces:
    // do it from the hook.
    #[cfg(panic = "abort")]
    {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            prev(info);
            lab::cleanup_live_labs();
        }));
    }
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            if lab::is_need_root(&e) {
                eprintln!(
                    "bench: {e:#}\nbench: run it as root (sudo), it builds network namespaces"
                );
            } else {
                eprintln!("bench: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Cmd::Demo { quick, ipv6, out } => {
            let secs = if quick { 0.5 } else { 2.0 };
            let mut cfg = Config::all(std::time::Duration::from_secs_f64(secs));
            if ipv6 {
                cfg.family = Family::Ipv6;
            }
            let dir = out.unwrap_or_else(default_out_dir);
            let outputs = Outputs {
                json: dir.join("demo.json"),
                markdown: Some(dir.join("demo.md")),
                svg: Some(dir.join("demo.svg")),
            };
            run(&cfg, &outputs, None)
        }
        Cmd::Run(a) => {
            let (engine_cores, load_cores) =
                harness::engine_and_load_cores(a.engine_cores.as_deref(), a.load_cores.as_deref())?;
            let server_cores = match &a.server_cores {
                Some(s) => harness::parse_cores(s).context("--server-cores")?,
                None => load_cores.clone(),
            };
            let sel = harness::parse_scenarios(&a.scenario, a.idle_conns, fd_limit())?;
            let cfg = Config {
                scenarios: sel.scenarios,
                targets: {
                    let mut variants = Vec::new();
                    if a.policy {
                        variants.extend(Target::POLICY);
                    }
                    if a.source_variant {
                        variants.extend(Target::SOURCE_VARIANT);
                    }
                    harness::parse_targets_with(&a.target, a.baseline_engine.is_some(), &variants)?
                },
                duration: harness::parse_duration(&a.duration)?,
                conns: a.conns,
                size: a.size,
                idle_conns: sel.idle_conns,
                idle_only: sel.idle_only,
                engine_cores,
                load_cores,
                server_cores,
                family: if a.ipv6 { Family::Ipv6 } else { Family::Ipv4 },
                port: a.port,
                rounds: a.rounds,
                steer_receive: !a.no_receive_steering,
            };
            let outputs = Outputs {
                json: a
                    .json
                    .unwrap_or_else(|| default_out_dir().join("results.json")),
                markdown: a.markdown,
                svg: a.svg,
            };
            run(&cfg, &outputs, a.baseline_engine.as_deref())
        }
        Cmd::Soak(a) => soak(&a),
        Cmd::Lab { action: LabCmd::Up } => {
            let lab = Lab::up()?;
            let names: Vec<String> = lab
                .namespaces()
                .iter()
                .map(|n| n.name().to_string())
                .collect();
            let prefix = lab.keep();
            println!("{prefix}");
            eprintln!(
                "lab {prefix} is up: namespaces {}\n  e.g. ip netns exec {} bash\n  remove with: bench lab down {prefix}",
                names.join(" "),
                names[1]
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Lab {
            action: LabCmd::Down { prefix },
        } => {
            let deleted = match prefix {
                Some(p) => Lab::down_by_prefix(&p)?,
                None => Lab::down_stale()?,
            };
            if deleted.is_empty() {
                eprintln!("no lab namespaces to delete");
            } else {
                eprintln!("deleted {}", deleted.join(" "));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `bench soak`: the lab and the armed engine are dropped (torn down) on every path
/// out of `soak::run`; the outputs are written after.
fn soak(a: &SoakArgs) -> anyhow::Result<ExitCode> {
    use ringrelay_bench::soak;
    let target = Target::parse(&a.target)
        .filter(|t| matches!(t, Target::EngineSplice | Target::EngineCopy))
        .ok_or_else(|| anyhow::anyhow!("--target: engine-splice or engine-copy"))?;
    let duration = harness::parse_duration(&a.duration)?;
    let (engine_cores, load_cores) =
        harness::engine_and_load_cores(a.engine_cores.as_deref(), a.load_cores.as_deref())?;
    let cfg = soak::SoakConfig {
        target,
        duration,
        mix: soak::Mix::DEFAULT,
        server_cores: load_cores.clone(),
        engine_cores,
        load_cores,
        family: if a.ipv6 { Family::Ipv6 } else { Family::Ipv4 },
        port: a.port,
    };
    let csv = a
        .csv
        .clone()
        .unwrap_or_else(|| default_out_dir().join("soak.csv"));
    let svg = a.svg.clone().unwrap_or_else(|| csv.with_extension("svg"));
    let tools = Tools::discover();
    if let Err(why) = tools.missing_for(target).map_or(Ok(()), Err) {
        anyhow::bail!("{} cannot run: {why}", target.name());
    }
    if tools.engine_build() == "debug" {
        eprintln!("bench: warning: the engine is a DEBUG build");
    }
    eprintln!(
        "bench: soak {} for {:.0} s, engine cores {:?}, load cores {:?}",
        target.name(),
        duration.as_secs_f64(),
        cfg.engine_cores,
        cfg.load_cores
    );
    let lab = Lab::up()?;
    eprintln!("bench: lab {} up", lab.prefix());
    let res = soak::run(&lab, &cfg, &tools, &mut |l| eprintln!("bench: {l}"));
    drop(lab);
    let res = res?;
    for n in &res.notes {
        eprintln!("bench: engine: {n}");
    }
    let write = |p: &Path, text: String| -> anyhow::Result<()> {
        if let Some(d) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(d).with_context(|| format!("mkdir {}", d.display()))?;
        }
        std::fs::write(p, text).with_context(|| format!("writing {}", p.display()))?;
        eprintln!("bench: wrote {}", p.display());
        Ok(())
    };
    let line = res.verdict.summary_line();
    write(&csv, soak::to_csv(&res.samples))?;
    let title = format!(
        "bench soak: {} for {:.0} s, {}",
        target.name(),
        duration.as_secs_f64(),
        cfg.family.name()
    );
    write(&svg, soak::to_svg(&res.samples, &title, &line))?;
    println!("{line}");
    if res.interrupted {
        eprintln!("bench: interrupted; lab torn down");
        return Ok(ExitCode::from(130));
    }
    Ok(if res.verdict.pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

struct Outputs {
    json: PathBuf,
    markdown: Option<PathBuf>,
    svg: Option<PathBuf>,
}

/// Builds the lab, runs the matrix, writes the outputs, prints the table. The lab is
/// dropped (children killed, namespaces deleted) on every path out of here.
fn run(cfg: &Config, outputs: &Outputs, baseline: Option<&Path>) -> anyhow::Result<ExitCode> {
    let mut tools = Tools::discover();
    if let Some(p) = baseline {
        tools = tools.with_baseline_engine(p);
    }
    let mut found = vec![
        ("engine", &tools.engine),
        ("setup", &tools.setup),
        ("haproxy", &tools.haproxy),
    ];
    if let Some(b) = &tools.baseline_engine {
        found.push(("baseline engine", b));
    }
    for (name, found) in found {
        match found {
            Ok(p) => eprintln!("bench: {name}: {}", p.display()),
            Err(why) => eprintln!("bench: {name}: unavailable: {why}"),
        }
    }
    eprintln!(
        "bench: pinning: engine cores {:?}, load cores {:?}, server cores {:?}; {} s per variant, {}",
        cfg.engine_cores,
        cfg.load_cores,
        cfg.server_cores,
        cfg.duration.as_secs_f64(),
        cfg.family.name()
    );
    let lab = Lab::up()?;
    eprintln!("bench: lab {} up", lab.prefix());
    let report = harness::run_matrix(&lab, cfg, &tools, &mut |line| eprintln!("bench: {line}"));
    drop(lab);
    write_outputs(&report, outputs)?;
    println!("{}", report.to_markdown());
    if report.interrupted {
        eprintln!("bench: interrupted; lab torn down");
        return Ok(ExitCode::from(130));
    }
    Ok(if report.all_ran() {
        ExitCode::SUCCESS
    } else {
        eprintln!("bench: some scenarios FAILED (see the table)");
        ExitCode::FAILURE
    })
}

fn write_outputs(report: &Report, o: &Outputs) -> anyhow::Result<()> {
    let write = |p: &Path, text: String| -> anyhow::Result<()> {
        if let Some(d) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(d).with_context(|| format!("mkdir {}", d.display()))?;
        }
        std::fs::write(p, text).with_context(|| format!("writing {}", p.display()))?;
        eprintln!("bench: wrote {}", p.display());
        Ok(())
    };
    write(&o.json, report.to_json())?;
    if let Some(p) = &o.markdown {
        write(p, report.to_markdown())?;
    }
    if let Some(p) = &o.svg {
        write(p, report.to_svg())?;
    }
    Ok(())
}

/// `<target>/bench` when running from a cargo target directory (it carries
/// CACHEDIR.TAG), else `./bench-results`.
fn default_out_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| {
            exe.ancestors()
                .skip(1)
                .take(3)
                .find(|d| d.join("CACHEDIR.TAG").is_file())
                .map(|d| d.join("bench"))
        })
        .unwrap_or_else(|| PathBuf::from("bench-results"))
}
