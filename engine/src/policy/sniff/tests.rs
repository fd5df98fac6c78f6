use super::*;

use proptest::prelude::*;

/// `(file name, bytes, expected)` for every file of a corpus folder, from its EXPECT
/// list. A corpus file that EXPECT does not list fails the test: every seed says what
/// it must give.
fn corpus(dir: &str) -> Vec<(String, Vec<u8>, Sniff)> {
    let base = format!("{}/tests/corpus/{dir}", env!("CARGO_MANIFEST_DIR"));
    let expect = std::fs::read_to_string(format!("{base}/EXPECT")).unwrap();
    let mut out = Vec::new();
    for line in expect.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (file, name) = line.split_once(char::is_whitespace).unwrap();
        let want = match name.trim() {
            "-" => Sniff::NoName,
            n => Sniff::Name(n.to_string()),
        };
        let bytes = std::fs::read(format!("{base}/{file}")).unwrap();
        out.push((file.to_string(), bytes, want));
    }
    for entry in std::fs::read_dir(&base).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        let listed = out.iter().any(|(f, ..)| *f == name);
        assert!(
            listed || name == "EXPECT",
            "{dir}/{name} is not in {dir}/EXPECT"
        );
    }
    assert!(!out.is_empty());
    out
}

fn tls_corpus() -> Vec<(String, Vec<u8>, Sniff)> {
    corpus("tls")
}

fn http_corpus() -> Vec<(String, Vec<u8>, Sniff)> {
    corpus("http")
}

/// The bytes of one complete request or ClientHello: for HTTP, up to the end of the
/// header block (what follows is body and not looked at).
fn head_len(bytes: &[u8]) -> usize {
    if bytes.first() == Some(&22) {
        9 + (usize::from(bytes[6]) << 16 | usize::from(bytes[7]) << 8 | usize::from(bytes[8]))
    } else {
        let crlf = bytes
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|i| i + 4);
        let lf = bytes.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
        [crlf, lf].into_iter().flatten().min().unwrap()
    }
}

fn parser(dir: &str) -> fn(&[u8]) -> Sniff {
    if dir == "tls" {
        tls_sni
    } else {
        http_host
    }
}

#[test]
fn corpus_files_give_their_expected_names() {
    for dir in ["tls", "http"] {
        for (file, bytes, want) in corpus(dir) {
            assert_eq!(parser(dir)(&bytes), want, "{dir}/{file}");
        }
    }
}

#[test]
fn every_truncation_needs_more_until_the_end() {
    for dir in ["tls", "http"] {
        let f = parser(dir);
        for (file, bytes, want) in corpus(dir) {
            let end = head_len(&bytes);
            for n in 0..end {
                let got = f(&bytes[..n]);
                // A few NoName requests are wrong before their end (two Hosts, a fold).
                if got != Sniff::NeedMore {
                    assert_eq!(
                        (got, &want),
                        (Sniff::NoName, &Sniff::NoName),
                        "{dir}/{file} cut at {n}"
                    );
                    break;
                }
            }
            assert_eq!(f(&bytes[..end]), want, "{dir}/{file} at its end");
            // What follows the hello or the header block changes nothing.
            let mut more = bytes[..end].to_vec();
            more.extend_from_slice(b"\x17\x03\x03\x00\x10 and then some data");
            assert_eq!(f(&more), want, "{dir}/{file} with bytes after it");
        }
    }
}

#[test]
fn real_client_hellos_in_valid_requests_need_all_their_bytes() {
    // The real ClientHellos decide only at their very last byte.
    for (file, bytes, _) in tls_corpus() {
        let end = head_len(&bytes);
        assert_eq!(end, bytes.len(), "{file}: one record, one ClientHello");
        assert_eq!(tls_sni(&bytes[..end - 1]), Sniff::NeedMore, "{file}");
    }
}

/// A ClientHello, as a client would send it, with these server_name entries
/// (`(name_type, name)`; none: no extension) and `pad` bytes of padding extension.
fn hello(names: &[(u8, &[u8])], pad: usize) -> Vec<u8> {
    let mut exts = Vec::new();
    if !names.is_empty() {
        let mut list = Vec::new();
        for (ty, n) in names {
            list.push(*ty);
            list.extend_from_slice(&(n.len() as u16).to_be_bytes());
            list.extend_from_slice(n);
        }
        exts.extend_from_slice(&0u16.to_be_bytes());
        exts.extend_from_slice(&(list.len() as u16 + 2).to_be_bytes());
        exts.extend_from_slice(&(list.len() as u16).to_be_bytes());
        exts.extend_from_slice(&list);
    }
    // ALPN h2, http/1.1: an extension before the padding, as browsers send.
    let alpn = b"\x00\x0c\x02h2\x08http/1.1";
    exts.extend_from_slice(&16u16.to_be_bytes());
    exts.extend_from_slice(&(alpn.len() as u16).to_be_bytes());
    exts.extend_from_slice(alpn);
    if pad > 0 {
        exts.extend_from_slice(&21u16.to_be_bytes());
        exts.extend_from_slice(&(pad as u16).to_be_bytes());
        exts.extend(std::iter::repeat_n(0, pad));
    }
    let mut body = vec![3, 3];
    body.extend_from_slice(&[0xab; 32]); // random
    body.push(32);
    body.extend_from_slice(&[0xcd; 32]); // session id
    body.extend_from_slice(&[0, 4, 0x13, 0x01, 0x13, 0x02]); // two suites
    body.extend_from_slice(&[1, 0]); // null compression
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend_from_slice(&exts);
    let mut hs = vec![1];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    record(&hs)
}

/// One handshake record around `payload`.
fn record(payload: &[u8]) -> Vec<u8> {
    let mut r = vec![22, 3, 1];
    r.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    r.extend_from_slice(payload);
    r
}

#[test]
fn built_hellos_name_normalised_and_first_host_name() {
    assert_eq!(
        tls_sni(&hello(&[(0, b"Mixed.Example.COM.")], 0)),
        Sniff::Name("mixed.example.com".into())
    );
    // An unknown name_type is skipped; the first host_name counts.
    let two = hello(
        &[(7, b"other"), (0, b"first.example"), (0, b"second.example")],
        0,
    );
    assert_eq!(tls_sni(&two), Sniff::Name("first.example".into()));
    assert_eq!(tls_sni(&hello(&[], 0)), Sniff::NoName);
    assert_eq!(
        tls_sni(&hello(&[(0, b"bad name.example")], 0)),
        Sniff::NoName
    );
    assert_eq!(
        tls_sni(&hello(&[(0, "ü.example".as_bytes())], 0)),
        Sniff::NoName
    );
    assert_eq!(tls_sni(&hello(&[(0, b"")], 0)), Sniff::NoName);
    assert_eq!(tls_sni(&hello(&[(0, b"a..example")], 0)), Sniff::NoName);
}

#[test]
fn a_hello_that_fills_a_16k_record_is_read_and_a_larger_one_is_not() {
    let base = hello(&[(0, b"big.example")], 0).len();
    // 4 bytes of padding extension header, then padding up to a 16384-byte record.
    let fit = hello(&[(0, b"big.example")], MAX_TLS_RECORD + 5 - base - 4);
    assert_eq!(fit.len(), MAX_SNIFF_BYTES);
    assert_eq!(tls_sni(&fit), Sniff::Name("big.example".into()));
    assert_eq!(tls_sni(&fit[..fit.len() - 1]), Sniff::NeedMore);
    let over = hello(&[(0, b"big.example")], MAX_TLS_RECORD + 5 - base - 3);
    // Decided from the record header alone.
    assert_eq!(tls_sni(&over[..5]), Sniff::NoName);
    assert_eq!(tls_sni(&over), Sniff::NoName);
}

#[test]
fn a_hello_fragmented_over_records_is_no_name() {
    for (file, bytes, _) in tls_corpus() {
        let hs = &bytes[5..];
        for cut in [4, 40, hs.len() / 2, hs.len() - 1] {
            let mut two = record(&hs[..cut]);
            two.extend_from_slice(&record(&hs[cut..]));
            // Known as soon as the handshake header says the message is longer than
            // its record.
            assert_eq!(tls_sni(&two[..9]), Sniff::NoName, "{file} cut {cut}");
            assert_eq!(tls_sni(&two), Sniff::NoName, "{file} cut {cut}");
        }
    }
}

#[test]
fn malformed_hellos_are_no_name() {
    let good = hello(&[(0, b"ok.example")], 0);
    assert_eq!(tls_sni(&good), Sniff::Name("ok.example".into()));
    let bad = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = good.clone();
        f(&mut b);
        tls_sni(&b)
    };
    // Not a handshake record, not TLS, a zero-length record, not a ClientHello.
    assert_eq!(bad(&|b| b[0] = 23), Sniff::NoName);
    assert_eq!(bad(&|b| b[1] = 2), Sniff::NoName);
    assert_eq!(bad(&|b| b[3..5].copy_from_slice(&[0, 0])), Sniff::NoName);
    assert_eq!(bad(&|b| b[5] = 2), Sniff::NoName);
    // A session id longer than 32, an odd cipher suite length, no compression.
    assert_eq!(bad(&|b| b[9 + 34] = 33), Sniff::NoName);
    assert_eq!(bad(&|b| b[9 + 35 + 32 + 1] = 3), Sniff::NoName);
    assert_eq!(bad(&|b| b[9 + 35 + 32 + 6] = 0), Sniff::NoName);
    // The extensions' length does not add up to the hello's.
    let ext_at = 9 + 35 + 32 + 6 + 2;
    assert_eq!(bad(&|b| b[ext_at + 1] -= 1), Sniff::NoName);
    assert_eq!(bad(&|b| b[ext_at + 1] += 1), Sniff::NoName);
    // The server_name list length disagrees with its extension's.
    assert_eq!(bad(&|b| b[ext_at + 2 + 4 + 1] += 1), Sniff::NoName);
    // server_name twice.
    let mut twice = hello(&[(0, b"ok.example")], 0);
    let ext = twice[ext_at + 2..ext_at + 2 + 4 + 2 + 3 + 10].to_vec();
    twice.extend_from_slice(&ext);
    let grow = ext.len() as u16;
    for (at, width) in [(3, 2), (6, 3), (ext_at, 2)] {
        let mut n = 0u32;
        for i in 0..width {
            n = n << 8 | u32::from(twice[at + i]);
        }
        let n = (n + u32::from(grow)).to_be_bytes();
        twice[at..at + width].copy_from_slice(&n[4 - width..]);
    }
    assert_eq!(tls_sni(&twice), Sniff::NoName);
    // Garbage and SSLv2-style hellos.
    assert_eq!(tls_sni(b"\x80\x2e\x01\x00\x02"), Sniff::NoName);
    assert_eq!(tls_sni(b"\x16\x03\x01\xff\xff"), Sniff::NoName);
    assert_eq!(tls_sni(b"\x16\x03\x05"), Sniff::NoName);
    assert_eq!(tls_sni(b"\x16\x03"), Sniff::NeedMore);
    assert_eq!(tls_sni(b""), Sniff::NeedMore);
}

#[test]
fn http_host_cases() {
    let h = |s: &str| http_host(s.as_bytes());
    let name = |n: &str| Sniff::Name(n.to_string());
    assert_eq!(
        h("GET / HTTP/1.1\r\nHost: Example.COM.:8080\r\n\r\n"),
        name("example.com")
    );
    assert_eq!(
        h("GET / HTTP/1.1\r\nhOsT:x.example\r\n\r\n"),
        name("x.example")
    );
    assert_eq!(
        h("GET / HTTP/1.1\r\nHost: x.example:\r\n\r\n"),
        name("x.example")
    );
    assert_eq!(
        h("GET / HTTP/1.1\r\nHost: u@x.example\r\n\r\n"),
        name("x.example")
    );
    assert_eq!(h("GET / HTTP/1.1\r\nHost:\r\n\r\n"), Sniff::NoName);
    assert_eq!(
        h("GET / HTTP/1.1\r\nHost: x.example:http\r\n\r\n"),
        Sniff::NoName
    );
    assert_eq!(
        h("GET / HTTP/1.1\r\nHost : x.example\r\n\r\n"),
        Sniff::NoName
    );
    assert_eq!(
        h("GET / HTTP/1.1\r\nHost: x.exa\x01mple\r\n\r\n"),
        Sniff::NoName
    );
    assert_eq!(
        h("GET / HTTP/1.1\r\nHost: x.example\r\r\n\r\n"),
        Sniff::NoName
    );
    assert_eq!(
        h("GET  / HTTP/1.1\r\nHost: x.example\r\n\r\n"),
        Sniff::NoName
    );
    assert_eq!(
        h("GET / HTTP/1.12\r\nHost: x.example\r\n\r\n"),
        Sniff::NoName
    );
    assert_eq!(h("GET / HTTP/1.1\r\nHost: x.example\r\n"), Sniff::NeedMore);
    // Decided before the end of the header block when a line is already wrong.
    assert_eq!(h("GET / HTTP/1.1\r\nBad Header: 1"), Sniff::NoName);
    assert_eq!(h("GET / HTTQ"), Sniff::NoName);
    assert_eq!(h("GET /\x00"), Sniff::NoName);
    assert_eq!(h("SSH-2.0-OpenSSH_9.2p1\r\n"), Sniff::NoName);
    assert_eq!(h("HELO mail.example\r\n"), Sniff::NoName);
    assert_eq!(h(&"A".repeat(MAX_METHOD + 1)), Sniff::NoName);
    assert_eq!(h(&"A".repeat(MAX_METHOD)), Sniff::NeedMore);
    assert_eq!(h(""), Sniff::NeedMore);
}

#[test]
fn http_header_block_over_16k_is_no_name() {
    let mut req = b"GET / HTTP/1.1\r\nX-Filler: ".to_vec();
    req.resize(MAX_HTTP_HEADER - 1, b'a');
    assert_eq!(http_host(&req), Sniff::NeedMore);
    req.push(b'a');
    assert_eq!(http_host(&req), Sniff::NoName);
    // Exactly 16 KiB with its end is still read.
    let end = b"\r\nHost: edge.example\r\n\r\n";
    let mut fit = b"GET / HTTP/1.1\r\nX-Filler: ".to_vec();
    fit.resize(MAX_HTTP_HEADER - end.len(), b'a');
    fit.extend_from_slice(end);
    assert_eq!(fit.len(), MAX_HTTP_HEADER);
    assert_eq!(http_host(&fit), Sniff::Name("edge.example".into()));
    let mut over = fit.clone();
    over.insert(20, b'a');
    assert_eq!(http_host(&over), Sniff::NoName);
}

#[test]
fn sniff_tells_tls_from_http() {
    let (_, tls, _) = &tls_corpus()[0];
    assert_eq!(sniff(tls), Sniffed::Sni("x.example.com".into()));
    assert_eq!(sniff(tls).names(), (Some("x.example.com"), None));
    let http = b"GET / HTTP/1.1\r\nHost: h.example\r\n\r\n";
    assert_eq!(sniff(http), Sniffed::Host("h.example".into()));
    assert_eq!(sniff(http).names(), (None, Some("h.example")));
    assert_eq!(sniff(b""), Sniffed::NeedMore);
    assert_eq!(sniff(b"\x16\x03"), Sniffed::NeedMore);
    assert_eq!(sniff(b"G"), Sniffed::NeedMore);
    assert_eq!(sniff(b"\x00\x01"), Sniffed::NoName);
    assert_eq!(sniff(b"220 "), Sniffed::NoName);
    assert_eq!(sniff(b"\x00").names(), (None, None));
}

#[test]
fn names_are_checked_and_normalised() {
    assert_eq!(
        normalize_name("A.Example.COM."),
        Some("a.example.com".into())
    );
    assert_eq!(
        normalize_name("_dmarc.x-y.example"),
        Some("_dmarc.x-y.example".into())
    );
    assert_eq!(normalize_name("192.0.2.1"), Some("192.0.2.1".into()));
    for bad in [
        "",
        ".",
        "a..b",
        ".a",
        "a.b..",
        "a b",
        "a:b",
        "*.a",
        "ü.example",
    ] {
        assert_eq!(normalize_name(bad), None, "{bad:?}");
    }
    assert_eq!(normalize_name(&"a".repeat(63)), Some("a".repeat(63)));
    assert_eq!(normalize_name(&"a".repeat(64)), None);
    let long = [
        "a".repeat(63),
        "b".repeat(63),
        "c".repeat(63),
        "d".repeat(61),
    ]
    .join(".");
    assert_eq!(long.len(), 253);
    assert!(normalize_name(&long).is_some());
    assert!(normalize_name(&format!("{long}.")).is_some());
    assert!(normalize_name(&format!("{long}e")).is_none());
    assert!(check_name("ü.example").unwrap_err().contains("xn--"));
}

// Property tests. The default case count keeps the engine's unit suite fast; a long run
// sets PROPTEST_CASES, e.g.
//   PROPTEST_CASES=200000 cargo test -p ringrelay-engine --release policy::sniff
// (proptest reads it; failures are shrunk and saved under proptest-regressions/).

/// Cases per property unless PROPTEST_CASES says otherwise.
pub(crate) fn config() -> ProptestConfig {
    let mut c = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = 128;
    }
    c
}

/// Random edits of a seed: flips, inserts, deletes, truncation, duplication.
pub(crate) fn mutate(mut b: Vec<u8>, edits: &[(u8, usize, u8)]) -> Vec<u8> {
    for &(op, at, byte) in edits {
        let at = if b.is_empty() { 0 } else { at % b.len() };
        match op % 6 {
            0 if !b.is_empty() => b[at] = byte,
            1 if !b.is_empty() => b[at] ^= 1 << (byte % 8),
            2 => b.insert(at, byte),
            3 if !b.is_empty() => {
                b.remove(at);
            }
            4 => b.truncate(at),
            _ => {
                let end = (at + usize::from(byte)).min(b.len());
                let copy = b[at..end].to_vec();
                b.splice(at..at, copy);
            }
        }
    }
    b
}

fn edits() -> impl Strategy<Value = Vec<(u8, usize, u8)>> {
    prop::collection::vec(any::<(u8, usize, u8)>(), 0..6)
}

/// A decision is final: more bytes never change it. And a name is always normalised.
fn check_final(f: fn(&[u8]) -> Sniff, input: &[u8], more: &[u8]) -> Result<(), TestCaseError> {
    let got = f(input);
    if let Sniff::Name(n) = &got {
        prop_assert_eq!(normalize_name(n), Some(n.clone()));
    }
    if got != Sniff::NeedMore {
        let mut longer = input.to_vec();
        longer.extend_from_slice(more);
        prop_assert_eq!(f(&longer), got);
    }
    Ok(())
}

/// A DNS name in random case, maybe with a trailing dot, and its normal form.
fn dns_name() -> impl Strategy<Value = (String, String)> {
    (
        prop::collection::vec("[a-zA-Z0-9_][a-zA-Z0-9_-]{0,20}", 1..5),
        any::<bool>(),
    )
        .prop_map(|(labels, dot)| {
            let name = labels.join(".");
            let normal = name.to_ascii_lowercase();
            (if dot { format!("{name}.") } else { name }, normal)
        })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn random_bytes_never_panic_and_decisions_are_final(
        input in prop::collection::vec(any::<u8>(), 0..600),
        more in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        check_final(tls_sni, &input, &more)?;
        check_final(http_host, &input, &more)?;
        let s = sniff(&input);
        match input.first() {
            Some(22) | None => {}
            Some(b) if b.is_ascii_alphabetic() => {}
            Some(_) => prop_assert_eq!(s, Sniffed::NoName),
        }
    }

    #[test]
    fn tls_needs_more_only_for_a_plausible_prefix(
        head in (Just(22u8), 0u8..6, 0u8..6, any::<u16>(), 0u8..3, any::<[u8; 3]>()),
        rest in prop::collection::vec(any::<u8>(), 0..300),
    ) {
        let (t, major, minor, len, hs, hl) = head;
        let mut b = vec![t, major, minor];
        b.extend_from_slice(&len.to_be_bytes());
        b.push(hs);
        b.extend_from_slice(&hl);
        b.extend_from_slice(&rest);
        let hello_len = usize::from(hl[0]) << 16 | usize::from(hl[1]) << 8 | usize::from(hl[2]);
        let plausible = major == 3 && minor <= 4 && len > 0 && usize::from(len) <= MAX_TLS_RECORD
            && hs == 1 && 4 + hello_len <= usize::from(len) && b.len() < 9 + hello_len;
        if tls_sni(&b) == Sniff::NeedMore {
            prop_assert!(plausible, "{:?}", &b[..9]);
        }
    }

    #[test]
    fn mutated_corpus_inputs_never_panic_and_decide_for_good(
        seed in any::<prop::sample::Index>(),
        edits in edits(),
        more in prop::collection::vec(any::<u8>(), 0..32),
    ) {
        let tls = tls_corpus();
        let http = http_corpus();
        let all: Vec<_> = tls.iter().map(|c| (tls_sni as fn(&[u8]) -> Sniff, &c.1))
            .chain(http.iter().map(|c| (http_host as fn(&[u8]) -> Sniff, &c.1)))
            .collect();
        let (f, bytes) = all[seed.index(all.len())];
        let input = mutate(bytes.clone(), &edits);
        check_final(f, &input, &more)?;
        let _ = sniff(&input);
    }

    #[test]
    fn inputs_that_reach_the_limit_are_decided(
        seed in any::<prop::sample::Index>(),
        fill in any::<u8>(),
    ) {
        // A valid start that never ends: padding past the limit must give an answer.
        let starts: [&[u8]; 3] = [
            b"GET / HTTP/1.1\r\nX: ",
            b"\x16\x03\x01\x40\x00\x01\x00\x3f\xfc\x03\x03",
            b"GET /",
        ];
        let mut b = starts[seed.index(starts.len())].to_vec();
        b.resize(MAX_SNIFF_BYTES, fill);
        prop_assert_ne!(tls_sni(&b), Sniff::NeedMore);
        prop_assert_ne!(http_host(&b), Sniff::NeedMore);
        prop_assert_ne!(sniff(&b), Sniffed::NeedMore);
    }

    #[test]
    fn valid_hellos_name_their_host_at_their_last_byte(
        (name, normal) in dns_name(),
        pad in 0usize..600,
        cut in any::<prop::sample::Index>(),
    ) {
        let b = hello(&[(0, name.as_bytes())], pad);
        prop_assert_eq!(tls_sni(&b), Sniff::Name(normal.clone()));
        prop_assert_eq!(sniff(&b), Sniffed::Sni(normal));
        prop_assert_eq!(tls_sni(&b[..cut.index(b.len())]), Sniff::NeedMore);
    }

    #[test]
    fn valid_requests_name_their_host_at_their_last_byte(
        (name, normal) in dns_name(),
        port in prop::option::of(any::<u16>()),
        method in "[A-Z]{1,10}",
        path in "/[!-~]{0,40}",
        headers in prop::collection::vec(("[A-Za-z0-9-]{1,20}", "[ -~]{0,40}"), 0..8),
        host_at in any::<prop::sample::Index>(),
        lf_only in any::<bool>(),
        cut in any::<prop::sample::Index>(),
    ) {
        let eol = if lf_only { "\n" } else { "\r\n" };
        let host = match port {
            Some(p) => format!("Host: {name}:{p}"),
            None => format!("hOST:{name}"),
        };
        let mut lines: Vec<String> = headers.iter()
            .filter(|(k, _)| !k.eq_ignore_ascii_case("host"))
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        lines.insert(host_at.index(lines.len() + 1), host);
        // A method "CONNECT" takes its name from the target, here a path: skip it.
        prop_assume!(method != "CONNECT");
        let req = format!("{method} {path} HTTP/1.1{eol}{}{eol}{eol}", lines.join(eol));
        let b = req.as_bytes();
        prop_assert_eq!(http_host(b), Sniff::Name(normal.clone()), "{}", req);
        prop_assert_eq!(sniff(b), Sniffed::Host(normal));
        prop_assert_eq!(http_host(&b[..cut.index(b.len())]), Sniff::NeedMore);
    }
}
