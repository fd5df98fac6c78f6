//! Reply sockets: transparent UDP sockets bound to an original destination, so that
//! answers reach the client from the address AND port it addressed.
//!
//! `IP_PKTINFO` on a transparent socket can only set the source address, not the
//! port, so each original destination in use gets one socket bound to it, shared
//! by every flow towards it on this core and reference-counted: fds are bounded by
//! `flows + distinct destinations`. Each socket holds one credit of the fd pool
//! (`crate::fdpool`) while it is open; the caller takes it before the socket is
//! made ([`Replies::needs_socket`]).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering::Relaxed;

use socket2::{Domain, Protocol, Socket, Type};

use crate::addrs::OrigDst;
use crate::fdpool::Credit;
use crate::stats::CoreStats;

/// A transparent socket bound to the original destination, to answer from it.
/// Non-local bind works because of `IP_TRANSPARENT`; `SO_REUSEADDR` lets every core
/// (and a restarted engine) bind the same address. Ports below 1024 need
/// CAP_NET_BIND_SERVICE.
fn reply_socket(orig: &SocketAddr, mark: u32) -> io::Result<OwnedFd> {
    let s = if orig.is_ipv6() {
        let s = Socket::new(Domain::IPV6, Type::DGRAM.nonblocking(), Some(Protocol::UDP))?;
        s.set_only_v6(true)?;
        s.set_ip_transparent_v6(true)?;
        s
    } else {
        let s = Socket::new(Domain::IPV4, Type::DGRAM.nonblocking(), Some(Protocol::UDP))?;
        s.set_ip_transparent_v4(true)?;
        s
    };
    s.set_reuse_address(true)?;
    if mark != 0 {
        s.set_mark(mark)?;
    }
    // It never needs to receive; a tiny queue bounds what could be queued on it.
    let _ = s.set_recv_buffer_size(1);
    s.bind(&(*orig).into())?;
    Ok(s.into())
}

struct ReplySocket {
    fd: OwnedFd,
    refs: u32,
    /// The fd's credit, given back after `fd` (declared before it) is closed.
    _credit: Credit,
}

/// The reply sockets of one core.
#[derive(Default)]
pub struct Replies {
    by_dst: HashMap<OrigDst, ReplySocket>,
}

impl Replies {
    /// Whether a reference on `orig` needs a new socket (and so a credit).
    pub fn needs_socket(&self, orig: &OrigDst) -> bool {
        !self.by_dst.contains_key(orig)
    }

    /// Takes a reference on the reply socket of `orig`, opening it if needed with
    /// `credit` (taken by the caller when [`needs_socket`](Self::needs_socket)
    /// said so; given back if the socket cannot be made).
    pub fn acquire(
        &mut self,
        stats: &CoreStats,
        orig: OrigDst,
        mark: u32,
        credit: Option<Credit>,
    ) -> io::Result<()> {
        if let Some(r) = self.by_dst.get_mut(&orig) {
            r.refs += 1;
            return Ok(());
        }
        let Some(credit) = credit else {
            return Err(io::Error::other("no fd credit for a reply socket"));
        };
        let fd = reply_socket(&orig.0, mark)?;
        self.by_dst.insert(
            orig,
            ReplySocket {
                fd,
                refs: 1,
                _credit: credit,
            },
        );
        stats.udp_reply_sockets.fetch_add(1, Relaxed);
        Ok(())
    }

    /// Drops a reference; the last one closes the socket.
    pub fn release(&mut self, stats: &CoreStats, orig: OrigDst) {
        if let Some(r) = self.by_dst.get_mut(&orig) {
            r.refs -= 1;
            if r.refs == 0 {
                self.by_dst.remove(&orig);
                stats.udp_reply_sockets.fetch_sub(1, Relaxed);
            }
        }
    }

    /// The fd that answers from `orig`.
    pub fn fd(&self, orig: &OrigDst) -> Option<i32> {
        self.by_dst.get(orig).map(|r| r.fd.as_raw_fd())
    }
}
