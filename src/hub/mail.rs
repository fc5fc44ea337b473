//! Mail: what crosses between shards (and from the API threads into shards), typed by who
//! receives it. [`OwnerMail`] goes to the shard that owns a room (its mixer, history, lists and
//! attributes); [`HostMail`] goes to a shard that hosts connections (frames to deliver, kicks,
//! replicas, answers). Each shard has one bounded inbox of [`Mail`]; everything in it is owned
//! or reference-counted, never borrowed. A request names where its answer goes: an API
//! thread's reply channel, or a connection ([`ConnAt`]) whose generation a late answer must
//! still match.

use std::sync::Arc;
use std::sync::mpsc::SyncSender;

use super::host::DrainPlan;
use crate::ids::{ConnId, ShardId, UserId};
use crate::proto::Message;
use crate::room::attrs::AttrError;
use crate::room::frames::{Class, SharedFrame};
use crate::room::moderation::{List, ModerationError};
use crate::room::owner::{ModAction, ModerationLists, PublishError, Published, RoomInfo};
use crate::room::{Priority, RoomName};

/// One item in a shard's inbox.
pub enum Mail {
    Owner(OwnerMail),
    Host(HostMail),
}

impl From<OwnerMail> for Mail {
    fn from(m: OwnerMail) -> Mail {
        Mail::Owner(m)
    }
}

impl From<HostMail> for Mail {
    fn from(m: HostMail) -> Mail {
        Mail::Host(m)
    }
}

/// A one-shot answer to a waiting API thread. Sending never blocks (the channel has room for
/// the single answer) and a vanished waiter is ignored.
pub struct Reply<T>(pub SyncSender<T>);

impl<T> Reply<T> {
    pub fn send(self, value: T) {
        let _ = self.0.try_send(value);
    }
}

/// A connection on some shard: where an owner's answer to it goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnAt {
    pub shard: ShardId,
    pub conn: ConnId,
}

/// Where an owner's answer goes.
pub enum Origin<T> {
    /// The business API, waiting.
    Api(Reply<T>),
    /// A client connection (a refusal comes back as an error frame).
    Conn(ConnAt),
}

/// An `ack` frame's fields (the client's id, the room, the seq or the refusal).
pub type AckFrame = crate::proto::Ack;

/// One message of a batch publish: its room, the message, the priority its item named.
pub type BatchItem = (RoomName, Message, Option<Priority>);

/// A room's attribute version and entries, in key order.
pub type AttrsSnapshot = (u64, Vec<(String, Vec<u8>)>);

/// Mail to a room's owner. Every variant names its room; `TopRooms` goes to every shard.
pub enum OwnerMail {
    /// A message for the room's next block from the business API, with the priority its body
    /// named (else the type's default).
    Publish {
        room: RoomName,
        msg: Box<Message>,
        priority: Option<Priority>,
        reply: Reply<Result<Published, PublishError>>,
    },
    /// Many messages for rooms this shard owns, from one batch publish; answered with one
    /// result per item, in order.
    PublishBatch { items: Vec<BatchItem>, reply: Reply<Vec<Result<Published, PublishError>>> },
    /// A signed-in client's `send`, checked by its shard (which chose the priority its type
    /// may ride); the owner checks mute and the room's rate and answers only a refusal.
    Send {
        room: RoomName,
        msg: Box<Message>,
        user: UserId,
        weight: i32,
        priority: Priority,
        from: ConnAt,
        /// The client's id for an `ack` (None: refusals come as error frames, nothing else).
        ack: Option<Box<str>>,
    },
    /// This shard now holds `members` members of the room (`json` of them reading JSON);
    /// `left` of them left since the last report, the first few named.
    Presence {
        room: RoomName,
        from: ShardId,
        members: u32,
        json: u32,
        /// Of them, those that negotiated permessage-deflate, and of those, the ones reading
        /// JSON (the owner compresses only the encodings someone takes compressed).
        deflate: u32,
        deflate_json: u32,
        left: u32,
        left_users: Vec<UserId>,
    },
    /// A connection joined, resuming `after` a seq (0: none); answered with its backfill and
    /// the attribute snapshot.
    Joined { room: RoomName, from: ConnAt, user: Option<UserId>, after: u64 },
    /// A short poll from a connection.
    Poll { room: RoomName, after: u64, limit: usize, from: ConnAt },
    /// A moderation action (then replicated and enforced on every shard).
    Moderate {
        room: RoomName,
        user: UserId,
        action: ModAction,
        reason: Arc<str>,
        origin: Origin<Result<(), ModerationError>>,
    },
    /// Set (Some) or delete (None) an attribute.
    SetAttr { room: RoomName, key: String, value: Option<Vec<u8>>, origin: Origin<Result<u64, AttrError>> },
    /// What a connection at attribute version `after` needs.
    AttrSync { room: RoomName, after: u64, from: ConnAt },
    /// Online count and last seq.
    RoomInfo { room: RoomName, reply: Reply<RoomInfo> },
    /// To every shard: its owned rooms with the most members.
    TopRooms { n: usize, reply: Reply<Vec<(RoomName, u64)>> },
    /// The room's moderation lists.
    ModerationList { room: RoomName, reply: Reply<ModerationLists> },
    /// All attributes and the version.
    Attrs { room: RoomName, reply: Reply<AttrsSnapshot> },
    /// To this shard's owner when a drain starts: cut every room's pending messages into
    /// blocks now, then tell every shard (`HostMail::Flushed`).
    Flush,
    /// To every shard on an upgrade: cut every pending message into blocks, answer with the
    /// owned rooms' state, and refuse every change from then on (the next process continues
    /// the rooms) until `Thaw`.
    Export { reply: Reply<Vec<crate::proto::RoomState>> },
    /// The upgrade failed: this process keeps its rooms and takes changes again.
    Thaw,
    /// From the store: a room's state read from durable storage (None: it could not be read).
    Loaded { room: RoomName, state: Option<Box<crate::proto::RoomState>> },
    /// From the store, in a cluster: another node holds the room's lease (it is moving here,
    /// or the nodes briefly disagree on the live set); the load is tried again.
    Held { room: RoomName },
    /// From the cluster link: renewing the room's lease found another node holding it; this
    /// node stops running the room.
    LeaseLost { room: RoomName },
}

impl OwnerMail {
    /// The connection waiting for an answer to this request, if one is.
    pub fn asker(&self) -> Option<ConnAt> {
        match self {
            OwnerMail::Send { from, .. }
            | OwnerMail::Joined { from, .. }
            | OwnerMail::Poll { from, .. }
            | OwnerMail::AttrSync { from, .. } => Some(*from),
            OwnerMail::Moderate { origin, .. } => origin.conn(),
            OwnerMail::SetAttr { origin, .. } => origin.conn(),
            OwnerMail::Publish { .. }
            | OwnerMail::PublishBatch { .. }
            | OwnerMail::Presence { .. }
            | OwnerMail::RoomInfo { .. }
            | OwnerMail::TopRooms { .. }
            | OwnerMail::ModerationList { .. }
            | OwnerMail::Attrs { .. }
            | OwnerMail::Flush
            | OwnerMail::Export { .. }
            | OwnerMail::Thaw
            | OwnerMail::Loaded { .. }
            | OwnerMail::Held { .. }
            | OwnerMail::LeaseLost { .. } => None,
        }
    }
}

impl<T> Origin<T> {
    fn conn(&self) -> Option<ConnAt> {
        match self {
            Origin::Api(_) => None,
            Origin::Conn(at) => Some(*at),
        }
    }
}

/// Mail to a shard hosting connections.
pub enum HostMail {
    /// From a room's owner: a frame (block or attribute delta) for the room's members here.
    Deliver { room: RoomName, frame: Arc<SharedFrame> },
    /// Frames for one connection if it is still in `room` (backfill, attribute sync).
    ToConn { room: RoomName, conn: ConnId, frames: Vec<Arc<SharedFrame>> },
    /// A direct frame for every connection of a user here; replies with the count.
    ToUser { user: UserId, frame: Arc<SharedFrame>, reply: Option<Reply<usize>> },
    /// A broadcast frame for every connection here; replies with the count.
    ToAll { frame: Arc<SharedFrame>, reply: Option<Reply<usize>> },
    /// From a room's owner: close the user's connections in the room.
    Kick { room: RoomName, user: UserId, reason: Arc<str> },
    /// From a room's owner: keep this ban or whitelist entry (or drop it).
    Replicate { room: RoomName, user: UserId, list: List, until_ms: Option<i64>, add: bool },
    /// The owner's answer to a short poll: status and JSON body.
    PollAnswer { conn: ConnId, status: u16, body: Arc<[u8]> },
    /// The answer to a connection's acknowledged `send`: the seq its message got, or why not.
    Ack { conn: ConnId, ack: AckFrame },
    /// A business hook's verdict on a call this shard made (see `hooks`).
    Hook(Box<crate::hooks::call::Verdict>),
    /// A connection's request was refused (by its room's owner, or because the way there is
    /// congested).
    Refused { conn: ConnId, code: u32, reason: &'static str },
    /// New TLS certificates (SIGHUP): handshakes from now on use them; established
    /// connections keep their keys.
    TlsConfig(std::sync::Arc<rustls::ServerConfig>),
    /// Start draining (see `host::drain`): accept nothing more, then reconnect every
    /// connection in waves.
    Drain(DrainPlan),
    /// An owner has cut its rooms' pending messages into blocks (mailed before this).
    Flushed,
    /// Another node's view of the live set changed: every room here reports its members to
    /// its owner again (a report made while the views differed may have gone astray).
    Resync,
    /// Close every connection (1001) and stop.
    Stop,
}

impl HostMail {
    /// The class of a block delivery: the only mail that may be shed (by the post office,
    /// when the way to its shard stays congested). None for everything else.
    pub fn delivery_class(&self) -> Option<Class> {
        match self {
            HostMail::Deliver { frame, .. } => Some(frame.class),
            HostMail::ToConn { .. }
            | HostMail::ToUser { .. }
            | HostMail::ToAll { .. }
            | HostMail::Kick { .. }
            | HostMail::Replicate { .. }
            | HostMail::PollAnswer { .. }
            | HostMail::Refused { .. }
            | HostMail::Ack { .. }
            | HostMail::Hook(_)
            | HostMail::TlsConfig(_)
            | HostMail::Drain(_)
            | HostMail::Flushed
            | HostMail::Resync
            | HostMail::Stop => None,
        }
    }
}
