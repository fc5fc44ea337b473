//! Publishing through the API: the message body (JSON or protobuf `PublishRequest`), checked,
//! then sent to the room's owner (room messages) or to every shard (direct and broadcast).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use prost::Message as _;
use serde::Deserialize;
use serde_json::json;

use super::http::{Request, Response};
use super::routes::{Answer, Routes, percent_decode, reply_channel, wait};
use crate::hub::mail::{HostMail, OwnerMail};
use crate::ids::UserId;
use crate::proto::{Broadcast, Direct, Message, PublishRequest, ServerFrame, server_frame};
use crate::room::Priority;
use crate::room::frames::{Class, SharedFrame};
use crate::room::owner::{PublishError, Published};

/// Longest message type, and sender / user / coalesce key.
const TYPE_BYTES_MAX: usize = 32;
pub(super) const USER_BYTES_MAX: usize = 128;
/// API-made message ids carry this in their top 16 bits (shards use their index).
const API_ID_SOURCE: u64 = 0xFFFF;

/// A publish body in JSON (the protobuf form is `PublishRequest`).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct PublishJson {
    #[serde(rename = "type")]
    kind: Option<String>,
    priority: Option<String>,
    weight: Option<i32>,
    text: Option<String>,
    data_b64: Option<String>,
    sender: Option<String>,
    ttl_ms: Option<u32>,
    coalesce_key: Option<String>,
    /// The target of an item of a batch (`POST /v1/publish`); refused in single publishes,
    /// whose path names the target.
    pub(super) room: Option<String>,
    pub(super) user: Option<String>,
    pub(super) broadcast: Option<bool>,
}

impl Routes {
    pub(super) fn publish_room(&self, raw: &str, req: &Request) -> Answer {
        let room = self.room_name(raw)?;
        let (msg, priority) = self.message(req)?;
        let (reply, rx) = reply_channel::<Result<Published, PublishError>>();
        let owner = self.owner_of(&room);
        self.post(owner, OwnerMail::Publish { room, msg: Box::new(msg), priority, reply }.into())?;
        match wait(&rx)? {
            Ok(p) => Ok(Response::json(202, &json!({"id": p.id.to_string(), "coalesced": p.coalesced}))),
            Err(e) => {
                let (status, why) = e.code();
                Err(Response::error(status, why))
            }
        }
    }

    pub(super) fn publish_user(&self, raw: &str, req: &Request) -> Answer {
        let user = percent_decode(raw).ok_or_else(|| Response::error(400, "bad percent-encoding in user"))?;
        if user.is_empty() || user.len() > USER_BYTES_MAX {
            return Err(Response::error(400, "user id must be 1..=128 bytes"));
        }
        let (msg, class) = self.stamped(req)?;
        let (id, frame) = (msg.id, shared(server_frame::Frame::Direct(Direct { message: Some(msg) }), class));
        let user = UserId::new(&user);
        let n = self
            .to_every_shard(|reply| HostMail::ToUser { user: user.clone(), frame: Arc::clone(&frame), reply }.into())?;
        // In a cluster the other nodes deliver it too; `connections` counts this node's.
        self.to_other_nodes(HostMail::ToUser { user, frame, reply: None }.into())?;
        Ok(Response::json(202, &json!({"id": id.to_string(), "connections": n})))
    }

    pub(super) fn broadcast(&self, req: &Request) -> Answer {
        let (msg, class) = self.stamped(req)?;
        let (id, frame) = (msg.id, shared(server_frame::Frame::Broadcast(Broadcast { message: Some(msg) }), class));
        let n = self.to_every_shard(|reply| HostMail::ToAll { frame: Arc::clone(&frame), reply }.into())?;
        self.to_other_nodes(HostMail::ToAll { frame, reply: None }.into())?;
        Ok(Response::json(202, &json!({"id": id.to_string(), "connections": n})))
    }

    /// A direct or broadcast message and its shedding class (see `stamp`).
    fn stamped(&self, req: &Request) -> Result<(Message, Class), Response> {
        let (msg, priority) = self.message(req)?;
        Ok(self.stamp(msg, priority))
    }

    /// Id, time and the type's default priority stamped on a direct or broadcast message (it
    /// has no owner to do it); its shedding class.
    pub(super) fn stamp(&self, mut msg: Message, priority: Option<Priority>) -> (Message, Class) {
        let priority =
            priority.unwrap_or_else(|| self.types.get(msg.r#type.as_str()).copied().unwrap_or_default().priority);
        msg.priority = priority.wire();
        let n = self.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        msg.id = (API_ID_SOURCE << 48) | (n & 0xFFFF_FFFF_FFFF);
        msg.created_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        (msg, Class::from(priority))
    }

    /// The message a publish body describes, validated, and the priority it named (None: the
    /// type's default applies).
    fn message(&self, req: &Request) -> Result<(Message, Option<Priority>), Response> {
        let (msg, priority) = match req.head.content_type.as_deref() {
            Some("application/x-protobuf") | Some("application/protobuf") => {
                let p = PublishRequest::decode(req.body.as_slice())
                    .map_err(|e| Response::error(400, &format!("bad PublishRequest: {e}")))?;
                decode_proto(p)?
            }
            // Anything else is read as JSON, so `curl -d '{...}'` (form-urlencoded) just works.
            _ => from_json(&req.body)?,
        };
        Ok((self.check(msg)?, priority))
    }

    pub(super) fn check(&self, mut msg: Message) -> Result<Message, Response> {
        if msg.r#type.is_empty() {
            msg.r#type = "chat".into();
        }
        if msg.r#type.len() > TYPE_BYTES_MAX {
            return Err(Response::error(400, "type is longer than 32 bytes"));
        }
        if msg.data.len() > self.data_bytes_max {
            return Err(Response::error(413, &format!("data is larger than {} bytes", self.data_bytes_max)));
        }
        if msg.sender.len() > USER_BYTES_MAX || msg.coalesce_key.len() > USER_BYTES_MAX {
            return Err(Response::error(400, "sender and coalesce_key are at most 128 bytes"));
        }
        Ok(msg)
    }
}

fn bad_priority() -> Response {
    Response::error(400, "priority must be low, high or whitelist")
}

/// A protobuf publish body: the message and the priority it named.
pub(super) fn decode_proto(p: PublishRequest) -> Result<(Message, Option<Priority>), Response> {
    let priority = match p.priority {
        None => None,
        Some(v) => Some(Priority::from_wire(v).ok_or_else(bad_priority)?),
    };
    let msg = Message {
        r#type: p.r#type,
        weight: p.weight,
        data: p.data,
        sender: p.sender,
        ttl_ms: p.ttl_ms,
        coalesce_key: p.coalesce_key,
        ..Message::default()
    };
    Ok((msg, priority))
}

/// A JSON publish body: the message and the priority it named.
pub(super) fn from_json(body: &[u8]) -> Result<(Message, Option<Priority>), Response> {
    let p: PublishJson = if body.is_empty() {
        PublishJson::default()
    } else {
        serde_json::from_slice(body).map_err(|e| Response::error(400, &format!("bad JSON body: {e}")))?
    };
    if p.room.is_some() || p.user.is_some() || p.broadcast.is_some() {
        return Err(Response::error(400, "room, user and broadcast name a batch item's target (POST /v1/publish)"));
    }
    decode_json(p)
}

/// A parsed JSON publish body: the message and the priority it named.
pub(super) fn decode_json(p: PublishJson) -> Result<(Message, Option<Priority>), Response> {
    let data = match (p.text, p.data_b64) {
        (Some(_), Some(_)) => return Err(Response::error(400, "give text or data_b64, not both")),
        (Some(t), None) => t.into_bytes(),
        (None, Some(b)) => base64::engine::general_purpose::STANDARD
            .decode(b)
            .map_err(|e| Response::error(400, &format!("bad data_b64: {e}")))?,
        (None, None) => Vec::new(),
    };
    let priority = match p.priority.as_deref() {
        None => None,
        Some(name) => Some(Priority::parse(name).ok_or_else(bad_priority)?),
    };
    let msg = Message {
        r#type: p.kind.unwrap_or_default(),
        weight: p.weight.unwrap_or(0),
        data,
        sender: p.sender.unwrap_or_default(),
        ttl_ms: p.ttl_ms.unwrap_or(0),
        coalesce_key: p.coalesce_key.unwrap_or_default(),
        ..Message::default()
    };
    Ok((msg, priority))
}

/// A direct or broadcast frame, encoded once for both formats.
pub(super) fn shared(frame: server_frame::Frame, class: Class) -> Arc<SharedFrame> {
    Arc::new(SharedFrame::encode(&ServerFrame { frame: Some(frame) }, true, class))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_bodies() {
        let (m, priority) =
            from_json(br#"{"type":"gift","priority":"HIGH","weight":5,"text":"hi","sender":"u1"}"#).unwrap();
        assert_eq!((m.r#type.as_str(), m.weight, m.data.as_slice()), ("gift", 5, &b"hi"[..]));
        assert_eq!(priority, Some(Priority::High));
        let (m, priority) = from_json(br#"{"data_b64":"AAE="}"#).unwrap();
        assert_eq!(m.data, vec![0, 1]);
        assert_eq!(priority, None, "no priority named: the type's default applies");
        assert!(from_json(br#"{"text":"a","data_b64":"AA=="}"#).is_err());
        assert!(from_json(br#"{"priority":"urgent"}"#).is_err());
        assert!(from_json(br#"{"colour":"red"}"#).is_err(), "unknown fields are refused");
        assert!(from_json(b"{").is_err());
    }
}
