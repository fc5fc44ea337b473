//! Frames going out to many connections: the owner's block tick, blocks arriving from other
//! owners, direct and broadcast frames, and the other mail a shard receives. A fanned-out frame
//! is stored once; each member costs one queue node and nothing else.

use std::sync::Arc;

use super::conn::State;
use super::mail::Mail;
use super::outbox::{FrameId, Outbox, Pushed};
use super::{Hub, Now, conn::Conn};
use crate::ids::ShardId;
use crate::metrics::{Counters, Series};
use crate::room::RoomName;
use crate::room::frames::SharedFrame;
use crate::wire::CloseCode;
use slab::Slab;

/// The parts of the hub a fan-out writes, borrowed apart from the index it reads.
struct Fan<'a> {
    conns: &'a mut Slab<Conn>,
    outbox: &'a mut Outbox,
    ready: &'a mut std::collections::VecDeque<u32>,
    counters: &'a mut Counters,
    max: usize,
    tick: u32,
    /// Connections whose queue held nothing droppable: handled after the loop.
    slow: Vec<u32>,
}

impl Fan<'_> {
    /// Queues `frame` to one open connection. Returns whether it was queued.
    fn send(&mut self, key: u32, frame: FrameId) -> bool {
        let Some(conn) = self.conns.get_mut(key as usize) else { return false };
        if conn.state != State::Open {
            return false;
        }
        if !self.outbox.has_format(frame, conn.format()) {
            self.counters.inc(Series::FramesMissed);
            return false;
        }
        let pushed = self.outbox.push(&mut conn.queue, frame, self.max);
        if pushed != Pushed::Queued {
            self.counters.inc(Series::FramesDropped);
            if conn.behind_since == 0 {
                conn.behind_since = self.tick;
            }
        }
        match pushed {
            Pushed::Queued | Pushed::DroppedOldest => {}
            Pushed::DroppedNew => return false,
            Pushed::Full => {
                self.slow.push(key);
                return false;
            }
        }
        if conn.flags & super::conn::flag::READY == 0 && !conn.queue.in_flight() {
            conn.flags |= super::conn::flag::READY;
            self.ready.push_back(key);
        }
        true
    }
}

impl Hub {
    fn fan(&mut self, now: Now) -> (Fan<'_>, &super::index::Rooms, &super::index::Users) {
        let fan = Fan {
            conns: &mut self.conns,
            outbox: &mut self.outbox,
            ready: &mut self.ready,
            counters: &mut self.counters,
            max: self.cfg.send_queue_frames_max,
            tick: now.tick(),
            slow: Vec::new(),
        };
        (fan, &self.rooms, &self.users)
    }

    fn end_fan(&mut self, slow: Vec<u32>, frame: FrameId, now: Now) {
        self.outbox.forget_if_unused(frame);
        for key in slow {
            self.slow_consumer(key, now);
        }
    }

    /// Mail this shard handles as a host of members (frames, kicks, replicas, answers).
    pub(super) fn on_member_mail(&mut self, mail: Mail, now: Now) {
        match mail {
            Mail::Deliver { room, frame } => self.deliver_block(&room, frame, now),
            Mail::ToConn { room, conn, frames } => self.deliver_to_conn(&room, conn, frames, now),
            Mail::ToUser { user, frame, reply } => {
                let n = self.deliver_direct(&user, frame, now);
                if let Some(r) = reply {
                    r.send(n);
                }
            }
            Mail::ToAll { frame, reply } => {
                let n = self.deliver_broadcast(frame, now);
                if let Some(r) = reply {
                    r.send(n);
                }
            }
            Mail::PollResult { conn, status, body } => self.poll_answered(conn, status, body, now),
            Mail::Replicate { room, user, list, until_ms, add } => {
                self.replicate(room, &user, list, until_ms, add, now)
            }
            Mail::Kick { room, user, reason } => self.kick(&room, &user, &reason, now),
            Mail::Refused { conn, code, reason }
                if self.conns.get(conn as usize).is_some_and(|c| c.state == State::Open) =>
            {
                self.send_error(conn, code, reason, now);
            }
            Mail::Stop => self.stop(now),
            // Requests for an owner are handled in owned.rs before reaching here.
            _ => {}
        }
    }

    /// Frames for one connection (its backfill and attribute snapshot, or an attr_sync
    /// answer), if it is still in that room.
    fn deliver_to_conn(&mut self, room: &RoomName, conn: u32, frames: Vec<Arc<SharedFrame>>, now: Now) {
        let Some(rk) = self.rooms.find(room) else { return };
        if !self.conns.get(conn as usize).is_some_and(|c| c.room == rk && c.state == State::Open) {
            return;
        }
        self.flush_replies(conn, now);
        for frame in frames {
            let id = self.shared(frame);
            let (mut fan, _, _) = self.fan(now);
            fan.send(conn, id);
            let slow = std::mem::take(&mut fan.slow);
            self.end_fan(slow, id, now);
        }
    }

    /// The owner's tick: cut and encode each dirty room's block once, queue it to local
    /// members, mail it to every other shard with members.
    pub(super) fn cut_blocks(&mut self, now: Now) {
        let me = self.cfg.shard;
        let mut local: Vec<(RoomName, Arc<SharedFrame>)> = Vec::new();
        let mail = &mut self.mail;
        let stats = self.owner.tick(now, &mut |room, frame, members| {
            for (shard, &n) in members.iter().enumerate() {
                if n == 0 {
                    continue;
                }
                let shard = ShardId(shard as u16);
                if shard == me {
                    local.push((room.clone(), Arc::clone(frame)));
                } else {
                    mail.push((shard, Mail::Deliver { room: room.clone(), frame: Arc::clone(frame) }));
                }
            }
        });
        self.counters.add(Series::BlocksCut, stats.blocks);
        self.counters.add(Series::MessagesOut, stats.messages);
        self.counters.add(Series::DropOverflow, stats.dropped_overflow);
        self.counters.add(Series::DropExpired, stats.dropped_expired);
        self.counters.add(Series::AttrFrames, stats.attr_frames);
        self.counters.add(Series::MessagesIn, stats.presence_added);
        self.counters.add(Series::MessagesCoalesced, stats.presence_coalesced);
        for (room, frame) in local {
            self.deliver_block(&room, frame, now);
        }
    }

    /// Queues a room's frame (block or attribute delta) to every local member.
    fn deliver_block(&mut self, room: &RoomName, frame: Arc<SharedFrame>, now: Now) {
        let id = self.shared(frame);
        let (mut fan, rooms, _) = self.fan(now);
        let mut queued = 0;
        if let Some(r) = rooms.find(room).and_then(|r| rooms.get(r)) {
            for &key in &r.members {
                queued += u64::from(fan.send(key, id));
            }
        }
        fan.counters.add(Series::BlockDeliveries, queued);
        let slow = std::mem::take(&mut fan.slow);
        self.end_fan(slow, id, now);
    }

    /// Queues a direct frame to every local connection of a user.
    fn deliver_direct(&mut self, user: &str, frame: Arc<SharedFrame>, now: Now) -> usize {
        let id = self.shared(frame);
        let (mut fan, _, users) = self.fan(now);
        let mut queued = 0;
        for &key in users.conns(user) {
            queued += usize::from(fan.send(key, id));
        }
        fan.counters.add(Series::DirectDeliveries, queued as u64);
        let slow = std::mem::take(&mut fan.slow);
        self.end_fan(slow, id, now);
        queued
    }

    /// Queues a broadcast frame to every open connection of this shard.
    fn deliver_broadcast(&mut self, frame: Arc<SharedFrame>, now: Now) -> usize {
        let id = self.shared(frame);
        let (mut fan, _, _) = self.fan(now);
        let mut queued = 0;
        // By index: `send` skips vacant slots and connections that are not open.
        for key in 0..fan.conns.capacity() as u32 {
            queued += usize::from(fan.send(key, id));
        }
        fan.counters.add(Series::BroadcastDeliveries, queued as u64);
        let slow = std::mem::take(&mut fan.slow);
        self.end_fan(slow, id, now);
        queued
    }

    /// Going away: Close (1001) to every WebSocket, drop handshakes, accept nothing new.
    fn stop(&mut self, now: Now) {
        self.stopping = true;
        let keys: Vec<(u32, State)> = self.conns.iter().map(|(k, c)| (k as u32, c.state)).collect();
        for (key, state) in keys {
            match state {
                State::Open => {
                    self.close(key, CloseCode::GOING_AWAY, "server shutting down", Series::ClosedShutdown, now)
                }
                State::Handshake | State::Polling => self.terminate(key, Some(Series::ClosedShutdown)),
                State::Closing | State::Flushing | State::Terminating => {}
            }
        }
    }
}
