//! The io_uring instance of one worker, and its provided-buffer rings.
//!
//! One of the two modules allowed to use `unsafe` (the other is `sys`). Everything
//! the kernel may dereference after submission goes through [`Ring::push`] or
//! [`Ring::push_linked`], whose safety argument is stated once, below.

use std::alloc::{self, Layout};
use std::io;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::{cqueue, opcode, squeue, types, IoUring};

/// A completion copied out of the CQ so the CQ can be advanced at once.
#[derive(Clone, Copy, Debug)]
pub struct Completion {
    pub user_data: u64,
    pub result: i32,
    pub flags: u32,
}

impl Completion {
    /// `IORING_CQE_F_MORE`: a multishot op will post further completions.
    pub fn more(&self) -> bool {
        cqueue::more(self.flags)
    }

    /// The provided buffer id the kernel picked, if any.
    pub fn buffer_id(&self) -> Option<u16> {
        cqueue::buffer_select(self.flags)
    }
}

/// One worker's ring. Owned and used by exactly one thread.
pub struct Ring {
    ring: IoUring,
    /// Human-readable list of the setup flags, for the startup line and bench report.
    pub flags_description: String,
}

impl Ring {
    /// Creates the ring of one worker.
    ///
    /// Setup flags and why:
    /// * `SINGLE_ISSUER`: only the owning worker thread ever submits, which lets the
    ///   kernel skip submission locking (6.0).
    /// * `DEFER_TASKRUN`: completion work runs only when this thread enters the kernel
    ///   to wait, in batches, instead of interrupting it at arbitrary points (6.1).
    ///   Requires `SINGLE_ISSUER`.
    /// * `CQSIZE` = 8 x SQ: every connection can have several ops in flight (two polls,
    ///   a connect and its timeout) plus multishot accept and recv streams; the CQ
    ///   must never overflow, as overflow makes the kernel buffer CQEs on a slow path.
    /// * `TASKRUN_FLAG`: the kernel raises `IORING_SQ_TASKRUN` when deferred work is
    ///   pending, so a non-blocking submit knows to enter with GETEVENTS and run it.
    /// * `SUBMIT_ALL`: keep submitting the rest of a batch when one SQE fails at
    ///   submission time, so a bad op cannot stall the others (5.18).
    pub fn new(sq_entries: u32) -> io::Result<Ring> {
        let cq_entries = sq_entries.saturating_mul(8);
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_taskrun_flag()
            .setup_submit_all()
            .setup_cqsize(cq_entries)
            .build(sq_entries)?;
        Ok(Ring {
            ring,
            flags_description: format!(
                "SINGLE_ISSUER|DEFER_TASKRUN|TASKRUN_FLAG|SUBMIT_ALL sq={sq_entries} cq={cq_entries}"
            ),
        })
    }

    /// Queues one SQE, submitting first if the SQ is full (the SQ is the bounded
    /// backlog: a full SQ is flushed to the kernel, never a panic or a dropped op).
    pub fn push(&mut self, sqe: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: the engine-wide invariant for every SQE: every pointer inside
            // an SQE the engine builds (sockaddr, timespec, msghdr, read buffer) points
            // into memory owned by the worker or by a connection/flow slot that is
            // boxed (stable address) and freed only after the op's final CQE has been
            // reaped (connections count in-flight ops and free on zero). Provided
            // buffers live in a `BufRing` that outlives the ring's registration. Fds
            // named by SQEs stay open until the op's final CQE for the same reason.
            let pushed = unsafe { self.ring.submission().push(sqe) };
            match pushed {
                Ok(()) => return Ok(()),
                Err(_) => self.submit()?,
            }
        }
    }

    /// Queues SQEs that are linked (`IO_LINK`) and must therefore be adjacent.
    pub fn push_linked(&mut self, sqes: &[squeue::Entry]) -> io::Result<()> {
        loop {
            let room = {
                let sq = self.ring.submission();
                sq.capacity() - sq.len()
            };
            if room >= sqes.len() {
                break;
            }
            self.submit()?;
        }
        // SAFETY: same invariant as in `push`; there is room for all entries, so the
        // chain is queued whole and adjacent.
        unsafe { self.ring.submission().push_multiple(sqes) }
            .map_err(|_| io::Error::other("submission queue full after flush"))
    }

    /// Submits queued SQEs without waiting.
    pub fn submit(&mut self) -> io::Result<()> {
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // EBUSY: the CQ is backed up; the caller reaps and tries again.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Submits queued SQEs and waits for at least `want` completions.
    pub fn submit_and_wait(&mut self, want: usize) -> io::Result<()> {
        match self.ring.submit_and_wait(want) {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR) | Some(libc::EBUSY) | Some(libc::ETIME)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Moves every available completion into `out` and advances the CQ once.
    pub fn drain(&mut self, out: &mut Vec<Completion>) {
        let mut cq = self.ring.completion();
        cq.sync();
        out.extend(cq.map(|c| Completion {
            user_data: c.user_data(),
            result: c.result(),
            flags: c.flags(),
        }));
    }

    fn submitter(&self) -> io_uring::Submitter<'_> {
        self.ring.submitter()
    }
}

/// The io_uring operations the engine needs, with the kernel that introduced the
/// feature the engine relies on.
const REQUIRED_OPS: &[(u8, &str, &str)] = &[
    (opcode::AcceptMulti::CODE, "ACCEPT (multishot)", "5.19"),
    (opcode::Connect::CODE, "CONNECT", "5.5"),
    (opcode::LinkTimeout::CODE, "LINK_TIMEOUT", "5.5"),
    (opcode::PollAdd::CODE, "POLL_ADD", "5.1"),
    (
        opcode::AsyncCancel::CODE,
        "ASYNC_CANCEL",
        "5.19 (cancel by fd)",
    ),
    (opcode::Timeout::CODE, "TIMEOUT (multishot)", "6.4"),
    (
        opcode::Recv::CODE,
        "RECV (multishot, provided buffer ring)",
        "6.0",
    ),
    (opcode::Send::CODE, "SEND", "5.6"),
    (opcode::RecvMsg::CODE, "RECVMSG (multishot)", "6.0"),
    (opcode::Read::CODE, "READ", "5.6"),
];

/// Oldest kernel whose io_uring has every feature the engine uses: multishot
/// timeouts (6.4) are the newest of them; `DEFER_TASKRUN` is 6.1.
pub const MIN_KERNEL: (u32, u32) = (6, 4);

/// Checks that io_uring is usable and supports every op the engine needs.
/// The error text says what is missing and how to fix it.
pub fn probe() -> Result<(), String> {
    let ring = Ring::new(8).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOSYS) => "io_uring is not available: the kernel was built without \
                               CONFIG_IO_URING"
            .to_string(),
        Some(libc::EPERM) => "io_uring is disabled for this process: set sysctl \
                              kernel.io_uring_disabled=0 (or 1 and add the user to \
                              kernel.io_uring_group), or lift the seccomp/container policy \
                              that blocks io_uring_setup"
            .to_string(),
        Some(libc::EINVAL) => format!(
            "io_uring refused the engine's setup flags (SINGLE_ISSUER|DEFER_TASKRUN need \
             Linux 6.1+; need {}.{}+)",
            MIN_KERNEL.0, MIN_KERNEL.1
        ),
        _ => format!("io_uring_setup failed: {e}"),
    })?;
    let mut probe = io_uring::Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| format!("io_uring probe failed: {e}"))?;
    for &(code, name, since) in REQUIRED_OPS {
        if !probe.is_supported(code) {
            return Err(format!(
                "this kernel's io_uring lacks {name} (needs Linux {since} or newer)"
            ));
        }
    }
    if let Some(v) = crate::sys::kernel_version() {
        if v < MIN_KERNEL {
            return Err(format!(
                "kernel {}.{} is too old: the engine needs Linux {}.{}+ (multishot \
                 accept/recv/recvmsg and multishot timeouts)",
                v.0, v.1, MIN_KERNEL.0, MIN_KERNEL.1
            ));
        }
    }
    Ok(())
}

/// A provided-buffer ring (`IORING_REGISTER_PBUF_RING`, 5.19): a group of equally
/// sized buffers the kernel picks from when a recv completes, so idle sockets hold no
/// buffer at all.
///
/// Drop order matters: the owning struct must drop the [`Ring`] (which unregisters
/// every group) before the `BufRing`, or unregister explicitly.
pub struct BufRing {
    group: u16,
    entries: u16,
    buf_size: usize,
    ring_mem: *mut types::BufRingEntry,
    ring_layout: Layout,
    buffers: Box<[u8]>,
    /// Our copy of the tail; published to the kernel by `recycle`.
    tail: u16,
}

impl BufRing {
    /// Allocates `entries` (a power of two, at most 32768) buffers of `buf_size` bytes,
    /// registers them as group `group` and hands every buffer to the kernel.
    pub fn new(ring: &Ring, group: u16, entries: u16, buf_size: usize) -> io::Result<BufRing> {
        if !entries.is_power_of_two() || entries > 32768 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "buffer ring size must be a power of two <= 32768",
            ));
        }
        let ring_layout = Layout::from_size_align(
            usize::from(entries) * std::mem::size_of::<types::BufRingEntry>(),
            4096,
        )
        .map_err(|_| io::Error::other("buffer ring layout"))?;
        // SAFETY: the layout has a non-zero size (entries >= 1).
        let ring_mem = unsafe { alloc::alloc_zeroed(ring_layout) } as *mut types::BufRingEntry;
        if ring_mem.is_null() {
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        }
        let buffers = vec![0u8; usize::from(entries) * buf_size].into_boxed_slice();
        let mut br = BufRing {
            group,
            entries,
            buf_size,
            ring_mem,
            ring_layout,
            buffers,
            tail: 0,
        };
        // SAFETY: `ring_mem` is a page-aligned, zeroed allocation of exactly `entries`
        // entries that lives as long as `br`, which the caller keeps alive for as long as
        // the ring has this group registered (see the type's drop-order note).
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(ring_mem as u64, entries, group, 0)?;
        }
        for bid in 0..entries {
            br.recycle(bid);
        }
        br.commit();
        Ok(br)
    }

    /// The group id ops name in `buf_group`.
    pub fn group(&self) -> u16 {
        self.group
    }

    /// Size of each buffer.
    pub fn buf_size(&self) -> usize {
        self.buf_size
    }

    /// The first `len` bytes of buffer `bid`, as the kernel filled them.
    pub fn data(&self, bid: u16, len: usize) -> &[u8] {
        let start = usize::from(bid) * self.buf_size;
        &self.buffers[start..start + len.min(self.buf_size)]
    }

    /// Start address of buffer `bid`, for a `SEND` that writes it out.
    pub fn ptr(&self, bid: u16) -> *const u8 {
        self.data(bid, 0).as_ptr()
    }

    /// Gives buffer `bid` back to the kernel, published at once: a receive submitted
    /// or retried after this call can pick it (no window in which a waiter is woken
    /// for a buffer the kernel cannot see yet).
    pub fn recycle(&mut self, bid: u16) {
        let mask = self.entries - 1;
        let idx = usize::from(self.tail & mask);
        let addr = self.ptr(bid) as u64;
        // SAFETY: `idx < entries`, so the entry is inside the allocation; the kernel
        // only reads entries between its head and our published tail, and this one is
        // past the published tail, so we are its only accessor right now.
        let entry = unsafe { &mut *self.ring_mem.add(idx) };
        entry.set_addr(addr);
        entry.set_len(self.buf_size as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
        self.commit();
    }

    /// Publishes recycled buffers to the kernel.
    fn commit(&mut self) {
        // SAFETY: `tail` points at the ring's tail field inside our allocation
        // (it overlays the reserved field of entry 0), which is valid and aligned for u16.
        let tail = unsafe { types::BufRingEntry::tail(self.ring_mem) } as *const AtomicU16;
        // SAFETY: the pointer is valid and aligned; the kernel reads it concurrently,
        // hence the atomic store with release ordering (entries before tail).
        unsafe { (*tail).store(self.tail, Ordering::Release) };
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with exactly this layout; the ring that used it has
        // been dropped or unregistered it (type-level drop-order contract).
        unsafe { alloc::dealloc(self.ring_mem as *mut u8, self.ring_layout) };
    }
}
