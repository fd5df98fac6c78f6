//! `setup status`: is everything the engine needs in place, and if not, what is
//! missing or in the way. Also warns about the traps that break TPROXY silently.

use crate::config::{Backend, Config, FailMode};
use crate::error::SetupError;
use crate::host::{self, run_any, run_checked};
use crate::iproute;
use crate::iptables;
use crate::nft;
use crate::ops::show_table;
use crate::plan::{self, Family, Plan, SysctlWant};
use crate::runner::Runner;
use crate::state::{Loaded, State};
use crate::sysctl::{self, SysctlKey};
use std::fmt::Write as _;
use std::path::Path;

/// How a status line counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// In place.
    Ok,
    /// Something apply installs is not there.
    Missing,
    /// Something is there but different, or something else is in the way.
    Conflict,
    /// Not wrong by itself, but a known way for TPROXY to fail.
    Warning,
}

impl Level {
    fn tag(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Missing => "MISSING",
            Level::Conflict => "CONFLICT",
            Level::Warning => "warning",
        }
    }
}

/// The outcome of `setup status`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatusReport {
    /// One line per check, in order.
    pub lines: Vec<(Level, String)>,
}

impl StatusReport {
    fn push(&mut self, level: Level, text: impl Into<String>) {
        self.lines.push((level, text.into()));
    }

    /// Number of MISSING and CONFLICT lines.
    pub fn problems(&self) -> usize {
        self.lines
            .iter()
            .filter(|(l, _)| matches!(l, Level::Missing | Level::Conflict))
            .count()
    }

    /// Everything the engine needs is in place (warnings allowed).
    pub fn ready(&self) -> bool {
        self.problems() == 0
    }

    /// The report as printed, ending with the verdict line.
    pub fn render(&self) -> String {
        let mut s = String::new();
        for (level, text) in &self.lines {
            let _ = writeln!(s, "{}: {text}", level.tag());
        }
        if self.ready() {
            s.push_str("ringrelay: ready\n");
        } else {
            let _ = writeln!(s, "ringrelay: NOT READY ({} problems)", self.problems());
        }
        s
    }
}

/// Checks the live box against the plan recorded in `state_path` (or, when there is
/// none, against `fallback`, reporting that apply has not run).
pub fn status(
    runner: &dyn Runner,
    state_path: &Path,
    netns: &str,
    fallback: &Config,
) -> Result<StatusReport, SetupError> {
    let mut r = StatusReport::default();
    let state = match State::load_for(state_path, netns)? {
        Loaded::Stale(_) => {
            r.push(Level::Warning, crate::ops::stale_note(state_path));
            None
        }
        loaded => loaded.current(),
    };
    let plan = match &state {
        Some(st) => {
            r.push(
                Level::Ok,
                format!(
                    "applied: backend {}, port {}, fail-{} (state {})",
                    st.config.backend.name(),
                    st.config.port,
                    st.config.fail_mode.name(),
                    state_path.display()
                ),
            );
            st.plan()
        }
        None => {
            r.push(
                Level::Missing,
                format!(
                    "setup apply has not run in this network namespace (no state file {})",
                    state_path.display()
                ),
            );
            let ifaces = host::interfaces(runner).unwrap_or_default();
            plan::build(fallback, &ifaces)
        }
    };
    let c = &plan.config;

    for name in &c.in_ifaces {
        if !runner.exists(&Path::new("/sys/class/net").join(name)) {
            r.push(
                Level::Missing,
                format!("interface {name} (--in-iface) no longer exists"),
            );
        }
    }

    check_firewall(runner, &plan, state.as_ref(), &mut r)?;
    check_routing(runner, &plan, &mut r)?;
    check_sysctls(runner, &plan, &mut r);
    for w in trap_warnings(runner, &plan) {
        r.push(Level::Warning, w);
    }
    Ok(r)
}

fn check_firewall(
    runner: &dyn Runner,
    plan: &Plan,
    state: Option<&State>,
    r: &mut StatusReport,
) -> Result<(), SetupError> {
    let c = &plan.config;
    let recorded = state.map(|s| s.fingerprint.as_slice());
    match c.backend {
        Backend::Nft => {
            if runner.find_program("nft").is_none() {
                r.push(Level::Missing, host::missing_program("nft").to_string());
                return Ok(());
            }
            let cmd = nft::list_cmd();
            let out = run_any(runner, &cmd)?;
            if !out.success() {
                let msg = host::one_line(&out);
                if host::is_eperm(&msg) {
                    return Err(host::command_error(&cmd, &out));
                }
                r.push(
                    Level::Missing,
                    format!("nft table inet {} (run `setup apply`)", plan::NFT_TABLE),
                );
                return Ok(());
            }
            let live = nft::fingerprint(&out.stdout);
            compare(
                r,
                &format!("nft table inet {}", plan::NFT_TABLE),
                recorded,
                &live,
            );
        }
        Backend::Iptables => {
            let mut live_all = Vec::new();
            for &family in plan.families() {
                let cmd = iptables::save_cmd(family);
                let saved = iptables::parse_save(&run_checked(runner, &cmd)?.stdout);
                let tool = family.iptables();
                for chain in [plan::IPT_CHAIN, plan::IPT_TPROXY_CHAIN] {
                    if !saved.chains.iter().any(|x| x == chain) {
                        r.push(Level::Missing, format!("{tool} mangle chain {chain}"));
                    }
                }
                match saved.jumps {
                    0 => r.push(
                        Level::Missing,
                        format!("{tool} mangle PREROUTING jump `-j {}`", plan::IPT_CHAIN),
                    ),
                    1 => {}
                    n => r.push(
                        Level::Conflict,
                        format!(
                            "{tool} mangle PREROUTING jumps to {} {n} times (re-run `setup apply`)",
                            plan::IPT_CHAIN
                        ),
                    ),
                }
                live_all.extend(saved.lines.iter().map(|l| format!("{} {l}", family.name())));
            }
            compare(r, "iptables mangle chains", recorded, &live_all);
        }
    }
    // The other backend's objects would intercept too (or instead).
    if c.backend != Backend::Nft && runner.find_program("nft").is_some() {
        if let Ok(out) = runner.run(&nft::list_cmd()) {
            if out.success() {
                r.push(
                    Level::Conflict,
                    format!(
                        "a leftover nft table inet {} intercepts as well: `setup teardown` removes it",
                        plan::NFT_TABLE
                    ),
                );
            }
        }
    }
    if c.backend != Backend::Iptables {
        for family in [Family::V4, Family::V6] {
            if runner.find_program(family.iptables_save()).is_none() {
                continue;
            }
            if let Ok(out) = runner.run(&iptables::save_cmd(family)) {
                let saved = iptables::parse_save(&out.stdout);
                if out.success() && (saved.jumps > 0 || !saved.chains.is_empty()) {
                    r.push(
                        Level::Conflict,
                        format!(
                            "leftover {} {} chains intercept as well: `setup teardown` removes them",
                            family.iptables(),
                            plan::IPT_CHAIN
                        ),
                    );
                }
            }
        }
    }
    Ok(())
}

/// Compares the live listing with the one recorded right after apply.
fn compare(r: &mut StatusReport, what: &str, recorded: Option<&[String]>, live: &[String]) {
    let Some(recorded) = recorded else {
        r.push(
            Level::Warning,
            format!("{what} present, but not recorded by apply here"),
        );
        return;
    };
    if recorded == live {
        r.push(
            Level::Ok,
            format!("{what}: present, as applied ({} lines)", live.len()),
        );
        return;
    }
    let i = recorded
        .iter()
        .zip(live)
        .position(|(a, b)| a != b)
        .unwrap_or(recorded.len().min(live.len()));
    let show = |v: Option<&String>| v.map_or("<end>".to_string(), |l| format!("`{l}`"));
    r.push(
        Level::Conflict,
        format!(
            "{what} changed since apply (line {}: expected {}, found {}): re-run `setup apply`",
            i + 1,
            show(recorded.get(i)),
            show(live.get(i))
        ),
    );
}

fn check_routing(runner: &dyn Runner, plan: &Plan, r: &mut StatusReport) -> Result<(), SetupError> {
    for rule in &plan.ip_rules {
        let out = run_checked(runner, &iproute::rule_show_cmd(rule.family))?;
        let prefs = iproute::find_rule(&iproute::parse_rules(&out.stdout), rule);
        let shown = iproute::rule_add_cmd(rule).to_string();
        let shown = shown.replacen(" add", "", 1);
        match prefs.len() {
            0 => r.push(Level::Missing, shown),
            1 => r.push(Level::Ok, format!("{shown} (pref {})", prefs[0])),
            n => r.push(Level::Warning, format!("{shown} is present {n} times")),
        }
    }
    for route in &plan.routes {
        let table = show_table(runner, route.family, route.table)?;
        let shown = iproute::route_add_cmd(route)
            .to_string()
            .replacen(" add", "", 1);
        if table.ours {
            r.push(Level::Ok, shown);
        } else {
            r.push(Level::Missing, shown);
        }
        if !table.foreign.is_empty() {
            r.push(
                Level::Conflict,
                format!(
                    "table {} also holds routes setup did not add ({}): marked packets matching them are not delivered to the engine",
                    route.table,
                    table.foreign.join("; ")
                ),
            );
        }
    }
    Ok(())
}

fn check_sysctls(runner: &dyn Runner, plan: &Plan, r: &mut StatusReport) {
    let all_rp = SysctlKey::conf("ipv4", "all", "rp_filter");
    let all_value = sysctl::read(runner, &all_rp).unwrap_or_default();
    for item in &plan.sysctls {
        let current = match sysctl::read(runner, &item.key) {
            Ok(v) => v,
            Err(e) => {
                r.push(Level::Missing, format!("{}: {e}", item.key));
                continue;
            }
        };
        match &item.want {
            SysctlWant::Value(v) if &current == v => {
                r.push(Level::Ok, format!("{} = {current}", item.key));
            }
            SysctlWant::Value(v) => r.push(
                Level::Conflict,
                format!("{} is {current}, needs {v} ({})", item.key, item.why),
            ),
            SysctlWant::NotStrictRpFilter => {
                // For an interface the kernel uses max(all, iface).
                let iface = item.key.rel().split('/').nth(3).unwrap_or("");
                let effective = if iface == "all" || iface == "default" {
                    current.parse().unwrap_or(0)
                } else {
                    sysctl::effective_rp_filter(&all_value, &current)
                };
                if effective == 1 {
                    r.push(
                        Level::Conflict,
                        format!(
                            "{} gives strict reverse-path filtering (effective {effective} = max(all {all_value}, {iface} {current})): asymmetric intercepted flows are dropped; set it to 2",
                            item.key
                        ),
                    );
                } else {
                    r.push(Level::Ok, format!("{} = {current} (not strict)", item.key));
                }
            }
        }
    }
}

/// Known traps: `src_valid_mark=1`, strict rp_filter on interfaces that appeared after
/// apply, and nothing listening on the engine's port.
pub fn trap_warnings(runner: &dyn Runner, plan: &Plan) -> Vec<String> {
    let c = &plan.config;
    let mut w = Vec::new();
    let ifaces = host::interfaces(runner).unwrap_or_default();
    let intercepted: Vec<String> = if c.in_ifaces.is_empty() {
        ifaces.iter().filter(|i| *i != "lo").cloned().collect()
    } else {
        c.in_ifaces.clone()
    };

    let read = |iface: &str, leaf: &str| {
        sysctl::read(runner, &SysctlKey::conf("ipv4", iface, leaf)).unwrap_or_default()
    };
    // src_valid_mark is OR-ed (all || iface): with it, the reverse-path lookup uses the
    // interception mark, finds the `local default` route of the policy table, and the
    // packet is dropped as a martian.
    let svm: Vec<&str> = std::iter::once("all")
        .chain(intercepted.iter().map(String::as_str))
        .filter(|i| read(i, "src_valid_mark") == "1")
        .collect();
    if !svm.is_empty() {
        w.push(format!(
            "src_valid_mark=1 on {} (set by some VPN tools): marked packets fail reverse-path validation and vanish; set net.ipv4.conf.{{all,IF}}.src_valid_mark=0 unless a VPN needs it",
            svm.join(", ")
        ));
    }

    if c.in_ifaces.is_empty() {
        let all = read("all", "rp_filter");
        let late: Vec<&String> = intercepted
            .iter()
            .filter(|i| !plan.rp_ifaces.contains(i))
            .filter(|i| sysctl::effective_rp_filter(&all, &read(i, "rp_filter")) == 1)
            .collect();
        if !late.is_empty() {
            w.push(format!(
                "interfaces that appeared after apply have strict rp_filter: {}; re-run `setup apply`",
                late.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            ));
        }
    }

    // A forwarding IPv6 interface ignores router advertisements unless accept_ra=2,
    // so a box that learned its own default route by SLAAC loses it when it expires.
    if c.ipv6 {
        let ra_devs = runner
            .run(&crate::runner::Cmd::new(
                "ip",
                &["-6", "route", "show", "default", "proto", "ra"],
            ))
            .map(|o| o.stdout)
            .unwrap_or_default();
        let mut devs: Vec<&str> = ra_devs
            .lines()
            .filter_map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                w.iter()
                    .position(|x| *x == "dev")
                    .and_then(|i| w.get(i + 1).copied())
            })
            .filter(|dev| {
                sysctl::read(runner, &SysctlKey::conf("ipv6", dev, "accept_ra"))
                    .ok()
                    .as_deref()
                    == Some("1")
            })
            .collect();
        devs.sort_unstable();
        devs.dedup();
        if !devs.is_empty() {
            w.push(format!(
                "this box learns its IPv6 default route from router advertisements on {} with accept_ra=1, which a forwarding interface ignores: set net.ipv6.conf.IF.accept_ra=2 or the route expires",
                devs.join(", ")
            ));
        }
    }

    let l = host::listeners(runner, c.port);
    let consequence = match c.fail_mode {
        FailMode::Open => {
            "intercepted traffic is forwarded untouched (fail-open) until the engine starts"
        }
        FailMode::Closed => "intercepted traffic is DROPPED (fail-closed) until the engine starts",
    };
    for (proto, wanted, present) in [
        ("TCP", c.tcp.is_some(), l.tcp),
        ("UDP", c.udp.is_some(), l.udp),
    ] {
        if wanted && !present {
            w.push(format!(
                "nothing listens on {proto} port {} in this namespace: {consequence}",
                c.port
            ));
        }
    }
    w
}
