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
use crate::room::owner::SharedFrame;
use crate::wire::CloseCode;
use slab::Slab;

/// The parts of the hub a fan-out writes, borrowed apart from the index it reads.
struct Fan<'a> {
    conns: &'a mut Slab<Conn>,
    outbox: &'a mut Outbox,
    ready: &'a mut std::collections::VecDeque<u32>,
    counters: &'a mut Counters,
    max: usize,
    /// Connections whose queue held nothing droppable: terminated after the loop.
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
        match self.outbox.push(&mut conn.queue, frame, self.max) {
            Pushed::Queued => {}
            Pushed::DroppedOldest => self.counters.inc(Series::FramesDropped),
            Pushed::Full => {
                self.counters.inc(Series::FramesDropped);
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
    fn fan(&mut self) -> (Fan<'_>, &super::index::Rooms, &super::index::Users) {
        let fan = Fan {
            conns: &mut self.conns,
            outbox: &mut self.outbox,
            ready: &mut self.ready,
            counters: &mut self.counters,
            max: self.cfg.send_queue_frames_max,
            slow: Vec::new(),
        };
        (fan, &self.rooms, &self.users)
    }

    fn end_fan(&mut self, slow: Vec<u32>, frame: FrameId) {
        self.outbox.forget_if_unused(frame);
        for key in slow {
            self.terminate(key, Some(Series::ClosedSlow));
        }
    }

    /// Handles one item of mail.
    pub fn on_mail(&mut self, mail: Mail, now: Now) {
        match mail {
            Mail::Publish { room, msg, origin } => self.publish(room, *msg, origin, now),
            Mail::Presence { room, from, members, json } => self.presence(&room, from, members, json, now),
            Mail::Deliver { room, frame } => self.deliver_block(&room, frame),
            Mail::ToUser { user, frame, reply } => {
                let n = self.deliver_direct(&user, frame);
                if let Some(r) = reply {
                    r.send(n);
                }
            }
            Mail::ToAll { frame, reply } => {
                let n = self.deliver_broadcast(frame);
                if let Some(r) = reply {
                    r.send(n);
                }
            }
            Mail::RoomInfo { room, reply } => reply.send(self.owner.info(&room)),
            Mail::Refused { conn, code, reason } => {
                if self.conns.get(conn as usize).is_some_and(|c| c.state == State::Open) {
                    self.send_error(conn, code, reason);
                }
            }
            Mail::Stop => self.stop(now),
        }
    }

    /// The owner's tick: cut and encode each dirty room's block once, queue it to local
    /// members, mail it to every other shard with members.
    pub(super) fn cut_blocks(&mut self, now: Now) {
        let me = self.cfg.shard;
        let mut local: Vec<(RoomName, Arc<SharedFrame>)> = Vec::new();
        let mail = &mut self.mail;
        let stats = self.owner.tick(now.unix, &mut |room, frame, members| {
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
        for (room, frame) in local {
            self.deliver_block(&room, frame);
        }
    }

    /// Queues a block frame to every local member of the room.
    fn deliver_block(&mut self, room: &RoomName, frame: Arc<SharedFrame>) {
        let id = self.shared(frame);
        let (mut fan, rooms, _) = self.fan();
        let mut queued = 0;
        if let Some(r) = rooms.find(room).and_then(|r| rooms.get(r)) {
            for &key in &r.members {
                queued += u64::from(fan.send(key, id));
            }
        }
        fan.counters.add(Series::BlockDeliveries, queued);
        let slow = std::mem::take(&mut fan.slow);
        self.end_fan(slow, id);
    }

    /// Queues a direct frame to every local connection of a user.
    fn deliver_direct(&mut self, user: &str, frame: Arc<SharedFrame>) -> usize {
        let id = self.shared(frame);
        let (mut fan, _, users) = self.fan();
        let mut queued = 0;
        for &key in users.conns(user) {
            queued += usize::from(fan.send(key, id));
        }
        fan.counters.add(Series::DirectDeliveries, queued as u64);
        let slow = std::mem::take(&mut fan.slow);
        self.end_fan(slow, id);
        queued
    }

    /// Queues a broadcast frame to every open connection of this shard.
    fn deliver_broadcast(&mut self, frame: Arc<SharedFrame>) -> usize {
        let id = self.shared(frame);
        let (mut fan, _, _) = self.fan();
        let mut queued = 0;
        // By index: `send` skips vacant slots and connections that are not open.
        for key in 0..fan.conns.capacity() as u32 {
            queued += usize::from(fan.send(key, id));
        }
        fan.counters.add(Series::BroadcastDeliveries, queued as u64);
        let slow = std::mem::take(&mut fan.slow);
        self.end_fan(slow, id);
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
                State::Handshake => self.terminate(key, Some(Series::ClosedShutdown)),
                State::Closing | State::Flushing | State::Terminating => {}
            }
        }
    }
}
