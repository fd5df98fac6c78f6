//! The receive bound of a relayed direction (`--stall-buffer-bytes`), grown while
//! the direction proves it needs a larger window.
//!
//! A small bound is what keeps a stalled reader cheap: the kernel queues at most
//! about that much on the source socket while the engine is not reading it. But it
//! is also the window: a path with round trip R cannot carry more than bound / R.
//! So once a second each direction that is relaying is looked at: if it moved at
//! least half its bound per round trip (the window, not the destination, was what
//! limited it: its destination holds none of its bytes at the tick) the bound is
//! made four times larger, up to `--stall-buffer-max-bytes`. A stalled direction
//! never grows (its destination is full); a fast one reaches the path's
//! bandwidth-delay product in a few seconds (64 KiB to 4 MiB: 3 s), as the kernel's
//! own autotuning would, only slower. Measured through a 20 ms delay line: 3.9, 14,
//! 44, 68 MB/s in its first four seconds, where a fixed 256 KiB bound stays at 16
//! (docs/benchmarks.md, "Stall bound and long paths").

use std::os::fd::AsFd;

use super::conns::Conn;
use super::machine::{source, Phase, Side};
use crate::sys;

/// How much a bound grows per tick.
const GROWTH: u32 = 4;

/// Looks at both directions of `conn` after a tick of about a second; returns how
/// many bounds it raised.
pub fn on_tick(conn: &mut Conn, max: u32) -> u64 {
    let relaying = conn.machine.phase() == Phase::Relaying;
    let mut raised = 0;
    for d in 0..2 {
        let delivered = conn.machine.delivered(d);
        let moved = delivered.saturating_sub(conn.io.delivered_at_tick[d]);
        conn.io.delivered_at_tick[d] = delivered;
        let bound = conn.io.rx_bound[d];
        // Without a round trip of over a second, a direction that moved less than
        // half its bound cannot have been limited by it: no syscall for it.
        if !relaying
            || bound == 0
            || bound >= max
            || moved.saturating_mul(2) < u64::from(bound)
            || conn.machine.buffered(d) > 0
        {
            continue;
        }
        let fd = match source(d) {
            Side::Client => conn.io.client.as_fd(),
            Side::Server => match &conn.io.upstream {
                Some(u) => u.as_fd(),
                None => continue,
            },
        };
        let Ok(rtt_us) = sys::tcp_rcv_rtt_us(fd) else {
            continue;
        };
        if let Some(new) = grown(bound, max, moved, rtt_us) {
            if sys::set_receive_bound(fd, new as usize).is_ok() {
                conn.io.rx_bound[d] = new;
                raised += 1;
            }
        }
    }
    raised
}

/// The grown bound (four times, at most `max`) of a direction that moved `moved` bytes in the
/// last second over a source path of `rtt_us`, when that was at least half the
/// bound per round trip; `None` otherwise, or without a round-trip estimate.
pub fn grown(bound: u32, max: u32, moved: u64, rtt_us: u32) -> Option<u32> {
    if rtt_us == 0 || bound >= max {
        return None;
    }
    let per_rtt = moved.saturating_mul(u64::from(rtt_us)) / 1_000_000;
    (per_rtt.saturating_mul(2) >= u64::from(bound)).then(|| bound.saturating_mul(GROWTH).min(max))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const K: u32 = 1024;

    #[test]
    fn a_window_limited_direction_grows_up_to_the_max() {
        // 64 KiB per 20 ms round trip: 3.2 MB/s, the window is full every trip.
        assert_eq!(grown(64 * K, 4096 * K, 3_276_800, 20_000), Some(256 * K));
        // The last step stops at the max; at the max nothing grows.
        assert_eq!(
            grown(3072 * K, 4096 * K, 200_000_000, 20_000),
            Some(4096 * K)
        );
        assert_eq!(grown(4096 * K, 4096 * K, 200_000_000, 20_000), None);
    }

    #[test]
    fn a_direction_limited_elsewhere_keeps_its_bound() {
        // 1 MB/s over 20 ms is 20 KB per trip: far below a 64 KiB window.
        assert_eq!(grown(64 * K, 4096 * K, 1_000_000, 20_000), None);
        // A LAN path (100 µs): even 100 MB/s needs only 10 KB per trip.
        assert_eq!(grown(64 * K, 4096 * K, 100_000_000, 100), None);
        // No estimate yet.
        assert_eq!(grown(64 * K, 4096 * K, 100_000_000, 0), None);
    }

    proptest! {
        /// Growth is a fixed factor capped at the max, and only for a direction that
        /// moved at least half its bound per round trip.
        #[test]
        fn growth_is_bounded_and_earned(
            bound in 1u32..(1 << 30),
            max in 1u32..(1 << 30),
            moved in 0u64..(1 << 40),
            rtt_us in 0u32..10_000_000,
        ) {
            match grown(bound, max, moved, rtt_us) {
                Some(new) => {
                    prop_assert!(new > bound && new <= max && new <= bound.saturating_mul(GROWTH));
                    prop_assert!(moved as u128 * rtt_us as u128 * 2 >= bound as u128 * 1_000_000);
                }
                None => prop_assert!(
                    bound >= max
                        || rtt_us == 0
                        || (moved as u128 * rtt_us as u128 / 1_000_000) * 2 < bound as u128
                ),
            }
        }
    }
}
