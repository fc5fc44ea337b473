//! The io_uring paths that default settings rarely reach, over real loopback sockets: a shard
//! driving many rings (tiny direct-descriptor tables), a provided-buffer ring that runs dry
//! (multishot receive re-armed), and a submission queue smaller than one fan-out.
mod common;

use barrage::proto::{Send, client_frame};
use common::{Client, Gateway, eventually, token};
use serde_json::json;

#[test]
fn many_rings_per_shard_in_poll_mode() {
    many_rings("poll");
}

#[test]
fn many_rings_per_shard_in_recv_mode() {
    many_rings("recv");
}

#[test]
fn dry_buffers_and_small_queue_in_poll_mode() {
    dry_buffers_and_small_queue("poll");
}

#[test]
fn dry_buffers_and_small_queue_in_recv_mode() {
    dry_buffers_and_small_queue("recv");
}

fn many_rings(mode: &str) {
    // 16 slots per ring (accept moves on with 2 left): 60 connections per shard need 5 rings.
    let gw =
        Gateway::start(&["--ring-files-max", "16", "--ring-entries", "64", "--recv-buffers", "8", "--read-mode", mode]);
    let mut clients: Vec<Client> = (0..120).map(|_| Client::connect(&gw.url("?room=rings"), None)).collect();
    for c in &mut clients {
        c.welcome();
    }
    gw.wait_online("rings", 120);
    eventually("several rings per shard", || gw.metric("barrage_rings") >= 8);
    gw.publish("rings", json!({"text": "to every ring"}));
    for c in &mut clients {
        assert_eq!(c.block().messages[0].data, b"to every ring");
    }
    // Closing frees slots; new connections still get in and are served.
    clients.truncate(10);
    gw.wait_online("rings", 10);
    let mut late: Vec<Client> = (0..40).map(|_| Client::connect(&gw.url("?room=rings"), None)).collect();
    for c in &mut late {
        c.welcome();
        // History first: the room's last messages as a backfill block.
        let backfill = c.block();
        assert!(backfill.backfill);
        assert_eq!(backfill.messages[0].data, b"to every ring");
    }
    gw.wait_online("rings", 50);
    gw.publish("rings", json!({"text": "again"}));
    for c in clients.iter_mut().chain(late.iter_mut()) {
        assert_eq!(c.block().messages[0].data, b"again");
    }
}

fn dry_buffers_and_small_queue(mode: &str) {
    // 8 receive buffers of 256 bytes per ring, 64 SQ entries: 60 clients sending at once
    // exhaust both, and every message must still arrive.
    let gw = Gateway::start(&[
        "--shards",
        "1",
        "--ring-entries",
        "64",
        "--recv-buffers",
        "8",
        "--recv-buffer-bytes",
        "256",
        "--block-interval-ms",
        "200",
        "--block-messages-max",
        "1000",
        "--read-mode",
        mode,
    ]);
    let mut clients: Vec<Client> = (0..60)
        .map(|i| Client::connect(&gw.url(&format!("?room=dry&token={}", token(&format!("u{i}")))), None))
        .collect();
    for c in &mut clients {
        c.welcome();
    }
    gw.wait_online("dry", 60);
    for (i, c) in clients.iter_mut().enumerate() {
        // 4000 bytes in one frame: more than the whole buffer ring (8 x 256).
        let data = format!("{i:03}-{}", "x".repeat(3996)).into_bytes();
        c.send(client_frame::Frame::Send(Send { r#type: "chat".into(), data, ..Default::default() }));
    }
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 60 {
        for m in clients[0].block().messages {
            seen.insert(String::from_utf8(m.data[..3].to_vec()).unwrap());
        }
    }
    assert_eq!(seen.len(), 60);
    if mode == "recv" {
        // A multishot receive takes buffers as bytes arrive: one 4000-byte frame empties the
        // ring, so the re-arm path must have run. (A poll-mode read holds one buffer at a time.)
        eventually("ring ran dry", || gw.metric("barrage_recv_buffer_exhausted_total") > 0);
    }
}
