//! The room mixer: the owner pushes a room's incoming messages here, and at each block tick cuts
//! one block — ordered by priority (whitelist > high > low), then weight, then arrival — of at
//! most `block_messages_max` messages, each stamped with the room's next sequence number.
//! Whitelist messages that do not fit are carried to the next block; others are dropped and
//! counted. Corrections coalesce: a push whose non-empty `coalesce_key` matches a pending
//! message replaces it (`push` says `Pushed::Coalesced`: that is how the owner counts them).
//! A cut first drops expired non-whitelist messages (`Cut::dropped_expired`).
//! Sans-IO: no clocks, no sockets; call `push` as messages arrive and `cut(now_ms)` on a tick.

use std::collections::HashMap;

use super::Priority;
use crate::proto::Message;

/// Bounds of one room's mixer.
#[derive(Clone, Copy, Debug)]
pub struct MixerLimits {
    /// Messages in one block.
    pub block_messages_max: usize,
    /// Messages waiting for the next block (including carried whitelist ones). Costs per room
    /// the messages themselves plus one index entry (a copy of the key) per pending message
    /// that has a `coalesce_key`.
    pub pending_messages_max: usize,
}

/// Why a message was not accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The room's pending backlog is full.
    Backlog,
}

/// How a message was accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pushed {
    /// It joined the pending messages.
    Added,
    /// It replaced the pending message with the same `coalesce_key` (which is gone unsent) and
    /// took the newest arrival position; the backlog did not grow.
    Coalesced,
}

/// One cut block: its messages in send order, with consecutive seqs. It may hold no messages
/// when everything pending had expired: it then only reports the counts (do not send it).
#[derive(Debug, Default)]
pub struct Cut {
    pub messages: Vec<Message>,
    /// Non-whitelist messages that did not fit and were dropped.
    pub dropped_overflow: u64,
    /// Non-whitelist messages dropped before selection because their `ttl_ms` had passed.
    pub dropped_expired: u64,
    /// Whitelist messages that did not fit and wait for the next block.
    pub carried: usize,
    /// The highest priority among `messages` (the block's shedding class follows it).
    pub top: Priority,
}

impl Cut {
    /// Seq of the first message (0 for an empty cut).
    pub fn first_seq(&self) -> u64 {
        self.messages.first().map_or(0, |m| m.seq)
    }

    /// Seq of the last message (0 for an empty cut).
    pub fn last_seq(&self) -> u64 {
        self.messages.last().map_or(0, |m| m.seq)
    }
}

struct Pending {
    msg: Message,
    priority: Priority,
    /// Arrival order inside this room; breaks ties after priority and weight.
    arrival: u64,
}

/// One room's pending messages and sequence counter.
#[derive(Default)]
pub struct Mixer {
    /// Unordered between cuts (a cut sorts it); push appends, coalescing replaces in place, so
    /// positions stay valid until the next cut.
    pending: Vec<Pending>,
    /// Non-empty `coalesce_key` → position in `pending` of the one message holding it.
    /// Rebuilt after each cut (only carried whitelist messages remain then).
    keys: HashMap<String, usize>,
    arrivals: u64,
    last_seq: u64,
}

impl Mixer {
    /// A mixer whose first seq will be `last_seq + 1`.
    pub fn starting_after(last_seq: u64) -> Mixer {
        Mixer { last_seq, ..Mixer::default() }
    }

    /// Accepts a message for the next block in bucket `priority` (written to its wire field).
    /// Its `seq` is assigned at the cut. A message whose non-empty `coalesce_key` matches a
    /// pending one replaces it, whatever either's priority (the newest correction wins as it
    /// is), and is accepted even with a full backlog.
    pub fn push(&mut self, mut msg: Message, priority: Priority, limits: &MixerLimits) -> Result<Pushed, Refused> {
        msg.priority = priority.wire();
        let slot = if msg.coalesce_key.is_empty() {
            None
        } else {
            self.keys.get(msg.coalesce_key.as_str()).and_then(|&at| self.pending.get_mut(at))
        };
        if let Some(slot) = slot {
            debug_assert_eq!(slot.msg.coalesce_key, msg.coalesce_key);
            self.arrivals += 1;
            *slot = Pending { msg, priority, arrival: self.arrivals };
            return Ok(Pushed::Coalesced);
        }
        if self.pending.len() >= limits.pending_messages_max {
            return Err(Refused::Backlog);
        }
        if !msg.coalesce_key.is_empty() {
            self.keys.insert(msg.coalesce_key.clone(), self.pending.len());
        }
        self.arrivals += 1;
        self.pending.push(Pending { msg, priority, arrival: self.arrivals });
        Ok(Pushed::Added)
    }

    /// Whether a cut would produce anything.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Messages waiting.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// The ids of the messages waiting for a block.
    pub fn pending_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.pending.iter().map(|p| p.msg.id)
    }

    /// Moves the seq counter forward to at least `seq` (a room's stored state arrived while
    /// messages waited here: they are cut after it). Pending messages stay.
    pub fn continue_after(&mut self, seq: u64) {
        self.last_seq = self.last_seq.max(seq);
    }

    /// The last seq handed out (0 before the first block).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Cuts the next block at `now_ms` (Unix ms): drops expired messages, then selects.
    /// Returns None when nothing is pending; the cut may be empty if everything expired.
    /// `now_ms` may go backwards (clock steps): fewer messages expire, nothing else changes.
    pub fn cut(&mut self, now_ms: i64, limits: &MixerLimits) -> Option<Cut> {
        if self.pending.is_empty() {
            return None;
        }
        let mut cut = Cut::default();
        let before = self.pending.len();
        self.pending.retain(|p| !expired(p, now_ms));
        cut.dropped_expired = (before - self.pending.len()) as u64;
        self.pending
            .sort_unstable_by_key(|p| (std::cmp::Reverse(p.priority), std::cmp::Reverse(p.msg.weight), p.arrival));
        let take = self.pending.len().min(limits.block_messages_max);
        cut.messages.reserve_exact(take);
        for p in self.pending.drain(..take) {
            cut.top = cut.top.max(p.priority);
            self.last_seq += 1;
            let mut msg = p.msg;
            msg.seq = self.last_seq;
            cut.messages.push(msg);
        }
        // What did not fit: whitelist waits (still first in line next time), the rest goes.
        let before = self.pending.len();
        self.pending.retain(|p| p.priority == Priority::Whitelist);
        cut.carried = self.pending.len();
        cut.dropped_overflow = (before - cut.carried) as u64;
        self.reindex();
        Some(cut)
    }

    /// Points the key index at the pending messages' new positions.
    fn reindex(&mut self) {
        self.keys.clear();
        for (at, p) in self.pending.iter().enumerate() {
            if !p.msg.coalesce_key.is_empty() {
                self.keys.insert(p.msg.coalesce_key.clone(), at);
            }
        }
    }
}

/// Whether a pending message is past its time to live at `now_ms`. Whitelist messages never
/// expire; `ttl_ms == 0` means never; at exactly `created_ms + ttl_ms` it is still fresh.
fn expired(p: &Pending, now_ms: i64) -> bool {
    let m = &p.msg;
    p.priority != Priority::Whitelist && m.ttl_ms > 0 && m.created_ms.saturating_add(i64::from(m.ttl_ms)) < now_ms
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    const LIMITS: MixerLimits = MixerLimits { block_messages_max: 3, pending_messages_max: 10 };
    const NOW_MS: i64 = 1_000_000;

    fn msg(id: u64, p: Priority, weight: i32) -> Message {
        Message { id, priority: p.wire(), weight, ..Message::default() }
    }

    fn keyed(id: u64, p: Priority, key: &str) -> Message {
        Message { coalesce_key: key.into(), ..msg(id, p, 0) }
    }

    fn aged(id: u64, p: Priority, created_ms: i64, ttl_ms: u32) -> Message {
        Message { created_ms, ttl_ms, ..msg(id, p, 0) }
    }

    /// Pushes a test message in the bucket its wire field names.
    fn push(m: &mut Mixer, msg: Message, limits: &MixerLimits) -> Result<Pushed, Refused> {
        let p = Priority::from_wire(msg.priority).expect("tests build valid priorities");
        m.push(msg, p, limits)
    }

    fn ids(cut: &Cut) -> Vec<u64> {
        cut.messages.iter().map(|m| m.id).collect()
    }

    /// The key index points at exactly the pending messages that have a key.
    fn index_agrees(m: &Mixer) -> bool {
        let keyed = m.pending.iter().filter(|p| !p.msg.coalesce_key.is_empty()).count();
        keyed == m.keys.len()
            && m.keys.iter().all(|(k, &at)| m.pending.get(at).is_some_and(|p| &p.msg.coalesce_key == k))
    }

    #[test]
    fn orders_by_priority_then_weight_then_arrival() {
        let mut m = Mixer::default();
        push(&mut m, msg(1, Priority::Low, 0), &LIMITS).unwrap();
        push(&mut m, msg(2, Priority::High, 1), &LIMITS).unwrap();
        push(&mut m, msg(3, Priority::High, 5), &LIMITS).unwrap();
        push(&mut m, msg(4, Priority::Whitelist, 0), &LIMITS).unwrap();
        push(&mut m, msg(5, Priority::High, 5), &LIMITS).unwrap();
        let cut = m.cut(NOW_MS, &LIMITS).unwrap();
        assert_eq!(ids(&cut), vec![4, 3, 5]);
        assert_eq!((cut.first_seq(), cut.last_seq()), (1, 3));
        assert_eq!(cut.dropped_overflow, 2);
        assert_eq!(cut.carried, 0);
        assert!(m.cut(NOW_MS, &LIMITS).is_none(), "dropped messages are gone");
    }

    #[test]
    fn whitelist_overflow_is_carried_in_order() {
        let mut m = Mixer::default();
        for id in 1..=5 {
            push(&mut m, msg(id, Priority::Whitelist, 0), &LIMITS).unwrap();
        }
        push(&mut m, msg(9, Priority::Low, 0), &LIMITS).unwrap();
        let a = m.cut(NOW_MS, &LIMITS).unwrap();
        assert_eq!(ids(&a), vec![1, 2, 3]);
        assert_eq!((a.carried, a.dropped_overflow), (2, 1));
        push(&mut m, msg(10, Priority::High, 100), &LIMITS).unwrap();
        let b = m.cut(NOW_MS, &LIMITS).unwrap();
        assert_eq!(ids(&b), vec![4, 5, 10]);
        assert_eq!((b.first_seq(), b.last_seq()), (4, 6));
    }

    #[test]
    fn backlog_is_bounded() {
        let mut m = Mixer::default();
        for id in 0..10 {
            assert_eq!(push(&mut m, msg(id, Priority::Low, 0), &LIMITS), Ok(Pushed::Added));
        }
        assert_eq!(push(&mut m, msg(11, Priority::Whitelist, 0), &LIMITS), Err(Refused::Backlog));
        assert_eq!(m.pending_len(), 10);
    }

    #[test]
    fn corrections_coalesce_to_the_newest_at_its_arrival() {
        let mut m = Mixer::default();
        assert_eq!(push(&mut m, keyed(1, Priority::High, "pk"), &LIMITS), Ok(Pushed::Added));
        assert_eq!(push(&mut m, keyed(2, Priority::High, "other"), &LIMITS), Ok(Pushed::Added));
        assert_eq!(push(&mut m, keyed(3, Priority::High, "pk"), &LIMITS), Ok(Pushed::Coalesced));
        assert_eq!(m.pending_len(), 2);
        let cut = m.cut(NOW_MS, &LIMITS).unwrap();
        assert_eq!(ids(&cut), vec![2, 3], "the correction takes the newest arrival position");
        assert_eq!((cut.dropped_overflow, cut.dropped_expired), (0, 0));
    }

    #[test]
    fn empty_keys_never_coalesce() {
        let mut m = Mixer::default();
        assert_eq!(push(&mut m, keyed(1, Priority::Low, ""), &LIMITS), Ok(Pushed::Added));
        assert_eq!(push(&mut m, keyed(2, Priority::Low, ""), &LIMITS), Ok(Pushed::Added));
        assert_eq!(m.pending_len(), 2);
    }

    #[test]
    fn a_correction_is_accepted_with_a_full_backlog() {
        let mut m = Mixer::default();
        push(&mut m, keyed(0, Priority::Low, "pk"), &LIMITS).unwrap();
        for id in 1..10 {
            push(&mut m, msg(id, Priority::Low, 0), &LIMITS).unwrap();
        }
        assert_eq!(push(&mut m, keyed(10, Priority::Low, "pk"), &LIMITS), Ok(Pushed::Coalesced));
        assert_eq!(push(&mut m, keyed(11, Priority::Low, "new"), &LIMITS), Err(Refused::Backlog));
        assert_eq!(m.pending_len(), 10);
    }

    #[test]
    fn carried_messages_still_coalesce_after_a_cut() {
        let mut m = Mixer::default();
        for id in 1..=4 {
            push(&mut m, keyed(id, Priority::Whitelist, &format!("k{id}")), &LIMITS).unwrap();
        }
        let a = m.cut(NOW_MS, &LIMITS).unwrap();
        assert_eq!((ids(&a), a.carried), (vec![1, 2, 3], 1));
        assert!(index_agrees(&m));
        assert_eq!(push(&mut m, keyed(5, Priority::Whitelist, "k4"), &LIMITS), Ok(Pushed::Coalesced));
        assert_eq!(push(&mut m, keyed(6, Priority::Whitelist, "k1"), &LIMITS), Ok(Pushed::Added), "k1 was sent");
        assert_eq!(ids(&m.cut(NOW_MS, &LIMITS).unwrap()), vec![5, 6]);
    }

    #[test]
    fn expiry_is_exclusive_of_the_deadline() {
        let mut m = Mixer::default();
        push(&mut m, aged(1, Priority::High, 1_000, 500), &LIMITS).unwrap(); // fresh until 1_500 inclusive
        push(&mut m, aged(2, Priority::High, 999, 500), &LIMITS).unwrap(); // expired at 1_500
        push(&mut m, aged(3, Priority::Low, 0, 0), &LIMITS).unwrap(); // ttl 0: never expires
        let cut = m.cut(1_500, &LIMITS).unwrap();
        assert_eq!(ids(&cut), vec![1, 3]);
        assert_eq!((cut.dropped_expired, cut.dropped_overflow), (1, 0));
        assert_eq!(cut.first_seq(), 1, "an expired message takes no seq");
    }

    #[test]
    fn whitelist_never_expires() {
        let mut m = Mixer::default();
        for id in 1..=4 {
            push(&mut m, aged(id, Priority::Whitelist, 0, 1), &LIMITS).unwrap();
        }
        let a = m.cut(NOW_MS, &LIMITS).unwrap();
        assert_eq!((a.messages.len(), a.carried, a.dropped_expired), (3, 1, 0));
        let b = m.cut(i64::MAX, &LIMITS).unwrap();
        assert_eq!((ids(&b), b.dropped_expired), (vec![4], 0));
    }

    #[test]
    fn all_expired_gives_an_empty_cut_with_counts() {
        let mut m = Mixer::starting_after(41);
        push(&mut m, aged(1, Priority::Low, 0, 10), &LIMITS).unwrap();
        push(&mut m, aged(2, Priority::High, i64::MAX, u32::MAX), &LIMITS).unwrap(); // no overflow
        let cut = m.cut(100, &LIMITS).unwrap();
        assert_eq!((ids(&cut), cut.dropped_expired), (vec![2], 1));
        push(&mut m, aged(3, Priority::Low, 0, 10), &LIMITS).unwrap();
        let cut = m.cut(100, &LIMITS).unwrap();
        assert!(cut.messages.is_empty());
        assert_eq!((cut.dropped_expired, cut.first_seq(), m.last_seq()), (1, 0, 42));
        assert!(!m.has_pending());
        assert!(m.cut(100, &LIMITS).is_none());
    }

    fn arb_priority() -> impl Strategy<Value = Priority> {
        prop_oneof![Just(Priority::Low), Just(Priority::High), Just(Priority::Whitelist)]
    }

    #[derive(Clone, Debug)]
    enum Op {
        /// Priority, weight, key (0 = none), created_ms, ttl_ms.
        Push(Priority, i32, u8, i64, u32),
        /// A cut at this now_ms: jumps forward and backwards.
        Cut(i64),
    }

    fn arb_op() -> impl Strategy<Value = Op> {
        let ttl_ms = prop_oneof![Just(0u32), 1u32..1_500];
        prop_oneof![
            3 => (arb_priority(), -3i32..3, 0u8..4, 0i64..2_000, ttl_ms)
                .prop_map(|(p, w, k, c, t)| Op::Push(p, w, k, c, t)),
            1 => (0i64..3_000).prop_map(Op::Cut),
        ]
    }

    /// What the test saw happen to accepted messages.
    #[derive(Default)]
    struct Seen {
        /// (id, whitelist) of every accepted message.
        accepted: Vec<(u64, bool)>,
        sent: HashSet<u64>,
        coalesced: HashSet<u64>,
        dropped: u64,
        next_seq: u64,
    }

    fn push_op(
        m: &mut Mixer,
        seen: &mut Seen,
        id: u64,
        msg: Message,
        limits: &MixerLimits,
    ) -> Result<(), TestCaseError> {
        let key = msg.coalesce_key.clone();
        let whitelist = msg.priority == Priority::Whitelist.wire();
        let older = m.pending.iter().find(|p| !key.is_empty() && p.msg.coalesce_key == key).map(|p| p.msg.id);
        match (push(m, msg, limits), older) {
            (Ok(Pushed::Added), None) => seen.accepted.push((id, whitelist)),
            (Ok(Pushed::Coalesced), Some(old)) => {
                prop_assert!(seen.coalesced.insert(old));
                seen.accepted.push((id, whitelist));
            }
            (Err(Refused::Backlog), None) => prop_assert_eq!(m.pending_len(), limits.pending_messages_max),
            (got, older) => prop_assert!(false, "push gave {:?} with older {:?}", got, older),
        }
        Ok(())
    }

    fn cut_op(m: &mut Mixer, seen: &mut Seen, now_ms: i64, limits: &MixerLimits) -> Result<(), TestCaseError> {
        let stale = |msg: &Message| {
            msg.priority != Priority::Whitelist.wire()
                && msg.ttl_ms > 0
                && msg.created_ms + i64::from(msg.ttl_ms) < now_ms
        };
        let expect_expired = m.pending.iter().filter(|p| stale(&p.msg)).count() as u64;
        let had = m.has_pending();
        let Some(cut) = m.cut(now_ms, limits) else {
            prop_assert!(!had);
            return Ok(());
        };
        prop_assert_eq!(cut.dropped_expired, expect_expired);
        prop_assert!(cut.messages.len() <= limits.block_messages_max);
        for msg in &cut.messages {
            prop_assert_eq!(msg.seq, seen.next_seq);
            seen.next_seq += 1;
            prop_assert!(!stale(msg), "sent an expired message");
            prop_assert!(seen.sent.insert(msg.id));
        }
        let order: Vec<_> = cut.messages.iter().map(|m| (m.priority, m.weight)).collect();
        prop_assert!(order.windows(2).all(|w| w[0] >= w[1]), "out of order: {:?}", order);
        prop_assert_eq!(cut.carried, m.pending_len());
        prop_assert!(m.pending.iter().all(|p| p.priority == Priority::Whitelist));
        prop_assert_eq!(
            cut.top,
            cut.messages.iter().filter_map(|m| Priority::from_wire(m.priority)).max().unwrap_or_default()
        );
        seen.dropped += cut.dropped_overflow + cut.dropped_expired;
        Ok(())
    }

    proptest! {
        /// Over any pushes (some sharing coalesce keys, random created_ms/ttl) and cuts at any
        /// now_ms: seqs strictly increase with no gaps; every accepted message is exactly one of
        /// sent, pending, dropped (overflow or expired) or coalesced away; no whitelist message
        /// is ever dropped or expired; pending never exceeds its limit.
        #[test]
        fn accounting_holds(ops in prop::collection::vec(arb_op(), 1..300)) {
            let limits = MixerLimits { block_messages_max: 4, pending_messages_max: 16 };
            let mut m = Mixer::starting_after(100);
            let mut seen = Seen { next_seq: 101, ..Seen::default() };
            for (i, op) in ops.into_iter().enumerate() {
                let id = i as u64;
                match op {
                    Op::Push(p, weight, k, created_ms, ttl_ms) => {
                        let coalesce_key = if k == 0 { String::new() } else { format!("k{k}") };
                        let msg = Message { id, priority: p.wire(), weight, coalesce_key, created_ms, ttl_ms, ..Message::default() };
                        push_op(&mut m, &mut seen, id, msg, &limits)?;
                    }
                    Op::Cut(now_ms) => cut_op(&mut m, &mut seen, now_ms, &limits)?,
                }
                prop_assert!(m.pending_len() <= limits.pending_messages_max);
                prop_assert!(index_agrees(&m));
            }
            let pending: HashSet<u64> = m.pending.iter().map(|p| p.msg.id).collect();
            let mut dropped = 0;
            for &(id, whitelist) in &seen.accepted {
                let fates = [&seen.sent, &pending, &seen.coalesced].iter().filter(|s| s.contains(&id)).count();
                prop_assert!(fates <= 1, "message {} has {} fates", id, fates);
                if fates == 0 {
                    prop_assert!(!whitelist, "whitelist message {} was dropped", id);
                    dropped += 1;
                }
            }
            prop_assert_eq!(dropped, seen.dropped);
            prop_assert_eq!(m.last_seq(), seen.next_seq - 1);
        }
    }
}
