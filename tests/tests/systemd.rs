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
