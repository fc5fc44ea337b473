//! A gateway stopped in the middle of a heavy fan-out, over real loopback sockets, in-process so
//! that each shard's exit report can be read: every operation still on a shard's rings at stop
//! — sends to viewers that stopped reading among them — is cancelled and finished before the
//! frames those sends point at are freed.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use barrage::config::Config;
use barrage::gateway::Gateway;
use socket2::{Domain, Socket, Type};

/// A viewer that upgrades into `room`, reads the 101 answer, then never reads again, with a
/// small receive buffer so the server's sends to it stall quickly.
fn stalled_viewer(ws: SocketAddr, room: &str) -> TcpStream {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.set_recv_buffer_size(4096).unwrap();
    s.connect(&ws.into()).unwrap();
    let mut s: TcpStream = s.into();
    let request = format!(
        "GET /ws?room={room} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(request.as_bytes()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).unwrap(), 1, "the upgrade was answered");
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    s
}

#[test]
fn a_shard_stopped_under_fan_out_finishes_its_sends_before_freeing_frames() {
    let mut c = Config::default();
    c.server.listen = "127.0.0.1:0".parse().unwrap();
    c.api.listen = "127.0.0.1:0".parse().unwrap();
    c.server.shards = 2;
    c.server.pin_cores = false;
    c.server.connections_max = 2_000;
    c.server.send_queue_frames_max = 64;
    // The close handshake would outlast the grace: the shards end with their sends pending.
    c.websocket.close_timeout_ms = 30_000;
    c.server.stop_grace_ms = 300;
    let r = &mut c.rooms;
    r.block_interval_ms = 10;
    r.block_messages_max = 1_000;
    r.pending_messages_max = 100_000;
    r.room_rate_per_s = 0;
    let mut gw = Gateway::start(&c).expect("the gateway starts");
    let viewers: Vec<TcpStream> = (0..200).map(|_| stalled_viewer(gw.public_addr, "big")).collect();
    // Blocks of 4 KiB messages until the viewers' sockets are full and sends wait on them.
    let text = "x".repeat(4_000);
    let body = serde_json::json!({"type": "gift", "text": text}).to_string();
    let until = Instant::now() + Duration::from_secs(30);
    let mut published = 0;
    let in_flight = || {
        let (_, text) = common::http(gw.api_addr, "GET", "/metrics", None, &[]);
        text.lines()
            .filter(|l| l.starts_with("barrage_sends_in_flight{"))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok())
            .sum::<u64>()
    };
    while in_flight() < 150 {
        assert!(Instant::now() < until, "the viewers' sockets never filled ({published} published)");
        for _ in 0..50 {
            let (status, answer) = common::http(gw.api_addr, "POST", "/v1/rooms/big/messages", Some(&body), &[]);
            assert_eq!(status, 202, "{answer}");
            published += 1;
        }
    }
    let exits = gw.stop();
    drop(viewers);
    println!("{published} blocks published; shard exits: {exits:?}");
    assert_eq!(exits.len(), 2, "both shards reported");
    assert!(exits.iter().all(|e| e.finished), "every operation finished before memory was freed: {exits:?}");
    let sends: usize = exits.iter().map(|e| e.sends_awaited).sum();
    let ops: usize = exits.iter().map(|e| e.ops_awaited).sum();
    assert!(sends > 0, "sends were in flight at stop ({published} published): {exits:?}");
    assert!(ops >= sends + 200, "and every viewer's input request too: {exits:?}");
}
