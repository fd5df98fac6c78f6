//! One relay direction as a state machine without I/O.
//!
//! A TCP connection through the engine has two directions (client to server and
//! server to client). Each is a [`Direction`]: it is told the results of reads and
//! writes and says what to do next ([`Direction::want`]). The connection machine
//! (`machine.rs`) drives two of them, for both relay modes:
//!
//! * splice: `Read` is `splice(src -> pipe)` and `Write` is `splice(pipe -> dst)`,
//!   both non-blocking and inline; `WouldBlock` waits for a poll on the ring.
//! * copy: `Read` is a ring `RECV` into a provided buffer and `Write` a ring `SEND`;
//!   the driver marks the op in flight with [`Direction::begin`].
//!
//! The rules that make the relay exact:
//!
//! * Backpressure: nothing is read while anything is buffered. Memory per direction
//!   is therefore bounded by one pipe (or one provided buffer), whatever the peers do.
//! * Half-close: EOF from the source becomes `shutdown(SHUT_WR)` on the destination
//!   only after every byte already read has been written.
//! * Errors: any read or write error fails the direction, and the connection is then
//!   reset on both sides (a reset on one side becomes a reset on the other).

/// Where a direction is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Nothing buffered: read from the source next.
    Reading,
    /// The last read would have blocked: wait until the source is readable.
    AwaitReadable,
    /// Bytes are buffered: write them to the destination next.
    Writing,
    /// The last write would have blocked: wait until the destination has room.
    /// The source is not read meanwhile (backpressure).
    AwaitWritable,
    /// The source reached EOF and everything was delivered: shut the destination's
    /// write side down next.
    ShutdownPending,
    /// The destination's write side is shut down. This direction is finished.
    Done,
    /// A read, write or shutdown failed: the connection must be reset.
    Failed,
}

/// What the driver should do for this direction now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    /// Read at most this many bytes from the source.
    Read(usize),
    /// Write this many buffered bytes to the destination.
    Write(usize),
    /// Arm a readiness wait for POLLIN on the source.
    PollReadable,
    /// Arm a readiness wait for POLLOUT on the destination.
    PollWritable,
    /// `shutdown(dst, SHUT_WR)`.
    ShutdownWrite,
    /// An op for this direction is in flight; wait for its completion.
    InFlight,
    /// Nothing more to do in this direction.
    Nothing,
    /// Reset the whole connection.
    Reset,
}

/// Outcome of one read, write or shutdown, as the kernel reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Io {
    /// Moved this many bytes (0 on a read means EOF).
    Done(usize),
    /// `EAGAIN`: try again when the fd is ready.
    WouldBlock,
    /// Any other error, as a positive errno.
    Err(i32),
}

impl Io {
    /// Converts a syscall-style result.
    pub fn from_result(r: std::io::Result<usize>) -> Io {
        match r {
            Ok(n) => Io::Done(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Io::WouldBlock,
            Err(e) => Io::Err(e.raw_os_error().unwrap_or(libc::EIO)),
        }
    }

    /// Converts an io_uring CQE result (`-errno` on failure).
    pub fn from_cqe(res: i32) -> Io {
        if res >= 0 {
            Io::Done(res as usize)
        } else if res == -libc::EAGAIN {
            Io::WouldBlock
        } else {
            Io::Err(-res)
        }
    }
}

/// One relay direction. See the module documentation.
#[derive(Clone, Debug)]
pub struct Direction {
    state: State,
    /// Bytes read from the source and not yet written.
    buffered: usize,
    /// Read size limit (pipe or buffer capacity).
    capacity: usize,
    /// An async op for this direction is in flight (copy mode).
    in_flight: bool,
    /// Total bytes written to the destination.
    delivered: u64,
    /// First errno seen, for counters and logs.
    error: Option<i32>,
}

impl Direction {
    /// A new direction that reads up to `capacity` bytes at a time.
    pub fn new(capacity: usize) -> Direction {
        Direction {
            state: State::Reading,
            buffered: 0,
            capacity: capacity.max(1),
            in_flight: false,
            delivered: 0,
            error: None,
        }
    }

    /// A direction that starts with `buffered` bytes already read (sniffed before the
    /// connect): it writes them first.
    pub fn with_buffered(capacity: usize, buffered: usize) -> Direction {
        let mut d = Direction::new(capacity);
        if buffered > 0 {
            d.buffered = buffered;
            d.state = State::Writing;
        }
        d
    }

    /// Current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// Bytes buffered between source and destination.
    pub fn buffered(&self) -> usize {
        self.buffered
    }

    /// Bytes delivered to the destination so far.
    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    /// The first error that failed this direction, as a positive errno.
    pub fn error(&self) -> Option<i32> {
        self.error
    }

    /// Whether this direction will do nothing more (finished or failed).
    pub fn is_finished(&self) -> bool {
        matches!(self.state, State::Done | State::Failed)
    }

    /// The read size limit.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Changes the read size limit (for example when a pipe of another size is used).
    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity.max(1);
    }

    /// What to do next. A failed direction asks for the reset even while an op is
    /// in flight: the reset cancels that op, instead of waiting for it (a send
    /// blocked on a peer that never reads would otherwise hold the reset until the
    /// idle timeout).
    pub fn want(&self) -> Want {
        if self.state == State::Failed {
            return Want::Reset;
        }
        if self.in_flight {
            return Want::InFlight;
        }
        match self.state {
            State::Reading => Want::Read(self.capacity - self.buffered),
            State::AwaitReadable => Want::PollReadable,
            State::Writing => Want::Write(self.buffered),
            State::AwaitWritable => Want::PollWritable,
            State::ShutdownPending => Want::ShutdownWrite,
            State::Done => Want::Nothing,
            State::Failed => Want::Reset,
        }
    }

    /// Marks the op named by [`want`](Self::want) as submitted asynchronously.
    pub fn begin(&mut self) {
        debug_assert!(matches!(
            self.state,
            State::Reading | State::Writing | State::ShutdownPending
        ));
        self.in_flight = true;
    }

    /// The in-flight op did not run (for example `ENOBUFS`: no provided buffer was
    /// free); the same step must be issued again later.
    pub fn retry(&mut self) {
        self.in_flight = false;
    }

    fn set_state(&mut self, next: State) {
        // The single place transitions happen; a trace hook would go here.
        self.state = next;
    }

    /// Result of a read from the source.
    pub fn on_read(&mut self, r: Io) {
        self.in_flight = false;
        if self.state != State::Reading {
            return;
        }
        match r {
            Io::Done(0) => {
                // EOF: nothing is buffered (reads only happen when empty), so the FIN
                // can be passed on right away.
                debug_assert_eq!(self.buffered, 0);
                self.set_state(State::ShutdownPending);
            }
            Io::Done(n) => {
                self.buffered += n;
                self.set_state(State::Writing);
            }
            Io::WouldBlock => self.set_state(State::AwaitReadable),
            Io::Err(e) => self.fail(e),
        }
    }

    /// Result of a write to the destination.
    pub fn on_write(&mut self, r: Io) {
        self.in_flight = false;
        if self.state != State::Writing {
            return;
        }
        match r {
            Io::Done(0) => {
                // A zero-byte write of a non-empty buffer: the destination cannot take
                // data any more. Treat it like a broken pipe.
                self.fail(libc::EPIPE)
            }
            Io::Done(n) => {
                let n = n.min(self.buffered);
                self.buffered -= n;
                self.delivered += n as u64;
                if self.buffered == 0 {
                    self.set_state(State::Reading);
                }
            }
            Io::WouldBlock => self.set_state(State::AwaitWritable),
            Io::Err(e) => self.fail(e),
        }
    }

    /// Result of `shutdown(dst, SHUT_WR)`.
    pub fn on_shutdown(&mut self, r: Io) {
        self.in_flight = false;
        if self.state != State::ShutdownPending {
            return;
        }
        match r {
            Io::Done(_) => self.set_state(State::Done),
            // shutdown(2) on a TCP socket never blocks; retrying would spin.
            Io::WouldBlock => self.fail(libc::EAGAIN),
            // ENOTCONN too: a connected socket is closed before its own FIN only by a
            // reset or a fatal error, so the FIN never reached that peer, and the
            // other peer must get a reset, not a clean close.
            Io::Err(e) => self.fail(e),
        }
    }

    /// The readiness wait on the source fired.
    pub fn on_readable(&mut self) {
        if self.state == State::AwaitReadable {
            self.set_state(State::Reading);
        }
    }

    /// The readiness wait on the destination fired.
    pub fn on_writable(&mut self) {
        if self.state == State::AwaitWritable {
            self.set_state(State::Writing);
        }
    }

    /// Fails the direction with `errno` (also used when the other direction failed).
    pub fn fail(&mut self, errno: i32) {
        if self.error.is_none() {
            self.error = Some(errno);
        }
        self.set_state(State::Failed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_reading_with_full_capacity() {
        let d = Direction::new(65536);
        assert_eq!(d.state(), State::Reading);
        assert_eq!(d.want(), Want::Read(65536));
    }

    #[test]
    fn read_then_full_write_returns_to_reading() {
        let mut d = Direction::new(100);
        d.on_read(Io::Done(40));
        assert_eq!(d.state(), State::Writing);
        assert_eq!(d.want(), Want::Write(40));
        d.on_write(Io::Done(40));
        assert_eq!(d.state(), State::Reading);
        assert_eq!(d.delivered(), 40);
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn partial_write_keeps_writing_the_rest() {
        let mut d = Direction::new(100);
        d.on_read(Io::Done(100));
        d.on_write(Io::Done(30));
        assert_eq!(d.state(), State::Writing);
        assert_eq!(d.want(), Want::Write(70));
        d.on_write(Io::Done(70));
        assert_eq!(d.state(), State::Reading);
        assert_eq!(d.delivered(), 100);
    }

    #[test]
    fn read_would_block_waits_for_readable() {
        let mut d = Direction::new(100);
        d.on_read(Io::WouldBlock);
        assert_eq!(d.state(), State::AwaitReadable);
        assert_eq!(d.want(), Want::PollReadable);
        // A spurious writable event changes nothing.
        d.on_writable();
        assert_eq!(d.state(), State::AwaitReadable);
        d.on_readable();
        assert_eq!(d.state(), State::Reading);
    }

    #[test]
    fn write_would_block_is_backpressure() {
        let mut d = Direction::new(100);
        d.on_read(Io::Done(50));
        d.on_write(Io::WouldBlock);
        assert_eq!(d.state(), State::AwaitWritable);
        assert_eq!(d.want(), Want::PollWritable);
        // While waiting for room, a readable event must not lead to a read.
        d.on_readable();
        assert_eq!(d.state(), State::AwaitWritable);
        assert_eq!(d.buffered(), 50);
        d.on_writable();
        assert_eq!(d.want(), Want::Write(50));
    }

    #[test]
    fn eof_with_empty_buffer_shuts_down_then_done() {
        let mut d = Direction::new(100);
        d.on_read(Io::Done(0));
        assert_eq!(d.state(), State::ShutdownPending);
        assert_eq!(d.want(), Want::ShutdownWrite);
        d.on_shutdown(Io::Done(0));
        assert_eq!(d.state(), State::Done);
        assert_eq!(d.want(), Want::Nothing);
        assert!(d.is_finished());
    }

    #[test]
    fn eof_only_after_all_bytes_delivered() {
        let mut d = Direction::new(100);
        d.on_read(Io::Done(10));
        d.on_write(Io::WouldBlock);
        d.on_writable();
        d.on_write(Io::Done(10));
        // EOF is only observed by a read, and reads only happen once empty.
        assert_eq!(d.state(), State::Reading);
        d.on_read(Io::Done(0));
        assert_eq!(d.state(), State::ShutdownPending);
        assert_eq!(d.delivered(), 10);
    }

    #[test]
    fn shutdown_on_reset_destination_fails() {
        let mut d = Direction::new(100);
        d.on_read(Io::Done(0));
        d.on_shutdown(Io::Err(libc::ENOTCONN));
        assert_eq!(d.state(), State::Failed);
        assert_eq!(d.error(), Some(libc::ENOTCONN));
    }

    #[test]
    fn shutdown_error_fails() {
        let mut d = Direction::new(100);
        d.on_read(Io::Done(0));
        d.on_shutdown(Io::Err(libc::EBADF));
        assert_eq!(d.state(), State::Failed);
        assert_eq!(d.error(), Some(libc::EBADF));
    }

    #[test]
    fn read_error_fails_and_asks_for_reset() {
        let mut d = Direction::new(100);
        d.on_read(Io::Err(libc::ECONNRESET));
        assert_eq!(d.state(), State::Failed);
        assert_eq!(d.want(), Want::Reset);
        assert_eq!(d.error(), Some(libc::ECONNRESET));
        assert!(d.is_finished());
    }

    #[test]
    fn write_error_fails() {
        let mut d = Direction::new(100);
        d.on_read(Io::Done(5));
        d.on_write(Io::Err(libc::EPIPE));
        assert_eq!(d.state(), State::Failed);
        assert_eq!(d.error(), Some(libc::EPIPE));
    }

    #[test]
    fn zero_byte_write_of_pending_data_fails() {
        let mut d = Direction::new(100);
        d.on_read(Io::Done(5));
        d.on_write(Io::Done(0));
        assert_eq!(d.state(), State::Failed);
    }

    #[test]
    fn first_error_is_kept() {
        let mut d = Direction::new(100);
        d.on_read(Io::Err(libc::ECONNRESET));
        d.fail(libc::EPIPE);
        assert_eq!(d.error(), Some(libc::ECONNRESET));
    }

    #[test]
    fn failed_ignores_late_results() {
        let mut d = Direction::new(100);
        d.fail(libc::ECONNRESET);
        d.on_read(Io::Done(10));
        d.on_write(Io::Done(10));
        d.on_readable();
        d.on_writable();
        d.on_shutdown(Io::Done(0));
        assert_eq!(d.state(), State::Failed);
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn in_flight_op_hides_the_next_step() {
        let mut d = Direction::new(100);
        d.begin();
        assert_eq!(d.want(), Want::InFlight);
        d.on_read(Io::Done(7));
        assert_eq!(d.want(), Want::Write(7));
        d.begin();
        assert_eq!(d.want(), Want::InFlight);
        d.on_write(Io::Done(7));
        assert_eq!(d.want(), Want::Read(100));
    }

    #[test]
    fn failure_wins_over_an_op_in_flight() {
        let mut d = Direction::new(100);
        d.on_read(Io::Done(10));
        d.begin(); // a send is in flight
        d.fail(libc::ECONNRESET);
        assert_eq!(d.want(), Want::Reset);
    }

    #[test]
    fn retry_reissues_the_same_step() {
        let mut d = Direction::new(100);
        d.begin();
        d.retry();
        assert_eq!(d.state(), State::Reading);
        assert_eq!(d.want(), Want::Read(100));
    }

    #[test]
    fn io_conversions() {
        assert_eq!(Io::from_cqe(12), Io::Done(12));
        assert_eq!(Io::from_cqe(-libc::EAGAIN), Io::WouldBlock);
        assert_eq!(Io::from_cqe(-libc::ECONNRESET), Io::Err(libc::ECONNRESET));
        assert_eq!(Io::from_result(Ok(3)), Io::Done(3));
        assert_eq!(
            Io::from_result(Err(std::io::Error::from_raw_os_error(libc::EAGAIN))),
            Io::WouldBlock
        );
        assert_eq!(
            Io::from_result(Err(std::io::Error::from_raw_os_error(libc::EPIPE))),
            Io::Err(libc::EPIPE)
        );
    }

    #[test]
    fn capacity_bounds_reads() {
        let mut d = Direction::new(0);
        assert_eq!(d.want(), Want::Read(1));
        d.set_capacity(4096);
        assert_eq!(d.want(), Want::Read(4096));
    }
}
