//! The process-wide file descriptor credit pool.
//!
//! RLIMIT_NOFILE is one number for the whole process, so the descriptors every core
//! holds are drawn from one pool of credits, `nofile - reserve`
//! ([`crate::config::fd_reserve`]): 2 per TCP connection (client and upstream
//! socket, taken at admission, before the upstream socket exists), 2 per splice pipe
//! (taken when the pool makes one), 1 per UDP upstream socket and per reply socket.
//! A credit is given back only once its fd is closed (a connection's when the
//! connection is freed, after its last op completed; a UDP flow's when it is
//! retired and its fd closes), so credits in use are an upper bound on the fds
//! held outside the reserve, and an `EMFILE` inside the budget cannot happen.
//!
//! Two caps keep either protocol from starving the other: TCP (connections and
//! pipes) may not take the last `udp_floor` credits ([`FdPool::new`]), and UDP is bounded by
//! its flow tables (`--udp-max-flows`). Connections are also bounded by a global
//! count (`--max-conns`), not a per-core one: `SO_REUSEPORT` spreads clients by
//! hash, unevenly, and a per-core split would refuse clients on a busy core while
//! another has room.
//!
//! Each take is one compare-and-swap loop on a shared counter, each release one
//! `fetch_sub`: a few atomic operations per connection or flow, none per byte.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

/// Who asks for credits: TCP may not dip into the UDP floor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Connections and splice pipes.
    Tcp,
    /// UDP upstream and reply sockets.
    Udp,
}

/// Credits for every fd the workers hold beyond the reserve, shared by all cores.
#[derive(Debug)]
pub struct FdPool {
    total: usize,
    udp_floor: usize,
    max_conns: usize,
    in_use: AtomicUsize,
    conns: AtomicUsize,
}

impl FdPool {
    /// A pool of `total` credits of which TCP may take all but `udp_floor`, with at
    /// most `max_conns` connections.
    pub fn new(total: usize, udp_floor: usize, max_conns: usize) -> Arc<FdPool> {
        Arc::new(FdPool {
            total,
            udp_floor: udp_floor.min(total),
            max_conns,
            in_use: AtomicUsize::new(0),
            conns: AtomicUsize::new(0),
        })
    }

    /// Credits in all.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Credits taken now.
    pub fn in_use(&self) -> usize {
        self.in_use.load(Relaxed)
    }

    /// The connection cap, all cores together.
    pub fn max_conns(&self) -> usize {
        self.max_conns
    }

    /// Connections admitted and not yet freed, all cores together.
    pub fn conns(&self) -> usize {
        self.conns.load(Relaxed)
    }

    fn limit(&self, class: Class) -> usize {
        match class {
            Class::Tcp => self.total - self.udp_floor,
            Class::Udp => self.total,
        }
    }

    /// Takes `n` credits if `class` may; false (nothing taken) otherwise.
    pub fn try_take(&self, n: usize, class: Class) -> bool {
        let limit = self.limit(class);
        self.in_use
            .fetch_update(Relaxed, Relaxed, |used| {
                (used + n <= limit).then_some(used + n)
            })
            .is_ok()
    }

    /// Gives `n` credits back (their fds are closed).
    pub fn release(&self, n: usize) {
        let before = self.in_use.fetch_sub(n, Relaxed);
        debug_assert!(before >= n, "released more fd credits than taken");
    }

    /// [`try_take`](Self::try_take) as a guard that gives them back when dropped.
    pub fn take(self: &Arc<Self>, n: usize, class: Class) -> Option<Credit> {
        self.try_take(n, class).then(|| Credit {
            pool: self.clone(),
            n,
        })
    }

    /// Admits one TCP connection: a place under the connection cap and its 2
    /// credits; `None` when either is exhausted (the caller parks or pauses).
    pub fn admit_conn(self: &Arc<Self>) -> Option<ConnCredit> {
        let max = self.max_conns;
        self.conns
            .fetch_update(Relaxed, Relaxed, |c| (c < max).then_some(c + 1))
            .ok()?;
        if !self.try_take(crate::config::FDS_PER_CONN, Class::Tcp) {
            self.conns.fetch_sub(1, Relaxed);
            return None;
        }
        Some(ConnCredit { pool: self.clone() })
    }

    /// Connections that could be admitted now, all cores together, if the caller
    /// gave back the `spare` credits it could free at once (a core's idle pipes).
    pub fn conn_headroom(&self, spare: usize) -> usize {
        let by_cap = self.max_conns.saturating_sub(self.conns());
        let free = self.limit(Class::Tcp).saturating_sub(self.in_use()) + spare;
        by_cap.min(free / crate::config::FDS_PER_CONN)
    }
}

/// Credits held for fds that are open; given back when dropped (drop it after the
/// fds it stands for are closed).
#[derive(Debug)]
pub struct Credit {
    pool: Arc<FdPool>,
    n: usize,
}

impl Drop for Credit {
    fn drop(&mut self) {
        self.pool.release(self.n);
    }
}

/// One admitted TCP connection: its place under `--max-conns` and its 2 credits,
/// given back when dropped.
#[derive(Debug)]
pub struct ConnCredit {
    pool: Arc<FdPool>,
}

impl Drop for ConnCredit {
    fn drop(&mut self) {
        self.pool.release(crate::config::FDS_PER_CONN);
        self.pool.conns.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_stops_at_the_floor_udp_does_not() {
        let p = FdPool::new(10, 4, 100);
        assert!(p.try_take(6, Class::Tcp));
        assert!(!p.try_take(1, Class::Tcp), "TCP took into the UDP floor");
        assert!(p.try_take(4, Class::Udp));
        assert!(!p.try_take(1, Class::Udp), "more than the total");
        assert_eq!(p.in_use(), 10);
        p.release(10);
        assert_eq!(p.in_use(), 0);
    }

    #[test]
    fn a_failed_take_takes_nothing() {
        let p = FdPool::new(5, 0, 100);
        assert!(!p.try_take(6, Class::Udp));
        assert_eq!(p.in_use(), 0);
        assert!(p.try_take(5, Class::Udp));
    }

    #[test]
    fn guards_give_back_on_drop() {
        let p = FdPool::new(8, 2, 100);
        let a = p.take(2, Class::Udp).unwrap();
        let c = p.admit_conn().unwrap();
        assert_eq!((p.in_use(), p.conns()), (4, 1));
        drop(a);
        drop(c);
        assert_eq!((p.in_use(), p.conns()), (0, 0));
    }

    #[test]
    fn connections_stop_at_the_cap_and_at_the_credits() {
        // The cap first: 2 connections, plenty of credits.
        let p = FdPool::new(100, 10, 2);
        let held: Vec<_> = (0..2).map(|_| p.admit_conn().unwrap()).collect();
        assert_eq!(p.conn_headroom(0), 0);
        assert!(p.admit_conn().is_none());
        assert_eq!(
            (p.conns(), p.in_use()),
            (2, 4),
            "a refused admission keeps nothing"
        );
        drop(held);
        // The credits first: 10 - floor 3 = 7 credits for TCP, 3 connections.
        let p = FdPool::new(10, 3, 100);
        let held: Vec<_> = (0..3).map(|_| p.admit_conn().unwrap()).collect();
        assert_eq!(p.conn_headroom(0), 0);
        assert!(p.admit_conn().is_none());
        assert_eq!((p.conns(), p.in_use()), (3, 6));
        // UDP still gets the floor (and the odd credit TCP could not use).
        let u = p.take(4, Class::Udp).unwrap();
        assert!(p.take(1, Class::Udp).is_none());
        drop(held);
        assert_eq!(
            p.conn_headroom(0),
            1,
            "(10 - 3 - 4) / 2: UDP took 4, past its floor"
        );
        assert_eq!(p.conn_headroom(2), 2, "and 2 credits the caller can free");
        drop(u);
        assert_eq!((p.conns(), p.in_use()), (0, 0));
    }

    #[test]
    fn concurrent_takers_never_exceed_the_total() {
        let p = FdPool::new(1000, 100, usize::MAX);
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let p = p.clone();
                std::thread::spawn(move || {
                    let mut peak = 0;
                    for round in 0..2000 {
                        let held: Vec<_> = (0..50)
                            .filter_map(|k| {
                                if (i + k + round) % 2 == 0 {
                                    p.admit_conn().map(|c| (Some(c), None))
                                } else {
                                    p.take(1, Class::Udp).map(|c| (None, Some(c)))
                                }
                            })
                            .collect();
                        peak = peak.max(p.in_use());
                        drop(held);
                    }
                    peak
                })
            })
            .collect();
        for t in threads {
            assert!(t.join().unwrap() <= 1000);
        }
        assert_eq!((p.in_use(), p.conns()), (0, 0));
    }
}
