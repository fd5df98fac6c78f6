//! The engine's listening sockets, opened once for all workers.
//!
//! Each worker gets a TCP listener and a UDP tproxy socket per address family, all
//! on the same port in one `SO_REUSEPORT` group: the kernel spreads connections and
//! datagrams over the workers by flow hash (the tproxy socket lookup honours
//! reuseport groups). They are opened by the main thread, not by the workers, so
//! that a takeover can hand the very same sockets to a new engine: a socket that
//! moves keeps its accept queue and receive queue, so nothing queued is lost.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};

use socket2::{Domain, Protocol, SockRef, Socket, Type};

use crate::config::Config;
use crate::sys;

/// The listen backlog of every TCP listener: at most this many clients wait in one
/// listener's accept queue (the kernel caps it at `net.core.somaxconn`).
pub const LISTEN_BACKLOG: usize = 4096;

/// Transport of a listening socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

/// One listening socket.
#[derive(Debug)]
pub struct Listen {
    pub proto: Proto,
    /// IPv6 (else IPv4).
    pub v6: bool,
    pub fd: OwnedFd,
}

impl Listen {
    /// Describes an inherited socket by asking the kernel what it is.
    pub fn inspect(fd: OwnedFd) -> io::Result<(Listen, u16)> {
        let s = SockRef::from(&fd);
        let proto = match s.r#type()? {
            Type::STREAM => Proto::Tcp,
            Type::DGRAM => Proto::Udp,
            _ => return Err(io::Error::other("not a TCP or UDP socket")),
        };
        let local = s
            .local_addr()?
            .as_socket()
            .ok_or_else(|| io::Error::other("not an inet socket"))?;
        let v6 = matches!(local, SocketAddr::V6(_));
        Ok((Listen { proto, v6, fd }, local.port()))
    }
}

/// Creates one transparent TCP listener.
///
/// `IP_TRANSPARENT` must be set before `bind()`: nft `tproxy` only assigns packets to
/// transparent sockets. Keepalive set here is inherited by every accepted socket (the
/// kernel copies the listener's options and starts the timer on the child), so the
/// client side costs no setsockopt per connection.
pub fn tcp_listener(
    v6: bool,
    port: u16,
    keepalive: Option<u64>,
    stall_bytes: Option<usize>,
) -> io::Result<OwnedFd> {
    let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
    let s = Socket::new(domain, Type::STREAM.nonblocking(), Some(Protocol::TCP))?;
    if v6 {
        // v4 has its own listener; a dual-stack socket would see v4 as mapped addresses.
        s.set_only_v6(true)?;
        s.set_ip_transparent_v6(true)?;
    } else {
        s.set_ip_transparent_v4(true)?;
    }
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    set_keepalive(s.as_fd(), keepalive)?;
    if let Some(b) = stall_bytes {
        sys::set_stall_bounds(s.as_fd(), b)?;
    }
    s.bind(&sys::unspecified(v6, port).into())?;
    s.listen(LISTEN_BACKLOG as i32)?;
    Ok(s.into())
}

/// Keepalive as `--keepalive-s` asks: first probe after `idle_s` quiet seconds, then
/// every 15 s, 4 probes; `None` turns it off.
pub fn set_keepalive(fd: std::os::fd::BorrowedFd<'_>, idle_s: Option<u64>) -> io::Result<()> {
    let s = SockRef::from(&fd);
    match idle_s {
        Some(t) => s.set_tcp_keepalive(
            &socket2::TcpKeepalive::new()
                .with_time(std::time::Duration::from_secs(t))
                .with_interval(std::time::Duration::from_secs(15))
                .with_retries(4),
        ),
        None => s.set_keepalive(false),
    }
}

/// Creates one transparent UDP socket that receives intercepted datagrams with
/// their original destination.
pub fn udp_tproxy(v6: bool, port: u16) -> io::Result<OwnedFd> {
    let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
    let s = Socket::new(domain, Type::DGRAM.nonblocking(), Some(Protocol::UDP))?;
    if v6 {
        s.set_only_v6(true)?;
        s.set_ip_transparent_v6(true)?;
    } else {
        s.set_ip_transparent_v4(true)?;
    }
    sys::set_recv_orig_dst(s.as_fd(), v6)?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    // Bursts land here while the worker is busy with other completions; a queue
    // beyond the default rmem_max (208 KiB, ~150 full-size datagrams) absorbs them.
    let _ = sys::set_recv_buffer_force(s.as_fd(), 8 << 20);
    s.bind(&sys::unspecified(v6, port).into())?;
    Ok(s.into())
}

/// The listening sockets of every worker, in worker order.
pub struct ListenSet {
    pub per_worker: Vec<Vec<Listen>>,
}

impl ListenSet {
    /// Gives every worker of `cfg` its sockets: `inherited` ones (from a takeover)
    /// first, dealt round-robin per (protocol, family) so that every inherited socket
    /// keeps being served even by fewer workers; then new sockets in the same
    /// reuseport group for workers that got none of a kind. Inherited sockets of a
    /// kind this configuration does not serve are closed.
    pub fn build(cfg: &Config, inherited: Vec<Listen>) -> Result<ListenSet, String> {
        let n = cfg.cores.len();
        let mut per_worker: Vec<Vec<Listen>> = (0..n).map(|_| Vec::new()).collect();
        let mut kinds = Vec::new();
        if cfg.tcp {
            kinds.push(Proto::Tcp);
        }
        if cfg.udp {
            kinds.push(Proto::Udp);
        }
        let mut inherited = inherited;
        for &proto in &kinds {
            for v6 in cfg.families() {
                let mine: Vec<Listen> = {
                    let (take, keep) = inherited
                        .into_iter()
                        .partition(|l| l.proto == proto && l.v6 == v6);
                    inherited = keep;
                    take
                };
                let had = mine.len();
                for (i, mut l) in mine.into_iter().enumerate() {
                    if proto == Proto::Tcp {
                        set_keepalive(l.fd.as_fd(), cfg.keepalive_s)
                            .map_err(|e| format!("keepalive on an inherited listener: {e}"))?;
                        if let Some(b) = cfg.stall_buffer_bytes {
                            sys::set_stall_bounds(l.fd.as_fd(), b).map_err(|e| {
                                format!("buffer bounds on an inherited listener: {e}")
                            })?;
                        }
                    }
                    l.v6 = v6;
                    per_worker[i % n].push(l);
                }
                for w in per_worker.iter_mut().skip(had.min(n)) {
                    let what = match proto {
                        Proto::Tcp => "TCP listener",
                        Proto::Udp => "UDP socket",
                    };
                    let fd = match proto {
                        Proto::Tcp => {
                            tcp_listener(v6, cfg.port, cfg.keepalive_s, cfg.stall_buffer_bytes)
                        }
                        Proto::Udp => udp_tproxy(v6, cfg.port),
                    }
                    .map_err(|e| format!("{what} on {}: {e}", sys::unspecified(v6, cfg.port)))?;
                    w.push(Listen { proto, v6, fd });
                }
            }
        }
        Ok(ListenSet { per_worker })
    }

    /// Duplicates of every socket, for handing them over to a successor.
    pub fn dup_all(&self) -> io::Result<Vec<Listen>> {
        self.per_worker
            .iter()
            .flatten()
            .map(|l| {
                Ok(Listen {
                    proto: l.proto,
                    v6: l.v6,
                    fd: l.fd.try_clone()?,
                })
            })
            .collect()
    }
}
