//! The owner's desk: mail for the rooms this shard owns, handled by `room::Owner` — publishes
//! and client sends, presence and joins, polls, moderation, attributes, room info — and the
//! block tick that cuts each dirty room's block, encodes it once, and addresses the same frame
//! to every shard with members (this one included: the hub routes it). Answers go back as mail
//! to the asking connection's shard, or on the API thread's reply channel.

use super::mail::{ConnAt, HostMail, Mail, Origin, OwnerMail};
use super::post::PostOffice;
use crate::ids::{Now, ShardId, UserId};
use crate::metrics::{Counters, Series};
use crate::proto::{Ack, Message, RoomState};
use crate::room::RoomName;
use crate::room::attrs::AttrError;
use crate::room::durable::StoreOp;
use crate::room::moderation::{List, ModerationError};
use crate::room::owner::{Loaded, ModAction, Owner, OwnerConfig, Phase, PublishError, Published, Sender};
use std::collections::HashMap;

/// A block waits for the last fan-out only when more than an eighth of the connections, plus
/// this many, still wait for a send (a few slow readers must not hold blocks back).
const BLOCK_BACKLOG_MIN: usize = 64;
/// How often a waiting block looks again.
const BLOCK_RETRY_MS: u64 = 5;
/// A shard whose loop was busy this share of the time (in thousandths) is saturated.
const BUSY_PERMILLE: u32 = 850;
/// How soon a room whose lease another node holds asks for it again.
const LEASE_RETRY_MS: u64 = 100;

/// How loaded the shard is, for the adaptive block tick.
#[derive(Clone, Copy, Debug, Default)]
pub struct Load {
    /// Connections with frames waiting for a send or a send in flight.
    pub backlog: usize,
    pub conns: usize,
    /// The busiest shard's loop busy share lately, in thousandths.
    pub busy_permille: u32,
}

/// What the desk needs from the config.
#[derive(Clone, Debug)]
pub struct DeskConfig {
    pub block_interval_ms: u64,
    pub block_wait_max_ms: u64,
    pub owner: OwnerConfig,
    /// For room names in a snapshot taken over from another process.
    pub name_bytes_max: usize,
    /// Loads from durable storage (when `owner.durable`).
    pub loads: LoadLimits,
}

/// Bounds of loading rooms from durable storage.
#[derive(Clone, Copy, Debug)]
pub struct LoadLimits {
    /// Rooms loading at once; past it a room starts from memory alone.
    pub in_flight_max: usize,
    /// Requests parked per loading room; past it they are served from memory.
    pub waiters_max: usize,
    pub timeout_ms: u64,
    /// In a cluster: how long a room whose lease another node holds waits for it.
    pub held_timeout_ms: u64,
}

/// The rooms this shard owns and their block schedule.
pub struct Desk {
    cfg: DeskConfig,
    owner: Owner,
    counters: Counters,
    mail: Vec<(ShardId, Mail)>,
    /// When the next block tick runs (later than `block_due_ms` while a block waits).
    next_block_ms: u64,
    /// When the next block is due by the interval.
    block_due_ms: u64,
    next_room_sweep_ms: u64,
    /// The rooms were exported to a new process: nothing changes here any more (no publish,
    /// no attribute or list change, no block) until thawed.
    frozen: bool,
    /// Requests for rooms being loaded from durable storage, answered once they are.
    parked: HashMap<RoomName, Vec<OwnerMail>>,
    /// Writes and loads for the store since the shard last took them.
    store_ops: Vec<StoreOp>,
    /// In a cluster: loading rooms whose lease another node holds, and when to try again.
    held: HashMap<RoomName, u64>,
}

impl Desk {
    pub fn new(cfg: DeskConfig) -> Desk {
        Desk {
            owner: Owner::new(cfg.owner.clone()),
            counters: Counters::default(),
            mail: Vec::new(),
            next_block_ms: cfg.block_interval_ms,
            block_due_ms: cfg.block_interval_ms,
            next_room_sweep_ms: Self::room_sweep_every_ms(&cfg),
            frozen: false,
            parked: HashMap::new(),
            store_ops: Vec::new(),
            held: HashMap::new(),
            cfg,
        }
    }

    /// Handles one request for a room this shard owns. `post` tells whether the way to another
    /// shard is congested: an action that would mail every shard is then refused.
    pub fn handle_mail(&mut self, mail: OwnerMail, now: Now, post: &PostOffice) {
        let mail = match self.frozen {
            true => match self.refuse_frozen(mail, now) {
                Some(mail) => mail,
                None => return,
            },
            false => mail,
        };
        let mail = match self.cfg.owner.durable {
            true => match self.park(mail, now) {
                Some(mail) => mail,
                None => return,
            },
            false => mail,
        };
        match mail {
            OwnerMail::Publish { room, msg, priority, reply } => {
                let result = self.publish(&room, *msg, Sender::Api { priority }, now);
                reply.send(result);
            }
            OwnerMail::PublishBatch { items, reply } => {
                let results = items
                    .into_iter()
                    .map(|(room, msg, priority)| self.publish(&room, msg, Sender::Api { priority }, now))
                    .collect();
                reply.send(results);
            }
            OwnerMail::Send { room, msg, user, weight, priority, from, ack } => {
                match (self.publish(&room, *msg, Sender::Client { user, weight, priority }, now), ack) {
                    (Ok(p), Some(ack)) => self.owner.expect_ack(&room, p.id, from.shard, from.conn, ack),
                    (Ok(_), None) => {}
                    (Err(e), ack) => {
                        let (code, reason) = e.code();
                        self.refuse_send(&room, from, ack, u32::from(code), reason);
                    }
                }
            }
            OwnerMail::Presence { room, from, members, json, deflate, deflate_json, left, left_users } => {
                self.owner.presence(&room, from, (members, json, deflate, deflate_json), &left_users, left, now)
            }
            OwnerMail::Joined { room, from, user, after } => {
                let frames = self.owner.joined(&room, user.as_ref(), after, now);
                if !frames.is_empty() {
                    self.mail.push((from.shard, HostMail::ToConn { room, conn: from.conn, frames }.into()));
                }
            }
            OwnerMail::Poll { room, after, limit, from } => self.poll(&room, after, limit, from),
            OwnerMail::Moderate { room, user, action, reason, origin } => {
                self.moderate(room, user, action, reason, origin, now, post)
            }
            OwnerMail::SetAttr { room, key, value, origin } => {
                let result = self.owner.set_attr(&room, &key, value.as_deref(), now);
                if result.is_err() {
                    self.counters.inc(Series::RefusedAttrs);
                }
                self.answer(origin, result, |e| (e.status(), e.message()));
            }
            OwnerMail::AttrSync { room, after, from } => {
                if let Some(frame) = self.owner.attr_sync(&room, after) {
                    let frames = vec![std::sync::Arc::new(frame)];
                    self.mail.push((from.shard, HostMail::ToConn { room, conn: from.conn, frames }.into()));
                }
            }
            OwnerMail::RoomInfo { room, reply } => reply.send(self.owner.info(&room)),
            OwnerMail::TopRooms { n, reply } => reply.send(self.owner.top(n)),
            OwnerMail::ModerationList { room, reply } => reply.send(self.owner.moderation(&room, now.unix)),
            OwnerMail::Attrs { room, reply } => reply.send(self.owner.attrs(&room)),
            OwnerMail::Flush => self.flush(now),
            OwnerMail::Export { reply } => {
                // A room still loading goes on from memory, so what waits in it is cut and
                // handed over too.
                for room in self.owner.loads_started_before(u64::MAX) {
                    self.loaded(&room, None, now, post);
                }
                self.cut_all(now);
                let rooms = self.owner.export(now.unix.0);
                self.counters.add(Series::RoomsExported, rooms.len() as u64);
                self.frozen = true;
                reply.send(rooms);
            }
            OwnerMail::Thaw => self.frozen = false,
            OwnerMail::Loaded { room, state } => {
                self.held.remove(&room);
                self.loaded(&room, state.map(|s| *s), now, post)
            }
            OwnerMail::Held { room } => {
                // Still loading: the requests stay parked and the lease is asked for again.
                if self.owner.phase(&room) == Phase::Loading {
                    self.counters.inc(Series::LeaseHeld);
                    self.held.insert(room, now.ms + LEASE_RETRY_MS);
                }
            }
            OwnerMail::LeaseLost { room } => {
                if self.owner.remove(&room) {
                    self.counters.inc(Series::LeaseLost);
                }
            }
        }
    }

    /// In a cluster, when the live set changed: every pending message is cut into a block and
    /// delivered, then the rooms now owned by another node are let go (their leases released
    /// once their writes are in), so the new owner goes on from what was stored.
    pub fn placement_changed(&mut self, now: Now, is_mine: &dyn Fn(&RoomName) -> bool) {
        if self.frozen {
            return;
        }
        self.cut_all(now);
        for room in self.owner.room_names() {
            if is_mine(&room) || self.parked.contains_key(&room) {
                continue;
            }
            self.held.remove(&room);
            if self.owner.remove(&room) {
                self.counters.inc(Series::RoomsMoved);
                self.store_ops.push(StoreOp::Release { room });
            }
        }
    }

    /// For a durable owner: a request for a room not in memory starts its load and waits for
    /// it (parked, up to `waiters_max` per room), so that it sees the stored history, lists and
    /// attributes. Publishes go on into the room's mixer at once (nothing is cut before the
    /// load), presence too. None when the mail was parked.
    fn park(&mut self, mail: OwnerMail, now: Now) -> Option<OwnerMail> {
        let room = match &mail {
            OwnerMail::Publish { room, .. } => {
                self.ensure_loading(room, now);
                return Some(mail);
            }
            OwnerMail::Presence { room, members, .. } => {
                if *members > 0 {
                    self.ensure_loading(room, now);
                }
                return Some(mail);
            }
            OwnerMail::PublishBatch { items, .. } => {
                for (room, _, _) in items {
                    self.ensure_loading(room, now);
                }
                return Some(mail);
            }
            OwnerMail::Send { room, .. }
            | OwnerMail::Joined { room, .. }
            | OwnerMail::Poll { room, .. }
            | OwnerMail::Moderate { room, .. }
            | OwnerMail::SetAttr { room, .. }
            | OwnerMail::AttrSync { room, .. }
            | OwnerMail::RoomInfo { room, .. }
            | OwnerMail::ModerationList { room, .. }
            | OwnerMail::Attrs { room, .. } => room.clone(),
            OwnerMail::TopRooms { .. }
            | OwnerMail::Flush
            | OwnerMail::Export { .. }
            | OwnerMail::Thaw
            | OwnerMail::Loaded { .. }
            | OwnerMail::Held { .. }
            | OwnerMail::LeaseLost { .. } => return Some(mail),
        };
        if !self.ensure_loading(&room, now) {
            return Some(mail);
        }
        let waiting = self.parked.entry(room).or_default();
        if waiting.len() >= self.cfg.loads.waiters_max {
            self.counters.inc(Series::LoadWaitersFull);
            return Some(mail);
        }
        waiting.push(mail);
        None
    }

    /// True while the room is loading (its load started now if it was not in memory and the
    /// loads in flight allow; else it goes on from memory alone).
    fn ensure_loading(&mut self, room: &RoomName, now: Now) -> bool {
        match self.owner.phase(room) {
            Phase::Ready => false,
            Phase::Loading => true,
            Phase::Absent if self.owner.loads() >= self.cfg.loads.in_flight_max => {
                self.counters.inc(Series::LoadSkipped);
                false
            }
            Phase::Absent => {
                self.owner.start_loading(room, now);
                self.store_ops.push(StoreOp::Load { room: room.clone(), owner: self.cfg.owner.shard });
                true
            }
        }
    }

    /// A load ended (None: it failed or timed out): the room takes the state, then the parked
    /// requests are served in their order.
    fn loaded(&mut self, room: &RoomName, state: Option<RoomState>, now: Now, post: &PostOffice) {
        let outcome = self.owner.loaded(room, state, now);
        self.counters.inc(match outcome {
            Loaded::Found => Series::LoadFound,
            Loaded::Empty => Series::LoadEmpty,
            Loaded::Failed => Series::LoadFailed,
        });
        if outcome == Loaded::Found {
            self.replicate_lists(room, now);
        }
        for mail in self.parked.remove(room).unwrap_or_default() {
            self.handle_mail(mail, now, post);
        }
        self.owner.drop_if_unused(room);
    }

    /// Another node's view of the cluster changed (it joined, saw one leave, or its subscriber
    /// came back from a break): it may lack the bans and whitelists of the rooms owned here,
    /// which it learnt only as they were set or loaded. Every node is told them again.
    pub fn resync(&mut self, now: Now) {
        for room in self.owner.moderated() {
            self.replicate_lists(&room, now);
        }
    }

    /// Every shard learns a loaded room's bans and whitelist (joins are checked there), and a
    /// banned user who joined while the room was loading is closed.
    fn replicate_lists(&mut self, room: &RoomName, now: Now) {
        let lists = self.owner.moderation(room, now.unix);
        let reason: std::sync::Arc<str> = "banned".into();
        for s in 0..self.cfg.owner.shards {
            let to = ShardId(s as u16);
            for (list, entries) in [(List::Ban, &lists.bans), (List::Whitelist, &lists.whitelist)] {
                for e in entries {
                    let (room, user) = (room.clone(), UserId::new(&e.user));
                    let replicate = HostMail::Replicate { room, user, list, until_ms: e.until_ms, add: true };
                    self.mail.push((to, replicate.into()));
                }
            }
            for e in &lists.bans {
                let kick = HostMail::Kick { room: room.clone(), user: UserId::new(&e.user), reason: reason.clone() };
                self.mail.push((to, kick.into()));
            }
        }
    }

    /// A room whose lease another node kept past the load timeout: what waited for it is
    /// refused (503, retry) and the room is forgotten here.
    fn give_up_held(&mut self, room: &RoomName, now: Now) {
        for mail in self.parked.remove(room).unwrap_or_default() {
            // Changes are refused with "retry"; reads are dropped (their askers time out).
            let _ = self.refuse_frozen(mail, now);
        }
        self.owner.remove(room);
    }

    /// The store could not take a load request (its queue is full): the room goes on from
    /// memory alone.
    pub fn load_refused(&mut self, room: &RoomName, now: Now, post: &PostOffice) {
        self.loaded(room, None, now, post);
    }

    /// Moves the writes and loads gathered since the last call to `out`.
    pub fn take_store_ops(&mut self, out: &mut Vec<StoreOp>) {
        self.owner.take_store_ops(out);
        out.append(&mut self.store_ops);
    }

    /// While frozen: refuses (503, retry: the next process will take it) what would change a
    /// room, answers a repeated export and a drain's flush without cutting anything (a cut would
    /// hand out seqs the next process also hands out), and passes the rest on.
    fn refuse_frozen(&mut self, mail: OwnerMail, now: Now) -> Option<OwnerMail> {
        match mail {
            OwnerMail::Publish { reply, .. } => {
                self.counters.inc(Series::DropHandover);
                reply.send(Err(PublishError::HandedOver));
            }
            OwnerMail::PublishBatch { items, reply } => {
                self.counters.add(Series::DropHandover, items.len() as u64);
                reply.send(vec![Err(PublishError::HandedOver); items.len()]);
            }
            OwnerMail::Send { room, from, ack, .. } => {
                self.counters.inc(Series::DropHandover);
                let (code, reason) = PublishError::HandedOver.code();
                self.refuse_send(&room, from, ack, u32::from(code), reason);
            }
            OwnerMail::Moderate { origin, .. } => {
                self.counters.inc(Series::RefusedHandover);
                let e = ModerationError::HandedOver;
                self.answer(origin, Err::<(), _>(e), |e| (e.status(), e.message()));
            }
            OwnerMail::SetAttr { origin, .. } => {
                self.counters.inc(Series::RefusedHandover);
                self.answer(origin, Err::<u64, _>(AttrError::HandedOver), |e| (e.status(), e.message()));
            }
            OwnerMail::Flush => self.mail_flushed(),
            OwnerMail::Export { reply } => reply.send(self.owner.export(now.unix.0)),
            OwnerMail::Thaw => self.frozen = false,
            // A load's answer is taken in (nothing is cut while frozen); its waiters come back
            // through here.
            mail @ (OwnerMail::Presence { .. }
            | OwnerMail::Loaded { .. }
            | OwnerMail::Held { .. }
            | OwnerMail::LeaseLost { .. }
            | OwnerMail::Joined { .. }
            | OwnerMail::Poll { .. }
            | OwnerMail::AttrSync { .. }
            | OwnerMail::RoomInfo { .. }
            | OwnerMail::TopRooms { .. }
            | OwnerMail::ModerationList { .. }
            | OwnerMail::Attrs { .. }) => return Some(mail),
        }
        None
    }

    /// Takes over rooms another process exported (before this shard takes connections).
    pub fn import(&mut self, rooms: Vec<crate::proto::RoomState>, now: Now) {
        let done = self.owner.import(rooms, self.cfg.name_bytes_max, now);
        self.counters.add(Series::RoomsImported, done.rooms);
        self.counters.add(Series::ImportSkipped, done.rooms_skipped + done.entries_skipped);
    }

    fn publish(&mut self, room: &RoomName, msg: Message, sender: Sender, now: Now) -> Result<Published, PublishError> {
        let result = self.owner.publish(room, msg, sender, now);
        self.counters.inc(match &result {
            Ok(p) if p.coalesced => Series::MessagesCoalesced,
            Ok(_) => Series::MessagesIn,
            Err(PublishError::Backlog) => Series::DropBacklog,
            Err(PublishError::RoomsFull) => Series::DropNoRoom,
            Err(PublishError::RateLimited) => Series::DropRate,
            Err(PublishError::Muted) => Series::DropMuted,
            Err(PublishError::HandedOver) => Series::DropHandover,
        });
        result
    }

    fn poll(&mut self, room: &RoomName, after: u64, limit: usize, from: ConnAt) {
        let body = self.owner.poll(room, after, limit);
        self.mail.push((from.shard, HostMail::PollAnswer { conn: from.conn, status: 200, body }.into()));
    }

    /// Applies a moderation action, then replicates bans and whitelist entries to every shard
    /// and closes the user's connections in the room everywhere on kick and ban. Refused (503)
    /// while the way to any shard is congested: those mails must not be dropped, so they are
    /// not taken on.
    #[allow(clippy::too_many_arguments)]
    fn moderate(
        &mut self,
        room: RoomName,
        user: UserId,
        action: ModAction,
        reason: std::sync::Arc<str>,
        origin: Origin<Result<(), ModerationError>>,
        now: Now,
        post: &PostOffice,
    ) {
        let shards = self.cfg.owner.shards;
        let congested = (0..shards).any(|s| post.is_congested(ShardId(s as u16)));
        let result = if congested {
            self.counters.inc(Series::MeshRefused);
            Err(ModerationError::Busy)
        } else {
            self.owner.moderate(&room, &user, action, now)
        };
        if result.is_ok() {
            let replicate = match action {
                ModAction::Ban { until_ms } => Some((List::Ban, until_ms, true)),
                ModAction::Unban => Some((List::Ban, None, false)),
                ModAction::Whitelist => Some((List::Whitelist, None, true)),
                ModAction::Unwhitelist => Some((List::Whitelist, None, false)),
                ModAction::Kick | ModAction::Mute { .. } | ModAction::Unmute => None,
            };
            for s in 0..shards {
                let to = ShardId(s as u16);
                if let Some((list, until_ms, add)) = replicate {
                    let (room, user) = (room.clone(), user.clone());
                    self.mail.push((to, HostMail::Replicate { room, user, list, until_ms, add }.into()));
                }
                if matches!(action, ModAction::Kick | ModAction::Ban { .. }) {
                    let kick = HostMail::Kick { room: room.clone(), user: user.clone(), reason: reason.clone() };
                    self.mail.push((to, kick.into()));
                }
            }
            self.counters.inc(Series::Moderations);
        } else {
            self.counters.inc(Series::RefusedModeration);
        }
        self.answer(origin, result, |e| (e.status(), e.message()));
    }

    /// Sends an owner's answer: to the waiting API thread, or a refusal to a client.
    fn answer<T, E: Copy>(
        &mut self,
        origin: Origin<Result<T, E>>,
        result: Result<T, E>,
        code: impl Fn(E) -> (u16, &'static str),
    ) {
        match (origin, result) {
            (Origin::Api(reply), result) => reply.send(result),
            (Origin::Conn(at), Err(e)) => {
                let (c, reason) = code(e);
                self.refuse(at, u32::from(c), reason);
            }
            (Origin::Conn(_), Ok(_)) => {}
        }
    }

    fn refuse(&mut self, at: ConnAt, code: u32, reason: &'static str) {
        self.mail.push((at.shard, HostMail::Refused { conn: at.conn, code, reason }.into()));
    }

    /// A refused client send: an `ack` with the refusal when the client gave an id, else an
    /// error frame.
    fn refuse_send(&mut self, room: &RoomName, at: ConnAt, ack: Option<Box<str>>, code: u32, reason: &'static str) {
        match ack {
            Some(id) => {
                let ack =
                    Ack { id: id.into(), room: room.as_str().to_owned(), seq: 0, code, reason: reason.to_owned() };
                self.mail.push((at.shard, HostMail::Ack { conn: at.conn, ack }.into()));
            }
            None => self.refuse(at, code, reason),
        }
    }

    /// Milliseconds until `handle_timeout` has work.
    pub fn next_timeout(&self, now: Now) -> u64 {
        self.next_block_ms.saturating_sub(now.ms)
    }

    /// The block tick when due (adaptive, see `block_tick`), and now and then the sweep of
    /// idle rooms.
    pub fn handle_timeout(&mut self, now: Now, load: Load, post: &PostOffice) {
        if self.cfg.owner.durable && self.owner.loads() > 0 {
            let expired = now.ms.checked_sub(self.cfg.loads.timeout_ms).map(|t| self.owner.loads_started_before(t));
            for room in expired.unwrap_or_default() {
                if self.held.contains_key(&room) {
                    // Another node still runs it: it must not start here from memory. A dead
                    // node's lease runs out by itself, so it is waited for that long.
                    let since = self.owner.loading_since(&room).unwrap_or(0);
                    if since + self.cfg.loads.held_timeout_ms > now.ms {
                        continue;
                    }
                    self.held.remove(&room);
                    self.counters.inc(Series::LoadTimeout);
                    self.give_up_held(&room, now);
                    continue;
                }
                self.counters.inc(Series::LoadTimeout);
                self.loaded(&room, None, now, post);
            }
            let due: Vec<RoomName> = self.held.iter().filter(|&(_, &t)| t <= now.ms).map(|(r, _)| r.clone()).collect();
            for room in due {
                self.held.insert(room.clone(), u64::MAX);
                self.store_ops.push(StoreOp::Load { room, owner: self.cfg.owner.shard });
            }
        }
        if self.frozen {
            self.next_block_ms = now.ms + self.cfg.block_interval_ms;
            return;
        }
        if now.ms >= self.next_block_ms {
            self.block_tick(now, load);
        }
        if now.ms >= self.next_room_sweep_ms {
            self.owner.sweep(now.unix);
            self.next_room_sweep_ms = now.ms + Self::room_sweep_every_ms(&self.cfg);
        }
        self.counters.set(Series::RoomsOwned, self.owner.rooms() as u64);
        self.counters.set(Series::RoomsKept, self.owner.kept_rooms() as u64);
    }

    /// The block tick, adaptive: while the shard is saturated — its loop (or another shard's)
    /// had almost no idle time lately, or the last fan-out is still waiting to be written to a
    /// good share of its connections — the next block waits (up to `block_wait_max_ms` past
    /// its tick) and takes in what arrives meanwhile. Under load blocks grow instead of send
    /// queues, so one send carries more messages and latency stays near the fan-out time.
    fn block_tick(&mut self, now: Now, load: Load) {
        let due = self.block_due_ms;
        let busy = load.backlog > load.conns / 8 + BLOCK_BACKLOG_MIN || load.busy_permille >= BUSY_PERMILLE;
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

    /// A drain: cut every room's pending messages into blocks now (as many as the carried
    /// whitelist messages need), then tell every shard, after those blocks.
    fn flush(&mut self, now: Now) {
        self.cut_all(now);
        self.mail_flushed();
    }

    /// Cuts every room's pending messages into blocks, as many as the carried whitelist
    /// messages need.
    fn cut_all(&mut self, now: Now) {
        let rounds = self.cfg.owner.limits.pending_messages_max / self.cfg.owner.limits.block_messages_max.max(1) + 2;
        for _ in 0..rounds {
            if !self.owner.has_pending() {
                break;
            }
            self.cut_blocks(now);
        }
    }

    fn mail_flushed(&mut self) {
        for s in 0..self.cfg.owner.shards {
            self.mail.push((ShardId(s as u16), HostMail::Flushed.into()));
        }
    }

    /// Cuts and encodes each dirty room's block once and addresses the frame to every shard
    /// with members.
    fn cut_blocks(&mut self, now: Now) {
        let mail = &mut self.mail;
        let stats = self.owner.tick(now, &mut |room, frame, members| {
            for (shard, _) in members.iter().enumerate().filter(|&(_, &n)| n > 0) {
                let deliver = HostMail::Deliver { room: room.clone(), frame: std::sync::Arc::clone(frame) };
                mail.push((ShardId(shard as u16), deliver.into()));
            }
        });
        // Acks after the blocks they name (same destination, so in order).
        let mut acks = Vec::new();
        self.owner.take_acks(&mut acks);
        for (shard, conn, ack) in acks {
            self.mail.push((shard, HostMail::Ack { conn, ack }.into()));
        }
        let c = &mut self.counters;
        c.add(Series::BlocksCut, stats.blocks);
        c.add(Series::MessagesOut, stats.messages);
        c.add(Series::DropOverflow, stats.dropped_overflow);
        c.add(Series::DropExpired, stats.dropped_expired);
        c.add(Series::AttrFrames, stats.attr_frames);
        c.add(Series::MessagesIn, stats.presence_added);
        c.add(Series::MessagesCoalesced, stats.presence_coalesced);
        c.add(Series::DeflateFrames, stats.deflated);
        c.add(Series::DeflateBytesIn, stats.deflate_in as u64);
        c.add(Series::DeflateBytesOut, stats.deflate_out as u64);
    }

    /// Idle rooms are looked for four times per `room_idle_ms` (and at least once a second, so
    /// that rooms that only had members go soon after them).
    fn room_sweep_every_ms(cfg: &DeskConfig) -> u64 {
        (cfg.owner.room_idle_ms.max(0) as u64 / 4).clamp(100, 1_000)
    }

    /// Moves the mail gathered since the last call to `out`.
    pub fn take_mail(&mut self, out: &mut Vec<(ShardId, Mail)>) {
        out.append(&mut self.mail);
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }
}
