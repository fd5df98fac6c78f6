//! `bench soak`: one engine target under hostile mixed load for a long window, its
//! resources sampled every second, judged for growth and leaks.
//!
//! Everything runs at once from the client namespace through the router: bulk TCP
//! (patterned bytes, verified and counted back by the server), tcp-rr and tcp-crr
//! (echoed requests, verified), UDP request/response (fresh sockets every two
//! seconds, so flows are created and expire all along), slow readers (connect, send,
//! never read while the server writes) and RST storms (bursts of connections that
//! reset at once). Every second the engine's fds (`/proc/PID/fd`), RSS
//! (`/proc/PID/status`), the router's socket memory (`ss -tuamH` skmem) and the
//! engine's SIGUSR1 counters are sampled. After the load stops the engine must drain
//! back to its baseline. [`analyze`] is the verdict, pure and unit-tested.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use socket2::SockRef;

use crate::lab::Lab;
use crate::load::{pin, tcp_listener, Family};
use crate::meter;
use crate::targets::{ArmOptions, Armed, Target, Tools};

/// Server ports of the soak's loads (clear of `bench run`'s 5001-5006).
pub const PORT_BULK: u16 = 5101;
/// tcp-rr and tcp-crr echo server.
pub const PORT_ECHO: u16 = 5102;
/// UDP echo server.
pub const PORT_UDP: u16 = 5103;
/// Slow readers' server (writes until the client goes away).
pub const PORT_SLOW: u16 = 5104;
/// RST storms' server.
pub const PORT_RST: u16 = 5105;

/// The load's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mix {
    /// Bulk streams (each reconnects every [`BULK_CONN_LIFE`]).
    pub bulk: usize,
    /// Persistent tcp-rr connections.
    pub rr: usize,
    /// tcp-crr client threads.
    pub crr: usize,
    /// UDP request/response senders.
    pub udp: usize,
    /// Slow readers held at once.
    pub slow: usize,
    /// Connections per RST burst (one burst every [`RST_EVERY`]).
    pub rst_burst: usize,
}

impl Mix {
    /// The default soak mix.
    pub const DEFAULT: Mix = Mix {
        bulk: 2,
        rr: 4,
        crr: 4,
        udp: 4,
        slow: 16,
        rst_burst: 32,
    };

    /// TCP connections the load holds open at once, at most (an RST burst counts
    /// whole).
    pub fn concurrency(&self) -> u64 {
        (self.bulk + self.rr + self.crr + self.slow + self.rst_burst) as u64
    }

    /// The bound on the engine's `active`: the load's concurrency plus two RST bursts
    /// (reset connections the engine has accepted but not yet seen reset).
    pub fn active_bound(&self) -> u64 {
        self.concurrency() + 2 * self.rst_burst as u64
    }
}

const BULK_CONN_LIFE: Duration = Duration::from_secs(5);
const BULK_CHUNK: usize = 64 * 1024;
/// The bulk pattern's period: prime, and no divisor of the chunk size, so a lost or
/// repeated chunk shows.
const PATTERN: usize = 251;
const RR_SIZE: usize = 64;
const SLOW_HOLD: Duration = Duration::from_secs(3);
const RST_EVERY: Duration = Duration::from_millis(250);
const UDP_SOCKET_LIFE: Duration = Duration::from_secs(2);
const UDP_SIZE: usize = 128;
const UDP_REPLY_TIMEOUT: Duration = Duration::from_millis(200);
const POLL_SLICE: Duration = Duration::from_millis(50);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the engine may take to drain after the load stops.
const DRAIN_DEADLINE: Duration = Duration::from_secs(60);
/// The engine's UDP idle timeout in a soak, so that the drain is quick.
pub const UDP_IDLE_TIMEOUT_S: u64 = 5;

/// One sample.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sample {
    /// Seconds since the load started (negative: baseline before it).
    pub t_s: f64,
    /// `load` or `drain` (or `base`).
    pub phase: &'static str,
    /// Open fds of the engine.
    pub fds: u64,
    /// The engine's VmRSS in KiB.
    pub rss_kb: u64,
    /// Socket memory in the router, bytes: sum of skmem r + t + w over `ss -tuamH`.
    pub skmem: u64,
    /// The engine's counters (SIGUSR1 table, totals; absent counters are 0).
    pub active: u64,
    /// `accepted`.
    pub accepted: u64,
    /// Sum of every `close_*`.
    pub closes: u64,
    /// `udp_flows_active`.
    pub udp_flows_active: u64,
    /// `udp_flows_created`.
    pub udp_flows_created: u64,
    /// Load progress: verified bulk bytes, rr and crr exchanges, UDP replies, slow
    /// readers and reset connections so far.
    pub bulk_bytes: u64,
    /// rr exchanges verified.
    pub rr_ops: u64,
    /// crr connections verified.
    pub crr_ops: u64,
    /// UDP replies received.
    pub udp_replies: u64,
    /// Slow readers opened.
    pub slow_conns: u64,
    /// RST-storm connections opened.
    pub rst_conns: u64,
}

impl Sample {
    /// The CSV header of [`Sample::csv_row`].
    pub const CSV_HEADER: &'static str = "t_s,phase,fds,rss_kb,skmem_bytes,active,accepted,\
closes,udp_flows_active,udp_flows_created,bulk_bytes,rr_ops,crr_ops,udp_replies,slow_conns,rst_conns";

    /// One CSV line.
    pub fn csv_row(&self) -> String {
        format!(
            "{:.1},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            self.t_s,
            self.phase,
            self.fds,
            self.rss_kb,
            self.skmem,
            self.active,
            self.accepted,
            self.closes,
            self.udp_flows_active,
            self.udp_flows_created,
            self.bulk_bytes,
            self.rr_ops,
            self.crr_ops,
            self.udp_replies,
            self.slow_conns,
            self.rst_conns
        )
    }
}

/// The CSV of all samples.
pub fn to_csv(samples: &[Sample]) -> String {
    let mut s = String::from(Sample::CSV_HEADER);
    s.push('\n');
    for x in samples {
        s.push_str(&x.csv_row());
        s.push('\n');
    }
    s
}

/// How much a series may grow from the middle third of the load to the last:
/// `rel` of the middle third's median plus `abs`.
#[derive(Debug, Clone, Copy)]
pub struct Tolerance {
    /// Relative part.
    pub rel: f64,
    /// Absolute part, in the series' unit.
    pub abs: f64,
}

/// Tolerances of the growth checks.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// fds.
    pub fds: Tolerance,
    /// RSS, KiB.
    pub rss_kb: Tolerance,
    /// Socket memory, bytes.
    pub skmem: Tolerance,
    /// The bound on `active` during the load.
    pub active_max: u64,
}

impl Limits {
    /// The soak's defaults for a load `mix`.
    pub fn for_mix(mix: &Mix) -> Limits {
        Limits {
            fds: Tolerance {
                rel: 0.10,
                abs: 16.0,
            },
            rss_kb: Tolerance {
                rel: 0.05,
                abs: 4096.0,
            },
            skmem: Tolerance {
                rel: 0.25,
                abs: 4.0 * 1024.0 * 1024.0,
            },
            active_max: mix.active_bound(),
        }
    }
}

/// What the load itself saw: verified transfers and failures by kind.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadTally {
    /// Bulk bytes the server verified and confirmed back.
    pub bulk_bytes: u64,
    /// rr exchanges verified.
    pub rr_ops: u64,
    /// crr connections verified.
    pub crr_ops: u64,
    /// UDP datagrams sent, and replies received.
    pub udp_sent: u64,
    /// UDP replies.
    pub udp_replies: u64,
    /// Data loss or corruption on verified transfers (`bulk_mismatch`, `rr_corrupt`...).
    pub lost: BTreeMap<String, u64>,
    /// Errors of the verified loads (bulk, rr, crr: resets, timeouts, refused).
    pub errors: BTreeMap<String, u64>,
    /// Errors of the hostile loads (slow readers, RST storms), expected and
    /// reported only.
    pub hostile_errors: BTreeMap<String, u64>,
}

/// The verdict.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// No failed rule.
    pub pass: bool,
    /// Why it failed, one line per rule.
    pub reasons: Vec<String>,
    /// The figures, one line.
    pub figures: String,
}

impl Verdict {
    /// `PASS: figures` or `FAIL: reasons; figures`.
    pub fn summary_line(&self) -> String {
        if self.pass {
            format!("PASS: {}", self.figures)
        } else {
            format!("FAIL: {}; {}", self.reasons.join("; "), self.figures)
        }
    }
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// One series judged for growth: the middle and last thirds of the load samples.
#[derive(Debug, Clone, PartialEq)]
pub struct Growth {
    /// Median of the middle third.
    pub mid: f64,
    /// Median of the last third.
    pub last: f64,
    /// Why it grows, if it does.
    pub fails: Option<String>,
}

/// Judges `series` (the load phase, in time order) for unbounded growth. It fails
/// when the last third's median exceeds the middle third's by more than `tol`, or
/// on a steady climb: the medians of the last four sixths each above the one before
/// and together rising by more than `tol.abs`. A spike that comes back moves no
/// median; a leak moves them all.
pub fn growth(name: &str, series: &[f64], tol: Tolerance) -> Growth {
    let n = series.len();
    let (mid, last) = (&series[n / 3..2 * n / 3], &series[2 * n / 3..]);
    let g = Growth {
        mid: median(mid),
        last: median(last),
        fails: None,
    };
    if n < 12 {
        return g;
    }
    let allowed = g.mid * (1.0 + tol.rel) + tol.abs;
    let sixths: Vec<f64> = (2..6)
        .map(|k| median(&series[k * n / 6..(k + 1) * n / 6]))
        .collect();
    let climbs = sixths.windows(2).all(|w| w[1] > w[0]) && sixths[3] - sixths[0] > tol.abs;
    let fails = if g.last > allowed {
        Some(format!(
            "{name} grows: last third median {} > middle third median {} + {:.0}% + {}",
            num(g.last),
            num(g.mid),
            tol.rel * 100.0,
            num(tol.abs)
        ))
    } else if climbs {
        Some(format!(
            "{name} climbs steadily: medians of the last four sixths {} (rise > {})",
            sixths
                .iter()
                .map(|v| num(*v))
                .collect::<Vec<_>>()
                .join(" < "),
            num(tol.abs)
        ))
    } else {
        None
    };
    Growth { fails, ..g }
}

fn num(v: f64) -> String {
    crate::report::fmt_num(v)
}

fn mib(kb_or_b: f64, unit_bytes: f64) -> String {
    format!("{:.1} MiB", kb_or_b * unit_bytes / (1024.0 * 1024.0))
}

/// The verdict over `samples` (`base`, then `load`, then `drain`): growth of fds,
/// RSS and socket memory in the load phase, `active` within its bound, the end
/// state after the drain (fds back to the baseline, no connection or UDP flow left,
/// every accepted connection closed for a counted reason), and the load's own
/// verification (no byte lost, no error on the verified transfers).
pub fn analyze(samples: &[Sample], tally: &LoadTally, limits: &Limits) -> Verdict {
    let mut reasons = Vec::new();
    let phase = |p: &str| -> Vec<&Sample> { samples.iter().filter(|s| s.phase == p).collect() };
    let (base, load, drain) = (phase("base"), phase("load"), phase("drain"));
    let mut fig = String::new();
    if load.len() < 6 {
        reasons.push(format!(
            "only {} load samples: too few to judge growth",
            load.len()
        ));
    }
    let series = |f: fn(&Sample) -> u64| -> Vec<f64> { load.iter().map(|s| f(s) as f64).collect() };
    let gf = growth("fds", &series(|s| s.fds), limits.fds);
    let gr = growth("RSS (KiB)", &series(|s| s.rss_kb), limits.rss_kb);
    let gs = growth("socket memory (bytes)", &series(|s| s.skmem), limits.skmem);
    for g in [&gf, &gr, &gs] {
        if load.len() >= 6 {
            if let Some(f) = &g.fails {
                reasons.push(f.clone());
            }
        }
    }
    let active_max = load.iter().map(|s| s.active).max().unwrap_or(0);
    if active_max > limits.active_max {
        reasons.push(format!(
            "active reached {active_max}, above the load's bound {}",
            limits.active_max
        ));
    }
    let base_fds = base.last().map(|s| s.fds);
    let end = drain.last().or(load.last()).copied();
    let _ = write!(
        fig,
        "{} load samples; fds mid {} last {}; RSS mid {} last {}; skmem mid {} last {}; \
         active max {active_max} (bound {})",
        load.len(),
        num(gf.mid),
        num(gf.last),
        mib(gr.mid, 1024.0),
        mib(gr.last, 1024.0),
        mib(gs.mid, 1.0),
        mib(gs.last, 1.0),
        limits.active_max
    );
    match (end, drain.is_empty()) {
        (Some(e), false) => {
            let _ = write!(
                fig,
                "; end after {:.0} s drain: fds {} (baseline {}), active {}, udp_flows_active {}, \
                 accepted {} = active + closes {}",
                e.t_s - load.last().map_or(e.t_s, |l| l.t_s),
                e.fds,
                base_fds.map_or("?".into(), |b| b.to_string()),
                e.active,
                e.udp_flows_active,
                e.accepted,
                e.closes
            );
            match base_fds {
                Some(b) if e.fds > b => {
                    reasons.push(format!("fds {} after the drain, baseline {b}", e.fds))
                }
                Some(_) => {}
                None => reasons.push("no baseline sample".into()),
            }
            if e.active != 0 {
                reasons.push(format!(
                    "{} connections still active after the drain",
                    e.active
                ));
            }
            if e.udp_flows_active != 0 {
                reasons.push(format!(
                    "{} UDP flows still active after the drain",
                    e.udp_flows_active
                ));
            }
            if e.accepted != e.active + e.closes {
                reasons.push(format!(
                    "accepted {} != active {} + sum(close_*) {}",
                    e.accepted, e.active, e.closes
                ));
            }
        }
        _ => reasons.push("no drain sample: the end state was not checked".into()),
    }
    let _ = write!(
        fig,
        "; verified: bulk {:.2} GB, rr {}, crr {}; udp {}/{} replied",
        tally.bulk_bytes as f64 / 1e9,
        tally.rr_ops,
        tally.crr_ops,
        tally.udp_replies,
        tally.udp_sent
    );
    let kinds = crate::report::fmt_kinds;
    if !tally.lost.is_empty() {
        reasons.push(format!("data lost or corrupted: {}", kinds(&tally.lost)));
    }
    if !tally.errors.is_empty() {
        reasons.push(format!(
            "errors on verified transfers: {}",
            kinds(&tally.errors)
        ));
    }
    if tally.bulk_bytes == 0 || tally.rr_ops == 0 || tally.crr_ops == 0 {
        reasons.push("a verified load moved nothing".into());
    }
    if !tally.hostile_errors.is_empty() {
        let _ = write!(fig, "; hostile loads saw {}", kinds(&tally.hostile_errors));
    }
    Verdict {
        pass: reasons.is_empty(),
        reasons,
        figures: fig,
    }
}

// ---------------------------------------------------------------------------
// The load.

#[derive(Default)]
struct Counters {
    bulk_bytes: AtomicU64,
    rr_ops: AtomicU64,
    crr_ops: AtomicU64,
    udp_sent: AtomicU64,
    udp_replies: AtomicU64,
    slow_conns: AtomicU64,
    rst_conns: AtomicU64,
    lost: Mutex<BTreeMap<String, u64>>,
    errors: Mutex<BTreeMap<String, u64>>,
    hostile: Mutex<BTreeMap<String, u64>>,
}

impl Counters {
    fn add(m: &Mutex<BTreeMap<String, u64>>, k: String) {
        *m.lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(k)
            .or_default() += 1;
    }
    fn lost(&self, k: &str) {
        Self::add(&self.lost, k.to_string());
    }
    fn error(&self, load: &str, e: &io::Error) {
        Self::add(&self.errors, format!("{load}_{}", classify(e)));
    }
    fn hostile(&self, load: &str, e: &io::Error) {
        Self::add(&self.hostile, format!("{load}_{}", classify(e)));
    }
    fn tally(&self) -> LoadTally {
        let m =
            |x: &Mutex<BTreeMap<String, u64>>| x.lock().unwrap_or_else(|p| p.into_inner()).clone();
        LoadTally {
            bulk_bytes: self.bulk_bytes.load(Ordering::Relaxed),
            rr_ops: self.rr_ops.load(Ordering::Relaxed),
            crr_ops: self.crr_ops.load(Ordering::Relaxed),
            udp_sent: self.udp_sent.load(Ordering::Relaxed),
            udp_replies: self.udp_replies.load(Ordering::Relaxed),
            lost: m(&self.lost),
            errors: m(&self.errors),
            hostile_errors: m(&self.hostile),
        }
    }
}

fn classify(e: &io::Error) -> &'static str {
    use io::ErrorKind::*;
    match e.kind() {
        ConnectionReset | ConnectionAborted | BrokenPipe => "reset",
        ConnectionRefused => "refused",
        TimedOut | WouldBlock => "timeout",
        UnexpectedEof => "short",
        AddrNotAvailable | AddrInUse => "no_port",
        _ => "other",
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

struct Flags {
    /// Clients stop.
    stop: AtomicBool,
    /// Servers stop (clients are joined).
    servers_stop: AtomicBool,
    /// Bound of every loop.
    hard_end: Instant,
}

impl Flags {
    fn over(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
            || crate::stop_requested()
            || Instant::now() >= self.hard_end
    }
    fn server_over(&self) -> bool {
        self.servers_stop.load(Ordering::Relaxed) || Instant::now() >= self.hard_end
    }
}

/// Reads exactly `buf.len()` bytes within `timeout` (or until `give_up`).
/// `Ok(false)`: clean EOF before the first byte.
fn read_full(
    s: &mut TcpStream,
    buf: &mut [u8],
    timeout: Duration,
    give_up: &dyn Fn() -> bool,
) -> io::Result<bool> {
    let started = Instant::now();
    let mut got = 0;
    while got < buf.len() {
        match s.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if is_timeout(&e) => {
                if started.elapsed() >= timeout || give_up() {
                    return Err(io::ErrorKind::TimedOut.into());
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Accepts until the servers stop, one thread per connection; handlers joined as
/// they finish so a long soak does not pile up handles.
fn accept_loop<H>(l: TcpListener, fl: Arc<Flags>, cores: Vec<usize>, handle: H)
where
    H: Fn(TcpStream, &Flags) + Send + Sync + Clone + 'static,
{
    let mut handlers: Vec<JoinHandle<()>> = Vec::new();
    let mut i = 0;
    while !fl.server_over() {
        if let Ok((s, _)) = l.accept() {
            let (fl, handle, cores) = (fl.clone(), handle.clone(), cores.clone());
            i += 1;
            handlers.push(std::thread::spawn(move || {
                pin(&cores, i);
                let _ = s.set_read_timeout(Some(POLL_SLICE));
                let _ = s.set_write_timeout(Some(POLL_SLICE));
                handle(s, &fl)
            }));
        }
        if handlers.len() > 256 {
            let (done, live): (Vec<_>, Vec<_>) =
                handlers.into_iter().partition(|h| h.is_finished());
            for h in done {
                let _ = h.join();
            }
            handlers = live;
        }
    }
    for h in handlers {
        let _ = h.join();
    }
}

fn pattern_buf() -> Vec<u8> {
    (0..BULK_CHUNK + PATTERN)
        .map(|i| (i % PATTERN) as u8)
        .collect()
}

/// Bulk server: verifies the pattern to EOF, then answers the byte count (u64 LE).
fn bulk_server(mut s: TcpStream, fl: &Flags, c: &Counters) {
    let mut buf = vec![0u8; 256 * 1024];
    let (mut total, mut phase, mut corrupt) = (0u64, 0usize, false);
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if !corrupt {
                    for &b in &buf[..n] {
                        if b as usize != phase {
                            corrupt = true;
                            break;
                        }
                        phase += 1;
                        if phase == PATTERN {
                            phase = 0;
                        }
                    }
                }
                total += n as u64;
            }
            Err(e) if is_timeout(&e) => {
                if fl.server_over() {
                    return;
                }
            }
            Err(e) => {
                c.error("bulk_server", &e);
                return;
            }
        }
    }
    if corrupt {
        c.lost("bulk_corrupt");
    }
    let _ = s.write_all(&total.to_le_bytes());
}

fn bulk_client(addr: SocketAddr, fl: &Flags, c: &Counters) {
    let buf = pattern_buf();
    while !fl.over() {
        let mut s = match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(s) => s,
            Err(e) => {
                c.error("bulk", &e);
                std::thread::sleep(POLL_SLICE);
                continue;
            }
        };
        let _ = s.set_write_timeout(Some(POLL_SLICE));
        let _ = s.set_read_timeout(Some(POLL_SLICE));
        let (started, mut sent, mut failed) = (Instant::now(), 0u64, false);
        while started.elapsed() < BULK_CONN_LIFE && !fl.over() {
            let off = (sent % PATTERN as u64) as usize;
            match s.write(&buf[off..off + BULK_CHUNK]) {
                Ok(n) => sent += n as u64,
                Err(e) if is_timeout(&e) => {}
                Err(e) => {
                    c.error("bulk", &e);
                    failed = true;
                    break;
                }
            }
        }
        if failed {
            continue;
        }
        let _ = s.shutdown(Shutdown::Write);
        let mut ack = [0u8; 8];
        match read_full(&mut s, &mut ack, IO_TIMEOUT + IO_TIMEOUT, &|| {
            Instant::now() >= fl.hard_end
        }) {
            Ok(true) => {
                let got = u64::from_le_bytes(ack);
                if got == sent {
                    c.bulk_bytes.fetch_add(sent, Ordering::Relaxed);
                } else {
                    c.lost("bulk_count_mismatch");
                }
            }
            Ok(false) => c.lost("bulk_no_ack"),
            Err(e) => c.error("bulk_ack", &e),
        }
    }
}

/// Echo server of rr and crr: echoes each 64-byte request; a request starting with
/// `C` is a crr one, and the server closes after answering it.
fn echo_server(mut s: TcpStream, fl: &Flags, c: &Counters) {
    let _ = s.set_nodelay(true);
    let mut req = [0u8; RR_SIZE];
    loop {
        match read_full(&mut s, &mut req, Duration::MAX, &|| fl.server_over()) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                if !fl.server_over() {
                    c.error("echo_server", &e);
                }
                return;
            }
        }
        if let Err(e) = s.write_all(&req) {
            c.error("echo_server", &e);
            return;
        }
        if req[0] == b'C' {
            return;
        }
    }
}

fn request(kind: u8, id: u64, seq: u64) -> [u8; RR_SIZE] {
    let mut r = [0u8; RR_SIZE];
    r[0] = kind;
    r[8..16].copy_from_slice(&id.to_le_bytes());
    r[16..24].copy_from_slice(&seq.to_le_bytes());
    for (i, b) in r.iter_mut().enumerate().skip(24) {
        *b = (seq as usize).wrapping_add(i) as u8;
    }
    r
}

fn rr_client(addr: SocketAddr, id: u64, fl: &Flags, c: &Counters) {
    let mut seq = 0u64;
    while !fl.over() {
        let mut s = match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(s) => s,
            Err(e) => {
                c.error("rr", &e);
                std::thread::sleep(POLL_SLICE);
                continue;
            }
        };
        let _ = s.set_nodelay(true);
        let _ = s.set_read_timeout(Some(POLL_SLICE));
        let mut resp = [0u8; RR_SIZE];
        while !fl.over() {
            seq += 1;
            let req = request(b'R', id, seq);
            if let Err(e) = s.write_all(&req) {
                c.error("rr", &e);
                break;
            }
            match read_full(&mut s, &mut resp, IO_TIMEOUT, &|| {
                Instant::now() >= fl.hard_end
            }) {
                Ok(true) if resp == req => {
                    c.rr_ops.fetch_add(1, Ordering::Relaxed);
                }
                Ok(true) => {
                    c.lost("rr_corrupt");
                    break;
                }
                Ok(false) => {
                    c.lost("rr_short");
                    break;
                }
                Err(e) => {
                    c.error("rr", &e);
                    break;
                }
            }
        }
    }
}

fn crr_client(addr: SocketAddr, id: u64, fl: &Flags, c: &Counters) {
    let mut seq = 0u64;
    while !fl.over() {
        seq += 1;
        let mut s = match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(s) => s,
            Err(e) => {
                c.error("crr", &e);
                std::thread::sleep(POLL_SLICE);
                continue;
            }
        };
        let _ = s.set_nodelay(true);
        let _ = s.set_read_timeout(Some(POLL_SLICE));
        let req = request(b'C', id, seq);
        if let Err(e) = s.write_all(&req) {
            c.error("crr", &e);
            continue;
        }
        let mut resp = [0u8; RR_SIZE];
        let give_up = || Instant::now() >= fl.hard_end;
        match read_full(&mut s, &mut resp, IO_TIMEOUT, &give_up) {
            Ok(true) if resp == req => {}
            Ok(true) => {
                c.lost("crr_corrupt");
                continue;
            }
            Ok(false) => {
                c.lost("crr_short");
                continue;
            }
            Err(e) => {
                c.error("crr", &e);
                continue;
            }
        }
        // The server closes first (its TIME_WAIT, not the client's ports).
        let mut end = [0u8; 1];
        match read_full(&mut s, &mut end, IO_TIMEOUT, &give_up) {
            Ok(false) => {
                c.crr_ops.fetch_add(1, Ordering::Relaxed);
            }
            Ok(true) => c.lost("crr_extra_bytes"),
            Err(e) => c.error("crr_close", &e),
        }
    }
}

/// Slow readers' server: after the client's hello, writes until the client goes.
fn slow_server(mut s: TcpStream, fl: &Flags) {
    let mut hello = [0u8; 16];
    if !matches!(
        read_full(&mut s, &mut hello, IO_TIMEOUT, &|| fl.server_over()),
        Ok(true)
    ) {
        return;
    }
    let chunk = vec![0x33u8; BULK_CHUNK];
    while !fl.server_over() {
        match s.write(&chunk) {
            Ok(_) => {}
            Err(e) if is_timeout(&e) => {}
            Err(_) => return,
        }
    }
}

/// One slow reader after the other: connect, send a hello, never read, hold
/// [`SLOW_HOLD`], close with unread data (a reset).
fn slow_client(addr: SocketAddr, fl: &Flags, c: &Counters) {
    while !fl.over() {
        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
            .and_then(|mut s| s.write_all(&[0x11u8; 16]).map(|_| s))
        {
            Ok(s) => {
                c.slow_conns.fetch_add(1, Ordering::Relaxed);
                let until = Instant::now() + SLOW_HOLD;
                while Instant::now() < until && !fl.over() {
                    std::thread::sleep(POLL_SLICE);
                }
                drop(s);
            }
            Err(e) => {
                c.hostile("slow", &e);
                std::thread::sleep(POLL_SLICE);
            }
        }
    }
}

fn rst_server(mut s: TcpStream, fl: &Flags) {
    let mut buf = [0u8; 4096];
    while !fl.server_over() {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if is_timeout(&e) => {}
            Err(_) => return,
        }
    }
}

/// RST storms: every [`RST_EVERY`], `burst` connections that send a few bytes and
/// reset at once (SO_LINGER 0).
fn rst_client(addr: SocketAddr, burst: usize, fl: &Flags, c: &Counters) {
    while !fl.over() {
        let started = Instant::now();
        let mut socks = Vec::with_capacity(burst);
        for _ in 0..burst {
            match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                Ok(mut s) => {
                    let _ = s.write_all(b"reset-me");
                    let _ = SockRef::from(&s).set_linger(Some(Duration::ZERO));
                    socks.push(s);
                    c.rst_conns.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => c.hostile("rst", &e),
            }
        }
        drop(socks);
        while started.elapsed() < RST_EVERY && !fl.over() {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn udp_server(sock: UdpSocket, fl: &Flags) {
    let _ = sock.set_read_timeout(Some(POLL_SLICE));
    let mut buf = [0u8; 2048];
    while !fl.server_over() {
        if let Ok((n, peer)) = sock.recv_from(&mut buf) {
            let _ = sock.send_to(&buf[..n], peer);
        }
    }
}

/// UDP request/response on a fresh socket (a new flow) every [`UDP_SOCKET_LIFE`].
fn udp_client(addr: SocketAddr, id: u64, fl: &Flags, c: &Counters) {
    let local: SocketAddr = match addr {
        SocketAddr::V4(_) => "0.0.0.0:0".parse().expect("addr"),
        SocketAddr::V6(_) => "[::]:0".parse().expect("addr"),
    };
    let mut seq = 0u64;
    while !fl.over() {
        let Ok(sock) = UdpSocket::bind(local) else {
            std::thread::sleep(POLL_SLICE);
            continue;
        };
        let _ = sock.set_read_timeout(Some(UDP_REPLY_TIMEOUT));
        let born = Instant::now();
        let mut resp = [0u8; UDP_SIZE + 16];
        while born.elapsed() < UDP_SOCKET_LIFE && !fl.over() {
            seq += 1;
            let mut d = [0u8; UDP_SIZE];
            d[..8].copy_from_slice(&id.to_le_bytes());
            d[8..16].copy_from_slice(&seq.to_le_bytes());
            if sock.send_to(&d, addr).is_err() {
                std::thread::sleep(POLL_SLICE);
                continue;
            }
            c.udp_sent.fetch_add(1, Ordering::Relaxed);
            let sent_at = Instant::now();
            // Skip late replies to earlier requests; wait for this one.
            while sent_at.elapsed() < UDP_REPLY_TIMEOUT {
                match sock.recv_from(&mut resp) {
                    Ok((n, _)) if n == UDP_SIZE && resp[..UDP_SIZE] == d => {
                        c.udp_replies.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        }
    }
}

/// One client thread's body.
type ClientFn = Box<dyn FnOnce(&Flags, &Counters) + Send>;

/// The running load: clients in the client namespace, servers in the server one.
struct Load {
    flags: Arc<Flags>,
    counters: Arc<Counters>,
    clients: Vec<JoinHandle<()>>,
    servers: Vec<JoinHandle<()>>,
}

impl Load {
    fn start(
        lab: &Lab,
        family: Family,
        mix: &Mix,
        duration: Duration,
        load_cores: &[usize],
        server_cores: &[usize],
    ) -> anyhow::Result<Load> {
        let ip: IpAddr = family.server_ip();
        let flags = Arc::new(Flags {
            stop: AtomicBool::new(false),
            servers_stop: AtomicBool::new(false),
            hard_end: Instant::now() + duration + Duration::from_secs(30),
        });
        let counters = Arc::new(Counters::default());
        let mut load = Load {
            flags: flags.clone(),
            counters: counters.clone(),
            clients: Vec::new(),
            servers: Vec::new(),
        };
        // Servers first; on an error here `load` drops and stops what started.
        type Handler = fn(TcpStream, &Flags, &Counters);
        let tcp: [(u16, Handler); 4] = [
            (PORT_BULK, bulk_server),
            (PORT_ECHO, echo_server),
            (PORT_SLOW, |s, f, _| slow_server(s, f)),
            (PORT_RST, |s, f, _| rst_server(s, f)),
        ];
        for (port, h) in tcp {
            let addr = SocketAddr::new(ip, port);
            let l = lab
                .server
                .run(move || tcp_listener(addr))
                .with_context(|| format!("listen on {addr}"))?;
            let (fl, c, cores) = (flags.clone(), counters.clone(), server_cores.to_vec());
            load.servers.push(lab.server.spawn(move || {
                pin(&cores, 0);
                accept_loop(l, fl, cores, move |s, f: &Flags| h(s, f, &c))
            }));
        }
        let uaddr = SocketAddr::new(ip, PORT_UDP);
        let usock = lab
            .server
            .run(move || UdpSocket::bind(uaddr))
            .with_context(|| format!("bind {uaddr}"))?;
        {
            let (fl, cores) = (flags.clone(), server_cores.to_vec());
            load.servers.push(lab.server.spawn(move || {
                pin(&cores, 1);
                udp_server(usock, &fl)
            }));
        }
        let mut i = 0usize;
        let mut client = |load: &mut Load, f: ClientFn| {
            let (fl, c, cores) = (flags.clone(), counters.clone(), load_cores.to_vec());
            i += 1;
            let n = i;
            load.clients.push(lab.client.spawn(move || {
                pin(&cores, n);
                f(&fl, &c)
            }));
        };
        let at = |p| SocketAddr::new(ip, p);
        for _ in 0..mix.bulk {
            let a = at(PORT_BULK);
            client(&mut load, Box::new(move |f, c| bulk_client(a, f, c)));
        }
        for k in 0..mix.rr {
            let a = at(PORT_ECHO);
            client(
                &mut load,
                Box::new(move |f, c| rr_client(a, k as u64, f, c)),
            );
        }
        for k in 0..mix.crr {
            let a = at(PORT_ECHO);
            client(
                &mut load,
                Box::new(move |f, c| crr_client(a, k as u64, f, c)),
            );
        }
        for k in 0..mix.udp {
            let a = at(PORT_UDP);
            client(
                &mut load,
                Box::new(move |f, c| udp_client(a, k as u64, f, c)),
            );
        }
        for _ in 0..mix.slow {
            let a = at(PORT_SLOW);
            client(&mut load, Box::new(move |f, c| slow_client(a, f, c)));
        }
        if mix.rst_burst > 0 {
            let (a, b) = (at(PORT_RST), mix.rst_burst);
            client(&mut load, Box::new(move |f, c| rst_client(a, b, f, c)));
        }
        Ok(load)
    }

    /// Stops the clients, then the servers, and joins everything (bounded: every
    /// loop looks at the flags at least every [`POLL_SLICE`] plus an I/O timeout).
    fn stop(&mut self) -> LoadTally {
        self.flags.stop.store(true, Ordering::Release);
        for h in self.clients.drain(..) {
            if h.join().is_err() {
                Counters::add(&self.counters.errors, "client_panic".into());
            }
        }
        self.flags.servers_stop.store(true, Ordering::Release);
        for h in self.servers.drain(..) {
            let _ = h.join();
        }
        self.counters.tally()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        if !self.clients.is_empty() || !self.servers.is_empty() {
            self.stop();
        }
    }
}

// ---------------------------------------------------------------------------
// Sampling.

/// Samples the armed engine: fds, RSS, the router's socket memory, its counters.
fn sample(lab: &Lab, armed: &Armed, pid: u32) -> anyhow::Result<Sample> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("/proc/{pid}/fd (engine gone?)"))?
        .count() as u64;
    let rss_kb = meter::rss_kb(pid)?;
    let skmem = meter::socket_memory(&lab.router, "-tuaH")?;
    let counters = meter::read_counters(armed, Duration::from_secs(1))?;
    let get = |k: &str| counters.get(k).copied().unwrap_or(0);
    Ok(Sample {
        fds,
        rss_kb,
        skmem,
        active: get("active"),
        accepted: get("accepted"),
        closes: counters
            .iter()
            .filter(|(k, _)| k.starts_with("close_"))
            .map(|(_, v)| v)
            .sum(),
        udp_flows_active: get("udp_flows_active"),
        udp_flows_created: get("udp_flows_created"),
        ..Sample::default()
    })
}

/// What to soak.
#[derive(Debug, Clone)]
pub struct SoakConfig {
    /// engine-splice or engine-copy.
    pub target: Target,
    /// The load window.
    pub duration: Duration,
    /// The load.
    pub mix: Mix,
    /// Engine cores.
    pub engine_cores: Vec<usize>,
    /// Client cores.
    pub load_cores: Vec<usize>,
    /// Server cores.
    pub server_cores: Vec<usize>,
    /// Address family.
    pub family: Family,
    /// Transparent port.
    pub port: u16,
}

/// What a soak produced.
#[derive(Debug, Clone)]
pub struct SoakResult {
    /// Every sample, in time order.
    pub samples: Vec<Sample>,
    /// The load's own tally.
    pub tally: LoadTally,
    /// The verdict.
    pub verdict: Verdict,
    /// Interrupted by Ctrl-C / SIGTERM.
    pub interrupted: bool,
    /// The engine's startup and notes.
    pub notes: Vec<String>,
}

/// Arms `cfg.target` on `lab`, runs the load for `cfg.duration` sampling every
/// second, stops it, samples the drain, disarms. Every exit path disarms (the
/// [`Armed`] and the load are dropped).
pub fn run(
    lab: &Lab,
    cfg: &SoakConfig,
    tools: &Tools,
    log: &mut dyn FnMut(&str),
) -> anyhow::Result<SoakResult> {
    anyhow::ensure!(
        matches!(cfg.target, Target::EngineSplice | Target::EngineCopy),
        "bench soak runs engine-splice or engine-copy, not {}",
        cfg.target.name()
    );
    let opts = ArmOptions {
        engine_cores: cfg.engine_cores.clone(),
        port: cfg.port,
        engine_args: vec![
            "--udp-idle-timeout-s".into(),
            UDP_IDLE_TIMEOUT_S.to_string(),
        ],
    };
    log(&format!("[{}] arming", cfg.target.name()));
    let mut armed =
        Armed::arm(lab, cfg.target, tools, &opts).map_err(|e| anyhow::anyhow!("arming: {e}"))?;
    let pid = armed.pid().context("engine has no pid")?;
    let mut notes = Vec::new();
    let mut samples = Vec::new();
    let tick = Duration::from_secs(1);
    // Baseline: two quiet samples.
    for i in 0..2 {
        std::thread::sleep(tick);
        let mut s = sample(lab, &armed, pid)?;
        s.t_s = i as f64 - 2.0;
        s.phase = "base";
        samples.push(s);
    }
    log(&format!(
        "baseline: fds {}, RSS {} KiB; load for {:.0} s",
        samples[1].fds,
        samples[1].rss_kb,
        cfg.duration.as_secs_f64()
    ));
    let mut load = Load::start(
        lab,
        cfg.family,
        &cfg.mix,
        cfg.duration,
        &cfg.load_cores,
        &cfg.server_cores,
    )?;
    let t0 = Instant::now();
    let mut interrupted = false;
    let mut k = 1u32;
    let progress = |s: &mut Sample, c: &Counters| {
        s.bulk_bytes = c.bulk_bytes.load(Ordering::Relaxed);
        s.rr_ops = c.rr_ops.load(Ordering::Relaxed);
        s.crr_ops = c.crr_ops.load(Ordering::Relaxed);
        s.udp_replies = c.udp_replies.load(Ordering::Relaxed);
        s.slow_conns = c.slow_conns.load(Ordering::Relaxed);
        s.rst_conns = c.rst_conns.load(Ordering::Relaxed);
    };
    // The load phase: bounded by the duration (and Ctrl-C).
    while t0.elapsed() < cfg.duration {
        let next = tick * k;
        if let Some(d) = next.checked_sub(t0.elapsed()) {
            std::thread::sleep(d.min(cfg.duration.saturating_sub(t0.elapsed())));
        }
        k += 1;
        if crate::stop_requested() {
            interrupted = true;
            break;
        }
        if let Err(e) = armed.check_alive() {
            anyhow::bail!("engine died during the soak: {e}");
        }
        let mut s = sample(lab, &armed, pid)?;
        s.t_s = t0.elapsed().as_secs_f64();
        s.phase = "load";
        progress(&mut s, &load.counters);
        if k.is_multiple_of(30) {
            log(&format!(
                "t={:.0}s fds {} RSS {} KiB skmem {} active {} udp_flows {}",
                s.t_s, s.fds, s.rss_kb, s.skmem, s.active, s.udp_flows_active
            ));
        }
        samples.push(s);
    }
    log("load stopping");
    let tally = load.stop();
    let base_fds = samples[1].fds;
    // The drain: every second until it is back to the baseline, at most
    // DRAIN_DEADLINE.
    let drain_start = Instant::now();
    while !interrupted && drain_start.elapsed() < DRAIN_DEADLINE {
        std::thread::sleep(tick);
        if crate::stop_requested() {
            interrupted = true;
            break;
        }
        let mut s = sample(lab, &armed, pid)?;
        s.t_s = t0.elapsed().as_secs_f64();
        s.phase = "drain";
        progress(&mut s, &load.counters);
        let done = s.active == 0 && s.udp_flows_active == 0 && s.fds <= base_fds;
        samples.push(s);
        // One more second after it looks done, so the end state is settled.
        if done
            && samples
                .iter()
                .rev()
                .nth(1)
                .is_some_and(|p| p.phase == "drain" && p.active == 0 && p.fds <= base_fds)
        {
            break;
        }
    }
    let (n2, _summary) = armed.disarm();
    notes.extend(n2);
    let verdict = analyze(&samples, &tally, &Limits::for_mix(&cfg.mix));
    Ok(SoakResult {
        samples,
        tally,
        verdict,
        interrupted,
        notes,
    })
}

// ---------------------------------------------------------------------------
// The plot.

/// A panel of the plot: title, colour, the value of a sample.
type Panel = (&'static str, &'static str, fn(&Sample) -> f64);

/// Four stacked panels over time (fds, RSS, socket memory, active connections),
/// in the report's style; a dashed line where the load stopped.
pub fn to_svg(samples: &[Sample], title: &str, verdict: &str) -> String {
    let (left, top, panel_h, gap, plot_w) = (70.0, 56.0, 110.0, 34.0, 720.0);
    let panels: [Panel; 4] = [
        ("engine fds", "#1f77b4", |s| s.fds as f64),
        ("engine RSS (MiB)", "#ff7f0e", |s| s.rss_kb as f64 / 1024.0),
        ("router socket memory (MiB)", "#2ca02c", |s| {
            s.skmem as f64 / (1024.0 * 1024.0)
        }),
        ("active connections", "#9467bd", |s| s.active as f64),
    ];
    let width = left + plot_w + 30.0;
    let height = top + 4.0 * (panel_h + gap) + 20.0;
    let t_min = samples.first().map_or(0.0, |s| s.t_s);
    let t_max = samples.last().map_or(1.0, |s| s.t_s).max(t_min + 1.0);
    let x = |t: f64| left + (t - t_min) / (t_max - t_min) * plot_w;
    let load_end = samples
        .iter()
        .filter(|s| s.phase == "load")
        .map(|s| s.t_s)
        .fold(None, |m: Option<f64>, t| Some(m.map_or(t, |m| m.max(t))));
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{left}" y="20" font-size="14" font-weight="bold">{}</text>"#,
        esc(title)
    );
    let short: String = verdict.chars().take(140).collect();
    let _ = writeln!(
        s,
        r##"<text x="{left}" y="36" fill="#555">{}</text>"##,
        esc(&short)
    );
    for (i, (name, color, f)) in panels.iter().enumerate() {
        let y0 = top + i as f64 * (panel_h + gap);
        let vmax = samples.iter().map(f).fold(0.0f64, f64::max).max(1e-9) * 1.1;
        let y = |v: f64| y0 + panel_h - v / vmax * panel_h;
        let _ = writeln!(
            s,
            r#"<text x="{left}" y="{:.1}" font-weight="bold">{name}</text>"#,
            y0 - 4.0
        );
        for g in 0..=4 {
            let v = vmax * g as f64 / 4.0;
            let yy = y(v);
            let _ = writeln!(
                s,
                r##"<line x1="{left}" x2="{:.1}" y1="{yy:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end" fill="#555">{}</text>"##,
                left + plot_w,
                left - 4.0,
                yy + 4.0,
                crate::report::fmt_num(v)
            );
        }
        if let Some(te) = load_end {
            let xe = x(te);
            let _ = writeln!(
                s,
                r##"<line x1="{xe:.1}" x2="{xe:.1}" y1="{y0:.1}" y2="{:.1}" stroke="#999" stroke-dasharray="4 3"/>"##,
                y0 + panel_h
            );
        }
        let pts: Vec<String> = samples
            .iter()
            .map(|p| format!("{:.1},{:.1}", x(p.t_s), y(f(p))))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#,
            pts.join(" ")
        );
    }
    let yb = top + 4.0 * (panel_h + gap) - gap + 16.0;
    let _ = writeln!(
        s,
        r##"<text x="{left}" y="{yb:.1}" fill="#555">time (s) {:.0} .. {:.0}; dashed: load stops, the engine drains</text>"##,
        t_min, t_max
    );
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_of(n: usize, f: impl Fn(usize) -> (u64, u64, u64, u64)) -> Vec<Sample> {
        let mut v = vec![
            Sample {
                t_s: -2.0,
                phase: "base",
                fds: 20,
                rss_kb: 10_000,
                ..Sample::default()
            },
            Sample {
                t_s: -1.0,
                phase: "base",
                fds: 20,
                rss_kb: 10_000,
                ..Sample::default()
            },
        ];
        for i in 0..n {
            let (fds, rss_kb, skmem, active) = f(i);
            v.push(Sample {
                t_s: i as f64 + 1.0,
                phase: "load",
                fds,
                rss_kb,
                skmem,
                active,
                accepted: 1000 * i as u64 + active,
                closes: 1000 * i as u64,
                ..Sample::default()
            });
        }
        for j in 0..2 {
            v.push(Sample {
                t_s: n as f64 + 1.0 + j as f64,
                phase: "drain",
                fds: 20,
                rss_kb: 12_000,
                accepted: 1000 * n as u64,
                closes: 1000 * n as u64,
                ..Sample::default()
            });
        }
        v
    }

    fn good_tally() -> LoadTally {
        LoadTally {
            bulk_bytes: 1 << 30,
            rr_ops: 1000,
            crr_ops: 1000,
            udp_sent: 100,
            udp_replies: 100,
            ..LoadTally::default()
        }
    }

    /// Deterministic noise in [-1, 1].
    fn noise(i: usize) -> f64 {
        ((i * 7919 + 13) % 97) as f64 / 48.0 - 1.0
    }

    #[test]
    fn flat_passes() {
        let s = run_of(180, |i| {
            (
                (80.0 + 10.0 * noise(i)) as u64,
                (30_000.0 + 500.0 * noise(i + 1)) as u64,
                (4e6 + 1e6 * noise(i + 2)) as u64,
                (40.0 + 10.0 * noise(i + 3)) as u64,
            )
        });
        let v = analyze(&s, &good_tally(), &Limits::for_mix(&Mix::DEFAULT));
        assert!(v.pass, "{}", v.summary_line());
        assert!(
            v.summary_line().starts_with("PASS: 180 load samples"),
            "{}",
            v.summary_line()
        );
        assert!(v.figures.contains("fds 20 (baseline 20)"), "{}", v.figures);
    }

    #[test]
    fn a_linear_fd_leak_fails() {
        // One fd a second on top of a flat 80: 3 minutes end 60 above the middle.
        let s = run_of(180, |i| (80 + i as u64, 30_000, 4_000_000, 40));
        let v = analyze(&s, &good_tally(), &Limits::for_mix(&Mix::DEFAULT));
        assert!(!v.pass);
        assert!(
            v.reasons.iter().any(|r| r.starts_with("fds grows")),
            "{:?}",
            v.reasons
        );
        // A slower leak of RSS (64 KiB/s on 30 MiB): within 10 % by medians over 3
        // minutes, caught as a steady climb.
        let s = run_of(180, |i| (80, 30_000 + 64 * i as u64, 4_000_000, 40));
        let v = analyze(&s, &good_tally(), &Limits::for_mix(&Mix::DEFAULT));
        assert!(!v.pass, "{}", v.summary_line());
        assert!(
            v.reasons
                .iter()
                .any(|r| r.starts_with("RSS (KiB) climbs steadily")),
            "{:?}",
            v.reasons
        );
    }

    #[test]
    fn a_spike_that_comes_back_passes() {
        // fds and socket memory jump tenfold for 10 s in the last third, then fall back.
        let s = run_of(180, |i| {
            let spike = (140..150).contains(&i);
            (
                if spike { 800 } else { 80 },
                30_000,
                if spike { 40_000_000 } else { 4_000_000 },
                if spike { 90 } else { 40 },
            )
        });
        let v = analyze(&s, &good_tally(), &Limits::for_mix(&Mix::DEFAULT));
        assert!(v.pass, "{}", v.summary_line());
    }

    #[test]
    fn leaks_at_the_end_and_lost_bytes_fail() {
        let mut s = run_of(60, |_| (80, 30_000, 4_000_000, 40));
        let end = s.last_mut().unwrap();
        end.fds = 23;
        end.active = 2;
        end.udp_flows_active = 1;
        end.accepted += 5; // 2 active + 3 never counted as closed
        let mut t = good_tally();
        t.lost.insert("bulk_count_mismatch".into(), 1);
        let v = analyze(&s, &t, &Limits::for_mix(&Mix::DEFAULT));
        assert!(!v.pass);
        let all = v.reasons.join(" | ");
        for want in [
            "fds 23 after the drain, baseline 20",
            "2 connections still active",
            "1 UDP flows still active",
            "!= active 2 + sum(close_*)",
            "bulk_count_mismatch 1",
        ] {
            assert!(all.contains(want), "{want}: {all}");
        }
        // Active above the load's bound during the load.
        let s = run_of(60, |i| {
            (80, 30_000, 4_000_000, if i == 30 { 500 } else { 40 })
        });
        let v = analyze(&s, &good_tally(), &Limits::for_mix(&Mix::DEFAULT));
        assert!(
            v.reasons.iter().any(|r| r.contains("active reached 500")),
            "{:?}",
            v.reasons
        );
    }

    #[test]
    fn csv_and_svg_render() {
        let csv = to_csv(&run_of(3, |_| (1, 2, 3, 4)));
        assert!(csv.starts_with(Sample::CSV_HEADER));
        assert_eq!(csv.lines().count(), 1 + 2 + 3 + 2);
        let svg = to_svg(&run_of(30, |i| (80 + i as u64, 1, 2, 3)), "t", "PASS: x");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 4);
    }
}
