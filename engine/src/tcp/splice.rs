//! The splice relay's side of the driver: the per-core pipe pool and the inline
//! `splice(2)` calls.
//!
//! `IORING_OP_SPLICE` is always punted to an io-wq worker thread (the kernel's
//! io_uring/splice.c forces async), so the splice relay waits for readiness through
//! the ring and then splices inline, non-blocking, on the core's own thread (the
//! HAProxy model). A pipe is held only while a direction has bytes in flight; idle
//! pipes wait in a LIFO pool (warm in cache) and are closed after a quiet second.
//!
//! The pool is bounded (`--max-pipes`, by default a thirty-second of the fd pool),
//! and every pipe it makes draws 2 credits from the process-wide fd pool
//! (`crate::fdpool`) until it is closed, so connections cost 2 fds each rather
//! than 6 and pipes never make the engine run out of fds. When every pipe is taken,
//! or no credit is left, a direction reads into its own buffer and writes from it, once per
//! read (the machine's `read_prefix`, counted as `splice_copy_fallbacks`): slow, but
//! it never waits for a pipe, so directions stalled on slow readers, which keep
//! theirs, cannot stop the others.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use super::direction::Io;
use crate::fdpool::{Class, FdPool};
use crate::stats::CoreStats;
use crate::sys::{self, Pipe};

/// Most idle pipes kept per core; more are closed when returned.
const PIPE_POOL_MAX: usize = 256;

/// Fds of one pipe (read and write end): its credits in the fd pool.
const PIPE_FDS: usize = 2;

/// A pipe's size when `--pipe-size 0` leaves it to the kernel.
pub const KERNEL_PIPE_SIZE: usize = 65536;

/// Idle pipes of one core.
pub struct PipePool {
    idle: Vec<Pipe>,
    /// The process-wide fd pool: every pipe of this pool, idle or in use, holds 2
    /// of its credits from creation until it is closed.
    fds: Arc<FdPool>,
    /// Most pipes, idle and in use together.
    limit: usize,
    /// Pipes taken from the pool or created since the last tick.
    taken: u64,
    /// Pipes held by relay directions now.
    in_use: usize,
}

impl PipePool {
    /// An empty pool of at most `limit` pipes.
    pub fn new(limit: usize, fds: Arc<FdPool>) -> PipePool {
        PipePool {
            idle: Vec::new(),
            fds,
            limit: limit.max(1),
            taken: 0,
            in_use: 0,
        }
    }

    /// Takes a pipe from the pool or makes one of `size` (`--pipe-size`; `None`: the
    /// kernel's), counted in `stats`; `WouldBlock` when `limit` pipes are in use or
    /// the fd pool has no credit for a new one.
    pub fn take(&mut self, size: Option<usize>, stats: &CoreStats) -> io::Result<Pipe> {
        if let Some(p) = self.idle.pop() {
            self.taken += 1;
            self.in_use += 1;
            return Ok(p);
        }
        if self.in_use >= self.limit || !self.fds.try_take(PIPE_FDS, Class::Tcp) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.taken += 1;
        let p = match Pipe::new(size) {
            Ok(p) => p,
            Err(e) => {
                self.fds.release(PIPE_FDS);
                return Err(e);
            }
        };
        self.in_use += 1;
        stats.pipes_created.fetch_add(1, Relaxed);
        if size.is_some_and(|want| p.capacity < want) {
            stats.pipes_undersized.fetch_add(1, Relaxed);
        }
        Ok(p)
    }

    /// Takes a pipe back: into the pool if `empty`, else it is closed (a pipe with
    /// stale bytes must never be reused).
    pub fn give(&mut self, p: Pipe, empty: bool) {
        self.in_use -= 1;
        if empty && self.idle.len() < PIPE_POOL_MAX {
            self.idle.push(p);
        } else {
            drop(p);
            self.fds.release(PIPE_FDS);
        }
    }

    /// Fd credits the idle pipes hold, which [`trim`](Self::trim) gives back.
    pub fn idle_credits(&self) -> usize {
        self.idle.len() * PIPE_FDS
    }

    /// Closes every idle pipe and gives its credits back (a connection needs them
    /// more than the pool's warm spares do); returns how many were closed.
    pub fn trim(&mut self) -> usize {
        let n = self.idle.len();
        self.idle.clear();
        self.fds.release(n * PIPE_FDS);
        n
    }

    /// (idle, in use), for the gauges.
    pub fn counts(&self) -> (usize, usize) {
        (self.idle.len(), self.in_use)
    }

    /// Once a second: after a quiet second, give idle pipes back (2 fds and up to
    /// `--pipe-size` of pinned kernel memory each), so an idle engine holds what it
    /// held at start.
    pub fn on_tick(&mut self) {
        if self.taken == 0 {
            self.trim();
        }
        self.taken = 0;
    }
}

impl Drop for PipePool {
    /// The idle pipes close with the pool; pipes still held by connections keep
    /// their credits (the worker is ending: nothing draws on them any more).
    fn drop(&mut self) {
        self.trim();
    }
}

/// `splice(from -> pipe)`.
pub fn splice_in(from: RawFd, pipe: &Pipe, len: usize) -> Io {
    Io::from_result(sys::splice(from, pipe.write.as_raw_fd(), len))
}

/// `splice(pipe -> to)`.
pub fn splice_out(pipe: &Pipe, to: RawFd, len: usize) -> Io {
    Io::from_result(sys::splice(pipe.read.as_raw_fd(), to, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every pipe the pool holds, idle or in use, holds 2 credits of the fd pool
    /// until it is closed, and a pool without credits makes none.
    #[test]
    fn pipes_hold_their_credits_until_closed() {
        let stats = CoreStats::default();
        // 6 credits for TCP (8 less a floor of 2): room for 3 pipes.
        let fds = FdPool::new(8, 2, 100);
        let mut pool = PipePool::new(10, fds.clone());
        let a = pool.take(None, &stats).unwrap();
        let b = pool.take(None, &stats).unwrap();
        let c = pool.take(None, &stats).unwrap();
        assert_eq!(fds.in_use(), 6);
        let e = pool.take(None, &stats).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "{e}");
        assert_eq!(fds.in_use(), 6, "a refused pipe takes nothing");
        // Back into the pool: still open, still counted; reused without a credit.
        pool.give(a, true);
        assert_eq!((fds.in_use(), pool.idle_credits()), (6, 2));
        let a = pool.take(None, &stats).unwrap();
        assert_eq!(fds.in_use(), 6);
        // A pipe with stale bytes is closed: its credits come back.
        pool.give(b, false);
        assert_eq!(fds.in_use(), 4);
        pool.give(a, true);
        pool.give(c, true);
        assert_eq!(pool.idle_credits(), 4);
        // A second with takes keeps the idle pipes, a quiet one closes them.
        pool.on_tick();
        assert_eq!(fds.in_use(), 4);
        pool.on_tick();
        assert_eq!((fds.in_use(), pool.idle_credits()), (0, 0));
        // trim and drop close idle pipes too.
        let a = pool.take(None, &stats).unwrap();
        let b = pool.take(None, &stats).unwrap();
        pool.give(a, true);
        pool.give(b, true);
        assert_eq!(pool.trim(), 2);
        assert_eq!(fds.in_use(), 0);
        let a = pool.take(None, &stats).unwrap();
        pool.give(a, true);
        drop(pool);
        assert_eq!(fds.in_use(), 0);
        assert_eq!(stats.pipes_created.load(Relaxed), 6);
    }

    /// The pool's own bound holds first when it is the smaller.
    #[test]
    fn max_pipes_bounds_before_the_credits() {
        let stats = CoreStats::default();
        let fds = FdPool::new(100, 0, 100);
        let mut pool = PipePool::new(1, fds.clone());
        let a = pool.take(None, &stats).unwrap();
        let e = pool.take(None, &stats).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "{e}");
        assert_eq!(fds.in_use(), 2);
        pool.give(a, false);
        assert_eq!(fds.in_use(), 0);
    }
}
