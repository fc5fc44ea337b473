//! The sans-IO wire through its public API, the way the shard drives it. Properties: however the
//! peer's bytes are cut into reads, the same events (and the same error) come out. Interop: a
//! third-party client (tungstenite), in memory, upgrades through us and reads our frames.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::rc::Rc;

use barrage::wire::frame::{self, Opcode};
use barrage::wire::handshake::{self, HandshakeLimits, Parsed, Subprotocol};
use barrage::wire::{CloseCode, Event, Flow, ReadError, ReadLimits, Reader};
use proptest::collection::vec;
use proptest::prelude::*;
use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::HandshakeError;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode as TungCloseCode;
use tungstenite::{Message as WsMessage, WebSocket};

const LIMITS: ReadLimits = ReadLimits { frame_bytes_max: 0x2_0000, message_bytes_max: 0x4_0000, deflate: false };

#[derive(Clone, Debug, PartialEq, Eq)]
enum Owned {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<u16>, String),
}

fn own(event: Event<'_>) -> Owned {
    match event {
        Event::Text(text) => Owned::Text(text.to_owned()),
        Event::Binary(bytes) => Owned::Binary(bytes.to_vec()),
        Event::Ping(bytes) => Owned::Ping(bytes.to_vec()),
        Event::Pong(bytes) => Owned::Pong(bytes.to_vec()),
        Event::Close { code, reason } => Owned::Close(code.map(|code| code.0), reason.to_owned()),
        Event::Compressed { .. } => panic!("permessage-deflate is off in these limits"),
    }
}

type Outcome = (Vec<Owned>, Result<(), ReadError>);

/// Feeds `bytes` cut at `cuts` (sorted offsets), each read in its own buffer, up to the first error.
fn feed_cut(bytes: &[u8], cuts: impl IntoIterator<Item = usize>) -> (Outcome, Reader) {
    let mut reader = Reader::default();
    let mut events = Vec::new();
    let mut start = 0;
    let ends = cuts.into_iter().chain([bytes.len()]);
    for end in ends {
        let mut read = bytes[start..end.max(start)].to_vec();
        start = end.max(start);
        let result = reader.feed(&mut read, &LIMITS, &mut |event| {
            events.push(own(event));
            Flow::Continue
        });
        if result.is_err() {
            return ((events, result), reader);
        }
    }
    ((events, Ok(())), reader)
}

fn feed_whole(bytes: &[u8]) -> Outcome {
    feed_cut(bytes, []).0
}

/// One data message: its bytes, cut into fragments, each followed by some control frames.
#[derive(Clone, Debug)]
struct Message {
    text: bool,
    payload: Vec<u8>,
    cuts: Vec<usize>,
    controls: Vec<Vec<(Opcode, Vec<u8>)>>,
}

fn payload(small_only: bool) -> impl Strategy<Value = (bool, Vec<u8>)> {
    let small_text = ".{0,40}".prop_map(|text: String| (true, text.into_bytes()));
    let small_binary = vec(any::<u8>(), 0..200).prop_map(|bytes| (false, bytes));
    let big_text = ("[a-zé€😀]{1,3}", 0xFFF0..0x1_0100usize)
        .prop_map(|(unit, len)| (true, unit.repeat(len / unit.len()).into_bytes()));
    let big_binary = (any::<u8>(), 0xFFF0..0x1_0100usize).prop_map(|(byte, len)| (false, vec![byte; len]));
    if small_only {
        prop_oneof![small_text, small_binary].boxed()
    } else {
        prop_oneof![4 => small_text, 4 => small_binary, 1 => big_text, 1 => big_binary].boxed()
    }
}

fn control() -> impl Strategy<Value = (Opcode, Vec<u8>)> {
    prop_oneof![
        vec(any::<u8>(), 0..=125).prop_map(|bytes| (Opcode::Ping, bytes)),
        vec(any::<u8>(), 0..=125).prop_map(|bytes| (Opcode::Pong, bytes)),
        (prop_oneof![Just(1000u16), Just(1001), Just(4000)], "[a-z]{0,20}").prop_map(|(code, reason)| {
            let mut bytes = code.to_be_bytes().to_vec();
            bytes.extend_from_slice(reason.as_bytes());
            (Opcode::Close, bytes)
        }),
        Just((Opcode::Close, Vec::new())),
    ]
}

fn message(small_only: bool) -> impl Strategy<Value = Message> {
    (payload(small_only), vec(any::<prop::sample::Index>(), 0..4), vec(vec(control(), 0..2), 4)).prop_map(
        |((text, payload), cut_at, controls)| {
            let mut cuts: Vec<usize> = cut_at.iter().map(|at| at.index(payload.len() + 1)).collect();
            cuts.sort_unstable();
            Message { text, payload, cuts, controls }
        },
    )
}

/// The bytes of the messages as a browser would send them, masked with keys drawn from `masks`.
fn encode(messages: &[Message], masks: &[[u8; 4]]) -> Vec<u8> {
    let mut masks = masks.iter().copied().cycle();
    let mut out = Vec::new();
    for message in messages {
        let bounds: Vec<usize> =
            [0].into_iter().chain(message.cuts.iter().copied()).chain([message.payload.len()]).collect();
        let fragments = bounds.windows(2).count();
        for (i, pair) in bounds.windows(2).enumerate() {
            let opcode = match (i, message.text) {
                (0, true) => Opcode::Text,
                (0, false) => Opcode::Binary,
                _ => Opcode::Continuation,
            };
            let fin = i + 1 == fragments;
            let fragment = &message.payload[pair[0]..pair[1]];
            frame::masked_frame(fin, opcode as u8, fragment, masks.next().unwrap(), &mut out);
            for (opcode, payload) in message.controls.get(i).into_iter().flatten() {
                frame::masked_frame(true, *opcode as u8, payload, masks.next().unwrap(), &mut out);
            }
        }
    }
    out
}

/// What a correct reader delivers for valid `messages`.
fn expected(messages: &[Message]) -> Vec<Owned> {
    let mut events = Vec::new();
    for message in messages {
        let fragments = message.cuts.len() + 1;
        for controls in message.controls.iter().take(fragments) {
            for (opcode, payload) in controls {
                events.push(match opcode {
                    Opcode::Ping => Owned::Ping(payload.clone()),
                    Opcode::Pong => Owned::Pong(payload.clone()),
                    _ if payload.is_empty() => Owned::Close(None, String::new()),
                    _ => Owned::Close(
                        Some(u16::from_be_bytes([payload[0], payload[1]])),
                        String::from_utf8(payload[2..].to_vec()).unwrap(),
                    ),
                });
            }
        }
        // Controls after the last fragment come after the message.
        let tail: Vec<Owned> =
            events.drain(events.len() - message.controls.get(fragments - 1).map_or(0, Vec::len)..).collect();
        events.push(if message.text {
            Owned::Text(String::from_utf8(message.payload.clone()).unwrap())
        } else {
            Owned::Binary(message.payload.clone())
        });
        events.extend(tail);
    }
    events
}

fn cuts(len: usize, sizes: &[usize]) -> Vec<usize> {
    let mut at = 0;
    let mut out = Vec::new();
    for size in sizes.iter().cycle() {
        at += size;
        if at >= len {
            break;
        }
        out.push(at);
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn reader_events_do_not_depend_on_read_boundaries(
        messages in vec(message(false), 1..5),
        masks in vec(any::<[u8; 4]>(), 1..8),
        sizes in prop_oneof![
            vec(1..64usize, 1..20),
            vec(prop_oneof![1..16usize, 1..2000usize, 1..100_000usize], 1..20),
        ],
    ) {
        let bytes = encode(&messages, &masks);
        let whole = feed_whole(&bytes);
        prop_assert_eq!(&whole, &(expected(&messages), Ok(())));
        let (split, reader) = feed_cut(&bytes, cuts(bytes.len(), &sizes));
        prop_assert_eq!(split, whole);
        prop_assert_eq!(reader.buffered_bytes(), 0);
    }

    #[test]
    fn small_streams_survive_every_split_and_byte_by_byte(
        messages in vec(message(true), 1..3),
        masks in vec(any::<[u8; 4]>(), 1..4),
    ) {
        let bytes = encode(&messages, &masks);
        let whole = feed_whole(&bytes);
        prop_assert_eq!(&whole, &(expected(&messages), Ok(())));
        for at in 0..=bytes.len() {
            prop_assert_eq!(&feed_cut(&bytes, [at]).0, &whole, "split at {}", at);
        }
        let (byte_by_byte, reader) = feed_cut(&bytes, 1..bytes.len());
        prop_assert_eq!(byte_by_byte, whole);
        prop_assert_eq!(reader.buffered_bytes(), 0);
    }

    /// Corrupted streams: whatever error comes out, it comes out after the same events.
    #[test]
    fn errors_do_not_depend_on_read_boundaries(
        messages in vec(message(true), 1..4),
        masks in vec(any::<[u8; 4]>(), 1..4),
        flips in vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        sizes in vec(1..64usize, 1..10),
    ) {
        let mut bytes = encode(&messages, &masks);
        for (at, xor) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= xor;
        }
        let whole = feed_whole(&bytes);
        prop_assert_eq!(feed_cut(&bytes, cuts(bytes.len(), &sizes)).0, whole.clone());
        prop_assert_eq!(feed_cut(&bytes, 1..bytes.len()).0, whole);
    }

    #[test]
    fn reader_never_panics_on_arbitrary_bytes(
        bytes in vec(any::<u8>(), 0..600),
        sizes in vec(1..32usize, 1..8),
    ) {
        let small = ReadLimits { frame_bytes_max: 0x40, message_bytes_max: 0x80, deflate: false };
        let mut reader = Reader::default();
        for chunk in bytes.chunks(sizes[0]) {
            let mut read = chunk.to_vec();
            if reader.feed(&mut read, &small, &mut |_| Flow::Continue).is_err() {
                break;
            }
        }
        let held_max = small.message_bytes_max + frame::CONTROL_PAYLOAD_MAX + frame::HEADER_BYTES_MAX;
        prop_assert!(reader.buffered_bytes() <= held_max);
    }
}

// ---- handshake ----

const HANDSHAKE: HandshakeLimits = HandshakeLimits { request_bytes_max: 0x2000, headers_max: 0x40 };

/// Randomly cased header names, optional protocol and auth headers, and noise headers.
fn upgrade_request() -> impl Strategy<Value = String> {
    let name_case = vec(any::<bool>(), 64);
    let protocols = prop::option::of(prop_oneof![
        Just("barrage.v1.json"),
        Just("chat, barrage.v1.proto"),
        Just("barrage.v1.proto, barrage.v1.json"),
    ]);
    let noise = vec(("[A-Za-z][A-Za-z0-9-]{0,12}", "[ -~]{0,30}"), 0..6);
    let target = ("/[a-z0-9/]{0,20}", prop::option::of("[a-z0-9=&%+]{0,30}"));
    (name_case, protocols, noise, target, any::<[u8; 16]>(), prop::option::of("[A-Za-z0-9._-]{1,40}")).prop_map(
        |(case, protocols, noise, (path, query), key, token)| {
            let mut lines = vec![
                ("Host".to_owned(), "example.com".to_owned()),
                ("Upgrade".to_owned(), "websocket".to_owned()),
                ("Connection".to_owned(), "keep-alive, Upgrade".to_owned()),
                ("Sec-WebSocket-Key".to_owned(), base64_16(&key)),
                ("Sec-WebSocket-Version".to_owned(), "13".to_owned()),
            ];
            if let Some(protocols) = protocols {
                lines.push(("Sec-WebSocket-Protocol".to_owned(), protocols.to_owned()));
            }
            if let Some(token) = token {
                lines.push(("Authorization".to_owned(), format!("Bearer {token}")));
            }
            lines.extend(noise.into_iter().map(|(name, value)| (format!("X-{name}"), value.trim().to_owned())));
            let mut text = format!("GET {path}{} HTTP/1.1\r\n", query.map(|q| format!("?{q}")).unwrap_or_default());
            for (i, (name, value)) in lines.iter().enumerate() {
                let name: String = name
                    .chars()
                    .enumerate()
                    .map(
                        |(j, c)| {
                            if case[(i + j) % case.len()] { c.to_ascii_lowercase() } else { c.to_ascii_uppercase() }
                        },
                    )
                    .collect();
                text.push_str(&format!("{name}: {value}\r\n"));
            }
            text.push_str("\r\n");
            text
        },
    )
}

fn base64_16(key: &[u8; 16]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(key)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn every_prefix_of_a_request_is_partial_and_the_whole_parses(
        text in upgrade_request(),
        frames in vec(any::<u8>(), 0..40),
    ) {
        let mut bytes = text.clone().into_bytes();
        for end in 0..bytes.len() {
            prop_assert_eq!(handshake::parse_request(&bytes[..end], &HANDSHAKE), Ok(Parsed::Partial));
        }
        let Ok(Parsed::Complete { request, consumed }) = handshake::parse_request(&bytes, &HANDSHAKE) else {
            panic!("no complete parse of {text:?}");
        };
        prop_assert_eq!(consumed, text.len());
        prop_assert!(matches!(request.websocket, Some(Ok(_))), "{:?}", request);
        // Frame bytes already behind the head in the same read change nothing.
        bytes.extend_from_slice(&frames);
        let again = handshake::parse_request(&bytes, &HANDSHAKE);
        prop_assert_eq!(again, Ok(Parsed::Complete { request, consumed }));
    }

    #[test]
    fn parse_request_never_panics(
        bytes in vec(any::<u8>(), 0..400),
        request_bytes_max in 0..500usize,
        headers_max in 0..20usize,
    ) {
        let limits = HandshakeLimits { request_bytes_max, headers_max };
        let _ = handshake::parse_request(&bytes, &limits);
    }

    #[test]
    fn mutated_requests_never_panic(
        text in upgrade_request(),
        flips in vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
    ) {
        let mut bytes = text.into_bytes();
        for (at, byte) in flips {
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        if let Ok(Parsed::Complete { request, consumed }) = handshake::parse_request(&bytes, &HANDSHAKE) {
            prop_assert!(consumed <= bytes.len());
            if let Some(Err(err)) = request.websocket {
                let refusal = handshake::refusal(&err);
                let status_line = format!("HTTP/1.1 {}", err.status());
                prop_assert!(refusal.starts_with(status_line.as_bytes()));
            }
        }
    }

    #[test]
    fn query_param_never_panics(query in "[a-z%=&+0-9A-F\u{e9}]{0,40}", name in "[a-z]{0,3}") {
        let _ = handshake::query_param(&query, &name);
    }
}

// ---- interop with tungstenite ----

/// Both directions of a connection as byte queues; reads with nothing queued would block.
#[derive(Clone, Default)]
struct Pipe {
    to_client: Rc<RefCell<VecDeque<u8>>>,
    to_server: Rc<RefCell<Vec<u8>>>,
}

impl Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut queue = self.to_client.borrow_mut();
        if queue.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = queue.read(buf)?;
        Ok(n)
    }
}

impl Write for Pipe {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.to_server.borrow_mut().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A tungstenite client that asked for `protocols`, upgraded by our handshake code.
fn connect(protocols: Option<&str>) -> (WebSocket<Pipe>, Pipe, Subprotocol) {
    let pipe = Pipe::default();
    let mut request = "ws://example.com/rooms/7?token=t".into_client_request().unwrap();
    if let Some(protocols) = protocols {
        request.headers_mut().insert("Sec-WebSocket-Protocol", protocols.parse().unwrap());
    }
    let Err(HandshakeError::Interrupted(mid)) = tungstenite::client(request, pipe.clone()) else {
        panic!("the client should wait for our response");
    };
    let sent = std::mem::take(&mut *pipe.to_server.borrow_mut());
    let Ok(Parsed::Complete { request, consumed }) = handshake::parse_request(&sent, &HANDSHAKE) else {
        panic!("request did not parse: {}", String::from_utf8_lossy(&sent));
    };
    assert_eq!((consumed, request.path.as_str()), (sent.len(), "/rooms/7"));
    let upgrade = request.websocket.unwrap().unwrap();
    pipe.to_client.borrow_mut().extend(handshake::response_101(&upgrade, false));
    let (client, _response) = mid.handshake().expect("client accepts our 101");
    (client, pipe, upgrade.protocol)
}

#[derive(Debug, PartialEq)]
enum Seen {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Close(Option<u16>, String),
    Other,
}

fn read_all(bytes: &mut [u8], chunk: usize) -> Vec<Seen> {
    let mut reader = Reader::default();
    let mut events = Vec::new();
    for read in bytes.chunks_mut(chunk) {
        let result = reader.feed(read, &LIMITS, &mut |event| {
            events.push(match event {
                Event::Text(text) => Seen::Text(text.to_owned()),
                Event::Binary(bytes) => Seen::Binary(bytes.to_vec()),
                Event::Ping(bytes) => Seen::Ping(bytes.to_vec()),
                Event::Close { code, reason } => Seen::Close(code.map(|c| c.0), reason.into()),
                Event::Pong(_) | Event::Compressed { .. } => Seen::Other,
            });
            Flow::Continue
        });
        assert_eq!(result, Ok(()));
    }
    assert_eq!(reader.buffered_bytes(), 0);
    events
}

#[test]
fn tungstenite_client_upgrades_and_its_frames_read_back() {
    let (mut client, pipe, protocol) = connect(Some("chat, barrage.v1.json"));
    assert_eq!(protocol, Subprotocol::Json);
    let big = vec![0xA5; 70_000];
    client.send(WsMessage::text("héllo")).unwrap();
    client.send(WsMessage::binary(big.clone())).unwrap();
    client.send(WsMessage::Ping(vec![1, 2, 3].into())).unwrap();
    let close = CloseFrame { code: TungCloseCode::Away, reason: "bye".into() };
    client.close(Some(close)).unwrap();
    let _ = client.flush();
    let sent = pipe.to_server.borrow().clone();
    let expected = [
        Seen::Text("héllo".into()),
        Seen::Binary(big),
        Seen::Ping(vec![1, 2, 3]),
        Seen::Close(Some(1001), "bye".into()),
    ];
    for chunk in [sent.len(), 1, 7, 1000] {
        assert_eq!(read_all(&mut sent.clone(), chunk), expected, "reads of {chunk}");
    }
}

#[test]
fn tungstenite_client_reads_our_frames() {
    let (mut client, pipe, protocol) = connect(None);
    assert_eq!(protocol, Subprotocol::Proto);
    let mut out = frame::frame(Opcode::Text, "hi".as_bytes());
    out.extend(frame::frame(Opcode::Binary, &[7; 300]));
    out.extend(frame::close_frame(CloseCode::TRY_AGAIN, "overloaded"));
    pipe.to_client.borrow_mut().extend(out);
    assert_eq!(client.read().unwrap(), WsMessage::text("hi"));
    assert_eq!(client.read().unwrap(), WsMessage::binary(vec![7; 300]));
    let WsMessage::Close(Some(close)) = client.read().unwrap() else {
        panic!("expected a close frame");
    };
    assert_eq!((u16::from(close.code), close.reason.as_str()), (1013, "overloaded"));
}
