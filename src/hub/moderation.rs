//! Moderation on a shard hosting members: replicas of rooms' ban and whitelist lists (the
//! owner's lists are authoritative), so a banned user's join is refused here and a whitelisted
//! slow reader is never auto-kicked, without asking the owner.

use std::collections::hash_map::Entry;

use super::{Hub, Now};
use crate::room::RoomName;
use crate::room::moderation::{List, Moderation};

impl Hub {
    /// Applies a replicated ban/whitelist change from a room's owner.
    pub(super) fn replicate(
        &mut self,
        room: RoomName,
        user: &str,
        list: List,
        until_ms: Option<i64>,
        add: bool,
        now: Now,
    ) {
        let limits = self.cfg.owner.moderation;
        match self.moderation.entry(room) {
            Entry::Occupied(mut e) => {
                let m = e.get_mut();
                if add {
                    let _ = m.add(list, user, until_ms, now.unix.0, &limits);
                } else {
                    m.remove(list, user);
                }
                if m.is_empty() {
                    e.remove();
                }
            }
            Entry::Vacant(e) if add => {
                let mut m = Moderation::default();
                let _ = m.add(list, user, until_ms, now.unix.0, &limits);
                e.insert(m);
            }
            Entry::Vacant(_) => {}
        }
    }

    /// Whether `user` is banned from `room` (by this shard's replica).
    pub(super) fn banned(&self, room: &RoomName, user: &str, now: Now) -> bool {
        self.moderation.get(room).is_some_and(|m| m.contains(List::Ban, user, now.unix.0))
    }

    /// Drops expired replica entries (and empty replicas).
    pub(super) fn sweep_moderation(&mut self, now: Now) {
        self.moderation.retain(|_, m| {
            m.sweep(now.unix.0);
            !m.is_empty()
        });
    }
}
