//! Criterion: the room owner's work per block — mixing, encoding a block once — and the
//! per-member cost of fanning one shared frame out to many queues.
//! `cargo bench --bench rooms`
use std::hint::black_box;
use std::io::IoSlice;
use std::sync::Arc;

use barrage::envelope::Format;
use barrage::hub::host::outbox::{Outbox, Queue};
use barrage::ids::UnixMs;
use barrage::proto::Message;
use barrage::room::Priority;
use barrage::room::RoomName;
use barrage::room::frames::{self, BlockKind, Class};
use barrage::room::mixer::{Mixer, MixerLimits};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};

fn message(i: u64) -> Message {
    Message {
        id: i,
        room: "live:1".into(),
        seq: 1_000_000 + i,
        r#type: "chat".into(),
        priority: priority(i).wire(),
        weight: (i % 7) as i32,
        sender: format!("user{i}"),
        created_ms: 1_795_000_000_000,
        data: vec![b'x'; 100],
        ..Message::default()
    }
}

fn priority(i: u64) -> Priority {
    [Priority::Low, Priority::High, Priority::Whitelist][(i % 3) as usize]
}

fn mixer(c: &mut Criterion) {
    let limits = MixerLimits { block_messages_max: 20, pending_messages_max: 1000 };
    let mut g = c.benchmark_group("mixer");
    g.throughput(Throughput::Elements(200));
    g.bench_function("push 200, cut a block of 20", |b| {
        b.iter_batched(
            || (0..200).map(|i| (message(i), priority(i))).collect::<Vec<_>>(),
            |msgs| {
                let mut m = Mixer::default();
                for (msg, p) in msgs {
                    m.push(msg, p, &limits).unwrap();
                }
                black_box(m.cut(1_795_000_000_000, &limits))
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn block_encoding(c: &mut Criterion) {
    let room = RoomName::parse("live:1", 64).unwrap();
    let messages: Vec<Message> = (0..20).map(message).collect();
    let live = BlockKind::Live { top: Priority::Whitelist };
    let bytes = frames::block(&room, messages.clone(), live, 500_000, UnixMs(0), true);
    let mut g = c.benchmark_group("block");
    g.throughput(Throughput::Bytes((bytes.proto.len() + bytes.json.as_ref().map_or(0, |j| j.len())) as u64));
    g.bench_function("encode 20 x 100 B once, protobuf + JSON", |b| {
        b.iter_batched(
            || messages.clone(),
            |m| black_box(frames::block(&room, m, live, 500_000, UnixMs(0), true)),
            BatchSize::SmallInput,
        )
    });
    g.throughput(Throughput::Bytes(bytes.proto.len() as u64));
    g.bench_function("encode 20 x 100 B once, protobuf only", |b| {
        b.iter_batched(
            || messages.clone(),
            |m| black_box(frames::block(&room, m, live, 500_000, UnixMs(0), false)),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// What a shard does per member of a room when a block arrives: queue the shared frame, then
/// gather it for the member's send and account the completed send.
fn fan_out(c: &mut Criterion) {
    let members = 10_000;
    let frame = Arc::new(frames::SharedFrame::plain(vec![0u8; 2048].into(), None, Class::Low));
    let mut g = c.benchmark_group("fan-out");
    g.throughput(Throughput::Elements(members as u64));
    g.bench_function("queue + gather + sent, 10k members", |b| {
        let mut outbox = Outbox::default();
        let mut queues: Vec<Queue> = (0..members).map(|_| Queue::default()).collect();
        b.iter(|| {
            let id = outbox.add_shared(Arc::clone(&frame));
            for q in &mut queues {
                outbox.push(q, id, 16);
            }
            outbox.forget_if_unused(id);
            for q in &mut queues {
                let mut iov = [IoSlice::new(&[]); 16];
                let n = outbox.gather(q, frames::Wire { format: Format::Proto, deflate: false }, &mut iov);
                let len: usize = iov[..n].iter().map(|s| s.len()).sum();
                outbox.sent(q, frames::Wire { format: Format::Proto, deflate: false }, len);
            }
        })
    });
    g.finish();
}

/// permessage-deflate's price per block: one compression of a 20-message danmaku block (the
/// chat lines bench/danmaku_fixture.py draws from), per wire format and zlib level — paid once
/// per block whatever the room's size.
fn deflate(c: &mut Criterion) {
    const LINES: [&str; 10] = [
        "主播好",
        "这波操作太秀了 666666",
        "first time here, followed",
        "前方高能",
        "求BGM",
        "insane play",
        "哈哈哈哈哈哈",
        "{\"gift\":\"rocket\",\"count\":10,\"price\":500}",
        "GG WP",
        "爷青回",
    ];
    let messages: Vec<Message> = (0..20u64)
        .map(|i| Message {
            r#type: if i % 9 == 7 { "gift" } else { "chat" }.into(),
            sender: format!("星河{}", 1000 + i * 37),
            data: LINES[(i * 7 % 10) as usize].as_bytes().to_vec(),
            ..message(i)
        })
        .collect();
    let room = RoomName::parse("live:1", 64).unwrap();
    let block = frames::block(&room, messages, BlockKind::Live { top: Priority::Low }, 500_000, UnixMs(0), true);
    let mut g = c.benchmark_group("deflate");
    for (format, frame) in [("protobuf", &block.proto[..]), ("json", block.json.as_deref().unwrap())] {
        for level in [1, 6, 9] {
            let z = barrage::wire::deflate::compress_frame(frame, level, 0).map_or(frame.len(), |z| z.len());
            g.bench_function(format!("{format} block of {} B to {z} B, level {level}", frame.len()), |b| {
                b.iter(|| black_box(barrage::wire::deflate::compress_frame(black_box(frame), level, 0)))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, mixer, block_encoding, fan_out, deflate);
criterion_main!(benches);
