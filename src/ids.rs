//! Small identifiers shared by the shards, the mesh and the room owners.

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

/// Unix time in milliseconds, as carried in messages (`created_ms`, `server_ms`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct UnixMs(pub i64);
