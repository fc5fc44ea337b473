//! Mail: what crosses between shards (and from the API threads into shards). Each shard has one
//! bounded inbox; everything in it is owned or reference-counted, never borrowed.

use std::sync::Arc;
use std::sync::mpsc::SyncSender;

use crate::ids::ShardId;
use crate::proto::Message;
use crate::room::RoomName;
use crate::room::owner::{PublishError, RoomInfo, SharedFrame};

/// A one-shot answer to a waiting API thread. Sending never blocks (the channel has room for
/// the single answer) and a vanished waiter is ignored.
pub struct Reply<T>(pub SyncSender<T>);

impl<T> Reply<T> {
    pub fn send(self, value: T) {
        let _ = self.0.try_send(value);
    }
}

/// Who published a room message, so a refusal can reach them.
pub enum Origin {
    /// The business API, waiting for the message id or the refusal.
    Api(Reply<Result<u64, PublishError>>),
    /// A client connection on some shard (an error frame goes back to it).
    Conn { shard: ShardId, conn: u32 },
}

/// One item of cross-shard traffic.
pub enum Mail {
    /// To a room's owner: a message for the room's next block.
    Publish { room: RoomName, msg: Box<Message>, origin: Origin },
    /// To a room's owner: this shard now holds `members` members of the room (`json` of them
    /// reading JSON).
    Presence { room: RoomName, from: ShardId, members: u32, json: u32 },
    /// From a room's owner: a block frame for the room's members on this shard.
    Deliver { room: RoomName, frame: Arc<SharedFrame> },
    /// A direct frame for every connection of a user on this shard; replies with the count.
    ToUser { user: Arc<str>, frame: Arc<SharedFrame>, reply: Option<Reply<usize>> },
    /// A broadcast frame for every connection on this shard; replies with the count.
    ToAll { frame: Arc<SharedFrame>, reply: Option<Reply<usize>> },
    /// To a room's owner: online count and last seq.
    RoomInfo { room: RoomName, reply: Reply<RoomInfo> },
    /// From an owner back to a client's shard: its send was refused.
    Refused { conn: u32, code: u32, reason: &'static str },
    /// Close every connection (1001) and stop.
    Stop,
}
