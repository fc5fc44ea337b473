//! Outbound frames of one shard's connections and the send queue of each connection. A frame fanned out to
//! many connections is stored once with a count of the queues holding it; a queue is a chain of
//! 8-byte nodes from a shard-wide pool, so an idle connection holds no queue memory and a
//! delivery allocates nothing per member. Frames at the head of a queue that a send operation
//! is writing are "in flight": they are never dropped or freed until that send completes.
//!
//! A full queue sheds by priority class: the oldest frame of the lowest class goes first (a
//! low-only block before a block with high messages), or the new frame itself when it matters
//! less than everything queued; `Keep` frames (whitelist, attributes, control) are never dropped.

use std::io::IoSlice;
use std::sync::Arc;

use slab::Slab;

use crate::room::frames::{Class, SharedFrame, Wire};

const NIL: u32 = u32::MAX;

/// A frame stored in the outbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameId(u32);

enum Body {
    Shared(Arc<SharedFrame>),
    Owned(Box<[u8]>),
}

struct Entry {
    body: Body,
    /// Queue nodes pointing here.
    refs: u32,
    class: Class,
}

struct Node {
    frame: u32,
    next: u32,
}

/// One connection's send queue: 16 bytes inline in the connection.
#[derive(Debug)]
pub struct Queue {
    head: u32,
    tail: u32,
    len: u16,
    /// Frames at the head handed to the in-flight send.
    inflight: u16,
    /// Bytes of the head frame already written. A partly written head is never shed: the
    /// peer has its first bytes and must get the rest before anything else.
    offset: u32,
}

impl Default for Queue {
    fn default() -> Self {
        Queue { head: NIL, tail: NIL, len: 0, inflight: 0, offset: 0 }
    }
}

impl Queue {
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether a send holds frames of this queue.
    pub fn in_flight(&self) -> bool {
        self.inflight > 0
    }
}

/// What `push` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Queued without loss.
    Queued,
    /// Queued after dropping a queued frame of a lower or equal class.
    DroppedOldest,
    /// Not queued: it mattered less than everything droppable in the full queue.
    DroppedNew,
    /// Not queued, and nothing droppable: the reader is hopelessly behind.
    Full,
}

/// The shard's outbound frames and queue nodes.
#[derive(Default)]
pub struct Outbox {
    frames: Slab<Entry>,
    nodes: Vec<Node>,
    free: Vec<u32>,
}

impl Outbox {
    /// Stores a shared frame; it lives while queues hold it (call `forget_if_unused` if none
    /// took it).
    pub fn add_shared(&mut self, frame: Arc<SharedFrame>) -> FrameId {
        let class = frame.class;
        FrameId(self.frames.insert(Entry { body: Body::Shared(frame), refs: 0, class }) as u32)
    }

    /// Stores bytes for one connection (handshake reply, welcome, pong, close, echo).
    pub fn add_owned(&mut self, bytes: Vec<u8>, class: Class) -> FrameId {
        let body = Body::Owned(bytes.into_boxed_slice());
        FrameId(self.frames.insert(Entry { body, refs: 0, class }) as u32)
    }

    /// Frees a frame no queue took (a frame some queue holds lives on).
    pub fn forget_if_unused(&mut self, id: FrameId) {
        if self.entry(id.0).refs == 0 {
            self.frames.remove(id.0 as usize);
        }
    }

    /// Frames stored (for tests and gauges).
    pub fn frames(&self) -> usize {
        self.frames.len()
    }

    /// Whether a connection reading `wire` can be sent this frame.
    pub fn has_format(&self, id: FrameId, wire: Wire) -> bool {
        match &self.entry(id.0).body {
            Body::Shared(f) => f.bytes(wire).is_some(),
            Body::Owned(_) => true,
        }
    }

    /// Appends a frame to a queue bounded at `max`, shedding by class when full.
    pub fn push(&mut self, q: &mut Queue, id: FrameId, max: usize) -> Pushed {
        let mut result = Pushed::Queued;
        if q.len() >= max {
            let new = self.entry(id.0).class;
            match self.lowest_droppable(q) {
                Some((_, _, class)) if new < class => return Pushed::DroppedNew,
                Some((prev, node, _)) => {
                    self.unlink(q, prev, node);
                    result = Pushed::DroppedOldest;
                }
                None if new < Class::Keep => return Pushed::DroppedNew,
                None => return Pushed::Full,
            }
        }
        let node = self.alloc_node(id.0);
        if q.tail == NIL {
            q.head = node;
        } else {
            self.nodes[q.tail as usize].next = node;
        }
        q.tail = node;
        q.len += 1;
        self.entry_mut(id.0).refs += 1;
        result
    }

    /// Fills `iov` with the queued frames (the first from where the last send stopped) for
    /// one send, marks them in flight and returns how many slices it filled.
    pub fn gather<'a>(&'a self, q: &mut Queue, wire: Wire, iov: &mut [IoSlice<'a>]) -> usize {
        assert!(!q.in_flight(), "one send per connection at a time");
        let offset = q.offset as usize;
        let mut n = 0;
        let mut node = q.head;
        while node != NIL && n < iov.len() {
            let Node { frame, next } = self.nodes[node as usize];
            let bytes = self.bytes(frame, wire);
            let skip = if n == 0 { offset.min(bytes.len()) } else { 0 };
            iov[n] = IoSlice::new(&bytes[skip..]);
            n += 1;
            node = next;
        }
        q.inflight = n as u16;
        n
    }

    /// Accounts a completed send of `written` bytes: pops the frames fully written and keeps
    /// where the next send resumes inside the new head.
    pub fn sent(&mut self, q: &mut Queue, wire: Wire, written: usize) {
        let mut left = written;
        while q.head != NIL && q.inflight > 0 {
            let frame = self.nodes[q.head as usize].frame;
            let remaining = self.bytes(frame, wire).len().saturating_sub(q.offset as usize);
            if left < remaining {
                q.offset += left as u32;
                q.inflight = 0;
                return;
            }
            left -= remaining;
            q.offset = 0;
            self.pop_front(q);
            q.inflight -= 1;
        }
        q.inflight = 0;
    }

    /// Ends the in-flight mark without progress, and forgets a partly written head: the send
    /// failed or the connection is gone, so nothing more is owed on this stream.
    pub fn abort(&mut self, q: &mut Queue) {
        q.inflight = 0;
        q.offset = 0;
    }

    /// Drops every queued frame that is not in flight.
    pub fn clear(&mut self, q: &mut Queue) {
        // In-flight frames sit at the head; keep them until their send completes (and a partly
        // written head, whose rest the peer is owed).
        let keep = usize::from(q.inflight).max(usize::from(q.offset > 0));
        let mut prev = NIL;
        let mut node = q.head;
        for _ in 0..keep {
            prev = node;
            node = self.nodes[node as usize].next;
        }
        while node != NIL {
            let next = self.nodes[node as usize].next;
            self.release_node(node);
            q.len -= 1;
            node = next;
        }
        if prev == NIL {
            q.head = NIL;
            q.tail = NIL;
        } else {
            self.nodes[prev as usize].next = NIL;
            q.tail = prev;
        }
    }

    fn bytes(&self, frame: u32, wire: Wire) -> &[u8] {
        match &self.entry(frame).body {
            // Fan-outs queue a shared frame only to connections whose format it has.
            Body::Shared(f) => f.bytes(wire).unwrap_or(&f.proto),
            Body::Owned(b) => b,
        }
    }

    /// A stored frame. Every id the outbox handed out names one until its last queue node is
    /// released (or `forget_if_unused` freed it unqueued): a missing one is our bug.
    fn entry(&self, frame: u32) -> &Entry {
        match self.frames.get(frame as usize) {
            Some(e) => e,
            None => panic!("outbox frame {frame} is not stored"),
        }
    }

    fn entry_mut(&mut self, frame: u32) -> &mut Entry {
        match self.frames.get_mut(frame as usize) {
            Some(e) => e,
            None => panic!("outbox frame {frame} is not stored"),
        }
    }

    fn pop_front(&mut self, q: &mut Queue) {
        let node = q.head;
        q.head = self.nodes[node as usize].next;
        if q.head == NIL {
            q.tail = NIL;
        }
        q.len -= 1;
        self.release_node(node);
    }

    /// The oldest queued frame of the lowest droppable class (not in flight, not `Keep`):
    /// (previous node, node, class).
    fn lowest_droppable(&self, q: &Queue) -> Option<(u32, u32, Class)> {
        let mut best: Option<(u32, u32, Class)> = None;
        let (mut prev, mut node, mut index) = (NIL, q.head, 0);
        while node != NIL {
            let Node { frame, next } = self.nodes[node as usize];
            let class = self.entry(frame).class;
            // In flight, or the partly written head: the peer already has part of it.
            let pinned = index < usize::from(q.inflight) || (index == 0 && q.offset > 0);
            let droppable = !pinned && class < Class::Keep;
            if droppable && best.is_none_or(|(_, _, c)| class < c) {
                best = Some((prev, node, class));
            }
            prev = node;
            node = next;
            index += 1;
        }
        best
    }

    fn unlink(&mut self, q: &mut Queue, prev: u32, node: u32) {
        let next = self.nodes[node as usize].next;
        if prev == NIL {
            q.head = next;
        } else {
            self.nodes[prev as usize].next = next;
        }
        if q.tail == node {
            q.tail = prev;
        }
        q.len -= 1;
        self.release_node(node);
    }

    fn alloc_node(&mut self, frame: u32) -> u32 {
        match self.free.pop() {
            Some(i) => {
                self.nodes[i as usize] = Node { frame, next: NIL };
                i
            }
            None => {
                self.nodes.push(Node { frame, next: NIL });
                (self.nodes.len() - 1) as u32
            }
        }
    }

    fn release_node(&mut self, node: u32) {
        let frame = self.nodes[node as usize].frame;
        let e = self.entry_mut(frame);
        assert!(e.refs > 0, "outbox frame {frame}: reference count underflow");
        e.refs -= 1;
        if e.refs == 0 {
            self.frames.remove(frame as usize);
        }
        self.free.push(node);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Format;

    const PROTO: Wire = Wire { format: Format::Proto, deflate: false };

    fn shared(bytes: &[u8], class: Class) -> Arc<SharedFrame> {
        Arc::new(SharedFrame::plain(bytes.into(), None, class))
    }

    fn drain(o: &mut Outbox, q: &mut Queue) -> Vec<u8> {
        let mut out = Vec::new();
        while !q.is_empty() {
            let mut iov = [IoSlice::new(&[]); 2];
            let n = o.gather(q, PROTO, &mut iov);
            let chunk: Vec<u8> = iov[..n].iter().flat_map(|s| s.iter().copied()).collect();
            // Write at most 3 bytes per send to exercise partial sends.
            let written = chunk.len().min(3);
            out.extend_from_slice(&chunk[..written]);
            o.sent(q, PROTO, written);
        }
        out
    }

    #[test]
    fn one_frame_many_queues_and_partial_sends() {
        let mut o = Outbox::default();
        let f = o.add_shared(shared(b"hello", Class::Low));
        let mut qs: Vec<Queue> = (0..3).map(|_| Queue::default()).collect();
        for q in &mut qs {
            assert_eq!(o.push(q, f, 4), Pushed::Queued);
        }
        let g = o.add_owned(b"-bye".to_vec(), Class::Keep);
        o.push(&mut qs[0], g, 4);
        assert_eq!(drain(&mut o, &mut qs[0]), b"hello-bye");
        assert_eq!(o.frames(), 1, "still held by two queues");
        assert_eq!(drain(&mut o, &mut qs[1]), b"hello");
        assert_eq!(drain(&mut o, &mut qs[2]), b"hello");
        assert_eq!(o.frames(), 0, "freed with its last reference");
    }

    #[test]
    fn full_queue_sheds_lowest_class_first_never_in_flight_or_kept() {
        let mut o = Outbox::default();
        let mut q = Queue::default();
        // a (low, will be in flight), b (keep), c (high), d (low)
        for (b, class) in [(b"a", Class::Low), (b"b", Class::Keep), (b"c", Class::High), (b"d", Class::Low)] {
            let id = o.add_shared(shared(b, class));
            assert_eq!(o.push(&mut q, id, 4), Pushed::Queued);
        }
        let mut iov = [IoSlice::new(&[]); 1];
        assert_eq!(o.gather(&mut q, PROTO, &mut iov), 1); // 'a' in flight
        let e = o.add_shared(shared(b"e", Class::High));
        assert_eq!(o.push(&mut q, e, 4), Pushed::DroppedOldest, "drops low 'd', not in-flight 'a'");
        let f = o.add_shared(shared(b"f", Class::Low));
        assert_eq!(o.push(&mut q, f, 4), Pushed::DroppedNew, "a low frame loses to queued highs");
        o.forget_if_unused(f);
        let g = o.add_shared(shared(b"g", Class::High));
        assert_eq!(o.push(&mut q, g, 4), Pushed::DroppedOldest, "equal class: the oldest high 'c' goes");
        o.sent(&mut q, PROTO, 1);
        assert_eq!(drain(&mut o, &mut q), b"beg");
        // Only kept frames queued: a kept frame cannot enter, a droppable one is dropped.
        let mut q = Queue::default();
        for _ in 0..2 {
            let k = o.add_owned(b"k".to_vec(), Class::Keep);
            o.push(&mut q, k, 2);
        }
        let k = o.add_owned(b"k".to_vec(), Class::Keep);
        assert_eq!(o.push(&mut q, k, 2), Pushed::Full);
        o.forget_if_unused(k);
        let l = o.add_shared(shared(b"l", Class::Low));
        assert_eq!(o.push(&mut q, l, 2), Pushed::DroppedNew);
        o.forget_if_unused(l);
        o.clear(&mut q);
        assert_eq!(o.frames(), 0);
    }

    #[test]
    fn clear_keeps_in_flight_head() {
        let mut o = Outbox::default();
        let mut q = Queue::default();
        for b in [b"x", b"y", b"z"] {
            let id = o.add_owned(b.to_vec(), Class::Low);
            o.push(&mut q, id, 8);
        }
        let mut iov = [IoSlice::new(&[]); 1];
        o.gather(&mut q, PROTO, &mut iov);
        o.clear(&mut q);
        assert_eq!(q.len(), 1);
        o.sent(&mut q, PROTO, 1);
        assert!(q.is_empty());
        assert_eq!(o.frames(), 0);
    }

    #[test]
    fn a_partly_written_head_is_never_shed() {
        // The simulation's case: a partial send leaves the head half written, then the full
        // queue must shed. The head's rest must still go out first, whole.
        let mut o = Outbox::default();
        let mut q = Queue::default();
        for b in [b"aaaa", b"bbbb"] {
            let id = o.add_shared(shared(b, Class::Low));
            o.push(&mut q, id, 2);
        }
        let mut iov = [IoSlice::new(&[]); 1];
        o.gather(&mut q, PROTO, &mut iov);
        o.sent(&mut q, PROTO, 2); // "aa" written, "aa" owed
        let c = o.add_shared(shared(b"cccc", Class::Low));
        assert_eq!(o.push(&mut q, c, 2), Pushed::DroppedOldest, "sheds 'bbbb', not the partial head");
        assert_eq!(drain(&mut o, &mut q), b"aacccc");
        // clear() keeps a partial head too.
        let mut q = Queue::default();
        let d = o.add_shared(shared(b"dddd", Class::Low));
        o.push(&mut q, d, 2);
        let mut iov = [IoSlice::new(&[]); 1];
        o.gather(&mut q, PROTO, &mut iov);
        o.sent(&mut q, PROTO, 1);
        o.clear(&mut q);
        assert_eq!(drain(&mut o, &mut q), b"ddd");
    }
}
