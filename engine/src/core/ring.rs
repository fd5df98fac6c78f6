//! The io_uring instance of one worker, and its provided-buffer rings.
//!
//! One of the modules allowed to use `unsafe` (with `sys` and `sys::cmsg`).
//! Everything the kernel may dereference after submission goes through
//! [`Ring::push_chain`], whose safety argument is stated once, in `push_now`.

use std::alloc::{self, Layout};
use std::collections::VecDeque;
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

/// One worker's ring, and the provided-buffer rings registered with it. Owned and
/// used by exactly one thread.
///
/// The ring owns its buffer rings so that the drop order is fixed by construction:
/// [`Drop`] unregisters every group while the ring is alive, then the ring closes,
/// and only then is the buffer memory freed (fields drop after `drop` returns). The
/// caller must still never drop a ring with ops in flight (the kernel may be writing
/// into a buffer); [`crate::core::Core`] aborts the process rather than do that.
pub struct Ring {
    ring: IoUring,
    /// Provided-buffer rings, indexed by group id.
    bufs: Vec<Option<BufRing>>,
    /// SQEs (whole link chains) that found the SQ full while the kernel would take
    /// no more (`EBUSY`: completions must be reaped first). Flushed, in order, before
    /// the next wait. Bounded by the ops the engine has armed, which are bounded per
    /// connection and flow; normally empty.
    backlog: VecDeque<Vec<squeue::Entry>>,
    /// Human-readable list of the setup flags, for the startup line and bench report.
    pub flags_description: String,
    /// `--batch-wait-us`: once a completion is there, a blocking wait lasts up to
    /// this long for [`BATCH_WANT`] of them (io_uring's min-wait, 6.12); 0: it
    /// returns at the first.
    batch_wait_us: u32,
}

/// Completions a wait with `--batch-wait-us` waits for before its time is up.
pub const BATCH_WANT: usize = 64;

/// A provided-buffer group a worker's ring is built with ([`Ring::build`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BufGroup {
    /// What the buffers are for, in messages ("UDP", "TCP copy").
    pub name: &'static str,
    pub group: u16,
    /// A power of two, at most 32768.
    pub entries: u16,
    pub buf_size: usize,
}

/// A ring from [`Ring::build`].
pub struct Built {
    pub ring: Ring,
    /// The CQ size asked for and the error that made the ring smaller, if it had to
    /// be (the size it got is [`Ring::cq_entries`]).
    pub shrunk: Option<(u32, io::Error)>,
}

/// Bytes of ring memory the kernel charges (to `RLIMIT_MEMLOCK` without
/// `CAP_IPC_LOCK`) for a ring of `sq` and `cq` entries with `groups`: the shared
/// ring region (CQEs of 16 bytes, the SQ index array of 4, a header), the SQEs (64
/// bytes each), and each buffer ring (16 bytes per entry), each rounded up to pages.
/// The buffers themselves are ordinary memory, not charged.
pub fn locked_bytes(sq: u32, cq: u32, groups: &[BufGroup]) -> usize {
    const PAGE: usize = 4096;
    const RINGS_HEADER: usize = 512;
    let pages = |bytes: usize| bytes.div_ceil(PAGE) * PAGE;
    let (sq, cq) = (sq as usize, cq as usize);
    pages(RINGS_HEADER + 16 * cq + 4 * sq)
        + pages(64 * sq)
        + groups
            .iter()
            .map(|g| pages(16 * usize::from(g.entries)))
            .sum::<usize>()
}

/// What an `ENOMEM` from ring setup means here, and what to change.
fn enomem_explanation(need: usize) -> String {
    let need_kib = need.div_ceil(1024);
    match crate::sys::memlock_limit() {
        Ok(limit) if !crate::sys::has_ipc_lock() => {
            let limit = match limit {
                Some(b) => format!("{} KiB", b / 1024),
                None => "unlimited".to_string(),
            };
            format!(
                "the kernel charges io_uring rings to RLIMIT_MEMLOCK (now {limit}, shared \
                 by every ring of this user) because the engine lacks CAP_IPC_LOCK, and \
                 this core's ring needs about {need_kib} KiB more: raise the limit \
                 (systemd: LimitMEMLOCK=infinity, as the shipped unit sets; shell: \
                 ulimit -l unlimited), or grant CAP_IPC_LOCK, or use fewer --cores or \
                 a smaller --max-conns"
            )
        }
        _ => format!(
            "the kernel could not allocate about {need_kib} KiB for the ring (it takes \
             ring memory in one piece or from its per-CPU free lists, which fail when \
             memory is low or fragmented, or the memory cgroup is at its limit)"
        ),
    }
}

/// Why a ring can no longer be used: `io_uring_enter` failed with an error other
/// than the transient ones (EINTR, EBUSY, EAGAIN, ETIME).
#[derive(Debug)]
pub struct DeadRing(pub io::Error);

impl std::fmt::Display for DeadRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "io_uring_enter: {}", self.0)
    }
}

/// Errors of `io_uring_enter` that only mean "reap completions and try again".
fn transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINTR) | Some(libc::EBUSY) | Some(libc::EAGAIN) | Some(libc::ETIME)
    )
}

impl Ring {
    /// Creates the ring of one worker with `sq_entries` submission entries and
    /// `cq_entries` completion entries (both rounded up to powers of two by the
    /// kernel, and clamped to its maximum).
    ///
    /// Setup flags and why:
    /// * `SINGLE_ISSUER`: only the owning worker thread ever submits, which lets the
    ///   kernel skip submission locking (6.0).
    /// * `DEFER_TASKRUN`: completion work runs only when this thread enters the kernel
    ///   to wait, in batches, instead of interrupting it at arbitrary points (6.1).
    ///   Requires `SINGLE_ISSUER`. Left out where the kernel lacks it ([`Features`]).
    /// * `CQSIZE`: sized by the caller from the connection and flow budget, so the CQ
    ///   does not overflow (overflowed CQEs go to a slow kernel list; the count is
    ///   exported as `ring_cq_overflow`). `CLAMP` caps it at the kernel's maximum.
    /// * `TASKRUN_FLAG`: the kernel raises `IORING_SQ_TASKRUN` when deferred work is
    ///   pending, so a non-blocking submit knows to enter with GETEVENTS and run it.
    /// * `SUBMIT_ALL`: keep submitting the rest of a batch when one SQE fails at
    ///   submission time, so a bad op cannot stall the others (5.18).
    pub fn new(sq_entries: u32, cq_entries: u32, features: &Features) -> io::Result<Ring> {
        let cq_entries = cq_entries.max(sq_entries);
        let mut b = IoUring::builder();
        b.setup_single_issuer()
            .setup_submit_all()
            .setup_clamp()
            .setup_cqsize(cq_entries);
        if features.defer_taskrun {
            b.setup_defer_taskrun().setup_taskrun_flag();
        }
        let ring = b.build(sq_entries)?;
        let (sq, cq) = (ring.params().sq_entries(), ring.params().cq_entries());
        let flags = if features.defer_taskrun {
            "SINGLE_ISSUER|DEFER_TASKRUN|TASKRUN_FLAG|SUBMIT_ALL"
        } else {
            "SINGLE_ISSUER|SUBMIT_ALL"
        };
        Ok(Ring {
            ring,
            bufs: Vec::new(),
            backlog: VecDeque::new(),
            flags_description: format!("{flags} sq={sq} cq={cq}"),
            batch_wait_us: 0,
        })
    }

    /// Creates a worker's ring and registers its provided-buffer `groups`, halving
    /// the CQ (never below `min_cq`) each time the kernel answers `ENOMEM`.
    ///
    /// Why `ENOMEM` is expected: without `CAP_IPC_LOCK` the kernel charges every
    /// ring and buffer ring to the `RLIMIT_MEMLOCK` of the process's user, summed
    /// over all of that user's rings (systemd's default is 8 MiB; one core sized for
    /// 14,000 connections needs about 1.3 MiB, see [`locked_bytes`]). And even with
    /// it the kernel allocates a ring's region in one piece (a CQ of 65536 entries:
    /// an order-9 block) or else from the per-CPU free lists in one call, failing
    /// when either comes up short: memory full of page cache after a build can be
    /// enough (one of the two failed a CI run). Smaller regions succeed where larger
    /// ones fail. A smaller CQ loses nothing: completions that find it full wait on
    /// the kernel's overflow list and are counted (`ring_cq_overflow`). At `min_cq`
    /// it tries five more times over about 0.6 s before giving up. The caller logs
    /// the shrink; the error, when even `min_cq` does not fit, says what to change.
    pub fn build(
        sq_entries: u32,
        cq_entries: u32,
        min_cq: u32,
        features: &Features,
        groups: &[BufGroup],
    ) -> Result<Built, String> {
        let wanted = cq_entries.max(sq_entries);
        let mut cq = wanted;
        let mut first_enomem = None;
        // At the smallest size, a few more tries, 20 ms to 320 ms apart: memory a
        // moment ago in use comes back (the rings of a predecessor that just exited
        // are freed by a kernel worker, and charged to the user until then; the
        // per-CPU free lists refill).
        let mut floor_retries = [20u64, 40, 80, 160, 320].into_iter();
        loop {
            let attempt = Ring::new(sq_entries, cq, features)
                .map_err(|e| (e, None))
                .and_then(|mut ring| {
                    for g in groups {
                        ring.register_buffers(g.group, g.entries, g.buf_size)
                            .map_err(|e| (e, Some(g.name)))?;
                    }
                    Ok(ring)
                });
            match attempt {
                Ok(ring) => {
                    return Ok(Built {
                        ring,
                        // Retries at the same size (the floor) made nothing smaller.
                        shrunk: first_enomem.filter(|_| cq < wanted).map(|e| (wanted, e)),
                    });
                }
                Err((e, _)) if e.raw_os_error() == Some(libc::ENOMEM) && cq / 2 >= min_cq => {
                    first_enomem.get_or_insert(e);
                    cq /= 2;
                }
                Err((e, what)) if e.raw_os_error() == Some(libc::ENOMEM) => {
                    let Some(ms) = floor_retries.next() else {
                        return Err(Self::build_error(e, what, sq_entries, cq, groups));
                    };
                    first_enomem.get_or_insert(e);
                    std::thread::sleep(std::time::Duration::from_millis(ms));
                }
                Err((e, what)) => return Err(Self::build_error(e, what, sq_entries, cq, groups)),
            }
        }
    }

    /// The error of [`Ring::build`]: which step failed (`what`: the buffer group
    /// being registered, `None`: the ring itself) and, for `ENOMEM`, what to change.
    fn build_error(
        e: io::Error,
        what: Option<&str>,
        sq_entries: u32,
        cq: u32,
        groups: &[BufGroup],
    ) -> String {
        let step = match what {
            Some(name) => format!("registering the {name} buffer ring"),
            None => "io_uring_setup".to_string(),
        };
        if e.raw_os_error() == Some(libc::ENOMEM) {
            let need = locked_bytes(sq_entries, cq, groups);
            format!(
                "{step} (sq={sq_entries} cq={cq}): {e}: {}",
                enomem_explanation(need)
            )
        } else if what.is_none() {
            setup_error(e)
        } else {
            format!("{step}: {e}")
        }
    }

    /// Completion queue entries, as the kernel granted them.
    pub fn cq_entries(&self) -> u32 {
        self.ring.params().cq_entries()
    }

    /// CQEs the kernel could not post to the CQ since the ring was created
    /// (`IORING_SQ_CQ_OVERFLOW` accounting; they were kept on a slow path, not lost).
    pub fn cq_overflow(&mut self) -> u32 {
        self.ring.completion().overflow()
    }

    /// Queues one SQE that posts exactly one final completion.
    pub fn push(&mut self, sqe: squeue::Entry) -> Result<(), DeadRing> {
        self.push_chain(std::slice::from_ref(&sqe))
    }

    /// Queues SQEs that are linked (`IO_LINK`) and must therefore be adjacent in one
    /// submission: the chain goes in whole or waits whole in the backlog.
    ///
    /// A full SQ is flushed to the kernel first; if the kernel takes nothing
    /// (`EBUSY`, completions must be reaped first) the chain waits in the backlog,
    /// behind anything already waiting there so that order is kept. Never spins,
    /// never drops an op.
    pub fn push_chain(&mut self, sqes: &[squeue::Entry]) -> Result<(), DeadRing> {
        if self.backlog.is_empty() {
            if self.room() < sqes.len() {
                self.submit()?;
            }
            if self.room() >= sqes.len() {
                self.push_now(sqes);
                return Ok(());
            }
        }
        self.backlog.push_back(sqes.to_vec());
        Ok(())
    }

    fn room(&mut self) -> usize {
        let sq = self.ring.submission();
        sq.capacity() - sq.len()
    }

    fn push_now(&mut self, sqes: &[squeue::Entry]) {
        // SAFETY: the engine-wide invariant for every SQE: every pointer inside an
        // SQE the engine builds (sockaddr, timespec, msghdr, eventfd buffer) points
        // into memory owned by the worker's core context or by a connection/flow slot
        // that is boxed (stable address) and freed only after the op's final CQE has
        // been reaped (every owner tracks what it has armed and frees on none).
        // Provided buffers belong to this ring and are freed after it is gone. Fds
        // named by SQEs stay open until the op's final CQE for the same reason. The
        // caller checked there is room for the whole chain, so it is queued adjacent.
        let pushed = unsafe { self.ring.submission().push_multiple(sqes) };
        debug_assert!(pushed.is_ok(), "room was checked");
    }

    /// SQEs waiting for room (normally 0).
    pub fn backlog_len(&self) -> usize {
        self.backlog.len()
    }

    /// Moves backlogged chains into the SQ while there is room, submitting as it goes.
    fn flush_backlog(&mut self) -> Result<(), DeadRing> {
        while let Some(chain) = self.backlog.front() {
            let need = chain.len();
            if self.room() < need {
                self.submit()?;
                if self.room() < need {
                    return Ok(()); // the kernel is still busy: after the next reap
                }
            }
            let chain = self.backlog.pop_front().expect("front exists");
            self.push_now(&chain);
        }
        Ok(())
    }

    /// Submits queued SQEs without waiting. Transient errors return Ok: the caller
    /// reaps completions and the SQEs go in with the next enter.
    pub fn submit(&mut self) -> Result<(), DeadRing> {
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if transient(&e) => return Ok(()),
                Err(e) => return Err(DeadRing(e)),
            }
        }
    }

    /// Flushes the backlog, submits and waits for at least `want` completions.
    pub fn submit_and_wait(&mut self, want: usize) -> Result<(), DeadRing> {
        self.flush_backlog()?;
        let r = if want > 0 && self.batch_wait_us > 0 {
            let args = types::SubmitArgs::new().min_wait_usec(self.batch_wait_us);
            self.ring
                .submitter()
                .submit_with_args(BATCH_WANT.max(want), &args)
        } else {
            self.ring.submit_and_wait(want)
        };
        match r {
            Ok(_) => Ok(()),
            Err(e) if transient(&e) => Ok(()),
            Err(e) => Err(DeadRing(e)),
        }
    }

    /// Sets `--batch-wait-us` (only where [`Features::min_wait`] says the kernel has
    /// it: older ones refuse the wait with `EINVAL`).
    pub fn set_batch_wait(&mut self, us: u32) {
        self.batch_wait_us = us;
        if us > 0 {
            self.flags_description += &format!(" batch_wait_us={us}");
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

    /// Registers a provided-buffer ring of `entries` buffers of `buf_size` bytes as
    /// group `group`, owned by this ring from now on.
    pub fn register_buffers(
        &mut self,
        group: u16,
        entries: u16,
        buf_size: usize,
    ) -> io::Result<()> {
        let br = BufRing::new(self, group, entries, buf_size)?;
        let i = usize::from(group);
        if self.bufs.len() <= i {
            self.bufs.resize_with(i + 1, || None);
        }
        self.bufs[i] = Some(br);
        Ok(())
    }

    /// The buffer ring of `group`. Panics if none was registered (a programming error).
    pub fn buffers(&mut self, group: u16) -> &mut BufRing {
        self.bufs
            .get_mut(usize::from(group))
            .and_then(|b| b.as_mut())
            .expect("buffer group registered")
    }

    fn submitter(&self) -> io_uring::Submitter<'_> {
        self.ring.submitter()
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // Unregistering is synchronous: once it returns, the kernel no longer picks
        // buffers from the group, so the memory can go after the ring itself.
        for br in self.bufs.iter().flatten() {
            let _ = self.ring.submitter().unregister_buf_ring(br.group);
        }
    }
}

/// The io_uring operations the engine needs, with the kernel that introduced the
/// feature the engine relies on.
const REQUIRED_OPS: &[(u8, &str, &str)] = &[
    (opcode::AcceptMulti::CODE, "ACCEPT (multishot)", "5.19"),
    (opcode::Connect::CODE, "CONNECT", "5.5"),
    (opcode::LinkTimeout::CODE, "LINK_TIMEOUT", "5.5"),
    (opcode::PollAdd::CODE, "POLL_ADD (multishot)", "5.13"),
    (opcode::AsyncCancel::CODE, "ASYNC_CANCEL", "5.5"),
    (opcode::Timeout::CODE, "TIMEOUT", "5.4"),
    (
        opcode::Recv::CODE,
        "RECV (multishot, provided buffer ring)",
        "6.0",
    ),
    (opcode::Send::CODE, "SEND", "5.6"),
    (opcode::RecvMsg::CODE, "RECVMSG (multishot)", "6.0"),
    (opcode::Read::CODE, "READ", "5.6"),
];

/// Oldest kernel the engine runs on: multishot recv/recvmsg over provided buffer
/// rings and `SINGLE_ISSUER` are 6.0. Newer features are probed and have
/// fallbacks ([`Features`]).
pub const MIN_KERNEL: (u32, u32) = (6, 0);

/// Optional io_uring features, probed at startup, each with a fallback.
///
/// `RINGRELAY_DISABLE=name[,name]` turns features off even where the kernel has
/// them, so the fallbacks can be tested on a new kernel (names as in [`Features::ALL`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Features {
    /// `IORING_SETUP_DEFER_TASKRUN` (6.1): completion work runs only when the worker
    /// waits. Without it the kernel runs it at any syscall boundary (more
    /// interruptions, same results).
    pub defer_taskrun: bool,
    /// Multishot `TIMEOUT` (6.4): one SQE ticks forever. Without it the worker
    /// re-arms a single-shot timeout on every tick.
    pub multishot_timeout: bool,
    /// UDP GSO (`UDP_SEGMENT`, 4.18): a burst of datagrams to one destination leaves
    /// in one send (`udp/batch.rs`). Without it each datagram is sent on its own.
    /// Not an io_uring feature; listed here so that the fallback tests can turn it
    /// off like the others.
    pub udp_gso: bool,
    /// Min-wait of `io_uring_enter` (`IORING_FEAT_MIN_TIMEOUT`, 6.12), which
    /// `--batch-wait-us` needs; without it that option is ignored, with a warning.
    pub min_wait: bool,
}

impl Features {
    /// `(name, kernel, what the engine does without it)` of every optional feature.
    pub const ALL: [(&'static str, &'static str, &'static str); 4] = [
        (
            "defer-taskrun",
            "6.1",
            "ring without DEFER_TASKRUN: completion work may interrupt the worker",
        ),
        (
            "multishot-timeout",
            "6.4",
            "the 1 s housekeeping timer is re-armed on every tick",
        ),
        (
            "udp-gso",
            "4.18",
            "every UDP datagram is sent with a send of its own",
        ),
        (
            "min-wait",
            "6.12",
            "--batch-wait-us is ignored: the worker wakes at the first completion",
        ),
    ];

    /// Everything on.
    pub fn all() -> Features {
        Features {
            defer_taskrun: true,
            multishot_timeout: true,
            udp_gso: true,
            min_wait: true,
        }
    }

    fn get(&self, name: &str) -> bool {
        match name {
            "defer-taskrun" => self.defer_taskrun,
            "multishot-timeout" => self.multishot_timeout,
            "udp-gso" => self.udp_gso,
            "min-wait" => self.min_wait,
            _ => false,
        }
    }

    fn set(&mut self, name: &str, on: bool) -> bool {
        match name {
            "defer-taskrun" => self.defer_taskrun = on,
            "multishot-timeout" => self.multishot_timeout = on,
            "udp-gso" => self.udp_gso = on,
            "min-wait" => self.min_wait = on,
            _ => return false,
        }
        true
    }

    /// Turns off the features named in a `RINGRELAY_DISABLE` value.
    pub fn disable(&mut self, list: &str) -> Result<(), String> {
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if !self.set(name, false) {
                let known: Vec<_> = Features::ALL.iter().map(|f| f.0).collect();
                return Err(format!(
                    "RINGRELAY_DISABLE: unknown feature `{name}` (known: {})",
                    known.join(", ")
                ));
            }
        }
        Ok(())
    }

    /// `name=on|off(fallback)` for each feature, for `--version` and the log.
    pub fn describe(&self) -> String {
        Features::ALL
            .iter()
            .map(|(name, since, _)| {
                let state = if self.get(name) { "on" } else { "fallback" };
                format!("{name} ({since}+): {state}")
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn setup_error(e: io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENOSYS) => "io_uring is not available: the kernel was built without \
                               CONFIG_IO_URING"
            .to_string(),
        Some(libc::EPERM) => "io_uring is disabled for this process: set sysctl \
                              kernel.io_uring_disabled=0 (or 1 and add the user to \
                              kernel.io_uring_group), or lift the seccomp/container policy \
                              that blocks io_uring_setup"
            .to_string(),
        Some(libc::EINVAL) => format!(
            "io_uring refused the engine's setup flags (SINGLE_ISSUER needs Linux 6.0+; \
             the engine needs {}.{}+)",
            MIN_KERNEL.0, MIN_KERNEL.1
        ),
        _ => format!("io_uring_setup: {e}"),
    }
}

/// Checks that io_uring is usable and supports every op the engine needs, and finds
/// which optional features this kernel has (minus those `disabled`, a
/// `RINGRELAY_DISABLE` value). The error text says what is missing and how to fix it.
pub fn probe(disabled: Option<&str>) -> Result<Features, String> {
    let mut features = Features::all();
    if let Some(list) = disabled {
        features.disable(list)?;
    }
    if let Some(v) = crate::sys::kernel_version() {
        if v < MIN_KERNEL {
            return Err(format!(
                "kernel {}.{} is too old: the engine needs Linux {}.{}+ (multishot \
                 recv/recvmsg over provided buffer rings)",
                v.0, v.1, MIN_KERNEL.0, MIN_KERNEL.1
            ));
        }
    }
    let mut ring = match Ring::new(8, 8, &features) {
        Ok(r) => r,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) && features.defer_taskrun => {
            features.defer_taskrun = false;
            Ring::new(8, 8, &features).map_err(setup_error)?
        }
        Err(e) => return Err(setup_error(e)),
    };
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
    if features.multishot_timeout {
        features.multishot_timeout = ring.supports_multishot_timeout();
    }
    features.min_wait &= ring.ring.params().is_feature_min_timeout();
    Ok(features)
}

impl Ring {
    /// Tries a multishot timeout that fires once (count 1): kernels before 6.4
    /// reject the flag with `EINVAL`.
    fn supports_multishot_timeout(&mut self) -> bool {
        let ts = types::Timespec::new().nsec(1);
        let sqe = opcode::Timeout::new(&ts as *const types::Timespec)
            .count(1)
            .flags(types::TimeoutFlags::MULTISHOT)
            .build()
            .user_data(1);
        if self.push(sqe).is_err() {
            return false;
        }
        let mut got = Vec::new();
        // Waits for the final completion: `ts` must outlive the op.
        while !got.iter().any(|c: &Completion| !c.more()) {
            if self.submit_and_wait(1).is_err() {
                // The op may still be armed; `ts` on this stack would dangle.
                std::process::abort();
            }
            self.drain(&mut got);
        }
        got.iter().all(|c| c.result != -libc::EINVAL)
    }
}

/// A provided-buffer ring (`IORING_REGISTER_PBUF_RING`, 5.19): a group of equally
/// sized buffers the kernel picks from when a recv completes, so idle sockets hold no
/// buffer at all.
///
/// Only a [`Ring`] creates and owns these ([`Ring::register_buffers`]), which fixes
/// the drop order: unregistered first, memory freed after the ring.
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
    fn new(ring: &Ring, group: u16, entries: u16, buf_size: usize) -> io::Result<BufRing> {
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
        // entries that lives as long as `br`, which the ring owns and frees only after
        // unregistering the group (`Ring`'s drop).
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
        // SAFETY: allocated in `new` with exactly this layout; the owning ring
        // unregistered the group in its `drop` before its fields (this one) drop.
        unsafe { alloc::dealloc(self.ring_mem as *mut u8, self.ring_layout) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nop(ud: u64) -> squeue::Entry {
        opcode::Nop::new().build().user_data(ud)
    }

    /// More SQEs than the SQ holds, pushed without reaping, all reach the kernel and
    /// complete exactly once; a link chain stays whole. Skips where io_uring is not
    /// available to this process (some sandboxes forbid it).
    #[test]
    fn push_never_spins_or_drops_when_the_sq_is_full() {
        let mut ring = match Ring::new(4, 8, &Features::all()) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("SKIPPED: push_never_spins_or_drops_when_the_sq_is_full: {e}");
                return;
            }
        };
        let mut want = Vec::new();
        for i in 1..=40u64 {
            if i % 10 == 0 {
                let chain = [nop(i).flags(squeue::Flags::IO_LINK), nop(1000 + i)];
                ring.push_chain(&chain).unwrap();
                want.extend([i, 1000 + i]);
            } else {
                ring.push(nop(i)).unwrap();
                want.push(i);
            }
        }
        let mut got = Vec::new();
        let mut batch = Vec::new();
        while got.len() < want.len() {
            ring.submit_and_wait(1).unwrap();
            batch.clear();
            ring.drain(&mut batch);
            for c in &batch {
                assert!(c.result >= 0, "{c:?}");
                got.push(c.user_data);
            }
        }
        assert_eq!(ring.backlog_len(), 0);
        got.sort_unstable();
        want.sort_unstable();
        assert_eq!(got, want);
    }
}
