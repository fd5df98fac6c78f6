//! Prometheus metrics: `engine --metrics ADDR` serves the per-core counters as
//! Prometheus text format 0.0.4 on `GET /metrics`.
//!
//! Three parts, each testable alone:
//!
//! * [`Exposition`], a small builder of metric families: one call opens a family
//!   (HELP and TYPE lines), samples follow, histograms get their cumulative
//!   `_bucket{le=...}`, `_sum` and `_count`. Label values and help texts are escaped
//!   here and nowhere else. New families (per-rule matches, sniff outcomes) are one
//!   more [`PerCore`] entry or one more `family()` call.
//! * [`render`]: the whole exposition from a set of per-core [`Snapshot`]s plus what
//!   the process knows ([`EngineInfo`], [`FdUse`]). Pure, so it is unit-tested on
//!   synthetic snapshots. Every counter of [`Snapshot::fields`] is listed exactly once
//!   in [`per_core_families`]; a unit test fails when stats.rs gains a counter that has
//!   no metric here.
//! * [`Server`]: a listener bound before the engine starts (a bind failure is a
//!   startup error naming the address) and served by one thread, `ringrelay-metrics`,
//!   that is not a data-plane core. It handles one connection at a time, with a
//!   deadline for reading the request and one for writing the answer and a cap on
//!   the request size, so a slow or hostile client delays a scrape by at most
//!   the 2 s of [`LIMITS`] per phase and cannot wedge the thread.
//!
//! The reader never touches the hot path: each worker is the only writer of its
//! `CoreStats`, and a scrape only loads relaxed atomics, exactly like SIGUSR1. With
//! `panic = "abort"` a panic here would take the data plane down, so nothing in this
//! module unwraps on input or on the counters it is given.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant, SystemTime};

use crate::config::Config;
use crate::fdpool::FdPool;
use crate::stats::{
    CloseReason, FlowEnd, HistSnapshot, Snapshot, CONNECT_BUCKETS_S, DURATION_BUCKETS_S,
};
use crate::{cpus, sys, CoreCounters};

// ---------------------------------------------------------------------------------
// Text format builder
// ---------------------------------------------------------------------------------

/// `Content-Type` of the exposition (text format 0.0.4).
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The type of a metric family, as written on its `# TYPE` line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (resets when the engine restarts); name ends in `_total`.
    Counter,
    /// Goes up and down.
    Gauge,
    /// Cumulative buckets, `_sum` and `_count`.
    Histogram,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// A sample value: integers as integers, floats in Prometheus' spelling.
pub trait Value {
    /// Appends the value's text.
    fn write_to(&self, out: &mut String);
}

impl Value for u64 {
    fn write_to(&self, out: &mut String) {
        let _ = write!(out, "{self}");
    }
}

impl Value for f64 {
    fn write_to(&self, out: &mut String) {
        if self.is_nan() {
            out.push_str("NaN");
        } else if self.is_infinite() {
            out.push_str(if *self > 0.0 { "+Inf" } else { "-Inf" });
        } else {
            // Rust prints shortest round-trip decimals without exponent: 0.0005, 5.
            let _ = write!(out, "{self}");
        }
    }
}

/// Whether `name` is a valid metric or label name (`[a-zA-Z_][a-zA-Z0-9_]*`; colons
/// are reserved for recording rules and not used here).
pub fn is_valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Escapes a label value: backslash, double quote and newline.
pub fn escape_label_value(v: &str, out: &mut String) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Escapes a HELP text: backslash and newline.
pub fn escape_help(v: &str, out: &mut String) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// A text-format exposition being built, one family after the other (the format
/// wants every sample of a family together, after its HELP and TYPE lines).
#[derive(Default)]
pub struct Exposition {
    out: String,
    names: Vec<String>,
}

impl Exposition {
    /// An empty exposition.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts family `name`: writes its HELP and TYPE lines and returns the writer for
    /// its samples. A name may be used once (checked in debug builds).
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) -> Family<'_> {
        debug_assert!(is_valid_name(name), "metric name {name:?}");
        debug_assert!(
            !self.names.iter().any(|n| n == name),
            "metric family {name} written twice"
        );
        debug_assert_eq!(
            kind == Kind::Counter,
            name.ends_with("_total"),
            "{name}: counters, and only counters, end in _total"
        );
        self.names.push(name.to_string());
        self.out.push_str("# HELP ");
        self.out.push_str(name);
        self.out.push(' ');
        escape_help(help, &mut self.out);
        let _ = writeln!(self.out, "\n# TYPE {name} {}", kind.name());
        Family {
            out: &mut self.out,
            name: name.to_string(),
            kind,
        }
    }

    /// The text.
    pub fn finish(self) -> String {
        self.out
    }
}

/// The sample writer of one family, from [`Exposition::family`].
pub struct Family<'a> {
    out: &'a mut String,
    name: String,
    kind: Kind,
}

impl Family<'_> {
    /// One sample with `labels` (name, unescaped value).
    pub fn sample(&mut self, labels: &[(&str, &str)], value: impl Value) -> &mut Self {
        debug_assert!(
            self.kind != Kind::Histogram,
            "{}: use histogram()",
            self.name
        );
        write_sample(self.out, &self.name, "", labels, None, &value);
        self
    }

    /// One histogram: `counts[i]` observations in the bucket ending at `bounds[i]`
    /// (not cumulative, as [`HistSnapshot`] keeps them), `above` beyond the last
    /// bound, and the sum of all observations. Writes cumulative `_bucket` lines
    /// with `le`, the `+Inf` bucket, `_sum` and `_count`.
    pub fn histogram(
        &mut self,
        labels: &[(&str, &str)],
        bounds: &[f64],
        counts: &[u64],
        above: u64,
        sum: f64,
    ) -> &mut Self {
        debug_assert!(
            self.kind == Kind::Histogram,
            "{}: not a histogram",
            self.name
        );
        debug_assert_eq!(bounds.len(), counts.len());
        let mut cumulative = 0u64;
        let mut le = String::new();
        for (bound, n) in bounds.iter().zip(counts) {
            cumulative += n;
            le.clear();
            bound.write_to(&mut le);
            write_sample(
                self.out,
                &self.name,
                "_bucket",
                labels,
                Some(&le),
                &cumulative,
            );
        }
        let total = cumulative + above;
        write_sample(
            self.out,
            &self.name,
            "_bucket",
            labels,
            Some("+Inf"),
            &total,
        );
        write_sample(self.out, &self.name, "_sum", labels, None, &sum);
        write_sample(self.out, &self.name, "_count", labels, None, &total);
        self
    }
}

fn write_sample(
    out: &mut String,
    name: &str,
    suffix: &str,
    labels: &[(&str, &str)],
    le: Option<&str>,
    value: &dyn Value,
) {
    out.push_str(name);
    out.push_str(suffix);
    let all = labels.iter().copied().chain(le.map(|le| ("le", le)));
    let mut first = true;
    for (k, v) in all {
        debug_assert!(is_valid_name(k) && !k.starts_with("__"), "label name {k:?}");
        out.push_str(if first { "{" } else { "," });
        first = false;
        out.push_str(k);
        out.push_str("=\"");
        escape_label_value(v, out);
        out.push('"');
    }
    if !first {
        out.push('}');
    }
    out.push(' ');
    value.write_to(out);
    out.push('\n');
}

// ---------------------------------------------------------------------------------
// The engine's families
// ---------------------------------------------------------------------------------

/// Labels of one sample besides `core`: (name, value).
pub type Labels = Vec<(&'static str, &'static str)>;

/// A family fed by per-core counters of [`Snapshot::fields`]: one sample per
/// (counter, core), labelled `core` plus the counter's own labels.
#[derive(Clone, Debug)]
pub struct PerCore {
    /// Metric name.
    pub name: &'static str,
    /// Counter or gauge.
    pub kind: Kind,
    /// HELP text.
    pub help: &'static str,
    /// (counter name in [`Snapshot::fields`], the labels that tell it apart from the
    /// family's other counters).
    pub fields: Vec<(&'static str, Labels)>,
}

impl PerCore {
    /// A family of one counter.
    fn one(name: &'static str, kind: Kind, help: &'static str, field: &'static str) -> Self {
        PerCore {
            name,
            kind,
            help,
            fields: vec![(field, Vec::new())],
        }
    }

    /// A family of several counters told apart by one label.
    fn by(
        name: &'static str,
        kind: Kind,
        help: &'static str,
        label: &'static str,
        fields: &[(&'static str, &'static str)],
    ) -> Self {
        PerCore {
            name,
            kind,
            help,
            fields: fields
                .iter()
                .map(|&(field, value)| (field, vec![(label, value)]))
                .collect(),
        }
    }
}

const C2S: &str = "client_to_server";
const S2C: &str = "server_to_client";

/// Every per-core family, in exposition order. Each counter of
/// [`Snapshot::fields`] appears in exactly one (unit-tested): a counter added to
/// stats.rs needs a line here.
pub fn per_core_families() -> Vec<PerCore> {
    use Kind::{Counter, Gauge};
    let closes: Vec<_> = CloseReason::ALL
        .iter()
        .map(|r| (r.counter_name(), r.name()))
        .collect();
    let flow_ends: Vec<_> = FlowEnd::ALL
        .iter()
        .map(|e| (e.counter_name(), e.name()))
        .collect();
    vec![
        PerCore::one(
            "ringrelay_tcp_connections_accepted_total",
            Counter,
            "TCP connections accepted from clients.",
            "accepted",
        ),
        PerCore::one(
            "ringrelay_tcp_connections_active",
            Gauge,
            "TCP connections open now (accepted, not yet closed).",
            "active",
        ),
        PerCore::by(
            "ringrelay_tcp_connections_closed_total",
            Counter,
            "TCP connections ended, by reason (exactly one per accepted connection; \
             client_fin and server_fin are the clean ones).",
            "reason",
            &closes,
        ),
        PerCore::by(
            "ringrelay_tcp_connections_ended_total",
            Counter,
            "TCP connections ended cleanly (both FINs passed on) or with a reset (every \
             other close reason); the same connections as \
             ringrelay_tcp_connections_closed_total, grouped in two.",
            "outcome",
            &[("closed", "clean"), ("resets", "reset")],
        ),
        PerCore::one(
            "ringrelay_tcp_connections_redirected_total",
            Counter,
            "TCP connections the policy relayed to another address than their original \
             destination.",
            "policy_redirected",
        ),
        PerCore {
            name: "ringrelay_relayed_bytes_total",
            kind: Counter,
            help: "Payload bytes relayed, by protocol and direction.",
            fields: vec![
                ("bytes_c2s", vec![("protocol", "tcp"), ("direction", C2S)]),
                ("bytes_s2c", vec![("protocol", "tcp"), ("direction", S2C)]),
                (
                    "udp_bytes_c2s",
                    vec![("protocol", "udp"), ("direction", C2S)],
                ),
                (
                    "udp_bytes_s2c",
                    vec![("protocol", "udp"), ("direction", S2C)],
                ),
            ],
        },
        PerCore::by(
            "ringrelay_tcp_relay_mode_bytes_total",
            Counter,
            "TCP bytes moved, both directions, by the relay that moved them (splice: \
             zero-copy through pipes; copy: provided buffers).",
            "relay",
            &[("splice_bytes", "splice"), ("copy_bytes", "copy")],
        ),
        PerCore::one(
            "ringrelay_tcp_copy_spills_total",
            Counter,
            "Copy-relay sends that could not deliver everything at once: the rest moved \
             out of the shared provided-buffer pool into the connection's own buffer.",
            "copy_spills",
        ),
        PerCore::one(
            "ringrelay_tcp_stall_bounds_raised_total",
            Counter,
            "Receive bounds (--stall-buffer-bytes) raised fourfold, up to --stall-buffer-max-bytes, \
             for directions that filled their window every round trip while their \
             destination kept up.",
            "stall_bounds_raised",
        ),
        PerCore::one(
            "ringrelay_source_fallback_total",
            Counter,
            "Upstream sockets bound from the router although --source asked for the \
             client's address (client and target of different address families).",
            "source_fallback",
        ),
        PerCore::by(
            "ringrelay_tcp_sniff_total",
            Counter,
            "TCP connections whose first bytes were read for a rule that needs the \
             server name, by outcome.",
            "outcome",
            &[
                ("sniff_sni", "sni"),
                ("sniff_host", "host"),
                ("sniff_no_name", "no_name"),
                ("sniff_timeout", "timeout"),
            ],
        ),
        PerCore::one(
            "ringrelay_udp_cone_evictions_total",
            Counter,
            "Full-cone UDP flows that forgot their oldest destination or remote (more \
             than 64 of either).",
            "udp_cone_evictions",
        ),
        PerCore::one(
            "ringrelay_udp_gso_sends_total",
            Counter,
            "UDP sends that carried a burst of datagrams to one destination in one \
             call (GSO, UDP_SEGMENT).",
            "udp_gso_sends",
        ),
        PerCore::one(
            "ringrelay_udp_gso_fallbacks_total",
            Counter,
            "GSO sends the kernel refused (path MTU, IPsec, device); their datagrams \
             went out one by one, as does that flow from then on.",
            "udp_gso_fallbacks",
        ),
        PerCore::one(
            "ringrelay_flow_log_dropped_total",
            Counter,
            "Flow log records dropped because the writer fell behind (queue full).",
            "flowlog_dropped",
        ),
        PerCore::one(
            "ringrelay_tcp_accept_parked_total",
            Counter,
            "Clients accepted past the connection limit by a multishot burst that \
             waited for a free slot.",
            "accept_parked",
        ),
        PerCore::one(
            "ringrelay_tcp_clients_parked",
            Gauge,
            "Clients accepted past the connection limit waiting for a slot now \
             (updated every second).",
            "tcp_parked",
        ),
        PerCore::one(
            "ringrelay_tcp_accept_pauses_total",
            Counter,
            "Times the connection limit was reached and accepting paused.",
            "accept_paused",
        ),
        PerCore::one(
            "ringrelay_tcp_accept_emfile_total",
            Counter,
            "Accepts that failed for lack of file descriptors (EMFILE or ENFILE); \
             accepting pauses until the next tick.",
            "accept_emfile",
        ),
        PerCore::one(
            "ringrelay_pipes_created_total",
            Counter,
            "Pipes created for splice relays (the pool reuses them).",
            "pipes_created",
        ),
        PerCore::one(
            "ringrelay_splice_copy_fallbacks_total",
            Counter,
            "Splice-relay reads that found no pipe (every --max-pipes pipe in use, or \
             none could be made) and copied through the connection's own buffer.",
            "splice_copy_fallbacks",
        ),
        PerCore::one(
            "ringrelay_pipes_undersized_total",
            Counter,
            "Pipes the kernel made smaller than --pipe-size (fs.pipe-user-pages-soft \
             or fs.pipe-max-size).",
            "pipes_undersized",
        ),
        PerCore::by(
            "ringrelay_pipes",
            Gauge,
            "Pipes held now: in_use by relay directions with bytes in flight, idle in \
             the pool (updated every second).",
            "state",
            &[("pipes_in_use", "in_use"), ("pipes_idle", "idle")],
        ),
        PerCore::one(
            "ringrelay_udp_flows_active",
            Gauge,
            "UDP flows open now.",
            "udp_flows_active",
        ),
        PerCore::one(
            "ringrelay_udp_flows_created_total",
            Counter,
            "UDP flows created (a new client and original destination pair).",
            "udp_flows_created",
        ),
        PerCore::by(
            "ringrelay_udp_flows_ended_total",
            Counter,
            "UDP flows ended, by reason.",
            "reason",
            &flow_ends,
        ),
        PerCore::by(
            "ringrelay_udp_datagrams_total",
            Counter,
            "UDP datagrams relayed, by direction.",
            "direction",
            &[("udp_dgrams_c2s", C2S), ("udp_dgrams_s2c", S2C)],
        ),
        PerCore::by(
            "ringrelay_udp_datagrams_dropped_total",
            Counter,
            "UDP datagrams dropped, by reason.",
            "reason",
            &[
                ("udp_drop_truncated", "truncated"),
                ("udp_drop_no_origdst", "no_origdst"),
                ("udp_drop_bad_source", "bad_source"),
                ("udp_drop_send_upstream", "send_upstream"),
                ("udp_drop_send_client", "send_client"),
                ("udp_drop_no_socket", "no_socket"),
                ("udp_drop_no_fd_credit", "no_fd_credit"),
                ("udp_drop_loop", "loop"),
                ("udp_drop_policy", "policy"),
                ("udp_drop_source", "source"),
            ],
        ),
        PerCore::one(
            "ringrelay_udp_receive_enobufs_total",
            Counter,
            "UDP receive re-arms after the kernel ran out of provided buffers (ENOBUFS).",
            "udp_enobufs",
        ),
        PerCore::one(
            "ringrelay_udp_reply_sockets",
            Gauge,
            "UDP reply sockets open now (one per original destination in use).",
            "udp_reply_sockets",
        ),
        PerCore::one(
            "ringrelay_ring_ops_in_flight",
            Gauge,
            "Operations in flight on the core's io_uring (updated every second).",
            "ring_in_flight",
        ),
        PerCore::one(
            "ringrelay_ring_cq_overflow_total",
            Counter,
            "Completions the kernel had to hold back because the core's completion \
             queue was full.",
            "ring_cq_overflow",
        ),
        PerCore::one(
            "ringrelay_ring_sq_backlog",
            Gauge,
            "Submissions waiting for room in the core's submission queue (normally 0; \
             updated every second).",
            "ring_backlog",
        ),
    ]
}

/// One counter of [`Snapshot::fields`] and where it is exposed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CounterMetric {
    /// Name in [`Snapshot::fields`] (and in the SIGUSR1 table).
    pub field: &'static str,
    /// Metric family.
    pub family: &'static str,
    /// Counter or gauge.
    pub kind: Kind,
    /// Labels besides `core` that select this counter's samples.
    pub labels: Labels,
}

/// Where every per-core counter is exposed (for tests that compare the SIGUSR1 table
/// with a scrape).
pub fn counter_metrics() -> Vec<CounterMetric> {
    let mut v = Vec::new();
    for fam in per_core_families() {
        for (field, labels) in fam.fields {
            v.push(CounterMetric {
                field,
                family: fam.name,
                kind: fam.kind,
                labels,
            });
        }
    }
    v
}

/// What the engine's configuration says, fixed for its life.
#[derive(Clone, Debug, PartialEq)]
pub struct EngineInfo {
    /// Crate version.
    pub version: String,
    /// `splice` or `copy`.
    pub relay: String,
    /// Worker CPUs as a list (`0-7`).
    pub cores: String,
    /// Start time, seconds since the Unix epoch.
    pub start_time_s: f64,
    /// TCP connection limit, all cores together (0 with `--no-tcp`).
    pub max_conns: u64,
    /// UDP flow limit of each core (0 with `--no-udp`).
    pub max_flows_per_core: u64,
}

impl EngineInfo {
    /// From the running configuration and the wall-clock start time.
    pub fn new(cfg: &Config, started: SystemTime) -> EngineInfo {
        EngineInfo {
            version: env!("CARGO_PKG_VERSION").to_string(),
            relay: cfg.relay.to_string(),
            cores: cpus::format(&cfg.cores),
            start_time_s: started
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            max_conns: if cfg.tcp { cfg.max_conns as u64 } else { 0 },
            max_flows_per_core: if cfg.udp {
                cfg.udp_max_flows_per_core as u64
            } else {
                0
            },
        }
    }
}

/// File descriptors of the process against its limit, and the fd pool's credits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdUse {
    /// Open now (`/proc/self/fd`).
    pub open: u64,
    /// Soft `RLIMIT_NOFILE` (the engine raised it to the hard limit at start).
    pub limit: u64,
    /// Credits of the fd pool taken now ([`crate::fdpool`]).
    pub credits_in_use: u64,
    /// Credits of the fd pool in all.
    pub credits: u64,
}

impl FdUse {
    /// Reads them now.
    pub fn now(pool: &FdPool) -> FdUse {
        FdUse {
            open: sys::open_fd_count() as u64,
            limit: sys::nofile_limit().map_or(0, |(soft, _)| soft),
            credits_in_use: pool.in_use() as u64,
            credits: pool.total() as u64,
        }
    }
}

fn hist_sum_s<const N: usize>(h: &HistSnapshot<N>) -> f64 {
    h.sum_us as f64 / 1e6
}

/// The whole exposition.
pub fn render(info: &EngineInfo, fds: &FdUse, per_core: &[(usize, Snapshot)]) -> String {
    use Kind::{Gauge, Histogram};
    let mut x = Exposition::new();
    x.family(
        "ringrelay_info",
        Gauge,
        "Always 1; the labels say which engine runs: version, relay mode, worker cores.",
    )
    .sample(
        &[
            ("version", &info.version),
            ("relay", &info.relay),
            ("cores", &info.cores),
        ],
        1u64,
    );
    x.family(
        "ringrelay_start_time_seconds",
        Gauge,
        "When the engine started, seconds since the Unix epoch.",
    )
    .sample(&[], info.start_time_s);
    x.family(
        "ringrelay_process_open_fds",
        Gauge,
        "File descriptors the engine process holds open now.",
    )
    .sample(&[], fds.open);
    x.family(
        "ringrelay_process_max_fds",
        Gauge,
        "The engine's file descriptor limit (soft RLIMIT_NOFILE); the fd pool and the \
         connection and flow limits are sized from it.",
    )
    .sample(&[], fds.limit);
    x.family(
        "ringrelay_fd_credits_in_use",
        Gauge,
        "Credits of the fd pool taken now, all cores together: 2 per TCP connection, \
         2 per splice pipe, 1 per UDP upstream or reply socket; an upper bound on the \
         fds they hold.",
    )
    .sample(&[], fds.credits_in_use);
    x.family(
        "ringrelay_fd_credits_max",
        Gauge,
        "Credits of the fd pool in all: RLIMIT_NOFILE less the fds kept aside for \
         listeners, rings and parked clients. TCP may take all but a floor kept for UDP.",
    )
    .sample(&[], fds.credits);
    x.family(
        "ringrelay_tcp_connections_max",
        Gauge,
        "TCP connections the engine may hold open, all cores together (--max-conns, \
         bounded by the fd pool); at the limit it stops accepting.",
    )
    .sample(&[], info.max_conns);

    let cores: Vec<String> = per_core.iter().map(|(cpu, _)| cpu.to_string()).collect();
    let mut limit = |name: &str, help: &str, v: u64| {
        let mut f = x.family(name, Gauge, help);
        for core in &cores {
            f.sample(&[("core", core)], v);
        }
    };
    limit(
        "ringrelay_udp_flows_max",
        "UDP flows a core may hold (--udp-max-flows over the cores); when full, or the \
         fd pool has no credit, the least recently used flow is evicted.",
        info.max_flows_per_core,
    );

    let values: Vec<HashMap<&str, u64>> = per_core
        .iter()
        .map(|(_, s)| s.fields().into_iter().collect())
        .collect();
    for fam in per_core_families() {
        let mut f = x.family(fam.name, fam.kind, fam.help);
        for (field, own) in &fam.fields {
            for (core, vals) in cores.iter().zip(&values) {
                let mut labels: Vec<(&str, &str)> = vec![("core", core)];
                labels.extend(own.iter().copied());
                f.sample(&labels, vals.get(field).copied().unwrap_or(0));
            }
        }
    }

    // Histograms over all cores: the distribution is what matters, and per-core
    // imbalance already shows in the per-core counters.
    let mut connect = HistSnapshot::<{ CONNECT_BUCKETS_S.len() }>::default();
    let mut duration = HistSnapshot::<{ DURATION_BUCKETS_S.len() }>::default();
    for (_, s) in per_core {
        connect.add(&s.connect_latency);
        duration.add(&s.conn_duration);
    }
    x.family(
        "ringrelay_tcp_upstream_connect_duration_seconds",
        Histogram,
        "Time from the upstream connect to its success, for connects that succeeded.",
    )
    .histogram(
        &[],
        &CONNECT_BUCKETS_S,
        &connect.buckets,
        connect.above,
        hist_sum_s(&connect),
    );
    x.family(
        "ringrelay_tcp_connection_duration_seconds",
        Histogram,
        "Life of finished TCP connections, accept to close, whatever the reason.",
    )
    .histogram(
        &[],
        &DURATION_BUCKETS_S,
        &duration.buckets,
        duration.above,
        hist_sum_s(&duration),
    );
    x.finish()
}

// ---------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------

/// Bounds on one HTTP exchange.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Time for the client to send its request head, and again to take the answer.
    pub io_timeout: Duration,
    /// Largest request head read (request line and headers); beyond it: 400.
    pub max_request: usize,
}

/// What the server runs with: 2 s per phase, 8 KiB of request (Prometheus sends
/// about 300 bytes).
pub const LIMITS: Limits = Limits {
    io_timeout: Duration::from_secs(2),
    max_request: 8192,
};

/// A request the server answers.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    /// `GET` or `HEAD` (`head`: no body) of a path, query string removed.
    Get { head: bool, path: String },
    /// Another method.
    OtherMethod,
}

/// Parses the request line of a request head (`METHOD SP TARGET SP HTTP/1.x`).
fn parse_request(head: &[u8]) -> Result<Request, &'static str> {
    let line_end = head
        .iter()
        .position(|&b| b == b'\n')
        .ok_or("no request line")?;
    let line = std::str::from_utf8(&head[..line_end])
        .map_err(|_| "request line is not UTF-8")?
        .trim_end_matches('\r');
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("request line is not `METHOD TARGET HTTP/1.x`");
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err("bad method");
    }
    if !target.starts_with('/') {
        return Err("target is not a path");
    }
    if !matches!(version, "HTTP/1.0" | "HTTP/1.1") {
        return Err("not HTTP/1.0 or HTTP/1.1");
    }
    let path = target.split('?').next().unwrap_or(target).to_string();
    Ok(match method {
        "GET" => Request::Get { head: false, path },
        "HEAD" => Request::Get { head: true, path },
        _ => Request::OtherMethod,
    })
}

/// What reading a request head gave.
enum Head {
    /// The head, up to and including its blank line.
    Complete(Vec<u8>),
    /// The client closed without sending anything (a TCP health check).
    Empty,
    /// Closed mid-request, or more than `max_request` bytes without a blank line.
    Bad(&'static str),
    /// The deadline passed.
    TimedOut,
}

fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|p| p + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The time left before `deadline`, or a timeout error.
fn left(deadline: Instant) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(io::ErrorKind::TimedOut.into())
    } else {
        Ok(left)
    }
}

fn read_head(stream: &mut TcpStream, limits: &Limits) -> io::Result<Head> {
    let deadline = Instant::now() + limits.io_timeout;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = head_end(&buf) {
            buf.truncate(end);
            return Ok(Head::Complete(buf));
        }
        if buf.len() >= limits.max_request {
            return Ok(Head::Bad("request head too large"));
        }
        let Ok(t) = left(deadline) else {
            return Ok(Head::TimedOut);
        };
        stream.set_read_timeout(Some(t))?;
        let want = (limits.max_request - buf.len()).min(chunk.len());
        match stream.read(&mut chunk[..want]) {
            Ok(0) if buf.is_empty() => return Ok(Head::Empty),
            Ok(0) => return Ok(Head::Bad("connection closed mid-request")),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(Head::TimedOut)
            }
            Err(e) => return Err(e),
        }
    }
}

fn write_all_by(stream: &mut TcpStream, mut data: &[u8], deadline: Instant) -> io::Result<()> {
    while !data.is_empty() {
        stream.set_write_timeout(Some(left(deadline)?))?;
        match stream.write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn respond(
    stream: &mut TcpStream,
    limits: &Limits,
    status: &str,
    extra_header: &str,
    content_type: &str,
    body: &str,
    head_only: bool,
) -> io::Result<()> {
    let mut msg = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         {extra_header}Connection: close\r\n\r\n",
        body.len()
    );
    if !head_only {
        msg.push_str(body);
    }
    write_all_by(stream, msg.as_bytes(), Instant::now() + limits.io_timeout)?;
    let _ = stream.shutdown(std::net::Shutdown::Write);
    Ok(())
}

/// Answers one connection: `GET /metrics` with `body()` (503 when it has none), other
/// paths 404, other methods 405, malformed or oversized requests 400. Slow clients
/// are dropped at the deadlines of `limits`.
pub fn serve_one(
    mut stream: TcpStream,
    limits: &Limits,
    body: &mut dyn FnMut() -> Option<String>,
) -> io::Result<()> {
    const TEXT: &str = "text/plain; charset=utf-8";
    let head = match read_head(&mut stream, limits)? {
        Head::Complete(h) => h,
        Head::Empty | Head::TimedOut => return Ok(()),
        Head::Bad(why) => {
            let msg = format!("bad request: {why}\n");
            return respond(
                &mut stream,
                limits,
                "400 Bad Request",
                "",
                TEXT,
                &msg,
                false,
            );
        }
    };
    let s = &mut stream;
    match parse_request(&head) {
        Err(why) => {
            let msg = format!("bad request: {why}\n");
            respond(s, limits, "400 Bad Request", "", TEXT, &msg, false)
        }
        Ok(Request::OtherMethod) => respond(
            s,
            limits,
            "405 Method Not Allowed",
            "Allow: GET, HEAD\r\n",
            TEXT,
            "only GET and HEAD\n",
            false,
        ),
        Ok(Request::Get { head, path }) if path == "/metrics" => match body() {
            Some(text) => respond(s, limits, "200 OK", "", CONTENT_TYPE, &text, head),
            None => respond(
                s,
                limits,
                "503 Service Unavailable",
                "",
                TEXT,
                "the engine has stopped\n",
                head,
            ),
        },
        Ok(Request::Get { head, .. }) => respond(
            s,
            limits,
            "404 Not Found",
            "",
            TEXT,
            "not found; metrics are at /metrics\n",
            head,
        ),
    }
}

/// Accepts and answers connections one at a time, forever. Accept errors (EMFILE,
/// an aborted handshake) wait a little instead of spinning.
pub fn serve(
    listener: &TcpListener,
    limits: &Limits,
    body: &mut dyn FnMut() -> Option<String>,
) -> ! {
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                // Per-connection failures (a reset, a timeout) concern only that client.
                let _ = serve_one(stream, limits, body);
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// CPUs the metrics thread may run on: those this process may use that run no
/// worker. Empty when the workers use them all: then it stays unpinned.
pub fn spare_cpus(allowed: &[usize], workers: &[usize]) -> Vec<usize> {
    allowed
        .iter()
        .copied()
        .filter(|c| !workers.contains(c))
        .collect()
}

fn pin_current_thread(cpus: &[usize]) -> Result<(), String> {
    use nix::sched::{sched_setaffinity, CpuSet};
    let mut set = CpuSet::new();
    for &cpu in cpus {
        set.set(cpu).map_err(|e| format!("CPU {cpu}: {e}"))?;
    }
    sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).map_err(|e| e.to_string())
}

/// Name of the metrics thread (the kernel shows its first 15 bytes,
/// `ringrelay-metri`, in `top -H` and `/proc/PID/task/*/comm`).
pub const THREAD_NAME: &str = "ringrelay-metrics";

/// The metrics listener, bound at startup before the workers start.
pub struct Server {
    listener: TcpListener,
    addr: SocketAddr,
}

impl Server {
    /// Binds `addr`; the error names the address and the likely fix.
    pub fn bind(addr: SocketAddr) -> Result<Server, String> {
        let listener = TcpListener::bind(addr).map_err(|e| {
            let why = match e.kind() {
                io::ErrorKind::AddrInUse => format!(
                    "the address is already in use (another exporter, or a second \
                     engine?); find it with `ss -ltnp 'sport = :{}'` or choose another port",
                    addr.port()
                ),
                io::ErrorKind::AddrNotAvailable => format!(
                    "no interface of this host has the address {}; use 127.0.0.1 or an \
                     address of the management interface",
                    addr.ip()
                ),
                io::ErrorKind::PermissionDenied => "permission denied: ports below 1024 \
                     need CAP_NET_BIND_SERVICE; use a port such as 9108"
                    .to_string(),
                _ => "cannot listen".to_string(),
            };
            format!("--metrics {addr}: {why} ({e})")
        })?;
        let addr = listener.local_addr().unwrap_or(addr);
        Ok(Server { listener, addr })
    }

    /// The bound address (with the port the kernel chose for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Starts the [`THREAD_NAME`] thread: it pins itself to `cpus` (none: unpinned)
    /// and serves [`render`] of what `counters` returns (`None`: the engine is gone,
    /// 503) for as long as the process lives.
    pub fn spawn<F>(
        self,
        info: EngineInfo,
        cpus: Vec<usize>,
        fds: std::sync::Arc<FdPool>,
        counters: F,
    ) -> io::Result<std::thread::JoinHandle<()>>
    where
        F: Fn() -> Option<(CoreCounters, Vec<RuleRow>)> + Send + 'static,
    {
        std::thread::Builder::new()
            .name(THREAD_NAME.to_string())
            .spawn(move || {
                if !cpus.is_empty() {
                    if let Err(e) = pin_current_thread(&cpus) {
                        crate::log::warn(
                            "metrics_pin",
                            format_args!(
                                "cannot pin the metrics thread to CPUs {}: {e}; it runs \
                                 unpinned",
                                cpus::format(&cpus)
                            ),
                            &[],
                        );
                    }
                }
                let mut body = || {
                    let (rows, rules) = counters()?;
                    let mut text = render(&info, &FdUse::now(&fds), &rows);
                    text.push_str(&render_policy(&rules));
                    Some(text)
                };
                serve(&self.listener, &LIMITS, &mut body)
            })
    }
}

/// One rule's counters on one core: (core, rule name, counts).
pub type RuleRow = (usize, std::sync::Arc<str>, crate::stats::RuleCount);

/// The policy's families: per-rule matches and bytes (label `rule`, one series per
/// rule of the file: bounded by the file, not by traffic) and rules file reloads.
pub fn render_policy(rules: &[RuleRow]) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let mut x = Exposition::new();
    let mut matches = x.family(
        "ringrelay_rule_matches_total",
        Kind::Counter,
        "Connections and flows a rule of the rules file gave their verdict.",
    );
    for (core, rule, c) in rules {
        matches.sample(&[("core", &core.to_string()), ("rule", rule)], c.matches);
    }
    let mut bytes = x.family(
        "ringrelay_rule_bytes_total",
        Kind::Counter,
        "Bytes relayed, both directions, by connections and flows a rule decided \
         (counted when they end).",
    );
    for (core, rule, c) in rules {
        bytes.sample(&[("core", &core.to_string()), ("rule", rule)], c.bytes);
    }
    x.family(
        "ringrelay_config_reloads_total",
        Kind::Counter,
        "Rules file reloads on SIGHUP: applied, or refused (the old rules stay).",
    )
    .sample(
        &[("result", "applied")],
        crate::policy::RELOADS.0.load(Relaxed),
    )
    .sample(
        &[("result", "refused")],
        crate::policy::RELOADS.1.load(Relaxed),
    );
    x.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::CoreStats;
    use std::collections::BTreeSet;
    use std::sync::atomic::Ordering::Relaxed;

    fn info() -> EngineInfo {
        EngineInfo {
            version: "0.1.0".into(),
            relay: "splice".into(),
            cores: "0-1".into(),
            start_time_s: 1_700_000_000.5,
            max_conns: 2436,
            max_flows_per_core: 1218,
        }
    }

    const FDS: FdUse = FdUse {
        open: 42,
        limit: 20000,
        credits_in_use: 40,
        credits: 19456,
    };

    #[test]
    fn small_exposition_exact_text() {
        let mut x = Exposition::new();
        x.family(
            "demo_requests_total",
            Kind::Counter,
            "Requests.\nTwo lines \\ here.",
        )
        .sample(&[("core", "0"), ("reason", "a\"b")], 3u64)
        .sample(&[], 0u64);
        x.family("demo_temperature_celsius", Kind::Gauge, "Heat.")
            .sample(&[], 0.25f64)
            .sample(&[("x", "y")], f64::INFINITY)
            .sample(&[("x", "z")], f64::NAN);
        x.family("demo_latency_seconds", Kind::Histogram, "Latency.")
            .histogram(&[("core", "1")], &[0.0005, 1.0], &[2, 3], 4, 1.5);
        let want = "\
# HELP demo_requests_total Requests.\\nTwo lines \\\\ here.
# TYPE demo_requests_total counter
demo_requests_total{core=\"0\",reason=\"a\\\"b\"} 3
demo_requests_total 0
# HELP demo_temperature_celsius Heat.
# TYPE demo_temperature_celsius gauge
demo_temperature_celsius 0.25
demo_temperature_celsius{x=\"y\"} +Inf
demo_temperature_celsius{x=\"z\"} NaN
# HELP demo_latency_seconds Latency.
# TYPE demo_latency_seconds histogram
demo_latency_seconds_bucket{core=\"1\",le=\"0.0005\"} 2
demo_latency_seconds_bucket{core=\"1\",le=\"1\"} 5
demo_latency_seconds_bucket{core=\"1\",le=\"+Inf\"} 9
demo_latency_seconds_sum{core=\"1\"} 1.5
demo_latency_seconds_count{core=\"1\"} 9
";
        assert_eq!(x.finish(), want);
    }

    #[test]
    fn label_values_escape_backslash_quote_newline() {
        let mut s = String::new();
        escape_label_value("C:\\dir \"x\"\nnext", &mut s);
        assert_eq!(s, "C:\\\\dir \\\"x\\\"\\nnext");
        let mut x = Exposition::new();
        x.family("t_info", Kind::Gauge, "h")
            .sample(&[("v", "\\\"\n")], 1u64);
        assert!(x.finish().contains("t_info{v=\"\\\\\\\"\\n\"} 1\n"));
        let mut h = String::new();
        escape_help("a\"b\\c\nd", &mut h);
        assert_eq!(h, "a\"b\\\\c\\nd", "quotes stay as they are in HELP");
    }

    #[test]
    fn names_are_checked() {
        assert!(is_valid_name("ringrelay_tcp_connections_active"));
        assert!(is_valid_name("_x1"));
        assert!(!is_valid_name("1x"));
        assert!(!is_valid_name("a-b"));
        assert!(!is_valid_name("a:b"));
        assert!(!is_valid_name(""));
    }

    #[test]
    #[should_panic(expected = "written twice")]
    fn a_family_is_written_once() {
        let mut x = Exposition::new();
        x.family("dup", Kind::Gauge, "h");
        x.family("dup", Kind::Gauge, "h");
    }

    /// Every counter in `Snapshot::fields()` must be exposed, exactly once: this fails
    /// when stats.rs gains a counter without a line in `per_core_families()`.
    #[test]
    fn every_counter_has_exactly_one_metric() {
        let fields: Vec<&str> = Snapshot::default()
            .fields()
            .iter()
            .map(|(n, _)| *n)
            .collect();
        let mapped: Vec<&str> = counter_metrics().iter().map(|m| m.field).collect();
        for f in &fields {
            let n = mapped.iter().filter(|m| *m == f).count();
            assert_eq!(
                n, 1,
                "counter `{f}` of stats.rs is exposed {n} times: give it exactly one \
                 entry in metrics::per_core_families()"
            );
        }
        for m in &mapped {
            assert!(fields.contains(m), "metrics.rs names unknown counter `{m}`");
        }
        // Within a family, the labels tell the counters apart.
        let mut seen = BTreeSet::new();
        for m in counter_metrics() {
            assert!(
                seen.insert((m.family, m.labels.clone())),
                "{}: two counters with labels {:?}",
                m.family,
                m.labels
            );
        }
    }

    /// A synthetic snapshot where every counter holds a distinct value.
    fn distinct_snapshot(base: u64) -> Snapshot {
        let s = CoreStats::default();
        // Through the public API: every named counter, then reasons and histograms.
        let named = [
            &s.accepted,
            &s.active,
            &s.bytes_c2s,
            &s.bytes_s2c,
            &s.udp_dgrams_c2s,
            &s.udp_dgrams_s2c,
            &s.udp_bytes_s2c,
            &s.pipes_in_use,
            &s.ring_cq_overflow,
        ];
        for (i, c) in named.iter().enumerate() {
            c.store(base + i as u64 + 1, Relaxed);
        }
        s.count_close(CloseReason::ClientFin);
        s.count_close(CloseReason::ConnectTimeout);
        s.count_close(CloseReason::ConnectTimeout);
        s.count_flow_end(FlowEnd::SingleExchange, 7);
        s.connect_latency.observe_us(300); // 0.0005 bucket
        s.connect_latency.observe_us(2_000); // 0.0025 bucket
        s.connect_latency.observe_us(9_000_000); // above 5 s
        s.conn_duration.observe_us(1_500_000);
        s.snapshot()
    }

    #[test]
    fn render_shows_per_core_values_and_histograms_over_all_cores() {
        let rows = [(0, distinct_snapshot(0)), (3, distinct_snapshot(100))];
        let text = render(&info(), &FDS, &rows);
        let has = |line: &str| {
            assert!(
                text.lines().any(|l| l == line),
                "missing line {line:?} in:\n{text}"
            )
        };
        has("ringrelay_info{version=\"0.1.0\",relay=\"splice\",cores=\"0-1\"} 1");
        has("ringrelay_start_time_seconds 1700000000.5");
        has("ringrelay_process_open_fds 42");
        has("ringrelay_process_max_fds 20000");
        has("ringrelay_tcp_connections_max 2436");
        has("ringrelay_fd_credits_in_use 40");
        has("ringrelay_fd_credits_max 19456");
        has("ringrelay_udp_flows_max{core=\"3\"} 1218");
        has("ringrelay_udp_datagrams_dropped_total{core=\"3\",reason=\"no_fd_credit\"} 0");
        has("ringrelay_tcp_connections_accepted_total{core=\"0\"} 1");
        has("ringrelay_tcp_connections_accepted_total{core=\"3\"} 101");
        has("ringrelay_tcp_connections_active{core=\"3\"} 102");
        has("ringrelay_tcp_connections_closed_total{core=\"0\",reason=\"client_fin\"} 1");
        has("ringrelay_tcp_connections_closed_total{core=\"3\",reason=\"connect_timeout\"} 2");
        has("ringrelay_tcp_connections_closed_total{core=\"0\",reason=\"half_closed_timeout\"} 0");
        has("ringrelay_tcp_connections_ended_total{core=\"0\",outcome=\"clean\"} 1");
        has("ringrelay_tcp_connections_ended_total{core=\"0\",outcome=\"reset\"} 2");
        has("ringrelay_relayed_bytes_total{core=\"0\",protocol=\"tcp\",direction=\"client_to_server\"} 3");
        has("ringrelay_relayed_bytes_total{core=\"3\",protocol=\"tcp\",direction=\"server_to_client\"} 104");
        has("ringrelay_relayed_bytes_total{core=\"0\",protocol=\"udp\",direction=\"server_to_client\"} 7");
        has("ringrelay_relayed_bytes_total{core=\"0\",protocol=\"udp\",direction=\"client_to_server\"} 0");
        has("ringrelay_udp_datagrams_total{core=\"0\",direction=\"client_to_server\"} 5");
        has("ringrelay_udp_datagrams_total{core=\"3\",direction=\"server_to_client\"} 106");
        has("ringrelay_udp_flows_ended_total{core=\"3\",reason=\"single_exchange\"} 7");
        has("ringrelay_udp_datagrams_dropped_total{core=\"0\",reason=\"policy\"} 0");
        has("ringrelay_pipes{core=\"0\",state=\"in_use\"} 8");
        has("ringrelay_ring_cq_overflow_total{core=\"3\"} 109");
        // Histograms: both cores together, cumulative, +Inf = count.
        has("ringrelay_tcp_upstream_connect_duration_seconds_bucket{le=\"0.0005\"} 2");
        has("ringrelay_tcp_upstream_connect_duration_seconds_bucket{le=\"0.001\"} 2");
        has("ringrelay_tcp_upstream_connect_duration_seconds_bucket{le=\"0.0025\"} 4");
        has("ringrelay_tcp_upstream_connect_duration_seconds_bucket{le=\"5\"} 4");
        has("ringrelay_tcp_upstream_connect_duration_seconds_bucket{le=\"+Inf\"} 6");
        has("ringrelay_tcp_upstream_connect_duration_seconds_count 6");
        has("ringrelay_tcp_upstream_connect_duration_seconds_sum 18.0046");
        has("ringrelay_tcp_connection_duration_seconds_bucket{le=\"1\"} 0");
        has("ringrelay_tcp_connection_duration_seconds_bucket{le=\"5\"} 2");
        has("ringrelay_tcp_connection_duration_seconds_bucket{le=\"86400\"} 2");
        has("ringrelay_tcp_connection_duration_seconds_sum 3");
        has("ringrelay_tcp_connection_duration_seconds_count 2");
    }

    /// The structure a scraper relies on: HELP then TYPE once per family, every
    /// sample under its own family, counters named `_total`, buckets cumulative.
    #[test]
    fn render_is_well_formed() {
        let rows = [(0, distinct_snapshot(0)), (1, distinct_snapshot(5))];
        let text = render(&info(), &FDS, &rows);
        let mut families = BTreeSet::new();
        let mut current: Option<(String, String)> = None;
        let mut last_bucket: Option<u64> = None;
        let mut lines = text.lines().peekable();
        while let Some(line) = lines.next() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap().to_string();
                let ty = lines.next().unwrap();
                let kind = ty
                    .strip_prefix(&format!("# TYPE {name} "))
                    .unwrap_or_else(|| panic!("TYPE must follow HELP of {name}: {ty}"));
                assert!(families.insert(name.clone()), "{name} twice");
                assert_eq!(kind == "counter", name.ends_with("_total"), "{name}");
                assert!(name.starts_with("ringrelay_"), "{name}");
                current = Some((name, kind.to_string()));
                last_bucket = None;
                continue;
            }
            let (name, kind) = current.as_ref().expect("sample before any family");
            let sample = line.split(['{', ' ']).next().unwrap();
            let ok = match kind.as_str() {
                "histogram" => [
                    format!("{name}_bucket"),
                    format!("{name}_sum"),
                    format!("{name}_count"),
                ]
                .contains(&sample.to_string()),
                _ => sample == name,
            };
            assert!(ok, "sample {line:?} under family {name}");
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
            if sample.ends_with("_bucket") {
                let v: u64 = value.parse().unwrap();
                assert!(last_bucket.is_none_or(|p| p <= v), "not cumulative: {line}");
                last_bucket = Some(v);
            }
        }
        assert!(families.len() > 30, "{families:?}");
    }

    #[test]
    fn render_without_cores_still_has_every_family() {
        let text = render(&info(), &FDS, &[]);
        for fam in per_core_families() {
            assert!(
                text.contains(&format!("# TYPE {} ", fam.name)),
                "{}",
                fam.name
            );
        }
    }

    #[test]
    fn spare_cpus_exclude_workers() {
        assert_eq!(spare_cpus(&[0, 1, 2, 3], &[0, 2]), vec![1, 3]);
        assert!(spare_cpus(&[0, 1], &[0, 1]).is_empty());
    }

    #[test]
    fn request_lines_parse() {
        let get = |p: &str| Request::Get {
            head: false,
            path: p.into(),
        };
        assert_eq!(
            parse_request(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Ok(get("/metrics"))
        );
        assert_eq!(
            parse_request(b"GET /metrics?x=1 HTTP/1.0\n\n"),
            Ok(get("/metrics"))
        );
        assert_eq!(
            parse_request(b"HEAD /metrics HTTP/1.1\r\n\r\n"),
            Ok(Request::Get {
                head: true,
                path: "/metrics".into()
            })
        );
        assert_eq!(
            parse_request(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Ok(Request::OtherMethod)
        );
        for bad in [
            &b"GET /metrics\r\n\r\n"[..],
            b"GET  /metrics HTTP/1.1\r\n\r\n",
            b"GET metrics HTTP/1.1\r\n\r\n",
            b"get /metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics HTTP/2\r\n\r\n",
            b"GET /metrics HTTP/1.1 x\r\n\r\n",
            b"\xff /metrics HTTP/1.1\r\n\r\n",
            b"\r\n\r\n",
        ] {
            assert!(
                parse_request(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nrest"), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\n"), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n"), None);
    }

    /// A server on 127.0.0.1 with short limits, serving `body`; detached (the test
    /// process ends it).
    fn test_server(limits: Limits, body: Option<&'static str>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut f = || body.map(str::to_string);
            serve(&listener, &limits, &mut f)
        });
        addr
    }

    fn exchange(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(request).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    const SHORT: Limits = Limits {
        io_timeout: Duration::from_millis(300),
        max_request: 256,
    };

    #[test]
    fn http_answers_by_path_and_method() {
        let addr = test_server(SHORT, Some("x_total 1\n"));
        let ok = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"));
        assert!(ok.contains("Content-Length: 10\r\n"), "{ok}");
        assert!(ok.ends_with("\r\n\r\nx_total 1\n"), "{ok}");
        let head = exchange(addr, b"HEAD /metrics HTTP/1.0\r\n\r\n");
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n") && head.ends_with("\r\n\r\n"));
        let nf = exchange(addr, b"GET /other HTTP/1.1\r\n\r\n");
        assert!(nf.starts_with("HTTP/1.1 404 Not Found\r\n"), "{nf}");
        let post = exchange(addr, b"POST /metrics HTTP/1.1\r\n\r\n");
        assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
        assert!(post.contains("Allow: GET, HEAD\r\n"), "{post}");
        let bad = exchange(addr, b"hello\r\n\r\n");
        assert!(bad.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{bad}");
        let big = vec![b'a'; 1000];
        let too_big = exchange(addr, &big);
        assert!(too_big.starts_with("HTTP/1.1 400 "), "{too_big}");
        assert!(too_big.contains("too large"), "{too_big}");
    }

    #[test]
    fn http_503_when_the_engine_is_gone() {
        let addr = test_server(SHORT, None);
        let r = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 503 "), "{r}");
    }

    /// A client that connects and sends nothing (or half a request) holds the server
    /// for at most the read deadline; the next scrape is answered after it.
    #[test]
    fn http_slow_client_cannot_wedge_the_server() {
        let addr = test_server(SHORT, Some("x 1\n"));
        let mut idle = TcpStream::connect(addr).unwrap();
        let mut half = TcpStream::connect(addr).unwrap();
        half.write_all(b"GET /metr").unwrap();
        let t = Instant::now();
        let ok = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        // Both stalled clients were closed by the server without an answer.
        let mut buf = Vec::new();
        idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(idle.read_to_end(&mut buf).unwrap(), 0);
        half.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(half.read_to_end(&mut buf).unwrap(), 0);
    }

    #[test]
    fn bind_errors_name_the_address() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let err = Server::bind(addr).err().unwrap();
        assert!(err.starts_with(&format!("--metrics {addr}: ")), "{err}");
        assert!(err.contains("already in use"), "{err}");
        let err = Server::bind("192.0.2.1:9108".parse().unwrap())
            .err()
            .unwrap();
        assert!(
            err.contains("192.0.2.1:9108") && err.contains("no interface"),
            "{err}"
        );
        let s = Server::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        assert_ne!(s.local_addr().port(), 0);
    }
}
