//! Connections to open again later: the worker's timer queue for clients that were told to come
//! back (`upgrade`: a `reconnect` frame's delay, or a backoff after an unexpected close). Each
//! entry names the client (its run-wide index, which keeps its follower state) and its room;
//! the worker asks for those due by `now` and starts them within its in-flight cap, so a storm
//! of reconnects waits here rather than in the gateway's accept queue. Nothing here reads a
//! clock: the worker passes the time in.
#![forbid(unsafe_code)]

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

/// One client waiting to reconnect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Reopen {
    /// When it may connect (first field: the heap orders by it).
    pub at: Instant,
    pub index: u64,
    pub room: u32,
}

/// Reopens in due order. A min-heap: delays differ per client (jitter, backoff), so entries do
/// not arrive in due order. 24 bytes an entry; at most one per client.
#[derive(Debug, Default)]
pub struct Reopens {
    heap: BinaryHeap<Reverse<Reopen>>,
}

impl Reopens {
    pub fn push(&mut self, r: Reopen) {
        self.heap.push(Reverse(r));
    }

    /// The next entry due by `now`, if any (earliest first).
    pub fn pop_due(&mut self, now: Instant) -> Option<Reopen> {
        if self.heap.peek().is_some_and(|Reverse(r)| r.at <= now) {
            return self.heap.pop().map(|Reverse(r)| r);
        }
        None
    }

    /// How long from `now` until the first entry is due (None: nothing waits).
    pub fn wait(&self, now: Instant) -> Option<Duration> {
        self.heap.peek().map(|Reverse(r)| r.at.saturating_duration_since(now))
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_come_due_earliest_first_whatever_the_push_order() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut q = Reopens::default();
        assert_eq!(q.wait(t0), None);
        q.push(Reopen { at: ms(300), index: 3, room: 0 });
        q.push(Reopen { at: ms(100), index: 1, room: 1 });
        q.push(Reopen { at: ms(200), index: 2, room: 2 });
        assert_eq!(q.len(), 3);
        assert_eq!(q.wait(t0), Some(Duration::from_millis(100)));
        assert_eq!(q.pop_due(ms(99)), None);
        assert_eq!(q.pop_due(ms(250)).map(|r| r.index), Some(1));
        assert_eq!(q.pop_due(ms(250)).map(|r| (r.index, r.room)), Some((2, 2)));
        assert_eq!(q.pop_due(ms(250)), None);
        assert_eq!(q.wait(ms(250)), Some(Duration::from_millis(50)));
        assert_eq!(q.wait(ms(400)), Some(Duration::ZERO), "overdue waits nothing");
        assert_eq!(q.pop_due(ms(400)).map(|r| r.index), Some(3));
        assert_eq!(q.len(), 0);
    }
}
