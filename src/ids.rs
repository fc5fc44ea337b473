//! Small identifiers shared by the shards, the mesh and the room owners.
#![forbid(unsafe_code)]

use std::borrow::Borrow;
use std::fmt;
use std::sync::Arc;

/// A shard: one thread, one core, its own rings, connections and rooms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardId(pub u16);

impl ShardId {
    /// Index into per-shard tables.
    #[inline]
    pub fn index(self) -> usize {
        usize::from(self.0)
    }
}

/// A connection's place in its shard's connection table. Valid while the shard's driver holds
/// the connection (from accept until `release`): inside one shard, and between the hub and its
/// driver. Across shards a connection is named by a [`ConnId`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnKey(pub u32);

impl ConnKey {
    /// Index into the table.
    #[inline]
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// A connection named across a boundary (mail between shards, answers from owners): its key and
/// the generation it was accepted in. Keys are reused as soon as a connection is released, so a
/// late answer names its generation, and one for an older generation is dropped (and counted),
/// never given to the connection that took the slot since.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnId {
    pub key: ConnKey,
    pub generation: u32,
}

/// A signed-in user's id (the token's `sub`). Cheap to clone across shards.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(Arc<str>);

impl UserId {
    pub fn new(id: &str) -> UserId {
        UserId(Arc::from(id))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for UserId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UserId({:?})", &*self.0)
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Unix time in milliseconds, as carried in messages (`created_ms`, `server_ms`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct UnixMs(pub i64);

/// The time as a shard read it at the start of a loop turn.
#[derive(Clone, Copy, Debug)]
pub struct Now {
    /// Monotonic milliseconds since the shard started (for rates and deadlines).
    pub ms: u64,
    /// Wall clock (for timestamps, expiry and moderation deadlines).
    pub unix: UnixMs,
}

impl Now {
    /// 100 ms ticks since start, plus one so that 0 can mean "no deadline".
    pub fn tick(self) -> u32 {
        (self.ms / 100) as u32 + 1
    }

    /// The tick `ms` milliseconds from now.
    pub fn tick_after(self, ms: u64) -> u32 {
        self.tick().saturating_add(ms.div_ceil(100) as u32)
    }
}
