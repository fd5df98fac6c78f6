//! The engine's startup errors and its clean shutdown.
//!
//! Each test gets a fresh lab and uses only its router namespace, so a broken
//! validation can never leave an engine listening in the host namespace.
//! Needs root; without it each test prints `SKIPPED: <name>: needs root ...`.
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::time::Duration;

use ringrelay_tests::*;
use socket2::{Domain, Socket, Type};

/// A lab, or `None` (after printing SKIPPED) without root.
fn lab(test: &str) -> Option<Lab> {
    if skip_without_root(test) {
        return None;
    }
    match Lab::up() {
        Ok(l) => Some(l),
        Err(e) if is_need_root(&e) => {
            print_skip(test);
            None
        }
        Err(e) => panic!("{test}: lab: {e:#}"),
    }
}

/// Runs the engine in `ns` expecting it to refuse to start; returns its stderr.
fn engine_fails(ns: &Netns, args: &[&str]) -> String {
    let mut cmd = ns.command(engine_bin());
    cmd.args(args);
    let out = run_with_timeout(cmd, Duration::from_secs(15)).unwrap();
    assert!(
        !out.status.success(),
        "engine {args:?} started (status {}); stdout: {}",
        out.status,
        out.stdout
    );
    assert!(
        !out.stdout.contains("ready:"),
        "engine {args:?} said ready: {}",
        out.stdout
    );
    out.stderr
}

#[test]
fn engine_rejects_unknown_cores() {
    let Some(lab) = lab("engine_rejects_unknown_cores") else {
        return;
    };
    let err = engine_fails(&lab.router, &["--cores", "999"]);
    assert!(
        err.contains("--cores") && err.contains("999"),
        "message must name --cores and 999: {err}"
    );
}

#[test]
fn engine_rejects_buffer_sizes_out_of_range() {
    let Some(lab) = lab("engine_rejects_buffer_sizes_out_of_range") else {
        return;
    };
    let err = engine_fails(&lab.router, &["--cores", "0", "--batch-wait-us", "20000"]);
    assert!(
        err.contains("--batch-wait-us") && err.contains("20000") && err.contains("0..=10000"),
        "message must name --batch-wait-us, the value and the range: {err}"
    );
    for flag in ["--pipe-size", "--copy-buf-size"] {
        for value in ["100", "4294971392"] {
            let err = engine_fails(&lab.router, &["--cores", "0", flag, value]);
            assert!(
                err.contains(flag) && err.contains(value) && err.contains("4096 to"),
                "message must name {flag}, the value and the range: {err}"
            );
        }
    }
}

#[test]
fn engine_rejects_a_stall_bound_above_its_max() {
    let Some(lab) = lab("engine_rejects_a_stall_bound_above_its_max") else {
        return;
    };
    let err = engine_fails(
        &lab.router,
        &[
            "--cores",
            "0",
            "--stall-buffer-bytes",
            "1048576",
            "--stall-buffer-max-bytes",
            "65536",
        ],
    );
    assert!(
        err.contains("--stall-buffer-max-bytes 65536")
            && err.contains("--stall-buffer-bytes 1048576"),
        "message must name both flags and values: {err}"
    );
}

#[test]
fn engine_rejects_interception_mark() {
    let Some(lab) = lab("engine_rejects_interception_mark") else {
        return;
    };
    for mark in ["0x1", "3"] {
        let err = engine_fails(&lab.router, &["--cores", "0", "--mark", mark]);
        assert!(
            err.contains("--mark") && err.contains("interception bit"),
            "--mark {mark}: message must name the interception bit: {err}"
        );
    }
}

#[test]
fn engine_refuses_port_in_use() {
    let Some(lab) = lab("engine_refuses_port_in_use") else {
        return;
    };
    let port = 15001;
    // TCP on IPv4, TCP on IPv6 only, UDP on IPv4: each alone must stop the engine.
    let v4 = SocketAddr::new(Family::V4.unspecified(), port);
    let v6 = SocketAddr::new(Family::V6.unspecified(), port);
    let tcp4: TcpListener = lab.router.run(move || TcpListener::bind(v4)).unwrap();
    let err = engine_fails(&lab.router, &["--cores", "0"]);
    assert!(err.contains("already in use"), "TCP v4 taken: {err}");
    drop(tcp4);

    let tcp6: TcpListener = lab
        .router
        .run(move || -> std::io::Result<TcpListener> {
            let s = Socket::new(Domain::IPV6, Type::STREAM, None)?;
            s.set_only_v6(true)?;
            s.bind(&v6.into())?;
            s.listen(16)?;
            Ok(s.into())
        })
        .unwrap();
    let err = engine_fails(&lab.router, &["--cores", "0"]);
    assert!(err.contains("already in use"), "TCP v6 taken: {err}");
    drop(tcp6);

    let udp4: UdpSocket = lab.router.run(move || UdpSocket::bind(v4)).unwrap();
    let err = engine_fails(&lab.router, &["--cores", "0"]);
    assert!(err.contains("already in use"), "UDP v4 taken: {err}");
    drop(udp4);

    // Control: with the port free again the same command starts.
    let engine = Engine::start(&lab.router, &["--cores".into(), "0".into()]);
    assert!(engine.is_ok(), "{:?}", engine.err());
}

/// SIGTERM with a connection still open: the engine drains for --drain-timeout-s,
/// exits 0, and its summary shows every fd it opened closed again.
#[test]
fn engine_sigterm_drains_and_exits_clean() {
    let test = "engine_sigterm_drains_and_exits_clean";
    let Some(mut rig) = Rig::start(test, RigConfig::new()) else {
        return;
    };
    let dst = SocketAddr::new(Family::V4.server_a(), 5020);
    let _srv = TcpServer::echo(&rig.lab.server, dst).unwrap();
    let udp_dst = SocketAddr::new(Family::V6.server_a(), 5021);
    let _udp = UdpEcho::start(&rig.lab.server, udp_dst, false).unwrap();
    let (held, udp_sock) = rig
        .lab
        .client
        .run(move || -> anyhow::Result<_> {
            let mut s = tcp_connect(dst)?;
            s.write_all(b"x")?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b)?;
            let u = udp_client(Family::V6, Duration::from_secs(3))?;
            u.send_to(b"y", udp_dst)?;
            let mut b = [0u8; 8];
            u.recv_from(&mut b)?;
            Ok((s, u))
        })
        .unwrap();
    let e = rig.engine_mut();
    let c = e.counters();
    assert_eq!((c.get("active"), c.get("udp_flows_active")), (1, 1));
    let (status, stdout, stderr) = e.stop(Duration::from_secs(6));
    let status = status.expect("engine did not exit");
    assert!(status.success(), "exit {status}; stderr: {stderr}");
    let summary = stdout
        .lines()
        .find(|l| l.starts_with("summary:"))
        .unwrap_or_else(|| panic!("no summary line: {stdout}"));
    let nums: Vec<u64> = summary
        .split("fds at start ")
        .nth(1)
        .map(|rest| {
            rest.split(|c: char| !c.is_ascii_digit())
                .filter(|s| !s.is_empty())
                .map(|s| s.parse().unwrap())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(nums.len(), 2, "cannot parse: {summary}");
    assert_eq!(nums[0], nums[1], "fds leaked at exit: {summary}");
    drop((held, udp_sock));
}

/// One TCP echo and one UDP echo through the engine of `rig`, v4.
fn relay_once(rig: &Rig, tcp_port: u16, udp_port: u16) {
    let dst = SocketAddr::new(Family::V4.server_a(), tcp_port);
    let _srv = TcpServer::echo(&rig.lab.server, dst).unwrap();
    let udp_dst = SocketAddr::new(Family::V4.server_a(), udp_port);
    let _udp = UdpEcho::start(&rig.lab.server, udp_dst, false).unwrap();
    rig.lab
        .client
        .run(move || -> anyhow::Result<()> {
            let mut s = tcp_connect(dst)?;
            s.write_all(b"ping")?;
            let mut b = [0u8; 4];
            s.read_exact(&mut b)?;
            anyhow::ensure!(&b == b"ping");
            let u = udp_client(Family::V4, Duration::from_secs(3))?;
            u.send_to(b"pong", udp_dst)?;
            let mut b = [0u8; 8];
            let (n, from) = u.recv_from(&mut b)?;
            anyhow::ensure!(&b[..n] == b"pong" && from == udp_dst, "{from}");
            Ok(())
        })
        .unwrap();
}

/// The kernel-feature fallbacks (what a 6.0 kernel gets) are chosen by
/// `RINGRELAY_DISABLE`, said on stderr and in the ready line's ring flags, and the
/// engine relays and stops cleanly with them.
#[test]
fn engine_fallbacks_forced_by_env() {
    let test = "engine_fallbacks_forced_by_env";
    let Some(mut rig) = Rig::start(test, RigConfig::new().without_engine()) else {
        return;
    };
    let args: Vec<String> = [
        "--cores",
        "0",
        "--drain-timeout-s",
        "1",
        "--batch-wait-us",
        "100",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let env = [(
        "RINGRELAY_DISABLE",
        "defer-taskrun,multishot-timeout,min-wait",
    )];
    rig.engine = Some(Engine::start_with_env(&rig.lab.router, &args, &env).unwrap());
    let ready = rig.engine().ready_line.clone();
    assert!(
        ready.contains("ring SINGLE_ISSUER|SUBMIT_ALL "),
        "ring flags with the fallbacks: {ready}"
    );
    // Without min-wait, --batch-wait-us is ignored, and said to be.
    assert!(!ready.contains("batch_wait_us"), "{ready}");
    // Ticks must keep coming with a re-armed single-shot timer: UDP flows expire.
    relay_once(&rig, 5030, 5031);
    let e = rig.engine_mut();
    assert!(e.counters().get("udp_flows_active") >= 1);
    let (status, _, stderr) = e.stop(Duration::from_secs(8));
    assert!(status.expect("engine exited").success(), "{stderr}");
    assert!(
        stderr.contains("multishot-timeout (6.4+): fallback"),
        "stderr: {stderr}"
    );
    assert!(
        stderr.contains("--batch-wait-us 100 needs io_uring min-wait"),
        "stderr: {stderr}"
    );
}

/// SIGHUP is what `systemctl reload` and many operators send by reflex: it must not
/// kill the engine (it used to, without drain or summary).
#[test]
fn engine_survives_sighup() {
    let test = "engine_survives_sighup";
    let Some(mut rig) = Rig::start(test, RigConfig::new()) else {
        return;
    };
    let e = rig.engine_mut();
    e.child.signal(nix::sys::signal::Signal::SIGHUP).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(e.is_running(), "SIGHUP killed the engine");
    relay_once(&rig, 5032, 5033);
    let (status, stdout, stderr) = rig.engine_mut().stop(Duration::from_secs(8));
    assert!(status.expect("engine exited").success(), "{stderr}");
    assert!(stdout.contains("summary:"), "{stdout}");
    assert!(stderr.contains("SIGHUP"), "{stderr}");
}

/// `--log-format json`: every log line is one JSON object with a level, an event
/// name and a message; `--log-level warn` drops the info lines.
#[test]
fn engine_logs_structured_lines() {
    let test = "engine_logs_structured_lines";
    let Some(mut rig) = Rig::start(test, RigConfig::new().without_engine()) else {
        return;
    };
    let args = |level: &str| -> Vec<String> {
        [
            "--cores",
            "0",
            "--drain-timeout-s",
            "1",
            "--log-format",
            "json",
            "--log-level",
            level,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    for level in ["info", "warn"] {
        rig.engine = Some(Engine::start(&rig.lab.router, &args(level)).unwrap());
        let e = rig.engine_mut();
        e.child.signal(nix::sys::signal::Signal::SIGHUP).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let (status, _, stderr) = e.stop(Duration::from_secs(5));
        assert!(status.expect("exited").success(), "{stderr}");
        let lines: Vec<serde_json::Value> = stderr
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        for l in &lines {
            assert!(l["ts"].is_string() && l["msg"].is_string(), "{l}");
            assert!(["error", "warn", "info", "debug"].contains(&l["level"].as_str().unwrap()));
        }
        let events: Vec<&str> = lines.iter().filter_map(|l| l["event"].as_str()).collect();
        if level == "info" {
            assert!(events.contains(&"sighup"), "{events:?}");
            assert!(events.contains(&"stopping"), "{events:?}");
        } else {
            assert!(
                !events.contains(&"sighup") && !events.contains(&"stopping"),
                "{events:?}"
            );
        }
    }
}
