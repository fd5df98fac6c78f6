//! UDP through the engine: real DNS (dnsmasq + dig), many flows to two servers,
//! datagram sizes, flow expiry, flow eviction, and what must bypass the engine.
//!
//! Every test runs in its own lab and needs root; without it each prints
//! `SKIPPED: <name>: needs root ...` and returns.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use ringrelay_tests::*;

/// Sends `payload` to `dst` and waits for one reply; returns it with its source.
fn exchange(
    s: &UdpSocket,
    dst: SocketAddr,
    payload: &[u8],
) -> anyhow::Result<(Vec<u8>, SocketAddr)> {
    s.send_to(payload, dst)
        .with_context(|| format!("send {} bytes to {dst}", payload.len()))?;
    let mut buf = vec![0u8; 70_000];
    let (n, from) = s
        .recv_from(&mut buf)
        .with_context(|| format!("no reply from {dst} to {} bytes", payload.len()))?;
    buf.truncate(n);
    Ok((buf, from))
}

// ---------------------------------------------------------------------------------
// (a) DNS with dnsmasq and dig
// ---------------------------------------------------------------------------------

/// dnsmasq in the server namespace answering `example.test` A and AAAA on the A
/// addresses, port 53. Returned child is killed on drop.
fn start_dnsmasq(rig: &Rig) -> NsChild {
    dnsmasq(
        &rig.lab.server,
        &[
            "--address=/example.test/192.0.2.7",
            "--address=/example.test/2001:db8::7",
        ],
    )
}

fn dns(test: &str, family: Family) {
    let Some(mut rig) = Rig::start(test, RigConfig::new()) else {
        return;
    };
    let mut dnsmasq = start_dnsmasq(&rig);
    let before = rig.engine_mut().counters();
    let server = family.server_a().to_string();
    const ROUNDS: usize = 3;
    for round in 0..ROUNDS {
        for (qtype, want) in [("A", "192.0.2.7"), ("AAAA", "2001:db8::7")] {
            let mut cmd = rig.lab.client.command("dig");
            cmd.args([
                &format!("@{server}"),
                "+time=2",
                "+tries=1",
                "+short",
                "example.test",
                qtype,
            ]);
            let out = run_with_timeout(cmd, Duration::from_secs(10)).unwrap();
            assert!(
                out.status.success() && out.stdout.trim() == want,
                "round {round}: dig @{server} example.test {qtype}: status {}, stdout {:?}, \
                 stderr {:?}; dnsmasq: {}",
                out.status,
                out.stdout,
                out.stderr,
                dnsmasq.stderr()
            );
        }
    }
    let queries = (ROUNDS * 2) as u64;
    let after = rig
        .engine_mut()
        .wait_counters(Duration::from_secs(3), |c| {
            c.get("udp_dgrams_s2c") >= before.get("udp_dgrams_s2c") + queries
        })
        .unwrap_or_else(|c| panic!("replies not counted: {c:?}"));
    assert!(
        after.get("udp_dgrams_c2s") >= before.get("udp_dgrams_c2s") + queries,
        "queries did not go through the engine: {after:?}"
    );
    assert!(dnsmasq.try_wait().is_none(), "dnsmasq exited");
}

#[test]
fn udp_dns_dig_v4() {
    dns("udp_dns_dig_v4", Family::V4);
}

#[test]
fn udp_dns_dig_v6() {
    dns("udp_dns_dig_v6", Family::V6);
}

// ---------------------------------------------------------------------------------
// (b) Many flows to two servers
// ---------------------------------------------------------------------------------

const CLIENTS: usize = 300;

fn many_flows(test: &str, family: Family) {
    let Some(mut rig) = Rig::start(test, RigConfig::new()) else {
        return;
    };
    let a = SocketAddr::new(family.server_a(), 7001);
    let b = SocketAddr::new(family.server_b(), 7002);
    let ea = UdpEcho::start(&rig.lab.server, a, true).unwrap();
    let eb = UdpEcho::start(&rig.lab.server, b, true).unwrap();
    let before = rig.engine_mut().counters();
    rig.lab
        .client
        .run(move || -> anyhow::Result<()> {
            let mut socks = Vec::new();
            for i in 0..CLIENTS {
                let s = udp_client(family, Duration::from_secs(3))?;
                let dst = if i % 2 == 0 { a } else { b };
                socks.push((i, dst, s));
            }
            let ports: BTreeSet<u16> = socks
                .iter()
                .map(|(_, _, s)| s.local_addr().map(|a| a.port()))
                .collect::<Result<_, _>>()?;
            ensure!(ports.len() == CLIENTS, "source ports not distinct");
            // All 300 flows live at once (the idle timeout is 30 s). Sent in waves of 50
            // so that a burst never overflows a socket buffer: UDP may drop then, and
            // this test is about addresses, not loss.
            for wave in socks.chunks(50) {
                for (i, dst, s) in wave {
                    s.send_to(format!("client {i}").as_bytes(), dst)?;
                }
                for (i, dst, s) in wave {
                    let mut buf = [0u8; 256];
                    let (n, from) = s
                        .recv_from(&mut buf)
                        .with_context(|| format!("client {i}: no reply from {dst}"))?;
                    ensure!(
                        from == *dst,
                        "client {i}: reply from {from}, but it sent to {dst}"
                    );
                    let mut want = udp_tag(*dst);
                    want.extend_from_slice(format!("client {i}").as_bytes());
                    ensure!(
                        buf[..n] == want[..],
                        "client {i}: got {:?}, want {:?}",
                        String::from_utf8_lossy(&buf[..n]),
                        String::from_utf8_lossy(&want)
                    );
                }
            }
            Ok(())
        })
        .unwrap();
    // The fd design (docs/architecture.md): one upstream socket per flow, and reply
    // sockets shared per (core, destination): 2 destinations on 2 cores add 2 to 4,
    // not one per flow.
    let e = rig.engine_mut();
    let extra = e.fds() - e.baseline_fds;
    assert!(
        (CLIENTS + 2..=CLIENTS + 4).contains(&extra),
        "{CLIENTS} live flows to 2 destinations hold {extra} fds beyond the baseline"
    );
    for (echo, addr) in [(&ea, a), (&eb, b)] {
        let peers = echo.peers();
        assert_eq!(peers.len(), CLIENTS / 2, "server {addr}");
        assert!(
            peers.iter().all(|p| p.ip() == family.router_s()),
            "server {addr} saw peers other than the engine: {peers:?}"
        );
        // One upstream socket per client flow: distinct source ports.
        let distinct: BTreeSet<_> = peers.iter().collect();
        assert_eq!(distinct.len(), CLIENTS / 2, "server {addr}: flows merged");
    }
    let after = rig.engine_mut().counters();
    let n = CLIENTS as u64;
    assert_eq!(
        after.get("udp_dgrams_c2s") - before.get("udp_dgrams_c2s"),
        n,
        "{after:?}"
    );
    assert_eq!(
        after.get("udp_dgrams_s2c") - before.get("udp_dgrams_s2c"),
        n,
        "{after:?}"
    );
    assert_eq!(after.get("udp_flows_created"), n, "{after:?}");
    // All of them were alive together (the single-exchange timeout is 5 s).
    assert_eq!(after.get("udp_flows_active"), n, "{after:?}");
}

#[test]
fn udp_many_flows_two_servers_v4() {
    many_flows("udp_many_flows_two_servers_v4", Family::V4);
}

#[test]
fn udp_many_flows_two_servers_v6() {
    many_flows("udp_many_flows_two_servers_v6", Family::V6);
}

// ---------------------------------------------------------------------------------
// (c) Datagram sizes
// ---------------------------------------------------------------------------------

/// Empty datagrams included: protocols use them as keepalives and acks.
const SIZES: [usize; 5] = [0, 1, 1400, 9000, 65000];

fn sizes(test: &str, family: Family) {
    let Some(mut rig) = Rig::start(test, RigConfig::new()) else {
        return;
    };
    let dst = SocketAddr::new(family.server_a(), 7003);
    let echo = UdpEcho::start(&rig.lab.server, dst, false).unwrap();
    let results = rig
        .lab
        .client
        .run(move || -> anyhow::Result<Vec<String>> {
            let s = udp_client(family, Duration::from_secs(3))?;
            let mut bad = Vec::new();
            for (k, &len) in SIZES.iter().enumerate() {
                let payload = Pattern::bytes(100 + k as u64, len);
                match exchange(&s, dst, &payload) {
                    Ok((got, from)) => {
                        if from != dst {
                            bad.push(format!("{len} B: reply from {from}"));
                        }
                        if got.len() != len || fnv(&got) != fnv(&payload) {
                            bad.push(format!("{len} B: got {} B, hash differs", got.len()));
                        }
                    }
                    Err(e) => bad.push(format!("{len} B: {e:#}")),
                }
            }
            Ok(bad)
        })
        .unwrap();
    let c = rig.engine_mut().counters();
    assert_eq!(
        results,
        Vec::<String>::new(),
        "server received {} datagrams; engine: {c:?}",
        echo.received()
    );
    let total: u64 = SIZES.iter().map(|&n| n as u64).sum();
    assert_eq!(c.get("udp_dgrams_c2s"), SIZES.len() as u64, "{c:?}");
    assert_eq!(c.get("udp_dgrams_s2c"), SIZES.len() as u64, "{c:?}");
    assert_eq!(c.get("udp_bytes_c2s"), total, "{c:?}");
    assert_eq!(c.get("udp_bytes_s2c"), total, "{c:?}");
}

#[test]
fn udp_datagram_sizes_v4() {
    sizes("udp_datagram_sizes_v4", Family::V4);
}

#[test]
fn udp_datagram_sizes_v6() {
    sizes("udp_datagram_sizes_v6", Family::V6);
}

// ---------------------------------------------------------------------------------
// (d) Expiry
// ---------------------------------------------------------------------------------

fn expiry(test: &str, family: Family) {
    let cfg = RigConfig::new().engine_args(&[
        "--udp-idle-timeout-s",
        "2",
        "--udp-single-exchange-timeout-s",
        "1",
    ]);
    let Some(mut rig) = Rig::start(test, cfg) else {
        return;
    };
    let dst = SocketAddr::new(family.server_a(), 7004);
    let _echo = UdpEcho::start(&rig.lab.server, dst, true).unwrap();
    const SINGLE: usize = 10;
    const MULTI: usize = 5;
    // Keep the client sockets open: expiry must come from the engine's timers, not
    // from anything the client does.
    let socks = rig
        .lab
        .client
        .run(move || -> anyhow::Result<Vec<UdpSocket>> {
            let mut socks = Vec::new();
            for i in 0..SINGLE + MULTI {
                let s = udp_client(family, Duration::from_secs(3))?;
                let rounds = if i < SINGLE { 1 } else { 3 };
                for r in 0..rounds {
                    let msg = format!("{i}/{r}");
                    let (got, from) = exchange(&s, dst, msg.as_bytes())?;
                    ensure!(from == dst && got.ends_with(msg.as_bytes()), "{i}/{r}");
                }
                socks.push(s);
            }
            Ok(socks)
        })
        .unwrap();
    let e = rig.engine_mut();
    let t = Instant::now();
    let live = e.counters();
    let n = (SINGLE + MULTI) as u64;
    assert_eq!(live.get("udp_flows_active"), n, "{live:?}");
    assert!(e.fds() > e.baseline_fds, "flows hold no sockets?");
    let done = e
        .wait_counters(Duration::from_secs(10), |c| {
            c.get("udp_flows_active") == 0
                && c.get("udp_end_idle") + c.get("udp_end_single_exchange") >= n
        })
        .unwrap_or_else(|c| panic!("flows did not expire: {c:?}"));
    let took = t.elapsed();
    assert_eq!(
        done.get("udp_end_single_exchange"),
        SINGLE as u64,
        "{done:?}"
    );
    assert_eq!(done.get("udp_end_idle"), MULTI as u64, "{done:?}");
    assert_eq!(done.get("udp_end_evicted"), 0, "{done:?}");
    assert!(
        took <= Duration::from_secs(5),
        "expiry took {took:?} with an idle timeout of 2 s"
    );
    if let Err(last) = e.wait_fds_baseline(Duration::from_secs(5)) {
        panic!(
            "engine fds did not return to the baseline {} (now {last})",
            e.baseline_fds
        );
    }
    drop(socks);
}

#[test]
fn udp_flow_expiry_v4() {
    expiry("udp_flow_expiry_v4", Family::V4);
}

#[test]
fn udp_flow_expiry_v6() {
    expiry("udp_flow_expiry_v6", Family::V6);
}

// ---------------------------------------------------------------------------------
// (e) Eviction
// ---------------------------------------------------------------------------------

const MAX_FLOWS: usize = 20;
const EVICT_CLIENTS: usize = 100;

fn eviction(test: &str, family: Family) {
    let cfg = RigConfig::new()
        .cores("0")
        .engine_args(&["--udp-max-flows", &MAX_FLOWS.to_string()]);
    let Some(mut rig) = Rig::start(test, cfg) else {
        return;
    };
    let dst = SocketAddr::new(family.server_a(), 7005);
    let _echo = UdpEcho::start(&rig.lab.server, dst, true).unwrap();
    let pid = rig.engine().pid();
    let bound = rig.engine().baseline_fds + 2 * MAX_FLOWS + 4;
    let mut peak = 0;
    let mut socks = Vec::new();
    for i in 0..EVICT_CLIENTS {
        // Each client is a new flow (new source port); sockets stay open.
        let s = rig
            .lab
            .client
            .run(move || -> anyhow::Result<UdpSocket> {
                let s = udp_client(family, Duration::from_secs(3))?;
                let msg = format!("flow {i}");
                let (got, from) = exchange(&s, dst, msg.as_bytes())?;
                ensure!(
                    from == dst && got.ends_with(msg.as_bytes()),
                    "flow {i}: {got:?} from {from}"
                );
                Ok(s)
            })
            .unwrap();
        socks.push(s);
        peak = peak.max(fd_count(pid).unwrap());
    }
    let e = rig.engine_mut();
    let c = e.counters();
    assert!(
        c.get("udp_end_evicted") >= (EVICT_CLIENTS - MAX_FLOWS) as u64,
        "{c:?}"
    );
    assert!(c.get("udp_flows_active") <= MAX_FLOWS as u64, "{c:?}");
    assert!(
        peak < bound,
        "engine fds peaked at {peak}, bound {bound} (baseline {} + 2 x {MAX_FLOWS} + 4)",
        e.baseline_fds
    );
    assert!(e.is_running());
}

#[test]
fn udp_flow_eviction_v4() {
    eviction("udp_flow_eviction_v4", Family::V4);
}

#[test]
fn udp_flow_eviction_v6() {
    eviction("udp_flow_eviction_v6", Family::V6);
}

// ---------------------------------------------------------------------------------
// Bypass: excluded ports and traffic for the router itself
// ---------------------------------------------------------------------------------

/// One tagged exchange from a fresh client socket; returns the reply's source.
fn udp_ping(rig: &Rig, family: Family, dst: SocketAddr) -> SocketAddr {
    rig.lab
        .client
        .run(move || -> anyhow::Result<SocketAddr> {
            let s = udp_client(family, Duration::from_secs(3))?;
            let (got, from) = exchange(&s, dst, b"ping")?;
            let mut want = udp_tag(dst);
            want.extend_from_slice(b"ping");
            ensure!(got == want, "{dst}: {:?}", String::from_utf8_lossy(&got));
            Ok(from)
        })
        .unwrap()
}

fn udp_bypass(test: &str, family: Family) {
    let cfg = RigConfig::new().setup_args(&["--udp-ports", "5000-5100"]);
    let Some(mut rig) = Rig::start(test, cfg) else {
        return;
    };
    let excluded = SocketAddr::new(family.server_a(), 6000);
    let included = SocketAddr::new(family.server_a(), 5053);
    let local = SocketAddr::new(family.router_c(), 5054);
    let e_ex = UdpEcho::start(&rig.lab.server, excluded, true).unwrap();
    let e_in = UdpEcho::start(&rig.lab.server, included, true).unwrap();
    let e_local = UdpEcho::start(&rig.lab.router, local, true).unwrap();

    let dgrams = |rig: &mut Rig| rig.engine_mut().counters().get("udp_dgrams_c2s");
    let mut seen: BTreeMap<&str, Vec<SocketAddr>> = BTreeMap::new();
    let c0 = dgrams(&mut rig);
    assert_eq!(udp_ping(&rig, family, excluded), excluded);
    assert_eq!(
        udp_ping(&rig, family, local),
        local,
        "router-local UDP answered"
    );
    let c1 = dgrams(&mut rig);
    assert_eq!(c1, c0, "excluded or router-local UDP reached the engine");
    seen.insert("excluded", e_ex.peers());
    seen.insert("local", e_local.peers());
    for (what, peers) in &seen {
        assert_eq!(peers.len(), 1, "{what}");
        assert_eq!(
            peers[0].ip(),
            family.client(),
            "{what}: not straight from the client"
        );
    }
    // Control: a port in the list goes through the engine.
    assert_eq!(udp_ping(&rig, family, included), included);
    assert_eq!(dgrams(&mut rig), c1 + 1, "port 5053 bypassed the engine");
    assert_eq!(e_in.peers()[0].ip(), family.router_s());
}

#[test]
fn udp_excluded_and_local_bypass_v4() {
    udp_bypass("udp_excluded_and_local_bypass_v4", Family::V4);
}

#[test]
fn udp_excluded_and_local_bypass_v6() {
    udp_bypass("udp_excluded_and_local_bypass_v6", Family::V6);
}

// ---------------------------------------------------------------------------------
// (f) Stopping under steady UDP
// ---------------------------------------------------------------------------------

/// SIGTERM while DNS-like traffic keeps arriving (50 long-lived client sockets and
/// new source ports all the time, as resolvers do): the engine must end every flow
/// by the drain deadline and exit within `--drain-timeout-s` + 1 s. Datagrams that
/// arrived while it stopped used to open flows that nothing armed, which then kept
/// the engine alive until the 30 s idle expiry.
fn stop_under_load(test: &str, family: Family) {
    const DRAIN_S: u64 = 2;
    let cfg = RigConfig::new().engine_args(&["--drain-timeout-s", &DRAIN_S.to_string()]);
    let Some(mut rig) = Rig::start(test, cfg) else {
        return;
    };
    let dst = SocketAddr::new(family.server_a(), 5353);
    let _echo = UdpEcho::start(&rig.lab.server, dst, false).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let load = rig.lab.client.spawn(move || -> anyhow::Result<(u64, u64)> {
        use std::sync::atomic::Ordering::Relaxed;
        let mut steady = Vec::new();
        for _ in 0..50 {
            let s = udp_client(family, Duration::from_millis(1))?;
            s.set_nonblocking(true)?;
            steady.push(s);
        }
        let (mut sent, mut answered) = (0u64, 0u64);
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut buf = [0u8; 64];
        let mut i = 0usize;
        while !stop2.load(Relaxed) && Instant::now() < deadline {
            // About 20,000 datagrams a second in bursts, so that some are always in
            // the engine's receive queue when the stop arrives.
            for s in &steady {
                if s.send_to(b"query", dst).is_ok() {
                    sent += 1;
                }
            }
            for _ in 0..4 {
                // A fresh source port: a new flow for the engine.
                let f = udp_client(family, Duration::from_millis(1))?;
                if f.send_to(b"fresh", dst).is_ok() {
                    sent += 1;
                }
            }
            for s in &steady {
                while s.recv_from(&mut buf).is_ok() {
                    answered += 1;
                }
            }
            i += 1;
            if i & 3 == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        Ok((sent, answered))
    });
    let e = rig.engine_mut();
    e.wait_counters(Duration::from_secs(5), |c| {
        c.get("udp_flows_created") >= 200
    })
    .unwrap_or_else(|c| panic!("load did not reach the engine: {c:?}"));
    let t = Instant::now();
    let (status, stdout, stderr) = e.stop(Duration::from_secs(DRAIN_S + 10));
    let took = t.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (sent, answered) = load.join().expect("load thread").unwrap();
    let status = status.expect("engine did not exit");
    assert!(
        status.success(),
        "exit {status}; stderr: {}",
        tail(&stderr, 2000)
    );
    assert!(
        took <= Duration::from_secs(DRAIN_S + 1),
        "exit took {took:?} with --drain-timeout-s {DRAIN_S}; stderr: {}",
        tail(&stderr, 2000)
    );
    let at_exit = stdout.split("summary:").nth(1).expect("a summary line");
    let summary = parse_counter_table(at_exit).expect("exit summary");
    assert_eq!(summary.get("udp_flows_active"), 0, "{summary:?}");
    assert!(
        answered > 0 && sent > answered / 2,
        "sent {sent}, answered {answered}"
    );
}

#[test]
fn udp_stop_under_steady_load_v4() {
    stop_under_load("udp_stop_under_steady_load_v4", Family::V4);
}

#[test]
fn udp_stop_under_steady_load_v6() {
    stop_under_load("udp_stop_under_steady_load_v6", Family::V6);
}

// ---------------------------------------------------------------------------------
// (g) Full-cone UDP
// ---------------------------------------------------------------------------------

/// A STUN-like exchange: the client asks server A and server C (two addresses),
/// which see the same mapping (endpoint-independent mapping); then server B, which
/// the client never talked to, sends to that mapping. With `--udp-nat full-cone`
/// the client receives it, sourced from B's address and port; with the default
/// `symmetric` the same datagram does not reach the client.
fn full_cone(test: &str, family: Family, nat: &str) {
    let cfg = RigConfig::new().engine_args(&["--udp-nat", nat]);
    let Some(mut rig) = Rig::start(test, cfg) else {
        return;
    };
    let a = SocketAddr::new(family.server_a(), 3478);
    let c = SocketAddr::new(family.server_b(), 3479);
    let echo_a = UdpEcho::start(&rig.lab.server, a, false).unwrap();
    let echo_c = UdpEcho::start(&rig.lab.server, c, false).unwrap();
    let client = rig
        .lab
        .client
        .run(move || -> anyhow::Result<UdpSocket> {
            let s = udp_client(family, Duration::from_secs(2))?;
            for dst in [a, c] {
                let (got, from) = exchange(&s, dst, b"binding request")?;
                ensure!(from == dst && got == b"binding request", "{dst}: {from}");
            }
            Ok(s)
        })
        .unwrap();
    let mapped_a = echo_a.peers()[0];
    let mapped_c = echo_c.peers()[0];
    assert_eq!(
        mapped_a.ip(),
        family.router_s(),
        "the mapping is the router's"
    );
    if nat == "full-cone" {
        assert_eq!(mapped_a, mapped_c, "one mapping for every destination");
    } else {
        assert_ne!(
            mapped_a.port(),
            mapped_c.port(),
            "symmetric: one per destination"
        );
    }
    // Server B, never contacted by the client, sends to the mapping A saw.
    let b = SocketAddr::new(family.server_b(), 9999);
    rig.lab
        .server
        .run(move || -> anyhow::Result<()> {
            let s = std::net::UdpSocket::bind(b)?;
            s.send_to(b"unsolicited from B", mapped_a)?;
            Ok(())
        })
        .unwrap();
    client
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let mut buf = [0u8; 64];
    let got = client.recv_from(&mut buf);
    let c_after = rig.engine_mut().counters();
    if nat == "full-cone" {
        let (n, from) =
            got.unwrap_or_else(|e| panic!("B's datagram did not arrive: {e}; {c_after:?}"));
        assert_eq!(&buf[..n], b"unsolicited from B");
        assert_eq!(from, b, "sourced from B's address and port");
        assert_eq!(
            c_after.get("udp_flows_created"),
            1,
            "one flow per client source"
        );
    } else {
        assert!(got.is_err(), "symmetric let B through: {got:?}");
        assert_eq!(c_after.get("udp_flows_created"), 2, "{c_after:?}");
    }
}

#[test]
fn udp_full_cone_stun_v4() {
    full_cone("udp_full_cone_stun_v4", Family::V4, "full-cone");
}

#[test]
fn udp_full_cone_stun_v6() {
    full_cone("udp_full_cone_stun_v6", Family::V6, "full-cone");
}

#[test]
fn udp_symmetric_filters_unsolicited_v4() {
    full_cone(
        "udp_symmetric_filters_unsolicited_v4",
        Family::V4,
        "symmetric",
    );
}

// ---------------------------------------------------------------------------------
// (h) Bursts: gathered into GSO sends, and what the receivers see
// ---------------------------------------------------------------------------------

/// Senders in the burst test, each its own flow to the same server.
const BURST_FLOWS: usize = 3;
/// Bursts per test, and datagrams per flow in each.
const BURSTS: usize = 30;
const BURST_LEN: usize = 40;

/// The `k`th datagram of a burst: mostly runs of one size, broken by shorter ones
/// (which end a GSO run), empty ones and ones too large to gather (sent on their
/// own after the run), and in the last bursts the largest size a run takes.
fn burst_size(burst: usize, k: usize, family: Family) -> usize {
    let largest = if family == Family::V6 { 1452 } else { 1472 };
    match (burst, k) {
        (b, _) if b >= BURSTS - 3 => largest,
        (_, k) if k % 29 == 28 => 0,
        (_, k) if k % 17 == 16 => 3000,
        (_, k) if k % 11 == 10 => 37,
        (b, _) => 100 + 50 * (b % 4),
    }
}

/// Interleaved bursts from several flows: every datagram reaches the server and
/// comes back intact, in order, from the address the client sent to, and the engine
/// sent the runs of equal datagrams with GSO (none with `RINGRELAY_DISABLE=udp-gso`,
/// where every datagram goes on its own). Order is checked strictly: nothing on
/// these veth links reorders, so any reordering is the engine's.
fn bursts(test: &str, family: Family, mtu: Option<u32>, engine_args: &[&str]) {
    let Some(mut rig) = Rig::start(test, RigConfig::new().engine_args(engine_args)) else {
        return;
    };
    if let Some(i) = engine_args.iter().position(|a| *a == "--batch-wait-us") {
        batch_wait_applied(test, &rig.engine().ready_line, engine_args[i + 1]);
    }
    if let Some(mtu) = mtu {
        // A path whose MTU is below what the engine gathers up to: the kernel refuses
        // those GSO sends, and the engine resends them one by one (fragmented).
        let mtu = mtu.to_string();
        rig.lab
            .router
            .ip(&["link", "set", "dev", "veth-s", "mtu", &mtu])
            .unwrap();
        rig.lab
            .server
            .ip(&["link", "set", "dev", "eth0", "mtu", &mtu])
            .unwrap();
    }
    let dst = SocketAddr::new(family.server_a(), 7009);
    let echo = UdpEcho::start(&rig.lab.server, dst, false).unwrap();
    let before = rig.engine_mut().counters();
    let sent = rig.lab.client.run(move || -> anyhow::Result<u64> {
        let mut socks = Vec::new();
        for _ in 0..BURST_FLOWS {
            let s = udp_client(family, Duration::from_secs(3))?;
            socket2::SockRef::from(&s).set_recv_buffer_size(4 << 20)?;
            s.connect(dst)?;
            socks.push(s);
        }
        let mut sent = 0u64;
        let mut buf = vec![0u8; 70_000];
        for burst in 0..BURSTS {
            let mut want: Vec<Vec<Vec<u8>>> = vec![Vec::new(); BURST_FLOWS];
            for k in 0..BURST_LEN {
                for (f, s) in socks.iter().enumerate() {
                    let seed = (burst * 1000 + k * 10 + f) as u64;
                    let p = Pattern::bytes(seed, burst_size(burst, k, family));
                    s.send(&p).with_context(|| format!("burst {burst} #{k}"))?;
                    want[f].push(p);
                    sent += 1;
                }
            }
            for (f, s) in socks.iter().enumerate() {
                for (k, w) in want[f].iter().enumerate() {
                    let n = s.recv(&mut buf).with_context(|| {
                        format!("flow {f} burst {burst}: datagram #{k} of {BURST_LEN} missing")
                    })?;
                    ensure!(
                        n == w.len() && fnv(&buf[..n]) == fnv(w),
                        "flow {f} burst {burst}: datagram #{k} is {n} bytes, want {} \
                             (lost, reordered or damaged)",
                        w.len()
                    );
                }
            }
        }
        Ok(sent)
    });
    let c = rig.engine_mut().counters();
    let sent = sent.unwrap_or_else(|e| panic!("{e:#}; engine: {c:?}"));
    let d = |name: &str| c.get(name) - before.get(name);
    assert_eq!(echo.received(), sent, "server received; engine: {c:?}");
    assert_eq!(d("udp_dgrams_c2s"), sent, "{c:?}");
    assert_eq!(d("udp_dgrams_s2c"), sent, "{c:?}");
    assert_eq!(
        d("udp_drop_send_upstream") + d("udp_drop_send_client"),
        0,
        "{c:?}"
    );
    let disabled = std::env::var("RINGRELAY_DISABLE").is_ok_and(|v| v.contains("udp-gso"));
    if disabled {
        assert_eq!(d("udp_gso_sends"), 0, "{c:?}");
    } else {
        assert!(d("udp_gso_sends") > 0, "no burst was gathered: {c:?}");
        match mtu {
            None => assert_eq!(d("udp_gso_fallbacks"), 0, "{c:?}"),
            // Each refused flow falls back once, and only toward the small MTU.
            Some(_) => assert!(
                (1..=BURST_FLOWS as u64).contains(&d("udp_gso_fallbacks")),
                "{c:?}"
            ),
        }
    }
}

#[test]
fn udp_bursts_leave_intact_and_in_order_v4() {
    bursts(
        "udp_bursts_leave_intact_and_in_order_v4",
        Family::V4,
        None,
        &[],
    );
}

/// Workers that sleep for fuller batches (`--batch-wait-us`): larger runs, the same
/// datagrams in the same order.
#[test]
fn udp_bursts_with_batch_wait_v4() {
    bursts(
        "udp_bursts_with_batch_wait_v4",
        Family::V4,
        None,
        &["--batch-wait-us", "200"],
    );
}

#[test]
fn udp_bursts_leave_intact_and_in_order_v6() {
    bursts(
        "udp_bursts_leave_intact_and_in_order_v6",
        Family::V6,
        None,
        &[],
    );
}

#[test]
fn udp_bursts_over_a_small_mtu_fall_back_v4() {
    bursts(
        "udp_bursts_over_a_small_mtu_fall_back_v4",
        Family::V4,
        Some(1280),
        &[],
    );
}
