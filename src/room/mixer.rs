//! The room mixer: the owner pushes a room's incoming messages here, and at each block tick cuts
//! one block — ordered by priority (whitelist > high > low), then weight, then arrival — of at
//! most `block_messages_max` messages, each stamped with the room's next sequence number.
//! Whitelist messages that do not fit are carried to the next block; others are dropped and
//! counted. Sans-IO: no clocks, no sockets; call `push` as messages arrive and `cut` on a tick.

use crate::proto::{Message, Priority};

/// Bounds of one room's mixer.
#[derive(Clone, Copy, Debug)]
pub struct MixerLimits {
    /// Messages in one block.
    pub block_messages_max: usize,
    /// Messages waiting for the next block (including carried whitelist ones).
    pub pending_messages_max: usize,
}

/// Why a message was not accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The room's pending backlog is full.
    Backlog,
}

/// One cut block: its messages in send order, with consecutive seqs.
#[derive(Debug, Default)]
pub struct Cut {
    pub messages: Vec<Message>,
    /// Non-whitelist messages that did not fit and were dropped.
    pub dropped_overflow: u64,
    /// Whitelist messages that did not fit and wait for the next block.
    pub carried: usize,
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
    /// Arrival order inside this room; breaks ties after priority and weight.
    arrival: u64,
}

/// One room's pending messages and sequence counter.
#[derive(Default)]
pub struct Mixer {
    pending: Vec<Pending>,
    arrivals: u64,
    last_seq: u64,
}

impl Mixer {
    /// A mixer whose first seq will be `last_seq + 1`.
    pub fn starting_after(last_seq: u64) -> Mixer {
        Mixer { last_seq, ..Mixer::default() }
    }

    /// Accepts a message for the next block. Its `seq` is assigned at the cut.
    pub fn push(&mut self, msg: Message, limits: &MixerLimits) -> Result<(), Refused> {
        if self.pending.len() >= limits.pending_messages_max {
            return Err(Refused::Backlog);
        }
        self.arrivals += 1;
        self.pending.push(Pending { msg, arrival: self.arrivals });
        Ok(())
    }

    /// Whether a cut would produce anything.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Messages waiting.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// The last seq handed out (0 before the first block).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Cuts the next block. Returns None when nothing is pending.
    pub fn cut(&mut self, limits: &MixerLimits) -> Option<Cut> {
        if self.pending.is_empty() {
            return None;
        }
        self.pending
            .sort_unstable_by_key(|p| (std::cmp::Reverse(rank(&p.msg)), std::cmp::Reverse(p.msg.weight), p.arrival));
        let take = self.pending.len().min(limits.block_messages_max);
        let mut cut = Cut { messages: Vec::with_capacity(take), ..Cut::default() };
        for p in self.pending.drain(..take) {
            self.last_seq += 1;
            let mut msg = p.msg;
            msg.seq = self.last_seq;
            cut.messages.push(msg);
        }
        // What did not fit: whitelist waits (still first in line next time), the rest goes.
        let before = self.pending.len();
        self.pending.retain(|p| rank(&p.msg) == Priority::Whitelist as i32);
        cut.carried = self.pending.len();
        cut.dropped_overflow = (before - cut.carried) as u64;
        Some(cut)
    }
}

/// Priority as an orderable number; unknown values rank as LOW.
fn rank(m: &Message) -> i32 {
    match Priority::try_from(m.priority) {
        Ok(p) => p as i32,
        Err(_) => Priority::Low as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMITS: MixerLimits = MixerLimits { block_messages_max: 3, pending_messages_max: 10 };

    fn msg(id: u64, p: Priority, weight: i32) -> Message {
        Message { id, priority: p as i32, weight, ..Message::default() }
    }

    fn ids(cut: &Cut) -> Vec<u64> {
        cut.messages.iter().map(|m| m.id).collect()
    }

    #[test]
    fn orders_by_priority_then_weight_then_arrival() {
        let mut m = Mixer::default();
        m.push(msg(1, Priority::Low, 0), &LIMITS).unwrap();
        m.push(msg(2, Priority::High, 1), &LIMITS).unwrap();
        m.push(msg(3, Priority::High, 5), &LIMITS).unwrap();
        m.push(msg(4, Priority::Whitelist, 0), &LIMITS).unwrap();
        m.push(msg(5, Priority::High, 5), &LIMITS).unwrap();
        let cut = m.cut(&LIMITS).unwrap();
        assert_eq!(ids(&cut), vec![4, 3, 5]);
        assert_eq!((cut.first_seq(), cut.last_seq()), (1, 3));
        assert_eq!(cut.dropped_overflow, 2);
        assert_eq!(cut.carried, 0);
        assert!(m.cut(&LIMITS).is_none(), "dropped messages are gone");
    }

    #[test]
    fn whitelist_overflow_is_carried_in_order() {
        let mut m = Mixer::default();
        for id in 1..=5 {
            m.push(msg(id, Priority::Whitelist, 0), &LIMITS).unwrap();
        }
        m.push(msg(9, Priority::Low, 0), &LIMITS).unwrap();
        let a = m.cut(&LIMITS).unwrap();
        assert_eq!(ids(&a), vec![1, 2, 3]);
        assert_eq!((a.carried, a.dropped_overflow), (2, 1));
        m.push(msg(10, Priority::High, 100), &LIMITS).unwrap();
        let b = m.cut(&LIMITS).unwrap();
        assert_eq!(ids(&b), vec![4, 5, 10]);
        assert_eq!((b.first_seq(), b.last_seq()), (4, 6));
    }

    #[test]
    fn backlog_is_bounded() {
        let mut m = Mixer::default();
        for id in 0..10 {
            m.push(msg(id, Priority::Low, 0), &LIMITS).unwrap();
        }
        assert_eq!(m.push(msg(11, Priority::Whitelist, 0), &LIMITS), Err(Refused::Backlog));
        assert_eq!(m.pending_len(), 10);
    }

    fn arb_priority() -> impl Strategy<Value = Priority> {
        prop_oneof![Just(Priority::Low), Just(Priority::High), Just(Priority::Whitelist)]
    }

    proptest! {
        /// Over any sequence of pushes and cuts: seqs strictly increase with no gaps, every
        /// message is either sent, carried, dropped (counted) or refused, and no whitelist
        /// message is ever dropped.
        #[test]
        fn accounting_holds(ops in prop::collection::vec(prop::option::of((arb_priority(), -3i32..3)), 1..200)) {
            let limits = MixerLimits { block_messages_max: 4, pending_messages_max: 16 };
            let mut m = Mixer::default();
            let (mut pushed, mut sent, mut dropped, mut refused) = (0u64, 0u64, 0u64, 0u64);
            let mut next_seq = 1;
            let mut whitelist_pushed = 0u64;
            let mut whitelist_sent = 0u64;
            for (i, op) in ops.into_iter().enumerate() {
                match op {
                    Some((p, w)) => match m.push(msg(i as u64, p, w), &limits) {
                        Ok(()) => { pushed += 1; if p == Priority::Whitelist { whitelist_pushed += 1; } }
                        Err(Refused::Backlog) => refused += 1,
                    },
                    None => if let Some(cut) = m.cut(&limits) {
                        prop_assert!(cut.messages.len() <= limits.block_messages_max);
                        for msg in &cut.messages {
                            prop_assert_eq!(msg.seq, next_seq);
                            next_seq += 1;
                            if msg.priority == Priority::Whitelist as i32 { whitelist_sent += 1; }
                        }
                        sent += cut.messages.len() as u64;
                        dropped += cut.dropped_overflow;
                        prop_assert_eq!(cut.carried, m.pending_len());
                    },
                }
            }
            prop_assert_eq!(pushed, sent + dropped + m.pending_len() as u64);
            let whitelist_waiting = m.pending.iter().filter(|p| p.msg.priority == Priority::Whitelist as i32).count() as u64;
            prop_assert_eq!(whitelist_pushed, whitelist_sent + whitelist_waiting);
            let _ = refused;
        }
    }
}
