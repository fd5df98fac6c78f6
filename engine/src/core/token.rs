//! The one place that encodes and decodes io_uring `user_data`.
//!
//! Layout of the 64 bits (most significant first):
//!
//! ```text
//! | slot: 32 | generation: 24 | op: 8 |
//! ```
//!
//! `op` is never 0, so the value 0 is never a valid token (a zeroed SQE or a
//! mistakenly reused `user_data` cannot be mistaken for a live operation). The
//! generation changes every time a slot is reused, so a completion that arrives for a
//! slot that was freed and handed to a new connection is recognised as stale.
//!
//! Every op a TCP connection can have in flight has its own code, once per relay
//! direction, so one connection never has two ops in flight under one `user_data`:
//! that is what lets a close cancel exactly its own ops by `user_data` (a hash
//! lookup in the kernel) instead of by fd (a walk over every armed poll of the ring).

/// What an in-flight operation is. `u8` values are part of the token encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    /// Accept (multishot or single-shot) on a TCP listener; `slot` is the listener.
    Accept = 1,
    /// Connect of a connection's upstream socket.
    Connect = 2,
    /// The link timeout attached to `Connect`.
    ConnectTimeout = 3,
    /// Multishot POLLIN on the source of direction 0 (client to server).
    PollIn0 = 4,
    /// Multishot POLLIN on the source of direction 1 (server to client).
    PollIn1 = 5,
    /// One-shot POLLOUT on the destination of direction 0.
    PollOut0 = 6,
    /// One-shot POLLOUT on the destination of direction 1.
    PollOut1 = 7,
    /// Copy relay: recv into a provided buffer, direction 0.
    Recv0 = 8,
    /// Copy relay: recv into a provided buffer, direction 1.
    Recv1 = 9,
    /// Copy relay: send of a provided buffer, direction 0.
    Send0 = 10,
    /// Copy relay: send of a provided buffer, direction 1.
    Send1 = 11,
    /// An `ASYNC_CANCEL` request; its own completion carries no state.
    Cancel = 12,
    /// The worker's periodic housekeeping timer.
    Tick = 13,
    /// Read on the worker's control eventfd (stop requests from the main thread).
    Control = 14,
    /// Multishot recvmsg on a UDP tproxy socket; `slot` is the socket index.
    UdpListen = 15,
    /// Multishot recv on a UDP flow's upstream socket; `slot` is the flow index.
    UdpUpstream = 16,
    /// Multishot POLLERR watch on the source of direction 0 after its EOF.
    ErrWatch0 = 17,
    /// Multishot POLLERR watch on the source of direction 1 after its EOF.
    ErrWatch1 = 18,
    /// The timeout of a connection's sniffing phase (client's first bytes).
    SniffTimer = 19,
}

/// Which part of the worker owns an op's completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subsystem {
    /// The worker itself: tick, control, cancels.
    Core,
    /// Listeners and connections.
    Tcp,
    /// Tproxy sockets and flows.
    Udp,
}

/// The ops one TCP connection can have in flight, at most one of each at a time.
/// Relay ops carry their direction: 0 is client to server, 1 server to client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConnOp {
    /// Upstream connect.
    Connect,
    /// The link timeout of the connect.
    ConnectTimeout,
    /// Multishot POLLIN on the direction's source.
    PollIn(usize),
    /// One-shot POLLOUT on the direction's destination.
    PollOut(usize),
    /// Multishot POLLERR on the direction's source after its EOF.
    ErrWatch(usize),
    /// Copy relay: recv from the source into a provided buffer.
    Recv(usize),
    /// Copy relay: send from the provided buffer to the destination.
    Send(usize),
    /// The deadline for the client's first bytes while sniffing.
    SniffTimer,
}

impl ConnOp {
    /// Every op, each with its bit in a connection's armed set.
    pub const ALL: [ConnOp; 13] = [
        ConnOp::Connect,
        ConnOp::ConnectTimeout,
        ConnOp::PollIn(0),
        ConnOp::PollIn(1),
        ConnOp::PollOut(0),
        ConnOp::PollOut(1),
        ConnOp::ErrWatch(0),
        ConnOp::ErrWatch(1),
        ConnOp::Recv(0),
        ConnOp::Recv(1),
        ConnOp::Send(0),
        ConnOp::Send(1),
        ConnOp::SniffTimer,
    ];

    /// The bit of this op in a `u16` set (see [`ConnOp::ALL`]).
    pub fn bit(self) -> u16 {
        let i = match self {
            ConnOp::Connect => 0,
            ConnOp::ConnectTimeout => 1,
            ConnOp::PollIn(d) => 2 + d,
            ConnOp::PollOut(d) => 4 + d,
            ConnOp::ErrWatch(d) => 6 + d,
            ConnOp::Recv(d) => 8 + d,
            ConnOp::Send(d) => 10 + d,
            ConnOp::SniffTimer => 12,
        };
        1 << i
    }

    /// The token op code.
    pub fn op(self) -> Op {
        let pick = |d: usize, a: Op, b: Op| if d == 0 { a } else { b };
        match self {
            ConnOp::Connect => Op::Connect,
            ConnOp::ConnectTimeout => Op::ConnectTimeout,
            ConnOp::PollIn(d) => pick(d, Op::PollIn0, Op::PollIn1),
            ConnOp::PollOut(d) => pick(d, Op::PollOut0, Op::PollOut1),
            ConnOp::ErrWatch(d) => pick(d, Op::ErrWatch0, Op::ErrWatch1),
            ConnOp::Recv(d) => pick(d, Op::Recv0, Op::Recv1),
            ConnOp::Send(d) => pick(d, Op::Send0, Op::Send1),
            ConnOp::SniffTimer => Op::SniffTimer,
        }
    }
}

impl Op {
    fn from_u8(v: u8) -> Option<Op> {
        Some(match v {
            1 => Op::Accept,
            2 => Op::Connect,
            3 => Op::ConnectTimeout,
            4 => Op::PollIn0,
            5 => Op::PollIn1,
            6 => Op::PollOut0,
            7 => Op::PollOut1,
            8 => Op::Recv0,
            9 => Op::Recv1,
            10 => Op::Send0,
            11 => Op::Send1,
            12 => Op::Cancel,
            13 => Op::Tick,
            14 => Op::Control,
            15 => Op::UdpListen,
            16 => Op::UdpUpstream,
            17 => Op::ErrWatch0,
            18 => Op::ErrWatch1,
            19 => Op::SniffTimer,
            _ => return None,
        })
    }

    /// The subsystem whose completion handler takes this op.
    pub fn subsystem(self) -> Subsystem {
        match self {
            Op::Cancel | Op::Tick | Op::Control => Subsystem::Core,
            Op::UdpListen | Op::UdpUpstream => Subsystem::Udp,
            _ => Subsystem::Tcp,
        }
    }

    /// The connection op this code stands for, if it is one.
    pub fn conn_op(self) -> Option<ConnOp> {
        Some(match self {
            Op::Connect => ConnOp::Connect,
            Op::ConnectTimeout => ConnOp::ConnectTimeout,
            Op::PollIn0 => ConnOp::PollIn(0),
            Op::PollIn1 => ConnOp::PollIn(1),
            Op::PollOut0 => ConnOp::PollOut(0),
            Op::PollOut1 => ConnOp::PollOut(1),
            Op::ErrWatch0 => ConnOp::ErrWatch(0),
            Op::ErrWatch1 => ConnOp::ErrWatch(1),
            Op::Recv0 => ConnOp::Recv(0),
            Op::Recv1 => ConnOp::Recv(1),
            Op::Send0 => ConnOp::Send(0),
            Op::Send1 => ConnOp::Send(1),
            Op::SniffTimer => ConnOp::SniffTimer,
            _ => return None,
        })
    }
}

/// Generations are 24 bits wide and wrap.
pub const GENERATION_MASK: u32 = 0x00ff_ffff;

/// A decoded `user_data`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Token {
    pub op: Op,
    pub slot: u32,
    pub generation: u32,
}

impl Token {
    /// A token for `op` on `slot` at `generation` (truncated to 24 bits).
    pub fn new(op: Op, slot: u32, generation: u32) -> Token {
        Token {
            op,
            slot,
            generation: generation & GENERATION_MASK,
        }
    }

    /// A token that names no slot (timers, control, cancels).
    pub fn global(op: Op) -> Token {
        Token::new(op, 0, 0)
    }

    /// Encodes into `user_data`. Never returns 0.
    pub fn encode(self) -> u64 {
        (u64::from(self.slot) << 32)
            | (u64::from(self.generation & GENERATION_MASK) << 8)
            | u64::from(self.op as u8)
    }

    /// Decodes a `user_data`; `None` for values no token encodes to (0 among them).
    pub fn decode(v: u64) -> Option<Token> {
        let op = Op::from_u8((v & 0xff) as u8)?;
        Some(Token {
            op,
            slot: (v >> 32) as u32,
            generation: ((v >> 8) as u32) & GENERATION_MASK,
        })
    }
}

/// Next generation for a reused slot.
pub fn next_generation(g: u32) -> u32 {
    g.wrapping_add(1) & GENERATION_MASK
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Op; 19] = [
        Op::Accept,
        Op::Connect,
        Op::ConnectTimeout,
        Op::PollIn0,
        Op::PollIn1,
        Op::PollOut0,
        Op::PollOut1,
        Op::Recv0,
        Op::Recv1,
        Op::Send0,
        Op::Send1,
        Op::Cancel,
        Op::Tick,
        Op::Control,
        Op::UdpListen,
        Op::UdpUpstream,
        Op::ErrWatch0,
        Op::ErrWatch1,
        Op::SniffTimer,
    ];

    #[test]
    fn round_trip_every_op_and_extreme_fields() {
        for op in ALL {
            for slot in [0, 1, 12345, u32::MAX] {
                for generation in [0, 1, GENERATION_MASK] {
                    let t = Token::new(op, slot, generation);
                    let v = t.encode();
                    assert_ne!(v, 0);
                    assert_eq!(Token::decode(v), Some(t));
                }
            }
        }
    }

    #[test]
    fn zero_and_unknown_ops_are_rejected() {
        assert_eq!(Token::decode(0), None);
        assert_eq!(Token::decode(0xffff_ffff_0000_0000), None);
        assert_eq!(Token::decode(0xff), None);
        assert_eq!(Token::decode(20), None);
    }

    #[test]
    fn generation_wraps_within_24_bits() {
        assert_eq!(next_generation(GENERATION_MASK), 0);
        assert_eq!(next_generation(5), 6);
        let t = Token::new(Op::Connect, 3, 0x1ff_ffff);
        assert_eq!(t.generation, GENERATION_MASK);
    }

    #[test]
    fn conn_ops_have_distinct_bits_codes_and_round_trip() {
        let mut bits = 0u16;
        for op in ConnOp::ALL {
            assert_eq!(bits & op.bit(), 0, "{op:?} shares a bit");
            bits |= op.bit();
            assert_eq!(op.op().conn_op(), Some(op));
            assert_eq!(op.op().subsystem(), Subsystem::Tcp);
        }
        assert_eq!(bits.count_ones(), 13);
        for op in ALL {
            if let Some(c) = op.conn_op() {
                assert_eq!(c.op(), op);
            }
        }
        assert_eq!(Op::Accept.conn_op(), None);
        assert_eq!(Op::Tick.subsystem(), Subsystem::Core);
        assert_eq!(Op::UdpUpstream.subsystem(), Subsystem::Udp);
    }
}
