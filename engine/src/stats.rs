//! Per-core counters.
//!
//! Each worker owns one [`CoreStats`] and is its only writer; the main thread reads
//! them for SIGUSR1 and the exit summary. Relaxed atomics are enough: every counter
//! is independent and a report is a snapshot, not a transaction. The struct is
//! cache-line aligned so that two cores never write the same line.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Why a TCP connection ended. Every accepted connection ends with exactly one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// Clean close that the client started (its FIN came first).
    ClientFin,
    /// Clean close that the server started.
    ServerFin,
    /// The client side failed: reset, or a read/write error on its socket.
    ClientReset,
    /// The server side failed after the connect: reset, or a read/write error.
    ServerReset,
    /// The upstream connect was refused (ECONNREFUSED).
    ConnectRefused,
    /// The upstream connect did not complete within `--connect-timeout-ms`.
    ConnectTimeout,
    /// The upstream connect failed: host or network unreachable.
    Unreachable,
    /// The upstream connect failed with another error (or no socket could be made).
    ConnectError,
    /// No traffic in either direction for `--idle-timeout-s`.
    IdleTimeout,
    /// Half-closed by one side, then nothing moved for `--half-closed-timeout-s`.
    HalfClosedTimeout,
    /// Still open when the drain deadline passed during a stop: reset.
    DrainDeadline,
    /// Accepted while stopping, or parked when the stop began: reset unrelayed.
    Stopping,
    /// Rejected by the policy: the client was reset, no upstream connect.
    Rejected,
    /// Accepted past the connection limit with the park queue full: reset.
    Limit,
    /// Addressed to the engine's own port on this host: refused, it would loop.
    Loop,
    /// A local resource failed (no pipe could be made, an fd limit).
    LocalError,
    /// `--source client-ip|client`: the client's address (and port) could not be
    /// bound or had no free port towards the server (EADDRINUSE, EADDRNOTAVAIL).
    SourceUnavailable,
    /// The client was gone before the engine looked at it (reset right after
    /// connecting): nothing to relay.
    ClientGone,
}

impl CloseReason {
    /// Every reason, in counter order.
    pub const ALL: [CloseReason; 18] = [
        CloseReason::ClientFin,
        CloseReason::ServerFin,
        CloseReason::ClientReset,
        CloseReason::ServerReset,
        CloseReason::ConnectRefused,
        CloseReason::ConnectTimeout,
        CloseReason::Unreachable,
        CloseReason::ConnectError,
        CloseReason::IdleTimeout,
        CloseReason::HalfClosedTimeout,
        CloseReason::DrainDeadline,
        CloseReason::Stopping,
        CloseReason::Rejected,
        CloseReason::Limit,
        CloseReason::Loop,
        CloseReason::LocalError,
        CloseReason::SourceUnavailable,
        CloseReason::ClientGone,
    ];

    /// Short name, as in flow logs.
    pub fn name(self) -> &'static str {
        self.counter_name().trim_start_matches("close_")
    }

    /// Name of its counter in the summary.
    pub fn counter_name(self) -> &'static str {
        match self {
            CloseReason::ClientFin => "close_client_fin",
            CloseReason::ServerFin => "close_server_fin",
            CloseReason::ClientReset => "close_client_reset",
            CloseReason::ServerReset => "close_server_reset",
            CloseReason::ConnectRefused => "close_connect_refused",
            CloseReason::ConnectTimeout => "close_connect_timeout",
            CloseReason::Unreachable => "close_unreachable",
            CloseReason::ConnectError => "close_connect_error",
            CloseReason::IdleTimeout => "close_idle_timeout",
            CloseReason::HalfClosedTimeout => "close_half_closed_timeout",
            CloseReason::DrainDeadline => "close_drain_deadline",
            CloseReason::Stopping => "close_stopping",
            CloseReason::Rejected => "close_rejected",
            CloseReason::Limit => "close_limit",
            CloseReason::Loop => "close_loop",
            CloseReason::LocalError => "close_local_error",
            CloseReason::SourceUnavailable => "close_source_unavailable",
            CloseReason::ClientGone => "close_client_gone",
        }
    }

    /// Whether the connection ended cleanly (both directions passed their FIN on).
    pub fn is_clean(self) -> bool {
        matches!(self, CloseReason::ClientFin | CloseReason::ServerFin)
    }

    /// The reason a failed upstream connect ends with, from its errno.
    pub fn from_connect_errno(errno: i32) -> CloseReason {
        match errno {
            libc::ECONNREFUSED => CloseReason::ConnectRefused,
            // ECANCELED: the linked timeout fired and cancelled the connect.
            libc::ECANCELED | libc::ETIMEDOUT => CloseReason::ConnectTimeout,
            libc::EHOSTUNREACH | libc::ENETUNREACH => CloseReason::Unreachable,
            // Only with a bound source: no free port from the client's address.
            libc::EADDRNOTAVAIL | libc::EADDRINUSE => CloseReason::SourceUnavailable,
            _ => CloseReason::ConnectError,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Why a UDP flow ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FlowEnd {
    /// No datagram either way for `--udp-idle-timeout-s`.
    Idle,
    /// One request and its answer, then quiet for `--udp-single-exchange-timeout-s`.
    SingleExchange,
    /// The flow table was full and this flow was the least recently used.
    Evicted,
    /// Sending to the server failed with a lasting error.
    SendError,
    /// The engine stopped.
    Drain,
}

impl FlowEnd {
    /// Every reason, in counter order.
    pub const ALL: [FlowEnd; 5] = [
        FlowEnd::Idle,
        FlowEnd::SingleExchange,
        FlowEnd::Evicted,
        FlowEnd::SendError,
        FlowEnd::Drain,
    ];

    /// Short name, as in flow logs.
    pub fn name(self) -> &'static str {
        self.counter_name().trim_start_matches("udp_end_")
    }

    /// Name of its counter in the summary.
    pub fn counter_name(self) -> &'static str {
        match self {
            FlowEnd::Idle => "udp_end_idle",
            FlowEnd::SingleExchange => "udp_end_single_exchange",
            FlowEnd::Evicted => "udp_end_evicted",
            FlowEnd::SendError => "udp_end_send_error",
            FlowEnd::Drain => "udp_end_drain",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// What one rule decided on one core.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleCount {
    /// Connections and flows it gave their verdict.
    pub matches: u64,
    /// Bytes those relayed, both directions, counted when they ended.
    pub bytes: u64,
}

/// [`CoreStats::heartbeat`] of a worker whose loop ended.
pub const HEARTBEAT_ENDED: u64 = u64::MAX;

/// Upper bounds (seconds) of the upstream connect latency histogram's buckets.
pub const CONNECT_BUCKETS_S: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// Upper bounds (seconds) of the connection duration histogram's buckets.
pub const DURATION_BUCKETS_S: [f64; 12] = [
    0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0, 86400.0,
];

/// A fixed-bucket histogram written by one core: `N` buckets plus one for values
/// above the last bound, and the sum in microseconds.
#[derive(Debug)]
pub struct Histogram<const N: usize> {
    bounds_us: [u64; N],
    buckets: [AtomicU64; N],
    above: AtomicU64,
    sum_us: AtomicU64,
}

impl<const N: usize> Histogram<N> {
    /// A histogram with the given bucket bounds in seconds.
    pub fn new(bounds_s: &[f64; N]) -> Self {
        Histogram {
            bounds_us: std::array::from_fn(|i| (bounds_s[i] * 1e6) as u64),
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            above: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }

    /// Records one value.
    pub fn observe_us(&self, us: u64) {
        match self.bounds_us.iter().position(|&b| us <= b) {
            Some(i) => self.buckets[i].fetch_add(1, Relaxed),
            None => self.above.fetch_add(1, Relaxed),
        };
        self.sum_us.fetch_add(us, Relaxed);
    }

    /// A copy: per-bucket (not cumulative) counts, the overflow bucket, the sum.
    pub fn snapshot(&self) -> HistSnapshot<N> {
        HistSnapshot {
            buckets: std::array::from_fn(|i| self.buckets[i].load(Relaxed)),
            above: self.above.load(Relaxed),
            sum_us: self.sum_us.load(Relaxed),
        }
    }
}

/// A plain copy of a [`Histogram`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HistSnapshot<const N: usize> {
    /// Observations per bucket (not cumulative), in bound order.
    pub buckets: [u64; N],
    /// Observations above the last bound.
    pub above: u64,
    /// Sum of all observations, microseconds.
    pub sum_us: u64,
}

impl<const N: usize> Default for HistSnapshot<N> {
    fn default() -> Self {
        HistSnapshot {
            buckets: [0; N],
            above: 0,
            sum_us: 0,
        }
    }
}

impl<const N: usize> HistSnapshot<N> {
    /// Observations in total.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum::<u64>() + self.above
    }

    /// Field-wise sum.
    pub fn add(&mut self, o: &HistSnapshot<N>) {
        for i in 0..N {
            self.buckets[i] += o.buckets[i];
        }
        self.above += o.above;
        self.sum_us += o.sum_us;
    }
}

macro_rules! counters {
    ($( $(#[$doc:meta])* $name:ident ),* $(,)?) => {
        /// Counters of one worker core.
        #[derive(Debug)]
        #[repr(align(128))]
        pub struct CoreStats {
            $( $(#[$doc])* pub $name: AtomicU64, )*
            /// TCP connections ended, per [`CloseReason`].
            closes: [AtomicU64; CloseReason::ALL.len()],
            /// UDP flows ended, per [`FlowEnd`].
            flow_ends: [AtomicU64; FlowEnd::ALL.len()],
            /// Upstream TCP connect latency (connects that succeeded).
            pub connect_latency: Histogram<{ CONNECT_BUCKETS_S.len() }>,
            /// Life of finished TCP connections, accept to close.
            pub conn_duration: Histogram<{ DURATION_BUCKETS_S.len() }>,
            /// Per rule: connections and flows it decided, and their bytes. Written
            /// once per connection or flow (at its verdict and at its end), read by
            /// the summary and metrics.
            pub rules: std::sync::Mutex<std::collections::BTreeMap<std::sync::Arc<str>, RuleCount>>,
            /// Housekeeping ticks the worker ran (one a second), or
            /// [`HEARTBEAT_ENDED`] once its loop ended: the watchdog checks that it
            /// keeps moving. Not a counter: not summed, not printed.
            pub heartbeat: AtomicU64,
        }

        impl Default for CoreStats {
            fn default() -> Self {
                CoreStats {
                    $( $name: AtomicU64::new(0), )*
                    closes: Default::default(),
                    flow_ends: Default::default(),
                    connect_latency: Histogram::new(&CONNECT_BUCKETS_S),
                    conn_duration: Histogram::new(&DURATION_BUCKETS_S),
                    rules: Default::default(),
                    heartbeat: AtomicU64::new(0),
                }
            }
        }

        /// A plain copy of [`CoreStats`].
        #[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
        pub struct Snapshot {
            $( $(#[$doc])* pub $name: u64, )*
            pub closes: [u64; CloseReason::ALL.len()],
            pub flow_ends: [u64; FlowEnd::ALL.len()],
            pub connect_latency: HistSnapshot<{ CONNECT_BUCKETS_S.len() }>,
            pub conn_duration: HistSnapshot<{ DURATION_BUCKETS_S.len() }>,
        }

        impl CoreStats {
            /// Reads every counter.
            pub fn snapshot(&self) -> Snapshot {
                Snapshot {
                    $( $name: self.$name.load(Relaxed), )*
                    closes: std::array::from_fn(|i| self.closes[i].load(Relaxed)),
                    flow_ends: std::array::from_fn(|i| self.flow_ends[i].load(Relaxed)),
                    connect_latency: self.connect_latency.snapshot(),
                    conn_duration: self.conn_duration.snapshot(),
                }
            }

            /// Counts a finished TCP connection: its reason, and `closed` or `resets`.
            pub fn count_close(&self, reason: CloseReason) {
                self.closes[reason.index()].fetch_add(1, Relaxed);
                if reason.is_clean() {
                    self.closed.fetch_add(1, Relaxed);
                } else {
                    self.resets.fetch_add(1, Relaxed);
                }
            }

            /// Adds to a rule's counters.
            pub fn count_rule(&self, rule: &std::sync::Arc<str>, matches: u64, bytes: u64) {
                let mut m = self.rules.lock().unwrap_or_else(|e| e.into_inner());
                let c = m.entry(rule.clone()).or_default();
                c.matches += matches;
                c.bytes += bytes;
            }

            /// A copy of the per-rule counters.
            pub fn rule_counts(&self) -> Vec<(std::sync::Arc<str>, RuleCount)> {
                let m = self.rules.lock().unwrap_or_else(|e| e.into_inner());
                m.iter().map(|(k, v)| (k.clone(), *v)).collect()
            }

            /// Counts an ended UDP flow.
            pub fn count_flow_end(&self, end: FlowEnd, n: u64) {
                self.flow_ends[end.index()].fetch_add(n, Relaxed);
            }
        }

        impl Snapshot {
            /// Field-wise sum, for the all-cores line.
            pub fn add(&mut self, o: &Snapshot) {
                $( self.$name += o.$name; )*
                for i in 0..self.closes.len() {
                    self.closes[i] += o.closes[i];
                }
                for i in 0..self.flow_ends.len() {
                    self.flow_ends[i] += o.flow_ends[i];
                }
                self.connect_latency.add(&o.connect_latency);
                self.conn_duration.add(&o.conn_duration);
            }

            /// Connections ended with `reason`.
            pub fn closes_by(&self, reason: CloseReason) -> u64 {
                self.closes[reason.index()]
            }

            /// `(name, value)` for every counter, in declaration order, then the
            /// close reasons and the flow ends.
            pub fn fields(&self) -> Vec<(&'static str, u64)> {
                let mut v = vec![ $( (stringify!($name), self.$name), )* ];
                for r in CloseReason::ALL {
                    v.push((r.counter_name(), self.closes[r.index()]));
                }
                for e in FlowEnd::ALL {
                    v.push((e.counter_name(), self.flow_ends[e.index()]));
                }
                v
            }
        }
    };
}

counters! {
    /// TCP connections accepted.
    accepted,
    /// TCP connections currently open (client side accepted, not yet closed).
    active,
    /// TCP connections finished cleanly (both directions shut down): the sum of
    /// `close_client_fin` and `close_server_fin`.
    closed,
    /// TCP connections ended any other way (every other `close_*` reason).
    resets,
    /// Bytes relayed client to server.
    bytes_c2s,
    /// Bytes relayed server to client.
    bytes_s2c,
    /// Bytes moved by splice (zero-copy) relays.
    splice_bytes,
    /// Bytes moved by copy relays.
    copy_bytes,
    /// Copy-relay sends that could not deliver everything at once: the rest moved
    /// out of the shared buffer pool into the direction's own buffer.
    copy_spills,
    /// Receive bounds (`--stall-buffer-bytes`) of upstream sockets raised fourfold
    /// for directions that filled their window every round trip while their
    /// destination kept up.
    stall_bounds_raised,
    /// Connections accepted past the limit (multishot burst) that waited for a slot.
    accept_parked,
    /// Times the connection limit was reached and accepting paused.
    accept_paused,
    /// Accept failures for lack of file descriptors (EMFILE/ENFILE).
    accept_emfile,
    /// Pipes created (the pool reuses them; this grows only with concurrency).
    pipes_created,
    /// Pipes the kernel made smaller than `--pipe-size` (fs.pipe-user-pages-soft).
    pipes_undersized,
    /// Splice-relay reads that found no pipe (all `--max-pipes` in use, or none
    /// could be made) and copied through the direction's own buffer instead.
    splice_copy_fallbacks,
    /// UDP datagrams relayed client to server.
    udp_dgrams_c2s,
    /// UDP datagrams relayed server to client.
    udp_dgrams_s2c,
    /// UDP payload bytes client to server.
    udp_bytes_c2s,
    /// UDP payload bytes server to client.
    udp_bytes_s2c,
    /// UDP flows created.
    udp_flows_created,
    /// UDP flows currently open.
    udp_flows_active,
    /// UDP reply sockets currently open (one per original destination in use).
    udp_reply_sockets,
    /// Datagrams dropped: payload truncated (larger than the receive buffer).
    udp_drop_truncated,
    /// Datagrams dropped: control data truncated or no original destination in it.
    udp_drop_no_origdst,
    /// Datagrams dropped: the source address could not be decoded.
    udp_drop_bad_source,
    /// Datagrams dropped: sending to the server failed.
    udp_drop_send_upstream,
    /// Datagrams dropped: sending the reply to the client failed.
    udp_drop_send_client,
    /// Datagrams dropped: no upstream socket could be opened (fds, permissions).
    udp_drop_no_socket,
    /// Datagrams dropped: the fd pool had no credit for a new flow's socket (or a
    /// reply socket), even after evicting this core's least recently used flow.
    udp_drop_no_fd_credit,
    /// Datagrams dropped: addressed to the engine itself (loop refused).
    udp_drop_loop,
    /// Receive re-arms after the kernel ran out of provided buffers (ENOBUFS).
    udp_enobufs,
    /// Datagrams dropped by the policy's verdict (no flow created).
    udp_drop_policy,
    /// TCP connections the policy redirected to another address.
    policy_redirected,
    /// Upstream sockets bound from the router although `--source` asked for the
    /// client's address: the client and the target are of different families.
    source_fallback,
    /// UDP datagrams dropped: the client's address could not be bound.
    udp_drop_source,
    /// Full-cone flows that forgot their oldest destination or remote (more than 64).
    udp_cone_evictions,
    /// UDP sends that carried more than one datagram (GSO, `UDP_SEGMENT`).
    udp_gso_sends,
    /// GSO sends the kernel refused (path MTU below the segment, IPsec, device):
    /// their datagrams went out one by one, and so does that flow from then on.
    udp_gso_fallbacks,
    /// Ops in flight on this core's ring (a gauge, updated every second).
    ring_in_flight,
    /// CQEs the kernel had to hold back because the CQ was full (cumulative).
    ring_cq_overflow,
    /// SQEs waiting for room in the SQ (a gauge; normally 0).
    ring_backlog,
    /// Sniffs that found a TLS SNI.
    sniff_sni,
    /// Sniffs that found an HTTP Host.
    sniff_host,
    /// Sniffs that ended without a name (other protocol, malformed, oversized, EOF).
    sniff_no_name,
    /// Sniffs that hit `--sniff-timeout-ms` (server-speaks-first protocols).
    sniff_timeout,
    /// Flow log records dropped because the writer fell behind (queue full).
    flowlog_dropped,
    /// Idle pipes in the splice relay's pool (a gauge, updated every second).
    pipes_idle,
    /// Pipes held by relay directions with bytes in flight (a gauge, every second).
    pipes_in_use,
    /// Clients accepted past the limit, waiting for a slot (a gauge, every second).
    tcp_parked,
}

/// Formats a table of per-core snapshots plus a total line.
pub fn render(per_core: &[(usize, Snapshot)]) -> String {
    let mut total = Snapshot::default();
    for (_, s) in per_core {
        total.add(s);
    }
    let total_fields = total.fields();
    let core_fields: Vec<_> = per_core.iter().map(|(_, s)| s.fields()).collect();
    let mut out = String::new();
    let _ = write!(out, "{:<24}", "counter");
    for (cpu, _) in per_core {
        let _ = write!(out, "{:>14}", format!("cpu{cpu}"));
    }
    let _ = writeln!(out, "{:>16}", "total");
    for (i, (name, t)) in total_fields.iter().enumerate() {
        if *t == 0 {
            continue; // keep the summary to one screen: only non-zero counters
        }
        let _ = write!(out, "{name:<24}");
        for f in &core_fields {
            let _ = write!(out, "{:>14}", f[i].1);
        }
        let _ = writeln!(out, "{t:>16}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_add_and_render_skip_zero_rows() {
        let a = CoreStats::default();
        a.accepted.fetch_add(3, Relaxed);
        a.bytes_c2s.fetch_add(100, Relaxed);
        let b = CoreStats::default();
        b.accepted.fetch_add(2, Relaxed);
        let text = render(&[(0, a.snapshot()), (1, b.snapshot())]);
        assert!(text.contains("accepted"));
        assert!(text.contains("bytes_c2s"));
        assert!(!text.contains("resets"));
        let line = text.lines().find(|l| l.starts_with("accepted")).unwrap();
        assert!(line.trim_end().ends_with('5'), "{line}");
    }

    #[test]
    fn close_reasons_count_once_and_split_clean_from_reset() {
        let s = CoreStats::default();
        s.count_close(CloseReason::ServerFin);
        s.count_close(CloseReason::ConnectRefused);
        s.count_close(CloseReason::ConnectRefused);
        s.count_flow_end(FlowEnd::Drain, 3);
        let snap = s.snapshot();
        assert_eq!(snap.closed, 1);
        assert_eq!(snap.resets, 2);
        assert_eq!(snap.closes_by(CloseReason::ConnectRefused), 2);
        let text = render(&[(0, snap)]);
        assert!(text.contains("close_server_fin"), "{text}");
        assert!(text.contains("close_connect_refused"), "{text}");
        assert!(text.contains("udp_end_drain"), "{text}");
        assert!(!text.contains("close_client_fin"), "{text}");
    }

    #[test]
    fn histograms_bucket_by_upper_bound() {
        let h = Histogram::new(&[0.001, 0.01]);
        h.observe_us(1000); // exactly the first bound: first bucket
        h.observe_us(1001);
        h.observe_us(50_000);
        let s = h.snapshot();
        assert_eq!(s.buckets, [1, 1]);
        assert_eq!(s.above, 1);
        assert_eq!(s.count(), 3);
        assert_eq!(s.sum_us, 52_001);
    }

    #[test]
    fn reason_names_are_distinct_and_errnos_map() {
        let mut names: Vec<_> = CloseReason::ALL.iter().map(|r| r.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), CloseReason::ALL.len());
        for (i, r) in CloseReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
        for (i, e) in FlowEnd::ALL.iter().enumerate() {
            assert_eq!(e.index(), i);
        }
        assert_eq!(CloseReason::ClientFin.name(), "client_fin");
        assert_eq!(
            CloseReason::from_connect_errno(libc::ECANCELED),
            CloseReason::ConnectTimeout
        );
        assert_eq!(
            CloseReason::from_connect_errno(libc::ENETUNREACH),
            CloseReason::Unreachable
        );
        assert_eq!(
            CloseReason::from_connect_errno(libc::EACCES),
            CloseReason::ConnectError
        );
    }
}
