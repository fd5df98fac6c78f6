//! The state file: what `setup apply` changed, so that `status` knows what to check
//! and `teardown` removes exactly that and restores the previous sysctl values.
//!
//! It lives in `/run/ringrelay` (or `$RINGRELAY_STATE_DIR`) under a name that
//! includes the network namespace's inode: `/run` is one filesystem shared by every
//! `ip netns exec`, while rules, routes and sysctls are per namespace, so two routers
//! in two namespaces must not share a state file. `/run` is a tmpfs: after a reboot
//! the state is gone, and so are the rules it described.
//!
//! The format is line-based text (`key value...`), one object per line, readable by
//! an operator who has to clean up by hand.

use crate::config::{parse_mark, parse_u32, Backend, Config, FailMode, Source};
use crate::error::SetupError;
use crate::input::InputTarget;
use crate::plan::{self, Family, Plan};
use crate::ports::{parse_port_list, PortSel};
use crate::sysctl::SysctlKey;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long `setup` waits for another run to release the state directory's lock.
pub const LOCK_WAIT: Duration = Duration::from_secs(30);

/// What a [`StateLock`] is taken for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockFor {
    /// Exclusive; creates the state directory.
    Apply,
    /// Exclusive; no lock (and no directory) when nothing was ever applied.
    Teardown,
    /// Shared with other status runs; no lock when nothing was ever applied.
    Status,
}

/// A lock on the state directory, held for the whole of an apply, teardown or status,
/// so that two runs on one box (an operator and a systemd unit, say) never interleave
/// their rule changes and state writes, and status never reads a half-applied state.
/// Released on drop (and by the kernel if the process dies).
#[derive(Debug)]
pub struct StateLock {
    _flock: Flock<File>,
}

impl StateLock {
    /// Locks the directory of `state_path` for `what` (see [`LockFor`]), waiting up to
    /// `wait` for another holder. Without a directory (nothing was ever applied)
    /// teardown and status need no lock and get `None`, so they leave none behind.
    pub fn acquire(
        state_path: &Path,
        what: LockFor,
        wait: Duration,
    ) -> Result<Option<StateLock>, SetupError> {
        let create = what == LockFor::Apply;
        let dir = match state_path.parent().filter(|d| !d.as_os_str().is_empty()) {
            Some(d) => d.to_path_buf(),
            None => PathBuf::from("."),
        };
        if create {
            std::fs::create_dir_all(&dir).map_err(|e| SetupError::StateWrite {
                path: state_path.to_path_buf(),
                source: e,
            })?;
        }
        let mut file = match File::open(&dir) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound && !create => return Ok(None),
            Err(e) => return Err(SetupError::file(dir, e)),
        };
        let arg = match what {
            LockFor::Apply | LockFor::Teardown => FlockArg::LockExclusiveNonblock,
            LockFor::Status => FlockArg::LockSharedNonblock,
        };
        let start = Instant::now();
        loop {
            match Flock::lock(file, arg) {
                Ok(flock) => return Ok(Some(StateLock { _flock: flock })),
                Err((f, Errno::EWOULDBLOCK)) if start.elapsed() < wait => {
                    file = f;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err((_, Errno::EWOULDBLOCK)) => {
                    return Err(SetupError::Busy {
                        dir,
                        waited_s: wait.as_secs(),
                    })
                }
                Err((_, e)) => return Err(SetupError::file(dir, io::Error::from(e))),
            }
        }
    }
}

/// Environment variable naming the state directory.
pub const STATE_DIR_ENV: &str = "RINGRELAY_STATE_DIR";
/// The state directory when the environment does not name one.
pub const DEFAULT_STATE_DIR: &str = "/run/ringrelay";
const VERSION: u32 = 1;

/// The default state file for a namespace: `DIR/setup-netns-INODE.state`.
pub fn default_path(env_dir: Option<OsString>, netns_inode: u64) -> PathBuf {
    let dir = env_dir
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
    dir.join(format!("setup-netns-{netns_inode}.state"))
}

/// What [`State::load_for`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Loaded {
    /// No state file: apply has not run here.
    None,
    /// The state of this namespace.
    Current(State),
    /// A state file written in another namespace that had the same inode (since
    /// deleted), or before a reboot: its objects are gone with it.
    Stale(State),
}

impl Loaded {
    /// The state, if it belongs to this namespace.
    pub fn current(self) -> Option<State> {
        match self {
            Loaded::Current(st) => Some(st),
            _ => None,
        }
    }
}

/// An ip rule apply found or added.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleRecord {
    /// Family of the rule.
    pub family: Family,
    /// `true`: apply added it (teardown deletes it); `false`: it was there before.
    pub added: bool,
    /// The priority the kernel gave the rule apply added.
    pub pref: Option<u32>,
}

/// A local route apply found or added.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteRecord {
    /// Family of the route.
    pub family: Family,
    /// `true`: apply added it; `false`: it was there before.
    pub added: bool,
}

/// A sysctl apply changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SysctlRecord {
    /// The sysctl.
    pub key: SysctlKey,
    /// Its value before the first apply.
    pub original: String,
    /// The value apply wrote.
    pub written: String,
    /// Sysctls the write changed as a side effect, with their values before:
    /// writing `ip_forward` or `conf/all/forwarding` rewrites every interface's
    /// `forwarding`, so teardown puts those back one by one.
    pub side: Vec<(SysctlKey, String)>,
}

/// Whether the iptables-nft `mangle` table and its `PREROUTING` base chain existed
/// before apply (iptables-nft creates them on first use; they show in
/// `nft list ruleset`, so teardown removes them again when apply created them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MangleOrigin {
    /// Family of the table (`ip` / `ip6`).
    pub family: Family,
    /// The table existed.
    pub table_existed: bool,
    /// Its `PREROUTING` chain existed.
    pub prerouting_existed: bool,
}

/// Everything recorded by apply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct State {
    /// The identity of the namespace the state belongs to ([`crate::host::netns_identity`]).
    pub netns: String,
    /// The options of the plan applied.
    pub config: Config,
    /// The interfaces whose `rp_filter` the plan managed.
    pub rp_ifaces: Vec<String>,
    /// The ip rules.
    pub rules: Vec<RuleRecord>,
    /// The local routes.
    pub routes: Vec<RouteRecord>,
    /// The sysctls changed.
    pub sysctls: Vec<SysctlRecord>,
    /// iptables-nft only: what existed of the mangle tables before.
    pub mangle: Vec<MangleOrigin>,
    /// Input-hook chains holding the accept rule of `--accept-input` (teardown
    /// removes it from each).
    pub input_rules: Vec<InputTarget>,
    /// IPv6 was wanted but disabled when apply ran, and why: it applied IPv4 only.
    pub ipv6_skipped: Option<String>,
    /// The id of the apply that wrote this state; its journal carries the same id
    /// ([`crate::journal`]), which tells a finished apply from an interrupted one.
    pub apply_id: Option<String>,
    /// The firewall as the kernel listed it right after apply (nft: `nft list table`;
    /// iptables: our `iptables-save` lines prefixed with `v4 ` / `v6 `).
    pub fingerprint: Vec<String>,
}

impl State {
    /// The plan this state was applied from.
    pub fn plan(&self) -> Plan {
        plan::build(&self.config, &self.rp_ifaces)
    }

    /// The state file text.
    pub fn render(&self) -> String {
        let c = &self.config;
        let sel = |s: &Option<PortSel>| s.as_ref().map_or("off".to_string(), |p| p.to_string());
        let list = |v: &[String]| {
            if v.is_empty() {
                "-".to_string()
            } else {
                v.join(",")
            }
        };
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# ringrelay setup state: written by `setup apply`, read by `setup status` and `setup teardown`."
        );
        let _ = writeln!(s, "version {VERSION}");
        // A state parsed from a file without a netns line has none; writing `netns `
        // would make the file (and a journal's copy of it) unreadable.
        if !self.netns.is_empty() {
            let _ = writeln!(s, "netns {}", self.netns);
        }
        if let Some(id) = &self.apply_id {
            let _ = writeln!(s, "apply-id {id}");
        }
        let _ = writeln!(s, "backend {}", c.backend.name());
        let _ = writeln!(s, "port {}", c.port);
        let _ = writeln!(s, "tcp {}", sel(&c.tcp));
        let _ = writeln!(s, "udp {}", sel(&c.udp));
        let _ = writeln!(s, "ipv6 {}", if c.ipv6 { "on" } else { "off" });
        let _ = writeln!(s, "in-ifaces {}", list(&c.in_ifaces));
        let _ = writeln!(s, "fwmark {}", c.fwmark);
        let _ = writeln!(s, "table {}", c.table);
        let _ = writeln!(s, "bypass-mark {:#x}", c.bypass_mark);
        let _ = writeln!(s, "fail-mode {}", c.fail_mode.name());
        let _ = writeln!(
            s,
            "accept-input {}",
            if c.accept_input { "on" } else { "off" }
        );
        // Only when not the default, so that a state without a return path reads the
        // same as before `--source` existed (and an older setup can tear it down).
        if c.source != Source::Router {
            let _ = writeln!(s, "source {}", c.source.name());
        }
        let _ = writeln!(s, "rp-ifaces {}", list(&self.rp_ifaces));
        for r in &self.rules {
            let pref = r.pref.map_or("-".to_string(), |p| p.to_string());
            let how = if r.added { "added" } else { "found" };
            let _ = writeln!(s, "rule {} {how} {pref}", r.family.name());
        }
        for r in &self.routes {
            let how = if r.added { "added" } else { "found" };
            let _ = writeln!(s, "route {} {how}", r.family.name());
        }
        for r in &self.sysctls {
            let _ = writeln!(s, "sysctl {} {} {}", r.key.rel(), r.original, r.written);
            for (k, v) in &r.side {
                let _ = writeln!(s, "side {} {v}", k.rel());
            }
        }
        for m in &self.mangle {
            let _ = writeln!(
                s,
                "mangle {} {} {}",
                m.family.name(),
                u8::from(m.table_existed),
                u8::from(m.prerouting_existed)
            );
        }
        for t in &self.input_rules {
            let _ = writeln!(s, "input-rule {}", t.render());
        }
        if let Some(why) = &self.ipv6_skipped {
            let _ = writeln!(s, "ipv6-skipped {why}");
        }
        for line in &self.fingerprint {
            let _ = writeln!(s, "fw {line}");
        }
        s
    }

    /// Parses [`render`](Self::render)'s output; the error names the line.
    pub fn parse(text: &str) -> Result<State, String> {
        let mut config = Config {
            in_ifaces: Vec::new(),
            ..Config::default()
        };
        let mut st = State {
            netns: String::new(),
            config: config.clone(),
            rp_ifaces: Vec::new(),
            rules: Vec::new(),
            routes: Vec::new(),
            sysctls: Vec::new(),
            mangle: Vec::new(),
            input_rules: Vec::new(),
            ipv6_skipped: None,
            apply_id: None,
            fingerprint: Vec::new(),
        };
        let mut version = None;
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let (key, rest) = line.split_once(' ').unwrap_or((line, ""));
            if key == "fw" {
                st.fingerprint.push(rest.to_string());
                continue;
            }
            if key == "ipv6-skipped" {
                st.ipv6_skipped = Some(rest.to_string());
                continue;
            }
            let w: Vec<&str> = rest.split_whitespace().collect();
            let bad = |what: &str| format!("line {n}: {what}: {line:?}");
            let one = || -> Result<&str, String> {
                match w.as_slice() {
                    [v] => Ok(*v),
                    _ => Err(bad("expected one value")),
                }
            };
            let list = |v: &str| -> Vec<String> {
                if v == "-" {
                    Vec::new()
                } else {
                    v.split(',').map(str::to_string).collect()
                }
            };
            let family = |v: &str| Family::from_name(v).ok_or_else(|| bad("unknown family"));
            // `/` alone would be the empty key, i.e. /proc/sys itself, and would not
            // survive being written back (`sysctl  0 1` reads as two words).
            let sysctl_key = |v: &str| {
                Some(SysctlKey::new(v))
                    .filter(|k| !k.rel().is_empty())
                    .ok_or_else(|| bad("empty sysctl key"))
            };
            let sel = |v: &str| -> Result<Option<PortSel>, String> {
                if v == "off" {
                    Ok(None)
                } else {
                    parse_port_list(v)
                        .map(Some)
                        .map_err(|e| bad(&e.to_string()))
                }
            };
            match key {
                "version" => version = Some(one()?.to_string()),
                "netns" => st.netns = one()?.to_string(),
                "apply-id" => st.apply_id = Some(one()?.to_string()),
                "backend" => config.backend = one()?.parse::<Backend>().map_err(|e| bad(&e))?,
                "port" => config.port = one()?.parse().map_err(|_| bad("bad port"))?,
                "tcp" => config.tcp = sel(one()?)?,
                "udp" => config.udp = sel(one()?)?,
                "ipv6" => config.ipv6 = one()? == "on",
                "in-ifaces" => config.in_ifaces = list(one()?),
                "fwmark" => config.fwmark = parse_mark(one()?).map_err(|e| bad(&e.to_string()))?,
                "table" => config.table = one()?.parse().map_err(|_| bad("bad table"))?,
                "bypass-mark" => {
                    config.bypass_mark = parse_u32(one()?).ok_or_else(|| bad("bad mark"))?
                }
                "fail-mode" => {
                    config.fail_mode = one()?.parse::<FailMode>().map_err(|e| bad(&e))?
                }
                "rp-ifaces" => st.rp_ifaces = list(one()?),
                "source" => config.source = one()?.parse::<Source>().map_err(|e| bad(&e))?,
                "accept-input" => config.accept_input = one()? == "on",
                "input-rule" => st.input_rules.push(InputTarget::parse(&w).ok_or_else(|| {
                    bad("expected: input-rule nft FAMILY TABLE CHAIN | iptables FAMILY")
                })?),
                "rule" => match w.as_slice() {
                    [f, how, pref] => st.rules.push(RuleRecord {
                        family: family(f)?,
                        added: *how == "added",
                        pref: if *pref == "-" {
                            None
                        } else {
                            Some(pref.parse().map_err(|_| bad("bad pref"))?)
                        },
                    }),
                    _ => return Err(bad("expected: rule FAMILY added|found PREF")),
                },
                "route" => match w.as_slice() {
                    [f, how] => st.routes.push(RouteRecord {
                        family: family(f)?,
                        added: *how == "added",
                    }),
                    _ => return Err(bad("expected: route FAMILY added|found")),
                },
                "sysctl" => match w.as_slice() {
                    [k, orig, written] => st.sysctls.push(SysctlRecord {
                        key: sysctl_key(k)?,
                        original: orig.to_string(),
                        written: written.to_string(),
                        side: Vec::new(),
                    }),
                    _ => return Err(bad("expected: sysctl KEY ORIGINAL WRITTEN")),
                },
                "side" => match (w.as_slice(), st.sysctls.last_mut()) {
                    ([k, orig], Some(last)) => last.side.push((sysctl_key(k)?, orig.to_string())),
                    _ => return Err(bad("expected: side KEY ORIGINAL, after a sysctl line")),
                },
                "mangle" => match w.as_slice() {
                    [f, t, p] => st.mangle.push(MangleOrigin {
                        family: family(f)?,
                        table_existed: *t == "1",
                        prerouting_existed: *p == "1",
                    }),
                    _ => return Err(bad("expected: mangle FAMILY TABLE_EXISTED CHAIN_EXISTED")),
                },
                _ => return Err(bad("unknown key")),
            }
        }
        match version.as_deref() {
            Some("1") => {}
            Some(v) => {
                return Err(format!(
                    "unsupported version {v} (this setup writes {VERSION})"
                ))
            }
            None => return Err("no version line".to_string()),
        }
        st.config = config;
        Ok(st)
    }

    /// Loads the state file and sorts it by namespace identity.
    pub fn load_for(path: &Path, identity: &str) -> Result<Loaded, SetupError> {
        Ok(match State::load(path)? {
            None => Loaded::None,
            Some(st) if st.netns == identity => Loaded::Current(st),
            Some(st) => Loaded::Stale(st),
        })
    }

    /// Loads the state file; `Ok(None)` when there is none.
    pub fn load(path: &Path) -> Result<Option<State>, SetupError> {
        match std::fs::read_to_string(path) {
            Ok(text) => State::parse(&text)
                .map(Some)
                .map_err(|reason| SetupError::BadState {
                    path: path.to_path_buf(),
                    reason,
                }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(SetupError::BadState {
                path: path.to_path_buf(),
                reason: e.to_string(),
            }),
        }
    }

    /// Writes the state file atomically (temporary file, fsync, rename), creating the
    /// directory with mode 0755 if needed.
    pub fn save(&self, path: &Path) -> Result<(), SetupError> {
        let err = |source| SetupError::StateWrite {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut f = std::fs::File::create(&tmp).map_err(err)?;
        f.write_all(self.render().as_bytes()).map_err(err)?;
        f.sync_all().map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    }

    /// Removes the state file; a missing one is fine.
    pub fn remove(path: &Path) -> Result<(), SetupError> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(SetupError::StateWrite {
                path: path.to_path_buf(),
                source: e,
            }),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Mark;

    fn sample() -> State {
        State {
            netns: "4026532177-57985-984ac96d-7faf-4a76-a61a-6e865b38c1f6".into(),
            config: Config {
                backend: Backend::Iptables,
                port: 15002,
                tcp: Some(parse_port_list("80,443,8000-8100").unwrap()),
                udp: None,
                ipv6: false,
                in_ifaces: vec!["eth1".into(), "eth2.100".into()],
                fwmark: Mark {
                    value: 0x10,
                    mask: 0xf0,
                },
                table: 123,
                bypass_mark: 0x200,
                fail_mode: FailMode::Closed,
                accept_input: true,
                source: Source::ClientIp,
            },
            rp_ifaces: vec!["eth1".into(), "eth2.100".into()],
            rules: vec![RuleRecord {
                family: Family::V4,
                added: true,
                pref: Some(32765),
            }],
            routes: vec![RouteRecord {
                family: Family::V4,
                added: false,
            }],
            sysctls: vec![
                SysctlRecord {
                    key: SysctlKey::new("net/ipv4/ip_forward"),
                    original: "0".into(),
                    written: "1".into(),
                    side: vec![(SysctlKey::conf("ipv4", "eth1", "forwarding"), "1".into())],
                },
                SysctlRecord {
                    key: SysctlKey::conf("ipv4", "eth2.100", "rp_filter"),
                    original: "1".into(),
                    written: "2".into(),
                    side: Vec::new(),
                },
            ],
            mangle: vec![MangleOrigin {
                family: Family::V4,
                table_existed: false,
                prerouting_existed: false,
            }],
            input_rules: vec![
                InputTarget::Iptables(Family::V4),
                InputTarget::Nft {
                    family: "inet".into(),
                    table: "filter".into(),
                    chain: "input".into(),
                },
            ],
            ipv6_skipped: Some("net.ipv6.conf.all.disable_ipv6=1".into()),
            apply_id: Some("18f2a-4242".into()),
            fingerprint: vec![
                "v4 -A PREROUTING -j RINGRELAY".into(),
                "v4 -A RINGRELAY -i lo -j RETURN".into(),
            ],
        }
    }

    #[test]
    fn round_trip() {
        let st = sample();
        let text = st.render();
        assert_eq!(State::parse(&text).unwrap(), st);
        // The defaults round-trip too (empty lists, all ports).
        let mut d = sample();
        d.config = Config::default();
        d.rp_ifaces.clear();
        d.fingerprint = vec!["table inet ringrelay {".into()];
        assert_eq!(State::parse(&d.render()).unwrap(), d);
        // The default source is not written: such a state reads as before.
        assert!(!d.render().contains("source"));
        assert!(text.contains("\nsource client-ip\n"));
    }

    #[test]
    fn file_round_trip_and_remove() {
        let dir = std::env::temp_dir().join(format!("rrsetup-state-{}", std::process::id()));
        let path = dir.join("sub").join("x.state");
        assert_eq!(State::load(&path).unwrap(), None);
        sample().save(&path).unwrap();
        assert_eq!(State::load(&path).unwrap(), Some(sample()));
        State::remove(&path).unwrap();
        State::remove(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn lock_excludes_writers_and_waits_for_them() {
        let dir = std::env::temp_dir().join(format!("rrsetup-lock-{}", std::process::id()));
        let path = dir.join("x.state");
        let short = Duration::from_millis(150);
        // Nothing applied yet: status and teardown need no lock and create nothing.
        assert!(StateLock::acquire(&path, LockFor::Status, short)
            .unwrap()
            .is_none());
        assert!(!dir.exists());
        let held = StateLock::acquire(&path, LockFor::Apply, short)
            .unwrap()
            .expect("apply locks");
        for what in [LockFor::Teardown, LockFor::Status] {
            let e = StateLock::acquire(&path, what, short).unwrap_err();
            assert!(
                matches!(&e, SetupError::Busy { dir: d, .. } if *d == dir),
                "{e}"
            );
            assert!(e.to_string().contains("another `setup` run"), "{e}");
        }
        // Readers share; a writer waits for the holder and then gets it.
        drop(held);
        let r1 = StateLock::acquire(&path, LockFor::Status, short).unwrap();
        let r2 = StateLock::acquire(&path, LockFor::Status, short).unwrap();
        assert!(r1.is_some() && r2.is_some());
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            drop((r1, r2));
        });
        let w = StateLock::acquire(&path, LockFor::Teardown, Duration::from_secs(5)).unwrap();
        assert!(w.is_some());
        release.join().unwrap();
        drop(w);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn corrupt_files_are_reported_with_the_line() {
        assert_eq!(
            State::parse("version 1\nbogus 1\n").unwrap_err(),
            "line 2: unknown key: \"bogus 1\""
        );
        assert_eq!(State::parse("port 1\n").unwrap_err(), "no version line");
        assert!(State::parse("version 2\n")
            .unwrap_err()
            .contains("unsupported version 2"));
        assert!(State::parse("version 1\nside x 1\n")
            .unwrap_err()
            .contains("after a sysctl line"));
    }

    #[test]
    fn path_includes_namespace() {
        assert_eq!(
            default_path(None, 42),
            PathBuf::from("/run/ringrelay/setup-netns-42.state")
        );
        assert_eq!(
            default_path(Some("/tmp/x".into()), 42),
            PathBuf::from("/tmp/x/setup-netns-42.state")
        );
        assert_eq!(
            default_path(Some("".into()), 7),
            PathBuf::from("/run/ringrelay/setup-netns-7.state")
        );
    }
}

/// Property tests against corrupt state files, and the seed corpus; shared with the
/// journal's.
#[cfg(test)]
pub(crate) mod fuzz;
