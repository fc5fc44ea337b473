//! The last messages of a room, kept by its owner after each cut block: the backfill block for a
//! joining client (`recent`) and the pages of short polling (`after`: messages after a seq
//! cursor). Sans-IO: the owner calls `push` with every cut block and answers polls from here.

use std::collections::VecDeque;

use crate::proto::Message;

/// One room's recent messages in seq order.
///
/// Memory: at most `capacity` messages (the deque's slots round up to a power of two), each a
/// `Message` (about 160 B) plus its strings and data, bounded by the publish size limits.
#[derive(Debug)]
pub struct History {
    capacity: usize,
    kept: VecDeque<Message>,
    /// The largest seq ever evicted (0 = none): a cursor below it has missed messages.
    evicted_seq: u64,
}

/// One short-poll answer.
#[derive(Debug)]
pub struct Page<'a> {
    /// Messages with seq > the cursor, oldest first.
    pub messages: Vec<&'a Message>,
    /// The cursor for the next poll: the last seq returned, or the cursor itself when none.
    pub next: u64,
    /// Messages after the cursor were evicted before this poll could see them.
    pub truncated: bool,
}

impl History {
    /// Keeps at most `capacity` messages; 0 keeps nothing (every poll with an old cursor is then
    /// `truncated`).
    pub fn new(capacity: usize) -> Self {
        History { capacity, kept: VecDeque::new(), evicted_seq: 0 }
    }

    /// Appends a cut block's messages (seqs increasing and above everything kept), evicting the
    /// oldest beyond capacity.
    pub fn push(&mut self, block: impl IntoIterator<Item = Message>) {
        for msg in block {
            let last = self.kept.back().map_or(self.evicted_seq, |m| m.seq);
            // Seqs come from the room's own mixer, never from a peer: out of order is our bug,
            // and the binary search in `after` depends on the order.
            assert!(msg.seq > last, "history seq {} after {}", msg.seq, last);
            if self.capacity == 0 {
                self.evicted_seq = msg.seq;
                continue;
            }
            if self.kept.len() == self.capacity {
                self.evict_oldest();
            }
            self.kept.push_back(msg);
        }
    }

    /// A history handed over by another process (`room::owner::handover`): `messages` in seq
    /// order (the oldest beyond `capacity` are evicted), `evicted_seq` as it was there. Messages
    /// out of order, or not above `evicted_seq`, are skipped: a snapshot is input.
    pub fn restore(capacity: usize, messages: Vec<Message>, evicted_seq: u64) -> History {
        let mut h = History::new(capacity);
        h.evicted_seq = evicted_seq;
        for msg in messages {
            let last = h.kept.back().map_or(h.evicted_seq, |m| m.seq);
            if msg.seq > last {
                h.push([msg]);
            }
        }
        h
    }

    /// The largest seq ever evicted (0 = none).
    pub fn evicted_seq(&self) -> u64 {
        self.evicted_seq
    }

    /// Messages kept.
    pub fn len(&self) -> usize {
        self.kept.len()
    }

    pub fn is_empty(&self) -> bool {
        self.kept.is_empty()
    }

    /// Kept messages, oldest first (for a joining client's backfill block).
    pub fn recent(&self) -> impl Iterator<Item = &Message> {
        self.kept.iter()
    }

    /// Short polling: up to `limit` messages with seq > `after`, oldest first. `last_seq` is the
    /// room's last assigned seq and `base_seq` the one before its first (the room's seqs start
    /// after it). `next` = seq of the last message returned, or `after` when none. `truncated` =
    /// messages after the cursor may be missing: some were evicted before this poll could see
    /// them, or the cursor (not 0, which asks from the start) comes from before this room's
    /// first seq or after its last one — an earlier incarnation of the room, before it was
    /// forgotten or the node restarted, or another node.
    pub fn after(&self, after: u64, limit: usize, last_seq: u64, base_seq: u64) -> Page<'_> {
        if after > last_seq {
            return Page { messages: Vec::new(), next: after, truncated: true };
        }
        let start = self.kept.partition_point(|m| m.seq <= after);
        let messages: Vec<&Message> = self.kept.range(start..).take(limit).collect();
        let next = messages.last().map_or(after, |m| m.seq);
        let stale = after != 0 && after < base_seq;
        Page { messages, next, truncated: after < self.evicted_seq || stale }
    }

    fn evict_oldest(&mut self) {
        if let Some(old) = self.kept.pop_front() {
            self.evicted_seq = old.seq;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const BASE: u64 = 5 << 20;

    /// A block of `n` messages with seqs after `last`.
    fn block(last: u64, n: u64) -> Vec<Message> {
        (last + 1..=last + n).map(|seq| Message { seq, id: seq * 10, ..Message::default() }).collect()
    }

    fn seqs(page: &Page<'_>) -> Vec<u64> {
        page.messages.iter().map(|m| m.seq - BASE).collect()
    }

    #[test]
    fn empty_history() {
        let h = History::new(4);
        assert!(h.is_empty());
        let p = h.after(0, 10, BASE, BASE);
        assert!(p.messages.is_empty());
        assert_eq!((p.next, p.truncated), (0, false));
        let p = h.after(BASE, 10, BASE, BASE);
        assert_eq!((p.next, p.truncated), (BASE, false));
        let p = h.after(BASE + 1, 10, BASE, BASE);
        assert_eq!((p.next, p.truncated), (BASE + 1, true), "a cursor past the last seq: another incarnation");
    }

    #[test]
    fn cursors_before_inside_at_end_and_future() {
        let mut h = History::new(4);
        h.push(block(BASE, 3));
        let p = h.after(0, 10, BASE + 3, BASE);
        assert_eq!((seqs(&p), p.truncated), (vec![1, 2, 3], false), "before the first message, nothing evicted");
        assert_eq!(p.next, BASE + 3);
        let p = h.after(BASE + 1, 10, BASE + 3, BASE);
        assert_eq!((seqs(&p), p.next, p.truncated), (vec![2, 3], BASE + 3, false));
        let p = h.after(BASE + 3, 10, BASE + 3, BASE);
        assert_eq!((seqs(&p), p.next, p.truncated), (vec![], BASE + 3, false));
        let p = h.after(BASE + 4, 10, BASE + 3, BASE);
        assert!(p.messages.is_empty() && p.truncated && p.next == BASE + 4);
        let p = h.after(BASE - 7, 10, BASE + 3, BASE);
        assert_eq!((seqs(&p), p.truncated), (vec![1, 2, 3], true), "a cursor from before this room's first seq");

        h.push(block(BASE + 3, 3)); // evicts 1 and 2
        assert_eq!(h.len(), 4);
        assert_eq!(h.recent().map(|m| m.seq - BASE).collect::<Vec<_>>(), vec![3, 4, 5, 6]);
        let p = h.after(0, 10, BASE + 6, BASE);
        assert_eq!((seqs(&p), p.truncated), (vec![3, 4, 5, 6], true));
        let p = h.after(BASE + 1, 10, BASE + 6, BASE);
        assert!(p.truncated, "message 2 is gone");
        let p = h.after(BASE + 2, 10, BASE + 6, BASE);
        assert_eq!((seqs(&p), p.truncated), (vec![3, 4, 5, 6], false), "nothing after 2 was lost");
    }

    #[test]
    fn limit_and_walking_with_next() {
        let mut h = History::new(10);
        h.push(block(BASE, 4));
        h.push(block(BASE + 4, 3));
        let p = h.after(BASE, 3, BASE + 7, BASE);
        assert_eq!((seqs(&p), p.next), (vec![1, 2, 3], BASE + 3));
        let p = h.after(BASE, 0, BASE + 7, BASE);
        assert_eq!((seqs(&p), p.next), (vec![], BASE));
        let mut cursor = 0;
        let mut seen = Vec::new();
        loop {
            let p = h.after(cursor, 2, BASE + 7, BASE);
            if p.messages.is_empty() {
                break;
            }
            seen.extend(seqs(&p));
            cursor = p.next;
        }
        assert_eq!(seen, vec![1, 2, 3, 4, 5, 6, 7]);
    }

    #[test]
    fn zero_capacity_keeps_nothing_but_knows_what_was_lost() {
        let mut h = History::new(0);
        h.push(block(BASE, 3));
        assert!(h.is_empty());
        let p = h.after(BASE, 10, BASE + 3, BASE);
        assert!(p.messages.is_empty() && p.truncated);
        assert!(!h.after(BASE + 3, 10, BASE + 3, BASE).truncated);
    }

    #[test]
    #[should_panic(expected = "history seq")]
    fn out_of_order_seqs_are_a_bug() {
        let mut h = History::new(4);
        h.push(block(BASE, 2));
        h.push(block(BASE, 1));
    }

    proptest! {
        /// Random blocks and cursors: a page holds exactly the kept messages after the cursor (up
        /// to the limit), `truncated` says exactly whether one after the cursor was evicted, and a
        /// walking client sees every message after its start that was kept, once, in order.
        #[test]
        fn pages_match_a_model(
            capacity in 0usize..12,
            blocks in prop::collection::vec(0u64..6, 0..20),
            polls in prop::collection::vec((0u64..80, 1usize..8), 1..20),
        ) {
            let mut h = History::new(capacity);
            let mut all: Vec<u64> = Vec::new();
            let mut last = BASE;
            for n in blocks {
                h.push(block(last, n));
                all.extend(last + 1..=last + n);
                last += n;
            }
            let kept: Vec<u64> = all[all.len().saturating_sub(capacity)..].to_vec();
            prop_assert_eq!(h.recent().map(|m| m.seq).collect::<Vec<_>>(), kept.clone());
            for (offset, limit) in polls {
                // Cursors from 0, around the base, and past the last seq.
                let after = if offset == 0 { 0 } else { BASE + offset - 1 };
                let p = h.after(after, limit, last, BASE);
                if after > last {
                    prop_assert!(p.messages.is_empty() && p.truncated && p.next == after);
                    continue;
                }
                let want: Vec<u64> = kept.iter().copied().filter(|&s| s > after).take(limit).collect();
                prop_assert_eq!(p.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), want.clone());
                prop_assert_eq!(p.next, want.last().copied().unwrap_or(after));
                let lost = all.iter().any(|&s| s > after && !kept.contains(&s));
                prop_assert_eq!(p.truncated, lost);
                // Walk from here with `next`.
                let (mut cursor, mut seen) = (after, Vec::new());
                loop {
                    let p = h.after(cursor, limit, last, BASE);
                    if p.messages.is_empty() { break; }
                    seen.extend(p.messages.iter().map(|m| m.seq));
                    cursor = p.next;
                }
                let rest: Vec<u64> = kept.iter().copied().filter(|&s| s > after).collect();
                prop_assert_eq!(seen, rest);
            }
        }
    }
}
