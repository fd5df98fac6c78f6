//! Results: one [`Record`] per scenario variant and target, the [`Env`] they were
//! measured in, and renderers for JSON, a Markdown table and a hand-written SVG chart.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde::Serialize;

use crate::capacity::Capacity;
use crate::cpu::CpuUse;
use crate::load::{IdleConns, Scenario};
use crate::targets::Target;

/// A table row: scenario and variant label.
type Row = (Scenario, String);

/// Outcome class of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Measured.
    Ok,
    /// Not run, for the reason given (a tool missing, HAProxy and UDP...).
    Skipped,
    /// Tried and broke (proxy did not start, traffic not intercepted, errors...).
    Failed,
}

/// One scenario variant on one target.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    /// `tcp-bulk`, `tcp-crr`, `tcp-rr`, `udp-pps`, `udp-rr`.
    pub scenario: Scenario,
    /// Variant label (`4 streams`, `64 B`...).
    pub variant: String,
    /// `direct`, `engine-splice`, `engine-copy`, `base-splice`, `base-copy`, `haproxy`.
    pub target: Target,
    /// Relay mode: `kernel-forwarding`, `splice`, `copy`, `haproxy-splice-auto`.
    pub relay: String,
    /// `ipv4` or `ipv6`.
    pub family: String,
    /// Ok, skipped or failed.
    pub status: Status,
    /// Why skipped or failed.
    pub reason: Option<String>,
    /// Measurement window, seconds.
    pub duration_s: f64,
    /// Streams, connections, client threads or senders.
    pub conns: usize,
    /// Write, request or datagram size in bytes.
    pub size: usize,
    /// Idle connections held open through the router during the window (`tcp-crr`'s
    /// idle variant, `--idle-conns`); 0 for every other variant.
    pub idle_conns: usize,
    /// What became of them (`null` without idle connections, or when not run).
    pub idle: Option<IdleConns>,
    /// `tcp-capacity`'s connections and memory figures (`null` for other scenarios,
    /// or when not run).
    pub capacity: Option<Capacity>,
    /// Payload throughput (tcp-bulk: server-side; udp-pps: delivered).
    pub gbit_s: Option<f64>,
    /// Connections per second (tcp-crr).
    pub conn_s: Option<f64>,
    /// Requests per second (tcp-rr, udp-rr).
    pub req_s: Option<f64>,
    /// Delivered datagrams per second (udp-pps).
    pub pps: Option<f64>,
    /// Fraction of sent datagrams not delivered (udp-pps).
    pub loss: Option<f64>,
    /// Latency percentiles in microseconds (crr: whole connection; rr: one request).
    pub p50_us: Option<f64>,
    /// 99th percentile latency, µs.
    pub p99_us: Option<f64>,
    /// 99.9th percentile latency, µs.
    pub p999_us: Option<f64>,
    /// Total errors (resets, timeouts, wrong reply source...).
    pub errors: u64,
    /// Errors by kind.
    pub error_kinds: BTreeMap<String, u64>,
    /// Payload bytes counted for the rate.
    pub bytes: u64,
    /// Completed operations (connections, requests, datagrams).
    pub ops: u64,
    /// Datagrams sent (udp-pps).
    pub sent: Option<u64>,
    /// Source addresses the server saw: the client's own, or the proxy's.
    pub server_saw: Vec<String>,
    /// Whether the router held sockets on the server's port (a proxy intercepted the
    /// flow); `None` when that cannot be told.
    pub intercepted: Option<bool>,
    /// Which round (0-based) of a `--rounds N` run produced this record.
    pub round: usize,
    /// Busy time of the proxy's cores (`env.engine_cores`) over the window and per
    /// unit of work; for `direct` the same cores with no proxy on them.
    pub cpu: Option<CpuUse>,
}

impl Record {
    /// A record for something not measured.
    pub fn not_run(
        scenario: Scenario,
        variant: &crate::load::Variant,
        target: Target,
        family: &str,
        status: Status,
        reason: String,
    ) -> Record {
        Record {
            scenario,
            variant: variant.label.clone(),
            target,
            relay: target.relay().to_string(),
            family: family.to_string(),
            status,
            reason: Some(reason),
            duration_s: 0.0,
            conns: variant.conns,
            size: variant.size,
            idle_conns: variant.idle,
            idle: None,
            capacity: None,
            gbit_s: None,
            conn_s: None,
            req_s: None,
            pps: None,
            loss: None,
            p50_us: None,
            p99_us: None,
            p999_us: None,
            errors: 0,
            error_kinds: BTreeMap::new(),
            bytes: 0,
            ops: 0,
            sent: None,
            server_saw: Vec::new(),
            intercepted: None,
            round: 0,
            cpu: None,
        }
    }

    /// The scenario's headline figure (higher is better for all of them).
    pub fn headline(&self) -> Option<f64> {
        match self.scenario {
            Scenario::TcpBulk => self.gbit_s,
            Scenario::TcpCrr => self.conn_s,
            Scenario::TcpRr | Scenario::UdpRr => self.req_s,
            Scenario::UdpPps => self.pps,
            Scenario::TcpCapacity => self.capacity.as_ref().map(|c| c.held as f64),
        }
    }

    /// CPU per unit of work on the proxy's cores (lower is better).
    pub fn cpu_per_unit(&self) -> Option<f64> {
        self.cpu.as_ref()?.per_unit
    }

    /// Row key: scenario and variant.
    pub fn row(&self) -> (Scenario, String) {
        (self.scenario, self.variant.clone())
    }
}

/// Where the numbers come from (style lesson 12: record the environment).
#[derive(Debug, Clone, Serialize, Default)]
pub struct Env {
    /// `uname -srvm` equivalent.
    pub kernel: String,
    /// `model name` from /proc/cpuinfo.
    pub cpu_model: String,
    /// Online CPUs.
    pub cpus: usize,
    /// Cores the engine (and HAProxy's threads) are pinned to.
    pub engine_cores: Vec<usize>,
    /// Cores the client load threads are pinned to.
    pub load_cores: Vec<usize>,
    /// Cores the server threads are pinned to.
    pub server_cores: Vec<usize>,
    /// Cores the client's and server's receive processing was steered to (RPS);
    /// `None`: not steered, it ran where the packets were sent from.
    pub receive_steering: Option<Vec<usize>>,
    /// `ipv4` or `ipv6`.
    pub family: String,
    /// Measurement window per variant, seconds.
    pub duration_s: f64,
    /// Rounds over all targets; tables show the median round of each cell.
    pub rounds: usize,
    /// Engine binary and its build profile.
    pub engine: Option<String>,
    /// `release`, `debug` or `unknown`.
    pub engine_build: String,
    /// The `--baseline-engine` binary (targets `base-splice`, `base-copy`).
    pub baseline_engine: Option<String>,
    /// Its build profile.
    pub baseline_engine_build: Option<String>,
    /// The engines' startup output (ring flags): the current engine's per relay
    /// mode (`splice`, `copy`), the baseline's per target (`base-splice`...).
    pub engine_startup: BTreeMap<String, Vec<String>>,
    /// Tick rate of `/proc/stat` (USER_HZ) behind the records' `cpu` figures.
    pub user_hz: u64,
    /// Setup binary.
    pub setup: Option<String>,
    /// `haproxy -v`.
    pub haproxy: Option<String>,
    /// RLIMIT_NOFILE.
    pub fd_limit: u64,
    /// The bench command line.
    pub command: String,
    /// Seconds since the epoch at the start.
    pub unix_time: u64,
}

impl Env {
    /// Reads kernel and CPU facts from /proc.
    pub fn probe() -> Env {
        let read = |p: &str| {
            std::fs::read_to_string(p)
                .map(|s| s.trim().to_string())
                .unwrap_or_default()
        };
        let kernel = format!(
            "{} {} {} {}",
            read("/proc/sys/kernel/ostype"),
            read("/proc/sys/kernel/osrelease"),
            read("/proc/sys/kernel/version"),
            std::env::consts::ARCH
        );
        let cpuinfo = read("/proc/cpuinfo");
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        Env {
            kernel,
            cpu_model,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            fd_limit: crate::targets::fd_limit(),
            command: std::env::args().collect::<Vec<_>>().join(" "),
            unix_time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            ..Env::default()
        }
    }

    /// The lines of the engine's startup output that describe its rings (or, failing
    /// that, its `ready` line).
    pub fn ring_flags(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (mode, lines) in &self.engine_startup {
            let picked: Vec<&String> = lines
                .iter()
                .filter(|l| {
                    let l = l.to_ascii_lowercase();
                    l.contains("ring") || l.contains("flag") || l.contains("setup")
                })
                .collect();
            let picked = if picked.is_empty() {
                lines.iter().filter(|l| l.starts_with("ready")).collect()
            } else {
                picked
            };
            for l in picked {
                out.push(format!("{mode}: {l}"));
            }
        }
        out
    }
}

/// Everything one `bench` run produced.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Report {
    /// The environment.
    pub env: Env,
    /// One record per scenario variant and target.
    pub records: Vec<Record>,
    /// Warnings worth reading.
    pub notes: Vec<String>,
    /// What each proxy printed when it stopped (the engine's counters), by target.
    pub proxy_summaries: BTreeMap<String, Vec<String>>,
    /// True when Ctrl-C / SIGTERM cut the run short.
    pub interrupted: bool,
}

impl Report {
    /// True when every record was measured or skipped for a stated reason, and the
    /// run was not interrupted.
    pub fn all_ran(&self) -> bool {
        !self.interrupted && self.records.iter().all(|r| r.status != Status::Failed)
    }

    /// Pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a report always serializes")
    }

    fn targets(&self) -> Vec<Target> {
        let set: BTreeSet<Target> = self.records.iter().map(|r| r.target).collect();
        set.into_iter().collect()
    }

    fn rows(&self) -> Vec<(Scenario, String)> {
        let mut seen = Vec::new();
        for r in &self.records {
            if !seen.contains(&r.row()) {
                seen.push(r.row());
            }
        }
        seen
    }

    /// The record of a table cell: with several rounds, the measured one with the
    /// median headline (its latencies come from the same run); else the first.
    fn find(&self, row: &(Scenario, String), t: Target) -> Option<&Record> {
        let mut ok: Vec<&Record> = self
            .cell(row, t)
            .filter(|r| r.status == Status::Ok)
            .collect();
        if ok.is_empty() {
            return self.cell(row, t).next();
        }
        ok.sort_by(|a, b| {
            a.headline()
                .unwrap_or(0.0)
                .total_cmp(&b.headline().unwrap_or(0.0))
        });
        Some(ok[(ok.len() - 1) / 2])
    }

    fn cell(&self, row: &(Scenario, String), t: Target) -> impl Iterator<Item = &Record> + '_ {
        let row = row.clone();
        self.records
            .iter()
            .filter(move |r| r.row() == row && r.target == t)
    }

    /// (min, max) headline over the measured rounds of a cell, when there are several.
    fn spread(&self, row: &(Scenario, String), t: Target) -> Option<(f64, f64)> {
        let v: Vec<f64> = self
            .cell(row, t)
            .filter(|r| r.status == Status::Ok)
            .filter_map(|r| r.headline())
            .collect();
        (v.len() > 1).then(|| {
            v.iter()
                .fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)))
        })
    }

    /// Markdown: the environment header, the headline table with ratios to kernel
    /// forwarding and to HAProxy, a latency table, and what was skipped or failed.
    pub fn to_markdown(&self) -> String {
        let mut s = String::new();
        let e = &self.env;
        let _ = writeln!(s, "| | |\n|---|---|");
        let _ = writeln!(s, "| kernel | {} |", e.kernel);
        let _ = writeln!(s, "| CPU | {} ({} online) |", e.cpu_model, e.cpus);
        let _ = writeln!(
            s,
            "| pinning | engine/HAProxy cores {:?}, load cores {:?}, server cores {:?} |",
            e.engine_cores, e.load_cores, e.server_cores
        );
        let _ = match &e.receive_steering {
            Some(c) => writeln!(
                s,
                "| receive steering | client and server `eth0` RPS to cores {c:?}: their \
                 stacks' receive work stays off the proxy cores |"
            ),
            None => writeln!(
                s,
                "| receive steering | off: what the proxy sends is received by the peer's \
                 stack on the proxy's core, and billed to it |"
            ),
        };
        let _ = writeln!(
            s,
            "| family, window | {}, {:.1} s per variant, {} round(s): median shown{} |",
            e.family,
            e.duration_s,
            e.rounds.max(1),
            if e.rounds > 1 { " (min-max)" } else { "" }
        );
        let _ = writeln!(
            s,
            "| engine | {} ({} build) |",
            e.engine.as_deref().unwrap_or("not available"),
            e.engine_build
        );
        if let Some(b) = &e.baseline_engine {
            let _ = writeln!(
                s,
                "| baseline engine | {b} ({} build) |",
                e.baseline_engine_build.as_deref().unwrap_or("unknown")
            );
        }
        for l in e.ring_flags() {
            let _ = writeln!(s, "| engine startup | `{}` |", l.replace('|', "\\|"));
        }
        let _ = writeln!(
            s,
            "| HAProxy | {} |",
            e.haproxy.as_deref().unwrap_or("not available")
        );
        let _ = writeln!(s, "| fd limit | {} |", e.fd_limit);
        let _ = writeln!(
            s,
            "| CPU figures | busy time of cores {:?} from /proc/stat, USER_HZ {} |",
            e.engine_cores, e.user_hz
        );
        let _ = writeln!(s);

        let targets = self.targets();
        let _ = write!(s, "| scenario | unit |");
        for t in &targets {
            let _ = write!(s, " {} |", t.name());
        }
        let ratios = self.ratio_columns();
        for (name, _, _) in &ratios {
            let _ = write!(s, " {name} |");
        }
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "|---|---|{}",
            "---:|".repeat(targets.len() + ratios.len())
        );
        for row in self.rows() {
            let _ = write!(s, "| {} {} | {} |", row.0.name(), row.1, row.0.headline().1);
            for t in &targets {
                let cell = match self.find(&row, *t) {
                    Some(r) if r.status == Status::Ok => {
                        let mut c = r.headline().map_or("-".into(), fmt_num);
                        if let Some((lo, hi)) = self.spread(&row, *t) {
                            let _ = write!(c, " ({}-{})", fmt_num(lo), fmt_num(hi));
                        }
                        if let Some(loss) = r.loss.filter(|l| *l > 0.0005) {
                            let _ = write!(c, " ({:.1}% loss)", loss * 100.0);
                        }
                        if r.errors > 0 {
                            let _ = write!(c, " ({} err)", r.errors);
                        }
                        c
                    }
                    Some(r) if r.status == Status::Skipped => "skipped".into(),
                    Some(_) => "FAILED".into(),
                    None => "".into(),
                };
                let _ = write!(s, " {cell} |");
            }
            for (_, a, b) in &ratios {
                let cell = self
                    .ratio(&row, *a, *b)
                    .map_or("".into(), |x| format!("{x:.2}x"));
                let _ = write!(s, " {cell} |");
            }
            let _ = writeln!(s);
        }

        self.cpu_table(&mut s, &targets);
        self.idle_table(&mut s, &targets);
        self.capacity_table(&mut s, &targets);

        let lat_rows: Vec<_> = self
            .rows()
            .into_iter()
            .filter(|r| matches!(r.0, Scenario::TcpCrr | Scenario::TcpRr | Scenario::UdpRr))
            .collect();
        if !lat_rows.is_empty() {
            let _ = writeln!(
                s,
                "\nLatency, µs (p50 / p99 / p99.9; tcp-crr: whole connection):\n"
            );
            let _ = write!(s, "| scenario |");
            for t in &targets {
                let _ = write!(s, " {} |", t.name());
            }
            let _ = writeln!(s, "\n|---|{}", "---:|".repeat(targets.len()));
            for row in lat_rows {
                let _ = write!(s, "| {} {} |", row.0.name(), row.1);
                for t in &targets {
                    let cell = match self.find(&row, *t) {
                        Some(r) if r.status == Status::Ok => format!(
                            "{} / {} / {}",
                            r.p50_us.map_or("-".into(), fmt_num),
                            r.p99_us.map_or("-".into(), fmt_num),
                            r.p999_us.map_or("-".into(), fmt_num)
                        ),
                        _ => "".into(),
                    };
                    let _ = write!(s, " {cell} |");
                }
                let _ = writeln!(s);
            }
        }

        let not_ok: Vec<&Record> = self
            .records
            .iter()
            .filter(|r| r.status != Status::Ok)
            .collect();
        if !not_ok.is_empty() {
            let _ = writeln!(s, "\nNot measured:\n");
            // One line per (target, status, reason), listing the scenarios it hit.
            let mut grouped: BTreeMap<(Target, String, String), Vec<String>> = BTreeMap::new();
            for r in not_ok {
                let rows = grouped
                    .entry((
                        r.target,
                        format!("{:?}", r.status).to_lowercase(),
                        r.reason.clone().unwrap_or_default(),
                    ))
                    .or_default();
                // A skip repeats identically every round; a failure says which round.
                let row = if self.env.rounds > 1 && r.status == Status::Failed {
                    format!("{} {} round {}", r.scenario.name(), r.variant, r.round + 1)
                } else {
                    format!("{} {}", r.scenario.name(), r.variant)
                };
                if !rows.contains(&row) {
                    rows.push(row);
                }
            }
            for ((t, st, why), rows) in grouped {
                let _ = writeln!(s, "- {} {st} ({}): {why}", t.name(), rows.join(", "));
            }
        }
        if !self.notes.is_empty() {
            let _ = writeln!(s, "\nNotes:\n");
            for n in &self.notes {
                let _ = writeln!(s, "- {}", n.replace('\n', " "));
            }
        }
        for (t, lines) in &self.proxy_summaries {
            let _ = writeln!(s, "\n{t} exit summary:\n\n```\n{}\n```", lines.join("\n"));
        }
        if self.interrupted {
            let _ = writeln!(s, "\n**Interrupted**: the run was cut short.");
        }
        s
    }

    /// Ratio columns that have data: engine vs kernel, vs HAProxy, vs the baseline
    /// engine (before/after), and HAProxy vs kernel.
    fn ratio_columns(&self) -> Vec<(String, Target, Target)> {
        let mut v = self.pairs(&[Target::Direct, Target::Haproxy]);
        if self.targets().contains(&Target::Haproxy) && self.targets().contains(&Target::Direct) {
            v.push(("haproxy / direct".into(), Target::Haproxy, Target::Direct));
        }
        v
    }

    /// CPU ratio columns: engine vs HAProxy and vs the baseline engine. None against
    /// `direct`: no proxy runs on the cores then.
    fn cpu_ratio_columns(&self) -> Vec<(String, Target, Target)> {
        self.pairs(&[Target::Haproxy])
    }

    /// `(label, engine, other)` for each engine target and each of `others`, then its
    /// baseline twin (before/after), that both have records.
    fn pairs(&self, others: &[Target]) -> Vec<(String, Target, Target)> {
        let have = self.targets();
        let mut v = Vec::new();
        for e in [Target::EngineSplice, Target::EngineCopy] {
            for base in others.iter().copied().chain(e.baseline()) {
                if have.contains(&e) && have.contains(&base) {
                    v.push((format!("{} / {}", e.name(), base.name()), e, base));
                }
            }
        }
        // Each variant of engine-splice against engine-splice itself.
        for t in Target::SPLICE_VARIANTS {
            if have.contains(&t) && have.contains(&Target::EngineSplice) {
                let e = Target::EngineSplice;
                v.push((format!("{} / {}", t.name(), e.name()), t, e));
            }
        }
        v
    }

    /// The record of a CPU cell: the measured round with the median CPU per unit,
    /// and the min-max over the rounds when there are several (the rate's treatment).
    fn cpu_find(
        &self,
        row: &(Scenario, String),
        t: Target,
    ) -> Option<(&Record, Option<(f64, f64)>)> {
        let mut ok: Vec<(&Record, f64)> = self
            .cell(row, t)
            .filter(|r| r.status == Status::Ok)
            .filter_map(|r| Some((r, r.cpu_per_unit()?)))
            .collect();
        if ok.is_empty() {
            return None;
        }
        ok.sort_by(|a, b| a.1.total_cmp(&b.1));
        let spread = (ok.len() > 1).then(|| (ok[0].1, ok[ok.len() - 1].1));
        Some((ok[(ok.len() - 1) / 2].0, spread))
    }

    fn cpu_ratio(&self, row: &(Scenario, String), a: Target, b: Target) -> Option<f64> {
        let va = self.cpu_find(row, a)?.0.cpu_per_unit()?;
        let vb = self.cpu_find(row, b)?.0.cpu_per_unit()?;
        (vb > 0.0).then(|| va / vb)
    }

    /// The CPU-per-unit table: one row per scenario variant, one column per target
    /// (median, min-max, the cores' busy share), then ratios.
    fn cpu_table(&self, s: &mut String, targets: &[Target]) {
        let rows = self.rows();
        let any = rows
            .iter()
            .any(|row| targets.iter().any(|t| self.cpu_find(row, *t).is_some()));
        if !any {
            return;
        }
        let cores = &self.env.engine_cores;
        let _ = writeln!(
            s,
            "\nCPU per unit of work on the proxy core(s) {cores:?} (lower is better): their busy \
             time over the window, from /proc/stat, divided by the work counted; after the \
             comma, their busy share of the window:\n"
        );
        let ratios = self.cpu_ratio_columns();
        let _ = write!(s, "| scenario | CPU/unit |");
        for t in targets {
            let mark = if *t == Target::Direct { "†" } else { "" };
            let _ = write!(s, " {}{mark} |", t.name());
        }
        for (name, _, _) in &ratios {
            let _ = write!(s, " {name} |");
        }
        let _ = writeln!(
            s,
            "\n|---|---|{}",
            "---:|".repeat(targets.len() + ratios.len())
        );
        for row in &rows {
            let _ = write!(s, "| {} {} | {} |", row.0.name(), row.1, row.0.cpu_unit());
            for t in targets {
                let cell = match self.cpu_find(row, *t) {
                    Some((r, spread)) => {
                        let c = r.cpu.as_ref().expect("cpu_find returns records with cpu");
                        let mut cell = fmt_num(c.per_unit.unwrap_or(0.0));
                        if let Some((lo, hi)) = spread {
                            let _ = write!(cell, " ({}-{})", fmt_num(lo), fmt_num(hi));
                        }
                        let _ = write!(cell, ", {:.0}%", c.util * 100.0);
                        if c.contended {
                            cell.push_str(" ‡");
                        }
                        cell
                    }
                    None => self.status_word(row, *t),
                };
                let _ = write!(s, " {cell} |");
            }
            for (_, a, b) in &ratios {
                let cell = self
                    .cpu_ratio(row, *a, *b)
                    .map_or("".into(), |x| format!("{x:.2}x"));
                let _ = write!(s, " {cell} |");
            }
            let _ = writeln!(s);
        }
        let contended = rows.iter().any(|row| {
            targets.iter().any(|t| {
                self.cpu_find(row, *t)
                    .and_then(|(r, _)| r.cpu.as_ref())
                    .is_some_and(|c| c.contended)
            })
        });
        if contended {
            let _ = writeln!(
                s,
                "\n‡ other work ran on cores {cores:?} in this window: the proxy's own process \
                 took less than {:.0}% of their busy time (`cpu.proxy_s` vs `cpu.busy_s`), or, \
                 with no proxy, they were more than {:.0}% busy. On a shared machine that is \
                 usually someone else's process; the figure overstates the cost. Rerun.",
                crate::cpu::MIN_PROXY_SHARE * 100.0,
                crate::cpu::MAX_UTIL_WITHOUT_PROXY * 100.0
            );
        }
        if targets.contains(&Target::Direct) {
            let _ = writeln!(
                s,
                "\n† direct: no proxy runs on cores {cores:?}; this is what landed there anyway \
                 (softirq, stray threads) per unit of work. On veth the kernel forwards in the \
                 sending thread's softirq, on the load and server cores, so it is not the cost \
                 of kernel forwarding; no ratio is taken against it."
            );
        }
    }

    /// Rows with idle connections, each with its twin without them (same scenario,
    /// clients and size): `(idle row, plain row, idle connections)`.
    fn idle_pairs(&self) -> Vec<(Row, Row, usize)> {
        let mut out = Vec::new();
        for r in self.records.iter().filter(|r| r.idle_conns > 0) {
            let twin = self.records.iter().find(|p| {
                p.idle_conns == 0
                    && p.scenario == r.scenario
                    && p.conns == r.conns
                    && p.size == r.size
            });
            if let Some(p) = twin {
                let pair = (r.row(), p.row(), r.idle_conns);
                if !out.contains(&pair) {
                    out.push(pair);
                }
            }
        }
        out
    }

    /// With and without idle connections side by side, per target: what holding
    /// them costs each new connection on the proxy's core(s), and the rate.
    fn idle_table(&self, s: &mut String, targets: &[Target]) {
        for (idle_row, plain_row, n) in self.idle_pairs() {
            let _ = writeln!(
                s,
                "\n{} {} with and without {n} idle connections held open through the router \
                 (row `{}`): CPU per connection on the proxy core(s) {:?}, and the rate:\n",
                plain_row.0.name(),
                plain_row.1,
                idle_row.1,
                self.env.engine_cores
            );
            let unit = idle_row.0.cpu_unit();
            let rate = idle_row.0.headline().1;
            let _ = writeln!(
                s,
                "| target | {unit}, no idle | {unit}, idle {n} | idle / no idle | {rate}, no idle \
                 | {rate}, idle {n} | idle held |\n|---|---:|---:|---:|---:|---:|---:|"
            );
            for t in targets {
                // The median round's figure, and whether other work shared the core.
                let cpu = |row: &Row| {
                    let c = self.cpu_find(row, *t)?.0.cpu.as_ref()?;
                    Some((c.per_unit?, c.contended))
                };
                let (without, with) = (cpu(&plain_row), cpu(&idle_row));
                let cell = |row: &Row, v: Option<(f64, bool)>| match v {
                    Some((v, contended)) => {
                        format!("{}{}", fmt_num(v), if contended { " ‡" } else { "" })
                    }
                    None => self.status_word(row, *t),
                };
                let rate_cell = |row: &Row| match self.find(row, *t) {
                    Some(r) if r.status == Status::Ok => r.headline().map_or("-".into(), fmt_num),
                    _ => self.status_word(row, *t),
                };
                let ratio = match (without, with) {
                    (Some((a, _)), Some((b, _))) if a > 0.0 && *t != Target::Direct => {
                        format!("{:.2}x", b / a)
                    }
                    _ => "".into(),
                };
                let held = self
                    .find(&idle_row, *t)
                    .and_then(|r| Some((r.idle.as_ref()?.held, r.idle_conns)))
                    .map_or("".into(), |(h, n)| format!("{h}/{n}"));
                let mark = if *t == Target::Direct { "†" } else { "" };
                let _ = writeln!(
                    s,
                    "| {}{mark} | {} | {} | {ratio} | {} | {} | {held} |",
                    t.name(),
                    cell(&plain_row, without),
                    cell(&idle_row, with),
                    rate_cell(&plain_row),
                    rate_cell(&idle_row),
                );
            }
        }
    }

    /// `tcp-capacity`, one table per row (there is one unless `--conns` varies): per
    /// target the connections held, why opening stopped, memory per connection idle
    /// and stalled, the relay check and what was left after closing.
    fn capacity_table(&self, s: &mut String, targets: &[Target]) {
        let rows: Vec<Row> = self
            .rows()
            .into_iter()
            .filter(|r| r.0 == Scenario::TcpCapacity)
            .collect();
        for row in rows {
            let _ = writeln!(
                s,
                "\ntcp-capacity (row `{} {}`): connections held open through the router, \
                 each relaying a byte each way when opened; memory per connection, idle and \
                 stalled (the server writing, the client not reading). Socket memory: the \
                 router's skmem r + t + w; pipes: the engine's splice pipes in use × their \
                 size:\n",
                row.0.name(),
                row.1
            );
            let _ = writeln!(
                s,
                "| target | conns held | stopped by | RSS / idle conn | socket mem / idle conn \
                 | socket mem / stalled conn | pipes / stalled conn | RSS / stalled conn | relay \
                 check | after close |\n|---|---:|---|---:|---:|---:|---:|---:|---:|---|"
            );
            let mut capped = Vec::new();
            for t in targets {
                let Some(r) = self.find(&row, *t) else {
                    continue;
                };
                let Some(c) = r.capacity.as_ref() else {
                    let _ = writeln!(
                        s,
                        "| {} | {} | | | | | | | | |",
                        t.name(),
                        self.status_word(&row, *t)
                    );
                    continue;
                };
                let na = fmt_opt_bytes;
                let mut stop = c
                    .stop
                    .map_or("?", crate::capacity::StopReason::describe)
                    .to_string();
                if let Some(l) = c.proxy_limit {
                    let _ = write!(stop, " (limit {l})");
                }
                let stalled = match c.skmem_per_stalled_conn {
                    Some(v) => {
                        let mut cell = format!("{} ({} stalled", fmt_bytes(v), c.stalled);
                        if let Some(why) = &c.stall_capped {
                            capped.push(format!("{}: {why}", t.name()));
                            cell.push_str(" ‡");
                        }
                        cell.push(')');
                        cell
                    }
                    None => match &c.stall_capped {
                        Some(why) => {
                            capped.push(format!("{}: {why}", t.name()));
                            "none ‡".into()
                        }
                        None => "n/a".into(),
                    },
                };
                let pipes = match (c.pipes_per_stalled_conn, c.pipe_bytes_per_stalled_conn) {
                    (Some(p), Some(b)) => format!("{p:.2} = {}", fmt_bytes(b)),
                    _ => "n/a".into(),
                };
                let relay = if c.relay_failed == 0 {
                    format!("{} ok", c.relay_ok)
                } else {
                    format!("{} ok, {} FAILED", c.relay_ok, c.relay_failed)
                };
                let after = c.after_close();
                let skmem_idle = match c.skmem_per_idle_conn {
                    Some(v) => fmt_bytes(v),
                    None if !t.is_proxy() => "n/a (no router socket)".into(),
                    None => "n/a".into(),
                };
                let _ = writeln!(
                    s,
                    "| {} | {} in {:.1} s | {stop} | {} | {skmem_idle} | {stalled} | {pipes} | {} \
                     | {relay} | {after} |",
                    t.name(),
                    c.held,
                    c.open_s,
                    na(c.rss_per_idle_conn),
                    na(c.rss_per_stalled_conn),
                );
            }
            for c in capped {
                let _ = writeln!(s, "\n‡ {c}");
            }
        }
    }

    /// `skipped`, `FAILED`, `-` (measured, no figure) or empty (not in the run), for
    /// a cell without a figure.
    fn status_word(&self, row: &(Scenario, String), t: Target) -> String {
        match self.find(row, t) {
            Some(r) if r.status == Status::Ok => "-".into(),
            Some(r) if r.status == Status::Skipped => "skipped".into(),
            Some(_) => "FAILED".into(),
            None => "".into(),
        }
    }

    fn ratio(&self, row: &(Scenario, String), a: Target, b: Target) -> Option<f64> {
        let va = self
            .find(row, a)
            .filter(|r| r.status == Status::Ok)?
            .headline()?;
        let vb = self
            .find(row, b)
            .filter(|r| r.status == Status::Ok)?
            .headline()?;
        (vb > 0.0).then(|| va / vb)
    }

    /// A grouped bar chart: one group per scenario variant, one bar per target, bar
    /// height relative to kernel forwarding (the units differ between scenarios, the
    /// ratio does not), labelled with the absolute figure.
    pub fn to_svg(&self) -> String {
        let targets = self.targets();
        let rows = self.rows();
        let colors = |t: Target| match t {
            Target::Direct => "#8c8c8c",
            Target::EngineSplice => "#1f77b4",
            Target::EngineCopy => "#6baed6",
            Target::BaseSplice => "#2ca02c",
            Target::BaseCopy => "#98df8a",
            Target::Haproxy => "#ff7f0e",
            Target::EngineRules10k => "#9467bd",
            Target::EngineSni => "#c5b0d5",
            Target::EngineClientIp => "#17becf",
        };
        // Each group's bars are scaled to the best target of that group, or to direct.
        let base = |row: &(Scenario, String)| -> Option<f64> {
            self.find(row, Target::Direct)
                .filter(|r| r.status == Status::Ok)
                .and_then(Record::headline)
                .filter(|v| *v > 0.0)
                .or_else(|| {
                    targets
                        .iter()
                        .filter_map(|t| {
                            self.find(row, *t)
                                .filter(|r| r.status == Status::Ok)?
                                .headline()
                        })
                        .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))))
                        .filter(|v| *v > 0.0)
                })
        };
        let max_ratio = rows
            .iter()
            .flat_map(|row| {
                let b = base(row);
                targets.iter().filter_map(move |t| {
                    let v = self
                        .find(row, *t)
                        .filter(|r| r.status == Status::Ok)?
                        .headline()?;
                    Some(v / b?)
                })
            })
            .fold(1.0f64, f64::max)
            .max(1.0);
        let bar_w = 26.0;
        let group_gap = 34.0;
        let group_w = bar_w * targets.len().max(1) as f64 + group_gap;
        let left = 60.0;
        let top = 50.0;
        let plot_h = 260.0;
        let width = left + group_w * rows.len().max(1) as f64 + 20.0;
        let height = top + plot_h + 110.0;
        // 8 % headroom above the tallest bar for its label.
        let y = |ratio: f64| top + plot_h - ratio / (max_ratio * 1.08) * plot_h;
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif" font-size="11">"#
        );
        let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="{left}" y="20" font-size="14" font-weight="bold">ringrelay vs kernel forwarding vs HAProxy ({}; relative to direct = 100%)</text>"#,
            xml(&self.env.family)
        );
        let _ = writeln!(
            s,
            r##"<text x="{left}" y="36" fill="#555">{}; engine cores {:?}, load cores {:?}</text>"##,
            xml(&self.env.kernel),
            self.env.engine_cores,
            self.env.load_cores
        );
        // Gridlines every 25 %.
        let mut g = 0.0;
        while g <= max_ratio + 1e-9 {
            let yy = y(g);
            let _ = writeln!(
                s,
                r##"<line x1="{left}" x2="{:.1}" y1="{yy:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end" fill="#555">{:.0}%</text>"##,
                width - 20.0,
                left - 4.0,
                yy + 4.0,
                g * 100.0
            );
            g += 0.25;
        }
        for (i, row) in rows.iter().enumerate() {
            let gx = left + group_gap / 2.0 + i as f64 * group_w;
            let b = base(row);
            for (j, t) in targets.iter().enumerate() {
                let x = gx + j as f64 * bar_w;
                match self.find(row, *t) {
                    Some(r) if r.status == Status::Ok => {
                        let v = r.headline().unwrap_or(0.0);
                        let ratio = b.map_or(0.0, |b| v / b);
                        let yy = y(ratio);
                        let _ = writeln!(
                            s,
                            r#"<rect x="{x:.1}" y="{yy:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{} {} {}: {} {} ({:.0}% of direct)</title></rect>"#,
                            bar_w - 3.0,
                            (top + plot_h - yy).max(0.0),
                            colors(*t),
                            t.name(),
                            row.0.name(),
                            xml(&row.1),
                            fmt_num(v),
                            row.0.headline().1,
                            ratio * 100.0
                        );
                        let _ = writeln!(
                            s,
                            r#"<text x="{:.1}" y="{:.1}" font-size="9" text-anchor="middle">{}</text>"#,
                            x + (bar_w - 3.0) / 2.0,
                            yy - 3.0,
                            fmt_num(v)
                        );
                    }
                    Some(r) => {
                        let word = if r.status == Status::Skipped {
                            "skip"
                        } else {
                            "FAIL"
                        };
                        let _ = writeln!(
                            s,
                            r##"<text x="{:.1}" y="{:.1}" font-size="9" text-anchor="middle" fill="#999" transform="rotate(-90 {:.1} {:.1})">{word}</text>"##,
                            x + bar_w / 2.0,
                            top + plot_h - 4.0,
                            x + bar_w / 2.0,
                            top + plot_h - 4.0
                        );
                    }
                    None => {}
                }
            }
            let cx = gx + bar_w * targets.len() as f64 / 2.0;
            let _ = writeln!(
                s,
                r##"<text x="{cx:.1}" y="{:.1}" text-anchor="middle">{}</text><text x="{cx:.1}" y="{:.1}" text-anchor="middle" fill="#555">{} ({})</text>"##,
                top + plot_h + 16.0,
                row.0.name(),
                top + plot_h + 30.0,
                xml(&row.1),
                row.0.headline().1
            );
        }
        let _ = writeln!(
            s,
            r#"<line x1="{left}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="black"/>"#,
            width - 20.0,
            top + plot_h,
            top + plot_h
        );
        for (j, t) in targets.iter().enumerate() {
            let lx = left + j as f64 * 130.0;
            let ly = top + plot_h + 60.0;
            let _ = writeln!(
                s,
                r#"<rect x="{lx:.1}" y="{:.1}" width="12" height="12" fill="{}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
                ly - 10.0,
                colors(*t),
                lx + 16.0,
                ly,
                t.name()
            );
        }
        let _ = writeln!(s, "</svg>");
        s
    }
}

/// 3 significant digits, thousands as `k`.
pub fn fmt_num(v: f64) -> String {
    if v >= 100_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if v >= 10_000.0 {
        format!("{:.1}k", v / 1000.0)
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// [`fmt_bytes`], or `n/a` for a figure not measured.
pub fn fmt_opt_bytes(v: Option<f64>) -> String {
    v.map_or("n/a".into(), fmt_bytes)
}

/// Error counts by kind as `kind n, kind n` (in key order).
pub fn fmt_kinds(m: &std::collections::BTreeMap<String, u64>) -> String {
    m.iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Bytes as `B`, `KiB`, `MiB` or `GiB`, 3 significant digits (negative: memory given
/// back).
pub fn fmt_bytes(v: f64) -> String {
    let a = v.abs();
    let sign = if v < 0.0 { "-" } else { "" };
    if a >= 1024.0 * 1024.0 * 1024.0 {
        format!("{sign}{} GiB", fmt_num(a / (1024.0 * 1024.0 * 1024.0)))
    } else if a >= 1024.0 * 1024.0 {
        format!("{sign}{} MiB", fmt_num(a / (1024.0 * 1024.0)))
    } else if a >= 1024.0 {
        format!("{sign}{} KiB", fmt_num(a / 1024.0))
    } else if a >= 10.0 || a == 0.0 {
        format!("{sign}{a:.0} B")
    } else {
        format!("{sign}{a:.1} B")
    }
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::Variant;

    fn rec(t: Target, v: f64) -> Record {
        let var = Variant {
            label: "1 stream".into(),
            conns: 1,
            size: 1,
            idle: 0,
        };
        let mut r = Record::not_run(
            Scenario::TcpBulk,
            &var,
            t,
            "ipv4",
            Status::Ok,
            String::new(),
        );
        r.reason = None;
        r.gbit_s = Some(v);
        r
    }

    #[test]
    fn markdown_and_svg_render() {
        let mut rep = Report::default();
        rep.records.push(rec(Target::Direct, 20.0));
        rep.records.push(rec(Target::EngineSplice, 15.0));
        let mut skipped = rec(Target::Haproxy, 0.0);
        skipped.status = Status::Skipped;
        skipped.reason = Some("haproxy is not installed".into());
        rep.records.push(skipped);
        let md = rep.to_markdown();
        assert!(
            md.contains("| tcp-bulk 1 stream | Gbit/s | 20.0 | 15.0 | skipped |"),
            "{md}"
        );
        assert!(md.contains("0.75x"), "{md}");
        assert!(md.contains("haproxy skipped (tcp-bulk 1 stream): haproxy is not installed"));
        let svg = rep.to_svg();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("75% of direct"));
        assert!(rep.all_ran());
        let json = rep.to_json();
        assert!(json.contains("\"scenario\": \"tcp-bulk\""));
        assert!(json.contains("\"target\": \"engine-splice\""));
    }

    #[test]
    fn rounds_show_the_median_and_the_spread() {
        let mut rep = Report::default();
        rep.env.rounds = 3;
        for (round, (d, e)) in [(20.0, 9.0), (10.0, 12.0), (16.0, 15.0)].iter().enumerate() {
            for (t, v) in [(Target::Direct, *d), (Target::EngineSplice, *e)] {
                let mut r = rec(t, v);
                r.round = round;
                rep.records.push(r);
            }
        }
        // A failed round is left out of the median and named with its round.
        let mut bad = rec(Target::EngineSplice, 0.0);
        bad.status = Status::Failed;
        bad.reason = Some("engine died".into());
        bad.round = 2;
        rep.records.push(bad);
        let md = rep.to_markdown();
        assert!(
            md.contains("| tcp-bulk 1 stream | Gbit/s | 16.0 (10.0-20.0) | 12.0 (9.00-15.0) |"),
            "{md}"
        );
        assert!(md.contains("0.75x"), "{md}");
        assert!(
            md.contains("engine-splice failed (tcp-bulk 1 stream round 3): engine died"),
            "{md}"
        );
        assert!(!rep.all_ran());
    }

    fn cpu(busy_s: f64, util: f64, per_unit: f64) -> CpuUse {
        CpuUse {
            cores: vec![1],
            user_hz: 100,
            window_s: 1.0,
            busy_s,
            user_s: 0.0,
            system_s: busy_s,
            softirq_s: 0.0,
            irq_s: 0.0,
            steal_s: 0.0,
            util,
            proxy_s: None,
            rest_util: None,
            per_unit: Some(per_unit),
            unit: Scenario::TcpBulk.cpu_unit(),
            contended: false,
        }
    }

    #[test]
    fn cpu_table_median_spread_and_ratios() {
        let mut rep = Report::default();
        rep.env.rounds = 3;
        rep.env.engine_cores = vec![1];
        // (rate, CPU per unit) per round for each target.
        let rounds = [
            [(20.0, 10.0), (12.0, 600.0), (11.0, 700.0), (6.0, 1000.0)],
            [(18.0, 12.0), (13.0, 500.0), (10.0, 800.0), (7.0, 1100.0)],
            [(19.0, 8.0), (11.0, 550.0), (12.0, 900.0), (6.5, 1200.0)],
        ];
        let targets = [
            Target::Direct,
            Target::EngineSplice,
            Target::BaseSplice,
            Target::Haproxy,
        ];
        for (round, figs) in rounds.iter().enumerate() {
            for (t, (rate, per)) in targets.iter().zip(figs) {
                let mut r = rec(*t, *rate);
                r.round = round;
                r.cpu = Some(cpu(0.9, 0.9, *per));
                rep.records.push(r);
            }
        }
        let md = rep.to_markdown();
        // Columns in enum order: each engine next to its baseline.
        assert!(
            md.contains(
                "| scenario | unit | direct | engine-splice | base-splice | haproxy | \
                 engine-splice / direct | engine-splice / haproxy | engine-splice / base-splice | \
                 haproxy / direct |"
            ),
            "{md}"
        );
        // Rate medians 19, 12, 11, 6.5: 12/19, 12/6.5, 12/11, 6.5/19.
        assert!(md.contains("| 0.63x | 1.85x | 1.09x | 0.34x |"), "{md}");
        assert!(
            md.contains(
                "| scenario | CPU/unit | direct† | engine-splice | base-splice | haproxy | \
                 engine-splice / haproxy | engine-splice / base-splice |"
            ),
            "{md}"
        );
        // CPU medians 10, 550, 800, 1100 with their spreads and the busy share;
        // ratios 550/1100 and 550/800.
        assert!(
            md.contains(
                "| tcp-bulk 1 stream | ms/GB | 10.0 (8.00-12.0), 90% | 550 (500-600), 90% | \
                 800 (700-900), 90% | 1100 (1000-1200), 90% | 0.50x | 0.69x |"
            ),
            "{md}"
        );
        assert!(md.contains("† direct: no proxy runs on cores [1]"), "{md}");
    }

    #[test]
    fn cpu_table_cells_without_figures() {
        let mut rep = Report::default();
        rep.env.engine_cores = vec![1];
        let mut e = rec(Target::EngineSplice, 10.0);
        e.cpu = Some(cpu(0.5, 0.5, 400.0));
        rep.records.push(e);
        // Measured but no CPU reading (e.g. /proc/stat unreadable): a dash.
        rep.records.push(rec(Target::EngineCopy, 8.0));
        let mut h = rec(Target::Haproxy, 0.0);
        h.status = Status::Skipped;
        h.reason = Some("haproxy is not installed".into());
        rep.records.push(h);
        let md = rep.to_markdown();
        assert!(
            md.contains("| tcp-bulk 1 stream | ms/GB | 400, 50% | - | skipped |"),
            "{md}"
        );
        assert!(!md.contains('†'), "no direct, no footnote: {md}");
        assert!(!md.contains('‡'), "nothing contended: {md}");
        // A contended cell is marked and explained.
        rep.records[0].cpu.as_mut().unwrap().contended = true;
        let md = rep.to_markdown();
        assert!(md.contains("| 400, 50% ‡ |"), "{md}");
        assert!(md.contains("‡ other work ran on cores [1]"), "{md}");
        // No record has a CPU figure: no table at all.
        let mut bare = Report::default();
        bare.records.push(rec(Target::Direct, 1.0));
        assert!(!bare.to_markdown().contains("CPU/unit"));
        let json = rep.to_json();
        assert!(json.contains("\"per_unit\": 400.0"), "{json}");
        assert!(json.contains("\"unit\": \"ms/GB\""), "{json}");
    }

    #[test]
    fn idle_rows_side_by_side() {
        let plain = Scenario::TcpCrr.variants(None, None).remove(0);
        let idle = plain.with_idle(2000);
        let crr = |v: &Variant, t: Target, rate: f64, per: Option<f64>| {
            let mut r = Record::not_run(Scenario::TcpCrr, v, t, "ipv4", Status::Ok, String::new());
            r.reason = None;
            r.conn_s = Some(rate);
            r.cpu = per.map(|p| {
                let mut c = cpu(0.9, 0.9, p);
                c.unit = Scenario::TcpCrr.cpu_unit();
                c
            });
            if v.idle > 0 {
                r.idle = Some(IdleConns {
                    opened: v.idle,
                    held: v.idle,
                    server_held: v.idle,
                    ..IdleConns::default()
                });
            }
            r
        };
        let mut rep = Report::default();
        rep.env.engine_cores = vec![1];
        for (t, a, b) in [
            (Target::Direct, (17000.0, 5.0), (16500.0, 6.0)),
            (Target::EngineCopy, (12000.0, 70.0), (11800.0, 72.0)),
            (Target::BaseCopy, (11000.0, 71.5), (2500.0, 373.5)),
        ] {
            rep.records.push(crr(&plain, t, a.0, Some(a.1)));
            rep.records.push(crr(&idle, t, b.0, Some(b.1)));
        }
        // HAProxy at its limit: failed, with what it held.
        rep.records
            .push(crr(&plain, Target::Haproxy, 9000.0, Some(72.2)));
        let mut h = crr(&idle, Target::Haproxy, 8000.0, Some(80.0));
        h.status = Status::Failed;
        h.reason = Some("idle connections: 1500 of 2000 held".into());
        h.idle.as_mut().unwrap().held = 1500;
        rep.records.push(h);
        let md = rep.to_markdown();
        // Both rows in the rate and the CPU tables.
        assert!(
            md.contains("| tcp-crr 16 clients, idle 2000 | conn/s |"),
            "{md}"
        );
        assert!(
            md.contains("| tcp-crr 16 clients, idle 2000 | µs/conn |"),
            "{md}"
        );
        assert!(
            md.contains(
                "tcp-crr 16 clients with and without 2000 idle connections held open through \
                 the router (row `16 clients, idle 2000`)"
            ),
            "{md}"
        );
        assert!(
            md.contains(
                "| target | µs/conn, no idle | µs/conn, idle 2000 | idle / no idle | conn/s, no \
                 idle | conn/s, idle 2000 | idle held |"
            ),
            "{md}"
        );
        assert!(
            md.contains("| direct† | 5.00 | 6.00 |  | 17.0k | 16.5k | 2000/2000 |"),
            "{md}"
        );
        assert!(md.contains("| engine-copy | 70.0 | 72.0 | 1.03x | 12.0k | 11.8k | 2000/2000 |"));
        assert!(md.contains("| base-copy | 71.5 | 374 | 5.22x | 11.0k | 2500 | 2000/2000 |"));
        assert!(
            md.contains("| haproxy | 72.2 | FAILED |  | 9000 | FAILED | 1500/2000 |"),
            "{md}"
        );
        // A figure taken while other work shared the core is marked as in the CPU table.
        let bc = rep
            .records
            .iter_mut()
            .find(|r| r.target == Target::BaseCopy && r.idle_conns > 0)
            .unwrap();
        bc.cpu.as_mut().unwrap().contended = true;
        let marked = rep.to_markdown();
        assert!(
            marked.contains("| base-copy | 71.5 | 374 ‡ | 5.22x |"),
            "{marked}"
        );
        assert!(md.contains("haproxy failed (tcp-crr 16 clients, idle 2000): idle connections"));
        let json = rep.to_json();
        assert!(json.contains("\"idle_conns\": 2000"), "{json}");
        assert!(json.contains("\"idle_conns\": 0"), "{json}");
        assert!(json.contains("\"held\": 1500"), "{json}");
        // Without the plain twin there is nothing to set it beside.
        rep.records.retain(|r| r.idle_conns > 0);
        assert!(!rep.to_markdown().contains("idle / no idle"));
    }

    #[test]
    fn capacity_table_per_target() {
        use crate::capacity::{self, Capacity, Reading, StopReason};
        let v = Scenario::TcpCapacity.variants(Some(9800), None).remove(0);
        let base = |held: usize, sockets: usize| Capacity {
            asked: 9800,
            bench_limit: 9800,
            held,
            relay_ok: held,
            stop: Some(StopReason::Timeout),
            idle: Reading {
                router_sockets: sockets,
                ..Reading::default()
            },
            settle_s: 0.1,
            ..Capacity::default()
        };
        let mut direct = base(9800, 0);
        direct.stop = Some(StopReason::BenchLimit);
        let mut splice = base(6851, 6851);
        splice.proxy_limit = Some(6851);
        splice.rss_per_idle_conn = Some(530.0);
        splice.skmem_per_idle_conn = Some(0.0);
        splice.stalled = 1000;
        splice.skmem_per_stalled_conn = Some(760.0 * 1024.0);
        splice.pipes_per_stalled_conn = Some(0.456);
        splice.pipe_bytes_per_stalled_conn = Some(0.456 * 262_144.0);
        splice.rss_per_stalled_conn = Some(12.0 * 1024.0);
        let mut ha = base(7800, 7800);
        ha.proxy_limit = Some(7800);
        ha.stalled = 206;
        ha.skmem_per_stalled_conn = Some(3.6 * 1024.0 * 1024.0);
        ha.stall_capped = Some("206 of 1000 stalled: at 3.87 MiB each".into());
        ha.relay_ok = 7790;
        ha.relay_failed = 10;
        let mut rep = Report::default();
        for (t, c) in [
            (Target::Direct, direct),
            (Target::EngineSplice, splice),
            (Target::Haproxy, ha),
        ] {
            rep.records
                .push(capacity::to_record(&v, t, crate::load::Family::Ipv4, c));
        }
        let md = rep.to_markdown();
        assert!(
            md.contains("| tcp-capacity up to 9800 | conns held | 9800 | 6851 | FAILED |"),
            "{md}"
        );
        assert!(
            md.contains("tcp-capacity (row `tcp-capacity up to 9800`)"),
            "{md}"
        );
        assert!(
            md.contains(
                "| direct | 9800 in 0.0 s | bench limit | n/a | n/a (no router socket) | n/a | n/a | \
                         n/a | 9800 ok | back to baseline in 0.1 s |"
            ),
            "{md}"
        );
        assert!(
            md.contains(
                "| engine-splice | 6851 in 0.0 s | no answer in 1 s (limit 6851) | 530 B | 0 B | \
                         760 KiB (1000 stalled) | 0.46 = 117 KiB | 12.0 KiB | 6851 ok |"
            ),
            "{md}"
        );
        assert!(
            md.contains(
                "| haproxy | 7800 in 0.0 s | no answer in 1 s (limit 7800) | n/a | n/a | 3.60 MiB \
                         (206 stalled ‡) | n/a | n/a | 7790 ok, 10 FAILED |"
            ),
            "{md}"
        );
        assert!(md.contains("\n‡ haproxy: 206 of 1000 stalled"), "{md}");
        assert!(
            md.contains("haproxy failed (tcp-capacity up to 9800): relay check"),
            "{md}"
        );
        // Other reports have no such table.
        let mut other = Report::default();
        other.records.push(rec(Target::EngineSplice, 15.0));
        let md = other.to_markdown();
        assert!(
            md.contains("tcp-bulk") && !md.contains("conns held"),
            "{md}"
        );
    }

    #[test]
    fn numbers() {
        assert_eq!(fmt_num(123_456.0), "123k");
        assert_eq!(fmt_num(12_345.0), "12.3k");
        assert_eq!(fmt_num(9.876), "9.88");
        assert_eq!(fmt_bytes(0.0), "0 B");
        assert_eq!(fmt_bytes(1000.4), "1000 B");
        assert_eq!(fmt_bytes(0.6), "0.6 B");
        assert_eq!(fmt_bytes(2432.0), "2.38 KiB");
        assert_eq!(fmt_bytes(-2432.0), "-2.38 KiB");
        assert_eq!(fmt_bytes(800.0 * 1024.0), "800 KiB");
        assert_eq!(fmt_bytes(3.5 * 1024.0 * 1024.0), "3.50 MiB");
        assert_eq!(fmt_bytes(2.0 * 1024.0 * 1024.0 * 1024.0), "2.00 GiB");
    }
}
