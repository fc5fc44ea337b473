//! The hub: everything one shard knows, as a sans-IO state machine. The io_uring driver feeds it
//! accepted connections, received bytes, send completions, mail and time; it answers with frames
//! to send (`pop_ready` + `next_send`), connections to close (`take_terminating`) and mail for
//! other shards (`take_mail`). No sockets, no clocks: a test drives it exactly as the driver
//! does.
//!
//! Call order per loop turn: `on_*` for each completion and mail, then `on_tick` when
//! `next_timeout` has passed, then `flush`, then drain the outputs.
#![forbid(unsafe_code)]

pub mod conn;
pub mod index;
pub mod mail;
pub mod outbox;

mod client;
mod fanout;
mod handshake;
mod moderation;
mod owned;

use std::collections::{HashMap, VecDeque};
use std::io::IoSlice;
use std::sync::Arc;

use slab::Slab;

use self::conn::{Conn, State, flag};
use self::index::{Rooms, Users};
use self::mail::Mail;
use self::outbox::{FrameId, Outbox};
use crate::auth::Verifier;
use crate::config::Config;
pub use crate::ids::Now;
use crate::ids::ShardId;
use crate::metrics::{Counters, Series};
use crate::room::RoomName;
use crate::room::attrs::AttrLimits;
use crate::room::frames::{Class, SharedFrame};
use crate::room::limit::{Rate, TokenBucket};
use crate::room::mixer::MixerLimits;
use crate::room::moderation::{List, Moderation, ModerationLimits};
use crate::room::owner::{Owner, OwnerConfig};
use crate::wire::HandshakeLimits;
use crate::wire::reader::ReadLimits;

/// What a hub needs from the config.
#[derive(Clone)]
pub struct HubConfig {
    pub shard: ShardId,
    pub shards: usize,
    pub conns_max: usize,
    pub handshake: HandshakeLimits,
    pub read: ReadLimits,
    pub handshake_timeout_ms: u64,
    pub idle_timeout_ms: u64,
    pub close_timeout_ms: u64,
    pub heartbeat_ms: u32,
    pub allow_anonymous: bool,
    pub echo_path: String,
    pub name_bytes_max: usize,
    pub data_bytes_max: usize,
    pub send_queue_frames_max: usize,
    pub partial_bytes_max: usize,
    pub block_interval_ms: u64,
    pub block_wait_max_ms: u64,
    pub rooms_max: usize,
    pub jwt_secret: Vec<u8>,
    pub jwt_leeway_s: u64,
    /// Sends per connection.
    pub send_rate: Rate,
    pub slow_consumer_ms: u64,
    pub poll_limit_max: usize,
    /// The owner table of this shard's rooms.
    pub owner: OwnerConfig,
}

impl HubConfig {
    /// The hub config of shard `shard` out of `shards`.
    pub fn new(c: &Config, shard: ShardId, shards: usize) -> HubConfig {
        HubConfig {
            shard,
            shards,
            conns_max: c.server.connections_max.div_ceil(shards),
            handshake: HandshakeLimits {
                request_bytes_max: c.websocket.handshake_bytes_max,
                headers_max: c.websocket.handshake_headers_max,
            },
            read: ReadLimits {
                frame_bytes_max: c.websocket.frame_bytes_max,
                message_bytes_max: c.websocket.message_bytes_max,
            },
            handshake_timeout_ms: c.websocket.handshake_timeout_ms,
            idle_timeout_ms: c.websocket.idle_timeout_ms,
            close_timeout_ms: c.websocket.close_timeout_ms,
            heartbeat_ms: c.websocket.heartbeat_ms,
            allow_anonymous: c.websocket.allow_anonymous,
            echo_path: c.websocket.echo_path.clone(),
            name_bytes_max: c.rooms.name_bytes_max,
            data_bytes_max: c.rooms.data_bytes_max,
            send_queue_frames_max: c.server.send_queue_frames_max as usize,
            partial_bytes_max: c.server.partial_bytes_max,
            block_interval_ms: c.rooms.block_interval_ms,
            block_wait_max_ms: c.rooms.block_wait_max_ms,
            rooms_max: c.rooms.rooms_max,
            jwt_secret: c.auth.jwt_secret.as_bytes().to_vec(),
            jwt_leeway_s: c.auth.jwt_leeway_s,
            send_rate: Rate { per_s: c.rooms.send_rate_per_s, burst: c.rooms.send_rate_burst },
            slow_consumer_ms: c.websocket.slow_consumer_ms,
            poll_limit_max: c.rooms.poll_limit_max,
            owner: owner_config(c, shard, shards),
        }
    }
}

fn owner_config(c: &Config, shard: ShardId, shards: usize) -> OwnerConfig {
    let r = &c.rooms;
    OwnerConfig {
        shard,
        shards,
        limits: MixerLimits { block_messages_max: r.block_messages_max, pending_messages_max: r.pending_messages_max },
        rooms_max: r.rooms_max,
        room_idle_ms: ROOM_IDLE_MS,
        history_messages_max: r.history_messages_max,
        upstream: Rate { per_s: r.room_rate_per_s, burst: r.room_rate_burst },
        attrs: AttrLimits {
            keys_max: r.attr_keys_max,
            key_bytes_max: r.attr_key_bytes_max,
            value_bytes_max: r.attr_value_bytes_max,
            log_len_max: r.attr_log_len_max,
        },
        moderation: ModerationLimits { entries_max: r.moderation_entries_max },
        presence_events: r.presence_events,
        presence_users_max: r.presence_users_max,
        poll_limit_max: r.poll_limit_max,
        poll_interval_ms: [r.poll_interval_small_ms, r.poll_interval_medium_ms, r.poll_interval_large_ms],
        types: Arc::new(c.types.clone()),
    }
}

/// Timeouts are checked by sweeping a tenth of the connections every 100 ms.
const SWEEP_EVERY_MS: u64 = 100;
const SWEEP_SLICES: usize = 10;
/// A block waits for the last fan-out only when more than an eighth of the connections, plus
/// this many, still wait for a send (a few slow readers must not hold blocks back).
const BLOCK_BACKLOG_MIN: usize = 64;
/// How often a waiting block looks again.
const BLOCK_RETRY_MS: u64 = 5;
/// A shard whose loop was busy this share of the time (in thousandths) is saturated.
const BUSY_PERMILLE: u32 = 850;
/// Owned rooms idle this long are forgotten (their seqs stay monotonic, see owner.rs).
const ROOM_IDLE_MS: i64 = 60_000;

/// One shard's connections, rooms and frames.
pub struct Hub {
    cfg: HubConfig,
    verifier: Option<Verifier>,
    conns: Slab<Conn>,
    /// Partial upgrade requests (rare: most arrive in one segment).
    heads: HashMap<u32, Vec<u8>>,
    /// Bytes held in `heads` and in readers' spill buffers, against `partial_bytes_max`.
    partial_bytes: usize,
    rooms: Rooms,
    users: Users,
    outbox: Outbox,
    owner: Owner,
    /// Connections with frames and no send in flight, oldest first.
    ready: VecDeque<u32>,
    terminating: Vec<u32>,
    mail: Vec<(ShardId, Mail)>,
    /// The connection whose read is being handled, and the replies gathered for it.
    replying: Option<u32>,
    replies: Vec<u8>,
    /// Replicas of the ban and whitelist lists of rooms (the owners' lists are authoritative).
    moderation: HashMap<RoomName, Moderation>,
    /// Send-rate state of connections that sent recently (8 B each; idle viewers hold none).
    send_buckets: HashMap<u32, TokenBucket>,
    counters: Counters,
    websockets: u64,
    /// When the next block tick runs (later than `block_due_ms` while a block waits).
    next_block_ms: u64,
    /// When the next block is due by the interval.
    block_due_ms: u64,
    /// Sends handed to the driver and not yet completed.
    sends_in_flight: usize,
    /// How busy the driver's loop has been lately, in thousandths (see `set_busy`).
    busy_permille: u32,
    next_sweep_ms: u64,
    sweep_cursor: usize,
    next_room_sweep_ms: u64,
    stopping: bool,
}

impl Hub {
    pub fn new(cfg: HubConfig) -> Hub {
        let verifier = (!cfg.jwt_secret.is_empty()).then(|| Verifier::new(&cfg.jwt_secret, cfg.jwt_leeway_s));
        let owner = Owner::new(cfg.owner.clone());
        Hub {
            verifier,
            conns: Slab::new(),
            heads: HashMap::new(),
            partial_bytes: 0,
            rooms: Rooms::new(cfg.rooms_max),
            users: Users::default(),
            outbox: Outbox::default(),
            owner,
            ready: VecDeque::new(),
            terminating: Vec::new(),
            mail: Vec::new(),
            replying: None,
            replies: Vec::new(),
            moderation: HashMap::new(),
            send_buckets: HashMap::new(),
            counters: Counters::default(),
            websockets: 0,
            next_block_ms: cfg.block_interval_ms,
            block_due_ms: cfg.block_interval_ms,
            sends_in_flight: 0,
            busy_permille: 0,
            next_sweep_ms: SWEEP_EVERY_MS,
            sweep_cursor: 0,
            next_room_sweep_ms: ROOM_IDLE_MS as u64,
            stopping: false,
            cfg,
        }
    }

    /// A new TCP connection. None when the shard is full or stopping: the driver closes it.
    pub fn open(&mut self, io: u64, now: Now) -> Option<u32> {
        self.counters.inc(Series::Accepted);
        if self.conns.len() >= self.cfg.conns_max || self.stopping {
            self.counters.inc(Series::RefusedFull);
            return None;
        }
        let deadline = now.tick_after(self.cfg.handshake_timeout_ms);
        Some(self.conns.insert(Conn::new(io, deadline)) as u32)
    }

    /// Bytes received on a connection (the driver's buffer, ours until we return).
    pub fn on_recv(&mut self, key: u32, data: &mut [u8], now: Now) {
        let Some(conn) = self.conns.get_mut(key as usize) else { return };
        self.counters.add(Series::BytesIn, data.len() as u64);
        // Replies to everything in this read (handshake answer, pongs, echoes, errors, Close)
        // leave as one queued frame: a burst of small client frames costs one queue slot.
        self.replying = Some(key);
        match conn.state {
            State::Handshake => self.read_handshake(key, data, now),
            State::Open => {
                conn.deadline = now.tick_after(self.cfg.idle_timeout_ms);
                self.read_frames(key, data, now);
            }
            State::Closing => self.read_frames(key, data, now),
            State::Flushing | State::Polling | State::Terminating => {}
        }
        self.flush_replies(key, now);
        self.replying = None;
    }

    /// Queues the replies gathered so far for `key` while its read is handled. Called at the
    /// end of the read, and before anything else is queued to it directly (a backfill answered
    /// by this same shard must not overtake the handshake reply still gathered here).
    fn flush_replies(&mut self, key: u32, now: Now) {
        if self.replying != Some(key) || self.replies.is_empty() {
            return;
        }
        let bytes = std::mem::take(&mut self.replies);
        if self.conns.get(key as usize).is_some_and(|c| c.state != State::Terminating) {
            let id = self.outbox.add_owned(bytes, Class::Keep);
            self.enqueue(key, id, now);
        }
    }

    /// The peer closed its side, or reading failed: nothing more will arrive.
    pub fn on_eof(&mut self, key: u32) {
        let Some(conn) = self.conns.get(key as usize) else { return };
        match conn.state {
            State::Terminating => {}
            State::Closing | State::Flushing => self.terminate(key, None),
            State::Handshake | State::Open | State::Polling => self.terminate(key, Some(Series::ClosedPeer)),
        }
    }

    /// Next connection with frames to send and no send in flight.
    pub fn pop_ready(&mut self) -> Option<u32> {
        while let Some(key) = self.ready.pop_front() {
            if let Some(conn) = self.conns.get_mut(key as usize) {
                conn.flags &= !flag::READY;
                return Some(key);
            }
        }
        None
    }

    /// The driver's measure of recent load: the share of time (in thousandths) the busiest
    /// shard's loop was not sleeping. Block ticks wait while it is high (see `block_tick`).
    pub fn set_busy(&mut self, permille: u32) {
        self.busy_permille = permille;
    }

    /// Whether connections are waiting for a send.
    pub fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// Fills `iov` with the frames one send should write to `key` and marks them in flight.
    /// The bytes stay alive and unmoved until `on_sent` (or `release`) for this connection.
    pub fn next_send<'a>(&'a mut self, key: u32, iov: &mut [IoSlice<'a>]) -> usize {
        let Some(conn) = self.conns.get_mut(key as usize) else { return 0 };
        if conn.state == State::Terminating || conn.queue.is_empty() || conn.queue.in_flight() {
            return 0;
        }
        let format = conn.format();
        let n = self.outbox.gather(&mut conn.queue, format, iov);
        self.sends_in_flight += usize::from(n > 0);
        self.counters.inc(Series::Sends);
        self.counters.add(Series::FramesOut, n as u64);
        n
    }

    /// A send completed: `result` is bytes written or a negative errno.
    pub fn on_sent(&mut self, key: u32, result: i32) {
        self.sends_in_flight = self.sends_in_flight.saturating_sub(1);
        let Some(conn) = self.conns.get_mut(key as usize) else { return };
        let format = conn.format();
        if result < 0 {
            self.outbox.abort(&mut conn.queue);
            if conn.state != State::Terminating {
                self.terminate(key, Some(Series::ClosedError));
            }
            return;
        }
        self.counters.add(Series::BytesOut, result as u64);
        self.outbox.sent(&mut conn.queue, format, result as usize);
        if conn.queue.is_empty() {
            // Caught up: no longer behind, whatever was shed before.
            conn.behind_since = 0;
        }
        match conn.state {
            State::Terminating => self.outbox.clear(&mut conn.queue),
            _ if !conn.queue.is_empty() => self.mark_ready(key),
            State::Flushing => self.terminate(key, None),
            _ => {}
        }
    }

    /// The driver has closed the connection and no operation of it is pending: forget it.
    pub fn release(&mut self, key: u32) {
        if !self.conns.contains(key as usize) {
            return;
        }
        let mut conn = self.conns.remove(key as usize);
        self.outbox.abort(&mut conn.queue);
        self.outbox.clear(&mut conn.queue);
    }

    /// Connections to close: the driver cancels their operations, closes the socket and calls
    /// `release` once nothing of theirs is in flight.
    pub fn take_terminating(&mut self, out: &mut Vec<u32>) {
        out.append(&mut self.terminating);
    }

    /// Mail for other shards, in order.
    pub fn take_mail(&mut self) -> std::vec::Drain<'_, (ShardId, Mail)> {
        self.mail.drain(..)
    }

    /// The driver's handle of a connection.
    pub fn io(&self, key: u32) -> Option<u64> {
        self.conns.get(key as usize).map(|c| c.io)
    }

    /// Updates the driver's handle of a connection.
    pub fn set_io(&mut self, key: u32, io: u64) {
        if let Some(c) = self.conns.get_mut(key as usize) {
            c.io = io;
        }
    }

    /// Connections of any state.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Frames queued to a connection, in flight included (None for no such connection). For
    /// tests that bound a slow reader's memory.
    pub fn queue_len(&self, key: u32) -> Option<usize> {
        self.conns.get(key as usize).map(|c| c.queue.len())
    }

    /// Frames stored in the outbox, each held by at least one queue (for tests).
    pub fn outbox_frames(&self) -> usize {
        self.outbox.frames()
    }

    pub fn counters(&mut self) -> &mut Counters {
        &mut self.counters
    }

    /// Whether `Mail::Stop` arrived.
    pub fn stopping(&self) -> bool {
        self.stopping
    }

    /// Milliseconds until `on_tick` has work.
    pub fn next_timeout(&self, now: Now) -> u64 {
        self.next_block_ms.min(self.next_sweep_ms).saturating_sub(now.ms)
    }

    /// Block tick and timeout sweep, when due.
    pub fn on_tick(&mut self, now: Now) {
        if now.ms >= self.next_block_ms {
            self.block_tick(now);
        }
        if now.ms >= self.next_sweep_ms {
            self.sweep(now);
            self.next_sweep_ms = now.ms + SWEEP_EVERY_MS;
        }
        if now.ms >= self.next_room_sweep_ms {
            self.owner.sweep(now.unix);
            self.sweep_moderation(now);
            self.next_room_sweep_ms = now.ms + ROOM_IDLE_MS as u64 / 4;
        }
    }

    /// The owner's block tick, adaptive: while the shard is saturated — its loop had almost no
    /// idle time lately, or the last fan-out is still waiting to be written to a good share of
    /// its connections — the next block waits (up to `block_wait_max_ms` past its tick) and
    /// takes in what arrives meanwhile. Under load blocks grow instead of send queues, so one
    /// send carries more messages and latency stays near the fan-out time.
    fn block_tick(&mut self, now: Now) {
        let due = self.block_due_ms;
        let backlog = self.ready.len() + self.sends_in_flight;
        let busy = backlog > self.conns.len() / 8 + BLOCK_BACKLOG_MIN || self.busy_permille >= BUSY_PERMILLE;
        if busy && now.ms < due + self.cfg.block_wait_max_ms {
            self.counters.inc(Series::BlocksDeferred);
            self.next_block_ms = now.ms + BLOCK_RETRY_MS;
            return;
        }
        self.cut_blocks(now);
        self.block_due_ms = due + self.cfg.block_interval_ms;
        if self.block_due_ms <= now.ms {
            // Fell behind (a long turn or a wait): skip ticks rather than burst.
            self.block_due_ms = now.ms + self.cfg.block_interval_ms;
        }
        self.next_block_ms = self.block_due_ms;
    }

    /// End of a turn: tell owners about membership changes and refresh gauges.
    pub fn flush(&mut self, now: Now) {
        let shard = self.cfg.shard;
        let mut reports = Vec::new();
        self.rooms.flush_presence(&mut |p| {
            let mail = Mail::Presence {
                room: p.room.clone(),
                from: shard,
                members: p.members,
                json: p.json,
                left: p.left,
                left_users: p.left_users,
            };
            reports.push((p.room.owner(self.cfg.shards), mail));
        });
        for (owner, mail) in reports {
            self.post(owner, mail, now);
        }
        let c = &mut self.counters;
        c.set(Series::Connections, self.conns.len() as u64);
        c.set(Series::ConnectionsOpen, self.websockets);
        c.set(Series::RoomsOwned, self.owner.rooms() as u64);
        c.set(Series::RoomsLocal, self.rooms.len() as u64);
        c.set(Series::PartialBytes, self.partial_bytes as u64);
    }

    /// Sends mail to a shard; mail for this shard is handled at once, so local and remote
    /// rooms take the same path.
    fn post(&mut self, to: ShardId, mail: Mail, now: Now) {
        if to == self.cfg.shard {
            self.on_mail(mail, now);
        } else {
            self.mail.push((to, mail));
        }
    }

    /// Sends one mail to every shard (this one included).
    fn post_all(&mut self, mut make: impl FnMut() -> Mail, now: Now) {
        for i in 0..self.cfg.shards {
            let mail = make();
            self.post(ShardId(i as u16), mail, now);
        }
    }

    /// Walks a slice of the connections and acts on expired deadlines.
    fn sweep(&mut self, now: Now) {
        let tick = now.tick();
        let cap = self.conns.capacity().max(1);
        let chunk = cap.div_ceil(SWEEP_SLICES);
        let start = self.sweep_cursor.min(cap);
        let end = (start + chunk).min(cap);
        self.sweep_cursor = if end >= cap { 0 } else { end };
        let slow_ticks = self.cfg.slow_consumer_ms.div_ceil(100) as u32;
        for key in start..end {
            let Some(conn) = self.conns.get(key) else { continue };
            if conn.behind_since != 0 && tick.saturating_sub(conn.behind_since) > slow_ticks {
                self.slow_consumer(key as u32, now);
                continue;
            }
            if conn.deadline == 0 || conn.deadline > tick {
                continue;
            }
            let key = key as u32;
            match conn.state {
                State::Handshake | State::Polling => {
                    self.counters.inc(Series::HsTimeout);
                    self.terminate(key, None);
                }
                State::Open => {
                    self.close(key, crate::wire::CloseCode::GOING_AWAY, "idle timeout", Series::ClosedIdle, now)
                }
                State::Closing | State::Flushing => self.terminate(key, Some(Series::ClosedCloseTimeout)),
                State::Terminating => {}
            }
        }
    }

    fn mark_ready(&mut self, key: u32) {
        if let Some(conn) = self.conns.get_mut(key as usize)
            && !conn.has(flag::READY)
            && !conn.queue.in_flight()
        {
            conn.flags |= flag::READY;
            self.ready.push_back(key);
        }
    }

    /// Queues a frame to one connection, shedding lower frames if its queue is full. Returns
    /// false when the frame was not queued.
    fn enqueue(&mut self, key: u32, frame: FrameId, now: Now) -> bool {
        let max = self.cfg.send_queue_frames_max;
        let Some(conn) = self.conns.get_mut(key as usize) else {
            self.outbox.forget_if_unused(frame);
            return false;
        };
        let pushed = self.outbox.push(&mut conn.queue, frame, max);
        self.outbox.forget_if_unused(frame);
        if pushed != outbox::Pushed::Queued {
            self.counters.inc(Series::FramesDropped);
            if conn.behind_since == 0 {
                conn.behind_since = now.tick();
            }
        }
        match pushed {
            outbox::Pushed::Queued | outbox::Pushed::DroppedOldest => {
                self.mark_ready(key);
                true
            }
            outbox::Pushed::DroppedNew => false,
            outbox::Pushed::Full => {
                self.slow_consumer(key, now);
                false
            }
        }
    }

    /// A reader that cannot keep up: closed (it would only fall further behind), unless its
    /// user is whitelisted in its room, who is never auto-kicked and just keeps shedding.
    fn slow_consumer(&mut self, key: u32, now: Now) {
        let Some(conn) = self.conns.get(key as usize) else { return };
        let user = self.users.name(conn.user);
        let room = self.rooms.get(conn.room).map(|r| &r.name);
        if let (Some(user), Some(room)) = (user, room)
            && self.moderation.get(room).is_some_and(|m| m.contains(List::Whitelist, user, now.unix.0))
        {
            return;
        }
        self.terminate(key, Some(Series::ClosedSlow));
    }

    /// Queues bytes built for one connection (never dropped for a later frame).
    fn enqueue_owned(&mut self, key: u32, bytes: Vec<u8>, now: Now) -> bool {
        if self.replying == Some(key) {
            self.replies.extend_from_slice(&bytes);
            return true;
        }
        let id = self.outbox.add_owned(bytes, Class::Keep);
        self.enqueue(key, id, now)
    }

    /// Ends a connection now: out of its room and user index, queue dropped (but what is in
    /// flight), and handed to the driver to close.
    fn terminate(&mut self, key: u32, reason: Option<Series>) {
        let Some(conn) = self.conns.get_mut(key as usize) else { return };
        if conn.state == State::Terminating {
            return;
        }
        if conn.has(flag::OPENED) {
            self.websockets = self.websockets.saturating_sub(1);
        }
        conn.state = State::Terminating;
        conn.deadline = 0;
        self.partial_bytes = self.partial_bytes.saturating_sub(conn.reader.buffered_bytes());
        conn.reader.reset();
        self.outbox.clear(&mut conn.queue);
        if let Some(r) = reason {
            self.counters.inc(r);
        }
        self.take_head(key);
        self.send_buckets.remove(&key);
        self.leave_room(key);
        self.leave_user(key);
        self.terminating.push(key);
    }

    fn leave_user(&mut self, key: u32) {
        let Some(conn) = self.conns.get_mut(key as usize) else { return };
        let user = std::mem::replace(&mut conn.user, index::NONE);
        if user != index::NONE {
            self.users.remove(user, key);
        }
    }

    /// Removes a connection's partial request head, releasing its bytes from the budget.
    fn take_head(&mut self, key: u32) -> Option<Vec<u8>> {
        let head = self.heads.remove(&key)?;
        self.partial_bytes = self.partial_bytes.saturating_sub(head.len());
        Some(head)
    }

    /// Keeps a partial request head if the shard's partial-input budget allows.
    fn stash_head(&mut self, key: u32, head: Vec<u8>) -> bool {
        if self.partial_bytes + head.len() > self.cfg.partial_bytes_max {
            self.counters.inc(Series::ClosedBudget);
            return false;
        }
        self.partial_bytes += head.len();
        self.heads.insert(key, head);
        true
    }

    /// Accounts a reader's buffered bytes going from `before` to `after`; false when the
    /// shard's partial-input budget is now exceeded by growth.
    fn account_partial(&mut self, before: usize, after: usize) -> bool {
        self.partial_bytes = (self.partial_bytes + after).saturating_sub(before);
        after <= before || self.partial_bytes <= self.cfg.partial_bytes_max
    }

    /// Encodes a server frame for one connection in its format.
    fn encode_for(&self, key: u32, frame: &crate::proto::ServerFrame) -> Option<Vec<u8>> {
        let conn = self.conns.get(key as usize)?;
        Some(crate::envelope::encode(frame, conn.format()))
    }

    /// Registers a shared frame for a fan-out.
    fn shared(&mut self, frame: Arc<SharedFrame>) -> FrameId {
        self.outbox.add_shared(frame)
    }
}

#[cfg(test)]
mod tests;
