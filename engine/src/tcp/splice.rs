//! The splice relay's side of the driver: the per-core pipe pool and the inline
//! `splice(2)` calls.
//!
//! `IORING_OP_SPLICE` is always punted to an io-wq worker thread (the kernel's
//! io_uring/splice.c forces async), so the splice relay waits for readiness through
//! the ring and then splices inline, non-blocking, on the core's own thread (the
//! HAProxy model). A pipe is held only while a direction has bytes in flight; idle
//! pipes wait in a LIFO pool (warm in cache) and are closed after a quiet second.
//!
//! The pool is bounded (`--max-pipes`, by default a sixteenth of the TCP share of
//! the descriptor budget), so connections cost 2 fds each rather than 6. When every
//! pipe is taken, a direction reads into its own buffer and writes from it, once per
//! read (the machine's `read_prefix`, counted as `splice_copy_fallbacks`): slow, but
//! it never waits for a pipe, so directions stalled on slow readers, which keep
//! theirs, cannot stop the others.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering::Relaxed;

use super::direction::Io;
use crate::core::Core;
use crate::sys::{self, Pipe};

/// Most idle pipes kept per core; more are closed when returned.
const PIPE_POOL_MAX: usize = 256;

/// A pipe's size when `--pipe-size 0` leaves it to the kernel.
pub const KERNEL_PIPE_SIZE: usize = 65536;

/// Idle pipes of one core.
pub struct PipePool {
    idle: Vec<Pipe>,
    /// Most pipes, idle and in use together.
    limit: usize,
    /// Pipes taken from the pool or created since the last tick.
    taken: u64,
    /// Pipes held by relay directions now.
    in_use: usize,
}

impl PipePool {
    /// An empty pool of at most `limit` pipes.
    pub fn new(limit: usize) -> PipePool {
        PipePool {
            idle: Vec::new(),
            limit: limit.max(1),
            taken: 0,
            in_use: 0,
        }
    }

    /// Takes a pipe from the pool or makes one; `WouldBlock` when `limit` pipes are
    /// in use.
    pub fn take(&mut self, core: &Core) -> io::Result<Pipe> {
        if let Some(p) = self.idle.pop() {
            self.taken += 1;
            self.in_use += 1;
            return Ok(p);
        }
        if self.in_use >= self.limit {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.taken += 1;
        let p = Pipe::new(core.cfg.pipe_size)?;
        self.in_use += 1;
        core.stats.pipes_created.fetch_add(1, Relaxed);
        if core.cfg.pipe_size.is_some_and(|want| p.capacity < want) {
            core.stats.pipes_undersized.fetch_add(1, Relaxed);
        }
        Ok(p)
    }

    /// Takes a pipe back: into the pool if `empty`, else it is closed (a pipe with
    /// stale bytes must never be reused).
    pub fn give(&mut self, p: Pipe, empty: bool) {
        self.in_use -= 1;
        if empty && self.idle.len() < PIPE_POOL_MAX {
            self.idle.push(p);
        }
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
            self.idle.clear();
        }
        self.taken = 0;
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
