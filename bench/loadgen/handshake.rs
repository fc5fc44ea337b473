//! The upgrade: the request bytes a connection sends (built once per room), and an
//! incremental check of the gateway's answer (status 101 and the right `Sec-WebSocket-Accept`)
//! that keeps a few bytes of state instead of buffering the head.
#![forbid(unsafe_code)]

/// Every connection offers this key (RFC 6455 section 1.3's example), so every accept must be
/// the one below; a fixed key lets the check run without a SHA-1 per connection.
pub const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
/// base64(SHA-1(KEY ++ "258EAFA5-E914-47DA-95CA-C5AB0DC85B11")).
pub const ACCEPT: &[u8; 28] = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";
/// The longest response head we read (the gateway's 101 is about 160 bytes).
pub const HEAD_BYTES_MAX: u16 = 4096;

/// The `Sec-WebSocket-Protocol` offered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Subprotocol {
    /// `barrage.v1.proto`: binary frames, one protobuf `ServerFrame` each.
    Proto,
    /// `barrage.v1.json`: text frames, the same messages as JSON.
    Json,
}

impl Subprotocol {
    pub fn name(self) -> &'static str {
        match self {
            Subprotocol::Proto => "barrage.v1.proto",
            Subprotocol::Json => "barrage.v1.json",
        }
    }
}

/// The upgrade request that joins `room` from the handshake.
pub fn request(host: &str, room: &str, protocol: Subprotocol) -> Vec<u8> {
    upgrade(host, &format!("/ws?room={room}"), Some(protocol.name()))
}

/// The upgrade request that joins `room` resuming after seq `after` (`/ws?room=R&after=SEQ`),
/// written into `out` (cleared first): a reconnect's, built per connection without allocating
/// once `out` has grown.
pub fn resume_request(out: &mut Vec<u8>, host: &str, room: &str, after: u64, protocol: Subprotocol) {
    use std::io::Write as _;
    out.clear();
    // Writing into a Vec cannot fail.
    let _ = write!(
        out,
        "GET /ws?room={room}&after={after} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {}\r\n\r\n",
        protocol.name()
    );
}

/// An upgrade request for `path` (and query), offering `protocol` if any.
pub fn upgrade(host: &str, path: &str, protocol: Option<&str>) -> Vec<u8> {
    let offer = protocol.map(|p| format!("Sec-WebSocket-Protocol: {p}\r\n")).unwrap_or_default();
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n"
    )
    .into_bytes()
}

/// Why an upgrade was not accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadError {
    /// The first line is not `HTTP/1.x NNN ...`.
    BadStatusLine,
    /// A status other than 101.
    Status(u16),
    /// 101, but no `Sec-WebSocket-Accept` with the expected value.
    BadAccept,
    /// No blank line within `HEAD_BYTES_MAX`.
    TooLarge,
}

const ACCEPT_NAME: &[u8] = b"sec-websocket-accept:";
/// `accept` progress values: `0..ACCEPT_NAME.len()` while matching the name, then
/// `VALUE + k` after k value bytes matched, `DONE` after the whole value, `NO` for any other line.
const VALUE: u8 = ACCEPT_NAME.len() as u8;
const DONE: u8 = VALUE + ACCEPT.len() as u8;
const NO: u8 = u8::MAX;
const _: () = assert!((DONE as usize) < NO as usize);

/// The response head, one byte at a time: 8 bytes of state whatever the split of the reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeadScan {
    /// Bytes of head seen.
    total: u16,
    status: u16,
    /// Position in the current line, not counting CR (saturates).
    pos: u8,
    /// 0 while in the status line, then 1.
    line: u8,
    accept: u8,
    /// Bit 0: the status line is malformed; bit 1: a correct accept header was seen.
    flags: u8,
}

const BAD_STATUS_LINE: u8 = 1;
const ACCEPT_OK: u8 = 2;

impl HeadScan {
    /// Feeds bytes; `Ok(Some(n))` when the head ended after `n` of them (the rest are frames).
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Option<usize>, HeadError> {
        for (i, &b) in bytes.iter().enumerate() {
            self.total += 1;
            if self.total > HEAD_BYTES_MAX {
                return Err(HeadError::TooLarge);
            }
            match b {
                b'\r' => {}
                b'\n' => {
                    if self.end_line()? {
                        return Ok(Some(i + 1));
                    }
                }
                _ => {
                    if self.line == 0 {
                        self.status_byte(b);
                    } else {
                        self.header_byte(b);
                    }
                    self.pos = self.pos.saturating_add(1);
                }
            }
        }
        Ok(None)
    }

    /// Ends a line; true at the blank line that ends the head.
    fn end_line(&mut self) -> Result<bool, HeadError> {
        if self.line == 0 {
            if self.flags & BAD_STATUS_LINE != 0 || self.pos < 12 {
                return Err(HeadError::BadStatusLine);
            }
        } else if self.pos == 0 {
            return match self.status {
                101 if self.flags & ACCEPT_OK != 0 => Ok(true),
                101 => Err(HeadError::BadAccept),
                status => Err(HeadError::Status(status)),
            };
        } else if self.accept == DONE {
            self.flags |= ACCEPT_OK;
        }
        self.line = 1;
        self.pos = 0;
        self.accept = 0;
        Ok(false)
    }

    /// `HTTP/1.x NNN` (the reason phrase is not read).
    fn status_byte(&mut self, b: u8) {
        let ok = match self.pos {
            0..=6 => b == b"HTTP/1."[usize::from(self.pos)],
            7 => b.is_ascii_digit(),
            8 => b == b' ',
            9..=11 => {
                self.status = self.status * 10 + u16::from(b.wrapping_sub(b'0'));
                b.is_ascii_digit()
            }
            12 => b == b' ',
            _ => true,
        };
        if !ok {
            self.flags |= BAD_STATUS_LINE;
        }
    }

    /// Matches `Sec-WebSocket-Accept: <ACCEPT>` (name case-insensitive, optional spaces).
    fn header_byte(&mut self, b: u8) {
        self.accept = match self.accept {
            NO => NO,
            a if a < VALUE => {
                if b.to_ascii_lowercase() == ACCEPT_NAME[usize::from(a)] {
                    a + 1
                } else {
                    NO
                }
            }
            a if (b == b' ' || b == b'\t') && (a == VALUE || a == DONE) => a,
            DONE => NO,
            a if b == ACCEPT[usize::from(a - VALUE)] => a + 1,
            _ => NO,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use sha1::{Digest, Sha1};

    const OK: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
        Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Protocol: barrage.v1.proto\r\n\r\n";

    fn scan_split(bytes: &[u8], cut: usize) -> Result<Option<usize>, HeadError> {
        let mut h = HeadScan::default();
        match h.feed(&bytes[..cut])? {
            Some(n) => Ok(Some(n)),
            None => Ok(h.feed(&bytes[cut..])?.map(|n| n + cut)),
        }
    }

    #[test]
    fn accept_constant_is_the_key_s_accept() {
        let mut sha = Sha1::new();
        sha.update(KEY.as_bytes());
        sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
        let accept = base64::engine::general_purpose::STANDARD.encode(sha.finalize());
        assert_eq!(accept.as_bytes(), ACCEPT);
    }

    #[test]
    fn request_names_room_key_and_subprotocol() {
        let r = String::from_utf8(request("127.0.0.1:8080", "r7", Subprotocol::Proto)).unwrap();
        assert!(r.starts_with("GET /ws?room=r7 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"));
        assert!(r.contains("\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"));
        assert!(r.contains("\r\nSec-WebSocket-Version: 13\r\n"));
        assert!(r.contains("\r\nSec-WebSocket-Protocol: barrage.v1.proto\r\n\r\n"));
        assert!(r.ends_with("\r\n\r\n") && r.matches("\r\n\r\n").count() == 1);
        let j = String::from_utf8(request("h", "r0", Subprotocol::Json)).unwrap();
        assert!(j.contains("Sec-WebSocket-Protocol: barrage.v1.json\r\n"));
        let mut out = b"left over".to_vec();
        resume_request(&mut out, "127.0.0.1:8080", "r7", 1_882_449_317_462_017, Subprotocol::Proto);
        let resume = String::from_utf8(out).unwrap();
        let plain_request = String::from_utf8(request("127.0.0.1:8080", "r7", Subprotocol::Proto)).unwrap();
        assert_eq!(resume, plain_request.replacen("room=r7", "room=r7&after=1882449317462017", 1));
        let plain = String::from_utf8(upgrade("h", "/sub?room=r1", None)).unwrap();
        assert!(plain.starts_with("GET /sub?room=r1 HTTP/1.1\r\nHost: h\r\n"));
        assert!(!plain.contains("Protocol") && plain.ends_with("Version: 13\r\n\r\n"));
    }

    #[test]
    fn a_101_with_the_accept_ends_where_the_head_ends_for_every_split() {
        let mut stream = OK.to_vec();
        stream.extend_from_slice(&[0x82, 0x01, 0x0A]);
        for cut in 0..=stream.len() {
            assert_eq!(scan_split(&stream, cut), Ok(Some(OK.len())), "cut {cut}");
        }
        // One byte at a time.
        let mut h = HeadScan::default();
        for (i, b) in OK.iter().enumerate() {
            let r = h.feed(std::slice::from_ref(b)).unwrap();
            assert_eq!(r.is_some(), i + 1 == OK.len());
        }
    }

    #[test]
    fn header_name_case_and_spaces_do_not_matter_but_the_value_does() {
        let lower = b"HTTP/1.1 101 x\r\nsec-websocket-accept:s3pPLMBiTxaQ9kYGzzhZRbK+xOo=  \r\n\r\n";
        assert_eq!(HeadScan::default().feed(lower), Ok(Some(lower.len())));
        let wrong = b"HTTP/1.1 101 x\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo\r\n\r\n";
        assert_eq!(HeadScan::default().feed(wrong), Err(HeadError::BadAccept));
        let longer = b"HTTP/1.1 101 x\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=A\r\n\r\n";
        assert_eq!(HeadScan::default().feed(longer), Err(HeadError::BadAccept));
        let other = b"HTTP/1.1 101 x\r\nSec-WebSocket-Accepted: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
        assert_eq!(HeadScan::default().feed(other), Err(HeadError::BadAccept));
        let missing = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n";
        assert_eq!(HeadScan::default().feed(missing), Err(HeadError::BadAccept));
    }

    #[test]
    fn refusals_and_garbage() {
        let refused = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n";
        for cut in 0..=refused.len() {
            assert_eq!(scan_split(refused, cut), Err(HeadError::Status(503)));
        }
        assert_eq!(HeadScan::default().feed(b"HTTP/1.1 426 Upgrade Required\r\n\r\n"), Err(HeadError::Status(426)));
        assert_eq!(HeadScan::default().feed(b"SSH-2.0-OpenSSH\r\n"), Err(HeadError::BadStatusLine));
        assert_eq!(HeadScan::default().feed(b"HTTP/1.1 1x1 OK\r\n"), Err(HeadError::BadStatusLine));
        assert_eq!(HeadScan::default().feed(b"HTTP/1.1 10\r\n"), Err(HeadError::BadStatusLine));
        let endless = vec![b'a'; usize::from(HEAD_BYTES_MAX) + 1];
        let mut h = HeadScan::default();
        assert_eq!(h.feed(b"HTTP/1.1 101 OK\r\nX: "), Ok(None));
        assert_eq!(h.feed(&endless), Err(HeadError::TooLarge));
    }

    #[test]
    fn state_stays_small() {
        assert!(std::mem::size_of::<HeadScan>() <= 8);
    }
}
