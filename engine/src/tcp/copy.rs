//! The copy relay's side of the driver: the SQEs it submits and the queue of
//! directions waiting for a provided buffer.
//!
//! A copy direction receives into a buffer the kernel picks from the core's
//! provided-buffer ring (group [`GROUP_TCP_COPY`]), then sends that buffer. Idle
//! connections hold no buffer, so the 512 buffers of a core cap bytes in flight,
//! not connections. When the ring is empty a receive fails with `ENOBUFS`; its
//! direction waits here and is woken when a buffer comes back.

use std::collections::VecDeque;

use io_uring::{opcode, squeue, types};

use crate::core::ring::BufRing;

/// Provided buffer group of the TCP copy relay.
pub const GROUP_TCP_COPY: u16 = 0;

/// Buffers in the copy relay's ring, per core.
pub const COPY_BUFFERS: u16 = 512;

/// Directions waiting for a buffer, and buffers returned but not yet handed on.
#[derive(Default)]
pub struct BufWaiters {
    /// (slot, generation, direction), oldest first. Entries of connections that
    /// closed meanwhile are skipped when popped.
    queue: VecDeque<(u32, u32, usize)>,
    /// Buffers returned during the current event, to hand to waiters after it.
    returned: usize,
    /// Buffers returned in this batch while nobody waited. An `ENOBUFS` later in
    /// the same batch was produced before they came back, so that many waiters
    /// are woken at the end of the batch.
    unclaimed: usize,
}

impl BufWaiters {
    /// Direction `d` of a connection waits for a buffer.
    pub fn push(&mut self, slot: u32, generation: u32, d: usize) {
        self.queue.push_back((slot, generation, d));
    }

    /// A buffer came back to the ring.
    pub fn returned(&mut self) {
        self.returned += 1;
    }

    /// Takes the count of buffers to hand on now.
    pub fn take_returned(&mut self) -> usize {
        std::mem::take(&mut self.returned)
    }

    /// Buffers nobody took in this batch.
    pub fn add_unclaimed(&mut self, n: usize) {
        self.unclaimed += n;
    }

    /// End of a batch: the count of waiters to wake for buffers nobody took.
    pub fn take_unclaimed(&mut self) -> usize {
        std::mem::take(&mut self.unclaimed)
    }

    /// The oldest waiter.
    pub fn pop(&mut self) -> Option<(u32, u32, usize)> {
        self.queue.pop_front()
    }
}

/// A receive into a provided buffer of `bufs`.
pub fn recv_sqe(fd: i32, bufs: &BufRing, user_data: u64) -> squeue::Entry {
    opcode::Recv::new(types::Fd(fd), std::ptr::null_mut(), bufs.buf_size() as u32)
        .buf_group(bufs.group())
        .build()
        .flags(squeue::Flags::BUFFER_SELECT)
        .user_data(user_data)
}

/// A send of `len` bytes of buffer `bid` from `off`. The pointer stays valid until
/// the send's final completion: the machine returns the buffer only after it. No
/// `MSG_WAITALL`: a full destination ends the send at once (short, or `EAGAIN` on the
/// non-blocking socket), and the machine moves what is left out of the shared pool.
pub fn send_sqe(
    fd: i32,
    bufs: &BufRing,
    bid: u16,
    off: usize,
    len: usize,
    ud: u64,
) -> squeue::Entry {
    let ptr = bufs.ptr(bid).wrapping_add(off);
    // MSG_NOSIGNAL: a peer that went away yields EPIPE, not SIGPIPE.
    opcode::Send::new(types::Fd(fd), ptr, len as u32)
        .flags(libc::MSG_NOSIGNAL)
        .build()
        .user_data(ud)
}
