//! `tcp-capacity`: how many TCP connections a target holds, and what each costs in
//! memory, idle and stalled.
//!
//! For each target, from the client namespace through the router to port
//! [`PORT_TCP_CAPACITY`] of the server namespace, both ends in this process (an
//! [`IdleSet`], like `tcp-crr`'s idle connections: 2 fds a connection):
//!
//! 1. **open**: batches of [`BATCH`] connections, each relaying one byte each way (the
//!    client sends one, the server echoes it, the client checks it), until one is
//!    refused, reset or not answered within [`ECHO_TIMEOUT`], or the variant's count is
//!    reached (`--conns`; by default what this process can hold,
//!    [`max_capacity_conns`]);
//! 2. **idle**: the proxy's RSS and the router's kernel socket memory with all of them
//!    held, less the same before opening, per connection;
//! 3. **relay**: a message on every connection, echoed by the server, checked at the
//!    client;
//! 4. **stalled** (proxies only): on up to [`STALL_CONNS`] of them the server writes
//!    without pause while the client never reads; once the queues are full (after
//!    [`STALL_FILL`]), the router's socket memory per stalled connection, and for the
//!    engine's splice relay the pipes it holds for them;
//! 5. **close**: every client with a reset, every server socket once it saw the end;
//!    the proxy must be back to its baseline (the engine's `active` counter, the
//!    router's sockets on the port) within [`LEAK_WAIT`].
//!
//! The stalled phase fills kernel queues on purpose, and the machine's TCP memory is
//! one pool for every namespace: it never takes the machine past
//! [`TCP_MEM_GUARD`] of `net.ipv4.tcp_mem`'s pressure threshold, so that other work
//! on the machine (a soak, say) is never pushed into TCP memory pressure. It stalls a
//! first stage of [`STALL_STAGE`] connections, measures what one costs the machine,
//! and stalls only as many more as fit; a watchdog stops the writers if the guard is
//! reached anyway. Either is reported (`stall_capped`).
//!
//! The arithmetic and the verdict ([`per_conn`], [`StopReason::from_failure`],
//! [`verdict`], [`stall_room`]) are pure and unit-tested.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use crate::lab::{self, Lab, Proto};
use crate::load::{
    classify, is_timeout, max_capacity_conns, pin, reset_close, tcp_listener, use_idle_ports,
    Family, IdleConns, IdleSet, LoadSpec, Scenario, Variant, IDLE_CONNECT_TIMEOUT,
    PORT_TCP_CAPACITY,
};
use crate::meter;
use crate::report::{fmt_bytes, fmt_kinds, fmt_opt_bytes, Record, Status};
use crate::targets::{fd_limit, Armed, Target};

/// Connections opened at once: connect and send on each, then the echoes. The last
/// batch may go past a proxy's limit by up to this many (those are closed).
pub const BATCH: usize = 64;
// A batch's tags (`tag`) tell its connections apart.
const _: () = assert!(BATCH < 251);
/// How long a batch's connections may take to reach the server, and then their
/// echoes to come back: a proxy that accepts past its limit and holds the client
/// without relaying (the engine parks it, HAProxy leaves it in the kernel's backlog)
/// is told from a working one in this long. The batch at the limit costs twice this.
pub const ECHO_TIMEOUT: Duration = Duration::from_secs(1);
// `StopReason::describe` says "no answer in 1 s": keep it true.
const _: () =
    assert!(ECHO_TIMEOUT.as_secs() == 1 && crate::load::IDLE_CONNECT_TIMEOUT.as_secs() == 1);
/// Connections stalled at most.
pub const STALL_CONNS: usize = 1000;
/// The first stage of the stalled phase: what one stalled connection costs the
/// machine is measured on this many before the rest are stalled.
pub const STALL_STAGE: usize = 100;
/// How long each stage of writers runs before the queues count as full.
pub const STALL_FILL: Duration = Duration::from_secs(2);
/// What the server writes on a stalled connection, each time it can.
pub const STALL_CHUNK: usize = 256 * 1024;
/// `SO_SNDBUF` of the stalled connections' server sockets: the server's own queue is
/// not what is measured, and left to autotuning it would take megabytes of the
/// machine's TCP memory each.
pub const STALL_SNDBUF: usize = 128 * 1024;
/// Server threads writing on the stalled connections.
pub const STALL_WRITERS: usize = 2;
/// The stalled phase keeps the machine's TCP memory below this share of the first
/// (pressure) threshold of `net.ipv4.tcp_mem`.
pub const TCP_MEM_GUARD: f64 = 0.75;
/// How long the proxy may take to be back to its baseline after everything closed.
pub const LEAK_WAIT: Duration = Duration::from_secs(5);
/// How long the engine may take to print its counters (more than `bench soak`'s
/// second: with thousands of connections stalled the core is busy).
const COUNTERS_TIMEOUT: Duration = Duration::from_secs(3);
/// Pause before each reading, for the last ACKs to land.
const SETTLE: Duration = Duration::from_millis(300);
/// The relay check's deadline: this, plus [`RELAY_PER_CONN`] a connection.
const RELAY_TIMEOUT: Duration = Duration::from_secs(3);
const RELAY_PER_CONN: Duration = Duration::from_micros(200);

/// Why opening stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The count asked for (`--conns`) was reached.
    Conns,
    /// What this process can hold was reached: its fd budget
    /// ([`max_capacity_conns`]), or its ports or fds ran out.
    BenchLimit,
    /// A connect was refused.
    Refused,
    /// A connection was reset before its echo.
    Reset,
    /// A connect or an echo did not come in time: a proxy at its limit that holds
    /// new clients without relaying them, or stops accepting.
    Timeout,
    /// A connection was closed before its echo.
    Closed,
    /// Anything else (a wrong echo...): see `stop_detail`.
    Other,
    /// Ctrl-C or SIGTERM.
    Interrupted,
}

impl StopReason {
    /// The table's words.
    pub fn describe(self) -> &'static str {
        match self {
            StopReason::Conns => "--conns reached",
            StopReason::BenchLimit => "bench limit",
            StopReason::Refused => "refused",
            StopReason::Reset => "reset",
            // The 1 s is ECHO_TIMEOUT and IDLE_CONNECT_TIMEOUT (asserted below).
            StopReason::Timeout => "no answer in 1 s",
            StopReason::Closed => "closed",
            StopReason::Other => "error",
            StopReason::Interrupted => "interrupted",
        }
    }

    /// The reason a failure kind of the opening stands for: `connect_refused`,
    /// `echo_timeout`, `connect_no_port`...
    pub fn from_failure(kind: &str) -> StopReason {
        let last = kind.rsplit('_').next().unwrap_or(kind);
        match last {
            "refused" => StopReason::Refused,
            "reset" => StopReason::Reset,
            "timeout" => StopReason::Timeout,
            "closed" | "short" => StopReason::Closed,
            _ if kind.ends_with("no_port") || kind.ends_with("fd_limit") => StopReason::BenchLimit,
            _ => StopReason::Other,
        }
    }
}

/// One reading of the target and the router.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Reading {
    /// The proxy's `VmRSS`, KiB (`None`: no proxy process).
    pub rss_kb: Option<u64>,
    /// The router's kernel socket memory, bytes: skmem `r + t + w` summed over
    /// `ss -tnH` there (TCP, every state but listening).
    pub skmem: u64,
    /// The router's sockets on [`PORT_TCP_CAPACITY`]: a proxy's client-side ones.
    pub router_sockets: usize,
    /// The engine's `active` counter (engine targets).
    pub active: Option<u64>,
    /// The engine's `pipes_in_use` counter (engine targets; updated once a second).
    pub pipes_in_use: Option<u64>,
}

/// What `tcp-capacity` measured on one target (the record's `capacity`).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Capacity {
    /// Connections asked for: the variant's count, at most `bench_limit`.
    pub asked: usize,
    /// What this process can hold ([`max_capacity_conns`] of its RLIMIT_NOFILE).
    pub bench_limit: usize,
    /// The limit the proxy states (the engine's `max_conns`, HAProxy's `maxconn`).
    pub proxy_limit: Option<usize>,
    /// Connections opened and answered: held through every phase.
    pub held: usize,
    /// Why opening stopped.
    pub stop: Option<StopReason>,
    /// The first failure and where (`echo_timeout at connection 6852`), or the count.
    pub stop_detail: String,
    /// Failures while opening, by kind (past a limit: the last batch).
    pub open_errors: BTreeMap<String, u64>,
    /// Seconds the opening took.
    pub open_s: f64,
    /// Before opening.
    pub before: Reading,
    /// With every connection held, idle.
    pub idle: Reading,
    /// With the stalled connections' queues full (proxies only).
    pub stalled_reading: Option<Reading>,
    /// After closing (and the wait for the proxy to get back to `before`).
    pub after: Reading,
    /// The proxy's RSS per idle connection, bytes (`None`: no proxy process).
    pub rss_per_idle_conn: Option<f64>,
    /// The router's socket memory per idle connection, bytes (`None` for kernel
    /// forwarding: the router holds no socket).
    pub skmem_per_idle_conn: Option<f64>,
    /// Connections whose relay-check echo came back intact.
    pub relay_ok: usize,
    /// Connections whose echo did not (sent, lost, corrupt, closed).
    pub relay_failed: usize,
    /// The failures by kind; `server_*`: what the server side saw.
    pub relay_errors: BTreeMap<String, u64>,
    /// Connections stalled (the server writing, the client not reading).
    pub stalled: usize,
    /// Router socket memory per stalled connection, bytes, on top of its idle figure.
    pub skmem_per_stalled_conn: Option<f64>,
    /// The proxy's RSS per stalled connection, bytes, on top of its idle figure (the
    /// copy relay's buffers, HAProxy's).
    pub rss_per_stalled_conn: Option<f64>,
    /// The engine's splice pipes in use per stalled connection (`pipes_in_use`).
    pub pipes_per_stalled_conn: Option<f64>,
    /// Size of each of those pipes (the engine's `ready` line), bytes.
    pub pipe_size: Option<u64>,
    /// `pipes_per_stalled_conn` × `pipe_size`: what those pipes can hold, bytes.
    pub pipe_bytes_per_stalled_conn: Option<f64>,
    /// Why fewer than `min(1000, held)` were stalled, or the writers stopped early.
    pub stall_capped: Option<String>,
    /// The machine's TCP memory (every namespace) before the stalled phase and at its
    /// reading, bytes.
    pub machine_tcp_bytes: Option<(u64, u64)>,
    /// Write errors of the stalled connections' server side, by kind.
    pub stall_errors: BTreeMap<String, u64>,
    /// Seconds from the clients' resets until every server socket saw its end.
    pub close_s: f64,
    /// Server sockets that had not seen their end by then.
    pub close_pending: usize,
    /// Seconds from then until the proxy was back to `before` (or [`LEAK_WAIT`]).
    pub settle_s: f64,
    /// The whole run on this target, seconds.
    pub total_s: f64,
    /// Source addresses the server saw.
    #[serde(skip)]
    pub peers: BTreeSet<IpAddr>,
}

impl Capacity {
    /// What is still open after the close, if anything: the engine's `active` above
    /// its baseline, router sockets on the port.
    pub fn leak(&self) -> Option<String> {
        let mut v = Vec::new();
        if let (Some(a), Some(b)) = (self.after.active, self.before.active) {
            if a > b {
                v.push(format!("engine active {a} (baseline {b})"));
            }
        }
        if self.after.router_sockets > self.before.router_sockets {
            v.push(format!(
                "{} router sockets on port {PORT_TCP_CAPACITY} (baseline {})",
                self.after.router_sockets, self.before.router_sockets
            ));
        }
        (!v.is_empty()).then(|| {
            format!(
                "{} {:.1} s after every connection was closed",
                v.join(", "),
                self.settle_s
            )
        })
    }

    /// One progress line.
    pub fn summary(&self) -> String {
        let b = fmt_opt_bytes;
        let mut s = format!(
            "held {} of {} ({}: {}) in {:.1} s; per idle conn RSS {}, socket memory {}; relay \
             {}/{} ok",
            self.held,
            self.asked,
            self.stop.map_or("?", StopReason::describe),
            self.stop_detail,
            self.open_s,
            b(self.rss_per_idle_conn),
            b(self.skmem_per_idle_conn),
            self.relay_ok,
            self.held
        );
        if self.stalled > 0 {
            let _ = write!(
                s,
                "; {} stalled: socket memory {} each",
                self.stalled,
                b(self.skmem_per_stalled_conn)
            );
            if let Some(p) = self.pipe_bytes_per_stalled_conn {
                let _ = write!(s, ", pipes {}", fmt_bytes(p));
            }
        }
        if let Some(c) = &self.stall_capped {
            let _ = write!(s, " ({c})");
        }
        let _ = write!(s, "; {}", self.after_close());
        s
    }

    /// What closing everything left: `LEAK: ...`, or how soon it was all back.
    pub fn after_close(&self) -> String {
        match self.leak() {
            Some(l) => format!("LEAK: {l}"),
            None => format!("back to baseline in {:.1} s", self.settle_s),
        }
    }
}

/// `(after - before) / n`, or `None` for no connection; negative when the figure
/// shrank (memory given back meanwhile).
pub fn per_conn(before: u64, after: u64, n: usize) -> Option<f64> {
    (n > 0).then(|| (after as f64 - before as f64) / n as f64)
}

/// How many more connections the stalled phase may stall: `per_conn` pages each,
/// with the machine at `now` pages and `guard` pages the most it may reach; a tenth of
/// the room is kept as margin (autotuning may still grow what is queued).
pub fn stall_room(now: u64, guard: u64, per_conn: f64) -> usize {
    let room = guard.saturating_sub(now) as f64 * 0.9;
    if per_conn <= 0.0 {
        return usize::MAX;
    }
    (room / per_conn).floor() as usize
}

/// Why the record fails, if it does: nothing opened, the connections went another
/// way than the target's (not intercepted by a proxy, intercepted without one), a
/// relay check that failed, a leak.
pub fn verdict(target: Target, c: &Capacity) -> Option<String> {
    let mut why = Vec::new();
    if c.held == 0 {
        why.push(format!("no connection got through ({})", c.stop_detail));
    } else if target.is_proxy() && c.idle.router_sockets == 0 {
        why.push(format!(
            "not intercepted: no socket on port {PORT_TCP_CAPACITY} in the router with {} \
             connections open (nft tproxy fails open when nothing listens)",
            c.held
        ));
    } else if !target.is_proxy() && c.idle.router_sockets > 0 {
        why.push(format!(
            "kernel baseline was intercepted: {} sockets on port {PORT_TCP_CAPACITY} in the \
             router",
            c.idle.router_sockets
        ));
    }
    if c.relay_failed > 0 {
        why.push(format!(
            "relay check: {} of {} echoes failed ({})",
            c.relay_failed,
            c.held,
            fmt_kinds(&c.relay_errors)
        ));
    }
    if let Some(l) = c.leak() {
        why.push(format!("leak: {l}"));
    }
    (!why.is_empty()).then(|| why.join("; "))
}

/// The record of a capacity run, judged by [`verdict`]; its headline is the
/// connections held.
pub fn to_record(v: &Variant, target: Target, family: Family, c: Capacity) -> Record {
    let mut r = Record::not_run(
        Scenario::TcpCapacity,
        v,
        target,
        family.name(),
        Status::Ok,
        String::new(),
    );
    r.reason = verdict(target, &c);
    if r.reason.is_some() {
        r.status = Status::Failed;
    }
    r.duration_s = c.total_s;
    r.ops = c.held as u64;
    // One byte each way when opening, a message each way in the relay check.
    r.bytes = 2 * (c.held + c.relay_ok * v.size) as u64;
    r.errors = c.relay_failed as u64;
    r.error_kinds = c.relay_errors.clone();
    r.server_saw = c.peers.iter().map(|p| p.to_string()).collect();
    r.intercepted = (c.held > 0).then_some(c.idle.router_sockets > 0);
    r.capacity = Some(c);
    r
}

/// Runs `tcp-capacity` on the armed target. An error (a reading that failed, a
/// listener that could not be made) becomes the record's reason; the connections are
/// closed on every way out.
pub fn run(
    lab: &Lab,
    v: &Variant,
    spec: &LoadSpec,
    armed: &Armed,
    log: &mut dyn FnMut(&str),
) -> anyhow::Result<Capacity> {
    let t0 = Instant::now();
    let target = armed.target();
    let bench_limit = max_capacity_conns(fd_limit());
    let mut c = Capacity {
        asked: v.conns.min(bench_limit),
        bench_limit,
        proxy_limit: armed.conn_limit(),
        pipe_size: armed.pipe_size(),
        ..Capacity::default()
    };
    use_idle_ports(lab)?;
    let addr = SocketAddr::new(spec.family.server_ip(), PORT_TCP_CAPACITY);
    let listener = lab
        .server
        .run(move || tcp_listener(addr))
        .context("capacity server listen")?;
    let cores = &spec.load_cores;
    std::thread::sleep(SETTLE);
    c.before = read(lab, armed, cores).context("reading before opening")?;

    let (asked, open_cores) = (c.asked, cores.clone());
    let opening = Instant::now();
    let opened = lab.client.run(move || {
        pin(&open_cores, 0);
        open(addr, &listener, asked, bench_limit)
    });
    c.open_s = opening.elapsed().as_secs_f64();
    c.stop = Some(opened.stop);
    c.stop_detail = opened.detail;
    c.open_errors = opened.errors;
    c.peers = opened.peers;
    let mut set = IdleSet {
        clients: opened.clients,
        servers: opened.servers,
        stats: IdleConns::default(),
    };
    c.held = set.clients.len();
    log(&format!(
        "[{}] tcp-capacity: {} connections open in {:.1} s ({}: {})",
        target.name(),
        c.held,
        c.open_s,
        opened.stop.describe(),
        c.stop_detail
    ));

    std::thread::sleep(SETTLE);
    c.idle = read(lab, armed, cores).context("reading with the connections idle")?;
    if target.is_proxy() {
        c.skmem_per_idle_conn = per_conn(c.before.skmem, c.idle.skmem, c.held);
        if let (Some(b), Some(i)) = (c.before.rss_kb, c.idle.rss_kb) {
            c.rss_per_idle_conn = per_conn(b * 1024, i * 1024, c.held);
        }
    }

    relay_check(&mut set, v.size, &mut c);

    if target.is_proxy() && !set.servers.is_empty() && !crate::stop_requested() {
        stall(lab, armed, spec, &set, &mut c)?;
    }

    set.close();
    c.close_s = set.stats.close_s;
    c.close_pending = set.stats.close_pending;
    let closed = Instant::now();
    loop {
        let r = read(lab, armed, cores).context("reading after closing")?;
        let back = r.router_sockets <= c.before.router_sockets
            && r.active.unwrap_or(0) <= c.before.active.unwrap_or(0);
        if back || closed.elapsed() >= LEAK_WAIT || crate::stop_requested() {
            c.after = r;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    c.settle_s = closed.elapsed().as_secs_f64();
    c.total_s = t0.elapsed().as_secs_f64();
    Ok(c)
}

/// Reads the proxy's RSS and counters and the router's socket memory and sockets on
/// the port (counted from a load core, not the proxy's).
fn read(lab: &Lab, armed: &Armed, cores: &[usize]) -> anyhow::Result<Reading> {
    let rss_kb = armed.pid().map(meter::rss_kb).transpose()?;
    let skmem = meter::socket_memory(&lab.router, "-tnH")?;
    let cores = cores.to_vec();
    let router_sockets = lab.router.run(move || {
        pin(&cores, 0);
        lab::count_sockets_here(PORT_TCP_CAPACITY, Proto::Tcp, None)
    });
    let (active, pipes_in_use) = if armed.target().is_engine() {
        let m = meter::read_counters(armed, COUNTERS_TIMEOUT)?;
        let get = |k: &str| Some(m.get(k).copied().unwrap_or(0));
        (get("active"), get("pipes_in_use"))
    } else {
        (None, None)
    };
    Ok(Reading {
        rss_kb,
        skmem,
        router_sockets,
        active,
        pipes_in_use,
    })
}

/// What the opening left: the connections held, and why it stopped.
struct Opened {
    clients: Vec<TcpStream>,
    servers: Vec<TcpStream>,
    stop: StopReason,
    detail: String,
    errors: BTreeMap<String, u64>,
    peers: BTreeSet<IpAddr>,
}

/// The byte connection `i` sends when it opens (and must get back).
fn tag(i: usize) -> u8 {
    (i % 251) as u8
}

/// The relay check's message of connection `i`: its index, then a pattern.
fn message(i: usize, size: usize) -> Vec<u8> {
    let mut m: Vec<u8> = (0..size).map(|j| ((i * 7 + j) % 251) as u8).collect();
    m[..8].copy_from_slice(&(i as u64).to_be_bytes());
    m
}

/// The failure kind of an I/O error: [`classify`], with the bench's own fd limit
/// told apart (EMFILE, ENFILE).
fn failure_kind(e: &io::Error) -> &'static str {
    let fd_limit = [nix::errno::Errno::EMFILE, nix::errno::Errno::ENFILE];
    if fd_limit.iter().any(|n| e.raw_os_error() == Some(*n as i32)) {
        "fd_limit"
    } else {
        classify(e)
    }
}

/// The opening, on a thread in the client namespace: batch after batch until a
/// connection fails or `asked` are held.
fn open(addr: SocketAddr, listener: &TcpListener, asked: usize, bench_limit: usize) -> Opened {
    let mut o = Opened {
        clients: Vec::with_capacity(asked),
        servers: Vec::with_capacity(asked),
        stop: StopReason::Conns,
        detail: String::new(),
        errors: BTreeMap::new(),
        peers: BTreeSet::new(),
    };
    loop {
        let first = o.clients.len();
        if first >= asked {
            o.stop = if asked >= bench_limit {
                StopReason::BenchLimit
            } else {
                StopReason::Conns
            };
            o.detail = format!("{first} connections");
            break;
        }
        if crate::stop_requested() {
            o.stop = StopReason::Interrupted;
            o.detail = format!("after {first} connections");
            break;
        }
        let want = (asked - first).min(BATCH);
        // The first failure by connection number: (number, kind).
        let mut failed: Option<(usize, String)> = None;
        let mut batch = Vec::with_capacity(want);
        for i in first..first + want {
            let sent = TcpStream::connect_timeout(&addr, IDLE_CONNECT_TIMEOUT)
                .map_err(|e| format!("connect_{}", failure_kind(&e)))
                .and_then(|s| {
                    let _ = s.set_nodelay(true);
                    (&s).write_all(&[tag(i)])
                        .map(|()| s)
                        .map_err(|e| format!("send_{}", failure_kind(&e)))
                });
            match sent {
                Ok(s) => batch.push(s),
                Err(kind) => {
                    count(&mut o.errors, &kind);
                    failed = Some((i, kind));
                    break;
                }
            }
        }
        // The server side: accept what was sent (what the proxy relays within
        // ECHO_TIMEOUT), echo one byte on each.
        let deadline = Instant::now() + ECHO_TIMEOUT;
        let mut accepted = Vec::with_capacity(batch.len());
        while accepted.len() < batch.len() && Instant::now() < deadline {
            match listener.accept() {
                Ok((s, peer)) => {
                    o.peers.insert(peer.ip());
                    accepted.push(s);
                }
                Err(e) if is_timeout(&e) => {}
                Err(e) => count(
                    &mut o.errors,
                    &format!("server_accept_{}", failure_kind(&e)),
                ),
            }
        }
        let echoed = echo_back_read(accepted, 1, deadline, &mut o.errors);
        // The client side: each must get its own byte back, the echoes of the last
        // ones accepted too, so the way back gets a timeout of its own.
        let results = read_each(&batch, 1, Instant::now() + ECHO_TIMEOUT);
        // Tags of the clients that passed (unique within a batch: BATCH < 251).
        let mut passed = Vec::with_capacity(results.len());
        for (k, (s, got)) in batch.into_iter().zip(results).enumerate() {
            let i = first + k;
            let kind = match got {
                Ok(b) if b[0] == tag(i) => {
                    passed.push(tag(i));
                    o.clients.push(s);
                    continue;
                }
                Ok(_) => "echo_wrong".to_string(),
                Err(kind) => format!("echo_{kind}"),
            };
            reset_close(s);
            count(&mut o.errors, &kind);
            if failed.as_ref().is_none_or(|(j, _)| i < *j) {
                failed = Some((i, kind));
            }
        }
        // Only the server sides of held connections stay: one whose client failed
        // would count in the relay check and the stall as a connection that is not.
        for (m, s) in echoed {
            if passed.contains(&m[0]) {
                o.servers.push(s);
            } else {
                reset_close(s);
            }
        }
        if let Some((i, kind)) = failed {
            o.stop = StopReason::from_failure(&kind);
            o.detail = format!("{kind} at connection {}", i + 1);
            break;
        }
    }
    o
}

fn count(errors: &mut BTreeMap<String, u64>, kind: &str) {
    *errors.entry(kind.to_string()).or_default() += 1;
}

/// Reads `n` bytes from each of `socks`, round-robin without blocking, until each has
/// them or `deadline`. Each result is the bytes, or what went wrong: `timeout`,
/// `closed` (EOF first), `short` (EOF after some) or the error's kind. The sockets are
/// blocking again afterwards.
fn read_each(socks: &[TcpStream], n: usize, deadline: Instant) -> Vec<Result<Vec<u8>, String>> {
    let mut bufs: Vec<Vec<u8>> = vec![Vec::with_capacity(n); socks.len()];
    let mut done: Vec<Option<Result<(), String>>> = socks
        .iter()
        .map(|s| {
            s.set_nonblocking(true)
                .err()
                .map(|e| Err(classify(&e).to_string()))
        })
        .collect();
    let mut left = done.iter().filter(|d| d.is_none()).count();
    let mut chunk = vec![0u8; n.max(1)];
    while left > 0 {
        let mut progress = false;
        for (i, s) in socks.iter().enumerate() {
            if done[i].is_some() {
                continue;
            }
            let want = n - bufs[i].len();
            let r = match (&*s).read(&mut chunk[..want]) {
                Ok(0) if bufs[i].is_empty() => Some(Err("closed".to_string())),
                Ok(0) => Some(Err("short".to_string())),
                Ok(k) => {
                    progress = true;
                    bufs[i].extend_from_slice(&chunk[..k]);
                    (bufs[i].len() == n).then_some(Ok(()))
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => None,
                Err(e) => Some(Err(classify(&e).to_string())),
            };
            if r.is_some() {
                done[i] = r;
                left -= 1;
            }
        }
        if left == 0 {
            break;
        }
        if Instant::now() >= deadline || crate::stop_requested() {
            for d in done.iter_mut().filter(|d| d.is_none()) {
                *d = Some(Err("timeout".to_string()));
            }
            break;
        }
        if !progress {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    for s in socks {
        let _ = s.set_nonblocking(false);
    }
    done.into_iter()
        .zip(bufs)
        .map(|(d, b)| match d {
            Some(Ok(())) => Ok(b),
            Some(Err(k)) => Err(k),
            None => Err("timeout".to_string()),
        })
        .collect()
}

/// The server side of an exchange: reads `n` bytes from each of `socks` and writes
/// them back. Returns the sockets that did; the others are closed, counted as
/// `server_KIND` in `errors`.
fn echo_back(
    socks: Vec<TcpStream>,
    n: usize,
    deadline: Instant,
    errors: &mut BTreeMap<String, u64>,
) -> Vec<TcpStream> {
    echo_back_read(socks, n, deadline, errors)
        .into_iter()
        .map(|(_, s)| s)
        .collect()
}

/// [`echo_back`], with what each socket read (and echoed).
fn echo_back_read(
    socks: Vec<TcpStream>,
    n: usize,
    deadline: Instant,
    errors: &mut BTreeMap<String, u64>,
) -> Vec<(Vec<u8>, TcpStream)> {
    let got = read_each(&socks, n, deadline);
    socks
        .into_iter()
        .zip(got)
        .filter_map(|(s, g)| {
            let r = g.and_then(|m| {
                (&s).write_all(&m)
                    .map(|()| m)
                    .map_err(|e| failure_kind(&e).to_string())
            });
            match r {
                Ok(m) => Some((m, s)),
                Err(kind) => {
                    count(errors, &format!("server_{kind}"));
                    None
                }
            }
        })
        .collect()
}

/// Phase 3: a `size`-byte message on every client, echoed by the server side, each
/// checked back at its client (its own index first: an echo that went to another
/// connection is corrupt).
fn relay_check(set: &mut IdleSet, size: usize, c: &mut Capacity) {
    let n = set.clients.len();
    let deadline = Instant::now() + RELAY_TIMEOUT + RELAY_PER_CONN * n as u32;
    let mut errors = BTreeMap::new();
    let sent: Vec<bool> = set
        .clients
        .iter()
        .enumerate()
        .map(|(i, s)| match (&*s).write_all(&message(i, size)) {
            Ok(()) => true,
            Err(e) => {
                count(&mut errors, &format!("send_{}", classify(&e)));
                false
            }
        })
        .collect();
    let servers = std::mem::take(&mut set.servers);
    set.servers = echo_back(servers, size, deadline, &mut errors);
    let got = read_each(&set.clients, size, deadline);
    let mut ok = 0;
    for (i, g) in got.into_iter().enumerate().filter(|(i, _)| sent[*i]) {
        match g {
            Ok(m) if m == message(i, size) => ok += 1,
            Ok(_) => count(&mut errors, "corrupt"),
            Err(kind) => count(&mut errors, &kind),
        }
    }
    c.relay_ok = ok;
    c.relay_failed = n - ok;
    c.relay_errors = errors;
}

/// Phase 4: the server writes on up to [`STALL_CONNS`] connections while no client
/// reads, in two stages within the machine's TCP memory guard (see the module
/// documentation); the reading is taken with the writers still running.
fn stall(
    lab: &Lab,
    armed: &Armed,
    spec: &LoadSpec,
    set: &IdleSet,
    c: &mut Capacity,
) -> anyhow::Result<()> {
    let want = STALL_CONNS.min(set.servers.len());
    let socks = &set.servers[..want];
    for s in socks {
        s.set_nonblocking(true)
            .context("a stalled connection's server socket")?;
        let _ = socket2::SockRef::from(s).set_send_buffer_size(STALL_SNDBUF);
    }
    let page = match nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE) {
        Ok(Some(p)) if p > 0 => p as u64,
        _ => 4096,
    };
    let (mem0, tcp_mem) = meter::machine_tcp_memory()?;
    let guard = (tcp_mem[0] as f64 * TCP_MEM_GUARD) as u64;
    let guard_words = |at: u64| {
        format!(
            "the machine's TCP memory would pass {:.0}% of net.ipv4.tcp_mem's pressure \
             threshold ({} of {}; it was at {} when the stalled phase began)",
            TCP_MEM_GUARD * 100.0,
            fmt_bytes((guard * page) as f64),
            fmt_bytes((tcp_mem[0] * page) as f64),
            fmt_bytes((at * page) as f64)
        )
    };
    if mem0 >= guard {
        c.stall_capped = Some(format!("no connection stalled: {}", guard_words(mem0)));
        return Ok(());
    }
    let active = AtomicUsize::new(want.min(STALL_STAGE));
    let stop = AtomicBool::new(false);
    let result = std::thread::scope(|sc| -> anyhow::Result<(Reading, u64)> {
        let writers: Vec<_> = (0..STALL_WRITERS)
            .map(|w| {
                let (active, stop, cores) = (&active, &stop, &spec.server_cores);
                sc.spawn(move || {
                    pin(cores, w);
                    write_stalled(socks, w, active, stop)
                })
            })
            .collect();
        let mut run = || -> anyhow::Result<(Reading, u64)> {
            let mut tripped = fill(guard, &stop)?;
            let first = active.load(Ordering::Relaxed);
            if tripped.is_none() && first < want {
                let (now, _) = meter::machine_tcp_memory()?;
                let per = now.saturating_sub(mem0) as f64 / first as f64;
                let total = first.saturating_add(stall_room(now, guard, per)).min(want);
                if total < want {
                    c.stall_capped = Some(format!(
                        "{total} of {want} stalled: at {} each, more and {}",
                        fmt_bytes(per * page as f64),
                        guard_words(mem0)
                    ));
                }
                active.store(total, Ordering::Relaxed);
                if total > first {
                    tripped = fill(guard, &stop)?;
                }
            }
            if let Some(at) = tripped {
                c.stall_capped = Some(format!(
                    "writers stopped early, the queues may not be full: {}",
                    guard_words(at)
                ));
            }
            let reading =
                read(lab, armed, &spec.load_cores).context("reading with the clients stalled")?;
            let (mem, _) = meter::machine_tcp_memory()?;
            Ok((reading, mem))
        };
        let r = run();
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            match w.join() {
                Ok(errors) => {
                    for (k, n) in errors {
                        *c.stall_errors.entry(k).or_default() += n;
                    }
                }
                Err(_) => count(&mut c.stall_errors, "writer_panic"),
            }
        }
        r
    });
    let (reading, mem) = result?;
    let n = active.load(Ordering::Relaxed);
    c.stalled = n;
    c.machine_tcp_bytes = Some((mem0 * page, mem * page));
    c.skmem_per_stalled_conn = per_conn(c.idle.skmem, reading.skmem, n);
    if let (Some(i), Some(s)) = (c.idle.rss_kb, reading.rss_kb) {
        c.rss_per_stalled_conn = per_conn(i * 1024, s * 1024, n);
    }
    if let (Some(size), Some(i), Some(s)) = (c.pipe_size, c.idle.pipes_in_use, reading.pipes_in_use)
    {
        c.pipes_per_stalled_conn = per_conn(i, s, n);
        c.pipe_bytes_per_stalled_conn = c.pipes_per_stalled_conn.map(|p| p * size as f64);
    }
    c.stalled_reading = Some(reading);
    Ok(())
}

/// Lets the writers run for [`STALL_FILL`], watching the machine's TCP memory; stops
/// them and returns the pages it reached if that passes `guard`.
fn fill(guard: u64, stop: &AtomicBool) -> anyhow::Result<Option<u64>> {
    let end = Instant::now() + STALL_FILL;
    while Instant::now() < end && !crate::stop_requested() {
        std::thread::sleep(Duration::from_millis(50));
        let (now, _) = meter::machine_tcp_memory()?;
        if now >= guard {
            stop.store(true, Ordering::Relaxed);
            return Ok(Some(now));
        }
    }
    Ok(None)
}

/// A server thread of the stalled phase: writes [`STALL_CHUNK`] on each of its
/// connections (every [`STALL_WRITERS`]-th from `w`, of the first `active`) whenever
/// it can, until `stop`. Returns the write errors by kind.
fn write_stalled(
    socks: &[TcpStream],
    w: usize,
    active: &AtomicUsize,
    stop: &AtomicBool,
) -> BTreeMap<String, u64> {
    let chunk = vec![0x5au8; STALL_CHUNK];
    let mut dead = vec![false; socks.len()];
    let mut errors = BTreeMap::new();
    while !stop.load(Ordering::Relaxed) && !crate::stop_requested() {
        let n = active.load(Ordering::Relaxed).min(socks.len());
        let mut wrote = false;
        for i in (w..n).step_by(STALL_WRITERS) {
            if dead[i] {
                continue;
            }
            match (&socks[i]).write(&chunk) {
                Ok(k) => wrote |= k > 0,
                Err(e) if is_timeout(&e) => {}
                Err(e) => {
                    dead[i] = true;
                    count(&mut errors, classify(&e));
                }
            }
        }
        if !wrote {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_reasons_from_failure_kinds() {
        use StopReason::*;
        for (kind, want) in [
            ("connect_refused", Refused),
            ("echo_reset", Reset),
            ("send_reset", Reset),
            ("connect_timeout", Timeout),
            ("echo_timeout", Timeout),
            ("echo_closed", Closed),
            ("echo_short", Closed),
            ("connect_no_port", BenchLimit),
            ("connect_fd_limit", BenchLimit),
            ("echo_wrong", Other),
            ("connect_unreachable", Other),
        ] {
            assert_eq!(StopReason::from_failure(kind), want, "{kind}");
        }
        assert_eq!(Timeout.describe(), "no answer in 1 s");
        assert_eq!(
            serde_json::to_value(BenchLimit).unwrap(),
            serde_json::json!("bench_limit")
        );
    }

    #[test]
    fn per_connection_arithmetic() {
        assert_eq!(per_conn(1000, 5000, 4), Some(1000.0));
        assert_eq!(per_conn(5000, 1000, 4), Some(-1000.0));
        assert_eq!(per_conn(0, 7, 0), None);
        // 6851 connections, RSS 9.0 MiB -> 12.5 MiB: 535 B each.
        let rss = per_conn(9216 * 1024, 12800 * 1024, 6851).unwrap();
        assert!((rss - 535.6).abs() < 0.1, "{rss}");
        // Room for the second stage: 90 % of what is left below the guard.
        assert_eq!(stall_room(100, 1100, 10.0), 90);
        assert_eq!(stall_room(1100, 1100, 10.0), 0);
        assert_eq!(stall_room(2000, 1100, 10.0), 0);
        assert_eq!(stall_room(100, 1100, 0.0), usize::MAX);
        // 100 stalled took 900 pages: 9 each; 207 000 pages of guard left -> 20 700.
        assert_eq!(stall_room(1000, 208_000, 900.0 / 100.0), 20_700);
    }

    #[test]
    fn messages_carry_their_index() {
        let m = message(5, 16);
        assert_eq!(m.len(), 16);
        assert_eq!(&m[..8], &5u64.to_be_bytes());
        assert_ne!(m, message(6, 16));
        assert_ne!(m[8..], message(6, 16)[8..]);
        assert_eq!(message(3, 8), 3u64.to_be_bytes().to_vec());
        assert_ne!(tag(0), tag(1));
        assert_ne!(tag(250), tag(251));
    }

    fn held(n: usize, router_sockets: usize) -> Capacity {
        let reading = |rss_kb: u64, skmem: u64, sockets: usize, active: u64| Reading {
            rss_kb: Some(rss_kb),
            skmem,
            router_sockets: sockets,
            active: Some(active),
            pipes_in_use: Some(0),
        };
        Capacity {
            asked: 9800,
            bench_limit: 9800,
            proxy_limit: Some(6851),
            held: n,
            stop: Some(StopReason::Timeout),
            stop_detail: format!("echo_timeout at connection {}", n + 1),
            open_s: 2.5,
            before: reading(9000, 0, 0, 0),
            idle: reading(12_000, 4096, router_sockets, n as u64),
            after: reading(12_000, 0, 0, 0),
            rss_per_idle_conn: per_conn(9000 * 1024, 12_000 * 1024, n),
            skmem_per_idle_conn: per_conn(0, 4096, n),
            relay_ok: n,
            stalled: 1000,
            skmem_per_stalled_conn: Some(750.0 * 1024.0),
            pipes_per_stalled_conn: Some(0.456),
            pipe_size: Some(262_144),
            pipe_bytes_per_stalled_conn: Some(0.456 * 262_144.0),
            settle_s: 0.2,
            total_s: 9.0,
            ..Capacity::default()
        }
    }

    fn variant() -> Variant {
        Scenario::TcpCapacity.variants(Some(9800), None).remove(0)
    }

    #[test]
    fn records_are_judged() {
        let v = variant();
        assert_eq!(
            (v.label.as_str(), v.conns, v.size),
            ("up to 9800", 9800, 16)
        );
        // Held through a proxy, every echo back, nothing left: ok, the headline is
        // the connections held.
        let r = to_record(&v, Target::EngineSplice, Family::Ipv4, held(6851, 6851));
        assert_eq!(r.status, Status::Ok, "{r:?}");
        assert_eq!(r.headline(), Some(6851.0));
        assert_eq!(r.intercepted, Some(true));
        assert_eq!(r.bytes, 2 * (6851 + 6851 * 16));
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(j["scenario"], "tcp-capacity");
        assert_eq!(j["capacity"]["held"], 6851);
        assert_eq!(j["capacity"]["stop"], "timeout");
        assert_eq!(j["capacity"]["idle"]["router_sockets"], 6851);
        let line = r.capacity.as_ref().unwrap().summary();
        assert!(
            line.starts_with(
                "held 6851 of 9800 (no answer in 1 s: echo_timeout at connection 6852)"
            ),
            "{line}"
        );
        assert!(line.contains("RSS 448 B, socket memory 0.6 B"), "{line}");
        assert!(
            line.contains("1000 stalled: socket memory 750 KiB each, pipes 117 KiB"),
            "{line}"
        );
        assert!(line.ends_with("back to baseline in 0.2 s"), "{line}");
        // Kernel forwarding: no router socket is right, one is wrong.
        let mut direct = held(9800, 0);
        direct.rss_per_idle_conn = None;
        direct.skmem_per_idle_conn = None;
        direct.stop = Some(StopReason::BenchLimit);
        let r = to_record(&v, Target::Direct, Family::Ipv4, direct.clone());
        assert_eq!(r.status, Status::Ok, "{r:?}");
        assert_eq!(r.intercepted, Some(false));
        direct.idle.router_sockets = 3;
        let r = to_record(&v, Target::Direct, Family::Ipv4, direct);
        assert_eq!(r.status, Status::Failed);
        assert!(r
            .reason
            .unwrap()
            .contains("kernel baseline was intercepted"));
        // A proxy target the connections went around.
        let r = to_record(&v, Target::Haproxy, Family::Ipv4, held(7800, 0));
        assert!(r.reason.unwrap().starts_with("not intercepted"));
        // Failed echoes, a leak: both named, the figures still there.
        let mut c = held(7308, 7308);
        c.relay_ok = 7300;
        c.relay_failed = 8;
        c.relay_errors.insert("timeout".into(), 5);
        c.relay_errors.insert("corrupt".into(), 3);
        c.after.active = Some(4);
        c.after.router_sockets = 2;
        c.settle_s = 5.0;
        let r = to_record(&v, Target::EngineCopy, Family::Ipv4, c);
        assert_eq!(r.status, Status::Failed);
        let why = r.reason.as_deref().unwrap();
        assert!(
            why.contains("relay check: 8 of 7308 echoes failed (corrupt 3, timeout 5)"),
            "{why}"
        );
        assert!(
            why.contains(
                "leak: engine active 4 (baseline 0), 2 router sockets on port 5007 \
                          (baseline 0) 5.0 s after every connection was closed"
            ),
            "{why}"
        );
        assert_eq!(r.errors, 8);
        assert!(r
            .capacity
            .as_ref()
            .unwrap()
            .summary()
            .contains("; LEAK: engine active 4"));
        // Nothing got through at all.
        let mut none = held(0, 0);
        none.stop = Some(StopReason::Refused);
        none.stop_detail = "connect_refused at connection 1".into();
        let r = to_record(&v, Target::EngineSplice, Family::Ipv4, none);
        assert_eq!(r.status, Status::Failed);
        assert_eq!(
            r.reason.as_deref(),
            Some("no connection got through (connect_refused at connection 1)")
        );
        assert_eq!(r.intercepted, None);
    }

    #[test]
    fn reads_and_echoes_many_sockets_at_once() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let mut pairs: Vec<(TcpStream, TcpStream)> = (0..4)
            .map(|_| {
                let c = TcpStream::connect(addr).unwrap();
                (c, l.accept().unwrap().0)
            })
            .collect();
        // 0 and 1 send a message, 2 sends half of one and closes, 3 sends nothing.
        for (i, (c, _)) in pairs.iter_mut().enumerate().take(2) {
            c.write_all(&message(i, 16)).unwrap();
        }
        pairs[2].0.write_all(&message(2, 16)[..5]).unwrap();
        pairs[2].0.shutdown(std::net::Shutdown::Write).unwrap();
        let (clients, servers): (Vec<_>, Vec<_>) = pairs.into_iter().unzip();
        let deadline = Instant::now() + Duration::from_millis(200);
        let mut errors = BTreeMap::new();
        let servers = echo_back(servers, 16, deadline, &mut errors);
        assert_eq!(servers.len(), 2);
        assert_eq!(errors.get("server_short"), Some(&1), "{errors:?}");
        assert_eq!(errors.get("server_timeout"), Some(&1), "{errors:?}");
        let got = read_each(
            &clients[..2],
            16,
            Instant::now() + Duration::from_millis(200),
        );
        assert_eq!(got[0].as_deref(), Ok(&message(0, 16)[..]));
        assert_eq!(got[1].as_deref(), Ok(&message(1, 16)[..]));
        // Blocking again afterwards.
        clients[0]
            .set_read_timeout(Some(Duration::from_millis(10)))
            .unwrap();
        let mut b = [0u8; 1];
        let e = (&clients[0]).read(&mut b).unwrap_err();
        assert!(is_timeout(&e), "{e}");
    }
}
