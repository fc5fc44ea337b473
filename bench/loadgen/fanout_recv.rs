//! The `fanout` subscribers' half of a worker (`worker::Reads`): each read goes through the
//! connection's `SubReader`; every message found is checked against the book, counted, its
//! latency recorded in the thread's histogram and its delivery in the thread's tracker (per
//! measured message: how many members got it, and the slowest one's latency). A room's first
//! LAST member is its sentinel: what it receives opens the saturate window. Nothing here allocates
//! per read, frame or message; the histogram and trackers are sized before the first read.
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::Ordering;

use hdrhistogram::Histogram;

use crate::conn::{Conns, State};
use crate::errors::{ErrorCounts, ErrorKind};
use crate::fanout_book::Book;
use crate::fanout_msg::{HEADER_BYTES, Header, Kind};
use crate::fanout_read::{Body, Event, SubReader};
use crate::frames::ReadError;
use crate::sys::monotonic_ns;
use crate::worker::{Absorbed, Counters, Reads, Stat};

/// Latencies recorded up to an hour (ns), 3 significant digits: ~260 KiB a histogram.
pub const LATENCY_NS_MAX: u64 = 3_600_000_000_000;

/// One subscriber.
#[derive(Clone, Copy, Debug)]
pub struct SubConn {
    reader: SubReader,
    room: u32,
    /// The room's first member: its receipts acknowledge the saturate window.
    sentinel: bool,
    /// Stops reading once subscribed (`--stalled`).
    stalled: bool,
    /// Messages of ours in the data message being read.
    frame_messages: u32,
}

/// Totals of one receiving thread.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Deliveries of measured messages (each member's copy counts).
    pub delivered: u64,
    /// Messages of this run received, measured or not.
    pub received: u64,
    /// Messages sent before this run started (barrage's history backfill of an earlier run).
    pub stale: u64,
    /// Received while the window was open (by receive time): messages, data frames, bytes.
    pub window_messages: u64,
    pub window_frames: u64,
    pub window_bytes: u64,
    /// The most messages of ours seen in one data frame.
    pub max_per_frame: u64,
}

impl Tally {
    pub fn merge(&mut self, o: &Tally) {
        self.delivered += o.delivered;
        self.received += o.received;
        self.stale += o.stale;
        self.window_messages += o.window_messages;
        self.window_frames += o.window_frames;
        self.window_bytes += o.window_bytes;
        self.max_per_frame = self.max_per_frame.max(o.max_per_frame);
    }
}

/// One worker's receiving side.
pub struct FanoutReads {
    kind: Kind,
    book: Arc<Book>,
    pub latency: Histogram<u64>,
    /// Per tracker slot (see `Book::slot`): deliveries, and the slowest one's latency (µs, up).
    pub counts: Vec<u32>,
    pub worst_us: Vec<u32>,
    pub tally: Tally,
    /// Non-fatal oddities (`short_message`, `wrong_room`, ...), apart from the worker's.
    pub errors: ErrorCounts,
    /// What `publish` has added to the book's live totals so far.
    shown: (u64, u64),
    /// Per room, the masked frame a member sends to join once the server opened (Socket.IO,
    /// Pusher); empty for the others.
    hellos: &'static [Vec<u8>],
}

impl FanoutReads {
    pub fn new(kind: Kind, book: Arc<Book>) -> FanoutReads {
        let tracked = book.tracked() as usize;
        FanoutReads {
            kind,
            latency: Histogram::new_with_bounds(1, LATENCY_NS_MAX, 3).expect("valid histogram bounds"),
            counts: vec![0; tracked],
            worst_us: vec![0; tracked],
            tally: Tally::default(),
            errors: ErrorCounts::default(),
            shown: (0, 0),
            hellos: hellos(kind, book.streams.rooms),
            book,
        }
    }

    /// Takes one message: true if it is one of this run's.
    fn deliver(&mut self, room: u32, sentinel: bool, hdr: &[u8; HEADER_BYTES], now_ns: u64, in_window: bool) -> bool {
        let h = Header::read(hdr);
        if h.send_ns < self.book.run_start_ns {
            self.tally.stale += 1;
            return false;
        }
        if h.room != room {
            self.errors.add(ErrorKind::Named("wrong_room"));
            return false;
        }
        let Some(j) = self.book.streams.id(h.publisher, h.room) else {
            self.errors.add(ErrorKind::Named("foreign_message"));
            return false;
        };
        self.tally.received += 1;
        if in_window {
            self.tally.window_messages += 1;
        }
        if sentinel {
            self.book.ack(j, h.seq);
        }
        if let Some(slot) = self.book.slot(j, h.seq) {
            let ns = now_ns.saturating_sub(h.send_ns);
            self.latency.saturating_record(ns);
            self.counts[slot] = self.counts[slot].saturating_add(1);
            let us = u32::try_from(ns.div_ceil(1000)).unwrap_or(u32::MAX);
            self.worst_us[slot] = self.worst_us[slot].max(us);
            self.tally.delivered += 1;
        }
        true
    }
}

impl Reads for FanoutReads {
    type Lane = Vec<SubConn>;

    fn lane(&mut self, capacity: u32) -> Vec<SubConn> {
        let body = match self.kind {
            Kind::Barrage => Body::proto(),
            kind if kind.tagged() => Body::tagged(),
            _ => Body::raw(),
        };
        let blank =
            SubConn { reader: SubReader::new(body), room: 0, sentinel: false, stalled: false, frame_messages: 0 };
        vec![blank; capacity as usize]
    }

    fn start(&mut self, lane: &mut Vec<SubConn>, slot: u32, index: u64) {
        let rooms = u64::from(self.book.streams.rooms);
        let c = &mut lane[slot as usize];
        c.room = (index % rooms) as u32;
        // A room's sentinel is its LAST subscriber: the servers here serve members in join
        // order, so what it has received, the whole room has (nearly) received, and a saturate
        // window closed on it publishes as fast as the whole room takes messages.
        c.sentinel = index + rooms >= self.book.members;
        c.stalled = self.book.is_stalled(index);
        c.frame_messages = 0;
    }

    fn absorb(
        &mut self,
        lane: &mut Vec<SubConn>,
        conns: &mut Conns,
        slot: u32,
        bytes: &[u8],
        c: &mut Counters,
    ) -> Absorbed {
        let s = slot as usize;
        let now_ns = monotonic_ns();
        let (start_ns, end_ns) = self.book.window();
        let in_window = (start_ns..end_ns).contains(&now_ns);
        if in_window {
            self.tally.window_bytes += bytes.len() as u64;
        }
        let conn = &mut lane[s];
        let (room, sentinel) = (conn.room, conn.sentinel);
        let state = &mut conns.state[s];
        let kind = self.kind;
        let mut out = Absorbed::default();
        let fed = conn.reader.feed(bytes, |e| match e {
            Event::Upgraded => {
                c[Stat::Handshakes] += 1;
                if *state == State::Upgrading {
                    *state = State::Open;
                    // barrage's members join with their welcome, Socket.IO's and Pusher's
                    // once the server acknowledged the join (the body's `Welcome`).
                    if kind != Kind::Barrage && !kind.tagged() {
                        join(state, c);
                    }
                }
            }
            Event::Welcome if (kind == Kind::Barrage || kind.tagged()) && *state == State::Open => join(state, c),
            Event::Welcome => {}
            Event::Opened => out.hello = self.hellos.get(room as usize).map(Vec::as_slice),
            Event::Message(h) => {
                if self.deliver(room, sentinel, h, now_ns, in_window) {
                    conn.frame_messages += 1;
                }
            }
            Event::DataEnd => {
                c[Stat::Frames] += 1;
                if in_window {
                    self.tally.window_frames += 1;
                }
                self.tally.max_per_frame = self.tally.max_per_frame.max(u64::from(conn.frame_messages));
                conn.frame_messages = 0;
            }
            Event::Short => self.errors.add(ErrorKind::Named("short_message")),
            Event::Data(_) => {}
            Event::Malformed => self.errors.add(ErrorKind::Named("malformed_frame")),
            Event::TooLarge => self.errors.add(ErrorKind::Named("frame_too_large")),
            Event::Ping => out.pong = true,
            Event::Close(code) => {
                out.close.get_or_insert(ErrorKind::ClosedByServer(code));
            }
        });
        match fed {
            Err(ReadError::Head(h)) => out.close = Some(ErrorKind::Head(h)),
            Err(ReadError::Frame(f)) => out.close = Some(ErrorKind::Frame(f)),
            Ok(()) => {}
        }
        // A stalled member reads until it is subscribed, then never again.
        out.stall = conn.stalled && *state == State::Joined;
        out
    }

    fn publish(&mut self) {
        let (d, r) = (self.tally.delivered, self.tally.received);
        self.book.delivered.fetch_add(d - self.shown.0, Ordering::Relaxed);
        self.book.received.fetch_add(r - self.shown.1, Ordering::Relaxed);
        self.shown = (d, r);
    }
}

/// Each room's join message as a masked text frame, built once per kind and room count.
fn hellos(kind: Kind, rooms: u32) -> &'static [Vec<u8>] {
    type Built = Vec<(Kind, u32, &'static [Vec<u8>])>;
    static BUILT: std::sync::Mutex<Built> = std::sync::Mutex::new(Vec::new());
    let Ok(mut built) = BUILT.lock() else { return &[] };
    if let Some((_, _, h)) = built.iter().find(|(k, r, _)| *k == kind && *r == rooms) {
        return h;
    }
    let frames: Vec<Vec<u8>> = (0..rooms)
        .filter_map(|k| kind.hello(k))
        .map(|text| {
            let mut f = Vec::new();
            // A fixed mask: nothing here is secret.
            barrage::wire::frame::masked_frame(true, 0x1, text.as_bytes(), [0x5a, 0x17, 0xc3, 0x81], &mut f);
            f
        })
        .collect();
    let leaked: &'static [Vec<u8>] = Box::leak(frames.into_boxed_slice());
    built.push((kind, rooms, leaked));
    leaked
}

fn join(state: &mut State, c: &mut Counters) {
    *state = State::Joined;
    c[Stat::Joined] += 1;
    c[Stat::JoinedTotal] += 1;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fanout_book::Mode;
    use crate::fanout_msg::{Streams, message};

    const HEAD: &[u8] =
        b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0x82, payload.len() as u8];
        f.extend_from_slice(payload);
        f
    }

    fn msg(seq: u64, send_ns: u64, room: u32, publisher: u32) -> Vec<u8> {
        let mut m = Vec::new();
        message(&Header { seq, send_ns, room, publisher }, 100, &mut m);
        m
    }

    #[test]
    fn broadcast_subscribers_join_on_the_101_and_count_measured_messages() {
        let book = Arc::new(Book::new(Streams { publishers: 1, rooms: 2 }, 4, Mode::Rate(10.0), 1.0, 1000));
        let now = monotonic_ns();
        book.set_window(now - 1_000_000, now + 60_000_000_000);
        // Stream 0 (room 0): seqs 0-1 warm-up, measured from 2.
        book.stream[0].published.store(4, Ordering::Release);
        book.start_measuring(0, 2);
        let mut r = FanoutReads::new(Kind::Broadcast, Arc::clone(&book));
        let mut lane = r.lane(4);
        let mut conns = Conns::new(4);
        let mut c = Counters::default();
        // Slot 0 is member 2, room 0's last member and so its sentinel; slot 1 is member 0.
        r.start(&mut lane, 0, 2);
        r.start(&mut lane, 1, 0);
        conns.state[0] = State::Upgrading;
        conns.state[1] = State::Upgrading;
        let mut bytes = HEAD.to_vec();
        bytes.extend(frame(&msg(1, now - 5_000, 0, 0)));
        bytes.extend(frame(&msg(2, now - 5_000, 0, 0)));
        bytes.extend(frame(&msg(3, now - 2_000, 0, 0)));
        bytes.extend(frame(&msg(3, 10, 0, 0)));
        bytes.extend(frame(&msg(3, now, 1, 0)));
        bytes.extend(frame(&[1, 2]));
        bytes.extend([0x89, 0x00]);
        let got = r.absorb(&mut lane, &mut conns, 0, &bytes, &mut c);
        assert_eq!(got, Absorbed { close: None, pong: true, stall: false, hello: None });
        assert_eq!(conns.state[0], State::Joined);
        assert_eq!((c[Stat::Joined], c[Stat::Handshakes], c[Stat::Frames]), (1, 1, 6));
        assert_eq!(r.tally.received, 3, "the warm-up one and two measured");
        assert_eq!(r.tally.delivered, 2);
        assert_eq!(r.tally.stale, 1);
        assert_eq!(r.tally.window_frames, 6);
        assert_eq!(r.latency.len(), 2);
        assert!(r.latency.min() >= 2_000);
        let off = book.stream[0].offset as usize;
        assert_eq!(&r.counts[off..off + 3], &[1, 1, 0]);
        assert!(r.worst_us[off] >= 5 && r.worst_us[off + 1] >= 2);
        assert_eq!(book.stream[0].acked.load(Ordering::Acquire), 4, "the sentinel acknowledged seq 3");
        let mut m = std::collections::BTreeMap::new();
        r.errors.merge_into(&mut m);
        assert_eq!(m.get("wrong_room"), Some(&1));
        assert_eq!(m.get("short_message"), Some(&1));
        // The second member (not a sentinel) of room 0 is closed by the server.
        let mut bytes = HEAD.to_vec();
        bytes.extend(frame(&msg(2, now - 1_000, 0, 0)));
        bytes.extend([0x88, 0x02, 0x03, 0xE9]);
        let got = r.absorb(&mut lane, &mut conns, 1, &bytes, &mut c);
        assert_eq!(got.close, Some(ErrorKind::ClosedByServer(Some(1001))));
        assert_eq!(r.counts[off], 2);
        assert_eq!(book.stream[0].acked.load(Ordering::Acquire), 4);
        r.publish();
        assert_eq!(book.delivered.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn barrage_subscribers_join_on_the_welcome() {
        use barrage::proto::{ServerFrame, Welcome, server_frame};
        use prost::Message as _;
        let book = Arc::new(Book::new(Streams { publishers: 1, rooms: 1 }, 1, Mode::Saturate(4), 1.0, 0));
        let mut r = FanoutReads::new(Kind::Barrage, book);
        let mut lane = r.lane(1);
        let mut conns = Conns::new(1);
        let mut c = Counters::default();
        r.start(&mut lane, 0, 0);
        conns.state[0] = State::Upgrading;
        r.absorb(&mut lane, &mut conns, 0, HEAD, &mut c);
        assert_eq!(conns.state[0], State::Open);
        let w = ServerFrame { frame: Some(server_frame::Frame::Welcome(Welcome::default())) }.encode_to_vec();
        let mut f = vec![0x82, w.len() as u8];
        f.extend_from_slice(&w);
        r.absorb(&mut lane, &mut conns, 0, &f, &mut c);
        assert_eq!(conns.state[0], State::Joined);
        assert_eq!(c[Stat::Joined], 1);
    }

    #[test]
    fn stalled_members_stop_reading_once_subscribed_and_are_not_expected() {
        use barrage::proto::{ServerFrame, Welcome, server_frame};
        use prost::Message as _;
        let mut book = Book::new(Streams { publishers: 1, rooms: 2 }, 5, Mode::Saturate(4), 1.0, 0);
        book.stalled = 3;
        // Members 0, 2, 4 are in room 0 (0 and 2 stalled), 1 and 3 in room 1 (1 stalled).
        assert_eq!((book.readers_in(0), book.readers_in(1)), (1, 1));
        let mut r = FanoutReads::new(Kind::Barrage, Arc::new(book));
        let mut lane = r.lane(2);
        let mut conns = Conns::new(2);
        let mut c = Counters::default();
        r.start(&mut lane, 0, 2);
        r.start(&mut lane, 1, 4);
        let w = ServerFrame { frame: Some(server_frame::Frame::Welcome(Welcome::default())) }.encode_to_vec();
        let mut bytes = HEAD.to_vec();
        bytes.extend([0x82, w.len() as u8]);
        bytes.extend_from_slice(&w);
        for slot in 0..2 {
            conns.state[slot] = State::Upgrading;
            let got = r.absorb(&mut lane, &mut conns, slot as u32, &bytes, &mut c);
            assert_eq!(conns.state[slot], State::Joined, "both subscribe");
            assert_eq!(got.stall, slot == 0, "only member 2 stalls");
        }
    }
}
