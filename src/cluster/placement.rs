//! Where a room's owner runs, as every shard and API thread of one node sees it: the live set
//! the heartbeat last read (rendezvous hashing over it picks a room's node, `Members::owner_of`)
//! and a generation that moves whenever the set's nodes change, so shards can re-route what
//! they report and owners can let go of rooms that moved.
//!
//! Inside a node nothing changes: a room this node owns goes to its owner shard as before; one
//! owned elsewhere goes to the cluster link, addressed as one more shard (`link`).
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use super::members::Members;
use crate::ids::ShardId;
use crate::room::RoomName;

/// One node's view of room placement.
pub struct Placement {
    members: RwLock<Arc<Members>>,
    generation: AtomicU64,
    shards: usize,
}

impl Placement {
    /// Alone until the first heartbeat reads the set.
    pub fn new(me: &str, shards: usize) -> Arc<Placement> {
        Arc::new(Placement {
            members: RwLock::new(Arc::new(Members::read(me, Vec::new(), 0))),
            generation: AtomicU64::new(0),
            shards,
        })
    }

    /// Takes a newly read set; the generation moves when its nodes differ from the last.
    pub fn set(&self, next: Members) {
        let Ok(mut m) = self.members.write() else { return };
        let changed = m.live().iter().map(|n| &n.id).ne(next.live().iter().map(|n| &n.id));
        *m = Arc::new(next);
        if changed {
            self.generation.fetch_add(1, Ordering::Release);
        }
    }

    pub fn members(&self) -> Arc<Members> {
        self.members.read().map_or_else(|p| Arc::clone(&p.into_inner()), |m| Arc::clone(&m))
    }

    /// Moves whenever the live set's nodes change.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The node that owns `room` (None: this one — also while no set has been read).
    pub fn owner_node(&self, room: &str) -> Option<String> {
        let m = self.members();
        match m.owner_of(room) {
            Some(n) if n.id != m.me() => Some(n.id.clone()),
            _ => None,
        }
    }

    /// Whether this node owns `room`.
    pub fn is_mine(&self, room: &str) -> bool {
        let m = self.members.read();
        let Ok(m) = m else { return true };
        m.owner_of(room).is_none_or(|n| n.id == m.me())
    }

    /// The cluster link's address on the mesh: one past the last shard.
    pub fn link(&self) -> ShardId {
        ShardId(self.shards as u16)
    }
}

/// Where mail for `room`'s owner goes: its owner shard here, or the cluster link when another
/// node owns it.
pub fn route(room: &RoomName, shards: usize, placement: Option<&Placement>) -> ShardId {
    match placement {
        Some(p) if !p.is_mine(room.as_str()) => p.link(),
        _ => room.owner(shards),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(me: &str, ids: &[&str]) -> Members {
        Members::read(me, ids.iter().map(|id| (id.to_string(), 2_000, None)).collect(), 1_000)
    }

    #[test]
    fn rooms_route_to_their_owner_shard_or_the_link() {
        let p = Placement::new("a", 2);
        let rooms: Vec<RoomName> = (0..64).map(|i| RoomName::parse(&format!("r{i}"), 16).unwrap()).collect();
        // Alone (no set read yet): everything is local.
        assert!(rooms.iter().all(|r| route(r, 2, Some(&p)) == r.owner(2)));
        assert_eq!(p.generation(), 0);
        p.set(read("a", &["a", "b"]));
        assert_eq!(p.generation(), 1);
        let remote = rooms.iter().filter(|r| route(r, 2, Some(&p)) == ShardId(2)).count();
        assert!((16..=48).contains(&remote), "about half the rooms are the other node's: {remote}");
        for r in &rooms {
            assert_eq!(p.is_mine(r.as_str()), p.owner_node(r.as_str()).is_none());
        }
        // The same nodes read again (expiries moved): same generation.
        p.set(read("a", &["a", "b"]));
        assert_eq!(p.generation(), 1);
        p.set(read("a", &["a"]));
        assert_eq!(p.generation(), 2);
        assert!(rooms.iter().all(|r| p.is_mine(r.as_str())));
        // Without a cluster nothing changes.
        assert!(rooms.iter().all(|r| route(r, 2, None) == r.owner(2)));
    }
}
