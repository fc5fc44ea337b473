//! Hub-level tests through the public API: the calls a driver makes, with the mail between
//! hubs carried by hand (or by a real `Mesh` where an inbox must fill up).
use std::collections::HashMap;
use std::sync::mpsc::{Receiver, sync_channel};

use prost::Message as _;

use super::mail::{Origin, OwnerMail, Reply};
use super::*;
use crate::ids::{UnixMs, UserId};
use crate::proto::{ClientFrame, Join, Message, Send, ServerFrame, client_frame, server_frame};
use crate::room::moderation::{List, ModerationError};
use crate::room::owner::{self, ModAction};
use crate::room::{Priority, RoomName};
use crate::shard::mesh::Mesh;
use crate::wire::frame::{Opcode, decode_header, masked_frame};

const SECRET: &str = "hub-test-secret-0123456789abcdef";

fn at(ms: u64) -> Now {
    Now { ms, unix: UnixMs(1_795_000_000_000 + ms as i64) }
}

fn config(edit: impl FnOnce(&mut Config)) -> Config {
    let mut c = Config::default();
    c.auth.jwt_secret = SECRET.into();
    edit(&mut c);
    c
}

fn hub(c: &Config, shard: u16, shards: usize) -> Hub {
    Hub::new(HubConfig::new(c, ShardId(shard), shards))
}

/// A room name that shard `owner` of `shards` owns.
fn room_owned_by(owner: u16, shards: usize, tag: &str) -> RoomName {
    (0..)
        .map(|i| RoomName::parse(&format!("{tag}{i}"), 64).unwrap())
        .find(|r| r.owner(shards) == ShardId(owner))
        .unwrap()
}

fn token(user: &str) -> String {
    let exp = 1_795_000_000 + 86_400;
    crate::auth::sign_hs256(SECRET.as_bytes(), &serde_json::json!({"sub": user, "exp": exp, "send": true}))
}

/// A new connection that sends `request` as its first bytes.
fn connect(h: &mut Hub, request: &str, now: Now) -> ConnKey {
    let key = h.handle_accept(0, None, now).expect("room for a connection");
    h.handle_recv(key, &mut request.as_bytes().to_vec(), now);
    key
}

fn upgrade(h: &mut Hub, user: &str, room: &RoomName, now: Now) -> ConnKey {
    let request = format!(
        "GET /ws?room={room}&token={} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        token(user)
    );
    connect(h, &request, now)
}

fn poll(h: &mut Hub, room: &RoomName, now: Now) -> ConnKey {
    connect(h, &format!("GET /v1/rooms/{room}/messages?after=0 HTTP/1.1\r\nHost: x\r\n\r\n"), now)
}

/// A client frame as a client sends it (masked, binary protobuf).
fn client_frame(h: &mut Hub, key: ConnKey, frame: client_frame::Frame, now: Now) {
    let payload = ClientFrame { frame: Some(frame) }.encode_to_vec();
    let mut bytes = Vec::new();
    masked_frame(true, Opcode::Binary as u8, &payload, [1, 2, 3, 4], &mut bytes);
    h.handle_recv(key, &mut bytes, now);
}

/// Writes everything the hub wants sent, as fast readers take it: bytes per connection.
fn drain_sends(h: &mut Hub, out: &mut HashMap<ConnKey, Vec<u8>>, now: Now) {
    while let Some(key) = h.poll_ready() {
        let mut iov = [std::io::IoSlice::new(&[]); 16];
        let n = h.poll_send(key, &mut iov);
        let bytes: Vec<u8> = iov[..n].iter().flat_map(|s| s.iter().copied()).collect();
        let written = bytes.len() as i32;
        out.entry(key).or_default().extend(bytes);
        if n > 0 {
            h.handle_sent(key, written, now);
        }
    }
}

/// The server frames in `bytes` after the HTTP head.
fn server_frames(bytes: &[u8]) -> Vec<server_frame::Frame> {
    let mut rest = match bytes.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => &bytes[i + 4..],
        None => bytes,
    };
    let mut frames = Vec::new();
    while let Ok(Some(h)) = decode_header(rest) {
        let end = h.header_len + h.payload_len as usize;
        if h.opcode == Opcode::Binary {
            frames.push(ServerFrame::decode(&rest[h.header_len..end]).unwrap().frame.unwrap());
        }
        rest = &rest[end..];
    }
    frames
}

/// Carries every mail `from` posts to `to` (its inbox never full).
fn carry(from: &mut Hub, to: &mut Hub, now: Now) {
    let mut mail = Vec::new();
    from.flush_mail(&mut |_, m| {
        mail.push(m);
        Ok(())
    });
    for m in mail {
        to.handle_mail(m, now);
    }
}

fn publish(h: &mut Hub, room: &RoomName, now: Now) -> Receiver<Result<owner::Published, owner::PublishError>> {
    let (tx, rx) = sync_channel(1);
    let msg = Box::new(Message { r#type: "notice".into(), data: b"x".to_vec(), ..Message::default() });
    let mail = OwnerMail::Publish { room: room.clone(), msg, priority: Some(Priority::Whitelist), reply: Reply(tx) };
    h.handle_mail(mail.into(), now);
    rx
}

#[test]
fn a_saturated_shard_defers_blocks_up_to_the_max_wait() {
    let c = config(|c| {
        c.rooms.block_interval_ms = 100;
        c.rooms.block_wait_max_ms = 300;
    });
    let mut h = hub(&c, 0, 1);
    let r = RoomName::parse("r", 64).unwrap();
    publish(&mut h, &r, at(0));
    h.handle_load(900);
    h.handle_timeout(at(100));
    let blocks = |h: &Hub| h.counters().get(Series::BlocksCut);
    assert_eq!(blocks(&h), 0, "busy: the block waits");
    assert!(h.poll_timeout(at(100)) <= 5, "and looks again soon");
    publish(&mut h, &r, at(150));
    h.handle_timeout(at(250));
    assert_eq!(blocks(&h), 0);
    assert!(h.counters().get(Series::BlocksDeferred) >= 2);
    h.handle_timeout(at(400));
    assert_eq!(blocks(&h), 1, "overdue by block_wait_max_ms: cut anyway, both messages in it");
    assert_eq!(h.counters().get(Series::MessagesOut), 2);
    // Idle again: the next block goes out on time.
    h.handle_load(100);
    publish(&mut h, &r, at(410));
    let due = 410 + h.poll_timeout(at(410));
    assert!(due <= 500, "the next tick is due by the interval, not later: {due}");
    h.handle_timeout(at(due));
    assert_eq!(blocks(&h), 2);
}

#[test]
fn a_zero_wait_never_defers() {
    let c = config(|c| {
        c.rooms.block_interval_ms = 100;
        c.rooms.block_wait_max_ms = 0;
    });
    let mut h = hub(&c, 0, 1);
    publish(&mut h, &RoomName::parse("r", 64).unwrap(), at(0));
    h.handle_load(1000);
    h.handle_timeout(at(100));
    assert_eq!(h.counters().get(Series::BlocksCut), 1);
    assert_eq!(h.counters().get(Series::BlocksDeferred), 0);
}

/// The slot-reuse misdelivery: a short poll's answer arrives after its connection ended and a
/// new connection took the same slot. It must be dropped (and counted), not answer the new one.
#[test]
fn a_late_answer_never_reaches_the_connection_that_took_the_slot() {
    let c = config(|_| {});
    let (mut h0, mut h1) = (hub(&c, 0, 2), hub(&c, 1, 2));
    let (first_room, second_room) = (room_owned_by(1, 2, "first"), room_owned_by(1, 2, "second"));
    let now = at(0);
    let a = poll(&mut h0, &first_room, now);
    let mut to_owner = Vec::new();
    h0.flush_mail(&mut |_, m| {
        to_owner.push(m);
        Ok(())
    });
    // The poller gives up before the owner answers; the driver releases the connection.
    h0.handle_eof(a, now);
    assert_eq!(h0.poll_close(), Some((a, Teardown::Fin)), "the peer left: an orderly close");
    h0.release(a);
    // A new connection takes the same slot and polls another room.
    let b = poll(&mut h0, &second_room, now);
    assert_eq!(b, a, "the slab hands out the freed slot first: the case under test");
    h0.flush_mail(&mut |_, m| {
        to_owner.push(m);
        Ok(())
    });
    // The owner answers both, the old poll first.
    give_history(&mut h1, &first_room, now);
    for m in to_owner {
        h1.handle_mail(m, now);
    }
    carry(&mut h1, &mut h0, now);
    let mut out = HashMap::new();
    drain_sends(&mut h0, &mut out, now);
    let answer = String::from_utf8_lossy(&out[&b]).to_string();
    assert!(answer.contains("200 OK") && answer.contains("\"messages\":[]"), "b got its own answer: {answer}");
    assert_eq!(answer.matches("HTTP/1.1").count(), 1, "and only its own: {answer}");
    assert_eq!(h0.counters().get(Series::ReplyConnGone), 1, "the stale answer was dropped and counted");
}

/// Gives a room history, so a stale answer is told apart from a fresh one.
fn give_history(h: &mut Hub, room: &RoomName, now: Now) {
    publish(h, room, now);
    h.handle_timeout(at(now.ms + 2_000));
}

/// Bans and kicks for a shard whose inbox is full wait in the post office; none is lost, and
/// the ones taken on before the way was congested are all enforced once it drains.
#[test]
fn with_an_inbox_full_no_kick_or_ban_replica_is_lost() {
    let c = config(|c| c.server.mesh_overflow_max = 8);
    let (mut owner, mut host) = (hub(&c, 0, 2), hub(&c, 1, 2));
    let mesh = Mesh::new(2, 2).unwrap();
    let room = room_owned_by(0, 2, "live");
    let mut now = at(0);
    // Twenty viewers on the host shard, in a room the other shard owns.
    let users: Vec<String> = (0..20).map(|i| format!("viewer{i}")).collect();
    let keys: Vec<ConnKey> = users.iter().map(|u| upgrade(&mut host, u, &room, now)).collect();
    let mut out = HashMap::new();
    drain_sends(&mut host, &mut out, now);
    // The API bans every one of them; the host shard reads nothing meanwhile (its inbox of 2
    // fills at once), so replicas and kicks pile up at the owner.
    let mut answers = Vec::new();
    for (turn, user) in users.iter().enumerate() {
        now = at(turn as u64);
        let (tx, rx) = sync_channel(1);
        let ban = OwnerMail::Moderate {
            room: room.clone(),
            user: UserId::new(user),
            action: ModAction::Ban { until_ms: None },
            reason: "spam".into(),
            origin: Origin::Api(Reply(tx)),
        };
        owner.handle_mail(ban.into(), now);
        answers.push(rx.try_recv().expect("answered at once"));
        owner.flush_mail(&mut |to, m| mesh.send(to, m));
    }
    let accepted: Vec<usize> = (0..users.len()).filter(|&i| answers[i].is_ok()).collect();
    let busy = answers.iter().filter(|a| **a == Err(ModerationError::Busy)).count();
    assert!(accepted.len() >= 4, "bans are taken on until the way is congested: {answers:?}");
    assert_eq!(accepted.len() + busy, users.len(), "the rest are refused as busy (503), not lost: {answers:?}");
    assert!(busy > 0, "the way became congested");
    assert!(owner.counters().get(Series::MeshWaiting) >= 8, "mail waits in the overflow");
    assert_eq!(owner.counters().get(Series::MeshFull), 0, "control mail is never shed");
    // The host shard wakes up and reads its inbox every turn; the owner keeps offering.
    for turn in 0..100 {
        now = at(100 + turn);
        while let Some(m) = mesh.inbox(ShardId(1)).pop() {
            host.handle_mail(m, now);
        }
        owner.flush_mail(&mut |to, m| mesh.send(to, m));
    }
    assert_eq!(owner.counters().get(Series::MeshWaiting), 0, "drained");
    drain_sends(&mut host, &mut out, now);
    for &i in &accepted {
        let frames = server_frames(&out[&keys[i]]);
        assert!(
            frames.iter().any(|f| matches!(f, server_frame::Frame::Kicked(_))),
            "{} was banned: the kick reached its shard",
            users[i]
        );
        // The replica holds: the banned user cannot come back.
        let again = upgrade(&mut host, &users[i], &room, now);
        let mut out2 = HashMap::new();
        drain_sends(&mut host, &mut out2, now);
        let refused =
            server_frames(&out2[&again]).iter().any(|f| matches!(f, server_frame::Frame::Error(e) if e.code == 403));
        assert!(refused, "{}'s ban was replicated", users[i]);
    }
}

/// While the way to a room's owner is congested, a client's request for that room is refused
/// at once with 503 (and counted) instead of adding to the overflow.
#[test]
fn a_congested_way_refuses_new_requests_from_clients() {
    let c = config(|c| c.server.mesh_overflow_max = 1);
    let mut host = hub(&c, 1, 2);
    let room = room_owned_by(0, 2, "busy");
    let now = at(0);
    let key = upgrade(&mut host, "alice", &room, now);
    // The owner's inbox refuses everything: the join report stays, the way is congested.
    host.flush_mail(&mut |_, m| Err(m));
    client_frame(
        &mut host,
        key,
        client_frame::Frame::Send(Send { r#type: "chat".into(), data: b"hi".to_vec(), ..Default::default() }),
        now,
    );
    client_frame(
        &mut host,
        key,
        client_frame::Frame::Join(Join { room: room_owned_by(0, 2, "other").to_string(), ..Join::default() }),
        now,
    );
    let mut out = HashMap::new();
    drain_sends(&mut host, &mut out, now);
    let refusals = server_frames(&out[&key])
        .into_iter()
        .filter(|f| matches!(f, server_frame::Frame::Error(e) if e.code == 503))
        .count();
    assert_eq!(refusals, 2, "the send and the join's backfill request were refused");
    assert_eq!(host.counters().get(Series::MeshRefused), 2);
}

/// A chat line (low priority: shed first from a full send queue).
fn publish_low(h: &mut Hub, room: &RoomName, now: Now) {
    let (tx, _rx) = sync_channel(1);
    let msg = Box::new(Message { r#type: "chat".into(), data: vec![b'x'; 100], ..Message::default() });
    let mail = OwnerMail::Publish { room: room.clone(), msg, priority: Some(Priority::Low), reply: Reply(tx) };
    h.handle_mail(mail.into(), now);
}

/// A member whose first send never completes (the peer stopped reading with its socket full)
/// while a block is cut every 100 ms; returns how the hub closes it and when.
fn stall_a_reader(abortive_close: bool) -> (Hub, ConnKey, Option<(ConnKey, Teardown)>, u64) {
    let c = config(|c| {
        c.websocket.slow_consumer_ms = 500;
        c.websocket.abortive_close = abortive_close;
        c.server.send_queue_frames_max = 4;
        c.rooms.block_interval_ms = 100;
        c.rooms.block_wait_max_ms = 0;
    });
    let mut h = hub(&c, 0, 1);
    let room = RoomName::parse("stall", 64).unwrap();
    let key = upgrade(&mut h, "reader", &room, at(0));
    {
        let ready = h.poll_ready();
        assert_eq!(ready, Some(key));
        let mut iov = [std::io::IoSlice::new(&[]); 16];
        assert!(h.poll_send(key, &mut iov) > 0, "the 101 and welcome go out, and never complete");
    }
    h.end_turn(at(0));
    for step in 1..=40 {
        let now = at(step * 100);
        publish_low(&mut h, &room, now);
        h.handle_timeout(now);
        h.end_turn(now);
        if let Some(closed) = h.poll_close() {
            return (h, key, Some(closed), now.ms);
        }
    }
    (h, key, None, 4_000)
}

#[test]
fn a_slow_consumer_is_closed_with_a_reset() {
    let (h, key, closed, ms) = stall_a_reader(true);
    assert_eq!(closed, Some((key, Teardown::Reset)), "SO_LINGER 0: the kernel drops what it holds for it");
    assert!(ms >= 500, "not before slow_consumer_ms of shedding (closed at {ms} ms)");
    let c = h.counters();
    assert!(c.get(Series::FramesDropped) > 0, "it was shedding");
    assert_eq!((c.get(Series::ClosedSlow), c.get(Series::ClosedReset)), (1, 1));
}

#[test]
fn without_abortive_close_a_slow_consumer_gets_a_fin() {
    let (h, key, closed, _) = stall_a_reader(false);
    assert_eq!(closed, Some((key, Teardown::Fin)));
    let c = h.counters();
    assert_eq!((c.get(Series::ClosedSlow), c.get(Series::ClosedReset)), (1, 0));
}

/// A failed send means a broken socket: reset. The peer's own FIN: an orderly close.
#[test]
fn a_failed_send_resets_and_a_peer_fin_does_not() {
    let c = config(|_| {});
    let mut h = hub(&c, 0, 1);
    let room = RoomName::parse("r", 64).unwrap();
    let (broken, leaving) = (upgrade(&mut h, "a", &room, at(0)), upgrade(&mut h, "b", &room, at(0)));
    while let Some(key) = h.poll_ready() {
        let mut iov = [std::io::IoSlice::new(&[]); 16];
        h.poll_send(key, &mut iov);
        let result = if key == broken { -libc::EPIPE } else { 1 };
        h.handle_sent(key, result, at(1));
    }
    assert_eq!(h.poll_close(), Some((broken, Teardown::Reset)));
    h.handle_eof(leaving, at(2));
    assert_eq!(h.poll_close(), Some((leaving, Teardown::Fin)));
    let c = h.counters();
    assert_eq!((c.get(Series::ClosedError), c.get(Series::ClosedPeer), c.get(Series::ClosedReset)), (1, 1, 1));
}

/// Our Close (here for idleness) keeps the orderly close when the peer answers it, and ends
/// with a reset when the peer leaves it unanswered past close_timeout_ms.
#[test]
fn an_unanswered_close_ends_with_a_reset_an_answered_one_with_a_fin() {
    let c = config(|c| {
        c.websocket.idle_timeout_ms = 1_000;
        c.websocket.close_timeout_ms = 1_000;
    });
    let mut h = hub(&c, 0, 1);
    let room = RoomName::parse("r", 64).unwrap();
    let (silent, polite) = (upgrade(&mut h, "silent", &room, at(0)), upgrade(&mut h, "polite", &room, at(0)));
    let mut out = HashMap::new();
    let mut closes = Vec::new();
    let mut answered = false;
    for step in 1..=40 {
        let now = at(step * 100);
        h.handle_timeout(now);
        drain_sends(&mut h, &mut out, now);
        if !answered && h.counters().get(Series::ClosedIdle) == 2 {
            // Our Close was queued to both: the polite peer answers it.
            let mut close = Vec::new();
            masked_frame(true, Opcode::Close as u8, &0x03E9u16.to_be_bytes(), [9, 8, 7, 6], &mut close);
            h.handle_recv(polite, &mut close, now);
            drain_sends(&mut h, &mut out, now);
            answered = true;
        }
        while let Some(closed) = h.poll_close() {
            closes.push((closed, now.ms));
        }
    }
    assert!(answered, "both were closed for idleness");
    let how: Vec<(ConnKey, Teardown)> = closes.iter().map(|&(c, _)| c).collect();
    assert_eq!(how, [(polite, Teardown::Fin), (silent, Teardown::Reset)], "{closes:?}");
    let c = h.counters();
    assert_eq!((c.get(Series::ClosedIdle), c.get(Series::ClosedCloseTimeout), c.get(Series::ClosedReset)), (2, 1, 1));
}

/// An upgrade's export: everything pending reaches the members first and is in the state; from
/// then on the old owner refuses every change (so no seq is handed out twice) until thawed,
/// and the new process continues the room where it stopped.
#[test]
fn an_exported_room_is_frozen_here_and_continues_in_the_next_process() {
    let c = config(|_| {});
    let mut old = hub(&c, 0, 1);
    let r = RoomName::parse("r", 64).unwrap();
    let viewer = upgrade(&mut old, "alice", &r, at(0));
    old.end_turn(at(0));
    let mut out = HashMap::new();
    drain_sends(&mut old, &mut out, at(0));
    let accepted: Vec<_> = (0..3).map(|_| publish(&mut old, &r, at(10)).recv().unwrap().unwrap()).collect();
    assert_eq!(accepted.len(), 3);

    let (tx, rx) = sync_channel(1);
    old.handle_mail(OwnerMail::Export { reply: Reply(tx) }.into(), at(20));
    let rooms = rx.recv().unwrap();
    drain_sends(&mut old, &mut out, at(20));
    let seqs: Vec<u64> = server_frames(&out[&viewer])
        .iter()
        .filter_map(|f| match f {
            server_frame::Frame::Block(b) => Some(b.messages.iter().filter(|m| m.r#type == "notice").map(|m| m.seq)),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(seqs.len(), 3, "the pending messages were cut and delivered before the export");
    assert_eq!(rooms.len(), 1);
    let last = rooms[0].last_seq;
    assert!(last >= seqs[2], "the export holds every seq handed out");

    // Frozen: a publish and a client's send are refused with 503; time passing cuts nothing.
    assert_eq!(publish(&mut old, &r, at(30)).recv().unwrap(), Err(owner::PublishError::HandedOver));
    let send = Send { r#type: "chat".into(), data: b"hi".to_vec(), ..Default::default() };
    client_frame(&mut old, viewer, client_frame::Frame::Send(send), at(30));
    old.handle_timeout(at(5_000));
    let mut later = HashMap::new();
    drain_sends(&mut old, &mut later, at(5_000));
    let frames = server_frames(&later[&viewer]);
    assert!(frames.iter().any(|f| matches!(f, server_frame::Frame::Error(e) if e.code == 503)), "{frames:?}");
    assert!(!frames.iter().any(|f| matches!(f, server_frame::Frame::Block(_))), "{frames:?}");
    assert_eq!(old.counters().get(Series::DropHandover), 2);

    // The next process continues the seqs; a resuming client gets exactly what it missed.
    let mut new = hub(&c, 0, 1);
    new.import(rooms, Vec::new(), at(6_000));
    assert_eq!(new.counters().get(Series::RoomsImported), 1);
    let next = publish(&mut new, &r, at(6_000)).recv().unwrap().unwrap();
    assert!(next.id > 0);
    let resumed = connect(
        &mut new,
        &format!(
            "GET /ws?room={r}&after={}&token={} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            seqs[2],
            token("alice")
        ),
        at(6_000),
    );
    new.end_turn(at(6_000));
    new.handle_timeout(at(8_000));
    let mut fresh = HashMap::new();
    drain_sends(&mut new, &mut fresh, at(8_000));
    let got: Vec<u64> = server_frames(&fresh[&resumed])
        .iter()
        .filter_map(|f| match f {
            server_frame::Frame::Block(b) => Some(b.messages.iter().map(|m| m.seq)),
            _ => None,
        })
        .flatten()
        .collect();
    // What it missed (alice's enter event, cut with the export), then the new process's first
    // block: consecutive, no gap, no duplicate.
    assert_eq!(got.first(), Some(&(seqs[2] + 1)), "{got:?}");
    assert!(got.windows(2).all(|w| w[1] == w[0] + 1), "{got:?}");
    assert!(got.contains(&(last + 1)), "{got:?}");

    // An upgrade that failed: the old process takes changes again.
    old.handle_mail(OwnerMail::Thaw.into(), at(9_000));
    assert!(publish(&mut old, &r, at(9_000)).recv().unwrap().is_ok());
}

/// Takes what a durable hub hands to the store.
fn store_ops(h: &mut Hub, now: Now) -> Vec<crate::room::durable::StoreOp> {
    let mut ops = Vec::new();
    h.flush_store(
        &mut |op| {
            ops.push(op);
            Ok(())
        },
        now,
    );
    ops
}

/// A durable owner (Redis): a room not in memory is loaded before use — the join waits for it
/// and then gets the stored history; a publish meanwhile waits in the mixer and is cut after
/// the stored seqs; every block and list change is handed out to be written.
#[test]
fn a_durable_room_is_loaded_before_use_and_written_as_it_changes() {
    use crate::room::durable::StoreOp;
    let c = config(|c| c.redis.url = "redis://127.0.0.1:1".into());
    let mut h = hub(&c, 0, 1);
    let r = RoomName::parse("r", 64).unwrap();
    let viewer = upgrade(&mut h, "alice", &r, at(0));
    h.end_turn(at(0));
    let ops = store_ops(&mut h, at(0));
    assert!(matches!(&ops[..], [StoreOp::Load { room, .. }] if *room == r), "{ops:?}");
    // A publish while it loads is taken, not cut.
    publish(&mut h, &r, at(10)).recv().unwrap().unwrap();
    h.handle_timeout(at(500));
    let mut out = HashMap::new();
    drain_sends(&mut h, &mut out, at(500));
    assert!(!server_frames(&out[&viewer]).iter().any(|f| matches!(f, server_frame::Frame::Block(_))));

    // Storage answers: 3 messages up to seq S, and a ban.
    let s = 1_000u64 << 20;
    let history: Vec<Message> =
        (1..=3).map(|i| Message { seq: s - 3 + i, r#type: "chat".into(), ..Message::default() }).collect();
    let ban = crate::proto::ModerationEntry { list: 1, user: "mallory".into(), until_ms: 0 };
    let state = crate::proto::RoomState {
        room: "r".into(),
        base_seq: s - 10,
        last_seq: s,
        history,
        moderation: vec![ban],
        kept: true,
        ..Default::default()
    };
    h.handle_mail(OwnerMail::Loaded { room: r.clone(), state: Some(Box::new(state)) }.into(), at(600));
    h.handle_timeout(at(1_000));
    let mut out = HashMap::new();
    drain_sends(&mut h, &mut out, at(1_000));
    let blocks: Vec<Vec<u64>> = server_frames(&out[&viewer])
        .iter()
        .filter_map(|f| match f {
            server_frame::Frame::Block(b) => Some(b.messages.iter().map(|m| m.seq).collect()),
            _ => None,
        })
        .collect();
    assert_eq!(blocks[0], vec![s - 2, s - 1, s], "the stored history as the backfill: {blocks:?}");
    let live = blocks.last().unwrap();
    assert!(live[0] > s, "cut after the stored seqs: {blocks:?}");
    let notices: usize = server_frames(&out[&viewer])
        .iter()
        .filter_map(|f| match f {
            server_frame::Frame::Block(b) if !b.backfill => {
                Some(b.messages.iter().filter(|m| m.r#type == "notice").count())
            }
            _ => None,
        })
        .sum();
    assert_eq!(notices, 1, "the publish made while the room loaded is delivered: {blocks:?}");
    assert_eq!(h.counters().get(Series::LoadFound), 1);

    // What changed is handed out to be written: the block, and a mute.
    let mute = OwnerMail::Moderate {
        room: r.clone(),
        user: UserId::new("eve"),
        action: ModAction::Mute { until_ms: None },
        reason: "".into(),
        origin: Origin::Api(Reply(sync_channel(1).0)),
    };
    h.handle_mail(mute.into(), at(1_100));
    let ops = store_ops(&mut h, at(1_100));
    assert!(
        ops.iter()
            .any(|o| matches!(o, StoreOp::Block { last_seq, kept: true, .. } if *last_seq == live[live.len() - 1])),
        "{ops:?}"
    );
    assert!(ops.iter().any(|o| matches!(o, StoreOp::Moderation { user, add: true, .. } if user == "eve")), "{ops:?}");
}

/// Storage that does not answer: at `redis.load_timeout_ms` the room goes on from memory and
/// the waiting requests are served; a late answer is ignored.
#[test]
fn a_load_that_times_out_lets_the_room_go_on_from_memory() {
    let c = config(|c| {
        c.redis.url = "redis://127.0.0.1:1".into();
        c.redis.load_timeout_ms = 200;
    });
    let mut h = hub(&c, 0, 1);
    let r = RoomName::parse("r", 64).unwrap();
    let (tx, rx) = sync_channel(1);
    h.handle_mail(OwnerMail::RoomInfo { room: r.clone(), reply: Reply(tx) }.into(), at(0));
    assert_eq!(store_ops(&mut h, at(0)).len(), 1);
    assert!(rx.try_recv().is_err(), "waits for the load");
    h.handle_timeout(at(100));
    assert!(rx.try_recv().is_err());
    h.handle_timeout(at(250));
    let info = rx.try_recv().expect("answered from memory after the timeout");
    assert_eq!(info.online, 0);
    assert_eq!(h.counters().get(Series::LoadTimeout), 1);
    h.handle_mail(OwnerMail::Loaded { room: r, state: None }.into(), at(300));
}

/// `redis.loads_max` and `redis.load_waiters_max`: past them a room starts from memory and a
/// request is served from memory, each counted.
#[test]
fn loads_and_their_waiters_are_bounded() {
    let c = config(|c| {
        c.redis.url = "redis://127.0.0.1:1".into();
        c.redis.loads_max = 1;
        c.redis.load_waiters_max = 1;
    });
    let mut h = hub(&c, 0, 1);
    let (a, b) = (RoomName::parse("a", 64).unwrap(), RoomName::parse("b", 64).unwrap());
    let info = |h: &mut Hub, room: &RoomName| {
        let (tx, rx) = sync_channel(1);
        h.handle_mail(OwnerMail::RoomInfo { room: room.clone(), reply: Reply(tx) }.into(), at(0));
        rx
    };
    let first = info(&mut h, &a);
    assert!(first.try_recv().is_err(), "waits for a's load");
    let second = info(&mut h, &a);
    assert!(second.try_recv().is_ok(), "past load_waiters_max: served from memory");
    assert_eq!(h.counters().get(Series::LoadWaitersFull), 1);
    let other = info(&mut h, &b);
    assert!(other.try_recv().is_ok(), "past loads_max: b starts from memory");
    assert_eq!(h.counters().get(Series::LoadSkipped), 1);
    let loads: Vec<_> = store_ops(&mut h, at(0));
    assert_eq!(loads.len(), 1, "only a was asked for: {loads:?}");
}

/// A viewer who joins and leaves while the room loads does not make the owner forget the load
/// (which would leak the count against `redis.loads_max`).
#[test]
fn a_room_left_while_loading_still_finishes_its_load() {
    let c = config(|c| {
        c.redis.url = "redis://127.0.0.1:1".into();
        c.redis.loads_max = 1;
        c.rooms.presence_events = false;
    });
    let mut h = hub(&c, 0, 1);
    let r = RoomName::parse("r", 64).unwrap();
    let viewer = upgrade(&mut h, "alice", &r, at(0));
    h.end_turn(at(0));
    h.handle_eof(viewer, at(10));
    h.end_turn(at(10));
    assert_eq!(store_ops(&mut h, at(10)).len(), 1);
    h.handle_mail(OwnerMail::Loaded { room: r.clone(), state: None }.into(), at(20));
    // The load was counted off: another room may load.
    let (tx, rx) = sync_channel(1);
    h.handle_mail(OwnerMail::RoomInfo { room: RoomName::parse("s", 64).unwrap(), reply: Reply(tx) }.into(), at(30));
    assert!(rx.try_recv().is_err(), "s waits for its own load");
    assert_eq!(h.counters().get(Series::LoadSkipped), 0);
}

/// A hub whose hooks' queues are read by the test: (hub, queues by hook).
fn hooked_hub(
    c: &Config,
    hooks: &[crate::hooks::call::Hook],
    queue_max: usize,
) -> (Hub, HashMap<usize, crossbeam_channel::Receiver<crate::hooks::call::Call>>) {
    let settings: Vec<_> = crate::hooks::Settings::all(&{
        let mut c = c.clone();
        for h in hooks {
            let url = "http://127.0.0.1:1/".to_string();
            match h {
                crate::hooks::call::Hook::Connect => (c.hook_connect.url, c.hook_connect.queue_max) = (url, queue_max),
                crate::hooks::call::Hook::Join => (c.hook_join.url, c.hook_join.queue_max) = (url, queue_max),
                crate::hooks::call::Hook::Send => (c.hook_send.url, c.hook_send.queue_max) = (url, queue_max),
                crate::hooks::call::Hook::Events => (c.hook_events.url, c.hook_events.queue_max) = (url, queue_max),
            }
        }
        c
    });
    let (gate, rxs) = crate::hooks::Gate::detached(&settings);
    let hub = Hub::new(HubConfig::new(c, ShardId(0), 1).with_hooks(std::sync::Arc::new(gate)));
    (hub, rxs.into_iter().map(|(h, rx)| (h as usize, rx)).collect())
}

#[test]
fn a_send_waits_for_its_verdict_off_the_shard_then_goes_to_the_owner() {
    use crate::hooks::call::{Call, Hook, Refusal, Verdict};
    let c = config(|c| {
        c.rooms.block_interval_ms = 10;
        c.rooms.presence_events = false;
    });
    let (mut h, queues) = hooked_hub(&c, &[Hook::Send], 16);
    let r = RoomName::parse("r", 64).unwrap();
    let (alice, viewer) = (upgrade(&mut h, "alice", &r, at(0)), upgrade(&mut h, "bob", &r, at(0)));
    h.end_turn(at(0));
    let mut out = HashMap::new();
    drain_sends(&mut h, &mut out, at(0));
    let send = |h: &mut Hub, text: &str, id: &str, now| {
        let s = Send { r#type: "chat".into(), data: text.as_bytes().to_vec(), id: id.into() };
        client_frame(h, alice, client_frame::Frame::Send(s), now);
    };
    send(&mut h, "hello", "a1", at(1));
    send(&mut h, "spam", "a2", at(1));
    // Both calls wait in the hook's queue; the shard goes on (nothing reached the owner).
    let rx = &queues[&(Hook::Send as usize)];
    let calls: Vec<Call> = rx.try_iter().collect();
    assert_eq!(calls.len(), 2);
    h.handle_timeout(at(50));
    drain_sends(&mut h, &mut out, at(50));
    assert_eq!(h.counters().get(Series::BlocksCut), 0, "no message reached the owner yet");
    // The backend allows the first (rewritten) and refuses the second.
    let mut calls = calls.into_iter();
    let Some(Call::Send(mut first)) = calls.next() else { panic!() };
    first.msg.data = b"hello!".to_vec();
    h.handle_mail(HostMail::Hook(Box::new(Verdict::Send { call: first, outcome: Ok(()) })).into(), at(60));
    let Some(Call::Send(second)) = calls.next() else { panic!() };
    let refusal = Refusal { code: 403, reason: "spam".into() };
    h.handle_mail(HostMail::Hook(Box::new(Verdict::Send { call: second, outcome: Err(refusal) })).into(), at(60));
    h.handle_timeout(at(100));
    out.clear();
    drain_sends(&mut h, &mut out, at(100));
    let block = server_frames(&out[&viewer]).into_iter().find_map(|f| match f {
        server_frame::Frame::Block(b) if !b.backfill => Some(b),
        _ => None,
    });
    assert_eq!(block.expect("a block").messages[0].data, b"hello!");
    let acks: Vec<_> = server_frames(&out[&alice])
        .into_iter()
        .filter_map(|f| match f {
            server_frame::Frame::Ack(a) => Some((a.id, a.code)),
            _ => None,
        })
        .collect();
    assert!(acks.contains(&("a2".into(), 403)) && acks.contains(&("a1".into(), 0)), "{acks:?}");
    assert_eq!(h.counters().get(Series::SendHookRefused), 1);
}

#[test]
fn a_full_hook_queue_answers_at_once_with_the_failure_policy() {
    use crate::hooks::call::Hook;
    // Connect fails open (the token decides), join fails closed: with one slot each, the
    // second handshake is let in by its token and refused its room at once.
    let c = config(|_| {});
    let (mut h, queues) = hooked_hub(&c, &[Hook::Connect, Hook::Join], 1);
    let r = RoomName::parse("r", 64).unwrap();
    let first = upgrade(&mut h, "a", &r, at(0));
    let second = upgrade(&mut h, "b", &r, at(0));
    let mut out = HashMap::new();
    drain_sends(&mut h, &mut out, at(0));
    assert!(!out.contains_key(&first), "the first waits in the connect queue");
    assert_eq!(queues[&(Hook::Connect as usize)].len(), 1);
    // The second found connect's queue full: open by its token, then its room asks join,
    // whose one slot is free.
    assert!(!out.contains_key(&second), "its room waits for the join hook");
    assert_eq!(queues[&(Hook::Join as usize)].len(), 1);
    let third = upgrade(&mut h, "c", &r, at(1));
    drain_sends(&mut h, &mut out, at(1));
    let head = String::from_utf8_lossy(&out[&third]).into_owned();
    assert!(head.starts_with("HTTP/1.1 503"), "both queues full: join fails closed: {head}");
    assert_eq!(h.counters().get(Series::HsHook), 1);
}

/// A TLS client (rustls) against a hub whose listener speaks TLS with kernel TLS on: handshakes
/// it and sends the upgrade for `room`; returns the connection and the client once the hub has
/// asked for the kernel hand-over.
fn kernel_tls_client(h: &mut Hub, room: &RoomName, now: Now) -> (ConnKey, rustls::ClientConnection) {
    use std::io::Write as _;
    let key = h.handle_accept(0, None, now).unwrap();
    let mut c = tls_client();
    let request = format!(
        "GET /ws?room={room}&token={} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        token("ann")
    );
    c.writer().write_all(request.as_bytes()).unwrap();
    for _ in 0..10 {
        let mut bytes = Vec::new();
        c.write_tls(&mut bytes).unwrap();
        if !bytes.is_empty() {
            h.handle_recv(key, &mut bytes, now);
        }
        let mut out = HashMap::new();
        drain_sends(h, &mut out, now);
        if let Some(bytes) = out.remove(&key) {
            client_reads(&mut c, &bytes);
        }
        if h.poll_kernel_tls() == Some(key) {
            return (key, c);
        }
    }
    panic!("no kernel hand-over asked for");
}

thread_local! {
    static TLS_CERT: (Vec<u8>, Vec<u8>, rustls::pki_types::CertificateDer<'static>) = {
        let c = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        (c.cert.pem().into_bytes(), c.signing_key.serialize_pem().into_bytes(), c.cert.der().clone())
    };
}

fn tls_hub(c: &Config) -> Hub {
    let (cert, key) = TLS_CERT.with(|t| (t.0.clone(), t.1.clone()));
    let server = crate::tls::server_config(&cert, &key).unwrap();
    Hub::new(HubConfig::new(c, ShardId(0), 1).with_tls(server, true))
}

fn tls_client() -> rustls::ClientConnection {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(TLS_CERT.with(|t| t.2.clone())).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(crate::tls::provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    rustls::ClientConnection::new(std::sync::Arc::new(config), "localhost".try_into().unwrap()).unwrap()
}

/// Plaintext the client reads from `records`.
fn client_reads(c: &mut rustls::ClientConnection, records: &[u8]) -> Vec<u8> {
    use std::io::Read as _;
    let (mut rd, mut out) = (records, Vec::new());
    while !rd.is_empty() {
        c.read_tls(&mut rd).unwrap();
        c.process_new_packets().unwrap();
        let _ = c.reader().read_to_end(&mut out);
    }
    out
}

#[test]
fn with_kernel_tls_frames_leave_unsealed_once_the_kernel_took_the_keys() {
    let c = config(|_| {});
    let mut h = tls_hub(&c);
    let room = RoomName::parse("ktls", 64).unwrap();
    let now = at(1);
    let (key, mut client) = kernel_tls_client(&mut h, &room, now);
    // Nothing leaves while the setsockopts run.
    let mut out = HashMap::new();
    drain_sends(&mut h, &mut out, now);
    assert!(out.get(&key).is_none_or(|b| b.is_empty()));
    let info = h.kernel_tls_info(key).expect("the crypto_info stays until the answer").to_vec();
    h.handle_kernel_tls(key, 0);
    assert_eq!(h.counters().get(Series::TlsKernel), 1);
    // The 101 and the welcome leave as plaintext; the kernel seals them (here: its model).
    let mut out = HashMap::new();
    drain_sends(&mut h, &mut out, now);
    let plain = out.remove(&key).unwrap();
    assert!(plain.starts_with(b"HTTP/1.1 101"), "{:?}", String::from_utf8_lossy(&plain[..20]));
    let mut kernel = crate::tls::kernel::KernelModel::new(&info);
    let mut records = Vec::new();
    kernel.seal(&plain, &mut records);
    let read = client_reads(&mut client, &records);
    assert_eq!(read, plain);
    assert!(matches!(server_frames(&read)[..], [server_frame::Frame::Welcome(_)]));
}

#[test]
fn a_kernel_that_refuses_the_keys_leaves_sealing_in_user_space() {
    let c = config(|_| {});
    let mut h = tls_hub(&c);
    let room = RoomName::parse("ktls", 64).unwrap();
    let now = at(1);
    let (key, mut client) = kernel_tls_client(&mut h, &room, now);
    h.handle_kernel_tls(key, -libc::ENOENT);
    assert_eq!(h.counters().get(Series::TlsKernelFallback), 1);
    assert_eq!(h.kernel_tls_info(key), None);
    let mut out = HashMap::new();
    drain_sends(&mut h, &mut out, now);
    let read = client_reads(&mut client, &out.remove(&key).unwrap());
    assert!(read.starts_with(b"HTTP/1.1 101"));
    assert!(matches!(server_frames(&read)[..], [server_frame::Frame::Welcome(_)]));
}

/// An upgrade offering permessage-deflate (as browsers do).
fn upgrade_deflate(h: &mut Hub, user: &str, room: &RoomName, now: Now) -> ConnKey {
    let request = format!(
        "GET /ws?room={room}&token={} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n",
        token(user)
    );
    connect(h, &request, now)
}

/// The frames in `bytes` after the HTTP head, compressed ones inflated: (compressed, frame).
fn frames_inflated(bytes: &[u8]) -> Vec<(bool, server_frame::Frame)> {
    let mut rest = &bytes[bytes.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4..];
    let mut inflater = crate::wire::deflate::Inflater::default();
    let mut frames = Vec::new();
    while let Ok(Some(h)) = decode_header(rest) {
        let end = h.header_len + h.payload_len as usize;
        let payload = &rest[h.header_len..end];
        let payload = if h.rsv1 { inflater.inflate(payload, 1 << 20).unwrap().to_vec() } else { payload.to_vec() };
        frames.push((h.rsv1, ServerFrame::decode(&payload[..]).unwrap().frame.unwrap()));
        rest = &rest[end..];
    }
    frames
}

/// Publishes `lines` as chat messages at `now`, lets the block tick a second later, and
/// returns what every connection was sent.
fn publish_and_cut(h: &mut Hub, room: &RoomName, lines: &[String], now: Now) -> HashMap<ConnKey, Vec<u8>> {
    for text in lines {
        let msg = Box::new(Message { r#type: "chat".into(), data: text.clone().into_bytes(), ..Message::default() });
        let (tx, _rx) = sync_channel(1);
        h.handle_mail(OwnerMail::Publish { room: room.clone(), msg, priority: None, reply: Reply(tx) }.into(), now);
    }
    let later = at(now.ms + 1_000);
    h.handle_timeout(later);
    h.end_turn(later);
    let mut sent = HashMap::new();
    drain_sends(h, &mut sent, later);
    sent
}

/// Ten chat lines long enough to be worth compressing.
fn danmaku() -> Vec<String> {
    (0..10).map(|i| format!("主播好 danmaku line {i}, 666666 gift rocket")).collect()
}

#[test]
fn with_deflate_a_block_is_compressed_once_and_each_member_gets_its_variant() {
    let c = config(|c| {
        c.websocket.deflate = true;
        c.websocket.deflate_min_bytes = 64;
    });
    let mut h = hub(&c, 0, 1);
    let room = RoomName::parse("z", 64).unwrap();
    let now = at(0);
    let plain = upgrade(&mut h, "plain", &room, now);
    let zipped = upgrade_deflate(&mut h, "zipped", &room, now);
    let mut out = HashMap::new();
    drain_sends(&mut h, &mut out, now);
    let head = String::from_utf8_lossy(&out[&zipped]).into_owned();
    assert!(
        head.contains(
            "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        ),
        "{head}"
    );
    assert!(!String::from_utf8_lossy(&out[&plain]).contains("Sec-WebSocket-Extensions"));
    h.end_turn(now);
    let sent = publish_and_cut(&mut h, &room, &danmaku(), now);
    let (p, z) = (&sent[&plain], &sent[&zipped]);
    let (p_frames, z_frames) =
        (frames_inflated(&[b"\r\n\r\n", &p[..]].concat()), frames_inflated(&[b"\r\n\r\n", &z[..]].concat()));
    let blocks = |f: &[(bool, server_frame::Frame)]| {
        f.iter().filter(|(_, f)| matches!(f, server_frame::Frame::Block(_))).count()
    };
    assert_eq!((blocks(&p_frames), blocks(&z_frames)), (1, 1));
    assert!(p_frames.iter().all(|(rsv1, _)| !rsv1), "the plain member never gets RSV1");
    let (zb, pb) = (
        z_frames.iter().find(|(_, f)| matches!(f, server_frame::Frame::Block(_))).unwrap(),
        p_frames.iter().find(|(_, f)| matches!(f, server_frame::Frame::Block(_))).unwrap(),
    );
    assert!(zb.0, "the block went compressed");
    assert_eq!(zb.1, pb.1, "the same block once inflated");
    assert!(z.len() < p.len(), "fewer bytes: {} vs {}", z.len(), p.len());
    let c = h.counters();
    assert_eq!(
        (c.get(Series::DeflateNegotiated), c.get(Series::DeflateFrames)),
        (1, 1),
        "one compression for the block"
    );
    assert!(c.get(Series::DeflateBytesOut) < c.get(Series::DeflateBytesIn));
}

#[test]
fn only_the_encodings_taken_compressed_are_compressed() {
    let c = config(|c| {
        c.websocket.deflate = true;
        c.websocket.deflate_min_bytes = 64;
    });
    let mut h = hub(&c, 0, 1);
    let room = RoomName::parse("mixed", 64).unwrap();
    let now = at(0);
    // A protobuf member without the extension, a JSON member with it.
    let _plain = upgrade(&mut h, "plain", &room, now);
    let request = format!(
        "GET /ws?room={room}&token={} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: barrage.v1.json\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n",
        token("zipped")
    );
    let zipped = connect(&mut h, &request, now);
    drain_sends(&mut h, &mut HashMap::new(), now);
    h.end_turn(now);
    let sent = publish_and_cut(&mut h, &room, &danmaku(), now);
    let first = decode_header(&sent[&zipped]).unwrap().unwrap();
    assert!(first.rsv1, "the JSON member's block went compressed");
    let c = h.counters();
    assert_eq!(c.get(Series::DeflateFrames), 1, "the JSON encoding only: no protobuf member takes it compressed");
}

#[test]
fn compressed_messages_past_their_rate_close_the_connection_uninflated() {
    let c = config(|c| {
        c.websocket.deflate = true;
        c.websocket.inflate_rate_per_s = 2;
        c.websocket.inflate_rate_burst = 3;
    });
    let mut h = hub(&c, 0, 1);
    let room = RoomName::parse("zrate", 64).unwrap();
    let now = at(0);
    let key = upgrade_deflate(&mut h, "pinger", &room, now);
    drain_sends(&mut h, &mut HashMap::new(), now);
    h.end_turn(now);
    let ping = ClientFrame { frame: Some(client_frame::Frame::Ping(crate::proto::Ping {})) }.encode_to_vec();
    let mut z = Vec::new();
    crate::wire::deflate::compress(&ping, 6, &mut z);
    let compressed_ping = |h: &mut Hub, at: Now| {
        let mut bytes = Vec::new();
        masked_frame(true, Opcode::Binary as u8 | 0x40, &z, [1, 2, 3, 4], &mut bytes);
        h.handle_recv(key, &mut bytes, at);
    };
    for _ in 0..3 {
        compressed_ping(&mut h, now);
    }
    // Half a second later one more token has come: the fourth passes, the fifth is over.
    compressed_ping(&mut h, at(500));
    assert_eq!(h.counters().get(Series::Inflated), 4, "the burst and the refill");
    compressed_ping(&mut h, at(500));
    let mut closing = HashMap::new();
    drain_sends(&mut h, &mut closing, at(500));
    let close = &closing[&key];
    let at_close = close.windows(2).rposition(|w| w[0] == 0x88).expect("a Close frame");
    assert_eq!(u16::from_be_bytes([close[at_close + 2], close[at_close + 3]]), 1008);
    let c = h.counters();
    assert_eq!((c.get(Series::Inflated), c.get(Series::InflateRate), c.get(Series::ClosedInflate)), (4, 1, 1));
}

#[test]
fn blocks_under_deflate_min_bytes_go_uncompressed() {
    let c = config(|c| {
        c.websocket.deflate = true;
        c.websocket.deflate_min_bytes = 4096;
    });
    let mut h = hub(&c, 0, 1);
    let room = RoomName::parse("small", 64).unwrap();
    let now = at(0);
    let zipped = upgrade_deflate(&mut h, "zipped", &room, now);
    drain_sends(&mut h, &mut HashMap::new(), now);
    h.end_turn(now);
    let sent = publish_and_cut(&mut h, &room, &["666666".to_string()], now);
    let frames = frames_inflated(&[b"\r\n\r\n", &sent[&zipped][..]].concat());
    assert!(frames.iter().any(|(rsv1, f)| !rsv1 && matches!(f, server_frame::Frame::Block(_))), "sent plain");
    assert_eq!(h.counters().get(Series::DeflateFrames), 0, "nothing compressed");
}

#[test]
fn compressed_client_messages_are_inflated_within_the_limit() {
    let c = config(|c| {
        c.websocket.deflate = true;
        c.websocket.message_bytes_max = 4096;
    });
    let mut h = hub(&c, 0, 1);
    let room = RoomName::parse("zin", 64).unwrap();
    let now = at(0);
    let key = upgrade_deflate(&mut h, "sender", &room, now);
    let mut out = HashMap::new();
    drain_sends(&mut h, &mut out, now);
    h.end_turn(now);
    let send = |h: &mut Hub, payload: &[u8], rsv1: bool| {
        let mut z = Vec::new();
        let body = if rsv1 {
            crate::wire::deflate::compress(payload, 6, &mut z);
            &z[..]
        } else {
            payload
        };
        let mut bytes = Vec::new();
        masked_frame(true, Opcode::Binary as u8 | if rsv1 { 0x40 } else { 0 }, body, [1, 2, 3, 4], &mut bytes);
        h.handle_recv(key, &mut bytes, now);
    };
    // A compressed send frame is taken as any other: the message reaches the room.
    let frame = ClientFrame {
        frame: Some(client_frame::Frame::Send(Send {
            r#type: "chat".into(),
            data: "hi 弹幕".as_bytes().to_vec(),
            ..Send::default()
        })),
    };
    send(&mut h, &frame.encode_to_vec(), true);
    assert_eq!(h.counters().get(Series::Inflated), 1);
    assert_eq!(h.counters().get(Series::MessagesIn), 1, "the inflated send was published");
    // A bomb: a few hundred bytes that inflate past message_bytes_max: 1009.
    let bomb = vec![0u8; 1 << 20];
    send(&mut h, &bomb, true);
    let mut closing = HashMap::new();
    drain_sends(&mut h, &mut closing, now);
    let close = &closing[&key];
    assert_eq!(&close[..2], &[0x88, 2 + "message over the size limit".len() as u8]);
    assert_eq!(u16::from_be_bytes([close[2], close[3]]), 1009);
    let c = h.counters();
    assert_eq!((c.get(Series::InflateTooBig), c.get(Series::ClosedTooBig)), (1, 1));
}

/// The presence reports (members per room) a hub's turn sends to owners.
fn presence_reports(h: &mut Hub, now: Now) -> Vec<(RoomName, u32)> {
    h.end_turn(now);
    let mut reports = Vec::new();
    h.flush_mail(&mut |_, m| {
        if let Mail::Owner(OwnerMail::Presence { room, members, .. }) = m {
            reports.push((room, members));
        }
        Ok(())
    });
    reports
}

/// Another node's view of the cluster changed (`HostMail::Resync`): every room here reports
/// its members again, though nothing changed here.
#[test]
fn a_resync_reports_every_room_again() {
    let c = config(|_| {});
    let mut h = hub(&c, 0, 2);
    let (r1, r2) = (room_owned_by(1, 2, "one"), room_owned_by(1, 2, "two"));
    let now = at(0);
    upgrade(&mut h, "ann", &r1, now);
    upgrade(&mut h, "bob", &r2, now);
    upgrade(&mut h, "cy", &r2, now);
    let mut first = presence_reports(&mut h, now);
    first.sort();
    assert_eq!(first, vec![(r1.clone(), 1), (r2.clone(), 2)]);
    assert!(presence_reports(&mut h, now).is_empty(), "nothing changed: nothing reported");
    h.handle_mail(HostMail::Resync.into(), now);
    let mut again = presence_reports(&mut h, now);
    again.sort();
    assert_eq!(again, first, "reported again as they stand");
}

/// In a cluster, a resync also has the owners tell every shard and the link (every other
/// node) their rooms' bans and whitelists again: a node that joined later, or whose subscriber
/// was away, learnt only what was set or loaded while it listened.
#[test]
fn a_resync_replicates_the_owners_lists_again() {
    let c = config(|_| {});
    let placement = crate::cluster::placement::Placement::new("me", 1);
    let mut h = Hub::new(HubConfig::new(&c, ShardId(0), 1).with_placement(placement));
    let room = RoomName::parse("r", 64).unwrap();
    let now = at(0);
    for (user, action) in [("spammer", ModAction::Ban { until_ms: None }), ("vip", ModAction::Whitelist)] {
        let (tx, rx) = sync_channel(1);
        let mail = OwnerMail::Moderate {
            room: room.clone(),
            user: UserId::new(user),
            action,
            reason: "x".into(),
            origin: Origin::Api(Reply(tx)),
        };
        h.handle_mail(mail.into(), now);
        assert_eq!(rx.try_recv().expect("answered"), Ok(()));
    }
    let replicas = |h: &mut Hub| {
        let mut got = Vec::new();
        h.flush_mail(&mut |to, m| {
            if let Mail::Host(HostMail::Replicate { user, list, add: true, .. }) = m {
                got.push((to, user.as_str().to_owned(), list));
            }
            Ok(())
        });
        got.sort_by(|a, b| (a.0.0, &a.1).cmp(&(b.0.0, &b.1)));
        got
    };
    let link = ShardId(1);
    let first = replicas(&mut h);
    assert_eq!(
        first,
        vec![(link, "spammer".to_owned(), List::Ban), (link, "vip".to_owned(), List::Whitelist)],
        "set once: the link carries them to the other nodes"
    );
    assert!(replicas(&mut h).is_empty());
    h.handle_mail(HostMail::Resync.into(), now);
    assert_eq!(replicas(&mut h), first, "told again after a resync");
}
