//! The shard's local room index: room → the shard's member connections, and what the room's
//! owner has not been told yet (member counts, who left). A member costs one `ConnKey` in its
//! room's list; a connection keeps its position there, so leaving is O(1).

use std::collections::HashMap;

use slab::Slab;

use crate::envelope::Format;
use crate::ids::{ConnKey, UserId};
use crate::room::RoomName;
use crate::room::frames::Wire;

/// A room in the local index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoomKey(u32);

impl RoomKey {
    /// In no room.
    pub const NONE: RoomKey = RoomKey(u32::MAX);
}

/// A member's position in its room's member list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemberPos(pub u32);

/// A room with members on this shard.
pub struct LocalRoom {
    pub name: RoomName,
    pub members: Vec<ConnKey>,
    /// Members reading JSON.
    pub json: u32,
    /// Members that negotiated permessage-deflate, and of those, the ones reading JSON.
    pub deflate: u32,
    pub deflate_json: u32,
    /// Membership changed since the owner was last told.
    presence_dirty: bool,
    /// Members who left since the owner was last told, and the first few of their names.
    left: u32,
    left_users: Vec<UserId>,
}

/// What a shard tells a room's owner about its members there.
pub struct PresenceReport<'a> {
    pub room: &'a RoomName,
    pub members: u32,
    pub json: u32,
    pub deflate: u32,
    pub deflate_json: u32,
    pub left: u32,
    pub left_users: Vec<UserId>,
}

/// Rooms with members on this shard.
#[derive(Default)]
pub struct Rooms {
    slab: Slab<LocalRoom>,
    by_name: HashMap<RoomName, RoomKey>,
    dirty: Vec<RoomKey>,
}

impl Rooms {
    /// Rooms with members (or waiting to report their last member left).
    pub fn len(&self) -> usize {
        self.slab.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.slab.is_empty()
    }

    pub fn find(&self, name: &RoomName) -> Option<RoomKey> {
        self.by_name.get(name).copied()
    }

    /// A room by key; None for `RoomKey::NONE`.
    pub fn get(&self, room: RoomKey) -> Option<&LocalRoom> {
        self.slab.get(room.0 as usize)
    }

    /// Adds `conn` to a room; returns the room and the member's position.
    pub fn join(&mut self, name: &RoomName, conn: ConnKey, wire: Wire) -> (RoomKey, MemberPos) {
        let room = match self.by_name.get(name) {
            Some(&r) => r,
            None => {
                let entry = LocalRoom {
                    name: name.clone(),
                    members: Vec::new(),
                    json: 0,
                    deflate: 0,
                    deflate_json: 0,
                    presence_dirty: false,
                    left: 0,
                    left_users: Vec::new(),
                };
                let r = RoomKey(self.slab.insert(entry) as u32);
                self.by_name.insert(name.clone(), r);
                r
            }
        };
        let r = &mut self.slab[room.0 as usize];
        r.members.push(conn);
        r.json += u32::from(wire.format == Format::Json);
        r.deflate += u32::from(wire.deflate);
        r.deflate_json += u32::from(wire.deflate && wire.format == Format::Json);
        Self::mark(&mut self.dirty, r, room);
        (room, MemberPos((r.members.len() - 1) as u32))
    }

    /// Removes the member at `pos` (`user` names it for the leave event, up to `named_max`
    /// names per report). Returns the connection moved into `pos` (whose stored position must
    /// be updated), if any.
    pub fn leave(
        &mut self,
        room: RoomKey,
        pos: MemberPos,
        wire: Wire,
        user: Option<&UserId>,
        named_max: usize,
    ) -> Option<ConnKey> {
        let r = &mut self.slab[room.0 as usize];
        let pos = pos.0 as usize;
        assert!(pos < r.members.len(), "member position {pos} past the {} members of {}", r.members.len(), r.name);
        r.members.swap_remove(pos);
        r.json -= u32::from(wire.format == Format::Json);
        r.deflate -= u32::from(wire.deflate);
        r.deflate_json -= u32::from(wire.deflate && wire.format == Format::Json);
        // Leave events count signed-in users only (see Owner::joined).
        if let Some(u) = user {
            r.left = r.left.saturating_add(1);
            if r.left_users.len() < named_max {
                r.left_users.push(u.clone());
            }
        }
        Self::mark(&mut self.dirty, r, room);
        r.members.get(pos).copied()
    }

    fn mark(dirty: &mut Vec<RoomKey>, r: &mut LocalRoom, room: RoomKey) {
        if !r.presence_dirty {
            r.presence_dirty = true;
            dirty.push(room);
        }
    }

    /// Every room reports again at the next flush (its owner may have moved to another node).
    pub fn mark_all(&mut self) {
        for (key, r) in self.slab.iter_mut() {
            Self::mark(&mut self.dirty, r, RoomKey(key as u32));
        }
    }

    /// Reports every room whose membership changed, unless `hold` says its owner cannot take
    /// mail now (such a room stays dirty and reports later, its changes summed), and forgets
    /// rooms left empty once reported.
    pub fn flush_presence(&mut self, hold: &dyn Fn(&RoomName) -> bool, report: &mut dyn FnMut(PresenceReport<'_>)) {
        let mut held = Vec::new();
        for room in std::mem::take(&mut self.dirty) {
            let r = &mut self.slab[room.0 as usize];
            if hold(&r.name) {
                held.push(room);
                continue;
            }
            r.presence_dirty = false;
            report(PresenceReport {
                room: &r.name,
                members: r.members.len() as u32,
                json: r.json,
                deflate: r.deflate,
                deflate_json: r.deflate_json,
                left: std::mem::take(&mut r.left),
                left_users: std::mem::take(&mut r.left_users),
            });
            if r.members.is_empty() {
                let name = r.name.clone();
                self.slab.remove(room.0 as usize);
                self.by_name.remove(&name);
            }
        }
        self.dirty = held;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> RoomName {
        RoomName::parse(s, 64).unwrap()
    }

    fn wire(json: bool) -> Wire {
        Wire { format: if json { Format::Json } else { Format::Proto }, deflate: json }
    }

    fn keys(v: &[u32]) -> Vec<ConnKey> {
        v.iter().map(|&k| ConnKey(k)).collect()
    }

    #[test]
    fn join_leave_keeps_positions_and_reports_presence() {
        let mut rooms = Rooms::default();
        let (r, p0) = rooms.join(&name("a"), ConnKey(10), wire(false));
        let (_, p1) = rooms.join(&name("a"), ConnKey(11), wire(true));
        let (_, p2) = rooms.join(&name("a"), ConnKey(12), wire(false));
        assert_eq!((p0, p1, p2), (MemberPos(0), MemberPos(1), MemberPos(2)));
        // Conn 10 leaves: 12 moves into position 0.
        let bob = UserId::new("bob");
        assert_eq!(rooms.leave(r, p0, wire(false), Some(&bob), 4), Some(ConnKey(12)));
        assert_eq!(rooms.get(r).unwrap().members, keys(&[12, 11]));
        let mut seen = Vec::new();
        let send = |_: &RoomName| false;
        rooms.flush_presence(&send, &mut |p| {
            seen.push((p.room.to_string(), p.members, p.json, p.deflate, p.deflate_json, p.left, p.left_users))
        });
        assert_eq!(seen, vec![("a".to_string(), 2, 1, 1, 1, 1, vec![bob.clone()])]);
        rooms.flush_presence(&send, &mut |_| panic!("nothing changed"));
        assert_eq!(rooms.leave(r, MemberPos(1), wire(true), None, 4), None);
        assert_eq!(rooms.leave(r, MemberPos(0), wire(false), None, 4), None);
        rooms.flush_presence(&send, &mut |p| assert_eq!((p.members, p.left, p.left_users.len()), (0, 0, 0)));
        assert!(rooms.is_empty(), "an empty room is forgotten after reporting");
    }

    #[test]
    fn a_held_report_waits_and_sums_its_changes() {
        let mut rooms = Rooms::default();
        let (r, p) = rooms.join(&name("a"), ConnKey(1), wire(false));
        rooms.join(&name("a"), ConnKey(2), wire(false));
        rooms.flush_presence(&|_| true, &mut |_| panic!("held"));
        rooms.leave(r, p, wire(false), Some(&UserId::new("u")), 4);
        let mut seen = Vec::new();
        rooms.flush_presence(&|_| false, &mut |p| seen.push((p.members, p.left)));
        assert_eq!(seen, vec![(1, 1)], "one report with the net count and the leave");
    }
}
