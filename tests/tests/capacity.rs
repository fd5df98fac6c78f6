//! Capacity per file descriptor: connections held open through the engine near
//! RLIMIT_NOFILE, with UDP on. A test binary of its own, so that the 19,000 sockets
//! its tests hold in this process share the fd table with nothing else; its two
//! tests take turns.
//! Needs root (network namespaces); says so and passes only as skipped without.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{ensure, Context};
use ringrelay_tests::*;

/// One capacity test at a time: each holds 2 fds per connection in this process.
static TURN: Mutex<()> = Mutex::new(());

/// Connections held open through the engine by the capacity tests.
const CAPACITY_CONNS: usize = 9000;

/// Each connection costs the engine 2 fds in both relay modes, drawn from one fd pool
/// shared with pipes and UDP (engine/src/fdpool.rs): with RLIMIT_NOFILE at 20,000 and
/// UDP on, at least 9,000 connections are held open at once, every one relaying (a
/// byte each way). Where this process has the fds for both ends, it fills the TCP
/// side to the engine's whole `max_conns` and checks that a new UDP flow is still
/// relayed (the pool's UDP floor); otherwise it holds 9,000 and checks that the engine
/// still accepts and relays one more after them. Before the pool, a fixed quarter of
/// the fds for UDP left room for 6,851 (splice) or 7,308 (copy) connections; before
/// the bounded pipe pool, splice mode reserved 6 fds per connection (2,436).
fn capacity(test: &str, relay: &str) {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let cfg = RigConfig::new().cores("0").relay(relay);
    let Some(mut rig) = Rig::start(test, cfg) else {
        return;
    };
    let nofile = ringrelay_engine::sys::raise_nofile_to_hard().unwrap() as usize;
    let ready = rig.engine().ready_line.clone();
    assert!(ready.contains("tcp+udp"), "UDP must be on: {ready}");
    let max_conns: usize = ready
        .split_whitespace()
        .skip_while(|w| *w != "max_conns")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no max_conns in {ready}"));
    // The engine's budget, checked where the limit is this machine's 20,000.
    if nofile <= 20_000 {
        assert!(max_conns >= CAPACITY_CONNS, "{ready}");
    }
    // Both ends live in this process: 2 fds per connection here too.
    let room = nofile.saturating_sub(400) / 2;
    let fill = max_conns <= room;
    let (n, total) = if fill {
        (max_conns, max_conns)
    } else {
        let n = CAPACITY_CONNS.min(max_conns).min(room);
        (n, n + 1)
    };
    assert!(
        n >= 8000,
        "this process may hold only {n} connections (nofile {nofile})"
    );
    let dst = SocketAddr::new(Family::V4.server_a(), 5020);
    let listener = rig
        .lab
        .server
        .run(move || tcp_listen(dst))
        .expect("listening in the server namespace");
    // Echoes one byte on each connection and keeps it open.
    let server = std::thread::spawn(move || -> anyhow::Result<Vec<TcpStream>> {
        let mut held = Vec::with_capacity(total);
        for _ in 0..total {
            let (mut s, _) = listener.accept()?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b)?;
            s.write_all(&b)?;
            held.push(s);
        }
        Ok(held)
    });
    let clients: Vec<TcpStream> = rig
        .lab
        .client
        .run(move || -> anyhow::Result<Vec<TcpStream>> {
            let mut v = Vec::with_capacity(total);
            for i in 0..total {
                let mut s = tcp_connect(dst).with_context(|| format!("connection {i}"))?;
                s.set_read_timeout(Some(Duration::from_secs(10)))?;
                let b = [(i % 251) as u8];
                s.write_all(&b)?;
                let mut got = [0u8; 1];
                s.read_exact(&mut got)
                    .with_context(|| format!("echo on connection {i}"))?;
                ensure!(got == b, "connection {i}: echo {got:?}, sent {b:?}");
                v.push(s);
            }
            Ok(v)
        })
        .unwrap_or_else(|e| panic!("{total} connections through the engine: {e:#}"));
    let held = server.join().unwrap().unwrap();
    assert_eq!(held.len(), total);
    if fill {
        // Every TCP credit is taken: a new UDP flow lives on the floor.
        let udp_dst = SocketAddr::new(Family::V4.server_a(), 5021);
        let _echo = UdpEcho::start(&rig.lab.server, udp_dst, true).unwrap();
        let got = rig
            .lab
            .client
            .run(move || -> anyhow::Result<Vec<u8>> {
                let s = udp_client(Family::V4, Duration::from_secs(3))?;
                s.send_to(b"floor", udp_dst)?;
                let mut buf = [0u8; 256];
                let (len, from) = s.recv_from(&mut buf).context("no UDP answer")?;
                ensure!(from == udp_dst, "answer from {from}");
                Ok(buf[..len].to_vec())
            })
            .unwrap_or_else(|e| panic!("UDP next to {n} connections: {e:#}"));
        let mut want = udp_tag(udp_dst);
        want.extend_from_slice(b"floor");
        assert_eq!(got, want);
    }
    let c = rig.engine_mut().counters();
    assert_eq!(c.get("active"), total as u64, "{c:?}");
    assert_eq!(c.get("resets"), 0, "{c:?}");
    assert_eq!(c.get("accept_emfile"), 0, "{c:?}");
    if fill {
        assert_eq!(c.get("udp_flows_created"), 1, "{c:?}");
        assert_eq!(c.get("udp_dgrams_s2c"), 1, "{c:?}");
    }
    drop(clients);
    drop(held);
}

#[test]
fn tcp_capacity_9000_connections_per_20000_fds_splice() {
    capacity(
        "tcp_capacity_9000_connections_per_20000_fds_splice",
        "splice",
    );
}

#[test]
fn tcp_capacity_9000_connections_per_20000_fds_copy() {
    capacity("tcp_capacity_9000_connections_per_20000_fds_copy", "copy");
}
