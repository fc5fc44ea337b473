//! The rooms one shard owns. For each: the mixer that turns pending messages into blocks, the
//! history kept for backfill and short polling, the attributes and their change log, the
//! moderation lists, the upstream rate limit, presence (members per shard, enter/leave events),
//! and the block tick that cuts, encodes once per wire format, and says which shards receive
//! that one shared frame. Sans-IO: time comes in as arguments, frames go out by callback.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::Priority;
use super::RoomName;
use super::attrs::{AttrError, AttrLimits, AttrLog};
use super::durable::StoreOp;
use super::frames::{self, BlockKind, SharedFrame};
use super::history::History;
use super::limit::{Rate, TokenBucket};
use super::mixer::{Mixer, MixerLimits, Pushed, Refused};
use super::moderation::{Entry, List, Moderation, ModerationError, ModerationLimits};
use crate::config::TypeDefaults;
use crate::ids::{ConnId, Now, ShardId, UnixMs, UserId};
use crate::proto::{Ack, Message};

/// Bounds and identity of one shard's owner table.
#[derive(Clone, Debug)]
pub struct OwnerConfig {
    pub shard: ShardId,
    pub shards: usize,
    pub limits: MixerLimits,
    /// Rooms with state (messages, attributes, moderation) this owner keeps; rooms that only
    /// have members do not count (each has a member: they are bounded by the connections).
    pub rooms_max: usize,
    /// An owned room with no members, nothing pending and no attributes or moderation entries
    /// is forgotten after this long.
    pub room_idle_ms: i64,
    pub history_messages_max: usize,
    pub upstream: Rate,
    pub attrs: AttrLimits,
    pub moderation: ModerationLimits,
    pub presence_events: bool,
    pub presence_users_max: usize,
    pub poll_limit_max: usize,
    /// Poll interval hints for rooms under 100, up to 1,000, and over 1,000 members.
    pub poll_interval_ms: [u32; 3],
    pub types: Arc<BTreeMap<String, TypeDefaults>>,
    /// Rooms are kept in durable storage: every block, attribute and list change is also
    /// handed out as a `StoreOp`, and a room not in memory is loaded before use (`loading`).
    pub durable: bool,
    /// A cluster node: rooms are taken with a lease (`Held` while another node has it), and
    /// `shards` counts one more slot, the cluster link's (members on other nodes).
    pub cluster: bool,
    /// permessage-deflate is offered: a room with members that negotiated it gets each live
    /// block compressed once per wire format.
    pub deflate: Option<frames::Deflate>,
}

/// Why a publish was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PublishError {
    /// The room's pending backlog is full.
    Backlog,
    /// The owner keeps `rooms_max` rooms with state already.
    RoomsFull,
    /// The room's upstream rate is exceeded.
    RateLimited,
    /// The sender is muted in this room.
    Muted,
    /// The rooms are being handed to a new process (an upgrade): retry, it will take it.
    HandedOver,
}

impl PublishError {
    /// HTTP-like code for the API and error frames, and a reason.
    pub fn code(self) -> (u16, &'static str) {
        match self {
            PublishError::Backlog => (429, "the room's pending backlog is full"),
            PublishError::RoomsFull => (503, "too many rooms on this node"),
            PublishError::RateLimited => (429, "the room's message rate is exceeded"),
            PublishError::Muted => (403, "you are muted in this room"),
            PublishError::HandedOver => (503, "the gateway is handing its rooms to a new process: retry"),
        }
    }
}

/// Who publishes, and so which checks apply.
#[derive(Clone, Debug)]
pub enum Sender {
    /// The business API, with the priority its body named (else the type's default).
    Api { priority: Option<Priority> },
    /// A signed-in user's `send`, with the weight its token grants and the priority its type
    /// may ride (whitelist instead when the user is on the room's whitelist).
    Client { user: UserId, weight: i32, priority: Priority },
}

/// A message accepted for the next block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Published {
    pub id: u64,
    /// It replaced a pending message with the same coalesce key.
    pub coalesced: bool,
}

/// A moderation action on one user of a room.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModAction {
    Kick,
    Mute { until_ms: Option<i64> },
    Unmute,
    Ban { until_ms: Option<i64> },
    Unban,
    Whitelist,
    Unwhitelist,
}

/// A room as its owner sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoomInfo {
    pub online: u64,
    pub last_seq: u64,
    pub pending: usize,
}

/// A room's moderation lists.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModerationLists {
    pub mutes: Vec<Entry>,
    pub bans: Vec<Entry>,
    pub whitelist: Vec<Entry>,
}

/// What one tick did, for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TickStats {
    pub blocks: u64,
    pub messages: u64,
    pub dropped_overflow: u64,
    pub dropped_expired: u64,
    pub attr_frames: u64,
    /// Enter/leave messages the tick posted into rooms (counted like publishes: added, or
    /// superseding a pending one of the same kind).
    pub presence_added: u64,
    pub presence_coalesced: u64,
    /// permessage-deflate: compressed twins made, and the bytes of the frames that had a
    /// compressed reader before and after (a frame left uncompressed counts the same both ways).
    pub deflated: u64,
    pub deflate_in: usize,
    pub deflate_out: usize,
}

/// Receives each frame a tick produces: the room, its one shared frame, members per shard.
pub type Deliver<'a> = dyn FnMut(&RoomName, &Arc<SharedFrame>, &[u32]) + 'a;

/// Users who entered or left since the last block: counted, the first few named.
#[derive(Default)]
struct Churn {
    count: u32,
    users: Vec<UserId>,
}

impl Churn {
    fn record(&mut self, user: Option<&UserId>, named_max: usize) {
        self.count = self.count.saturating_add(1);
        if let Some(u) = user
            && self.users.len() < named_max
        {
            self.users.push(u.clone());
        }
    }
}

struct OwnedRoom {
    mixer: Mixer,
    history: History,
    attrs: AttrLog,
    /// Attribute version last sent to the members.
    attrs_sent: u64,
    moderation: Moderation,
    upstream: TokenBucket,
    /// Members per shard, how many of them read JSON, how many negotiated permessage-deflate,
    /// and how many of those read JSON.
    members: Box<[u32]>,
    json: Box<[u32]>,
    deflate: Box<[u32]>,
    deflate_json: Box<[u32]>,
    entered: Churn,
    left: Churn,
    dirty: bool,
    /// The room has state of its own (published messages, attributes, moderation): it counts
    /// against `rooms_max` and outlives its members. Without, it exists only while it has
    /// members (presence events alone do not keep it).
    kept: bool,
    /// The room's first seq minus one: a poll cursor below it (but 0) comes from an earlier
    /// incarnation of the room (before it was forgotten, or before a restart).
    base_seq: u64,
    last_active: UnixMs,
    /// Short-poll answers by (cursor, limit) until the next block (a few: most pollers are up
    /// to date and ask with the same cursor).
    poll_cache: Vec<(u64, usize, Arc<[u8]>)>,
    /// Resuming joiners' backfills by cursor until the next block (None: nothing to send).
    resumes: Vec<(u64, Option<Arc<SharedFrame>>)>,
    /// Encoded once per change and handed to every joining client.
    backfill: Option<Arc<SharedFrame>>,
    snapshot: Option<Arc<SharedFrame>>,
    /// Being loaded from durable storage since this time (ms): nothing is cut until it is.
    loading: Option<u64>,
    /// Accepted client sends waiting for their block to be acknowledged: message id, the
    /// connection, the client's id. At most one per pending message.
    acks: Vec<(u64, ShardId, ConnId, Box<str>)>,
}

impl OwnedRoom {
    fn online(&self) -> u64 {
        self.members.iter().map(|&n| u64::from(n)).sum()
    }

    /// A room without state, members or anything pending that never handed out a seq: it can
    /// go at once (one that did waits for the sweep, so that a new room of the same name
    /// starts its seqs in a later second).
    fn unused(&self) -> bool {
        // A loading room is kept until its load answers (the count of loads is the owner's).
        self.loading.is_none()
            && !self.kept
            && !self.dirty
            && self.online() == 0
            && self.mixer.last_seq() == self.base_seq
    }

    /// Whether the sweep may forget the room after `idle_ms` without activity: no members,
    /// nothing pending, and no attributes or moderation entries (those outlive idleness until
    /// they expire or are lifted; the room keeps counting against `rooms_max` meanwhile).
    fn forgettable(&self, now: UnixMs, idle_ms: i64) -> bool {
        let holds = !self.attrs.is_empty() || !self.moderation.is_empty();
        self.loading.is_none() && !self.dirty && self.online() == 0 && !holds && now.0 - self.last_active.0 >= idle_ms
    }
}

/// Seqs and attribute versions of a room start at its creation time in Unix milliseconds ×
/// 1,049 and count up, so they keep increasing across restarts and forgotten rooms: a room
/// re-created even a millisecond later starts above all the last one handed out, unless that one
/// averaged more than 1,049 changes a millisecond. They stay below 2^53 (exact in JavaScript)
/// until the year 2242. (A base per second let a process restarted within the second of a
/// room's creation hand its seqs out again; 1,049 > 2^20 / 1,000 keeps every base above those of
/// that earlier `second << 20` scheme.)
const SEQ_PER_MS: u64 = 1_049;

/// The first seq base of a room created at `unix_ms`.
pub(crate) fn seq_base(unix_ms: i64) -> u64 {
    (unix_ms.max(0) as u64).saturating_mul(SEQ_PER_MS)
}

/// Poll answers, and resuming backfills, cached per room.
const POLL_CACHE_MAX: usize = 4;

/// The rooms owned by one shard.
pub struct Owner {
    config: OwnerConfig,
    rooms: HashMap<RoomName, OwnedRoom>,
    /// Rooms with `kept` set.
    kept: usize,
    /// Rooms with something to send at the next tick: only these are visited.
    dirty: Vec<RoomName>,
    next_id: u64,
    /// Writes for durable storage since the desk last took them.
    store_ops: Vec<StoreOp>,
    /// Rooms being loaded.
    loading: usize,
    /// Acks the last ticks produced: where each goes and what it says.
    acks_out: Vec<(ShardId, ConnId, Ack)>,
}

impl Owner {
    pub fn new(config: OwnerConfig) -> Owner {
        Owner {
            config,
            rooms: HashMap::new(),
            kept: 0,
            dirty: Vec::new(),
            next_id: 0,
            store_ops: Vec::new(),
            loading: 0,
            acks_out: Vec::new(),
        }
    }

    /// A client send the owner accepted as message `id` is to be acknowledged once cut (or
    /// dropped) — to the connection `conn` on `shard`, with the client's `ack` id.
    pub fn expect_ack(&mut self, room: &RoomName, id: u64, shard: ShardId, conn: ConnId, ack: Box<str>) {
        if let Some(r) = self.rooms.get_mut(room) {
            r.acks.push((id, shard, conn, ack));
        }
    }

    /// The acks produced since the last call.
    pub fn take_acks(&mut self, out: &mut Vec<(ShardId, ConnId, Ack)>) {
        out.append(&mut self.acks_out);
    }

    /// Rooms tracked (with state or with members).
    pub fn rooms(&self) -> usize {
        self.rooms.len()
    }

    /// Whether some room has messages waiting for a block.
    pub fn has_pending(&self) -> bool {
        self.dirty.iter().any(|name| self.rooms.get(name).is_some_and(|r| r.mixer.has_pending()))
    }

    /// Rooms with state, counted against `rooms_max`.
    pub fn kept_rooms(&self) -> usize {
        self.kept
    }

    /// A node-unique message id: the shard in the top 16 bits.
    pub fn next_message_id(&mut self) -> u64 {
        self.next_id += 1;
        (u64::from(self.config.shard.0) << 48) | (self.next_id & 0xFFFF_FFFF_FFFF)
    }

    /// A room, created on first use with no state of its own (it then lives while it has
    /// members). An associated function over the map so callers can still mark the dirty list,
    /// a sibling field.
    fn room_mut<'a>(
        rooms: &'a mut HashMap<RoomName, OwnedRoom>,
        config: &OwnerConfig,
        room: &RoomName,
        now: Now,
    ) -> &'a mut OwnedRoom {
        rooms.entry(room.clone()).or_insert_with(|| {
            let base = seq_base(now.unix.0);
            let shards = config.shards;
            OwnedRoom {
                mixer: Mixer::starting_after(base),
                history: History::new(config.history_messages_max),
                attrs: AttrLog::new(base),
                attrs_sent: base,
                moderation: Moderation::default(),
                upstream: TokenBucket::new(&config.upstream, now.ms),
                members: vec![0; shards].into_boxed_slice(),
                json: vec![0; shards].into_boxed_slice(),
                deflate: vec![0; shards].into_boxed_slice(),
                deflate_json: vec![0; shards].into_boxed_slice(),
                entered: Churn::default(),
                left: Churn::default(),
                dirty: false,
                kept: false,
                base_seq: base,
                last_active: now.unix,
                poll_cache: Vec::new(),
                resumes: Vec::new(),
                backfill: None,
                snapshot: None,
                loading: None,
                acks: Vec::new(),
            }
        })
    }

    /// A room that is taking on state (a message, an attribute, a moderation entry): it counts
    /// against `rooms_max` from now on. None when the owner keeps `rooms_max` such rooms.
    fn keep<'a>(
        rooms: &'a mut HashMap<RoomName, OwnedRoom>,
        kept: &mut usize,
        config: &OwnerConfig,
        room: &RoomName,
        now: Now,
    ) -> Option<&'a mut OwnedRoom> {
        let known_kept = rooms.get(room).is_some_and(|r| r.kept);
        if !known_kept && *kept >= config.rooms_max {
            return None;
        }
        let r = Self::room_mut(rooms, config, room, now);
        if !r.kept {
            r.kept = true;
            *kept += 1;
        }
        Some(r)
    }

    fn mark_dirty(dirty: &mut Vec<RoomName>, r: &mut OwnedRoom, room: &RoomName) {
        if !r.dirty {
            r.dirty = true;
            dirty.push(room.clone());
        }
    }

    /// Accepts a message for the room's next block: checks mute and the upstream rate, fills
    /// type defaults, stamps id, room and server time.
    pub fn publish(
        &mut self,
        room: &RoomName,
        mut msg: Message,
        sender: Sender,
        now: Now,
    ) -> Result<Published, PublishError> {
        let id = self.next_message_id();
        let types = Arc::clone(&self.config.types);
        let (limits, upstream) = (self.config.limits, self.config.upstream);
        let r = Self::keep(&mut self.rooms, &mut self.kept, &self.config, room, now).ok_or(PublishError::RoomsFull)?;
        let defaults = types.get(msg.r#type.as_str()).copied().unwrap_or_default();
        let priority = match &sender {
            Sender::Api { priority } => priority.unwrap_or(defaults.priority),
            Sender::Client { user, weight, priority } => {
                if r.moderation.contains(List::Mute, user.as_str(), now.unix.0) {
                    return Err(PublishError::Muted);
                }
                msg.weight = *weight;
                msg.sender = user.as_str().to_owned();
                match r.moderation.contains(List::Whitelist, user.as_str(), now.unix.0) {
                    true => Priority::Whitelist,
                    false => *priority,
                }
            }
        };
        if priority != Priority::Whitelist && !r.upstream.try_take(&upstream, now.ms) {
            return Err(PublishError::RateLimited);
        }
        if msg.ttl_ms == 0 {
            msg.ttl_ms = defaults.ttl_ms;
        }
        msg.id = id;
        msg.room = room.as_str().to_owned();
        msg.created_ms = now.unix.0;
        let pushed = r.mixer.push(msg, priority, &limits).map_err(|Refused::Backlog| PublishError::Backlog)?;
        r.last_active = now.unix;
        Self::mark_dirty(&mut self.dirty, r, room);
        Ok(Published { id, coalesced: pushed == Pushed::Coalesced })
    }

    /// A shard reports its members in a room (`json` of them reading JSON), and who left since
    /// its last report. A room that has only ever had members is dropped once it has none.
    pub fn presence(
        &mut self,
        room: &RoomName,
        shard: ShardId,
        counts: (u32, u32, u32, u32),
        left: &[UserId],
        left_count: u32,
        now: Now,
    ) {
        let (members, json, deflate, deflate_json) = counts;
        if members == 0 && !self.rooms.contains_key(room) {
            return;
        }
        let (events, named) = (self.config.presence_events, self.config.presence_users_max);
        let r = Self::room_mut(&mut self.rooms, &self.config, room, now);
        let i = shard.index();
        for (counts, n) in [
            (&mut r.members, members),
            (&mut r.json, json),
            (&mut r.deflate, deflate),
            (&mut r.deflate_json, deflate_json),
        ] {
            if let Some(c) = counts.get_mut(i) {
                *c = n;
            }
        }
        r.last_active = now.unix;
        if events && left_count > 0 {
            for u in left {
                r.left.record(Some(u), named);
            }
            let anonymous = left_count.saturating_sub(left.len() as u32);
            r.left.count = r.left.count.saturating_add(anonymous);
            Self::mark_dirty(&mut self.dirty, r, room);
        }
        if r.unused() {
            self.rooms.remove(room);
        }
    }

    /// A connection joined the room on some shard: counts it for the next enter event and
    /// returns what it should receive first — the history as a backfill block (all of it, or,
    /// for a client resuming `after` a seq it showed, exactly the messages after it, with
    /// `truncated` when the history no longer reaches back) and the attribute snapshot — each
    /// encoded once and shared by every joiner with the same cursor until the room changes.
    pub fn joined(&mut self, room: &RoomName, user: Option<&UserId>, after: u64, now: Now) -> Vec<Arc<SharedFrame>> {
        let (events, named, max) =
            (self.config.presence_events, self.config.presence_users_max, self.config.history_messages_max);
        let r = Self::room_mut(&mut self.rooms, &self.config, room, now);
        // Only signed-in users are announced: anonymous churn moves the online count (carried in
        // every block) and nothing else, so a room full of viewers coming and going stays quiet.
        if events && user.is_some() {
            r.entered.record(user, named);
            Self::mark_dirty(&mut self.dirty, r, room);
        }
        let mut out = Vec::new();
        let online = r.online();
        if after == 0 && !r.history.is_empty() {
            let frame = r.backfill.get_or_insert_with(|| {
                let messages: Vec<Message> = r.history.recent().cloned().collect();
                Arc::new(frames::block(
                    room,
                    messages,
                    BlockKind::Backfill { truncated: false },
                    online,
                    now.unix,
                    true,
                ))
            });
            out.push(Arc::clone(frame));
        } else if after != 0 {
            let cached = r.resumes.iter().find(|(a, _)| *a == after).map(|(_, f)| f.clone());
            let frame = cached.unwrap_or_else(|| {
                let page = r.history.after(after, max, r.mixer.last_seq(), r.base_seq);
                let frame = (!page.messages.is_empty() || page.truncated).then(|| {
                    let messages: Vec<Message> = page.messages.into_iter().cloned().collect();
                    let kind = BlockKind::Backfill { truncated: page.truncated };
                    Arc::new(frames::block(room, messages, kind, online, now.unix, true))
                });
                if r.resumes.len() == POLL_CACHE_MAX {
                    r.resumes.remove(0);
                }
                r.resumes.push((after, frame.clone()));
                frame
            });
            out.extend(frame);
        }
        if !r.attrs.is_empty() {
            let log = &r.attrs;
            out.push(Arc::clone(r.snapshot.get_or_insert_with(|| Arc::new(frames::attrs_snapshot(room, log, true)))));
        }
        out
    }

    /// Online count and seq of a room (zeros for an unknown room).
    pub fn info(&self, room: &RoomName) -> RoomInfo {
        match self.rooms.get(room) {
            Some(r) => RoomInfo { online: r.online(), last_seq: r.mixer.last_seq(), pending: r.mixer.pending_len() },
            None => RoomInfo { online: 0, last_seq: 0, pending: 0 },
        }
    }

    /// The `n` rooms with the most members.
    pub fn top(&self, n: usize) -> Vec<(RoomName, u64)> {
        let mut all: Vec<(RoomName, u64)> = self.rooms.iter().map(|(k, r)| (k.clone(), r.online())).collect();
        all.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        all.truncate(n);
        all
    }

    /// Short polling: the JSON body of `{messages, next, truncated, poll_interval_ms}`. The same
    /// for a room this owner does not know as for a known one with nothing after the cursor, so a
    /// poll tells nobody whether a room exists; `truncated` when messages after the cursor may
    /// be gone (evicted, or from before the room was forgotten or the node restarted). Bodies are
    /// cached per room and cursor until the room's next block.
    pub fn poll(&mut self, room: &RoomName, after: u64, limit: usize) -> Arc<[u8]> {
        let limit = limit.clamp(1, self.config.poll_limit_max);
        let Some(r) = self.rooms.get_mut(room) else {
            return poll_body(&[], after, after != 0, self.config.poll_interval_ms[0]).into();
        };
        if let Some((_, _, body)) = r.poll_cache.iter().find(|(a, l, _)| *a == after && *l == limit) {
            return Arc::clone(body);
        }
        let page = r.history.after(after, limit, r.mixer.last_seq(), r.base_seq);
        let interval = poll_interval(&self.config.poll_interval_ms, r.online());
        let body: Arc<[u8]> = poll_body(&page.messages, page.next, page.truncated, interval).into();
        if r.poll_cache.len() == POLL_CACHE_MAX {
            r.poll_cache.remove(0);
        }
        r.poll_cache.push((after, limit, Arc::clone(&body)));
        body
    }

    /// Applies a moderation action. Kick needs no state: the caller closes the user's
    /// connections in the room everywhere. An entry makes the room keep state (it counts
    /// against `rooms_max`, and outlives idleness until the entry expires or is lifted).
    pub fn moderate(
        &mut self,
        room: &RoomName,
        user: &UserId,
        action: ModAction,
        now: Now,
    ) -> Result<(), ModerationError> {
        let (limits, user, t) = (self.config.moderation, user.as_str(), now.unix.0);
        let (list, until_ms) = match action {
            ModAction::Kick => return Ok(()),
            ModAction::Unmute | ModAction::Unban | ModAction::Unwhitelist => {
                let list = match action {
                    ModAction::Unmute => List::Mute,
                    ModAction::Unban => List::Ban,
                    _ => List::Whitelist,
                };
                if let Some(r) = self.rooms.get_mut(room)
                    && r.moderation.remove(list, user)
                    && self.config.durable
                {
                    let (room, user) = (room.clone(), user.to_owned());
                    self.store_ops.push(StoreOp::Moderation { room, list, user, until_ms: None, add: false });
                }
                return Ok(());
            }
            ModAction::Mute { until_ms } => (List::Mute, until_ms),
            ModAction::Ban { until_ms } => (List::Ban, until_ms),
            ModAction::Whitelist => (List::Whitelist, None),
        };
        let r = Self::keep(&mut self.rooms, &mut self.kept, &self.config, room, now).ok_or(ModerationError::Full)?;
        r.moderation.add(list, user, until_ms, t, &limits)?;
        // What is stored is the entry as it now holds (an add may have extended it).
        if let (true, Some(until_ms)) = (self.config.durable, r.moderation.until(list, user, t)) {
            let (room, user) = (room.clone(), user.to_owned());
            self.store_ops.push(StoreOp::Moderation { room, list, user, until_ms, add: true });
        }
        Ok(())
    }

    /// Rooms with moderation entries (expired ones count until swept).
    pub fn moderated(&self) -> Vec<RoomName> {
        self.rooms.iter().filter(|(_, r)| !r.moderation.is_empty()).map(|(name, _)| name.clone()).collect()
    }

    /// A room's moderation lists (empty for an unknown room).
    pub fn moderation(&self, room: &RoomName, now: UnixMs) -> ModerationLists {
        let Some(r) = self.rooms.get(room) else { return ModerationLists::default() };
        let m = &r.moderation;
        ModerationLists {
            mutes: m.entries(List::Mute, now.0),
            bans: m.entries(List::Ban, now.0),
            whitelist: m.entries(List::Whitelist, now.0),
        }
    }

    /// Sets (Some) or deletes (None) one attribute; the change goes out with the next tick.
    /// Returns the room's attribute version after the change.
    pub fn set_attr(&mut self, room: &RoomName, key: &str, value: Option<&[u8]>, now: Now) -> Result<u64, AttrError> {
        let limits = self.config.attrs;
        if value.is_none() && !self.rooms.contains_key(room) {
            return Ok(0);
        }
        let r = Self::keep(&mut self.rooms, &mut self.kept, &self.config, room, now).ok_or(AttrError::TooManyKeys)?;
        let before = r.attrs.version();
        let version = match value {
            Some(v) => r.attrs.set(key, v, &limits)?,
            None => r.attrs.delete(key).unwrap_or(r.attrs.version()),
        };
        if self.config.durable && version != before {
            let value = value.map(<[u8]>::to_vec);
            self.store_ops.push(StoreOp::Attr { room: room.clone(), version, key: key.to_owned(), value });
        }
        if version != r.attrs_sent {
            r.snapshot = None;
            r.last_active = now.unix;
            Self::mark_dirty(&mut self.dirty, r, room);
        }
        Ok(version)
    }

    /// A room's attributes: version and entries in key order.
    pub fn attrs(&self, room: &RoomName) -> (u64, Vec<(String, Vec<u8>)>) {
        match self.rooms.get(room) {
            Some(r) => (r.attrs.version(), r.attrs.snapshot().map(|(k, v)| (k.to_owned(), v.to_vec())).collect()),
            None => (0, Vec::new()),
        }
    }

    /// What a client at attribute version `after` needs (None when it is current).
    pub fn attr_sync(&self, room: &RoomName, after: u64) -> Option<SharedFrame> {
        let r = self.rooms.get(room)?;
        frames::attrs_since(room, &r.attrs, after, true)
    }

    /// Cuts a block for every dirty room, encodes it once per needed format, and hands it to
    /// `deliver` with the per-shard member counts; attribute changes and enter/leave events go
    /// out in the same tick. Rooms with nothing new are not visited.
    pub fn tick(&mut self, now: Now, deliver: &mut Deliver<'_>) -> TickStats {
        let mut stats = TickStats::default();
        let limits = self.config.limits;
        let mut waiting = Vec::new();
        for name in std::mem::take(&mut self.dirty) {
            let Some(room) = self.rooms.get_mut(&name) else { continue };
            if room.loading.is_some() {
                // Cut once its stored state is in: its seqs must go on from there.
                waiting.push(name);
                continue;
            }
            room.dirty = false;
            let json = room.json.iter().any(|&n| n > 0);
            let deflate = self.config.deflate.and_then(|d| {
                let (all, json): (u32, u32) = (room.deflate.iter().sum(), room.deflate_json.iter().sum());
                let zipped = frames::Zipped { proto: all > json, json: json > 0 };
                (all > 0).then_some((d, zipped))
            });
            let online = room.online();
            let (added, coalesced) =
                post_presence(&name, room, &self.config.types, &mut self.next_id, self.config.shard, now);
            stats.presence_added += added;
            stats.presence_coalesced += coalesced;
            if room.attrs.version() != room.attrs_sent {
                if let Some(f) = frames::attrs_since(&name, &room.attrs, room.attrs_sent, json) {
                    stats.attr_frames += 1;
                    deliver(&name, &Arc::new(f), &room.members);
                }
                room.attrs_sent = room.attrs.version();
            }
            let Some(cut) = room.mixer.cut(now.unix.0, &limits) else { continue };
            if !room.acks.is_empty() {
                settle_acks(&name, room, &cut.messages, &mut self.acks_out);
            }
            if room.mixer.has_pending() {
                room.dirty = true;
                self.dirty.push(name.clone());
            }
            stats.dropped_overflow += cut.dropped_overflow;
            stats.dropped_expired += cut.dropped_expired;
            if cut.messages.is_empty() {
                continue;
            }
            stats.blocks += 1;
            stats.messages += cut.messages.len() as u64;
            let kind = BlockKind::Live { top: cut.top };
            // Encoded first, then the same messages go into the history (no copy).
            let (frame, messages) = frames::block_keeping(&name, cut.messages, kind, online, now.unix, json, deflate);
            if let Some((_, zipped)) = deflate {
                let plain = [Some(&frame.proto), frame.json.as_ref()];
                let twins = [(zipped.proto, &frame.proto_z), (zipped.json, &frame.json_z)];
                for (plain, (wanted, z)) in plain.into_iter().zip(twins) {
                    let Some(plain) = plain.filter(|_| wanted) else { continue };
                    stats.deflate_in += plain.len();
                    stats.deflate_out += z.as_ref().map_or(plain.len(), |z| z.len());
                    stats.deflated += u64::from(z.is_some());
                }
            }
            let stored = self.config.durable.then(|| messages.clone());
            room.history.push(messages);
            if let Some(messages) = stored {
                self.store_ops.push(StoreOp::Block {
                    room: name.clone(),
                    messages,
                    base_seq: room.base_seq,
                    last_seq: room.mixer.last_seq(),
                    evicted_seq: room.history.evicted_seq(),
                    kept: room.kept,
                });
            }
            room.backfill = None;
            room.poll_cache.clear();
            room.resumes.clear();
            let frame = Arc::new(frame);
            if online > 0 {
                deliver(&name, &frame, &room.members);
            }
        }
        self.dirty.extend(waiting);
        stats
    }

    /// Forgets rooms with no members and nothing pending for `room_idle_ms`, and expired
    /// moderation entries. Call rarely (it walks every owned room).
    pub fn sweep(&mut self, now: UnixMs) {
        let idle = self.config.room_idle_ms;
        let mut kept = self.kept;
        self.rooms.retain(|_, r| {
            r.moderation.sweep(now.0);
            // A room that only ever had members waits a second: its seqs were handed out in an
            // earlier second than a new room of that name will start from.
            let forget = r.forgettable(now, if r.kept { idle } else { 1_000 });
            kept -= usize::from(forget && r.kept);
            !forget
        });
        self.kept = kept;
    }
}

/// After a cut: acks with their seq for the acknowledged messages the block took, and with 410
/// for those no longer pending and not in it (superseded by a coalescing send, expired, or over
/// the block); the rest wait for a later block.
fn settle_acks(name: &RoomName, room: &mut OwnedRoom, cut: &[Message], out: &mut Vec<(ShardId, ConnId, Ack)>) {
    let seqs: HashMap<u64, u64> = cut.iter().map(|m| (m.id, m.seq)).collect();
    let pending: std::collections::HashSet<u64> = room.mixer.pending_ids().collect();
    room.acks.retain_mut(|(id, shard, conn, ack)| {
        let (seq, code, reason) = match seqs.get(id) {
            Some(&seq) => (seq, 0, String::new()),
            None if pending.contains(id) => return true,
            None => (0, 410, "dropped before it was sent (superseded, expired or over the block)".to_owned()),
        };
        let ack = Ack { id: std::mem::take(ack).into(), room: name.as_str().to_owned(), seq, code, reason };
        out.push((*shard, *conn, ack));
        false
    });
}

/// Turns a room's enter/leave counts since the last block into (at most) one message each;
/// returns how many were added and how many superseded a pending one.
fn post_presence(
    name: &RoomName,
    room: &mut OwnedRoom,
    types: &BTreeMap<String, TypeDefaults>,
    next_id: &mut u64,
    shard: ShardId,
    now: Now,
) -> (u64, u64) {
    let (mut added, mut coalesced) = (0, 0);
    for (kind, churn) in [("enter", &mut room.entered), ("leave", &mut room.left)] {
        if churn.count == 0 {
            continue;
        }
        let users: Vec<&str> = churn.users.iter().map(UserId::as_str).collect();
        let data = serde_json::json!({"count": churn.count, "users": users}).to_string().into_bytes();
        *churn = Churn::default();
        let defaults = types.get(kind).copied().unwrap_or_default();
        *next_id += 1;
        let msg = Message {
            id: (u64::from(shard.0) << 48) | (*next_id & 0xFFFF_FFFF_FFFF),
            room: name.as_str().to_owned(),
            r#type: kind.into(),
            ttl_ms: defaults.ttl_ms,
            created_ms: now.unix.0,
            coalesce_key: format!("presence:{kind}"),
            data,
            ..Message::default()
        };
        // Never refused: at most one of each kind waits, coalesced by its key.
        let limits = MixerLimits { block_messages_max: usize::MAX, pending_messages_max: usize::MAX };
        match room.mixer.push(msg, defaults.priority, &limits) {
            Ok(Pushed::Added) => added += 1,
            Ok(Pushed::Coalesced) => coalesced += 1,
            Err(_) => {}
        }
    }
    (added, coalesced)
}

fn poll_interval(intervals: &[u32; 3], online: u64) -> u32 {
    match online {
        0..100 => intervals[0],
        100..=1000 => intervals[1],
        _ => intervals[2],
    }
}

fn poll_body(messages: &[&Message], next: u64, truncated: bool, interval_ms: u32) -> Vec<u8> {
    let messages: Vec<serde_json::Value> =
        messages.iter().map(|m| serde_json::to_value(m).unwrap_or(serde_json::Value::Null)).collect();
    serde_json::json!({"messages": messages, "next": next, "truncated": truncated, "poll_interval_ms": interval_ms})
        .to_string()
        .into_bytes()
}

mod handover;
mod loading;
pub use handover::{Imported, Replica, replicas};
pub use loading::{Loaded, Phase};

#[cfg(test)]
mod tests;
