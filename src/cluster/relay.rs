//! What nodes say to each other over Redis pub/sub, as protobuf (prost) messages, and the
//! conversions between them and the hub's mail. Sans-IO: the link (`link.rs`) moves the bytes.
//!
//! Three kinds of channel carry them:
//! - a node's own channel (`P{cluster}:node:ID`): requests for the rooms it owns (publishes,
//!   sends, presence, joins, polls, moderation, attributes, room queries) and the answers to
//!   the requests it forwarded;
//! - a room's channel (`P{room}:blocks`): the owner's frames, the same bytes every node hands
//!   to its members (encoded once, cluster-wide); nodes with members there subscribe;
//! - the cluster channel (`P{cluster}:all`): kicks, ban and whitelist replicas, direct and
//!   broadcast frames, and "report again" (a node's view of the live set changed), for every
//!   node.
#![forbid(unsafe_code)]

use crate::proto;
use crate::room::attrs::AttrError;
use crate::room::frames::{Class, SharedFrame};
use crate::room::moderation::{Entry, List, ModerationError};
use crate::room::owner::{ModAction, ModerationLists, PublishError};
use crate::room::{Priority, RoomName};

/// Room names from a peer are checked again, against this generous bound.
const NAME_BYTES_MAX: usize = 1_024;

/// One relayed message: who sent it, and what.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Relay {
    /// The sending node's id.
    #[prost(string, tag = "1")]
    pub from: String,
    #[prost(oneof = "Body", tags = "2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 21, 22, 23")]
    pub body: Option<Body>,
    /// Nodes a request passed that did not own its room (their views of the set differed).
    #[prost(uint32, tag = "20")]
    pub hops: u32,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Body {
    // To a room's owner node.
    #[prost(message, tag = "2")]
    Publish(Publish),
    #[prost(message, tag = "3")]
    Send(Send),
    #[prost(message, tag = "4")]
    Presence(Presence),
    #[prost(message, tag = "5")]
    Joined(Joined),
    #[prost(message, tag = "6")]
    Poll(Poll),
    #[prost(message, tag = "7")]
    AttrSync(AttrSync),
    #[prost(message, tag = "8")]
    Moderate(Moderate),
    #[prost(message, tag = "9")]
    SetAttr(SetAttr),
    #[prost(message, tag = "10")]
    Query(Query),
    // Back to the asking node.
    #[prost(message, tag = "11")]
    Answer(Answer),
    #[prost(message, tag = "12")]
    ToConn(ToConn),
    #[prost(message, tag = "13")]
    PollAnswer(PollAnswer),
    #[prost(message, tag = "14")]
    Refused(Refused),
    // On a room's channel.
    #[prost(message, tag = "15")]
    Frame(Frame),
    // On the cluster channel.
    #[prost(message, tag = "16")]
    Kick(Kick),
    #[prost(message, tag = "17")]
    Replicate(Replicate),
    #[prost(message, tag = "18")]
    ToUser(ToUser),
    #[prost(message, tag = "19")]
    ToAll(ToAll),
    // To the owner node of every room in it.
    #[prost(message, tag = "21")]
    PublishBatch(PublishBatch),
    // Back to the asking node: an acknowledged send's ack.
    #[prost(message, tag = "22")]
    Ack(AckTo),
    // On the cluster channel: the sender's view of the live set changed.
    #[prost(message, tag = "23")]
    Resync(Resync),
}

/// "Report your members to their rooms' owners again, and replicate your rooms' lists again":
/// sent by a node whose view of the live set changed or whose subscriber is (again)
/// subscribed. Nodes see a change at different times, and a presence report that reached a
/// node while its view was older went to the room's old owner (gone with a dead node); the
/// new owner's view changing last is the moment everyone's reports reach it. A node that
/// joins, or whose subscriber was away, missed bans set meanwhile.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Resync {}

/// An `ack` frame for a connection on the asking node.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AckTo {
    #[prost(message, optional, tag = "1")]
    pub ack: Option<proto::Ack>,
    #[prost(message, optional, tag = "2")]
    pub asker: Option<Asker>,
}

/// Who waits for the answer on the asking node: an API call (`req`, not 0) or a connection.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Asker {
    #[prost(uint64, tag = "1")]
    pub req: u64,
    #[prost(uint32, tag = "2")]
    pub shard: u32,
    #[prost(uint32, tag = "3")]
    pub key: u32,
    #[prost(uint32, tag = "4")]
    pub generation: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Publish {
    #[prost(string, tag = "1")]
    pub room: String,
    #[prost(message, optional, tag = "2")]
    pub msg: Option<proto::Message>,
    /// `priority_code`, or -1: the type's default.
    #[prost(int32, tag = "3")]
    pub priority: i32,
    #[prost(message, optional, tag = "4")]
    pub asker: Option<Asker>,
}

/// A batch publish's items for rooms one node owns (their `asker` fields unused), answered with
/// one result per item in order (`Answer.results`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct PublishBatch {
    #[prost(message, repeated, tag = "1")]
    pub items: Vec<Publish>,
    #[prost(message, optional, tag = "2")]
    pub asker: Option<Asker>,
}

/// One item's result in a batch's answer: its id, or its refusal.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ItemResult {
    #[prost(uint32, optional, tag = "1")]
    pub error: Option<u32>,
    #[prost(uint64, tag = "2")]
    pub id: u64,
    #[prost(bool, tag = "3")]
    pub coalesced: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Send {
    #[prost(string, tag = "1")]
    pub room: String,
    #[prost(message, optional, tag = "2")]
    pub msg: Option<proto::Message>,
    #[prost(string, tag = "3")]
    pub user: String,
    #[prost(int32, tag = "4")]
    pub weight: i32,
    #[prost(int32, tag = "5")]
    pub priority: i32,
    #[prost(message, optional, tag = "6")]
    pub asker: Option<Asker>,
    /// The client's id for an `ack` ("": none).
    #[prost(string, tag = "7")]
    pub ack: String,
}

/// One shard's members in a room.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Presence {
    #[prost(string, tag = "1")]
    pub room: String,
    #[prost(uint32, tag = "2")]
    pub shard: u32,
    #[prost(uint32, tag = "3")]
    pub members: u32,
    #[prost(uint32, tag = "4")]
    pub json: u32,
    #[prost(uint32, tag = "5")]
    pub left: u32,
    #[prost(string, repeated, tag = "6")]
    pub left_users: Vec<String>,
    /// Of the members, those that negotiated permessage-deflate, and of those, the ones
    /// reading JSON.
    #[prost(uint32, tag = "7")]
    pub deflate: u32,
    #[prost(uint32, tag = "8")]
    pub deflate_json: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Joined {
    #[prost(string, tag = "1")]
    pub room: String,
    #[prost(string, optional, tag = "2")]
    pub user: Option<String>,
    #[prost(uint64, tag = "3")]
    pub after: u64,
    #[prost(message, optional, tag = "4")]
    pub asker: Option<Asker>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Poll {
    #[prost(string, tag = "1")]
    pub room: String,
    #[prost(uint64, tag = "2")]
    pub after: u64,
    #[prost(uint32, tag = "3")]
    pub limit: u32,
    #[prost(message, optional, tag = "4")]
    pub asker: Option<Asker>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct AttrSync {
    #[prost(string, tag = "1")]
    pub room: String,
    #[prost(uint64, tag = "2")]
    pub after: u64,
    #[prost(message, optional, tag = "3")]
    pub asker: Option<Asker>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Moderate {
    #[prost(string, tag = "1")]
    pub room: String,
    #[prost(string, tag = "2")]
    pub user: String,
    /// `action_code`.
    #[prost(uint32, tag = "3")]
    pub action: u32,
    #[prost(int64, optional, tag = "4")]
    pub until_ms: Option<i64>,
    #[prost(string, tag = "5")]
    pub reason: String,
    #[prost(message, optional, tag = "6")]
    pub asker: Option<Asker>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SetAttr {
    #[prost(string, tag = "1")]
    pub room: String,
    #[prost(string, tag = "2")]
    pub key: String,
    /// None deletes.
    #[prost(bytes = "vec", optional, tag = "3")]
    pub value: Option<Vec<u8>>,
    #[prost(message, optional, tag = "4")]
    pub asker: Option<Asker>,
}

/// A read of the owner's state for the API.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Query {
    #[prost(string, tag = "1")]
    pub room: String,
    /// `QUERY_INFO`, `QUERY_LISTS` or `QUERY_ATTRS`.
    #[prost(uint32, tag = "2")]
    pub kind: u32,
    #[prost(message, optional, tag = "3")]
    pub asker: Option<Asker>,
}

pub const QUERY_INFO: u32 = 0;
pub const QUERY_LISTS: u32 = 1;
pub const QUERY_ATTRS: u32 = 2;
/// The node's owned rooms with the most members (`Query.room` holds how many).
pub const QUERY_TOP: u32 = 3;

/// The answer to an API call, flat: the asking node knows which fields its call reads.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Answer {
    #[prost(uint64, tag = "1")]
    pub req: u64,
    /// The refusal (`*_error_code`), if refused.
    #[prost(uint32, optional, tag = "2")]
    pub error: Option<u32>,
    #[prost(uint64, tag = "3")]
    pub id: u64,
    #[prost(bool, tag = "4")]
    pub coalesced: bool,
    #[prost(uint64, tag = "5")]
    pub online: u64,
    #[prost(uint64, tag = "6")]
    pub last_seq: u64,
    #[prost(uint64, tag = "7")]
    pub pending: u64,
    /// An attribute version (set, or the snapshot's).
    #[prost(uint64, tag = "8")]
    pub version: u64,
    #[prost(message, repeated, tag = "9")]
    pub entries: Vec<ListEntry>,
    #[prost(message, repeated, tag = "10")]
    pub attrs: Vec<proto::AttrEntry>,
    #[prost(message, repeated, tag = "11")]
    pub rooms: Vec<RoomCount>,
    #[prost(message, repeated, tag = "12")]
    pub results: Vec<ItemResult>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RoomCount {
    #[prost(string, tag = "1")]
    pub room: String,
    #[prost(uint64, tag = "2")]
    pub online: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ListEntry {
    #[prost(uint32, tag = "1")]
    pub list: u32,
    #[prost(string, tag = "2")]
    pub user: String,
    #[prost(int64, optional, tag = "3")]
    pub until_ms: Option<i64>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ToConn {
    #[prost(string, tag = "1")]
    pub room: String,
    #[prost(message, repeated, tag = "2")]
    pub frames: Vec<Frame>,
    #[prost(message, optional, tag = "3")]
    pub asker: Option<Asker>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PollAnswer {
    #[prost(uint32, tag = "1")]
    pub status: u32,
    #[prost(bytes = "vec", tag = "2")]
    pub body: Vec<u8>,
    #[prost(message, optional, tag = "3")]
    pub asker: Option<Asker>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Refused {
    #[prost(uint32, tag = "1")]
    pub code: u32,
    #[prost(string, tag = "2")]
    pub reason: String,
    #[prost(message, optional, tag = "3")]
    pub asker: Option<Asker>,
}

/// A frame as encoded by its owner: both wire formats' bytes, sent on as they are.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Frame {
    /// The room it is for ("" for direct and broadcast frames).
    #[prost(string, tag = "1")]
    pub room: String,
    #[prost(uint32, tag = "2")]
    pub class: u32,
    #[prost(bytes = "vec", tag = "3")]
    pub proto: Vec<u8>,
    #[prost(bytes = "vec", optional, tag = "4")]
    pub json: Option<Vec<u8>>,
    /// The permessage-deflate twins, when the owner made them.
    #[prost(bytes = "vec", optional, tag = "5")]
    pub proto_z: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "6")]
    pub json_z: Option<Vec<u8>>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Kick {
    #[prost(string, tag = "1")]
    pub room: String,
    #[prost(string, tag = "2")]
    pub user: String,
    #[prost(string, tag = "3")]
    pub reason: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Replicate {
    #[prost(string, tag = "1")]
    pub room: String,
    #[prost(string, tag = "2")]
    pub user: String,
    #[prost(uint32, tag = "3")]
    pub list: u32,
    #[prost(int64, optional, tag = "4")]
    pub until_ms: Option<i64>,
    #[prost(bool, tag = "5")]
    pub add: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ToUser {
    #[prost(string, tag = "1")]
    pub user: String,
    #[prost(message, optional, tag = "2")]
    pub frame: Option<Frame>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ToAll {
    #[prost(message, optional, tag = "1")]
    pub frame: Option<Frame>,
}

/// Channel names under a key prefix (pub/sub channels are not keys, but share the prefix so
/// that several clusters can share one Redis).
pub struct Channels {
    prefix: String,
}

impl Channels {
    pub fn new(prefix: &str) -> Channels {
        Channels { prefix: prefix.to_owned() }
    }

    pub fn node(&self, id: &str) -> String {
        format!("{}{{cluster}}:node:{id}", self.prefix)
    }

    pub fn all(&self) -> String {
        format!("{}{{cluster}}:all", self.prefix)
    }

    pub fn room(&self, room: &str) -> String {
        format!("{}{{{room}}}:blocks", self.prefix)
    }

    /// The room a room channel is for.
    pub fn room_of<'a>(&self, channel: &'a str) -> Option<&'a str> {
        channel.strip_prefix(&self.prefix)?.strip_prefix('{')?.strip_suffix("}:blocks")
    }
}

pub fn room(name: &str) -> Option<RoomName> {
    RoomName::parse(name, NAME_BYTES_MAX).ok()
}

pub fn frame_out(room: &str, f: &SharedFrame) -> Frame {
    Frame {
        room: room.to_owned(),
        class: f.class as u32,
        proto: f.proto.to_vec(),
        json: f.json.as_ref().map(|j| j.to_vec()),
        proto_z: f.proto_z.as_ref().map(|z| z.to_vec()),
        json_z: f.json_z.as_ref().map(|z| z.to_vec()),
    }
}

/// The owner's frame again, byte for byte.
pub fn frame_in(f: Frame) -> SharedFrame {
    let class = match f.class {
        0 => Class::Low,
        1 => Class::High,
        _ => Class::Keep,
    };
    SharedFrame {
        proto: f.proto.into_boxed_slice(),
        json: f.json.map(Vec::into_boxed_slice),
        proto_z: f.proto_z.map(Vec::into_boxed_slice),
        json_z: f.json_z.map(Vec::into_boxed_slice),
        class,
    }
}

pub fn priority_code(p: Option<Priority>) -> i32 {
    match p {
        None => -1,
        Some(Priority::Low) => 0,
        Some(Priority::High) => 1,
        Some(Priority::Whitelist) => 2,
    }
}

pub fn priority(code: i32) -> Option<Priority> {
    match code {
        0 => Some(Priority::Low),
        1 => Some(Priority::High),
        2 => Some(Priority::Whitelist),
        _ => None,
    }
}

pub fn list_code(l: List) -> u32 {
    match l {
        List::Mute => 0,
        List::Ban => 1,
        List::Whitelist => 2,
    }
}

pub fn list(code: u32) -> Option<List> {
    match code {
        0 => Some(List::Mute),
        1 => Some(List::Ban),
        2 => Some(List::Whitelist),
        _ => None,
    }
}

/// A moderation action as (code, until).
pub fn action_code(a: ModAction) -> (u32, Option<i64>) {
    match a {
        ModAction::Kick => (0, None),
        ModAction::Mute { until_ms } => (1, until_ms),
        ModAction::Unmute => (2, None),
        ModAction::Ban { until_ms } => (3, until_ms),
        ModAction::Unban => (4, None),
        ModAction::Whitelist => (5, None),
        ModAction::Unwhitelist => (6, None),
    }
}

pub fn action(code: u32, until_ms: Option<i64>) -> Option<ModAction> {
    Some(match code {
        0 => ModAction::Kick,
        1 => ModAction::Mute { until_ms },
        2 => ModAction::Unmute,
        3 => ModAction::Ban { until_ms },
        4 => ModAction::Unban,
        5 => ModAction::Whitelist,
        6 => ModAction::Unwhitelist,
        _ => return None,
    })
}

const PUBLISH_ERRORS: [PublishError; 5] = [
    PublishError::Backlog,
    PublishError::RoomsFull,
    PublishError::RateLimited,
    PublishError::Muted,
    PublishError::HandedOver,
];
const MODERATION_ERRORS: [ModerationError; 5] = [
    ModerationError::Full,
    ModerationError::UserTooLong,
    ModerationError::EmptyUser,
    ModerationError::Busy,
    ModerationError::HandedOver,
];
const ATTR_ERRORS: [AttrError; 5] =
    [AttrError::TooManyKeys, AttrError::KeyTooLong, AttrError::BadKey, AttrError::ValueTooLarge, AttrError::HandedOver];

pub fn publish_error_code(e: PublishError) -> u32 {
    PUBLISH_ERRORS.iter().position(|x| *x == e).unwrap_or(0) as u32
}

/// An unknown code reads as "retry" (a newer peer's refusal).
pub fn publish_error(code: u32) -> PublishError {
    PUBLISH_ERRORS.get(code as usize).copied().unwrap_or(PublishError::HandedOver)
}

pub fn moderation_error_code(e: ModerationError) -> u32 {
    MODERATION_ERRORS.iter().position(|x| *x == e).unwrap_or(0) as u32
}

pub fn moderation_error(code: u32) -> ModerationError {
    MODERATION_ERRORS.get(code as usize).copied().unwrap_or(ModerationError::Busy)
}

pub fn attr_error_code(e: AttrError) -> u32 {
    ATTR_ERRORS.iter().position(|x| *x == e).unwrap_or(0) as u32
}

pub fn attr_error(code: u32) -> AttrError {
    ATTR_ERRORS.get(code as usize).copied().unwrap_or(AttrError::HandedOver)
}

/// A refusal's reason as one of the texts this build knows (error frames carry static text).
pub fn known_reason(reason: &str) -> &'static str {
    let known = PUBLISH_ERRORS
        .iter()
        .map(|e| e.code().1)
        .chain(MODERATION_ERRORS.iter().map(|e| e.message()))
        .chain(ATTR_ERRORS.iter().map(|e| e.message()));
    for k in known {
        if k == reason {
            return k;
        }
    }
    "refused by the room's owner node"
}

pub fn lists_out(l: &ModerationLists) -> Vec<ListEntry> {
    let each = |list: List, entries: &[Entry]| -> Vec<ListEntry> {
        entries
            .iter()
            .map(|e| ListEntry { list: list_code(list), user: e.user.clone(), until_ms: e.until_ms })
            .collect()
    };
    let mut out = each(List::Mute, &l.mutes);
    out.extend(each(List::Ban, &l.bans));
    out.extend(each(List::Whitelist, &l.whitelist));
    out
}

pub fn lists_in(entries: Vec<ListEntry>) -> ModerationLists {
    let mut l = ModerationLists::default();
    for e in entries {
        let entry = Entry { user: e.user, until_ms: e.until_ms };
        match list(e.list) {
            Some(List::Mute) => l.mutes.push(entry),
            Some(List::Ban) => l.bans.push(entry),
            Some(List::Whitelist) => l.whitelist.push(entry),
            None => {}
        }
    }
    l
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    #[test]
    fn frames_cross_byte_for_byte() {
        let mut f = SharedFrame::plain(vec![0x82, 1, 2].into(), Some(b"{}".to_vec().into()), Class::High);
        f.proto_z = Some(vec![0xC2, 1, 9].into());
        let relay = Relay { from: "a".into(), body: Some(Body::Frame(frame_out("r", &f))), hops: 0 };
        let back = Relay::decode(relay.encode_to_vec().as_slice()).unwrap();
        let Some(Body::Frame(frame)) = back.body else { panic!("not a frame") };
        assert_eq!(frame.room, "r");
        let g = frame_in(frame);
        assert_eq!((&g.proto, &g.json, g.class), (&f.proto, &f.json, f.class));
        assert_eq!((&g.proto_z, &g.json_z), (&f.proto_z, &None), "the compressed twins cross too");
    }

    #[test]
    fn codes_round_trip() {
        for e in PUBLISH_ERRORS {
            assert_eq!(publish_error(publish_error_code(e)), e);
            assert_eq!(known_reason(e.code().1), e.code().1);
        }
        for e in MODERATION_ERRORS {
            assert_eq!(moderation_error(moderation_error_code(e)), e);
        }
        for e in ATTR_ERRORS {
            assert_eq!(attr_error(attr_error_code(e)), e);
        }
        for p in [None, Some(Priority::Low), Some(Priority::High), Some(Priority::Whitelist)] {
            assert_eq!(priority(priority_code(p)), p);
        }
        let actions = [
            ModAction::Kick,
            ModAction::Mute { until_ms: Some(5) },
            ModAction::Unmute,
            ModAction::Ban { until_ms: None },
            ModAction::Unban,
            ModAction::Whitelist,
            ModAction::Unwhitelist,
        ];
        for a in actions {
            let (c, u) = action_code(a);
            assert_eq!(action(c, u), Some(a));
        }
        assert_eq!(action(99, None), None);
        assert_eq!(known_reason("something new"), "refused by the room's owner node");
        let lists = ModerationLists {
            mutes: vec![Entry { user: "m".into(), until_ms: Some(9) }],
            bans: vec![Entry { user: "b".into(), until_ms: None }],
            whitelist: vec![],
        };
        assert_eq!(lists_in(lists_out(&lists)), lists);
    }

    #[test]
    fn channel_names_carry_the_room() {
        let c = Channels::new("p:");
        assert_eq!(c.room("live:1"), "p:{live:1}:blocks");
        assert_eq!(c.room_of(&c.room("live:1")), Some("live:1"));
        assert_eq!(c.room_of(&c.all()), None);
        assert_eq!(c.node("n1"), "p:{cluster}:node:n1");
    }
}
