//! Test harness: starts the real `barrage` binary on free loopback ports, and talks to it over
//! real sockets — a WebSocket client (tungstenite), a raw TCP client for malformed input, and a
//! tiny HTTP client for the business API.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use barrage::proto::{ClientFrame, ServerFrame, client_frame, server_frame};
use barrage::wire::frame;
use prost::Message as _;
use tungstenite::client::IntoClientRequest;
use tungstenite::http::HeaderValue;
use tungstenite::protocol::Message as WsMessage;
pub use tungstenite::stream::MaybeTlsStream;

pub const SECRET: &str = "test-secret-0123456789-0123456789";

/// A running gateway process, stopped (SIGTERM, then kill) on drop.
pub struct Gateway {
    child: Child,
    pub ws: SocketAddr,
    pub api: SocketAddr,
    pub stdout: Vec<String>,
}

impl Gateway {
    /// Starts with fast blocks (50 ms), a JWT secret, and the given extra flags.
    /// `extra` holds flag/value pairs; a flag given there replaces its default; a switch (a flag
    /// without a value) is given with the value "".
    pub fn start(extra: &[&str]) -> Gateway {
        let mut args: Vec<(&str, &str)> = vec![
            ("--listen", "127.0.0.1:0"),
            ("--api-listen", "127.0.0.1:0"),
            ("--block-interval-ms", "50"),
            ("--jwt-secret", SECRET),
            ("--shards", "2"),
            ("--connections-max", "20000"),
            // enter/leave blocks would interleave with what most tests look for; the presence
            // tests turn them on.
            ("--presence-events", "false"),
        ];
        for pair in extra.chunks(2) {
            let (flag, value) = (pair[0], pair.get(1).copied().unwrap_or(""));
            match args.iter_mut().find(|(f, _)| *f == flag) {
                Some(slot) => slot.1 = value,
                None => args.push((flag, value)),
            }
        }
        let flat: Vec<&str> = args.iter().flat_map(|(f, v)| [*f, *v]).filter(|a| !a.is_empty()).collect();
        Self::start_raw(&flat)
    }

    /// Starts with exactly these flags.
    pub fn start_raw(args: &[&str]) -> Gateway {
        let mut child = Command::new(env!("CARGO_BIN_EXE_barrage"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start barrage");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let (mut ws, mut api, mut seen) = (None, None, Vec::new());
        while ws.is_none() || api.is_none() {
            let line = match lines.next() {
                Some(Ok(l)) => l,
                _ => panic!("barrage exited before listening; output: {seen:?}"),
            };
            let ws_line =
                line.trim().strip_prefix("WebSocket  ws://").or_else(|| line.trim().strip_prefix("WebSocket  wss://"));
            if let Some(rest) = ws_line {
                ws = rest.split('/').next().and_then(|a| a.parse().ok());
            }
            if let Some(rest) = line.trim().strip_prefix("API        http://") {
                api = rest.split_whitespace().next().and_then(|a| a.parse().ok());
            }
            seen.push(line);
        }
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Gateway { child, ws: ws.unwrap(), api: api.unwrap(), stdout: seen }
    }

    /// SIGTERM and wait for a clean exit; returns the exit status success.
    pub fn terminate(&mut self) -> bool {
        // SAFETY-free: kill(1) via the command line keeps tests free of unsafe.
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// The gateway process's id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process to exit by itself; true when it did, successfully.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn url(&self, query: &str) -> String {
        format!("ws://{}/ws{}", self.ws, query)
    }

    /// Waits until the API reports `online` members in `room`.
    pub fn wait_online(&self, room: &str, online: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (status, body) = http(self.api, "GET", &format!("/v1/rooms/{room}"), None, &[]);
            assert_eq!(status, 200, "{body}");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            if v["online"].as_u64() == Some(online) {
                return;
            }
            assert!(Instant::now() < deadline, "room {room} never reached {online} online: {body}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Publishes a JSON message to a room; returns (status, body).
    pub fn publish(&self, room: &str, body: serde_json::Value) -> (u16, String) {
        http(self.api, "POST", &format!("/v1/rooms/{room}/messages"), Some(&body.to_string()), &[])
    }

    /// The value of one Prometheus series summed over shards.
    pub fn metric(&self, series: &str) -> u64 {
        let (_, text) = http(self.api, "GET", "/metrics", None, &[]);
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                let matches = name == series || strip_shard(name) == series;
                matches.then(|| value.parse::<u64>().ok()).flatten()
            })
            .sum()
    }
}

/// `name{shard="0",k="v"}` → `name{k="v"}`; `name{shard="0"}` → `name`.
fn strip_shard(name: &str) -> String {
    let Some((base, labels)) = name.split_once('{') else { return name.to_string() };
    let rest: Vec<&str> = labels.trim_end_matches('}').split(',').filter(|l| !l.starts_with("shard=")).collect();
    if rest.is_empty() { base.to_string() } else { format!("{base}{{{}}}", rest.join(",")) }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One HTTP/1.1 request with `Connection: close`; returns (status, body).
pub fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&str>, headers: &[(&str, &str)]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect API");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let body = body.unwrap_or("");
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    if !body.is_empty() && !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-type")) {
        req.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// A signed token for `user` valid for an hour.
pub fn token(user: &str) -> String {
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 3600;
    barrage::auth::sign_hs256(SECRET.as_bytes(), &serde_json::json!({"sub": user, "exp": exp}))
}

pub type Socket = tungstenite::WebSocket<MaybeTlsStream<TcpStream>>;

/// A WebSocket client speaking protobuf or JSON.
pub struct Client {
    pub ws: Socket,
    pub json: bool,
}

impl Client {
    pub fn connect(url: &str, protocol: Option<&str>) -> Client {
        let mut req = url.into_client_request().unwrap();
        if let Some(p) = protocol {
            req.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_str(p).unwrap());
        }
        let (ws, _resp) = tungstenite::connect(req).expect("WebSocket connect");
        if let MaybeTlsStream::Plain(s) = ws.get_ref() {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        }
        Client { ws, json: protocol == Some("barrage.v1.json") }
    }

    pub fn send(&mut self, frame: client_frame::Frame) {
        let f = ClientFrame { frame: Some(frame) };
        let msg = if self.json {
            WsMessage::text(serde_json::to_string(&f).unwrap())
        } else {
            WsMessage::binary(f.encode_to_vec())
        };
        self.ws.send(msg).unwrap();
    }

    /// The next server frame (skipping WebSocket pings); panics on close or timeout.
    pub fn recv(&mut self) -> server_frame::Frame {
        loop {
            match self.ws.read().expect("read a frame") {
                WsMessage::Binary(b) => {
                    assert!(!self.json, "binary frame on a JSON connection");
                    return ServerFrame::decode(b.as_ref()).unwrap().frame.unwrap();
                }
                WsMessage::Text(t) => {
                    assert!(self.json, "text frame on a protobuf connection");
                    return serde_json::from_str::<ServerFrame>(t.as_str()).unwrap().frame.unwrap();
                }
                WsMessage::Ping(_) | WsMessage::Pong(_) => continue,
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    /// The next binary frame's bytes as the server sent them (skipping pings).
    pub fn recv_bytes(&mut self) -> Vec<u8> {
        loop {
            match self.ws.read().expect("read a frame") {
                WsMessage::Binary(b) => return b.to_vec(),
                WsMessage::Ping(_) | WsMessage::Pong(_) => continue,
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    /// The next frame, which must be a welcome.
    pub fn welcome(&mut self) -> barrage::proto::Welcome {
        match self.recv() {
            server_frame::Frame::Welcome(w) => w,
            other => panic!("expected welcome, got {other:?}"),
        }
    }

    /// The next frame, which must be a block.
    pub fn block(&mut self) -> barrage::proto::Block {
        match self.recv() {
            server_frame::Frame::Block(b) => b,
            other => panic!("expected block, got {other:?}"),
        }
    }

    /// Reads until the server closes; returns the close code.
    pub fn close_code(&mut self) -> Option<u16> {
        loop {
            match self.ws.read() {
                Ok(WsMessage::Close(c)) => return c.map(|c| u16::from(c.code)),
                Ok(_) => continue,
                Err(tungstenite::Error::ConnectionClosed) | Err(tungstenite::Error::AlreadyClosed) => return None,
                Err(e) => panic!("read failed before close: {e}"),
            }
        }
    }
}

/// A raw TCP client for bytes no WebSocket library would send.
pub struct Raw {
    pub s: TcpStream,
}

impl Raw {
    pub fn connect(addr: SocketAddr) -> Raw {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        Raw { s }
    }

    /// Connects and completes a protobuf WebSocket handshake (the 101 head is consumed).
    pub fn upgraded(addr: SocketAddr, query: &str) -> Raw {
        let mut r = Raw::connect(addr);
        r.write(&upgrade_request(&format!("/ws{query}"), &[]));
        let head = r.read_head();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        r
    }

    /// The socket, for callers that read it their own way.
    pub fn into_stream(self) -> TcpStream {
        self.s
    }

    pub fn write(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }

    /// Reads an HTTP response head (through the blank line).
    pub fn read_head(&mut self) -> String {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match self.s.read(&mut byte) {
                Ok(1) => head.push(byte[0]),
                _ => break,
            }
        }
        String::from_utf8_lossy(&head).into_owned()
    }

    /// Reads everything until the server closes the connection (or the timeout).
    pub fn read_to_end(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = self.s.read_to_end(&mut out);
        out
    }

    /// Reads one unmasked server frame: (opcode, payload).
    pub fn read_frame(&mut self) -> (u8, Vec<u8>) {
        let (first, payload) = self.read_frame_whole();
        (first & 0x0F, payload)
    }

    /// Reads one unmasked server frame: (its first byte: FIN, RSV bits and opcode; payload).
    pub fn read_frame_whole(&mut self) -> (u8, Vec<u8>) {
        let mut h = [0u8; 2];
        self.s.read_exact(&mut h).unwrap();
        let mut len = u64::from(h[1] & 0x7F);
        if len == 126 {
            let mut b = [0u8; 2];
            self.s.read_exact(&mut b).unwrap();
            len = u64::from(u16::from_be_bytes(b));
        } else if len == 127 {
            let mut b = [0u8; 8];
            self.s.read_exact(&mut b).unwrap();
            len = u64::from_be_bytes(b);
        }
        let mut payload = vec![0u8; len as usize];
        self.s.read_exact(&mut payload).unwrap();
        (h[0], payload)
    }

    /// Reads frames until a Close; returns its code.
    pub fn close_code(&mut self) -> u16 {
        loop {
            let (op, payload) = self.read_frame();
            if op == 0x8 {
                return u16::from_be_bytes([payload[0], payload[1]]);
            }
        }
    }
}

/// A valid upgrade request head for `path` plus extra header lines.
pub fn upgrade_request(path: &str, extra: &[&str]) -> Vec<u8> {
    let mut s = format!(
        "GET {path} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    );
    for h in extra {
        s.push_str(h);
        s.push_str("\r\n");
    }
    s.push_str("\r\n");
    s.into_bytes()
}

/// A masked client frame (with a fixed mask).
pub fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    frame::masked_frame(fin, opcode, payload, [0x12, 0x34, 0x56, 0x78], &mut out);
    out
}

/// Polls `f` until it returns true or 10 s pass.
pub fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A private Redis server for one test: its own port below 32768 and its own directory, never
/// the machine's 6379. Installs Debian's `redis-server` when the machine has none.
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    dir: std::path::PathBuf,
}

impl Redis {
    pub fn start() -> Redis {
        ensure_redis_server();
        let n = unique();
        let dir = std::env::temp_dir().join(format!("barrage-redis-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A free port in 20000..32000 (never an ephemeral one), different for each server this
        // test binary starts (tests run in parallel threads).
        let seed = (std::process::id() as u64).wrapping_mul(7).wrapping_add(n * 1_009);
        let port = (0..200)
            .map(|i| 20_000 + ((seed + i * 53) % 12_000) as u16)
            .find(|&p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
            .expect("a free port for redis");
        let mut r = Redis { child: None, port, dir };
        r.restart();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts it (again) on the same port; no persistence: a restarted server is empty.
    pub fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        eventually("redis answers PING", || self.cli(&["PING"]).trim() == "+PONG");
    }

    /// SIGKILL: gone at once, as a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// One command over RESP; the raw reply.
    pub fn cli(&self, args: &[&str]) -> String {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else { return String::new() };
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        if s.write_all(req.as_bytes()).is_err() {
            return String::new();
        }
        let mut buf = vec![0u8; 1 << 16];
        let n = s.read(&mut buf).unwrap_or(0);
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn unique() -> u64 {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Installs `redis-server` from Debian if it is not on the machine (once per test binary).
fn ensure_redis_server() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let found = Command::new("redis-server").arg("--version").output().is_ok_and(|o| o.status.success());
        if found {
            return;
        }
        let apt = |args: &[&str]| {
            Command::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !apt(&["install", "-y", "-q", "redis-server"]) {
            assert!(apt(&["update", "-q"]), "apt-get update failed (installing redis-server)");
            assert!(apt(&["install", "-y", "-q", "redis-server"]), "apt-get install redis-server failed");
        }
    });
}

/// The `websockets` release the Python tests are written against.
const WEBSOCKETS: &str = "websockets==15.0.1";

/// A Python with `websockets`, in a virtualenv under target/ made (from PyPI) on first use.
pub fn venv_python() -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("py-venv");
    let python = dir.join("bin/python");
    let ready = dir.join(".websockets-ready");
    if !ready.exists() {
        let ok = Command::new("python3").args(["-m", "venv"]).arg(&dir).status().map(|s| s.success()).unwrap_or(false);
        assert!(ok, "python3 -m venv failed: install python3 and python3-venv (apt-get install python3-venv)");
        let ok = Command::new(&python)
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", WEBSOCKETS])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "pip install {WEBSOCKETS} failed");
        std::fs::write(&ready, WEBSOCKETS).unwrap();
    }
    python
}
