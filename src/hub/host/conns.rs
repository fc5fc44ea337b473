//! The connection table: every connection of the shard by `ConnKey`, the generation that tells
//! a connection from an earlier one in the same slot, the ready list (connections with frames
//! and no send in flight, oldest first) and the list of connections ended and handed to the
//! driver to close. Keys come from the driver (which holds a connection from accept until
//! `release`) or from the shard's own indexes (which drop a connection when it ends), so a key
//! that names no connection is our bug and fails an assertion; a key from another shard's mail
//! comes as a `ConnId` and is looked up with `find`.

use std::collections::VecDeque;

use slab::Slab;

use super::Teardown;
use super::conn::{Conn, flag};
use crate::ids::{ConnId, ConnKey};

/// Every connection of one shard.
pub struct Conns {
    slab: Slab<Conn>,
    /// Generation of the next accepted connection: shard-wide, so a slot's next connection
    /// never has the generation of its last one until 2^32 accepts later.
    next_generation: u32,
    max: usize,
    /// Connections with frames to send, by id: one that ended after it was listed (and maybe
    /// whose slot holds a new connection) is skipped when its turn comes.
    ready: VecDeque<ConnId>,
    closing: Vec<(ConnKey, Teardown)>,
    /// Sends handed to the driver and not yet completed.
    sends_in_flight: usize,
    /// Connections past the WebSocket handshake.
    websockets: u64,
    sweep_cursor: usize,
}

impl Conns {
    /// A table of at most `max` connections.
    pub fn new(max: usize) -> Conns {
        Conns {
            slab: Slab::new(),
            next_generation: 0,
            max,
            ready: VecDeque::new(),
            closing: Vec::new(),
            sends_in_flight: 0,
            websockets: 0,
            sweep_cursor: 0,
        }
    }

    /// Adds a connection; None when the table is full.
    pub fn insert(&mut self, io: u64, deadline: u32) -> Option<ConnId> {
        if self.slab.len() >= self.max {
            return None;
        }
        let generation = self.next_generation;
        self.next_generation = generation.wrapping_add(1);
        let key = ConnKey(self.slab.insert(Conn::new(io, generation, deadline)) as u32);
        Some(ConnId { key, generation })
    }

    /// The connection at `key` (which must hold one).
    pub fn get(&self, key: ConnKey) -> &Conn {
        match self.slab.get(key.index()) {
            Some(c) => c,
            None => panic!("{key:?} names no connection"),
        }
    }

    pub fn get_mut(&mut self, key: ConnKey) -> &mut Conn {
        match self.slab.get_mut(key.index()) {
            Some(c) => c,
            None => panic!("{key:?} names no connection"),
        }
    }

    /// Whether a slot holds a connection (walks over every slot).
    pub fn contains(&self, key: ConnKey) -> bool {
        self.slab.contains(key.index())
    }

    /// The key of a connection named in mail, if it is still the same connection.
    pub fn find(&self, id: ConnId) -> Option<ConnKey> {
        self.slab.get(id.key.index()).is_some_and(|c| c.generation == id.generation).then_some(id.key)
    }

    /// The id naming this connection across shards.
    pub fn id(&self, key: ConnKey) -> ConnId {
        ConnId { key, generation: self.get(key).generation }
    }

    /// Forgets a connection the driver has released.
    pub fn remove(&mut self, key: ConnKey) -> Conn {
        assert!(self.slab.contains(key.index()), "{key:?} released twice");
        self.slab.remove(key.index())
    }

    /// Lists a connection as having frames to send, unless it is listed or its send is out.
    pub fn mark_ready(&mut self, key: ConnKey) {
        let conn = self.get_mut(key);
        if !conn.has(flag::READY) && !conn.queue.in_flight() {
            conn.flags |= flag::READY;
            let generation = conn.generation;
            self.ready.push_back(ConnId { key, generation });
        }
    }

    /// The next connection with frames to send and no send in flight.
    pub fn pop_ready(&mut self) -> Option<ConnKey> {
        while let Some(id) = self.ready.pop_front() {
            match self.slab.get_mut(id.key.index()) {
                Some(conn) if conn.generation == id.generation && conn.has(flag::READY) => {
                    conn.flags &= !flag::READY;
                    return Some(id.key);
                }
                // Released after it was listed (its slot empty, or a newer connection's).
                _ => continue,
            }
        }
        None
    }

    pub fn ready_len(&self) -> usize {
        self.ready.len()
    }

    /// Hands an ended connection to the driver, to be closed as `how` says.
    pub fn push_closing(&mut self, key: ConnKey, how: Teardown) {
        self.closing.push((key, how));
    }

    pub fn pop_closing(&mut self) -> Option<(ConnKey, Teardown)> {
        self.closing.pop()
    }

    pub fn send_started(&mut self) {
        self.sends_in_flight += 1;
    }

    pub fn send_ended(&mut self) {
        assert!(self.sends_in_flight > 0, "a send completed that was never started");
        self.sends_in_flight -= 1;
    }

    pub fn sends_in_flight(&self) -> usize {
        self.sends_in_flight
    }

    pub fn opened(&mut self) {
        self.websockets += 1;
    }

    pub fn closed_websocket(&mut self) {
        self.websockets -= 1;
    }

    pub fn websockets(&self) -> u64 {
        self.websockets
    }

    /// Connections of any state.
    pub fn len(&self) -> usize {
        self.slab.len()
    }

    /// Keys of every slot, vacant or not (the broadcast walk).
    pub fn all_keys(&self) -> impl Iterator<Item = ConnKey> + use<> {
        (0..self.slab.capacity() as u32).map(ConnKey)
    }

    /// The keys of the next of `slices` slices of the table, in turn (vacant ones included).
    pub fn sweep_slice(&mut self, slices: usize) -> impl Iterator<Item = ConnKey> + use<> {
        let cap = self.slab.capacity().max(1);
        let start = self.sweep_cursor.min(cap);
        let end = (start + cap.div_ceil(slices)).min(cap);
        self.sweep_cursor = if end >= cap { 0 } else { end };
        (start as u32..end as u32).map(ConnKey)
    }

    /// The connection at a key if one is there (walks over slots).
    pub fn try_get(&self, key: ConnKey) -> Option<&Conn> {
        self.slab.get(key.index())
    }

    /// Keys of every slot from `start` on (vacant ones included).
    pub fn keys_from(&self, start: u32) -> impl Iterator<Item = ConnKey> + use<> {
        (start..(self.slab.capacity() as u32).max(start)).map(ConnKey)
    }

    /// Every connection's key.
    pub fn keys(&self) -> Vec<ConnKey> {
        self.slab.iter().map(|(k, _)| ConnKey(k as u32)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reused_slot_is_a_new_generation() {
        let mut t = Conns::new(4);
        let a = t.insert(7, 0).unwrap();
        assert_eq!(t.find(a), Some(a.key));
        t.remove(a.key);
        assert_eq!(t.find(a), None, "gone");
        let b = t.insert(8, 0).unwrap();
        assert_eq!(b.key, a.key, "the slab hands the freed slot out first");
        assert_ne!(b.generation, a.generation);
        assert_eq!(t.find(a), None, "an answer for the old connection does not reach the new one");
        assert_eq!(t.find(b), Some(b.key));
    }

    #[test]
    fn the_table_is_bounded_and_the_ready_list_holds_each_connection_once() {
        let mut t = Conns::new(2);
        let a = t.insert(1, 0).unwrap().key;
        t.insert(2, 0).unwrap();
        assert!(t.insert(3, 0).is_none());
        t.mark_ready(a);
        t.mark_ready(a);
        assert_eq!((t.pop_ready(), t.pop_ready()), (Some(a), None));
    }

    #[test]
    fn a_connection_released_while_listed_is_skipped_even_if_its_slot_is_taken() {
        let mut t = Conns::new(4);
        let a = t.insert(1, 0).unwrap().key;
        t.mark_ready(a);
        t.remove(a);
        let b = t.insert(2, 0).unwrap().key;
        assert_eq!(b, a, "the same slot");
        assert_eq!(t.pop_ready(), None, "the old listing is not the new connection's");
        t.mark_ready(b);
        assert_eq!((t.pop_ready(), t.pop_ready()), (Some(b), None));
    }

    #[test]
    #[should_panic(expected = "released twice")]
    fn releasing_twice_is_a_bug() {
        let mut t = Conns::new(2);
        let a = t.insert(1, 0).unwrap().key;
        t.remove(a);
        t.remove(a);
    }
}
