//! `apply`, `teardown` and `apply --dry-run`: the plan as a transaction.
//!
//! Apply order (house style lesson 9):
//! 1. validate everything that can be validated without changing anything
//!    ([`preflight`]): options, interfaces, programs, privileges, the routing table;
//! 2. the firewall in one atomic call (`nft -f -`, or one `iptables-restore --noflush`
//!    commit per family);
//! 3. ip rules and local routes, each only if missing;
//! 4. sysctls, remembering the previous values;
//! 5. the state file.
//!
//! Every step done pushes its inverse on an undo list; if a later step fails the list
//! runs backwards and the box is left as it was. Teardown removes what the state file
//! says apply added, and nothing else.

use crate::config::{Backend, Config};
use crate::error::SetupError;
use crate::host::{self, run_any, run_checked};
use crate::input::{self, InputTarget, Intercepted};
use crate::iproute::{self, ShownRule, TableRoutes};
use crate::iptables::{self, SavedMangle};
use crate::journal::{self, Journal};
use crate::nft;
use crate::plan::{self, Family, IpRule, LocalRoute, Plan, SysctlWant};
use crate::runner::{Cmd, Runner};
use crate::state::{Loaded, MangleOrigin, RouteRecord, RuleRecord, State, SysctlRecord};
use crate::status;
use crate::sysctl::{self, SysctlKey};
use std::path::Path;

/// What apply or teardown did, for the operator.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// One line per step.
    pub lines: Vec<String>,
    /// Known traps found on the way (printed as `warning: ...`).
    pub warnings: Vec<String>,
}

impl Report {
    fn line(&mut self, s: impl Into<String>) {
        self.lines.push(s.into());
    }

    fn warn(&mut self, s: impl Into<String>) {
        self.warnings.push(s.into());
    }
}

/// Whether [`preflight`] prepares a real apply or a dry run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Everything must be in place: programs and privileges too.
    Apply,
    /// Only what decides the printed plan; missing programs or privileges are noted
    /// in the output instead.
    DryRun,
}

/// The programs a backend needs.
pub fn required_programs(config: &Config) -> Vec<&'static str> {
    let mut v = match config.backend {
        Backend::Nft => vec!["nft"],
        Backend::Iptables => vec!["iptables", "iptables-restore", "iptables-save"],
    };
    if config.backend == Backend::Iptables && config.ipv6 {
        v.extend(["ip6tables-restore", "ip6tables-save"]);
    }
    v.push("ip");
    v
}

/// Checks everything apply needs before anything changes; returns the interfaces of
/// this namespace.
pub fn preflight(
    runner: &dyn Runner,
    config: &Config,
    mode: Mode,
) -> Result<Vec<String>, SetupError> {
    config.validate()?;
    let host_ifaces = host::interfaces(runner)?;
    for name in &config.in_ifaces {
        if !host_ifaces.contains(name) {
            return Err(SetupError::UnknownInterface { name: name.clone() });
        }
    }
    if config.ipv6 && !host::ipv6_available(runner) {
        return Err(SetupError::Ipv6Unavailable);
    }
    if host::interface_up(runner, "lo") == Some(false) {
        return Err(SetupError::LoopbackDown);
    }
    if mode == Mode::Apply {
        for program in required_programs(config) {
            host::require_program(runner, program)?;
        }
        if host::has_cap_net_admin(runner) == Some(false) {
            return Err(SetupError::NotPermitted {
                what: "setup apply".to_string(),
            });
        }
    }
    if runner.find_program("ip").is_some() {
        let families: &[Family] = if config.ipv6 {
            &[Family::V4, Family::V6]
        } else {
            &[Family::V4]
        };
        for &family in families {
            let table = show_table(runner, family, config.table)?;
            if !table.foreign.is_empty() {
                return Err(SetupError::TableInUse {
                    table: config.table,
                    routes: table.foreign.join("; "),
                });
            }
        }
    }
    Ok(host_ifaces)
}

/// `setup apply`: installs the plan for `config`, records it in `state_path`.
pub fn apply(
    runner: &dyn Runner,
    config: &Config,
    state_path: &Path,
    netns: &str,
) -> Result<Report, SetupError> {
    let mut report = Report::default();
    // An apply that was killed half-way: undo it (or finish it) first.
    report.lines.extend(recover(runner, state_path, netns)?);
    let (config, ipv6_skipped) = ipv6_fallback(runner, config);
    let config = &config;
    if let Some(why) = &ipv6_skipped {
        report.warn(ipv6_skip_warning(why));
    }
    let host_ifaces = preflight(runner, config, Mode::Apply)?;
    let plan = plan::build(config, &host_ifaces);
    let old = match State::load_for(state_path, netns)? {
        Loaded::Stale(_) => {
            report.warn(stale_note(state_path));
            None
        }
        loaded => loaded.current(),
    };
    if config.backend == Backend::Nft {
        check_nft_owner(runner, old.as_ref())?;
    }
    // Journal first, then act: every step's inverse is on disk before the step runs.
    let id = journal::new_id();
    let mut txn = Txn {
        undo: Vec::new(),
        journal: Journal::begin(state_path, &id, netns, old.as_ref())?,
    };
    let mut state = match apply_steps(runner, &plan, old.as_ref(), netns, &mut txn, &mut report) {
        Ok(state) => state,
        Err(e) => return Err(fail(runner, e, txn)),
    };
    state.ipv6_skipped = ipv6_skipped;
    state.apply_id = Some(id);
    // The commit point: from here on, the journal only says "finish the cleanup".
    if let Err(e) = state.save(state_path) {
        return Err(fail(runner, e, txn));
    }
    report.line(format!("state recorded in {}", state_path.display()));
    if let Some(old) = &old {
        cleanup_old(runner, old, &state, &mut report);
    }
    let journal_path = txn.journal.path().to_path_buf();
    if let Err(e) = txn.journal.finish() {
        report.warn(format!(
            "{e} (the apply is complete; the next run removes {})",
            journal_path.display()
        ));
    }
    // What status would call BLOCKED: printed as warnings (nothing listening is
    // expected until the engine starts).
    match status::data_path(runner, &plan) {
        Ok(findings) => report.warnings.extend(
            findings
                .into_iter()
                .filter(|(level, _)| {
                    matches!(level, status::Level::Blocked | status::Level::Warning)
                })
                .map(|(_, text)| text),
        ),
        Err(e) => report.warn(format!("could not check the data path: {e}")),
    }
    Ok(report)
}

/// IPv6 is wanted but disabled in this namespace: the IPv4-only config to apply
/// instead, and why. Checked before anything changes: with `disable_ipv6=1` on `lo`,
/// `ip -6 route add local ::/0 dev lo` fails ("IPv6 is disabled on nexthop device")
/// after the firewall and the ip rules are in place.
pub fn ipv6_fallback(runner: &dyn Runner, config: &Config) -> (Config, Option<String>) {
    if !config.ipv6 {
        return (config.clone(), None);
    }
    let why = if !host::ipv6_available(runner) {
        Some("no /proc/sys/net/ipv6: booted with ipv6.disable=1, or no IPv6 module".to_string())
    } else {
        let disabled: Vec<String> = ["all", "lo"]
            .iter()
            .map(|i| SysctlKey::conf("ipv6", i, "disable_ipv6"))
            .filter(|k| sysctl::read(runner, k).ok().as_deref() == Some("1"))
            .map(|k| format!("{k}=1"))
            .collect();
        (!disabled.is_empty()).then(|| disabled.join(", "))
    };
    match why {
        Some(why) => (
            Config {
                ipv6: false,
                ..config.clone()
            },
            Some(why),
        ),
        None => (config.clone(), None),
    }
}

/// The warning for [`ipv6_fallback`].
pub fn ipv6_skip_warning(why: &str) -> String {
    format!(
        "IPv6 is disabled here ({why}): setting up IPv4 only; pass --no-ipv6 to say so (and start the engine with --no-ipv6), or enable IPv6 and re-run `setup apply`"
    )
}

/// What `nft list table inet ringrelay` shows: nothing, setup's table, or someone
/// else's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableOwner {
    /// No such table (or nft is not installed).
    Absent,
    /// It carries setup's marker comment.
    Marked,
    /// It exists without the marker.
    Unmarked,
}

/// Who owns `table inet ringrelay`, by its marker comment.
pub fn nft_table_owner(runner: &dyn Runner) -> Result<TableOwner, SetupError> {
    if runner.find_program("nft").is_none() {
        return Ok(TableOwner::Absent);
    }
    let out = run_any(runner, &nft::list_cmd())?;
    // A table that does not exist is an error ("No such file or directory"); so is
    // one we may not read, and then the apply itself reports EPERM.
    if !out.success() || out.stdout.trim().is_empty() {
        return Ok(TableOwner::Absent);
    }
    Ok(if nft::has_marker(&out.stdout) {
        TableOwner::Marked
    } else {
        TableOwner::Unmarked
    })
}

/// Refuses to replace a `table inet ringrelay` that setup did not create: it must
/// carry the marker, or the state file must record that setup installed it (a table
/// of an older setup, from before the marker).
fn check_nft_owner(runner: &dyn Runner, old: Option<&State>) -> Result<(), SetupError> {
    let recorded = old.is_some_and(|o| o.config.backend == Backend::Nft);
    match nft_table_owner(runner)? {
        TableOwner::Unmarked if !recorded => Err(SetupError::ForeignTable {
            table: plan::NFT_TABLE,
            marker: plan::NFT_TABLE_COMMENT,
        }),
        _ => Ok(()),
    }
}

/// Undoes what apply did and wraps the cause with the outcome. The journal goes
/// when the rollback is complete; otherwise it stays, and the next apply or teardown
/// retries the rest.
fn fail(runner: &dyn Runner, cause: SetupError, txn: Txn) -> SetupError {
    let Txn { undo, journal } = txn;
    let rollback = if undo.is_empty() {
        let _ = journal.finish();
        "nothing was changed".to_string()
    } else {
        let errors = rollback(runner, undo);
        if errors.is_empty() {
            let _ = journal.finish();
            "everything apply had changed was rolled back".to_string()
        } else {
            format!(
                "rollback incomplete ({}): the journal {} keeps what is left; `setup teardown` retries it",
                errors.join("; "),
                journal.path().display()
            )
        }
    };
    SetupError::ApplyFailed {
        cause: Box::new(cause),
        rollback,
    }
}

/// The steps an apply has begun: their inverses, in memory and in the journal.
struct Txn {
    undo: Vec<Undo>,
    journal: Journal,
}

impl Txn {
    /// Records `undo` in the journal (synced), then remembers it: call before the
    /// step runs, so that a kill at any point leaves its inverse on disk.
    fn begin(&mut self, undo: Undo) -> Result<(), SetupError> {
        self.journal.record(&undo.journal_line())?;
        self.undo.push(undo);
        Ok(())
    }

    /// [`begin`](Self::begin), then the step. A step that fails changed nothing (nft
    /// and iptables-restore commit atomically; a refused `ip` or sysctl write leaves
    /// things as they were), so its inverse is not run by the in-process rollback; it
    /// stays in the journal, where running it is harmless.
    fn step<T>(
        &mut self,
        undo: Undo,
        act: impl FnOnce() -> Result<T, SetupError>,
    ) -> Result<T, SetupError> {
        self.begin(undo)?;
        act().inspect_err(|_| {
            self.undo.pop();
        })
    }

    /// The priority the kernel gave the rule just added: journalled too, so that
    /// recovery deletes exactly that rule.
    fn rule_pref(&mut self, family: Family, pref: u32) -> Result<(), SetupError> {
        self.journal
            .record(&format!("rule-pref {} {pref}", family.name()))?;
        if let Some(Undo::DelRule { rule, pref: p }) = self.undo.last_mut() {
            if rule.family == family {
                *p = Some(pref);
            }
        }
        Ok(())
    }
}

/// Recovers from an apply that was interrupted (killed) before it finished: its
/// journal is there. If the apply had recorded its state, only the cleanup of the
/// apply before it may be unfinished: that runs again. Otherwise every journalled
/// step is undone, newest first. Returns what was done, for the report.
pub fn recover(
    runner: &dyn Runner,
    state_path: &Path,
    netns: &str,
) -> Result<Vec<String>, SetupError> {
    let Some(j) = journal::load(state_path)? else {
        return Ok(Vec::new());
    };
    let shown = j.path.display().to_string();
    if j.netns != netns {
        journal::remove(&j.path)?;
        return Ok(vec![format!(
            "apply journal {shown} was written in an earlier network namespace (deleted since) or before a reboot: removed, it describes nothing that exists here"
        )]);
    }
    let current = State::load_for(state_path, netns)?.current();
    let mut report = Report::default();
    if j.committed(current.as_ref()) {
        if let (Some(prev), Some(now)) = (&j.prev, &current) {
            cleanup_old(runner, prev, now, &mut report);
        }
        journal::remove(&j.path)?;
        let mut lines = vec![format!(
            "an earlier `setup apply` was interrupted after it had recorded its state (journal {shown}): finished removing what the apply before it had added"
        )];
        lines.extend(report.lines);
        lines.extend(report.warnings.into_iter().map(|w| format!("warning: {w}")));
        return Ok(lines);
    }
    let mut undo = Vec::new();
    for step in &j.steps {
        match Undo::parse(step, j.prev.as_ref()) {
            Some(UndoLine::Step(u)) => undo.push(*u),
            Some(UndoLine::RulePref(family, p)) => {
                if let Some(Undo::DelRule { rule, pref }) = undo.last_mut() {
                    if rule.family == family {
                        *pref = Some(p);
                    }
                }
            }
            None => {
                return Err(SetupError::BadJournal {
                    path: j.path.clone(),
                    reason: format!("unknown step {step:?}"),
                })
            }
        }
    }
    let n = undo.len();
    let errors = rollback(runner, undo);
    if !errors.is_empty() {
        return Err(SetupError::RecoveryIncomplete {
            failures: errors.join("; "),
            path: j.path.clone(),
        });
    }
    journal::remove(&j.path)?;
    let before = if j.prev.is_some() {
        "as the apply before it left it"
    } else {
        "as it was before"
    };
    Ok(vec![format!(
        "recovered from an interrupted `setup apply` (journal {shown}): undid the {n} steps it had begun; the box is {before}"
    )])
}

/// The inverse of one apply step.
#[derive(Debug)]
enum Undo {
    /// Put the nft table back as the previous apply left it, or delete it.
    Nft(Option<Plan>),
    /// Put one family's iptables chains back, or remove them.
    Iptables {
        family: Family,
        old: Option<Plan>,
        origin: Option<MangleOrigin>,
    },
    /// Delete an ip rule apply added.
    DelRule { rule: IpRule, pref: Option<u32> },
    /// Delete a route apply added.
    DelRoute(LocalRoute),
    /// Write a sysctl back.
    Sysctl { key: SysctlKey, value: String },
    /// Take our accept rule out of a chain of the box's own input firewall.
    InputRule(InputTarget),
}

/// A journal line read back: a step, or the priority of the rule step before it.
enum UndoLine {
    Step(Box<Undo>),
    RulePref(Family, u32),
}

impl Undo {
    /// The journal form (the plans of the previous apply come from the copy of its
    /// state at the top of the journal, so they are not repeated here).
    fn journal_line(&self) -> String {
        match self {
            Undo::Nft(_) => "nft".to_string(),
            Undo::Iptables { family, origin, .. } => match origin {
                Some(o) => format!(
                    "iptables {} {} {}",
                    family.name(),
                    u8::from(o.table_existed),
                    u8::from(o.prerouting_existed)
                ),
                None => format!("iptables {} -", family.name()),
            },
            Undo::DelRule { rule, .. } => {
                format!("rule {} {} {}", rule.family.name(), rule.mark, rule.table)
            }
            Undo::DelRoute(r) => format!("route {} {}", r.family.name(), r.table),
            Undo::Sysctl { key, value } => format!("sysctl {} {value}", key.rel()),
            Undo::InputRule(t) => format!("input {}", t.render()),
        }
    }

    fn parse(line: &str, prev: Option<&State>) -> Option<UndoLine> {
        let w: Vec<&str> = line.split_whitespace().collect();
        let prev_plan = |backend: Backend| {
            prev.filter(|p| p.config.backend == backend)
                .map(State::plan)
        };
        let step = match w.as_slice() {
            ["nft"] => Undo::Nft(prev_plan(Backend::Nft)),
            ["iptables", f, rest @ ..] => Undo::Iptables {
                family: Family::from_name(f)?,
                old: prev_plan(Backend::Iptables),
                origin: match rest {
                    [t, p] => Some(MangleOrigin {
                        family: Family::from_name(f)?,
                        table_existed: *t == "1",
                        prerouting_existed: *p == "1",
                    }),
                    _ => None,
                },
            },
            ["rule", f, mark, table] => Undo::DelRule {
                rule: IpRule {
                    family: Family::from_name(f)?,
                    mark: crate::config::parse_mark(mark).ok()?,
                    table: table.parse().ok()?,
                },
                pref: None,
            },
            ["rule-pref", f, pref] => {
                return Some(UndoLine::RulePref(
                    Family::from_name(f)?,
                    pref.parse().ok()?,
                ))
            }
            ["route", f, table] => Undo::DelRoute(LocalRoute {
                family: Family::from_name(f)?,
                table: table.parse().ok()?,
            }),
            ["sysctl", key, ..] => Undo::Sysctl {
                key: SysctlKey::new(key),
                value: line.splitn(3, ' ').nth(2).unwrap_or("").to_string(),
            },
            ["input", rest @ ..] => Undo::InputRule(InputTarget::parse(rest)?),
            _ => return None,
        };
        Some(UndoLine::Step(Box::new(step)))
    }
}

fn rollback(runner: &dyn Runner, undo: Vec<Undo>) -> Vec<String> {
    let mut errors = Vec::new();
    for u in undo.into_iter().rev() {
        let result = match &u {
            Undo::Nft(Some(old)) => {
                run_checked(runner, &nft::apply_cmd(nft::render_apply(old))).map(drop)
            }
            Undo::Nft(None) => remove_nft(runner),
            Undo::Iptables {
                family,
                old,
                origin,
            } => match old {
                Some(old) if old.families().contains(family) => {
                    apply_iptables_family(runner, old, *family)
                }
                _ => remove_iptables_family(runner, *family, *origin).map(drop),
            },
            Undo::DelRule { rule, pref } => delete_rule(runner, rule, *pref),
            Undo::DelRoute(route) => delete_route(runner, route),
            Undo::Sysctl { key, value } => restore_value(runner, key, value),
            Undo::InputRule(target) => input::remove(runner, target).map(drop),
        };
        if let Err(e) = result {
            errors.push(e.to_string());
        }
    }
    errors
}

fn apply_steps(
    runner: &dyn Runner,
    plan: &Plan,
    old: Option<&State>,
    netns: &str,
    txn: &mut Txn,
    report: &mut Report,
) -> Result<State, SetupError> {
    let c = &plan.config;
    let same_backend = old.filter(|o| o.config.backend == c.backend);

    // 1. Firewall: one atomic call (per family for iptables).
    let mut mangle = Vec::new();
    match c.backend {
        Backend::Nft => {
            txn.step(Undo::Nft(same_backend.map(State::plan)), || {
                run_checked(runner, &nft::apply_cmd(nft::render_apply(plan)))
            })?;
            report.line(format!(
                "nft: table inet {} installed in one transaction{}",
                plan::NFT_TABLE,
                return_path_note(plan)
            ));
        }
        Backend::Iptables => {
            let nf_tables = iptables_is_nf_tables(runner)?;
            for &family in plan.families() {
                let origin = nf_tables.then(|| {
                    same_backend
                        .and_then(|o| o.mangle.iter().find(|m| m.family == family).copied())
                        .unwrap_or_else(|| mangle_origin(runner, family))
                });
                let undo = Undo::Iptables {
                    family,
                    old: same_backend.map(State::plan),
                    origin,
                };
                txn.step(undo, || apply_iptables_family(runner, plan, family))?;
                mangle.extend(origin);
                report.line(format!(
                    "{}: chains {} and {} installed in one commit{}",
                    family.iptables(),
                    plan::IPT_CHAIN,
                    plan::IPT_TPROXY_CHAIN,
                    return_path_note(plan)
                ));
            }
        }
    }

    // 1b. The box's own input firewall: accept the interception mark where a chain
    // would drop intercepted packets (`--accept-input`).
    let mut input_rules = Vec::new();
    if c.accept_input {
        let hook = input::read(runner)?;
        // Ours by their comment: kept (teardown removes them), never added twice.
        input_rules = hook.with_accept_rule();
        for b in hook.blocking(&intercepted(runner, plan)) {
            if input_rules.contains(&b.target) {
                continue;
            }
            txn.step(Undo::InputRule(b.target.clone()), || {
                input::insert(runner, &b.target, c.fwmark)
            })?;
            report.line(format!(
                "{}: inserted `{}` at the top (it dropped intercepted packets at `{}`)",
                b.target,
                b.target.rule_text(c.fwmark),
                b.by
            ));
            input_rules.push(b.target);
        }
    }

    // 2. Policy rules, only where missing (`ip rule add` would duplicate them).
    let mut rules = Vec::new();
    for rule in &plan.ip_rules {
        let shown = list_rules(runner, rule.family)?;
        let found = iproute::find_rule(&shown, rule);
        let old_rec = old
            .filter(|o| o.config.fwmark == rule.mark && o.config.table == rule.table)
            .and_then(|o| o.rules.iter().find(|r| r.family == rule.family));
        if !found.is_empty() {
            // A rule with setup's tag is setup's own (its state file was lost, or an
            // apply was interrupted): teardown deletes it.
            let tagged = shown
                .iter()
                .find(|s| found.contains(&s.pref) && iproute::is_tagged(s))
                .map(|s| s.pref);
            let rec = match (old_rec, tagged) {
                (Some(r), _) if r.added && pref_found(r.pref, &found) => r.clone(),
                (_, Some(pref)) => RuleRecord {
                    family: rule.family,
                    added: true,
                    pref: Some(pref),
                },
                _ => RuleRecord {
                    family: rule.family,
                    added: false,
                    pref: None,
                },
            };
            report.line(format!(
                "{}: already present",
                iproute::untagged(&iproute::rule_add_cmd(rule))
            ));
            rules.push(rec);
            continue;
        }
        let undo = Undo::DelRule {
            rule: *rule,
            pref: None,
        };
        txn.step(undo, || run_checked(runner, &iproute::rule_add_cmd(rule)))?;
        let pref = iproute::find_rule(&list_rules(runner, rule.family)?, rule)
            .into_iter()
            .next();
        if let Some(p) = pref {
            txn.rule_pref(rule.family, p)?;
        }
        report.line(iproute::rule_add_cmd(rule).to_string());
        rules.push(RuleRecord {
            family: rule.family,
            added: true,
            pref,
        });
    }

    // 3. Local routes, only where missing.
    let mut routes = Vec::new();
    for route in &plan.routes {
        let old_rec = old
            .filter(|o| o.config.table == route.table)
            .and_then(|o| o.routes.iter().find(|r| r.family == route.family));
        let table = show_table(runner, route.family, route.table)?;
        if table.ours {
            report.line(format!(
                "{}: already present",
                iproute::untagged(&iproute::route_add_cmd(route))
            ));
            routes.push(RouteRecord {
                family: route.family,
                added: old_rec.is_some_and(|r| r.added) || table.tagged,
            });
            continue;
        }
        txn.step(Undo::DelRoute(*route), || {
            run_checked(runner, &iproute::route_add_cmd(route))
        })?;
        report.line(iproute::route_add_cmd(route).to_string());
        routes.push(RouteRecord {
            family: route.family,
            added: true,
        });
    }

    // 4. Sysctls; the first apply's values are the ones teardown restores.
    let mut sysctls = Vec::new();
    for item in &plan.sysctls {
        let current = sysctl::read(runner, &item.key)?;
        let old_rec = old.and_then(|o| o.sysctls.iter().find(|r| r.key == item.key));
        let Some(value) = item.needed_write(&current) else {
            // Still at the value an earlier apply wrote: keep the original to restore.
            if let Some(r) = old_rec.filter(|r| r.written == current) {
                sysctls.push(r.clone());
            }
            continue;
        };
        let side = if is_forwarding_global(&item.key) {
            capture_forwarding(runner, &item.key)?
        } else {
            Vec::new()
        };
        // Undo runs backwards: the global is restored first (which resets every
        // interface), then each interface's own value.
        for (k, v) in &side {
            txn.begin(Undo::Sysctl {
                key: k.clone(),
                value: v.clone(),
            })?;
        }
        let undo = Undo::Sysctl {
            key: item.key.clone(),
            value: current.clone(),
        };
        txn.step(undo, || sysctl::write(runner, &item.key, &value))?;
        report.line(format!(
            "sysctl -w {}={}   (was {current}; {})",
            item.key, value, item.why
        ));
        let mut rec = SysctlRecord {
            key: item.key.clone(),
            original: current,
            written: value,
            side,
        };
        if let Some(o) = old_rec {
            rec.original = o.original.clone();
            let mut merged = o.side.clone();
            for (k, v) in rec.side {
                if !merged.iter().any(|(mk, _)| *mk == k) {
                    merged.push((k, v));
                }
            }
            rec.side = merged;
        }
        sysctls.push(rec);
    }

    // 5. What the kernel now lists, so status can tell if anyone changed it.
    let fingerprint = firewall_fingerprint(runner, plan)?;

    Ok(State {
        netns: netns.to_string(),
        config: c.clone(),
        rp_ifaces: plan.rp_ifaces.clone(),
        rules,
        routes,
        sysctls,
        mangle,
        input_rules,
        ipv6_skipped: None,
        apply_id: None,
        fingerprint,
    })
}

/// ` (with the return path of --source client-ip: ...)` for the apply report, or
/// nothing without one.
fn return_path_note(plan: &Plan) -> String {
    let c = &plan.config;
    if !plan.firewall.has_return_path() {
        return String::new();
    }
    format!(
        " (with the return path of --source {}: replies to client addresses arriving on interfaces other than {})",
        c.source.name(),
        c.in_ifaces.join(", ")
    )
}

/// What intercepted packets look like to the input hook under `plan`.
pub fn intercepted<'a>(runner: &dyn Runner, plan: &'a Plan) -> Intercepted<'a> {
    let c = &plan.config;
    Intercepted {
        families: plan.families(),
        l4: [
            (plan::L4::Tcp, c.tcp.is_some()),
            (plan::L4::Udp, c.udp.is_some()),
        ]
        .into_iter()
        .filter_map(|(p, on)| on.then_some(p))
        .collect(),
        ifaces: status::intercepted_ifaces(runner, plan),
        mark: c.fwmark,
    }
}

/// Whether a recorded rule priority is among the ones found (no priority recorded:
/// any identical rule counts).
fn pref_found(pref: Option<u32>, found: &[u32]) -> bool {
    match pref {
        None => true,
        Some(p) => found.contains(&p),
    }
}

/// Removes what the previous apply installed and the new one does not.
fn cleanup_old(runner: &dyn Runner, old: &State, new: &State, report: &mut Report) {
    let mut notes = Vec::new();
    if old.config.backend != new.config.backend {
        match old.config.backend {
            Backend::Nft => {
                if let Err(e) = remove_nft(runner) {
                    notes.push(format!("could not remove the old nft table: {e}"));
                }
            }
            Backend::Iptables => {
                for &family in old.plan().families() {
                    let origin = old.mangle.iter().find(|m| m.family == family).copied();
                    if let Err(e) = remove_iptables_family(runner, family, origin) {
                        notes.push(format!("could not remove the old iptables chains: {e}"));
                    }
                }
            }
        }
        report.line(format!(
            "removed the previous {} rules",
            old.config.backend.name()
        ));
    }
    let old_plan = old.plan();
    for rec in old.rules.iter().filter(|r| r.added) {
        if new.rules.iter().any(|n| n == rec)
            && new.config.fwmark == old.config.fwmark
            && new.config.table == old.config.table
        {
            continue;
        }
        if let Some(rule) = old_plan.ip_rules.iter().find(|r| r.family == rec.family) {
            if let Err(e) = delete_rule(runner, rule, rec.pref) {
                notes.push(e.to_string());
            }
        }
    }
    for rec in old.routes.iter().filter(|r| r.added) {
        if new.config.table == old.config.table && new.routes.iter().any(|n| n == rec) {
            continue;
        }
        if let Some(route) = old_plan.routes.iter().find(|r| r.family == rec.family) {
            if let Err(e) = delete_route(runner, route) {
                notes.push(e.to_string());
            }
        }
    }
    for target in &old.input_rules {
        if !new.input_rules.contains(target) {
            match input::remove(runner, target) {
                Ok(_) => report.line(format!(
                    "{target}: removed the accept rule of the previous apply (--accept-input not given)"
                )),
                Err(e) => notes.push(e.to_string()),
            }
        }
    }
    for rec in &old.sysctls {
        if !new.sysctls.iter().any(|n| n.key == rec.key) {
            if let Err(e) = restore_sysctl(runner, rec, report) {
                notes.push(e.to_string());
            }
        }
    }
    for n in notes {
        report.warn(format!("cleaning up the previous apply: {n}"));
    }
}

/// `setup teardown`: removes what the state file says apply added, restores sysctls,
/// deletes the state file. Without a state file it only removes the objects that are
/// ours by name (the `inet ringrelay` table, the `RINGRELAY*` chains).
pub fn teardown(runner: &dyn Runner, state_path: &Path, netns: &str) -> Result<Report, SetupError> {
    let mut report = Report::default();
    // An apply that was killed half-way: undo it (or finish it) first.
    let recovered = recover(runner, state_path, netns)?;
    let after_recovery = !recovered.is_empty();
    report.lines.extend(recovered);
    let st = match State::load_for(state_path, netns)? {
        Loaded::Current(st) => st,
        Loaded::None if after_recovery => {
            report.line("no state file: nothing else to undo; teardown complete");
            return Ok(report);
        }
        Loaded::None => {
            report.line(format!(
                "no state file {}: setup apply has not run in this network namespace; nothing recorded to undo",
                state_path.display()
            ));
            stateless_teardown(runner, &mut report);
            return Ok(report);
        }
        Loaded::Stale(_) => {
            // Restoring its sysctls here would undo settings this namespace made itself.
            report.line(stale_note(state_path));
            stateless_teardown(runner, &mut report);
            State::remove(state_path)?;
            return Ok(report);
        }
    };
    let plan = st.plan();
    let mut failures = Vec::new();

    match st.config.backend {
        Backend::Nft => match remove_nft(runner) {
            Ok(()) => report.line(format!("nft: table inet {} deleted", plan::NFT_TABLE)),
            Err(e) => failures.push(e.to_string()),
        },
        Backend::Iptables => {
            for &family in plan.families() {
                let origin = st.mangle.iter().find(|m| m.family == family).copied();
                match remove_iptables_family(runner, family, origin) {
                    Ok(notes) => {
                        report.line(format!(
                            "{}: chains {} and {} removed",
                            family.iptables(),
                            plan::IPT_CHAIN,
                            plan::IPT_TPROXY_CHAIN
                        ));
                        report.lines.extend(notes);
                    }
                    Err(e) => failures.push(e.to_string()),
                }
            }
        }
    }
    for target in &st.input_rules {
        match input::remove(runner, target) {
            Ok(0) => report.line(format!(
                "{target}: accept rule already gone (the chain was changed or removed since)"
            )),
            Ok(_) => report.line(format!("{target}: accept rule removed")),
            Err(e) => failures.push(e.to_string()),
        }
    }

    for rec in st.rules.iter().filter(|r| r.added) {
        let Some(rule) = plan.ip_rules.iter().find(|r| r.family == rec.family) else {
            continue;
        };
        match delete_rule(runner, rule, rec.pref) {
            Ok(()) => report.line(iproute::rule_del_cmd(rule, rec.pref).to_string()),
            Err(e) => failures.push(e.to_string()),
        }
    }
    for rec in st.routes.iter().filter(|r| r.added) {
        let Some(route) = plan.routes.iter().find(|r| r.family == rec.family) else {
            continue;
        };
        match delete_route(runner, route) {
            Ok(()) => report.line(iproute::route_del_cmd(route).to_string()),
            Err(e) => failures.push(e.to_string()),
        }
    }
    remove_leftovers(runner, Some(st.config.backend), &mut report);
    // Reverse order: interface values before the globals that reset them.
    for rec in st.sysctls.iter().rev() {
        if let Err(e) = restore_sysctl(runner, rec, &mut report) {
            failures.push(e.to_string());
        }
    }

    if !failures.is_empty() {
        return Err(SetupError::TeardownIncomplete {
            failures: failures.join("; "),
            path: state_path.to_path_buf(),
        });
    }
    State::remove(state_path)?;
    report.line("teardown complete: the box is as it was before setup apply");
    Ok(report)
}

/// Teardown without a state file: removes what is setup's by name or tag, says what
/// it removed, and that sysctls stay as they are.
fn stateless_teardown(runner: &dyn Runner, report: &mut Report) {
    let before = report.lines.len();
    remove_leftovers(runner, None, report);
    if report.lines.len() == before {
        report.line("found nothing of setup's: no marked table inet ringrelay, no RINGRELAY chains, no ip rules or routes tagged proto 114, no --accept-input rules");
    }
    report.line("sysctls (ip_forward, forwarding, rp_filter) are left as they are: their values before apply were in the state file");
}

/// The message for a state file that belongs to a namespace that no longer exists.
pub fn stale_note(path: &Path) -> String {
    format!(
        "state file {} was written in an earlier network namespace with the same inode (deleted since) or before a reboot: ignored, it describes nothing that exists here",
        path.display()
    )
}

/// Removes objects that are ours by name but not recorded for `recorded` backend
/// (a state file lost, or a backend switch interrupted). Best effort: only reports.
fn remove_leftovers(runner: &dyn Runner, recorded: Option<Backend>, report: &mut Report) {
    // Accept rules of --accept-input carry our comment wherever they are.
    if let Ok(hook) = input::read(runner) {
        for target in hook.with_accept_rule() {
            match input::remove(runner, &target) {
                Ok(n) if n > 0 => report.line(format!("{target}: leftover accept rule removed")),
                Ok(_) => {}
                Err(e) => report.warn(format!("leftover accept rule in {target}: {e}")),
            }
        }
    }
    if recorded != Some(Backend::Nft) {
        match nft_table_owner(runner) {
            Ok(TableOwner::Marked) => match remove_nft(runner) {
                Ok(()) => report.line(format!(
                    "nft: leftover table inet {} deleted (it carries setup's marker)",
                    plan::NFT_TABLE
                )),
                Err(e) => report.warn(format!("leftover table inet {}: {e}", plan::NFT_TABLE)),
            },
            Ok(TableOwner::Unmarked) => report.warn(format!(
                "nft table inet {} left alone: it lacks setup's marker comment, so setup did not create it",
                plan::NFT_TABLE
            )),
            Ok(TableOwner::Absent) => {}
            Err(e) => report.warn(format!("leftover table inet {}: {e}", plan::NFT_TABLE)),
        }
    }
    // Rules and routes carry setup's tag (proto 114) whatever the options were.
    if runner.find_program("ip").is_some() {
        for family in [Family::V4, Family::V6] {
            if family == Family::V6 && !host::ipv6_available(runner) {
                continue;
            }
            if let Ok(shown) = list_rules(runner, family) {
                for rule in iproute::tagged_rules(&shown) {
                    let cmd = iproute::tagged_rule_del_cmd(family, &rule);
                    match run_checked(runner, &cmd) {
                        Ok(_) => report.line(format!(
                            "{cmd}   (leftover, tagged proto {})",
                            iproute::RT_PROTO
                        )),
                        Err(e) => report.warn(format!("leftover ip rule: {e}")),
                    }
                }
            }
            let listed = run_any(runner, &iproute::tagged_routes_cmd(family));
            if let Ok(out) = listed.as_ref().map(|o| o.stdout.as_str()) {
                for table in iproute::parse_tagged_routes(out) {
                    let cmd = iproute::route_del_in_table_cmd(family, table);
                    match run_checked(runner, &cmd) {
                        Ok(_) => report.line(format!(
                            "{cmd}   (leftover, tagged proto {})",
                            iproute::RT_PROTO
                        )),
                        Err(e) => report.warn(format!("leftover route: {e}")),
                    }
                }
            }
        }
    }
    if recorded != Some(Backend::Iptables) {
        for family in [Family::V4, Family::V6] {
            if runner.find_program(family.iptables_save()).is_none()
                || runner.find_program(family.iptables_restore()).is_none()
            {
                continue;
            }
            let saved = match iptables_saved(runner, family) {
                Ok(s) => s,
                Err(_) => continue,
            };
            if saved.chains.is_empty() && saved.jumps == 0 {
                continue;
            }
            match remove_iptables_family(runner, family, None) {
                Ok(_) => {
                    report.line(format!(
                        "{}: leftover {} chains removed",
                        family.iptables(),
                        plan::IPT_CHAIN
                    ));
                    if let Some(note) = empty_mangle_note(runner, family) {
                        report.line(note);
                    }
                }
                Err(e) => report.warn(format!("leftover {} chains: {e}", family.iptables())),
            }
        }
    }
}

/// Without the state file teardown cannot tell whether apply created iptables-nft's
/// `mangle` table (the state records it); when it is empty now, say how to remove it.
fn empty_mangle_note(runner: &dyn Runner, family: Family) -> Option<String> {
    runner.find_program("nft")?;
    let fam = family.nft_family();
    let out = runner
        .run(&Cmd::new("nft", &["list", "table", fam, "mangle"]))
        .ok()
        .filter(|o| o.success())?;
    let rules = nft::fingerprint(&out.stdout)
        .into_iter()
        .filter(|l| {
            !(l.starts_with("table ")
                || l.starts_with("chain ")
                || l.starts_with("type ")
                || l == "}")
        })
        .count();
    (rules == 0).then(|| {
        format!(
            "{fam} mangle: left in place, empty; without the state file setup cannot tell whether apply created it (iptables-nft does on first use): `nft delete table {fam} mangle` removes it"
        )
    })
}

// ---- firewall helpers -------------------------------------------------------------

/// Deletes the nft table whether or not it exists (one transaction).
fn remove_nft(runner: &dyn Runner) -> Result<(), SetupError> {
    run_checked(runner, &nft::apply_cmd(nft::teardown_script())).map(drop)
}

/// `iptables -V` says nf_tables: the mangle table is visible to nft.
fn iptables_is_nf_tables(runner: &dyn Runner) -> Result<bool, SetupError> {
    let out = run_checked(runner, &iptables::version_cmd())?;
    Ok(iptables::is_nf_tables_variant(&out.stdout))
}

/// Whether iptables-nft's mangle table and PREROUTING chain exist now. Without nft
/// to ask, assume they do (then teardown never deletes them).
fn mangle_origin(runner: &dyn Runner, family: Family) -> MangleOrigin {
    let exists = |args: &[&str]| {
        runner.find_program("nft").is_none()
            || runner
                .run(&Cmd::new("nft", args))
                .map(|o| o.success())
                .unwrap_or(true)
    };
    let fam = family.nft_family();
    MangleOrigin {
        family,
        table_existed: exists(&["list", "table", fam, "mangle"]),
        prerouting_existed: exists(&["list", "chain", fam, "mangle", "PREROUTING"]),
    }
}

fn iptables_saved(runner: &dyn Runner, family: Family) -> Result<SavedMangle, SetupError> {
    let out = run_checked(runner, &iptables::save_cmd(family))?;
    Ok(iptables::parse_save(&out.stdout))
}

/// Flushes and refills our chains for one family, adding the PREROUTING jump only if
/// missing (and removing duplicates of it).
fn apply_iptables_family(
    runner: &dyn Runner,
    plan: &Plan,
    family: Family,
) -> Result<(), SetupError> {
    let saved = iptables_saved(runner, family)?;
    let mut input = iptables::render_apply(plan, family, saved.jumps == 0);
    if saved.jumps > 1 {
        // Keep one jump: delete the extra ones inside the same commit.
        let extra = format!("-D PREROUTING -j {}\n", plan::IPT_CHAIN).repeat(saved.jumps - 1);
        input = input.replace("COMMIT\n", &format!("{extra}COMMIT\n"));
    }
    run_checked(runner, &iptables::restore_cmd(family, input)).map(drop)
}

/// Removes our chains and jump for one family; with iptables-nft also the mangle
/// table / PREROUTING chain apply created, when they are empty again.
fn remove_iptables_family(
    runner: &dyn Runner,
    family: Family,
    origin: Option<MangleOrigin>,
) -> Result<Vec<String>, SetupError> {
    let mut notes = Vec::new();
    let saved = iptables_saved(runner, family)?;
    if let Some(input) = iptables::render_teardown(&saved) {
        run_checked(runner, &iptables::restore_cmd(family, input))?;
    }
    let Some(origin) = origin else {
        return Ok(notes);
    };
    if runner.find_program("nft").is_none() {
        return Ok(notes);
    }
    let fam = family.nft_family();
    if !origin.prerouting_existed {
        // The kernel refuses to delete a chain that still holds rules (EBUSY), so a
        // rule someone else added since is never lost.
        let del = Cmd::new("nft", &["delete", "chain", fam, "mangle", "PREROUTING"]);
        let listed = run_any(
            runner,
            &Cmd::new("nft", &["list", "chain", fam, "mangle", "PREROUTING"]),
        )?;
        if listed.success() {
            let out = run_any(runner, &del)?;
            if !out.success() {
                notes.push(format!(
                    "{fam} mangle PREROUTING kept: {}",
                    host::one_line(&out)
                ));
            }
        }
    }
    if !origin.table_existed {
        let listed = run_any(runner, &Cmd::new("nft", &["list", "table", fam, "mangle"]))?;
        // Delete the table only when it is empty: `delete table` takes its content.
        let empty = nft::fingerprint(&listed.stdout)
            .iter()
            .all(|l| l.starts_with("table ") || l == "}");
        if listed.success() && empty {
            run_checked(
                runner,
                &Cmd::new("nft", &["delete", "table", fam, "mangle"]),
            )?;
        }
    }
    Ok(notes)
}

/// What the kernel lists for our firewall objects.
pub fn firewall_fingerprint(runner: &dyn Runner, plan: &Plan) -> Result<Vec<String>, SetupError> {
    match plan.config.backend {
        Backend::Nft => {
            let out = run_checked(runner, &nft::list_cmd())?;
            Ok(nft::fingerprint(&out.stdout))
        }
        Backend::Iptables => {
            let mut v = Vec::new();
            for &family in plan.families() {
                for line in iptables_saved(runner, family)?.lines {
                    v.push(format!("{} {line}", family.name()));
                }
            }
            Ok(v)
        }
    }
}

// ---- routing helpers --------------------------------------------------------------

fn list_rules(runner: &dyn Runner, family: Family) -> Result<Vec<ShownRule>, SetupError> {
    let out = run_checked(runner, &iproute::rule_show_cmd(family))?;
    Ok(iproute::parse_rules(&out.stdout))
}

/// What a routing table holds; a table that does not exist yet is empty.
pub fn show_table(
    runner: &dyn Runner,
    family: Family,
    table: u32,
) -> Result<TableRoutes, SetupError> {
    let cmd = iproute::route_show_cmd(family, table);
    let out = run_any(runner, &cmd)?;
    if out.success() {
        return Ok(iproute::parse_table(&out.stdout));
    }
    // IPv6 answers "FIB table does not exist" for a table nobody created.
    if out.stderr.contains("does not exist") {
        return Ok(TableRoutes::default());
    }
    Err(host::command_error(&cmd, &out))
}

/// Deletes an ip rule apply added, if it is still there.
fn delete_rule(runner: &dyn Runner, rule: &IpRule, pref: Option<u32>) -> Result<(), SetupError> {
    let shown = list_rules(runner, rule.family)?;
    let found = iproute::find_rule(&shown, rule);
    // No priority recorded (an apply killed right after `ip rule add`): the rule with
    // setup's tag is the one it added.
    let pref = pref.or_else(|| {
        shown
            .iter()
            .find(|s| found.contains(&s.pref) && iproute::is_tagged(s))
            .map(|s| s.pref)
    });
    let present = match pref {
        Some(p) => found.contains(&p),
        None => !found.is_empty(),
    };
    if present {
        run_checked(runner, &iproute::rule_del_cmd(rule, pref))?;
    }
    Ok(())
}

/// Deletes the local route apply added, if it is still there.
fn delete_route(runner: &dyn Runner, route: &LocalRoute) -> Result<(), SetupError> {
    if show_table(runner, route.family, route.table)?.ours {
        run_checked(runner, &iproute::route_del_cmd(route))?;
    }
    Ok(())
}

// ---- sysctl helpers ---------------------------------------------------------------

/// `ip_forward` and `conf/all/forwarding` rewrite every interface's `forwarding`.
fn is_forwarding_global(key: &SysctlKey) -> bool {
    matches!(
        key.rel(),
        "net/ipv4/ip_forward" | "net/ipv4/conf/all/forwarding" | "net/ipv6/conf/all/forwarding"
    )
}

/// Every `conf/*/forwarding` of the key's family except `all`, with its value now.
fn capture_forwarding(
    runner: &dyn Runner,
    key: &SysctlKey,
) -> Result<Vec<(SysctlKey, String)>, SetupError> {
    let family = if key.rel().starts_with("net/ipv6") {
        "ipv6"
    } else {
        "ipv4"
    };
    let dir = Path::new("/proc/sys/net").join(family).join("conf");
    let names = runner
        .list_dir(&dir)
        .map_err(|e| SetupError::file(&dir, e))?;
    let mut out = Vec::new();
    for name in names.iter().filter(|n| *n != "all") {
        let k = SysctlKey::conf(family, name, "forwarding");
        if let Ok(v) = sysctl::read(runner, &k) {
            out.push((k, v));
        }
    }
    Ok(out)
}

/// Writes `value` unless the sysctl already has it or has gone with its interface.
fn restore_value(runner: &dyn Runner, key: &SysctlKey, value: &str) -> Result<(), SetupError> {
    match sysctl::read(runner, key) {
        Ok(current) if current == value => Ok(()),
        Ok(_) => sysctl::write(runner, key, value),
        // The interface was removed since: nothing to restore.
        Err(SetupError::File { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Teardown of one recorded sysctl: back to the original when it still holds what
/// apply wrote; left alone (with a note) when someone changed it since.
fn restore_sysctl(
    runner: &dyn Runner,
    rec: &SysctlRecord,
    report: &mut Report,
) -> Result<(), SetupError> {
    let current = match sysctl::read(runner, &rec.key) {
        Ok(v) => v,
        Err(SetupError::File { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            report.line(format!(
                "{}: gone (interface removed), nothing to restore",
                rec.key
            ));
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    if current == rec.written {
        sysctl::write(runner, &rec.key, &rec.original)?;
        report.line(format!(
            "sysctl -w {}={}   (restored)",
            rec.key, rec.original
        ));
    } else if current != rec.original {
        report.warn(format!(
            "{} is {current}, not the {} apply wrote: changed since, left as it is (it was {} before apply)",
            rec.key, rec.written, rec.original
        ));
        return Ok(());
    }
    for (k, v) in &rec.side {
        restore_value(runner, k, v)?;
    }
    Ok(())
}

// ---- dry run ----------------------------------------------------------------------

/// `setup apply --dry-run`: the exact commands and rules apply would send, as a shell
/// script, annotated with what is already in place. Changes nothing.
pub fn dry_run(
    runner: &dyn Runner,
    config: &Config,
    state_path: &Path,
) -> Result<String, SetupError> {
    let (config, ipv6_skipped) = ipv6_fallback(runner, config);
    let host_ifaces = preflight(runner, &config, Mode::DryRun)?;
    let plan = plan::build(&config, &host_ifaces);
    let c = &plan.config;
    let mut s = String::new();
    let source = if c.source.needs_return_path() {
        format!("source {}, ", c.source.name())
    } else {
        String::new()
    };
    s.push_str(&format!(
        "# setup apply --dry-run: nothing below has been run.\n# backend {}, port {}, fail-{}, {source}state file {}\n",
        c.backend.name(),
        c.port,
        c.fail_mode.name(),
        state_path.display()
    ));
    if let Some(why) = &ipv6_skipped {
        s.push_str(&format!("# NOTE: {}\n", ipv6_skip_warning(why)));
    }
    if let Ok(Some(j)) = journal::load(state_path) {
        s.push_str(&format!(
            "# NOTE: an earlier apply was interrupted (journal {}): apply first undoes the {} steps it began\n",
            j.path.display(),
            j.begun()
        ));
    }
    for program in required_programs(c) {
        if runner.find_program(program).is_none() {
            s.push_str(&format!("# NOTE: {}\n", host::missing_program(program)));
        }
    }
    if host::has_cap_net_admin(runner) == Some(false) {
        s.push_str("# NOTE: this process lacks CAP_NET_ADMIN: apply must run as root or with CAP_NET_ADMIN\n");
    }

    s.push_str("\n# Step 1: the firewall, in one atomic transaction.\n");
    match c.backend {
        Backend::Nft => {
            s.push_str("nft -f - <<'EOF'\n");
            s.push_str(&nft::render_apply(&plan));
            s.push_str("EOF\n");
        }
        Backend::Iptables => {
            for &family in plan.families() {
                let saved = runner
                    .run(&iptables::save_cmd(family))
                    .ok()
                    .filter(|o| o.success())
                    .map(|o| iptables::parse_save(&o.stdout));
                if saved.is_none() {
                    s.push_str(&format!(
                        "# (could not run {} to see whether the PREROUTING jump exists: assuming it is missing)\n",
                        family.iptables_save()
                    ));
                }
                let jumps = saved.map_or(0, |sm| sm.jumps);
                s.push_str(&format!(
                    "{} --noflush <<'EOF'\n",
                    family.iptables_restore()
                ));
                s.push_str(&iptables::render_apply(&plan, family, jumps == 0));
                s.push_str("EOF\n");
            }
        }
    }

    if let Ok(hook) = input::read(runner) {
        let present = hook.with_accept_rule();
        let blocking: Vec<_> = hook
            .blocking(&intercepted(runner, &plan))
            .into_iter()
            .filter(|b| !present.contains(&b.target))
            .collect();
        if !blocking.is_empty() {
            s.push_str("\n# Step 1b: the box's own input firewall drops intercepted packets (TPROXY\n# delivers them through the input hook).\n");
        }
        let n = status::intercepted_ifaces(runner, &plan).len();
        for b in blocking {
            if c.accept_input {
                let cmd = input::insert_cmd(&b.target, c.fwmark);
                match &cmd.stdin {
                    Some(script) => s.push_str(&format!("nft -f - <<'EOF'\n{script}EOF\n")),
                    None => s.push_str(&format!("{cmd}\n")),
                }
            } else {
                s.push_str(&format!("# NOTE: {}\n", b.message(c.fwmark, n)));
            }
        }
    }

    s.push_str("\n# Step 2: policy routing for the interception mark (added only where missing;\n# teardown deletes only what apply added).\n");
    for (rule, route) in plan.ip_rules.iter().zip(&plan.routes) {
        let rule_present = runner
            .run(&iproute::rule_show_cmd(rule.family))
            .ok()
            .filter(|o| o.success())
            .map(|o| !iproute::find_rule(&iproute::parse_rules(&o.stdout), rule).is_empty());
        let route_present = show_table(runner, route.family, route.table)
            .ok()
            .map(|t| t.ours);
        for (cmd, present) in [
            (iproute::rule_add_cmd(rule), rule_present),
            (iproute::route_add_cmd(route), route_present),
        ] {
            match present {
                Some(true) => {
                    s.push_str(&format!("# already present: {}\n", iproute::untagged(&cmd)))
                }
                _ => s.push_str(&format!("{cmd}\n")),
            }
        }
    }

    s.push_str(
        "\n# Step 3: sysctls, written through /proc/sys (previous values go to the state file).\n",
    );
    for item in &plan.sysctls {
        let current = sysctl::read(runner, &item.key).ok();
        let target = match &item.want {
            SysctlWant::Value(v) => v.clone(),
            SysctlWant::NotStrictRpFilter => "2".to_string(),
        };
        match current.as_deref().map(|cur| (cur, item.needed_write(cur))) {
            Some((cur, Some(v))) => s.push_str(&format!(
                "sysctl -w {}={v}   # now {cur}: {}\n",
                item.key, item.why
            )),
            Some((cur, None)) => {
                s.push_str(&format!("# {} is {cur}: fine, left as it is\n", item.key))
            }
            None => s.push_str(&format!(
                "sysctl -w {}={target}   # (current value unreadable)\n",
                item.key
            )),
        }
    }
    if plan.firewall.has_return_path() {
        s.push_str(&format!(
            "# The return path of --source {} needs no sysctl of its own: rp_filter on the\n# server-facing interfaces checks the server's address, which is routed back out of\n# the interface the reply arrived on (strict, loose and off all let replies through\n# in the lab). src_valid_mark=1 there would drop them (status reports it).\n",
            c.source.name()
        ));
    }
    Ok(s)
}
