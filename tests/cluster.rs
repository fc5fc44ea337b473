//! Cluster membership over a real Redis (its own private server) and three real gateway
//! processes: every node lists the live set with its peers' URLs, a SIGKILLed node leaves it
//! within the node TTL, a stopped one at once, and a drain sends clients to the other nodes.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use barrage::proto::server_frame;
use common::{Client, Gateway, Redis, eventually, http};
use serde_json::Value;

const TTL_MS: u64 = 1_500;

fn node(redis: &Redis, id: &str) -> Gateway {
    node_with(redis, id, &[])
}

/// A node of the cluster on `redis`, heartbeats every 200 ms, with `extra` flags.
fn node_with(redis: &Redis, id: &str, extra: &[&str]) -> Gateway {
    let (url, ttl) = (redis.url(), TTL_MS.to_string());
    let mut args = vec!["--redis", &url, "--cluster", "true", "--cluster-node-id", id, "--cluster-heartbeat-ms", "200"];
    args.extend(["--cluster-node-ttl-ms", &ttl]);
    args.extend_from_slice(extra);
    Gateway::start(&args)
}

fn cluster(gw: &Gateway) -> Value {
    let (status, body) = http(gw.api, "GET", "/v1/cluster", None, &[]);
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn live(gw: &Gateway) -> BTreeSet<String> {
    cluster(gw)["nodes"].as_array().unwrap().iter().map(|n| n["id"].as_str().unwrap().to_string()).collect()
}

fn set(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

#[test]
fn nodes_see_each_other_and_a_dead_node_leaves_within_the_ttl() {
    let redis = Redis::start();
    let a = node(&redis, "a");
    let b = node(&redis, "b");
    let mut c = node(&redis, "c");
    for gw in [&a, &b, &c] {
        eventually("every node lists all three", || live(gw) == set(&["a", "b", "c"]));
    }
    // Each node's URL is the address its public listener is bound to.
    let info = cluster(&a);
    let urls: BTreeSet<String> =
        info["nodes"].as_array().unwrap().iter().map(|n| n["url"].as_str().unwrap().to_string()).collect();
    let want: BTreeSet<String> = [&a, &b, &c].iter().map(|g| format!("ws://{}/ws", g.ws)).collect();
    assert_eq!(urls, want);
    assert_eq!(info["node"], "a");
    assert!(a.metric("barrage_cluster_heartbeats_total") > 0);
    assert_eq!(a.metric("barrage_cluster_nodes"), 3);

    // SIGKILL: no goodbye; the others drop it once its announcement expires.
    let killed = Instant::now();
    sigkill(&mut c);
    eventually("a drops the killed node", || live(&a) == set(&["a", "b"]));
    let gone_after = killed.elapsed();
    assert!(gone_after < Duration::from_millis(TTL_MS + 1_500), "gone after {gone_after:?}");
    eventually("b drops it too", || live(&b) == set(&["a", "b"]));

    // A stopped node says goodbye: gone long before its TTL would run out.
    let mut b = b;
    assert!(b.terminate());
    eventually("a drops the stopped node", || live(&a) == set(&["a"]));
    let (_, health) = http(a.api, "GET", "/healthz", None, &[]);
    assert!(health.contains(r#""nodes":1"#), "{health}");
}

/// SIGKILL by pid (the test helper's terminate sends SIGTERM, which leaves gracefully).
fn sigkill(gw: &mut Gateway) {
    let status = std::process::Command::new("kill").args(["-KILL", &gw.pid().to_string()]).status().unwrap();
    assert!(status.success());
    // Killed, so not a successful exit: only wait for it to be gone.
    let _ = gw.wait_exit(Duration::from_secs(5));
}

#[test]
fn a_drain_sends_clients_to_the_other_live_nodes() {
    let redis = Redis::start();
    let a = node(&redis, "a");
    let b = node(&redis, "b");
    let c = node(&redis, "c");
    eventually("a sees three nodes", || live(&a).len() == 3);
    let mut viewers: Vec<Client> = (0..20).map(|_| Client::connect(&a.url("?room=r"), None)).collect();
    for v in &mut viewers {
        v.welcome();
    }
    a.wait_online("r", 20);
    let (status, body) = http(a.api, "POST", "/v1/admin/drain", Some(r#"{"rate_per_s": 0, "delay_ms": 0}"#), &[]);
    assert_eq!(status, 202, "{body}");
    let mut told = Vec::new();
    for v in &mut viewers {
        loop {
            if let server_frame::Frame::Reconnect(r) = v.recv() {
                told.push(r.url);
                break;
            }
        }
    }
    let peers: BTreeSet<String> = [&b, &c].iter().map(|g| format!("ws://{}/ws", g.ws)).collect();
    let got: BTreeSet<String> = told.iter().cloned().collect();
    assert_eq!(got, peers, "every client is sent to a peer, and both peers get some");
    // A client follows its reconnect to the node it was told and joins there.
    let mut moved = Client::connect(&format!("{}?room=r", told[0]), None);
    moved.welcome();
}

#[test]
fn without_a_cluster_the_endpoint_says_so() {
    let gw = Gateway::start(&[]);
    let (status, body) = http(gw.api, "GET", "/v1/cluster", None, &[]);
    assert_eq!(status, 404, "{body}");
}

/// Three nodes whose heartbeats see each other.
fn three(redis: &Redis) -> (Gateway, Gateway, Gateway) {
    let (a, b, c) = (node(redis, "a"), node(redis, "b"), node(redis, "c"));
    for gw in [&a, &b, &c] {
        eventually("every node lists all three", || live(gw).len() == 3);
    }
    (a, b, c)
}

/// The next block's bytes and its decoded form.
fn block_bytes(v: &mut Client) -> (Vec<u8>, barrage::proto::Block) {
    loop {
        let bytes = v.recv_bytes();
        let frame = <barrage::proto::ServerFrame as prost::Message>::decode(bytes.as_slice()).unwrap();
        if let Some(server_frame::Frame::Block(b)) = frame.frame {
            return (bytes, b);
        }
    }
}

#[test]
fn members_on_every_node_receive_the_owners_block_byte_for_byte_whichever_node_publishes() {
    let redis = Redis::start();
    let (a, b, c) = three(&redis);
    let room = "live:1";
    let mut viewers: Vec<Client> = [&a, &b, &c, &a, &b, &c]
        .iter()
        .map(|gw| {
            let mut v = Client::connect(&gw.url(&format!("?room={room}")), None);
            v.welcome();
            v
        })
        .collect();
    // Online counts are members summed over the nodes, asked of any node.
    for gw in [&a, &b, &c] {
        gw.wait_online(room, 6);
    }
    let mut last = 0;
    for (i, gw) in [&a, &b, &c].iter().enumerate() {
        let (status, body) = gw.publish(room, serde_json::json!({"type": "chat", "text": format!("via {i}")}));
        assert_eq!(status, 202, "{body}");
        let blocks: Vec<(Vec<u8>, barrage::proto::Block)> = viewers.iter_mut().map(block_bytes).collect();
        let (bytes, first) = &blocks[0];
        for (other, _) in &blocks[1..] {
            assert_eq!(other, bytes, "the same frame on every node");
        }
        assert_eq!(first.messages.len(), 1);
        assert_eq!(first.online, 6, "the block counts members on all nodes");
        let seq = first.messages[0].seq;
        assert!(seq > last, "seqs increase: {seq} after {last}");
        last = seq;
        assert_eq!(String::from_utf8_lossy(&first.messages[0].data), format!("via {i}"));
    }
    // A batch through any node: its items reach the owner (one publish each across Redis).
    let batch = serde_json::json!([{"room": room, "text": "batch 1"}, {"room": room, "text": "batch 2"}]);
    for gw in [&a, &b, &c] {
        let (status, body) = http(gw.api, "POST", "/v1/publish", Some(&batch.to_string()), &[]);
        assert_eq!(status, 200, "{body}");
        assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["accepted"], 2, "{body}");
        for v in &mut viewers {
            let mut got = Vec::new();
            while got.len() < 2 {
                got.extend(block_bytes(v).1.messages.into_iter().map(|m| m.data));
            }
            assert_eq!(got, [b"batch 1".to_vec(), b"batch 2".to_vec()]);
        }
    }
    // A batch for rooms spread over every node: one relayed batch per owner node, every item
    // answered in order.
    let rooms: Vec<String> = (0..30).map(|i| format!("spread:{i}")).collect();
    let owners: BTreeSet<String> = rooms.iter().map(|r| owner_of(&a, r)).collect();
    assert_eq!(owners.len(), 3, "30 rooms land on all three nodes");
    let items: Vec<Value> = rooms.iter().map(|r| serde_json::json!({"room": r, "text": r})).collect();
    let (status, body) = http(a.api, "POST", "/v1/publish", Some(&Value::Array(items).to_string()), &[]);
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["accepted"], 30, "{body}");
    for r in &rooms {
        let (_, info) = http(b.api, "GET", &format!("/v1/rooms/{r}"), None, &[]);
        assert!(serde_json::from_str::<Value>(&info).unwrap()["last_seq"].as_u64().unwrap() > 0, "{r}: {info}");
    }
    // Exactly one node runs the room: one lease, and frames went out from one owner.
    let leases: u64 = [&a, &b, &c].iter().map(|g| g.metric("barrage_cluster_leases")).sum();
    assert!(leases >= 1);
    let owners = [&a, &b, &c].iter().filter(|g| g.metric("barrage_cluster_frames_total{way=\"out\"}") > 0).count();
    assert_eq!(owners, 1, "one owner published the room's frames");
}

/// permessage-deflate across nodes: a member that negotiated it on a node that does not own the
/// room is counted at the owner (presence carries it over Redis), so the owner compresses the
/// block once and the relayed frame carries the compressed twin, which that member gets.
#[test]
fn a_deflate_member_on_another_node_gets_the_owners_compressed_block() {
    let redis = Redis::start();
    let flags = ["--deflate", "true", "--deflate-min-bytes", "16"];
    let (a, b) = (node_with(&redis, "a", &flags), node_with(&redis, "b", &flags));
    for gw in [&a, &b] {
        eventually("both nodes live", || live(gw).len() == 2);
    }
    let room = (0..100).map(|i| format!("zip:{i}")).find(|r| owner_of(&a, r) == "a").expect("a room a owns");
    // The only member, on b, offering permessage-deflate.
    let mut m = common::Raw::connect(b.ws);
    m.write(&common::upgrade_request(
        &format!("/ws?room={room}"),
        &["Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits"],
    ));
    let head = m.read_head();
    assert!(head.contains("permessage-deflate; server_no_context_takeover"), "{head}");
    a.wait_online(&room, 1);
    let text = "主播好 666666, first time here, followed 关注了";
    let (status, body) = a.publish(&room, serde_json::json!({"type": "chat", "text": text}));
    assert_eq!(status, 202, "{body}");
    let mut inflater = barrage::wire::deflate::Inflater::default();
    let block = loop {
        let (first, payload) = m.read_frame_whole();
        let payload = if first & 0x40 != 0 { inflater.inflate(&payload, 1 << 20).unwrap().to_vec() } else { payload };
        let frame = <barrage::proto::ServerFrame as prost::Message>::decode(payload.as_slice()).unwrap();
        if let Some(server_frame::Frame::Block(block)) = frame.frame {
            assert!(first & 0x40 != 0, "the block came compressed");
            break block;
        }
    };
    assert_eq!(String::from_utf8_lossy(&block.messages[0].data), text);
    eventually("the owner counted one compression", || a.metric("barrage_deflate_frames_total") == 1);
    assert_eq!(b.metric("barrage_deflate_frames_total"), 0);
}

/// The node that owns `room`, as `gw` sees it.
fn owner_of(gw: &Gateway, room: &str) -> String {
    let (status, body) = http(gw.api, "GET", &format!("/v1/rooms/{room}"), None, &[]);
    assert_eq!(status, 200, "{body}");
    serde_json::from_str::<Value>(&body).unwrap()["node"].as_str().unwrap().to_string()
}

fn error_code(c: &mut Client) -> u32 {
    loop {
        match c.recv() {
            server_frame::Frame::Error(e) => return e.code,
            server_frame::Frame::Block(_) => continue,
            other => panic!("expected an error frame, got {other:?}"),
        }
    }
}

#[test]
fn sends_moderation_direct_broadcast_and_top_rooms_span_the_nodes() {
    use barrage::proto::{Send, client_frame};
    let redis = Redis::start();
    let (a, b, c) = three(&redis);
    let nodes = [("a", &a), ("b", &b), ("c", &c)];
    let room = "mod";
    let owner = owner_of(&a, room);
    for (_, gw) in &nodes {
        assert_eq!(owner_of(gw, room), owner, "every node agrees on the owner");
    }
    // Alice and Bob sit on the two nodes that do not own the room; the API calls go to a third.
    let others: Vec<&Gateway> = nodes.iter().filter(|(id, _)| *id != owner).map(|(_, g)| *g).collect();
    let owner_gw = nodes.iter().find(|(id, _)| *id == owner).unwrap().1;
    let (x, y) = (others[0], others[1]);
    let mut alice = Client::connect(&x.url(&format!("?room={room}&token={}", common::token("alice"))), None);
    alice.welcome();
    let mut bob = Client::connect(&y.url(&format!("?room={room}&token={}", common::token("bob"))), None);
    bob.welcome();
    let mut carol = Client::connect(&owner_gw.url(&format!("?room={room}")), None);
    carol.welcome();
    x.wait_online(room, 3);

    // A client's send on a node that does not own the room reaches every member.
    alice.send(client_frame::Frame::Send(Send {
        r#type: "chat".into(),
        data: b"hi from x".to_vec(),
        ..Default::default()
    }));
    for v in [&mut alice, &mut bob, &mut carol] {
        let b = v.block();
        assert_eq!((b.messages[0].sender.as_str(), &b.messages[0].data[..]), ("alice", &b"hi from x"[..]));
    }
    // An acknowledged send: the owner's ack (with the seq its block gave) crosses back too.
    alice.send(client_frame::Frame::Send(Send { r#type: "chat".into(), data: b"acked".to_vec(), id: "a-1".into() }));
    let mut seq = None;
    let ack = loop {
        match alice.recv() {
            server_frame::Frame::Block(b) => seq = b.messages.iter().find(|m| m.data == b"acked").map(|m| m.seq),
            server_frame::Frame::Ack(a) => break a,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!((ack.id.as_str(), ack.code, Some(ack.seq)), ("a-1", 0, seq));
    for v in [&mut bob, &mut carol] {
        assert_eq!(v.block().messages[0].data, b"acked");
    }
    // A mute set through one node is enforced by the owner: the refusal comes back across.
    let (s, body) = http(y.api, "POST", &format!("/v1/rooms/{room}/mutes"), Some(r#"{"user":"alice"}"#), &[]);
    assert_eq!(s, 200, "{body}");
    alice.send(client_frame::Frame::Send(Send {
        r#type: "chat".into(),
        data: b"muted".to_vec(),
        ..Default::default()
    }));
    assert_eq!(error_code(&mut alice), 403);
    let (_, lists) = http(x.api, "GET", &format!("/v1/rooms/{room}/moderation"), None, &[]);
    assert!(lists.contains("alice"), "{lists}");

    // Direct and broadcast from one node reach users on the others.
    let (s, body) = http(x.api, "POST", "/v1/users/bob/messages", Some(r#"{"type":"notice","text":"psst"}"#), &[]);
    assert_eq!(s, 202, "{body}");
    match bob.recv() {
        server_frame::Frame::Direct(d) => assert_eq!(d.message.unwrap().data, b"psst"),
        other => panic!("expected the direct message, got {other:?}"),
    }
    let (s, _) = http(y.api, "POST", "/v1/broadcast", Some(r#"{"type":"notice","text":"all"}"#), &[]);
    assert_eq!(s, 202);
    for v in [&mut alice, &mut bob, &mut carol] {
        match v.recv() {
            server_frame::Frame::Broadcast(m) => assert_eq!(m.message.unwrap().data, b"all"),
            other => panic!("expected the broadcast, got {other:?}"),
        }
    }

    // Top rooms, asked of any node, counts the room once with its members on every node.
    let (_, top) = http(y.api, "GET", "/v1/rooms?top=5", None, &[]);
    let top: Value = serde_json::from_str(&top).unwrap();
    assert_eq!(top["rooms"], serde_json::json!([{"room": room, "online": 3}]), "{top}");

    // A ban through a node kicks the user on hers, and every node refuses her rejoin.
    let (s, _) = http(owner_gw.api, "POST", &format!("/v1/rooms/{room}/bans"), Some(r#"{"user":"alice"}"#), &[]);
    assert_eq!(s, 200);
    loop {
        match alice.recv() {
            server_frame::Frame::Kicked(k) => {
                assert_eq!(k.room, room);
                break;
            }
            server_frame::Frame::Block(_) => continue,
            other => panic!("expected kicked, got {other:?}"),
        }
    }
    assert_eq!(alice.close_code(), Some(1008));
    for gw in [x, y, owner_gw] {
        let mut again = Client::connect(&gw.url(&format!("?room={room}&token={}", common::token("alice"))), None);
        again.welcome();
        assert_eq!(error_code(&mut again), 403, "banned on every node");
    }
    // A kick through the API closes Bob on his node.
    let (s, _) = http(x.api, "POST", &format!("/v1/rooms/{room}/kick"), Some(r#"{"user":"bob"}"#), &[]);
    assert_eq!(s, 200);
    loop {
        match bob.recv() {
            server_frame::Frame::Kicked(_) => break,
            server_frame::Frame::Block(_) => continue,
            other => panic!("expected kicked, got {other:?}"),
        }
    }
    x.wait_online(room, 1);
}

/// Three nodes with short timings so a dead owner's rooms move quickly.
fn fast_node(redis: &Redis, id: &str) -> Gateway {
    node_with(redis, id, &["--cluster-lease-ms", &LEASE_MS.to_string()])
}

const LEASE_MS: u64 = 900;

/// Seqs and texts of every block message a viewer gets until `stop`.
fn watch(
    mut v: Client,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Vec<(u64, String, Instant)>> {
    std::thread::spawn(move || {
        let mut got = Vec::new();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            if let server_frame::Frame::Block(b) = v.recv() {
                for m in b.messages {
                    got.push((m.seq, String::from_utf8_lossy(&m.data).into_owned(), Instant::now()));
                }
            }
        }
        got
    })
}

#[test]
fn the_owners_death_moves_its_rooms_and_seqs_and_history_go_on() {
    let redis = Redis::start();
    let mut nodes: Vec<(String, Gateway)> =
        ["a", "b", "c"].iter().map(|id| (id.to_string(), fast_node(&redis, id))).collect();
    for (_, gw) in &nodes {
        eventually("three nodes", || live(gw).len() == 3);
    }
    let room = "fail";
    let owner = owner_of(&nodes[0].1, room);
    let dead = nodes.iter().position(|(id, _)| *id == owner).unwrap();
    let (_, mut killed) = nodes.remove(dead);
    let (x, y) = (&nodes[0].1, &nodes[1].1);
    let viewers: Vec<Client> = [x, y, &killed]
        .iter()
        .map(|gw| {
            let mut v = Client::connect(&gw.url(&format!("?room={room}")), None);
            v.welcome();
            if let tungstenite::stream::MaybeTlsStream::Plain(s) = v.ws.get_mut() {
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            }
            v
        })
        .collect();
    x.wait_online(room, 3);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut viewers = viewers.into_iter();
    let (vx, vy) = (viewers.next().unwrap(), viewers.next().unwrap());
    let (wx, wy) = (watch(vx, stop.clone()), watch(vy, stop.clone()));
    // A steady publisher through a node that does not own the room.
    let publish = |i: u32| x.publish(room, serde_json::json!({"type": "chat", "text": format!("m{i}")})).0;
    let mut accepted = Vec::new();
    for i in 0..20 {
        if publish(i) == 202 {
            accepted.push(i);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(accepted.len(), 20, "all accepted while the owner lives");
    let killed_at = Instant::now();
    sigkill(&mut killed);
    drop(killed);
    let mut i = 20;
    let mut back = None;
    while killed_at.elapsed() < Duration::from_millis(TTL_MS + LEASE_MS + 6_000) {
        if publish(i) == 202 {
            accepted.push(i);
            if back.is_none() {
                back = Some(killed_at.elapsed());
            }
        }
        i += 1;
        if accepted.len() >= 40 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let back = back.expect("publishing works again after the owner died");
    let new_owner = owner_of(x, room);
    assert_ne!(new_owner, owner, "the room has a new owner");
    assert_eq!(owner_of(y, room), new_owner);
    std::thread::sleep(Duration::from_millis(500));
    // Wake the watchers with one more block, then stop them.
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(publish(999), 202);
    let (gx, gy) = (wx.join().unwrap(), wy.join().unwrap());
    for got in [&gx, &gy] {
        let seqs: Vec<u64> = got.iter().map(|(s, _, _)| *s).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "seqs only increase across the move: {seqs:?}");
        let texts: Vec<&str> = got.iter().map(|(_, t, _)| t.as_str()).collect();
        assert!(texts.contains(&"m0") && texts.contains(&"m999"), "before and after the move: {texts:?}");
        // Every message published once the new owner took it arrives live.
        let after: Vec<String> = accepted.iter().filter(|&&i| i >= 20).map(|i| format!("m{i}")).collect();
        for t in &after {
            assert!(texts.contains(&t.as_str()), "{t} accepted after the move reached every member: {texts:?}");
        }
    }
    // The gap (what the dead owner held but had not delivered) is filled by a short poll from
    // the last seq a viewer saw before the kill, on a surviving node: the history goes on from
    // what the old owner stored.
    let before: Vec<&(u64, String, Instant)> = gx.iter().filter(|(_, _, t)| *t < killed_at).collect();
    let (last_before, _, _) = before.last().expect("blocks before the kill");
    let (status, body) =
        http(y.ws, "GET", &format!("/v1/rooms/{room}/messages?after={last_before}&limit=100"), None, &[]);
    assert_eq!(status, 200, "{body}");
    let page: Value = serde_json::from_str(&body).unwrap();
    let polled: Vec<u64> =
        page["messages"].as_array().unwrap().iter().map(|m| m["seq"].as_str().unwrap().parse().unwrap()).collect();
    let live_after: Vec<u64> = gx.iter().filter(|(s, _, _)| s > last_before).map(|(s, _, _)| *s).collect();
    for s in &live_after {
        assert!(polled.contains(s), "the poll holds everything delivered live after the cursor: {s} not in {polled:?}");
    }
    assert!(polled.windows(2).all(|w| w[0] < w[1]));
    // One history across both owners: what the dead one stored, then the new one's.
    let first = gx[0].0;
    let (_, body) = http(y.ws, "GET", &format!("/v1/rooms/{room}/messages?after={first}&limit=100"), None, &[]);
    let page: Value = serde_json::from_str(&body).unwrap();
    let texts: Vec<String> =
        page["messages"].as_array().unwrap().iter().map(|m| m["data"].as_str().unwrap_or("").to_string()).collect();
    let decoded: Vec<String> = texts
        .iter()
        .map(|b64| {
            String::from_utf8(base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64).unwrap()).unwrap()
        })
        .collect();
    assert!(decoded.contains(&"m1".to_string()), "the old owner's messages are still there: {decoded:?}");
    assert!(decoded.contains(&"m999".to_string()), "and the new owner's follow: {decoded:?}");
    // A client of the dead node reconnects to a survivor and resumes after its last seq: the
    // backfill holds what it missed, from the one history.
    let mut resumed = Client::connect(&x.url(&format!("?room={room}&after={last_before}")), None);
    resumed.welcome();
    let backfill = resumed.block();
    let seqs: Vec<u64> = backfill.messages.iter().map(|m| m.seq).collect();
    assert!(!backfill.truncated && seqs.first().is_some_and(|s| s > last_before), "{seqs:?}");
    assert!(backfill.messages.iter().any(|m| m.data == b"m999"), "up to the newest");
    // The room came back within the bound: the dead node's heartbeat and lease run out.
    assert!(back < Duration::from_millis(TTL_MS + LEASE_MS + 3_000), "publishing came back after {back:?}");
    eprintln!("owner {owner} killed; {new_owner} took the room; publishing back after {back:?}");
}

#[test]
fn a_redis_restart_is_survived_without_restarting_any_node() {
    let mut redis = Redis::start();
    let (a, b, c) = three(&redis);
    let room = "rr";
    let owner = owner_of(&a, room);
    let nodes = [("a", &a), ("b", &b), ("c", &c)];
    let owner_gw = nodes.iter().find(|(id, _)| *id == owner).unwrap().1;
    let other = nodes.iter().find(|(id, _)| *id != owner).unwrap().1;
    let mut viewers: Vec<Client> = [&a, &b, &c]
        .iter()
        .map(|gw| {
            let mut v = Client::connect(&gw.url(&format!("?room={room}")), None);
            v.welcome();
            if let tungstenite::stream::MaybeTlsStream::Plain(s) = v.ws.get_mut() {
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            }
            v
        })
        .collect();
    a.wait_online(room, 3);
    assert_eq!(other.publish(room, serde_json::json!({"text": "before"})).0, 202);
    let mut last = Vec::new();
    for v in &mut viewers {
        let b = v.block();
        assert_eq!(b.messages[0].data, b"before");
        last.push(b.messages[0].seq);
    }

    redis.kill();
    // Redis away: the owner's own members still get its blocks.
    eventually("the link notices", || owner_gw.metric("barrage_cluster_link_up") == 0);
    assert_eq!(owner_gw.publish(room, serde_json::json!({"text": "during"})).0, 202);
    let local = nodes.iter().position(|(id, _)| *id == owner).unwrap();
    let during = viewers[local].block();
    assert_eq!(during.messages[0].data, b"during");
    last[local] = during.messages[0].seq;

    redis.restart();
    for gw in [&a, &b, &c] {
        eventually("the link is back", || gw.metric("barrage_cluster_link_up") == 1);
        eventually("the set is whole again", || live(gw).len() == 3);
    }
    // Publishing through a node that does not own the room reaches every node again (the
    // room channels were subscribed anew; the lease was taken again).
    let mut n = 0;
    eventually("blocks cross the nodes again", || {
        n += 1;
        other.publish(room, serde_json::json!({"text": format!("after {n}")})).0 == 202
    });
    for (i, v) in viewers.iter_mut().enumerate() {
        loop {
            let block = v.block();
            let seq = block.messages.last().unwrap().seq;
            assert!(seq > last[i], "seqs go on increasing: {seq} after {}", last[i]);
            last[i] = seq;
            if block.messages.iter().any(|m| m.data.starts_with(b"after")) {
                break;
            }
        }
    }
    assert!(a.metric("barrage_cluster_link_errors_total") > 0, "the outage was seen");
}

#[test]
fn attributes_presence_and_short_polls_span_the_nodes() {
    use barrage::proto::{AttrSync, client_frame};
    let redis = Redis::start();
    let (a, b, c) = three(&redis);
    let room = "attrs";
    let owner = owner_of(&a, room);
    let nodes = [("a", &a), ("b", &b), ("c", &c)];
    let others: Vec<&Gateway> = nodes.iter().filter(|(id, _)| *id != owner).map(|(_, g)| *g).collect();
    let (x, y) = (others[0], others[1]);
    // An attribute set through one node that does not own the room...
    let (s, body) = http(y.api, "PUT", &format!("/v1/rooms/{room}/attributes/score"), Some(r#"{"value":"1:0"}"#), &[]);
    assert_eq!(s, 200, "{body}");
    // ...is in the snapshot a joiner on another such node gets, and in the API of every node.
    let mut v = Client::connect(&x.url(&format!("?room={room}")), None);
    v.welcome();
    let snapshot = match v.recv() {
        server_frame::Frame::Attrs(s) => s,
        other => panic!("expected the snapshot, got {other:?}"),
    };
    assert!(snapshot.snapshot && snapshot.entries.iter().any(|e| e.key == "score" && e.value == b"1:0"));
    for (_, gw) in &nodes {
        let (_, attrs) = http(gw.api, "GET", &format!("/v1/rooms/{room}/attributes"), None, &[]);
        assert!(attrs.contains("1:0"), "{attrs}");
    }
    // A change reaches it as a delta from the owner, and an attribute sync is answered across.
    let (s, _) = http(x.api, "PUT", &format!("/v1/rooms/{room}/attributes/score"), Some(r#"{"value":"2:0"}"#), &[]);
    assert_eq!(s, 200);
    let delta = loop {
        match v.recv() {
            server_frame::Frame::Attrs(d) if d.version > snapshot.version => break d,
            _ => continue,
        }
    };
    assert!(!delta.snapshot && delta.entries.iter().any(|e| e.value == b"2:0"));
    v.send(client_frame::Frame::AttrSync(AttrSync { room: String::new(), after_version: snapshot.version }));
    loop {
        if let server_frame::Frame::Attrs(d) = v.recv() {
            assert!(d.entries.iter().any(|e| e.value == b"2:0"), "{d:?}");
            break;
        }
    }
    // A short poll on any node's public listener reads the owner's history.
    assert_eq!(y.publish(room, serde_json::json!({"text": "polled"})).0, 202);
    let seq = loop {
        if let server_frame::Frame::Block(b) = v.recv() {
            break b.messages[0].seq;
        }
    };
    for (_, gw) in &nodes {
        let (status, page) = http(gw.ws, "GET", &format!("/v1/rooms/{room}/messages?after={}", seq - 1), None, &[]);
        assert_eq!(status, 200, "{page}");
        let page: Value = serde_json::from_str(&page).unwrap();
        assert_eq!(page["messages"][0]["seq"], seq.to_string(), "{page}");
    }
    // Leaving on one node is counted by the owner: every node reads the sum.
    let mut w = Client::connect(&y.url(&format!("?room={room}")), None);
    w.welcome();
    a.wait_online(room, 2);
    drop(w);
    for (_, gw) in &nodes {
        gw.wait_online(room, 1);
    }
}

/// A room whose owner is `first` while `first`, `b` and `c` live, and `c` once `first` is gone.
fn room_moving(first: &str, b: &str, c: &str) -> String {
    use barrage::cluster::members::Members;
    let set = |ids: &[&str]| Members::read("t", ids.iter().map(|id| (id.to_string(), 2, None)).collect(), 1);
    let (all, after) = (set(&[first, b, c]), set(&[b, c]));
    (0..10_000)
        .map(|i| format!("move{i}"))
        .find(|r| all.owner_of(r).is_some_and(|n| n.id == first) && after.owner_of(r).is_some_and(|n| n.id == c))
        .expect("some room moves from the first node to c")
}

/// Nodes see a death at different times. Here b sees it seconds before c, the room's next
/// owner, so b reports its member to c while c still routes the room to the dead node: that
/// report is lost, and only c's own change of view (it asks every node to report again) lets
/// c learn of b's member and send the room's blocks its way.
#[test]
fn members_reported_while_the_views_differ_are_reported_again() {
    let redis = Redis::start();
    let a = fast_node(&redis, "a");
    let b = fast_node(&redis, "b");
    // c reads the set every 6 s: it sees a's death long after b does.
    let (url, lease) = (redis.url(), LEASE_MS.to_string());
    let mut c = Gateway::start(&[
        "--redis",
        &url,
        "--cluster",
        "true",
        "--cluster-node-id",
        "c",
        "--cluster-heartbeat-ms",
        "6000",
        "--cluster-node-ttl-ms",
        "12000",
        "--cluster-lease-ms",
        &lease,
    ]);
    for gw in [&a, &b, &c] {
        eventually("three nodes", || live(gw).len() == 3);
    }
    let room = room_moving("a", "b", "c");
    assert_eq!(owner_of(&b, &room), "a");
    let mut viewer = Client::connect(&b.url(&format!("?room={room}")), None);
    viewer.welcome();
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = viewer.ws.get_mut() {
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    }
    b.wait_online(&room, 1);
    // Kill a just after c read the set: c's next read is 6 s away, b's 200 ms.
    let as_of = |gw: &Gateway| cluster(gw)["as_of_ms"].as_i64().unwrap();
    let read = as_of(&c);
    eventually("c reads the set again", || as_of(&c) != read);
    let mut a = a;
    sigkill(&mut a);
    drop(a);
    eventually("b sees a gone", || live(&b) == set(&["b", "c"]));
    assert!(live(&c).contains("a"), "c still counts a: the views differ");
    // Once c takes the room, a publish through b reaches b's member.
    let deadline = Instant::now() + Duration::from_secs(20);
    while b.publish(&room, serde_json::json!({"text": "moved"})).0 != 202 {
        assert!(Instant::now() < deadline, "publishing never came back");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(owner_of(&b, &room), "c");
    // (A member that never reached c's count would wait out the read timeout here.)
    let got = loop {
        if let server_frame::Frame::Block(b) = viewer.recv() {
            break b;
        }
    };
    assert_eq!(got.messages.last().map(|m| m.data.as_slice()), Some(&b"moved"[..]), "b's member gets c's block");
    assert!(c.metric("barrage_cluster_resyncs_total{way=\"out\"}") >= 1, "c announced its change of view");
    assert!(b.metric("barrage_cluster_resyncs_total{way=\"in\"}") >= 1, "b heard it and reported again");
    assert!(c.terminate());
}

/// One command on a connection the test keeps (Redis may refuse new ones meanwhile).
fn command(con: &mut std::net::TcpStream, args: &[&str]) -> String {
    use std::io::{Read, Write};
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    con.write_all(req.as_bytes()).unwrap();
    let mut buf = vec![0u8; 1 << 16];
    let n = con.read(&mut buf).unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Pub/sub loses what is published while a subscriber is away. A node whose subscriber comes
/// back asks every node to report its members again: here a member joined on b while a, the
/// room's owner, could not subscribe, so b's report to a was lost.
#[test]
fn a_subscriber_back_from_a_break_has_every_node_report_again() {
    let redis = Redis::start();
    let quick = ["--redis-reconnect-max-ms", "100"];
    let (a, b) = (node_with(&redis, "a", &quick), node_with(&redis, "b", &quick));
    for gw in [&a, &b] {
        eventually("two nodes", || live(gw).len() == 2);
    }
    let room = (0..).map(|i| format!("sub{i}")).find(|r| owner_of(&a, r) == "a").unwrap();
    let mut control = std::net::TcpStream::connect(("127.0.0.1", redis.port)).unwrap();
    control.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // Both links' subscribers are cut, and Redis takes no new connection for a while.
    let info = command(&mut control, &["INFO", "clients"]);
    let clients: usize = info
        .lines()
        .find_map(|l| l.strip_prefix("connected_clients:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("connected_clients");
    let subscribers = command(&mut control, &["CLIENT", "LIST", "TYPE", "pubsub"]).matches("id=").count();
    assert_eq!(subscribers, 2, "one subscriber per node");
    let cap = (clients - subscribers).to_string();
    assert!(command(&mut control, &["CONFIG", "SET", "maxclients", &cap]).starts_with("+OK"));
    assert!(command(&mut control, &["CLIENT", "KILL", "TYPE", "pubsub"]).starts_with(":2"));
    for gw in [&a, &b] {
        eventually("the link sees the break", || gw.metric("barrage_cluster_link_up") == 0);
    }
    // A member joins on b: b's report to a is published while nobody listens on a's channel.
    let relayed = b.metric("barrage_cluster_relayed_total");
    let mut viewer = Client::connect(&b.url(&format!("?room={room}")), None);
    viewer.welcome();
    eventually("b sent its report", || b.metric("barrage_cluster_relayed_total") > relayed);
    let (_, body) = http(a.api, "GET", &format!("/v1/rooms/{room}"), None, &[]);
    assert!(body.contains(r#""online":0"#), "a never heard of b's member: {body}");
    // Redis takes connections again: both subscribe anew and everyone reports again.
    assert!(command(&mut control, &["CONFIG", "SET", "maxclients", "10000"]).starts_with("+OK"));
    for gw in [&a, &b] {
        eventually("the link is back", || gw.metric("barrage_cluster_link_up") == 1);
    }
    a.wait_online(&room, 1);
    assert!(a.metric("barrage_cluster_resyncs_total{way=\"out\"}") >= 1);
    assert!(b.metric("barrage_cluster_resyncs_total{way=\"in\"}") >= 1);
    // And the owner's blocks go b's way again.
    assert_eq!(a.publish(&room, serde_json::json!({"text": "back"})).0, 202);
    let got = loop {
        if let server_frame::Frame::Block(blk) = viewer.recv() {
            break blk;
        }
    };
    assert_eq!(got.messages.last().map(|m| m.data.as_slice()), Some(&b"back"[..]));
}

/// A subscriber Redis refuses (here: a user that may publish but not subscribe) is not taken
/// for a working link: an error reply leaves the connection open but deaf, so it is closed,
/// counted and tried again.
#[test]
fn a_refused_subscriber_is_not_a_working_link() {
    let redis = Redis::start();
    let mut control = std::net::TcpStream::connect(("127.0.0.1", redis.port)).unwrap();
    control.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let acl = ["ACL", "SETUSER", "edge", "on", ">pw", "~*", "&*", "+@all", "-subscribe"];
    assert!(command(&mut control, &acl).starts_with("+OK"));
    let url = format!("redis://edge:pw@127.0.0.1:{}", redis.port);
    let a = Gateway::start(&["--redis", &url, "--cluster", "true", "--cluster-node-id", "a"]);
    eventually("the refusals are counted", || a.metric("barrage_cluster_link_errors_total") >= 2);
    assert_eq!(a.metric("barrage_cluster_link_up"), 0);
    eventually("the heartbeat works: only the subscriber is refused", || live(&a).len() == 1);
}

/// Bans are enforced where a user joins, from each node's replicas of the owners' lists. A
/// node that joins the cluster after a ban learns it too (the owners replicate again when a
/// node's view of the cluster changes or its subscriber comes back).
#[test]
fn a_node_that_joins_later_refuses_users_banned_before() {
    let redis = Redis::start();
    let (a, b) = (node(&redis, "a"), node(&redis, "b"));
    for gw in [&a, &b] {
        eventually("two nodes", || live(gw).len() == 2);
    }
    // A room that stays where it is when c joins (a room moving to c is loaded there, lists
    // and all).
    let three = barrage::cluster::members::Members::read(
        "t",
        ["a", "b", "c"].iter().map(|id| (id.to_string(), 2, None)).collect(),
        1,
    );
    let room = &(0..).map(|i| format!("banned{i}")).find(|r| three.owner_of(r).is_some_and(|n| n.id != "c")).unwrap();
    let owner = owner_of(&a, room);
    let owner_gw = if owner == "a" { &a } else { &b };
    let (s, body) = http(owner_gw.api, "POST", &format!("/v1/rooms/{room}/bans"), Some(r#"{"user":"mallory"}"#), &[]);
    assert_eq!(s, 200, "{body}");
    let c = node(&redis, "c");
    for gw in [&a, &b, &c] {
        eventually("three nodes", || live(gw).len() == 3);
    }
    let url = c.url(&format!("?room={room}&token={}", common::token("mallory")));
    eventually("c refuses the banned user", || {
        let mut m = Client::connect(&url, None);
        m.welcome();
        match m.recv() {
            server_frame::Frame::Error(e) => e.code == 403,
            _ => false,
        }
    });
    // Others still join there.
    let mut ok = Client::connect(&c.url(&format!("?room={room}&token={}", common::token("trent"))), None);
    ok.welcome();
    c.wait_online(room, 1);
}
