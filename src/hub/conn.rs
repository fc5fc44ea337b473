//! One connection as the hub sees it: protocol phase, wire format, room and user, send queue
//! and the partial-message reader. About 56 bytes; an idle connection owns no heap memory.

use super::index::NONE;
use super::outbox::Queue;
use crate::envelope::Format;
use crate::wire::reader::Reader;

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Waiting for (the rest of) the HTTP upgrade request.
    Handshake,
    /// A WebSocket: frames both ways.
    Open,
    /// We sent Close; waiting for the peer's Close (data frames are discarded).
    Closing,
    /// Sending what is queued (a refusal, a Close reply, a poll answer), then terminate.
    Flushing,
    /// A plain HTTP short poll waits for the room owner's answer.
    Polling,
    /// Done: the driver is cancelling its operations and will release the connection.
    Terminating,
}

/// Flag bits of a connection.
pub mod flag {
    /// Reads and writes `barrage.v1.json` (text frames) instead of protobuf.
    pub const JSON: u8 = 1 << 0;
    /// A signed-in user whose token allows sending.
    pub const CAN_SEND: u8 = 1 << 1;
    /// Raw echo endpoint (conformance testing): messages go back as they came.
    pub const ECHO: u8 = 1 << 2;
    /// Listed in the hub's ready list (has frames and no send in flight).
    pub const READY: u8 = 1 << 3;
    /// Signed in (has a user id).
    pub const SIGNED_IN: u8 = 1 << 4;
    /// Completed the WebSocket handshake (counts in the open-connections gauge).
    pub const OPENED: u8 = 1 << 5;
    /// The token allows `moderate` frames.
    pub const ADMIN: u8 = 1 << 6;
    /// The token allows `attr_set` frames.
    pub const ATTRS: u8 = 1 << 7;
}

/// One connection on this shard.
pub struct Conn {
    /// The driver's handle (ring, slot, operation flags); opaque to the hub.
    pub io: u64,
    pub state: State,
    pub flags: u8,
    /// In 100 ms ticks since shard start; 0 = none. Handshake, idle or close deadline,
    /// depending on the state.
    pub deadline: u32,
    /// Local room key and position in its member list, or NONE.
    pub room: u32,
    pub member_pos: u32,
    /// Local user key, or NONE for an anonymous viewer.
    pub user: u32,
    /// Tick since when the send queue has been shedding frames (0 = keeping up).
    pub behind_since: u32,
    pub queue: Queue,
    pub reader: Reader,
}

impl Conn {
    pub fn new(io: u64, deadline: u32) -> Conn {
        Conn {
            io,
            state: State::Handshake,
            flags: 0,
            deadline,
            room: NONE,
            member_pos: 0,
            user: NONE,
            behind_since: 0,
            queue: Queue::default(),
            reader: Reader::default(),
        }
    }

    #[inline]
    pub fn has(&self, f: u8) -> bool {
        self.flags & f != 0
    }

    #[inline]
    pub fn format(&self) -> Format {
        if self.has(flag::JSON) { Format::Json } else { Format::Proto }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_is_small() {
        assert!(std::mem::size_of::<Conn>() <= 56, "{}", std::mem::size_of::<Conn>());
    }
}
