//! Client frames, protobuf or JSON, through a whole hub (one shard's sans-IO state, no sockets),
//! called exactly as the shard's driver calls it: one connection, upgraded, then fed the input.
//!
//! Input: the first byte picks the connection: bit 0 JSON (else protobuf), bit 1 signed in,
//! bits 2-4 the token's `send`, `admin` and `attrs` claims, bit 5 a room in the URL, bit 6 two
//! shards (a second hub owns some rooms; mail is carried between them), bit 7 the way to the
//! second shard starts jammed. Then operations, each a byte and an argument byte:
//! - `......00 len payload`: one masked data message in the connection's type (binary / text);
//! - `.foooo01 len payload`: one masked frame with opcode `oooo` and FIN `f`;
//! - `......10 len bytes`: raw bytes as a socket read them;
//! - `.aaa..11 arg`: the driver: advance the clock, stall / partly write / fail the send, end of
//!   input, jam the mail, cut reads into `arg` bytes, report load.
//!
//! Checked, beyond "nothing panics" (the hub asserts its own invariants): what the client reads
//! is a 101, then whole unmasked server frames of its format that decode as `ServerFrame`s, and
//! nothing after a Close whose code a server may send; a whole message that is not a
//! `ClientFrame` on an open connection closes it with the envelope's code (1003 / 1007; 1007 for
//! text that is not UTF-8, 1009 over the frame limit); the queue and the outbox stay within
//! `send_queue_frames_max`; a connection the server closed is let go once the close timeout has
//! passed; and once it is gone the hub holds no frame, partial byte or connection.
use std::io::IoSlice;

use barrage::config::Config;
use barrage::envelope::{self, Format};
use barrage::hub::{Hub, HubConfig};
use barrage::ids::{ConnKey, Now, ShardId, UnixMs};
use barrage::metrics::Series;
use barrage::proto::ServerFrame;
use barrage::wire::CloseCode;
use barrage::wire::frame::{CONTROL_PAYLOAD_MAX, Opcode, decode_header, masked_frame};
use prost::Message as _;

const SECRET: &str = "fuzz-secret";
const UNIX_START_MS: i64 = 1_795_000_000_000;
/// Limits small enough for an input of a few hundred bytes to reach them.
const FRAME_BYTES_MAX: usize = 0xC0;
const QUEUE_FRAMES_MAX: usize = 4;
const CLOSE_TIMEOUT_MS: u64 = 500;
/// The hub lets go of a closed connection within the close timeout, a sweep of every
/// connection (1 s) and a tick.
const LET_GO_MS: u64 = CLOSE_TIMEOUT_MS + 1_000 + 100;
const MASK: [u8; 4] = [0x37, 0xFA, 0x21, 0x3D];
const EPIPE: i32 = -32;

/// Every way a connection's close is counted.
const CLOSED: [Series; 12] = [
    Series::ClosedPeer,
    Series::ClosedProtocol,
    Series::ClosedUtf8,
    Series::ClosedTooBig,
    Series::ClosedEnvelope,
    Series::ClosedSlow,
    Series::ClosedIdle,
    Series::ClosedError,
    Series::ClosedShutdown,
    Series::ClosedKicked,
    Series::ClosedBudget,
    Series::ClosedCloseTimeout,
];

/// Runs one input.
pub fn run(data: &[u8]) {
    let Some((&setup, mut ops)) = data.split_first() else { return };
    let mut run = Run::open(setup);
    while let [op, arg, rest @ ..] = ops {
        if run.released {
            break;
        }
        ops = rest;
        if op & 3 == 3 {
            run.driver(op >> 2, *arg);
        } else {
            let (bytes, rest) = ops.split_at(usize::from(*arg).min(ops.len()));
            ops = rest;
            match op & 3 {
                0 => run.message(true, run.data_opcode() as u8, bytes),
                1 => run.message(op & 0x40 != 0, (op >> 2) & 0xF, bytes),
                _ => {
                    run.plain = false;
                    run.recv(bytes.to_vec());
                }
            }
        }
        run.drive();
    }
    run.finish();
}

fn config() -> Config {
    let mut c = Config::default();
    c.auth.jwt_secret = SECRET.into();
    c.server.connections_max = 2;
    c.server.send_queue_frames_max = QUEUE_FRAMES_MAX as u32;
    c.server.partial_bytes_max = 0x180;
    c.server.mesh_overflow_max = 4;
    c.websocket.frame_bytes_max = FRAME_BYTES_MAX;
    c.websocket.message_bytes_max = 0x200;
    c.websocket.idle_timeout_ms = 5_000;
    c.websocket.close_timeout_ms = CLOSE_TIMEOUT_MS;
    c.websocket.slow_consumer_ms = 1_000;
    let r = &mut c.rooms;
    (r.block_interval_ms, r.block_wait_max_ms, r.block_messages_max, r.pending_messages_max) = (100, 100, 4, 8);
    (r.rooms_max, r.data_bytes_max, r.history_messages_max, r.presence_users_max) = (4, 32, 4, 2);
    (r.attr_keys_max, r.attr_key_bytes_max, r.attr_value_bytes_max, r.attr_log_len_max) = (4, 8, 16, 4);
    r.moderation_entries_max = 4;
    c
}

/// The hubs, the driver's state and what the client has read.
struct Run {
    hubs: Vec<Hub>,
    key: ConnKey,
    now: Now,
    format: Format,
    // The driver.
    stalled: bool,
    jammed: bool,
    read_bytes: usize,
    in_flight: Option<Vec<u8>>,
    eof: bool,
    closing: bool,
    released: bool,
    // The client.
    stream: Vec<u8>,
    parsed: usize,
    first_close: Option<u16>,
    first_close_ms: Option<u64>,
    /// Only whole frames the reader accepts have been sent, so it holds nothing between them.
    plain: bool,
    /// The close code a message that is not a `ClientFrame` earned.
    expected_close: Option<CloseCode>,
}

impl Run {
    fn open(setup: u8) -> Run {
        let shards = if setup & 0x40 != 0 { 2 } else { 1 };
        let c = config();
        let mut hubs: Vec<Hub> = (0..shards).map(|s| Hub::new(HubConfig::new(&c, ShardId(s as u16), shards))).collect();
        let now = Now { ms: 0, unix: UnixMs(UNIX_START_MS) };
        let key = hubs[0].handle_accept(0, None, now).expect("an empty hub takes a connection");
        let format = if setup & 1 != 0 { Format::Json } else { Format::Proto };
        let mut run = Run {
            hubs,
            key,
            now,
            format,
            stalled: false,
            jammed: setup & 0x80 != 0,
            read_bytes: 0,
            in_flight: None,
            eof: false,
            closing: false,
            released: false,
            stream: Vec::new(),
            parsed: 0,
            first_close: None,
            first_close_ms: None,
            plain: true,
            expected_close: None,
        };
        run.recv(upgrade_request(setup).into_bytes());
        run.drive();
        assert!(run.parsed > 0, "the upgrade was answered: {:?}", String::from_utf8_lossy(&run.stream));
        run
    }

    fn data_opcode(&self) -> Opcode {
        match self.format {
            Format::Proto => Opcode::Binary,
            Format::Json => Opcode::Text,
        }
    }

    /// One frame from the client, and what the hub must do with it.
    fn message(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        let kind = Opcode::from_bits(opcode);
        let whole = fin && kind.is_some_and(|o| o != Opcode::Continuation);
        self.plain &= whole && (kind.is_some_and(|o| !o.is_control()) || payload.len() <= CONTROL_PAYLOAD_MAX);
        let open = self.plain && !self.eof && !self.closing && self.closes() == 0;
        let expected = match kind {
            Some(o @ (Opcode::Text | Opcode::Binary)) if open => self.verdict(o == Opcode::Text, payload),
            _ => None,
        };
        let mut bytes = Vec::new();
        masked_frame(fin, opcode, payload, MASK, &mut bytes);
        self.recv(bytes);
        if let Some(code) = expected {
            assert!(self.closes() >= 1, "a message that is not a ClientFrame ({code:?}) closes the connection");
            self.expected_close = Some(code);
        }
    }

    /// The close code a whole data message earns, if it is not a `ClientFrame`.
    fn verdict(&self, text: bool, payload: &[u8]) -> Option<CloseCode> {
        if payload.len() > FRAME_BYTES_MAX {
            return Some(CloseCode::TOO_BIG);
        }
        if text && std::str::from_utf8(payload).is_err() {
            return Some(CloseCode::INVALID_DATA);
        }
        envelope::decode(self.format, text, payload).err().map(|e| e.close_code())
    }

    /// Bytes from the socket, in reads of `read_bytes` (0: one read) within one turn.
    fn recv(&mut self, mut bytes: Vec<u8>) {
        let step = if self.read_bytes == 0 { bytes.len().max(1) } else { self.read_bytes };
        for read in bytes.chunks_mut(step) {
            self.hubs[0].handle_recv(self.key, read, self.now);
        }
    }

    fn driver(&mut self, action: u8, arg: u8) {
        match action & 7 {
            0 => self.advance(u64::from(arg) * 10),
            1 => self.stalled = !self.stalled,
            2 => self.complete(usize::from(arg)),
            3 if self.in_flight.is_some() => {
                self.in_flight = None;
                self.hubs[0].handle_sent(self.key, EPIPE, self.now);
            }
            4 if !self.eof => {
                self.eof = true;
                self.hubs[0].handle_eof(self.key, self.now);
            }
            5 => self.jammed = !self.jammed,
            6 => self.read_bytes = usize::from(arg),
            7 => self.hubs.iter_mut().for_each(|h| h.handle_load(u32::from(arg) * 4)),
            _ => {}
        }
    }

    fn advance(&mut self, ms: u64) {
        self.now = Now { ms: self.now.ms + ms, unix: UnixMs(self.now.unix.0 + ms as i64) };
        for h in &mut self.hubs {
            if h.poll_timeout(self.now) == 0 {
                h.handle_timeout(self.now);
            }
        }
    }

    /// The rest of a turn, until nothing moves: reports, mail, sends, closes; then the checks.
    fn drive(&mut self) {
        for _ in 0..8 {
            let now = self.now;
            self.hubs.iter_mut().for_each(|h| h.end_turn(now));
            let carried = self.carry_mail();
            let sent = self.send();
            while let Some((key, _teardown)) = self.hubs[0].poll_close() {
                assert_eq!(key, self.key);
                self.closing = true;
            }
            if self.closing && !self.released && self.in_flight.is_none() {
                self.hubs[0].release(self.key);
                self.released = true;
            }
            if !carried && !sent {
                break;
            }
        }
        self.check();
    }

    /// Carries mail between two hubs (into the second only when the way is not jammed). One hub
    /// routes its own mail at once: it never posts any.
    fn carry_mail(&mut self) -> bool {
        let (jammed, now) = (self.jammed, self.now);
        let [first, rest @ ..] = self.hubs.as_mut_slice() else { unreachable!("one hub at least") };
        let Some(second) = rest.first_mut() else {
            first.flush_mail(&mut |to, _| panic!("a single shard posted mail to {to:?}"));
            return false;
        };
        let (mut to_second, mut to_first) = (Vec::new(), Vec::new());
        first.flush_mail(&mut |to, m| {
            assert_eq!(to, ShardId(1));
            if jammed {
                return Err(m);
            }
            to_second.push(m);
            Ok(())
        });
        second.flush_mail(&mut |to, m| {
            assert_eq!(to, ShardId(0));
            to_first.push(m);
            Ok(())
        });
        let carried = !to_second.is_empty() || !to_first.is_empty();
        to_second.into_iter().for_each(|m| second.handle_mail(m, now));
        to_first.into_iter().for_each(|m| first.handle_mail(m, now));
        carried
    }

    /// Starts a send if one is due and none is in flight; completes it at once unless stalled.
    fn send(&mut self) -> bool {
        if self.in_flight.is_some() || self.released {
            return false;
        }
        let Some(key) = self.hubs[0].poll_ready() else { return false };
        assert_eq!(key, self.key);
        let mut iov = [IoSlice::new(&[]); 16];
        let n = self.hubs[0].poll_send(key, &mut iov);
        let bytes: Vec<u8> = iov[..n].iter().flat_map(|s| s.iter().copied()).collect();
        if n == 0 {
            return false;
        }
        self.in_flight = Some(bytes);
        if !self.stalled {
            self.complete(usize::MAX);
        }
        true
    }

    /// The send in flight wrote `max` bytes at most (and at least one).
    fn complete(&mut self, max: usize) {
        let Some(bytes) = self.in_flight.take() else { return };
        let written = bytes.len().min(max.max(1));
        self.stream.extend_from_slice(&bytes[..written]);
        self.hubs[0].handle_sent(self.key, written as i32, self.now);
    }

    fn closes(&self) -> u64 {
        let counters = self.hubs[0].counters();
        CLOSED.iter().map(|&s| counters.get(s)).sum()
    }

    fn check(&mut self) {
        let h = &self.hubs[0];
        if self.released {
            assert_eq!(h.connections(), 0);
            assert_eq!(h.outbox_frames(), 0, "frames outlive their last queue");
        } else {
            let queued = h.queue_len(self.key);
            assert!(queued <= QUEUE_FRAMES_MAX, "{queued} frames queued");
            assert!(h.outbox_frames() <= queued, "{} frames in the outbox, {queued} queued", h.outbox_frames());
        }
        for other in &self.hubs[1..] {
            assert_eq!(other.outbox_frames(), 0, "a hub without connections holds frames");
        }
        self.read_stream();
    }

    /// Reads what the client received since the last call: the 101, then whole server frames.
    fn read_stream(&mut self) {
        if self.parsed == 0 {
            let Some(end) = self.stream.windows(4).position(|w| w == b"\r\n\r\n") else { return };
            let head = String::from_utf8_lossy(&self.stream[..end]);
            assert!(head.starts_with("HTTP/1.1 101 "), "the upgrade was refused: {head}");
            self.parsed = end + 4;
        }
        while self.parsed < self.stream.len() {
            let rest = &self.stream[self.parsed..];
            assert!(self.first_close.is_none(), "bytes after the server's Close: {rest:?}");
            let Some(h) = decode_header(rest).expect("a server frame header") else { return };
            let end = h.header_len + h.payload_len as usize;
            let Some(payload) = rest.get(h.header_len..end) else { return };
            assert!(h.fin && h.mask.is_none(), "server frames are whole and unmasked: {h:?}");
            match h.opcode {
                Opcode::Binary => {
                    assert_eq!(self.format, Format::Proto, "binary frame on a JSON connection");
                    let f = ServerFrame::decode(payload).expect("a protobuf ServerFrame");
                    assert!(f.frame.is_some(), "an empty ServerFrame");
                }
                Opcode::Text => {
                    assert_eq!(self.format, Format::Json, "text frame on a protobuf connection");
                    let f: ServerFrame = serde_json::from_slice(payload).expect("a JSON ServerFrame");
                    assert!(f.frame.is_some(), "an empty ServerFrame");
                }
                Opcode::Close => {
                    self.first_close = Some(close_code(payload));
                    self.first_close_ms = Some(self.now.ms);
                }
                Opcode::Ping | Opcode::Pong => {}
                Opcode::Continuation => panic!("the server never fragments"),
            }
            self.parsed += end;
        }
    }

    /// The end of input: the send completes, time passes (timeouts, close timeouts, ticks);
    /// then the client goes, and the hub must hold nothing of it.
    fn finish(mut self) {
        (self.stalled, self.jammed) = (false, false);
        self.complete(usize::MAX);
        self.drive();
        for _ in 0..2 * LET_GO_MS / 100 {
            self.advance(100);
            self.drive();
        }
        if let Some(at) = self.first_close_ms.filter(|at| at + LET_GO_MS <= self.now.ms) {
            assert!(self.released, "the server sent Close at {at} ms and still held on at {} ms", self.now.ms);
        }
        if let (Some(expected), Some(code)) = (self.expected_close, self.first_close) {
            assert_eq!(code, expected.0, "the close code of a message that is not a ClientFrame");
        }
        if !self.released {
            self.driver(4, 0);
            self.drive();
            assert!(self.released, "the connection ends at end of input");
        }
        let now = self.now;
        self.hubs.iter_mut().for_each(|h| h.end_turn(now));
        let counters = self.hubs[0].counters();
        assert_eq!(counters.get(Series::PartialBytes), 0, "partial input accounted after the last connection");
        assert_eq!(counters.get(Series::ConnectionsOpen), 0);
    }
}

/// The code of a server Close: one a peer may send, or 1013 (sent, never accepted); 0 for none
/// (the answer to a client's Close without a code).
fn close_code(payload: &[u8]) -> u16 {
    let [hi, lo, reason @ ..] = payload else {
        assert!(payload.is_empty(), "a server Close of one byte");
        return 0;
    };
    let code = u16::from_be_bytes([*hi, *lo]);
    assert!(CloseCode(code).is_valid_on_wire() || CloseCode(code) == CloseCode::TRY_AGAIN, "close code {code}");
    assert!(std::str::from_utf8(reason).is_ok(), "a Close reason that is not UTF-8");
    code
}

fn upgrade_request(setup: u8) -> String {
    let protocol = if setup & 1 != 0 { "barrage.v1.json" } else { "barrage.v1.proto" };
    let mut query = Vec::new();
    if setup & 0x20 != 0 {
        query.push("room=r".to_string());
    }
    if setup & 2 != 0 {
        let exp = UNIX_START_MS / 1000 + 86_400;
        let [send, admin, attrs] = [4, 8, 16].map(|bit| setup & bit != 0);
        let claims = serde_json::json!({"sub": "u", "exp": exp, "send": send, "admin": admin, "attrs": attrs});
        query.push(format!("token={}", barrage::auth::sign_hs256(SECRET.as_bytes(), &claims)));
    }
    let query = if query.is_empty() { String::new() } else { format!("?{}", query.join("&")) };
    format!(
        "GET /ws{query} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: {protocol}\r\n\r\n"
    )
}
