//! The `fanout` run's shared book, between the main thread, the publishers and the receiving
//! workers: the clock marks of the window, per stream what was published and what the room's
//! sentinel has acknowledged, where each stream's measured messages sit in the receivers'
//! trackers, the saturate window's arithmetic, and a few live totals for progress and drain.
#![forbid(unsafe_code)]

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::Thread;

use crate::fanout_msg::{Streams, members_in};

/// Messages measured in one run, at most (all streams together): each costs every receiving
/// thread 8 bytes of tracker (a delivery count and the slowest delivery's latency), so the
/// trackers stay under 32 MiB a thread.
pub const TRACKED_MAX: u64 = 1 << 22;
/// `base` of a stream whose measured messages have not started.
const UNSET: u64 = u64::MAX;

/// How publishers pace.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    /// This many messages a second, all streams together.
    Rate(f64),
    /// Per room, publish while published − acknowledged by the sentinel < window.
    Saturate(u64),
}

/// One stream's counters (its own cache line: its publisher writes it per message).
#[repr(align(64))]
#[derive(Debug, Default)]
pub struct StreamBook {
    /// Messages accepted so far: the next message's seq.
    pub published: AtomicU64,
    /// The sentinel's highest seq received + 1.
    pub acked: AtomicU64,
    /// The seq of the first measured message (`UNSET` before the window).
    base: AtomicU64,
    /// Tracker slots: measured messages beyond `cap` are not published.
    pub offset: u64,
    pub cap: u64,
}

/// A publisher waiting for its rooms' windows to open, and how to wake it.
#[derive(Debug, Default)]
pub struct PubWait {
    pub waiting: AtomicBool,
    pub thread: OnceLock<Thread>,
}

#[derive(Debug)]
pub struct Book {
    pub streams: Streams,
    pub members: u64,
    /// Members 0..stalled stop reading once subscribed (`--stalled`): nothing is expected of
    /// them. Set before the book is shared.
    pub stalled: u64,
    pub mode: Mode,
    /// CLOCK_MONOTONIC when the run started: a message sent before it is from another run
    /// (barrage's history backfill).
    pub run_start_ns: u64,
    window_start_ns: AtomicU64,
    window_end_ns: AtomicU64,
    pub stop: AtomicBool,
    pub stream: Vec<StreamBook>,
    /// Per room: in-flight messages written off after a stall (saturate).
    pub forgiven: Vec<AtomicU64>,
    pub pubs: Vec<PubWait>,
    /// Live totals from the receivers: deliveries of measured messages, and every message.
    pub delivered: AtomicU64,
    pub received: AtomicU64,
}

impl Book {
    /// A book for `streams` publishing in `mode` over `duration_s` seconds of window.
    pub fn new(streams: Streams, members: u64, mode: Mode, duration_s: f64, run_start_ns: u64) -> Book {
        let n = streams.count();
        let caps: Vec<u64> = (0..n)
            .map(|j| match mode {
                Mode::Rate(total) => stream_cap(streams.rate_per_s(j, total), duration_s, n),
                Mode::Saturate(_) => TRACKED_MAX / u64::from(n),
            })
            .collect();
        let mut offset = 0;
        let stream = caps
            .iter()
            .map(|&cap| {
                let s = StreamBook { base: AtomicU64::new(UNSET), offset, cap, ..Default::default() };
                offset += cap;
                s
            })
            .collect();
        Book {
            streams,
            members,
            stalled: 0,
            mode,
            run_start_ns,
            window_start_ns: AtomicU64::new(u64::MAX),
            window_end_ns: AtomicU64::new(u64::MAX),
            stop: AtomicBool::new(false),
            stream,
            forgiven: (0..streams.rooms).map(|_| AtomicU64::new(0)).collect(),
            pubs: (0..streams.publishers).map(|_| PubWait::default()).collect(),
            delivered: AtomicU64::new(0),
            received: AtomicU64::new(0),
        }
    }

    /// Tracker slots all streams need.
    pub fn tracked(&self) -> u64 {
        self.stream.iter().map(|s| s.cap).sum()
    }

    pub fn members_in(&self, k: u32) -> u64 {
        members_in(k, self.members, self.streams.rooms)
    }

    /// Members of room `k` that read: its members less its stalled ones (member i is in room
    /// i % R, so the first `stalled` spread over rooms as members do).
    pub fn readers_in(&self, k: u32) -> u64 {
        self.members_in(k) - members_in(k, self.stalled, self.streams.rooms)
    }

    /// Whether member `index` stops reading once subscribed.
    pub fn is_stalled(&self, index: u64) -> bool {
        index < self.stalled
    }

    /// Sets the measurement window (before any publisher starts).
    pub fn set_window(&self, start_ns: u64, end_ns: u64) {
        self.window_start_ns.store(start_ns, Ordering::Release);
        self.window_end_ns.store(end_ns, Ordering::Release);
    }

    pub fn window(&self) -> (u64, u64) {
        (self.window_start_ns.load(Ordering::Acquire), self.window_end_ns.load(Ordering::Acquire))
    }

    /// The publisher marks its first measured message (before sending it).
    pub fn start_measuring(&self, j: u32, seq: u64) {
        self.stream[j as usize].base.store(seq, Ordering::Release);
    }

    pub fn measuring(&self, j: u32) -> bool {
        self.stream[j as usize].base.load(Ordering::Acquire) != UNSET
    }

    /// Measured messages of stream `j` so far.
    pub fn measured(&self, j: u32) -> u64 {
        let s = &self.stream[j as usize];
        match s.base.load(Ordering::Acquire) {
            UNSET => 0,
            base => s.published.load(Ordering::Acquire).saturating_sub(base),
        }
    }

    /// The tracker slot of message `seq` of stream `j`, if it is a measured one.
    pub fn slot(&self, j: u32, seq: u64) -> Option<usize> {
        let s = &self.stream[j as usize];
        let base = s.base.load(Ordering::Acquire);
        if base == UNSET || seq < base || seq - base >= s.cap {
            return None;
        }
        Some((s.offset + seq - base) as usize)
    }

    /// The sentinel of stream `j`'s room received message `seq`; wakes the publisher if it
    /// waits on the window.
    pub fn ack(&self, j: u32, seq: u64) {
        let before = self.stream[j as usize].acked.fetch_max(seq + 1, Ordering::AcqRel);
        if before <= seq {
            let p = &self.pubs[self.streams.of(j).0 as usize];
            if p.waiting.load(Ordering::Acquire)
                && let Some(t) = p.thread.get()
            {
                t.unpark();
            }
        }
    }

    /// Room `k`'s (published, acknowledged + forgiven) over all its streams.
    pub fn room_flight(&self, k: u32) -> (u64, u64) {
        let (mut published, mut acked) = (0, self.forgiven[k as usize].load(Ordering::Acquire));
        for j in self.streams.in_room(k) {
            let s = &self.stream[j as usize];
            published += s.published.load(Ordering::Acquire);
            acked += s.acked.load(Ordering::Acquire);
        }
        (published, acked)
    }
}

/// Tracker slots for a stream at `rate_per_s` over the window: what the pacing can publish in
/// it (rate × duration + the bucket's burst), with a little slack; all streams together stay
/// within `TRACKED_MAX`.
fn stream_cap(rate_per_s: f64, duration_s: f64, streams: u32) -> u64 {
    let want = (rate_per_s * duration_s).ceil() as u64 + u64::from(publish_burst(rate_per_s)) + 16;
    want.min(TRACKED_MAX / u64::from(streams))
}

/// A paced publisher's token-bucket burst: 100 ms of its rate, so a publisher woken late (it
/// runs at nice 19 beside a busy server) catches up instead of losing the messages it owes.
pub fn publish_burst(rate_per_s: f64) -> u32 {
    (rate_per_s / 10.0).clamp(1.0, 1e6) as u32
}

/// The saturate window of one room, as one publisher sees it: how many more it may publish
/// now, and when a window that stays full is written off.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    pub size: u64,
    /// The acknowledged count last seen, and when it last moved (ns).
    last_acked: u64,
    last_move_ns: u64,
}

/// A window that stays full, its acknowledgements stuck this long, is written off: the
/// sentinel missed the newest messages (dropped by the server), so no acknowledgement is
/// coming for them. Longer than any honest round trip a run sees: at 100,000 members a round
/// (block interval + fan-out to the last member) takes up to ~5 s on this box.
pub const STALL_NS: u64 = 10_000_000_000;

/// What the window allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Room {
    /// This many more messages may go now.
    Open(u64),
    /// Full; wait for acknowledgements.
    Full,
    /// Full and stuck for `STALL_NS`: write off this many in-flight messages.
    Stalled(u64),
}

impl Window {
    pub fn new(size: u64, now_ns: u64) -> Window {
        Window { size, last_acked: 0, last_move_ns: now_ns }
    }

    /// Given the room's published and acknowledged (+ written off) counts at `now_ns`.
    pub fn check(&mut self, published: u64, acked: u64, now_ns: u64) -> Room {
        if acked != self.last_acked {
            self.last_acked = acked;
            self.last_move_ns = now_ns;
        }
        let in_flight = published.saturating_sub(acked);
        if in_flight < self.size {
            // A stall is a window full for STALL_NS: its clock starts when it fills.
            self.last_move_ns = now_ns;
            return Room::Open(self.size - in_flight);
        }
        if now_ns.saturating_sub(self.last_move_ns) >= STALL_NS {
            self.last_move_ns = now_ns;
            return Room::Stalled(in_flight);
        }
        Room::Full
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn book(p: u32, r: u32, mode: Mode) -> Book {
        Book::new(Streams { publishers: p, rooms: r }, 10, mode, 2.0, 0)
    }

    #[test]
    fn rate_caps_cover_rate_times_duration_and_slots_do_not_overlap() {
        let b = book(2, 3, Mode::Rate(300.0));
        // 300/s over 3 rooms, one stream each: 100/s × 2 s + burst 10 + 16.
        assert!(b.stream.iter().all(|s| s.cap == 226), "{:?}", b.stream.iter().map(|s| s.cap).collect::<Vec<_>>());
        assert_eq!(b.tracked(), 3 * 226);
        let sat = book(2, 1, Mode::Saturate(256));
        assert_eq!(sat.tracked(), TRACKED_MAX);
        let huge = book(1, 1, Mode::Rate(1e9));
        assert_eq!(huge.tracked(), TRACKED_MAX);
    }

    #[test]
    fn only_measured_messages_have_slots() {
        let b = book(2, 2, Mode::Rate(100.0));
        assert_eq!(b.slot(1, 0), None, "before the window");
        assert_eq!(b.measured(1), 0);
        b.stream[1].published.store(7, Ordering::Release);
        b.start_measuring(1, 7);
        assert!(b.measuring(1) && !b.measuring(0));
        assert_eq!(b.slot(1, 6), None, "a warm-up message");
        assert_eq!(b.slot(1, 7), Some(b.stream[1].offset as usize));
        let cap = b.stream[1].cap;
        assert_eq!(b.slot(1, 7 + cap - 1), Some((b.stream[1].offset + cap - 1) as usize));
        assert_eq!(b.slot(1, 7 + cap), None);
        b.stream[1].published.store(10, Ordering::Release);
        assert_eq!(b.measured(1), 3);
    }

    #[test]
    fn acks_only_move_forward_and_add_up_per_room() {
        let b = book(3, 2, Mode::Saturate(8));
        // Streams 0 and 2 go into room 0.
        b.stream[0].published.store(10, Ordering::Release);
        b.stream[2].published.store(5, Ordering::Release);
        b.ack(0, 4);
        b.ack(0, 2);
        b.ack(2, 1);
        assert_eq!(b.stream[0].acked.load(Ordering::Acquire), 5);
        assert_eq!(b.room_flight(0), (15, 7));
        b.forgiven[0].fetch_add(3, Ordering::AcqRel);
        assert_eq!(b.room_flight(0), (15, 10));
        assert_eq!(b.room_flight(1), (0, 0));
    }

    #[test]
    fn the_window_opens_by_what_is_acknowledged() {
        let mut w = Window::new(256, 0);
        assert_eq!(w.check(0, 0, 0), Room::Open(256));
        assert_eq!(w.check(200, 0, 1), Room::Open(56));
        assert_eq!(w.check(256, 0, 2), Room::Full);
        assert_eq!(w.check(256, 10, 3), Room::Open(10));
        // Acknowledgements past what was published (a late one after a write-off) open it fully.
        assert_eq!(w.check(256, 300, 4), Room::Open(256));
    }

    #[test]
    fn a_stuck_full_window_is_written_off_once_per_stall() {
        let t0 = 1_000_000_000;
        let mut w = Window::new(4, t0);
        assert_eq!(w.check(4, 0, t0), Room::Full);
        assert_eq!(w.check(4, 0, t0 + STALL_NS - 1), Room::Full);
        assert_eq!(w.check(4, 0, t0 + STALL_NS), Room::Stalled(4));
        assert_eq!(w.check(4, 0, t0 + STALL_NS + 1), Room::Full, "the clock restarts");
        // Acknowledgements that keep coming never stall it.
        let mut w = Window::new(4, t0);
        for i in 1..100 {
            assert_ne!(w.check(4 + i, i, t0 + i * STALL_NS / 2), Room::Stalled(4));
        }
    }
}
