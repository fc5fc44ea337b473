//! The client's byte stream after the upgrade: the shard feeds each read here, frames are decoded
//! (by [`super::frame`]) and unmasked in place, and whole messages and control frames come out as
//! [`Event`]s for the connection state machine.
//!
//! Memory: an idle reader is one null pointer. A frame that arrives whole inside one read is
//! handed out as a slice of that read, with no copy. Only a frame cut by the end of a read, or a
//! fragmented message, goes to the spill box; the box is freed as soon as neither is pending.
//! Worst case per connection: `message_bytes_max` of assembled payload plus a 256-byte box.

use std::fmt;

use super::close::CloseCode;
use super::frame::{self, CONTROL_PAYLOAD_MAX, HEADER_BYTES_MAX, Header, Opcode};

/// Limits on what one client may make us hold. Checked against a frame's header, so an oversized
/// frame is refused before its payload arrives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadLimits {
    /// Largest payload of one data frame.
    pub frame_bytes_max: usize,
    /// Largest data message, summed over its fragments; also the most the spill buffer reserves.
    /// A compressed message is held to it compressed, and again once inflated (by the caller).
    pub message_bytes_max: usize,
    /// permessage-deflate was negotiated: a message's first frame may carry RSV1 (compressed).
    pub deflate: bool,
}

/// One complete thing the client sent. Slices borrow the input (or the reader's spill buffer)
/// only for the duration of the callback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event<'a> {
    Text(&'a str),
    Binary(&'a [u8]),
    /// A whole message compressed with permessage-deflate, as received: the caller inflates it
    /// (and checks a text's UTF-8 then).
    Compressed {
        text: bool,
        payload: &'a [u8],
    },
    Ping(&'a [u8]),
    Pong(&'a [u8]),
    /// `code` is None for an empty Close payload; `reason` is "" then.
    Close {
        code: Option<CloseCode>,
        reason: &'a str,
    },
}

/// What the event callback wants next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Discard the rest of this input and reset the reader: reading is over.
    Stop,
}

/// Why the client's stream was refused; the caller closes with [`ReadError::close_code`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadError {
    /// A framing rule of RFC 6455 was broken; the text says which (for logs, not metrics).
    Protocol(&'static str),
    /// A client frame without a mask (RFC 6455 5.1).
    Unmasked,
    /// A Text message or a Close reason that is not UTF-8.
    InvalidUtf8,
    /// A frame over `frame_bytes_max` or a message over `message_bytes_max`: a capacity limit,
    /// not a protocol breach.
    TooBig,
}

impl ReadError {
    pub fn close_code(&self) -> CloseCode {
        match self {
            Self::Protocol(_) | Self::Unmasked => CloseCode::PROTOCOL,
            Self::InvalidUtf8 => CloseCode::INVALID_DATA,
            Self::TooBig => CloseCode::TOO_BIG,
        }
    }

    /// Metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Protocol(_) => "protocol",
            Self::Unmasked => "unmasked",
            Self::InvalidUtf8 => "utf8",
            Self::TooBig => "too_big",
        }
    }
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Protocol(what) => write!(f, "websocket protocol error: {what}"),
            Self::Unmasked => f.write_str("client frame not masked"),
            Self::InvalidUtf8 => f.write_str("text not valid UTF-8"),
            Self::TooBig => f.write_str("frame or message over the size limit"),
        }
    }
}

impl std::error::Error for ReadError {}

type OnEvent<'f> = &'f mut dyn FnMut(Event<'_>) -> Flow;

/// The incremental reader for one connection's client frames.
#[derive(Debug, Default)]
pub struct Reader {
    /// None while idle: no partial frame, no message in progress, no error.
    spill: Option<Box<Spill>>,
}

impl Reader {
    /// Feeds bytes just received, in order. Unmasks in place, reassembles fragmented messages,
    /// validates, and calls `on_event` for each complete event in order (control frames may arrive
    /// between the fragments of a data message and are delivered at once). If `on_event` returns
    /// Stop, the rest of the input is discarded and the reader is reset. An incomplete tail is kept
    /// inside the reader for the next call. Stops at the first error (the caller then closes with
    /// err.close_code()); every later call returns that same error until [`Reader::reset`].
    pub fn feed(
        &mut self,
        input: &mut [u8],
        limits: &ReadLimits,
        on_event: &mut dyn FnMut(Event<'_>) -> Flow,
    ) -> Result<(), ReadError> {
        if let Some(err) = self.spill.as_ref().and_then(|spill| spill.failed) {
            return Err(err);
        }
        match self.read_frames(input, limits, on_event) {
            Ok(Flow::Continue) => {
                if self.spill.as_ref().is_some_and(|spill| spill.is_idle()) {
                    self.spill = None;
                }
                Ok(())
            }
            Ok(Flow::Stop) => {
                self.reset();
                Ok(())
            }
            Err(err) => {
                self.fail(err);
                Err(err)
            }
        }
    }

    /// Bytes held for an incomplete frame or fragmented message (0 when idle).
    pub fn buffered_bytes(&self) -> usize {
        self.spill.as_ref().map_or(0, |spill| spill.buffered_bytes())
    }

    /// Memory the reader holds for partial input: its spill box and the capacity reserved for
    /// a message still arriving (0 while idle). What a shard's partial-input budget counts.
    pub fn held_bytes(&self) -> usize {
        self.spill
            .as_ref()
            .map_or(0, |spill| std::mem::size_of::<Spill>() + spill.message.as_ref().map_or(0, |m| m.bytes.capacity()))
    }

    /// Drops any buffered state and frees the spill buffer.
    pub fn reset(&mut self) {
        self.spill = None;
    }

    fn read_frames(&mut self, input: &mut [u8], limits: &ReadLimits, on_event: OnEvent<'_>) -> Result<Flow, ReadError> {
        let (used, flow) = self.resume_payload(input, limits, on_event)?;
        if flow == Flow::Stop {
            return Ok(Flow::Stop);
        }
        let mut input = input.get_mut(used..).unwrap_or_default();
        while let Some((header, used)) = self.next_header(input)? {
            let (len, mask) = self.admit(&header, limits)?;
            let rest = std::mem::take(&mut input).get_mut(used..).unwrap_or_default();
            if rest.len() < len {
                self.start_payload(&header, len, mask, rest, limits);
                self.spill_mut().check_partial_text()?;
                return Ok(Flow::Continue);
            }
            let (payload, after) = rest.split_at_mut(len); // len <= rest.len(), checked above
            frame::apply_mask(payload, mask, 0);
            if self.complete_in_place(&header, payload, limits, on_event)? == Flow::Stop {
                return Ok(Flow::Stop);
            }
            input = after;
        }
        Ok(Flow::Continue)
    }

    /// Continues a payload cut by the end of the last read. Returns how much of `input` it took.
    fn resume_payload(
        &mut self,
        input: &mut [u8],
        limits: &ReadLimits,
        on_event: OnEvent<'_>,
    ) -> Result<(usize, Flow), ReadError> {
        let Some(spill) = self.spill.as_deref_mut() else {
            return Ok((0, Flow::Continue));
        };
        let Some(partial) = spill.frame else {
            return Ok((0, Flow::Continue));
        };
        let take = (partial.len - partial.received).min(input.len());
        let (chunk, _) = input.split_at_mut(take); // take <= input.len()
        spill.absorb(chunk, limits);
        if partial.received + take < partial.len {
            spill.check_partial_text()?;
            return Ok((take, Flow::Continue));
        }
        spill.frame = None;
        Ok((take, spill.complete_spilled(&partial, on_event)?))
    }

    /// The next frame header, completing one stashed by the last read, and how many bytes of
    /// `input` it used. None (with the bytes stashed) while it is incomplete.
    fn next_header(&mut self, input: &[u8]) -> Result<Option<(Header, usize)>, ReadError> {
        let stashed = self.spill.as_ref().map_or(0, |spill| spill.head_len);
        if stashed == 0 {
            let header = frame::decode_header(input)?;
            if header.is_none() && !input.is_empty() {
                self.spill_mut().stash_head(input);
            }
            return Ok(header.map(|header| (header, header.header_len)));
        }
        let spill = self.spill_mut();
        // stashed < HEADER_BYTES_MAX: a stash only holds a header that is still incomplete.
        let take = input.len().min(HEADER_BYTES_MAX - stashed);
        spill.head[stashed..stashed + take].copy_from_slice(&input[..take]);
        let Some(header) = frame::decode_header(&spill.head[..stashed + take])? else {
            spill.head_len = stashed + take;
            return Ok(None);
        };
        spill.head_len = 0;
        // The stashed bytes alone were incomplete, so the header is longer than them.
        Ok(Some((header, header.header_len - stashed)))
    }

    /// Checks a header against the message sequence and the limits, before its payload is
    /// touched. Returns the payload length and mask.
    fn admit(&self, header: &Header, limits: &ReadLimits) -> Result<(usize, [u8; 4]), ReadError> {
        let mask = header.mask.ok_or(ReadError::Unmasked)?;
        if header.rsv1 && !limits.deflate {
            return Err(ReadError::Protocol("RSV1 set without permessage-deflate"));
        }
        if header.rsv1 && !matches!(header.opcode, Opcode::Text | Opcode::Binary) {
            return Err(ReadError::Protocol("RSV1 set on a control or continuation frame"));
        }
        let assembled = self.message().map(|message| message.bytes.len());
        match (header.opcode, assembled) {
            (Opcode::Continuation, None) => {
                return Err(ReadError::Protocol("continuation without a message"));
            }
            (Opcode::Text | Opcode::Binary, Some(_)) => {
                return Err(ReadError::Protocol("new message inside a fragmented one"));
            }
            _ => {}
        }
        let len = usize::try_from(header.payload_len).map_err(|_| ReadError::TooBig)?;
        // decode_header has capped control payloads at 125 bytes; limits are for data.
        let too_big =
            len > limits.frame_bytes_max || assembled.unwrap_or(0).saturating_add(len) > limits.message_bytes_max;
        if !header.opcode.is_control() && too_big {
            return Err(ReadError::TooBig);
        }
        Ok((len, mask))
    }

    /// A whole frame, unmasked inside the input: handed out in place unless it belongs to a
    /// fragmented message.
    fn complete_in_place(
        &mut self,
        header: &Header,
        payload: &[u8],
        limits: &ReadLimits,
        on_event: OnEvent<'_>,
    ) -> Result<Flow, ReadError> {
        let whole_message = header.fin && header.opcode != Opcode::Continuation;
        if whole_message && header.rsv1 {
            return Ok(on_event(Event::Compressed { text: header.opcode == Opcode::Text, payload }));
        }
        if header.opcode.is_control() || whole_message {
            return Ok(on_event(frame_event(header.opcode, payload)?));
        }
        let spill = self.spill_mut();
        spill.begin_message(header.opcode, header.rsv1);
        if let Some(message) = spill.message.as_mut() {
            message.extend(payload, limits.message_bytes_max);
        }
        spill.finish_fragment(header.fin, on_event)
    }

    /// A frame cut by the end of this read: keep its header and the payload bytes present.
    fn start_payload(&mut self, header: &Header, len: usize, mask: [u8; 4], rest: &mut [u8], limits: &ReadLimits) {
        let spill = self.spill_mut();
        spill.begin_message(header.opcode, header.rsv1);
        let (opcode, fin) = (header.opcode, header.fin);
        spill.frame = Some(Partial { opcode, fin, mask, len, received: 0 });
        spill.absorb(rest, limits);
    }

    fn message(&self) -> Option<&Message> {
        self.spill.as_ref().and_then(|spill| spill.message.as_ref())
    }

    fn spill_mut(&mut self) -> &mut Spill {
        self.spill.get_or_insert_with(|| Box::new(Spill::new()))
    }

    /// Drops what was buffered and remembers the error, so a caller that feeds again cannot
    /// resume mid-frame.
    fn fail(&mut self, err: ReadError) {
        let spill = self.spill_mut();
        *spill = Spill::new();
        spill.failed = Some(err);
    }
}

/// The event for a frame that is a whole message or a control frame.
fn frame_event(opcode: Opcode, payload: &[u8]) -> Result<Event<'_>, ReadError> {
    match opcode {
        Opcode::Text => std::str::from_utf8(payload).map(Event::Text).map_err(|_| ReadError::InvalidUtf8),
        Opcode::Binary => Ok(Event::Binary(payload)),
        Opcode::Ping => Ok(Event::Ping(payload)),
        Opcode::Pong => Ok(Event::Pong(payload)),
        Opcode::Close => close_event(payload),
        Opcode::Continuation => Err(ReadError::Protocol("continuation without a message")),
    }
}

/// RFC 6455 5.5.1: empty, or a 2-byte code then a UTF-8 reason.
fn close_event(payload: &[u8]) -> Result<Event<'_>, ReadError> {
    let (code, reason) = match payload {
        [] => {
            return Ok(Event::Close { code: None, reason: "" });
        }
        [_] => return Err(ReadError::Protocol("close payload of one byte")),
        [hi, lo, reason @ ..] => (CloseCode(u16::from_be_bytes([*hi, *lo])), reason),
    };
    if !code.is_valid_on_wire() {
        return Err(ReadError::Protocol("invalid close code"));
    }
    let reason = std::str::from_utf8(reason).map_err(|_| ReadError::InvalidUtf8)?;
    Ok(Event::Close { code: Some(code), reason })
}

/// State that outlives one `feed`: boxed so that an idle reader costs one pointer.
#[derive(Debug)]
struct Spill {
    /// The start of a header cut by the end of a read.
    head: [u8; HEADER_BYTES_MAX],
    head_len: usize,
    /// A frame whose header was admitted but whose payload is still arriving.
    frame: Option<Partial>,
    /// The payload so far of a control frame in `frame`.
    control: [u8; CONTROL_PAYLOAD_MAX],
    /// A data message still arriving: fragments, or one frame cut across reads.
    message: Option<Message>,
    failed: Option<ReadError>,
}

#[derive(Clone, Copy, Debug)]
struct Partial {
    opcode: Opcode,
    fin: bool,
    mask: [u8; 4],
    len: usize,
    received: usize,
}

#[derive(Debug)]
struct Message {
    text: bool,
    /// permessage-deflate: the bytes are compressed; UTF-8 is the caller's to check, inflated.
    compressed: bool,
    bytes: Vec<u8>,
    /// Text only: `bytes[..utf8_checked]` is known valid, so each fragment is checked once.
    utf8_checked: usize,
}

impl Spill {
    fn new() -> Self {
        Self {
            head: [0; HEADER_BYTES_MAX],
            head_len: 0,
            frame: None,
            control: [0; CONTROL_PAYLOAD_MAX],
            message: None,
            failed: None,
        }
    }

    fn is_idle(&self) -> bool {
        self.head_len == 0 && self.frame.is_none() && self.message.is_none() && self.failed.is_none()
    }

    fn buffered_bytes(&self) -> usize {
        let control = match self.frame {
            Some(partial) if partial.opcode.is_control() => partial.received,
            _ => 0,
        };
        let message = self.message.as_ref().map_or(0, |message| message.bytes.len());
        self.head_len + control + message
    }

    /// `input` is shorter than any header (else it would have decoded), so it fits.
    fn stash_head(&mut self, input: &[u8]) {
        for (slot, byte) in self.head.iter_mut().zip(input) {
            *slot = *byte;
        }
        self.head_len = input.len().min(HEADER_BYTES_MAX);
    }

    /// A Text or Binary header opens a message; admit() has refused one inside another.
    fn begin_message(&mut self, opcode: Opcode, compressed: bool) {
        if matches!(opcode, Opcode::Text | Opcode::Binary) {
            let text = opcode == Opcode::Text;
            self.message = Some(Message { text, compressed, bytes: Vec::new(), utf8_checked: 0 });
        }
    }

    /// Unmasks the next bytes of the partial frame's payload and keeps them.
    fn absorb(&mut self, chunk: &mut [u8], limits: &ReadLimits) {
        let Some(partial) = self.frame.as_mut() else {
            return;
        };
        frame::apply_mask(chunk, partial.mask, partial.received);
        let end = partial.received + chunk.len();
        if partial.opcode.is_control() {
            // end <= len <= 125: admit() and resume_payload() bound it.
            if let Some(slot) = self.control.get_mut(partial.received..end) {
                slot.copy_from_slice(chunk);
            }
        } else if let Some(message) = self.message.as_mut() {
            message.extend(chunk, limits.message_bytes_max);
        }
        partial.received = end;
    }

    /// Invalid UTF-8 fails as soon as it arrives, even inside a frame still arriving.
    fn check_partial_text(&mut self) -> Result<(), ReadError> {
        match self.message.as_mut() {
            Some(message) => message.check_utf8_prefix(),
            None => Ok(()),
        }
    }

    fn complete_spilled(&mut self, partial: &Partial, on_event: OnEvent<'_>) -> Result<Flow, ReadError> {
        if partial.opcode.is_control() {
            let payload = self.control.get(..partial.len).unwrap_or_default();
            return Ok(on_event(frame_event(partial.opcode, payload)?));
        }
        self.finish_fragment(partial.fin, on_event)
    }

    /// After a data frame's payload is in `message`: check it, and hand out the message on FIN.
    fn finish_fragment(&mut self, fin: bool, on_event: OnEvent<'_>) -> Result<Flow, ReadError> {
        let Some(message) = self.message.as_mut() else {
            return Ok(Flow::Continue);
        };
        if !fin {
            message.check_utf8_prefix()?;
            return Ok(Flow::Continue);
        }
        let flow = on_event(message.event()?);
        self.message = None;
        Ok(flow)
    }
}

impl Message {
    fn extend(&mut self, chunk: &[u8], message_bytes_max: usize) {
        let needed = self.bytes.len() + chunk.len();
        if needed > self.bytes.capacity() {
            // Doubling keeps assembly linear; capping at the limit keeps capacity within it.
            // Only bytes that arrived count: a claimed length is never reserved ahead.
            let target = (self.bytes.capacity() * 2).clamp(needed, message_bytes_max.max(needed));
            self.bytes.reserve_exact(target - self.bytes.len());
        }
        self.bytes.extend_from_slice(chunk);
    }

    /// Fails as soon as a fragment holds an invalid sequence; one cut at the fragment's end may
    /// be completed by the next fragment.
    fn check_utf8_prefix(&mut self) -> Result<(), ReadError> {
        if !self.text || self.compressed {
            return Ok(());
        }
        let unchecked = self.bytes.get(self.utf8_checked..).unwrap_or_default();
        self.utf8_checked += match std::str::from_utf8(unchecked) {
            Ok(valid) => valid.len(),
            Err(err) if err.error_len().is_none() => err.valid_up_to(),
            Err(_) => return Err(ReadError::InvalidUtf8),
        };
        Ok(())
    }

    /// The whole message. Text is validated again in full: the only way to a &str without
    /// unsafe; it costs a second pass on fragmented text only.
    fn event(&self) -> Result<Event<'_>, ReadError> {
        if self.compressed {
            return Ok(Event::Compressed { text: self.text, payload: &self.bytes });
        }
        if !self.text {
            return Ok(Event::Binary(&self.bytes));
        }
        std::str::from_utf8(&self.bytes).map(Event::Text).map_err(|_| ReadError::InvalidUtf8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: ReadLimits = ReadLimits { frame_bytes_max: 0x1_0000, message_bytes_max: 0x2_0000, deflate: false };
    const MASK: [u8; 4] = [0x12, 0x34, 0x56, 0x78];

    /// A masked frame whose first byte (FIN, RSV, opcode) is `b0`.
    fn client_frame(b0: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        frame::masked_frame(b0 & 0x80 != 0, b0 & 0x7F, payload, MASK, &mut out);
        out
    }

    #[derive(Debug, PartialEq, Eq)]
    enum Owned {
        Text(String),
        Binary(Vec<u8>),
        Compressed(bool, Vec<u8>),
        Ping(Vec<u8>),
        Pong(Vec<u8>),
        Close(Option<u16>, String),
    }

    fn own(event: Event<'_>) -> Owned {
        match event {
            Event::Text(text) => Owned::Text(text.to_owned()),
            Event::Binary(bytes) => Owned::Binary(bytes.to_vec()),
            Event::Compressed { text, payload } => Owned::Compressed(text, payload.to_vec()),
            Event::Ping(bytes) => Owned::Ping(bytes.to_vec()),
            Event::Pong(bytes) => Owned::Pong(bytes.to_vec()),
            Event::Close { code, reason } => Owned::Close(code.map(|c| c.0), reason.to_owned()),
        }
    }

    fn feed_all(reader: &mut Reader, bytes: &[u8]) -> (Vec<Owned>, Result<(), ReadError>) {
        let mut events = Vec::new();
        let mut input = bytes.to_vec();
        let result = reader.feed(&mut input, &LIMITS, &mut |event| {
            events.push(own(event));
            Flow::Continue
        });
        (events, result)
    }

    fn read(bytes: &[u8]) -> (Vec<Owned>, Result<(), ReadError>) {
        feed_all(&mut Reader::default(), bytes)
    }

    /// Every byte of `bytes` fed in reads of `chunk` bytes, with permessage-deflate negotiated.
    fn read_deflate(bytes: &[u8], chunk: usize) -> (Vec<Owned>, Result<(), ReadError>) {
        let limits = ReadLimits { deflate: true, ..LIMITS };
        let (mut reader, mut events) = (Reader::default(), Vec::new());
        for c in bytes.chunks(chunk) {
            let result = reader.feed(&mut c.to_vec(), &limits, &mut |event| {
                events.push(own(event));
                Flow::Continue
            });
            if result.is_err() {
                return (events, result);
            }
        }
        (events, Ok(()))
    }

    #[test]
    fn rsv1_marks_a_compressed_message_only_where_deflate_was_negotiated() {
        // Not negotiated: RSV1 is a protocol error.
        let compressed = client_frame(0xC2, b"zz");
        assert_eq!(read(&compressed).1, Err(ReadError::Protocol("RSV1 set without permessage-deflate")));
        // Negotiated: whole, or in fragments cut anywhere, it comes out compressed, unchecked.
        let mut fragmented = client_frame(0x41, &[0xff, 0xfe]);
        fragmented.extend(client_frame(0x00, b"mid"));
        fragmented.extend(client_frame(0x89, b"ping"));
        fragmented.extend(client_frame(0x80, b"end"));
        for chunk in [1, 3, 7, 1000] {
            let (events, result) = read_deflate(&compressed, chunk);
            assert_eq!((events, result), (vec![Owned::Compressed(false, b"zz".to_vec())], Ok(())));
            let (events, result) = read_deflate(&fragmented, chunk);
            assert_eq!(result, Ok(()), "invalid UTF-8 while compressed is not the reader's to judge");
            let mut want = vec![0xff, 0xfe];
            want.extend_from_slice(b"midend");
            assert_eq!(events, vec![Owned::Ping(b"ping".to_vec()), Owned::Compressed(true, want)]);
        }
        // Never on a continuation or a control frame.
        let mut bad = client_frame(0x01, b"a");
        bad.extend(client_frame(0xC0, b"b"));
        assert_eq!(read_deflate(&bad, 100).1, Err(ReadError::Protocol("RSV1 set on a control or continuation frame")));
        let ping = client_frame(0xC9, b"p");
        assert_eq!(read_deflate(&ping, 100).1, Err(ReadError::Protocol("RSV1 set on a control or continuation frame")));
        // A compressed message is held to the size limit as it arrives, compressed.
        let big = client_frame(0xC2, &vec![0; LIMITS.frame_bytes_max + 1]);
        assert_eq!(read_deflate(&big, 100).1, Err(ReadError::TooBig));
    }

    #[test]
    fn idle_reader_is_one_pointer_and_holds_nothing() {
        assert!(std::mem::size_of::<Reader>() <= 8);
        let mut reader = Reader::default();
        let mut bytes = client_frame(0x81, b"hello");
        bytes.extend(client_frame(0x01, b"frag"));
        bytes.extend(client_frame(0x80, b"ment"));
        let (events, result) = feed_all(&mut reader, &bytes);
        assert_eq!(result, Ok(()));
        assert_eq!(events, [Owned::Text("hello".into()), Owned::Text("fragment".into())]);
        assert_eq!(reader.buffered_bytes(), 0);
        assert!(reader.spill.is_none());
        // The module doc's memory sum counts the box at 256 bytes.
        assert!(std::mem::size_of::<Spill>() <= 0x100);
    }

    #[test]
    fn whole_frames_are_handed_out_in_place() {
        let mut reader = Reader::default();
        let mut input = client_frame(0x82, b"abc");
        let base = input.as_ptr() as usize;
        let mut seen = None;
        let result = reader.feed(&mut input, &LIMITS, &mut |event| {
            if let Event::Binary(bytes) = event {
                seen = Some(bytes.as_ptr() as usize - base);
            }
            Flow::Continue
        });
        assert_eq!(result, Ok(()));
        assert_eq!(seen, Some(6)); // the payload's place in the input: no copy
        assert!(reader.spill.is_none());
    }

    #[test]
    fn tail_is_kept_then_released() {
        let mut reader = Reader::default();
        let bytes = client_frame(0x82, &[7; 300]);
        let (events, result) = feed_all(&mut reader, &bytes[..100]);
        assert_eq!((events.len(), result), (0, Ok(())));
        assert_eq!(reader.buffered_bytes(), 100 - 8);
        let (events, result) = feed_all(&mut reader, &bytes[100..]);
        assert_eq!((events, result), (vec![Owned::Binary(vec![7; 300])], Ok(())));
        assert!(reader.spill.is_none());
        // A cut header is stashed too.
        let (_, result) = feed_all(&mut reader, &bytes[..3]);
        assert_eq!((result, reader.buffered_bytes()), (Ok(()), 3));
    }

    #[test]
    fn control_frames_interleave_with_fragments() {
        let mut bytes = client_frame(0x01, b"he");
        bytes.extend(client_frame(0x89, b"p"));
        bytes.extend(client_frame(0x00, b"ll"));
        bytes.extend(client_frame(0x8A, b""));
        bytes.extend(client_frame(0x80, b"o"));
        let expected = [Owned::Ping(b"p".to_vec()), Owned::Pong(vec![]), Owned::Text("hello".into())];
        assert_eq!(read(&bytes), (expected.into(), Ok(())));
    }

    #[test]
    fn unmasked_frames_are_refused() {
        let (_, result) = read(&[0x81, 0x01, b'a']);
        assert_eq!(result, Err(ReadError::Unmasked));
        assert_eq!(ReadError::Unmasked.close_code(), CloseCode::PROTOCOL);
    }

    #[test]
    fn oversized_frame_is_refused_from_its_header() {
        let bytes = client_frame(0x82, &vec![0; LIMITS.frame_bytes_max + 1]);
        let mut reader = Reader::default();
        let (_, result) = feed_all(&mut reader, &bytes[..14]);
        assert_eq!(result, Err(ReadError::TooBig));
        assert_eq!(ReadError::TooBig.close_code(), CloseCode::TOO_BIG);
        // A claim of 2^62 bytes is refused without reserving anything.
        let mut huge = vec![0x82, 0xFF];
        huge.extend_from_slice(&(1u64 << 62).to_be_bytes());
        huge.extend_from_slice(&MASK);
        assert_eq!(read(&huge).1, Err(ReadError::TooBig));
    }

    #[test]
    fn growing_message_is_refused_over_its_limit() {
        let chunk = vec![0; LIMITS.frame_bytes_max];
        let mut bytes = client_frame(0x02, &chunk);
        bytes.extend(client_frame(0x00, &chunk));
        bytes.extend(client_frame(0x80, b"x"));
        assert_eq!(read(&bytes), (vec![], Err(ReadError::TooBig)));
    }

    #[test]
    fn sequence_errors_are_protocol_errors() {
        let (_, result) = read(&client_frame(0x80, b"x"));
        assert_eq!(result, Err(ReadError::Protocol("continuation without a message")));
        let mut bytes = client_frame(0x01, b"a");
        bytes.extend(client_frame(0x82, b"b"));
        let (_, result) = read(&bytes);
        assert_eq!(result, Err(ReadError::Protocol("new message inside a fragmented one")));
        assert_eq!(ReadError::Protocol("x").close_code(), CloseCode::PROTOCOL);
    }

    #[test]
    fn invalid_utf8_fails_in_the_fragment_that_breaks_it() {
        assert_eq!(read(&client_frame(0x81, &[0xFF])).1, Err(ReadError::InvalidUtf8));
        // "é" cut across fragments is fine.
        let mut bytes = client_frame(0x01, &[0xC3]);
        bytes.extend(client_frame(0x80, &[0xA9]));
        assert_eq!(read(&bytes), (vec![Owned::Text("é".into())], Ok(())));
        // An invalid byte fails before the message ends (no FIN yet).
        let (_, result) = read(&client_frame(0x01, b"ok\xC3\x28"));
        assert_eq!(result, Err(ReadError::InvalidUtf8));
        // A sequence still cut at FIN fails.
        let mut bytes = client_frame(0x01, b"a");
        bytes.extend(client_frame(0x80, &[0xE2, 0x82]));
        assert_eq!(read(&bytes).1, Err(ReadError::InvalidUtf8));
        assert_eq!(ReadError::InvalidUtf8.close_code(), CloseCode::INVALID_DATA);
    }

    #[test]
    fn invalid_utf8_fails_inside_a_frame_still_arriving() {
        // One text frame of 9 bytes; the first read holds its header and "ok\xC3\x28".
        let bytes = client_frame(0x81, b"ok\xC3\x28tail");
        let cut = bytes.len() - 4;
        let mut reader = Reader::default();
        let mut head = bytes[..cut].to_vec();
        let result = reader.feed(&mut head, &LIMITS, &mut |_| Flow::Continue);
        assert_eq!(result, Err(ReadError::InvalidUtf8), "fails before the frame is complete");
        // A valid prefix cut inside a sequence waits for the rest.
        let bytes = client_frame(0x81, "né".as_bytes());
        let mut reader = Reader::default();
        let (mut first, mut second) = (bytes[..bytes.len() - 1].to_vec(), bytes[bytes.len() - 1..].to_vec());
        assert_eq!(reader.feed(&mut first, &LIMITS, &mut |_| Flow::Continue), Ok(()));
        let mut got = Vec::new();
        assert_eq!(
            reader.feed(&mut second, &LIMITS, &mut |e| {
                got.push(own(e));
                Flow::Continue
            }),
            Ok(())
        );
        assert_eq!(got, vec![Owned::Text("né".into())]);
    }

    #[test]
    fn close_payloads_are_checked() {
        let close = |payload: &[u8]| read(&client_frame(0x88, payload));
        assert_eq!(close(b""), (vec![Owned::Close(None, String::new())], Ok(())));
        let (events, _) = close(b"\x03\xE8bye");
        assert_eq!(events, [Owned::Close(Some(1000), "bye".into())]);
        let (events, _) = close(b"\x0F\xA0");
        assert_eq!(events, [Owned::Close(Some(4000), String::new())]);
        let one_byte = Err(ReadError::Protocol("close payload of one byte"));
        assert_eq!(close(b"\x03").1, one_byte);
        let bad_code = Err(ReadError::Protocol("invalid close code"));
        assert_eq!(close(b"\x03\xED").1, bad_code); // 1005 never goes on the wire
        assert_eq!(close(b"\x03\xE8\xFF").1, Err(ReadError::InvalidUtf8));
    }

    #[test]
    fn ping_and_pong_payloads_pass_as_is() {
        let mut bytes = client_frame(0x89, &[0xFF, 0x00]);
        bytes.extend(client_frame(0x8A, &[0x80; 125]));
        let expected = [Owned::Ping(vec![0xFF, 0x00]), Owned::Pong(vec![0x80; 125])];
        assert_eq!(read(&bytes), (expected.into(), Ok(())));
    }

    #[test]
    fn stop_discards_the_rest_and_resets() {
        let mut bytes = client_frame(0x88, b"");
        bytes.extend(client_frame(0x81, b"after"));
        bytes.extend(client_frame(0x01, b"partial"));
        let mut reader = Reader::default();
        let mut count = 0;
        let result = reader.feed(&mut bytes, &LIMITS, &mut |_| {
            count += 1;
            Flow::Stop
        });
        assert_eq!((result, count), (Ok(()), 1));
        assert!(reader.spill.is_none());
    }

    #[test]
    fn errors_stick_until_reset() {
        let mut reader = Reader::default();
        assert_eq!(feed_all(&mut reader, &[0xF1]).1, Err(ReadError::Protocol("reserved bits set")));
        let again = feed_all(&mut reader, &client_frame(0x81, b"x"));
        assert_eq!(again, (vec![], Err(ReadError::Protocol("reserved bits set"))));
        assert_eq!(reader.buffered_bytes(), 0);
        reader.reset();
        assert_eq!(feed_all(&mut reader, &client_frame(0x81, b"x")).1, Ok(()));
    }

    #[test]
    fn spill_capacity_stays_within_the_message_limit() {
        let limits = ReadLimits { frame_bytes_max: 1000, message_bytes_max: 1500, deflate: false };
        let mut reader = Reader::default();
        let mut bytes = client_frame(0x02, &[1; 1000]);
        bytes.extend(client_frame(0x00, &[2; 500]));
        reader.feed(&mut bytes, &limits, &mut |_| Flow::Continue).unwrap();
        let capacity = reader.message().map(|message| message.bytes.capacity());
        assert_eq!(capacity, Some(1500));
    }

    #[test]
    fn error_labels() {
        let labels = [
            ReadError::Protocol("x").reason(),
            ReadError::Unmasked.reason(),
            ReadError::InvalidUtf8.reason(),
            ReadError::TooBig.reason(),
        ];
        assert_eq!(labels, ["protocol", "unmasked", "utf8", "too_big"]);
    }
}
