//! A `fanout` subscriber's inbound stream: the upgrade's response head, then WebSocket frames
//! whose data messages are taken apart as they arrive — for peers each message is one published
//! message (its first `HEADER_BYTES` kept), for barrage one `ServerFrame` walked by `pbwalk`, or
//! handed on as it comes for the caller's own walk (`Body::Pass`: `upgrade_walk`).
//! No payload is copied beyond a header, nothing is reassembled, nothing allocates: the state
//! between reads is about a hundred bytes whatever the frame sizes and the splits.
#![forbid(unsafe_code)]

use crate::fanout_msg::HEADER_BYTES;
use crate::frames::{FrameError, OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT, ReadError};
use crate::handshake::HeadScan;
use crate::pbwalk::{Found, PbWalk};

/// A data message (all its frames) over this many payload bytes is counted as too large (and
/// still read: the walk keeps no more state for a big one). barrage's blocks are ~140 bytes a
/// message, so 1 MiB is ~7,000 messages in one frame.
pub const FRAME_BYTES_MAX: u64 = 1 << 20;

/// What the stream said, in order.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// The 101 with the right accept arrived.
    Upgraded,
    /// barrage's `welcome`; for Socket.IO and Pusher the server's acknowledgement of the join.
    Welcome,
    /// Socket.IO's and Pusher's open message: the client now sends its join (`Kind::hello`).
    Opened,
    /// A published message (its header).
    Message(&'a [u8; HEADER_BYTES]),
    /// A message too short to hold the header (or a barrage message without data).
    Short,
    /// Payload bytes of the open data message, in order (`Body::Pass` only).
    Data(&'a [u8]),
    /// A data message ended (one WebSocket message: a peer's message, a barrage frame).
    DataEnd,
    /// A barrage frame that is not a well-formed `ServerFrame` (its rest was ignored).
    Malformed,
    /// A data message grew past `FRAME_BYTES_MAX` (reported once; it is still read).
    TooLarge,
    /// A ping: answer it.
    Ping,
    /// A close frame, with its code if it had one.
    Close(Option<u16>),
}

/// How data messages are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Body {
    /// Each data message is one published message.
    Raw { hdr: [u8; HEADER_BYTES], len: u8 },
    /// Each data message is a barrage `ServerFrame`.
    Proto(PbWalk),
    /// The data messages' payload goes to the caller as it arrives (`Event::Data`).
    Pass,
    /// Text messages of a protocol with its own envelope (Socket.IO, Pusher): a published
    /// message carries `#` and its header in 48 hex digits somewhere inside; any other message
    /// is the protocol's own: the first (open) is `Opened`, the second (joined) `Welcome`.
    Tagged { hdr: [u8; HEADER_BYTES], nibbles: u8, hash: bool, control: u8 },
}

impl Body {
    pub fn raw() -> Body {
        Body::Raw { hdr: [0; HEADER_BYTES], len: 0 }
    }

    pub fn proto() -> Body {
        Body::Proto(PbWalk::default())
    }

    pub fn tagged() -> Body {
        Body::Tagged { hdr: [0; HEADER_BYTES], nibbles: 0, hash: false, control: 0 }
    }

    fn feed(&mut self, bytes: &[u8], on: &mut impl FnMut(Event<'_>)) {
        match self {
            Body::Raw { hdr, len } => {
                let have = usize::from(*len);
                let n = (HEADER_BYTES - have).min(bytes.len());
                hdr[have..have + n].copy_from_slice(&bytes[..n]);
                *len += n as u8;
            }
            Body::Proto(walk) => walk.feed(bytes, &mut |f| {
                on(match f {
                    Found::Welcome => Event::Welcome,
                    Found::Message(h) => Event::Message(h),
                    Found::Short => Event::Short,
                })
            }),
            Body::Pass if bytes.is_empty() => {}
            Body::Pass => on(Event::Data(bytes)),
            Body::Tagged { hdr, nibbles, hash, .. } => {
                for &b in bytes {
                    if !*hash {
                        *hash = b == b'#';
                        continue;
                    }
                    if usize::from(*nibbles) == 2 * HEADER_BYTES {
                        break;
                    }
                    let Some(v) = (b as char).to_digit(16) else { break };
                    let i = usize::from(*nibbles / 2);
                    hdr[i] = if *nibbles % 2 == 0 { (v as u8) << 4 } else { hdr[i] | v as u8 };
                    *nibbles += 1;
                }
            }
        }
    }

    fn finish(&mut self, on: &mut impl FnMut(Event<'_>)) {
        match self {
            Body::Raw { hdr, len } => {
                if usize::from(*len) == HEADER_BYTES {
                    on(Event::Message(hdr));
                } else {
                    on(Event::Short);
                }
                *len = 0;
            }
            Body::Proto(walk) => {
                if walk.finish().is_err() {
                    on(Event::Malformed);
                }
            }
            Body::Pass => {}
            Body::Tagged { hdr, nibbles, hash, control } => {
                match (*hash, usize::from(*nibbles) == 2 * HEADER_BYTES) {
                    (true, true) => on(Event::Message(hdr)),
                    (true, false) => on(Event::Short),
                    (false, _) => {
                        *control = control.saturating_add(1);
                        match *control {
                            1 => on(Event::Opened),
                            2 => on(Event::Welcome),
                            _ => {}
                        }
                    }
                }
                (*nibbles, *hash) = (0, false);
            }
        }
    }
}

/// Where the frame reader is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Head,
    Header,
    Payload,
}

/// One subscriber's stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubReader {
    head: HeadScan,
    step: Step,
    /// The frame header so far (2, 4 or 10 bytes).
    buf: [u8; 10],
    buf_len: u8,
    /// The current frame: opcode, FIN, payload bytes not yet read.
    opcode: u8,
    fin: bool,
    remaining: u32,
    /// A data message is open (its first frame came, its FIN frame not yet).
    in_message: bool,
    /// Payload bytes of the open data message so far.
    message_bytes: u64,
    /// The first two payload bytes of a close frame (its code).
    ctrl: [u8; 2],
    ctrl_len: u8,
    body: Body,
}

impl SubReader {
    pub fn new(body: Body) -> SubReader {
        SubReader {
            head: HeadScan::default(),
            step: Step::Head,
            buf: [0; 10],
            buf_len: 0,
            opcode: 0,
            fin: false,
            remaining: 0,
            in_message: false,
            message_bytes: 0,
            ctrl: [0; 2],
            ctrl_len: 0,
            body,
        }
    }

    /// Feeds one read's bytes; events come in stream order. After an error the stream is
    /// not to be fed again.
    pub fn feed(&mut self, mut bytes: &[u8], mut on: impl FnMut(Event<'_>)) -> Result<(), ReadError> {
        if self.step == Step::Head {
            match self.head.feed(bytes).map_err(ReadError::Head)? {
                None => return Ok(()),
                Some(n) => {
                    on(Event::Upgraded);
                    self.step = Step::Header;
                    bytes = &bytes[n..];
                }
            }
        }
        while !bytes.is_empty() {
            bytes = match self.step {
                Step::Header => self.header(bytes, &mut on).map_err(ReadError::Frame)?,
                Step::Payload => self.payload(bytes, &mut on),
                Step::Head => unreachable!("the head is read above"),
            };
        }
        Ok(())
    }

    fn header<'a>(&mut self, mut bytes: &'a [u8], on: &mut impl FnMut(Event<'_>)) -> Result<&'a [u8], FrameError> {
        loop {
            let have = usize::from(self.buf_len);
            let need = if have < 2 { 2 } else { header_len(self.buf[1]) };
            if have == need {
                break;
            }
            let n = (need - have).min(bytes.len());
            if n == 0 {
                return Ok(bytes);
            }
            self.buf[have..have + n].copy_from_slice(&bytes[..n]);
            self.buf_len += n as u8;
            bytes = &bytes[n..];
        }
        self.buf_len = 0;
        let (b0, b1) = (self.buf[0], self.buf[1]);
        let opcode = b0 & 0x0F;
        let fin = b0 & 0x80 != 0;
        if b1 & 0x80 != 0 {
            return Err(FrameError::Masked);
        }
        let len = match b1 & 0x7F {
            126 => u64::from(u16::from_be_bytes([self.buf[2], self.buf[3]])),
            127 => u64::from_be_bytes(self.buf[2..10].try_into().expect("10 header bytes")),
            short => u64::from(short),
        };
        let control = opcode >= 0x8;
        let known = matches!(opcode, OP_CONTINUATION | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG);
        let sequence_ok = match opcode {
            OP_CONTINUATION => self.in_message,
            OP_TEXT | OP_BINARY => !self.in_message,
            _ => fin && len <= 125,
        };
        if b0 & 0x70 != 0 || !known || !sequence_ok {
            return Err(FrameError::Reserved);
        }
        self.remaining = u32::try_from(len).map_err(|_| FrameError::TooLong)?;
        self.opcode = opcode;
        self.fin = fin;
        self.ctrl_len = 0;
        if !control {
            if !self.in_message {
                self.in_message = true;
                self.message_bytes = 0;
            }
            let before = self.message_bytes;
            self.message_bytes += len;
            if before <= FRAME_BYTES_MAX && self.message_bytes > FRAME_BYTES_MAX {
                on(Event::TooLarge);
            }
        }
        self.step = Step::Payload;
        if self.remaining == 0 {
            self.frame_end(on);
        }
        Ok(bytes)
    }

    fn payload<'a>(&mut self, bytes: &'a [u8], on: &mut impl FnMut(Event<'_>)) -> &'a [u8] {
        let n = bytes.len().min(self.remaining as usize);
        let (mine, rest) = bytes.split_at(n);
        if self.opcode < 0x8 {
            self.body.feed(mine, on);
        } else if self.opcode == OP_CLOSE {
            let have = usize::from(self.ctrl_len);
            let k = (2 - have).min(mine.len());
            self.ctrl[have..have + k].copy_from_slice(&mine[..k]);
            self.ctrl_len += k as u8;
        }
        self.remaining -= n as u32;
        if self.remaining == 0 {
            self.frame_end(on);
        }
        rest
    }

    fn frame_end(&mut self, on: &mut impl FnMut(Event<'_>)) {
        self.step = Step::Header;
        match self.opcode {
            OP_PING => on(Event::Ping),
            OP_CLOSE => on(Event::Close((self.ctrl_len == 2).then(|| u16::from_be_bytes(self.ctrl)))),
            OP_PONG => {}
            _ if self.fin => {
                self.in_message = false;
                self.body.finish(on);
                on(Event::DataEnd);
            }
            _ => {}
        }
    }
}

/// Header length from the second header byte: 2, or 2 + 2 / 2 + 8 extended length bytes.
fn header_len(second: u8) -> usize {
    match second & 0x7F {
        126 => 4,
        127 => 10,
        _ => 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fanout_msg::{Header, message};
    use crate::handshake::HeadError;
    use barrage::proto::{Block, Message, ServerFrame, server_frame};
    use proptest::prelude::*;
    use prost::Message as _;

    const HEAD: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
        Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";

    /// An unmasked server frame.
    fn frame(b0: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![b0];
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

    fn msg(seq: u64, len: usize) -> Vec<u8> {
        let mut m = Vec::new();
        message(&Header { seq, send_ns: 5, room: 0, publisher: 0 }, len, &mut m);
        m
    }

    #[derive(Debug, PartialEq, Eq, Clone)]
    enum Seen {
        Up,
        Welcome,
        Opened,
        Seq(u64),
        Short,
        End,
        Malformed,
        TooLarge,
        Ping,
        Close(Option<u16>),
        Data(Vec<u8>),
    }

    fn run(body: Body, bytes: &[u8], cuts: &[usize]) -> Result<Vec<Seen>, ReadError> {
        let mut r = SubReader::new(body);
        let mut seen = Vec::new();
        let mut at = 0;
        for &cut in cuts.iter().chain(std::iter::once(&bytes.len())) {
            r.feed(&bytes[at..cut], |e| {
                seen.push(match e {
                    Event::Upgraded => Seen::Up,
                    Event::Welcome => Seen::Welcome,
                    Event::Opened => Seen::Opened,
                    Event::Message(h) => Seen::Seq(Header::read(h).seq),
                    Event::Short => Seen::Short,
                    Event::DataEnd => Seen::End,
                    Event::Malformed => Seen::Malformed,
                    Event::TooLarge => Seen::TooLarge,
                    Event::Ping => Seen::Ping,
                    Event::Close(c) => Seen::Close(c),
                    Event::Data(d) => Seen::Data(d.to_vec()),
                })
            })?;
            at = cut;
        }
        Ok(seen)
    }

    /// Socket.IO's and Pusher's envelopes: the second protocol message is the welcome, a
    /// published message's header is read from its hex digits, cut anywhere.
    #[test]
    fn tagged_messages_inside_protocol_envelopes() {
        let hex: String = msg(7, 24).iter().map(|b| format!("{b:02x}")).collect();
        let mut b = HEAD.to_vec();
        b.extend(frame(0x81, br#"0{"sid":"abc","pingInterval":600000}"#));
        b.extend(frame(0x81, br#"40{"sid":"def"}"#));
        b.extend(frame(0x81, format!(r##"42["m","#{hex}...."]"##).as_bytes()));
        b.extend(frame(0x81, format!(r##"{{"event":"m","channel":"r0","data":"#{hex}"}}"##).as_bytes()));
        b.extend(frame(0x81, br##"42["m","#00ff"]"##));
        let want = [
            Seen::Up,
            Seen::Opened,
            Seen::End,
            Seen::Welcome,
            Seen::End,
            Seen::Seq(7),
            Seen::End,
            Seen::Seq(7),
            Seen::End,
            Seen::Short,
            Seen::End,
        ];
        for cut in [0, 1, 40, 97, 150, b.len() - 3] {
            assert_eq!(run(Body::tagged(), &b, &[cut]).unwrap(), want, "cut at {cut}");
        }
    }

    /// A peer's stream: messages of every header size, a fragmented one with a ping inside,
    /// a text one, a short one, then a close.
    fn broadcast_stream() -> (Vec<u8>, Vec<Seen>) {
        let mut b = HEAD.to_vec();
        b.extend(frame(0x82, &msg(0, 100)));
        b.extend(frame(0x82, &msg(1, 300)));
        b.extend(frame(0x82, &msg(2, 70_000)));
        let m3 = msg(3, 100);
        b.extend(frame(0x02, &m3[..10]));
        b.extend(frame(0x89, b"hi"));
        b.extend(frame(0x00, &m3[10..30]));
        b.extend(frame(0x80, &m3[30..]));
        b.extend(frame(0x81, &msg(4, 24)));
        b.extend(frame(0x82, &[1, 2, 3]));
        b.extend(frame(0x8A, b""));
        b.extend(frame(0x88, &[0x03, 0xE9, b'x']));
        use Seen::*;
        let want = vec![
            Up,
            Seq(0),
            End,
            Seq(1),
            End,
            Seq(2),
            End,
            Ping,
            Seq(3),
            End,
            Seq(4),
            End,
            Short,
            End,
            Close(Some(1001)),
        ];
        (b, want)
    }

    fn block(seqs: &[u64]) -> Vec<u8> {
        let messages = seqs
            .iter()
            .map(|&s| Message {
                seq: s + 100,
                room: "r0".into(),
                r#type: "chat".into(),
                data: msg(s, 100),
                ..Default::default()
            })
            .collect();
        let b = Block { room: "r0".into(), messages, online: 3, ..Default::default() };
        ServerFrame { frame: Some(server_frame::Frame::Block(b)) }.encode_to_vec()
    }

    fn barrage_stream() -> (Vec<u8>, Vec<Seen>) {
        let mut b = HEAD.to_vec();
        let w = ServerFrame {
            frame: Some(server_frame::Frame::Welcome(barrage::proto::Welcome { conn_id: 1, ..Default::default() })),
        };
        b.extend(frame(0x82, &w.encode_to_vec()));
        b.extend(frame(0x82, &block(&[0, 1, 2])));
        b.extend(frame(0x89, b""));
        b.extend(frame(0x82, &block(&(3..600).collect::<Vec<_>>())));
        b.extend(frame(0x82, &[0x12, 0x7F]));
        b.extend(frame(0x82, &block(&[600])));
        use Seen::*;
        let mut want = vec![Up, Welcome, End, Seq(0), Seq(1), Seq(2), End, Ping];
        want.extend((3..600).map(Seq));
        want.extend([End, Malformed, End, Seq(600), End]);
        (b, want)
    }

    #[test]
    fn every_two_way_split_of_a_peer_stream() {
        let (bytes, want) = broadcast_stream();
        for cut in 0..=bytes.len() {
            assert_eq!(run(Body::raw(), &bytes, &[cut]), Ok(want.clone()), "cut {cut}");
        }
    }

    #[test]
    fn every_two_way_split_of_a_barrage_stream() {
        let (bytes, want) = barrage_stream();
        for cut in (0..=bytes.len()).step_by(7).chain(0..200) {
            assert_eq!(run(Body::proto(), &bytes, &[cut]), Ok(want.clone()), "cut {cut}");
        }
    }

    #[test]
    fn every_three_way_split_of_small_frames() {
        let tail = &HEAD[HEAD.len() - 4..];
        let mut raw = tail.to_vec();
        raw.extend(frame(0x82, &msg(9, 26)));
        raw.extend(frame(0x81, &msg(8, 24)));
        let mut proto = tail.to_vec();
        proto.extend(frame(0x82, &block(&[5])));
        proto.extend(frame(0x82, &block(&[6, 7])));
        use Seen::*;
        for (body, bytes, want) in [
            (Body::raw(), raw, vec![Seq(9), End, Seq(8), End]),
            (Body::proto(), proto, vec![Seq(5), End, Seq(6), Seq(7), End]),
        ] {
            for a in 0..=bytes.len() {
                for b in a..=bytes.len() {
                    let mut r = SubReader::new(body);
                    assert_eq!(r.head.feed(&HEAD[..HEAD.len() - 4]), Ok(None));
                    let mut seen = Vec::new();
                    for piece in [&bytes[..a], &bytes[a..b], &bytes[b..]] {
                        r.feed(piece, |e| match e {
                            Event::Message(h) => seen.push(Seq(Header::read(h).seq)),
                            Event::DataEnd => seen.push(End),
                            Event::Upgraded => {}
                            other => panic!("{other:?}"),
                        })
                        .unwrap();
                    }
                    assert_eq!(seen, want, "cuts {a} {b}");
                }
            }
        }
    }

    #[test]
    fn pass_hands_on_each_data_message_s_payload_whole_across_fragments_and_reads() {
        let (bytes, _) = broadcast_stream();
        let payloads = [msg(0, 100), msg(1, 300), msg(2, 70_000), msg(3, 100), msg(4, 24), vec![1, 2, 3]];
        for cuts in [vec![], vec![HEAD.len() + 1], vec![200, 500, 70_100, 70_300]] {
            let seen = run(Body::Pass, &bytes, &cuts).unwrap();
            // Join the pieces between the ends; the ping inside message 3 comes first.
            let (mut got, mut open) = (Vec::new(), Vec::new());
            for s in seen {
                match s {
                    Seen::Data(d) => open.extend(d),
                    Seen::End => got.push(std::mem::take(&mut open)),
                    Seen::Up | Seen::Ping | Seen::Close(_) => {}
                    other => panic!("{other:?}"),
                }
            }
            assert_eq!(got, payloads, "cuts {cuts:?}");
        }
    }

    #[test]
    fn big_messages_are_counted_and_still_read() {
        let mut bytes = HEAD.to_vec();
        let big = msg(7, FRAME_BYTES_MAX as usize + 1);
        bytes.extend(frame(0x82, &big));
        let want = vec![Seen::Up, Seen::TooLarge, Seen::Seq(7), Seen::End];
        assert_eq!(run(Body::raw(), &bytes, &[HEAD.len() + 5, 500_000]), Ok(want));
    }

    #[test]
    fn protocol_errors() {
        let with = |frame_bytes: &[u8]| {
            let mut b = HEAD.to_vec();
            b.extend_from_slice(frame_bytes);
            run(Body::raw(), &b, &[])
        };
        assert_eq!(with(&[0x82, 0x81, 1, 2, 3, 4, 0]), Err(ReadError::Frame(FrameError::Masked)));
        assert_eq!(with(&[0xC2, 0x00]), Err(ReadError::Frame(FrameError::Reserved)));
        assert_eq!(with(&[0x83, 0x00]), Err(ReadError::Frame(FrameError::Reserved)));
        assert_eq!(with(&[0x80, 0x00]), Err(ReadError::Frame(FrameError::Reserved)), "continuation out of a message");
        assert_eq!(
            with(&[0x02, 0x00, 0x82, 0x00]),
            Err(ReadError::Frame(FrameError::Reserved)),
            "new message inside one"
        );
        assert_eq!(with(&[0x09, 0x00]), Err(ReadError::Frame(FrameError::Reserved)), "fragmented ping");
        assert_eq!(with(&[0x82, 127, 0, 0, 0, 1, 0, 0, 0, 0]), Err(ReadError::Frame(FrameError::TooLong)));
        let refused = b"HTTP/1.1 404 Not Found\r\n\r\n";
        assert_eq!(run(Body::raw(), refused, &[]), Err(ReadError::Head(HeadError::Status(404))));
    }

    #[test]
    fn state_stays_small() {
        assert!(std::mem::size_of::<SubReader>() <= 120, "{}", std::mem::size_of::<SubReader>());
    }

    proptest! {
        #[test]
        fn any_split_of_a_barrage_stream(cuts in proptest::collection::vec(0usize..100_000, 0..16)) {
            let (bytes, want) = barrage_stream();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (bytes.len() + 1)).collect();
            cuts.sort_unstable();
            prop_assert_eq!(run(Body::proto(), &bytes, &cuts), Ok(want));
        }

        #[test]
        fn any_split_of_a_peer_stream(cuts in proptest::collection::vec(0usize..80_000, 0..16)) {
            let (bytes, want) = broadcast_stream();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (bytes.len() + 1)).collect();
            cuts.sort_unstable();
            prop_assert_eq!(run(Body::raw(), &bytes, &cuts), Ok(want));
        }
    }
}
