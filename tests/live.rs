//! Live-room semantics over loopback through the real binary: type defaults and the whitelist
//! bucket, expiry, corrections, rate limits, slow consumers, moderation, presence events,
//! attributes, history backfill, short polling, and a client resuming without gaps.
mod common;

use std::time::{Duration, Instant};

use barrage::proto::{AttrSet, AttrSync, Join, Moderate, Send, client_frame, moderate, server_frame};
use common::{Client, Gateway, Raw, eventually, http, token, upgrade_request};
use serde_json::{Value, json};

const PROTO: Option<&str> = None;

fn texts(b: &barrage::proto::Block) -> Vec<String> {
    b.messages.iter().map(|m| String::from_utf8_lossy(&m.data).into_owned()).collect()
}

fn signed(exp_claims: Value) -> String {
    let mut claims = exp_claims;
    claims["exp"] = json!(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 600);
    barrage::auth::sign_hs256(common::SECRET.as_bytes(), &claims)
}

fn error_code(c: &mut Client) -> u32 {
    match c.recv() {
        server_frame::Frame::Error(e) => e.code,
        other => panic!("expected an error frame, got {other:?}"),
    }
}

#[test]
fn type_defaults_expiry_and_corrections() {
    let gw = Gateway::start(&["--block-interval-ms", "400"]);
    let mut c = Client::connect(&gw.url("?room=t"), PROTO);
    c.welcome();
    gw.wait_online("t", 1);
    // No priority named: a gift takes the type default (high) and beats a low custom message.
    gw.publish("t", json!({"type": "custom", "text": "plain"}));
    gw.publish("t", json!({"type": "gift", "text": "rocket"}));
    // Corrections: three PK scores with one key leave only the newest.
    for score in ["20:10", "21:10", "22:10"] {
        gw.publish("t", json!({"type": "pk", "text": score, "coalesce_key": "pk:1"}));
    }
    // Expiry: a message whose ttl passes before the block is cut is never sent.
    gw.publish("t", json!({"type": "chat", "text": "stale", "ttl_ms": 1}));
    let b = c.block();
    assert_eq!(texts(&b), ["rocket", "22:10", "plain"]);
    eventually("counted", || {
        gw.metric("barrage_messages_coalesced_total") == 2
            && gw.metric("barrage_messages_dropped_total{reason=\"expired\"}") == 1
    });
}

#[test]
fn room_and_connection_rates_are_limited() {
    let gw = Gateway::start(&[
        "--room-rate-per-s",
        "1",
        "--room-rate-burst",
        "3",
        "--send-rate-per-s",
        "1",
        "--send-rate-burst",
        "2",
    ]);
    for _ in 0..3 {
        assert_eq!(gw.publish("busy", json!({"text": "x"})).0, 202);
    }
    let (status, body) = gw.publish("busy", json!({"text": "x"}));
    assert_eq!(status, 429, "{body}");
    assert_eq!(
        gw.publish("busy", json!({"text": "notice", "priority": "whitelist"})).0,
        202,
        "whitelist is not limited"
    );
    let mut c = Client::connect(&gw.url(&format!("?room=calm&token={}", token("fast"))), PROTO);
    c.welcome();
    for _ in 0..3 {
        c.send(client_frame::Frame::Send(Send { r#type: "chat".into(), data: b"hi".to_vec(), ..Default::default() }));
    }
    assert_eq!(error_code(&mut c), 429, "the third send in a burst of two");
    eventually("counted", || {
        gw.metric("barrage_client_sends_rate_limited_total") == 1
            && gw.metric("barrage_messages_dropped_total{reason=\"room_rate\"}") == 1
    });
}

#[test]
fn a_reader_behind_for_too_long_is_closed_unless_whitelisted() {
    let gw =
        Gateway::start(&["--slow-consumer-ms", "500", "--data-bytes-max", "60000", "--send-queue-frames-max", "4"]);
    let vip_token = token("vip");
    gw.publish("s", json!({"text": "warm"}));
    let (s, _) = http(gw.api, "POST", "/v1/rooms/s/whitelist", Some(r#"{"user":"vip"}"#), &[]);
    assert_eq!(s, 200);
    let mut slow = Raw::connect(gw.ws);
    slow.write(&upgrade_request("/ws?room=s", &[]));
    let mut vip = Raw::connect(gw.ws);
    vip.write(&upgrade_request(&format!("/ws?room=s&token={vip_token}"), &[]));
    gw.wait_online("s", 2);
    // Neither reads: their socket buffers fill, then their queues shed low blocks.
    let big = json!({"data_b64": "A".repeat(80_000)}).to_string();
    let t = Instant::now();
    while gw.metric("barrage_closed_total{reason=\"slow_consumer\"}") < 1 {
        assert!(t.elapsed() < Duration::from_secs(20), "the slow reader was never closed");
        let (status, _) = http(gw.api, "POST", "/v1/rooms/s/messages", Some(&big), &[]);
        assert!(status == 202 || status == 429);
        std::thread::sleep(Duration::from_millis(60));
    }
    gw.wait_online("s", 1);
    assert!(gw.metric("barrage_frames_dropped_total{reason=\"slow_consumer\"}") > 0);
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(gw.metric("barrage_closed_total{reason=\"slow_consumer\"}"), 1, "the whitelisted reader stays");
}

#[test]
fn kick_mute_ban_and_whitelist_through_the_api_and_admin_frames() {
    let gw = Gateway::start(&[]);
    let mut alice = Client::connect(&gw.url(&format!("?room=mod&token={}", token("alice"))), PROTO);
    alice.welcome();
    gw.wait_online("mod", 1);
    let post = |path: &str, body: &str| http(gw.api, "POST", path, Some(body), &[]);
    // Mute: her sends are refused at the owner.
    assert_eq!(post("/v1/rooms/mod/mutes", r#"{"user":"alice","duration_ms":60000}"#).0, 200);
    alice.send(client_frame::Frame::Send(Send { r#type: "chat".into(), data: b"hi".to_vec(), ..Default::default() }));
    assert_eq!(error_code(&mut alice), 403);
    let (_, lists) = http(gw.api, "GET", "/v1/rooms/mod/moderation", None, &[]);
    let lists: Value = serde_json::from_str(&lists).unwrap();
    assert_eq!(lists["mutes"][0]["user"], "alice");
    assert_eq!(http(gw.api, "DELETE", "/v1/rooms/mod/mutes/alice", None, &[]).0, 200);
    // Ban: kicked at once with a `kicked` frame and 1008, and refused on rejoin.
    assert_eq!(post("/v1/rooms/mod/bans", r#"{"user":"alice","reason":"spam"}"#).0, 200);
    match alice.recv() {
        server_frame::Frame::Kicked(k) => assert_eq!((k.room.as_str(), k.reason.as_str()), ("mod", "spam")),
        other => panic!("expected kicked, got {other:?}"),
    }
    assert_eq!(alice.close_code(), Some(1008));
    let mut again = Client::connect(&gw.url(&format!("?room=mod&token={}", token("alice"))), PROTO);
    again.welcome();
    assert_eq!(error_code(&mut again), 403, "banned users cannot rejoin");
    assert_eq!(http(gw.api, "DELETE", "/v1/rooms/mod/bans/alice", None, &[]).0, 200);
    again.send(client_frame::Frame::Join(Join { room: "mod".into(), ..Join::default() }));
    gw.wait_online("mod", 1);
    // An admin token scoped to another room may not moderate this one.
    let elsewhere = signed(json!({"sub": "intruder", "admin": true, "rooms": ["other"]}));
    let mut intruder = Client::connect(&gw.url(&format!("?room=mod&token={elsewhere}")), PROTO);
    intruder.welcome();
    let ban =
        Moderate { action: moderate::Action::Ban as i32, user: "alice".into(), duration_ms: 0, reason: "x".into() };
    intruder.send(client_frame::Frame::Moderate(ban));
    assert_eq!(error_code(&mut intruder), 403, "admin rights reach only the token's rooms");
    drop(intruder);
    gw.wait_online("mod", 1);
    // An admin token for this room kicks with a frame.
    let boss = signed(json!({"sub": "boss", "admin": true, "rooms": ["mod"]}));
    let mut admin = Client::connect(&gw.url(&format!("?room=mod&token={boss}")), PROTO);
    admin.welcome();
    gw.wait_online("mod", 2);
    let kick =
        Moderate { action: moderate::Action::Kick as i32, user: "alice".into(), duration_ms: 0, reason: "bye".into() };
    admin.send(client_frame::Frame::Moderate(kick.clone()));
    assert!(matches!(again.recv(), server_frame::Frame::Kicked(_)));
    gw.wait_online("mod", 1);
    // Without the admin claim it is refused.
    let mut user = Client::connect(&gw.url(&format!("?room=mod&token={}", token("carol"))), PROTO);
    user.welcome();
    user.send(client_frame::Frame::Moderate(kick));
    assert_eq!(error_code(&mut user), 403);
}

#[test]
fn whitelisted_users_chat_rides_the_whitelist_bucket() {
    let gw = Gateway::start(&["--block-interval-ms", "400", "--block-messages-max", "1"]);
    let (s, _) = http(gw.api, "POST", "/v1/rooms/w/whitelist", Some(r#"{"user":"host"}"#), &[]);
    assert_eq!(s, 200);
    let mut host = Client::connect(&gw.url(&format!("?room=w&token={}", token("host"))), PROTO);
    host.welcome();
    gw.wait_online("w", 1);
    gw.publish("w", json!({"type": "gift", "priority": "high", "weight": 100, "text": "gift"}));
    host.send(client_frame::Frame::Send(Send {
        r#type: "chat".into(),
        data: b"host speaks".to_vec(),
        ..Default::default()
    }));
    let b = host.block();
    assert_eq!(texts(&b), ["host speaks"], "one per block: whitelist beats a heavy gift");
    assert_eq!(b.messages[0].priority, barrage::proto::Priority::Whitelist as i32);
}

#[test]
fn presence_events_are_coalesced_and_top_rooms_ranked() {
    let gw = Gateway::start(&["--presence-events", "true", "--block-interval-ms", "500"]);
    let mut watcher = Client::connect(&gw.url(&format!("?room=p&token={}", token("watcher"))), PROTO);
    watcher.welcome();
    gw.wait_online("p", 1);
    let crowd: Vec<Client> = (0..30)
        .map(|i| Client::connect(&gw.url(&format!("?room=p&token={}", token(&format!("u{i}")))), PROTO))
        .collect();
    gw.wait_online("p", 31);
    let mut entered = 0;
    let mut enter_messages = 0;
    while entered < 31 {
        for m in watcher.block().messages.iter().filter(|m| m.r#type == "enter") {
            let v: Value = serde_json::from_slice(&m.data).unwrap();
            entered += v["count"].as_u64().unwrap();
            assert!(v["users"].as_array().unwrap().len() <= 10, "only the first few are named");
            enter_messages += 1;
        }
    }
    assert!(enter_messages <= 3, "31 joins made {enter_messages} enter messages, not 31");
    drop(crowd);
    let mut left = 0;
    while left < 30 {
        for m in watcher.block().messages.iter().filter(|m| m.r#type == "leave") {
            left += serde_json::from_slice::<Value>(&m.data).unwrap()["count"].as_u64().unwrap();
        }
    }
    let _other: Vec<Client> = (0..3).map(|_| Client::connect(&gw.url("?room=q"), PROTO)).collect();
    gw.wait_online("q", 3);
    let (_, top) = http(gw.api, "GET", "/v1/rooms?top=2", None, &[]);
    let top: Value = serde_json::from_str(&top).unwrap();
    assert_eq!(top["rooms"], json!([{"room": "q", "online": 3}, {"room": "p", "online": 1}]));
}

#[test]
fn attributes_snapshot_on_join_deltas_after_and_sync_by_version() {
    let gw = Gateway::start(&["--attr-log-len-max", "2", "--attr-value-bytes-max", "16"]);
    let put = |key: &str, body: &str| http(gw.api, "PUT", &format!("/v1/rooms/a/attributes/{key}"), Some(body), &[]);
    let (s, v1) = put("seat1", r#"{"value":"alice"}"#);
    assert_eq!(s, 200, "{v1}");
    let mut c = Client::connect(&gw.url("?room=a"), PROTO);
    c.welcome();
    let snapshot = match c.recv() {
        server_frame::Frame::Attrs(a) => a,
        other => panic!("expected the attribute snapshot, got {other:?}"),
    };
    assert!(snapshot.snapshot);
    assert_eq!((snapshot.entries[0].key.as_str(), snapshot.entries[0].value.as_slice()), ("seat1", &b"alice"[..]));
    put("seat2", r#"{"value":"bob"}"#);
    // A delta for a change the snapshot already holds may still arrive: skip version <= ours.
    let delta = loop {
        match c.recv() {
            server_frame::Frame::Attrs(a) if a.version <= snapshot.version => continue,
            server_frame::Frame::Attrs(a) => break a,
            other => panic!("expected a delta, got {other:?}"),
        }
    };
    assert!(!delta.snapshot);
    // Apply when from_version <= ours < version: it holds the newest value of each changed key,
    // so one that starts before our snapshot is a harmless superset.
    assert!(delta.from_version <= snapshot.version && delta.version > snapshot.version);
    assert!(delta.entries.iter().any(|e| e.key == "seat2" && e.value == b"bob"));
    // Sync from the snapshot's version: still in the log (2 kept) → a delta.
    c.send(client_frame::Frame::AttrSync(AttrSync { room: String::new(), after_version: snapshot.version }));
    assert!(matches!(c.recv(), server_frame::Frame::Attrs(a) if !a.snapshot));
    // Two more changes push it out of the log → a snapshot instead.
    assert_eq!(http(gw.api, "DELETE", "/v1/rooms/a/attributes/seat1", None, &[]).0, 200);
    let (_, v) = put("seat3", r#"{"value_b64":"//4="}"#);
    let target = serde_json::from_str::<Value>(&v).unwrap()["version"].as_u64().unwrap();
    // Changes within one tick go out as one delta: read until we hold the API's version.
    loop {
        match c.recv() {
            server_frame::Frame::Attrs(a) if a.version >= target => break,
            server_frame::Frame::Attrs(_) => continue,
            other => panic!("expected attrs, got {other:?}"),
        }
    }
    c.send(client_frame::Frame::AttrSync(AttrSync { room: String::new(), after_version: snapshot.version }));
    match c.recv() {
        server_frame::Frame::Attrs(a) => {
            assert!(a.snapshot);
            let keys: Vec<&str> = a.entries.iter().map(|e| e.key.as_str()).collect();
            assert_eq!(keys, ["seat2", "seat3"]);
        }
        other => panic!("expected a snapshot, got {other:?}"),
    }
    let (_, all) = http(gw.api, "GET", "/v1/rooms/a/attributes", None, &[]);
    let all: Value = serde_json::from_str(&all).unwrap();
    assert_eq!(all["attributes"], json!({"seat2": {"value": "bob"}, "seat3": {"value_b64": "//4="}}));
    assert_eq!(put("big", r#"{"value":"this value is too long"}"#).0, 413);
    assert_eq!(put("bad%20key", r#"{"value":"x"}"#).0, 400);
    eventually("refusals counted", || gw.metric("barrage_requests_refused_total{reason=\"attrs\"}") == 2);
    // Clients set attributes only with the attrs claim.
    let set = AttrSet { key: "seat9".into(), value: b"me".to_vec(), delete: false };
    c.send(client_frame::Frame::AttrSet(set.clone()));
    assert_eq!(error_code(&mut c), 403);
    let mut mic = Client::connect(
        &gw.url(&format!("?room=a&token={}", signed(json!({"sub": "mc", "attrs": true, "rooms": ["*"]})))),
        PROTO,
    );
    mic.welcome();
    assert!(matches!(mic.recv(), server_frame::Frame::Attrs(a) if a.snapshot));
    mic.send(client_frame::Frame::AttrSet(set));
    match c.recv() {
        server_frame::Frame::Attrs(a) => assert_eq!(a.entries[0].key, "seat9"),
        other => panic!("expected a delta, got {other:?}"),
    }
}

/// The README's client algorithm: keep the highest seq seen; drop anything at or below it
/// (duplicates); after a disconnect, poll `after=last` until `next` stops moving, then go live.
#[test]
fn a_client_resumes_by_short_polling_without_gaps_or_duplicates() {
    let gw = Gateway::start(&["--block-interval-ms", "100", "--history-messages-max", "50"]);
    let mut c = Client::connect(&gw.url("?room=r"), PROTO);
    c.welcome();
    gw.wait_online("r", 1);
    gw.publish("r", json!({"text": "m0"}));
    let mut last = c.block().last_seq;
    let mut seen = vec!["m0".to_string()];
    drop(c);
    gw.wait_online("r", 0);
    for i in 1..=7 {
        gw.publish("r", json!({"text": format!("m{i}")}));
        std::thread::sleep(Duration::from_millis(30));
    }
    // Everything published is cut into blocks (what is still pending would come live later).
    eventually("all cut", || {
        let (_, info) = http(gw.api, "GET", "/v1/rooms/r", None, &[]);
        serde_json::from_str::<Value>(&info).unwrap()["pending"] == 0
    });
    // Back, with the last seq it saw: short poll (a page of 3 at a time) until caught up.
    loop {
        let mut r = Raw::connect(gw.ws);
        r.write(format!("GET /v1/rooms/r/messages?after={last}&limit=3 HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
        let response = String::from_utf8(r.read_to_end()).unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(response.contains("Access-Control-Allow-Origin: *"));
        let page: Value = serde_json::from_str(response.split_once("\r\n\r\n").unwrap().1).unwrap();
        assert_eq!(page["truncated"], false);
        assert_eq!(page["poll_interval_ms"], 1500);
        let messages = page["messages"].as_array().unwrap();
        for m in messages {
            let seq: u64 = m["seq"].as_str().unwrap().parse().unwrap();
            assert_eq!(seq, last + 1, "no gap");
            last = seq;
            seen.push(String::from_utf8(base64_decode(m["data"].as_str().unwrap())).unwrap());
        }
        if messages.is_empty() {
            break;
        }
    }
    assert_eq!(seen, (0..=7).map(|i| format!("m{i}")).collect::<Vec<_>>());
    // Live again: the join's backfill repeats what it has (dropped by seq), then new blocks.
    let mut c = Client::connect(&gw.url("?room=r"), PROTO);
    c.welcome();
    let backfill = c.block();
    assert!(backfill.backfill && backfill.last_seq == last);
    assert!(backfill.messages.iter().all(|m| m.seq <= last), "all duplicates: dropped");
    gw.publish("r", json!({"text": "m8"}));
    let b = c.block();
    assert_eq!((b.first_seq, texts(&b)), (last + 1, vec!["m8".to_string()]));
}

#[test]
fn short_polling_refuses_bad_cursors_reports_truncation_and_tells_no_existence() {
    let gw = Gateway::start(&["--history-messages-max", "2", "--block-interval-ms", "50"]);
    let get = |path: &str| {
        let mut r = Raw::connect(gw.ws);
        r.write(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
        let out = String::from_utf8(r.read_to_end()).unwrap();
        let status: u16 = out.split_whitespace().nth(1).unwrap().parse().unwrap();
        (status, out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
    };
    for i in 0..5 {
        gw.publish("h", json!({"text": format!("{i}")}));
        std::thread::sleep(Duration::from_millis(120));
    }
    let (status, body) = get("/v1/rooms/h/messages?after=0");
    assert_eq!(status, 200);
    let page: Value = serde_json::from_str(&body).unwrap();
    assert_eq!((page["messages"].as_array().unwrap().len(), &page["truncated"]), (2, &json!(true)));
    let next = page["next"].as_u64().unwrap();
    // A cursor past the room's last seq answers exactly as a room nobody knows (no existence
    // oracle): nothing, the cursor back, truncated.
    let (status, future) = get(&format!("/v1/rooms/h/messages?after={}", next + 1));
    let (_, unknown) = get(&format!("/v1/rooms/nobody/messages?after={}", next + 1));
    assert_eq!(status, 200);
    assert_eq!(future, unknown);
    let future: Value = serde_json::from_str(&future).unwrap();
    assert_eq!((future["messages"].as_array().unwrap().len(), &future["truncated"]), (0, &json!(true)));
    assert_eq!(get("/v1/rooms/h/messages?after=-1").0, 400);
    assert_eq!(get("/v1/rooms/h/messages?after=abc").0, 400);
    assert_eq!(get("/v1/rooms/bad%20room/messages").0, 400);
    eventually("counted", || {
        gw.metric("barrage_polls_total") >= 3 && gw.metric("barrage_requests_refused_total{reason=\"poll\"}") == 3
    });
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

#[test]
fn a_send_with_an_id_is_acknowledged_with_its_seq_or_its_refusal() {
    let gw = Gateway::start(&[]);
    let mut alice = Client::connect(&gw.url(&format!("?room=ack&token={}", token("alice"))), PROTO);
    alice.welcome();
    gw.wait_online("ack", 1);
    alice.send(client_frame::Frame::Send(Send { r#type: "chat".into(), data: b"hi".to_vec(), id: "m-1".into() }));
    // The block first, then the ack naming the seq the message got in it.
    let mut seq = None;
    let ack = loop {
        match alice.recv() {
            server_frame::Frame::Block(b) => seq = b.messages.iter().find(|m| m.data == b"hi").map(|m| m.seq),
            server_frame::Frame::Ack(a) => break a,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!((ack.id.as_str(), ack.room.as_str(), ack.code), ("m-1", "ack", 0));
    assert_eq!(Some(ack.seq), seq, "the ack carries the message's seq");
    // Refusals come as acks too: muted at the owner, a type clients may not send at the shard.
    let (s, _) = http(gw.api, "POST", "/v1/rooms/ack/mutes", Some(r#"{"user":"alice"}"#), &[]);
    assert_eq!(s, 200);
    alice.send(client_frame::Frame::Send(Send { r#type: "chat".into(), data: b"x".to_vec(), id: "m-2".into() }));
    match alice.recv() {
        server_frame::Frame::Ack(a) => assert_eq!((a.id.as_str(), a.code, a.seq), ("m-2", 403, 0)),
        other => panic!("expected a refusing ack, got {other:?}"),
    }
    alice.send(client_frame::Frame::Send(Send { r#type: "gift".into(), data: b"x".to_vec(), id: "m-3".into() }));
    match alice.recv() {
        server_frame::Frame::Ack(a) => assert_eq!((a.id.as_str(), a.code), ("m-3", 403)),
        other => panic!("expected a refusing ack, got {other:?}"),
    }
    // Without an id a refusal is still an error frame (older clients).
    alice.send(client_frame::Frame::Send(Send { r#type: "chat".into(), data: b"x".to_vec(), ..Default::default() }));
    assert_eq!(error_code(&mut alice), 403);
    // An id longer than 64 bytes is a bad request.
    alice.send(client_frame::Frame::Send(Send { r#type: "chat".into(), data: b"x".to_vec(), id: "x".repeat(65) }));
    assert_eq!(error_code(&mut alice), 400);
}
