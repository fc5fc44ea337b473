//! What a room's owner asks of durable storage (`store/`, Redis), as plain data: the owner and
//! its desk produce these, the shard hands them to the store's threads, and nothing here does
//! any I/O. Writes are idempotent (a retried batch changes nothing twice).

use super::RoomName;
use super::moderation::List;
use crate::ids::ShardId;
use crate::proto::Message;

/// One request to the store.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreOp {
    /// A block was cut: its messages (each with its seq and server time), the room's seqs, and
    /// whether the room has state of its own (`kept`; presence events alone do not make it).
    Block { room: RoomName, messages: Vec<Message>, base_seq: u64, last_seq: u64, evicted_seq: u64, kept: bool },
    /// An attribute set (Some) or deleted (None) at `version`.
    Attr { room: RoomName, version: u64, key: String, value: Option<Vec<u8>> },
    /// A moderation entry added (until a time, or until lifted) or lifted.
    Moderation { room: RoomName, list: List, user: String, until_ms: Option<i64>, add: bool },
    /// Read a room's state; the answer comes back as `OwnerMail::Loaded` to `owner`. In a
    /// cluster the room's lease is taken first (`OwnerMail::Held` while another node has it).
    Load { room: RoomName, owner: ShardId },
    /// In a cluster: this node no longer runs the room; its lease is given up once the writes
    /// before this one are in (the next owner loads what they wrote).
    Release { room: RoomName },
}

impl StoreOp {
    /// The room it is about.
    pub fn room(&self) -> &RoomName {
        match self {
            StoreOp::Block { room, .. }
            | StoreOp::Attr { room, .. }
            | StoreOp::Moderation { room, .. }
            | StoreOp::Load { room, .. }
            | StoreOp::Release { room } => room,
        }
    }
}
