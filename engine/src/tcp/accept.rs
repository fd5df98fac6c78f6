//! Transparent listeners, accepting under a connection limit, and parking.
//!
//! Each worker has its own listener per address family on the same port
//! (`crate::sockets`: one `SO_REUSEPORT` group; the kernel spreads new connections
//! across the workers by flow hash). After a takeover a worker may serve several.
//!
//! Accepting follows the connection budget: the connections the process-wide fd
//! pool still admits (`crate::fdpool`: `--max-conns` and fd credits, every core
//! together). A multishot accept takes everything the kernel has queued in one pass
//! (and what arrives during it), so it is armed only while this core's share of the
//! free slots (the free slots over the core count: every core may burst at once)
//! exceeds a whole accept queue ([`LISTEN_BACKLOG`]) plus [`MULTISHOT_HEADROOM`]: no
//! burst can then overshoot the limit. Otherwise each
//! listener gets single-shot accepts, as many as there are free slots and at most
//! [`SINGLE_SHOTS`] at a time, so the limit is overshot by at most those in flight
//! (parked until a slot frees, never reset); at the limit none, and new clients wait
//! in the kernel's listen backlog. When connections close after a
//! stretch at the limit, exactly as many waiting clients are accepted as slots
//! freed: nobody who waited is reset because others left. Whoever frees a slot
//! (`Tcp::free` in `mod.rs`) starts a parked client and re-arms; a slot freed on
//! another core reaches this one at its next tick (once a second), which re-reads
//! the global headroom.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering::Relaxed;

use io_uring::{opcode, types};

use crate::config::Config;
use crate::core::ring::Completion;
use crate::core::token::{Op, Token};
use crate::core::Core;
use crate::sockets::LISTEN_BACKLOG;
use crate::sys;

/// A multishot accept is armed only while at least this many connection slots more
/// than a full accept queue holds are free (see the module documentation).
pub const MULTISHOT_HEADROOM: usize = 64;

/// Most single-shot accepts in flight per listener.
pub const SINGLE_SHOTS: u32 = 16;

/// Token generation of a listener's multishot accept (single-shots use 0, all of
/// them: they are cancelled together with `IORING_ASYNC_CANCEL_ALL`).
const MULTISHOT_GEN: u32 = 1;

/// A TCP listener of this worker.
struct Listener {
    /// `None` once closed while stopping.
    fd: Option<OwnedFd>,
    /// A multishot accept is in flight (until its final CQE).
    multishot: bool,
    /// Single-shot accepts in flight.
    singles: u32,
    /// A cancel of the multishot accept has been submitted.
    cancelling_multi: bool,
    /// A cancel of every single-shot accept has been submitted.
    cancelling_singles: bool,
}

impl Listener {
    fn armed(&self) -> bool {
        self.multishot || self.singles > 0
    }
}

/// The accepting side of the TCP subsystem.
pub struct Acceptor {
    listeners: Vec<Listener>,
    /// Accepted clients waiting for a connection slot (see [`crate::config::PARK_TOTAL`]).
    parked: VecDeque<OwnedFd>,
    park_max: usize,
    /// Cores sharing the connection headroom (the fd pool is process-wide).
    share: usize,
    /// The connection limit is reached (for counting pauses once each).
    at_limit: bool,
    /// Accepting is paused after EMFILE/ENFILE or another lasting error until a
    /// connection closes or the next tick.
    starved: bool,
    stopping: bool,
}

impl Acceptor {
    /// The acceptor of one worker, over its listeners (`crate::sockets`).
    pub fn new(cfg: &Config, fds: Vec<OwnedFd>) -> Acceptor {
        let listeners = fds
            .into_iter()
            .map(|fd| Listener {
                fd: Some(fd),
                multishot: false,
                singles: 0,
                cancelling_multi: false,
                cancelling_singles: false,
            })
            .collect();
        Acceptor {
            listeners,
            parked: VecDeque::new(),
            park_max: cfg.park_max_per_core,
            share: cfg.cores.len().max(1),
            at_limit: false,
            starved: false,
            stopping: false,
        }
    }

    /// Whether a multishot accept may be armed: the headroom is that of every core
    /// together, and each core's listeners may all burst at once, so each gets its
    /// share of it.
    fn multishot_fits(&self, headroom: usize) -> bool {
        headroom / self.share >= MULTISHOT_HEADROOM + LISTEN_BACKLOG
    }

    /// Clients parked for a slot.
    pub fn parked(&self) -> usize {
        self.parked.len()
    }

    /// Parks a client accepted past the limit; gives it back if the queue is full.
    pub fn park(&mut self, client: OwnedFd) -> Result<(), OwnedFd> {
        if self.parked.len() < self.park_max {
            self.parked.push_back(client);
            Ok(())
        } else {
            Err(client)
        }
    }

    /// The oldest parked client.
    pub fn unpark(&mut self) -> Option<OwnedFd> {
        self.parked.pop_front()
    }

    /// Notes the headroom after a connection took or freed a slot: counts a pause
    /// at the limit once, and cancels multishot accepts when headroom is too small.
    pub fn note_headroom(&mut self, core: &mut Core, headroom: usize) {
        if headroom == 0 && !self.at_limit {
            self.at_limit = true;
            core.stats.accept_paused.fetch_add(1, Relaxed);
        } else if headroom > 0 {
            self.at_limit = false;
        }
        if !self.multishot_fits(headroom) {
            self.cancel(core, true);
        }
    }

    /// Arms accepts on every listener, as the headroom allows (see the module
    /// documentation).
    pub fn arm(&mut self, core: &mut Core, headroom: usize) {
        if self.stopping || self.starved || headroom == 0 {
            return;
        }
        // SOCK_NONBLOCK: splice takes its blocking mode from the socket file.
        let flags = libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
        let multishot = self.multishot_fits(headroom);
        for (i, l) in self.listeners.iter_mut().enumerate() {
            let Some(fd) = l.fd.as_ref() else {
                continue;
            };
            if l.multishot {
                continue;
            }
            let raw = types::Fd(fd.as_raw_fd());
            if l.singles == 0 && multishot {
                l.multishot = true;
                l.cancelling_multi = false;
                let ud = Token::new(Op::Accept, i as u32, MULTISHOT_GEN).encode();
                core.submit(
                    opcode::AcceptMulti::new(raw)
                        .flags(flags)
                        .build()
                        .user_data(ud),
                );
                continue;
            }
            // Every listener may take up to `headroom` (an idle family's accepts must
            // not hold slots the busy one needs); the overshoot is what is in flight.
            let want = (headroom as u32).min(SINGLE_SHOTS);
            let ud = Token::new(Op::Accept, i as u32, 0).encode();
            while l.singles < want {
                l.singles += 1;
                l.cancelling_singles = false;
                let sqe = opcode::Accept::new(raw, std::ptr::null_mut(), std::ptr::null_mut())
                    .flags(flags)
                    .build()
                    .user_data(ud);
                core.submit(sqe);
            }
        }
    }

    /// Cancels the armed accepts (all of them, or only the multishot ones).
    fn cancel(&mut self, core: &mut Core, only_multishot: bool) {
        for (i, l) in self.listeners.iter_mut().enumerate() {
            if l.multishot && !l.cancelling_multi {
                l.cancelling_multi = true;
                core.cancel(Token::new(Op::Accept, i as u32, MULTISHOT_GEN).encode());
            }
            if !only_multishot && l.singles > 0 && !l.cancelling_singles {
                l.cancelling_singles = true;
                core.cancel_all(Token::new(Op::Accept, i as u32, 0).encode());
            }
        }
    }

    /// Pauses accepting until the next tick or a freed slot (no tight error loop).
    fn starve(&mut self, core: &mut Core) {
        if !self.starved {
            self.starved = true;
            self.cancel(core, false);
        }
    }

    /// An accept completion: the new client's fd, if there is one. Re-arming on a
    /// final completion is left to the caller ([`Acceptor::finish`]), which knows
    /// the headroom after this client took its slot.
    pub fn on_completion(
        &mut self,
        core: &mut Core,
        c: &Completion,
        tok: Token,
    ) -> Option<OwnedFd> {
        if !c.more() {
            if let Some(l) = self.listeners.get_mut(tok.slot as usize) {
                if tok.generation == MULTISHOT_GEN {
                    l.multishot = false;
                    l.cancelling_multi = false;
                } else {
                    l.singles -= 1;
                    if l.singles == 0 {
                        l.cancelling_singles = false;
                    }
                }
            }
        }
        if c.result >= 0 {
            return Some(sys::take_accepted(c.result));
        }
        match -c.result {
            libc::ECANCELED => {}
            libc::EMFILE | libc::ENFILE => {
                core.stats.accept_emfile.fetch_add(1, Relaxed);
                // The multishot accept may still be armed: cancel it (no EMFILE spin).
                self.starve(core);
            }
            // The client went away between handshake and accept: nothing to do.
            libc::ECONNABORTED | libc::EINTR | libc::EAGAIN => {}
            e => {
                // Anything else (ENOMEM, ENOBUFS, an LSM's EPERM...) may persist:
                // pause until the next tick instead of re-arming at once, so a
                // lasting error costs one try and one line a second.
                core.log_limited(format_args!(
                    "accept: {} (accepting paused for a second)",
                    io::Error::from_raw_os_error(e)
                ));
                self.starve(core);
            }
        }
        None
    }

    /// After a final accept completion: close the listener if stopping (so that with
    /// nft's fail-open tproxy new connections bypass the stopping engine instead of
    /// queueing on it), else re-arm.
    pub fn finish(&mut self, core: &mut Core, c: &Completion, tok: Token, headroom: usize) {
        if c.more() {
            return;
        }
        if self.stopping {
            if let Some(l) = self.listeners.get_mut(tok.slot as usize) {
                if !l.armed() {
                    l.fd = None;
                }
            }
        } else {
            self.arm(core, headroom);
        }
    }

    /// Once a second: a paused acceptor tries again, and one at the limit sees what
    /// the other cores gave back (or took) since: the headroom is global.
    pub fn on_tick(&mut self, core: &mut Core, headroom: usize) {
        self.starved = false;
        self.note_headroom(core, headroom);
        self.arm(core, headroom);
    }

    /// A connection closed: a paused acceptor tries again now.
    pub fn unstarve(&mut self) {
        self.starved = false;
    }

    /// Stops accepting. Listeners with an accept armed close on its final
    /// completion; the others (paused at the limit or for lack of fds) close now.
    /// Returns the parked clients, which the caller resets.
    pub fn stop(&mut self, core: &mut Core) -> Vec<OwnedFd> {
        self.stopping = true;
        self.cancel(core, false);
        for l in &mut self.listeners {
            if !l.armed() {
                l.fd = None;
            }
        }
        self.parked.drain(..).collect()
    }

    /// No accept in flight (for the final wind-down).
    pub fn is_idle(&self) -> bool {
        self.listeners.iter().all(|l| !l.armed())
    }
}
