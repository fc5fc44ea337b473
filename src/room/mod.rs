//! Rooms: their names, which shard owns each one, and the owner's state machines (the mixer that
//! turns pending messages into blocks, the moderation lists, and the table of owned rooms).
#![forbid(unsafe_code)]

pub mod attrs;
pub mod durable;
pub mod frames;
pub mod history;
pub mod limit;
pub mod mixer;
pub mod moderation;
pub mod owner;
pub mod priority;

pub use priority::Priority;

use std::fmt;
use std::sync::Arc;

use crate::ids::ShardId;

/// A validated room name: 1..=max bytes of `[A-Za-z0-9_.:@-]`. Cheap to clone across shards.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomName(Arc<str>);

/// Why a room name was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameError {
    Empty,
    TooLong,
    Character,
}

impl NameError {
    /// Human text for errors on the wire and in the API.
    pub fn message(self) -> &'static str {
        match self {
            NameError::Empty => "room name is empty",
            NameError::TooLong => "room name is too long",
            NameError::Character => "room name may only hold A-Z a-z 0-9 _ . : @ -",
        }
    }
}

impl RoomName {
    /// Parses a room name from a client or the API.
    pub fn parse(s: &str, bytes_max: usize) -> Result<RoomName, NameError> {
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        if s.len() > bytes_max {
            return Err(NameError::TooLong);
        }
        let ok = s.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.:@-".contains(&b));
        if !ok {
            return Err(NameError::Character);
        }
        Ok(RoomName(Arc::from(s)))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The shard that owns this room: a stable hash (FNV-1a) of the name, so every shard and
    /// the API agree without asking anyone.
    pub fn owner(&self, shards: usize) -> ShardId {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self.0.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        let n = shards.max(1) as u64;
        // Shard counts are capped at 256 by config validation, so this fits a u16.
        ShardId((h % n) as u16)
    }
}

impl fmt::Debug for RoomName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RoomName({:?})", &*self.0)
    }
}

impl fmt::Display for RoomName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        assert!(RoomName::parse("live:42_a.b@c-d", 64).is_ok());
        assert_eq!(RoomName::parse("", 64), Err(NameError::Empty));
        assert_eq!(RoomName::parse("abc", 2), Err(NameError::TooLong));
        assert_eq!(RoomName::parse("a b", 64), Err(NameError::Character));
        assert_eq!(RoomName::parse("ü", 64), Err(NameError::Character));
    }

    #[test]
    fn owners_are_stable_and_spread() {
        let mut seen = [0usize; 4];
        for i in 0..1000 {
            let r = RoomName::parse(&format!("room{i}"), 64).unwrap();
            assert_eq!(r.owner(4), r.clone().owner(4));
            seen[r.owner(4).index()] += 1;
        }
        assert!(seen.iter().all(|&n| n > 150), "{seen:?}");
        assert_eq!(RoomName::parse("x", 64).unwrap().owner(1), ShardId(0));
    }
}
