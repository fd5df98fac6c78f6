//! Upstream sockets: marked so the interception rules never catch them, and bound
//! to the client's own address under `--source client-ip|client`.
//!
//! With `client-ip` an upstream socket gets `IP_TRANSPARENT` (a non-local bind) and
//! binds to the client's address with `IP_BIND_ADDRESS_NO_PORT`, so `connect()` picks
//! the port per destination (HAProxy's `usesrc clientip`); with `client` it binds to
//! the client's address and port as well. The server then sees the client, and its
//! replies, addressed to the client, must come back through this router, where
//! `setup apply --source ...` delivers them to the engine (docs/deployment.md).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};

use socket2::{Domain, Protocol, Socket, Type};

use crate::config::SourceMode;
use crate::sys;

/// How an upstream socket was bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bound {
    /// From the router's own address (`--source router`, or a family mismatch).
    Router,
    /// From the client's address.
    Client,
}

/// Why no upstream socket could be made.
#[derive(Debug)]
pub enum UpstreamError {
    /// Creating or configuring the socket failed (fds, permissions).
    Socket(io::Error),
    /// Binding to the client's address failed (`EADDRINUSE`, `EADDRNOTAVAIL`).
    Source(io::Error),
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamError::Socket(e) => write!(f, "{e}"),
            UpstreamError::Source(e) => write!(f, "binding to the client's address: {e}"),
        }
    }
}

/// A non-blocking upstream socket of `ty` towards `target`, marked with `mark`,
/// bound as `source` says for `client`. A client of the other address family than
/// the target (a redirect across families) cannot be impersonated: such a socket
/// is bound from the router ([`Bound::Router`]) and the caller counts it.
pub fn socket(
    ty: Type,
    target: SocketAddr,
    client: SocketAddr,
    source: SourceMode,
    mark: u32,
) -> Result<(OwnedFd, Bound), UpstreamError> {
    let v6 = target.is_ipv6();
    let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
    let proto = if ty == Type::STREAM {
        Protocol::TCP
    } else {
        Protocol::UDP
    };
    let s = Socket::new(domain, ty.nonblocking(), Some(proto)).map_err(UpstreamError::Socket)?;
    if mark != 0 {
        s.set_mark(mark).map_err(UpstreamError::Socket)?;
    }
    let spoof = source != SourceMode::Router && client.is_ipv6() == v6;
    if !spoof {
        return Ok((s.into(), Bound::Router));
    }
    if v6 {
        s.set_ip_transparent_v6(true)
            .map_err(UpstreamError::Socket)?;
    } else {
        s.set_ip_transparent_v4(true)
            .map_err(UpstreamError::Socket)?;
    }
    let from = match source {
        SourceMode::Client => {
            // The client's own port: several connections of one client to one
            // server at once are impossible, and the 4-tuple equals the client's
            // own flow (docs/deployment.md, the `client` caveat).
            s.set_reuse_address(true).map_err(UpstreamError::Socket)?;
            client
        }
        _ => {
            if ty == Type::STREAM {
                sys::set_bind_address_no_port(s.as_fd()).map_err(UpstreamError::Socket)?;
            }
            SocketAddr::new(client.ip(), 0)
        }
    };
    s.bind(&from.into()).map_err(UpstreamError::Source)?;
    Ok((s.into(), Bound::Client))
}
