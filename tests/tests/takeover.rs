//! Restarts that drop nothing: `engine --takeover PATH` ten times in a row under
//! continuous TCP connection churn, a long transfer and a steady UDP exchange.
//!
//! Needs root; without it the test prints `SKIPPED: <name>: ...` and returns.
#![forbid(unsafe_code)]

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use ringrelay_tests::*;

const SWAPS: usize = 10;
const DRAIN_S: u64 = 8;

#[test]
fn takeover_ten_restarts_drop_nothing() {
    let test = "takeover_ten_restarts_drop_nothing";
    let Some(rig) = Rig::start(test, RigConfig::new().without_engine()) else {
        return;
    };
    let path = rig.state_dir().join("takeover.sock");
    let args: Vec<String> = [
        "--cores",
        "0-1",
        "--drain-timeout-s",
        &DRAIN_S.to_string(),
        // A draining engine's UDP flows end once quiet this long.
        "--udp-single-exchange-timeout-s",
        "1",
        "--takeover",
        path.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut engine = Engine::start(&rig.lab.router, &args).unwrap();

    let crr_dst = SocketAddr::new(Family::V4.server_a(), 5040);
    let _crr = TcpServer::echo(&rig.lab.server, crr_dst).unwrap();
    let bulk_dst = SocketAddr::new(Family::V4.server_a(), 5042);
    const BULK: u64 = 3_000_000;
    let bulk_srv = TcpServer::start(&rig.lab.server, bulk_dst, |s, _| {
        let got = read_digest(&mut &s)?;
        ensure!(
            got == pattern_digest(21, BULK),
            "bulk request corrupted: {got:?}"
        );
        write_pattern(&mut &s, 22, 1000)?;
        Ok(())
    })
    .unwrap();
    let udp_dst = SocketAddr::new(Family::V4.server_a(), 5041);
    let _udp = UdpEcho::start(&rig.lab.server, udp_dst, false).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let (crr_ok, crr_failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let crr = {
        let (stop, ok, failed) = (stop.clone(), crr_ok.clone(), crr_failed.clone());
        rig.lab.client.spawn(move || {
            let mut errors = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stop.load(Relaxed) && Instant::now() < deadline {
                let one = || -> anyhow::Result<()> {
                    let mut s = tcp_connect(crr_dst)?;
                    s.set_read_timeout(Some(Duration::from_secs(5)))?;
                    s.write_all(b"0123456789abcdef")?;
                    let mut b = [0u8; 16];
                    s.read_exact(&mut b)?;
                    ensure!(&b == b"0123456789abcdef", "echo {b:?}");
                    Ok(())
                };
                match one() {
                    Ok(()) => ok.fetch_add(1, Relaxed),
                    Err(e) => {
                        errors.push(format!("{e:#}"));
                        failed.fetch_add(1, Relaxed)
                    }
                };
            }
            errors
        })
    };
    // Long transfers that each span a swap: the old engine must drain them intact.
    let bulk = {
        let stop = stop.clone();
        rig.lab.client.spawn(move || -> anyhow::Result<usize> {
            let mut done = 0;
            while !stop.load(Relaxed) {
                let mut s = tcp_connect(bulk_dst)?;
                let mut p = Pattern::new(21);
                let mut chunk = vec![0u8; 30_000];
                for _ in 0..BULK / 30_000 {
                    p.fill(&mut chunk);
                    s.write_all(&chunk)?;
                    std::thread::sleep(Duration::from_millis(20)); // ~2 s per transfer
                }
                s.shutdown(Shutdown::Write)?;
                let got = read_digest(&mut s).context("bulk response")?;
                ensure!(got == pattern_digest(22, 1000), "bulk response corrupted");
                done += 1;
            }
            Ok(done)
        })
    };
    let udp = {
        let stop = stop.clone();
        rig.lab.client.spawn(move || -> anyhow::Result<(u64, u64)> {
            let s = udp_client(Family::V4, Duration::from_millis(1))?;
            s.set_nonblocking(true)?;
            let mut sent = HashSet::new();
            let mut answered = 0u64;
            let mut seq = 0u64;
            let mut buf = [0u8; 64];
            let mut finish = None;
            loop {
                if finish.is_none() && stop.load(Relaxed) {
                    finish = Some(Instant::now() + Duration::from_secs(1));
                }
                if finish.is_none() {
                    if s.send_to(&seq.to_be_bytes(), udp_dst).is_ok() {
                        sent.insert(seq);
                    }
                    seq += 1;
                }
                while let Ok((n, from)) = s.recv_from(&mut buf) {
                    ensure!(from == udp_dst && n == 8, "answer from {from}, {n} bytes");
                    let k = u64::from_be_bytes(buf[..8].try_into().unwrap());
                    if sent.remove(&k) {
                        answered += 1;
                    }
                }
                if finish.is_some_and(|t| Instant::now() > t) {
                    return Ok((answered, sent.len() as u64));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };

    std::thread::sleep(Duration::from_millis(500));
    for swap in 0..SWAPS {
        let before = crr_ok.load(Relaxed);
        let next = Engine::start(&rig.lab.router, &args)
            .unwrap_or_else(|e| panic!("swap {swap}: successor: {e:#}"));
        let mut old = std::mem::replace(&mut engine, next);
        let status = old
            .child
            .wait_timeout(Duration::from_secs(DRAIN_S + 5))
            .unwrap_or_else(|| panic!("swap {swap}: the old engine did not exit"));
        old.child.finish_output();
        let stderr = old.child.stderr();
        assert!(
            status.success(),
            "swap {swap}: old engine: {status}; {stderr}"
        );
        assert!(
            stderr.contains("handed the sockets over"),
            "swap {swap}: {}",
            tail(&stderr, 1500)
        );
        let summary = old.child.stdout();
        let at_exit = summary.split("summary:").nth(1).expect("summary");
        let c = parse_counter_table(at_exit).unwrap();
        assert_eq!(
            c.get("accepted"),
            c.get("closed") + c.get("resets"),
            "{c:?}"
        );
        assert_eq!(
            c.get("resets"),
            0,
            "swap {swap}: the old engine reset: {c:?}"
        );
        // Keep going only once new connections flow through the successor.
        let t = Instant::now();
        while crr_ok.load(Relaxed) < before + 20 && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Relaxed);
    let errors = crr.join().unwrap();
    let bulk_done = bulk.join().unwrap().expect("long transfers");
    let (answered, lost) = udp.join().unwrap().expect("udp exchange");
    let (ok, failed) = (crr_ok.load(Relaxed), crr_failed.load(Relaxed));
    eprintln!(
        "{test}: {SWAPS} swaps: {ok} connections ok, {failed} failed; {bulk_done} long \
         transfers; UDP {answered} answered, {lost} unanswered"
    );
    assert_eq!(
        failed,
        0,
        "failed connections: {:?}",
        &errors[..errors.len().min(5)]
    );
    assert!(ok > 200, "too little load: {ok}");
    assert!(bulk_done >= 3, "long transfers completed: {bulk_done}");
    assert!(bulk_srv.errors().is_empty(), "{:?}", bulk_srv.errors());
    // Only datagrams in flight at the instant of a swap may go unanswered.
    assert!(
        lost <= SWAPS as u64,
        "{lost} UDP answers lost over {SWAPS} swaps"
    );
    let (status, _, stderr) = engine.stop(Duration::from_secs(DRAIN_S + 5));
    assert!(status.expect("last engine exited").success(), "{stderr}");
}
