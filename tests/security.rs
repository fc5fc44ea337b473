//! The abuse paths of issue 10, each tried as an attacker would, against the real binary over
//! loopback: every test here failed on the gateway before the fix it names.

mod common;

use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use barrage::proto::{Priority, Refresh, Send, client_frame, server_frame};
use common::{Client, Gateway, SECRET, token};
use serde_json::{Value, json};

const PROTO: Option<&str> = Some("barrage.v1.proto");

fn unix_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn signed(claims: Value) -> String {
    barrage::auth::sign_hs256(SECRET.as_bytes(), &claims)
}

fn send(c: &mut Client, kind: &str, text: &str) {
    c.send(client_frame::Frame::Send(Send {
        r#type: kind.into(),
        data: text.as_bytes().to_vec(),
        ..Default::default()
    }));
}

fn error_code(c: &mut Client) -> u32 {
    match c.recv() {
        server_frame::Frame::Error(e) => e.code,
        other => panic!("expected an error frame, got {other:?}"),
    }
}

/// Attack 1: a signed-in user forges system and business types (a `notice` rode WHITELIST:
/// no rate limit, never expired, never shed). Now only the client types and the token's grants
/// may be sent, system types never.
#[test]
fn clients_cannot_forge_system_or_business_types() {
    let gw = Gateway::start(&["--block-interval-ms", "50", "--send-rate-burst", "20"]);
    let mut viewer = Client::connect(&gw.url("?room=r"), PROTO);
    viewer.welcome();
    let mut user = Client::connect(&gw.url(&format!("?room=r&token={}", token("mallory"))), PROTO);
    user.welcome();
    for forged in ["notice", "gift", "pk", "enter", "leave", "custom"] {
        send(&mut user, forged, "forged");
        assert_eq!(error_code(&mut user), 403, "{forged} is refused");
    }
    // A grant lets the business allow gifts (at their default, high), never notices.
    let exp = unix_s() + 600;
    let granted = signed(json!({"sub": "vip", "exp": exp, "types": ["gift", "notice"]}));
    let mut vip = Client::connect(&gw.url(&format!("?room=r&token={granted}")), PROTO);
    vip.welcome();
    send(&mut vip, "notice", "still forged");
    assert_eq!(error_code(&mut vip), 403);
    send(&mut vip, "gift", "rocket");
    send(&mut user, "chat", "hello");
    let mut seen = Vec::new();
    while seen.len() < 2 {
        seen.extend(viewer.block().messages.into_iter().map(|m| (m.r#type, m.priority)));
    }
    seen.sort();
    assert_eq!(seen, [("chat".into(), Priority::Low as i32), ("gift".into(), Priority::High as i32)]);
}

/// Attack 4: a token without `exp` never expired, a one-byte secret started the gateway, and an
/// admin token moderated every room (tests/live.rs covers the room scope).
#[test]
fn tokens_must_expire_and_secrets_must_be_long() {
    let gw = Gateway::start(&[]);
    let forever = signed(json!({"sub": "alice"}));
    let req =
        tungstenite::client::IntoClientRequest::into_client_request(gw.url(&format!("?token={forever}"))).unwrap();
    match tungstenite::connect(req) {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 401),
        other => panic!("a token without exp was not refused: {:?}", other.map(|_| ())),
    }
    let out =
        Command::new(env!("CARGO_BIN_EXE_barrage")).args(["--jwt-secret", "a", "--print-config"]).output().unwrap();
    assert!(!out.status.success(), "a one-byte secret must not start");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("at least 32"), "the refusal says why: {stderr}");
}

/// A token that expires on an open connection ends it after the grace period, unless the
/// client refreshes it with a new token for the same user.
#[test]
fn an_expired_token_ends_the_connection_unless_refreshed() {
    let gw = Gateway::start(&["--refresh-grace-ms", "1000", "--jwt-leeway-s", "0"]);
    let soon = |user: &str| signed(json!({"sub": user, "exp": unix_s() + 2}));
    let mut lapsing = Client::connect(&gw.url(&format!("?token={}", soon("ann"))), PROTO);
    let w = lapsing.welcome();
    assert!(w.expires_ms > 0, "the welcome says when the token expires");
    let mut refreshing = Client::connect(&gw.url(&format!("?token={}", soon("bob"))), PROTO);
    refreshing.welcome();
    for c in [&mut lapsing, &mut refreshing] {
        if let common::MaybeTlsStream::Plain(s) = c.ws.get_ref() {
            s.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
        }
    }
    let started = Instant::now();
    assert_eq!(error_code(&mut lapsing), 401, "told the token expired");
    assert_eq!(error_code(&mut refreshing), 401);
    // Another user's token does not refresh bob; his own new one does.
    let other = signed(json!({"sub": "eve", "exp": unix_s() + 600}));
    refreshing.send(client_frame::Frame::Refresh(Refresh { token: other }));
    assert_eq!(error_code(&mut refreshing), 403);
    let fresh = signed(json!({"sub": "bob", "exp": unix_s() + 600}));
    refreshing.send(client_frame::Frame::Refresh(Refresh { token: fresh }));
    match refreshing.recv() {
        server_frame::Frame::Refreshed(r) => assert!(r.expires_ms > w.expires_ms),
        other => panic!("expected refreshed, got {other:?}"),
    }
    assert_eq!(lapsing.close_code(), Some(1008), "closed after the grace");
    assert!(started.elapsed() >= Duration::from_millis(900), "not before the grace");
    // Bob goes on: a ping is still answered after ann's close.
    refreshing.send(client_frame::Frame::Ping(barrage::proto::Ping {}));
    assert!(matches!(refreshing.recv(), server_frame::Frame::Pong(_)));
}

/// Attack 2: one anonymous connection sent 5,000 `join` frames (no error frames) and every API
/// publish to a new room got 503 for a minute. Now join frames are rate limited per connection,
/// and rooms that only have members do not count against `rooms_max`.
#[test]
fn join_churn_cannot_exhaust_the_room_table() {
    let gw = Gateway::start(&["--rooms-max", "20", "--join-rate-per-s", "5", "--join-rate-burst", "10"]);
    let mut churner = Client::connect(&gw.url(""), PROTO);
    churner.welcome();
    for i in 0..500 {
        churner.send(client_frame::Frame::Join(barrage::proto::Join { room: format!("churn{i}"), after_seq: 0 }));
    }
    let mut refused = 0;
    while refused < 490 {
        match churner.recv() {
            server_frame::Frame::Error(e) => {
                assert_eq!(e.code, 429);
                refused += 1;
            }
            server_frame::Frame::Block(_) | server_frame::Frame::Attrs(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    // Many viewers, each in a room of its own: rooms with members only.
    let viewers: Vec<Client> = (0..60)
        .map(|i| {
            let mut c = Client::connect(&gw.url(&format!("?room=solo{i}")), PROTO);
            c.welcome();
            c
        })
        .collect();
    gw.wait_online("solo59", 1);
    let (status, body) = gw.publish("fresh", json!({"text": "still open"}));
    assert_eq!(status, 202, "a publish to a fresh room is taken: {body}");
    common::eventually("counted", || gw.metric("barrage_joins_refused_total{reason=\"rate\"}") >= 490);
    drop(viewers);
}

/// Attack 6: after a room was idle its mutes were forgotten (a muted user's chat was delivered
/// again), and a poll cursor from before said nothing was missed. Now moderation outlives
/// idleness, and `truncated` is right across a forgotten room.
#[test]
fn moderation_outlives_idleness_and_truncated_survives_forgetting() {
    let gw = Gateway::start(&["--room-idle-ms", "1000", "--block-interval-ms", "20"]);
    let (status, _) = common::http(gw.api, "POST", "/v1/rooms/quiet/mutes", Some(r#"{"user":"troll"}"#), &[]);
    assert_eq!(status, 200);
    gw.publish("gone", json!({"text": "before"}));
    std::thread::sleep(Duration::from_millis(150));
    let poll = |after: u64| {
        let (_, body) = common::http(gw.ws, "GET", &format!("/v1/rooms/gone/messages?after={after}"), None, &[]);
        serde_json::from_str::<Value>(&body).unwrap()
    };
    let cursor = poll(0)["next"].as_u64().unwrap();
    assert!(cursor > 0);
    std::thread::sleep(Duration::from_millis(2_500)); // both rooms idle well past room_idle_ms
    gw.publish("gone", json!({"text": "after"}));
    std::thread::sleep(Duration::from_millis(200));
    let page = poll(cursor);
    assert_eq!(page["truncated"], true, "the room was forgotten in between: {page}");
    let mut troll = Client::connect(&gw.url(&format!("?room=quiet&token={}", token("troll"))), PROTO);
    troll.welcome();
    send(&mut troll, "chat", "I'm back");
    assert_eq!(error_code(&mut troll), 403, "still muted");
    let (_, lists) = common::http(gw.api, "GET", "/v1/rooms/quiet/moderation", None, &[]);
    assert!(lists.contains("troll"), "{lists}");
}

/// A plain HTTP exchange on one raw connection: sends `request`, reads one answer (head and
/// Content-Length body); returns (status, head, body).
fn exchange(s: &mut std::net::TcpStream, request: &str) -> (u16, String, String) {
    use std::io::{Read, Write};
    s.write_all(request.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).unwrap(), 1, "an answer: {}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let len: usize =
        head.lines().find_map(|l| l.strip_prefix("Content-Length: ")).map_or(0, |v| v.trim().parse().unwrap());
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head, String::from_utf8(body).unwrap())
}

/// Attack 3: with `allow_anonymous = false` the WebSocket refused a token-less client while the
/// short poll served the room's history to anyone. Now a poll follows the WebSocket's rules
/// (token, anonymous, bans, origins), answers the CORS preflight and keeps the connection alive.
#[test]
fn short_polls_follow_the_websocket_rules() {
    let gw = Gateway::start(&["--allow-anonymous", "false", "--origins", "https://live.example"]);
    gw.publish("secret", json!({"text": "members only"}));
    let (status, _) = common::http(gw.ws, "GET", "/v1/rooms/secret/messages?after=0", None, &[]);
    assert_eq!(status, 401, "no token, no anonymous viewers");
    let banned = signed(json!({"sub": "troll", "exp": unix_s() + 600}));
    let (status, _) = common::http(gw.api, "POST", "/v1/rooms/secret/bans", Some(r#"{"user":"troll"}"#), &[]);
    assert_eq!(status, 200);
    std::thread::sleep(Duration::from_millis(100));
    let auth = format!("Bearer {banned}");
    let (status, _) = common::http(gw.ws, "GET", "/v1/rooms/secret/messages", None, &[("Authorization", &auth)]);
    assert_eq!(status, 403, "a banned user cannot read the room by polling");
    let (status, _) =
        common::http(gw.ws, "GET", "/v1/rooms/secret/messages", None, &[("Origin", "https://evil.example")]);
    assert_eq!(status, 403, "an Origin outside the allow-list");
    // Preflight, then two polls on one kept-alive connection, with a token.
    let mut s = std::net::TcpStream::connect(gw.ws).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let origin = "Origin: https://live.example\r\n";
    let (status, head, _) =
        exchange(&mut s, &format!("OPTIONS /v1/rooms/secret/messages HTTP/1.1\r\nHost: x\r\n{origin}\r\n"));
    assert_eq!(status, 204);
    assert!(head.contains("Access-Control-Allow-Origin: https://live.example\r\n"), "{head}");
    assert!(head.contains("Access-Control-Allow-Headers: Authorization\r\n") && head.contains("keep-alive"), "{head}");
    let fan = token("fan");
    for _ in 0..2 {
        let req = format!("GET /v1/rooms/secret/messages?token={fan} HTTP/1.1\r\nHost: x\r\n{origin}\r\n");
        let (status, _, body) = exchange(&mut s, &req);
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("bWVtYmVycyBvbmx5"), "the message (data is base64 in JSON): {body}");
    }
    // And the WebSocket refuses the foreign Origin too.
    let mut req =
        tungstenite::client::IntoClientRequest::into_client_request(gw.url(&format!("?token={fan}"))).unwrap();
    req.headers_mut().insert("Origin", "https://evil.example".parse().unwrap());
    match tungstenite::connect(req) {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 403),
        other => panic!("a foreign Origin was not refused: {:?}", other.map(|_| ())),
    }
}

/// Connects from `source` (any 127.0.0.0/8 address) to `to`.
fn connect_from(source: &str, to: std::net::SocketAddr) -> std::net::TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&format!("{source}:0").parse::<std::net::SocketAddr>().unwrap().into()).unwrap();
    s.connect(&to.into()).unwrap();
    let s: std::net::TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// Whether the server closed `s` without a word (EOF or reset before any byte).
fn closed_silently(s: &mut std::net::TcpStream) -> bool {
    use std::io::Read;
    let mut b = [0u8; 1];
    matches!(s.read(&mut b), Ok(0) | Err(_))
}

/// The edge: per client address, connections and requests are rate-limited, and behind a
/// balancer the address comes from a PROXY v2 header.
#[test]
fn the_edge_limits_each_client_address() {
    // One shard: each shard keeps its own table (the node allows shards × these rates).
    let gw = Gateway::start(&[
        "--shards",
        "1",
        "--addr-conn-rate-per-s",
        "1",
        "--addr-conn-rate-burst",
        "3",
        "--addr-request-rate-per-s",
        "1",
        "--addr-request-rate-burst",
        "2",
    ]);
    let poll = "GET /v1/rooms/r/messages HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut held: Vec<std::net::TcpStream> = (0..3).map(|_| connect_from("127.0.9.1", gw.ws)).collect();
    let mut fourth = connect_from("127.0.9.1", gw.ws);
    assert!(closed_silently(&mut fourth), "a fourth connection in the same second is closed at once");
    let mut other = connect_from("127.0.9.2", gw.ws);
    assert_eq!(exchange(&mut other, poll).0, 200, "another address is not limited");
    assert_eq!(exchange(&mut held[0], poll).0, 200);
    assert_eq!(exchange(&mut held[1], poll).0, 200);
    assert_eq!(exchange(&mut held[2], poll).0, 429, "the third request in the same second");
    common::eventually("counted", || gw.metric("barrage_refused_total{reason=\"addr_rate\"}") == 1);
}

#[test]
fn behind_a_balancer_the_proxy_header_names_the_client() {
    use std::io::Write;
    let gw = Gateway::start(&[
        "--shards",
        "1",
        "--proxy-protocol",
        "true",
        "--addr-conn-rate-per-s",
        "1",
        "--addr-conn-rate-burst",
        "1",
    ]);
    let lb = gw.ws;
    let via = |client: &str| {
        let mut s = connect_from("127.0.9.3", lb);
        let header = barrage::wire::proxy::header(client.parse().unwrap(), lb, &[]);
        s.write_all(&header).unwrap();
        s
    };
    let poll = "GET /v1/rooms/r/messages HTTP/1.1\r\nHost: x\r\n\r\n";
    // Three clients through one balancer address: each has its own rate.
    for client in ["198.51.100.1:4000", "198.51.100.2:4000", "[2001:db8::7]:4000"] {
        assert_eq!(exchange(&mut via(client), poll).0, 200, "{client}");
    }
    let mut again = via("198.51.100.1:4001");
    assert!(closed_silently(&mut again), "the same client again in the same second");
    // A connection that does not start with the header is closed without an answer.
    let mut bare = connect_from("127.0.9.3", lb);
    bare.write_all(poll.as_bytes()).unwrap();
    assert!(closed_silently(&mut bare));
    common::eventually("counted", || gw.metric("barrage_handshakes_total{result=\"proxy\"}") == 1);
}
