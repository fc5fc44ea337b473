//! The shard's partial-input budget: bytes held for input that is not complete yet — request
//! heads that came in pieces (kept here, by connection) and the frames and fragmented messages
//! the connections' readers hold — all counted against `server.partial_bytes_max`, so a
//! slowloris flood costs at most the budget, not connections × message_bytes_max.

use std::collections::HashMap;

use crate::ids::ConnKey;

/// Partial request heads and the bytes held for partial input.
pub struct Intake {
    /// Partial upgrade requests (rare: most arrive in one segment).
    heads: HashMap<ConnKey, Vec<u8>>,
    /// Bytes in `heads` and in readers' spill buffers.
    bytes: usize,
    bytes_max: usize,
}

impl Intake {
    pub fn new(bytes_max: usize) -> Intake {
        Intake { heads: HashMap::new(), bytes: 0, bytes_max }
    }

    /// Bytes held now (a gauge).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Removes a connection's partial request head, releasing its bytes from the budget.
    pub fn take_head(&mut self, key: ConnKey) -> Option<Vec<u8>> {
        let head = self.heads.remove(&key)?;
        self.bytes -= head.len();
        Some(head)
    }

    /// Keeps a partial request head if the budget allows; false (and nothing kept) if not.
    pub fn stash_head(&mut self, key: ConnKey, head: Vec<u8>) -> bool {
        if self.bytes + head.len() > self.bytes_max {
            return false;
        }
        self.bytes += head.len();
        let old = self.heads.insert(key, head);
        assert!(old.is_none(), "{key:?} stashed a head over one not taken");
        true
    }

    /// Accounts a reader's buffered bytes going from `before` to `after`; false when the budget
    /// is now exceeded by growth (shrinking is always within).
    pub fn account(&mut self, before: usize, after: usize) -> bool {
        assert!(self.bytes >= before, "the reader held more than was accounted");
        self.bytes = self.bytes - before + after;
        after <= before || self.bytes <= self.bytes_max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_and_readers_share_one_budget() {
        let mut intake = Intake::new(10);
        assert!(intake.stash_head(ConnKey(1), vec![0; 6]));
        assert!(!intake.stash_head(ConnKey(2), vec![0; 5]), "6 + 5 > 10");
        assert!(intake.account(0, 4));
        assert!(!intake.account(4, 5), "growth past the budget");
        assert!(intake.account(5, 0), "shrinking is always fine");
        assert_eq!(intake.take_head(ConnKey(1)).map(|h| h.len()), Some(6));
        assert_eq!(intake.bytes(), 0);
    }
}
