//! Store operations as Redis commands, and Redis replies as room state (sans-IO: no
//! connection here, so both directions are tested on their own). Every write is idempotent —
//! the same members, fields and absolute expiries — so a batch retried after a dropped
//! connection changes nothing twice.

use prost::Message as _;
use redis::{Pipeline, Value};

use super::keys::{LISTS, RoomKeys};
use crate::proto::{AttrEntry, Message, ModerationEntry, RoomState, moderation_entry};
use crate::room::durable::StoreOp;
use crate::room::moderation::List;

/// What the commands need from the config.
#[derive(Clone, Debug)]
pub struct Retention {
    pub prefix: String,
    pub history_messages_max: usize,
    pub replay_retention_ms: i64,
    pub replay_messages_max: usize,
    pub attr_log_len_max: usize,
    pub room_ttl_s: u64,
}

/// Appends the commands of `op` (a write; a load is not a write) to `pipe`; returns how many.
pub fn write(pipe: &mut Pipeline, op: &StoreOp, r: &Retention, now_ms: i64) -> usize {
    let before = pipe.cmd_iter().count();
    match op {
        StoreOp::Block { room, messages, base_seq, last_seq, evicted_seq, kept } => {
            let k = RoomKeys::new(&r.prefix, room.as_str());
            for m in messages {
                let bytes = m.encode_to_vec();
                pipe.cmd("ZADD").arg(k.live()).arg(m.seq).arg(&bytes).ignore();
                pipe.cmd("ZADD").arg(k.replay()).arg(m.created_ms).arg(&bytes).ignore();
            }
            let keep_live = -(r.history_messages_max as i64) - 1;
            pipe.cmd("ZREMRANGEBYRANK").arg(k.live()).arg(0).arg(keep_live).ignore();
            let oldest = now_ms.saturating_sub(r.replay_retention_ms);
            pipe.cmd("ZREMRANGEBYSCORE").arg(k.replay()).arg("-inf").arg(format!("({oldest}")).ignore();
            let keep_replay = -(r.replay_messages_max as i64) - 1;
            pipe.cmd("ZREMRANGEBYRANK").arg(k.replay()).arg(0).arg(keep_replay).ignore();
            let meta = pipe.cmd("HSET").arg(k.meta());
            meta.arg("base").arg(base_seq).arg("last").arg(last_seq).arg("evicted").arg(evicted_seq);
            if *kept {
                meta.arg("kept").arg(1);
            }
            meta.ignore();
            for key in [k.live(), k.replay(), k.meta()] {
                pipe.cmd("EXPIRE").arg(key).arg(r.room_ttl_s).ignore();
            }
        }
        StoreOp::Attr { room, version, key, value } => {
            let k = RoomKeys::new(&r.prefix, room.as_str());
            match value {
                Some(v) => pipe.cmd("HSET").arg(k.attrs()).arg(key).arg(v).ignore(),
                None => pipe.cmd("HDEL").arg(k.attrs()).arg(key).ignore(),
            };
            let change =
                AttrEntry { key: key.clone(), value: value.clone().unwrap_or_default(), deleted: value.is_none() };
            pipe.cmd("ZADD").arg(k.attrlog()).arg(version).arg(change.encode_to_vec()).ignore();
            let keep_log = -(r.attr_log_len_max as i64) - 1;
            pipe.cmd("ZREMRANGEBYRANK").arg(k.attrlog()).arg(0).arg(keep_log).ignore();
            pipe.cmd("HSET").arg(k.meta()).arg("attrs_version").arg(version).arg("kept").arg(1).ignore();
            for key in [k.attrs(), k.attrlog(), k.meta()] {
                pipe.cmd("EXPIRE").arg(key).arg(r.room_ttl_s).ignore();
            }
        }
        StoreOp::Moderation { room, list, user, until_ms, add } => {
            let k = RoomKeys::new(&r.prefix, room.as_str());
            let entry = k.entry(*list, user);
            if *add {
                let set = pipe.cmd("SET").arg(&entry).arg(until_ms.unwrap_or(0));
                if let Some(until) = until_ms {
                    // An absolute expiry: a retried write sets the same one.
                    set.arg("PXAT").arg(*until);
                }
                set.ignore();
                pipe.cmd("SADD").arg(k.list(*list)).arg(user).ignore();
                pipe.cmd("HSET").arg(k.meta()).arg("kept").arg(1).ignore();
                pipe.cmd("EXPIRE").arg(k.meta()).arg(r.room_ttl_s).ignore();
            } else {
                pipe.cmd("DEL").arg(&entry).ignore();
                pipe.cmd("SREM").arg(k.list(*list)).arg(user).ignore();
            }
        }
        // Not writes of room state: a load is the loader's, a lease release the writer's own.
        StoreOp::Load { .. } | StoreOp::Release { .. } => {}
    }
    pipe.cmd_iter().count() - before
}

/// The first round of a load: meta, history, attributes, and the three lists' members (6
/// replies, in this order).
pub fn load_first(pipe: &mut Pipeline, prefix: &str, room: &str) {
    let k = RoomKeys::new(prefix, room);
    pipe.cmd("HGETALL").arg(k.meta());
    pipe.cmd("ZRANGE").arg(k.live()).arg(0).arg(-1);
    pipe.cmd("HGETALL").arg(k.attrs());
    for list in LISTS {
        pipe.cmd("SMEMBERS").arg(k.list(list));
    }
}

/// Replies of `load_first` per command.
pub const LOAD_FIRST_REPLIES: usize = 6;

/// What the first round found: the state without its moderation entries, and the users on
/// each list whose entries the second round reads (`load_second`).
pub struct Partial {
    pub state: RoomState,
    pub listed: Vec<(List, String)>,
}

/// Reads the first round's replies. Malformed parts (not what barrage writes) are skipped, and
/// counted in the return.
pub fn parse_first(room: &str, replies: &[Value]) -> (Partial, u64) {
    let mut bad = 0;
    let mut state = RoomState { room: room.to_owned(), ..RoomState::default() };
    let meta = pairs(replies.first());
    let field = |name: &[u8]| -> u64 {
        let v = meta.iter().find(|(k, _)| k.as_slice() == name).map(|(_, v)| v.as_slice());
        v.and_then(|v| std::str::from_utf8(v).ok()?.parse().ok()).unwrap_or(0)
    };
    state.base_seq = field(b"base");
    state.last_seq = field(b"last");
    state.evicted_seq = field(b"evicted");
    state.attrs_version = field(b"attrs_version");
    state.kept = field(b"kept") == 1;
    for bytes in items(replies.get(1)) {
        match Message::decode(bytes.as_slice()) {
            Ok(m) => state.history.push(m),
            Err(_) => bad += 1,
        }
    }
    for (key, value) in pairs(replies.get(2)) {
        match String::from_utf8(key) {
            Ok(key) => state.attrs.push(AttrEntry { key, value, deleted: false }),
            Err(_) => bad += 1,
        }
    }
    state.attrs.sort_by(|a, b| a.key.cmp(&b.key));
    let mut listed = Vec::new();
    for (i, list) in LISTS.into_iter().enumerate() {
        for user in items(replies.get(3 + i)) {
            match String::from_utf8(user) {
                Ok(user) => listed.push((list, user)),
                Err(_) => bad += 1,
            }
        }
    }
    (Partial { state, listed }, bad)
}

/// The second round: each listed user's entry (one reply each, in `listed` order).
pub fn load_second(pipe: &mut Pipeline, prefix: &str, partial: &Partial) {
    let k = RoomKeys::new(prefix, &partial.state.room);
    for (list, user) in &partial.listed {
        pipe.cmd("GET").arg(k.entry(*list, user));
    }
}

/// Adds the entries still there (an expired one has no key any more) to the state.
pub fn parse_second(mut partial: Partial, replies: &[Value]) -> RoomState {
    for ((list, user), reply) in partial.listed.into_iter().zip(replies) {
        let Some(until_ms) = number(reply) else { continue };
        let list = match list {
            List::Mute => moderation_entry::List::Mute,
            List::Ban => moderation_entry::List::Ban,
            List::Whitelist => moderation_entry::List::Whitelist,
        };
        partial.state.moderation.push(ModerationEntry { list: list as i32, user, until_ms: until_ms as i64 });
    }
    partial.state
}

/// A replay page: messages with `from_ms <= created_ms <= to_ms` in server-time order, from a
/// cursor (`ms.skip`: the page starts at `ms`, past the first `skip` messages of that ms).
pub fn replay(pipe: &mut Pipeline, prefix: &str, room: &str, cursor: Cursor, to_ms: i64, limit: usize) {
    let k = RoomKeys::new(prefix, room);
    pipe.cmd("ZRANGE")
        .arg(k.replay())
        .arg(cursor.ms)
        .arg(to_ms)
        .arg("BYSCORE")
        .arg("LIMIT")
        .arg(cursor.skip)
        .arg(limit)
        .arg("WITHSCORES");
}

/// Where a replay page starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cursor {
    pub ms: i64,
    pub skip: u64,
}

impl Cursor {
    pub fn parse(s: &str) -> Option<Cursor> {
        let (ms, skip) = s.split_once('.')?;
        Some(Cursor { ms: ms.parse().ok()?, skip: skip.parse().ok()? })
    }

    pub fn render(&self) -> String {
        format!("{}.{}", self.ms, self.skip)
    }
}

/// The messages of a replay page (`WITHSCORES` reply) and the cursor after them (None when the
/// page was not full: nothing more up to `to_ms`).
pub fn parse_replay(reply: &Value, from: Cursor, limit: usize) -> (Vec<Message>, Option<Cursor>) {
    let flat = items(Some(reply));
    let mut out = Vec::new();
    let mut next = from;
    for pair in flat.chunks(2) {
        let [bytes, score] = pair else { continue };
        let Some(ms) = std::str::from_utf8(score).ok().and_then(|s| s.parse::<f64>().ok()) else { continue };
        let ms = ms as i64;
        next = if ms == next.ms { Cursor { ms, skip: next.skip + 1 } } else { Cursor { ms, skip: 1 } };
        if let Ok(m) = Message::decode(bytes.as_slice()) {
            out.push(m);
        }
    }
    let full = flat.len() / 2 >= limit;
    (out, full.then_some(next))
}

/// The bulk strings of an array (or set) reply.
fn items(v: Option<&Value>) -> Vec<Vec<u8>> {
    match v {
        Some(Value::Array(a) | Value::Set(a)) => a.iter().filter_map(bytes).collect(),
        _ => Vec::new(),
    }
}

/// Field-value pairs of a hash reply (a flat array in RESP2, a map in RESP3).
fn pairs(v: Option<&Value>) -> Vec<(Vec<u8>, Vec<u8>)> {
    match v {
        Some(Value::Array(a)) => a.chunks(2).filter_map(|p| Some((bytes(p.first()?)?, bytes(p.get(1)?)?))).collect(),
        Some(Value::Map(m)) => m.iter().filter_map(|(k, v)| Some((bytes(k)?, bytes(v)?))).collect(),
        _ => Vec::new(),
    }
}

fn bytes(v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b.clone()),
        Value::SimpleString(s) => Some(s.clone().into_bytes()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        _ => None,
    }
}

fn number(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        other => std::str::from_utf8(&bytes(other)?).ok()?.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::room::RoomName;

    fn retention() -> Retention {
        Retention {
            prefix: "p:".into(),
            history_messages_max: 50,
            replay_retention_ms: 60_000,
            replay_messages_max: 1000,
            attr_log_len_max: 128,
            room_ttl_s: 3600,
        }
    }

    fn commands(pipe: &Pipeline) -> Vec<String> {
        pipe.cmd_iter()
            .map(|c| {
                let packed = c.get_packed_command();
                String::from_utf8_lossy(&packed)
                    .split("\r\n")
                    .filter(|p| !p.is_empty() && !p.starts_with(['*', '$']))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect()
    }

    #[test]
    fn a_block_goes_to_history_replay_and_meta_with_retention() {
        let room = RoomName::parse("r", 64).unwrap();
        let m = Message { seq: 7, created_ms: 1_000, ..Message::default() };
        let op = StoreOp::Block { room, messages: vec![m], base_seq: 5, last_seq: 7, evicted_seq: 0, kept: true };
        let mut pipe = redis::pipe();
        let n = write(&mut pipe, &op, &retention(), 100_000);
        let c = commands(&pipe);
        assert_eq!(n, c.len());
        assert!(c[0].starts_with("ZADD p:{r}:live 7 "), "{c:?}");
        assert!(c[1].starts_with("ZADD p:{r}:replay 1000 "), "{c:?}");
        assert!(c.contains(&"ZREMRANGEBYRANK p:{r}:live 0 -51".to_owned()), "{c:?}");
        assert!(c.contains(&"ZREMRANGEBYSCORE p:{r}:replay -inf (40000".to_owned()), "{c:?}");
        assert!(c.contains(&"HSET p:{r}:meta base 5 last 7 evicted 0 kept 1".to_owned()), "{c:?}");
        assert!(c.contains(&"EXPIRE p:{r}:meta 3600".to_owned()), "{c:?}");
    }

    #[test]
    fn moderation_entries_carry_an_absolute_redis_expiry() {
        let room = RoomName::parse("r", 64).unwrap();
        let add = StoreOp::Moderation {
            room: room.clone(),
            list: List::Ban,
            user: "u".into(),
            until_ms: Some(9_000),
            add: true,
        };
        let forever =
            StoreOp::Moderation { room: room.clone(), list: List::Mute, user: "v".into(), until_ms: None, add: true };
        let lift = StoreOp::Moderation { room, list: List::Ban, user: "u".into(), until_ms: None, add: false };
        let mut pipe = redis::pipe();
        for op in [&add, &forever, &lift] {
            write(&mut pipe, op, &retention(), 0);
        }
        let c = commands(&pipe);
        assert_eq!(c[0], "SET p:{r}:ban:u 9000 PXAT 9000");
        assert_eq!(c[1], "SADD p:{r}:ban u");
        assert!(c.contains(&"SET p:{r}:mute:v 0".to_owned()), "until lifted: no expiry {c:?}");
        assert!(c.ends_with(&["DEL p:{r}:ban:u".to_owned(), "SREM p:{r}:ban u".to_owned()]), "{c:?}");
    }

    #[test]
    fn a_load_reads_back_what_was_written() {
        let m = Message { seq: 7, data: b"hi".to_vec(), ..Message::default() };
        let bulk = |b: &[u8]| Value::BulkString(b.to_vec());
        let first = vec![
            Value::Array(vec![bulk(b"base"), bulk(b"5"), bulk(b"last"), bulk(b"7"), bulk(b"kept"), bulk(b"1")]),
            Value::Array(vec![bulk(&m.encode_to_vec()), bulk(b"\xff\xff garbage")]),
            Value::Map(vec![(bulk(b"seat"), bulk(b"alice"))]),
            Value::Array(vec![bulk(b"muted")]),
            Value::Set(vec![bulk(b"gone"), bulk(b"banned")]),
            Value::Nil,
        ];
        let (partial, bad) = parse_first("r", &first);
        assert_eq!(bad, 1, "the undecodable history entry");
        assert_eq!((partial.state.base_seq, partial.state.last_seq, partial.state.kept), (5, 7, true));
        assert_eq!(partial.state.history, vec![m]);
        assert_eq!(partial.state.attrs[0].key, "seat");
        let mut pipe = redis::pipe();
        load_second(&mut pipe, "p:", &partial);
        assert_eq!(commands(&pipe), ["GET p:{r}:mute:muted", "GET p:{r}:ban:gone", "GET p:{r}:ban:banned"]);
        // "gone" expired: its key is gone, the entry too.
        let state = parse_second(partial, &[bulk(b"0"), Value::Nil, bulk(b"99000")]);
        let users: Vec<(&str, i64)> = state.moderation.iter().map(|e| (e.user.as_str(), e.until_ms)).collect();
        assert_eq!(users, [("muted", 0), ("banned", 99_000)]);
    }

    #[test]
    fn replay_pages_go_on_past_equal_times() {
        let m = |seq| Message { seq, ..Message::default() }.encode_to_vec();
        let bulk = |b: Vec<u8>| Value::BulkString(b);
        // Two messages at 1000 ms and one at 1001 ms; a page of 2.
        let reply = Value::Array(vec![bulk(m(1)), bulk(b"1000".to_vec()), bulk(m(2)), bulk(b"1000".to_vec())]);
        let (page, next) = parse_replay(&reply, Cursor { ms: 900, skip: 0 }, 2);
        assert_eq!(page.len(), 2);
        assert_eq!(next, Some(Cursor { ms: 1000, skip: 2 }));
        let reply = Value::Array(vec![bulk(m(3)), bulk(b"1001".to_vec())]);
        let (page, next) = parse_replay(&reply, next.unwrap(), 2);
        assert_eq!((page[0].seq, next), (3, None), "a short page is the last");
        assert_eq!(Cursor::parse("1000.2"), Some(Cursor { ms: 1000, skip: 2 }));
        assert_eq!(Cursor::parse("x.2"), None);
        assert_eq!(Cursor { ms: 5, skip: 1 }.render(), "5.1");
    }
}
