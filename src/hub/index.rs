//! The shard's local indexes: room → the shard's member connections, and user → the shard's
//! connections of that user. A member costs one `u32` in its room's list; a connection keeps
//! its position there, so leaving is O(1).

use std::collections::HashMap;
use std::sync::Arc;

use slab::Slab;

use crate::room::RoomName;

/// No room / no user.
pub const NONE: u32 = u32::MAX;

/// A room with members on this shard.
pub struct LocalRoom {
    pub name: RoomName,
    pub members: Vec<u32>,
    /// Members reading JSON.
    pub json: u32,
    /// Membership changed since the owner was last told.
    presence_dirty: bool,
    /// Members who left since the owner was last told, and the first few of their names.
    left: u32,
    left_users: Vec<Arc<str>>,
}

/// What a shard tells a room's owner about its members there.
pub struct PresenceReport<'a> {
    pub room: &'a RoomName,
    pub members: u32,
    pub json: u32,
    pub left: u32,
    pub left_users: Vec<Arc<str>>,
}

/// Rooms with members on this shard.
pub struct Rooms {
    slab: Slab<LocalRoom>,
    by_name: HashMap<RoomName, u32>,
    dirty: Vec<u32>,
    max: usize,
}

/// The shard's local room table is at `rooms_max`.
#[derive(Debug, PartialEq, Eq)]
pub struct RoomsFull;

impl Rooms {
    pub fn new(max: usize) -> Rooms {
        Rooms { slab: Slab::new(), by_name: HashMap::new(), dirty: Vec::new(), max }
    }

    /// Rooms with members (or waiting to report their last member left).
    pub fn len(&self) -> usize {
        self.slab.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slab.is_empty()
    }

    pub fn find(&self, name: &RoomName) -> Option<u32> {
        self.by_name.get(name).copied()
    }

    pub fn get(&self, room: u32) -> Option<&LocalRoom> {
        self.slab.get(room as usize)
    }

    /// Adds `conn` to a room; returns the room and the member's position.
    pub fn join(&mut self, name: &RoomName, conn: u32, json: bool) -> Result<(u32, u32), RoomsFull> {
        let room = match self.by_name.get(name) {
            Some(&r) => r,
            None => {
                if self.slab.len() >= self.max {
                    return Err(RoomsFull);
                }
                let entry = LocalRoom {
                    name: name.clone(),
                    members: Vec::new(),
                    json: 0,
                    presence_dirty: false,
                    left: 0,
                    left_users: Vec::new(),
                };
                let r = self.slab.insert(entry) as u32;
                self.by_name.insert(name.clone(), r);
                r
            }
        };
        let r = &mut self.slab[room as usize];
        r.members.push(conn);
        r.json += u32::from(json);
        Self::mark(&mut self.dirty, r, room);
        Ok((room, (r.members.len() - 1) as u32))
    }

    /// Removes the member at `pos` (`user` names it for the leave event, up to `named_max`
    /// names per report). Returns the connection moved into `pos` (whose stored position must
    /// be updated), if any.
    pub fn leave(&mut self, room: u32, pos: u32, json: bool, user: Option<&Arc<str>>, named_max: usize) -> Option<u32> {
        let r = self.slab.get_mut(room as usize)?;
        let pos = pos as usize;
        if pos >= r.members.len() {
            return None;
        }
        r.members.swap_remove(pos);
        r.json -= u32::from(json);
        // Leave events count signed-in users only (see Owner::joined).
        if let Some(u) = user {
            r.left = r.left.saturating_add(1);
            if r.left_users.len() < named_max {
                r.left_users.push(Arc::clone(u));
            }
        }
        Self::mark(&mut self.dirty, r, room);
        r.members.get(pos).copied()
    }

    fn mark(dirty: &mut Vec<u32>, r: &mut LocalRoom, room: u32) {
        if !r.presence_dirty {
            r.presence_dirty = true;
            dirty.push(room);
        }
    }

    /// Reports every room whose membership changed and forgets rooms left empty.
    pub fn flush_presence(&mut self, report: &mut dyn FnMut(PresenceReport<'_>)) {
        for room in std::mem::take(&mut self.dirty) {
            let Some(r) = self.slab.get_mut(room as usize) else { continue };
            r.presence_dirty = false;
            report(PresenceReport {
                room: &r.name,
                members: r.members.len() as u32,
                json: r.json,
                left: std::mem::take(&mut r.left),
                left_users: std::mem::take(&mut r.left_users),
            });
            if r.members.is_empty() {
                let name = r.name.clone();
                self.slab.remove(room as usize);
                self.by_name.remove(&name);
            }
        }
    }
}

struct User {
    name: Arc<str>,
    conns: Vec<u32>,
    /// The `level` claim of the latest token: weight of the user's chat.
    level: i32,
}

/// Signed-in users with connections on this shard.
#[derive(Default)]
pub struct Users {
    slab: Slab<User>,
    by_name: HashMap<Arc<str>, u32>,
}

impl Users {
    /// Records a connection of `name` (its token's level wins from now on); returns the key.
    pub fn add(&mut self, name: &str, conn: u32, level: i32) -> u32 {
        let key = match self.by_name.get(name) {
            Some(&k) => k,
            None => {
                let name: Arc<str> = Arc::from(name);
                let k = self.slab.insert(User { name: Arc::clone(&name), conns: Vec::new(), level }) as u32;
                self.by_name.insert(name, k);
                k
            }
        };
        let user = &mut self.slab[key as usize];
        user.conns.push(conn);
        user.level = level;
        key
    }

    /// The user's level (0 if unknown).
    pub fn level(&self, user: u32) -> i32 {
        self.slab.get(user as usize).map_or(0, |u| u.level)
    }

    /// Forgets one connection of a user (and the user with its last connection).
    pub fn remove(&mut self, user: u32, conn: u32) {
        let Some(u) = self.slab.get_mut(user as usize) else { return };
        u.conns.retain(|&c| c != conn);
        if u.conns.is_empty() {
            let u = self.slab.remove(user as usize);
            self.by_name.remove(&u.name);
        }
    }

    /// The user's name.
    pub fn name(&self, user: u32) -> Option<&Arc<str>> {
        self.slab.get(user as usize).map(|u| &u.name)
    }

    /// The user's connections on this shard.
    pub fn conns(&self, name: &str) -> &[u32] {
        match self.by_name.get(name) {
            Some(&k) => &self.slab[k as usize].conns,
            None => &[],
        }
    }

    pub fn len(&self) -> usize {
        self.slab.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slab.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> RoomName {
        RoomName::parse(s, 64).unwrap()
    }

    #[test]
    fn join_leave_keeps_positions_and_reports_presence() {
        let mut rooms = Rooms::new(10);
        let (r, p0) = rooms.join(&name("a"), 10, false).unwrap();
        let (_, p1) = rooms.join(&name("a"), 11, true).unwrap();
        let (_, p2) = rooms.join(&name("a"), 12, false).unwrap();
        assert_eq!((p0, p1, p2), (0, 1, 2));
        // Conn 10 leaves: 12 moves into position 0.
        let bob: Arc<str> = Arc::from("bob");
        assert_eq!(rooms.leave(r, p0, false, Some(&bob), 4), Some(12));
        assert_eq!(rooms.get(r).unwrap().members, vec![12, 11]);
        let mut seen = Vec::new();
        rooms.flush_presence(&mut |p| seen.push((p.room.to_string(), p.members, p.json, p.left, p.left_users)));
        assert_eq!(seen, vec![("a".to_string(), 2, 1, 1, vec![bob.clone()])]);
        rooms.flush_presence(&mut |_| panic!("nothing changed"));
        assert_eq!(rooms.leave(r, 1, true, None, 4), None);
        assert_eq!(rooms.leave(r, 0, false, None, 4), None);
        rooms.flush_presence(&mut |p| assert_eq!((p.members, p.left, p.left_users.len()), (0, 0, 0)));
        assert!(rooms.is_empty(), "an empty room is forgotten after reporting");
    }

    #[test]
    fn rooms_are_bounded() {
        let mut rooms = Rooms::new(1);
        rooms.join(&name("a"), 1, false).unwrap();
        assert_eq!(rooms.join(&name("b"), 2, false), Err(RoomsFull));
        assert!(rooms.join(&name("a"), 3, false).is_ok());
    }

    #[test]
    fn users_track_connections() {
        let mut users = Users::default();
        let u = users.add("alice", 1, 0);
        assert_eq!(users.add("alice", 2, 5), u);
        assert_eq!(users.level(u), 5);
        assert_eq!(users.conns("alice"), &[1, 2]);
        users.remove(u, 1);
        assert_eq!(users.conns("alice"), &[2]);
        users.remove(u, 2);
        assert!(users.is_empty());
        assert_eq!(users.conns("alice"), &[] as &[u32]);
    }
}
