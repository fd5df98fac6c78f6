//! Smoke test of the harness: every scenario on every target with tiny windows. It
//! checks that each produced a sane record, or a skipped one with a reason; it asserts
//! no speed. Needs root (network namespaces); prints SKIPPED otherwise.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use ringrelay_bench::harness::{run_matrix, Config};
use ringrelay_bench::load::Scenario;
use ringrelay_bench::report::{Record, Status};
use ringrelay_bench::targets::{Target, Tools};

mod common;
use common::lab_or_skip;

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn skip(name: &str) -> bool {
    if is_root() {
        return false;
    }
    println!("SKIPPED: {name}: needs root for network namespaces");
    true
}

/// The engine and setup binaries the bench would run, or `None` after printing
/// `SKIPPED` with why they were not found.
fn engine_and_setup_or_skip(name: &str) -> Option<(PathBuf, PathBuf)> {
    let tools = Tools::discover();
    match (&tools.engine, &tools.setup) {
        (Ok(e), Ok(s)) => Some((e.clone(), s.clone())),
        (e, s) => {
            println!(
                "SKIPPED: {name}: {:?} {:?}",
                e.as_ref().err(),
                s.as_ref().err()
            );
            None
        }
    }
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rr-bench-smoke-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn lab_namespaces_of(pid: u32) -> Vec<String> {
    let prefix = format!("rr{pid}x");
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// What a measured record must look like, whatever the speed.
fn check_ok(r: &Record) {
    let what = format!("{} {} on {}", r.scenario.name(), r.variant, r.target.name());
    let head = r.headline().unwrap_or(0.0);
    assert!(head > 0.0 && head.is_finite(), "{what}: headline {head}");
    assert!(r.bytes > 0, "{what}: no bytes");
    assert!(r.duration_s > 0.0, "{what}: no window");
    assert_eq!(r.errors, 0, "{what}: errors {:?}", r.error_kinds);
    if matches!(
        r.scenario,
        Scenario::TcpCrr | Scenario::TcpRr | Scenario::UdpRr
    ) {
        let (p50, p99, p999) = (r.p50_us.unwrap(), r.p99_us.unwrap(), r.p999_us.unwrap());
        assert!(
            0.0 < p50 && p50 <= p99 && p99 <= p999,
            "{what}: {p50} {p99} {p999}"
        );
    }
    if r.scenario == Scenario::UdpPps {
        let loss = r.loss.unwrap();
        assert!((0.0..=1.0).contains(&loss), "{what}: loss {loss}");
        assert!(r.sent.unwrap() >= r.ops, "{what}: more delivered than sent");
    }
    if r.target.is_proxy() && !r.scenario.is_udp() {
        assert_eq!(r.intercepted, Some(true), "{what}: not intercepted");
    }
    if r.target == Target::Direct {
        assert_ne!(r.intercepted, Some(true), "{what}: baseline intercepted");
    }
    // The proxy cores' CPU over the window, whatever it is.
    let cpu = r
        .cpu
        .as_ref()
        .unwrap_or_else(|| panic!("{what}: no cpu figure"));
    assert_eq!(cpu.unit, r.scenario.cpu_unit(), "{what}");
    let per = cpu.per_unit.unwrap_or(-1.0);
    assert!(per >= 0.0 && per.is_finite(), "{what}: cpu {cpu:?}");
    assert!((0.0..=1.0).contains(&cpu.util), "{what}: cpu {cpu:?}");
    if r.target.is_proxy() {
        // A proxy relaying for the whole window cannot leave its core idle.
        assert!(cpu.busy_s > 0.0 && per > 0.0, "{what}: cpu {cpu:?}");
        assert!(cpu.proxy_s.is_some(), "{what}: cpu {cpu:?}");
    }
}

#[test]
fn every_scenario_on_every_target() {
    let name = "every_scenario_on_every_target";
    let Some(lab) = lab_or_skip(name) else {
        return;
    };
    let tools = Tools::discover();
    let mut cfg = Config::all(Duration::from_millis(300));
    cfg.conns = Some(2);
    let started = Instant::now();
    let rep = run_matrix(&lab, &cfg, &tools, &mut |l| println!("{l}"));
    println!("{}", rep.to_markdown());
    assert!(!rep.interrupted);
    for s in Scenario::ALL {
        for v in s.variants(Some(2), None) {
            for t in Target::ALL {
                let r = rep
                    .records
                    .iter()
                    .find(|r| r.scenario == s && r.variant == v.label && r.target == t)
                    .unwrap_or_else(|| {
                        panic!("no record for {} {} on {}", s.name(), v.label, t.name())
                    });
                match r.status {
                    Status::Ok => check_ok(r),
                    Status::Skipped => {
                        let why = r.reason.as_deref().unwrap_or("");
                        assert!(!why.is_empty(), "skipped without a reason: {r:?}");
                        println!("SKIPPED: {} {} on {}: {why}", s.name(), v.label, t.name());
                    }
                    Status::Failed => panic!(
                        "{} {} on {} FAILED: {}",
                        s.name(),
                        v.label,
                        t.name(),
                        r.reason.as_deref().unwrap_or("")
                    ),
                }
            }
        }
    }
    // The baseline always runs.
    assert!(rep
        .records
        .iter()
        .filter(|r| r.target == Target::Direct)
        .all(|r| r.status == Status::Ok));
    let md = rep.to_markdown();
    assert!(md.contains("| tcp-bulk 1 stream | Gbit/s |"));
    assert!(rep.to_svg().contains("</svg>"));
    println!("matrix took {:?}", started.elapsed());
}

#[test]
fn cli_run_writes_json_markdown_svg() {
    if skip("cli_run_writes_json_markdown_svg") {
        return;
    }
    let d = tmp("cli");
    let out = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args([
            "run",
            "--scenario",
            "tcp-rr,udp-rr",
            "--target",
            "direct",
            "--duration",
            "0.2s",
            "--conns",
            "2",
        ])
        .arg("--json")
        .arg(d.join("r.json"))
        .arg("--markdown")
        .arg(d.join("r.md"))
        .arg("--svg")
        .arg(d.join("r.svg"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench run failed: {stderr}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("r.json")).unwrap()).unwrap();
    let recs = json["records"].as_array().unwrap();
    assert_eq!(recs.len(), 2);
    for r in recs {
        assert_eq!(r["status"], "ok", "{r}");
        assert_eq!(r["target"], "direct");
        assert!(r["req_s"].as_f64().unwrap() > 0.0);
        assert!(r["p99_us"].as_f64().unwrap() > 0.0);
    }
    assert!(json["env"]["kernel"].as_str().unwrap().contains("Linux"));
    assert!(!json["env"]["load_cores"].as_array().unwrap().is_empty());
    assert!(std::fs::read_to_string(d.join("r.md"))
        .unwrap()
        .contains("| tcp-rr 2 conns | req/s |"));
    assert!(std::fs::read_to_string(d.join("r.svg"))
        .unwrap()
        .starts_with("<svg"));
    let _ = std::fs::remove_dir_all(d);
}

/// `--baseline-engine` adds `base-splice` / `base-copy`: run with the current engine
/// as its own baseline, both must measure and carry their CPU figures.
#[test]
fn baseline_engine_targets_run_side_by_side() {
    let name = "baseline_engine_targets_run_side_by_side";
    if skip(name) {
        return;
    }
    let Some((engine, setup)) = engine_and_setup_or_skip(name) else {
        return;
    };
    let d = tmp("baseline");
    let out = Command::new(env!("CARGO_BIN_EXE_bench"))
        .env("RINGRELAY_ENGINE", &engine)
        .env("RINGRELAY_SETUP", &setup)
        .args([
            "run",
            "--scenario",
            "tcp-rr,udp-rr",
            "--target",
            "engine-splice,base-splice,base-copy",
            "--duration",
            "0.3s",
            "--conns",
            "2",
        ])
        .arg("--baseline-engine")
        .arg(&engine)
        .arg("--json")
        .arg(d.join("r.json"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench run failed: {stderr}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("r.json")).unwrap()).unwrap();
    assert_eq!(
        json["env"]["baseline_engine"].as_str(),
        Some(engine.to_str().unwrap())
    );
    assert!(json["env"]["engine_startup"]["base-splice"].is_array());
    let recs = json["records"].as_array().unwrap();
    assert_eq!(recs.len(), 6);
    for t in ["engine-splice", "base-splice", "base-copy"] {
        for r in recs.iter().filter(|r| r["target"] == t) {
            assert_eq!(r["status"], "ok", "{r}");
            assert!(r["req_s"].as_f64().unwrap() > 0.0, "{r}");
            assert!(r["cpu"]["per_unit"].as_f64().unwrap() > 0.0, "{r}");
            assert_eq!(r["cpu"]["unit"], "µs/req", "{r}");
        }
    }
    assert_eq!(
        recs.iter().filter(|r| r["target"] == "base-copy").count(),
        2
    );
    // The before/after columns are there, for the rate and for the CPU.
    assert!(stdout.contains("engine-splice / base-splice"), "{stdout}");
    assert!(stdout.contains("| scenario | CPU/unit |"), "{stdout}");
    // Without the flag the base targets are refused up front.
    let refused = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["run", "--target", "base-splice", "--duration", "0.1s"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--baseline-engine"));
    let _ = std::fs::remove_dir_all(d);
}

/// `tcp-crr` with idle connections held open on every target: each holds all of
/// them through the window, a proxy through its own sockets.
#[test]
fn idle_connections_held_on_every_target() {
    let name = "idle_connections_held_on_every_target";
    let Some(lab) = lab_or_skip(name) else {
        return;
    };
    let tools = Tools::discover();
    let mut cfg = Config::all(Duration::from_millis(300));
    cfg.scenarios = vec![Scenario::TcpCrr];
    cfg.conns = Some(2);
    cfg.idle_conns = Some(150);
    let rep = run_matrix(&lab, &cfg, &tools, &mut |l| println!("{l}"));
    println!("{}", rep.to_markdown());
    assert!(!rep.interrupted);
    for t in Target::ALL {
        for (label, idle) in [("2 clients", 0), ("2 clients, idle 150", 150)] {
            let r = rep
                .records
                .iter()
                .find(|r| r.target == t && r.variant == label)
                .unwrap_or_else(|| panic!("no record for {label} on {}", t.name()));
            assert_eq!(r.idle_conns, idle);
            match r.status {
                Status::Ok => check_ok(r),
                Status::Skipped => {
                    println!("SKIPPED: {label} on {}: {:?}", t.name(), r.reason);
                    continue;
                }
                Status::Failed => panic!("{label} on {} FAILED: {:?}", t.name(), r.reason),
            }
            if idle == 0 {
                assert!(r.idle.is_none(), "{r:?}");
                continue;
            }
            let i = r.idle.as_ref().expect("idle figures");
            assert_eq!((i.opened, i.held, i.server_held), (150, 150, 150), "{i:?}");
            assert!(i.errors.is_empty(), "{i:?}");
            assert_eq!(i.close_pending, 0, "{i:?}");
            let through = if t.is_proxy() { 150 } else { 0 };
            assert_eq!(i.router_sockets, Some(through), "{}: {i:?}", t.name());
            assert_eq!(i.proxy_limit.is_some(), t.is_proxy(), "{i:?}");
        }
    }
    assert!(rep
        .to_markdown()
        .contains("with and without 150 idle connections"));
}

/// More idle connections than the proxy holds: the record fails and says so, with
/// the limit the engine stated, and the lab is gone afterwards.
#[test]
fn idle_connections_past_the_proxys_limit_are_reported() {
    use std::os::unix::fs::PermissionsExt;
    let name = "idle_connections_past_the_proxys_limit_are_reported";
    if skip(name) {
        return;
    }
    let Some((engine, setup)) = engine_and_setup_or_skip(name) else {
        return;
    };
    let d = tmp("idle-limit");
    let wrapper = d.join("engine");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec {} --max-conns 30 \"$@\"\n",
            engine.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_bench"))
        .env("RINGRELAY_ENGINE", &wrapper)
        .env("RINGRELAY_SETUP", &setup)
        .args([
            "run",
            "--scenario",
            "tcp-crr-idle",
            "--idle-conns",
            "40",
            "--target",
            "engine-copy",
            "--duration",
            "0.3s",
            "--conns",
            "2",
        ])
        .arg("--json")
        .arg(d.join("r.json"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("holds at most 30 connections"), "{stderr}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("r.json")).unwrap()).unwrap();
    let recs = json["records"].as_array().unwrap();
    assert_eq!(recs.len(), 1, "only the idle variant: {recs:?}");
    let r = &recs[0];
    assert_eq!(r["variant"], "2 clients, idle 40");
    assert_eq!(r["idle_conns"], 40);
    assert_eq!(r["status"], "failed", "{r}");
    let why = r["reason"].as_str().unwrap();
    assert!(why.contains("limit is 30 connections"), "{why}");
    let idle = &r["idle"];
    assert_eq!(idle["proxy_limit"], 30, "{idle}");
    assert!(idle["opened"].as_u64().unwrap() <= 30, "{idle}");
    assert!(!idle["errors"].as_object().unwrap().is_empty(), "{idle}");
    assert!(
        lab_namespaces_of(pid).is_empty(),
        "{:?}",
        lab_namespaces_of(pid)
    );
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn demo_tears_down_on_sigint() {
    if skip("demo_tears_down_on_sigint") {
        return;
    }
    let d = tmp("sigint");
    let mut child = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["demo", "--quick", "--out"])
        .arg(&d)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    // Wait for its lab to exist and the load to be running, then interrupt.
    let deadline = Instant::now() + Duration::from_secs(20);
    while lab_namespaces_of(pid).len() < 3 {
        assert!(Instant::now() < deadline, "bench demo built no lab");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(700));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("bench demo did not stop after SIGINT");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(130), "exit {status}; stderr: {err}");
    assert!(
        lab_namespaces_of(pid).is_empty(),
        "left behind: {:?}",
        lab_namespaces_of(pid)
    );
    // The partial results are still written.
    assert!(d.join("demo.json").is_file(), "stderr: {err}");
    let _ = std::fs::remove_dir_all(d);
}

/// `tcp-capacity` with 100 connections on kernel forwarding, the engine and HAProxy:
/// each holds all of them (through its own sockets), relays every one, fills its
/// queues when the clients stall, and is back to its baseline after closing.
#[test]
fn capacity_holds_relays_and_cleans_up() {
    use ringrelay_bench::capacity::StopReason;
    let name = "capacity_holds_relays_and_cleans_up";
    let Some(lab) = lab_or_skip(name) else {
        return;
    };
    let tools = Tools::discover();
    let mut cfg = Config::all(Duration::from_millis(300));
    cfg.scenarios = vec![Scenario::TcpCapacity];
    cfg.targets = vec![Target::Direct, Target::EngineSplice, Target::Haproxy];
    cfg.conns = Some(100);
    let started = Instant::now();
    let rep = run_matrix(&lab, &cfg, &tools, &mut |l| println!("{l}"));
    println!("{}", rep.to_markdown());
    assert!(!rep.interrupted);
    for t in &cfg.targets {
        let r = rep
            .records
            .iter()
            .find(|r| r.target == *t)
            .unwrap_or_else(|| panic!("no record for {}", t.name()));
        match r.status {
            Status::Ok => {}
            Status::Skipped => {
                println!("SKIPPED: tcp-capacity on {}: {:?}", t.name(), r.reason);
                continue;
            }
            Status::Failed => panic!("tcp-capacity on {} FAILED: {:?}", t.name(), r.reason),
        }
        let c = r.capacity.as_ref().expect("capacity figures");
        let what = format!("{}: {c:?}", t.name());
        assert_eq!(
            (c.asked, c.held, c.stop),
            (100, 100, Some(StopReason::Conns)),
            "{what}"
        );
        assert_eq!((c.relay_ok, c.relay_failed), (100, 0), "{what}");
        assert_eq!(c.leak(), None, "{what}");
        assert_eq!(c.close_pending, 0, "{what}");
        if !t.is_proxy() {
            assert_eq!(c.idle.router_sockets, 0, "{what}");
            assert_eq!((c.rss_per_idle_conn, c.stalled), (None, 0), "{what}");
            continue;
        }
        assert_eq!(c.idle.router_sockets, 100, "{what}");
        assert!(c.rss_per_idle_conn.is_some(), "{what}");
        // Stalled: queued bytes in the router, unless the machine had no room.
        if c.stall_capped.is_none() {
            assert_eq!(c.stalled, 100, "{what}");
            assert!(c.skmem_per_stalled_conn.unwrap() > 16_384.0, "{what}");
        }
        if t.is_engine() {
            assert_eq!(c.idle.active, Some(100), "{what}");
            assert_eq!(c.after.active, Some(0), "{what}");
            assert!(c.pipe_size.is_some(), "{what}");
        }
    }
    println!("tcp-capacity took {:?}", started.elapsed());
}
