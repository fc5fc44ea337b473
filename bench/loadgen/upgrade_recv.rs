//! The `upgrade` clients' half of a worker (`worker::Reads`): each read goes through the
//! connection's frame reader (`fanout_read::SubReader`, payloads passed on) into its
//! `ServerFrame` walk (`upgrade_walk`), and what the walk finds into the client's `Follower`
//! (`upgrade_follow`): welcomes join, block messages are shown, dropped as duplicates or mark a
//! gap (sent to the short-poll thread, `upgrade_gaps`), a `reconnect` frame announces the close.
//! When a connection ends the follower says when the client comes back, and its next upgrade
//! request resumes `after` its last seq. Clients keep their state across connections (by index,
//! not by slot); the rooms' baselines and final seqs come from the main thread (`RoomSeqs`).
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Sender;

use crate::conn::{Conns, RECONNECT, State};
use crate::errors::{ErrorCounts, ErrorKind};
use crate::fanout_read::{Body, Event, SubReader};
use crate::frames::ReadError;
use crate::handshake::{Subprotocol, resume_request};
use crate::upgrade_follow::{Follower, Seen};
use crate::upgrade_walk::{FRAME_BLOCK, FRAME_ERROR, FRAME_KICKED, FRAME_RECONNECT, FRAME_WELCOME, FollowWalk, Found};
use crate::worker::{Absorbed, Counters, Ended, Reads, Stat};

/// Per room, what the main thread learned from the API: the last seq before publishing began
/// (the baseline: messages after it are the run's) and, at the end, the last seq once publishing
/// stopped (the target every client must reach). 0 while unknown.
pub struct RoomSeqs {
    pub bases: Vec<AtomicU64>,
    pub targets: Vec<AtomicU64>,
    /// Set once every target is stored.
    pub targets_set: AtomicBool,
}

impl RoomSeqs {
    pub fn new(rooms: u32) -> RoomSeqs {
        RoomSeqs {
            bases: (0..rooms).map(|_| AtomicU64::new(0)).collect(),
            targets: (0..rooms).map(|_| AtomicU64::new(0)).collect(),
            targets_set: AtomicBool::new(false),
        }
    }

    fn base(&self, room: u32) -> u64 {
        self.bases[room as usize].load(Ordering::Relaxed)
    }

    pub fn target(&self, room: u32) -> u64 {
        self.targets[room as usize].load(Ordering::Relaxed)
    }
}

/// A gap a client saw: seqs `after + 1 .. until` of `room` never came.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GapAsk {
    pub room: u32,
    pub after: u64,
    pub until: u64,
}

/// What one worker's clients did, as totals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(usize)]
pub enum Tally {
    /// Welcomes received (joins, the first and every resume).
    #[default]
    Welcomes,
    Blocks,
    /// Messages shown in seq order.
    Shown,
    /// Messages at or below the last seq shown, dropped.
    Duplicates,
    /// Messages from before the run's baseline, ignored.
    Stale,
    /// Gaps seen, and the seqs they were missing.
    Gaps,
    GapMessages,
    BackfillBlocks,
    BackfillMessages,
    /// Backfills that said the history no longer reached back to the cursor.
    Truncated,
    ReconnectFrames,
    /// Connections that ended as announced (after a `reconnect` frame).
    Moved,
    /// Joined connections that ended without a `reconnect` frame.
    Unexpected,
    /// Connections that ended before joining (dial or handshake failures), retried.
    FailedStarts,
    /// Frames that were not a well-formed `ServerFrame`, or past the size the reader counts.
    Malformed,
    ErrorFrames,
    Kicked,
    /// Clients at or past their room's target (level, once the targets are set).
    CaughtUp,
}

pub const TALLIES: usize = Tally::CaughtUp as usize + 1;

/// The totals the main thread reads while the run goes (each worker's own).
pub struct TallyShared([AtomicU64; TALLIES]);

impl TallyShared {
    pub fn new() -> TallyShared {
        TallyShared(std::array::from_fn(|_| AtomicU64::new(0)))
    }

    pub fn load(&self, t: Tally) -> u64 {
        self.0[t as usize].load(Ordering::Relaxed)
    }
}

/// One connection's read state.
#[derive(Clone, Copy, Debug)]
pub struct SlotRead {
    reader: SubReader,
    walk: FollowWalk,
    /// The client (index − the worker's first).
    client: u32,
    /// Messages of the open block (a block's backfill flag comes after its messages).
    block_messages: u32,
}

/// One worker's clients.
pub struct FollowReads {
    first: u64,
    rooms: u32,
    room_names: Vec<String>,
    host: String,
    protocol: Subprotocol,
    pub clients: Vec<Follower>,
    seqs: Arc<RoomSeqs>,
    gaps: Sender<GapAsk>,
    pub tally: [u64; TALLIES],
    shared: Arc<TallyShared>,
    /// Whether the caught-up count was taken once the targets were set.
    swept: bool,
    /// Non-fatal oddities, apart from the worker's.
    pub errors: ErrorCounts,
    request: Vec<u8>,
}

impl FollowReads {
    /// Clients `first..first + count`, client i in room `r{i % rooms}`.
    pub fn new(
        first: u64,
        count: u64,
        rooms: u32,
        host: String,
        seqs: Arc<RoomSeqs>,
        gaps: Sender<GapAsk>,
        shared: Arc<TallyShared>,
    ) -> FollowReads {
        FollowReads {
            first,
            rooms,
            room_names: (0..rooms).map(|k| format!("r{k}")).collect(),
            host,
            protocol: Subprotocol::Proto,
            clients: vec![Follower::default(); count as usize],
            seqs,
            gaps,
            tally: [0; TALLIES],
            shared,
            swept: false,
            errors: ErrorCounts::default(),
            request: Vec::new(),
        }
    }

    /// The room of client `index` (run-wide).
    pub fn room_of(&self, index: u64) -> u32 {
        (index % u64::from(self.rooms)) as u32
    }

    /// Seqs the clients had not reached by the end: Σ (room target − last shown), for every
    /// client behind. Needs the targets.
    pub fn behind(&self) -> u64 {
        self.clients
            .iter()
            .enumerate()
            .map(|(k, f)| {
                let room = self.room_of(self.first + k as u64);
                self.seqs.target(room).saturating_sub(f.last(self.seqs.base(room)))
            })
            .sum()
    }

    fn add(&mut self, t: Tally, n: u64) {
        self.tally[t as usize] += n;
    }

    /// Once the targets are set: counts the clients already there (later ones are counted as
    /// they cross).
    fn sweep(&mut self) {
        if self.swept || !self.seqs.targets_set.load(Ordering::Acquire) {
            return;
        }
        self.swept = true;
        self.tally[Tally::CaughtUp as usize] = 0;
        for k in 0..self.clients.len() {
            let room = self.room_of(self.first + k as u64);
            if self.clients[k].last(self.seqs.base(room)) >= self.seqs.target(room) {
                self.tally[Tally::CaughtUp as usize] += 1;
            }
        }
    }

    /// One block message for client `k`.
    fn message(&mut self, k: usize, seq: u64) {
        let room = self.room_of(self.first + k as u64);
        let base = self.seqs.base(room);
        let before = self.clients[k].last(base);
        let seen = self.clients[k].message(seq, base);
        let tally = match seen {
            Seen::Stale => Tally::Stale,
            Seen::Duplicate => Tally::Duplicates,
            Seen::Next => Tally::Shown,
            Seen::Gap { after, missing } => {
                self.add(Tally::GapMessages, missing);
                // The poller may be gone at the very end; the gap stays counted.
                let _ = self.gaps.send(GapAsk { room, after, until: seq });
                self.add(Tally::Shown, 1);
                Tally::Gaps
            }
        };
        self.add(tally, 1);
        if self.swept {
            let target = self.seqs.target(room);
            if before < target && self.clients[k].last(base) >= target {
                self.add(Tally::CaughtUp, 1);
            }
        }
    }

    /// What the walk found in one of client `k`'s frames.
    fn found(&mut self, k: usize, block_messages: &mut u32, state: &mut State, flags: u8, f: Found, c: &mut Counters) {
        match f {
            Found::Frame(FRAME_WELCOME) if *state == State::Open => {
                *state = State::Joined;
                c[Stat::Joined] += 1;
                c[Stat::JoinedTotal] += 1;
                if flags & RECONNECT != 0 {
                    c[Stat::ReconnectsJoined] += 1;
                }
                self.clients[k].joined();
                self.add(Tally::Welcomes, 1);
            }
            Found::Frame(FRAME_ERROR) => self.add(Tally::ErrorFrames, 1),
            Found::Frame(FRAME_KICKED) => self.add(Tally::Kicked, 1),
            // Blocks and reconnects are counted when they end, with what they held.
            Found::Frame(FRAME_BLOCK | FRAME_RECONNECT) | Found::Frame(_) => {}
            Found::Message(seq) => {
                *block_messages += 1;
                self.message(k, seq);
            }
            Found::BlockEnd { backfill, truncated } => {
                c[Stat::Blocks] += 1;
                self.add(Tally::Blocks, 1);
                if backfill {
                    self.add(Tally::BackfillBlocks, 1);
                    self.add(Tally::BackfillMessages, u64::from(*block_messages));
                }
                if truncated {
                    self.add(Tally::Truncated, 1);
                }
                *block_messages = 0;
            }
            Found::Reconnect { delay_ms } => {
                self.clients[k].told_to_reconnect(delay_ms);
                self.add(Tally::ReconnectFrames, 1);
            }
        }
    }
}

impl Reads for FollowReads {
    type Lane = Vec<SlotRead>;

    fn lane(&mut self, capacity: u32) -> Vec<SlotRead> {
        let blank =
            SlotRead { reader: SubReader::new(Body::Pass), walk: FollowWalk::default(), client: 0, block_messages: 0 };
        vec![blank; capacity as usize]
    }

    fn start(&mut self, lane: &mut Vec<SlotRead>, slot: u32, index: u64) {
        let client = u32::try_from(index - self.first).expect("a worker's clients fit in u32");
        lane[slot as usize] =
            SlotRead { reader: SubReader::new(Body::Pass), walk: FollowWalk::default(), client, block_messages: 0 };
    }

    fn absorb(
        &mut self,
        lane: &mut Vec<SlotRead>,
        conns: &mut Conns,
        slot: u32,
        bytes: &[u8],
        c: &mut Counters,
    ) -> Absorbed {
        let s = slot as usize;
        // A copy while the walk runs (it needs `self` too), stored back after.
        let SlotRead { mut reader, mut walk, client, mut block_messages } = lane[s];
        let k = client as usize;
        let flags = conns.flags[s];
        let mut state = conns.state[s];
        let mut out = Absorbed::default();
        let fed = reader.feed(bytes, |e| match e {
            Event::Upgraded => {
                c[Stat::Handshakes] += 1;
                if state == State::Upgrading {
                    state = State::Open;
                }
            }
            Event::Data(d) => walk.feed(d, &mut |f| self.found(k, &mut block_messages, &mut state, flags, f, c)),
            Event::DataEnd => {
                c[Stat::Frames] += 1;
                if walk.finish().is_err() {
                    self.add(Tally::Malformed, 1);
                }
            }
            Event::TooLarge | Event::Malformed | Event::Short => self.add(Tally::Malformed, 1),
            Event::Welcome | Event::Opened | Event::Message(_) => {}
            Event::Ping => out.pong = true,
            Event::Close(code) => {
                out.close.get_or_insert(ErrorKind::ClosedByServer(code));
            }
        });
        conns.state[s] = state;
        lane[s] = SlotRead { reader, walk, client, block_messages };
        match fed {
            Err(ReadError::Head(h)) => out.close = Some(ErrorKind::Head(h)),
            Err(ReadError::Frame(f)) => out.close = Some(ErrorKind::Frame(f)),
            Ok(()) => {}
        }
        out
    }

    fn publish(&mut self) {
        self.sweep();
        for (a, v) in self.shared.0.iter().zip(self.tally) {
            a.store(v, Ordering::Relaxed);
        }
    }

    fn request(&mut self, index: u64, room: u32) -> Option<&[u8]> {
        let k = usize::try_from(index - self.first).ok()?;
        let after = self.clients.get(k)?.resume_after(self.seqs.base(room))?;
        resume_request(&mut self.request, &self.host, &self.room_names[room as usize], after, self.protocol);
        Some(&self.request)
    }

    fn ended(&mut self, index: u64, _why: ErrorKind, joined: bool) -> Ended {
        let Some(f) = usize::try_from(index - self.first).ok().and_then(|k| self.clients.get_mut(k)) else {
            return Ended::default();
        };
        let (expected, wait) = f.ended(index);
        let tally = match (expected, joined) {
            (true, _) => Tally::Moved,
            (false, true) => Tally::Unexpected,
            (false, false) => Tally::FailedStarts,
        };
        self.add(tally, 1);
        Ended { expected, reopen_after: Some(wait) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use barrage::proto::{Block, Message, Reconnect, ServerFrame, Welcome, server_frame::Frame};
    use prost::Message as _;
    use std::sync::mpsc::Receiver;
    use std::time::Duration;

    const HEAD: &[u8] =
        b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
    const BASE: u64 = 1_882_449_317_462_016;

    fn frame(f: Frame) -> Vec<u8> {
        let payload = ServerFrame { frame: Some(f) }.encode_to_vec();
        let mut out = vec![0x82];
        if payload.len() < 126 {
            out.push(payload.len() as u8);
        } else {
            out.push(126);
            out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        out.extend_from_slice(&payload);
        out
    }

    fn block(seqs: std::ops::RangeInclusive<u64>, backfill: bool) -> Vec<u8> {
        let messages = seqs
            .map(|s| Message { seq: BASE + s, room: "r1".into(), data: vec![b'.'; 100], ..Default::default() })
            .collect();
        frame(Frame::Block(Block { room: "r1".into(), messages, backfill, ..Default::default() }))
    }

    /// Clients 10..14 of a run with 2 rooms (10 and 12 in r0, 11 and 13 in r1); one lane of 4.
    fn setup() -> (FollowReads, Vec<SlotRead>, Conns, Arc<RoomSeqs>, Receiver<GapAsk>, Arc<TallyShared>) {
        let seqs = Arc::new(RoomSeqs::new(2));
        let (tx, rx) = std::sync::mpsc::channel();
        let shared = Arc::new(TallyShared::new());
        let mut r = FollowReads::new(10, 4, 2, "127.0.0.1:8080".into(), Arc::clone(&seqs), tx, Arc::clone(&shared));
        let lane = r.lane(4);
        (r, lane, Conns::new(4), seqs, rx, shared)
    }

    #[test]
    fn a_client_joins_follows_is_told_to_move_and_resumes_after_its_last_seq() {
        let (mut r, mut lane, mut conns, seqs, gaps, shared) = setup();
        let mut c = Counters::default();
        r.start(&mut lane, 2, 11);
        conns.state[2] = State::Upgrading;
        let mut bytes = HEAD.to_vec();
        bytes.extend(frame(Frame::Welcome(Welcome::default())));
        bytes.extend(block(0..=0, true));
        let out = r.absorb(&mut lane, &mut conns, 2, &bytes, &mut c);
        assert_eq!(out, Absorbed::default());
        assert_eq!(conns.state[2], State::Joined);
        assert_eq!((c[Stat::Joined], c[Stat::Handshakes], c[Stat::Frames]), (1, 1, 2));
        assert_eq!(r.tally[Tally::Stale as usize], 1, "before the baseline is known");
        assert_eq!(r.request(11, 1), None, "nothing to resume from yet: the plan's request");
        seqs.bases[1].store(BASE, Ordering::Relaxed);
        // Split anywhere: blocks 1-2, a duplicate 2, a gap (3 and 4 missing), then the move.
        let mut bytes = block(1..=2, false);
        bytes.extend(block(2..=2, false));
        bytes.extend(block(5..=6, false));
        bytes.extend(frame(Frame::Reconnect(Reconnect {
            delay_ms: 1500,
            reason: "upgrade".into(),
            url: String::new(),
        })));
        bytes.extend([0x88, 0x02, 0x03, 0xE9]);
        let (a, b) = bytes.split_at(37);
        assert_eq!(r.absorb(&mut lane, &mut conns, 2, a, &mut c).close, None);
        let out = r.absorb(&mut lane, &mut conns, 2, b, &mut c);
        assert_eq!(out.close, Some(ErrorKind::ClosedByServer(Some(1001))));
        let t = |x: Tally| r.tally[x as usize];
        assert_eq!((t(Tally::Shown), t(Tally::Duplicates), t(Tally::Gaps), t(Tally::GapMessages)), (4, 1, 1, 2));
        assert_eq!((t(Tally::ReconnectFrames), t(Tally::BackfillBlocks), t(Tally::BackfillMessages)), (1, 1, 1));
        assert_eq!(gaps.try_recv(), Ok(GapAsk { room: 1, after: BASE + 2, until: BASE + 5 }));
        // The worker kills the connection: announced, back after the frame's delay.
        let e = r.ended(11, ErrorKind::ClosedByServer(Some(1001)), true);
        assert_eq!(e, Ended { expected: true, reopen_after: Some(Duration::from_millis(1500)) });
        let req = String::from_utf8(r.request(11, 1).unwrap().to_vec()).unwrap();
        assert!(req.starts_with(&format!("GET /ws?room=r1&after={} HTTP/1.1\r\n", BASE + 6)), "{req}");
        // Closed again without a frame: unexpected, with a backoff.
        let e = r.ended(11, ErrorKind::Eof, true);
        assert!(!e.expected && e.reopen_after.unwrap() >= Duration::from_millis(100));
        assert_eq!((r.tally[Tally::Moved as usize], r.tally[Tally::Unexpected as usize]), (1, 1));
        r.publish();
        assert_eq!(shared.load(Tally::Shown), 4);
    }

    #[test]
    fn the_targets_count_who_caught_up_and_who_is_behind() {
        let (mut r, mut lane, mut conns, seqs, _gaps, shared) = setup();
        let mut c = Counters::default();
        seqs.bases[0].store(BASE, Ordering::Relaxed);
        seqs.bases[1].store(BASE + 100, Ordering::Relaxed);
        // Client 10 (r0) has seen 1..=3; client 12 (r0) nothing; 11 and 13 (r1) nothing.
        r.start(&mut lane, 0, 10);
        conns.state[0] = State::Upgrading;
        let mut bytes = HEAD.to_vec();
        bytes.extend(frame(Frame::Welcome(Welcome::default())));
        bytes.extend(block(1..=3, false));
        r.absorb(&mut lane, &mut conns, 0, &bytes, &mut c);
        seqs.targets[0].store(BASE + 4, Ordering::Relaxed);
        seqs.targets[1].store(BASE + 100, Ordering::Relaxed);
        r.publish();
        assert_eq!(shared.load(Tally::CaughtUp), 0, "not before the targets are all set");
        seqs.targets_set.store(true, Ordering::Release);
        r.publish();
        assert_eq!(shared.load(Tally::CaughtUp), 2, "r1 had nothing to follow");
        assert_eq!(r.behind(), 1 + 4, "client 10 misses seq 4, client 12 all four");
        r.absorb(&mut lane, &mut conns, 0, &block(4..=4, false), &mut c);
        r.publish();
        assert_eq!((shared.load(Tally::CaughtUp), r.behind()), (3, 4));
    }

    #[test]
    fn a_slot_s_read_state_stays_small() {
        assert!(std::mem::size_of::<SlotRead>() <= 176, "{}", std::mem::size_of::<SlotRead>());
    }
}
