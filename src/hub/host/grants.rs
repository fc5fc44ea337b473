//! What a signed-in user may do beyond watching, from its token: which message types it may
//! `send` (the configured client types, plus the token's `types` grant, never a system type)
//! and in which rooms its `admin` and `attrs` rights apply (the token's `rooms` claim).

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::auth::Claims;
use crate::config::{Config, TypeDefaults};
use crate::room::Priority;

/// A user's grants, from its latest token (shared by its connections on this shard).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Grants {
    /// Types this user may send beyond the client types.
    pub types: Vec<String>,
    /// Rooms where its admin and attribute rights apply (`"*"`: all).
    pub rooms: Vec<String>,
}

impl Grants {
    pub fn from_claims(c: &Claims) -> Arc<Grants> {
        Arc::new(Grants { types: c.types.clone(), rooms: c.rooms.clone() })
    }

    /// Whether admin and attribute rights reach `room`.
    pub fn rights_in(&self, room: &str) -> bool {
        Claims::rights_in(&self.rooms, room)
    }
}

/// Which types clients may send, at what priority.
#[derive(Debug)]
pub struct ClientTypes {
    /// Sendable by every signed-in user that may send.
    allowed: BTreeMap<String, Priority>,
    /// Every type's defaults (a granted type sends at its default, capped at high).
    types: Arc<BTreeMap<String, TypeDefaults>>,
}

impl ClientTypes {
    pub fn new(c: &Config) -> ClientTypes {
        ClientTypes { allowed: c.client_types.clone(), types: Arc::new(c.types.clone()) }
    }

    /// The priority a client's `send` of `kind` rides, or None when it may not send it: a
    /// client type at its configured priority; a type its token grants at the type's default,
    /// never above high; never a system type (presence events, whitelist-by-default types).
    pub fn priority(&self, kind: &str, grants: Option<&Grants>) -> Option<Priority> {
        if let Some(&p) = self.allowed.get(kind) {
            return Some(p);
        }
        let defaults = self.types.get(kind).copied().unwrap_or_default();
        let system = crate::config::SYSTEM_TYPES.contains(&kind) || defaults.priority == Priority::Whitelist;
        let granted = grants.is_some_and(|g| g.types.iter().any(|t| t == kind));
        (granted && !system).then(|| defaults.priority.min(Priority::High))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_send_their_types_and_grants_never_system_ones() {
        let t = ClientTypes::new(&Config::default());
        assert_eq!(t.priority("chat", None), Some(Priority::Low));
        assert_eq!(t.priority("like", None), Some(Priority::Low));
        for forged in ["notice", "gift", "pk", "enter", "leave", "custom"] {
            assert_eq!(t.priority(forged, None), None, "{forged} without a grant");
        }
        let g = Grants { types: ["gift", "notice", "enter", "song"].map(String::from).to_vec(), rooms: Vec::new() };
        assert_eq!(t.priority("gift", Some(&g)), Some(Priority::High), "granted, at its default");
        assert_eq!(t.priority("song", Some(&g)), Some(Priority::Low), "an unknown type is low");
        assert_eq!(t.priority("notice", Some(&g)), None, "whitelist by default: system");
        assert_eq!(t.priority("enter", Some(&g)), None, "presence: system");
    }
}
