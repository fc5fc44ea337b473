//! Business hooks against real backends: a Python HTTP server (tests/python/hook_backend.py)
//! for the JSON hooks and a protobuf one in this file, over loopback, with the real binary.
mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};

use barrage::proto::{Ack, Block, HookRequest, HookResponse, Join, Send, SendVerdict, client_frame, server_frame};
use common::{Client, Gateway, Raw, eventually, http, token, upgrade_request};
use prost::Message as _;

/// The Python backend, killed on drop.
struct Backend {
    child: Child,
    port: u16,
}

impl Backend {
    fn start() -> Backend {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/hook_backend.py");
        let mut child = Command::new("python3").arg(script).stdout(Stdio::piped()).spawn().expect("python3");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let port = line.trim().strip_prefix("LISTENING ").and_then(|p| p.parse().ok()).expect("backend port");
        Backend { child, port }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn stats(&self) -> serde_json::Value {
        let (status, body) = http(format!("127.0.0.1:{}", self.port).parse().unwrap(), "GET", "/stats", None, &[]);
        assert_eq!(status, 200);
        serde_json::from_str(&body).unwrap()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn send(c: &mut Client, kind: &str, text: &str, id: &str) {
    c.send(client_frame::Frame::Send(Send { r#type: kind.into(), data: text.as_bytes().to_vec(), id: id.into() }));
}

/// Reads frames until an ack.
fn ack(c: &mut Client) -> Ack {
    loop {
        if let server_frame::Frame::Ack(a) = c.recv() {
            return a;
        }
    }
}

/// Reads frames until a block with new (not backfill) messages.
fn live_block(c: &mut Client) -> Block {
    loop {
        if let server_frame::Frame::Block(b) = c.recv()
            && !b.backfill
            && !b.messages.is_empty()
        {
            return b;
        }
    }
}

/// Reads frames until an error frame: (code, reason).
fn error(c: &mut Client) -> (u32, String) {
    loop {
        if let server_frame::Frame::Error(e) = c.recv() {
            return (e.code, e.reason);
        }
    }
}

/// The status line of a handshake to `query`.
fn handshake_status(g: &Gateway, query: &str) -> String {
    let mut raw = Raw::connect(g.ws);
    raw.write(&upgrade_request(&format!("/ws{query}"), &[]));
    raw.read_head().lines().next().unwrap_or_default().to_string()
}

#[test]
fn the_backend_signs_in_filters_charges_and_refuses() {
    let b = Backend::start();
    let g = Gateway::start(&[
        "--hook-connect-url",
        &b.url("/connect"),
        "--hook-join-url",
        &b.url("/join"),
        "--hook-send-url",
        &b.url("/send"),
    ]);
    // A level added at connect: the backend's own token, which the gateway cannot verify.
    let mut alice = Client::connect(&g.url("?room=r1&token=user:alice:12"), None);
    let w = alice.welcome();
    assert_eq!(w.user, "alice", "signed in by the connect hook");
    let mut viewer = Client::connect(&g.url("?room=r1"), None);
    viewer.welcome();
    g.wait_online("r1", 2);

    // A forbidden word filtered: the viewer sees the rewritten line, alice's ack has its seq.
    send(&mut alice, "chat", "hello badword", "a1");
    let a = ack(&mut alice);
    assert_eq!((a.id.as_str(), a.code, a.room.as_str()), ("a1", 0, "r1"), "{a:?}");
    let blk = live_block(&mut viewer);
    let m = &blk.messages[0];
    assert_eq!((m.data.as_slice(), m.sender.as_str(), m.weight), (&b"hello ***"[..], "alice", 12));
    assert_eq!(m.seq, a.seq, "the ack names the seq the viewer got");

    // A gift refused without coins (the `gift` grant came from the connect hook).
    send(&mut alice, "gift", "rocket", "a2");
    let a = ack(&mut alice);
    assert_eq!((a.id.as_str(), a.code, a.reason.as_str(), a.seq), ("a2", 402, "not enough coins", 0));
    // Without an id the refusal is an error frame.
    send(&mut alice, "gift", "rocket", "");
    assert_eq!(error(&mut alice), (402, "not enough coins".into()));
    // ... and one with coins goes through.
    let mut rich = Client::connect(&g.url("?room=r1&token=user:rich:1"), None);
    rich.welcome();
    send(&mut rich, "gift", "rocket", "g1");
    assert_eq!(ack(&mut rich).code, 0);

    // A room refused at join; the connection stays where it was and can still send there.
    alice.send(client_frame::Frame::Join(Join { room: "vip-lounge".into(), after_seq: 0 }));
    assert_eq!(error(&mut alice), (403, "vip room".into()));
    send(&mut alice, "chat", "still here", "a3");
    let a = ack(&mut alice);
    assert_eq!((a.code, a.room.as_str()), (0, "r1"));
    // A handshake refused by the backend, with its code.
    assert!(handshake_status(&g, "?token=deny").starts_with("HTTP/1.1 403"));
    // The URL's room asks the join hook before the 101: a welcome naming a room means joined.
    assert!(handshake_status(&g, "?room=vip-2&token=user:bob:1").starts_with("HTTP/1.1 403"));

    // A JWT the gateway verifies goes on with its own identity (the backend adds nothing).
    let mut carol = Client::connect(&g.url(&format!("?room=r1&token={}", token("carol"))), None);
    assert_eq!(carol.welcome().user, "carol");

    let s = b.stats();
    assert!(s["requests"]["connect"].as_u64().unwrap() >= 5, "{s}");
    assert_eq!(g.metric("barrage_hook_calls_total{hook=\"send\",outcome=\"rewritten\"}"), 1);
    assert_eq!(g.metric("barrage_hook_calls_total{hook=\"send\",outcome=\"refused\"}"), 2);
    // Shard counters are published at the end of a loop turn.
    eventually("shard counters", || {
        g.metric("barrage_client_sends_refused_total{reason=\"hook\"}") == 2
            && g.metric("barrage_joins_refused_total{reason=\"hook\"}") == 1
            && g.metric("barrage_handshakes_total{result=\"hook\"}") == 2
    });
    assert!(g.metric("barrage_hook_request_seconds_count{hook=\"send\"}") >= 4);
}

#[test]
fn events_and_sends_are_batched() {
    let b = Backend::start();
    let g = Gateway::start(&[
        "--hook-events-url",
        &b.url("/events"),
        "--hook-events-batch-ms",
        "300",
        "--hook-send-url",
        &b.url("/send"),
        "--hook-send-batch-ms",
        "200",
        "--hook-send-in-flight-max",
        "1",
    ]);
    let mut clients: Vec<Client> = (0..10)
        .map(|i| {
            let mut c = Client::connect(&g.url(&format!("?room=e1&token={}", token(&format!("u{i}")))), None);
            c.welcome();
            c
        })
        .collect();
    g.wait_online("e1", 10);
    for (i, c) in clients.iter_mut().enumerate() {
        send(c, "chat", &format!("line {i}"), &format!("s{i}"));
    }
    for c in clients.iter_mut() {
        assert_eq!(ack(c).code, 0);
    }
    drop(clients);
    eventually("20 events at the backend", || b.stats()["events"].as_array().unwrap().len() >= 20);
    let s = b.stats();
    let events = s["events"].as_array().unwrap();
    let leaves = events.iter().filter(|e| e["kind"] == "LEAVE" && e["room"] == "e1").count();
    let disconnects = events.iter().filter(|e| e["kind"].is_null() || e["kind"] == "DISCONNECT").count();
    assert_eq!((leaves, disconnects), (10, 10), "{s}");
    assert!(events.iter().all(|e| e["user"].as_str().is_some_and(|u| u.starts_with('u'))), "{s}");
    // Ten sends and twenty events, in fewer requests than calls.
    let (send_requests, event_requests) =
        (s["requests"]["send"].as_u64().unwrap(), s["requests"]["events"].as_u64().unwrap());
    assert_eq!(s["calls"]["send"], 10);
    assert!(send_requests < 10, "sends batched: {send_requests} requests for 10");
    assert!(event_requests < 20, "events batched: {event_requests} requests for 20");
    assert_eq!(g.metric("barrage_hook_batched_calls_total{hook=\"send\"}"), 10);
}

#[test]
fn a_slow_or_down_backend_fails_open_or_closed() {
    let b = Backend::start();
    // Slow (2 s) against a 300 ms timeout: fail closed refuses with 503.
    let g = Gateway::start(&["--hook-send-url", &b.url("/slow/send"), "--hook-send-timeout-ms", "300"]);
    let mut c = Client::connect(&g.url(&format!("?room=s1&token={}", token("u1"))), None);
    c.welcome();
    send(&mut c, "chat", "hi", "x1");
    let a = ack(&mut c);
    assert_eq!((a.code, a.seq), (503, 0), "{a:?}");
    assert_eq!(g.metric("barrage_hook_requests_total{hook=\"send\",result=\"timeout\"}"), 1);
    assert_eq!(g.metric("barrage_hook_calls_total{hook=\"send\",outcome=\"failed_closed\"}"), 1);
    drop(g);

    // Slow, failing open: the line goes through unfiltered, after the timeout.
    let g = Gateway::start(&[
        "--hook-send-url",
        &b.url("/slow/send"),
        "--hook-send-timeout-ms",
        "300",
        "--hook-send-fail-open",
        "true",
    ]);
    let mut c = Client::connect(&g.url(&format!("?room=s2&token={}", token("u1"))), None);
    c.welcome();
    send(&mut c, "chat", "hi badword", "x2");
    let a = ack(&mut c);
    assert!(a.code == 0 && a.seq > 0, "{a:?}");
    assert_eq!(g.metric("barrage_hook_calls_total{hook=\"send\",outcome=\"failed_open\"}"), 1);
    drop(g);

    // Down (nothing listens; a 500 for join): connect fails open by default (the JWT decides),
    // join fails closed, and after three failures the breakers open.
    let dead = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let g = Gateway::start(&[
        "--hook-connect-url",
        &format!("http://{dead}/connect"),
        "--hook-connect-breaker-failures",
        "3",
        "--hook-join-url",
        &b.url("/fail/join"),
        "--hook-join-breaker-failures",
        "3",
    ]);
    for i in 0..3 {
        let mut c = Client::connect(&g.url(&format!("?token={}", token(&format!("d{i}")))), None);
        assert_eq!(c.welcome().user, format!("d{i}"), "connect failed open: the token decides");
        c.send(client_frame::Frame::Join(Join { room: "d1".into(), after_seq: 0 }));
        assert_eq!(error(&mut c).0, 503, "join failed closed");
    }
    // The URL's room asks the join hook before the 101: a failed closed join refuses it.
    for i in 3..5 {
        let status = handshake_status(&g, &format!("?room=d1&token={}", token(&format!("d{i}"))));
        assert!(status.starts_with("HTTP/1.1 503"), "{status}");
    }
    // Each connect and join failed, retried once (a 500, a refused connection); the breakers
    // opened after three.
    assert_eq!(g.metric("barrage_hook_breaker_open{hook=\"connect\"}"), 1);
    assert_eq!(g.metric("barrage_hook_breaker_open{hook=\"join\"}"), 1);
    assert!(g.metric("barrage_hook_requests_total{hook=\"join\",result=\"breaker\"}") >= 1);
    assert!(g.metric("barrage_hook_retries_total{hook=\"join\"}") >= 3, "a 500 is retried for joins");
    assert_eq!(g.metric("barrage_hook_calls_total{hook=\"connect\",outcome=\"failed_open\"}"), 5);
    assert!(b.stats()["requests"]["join"].is_null(), "/fail/ answers before counting");
}

/// A protobuf backend in this process: each send's text upper-cased, at high priority.
fn protobuf_backend() -> (String, std::thread::JoinHandle<usize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/send", listener.local_addr().unwrap());
    let handle = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut served = 0;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        // Keep-alive: one connection carries every request.
        while let Ok(n) = s.read(&mut chunk) {
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
            let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
            assert!(head.contains("content-type: application/x-protobuf"), "{head}");
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .unwrap();
            if buf.len() < end + 4 + len {
                continue;
            }
            let req = HookRequest::decode(&buf[end + 4..end + 4 + len]).unwrap();
            buf.drain(..end + 4 + len);
            let send = req
                .send
                .iter()
                .map(|c| SendVerdict { text: Some(c.text.to_uppercase()), priority: Some(1), ..SendVerdict::default() })
                .collect();
            let body = HookResponse { send, ..HookResponse::default() }.encode_to_vec();
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            s.write_all(head.as_bytes()).unwrap();
            s.write_all(&body).unwrap();
            served += 1;
        }
        served
    });
    (url, handle)
}

#[test]
fn a_protobuf_backend_rewrites_on_one_keep_alive_connection() {
    let (url, backend) = protobuf_backend();
    let mut g =
        Gateway::start(&["--hook-send-url", &url, "--hook-send-format", "protobuf", "--hook-send-in-flight-max", "1"]);
    let mut c = Client::connect(&g.url(&format!("?room=p1&token={}", token("u1"))), None);
    c.welcome();
    let mut viewer = Client::connect(&g.url("?room=p1"), None);
    viewer.welcome();
    g.wait_online("p1", 2);
    for i in 0..3 {
        send(&mut c, "chat", &format!("line {i}"), &format!("p{i}"));
        assert_eq!(ack(&mut c).code, 0);
    }
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let blk = live_block(&mut viewer);
        seen.extend(blk.messages.iter().map(|m| (String::from_utf8(m.data.clone()).unwrap(), m.priority)));
    }
    assert_eq!(
        seen,
        [("LINE 0".to_string(), 1), ("LINE 1".into(), 1), ("LINE 2".into(), 1)],
        "rewritten, high priority"
    );
    assert!(g.terminate());
    assert_eq!(backend.join().unwrap(), 3, "three requests on the one connection");
}

/// Bytes a client pipelines right behind its handshake wait for the connect hook's verdict and
/// are read after the 101.
#[test]
fn frames_sent_before_the_verdict_are_read_after_it() {
    let b = Backend::start();
    let g = Gateway::start(&["--hook-connect-url", &b.url("/connect")]);
    let mut raw = Raw::connect(g.ws);
    let mut bytes = upgrade_request("/ws?token=user:pat:3", &[]);
    let ping = barrage::proto::ClientFrame { frame: Some(client_frame::Frame::Ping(barrage::proto::Ping {})) };
    bytes.extend_from_slice(&common::client_frame(true, 0x2, &ping.encode_to_vec()));
    raw.write(&bytes);
    assert!(raw.read_head().starts_with("HTTP/1.1 101"));
    let (_, welcome) = raw.read_frame();
    let welcome = barrage::proto::ServerFrame::decode(welcome.as_slice()).unwrap();
    assert!(matches!(welcome.frame, Some(server_frame::Frame::Welcome(w)) if w.user == "pat"));
    let (_, pong) = raw.read_frame();
    let pong = barrage::proto::ServerFrame::decode(pong.as_slice()).unwrap();
    assert!(matches!(pong.frame, Some(server_frame::Frame::Pong(_))), "{pong:?}");
}
