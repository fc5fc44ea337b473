//! Where a room's state lives in Redis. Every key of a room holds its name in braces (a Redis
//! Cluster hash tag: a room's keys share one slot) after the configured prefix; room names
//! cannot hold braces, so no two rooms' keys can meet.
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P{room}:meta` | hash | `base`, `last` (seqs), `evicted`, `attrs_version`, `kept` |
//! | `P{room}:live` | zset | score seq → protobuf `Message`: the last `history_messages_max` |
//! | `P{room}:replay` | zset | score server ms (`created_ms`) → protobuf `Message`, kept `replay_retention_s` |
//! | `P{room}:attrs` | hash | attribute key → value |
//! | `P{room}:attrlog` | zset | score version → protobuf `AttrEntry`: the last `attr_log_len_max` changes |
//! | `P{room}:mute` (`ban`, `whitelist`) | set | the users on the list |
//! | `P{room}:mute:USER` (...) | string | until (Unix ms, 0 = until lifted), with that Redis expiry |
//! | `P{room}:owner` | string | in a cluster: the node running the room, expiring `cluster.lease_ms` after its last renewal |
//!
//! Every key but the lists expires `room_ttl_s` after the room's last write.

use crate::room::moderation::List;

/// A room's keys under a prefix.
pub struct RoomKeys {
    base: String,
}

impl RoomKeys {
    pub fn new(prefix: &str, room: &str) -> RoomKeys {
        RoomKeys { base: format!("{prefix}{{{room}}}:") }
    }

    fn key(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.base)
    }

    pub fn meta(&self) -> String {
        self.key("meta")
    }

    pub fn live(&self) -> String {
        self.key("live")
    }

    pub fn replay(&self) -> String {
        self.key("replay")
    }

    pub fn attrs(&self) -> String {
        self.key("attrs")
    }

    pub fn attrlog(&self) -> String {
        self.key("attrlog")
    }

    /// In a cluster: the id of the node whose lease runs the room (`cluster::lease`).
    pub fn owner(&self) -> String {
        self.key("owner")
    }

    /// The set of users on `list`.
    pub fn list(&self, list: List) -> String {
        self.key(list_name(list))
    }

    /// One user's entry on `list`.
    pub fn entry(&self, list: List, user: &str) -> String {
        format!("{}{}:{user}", self.base, list_name(list))
    }
}

pub const LISTS: [List; 3] = [List::Mute, List::Ban, List::Whitelist];

fn list_name(list: List) -> &'static str {
    match list {
        List::Mute => "mute",
        List::Ban => "ban",
        List::Whitelist => "whitelist",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_carry_the_room_as_a_hash_tag_and_never_meet() {
        let k = RoomKeys::new("barrage:", "live:42");
        assert_eq!(k.live(), "barrage:{live:42}:live");
        assert_eq!(k.entry(List::Ban, "u:1"), "barrage:{live:42}:ban:u:1");
        // A room whose name ends like a suffix still has keys of its own.
        assert_ne!(RoomKeys::new("p:", "a").entry(List::Mute, "live"), RoomKeys::new("p:", "a:mute").live());
    }
}
