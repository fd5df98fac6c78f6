//! Load generators and servers for the scenarios, all plain blocking std sockets.
//!
//! Servers run on threads that entered the server namespace, clients on threads that
//! entered the client namespace; both are pinned to the cores the caller names. Every
//! loop is bounded twice: by the harness's `done` flag (or Ctrl-C, see
//! [`crate::stop_requested`]) and by a hard deadline of the run's duration plus
//! [`HARD_DEADLINE_SLACK`], so a wedged path cannot hang the benchmark.
//!
//! Blocking threads rather than an event loop: on veth most of a packet's journey
//! (router forwarding included) runs synchronously in the sender's system call, so one
//! thread per connection costs a context switch per message and keeps the generator
//! simple enough to trust. The same generator measures every target, so its own cost
//! cancels out in the ratios.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use hdrhistogram::Histogram;
use serde::Serialize;
use socket2::{Domain, Protocol, Socket, Type};

use crate::cpu::{self, CpuProbe, CpuUse};
use crate::lab::{self, addrs, Lab, Netns, Proto};

/// Server port of `tcp-bulk` (each scenario has its own, so TIME_WAIT left by one
/// scenario never meets another's connections).
pub const PORT_TCP_BULK: u16 = 5001;
/// Server port of `tcp-crr`.
pub const PORT_TCP_CRR: u16 = 5002;
/// Server port of `tcp-rr`.
pub const PORT_TCP_RR: u16 = 5003;
/// Server port of `udp-pps`.
pub const PORT_UDP_PPS: u16 = 5004;
/// Server port of `udp-rr`.
pub const PORT_UDP_RR: u16 = 5005;
/// Server port of the idle connections that `tcp-crr`'s idle variant holds open
/// through its window (a port of their own: the churn's probe and TIME_WAIT
/// accounting on [`PORT_TCP_CRR`] never see them).
pub const PORT_TCP_IDLE: u16 = 5006;
/// Server port of `tcp-capacity` (a port of its own, like [`PORT_TCP_IDLE`], so the
/// router's sockets on it are the capacity run's alone).
pub const PORT_TCP_CAPACITY: u16 = 5007;

/// Response size of `tcp-crr` and `tcp-rr` (the request size is the variant's size).
pub const RESPONSE_SIZE: usize = 128;
/// Client ephemeral ports for `tcp-crr`: windows of 4000, so at thousands of
/// connections per second every port comes around within a second or two and meets
/// the TIME_WAIT its previous connection left (docs/benchmarks.md, "Port reuse check").
pub const CRR_PORT_WINDOW: u16 = 4000;
/// First port of the first `tcp-crr` window; target `i` of a run gets window `i`.
pub const CRR_PORT_BASE: u16 = 20000;

/// The `tcp-crr` client port window of the `i`-th target of a run (wrapping after
/// eight). Each target gets its own: a proxy that relays the server's close leaves
/// TIME_WAIT sockets for the client's 4-tuples in the router, and for up to 60 s
/// after the proxy is gone the kernel's early demux attaches them to forwarded SYNs
/// of the same 4-tuple, which `ip_forward` then drops. The kernel baseline that
/// follows a proxy must not reuse the proxy's client ports.
pub fn crr_port_range(i: usize) -> (u16, u16) {
    let lo = CRR_PORT_BASE + (i % 8) as u16 * CRR_PORT_WINDOW;
    (lo, lo + CRR_PORT_WINDOW - 1)
}
/// Client ports of the idle connections: clear of every `tcp-crr` window
/// (20000-51999), so the churn never shares a port with them. 13000 ports, more than
/// the bench's own fd budget allows connections (see [`max_idle_conns`]).
pub const IDLE_PORTS: (u16, u16) = (52000, 64999);
/// Idle connections of `--scenario tcp-crr-idle` without `--idle-conns`: room for
/// every target at RLIMIT_NOFILE 20000 (the engine stops at about 9,400 connections
/// there in either relay, HAProxy at maxconn 7800, a `base-*` engine of before the
/// fd pool at about 2,400 or 6,800; the churn's clients need a few more),
/// docs/benchmarks.md.
pub const DEFAULT_IDLE_CONNS: usize = 2000;
/// Fds the bench keeps aside for everything but its idle connections (the churn's
/// clients and servers, listeners, the proxies' output pipes, /proc reads).
pub const IDLE_FD_RESERVE: u64 = 1024;
/// Fds the bench keeps aside for everything but the connections of `tcp-capacity`:
/// no churn runs next to them, so less than [`IDLE_FD_RESERVE`] (listeners, the
/// proxy's output pipes, `ss` and /proc reads).
pub const CAPACITY_FD_RESERVE: u64 = 400;
/// How long opening the idle connections may take, per connection, on top of
/// [`IO_TIMEOUT`]: far more than a healthy path needs (tens of µs each).
const IDLE_OPEN_PER_CONN: Duration = Duration::from_millis(2);
/// Connect timeout of an idle connection: a path that drops SYNs (a full backlog)
/// shows in a second, not in three.
pub(crate) const IDLE_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// After this many connect timeouts in a row the path is blocked: the remaining idle
/// connections are not tried (counted as `not_tried`).
const IDLE_CONNECT_GIVE_UP: usize = 3;
/// How long closing waits for the server sockets to see their connections end.
const IDLE_CLOSE_WAIT: Duration = Duration::from_secs(2);

/// The most idle connections this process can hold with an RLIMIT_NOFILE of
/// `fd_limit`: two fds each (the client's socket and the server's), besides
/// [`IDLE_FD_RESERVE`], and no more than [`IDLE_PORTS`] has ports.
pub fn max_idle_conns(fd_limit: u64) -> usize {
    held_conns_budget(fd_limit, IDLE_FD_RESERVE)
}

/// The most connections `tcp-capacity` opens (its default `--conns`): as
/// [`max_idle_conns`] with [`CAPACITY_FD_RESERVE`] kept aside; 9800 at 20000.
pub fn max_capacity_conns(fd_limit: u64) -> usize {
    held_conns_budget(fd_limit, CAPACITY_FD_RESERVE)
}

/// Connections this process holds both ends of (2 fds each) with `reserve` fds kept
/// aside, from client ports in [`IDLE_PORTS`].
fn held_conns_budget(fd_limit: u64, reserve: u64) -> usize {
    let by_fds = fd_limit.saturating_sub(reserve) / 2;
    let ports = (IDLE_PORTS.1 - IDLE_PORTS.0) as u64 + 1;
    by_fds.min(ports) as usize
}

/// How far past its duration a run may go before every loop gives up on its own.
pub const HARD_DEADLINE_SLACK: Duration = Duration::from_secs(10);
/// Upper bound on datagrams one `udp-pps` sender sends, whatever the duration.
pub const UDP_MAX_DATAGRAMS_PER_SENDER: u64 = 200_000_000;

/// Timeout of blocking socket calls in loops: how often a blocked thread looks at
/// its flags.
const POLL_SLICE: Duration = Duration::from_millis(50);
/// Connect timeout of clients: longer than the 1 s initial SYN retransmission, so a
/// lost SYN shows up as a latency outlier rather than an error.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A response that takes longer than this is counted as a timeout error.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// How long `udp-rr` waits for one reply.
const UDP_REPLY_TIMEOUT: Duration = Duration::from_millis(200);
/// Largest latency the histograms hold, in nanoseconds (60 s).
const HIST_MAX_NS: u64 = 60_000_000_000;

/// Address family of the load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// IPv4: client 198.18.0.2 to server 198.18.1.2 (the headline numbers).
    Ipv4,
    /// IPv6: client fd00:18:0::2 to server fd00:18:1::2.
    Ipv6,
}

impl Family {
    /// The server address the load targets.
    pub fn server_ip(self) -> IpAddr {
        match self {
            Family::Ipv4 => addrs::SERVER4_A.into(),
            Family::Ipv6 => addrs::SERVER6_A.into(),
        }
    }

    /// The client's own address.
    pub fn client_ip(self) -> IpAddr {
        match self {
            Family::Ipv4 => addrs::CLIENT4.into(),
            Family::Ipv6 => addrs::CLIENT6.into(),
        }
    }

    fn unspecified(self) -> IpAddr {
        match self {
            Family::Ipv4 => Ipv4Addr::UNSPECIFIED.into(),
            Family::Ipv6 => Ipv6Addr::UNSPECIFIED.into(),
        }
    }

    /// `ipv4` or `ipv6`.
    pub fn name(self) -> &'static str {
        match self {
            Family::Ipv4 => "ipv4",
            Family::Ipv6 => "ipv6",
        }
    }
}

/// A benchmark scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Scenario {
    /// Bulk TCP: 1 stream and N streams, Gbit/s counted by the server.
    #[serde(rename = "tcp-bulk")]
    TcpBulk,
    /// TCP connect / request / response / server-closes-first, connections per second.
    #[serde(rename = "tcp-crr")]
    TcpCrr,
    /// Request/response on persistent TCP connections: rate and latency.
    #[serde(rename = "tcp-rr")]
    TcpRr,
    /// UDP blast: delivered datagrams per second and loss, 64 B and 1400 B.
    #[serde(rename = "udp-pps")]
    UdpPps,
    /// UDP request/echo: rate and latency; replies must come from the address asked.
    #[serde(rename = "udp-rr")]
    UdpRr,
    /// How many connections a target holds, and their memory idle and stalled
    /// (`crate::capacity`); not in [`Scenario::ALL`].
    #[serde(rename = "tcp-capacity")]
    TcpCapacity,
}

/// One concrete run of a scenario: how many connections or senders, what size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Variant {
    /// Human label, e.g. `4 streams` or `64 B`.
    pub label: String,
    /// Streams, connections, client threads or senders.
    pub conns: usize,
    /// Write size (bulk), request size (rr, crr) or datagram payload (udp).
    pub size: usize,
    /// Idle connections held open through the router during the window (`tcp-crr`'s
    /// idle variant, see [`Variant::with_idle`]); 0 for none.
    pub idle: usize,
}

impl Variant {
    /// This variant with `n` idle connections held open through its window: label
    /// `16 clients, idle 2000`. Only `tcp-crr` runs them.
    pub fn with_idle(&self, n: usize) -> Variant {
        Variant {
            label: format!("{}, idle {n}", self.label),
            idle: n,
            ..self.clone()
        }
    }
}

impl Scenario {
    /// Every scenario in report order.
    pub const ALL: [Scenario; 5] = [
        Scenario::TcpBulk,
        Scenario::TcpCrr,
        Scenario::TcpRr,
        Scenario::UdpPps,
        Scenario::UdpRr,
    ];

    /// Every scenario, for parsing names: [`Scenario::ALL`] and `tcp-capacity`, which
    /// runs only when named (it takes tens of seconds a target and, for its stalled
    /// phase, hundreds of MB of kernel memory).
    pub const EVERY: [Scenario; 6] = [
        Scenario::TcpBulk,
        Scenario::TcpCrr,
        Scenario::TcpRr,
        Scenario::UdpPps,
        Scenario::UdpRr,
        Scenario::TcpCapacity,
    ];

    /// The CLI and report name.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::TcpBulk => "tcp-bulk",
            Scenario::TcpCrr => "tcp-crr",
            Scenario::TcpRr => "tcp-rr",
            Scenario::UdpPps => "udp-pps",
            Scenario::UdpRr => "udp-rr",
            Scenario::TcpCapacity => "tcp-capacity",
        }
    }

    /// Parses a CLI name.
    pub fn parse(s: &str) -> Option<Scenario> {
        Scenario::EVERY.into_iter().find(|x| x.name() == s)
    }

    /// True for the UDP scenarios (HAProxy cannot carry them).
    pub fn is_udp(self) -> bool {
        matches!(self, Scenario::UdpPps | Scenario::UdpRr)
    }

    /// The server port this scenario uses.
    pub fn port(self) -> u16 {
        match self {
            Scenario::TcpBulk => PORT_TCP_BULK,
            Scenario::TcpCrr => PORT_TCP_CRR,
            Scenario::TcpRr => PORT_TCP_RR,
            Scenario::UdpPps => PORT_UDP_PPS,
            Scenario::UdpRr => PORT_UDP_RR,
            Scenario::TcpCapacity => PORT_TCP_CAPACITY,
        }
    }

    /// The headline metric and its unit, for tables and charts.
    pub fn headline(self) -> (&'static str, &'static str) {
        match self {
            Scenario::TcpBulk => ("gbit_s", "Gbit/s"),
            Scenario::TcpCrr => ("conn_s", "conn/s"),
            Scenario::TcpRr | Scenario::UdpRr => ("req_s", "req/s"),
            Scenario::UdpPps => ("pps", "datagrams/s"),
            Scenario::TcpCapacity => ("conns_held", "conns held"),
        }
    }

    /// The unit of the CPU-per-work figure (see [`crate::cpu::per_unit`]).
    pub fn cpu_unit(self) -> &'static str {
        match self {
            Scenario::TcpBulk => "ms/GB",
            Scenario::TcpCrr => "µs/conn",
            Scenario::TcpRr | Scenario::UdpRr => "µs/req",
            Scenario::UdpPps => "µs/datagram",
            // No CPU figure: what it counts is memory.
            Scenario::TcpCapacity => "-",
        }
    }

    /// Default connection count (`--conns` overrides it).
    pub fn default_conns(self) -> usize {
        match self {
            Scenario::TcpBulk => 4,
            Scenario::TcpCrr => 16,
            Scenario::TcpRr => 8,
            Scenario::UdpPps => 1,
            Scenario::UdpRr => 4,
            Scenario::TcpCapacity => max_capacity_conns(crate::targets::fd_limit()),
        }
    }

    /// The variants to run; `conns` and `size` override the defaults.
    pub fn variants(self, conns: Option<usize>, size: Option<usize>) -> Vec<Variant> {
        let n = conns.unwrap_or(self.default_conns()).max(1);
        let v = |label: String, conns: usize, size: usize| Variant {
            label,
            conns,
            size,
            idle: 0,
        };
        match self {
            Scenario::TcpBulk => {
                let size = size.unwrap_or(128 * 1024);
                let mut out = vec![v("1 stream".into(), 1, size)];
                if n > 1 {
                    out.push(v(format!("{n} streams"), n, size));
                }
                out
            }
            Scenario::TcpCrr => vec![v(format!("{n} clients"), n, size.unwrap_or(64))],
            Scenario::TcpRr => vec![v(format!("{n} conns"), n, size.unwrap_or(64))],
            Scenario::UdpPps => match size {
                Some(s) => vec![v(format!("{s} B"), n, s)],
                None => vec![v("64 B".into(), n, 64), v("1400 B".into(), n, 1400)],
            },
            Scenario::UdpRr => vec![v(format!("{n} clients"), n, size.unwrap_or(64).max(8))],
            // `size`: the relay check's message, which carries an 8-byte index.
            Scenario::TcpCapacity => vec![v(format!("up to {n}"), n, size.unwrap_or(16).max(8))],
        }
    }
}

/// Where and how long to run the load.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Measurement window.
    pub duration: Duration,
    /// Address family.
    pub family: Family,
    /// Cores for client threads (round-robin).
    pub load_cores: Vec<usize>,
    /// Cores for server threads (round-robin).
    pub server_cores: Vec<usize>,
    /// When set, sockets on the scenario's port are counted in this namespace at the
    /// end of the window (the router: proves that a proxy intercepted the flows).
    pub probe: Option<Netns>,
    /// Client ephemeral port range for `tcp-crr` (see [`crr_port_range`]).
    pub crr_ports: (u16, u16),
    /// The proxy's cores (and process), sampled at both edges of the window.
    pub cpu: CpuProbe,
    /// The connection limit the proxy states, if any (recorded with idle connections).
    pub proxy_limit: Option<usize>,
    /// Bytes each `tcp-crr` and `tcp-rr` connection sends first, before its first
    /// request (a TLS ClientHello for `engine-sni`); the server reads and drops them.
    /// `tcp-crr` sends them with the request in one write, `tcp-rr` alone right
    /// after connecting, before the window.
    pub preamble: Option<&'static [u8]>,
}

/// What one run measured.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Measurement window actually used.
    pub elapsed: Duration,
    /// Payload bytes that reached the server during the window.
    pub bytes: u64,
    /// Completed operations: connections (crr), requests (rr), datagrams received (udp-pps).
    pub ops: u64,
    /// Datagrams sent (udp-pps only).
    pub sent: u64,
    /// Errors by kind (`reset`, `timeout`, `refused`, `short`, `wrong_source`...).
    pub errors: BTreeMap<String, u64>,
    /// Latency per operation in nanoseconds (crr, rr, udp-rr).
    pub latency: Option<Histogram<u64>>,
    /// Source addresses the server saw (the client's own, or a proxy's).
    pub peers: BTreeSet<IpAddr>,
    /// Sockets on the scenario's port in [`LoadSpec::probe`] at the end of the window.
    pub probe_sockets: Option<usize>,
    /// Use of the proxy's cores during the window ([`LoadSpec::cpu`]); `per_unit` is
    /// still empty here.
    pub cpu: Option<CpuUse>,
    /// The idle connections held through the window (variants with [`Variant::idle`]).
    pub idle: Option<IdleConns>,
}

/// What became of a variant's idle connections ([`Variant::idle`]): opened before
/// the window from the client namespace through the router to [`PORT_TCP_IDLE`] in
/// the server namespace, one request and response each, held quiet through the
/// window, checked, and closed after it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct IdleConns {
    /// Connections that answered their request (relayed to the server and back)
    /// before the window.
    pub opened: usize,
    /// Of those, still open and quiet on the client side when the window ended.
    pub held: usize,
    /// Server-side sockets still open and quiet when the window ended.
    pub server_held: usize,
    /// Sockets in the router on the idle port after the window: a proxy's
    /// TPROXY-accepted client sockets (they carry the server's address); 0 for
    /// kernel forwarding.
    pub router_sockets: Option<usize>,
    /// The connection limit the proxy states: the engine's `max_conns` (its `ready`
    /// line), HAProxy's `maxconn`.
    pub proxy_limit: Option<usize>,
    /// Seconds the opening took (before the window, so not in any figure).
    pub open_s: f64,
    /// Seconds from the clients' resets until every server socket had seen its
    /// connection end (at most 2 s).
    pub close_s: f64,
    /// Server sockets that had not seen their connection end by then.
    pub close_pending: usize,
    /// Failures by kind: `connect_*` (refused, reset, timeout...), `no_response`,
    /// `closed`, `reset`, `bad_response` (the first exchange), `not_tried` (opening
    /// gave up: deadline, blocked path), `dropped_*` (closed during the window),
    /// `server_*` (the server's side of any of these).
    pub errors: BTreeMap<String, u64>,
}

impl IdleConns {
    /// Why these idle connections fall short of `requested` held through the window
    /// next to `clients` churning ones, or `None` when every one was. A proxy's limit
    /// below what was asked is named: the usual cause.
    pub fn shortfall(&self, requested: usize, clients: usize) -> Option<String> {
        let complete = self.opened == requested
            && self.held == requested
            && self.server_held == requested
            && self.errors.is_empty();
        if complete {
            return None;
        }
        let mut s = format!(
            "idle connections: {} of {requested} held through the window ({} opened, {} open at \
             the server",
            self.held, self.opened, self.server_held
        );
        if !self.errors.is_empty() {
            let _ = write!(s, "; {}", crate::report::fmt_kinds(&self.errors));
        }
        s.push(')');
        match self.proxy_limit {
            Some(l) if requested + clients > l => {
                let _ = write!(
                    s,
                    ": the proxy's limit is {l} connections, fewer than {requested} idle + \
                     {clients} clients; lower --idle-conns"
                );
            }
            Some(l) => {
                let _ = write!(s, "; the proxy's limit is {l} connections");
            }
            None => {}
        }
        Some(s)
    }
}

impl Outcome {
    /// Sum of all error counts.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// Runs one variant of `scenario` from the client namespace to the server namespace.
pub fn run(lab: &Lab, scenario: Scenario, v: &Variant, spec: &LoadSpec) -> anyhow::Result<Outcome> {
    let r = match scenario {
        Scenario::TcpBulk => tcp_bulk(lab, v, spec),
        Scenario::TcpCrr => tcp_crr(lab, v, spec),
        Scenario::TcpRr => tcp_rr(lab, v, spec),
        Scenario::UdpPps => udp_pps(lab, v, spec),
        Scenario::UdpRr => udp_rr(lab, v, spec),
        Scenario::TcpCapacity => Err(anyhow!(
            "tcp-capacity needs the armed target: crate::capacity::run runs it"
        )),
    };
    r.with_context(|| format!("{} {}", scenario.name(), v.label))
}

/// Flags and counters shared by the harness and the threads of one run.
struct Shared {
    /// Clients may start (all connected).
    go: AtomicBool,
    /// The window is over: clients stop, servers drain and stop.
    done: AtomicBool,
    /// Clients that finished setting up (connected or failed).
    ready: AtomicUsize,
    /// Payload bytes counted by the server.
    bytes: AtomicU64,
    /// Operations counted by the server (udp-pps datagrams).
    ops: AtomicU64,
    /// Clients have all returned: servers stop. Set after the clients are joined, so
    /// a request in flight when the window closes still gets its answer.
    servers_done: AtomicBool,
    /// Bound of every loop.
    hard_end: Instant,
}

impl Shared {
    fn new(duration: Duration) -> Arc<Shared> {
        Arc::new(Shared {
            go: AtomicBool::new(false),
            done: AtomicBool::new(false),
            ready: AtomicUsize::new(0),
            bytes: AtomicU64::new(0),
            ops: AtomicU64::new(0),
            servers_done: AtomicBool::new(false),
            hard_end: Instant::now() + duration + HARD_DEADLINE_SLACK,
        })
    }

    /// True once the run must end, for whatever reason.
    fn over(&self) -> bool {
        self.done.load(Ordering::Relaxed)
            || crate::stop_requested()
            || Instant::now() >= self.hard_end
    }

    /// True once servers must stop: clients are gone, or the hard deadline passed.
    fn server_over(&self) -> bool {
        self.servers_done.load(Ordering::Relaxed) || Instant::now() >= self.hard_end
    }

    /// Harness side: the clients are joined, let the servers go.
    fn end_servers(&self) {
        self.servers_done.store(true, Ordering::Release);
    }

    /// Client side: wait for the start signal; false if the run ended first.
    fn wait_go(&self) -> bool {
        while !self.go.load(Ordering::Acquire) {
            if self.over() {
                return false;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        true
    }

    /// Harness side: wait (bounded) until `n` clients have connected or failed.
    fn ready_or_timeout(&self, n: usize) {
        let setup_deadline = Instant::now() + CONNECT_TIMEOUT + Duration::from_secs(1);
        while self.ready.load(Ordering::Acquire) < n && Instant::now() < setup_deadline {
            if crate::stop_requested() {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Harness side: wait until `n` clients are ready (bounded), start them, hold the
    /// window open for `duration` (or until Ctrl-C), then end it. Runs `at_end`
    /// just before ending (the probe). Returns the window, and the use of the
    /// cores of `cpu` from the start signal to the end of `at_end`.
    fn window(
        &self,
        n: usize,
        duration: Duration,
        cpu: &CpuProbe,
        at_end: impl FnOnce(),
    ) -> (Duration, Option<CpuUse>) {
        self.ready_or_timeout(n);
        let hz = cpu::user_hz();
        let before = cpu.sample();
        let t0 = Instant::now();
        self.go.store(true, Ordering::Release);
        while t0.elapsed() < duration && !crate::stop_requested() {
            std::thread::sleep((duration.saturating_sub(t0.elapsed())).min(POLL_SLICE));
        }
        at_end();
        let after = cpu.sample();
        let elapsed = t0.elapsed();
        self.done.store(true, Ordering::Release);
        let used = match (before, after) {
            (Some(a), Some(b)) => cpu.between(&a, &b, hz),
            _ => None,
        };
        (elapsed, used)
    }
}

/// Per-thread results, merged into the [`Outcome`].
#[derive(Default)]
struct Tally {
    ops: u64,
    errors: BTreeMap<String, u64>,
    latency: Option<Histogram<u64>>,
    peers: BTreeSet<IpAddr>,
}

impl Tally {
    fn with_histogram() -> Tally {
        Tally {
            latency: Some(new_histogram()),
            ..Tally::default()
        }
    }

    fn error(&mut self, kind: &str) {
        *self.errors.entry(kind.to_string()).or_default() += 1;
    }

    fn io_error(&mut self, e: &io::Error) {
        self.error(classify(e));
    }

    fn record(&mut self, started: Instant) {
        self.ops += 1;
        if let Some(h) = self.latency.as_mut() {
            h.saturating_record(started.elapsed().as_nanos() as u64);
        }
    }

    fn merge_into(self, out: &mut Outcome) {
        out.ops += self.ops;
        for (k, v) in self.errors {
            *out.errors.entry(k).or_default() += v;
        }
        out.peers.extend(self.peers);
        if let Some(h) = self.latency {
            match out.latency.as_mut() {
                Some(total) => {
                    // Same bounds on both sides: addition cannot fail.
                    let _ = total.add(&h);
                }
                None => out.latency = Some(h),
            }
        }
    }

    /// Merges a SERVER's tally: the peers it saw and its errors (named with `prefix`),
    /// not its ops, which the clients count.
    fn merge_server_into(self, out: &mut Outcome, prefix: &str) {
        out.peers.extend(self.peers);
        for (k, n) in self.errors {
            *out.errors.entry(format!("{prefix}{k}")).or_default() += n;
        }
    }

    /// [`Tally::merge_server_into`] into another tally (errors only).
    fn merge_server_into_tally(self, t: &mut Tally, prefix: &str) {
        for (k, n) in self.errors {
            *t.errors.entry(format!("{prefix}{k}")).or_default() += n;
        }
    }
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_NS, 3).expect("valid histogram bounds")
}

/// Error kinds as reported: resets and timeouts are what a broken rule set causes.
pub(crate) fn classify(e: &io::Error) -> &'static str {
    use io::ErrorKind::*;
    match e.kind() {
        ConnectionReset | ConnectionAborted | BrokenPipe => "reset",
        ConnectionRefused => "refused",
        TimedOut | WouldBlock => "timeout",
        HostUnreachable | NetworkUnreachable => "unreachable",
        UnexpectedEof => "short",
        AddrNotAvailable | AddrInUse => "no_port",
        _ => "other",
    }
}

/// Pins the calling thread to `cores[i % len]`; no-op for an empty list.
pub(crate) fn pin(cores: &[usize], i: usize) {
    if !cores.is_empty() {
        let id = cores[i % cores.len()];
        let _ = core_affinity::set_for_current(core_affinity::CoreId { id });
    }
}

fn join<T>(h: JoinHandle<T>, what: &str) -> anyhow::Result<T> {
    h.join().map_err(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        anyhow!("{what} thread panicked: {msg}")
    })
}

/// A listener with a deep backlog (the CRR clients burst) and a receive timeout, so
/// `accept` returns every [`POLL_SLICE`] and the acceptor can look at its flags
/// (Linux applies SO_RCVTIMEO to accept).
pub(crate) fn tcp_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.bind(&addr.into())?;
    s.listen(4096)?;
    s.set_read_timeout(Some(POLL_SLICE))?;
    Ok(s.into())
}

fn udp_socket(addr: SocketAddr) -> io::Result<UdpSocket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    // A deep receive buffer absorbs bursts; the kernel caps it at net.core.rmem_max.
    let _ = s.set_recv_buffer_size(4 << 20);
    s.bind(&addr.into())?;
    Ok(s.into())
}

pub(crate) fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// Reads exactly `buf.len()` bytes, riding out receive timeouts until `give_up()`.
/// `Ok(false)`: clean EOF before the first byte.
fn read_full(s: &mut TcpStream, buf: &mut [u8], give_up: impl Fn() -> bool) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match s.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if is_timeout(&e) => {
                if give_up() {
                    return Err(io::ErrorKind::TimedOut.into());
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Accepts connections until the run is over, handing each to `handle` on its own
/// thread (at most `max_conns`). Returns the acceptor's tally (peers, errors) after
/// all handlers ended.
fn accept_loop<H>(
    listener: TcpListener,
    sh: Arc<Shared>,
    max_conns: usize,
    cores: Vec<usize>,
    handle: H,
) -> Tally
where
    H: Fn(TcpStream, Arc<Shared>) -> Tally + Send + Sync + Clone + 'static,
{
    let mut tally = Tally::default();
    let mut handlers = Vec::new();
    while handlers.len() < max_conns && !sh.server_over() {
        match listener.accept() {
            Ok((s, peer)) => {
                tally.peers.insert(peer.ip());
                let (sh, handle, cores) = (sh.clone(), handle.clone(), cores.clone());
                let i = handlers.len();
                handlers.push(std::thread::spawn(move || {
                    pin(&cores, i);
                    handle(s, sh)
                }));
            }
            Err(e) if is_timeout(&e) => {}
            Err(e) => tally.io_error(&e),
        }
    }
    for h in handlers {
        match h.join() {
            Ok(t) => {
                for (k, v) in t.errors {
                    *tally.errors.entry(format!("server_{k}")).or_default() += v;
                }
            }
            Err(_) => tally.error("server_panic"),
        }
    }
    tally
}

fn probe(spec: &LoadSpec, port: u16, proto: Proto) -> Option<usize> {
    // Connection churn may leave nothing but TIME_WAIT behind a proxy at the probe:
    // those of this run's client ports count.
    let tw = (port == PORT_TCP_CRR).then_some(spec.crr_ports);
    let cores = spec.load_cores.clone();
    spec.probe.as_ref().map(|ns| {
        ns.run(move || {
            // On a load core, not wherever the scheduler likes: after a churn run the
            // router holds tens of thousands of TIME_WAIT entries, and formatting and
            // reading them is work the proxy cores' CPU figure must not count.
            pin(&cores, 0);
            lab::count_sockets_here(port, proto, tw)
        })
    })
}

/// `tcp-bulk`: each client writes `size`-byte chunks as fast as it can; the server
/// counts what arrives. The rate is server bytes over the window, ramp-up excluded.
fn tcp_bulk(lab: &Lab, v: &Variant, spec: &LoadSpec) -> anyhow::Result<Outcome> {
    let addr = SocketAddr::new(spec.family.server_ip(), PORT_TCP_BULK);
    let listener = lab
        .server
        .run(move || tcp_listener(addr))
        .context("server listen")?;
    let sh = Shared::new(spec.duration);
    let server = {
        let (sh, cores) = (sh.clone(), spec.server_cores.clone());
        lab.server.spawn(move || {
            pin(&cores, 0);
            accept_loop(listener, sh, usize::MAX, cores, |mut s, sh| {
                let mut t = Tally::default();
                let mut buf = vec![0u8; 256 * 1024];
                let _ = s.set_read_timeout(Some(POLL_SLICE));
                loop {
                    match s.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            sh.bytes.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        Err(e) if is_timeout(&e) => {
                            if Instant::now() >= sh.hard_end {
                                break;
                            }
                        }
                        Err(e) => {
                            // A reset after `done` is the client closing with data
                            // in flight, not a path error.
                            if !sh.done.load(Ordering::Relaxed) {
                                t.io_error(&e);
                            }
                            break;
                        }
                    }
                }
                t
            })
        })
    };
    let clients: Vec<_> = (0..v.conns)
        .map(|i| {
            let (sh, cores, size) = (sh.clone(), spec.load_cores.clone(), v.size);
            lab.client.spawn(move || {
                pin(&cores, i);
                let mut t = Tally::default();
                let conn = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT);
                sh.ready.fetch_add(1, Ordering::Release);
                let mut s = match conn {
                    Ok(s) => s,
                    Err(e) => {
                        t.io_error(&e);
                        return t;
                    }
                };
                let _ = s.set_write_timeout(Some(POLL_SLICE));
                let buf = vec![0x5au8; size];
                if !sh.wait_go() {
                    return t;
                }
                while !sh.over() {
                    match s.write(&buf) {
                        Ok(_) => {}
                        Err(e) if is_timeout(&e) => {}
                        Err(e) => {
                            t.io_error(&e);
                            break;
                        }
                    }
                }
                t
            })
        })
        .collect();
    let mut out = Outcome::default();
    let mut end_bytes = 0;
    // Wait for the streams, let them ramp (slow start) for a tenth of the window, then
    // sample the server's byte count at both edges of the window.
    sh.ready_or_timeout(v.conns);
    sh.go.store(true, Ordering::Release);
    std::thread::sleep((spec.duration / 10).min(Duration::from_millis(200)));
    let start_bytes = sh.bytes.load(Ordering::Relaxed);
    (out.elapsed, out.cpu) = sh.window(0, spec.duration, &spec.cpu, || {
        end_bytes = sh.bytes.load(Ordering::Relaxed);
        out.probe_sockets = probe(spec, PORT_TCP_BULK, Proto::Tcp);
    });
    let joined: Vec<_> = clients
        .into_iter()
        .map(|c| join(c, "bulk client"))
        .collect();
    sh.end_servers();
    for t in joined {
        t?.merge_into(&mut out);
    }
    join(server, "bulk server")?.merge_into(&mut out);
    out.ops = 0;
    out.bytes = end_bytes.saturating_sub(start_bytes);
    Ok(out)
}

/// `tcp-rr`: `conns` persistent connections, each a ping-pong of `size` bytes out and
/// [`RESPONSE_SIZE`] back; rate and per-request latency.
fn tcp_rr(lab: &Lab, v: &Variant, spec: &LoadSpec) -> anyhow::Result<Outcome> {
    let addr = SocketAddr::new(spec.family.server_ip(), PORT_TCP_RR);
    let listener = lab
        .server
        .run(move || tcp_listener(addr))
        .context("server listen")?;
    let sh = Shared::new(spec.duration);
    let req_size = v.size;
    let preamble = spec.preamble.unwrap_or_default();
    let server = {
        let (sh, cores) = (sh.clone(), spec.server_cores.clone());
        lab.server.spawn(move || {
            pin(&cores, 0);
            accept_loop(listener, sh, usize::MAX, cores, move |mut s, sh| {
                let mut t = Tally::default();
                let _ = s.set_nodelay(true);
                let _ = s.set_read_timeout(Some(POLL_SLICE));
                let mut req = vec![0u8; req_size];
                let resp = [0xa5u8; RESPONSE_SIZE];
                if !preamble.is_empty() {
                    let mut first = vec![0u8; preamble.len()];
                    match read_full(&mut s, &mut first, || Instant::now() >= sh.hard_end) {
                        Ok(true) => {}
                        Ok(false) => return t,
                        Err(e) => {
                            if !sh.done.load(Ordering::Relaxed) {
                                t.io_error(&e);
                            }
                            return t;
                        }
                    }
                }
                loop {
                    match read_full(&mut s, &mut req, || Instant::now() >= sh.hard_end) {
                        Ok(true) => {}
                        Ok(false) => break,
                        Err(e) => {
                            if !sh.done.load(Ordering::Relaxed) {
                                t.io_error(&e);
                            }
                            break;
                        }
                    }
                    sh.bytes.fetch_add(req_size as u64, Ordering::Relaxed);
                    if let Err(e) = s.write_all(&resp) {
                        if !sh.done.load(Ordering::Relaxed) {
                            t.io_error(&e);
                        }
                        break;
                    }
                }
                t
            })
        })
    };
    let clients: Vec<_> = (0..v.conns)
        .map(|i| {
            let (sh, cores) = (sh.clone(), spec.load_cores.clone());
            lab.client.spawn(move || {
                pin(&cores, i);
                let mut t = Tally::with_histogram();
                let conn = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).and_then(|mut s| {
                    if !preamble.is_empty() {
                        s.write_all(preamble)?;
                    }
                    Ok(s)
                });
                sh.ready.fetch_add(1, Ordering::Release);
                let mut s = match conn {
                    Ok(s) => s,
                    Err(e) => {
                        t.io_error(&e);
                        return t;
                    }
                };
                let _ = s.set_nodelay(true);
                let _ = s.set_read_timeout(Some(POLL_SLICE));
                let req = vec![0x5au8; req_size];
                let mut resp = [0u8; RESPONSE_SIZE];
                if !sh.wait_go() {
                    return t;
                }
                while !sh.over() {
                    let started = Instant::now();
                    if let Err(e) = s.write_all(&req) {
                        t.io_error(&e);
                        break;
                    }
                    let give_up =
                        || started.elapsed() >= IO_TIMEOUT || Instant::now() >= sh.hard_end;
                    match read_full(&mut s, &mut resp, give_up) {
                        Ok(true) => t.record(started),
                        Ok(false) => {
                            t.error("short");
                            break;
                        }
                        Err(e) => {
                            t.io_error(&e);
                            break;
                        }
                    }
                }
                t
            })
        })
        .collect();
    let mut out = Outcome::default();
    (out.elapsed, out.cpu) = sh.window(v.conns, spec.duration, &spec.cpu, || {
        out.probe_sockets = probe(spec, PORT_TCP_RR, Proto::Tcp);
    });
    let mut client_ops = 0;
    let joined: Vec<_> = clients.into_iter().map(|c| join(c, "rr client")).collect();
    sh.end_servers();
    for t in joined {
        let t = t?;
        client_ops += t.ops;
        t.merge_into(&mut out);
    }
    let server = join(server, "rr server")?;
    server.merge_server_into(&mut out, "");
    out.ops = client_ops;
    out.bytes = client_ops * (req_size + RESPONSE_SIZE) as u64;
    Ok(out)
}

/// Idle connections held open through the router while a window runs (see
/// [`IdleConns`]). Both ends stay in this process: the client sockets (opened in the
/// client namespace) and the server's accepted ones, two fds per connection.
/// Dropping the set closes them (as [`IdleSet::finish`] does). `tcp-capacity`
/// (`crate::capacity`) fills one its own way and closes it the same way.
#[derive(Default)]
pub(crate) struct IdleSet {
    /// The client sockets (client namespace).
    pub(crate) clients: Vec<TcpStream>,
    /// The server's accepted sockets (server namespace).
    pub(crate) servers: Vec<TcpStream>,
    /// What became of them.
    pub(crate) stats: IdleConns,
}

/// Sets the client namespace's `ip_local_port_range` to [`IDLE_PORTS`], for
/// connections held open next to (or instead of) a churn.
pub(crate) fn use_idle_ports(lab: &Lab) -> anyhow::Result<()> {
    let (lo, hi) = IDLE_PORTS;
    lab.client
        .sysctl("net.ipv4.ip_local_port_range", &format!("{lo} {hi}"))
        .context("setting the idle connections' client port range")
}

/// Closes `s` with a reset (`SO_LINGER` 0): no TIME_WAIT is left for its port, in its
/// own namespace or on a proxy's client side.
pub(crate) fn reset_close(s: TcpStream) {
    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
}

impl IdleSet {
    /// Opens `n` connections from the client namespace to [`PORT_TCP_IDLE`] in the
    /// server namespace, from client ports in [`IDLE_PORTS`]: connect and send a
    /// `req_size` request on each, then read every [`RESPONSE_SIZE`] response, so
    /// that a proxy at its limit (which may accept and then hold a client without
    /// relaying it) costs one shared response timeout, not one each. Bounded by
    /// [`IO_TIMEOUT`] plus [`IDLE_OPEN_PER_CONN`] per connection. What failed is
    /// counted, not fatal: the record says so.
    fn open(lab: &Lab, spec: &LoadSpec, n: usize, req_size: usize) -> anyhow::Result<IdleSet> {
        let limit = crate::targets::fd_limit();
        anyhow::ensure!(
            n <= max_idle_conns(limit),
            "{n} idle connections need {} fds in this process (client and server side) and \
             RLIMIT_NOFILE is {limit}: at most {}",
            2 * n,
            max_idle_conns(limit)
        );
        use_idle_ports(lab)?;
        let addr = SocketAddr::new(spec.family.server_ip(), PORT_TCP_IDLE);
        let listener = lab
            .server
            .run(move || tcp_listener(addr))
            .context("idle server listen")?;
        let started = Instant::now();
        let open_end = started + IO_TIMEOUT + IDLE_OPEN_PER_CONN * n as u32;
        let open_done = Arc::new(AtomicBool::new(false));
        let server = {
            let (cores, open_done) = (spec.server_cores.clone(), open_done.clone());
            // Bounded even if the client side never says it is done.
            let hard_end = open_end + HARD_DEADLINE_SLACK;
            lab.server.spawn(move || {
                pin(&cores, 0);
                idle_server(listener, req_size, &open_done, hard_end)
            })
        };
        let cores = spec.load_cores.clone();
        let (clients, mut t) = lab.client.run(move || {
            pin(&cores, 0);
            idle_clients(addr, n, req_size, open_end)
        });
        open_done.store(true, Ordering::Release);
        let (servers, server_tally) = join(server, "idle server")?;
        server_tally.merge_server_into_tally(&mut t, "server_");
        Ok(IdleSet {
            stats: IdleConns {
                opened: clients.len(),
                proxy_limit: spec.proxy_limit,
                open_s: started.elapsed().as_secs_f64(),
                errors: t.errors,
                ..IdleConns::default()
            },
            clients,
            servers,
        })
    }

    /// After the window: counts the router's sockets on the idle port, checks that
    /// every connection is still open and quiet at both ends, and closes them.
    fn finish(mut self, spec: &LoadSpec) -> IdleConns {
        let cores = spec.load_cores.clone();
        self.stats.router_sockets = spec.probe.as_ref().map(|ns| {
            ns.run(move || {
                pin(&cores, 0);
                lab::count_sockets_here(PORT_TCP_IDLE, Proto::Tcp, None)
            })
        });
        let mut errors = std::mem::take(&mut self.stats.errors);
        let mut count_alive = |socks: &[TcpStream], prefix: &str| {
            let mut alive = 0;
            for s in socks {
                match still_open(s) {
                    Ok(()) => alive += 1,
                    Err(kind) => *errors.entry(format!("{prefix}dropped_{kind}")).or_default() += 1,
                }
            }
            alive
        };
        self.stats.held = count_alive(&self.clients, "");
        self.stats.server_held = count_alive(&self.servers, "server_");
        self.stats.errors = errors;
        self.close();
        std::mem::take(&mut self.stats)
    }

    /// Closes the clients first, with a reset: neither the client namespace nor the
    /// proxy's client side keeps a TIME_WAIT for their ports (the next target reuses
    /// them at once; a proxy's TIME_WAIT would blackhole a later `direct`, see
    /// [`crr_port_range`]). Then waits (bounded) for each server socket to see its
    /// connection end before dropping it, so the server never closes first.
    pub(crate) fn close(&mut self) {
        if self.clients.is_empty() && self.servers.is_empty() {
            return;
        }
        self.clients.drain(..).for_each(reset_close);
        let started = Instant::now();
        let end = started + IDLE_CLOSE_WAIT;
        let mut pending = 0;
        let mut buf = [0u8; 256];
        for mut s in self.servers.drain(..) {
            // Blocking again, whatever the caller did with it (the timeout bounds it).
            let _ = s.set_nonblocking(false);
            let ended = loop {
                let left = end.saturating_duration_since(Instant::now());
                let _ = s.set_read_timeout(Some(left.max(Duration::from_millis(1))));
                match s.read(&mut buf) {
                    Ok(0) => break true,
                    Ok(_) if Instant::now() >= end => break false,
                    Ok(_) => {}
                    Err(e) if is_timeout(&e) => break false,
                    Err(_) => break true,
                }
            };
            if !ended {
                pending += 1;
            }
        }
        self.stats.close_s = started.elapsed().as_secs_f64();
        self.stats.close_pending = pending;
    }
}

impl Drop for IdleSet {
    fn drop(&mut self) {
        self.close();
    }
}

/// The client side of [`IdleSet::open`]: connect and send on each, then collect the
/// responses. Returns the connections that were answered.
fn idle_clients(
    addr: SocketAddr,
    n: usize,
    req_size: usize,
    end: Instant,
) -> (Vec<TcpStream>, Tally) {
    let mut t = Tally::default();
    let req = vec![0x5au8; req_size];
    let mut sent = Vec::with_capacity(n);
    let mut timeouts_in_a_row = 0;
    for i in 0..n {
        if Instant::now() >= end
            || crate::stop_requested()
            || timeouts_in_a_row >= IDLE_CONNECT_GIVE_UP
        {
            *t.errors.entry("not_tried".into()).or_default() += (n - i) as u64;
            break;
        }
        let mut s = match TcpStream::connect_timeout(&addr, IDLE_CONNECT_TIMEOUT) {
            Ok(s) => s,
            Err(e) => {
                let kind = classify(&e);
                if kind == "timeout" {
                    timeouts_in_a_row += 1;
                }
                t.error(&format!("connect_{kind}"));
                continue;
            }
        };
        timeouts_in_a_row = 0;
        let _ = s.set_nodelay(true);
        match s.write_all(&req) {
            Ok(()) => sent.push(s),
            Err(e) => t.io_error(&e),
        }
    }
    // One response timeout for all of them: every request is out already.
    let resp_end = Instant::now() + IO_TIMEOUT;
    let mut resp = [0u8; RESPONSE_SIZE];
    let mut open = Vec::with_capacity(sent.len());
    for mut s in sent {
        let left = resp_end.saturating_duration_since(Instant::now());
        // Past the deadline a socket gets a millisecond: a proxy holding hundreds of
        // clients at its limit costs the shared timeout, not one each.
        let _ = s.set_read_timeout(Some(left.clamp(Duration::from_millis(1), POLL_SLICE)));
        let give_up = || Instant::now() >= resp_end || crate::stop_requested();
        let r = match read_full(&mut s, &mut resp, give_up) {
            Ok(true) if resp.iter().all(|b| *b == 0xa5) => Ok(()),
            Ok(true) => Err("bad_response"),
            Ok(false) => Err("closed"),
            Err(e) if is_timeout(&e) => Err("no_response"),
            Err(e) => Err(classify(&e)),
        };
        match r {
            Ok(()) => open.push(s),
            Err(kind) => t.error(kind),
        }
    }
    (open, t)
}

/// The server side of [`IdleSet::open`]: accept, read the request, answer, keep the
/// socket; until the client side is done (or `hard_end`).
fn idle_server(
    listener: TcpListener,
    req_size: usize,
    open_done: &AtomicBool,
    hard_end: Instant,
) -> (Vec<TcpStream>, Tally) {
    let mut t = Tally::default();
    let mut held = Vec::new();
    let mut req = vec![0u8; req_size];
    let resp = [0xa5u8; RESPONSE_SIZE];
    while !open_done.load(Ordering::Acquire) && Instant::now() < hard_end {
        let (mut s, peer) = match listener.accept() {
            Ok(x) => x,
            Err(e) if is_timeout(&e) => continue,
            Err(e) => {
                t.io_error(&e);
                continue;
            }
        };
        t.peers.insert(peer.ip());
        let _ = s.set_nodelay(true);
        let _ = s.set_read_timeout(Some(POLL_SLICE));
        let started = Instant::now();
        let r = read_full(&mut s, &mut req, || {
            started.elapsed() >= IO_TIMEOUT || Instant::now() >= hard_end
        })
        .and_then(|full| {
            if full {
                s.write_all(&resp)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            }
        });
        match r {
            Ok(()) => held.push(s),
            Err(e) => t.io_error(&e),
        }
    }
    (held, t)
}

/// `Ok` when `s` is open with nothing to read (an idle connection as it should be);
/// else what happened to it: `closed` (EOF), `data`, or the error's kind.
fn still_open(s: &TcpStream) -> Result<(), &'static str> {
    if s.set_nonblocking(true).is_err() {
        return Err("other");
    }
    let mut b = [0u8; 1];
    let r = match s.peek(&mut b) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
        Ok(0) => Err("closed"),
        Ok(_) => Err("data"),
        Err(e) => Err(classify(&e)),
    };
    let _ = s.set_nonblocking(false);
    r
}

/// `tcp-crr`: each client thread loops connect, send `size` bytes, read the
/// [`RESPONSE_SIZE`] response to EOF (the server closes first, HTTP/1.0 style), close.
/// The client namespace's port range is narrowed to `spec.crr_ports`. With
/// [`Variant::idle`], that many idle connections are opened first ([`IdleSet`]),
/// held through the window, checked and closed after it.
fn tcp_crr(lab: &Lab, v: &Variant, spec: &LoadSpec) -> anyhow::Result<Outcome> {
    let idle = match v.idle {
        0 => None,
        n => Some(IdleSet::open(lab, spec, n, v.size).context("opening the idle connections")?),
    };
    let (lo, hi) = spec.crr_ports;
    lab.client
        .sysctl("net.ipv4.ip_local_port_range", &format!("{lo} {hi}"))
        .context("narrowing the client port range")?;
    let addr = SocketAddr::new(spec.family.server_ip(), PORT_TCP_CRR);
    let listener = lab
        .server
        .run(move || tcp_listener(addr))
        .context("server listen")?;
    let sh = Shared::new(spec.duration);
    let req_size = v.size;
    // The preamble comes in front of each request, in the same write.
    let preamble = spec.preamble.unwrap_or_default();
    let first_size = preamble.len() + req_size;
    // A pool of acceptors, each serving one connection at a time: no thread per
    // connection at tens of thousands of connections per second.
    let acceptors = v.conns.clamp(1, 32);
    let servers: Vec<_> = (0..acceptors)
        .map(|i| {
            let (sh, cores) = (sh.clone(), spec.server_cores.clone());
            let listener = listener.try_clone();
            lab.server.spawn(move || {
                pin(&cores, i);
                let mut t = Tally::default();
                let listener = match listener {
                    Ok(l) => l,
                    Err(e) => {
                        t.io_error(&e);
                        return t;
                    }
                };
                let mut req = vec![0u8; first_size];
                let resp = [0xa5u8; RESPONSE_SIZE];
                while !sh.server_over() {
                    let (mut s, peer) = match listener.accept() {
                        Ok(x) => x,
                        Err(e) if is_timeout(&e) => continue,
                        Err(e) => {
                            t.error(&format!("server_{}", classify(&e)));
                            continue;
                        }
                    };
                    t.peers.insert(peer.ip());
                    let _ = s.set_nodelay(true);
                    let _ = s.set_read_timeout(Some(POLL_SLICE));
                    let started = Instant::now();
                    let r = read_full(&mut s, &mut req, || started.elapsed() >= IO_TIMEOUT)
                        .and_then(|full| {
                            if full {
                                s.write_all(&resp)
                            } else {
                                Err(io::ErrorKind::UnexpectedEof.into())
                            }
                        });
                    match r {
                        Ok(()) => {
                            sh.bytes.fetch_add(req_size as u64, Ordering::Relaxed);
                        }
                        Err(e) if !sh.done.load(Ordering::Relaxed) => {
                            t.error(&format!("server_{}", classify(&e)));
                        }
                        Err(_) => {}
                    }
                    // Dropping `s` closes first: the server side ends in TIME_WAIT.
                }
                t
            })
        })
        .collect();
    drop(listener);
    let clients: Vec<_> = (0..v.conns)
        .map(|i| {
            let (sh, cores) = (sh.clone(), spec.load_cores.clone());
            lab.client.spawn(move || {
                pin(&cores, i);
                let mut t = Tally::with_histogram();
                let mut req = preamble.to_vec();
                req.resize(first_size, 0x5a);
                let mut resp = Vec::with_capacity(RESPONSE_SIZE * 2);
                sh.ready.fetch_add(1, Ordering::Release);
                if !sh.wait_go() {
                    return t;
                }
                while !sh.over() {
                    let started = Instant::now();
                    let mut s = match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                        Ok(s) => s,
                        Err(e) => {
                            t.io_error(&e);
                            // A refused or reset connect returns at once: don't spin.
                            std::thread::sleep(Duration::from_millis(1));
                            continue;
                        }
                    };
                    let _ = s.set_nodelay(true);
                    let _ = s.set_read_timeout(Some(IO_TIMEOUT));
                    resp.clear();
                    let r = s.write_all(&req).and_then(|()| s.read_to_end(&mut resp));
                    match r {
                        Ok(n) if n == RESPONSE_SIZE => t.record(started),
                        Ok(_) => t.error("short"),
                        Err(e) => t.io_error(&e),
                    }
                    // Dropping `s` after EOF: the client closes second, so its port
                    // leaves no TIME_WAIT and is free for the next connect at once.
                }
                t
            })
        })
        .collect();
    let mut out = Outcome::default();
    (out.elapsed, out.cpu) = sh.window(v.conns, spec.duration, &spec.cpu, || {
        out.probe_sockets = probe(spec, PORT_TCP_CRR, Proto::Tcp);
    });
    let joined: Vec<_> = clients.into_iter().map(|c| join(c, "crr client")).collect();
    sh.end_servers();
    for t in joined {
        t?.merge_into(&mut out);
    }
    for s in servers {
        let t = join(s, "crr server")?;
        t.merge_server_into(&mut out, "");
    }
    out.bytes = out.ops * (req_size + RESPONSE_SIZE) as u64;
    out.idle = idle.map(|i| i.finish(spec));
    Ok(out)
}

/// `udp-pps`: senders blast `size`-byte datagrams for the window (at most
/// [`UDP_MAX_DATAGRAMS_PER_SENDER`] each); the server counts. Delivered rate and loss.
fn udp_pps(lab: &Lab, v: &Variant, spec: &LoadSpec) -> anyhow::Result<Outcome> {
    let addr = SocketAddr::new(spec.family.server_ip(), PORT_UDP_PPS);
    let sock = lab
        .server
        .run(move || udp_socket(addr))
        .context("server bind")?;
    let sh = Shared::new(spec.duration);
    let server_done = Arc::new(AtomicBool::new(false));
    let server = {
        let (sh, cores, server_done) = (sh.clone(), spec.server_cores.clone(), server_done.clone());
        lab.server.spawn(move || {
            pin(&cores, 0);
            let mut t = Tally::default();
            let _ = sock.set_read_timeout(Some(POLL_SLICE));
            let mut buf = vec![0u8; 65536];
            let mut last_peer = None;
            while !server_done.load(Ordering::Relaxed) && Instant::now() < sh.hard_end {
                match sock.recv_from(&mut buf) {
                    Ok((n, peer)) => {
                        sh.ops.fetch_add(1, Ordering::Relaxed);
                        sh.bytes.fetch_add(n as u64, Ordering::Relaxed);
                        if last_peer != Some(peer.ip()) {
                            last_peer = Some(peer.ip());
                            t.peers.insert(peer.ip());
                        }
                    }
                    Err(e) if is_timeout(&e) => {}
                    Err(e) => t.io_error(&e),
                }
            }
            t
        })
    };
    let family = spec.family;
    let senders: Vec<_> = (0..v.conns)
        .map(|i| {
            let (sh, cores, size) = (sh.clone(), spec.load_cores.clone(), v.size);
            lab.client.spawn(move || -> (Tally, u64) {
                pin(&cores, i);
                let mut t = Tally::default();
                let sock = UdpSocket::bind(SocketAddr::new(family.unspecified(), 0))
                    .and_then(|s| s.connect(addr).map(|()| s));
                sh.ready.fetch_add(1, Ordering::Release);
                let sock = match sock {
                    Ok(s) => s,
                    Err(e) => {
                        t.io_error(&e);
                        return (t, 0);
                    }
                };
                let _ = sock.set_write_timeout(Some(POLL_SLICE));
                let buf = vec![0x5au8; size];
                let mut sent = 0u64;
                if !sh.wait_go() {
                    return (t, 0);
                }
                // Look at the clock only every 32 datagrams: it is a measurable part of
                // a 64-byte send otherwise.
                'outer: while sent < UDP_MAX_DATAGRAMS_PER_SENDER && !sh.over() {
                    for _ in 0..32 {
                        match sock.send(&buf) {
                            Ok(_) => sent += 1,
                            Err(e) if is_timeout(&e) => {}
                            // ENOBUFS (qdisc full) or ECONNREFUSED (an ICMP from a
                            // closed port): count, keep sending.
                            Err(e) => {
                                t.error(&format!("send_{}", classify(&e)));
                                if t.errors.values().sum::<u64>() > 1_000_000 {
                                    break 'outer;
                                }
                            }
                        }
                    }
                }
                (t, sent)
            })
        })
        .collect();
    let mut out = Outcome::default();
    (out.elapsed, out.cpu) = sh.window(v.conns, spec.duration, &spec.cpu, || {
        out.probe_sockets = probe(spec, PORT_UDP_PPS, Proto::Udp);
    });
    let joined: Vec<_> = senders.into_iter().map(|s| join(s, "udp sender")).collect();
    let mut failed = None;
    for j in joined {
        match j {
            Ok((t, sent)) => {
                out.sent += sent;
                t.merge_into(&mut out);
            }
            Err(e) => failed = Some(e),
        }
    }
    // Datagrams still queued in the path count as delivered: wait until the server's
    // count stops moving (bounded), then stop it.
    let drain_end = Instant::now() + Duration::from_secs(1);
    let mut last = sh.ops.load(Ordering::Relaxed);
    while Instant::now() < drain_end {
        std::thread::sleep(Duration::from_millis(30));
        let now = sh.ops.load(Ordering::Relaxed);
        if now == last {
            break;
        }
        last = now;
    }
    server_done.store(true, Ordering::Relaxed);
    let t = join(server, "udp server")?;
    if let Some(e) = failed {
        return Err(e);
    }
    t.merge_server_into(&mut out, "server_");
    out.ops = sh.ops.load(Ordering::Relaxed);
    out.bytes = sh.bytes.load(Ordering::Relaxed);
    Ok(out)
}

/// `udp-rr`: clients send a numbered request and wait for the echo, checking that it
/// comes from exactly the address and port the request went to (a transparent proxy
/// must answer from the original destination).
fn udp_rr(lab: &Lab, v: &Variant, spec: &LoadSpec) -> anyhow::Result<Outcome> {
    let addr = SocketAddr::new(spec.family.server_ip(), PORT_UDP_RR);
    let sock = lab
        .server
        .run(move || udp_socket(addr))
        .context("server bind")?;
    let sh = Shared::new(spec.duration);
    let server = {
        let (sh, cores) = (sh.clone(), spec.server_cores.clone());
        lab.server.spawn(move || {
            pin(&cores, 0);
            let mut t = Tally::default();
            let _ = sock.set_read_timeout(Some(POLL_SLICE));
            let mut buf = vec![0u8; 65536];
            while !sh.server_over() {
                match sock.recv_from(&mut buf) {
                    Ok((n, peer)) => {
                        t.peers.insert(peer.ip());
                        sh.bytes.fetch_add(n as u64, Ordering::Relaxed);
                        if let Err(e) = sock.send_to(&buf[..n], peer) {
                            t.io_error(&e);
                        }
                    }
                    Err(e) if is_timeout(&e) => {}
                    Err(e) => t.io_error(&e),
                }
            }
            t
        })
    };
    let family = spec.family;
    let clients: Vec<_> = (0..v.conns)
        .map(|i| {
            let (sh, cores, size) = (sh.clone(), spec.load_cores.clone(), v.size);
            lab.client.spawn(move || {
                pin(&cores, i);
                let mut t = Tally::with_histogram();
                // Unconnected on purpose: a connected socket would silently drop a
                // reply from the wrong source, which must be counted instead.
                let sock = UdpSocket::bind(SocketAddr::new(family.unspecified(), 0));
                sh.ready.fetch_add(1, Ordering::Release);
                let sock = match sock {
                    Ok(s) => s,
                    Err(e) => {
                        t.io_error(&e);
                        return t;
                    }
                };
                let _ = sock.set_read_timeout(Some(UDP_REPLY_TIMEOUT));
                let mut req = vec![0x5au8; size];
                let mut resp = vec![0u8; 65536];
                if !sh.wait_go() {
                    return t;
                }
                let mut seq: u64 = 0;
                while !sh.over() {
                    seq += 1;
                    req[..8].copy_from_slice(&seq.to_be_bytes());
                    let started = Instant::now();
                    if let Err(e) = sock.send_to(&req, addr) {
                        t.io_error(&e);
                        continue;
                    }
                    loop {
                        match sock.recv_from(&mut resp) {
                            Ok((_, from)) if from != addr => t.error("wrong_source"),
                            // A late echo of an earlier, timed-out request: skip it.
                            Ok((n, _)) if n < 8 || resp[..8] != seq.to_be_bytes() => {}
                            Ok((n, _)) if n != size => {
                                t.error("short");
                                break;
                            }
                            Ok(_) => {
                                t.record(started);
                                break;
                            }
                            Err(e) => {
                                t.io_error(&e);
                                break;
                            }
                        }
                        if started.elapsed() >= UDP_REPLY_TIMEOUT {
                            t.error("timeout");
                            break;
                        }
                    }
                }
                t
            })
        })
        .collect();
    let mut out = Outcome::default();
    (out.elapsed, out.cpu) = sh.window(v.conns, spec.duration, &spec.cpu, || {
        out.probe_sockets = probe(spec, PORT_UDP_RR, Proto::Udp);
    });
    let joined: Vec<_> = clients
        .into_iter()
        .map(|c| join(c, "udp-rr client"))
        .collect();
    sh.end_servers();
    for t in joined {
        t?.merge_into(&mut out);
    }
    let t = join(server, "udp-rr server")?;
    t.merge_server_into(&mut out, "server_");
    out.bytes = out.ops * 2 * v.size as u64;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crr_port_windows_are_disjoint_and_ephemeral() {
        let w: Vec<(u16, u16)> = (0..8).map(crr_port_range).collect();
        for (i, (lo, hi)) in w.iter().enumerate() {
            assert_eq!(hi - lo + 1, CRR_PORT_WINDOW);
            // Clear of the scenario ports and the tproxy port, inside u16.
            assert!(*lo > 15001 && *hi < 60999, "{lo}-{hi}");
            for (l2, h2) in &w[i + 1..] {
                assert!(hi < l2 || h2 < lo, "windows overlap");
            }
        }
        assert_eq!(crr_port_range(8), crr_port_range(0));
    }

    #[test]
    fn idle_ports_and_budget() {
        // Clear of every tcp-crr window, inside u16, enough for what the fds allow.
        let (lo, hi) = IDLE_PORTS;
        for i in 0..8 {
            assert!(
                crr_port_range(i).1 < lo,
                "window {i} overlaps the idle ports"
            );
        }
        assert!(lo < hi);
        // Different parities, as the kernel prefers for ip_local_port_range.
        assert_ne!(lo % 2, hi % 2);
        assert_eq!(max_idle_conns(20000), 9488);
        assert!(max_idle_conns(20000) <= (hi - lo) as usize + 1);
        assert_eq!(max_idle_conns(1_000_000), (hi - lo) as usize + 1);
        assert_eq!(max_idle_conns(1000), 0);
        assert!(DEFAULT_IDLE_CONNS <= max_idle_conns(20000));
        // tcp-capacity keeps fewer fds aside: no churn runs next to it.
        assert_eq!(max_capacity_conns(20000), 9800);
        assert_eq!(max_capacity_conns(1_000_000), (hi - lo) as usize + 1);
        assert_eq!(max_capacity_conns(300), 0);
        assert!(![
            PORT_TCP_BULK,
            PORT_TCP_CRR,
            PORT_TCP_RR,
            PORT_UDP_PPS,
            PORT_UDP_RR,
            PORT_TCP_CAPACITY
        ]
        .contains(&PORT_TCP_IDLE));
        assert_eq!(Scenario::TcpCapacity.port(), PORT_TCP_CAPACITY);
    }

    #[test]
    fn idle_variant_and_shortfall() {
        let v = Scenario::TcpCrr.variants(Some(8), Some(100)).remove(0);
        let i = v.with_idle(300);
        assert_eq!(i.label, "8 clients, idle 300");
        assert_eq!((i.conns, i.size, i.idle, v.idle), (8, 100, 300, 0));
        let full = IdleConns {
            opened: 300,
            held: 300,
            server_held: 300,
            ..IdleConns::default()
        };
        assert_eq!(full.shortfall(300, 8), None);
        // Asked for more than came: with no stated limit, just the counts.
        let why = full.shortfall(400, 8).unwrap();
        assert_eq!(
            why,
            "idle connections: 300 of 400 held through the window (300 opened, 300 open at \
             the server)"
        );
        // An error alone is enough, and a limit that was not the cause is still named.
        let mut e = full.clone();
        e.errors.insert("server_timeout".into(), 1);
        e.proxy_limit = Some(7308);
        let why = e.shortfall(300, 8).unwrap();
        assert!(why.contains("; server_timeout 1)"), "{why}");
        assert!(
            why.ends_with("; the proxy's limit is 7308 connections"),
            "{why}"
        );
        e.proxy_limit = Some(305);
        let why = e.shortfall(300, 8).unwrap();
        assert!(why.contains("fewer than 300 idle + 8 clients"), "{why}");
    }

    #[test]
    fn variants() {
        let v = Scenario::TcpBulk.variants(None, None);
        assert_eq!(v.len(), 2);
        assert_eq!(v[1].conns, 4);
        assert_eq!(Scenario::TcpBulk.variants(Some(1), None).len(), 1);
        let u = Scenario::UdpPps.variants(None, None);
        assert_eq!(u.iter().map(|v| v.size).collect::<Vec<_>>(), vec![64, 1400]);
        assert_eq!(Scenario::UdpPps.variants(None, Some(512)).len(), 1);
        assert_eq!(Scenario::UdpRr.variants(None, Some(1))[0].size, 8);
        for s in Scenario::EVERY {
            assert_eq!(Scenario::parse(s.name()), Some(s));
        }
        assert!(!Scenario::ALL.contains(&Scenario::TcpCapacity));
        assert!(Scenario::ALL.iter().all(|s| Scenario::EVERY.contains(s)));
    }

    #[test]
    fn error_kinds() {
        assert_eq!(classify(&io::ErrorKind::ConnectionReset.into()), "reset");
        assert_eq!(classify(&io::ErrorKind::WouldBlock.into()), "timeout");
        assert_eq!(classify(&io::ErrorKind::UnexpectedEof.into()), "short");
    }
}
