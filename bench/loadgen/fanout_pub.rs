//! The `fanout` publishers: one thread each, plain blocking sockets. A publisher owns some
//! streams (`Streams::of_publisher`) and writes their messages — to barrage over one keep-alive
//! HTTP/1.1 connection to the business API (protobuf `PublishRequest`s), to peers over one
//! WebSocket per stream (one masked binary frame per message) — paced (`--rate`) or as fast as
//! the room's sentinel takes them (`--saturate`). It stops at the window's end.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use barrage::proto::{Priority, PublishRequest};
use barrage::wire::frame::{Opcode, masked_frame};
use prost::Message as _;

use crate::fanout_book::{Book, Mode, Room, Window, publish_burst};
use crate::fanout_msg::{Header, Kind, message};
use crate::handshake::{HeadScan, upgrade};
use crate::pace::TokenBucket;
use crate::sys::{monotonic_ns, recv_dontwait};

/// Connect, handshake and response timeouts: loopback answers in microseconds; a server this
/// slow is failing, and the error says so.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// After a failed connection, wait this long before the next try (no hot reconnect loop).
const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// Messages one stream sends in a row before the others get a turn.
const BURST_MAX: u64 = 64;
/// Longest sleep between checks (pacing, window, the end).
const NAP: Duration = Duration::from_millis(2);
/// A response head larger than this is not the API's.
const RESPONSE_HEAD_MAX: usize = 8192;
/// The mask key of every frame we send (the server unmasks; nothing here needs secrecy).
const MASK: [u8; 4] = [0x37, 0xFA, 0x21, 0x3D];

/// What one publisher does.
pub struct PubPlan {
    pub p: u32,
    pub kind: Kind,
    /// The WebSocket listener (broadcast, nchan) or the business API (barrage).
    pub addr: SocketAddrV4,
    pub api_key: String,
    pub pub_path: String,
    pub message_bytes: usize,
    pub book: Arc<Book>,
}

/// What a publisher reports.
#[derive(Debug, Default)]
pub struct PubResult {
    /// `status_NNN` (non-202 answers), `api_*`, `connect_*`, `upgrade_*`, `write_*`, `eof`,
    /// `tracker_full`.
    pub errors: BTreeMap<String, u64>,
    /// Saturate windows written off after `STALL_NS` without acknowledgements.
    pub stalls: u64,
}

/// Runs publisher `plan.p` until the window ends (or the run stops).
pub fn run(plan: PubPlan) -> PubResult {
    let book = Arc::clone(&plan.book);
    let _ = book.pubs[plan.p as usize].thread.set(std::thread::current());
    let streams: Vec<u32> = book.streams.of_publisher(plan.p).collect();
    let mut p = Publisher::new(plan, &streams);
    match book.mode {
        Mode::Rate(total) => p.paced(&streams, total),
        Mode::Saturate(window) => p.saturate(&streams, window),
    }
    p.result
}

/// Why a stream sends no more.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sent {
    Accepted,
    /// Refused or failed (counted); the same seq goes next time.
    Failed,
    /// The window is over, or the stream's tracker is full.
    Done,
}

struct Publisher {
    plan: PubPlan,
    out: Out,
    msg: Vec<u8>,
    result: PubResult,
}

impl Publisher {
    fn new(plan: PubPlan, streams: &[u32]) -> Publisher {
        let host = plan.addr.to_string();
        let out = match plan.kind {
            Kind::Barrage => {
                let rooms: Vec<u32> = streams.iter().map(|&j| plan.book.streams.of(j).1).collect();
                Out::Http(Box::new(Http::new(plan.addr, &host, &plan.api_key, &rooms)))
            }
            Kind::Pusher => {
                let rooms: Vec<u32> = streams.iter().map(|&j| plan.book.streams.of(j).1).collect();
                Out::Http(Box::new(Http::pusher(plan.addr, &host, &rooms)))
            }
            kind => Out::Ws(
                streams
                    .iter()
                    .map(|&j| WsPub {
                        request: upgrade(&host, &kind.pub_path(&plan.pub_path, plan.book.streams.of(j).1), None),
                        stream: None,
                        frame: Vec::new(),
                    })
                    .collect(),
            ),
        };
        Publisher { out, msg: Vec::with_capacity(plan.message_bytes), result: PubResult::default(), plan }
    }

    fn error(&mut self, kind: String) {
        *self.result.errors.entry(kind).or_insert(0) += 1;
    }

    fn over(&self) -> bool {
        self.plan.book.stop.load(Ordering::Acquire) || monotonic_ns() >= self.plan.book.window().1
    }

    /// `--rate`: each stream's token bucket says how many may go.
    fn paced(&mut self, streams: &[u32], total: f64) {
        let now = Instant::now();
        let book = Arc::clone(&self.plan.book);
        let mut buckets: Vec<TokenBucket> = streams
            .iter()
            .map(|&j| {
                let rate = book.streams.rate_per_s(j, total);
                TokenBucket::new(rate, publish_burst(rate), now)
            })
            .collect();
        let mut done = vec![false; streams.len()];
        while !self.over() && done.iter().any(|d| !d) {
            for (i, &j) in streams.iter().enumerate() {
                let n = if done[i] { 0 } else { buckets[i].take(Instant::now(), BURST_MAX) };
                for _ in 0..n {
                    if self.send(i, j) == Sent::Done {
                        done[i] = true;
                        break;
                    }
                }
            }
            self.out.drain(&mut self.result.errors);
            let now = Instant::now();
            let wait = buckets.iter_mut().map(|b| b.wait(now)).min().unwrap_or(NAP);
            if !wait.is_zero() {
                std::thread::sleep(wait.min(NAP));
            }
        }
    }

    /// `--saturate`: per room, publish while what its sentinel has not yet received is under
    /// the window; park when every room is full (the sentinel's receiver wakes us).
    fn saturate(&mut self, streams: &[u32], size: u64) {
        let book = Arc::clone(&self.plan.book);
        let mut windows: Vec<Window> = streams.iter().map(|_| Window::new(size, monotonic_ns())).collect();
        let mut done = vec![false; streams.len()];
        let wait = &book.pubs[self.plan.p as usize];
        while !self.over() && done.iter().any(|d| !d) {
            let mut sent = 0;
            for (i, &j) in streams.iter().enumerate() {
                if done[i] {
                    continue;
                }
                let k = book.streams.of(j).1;
                let (published, acked) = book.room_flight(k);
                match windows[i].check(published, acked, monotonic_ns()) {
                    Room::Open(n) => {
                        for _ in 0..n.min(BURST_MAX) {
                            match self.send(i, j) {
                                Sent::Accepted => sent += 1,
                                Sent::Failed => break,
                                Sent::Done => {
                                    done[i] = true;
                                    break;
                                }
                            }
                        }
                    }
                    Room::Full => {}
                    Room::Stalled(n) => {
                        book.forgiven[k as usize].fetch_add(n, Ordering::AcqRel);
                        self.result.stalls += 1;
                    }
                }
            }
            self.out.drain(&mut self.result.errors);
            if sent == 0 {
                // Announce the wait, then look again: an acknowledgement landing in between
                // either is seen here or sees `waiting` and unparks us.
                wait.waiting.store(true, Ordering::SeqCst);
                let open = streams.iter().any(|&j| {
                    let (published, acked) = book.room_flight(book.streams.of(j).1);
                    published.saturating_sub(acked) < size
                });
                if !open {
                    std::thread::park_timeout(NAP);
                }
                wait.waiting.store(false, Ordering::SeqCst);
            }
        }
    }

    /// Sends stream `j`'s next message (its `i`-th stream).
    fn send(&mut self, i: usize, j: u32) -> Sent {
        let book = Arc::clone(&self.plan.book);
        let s = &book.stream[j as usize];
        let seq = s.published.load(Ordering::Acquire);
        let now_ns = monotonic_ns();
        let (start_ns, end_ns) = book.window();
        if now_ns >= end_ns {
            return Sent::Done;
        }
        if now_ns >= start_ns && !book.measuring(j) {
            book.start_measuring(j, seq);
        }
        if book.measuring(j) && book.measured(j) >= s.cap {
            self.error("tracker_full".into());
            return Sent::Done;
        }
        let (p, k) = book.streams.of(j);
        message(&Header { seq, send_ns: now_ns, room: k, publisher: p }, self.plan.message_bytes, &mut self.msg);
        let accepted = match &mut self.out {
            Out::Http(h) => h.post(i, &self.msg, &mut self.result.errors),
            Out::Ws(ws) => ws[i].send(self.plan.addr, &self.msg, &mut self.result.errors),
        };
        if !accepted {
            return Sent::Failed;
        }
        s.published.store(seq + 1, Ordering::Release);
        Sent::Accepted
    }
}

/// Where messages go.
enum Out {
    Http(Box<Http>),
    Ws(Vec<WsPub>),
}

impl Out {
    /// Reads whatever the servers sent back on the WebSocket publishers (Nchan answers each
    /// publish), so their buffers never fill and block them.
    fn drain(&mut self, errors: &mut BTreeMap<String, u64>) {
        if let Out::Ws(ws) = self {
            for w in ws {
                w.drain(errors);
            }
        }
    }
}

fn count(errors: &mut BTreeMap<String, u64>, kind: String) {
    *errors.entry(kind).or_insert(0) += 1;
}

/// `prefix_ERRNO`, or `prefix_timeout` / `prefix_eof` / `prefix_other`.
fn io_kind(prefix: &str, e: &io::Error) -> String {
    match (e.raw_os_error(), e.kind()) {
        (Some(libc::EAGAIN), _) | (_, io::ErrorKind::TimedOut) => format!("{prefix}_timeout"),
        (Some(n), _) => format!("{prefix}_{}", crate::errors::errno_name(n)),
        (None, io::ErrorKind::UnexpectedEof) => format!("{prefix}_eof"),
        (None, _) => format!("{prefix}_other"),
    }
}

/// One keep-alive connection to barrage's business API (also the `soak` publisher's).
pub struct Http {
    addr: SocketAddrV4,
    /// Per room given to `new`: the request head up to `Content-Length: `.
    heads: Vec<Vec<u8>>,
    stream: Option<TcpStream>,
    publish: PublishRequest,
    body: Vec<u8>,
    request: Vec<u8>,
    /// Response bytes read and not yet used.
    buf: Vec<u8>,
    filled: usize,
    /// Pusher's events API instead (soketi): the channel of each room, and the host.
    pusher: Option<(Vec<String>, String)>,
    /// The status that means published: barrage's 202, Pusher's 200.
    ok: u16,
}

impl Http {
    /// Publishes into `rooms` (`post`'s `i` indexes this list).
    pub fn new(addr: SocketAddrV4, host: &str, key: &str, rooms: &[u32]) -> Http {
        let key = if key.is_empty() { String::new() } else { format!("X-Api-Key: {key}\r\n") };
        let heads = rooms
            .iter()
            .map(|&k| {
                let path = Kind::Barrage.pub_path("", k);
                format!(
                    "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-protobuf\r\n{key}Content-Length: "
                )
                .into_bytes()
            })
            .collect();
        let publish = PublishRequest {
            r#type: "chat".into(),
            priority: Some(Priority::Low as i32),
            data: Vec::new(),
            ..Default::default()
        };
        Http {
            addr,
            heads,
            stream: None,
            publish,
            body: Vec::new(),
            request: Vec::new(),
            buf: vec![0; RESPONSE_HEAD_MAX],
            filled: 0,
            pusher: None,
            ok: 202,
        }
    }

    /// Publishes into `rooms` through a Pusher server's signed events API (`PUSHER_*` app).
    pub fn pusher(addr: SocketAddrV4, host: &str, rooms: &[u32]) -> Http {
        let mut h = Http::new(addr, host, "", rooms);
        h.pusher = Some((rooms.iter().map(|&k| crate::fanout_msg::room_name(k)).collect(), host.to_owned()));
        h.ok = 200;
        h
    }

    /// A Pusher `POST /apps/ID/events` of `msg` (`#` + its header in hex + its filler) into
    /// `channel`, signed as the protocol asks (md5 of the body, HMAC-SHA256 of the request).
    fn pusher_request(&mut self, channel: &str, host: &str, msg: &[u8]) {
        use crate::fanout_msg::{PUSHER_APP_ID, PUSHER_KEY, PUSHER_SECRET};
        use hmac::Mac as _;
        use md5::Digest as _;
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let (head, rest) = msg.split_at(msg.len().min(crate::fanout_msg::HEADER_BYTES));
        let data = format!("#{}{}", hex(head), String::from_utf8_lossy(rest));
        self.body.clear();
        let _ = write!(self.body, r#"{{"name":"m","channel":"{channel}","data":"{data}"}}"#);
        let md5 = hex(&md5::Md5::digest(&self.body));
        let ts = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let path = format!("/apps/{PUSHER_APP_ID}/events");
        let query = format!("auth_key={PUSHER_KEY}&auth_timestamp={ts}&auth_version=1.0&body_md5={md5}");
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(PUSHER_SECRET.as_bytes()).expect("any key length");
        mac.update(format!("POST\n{path}\n{query}").as_bytes());
        let signature = hex(&mac.finalize().into_bytes());
        self.request.clear();
        let _ = write!(
            self.request,
            "POST {path}?{query}&auth_signature={signature} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.body.len()
        );
        self.request.extend_from_slice(&self.body);
    }

    /// Publishes `msg` into the `i`-th room given to `new`; true on 202 (Pusher: 200).
    pub fn post(&mut self, i: usize, msg: &[u8], errors: &mut BTreeMap<String, u64>) -> bool {
        match self.send(i, msg) {
            Ok(status) if status == self.ok => true,
            Ok(status) => {
                count(errors, format!("status_{status}"));
                false
            }
            Err(e) => {
                count(errors, e.kind);
                false
            }
        }
    }

    /// Publishes `msg` into the `i`-th room given to `new`; returns the status, or why there
    /// was none (after a failed connect, having paused `RETRY_PAUSE`).
    pub fn send(&mut self, i: usize, msg: &[u8]) -> Result<u16, Unanswered> {
        if self.stream.is_none() {
            match connect(self.addr) {
                Ok(s) => {
                    self.stream = Some(s);
                    self.filled = 0;
                }
                Err(e) => {
                    std::thread::sleep(RETRY_PAUSE);
                    return Err(Unanswered { kind: io_kind("api", &e), sent: false });
                }
            }
        }
        if let Some((channels, host)) = self.pusher.take() {
            self.pusher_request(&channels[i], &host, msg);
            self.pusher = Some((channels, host));
        } else {
            self.publish.data.clear();
            self.publish.data.extend_from_slice(msg);
            self.body.clear();
            self.publish.encode(&mut self.body).expect("a Vec grows");
            self.request.clear();
            self.request.extend_from_slice(&self.heads[i]);
            let _ = write!(self.request, "{}\r\n\r\n", self.body.len());
            self.request.extend_from_slice(&self.body);
        }
        let stream = self.stream.as_mut().expect("connected above");
        if let Err(e) = stream.write_all(&self.request) {
            self.stream = None;
            return Err(Unanswered { kind: io_kind("api", &e), sent: false });
        }
        match self.response() {
            Ok((status, keep)) => {
                if !keep {
                    self.stream = None;
                }
                Ok(status)
            }
            Err(e) => {
                self.stream = None;
                Err(Unanswered { kind: io_kind("api", &e), sent: true })
            }
        }
    }

    /// Reads the response to the request written: (status, keep-alive).
    fn response(&mut self) -> io::Result<(u16, bool)> {
        let stream = self.stream.as_mut().expect("connected above");
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 16];
            let mut resp = httparse::Response::new(&mut headers);
            let parsed = resp.parse(&self.buf[..self.filled]).map_err(|e| io::Error::other(e.to_string()))?;
            if let httparse::Status::Complete(head) = parsed {
                let status = resp.code.unwrap_or(0);
                let header =
                    |name: &str| resp.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value);
                let body: usize = header("content-length")
                    .and_then(|v| std::str::from_utf8(v).ok()?.trim().parse().ok())
                    .unwrap_or(0);
                let keep = !header("connection").is_some_and(|v| v.eq_ignore_ascii_case(b"close"));
                let total = head + body;
                if total > self.buf.len() {
                    return Err(io::Error::other("response too large"));
                }
                while self.filled < total {
                    self.filled += read_some(stream, &mut self.buf[self.filled..])?;
                }
                self.buf.copy_within(total..self.filled, 0);
                self.filled -= total;
                return Ok((status, keep));
            }
            if self.filled == self.buf.len() {
                return Err(io::Error::other("response head too large"));
            }
            self.filled += read_some(stream, &mut self.buf[self.filled..])?;
        }
    }
}

/// A publish that got no status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unanswered {
    /// `api_ERRNO`, `api_timeout`, `api_eof`, `api_other`.
    pub kind: String,
    /// The request was written whole before the connection failed: the server may have taken
    /// it (a retry may publish it twice).
    pub sent: bool,
}

fn read_some(stream: &mut TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    match stream.read(buf)? {
        0 => Err(io::ErrorKind::UnexpectedEof.into()),
        n => Ok(n),
    }
}

fn connect(addr: SocketAddrV4) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&SocketAddr::V4(addr), IO_TIMEOUT)?;
    // Small writes must leave at once, not wait for the previous one's ACK.
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// One WebSocket publisher connection (broadcast, nchan).
struct WsPub {
    request: Vec<u8>,
    stream: Option<TcpStream>,
    frame: Vec<u8>,
}

impl WsPub {
    /// Connects and upgrades; the server's first frames, if any, are left for `drain`.
    fn open(&mut self, addr: SocketAddrV4) -> Result<(), String> {
        let mut s = connect(addr).map_err(|e| io_kind("connect", &e))?;
        s.write_all(&self.request).map_err(|e| io_kind("upgrade", &e))?;
        let mut head = HeadScan::default();
        let mut buf = [0u8; 1024];
        loop {
            let n = read_some(&mut s, &mut buf).map_err(|e| io_kind("upgrade", &e))?;
            match head.feed(&buf[..n]) {
                Ok(Some(_)) => break,
                Ok(None) => {}
                Err(e) => return Err(format!("upgrade_{}", crate::errors::ErrorKind::Head(e).name())),
            }
        }
        self.stream = Some(s);
        Ok(())
    }

    /// Sends one message as one masked binary frame; true if it was written whole.
    fn send(&mut self, addr: SocketAddrV4, msg: &[u8], errors: &mut BTreeMap<String, u64>) -> bool {
        if self.stream.is_none()
            && let Err(kind) = self.open(addr)
        {
            count(errors, kind);
            std::thread::sleep(RETRY_PAUSE);
            return false;
        }
        self.frame.clear();
        masked_frame(true, Opcode::Binary as u8, msg, MASK, &mut self.frame);
        let stream = self.stream.as_mut().expect("opened above");
        match stream.write_all(&self.frame) {
            Ok(()) => true,
            Err(e) => {
                // A frame written in part leaves the stream unusable: start over.
                count(errors, io_kind("write", &e));
                self.stream = None;
                false
            }
        }
    }

    fn drain(&mut self, errors: &mut BTreeMap<String, u64>) {
        let Some(s) = &self.stream else { return };
        let mut buf = [0u8; 4096];
        loop {
            match recv_dontwait(s.as_raw_fd(), &mut buf) {
                Ok(0) => {
                    count(errors, "eof".into());
                    self.stream = None;
                    return;
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    count(errors, io_kind("read", &e));
                    self.stream = None;
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fanout_msg::Streams;
    use crate::frames::OP_BINARY;
    use std::net::TcpListener;

    /// Reads one masked client frame: (opcode, unmasked payload); None at the end.
    fn read_masked(s: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
        let mut h = [0u8; 2];
        s.read_exact(&mut h).ok()?;
        assert!(h[1] & 0x80 != 0, "client frames are masked");
        let len = match h[1] & 0x7F {
            126 => {
                let mut b = [0u8; 2];
                s.read_exact(&mut b).unwrap();
                usize::from(u16::from_be_bytes(b))
            }
            n => usize::from(n),
        };
        let mut mask = [0u8; 4];
        s.read_exact(&mut mask).unwrap();
        let mut p = vec![0u8; len];
        s.read_exact(&mut p).unwrap();
        barrage::wire::frame::apply_mask(&mut p, mask, 0);
        Some((h[0], p))
    }

    fn book(kind_rate: f64, duration_s: f64) -> Arc<Book> {
        let book = Book::new(Streams { publishers: 1, rooms: 1 }, 3, Mode::Rate(kind_rate), duration_s, 0);
        let now = monotonic_ns();
        book.set_window(now, now + (duration_s * 1e9) as u64);
        Arc::new(book)
    }

    #[test]
    fn a_broadcast_publisher_upgrades_and_sends_paced_masked_frames() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let SocketAddr::V4(addr) = listener.local_addr().unwrap() else { unreachable!() };
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                s.read_exact(&mut b).unwrap();
                head.push(b[0]);
            }
            let head = String::from_utf8(head).unwrap();
            assert!(head.starts_with("GET /pub?room=r0 HTTP/1.1\r\n"), "{head}");
            s.write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                  Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x81\x02ok",
            )
            .unwrap();
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let mut seqs = Vec::new();
            while let Some((b0, payload)) = read_masked(&mut s) {
                assert_eq!(b0, 0x80 | OP_BINARY);
                assert_eq!(payload.len(), 100);
                let h = Header::read(payload[..24].try_into().unwrap());
                assert_eq!((h.room, h.publisher), (0, 0));
                seqs.push(h.seq);
            }
            seqs
        });
        let book = book(100.0, 0.4);
        let started = Instant::now();
        let plan = PubPlan {
            p: 0,
            kind: Kind::Broadcast,
            addr,
            api_key: String::new(),
            pub_path: "/pub".into(),
            message_bytes: 100,
            book: Arc::clone(&book),
        };
        let result = run(plan);
        let took = started.elapsed();
        let seqs = server.join().unwrap();
        assert!(result.errors.is_empty(), "{:?}", result.errors);
        // 100/s for 0.4 s: about 40, paced over the whole window, not in a burst.
        let published = book.stream[0].published.load(Ordering::Acquire);
        assert_eq!(seqs, (0..published).collect::<Vec<_>>());
        assert!((36..=42).contains(&published), "{published}");
        assert!(took >= Duration::from_millis(380), "{took:?}");
        assert_eq!(book.measured(0), published, "the whole run was the window");
    }

    #[test]
    fn a_barrage_publisher_posts_protobuf_and_counts_refusals() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let SocketAddr::V4(addr) = listener.local_addr().unwrap() else { unreachable!() };
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut r = std::io::BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            let mut datas = Vec::new();
            for n in 0..6 {
                let mut len = 0;
                let mut line = String::new();
                loop {
                    line.clear();
                    std::io::BufRead::read_line(&mut r, &mut line).unwrap();
                    if n == 0 && line.starts_with("POST") {
                        assert_eq!(line, "POST /v1/rooms/r0/messages HTTP/1.1\r\n");
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                    if line.to_ascii_lowercase().starts_with("content-type:") {
                        assert_eq!(line.trim(), "Content-Type: application/x-protobuf");
                    }
                    if line == "\r\n" {
                        break;
                    }
                }
                let mut body = vec![0; len];
                r.read_exact(&mut body).unwrap();
                let req = PublishRequest::decode(body.as_slice()).unwrap();
                assert_eq!((req.r#type.as_str(), req.priority), ("chat", Some(Priority::Low as i32)));
                datas.push(Header::read(req.data[..24].try_into().unwrap()).seq);
                let answer: &[u8] = if n == 2 {
                    b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\n{}"
                } else {
                    b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n{\"id\":\"17\"}\n"
                };
                // Split the answer to exercise partial reads.
                w.write_all(&answer[..10]).unwrap();
                w.flush().unwrap();
                std::thread::sleep(Duration::from_millis(2));
                w.write_all(&answer[10..]).unwrap();
            }
            datas
        });
        let mut http = Http::new(addr, "h", "", &[0]);
        let mut errors = BTreeMap::new();
        let mut accepted = Vec::new();
        let mut msg = Vec::new();
        for seq in 0..6 {
            message(&Header { seq, send_ns: 1, room: 0, publisher: 0 }, 100, &mut msg);
            accepted.push(http.post(0, &msg, &mut errors));
        }
        assert_eq!(accepted, [true, true, false, true, true, true]);
        assert_eq!(errors.get("status_429"), Some(&1));
        assert_eq!(server.join().unwrap(), (0..6).collect::<Vec<_>>());
    }
}
