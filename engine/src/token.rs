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

/// What an in-flight operation is. `u8` values are part of the token encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    /// Multishot accept on a TCP listener; `slot` is the listener index.
    Accept = 1,
    /// Connect of a connection's upstream socket.
    Connect = 2,
    /// The link timeout attached to `Connect`.
    ConnectTimeout = 3,
    /// One-shot POLLIN on the source of direction 0 (client to server).
    PollIn0 = 4,
    /// One-shot POLLIN on the source of direction 1 (server to client).
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
            _ => return None,
        })
    }

    /// The relay direction (0 or 1) an op belongs to, if it is a relay op.
    pub fn direction(self) -> Option<usize> {
        match self {
            Op::PollIn0 | Op::PollOut0 | Op::Recv0 | Op::Send0 => Some(0),
            Op::PollIn1 | Op::PollOut1 | Op::Recv1 | Op::Send1 => Some(1),
            _ => None,
        }
    }

    /// POLLIN op for direction `d`.
    pub fn poll_in(d: usize) -> Op {
        if d == 0 {
            Op::PollIn0
        } else {
            Op::PollIn1
        }
    }

    /// POLLOUT op for direction `d`.
    pub fn poll_out(d: usize) -> Op {
        if d == 0 {
            Op::PollOut0
        } else {
            Op::PollOut1
        }
    }

    /// Copy-relay recv op for direction `d`.
    pub fn recv(d: usize) -> Op {
        if d == 0 {
            Op::Recv0
        } else {
            Op::Recv1
        }
    }

    /// Copy-relay send op for direction `d`.
    pub fn send(d: usize) -> Op {
        if d == 0 {
            Op::Send0
        } else {
            Op::Send1
        }
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

    const ALL: [Op; 16] = [
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
        assert_eq!(Token::decode(17), None);
    }

    #[test]
    fn generation_wraps_within_24_bits() {
        assert_eq!(next_generation(GENERATION_MASK), 0);
        assert_eq!(next_generation(5), 6);
        let t = Token::new(Op::Connect, 3, 0x1ff_ffff);
        assert_eq!(t.generation, GENERATION_MASK);
    }

    #[test]
    fn direction_helpers_agree() {
        for d in 0..2 {
            assert_eq!(Op::poll_in(d).direction(), Some(d));
            assert_eq!(Op::poll_out(d).direction(), Some(d));
            assert_eq!(Op::recv(d).direction(), Some(d));
            assert_eq!(Op::send(d).direction(), Some(d));
        }
        assert_eq!(Op::Accept.direction(), None);
        assert_eq!(Op::Tick.direction(), None);
    }
}
