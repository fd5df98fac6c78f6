//! Command line and the resolved configuration every worker shares.

use std::net::SocketAddr;

use clap::{Parser, ValueEnum};

/// How bytes move between the two sockets of a TCP connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RelayMode {
    /// Zero-copy: readiness through the ring, then non-blocking `splice(2)` through a
    /// per-core pooled pipe on the worker's own thread.
    Splice,
    /// Buffered copy: ring `RECV` into a provided buffer ring, then ring `SEND`.
    Copy,
}

impl std::fmt::Display for RelayMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RelayMode::Splice => "splice",
            RelayMode::Copy => "copy",
        })
    }
}

/// Which source address upstream connections and datagrams carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SourceMode {
    /// The router's own address (no return path needed).
    Router,
    /// The client's address, a port picked per destination (needs
    /// `setup apply --source client-ip`).
    ClientIp,
    /// The client's address and port (same; see the conntrack caveat in
    /// docs/deployment.md).
    Client,
}

impl std::fmt::Display for SourceMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SourceMode::Router => "router",
            SourceMode::ClientIp => "client-ip",
            SourceMode::Client => "client",
        })
    }
}

/// How UDP flows are mapped and filtered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum UdpNat {
    /// One upstream socket per (client, destination), connected: only that
    /// destination can answer.
    Symmetric,
    /// One upstream socket per client source for every destination, not connected:
    /// any remote that learns the mapping can reach the client (games, WebRTC,
    /// STUN); see the security note in docs/deployment.md.
    FullCone,
}

fn parse_mark(s: &str) -> Result<u32, String> {
    let v = if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u32::from_str_radix(hex, 16)
    } else {
        s.parse()
    }
    .map_err(|_| format!("`{s}` is not a mark (decimal or 0x-prefixed hex)"))?;
    if v & 0x1 != 0 {
        // The interception rules route fwmark 0x1/0x1 to `lo` (docs/CONTRACTS.md); an
        // upstream socket carrying that bit would be looped back into the engine.
        return Err(format!(
            "mark {s} includes the interception bit 0x1: upstream traffic would be routed \
             back to the engine; use an even mark such as 0x2"
        ));
    }
    Ok(v)
}

fn parse_metrics_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| {
        format!(
            "`{s}` is not an address and port such as 127.0.0.1:9108 or [::1]:9108 \
             (names are not resolved)"
        )
    })
}

/// ringrelay engine: thread-per-core io_uring transparent proxy.
///
/// Accepts TCP and UDP handed over by TPROXY rules (see `setup apply`) on every
/// listed core and relays it to the original destination.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "engine",
    about,
    long_about = None,
    disable_version_flag = true,
    after_help = "Signals: SIGTERM/SIGINT stop accepting and drain for --drain-timeout-s \
                  (a second one exits at once); SIGUSR1 prints the per-core counters; \
                  SIGHUP is logged and ignored (nothing to reload without a rules file). \
                  With --takeover, starting another engine on the same PATH hands the \
                  sockets over and this one drains."
)]
pub struct Args {
    /// Decide every connection and flow with this rules file (docs/rules.md);
    /// SIGHUP re-reads it. Without it everything is relayed.
    #[arg(long, value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,

    /// Check a rules file and exit: 0 when it is valid, else 1 and every error as
    /// FILE:LINE:COL: message.
    #[arg(long, value_name = "FILE")]
    pub check_config: Option<std::path::PathBuf>,

    /// Longest wait for a client's first bytes when a rule needs the server name
    /// (TLS SNI, HTTP Host); then it is decided without one.
    #[arg(long, default_value_t = 300, value_name = "MS")]
    pub sniff_timeout_ms: u64,

    /// Write one JSON line per finished TCP connection and ended UDP flow to this
    /// file (`-`: standard output); reopened on SIGHUP (logrotate). Schema:
    /// docs/deployment.md.
    #[arg(long, value_name = "PATH")]
    pub flow_log: Option<String>,

    /// Restart without dropping anything: if an engine serves this Unix socket,
    /// take its listening sockets over and let it drain; either way, serve it for
    /// the next engine (e.g. /run/ringrelay/takeover.sock).
    #[arg(long, value_name = "PATH")]
    pub takeover: Option<std::path::PathBuf>,

    /// Log lines as `text` (key=value) or `json` (one object per line), on stderr.
    #[arg(long, value_enum, default_value_t = crate::log::Format::Text)]
    pub log_format: crate::log::Format,

    /// Drop log lines below this level: error, warn, info, debug.
    #[arg(long, value_enum, default_value_t = crate::log::Level::Info)]
    pub log_level: crate::log::Level,

    /// Print the version, git revision, build profile, kernel and the io_uring
    /// features found, then exit.
    #[arg(short = 'V', long)]
    pub version: bool,

    /// CPUs to run one pinned worker on each, e.g. `0-7` or `0,2,4-5`.
    /// Default: every CPU this process may run on.
    #[arg(long, value_name = "LIST")]
    pub cores: Option<String>,

    /// Transparent port for TCP and UDP, IPv4 and IPv6 (must match `setup --port`).
    #[arg(long, default_value_t = 15001)]
    pub port: u16,

    /// TCP relay: `splice` (zero-copy through pipes) or `copy` (provided buffers).
    #[arg(long, value_enum, default_value_t = RelayMode::Splice)]
    pub relay: RelayMode,

    /// SO_MARK on every upstream socket so the interception rules never catch the
    /// engine's own traffic (must match `setup --bypass-mark`; must not contain 0x1).
    #[arg(long, default_value = "0x2", value_parser = parse_mark)]
    pub mark: u32,

    /// Source of upstream connections and datagrams: `router` (the router's own
    /// address), `client-ip` (the client's address: servers see the client; needs
    /// `setup apply --source client-ip` for the return path) or `client` (its
    /// address and port).
    #[arg(long, value_enum, default_value_t = SourceMode::Router)]
    pub source: SourceMode,

    /// UDP mapping: `symmetric` (one connected upstream socket per client and
    /// destination) or `full-cone` (one per client source, open to any remote).
    #[arg(long, value_enum, default_value_t = UdpNat::Symmetric)]
    pub udp_nat: UdpNat,

    /// Upstream TCP connect timeout; on expiry the client is reset.
    #[arg(long, default_value_t = 5000, value_name = "MS")]
    pub connect_timeout_ms: u64,

    /// Reset TCP connections with no traffic in either direction for this long;
    /// 0 never times them out. Long by default, like a router's connection tracking
    /// (established: 5 days): SSH sessions, database pools and websockets idle for
    /// minutes are normal. Dead peers are found by keepalive instead.
    #[arg(long, default_value_t = 3600, value_name = "SECONDS")]
    pub idle_timeout_s: u64,

    /// Reset a connection that one side has half-closed (its FIN was passed on)
    /// when nothing moved for this long; 0: never (HAProxy's `timeout client-fin`).
    #[arg(long, default_value_t = 120, value_name = "SECONDS")]
    pub half_closed_timeout_s: u64,

    /// Bound what one relayed direction keeps queued in the kernel when its reader
    /// stalls: receive buffer, TCP_WINDOW_CLAMP and TCP_NOTSENT_LOWAT of this many
    /// bytes on both sockets; 0 leaves it to the kernel's autotuning. An upstream
    /// socket whose direction fills its window every round trip while the client
    /// keeps up gets its receive bound made four times larger, once a second, up to
    /// --stall-buffer-max-bytes, so downloads over long fat paths still reach full
    /// speed. The client side's window stays about twice this: raise it where
    /// clients are far away.
    #[arg(long, default_value_t = 64 * 1024, value_name = "BYTES")]
    pub stall_buffer_bytes: usize,

    /// The most a direction's receive bound grows to (see --stall-buffer-bytes): the
    /// window of one connection, so with a round trip of R its most throughput is
    /// about BYTES / R (4 MiB: 1 Gbit/s at 32 ms); equal to --stall-buffer-bytes: a
    /// fixed bound.
    #[arg(long, default_value_t = 4 * 1024 * 1024, value_name = "BYTES")]
    pub stall_buffer_max_bytes: usize,

    /// Once a completion is in, let a worker sleep up to this long for up to 64 of
    /// them before it wakes (io_uring min-wait, Linux 6.12+): fewer wakeups, fuller
    /// batches and fuller UDP GSO runs, for less CPU per connection, request and
    /// datagram under load, at up to this much added latency at each wakeup. 0 (the
    /// default): wake at the first completion. Worth it for bulk and many clients,
    /// not for a few latency-bound exchanges (see docs/benchmarks.md). On an older
    /// kernel the engine says so and wakes at the first.
    #[arg(long, default_value_t = 0, value_name = "MICROSECONDS",
          value_parser = clap::value_parser!(u32).range(0..=10_000))]
    pub batch_wait_us: u32,

    /// TCP keepalive on both sockets of every connection: first probe after this
    /// long without traffic, then every 15 s, reset after 4 unanswered probes (a dead
    /// peer is found after about SECONDS + 60 s); 0 turns keepalive off.
    #[arg(long, default_value_t = 120, value_name = "SECONDS")]
    pub keepalive_s: u64,

    /// Maximum concurrent TCP connections, all cores together. Every connection also
    /// draws 2 credits (its two fds) from one pool sized from RLIMIT_NOFILE and
    /// shared with pipes and UDP sockets, so the engine never runs out of file
    /// descriptors. Default: every credit but a small floor kept for UDP (9,424 at
    /// RLIMIT_NOFILE 20000 on 2 cores).
    #[arg(long, value_name = "N")]
    pub max_conns: Option<usize>,

    /// Most pipes of the splice relay, all cores together (2 fds and up to
    /// --pipe-size of kernel memory each, held only while a direction has bytes in
    /// flight), each also drawing 2 credits from the fd pool. When all are in use, or
    /// no credit is left, a direction copies through its own buffer
    /// (`splice_copy_fallbacks`). Default: a thirty-second of the fd pool.
    #[arg(long, value_name = "N")]
    pub max_pipes: Option<usize>,

    /// On SIGINT/SIGTERM, let live connections finish for this long, then reset them.
    #[arg(long, default_value_t = 10, value_name = "SECONDS")]
    pub drain_timeout_s: u64,

    /// Pipe size for splice relays (F_SETPIPE_SZ); 0 keeps the kernel's 64 KiB. The
    /// 256 KiB default moved more bulk TCP per core than 64 KiB in the bench (about
    /// 40 % with 4 streams, docs/benchmarks.md). A pipe holds data only while it is in
    /// flight.
    #[arg(long, default_value_t = DEFAULT_PIPE_SIZE, value_name = "BYTES")]
    pub pipe_size: usize,

    /// Buffer size of the copy relay's provided buffers.
    #[arg(long, default_value_t = 65536, value_name = "BYTES")]
    pub copy_buf_size: usize,

    /// Do not relay IPv6 (no v6 listeners).
    #[arg(long)]
    pub no_ipv6: bool,

    /// Do not relay UDP.
    #[arg(long)]
    pub no_udp: bool,

    /// Do not relay TCP.
    #[arg(long)]
    pub no_tcp: bool,

    /// Expire UDP flows idle for this long.
    #[arg(long, default_value_t = 30, value_name = "SECONDS")]
    pub udp_idle_timeout_s: u64,

    /// Expire UDP flows that saw a single request and its answer (DNS-like) after
    /// this long instead.
    #[arg(long, default_value_t = 5, value_name = "SECONDS")]
    pub udp_single_exchange_timeout_s: u64,

    /// Maximum UDP flows, all cores together (each holds one upstream socket, and
    /// reply sockets are shared per destination, one fd-pool credit each); when full,
    /// or the pool has no credit left, the core's least recently used flow is
    /// evicted. Default: an eighth of the fd pool.
    #[arg(long, value_name = "N")]
    pub udp_max_flows: Option<usize>,

    /// Serve Prometheus metrics (text format 0.0.4) on `http://ADDR/metrics`, e.g.
    /// `127.0.0.1:9108`, from a thread of its own off the worker cores. Plain HTTP
    /// without authentication: bind it to loopback or a management address.
    #[arg(long, value_name = "ADDR", value_parser = parse_metrics_addr)]
    pub metrics: Option<SocketAddr>,
}

/// Configuration resolved from [`Args`] and the environment, shared by all workers.
#[derive(Debug, Clone)]
pub struct Config {
    pub cores: Vec<usize>,
    pub port: u16,
    pub relay: RelayMode,
    pub mark: u32,
    pub source: SourceMode,
    pub udp_nat: UdpNat,
    pub connect_timeout_ms: u64,
    /// `None`: never time out idle connections.
    pub idle_timeout_s: Option<u64>,
    /// `None`: never time out half-closed connections.
    pub half_closed_timeout_s: Option<u64>,
    /// TCP keepalive idle time; `None`: keepalive off.
    pub keepalive_s: Option<u64>,
    /// Per-socket bound on what a stalled direction keeps queued in the kernel;
    /// `None`: the kernel's autotuning alone.
    pub stall_buffer_bytes: Option<usize>,
    /// The most a receive bound grows to; at most `i32::MAX / 2`.
    pub stall_buffer_max_bytes: usize,
    /// `--batch-wait-us` (0 where the kernel lacks min-wait).
    pub batch_wait_us: u32,
    /// TCP connections, all cores together (`--max-conns`).
    pub max_conns: usize,
    /// The fd credit pool every core draws on ([`crate::fdpool`]).
    pub fds: std::sync::Arc<crate::fdpool::FdPool>,
    /// Splice relay's pipe pool bound, per core.
    pub max_pipes_per_core: usize,
    /// Per core: [`PARK_TOTAL`] split over the cores.
    pub park_max_per_core: usize,
    pub drain_timeout_s: u64,
    pub pipe_size: Option<usize>,
    pub copy_buf_size: usize,
    pub ipv6: bool,
    pub tcp: bool,
    pub udp: bool,
    pub udp_idle_timeout_s: u64,
    pub udp_single_exchange_timeout_s: u64,
    /// Per core.
    pub udp_max_flows_per_core: usize,
    /// Optional io_uring features this kernel has (probed at startup).
    pub features: crate::core::ring::Features,
    /// Where flow log lines go, if anywhere.
    pub flow_log: Option<crate::flowlog::Target>,
    /// How long a connection that needs the server name may take to send it.
    pub sniff_timeout_ms: u64,
    /// `--metrics`: where to serve Prometheus metrics; `None`: nowhere.
    pub metrics: Option<SocketAddr>,
}

impl Config {
    /// The address families to listen on: IPv4 (`false`), and IPv6 (`true`) unless
    /// disabled.
    pub fn families(&self) -> Vec<bool> {
        if self.ipv6 {
            vec![false, true]
        } else {
            vec![false]
        }
    }
}

/// Default `--pipe-size`: 256 KiB.
pub const DEFAULT_PIPE_SIZE: usize = 256 * 1024;

/// File descriptors one TCP connection holds: client and upstream. Splice pipes
/// are counted apart: they come from a bounded pool, and a connection holds one only
/// while a direction has bytes in flight.
pub const FDS_PER_CONN: usize = 2;

/// Fds kept aside, whatever the core count, for what the fd pool does not count:
/// stdio, the signal pipe, the metrics and takeover sockets, the flow log, and
/// clients parked while at the connection limit ([`PARK_TOTAL`]).
pub const FD_RESERVE: usize = 512;

/// Fds kept aside per core on top of [`FD_RESERVE`]: its ring, control eventfd (and
/// the main thread's duplicate), TCP and UDP listeners of both families and their
/// duplicates for a takeover successor (`Engine::handover`), and the accepts in
/// flight that overshoot the limit before they park.
pub const FD_RESERVE_PER_CORE: usize = 16;

/// Clients a multishot burst accepted past the limit before its cancel took effect
/// wait (holding only their socket) for a free slot; beyond this many, all cores
/// together, they are reset. Half of [`FD_RESERVE`], whatever the core count.
pub const PARK_TOTAL: usize = 256;

/// Fds outside the pool's credits for `cores` workers.
pub fn fd_reserve(cores: usize) -> usize {
    FD_RESERVE + FD_RESERVE_PER_CORE * cores
}

/// What RLIMIT_NOFILE allows, all cores together ([`crate::fdpool`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// Credits of the fd pool: every fd the workers hold beyond the reserve.
    pub credits: usize,
    /// Credits TCP may not take (0 without UDP).
    pub udp_floor: usize,
    /// Default `--max-conns`: every credit TCP may take, 2 per connection.
    pub conns: usize,
    /// Default `--udp-max-flows`.
    pub flows: usize,
    /// Default `--max-pipes` (0 in copy mode).
    pub pipes: usize,
}

/// Sizes the fd pool and the default caps from RLIMIT_NOFILE.
///
/// Connections, pipes and UDP sockets all draw on the same credits, so the caps are
/// not a split: by default connections may take every credit but the UDP floor
/// (then pipes fall back to copying and new UDP flows live on the floor), and UDP
/// flows (2 fds each at worst: the upstream socket and a reply socket) stop at an
/// eighth of the credits, so they can never hold more than a quarter.
pub fn fd_budget(nofile: usize, cores: usize, relay: RelayMode, udp: bool) -> Budget {
    let credits = nofile.saturating_sub(fd_reserve(cores));
    // A thirty-second: 608 credits at 20,000 fds, some 300 flows with their reply
    // sockets next to a full TCP side.
    let udp_floor = if udp { credits / 32 } else { 0 };
    Budget {
        credits,
        udp_floor,
        conns: (credits - udp_floor) / FDS_PER_CONN,
        flows: if udp { credits / 8 } else { 0 },
        // Bounds pipe memory (--pipe-size each); the credits bound their fds.
        pipes: match relay {
            RelayMode::Splice => credits / 32,
            RelayMode::Copy => 0,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_parse_and_refuse_the_interception_bit() {
        assert_eq!(parse_mark("0x2"), Ok(2));
        assert_eq!(parse_mark("16"), Ok(16));
        assert!(parse_mark("0x1").unwrap_err().contains("0x1"));
        assert!(parse_mark("3").is_err());
        assert!(parse_mark("zz").unwrap_err().contains("zz"));
    }

    #[test]
    fn metrics_addresses_parse_and_name_the_bad_one() {
        assert_eq!(
            parse_metrics_addr("127.0.0.1:9108"),
            Ok("127.0.0.1:9108".parse().unwrap())
        );
        assert!(parse_metrics_addr("[::1]:9108").is_ok());
        let err = parse_metrics_addr("localhost:9108").unwrap_err();
        assert!(
            err.contains("localhost:9108") && err.contains("127.0.0.1:9108"),
            "{err}"
        );
        assert!(parse_metrics_addr("127.0.0.1").is_err());
    }

    #[test]
    fn budget_never_exceeds_the_limit() {
        for relay in [RelayMode::Splice, RelayMode::Copy] {
            for udp in [true, false] {
                for cores in [1, 2, 4, 16] {
                    let b = fd_budget(20000, cores, relay, udp);
                    assert_eq!(b.credits + fd_reserve(cores), 20000);
                    // TCP alone never takes the floor.
                    assert!(b.conns * FDS_PER_CONN + b.udp_floor <= b.credits, "{b:?}");
                    // UDP flows at their cap, 2 fds each at worst, leave TCP most.
                    assert!(b.flows * 2 <= b.credits / 4, "{b:?}");
                    // The capacity goal: 9,000 connections per 20,000 fds in both
                    // modes, UDP on or off.
                    assert!(b.conns >= 9000, "{relay} {udp} {cores}: {b:?}");
                    assert_eq!(b.pipes > 0, relay == RelayMode::Splice, "{b:?}");
                    assert_eq!(b.udp_floor > 0, udp, "{b:?}");
                }
            }
        }
        let none = fd_budget(100, 2, RelayMode::Splice, true);
        assert_eq!(
            (none.credits, none.conns, none.flows, none.pipes),
            (0, 0, 0, 0)
        );
    }
}
