//! Inputs of the policy targets (`engine-rules10k`, `engine-sni`): the rules files
//! they run the engine with, and the TLS ClientHello that `engine-sni`'s clients send
//! before their requests.

use std::fmt::Write as _;
use std::sync::OnceLock;

use crate::load::{PORT_TCP_BULK, PORT_TCP_CRR, PORT_TCP_IDLE, PORT_TCP_RR, PORT_UDP_RR};

/// Rules in `engine-rules10k`'s file, the relaying one last.
pub const RULES_10K: usize = 10_000;

/// The server name `engine-sni`'s ClientHello carries and its rule matches.
pub const BENCH_SNI: &str = "bench.example";

/// The lab's scenario ports as a `dst_port` value (`5001-5006`).
fn lab_ports() -> String {
    let lo = PORT_TCP_BULK
        .min(PORT_TCP_CRR)
        .min(PORT_TCP_RR)
        .min(PORT_TCP_IDLE);
    let hi = PORT_UDP_RR.max(PORT_TCP_IDLE);
    format!("{lo}-{hi}")
}

/// The never-matching `dst` of filler rule `i`: first the 768 IPv4 documentation
/// addresses as /32s (TEST-NET-1..3), then /24s in the reserved 240.0.0.0/4, then
/// /48s in the IPv6 documentation prefix 2001:db8::/32. None of them is a lab address
/// (198.18.0.0/15, fd00:18::/32).
pub fn filler_dst(i: usize) -> String {
    const NETS: [[u8; 3]; 3] = [[192, 0, 2], [198, 51, 100], [203, 0, 113]];
    match i {
        0..=767 => {
            let n = NETS[i / 256];
            format!("{}.{}.{}.{}/32", n[0], n[1], n[2], i % 256)
        }
        768..=4999 => {
            let k = i - 768;
            format!("240.{}.{}.0/24", k / 256, k % 256)
        }
        _ => format!("2001:db8:{:x}::/48", i - 5000),
    }
}

/// A rules file of `n` rules (`n` >= 1): `n - 1` TCP rules that reject
/// destinations no lab flow goes to, then `bench-lab`, which relays the lab's
/// scenario ports; everything else is rejected (`default = "reject"`), so a lookup
/// that went wrong shows as failed connections rather than a good figure.
pub fn rules_file(n: usize) -> String {
    let mut s = String::with_capacity(n * 80);
    let _ = writeln!(
        s,
        "# ringrelay bench: {n} rules, generated; the last one relays the lab's traffic\n\
         default = \"reject\"\n"
    );
    for i in 0..n.saturating_sub(1) {
        let _ = writeln!(
            s,
            "[[rule]]\nname = \"filler-{i:05}\"\nproto = \"tcp\"\ndst = \"{}\"\naction = \"reject\"\n",
            filler_dst(i)
        );
    }
    let _ = writeln!(
        s,
        "[[rule]]\nname = \"bench-lab\"\ndst_port = \"{}\"\naction = \"relay\"",
        lab_ports()
    );
    s
}

/// `engine-sni`'s rules file: one rule, relaying `tcp-crr` and `tcp-rr` connections
/// whose ClientHello names [`BENCH_SNI`]; anything else is rejected, so every
/// measured connection proves the engine read the name.
pub fn sni_rules_file() -> String {
    format!(
        "# ringrelay bench: one SNI rule, generated\n\
         default = \"reject\"\n\n\
         [[rule]]\nname = \"bench-sni\"\nproto = \"tcp\"\ndst_port = \"{PORT_TCP_CRR},{PORT_TCP_RR}\"\n\
         sni = \"{BENCH_SNI}\"\naction = \"relay\"\n"
    )
}

/// A TLS 1.3 ClientHello for `name`, as one TLS record, shaped like a browser's
/// minus most extensions: fixed random and session id, three TLS 1.3 suites and one
/// TLS 1.2 one, then `server_name`, `supported_groups` (x25519), `ec_point_formats`,
/// `signature_algorithms`, `supported_versions` (1.3, 1.2) and an x25519 `key_share`.
pub fn client_hello(name: &str) -> Vec<u8> {
    fn ext(out: &mut Vec<u8>, typ: u16, body: &[u8]) {
        out.extend_from_slice(&typ.to_be_bytes());
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(body);
    }
    let host = name.as_bytes();
    let mut sni = Vec::new();
    sni.extend_from_slice(&((host.len() + 3) as u16).to_be_bytes()); // server_name_list
    sni.push(0); // host_name
    sni.extend_from_slice(&(host.len() as u16).to_be_bytes());
    sni.extend_from_slice(host);

    let mut exts = Vec::new();
    ext(&mut exts, 0x0000, &sni);
    ext(&mut exts, 0x000a, &[0x00, 0x02, 0x00, 0x1d]); // supported_groups: x25519
    ext(&mut exts, 0x000b, &[0x01, 0x00]); // ec_point_formats: uncompressed
    ext(
        &mut exts,
        0x000d, // signature_algorithms
        &[0x00, 0x06, 0x04, 0x03, 0x08, 0x04, 0x04, 0x01],
    );
    ext(&mut exts, 0x002b, &[0x04, 0x03, 0x04, 0x03, 0x03]); // supported_versions
    let mut ks = vec![0x00, 0x24, 0x00, 0x1d, 0x00, 0x20]; // key_share: x25519, 32 bytes
    ks.extend((0..32u8).map(|b| b.wrapping_mul(7).wrapping_add(3)));
    ext(&mut exts, 0x0033, &ks);

    let mut hello = Vec::new();
    hello.extend_from_slice(&[0x03, 0x03]); // legacy_version TLS 1.2
    hello.extend((0..32u8).map(|b| b.wrapping_mul(13).wrapping_add(1))); // random
    hello.push(32); // legacy_session_id
    hello.extend((0..32u8).map(|b| b ^ 0x5c));
    let suites = [0x13, 0x01, 0x13, 0x02, 0x13, 0x03, 0xc0, 0x2f];
    hello.extend_from_slice(&(suites.len() as u16).to_be_bytes());
    hello.extend_from_slice(&suites);
    hello.extend_from_slice(&[0x01, 0x00]); // compression: null
    hello.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    hello.extend_from_slice(&exts);

    let mut hs = vec![0x01]; // client_hello
    hs.extend_from_slice(&(hello.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&hello);

    let mut rec = vec![0x16, 0x03, 0x01]; // handshake, record version TLS 1.0
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

/// [`client_hello`] of [`BENCH_SNI`], built once.
pub fn bench_client_hello() -> &'static [u8] {
    static HELLO: OnceLock<Vec<u8>> = OnceLock::new();
    HELLO.get_or_init(|| client_hello(BENCH_SNI))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The server name of a one-record ClientHello, read the way a sniffer does.
    fn sni_of(rec: &[u8]) -> Option<String> {
        let be16 = |b: &[u8], at: usize| Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]));
        if rec.first() != Some(&0x16) || usize::from(be16(rec, 3)?) != rec.len() - 5 {
            return None;
        }
        let hs = &rec[5..];
        if hs[0] != 1 || u32::from_be_bytes([0, hs[1], hs[2], hs[3]]) as usize != hs.len() - 4 {
            return None;
        }
        let mut at = 4 + 2 + 32; // type+len, version, random
        at += 1 + usize::from(hs[at]); // session id
        at += 2 + usize::from(be16(hs, at)?); // cipher suites
        at += 1 + usize::from(hs[at]); // compression
        let end = at + 2 + usize::from(be16(hs, at)?);
        assert_eq!(end, hs.len(), "extensions end the hello");
        at += 2;
        while at < end {
            let (typ, len) = (be16(hs, at)?, usize::from(be16(hs, at + 2)?));
            let body = hs.get(at + 4..at + 4 + len)?;
            if typ == 0 {
                assert_eq!(usize::from(be16(body, 0)?), body.len() - 2);
                assert_eq!(body[2], 0, "host_name");
                let n = usize::from(be16(body, 3)?);
                return String::from_utf8(body.get(5..5 + n)?.to_vec()).ok();
            }
            at += 4 + len;
        }
        None
    }

    #[test]
    fn client_hello_carries_the_bench_name() {
        let h = bench_client_hello();
        assert_eq!(sni_of(h).as_deref(), Some(BENCH_SNI));
        assert_eq!(h.len(), 189);
        assert_eq!(&h[..3], &[0x16, 0x03, 0x01]);
        assert_eq!(sni_of(&client_hello("a.b")).as_deref(), Some("a.b"));
        // The name sits right after the fixed part and the first extension's headers.
        let at = 5 + 4 + 2 + 32 + 33 + 10 + 2 + 2 + 4 + 5;
        assert_eq!(&h[at..at + BENCH_SNI.len()], BENCH_SNI.as_bytes());
    }

    #[test]
    fn rules_file_has_n_rules_and_relays_last() {
        let f = rules_file(RULES_10K);
        assert_eq!(f.matches("[[rule]]").count(), RULES_10K);
        assert_eq!(f.matches("action = \"reject\"").count(), RULES_10K - 1);
        assert!(f.contains("default = \"reject\""));
        let last = f.rsplit("[[rule]]").next().unwrap();
        assert!(last.contains("name = \"bench-lab\""), "{last}");
        assert!(last.contains("dst_port = \"5001-5006\""), "{last}");
        assert!(last.contains("action = \"relay\""), "{last}");
        // Unique names and destinations, none of them in the lab.
        let mut dsts: Vec<String> = (0..RULES_10K - 1).map(filler_dst).collect();
        assert!(dsts.iter().all(|d| !d.starts_with("198.18.")
            && !d.starts_with("198.19.")
            && !d.starts_with("fd")));
        assert_eq!(dsts[0], "192.0.2.0/32");
        assert_eq!(dsts[767], "203.0.113.255/32");
        assert_eq!(dsts[768], "240.0.0.0/24");
        assert_eq!(dsts[5000], "2001:db8:0::/48");
        dsts.sort();
        dsts.dedup();
        assert_eq!(dsts.len(), RULES_10K - 1);
        assert_eq!(rules_file(1).matches("[[rule]]").count(), 1);
    }

    #[test]
    fn sni_rules_file_names_the_bench_server() {
        let f = sni_rules_file();
        assert_eq!(f.matches("[[rule]]").count(), 1);
        assert!(f.contains("sni = \"bench.example\""));
        assert!(f.contains("dst_port = \"5002,5003\""));
    }

    /// The engine itself accepts both files, when it is built (no root needed).
    #[test]
    fn the_engine_accepts_the_rules_files() {
        let Ok(engine) = crate::targets::Tools::discover().engine else {
            eprintln!("engine not built; skipping --check-config");
            return;
        };
        let dir =
            std::env::temp_dir().join(format!("ringrelay-bench-policy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, text) in [
            ("10k.toml", rules_file(RULES_10K)),
            ("sni.toml", sni_rules_file()),
        ] {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            let out = std::process::Command::new(&engine)
                .arg("--check-config")
                .arg(&p)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{name}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
