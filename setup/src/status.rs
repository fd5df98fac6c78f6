//! `setup status`: is everything the engine needs in place, and would intercepted
//! traffic really reach it? If not, one line per finding, each with its fix.
//!
//! Two kinds of problems, two exit codes: the rules themselves missing or wrong
//! ([`EXIT_NOT_READY`]), and rules in place but a data path that does not end in an
//! engine ([`EXIT_NOT_DELIVERING`]): nothing listening (transparently, for every
//! intercepted protocol and family) on the rules' port, a sysctl that makes the
//! kernel drop marked packets, or the box's own input firewall dropping them.

use crate::config::{Backend, Config, FailMode};
use crate::error::SetupError;
use crate::host::{self, run_any, run_checked};
use crate::iproute;
use crate::iptables;
use crate::nft;
use crate::ops::show_table;
use crate::plan::{self, Family, Plan, SysctlWant, L4};
use crate::runner::Runner;
use crate::sockdiag::{DiagSocket, STATE_CLOSE, STATE_LISTEN};
use crate::state::{Loaded, State};
use crate::sysctl::{self, SysctlKey};
use std::fmt::Write as _;
use std::path::Path;

/// Exit code: everything in place and an engine would get the traffic.
pub const EXIT_READY: u8 = 0;
/// Exit code: rules, routes or sysctls missing or wrong (`MISSING` / `CONFLICT`).
pub const EXIT_NOT_READY: u8 = 1;
/// Exit code: the check itself failed (not root, a tool that cannot list its rules).
pub const EXIT_CANNOT_CHECK: u8 = 2;
/// Exit code: the rules are in place, but intercepted traffic would not reach an
/// engine (`BLOCKED` lines).
pub const EXIT_NOT_DELIVERING: u8 = 3;

/// How a status line counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// In place.
    Ok,
    /// Something apply installs is not there.
    Missing,
    /// Something is there but different, or something else is in the way.
    Conflict,
    /// The rules are fine, but traffic would not reach an engine.
    Blocked,
    /// Not wrong by itself, but a known way for TPROXY to fail.
    Warning,
}

impl Level {
    fn tag(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Missing => "MISSING",
            Level::Conflict => "CONFLICT",
            Level::Blocked => "BLOCKED",
            Level::Warning => "warning",
        }
    }
}

/// One status line.
pub type Finding = (Level, String);

/// The outcome of `setup status`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatusReport {
    /// One line per check, in order.
    pub lines: Vec<Finding>,
}

impl StatusReport {
    fn push(&mut self, level: Level, text: impl Into<String>) {
        self.lines.push((level, text.into()));
    }

    fn count(&self, levels: &[Level]) -> usize {
        self.lines
            .iter()
            .filter(|(l, _)| levels.contains(l))
            .count()
    }

    /// Number of MISSING and CONFLICT lines.
    pub fn problems(&self) -> usize {
        self.count(&[Level::Missing, Level::Conflict])
    }

    /// Number of BLOCKED lines.
    pub fn blocked(&self) -> usize {
        self.count(&[Level::Blocked])
    }

    /// Everything the engine needs is in place and the traffic would reach it
    /// (warnings allowed).
    pub fn ready(&self) -> bool {
        self.problems() == 0 && self.blocked() == 0
    }

    /// [`EXIT_READY`], [`EXIT_NOT_READY`] (wins when both apply) or
    /// [`EXIT_NOT_DELIVERING`].
    pub fn exit_code(&self) -> u8 {
        if self.problems() > 0 {
            EXIT_NOT_READY
        } else if self.blocked() > 0 {
            EXIT_NOT_DELIVERING
        } else {
            EXIT_READY
        }
    }

    /// The report as printed, ending with the verdict line.
    pub fn render(&self) -> String {
        let mut s = String::new();
        for (level, text) in &self.lines {
            let _ = writeln!(s, "{}: {text}", level.tag());
        }
        match self.exit_code() {
            EXIT_READY => s.push_str("ringrelay: ready\n"),
            EXIT_NOT_READY => {
                let _ = writeln!(
                    s,
                    "ringrelay: NOT READY ({})",
                    plural(self.problems(), "problem")
                );
            }
            _ => {
                let _ = writeln!(
                    s,
                    "ringrelay: NOT DELIVERING ({}): the rules are in place, but intercepted traffic would not reach an engine",
                    plural(self.blocked(), "finding")
                );
            }
        }
        s
    }
}

fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        format!("1 {word}")
    } else {
        format!("{n} {word}s")
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
    check_journal(state_path, netns, &mut r)?;
    let state = match State::load_for(state_path, netns)? {
        Loaded::Stale(_) => {
            r.push(Level::Warning, crate::ops::stale_note(state_path));
            None
        }
        loaded => loaded.current(),
    };
    let plan = match &state {
        Some(st) => {
            let source = if st.config.source.needs_return_path() {
                format!(", source {}", st.config.source.name())
            } else {
                String::new()
            };
            r.push(
                Level::Ok,
                format!(
                    "applied: backend {}, port {}, fail-{}{source} (state {})",
                    st.config.backend.name(),
                    st.config.port,
                    st.config.fail_mode.name(),
                    state_path.display()
                ),
            );
            if let Some(why) = &st.ipv6_skipped {
                let (_, still) = crate::ops::ipv6_fallback(runner, &Config::default());
                if still.is_none() {
                    r.push(
                        Level::Warning,
                        format!("IPv6 was disabled when setup apply ran ({why}) and is enabled now: IPv6 traffic is not intercepted; re-run `setup apply`"),
                    );
                } else {
                    r.push(
                        Level::Ok,
                        format!("IPv4 only: IPv6 is disabled here ({why})"),
                    );
                }
            }
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
    r.lines.extend(data_path(runner, &plan)?);
    Ok(r)
}

/// An apply that was killed half-way left its journal ([`crate::journal`]). Status
/// only reads; apply and teardown recover.
fn check_journal(state_path: &Path, netns: &str, r: &mut StatusReport) -> Result<(), SetupError> {
    let j = match crate::journal::load(state_path) {
        Ok(Some(j)) => j,
        Ok(None) => return Ok(()),
        Err(e) => {
            r.push(Level::Conflict, e.to_string());
            return Ok(());
        }
    };
    let shown = j.path.display();
    if j.netns != netns {
        r.push(
            Level::Warning,
            format!("apply journal {shown} is from an earlier network namespace: the next apply or teardown removes it"),
        );
        return Ok(());
    }
    let current = State::load_for(state_path, netns)?.current();
    if j.committed(current.as_ref()) {
        r.push(
            Level::Conflict,
            format!("an earlier `setup apply` was interrupted after it had recorded its state (journal {shown}): what the apply before it had added may still be in place; `setup apply` or `setup teardown` finishes the cleanup"),
        );
    } else {
        r.push(
            Level::Conflict,
            format!(
                "an earlier `setup apply` was interrupted (killed?) after beginning {} steps (journal {shown}): what it changed is not in the state file; `setup apply` undoes it and applies again, `setup teardown` undoes it",
                j.begun()
            ),
        );
    }
    Ok(())
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
            let what = format!("nft table inet {}", plan::NFT_TABLE);
            match recorded {
                None if !nft::has_marker(&out.stdout) => r.push(
                    Level::Conflict,
                    format!(
                        "{what} exists but setup did not create it (no marker comment, no state): `setup apply` refuses to replace it; rename or move that table"
                    ),
                ),
                None => r.push(
                    Level::Warning,
                    format!(
                        "{what} carries setup's marker but no state file records it (state lost, or an apply was interrupted): `setup teardown` removes it, `setup apply` replaces it"
                    ),
                ),
                Some(_) => compare(r, &what, recorded, &live),
            }
            check_return_path_nft(plan, &live, r);
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
                if !saved.chains.is_empty() {
                    check_return_path_iptables(plan, family, &saved.lines, r);
                }
            }
            compare(r, "iptables mangle chains", recorded, &live_all);
        }
    }
    // The other backend's objects would intercept too (or instead).
    if c.backend != Backend::Nft {
        match crate::ops::nft_table_owner(runner) {
            Ok(crate::ops::TableOwner::Marked) => r.push(
                Level::Conflict,
                format!(
                    "a leftover nft table inet {} intercepts as well: `setup teardown` removes it",
                    plan::NFT_TABLE
                ),
            ),
            Ok(crate::ops::TableOwner::Unmarked) => r.push(
                Level::Conflict,
                format!(
                    "an nft table inet {} that setup did not create exists: check that it does not intercept the same traffic",
                    plan::NFT_TABLE
                ),
            ),
            _ => {}
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

/// The fix for a missing return path: the apply that installs it.
fn return_path_fix(plan: &Plan) -> String {
    let c = &plan.config;
    format!(
        "re-run `setup apply --source {} --in-iface {}` with the other options of the last apply",
        c.source.name(),
        c.in_ifaces.join(",")
    )
}

/// What happens to replies without the return path (measured in the lab: the first
/// SYN-ACK is forwarded to the client, which resets it; retransmissions and UDP
/// replies are dropped in the router, where early demux attached the socket).
const WITHOUT_RETURN_PATH: &str = "servers' replies to client addresses are forwarded to the clients or dropped instead of reaching the engine's upstream sockets: no relayed connection or flow gets an answer";

fn return_path_ok(plan: &Plan, how: &str) -> String {
    let c = &plan.config;
    format!(
        "return path of --source {}: replies to client addresses that arrive on interfaces other than {} go to the engine's upstream sockets ({how})",
        c.source.name(),
        c.in_ifaces.join(", ")
    )
}

/// `--source client-ip|client`: the nft table must hold the socket rule.
fn check_return_path_nft(plan: &Plan, live: &[String], r: &mut StatusReport) {
    if !plan.firewall.has_return_path() {
        return;
    }
    let present = live.iter().any(|l| {
        l.contains("socket transparent 1")
            && l.contains("socket wildcard 0")
            && l.contains("meta mark set")
    });
    if present {
        r.push(
            Level::Ok,
            return_path_ok(plan, "nft socket rule in chain prerouting"),
        );
    } else {
        r.push(
            Level::Missing,
            format!(
                "return path of --source {}: nft table inet {} has no `socket transparent 1 socket wildcard 0 ... meta mark set` rule, so {WITHOUT_RETURN_PATH}; fix: {}",
                plan.config.source.name(),
                plan::NFT_TABLE,
                return_path_fix(plan)
            ),
        );
    }
}

/// `--source client-ip|client`: RINGRELAY must hold the `-m socket` rules of the family.
fn check_return_path_iptables(
    plan: &Plan,
    family: Family,
    saved_lines: &[String],
    r: &mut StatusReport,
) {
    let wanted: Vec<String> = plan
        .firewall
        .return_path
        .iter()
        .flat_map(|rule| iptables::render_rule(plan::IPT_CHAIN, rule, family))
        .collect();
    if wanted.is_empty() {
        return;
    }
    let missing: Vec<&String> = wanted.iter().filter(|w| !saved_lines.contains(w)).collect();
    let tool = family.iptables();
    if missing.is_empty() {
        r.push(
            Level::Ok,
            return_path_ok(
                plan,
                &format!("{tool} -m socket rules in chain {}", plan::IPT_CHAIN),
            ),
        );
    } else {
        let shown: Vec<String> = missing.iter().map(|l| format!("`{l}`")).collect();
        r.push(
            Level::Missing,
            format!(
                "return path of --source {}: {tool} mangle chain {} lacks {}, so {WITHOUT_RETURN_PATH}; fix: {}",
                plan.config.source.name(),
                plan::IPT_CHAIN,
                shown.join(" and "),
                return_path_fix(plan)
            ),
        );
    }
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
        let shown = iproute::untagged(&iproute::rule_add_cmd(rule)).replacen(" add", "", 1);
        match prefs.len() {
            0 => r.push(Level::Missing, shown),
            1 => r.push(Level::Ok, format!("{shown} (pref {})", prefs[0])),
            n => r.push(Level::Warning, format!("{shown} is present {n} times")),
        }
    }
    for route in &plan.routes {
        let table = show_table(runner, route.family, route.table)?;
        let shown = iproute::untagged(&iproute::route_add_cmd(route)).replacen(" add", "", 1);
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

/// The interfaces whose traffic the plan intercepts, as they exist now.
pub fn intercepted_ifaces(runner: &dyn Runner, plan: &Plan) -> Vec<String> {
    let c = &plan.config;
    if c.in_ifaces.is_empty() {
        host::interfaces(runner)
            .unwrap_or_default()
            .into_iter()
            .filter(|i| i != "lo")
            .collect()
    } else {
        c.in_ifaces.clone()
    }
}

/// Would intercepted traffic reach an engine? `BLOCKED` findings for what stops it
/// (no transparent listener on the port, `src_valid_mark`), `ok` when the listeners
/// are there, and warnings for known traps (strict rp_filter on interfaces that
/// appeared after apply, IPv6 router advertisements ignored). Apply prints the same
/// findings as warnings.
pub fn data_path(runner: &dyn Runner, plan: &Plan) -> Result<Vec<Finding>, SetupError> {
    let c = &plan.config;
    let mut out = Vec::new();
    let intercepted = intercepted_ifaces(runner, plan);

    check_listeners(runner, plan, &mut out);
    check_input_hook(runner, plan, &intercepted, &mut out)?;

    let read = |iface: &str, leaf: &str| {
        sysctl::read(runner, &SysctlKey::conf("ipv4", iface, leaf)).unwrap_or_default()
    };
    // src_valid_mark is OR-ed (all || iface): with it, the reverse-path lookup of the
    // client's address uses the interception mark, the policy rule sends it to the
    // table whose `local default` route makes every address local, and the packet is
    // dropped as a martian. accept_local (also OR-ed) lets a local source through.
    let on = |iface: &str, leaf: &str| read("all", leaf) == "1" || read(iface, leaf) == "1";
    if plan.families().contains(&Family::V4) {
        let hit: Vec<&str> = intercepted
            .iter()
            .map(String::as_str)
            .filter(|i| on(i, "src_valid_mark") && !on(i, "accept_local"))
            .collect();
        if !hit.is_empty() {
            let keys: Vec<String> = std::iter::once("all")
                .chain(hit.iter().copied())
                .filter(|i| read(i, "src_valid_mark") == "1")
                .map(|i| SysctlKey::conf("ipv4", i, "src_valid_mark").dotted())
                .collect();
            let fix: Vec<String> = keys.iter().map(|k| format!("sysctl -w {k}=0")).collect();
            out.push((
                Level::Blocked,
                format!(
                    "src_valid_mark=1 ({}) on intercepted interfaces {}: the reverse-path check routes the client's address with the interception mark, finds `local default dev lo` in table {} and drops intercepted IPv4 packets as martians (some VPN tools such as wg-quick set it); fix: `{}`, or if a VPN needs it, `sysctl -w net.ipv4.conf.IF.accept_local=1` on those interfaces",
                    keys.join(", "),
                    hit.join(", "),
                    c.table,
                    fix.join("` and `")
                ),
            ));
        }
    }

    // The same trap for the return path: the replies carry the interception mark when
    // their source (the server) is checked. Measured in the lab: src_valid_mark=1 on
    // `all` or on the server-facing interface drops them, accept_local=1 lets them
    // through, and rp_filter (0, 1 or 2) makes no difference.
    if plan.firewall.has_return_path() && plan.families().contains(&Family::V4) {
        let server_side: Vec<String> = host::interfaces(runner)
            .unwrap_or_default()
            .into_iter()
            .filter(|i| i != "lo" && !c.in_ifaces.contains(i))
            .filter(|i| on(i, "src_valid_mark") && !on(i, "accept_local"))
            .collect();
        if !server_side.is_empty() {
            let keys: Vec<String> = std::iter::once("all")
                .chain(server_side.iter().map(String::as_str))
                .filter(|i| read(i, "src_valid_mark") == "1")
                .map(|i| SysctlKey::conf("ipv4", i, "src_valid_mark").dotted())
                .collect();
            let fix: Vec<String> = keys.iter().map(|k| format!("sysctl -w {k}=0")).collect();
            out.push((
                Level::Blocked,
                format!(
                    "src_valid_mark=1 ({}) on server-facing interfaces {}: the return path of --source {} marks servers' replies to client addresses, and the reverse-path check then routes the server's address with that mark, finds `local default dev lo` in table {} and drops the replies as martians, so no upstream connection from a client address completes; fix: `{}`, or if a VPN needs it, `sysctl -w net.ipv4.conf.IF.accept_local=1` on those interfaces",
                    keys.join(", "),
                    server_side.join(", "),
                    c.source.name(),
                    c.table,
                    fix.join("` and `")
                ),
            ));
        }
    }

    if c.in_ifaces.is_empty() {
        let all = read("all", "rp_filter");
        let late: Vec<&String> = intercepted
            .iter()
            .filter(|i| !plan.rp_ifaces.contains(i))
            .filter(|i| sysctl::effective_rp_filter(&all, &read(i, "rp_filter")) == 1)
            .collect();
        if !late.is_empty() {
            out.push((
                Level::Warning,
                format!(
                    "interfaces that appeared after apply have strict rp_filter: {}; re-run `setup apply`",
                    late.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                ),
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
            out.push((
                Level::Warning,
                format!(
                    "this box learns its IPv6 default route from router advertisements on {} with accept_ra=1, which a forwarding interface ignores: set net.ipv6.conf.IF.accept_ra=2 or the route expires",
                    devs.join(", ")
                ),
            ));
        }
    }
    Ok(out)
}

/// The box's own firewall: does an input-hook chain drop intercepted packets?
fn check_input_hook(
    runner: &dyn Runner,
    plan: &Plan,
    ifaces: &[String],
    out: &mut Vec<Finding>,
) -> Result<(), SetupError> {
    let c = &plan.config;
    let hook = crate::input::read(runner)?;
    for what in &hook.unreadable {
        out.push((
            Level::Warning,
            format!("could not read the input-hook firewall ({what}): a chain there that drops intercepted packets would go unnoticed"),
        ));
    }
    let blocking = hook.blocking(&crate::ops::intercepted(runner, plan));
    for b in &blocking {
        out.push((Level::Blocked, b.message(c.fwmark, ifaces.len())));
    }
    for target in hook.with_accept_rule() {
        if !blocking.iter().any(|b| b.target == target) {
            out.push((
                Level::Ok,
                format!("{target} accepts the interception mark (setup apply --accept-input)"),
            ));
        }
    }
    Ok(())
}

fn family_name(f: Family) -> &'static str {
    match f {
        Family::V4 => "IPv4",
        Family::V6 => "IPv6",
    }
}

fn join_families(fams: &[Family]) -> String {
    fams.iter()
        .map(|f| family_name(*f))
        .collect::<Vec<_>>()
        .join(" and ")
}

/// Every socket of the namespace, from `sock_diag`, or from `/proc/net` (with a
/// warning) when the kernel cannot be asked.
fn gather_sockets(runner: &dyn Runner) -> (Vec<DiagSocket>, Option<String>) {
    let mut all = Vec::new();
    for family in [Family::V4, Family::V6] {
        for l4 in [L4::Tcp, L4::Udp] {
            match runner.sockets(family, l4) {
                Ok(v) => all.extend(v),
                // No IPv6 in this kernel: no IPv6 sockets either.
                Err(_) if family == Family::V6 && !host::ipv6_available(runner) => {}
                Err(e) => return (host::proc_sockets(runner), Some(e.to_string())),
            }
        }
    }
    (all, None)
}

/// Is there a transparent socket for every intercepted protocol and family on the
/// rules' port? That is what nft `tproxy` / iptables `TPROXY` look up.
fn check_listeners(runner: &dyn Runner, plan: &Plan, out: &mut Vec<Finding>) {
    let c = &plan.config;
    let port = c.port;
    let families = plan.families();
    let protos: Vec<L4> = [(L4::Tcp, c.tcp.is_some()), (L4::Udp, c.udp.is_some())]
        .into_iter()
        .filter_map(|(p, on)| on.then_some(p))
        .collect();
    let (socks, fallback) = gather_sockets(runner);
    if let Some(why) = &fallback {
        out.push((
            Level::Warning,
            format!(
                "could not ask the kernel's sock_diag for sockets ({why}): listeners were looked up in /proc/net, which does not show IP_TRANSPARENT, so a non-transparent socket on port {port} would pass"
            ),
        ));
    }
    let consequence = match c.fail_mode {
        FailMode::Open => "intercepted traffic is forwarded untouched (fail-open), not relayed",
        FailMode::Closed => "intercepted traffic is DROPPED (fail-closed)",
    };
    let mut missing: Vec<(L4, Family)> = Vec::new();
    let mut served: Vec<String> = Vec::new();
    for &l4 in &protos {
        for &family in families {
            let serving: Vec<&DiagSocket> = socks
                .iter()
                .filter(|s| s.serves(l4, family, port))
                .collect();
            if serving.iter().any(|s| s.transparent != Some(false)) {
                served.push(format!(
                    "{} {}",
                    family_name(family),
                    l4.name().to_uppercase()
                ));
            } else if let Some(s) = serving.first() {
                out.push((
                    Level::Blocked,
                    format!(
                        "{} port {port} ({}) is held by a socket without IP_TRANSPARENT (inode {}): tproxy only hands packets to transparent sockets, so {consequence}; fix: stop that program (`ss -lnpe 'sport = :{port}'` names it), or move both sides to a free port (`setup apply --port N` and `engine --port N`)",
                        l4.name().to_uppercase(),
                        family_name(family),
                        s.inode
                    ),
                ));
            } else {
                missing.push((l4, family));
            }
        }
    }
    let nothing_at_all = served.is_empty() && missing.len() == protos.len() * families.len();
    for &l4 in &protos {
        let fams: Vec<Family> = missing
            .iter()
            .filter(|(p, _)| *p == l4)
            .map(|(_, f)| *f)
            .collect();
        if fams.is_empty() {
            continue;
        }
        let name = l4.name().to_uppercase();
        let fix = if nothing_at_all {
            format!("start the engine in this network namespace: `engine --port {port}`")
        } else if fams.len() == families.len() {
            format!(
                "the engine seems to run with --no-{}: restart it without, or stop intercepting {name} with `setup apply --no-{}`",
                l4.name(),
                l4.name()
            )
        } else if fams == [Family::V6] {
            "the engine seems to run with --no-ipv6: restart it without, or stop intercepting IPv6 with `setup apply --no-ipv6`".to_string()
        } else {
            format!("restart the engine (`engine --port {port}`)")
        };
        // A transparent socket on another port: an engine with a different --port?
        let mut others: Vec<u16> = socks
            .iter()
            .filter(|s| {
                s.l4 == l4
                    && s.port != port
                    && s.transparent == Some(true)
                    && s.is_wildcard()
                    && s.state
                        == if l4 == L4::Tcp {
                            STATE_LISTEN
                        } else {
                            STATE_CLOSE
                        }
            })
            .map(|s| s.port)
            .collect();
        others.sort_unstable();
        others.dedup();
        let hint = match others.first() {
            Some(p) => format!(
                "; a transparent {name} socket listens on port {p} instead: an engine with `--port {p}`? then re-apply with `setup apply --port {p}` or restart it with `--port {port}`"
            ),
            None => String::new(),
        };
        out.push((
            Level::Blocked,
            format!(
                "nothing listens on {name} port {port} ({}) in this network namespace: {consequence}; fix: {fix}{hint}",
                join_families(&fams)
            ),
        ));
    }
    if !served.is_empty() && missing.is_empty() && out.iter().all(|(l, _)| *l != Level::Blocked) {
        out.push((
            Level::Ok,
            format!(
                "transparent listeners on port {port}: {}",
                served.join(", ")
            ),
        ));
    }
}
