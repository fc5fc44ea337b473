//! Room resources of the API: info, the busiest rooms, moderation (kick, mute, ban, whitelist
//! and their lists) and attributes. Each request goes to the room's owner as mail and waits
//! for its answer.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Value, json};

use super::http::{Request, Response};
use super::publish::USER_BYTES_MAX;
use super::routes::{Answer, Routes, percent_decode, reply_channel, wait};
use crate::hub::mail::{Origin, OwnerMail};
use crate::ids::{ShardId, UserId};
use crate::room::RoomName;
use crate::room::attrs::AttrError;
use crate::room::moderation::{Entry, ModerationError};
use crate::room::owner::{ModAction, ModerationLists, RoomInfo};

/// Most rooms one `GET /v1/rooms?top=N` returns.
const TOP_MAX: usize = 1000;

/// Body of kick, mute, ban and whitelist requests.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModerationBody {
    user: String,
    #[serde(default)]
    duration_ms: u64,
    #[serde(default)]
    reason: String,
}

/// Body of an attribute PUT.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AttrBody {
    value: Option<String>,
    value_b64: Option<String>,
}

impl Routes {
    pub(super) fn room_info(&self, raw: &str) -> Answer {
        let room = self.room_name(raw)?;
        let (reply, rx) = reply_channel::<RoomInfo>();
        self.post(self.owner_of(&room), OwnerMail::RoomInfo { room: room.clone(), reply }.into())?;
        let info = wait(&rx)?;
        let mut body =
            json!({"room": room.as_str(), "online": info.online, "last_seq": info.last_seq, "pending": info.pending});
        if let Some(c) = &self.cluster {
            // The node whose lease runs the room, as this node's view of the live set says.
            body["node"] = c.placement().owner_node(room.as_str()).unwrap_or_else(|| c.me().to_owned()).into();
        }
        Ok(Response::json(200, &body))
    }

    /// `GET /v1/rooms?top=N`: the rooms with the most members, from every owner.
    pub(super) fn top_rooms(&self, query: &str) -> Answer {
        let n = match crate::wire::handshake::query_param(query, "top") {
            None => 20,
            Some(v) => v.parse::<usize>().map_err(|_| Response::error(400, "top must be a positive integer"))?,
        }
        .clamp(1, TOP_MAX);
        let mut waits = Vec::new();
        // In a cluster the link asks every other node's owners too.
        let everyone = (0..self.mesh.shards()).map(|i| ShardId(i as u16)).chain(self.mesh.link());
        for to in everyone {
            let (reply, rx) = reply_channel();
            self.post(to, OwnerMail::TopRooms { n, reply }.into())?;
            waits.push(rx);
        }
        let mut all = Vec::new();
        for rx in &waits {
            all.extend(wait(rx)?);
        }
        all.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        // A room moving between nodes may be reported by both for a moment: counted once.
        let mut seen = std::collections::HashSet::new();
        all.retain(|(room, _)| seen.insert(room.clone()));
        all.truncate(n);
        let rooms: Vec<Value> = all.iter().map(|(r, online)| json!({"room": r.as_str(), "online": online})).collect();
        Ok(Response::json(200, &json!({"rooms": rooms})))
    }

    /// Kick, mute, ban, whitelist (POST with a body) and their removal (DELETE .../{user}).
    pub(super) fn moderate(&self, raw_room: &str, list: &str, raw_user: Option<&str>, req: &Request) -> Answer {
        let room = self.room_name(raw_room)?;
        let (user, duration_ms, reason) = match raw_user {
            Some(u) => (
                percent_decode(u).ok_or_else(|| Response::error(400, "bad percent-encoding in user"))?,
                0,
                String::new(),
            ),
            None => {
                let b: ModerationBody = serde_json::from_slice(&req.body)
                    .map_err(|e| Response::error(400, &format!("bad JSON body: {e}")))?;
                (b.user, b.duration_ms, b.reason)
            }
        };
        if user.is_empty() || user.len() > USER_BYTES_MAX {
            return Err(Response::error(400, "user id must be 1..=128 bytes"));
        }
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        let until_ms = (duration_ms > 0).then(|| now.saturating_add(duration_ms.min(i64::MAX as u64) as i64));
        let action = match (list, raw_user.is_some()) {
            ("kick", false) => ModAction::Kick,
            ("mutes", false) => ModAction::Mute { until_ms },
            ("mutes", true) => ModAction::Unmute,
            ("bans", false) => ModAction::Ban { until_ms },
            ("bans", true) => ModAction::Unban,
            ("whitelist", false) => ModAction::Whitelist,
            ("whitelist", true) => ModAction::Unwhitelist,
            _ => return Err(Response::error(404, "no such moderation resource")),
        };
        let (reply, rx) = reply_channel::<Result<(), ModerationError>>();
        let mail = OwnerMail::Moderate {
            room: room.clone(),
            user: UserId::new(&user),
            action,
            reason: Arc::from(reason),
            origin: Origin::Api(reply),
        };
        self.post(self.owner_of(&room), mail.into())?;
        wait(&rx)?.map_err(|e| Response::error(e.status(), e.message()))?;
        Ok(Response::json(200, &json!({"room": room.as_str(), "user": user, "action": list})))
    }

    /// `GET /v1/rooms/{room}/moderation`: the room's mutes, bans and whitelist.
    pub(super) fn moderation_lists(&self, raw: &str) -> Answer {
        let room = self.room_name(raw)?;
        let (reply, rx) = reply_channel::<ModerationLists>();
        self.post(self.owner_of(&room), OwnerMail::ModerationList { room: room.clone(), reply }.into())?;
        let lists = wait(&rx)?;
        let entries =
            |l: &[Entry]| -> Vec<Value> { l.iter().map(|e| json!({"user": e.user, "until_ms": e.until_ms})).collect() };
        Ok(Response::json(
            200,
            &json!({"room": room.as_str(), "mutes": entries(&lists.mutes), "bans": entries(&lists.bans), "whitelist": entries(&lists.whitelist)}),
        ))
    }

    /// `GET /v1/rooms/{room}/attributes`: version and every attribute (`value` when UTF-8,
    /// else `value_b64`).
    pub(super) fn attributes(&self, raw: &str) -> Answer {
        let room = self.room_name(raw)?;
        let (reply, rx) = reply_channel();
        self.post(self.owner_of(&room), OwnerMail::Attrs { room: room.clone(), reply }.into())?;
        let (version, entries) = wait(&rx)?;
        let mut attrs = serde_json::Map::new();
        for (k, v) in entries {
            let value = match String::from_utf8(v) {
                Ok(text) => json!({"value": text}),
                Err(e) => json!({"value_b64": base64::engine::general_purpose::STANDARD.encode(e.into_bytes())}),
            };
            attrs.insert(k, value);
        }
        Ok(Response::json(200, &json!({"room": room.as_str(), "version": version, "attributes": attrs})))
    }

    /// `PUT` (body `{"value": "..."}` or `{"value_b64": "..."}`) or `DELETE` one attribute.
    pub(super) fn set_attribute(&self, raw_room: &str, raw_key: &str, req: &Request, delete: bool) -> Answer {
        let room: RoomName = self.room_name(raw_room)?;
        let key = percent_decode(raw_key).ok_or_else(|| Response::error(400, "bad percent-encoding in key"))?;
        let value = if delete {
            None
        } else {
            let b: AttrBody =
                serde_json::from_slice(&req.body).map_err(|e| Response::error(400, &format!("bad JSON body: {e}")))?;
            Some(match (b.value, b.value_b64) {
                (Some(v), None) => v.into_bytes(),
                (None, Some(b)) => base64::engine::general_purpose::STANDARD
                    .decode(b)
                    .map_err(|e| Response::error(400, &format!("bad value_b64: {e}")))?,
                _ => return Err(Response::error(400, "give value or value_b64")),
            })
        };
        let (reply, rx) = reply_channel::<Result<u64, AttrError>>();
        let mail = OwnerMail::SetAttr { room: room.clone(), key, value, origin: Origin::Api(reply) };
        self.post(self.owner_of(&room), mail.into())?;
        let version = wait(&rx)?.map_err(|e| Response::error(e.status(), e.message()))?;
        Ok(Response::json(200, &json!({"room": room.as_str(), "version": version})))
    }
}
