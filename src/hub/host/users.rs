//! The shard's local user index: user → the shard's connections of that user (for direct
//! messages, kicks and the chat weight of the user's level).

use std::collections::HashMap;
use std::sync::Arc;

use slab::Slab;

use super::grants::Grants;
use crate::ids::{ConnKey, UserId};

/// A user in the local index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UserKey(u32);

impl UserKey {
    /// Not signed in.
    pub const NONE: UserKey = UserKey(u32::MAX);
}

struct User {
    id: UserId,
    conns: Vec<ConnKey>,
    /// The `level` claim of the latest token: weight of the user's chat.
    level: i32,
    /// The latest token's grants (types it may send, rooms its rights reach).
    grants: Arc<Grants>,
}

/// Signed-in users with connections on this shard.
#[derive(Default)]
pub struct Users {
    slab: Slab<User>,
    by_id: HashMap<UserId, UserKey>,
}

impl Users {
    /// Records a connection of `id` (its token's level and grants win from now on); returns
    /// the key.
    pub fn add(&mut self, id: &UserId, conn: ConnKey, level: i32, grants: Arc<Grants>) -> UserKey {
        let key = match self.by_id.get(id) {
            Some(&k) => k,
            None => {
                let user = User { id: id.clone(), conns: Vec::new(), level, grants: Arc::clone(&grants) };
                let k = UserKey(self.slab.insert(user) as u32);
                self.by_id.insert(id.clone(), k);
                k
            }
        };
        let user = &mut self.slab[key.0 as usize];
        user.conns.push(conn);
        self.update(key, level, grants);
        key
    }

    /// A newer token of the user (a refresh): its level and grants win from now on.
    pub fn update(&mut self, user: UserKey, level: i32, grants: Arc<Grants>) {
        let u = &mut self.slab[user.0 as usize];
        u.level = level;
        u.grants = grants;
    }

    /// The user's grants (None for `UserKey::NONE`).
    pub fn grants(&self, user: UserKey) -> Option<&Grants> {
        self.slab.get(user.0 as usize).map(|u| &*u.grants)
    }

    /// The user's level (0 for `UserKey::NONE`).
    pub fn level(&self, user: UserKey) -> i32 {
        self.slab.get(user.0 as usize).map_or(0, |u| u.level)
    }

    /// Forgets one connection of a user (and the user with its last connection).
    pub fn remove(&mut self, user: UserKey, conn: ConnKey) {
        let u = &mut self.slab[user.0 as usize];
        let before = u.conns.len();
        u.conns.retain(|&c| c != conn);
        assert_eq!(u.conns.len() + 1, before, "{conn:?} was not listed under {:?}", u.id);
        if u.conns.is_empty() {
            let u = self.slab.remove(user.0 as usize);
            self.by_id.remove(&u.id);
        }
    }

    /// The user's id; None for `UserKey::NONE`.
    pub fn id(&self, user: UserKey) -> Option<&UserId> {
        self.slab.get(user.0 as usize).map(|u| &u.id)
    }

    /// The user's connections on this shard.
    pub fn conns(&self, id: &str) -> &[ConnKey] {
        match self.by_id.get(id) {
            Some(&k) => &self.slab[k.0 as usize].conns,
            None => &[],
        }
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.slab.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_track_connections() {
        let mut users = Users::default();
        let alice = UserId::new("alice");
        let u = users.add(&alice, ConnKey(1), 0, Arc::default());
        assert_eq!(users.add(&alice, ConnKey(2), 5, Arc::default()), u);
        assert_eq!(users.level(u), 5);
        assert_eq!(users.conns("alice"), &[ConnKey(1), ConnKey(2)]);
        users.remove(u, ConnKey(1));
        assert_eq!(users.conns("alice"), &[ConnKey(2)]);
        users.remove(u, ConnKey(2));
        assert!(users.is_empty());
        assert_eq!(users.conns("alice"), &[] as &[ConnKey]);
        assert_eq!(users.level(UserKey::NONE), 0);
    }
}
