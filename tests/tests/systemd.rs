//! The engine under a service manager: the `sd_notify` protocol (`READY=1`,
//! `STATUS=`, `MAINPID=`, `STOPPING=1`), watchdog pings, the in-place restart on
//! SIGUSR2, and the shipped unit files (`systemd-analyze verify`).
//!
//! The namespace tests need root; without it they print `SKIPPED: <name>: ...`.
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use ringrelay_tests::*;

/// A stand-in for systemd's notification socket.
struct NotifySocket {
    sock: UnixDatagram,
}

impl NotifySocket {
    fn bind(path: &Path) -> NotifySocket {
        let _ = std::fs::remove_file(path);
        let sock = UnixDatagram::bind(path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        NotifySocket { sock }
    }

    /// Messages until one satisfies `want` (returned), or `None` after `timeout`.
    fn wait(&self, timeout: Duration, mut want: impl FnMut(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                if want(&msg) {
                    return Some(msg);
                }
            }
        }
        None
    }
}

fn field<'a>(msg: &'a str, key: &str) -> Option<&'a str> {
    msg.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

fn args(extra: &[&str]) -> Vec<String> {
    ["--cores", "0-1", "--drain-timeout-s", "2"]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect()
}

#[test]
fn engine_speaks_sd_notify_and_pings_the_watchdog() {
    let test = "engine_speaks_sd_notify_and_pings_the_watchdog";
    let Some(mut rig) = Rig::start(test, RigConfig::new().without_engine()) else {
        return;
    };
    let path = rig.state_dir().join("notify.sock");
    let notify = NotifySocket::bind(&path);
    let env = [
        ("NOTIFY_SOCKET", path.to_str().unwrap()),
        ("WATCHDOG_USEC", "400000"),
    ];
    rig.engine = Some(Engine::start_with_env(&rig.lab.router, &args(&[]), &env).unwrap());
    let pid = rig.engine().child.pid();
    let ready = notify
        .wait(Duration::from_secs(5), |m| m.contains("READY=1"))
        .expect("READY=1");
    assert_eq!(
        field(&ready, "MAINPID"),
        Some(pid.to_string().as_str()),
        "{ready}"
    );
    assert!(
        field(&ready, "STATUS").is_some_and(|s| s.contains("connections")),
        "{ready}"
    );
    let t = Instant::now();
    let mut pings = 0;
    while pings < 4 {
        notify
            .wait(Duration::from_secs(2), |m| m == "WATCHDOG=1")
            .unwrap_or_else(|| panic!("only {pings} watchdog pings"));
        pings += 1;
    }
    // Half the 400 ms interval between pings: 4 pings take about 0.8 s.
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "pings too slow: {:?}",
        t.elapsed()
    );
    rig.engine_mut().child.signal(Signal::SIGTERM).unwrap();
    notify
        .wait(Duration::from_secs(5), |m| m.contains("STOPPING=1"))
        .expect("STOPPING=1");
    let status = rig.engine_mut().child.wait_timeout(Duration::from_secs(8));
    assert!(status.expect("engine exited").success());
}

/// SIGUSR2 starts the installed binary again with the same arguments; it takes the
/// sockets over through `--takeover`, reports itself as the new main pid, and the
/// old engine drains and exits 0 while connections keep working.
#[test]
fn engine_restarts_in_place_on_sigusr2() {
    let test = "engine_restarts_in_place_on_sigusr2";
    let Some(mut rig) = Rig::start(test, RigConfig::new().without_engine()) else {
        return;
    };
    let notify_path = rig.state_dir().join("notify.sock");
    let notify = NotifySocket::bind(&notify_path);
    let takeover = rig.state_dir().join("takeover.sock");
    let env = [("NOTIFY_SOCKET", notify_path.to_str().unwrap())];
    let a = args(&["--takeover", takeover.to_str().unwrap()]);
    rig.engine = Some(Engine::start_with_env(&rig.lab.router, &a, &env).unwrap());
    let old_pid = rig.engine().child.pid();
    notify
        .wait(Duration::from_secs(5), |m| m.contains("READY=1"))
        .expect("first READY=1");
    rig.engine_mut().child.signal(Signal::SIGUSR2).unwrap();
    let ready = notify
        .wait(Duration::from_secs(10), |m| {
            m.contains("READY=1") && field(m, "MAINPID") != Some(&old_pid.to_string())
        })
        .expect("READY=1 from the successor");
    let new_pid: i32 = field(&ready, "MAINPID").unwrap().parse().unwrap();
    let status = rig
        .engine_mut()
        .child
        .wait_timeout(Duration::from_secs(8))
        .expect("the old engine exited");
    assert!(status.success(), "{}", rig.engine_mut().child.stderr());
    // The successor relays.
    let dst = SocketAddr::new(Family::V4.server_a(), 5050);
    let _srv = TcpServer::echo(&rig.lab.server, dst).unwrap();
    let echoed = rig.lab.client.run(move || -> anyhow::Result<Vec<u8>> {
        let mut s = tcp_connect(dst)?;
        s.write_all(b"after")?;
        let mut b = vec![0u8; 5];
        s.read_exact(&mut b)?;
        Ok(b)
    });
    kill(Pid::from_raw(new_pid), Signal::SIGTERM).unwrap();
    assert_eq!(echoed.unwrap(), b"after");
    let t = Instant::now();
    while kill(Pid::from_raw(new_pid), None).is_ok() && t.elapsed() < Duration::from_secs(8) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        kill(Pid::from_raw(new_pid), None).is_err(),
        "the successor did not exit on SIGTERM"
    );
}

/// `prlimit --memlock=BYTES setpriv ... --`: the engine as the shipped unit runs it,
/// a user of its own (`DynamicUser=`) holding only the unit's network capabilities
/// (`CAP_SYS_RESOURCE` too where this sandbox's bounding set has it), so without
/// `CAP_IPC_LOCK`, and with `RLIMIT_MEMLOCK` at `memlock` bytes.
fn as_unit_user(uid: u32, memlock: u64) -> Vec<String> {
    let mut caps = "-all,+net_admin,+net_raw,+net_bind_service".to_string();
    if has_cap_in_bounding_set(24) {
        caps.push_str(",+sys_resource");
    }
    [
        "prlimit".to_string(),
        format!("--memlock={memlock}:{memlock}"),
        "setpriv".to_string(),
        format!("--reuid={uid}"),
        format!("--regid={uid}"),
        "--clear-groups".to_string(),
        "--no-new-privs".to_string(),
        format!("--inh-caps={caps}"),
        format!("--ambient-caps={caps}"),
        format!("--bounding-set={caps}"),
        "--".to_string(),
    ]
    .into()
}

fn has_cap_in_bounding_set(cap: u32) -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let hex = s.lines().find_map(|l| l.strip_prefix("CapBnd:"))?.trim();
            u64::from_str_radix(hex, 16).ok()
        })
        .is_some_and(|m| m & (1 << cap) != 0)
}

/// Under the unit's user the kernel charges ring memory to `RLIMIT_MEMLOCK`, summed
/// over every ring of that user. The engine sizes its rings to the limit: with room
/// for smaller rings only it says so, starts with them and relays; with room for
/// none it exits 1 naming the limit and the fix. (Found by CI: 8 MiB, systemd's
/// default, is less than 8 cores of full-size rings.) Needs root.
#[test]
fn engine_as_the_unit_user_fits_its_rings_in_memlock() {
    let test = "engine_as_the_unit_user_fits_its_rings_in_memlock";
    let Some(mut rig) = Rig::start(test, RigConfig::new().without_engine()) else {
        return;
    };
    // Uids no other process has: the kernel's charge is per user, and a ring's is
    // released only some time after its process exited (the ring is torn down by a
    // kernel worker), so each run gets a fresh one.
    let uid = 3_000_000 + 2 * (std::process::id() % 1_000_000);
    let a = args(&[]);
    // A sandbox may forbid switching to an unmapped uid: say so rather than fail.
    let probe = std::process::Command::new("setpriv")
        .args([&format!("--reuid={uid}"), &format!("--regid={uid}")])
        .args(["--clear-groups", "true"])
        .output();
    if !probe.as_ref().is_ok_and(|o| o.status.success()) {
        eprintln!("SKIPPED: {test}: cannot run a process as uid {uid} here: {probe:?}");
        return;
    }

    // 256 KiB: not even one ring at the smallest CQ (about 350 KiB) fits.
    let wrapper = as_unit_user(uid, 256 << 10);
    let mut cmd = rig.lab.router.command(&wrapper[0]);
    cmd.args(&wrapper[1..]).arg(engine_bin()).args(&a);
    let out = run_with_timeout(cmd, Duration::from_secs(15)).unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    for want in [
        "RLIMIT_MEMLOCK (now 256 KiB",
        "lacks CAP_IPC_LOCK",
        "LimitMEMLOCK=infinity",
    ] {
        assert!(
            out.stderr.contains(want),
            "{want:?} missing: {}",
            out.stderr
        );
    }

    // 1 MiB for 2 cores: 512 KiB each, room for a CQ of 8192 (408 KiB), not 16384.
    let uid = uid + 1;
    let wrapper = as_unit_user(uid, 1 << 20);
    let engine = Engine::start_wrapped(&rig.lab.router, &wrapper, &a, &[]).unwrap();
    let pid = engine.pid();
    rig.engine = Some(engine);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        .unwrap();
    assert_eq!(eff & (1 << 14), 0, "the engine kept CAP_IPC_LOCK: {status}");
    assert!(
        status.contains(&format!("Uid:\t{uid}\t")),
        "not running as {uid}: {status}"
    );
    assert!(
        rig.engine().ready_line.ends_with("sq=4096 cq=8192"),
        "{}",
        rig.engine().ready_line
    );
    let stderr = rig.engine().child.stderr();
    assert!(
        stderr.contains("each of the 2 cores gets a CQ of 8192 entries"),
        "{stderr}"
    );
    relay_tcp_and_udp_once(&rig, 5051, 5052).unwrap();
    let (exit, _, stderr) = rig.engine_mut().stop(Duration::from_secs(5));
    assert!(exit.is_some_and(|s| s.success()), "{exit:?}: {stderr}");
}

/// The shipped units pass `systemd-analyze verify` (with the binaries this build
/// made standing in for the installed ones). Needs no root.
#[test]
fn unit_files_verify() {
    let test = "unit_files_verify";
    if std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!("{test}: systemd-analyze is missing (scripts/deps.sh installs systemd)");
    }
    let engine_unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/systemd/ringrelay-engine.service"),
    )
    .unwrap();
    // Full-size rings on every core, also while a successor takes over
    // (engine_as_the_unit_user_fits_its_rings_in_memlock).
    assert!(
        engine_unit.lines().any(|l| l == "LimitMEMLOCK=infinity"),
        "the engine unit must lift RLIMIT_MEMLOCK"
    );
    let dir = std::env::temp_dir().join(format!("ringrelay-units-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/systemd");
    let mut units = Vec::new();
    for name in ["ringrelay-setup.service", "ringrelay-engine.service"] {
        let text = std::fs::read_to_string(src.join(name)).unwrap();
        let text = text
            .replace("/usr/bin/ringrelay-engine", engine_bin().to_str().unwrap())
            .replace("/usr/bin/ringrelay-setup", setup_bin().to_str().unwrap());
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        units.push(path);
    }
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg("--man=no")
        .args(&units)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify: {stderr}");
    // verify exits 0 on some warnings; a unit it could not parse is still an error.
    assert!(!stderr.contains("Unknown key"), "{stderr}");
    assert!(!stderr.contains("Invalid"), "{stderr}");
}
