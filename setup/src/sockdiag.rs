//! Which sockets exist in this network namespace, from the kernel's `sock_diag`
//! netlink interface (what `ss` uses), so that `setup status` can tell whether an
//! engine really listens where the rules send traffic.
//!
//! `/proc/net/{tcp,udp}[6]` name the port and state of every socket but neither
//! `IP_TRANSPARENT` nor `IPV6_V6ONLY`, and both decide delivery: nft `tproxy` only
//! assigns packets to a transparent socket (`nf_tproxy_get_sock_v4` /
//! `nft_tproxy.c`), and an IPv6 socket on `[::]` takes IPv4 traffic only when it is
//! not v6-only. `sock_diag` reports both: `INET_DIAG_SKV6ONLY` for listening and
//! unconnected sockets, and `INET_DIAG_SOCKOPT` (Linux 5.10) with the transparent bit.
//!
//! The request is built and the reply parsed here as plain bytes (no unsafe); the
//! socket calls go through `nix`.

use crate::plan::{Family, L4};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// `SOCK_DIAG_BY_FAMILY`: the message type of requests and replies.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `NLMSG_ERROR` / `NLMSG_DONE`.
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
/// `NLM_F_REQUEST | NLM_F_DUMP` (`NLM_F_ROOT | NLM_F_MATCH`).
const DUMP_FLAGS: u16 = 0x1 | 0x300;
/// `struct nlmsghdr`.
const NLMSG_HDR_LEN: usize = 16;
/// `struct inet_diag_msg`.
const DIAG_MSG_LEN: usize = 72;
/// `struct inet_diag_req_v2`.
const REQ_LEN: usize = 56;
/// Attribute types of `enum { INET_DIAG_NONE, ... }` in `linux/inet_diag.h`.
const INET_DIAG_SKV6ONLY: u16 = 11;
const INET_DIAG_SOCKOPT: u16 = 22;
/// `TCP_LISTEN` and `TCP_CLOSE` (an unbound-peer UDP socket shows `TCP_CLOSE`).
pub const STATE_LISTEN: u8 = 10;
/// See [`STATE_LISTEN`].
pub const STATE_CLOSE: u8 = 7;

/// One socket as the kernel describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiagSocket {
    /// The socket's own family (an IPv4 connection on a dual-stack socket still says V6).
    pub family: Family,
    /// TCP or UDP.
    pub l4: L4,
    /// The TCP state number (`TCP_LISTEN` = 10, `TCP_CLOSE` = 7, ...).
    pub state: u8,
    /// The bound address.
    pub addr: IpAddr,
    /// The bound port.
    pub port: u16,
    /// `IPV6_V6ONLY`; `None` when the kernel did not say (IPv4 sockets, old kernels).
    pub v6only: Option<bool>,
    /// `IP_TRANSPARENT` / `IPV6_TRANSPARENT`; `None` before Linux 5.10.
    pub transparent: Option<bool>,
    /// The socket inode (as in `/proc/PID/fd` links `socket:[N]`).
    pub inode: u32,
}

impl DiagSocket {
    /// Bound to the wildcard address (`0.0.0.0` / `::`).
    pub fn is_wildcard(&self) -> bool {
        self.addr.is_unspecified()
    }

    /// Whether this socket can take packets tproxy hands to `port` for `family`: a
    /// listening TCP / unconnected UDP socket on the wildcard address, of that family
    /// or a dual-stack IPv6 socket for IPv4. Transparency is checked separately.
    pub fn serves(&self, l4: L4, family: Family, port: u16) -> bool {
        let state_ok = match l4 {
            L4::Tcp => self.state == STATE_LISTEN,
            L4::Udp => self.state == STATE_CLOSE,
        };
        let family_ok = self.family == family
            || (family == Family::V4 && self.family == Family::V6 && self.v6only == Some(false));
        self.l4 == l4 && self.port == port && state_ok && family_ok && self.is_wildcard()
    }
}

/// The request for every socket of one family and protocol (`states`: a bit per TCP
/// state, `1 << STATE_LISTEN` for listeners, `u32::MAX` for all).
pub fn dump_request(family: Family, l4: L4, states: u32, seq: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(NLMSG_HDR_LEN + REQ_LEN);
    b.extend_from_slice(&((NLMSG_HDR_LEN + REQ_LEN) as u32).to_ne_bytes());
    b.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    b.extend_from_slice(&DUMP_FLAGS.to_ne_bytes());
    b.extend_from_slice(&seq.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel fills it in
    b.push(af(family));
    b.push(match l4 {
        L4::Tcp => 6,  // IPPROTO_TCP
        L4::Udp => 17, // IPPROTO_UDP
    });
    b.push(0); // idiag_ext: no extra info needed (SOCKOPT and V6ONLY come anyway)
    b.push(0); // pad
    b.extend_from_slice(&states.to_ne_bytes());
    b.extend_from_slice(&[0u8; 48]); // struct inet_diag_sockid: match everything
    b
}

fn af(family: Family) -> u8 {
    match family {
        Family::V4 => 2,  // AF_INET
        Family::V6 => 10, // AF_INET6
    }
}

/// What one receive buffer held: sockets, and whether the dump is complete.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    /// The sockets described.
    pub sockets: Vec<DiagSocket>,
    /// `NLMSG_DONE` was seen.
    pub done: bool,
}

/// Parses a buffer of netlink messages from a `sock_diag` dump.
pub fn parse_dump(buf: &[u8], l4: L4) -> io::Result<Parsed> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("sock_diag: {what}"));
    let mut out = Parsed::default();
    let mut off = 0;
    while off + NLMSG_HDR_LEN <= buf.len() {
        let len = u32_at(buf, off) as usize;
        let kind = u16_at(buf, off + 4);
        if len < NLMSG_HDR_LEN || off + len > buf.len() {
            return Err(bad("truncated message"));
        }
        let body = &buf[off + NLMSG_HDR_LEN..off + len];
        match kind {
            NLMSG_DONE => {
                out.done = true;
                return Ok(out);
            }
            NLMSG_ERROR => {
                let errno = body
                    .get(..4)
                    .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                    .ok_or_else(|| bad("short error message"))?;
                return Err(io::Error::from_raw_os_error(-errno));
            }
            SOCK_DIAG_BY_FAMILY => out
                .sockets
                .push(parse_msg(body, l4).ok_or_else(|| bad("short socket message"))?),
            _ => {}
        }
        off += align4(len);
    }
    Ok(out)
}

fn parse_msg(body: &[u8], l4: L4) -> Option<DiagSocket> {
    if body.len() < DIAG_MSG_LEN {
        return None;
    }
    let family = match body[0] {
        2 => Family::V4,
        10 => Family::V6,
        _ => return None,
    };
    let state = body[1];
    // struct inet_diag_sockid at offset 4: sport, dport (big endian), src[16], dst[16].
    let port = u16::from_be_bytes([body[4], body[5]]);
    let src = &body[8..24];
    let addr = match family {
        Family::V4 => IpAddr::V4(Ipv4Addr::new(src[0], src[1], src[2], src[3])),
        Family::V6 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(src);
            IpAddr::V6(Ipv6Addr::from(a))
        }
    };
    let inode = u32_at(body, 68);
    let mut sock = DiagSocket {
        family,
        l4,
        state,
        addr,
        port,
        v6only: None,
        transparent: None,
        inode,
    };
    let mut off = DIAG_MSG_LEN;
    while off + 4 <= body.len() {
        let alen = u16_at(body, off) as usize;
        let atype = u16_at(body, off + 2) & 0x3fff; // drop NLA_F_NESTED / NET_BYTEORDER
        if alen < 4 || off + alen > body.len() {
            break;
        }
        let data = &body[off + 4..off + alen];
        match atype {
            INET_DIAG_SKV6ONLY if !data.is_empty() => sock.v6only = Some(data[0] != 0),
            INET_DIAG_SOCKOPT if !data.is_empty() => {
                sock.transparent = Some(data[0] & TRANSPARENT_BIT != 0)
            }
            _ => {}
        }
        off += align4(alen);
    }
    Some(sock)
}

/// `struct inet_diag_sockopt` starts with the bitfields `recverr:1, is_icsk:1,
/// freebind:1, hdrincl:1, mc_loop:1, transparent:1, ...` in one byte; GCC allocates
/// bitfields from the least significant bit on little-endian targets and from the
/// most significant one on big-endian targets.
#[cfg(target_endian = "little")]
const TRANSPARENT_BIT: u8 = 1 << 5;
#[cfg(target_endian = "big")]
const TRANSPARENT_BIT: u8 = 1 << 2;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_ne_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// Dumps the sockets of one family and protocol of this network namespace
/// (equivalent to `ss -ln` with `-t`/`-u` and `-4`/`-6`). Listening TCP sockets only;
/// every UDP socket.
pub fn dump(family: Family, l4: L4) -> io::Result<Vec<DiagSocket>> {
    use nix::sys::socket::{
        recv, sendto, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol,
        SockType,
    };
    use std::os::fd::AsRawFd;
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )
    .map_err(io::Error::from)?;
    let states = match l4 {
        L4::Tcp => 1 << STATE_LISTEN,
        L4::Udp => u32::MAX,
    };
    let req = dump_request(family, l4, states, 1);
    sendto(
        fd.as_raw_fd(),
        &req,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )
    .map_err(io::Error::from)?;
    let mut sockets = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "sock_diag: socket closed before the dump ended",
            ));
        }
        let parsed = parse_dump(&buf[..n], l4)?;
        sockets.extend(parsed.sockets);
        if parsed.done {
            return Ok(sockets);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One reply message as the kernel writes it: header, inet_diag_msg, attributes.
    fn msg(family: u8, state: u8, port: u16, addr: &[u8], attrs: &[(u16, &[u8])]) -> Vec<u8> {
        let mut body = vec![family, state, 0, 0];
        body.extend_from_slice(&port.to_be_bytes());
        body.extend_from_slice(&0u16.to_be_bytes());
        let mut src = [0u8; 16];
        src[..addr.len()].copy_from_slice(addr);
        body.extend_from_slice(&src);
        body.extend_from_slice(&[0u8; 16]); // dst
        body.extend_from_slice(&[0u8; 12]); // if, cookie
        body.extend_from_slice(&[0u8; 16]); // expires, rqueue, wqueue, uid
        body.extend_from_slice(&4242u32.to_ne_bytes()); // inode
        assert_eq!(body.len(), DIAG_MSG_LEN);
        for (t, data) in attrs {
            body.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
            body.extend_from_slice(&t.to_ne_bytes());
            body.extend_from_slice(data);
            while body.len() % 4 != 0 {
                body.push(0);
            }
        }
        let mut m = Vec::new();
        m.extend_from_slice(&((NLMSG_HDR_LEN + body.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        m.extend_from_slice(&2u16.to_ne_bytes());
        m.extend_from_slice(&[0u8; 8]);
        m.extend_from_slice(&body);
        m
    }

    fn done() -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&20u32.to_ne_bytes());
        m.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
        m.extend_from_slice(&[0u8; 10]);
        m.extend_from_slice(&0i32.to_ne_bytes());
        m
    }

    #[test]
    fn request_layout() {
        let r = dump_request(Family::V6, L4::Udp, u32::MAX, 7);
        assert_eq!(r.len(), 72);
        assert_eq!(u32_at(&r, 0), 72);
        assert_eq!(u16_at(&r, 4), 20);
        assert_eq!(u16_at(&r, 6), 0x301);
        assert_eq!(u32_at(&r, 8), 7);
        assert_eq!(&r[16..20], &[10, 17, 0, 0]);
        assert_eq!(u32_at(&r, 20), u32::MAX);
    }

    #[test]
    fn parses_sockets_and_options() {
        let sockopt = [TRANSPARENT_BIT, 0];
        let mut buf = msg(
            2,
            STATE_LISTEN,
            15001,
            &[0, 0, 0, 0],
            &[(8, &[0]), (INET_DIAG_SOCKOPT, &sockopt)],
        );
        buf.extend(msg(
            10,
            STATE_LISTEN,
            15001,
            &[0; 16],
            &[(INET_DIAG_SKV6ONLY, &[0]), (INET_DIAG_SOCKOPT, &[0, 0])],
        ));
        buf.extend(msg(2, STATE_CLOSE, 53, &[127, 0, 0, 1], &[]));
        buf.extend(done());
        let p = parse_dump(&buf, L4::Tcp).unwrap();
        assert!(p.done);
        assert_eq!(p.sockets.len(), 3);
        let a = &p.sockets[0];
        assert_eq!(
            (a.family, a.port, a.transparent, a.v6only, a.inode),
            (Family::V4, 15001, Some(true), None, 4242)
        );
        assert!(a.serves(L4::Tcp, Family::V4, 15001));
        assert!(!a.serves(L4::Tcp, Family::V6, 15001));
        // A dual-stack [::] listener takes IPv4 too; it is not transparent.
        let b = &p.sockets[1];
        assert_eq!((b.v6only, b.transparent), (Some(false), Some(false)));
        assert!(b.serves(L4::Tcp, Family::V4, 15001) && b.serves(L4::Tcp, Family::V6, 15001));
        let c = &p.sockets[2];
        assert_eq!(c.addr, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert!(
            !c.serves(L4::Udp, Family::V4, 53),
            "not the wildcard address"
        );
        assert_eq!(c.transparent, None, "no SOCKOPT attribute: unknown");
    }

    /// The real kernel: a listener this test opens shows up, not transparent.
    #[test]
    fn dump_finds_our_own_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let found = dump(Family::V4, L4::Tcp).expect("sock_diag dump");
        let me = found.iter().find(|s| s.port == port).expect("our listener");
        assert_eq!(me.state, STATE_LISTEN);
        assert_eq!(me.addr, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(me.transparent, Some(false));
        let u = std::net::UdpSocket::bind("[::]:0").unwrap();
        let uport = u.local_addr().unwrap().port();
        let found = dump(Family::V6, L4::Udp).expect("sock_diag dump");
        let me = found
            .iter()
            .find(|s| s.port == uport)
            .expect("our UDP socket");
        assert!(me.is_wildcard() && me.state == STATE_CLOSE);
        assert!(me.v6only.is_some());
    }

    #[test]
    fn errors_are_os_errors() {
        let mut m = Vec::new();
        m.extend_from_slice(&36u32.to_ne_bytes());
        m.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        m.extend_from_slice(&[0u8; 10]);
        m.extend_from_slice(&(-2i32).to_ne_bytes());
        m.extend_from_slice(&[0u8; 16]);
        let e = parse_dump(&m, L4::Udp).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(2));
        assert!(parse_dump(&[1, 0, 0, 0, 20, 0], L4::Udp)
            .unwrap()
            .sockets
            .is_empty());
        let mut short = msg(2, 10, 1, &[0; 4], &[]);
        short.truncate(40);
        assert!(parse_dump(&short, L4::Tcp).is_err());
    }
}
