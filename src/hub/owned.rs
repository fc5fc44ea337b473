//! Mail this shard handles as the owner of rooms: publishes, presence and joins, room info,
//! polls, moderation and attributes. Answers go back as mail (to the asking shard or API
//! thread); what members everywhere must see goes out at the next block tick.

use std::sync::Arc;

use super::mail::{Mail, Origin};
use super::{Hub, Now};
use crate::ids::ShardId;
use crate::metrics::Series;
use crate::proto::Message;
use crate::room::RoomName;
use crate::room::moderation::List;
use crate::room::owner::{ModAction, PublishError, Published, Sender};
use crate::wire::CloseCode;

impl Hub {
    /// Handles one item of mail.
    pub fn on_mail(&mut self, mail: Mail, now: Now) {
        match mail {
            Mail::Publish { room, msg, sender, origin } => self.owner_publish(room, *msg, sender, origin, now),
            Mail::Presence { room, from, members, json, left, left_users } => {
                if !self.owner.presence(&room, from, (members, json), &left_users, left, now) {
                    self.counters.inc(Series::DropNoRoom);
                }
            }
            Mail::Joined { room, from, conn, user } => {
                let frames = self.owner.joined(&room, user.as_ref(), now);
                if !frames.is_empty() {
                    self.post(from, Mail::ToConn { room, conn, frames }, now);
                }
            }
            Mail::RoomInfo { room, reply } => reply.send(self.owner.info(&room)),
            Mail::TopRooms { n, reply } => reply.send(self.owner.top(n)),
            Mail::Poll { room, after, limit, from, conn } => {
                let (status, body) = match self.owner.poll(&room, after, limit) {
                    Ok(body) => (200, body),
                    Err(e) => {
                        self.counters.inc(Series::RefusedPoll);
                        (400, serde_json::json!({"error": e.message()}).to_string().into_bytes())
                    }
                };
                self.post(from, Mail::PollResult { conn, status, body }, now);
            }
            Mail::Moderate { room, user, action, reason, origin } => {
                self.owner_moderate(room, user, action, reason, origin, now)
            }
            Mail::ModerationList { room, reply } => reply.send(self.owner.moderation(&room, now.unix)),
            Mail::SetAttr { room, key, value, origin } => {
                let result = self.owner.set_attr(&room, &key, value.as_deref(), now);
                if result.is_err() {
                    self.counters.inc(Series::RefusedAttrs);
                }
                self.answer(origin, result, |e| (400, e.message()), now);
            }
            Mail::Attrs { room, reply } => reply.send(self.owner.attrs(&room)),
            Mail::AttrSync { room, after, from, conn } => {
                if let Some(frame) = self.owner.attr_sync(&room, after) {
                    self.post(from, Mail::ToConn { room, conn, frames: vec![Arc::new(frame)] }, now);
                }
            }
            other => self.on_member_mail(other, now),
        }
    }

    fn owner_publish(
        &mut self,
        room: RoomName,
        msg: Message,
        sender: Sender,
        origin: Origin<Result<Published, PublishError>>,
        now: Now,
    ) {
        let result = self.owner.publish(&room, msg, sender, now);
        match &result {
            Ok(p) if p.coalesced => self.counters.inc(Series::MessagesCoalesced),
            Ok(_) => self.counters.inc(Series::MessagesIn),
            Err(PublishError::Backlog) => self.counters.inc(Series::DropBacklog),
            Err(PublishError::RoomsFull) => self.counters.inc(Series::DropNoRoom),
            Err(PublishError::RateLimited) => self.counters.inc(Series::DropRate),
            Err(PublishError::Muted) => self.counters.inc(Series::DropMuted),
        }
        self.answer(origin, result, |e| e.code(), now);
    }

    /// Applies a moderation action at the owner, then replicates bans and whitelist entries to
    /// every shard and closes the user's connections in the room everywhere on kick and ban.
    fn owner_moderate(
        &mut self,
        room: RoomName,
        user: Arc<str>,
        action: ModAction,
        reason: Arc<str>,
        origin: Origin<Result<(), crate::room::moderation::ModerationError>>,
        now: Now,
    ) {
        let result = self.owner.moderate(&room, &user, action, now);
        if result.is_ok() {
            let replicate = match action {
                ModAction::Ban { until_ms } => Some((List::Ban, until_ms, true)),
                ModAction::Unban => Some((List::Ban, None, false)),
                ModAction::Whitelist => Some((List::Whitelist, None, true)),
                ModAction::Unwhitelist => Some((List::Whitelist, None, false)),
                _ => None,
            };
            if let Some((list, until_ms, add)) = replicate {
                let (r, u) = (room.clone(), Arc::clone(&user));
                self.post_all(|| Mail::Replicate { room: r.clone(), user: Arc::clone(&u), list, until_ms, add }, now);
            }
            if matches!(action, ModAction::Kick | ModAction::Ban { .. }) {
                self.post_all(
                    || Mail::Kick { room: room.clone(), user: Arc::clone(&user), reason: Arc::clone(&reason) },
                    now,
                );
            }
            self.counters.inc(Series::Moderations);
        } else {
            self.counters.inc(Series::RefusedModeration);
        }
        self.answer(origin, result, |e| (400, e.message()), now);
    }

    /// Sends an owner's answer: to the waiting API thread, or as an error frame to a client.
    fn answer<T, E: Copy>(
        &mut self,
        origin: Origin<Result<T, E>>,
        result: Result<T, E>,
        code: impl Fn(E) -> (u16, &'static str),
        now: Now,
    ) {
        match origin {
            Origin::Api(reply) => reply.send(result),
            Origin::Conn { shard, conn } => {
                if let Err(e) = result {
                    let (c, reason) = code(e);
                    self.post(shard, Mail::Refused { conn, code: u32::from(c), reason }, now);
                }
            }
        }
    }

    /// Kicks: the user's connections in the room get a `kicked` frame and a 1008 close.
    pub(super) fn kick(&mut self, room: &RoomName, user: &str, reason: &str, now: Now) {
        let Some(rk) = self.rooms.find(room) else { return };
        let targets: Vec<u32> = self
            .users
            .conns(user)
            .iter()
            .copied()
            .filter(|&c| self.conns.get(c as usize).is_some_and(|x| x.room == rk))
            .collect();
        for key in targets {
            let kicked = crate::proto::Kicked { reason: reason.to_owned(), room: room.as_str().to_owned() };
            let frame = crate::proto::ServerFrame { frame: Some(crate::proto::server_frame::Frame::Kicked(kicked)) };
            if let Some(bytes) = self.encode_for(key, &frame) {
                self.enqueue_owned(key, bytes, now);
            }
            self.close(key, CloseCode::POLICY, "kicked", Series::ClosedKicked, now);
        }
    }

    /// This shard's share of a cross-shard request sent from here to `owner` (local or not).
    pub(super) fn ask_owner(&mut self, room: &RoomName, mail: Mail, now: Now) {
        let owner: ShardId = room.owner(self.cfg.shards);
        self.post(owner, mail, now);
    }
}
