//! What an open connection's bytes mean: WebSocket events from the reader, client frames
//! (join, leave, send, ping) from the envelope, and the close handshake.

use super::conn::{State, flag};
use super::index::NONE;
use super::mail::{Mail, Origin};
use super::{Hub, Now};
use crate::envelope;
use crate::metrics::Series;
use crate::proto::{ClientFrame, Error, Message, Pong, Priority, ServerFrame, client_frame, server_frame};
use crate::room::RoomName;
use crate::room::owner::PublishError;
use crate::wire::CloseCode;
use crate::wire::frame::{self, Opcode};
use crate::wire::reader::{Event, Flow, ReadError};

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

impl Hub {
    /// Feeds bytes to the connection's reader and acts on each event in order.
    pub(super) fn read_frames(&mut self, key: u32, data: &mut [u8], now: Now) {
        let Some(conn) = self.conns.get_mut(key as usize) else { return };
        // The reader leaves the connection while it runs so events can change the hub freely.
        let mut reader = std::mem::take(&mut conn.reader);
        let limits = self.cfg.read;
        let result = reader.feed(data, &limits, &mut |event| self.on_event(key, event, now));
        if let Some(conn) = self.conns.get_mut(key as usize)
            && matches!(conn.state, State::Open | State::Closing)
        {
            conn.reader = reader;
        }
        if let Err(e) = result {
            self.fail(key, e.close_code(), e.reason(), read_error_series(&e), now);
        }
    }

    fn on_event(&mut self, key: u32, event: Event<'_>, now: Now) -> Flow {
        self.counters.inc(Series::FramesIn);
        let Some(conn) = self.conns.get(key as usize) else { return Flow::Stop };
        let (state, echo) = (conn.state, conn.has(flag::ECHO));
        match event {
            Event::Text(_) | Event::Binary(_) if state != State::Open => Flow::Continue,
            Event::Text(text) if echo => self.echo(key, Opcode::Text, text.as_bytes()),
            Event::Binary(bytes) if echo => self.echo(key, Opcode::Binary, bytes),
            Event::Text(text) => self.client_message(key, true, text.as_bytes(), now),
            Event::Binary(bytes) => self.client_message(key, false, bytes, now),
            Event::Ping(payload) if state == State::Open => {
                self.enqueue_owned(key, frame::frame(Opcode::Pong, payload));
                Flow::Continue
            }
            Event::Ping(_) | Event::Pong(_) => Flow::Continue,
            Event::Close { code, .. } => {
                self.peer_closed(key, code, now);
                Flow::Stop
            }
        }
    }

    fn echo(&mut self, key: u32, opcode: Opcode, payload: &[u8]) -> Flow {
        if self.enqueue_owned(key, frame::frame(opcode, payload)) { Flow::Continue } else { Flow::Stop }
    }

    fn client_message(&mut self, key: u32, text: bool, payload: &[u8], now: Now) -> Flow {
        let Some(conn) = self.conns.get(key as usize) else { return Flow::Stop };
        match envelope::decode(conn.format(), text, payload) {
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

    fn client_frame(&mut self, key: u32, frame: ClientFrame, now: Now) {
        match frame.frame {
            Some(client_frame::Frame::Join(j)) => match RoomName::parse(&j.room, self.cfg.name_bytes_max) {
                Ok(room) => self.join(key, &room),
                Err(e) => self.send_error(key, code::BAD_REQUEST, e.message()),
            },
            Some(client_frame::Frame::Leave(l)) => {
                if self.current_room(key).is_some_and(|r| l.room.is_empty() || r.as_str() == l.room) {
                    self.leave_room(key);
                } else {
                    self.send_error(key, code::NOT_IN_ROOM, "not in that room");
                }
            }
            Some(client_frame::Frame::Send(s)) => self.client_send(key, s.r#type, s.data, now),
            Some(client_frame::Frame::Ping(_)) => {
                let pong = ServerFrame { frame: Some(server_frame::Frame::Pong(Pong { server_ms: now.unix.0 })) };
                if let Some(bytes) = self.encode_for(key, &pong) {
                    self.enqueue_owned(key, bytes);
                }
            }
            None => {}
        }
    }

    fn current_room(&self, key: u32) -> Option<&RoomName> {
        let conn = self.conns.get(key as usize)?;
        self.rooms.get(conn.room).map(|r| &r.name)
    }

    /// Joins a room, leaving the current one first.
    pub(super) fn join(&mut self, key: u32, room: &RoomName) {
        if self.current_room(key) == Some(room) {
            return;
        }
        self.leave_room(key);
        let Some(conn) = self.conns.get(key as usize) else { return };
        let json = conn.has(flag::JSON);
        match self.rooms.join(room, key, json) {
            Ok((r, pos)) => {
                if let Some(conn) = self.conns.get_mut(key as usize) {
                    conn.room = r;
                    conn.member_pos = pos;
                }
            }
            Err(_) => self.send_error(key, code::UNAVAILABLE, "too many rooms on this node"),
        }
    }

    /// Leaves the current room, if any.
    pub(super) fn leave_room(&mut self, key: u32) {
        let Some(conn) = self.conns.get_mut(key as usize) else { return };
        let room = std::mem::replace(&mut conn.room, NONE);
        if room == NONE {
            return;
        }
        let (pos, json) = (conn.member_pos, conn.has(flag::JSON));
        // The last member was swapped into the leaver's position.
        if let Some(moved) = self.rooms.leave(room, pos, json)
            && let Some(m) = self.conns.get_mut(moved as usize)
        {
            m.member_pos = pos;
        }
    }

    /// A signed-in user's chat line: checked here, stamped and mixed by the room's owner.
    fn client_send(&mut self, key: u32, kind: String, data: Vec<u8>, now: Now) {
        let Some(conn) = self.conns.get(key as usize) else { return };
        let refusal = if !conn.has(flag::SIGNED_IN) {
            Some((code::UNAUTHORIZED, "anonymous viewers cannot send"))
        } else if !conn.has(flag::CAN_SEND) {
            Some((code::FORBIDDEN, "this token may not send"))
        } else if conn.room == NONE {
            Some((code::NOT_IN_ROOM, "join a room first"))
        } else if data.len() > self.cfg.data_bytes_max {
            Some((code::TOO_LARGE, "message data is too large"))
        } else if kind.len() > TYPE_BYTES_MAX {
            Some((code::BAD_REQUEST, "message type is too long"))
        } else {
            None
        };
        if let Some((c, why)) = refusal {
            self.counters.inc(Series::SendRefused);
            return self.send_error(key, c, why);
        }
        let (Some(room), Some(sender)) = (self.current_room(key).cloned(), self.users.name(conn.user).cloned()) else {
            return;
        };
        let msg = Message {
            r#type: if kind.is_empty() { "chat".into() } else { kind },
            priority: Priority::Low as i32,
            sender: sender.to_string(),
            data,
            ..Message::default()
        };
        let origin = Origin::Conn { shard: self.cfg.shard, conn: key };
        self.publish(room, msg, origin, now);
    }

    /// Routes a room message to its owner (this shard or another).
    pub(super) fn publish(&mut self, room: RoomName, msg: Message, origin: Origin, now: Now) {
        let owner = room.owner(self.cfg.shards);
        if owner != self.cfg.shard {
            self.mail.push((owner, Mail::Publish { room, msg: Box::new(msg), origin }));
            return;
        }
        let result = self.owner.publish(&room, msg, now.unix);
        match &result {
            Ok(_) => self.counters.inc(Series::MessagesIn),
            Err(PublishError::Backlog) => self.counters.inc(Series::DropBacklog),
            Err(PublishError::RoomsFull) => self.counters.inc(Series::DropNoRoom),
        }
        match origin {
            Origin::Api(reply) => reply.send(result),
            Origin::Conn { shard, conn } => {
                if let Err(e) = result {
                    let (c, why) = publish_refusal(e);
                    if shard == self.cfg.shard {
                        self.send_error(conn, c, why);
                    } else {
                        self.mail.push((shard, Mail::Refused { conn, code: c, reason: why }));
                    }
                }
            }
        }
    }

    /// An error frame to one connection.
    pub(super) fn send_error(&mut self, key: u32, code: u32, reason: &str) {
        let e = Error { code, reason: reason.into() };
        let frame = ServerFrame { frame: Some(server_frame::Frame::Error(e)) };
        if let Some(bytes) = self.encode_for(key, &frame) {
            self.enqueue_owned(key, bytes);
        }
    }

    /// Starts the close handshake: Close frame out, then wait for the peer's Close.
    pub(super) fn close(&mut self, key: u32, code: CloseCode, reason: &str, series: Series, now: Now) {
        let Some(conn) = self.conns.get_mut(key as usize) else { return };
        match conn.state {
            State::Open => {}
            State::Handshake => return self.terminate(key, Some(series)),
            State::Closing | State::Flushing | State::Terminating => return,
        }
        self.counters.inc(series);
        conn.state = State::Closing;
        conn.deadline = now.tick_after(self.cfg.close_timeout_ms);
        // What is already queued still goes out, then Close.
        self.leave_room(key);
        self.enqueue_owned(key, frame::close_frame(code, reason));
    }

    /// Fails the connection after a framing error: the stream can no longer be parsed, so send
    /// Close and end once it is written, without waiting for the peer's Close.
    fn fail(&mut self, key: u32, code: CloseCode, reason: &str, series: Series, now: Now) {
        self.close(key, code, reason, series, now);
        if let Some(conn) = self.conns.get_mut(key as usize)
            && conn.state == State::Closing
        {
            conn.state = State::Flushing;
        }
    }

    /// The peer sent Close: answer it (if we have not) and end once it is written.
    fn peer_closed(&mut self, key: u32, code: Option<CloseCode>, now: Now) {
        let Some(conn) = self.conns.get_mut(key as usize) else { return };
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
            self.enqueue_owned(key, reply);
        } else if conn.queue.is_empty() {
            self.terminate(key, None);
        }
    }
}

fn publish_refusal(e: PublishError) -> (u32, &'static str) {
    match e {
        PublishError::Backlog => (code::TOO_MANY, "the room is busy: message refused"),
        PublishError::RoomsFull => (code::UNAVAILABLE, "too many rooms on this node"),
    }
}

fn read_error_series(e: &ReadError) -> Series {
    match e {
        ReadError::InvalidUtf8 => Series::ClosedUtf8,
        ReadError::TooBig => Series::ClosedTooBig,
        ReadError::Protocol(_) | ReadError::Unmasked => Series::ClosedProtocol,
    }
}
