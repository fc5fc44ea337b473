//! Room leases: which node runs a room's mixer. Rendezvous hashing over the live set says which
//! node *should* (every node computes it alone, no round trip per message); the lease in Redis
//! (`P{room}:owner` = node id, with an expiry) makes sure only one node *does*, also while two
//! nodes briefly read different sets. The owner takes it when it loads the room, renews it
//! every third of `cluster.lease_ms`, and gives it up after its last writes when the room
//! moves; a dead owner's lease runs out by itself.
//!
//! One script does all three of take, renew and re-take (after Redis lost its data): the lease
//! is this node's if it was free or already its own; otherwise the holder is named. Sans-IO
//! here: the commands and the parsing of their replies; the store's loader and the cluster
//! link run them.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::Mutex;

use crate::ids::ShardId;
use crate::room::RoomName;
use crate::store::keys::RoomKeys;

/// For each key: free or ours → ours for `ARGV[2]` ms (1); someone else's → their id.
const TAKE: &str = r"
local out = {}
for i, key in ipairs(KEYS) do
  local holder = redis.call('GET', key)
  if holder == false or holder == ARGV[1] then
    redis.call('SET', key, ARGV[1], 'PX', ARGV[2])
    out[i] = 1
  else
    out[i] = holder
  end
end
return out
";

/// Deletes the lease only if it is still ours.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// What a take found for one room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Take {
    Ours,
    /// Another node holds it.
    Held(String),
}

/// This node's leases, shared by the loader (takes), the writer (releases) and the link
/// (renewals).
pub struct Leases {
    me: String,
    lease_ms: u64,
    prefix: String,
    /// Rooms whose lease this node holds, and the shard that owns each.
    held: Mutex<HashMap<RoomName, ShardId>>,
}

impl Leases {
    pub fn new(me: &str, lease_ms: u64, prefix: &str) -> Leases {
        Leases { me: me.to_owned(), lease_ms, prefix: prefix.to_owned(), held: Mutex::new(HashMap::new()) }
    }

    pub fn me(&self) -> &str {
        &self.me
    }

    pub fn lease_ms(&self) -> u64 {
        self.lease_ms
    }

    /// Takes (or renews) the leases of `rooms` in one script run.
    pub fn take_cmd(&self, rooms: &[&RoomName]) -> redis::Cmd {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(TAKE).arg(rooms.len());
        for room in rooms {
            cmd.arg(RoomKeys::new(&self.prefix, room.as_str()).owner());
        }
        cmd.arg(&self.me).arg(self.lease_ms);
        cmd
    }

    /// Gives a room's lease up, if still ours.
    pub fn release_cmd(&self, pipe: &mut redis::Pipeline, room: &RoomName) {
        let key = RoomKeys::new(&self.prefix, room.as_str()).owner();
        pipe.cmd("EVAL").arg(RELEASE).arg(1).arg(key).arg(&self.me).ignore();
    }

    /// The take script's answer, one per room asked (a malformed reply reads as held by "?":
    /// never run a room on a reply not understood).
    pub fn parse_take(reply: &redis::Value, n: usize) -> Vec<Take> {
        let items = match reply {
            redis::Value::Array(items) => items.as_slice(),
            _ => &[],
        };
        (0..n)
            .map(|i| match items.get(i) {
                Some(redis::Value::Int(1)) => Take::Ours,
                Some(redis::Value::BulkString(b)) => Take::Held(String::from_utf8_lossy(b).into_owned()),
                _ => Take::Held("?".into()),
            })
            .collect()
    }

    /// The loader took the room's lease for `owner`.
    pub fn taken(&self, room: &RoomName, owner: ShardId) {
        if let Ok(mut h) = self.held.lock() {
            h.insert(room.clone(), owner);
        }
    }

    /// The room's lease is no longer ours (released, or lost).
    pub fn forget(&self, room: &RoomName) {
        if let Ok(mut h) = self.held.lock() {
            h.remove(room);
        }
    }

    /// Every lease held, with the owner shard of each.
    pub fn held(&self) -> Vec<(RoomName, ShardId)> {
        self.held.lock().map(|h| h.iter().map(|(r, s)| (r.clone(), *s)).collect()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::Value;

    #[test]
    fn take_replies_name_the_holder_and_anything_odd_is_held() {
        let reply = Value::Array(vec![Value::Int(1), Value::BulkString(b"node-b".to_vec()), Value::Nil]);
        assert_eq!(
            Leases::parse_take(&reply, 4),
            vec![Take::Ours, Take::Held("node-b".into()), Take::Held("?".into()), Take::Held("?".into())]
        );
        assert_eq!(Leases::parse_take(&Value::Okay, 1), vec![Take::Held("?".into())]);
    }

    #[test]
    fn the_table_tracks_what_is_held() {
        let l = Leases::new("a", 3_000, "p:");
        let r = RoomName::parse("r", 8).unwrap();
        l.taken(&r, ShardId(1));
        assert_eq!(l.held(), vec![(r.clone(), ShardId(1))]);
        l.forget(&r);
        assert!(l.held().is_empty());
        let cmd = l.take_cmd(&[&r]);
        let packed = String::from_utf8_lossy(&cmd.get_packed_command()).into_owned();
        assert!(packed.contains("p:{r}:owner"), "{packed}");
    }
}
