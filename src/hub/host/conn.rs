//! One connection as its shard sees it: protocol phase, wire format, generation, room and user,
//! send queue and the partial-message reader. 56 bytes; an idle connection owns no heap memory.

use super::outbox::Queue;
use super::rooms::{MemberPos, RoomKey};
use super::users::UserKey;
use crate::envelope::Format;
use crate::room::frames::Wire;
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
    /// Negotiated permessage-deflate: gets blocks' compressed twins, may send compressed
    /// messages.
    pub const DEFLATE: u8 = 1 << 2;
    /// Listed in the ready list (has frames and no send in flight).
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
    /// Which connection of this slot this is (see `ConnId`).
    pub generation: u32,
    pub state: State,
    pub flags: u8,
    /// The 100 ms tick (mod 2^16, never 0) since when the send queue has been shedding frames;
    /// 0 = keeping up. 16 bits keep the connection at 56 bytes: a wrap takes 109 minutes, far
    /// more than `slow_consumer_ms` may be, and the sweep looks at every connection each second.
    pub behind_since: u16,
    /// In 100 ms ticks since shard start; 0 = none. Handshake, idle or close deadline,
    /// depending on the state.
    pub deadline: u32,
    /// The local room and the position among its members, if in one.
    pub room: RoomKey,
    pub member_pos: MemberPos,
    /// The local user, if signed in.
    pub user: UserKey,
    pub queue: Queue,
    pub reader: Reader,
}

impl Conn {
    pub fn new(io: u64, generation: u32, deadline: u32) -> Conn {
        Conn {
            io,
            generation,
            state: State::Handshake,
            flags: 0,
            behind_since: 0,
            deadline,
            room: RoomKey::NONE,
            member_pos: MemberPos(0),
            user: UserKey::NONE,
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

    /// How it reads shared frames.
    #[inline]
    pub fn wire(&self) -> Wire {
        Wire { format: self.format(), deflate: self.has(flag::DEFLATE) }
    }

    /// Starts the slow-reader clock at `tick` unless it is running.
    pub fn fell_behind(&mut self, tick: u32) {
        if self.behind_since == 0 {
            self.behind_since = (tick as u16).max(1);
        }
    }

    /// Whether the queue has been shedding for more than `ticks` 100 ms ticks at `tick`.
    pub fn behind_longer_than(&self, ticks: u32, tick: u32) -> bool {
        self.behind_since != 0 && u32::from((tick as u16).wrapping_sub(self.behind_since)) > ticks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_is_small() {
        // The slab entry adds nothing (State has a niche): 56 bytes per connection in the table.
        assert!(std::mem::size_of::<Conn>() <= 56, "{}", std::mem::size_of::<Conn>());
        assert_eq!(std::mem::size_of::<Option<Conn>>(), std::mem::size_of::<Conn>());
    }

    #[test]
    fn the_slow_reader_clock_survives_the_wrap() {
        let mut c = Conn::new(0, 0, 0);
        c.fell_behind(65_530);
        assert!(!c.behind_longer_than(100, 65_600), "70 ticks, across the 16-bit wrap");
        assert!(c.behind_longer_than(100, 65_640));
        let mut c = Conn::new(0, 0, 0);
        c.fell_behind(65_536); // tick 0 mod 2^16 is stored as 1: still "behind"
        assert!(c.behind_since != 0);
    }
}
