//! CPU per unit of work: the busy time of the proxy's pinned core(s), read from
//! `/proc/stat` at both edges of a measurement window, divided by the work the
//! scenario counted in that window.
//!
//! On a 2-core machine the proxy owns one core and the load generators the other;
//! throughput alone then mostly says which side saturated first. The core's busy
//! time per connection, request, datagram or gigabyte is what a change to the
//! engine moves. See docs/benchmarks.md, "CPU per unit of work", for what the figure
//! counts and what it cannot see.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::Serialize;

use crate::load::Scenario;

/// Below this share of its cores' busy time spent in the proxy's own process, other
/// work visibly ran there. Clean runs here give 0.85-0.99: the rest is softirq run
/// from idle (timers) and the odd kernel thread.
pub const MIN_PROXY_SHARE: f64 = 0.75;
/// With no proxy (`direct`), cores busier than this ran someone else's work (a clean
/// run leaves them under a tenth busy).
pub const MAX_UTIL_WITHOUT_PROXY: f64 = 0.5;

/// One `cpuN` line of `/proc/stat`, in USER_HZ ticks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTimes {
    /// user
    pub user: u64,
    /// nice
    pub nice: u64,
    /// system
    pub system: u64,
    /// idle
    pub idle: u64,
    /// iowait
    pub iowait: u64,
    /// irq
    pub irq: u64,
    /// softirq
    pub softirq: u64,
    /// steal
    pub steal: u64,
}

impl CpuTimes {
    /// user + nice + system + irq + softirq + steal. (`guest` and `guest_nice` are
    /// already inside user and nice.)
    pub fn busy(&self) -> u64 {
        self.user + self.nice + self.system + self.irq + self.softirq + self.steal
    }

    /// idle + iowait.
    pub fn idle_all(&self) -> u64 {
        self.idle + self.iowait
    }

    /// Field by field `self - earlier`, never below zero: `iowait` is known to go
    /// backwards on NO_HZ kernels (proc(5)).
    pub fn since(&self, earlier: &CpuTimes) -> CpuTimes {
        CpuTimes {
            user: self.user.saturating_sub(earlier.user),
            nice: self.nice.saturating_sub(earlier.nice),
            system: self.system.saturating_sub(earlier.system),
            idle: self.idle.saturating_sub(earlier.idle),
            iowait: self.iowait.saturating_sub(earlier.iowait),
            irq: self.irq.saturating_sub(earlier.irq),
            softirq: self.softirq.saturating_sub(earlier.softirq),
            steal: self.steal.saturating_sub(earlier.steal),
        }
    }

    fn add(&mut self, o: &CpuTimes) {
        self.user += o.user;
        self.nice += o.nice;
        self.system += o.system;
        self.idle += o.idle;
        self.iowait += o.iowait;
        self.irq += o.irq;
        self.softirq += o.softirq;
        self.steal += o.steal;
    }
}

/// The per-cpu lines (`cpu0 ...`, `cpu1 ...`) of a `/proc/stat` text, by cpu number.
/// The aggregate `cpu` line and every other line are ignored; fields a kernel does
/// not have (very old ones lack `steal`) count as 0.
pub fn parse_proc_stat(text: &str) -> BTreeMap<usize, CpuTimes> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let Some(n) = it
            .next()
            .and_then(|head| head.strip_prefix("cpu"))
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        let v: Vec<u64> = it.map_while(|f| f.parse().ok()).collect();
        if v.len() < 4 {
            continue;
        }
        let f = |i: usize| v.get(i).copied().unwrap_or(0);
        out.insert(
            n,
            CpuTimes {
                user: f(0),
                nice: f(1),
                system: f(2),
                idle: f(3),
                iowait: f(4),
                irq: f(5),
                softirq: f(6),
                steal: f(7),
            },
        );
    }
    out
}

/// utime + stime (fields 14 and 15, USER_HZ ticks) of a `/proc/PID/stat` text: the
/// CPU time of every thread of the process, alive or gone. The command name (field 2)
/// may hold spaces and parentheses, so fields are counted from the last `)`.
pub fn parse_pid_stat(text: &str) -> Option<u64> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): utime is field 14, stime field 15.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// USER_HZ, the unit of `/proc/stat` and `/proc/PID/stat` (`sysconf(_SC_CLK_TCK)`,
/// 100 on every Linux architecture that matters).
pub fn user_hz() -> u64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(v)) if v > 0 => v as u64,
        _ => 100,
    }
}

/// What to sample at the edges of a window: the proxy's cores, and the proxy's
/// process when there is one (none for `direct`).
#[derive(Debug, Clone, Default)]
pub struct CpuProbe {
    /// The cores the proxy (engine or HAProxy) is pinned to.
    pub cores: Vec<usize>,
    /// The proxy's pid.
    pub pid: Option<u32>,
}

/// One reading of `/proc/stat` (and the proxy's `/proc/PID/stat`).
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// When it was read.
    pub at: Instant,
    /// Every online cpu.
    pub cpus: BTreeMap<usize, CpuTimes>,
    /// The proxy's utime + stime, ticks.
    pub proxy_ticks: Option<u64>,
}

impl CpuProbe {
    /// Reads the counters now; `None` when `/proc/stat` cannot be read or the
    /// probe has no cores.
    pub fn sample(&self) -> Option<Snapshot> {
        if self.cores.is_empty() {
            return None;
        }
        let cpus = parse_proc_stat(&std::fs::read_to_string("/proc/stat").ok()?);
        let proxy_ticks = self.pid.and_then(|p| {
            parse_pid_stat(&std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?)
        });
        Some(Snapshot {
            at: Instant::now(),
            cpus,
            proxy_ticks,
        })
    }

    /// The CPU use between two snapshots.
    pub fn between(&self, a: &Snapshot, b: &Snapshot, hz: u64) -> Option<CpuUse> {
        CpuUse::between(&self.cores, a, b, hz)
    }
}

/// CPU use of the proxy's core(s) over one measurement window. Times are seconds
/// summed over the cores; `per_unit` is filled in once the window's work is known.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CpuUse {
    /// The cores sampled (the proxy's).
    pub cores: Vec<usize>,
    /// The tick rate of the counters (USER_HZ).
    pub user_hz: u64,
    /// Wall time between the two readings, seconds.
    pub window_s: f64,
    /// Busy time (user+nice+system+irq+softirq+steal), seconds.
    pub busy_s: f64,
    /// Of which user + nice.
    pub user_s: f64,
    /// Of which system.
    pub system_s: f64,
    /// Of which softirq (network receive and transmit processing).
    pub softirq_s: f64,
    /// Of which irq.
    pub irq_s: f64,
    /// Of which steal: time the hypervisor gave to someone else while this vCPU
    /// wanted to run. Counted as busy, shown apart so that it can be told.
    pub steal_s: f64,
    /// Busy share of the cores: busy / (busy + idle + iowait).
    pub util: f64,
    /// CPU time of the proxy process (all threads, on any core) in the window.
    pub proxy_s: Option<f64>,
    /// Busy share of every other online core (the load and server threads).
    pub rest_util: Option<f64>,
    /// Busy time per unit of work, in `unit`.
    pub per_unit: Option<f64>,
    /// True when other work visibly ran on the cores during the window (see
    /// [`CpuUse::judge`]): the figure then overstates the proxy's cost.
    pub contended: bool,
    /// `ms/GB` (tcp-bulk), `µs/conn` (tcp-crr), `µs/req` (tcp-rr, udp-rr),
    /// `µs/datagram` (udp-pps).
    pub unit: &'static str,
}

impl CpuUse {
    /// The use of `cores` between snapshots `a` and `b` taken at a tick rate `hz`.
    /// `None` when a core is missing from either (offline) or no tick passed.
    pub fn between(cores: &[usize], a: &Snapshot, b: &Snapshot, hz: u64) -> Option<CpuUse> {
        let hz_f = hz.max(1) as f64;
        if cores
            .iter()
            .any(|c| !a.cpus.contains_key(c) || !b.cpus.contains_key(c))
        {
            return None;
        }
        // Cores present at both readings only: one that came online in between
        // has no starting point.
        let sum = |pick: &dyn Fn(usize) -> bool| {
            let mut t = CpuTimes::default();
            for (n, after) in b.cpus.iter().filter(|(n, _)| pick(**n)) {
                if let Some(before) = a.cpus.get(n) {
                    t.add(&after.since(before));
                }
            }
            t
        };
        let mine = sum(&|n| cores.contains(&n));
        let total = mine.busy() + mine.idle_all();
        if total == 0 {
            return None;
        }
        let rest = sum(&|n| !cores.contains(&n));
        let rest_total = rest.busy() + rest.idle_all();
        let s = |ticks: u64| ticks as f64 / hz_f;
        Some(CpuUse {
            cores: cores.to_vec(),
            user_hz: hz,
            window_s: b.at.saturating_duration_since(a.at).as_secs_f64(),
            busy_s: s(mine.busy()),
            user_s: s(mine.user + mine.nice),
            system_s: s(mine.system),
            softirq_s: s(mine.softirq),
            irq_s: s(mine.irq),
            steal_s: s(mine.steal),
            util: mine.busy() as f64 / total as f64,
            proxy_s: match (a.proxy_ticks, b.proxy_ticks) {
                (Some(x), Some(y)) => Some(s(y.saturating_sub(x))),
                _ => None,
            },
            rest_util: (rest_total > 0).then(|| rest.busy() as f64 / rest_total as f64),
            per_unit: None,
            unit: "",
            contended: false,
        })
    }

    /// Sets `contended`: with a proxy on the cores (`has_proxy`), its own process
    /// took less than [`MIN_PROXY_SHARE`] of their busy time; without one, they
    /// were busier than [`MAX_UTIL_WITHOUT_PROXY`]. A proxy whose process time could
    /// not be read is not judged.
    pub fn judge(mut self, has_proxy: bool) -> CpuUse {
        self.contended = match (has_proxy, self.proxy_s) {
            (true, Some(p)) => self.busy_s > 0.0 && p < MIN_PROXY_SHARE * self.busy_s,
            (true, None) => false,
            (false, _) => self.util > MAX_UTIL_WITHOUT_PROXY,
        };
        self
    }

    /// The proxy process's time as a share of the cores' busy time.
    pub fn proxy_share(&self) -> Option<f64> {
        let p = self.proxy_s?;
        (self.busy_s > 0.0).then(|| p / self.busy_s)
    }

    /// Fills in `per_unit` and `unit` from the work the scenario counted in the
    /// window: payload bytes for tcp-bulk, completed operations for the others.
    pub fn with_work(mut self, scenario: Scenario, bytes: u64, ops: u64) -> CpuUse {
        self.unit = scenario.cpu_unit();
        self.per_unit = per_unit(scenario, self.busy_s, bytes, ops);
        self
    }
}

/// Busy seconds per unit of work in the scenario's CPU unit: milliseconds per 10⁹
/// payload bytes for tcp-bulk, microseconds per connection, request or delivered
/// datagram for the others. `None` when no work was done.
pub fn per_unit(scenario: Scenario, busy_s: f64, bytes: u64, ops: u64) -> Option<f64> {
    match scenario {
        Scenario::TcpBulk => (bytes > 0).then(|| busy_s * 1e3 / (bytes as f64 / 1e9)),
        _ => (ops > 0).then(|| busy_s * 1e6 / ops as f64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const STAT_A: &str = "\
cpu  22003 0 2830 18235 363 0 33 115 0 0
cpu0 11031 0 1455 9011 227 0 12 61 0 0
cpu1 10971 0 1374 9223 135 0 21 53 0 0
intr 225754 0 0 0
ctxt 322578
btime 1700000000
processes 4000
";

    // One second (100 ticks per cpu) later: cpu1 was busy 75 ticks (30 user, 5 nice,
    // 25 system, 2 irq, 10 softirq, 3 steal) and idle 25 (20 idle, 5 iowait); cpu0
    // was busy 50 of 100.
    const STAT_B: &str = "\
cpu  22133 5 2885 18285 368 2 43 118 0 0
cpu0 11051 0 1485 9061 227 0 12 61 0 0
cpu1 11001 5 1399 9243 140 2 31 56 0 0
intr 226000 0 0 0
";

    fn snap(text: &str, at: Instant, proxy: Option<u64>) -> Snapshot {
        Snapshot {
            at,
            cpus: parse_proc_stat(text),
            proxy_ticks: proxy,
        }
    }

    #[test]
    fn parses_per_cpu_lines_only() {
        let m = parse_proc_stat(STAT_A);
        assert_eq!(m.len(), 2);
        assert_eq!(
            m[&1],
            CpuTimes {
                user: 10971,
                nice: 0,
                system: 1374,
                idle: 9223,
                iowait: 135,
                irq: 0,
                softirq: 21,
                steal: 53,
            }
        );
        assert_eq!(m[&1].busy(), 10971 + 1374 + 21 + 53);
        assert_eq!(m[&1].idle_all(), 9223 + 135);
        // An old kernel without steal, and garbage, are tolerated.
        let old = parse_proc_stat("cpu3 1 2 3 4 5 6 7\ncpuX 1 2 3 4\ncpu4 1 2\n");
        assert_eq!(old.len(), 1);
        assert_eq!(old[&3].steal, 0);
        assert_eq!(old[&3].softirq, 7);
    }

    #[test]
    fn busy_share_and_breakdown() {
        let t0 = Instant::now();
        let a = snap(STAT_A, t0, Some(1000));
        let b = snap(STAT_B, t0 + Duration::from_secs(1), Some(1060));
        let u = CpuUse::between(&[1], &a, &b, 100).unwrap();
        assert!((u.busy_s - 0.75).abs() < 1e-9, "{u:?}");
        assert!((u.util - 0.75).abs() < 1e-9);
        assert!((u.user_s - 0.35).abs() < 1e-9);
        assert!((u.system_s - 0.25).abs() < 1e-9);
        assert!((u.softirq_s - 0.10).abs() < 1e-9);
        assert!((u.irq_s - 0.02).abs() < 1e-9);
        assert!((u.steal_s - 0.03).abs() < 1e-9);
        assert!((u.window_s - 1.0).abs() < 1e-9);
        assert_eq!(u.proxy_s, Some(0.6));
        assert!((u.rest_util.unwrap() - 0.5).abs() < 1e-9);
        // Both cores: 125 busy ticks out of 200; nothing left over.
        let both = CpuUse::between(&[0, 1], &a, &b, 100).unwrap();
        assert!((both.busy_s - 1.25).abs() < 1e-9, "{both:?}");
        assert!((both.util - 0.625).abs() < 1e-9);
        assert_eq!(both.rest_util, None);
        // A tick rate other than 100 scales the seconds, not the share.
        let fast = CpuUse::between(&[1], &a, &b, 250).unwrap();
        assert!((fast.busy_s - 0.3).abs() < 1e-9);
        assert!((fast.util - 0.75).abs() < 1e-9);
    }

    #[test]
    fn backwards_counters_missing_cores_and_empty_windows() {
        let t0 = Instant::now();
        let a = snap(STAT_A, t0, None);
        // iowait going backwards counts as zero, not as a huge number.
        let b = snap("cpu1 10981 0 1374 9313 100 0 21 53\n", t0, None);
        let u = CpuUse::between(&[1], &a, &b, 100).unwrap();
        assert!((u.util - 0.1).abs() < 1e-9, "{u:?}");
        assert_eq!(u.proxy_s, None);
        assert_eq!(CpuUse::between(&[7], &a, &b, 100), None);
        assert_eq!(CpuUse::between(&[1], &a, &a, 100), None);
    }

    #[test]
    fn per_unit_in_each_scenarios_unit() {
        // 0.75 s busy for 1.5e9 bytes: 500 ms per GB.
        let bulk = per_unit(Scenario::TcpBulk, 0.75, 1_500_000_000, 0).unwrap();
        assert!((bulk - 500.0).abs() < 1e-9);
        // 0.75 s busy for 15 000 connections: 50 µs each.
        let crr = per_unit(Scenario::TcpCrr, 0.75, 0, 15_000).unwrap();
        assert!((crr - 50.0).abs() < 1e-9);
        let rr = per_unit(Scenario::TcpRr, 0.5, 999, 50_000).unwrap();
        assert!((rr - 10.0).abs() < 1e-9);
        let pps = per_unit(Scenario::UdpPps, 0.2, 64, 100_000).unwrap();
        assert!((pps - 2.0).abs() < 1e-9);
        assert_eq!(per_unit(Scenario::UdpRr, 0.5, 0, 0), None);
        assert_eq!(per_unit(Scenario::TcpBulk, 0.5, 0, 10), None);
        let t0 = Instant::now();
        let u = CpuUse::between(&[1], &snap(STAT_A, t0, None), &snap(STAT_B, t0, None), 100)
            .unwrap()
            .with_work(Scenario::TcpCrr, 0, 15_000);
        assert_eq!(u.unit, "µs/conn");
        assert!((u.per_unit.unwrap() - 50.0).abs() < 1e-9);
    }

    #[test]
    fn contention_is_judged_by_the_proxys_share() {
        let t0 = Instant::now();
        let a = snap(STAT_A, t0, Some(1000));
        // 75 busy ticks on cpu1; the proxy ran 60 of them (0.8), or 30 (0.4).
        let mine = CpuUse::between(&[1], &a, &snap(STAT_B, t0, Some(1060)), 100).unwrap();
        assert!((mine.proxy_share().unwrap() - 0.8).abs() < 1e-9);
        assert!(!mine.clone().judge(true).contended);
        let shared = CpuUse::between(&[1], &a, &snap(STAT_B, t0, Some(1030)), 100).unwrap();
        assert!(shared.clone().judge(true).contended);
        // Unknown process time: not judged. No proxy: 75 % busy is someone else.
        let unknown = CpuUse::between(&[1], &a, &snap(STAT_B, t0, None), 100).unwrap();
        assert!(!unknown.clone().judge(true).contended);
        assert!(unknown.judge(false).contended);
        let quiet = snap("cpu1 10981 0 1374 9313 135 0 21 53\n", t0, None);
        assert!(
            !CpuUse::between(&[1], &a, &quiet, 100)
                .unwrap()
                .judge(false)
                .contended
        );
    }

    #[test]
    fn pid_stat_with_awkward_names() {
        let line = "4242 (my (odd) proc) S 1 4242 4242 0 -1 4194560 120 0 0 0 \
                    37 15 0 0 20 0 3 0 12345 1000000 100 18446744073709551615";
        assert_eq!(parse_pid_stat(line), Some(52));
        assert_eq!(parse_pid_stat("4242 (x) S 1 2"), None);
        assert_eq!(parse_pid_stat("garbage"), None);
    }
}
