//! Criterion: the WebSocket codec and the envelope — bytes a shard parses per second.
//! `cargo bench --bench codec`
use std::hint::black_box;

use barrage::envelope::{self, Format};
use barrage::proto::{ClientFrame, Join, client_frame};
use barrage::wire::frame::{Opcode, apply_mask, masked_frame};
use barrage::wire::handshake::{HandshakeLimits, parse_request};
use barrage::wire::reader::{Flow, ReadLimits, Reader};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use prost::Message as _;

/// `count` masked client frames (FIN) carrying `payload`, back to back.
fn frames(count: usize, opcode: Opcode, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..count {
        masked_frame(true, opcode as u8, payload, [0x37, 0xfa, 0x21, 0x3d], &mut out);
    }
    out
}

fn reader(c: &mut Criterion) {
    let limits = ReadLimits { frame_bytes_max: 1 << 20, message_bytes_max: 1 << 20, deflate: false };
    let mut g = c.benchmark_group("reader");
    for size in [16usize, 128, 4096] {
        let stream = frames((64 * 1024 / (size + 8)).max(1), Opcode::Binary, &vec![7u8; size]);
        g.throughput(Throughput::Bytes(stream.len() as u64));
        g.bench_function(format!("binary frames of {size} B"), |b| {
            b.iter_batched_ref(
                || stream.clone(),
                |input| {
                    let mut r = Reader::default();
                    let mut n = 0;
                    r.feed(input, &limits, &mut |_| {
                        n += 1;
                        Flow::Continue
                    })
                    .unwrap();
                    black_box(n)
                },
                criterion::BatchSize::SmallInput,
            )
        });
    }
    let text = frames(256, Opcode::Text, "弹幕 danmaku ".repeat(8).as_bytes());
    g.throughput(Throughput::Bytes(text.len() as u64));
    g.bench_function("utf-8 text frames", |b| {
        b.iter_batched_ref(
            || text.clone(),
            |input| Reader::default().feed(input, &limits, &mut |_| Flow::Continue).unwrap(),
            criterion::BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn mask(c: &mut Criterion) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut g = c.benchmark_group("mask");
    g.throughput(Throughput::Bytes(buf.len() as u64));
    g.bench_function("apply_mask 64 KiB", |b| b.iter(|| apply_mask(black_box(&mut buf), [1, 2, 3, 4], 0)));
    g.finish();
}

fn handshake(c: &mut Criterion) {
    let req =
        b"GET /ws?room=live1&token=eyJhbGciOiJIUzI1NiJ9.e30.x HTTP/1.1\r\nHost: gw.example\r\nUpgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
Sec-WebSocket-Protocol: barrage.v1.proto\r\nUser-Agent: bench\r\n\r\n";
    let limits = HandshakeLimits { request_bytes_max: 4096, headers_max: 32 };
    let mut g = c.benchmark_group("handshake");
    g.throughput(Throughput::Bytes(req.len() as u64));
    g.bench_function("parse upgrade + accept key", |b| {
        b.iter(|| black_box(parse_request(black_box(req), &limits).unwrap()))
    });
    g.finish();
}

fn client_envelope(c: &mut Criterion) {
    let join =
        ClientFrame { frame: Some(client_frame::Frame::Join(Join { room: "live:1234".into(), ..Join::default() })) };
    let bin = join.encode_to_vec();
    let json = serde_json::to_vec(&join).unwrap();
    let mut g = c.benchmark_group("envelope");
    g.throughput(Throughput::Bytes(bin.len() as u64));
    g.bench_function("decode ClientFrame protobuf", |b| {
        b.iter(|| envelope::decode(Format::Proto, false, black_box(&bin)).unwrap())
    });
    g.throughput(Throughput::Bytes(json.len() as u64));
    g.bench_function("decode ClientFrame JSON", |b| {
        b.iter(|| envelope::decode(Format::Json, true, black_box(&json)).unwrap())
    });
    g.finish();
}

criterion_group!(benches, reader, mask, handshake, client_envelope);
criterion_main!(benches);
