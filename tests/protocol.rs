//! RFC 6455 and the gateway's limits over loopback through the real binary: handshake
//! refusals with the right status, close codes for bad frames, the close handshake, timeouts,
//! slow consumers, capacity limits and a clean SIGTERM.
mod common;

use std::time::{Duration, Instant};

use barrage::proto::{ClientFrame, Join, client_frame};
use common::{Client, Gateway, Raw, client_frame as frame, eventually, http, token, upgrade_request};
use prost::Message as _;
use serde_json::json;

fn status_of(gw: &Gateway, request: &[u8]) -> String {
    let mut r = Raw::connect(gw.ws);
    r.write(request);
    r.read_head()
}

#[test]
fn handshake_refusals_carry_the_right_status() {
    let gw = Gateway::start(&[]);
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (upgrade_request("/ws?token=nope", &[]), "401"),
        (upgrade_request("/elsewhere", &[]), "404"),
        (upgrade_request("/ws?room=bad%20name", &[]), "400"),
        (upgrade_request("/ws", &["Sec-WebSocket-Protocol: mqtt"]), "400"),
        (b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n".to_vec(), "400"),
        (b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n".to_vec(), "426"),
        (b"POST /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".to_vec(), "405"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), "404"),
        (b"\x16\x03\x01 not http at all\r\n\r\n".to_vec(), "400"),
    ];
    for (request, status) in cases {
        let head = status_of(&gw, &request);
        assert!(head.starts_with(&format!("HTTP/1.1 {status}")), "{:?} -> {head}", String::from_utf8_lossy(&request));
    }
    let head = status_of(&gw, &upgrade_request("/ws", &["Sec-WebSocket-Version: 8"]));
    assert!(head.starts_with("HTTP/1.1 4"), "{head}");
    eventually("refusals counted", || {
        gw.metric("barrage_handshakes_total{result=\"token\"}") == 1
            && gw.metric("barrage_handshakes_total{result=\"path\"}") == 1
            && gw.metric("barrage_handshakes_total{result=\"version\"}") >= 1
    });
}

#[test]
fn bad_and_expired_tokens_are_refused_with_401() {
    let gw = Gateway::start(&[]);
    let expired = barrage::auth::sign_hs256(common::SECRET.as_bytes(), &json!({"sub": "u", "exp": 1000}));
    let forged = barrage::auth::sign_hs256(b"another secret", &json!({"sub": "u", "exp": 4_000_000_000u64}));
    for t in [expired, forged] {
        let head = status_of(&gw, &upgrade_request(&format!("/ws?token={t}"), &[]));
        assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    }
    // The same token in an Authorization header works.
    let head = status_of(&gw, &upgrade_request("/ws", &[&format!("Authorization: Bearer {}", token("u"))]));
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
}

#[test]
fn anonymous_viewers_can_be_disallowed() {
    let gw = Gateway::start(&["--allow-anonymous", "false"]);
    let head = status_of(&gw, &upgrade_request("/ws", &[]));
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    let head = status_of(&gw, &upgrade_request(&format!("/ws?token={}", token("u")), &[]));
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
}

#[test]
fn header_names_and_upgrade_tokens_in_any_case() {
    let gw = Gateway::start(&[]);
    let req = b"GET /ws HTTP/1.1\r\nhost: x\r\nUPGRADE: WebSocket\r\nconnection: keep-alive, Upgrade\r\n\
sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nSEC-WEBSOCKET-VERSION: 13\r\n\r\n";
    let head = status_of(&gw, req);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{head}");
}

#[test]
fn oversized_handshake_gets_431() {
    let gw = Gateway::start(&["--handshake-bytes-max", "512"]);
    let big = format!("X-Filler: {}", "a".repeat(600));
    let head = status_of(&gw, &upgrade_request("/ws", &[&big]));
    assert!(head.starts_with("HTTP/1.1 431"), "{head}");
    eventually("counted", || gw.metric("barrage_handshakes_total{result=\"too_large\"}") == 1);
}

#[test]
fn close_handshake_is_answered_and_tcp_closed() {
    let gw = Gateway::start(&[]);
    let mut r = Raw::upgraded(gw.ws, "");
    let (op, _welcome) = r.read_frame();
    assert_eq!(op, 0x2);
    r.write(&frame(true, 0x8, &[0x03, 0xE8, b'b', b'y', b'e']));
    assert_eq!(r.close_code(), 1000);
    assert!(r.read_to_end().is_empty(), "server closes TCP after the close handshake");
}

#[test]
fn protocol_violations_close_with_the_right_code() {
    let gw = Gateway::start(&["--frame-bytes-max", "1024", "--message-bytes-max", "2048"]);
    // (bytes to send after the handshake, expected close code)
    let mut unmasked = frame(true, 0x2, b"abc");
    unmasked[1] &= 0x7F;
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (unmasked, 1002, "unmasked"),
        (frame(true, 0x2, &vec![0; 2000]), 1009, "frame over frame_bytes_max"),
        (
            [frame(false, 0x2, &[0; 1000]), frame(false, 0x0, &[0; 1000]), frame(true, 0x0, &[0; 1000])].concat(),
            1009,
            "message over message_bytes_max",
        ),
        (frame(true, 0x3, b""), 1002, "reserved opcode"),
        (frame(true, 0x0, b"x"), 1002, "continuation without a start"),
        (frame(true, 0x1, b"{}"), 1003, "text on a protobuf connection"),
        (frame(true, 0x2, &[0xFF, 0xFF, 0xFF]), 1007, "not a ClientFrame"),
    ];
    for (bytes, code, what) in cases {
        let mut r = Raw::upgraded(gw.ws, "");
        r.read_frame(); // welcome
        r.write(&bytes);
        assert_eq!(r.close_code(), code, "{what}");
    }
    // Invalid UTF-8 in a text frame on a JSON connection.
    let mut r = Raw::connect(gw.ws);
    r.write(&upgrade_request("/ws", &["Sec-WebSocket-Protocol: barrage.v1.json"]));
    assert!(r.read_head().contains("Sec-WebSocket-Protocol: barrage.v1.json"));
    r.read_frame();
    r.write(&frame(true, 0x1, &[b'{', 0xC3, 0x28, b'}']));
    assert_eq!(r.close_code(), 1007);
    eventually("closes counted", || {
        gw.metric("barrage_closed_total{reason=\"too_big\"}") == 2
            && gw.metric("barrage_closed_total{reason=\"utf8\"}") == 1
    });
}

#[test]
fn fragments_and_interleaved_ping_are_reassembled() {
    let gw = Gateway::start(&[]);
    let mut r = Raw::upgraded(gw.ws, "");
    r.read_frame();
    let join = ClientFrame { frame: Some(client_frame::Frame::Join(Join { room: "frag".into(), ..Join::default() })) }
        .encode_to_vec();
    let (a, b) = join.split_at(3);
    let bytes = [frame(false, 0x2, a), frame(true, 0x9, b"are you there"), frame(true, 0x0, b)].concat();
    // Deliver it a few bytes at a time.
    for chunk in bytes.chunks(5) {
        r.write(chunk);
        std::thread::sleep(Duration::from_millis(2));
    }
    let (op, payload) = r.read_frame();
    assert_eq!((op, payload.as_slice()), (0xA, &b"are you there"[..]), "pong echoes the ping payload");
    gw.wait_online("frag", 1);
}

#[test]
fn silent_connections_time_out() {
    let gw = Gateway::start(&["--handshake-timeout-ms", "300", "--heartbeat-ms", "100", "--idle-timeout-ms", "600"]);
    let mut quiet = Raw::connect(gw.ws);
    let t = Instant::now();
    assert!(quiet.read_to_end().is_empty());
    assert!(t.elapsed() < Duration::from_secs(3), "handshake timeout closes the socket");
    let mut idle = Raw::upgraded(gw.ws, "");
    idle.read_frame();
    assert_eq!(idle.close_code(), 1001, "idle timeout closes with 1001");
    eventually("timeouts counted", || {
        gw.metric("barrage_handshakes_total{result=\"timeout\"}") == 1
            && gw.metric("barrage_closed_total{reason=\"idle\"}") == 1
    });
}

#[test]
fn traffic_keeps_a_connection_alive() {
    let gw = Gateway::start(&["--heartbeat-ms", "100", "--idle-timeout-ms", "500"]);
    let mut r = Raw::upgraded(gw.ws, "");
    r.read_frame();
    for _ in 0..10 {
        r.write(&frame(true, 0x9, b"hb"));
        assert_eq!(r.read_frame().0, 0xA);
        std::thread::sleep(Duration::from_millis(150));
    }
}

#[test]
fn connections_over_the_cap_are_closed_and_counted() {
    let gw = Gateway::start(&["--shards", "1", "--connections-max", "2"]);
    let _a = Client::connect(&gw.url(""), None);
    let _b = Client::connect(&gw.url(""), None);
    let mut c = Raw::connect(gw.ws);
    c.write(&upgrade_request("/ws", &[]));
    assert!(c.read_to_end().is_empty(), "the third connection is closed at once");
    eventually("counted", || gw.metric("barrage_refused_total{reason=\"connections_max\"}") == 1);
}

#[test]
fn a_reader_that_never_reads_is_dropped_and_closed() {
    let gw = Gateway::start(&["--send-queue-frames-max", "4", "--data-bytes-max", "65536"]);
    let t = token("slow");
    let mut slow = Raw::connect(gw.ws);
    slow.write(&upgrade_request(&format!("/ws?token={t}"), &[]));
    // Upgraded before the first publish (else "no connections" would be the handshake not
    // done yet, not the reader closed); from here on it never reads.
    assert!(slow.read_head().starts_with("HTTP/1.1 101"));
    let body = json!({"priority": "whitelist", "data_b64": base64_zeros(60_000)}).to_string();
    let mut closed = false;
    for _ in 0..2000 {
        let (status, resp) = http(gw.api, "POST", "/v1/users/slow/messages", Some(&body), &[]);
        assert_eq!(status, 202, "{resp}");
        if resp.contains("\"connections\":0") {
            closed = true;
            break;
        }
    }
    assert!(closed, "the stalled reader was closed");
    let slow = || gw.metric("barrage_closed_total{reason=\"slow_consumer\"}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while slow() != 1 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let (_, text) = http(gw.api, "GET", "/metrics", None, &[]);
    let closed: Vec<&str> =
        text.lines().filter(|l| l.starts_with("barrage_closed_total") && !l.ends_with(" 0")).collect();
    assert_eq!(slow(), 1, "{closed:?}");
}

#[test]
fn room_backlog_and_room_count_are_bounded() {
    let gw = Gateway::start(&[
        "--block-interval-ms",
        "60000",
        "--pending-messages-max",
        "20",
        "--rooms-max",
        "1",
        "--shards",
        "1",
    ]);
    for _ in 0..20 {
        assert_eq!(gw.publish("only", json!({"text": "x"})).0, 202);
    }
    let (status, body) = gw.publish("only", json!({"text": "x"}));
    assert_eq!(status, 429, "{body}");
    let (status, body) = gw.publish("second", json!({"text": "x"}));
    assert_eq!(status, 503, "{body}");
    eventually("counted", || gw.metric("barrage_messages_dropped_total{reason=\"backlog\"}") == 1);
}

#[test]
fn sigterm_closes_clients_with_1001_and_exits_cleanly() {
    let mut gw = Gateway::start(&[]);
    let mut a = Client::connect(&gw.url("?room=z"), Some("barrage.v1.json"));
    a.welcome();
    let mut b = Raw::upgraded(gw.ws, "");
    b.read_frame();
    let handle = std::thread::spawn(move || {
        let code = b.close_code();
        // Answer the close like a well-behaved client.
        b.write(&frame(true, 0x8, &code.to_be_bytes()));
        code
    });
    assert!(gw.terminate(), "clean exit");
    assert_eq!(a.close_code(), Some(1001));
    assert_eq!(handle.join().unwrap(), 1001);
}

fn base64_zeros(n: usize) -> String {
    "A".repeat(n.div_ceil(3) * 4)
}

#[test]
fn too_many_headers_get_431() {
    let gw = Gateway::start(&["--handshake-headers-max", "10"]);
    let extra: Vec<String> = (0..10).map(|i| format!("X-H{i}: v")).collect();
    let refs: Vec<&str> = extra.iter().map(String::as_str).collect();
    let head = status_of(&gw, &upgrade_request("/ws", &refs));
    assert!(head.starts_with("HTTP/1.1 431"), "{head}");
}

#[test]
fn a_client_that_never_answers_close_is_dropped_after_close_timeout() {
    let gw = Gateway::start(&["--heartbeat-ms", "100", "--idle-timeout-ms", "300", "--close-timeout-ms", "300"]);
    let mut r = Raw::upgraded(gw.ws, "");
    r.read_frame();
    assert_eq!(r.close_code(), 1001);
    // We do not answer: the server drops the TCP connection on its own.
    let t = Instant::now();
    assert!(r.read_to_end().is_empty());
    assert!(t.elapsed() < Duration::from_secs(3));
    eventually("counted", || gw.metric("barrage_closed_total{reason=\"close_timeout\"}") == 1);
}

#[test]
fn long_room_names_and_big_client_messages_are_refused() {
    let gw = Gateway::start(&["--name-bytes-max", "8", "--data-bytes-max", "10"]);
    let head = status_of(&gw, &upgrade_request("/ws?room=123456789", &[]));
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    let mut c = Client::connect(&gw.url(&format!("?room=12345678&token={}", token("big"))), None);
    c.welcome();
    c.send(client_frame::Frame::Join(Join { room: "123456789".into(), ..Join::default() }));
    match c.recv() {
        barrage::proto::server_frame::Frame::Error(e) => assert_eq!(e.code, 400),
        other => panic!("expected error, got {other:?}"),
    }
    c.send(client_frame::Frame::Send(barrage::proto::Send {
        r#type: "chat".into(),
        data: vec![b'x'; 11],
        ..Default::default()
    }));
    match c.recv() {
        barrage::proto::server_frame::Frame::Error(e) => assert_eq!(e.code, 413),
        other => panic!("expected error, got {other:?}"),
    }
    eventually("counted", || gw.metric("barrage_client_sends_refused_total{reason=\"rules\"}") == 1);
}

#[test]
fn partial_input_is_bounded_per_shard_and_the_largest_holder_goes() {
    // Attack 5: connections holding unfinished frames used to lock every newcomer out (1013).
    // Now the connection holding the most goes, and the newcomer carries on. Budget 110,000 B
    // on one shard, counted as allocated capacity (a message buffer doubles as it grows): the
    // first client parks 20,000 B of a 60,000 B frame (32 KiB reserved), the second 40,000 B
    // (64 KiB), then a newcomer sends 30,000 B.
    let gw = Gateway::start(&["--shards", "1", "--partial-bytes-max", "110000"]);
    let whole = frame(true, 0x2, &vec![0u8; 60_000]);
    let head = whole.len() - 60_000;
    let mut clients: Vec<Raw> = (0..3).map(|_| Raw::upgraded(gw.ws, "")).collect();
    for c in &mut clients {
        c.read_frame(); // welcome
    }
    clients[0].write(&whole[..head + 20_000]);
    eventually("one partial frame held", || gw.metric("barrage_partial_bytes") > 32_000);
    clients[1].write(&whole[..head + 40_000]);
    eventually("two partial frames held", || gw.metric("barrage_partial_bytes") > 97_000);
    clients[2].write(&whole[..head + 30_000]);
    assert_eq!(clients[1].close_code(), 1013, "the largest holder is closed: try again later");
    eventually("counted", || gw.metric("barrage_closed_total{reason=\"partial_budget\"}") == 1);
    // The newcomer and the first client finish their messages (bad ClientFrames, so closed with
    // 1007 — read whole, not refused with 1013).
    clients[2].write(&whole[head + 30_000..]);
    assert_eq!(clients[2].close_code(), 1007);
    clients[0].write(&whole[head + 20_000..]);
    assert_eq!(clients[0].close_code(), 1007);
}
