//! Property tests of the cmsg decoder: the control area and the name area of every
//! received datagram are bytes the kernel wrote on behalf of a remote sender, so the
//! parser must hold up against anything.
//!
//! Properties: arbitrary bytes and mutations of valid control buffers never panic,
//! [`CmsgIter`] agrees with an independent model walk (so it never yields data
//! outside the buffer and stops at the first bad header), [`decode`] picks exactly
//! the first well-formed `*_ORIGDSTADDR`, a valid buffer round-trips to the address
//! it encodes, and a cut buffer or `MSG_CTRUNC` never gives an address.
//!
//! The default case count keeps the unit suite fast; a long run sets
//! PROPTEST_CASES, e.g.
//!   PROPTEST_CASES=100000 cargo test -p ringrelay-engine --release sys::cmsg
//! (failures are shrunk and saved under engine/proptest-regressions/).
//!
//! The seed corpus is engine/tests/corpus/cmsg/ (x86_64/aarch64 layout: 64-bit
//! little-endian `cmsg_len`); its EXPECT file says what each seed decodes to.

use super::*;
use crate::policy::sniff::tests::{config, mutate};
use proptest::prelude::*;
use std::ops::Range;

/// A `sockaddr_in` written field by field, independently of the encoder.
fn raw_in(a: &SocketAddrV4) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&AF_INET.to_ne_bytes());
    b.extend_from_slice(&a.port().to_be_bytes());
    b.extend_from_slice(&a.ip().octets());
    b.extend_from_slice(&[0; 8]);
    b
}

/// A `sockaddr_in6` written field by field, independently of the encoder.
fn raw_in6(a: &SocketAddrV6) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&AF_INET6.to_ne_bytes());
    b.extend_from_slice(&a.port().to_be_bytes());
    b.extend_from_slice(&a.flowinfo().to_ne_bytes());
    b.extend_from_slice(&a.ip().octets());
    b.extend_from_slice(&a.scope_id().to_ne_bytes());
    b
}

/// The ORIGDSTADDR cmsg carrying `addr` (the kernel's choice of level by family).
fn origdst(addr: &SocketAddr) -> (i32, i32, Vec<u8>) {
    match addr {
        SocketAddr::V4(a) => (libc::IPPROTO_IP, libc::IP_ORIGDSTADDR, raw_in(a)),
        SocketAddr::V6(a) => (libc::IPPROTO_IPV6, libc::IPV6_ORIGDSTADDR, raw_in6(a)),
    }
}

/// What the decoders must give for `addr`: IPv4-mapped IPv6 becomes IPv4.
fn normalised(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, a.port())),
            None => addr,
        },
        v4 => v4,
    }
}

/// The cmsg walk written plainly, as the reference: `(level, type, data range)`.
fn model(buf: &[u8]) -> Vec<(i32, i32, Range<usize>)> {
    let mut out = Vec::new();
    let mut off = 0;
    while buf.len() - off >= HDR_LEN {
        let len = usize::from_ne_bytes(buf[off..off + 8].try_into().unwrap());
        if len < HDR_LEN || len > buf.len() - off {
            break;
        }
        let level = i32::from_ne_bytes(buf[off + 8..off + 12].try_into().unwrap());
        let ty = i32::from_ne_bytes(buf[off + 12..off + 16].try_into().unwrap());
        out.push((level, ty, off + HDR_LEN..off + len));
        off += cmsg_align(len);
        if off >= buf.len() {
            break;
        }
    }
    out
}

/// The reference answer of `decode(buf, flags)`.
fn model_decode(buf: &[u8], flags: i32) -> RecvMeta {
    if flags & libc::MSG_CTRUNC != 0 {
        return RecvMeta {
            orig_dst: None,
            truncated_ctrl: true,
        };
    }
    let want = |data: &[u8], family, min| {
        data.len() >= min && data[..2] == libc::sa_family_t::to_ne_bytes(family)
    };
    let orig_dst = model(buf).into_iter().find_map(|(level, ty, r)| {
        let data = &buf[r];
        let ok = match (level, ty) {
            (libc::IPPROTO_IP, libc::IP_ORIGDSTADDR) => want(data, AF_INET, 16),
            (libc::IPPROTO_IPV6, libc::IPV6_ORIGDSTADDR) => want(data, AF_INET6, 28),
            _ => false,
        };
        ok.then(|| decode_sockaddr(data)).flatten()
    });
    RecvMeta {
        orig_dst,
        truncated_ctrl: false,
    }
}

/// Every invariant on one buffer: no panic, the iterator is the model (so each data
/// slice lies inside `buf`), decode is the model's, decode_sockaddr is sane.
fn check(buf: &[u8], flags: i32) -> Result<(), TestCaseError> {
    let base = buf.as_ptr() as usize;
    let got: Vec<(i32, i32, Range<usize>)> = CmsgIter::new(buf)
        .map(|(level, ty, data)| {
            let start = data.as_ptr() as usize - base;
            (level, ty, start..start + data.len())
        })
        .collect();
    for (_, _, r) in &got {
        prop_assert!(
            r.end <= buf.len(),
            "data {r:?} past a {}-byte buffer",
            buf.len()
        );
    }
    prop_assert_eq!(&got, &model(buf));
    // Fused: once over, over for good.
    let mut it = CmsgIter::new(buf);
    it.by_ref().for_each(drop);
    prop_assert_eq!(it.next(), None);
    prop_assert_eq!(decode(buf, flags), model_decode(buf, flags));
    if let Some(a) = decode_sockaddr(buf) {
        let min = if a.is_ipv4() { 16 } else { 28 };
        prop_assert!(buf.len() >= min);
        prop_assert_eq!(Some(a), decode_sockaddr(&buf[..buf.len().min(28)]));
    }
    Ok(())
}

fn any_addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        any::<([u8; 4], u16)>().prop_map(|(ip, port)| SocketAddr::from((ip, port))),
        any::<([u8; 16], u16, u32, u32)>().prop_map(|(ip, port, flow, scope)| {
            SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(ip), port, flow, scope))
        }),
        // IPv4-mapped IPv6, which must come back as IPv4.
        any::<([u8; 4], u16)>().prop_map(|(ip, port)| {
            SocketAddr::new(Ipv4Addr::from(ip).to_ipv6_mapped().into(), port)
        }),
    ]
}

/// Unrelated cmsgs (SO_TIMESTAMP-like, odd sizes) that decode must skip.
fn other_cmsgs() -> impl Strategy<Value = Vec<(i32, i32, Vec<u8>)>> {
    let one = (
        prop_oneof![Just(libc::SOL_SOCKET), Just(libc::IPPROTO_IP), 100..200i32],
        prop_oneof![
            Just(libc::SCM_TIMESTAMP),
            Just(libc::IP_PKTINFO),
            200..300i32
        ],
        prop::collection::vec(any::<u8>(), 0..40),
    );
    prop::collection::vec(one, 0..3)
}

fn build(cmsgs: &[(i32, i32, Vec<u8>)]) -> Vec<u8> {
    let refs: Vec<(i32, i32, &[u8])> = cmsgs.iter().map(|(l, t, d)| (*l, *t, &d[..])).collect();
    build_control(&refs)
}

/// A valid control area: `before`, then the ORIGDSTADDR of `addr`, then `after`.
fn valid(
    before: &[(i32, i32, Vec<u8>)],
    addr: &SocketAddr,
    after: &[(i32, i32, Vec<u8>)],
) -> Vec<u8> {
    let mut all = before.to_vec();
    all.push(origdst(addr));
    all.extend_from_slice(after);
    build(&all)
}

/// `(file name, bytes, flags, expected)` for every seed, from the corpus's EXPECT.
fn corpus() -> Vec<(String, Vec<u8>, i32, Option<SocketAddr>)> {
    let base = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/corpus/cmsg");
    let expect = std::fs::read_to_string(format!("{base}/EXPECT")).unwrap();
    let mut out = Vec::new();
    for line in expect
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let w: Vec<&str> = line.split_whitespace().collect();
        let flags = match w.get(2) {
            Some(&"ctrunc") => libc::MSG_CTRUNC,
            None => 0,
            Some(other) => panic!("EXPECT: unknown flag {other:?} in {line:?}"),
        };
        let want = match w[1] {
            "-" => None,
            a => Some(a.parse().unwrap()),
        };
        let bytes = std::fs::read(format!("{base}/{}", w[0])).unwrap();
        out.push((w[0].to_string(), bytes, flags, want));
    }
    // Every seed says what it decodes to.
    for entry in std::fs::read_dir(base).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(
            name == "EXPECT" || out.iter().any(|(n, ..)| *n == name),
            "{name} is not listed in EXPECT"
        );
    }
    out
}

#[test]
fn corpus_seeds_decode_as_expected() {
    let seeds = corpus();
    assert!(seeds.len() >= 10);
    for (name, bytes, flags, want) in seeds {
        let meta = decode(&bytes, flags);
        assert_eq!(meta.orig_dst, want, "{name}");
        assert_eq!(meta.truncated_ctrl, flags != 0, "{name}");
        check(&bytes, flags).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn random_bytes_match_the_model(
        buf in prop::collection::vec(any::<u8>(), 0..160),
        flags in any::<i32>(),
    ) {
        check(&buf, flags)?;
        check(&buf, flags & !libc::MSG_CTRUNC)?;
    }

    /// Random bytes behind a plausible header, so that the walk gets past it.
    #[test]
    fn random_data_behind_headers_matches_the_model(
        parts in prop::collection::vec(
            (0..80usize, any::<i32>(), any::<i32>(), prop::collection::vec(any::<u8>(), 0..48)),
            1..4,
        ),
    ) {
        let mut buf = Vec::new();
        for (len, level, ty, data) in parts {
            let level = if level % 3 == 0 { libc::IPPROTO_IPV6 } else { level };
            buf.extend_from_slice(&len.to_ne_bytes());
            buf.extend_from_slice(&level.to_ne_bytes());
            buf.extend_from_slice(&ty.to_ne_bytes());
            buf.extend_from_slice(&data);
        }
        check(&buf, 0)?;
    }

    #[test]
    fn valid_buffers_round_trip(
        addr in any_addr(),
        before in other_cmsgs(),
        after in other_cmsgs(),
        unpadded in any::<bool>(),
        shift in 0..8usize,
    ) {
        let want = normalised(addr);
        let mut buf = valid(&before, &addr, &after);
        if unpadded && after.is_empty() {
            // The kernel writes only CMSG_LEN bytes when that is all the room left.
            let data = origdst(&addr).2.len();
            buf.truncate(buf.len() - (cmsg_space(data) - cmsg_len(data)));
        }
        // Any start alignment: the parser reads bytes, never a pointer.
        let mut shifted = vec![0xa5; shift];
        shifted.extend_from_slice(&buf);
        let buf = &shifted[shift..];
        prop_assert_eq!(decode(buf, 0), RecvMeta { orig_dst: Some(want), truncated_ctrl: false });
        prop_assert_eq!(CmsgIter::new(buf).count(), before.len() + 1 + after.len());
        // Other flags do not matter; MSG_CTRUNC is reported and the address ignored.
        prop_assert_eq!(decode(buf, libc::MSG_TRUNC).orig_dst, Some(want));
        prop_assert_eq!(
            decode(buf, libc::MSG_CTRUNC),
            RecvMeta { orig_dst: None, truncated_ctrl: true }
        );
        // The name area: the bare address, as the kernel writes it or in a bigger buffer.
        let mut name = origdst(&addr).2;
        prop_assert_eq!(decode_sockaddr(&name), Some(want));
        name.resize(size_of::<libc::sockaddr_storage>(), 0);
        prop_assert_eq!(decode_sockaddr(&name), Some(want));
        check(buf, 0)?;
    }

    /// A cut control area never yields a (possibly wrong) address, and a cut name
    /// area never yields one either.
    #[test]
    fn truncation_never_gives_an_address(
        addr in any_addr(),
        before in other_cmsgs(),
        cut in any::<prop::sample::Index>(),
    ) {
        let buf = valid(&before, &addr, &[]);
        let data = origdst(&addr).2.len();
        let full = buf.len() - cmsg_space(data) + cmsg_len(data);
        let at = cut.index(full);
        prop_assert_eq!(decode(&buf[..at], 0), RecvMeta::default());
        prop_assert_eq!(decode(&buf[..full], 0).orig_dst, Some(normalised(addr)));
        let name = origdst(&addr).2;
        prop_assert_eq!(decode_sockaddr(&name[..cut.index(name.len())]), None);
        check(&buf[..at], 0)?;
    }

    /// cmsg_len of one message set to 0, tiny, off by a few, past the end or huge.
    #[test]
    fn bad_cmsg_len_stops_the_walk(
        addr in any_addr(),
        before in other_cmsgs(),
        which in any::<prop::sample::Index>(),
        bad in prop_oneof![
            Just(0usize),
            1..HDR_LEN,
            Just(usize::MAX),
            (usize::MAX - 64)..=usize::MAX,
            any::<usize>(),
            200..100_000usize,
        ],
    ) {
        let buf = valid(&before, &addr, &[]);
        let starts: Vec<usize> = model(&buf)
            .iter()
            .map(|(_, _, r)| r.start - HDR_LEN)
            .collect();
        let at = starts[which.index(starts.len())];
        let mut bent = buf.clone();
        bent[at..at + 8].copy_from_slice(&bad.to_ne_bytes());
        check(&bent, 0)?;
        if bad < HDR_LEN || bad > buf.len() - at {
            // The walk ends at the bad header: what came before it survives.
            let seen = CmsgIter::new(&bent).count();
            prop_assert_eq!(seen, starts.iter().position(|&s| s == at).unwrap());
        }
    }

    /// Random edits (flips, inserts, deletes, cuts, duplication) of valid buffers and
    /// of the corpus seeds, at any alignment.
    #[test]
    fn mutated_buffers_match_the_model(
        addr in any_addr(),
        before in other_cmsgs(),
        seed in any::<prop::sample::Index>(),
        edits in prop::collection::vec(any::<(u8, usize, u8)>(), 0..6),
        shift in 0..8usize,
        flags in any::<i32>(),
    ) {
        let corpus = corpus();
        let (_, seed_bytes, ..) = &corpus[seed.index(corpus.len())];
        for start in [valid(&before, &addr, &[]), seed_bytes.clone()] {
            let mut shifted = vec![0; shift];
            shifted.extend(mutate(start, &edits));
            check(&shifted[shift..], flags)?;
            check(&shifted[shift..], 0)?;
        }
    }
}
