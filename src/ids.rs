//! Small identifiers shared by the shards, the mesh and the room owners.
#![forbid(unsafe_code)]

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
