//! `kill -9` during `setup apply`, at every step: a fake kernel that keeps state (the
//! nft table, ip rules, routes, sysctls) answers the commands, and "dies" (panics)
//! at the Nth change, before or after making it, the way a killed process leaves the
//! kernel with or without its last command done. Then the next `status` must say so,
//! the next `teardown` must leave the box exactly as it was before any apply, and the
//! next `apply` must leave it exactly as an uninterrupted apply does. No root needed.

use ringrelay_setup::config::{Config, FailMode};
use ringrelay_setup::plan::{Family, L4};
use ringrelay_setup::runner::{Cmd, Output, RunError, Runner};
use ringrelay_setup::sockdiag::DiagSocket;
use ringrelay_setup::{journal, ops, status};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

const NS: &str = "4026532177-57985-boot";
const KILLED: &str = "fake kernel: setup killed at step";

/// What the fake kernel holds; compared whole.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Box_ {
    /// `table inet ringrelay` as listed, or none.
    table: Option<String>,
    /// (family, pref, words after `from all`).
    rules: Vec<(Family, u32, String)>,
    /// (family, table, tagged).
    routes: Vec<(Family, u32, bool)>,
    files: BTreeMap<PathBuf, String>,
}

#[derive(Default)]
struct Inner {
    k: Box_,
    changes: usize,
    /// Die at this change: (n, after it was made).
    die: Option<(usize, bool)>,
}

#[derive(Default)]
struct Kernel(RefCell<Inner>);

fn family_of(args: &[String]) -> Family {
    if args.iter().any(|a| a == "-6") {
        Family::V6
    } else {
        Family::V4
    }
}

impl Kernel {
    /// A router with lo, eth0, eth1; forwarding off; strict rp_filter on all and eth1.
    fn router() -> Kernel {
        let k = Kernel::default();
        {
            let mut i = k.0.borrow_mut();
            let f = &mut i.k.files;
            let mut set = |p: &str, v: &str| {
                f.insert(PathBuf::from(p), v.to_string());
            };
            for (iface, flags) in [("lo", "0x9"), ("eth0", "0x1003"), ("eth1", "0x1003")] {
                set(&format!("/sys/class/net/{iface}/flags"), flags);
            }
            set("/proc/self/status", "CapEff:\t000001ffffffffff\n");
            set("/proc/sys/net/ipv4/ip_forward", "0");
            for iface in ["all", "default", "lo", "eth0", "eth1"] {
                let rp = if iface == "all" || iface == "eth1" {
                    "1"
                } else {
                    "0"
                };
                set(&format!("/proc/sys/net/ipv4/conf/{iface}/rp_filter"), rp);
                set(&format!("/proc/sys/net/ipv4/conf/{iface}/forwarding"), "0");
                set(
                    &format!("/proc/sys/net/ipv4/conf/{iface}/src_valid_mark"),
                    "0",
                );
                set(&format!("/proc/sys/net/ipv6/conf/{iface}/forwarding"), "0");
            }
        }
        k
    }

    fn snapshot(&self) -> Box_ {
        let mut b = self.0.borrow().k.clone();
        b.rules.sort();
        b.routes.sort();
        b
    }

    fn die_at(&self, n: usize, after: bool) {
        let mut i = self.0.borrow_mut();
        i.changes = 0;
        i.die = Some((n, after));
    }

    /// The process is gone; the kernel stays. Later runs do not die.
    fn revive(&self) -> usize {
        let mut i = self.0.borrow_mut();
        i.die = None;
        std::mem::take(&mut i.changes)
    }

    /// Counts a change; dies before it when told to. Returns whether to die after it.
    fn change(&self) -> bool {
        let mut i = self.0.borrow_mut();
        i.changes += 1;
        let n = i.changes;
        match i.die {
            Some((at, false)) if at == n => {
                drop(i);
                panic!("{KILLED} {n}, before it");
            }
            Some((at, true)) => at == n,
            _ => false,
        }
    }

    fn died_after(&self, die: bool) {
        if die {
            let n = self.0.borrow().changes;
            panic!("{KILLED} {n}, after it");
        }
    }

    fn nft(&self, cmd: &Cmd) -> Output {
        let k = &mut self.0.borrow_mut().k;
        if let Some(script) = &cmd.stdin {
            // Our scripts: declare + delete the table, then maybe the new table.
            let after_delete = script
                .rsplit_once("delete table inet ringrelay\n")
                .map(|(_, rest)| rest)
                .unwrap_or(script);
            k.table = after_delete.find("table inet ringrelay {").map(|i| {
                after_delete[i..]
                    .lines()
                    .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
                    .map(|l| format!("{l}\n"))
                    .collect()
            });
            return Output::ok("");
        }
        match cmd
            .args
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .as_slice()
        {
            ["list", "table", "inet", "ringrelay"] => match &k.table {
                Some(t) => Output::ok(t),
                None => Output::fail(1, "Error: No such file or directory\n"),
            },
            ["list", "ruleset"] => Output::ok(k.table.as_deref().unwrap_or("")),
            _ => Output::fail(1, "Error: No such file or directory\n"),
        }
    }

    fn ip(&self, cmd: &Cmd) -> Output {
        let a = &cmd.args;
        let family = family_of(a);
        let k = &mut self.0.borrow_mut().k;
        let words: Vec<&str> = a
            .iter()
            .map(String::as_str)
            .filter(|w| *w != "-6" && *w != "-4" && *w != "-N")
            .collect();
        match words.as_slice() {
            ["rule", "show"] => {
                let mut lines = vec![(0, "from all lookup 255".to_string())];
                lines.extend(
                    k.rules
                        .iter()
                        .filter(|r| r.0 == family)
                        .map(|r| (r.1, format!("from all {}", r.2))),
                );
                lines.push((32766, "from all lookup 254".to_string()));
                lines.sort();
                Output::ok(
                    &lines
                        .iter()
                        .map(|(p, w)| format!("{p}:\t{w}\n"))
                        .collect::<String>(),
                )
            }
            ["rule", "add", "fwmark", m, "lookup", t, "proto", p] => {
                let pref = k
                    .rules
                    .iter()
                    .filter(|r| r.0 == family)
                    .map(|r| r.1)
                    .min()
                    .unwrap_or(32766)
                    - 1;
                k.rules
                    .push((family, pref, format!("fwmark {m} lookup {t} proto {p}")));
                Output::ok("")
            }
            ["rule", "del", rest @ ..] => {
                let (pref, sel) = match rest {
                    ["pref", p, sel @ ..] => (p.parse::<u32>().ok(), sel.join(" ")),
                    sel => (None, sel.join(" ")),
                };
                let i = k.rules.iter().position(|r| {
                    r.0 == family && pref.is_none_or(|p| p == r.1) && r.2.starts_with(&sel)
                });
                match i {
                    Some(i) => {
                        k.rules.remove(i);
                        Output::ok("")
                    }
                    None => Output::fail(2, "RTNETLINK answers: No such file or directory\n"),
                }
            }
            ["route", "show", "table", "all", "proto", "114"] => Output::ok(
                &k.routes
                    .iter()
                    .filter(|r| r.0 == family && r.2)
                    .map(|r| format!("2 default dev lo table {} scope 254\n", r.1))
                    .collect::<String>(),
            ),
            ["route", "show", "table", t] => {
                let t: u32 = t.parse().unwrap();
                Output::ok(
                    &k.routes
                        .iter()
                        .filter(|r| r.0 == family && r.1 == t)
                        .map(|r| {
                            format!(
                                "local default dev lo{} scope host\n",
                                if r.2 { " proto 114" } else { "" }
                            )
                        })
                        .collect::<String>(),
                )
            }
            ["route", "add", "local", _, "dev", "lo", "table", t, rest @ ..] => {
                let t: u32 = t.parse().unwrap();
                if k.routes.iter().any(|r| r.0 == family && r.1 == t) {
                    return Output::fail(2, "RTNETLINK answers: File exists\n");
                }
                k.routes.push((family, t, rest.contains(&"114")));
                Output::ok("")
            }
            ["route", "del", "local", _, "dev", "lo", "table", t] => {
                let t: u32 = t.parse().unwrap();
                match k.routes.iter().position(|r| r.0 == family && r.1 == t) {
                    Some(i) => {
                        k.routes.remove(i);
                        Output::ok("")
                    }
                    None => Output::fail(2, "RTNETLINK answers: No such process\n"),
                }
            }
            _ => Output::ok(""),
        }
    }
}

impl Runner for Kernel {
    fn run(&self, cmd: &Cmd) -> Result<Output, RunError> {
        let mutating = match cmd.program.as_str() {
            "nft" => cmd.stdin.is_some(),
            "ip" => cmd.args.iter().any(|a| a == "add" || a == "del"),
            _ => false,
        };
        let die_after = mutating && self.change();
        let out = match cmd.program.as_str() {
            "nft" => self.nft(cmd),
            "ip" => self.ip(cmd),
            p if p.contains("tables") => return Err(RunError::NotFound { program: p.into() }),
            _ => Output::ok(""),
        };
        self.died_after(die_after);
        Ok(out)
    }

    fn find_program(&self, name: &str) -> Option<PathBuf> {
        (!name.contains("tables")).then(|| PathBuf::from("/usr/sbin").join(name))
    }

    fn read_file(&self, path: &Path) -> io::Result<String> {
        self.0
            .borrow()
            .k
            .files
            .get(path)
            .cloned()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    }

    fn write_file(&self, path: &Path, contents: &str) -> io::Result<()> {
        let die_after = self.change();
        {
            let k = &mut self.0.borrow_mut().k;
            match k.files.get_mut(path) {
                Some(v) => *v = contents.trim_end().to_string(),
                None => return Err(io::Error::from(io::ErrorKind::NotFound)),
            }
        }
        self.died_after(die_after);
        Ok(())
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        let i = self.0.borrow();
        let mut names: Vec<String> =
            i.k.files
                .keys()
                .filter_map(|p| p.strip_prefix(path).ok())
                .filter_map(|rest| rest.components().next())
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
        names.dedup();
        if names.is_empty() {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        }
        Ok(names)
    }

    fn exists(&self, path: &Path) -> bool {
        self.0.borrow().k.files.keys().any(|p| p.starts_with(path))
    }

    fn sockets(&self, _: Family, _: L4) -> io::Result<Vec<DiagSocket>> {
        Ok(Vec::new())
    }
}

/// A private state directory, removed at the end.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn state_path(name: &str) -> (TempDir, PathBuf) {
    let dir = std::env::temp_dir().join(format!("rrsetup-kill-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let path = dir.join("setup.state");
    (TempDir(dir), path)
}

/// Keeps the expected "killed" panics out of the test output.
fn quiet_kills() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let msg = info
                .payload()
                .downcast_ref::<String>()
                .map(String::as_str)
                .unwrap_or("");
            if !msg.starts_with(KILLED) {
                default(info);
            }
        }));
    });
}

/// Runs apply on `k` and expects it to be killed.
fn killed_apply(k: &Kernel, config: &Config, path: &Path, n: usize, after: bool) {
    k.die_at(n, after);
    let r = catch_unwind(AssertUnwindSafe(|| ops::apply(k, config, path, NS)));
    k.revive();
    match r {
        Err(p) => {
            let msg = p.downcast_ref::<String>().cloned().unwrap_or_default();
            assert!(msg.starts_with(KILLED), "apply panicked otherwise: {msg}");
        }
        Ok(r) => panic!("apply was not killed at change {n} (after: {after}): {r:?}"),
    }
}

fn other_options() -> Config {
    Config {
        table: 123,
        fail_mode: FailMode::Closed,
        in_ifaces: vec!["eth1".into()],
        ..Config::default()
    }
}

/// For every change `apply` makes, and for a kill before and after it: status says an
/// apply was interrupted (exit 1, not "ready", not an error), teardown restores the box
/// as it was, and apply afterwards gives exactly what an uninterrupted apply gives.
/// `first` = Some(config): an earlier apply with that config is in place.
fn kill_everywhere(name: &str, first: Option<&Config>, config: &Config) {
    quiet_kills();
    let pristine = Kernel::router().snapshot();
    let prepare = |path: &Path| {
        let k = Kernel::router();
        if let Some(f) = first {
            ops::apply(&k, f, path, NS).unwrap();
        }
        k
    };
    // The uninterrupted run, to count its changes and see its result.
    let (_d, path) = state_path(&format!("{name}-clean"));
    let k = prepare(&path);
    k.revive();
    ops::apply(&k, config, &path, NS).unwrap();
    let changes = k.revive();
    let clean = k.snapshot();
    assert!(changes >= 8, "{changes} changes");

    for n in 1..=changes {
        for after in [false, true] {
            let at = format!(
                "change {n} of {changes} ({})",
                if after { "after it" } else { "before it" }
            );
            // status, then teardown.
            let (_d, path) = state_path(&format!("{name}-{n}-{after}-t"));
            let k = prepare(&path);
            killed_apply(&k, config, &path, n, after);
            assert!(journal::path_for(&path).exists(), "{at}: no journal");
            let st = status::status(&k, &path, NS, &Config::default()).unwrap();
            let text = st.render();
            assert_eq!(st.exit_code(), status::EXIT_NOT_READY, "{at}:\n{text}");
            assert!(
                text.contains("an earlier `setup apply` was interrupted"),
                "{at}:\n{text}"
            );
            let report = ops::teardown(&k, &path, NS).unwrap();
            assert_eq!(
                k.snapshot(),
                pristine,
                "{at}: teardown did not restore the box: {report:?}"
            );
            assert!(!path.exists() && !journal::path_for(&path).exists(), "{at}");

            // apply again.
            let (_d, path) = state_path(&format!("{name}-{n}-{after}-a"));
            let k = prepare(&path);
            killed_apply(&k, config, &path, n, after);
            let report = ops::apply(&k, config, &path, NS).unwrap();
            assert!(
                report.lines.iter().any(|l| l.contains("interrupted")),
                "{at}: {report:?}"
            );
            assert_eq!(
                k.snapshot(),
                clean,
                "{at}: apply after the kill differs from a clean one"
            );
            assert!(!journal::path_for(&path).exists(), "{at}");
            ops::teardown(&k, &path, NS).unwrap();
            assert_eq!(
                k.snapshot(),
                pristine,
                "{at}: teardown after the recovering apply"
            );
        }
    }
}

#[test]
fn kill_at_every_step_of_a_first_apply() {
    kill_everywhere("first", None, &Config::default());
}

/// A re-apply with other options (another table, fail-closed, one interface): its
/// rollback puts the previous apply's table back, and a kill after it recorded its
/// state (while it removes the old rules and routes) is finished by the next run.
#[test]
fn kill_at_every_step_of_a_reapply_with_other_options() {
    kill_everywhere("reapply", Some(&Config::default()), &other_options());
}

/// The journal of an apply that had recorded its state: recovery only removes it.
#[test]
fn journal_of_a_finished_apply_changes_nothing() {
    let k = Kernel::router();
    let (_d, path) = state_path("finished");
    ops::apply(&k, &Config::default(), &path, NS).unwrap();
    let applied = k.snapshot();
    let st = ringrelay_setup::state::State::load(&path).unwrap().unwrap();
    let id = st.apply_id.clone().unwrap();
    let mut j = journal::Journal::begin(&path, &id, NS, None).unwrap();
    j.record("nft").unwrap();
    drop(j);
    let lines = ops::recover(&k, &path, NS).unwrap();
    assert!(
        lines[0].contains("after it had recorded its state"),
        "{lines:?}"
    );
    assert_eq!(k.snapshot(), applied);
    assert!(!journal::path_for(&path).exists());
}
