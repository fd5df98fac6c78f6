//! The return path of `setup apply --source client-ip`, in the lab and without the
//! engine: transparent sockets in the router stand in for the engine's upstream
//! sockets (IP_TRANSPARENT, SO_MARK 0x2, bound to the CLIENT's address and a fresh
//! port) and talk to servers in the server namespace. Their handshakes, replies and
//! ICMP errors must come back to them, for TCP and UDP, IPv4 and IPv6, with both
//! backends; and must not once the return path is gone (re-applied with `--source
//! router`, or torn down): the replies are addressed to the client, so the router
//! forwards them there (the first SYN-ACK, which the client resets) or drops them.
//!
//! The rule must also leave alone what is not a reply to such a socket: the client
//! side, the engine's listeners, and (nft) datagrams between other interfaces.
//!
//! Needs root; without it each test prints `SKIPPED: <name>: needs root ...`.
#![forbid(unsafe_code)]

use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, UdpSocket};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use ringrelay_tests::*;
use socket2::{Domain, Protocol, Socket, Type};

/// The engine's default upstream SO_MARK: the stand-ins carry it like the engine's
/// sockets do, so the rules' bypass-mark exclusion is in play as in production.
const BYPASS_MARK: u32 = 0x2;
/// How long a stand-in waits for an answer that should come.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(3);
/// How long it waits for one that should not (the SYN is retransmitted after 1 s).
const NO_ANSWER_TIMEOUT: Duration = Duration::from_millis(1500);

/// A socket like the engine's upstream sockets with `--source client-ip`: transparent,
/// marked, bound to `client` with port 0 (the kernel picks a fresh one).
fn upstream_socket(ty: Type, client: IpAddr) -> io::Result<Socket> {
    let addr = SocketAddr::new(client, 0);
    let proto = if ty == Type::STREAM {
        Protocol::TCP
    } else {
        Protocol::UDP
    };
    let s = Socket::new(Domain::for_address(addr), ty, Some(proto))?;
    if client.is_ipv6() {
        s.set_ip_transparent_v6(true)?;
    } else {
        s.set_ip_transparent_v4(true)?;
    }
    s.set_mark(BYPASS_MARK)?;
    s.bind(&addr.into())?;
    Ok(s)
}

/// From the router: a TCP connection from the client's address to `server`; returns
/// what the server sent (its view of the peer) or the error.
fn tcp_from_client(
    router: &Netns,
    client: IpAddr,
    server: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<String> {
    router.run(move || -> anyhow::Result<String> {
        let s = upstream_socket(Type::STREAM, client)?;
        s.connect_timeout(&server.into(), timeout)
            .with_context(|| format!("connect {client} -> {server}"))?;
        s.set_read_timeout(Some(timeout))?;
        let mut stream: std::net::TcpStream = s.into();
        stream.write_all(b"hi")?;
        stream.shutdown(Shutdown::Write)?;
        let mut got = String::new();
        stream.read_to_string(&mut got)?;
        Ok(got)
    })
}

/// From the router: one datagram from the client's address to `server`; returns the
/// answer or the error (an ICMP error shows as `ConnectionRefused`).
fn udp_from_client(
    router: &Netns,
    client: IpAddr,
    server: SocketAddr,
    timeout: Duration,
) -> io::Result<Vec<u8>> {
    router.run(move || -> io::Result<Vec<u8>> {
        let s = upstream_socket(Type::DGRAM, client)?;
        s.connect(&server.into())?;
        let s: UdpSocket = s.into();
        s.set_read_timeout(Some(timeout))?;
        s.send(b"ping")?;
        let mut buf = [0u8; 1500];
        let n = s.recv(&mut buf)?;
        Ok(buf[..n].to_vec())
    })
}

/// A TCP server in `ns` that reads to the end, then answers with the peer address
/// it saw.
fn peer_reporting_server(ns: &Netns, addr: SocketAddr) -> TcpServer {
    TcpServer::start(ns, addr, |mut s, info| {
        let mut v = Vec::new();
        s.read_to_end(&mut v)?;
        s.write_all(info.peer.ip().to_string().as_bytes())?;
        Ok(())
    })
    .unwrap()
}

/// Everything the return path carries, for one family: the TCP handshake and data,
/// a UDP answer, and an ICMP port unreachable (how path MTU errors travel too).
fn assert_return_path_works(rig: &Rig, family: Family, port: u16) {
    let router = &rig.lab.router;
    let client = family.client();
    let tcp = SocketAddr::new(family.server_a(), port);
    let _srv = peer_reporting_server(&rig.lab.server, tcp);
    let seen = tcp_from_client(router, client, tcp, ANSWER_TIMEOUT)
        .unwrap_or_else(|e| panic!("{family:?} TCP through the return path: {e:#}"));
    assert_eq!(
        seen,
        client.to_string(),
        "{family:?}: the server saw the client"
    );

    let udp = SocketAddr::new(family.server_a(), port);
    let echo = UdpEcho::start(&rig.lab.server, udp, true).unwrap();
    let answer = udp_from_client(router, client, udp, ANSWER_TIMEOUT)
        .unwrap_or_else(|e| panic!("{family:?} UDP through the return path: {e}"));
    assert_eq!(answer, [udp_tag(udp), b"ping".to_vec()].concat());
    assert_eq!(echo.peers()[0].ip(), client, "{family:?}");

    // Nothing listens on port + 1: the server's ICMP error quotes the datagram and
    // reaches the socket that sent it.
    let closed = SocketAddr::new(family.server_a(), port + 1);
    let err = udp_from_client(router, client, closed, ANSWER_TIMEOUT)
        .expect_err("a datagram to a closed port got an answer");
    assert_eq!(
        err.kind(),
        io::ErrorKind::ConnectionRefused,
        "{family:?}: the ICMP port unreachable did not reach the upstream socket: {err}"
    );
}

/// Without the return path, nothing comes back to the stand-ins.
fn assert_return_path_absent(rig: &Rig, family: Family, port: u16, when: &str) {
    let router = &rig.lab.router;
    let client = family.client();
    let tcp = SocketAddr::new(family.server_a(), port);
    let _srv = peer_reporting_server(&rig.lab.server, tcp);
    if let Ok(got) = tcp_from_client(router, client, tcp, NO_ANSWER_TIMEOUT) {
        panic!("{family:?} TCP {when}: got {got:?} without a return path");
    }
    let udp = SocketAddr::new(family.server_a(), port);
    let echo = UdpEcho::start(&rig.lab.server, udp, true).unwrap();
    let res = udp_from_client(router, client, udp, NO_ANSWER_TIMEOUT);
    assert!(
        matches!(&res, Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut),
        "{family:?} UDP {when}: {res:?}"
    );
    // The datagram did go out from the client's address: only the way back is missing.
    assert_eq!(echo.peers().first().map(|p| p.ip()), Some(client));
}

fn return_path(test: &str, backend: Backend) {
    let rig_config = RigConfig::new()
        .backend(backend)
        .without_engine()
        .setup_args(&["--source", "client-ip", "--in-iface", "veth-c"]);
    let Some(rig) = Rig::start(test, rig_config) else {
        return;
    };
    let b = backend.name();
    for (i, family) in [Family::V4, Family::V6].into_iter().enumerate() {
        assert_return_path_works(&rig, family, 6000 + 10 * i as u16);
    }
    // `--source router` replaces the rules without it.
    rig.setup(&["apply", "--backend", b, "--in-iface", "veth-c"])
        .unwrap()
        .ok("setup apply --source router")
        .unwrap();
    for (i, family) in [Family::V4, Family::V6].into_iter().enumerate() {
        assert_return_path_absent(&rig, family, 6100 + 10 * i as u16, "after --source router");
    }
    // Back, then torn down.
    rig.setup(&[
        "apply",
        "--backend",
        b,
        "--source",
        "client",
        "--in-iface",
        "veth-c",
    ])
    .unwrap()
    .ok("setup apply --source client")
    .unwrap();
    for (i, family) in [Family::V4, Family::V6].into_iter().enumerate() {
        assert_return_path_works(&rig, family, 6200 + 10 * i as u16);
    }
    rig.setup(&["teardown"])
        .unwrap()
        .ok("setup teardown")
        .unwrap();
    for (i, family) in [Family::V4, Family::V6].into_iter().enumerate() {
        assert_return_path_absent(&rig, family, 6300 + 10 * i as u16, "after teardown");
    }
}

#[test]
fn return_path_delivers_replies_to_client_address_sockets_nft() {
    return_path(
        "return_path_delivers_replies_to_client_address_sockets_nft",
        Backend::Nft,
    );
}

#[test]
fn return_path_delivers_replies_to_client_address_sockets_iptables() {
    return_path(
        "return_path_delivers_replies_to_client_address_sockets_iptables",
        Backend::Iptables,
    );
}

/// Sockets the engine has besides its upstream ones, standing in the router: its
/// transparent listeners on the wildcard address (TCP and UDP, port 15001) and a UDP
/// reply socket bound to an original destination (transparent, unconnected).
struct EngineSideSockets {
    _sockets: Vec<Socket>,
}

impl EngineSideSockets {
    fn open(router: &Netns, family: Family, reply_to: SocketAddr) -> EngineSideSockets {
        let sockets = router.run(move || -> io::Result<Vec<Socket>> {
            let mut v = Vec::new();
            let any = SocketAddr::new(family.unspecified(), 15001);
            for (ty, proto, addr) in [
                (Type::STREAM, Protocol::TCP, any),
                (Type::DGRAM, Protocol::UDP, any),
                (Type::DGRAM, Protocol::UDP, reply_to),
            ] {
                let s = Socket::new(Domain::for_address(addr), ty, Some(proto))?;
                if addr.is_ipv6() {
                    s.set_only_v6(true)?;
                    s.set_ip_transparent_v6(true)?;
                } else {
                    s.set_ip_transparent_v4(true)?;
                }
                s.set_reuse_address(true)?;
                s.set_mark(BYPASS_MARK)?;
                s.bind(&addr.into())?;
                if ty == Type::STREAM {
                    s.listen(16)?;
                }
                v.push(s);
            }
            Ok(v)
        });
        EngineSideSockets {
            _sockets: sockets.expect("engine-side stand-in sockets"),
        }
    }
}

/// One UDP exchange from `from` to `to`; the tagged answer, or the error.
fn udp_exchange(from: &Netns, family: Family, to: SocketAddr) -> anyhow::Result<Vec<u8>> {
    from.run(move || -> anyhow::Result<Vec<u8>> {
        let s = udp_client(family, ANSWER_TIMEOUT)?;
        s.send_to(b"x", to)?;
        let mut buf = [0u8; 1500];
        let (n, _) = s.recv_from(&mut buf).context("no answer")?;
        Ok(buf[..n].to_vec())
    })
}

/// One TCP exchange from `from` to `to` against a [`peer_reporting_server`].
fn tcp_exchange(from: &Netns, to: SocketAddr) -> anyhow::Result<String> {
    from.run(move || -> anyhow::Result<String> {
        let mut s = tcp_connect(to)?;
        s.write_all(b"hi")?;
        s.shutdown(Shutdown::Write)?;
        let mut got = String::new();
        s.read_to_string(&mut got)?;
        Ok(got)
    })
}

/// What is not a reply to an upstream socket passes the return-path rule untouched,
/// with the engine's other sockets in place: a server-side connection and datagram to
/// port 15001 of a client (the rule does not match sockets bound to the wildcard
/// address, or the engine's listeners would take them), and a client's datagram to a
/// destination the engine holds a reply socket for (the rule never runs on the client
/// side, where a socket match would divert it to that socket).
fn leaves_other_traffic_alone(test: &str, backend: Backend) {
    let rig_config = RigConfig::new()
        .backend(backend)
        .without_engine()
        // Ports the checks below do not use: their traffic is simply forwarded.
        .setup_args(&[
            "--source",
            "client-ip",
            "--in-iface",
            "veth-c",
            "--tcp-ports",
            "80",
            "--udp-ports",
            "53",
        ]);
    let Some(rig) = Rig::start(test, rig_config) else {
        return;
    };
    for family in [Family::V4, Family::V6] {
        let dest = SocketAddr::new(family.server_a(), 5300);
        let _engine = EngineSideSockets::open(&rig.lab.router, family, dest);

        let on_client = SocketAddr::new(family.client(), 15001);
        let srv = peer_reporting_server(&rig.lab.client, on_client);
        let seen = tcp_exchange(&rig.lab.server, on_client)
            .unwrap_or_else(|e| panic!("{family:?}: server -> client:15001: {e:#}"));
        // From a server address (which one is the server's source selection).
        assert!(
            [family.server_a(), family.server_b()]
                .iter()
                .any(|a| a.to_string() == seen),
            "{family:?}: the client saw {seen}"
        );
        assert_eq!(srv.accepted().len(), 1, "{family:?}: reached the client");
        let echo = UdpEcho::start(&rig.lab.client, on_client, true).unwrap();
        let answer = udp_exchange(&rig.lab.server, family, on_client)
            .unwrap_or_else(|e| panic!("{family:?}: server -> client:15001 UDP: {e:#}"));
        assert_eq!(answer, [udp_tag(on_client), b"x".to_vec()].concat());
        drop(echo);

        let echo = UdpEcho::start(&rig.lab.server, dest, true).unwrap();
        let answer = udp_exchange(&rig.lab.client, family, dest)
            .unwrap_or_else(|e| panic!("{family:?}: client -> {dest} UDP: {e:#}"));
        assert_eq!(answer, [udp_tag(dest), b"x".to_vec()].concat());
        assert_eq!(echo.received(), 1, "{family:?}");
    }
}

#[test]
fn return_path_leaves_other_traffic_alone_nft() {
    leaves_other_traffic_alone("return_path_leaves_other_traffic_alone_nft", Backend::Nft);
}

#[test]
fn return_path_leaves_other_traffic_alone_iptables() {
    leaves_other_traffic_alone(
        "return_path_leaves_other_traffic_alone_iptables",
        Backend::Iptables,
    );
}

/// A fourth namespace behind the router's `veth-d` (198.18.2.0/24, fd00:18:2::/64): a
/// second non-client side, like a DMZ next to the WAN. Deleted on drop.
struct Dmz {
    ns: Netns,
}

impl Dmz {
    const ROUTER4: &'static str = "198.18.2.1";
    const HOST4: &'static str = "198.18.2.2";
    const ROUTER6: &'static str = "fd00:18:2::1";
    const HOST6: &'static str = "fd00:18:2::2";

    fn up(rig: &Rig) -> anyhow::Result<Dmz> {
        let name = format!("{}-dmz", rig.lab.prefix());
        let out = Command::new("ip").args(["netns", "add", &name]).output()?;
        if !out.status.success() {
            bail!(
                "ip netns add {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let dmz = Dmz {
            ns: Netns::from_name(name.clone()),
        };
        let r = &rig.lab.router;
        r.ip(&[
            "link", "add", "veth-d", "type", "veth", "peer", "name", "eth0", "netns", &name,
        ])?;
        r.sysctl("net.ipv4.conf.veth-d.rp_filter", "0")?;
        r.ip_batch(&format!(
            "link set veth-d up\naddr add {}/24 dev veth-d\naddr add {}/64 dev veth-d nodad\n",
            Self::ROUTER4,
            Self::ROUTER6
        ))?;
        dmz.ns.ip_batch(&format!(
            "link set lo up\nlink set eth0 up\naddr add {}/24 dev eth0\naddr add {}/64 dev eth0 nodad\nroute add default via {}\nroute add ::/0 via {}\n",
            Self::HOST4,
            Self::HOST6,
            Self::ROUTER4,
            Self::ROUTER6
        ))?;
        Ok(dmz)
    }

    fn host(&self, family: Family) -> IpAddr {
        match family {
            Family::V4 => Self::HOST4.parse().unwrap(),
            Family::V6 => Self::HOST6.parse().unwrap(),
        }
    }
}

impl Drop for Dmz {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", self.ns.name()])
            .output();
    }
}

/// nft: a datagram from the DMZ to a server the engine holds a reply socket for
/// (a client talks to that server over UDP at the same time) is forwarded to the
/// server, not taken by the reply socket: the rule requires the destination to be
/// routed to the client side (`fib daddr oifname`). Measured before that test was
/// added: the reply socket took it and the DMZ host got no answer. The iptables
/// backend cannot test the route and keeps that hole (docs/deployment.md).
#[test]
fn return_path_leaves_datagrams_between_other_interfaces_alone_nft() {
    let test = "return_path_leaves_datagrams_between_other_interfaces_alone_nft";
    let rig_config = RigConfig::new().without_engine().setup_args(&[
        "--source",
        "client-ip",
        "--in-iface",
        "veth-c",
    ]);
    let Some(rig) = Rig::start(test, rig_config) else {
        return;
    };
    let dmz = Dmz::up(&rig).unwrap();
    for family in [Family::V4, Family::V6] {
        let dest = SocketAddr::new(family.server_a(), 5400);
        let _engine = EngineSideSockets::open(&rig.lab.router, family, dest);
        let echo = UdpEcho::start(&rig.lab.server, dest, true).unwrap();
        let answer = udp_exchange(&dmz.ns, family, dest)
            .unwrap_or_else(|e| panic!("{family:?}: dmz -> {dest}: {e:#}"));
        assert_eq!(answer, [udp_tag(dest), b"x".to_vec()].concat());
        assert_eq!(
            echo.peers(),
            vec![SocketAddr::new(dmz.host(family), echo.peers()[0].port())]
        );
        // And the return path still works with the DMZ there.
        let port = 5410 + if family == Family::V4 { 0 } else { 10 };
        assert_return_path_works(&rig, family, port);
    }
    ensure_teardown(&rig).unwrap();
}

fn ensure_teardown(rig: &Rig) -> anyhow::Result<()> {
    let out = rig.setup(&["teardown"])?.ok("setup teardown")?;
    ensure!(
        out.stdout.contains("teardown complete"),
        "teardown said: {}",
        out.stdout
    );
    Ok(())
}

/// Whether the engine under test knows `--source` (older engines do not: the test
/// then prints SKIPPED instead of failing on an unknown flag).
fn engine_has_source_flag() -> bool {
    Command::new(engine_bin())
        .arg("--help")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("--source"))
        .unwrap_or(false)
}

/// The real engine with `--source client-ip` (and `client`) behind the real
/// `setup apply --source ...`: servers see the client's address (and, with
/// `client`, its port), and TCP and UDP are relayed both ways.
fn engine_end_to_end(test: &str, backend: Backend, source: &str) {
    if !engine_has_source_flag() {
        let _ = writeln!(
            io::stderr(),
            "SKIPPED: {test}: the engine under test has no --source (set RINGRELAY_ENGINE to one that has)"
        );
        return;
    }
    let rig_config = RigConfig::new()
        .backend(backend)
        .setup_args(&["--source", source, "--in-iface", "veth-c"])
        .engine_args(&["--source", source]);
    let Some(mut rig) = Rig::start(test, rig_config) else {
        return;
    };
    for (i, family) in [Family::V4, Family::V6].into_iter().enumerate() {
        let port = 6500 + 10 * i as u16;
        let tcp = SocketAddr::new(family.server_a(), port);
        let srv = TcpServer::start(&rig.lab.server, tcp, |mut s, info| {
            let mut v = Vec::new();
            s.read_to_end(&mut v)?;
            s.write_all(info.peer.to_string().as_bytes())?;
            Ok(())
        })
        .unwrap();
        let (local, seen) = rig
            .lab
            .client
            .run(move || -> anyhow::Result<(SocketAddr, String)> {
                let mut s = tcp_connect(tcp)?;
                let local = s.local_addr()?;
                s.write_all(b"hi")?;
                s.shutdown(Shutdown::Write)?;
                let mut got = String::new();
                s.read_to_string(&mut got)?;
                Ok((local, got))
            })
            .unwrap_or_else(|e| panic!("{family:?} TCP through the engine: {e:#}"));
        let seen: SocketAddr = seen.parse().unwrap();
        assert_eq!(
            seen.ip(),
            family.client(),
            "{family:?}: the server saw the client"
        );
        if source == "client" {
            assert_eq!(seen.port(), local.port(), "{family:?}: and its port");
        }
        assert_eq!(srv.accepted().len(), 1);

        let udp = SocketAddr::new(family.server_a(), port);
        let echo = UdpEcho::start(&rig.lab.server, udp, true).unwrap();
        let answer = udp_exchange(&rig.lab.client, family, udp)
            .unwrap_or_else(|e| panic!("{family:?} UDP through the engine: {e:#}"));
        assert_eq!(answer, [udp_tag(udp), b"x".to_vec()].concat());
        assert_eq!(echo.peers()[0].ip(), family.client(), "{family:?}");
    }
    let c = rig.engine_mut().counters();
    assert_eq!(
        c.get("accepted"),
        2,
        "both TCP connections went through the engine"
    );
}

#[test]
fn engine_source_client_ip_end_to_end_nft() {
    engine_end_to_end(
        "engine_source_client_ip_end_to_end_nft",
        Backend::Nft,
        "client-ip",
    );
}

#[test]
fn engine_source_client_ip_end_to_end_iptables() {
    engine_end_to_end(
        "engine_source_client_ip_end_to_end_iptables",
        Backend::Iptables,
        "client-ip",
    );
}

#[test]
fn engine_source_client_end_to_end_nft() {
    engine_end_to_end(
        "engine_source_client_end_to_end_nft",
        Backend::Nft,
        "client",
    );
}

/// `--source client-ip` in both relay modes, IPv4 and IPv6: a 2 MB transfer each
/// way arrives intact with the server seeing the client; the client's half-close
/// reaches the server before the answer, and a server reset reaches the client.
fn engine_client_ip_relays(test: &str, relay: &str) {
    if !engine_has_source_flag() {
        let _ = writeln!(
            io::stderr(),
            "SKIPPED: {test}: the engine under test has no --source"
        );
        return;
    }
    let rig_config = RigConfig::new()
        .setup_args(&["--source", "client-ip", "--in-iface", "veth-c"])
        .engine_args(&["--source", "client-ip", "--relay", relay]);
    let Some(rig) = Rig::start(test, rig_config) else {
        return;
    };
    const LEN: u64 = 2_000_000;
    for (i, family) in [Family::V4, Family::V6].into_iter().enumerate() {
        let bulk = SocketAddr::new(family.server_a(), 6600 + 10 * i as u16);
        let srv = TcpServer::start(&rig.lab.server, bulk, |s, info| {
            // Reads to EOF first: the client's half-close must have been relayed.
            let got = read_digest(&mut &s)?;
            anyhow::ensure!(got == pattern_digest(41, LEN), "request corrupted");
            write_pattern(&mut &s, 42, LEN)?;
            let _ = info;
            Ok(())
        })
        .unwrap();
        let got = rig
            .lab
            .client
            .run(move || -> anyhow::Result<Digest> {
                let mut s = tcp_connect(bulk)?;
                write_pattern(&mut s, 41, LEN)?;
                s.shutdown(Shutdown::Write)?;
                Ok(read_digest(&mut s)?)
            })
            .unwrap_or_else(|e| panic!("{family:?} {relay}: {e:#}"));
        assert_eq!(got, pattern_digest(42, LEN), "{family:?} {relay}: response");
        assert!(srv.wait_finished(1, Duration::from_secs(5)));
        assert_eq!(srv.errors(), Vec::<String>::new());
        assert_eq!(srv.accepted()[0].peer.ip(), family.client(), "{family:?}");

        // A server that resets: the client sees the reset.
        let rst = SocketAddr::new(family.server_a(), 6601 + 10 * i as u16);
        let _r = TcpServer::start(&rig.lab.server, rst, |s, _| {
            let mut b = [0u8; 4];
            (&s).read_exact(&mut b)?;
            socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO))?;
            Ok(())
        })
        .unwrap();
        let seen = rig.lab.client.run(move || -> std::io::Result<usize> {
            let mut s = tcp_connect(rst)?;
            s.write_all(b"ping")?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            let mut b = [0u8; 4];
            read_once(&mut s, &mut b)
        });
        assert!(
            matches!(&seen, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
            "{family:?} {relay}: the server's reset did not reach the client: {seen:?}"
        );
    }
}

#[test]
fn engine_source_client_ip_relays_splice() {
    engine_client_ip_relays("engine_source_client_ip_relays_splice", "splice");
}

#[test]
fn engine_source_client_ip_relays_copy() {
    engine_client_ip_relays("engine_source_client_ip_relays_copy", "copy");
}
