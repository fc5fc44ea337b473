//! The business API's routes: check the caller (API key, or loopback when none is set), parse
//! the body (JSON or protobuf), and turn each request into mail for the shards — to the room's
//! owner for room messages, to every shard for direct and broadcast frames — waiting for the
//! answer where the API reports one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, sync_channel};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use prost::Message as _;
use serde::Deserialize;
use serde_json::json;

use super::http::{Method, Request, Response};
use super::server::Handler;
use crate::config::Config;
use crate::hub::mail::{Mail, Origin, Reply};
use crate::ids::ShardId;
use crate::metrics::{self, Snapshot};
use crate::proto::{Broadcast, Direct, Message, Priority, PublishRequest, ServerFrame, server_frame};
use crate::room::RoomName;
use crate::room::owner::{PublishError, RoomInfo, SharedFrame};
use crate::shard::mesh::Mesh;

/// How long an API request waits for the shards before answering 503.
const SHARD_REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest message type and sender id.
const TYPE_BYTES_MAX: usize = 32;
const USER_BYTES_MAX: usize = 128;
/// API-made message ids carry this in their top 16 bits (shards use their index).
const API_ID_SOURCE: u64 = 0xFFFF;

/// The API handler.
pub struct Routes {
    mesh: Arc<Mesh>,
    metrics: Arc<[Snapshot]>,
    api_key: String,
    name_bytes_max: usize,
    data_bytes_max: usize,
    next_id: AtomicU64,
}

/// A publish body in JSON (the protobuf form is `PublishRequest`).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PublishJson {
    #[serde(rename = "type")]
    kind: Option<String>,
    priority: Option<String>,
    weight: Option<i32>,
    text: Option<String>,
    data_b64: Option<String>,
    sender: Option<String>,
    ttl_ms: Option<u32>,
    coalesce_key: Option<String>,
}

type Answer = Result<Response, Response>;

impl Routes {
    pub fn new(config: &Config, mesh: Arc<Mesh>, metrics: Arc<[Snapshot]>) -> Routes {
        Routes {
            mesh,
            metrics,
            api_key: config.api.key.clone(),
            name_bytes_max: config.rooms.name_bytes_max,
            data_bytes_max: config.rooms.data_bytes_max,
            next_id: AtomicU64::new(0),
        }
    }

    fn route(&self, req: &Request) -> Answer {
        let path = req.path.as_str();
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let get = matches!(req.method, Method::Get | Method::Head);
        let post = matches!(req.method, Method::Post);
        match segments.as_slice() {
            ["healthz"] if get => Ok(self.health()),
            ["metrics"] if get => {
                Ok(Response::text(200, "text/plain; version=0.0.4", self.metrics_text().into_bytes()))
            }
            ["v1", "rooms", room] if get => self.room_info(room),
            ["v1", "rooms", room, "messages"] if post => self.publish_room(room, req),
            ["v1", "users", user, "messages"] if post => self.publish_user(user, req),
            ["v1", "broadcast"] if post => self.broadcast(req),
            ["healthz"]
            | ["metrics"]
            | ["v1", "rooms", _]
            | ["v1", "rooms", _, "messages"]
            | ["v1", "users", _, "messages"]
            | ["v1", "broadcast"] => Err(Response::error(405, "method not allowed on this resource")),
            _ => Err(Response::error(404, &format!("no such resource: {path}"))),
        }
    }

    fn health(&self) -> Response {
        let connections: u64 = self.metrics.iter().map(|s| s.get(metrics::Series::Connections)).sum();
        Response::json(200, &json!({"status": "ok", "shards": self.mesh.shards(), "connections": connections}))
    }

    fn metrics_text(&self) -> String {
        metrics::render(&self.metrics, "")
    }

    fn room_name(&self, raw: &str) -> Result<RoomName, Response> {
        let name = percent_decode(raw).ok_or_else(|| Response::error(400, "bad percent-encoding in room"))?;
        RoomName::parse(&name, self.name_bytes_max).map_err(|e| Response::error(400, e.message()))
    }

    fn room_info(&self, raw: &str) -> Answer {
        let room = self.room_name(raw)?;
        let (reply, rx) = reply_channel::<RoomInfo>();
        self.post(room.owner(self.mesh.shards()), Mail::RoomInfo { room: room.clone(), reply })?;
        let info = wait(&rx)?;
        Ok(Response::json(
            200,
            &json!({"room": room.as_str(), "online": info.online, "last_seq": info.last_seq, "pending": info.pending}),
        ))
    }

    fn publish_room(&self, raw: &str, req: &Request) -> Answer {
        let room = self.room_name(raw)?;
        let msg = self.message(req)?;
        let (reply, rx) = reply_channel::<Result<u64, PublishError>>();
        let owner = room.owner(self.mesh.shards());
        self.post(owner, Mail::Publish { room, msg: Box::new(msg), origin: Origin::Api(reply) })?;
        match wait(&rx)? {
            Ok(id) => Ok(Response::json(202, &json!({"id": id.to_string()}))),
            Err(PublishError::Backlog) => Err(Response::error(429, "the room's pending backlog is full")),
            Err(PublishError::RoomsFull) => Err(Response::error(503, "too many rooms on this node")),
        }
    }

    fn publish_user(&self, raw: &str, req: &Request) -> Answer {
        let user = percent_decode(raw).ok_or_else(|| Response::error(400, "bad percent-encoding in user"))?;
        if user.is_empty() || user.len() > USER_BYTES_MAX {
            return Err(Response::error(400, "user id must be 1..=128 bytes"));
        }
        let msg = self.stamped(req)?;
        let (id, frame) = (msg.id, shared(server_frame::Frame::Direct(Direct { message: Some(msg) })));
        let user: Arc<str> = Arc::from(user);
        let n =
            self.to_every_shard(|reply| Mail::ToUser { user: Arc::clone(&user), frame: Arc::clone(&frame), reply })?;
        Ok(Response::json(202, &json!({"id": id.to_string(), "connections": n})))
    }

    fn broadcast(&self, req: &Request) -> Answer {
        let msg = self.stamped(req)?;
        let (id, frame) = (msg.id, shared(server_frame::Frame::Broadcast(Broadcast { message: Some(msg) })));
        let n = self.to_every_shard(|reply| Mail::ToAll { frame: Arc::clone(&frame), reply })?;
        Ok(Response::json(202, &json!({"id": id.to_string(), "connections": n})))
    }

    /// Sends one mail per shard and sums their counts.
    fn to_every_shard(&self, mut mail: impl FnMut(Option<Reply<usize>>) -> Mail) -> Result<usize, Response> {
        let mut waits = Vec::with_capacity(self.mesh.shards());
        for i in 0..self.mesh.shards() {
            let (reply, rx) = reply_channel::<usize>();
            self.post(ShardId(i as u16), mail(Some(reply)))?;
            waits.push(rx);
        }
        waits.iter().map(wait).sum()
    }

    /// A direct or broadcast message: id and time are stamped here (no owner is involved).
    fn stamped(&self, req: &Request) -> Result<Message, Response> {
        let mut msg = self.message(req)?;
        let n = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        msg.id = (API_ID_SOURCE << 48) | (n & 0xFFFF_FFFF_FFFF);
        msg.created_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        Ok(msg)
    }

    /// The message a publish body describes, validated.
    fn message(&self, req: &Request) -> Result<Message, Response> {
        let msg = match req.content_type.as_deref() {
            Some("application/x-protobuf") | Some("application/protobuf") => {
                let p = PublishRequest::decode(req.body.as_slice())
                    .map_err(|e| Response::error(400, &format!("bad PublishRequest: {e}")))?;
                Message {
                    r#type: p.r#type,
                    priority: p.priority,
                    weight: p.weight,
                    data: p.data,
                    sender: p.sender,
                    ttl_ms: p.ttl_ms,
                    coalesce_key: p.coalesce_key,
                    ..Message::default()
                }
            }
            // Anything else is read as JSON, so `curl -d '{...}'` (form-urlencoded) just works.
            _ => from_json(&req.body)?,
        };
        self.check(msg)
    }

    fn check(&self, mut msg: Message) -> Result<Message, Response> {
        if msg.r#type.is_empty() {
            msg.r#type = "chat".into();
        }
        if msg.r#type.len() > TYPE_BYTES_MAX {
            return Err(Response::error(400, "type is longer than 32 bytes"));
        }
        if Priority::try_from(msg.priority).is_err() {
            return Err(Response::error(400, "priority must be low, high or whitelist"));
        }
        if msg.data.len() > self.data_bytes_max {
            return Err(Response::error(413, &format!("data is larger than {} bytes", self.data_bytes_max)));
        }
        if msg.sender.len() > USER_BYTES_MAX || msg.coalesce_key.len() > USER_BYTES_MAX {
            return Err(Response::error(400, "sender and coalesce_key are at most 128 bytes"));
        }
        Ok(msg)
    }

    /// Posts mail to a shard; a full inbox is a 503 (the gateway is overloaded).
    fn post(&self, to: ShardId, mail: Mail) -> Result<(), Response> {
        self.mesh.send(to, mail).map_err(|_| Response::error(503, "gateway busy: shard inbox full"))
    }

    fn authorized(&self, req: &Request, peer: SocketAddr) -> Result<(), Response> {
        if self.api_key.is_empty() {
            if peer.ip().is_loopback() {
                return Ok(());
            }
            return Err(Response::error(403, "no API key is configured: only loopback callers are served"));
        }
        match &req.api_key {
            Some(k) if constant_time_eq(k.as_bytes(), self.api_key.as_bytes()) => Ok(()),
            Some(_) => Err(Response::error(401, "wrong API key")),
            None => Err(Response::error(401, "API key required (Authorization: Bearer or X-Api-Key)")),
        }
    }
}

impl Handler for Routes {
    fn handle(&self, request: &Request, peer: SocketAddr) -> Response {
        // Health checks are served without a key so load balancers can probe.
        let open = request.path == "/healthz";
        if !open && let Err(denied) = self.authorized(request, peer) {
            return denied;
        }
        self.route(request).unwrap_or_else(|e| e)
    }
}

fn from_json(body: &[u8]) -> Result<Message, Response> {
    let p: PublishJson = if body.is_empty() {
        PublishJson::default()
    } else {
        serde_json::from_slice(body).map_err(|e| Response::error(400, &format!("bad JSON body: {e}")))?
    };
    let data = match (p.text, p.data_b64) {
        (Some(_), Some(_)) => return Err(Response::error(400, "give text or data_b64, not both")),
        (Some(t), None) => t.into_bytes(),
        (None, Some(b)) => base64::engine::general_purpose::STANDARD
            .decode(b)
            .map_err(|e| Response::error(400, &format!("bad data_b64: {e}")))?,
        (None, None) => Vec::new(),
    };
    let priority = match p.priority.as_deref().map(str::to_ascii_lowercase).as_deref() {
        None | Some("low") => Priority::Low,
        Some("high") => Priority::High,
        Some("whitelist") => Priority::Whitelist,
        Some(_) => return Err(Response::error(400, "priority must be low, high or whitelist")),
    };
    Ok(Message {
        r#type: p.kind.unwrap_or_default(),
        priority: priority as i32,
        weight: p.weight.unwrap_or(0),
        data,
        sender: p.sender.unwrap_or_default(),
        ttl_ms: p.ttl_ms.unwrap_or(0),
        coalesce_key: p.coalesce_key.unwrap_or_default(),
        ..Message::default()
    })
}

fn shared(frame: server_frame::Frame) -> Arc<SharedFrame> {
    let whitelist = match &frame {
        server_frame::Frame::Direct(Direct { message: Some(m) })
        | server_frame::Frame::Broadcast(Broadcast { message: Some(m) }) => m.priority == Priority::Whitelist as i32,
        _ => false,
    };
    Arc::new(SharedFrame::encode(&ServerFrame { frame: Some(frame) }, true, whitelist))
}

fn reply_channel<T>() -> (Reply<T>, Receiver<T>) {
    let (tx, rx) = sync_channel(1);
    (Reply(tx), rx)
}

fn wait<T>(rx: &Receiver<T>) -> Result<T, Response> {
    rx.recv_timeout(SHARD_REPLY_TIMEOUT).map_err(|_| Response::error(503, "a shard did not answer in time"))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Decodes %XX escapes of a path segment; None for a bad escape or non-UTF-8 result.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b").as_deref(), Some("a b"));
        assert_eq!(percent_decode("%E4%BD%A0").as_deref(), Some("你"));
        assert_eq!(percent_decode("%2"), None);
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%ff"), None);
    }

    #[test]
    fn json_bodies() {
        let m = from_json(br#"{"type":"gift","priority":"HIGH","weight":5,"text":"hi","sender":"u1"}"#).unwrap();
        assert_eq!((m.r#type.as_str(), m.priority, m.weight, m.data.as_slice()), ("gift", 1, 5, &b"hi"[..]));
        let m = from_json(br#"{"data_b64":"AAE="}"#).unwrap();
        assert_eq!(m.data, vec![0, 1]);
        assert!(from_json(br#"{"text":"a","data_b64":"AA=="}"#).is_err());
        assert!(from_json(br#"{"priority":"urgent"}"#).is_err());
        assert!(from_json(br#"{"colour":"red"}"#).is_err(), "unknown fields are refused");
        assert!(from_json(b"{").is_err());
    }

    #[test]
    fn key_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
