//! A tiny typed codec for socket addresses and control messages (cmsgs).
//!
//! The UDP data plane learns a datagram's original destination from the
//! `IP_ORIGDSTADDR` / `IPV6_ORIGDSTADDR` control message (enabled with
//! `IP_RECVORIGDSTADDR` / `IPV6_RECVORIGDSTADDR`, Linux 2.6.29+) and its source
//! from the `msg_name` area. With multishot `IORING_OP_RECVMSG` (Linux 6.0+)
//! both arrive as plain bytes inside a provided buffer
//! (`io_uring_recvmsg_out`, then `msg_namelen` name bytes, then
//! `msg_controllen` control bytes, then the payload), so this module parses
//! byte slices and never dereferences a pointer:
//!
//! * [`CmsgIter`] walks the control area the way the kernel wrote it: a
//!   `struct cmsghdr` (`__kernel_size_t cmsg_len; int cmsg_level; int
//!   cmsg_type;`, native endian) followed by the data, each message padded to
//!   `CMSG_ALIGN` (a multiple of `sizeof(long)`). It is robust against
//!   malformed input: it never reads out of bounds, never panics and stops at
//!   the first header whose `cmsg_len` is too small or runs past the buffer.
//! * [`decode`] matches `(level, type)` into a plain [`RecvMeta`].
//! * [`decode_sockaddr`] / [`encode_sockaddr`] convert between `SocketAddr`
//!   and `sockaddr_in` / `sockaddr_in6` bytes.
//!
//! IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are normalised to IPv4
//! everywhere: a dual-stack `[::]` socket reports an IPv4 peer that way, and
//! the flow table must key the same client identically whichever socket
//! received its datagram; the upstream socket for an IPv4 server must also be
//! an `AF_INET` socket bound and connected with IPv4 addresses.
//!
//! The only `unsafe` here builds a `sockaddr_storage` in [`encode_sockaddr`]
//! (the struct has private padding fields, so it cannot be written as a
//! literal); parsing is done with `from_ne_bytes`/`from_be_bytes` on slices.

use std::mem::{offset_of, size_of};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// `CMSG_ALIGN` granularity: the kernel aligns to `sizeof(long)`, glibc to
/// `sizeof(size_t)`; both equal `size_of::<usize>()` on Linux.
const CMSG_ALIGN_TO: usize = size_of::<usize>();

/// Size of the kernel's `struct cmsghdr`: `cmsg_len` is a `__kernel_size_t`
/// (the width of `usize`), then `cmsg_level` and `cmsg_type` are `int`s.
const HDR_LEN: usize = size_of::<usize>() + 2 * size_of::<i32>();

/// Offset of the data in a control message: `CMSG_DATA(cmsg) - cmsg`.
const DATA_OFFSET: usize = cmsg_align(HDR_LEN);

/// Offsets of the header fields inside `struct cmsghdr`.
const LEVEL_OFFSET: usize = size_of::<usize>();
const TYPE_OFFSET: usize = LEVEL_OFFSET + size_of::<i32>();

// The parser reads the kernel ABI layout directly; make sure the libc
// definition agrees with it, so that the builder in the tests and the libc
// `CMSG_*` macros describe the same bytes.
const _: () = assert!(size_of::<libc::cmsghdr>() == HDR_LEN);
const _: () = assert!(offset_of!(libc::cmsghdr, cmsg_level) == LEVEL_OFFSET);
const _: () = assert!(offset_of!(libc::cmsghdr, cmsg_type) == TYPE_OFFSET);
const _: () = assert!(DATA_OFFSET == HDR_LEN);

/// `AF_INET` as stored in `sa_family_t` (an unsigned 16-bit field on Linux).
const AF_INET: libc::sa_family_t = libc::AF_INET as libc::sa_family_t;
/// `AF_INET6` as stored in `sa_family_t`.
const AF_INET6: libc::sa_family_t = libc::AF_INET6 as libc::sa_family_t;

/// Bytes of control buffer to reserve per received datagram.
///
/// This is `CMSG_SPACE(sizeof(struct sockaddr_in6))` = 16 + 32 = 48 bytes on
/// x86_64: room for one `IPV6_ORIGDSTADDR` cmsg, which is also enough for the
/// smaller `IP_ORIGDSTADDR` one (`CMSG_SPACE(16)` = 32). `CMSG_SPACE` already
/// rounds the data up to `CMSG_ALIGN`, so no further rounding is needed. One
/// datagram carries only one of the two: on a dual-stack socket an IPv4
/// datagram gets only the IPv4 cmsg (`udpv6_recvmsg`). If more cmsg types are
/// ever enabled this must grow; until then the kernel would report
/// `MSG_CTRUNC`, which [`decode`] surfaces as [`RecvMeta::truncated_ctrl`].
pub const CONTROL_LEN: usize = max(
    cmsg_space(size_of::<libc::sockaddr_in6>()),
    cmsg_space(size_of::<libc::sockaddr_in>()),
);
const _: () = assert!(CONTROL_LEN >= 48, "an IPV6_ORIGDSTADDR cmsg needs 48 bytes");

const fn max(a: usize, b: usize) -> usize {
    if a > b {
        a
    } else {
        b
    }
}

/// `CMSG_ALIGN(len)`: round up to the cmsg alignment.
const fn cmsg_align(len: usize) -> usize {
    (len + CMSG_ALIGN_TO - 1) & !(CMSG_ALIGN_TO - 1)
}

/// `CMSG_SPACE(data_len)`: bytes one control message occupies in the buffer,
/// trailing padding included.
const fn cmsg_space(data_len: usize) -> usize {
    DATA_OFFSET + cmsg_align(data_len)
}

/// `CMSG_SPACE(data_len)`, for building control areas outside this module.
pub const fn space_of(data_len: usize) -> usize {
    cmsg_space(data_len)
}

/// `CMSG_LEN(data_len)`: the value of `cmsg_len` for `data_len` data bytes
/// (header and data, without trailing padding).
#[cfg(test)]
const fn cmsg_len(data_len: usize) -> usize {
    DATA_OFFSET + data_len
}

/// Reads `N` bytes at `at`, or `None` if they are not all inside `bytes`.
fn read_array<const N: usize>(bytes: &[u8], at: usize) -> Option<[u8; N]> {
    bytes.get(at..at.checked_add(N)?)?.try_into().ok()
}

/// Iterator over the control messages in a control area, yielding
/// `(cmsg_level, cmsg_type, data)`.
///
/// Follows `CMSG_FIRSTHDR`/`CMSG_NXTHDR`: each header starts at a
/// `CMSG_ALIGN`ed offset, the data is `cmsg_len - CMSG_LEN(0)` bytes after the
/// header. The last message may lack its trailing padding (the kernel writes
/// exactly `CMSG_LEN` bytes when that is all the room left). Iteration stops,
/// for good, at a truncated header, at a `cmsg_len` smaller than the header or
/// at one that runs past the end of the slice. The slice need not be aligned.
#[derive(Clone, Debug)]
pub struct CmsgIter<'a> {
    control: &'a [u8],
    /// Offset of the next header; `control.len()` once iteration has ended.
    offset: usize,
}

impl<'a> CmsgIter<'a> {
    /// Starts iterating over `control`, the first `msg_controllen` bytes of
    /// the control buffer (as returned by the kernel, not as reserved).
    pub fn new(control: &'a [u8]) -> Self {
        Self { control, offset: 0 }
    }

    /// Parses the header at `self.offset`; `None` if it is malformed.
    fn parse_next(&self) -> Option<(i32, i32, &'a [u8], usize)> {
        let rest = self.control.get(self.offset..)?;
        let cmsg_len = usize::from_ne_bytes(read_array(rest, 0)?);
        let level = i32::from_ne_bytes(read_array(rest, LEVEL_OFFSET)?);
        let ty = i32::from_ne_bytes(read_array(rest, TYPE_OFFSET)?);
        // glibc's `__cmsg_nxthdr` rejects `cmsg_len < sizeof(struct cmsghdr)`:
        // a zero length would otherwise loop forever.
        if cmsg_len < DATA_OFFSET {
            return None;
        }
        let data = rest.get(DATA_OFFSET..cmsg_len)?;
        // cmsg_len <= rest.len() <= isize::MAX here, so aligning cannot
        // overflow; the sum may exceed the slice length, which ends iteration.
        let next = self.offset.saturating_add(cmsg_align(cmsg_len));
        Some((level, ty, data, next))
    }
}

impl<'a> Iterator for CmsgIter<'a> {
    type Item = (i32, i32, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        match self.parse_next() {
            Some((level, ty, data, next)) => {
                self.offset = next.min(self.control.len());
                Some((level, ty, data))
            }
            None => {
                self.offset = self.control.len();
                None
            }
        }
    }
}

impl std::iter::FusedIterator for CmsgIter<'_> {}

/// What the control area of one received datagram says.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecvMeta {
    /// The address the client sent the datagram to (`IP_ORIGDSTADDR` or
    /// `IPV6_ORIGDSTADDR`), IPv4-mapped addresses normalised to IPv4. `None`
    /// if no valid cmsg was present or the control area was truncated; the
    /// engine cannot relay such a datagram and must drop (and count) it.
    pub orig_dst: Option<SocketAddr>,
    /// The kernel set `MSG_CTRUNC`: the control buffer was too small and some
    /// control data was lost or cut, so nothing in it is trusted.
    pub truncated_ctrl: bool,
}

/// Decodes the control area of one datagram.
///
/// `control` is the `msg_controllen` bytes the kernel wrote, `msg_flags` the
/// returned `msg_flags` (for multishot recvmsg: `io_uring_recvmsg_out.flags`).
/// Matches `(IPPROTO_IP, IP_ORIGDSTADDR)` carrying a `sockaddr_in` and
/// `(IPPROTO_IPV6, IPV6_ORIGDSTADDR)` carrying a `sockaddr_in6`; the first
/// valid one wins (the kernel sends at most one). A cmsg whose address family
/// does not match its level, or whose data is too short, is ignored. With
/// `MSG_CTRUNC` set nothing is decoded: a cut cmsg might still look
/// plausible, and a wrong original destination would misroute the flow.
pub fn decode(control: &[u8], msg_flags: i32) -> RecvMeta {
    if msg_flags & libc::MSG_CTRUNC != 0 {
        return RecvMeta {
            orig_dst: None,
            truncated_ctrl: true,
        };
    }
    let orig_dst = CmsgIter::new(control).find_map(|(level, ty, data)| match (level, ty) {
        (libc::IPPROTO_IP, libc::IP_ORIGDSTADDR) => decode_sockaddr_in(data),
        (libc::IPPROTO_IPV6, libc::IPV6_ORIGDSTADDR) => decode_sockaddr_in6(data),
        _ => None,
    });
    RecvMeta {
        orig_dst,
        truncated_ctrl: false,
    }
}

/// Decodes a socket address from `sockaddr`-shaped bytes, such as the
/// `msg_namelen` bytes of `RecvMsgOut::name_data()`.
///
/// Accepts `AF_INET` (at least `sizeof(struct sockaddr_in)` = 16 bytes) and
/// `AF_INET6` (at least `sizeof(struct sockaddr_in6)` = 28 bytes, which is
/// what the kernel writes for those families); IPv4-mapped IPv6 addresses are
/// normalised to IPv4. Anything else (other family, short or empty input)
/// gives `None`. A too-short name means the name buffer was truncated, so
/// the address is not trusted.
pub fn decode_sockaddr(name: &[u8]) -> Option<SocketAddr> {
    let family = libc::sa_family_t::from_ne_bytes(read_array(name, 0)?);
    match family {
        AF_INET => decode_sockaddr_in(name),
        AF_INET6 => decode_sockaddr_in6(name),
        _ => None,
    }
}

/// Decodes a `struct sockaddr_in`: family `AF_INET`, port and address in
/// network byte order.
fn decode_sockaddr_in(bytes: &[u8]) -> Option<SocketAddr> {
    if bytes.len() < size_of::<libc::sockaddr_in>() {
        return None;
    }
    let family = libc::sa_family_t::from_ne_bytes(read_array(bytes, 0)?);
    if family != AF_INET {
        return None;
    }
    let port = u16::from_be_bytes(read_array(bytes, offset_of!(libc::sockaddr_in, sin_port))?);
    let ip: [u8; 4] = read_array(bytes, offset_of!(libc::sockaddr_in, sin_addr))?;
    Some(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip), port)))
}

/// Decodes a `struct sockaddr_in6`: family `AF_INET6`, port and address in
/// network byte order, `sin6_flowinfo` copied verbatim (as std and socket2 do,
/// so addresses round-trip through them unchanged), `sin6_scope_id` in host
/// order. An IPv4-mapped address becomes a `SocketAddr::V4`, dropping
/// flowinfo and scope id, which have no IPv4 meaning.
fn decode_sockaddr_in6(bytes: &[u8]) -> Option<SocketAddr> {
    if bytes.len() < size_of::<libc::sockaddr_in6>() {
        return None;
    }
    let family = libc::sa_family_t::from_ne_bytes(read_array(bytes, 0)?);
    if family != AF_INET6 {
        return None;
    }
    let port = u16::from_be_bytes(read_array(
        bytes,
        offset_of!(libc::sockaddr_in6, sin6_port),
    )?);
    let flowinfo = u32::from_ne_bytes(read_array(
        bytes,
        offset_of!(libc::sockaddr_in6, sin6_flowinfo),
    )?);
    let ip = Ipv6Addr::from(read_array::<16>(
        bytes,
        offset_of!(libc::sockaddr_in6, sin6_addr),
    )?);
    let scope_id = u32::from_ne_bytes(read_array(
        bytes,
        offset_of!(libc::sockaddr_in6, sin6_scope_id),
    )?);
    Some(match ip.to_ipv4_mapped() {
        Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, port)),
        None => SocketAddr::V6(SocketAddrV6::new(ip, port, flowinfo, scope_id)),
    })
}

/// Encodes `addr` as a `sockaddr_storage` holding a `sockaddr_in` (IPv4) or
/// `sockaddr_in6` (IPv6), and the length to pass as `msg_namelen` /
/// `addrlen` (16 or 28 bytes). Every byte past the address is zero.
///
/// IPv4 is encoded as `sockaddr_in`, never as a mapped IPv6 address, because
/// the engine's upstream sockets for IPv4 servers are `AF_INET` sockets.
pub fn encode_sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: `sockaddr_storage` is a C struct made only of integers and byte
    // arrays, for which the all-zero bit pattern is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: AF_INET,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    // The octets are already in network order; keep them.
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: `sockaddr_storage` is defined to be large enough and
            // sufficiently aligned for every `sockaddr_*` type (128 bytes,
            // 8-aligned vs 16 bytes, 4-aligned), and `write` does not read or
            // drop the zeroed bytes it overwrites.
            unsafe {
                std::ptr::addr_of_mut!(storage)
                    .cast::<libc::sockaddr_in>()
                    .write(sin);
            }
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: AF_INET6,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above; `sockaddr_in6` is 28 bytes, 4-aligned.
            unsafe {
                std::ptr::addr_of_mut!(storage)
                    .cast::<libc::sockaddr_in6>()
                    .write(sin6);
            }
            size_of::<libc::sockaddr_in6>()
        }
    };
    // 16 or 28: always fits a socklen_t.
    (storage, len as libc::socklen_t)
}

/// Builds a control area holding `cmsgs` (`(level, type, data)`), laid out as
/// the kernel does: each header at a `CMSG_ALIGN`ed offset with
/// `cmsg_len = CMSG_LEN(data.len())`, zero padding up to
/// `CMSG_SPACE(data.len())` after every message (the caller may truncate the
/// last message's padding to mimic an exactly-sized buffer).
#[cfg(test)]
pub(crate) fn build_control(cmsgs: &[(i32, i32, &[u8])]) -> Vec<u8> {
    let mut buf = Vec::new();
    for &(level, ty, data) in cmsgs {
        let start = buf.len();
        buf.extend_from_slice(&cmsg_len(data.len()).to_ne_bytes());
        buf.extend_from_slice(&level.to_ne_bytes());
        buf.extend_from_slice(&ty.to_ne_bytes());
        buf.resize(start + DATA_OFFSET, 0);
        buf.extend_from_slice(data);
        buf.resize(start + cmsg_space(data.len()), 0);
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    /// The bytes of an encoded address, for feeding the decoders.
    fn sockaddr_bytes(addr: &SocketAddr) -> Vec<u8> {
        let (storage, len) = encode_sockaddr(addr);
        // SAFETY: `storage` is a live, fully initialised plain C struct (it was
        // zeroed, then a padding-free `sockaddr_in`/`sockaddr_in6` was written
        // over its start), and `len` is at most its size.
        let bytes = unsafe {
            std::slice::from_raw_parts(std::ptr::addr_of!(storage).cast::<u8>(), len as usize)
        };
        bytes.to_vec()
    }

    /// A `sockaddr_in` written field by field, independently of the encoder.
    fn raw_sockaddr_in(ip: [u8; 4], port: u16) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&AF_INET.to_ne_bytes());
        b.extend_from_slice(&port.to_be_bytes());
        b.extend_from_slice(&ip);
        b.extend_from_slice(&[0; 8]);
        assert_eq!(b.len(), size_of::<libc::sockaddr_in>());
        b
    }

    /// A `sockaddr_in6` written field by field, independently of the encoder.
    fn raw_sockaddr_in6(ip: Ipv6Addr, port: u16, flowinfo: u32, scope_id: u32) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&AF_INET6.to_ne_bytes());
        b.extend_from_slice(&port.to_be_bytes());
        b.extend_from_slice(&flowinfo.to_ne_bytes());
        b.extend_from_slice(&ip.octets());
        b.extend_from_slice(&scope_id.to_ne_bytes());
        assert_eq!(b.len(), size_of::<libc::sockaddr_in6>());
        b
    }

    fn v4_cmsg(data: &[u8]) -> (i32, i32, &[u8]) {
        (libc::IPPROTO_IP, libc::IP_ORIGDSTADDR, data)
    }

    fn v6_cmsg(data: &[u8]) -> (i32, i32, &[u8]) {
        (libc::IPPROTO_IPV6, libc::IPV6_ORIGDSTADDR, data)
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn alignment_matches_libc_macros() {
        for n in 0..=64usize {
            // SAFETY: CMSG_SPACE and CMSG_LEN are pure arithmetic on their
            // argument; they dereference nothing.
            let (space, len) = unsafe { (libc::CMSG_SPACE(n as u32), libc::CMSG_LEN(n as u32)) };
            assert_eq!(cmsg_space(n), space as usize, "CMSG_SPACE({n})");
            assert_eq!(cmsg_len(n), len as usize, "CMSG_LEN({n})");
            let built = build_control(&[(1, 2, &vec![7u8; n])]);
            assert_eq!(built.len(), space as usize);
            assert_eq!(
                usize::from_ne_bytes(built[..8].try_into().unwrap()),
                len as usize
            );
        }
    }

    #[test]
    fn control_len_fits_one_v6_origdstaddr() {
        // SAFETY: pure arithmetic, see above.
        let v6 = unsafe { libc::CMSG_SPACE(size_of::<libc::sockaddr_in6>() as u32) } as usize;
        // SAFETY: pure arithmetic, see above.
        let v4 = unsafe { libc::CMSG_SPACE(size_of::<libc::sockaddr_in>() as u32) } as usize;
        assert_eq!(CONTROL_LEN, v6);
        assert!(CONTROL_LEN >= v4);
        let data = raw_sockaddr_in6(Ipv6Addr::LOCALHOST, 1, 0, 0);
        assert_eq!(build_control(&[v6_cmsg(&data)]).len(), CONTROL_LEN);
    }

    #[test]
    fn decodes_v4_origdstaddr() {
        let data = raw_sockaddr_in([192, 0, 2, 7], 53);
        let ctrl = build_control(&[v4_cmsg(&data)]);
        let meta = decode(&ctrl, 0);
        assert_eq!(meta.orig_dst, Some(sa("192.0.2.7:53")));
        assert!(!meta.truncated_ctrl);
    }

    #[test]
    fn decodes_v6_origdstaddr() {
        let ip: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let data = raw_sockaddr_in6(ip, 443, 0, 0);
        let meta = decode(&build_control(&[v6_cmsg(&data)]), 0);
        assert_eq!(meta.orig_dst, Some(sa("[2001:db8::1]:443")));
    }

    #[test]
    fn v4_mapped_v6_origdstaddr_becomes_v4() {
        let ip: Ipv6Addr = "::ffff:198.51.100.9".parse().unwrap();
        let data = raw_sockaddr_in6(ip, 5353, 0, 0);
        let meta = decode(&build_control(&[v6_cmsg(&data)]), 0);
        assert_eq!(meta.orig_dst, Some(sa("198.51.100.9:5353")));
        // IPv4-compatible (deprecated) and loopback are not mapped addresses.
        let data = raw_sockaddr_in6(Ipv6Addr::LOCALHOST, 1, 0, 0);
        let meta = decode(&build_control(&[v6_cmsg(&data)]), 0);
        assert_eq!(meta.orig_dst, Some(sa("[::1]:1")));
    }

    #[test]
    fn v6_scope_id_and_flowinfo_are_kept() {
        let ip: Ipv6Addr = "fe80::1".parse().unwrap();
        let data = raw_sockaddr_in6(ip, 8080, 0x0001_2345, 7);
        let meta = decode(&build_control(&[v6_cmsg(&data)]), 0);
        let want = SocketAddr::V6(SocketAddrV6::new(ip, 8080, 0x0001_2345, 7));
        assert_eq!(meta.orig_dst, Some(want));
        match meta.orig_dst {
            Some(SocketAddr::V6(v6)) => {
                assert_eq!(v6.scope_id(), 7);
                assert_eq!(v6.flowinfo(), 0x0001_2345);
            }
            other => panic!("expected v6, got {other:?}"),
        }
    }

    #[test]
    fn unrelated_cmsg_first_is_skipped() {
        // A SO_TIMESTAMP-like cmsg: a 16-byte `struct timeval`.
        let tv = [0xabu8; 16];
        let data = raw_sockaddr_in([10, 1, 2, 3], 4000);
        let ctrl = build_control(&[(libc::SOL_SOCKET, libc::SCM_TIMESTAMP, &tv), v4_cmsg(&data)]);
        let all: Vec<_> = CmsgIter::new(&ctrl).collect();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0], (libc::SOL_SOCKET, libc::SCM_TIMESTAMP, &tv[..]));
        assert_eq!(all[1], (libc::IPPROTO_IP, libc::IP_ORIGDSTADDR, &data[..]));
        assert_eq!(decode(&ctrl, 0).orig_dst, Some(sa("10.1.2.3:4000")));
    }

    #[test]
    fn odd_sized_data_is_padded_between_cmsgs() {
        let odd = [1u8, 2, 3];
        let data = raw_sockaddr_in([10, 0, 0, 1], 9);
        let ctrl = build_control(&[(5, 6, &odd), v4_cmsg(&data)]);
        let all: Vec<_> = CmsgIter::new(&ctrl).collect();
        assert_eq!(all, vec![(5, 6, &odd[..]), v4_cmsg(&data)]);
    }

    #[test]
    fn last_cmsg_without_trailing_padding() {
        // The kernel writes only CMSG_LEN bytes when that is all the room left.
        let tv = [0u8; 12];
        let data = raw_sockaddr_in6("2001:db8::2".parse().unwrap(), 1, 0, 0);
        let mut ctrl = build_control(&[(1, 1, &tv), v6_cmsg(&data)]);
        ctrl.truncate(ctrl.len() - (cmsg_space(data.len()) - cmsg_len(data.len())));
        assert_eq!(CmsgIter::new(&ctrl).count(), 2);
        assert_eq!(decode(&ctrl, 0).orig_dst, Some(sa("[2001:db8::2]:1")));
    }

    #[test]
    fn unaligned_slice_is_fine() {
        let data = raw_sockaddr_in([127, 0, 0, 1], 7);
        let ctrl = build_control(&[v4_cmsg(&data)]);
        let mut shifted = vec![0xffu8];
        shifted.extend_from_slice(&ctrl);
        assert_eq!(decode(&shifted[1..], 0).orig_dst, Some(sa("127.0.0.1:7")));
    }

    #[test]
    fn truncated_header_yields_nothing() {
        let data = raw_sockaddr_in([127, 0, 0, 1], 7);
        let ctrl = build_control(&[v4_cmsg(&data)]);
        for cut in 0..HDR_LEN {
            assert_eq!(CmsgIter::new(&ctrl[..cut]).count(), 0, "cut at {cut}");
            assert_eq!(decode(&ctrl[..cut], 0), RecvMeta::default());
        }
    }

    #[test]
    fn every_truncation_is_safe_and_never_wrong() {
        let tv = [9u8; 16];
        let data = raw_sockaddr_in6("2001:db8::3".parse().unwrap(), 3, 0, 0);
        let ctrl = build_control(&[(libc::SOL_SOCKET, libc::SCM_TIMESTAMP, &tv), v6_cmsg(&data)]);
        let full = cmsg_space(tv.len()) + cmsg_len(data.len());
        for cut in 0..=ctrl.len() {
            let got = decode(&ctrl[..cut], 0).orig_dst;
            if cut >= full {
                assert_eq!(got, Some(sa("[2001:db8::3]:3")), "cut at {cut}");
            } else {
                assert_eq!(got, None, "cut at {cut}");
            }
        }
    }

    #[test]
    fn cmsg_len_larger_than_buffer_stops() {
        let data = raw_sockaddr_in([127, 0, 0, 1], 7);
        let mut ctrl = build_control(&[v4_cmsg(&data)]);
        let bad = ctrl.len() + 1;
        ctrl[..8].copy_from_slice(&bad.to_ne_bytes());
        assert_eq!(CmsgIter::new(&ctrl).count(), 0);
        ctrl[..8].copy_from_slice(&usize::MAX.to_ne_bytes());
        assert_eq!(CmsgIter::new(&ctrl).count(), 0);
        assert_eq!(decode(&ctrl, 0).orig_dst, None);
    }

    #[test]
    fn bad_second_header_keeps_first_and_stops() {
        let a = raw_sockaddr_in([127, 0, 0, 1], 7);
        let b = raw_sockaddr_in([127, 0, 0, 2], 8);
        let mut ctrl = build_control(&[(1, 1, &[0u8; 4]), v4_cmsg(&a), v4_cmsg(&b)]);
        let second = cmsg_space(4);
        ctrl[second..second + 8].copy_from_slice(&1000usize.to_ne_bytes());
        let mut it = CmsgIter::new(&ctrl);
        assert_eq!(it.next(), Some((1, 1, &[0u8; 4][..])));
        assert_eq!(it.next(), None);
        // Fused: the valid third message is not reached after the bad one.
        assert_eq!(it.next(), None);
        assert_eq!(decode(&ctrl, 0).orig_dst, None);
    }

    #[test]
    fn cmsg_len_smaller_than_header_stops() {
        let data = raw_sockaddr_in([127, 0, 0, 1], 7);
        let mut ctrl = build_control(&[v4_cmsg(&data), v4_cmsg(&data)]);
        for bad in [0usize, 1, HDR_LEN - 1] {
            ctrl[..8].copy_from_slice(&bad.to_ne_bytes());
            assert_eq!(CmsgIter::new(&ctrl).count(), 0, "cmsg_len {bad}");
        }
        // Exactly a header is valid, with empty data; iteration continues.
        let ctrl = build_control(&[(1, 1, &[]), v4_cmsg(&data)]);
        assert_eq!(&ctrl[..8], &HDR_LEN.to_ne_bytes());
        let all: Vec<_> = CmsgIter::new(&ctrl).collect();
        assert_eq!(all, vec![(1, 1, &[][..]), v4_cmsg(&data)]);
    }

    #[test]
    fn ctrunc_is_reported_and_data_ignored() {
        let data = raw_sockaddr_in([192, 0, 2, 1], 53);
        let ctrl = build_control(&[v4_cmsg(&data)]);
        let meta = decode(&ctrl, libc::MSG_CTRUNC);
        assert!(meta.truncated_ctrl);
        assert_eq!(meta.orig_dst, None);
        // Other flags do not matter.
        let meta = decode(&ctrl, libc::MSG_TRUNC);
        assert!(!meta.truncated_ctrl);
        assert_eq!(meta.orig_dst, Some(sa("192.0.2.1:53")));
    }

    #[test]
    fn empty_control() {
        assert_eq!(CmsgIter::new(&[]).count(), 0);
        assert_eq!(decode(&[], 0), RecvMeta::default());
    }

    #[test]
    fn wrong_family_or_short_data_in_origdstaddr_is_ignored() {
        let v4 = raw_sockaddr_in([192, 0, 2, 1], 53);
        let v6 = raw_sockaddr_in6("2001:db8::1".parse().unwrap(), 53, 0, 0);
        // A sockaddr_in6 under the IPv4 level/type and vice versa.
        assert_eq!(decode(&build_control(&[v4_cmsg(&v6)]), 0).orig_dst, None);
        assert_eq!(decode(&build_control(&[v6_cmsg(&v4)]), 0).orig_dst, None);
        // Family field saying AF_UNIX.
        let mut unix = v4.clone();
        unix[..2].copy_from_slice(&(libc::AF_UNIX as u16).to_ne_bytes());
        assert_eq!(decode(&build_control(&[v4_cmsg(&unix)]), 0).orig_dst, None);
        // Short data.
        assert_eq!(
            decode(&build_control(&[v4_cmsg(&v4[..8])]), 0).orig_dst,
            None
        );
        assert_eq!(
            decode(&build_control(&[v6_cmsg(&v6[..24])]), 0).orig_dst,
            None
        );
        // Right level, wrong type; right type, wrong level.
        let c = build_control(&[(libc::IPPROTO_IP, libc::IP_PKTINFO, &v4)]);
        assert_eq!(decode(&c, 0).orig_dst, None);
        let c = build_control(&[(libc::SOL_SOCKET, libc::IP_ORIGDSTADDR, &v4)]);
        assert_eq!(decode(&c, 0).orig_dst, None);
        // A bad one followed by a good one: the good one is used.
        let c = build_control(&[v4_cmsg(&v6), v6_cmsg(&v6)]);
        assert_eq!(decode(&c, 0).orig_dst, Some(sa("[2001:db8::1]:53")));
    }

    #[test]
    fn decode_sockaddr_each_family() {
        assert_eq!(
            decode_sockaddr(&raw_sockaddr_in([203, 0, 113, 5], 65535)),
            Some(sa("203.0.113.5:65535"))
        );
        let ip: Ipv6Addr = "fe80::2".parse().unwrap();
        assert_eq!(
            decode_sockaddr(&raw_sockaddr_in6(ip, 1, 3, 4)),
            Some(SocketAddr::V6(SocketAddrV6::new(ip, 1, 3, 4)))
        );
        let mapped: Ipv6Addr = "::ffff:203.0.113.5".parse().unwrap();
        assert_eq!(
            decode_sockaddr(&raw_sockaddr_in6(mapped, 99, 0, 0)),
            Some(sa("203.0.113.5:99"))
        );
        // A whole sockaddr_storage (128 bytes) is fine too.
        let mut storage = raw_sockaddr_in6(ip, 1, 0, 0);
        storage.resize(size_of::<libc::sockaddr_storage>(), 0);
        assert_eq!(decode_sockaddr(&storage), Some(sa("[fe80::2]:1")));
    }

    #[test]
    fn decode_sockaddr_garbage() {
        assert_eq!(decode_sockaddr(&[]), None);
        assert_eq!(decode_sockaddr(&[2]), None);
        let v4 = raw_sockaddr_in([1, 2, 3, 4], 5);
        let v6 = raw_sockaddr_in6(Ipv6Addr::LOCALHOST, 5, 0, 0);
        for cut in 0..v4.len() {
            assert_eq!(decode_sockaddr(&v4[..cut]), None, "v4 cut at {cut}");
        }
        for cut in 0..v6.len() {
            assert_eq!(decode_sockaddr(&v6[..cut]), None, "v6 cut at {cut}");
        }
        let mut unix = vec![0u8; 110];
        unix[..2].copy_from_slice(&(libc::AF_UNIX as u16).to_ne_bytes());
        assert_eq!(decode_sockaddr(&unix), None);
        assert_eq!(decode_sockaddr(&[0xff; 128]), None);
        assert_eq!(decode_sockaddr(&[0; 128]), None);
    }

    #[test]
    fn encode_matches_hand_written_layout() {
        assert_eq!(
            sockaddr_bytes(&sa("192.0.2.1:53")),
            raw_sockaddr_in([192, 0, 2, 1], 53)
        );
        let ip: Ipv6Addr = "fe80::1".parse().unwrap();
        let addr = SocketAddr::V6(SocketAddrV6::new(ip, 853, 0x12345, 3));
        assert_eq!(sockaddr_bytes(&addr), raw_sockaddr_in6(ip, 853, 0x12345, 3));
        let (storage, len) = encode_sockaddr(&addr);
        assert_eq!(len as usize, size_of::<libc::sockaddr_in6>());
        assert_eq!(storage.ss_family, AF_INET6);
    }

    #[test]
    fn encode_decode_round_trip() {
        let cases = [
            sa("0.0.0.0:0"),
            sa("255.255.255.255:65535"),
            sa("10.0.0.1:1"),
            sa("[::]:0"),
            sa("[2001:db8::dead:beef]:65535"),
            SocketAddr::V6(SocketAddrV6::new(
                "fe80::9".parse().unwrap(),
                7,
                0xfffff,
                u32::MAX,
            )),
        ];
        for addr in cases {
            let bytes = sockaddr_bytes(&addr);
            assert_eq!(decode_sockaddr(&bytes), Some(addr), "{addr}");
            // The same bytes inside the matching ORIGDSTADDR cmsg.
            let cmsg = match addr {
                SocketAddr::V4(_) => v4_cmsg(&bytes),
                SocketAddr::V6(_) => v6_cmsg(&bytes),
            };
            assert_eq!(decode(&build_control(&[cmsg]), 0).orig_dst, Some(addr));
        }
        // A mapped address normalises to IPv4 on the way back.
        let mapped = SocketAddr::new(IpAddr::V6("::ffff:10.9.8.7".parse().unwrap()), 42);
        assert_eq!(
            decode_sockaddr(&sockaddr_bytes(&mapped)),
            Some(sa("10.9.8.7:42"))
        );
    }

    #[test]
    fn random_bytes_never_panic() {
        // xorshift64: deterministic, no extra crates.
        let mut s: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rand = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let valid = build_control(&[
            (1, 2, &[3u8; 5]),
            v6_cmsg(&raw_sockaddr_in6(Ipv6Addr::LOCALHOST, 1, 0, 0)),
        ]);
        for _ in 0..20_000 {
            let mut buf = valid.clone();
            // Flip a few random bytes, sometimes in a length field.
            for _ in 0..(rand() % 4) {
                let i = (rand() as usize) % buf.len();
                buf[i] = rand() as u8;
            }
            buf.truncate((rand() as usize) % (buf.len() + 1));
            let mut seen = 0;
            for (_, _, data) in CmsgIter::new(&buf) {
                assert!(data.len() <= buf.len());
                seen += 1;
                assert!(seen <= buf.len() / HDR_LEN);
            }
            let _ = decode(&buf, (rand() as i32) & !libc::MSG_CTRUNC);
            let _ = decode_sockaddr(&buf);
        }
    }
}

/// Property tests against hostile control and name areas, and the seed corpus.
#[cfg(test)]
mod fuzz;
