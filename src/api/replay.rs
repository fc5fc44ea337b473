//! `GET /v1/rooms/{room}/replay?from_ms=&to_ms=&limit=&cursor=`: a room's messages by server
//! time (`created_ms`, inclusive at both ends) from Redis, for showing a recorded stream's
//! danmaku at the moment they were sent. Pages of at most `limit` (≤ `REPLAY_LIMIT_MAX`), in
//! server-time order; `next_cursor` (absent on the last page) asks for the next one.

use serde_json::{Value, json};

use super::http::{Request, Response};
use super::routes::{Answer, Routes};
use crate::store::encode::Cursor;
use crate::wire::handshake::query_param;

/// Messages one replay page holds at most.
pub const REPLAY_LIMIT_MAX: usize = 1000;
const REPLAY_LIMIT_DEFAULT: usize = 100;

impl Routes {
    pub(super) fn replay(&self, raw_room: &str, req: &Request) -> Answer {
        let room = self.room_name(raw_room)?;
        let Some(store) = &self.store else {
            return Err(Response::error(404, "replay needs durable state: start barrage with --redis"));
        };
        let q = req.head.query.as_str();
        let number = |name: &str| -> Result<Option<i64>, Response> {
            match query_param(q, name) {
                None => Ok(None),
                Some(v) => v.parse().map(Some).map_err(|_| Response::error(400, &format!("{name} must be an integer"))),
            }
        };
        let from_ms = number("from_ms")?.unwrap_or(0);
        let to_ms = number("to_ms")?.unwrap_or(i64::MAX);
        if to_ms < from_ms {
            return Err(Response::error(400, "to_ms is before from_ms"));
        }
        let limit = match number("limit")? {
            None => REPLAY_LIMIT_DEFAULT,
            Some(n) if n >= 1 => (n as usize).min(REPLAY_LIMIT_MAX),
            Some(_) => return Err(Response::error(400, "limit must be at least 1")),
        };
        let cursor = match query_param(q, "cursor") {
            None => Cursor { ms: from_ms, skip: 0 },
            Some(c) => match Cursor::parse(&c) {
                Some(c) if c.ms >= from_ms && c.ms <= to_ms => c,
                _ => return Err(Response::error(400, "bad cursor")),
            },
        };
        let (messages, next) =
            store.replay(room.as_str(), cursor, to_ms, limit).map_err(|e| Response::error(503, &e))?;
        let messages: Vec<Value> = messages.iter().map(|m| serde_json::to_value(m).unwrap_or(Value::Null)).collect();
        let mut body = json!({"room": room.as_str(), "messages": messages});
        if let Some(next) = next {
            body["next_cursor"] = json!(next.render());
        }
        Ok(Response::json(200, &body))
    }
}
