//! What an open connection's bytes mean: WebSocket events from the reader, client frames
//! (join, leave, send, ping, attribute sync and set, moderation) from the envelope, and the
//! close handshake. Requests for a room leave as mail to its owner, named by the connection's
//! `ConnAt` so the answer finds this connection and no later one in its slot.

use std::sync::Arc;

use super::Host;
use super::conn::{State, flag};
use super::rooms::RoomKey;
use crate::envelope;
use crate::hooks::call::{Hook, SendCall};
use crate::hub::mail::{Origin, OwnerMail};
use crate::ids::{ConnKey, Now, UserId};
use crate::metrics::Series;
use crate::proto::{
    Ack, AttrSet, AttrSync, ClientFrame, Error, Message, Moderate, Pong, Send, ServerFrame, client_frame,
};
use crate::proto::{moderate, server_frame};
use crate::room::RoomName;
use crate::room::limit::TokenBucket;
use crate::room::moderation::List;
use crate::room::owner::ModAction;
use crate::wire::CloseCode;
use crate::wire::deflate::{self, InflateError};
use crate::wire::frame::{self, Opcode};
use crate::wire::reader::{Event, Flow, ReadError, ReadLimits};

/// Error frame codes (HTTP-like, listed in the README).
pub mod code {
    pub const BAD_REQUEST: u32 = 400;
    pub const UNAUTHORIZED: u32 = 401;
    pub const FORBIDDEN: u32 = 403;
    pub const NOT_IN_ROOM: u32 = 404;
    pub const TOO_LARGE: u32 = 413;
    pub const TOO_MANY: u32 = 429;
    pub const UNAVAILABLE: u32 = 503;
}

/// Longest message type a client may name (`chat`, `gift`, ... or a custom word).
const TYPE_BYTES_MAX: usize = 32;
/// Longest client id of an acknowledged send.
const ACK_ID_BYTES_MAX: usize = 64;

impl Host {
    /// Feeds bytes to the connection's reader and acts on each event in order.
    pub(super) fn read_frames(&mut self, key: ConnKey, data: &mut [u8], now: Now) {
        // The reader leaves the connection while it runs so events can change the host freely.
        let conn = self.conns.get_mut(key);
        let mut reader = std::mem::take(&mut conn.reader);
        let limits = ReadLimits { deflate: conn.has(flag::DEFLATE), ..self.cfg.read };
        let result = reader.feed(data, &limits, &mut |event| self.on_event(key, event, now));
        let conn = self.conns.get_mut(key);
        let mut held = 0;
        if matches!(conn.state, State::Open | State::Closing) {
            held = reader.held_bytes();
            conn.reader = reader;
        }
        held += self.tls_held(key);
        if let Err(e) = result {
            self.intake.hold(key, 0);
            return self.fail(key, e.close_code(), e.reason(), read_error_series(&e), now);
        }
        // A connection that ended during the feed already released its holding.
        if self.conns.get(key).state != State::Terminating {
            let budget = self.intake.hold(key, held);
            self.within_budget(key, budget, now);
        }
    }

    fn on_event(&mut self, key: ConnKey, event: Event<'_>, now: Now) -> Flow {
        self.counters.inc(Series::FramesIn);
        let conn = self.conns.get(key);
        let (state, echo) = (conn.state, !self.echoes.is_empty() && self.echoes.contains(&key));
        match event {
            Event::Text(_) | Event::Binary(_) | Event::Compressed { .. } if state != State::Open => Flow::Continue,
            Event::Compressed { text, payload } => self.inflated(key, text, payload, echo, now),
            Event::Text(text) if echo => self.echo(key, Opcode::Text, text.as_bytes(), now),
            Event::Binary(bytes) if echo => self.echo(key, Opcode::Binary, bytes, now),
            Event::Text(text) => self.client_message(key, true, text.as_bytes(), now),
            Event::Binary(bytes) => self.client_message(key, false, bytes, now),
            Event::Ping(payload) if state == State::Open => {
                self.enqueue_owned(key, frame::frame(Opcode::Pong, payload), now);
                Flow::Continue
            }
            Event::Ping(_) | Event::Pong(_) => Flow::Continue,
            Event::Close { code, .. } => {
                self.peer_closed(key, code, now);
                Flow::Stop
            }
        }
    }

    /// Echoes a message; to a connection with permessage-deflate, compressed when it pays.
    fn echo(&mut self, key: ConnKey, opcode: Opcode, payload: &[u8], now: Now) -> Flow {
        let plain = frame::frame(opcode, payload);
        let bytes = match self.conns.get(key).has(flag::DEFLATE) {
            true => {
                deflate::compress_frame(&plain, self.cfg.deflate_level, self.cfg.deflate_min_bytes).unwrap_or(plain)
            }
            false => plain,
        };
        if self.enqueue_owned(key, bytes, now) { Flow::Continue } else { Flow::Stop }
    }

    /// A compressed message: inflated by the shard's one inflater (no state kept between
    /// messages: the client was told `client_no_context_takeover`), held to the message size
    /// limit, then taken as any message.
    fn inflated(&mut self, key: ConnKey, text: bool, payload: &[u8], echo: bool, now: Now) -> Flow {
        // Checked before inflating: a few bytes may inflate to message_bytes_max. The echo
        // endpoint (conformance tests only) is not limited.
        let rate = self.cfg.inflate_rate;
        if !echo && rate.per_s > 0 {
            let bucket = self.inflate_buckets.entry(key).or_insert_with(|| TokenBucket::new(&rate, now.ms));
            if !bucket.try_take(&rate, now.ms) {
                self.counters.inc(Series::InflateRate);
                self.fail(key, CloseCode::POLICY, "compressed messages too fast", Series::ClosedInflate, now);
                return Flow::Stop;
            }
        }
        let max = self.cfg.read.message_bytes_max;
        let mut inflater = self.inflater.take().unwrap_or_default();
        let flow = match inflater.inflate(payload, max) {
            Ok(bytes) if text && std::str::from_utf8(bytes).is_err() => {
                self.counters.inc(Series::InflateInvalid);
                self.fail(key, CloseCode::INVALID_DATA, "text not valid UTF-8", Series::ClosedUtf8, now);
                Flow::Stop
            }
            Ok(bytes) => {
                self.counters.inc(Series::Inflated);
                let opcode = if text { Opcode::Text } else { Opcode::Binary };
                if echo { self.echo(key, opcode, bytes, now) } else { self.client_message(key, text, bytes, now) }
            }
            Err(InflateError::TooBig) => {
                self.counters.inc(Series::InflateTooBig);
                self.fail(key, CloseCode::TOO_BIG, "message over the size limit", Series::ClosedTooBig, now);
                Flow::Stop
            }
            Err(InflateError::Invalid) => {
                self.counters.inc(Series::InflateInvalid);
                self.fail(key, CloseCode::INVALID_DATA, "invalid compressed data", Series::ClosedInflate, now);
                Flow::Stop
            }
        };
        self.inflater = Some(inflater);
        flow
    }

    fn client_message(&mut self, key: ConnKey, text: bool, payload: &[u8], now: Now) -> Flow {
        match envelope::decode(self.conns.get(key).format(), text, payload) {
            Ok(frame) => {
                self.client_frame(key, frame, now);
                Flow::Continue
            }
            Err(e) => {
                self.close(key, e.close_code(), e.reason(), Series::ClosedEnvelope, now);
                Flow::Stop
            }
        }
    }

    fn client_frame(&mut self, key: ConnKey, frame: ClientFrame, now: Now) {
        match frame.frame {
            Some(client_frame::Frame::Join(j)) => match RoomName::parse(&j.room, self.cfg.name_bytes_max) {
                Ok(room) => self.join_frame(key, &room, j.after_seq, now),
                Err(e) => self.send_error(key, code::BAD_REQUEST, e.message(), now),
            },
            Some(client_frame::Frame::Leave(l)) => {
                if self.current_room(key).is_some_and(|r| l.room.is_empty() || r.as_str() == l.room) {
                    self.leave_room(key);
                } else {
                    self.send_error(key, code::NOT_IN_ROOM, "not in that room", now);
                }
            }
            Some(client_frame::Frame::Send(s)) => self.client_send(key, s, now),
            Some(client_frame::Frame::Ping(_)) => {
                let pong = ServerFrame { frame: Some(server_frame::Frame::Pong(Pong { server_ms: now.unix.0 })) };
                self.send_frame(key, &pong, now);
            }
            Some(client_frame::Frame::AttrSync(s)) => self.attr_sync(key, s, now),
            Some(client_frame::Frame::AttrSet(s)) => self.attr_set(key, s, now),
            Some(client_frame::Frame::Moderate(m)) => self.moderate(key, m, now),
            Some(client_frame::Frame::Refresh(r)) => self.refresh(key, r, now),
            None => {}
        }
    }

    fn current_room(&self, key: ConnKey) -> Option<&RoomName> {
        self.rooms.get(self.conns.get(key).room).map(|r| &r.name)
    }

    pub(super) fn user_of(&self, key: ConnKey) -> Option<&UserId> {
        self.users.id(self.conns.get(key).user)
    }

    /// Joins a room, leaving the current one first (after the join hook, when there is one);
    /// the owner answers with backfill (all recent history, or what came after the `after` seq
    /// a resuming client showed) and the attribute snapshot. A banned user is refused.
    pub(super) fn join(&mut self, key: ConnKey, room: &RoomName, after: u64, now: Now) {
        if self.current_room(key) == Some(room) || self.banned(key, room, now) {
            return;
        }
        if self.hooked(Hook::Join) {
            return self.ask_join(key, room, after, now);
        }
        self.enter(key, room, after);
    }

    /// Whether the connection's user is banned from `room` (then it is told so).
    pub(super) fn banned(&mut self, key: ConnKey, room: &RoomName, now: Now) -> bool {
        let banned = self.user_of(key).is_some_and(|u| self.replicas.contains(room, List::Ban, u, now.unix.0));
        if banned {
            self.counters.inc(Series::JoinBanned);
            self.send_error(key, code::FORBIDDEN, "you are banned from this room", now);
        }
        banned
    }

    /// Moves the connection into `room` and tells the owner (a join everyone allowed).
    pub(super) fn enter(&mut self, key: ConnKey, room: &RoomName, after: u64) {
        if self.current_room(key) == Some(room) {
            return;
        }
        let user = self.user_of(key).cloned();
        self.leave_room(key);
        let wire = self.conns.get(key).wire();
        let (r, pos) = self.rooms.join(room, key, wire);
        let conn = self.conns.get_mut(key);
        conn.room = r;
        conn.member_pos = pos;
        let from = self.at(key);
        self.ask_owner(room, OwnerMail::Joined { room: room.clone(), from, user, after });
    }

    /// A `join` frame, within the connection's join rate (the room named in the URL is free).
    fn join_frame(&mut self, key: ConnKey, room: &RoomName, after: u64, now: Now) {
        if self.current_room(key) == Some(room) {
            return;
        }
        let rate = self.cfg.join_rate;
        let bucket = self.join_buckets.entry(key).or_insert_with(|| TokenBucket::new(&rate, now.ms));
        if !bucket.try_take(&rate, now.ms) {
            self.counters.inc(Series::JoinRateLimited);
            return self.send_error(key, code::TOO_MANY, "joining too fast", now);
        }
        self.join(key, room, after, now);
    }

    /// Leaves the current room, if any.
    pub(super) fn leave_room(&mut self, key: ConnKey) {
        let conn = self.conns.get_mut(key);
        let room = std::mem::replace(&mut conn.room, RoomKey::NONE);
        if room == RoomKey::NONE {
            return;
        }
        if self.hooked(Hook::Events)
            && let Some(name) = self.rooms.get(room).map(|r| r.name.clone())
        {
            self.hook_event(key, Some(&name));
        }
        let conn = self.conns.get(key);
        let (pos, wire) = (conn.member_pos, conn.wire());
        let user = self.users.id(conn.user);
        let named = self.cfg.owner.presence_users_max;
        // The last member was swapped into the leaver's position.
        if let Some(moved) = self.rooms.leave(room, pos, wire, user, named) {
            self.conns.get_mut(moved).member_pos = pos;
        }
    }

    /// Checks every sender-side rule; on refusal sends the error frame and returns None.
    fn sender_checks(
        &mut self,
        key: ConnKey,
        data_len: usize,
        now: Now,
    ) -> Result<(RoomName, UserId), (u32, &'static str)> {
        let conn = self.conns.get(key);
        let refusal = if !conn.has(flag::SIGNED_IN) {
            Some((code::UNAUTHORIZED, "anonymous viewers cannot send"))
        } else if !conn.has(flag::CAN_SEND) {
            Some((code::FORBIDDEN, "this token may not send"))
        } else if conn.room == RoomKey::NONE {
            Some((code::NOT_IN_ROOM, "join a room first"))
        } else if data_len > self.cfg.data_bytes_max {
            Some((code::TOO_LARGE, "message data is too large"))
        } else {
            None
        };
        if let Some(refusal) = refusal {
            self.counters.inc(Series::SendRefused);
            return Err(refusal);
        }
        let rate = self.cfg.send_rate;
        let bucket = self.send_buckets.entry(key).or_insert_with(|| TokenBucket::new(&rate, now.ms));
        if !bucket.try_take(&rate, now.ms) {
            self.counters.inc(Series::SendRateLimited);
            return Err((code::TOO_MANY, "sending too fast"));
        }
        match (self.current_room(key), self.user_of(key)) {
            (Some(room), Some(user)) => Ok((room.clone(), user.clone())),
            _ => unreachable!("{key:?} was just checked to be signed in and in a room"),
        }
    }

    /// A signed-in user's chat line: checked here, then mixed by the room's owner (which checks
    /// mute and the room's rate, and stamps sender, time and the type's priority).
    fn client_send(&mut self, key: ConnKey, s: Send, now: Now) {
        if s.id.len() > ACK_ID_BYTES_MAX {
            return self.send_error(key, code::BAD_REQUEST, "send id is longer than 64 bytes", now);
        }
        // With an id every outcome is an `ack`; without, refusals are error frames.
        let ack = (!s.id.is_empty()).then(|| Box::<str>::from(s.id));
        let kind = if s.r#type.is_empty() { "chat".to_owned() } else { s.r#type };
        let checked = if kind.len() > TYPE_BYTES_MAX {
            Err((code::BAD_REQUEST, "message type is too long"))
        } else {
            self.sender_checks(key, s.data.len(), now)
        };
        let (room, user) = match checked {
            Ok(v) => v,
            Err((c, why)) => return self.refuse_send(key, ack, c, why, now),
        };
        let user_key = self.conns.get(key).user;
        let Some(priority) = self.cfg.client_types.priority(&kind, self.users.grants(user_key)) else {
            self.counters.inc(Series::SendTypeRefused);
            return self.refuse_send(key, ack, code::FORBIDDEN, "clients may not send this message type", now);
        };
        let weight = self.users.level(user_key);
        let msg = Message { r#type: kind, data: s.data, ..Message::default() };
        let from = self.at(key);
        if self.hooked(Hook::Send) {
            return self.ask_send(SendCall { room, msg, user, weight, priority, from, ack }, now);
        }
        let send = OwnerMail::Send { room: room.clone(), msg: Box::new(msg), user, weight, priority, from, ack };
        self.ask_owner(&room, send);
    }

    /// A send refused here: an `ack` with the refusal when the client gave an id, else an
    /// error frame.
    fn refuse_send(&mut self, key: ConnKey, ack: Option<Box<str>>, code: u32, reason: &str, now: Now) {
        match ack {
            Some(id) => {
                let room = self.current_room(key).map(|r| r.as_str().to_owned()).unwrap_or_default();
                let ack = Ack { id: id.into(), room, seq: 0, code, reason: reason.to_owned() };
                self.send_frame(key, &ServerFrame { frame: Some(server_frame::Frame::Ack(ack)) }, now);
            }
            None => self.send_error(key, code, reason, now),
        }
    }

    fn attr_sync(&mut self, key: ConnKey, s: AttrSync, now: Now) {
        let room = match (s.room.is_empty(), self.current_room(key)) {
            (true, Some(r)) => r.clone(),
            (false, _) => match RoomName::parse(&s.room, self.cfg.name_bytes_max) {
                Ok(r) if self.current_room(key) == Some(&r) => r,
                _ => return self.send_error(key, code::NOT_IN_ROOM, "sync the room you are in", now),
            },
            (true, None) => return self.send_error(key, code::NOT_IN_ROOM, "join a room first", now),
        };
        let from = self.at(key);
        self.ask_owner(&room.clone(), OwnerMail::AttrSync { room, after: s.after_version, from });
    }

    fn attr_set(&mut self, key: ConnKey, s: AttrSet, now: Now) {
        let Some(room) = self.current_room(key).cloned() else {
            return self.send_error(key, code::NOT_IN_ROOM, "join a room first", now);
        };
        if !self.has_right(key, flag::ATTRS, &room) {
            self.counters.inc(Series::RefusedRights);
            return self.send_error(key, code::FORBIDDEN, "this token may not set attributes in this room", now);
        }
        let value = (!s.delete).then_some(s.value);
        let origin = Origin::Conn(self.at(key));
        self.ask_owner(&room.clone(), OwnerMail::SetAttr { room, key: s.key, value, origin });
    }

    /// Whether the connection's token grants `right` (ADMIN or ATTRS) in `room` (its `rooms`
    /// claim must name the room, or `"*"`).
    fn has_right(&self, key: ConnKey, right: u8, room: &RoomName) -> bool {
        let conn = self.conns.get(key);
        conn.has(right) && self.users.grants(conn.user).is_some_and(|g| g.rights_in(room.as_str()))
    }

    fn moderate(&mut self, key: ConnKey, m: Moderate, now: Now) {
        let Some(room) = self.current_room(key).cloned() else {
            return self.send_error(key, code::NOT_IN_ROOM, "join a room first", now);
        };
        if !self.has_right(key, flag::ADMIN, &room) {
            self.counters.inc(Series::RefusedRights);
            return self.send_error(key, code::FORBIDDEN, "this token may not moderate this room", now);
        }
        let until_ms =
            (m.duration_ms > 0).then(|| now.unix.0.saturating_add(m.duration_ms.min(i64::MAX as u64) as i64));
        let action = match moderate::Action::try_from(m.action) {
            Ok(moderate::Action::Kick) => ModAction::Kick,
            Ok(moderate::Action::Mute) => ModAction::Mute { until_ms },
            Ok(moderate::Action::Unmute) => ModAction::Unmute,
            Ok(moderate::Action::Ban) => ModAction::Ban { until_ms },
            Ok(moderate::Action::Unban) => ModAction::Unban,
            Ok(moderate::Action::Whitelist) => ModAction::Whitelist,
            Ok(moderate::Action::Unwhitelist) => ModAction::Unwhitelist,
            Err(_) => return self.send_error(key, code::BAD_REQUEST, "unknown moderation action", now),
        };
        let (user, reason) = (UserId::new(&m.user), Arc::from(m.reason));
        let origin = Origin::Conn(self.at(key));
        self.ask_owner(&room.clone(), OwnerMail::Moderate { room, user, action, reason, origin });
    }

    /// An error frame to one connection.
    pub(super) fn send_error(&mut self, key: ConnKey, code: u32, reason: &str, now: Now) {
        let e = Error { code, reason: reason.into() };
        self.send_frame(key, &ServerFrame { frame: Some(server_frame::Frame::Error(e)) }, now);
    }

    /// Starts the close handshake: Close frame out, then wait for the peer's Close.
    pub(super) fn close(&mut self, key: ConnKey, code: CloseCode, reason: &str, series: Series, now: Now) {
        let conn = self.conns.get_mut(key);
        match conn.state {
            State::Open => {}
            State::Handshake | State::Polling => return self.terminate(key, Some(series)),
            State::Closing | State::Flushing | State::Terminating => return,
        }
        self.counters.inc(series);
        conn.state = State::Closing;
        conn.deadline = now.tick_after(self.cfg.close_timeout_ms);
        // What is already queued still goes out, then Close.
        self.leave_room(key);
        self.enqueue_owned(key, frame::close_frame(code, reason), now);
    }

    /// Fails the connection after a framing error: the stream can no longer be parsed, so send
    /// Close and end once it is written, without waiting for the peer's Close.
    pub(super) fn fail(&mut self, key: ConnKey, code: CloseCode, reason: &str, series: Series, now: Now) {
        self.close(key, code, reason, series, now);
        let conn = self.conns.get_mut(key);
        if conn.state == State::Closing {
            conn.state = State::Flushing;
        }
    }

    /// The peer sent Close: answer it (if we have not) and end once it is written.
    fn peer_closed(&mut self, key: ConnKey, code: Option<CloseCode>, now: Now) {
        let conn = self.conns.get_mut(key);
        let was_open = conn.state == State::Open;
        conn.state = State::Flushing;
        conn.deadline = now.tick_after(self.cfg.close_timeout_ms);
        if was_open {
            self.counters.inc(Series::ClosedPeer);
            self.leave_room(key);
            let reply = match code {
                Some(c) => frame::close_frame(c, ""),
                None => frame::frame(Opcode::Close, &[]),
            };
            self.enqueue_owned(key, reply, now);
        } else if conn.queue.is_empty() {
            self.terminate(key, None);
        }
    }
}

fn read_error_series(e: &ReadError) -> Series {
    match e {
        ReadError::InvalidUtf8 => Series::ClosedUtf8,
        ReadError::TooBig => Series::ClosedTooBig,
        ReadError::Protocol(_) | ReadError::Unmasked => Series::ClosedProtocol,
    }
}
