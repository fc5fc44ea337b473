//! The host's side of the business hooks (see `crate::hooks`): a handshake, a join or a send
//! that must hear from the backend leaves as a call on its hook's queue and waits here — the
//! handshake in `connecting` (its 101 not yet sent, early bytes held in the partial-input
//! budget), the join in `joining`, the send inside its call — until the verdict comes back as
//! mail. Disconnects and leaves go out as events. The shard never waits.

use super::Host;
use super::conn::State;
use super::upgrade::{Identity, Refusal};
use crate::auth::{Claims, GRANT_BYTES_MAX, GRANTS_MAX, SUBJECT_BYTES_MAX};
use crate::hooks::call::{Call, ConnectCall, Hook, JoinCall, Refusal as HookRefusal, SendCall, Verdict};
use crate::hub::mail::OwnerMail;
use crate::ids::{ConnKey, Now};
use crate::metrics::Series;
use crate::proto::{Ack, ConnectVerdict, HookEvent, ServerFrame, hook_event, server_frame};
use crate::room::RoomName;
use crate::wire::handshake::Upgrade;

/// A handshake waiting for the connect hook.
pub(super) struct Connecting {
    pub upgrade: Upgrade,
    pub id: Identity,
    pub room: Option<(RoomName, u64)>,
}

impl Host {
    /// Whether `hook` is configured.
    pub(super) fn hooked(&self, hook: Hook) -> bool {
        self.cfg.hooks.as_ref().is_some_and(|g| g.has(hook))
    }

    /// Queues a call; a verdict decided at once (its queue is full) is acted on now.
    fn call_hook(&mut self, call: Call, now: Now) {
        let Some(gate) = self.cfg.hooks.clone() else { return };
        if let Some(verdict) = gate.submit(call) {
            self.hook_verdict(verdict, now);
        }
    }

    /// A handshake that passed every check of the gateway's own asks the connect hook; the
    /// token goes along when the gateway did not verify it.
    pub(super) fn ask_connect(
        &mut self,
        key: ConnKey,
        pending: Connecting,
        token: Option<String>,
        origin: Option<String>,
        now: Now,
    ) {
        let call = ConnectCall {
            at: self.at(key),
            user: pending.id.as_ref().map(|c| c.sub.clone()).unwrap_or_default(),
            token: token.unwrap_or_default(),
            ip: self.peers.get(&key).and_then(|p| p.addr).map(|a| a.to_string()).unwrap_or_default(),
            room: pending.room.as_ref().map(|(r, _)| r.as_str().to_owned()).unwrap_or_default(),
            origin: origin.unwrap_or_default(),
        };
        self.connecting.insert(key, pending);
        self.call_hook(Call::Connect(Box::new(call)), now);
    }

    /// A handshake the gateway (and the connect hook) let in. With a join hook, the URL's room
    /// asks it before the 101 too, so a welcome that names a room always means the client is
    /// in it.
    pub(super) fn admitted(&mut self, key: ConnKey, pending: Connecting, now: Now) {
        let Some((room, after)) = pending.room.clone().filter(|_| self.hooked(Hook::Join)) else {
            return self.open_now(key, pending, now);
        };
        let user = pending.id.as_ref().map(|c| c.sub.clone()).unwrap_or_default();
        let call = JoinCall { at: self.at(key), user, room, after };
        self.connecting.insert(key, pending);
        self.call_hook(Call::Join(Box::new(call)), now);
    }

    /// The join hook's word on the room in a handshake's URL: the 101, or the refusal.
    fn url_room_verdict(
        &mut self,
        key: ConnKey,
        room: &RoomName,
        after: u64,
        outcome: Result<(), HookRefusal>,
        now: Now,
    ) {
        let Some(pending) = self.connecting.remove(&key) else { return };
        if pending.room.as_ref().map(|(r, a)| (r, *a)) != Some((room, after)) {
            // Not this handshake's question (never expected): it keeps waiting.
            self.connecting.insert(key, pending);
            return;
        }
        match outcome {
            Ok(()) => self.open_now(key, pending, now),
            Err(r) => {
                let status = u16::try_from(r.code).unwrap_or(403);
                self.refuse(key, Refusal { status, message: r.reason, series: Series::HsHook }, now);
            }
        }
    }

    /// Answers 101 and reads what the client sent behind its request meanwhile.
    fn open_now(&mut self, key: ConnKey, pending: Connecting, now: Now) {
        self.open(key, &pending.upgrade, pending.id, pending.room, false, now);
        if let Some(mut early) = self.intake.take_head(key) {
            self.read_after_head(key, &mut early, now);
        }
    }

    /// Bytes a client sent before its handshake was answered: held (within the partial-input
    /// budget) and read once the connection opens.
    pub(super) fn early_input(&mut self, key: ConnKey, data: &[u8], now: Now) {
        let mut held = self.intake.take_head(key).unwrap_or_default();
        held.extend_from_slice(data);
        let budget = self.intake.stash_head(key, held);
        self.within_budget(key, budget, now);
    }

    /// A join past the gateway's own checks asks the join hook; the connection stays where it
    /// is until the verdict (a later join replaces this one).
    pub(super) fn ask_join(&mut self, key: ConnKey, room: &RoomName, after: u64, now: Now) {
        let user = self.user_of(key).map(|u| u.as_str().to_owned()).unwrap_or_default();
        self.joining.insert(key, (room.clone(), after));
        let call = JoinCall { at: self.at(key), user, room: room.clone(), after };
        self.call_hook(Call::Join(Box::new(call)), now);
    }

    /// A send past the gateway's own checks asks the send hook before it goes to the owner.
    pub(super) fn ask_send(&mut self, call: SendCall, now: Now) {
        self.call_hook(Call::Send(Box::new(call)), now);
    }

    /// Tells the events hook a connection left a room or disconnected (the gate stamps the
    /// time; a full queue drops the event, counted).
    pub(super) fn hook_event(&mut self, key: ConnKey, room: Option<&RoomName>) {
        let Some(gate) = self.cfg.hooks.clone() else { return };
        let kind = match room {
            Some(_) => hook_event::Kind::Leave,
            None => hook_event::Kind::Disconnect,
        };
        let event = HookEvent {
            kind: kind as i32,
            conn_id: crate::hooks::call::conn_id(self.at(key)),
            user: self.user_of(key).map(|u| u.as_str().to_owned()).unwrap_or_default(),
            room: room.map(|r| r.as_str().to_owned()).unwrap_or_default(),
            at_ms: 0,
        };
        gate.submit(Call::Event(Box::new(event)));
    }

    /// A hook's verdict on a call this shard made.
    pub(super) fn hook_verdict(&mut self, verdict: Verdict, now: Now) {
        match verdict {
            Verdict::Connect { at, outcome } => {
                let Some(key) = self.live(at.conn) else { return };
                if self.conns.get(key).state != State::Handshake {
                    return;
                }
                let Some(pending) = self.connecting.remove(&key) else { return };
                let grant = match outcome {
                    Ok(grant) => grant,
                    Err(r) => {
                        let status = u16::try_from(r.code).unwrap_or(403);
                        return self.refuse(key, Refusal { status, message: r.reason, series: Series::HsHook }, now);
                    }
                };
                let id = match signed_in(pending.id, grant) {
                    Ok(id) => id,
                    Err(why) => {
                        let r = Refusal { status: 502, message: why.into(), series: Series::HsHook };
                        return self.refuse(key, r, now);
                    }
                };
                if id.is_none() && !self.cfg.allow_anonymous {
                    let r = Refusal { status: 401, message: "a token is required".into(), series: Series::HsAnonymous };
                    return self.refuse(key, r, now);
                }
                self.admitted(key, Connecting { upgrade: pending.upgrade, id, room: pending.room }, now);
            }
            // The URL's room, asked before the 101.
            Verdict::Join { at, room, after, outcome } => {
                let Some(key) = self.live(at.conn) else { return };
                match self.conns.get(key).state {
                    State::Handshake => self.url_room_verdict(key, &room, after, outcome, now),
                    State::Open if self.joining.get(&key).map(|(r, _)| r) == Some(&room) => {
                        self.joining.remove(&key);
                        match outcome {
                            // A ban may have arrived while the backend was asked.
                            Ok(()) if !self.banned(key, &room, now) => self.enter(key, &room, after),
                            Ok(()) => {}
                            Err(r) => {
                                self.counters.inc(Series::JoinHookRefused);
                                self.send_error(key, r.code, &r.reason, now);
                            }
                        }
                    }
                    // Superseded by a later join, or the connection is closing.
                    _ => {}
                }
            }
            Verdict::Send { call, outcome } => match outcome {
                // Sent while the client was in the room: it goes even if the client has left
                // since (the backend may have charged for it).
                Ok(()) => {
                    let c = *call;
                    let send = OwnerMail::Send {
                        room: c.room.clone(),
                        msg: Box::new(c.msg),
                        user: c.user,
                        weight: c.weight,
                        priority: c.priority,
                        from: c.from,
                        ack: c.ack,
                    };
                    self.ask_owner(&c.room, send);
                }
                Err(r) => {
                    self.counters.inc(Series::SendHookRefused);
                    let Some(key) = self.live(call.from.conn) else { return };
                    if self.conns.get(key).state != State::Open {
                        return;
                    }
                    match call.ack {
                        Some(id) => {
                            let ack = Ack {
                                id: id.into(),
                                room: call.room.as_str().to_owned(),
                                seq: 0,
                                code: r.code,
                                reason: r.reason,
                            };
                            self.send_frame(key, &ServerFrame { frame: Some(server_frame::Frame::Ack(ack)) }, now);
                        }
                        None => self.send_error(key, r.code, &r.reason, now),
                    }
                }
            },
        }
    }
}

/// Who a connection is once the connect hook has answered: the backend may name the user
/// (replacing the token's), or add to the verified token's claims; without an answer (failed
/// open) the token alone decides. Bounded as a token's claims are.
fn signed_in(id: Identity, grant: Option<ConnectVerdict>) -> Result<Identity, &'static str> {
    let Some(g) = grant else { return Ok(id) };
    if g.user.len() > SUBJECT_BYTES_MAX {
        return Err("the business backend named a user id over 128 bytes");
    }
    let mut claims = match (g.user.is_empty(), id) {
        (true, None) => return Ok(None),
        (true, Some(c)) => c,
        (false, Some(c)) if c.sub == g.user => c,
        (false, _) => Claims {
            sub: g.user.clone(),
            exp: None,
            nbf: None,
            send: true,
            admin: false,
            attrs: false,
            level: 0,
            types: Vec::new(),
            rooms: Vec::new(),
        },
    };
    let bounded = |list: Vec<String>| -> Vec<String> {
        list.into_iter().filter(|s| !s.is_empty() && s.len() <= GRANT_BYTES_MAX).take(GRANTS_MAX).collect()
    };
    claims.level = g.level.unwrap_or(claims.level);
    claims.send = g.send.unwrap_or(claims.send);
    claims.admin = g.admin.unwrap_or(claims.admin);
    claims.attrs = g.attrs.unwrap_or(claims.attrs);
    if !g.types.is_empty() {
        claims.types = bounded(g.types);
    }
    if !g.rooms.is_empty() {
        claims.rooms = bounded(g.rooms);
    }
    Ok(Some(claims))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(sub: &str) -> Claims {
        Claims {
            sub: sub.into(),
            exp: Some(99),
            nbf: None,
            send: true,
            admin: false,
            attrs: false,
            level: 1,
            types: vec![],
            rooms: vec![],
        }
    }

    #[test]
    fn the_backend_names_enriches_or_leaves_the_identity() {
        assert_eq!(signed_in(Some(claims("a")), None), Ok(Some(claims("a"))), "failed open: the token decides");
        assert_eq!(signed_in(None, Some(ConnectVerdict::default())), Ok(None), "anonymous stays anonymous");
        let g = ConnectVerdict { level: Some(12), types: vec!["gift".into()], ..ConnectVerdict::default() };
        let c = signed_in(Some(claims("a")), Some(g)).unwrap().unwrap();
        assert_eq!(
            (c.sub.as_str(), c.level, c.exp, c.types.as_slice()),
            ("a", 12, Some(99), &["gift".to_string()][..])
        );
        let g = ConnectVerdict { user: "b".into(), send: Some(false), ..ConnectVerdict::default() };
        let c = signed_in(Some(claims("a")), Some(g)).unwrap().unwrap();
        assert_eq!(
            (c.sub.as_str(), c.send, c.exp, c.level),
            ("b", false, None, 0),
            "another user: nothing of the token's"
        );
        let g = ConnectVerdict { user: "x".repeat(129), ..ConnectVerdict::default() };
        assert!(signed_in(None, Some(g)).is_err());
        let g = ConnectVerdict { user: "c".into(), rooms: vec!["r".into(); 40], ..ConnectVerdict::default() };
        assert_eq!(signed_in(None, Some(g)).unwrap().unwrap().rooms.len(), GRANTS_MAX);
    }
}
