//! The lab builds the CONTRACTS.md topology, carries v4 and v6 TCP from client to
//! server through the router, and leaves no namespace behind.
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use ringrelay_bench::lab::{addrs, wait_tcp_listen, Lab};

mod common;
use common::lab_or_skip;

fn netns_names() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Echo one message over TCP from a client-ns thread to a server-ns listener.
fn tcp_roundtrip(lab: &Lab, ip: IpAddr, port: u16) {
    let addr = SocketAddr::new(ip, port);
    let listener = lab
        .server
        .run(move || TcpListener::bind(addr).expect("bind in server ns"));
    let server = std::thread::spawn(move || {
        let (mut s, peer) = listener.accept().expect("accept");
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).expect("read");
        s.write_all(&buf).expect("write");
        peer
    });
    wait_tcp_listen(&lab.server, port, Duration::from_secs(2)).expect("listener visible");
    let echoed = lab.client.run(move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.write_all(b"hello").unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        buf
    });
    assert_eq!(&echoed, b"hello");
    let peer = server.join().unwrap();
    // No NAT anywhere: the server sees the client's own address.
    let want: IpAddr = if ip.is_ipv4() {
        addrs::CLIENT4.into()
    } else {
        addrs::CLIENT6.into()
    };
    assert_eq!(peer.ip(), want);
}

#[test]
fn lab_routes_v4_and_v6_and_cleans_up() {
    let Some(lab) = lab_or_skip("lab_routes_v4_and_v6_and_cleans_up") else {
        return;
    };
    let prefix = lab.prefix().to_string();
    assert!(netns_names().iter().any(|n| n == &format!("{prefix}-rtr")));
    assert_eq!(lab.router.read_sysctl("net.ipv4.ip_forward").unwrap(), "1");
    assert_eq!(
        lab.router
            .read_sysctl("net.ipv4.conf.veth-c.rp_filter")
            .unwrap(),
        "0"
    );

    tcp_roundtrip(&lab, addrs::SERVER4_A.into(), 7001);
    tcp_roundtrip(&lab, addrs::SERVER4_B.into(), 7002);
    tcp_roundtrip(&lab, addrs::SERVER6_A.into(), 7003);
    tcp_roundtrip(&lab, addrs::SERVER6_B.into(), 7004);

    // A child process in the router ns must be killed by the teardown.
    let mut child = lab.router.spawn_child("sleep", ["30"]).unwrap();
    assert!(child.wait_timeout(Duration::from_millis(50)).is_none());
    let pid = child.pid();
    std::mem::forget(child); // leave it to the Lab's teardown
    drop(lab);
    assert!(
        !netns_names()
            .iter()
            .any(|n| n.starts_with(&format!("{prefix}-"))),
        "namespaces left behind: {:?}",
        netns_names()
    );
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Killed: either gone or a zombie we never reaped (we forgot the handle).
    assert!(
        stat.is_empty() || stat.contains(") Z "),
        "child {pid} survived: {stat}"
    );
}

#[test]
fn labs_coexist_and_teardown_runs_on_panic() {
    let Some(a) = lab_or_skip("labs_coexist_and_teardown_runs_on_panic") else {
        return;
    };
    let b = Lab::up().expect("second lab");
    assert_ne!(a.prefix(), b.prefix());
    let pb = b.prefix().to_string();
    let r = std::panic::catch_unwind(move || {
        let _b = b;
        panic!("boom");
    });
    assert!(r.is_err());
    assert!(!netns_names()
        .iter()
        .any(|n| n.starts_with(&format!("{pb}-"))));
    // The first lab is untouched by the second's teardown.
    tcp_roundtrip(&a, addrs::SERVER4_A.into(), 7005);
}
