//! Mail for the connections of this shard: blocks from room owners, direct and broadcast
//! frames, frames and answers for one connection, kicks, moderation replicas, and stop. A
//! fanned-out frame is stored once; each member costs one queue node and nothing else.

use std::sync::Arc;

use super::Host;
use super::conn::State;
use super::conns::Conns;
use super::outbox::{FrameId, Outbox, Pushed};
use crate::hub::mail::HostMail;
use crate::ids::{ConnId, ConnKey, Now, UserId};
use crate::metrics::{Counters, Series};
use crate::proto::{Kicked, ServerFrame, server_frame};
use crate::room::RoomName;
use crate::room::frames::SharedFrame;
use crate::wire::CloseCode;

/// The parts a fan-out writes, borrowed apart from the index it reads.
struct Fan<'a> {
    conns: &'a mut Conns,
    outbox: &'a mut Outbox,
    counters: &'a mut Counters,
    frame: FrameId,
    max: usize,
    tick: u32,
    /// Connections whose queue held nothing droppable: handled after the loop.
    slow: Vec<ConnKey>,
}

impl Fan<'_> {
    /// Queues the frame to one connection if it is open. Returns whether it was queued.
    fn send(&mut self, key: ConnKey) -> bool {
        let conn = self.conns.get_mut(key);
        if conn.state != State::Open {
            return false;
        }
        if !self.outbox.has_format(self.frame, conn.wire()) {
            self.counters.inc(Series::FramesMissed);
            return false;
        }
        let pushed = self.outbox.push(&mut conn.queue, self.frame, self.max);
        if pushed != Pushed::Queued {
            self.counters.inc(Series::FramesDropped);
            conn.fell_behind(self.tick);
        }
        match pushed {
            Pushed::Queued | Pushed::DroppedOldest => {}
            Pushed::DroppedNew => return false,
            Pushed::Full => {
                self.slow.push(key);
                return false;
            }
        }
        self.conns.mark_ready(key);
        true
    }
}

/// Whom a fan-out reaches.
enum Target<'a> {
    Room(&'a RoomName),
    User(&'a UserId),
}

impl Host {
    /// Handles one item of mail for this shard's connections.
    pub fn handle_mail(&mut self, mail: HostMail, now: Now) {
        match mail {
            HostMail::Deliver { room, frame } => {
                let n = self.fan_out(frame, now, Target::Room(&room));
                self.counters.add(Series::BlockDeliveries, n as u64);
            }
            HostMail::ToConn { room, conn, frames } => self.deliver_to_conn(&room, conn, frames, now),
            HostMail::ToUser { user, frame, reply } => {
                let n = self.fan_out(frame, now, Target::User(&user));
                self.counters.add(Series::DirectDeliveries, n as u64);
                if let Some(r) = reply {
                    r.send(n);
                }
            }
            HostMail::ToAll { frame, reply } => {
                let n = self.broadcast(frame, now);
                if let Some(r) = reply {
                    r.send(n);
                }
            }
            HostMail::PollAnswer { conn, status, body } => self.poll_answered(conn, status, &body, now),
            HostMail::Replicate { room, user, list, until_ms, add: true } => {
                self.replicate(room, &user, list, until_ms, now)
            }
            HostMail::Replicate { room, user, list, add: false, .. } => self.replicas.remove(&room, &user, list),
            HostMail::Kick { room, user, reason } => self.kick(&room, &user, &reason, now),
            HostMail::Refused { conn, code, reason } => self.refused(conn, code, reason, now),
            HostMail::Ack { conn, ack } => {
                if let Some(key) = self.live(conn)
                    && self.conns.get(key).state == State::Open
                {
                    self.send_frame(key, &ServerFrame { frame: Some(server_frame::Frame::Ack(ack)) }, now);
                }
            }
            HostMail::Hook(verdict) => self.hook_verdict(*verdict, now),
            HostMail::TlsConfig(config) => self.cfg.tls = Some(config),
            HostMail::Drain(plan) => self.start_drain(plan, now),
            HostMail::Flushed => self.owner_flushed(1, now),
            HostMail::Resync => self.placement_changed(),
            HostMail::Stop => self.stop(now),
        }
    }

    /// The connection a reply names, if it is still there (counted when it is not).
    pub(super) fn live(&mut self, id: ConnId) -> Option<ConnKey> {
        let key = self.conns.find(id);
        if key.is_none() {
            self.counters.inc(Series::ReplyConnGone);
        }
        key
    }

    /// Queues one shared frame to a room's members or a user's connections here; returns how
    /// many took it. The index is read while the queues are written, borrowed apart.
    fn fan_out(&mut self, frame: Arc<SharedFrame>, now: Now, target: Target<'_>) -> usize {
        let id = self.outbox.add_shared(frame);
        let Host { conns, outbox, counters, rooms, users, cfg, .. } = self;
        let keys: &[ConnKey] = match target {
            Target::Room(name) => rooms.find(name).and_then(|r| rooms.get(r)).map_or(&[], |r| &r.members),
            Target::User(user) => users.conns(user.as_str()),
        };
        let mut fan = Fan {
            conns,
            outbox,
            counters,
            frame: id,
            max: cfg.send_queue_frames_max,
            tick: now.tick(),
            slow: Vec::new(),
        };
        let queued = keys.iter().filter(|&&key| fan.send(key)).count();
        let slow = std::mem::take(&mut fan.slow);
        self.end_fan(slow, id, now);
        queued
    }

    fn end_fan(&mut self, slow: Vec<ConnKey>, frame: FrameId, now: Now) {
        self.outbox.forget_if_unused(frame);
        for key in slow {
            self.slow_consumer(key, now);
        }
    }

    /// Queues a broadcast frame to every open connection of this shard.
    fn broadcast(&mut self, frame: Arc<SharedFrame>, now: Now) -> usize {
        let id = self.outbox.add_shared(frame);
        let keys = self.conns.all_keys();
        let mut fan = Fan {
            conns: &mut self.conns,
            outbox: &mut self.outbox,
            counters: &mut self.counters,
            frame: id,
            max: self.cfg.send_queue_frames_max,
            tick: now.tick(),
            slow: Vec::new(),
        };
        // By slot, vacant ones skipped: no list of every connection is kept or built.
        let mut queued = 0;
        for key in keys {
            if fan.conns.contains(key) && fan.send(key) {
                queued += 1;
            }
        }
        fan.counters.add(Series::BroadcastDeliveries, queued as u64);
        let slow = std::mem::take(&mut fan.slow);
        self.end_fan(slow, id, now);
        queued
    }

    /// Frames for one connection (its backfill and attribute snapshot, or an attr_sync
    /// answer), if it is still that connection, open, and in that room.
    fn deliver_to_conn(&mut self, room: &RoomName, conn: ConnId, frames: Vec<Arc<SharedFrame>>, now: Now) {
        let Some(key) = self.live(conn) else { return };
        let here = self.conns.get(key);
        if here.state != State::Open || self.rooms.find(room) != Some(here.room) {
            self.counters.inc(Series::ReplyLeftRoom);
            return;
        }
        for frame in frames {
            let id = self.outbox.add_shared(frame);
            self.enqueue(key, id, now);
        }
    }

    /// A refusal from an owner (or of the way to it) for a connection's request.
    fn refused(&mut self, conn: ConnId, code: u32, reason: &'static str, now: Now) {
        let Some(key) = self.live(conn) else { return };
        match self.conns.get(key).state {
            State::Open => self.send_error(key, code, reason, now),
            State::Polling => {
                let body = serde_json::json!({"error": reason}).to_string().into_bytes();
                self.poll_answered(conn, code as u16, &body, now);
            }
            State::Handshake | State::Closing | State::Flushing | State::Terminating => {
                self.counters.inc(Series::ReplyConnGone);
            }
        }
    }

    /// Kicks: the user's connections in the room get a `kicked` frame and a 1008 close.
    fn kick(&mut self, room: &RoomName, user: &UserId, reason: &str, now: Now) {
        // Kicks go to every shard; most hold none of the user's connections in the room.
        let targets: Vec<ConnKey> = match self.rooms.find(room) {
            Some(rk) => {
                self.users.conns(user.as_str()).iter().copied().filter(|&c| self.conns.get(c).room == rk).collect()
            }
            None => Vec::new(),
        };
        for key in targets {
            let kicked = Kicked { reason: reason.to_owned(), room: room.as_str().to_owned() };
            self.send_frame(key, &ServerFrame { frame: Some(server_frame::Frame::Kicked(kicked)) }, now);
            self.close(key, CloseCode::POLICY, "kicked", Series::ClosedKicked, now);
        }
    }

    /// Going away: Close (1001) to every WebSocket, drop handshakes, accept nothing new.
    fn stop(&mut self, now: Now) {
        self.stopping = true;
        for key in self.conns.keys() {
            match self.conns.get(key).state {
                State::Open => {
                    self.close(key, CloseCode::GOING_AWAY, "server shutting down", Series::ClosedShutdown, now)
                }
                State::Handshake | State::Polling => self.terminate(key, Some(Series::ClosedShutdown)),
                State::Closing | State::Flushing | State::Terminating => {}
            }
        }
    }
}
