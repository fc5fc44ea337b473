//! Business API, socket layer: accepts API connections, moves bytes between each socket and the
//! sans-IO [`RequestReader`], and writes the [`Handler`]'s responses. Blocking std::net, one
//! thread per connection: the API carries a few business clients, not the viewers (those are
//! on the io_uring shards), so simplicity beats density here.
#![forbid(unsafe_code)]

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use super::access::Denied;
use super::http::{CONTINUE_100, HttpError, Limits, Method, Progress, Request, RequestHead, RequestReader, Response};
use super::stats::{ServerCounters, ServerStats};

/// Bytes asked of the kernel per read. The buffer grows by at most this past the reader's limits.
const READ_CHUNK_BYTES: usize = 16 * 1024;
/// Capacity a connection's buffer keeps between requests; a large body's buffer shrinks back.
const BUF_RETAINED_BYTES: usize = 64 * 1024;
/// How often a blocked read wakes to look at the stop flag and the idle deadline.
const STOP_POLL: Duration = Duration::from_millis(200);
/// After an error response: how long and how much to drain before closing (see `linger_close`).
const LINGER: Duration = Duration::from_millis(500);
const LINGER_BYTES_MAX: usize = 1024 * 1024;
/// Bounds the acceptor's write of a 503, so a peer that does not read cannot stall accepting.
const REFUSE_WRITE_TIMEOUT: Duration = Duration::from_millis(50);
/// How often a paused acceptor looks whether to go on.
const PAUSED_POLL: Duration = Duration::from_millis(5);
/// Pause after an accept error such as EMFILE, so the acceptor does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(10);
const LISTEN_BACKLOG: i32 = 1024;

/// The routes. `peer` is the client's address.
pub trait Handler: Send + Sync + 'static {
    /// Called once per request as soon as its head is complete, before any of its body is read
    /// (and before a `100 Continue`). A refusal is answered at once and the connection closed
    /// with the body unread, so an unauthorised caller cannot make the server read or buffer up
    /// to `body_bytes_max`.
    fn admit(&self, head: &RequestHead, peer: SocketAddr) -> Result<(), Denied> {
        let _ = (head, peer);
        Ok(())
    }

    /// Called for each complete request whose head `admit` accepted. `server` is this
    /// listener's own counters (for `/metrics`).
    fn handle(&self, request: &Request, peer: SocketAddr, server: &ServerCounters) -> Response;

    /// Whether a request with a chunked body is taken as a stream, and the content type of the
    /// (chunked) answer; None: refused with 411.
    fn streams(&self, head: &RequestHead) -> Option<&'static str> {
        let _ = head;
        None
    }

    /// Serves a streamed request: reads its body a chunk at a time and writes the answer in
    /// chunks, as it goes. An error ends the connection.
    fn stream(&self, head: &RequestHead, body: &mut BodyStream<'_>, out: &mut StreamOut<'_>) -> io::Result<()> {
        let _ = (head, body, out);
        Ok(())
    }
}

/// A chunked request body, read a chunk at a time (each bounded by `body_bytes_max`).
pub struct BodyStream<'a> {
    stream: &'a mut TcpStream,
    buf: &'a mut Vec<u8>,
    shared: &'a Shared,
    idle: Duration,
    done: bool,
}

impl BodyStream<'_> {
    /// The next chunk's data; None once the body has ended. A malformed or oversized chunk, or
    /// a stream idle for the idle timeout, is an error.
    pub fn next_chunk(&mut self) -> io::Result<Option<Vec<u8>>> {
        if self.done {
            return Ok(None);
        }
        let deadline = Instant::now() + self.idle;
        loop {
            match super::http::next_chunk(self.buf, self.shared.config.limits.body_bytes_max) {
                Ok(Some((data, consumed))) => {
                    self.buf.drain(..consumed);
                    self.done = data.is_none();
                    return Ok(data);
                }
                Ok(None) => {
                    if !fill(self.stream, self.buf, deadline, self.shared)? {
                        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the stream ended inside its body"));
                    }
                }
                Err(e) => {
                    self.shared.counters.refused(e);
                    return Err(io::Error::new(io::ErrorKind::InvalidData, e.message()));
                }
            }
        }
    }
}

/// The chunked answer to a streamed request.
pub struct StreamOut<'a> {
    stream: &'a mut TcpStream,
    shared: &'a Shared,
}

impl StreamOut<'_> {
    /// Writes `bytes` as one chunk (nothing for none: an empty chunk would end the answer).
    pub fn chunk(&mut self, bytes: &[u8]) -> io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let mut out = format!("{:x}\r\n", bytes.len()).into_bytes();
        out.extend_from_slice(bytes);
        out.extend_from_slice(b"\r\n");
        send(self.stream, &out, self.shared)
    }
}

/// A plain function or closure is a handler that admits everyone (tests, small tools).
impl<F> Handler for F
where
    F: Fn(&Request, SocketAddr) -> Response + Send + Sync + 'static,
{
    fn handle(&self, request: &Request, peer: SocketAddr, _server: &ServerCounters) -> Response {
        self(request, peer)
    }
}

/// Worst-case memory: `connections_max` × (`head_bytes_max` + `body_bytes_max` + 16 KiB read
/// chunk + the thread's touched stack). With the defaults: 64 × ~1.1 MiB ≈ 70 MiB, reached only
/// if every connection sends a maximal body at once; idle connections keep ≤ 64 KiB of buffer.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Connections served at once, one thread each. Over it a new connection gets 503 and is
    /// closed (counted in `connections_refused`).
    pub connections_max: usize,
    /// Each request must arrive whole within this long of the connection's accept or its
    /// previous response; otherwise the connection is closed. Bounds idle keep-alive
    /// connections and slow senders alike.
    pub idle_timeout_ms: u64,
    pub limits: Limits,
}

impl Default for ServerConfig {
    /// 64 connections are plenty for business servers with keep-alive pools; 30 s of idle
    /// matches common client pool timeouts.
    fn default() -> Self {
        ServerConfig { connections_max: 64, idle_timeout_ms: 30_000, limits: Limits::default() }
    }
}

/// A running API listener. Stopping: [`Server::stop`], or drop.
pub struct Server {
    local_addr: SocketAddr,
    /// The listening socket, kept to wake the acceptor (shutdown) when stopping.
    listener: Socket,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

/// What the acceptor and the connection threads share.
struct Shared {
    config: ServerConfig,
    handler: Arc<dyn Handler>,
    stop: AtomicBool,
    paused: AtomicBool,
    counters: ServerCounters,
}

impl Server {
    /// Binds (SO_REUSEADDR) and starts an acceptor thread; each accepted connection gets its own
    /// thread (at most `connections_max` at once; over that, the new connection is answered 503
    /// with a JSON error and closed, and a counter incremented).
    pub fn start(addr: SocketAddr, config: ServerConfig, handler: Arc<dyn Handler>) -> io::Result<Server> {
        validate(&config)?;
        Server::start_on(bind(addr)?, config, handler)
    }

    /// As `start`, on a listening socket already bound (one taken over from the process this
    /// one replaces: its queued connections are served here).
    pub fn start_on(listener: Socket, config: ServerConfig, handler: Arc<dyn Handler>) -> io::Result<Server> {
        validate(&config)?;
        // Non-blocking, polled: stopping needs no shutdown(2), which would end the socket for
        // every process holding it (an upgrade shares it with the next one).
        listener.set_nonblocking(true)?;
        listener.listen(LISTEN_BACKLOG)?;
        let std_listener: TcpListener = listener.try_clone()?.into();
        let local_addr = std_listener.local_addr()?;
        let shared = Arc::new(Shared {
            config,
            handler,
            stop: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            counters: ServerCounters::default(),
        });
        let acceptor_shared = Arc::clone(&shared);
        let acceptor = thread::Builder::new()
            .name("api-acceptor".into())
            .spawn(move || accept_loop(&std_listener, &acceptor_shared))?;
        Ok(Server { local_addr, listener, shared, acceptor: Some(acceptor) })
    }

    /// The listening socket (to hand to the next process on an upgrade).
    pub fn listener(&self) -> &Socket {
        &self.listener
    }

    /// A handle that pauses, resumes or retires accepting from another thread.
    pub fn gate(&self) -> Gate {
        Gate(Arc::clone(&self.shared))
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// This listener's counters now (the handler sees the same through `handle`'s `server`).
    pub fn stats(&self) -> ServerStats {
        self.shared.counters.snapshot()
    }

    /// Stops accepting, wakes the acceptor and joins it. Connection threads finish their
    /// current request (answered with `Connection: close`) and exit; an idle one notices
    /// within 200 ms.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        let Some(acceptor) = self.acceptor.take() else {
            return;
        };
        self.shared.stop.store(true, Ordering::Release);
        // The acceptor polls with a timeout: it sees the flag within `STOP_POLL`.
        let _ = acceptor.join();
    }
}

/// Accepting paused, resumed or ended from another thread (an upgrade: paused while the rooms
/// move, retired once the next process serves the listener).
pub struct Gate(Arc<Shared>);

impl Gate {
    /// Leaves new connections in the listen queue (the next process may take them).
    pub fn pause(&self) {
        self.0.paused.store(true, Ordering::Release);
    }

    pub fn resume(&self) {
        self.0.paused.store(false, Ordering::Release);
    }

    /// Accepts nothing more and closes every connection after its current request (an idle one
    /// within 200 ms), as `stop` does, without waiting.
    pub fn retire(&self) {
        self.0.stop.store(true, Ordering::Release);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.halt();
    }
}

fn validate(config: &ServerConfig) -> io::Result<()> {
    let invalid = |what: &str| Err(io::Error::new(io::ErrorKind::InvalidInput, what.to_owned()));
    if config.connections_max == 0 {
        return invalid("api: connections_max must be at least 1");
    }
    if config.idle_timeout_ms == 0 {
        return invalid("api: idle_timeout_ms must be at least 1");
    }
    let limits = &config.limits;
    if limits.head_bytes_max == 0 || limits.headers_max == 0 {
        return invalid("api: head_bytes_max and headers_max must be at least 1");
    }
    Ok(())
}

fn bind(addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // A restarted gateway rebinds at once even while old connections sit in TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket)
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    let poll_timeout = rustix::time::Timespec { tv_sec: 0, tv_nsec: STOP_POLL.as_nanos() as i64 };
    loop {
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        if shared.paused.load(Ordering::Acquire) {
            thread::sleep(PAUSED_POLL);
            continue;
        }
        let mut fds = [rustix::event::PollFd::new(listener, rustix::event::PollFlags::IN)];
        // Paused or stopped while polling: leave the connection queued.
        let ready = matches!(rustix::event::poll(&mut fds, Some(&poll_timeout)), Ok(1..));
        if !ready || shared.paused.load(Ordering::Acquire) || shared.stop.load(Ordering::Acquire) {
            continue;
        }
        match listener.accept() {
            Ok((stream, peer)) => admit(stream, peer, shared),
            // Another process sharing the listener (an upgrade) may have taken it.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
            // EMFILE, ENOBUFS and the like: wait for resources rather than spin.
            Err(_) => thread::sleep(ACCEPT_ERROR_PAUSE),
        }
    }
}

/// Frees a connection slot when the connection thread ends, however it ends (or when the
/// thread could not be spawned and the closure holding it is dropped).
struct Slot(Arc<Shared>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.counters.active.fetch_sub(1, Ordering::AcqRel);
    }
}

fn admit(stream: TcpStream, peer: SocketAddr, shared: &Arc<Shared>) {
    shared.counters.accepted();
    let active = &shared.counters.active;
    // Take the slot before checking, so the count can never exceed the cap.
    if active.fetch_add(1, Ordering::AcqRel) >= shared.config.connections_max {
        active.fetch_sub(1, Ordering::AcqRel);
        refuse_connection(stream, shared);
        return;
    }
    let slot = Slot(Arc::clone(shared));
    let spawned = thread::Builder::new().name("api-conn".into()).spawn(move || {
        let shared = &slot.0;
        // An io error here is the peer going away or timing out on write: nothing to answer.
        let _ = serve(stream, peer, shared);
    });
    if spawned.is_err() {
        // The closure, with its slot and stream, was dropped: the peer sees the close.
        shared.counters.refused_spawn();
    }
}

/// 503 from the acceptor thread: bounded write, half-close, no waiting.
fn refuse_connection(mut stream: TcpStream, shared: &Shared) {
    shared.counters.refused_full();
    let response = Response::error(503, "too many API connections").to_bytes(false, false);
    let _ = stream.set_write_timeout(Some(REFUSE_WRITE_TIMEOUT));
    if send(&mut stream, &response, shared).is_ok() {
        // Unread request bytes would turn our close into a RST that can destroy the 503 in
        // flight; take what has already arrived without waiting for more.
        close_quietly(&mut stream, shared);
    }
}

/// Serves one connection until it closes, idles out, errs, or the server stops.
fn serve(mut stream: TcpStream, peer: SocketAddr, shared: &Shared) -> io::Result<()> {
    let idle = Duration::from_millis(shared.config.idle_timeout_ms);
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(idle.min(STOP_POLL)))?;
    stream.set_write_timeout(Some(idle))?;
    let mut reader = RequestReader::new(shared.config.limits);
    let mut buf = Vec::new();
    let mut deadline = Instant::now() + idle;
    loop {
        match reader.read(&buf) {
            Ok(Progress::Head(head)) => {
                if let Err(denied) = shared.handler.admit(head, peer) {
                    deny(stream, head, denied, shared);
                    return Ok(());
                }
            }
            Ok(Progress::Complete { request, consumed }) => {
                let keep_alive = respond(&mut stream, &request, peer, shared)?;
                compact(&mut buf, consumed);
                if !keep_alive {
                    close_quietly(&mut stream, shared);
                    return Ok(());
                }
                deadline = Instant::now() + idle;
            }
            Ok(Progress::Stream { head, consumed, expects_continue }) => {
                compact(&mut buf, consumed);
                let Some(content_type) = shared.handler.streams(&head) else {
                    refuse_request(stream, HttpError::LengthRequired, shared);
                    return Ok(());
                };
                if expects_continue {
                    send(&mut stream, CONTINUE_100, shared)?;
                }
                if !serve_stream(&mut stream, &mut buf, &head, content_type, idle, shared)? {
                    close_quietly(&mut stream, shared);
                    return Ok(());
                }
                deadline = Instant::now() + idle;
            }
            Ok(Progress::Continue100) => {
                send(&mut stream, CONTINUE_100, shared)?;
                if !fill(&mut stream, &mut buf, deadline, shared)? {
                    return Ok(());
                }
            }
            Ok(Progress::Partial) => {
                if !fill(&mut stream, &mut buf, deadline, shared)? {
                    return Ok(());
                }
            }
            Err(error) => {
                refuse_request(stream, error, shared);
                return Ok(());
            }
        }
    }
}

/// Answers a streamed request: a chunked 200 whose chunks the handler writes as it reads the
/// body. Returns whether the connection stays open (the body was read to its end, cleanly).
fn serve_stream(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    head: &RequestHead,
    content_type: &str,
    idle: Duration,
    shared: &Shared,
) -> io::Result<bool> {
    shared.counters.responded(200);
    let keep_alive = head.keep_alive && !shared.stop.load(Ordering::Acquire);
    let connection = if keep_alive { "keep-alive" } else { "close" };
    let answer = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nTransfer-Encoding: chunked\r\nConnection: {connection}\r\n\r\n"
    );
    send(stream, answer.as_bytes(), shared)?;
    let mut body = BodyStream { stream: &mut *stream, buf, shared, idle, done: false };
    let served = {
        let mut out_stream = body.stream.try_clone()?;
        let mut out = StreamOut { stream: &mut out_stream, shared };
        let handled = panic::catch_unwind(AssertUnwindSafe(|| shared.handler.stream(head, &mut body, &mut out)));
        match handled {
            Ok(r) => r.map(|()| body.done),
            Err(_) => {
                shared.counters.handler_panic();
                Ok(false)
            }
        }
    };
    // The answer ends (with the zero chunk) whatever happened; a body not read to its end
    // leaves the connection unusable.
    send(stream, b"0\r\n\r\n", shared)?;
    Ok(matches!(served, Ok(true)) && keep_alive)
}

/// Calls the handler and writes its response; returns whether the connection stays open.
fn respond(stream: &mut TcpStream, request: &Request, peer: SocketAddr, shared: &Shared) -> io::Result<bool> {
    let handled = panic::catch_unwind(AssertUnwindSafe(|| shared.handler.handle(request, peer, &shared.counters)));
    let (response, healthy) = match handled {
        Ok(response) => (response, true),
        Err(_) => {
            shared.counters.handler_panic();
            (Response::error(500, "internal error"), false)
        }
    };
    shared.counters.responded(response.status);
    let head = &request.head;
    let keep_alive = healthy && head.keep_alive && !shared.stop.load(Ordering::Acquire);
    send(stream, &response.to_bytes(keep_alive, head.method == Method::Head), shared)?;
    Ok(keep_alive)
}

/// Answers a caller the handler refused on the head, and closes without reading the body: an
/// unauthorised client must not make us read (or buffer) up to `body_bytes_max`, whatever it
/// asked for (`Expect: 100-continue` gets this answer instead of the 100; keep-alive is
/// ignored). Whatever of the body had already arrived with the head (one read at most) is
/// dropped unread, so the kernel ends the connection with RST behind our response; on Linux the
/// client can still read the response it received, and a client still sending sees its write
/// fail rather than the server draining megabytes for it.
fn deny(mut stream: TcpStream, head: &RequestHead, denied: Denied, shared: &Shared) {
    shared.counters.denied(denied);
    let response = denied.response();
    shared.counters.responded(response.status);
    if send(&mut stream, &response.to_bytes(false, head.method == Method::Head), shared).is_ok() {
        let _ = stream.shutdown(Shutdown::Write);
    }
}

/// Writes all of `bytes`, counting them.
fn send(stream: &mut TcpStream, bytes: &[u8], shared: &Shared) -> io::Result<()> {
    stream.write_all(bytes)?;
    shared.counters.wrote(bytes.len());
    Ok(())
}

/// Reads once more into `buf`. False: the peer closed, the request did not arrive by
/// `deadline`, or the server is stopping and no request is under way.
fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>, deadline: Instant, shared: &Shared) -> io::Result<bool> {
    loop {
        let start = buf.len();
        buf.resize(start + READ_CHUNK_BYTES, 0);
        let read = stream.read(&mut buf[start..]);
        let n = match &read {
            Ok(n) => *n,
            Err(_) => 0,
        };
        buf.truncate(start + n);
        shared.counters.read(n);
        match read {
            Ok(0) => return Ok(false),
            Ok(_) => return Ok(true),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                if buf.is_empty() && shared.stop.load(Ordering::Acquire) {
                    return Ok(false);
                }
                if Instant::now() >= deadline {
                    shared.counters.idle_timeout();
                    return Ok(false);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Drops a finished request's bytes; the buffer keeps only a modest capacity between requests,
/// so one large body does not pin a megabyte to an idle connection.
fn compact(buf: &mut Vec<u8>, consumed: usize) {
    buf.drain(..consumed.min(buf.len()));
    if buf.capacity() > BUF_RETAINED_BYTES {
        buf.shrink_to(BUF_RETAINED_BYTES);
    }
}

/// Answers a refused request with its status and closes.
fn refuse_request(mut stream: TcpStream, error: HttpError, shared: &Shared) {
    shared.counters.refused(error);
    shared.counters.responded(error.status());
    let response = Response::error(error.status(), error.message()).to_bytes(false, false);
    if send(&mut stream, &response, shared).is_ok() {
        linger_close(stream, shared);
    }
}

/// Closing with unread bytes queued makes the kernel send RST, and a client still sending (an
/// oversize body, say) may then lose our error response. So half-close, and drain what the
/// client still sends for a bounded time and amount, before closing.
fn linger_close(mut stream: TcpStream, shared: &Shared) {
    let _ = stream.shutdown(Shutdown::Write);
    let _ = stream.set_read_timeout(Some(LINGER));
    let deadline = Instant::now() + LINGER;
    let (mut sink, mut drained) = ([0u8; 4096], 0);
    while Instant::now() < deadline && drained < LINGER_BYTES_MAX {
        match stream.read(&mut sink) {
            Ok(n) if n > 0 => drained += n,
            _ => break,
        }
    }
    shared.counters.read(drained);
}

/// After a `Connection: close` response: half-close and drop what has already arrived, so a
/// pipelined request the client sent anyway does not turn the close into a RST.
fn close_quietly(stream: &mut TcpStream, shared: &Shared) {
    let _ = stream.shutdown(Shutdown::Write);
    let _ = stream.set_nonblocking(true);
    let mut sink = [0u8; 4096];
    while let Ok(n @ 1..) = stream.read(&mut sink) {
        shared.counters.read(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::access::Access;
    use std::io::BufRead;
    use std::io::BufReader;

    /// Echoes method, path, query, key and body as JSON.
    fn echo(request: &Request, _peer: SocketAddr) -> Response {
        let head = &request.head;
        Response::json(
            200,
            &serde_json::json!({
                "method": format!("{:?}", head.method),
                "path": head.path,
                "query": head.query,
                "key": head.api_key,
                "body": String::from_utf8_lossy(&request.body),
            }),
        )
    }

    /// Echoes callers with the key "k" (or asking for /healthz); refuses the rest on the head.
    struct Keyed(Access);

    impl Handler for Keyed {
        fn admit(&self, head: &RequestHead, peer: SocketAddr) -> Result<(), Denied> {
            self.0.check(head, peer)
        }

        fn handle(&self, request: &Request, peer: SocketAddr, _server: &ServerCounters) -> Response {
            echo(request, peer)
        }
    }

    fn start_keyed(limits: Limits) -> Server {
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        Server::start(addr, ServerConfig { limits, ..ServerConfig::default() }, Arc::new(Keyed(Access::new("k"))))
            .unwrap()
    }

    /// Writes `bytes` of body from another thread until done or refused; says how far it got.
    fn send_body(stream: TcpStream, bytes: usize) -> thread::JoinHandle<(usize, io::Result<()>)> {
        // A backstop: a server that neither reads nor closes would otherwise hang the test.
        stream.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        thread::spawn(move || {
            let chunk = [b'x'; 64 * 1024];
            let mut sent = 0;
            while sent < bytes {
                match (&stream).write(&chunk[..(bytes - sent).min(chunk.len())]) {
                    Ok(n) => sent += n,
                    Err(e) => return (sent, Err(e)),
                }
            }
            (sent, Ok(()))
        })
    }

    fn start_with(config: ServerConfig) -> Server {
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        Server::start(addr, config, Arc::new(echo)).unwrap()
    }

    fn start() -> Server {
        start_with(ServerConfig::default())
    }

    fn connect(server: &Server) -> TcpStream {
        let stream = TcpStream::connect(server.local_addr()).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        stream
    }

    /// One response read off the stream: status, headers (lowercase names), body.
    struct Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl Reply {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
        }

        fn json(&self) -> serde_json::Value {
            serde_json::from_slice(&self.body).unwrap()
        }
    }

    fn read_reply(reader: &mut BufReader<TcpStream>) -> Reply {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let status = line.split(' ').nth(1).unwrap().parse().unwrap();
        let mut headers = Vec::new();
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            let Some((name, value)) = line.trim_end().split_once(": ") else {
                break;
            };
            headers.push((name.to_ascii_lowercase(), value.to_owned()));
        }
        let mut reply = Reply { status, headers, body: Vec::new() };
        let length: usize = reply.header("content-length").map_or(0, |v| v.parse().unwrap());
        reply.body.resize(length, 0);
        reader.read_exact(&mut reply.body).unwrap();
        reply
    }

    fn assert_closed(reader: &mut BufReader<TcpStream>) {
        let mut rest = Vec::new();
        match reader.read_to_end(&mut rest) {
            Ok(_) => assert!(rest.is_empty(), "unexpected bytes: {rest:?}"),
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}"),
        }
    }

    #[test]
    fn echo_round_trip() {
        let server = start();
        let mut stream = connect(&server);
        stream
            .write_all(b"POST /v1/rooms/r1/messages?x=1 HTTP/1.1\r\nX-Api-Key: k\r\nContent-Length: 5\r\n\r\nhello")
            .unwrap();
        let reply = read_reply(&mut BufReader::new(stream));
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("content-type"), Some("application/json"));
        assert_eq!(reply.header("connection"), Some("keep-alive"));
        assert_eq!(
            reply.json(),
            serde_json::json!({"method": "Post", "path": "/v1/rooms/r1/messages", "query": "x=1", "key": "k", "body": "hello"})
        );
        let stats = server.stats();
        assert_eq!((stats.requests, stats.requests_total(), stats.bytes_in), ([1, 0, 0, 0], 1, 81));
        // Bytes out are counted once written, which may be just after the client has them.
        let deadline = Instant::now() + Duration::from_secs(5);
        while server.stats().bytes_out < reply.body.len() as u64 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        assert!(server.stats().bytes_out > reply.body.len() as u64, "{:?}", server.stats());
        server.stop();
    }

    #[test]
    fn keep_alive_serves_two_requests_on_one_connection() {
        let server = start();
        let mut stream = connect(&server);
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        stream.write_all(b"GET /one HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(read_reply(&mut reader).json()["path"], "/one");
        stream.write_all(b"GET /two HTTP/1.1\r\nConnection: close\r\n\r\n").unwrap();
        let reply = read_reply(&mut reader);
        assert_eq!((reply.json()["path"].as_str(), reply.header("connection")), (Some("/two"), Some("close")));
        assert_closed(&mut reader);
        assert_eq!(server.stats().connections_accepted, 1);
        server.stop();
    }

    #[test]
    fn pipelined_requests_answered_in_order() {
        let server = start();
        let mut stream = connect(&server);
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        stream
            .write_all(b"POST /a HTTP/1.1\r\nContent-Length: 1\r\n\r\nxGET /b HTTP/1.1\r\n\r\nHEAD /c HTTP/1.1\r\n\r\n")
            .unwrap();
        let a = read_reply(&mut reader);
        assert_eq!((a.json()["path"].as_str(), a.json()["body"].as_str()), (Some("/a"), Some("x")));
        assert_eq!(read_reply(&mut reader).json()["path"], "/b");
        // HEAD: a Content-Length but no body bytes; then the connection is still usable.
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert_eq!(line, "HTTP/1.1 200 OK\r\n");
        while line != "\r\n" {
            line.clear();
            reader.read_line(&mut line).unwrap();
        }
        stream.write_all(b"GET /d HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(read_reply(&mut reader).json()["path"], "/d");
        server.stop();
    }

    #[test]
    fn expect_100_continue() {
        let server = start();
        let mut stream = connect(&server);
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        stream.write_all(b"POST /e HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n").unwrap();
        let mut interim = [0u8; CONTINUE_100.len()];
        reader.read_exact(&mut interim).unwrap();
        assert_eq!(&interim, CONTINUE_100);
        stream.write_all(b"body").unwrap();
        let reply = read_reply(&mut reader);
        assert_eq!((reply.status, reply.json()["body"].as_str()), (200, Some("body")));
        server.stop();
    }

    #[test]
    fn oversize_body_is_413_and_closed() {
        let limits = Limits { body_bytes_max: 1000, ..Limits::default() };
        let server = start_with(ServerConfig { limits, ..ServerConfig::default() });
        let mut stream = connect(&server);
        // The client starts sending the body without waiting: the 413 must still arrive.
        stream.write_all(b"POST /big HTTP/1.1\r\nContent-Length: 100000\r\n\r\n").unwrap();
        let _ = stream.write_all(&[b'x'; 20_000]);
        let mut reader = BufReader::new(stream);
        let reply = read_reply(&mut reader);
        assert_eq!((reply.status, reply.header("connection")), (413, Some("close")));
        assert_eq!(reply.json(), serde_json::json!({"error": "request body too large"}));
        assert_closed(&mut reader);
        let stats = server.stats();
        assert_eq!(stats.refused_for(HttpError::BodyTooLarge), 1);
        assert_eq!(stats.requests, [0, 0, 1, 0]);
        server.stop();
    }

    #[test]
    fn unauthorised_head_is_refused_before_the_body_is_read() {
        const BODY: usize = 64 << 20;
        let server = start_keyed(Limits { body_bytes_max: BODY, ..Limits::default() });
        let mut stream = connect(&server);
        let head = format!("POST /v1/broadcast HTTP/1.1\r\nContent-Length: {BODY}\r\n\r\n");
        stream.write_all(head.as_bytes()).unwrap();
        let started = Instant::now();
        let writer = send_body(stream.try_clone().unwrap(), BODY);
        let mut reader = BufReader::new(stream);
        let reply = read_reply(&mut reader);
        assert!(started.elapsed() < Duration::from_secs(2), "401 took {:?}", started.elapsed());
        assert_eq!((reply.status, reply.header("connection")), (401, Some("close")));
        assert_eq!(reply.header("www-authenticate"), Some("Bearer"));
        assert!(reply.json()["error"].as_str().unwrap().contains("API key"));
        // The server closed with the body unread: the client's sending fails part way.
        let (sent, result) = writer.join().unwrap();
        let error = result.expect_err("the whole body was taken");
        assert!(matches!(error.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe), "{error}");
        assert!(sent < BODY, "{sent}");
        let stats = server.stats();
        assert_eq!((stats.denied_for(Denied::KeyMissing), stats.requests), (1, [0, 0, 1, 0]));
        // At most the one read that completed the head: nothing was read for the body's sake.
        assert!(stats.bytes_in <= (head.len() + READ_CHUNK_BYTES) as u64, "{stats:?}");
        server.stop();
    }

    #[test]
    fn unauthorised_expect_100_gets_the_refusal_instead_of_100() {
        let server = start_keyed(Limits::default());
        let mut stream = connect(&server);
        stream
            .write_all(b"POST /e HTTP/1.1\r\nX-Api-Key: nope\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
            .unwrap();
        let mut reader = BufReader::new(stream);
        let reply = read_reply(&mut reader);
        assert_eq!((reply.status, reply.header("connection")), (401, Some("close")));
        assert_eq!(reply.json(), serde_json::json!({"error": "wrong API key"}));
        assert_closed(&mut reader);
        assert_eq!(server.stats().denied_for(Denied::KeyWrong), 1);
        // With the key, the same request is invited to send its body.
        let mut stream = connect(&server);
        stream
            .write_all(b"POST /e HTTP/1.1\r\nX-Api-Key: k\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
            .unwrap();
        let mut interim = [0u8; CONTINUE_100.len()];
        stream.read_exact(&mut interim).unwrap();
        assert_eq!(&interim, CONTINUE_100);
        server.stop();
    }

    #[test]
    fn refusal_closes_a_keep_alive_connection() {
        let server = start_keyed(Limits::default());
        let mut stream = connect(&server);
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        // Pipelined: a good request, an unauthorised one, and one that must never be served.
        stream
            .write_all(b"GET /a HTTP/1.1\r\nX-Api-Key: k\r\n\r\nGET /b HTTP/1.1\r\n\r\nGET /c HTTP/1.1\r\nX-Api-Key: k\r\n\r\n")
            .unwrap();
        let a = read_reply(&mut reader);
        assert_eq!(
            (a.status, a.header("connection"), a.json()["path"].as_str()),
            (200, Some("keep-alive"), Some("/a"))
        );
        let b = read_reply(&mut reader);
        assert_eq!((b.status, b.header("connection")), (401, Some("close")));
        assert_closed(&mut reader);
        assert_eq!(server.stats().requests, [1, 0, 1, 0]);
        // Health is open without a key.
        let mut stream = connect(&server);
        stream.write_all(b"GET /healthz HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(read_reply(&mut BufReader::new(stream)).status, 200);
        server.stop();
    }

    #[test]
    fn refused_requests_get_their_status() {
        let server = start();
        for (raw, status) in
            [(&b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"[..], 411), (b"NOT HTTP AT ALL\r\n\r\n", 400)]
        {
            let mut stream = connect(&server);
            stream.write_all(raw).unwrap();
            let mut reader = BufReader::new(stream);
            let reply = read_reply(&mut reader);
            assert_eq!(reply.status, status);
            assert!(reply.json()["error"].is_string());
            assert_closed(&mut reader);
        }
        let stats = server.stats();
        let by_error = HttpError::ALL.map(|e| (e.status(), stats.refused_for(e)));
        assert_eq!(by_error, [(431, 0), (413, 0), (400, 1), (411, 1)]);
        assert_eq!(stats.requests_like(400), 2);
        server.stop();
    }

    #[test]
    fn connection_cap_answers_503() {
        let server = start_with(ServerConfig { connections_max: 1, ..ServerConfig::default() });
        // The first connection holds the only slot (a completed request proves it was admitted).
        let mut first = connect(&server);
        let mut first_reader = BufReader::new(first.try_clone().unwrap());
        first.write_all(b"GET /hold HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(read_reply(&mut first_reader).status, 200);
        let mut second = BufReader::new(connect(&server));
        let reply = read_reply(&mut second);
        assert_eq!((reply.status, reply.header("connection")), (503, Some("close")));
        assert!(reply.json()["error"].is_string());
        assert_closed(&mut second);
        assert_eq!(server.stats().connections_refused, 1);
        // The slot frees when the first connection ends.
        drop((first, first_reader));
        let deadline = Instant::now() + Duration::from_secs(5);
        while server.stats().connections_active > 0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        let mut third = connect(&server);
        third.write_all(b"GET /again HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(read_reply(&mut BufReader::new(third)).status, 200);
        server.stop();
    }

    #[test]
    fn idle_connection_is_closed() {
        let server = start_with(ServerConfig { idle_timeout_ms: 100, ..ServerConfig::default() });
        let stream = connect(&server);
        // A partial request does not keep the connection: the whole request must come in time.
        (&stream).write_all(b"GET /slow HTTP/1.1\r\n").unwrap();
        let started = Instant::now();
        assert_closed(&mut BufReader::new(stream));
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
        assert_eq!(server.stats().idle_timeouts, 1);
        server.stop();
    }

    #[test]
    fn handler_panic_is_500_and_close() {
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let handler = |_: &Request, _: SocketAddr| -> Response { panic!("route bug") };
        let server = Server::start(addr, ServerConfig::default(), Arc::new(handler)).unwrap();
        let mut stream = connect(&server);
        stream.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let mut reader = BufReader::new(stream);
        assert_eq!(read_reply(&mut reader).status, 500);
        assert_closed(&mut reader);
        assert_eq!(server.stats().handler_panics, 1);
        server.stop();
    }

    #[test]
    fn stop_returns_promptly_and_closes_idle_connections() {
        let server = start();
        let addr = server.local_addr();
        let mut idle = connect(&server);
        let mut reader = BufReader::new(idle.try_clone().unwrap());
        idle.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(read_reply(&mut reader).status, 200);
        let started = Instant::now();
        server.stop();
        assert!(started.elapsed() < Duration::from_millis(500), "stop took {:?}", started.elapsed());
        // The idle keep-alive connection sees the close within the stop poll.
        assert_closed(&mut reader);
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
        assert!(TcpStream::connect(addr).is_err(), "still accepting after stop");
    }

    #[test]
    fn invalid_config_is_refused() {
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        for config in [
            ServerConfig { connections_max: 0, ..ServerConfig::default() },
            ServerConfig { idle_timeout_ms: 0, ..ServerConfig::default() },
        ] {
            let error = Server::start(addr, config, Arc::new(echo)).err().unwrap();
            assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
        }
    }

    /// An upgrade: the old process pauses (the connection waits in the listen queue), stops
    /// (which must not end the socket it shares), and the new one serves what was queued.
    #[test]
    fn a_paused_server_leaves_connections_queued_and_a_sharing_one_outlives_its_stop() {
        let old = start();
        let new =
            Server::start_on(old.listener().try_clone().unwrap(), ServerConfig::default(), Arc::new(echo)).unwrap();
        new.gate().pause();
        old.gate().pause();
        thread::sleep(STOP_POLL + Duration::from_millis(50));
        let queued = connect(&old);
        (&queued).write_all(b"GET /queued HTTP/1.1\r\nConnection: close\r\n\r\n").unwrap();
        thread::sleep(Duration::from_millis(300));
        let accepted = |s: &Server| s.stats().connections_accepted;
        assert_eq!(accepted(&old) + accepted(&new), 0, "paused: nothing accepted");
        old.stop();
        new.gate().resume();
        let mut reader = BufReader::new(queued);
        assert_eq!(read_reply(&mut reader).status, 200, "the queued connection is served by the other");
        assert_eq!(accepted(&new), 1);
        // Retired: no more accepting, without waiting for the acceptor.
        new.gate().retire();
        thread::sleep(STOP_POLL + Duration::from_millis(50));
        let late = connect(&new);
        (&late).write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        thread::sleep(Duration::from_millis(100));
        assert_eq!(accepted(&new), 1, "retired: the connection stays queued");
    }
}
