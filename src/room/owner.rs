//! The rooms one shard owns: each room's mixer, how many members every shard holds in it
//! (reported by the shards), and the block tick that cuts each dirty room's block, encodes it
//! once per wire format and says which shards must receive that one shared frame. Sans-IO: time
//! comes in as arguments, frames go out through a callback.

use std::collections::HashMap;
use std::sync::Arc;

use super::RoomName;
use super::mixer::{Cut, Mixer, MixerLimits, Refused};
use crate::envelope::{self, Format};
use crate::ids::{ShardId, UnixMs};
use crate::proto::{Block, Message, ServerFrame, server_frame};

/// A frame fanned out to many connections: encoded once, shared by reference.
#[derive(Debug)]
pub struct SharedFrame {
    /// The whole WebSocket frame for `barrage.v1.proto` connections.
    pub proto: Box<[u8]>,
    /// The same frame for `barrage.v1.json` connections, when any may need it.
    pub json: Option<Box<[u8]>>,
    /// Holds whitelist messages: a slow consumer never loses it before lower frames.
    pub whitelist: bool,
}

impl SharedFrame {
    /// Encodes a server frame for both formats (or only protobuf when no JSON reader exists).
    pub fn encode(frame: &ServerFrame, json: bool, whitelist: bool) -> SharedFrame {
        SharedFrame {
            proto: envelope::encode(frame, Format::Proto).into_boxed_slice(),
            json: json.then(|| envelope::encode(frame, Format::Json).into_boxed_slice()),
            whitelist,
        }
    }

    /// The bytes for a connection of this format, if encoded.
    pub fn bytes(&self, format: Format) -> Option<&[u8]> {
        match format {
            Format::Proto => Some(&self.proto),
            Format::Json => self.json.as_deref(),
        }
    }
}

/// Bounds and identity of one shard's owner table.
#[derive(Clone, Copy, Debug)]
pub struct OwnerConfig {
    pub shard: ShardId,
    pub shards: usize,
    pub limits: MixerLimits,
    pub rooms_max: usize,
    /// An owned room with no members and nothing pending is forgotten after this long.
    pub room_idle_ms: i64,
}

/// Why a publish was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PublishError {
    /// The room's pending backlog is full.
    Backlog,
    /// The node tracks `rooms_max` rooms already.
    RoomsFull,
}

/// Receives each cut block: the room, its one shared frame, and members per shard.
pub type Deliver<'a> = dyn FnMut(&RoomName, &Arc<SharedFrame>, &[u32]) + 'a;

/// A room as its owner sees it.
pub struct RoomInfo {
    pub online: u64,
    pub last_seq: u64,
    pub pending: usize,
}

/// What one tick did, for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TickStats {
    pub blocks: u64,
    pub messages: u64,
    pub dropped_overflow: u64,
}

struct OwnedRoom {
    mixer: Mixer,
    /// Members per shard, and how many of them read JSON.
    members: Box<[u32]>,
    json: Box<[u32]>,
    dirty: bool,
    last_active: UnixMs,
}

impl OwnedRoom {
    fn online(&self) -> u64 {
        self.members.iter().map(|&n| u64::from(n)).sum()
    }
}

/// The rooms owned by one shard.
pub struct Owner {
    config: OwnerConfig,
    rooms: HashMap<RoomName, OwnedRoom>,
    /// Rooms with pending messages: a tick visits only these.
    dirty: Vec<RoomName>,
    next_id: u64,
}

/// Seqs of a room start at (creation Unix seconds) << 20 and count up, so they keep increasing
/// across restarts and forgotten rooms (fewer than 2^20 messages a second), and stay below 2^53
/// (exact in JavaScript numbers) until the year 2242.
const SEQ_SECOND_SHIFT: u32 = 20;

impl Owner {
    pub fn new(config: OwnerConfig) -> Owner {
        Owner { config, rooms: HashMap::new(), dirty: Vec::new(), next_id: 0 }
    }

    /// Rooms tracked.
    pub fn rooms(&self) -> usize {
        self.rooms.len()
    }

    /// A node-unique message id: the shard in the top 16 bits.
    pub fn next_message_id(&mut self) -> u64 {
        self.next_id += 1;
        (u64::from(self.config.shard.0) << 48) | (self.next_id & 0xFFFF_FFFF_FFFF)
    }

    fn room_mut(&mut self, room: &RoomName, now: UnixMs) -> Option<&mut OwnedRoom> {
        if !self.rooms.contains_key(room) {
            if self.rooms.len() >= self.config.rooms_max {
                return None;
            }
            let shards = self.config.shards;
            let base = (now.0.max(0) as u64 / 1000) << SEQ_SECOND_SHIFT;
            self.rooms.insert(
                room.clone(),
                OwnedRoom {
                    mixer: Mixer::starting_after(base),
                    members: vec![0; shards].into_boxed_slice(),
                    json: vec![0; shards].into_boxed_slice(),
                    dirty: false,
                    last_active: now,
                },
            );
        }
        self.rooms.get_mut(room)
    }

    /// Accepts a message for the room's next block: stamps id, room and server time.
    pub fn publish(&mut self, room: &RoomName, mut msg: Message, now: UnixMs) -> Result<u64, PublishError> {
        let id = self.next_message_id();
        let limits = self.config.limits;
        let r = self.room_mut(room, now).ok_or(PublishError::RoomsFull)?;
        msg.id = id;
        msg.room = room.as_str().to_owned();
        msg.created_ms = now.0;
        r.mixer.push(msg, &limits).map_err(|Refused::Backlog| PublishError::Backlog)?;
        r.last_active = now;
        if !r.dirty {
            r.dirty = true;
            self.dirty.push(room.clone());
        }
        Ok(id)
    }

    /// A shard reports how many members (and JSON members) it holds in a room.
    /// Returns false when the room cannot be tracked (rooms_max).
    pub fn presence(&mut self, room: &RoomName, shard: ShardId, members: u32, json: u32, now: UnixMs) -> bool {
        if members == 0 && !self.rooms.contains_key(room) {
            return true;
        }
        let Some(r) = self.room_mut(room, now) else { return false };
        if let (Some(m), Some(j)) = (r.members.get_mut(shard.index()), r.json.get_mut(shard.index())) {
            *m = members;
            *j = json;
        }
        r.last_active = now;
        true
    }

    /// Online count and seq of a room (zeros for an unknown room).
    pub fn info(&self, room: &RoomName) -> RoomInfo {
        match self.rooms.get(room) {
            Some(r) => RoomInfo { online: r.online(), last_seq: r.mixer.last_seq(), pending: r.mixer.pending_len() },
            None => RoomInfo { online: 0, last_seq: 0, pending: 0 },
        }
    }

    /// Cuts a block for every room with pending messages, encodes it once per needed format,
    /// and hands it to `deliver` with the per-shard member counts. Rooms without pending
    /// messages are not visited.
    pub fn tick(&mut self, now: UnixMs, deliver: &mut Deliver<'_>) -> TickStats {
        let mut stats = TickStats::default();
        let limits = self.config.limits;
        let dirty = std::mem::take(&mut self.dirty);
        for name in dirty {
            let Some(room) = self.rooms.get_mut(&name) else { continue };
            room.dirty = false;
            let Some(cut) = room.mixer.cut(now.0, &limits) else { continue };
            if room.mixer.has_pending() {
                room.dirty = true;
                self.dirty.push(name.clone());
            }
            if cut.messages.is_empty() {
                continue; // everything had expired
            }
            stats.blocks += 1;
            stats.messages += cut.messages.len() as u64;
            stats.dropped_overflow += cut.dropped_overflow;
            let online = room.online();
            let json = room.json.iter().any(|&n| n > 0);
            let frame = Arc::new(block_frame(&name, cut, online, now, json));
            if online > 0 {
                deliver(&name, &frame, &room.members);
            }
        }
        stats
    }

    /// Forgets rooms with no members and nothing pending for `room_idle_ms`. Call rarely (it
    /// walks every owned room).
    pub fn sweep(&mut self, now: UnixMs) {
        let idle = self.config.room_idle_ms;
        self.rooms.retain(|_, r| r.dirty || r.online() > 0 || now.0 - r.last_active.0 < idle);
    }
}

fn block_frame(room: &RoomName, cut: Cut, online: u64, now: UnixMs, json: bool) -> SharedFrame {
    let whitelist = cut.messages.iter().any(|m| m.priority == crate::proto::Priority::Whitelist as i32);
    let block = Block {
        room: room.as_str().to_owned(),
        first_seq: cut.first_seq(),
        last_seq: cut.last_seq(),
        messages: cut.messages,
        online,
        server_ms: now.0,
    };
    let frame = ServerFrame { frame: Some(server_frame::Frame::Block(block)) };
    SharedFrame::encode(&frame, json, whitelist)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Priority;
    use prost::Message as _;

    fn owner(shards: usize) -> Owner {
        Owner::new(OwnerConfig {
            shard: ShardId(1),
            shards,
            limits: MixerLimits { block_messages_max: 2, pending_messages_max: 4 },
            rooms_max: 2,
            room_idle_ms: 1000,
        })
    }

    fn room(s: &str) -> RoomName {
        RoomName::parse(s, 64).unwrap()
    }

    fn text(p: Priority, data: &str) -> Message {
        Message { r#type: "chat".into(), priority: p as i32, data: data.as_bytes().to_vec(), ..Message::default() }
    }

    fn decode_block(frame: &SharedFrame) -> Block {
        let payload = &frame.proto[2..];
        match ServerFrame::decode(payload).unwrap().frame {
            Some(server_frame::Frame::Block(b)) => b,
            other => panic!("not a block: {other:?}"),
        }
    }

    #[test]
    fn tick_encodes_once_and_targets_shards_with_members() {
        let mut o = owner(3);
        let r = room("r");
        let now = UnixMs(5_000);
        assert!(o.presence(&r, ShardId(0), 2, 0, now));
        assert!(o.presence(&r, ShardId(2), 1, 1, now));
        o.publish(&r, text(Priority::Low, "a"), now).unwrap();
        o.publish(&r, text(Priority::High, "b"), now).unwrap();
        let mut calls = Vec::new();
        let stats = o.tick(UnixMs(6_000), &mut |name, frame, members| {
            calls.push((name.clone(), Arc::clone(frame), members.to_vec()));
        });
        assert_eq!(stats, TickStats { blocks: 1, messages: 2, dropped_overflow: 0 });
        assert_eq!(calls.len(), 1, "one encode per room per tick");
        let (name, frame, members) = &calls[0];
        assert_eq!(name, &r);
        assert_eq!(members, &vec![2, 0, 1]);
        assert!(frame.json.is_some(), "a JSON member exists");
        let block = decode_block(frame);
        assert_eq!(block.online, 3);
        assert_eq!(block.server_ms, 6_000);
        let data: Vec<_> = block.messages.iter().map(|m| m.data.clone()).collect();
        assert_eq!(data, vec![b"b".to_vec(), b"a".to_vec()]);
        assert_eq!(block.first_seq, 5 << SEQ_SECOND_SHIFT | 1);
        assert_eq!(block.last_seq, block.first_seq + 1);
        assert!(block.messages.iter().all(|m| m.room == "r" && m.created_ms == 5_000 && m.id >> 48 == 1));
        // Nothing pending: the next tick visits nothing.
        let stats = o.tick(UnixMs(7_000), &mut |_, _, _| panic!("no block expected"));
        assert_eq!(stats.blocks, 0);
    }

    #[test]
    fn bounds_rooms_and_backlog() {
        let mut o = owner(1);
        let now = UnixMs(0);
        o.publish(&room("a"), text(Priority::Low, "x"), now).unwrap();
        o.publish(&room("b"), text(Priority::Low, "x"), now).unwrap();
        assert_eq!(o.publish(&room("c"), text(Priority::Low, "x"), now), Err(PublishError::RoomsFull));
        for _ in 0..3 {
            o.publish(&room("a"), text(Priority::Low, "x"), now).unwrap();
        }
        assert_eq!(o.publish(&room("a"), text(Priority::Low, "x"), now), Err(PublishError::Backlog));
    }

    #[test]
    fn idle_rooms_are_forgotten_and_seqs_still_increase() {
        let mut o = owner(1);
        let r = room("a");
        o.publish(&r, text(Priority::Low, "x"), UnixMs(1_000)).unwrap();
        let mut last = 0;
        o.tick(UnixMs(1_000), &mut |_, _, _| {});
        last = last.max(o.info(&r).last_seq);
        o.sweep(UnixMs(1_500));
        assert_eq!(o.rooms(), 1, "not idle long enough");
        o.sweep(UnixMs(2_500));
        assert_eq!(o.rooms(), 0);
        o.publish(&r, text(Priority::Low, "y"), UnixMs(2_500)).unwrap();
        o.tick(UnixMs(2_500), &mut |_, _, _| {});
        assert!(o.info(&r).last_seq > last, "a re-created room continues above the old seqs");
    }
}
