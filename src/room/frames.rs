//! Frames a room owner sends to many connections — blocks, backfill, attribute snapshots and
//! deltas, direct and broadcast messages — each encoded once per wire format into a
//! `SharedFrame` that every member's queue references.

use crate::envelope::{self, Format};
use crate::ids::UnixMs;
use crate::proto::{AttrEntry, Attrs, Block, Message, ServerFrame, server_frame};

use super::attrs::{AttrLog, Change, Since};
use super::{Priority, RoomName};

/// How much a queued frame matters to a slow reader: lower classes are dropped first, `Keep`
/// frames never (a reader that cannot take them is closed instead).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Class {
    /// Only low-priority messages.
    Low = 0,
    /// At least one high-priority message.
    High = 1,
    /// Whitelist messages, attribute changes, control frames: never dropped.
    Keep = 2,
}

impl From<Priority> for Class {
    /// The class of a frame whose most important message has this priority.
    fn from(top: Priority) -> Class {
        match top {
            Priority::Whitelist => Class::Keep,
            Priority::High => Class::High,
            Priority::Low => Class::Low,
        }
    }
}

/// What a block frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockKind {
    /// Newly cut messages; `top` is the highest priority among them.
    Live { top: Priority },
    /// History for a joining client: never shed (it is what the client missed); `truncated`
    /// when a resuming client's cursor is older than the history kept.
    Backfill { truncated: bool },
}

/// How a connection reads shared frames: its wire format, and whether it negotiated
/// permessage-deflate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wire {
    pub format: Format,
    pub deflate: bool,
}

/// permessage-deflate for a room's blocks: some member negotiated it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deflate {
    pub level: u32,
    /// Smaller payloads go uncompressed.
    pub min_bytes: usize,
}

/// Which encodings of a block have members that take them compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Zipped {
    pub proto: bool,
    pub json: bool,
}

/// A frame fanned out to many connections: encoded once, shared by reference.
#[derive(Debug)]
pub struct SharedFrame {
    /// The whole WebSocket frame for `barrage.v1.proto` connections.
    pub proto: Box<[u8]>,
    /// The same frame for `barrage.v1.json` connections, when any may need it.
    pub json: Option<Box<[u8]>>,
    /// Their permessage-deflate twins (RSV1 set, payload deflated without context), when a
    /// member negotiated it and the payload was worth compressing.
    pub proto_z: Option<Box<[u8]>>,
    pub json_z: Option<Box<[u8]>>,
    pub class: Class,
}

impl SharedFrame {
    /// Encodes a server frame for protobuf, and for JSON when `json`.
    pub fn encode(frame: &ServerFrame, json: bool, class: Class) -> SharedFrame {
        SharedFrame::plain(
            envelope::encode(frame, Format::Proto).into_boxed_slice(),
            json.then(|| envelope::encode(frame, Format::Json).into_boxed_slice()),
            class,
        )
    }

    /// Frames already encoded, without compressed twins.
    pub fn plain(proto: Box<[u8]>, json: Option<Box<[u8]>>, class: Class) -> SharedFrame {
        SharedFrame { proto, json, proto_z: None, json_z: None, class }
    }

    /// Adds the compressed twin of each encoding some member takes compressed (where it pays).
    pub fn compress(&mut self, d: Deflate, zipped: Zipped) {
        let z = |f: &[u8]| crate::wire::deflate::compress_frame(f, d.level, d.min_bytes).map(Vec::into_boxed_slice);
        self.json_z = self.json.as_deref().filter(|_| zipped.json).and_then(z);
        self.proto_z = Some(&self.proto[..]).filter(|_| zipped.proto).and_then(z);
    }

    /// The bytes for a connection of this format, if encoded: compressed when it negotiated
    /// permessage-deflate and there is a compressed twin.
    pub fn bytes(&self, wire: Wire) -> Option<&[u8]> {
        let (plain, z) = match wire.format {
            Format::Proto => (Some(&self.proto), &self.proto_z),
            Format::Json => (self.json.as_ref(), &self.json_z),
        };
        match z {
            Some(z) if wire.deflate => Some(z),
            _ => plain.map(|b| &b[..]),
        }
    }
}

fn server(frame: server_frame::Frame) -> ServerFrame {
    ServerFrame { frame: Some(frame) }
}

/// A block of newly cut messages, or of history for a joining client.
pub fn block(
    room: &RoomName,
    messages: Vec<Message>,
    kind: BlockKind,
    online: u64,
    now: UnixMs,
    json: bool,
) -> SharedFrame {
    block_keeping(room, messages, kind, online, now, json, None).0
}

/// `block`, handing the messages back once encoded (the owner keeps them in the history
/// without copying them).
pub fn block_keeping(
    room: &RoomName,
    messages: Vec<Message>,
    kind: BlockKind,
    online: u64,
    now: UnixMs,
    json: bool,
    deflate: Option<(Deflate, Zipped)>,
) -> (SharedFrame, Vec<Message>) {
    let (class, backfill, truncated) = match kind {
        BlockKind::Live { top } => (Class::from(top), false, false),
        BlockKind::Backfill { truncated } => (Class::Keep, true, truncated),
    };
    let block = Block {
        room: room.as_str().to_owned(),
        first_seq: messages.first().map_or(0, |m| m.seq),
        last_seq: messages.last().map_or(0, |m| m.seq),
        messages,
        online,
        server_ms: now.0,
        backfill,
        truncated,
    };
    let frame = server(server_frame::Frame::Block(block));
    let mut shared = SharedFrame::encode(&frame, json, class);
    if let Some((d, zipped)) = deflate {
        shared.compress(d, zipped);
    }
    let messages = match frame.frame {
        Some(server_frame::Frame::Block(b)) => b.messages,
        _ => Vec::new(),
    };
    (shared, messages)
}

/// A full snapshot of a room's attributes.
pub fn attrs_snapshot(room: &RoomName, log: &AttrLog, json: bool) -> SharedFrame {
    let entries =
        log.snapshot().map(|(k, v)| AttrEntry { key: k.to_owned(), value: v.to_vec(), deleted: false }).collect();
    let attrs =
        Attrs { room: room.as_str().to_owned(), version: log.version(), from_version: 0, snapshot: true, entries };
    SharedFrame::encode(&server(server_frame::Frame::Attrs(attrs)), json, Class::Keep)
}

/// What a client at version `from` needs: the changes since, or a snapshot; None if current.
pub fn attrs_since(room: &RoomName, log: &AttrLog, from: u64, json: bool) -> Option<SharedFrame> {
    match log.since(from) {
        Since::UpToDate => None,
        Since::Snapshot => Some(attrs_snapshot(room, log, json)),
        Since::Delta(changes) => {
            let attrs = Attrs {
                room: room.as_str().to_owned(),
                version: log.version(),
                from_version: from,
                snapshot: false,
                entries: changes.into_iter().map(entry).collect(),
            };
            Some(SharedFrame::encode(&server(server_frame::Frame::Attrs(attrs)), json, Class::Keep))
        }
    }
}

fn entry(c: &Change) -> AttrEntry {
    match &c.value {
        Some(v) => AttrEntry { key: c.key.clone(), value: v.clone(), deleted: false },
        None => AttrEntry { key: c.key.clone(), value: Vec::new(), deleted: true },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_takes_the_class_of_its_most_important_message() {
        assert_eq!(Class::from(Priority::Low), Class::Low);
        assert_eq!(Class::from(Priority::High), Class::High);
        assert_eq!(Class::from(Priority::Whitelist), Class::Keep);
        assert!(Class::Low < Class::High && Class::High < Class::Keep);
        let room = RoomName::parse("r", 8).unwrap();
        let live = block(&room, Vec::new(), BlockKind::Live { top: Priority::High }, 0, UnixMs(0), false);
        assert_eq!(live.class, Class::High);
        let backfill = BlockKind::Backfill { truncated: false };
        assert_eq!(block(&room, Vec::new(), backfill, 0, UnixMs(0), false).class, Class::Keep);
    }
}
