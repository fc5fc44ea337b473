//! barrage-floor: the fan-out floor of this box, the reference point of bench/fanout.sh. A
//! minimal one-room-per-name broadcast server on barrage's own io_uring driver, speaking the peer
//! contract of bench/peers/README.md (`GET /sub?room=R` subscribes, every binary message of a
//! `GET /pub?room=R` publisher goes to each subscriber of R as one binary frame).
//!
//! Nothing a real gateway needs is here: no mixer, no priorities, no heartbeats, no limits but
//! one. Each published message is framed ONCE (header + payload, one buffer) and that buffer is
//! written to every subscriber: one send per subscriber per message (`--frames-per-send 1`), or,
//! with `--frames-per-send K`, one sendmsg carrying up to K of the messages a subscriber has
//! pending (an iovec per frame, still no copy). One thread, direct descriptors, one ring per
//! ~19,000 connections (the kernel caps a ring's table at RLIMIT_NOFILE), so it holds 100k+.
//!
//! The one limit: a subscriber gets at most one send in flight (two in flight on one socket
//! could complete out of order); while it is, the room's log keeps the last BACKLOG_MESSAGES
//! messages for it. A subscriber further behind than that skips the oldest, counted as
//! `dropped` and printed. Subscribers' pings are not answered; a Close or EOF ends them.
//!
//! Turn: reap every ring (accepts, handshakes, publishers' frames into room logs, send
//! completions), then flush (one send for every idle subscriber that is behind), submit, sleep.
#![deny(clippy::undocumented_unsafe_blocks)]

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use barrage::shard::driver::{Cqe, Ring, RingParams};
use barrage::shard::{listener, sys};
use barrage::wire::frame::{self, Opcode};
use barrage::wire::handshake::{self, HandshakeLimits, Parsed};
use barrage::wire::{Event, Flow, ReadLimits, Reader};
use clap::Parser;
use slab::Slab;

/// barrage-floor: minimal io_uring broadcast server (bench/floor/main.rs).
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Port to listen on, on 127.0.0.1.
    #[arg(long, env = "PORT", default_value_t = 8080)]
    port: u16,
    /// Most pending messages one send to a subscriber may carry (1 = send; more = sendmsg).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=BACKLOG_MESSAGES))]
    frames_per_send: u64,
}

/// Messages a room keeps for subscribers whose previous send is still in flight; one further
/// behind skips the oldest (counted). A power of two, at least the largest frames-per-send.
/// Large enough that the benchmark's closed loop never makes the floor drop: the floor measures the
/// send path, not a queue policy.
const BACKLOG_MESSAGES: u64 = 4096;
const RING_ENTRIES: u32 = 8192;
/// Receive buffers per ring: only handshakes and publishers' frames arrive.
const RECV_BUFFERS: u16 = 256;
const RECV_BUFFER_BYTES: u32 = 4096;
const RINGS_MAX: usize = 64;
/// listen(2) backlog. A multishot accept drains the whole accept queue into the ring's table in
/// one go, so the accepting ring moves on with ACCEPT_MARGIN slots still free: a connection
/// accepted into a full table would be lost. Connect storms beyond it wait in SYN retries.
const LISTEN_BACKLOG: u32 = 4096;
const ACCEPT_MARGIN: u32 = LISTEN_BACKLOG + 1024;
const SLEEP_MAX: Duration = Duration::from_millis(500);
const HANDSHAKE: HandshakeLimits = HandshakeLimits { request_bytes_max: 4096, headers_max: 32 };
const READ: ReadLimits = ReadLimits { frame_bytes_max: 1 << 20, message_bytes_max: 1 << 20, deflate: false };

/// Operation in the top byte of user_data; the low 32 bits are the connection key.
const ACCEPT: u8 = 1;
const RECV: u8 = 2;
const SEND: u8 = 3;
const CLOSE: u8 = 4;
const CANCEL: u8 = 5;
const WAKE: u8 = 6;

fn ud(op: u8, key: usize) -> u64 {
    (u64::from(op) << 56) | key as u64
}

fn main() -> io::Result<()> {
    let args = Args::parse();
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())?;
    }
    let files_max = u32::try_from(sys::raise_nofile_limit()?.saturating_sub(1024)).unwrap_or(u32::MAX);
    assert!(files_max > 2 * ACCEPT_MARGIN, "RLIMIT_NOFILE too low for a ring of useful size");
    let addr = SocketAddr::from(([127, 0, 0, 1], args.port));
    let listener = listener::bind(addr, LISTEN_BACKLOG, 0, 0)?;
    let wake = sys::eventfd()?;
    let mut floor = Floor::new(listener.as_raw_fd(), wake.as_raw_fd(), files_max, args.frames_per_send)?;
    eprintln!(
        "barrage-floor on {addr}: 1 thread, {files_max} direct descriptors per ring, \
         {} frame(s) per send, backlog {BACKLOG_MESSAGES} messages per subscriber",
        args.frames_per_send
    );
    floor.run(&stop)?;
    floor.report("stopped");
    Ok(())
}

struct Floor {
    rings: Vec<Ring>,
    accept_ring: usize,
    listen_fd: RawFd,
    wake_fd: RawFd,
    wake_buf: Box<[u8; 8]>,
    files_max: u32,
    frames_per_send: u64,
    conns: Slab<Conn>,
    rooms: Rooms,
    msgs: Msgs,
    batches: Batches,
    /// Subscribers whose send just completed: flushed at the end of the turn.
    ready: Vec<usize>,
    stats: Stats,
}

struct Conn {
    ring: usize,
    slot: u32,
    role: Role,
    /// The request head while it arrives, then our answer (101 or refusal) while it is sent.
    head: Vec<u8>,
    reader: Reader,
    room: u32,
    /// Index in the room's member list.
    member: usize,
    /// Room sequence of the next message this subscriber needs.
    next: u64,
    inflight: Inflight,
    recv_armed: bool,
    closing: bool,
    close_sent: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Handshake,
    Refused,
    Sub,
    Pub,
}

#[derive(Clone, Copy)]
enum Inflight {
    Idle,
    Head { off: usize },
    One { msg: u32, off: usize },
    Many { batch: u32 },
}

#[derive(Default)]
struct Stats {
    subscribers: u64,
    subscribers_max: u64,
    published: u64,
    sends: u64,
    frames: u64,
    dropped: u64,
    ring_full: u64,
}

impl Floor {
    fn new(listen_fd: RawFd, wake_fd: RawFd, files_max: u32, frames_per_send: u64) -> io::Result<Floor> {
        let mut floor = Floor {
            rings: Vec::new(),
            accept_ring: 0,
            listen_fd,
            wake_fd,
            wake_buf: Box::new([0; 8]),
            files_max,
            frames_per_send,
            conns: Slab::new(),
            rooms: Rooms::default(),
            msgs: Msgs::default(),
            batches: Batches::default(),
            ready: Vec::new(),
            stats: Stats::default(),
        };
        floor.open_ring()?;
        floor.rings[0].accept_multi(listen_fd, ud(ACCEPT, 0))?;
        Ok(floor)
    }

    /// Ring 0 sleeps for all; every later ring signals the eventfd that ring 0 reads.
    fn open_ring(&mut self) -> io::Result<usize> {
        let params = RingParams {
            entries: RING_ENTRIES,
            files_max: self.files_max,
            recv_buffers: RECV_BUFFERS,
            recv_buffer_bytes: RECV_BUFFER_BYTES,
        };
        let notify = (!self.rings.is_empty()).then_some(self.wake_fd);
        let mut ring = Ring::new(params, notify)?;
        if notify.is_some() {
            ring.set_notify(false);
        }
        self.rings.push(ring);
        if self.rings.len() == 2 {
            self.arm_wake()?;
        }
        Ok(self.rings.len() - 1)
    }

    fn arm_wake(&mut self) -> io::Result<()> {
        let buf = self.wake_buf.as_mut_ptr();
        // SAFETY: `wake_buf` is boxed (it never moves) and lives as long as the rings; only this
        // read, of which one is pending at a time, touches it.
        unsafe { self.rings[0].read(self.wake_fd, buf, 8, ud(WAKE, 0)) }
    }

    fn run(&mut self, stop: &AtomicBool) -> io::Result<()> {
        let mut cqes = Vec::new();
        let mut last_report = (Instant::now(), 0);
        while !stop.load(Ordering::Relaxed) {
            let mut reaped = 0;
            for r in 0..self.rings.len() {
                cqes.clear();
                self.rings[r].reap(&mut cqes);
                reaped += cqes.len();
                for &c in &cqes {
                    self.complete(r, c)?;
                }
            }
            self.flush()?;
            for ring in &mut self.rings {
                ring.submit()?;
            }
            if reaped == 0 {
                self.sleep()?;
            }
            if last_report.0.elapsed() >= Duration::from_secs(10) && last_report.1 != self.stats.published {
                self.report("running");
                last_report = (Instant::now(), self.stats.published);
            }
        }
        Ok(())
    }

    /// Sleeps on ring 0 until a completion on any ring (the others signal the eventfd, but only
    /// while notification is on: turned on here, then rings are checked once more).
    fn sleep(&mut self) -> io::Result<()> {
        for ring in &mut self.rings[1..] {
            ring.set_notify(true);
        }
        if !self.rings.iter_mut().any(Ring::has_completions) {
            self.rings[0].submit_and_wait(SLEEP_MAX)?;
        }
        for ring in &mut self.rings[1..] {
            ring.set_notify(false);
        }
        Ok(())
    }

    fn complete(&mut self, r: usize, c: Cqe) -> io::Result<()> {
        let key = c.user_data as u32 as usize;
        match (c.user_data >> 56) as u8 {
            ACCEPT => self.accepted(r, c),
            RECV => self.received(key, c),
            SEND => self.sent(key, c),
            CLOSE => {
                let conn = self.conns.remove(key);
                self.rings[conn.ring].files_used -= 1;
                Ok(())
            }
            WAKE => self.arm_wake(),
            _ => Ok(()),
        }
    }

    fn accepted(&mut self, r: usize, c: Cqe) -> io::Result<()> {
        if c.result >= 0 {
            let slot = c.result as u32;
            self.rings[r].files_used += 1;
            let key = self.conns.insert(Conn::new(r, slot));
            self.rings[r].recv_multi(slot, ud(RECV, key))?;
            self.conns[key].recv_armed = true;
        } else if c.result == -libc::ENFILE {
            self.stats.ring_full += 1;
        } else if c.result != -libc::ECANCELED {
            eprintln!("barrage-floor: accept: {}", io::Error::from_raw_os_error(-c.result));
        }
        if r != self.accept_ring {
            return Ok(());
        }
        let ring = &self.rings[r];
        let full = ring.files_used + ACCEPT_MARGIN >= ring.files_max || c.result == -libc::ENFILE;
        if full && self.rings.len() < RINGS_MAX {
            // Accept into a fresh ring from now on; the old one keeps its connections.
            if c.more() {
                self.rings[r].cancel_request(ud(ACCEPT, 0), ud(CANCEL, 0))?;
            }
            self.accept_ring = self.open_ring()?;
            self.rings[self.accept_ring].accept_multi(self.listen_fd, ud(ACCEPT, 0))?;
        } else if !c.more() {
            self.rings[r].accept_multi(self.listen_fd, ud(ACCEPT, 0))?;
        }
        Ok(())
    }

    fn received(&mut self, key: usize, c: Cqe) -> io::Result<()> {
        let Some(conn) = self.conns.get_mut(key) else { return Ok(()) };
        if !c.more() {
            conn.recv_armed = false;
        }
        if c.result == -libc::ENOBUFS && !conn.closing {
            // Every provided buffer was taken: they are back by now, read again.
            if !conn.recv_armed {
                self.rings[conn.ring].recv_multi(conn.slot, ud(RECV, key))?;
                conn.recv_armed = true;
            }
            return Ok(());
        }
        if c.result <= 0 || conn.closing {
            if let Some(bid) = c.buffer() {
                self.rings[conn.ring].recycle(bid);
            }
            return self.close(key);
        }
        let (r, role, room) = (conn.ring, conn.role, conn.room);
        let Some(bid) = c.buffer() else { return self.close(key) };
        let ended = {
            let Floor { rings, conns, rooms, msgs, stats, .. } = self;
            let conn = &mut conns[key];
            let ended = match rings[r].buffer(bid, c.result as usize) {
                None => true,
                Some(data) => match role {
                    Role::Handshake => {
                        conn.head.extend_from_slice(data);
                        false
                    }
                    Role::Pub => feed(&mut conn.reader, data, |p| rooms.publish(msgs, stats, room, p)),
                    Role::Sub | Role::Refused => feed(&mut conn.reader, data, |_| {}),
                },
            };
            rings[r].recycle(bid);
            ended
        };
        if ended {
            return self.close(key);
        }
        if role == Role::Handshake {
            self.handshake(key)?;
        }
        let conn = &mut self.conns[key];
        if !conn.recv_armed && !conn.closing {
            self.rings[conn.ring].recv_multi(conn.slot, ud(RECV, key))?;
            conn.recv_armed = true;
        }
        Ok(())
    }

    /// Parses the request head so far; once complete, answers it (101 or a refusal) and joins
    /// the subscriber to its room, or feeds a publisher's first frames if they came along.
    fn handshake(&mut self, key: usize) -> io::Result<()> {
        let conn = &mut self.conns[key];
        let (answer, role, room, mut rest) = match handshake::parse_request(&conn.head, &HANDSHAKE) {
            Ok(Parsed::Partial) => return Ok(()),
            Err(e) => (handshake::refusal(&e), Role::Refused, None, Vec::new()),
            Ok(Parsed::Complete { request, consumed }) => {
                let rest = conn.head.split_off(consumed);
                let room = handshake::query_param(&request.query, "room").map(|r| r.into_owned());
                let role = match request.path.as_str() {
                    "/sub" => Role::Sub,
                    "/pub" => Role::Pub,
                    _ => Role::Refused,
                };
                match (request.websocket, room) {
                    (Some(Ok(up)), Some(room)) if role != Role::Refused => {
                        (handshake::response_101(&up, false), role, Some(room), rest)
                    }
                    (Some(Err(e)), _) => (handshake::refusal(&e), Role::Refused, None, Vec::new()),
                    _ => (not_found(), Role::Refused, None, Vec::new()),
                }
            }
        };
        conn.head = answer;
        conn.role = role;
        if let Some(name) = room {
            conn.room = self.rooms.id(name);
        }
        self.send_head(key, 0)?;
        let conn = &mut self.conns[key];
        match role {
            Role::Sub => {
                let room = &mut self.rooms.list[conn.room as usize];
                conn.member = room.members.len();
                conn.next = room.head;
                room.members.push(key);
                self.stats.subscribers += 1;
                self.stats.subscribers_max = self.stats.subscribers_max.max(self.stats.subscribers);
            }
            Role::Pub if !rest.is_empty() => {
                let room = conn.room;
                let Floor { conns, rooms, msgs, stats, .. } = self;
                if feed(&mut conns[key].reader, &mut rest, |p| rooms.publish(msgs, stats, room, p)) {
                    return self.close(key);
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn send_head(&mut self, key: usize, off: usize) -> io::Result<()> {
        let conn = &mut self.conns[key];
        let rest = &conn.head[off..];
        conn.inflight = Inflight::Head { off };
        // SAFETY: `head` is not touched until this send completes (`sent` replaces it only then),
        // and its heap buffer does not move when the slab moves the Conn.
        unsafe { self.rings[conn.ring].send(conn.slot, rest.as_ptr(), rest.len() as u32, ud(SEND, key)) }
    }

    fn sent(&mut self, key: usize, c: Cqe) -> io::Result<()> {
        let conn = &mut self.conns[key];
        match std::mem::replace(&mut conn.inflight, Inflight::Idle) {
            Inflight::Idle => {}
            Inflight::Head { off } => {
                let off = off + c.result.max(0) as usize;
                if c.result >= 0 && off < conn.head.len() {
                    return self.send_head(key, off);
                }
                conn.head = Vec::new();
            }
            Inflight::One { msg, off } => {
                let off = off + c.result.max(0) as usize;
                let frame = &self.msgs.list[msg as usize].frame[..];
                if c.result >= 0 && off < frame.len() {
                    conn.inflight = Inflight::One { msg, off };
                    let rest = &frame[off..];
                    // SAFETY: the message holds a reference for this send until it completes,
                    // so its frame is neither freed nor rewritten (see `Msgs`).
                    return unsafe {
                        self.rings[conn.ring].send(conn.slot, rest.as_ptr(), rest.len() as u32, ud(SEND, key))
                    };
                }
                self.msgs.release(msg);
                self.stats.frames += u64::from(c.result >= 0);
            }
            Inflight::Many { batch } => {
                let b = &mut self.batches.list[batch as usize];
                if c.result >= 0 && b.advance(c.result as usize) {
                    conn.inflight = Inflight::Many { batch };
                    // SAFETY: the batch is boxed (it never moves) and, with the frames its iovecs
                    // name (each holding a reference), stays untouched until this send completes.
                    return unsafe { self.rings[conn.ring].sendmsg(conn.slot, &b.hdr, ud(SEND, key)) };
                }
                if c.result >= 0 {
                    self.stats.frames += b.msgs.len() as u64;
                }
                for &m in &b.msgs {
                    self.msgs.release(m);
                }
                self.batches.free.push(batch);
            }
        }
        let conn = &self.conns[key];
        if c.result < 0 || conn.role == Role::Refused {
            return self.close(key);
        }
        if conn.closing {
            return self.finish(key);
        }
        self.ready.push(key);
        Ok(())
    }

    /// One send for every idle subscriber that is behind: those of rooms that got messages this
    /// turn, and those whose send completed.
    fn flush(&mut self) -> io::Result<()> {
        let mut dirty = std::mem::take(&mut self.rooms.dirty);
        for &id in &dirty {
            let room = &mut self.rooms.list[id as usize];
            room.dirty = false;
            for i in 0..room.members.len() {
                let key = self.rooms.list[id as usize].members[i];
                self.flush_one(key)?;
            }
        }
        dirty.clear();
        self.rooms.dirty = dirty;
        let mut ready = std::mem::take(&mut self.ready);
        for &key in &ready {
            if self.conns.contains(key) {
                self.flush_one(key)?;
            }
        }
        ready.clear();
        self.ready = ready;
        Ok(())
    }

    fn flush_one(&mut self, key: usize) -> io::Result<()> {
        let conn = &mut self.conns[key];
        if conn.role != Role::Sub || conn.closing || !matches!(conn.inflight, Inflight::Idle) {
            return Ok(());
        }
        let room = &self.rooms.list[conn.room as usize];
        let behind = room.head - conn.next;
        if behind == 0 {
            return Ok(());
        }
        if behind > BACKLOG_MESSAGES {
            self.stats.dropped += behind - BACKLOG_MESSAGES;
            conn.next = room.head - BACKLOG_MESSAGES;
        }
        let n = (room.head - conn.next).min(self.frames_per_send);
        conn.next += n;
        self.stats.sends += 1;
        let ring = &mut self.rings[conn.ring];
        if n == 1 {
            let msg = room.log[((conn.next - 1) % BACKLOG_MESSAGES) as usize];
            let frame = self.msgs.hold(msg);
            conn.inflight = Inflight::One { msg, off: 0 };
            // SAFETY: the reference taken by `hold` keeps the frame alive and unchanged until
            // this send's completion releases it.
            return unsafe { ring.send(conn.slot, frame.as_ptr(), frame.len() as u32, ud(SEND, key)) };
        }
        let (batch, b) = self.batches.alloc();
        b.msgs.clear();
        b.msgs.extend((conn.next - n..conn.next).map(|seq| room.log[(seq % BACKLOG_MESSAGES) as usize]));
        for &m in &b.msgs {
            self.msgs.list[m as usize].refs += 1;
        }
        b.fill(&self.msgs);
        conn.inflight = Inflight::Many { batch };
        // SAFETY: the batch is boxed (it never moves) and is not reused until this send
        // completes; every frame it names holds a reference until then (see `Msgs`).
        unsafe { ring.sendmsg(conn.slot, &b.hdr, ud(SEND, key)) }
    }

    /// Ends a connection: leaves its room, cancels what is pending, closes the slot once the
    /// last completion is in.
    fn close(&mut self, key: usize) -> io::Result<()> {
        let conn = &mut self.conns[key];
        if conn.closing {
            return self.finish(key);
        }
        conn.closing = true;
        let (r, slot, room, member) = (conn.ring, conn.slot, conn.room, conn.member);
        if conn.role == Role::Sub {
            let members = &mut self.rooms.list[room as usize].members;
            members.swap_remove(member);
            if let Some(&moved) = members.get(member) {
                self.conns[moved].member = member;
            }
            self.stats.subscribers -= 1;
        }
        let conn = &self.conns[key];
        if conn.recv_armed || !matches!(conn.inflight, Inflight::Idle) {
            self.rings[r].cancel_slot(slot, ud(CANCEL, key))?;
        }
        self.finish(key)
    }

    fn finish(&mut self, key: usize) -> io::Result<()> {
        let conn = &mut self.conns[key];
        if conn.closing && !conn.close_sent && !conn.recv_armed && matches!(conn.inflight, Inflight::Idle) {
            conn.close_sent = true;
            self.rings[conn.ring].close_slot(conn.slot, ud(CLOSE, key))?;
        }
        Ok(())
    }

    fn report(&self, when: &str) {
        let s = &self.stats;
        eprintln!(
            "barrage-floor {when}: {} subscribers ({} max), {} rings, {} messages published, {} frames \
             in {} sends ({:.2} per send), {} dropped (subscriber over {BACKLOG_MESSAGES} behind), \
             {} accepts into a full ring",
            s.subscribers,
            s.subscribers_max,
            self.rings.len(),
            s.published,
            s.frames,
            s.sends,
            s.frames as f64 / s.sends.max(1) as f64,
            s.dropped,
            s.ring_full
        );
    }
}

impl Conn {
    fn new(ring: usize, slot: u32) -> Conn {
        Conn {
            ring,
            slot,
            role: Role::Handshake,
            head: Vec::new(),
            reader: Reader::default(),
            room: 0,
            member: 0,
            next: 0,
            inflight: Inflight::Idle,
            recv_armed: false,
            closing: false,
            close_sent: false,
        }
    }
}

/// Feeds bytes to a connection's reader; calls `publish` for each binary message. True when
/// the connection should end (a Close, or a protocol error).
fn feed(reader: &mut Reader, data: &mut [u8], mut publish: impl FnMut(&[u8])) -> bool {
    let mut ended = false;
    let result = reader.feed(data, &READ, &mut |event| match event {
        Event::Binary(payload) => {
            publish(payload);
            Flow::Continue
        }
        Event::Close { .. } => {
            ended = true;
            Flow::Stop
        }
        _ => Flow::Continue,
    });
    ended || result.is_err()
}

fn not_found() -> Vec<u8> {
    handshake::http_response(404, "text/plain", &[], b"use /sub?room=R or /pub?room=R\n")
}

/// Rooms by name, each with its members and the log of its last BACKLOG_MESSAGES messages.
#[derive(Default)]
struct Rooms {
    ids: HashMap<String, u32>,
    list: Vec<Room>,
    /// Rooms that got a message this turn.
    dirty: Vec<u32>,
}

struct Room {
    members: Vec<usize>,
    /// Message ids by sequence modulo BACKLOG_MESSAGES; `head` is the next sequence.
    log: [u32; BACKLOG_MESSAGES as usize],
    head: u64,
    dirty: bool,
}

impl Rooms {
    fn id(&mut self, name: String) -> u32 {
        let next = self.list.len() as u32;
        let id = *self.ids.entry(name).or_insert(next);
        if id == next {
            self.list.push(Room { members: Vec::new(), log: [0; BACKLOG_MESSAGES as usize], head: 0, dirty: false });
        }
        id
    }

    /// Frames the message once and appends it to the room's log (the log holds a reference;
    /// the oldest message leaves the log, and is freed once no send holds it).
    fn publish(&mut self, msgs: &mut Msgs, stats: &mut Stats, id: u32, payload: &[u8]) {
        let msg = msgs.alloc(payload);
        let room = &mut self.list[id as usize];
        let at = (room.head % BACKLOG_MESSAGES) as usize;
        if room.head >= BACKLOG_MESSAGES {
            msgs.release(room.log[at]);
        }
        room.log[at] = msg;
        room.head += 1;
        stats.published += 1;
        if !room.dirty {
            room.dirty = true;
            self.dirty.push(id);
        }
    }
}

/// Framed messages, reference-counted: the room log holds one reference, each send in flight
/// one more. A frame is rewritten (reused for a new message) only at zero references, so a
/// pointer handed to the kernel stays valid until that send's completion releases it.
#[derive(Default)]
struct Msgs {
    list: Vec<Msg>,
    free: Vec<u32>,
}

struct Msg {
    frame: Vec<u8>,
    refs: u32,
}

impl Msgs {
    fn alloc(&mut self, payload: &[u8]) -> u32 {
        let id = self.free.pop().unwrap_or_else(|| {
            self.list.push(Msg { frame: Vec::new(), refs: 0 });
            (self.list.len() - 1) as u32
        });
        let m = &mut self.list[id as usize];
        debug_assert_eq!(m.refs, 0);
        m.frame.clear();
        frame::write_header(&mut m.frame, Opcode::Binary, payload.len());
        m.frame.extend_from_slice(payload);
        m.refs = 1;
        id
    }

    /// Takes a reference for a send; the frame's bytes stay put until it is released.
    fn hold(&mut self, id: u32) -> &[u8] {
        let m = &mut self.list[id as usize];
        m.refs += 1;
        &m.frame
    }

    fn release(&mut self, id: u32) {
        let m = &mut self.list[id as usize];
        m.refs -= 1;
        if m.refs == 0 {
            self.free.push(id);
        }
    }
}

/// Message headers for multi-frame sends, boxed so the kernel's pointers stay valid.
#[derive(Default)]
struct Batches {
    // Boxed on purpose: the kernel holds a pointer to each header while its send is in flight,
    // and the Vec moves its elements when it grows.
    #[allow(clippy::vec_box)]
    list: Vec<Box<Batch>>,
    free: Vec<u32>,
}

struct Batch {
    hdr: libc::msghdr,
    iov: Vec<libc::iovec>,
    /// The messages the iovecs name (one reference each), released at completion.
    msgs: Vec<u32>,
    /// First iovec not yet fully sent (after a short send).
    first: usize,
}

impl Batches {
    fn alloc(&mut self) -> (u32, &mut Batch) {
        let id = self.free.pop().unwrap_or_else(|| {
            // SAFETY: msghdr is plain old data; all zeroes is a valid, empty header.
            let hdr = unsafe { std::mem::zeroed() };
            self.list.push(Box::new(Batch {
                hdr,
                iov: Vec::with_capacity(BACKLOG_MESSAGES as usize),
                msgs: Vec::new(),
                first: 0,
            }));
            (self.list.len() - 1) as u32
        });
        (id, &mut self.list[id as usize])
    }
}

impl Batch {
    /// Points the iovecs at the frames of `self.msgs` (which hold a reference each).
    fn fill(&mut self, msgs: &Msgs) {
        self.iov.clear();
        self.iov.extend(self.msgs.iter().map(|&m| {
            let f = &msgs.list[m as usize].frame;
            libc::iovec { iov_base: f.as_ptr().cast_mut().cast(), iov_len: f.len() }
        }));
        self.first = 0;
        self.point();
    }

    fn point(&mut self) {
        self.hdr.msg_iov = self.iov[self.first..].as_mut_ptr();
        self.hdr.msg_iovlen = self.iov.len() - self.first;
    }

    /// Accounts for `sent` bytes; true if some remain (the header now names only those).
    fn advance(&mut self, mut sent: usize) -> bool {
        while sent > 0 && self.first < self.iov.len() {
            let iov = &mut self.iov[self.first];
            if sent >= iov.iov_len {
                sent -= iov.iov_len;
                self.first += 1;
            } else {
                iov.iov_base = iov.iov_base.cast::<u8>().wrapping_add(sent).cast();
                iov.iov_len -= sent;
                sent = 0;
            }
        }
        if self.first < self.iov.len() {
            self.point();
            return true;
        }
        false
    }
}
