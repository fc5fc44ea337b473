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
use crate::ids::{ShardId, UnixMs};
use crate::metrics::{Counters, Series};
use crate::room::RoomName;
use crate::room::mixer::MixerLimits;
use crate::room::owner::{Owner, OwnerConfig, SharedFrame};
use crate::wire::HandshakeLimits;
use crate::wire::reader::ReadLimits;

/// The time as the driver read it at the start of a turn.
#[derive(Clone, Copy, Debug)]
pub struct Now {
    /// Monotonic milliseconds since the shard started.
    pub ms: u64,
    /// Wall clock, for timestamps on messages.
    pub unix: UnixMs,
}

impl Now {
    /// 100 ms ticks since start, plus one so that 0 can mean "no deadline".
    fn tick(self) -> u32 {
        (self.ms / 100) as u32 + 1
    }

    fn tick_after(self, ms: u64) -> u32 {
        self.tick().saturating_add(ms.div_ceil(100) as u32)
    }
}

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
    pub block_interval_ms: u64,
    pub rooms_max: usize,
    pub mixer: MixerLimits,
    pub jwt_secret: Vec<u8>,
    pub jwt_leeway_s: u64,
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
            block_interval_ms: c.rooms.block_interval_ms,
            rooms_max: c.rooms.rooms_max,
            mixer: MixerLimits {
                block_messages_max: c.rooms.block_messages_max,
                pending_messages_max: c.rooms.pending_messages_max,
            },
            jwt_secret: c.auth.jwt_secret.as_bytes().to_vec(),
            jwt_leeway_s: c.auth.jwt_leeway_s,
        }
    }
}

/// Timeouts are checked by sweeping a tenth of the connections every 100 ms.
const SWEEP_EVERY_MS: u64 = 100;
const SWEEP_SLICES: usize = 10;
/// Owned rooms idle this long are forgotten (their seqs stay monotonic, see owner.rs).
const ROOM_IDLE_MS: i64 = 60_000;

/// One shard's connections, rooms and frames.
pub struct Hub {
    cfg: HubConfig,
    verifier: Option<Verifier>,
    conns: Slab<Conn>,
    /// Partial upgrade requests (rare: most arrive in one segment).
    heads: HashMap<u32, Vec<u8>>,
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
    counters: Counters,
    websockets: u64,
    next_block_ms: u64,
    next_sweep_ms: u64,
    sweep_cursor: usize,
    next_room_sweep_ms: u64,
    stopping: bool,
}

impl Hub {
    pub fn new(cfg: HubConfig) -> Hub {
        let verifier = (!cfg.jwt_secret.is_empty()).then(|| Verifier::new(&cfg.jwt_secret, cfg.jwt_leeway_s));
        let owner = Owner::new(OwnerConfig {
            shard: cfg.shard,
            shards: cfg.shards,
            limits: cfg.mixer,
            rooms_max: cfg.rooms_max,
            room_idle_ms: ROOM_IDLE_MS,
        });
        Hub {
            verifier,
            conns: Slab::new(),
            heads: HashMap::new(),
            rooms: Rooms::new(cfg.rooms_max),
            users: Users::default(),
            outbox: Outbox::default(),
            owner,
            ready: VecDeque::new(),
            terminating: Vec::new(),
            mail: Vec::new(),
            replying: None,
            replies: Vec::new(),
            counters: Counters::default(),
            websockets: 0,
            next_block_ms: cfg.block_interval_ms,
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
            State::Flushing | State::Terminating => {}
        }
        self.replying = None;
        if !self.replies.is_empty() {
            let bytes = std::mem::take(&mut self.replies);
            if self.conns.get(key as usize).is_some_and(|c| c.state != State::Terminating) {
                let id = self.outbox.add_owned(bytes, true);
                self.enqueue(key, id);
            }
        }
    }

    /// The peer closed its side, or reading failed: nothing more will arrive.
    pub fn on_eof(&mut self, key: u32) {
        let Some(conn) = self.conns.get(key as usize) else { return };
        match conn.state {
            State::Terminating => {}
            State::Closing | State::Flushing => self.terminate(key, None),
            State::Handshake | State::Open => self.terminate(key, Some(Series::ClosedPeer)),
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
        let n = self.outbox.gather(&mut conn.queue, format, conn.sent_offset as usize, iov);
        self.counters.inc(Series::Sends);
        self.counters.add(Series::FramesOut, n as u64);
        n
    }

    /// A send completed: `result` is bytes written or a negative errno.
    pub fn on_sent(&mut self, key: u32, result: i32) {
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
        let offset = self.outbox.sent(&mut conn.queue, format, conn.sent_offset as usize, result as usize);
        conn.sent_offset = offset as u32;
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
            self.cut_blocks(now);
            self.next_block_ms += self.cfg.block_interval_ms;
            if self.next_block_ms <= now.ms {
                // Fell behind (a long turn): skip ticks rather than burst.
                self.next_block_ms = now.ms + self.cfg.block_interval_ms;
            }
        }
        if now.ms >= self.next_sweep_ms {
            self.sweep(now);
            self.next_sweep_ms = now.ms + SWEEP_EVERY_MS;
        }
        if now.ms >= self.next_room_sweep_ms {
            self.owner.sweep(now.unix);
            self.next_room_sweep_ms = now.ms + ROOM_IDLE_MS as u64 / 4;
        }
    }

    /// End of a turn: tell owners about membership changes and refresh gauges.
    pub fn flush(&mut self, now: Now) {
        let shard = self.cfg.shard;
        let shards = self.cfg.shards;
        let mut local = Vec::new();
        let mail = &mut self.mail;
        self.rooms.flush_presence(&mut |room, members, json| {
            let owner = room.owner(shards);
            if owner == shard {
                local.push((room.clone(), members, json));
            } else {
                mail.push((owner, Mail::Presence { room: room.clone(), from: shard, members, json }));
            }
        });
        for (room, members, json) in local {
            self.presence(&room, shard, members, json, now);
        }
        let c = &mut self.counters;
        c.set(Series::Connections, self.conns.len() as u64);
        c.set(Series::ConnectionsOpen, self.websockets);
        c.set(Series::RoomsOwned, self.owner.rooms() as u64);
        c.set(Series::RoomsLocal, self.rooms.len() as u64);
    }

    fn presence(&mut self, room: &RoomName, from: ShardId, members: u32, json: u32, now: Now) {
        if !self.owner.presence(room, from, members, json, now.unix) {
            self.counters.inc(Series::DropNoRoom);
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
        for key in start..end {
            let Some(conn) = self.conns.get(key) else { continue };
            if conn.deadline == 0 || conn.deadline > tick {
                continue;
            }
            let key = key as u32;
            match conn.state {
                State::Handshake => {
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

    /// Queues a frame of this shard's own to one connection. Returns false (and terminates
    /// the connection as a slow consumer) when its queue holds nothing droppable.
    fn enqueue(&mut self, key: u32, frame: FrameId) -> bool {
        let max = self.cfg.send_queue_frames_max;
        let Some(conn) = self.conns.get_mut(key as usize) else {
            self.outbox.forget_if_unused(frame);
            return false;
        };
        let pushed = self.outbox.push(&mut conn.queue, frame, max);
        self.outbox.forget_if_unused(frame);
        match pushed {
            outbox::Pushed::Queued => {}
            outbox::Pushed::DroppedOldest => self.counters.inc(Series::FramesDropped),
            outbox::Pushed::Full => {
                self.counters.inc(Series::FramesDropped);
                self.terminate(key, Some(Series::ClosedSlow));
                return false;
            }
        }
        self.mark_ready(key);
        true
    }

    /// Queues bytes built for one connection (never dropped for a later frame).
    fn enqueue_owned(&mut self, key: u32, bytes: Vec<u8>) -> bool {
        if self.replying == Some(key) {
            self.replies.extend_from_slice(&bytes);
            return true;
        }
        let id = self.outbox.add_owned(bytes, true);
        self.enqueue(key, id)
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
        conn.reader.reset();
        self.outbox.clear(&mut conn.queue);
        if let Some(r) = reason {
            self.counters.inc(r);
        }
        self.heads.remove(&key);
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
