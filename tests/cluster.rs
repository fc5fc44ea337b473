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
    Gateway::start(&[
        "--redis",
        &redis.url(),
        "--cluster",
        "true",
        "--cluster-node-id",
        id,
        "--cluster-heartbeat-ms",
        "200",
        "--cluster-node-ttl-ms",
        &TTL_MS.to_string(),
    ])
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
    // Exactly one node runs the room: one lease, and frames went out from one owner.
    let leases: u64 = [&a, &b, &c].iter().map(|g| g.metric("barrage_cluster_leases")).sum();
    assert!(leases >= 1);
    let owners = [&a, &b, &c].iter().filter(|g| g.metric("barrage_cluster_frames_total{way=\"out\"}") > 0).count();
    assert_eq!(owners, 1, "one owner published the room's frames");
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
    alice.send(client_frame::Frame::Send(Send { r#type: "chat".into(), data: b"hi from x".to_vec() }));
    for v in [&mut alice, &mut bob, &mut carol] {
        let b = v.block();
        assert_eq!((b.messages[0].sender.as_str(), &b.messages[0].data[..]), ("alice", &b"hi from x"[..]));
    }
    // A mute set through one node is enforced by the owner: the refusal comes back across.
    let (s, body) = http(y.api, "POST", &format!("/v1/rooms/{room}/mutes"), Some(r#"{"user":"alice"}"#), &[]);
    assert_eq!(s, 200, "{body}");
    alice.send(client_frame::Frame::Send(Send { r#type: "chat".into(), data: b"muted".to_vec() }));
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
