//! The rules file (`engine --config`) with real clients: CIDR and port rules, TLS
//! SNI from `openssl s_client`, HTTP Host from `curl`, UDP with `dig`, a redirect to
//! another server, a server-speaks-first protocol after the sniff timeout,
//! `--check-config` on broken files, and 20 live reloads under load.
//!
//! The namespace tests need root; without it they print `SKIPPED: <name>: ...`.
#![forbid(unsafe_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use ringrelay_tests::*;

/// A rig whose engine decides with `rules` (written to its state directory).
fn rig_with_rules(test: &str, rules: &str, extra: &[&str]) -> Option<(Rig, PathBuf)> {
    let rig = Rig::start(test, RigConfig::new().without_engine())?;
    let path = rig.state_dir().join("rules.toml");
    std::fs::write(&path, rules).unwrap();
    let mut args: Vec<String> = ["--cores", "0-1", "--config", path.to_str().unwrap()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut rig = rig;
    rig.engine = Some(rig.start_engine_args(&args));
    Some((rig, path))
}

trait StartArgs {
    fn start_engine_args(&self, args: &[String]) -> Engine;
}

impl StartArgs for Rig {
    fn start_engine_args(&self, args: &[String]) -> Engine {
        let mut a = args.to_vec();
        if !a.iter().any(|x| x == "--drain-timeout-s") {
            a.extend(["--drain-timeout-s".into(), "1".into()]);
        }
        Engine::start(&self.lab.router, &a).unwrap()
    }
}

/// What a client sees of one TCP exchange: the echo, or how it failed.
fn try_echo(dst: SocketAddr) -> Result<Vec<u8>, ErrorKind> {
    let mut s = tcp_connect(dst).map_err(|e| e.kind())?;
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s.write_all(b"hello").map_err(|e| e.kind())?;
    let mut b = [0u8; 5];
    s.read_exact(&mut b).map_err(|e| e.kind())?;
    Ok(b.to_vec())
}

fn is_reset(r: &Result<Vec<u8>, ErrorKind>) -> bool {
    matches!(
        r,
        Err(ErrorKind::ConnectionReset | ErrorKind::UnexpectedEof | ErrorKind::BrokenPipe)
    )
}

/// The rule table the engine prints after its counters (SIGUSR1).
fn rule_matches(e: &mut Engine, rule: &str) -> u64 {
    e.child.signal(nix::sys::signal::Signal::SIGUSR1).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    e.child
        .stdout()
        .lines()
        .rev()
        .find_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some(rule)).then(|| w.next()?.parse().ok())?
        })
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------
// --check-config
// ---------------------------------------------------------------------------------

#[test]
fn check_config_names_each_error_with_its_position() {
    let dir = std::env::temp_dir().join(format!("ringrelay-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        r#"default = "relay"

[[rule]]
name = "cidr"
dst = ["10.1.2.3/8"]
action = "reject"

[[rule]]
name = "typo"
dport = "443"
action = "reject"

[[rule]]
name = "cidr"
action = "relay"

[[rule]]
name = "nowhere"
action = "redirect"
"#,
    )
    .unwrap();
    let out = Command::new(engine_bin())
        .arg("--check-config")
        .arg(&bad)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let p = bad.display().to_string();
    for (line, what) in [
        (5, "10.1.2.3/8"),
        (10, "unknown field `dport`"),
        (14, "duplicate rule name \"cidr\""),
        (19, "needs `to"),
    ] {
        assert!(
            stderr
                .lines()
                .any(|l| l.starts_with(&format!("{p}:{line}:")) && l.contains(what)),
            "no error at line {line} about {what:?}:\n{stderr}"
        );
    }
    let good = dir.join("good.toml");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/engine.toml"),
        &good,
    )
    .unwrap();
    let out = Command::new(engine_bin())
        .arg("--check-config")
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------
// CIDR and port rules
// ---------------------------------------------------------------------------------

fn cidr_port(test: &str, family: Family, relay: &str) {
    let a = family.server_a();
    let rules = format!(
        r#"
[[rule]]
name = "block-7301"
proto = "tcp"
dst = ["{a}"]
dst_port = "7301"
action = "reject"
"#
    );
    let Some((mut rig, _)) = rig_with_rules(test, &rules, &["--relay", relay]) else {
        return;
    };
    let blocked = SocketAddr::new(a, 7301);
    let open = SocketAddr::new(a, 7302);
    let srv_blocked = TcpServer::echo(&rig.lab.server, blocked).unwrap();
    let _srv_open = TcpServer::echo(&rig.lab.server, open).unwrap();
    let (r_blocked, r_open) = rig
        .lab
        .client
        .run(move || (try_echo(blocked), try_echo(open)));
    assert!(
        is_reset(&r_blocked),
        "the rejected port answered: {r_blocked:?}"
    );
    assert_eq!(r_open.as_deref(), Ok(&b"hello"[..]));
    assert!(
        srv_blocked.accepted().is_empty(),
        "a rejected connection reached the server"
    );
    let e = rig.engine_mut();
    let c = e.counters();
    assert_eq!(c.get("close_rejected"), 1, "{c:?}");
    assert_eq!(rule_matches(e, "block-7301"), 1);
}

#[test]
fn policy_cidr_port_reject_v4_splice() {
    cidr_port("policy_cidr_port_reject_v4_splice", Family::V4, "splice");
}

#[test]
fn policy_cidr_port_reject_v6_copy() {
    cidr_port("policy_cidr_port_reject_v6_copy", Family::V6, "copy");
}

// ---------------------------------------------------------------------------------
// TLS SNI
// ---------------------------------------------------------------------------------

/// An `openssl s_server` with a self-signed certificate for `cn`, in the server ns.
fn tls_server(rig: &Rig, addr: SocketAddr, cn: &str) -> NsChild {
    let dir = rig.state_dir();
    let (key, cert) = (dir.join(format!("{cn}.key")), dir.join(format!("{cn}.crt")));
    let out = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .arg("-subj")
        .arg(format!("/CN={cn}"))
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl req");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let accept = match addr {
        SocketAddr::V4(a) => a.to_string(),
        SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
    };
    let child = rig
        .lab
        .server
        .spawn_child(
            "openssl",
            [
                "s_server",
                "-quiet",
                "-www",
                "-accept",
                &accept,
                "-cert",
                cert.to_str().unwrap(),
                "-key",
                key.to_str().unwrap(),
            ],
        )
        .unwrap();
    wait_tcp_listen(&rig.lab.server, addr.port(), Duration::from_secs(10)).unwrap();
    child
}

/// `openssl s_client -servername NAME` from the client ns: the peer certificate's
/// subject line, or `None` when the handshake did not happen.
fn tls_subject(rig: &Rig, dst: SocketAddr, name: &str) -> Option<String> {
    let mut cmd = rig.lab.client.command("openssl");
    cmd.args([
        "s_client",
        "-connect",
        &dst.to_string(),
        "-servername",
        name,
    ]);
    let out = run_with_timeout(cmd, Duration::from_secs(10)).unwrap();
    let all = format!("{}{}", out.stdout, out.stderr);
    all.lines()
        .find(|l| l.starts_with("subject="))
        .map(str::to_string)
}

#[test]
fn policy_tls_sni_reject_and_redirect() {
    let test = "policy_tls_sni_reject_and_redirect";
    let b = SocketAddr::new(Family::V4.server_b(), 8443);
    let rules = format!(
        r#"
[[rule]]
name = "no-blocked"
sni = "blocked.example"
action = "reject"

[[rule]]
name = "mirror"
sni = ["*.mirror.example"]
action = "redirect"
to = "{b}"
"#
    );
    let Some((mut rig, _)) = rig_with_rules(test, &rules, &[]) else {
        return;
    };
    let a = SocketAddr::new(Family::V4.server_a(), 8443);
    let _ta = tls_server(&rig, a, "server-a");
    let _tb = tls_server(&rig, b, "server-b");
    let plain = tls_subject(&rig, a, "www.example").expect("a handshake with server A");
    assert!(plain.contains("server-a"), "{plain}");
    let mirrored = tls_subject(&rig, a, "www.mirror.example").expect("a handshake");
    assert!(
        mirrored.contains("server-b"),
        "the redirect did not reach B: {mirrored}"
    );
    assert_eq!(
        tls_subject(&rig, a, "Blocked.Example."),
        None,
        "SNI reject let it through"
    );
    let e = rig.engine_mut();
    let c = e.counters();
    assert!(c.get("sniff_sni") >= 3, "{c:?}");
    assert_eq!(c.get("close_rejected"), 1, "{c:?}");
    assert_eq!(rule_matches(e, "mirror"), 1);
    assert_eq!(rule_matches(e, "no-blocked"), 1);
}

// ---------------------------------------------------------------------------------
// HTTP Host with curl
// ---------------------------------------------------------------------------------

/// A tiny HTTP/1.0 server answering every request with `body`.
fn http_server(rig: &Rig, addr: SocketAddr, body: &'static str) -> TcpServer {
    TcpServer::start(&rig.lab.server, addr, move |s, _| {
        let mut buf = vec![0u8; 4096];
        let mut got = Vec::new();
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = (&s).read(&mut buf)?;
            ensure!(n > 0, "EOF before the request ended");
            got.extend_from_slice(&buf[..n]);
        }
        let resp = format!(
            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        (&s).write_all(resp.as_bytes())?;
        Ok(())
    })
    .unwrap()
}

fn curl(rig: &Rig, url: &str, host: Option<&str>) -> String {
    let mut cmd = rig.lab.client.command("curl");
    cmd.args(["-s", "--max-time", "5"]);
    if let Some(h) = host {
        cmd.args(["-H", &format!("Host: {h}")]);
    }
    cmd.arg(url);
    let out = run_with_timeout(cmd, Duration::from_secs(10)).unwrap();
    out.stdout
}

#[test]
fn policy_http_host_redirect_with_curl() {
    let test = "policy_http_host_redirect_with_curl";
    let b = SocketAddr::new(Family::V4.server_b(), 8081);
    let rules = format!(
        r#"
[[rule]]
name = "api"
host = "api.example"
action = "redirect"
to = "{b}"
"#
    );
    let Some((mut rig, _)) = rig_with_rules(test, &rules, &[]) else {
        return;
    };
    let a = SocketAddr::new(Family::V4.server_a(), 8080);
    let _sa = http_server(&rig, a, "from A");
    let _sb = http_server(&rig, b, "from B");
    let url = format!("http://{a}/");
    assert_eq!(curl(&rig, &url, None), "from A");
    assert_eq!(curl(&rig, &url, Some("API.example.")), "from B");
    let c = rig.engine_mut().counters();
    assert!(c.get("sniff_host") >= 2, "{c:?}");
    assert_eq!(c.get("policy_redirected"), 1, "{c:?}");
}

// ---------------------------------------------------------------------------------
// A server-speaks-first protocol
// ---------------------------------------------------------------------------------

/// An SMTP-like server talks first; the client sends nothing until it hears the
/// banner. A rule that needs the SNI cannot decide from the client's bytes, so the
/// sniff timer (300 ms) decides without a name, and the banner still arrives.
#[test]
fn policy_server_first_passes_after_the_sniff_timeout() {
    let test = "policy_server_first_passes_after_the_sniff_timeout";
    let rules = r#"
[[rule]]
name = "tls-only"
dst_port = "2525"
sni = "mail.example"
action = "reject"
"#;
    let Some((mut rig, _)) = rig_with_rules(test, rules, &[]) else {
        return;
    };
    let dst = SocketAddr::new(Family::V4.server_a(), 2525);
    let _srv = TcpServer::start(&rig.lab.server, dst, |s, _| {
        (&s).write_all(b"220 mail ready\r\n")?;
        let mut b = [0u8; 64];
        let n = (&s).read(&mut b)?;
        (&s).write_all(&b[..n])?;
        Ok(())
    })
    .unwrap();
    let (banner, took) = rig
        .lab
        .client
        .run(move || -> anyhow::Result<(String, Duration)> {
            let t = Instant::now();
            let mut s = tcp_connect(dst)?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            let mut b = [0u8; 16];
            s.read_exact(&mut b).context("no banner")?;
            let took = t.elapsed();
            s.write_all(b"QUIT")?;
            let mut q = [0u8; 4];
            s.read_exact(&mut q)?;
            ensure!(&q == b"QUIT");
            Ok((String::from_utf8_lossy(&b).into_owned(), took))
        })
        .unwrap();
    assert_eq!(banner, "220 mail ready\r\n");
    assert!(
        took >= Duration::from_millis(250),
        "decided before the timeout: {took:?}"
    );
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert_eq!(rig.engine_mut().counters().get("sniff_timeout"), 1);
}

// ---------------------------------------------------------------------------------
// UDP with dig
// ---------------------------------------------------------------------------------

#[test]
fn policy_udp_drop_and_relay_with_dig() {
    let test = "policy_udp_drop_and_relay_with_dig";
    let v6 = Family::V6.server_a();
    let rules = format!(
        r#"
[[rule]]
name = "no-v6-dns"
proto = "udp"
dst = "{v6}"
dst_port = 53
action = "drop"

[[rule]]
name = "dns"
proto = "udp"
dst_port = 53
action = "relay"
"#
    );
    let Some((mut rig, _)) = rig_with_rules(test, &rules, &[]) else {
        return;
    };
    let _dnsmasq = dnsmasq(&rig.lab.server, &["--address=/example.test/192.0.2.7"]);
    let dig = |server: String| {
        let mut cmd = rig.lab.client.command("dig");
        cmd.args([
            &format!("@{server}"),
            "+time=1",
            "+tries=1",
            "+short",
            "example.test",
            "A",
        ]);
        run_with_timeout(cmd, Duration::from_secs(10))
            .unwrap()
            .stdout
    };
    assert_eq!(dig(Family::V4.server_a().to_string()).trim(), "192.0.2.7");
    assert!(
        !dig(v6.to_string()).contains("192.0.2.7"),
        "the drop rule let it through"
    );
    let e = rig.engine_mut();
    let c = e.counters();
    assert!(c.get("udp_drop_policy") >= 1, "{c:?}");
    assert_eq!(rule_matches(e, "dns"), 1);
}

// ---------------------------------------------------------------------------------
// Reloads under load
// ---------------------------------------------------------------------------------

const RULES_A: &str = r#"
[[rule]]
name = "block-a"
proto = "tcp"
dst_port = "7401"
action = "reject"
"#;

const RULES_B: &str = r#"
[[rule]]
name = "block-b"
proto = "tcp"
dst_port = "7402"
action = "reject"
"#;

/// 20 reloads while a slow bulk transfer and a steady UDP exchange run: every byte
/// arrives intact, no datagram goes unanswered, each reload applies to the next
/// connections; then a broken file is refused and the old rules keep working.
#[test]
fn policy_twenty_reloads_under_load_lose_nothing() {
    let test = "policy_twenty_reloads_under_load_lose_nothing";
    let Some((mut rig, path)) = rig_with_rules(test, RULES_A, &[]) else {
        return;
    };
    let a = Family::V4.server_a();
    let bulk_dst = SocketAddr::new(a, 7400);
    const BULK: u64 = 8_000_000;
    let _bulk = TcpServer::start(&rig.lab.server, bulk_dst, |s, _| {
        let got = read_digest(&mut &s)?;
        ensure!(got == pattern_digest(31, BULK), "bulk corrupted");
        write_pattern(&mut &s, 32, 4096)?;
        Ok(())
    })
    .unwrap();
    let _e1 = TcpServer::echo(&rig.lab.server, SocketAddr::new(a, 7401)).unwrap();
    let _e2 = TcpServer::echo(&rig.lab.server, SocketAddr::new(a, 7402)).unwrap();
    let udp_dst = SocketAddr::new(a, 7403);
    let _udp = UdpEcho::start(&rig.lab.server, udp_dst, false).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let bulk = rig.lab.client.spawn(move || -> anyhow::Result<()> {
        let mut s = tcp_connect(bulk_dst)?;
        let mut p = Pattern::new(31);
        let mut chunk = vec![0u8; 40_000];
        for _ in 0..BULK / 40_000 {
            p.fill(&mut chunk);
            s.write_all(&chunk)?;
            std::thread::sleep(Duration::from_millis(10)); // about 2 s in all
        }
        s.shutdown(Shutdown::Write)?;
        ensure!(
            read_digest(&mut s)? == pattern_digest(32, 4096),
            "bulk response"
        );
        Ok(())
    });
    let udp = {
        let stop = stop.clone();
        rig.lab.client.spawn(move || -> anyhow::Result<(u64, u64)> {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.set_read_timeout(Some(Duration::from_secs(1)))?;
            let (mut sent, mut answered) = (0u64, 0u64);
            let mut buf = [0u8; 16];
            while !stop.load(Relaxed) {
                s.send_to(&sent.to_be_bytes(), udp_dst)?;
                sent += 1;
                if s.recv_from(&mut buf).is_ok() {
                    answered += 1;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok((sent, answered))
        })
    };
    for i in 0..20 {
        std::fs::write(&path, if i % 2 == 0 { RULES_B } else { RULES_A }).unwrap();
        rig.engine_mut()
            .child
            .signal(nix::sys::signal::Signal::SIGHUP)
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    bulk.join()
        .unwrap()
        .expect("the bulk transfer across 20 reloads");
    stop.store(true, Relaxed);
    let (sent, answered) = udp.join().unwrap().unwrap();
    assert_eq!(sent, answered, "UDP answers lost across the reloads");
    // The last file written was RULES_A (i = 19).
    let (r1, r2) = rig.lab.client.run(move || {
        (
            try_echo(SocketAddr::new(a, 7401)),
            try_echo(SocketAddr::new(a, 7402)),
        )
    });
    assert!(
        is_reset(&r1),
        "RULES_A is in force: 7401 must be rejected: {r1:?}"
    );
    assert_eq!(r2.as_deref(), Ok(&b"hello"[..]));
    // A broken file is refused; the old rules stay.
    std::fs::write(&path, "default = \"sideways\"\n").unwrap();
    rig.engine_mut()
        .child
        .signal(nix::sys::signal::Signal::SIGHUP)
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let r1 = rig
        .lab
        .client
        .run(move || try_echo(SocketAddr::new(a, 7401)));
    assert!(is_reset(&r1), "the broken file replaced the rules: {r1:?}");
    let stderr = rig.engine_mut().child.stderr();
    assert_eq!(stderr.matches("event=reload ").count(), 20, "{stderr}");
    assert!(stderr.contains("event=reload_refused"), "{stderr}");
    assert!(stderr.contains("refused, the old rules stay"), "{stderr}");
    assert!(
        stderr.contains("rules.toml:1:"),
        "the error names its position: {stderr}"
    );
}
