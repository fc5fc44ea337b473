//! The shard's partial-input budget: memory held for input that is not complete yet — request
//! heads that came in pieces (kept here, by connection) and the spill boxes and message buffers
//! of the connections' readers — counted as allocated capacity, not bytes used, against a cap
//! per connection (`server.partial_bytes_conn_max`) and one per shard
//! (`server.partial_bytes_max`). When the shard's budget is full, the connection holding the
//! most is the one that goes (see `largest`), not whoever needed room last: a few connections
//! parking unfinished frames cannot lock every newcomer out.

use std::collections::HashMap;

use crate::ids::ConnKey;

/// Partial request heads and the memory each connection holds for partial input.
pub struct Intake {
    /// Partial upgrade requests (rare: most arrive in one segment).
    heads: HashMap<ConnKey, Vec<u8>>,
    /// Bytes held per connection with partial input (a head's capacity, or its reader's).
    held: HashMap<ConnKey, usize>,
    /// Their sum.
    bytes: usize,
    bytes_max: usize,
    conn_max: usize,
}

/// Where a connection's holding leaves the budgets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Budget {
    Within,
    /// The connection holds more than the per-connection cap.
    ConnOver,
    /// The shard's budget is exceeded: someone must go.
    ShardFull,
}

impl Intake {
    pub fn new(bytes_max: usize, conn_max: usize) -> Intake {
        Intake { heads: HashMap::new(), held: HashMap::new(), bytes: 0, bytes_max, conn_max }
    }

    /// Bytes held now (a gauge).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Records that `key` now holds `bytes` for partial input (0: none) and says where that
    /// leaves the budgets. The holding is recorded even when over: the caller frees it (by
    /// closing someone) and asks `over` again.
    pub fn hold(&mut self, key: ConnKey, bytes: usize) -> Budget {
        let before = if bytes == 0 { self.held.remove(&key) } else { self.held.insert(key, bytes) };
        self.bytes = self.bytes - before.unwrap_or(0) + bytes;
        if bytes > self.conn_max {
            Budget::ConnOver
        } else if bytes > before.unwrap_or(0) && self.over() {
            Budget::ShardFull
        } else {
            Budget::Within
        }
    }

    /// Whether the shard's budget is exceeded.
    pub fn over(&self) -> bool {
        self.bytes > self.bytes_max
    }

    /// The connection holding the most (the oldest holder among equals is not tracked: the
    /// most is what frees the budget fastest).
    pub fn largest(&self) -> Option<ConnKey> {
        self.held.iter().max_by_key(|&(&k, &b)| (b, std::cmp::Reverse(k))).map(|(&k, _)| k)
    }

    /// Forgets everything `key` holds (its head too).
    pub fn release(&mut self, key: ConnKey) {
        self.heads.remove(&key);
        self.hold(key, 0);
    }

    /// Removes a connection's partial request head, releasing what it held.
    pub fn take_head(&mut self, key: ConnKey) -> Option<Vec<u8>> {
        let head = self.heads.remove(&key)?;
        self.hold(key, 0);
        Some(head)
    }

    /// Keeps a partial request head and says where that leaves the budgets.
    pub fn stash_head(&mut self, key: ConnKey, head: Vec<u8>) -> Budget {
        let budget = self.hold(key, head.capacity());
        let old = self.heads.insert(key, head);
        assert!(old.is_none(), "{key:?} stashed a head over one not taken");
        budget
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_and_readers_share_one_budget_and_the_largest_holder_is_named() {
        let mut intake = Intake::new(100, 60);
        assert_eq!(intake.stash_head(ConnKey(1), Vec::with_capacity(30)), Budget::Within);
        assert_eq!(intake.hold(ConnKey(2), 50), Budget::Within);
        assert_eq!(intake.hold(ConnKey(3), 21), Budget::ShardFull, "30 + 50 + 21 > 100");
        assert_eq!(intake.largest(), Some(ConnKey(2)), "the biggest holder goes, not the newcomer");
        intake.release(ConnKey(2));
        assert!(!intake.over());
        assert_eq!(intake.hold(ConnKey(3), 61), Budget::ConnOver, "over the per-connection cap");
        assert_eq!(intake.hold(ConnKey(3), 10), Budget::Within, "shrinking is always fine");
        assert_eq!(intake.take_head(ConnKey(1)).map(|h| h.capacity() >= 30), Some(true));
        intake.release(ConnKey(3));
        assert_eq!((intake.bytes(), intake.largest()), (0, None));
    }
}
