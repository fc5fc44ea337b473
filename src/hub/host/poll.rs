//! Plain HTTP on the public listener: short polls (`GET /v1/rooms/{room}/messages`), their CORS
//! preflight, and keep-alive between them. A poll is held to the same rules as a WebSocket —
//! token (`?token=` or `Authorization: Bearer`), `allow_anonymous`, the room's bans — then
//! answered by the room's owner (from its per-cursor cache). With keep-alive the connection
//! goes back to waiting for a request after the answer; a request sent before the answer
//! (pipelining) ends keep-alive instead of being queued.

use super::Host;
use super::conn::State;
use super::upgrade::Refusal;
use crate::hub::mail::OwnerMail;
use crate::ids::{ConnId, ConnKey, Now};
use crate::metrics::Series;
use crate::room::RoomName;
use crate::room::moderation::List;
use crate::wire::handshake::{self as wire, Method, Request};

/// What a plain-HTTP connection's current request asked for its answer.
pub struct HttpRequest {
    keep_alive: bool,
    /// The allowed `Origin` to name in `Access-Control-Allow-Origin` (None: `*`).
    origin: Option<Box<str>>,
}

impl Host {
    /// A request on the public listener that is not an upgrade: a short poll, its preflight,
    /// or a 404.
    pub(super) fn plain_http(&mut self, key: ConnKey, request: &Request, now: Now) {
        self.counters.inc(Series::HttpRequests);
        let Some(origin) = self.allowed_origin(request.origin.as_deref()) else {
            let message = "this Origin may not use this gateway".into();
            return self.refuse(key, Refusal { status: 403, message, series: Series::HsOrigin }, now);
        };
        self.http.insert(key, HttpRequest { keep_alive: request.keep_alive, origin });
        let segments: Vec<&str> = request.path.trim_start_matches('/').split('/').collect();
        match (request.method, segments.as_slice()) {
            (Method::Get, ["v1", "rooms", room, "messages"]) => self.short_poll(key, room, request, now),
            (Method::Options, ["v1", "rooms", _, "messages"]) => self.http_answer(key, 204, &[], now),
            (Method::Get, ["demo", rest @ ..]) if self.cfg.demo => self.demo(key, rest, &request.query, now),
            _ => {
                let message = format!("no such resource: {}", request.path);
                self.http_answer(key, 404, &serde_json::json!({"error": message}).to_string().into_bytes(), now);
            }
        }
    }

    /// `GET /v1/rooms/{room}/messages?after=SEQ&limit=N`: checked here, answered by the owner.
    fn short_poll(&mut self, key: ConnKey, room: &str, request: &Request, now: Now) {
        let parsed = poll_request(room, &request.query, self.cfg.name_bytes_max, self.cfg.poll_limit_max);
        let (room, after, limit) = match parsed {
            Ok(p) => p,
            Err(why) => {
                self.counters.inc(Series::RefusedPoll);
                let body = serde_json::json!({"error": why}).to_string().into_bytes();
                return self.http_answer(key, 400, &body, now);
            }
        };
        let claims = match self.identify(request, now) {
            Ok(claims) => claims,
            Err(r) => {
                self.counters.inc(r.series);
                let body = serde_json::json!({"error": r.message}).to_string().into_bytes();
                return self.http_answer(key, r.status, &body, now);
            }
        };
        if let Some(c) = &claims
            && self.replicas.contains(&room, List::Ban, &crate::ids::UserId::new(&c.sub), now.unix.0)
        {
            self.counters.inc(Series::JoinBanned);
            let body = serde_json::json!({"error": "you are banned from this room"}).to_string().into_bytes();
            return self.http_answer(key, 403, &body, now);
        }
        let conn = self.conns.get_mut(key);
        conn.state = State::Polling;
        conn.deadline = now.tick_after(self.cfg.close_timeout_ms);
        let from = self.at(key);
        self.ask_owner(&room.clone(), OwnerMail::Poll { room, after, limit, from });
    }

    /// The owner answered a short poll (or refused it: the way there was congested).
    pub(super) fn poll_answered(&mut self, conn: ConnId, status: u16, body: &[u8], now: Now) {
        let Some(key) = self.live(conn) else { return };
        if self.conns.get(key).state != State::Polling {
            // The poll timed out and the connection is ending.
            self.counters.inc(Series::ReplyConnGone);
            return;
        }
        self.counters.inc(Series::Polls);
        self.http_answer(key, status, body, now);
    }

    /// Bytes that arrived while a poll waits for its answer: pipelining is not supported, so
    /// the connection closes after the answer instead of keeping alive.
    pub(super) fn polling_input(&mut self, key: ConnKey) {
        if let Some(r) = self.http.get_mut(&key) {
            r.keep_alive = false;
        }
    }

    /// A JSON answer to a plain HTTP request, readable cross-origin by browsers; then the next
    /// request (keep-alive) or the end.
    fn http_answer(&mut self, key: ConnKey, status: u16, body: &[u8], now: Now) {
        let content_type = if body.is_empty() { "" } else { "application/json" };
        self.http_answer_typed(key, status, content_type, body, now);
    }

    /// An answer with its content type (keep-alive and CORS as every plain-HTTP answer).
    pub(super) fn http_answer_typed(&mut self, key: ConnKey, status: u16, content_type: &str, body: &[u8], now: Now) {
        let request = self.http.remove(&key).unwrap_or(HttpRequest { keep_alive: false, origin: None });
        let origin = format!("Access-Control-Allow-Origin: {}", request.origin.as_deref().unwrap_or("*"));
        let headers = [
            "Cache-Control: no-store",
            origin.as_str(),
            "Access-Control-Allow-Methods: GET, OPTIONS",
            "Access-Control-Allow-Headers: Authorization",
            "Access-Control-Max-Age: 600",
            "Vary: Origin",
        ];
        if !request.keep_alive {
            let bytes = wire::http_answer(status, content_type, &headers, body, false);
            return self.flush_then_close(key, bytes, now);
        }
        let bytes = wire::http_answer(status, content_type, &headers, body, true);
        let conn = self.conns.get_mut(key);
        conn.state = State::Handshake;
        conn.deadline = now.tick_after(self.cfg.handshake_timeout_ms);
        self.enqueue_owned(key, bytes, now);
    }

    /// The Origin a request may come from: Some(None) when any may (no allow-list, or no
    /// `Origin` header: not a browser), Some(Some(o)) for an allowed one, None when refused.
    pub(super) fn allowed_origin(&self, origin: Option<&str>) -> Option<Option<Box<str>>> {
        match origin {
            _ if self.cfg.origins.is_empty() => Some(None),
            None => Some(None),
            Some(o) => self.cfg.origins.iter().any(|a| a == o).then(|| Some(o.into())),
        }
    }
}

/// Parses a short poll: the room (percent-decoded), `after` (a seq, default 0) and `limit`
/// (default and cap `limit_max`). Malformed input gets a reason for a 400.
fn poll_request(room: &str, query: &str, name_max: usize, limit_max: usize) -> Result<(RoomName, u64, usize), String> {
    let raw = format!("r={room}");
    let room = wire::query_param(&raw, "r").unwrap_or_default();
    let room = RoomName::parse(&room, name_max).map_err(|e| e.message().to_string())?;
    let number = |name: &str| -> Result<Option<u64>, String> {
        match wire::query_param(query, name) {
            None => Ok(None),
            Some(v) => v.parse::<u64>().map(Some).map_err(|_| format!("{name} must be a non-negative integer")),
        }
    };
    let after = number("after")?.unwrap_or(0);
    let limit = number("limit")?.map_or(limit_max, |l| (l as usize).clamp(1, limit_max));
    Ok((room, after, limit))
}
