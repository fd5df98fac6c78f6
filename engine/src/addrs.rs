//! Types that say which address is which.
//!
//! The engine juggles several socket addresses per connection or flow; these
//! newtypes keep them from being swapped by accident across modules.

use std::net::SocketAddr;

/// The client's address: the source of an intercepted connection or datagram, to which
/// replies are sent (from the [`OrigDst`] address).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientAddr(pub SocketAddr);

/// The original destination: where the client addressed the datagram before
/// TPROXY diverted it (`getsockname()` of an accepted TCP socket, or the `IP_ORIGDSTADDR` /
/// `IPV6_ORIGDSTADDR` cmsg of a datagram). It is
/// the server the upstream socket talks to, and the source address and
/// port replies to the client must carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OrigDst(pub SocketAddr);

/// Where the engine actually connects or sends: the [`OrigDst`], unless the policy
/// redirected the connection or flow elsewhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UpstreamAddr(pub SocketAddr);
