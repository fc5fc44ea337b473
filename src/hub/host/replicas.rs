//! Replicas of rooms' ban and whitelist lists on a shard hosting members (the owner's lists are
//! authoritative and send every change to every shard), so a banned user's join is refused here
//! and a whitelisted slow reader is never auto-kicked, without asking the owner.

use std::collections::HashMap;

use crate::ids::UserId;
use crate::room::RoomName;
use crate::room::moderation::{List, Moderation, ModerationLimits};

/// This shard's replicas, by room.
#[derive(Default)]
pub struct Replicas {
    rooms: HashMap<RoomName, Moderation>,
}

impl Replicas {
    /// Adds an entry a room's owner added. The owner bounds its lists with the same limits, so
    /// a replica never refuses what the owner accepted.
    pub fn add(
        &mut self,
        room: RoomName,
        user: &UserId,
        list: List,
        until_ms: Option<i64>,
        now_ms: i64,
        limits: &ModerationLimits,
    ) {
        let m = self.rooms.entry(room).or_default();
        let _ = m.add(list, user.as_str(), until_ms, now_ms, limits);
    }

    /// Drops an entry the room's owner dropped (and the replica with its last entry).
    pub fn remove(&mut self, room: &RoomName, user: &UserId, list: List) {
        if let Some(m) = self.rooms.get_mut(room) {
            m.remove(list, user.as_str());
            if m.is_empty() {
                self.rooms.remove(room);
            }
        }
    }

    /// Whether `user` is on `list` of `room` (by this shard's replica).
    pub fn contains(&self, room: &RoomName, list: List, user: &UserId, now_ms: i64) -> bool {
        self.rooms.get(room).is_some_and(|m| m.contains(list, user.as_str(), now_ms))
    }

    /// Drops expired entries (and empty replicas).
    pub fn sweep(&mut self, now_ms: i64) {
        self.rooms.retain(|_, m| {
            m.sweep(now_ms);
            !m.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_follow_the_owner_and_expire() {
        let mut r = Replicas::default();
        let (room, bob) = (RoomName::parse("r", 8).unwrap(), UserId::new("bob"));
        let limits = ModerationLimits { entries_max: 4 };
        r.add(room.clone(), &bob, List::Ban, Some(1_000), 0, &limits);
        assert!(r.contains(&room, List::Ban, &bob, 999));
        assert!(!r.contains(&room, List::Ban, &bob, 1_001), "expired");
        assert!(!r.contains(&room, List::Whitelist, &bob, 0));
        r.remove(&room, &bob, List::Ban);
        assert!(!r.contains(&room, List::Ban, &bob, 0), "lifted");
        r.add(room.clone(), &bob, List::Whitelist, None, 0, &limits);
        r.sweep(5_000);
        assert!(r.contains(&room, List::Whitelist, &bob, 5_000), "no expiry: kept");
    }
}
