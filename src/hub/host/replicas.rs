//! Replicas of rooms' ban and whitelist lists on a shard hosting members (the owner's lists are
//! authoritative and send every change to every shard), so a banned user's join is refused here
//! and a whitelisted slow reader is never auto-kicked, without asking the owner.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use crate::ids::UserId;
use crate::room::RoomName;
use crate::room::moderation::{List, Moderation, ModerationLimits};

/// This shard's replicas, by room.
#[derive(Default)]
pub struct Replicas {
    rooms: HashMap<RoomName, Moderation>,
}

impl Replicas {
    /// Applies a change from a room's owner. The owner bounds its lists with the same limits,
    /// so a replica never refuses what the owner accepted.
    pub fn apply(&mut self, room: RoomName, user: &UserId, list: List, until_ms: Option<i64>, add: bool, now_ms: i64, limits: &ModerationLimits) {
        match self.rooms.entry(room) {
            Entry::Occupied(mut e) => {
                let m = e.get_mut();
                if add {
                    let _ = m.add(list, user.as_str(), until_ms, now_ms, limits);
                } else {
                    m.remove(list, user.as_str());
                }
                if m.is_empty() {
                    e.remove();
                }
            }
            Entry::Vacant(e) if add => {
                let mut m = Moderation::default();
                let _ = m.add(list, user.as_str(), until_ms, now_ms, limits);
                e.insert(m);
            }
            Entry::Vacant(_) => {}
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
        r.apply(room.clone(), &bob, List::Ban, Some(1_000), true, 0, &limits);
        assert!(r.contains(&room, List::Ban, &bob, 999));
        assert!(!r.contains(&room, List::Ban, &bob, 1_001), "expired");
        assert!(!r.contains(&room, List::Whitelist, &bob, 0));
        r.apply(room.clone(), &bob, List::Ban, None, false, 0, &limits);
        assert!(!r.contains(&room, List::Ban, &bob, 0), "lifted");
        r.apply(room.clone(), &bob, List::Whitelist, None, true, 0, &limits);
        r.sweep(5_000);
        assert!(r.contains(&room, List::Whitelist, &bob, 5_000), "no expiry: kept");
    }
}
