//! The sans-IO wire alone: the PROXY v2 header parser, the upgrade request parser and the
//! client frame reader.
use barrage::wire::frame::{CONTROL_PAYLOAD_MAX, HEADER_BYTES_MAX};
use barrage::wire::handshake::{HandshakeLimits, parse_request};
use barrage::wire::{Flow, ReadLimits, Reader};

const HANDSHAKE: HandshakeLimits = HandshakeLimits { request_bytes_max: 0x1000, headers_max: 0x20 };

/// Small limits, so that the size checks and the spill buffer are reached quickly.
const READ: ReadLimits = ReadLimits { frame_bytes_max: 0x100, message_bytes_max: 0x400, deflate: true };

/// Any bytes as the start of a connection behind a balancer: the PROXY v2 parser never reads
/// past what it was given, claims a header no longer than its limit, and says the same for
/// every longer prefix once it has decided.
pub fn proxy(data: &[u8]) {
    use barrage::wire::proxy::{HEADER_BYTES_MAX, Parsed, parse};
    // Most inputs would fail the 12-byte signature at once: the first byte says whether to
    // start with it, so the fields behind it are reached.
    let Some((&first, rest)) = data.split_first() else { return };
    let mut bytes = if first & 1 == 1 { barrage::wire::proxy::SIGNATURE.to_vec() } else { Vec::new() };
    bytes.extend_from_slice(rest);
    let verdict = parse(&bytes);
    if let Ok(Parsed::Complete { consumed, .. }) = verdict {
        assert!(consumed <= bytes.len() && consumed <= HEADER_BYTES_MAX);
        assert_eq!(parse(&bytes[..consumed]), verdict, "the header alone decides the same");
    }
}

/// Any bytes as an upgrade request head.
pub fn handshake(data: &[u8]) {
    let _ = parse_request(data, &HANDSHAKE);
}

/// Client bytes cut into reads of one size (the first byte picks it); the reader never holds
/// more than a message, a control frame and a header.
pub fn frame_reader(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let mut reader = Reader::default();
    for chunk in rest.chunks(usize::from(first).max(1)) {
        let mut read = chunk.to_vec();
        if reader.feed(&mut read, &READ, &mut |_| Flow::Continue).is_err() {
            return;
        }
        let held_max = READ.message_bytes_max + CONTROL_PAYLOAD_MAX + HEADER_BYTES_MAX;
        assert!(reader.buffered_bytes() <= held_max);
    }
}

/// permessage-deflate's two inputs from a client: its extension offer (any text) and its
/// compressed messages (any bytes). The first byte picks which and, for a message, the size
/// limit; inflating never goes past it, and what the gateway compresses always inflates back.
pub fn deflate(data: &[u8]) {
    use barrage::wire::deflate::{Inflater, accepts, compress};
    let Some((&first, rest)) = data.split_first() else { return };
    if first & 1 == 0 {
        let _ = accepts(&String::from_utf8_lossy(rest));
        return;
    }
    let max = usize::from(first) * 64;
    let mut inflater = Inflater::default();
    if let Ok(out) = inflater.inflate(rest, max) {
        assert!(out.len() <= max);
    }
    let mut z = Vec::new();
    compress(rest, 1 + u32::from(first % 9), &mut z);
    assert_eq!(inflater.inflate(&z, rest.len()).ok(), Some(rest), "a compressed message inflates back");
}
