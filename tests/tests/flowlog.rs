//! Flow logs: `engine --flow-log PATH` writes one JSON line per finished TCP
//! connection and ended UDP flow, with the real addresses, bytes and close reason,
//! and reopens the file on SIGHUP (logrotate without copytruncate).
//!
//! Needs root; without it the test prints `SKIPPED: <name>: ...` and returns.
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::time::Duration;

use ringrelay_tests::*;

fn lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn wait_lines(path: &std::path::Path, n: usize) -> Vec<serde_json::Value> {
    poll_until(Duration::from_secs(5), || {
        let l = lines(path);
        (l.len() >= n).then_some(l)
    })
    .unwrap_or_else(|| {
        panic!(
            "fewer than {n} lines in {}: {:?}",
            path.display(),
            lines(path)
        )
    })
}

#[test]
fn flow_log_records_connections_flows_and_reopens() {
    let test = "flow_log_records_connections_flows_and_reopens";
    let Some(mut rig) = Rig::start(test, RigConfig::new().without_engine()) else {
        return;
    };
    let log = rig.state_dir().join("flows.jsonl");
    let args: Vec<String> = [
        "--cores",
        "0-1",
        "--drain-timeout-s",
        "1",
        "--udp-single-exchange-timeout-s",
        "1",
        "--flow-log",
        log.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    rig.engine = Some(Engine::start(&rig.lab.router, &args).unwrap());

    let tcp_dst = SocketAddr::new(Family::V4.server_a(), 5060);
    let _srv = TcpServer::echo(&rig.lab.server, tcp_dst).unwrap();
    let udp_dst = SocketAddr::new(Family::V6.server_a(), 5061);
    let _udp = UdpEcho::start(&rig.lab.server, udp_dst, false).unwrap();
    let refused = SocketAddr::new(Family::V4.server_a(), 5062); // nothing listens
    let (tcp_client, udp_client_addr) = rig
        .lab
        .client
        .run(move || -> anyhow::Result<(SocketAddr, SocketAddr)> {
            let mut s = tcp_connect(tcp_dst)?;
            s.write_all(&[7u8; 1000])?;
            s.shutdown(Shutdown::Write)?;
            let mut back = Vec::new();
            s.read_to_end(&mut back)?;
            anyhow::ensure!(back.len() == 1000, "echo {}", back.len());
            let local = s.local_addr()?;
            let u = udp_client(Family::V6, Duration::from_secs(3))?;
            u.send_to(b"hello", udp_dst)?;
            let mut b = [0u8; 16];
            u.recv_from(&mut b)?;
            let _ = tcp_connect(refused).err();
            Ok((local, u.local_addr()?))
        })
        .unwrap();

    let all = wait_lines(&log, 3);
    let tcp = all
        .iter()
        .find(|r| r["orig_dst_port"] == 5060)
        .unwrap_or_else(|| panic!("no record of the TCP connection: {all:?}"));
    assert_eq!(tcp["proto"], "tcp");
    assert_eq!(tcp["client"], tcp_client.ip().to_string());
    assert_eq!(tcp["client_port"], tcp_client.port());
    assert_eq!(tcp["orig_dst"], tcp_dst.ip().to_string());
    assert_eq!(tcp["upstream"], tcp_dst.to_string());
    assert_eq!(tcp["verdict"], "relay");
    assert_eq!(
        (tcp["bytes_c2s"].as_u64(), tcp["bytes_s2c"].as_u64()),
        (Some(1000), Some(1000))
    );
    assert_eq!(tcp["reason"], "client_fin", "{tcp}");
    assert!(tcp["start"].as_str().unwrap().ends_with('Z'), "{tcp}");
    let refused_rec = all
        .iter()
        .find(|r| r["orig_dst_port"] == 5062)
        .unwrap_or_else(|| panic!("no record of the refused connect: {all:?}"));
    assert_eq!(refused_rec["reason"], "connect_refused", "{refused_rec}");
    assert_eq!(refused_rec["errno"], ECONNREFUSED, "{refused_rec}");

    // The UDP flow ends after its single exchange (1 s) and is logged.
    let all = poll_until(Duration::from_secs(6), || {
        let l = lines(&log);
        l.iter().any(|r| r["proto"] == "udp").then_some(l)
    })
    .expect("a UDP record");
    let udp = all.iter().find(|r| r["proto"] == "udp").unwrap();
    // The client's socket is bound to [::]: its address is the client's own.
    assert_eq!(udp["client"], Family::V6.client().to_string());
    assert_eq!(udp["client_port"], udp_client_addr.port());
    assert_eq!(udp["orig_dst"], udp_dst.ip().to_string());
    assert_eq!(
        (udp["dgrams_c2s"].as_u64(), udp["dgrams_s2c"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(udp["bytes_c2s"], 5);
    assert_eq!(udp["reason"], "single_exchange", "{udp}");

    // logrotate: move the file away, SIGHUP, the next record goes to a new file.
    let rotated = rig.state_dir().join("flows.jsonl.1");
    std::fs::rename(&log, &rotated).unwrap();
    rig.engine_mut()
        .child
        .signal(nix::sys::signal::Signal::SIGHUP)
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    rig.lab
        .client
        .run(move || -> anyhow::Result<()> {
            let mut s = tcp_connect(tcp_dst)?;
            s.write_all(b"x")?;
            s.shutdown(Shutdown::Write)?;
            let mut b = Vec::new();
            s.read_to_end(&mut b)?;
            Ok(())
        })
        .unwrap();
    let fresh = wait_lines(&log, 1);
    assert_eq!(fresh[0]["bytes_c2s"], 1, "{fresh:?}");
    let old = lines(&rotated).len();
    let (status, _, stderr) = rig.engine_mut().stop(Duration::from_secs(5));
    assert!(status.expect("exited").success(), "{stderr}");
    assert_eq!(
        lines(&rotated).len(),
        old,
        "records went to the rotated file"
    );
}

/// ECONNREFUSED on Linux.
const ECONNREFUSED: i32 = 111;
