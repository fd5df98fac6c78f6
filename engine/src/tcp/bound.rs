//! The receive bound of an upstream socket (`--stall-buffer-bytes`), grown while
//! its direction proves it needs a larger window.
//!
//! A small bound is what keeps a stalled reader cheap: the kernel queues at most
//! about that much on the source socket while the engine is not reading it. But it
//! is also the window: a path with round trip R cannot carry more than bound / R.
//! So once a second the server-to-client direction of each relaying connection is
//! looked at (the client side keeps its listener's bound and window scale): if it
//! moved at least half the upstream socket's bound per round trip (the window, not
//! the client, was what limited it: the client holds none of its bytes at the tick)
//! the bound is made four times larger, up to `--stall-buffer-max-bytes`. A stalled
//! direction never grows (its destination is full); a fast one reaches the path's
//! bandwidth-delay product in a few seconds (64 KiB to 4 MiB: 3 s), as the kernel's
//! own autotuning would, only slower. Measured over a 20 ms path by
//! `scripts/long-path/run.sh` (docs/benchmarks.md, "Stall bound and long paths").

use std::os::fd::AsFd;

use super::conns::Conn;
use super::machine::Phase;
use crate::sys;

/// How much a bound grows per tick.
const GROWTH: u32 = 4;

/// The server-to-client direction, whose source is the upstream socket.
const S2C: usize = 1;

/// Looks at the upstream side of `conn` after a tick of about a second; returns
/// whether it raised its bound.
pub fn on_tick(conn: &mut Conn, max: u32) -> bool {
    let delivered = conn.machine.delivered(S2C);
    let moved = delivered.saturating_sub(conn.io.s2c_at_tick);
    conn.io.s2c_at_tick = delivered;
    let bound = conn.io.upstream_bound;
    // Without a round trip of over a second, a direction that moved less than half
    // its bound cannot have been limited by it: no syscall for it.
    if conn.machine.phase() != Phase::Relaying
        || bound == 0
        || bound >= max
        || moved.saturating_mul(2) < u64::from(bound)
        || conn.machine.buffered(S2C) > 0
    {
        return false;
    }
    let Some(fd) = conn.io.upstream.as_ref().map(|u| u.as_fd()) else {
        return false;
    };
    let Ok(rtt_us) = sys::tcp_rcv_rtt_us(fd) else {
        return false;
    };
    match grown(bound, max, moved, rtt_us) {
        Some(new) if sys::set_receive_bound(fd, new as usize).is_ok() => {
            conn.io.upstream_bound = new;
            true
        }
        _ => false,
    }
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
