//! A connection's inbound stream: the upgrade's response head, then the gateway's WebSocket
//! frames, counted as they pass. Payloads are never kept: per frame only its opcode and its
//! first few payload bytes (enough to tell a welcome from a block) are reported, and the state
//! between reads is 20 bytes whatever the split.
#![forbid(unsafe_code)]

use crate::handshake::{HeadError, HeadScan, Subprotocol};

/// Payload bytes reported per frame: 1 identifies a protobuf `ServerFrame`'s field, 4 a JSON
/// one (`{"we`, `{"bl`), 2 a close code.
pub const PREFIX_BYTES: usize = 4;

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// One server frame as it starts: its opcode and up to `PREFIX_BYTES` of its payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    pub opcode: u8,
    /// RSV1: compressed (permessage-deflate; only from a scan that allows it).
    pub compressed: bool,
    prefix: [u8; PREFIX_BYTES],
    prefix_len: u8,
}

/// What a frame is, as far as the load generator cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Welcome,
    Block,
    Close,
    Ping,
    Pong,
    Other,
}

impl Frame {
    pub fn prefix(&self) -> &[u8] {
        &self.prefix[..usize::from(self.prefix_len)]
    }

    /// A `ServerFrame` is a protobuf oneof: field 1 (`welcome`, tag 0x0A) or 2 (`block`,
    /// tag 0x12) comes first; in JSON its one key does.
    pub fn kind(&self, protocol: Subprotocol) -> Kind {
        let p = self.prefix();
        match (self.opcode, protocol) {
            (OP_CLOSE, _) => Kind::Close,
            (OP_PING, _) => Kind::Ping,
            (OP_PONG, _) => Kind::Pong,
            (OP_BINARY, Subprotocol::Proto) if p.first() == Some(&0x0A) => Kind::Welcome,
            (OP_BINARY, Subprotocol::Proto) if p.first() == Some(&0x12) => Kind::Block,
            (OP_TEXT, Subprotocol::Json) if p == b"{\"we" => Kind::Welcome,
            (OP_TEXT, Subprotocol::Json) if p == b"{\"bl" => Kind::Block,
            _ => Kind::Other,
        }
    }

    /// The status code of a close frame that carries one.
    pub fn close_code(&self) -> Option<u16> {
        match (self.opcode, self.prefix()) {
            (OP_CLOSE, [a, b, ..]) => Some(u16::from_be_bytes([*a, *b])),
            _ => None,
        }
    }
}

/// A server frame the generator will not read past.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// Server frames are never masked (RFC 6455 5.1).
    Masked,
    /// RSV bits without an extension, or an undefined opcode.
    Reserved,
    /// A payload length over 4 GiB (the gateway's are a few KB).
    TooLong,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Step {
    #[default]
    Header,
    Prefix,
    Skip,
}

/// Frame boundaries across reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrameScan {
    /// Payload bytes of the current frame not yet seen.
    remaining: u32,
    /// The header so far (2, 4 or 10 bytes); then the first payload bytes.
    buf: [u8; 10],
    buf_len: u8,
    opcode: u8,
    compressed: bool,
    step: Step,
    /// The client negotiated permessage-deflate: RSV1 marks a compressed frame.
    pub deflate: bool,
}

/// Header length from the second header byte: 2, or 2 + 2 / 2 + 8 extended length bytes.
fn header_len(second: u8) -> usize {
    match second & 0x7F {
        126 => 4,
        127 => 10,
        _ => 2,
    }
}

impl FrameScan {
    /// Feeds bytes; `on` hears of each frame once its prefix is in (or its payload ended).
    pub fn feed(&mut self, mut bytes: &[u8], on: &mut impl FnMut(Frame)) -> Result<(), FrameError> {
        while !bytes.is_empty() {
            match self.step {
                Step::Header => bytes = self.header(bytes, on)?,
                Step::Prefix => bytes = self.prefix(bytes, on),
                Step::Skip => {
                    let n = bytes.len().min(self.remaining as usize);
                    self.remaining -= n as u32;
                    bytes = &bytes[n..];
                    if self.remaining == 0 {
                        self.step = Step::Header;
                    }
                }
            }
        }
        Ok(())
    }

    fn header<'a>(&mut self, mut bytes: &'a [u8], on: &mut impl FnMut(Frame)) -> Result<&'a [u8], FrameError> {
        loop {
            let have = usize::from(self.buf_len);
            let need = if have < 2 { 2 } else { header_len(self.buf[1]) };
            if have == need {
                break;
            }
            let n = (need - have).min(bytes.len());
            self.buf[have..have + n].copy_from_slice(&bytes[..n]);
            self.buf_len += n as u8;
            bytes = &bytes[n..];
            if n == 0 {
                return Ok(bytes);
            }
        }
        let (b0, b1) = (self.buf[0], self.buf[1]);
        let rsv = if self.deflate { 0x30 } else { 0x70 };
        if b0 & rsv != 0 || !matches!(b0 & 0x0F, OP_CONTINUATION | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG) {
            return Err(FrameError::Reserved);
        }
        if b1 & 0x80 != 0 {
            return Err(FrameError::Masked);
        }
        let len = match b1 & 0x7F {
            126 => u64::from(u16::from_be_bytes([self.buf[2], self.buf[3]])),
            127 => u64::from_be_bytes([
                self.buf[2],
                self.buf[3],
                self.buf[4],
                self.buf[5],
                self.buf[6],
                self.buf[7],
                self.buf[8],
                self.buf[9],
            ]),
            short => u64::from(short),
        };
        self.remaining = u32::try_from(len).map_err(|_| FrameError::TooLong)?;
        self.opcode = b0 & 0x0F;
        self.compressed = b0 & 0x40 != 0;
        self.buf_len = 0;
        self.step = Step::Prefix;
        if self.remaining == 0 {
            self.emit(on);
        }
        Ok(bytes)
    }

    fn prefix<'a>(&mut self, bytes: &'a [u8], on: &mut impl FnMut(Frame)) -> &'a [u8] {
        let have = usize::from(self.buf_len);
        let n = (PREFIX_BYTES - have).min(self.remaining as usize).min(bytes.len());
        self.buf[have..have + n].copy_from_slice(&bytes[..n]);
        self.buf_len += n as u8;
        self.remaining -= n as u32;
        if usize::from(self.buf_len) == PREFIX_BYTES || self.remaining == 0 {
            self.emit(on);
        }
        &bytes[n..]
    }

    /// Reports the frame and moves on to its payload's rest, or to the next header.
    fn emit(&mut self, on: &mut impl FnMut(Frame)) {
        let mut prefix = [0; PREFIX_BYTES];
        prefix.copy_from_slice(&self.buf[..PREFIX_BYTES]);
        on(Frame { opcode: self.opcode, compressed: self.compressed, prefix, prefix_len: self.buf_len });
        self.buf_len = 0;
        self.step = if self.remaining == 0 { Step::Header } else { Step::Skip };
    }
}

/// What the stream said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// The 101 with the right accept arrived.
    Upgraded,
    Frame(Frame),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadError {
    Head(HeadError),
    Frame(FrameError),
}

/// One connection's whole inbound stream: head first, frames after.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reader {
    Head(HeadScan),
    Frames(FrameScan),
}

impl Default for Reader {
    fn default() -> Reader {
        Reader::Head(HeadScan::default())
    }
}

impl Reader {
    /// Feeds one read's bytes; events come in stream order. After an error the stream is
    /// not to be fed again.
    pub fn feed(&mut self, bytes: &[u8], mut on: impl FnMut(Event)) -> Result<(), ReadError> {
        let mut rest = bytes;
        if let Reader::Head(head) = self {
            match head.feed(bytes).map_err(ReadError::Head)? {
                None => return Ok(()),
                Some(n) => {
                    on(Event::Upgraded);
                    *self = Reader::Frames(FrameScan::default());
                    rest = &bytes[n..];
                }
            }
        }
        if let Reader::Frames(frames) = self {
            frames.feed(rest, &mut |f| on(Event::Frame(f))).map_err(ReadError::Frame)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HEAD: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
        Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";

    /// An unmasked server frame.
    fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![0x80 | opcode];
        match payload.len() {
            n if n < 126 => out.push(n as u8),
            n if n < 65536 => {
                out.push(126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(payload);
        out
    }

    /// A head, then frames of every header size and kind.
    fn stream() -> (Vec<u8>, Seen) {
        let mut block_big = vec![0x12];
        block_big.resize(300, 7);
        let mut block_huge = vec![0x12, 0x0A];
        block_huge.resize(70_000, 0x12);
        let parts: Vec<(Vec<u8>, Kind, Option<u16>)> = vec![
            (frame(OP_BINARY, &[0x0A, 0x02, 0x08, 0x01]), Kind::Welcome, None),
            (frame(OP_BINARY, &[0x12]), Kind::Block, None),
            (frame(OP_BINARY, &block_big), Kind::Block, None),
            (frame(OP_PING, b""), Kind::Ping, None),
            (frame(OP_BINARY, &block_huge), Kind::Block, None),
            (frame(OP_PONG, b"ab"), Kind::Pong, None),
            (frame(OP_BINARY, &[0x32, 0x00]), Kind::Other, None),
            (frame(OP_BINARY, b""), Kind::Other, None),
            (frame(OP_CLOSE, &[0x03, 0xE9, b'b', b'y', b'e']), Kind::Close, Some(1001)),
        ];
        let mut bytes = HEAD.to_vec();
        let mut want = Vec::new();
        for (b, k, c) in parts {
            bytes.extend_from_slice(&b);
            want.push((k, c));
        }
        (bytes, want)
    }

    /// Frames as seen: kind and close code.
    type Seen = Vec<(Kind, Option<u16>)>;

    /// Feeds `bytes` cut at `cuts`; returns (upgraded count, frames) or the error.
    fn run(bytes: &[u8], cuts: &[usize], protocol: Subprotocol) -> Result<(u32, Seen), ReadError> {
        let mut r = Reader::default();
        let (mut upgraded, mut frames) = (0, Vec::new());
        let mut at = 0;
        for &cut in cuts.iter().chain(std::iter::once(&bytes.len())) {
            r.feed(&bytes[at..cut], |e| match e {
                Event::Upgraded => upgraded += 1,
                Event::Frame(f) => frames.push((f.kind(protocol), f.close_code())),
            })?;
            at = cut;
        }
        Ok((upgraded, frames))
    }

    #[test]
    fn every_two_way_split_gives_the_same_frames() {
        let (bytes, want) = stream();
        for cut in 0..=bytes.len() {
            assert_eq!(run(&bytes, &[cut], Subprotocol::Proto), Ok((1, want.clone())), "cut {cut}");
        }
    }

    #[test]
    fn every_three_way_split_of_the_small_frames_gives_the_same_frames() {
        let mut bytes = HEAD[HEAD.len() - 8..].to_vec();
        let mut want = Vec::new();
        for (op, payload, kind) in [
            (OP_BINARY, &[0x0Au8, 1][..], Kind::Welcome),
            (OP_BINARY, &[0x12; 130][..], Kind::Block),
            (OP_CLOSE, &[0x03, 0xE8][..], Kind::Close),
        ] {
            bytes.extend_from_slice(&frame(op, payload));
            want.push(kind);
        }
        let head_start = HEAD.len() - 8;
        for a in 0..=bytes.len() {
            for b in a..=bytes.len() {
                let mut r = Reader::default();
                let Reader::Head(h) = &mut r else { unreachable!() };
                assert_eq!(h.feed(&HEAD[..head_start]), Ok(None));
                let mut kinds = Vec::new();
                let mut up = 0;
                for piece in [&bytes[..a], &bytes[a..b], &bytes[b..]] {
                    r.feed(piece, |e| match e {
                        Event::Upgraded => up += 1,
                        Event::Frame(f) => kinds.push(f.kind(Subprotocol::Proto)),
                    })
                    .unwrap();
                }
                assert_eq!((up, &kinds), (1, &want), "cuts {a} {b}");
            }
        }
    }

    #[test]
    fn json_frames_are_told_apart_by_their_key() {
        let mut bytes = HEAD.to_vec();
        bytes.extend(frame(OP_TEXT, br#"{"welcome":{"connId":"1"}}"#));
        bytes.extend(frame(OP_TEXT, br#"{"block":{"room":"r1"}}"#));
        bytes.extend(frame(OP_TEXT, br#"{"broadcast":{}}"#));
        bytes.extend(frame(OP_TEXT, br#"{}"#));
        bytes.extend(frame(OP_BINARY, &[0x0A]));
        let want = vec![
            (Kind::Welcome, None),
            (Kind::Block, None),
            (Kind::Other, None),
            (Kind::Other, None),
            (Kind::Other, None),
        ];
        for cut in 0..=bytes.len() {
            assert_eq!(run(&bytes, &[cut], Subprotocol::Json), Ok((1, want.clone())), "cut {cut}");
        }
    }

    #[test]
    fn refusals_and_bad_frames_are_errors() {
        let refused = b"HTTP/1.1 404 Not Found\r\n\r\n";
        assert_eq!(run(refused, &[], Subprotocol::Proto), Err(ReadError::Head(HeadError::Status(404))));
        let mut masked = HEAD.to_vec();
        masked.extend_from_slice(&[0x82, 0x81, 1, 2, 3, 4, 0]);
        assert_eq!(run(&masked, &[], Subprotocol::Proto), Err(ReadError::Frame(FrameError::Masked)));
        let mut rsv = HEAD.to_vec();
        rsv.extend_from_slice(&[0xC2, 0x00]);
        assert_eq!(run(&rsv, &[], Subprotocol::Proto), Err(ReadError::Frame(FrameError::Reserved)));
        let mut op = HEAD.to_vec();
        op.extend_from_slice(&[0x83, 0x00]);
        assert_eq!(run(&op, &[], Subprotocol::Proto), Err(ReadError::Frame(FrameError::Reserved)));
        let mut long = HEAD.to_vec();
        long.extend_from_slice(&[0x82, 127, 0, 0, 0, 1, 0, 0, 0, 0]);
        assert_eq!(run(&long, &[], Subprotocol::Proto), Err(ReadError::Frame(FrameError::TooLong)));
    }

    #[test]
    fn state_stays_small() {
        assert!(std::mem::size_of::<Reader>() <= 20, "{}", std::mem::size_of::<Reader>());
    }

    proptest! {
        #[test]
        fn any_split_into_reads_gives_the_same_frames(cuts in proptest::collection::vec(0usize..71_000, 0..12)) {
            let (bytes, want) = stream();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (bytes.len() + 1)).collect();
            cuts.sort_unstable();
            prop_assert_eq!(run(&bytes, &cuts, Subprotocol::Proto), Ok((1, want)));
        }
    }
}
