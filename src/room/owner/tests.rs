use super::*;
use crate::proto::{Block, ServerFrame, server_frame};
use prost::Message as _;

fn config(shards: usize) -> OwnerConfig {
    OwnerConfig {
        shard: ShardId(1),
        shards,
        limits: MixerLimits { block_messages_max: 2, pending_messages_max: 4 },
        rooms_max: 2,
        room_idle_ms: 1000,
        history_messages_max: 3,
        upstream: Rate { per_s: 2, burst: 2 },
        attrs: AttrLimits::DEFAULT,
        moderation: ModerationLimits { entries_max: 10 },
        presence_events: false,
        presence_users_max: 2,
        poll_limit_max: 10,
        poll_interval_ms: [1500, 2000, 2500],
        types: Arc::new(crate::config::Config::default().types),
        durable: false,
        cluster: false,
        deflate: None,
    }
}

fn owner(shards: usize) -> Owner {
    Owner::new(config(shards))
}

fn room(s: &str) -> RoomName {
    RoomName::parse(s, 64).unwrap()
}

fn at(ms: i64) -> Now {
    Now { ms: ms as u64, unix: UnixMs(ms) }
}

fn api(p: Priority) -> Sender {
    Sender::Api { priority: Some(p) }
}

fn text(data: &str) -> Message {
    Message { r#type: "custom".into(), data: data.as_bytes().to_vec(), ..Message::default() }
}

fn decode(frame: &SharedFrame) -> server_frame::Frame {
    let header = crate::wire::frame::decode_header(&frame.proto).unwrap().unwrap();
    ServerFrame::decode(&frame.proto[header.header_len..]).unwrap().frame.unwrap()
}

fn decode_block(frame: &SharedFrame) -> Block {
    match decode(frame) {
        server_frame::Frame::Block(b) => b,
        other => panic!("not a block: {other:?}"),
    }
}

fn tick_frames(o: &mut Owner, now: Now) -> Vec<(RoomName, Arc<SharedFrame>, Vec<u32>)> {
    let mut out = Vec::new();
    o.tick(now, &mut |name, frame, members| out.push((name.clone(), Arc::clone(frame), members.to_vec())));
    out
}

#[test]
fn tick_encodes_once_and_targets_shards_with_members() {
    let mut o = owner(3);
    let r = room("r");
    let now = at(5_000);
    o.presence(&r, ShardId(0), (2, 0, 0, 0), &[], 0, now);
    o.presence(&r, ShardId(2), (1, 1, 0, 0), &[], 0, now);
    o.publish(&r, text("a"), api(Priority::Low), now).unwrap();
    o.publish(&r, text("b"), api(Priority::High), now).unwrap();
    let calls = tick_frames(&mut o, at(6_000));
    assert_eq!(calls.len(), 1, "one encode per room per tick");
    let (name, frame, members) = &calls[0];
    assert_eq!(name, &r);
    assert_eq!(members, &vec![2, 0, 1]);
    assert!(frame.json.is_some(), "a JSON member exists");
    let block = decode_block(frame);
    assert_eq!(block.online, 3);
    assert_eq!(block.server_ms, 6_000);
    let data: Vec<_> = block.messages.iter().map(|m| m.data.clone()).collect();
    assert_eq!(data, vec![b"b".to_vec(), b"a".to_vec()]);
    assert_eq!(block.first_seq, seq_base(5_000) + 1);
    assert_eq!(block.last_seq, block.first_seq + 1);
    assert!(!block.backfill);
    assert!(block.messages.iter().all(|m| m.room == "r" && m.created_ms == 5_000 && m.id >> 48 == 1));
    assert!(tick_frames(&mut o, at(7_000)).is_empty(), "nothing new: nothing visited");
}

#[test]
fn bounds_rooms_backlog_and_upstream_rate() {
    let mut o = owner(1);
    let now = at(0);
    o.publish(&room("a"), text("x"), api(Priority::Low), now).unwrap();
    o.publish(&room("b"), text("x"), api(Priority::Low), now).unwrap();
    assert_eq!(o.publish(&room("c"), text("x"), api(Priority::Low), now), Err(PublishError::RoomsFull));
    // Burst of 2 per room, 2 per second: the third in the same instant is refused...
    o.publish(&room("a"), text("x"), api(Priority::Low), now).unwrap();
    assert_eq!(o.publish(&room("a"), text("x"), api(Priority::Low), now), Err(PublishError::RateLimited));
    // ...but whitelist messages are never rate limited, only bounded by the backlog.
    o.publish(&room("a"), text("w"), api(Priority::Whitelist), now).unwrap();
    o.publish(&room("a"), text("w"), api(Priority::Whitelist), now).unwrap();
    assert_eq!(o.publish(&room("a"), text("w"), api(Priority::Whitelist), now), Err(PublishError::Backlog));
}

#[test]
fn type_defaults_fill_priority_and_ttl() {
    let mut o = owner(1);
    let r = room("t");
    o.presence(&r, ShardId(0), (1, 0, 0, 0), &[], 0, at(0));
    let gift = Message { r#type: "gift".into(), ..Message::default() };
    o.publish(&r, gift, Sender::Api { priority: None }, at(0)).unwrap();
    let chat = Message { r#type: "chat".into(), ..Message::default() };
    o.publish(&r, chat.clone(), api(Priority::Low), at(0)).unwrap();
    let frames = tick_frames(&mut o, at(0));
    let block = decode_block(&frames[0].1);
    assert_eq!(block.messages[0].r#type, "gift");
    assert_eq!(block.messages[0].priority, Priority::High.wire());
    assert_eq!(block.messages[0].ttl_ms, 30_000);
    // A chat line older than its 10 s ttl when the block is cut is dropped and counted.
    let mut o = owner(1);
    o.presence(&r, ShardId(0), (1, 0, 0, 0), &[], 0, at(0));
    o.publish(&r, chat, Sender::Api { priority: None }, at(0)).unwrap();
    let mut stats = TickStats::default();
    stats.dropped_expired += o.tick(at(10_001), &mut |_, _, _| panic!("nothing fresh to send")).dropped_expired;
    assert_eq!(stats.dropped_expired, 1);
}

#[test]
fn client_sends_obey_mute_and_whitelist() {
    let mut o = owner(1);
    let r = room("m");
    let client = Sender::Client { user: UserId::new("alice"), weight: 7, priority: Priority::Low };
    o.moderate(&r, &UserId::new("alice"), ModAction::Mute { until_ms: Some(1_000) }, at(0)).unwrap();
    assert_eq!(o.publish(&r, text("x"), client.clone(), at(500)), Err(PublishError::Muted));
    o.publish(&r, text("x"), client.clone(), at(1_000)).expect("the mute ended");
    o.moderate(&r, &UserId::new("alice"), ModAction::Whitelist, at(1_000)).unwrap();
    o.presence(&r, ShardId(0), (1, 0, 0, 0), &[], 0, at(1_000));
    o.publish(&r, text("vip"), client, at(1_500)).unwrap();
    let frames = tick_frames(&mut o, at(1_500));
    let block = decode_block(&frames[0].1);
    let vip = block.messages.iter().find(|m| m.data == b"vip").unwrap();
    assert_eq!((vip.priority, vip.weight, vip.sender.as_str()), (Priority::Whitelist.wire(), 7, "alice"));
    let lists = o.moderation(&r, UnixMs(1_500));
    assert_eq!(lists.whitelist.len(), 1);
    assert!(lists.mutes.is_empty(), "expired mutes are not listed");
}

#[test]
fn joiners_get_history_and_attrs_encoded_once() {
    let mut o = owner(1);
    let r = room("h");
    o.presence(&r, ShardId(0), (1, 0, 0, 0), &[], 0, at(0));
    assert!(o.joined(&r, None, 0, at(0)).is_empty(), "nothing to backfill yet");
    for i in 0..2 {
        o.publish(&r, text(&format!("m{i}")), api(Priority::Low), at(0)).unwrap();
        tick_frames(&mut o, at(0));
    }
    o.set_attr(&r, "seat1", Some(b"bob"), at(0)).unwrap();
    let first = o.joined(&r, None, 0, at(0));
    let second = o.joined(&r, None, 0, at(0));
    assert_eq!(first.len(), 2);
    assert!(Arc::ptr_eq(&first[0], &second[0]) && Arc::ptr_eq(&first[1], &second[1]), "shared, not re-encoded");
    let backfill = decode_block(&first[0]);
    assert!(backfill.backfill);
    assert_eq!(backfill.messages.len(), 2);
    match decode(&first[1]) {
        server_frame::Frame::Attrs(a) => {
            assert!(a.snapshot);
            assert_eq!(a.entries[0].key, "seat1");
        }
        other => panic!("expected attrs, got {other:?}"),
    }
    // The attribute change also went out to the members at the tick, as a delta.
    let frames = tick_frames(&mut o, at(0));
    match decode(&frames[0].1) {
        server_frame::Frame::Attrs(a) => assert!(!a.snapshot && a.entries.len() == 1),
        other => panic!("expected an attrs delta, got {other:?}"),
    }
}

#[test]
fn presence_events_are_one_per_kind_per_tick() {
    let mut c = config(1);
    c.presence_events = true;
    let mut o = Owner::new(c);
    let r = room("p");
    o.presence(&r, ShardId(0), (1, 0, 0, 0), &[], 0, at(0));
    let users: Vec<UserId> = (0..5).map(|i| UserId::new(&format!("u{i}"))).collect();
    for u in &users {
        o.joined(&r, Some(u), 0, at(0));
    }
    o.joined(&r, None, 0, at(0)); // anonymous: not announced
    o.presence(&r, ShardId(0), (3, 0, 0, 0), &users[..1], 3, at(0));
    let frames = tick_frames(&mut o, at(0));
    let block = decode_block(&frames[0].1);
    let kinds: Vec<&str> = block.messages.iter().map(|m| m.r#type.as_str()).collect();
    assert_eq!(kinds, ["enter", "leave"]);
    assert!(block.messages.iter().all(|m| m.room == "p"), "presence messages name their room");
    let enter: serde_json::Value = serde_json::from_slice(&block.messages[0].data).unwrap();
    assert_eq!(enter, serde_json::json!({"count": 5, "users": ["u0", "u1"]}));
    let leave: serde_json::Value = serde_json::from_slice(&block.messages[1].data).unwrap();
    assert_eq!(leave, serde_json::json!({"count": 3, "users": ["u0"]}));
    assert!(tick_frames(&mut o, at(100)).is_empty());
}

#[test]
fn polling_pages_and_hints() {
    let mut o = owner(1);
    let r = room("poll");
    o.presence(&r, ShardId(0), (150, 0, 0, 0), &[], 0, at(0));
    for i in 0..5 {
        o.publish(&r, text(&format!("{i}")), api(Priority::Low), at(i * 1000)).unwrap();
        tick_frames(&mut o, at(i * 1000));
    }
    let body: serde_json::Value = serde_json::from_slice(&o.poll(&r, 0, 10)).unwrap();
    assert_eq!(body["messages"].as_array().unwrap().len(), 3, "history keeps 3");
    assert_eq!(body["truncated"], true);
    assert_eq!(body["poll_interval_ms"], 2000);
    let last = o.info(&r).last_seq;
    assert_eq!(body["next"].as_u64(), Some(last));
    let body: serde_json::Value = serde_json::from_slice(&o.poll(&r, last, 10)).unwrap();
    assert_eq!((body["messages"].as_array().unwrap().len(), body["truncated"].as_bool()), (0, Some(false)));
    assert!(Arc::ptr_eq(&o.poll(&r, last, 10), &o.poll(&r, last, 10)), "cached until the next block");
    // No existence oracle: a cursor past a known room's last seq answers as an unknown room.
    let future = o.poll(&r, last + 1_000, 10);
    let unknown = o.poll(&room("nobody"), last + 1_000, 10);
    let strip = |b: &[u8]| {
        let mut v: serde_json::Value = serde_json::from_slice(b).unwrap();
        v["poll_interval_ms"] = 0.into();
        v
    };
    assert_eq!(strip(&future), strip(&unknown));
    assert_eq!(strip(&future)["truncated"], true, "a cursor from elsewhere may have missed messages");
    let unknown: serde_json::Value = serde_json::from_slice(&o.poll(&room("nobody"), 7, 10)).unwrap();
    assert_eq!((unknown["next"].as_u64(), unknown["poll_interval_ms"].as_u64()), (Some(7), Some(1500)));
}

#[test]
fn a_cursor_from_a_forgotten_room_is_truncated() {
    let mut o = owner(1);
    let r = room("t");
    o.publish(&r, text("x"), api(Priority::Low), at(1_000)).unwrap();
    tick_frames(&mut o, at(1_000));
    let old = o.info(&r).last_seq;
    o.sweep(UnixMs(3_000));
    assert_eq!(o.rooms(), 0, "forgotten");
    o.publish(&r, text("y"), api(Priority::Low), at(3_000)).unwrap();
    tick_frames(&mut o, at(3_000));
    let body: serde_json::Value = serde_json::from_slice(&o.poll(&r, old, 10)).unwrap();
    assert_eq!(body["truncated"], true, "what came between is gone");
    assert_eq!(body["messages"].as_array().unwrap().len(), 1);
    let fresh: serde_json::Value = serde_json::from_slice(&o.poll(&r, 0, 10)).unwrap();
    assert_eq!(fresh["truncated"], false, "a new client asks from 0");
}

#[test]
fn rooms_with_members_only_do_not_count_and_go_with_their_members() {
    let mut o = owner(1); // rooms_max 2
    for i in 0..10 {
        o.presence(&room(&format!("m{i}")), ShardId(0), (1, 0, 0, 0), &[], 0, at(0));
    }
    assert_eq!((o.rooms(), o.kept_rooms()), (10, 0));
    o.publish(&room("a"), text("x"), api(Priority::Low), at(0)).unwrap();
    o.publish(&room("m0"), text("x"), api(Priority::Low), at(0)).unwrap();
    assert_eq!(o.kept_rooms(), 2);
    assert_eq!(o.publish(&room("b"), text("x"), api(Priority::Low), at(0)), Err(PublishError::RoomsFull));
    for i in 1..10 {
        o.presence(&room(&format!("m{i}")), ShardId(0), (0, 0, 0, 0), &[], 0, at(1));
    }
    assert_eq!(o.rooms(), 2, "member-only rooms leave with their last member (a and m0 stay)");
}

#[test]
fn moderation_and_attributes_outlive_idleness() {
    let mut o = Owner::new(OwnerConfig { rooms_max: 10, ..config(1) });
    let (r, s) = (room("mod"), room("attrs"));
    o.moderate(&r, &UserId::new("troll"), ModAction::Mute { until_ms: None }, at(0)).unwrap();
    o.set_attr(&s, "seat1", Some(b"bob"), at(0)).unwrap();
    o.sweep(UnixMs(3_600_000));
    assert_eq!(o.rooms(), 2, "an hour idle: both kept");
    let muted = Sender::Client { user: UserId::new("troll"), weight: 0, priority: Priority::Low };
    assert_eq!(o.publish(&r, text("x"), muted, at(3_600_000)), Err(PublishError::Muted));
    assert_eq!(o.attrs(&s).1.len(), 1);
    // A timed ban expires; then the room goes with the next sweep.
    let t = room("timed");
    o.moderate(&t, &UserId::new("u"), ModAction::Ban { until_ms: Some(5_000) }, at(0)).unwrap();
    o.sweep(UnixMs(3_600_000));
    assert!(o.moderation(&t, UnixMs(3_600_000)).bans.is_empty());
    assert_eq!(o.kept_rooms(), 2, "the expired ban's room was forgotten");
}

#[test]
fn idle_rooms_are_forgotten_and_seqs_still_increase() {
    let mut o = owner(1);
    let r = room("a");
    o.publish(&r, text("x"), api(Priority::Low), at(1_000)).unwrap();
    tick_frames(&mut o, at(1_000));
    let last = o.info(&r).last_seq;
    o.sweep(UnixMs(1_500));
    assert_eq!(o.rooms(), 1, "not idle long enough");
    o.sweep(UnixMs(2_500));
    assert_eq!(o.rooms(), 0);
    o.publish(&r, text("y"), api(Priority::Low), at(2_500)).unwrap();
    tick_frames(&mut o, at(2_500));
    assert!(o.info(&r).last_seq > last, "a re-created room continues above the old seqs");
}

#[test]
fn top_rooms_by_online() {
    let mut o = owner(2);
    o.presence(&room("a"), ShardId(0), (5, 0, 0, 0), &[], 0, at(0));
    o.presence(&room("b"), ShardId(1), (9, 0, 0, 0), &[], 0, at(0));
    let top = o.top(1);
    assert_eq!(top, vec![(room("b"), 9)]);
}

#[test]
fn a_resuming_joiner_gets_exactly_what_came_after_its_cursor() {
    let mut o = Owner::new(OwnerConfig { history_messages_max: 3, ..config(1) });
    let r = room("resume");
    o.presence(&r, ShardId(0), (1, 0, 0, 0), &[], 0, at(0));
    let mut seqs = Vec::new();
    for i in 0..5 {
        o.publish(&r, text(&format!("m{i}")), api(Priority::Whitelist), at(i * 1_000)).unwrap();
        tick_frames(&mut o, at(i * 1_000));
        seqs.push(o.info(&r).last_seq);
    }
    let backfill = |o: &mut Owner, after: u64| o.joined(&r, None, after, at(10_000)).first().map(|f| decode_block(f));
    let b = backfill(&mut o, seqs[2]).unwrap();
    assert_eq!((b.messages.len(), b.truncated, b.first_seq), (2, false, seqs[3]), "m3 and m4");
    assert!(backfill(&mut o, seqs[4]).is_none(), "up to date: nothing to send");
    let b = backfill(&mut o, seqs[0]).unwrap();
    assert_eq!((b.messages.len(), b.truncated), (3, true), "m1 fell out of the 3 kept");
    let full = backfill(&mut o, 0).unwrap();
    assert_eq!((full.messages.len(), full.truncated), (3, false));
}

#[test]
fn a_handed_over_room_continues_its_seqs_history_attributes_and_lists() {
    let mut old = owner(2);
    let r = room("r");
    let t = at(10_000);
    for (i, d) in ["a", "b", "c", "d"].into_iter().enumerate() {
        old.publish(&r, text(d), api(Priority::Whitelist), t).unwrap();
        tick_frames(&mut old, at(10_000 + i as i64));
    }
    old.set_attr(&r, "seat", Some(b"alice"), t).unwrap();
    tick_frames(&mut old, t);
    old.moderate(&r, &UserId::new("bob"), ModAction::Ban { until_ms: Some(99_000) }, t).unwrap();
    old.moderate(&r, &UserId::new("eve"), ModAction::Mute { until_ms: None }, t).unwrap();
    old.moderate(&r, &UserId::new("vip"), ModAction::Whitelist, t).unwrap();
    // A room that only ever had members and handed out no seq is not carried.
    old.presence(&room("idle"), ShardId(0), (1, 0, 0, 0), &[], 0, t);
    let last = old.info(&r).last_seq;

    let states = old.export(t.unix.0);
    assert_eq!(states.len(), 1, "{states:?}");
    let s = &states[0];
    assert_eq!((s.last_seq, s.history.len(), s.kept), (last, 3, true), "history_messages_max is 3");
    assert_eq!(s.evicted_seq, s.history[0].seq - 1);
    // Through the wire, as the upgrade sends it.
    let bytes = crate::proto::StateSnapshot { rooms: states }.encode_to_vec();
    let states = crate::proto::StateSnapshot::decode(&bytes[..]).unwrap().rooms;
    let replicas = super::replicas(&states, 64);
    assert_eq!(replicas.len(), 2, "bans and whitelist, not mutes: {replicas:?}");

    let mut new = owner(3);
    let done = new.import(states, 64, at(20_000));
    assert_eq!(done, Imported { rooms: 1, rooms_skipped: 0, entries_skipped: 0 });
    assert_eq!(new.info(&r).last_seq, last);
    assert_eq!(new.kept_rooms(), 1);
    // A client resuming after the second message gets exactly the rest; one from before the
    // kept history learns it was truncated.
    let resumed = new.joined(&r, None, last - 1, at(20_000));
    let b = decode_block(&resumed[0]);
    assert_eq!(b.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![last]);
    assert!(!b.truncated);
    let early = decode_block(&new.joined(&r, None, last - 4, at(20_000))[0]);
    assert!(early.truncated);
    // The next publish continues the seqs; attributes and lists came along.
    new.presence(&r, ShardId(2), (1, 0, 0, 0), &[], 0, at(20_000));
    new.publish(&r, text("e"), api(Priority::Whitelist), at(20_000)).unwrap();
    let out = tick_frames(&mut new, at(20_001));
    assert_eq!(decode_block(&out.last().unwrap().1).messages[0].seq, last + 1);
    assert_eq!(new.attrs(&r).1, vec![("seat".to_owned(), b"alice".to_vec())]);
    let lists = new.moderation(&r, UnixMs(20_000));
    assert_eq!(lists.bans, vec![Entry { user: "bob".into(), until_ms: Some(99_000) }]);
    assert_eq!(lists.mutes, vec![Entry { user: "eve".into(), until_ms: None }]);
    assert_eq!(
        new.publish(
            &r,
            text("x"),
            Sender::Client { user: UserId::new("eve"), weight: 0, priority: Priority::Low },
            at(20_000)
        ),
        Err(PublishError::Muted)
    );
}

#[test]
fn an_import_is_checked_like_input() {
    let mut new = owner(1);
    let state = |name: &str| crate::proto::RoomState {
        room: name.into(),
        base_seq: 5 << 20,
        last_seq: (5 << 20) + 2,
        kept: true,
        moderation: vec![crate::proto::ModerationEntry { list: 9, user: "x".into(), until_ms: 0 }],
        ..Default::default()
    };
    let done = new.import(vec![state("a b"), state("r1"), state("r1"), state("r2"), state("r3")], 64, at(1_000));
    // A bad name, a room already imported, and one over rooms_max (2) are refused; an unknown
    // list is skipped.
    assert_eq!(done, Imported { rooms: 2, rooms_skipped: 3, entries_skipped: 2 });
    assert_eq!(new.kept_rooms(), 2);
}

#[test]
fn acknowledged_sends_get_their_seq_once_cut_and_410_when_superseded() {
    let mut o = owner(1);
    let r = room("acks");
    let conn = |n: u32| ConnId { key: crate::ids::ConnKey(n), generation: 1 };
    o.presence(&r, ShardId(0), (1, 0, 0, 0), &[], 0, at(1_000));
    let corr = |key: &str| Message { coalesce_key: key.into(), ..text("score") };
    let a = o.publish(&r, text("a"), api(Priority::Whitelist), at(1_000)).unwrap();
    o.expect_ack(&r, a.id, ShardId(0), conn(1), "c-1".into());
    // A correction later superseded by another with the same key: its ack says so.
    let b = o.publish(&r, corr("pk"), api(Priority::Whitelist), at(1_000)).unwrap();
    o.expect_ack(&r, b.id, ShardId(0), conn(2), "c-2".into());
    let c = o.publish(&r, corr("pk"), api(Priority::Whitelist), at(1_000)).unwrap();
    assert!(c.coalesced);
    let frames = tick_frames(&mut o, at(1_050));
    let block = decode_block(&frames[0].1);
    let mut acks = Vec::new();
    o.take_acks(&mut acks);
    let by_id = |id: &str| acks.iter().find(|(_, _, a)| a.id == id).map(|(_, c, a)| (*c, a.clone())).unwrap();
    let (to, ack) = by_id("c-1");
    let seq_a = block.messages.iter().find(|m| m.id == a.id).unwrap().seq;
    assert_eq!((to, ack.seq, ack.code, ack.room.as_str()), (conn(1), seq_a, 0, "acks"));
    let (to, ack) = by_id("c-2");
    assert_eq!((to, ack.seq, ack.code), (conn(2), 0, 410), "superseded before it was sent");
    assert_eq!(acks.len(), 2);
    o.take_acks(&mut acks);
    assert_eq!(acks.len(), 2, "each ack once");
}
