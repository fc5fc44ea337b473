//! Rooms end to end over loopback through the real binary: join, merged blocks in priority
//! order with consecutive seqs, switching rooms, direct and broadcast messages, both
//! subprotocols, and a signed-in user's chat.
mod common;

use barrage::proto::{Join, Leave, Ping, Send, client_frame, server_frame};
use common::{Client, Gateway, eventually, http, token};
use serde_json::json;

const JSON: Option<&str> = Some("barrage.v1.json");
const PROTO: Option<&str> = Some("barrage.v1.proto");

#[test]
fn merged_block_in_priority_order_with_consecutive_seqs() {
    let gw = Gateway::start(&["--block-interval-ms", "300"]);
    let mut a = Client::connect(&gw.url("?room=live1"), PROTO);
    let mut b = Client::connect(&gw.url("?room=live1"), JSON);
    assert_eq!(a.welcome().room, "live1");
    assert_eq!(b.welcome().room, "live1");
    gw.wait_online("live1", 2);
    let bodies = [
        json!({"type": "chat", "text": "low"}),
        json!({"type": "gift", "priority": "high", "weight": 1, "text": "small gift"}),
        json!({"type": "notice", "priority": "whitelist", "text": "system"}),
        json!({"type": "gift", "priority": "high", "weight": 9, "text": "big gift"}),
        json!({"type": "chat", "text": "low 2"}),
    ];
    for body in bodies {
        let (status, resp) = gw.publish("live1", body);
        assert_eq!(status, 202, "{resp}");
    }
    for client in [&mut a, &mut b] {
        let block = client.block();
        let texts: Vec<String> = block.messages.iter().map(|m| String::from_utf8(m.data.clone()).unwrap()).collect();
        assert_eq!(texts, ["system", "big gift", "small gift", "low", "low 2"]);
        let seqs: Vec<u64> = block.messages.iter().map(|m| m.seq).collect();
        let expect: Vec<u64> = (block.first_seq..=block.last_seq).collect();
        assert_eq!(seqs, expect, "consecutive seqs from first_seq to last_seq");
        assert_eq!(block.online, 2);
        assert!(block.messages.iter().all(|m| m.room == "live1" && m.id != 0 && m.created_ms > 0));
    }
}

#[test]
fn block_keeps_at_most_n_and_whitelist_carries_over() {
    let gw = Gateway::start(&["--block-interval-ms", "400", "--block-messages-max", "3"]);
    let mut a = Client::connect(&gw.url("?room=r"), PROTO);
    a.welcome();
    gw.wait_online("r", 1);
    for i in 0..4 {
        gw.publish("r", json!({"priority": "whitelist", "text": format!("w{i}")}));
    }
    for i in 0..3 {
        gw.publish("r", json!({"text": format!("low{i}")}));
    }
    let first = a.block();
    let second = a.block();
    let texts = |b: &barrage::proto::Block| -> Vec<String> {
        b.messages.iter().map(|m| String::from_utf8(m.data.clone()).unwrap()).collect()
    };
    assert_eq!(texts(&first), ["w0", "w1", "w2"]);
    assert_eq!(texts(&second), ["w3"], "the whitelist message that did not fit is carried; low ones dropped");
    assert_eq!(second.first_seq, first.last_seq + 1);
    eventually("overflow drops counted", || gw.metric("barrage_messages_dropped_total{reason=\"overflow\"}") == 3);
}

#[test]
fn joining_another_room_leaves_the_first() {
    let gw = Gateway::start(&[]);
    let mut a = Client::connect(&gw.url("?room=one"), JSON);
    a.welcome();
    gw.wait_online("one", 1);
    a.send(client_frame::Frame::Join(Join { room: "two".into(), ..Join::default() }));
    gw.wait_online("two", 1);
    gw.wait_online("one", 0);
    gw.publish("one", json!({"text": "not for you"}));
    gw.publish("two", json!({"text": "for you"}));
    let block = a.block();
    assert_eq!(block.room, "two");
    assert_eq!(block.messages[0].data, b"for you");
    a.send(client_frame::Frame::Leave(Leave { room: "two".into() }));
    gw.wait_online("two", 0);
    a.send(client_frame::Frame::Leave(Leave { room: "two".into() }));
    match a.recv() {
        server_frame::Frame::Error(e) => assert_eq!(e.code, 404),
        other => panic!("expected an error frame, got {other:?}"),
    }
}

#[test]
fn many_members_across_shards_get_the_same_block() {
    let gw = Gateway::start(&[]);
    let mut clients: Vec<Client> =
        (0..40).map(|i| Client::connect(&gw.url("?room=big"), if i % 2 == 0 { PROTO } else { JSON })).collect();
    for c in &mut clients {
        c.welcome();
    }
    gw.wait_online("big", 40);
    gw.publish("big", json!({"type": "like", "text": "hello all"}));
    let mut seqs = Vec::new();
    for c in &mut clients {
        let b = c.block();
        assert_eq!(b.messages[0].data, b"hello all");
        seqs.push(b.first_seq);
    }
    assert!(seqs.windows(2).all(|w| w[0] == w[1]), "one block, one seq, for everyone");
    // One block cut for the room, however many members and shards.
    eventually("40 deliveries counted", || gw.metric("barrage_block_deliveries_total") == 40);
    assert_eq!(gw.metric("barrage_blocks_total"), 1);
}

#[test]
fn direct_reaches_every_connection_of_the_user_and_nobody_else() {
    let gw = Gateway::start(&[]);
    let alice = token("alice");
    let mut a1 = Client::connect(&gw.url(&format!("?token={alice}")), PROTO);
    let mut a2 = Client::connect(&gw.url(&format!("?token={alice}")), JSON);
    let mut bob = Client::connect(&gw.url(&format!("?token={}", token("bob"))), PROTO);
    for c in [&mut a1, &mut a2, &mut bob] {
        c.welcome();
    }
    let (status, body) =
        http(gw.api, "POST", "/v1/users/alice/messages", Some(r#"{"type":"notice","text":"hi alice"}"#), &[]);
    assert_eq!(status, 202, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["connections"], 2);
    for c in [&mut a1, &mut a2] {
        match c.recv() {
            server_frame::Frame::Direct(d) => assert_eq!(d.message.unwrap().data, b"hi alice"),
            other => panic!("expected direct, got {other:?}"),
        }
    }
    // Bob gets the broadcast next, not alice's direct.
    let (status, _) = http(gw.api, "POST", "/v1/broadcast", Some(r#"{"type":"notice","text":"all"}"#), &[]);
    assert_eq!(status, 202);
    for c in [&mut bob, &mut a1, &mut a2] {
        match c.recv() {
            server_frame::Frame::Broadcast(b) => assert_eq!(b.message.unwrap().data, b"all"),
            other => panic!("expected broadcast, got {other:?}"),
        }
    }
}

#[test]
fn signed_in_user_chats_into_the_room_and_anonymous_cannot() {
    let gw = Gateway::start(&[]);
    let mut user = Client::connect(&gw.url(&format!("?room=chat&token={}", token("carol"))), JSON);
    let mut viewer = Client::connect(&gw.url("?room=chat"), PROTO);
    assert_eq!(user.welcome().user, "carol");
    assert_eq!(viewer.welcome().user, "");
    gw.wait_online("chat", 2);
    user.send(client_frame::Frame::Send(Send {
        r#type: String::new(),
        data: b"hello room".to_vec(),
        ..Default::default()
    }));
    for c in [&mut user, &mut viewer] {
        let b = c.block();
        let m = &b.messages[0];
        assert_eq!((m.sender.as_str(), m.r#type.as_str(), m.data.as_slice()), ("carol", "chat", &b"hello room"[..]));
    }
    viewer.send(client_frame::Frame::Send(Send { r#type: "chat".into(), data: b"x".to_vec(), ..Default::default() }));
    match viewer.recv() {
        server_frame::Frame::Error(e) => assert_eq!(e.code, 401),
        other => panic!("expected error, got {other:?}"),
    }
    viewer.send(client_frame::Frame::Ping(Ping {}));
    assert!(matches!(viewer.recv(), server_frame::Frame::Pong(_)));
}

#[test]
fn a_token_without_send_may_watch_only() {
    let gw = Gateway::start(&[]);
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 60;
    let t = barrage::auth::sign_hs256(common::SECRET.as_bytes(), &json!({"sub": "dave", "exp": exp, "send": false}));
    let mut c = Client::connect(&gw.url(&format!("?room=x&token={t}")), PROTO);
    c.welcome();
    c.send(client_frame::Frame::Send(Send { r#type: "chat".into(), data: b"x".to_vec(), ..Default::default() }));
    match c.recv() {
        server_frame::Frame::Error(e) => assert_eq!(e.code, 403),
        other => panic!("expected error, got {other:?}"),
    }
}

/// A returning client resumes with `?after=` its last seq: its backfill holds exactly what it
/// missed, then the live stream goes on.
#[test]
fn a_returning_client_resumes_after_its_last_seq() {
    let gw = Gateway::start(&["--block-interval-ms", "30"]);
    let mut c = Client::connect(&gw.url("?room=back"), None);
    c.welcome();
    gw.wait_online("back", 1);
    gw.publish("back", json!({"text": "one"}));
    let last = c.block().last_seq;
    drop(c);
    for text in ["two", "three"] {
        gw.publish("back", json!({"text": text}));
        std::thread::sleep(std::time::Duration::from_millis(60));
    }
    let mut again = Client::connect(&gw.url(&format!("?room=back&after={last}")), None);
    again.welcome();
    let backfill = again.block();
    let texts: Vec<String> = backfill.messages.iter().map(|m| String::from_utf8(m.data.clone()).unwrap()).collect();
    assert!(backfill.backfill && !backfill.truncated);
    assert_eq!(texts, ["two", "three"], "exactly what was missed");
    assert_eq!(backfill.first_seq, last + 1, "no gap");
    gw.publish("back", json!({"text": "four"}));
    let live = again.block();
    assert_eq!((live.backfill, live.first_seq), (false, backfill.last_seq + 1));
}
