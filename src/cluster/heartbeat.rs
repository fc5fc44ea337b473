//! The heartbeat: one script run per `cluster.heartbeat_ms` that announces this node, sweeps the
//! nodes whose announcement expired, and reads the live set — atomically, on Redis's clock (so
//! the nodes' own clocks need not agree). The command and the reply are sans-IO here; the
//! thread that runs them is `super::Cluster::run`.
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P{cluster}:nodes` | zset | node id, score = its announcement's expiry (Redis server ms) |
//! | `P{cluster}:urls` | hash | node id → public URL |

use redis::{Cmd, Value};

use super::members::Members;

/// KEYS: nodes, urls. ARGV: id, ttl_ms, url. Returns [now_ms, id, expires_ms, url, ...].
const SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('HDEL', KEYS[2], id)
end
local live = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local out = {now}
for i = 1, #live, 2 do
  out[#out + 1] = live[i]
  out[#out + 1] = live[i + 1]
  out[#out + 1] = redis.call('HGET', KEYS[2], live[i]) or ''
end
return out
";

/// The cluster's keys under the configured prefix (one hash tag: one slot on a Redis Cluster).
#[derive(Debug, Clone)]
pub struct Keys {
    pub nodes: String,
    pub urls: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys { nodes: format!("{prefix}{{cluster}}:nodes"), urls: format!("{prefix}{{cluster}}:urls") }
    }
}

/// Announce `me` for `ttl_ms`, sweep, read.
pub fn command(keys: &Keys, me: &str, ttl_ms: u64, url: &str) -> Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(SCRIPT).arg(2).arg(&keys.nodes).arg(&keys.urls).arg(me).arg(ttl_ms).arg(url);
    cmd
}

/// Leave at once (a stopping node), rather than after its TTL.
pub fn leave(keys: &Keys, me: &str) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    pipe.cmd("ZREM").arg(&keys.nodes).arg(me).ignore();
    pipe.cmd("HDEL").arg(&keys.urls).arg(me).ignore();
    pipe
}

/// The script's reply as the live set.
pub fn parse(me: &str, reply: &Value) -> Result<Members, String> {
    let Value::Array(items) = reply else { return Err(format!("heartbeat: not an array: {reply:?}")) };
    let Some((Value::Int(now_ms), rest)) = items.split_first() else {
        return Err("heartbeat: no server time".into());
    };
    if rest.len() % 3 != 0 {
        return Err(format!("heartbeat: {} fields after the time, not triples", rest.len()));
    }
    let mut entries = Vec::with_capacity(rest.len() / 3);
    for t in rest.chunks(3) {
        let (Some(id), Some(expires), Some(url)) = (text(&t[0]), text(&t[1]), text(&t[2])) else {
            return Err("heartbeat: a field is not a string".into());
        };
        // Scores come back as decimal strings ("1733328000123" or "1.733328000123e+12").
        let expires_ms = expires.parse::<f64>().map_err(|_| format!("heartbeat: bad expiry {expires:?}"))? as i64;
        entries.push((id, expires_ms, (!url.is_empty()).then_some(url)));
    }
    Ok(Members::read(me, entries, *now_ms))
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn a_reply_reads_as_the_live_set() {
        let reply = Value::Array(vec![
            Value::Int(1_000),
            bulk("b"),
            bulk("6000"),
            bulk("ws://b:8080"),
            bulk("a"),
            bulk("1.5e3"),
            bulk(""),
        ]);
        let m = parse("a", &reply).expect("parses");
        assert_eq!(m.as_of_ms(), 1_000);
        let live: Vec<(&str, i64, &str)> = m.live().iter().map(|n| (&*n.id, n.expires_ms, &*n.url)).collect();
        assert_eq!(live, [("a", 1_500, ""), ("b", 6_000, "ws://b:8080")]);
    }

    #[test]
    fn malformed_replies_are_errors_not_panics() {
        for bad in [
            Value::Nil,
            Value::Array(vec![]),
            Value::Array(vec![bulk("x")]),
            Value::Array(vec![Value::Int(1), bulk("a"), bulk("5")]),
            Value::Array(vec![Value::Int(1), bulk("a"), bulk("soon"), bulk("")]),
            Value::Array(vec![Value::Int(1), Value::Nil, bulk("5"), bulk("")]),
        ] {
            assert!(parse("a", &bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_command_names_both_keys_under_one_hash_tag() {
        let keys = Keys::new("barrage:");
        assert_eq!(keys.nodes, "barrage:{cluster}:nodes");
        assert_eq!(keys.urls, "barrage:{cluster}:urls");
        let packed = command(&keys, "n1", 5_000, "ws://n1").get_packed_command();
        let text = String::from_utf8_lossy(&packed);
        assert!(text.contains("barrage:{cluster}:nodes") && text.contains("ws://n1") && text.contains("5000"));
    }
}
