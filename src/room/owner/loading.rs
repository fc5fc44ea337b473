//! Rooms kept in durable storage (`durable` owners): a room not in memory is loaded before it
//! is used — the desk parks the requests for it meanwhile — and every change is handed out as
//! a `StoreOp` for the store's threads to write. Sans-IO: the load is asked for and answered
//! by the caller.

use super::handover::{Continue, restore};
use super::{Owner, RoomName};
use crate::ids::Now;
use crate::proto::RoomState;
use crate::room::durable::StoreOp;

/// Where a room is, for a durable owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Not in memory: load it before use.
    Absent,
    Loading,
    Ready,
}

/// How a load ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loaded {
    /// Storage had state for the room; it goes on from there.
    Found,
    /// Storage had nothing: a new room.
    Empty,
    /// Storage did not answer (down, slow, over its bounds): the room goes on from memory.
    Failed,
}

impl Owner {
    /// Whether the room is in memory and usable.
    pub fn phase(&self, room: &RoomName) -> Phase {
        match self.rooms.get(room) {
            None => Phase::Absent,
            Some(r) if r.loading.is_some() => Phase::Loading,
            Some(_) => Phase::Ready,
        }
    }

    /// Since when (ms) the room has been loading.
    pub fn loading_since(&self, room: &RoomName) -> Option<u64> {
        self.rooms.get(room).and_then(|r| r.loading)
    }

    /// Rooms being loaded now.
    pub fn loads(&self) -> usize {
        self.loading
    }

    /// Creates the room as loading (nothing is cut until `loaded`); the caller asks storage.
    pub fn start_loading(&mut self, room: &RoomName, now: Now) {
        if self.rooms.contains_key(room) {
            return;
        }
        let r = Self::room_mut(&mut self.rooms, &self.config, room, now);
        r.loading = Some(now.ms);
        self.loading += 1;
    }

    /// Storage answered for `room` (None: it could not). The room takes the stored state, its
    /// seqs going on after both the stored ones and its own start.
    pub fn loaded(&mut self, room: &RoomName, state: Option<RoomState>, now: Now) -> Loaded {
        let Some(r) = self.rooms.get_mut(room) else { return Loaded::Failed };
        if r.loading.take().is_none() {
            return Loaded::Failed;
        }
        self.loading -= 1;
        match state {
            None => Loaded::Failed,
            Some(s) if s.last_seq == 0 && s.attrs.is_empty() && s.moderation.is_empty() => Loaded::Empty,
            Some(s) => {
                let kept = s.kept;
                restore(r, &self.config, s, Continue::After, now);
                if kept && !r.kept && self.kept < self.config.rooms_max {
                    r.kept = true;
                    self.kept += 1;
                }
                Loaded::Found
            }
        }
    }

    /// Drops a loaded room that turned out to hold nothing and has no members (it was loaded
    /// for a poll or a request that changed nothing): storage stays the place to ask.
    pub fn drop_if_unused(&mut self, room: &RoomName) {
        if self.rooms.get(room).is_some_and(|r| r.loading.is_none() && r.unused() && r.history.is_empty()) {
            self.rooms.remove(room);
        }
    }

    /// Rooms whose load started at or before `before_ms` (given up on by the caller).
    pub fn loads_started_before(&self, before_ms: u64) -> Vec<RoomName> {
        self.rooms.iter().filter(|(_, r)| r.loading.is_some_and(|t| t <= before_ms)).map(|(n, _)| n.clone()).collect()
    }

    /// Forgets a room at once, whatever it holds (in a cluster: another node runs it now).
    /// Returns whether it was here.
    pub fn remove(&mut self, room: &RoomName) -> bool {
        let Some(r) = self.rooms.remove(room) else { return false };
        self.kept -= usize::from(r.kept);
        self.loading -= usize::from(r.loading.is_some());
        true
    }

    /// Rooms in memory, loading or not.
    pub fn room_names(&self) -> Vec<RoomName> {
        self.rooms.keys().cloned().collect()
    }

    /// Moves the writes gathered since the last call to `out`.
    pub fn take_store_ops(&mut self, out: &mut Vec<StoreOp>) {
        out.append(&mut self.store_ops);
    }
}
