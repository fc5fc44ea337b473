//! What a shard asks a hook (`Call`), what comes back to it (`Verdict`), and the sans-IO steps
//! between: encoding a batch of calls as one request body (JSON or protobuf), decoding the
//! backend's answer, and turning each call and its answer — or the hook's failure — into a
//! verdict (a send's rewrite applied and bounded here, off the shard).
#![forbid(unsafe_code)]

use prost::Message as _;

use crate::config::HookFormat;
use crate::hub::mail::ConnAt;
use crate::ids::UserId;
use crate::proto::{self, HookRequest, HookResponse, Message};
use crate::room::{Priority, RoomName};

/// The four hooks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Connect = 0,
    Join = 1,
    Send = 2,
    Events = 3,
}

impl Hook {
    pub const ALL: [Hook; 4] = [Hook::Connect, Hook::Join, Hook::Send, Hook::Events];

    pub fn name(self) -> &'static str {
        match self {
            Hook::Connect => "connect",
            Hook::Join => "join",
            Hook::Send => "send",
            Hook::Events => "events",
        }
    }
}

/// A handshake waiting for the connect hook.
#[derive(Debug)]
pub struct ConnectCall {
    pub at: ConnAt,
    pub user: String,
    pub token: String,
    pub ip: String,
    pub room: String,
    pub origin: String,
}

/// A join waiting for the join hook.
#[derive(Debug)]
pub struct JoinCall {
    pub at: ConnAt,
    pub user: String,
    pub room: RoomName,
    /// The seq a resuming client showed.
    pub after: u64,
}

/// A client's send waiting for the send hook: everything the room's owner needs afterwards.
#[derive(Debug)]
pub struct SendCall {
    pub room: RoomName,
    pub msg: Message,
    pub user: UserId,
    pub weight: i32,
    pub priority: Priority,
    pub from: ConnAt,
    pub ack: Option<Box<str>>,
}

/// A call to a hook.
#[derive(Debug)]
pub enum Call {
    Connect(Box<ConnectCall>),
    Join(Box<JoinCall>),
    Send(Box<SendCall>),
    Event(Box<proto::HookEvent>),
}

impl Call {
    pub fn hook(&self) -> Hook {
        match self {
            Call::Connect(_) => Hook::Connect,
            Call::Join(_) => Hook::Join,
            Call::Send(_) => Hook::Send,
            Call::Event(_) => Hook::Events,
        }
    }
}

/// A refusal: a code (HTTP-like) and a reason for the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub code: u32,
    pub reason: String,
}

/// The answer to a call, mailed to the shard that asked.
#[derive(Debug)]
pub enum Verdict {
    /// Open the connection (with what the backend added, when it answered) or refuse it.
    Connect {
        at: ConnAt,
        outcome: Result<Option<proto::ConnectVerdict>, Refusal>,
    },
    Join {
        at: ConnAt,
        room: RoomName,
        after: u64,
        outcome: Result<(), Refusal>,
    },
    /// The send as the backend left it (rewritten), or its refusal.
    Send {
        call: Box<SendCall>,
        outcome: Result<(), Refusal>,
    },
}

impl Verdict {
    /// The shard the verdict goes to.
    pub fn shard(&self) -> crate::ids::ShardId {
        match self {
            Verdict::Connect { at, .. } | Verdict::Join { at, .. } => at.shard,
            Verdict::Send { call, .. } => call.from.shard,
        }
    }
}

/// How a call ended, for the outcome metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Allowed = 0,
    Refused = 1,
    Rewritten = 2,
    FailedOpen = 3,
    FailedClosed = 4,
    /// An event not sent (its queue was full).
    Dropped = 5,
}

impl Outcome {
    pub const ALL: [Outcome; 6] = [
        Outcome::Allowed,
        Outcome::Refused,
        Outcome::Rewritten,
        Outcome::FailedOpen,
        Outcome::FailedClosed,
        Outcome::Dropped,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Refused => "refused",
            Outcome::Rewritten => "rewritten",
            Outcome::FailedOpen => "failed_open",
            Outcome::FailedClosed => "failed_closed",
            Outcome::Dropped => "dropped",
        }
    }
}

/// The welcome's `conn_id` of a connection.
pub fn conn_id(at: ConnAt) -> u64 {
    (u64::from(at.shard.0) << 32) | (u64::from(at.conn.key.0) + 1)
}

/// The request body for a batch of calls to one hook, and its content type.
pub fn encode(calls: &[Call], format: HookFormat) -> (&'static str, Vec<u8>) {
    let mut req = HookRequest::default();
    for call in calls {
        match call {
            Call::Connect(c) => req.connect.push(proto::ConnectCall {
                conn_id: conn_id(c.at),
                user: c.user.clone(),
                token: c.token.clone(),
                ip: c.ip.clone(),
                room: c.room.clone(),
                origin: c.origin.clone(),
            }),
            Call::Join(j) => req.join.push(proto::JoinCall {
                conn_id: conn_id(j.at),
                user: j.user.clone(),
                room: j.room.to_string(),
            }),
            Call::Send(s) => req.send.push(proto::SendCall {
                conn_id: conn_id(s.from),
                user: s.user.as_str().to_owned(),
                room: s.room.to_string(),
                r#type: s.msg.r#type.clone(),
                text: std::str::from_utf8(&s.msg.data).map(str::to_owned).unwrap_or_default(),
                data: s.msg.data.clone(),
                id: s.ack.as_deref().unwrap_or_default().to_owned(),
                level: s.weight,
            }),
            Call::Event(e) => req.events.push((**e).clone()),
        }
    }
    match format {
        // The generated serde impls cannot fail on these types.
        HookFormat::Json => ("application/json", serde_json::to_vec(&req).unwrap_or_default()),
        HookFormat::Protobuf => ("application/x-protobuf", req.encode_to_vec()),
    }
}

/// The backend's answer.
pub fn decode(body: &[u8], format: HookFormat) -> Result<HookResponse, String> {
    match format {
        HookFormat::Json => serde_json::from_slice(body).map_err(|e| format!("response JSON: {e}")),
        HookFormat::Protobuf => HookResponse::decode(body).map_err(|e| format!("response protobuf: {e}")),
    }
}

/// What a send verdict may change, bounded as a client's own send is.
#[derive(Clone, Debug)]
pub struct SendRules {
    pub data_bytes_max: usize,
    /// Every type's default priority (a rewritten type without a priority takes its default).
    pub types: std::sync::Arc<std::collections::BTreeMap<String, crate::config::TypeDefaults>>,
}

/// Pairs each call with its answer. The answer must hold one verdict per call, in order; an
/// answer that does not is a malformed one (the caller fails the whole batch).
pub fn judge(
    calls: Vec<Call>,
    mut resp: HookResponse,
    rules: &SendRules,
    out: &mut Vec<(Verdict, Outcome)>,
) -> Result<(), (Vec<Call>, String)> {
    let (n, got) = match calls.first().map(Call::hook) {
        Some(Hook::Connect) => (calls.len(), resp.connect.len()),
        Some(Hook::Join) => (calls.len(), resp.join.len()),
        Some(Hook::Send) => (calls.len(), resp.send.len()),
        Some(Hook::Events) | None => return Ok(()),
    };
    if n != got {
        return Err((calls, format!("{got} verdicts for {n} calls")));
    }
    let (mut connects, mut joins, mut sends) = (resp.connect.drain(..), resp.join.drain(..), resp.send.drain(..));
    for call in calls {
        let verdict = match call {
            Call::Connect(c) => connects.next().map(|v| match v.code {
                0 => (Verdict::Connect { at: c.at, outcome: Ok(Some(v)) }, Outcome::Allowed),
                code => (Verdict::Connect { at: c.at, outcome: Err(refusal(code, v.reason)) }, Outcome::Refused),
            }),
            Call::Join(j) => joins.next().map(|v| {
                let (outcome, o) = match v.code {
                    0 => (Ok(()), Outcome::Allowed),
                    code => (Err(refusal(code, v.reason)), Outcome::Refused),
                };
                (Verdict::Join { at: j.at, room: j.room, after: j.after, outcome }, o)
            }),
            Call::Send(mut s) => sends.next().map(|v| {
                let (outcome, o) = rewrite(&mut s, v, rules);
                (Verdict::Send { call: s, outcome }, o)
            }),
            Call::Event(_) => None,
        };
        out.extend(verdict);
    }
    Ok(())
}

/// The verdict a call gets when its hook failed: as allowed (fail open) or refused with 503.
pub fn failed(call: Call, fail_open: bool) -> Option<(Verdict, Outcome)> {
    let (outcome, o) = match fail_open {
        true => (Ok(()), Outcome::FailedOpen),
        false => (Err(refusal(503, "the business backend is unavailable".into())), Outcome::FailedClosed),
    };
    Some(match call {
        Call::Connect(c) => (Verdict::Connect { at: c.at, outcome: outcome.map(|()| None) }, o),
        Call::Join(j) => (Verdict::Join { at: j.at, room: j.room, after: j.after, outcome }, o),
        Call::Send(s) => (Verdict::Send { call: s, outcome }, o),
        Call::Event(_) => return None,
    })
}

fn refusal(code: u32, reason: String) -> Refusal {
    // A refusal's code is what the client sees: keep it in the HTTP-like range.
    let code = if (400..600).contains(&code) { code } else { 403 };
    let reason = if reason.is_empty() { "refused by the business backend".into() } else { reason };
    Refusal { code, reason: truncate(reason, 256) }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// Applies a send verdict to its call: a refusal, or the fields it sets (bounded as a client's
/// own send: data within `data_bytes_max`, a type of at most 32 bytes).
fn rewrite(s: &mut SendCall, v: proto::SendVerdict, rules: &SendRules) -> (Result<(), Refusal>, Outcome) {
    if v.code != 0 {
        return (Err(refusal(v.code, v.reason)), Outcome::Refused);
    }
    let changed = v.text.is_some()
        || v.data.is_some()
        || v.r#type.is_some()
        || v.priority.is_some()
        || v.weight.is_some()
        || v.coalesce_key.is_some();
    if !changed {
        return (Ok(()), Outcome::Allowed);
    }
    let bad = |why: &str| {
        (Err(Refusal { code: 502, reason: format!("the business backend's rewrite {why}") }), Outcome::Refused)
    };
    if let Some(data) = v.data {
        s.msg.data = data;
    }
    if let Some(text) = v.text {
        s.msg.data = text.into_bytes();
    }
    if s.msg.data.len() > rules.data_bytes_max {
        return bad("is over rooms.data_bytes_max");
    }
    if let Some(kind) = v.r#type {
        if kind.is_empty() || kind.len() > 32 {
            return bad("names a type that is empty or over 32 bytes");
        }
        s.priority = rules.types.get(&kind).map_or(Priority::Low, |d| d.priority);
        s.msg.r#type = kind;
    }
    if let Some(p) = v.priority {
        match Priority::from_wire(p) {
            Some(p) => s.priority = p,
            None => return bad("names an unknown priority"),
        }
    }
    if let Some(w) = v.weight {
        s.weight = w;
    }
    if let Some(key) = v.coalesce_key {
        if key.len() > 64 {
            return bad("names a coalesce key over 64 bytes");
        }
        s.msg.coalesce_key = key;
    }
    (Ok(()), Outcome::Rewritten)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{ConnId, ConnKey, ShardId};

    fn at(shard: u16, key: u32) -> ConnAt {
        ConnAt { shard: ShardId(shard), conn: ConnId { key: ConnKey(key), generation: 1 } }
    }

    fn send_call(text: &str) -> Call {
        let msg = Message { r#type: "chat".into(), data: text.as_bytes().to_vec(), ..Message::default() };
        Call::Send(Box::new(SendCall {
            room: RoomName::parse("r1", 64).unwrap(),
            msg,
            user: UserId::new("u1"),
            weight: 3,
            priority: Priority::Low,
            from: at(1, 4),
            ack: Some("a1".into()),
        }))
    }

    fn rules() -> SendRules {
        SendRules { data_bytes_max: 16, types: std::sync::Arc::new(crate::config::Config::default().types) }
    }

    #[test]
    fn a_batch_encodes_as_one_request_in_either_format() {
        let calls = vec![send_call("hello"), send_call("bad word")];
        let (ct, body) = encode(&calls, HookFormat::Json);
        assert_eq!(ct, "application/json");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["send"][0]["text"], "hello");
        assert_eq!(v["send"][1]["room"], "r1");
        assert_eq!(v["send"][0]["connId"], "4294967301", "shard 1 << 32 | key 4 + 1, a string in proto3 JSON");
        assert_eq!(v["send"][0]["id"], "a1");
        let (ct, body) = encode(&calls, HookFormat::Protobuf);
        assert_eq!(ct, "application/x-protobuf");
        let req = HookRequest::decode(body.as_slice()).unwrap();
        assert_eq!((req.send.len(), req.send[1].data.as_slice()), (2, &b"bad word"[..]));
    }

    #[test]
    fn verdicts_allow_refuse_and_rewrite_in_order() {
        let calls = vec![send_call("hello"), send_call("bad word"), send_call("gift please")];
        let resp: HookResponse =
            serde_json::from_str(r#"{"send":[{}, {"text":"*** word"}, {"code":402,"reason":"not enough coins"}]}"#)
                .unwrap();
        let mut out = Vec::new();
        judge(calls, resp, &rules(), &mut out).unwrap();
        let texts: Vec<_> = out
            .iter()
            .map(|(v, o)| match v {
                Verdict::Send { call, outcome } => {
                    (String::from_utf8(call.msg.data.clone()).unwrap(), outcome.clone(), *o)
                }
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(texts[0], ("hello".into(), Ok(()), Outcome::Allowed));
        assert_eq!(texts[1], ("*** word".into(), Ok(()), Outcome::Rewritten));
        assert_eq!(texts[2].1, Err(Refusal { code: 402, reason: "not enough coins".into() }));
    }

    #[test]
    fn a_rewrite_is_bounded_and_a_new_type_takes_its_priority() {
        let resp = |json: &str| serde_json::from_str::<HookResponse>(json).unwrap();
        let mut out = Vec::new();
        judge(
            vec![send_call("x")],
            resp(r#"{"send":[{"type":"gift","weight":9,"coalesceKey":"k"}]}"#),
            &rules(),
            &mut out,
        )
        .unwrap();
        let Some((Verdict::Send { call, outcome: Ok(()) }, Outcome::Rewritten)) = out.pop() else { panic!() };
        assert_eq!((call.priority, call.weight, call.msg.coalesce_key.as_str()), (Priority::High, 9, "k"));
        judge(vec![send_call("x")], resp(r#"{"send":[{"text":"this is far too long"}]}"#), &rules(), &mut out).unwrap();
        let Some((Verdict::Send { outcome: Err(r), .. }, Outcome::Refused)) = out.pop() else { panic!() };
        assert_eq!(r.code, 502);
        judge(vec![send_call("x")], resp(r#"{"send":[{"code":7}]}"#), &rules(), &mut out).unwrap();
        let Some((Verdict::Send { outcome: Err(r), .. }, _)) = out.pop() else { panic!() };
        assert_eq!(r.code, 403, "codes outside 400..600 become 403");
    }

    #[test]
    fn a_short_answer_fails_the_batch_and_failure_follows_the_policy() {
        let resp: HookResponse = serde_json::from_str(r#"{"send":[{}]}"#).unwrap();
        let mut out = Vec::new();
        let (calls, why) = judge(vec![send_call("a"), send_call("b")], resp, &rules(), &mut out).unwrap_err();
        assert!(why.contains("1 verdicts for 2 calls"), "{why}");
        let mut calls = calls.into_iter();
        let (v, o) = failed(calls.next().unwrap(), false).unwrap();
        assert!(matches!(v, Verdict::Send { outcome: Err(Refusal { code: 503, .. }), .. }));
        assert_eq!(o, Outcome::FailedClosed);
        let (v, o) = failed(calls.next().unwrap(), true).unwrap();
        assert!(matches!(v, Verdict::Send { outcome: Ok(()), .. }));
        assert_eq!(o, Outcome::FailedOpen);
    }

    #[test]
    fn connect_and_join_verdicts() {
        let c = Call::Connect(Box::new(ConnectCall {
            at: at(0, 0),
            user: String::new(),
            token: "t".into(),
            ip: "127.0.0.1".into(),
            room: "r".into(),
            origin: String::new(),
        }));
        let j = |room: &str| {
            Call::Join(Box::new(JoinCall {
                at: at(0, 1),
                user: "u".into(),
                room: RoomName::parse(room, 64).unwrap(),
                after: 0,
            }))
        };
        let mut out = Vec::new();
        let resp: HookResponse = serde_json::from_str(r#"{"connect":[{"user":"u9","level":12}]}"#).unwrap();
        judge(vec![c], resp, &rules(), &mut out).unwrap();
        let Some((Verdict::Connect { outcome: Ok(Some(v)), .. }, Outcome::Allowed)) = out.pop() else { panic!() };
        assert_eq!((v.user.as_str(), v.level), ("u9", Some(12)));
        let resp: HookResponse = serde_json::from_str(r#"{"join":[{}, {"code":403,"reason":"vip only"}]}"#).unwrap();
        judge(vec![j("a"), j("vip")], resp, &rules(), &mut out).unwrap();
        assert!(matches!(&out[1].0, Verdict::Join { outcome: Err(r), .. } if r.reason == "vip only"));
        assert!(matches!(&out[0].0, Verdict::Join { outcome: Ok(()), room, .. } if room.as_str() == "a"));
    }
}
