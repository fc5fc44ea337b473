//! Mail: what crosses between shards (and from the API threads into shards). Each shard has one
//! bounded inbox; everything in it is owned or reference-counted, never borrowed. Requests to a
//! room's owner carry where the answer goes: an API thread's reply channel, or a connection on
//! some shard.

use std::sync::Arc;
use std::sync::mpsc::SyncSender;

use crate::ids::ShardId;
use crate::proto::Message;
use crate::room::RoomName;
use crate::room::attrs::AttrError;
use crate::room::frames::SharedFrame;
use crate::room::moderation::{List, ModerationError};
use crate::room::owner::{ModAction, ModerationLists, PublishError, Published, RoomInfo, Sender};

/// A one-shot answer to a waiting API thread. Sending never blocks (the channel has room for
/// the single answer) and a vanished waiter is ignored.
pub struct Reply<T>(pub SyncSender<T>);

impl<T> Reply<T> {
    pub fn send(self, value: T) {
        let _ = self.0.try_send(value);
    }
}

/// A room's attribute version and entries, in key order.
pub type AttrsSnapshot = (u64, Vec<(String, Vec<u8>)>);

/// Where an owner's answer goes.
pub enum Origin<T> {
    /// The business API, waiting.
    Api(Reply<T>),
    /// A client connection on some shard (refusals come back as error frames).
    Conn { shard: ShardId, conn: u32 },
}

/// One item of cross-shard traffic.
pub enum Mail {
    /// To a room's owner: a message for the room's next block.
    Publish { room: RoomName, msg: Box<Message>, sender: Sender, origin: Origin<Result<Published, PublishError>> },
    /// To a room's owner: this shard now holds `members` members of the room (`json` of them
    /// reading JSON); `left` of them left since the last report, the first few named.
    Presence { room: RoomName, from: ShardId, members: u32, json: u32, left: u32, left_users: Vec<Arc<str>> },
    /// To a room's owner: a connection joined; answered with its backfill and attributes.
    Joined { room: RoomName, from: ShardId, conn: u32, user: Option<Arc<str>> },
    /// Frames for one connection, if it is still in `room` (backfill, attribute sync).
    ToConn { room: RoomName, conn: u32, frames: Vec<Arc<SharedFrame>> },
    /// From a room's owner: a frame for the room's members on this shard.
    Deliver { room: RoomName, frame: Arc<SharedFrame> },
    /// A direct frame for every connection of a user on this shard; replies with the count.
    ToUser { user: Arc<str>, frame: Arc<SharedFrame>, reply: Option<Reply<usize>> },
    /// A broadcast frame for every connection on this shard; replies with the count.
    ToAll { frame: Arc<SharedFrame>, reply: Option<Reply<usize>> },
    /// To a room's owner: online count and last seq.
    RoomInfo { room: RoomName, reply: Reply<RoomInfo> },
    /// To every shard: its owned rooms with the most members.
    TopRooms { n: usize, reply: Reply<Vec<(RoomName, u64)>> },
    /// To a room's owner: a short poll from a connection on `from`.
    Poll { room: RoomName, after: u64, limit: usize, from: ShardId, conn: u32 },
    /// The owner's answer to a poll: status and JSON body.
    PollResult { conn: u32, status: u16, body: Vec<u8> },
    /// To a room's owner: a moderation action (then replicated and enforced everywhere).
    Moderate {
        room: RoomName,
        user: Arc<str>,
        action: ModAction,
        reason: Arc<str>,
        origin: Origin<Result<(), ModerationError>>,
    },
    /// From a room's owner to every shard: keep this ban or whitelist entry (or drop it).
    Replicate { room: RoomName, user: Arc<str>, list: List, until_ms: Option<i64>, add: bool },
    /// From a room's owner to every shard: close the user's connections in the room.
    Kick { room: RoomName, user: Arc<str>, reason: Arc<str> },
    /// To a room's owner: its moderation lists.
    ModerationList { room: RoomName, reply: Reply<ModerationLists> },
    /// To a room's owner: set (Some) or delete (None) an attribute.
    SetAttr { room: RoomName, key: String, value: Option<Vec<u8>>, origin: Origin<Result<u64, AttrError>> },
    /// To a room's owner: all attributes and the version.
    Attrs { room: RoomName, reply: Reply<AttrsSnapshot> },
    /// To a room's owner: what a connection at attribute version `after` needs.
    AttrSync { room: RoomName, after: u64, from: ShardId, conn: u32 },
    /// From an owner back to a client's shard: its request was refused.
    Refused { conn: u32, code: u32, reason: &'static str },
    /// Close every connection (1001) and stop.
    Stop,
}
