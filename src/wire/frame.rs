//! Frame headers (RFC 6455 5.2): decoding a client's header and unmasking its payload on the way
//! in (for [`super::reader`]), encoding the server's unmasked frames on the way out; and masked
//! client frames for the tests, benchmarks and load generator that play the client.

use super::close::CloseCode;
use super::reader::ReadError;

const FIN: u8 = 0x80;
/// RSV1: the message is compressed (permessage-deflate, when negotiated).
const RSV1: u8 = 0x40;
/// RSV2 and RSV3: no extension here uses them.
const RSV23: u8 = 0x30;
const OPCODE: u8 = 0x0F;
const MASKED: u8 = 0x80;
const LEN7: u8 = 0x7F;
/// Largest payload of a control frame, and of a length that fits in the 7-bit field.
pub const CONTROL_PAYLOAD_MAX: usize = 0x7D;
const LEN16_MARK: u8 = 0x7E;
const LEN64_MARK: u8 = 0x7F;
/// 2 fixed bytes + 8 length bytes + 4 mask bytes.
pub const HEADER_BYTES_MAX: usize = 0x0E;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    Continuation = 0x0,
    Text = 0x1,
    Binary = 0x2,
    Close = 0x8,
    Ping = 0x9,
    Pong = 0xA,
}

impl Opcode {
    /// None for the reserved opcodes 0x3-0x7 and 0xB-0xF.
    pub fn from_bits(bits: u8) -> Option<Self> {
        match bits {
            0x0 => Some(Self::Continuation),
            0x1 => Some(Self::Text),
            0x2 => Some(Self::Binary),
            0x8 => Some(Self::Close),
            0x9 => Some(Self::Ping),
            0xA => Some(Self::Pong),
            _ => None,
        }
    }

    /// Control frames (Close, Ping, Pong) have the high opcode bit set.
    pub fn is_control(self) -> bool {
        self as u8 & 0x8 != 0
    }
}

/// A decoded frame header. `payload_len` is the peer's claim, not yet checked against limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub fin: bool,
    /// RSV1: a compressed message's first frame (the reader refuses it where permessage-deflate
    /// was not negotiated, and on control and continuation frames).
    pub rsv1: bool,
    pub opcode: Opcode,
    pub mask: Option<[u8; 4]>,
    pub payload_len: u64,
    pub header_len: usize,
}

/// Ok(None) while the header is incomplete. Errors: RSV2 or RSV3 set, reserved opcode, control frame
/// with payload > 125 or not FIN, 64-bit length with the top bit set. Checks what it can from the
/// bytes present, so a bad first byte fails before the second arrives.
pub fn decode_header(buf: &[u8]) -> Result<Option<Header>, ReadError> {
    let Some(&b0) = buf.first() else {
        return Ok(None);
    };
    // No extension uses RSV2 or RSV3 (RFC 6455 5.2); RSV1 is the reader's to judge.
    if b0 & RSV23 != 0 {
        return Err(ReadError::Protocol("reserved bits set"));
    }
    let opcode = Opcode::from_bits(b0 & OPCODE).ok_or(ReadError::Protocol("reserved opcode"))?;
    let fin = b0 & FIN != 0;
    if opcode.is_control() && !fin {
        return Err(ReadError::Protocol("fragmented control frame"));
    }
    let Some(&b1) = buf.get(1) else {
        return Ok(None);
    };
    let len7 = b1 & LEN7;
    if opcode.is_control() && usize::from(len7) > CONTROL_PAYLOAD_MAX {
        return Err(ReadError::Protocol("control frame payload over 125 bytes"));
    }
    let Some((payload_len, len_end)) = decode_len(len7, buf)? else {
        return Ok(None);
    };
    let masked = b1 & MASKED != 0;
    let header_len = len_end + if masked { 4 } else { 0 };
    let Some(rest) = buf.get(len_end..header_len) else {
        return Ok(None);
    };
    let mask = if masked { rest.try_into().ok() } else { None };
    let header = Header { fin, rsv1: b0 & RSV1 != 0, opcode, mask, payload_len, header_len };
    Ok(Some(header))
}

/// The payload length and where the length field ends, or None while it is incomplete.
fn decode_len(len7: u8, buf: &[u8]) -> Result<Option<(u64, usize)>, ReadError> {
    match len7 {
        LEN16_MARK => {
            let Some(&[hi, lo]) = buf.get(2..4) else {
                return Ok(None);
            };
            Ok(Some((u64::from(u16::from_be_bytes([hi, lo])), 4)))
        }
        LEN64_MARK => {
            let Some(be) = buf.get(2..10).and_then(|b| <[u8; 8]>::try_from(b).ok()) else {
                return Ok(None);
            };
            let len = u64::from_be_bytes(be);
            // RFC 6455 5.2: "the most significant bit MUST be 0".
            if len >> 63 != 0 {
                return Err(ReadError::Protocol("64-bit length with the top bit set"));
            }
            Ok(Some((len, 10)))
        }
        short => Ok(Some((u64::from(short), 2))),
    }
}

/// XOR-unmask in place; `offset` is the position of buf[0] inside the payload (for payloads split
/// across reads). Eight bytes at a time through a u64 in safe code; the compiler vectorises it.
pub fn apply_mask(buf: &mut [u8], mask: [u8; 4], offset: usize) {
    let mut key = mask;
    key.rotate_left(offset % 4);
    let mut key8 = [0; 8];
    key8[..4].copy_from_slice(&key);
    key8[4..].copy_from_slice(&key);
    let word_mask = u64::from_ne_bytes(key8);
    let mut words = buf.chunks_exact_mut(8);
    for word in &mut words {
        let mut bytes = [0; 8];
        bytes.copy_from_slice(word);
        word.copy_from_slice(&(u64::from_ne_bytes(bytes) ^ word_mask).to_ne_bytes());
    }
    // The tail starts at a multiple of 8 from buf[0], so the rotated key still lines up.
    for (byte, k) in words.into_remainder().iter_mut().zip(key.iter().cycle()) {
        *byte ^= k;
    }
}

/// Length of an unmasked server frame header for this payload length (2, 4 or 10).
pub fn header_len(payload_len: usize) -> usize {
    if payload_len <= CONTROL_PAYLOAD_MAX {
        2
    } else if payload_len <= usize::from(u16::MAX) {
        4
    } else {
        10
    }
}

/// Appends an unmasked server frame header (FIN set) to `out`.
pub fn write_header(out: &mut Vec<u8>, opcode: Opcode, payload_len: usize) {
    write_head(out, FIN | opcode as u8, 0, payload_len as u64);
}

/// Appends a compressed message's header (FIN and RSV1 set) to `out`.
pub fn write_compressed_header(out: &mut Vec<u8>, opcode: Opcode, payload_len: usize) {
    write_head(out, FIN | RSV1 | opcode as u8, 0, payload_len as u64);
}

/// Appends a masked client frame (RFC 6455 5.3) to `out`: the header, then `payload` XORed with
/// `mask`. The gateway never sends one; its tests, benchmarks and load generator do, as clients.
/// `opcode` fills the first byte below FIN as given, so a test may pass a reserved opcode or set
/// RSV bits (0x70) to build a frame the reader must refuse.
pub fn masked_frame(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4], out: &mut Vec<u8>) {
    assert!(opcode & FIN == 0, "FIN is the `fin` argument, not an opcode bit");
    out.reserve(HEADER_BYTES_MAX + payload.len());
    let b0 = if fin { FIN | opcode } else { opcode };
    write_head(out, b0, MASKED, payload.len() as u64);
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], mask, 0);
}

/// Appends a header's first byte `b0` and `payload_len` in the shortest field that holds it, with
/// `masked` (0 or MASKED) in the length byte; a mask key, if any, comes next.
fn write_head(out: &mut Vec<u8>, b0: u8, masked: u8, payload_len: u64) {
    out.push(b0);
    // The bounds pick the field the length fits in, so no `as` below truncates.
    if payload_len <= CONTROL_PAYLOAD_MAX as u64 {
        out.push(masked | payload_len as u8);
    } else if payload_len <= u64::from(u16::MAX) {
        out.push(masked | LEN16_MARK);
        out.extend_from_slice(&(payload_len as u16).to_be_bytes());
    } else {
        out.push(masked | LEN64_MARK);
        out.extend_from_slice(&payload_len.to_be_bytes());
    }
}

/// A whole unmasked server frame (FIN) in one allocation.
pub fn frame(opcode: Opcode, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(header_len(payload.len()) + payload.len());
    write_header(&mut out, opcode, payload.len());
    out.extend_from_slice(payload);
    out
}

/// A Close frame; `reason` is truncated at a char boundary so the payload fits 125 bytes.
pub fn close_frame(code: CloseCode, reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(CONTROL_PAYLOAD_MAX - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = [0; CONTROL_PAYLOAD_MAX];
    payload[..2].copy_from_slice(&code.0.to_be_bytes());
    payload[2..2 + end].copy_from_slice(&reason.as_bytes()[..end]);
    frame(Opcode::Close, &payload[..2 + end])
}

#[cfg(test)]
mod tests {
    use super::super::reader::{Event, Flow, ReadLimits, Reader};
    use super::*;
    use proptest::prelude::*;

    /// A masked header alone, for lengths too large to build the payload of.
    fn masked_header(b0: u8, len: u64, mask: [u8; 4]) -> Vec<u8> {
        let mut out = Vec::new();
        write_head(&mut out, b0, MASKED, len);
        out.extend_from_slice(&mask);
        out
    }

    #[test]
    fn decodes_rfc_masked_hello() {
        // RFC 6455 5.7: a single-frame masked text message "Hello".
        let mut bytes = [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58];
        let header = decode_header(&bytes).unwrap().unwrap();
        assert_eq!(header.opcode, Opcode::Text);
        assert!(header.fin);
        assert_eq!(header.payload_len, 5);
        assert_eq!(header.header_len, 6);
        apply_mask(&mut bytes[6..], header.mask.unwrap(), 0);
        assert_eq!(&bytes[6..], b"Hello");
    }

    #[test]
    fn incomplete_headers_are_none() {
        let full = masked_header(0x82, 70_000, [1, 2, 3, 4]);
        for cut in 0..full.len() {
            assert_eq!(decode_header(&full[..cut]), Ok(None), "cut at {cut}");
        }
        assert!(decode_header(&full).unwrap().is_some());
    }

    #[test]
    fn rejects_rsv_bits_and_reserved_opcodes() {
        for b0 in [0xA1, 0x91, 0xF1] {
            assert_eq!(decode_header(&[b0]), Err(ReadError::Protocol("reserved bits set")));
        }
        // RSV1 is permessage-deflate's: decoded, judged by the reader.
        assert!(decode_header(&[0xC1, 0x80, 1, 2, 3, 4]).unwrap().unwrap().rsv1);
        for op in [0x3, 0x7, 0xB, 0xF] {
            let err = decode_header(&[0x80 | op, 0x80]);
            assert_eq!(err, Err(ReadError::Protocol("reserved opcode")));
        }
    }

    #[test]
    fn rejects_bad_control_frames() {
        let err = decode_header(&[0x09, 0x80]);
        assert_eq!(err, Err(ReadError::Protocol("fragmented control frame")));
        let err = decode_header(&[0x89, 0x80 | 126]);
        assert_eq!(err, Err(ReadError::Protocol("control frame payload over 125 bytes")));
        assert!(decode_header(&[0x89, 0x80 | 125]).unwrap().is_none());
    }

    #[test]
    fn rejects_64_bit_length_with_top_bit() {
        let mut bytes = vec![0x82, 0x80 | LEN64_MARK];
        bytes.extend_from_slice(&(1u64 << 63).to_be_bytes());
        let err = decode_header(&bytes);
        assert_eq!(err, Err(ReadError::Protocol("64-bit length with the top bit set")));
    }

    #[test]
    fn unmasked_header_has_no_mask() {
        let header = decode_header(&[0x82, 0x03]).unwrap().unwrap();
        assert_eq!(header.mask, None);
        assert_eq!(header.header_len, 2);
    }

    #[test]
    fn server_headers_pick_the_shortest_length() {
        assert_eq!(header_len(0), 2);
        assert_eq!(header_len(125), 2);
        assert_eq!(header_len(126), 4);
        assert_eq!(header_len(0xFFFF), 4);
        assert_eq!(header_len(0x1_0000), 10);
        assert_eq!(frame(Opcode::Text, b"hi"), [0x81, 0x02, b'h', b'i']);
    }

    /// Lengths at both edges of each length field (7-bit, 16-bit, 64-bit), every one mod 4.
    const EDGE_LENS: [usize; 12] = [0, 1, 2, 3, 125, 126, 127, 128, 0xFFFF, 0x1_0000, 0x1_0001, 0x1_0003];

    #[test]
    fn masked_frames_decode_to_their_payload() {
        let mask = [0xA1, 0xB2, 0xC3, 0xD4];
        for len in EDGE_LENS {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let mut out = vec![0xEE];
            masked_frame(true, Opcode::Binary as u8, &payload, mask, &mut out);
            assert_eq!(out[0], 0xEE, "appends, keeping what `out` held");
            let bytes = &out[1..];
            let header = decode_header(bytes).unwrap().unwrap();
            let header_len = header_len(len) + 4;
            let want = Header {
                fin: true,
                rsv1: false,
                opcode: Opcode::Binary,
                mask: Some(mask),
                payload_len: len as u64,
                header_len,
            };
            assert_eq!(header, want, "len {len}");
            assert_eq!(bytes.len(), header_len + len);
            let masked = &bytes[header_len..];
            assert!(masked.iter().zip(&payload).enumerate().all(|(i, (m, p))| m ^ mask[i % 4] == *p), "len {len}");
        }
        let mut out = Vec::new();
        masked_frame(false, 0x43, b"x", [0; 4], &mut out);
        assert_eq!(out, [0x43, 0x81, 0, 0, 0, 0, b'x'], "no FIN; RSV bits and opcode as given");
    }

    #[test]
    fn masked_frames_read_whole_from_every_split() {
        let limits = ReadLimits { frame_bytes_max: 0x2_0000, message_bytes_max: 0x2_0000, deflate: false };
        let mask = [0x37, 0xFA, 0x21, 0x3D];
        for len in EDGE_LENS {
            let payload: Vec<u8> = (0..len).map(|i| (i * 13) as u8).collect();
            // A fragmented message, so a frame of every length form is followed by another.
            let tail = [1, 2, 3];
            let mut bytes = Vec::new();
            masked_frame(false, Opcode::Binary as u8, &payload, mask, &mut bytes);
            masked_frame(true, Opcode::Continuation as u8, &tail, mask, &mut bytes);
            let want = [payload.as_slice(), &tail].concat();
            // Cuts in the header and in the first payload bytes, so the reader unmasks from each
            // key offset; and one just before the end.
            let first = header_len(len) + 4;
            for cut in (0..first + 5).chain([bytes.len() - 1]).filter(|&c| c < bytes.len()) {
                let mut reader = Reader::default();
                let mut got = Vec::new();
                let (mut a, mut b) = (bytes[..cut].to_vec(), bytes[cut..].to_vec());
                for input in [&mut a, &mut b] {
                    let fed = reader.feed(input, &limits, &mut |event| {
                        let Event::Binary(data) = event else { panic!("{event:?}") };
                        got.push(data.to_vec());
                        Flow::Continue
                    });
                    assert_eq!(fed, Ok(()), "len {len} cut {cut}");
                }
                assert_eq!(got, std::slice::from_ref(&want), "len {len} cut {cut}");
            }
        }
    }

    #[test]
    fn close_frame_truncates_at_char_boundary() {
        let reason = "é".repeat(100); // 200 bytes, 2 per char
        let out = close_frame(CloseCode::POLICY, &reason);
        // 123 bytes of reason allowed: 61 chars = 122 bytes.
        assert_eq!(out[1] as usize, 2 + 122);
        assert_eq!(&out[2..4], &1008u16.to_be_bytes());
        assert!(std::str::from_utf8(&out[4..]).is_ok());
        assert_eq!(close_frame(CloseCode::NORMAL, ""), [0x88, 0x02, 0x03, 0xE8]);
    }

    #[test]
    fn mask_matches_bytewise_at_every_offset() {
        let mask = [0xA1, 0xB2, 0xC3, 0xD4];
        let data: Vec<u8> = (0..=255).collect();
        for offset in 0..9 {
            for len in [0, 1, 3, 7, 8, 9, 17, 64, 100] {
                let mut fast = data[..len].to_vec();
                apply_mask(&mut fast, mask, offset);
                let slow: Vec<u8> = data[..len].iter().enumerate().map(|(i, b)| b ^ mask[(i + offset) % 4]).collect();
                assert_eq!(fast, slow, "offset {offset} len {len}");
            }
        }
    }

    fn opcode() -> impl Strategy<Value = Opcode> {
        prop_oneof![
            Just(Opcode::Continuation),
            Just(Opcode::Text),
            Just(Opcode::Binary),
            Just(Opcode::Close),
            Just(Opcode::Ping),
            Just(Opcode::Pong),
        ]
    }

    fn payload_len() -> impl Strategy<Value = usize> {
        prop_oneof![0..=130usize, 0xFF80..=0x1_0080usize, 0..(1usize << 40)]
    }

    proptest! {
        #[test]
        fn server_header_round_trips(op in opcode(), len in payload_len()) {
            let len = if op.is_control() { len % (CONTROL_PAYLOAD_MAX + 1) } else { len };
            let mut out = Vec::new();
            write_header(&mut out, op, len);
            prop_assert_eq!(out.len(), header_len(len));
            let header = decode_header(&out).unwrap().unwrap();
            prop_assert_eq!(header, Header {
                fin: true, rsv1: false, opcode: op, mask: None, payload_len: len as u64, header_len: out.len(),
            });
            if !op.is_control() {
                let mut z = Vec::new();
                write_compressed_header(&mut z, op, len);
                prop_assert!(decode_header(&z).unwrap().unwrap().rsv1);
            }
        }

        #[test]
        fn client_header_round_trips(
            op in opcode(), fin: bool, len in 0..(1u64 << 63), mask: [u8; 4],
        ) {
            let (fin, len) = if op.is_control() { (true, len % 126) } else { (fin, len) };
            let bytes = masked_header(u8::from(fin) << 7 | op as u8, len, mask);
            let header = decode_header(&bytes).unwrap().unwrap();
            prop_assert_eq!(header, Header {
                fin, rsv1: false, opcode: op, mask: Some(mask), payload_len: len, header_len: bytes.len(),
            });
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..16)) {
            if let Ok(Some(header)) = decode_header(&bytes) {
                prop_assert!(header.header_len <= bytes.len());
            }
        }

        #[test]
        fn masking_twice_is_identity(
            data in proptest::collection::vec(any::<u8>(), 0..100), mask: [u8; 4], split in 0..100usize,
        ) {
            let split = split.min(data.len());
            let mut buf = data.clone();
            apply_mask(&mut buf[..split], mask, 0);
            apply_mask(&mut buf[split..], mask, split);
            apply_mask(&mut buf, mask, 0);
            prop_assert_eq!(buf, data);
        }
    }
}
