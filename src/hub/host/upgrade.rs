//! A connection's first bytes: the HTTP request. Route it (`/ws`, the echo path, or plain
//! HTTP), authenticate the token, validate the room, then answer 101 + welcome, refuse with a
//! status and close, or ask the room's owner for a short poll's answer.

use super::Host;
use super::conn::{State, flag};
use super::edge::Admit;
use super::hooked::Connecting;
use crate::auth::Claims;
use crate::envelope::Format;
use crate::hooks::call::Hook;
use crate::hub::mail::ConnAt;
use crate::ids::{ConnKey, Now};
use crate::metrics::Series;
use crate::proto::{ServerFrame, Welcome, server_frame};
use crate::room::RoomName;
use crate::wire::handshake::{self as wire, HandshakeError, Parsed, Request, Upgrade};
use crate::wire::proxy::Parsed as ProxyParsed;

/// Path of the WebSocket endpoint.
pub const WS_PATH: &str = "/ws";

/// Who a handshake turned out to be: a verified token, or None for an anonymous viewer.
pub(super) type Identity = Option<Claims>;

/// A refused request: status, reason and the counter it bumps.
pub(super) struct Refusal {
    pub status: u16,
    pub message: String,
    pub series: Series,
}

impl Host {
    /// Handshake phase: accumulate the request head; act once it is complete.
    pub(super) fn read_handshake(&mut self, key: ConnKey, data: &mut [u8], now: Now) {
        let limits = self.cfg.handshake;
        match self.intake.take_head(key) {
            None => match wire::parse_request(data, &limits) {
                Ok(Parsed::Partial) => self.stash_head(key, data.to_vec(), now),
                Ok(Parsed::Complete { request, consumed }) => {
                    self.route(key, request, now);
                    self.read_after_head(key, &mut data[consumed..], now);
                }
                Err(e) => self.refuse_malformed(key, &e, now),
            },
            Some(mut head) => {
                head.extend_from_slice(data);
                match wire::parse_request(&head, &limits) {
                    Ok(Parsed::Partial) => self.stash_head(key, head, now),
                    Ok(Parsed::Complete { request, consumed }) => {
                        self.route(key, request, now);
                        self.read_after_head(key, &mut head[consumed..], now);
                    }
                    Err(e) => self.refuse_malformed(key, &e, now),
                }
            }
        }
    }

    /// Keeps a partial request head within the partial-input budgets (see `Host::make_room`).
    fn stash_head(&mut self, key: ConnKey, head: Vec<u8>, now: Now) {
        let budget = self.intake.stash_head(key, head);
        self.within_budget(key, budget, now);
    }

    /// The shard's partial-input budget is spent and this connection holds the most: its
    /// handshake is refused for now.
    pub(super) fn busy(&mut self, key: ConnKey, now: Now) {
        self.intake.release(key);
        let body = serde_json::json!({"error": "server busy: try again"}).to_string();
        let bytes = wire::http_response(503, "application/json", &["Retry-After: 1"], body.as_bytes());
        self.flush_then_close(key, bytes, now);
    }

    /// Behind a balancer: the PROXY v2 header, then the request (or the TLS handshake). A
    /// malformed header ends the connection without an answer (the balancer expects none).
    pub(super) fn read_proxy(&mut self, key: ConnKey, data: &mut [u8], now: Now) {
        let mut buf = match self.intake.take_head(key) {
            Some(mut head) => {
                head.extend_from_slice(data);
                head
            }
            None => data.to_vec(),
        };
        match crate::wire::proxy::parse(&buf) {
            Ok(ProxyParsed::Partial) => self.stash_head(key, buf, now),
            Ok(ProxyParsed::Complete { source, consumed }) => {
                let Some(peer) = self.peers.get_mut(&key) else { unreachable!("awaiting_proxy is a peer's") };
                peer.awaiting_proxy = false;
                if let Some(source) = source {
                    peer.addr = Some(source.ip());
                }
                let addr = peer.addr;
                if let Some(ip) = addr
                    && !self.admit_connection(ip, now)
                {
                    return self.terminate(key, None);
                }
                match (consumed < buf.len(), self.cfg.tls.is_some()) {
                    (false, _) => {}
                    (true, true) => self.tls_recv(key, &mut buf[consumed..], now),
                    (true, false) => self.read_handshake(key, &mut buf[consumed..], now),
                }
            }
            Err(_) => {
                self.counters.inc(Series::HsProxy);
                self.terminate(key, None);
            }
        }
    }

    /// Frames a client sent right behind its request head.
    pub(super) fn read_after_head(&mut self, key: ConnKey, rest: &mut [u8], now: Now) {
        if rest.is_empty() {
            return;
        }
        match self.conns.get(key).state {
            State::Open => self.read_frames(key, rest, now),
            State::Handshake if self.connecting.contains_key(&key) => self.early_input(key, rest, now),
            _ => {}
        }
    }

    fn route(&mut self, key: ConnKey, mut request: Request, now: Now) {
        let addr = self.peers.get(&key).and_then(|p| p.addr);
        if let Some(ip) = addr {
            let refusal = match self.edge.request(ip, now.ms) {
                Admit::Yes => None,
                Admit::Limited => Some((429, "too many requests from this address", Series::HsRate)),
                Admit::TableFull => Some((503, "server busy: try again", Series::RefusedAddrTable)),
            };
            if let Some((status, message, series)) = refusal {
                return self.refuse(key, Refusal { status, message: message.into(), series }, now);
            }
        }
        let upgrade = match request.websocket.take() {
            None => return self.plain_http(key, &request, now),
            Some(Err(e)) => return self.refuse_malformed(key, &e, now),
            Some(Ok(upgrade)) => upgrade,
        };
        if self.draining() {
            let message = "this node is draining: connect to another".into();
            return self.refuse(key, Refusal { status: 503, message, series: Series::HsDraining }, now);
        }
        let echo = !self.cfg.echo_path.is_empty() && request.path == self.cfg.echo_path;
        if !echo && request.path != WS_PATH {
            let r =
                Refusal { status: 404, message: format!("no WebSocket at {}", request.path), series: Series::HsPath };
            return self.refuse(key, r, now);
        }
        if self.allowed_origin(request.origin.as_deref()).is_none() {
            let r = Refusal {
                status: 403,
                message: "this Origin may not use this gateway".into(),
                series: Series::HsOrigin,
            };
            return self.refuse(key, r, now);
        }
        // With a connect hook the backend may sign in whom the gateway cannot (its own token,
        // or none): the token goes to it instead of a refusal.
        let hooked = !echo && self.hooked(Hook::Connect);
        let identified = match self.identify(&request, now) {
            Ok(id) => Ok((id, None)),
            Err(_) if hooked => Ok((None, token(&request))),
            Err(r) => Err(r),
        };
        let decided = identified.and_then(|(id, token)| {
            let room = match wire::query_param(&request.query, "room") {
                Some(name) if !echo => Some(RoomName::parse(&name, self.cfg.name_bytes_max).map_err(|e| Refusal {
                    status: 400,
                    message: e.message().into(),
                    series: Series::HsRoom,
                })?),
                _ => None,
            };
            let after = match wire::query_param(&request.query, "after") {
                None => 0,
                Some(v) => v.parse::<u64>().map_err(|_| Refusal {
                    status: 400,
                    message: "after must be a non-negative integer (a seq)".into(),
                    series: Series::HsRoom,
                })?,
            };
            Ok((id, token, room.map(|r| (r, after))))
        });
        match decided {
            Ok((id, token, room)) if hooked => {
                self.ask_connect(key, Connecting { upgrade, id, room }, token, request.origin, now)
            }
            Ok((id, _, room)) if room.is_some() && self.hooked(Hook::Join) => {
                self.admitted(key, Connecting { upgrade, id, room }, now)
            }
            Ok((id, _, room)) => self.open(key, &upgrade, id, room, echo, now),
            Err(r) => self.refuse(key, r, now),
        }
    }

    /// Token from `?token=` or `Authorization: Bearer`; anonymous when allowed.
    pub(super) fn identify(&self, request: &Request, now: Now) -> Result<Identity, Refusal> {
        let Some(token) = token(request) else {
            if self.cfg.allow_anonymous {
                return Ok(None);
            }
            let message = "a token is required".into();
            return Err(Refusal { status: 401, message, series: Series::HsAnonymous });
        };
        let Some(verifier) = &self.verifier else {
            let message = "tokens are not accepted: no jwt_secret is configured".into();
            return Err(Refusal { status: 401, message, series: Series::HsToken });
        };
        let now_s = (now.unix.0.max(0) / 1000) as u64;
        match verifier.verify(&token, now_s) {
            Ok(claims) => Ok(Some(claims)),
            Err(e) => {
                let message = format!("bad token: {}", e.reason());
                Err(Refusal { status: 401, message, series: Series::HsToken })
            }
        }
    }

    /// Answers 101 and the welcome, and joins the room the URL named.
    pub(super) fn open(
        &mut self,
        key: ConnKey,
        upgrade: &Upgrade,
        id: Identity,
        room: Option<(RoomName, u64)>,
        echo: bool,
        now: Now,
    ) {
        let idle = now.tick_after(self.cfg.idle_timeout_ms);
        let format = Format::from(upgrade.protocol);
        let conn = self.conns.get_mut(key);
        conn.state = State::Open;
        conn.flags |= flag::OPENED;
        conn.deadline = idle;
        if format == Format::Json {
            conn.flags |= flag::JSON;
        }
        if upgrade.deflate && self.cfg.deflate {
            conn.flags |= flag::DEFLATE;
            self.counters.inc(Series::DeflateNegotiated);
        }
        if echo {
            self.echoes.insert(key);
        }
        self.conns.opened();
        self.peers.remove(&key);
        self.counters.inc(Series::HandshakeOk);
        let expires_ms = id.as_ref().map_or(0, |claims| self.sign_in(key, claims));
        if !self.enqueue_owned(key, wire::response_101(upgrade, self.cfg.deflate), now) || echo {
            return;
        }
        let welcome = Welcome {
            conn_id: (u64::from(self.cfg.shard.0) << 32) | (u64::from(key.0) + 1),
            user: id.map(|c| c.sub).unwrap_or_default(),
            heartbeat_ms: self.cfg.heartbeat_ms,
            server_ms: now.unix.0,
            room: room.as_ref().map(|(r, _)| r.as_str().to_owned()).unwrap_or_default(),
            expires_ms,
        };
        let frame = ServerFrame { frame: Some(server_frame::Frame::Welcome(welcome)) };
        // The URL's room: past the join hook already, when there is one (see `admitted`).
        if self.send_frame(key, &frame, now)
            && let Some((room, after)) = room
            && !self.banned(key, &room, now)
        {
            self.enter(key, &room, after);
        }
    }

    /// Where an owner's answer to this connection goes.
    pub(super) fn at(&self, key: ConnKey) -> ConnAt {
        ConnAt { shard: self.cfg.shard, conn: self.conns.id(key) }
    }

    fn refuse_malformed(&mut self, key: ConnKey, e: &HandshakeError, now: Now) {
        self.counters.inc(handshake_series(e));
        self.flush_then_close(key, wire::refusal(e), now);
    }

    pub(super) fn refuse(&mut self, key: ConnKey, r: Refusal, now: Now) {
        self.counters.inc(r.series);
        let body = serde_json::json!({"error": r.message}).to_string();
        let bytes = wire::http_response(r.status, "application/json", &[], body.as_bytes());
        self.flush_then_close(key, bytes, now);
    }

    /// Sends a final HTTP answer, then closes (input from now on is discarded).
    pub(super) fn flush_then_close(&mut self, key: ConnKey, bytes: Vec<u8>, now: Now) {
        let deadline = now.tick_after(self.cfg.close_timeout_ms);
        let conn = self.conns.get_mut(key);
        conn.state = State::Flushing;
        conn.deadline = deadline;
        self.enqueue_owned(key, bytes, now);
    }
}

/// The request's token: `?token=`, else `Authorization: Bearer`.
fn token(request: &Request) -> Option<String> {
    wire::query_param(&request.query, "token")
        .map(|t| t.into_owned())
        .or_else(|| request.bearer.clone())
        .filter(|t| !t.is_empty())
}

fn handshake_series(e: &HandshakeError) -> Series {
    match e {
        HandshakeError::TooLarge => Series::HsTooLarge,
        HandshakeError::Malformed => Series::HsMalformed,
        HandshakeError::Method => Series::HsMethod,
        HandshakeError::NotUpgrade => Series::HsNotUpgrade,
        HandshakeError::Version => Series::HsVersion,
        HandshakeError::Key => Series::HsKey,
        HandshakeError::Subprotocol => Series::HsSubprotocol,
    }
}
