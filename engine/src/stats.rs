//! Per-core counters.
//!
//! Each worker owns one [`CoreStats`] and is its only writer; the main thread reads
//! them for SIGUSR1 and the exit summary. Relaxed atomics are enough: every counter
//! is independent and a report is a snapshot, not a transaction. The struct is
//! cache-line aligned so that two cores never write the same line.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

macro_rules! counters {
    ($( $(#[$doc:meta])* $name:ident ),* $(,)?) => {
        /// Counters of one worker core.
        #[derive(Default, Debug)]
        #[repr(align(128))]
        pub struct CoreStats {
            $( $(#[$doc])* pub $name: AtomicU64, )*
        }

        /// A plain copy of [`CoreStats`].
        #[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
        pub struct Snapshot {
            $( $(#[$doc])* pub $name: u64, )*
        }

        impl CoreStats {
            /// Reads every counter.
            pub fn snapshot(&self) -> Snapshot {
                Snapshot { $( $name: self.$name.load(Relaxed), )* }
            }
        }

        impl Snapshot {
            /// Field-wise sum, for the all-cores line.
            pub fn add(&mut self, o: &Snapshot) {
                $( self.$name += o.$name; )*
            }

            /// `(name, value)` for every counter, in declaration order.
            pub fn fields(&self) -> Vec<(&'static str, u64)> {
                vec![ $( (stringify!($name), self.$name), )* ]
            }
        }
    };
}

counters! {
    /// TCP connections accepted.
    accepted,
    /// TCP connections currently open (client side accepted, not yet closed).
    active,
    /// TCP connections finished cleanly (both directions shut down).
    closed,
    /// TCP connections ended with a reset (peer reset, error or idle timeout).
    resets,
    /// Bytes relayed client to server.
    bytes_c2s,
    /// Bytes relayed server to client.
    bytes_s2c,
    /// Bytes moved by splice (zero-copy) relays.
    splice_bytes,
    /// Bytes moved by copy relays.
    copy_bytes,
    /// Upstream connects refused (ECONNREFUSED).
    connect_refused,
    /// Upstream connects that hit the connect timeout.
    connect_timeout,
    /// Upstream connects that failed as unreachable (EHOSTUNREACH, ENETUNREACH).
    connect_unreachable,
    /// Upstream connects that failed with any other errno.
    connect_other,
    /// Connections reset by the idle timeout.
    idle_timeouts,
    /// Connections accepted past the limit with the park queue full: reset at once.
    over_limit,
    /// Connections accepted past the limit (multishot burst) that waited for a slot.
    accept_parked,
    /// Times the connection limit was reached and accepting paused.
    accept_paused,
    /// Accept failures for lack of file descriptors (EMFILE/ENFILE).
    accept_emfile,
    /// Connections whose original destination was the engine itself (loop refused).
    loop_refused,
    /// Pipes created (the pool reuses them; this grows only with concurrency).
    pipes_created,
    /// Pipes the kernel made smaller than `--pipe-size` (fs.pipe-user-pages-soft).
    pipes_undersized,
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
    /// UDP flows expired by the idle timeout.
    udp_flows_expired,
    /// UDP flows evicted because the flow table was full.
    udp_flows_evicted,
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
    /// Datagrams dropped: addressed to the engine itself (loop refused).
    udp_drop_loop,
    /// Receive re-arms after the kernel ran out of provided buffers (ENOBUFS).
    udp_enobufs,
}

/// Formats a table of per-core snapshots plus a total line.
pub fn render(per_core: &[(usize, Snapshot)]) -> String {
    let mut total = Snapshot::default();
    for (_, s) in per_core {
        total.add(s);
    }
    let names: Vec<&str> = total.fields().iter().map(|(n, _)| *n).collect();
    let mut out = String::new();
    let _ = write!(out, "{:<24}", "counter");
    for (cpu, _) in per_core {
        let _ = write!(out, "{:>14}", format!("cpu{cpu}"));
    }
    let _ = writeln!(out, "{:>16}", "total");
    for (i, name) in names.iter().enumerate() {
        let t = total.fields()[i].1;
        if t == 0 && per_core.iter().all(|(_, s)| s.fields()[i].1 == 0) {
            continue; // keep the summary to one screen: only non-zero counters
        }
        let _ = write!(out, "{name:<24}");
        for (_, s) in per_core {
            let _ = write!(out, "{:>14}", s.fields()[i].1);
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
}
