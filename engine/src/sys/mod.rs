//! Thin, checked wrappers over the system calls the engine makes outside the ring.
//!
//! With `cmsg` below and `core::ring`, the only modules allowed to use `unsafe`.
//! Every wrapper turns `-1` into `io::Error::last_os_error()` through [`cvt`], and
//! every fd it creates comes back as an [`OwnedFd`] so that it is closed exactly once.

pub mod cmsg;

use std::io;
use std::mem;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Turns a libc return value into a `Result`: `-1` means "look at errno".
pub fn cvt<T: Default + PartialOrd + Copy>(ret: T) -> io::Result<T> {
    if ret < T::default() {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Takes ownership of an fd the kernel just handed us (accept CQE, pipe2, ...).
///
/// # Safety
/// `fd` must be a freshly created, open descriptor that nothing else owns.
pub unsafe fn owned_fd(fd: RawFd) -> OwnedFd {
    // SAFETY: guaranteed by the caller: `fd` is open and has no other owner.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Wraps the fd an accept completion returned (`res >= 0`).
pub fn take_accepted(res: i32) -> OwnedFd {
    assert!(res >= 0, "accept result {res} is not an fd");
    // SAFETY: a non-negative accept result is a new descriptor installed in our fd
    // table by the kernel for this completion alone; nothing else owns it.
    unsafe { owned_fd(res) }
}

/// `splice(2)` with `SPLICE_F_MOVE | SPLICE_F_NONBLOCK`, run inline on the calling core.
///
/// `IORING_OP_SPLICE` is always punted to an io-wq worker thread (io_uring/splice.c
/// sets `REQ_F_FORCE_ASYNC`), so the engine instead waits for readiness through the
/// ring and then calls this non-blocking syscall itself (the HAProxy model). Both
/// sockets are `O_NONBLOCK`: `tcp_splice_read` takes its blocking mode from the
/// socket file, not from `SPLICE_F_NONBLOCK`.
pub fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain syscall on descriptors owned by the caller; null offsets are valid
    // for pipes and sockets.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    cvt(n).map(|n| n as usize)
}

/// A pipe used as the in-kernel buffer of one splice direction.
#[derive(Debug)]
pub struct Pipe {
    pub read: OwnedFd,
    pub write: OwnedFd,
    /// Capacity in bytes as reported by `F_GETPIPE_SZ`.
    pub capacity: usize,
}

impl Pipe {
    /// `pipe2(O_NONBLOCK | O_CLOEXEC)`, optionally resized with `F_SETPIPE_SZ`.
    pub fn new(size: Option<usize>) -> io::Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` is a valid array of two ints for the kernel to fill.
        cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) })?;
        // SAFETY: pipe2 succeeded, both fds are new and owned by nobody else.
        let (read, write) = unsafe { (owned_fd(fds[0]), owned_fd(fds[1])) };
        if let Some(size) = size {
            // Failure is not fatal: past fs.pipe-user-pages-soft the kernel refuses to
            // grow pipes for unprivileged users; the default size still works.
            // SAFETY: fcntl on an fd we own.
            let _ =
                unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, size as libc::c_int) };
        }
        // SAFETY: fcntl on an fd we own.
        let capacity = cvt(unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) })? as usize;
        Ok(Pipe {
            read,
            write,
            capacity,
        })
    }
}

/// Takes a socket's pending error (`SO_ERROR`, which clears it), if it has one.
pub fn take_socket_error(fd: RawFd) -> Option<i32> {
    // SAFETY: the caller owns `fd` and keeps it open for the duration of this call.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    socket2::SockRef::from(&fd)
        .take_error()
        .ok()
        .flatten()
        .and_then(|e| e.raw_os_error())
}

/// `shutdown(fd, SHUT_WR)`: sends our FIN after everything queued.
pub fn shutdown_write(fd: RawFd) -> io::Result<()> {
    // SAFETY: plain syscall on an fd owned by the caller.
    cvt(unsafe { libc::shutdown(fd, libc::SHUT_WR) }).map(drop)
}

/// Arms `SO_LINGER {on, 0}` so that the following `close()` sends a RST instead of a FIN.
pub fn set_linger_zero(fd: BorrowedFd<'_>) -> io::Result<()> {
    socket2::SockRef::from(&fd).set_linger(Some(std::time::Duration::ZERO))
}

/// Local address of a socket: for a socket accepted on a transparent listener this is
/// the destination the client originally asked for (kernel tproxy docs).
pub fn local_addr(fd: BorrowedFd<'_>) -> io::Result<SocketAddr> {
    socket2::SockRef::from(&fd)
        .local_addr()?
        .as_socket()
        .map(normalize)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "socket is not AF_INET/AF_INET6"))
}

/// Peer address of a connected socket.
pub fn peer_addr(fd: BorrowedFd<'_>) -> io::Result<SocketAddr> {
    socket2::SockRef::from(&fd)
        .peer_addr()?
        .as_socket()
        .map(normalize)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "socket is not AF_INET/AF_INET6"))
}

/// Maps `::ffff:a.b.c.d` to `a.b.c.d` so that one address always has one spelling.
pub fn normalize(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, v6.port())),
            None => addr,
        },
        v4 => v4,
    }
}

/// Whether `ip` is an address of this host (in the current network namespace):
/// a loopback address, or one configured on an interface (`getifaddrs(3)`).
///
/// Asks for the interface list rather than probing with `bind()`: a probe bind
/// succeeds for any address under `net.ipv4.ip_nonlocal_bind=1` (or
/// `net.ipv6.ip_nonlocal_bind=1`), which would make every destination look local.
/// Only called for connections to the engine's own port, so its cost is off the
/// common path.
pub fn is_local_address(ip: std::net::IpAddr) -> bool {
    let ip = match ip {
        std::net::IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
        v4 => v4,
    };
    if ip.is_loopback() {
        return true;
    }
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: `head` is a valid out-pointer; on success the list is freed below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return false;
    }
    let mut found = false;
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: a non-null `ifa_addr` points at a sockaddr whose family says how
            // large it is; only AF_INET/AF_INET6 are read, at their own sizes.
            let addr = unsafe {
                match i32::from((*ifa.ifa_addr).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                        Some(std::net::IpAddr::V4(Ipv4Addr::from(u32::from_be(
                            sin.sin_addr.s_addr,
                        ))))
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                        Some(std::net::IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
                    }
                    _ => None,
                }
            };
            if addr == Some(ip) {
                found = true;
                break;
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from a successful getifaddrs and is freed exactly once.
    unsafe { libc::freeifaddrs(head) };
    found
}

/// An `eventfd` used by the main thread to wake a worker's ring.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the returned fd is new.
    let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
    // SAFETY: eventfd succeeded, the fd is ours alone.
    Ok(unsafe { owned_fd(fd) })
}

/// Adds `value` to an eventfd counter, waking whoever waits on it.
pub fn eventfd_write(fd: BorrowedFd<'_>, value: u64) -> io::Result<()> {
    let buf = value.to_ne_bytes();
    // SAFETY: writes 8 bytes from a valid local buffer to an fd the caller owns.
    cvt(unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) }).map(drop)
}

/// `RLIMIT_NOFILE` as (soft, hard).
pub fn nofile_limit() -> io::Result<(u64, u64)> {
    // SAFETY: rlimit is plain data; getrlimit fills it.
    let mut rl: libc::rlimit = unsafe { mem::zeroed() };
    // SAFETY: valid pointer to a local rlimit.
    cvt(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) })?;
    Ok((rl.rlim_cur, rl.rlim_max))
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (never above it: that needs
/// CAP_SYS_RESOURCE and on many appliances, as here, the hard limit is fixed).
pub fn raise_nofile_to_hard() -> io::Result<u64> {
    let (_, hard) = nofile_limit()?;
    let rl = libc::rlimit {
        rlim_cur: hard,
        rlim_max: hard,
    };
    // SAFETY: valid pointer to a local rlimit.
    cvt(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &rl) })?;
    Ok(hard)
}

/// Raises the soft `RLIMIT_MEMLOCK` to the hard limit.
pub fn raise_memlock_to_hard() -> io::Result<()> {
    // SAFETY: rlimit is plain data; getrlimit fills it.
    let mut rl: libc::rlimit = unsafe { mem::zeroed() };
    // SAFETY: valid pointer to a local rlimit.
    cvt(unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut rl) })?;
    rl.rlim_cur = rl.rlim_max;
    // SAFETY: valid pointer to a local rlimit.
    cvt(unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rl) })?;
    Ok(())
}

/// The soft `RLIMIT_MEMLOCK` in bytes, `None` when unlimited.
pub fn memlock_limit() -> io::Result<Option<u64>> {
    // SAFETY: rlimit is plain data; getrlimit fills it.
    let mut rl: libc::rlimit = unsafe { mem::zeroed() };
    // SAFETY: valid pointer to a local rlimit.
    cvt(unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut rl) })?;
    Ok((rl.rlim_cur != libc::RLIM_INFINITY).then_some(rl.rlim_cur))
}

/// Whether this thread has `CAP_IPC_LOCK` in its effective set (then the kernel does
/// not charge io_uring memory to `RLIMIT_MEMLOCK`). Read from `/proc/self/status`;
/// `false` when that cannot be read.
pub fn has_ipc_lock() -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    std::fs::read_to_string("/proc/thread-self/status")
        .ok()
        .and_then(|s| cap_eff(&s))
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

/// The `CapEff:` mask of a `/proc/PID/status` text.
fn cap_eff(status: &str) -> Option<u64> {
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    u64::from_str_radix(hex, 16).ok()
}

/// Number of open fds of this process (entries of /proc/self/fd), for the summary.
pub fn open_fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count().saturating_sub(1))
        .unwrap_or(0)
}

/// Sets `IP_RECVORIGDSTADDR` (v4) or `IPV6_RECVORIGDSTADDR` (v6) on a UDP socket so
/// every `recvmsg` carries the original destination as a control message.
pub fn set_recv_orig_dst(fd: BorrowedFd<'_>, v6: bool) -> io::Result<()> {
    let (level, opt) = if v6 {
        (libc::IPPROTO_IPV6, libc::IPV6_RECVORIGDSTADDR)
    } else {
        (libc::IPPROTO_IP, libc::IP_RECVORIGDSTADDR)
    };
    setsockopt_int(fd, level, opt, 1)
}

/// `SO_RCVBUFFORCE`: a receive buffer above `net.core.rmem_max` (needs
/// CAP_NET_ADMIN, which the engine has). Falls back to the capped `SO_RCVBUF`.
pub fn set_recv_buffer_force(fd: BorrowedFd<'_>, bytes: usize) -> io::Result<()> {
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, bytes)
        .or_else(|_| socket2::SockRef::from(&fd).set_recv_buffer_size(bytes))
}

/// Non-blocking `send(2)` on a connected socket (`MSG_NOSIGNAL`: a closed peer is
/// `EPIPE`, not a signal).
pub fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a valid slice for the duration of the call.
    let n = unsafe {
        libc::send(
            fd,
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    cvt(n).map(|n| n as usize)
}

/// Non-blocking `recv(2)`.
pub fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a valid, writable slice for the duration of the call.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    cvt(n).map(|n| n as usize)
}

/// Non-blocking `sendto(2)`.
pub fn send_to(fd: RawFd, buf: &[u8], to: &SocketAddr) -> io::Result<usize> {
    let (storage, len) = cmsg::encode_sockaddr(to);
    // SAFETY: `buf` and `storage` are valid for the duration of the call, `len` is the
    // size of the address written into `storage`.
    let n = unsafe {
        libc::sendto(
            fd,
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
            (&storage as *const libc::sockaddr_storage).cast(),
            len,
        )
    };
    cvt(n).map(|n| n as usize)
}

/// Non-blocking `sendmsg(2)` of `buf` as datagrams of `seg` bytes each (the last
/// may be shorter) with one `UDP_SEGMENT` control message: UDP GSO, Linux 4.18+.
/// `to`: the destination of an unconnected socket. The kernel sends all of them or
/// none.
pub fn send_segments(
    fd: RawFd,
    buf: &[u8],
    seg: u16,
    to: Option<&SocketAddr>,
) -> io::Result<usize> {
    // One header and a u16: CMSG_SPACE(2) = 24 bytes.
    sendmsg_cmsg::<4>(
        fd,
        buf,
        to,
        (libc::SOL_UDP, libc::UDP_SEGMENT, &seg.to_ne_bytes()),
        libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
    )
}

/// `sendmsg(2)` of `data` to `to` (`None`: the connected peer) with one control
/// message `(level, type, payload)`, none when `payload` is empty, in a control area
/// of `W` u64 words on the stack (u64: the alignment a `cmsghdr` needs).
fn sendmsg_cmsg<const W: usize>(
    fd: RawFd,
    data: &[u8],
    to: Option<&SocketAddr>,
    (level, ty, payload): (i32, i32, &[u8]),
    flags: i32,
) -> io::Result<usize> {
    let space = cmsg::space_of(payload.len());
    assert!(
        space <= W * mem::size_of::<u64>(),
        "control message larger than its area"
    );
    let mut control = [0u64; W];
    let (mut storage, name_len) = match to {
        Some(a) => cmsg::encode_sockaddr(a),
        // SAFETY: sockaddr_storage is plain data; all zeroes is a valid value.
        None => (unsafe { mem::zeroed() }, 0),
    };
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let mut msg = zeroed_msghdr();
    if name_len > 0 {
        msg.msg_name = (&mut storage as *mut libc::sockaddr_storage).cast();
        msg.msg_namelen = name_len;
    }
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !payload.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: `msg` points at a u64-aligned control area of at least
        // CMSG_SPACE(payload) bytes (asserted above), so CMSG_FIRSTHDR is non-null
        // and CMSG_DATA has room for `payload`.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = level;
            (*c).cmsg_type = ty;
            (*c).cmsg_len = libc::CMSG_LEN(payload.len() as u32) as _;
            std::ptr::copy_nonoverlapping(payload.as_ptr(), libc::CMSG_DATA(c), payload.len());
        }
    }
    // SAFETY: every pointer in `msg` (name, iovec over `data`, control) is valid for
    // the duration of the call; the kernel only reads them.
    let n = unsafe { libc::sendmsg(fd, &msg, flags) };
    cvt(n).map(|n| n as usize)
}

/// The wildcard address of a family, for listeners.
pub fn unspecified(v6: bool, port: u16) -> SocketAddr {
    if v6 {
        SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0))
    } else {
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))
    }
}

/// Kernel release as (major, minor), from `uname(2)`.
pub fn kernel_version() -> Option<(u32, u32)> {
    // SAFETY: utsname is plain data; uname fills it.
    let mut uts: libc::utsname = unsafe { mem::zeroed() };
    // SAFETY: valid pointer to a local utsname.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return None;
    }
    let release: Vec<u8> = uts
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    let release = String::from_utf8_lossy(&release);
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// An all-zero `msghdr` (it has private padding fields, so no literal can build it).
pub fn zeroed_msghdr() -> libc::msghdr {
    // SAFETY: msghdr is plain C data (pointers and integers); all-zero is valid.
    unsafe { mem::zeroed() }
}

/// Most fds passed in one `SCM_RIGHTS` message (the kernel's limit is 253).
pub const MAX_FDS_PER_MSG: usize = 200;

/// `sendmsg(2)` of `data` with `fds` attached as `SCM_RIGHTS` (the receiver gets its
/// own duplicates; ours stay open). At most [`MAX_FDS_PER_MSG`] fds.
pub fn send_with_fds(sock: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    assert!(fds.len() <= MAX_FDS_PER_MSG, "too many fds for one message");
    let raw: Vec<u8> = fds
        .iter()
        .flat_map(|f| f.as_raw_fd().to_ne_bytes())
        .collect();
    const WORDS: usize = cmsg::space_of(MAX_FDS_PER_MSG * mem::size_of::<RawFd>()).div_ceil(8);
    loop {
        let sent = sendmsg_cmsg::<WORDS>(
            sock.as_raw_fd(),
            data,
            None,
            (libc::SOL_SOCKET, libc::SCM_RIGHTS, &raw),
            libc::MSG_NOSIGNAL,
        );
        match sent {
            Ok(n) if n == data.len() => return Ok(()),
            Ok(_) => return Err(io::Error::other("short sendmsg on a unix stream")),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// `recvmsg(2)` into `buf`, taking ownership of any `SCM_RIGHTS` fds that came
/// with it (`MSG_CMSG_CLOEXEC`). Returns the bytes read (0 at EOF) and the fds.
pub fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let payload = MAX_FDS_PER_MSG * mem::size_of::<RawFd>();
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(payload as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut msg = zeroed_msghdr();
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    let n = loop {
        // SAFETY: `msg` points at `iov` (into `buf`) and `control`, both valid for
        // writes of their lengths for the duration of the call.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        match cvt(n) {
            Ok(n) => break n as usize,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    };
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `msg.msg_control`/`msg_controllen`; the CMSG_*
    // macros walk only within that buffer. SCM_RIGHTS data are new fds that this
    // process now owns, each taken exactly once.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c);
                let len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..len / mem::size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    fds.push(owned_fd(fd));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::other("fds were cut off (MSG_CTRUNC)"));
    }
    Ok((n, fds))
}

/// The pid of the process at the other end of a Unix socket (`SO_PEERCRED`).
pub fn peer_pid(sock: BorrowedFd<'_>) -> io::Result<u32> {
    // SAFETY: ucred is plain data; getsockopt fills it.
    let mut cred: libc::ucred = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: valid pointers to a local ucred and its size.
    cvt(unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    })?;
    Ok(cred.pid as u32)
}

/// `IP_BIND_ADDRESS_NO_PORT`: a `bind()` to an address with port 0 picks no port;
/// `connect()` picks it, per destination, so one client address can have as many
/// upstream connections as the ephemeral range allows towards each server (4.2+).
/// Applies to IPv6 sockets too (it is an `IPPROTO_IP` option on both).
pub fn set_bind_address_no_port(fd: BorrowedFd<'_>) -> io::Result<()> {
    setsockopt_int(fd, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, 1)
}

/// The kernel's receive-side round-trip estimate of a TCP socket, microseconds
/// (`tcpi_rcv_rtt` of `TCP_INFO`; 0 until it has one).
pub fn tcp_rcv_rtt_us(fd: BorrowedFd<'_>) -> io::Result<u32> {
    // SAFETY: tcp_info is plain data; getsockopt fills at most `len` bytes of it.
    let mut info: libc::tcp_info = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: valid pointers to a local tcp_info and its size.
    cvt(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    })?;
    Ok(info.tcpi_rcv_rtt)
}

/// Sets the receive bound of an established connection's socket to `bytes`: the
/// receive buffer (forced past `net.core.rmem_max`, which needs `CAP_NET_ADMIN`;
/// else as far as that allows; locked, so autotuning stops) and the window clamp.
/// Set after the handshake, not before: the window scale the SYN announces is
/// fixed from the smaller of the clamp and the buffer then, and a small one would
/// cap the window at twice `bytes` for the connection's life, however the bound
/// grows later (measured: 64 KiB, 20 ms away, stuck at 4 MB/s).
pub fn set_receive_bound(fd: BorrowedFd<'_>, bytes: usize) -> io::Result<()> {
    set_recv_buffer_force(fd, bytes)?;
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_WINDOW_CLAMP, bytes)
}

/// `TCP_NOTSENT_LOWAT` of `bytes`: how much unsent data the send queue takes
/// before a write would block (it does not limit the window).
pub fn set_send_bound(fd: BorrowedFd<'_>, bytes: usize) -> io::Result<()> {
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT, bytes)
}

/// `setsockopt` of one `int` option (`v` capped at `i32::MAX / 2`, the most the
/// kernel's buffer options take before doubling).
fn setsockopt_int(fd: BorrowedFd<'_>, level: i32, opt: i32, v: usize) -> io::Result<()> {
    let v = v.min(i32::MAX as usize / 2) as libc::c_int;
    // SAFETY: setsockopt with a pointer to a local c_int and its exact size.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            (&v as *const libc::c_int).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// Bounds what one stalled relay direction can keep queued in the kernel, on a
/// listener (accepted sockets copy all three): `SO_RCVBUF` (the receive queue a
/// peer can fill while the engine is not reading it; setting it also stops the
/// kernel's receive autotuning from growing it, and with it the window, past this),
/// `TCP_WINDOW_CLAMP` (the advertised window) and `TCP_NOTSENT_LOWAT` (see
/// [`set_send_bound`]). The window scale of accepted connections is fixed from them
/// at the handshake, so their window stays within about twice `bytes`.
pub fn set_stall_bounds(fd: BorrowedFd<'_>, bytes: usize) -> io::Result<()> {
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, bytes)?;
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_WINDOW_CLAMP, bytes)?;
    set_send_bound(fd, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_eff_reads_the_effective_mask() {
        let status = "Name:\tengine\nCapInh:\t0000000000000000\nCapPrm:\t000001fffeffffff\n\
                      CapEff:\t000001fffeffbfff\nCapBnd:\t000001fffeffffff\n";
        let eff = cap_eff(status).unwrap();
        assert_eq!(eff, 0x1fffeffbfff);
        assert_eq!(eff & (1 << 14), 0, "CAP_IPC_LOCK is bit 14, cleared here");
        assert_eq!(cap_eff("Name:\tx\n"), None);
        assert_eq!(cap_eff("CapEff:\tzz\n"), None);
    }
}
