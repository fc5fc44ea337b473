//! The hooks' HTTP/1.1 client: a `POST` with a body, on one keep-alive connection per in-flight
//! slot. The response parser is sans-IO (`parse_response`: bytes in, a status and a body or
//! "more", property-tested and fuzzed); `Client` is the thin blocking loop around a socket,
//! run on a hook worker thread, never on a shard.
#![forbid(unsafe_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Instant;

/// Headers in a response head at most.
const HEADERS_MAX: usize = 32;
/// Bytes of a response head at most.
const HEAD_BYTES_MAX: usize = 16 * 1024;

/// Where a hook posts: `http://host[:port]/path`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Url {
    /// `host:port` as written (resolved at each connect, so a backend's DNS name may move).
    pub authority: String,
    pub path: String,
}

impl Url {
    pub fn parse(s: &str) -> Result<Url, String> {
        let rest = s.strip_prefix("http://").ok_or_else(|| format!("{s}: only http:// URLs are supported"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.is_empty() || authority.contains('@') || path.contains(' ') {
            return Err(format!("{s}: not a URL of the form http://host:port/path"));
        }
        let authority = if authority.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        Ok(Url { authority, path: path.to_string() })
    }

    fn resolve(&self) -> Result<SocketAddr, Failure> {
        let mut addrs = self.authority.to_socket_addrs().map_err(|e| Failure::Io(format!("resolve: {e}")))?;
        addrs.next().ok_or_else(|| Failure::Io("resolve: no address".into()))
    }
}

/// Why a request did not give an answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Not answered within the hook's timeout.
    Timeout,
    /// Connecting, writing or reading failed, or the peer closed early.
    Io(String),
    /// A status other than 2xx.
    Status(u16),
    /// The response could not be parsed (or was too large).
    Malformed(String),
}

impl Failure {
    /// Whether asking again may help (for hooks that may be asked again).
    pub fn retryable(&self) -> bool {
        match self {
            Failure::Io(_) => true,
            Failure::Status(s) => *s >= 500,
            Failure::Timeout | Failure::Malformed(_) => false,
        }
    }
}

/// The request's bytes.
pub fn request(url: &Url, content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 160);
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: barrage\r\nContent-Type: {content_type}\r\nAccept: \
         {content_type}\r\nContent-Length: {}\r\n\r\n",
        url.path,
        url.authority,
        body.len()
    );
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(body);
    out
}

/// A whole response.
#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
    /// The server will close the connection (or the body ran to the close).
    pub close: bool,
}

/// What the bytes so far hold.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes needed.
    Partial,
    Complete(Response),
}

/// How the body's end is known.
enum Framing {
    Length(usize),
    Chunked,
    /// No length: the body runs until the server closes.
    UntilClose,
}

/// Parses a response from the start of `buf`; `eof` says the server has closed (a body without
/// a length ends there). Bodies over `body_max` are refused.
pub fn parse_response(buf: &[u8], eof: bool, body_max: usize) -> Result<Parsed, Failure> {
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    let mut head = httparse::Response::new(&mut headers);
    let head_len = match head.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > HEAD_BYTES_MAX => {
            return Err(Failure::Malformed("response head too large".into()));
        }
        Ok(httparse::Status::Partial) if eof => return Err(Failure::Io("closed before the response".into())),
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(e) => return Err(Failure::Malformed(format!("response head: {e}"))),
    };
    let status = head.code.unwrap_or(0);
    let mut close = head.version == Some(0);
    let mut framing = Framing::UntilClose;
    for h in head.headers.iter() {
        let value = std::str::from_utf8(h.value).unwrap_or("").trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = value.parse::<usize>().map_err(|_| Failure::Malformed("bad Content-Length".into()))?;
            framing = Framing::Length(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") && value.eq_ignore_ascii_case("chunked") {
            framing = Framing::Chunked;
        } else if h.name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case("close");
        }
    }
    if (100..200).contains(&status) || status == 204 || status == 304 {
        framing = Framing::Length(0);
    }
    let rest = &buf[head_len..];
    let body = match framing {
        Framing::Length(n) if n > body_max => return Err(Failure::Malformed("response body too large".into())),
        Framing::Length(n) if rest.len() >= n => rest[..n].to_vec(),
        Framing::Length(_) if eof => return Err(Failure::Io("closed inside the response body".into())),
        Framing::Length(_) => return Ok(Parsed::Partial),
        Framing::Chunked => match dechunk(rest, body_max)? {
            Some(body) => body,
            None if eof => return Err(Failure::Io("closed inside the response body".into())),
            None => return Ok(Parsed::Partial),
        },
        Framing::UntilClose if rest.len() > body_max => {
            return Err(Failure::Malformed("response body too large".into()));
        }
        Framing::UntilClose if eof => {
            close = true;
            rest.to_vec()
        }
        Framing::UntilClose => return Ok(Parsed::Partial),
    };
    Ok(Parsed::Complete(Response { status, body, close }))
}

/// A chunked body's data, or None while it is incomplete. Trailers are skipped.
fn dechunk(mut rest: &[u8], body_max: usize) -> Result<Option<Vec<u8>>, Failure> {
    let mut body = Vec::new();
    loop {
        let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
            return if rest.len() > 64 { Err(Failure::Malformed("chunk size line too long".into())) } else { Ok(None) };
        };
        let line = std::str::from_utf8(&rest[..eol]).map_err(|_| Failure::Malformed("bad chunk size".into()))?;
        let hex = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(hex, 16).map_err(|_| Failure::Malformed("bad chunk size".into()))?;
        rest = &rest[eol + 2..];
        if size == 0 {
            // Trailers, then an empty line.
            loop {
                let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else { return Ok(None) };
                if eol == 0 {
                    return Ok(Some(body));
                }
                rest = &rest[eol + 2..];
            }
        }
        if body.len().saturating_add(size) > body_max {
            return Err(Failure::Malformed("response body too large".into()));
        }
        if rest.len() < size + 2 {
            return Ok(None);
        }
        if &rest[size..size + 2] != b"\r\n" {
            return Err(Failure::Malformed("chunk not followed by CRLF".into()));
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

/// One keep-alive connection to a hook's backend.
pub struct Client {
    url: Url,
    conn: Option<TcpStream>,
    buf: Vec<u8>,
}

impl Client {
    pub fn new(url: Url) -> Client {
        Client { url, conn: None, buf: Vec::new() }
    }

    /// Posts `body` and waits for the whole response until `deadline`. A 2xx gives its body;
    /// anything else a failure (and the connection is dropped unless the answer was whole).
    pub fn post(
        &mut self,
        content_type: &str,
        body: &[u8],
        deadline: Instant,
        body_max: usize,
    ) -> Result<Vec<u8>, Failure> {
        let result = self.exchange(content_type, body, deadline, body_max);
        match &result {
            Ok(r) if !r.close => {}
            _ => self.conn = None,
        }
        let r = result?;
        if !(200..300).contains(&r.status) {
            return Err(Failure::Status(r.status));
        }
        Ok(r.body)
    }

    fn exchange(
        &mut self,
        content_type: &str,
        body: &[u8],
        deadline: Instant,
        body_max: usize,
    ) -> Result<Response, Failure> {
        if self.conn.as_ref().is_some_and(stale) {
            self.conn = None;
        }
        let mut conn = match self.conn.take() {
            Some(c) => c,
            None => {
                let addr = self.url.resolve()?;
                let left = remaining(deadline)?;
                let c = TcpStream::connect_timeout(&addr, left).map_err(|e| io_failure(&e, "connect"))?;
                let _ = c.set_nodelay(true);
                c
            }
        };
        conn.set_write_timeout(Some(remaining(deadline)?)).map_err(|e| io_failure(&e, "socket"))?;
        conn.write_all(&request(&self.url, content_type, body)).map_err(|e| io_failure(&e, "write"))?;
        self.buf.clear();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            conn.set_read_timeout(Some(remaining(deadline)?)).map_err(|e| io_failure(&e, "socket"))?;
            let n = match conn.read(&mut chunk) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_failure(&e, "read")),
            };
            self.buf.extend_from_slice(&chunk[..n]);
            match parse_response(&self.buf, n == 0, body_max)? {
                Parsed::Partial => {}
                Parsed::Complete(r) => {
                    if !r.close {
                        self.conn = Some(conn);
                    }
                    return Ok(r);
                }
            }
        }
    }
}

/// A pooled connection the server has closed (or that holds bytes nobody asked for) is not
/// reused: a request written to it would fail or read a stale answer.
fn stale(conn: &TcpStream) -> bool {
    if conn.set_nonblocking(true).is_err() {
        return true;
    }
    let mut probe = [0u8; 1];
    let dead = !matches!(conn.peek(&mut probe), Err(e) if e.kind() == ErrorKind::WouldBlock);
    dead || conn.set_nonblocking(false).is_err()
}

fn remaining(deadline: Instant) -> Result<std::time::Duration, Failure> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() { Err(Failure::Timeout) } else { Ok(left) }
}

fn io_failure(e: &std::io::Error, what: &str) -> Failure {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => Failure::Timeout,
        _ => Failure::Io(format!("{what}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn complete(buf: &[u8]) -> Response {
        match parse_response(buf, false, 1 << 20) {
            Ok(Parsed::Complete(r)) => r,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn urls() {
        let u = Url::parse("http://127.0.0.1:8000/hooks/send").unwrap();
        assert_eq!((u.authority.as_str(), u.path.as_str()), ("127.0.0.1:8000", "/hooks/send"));
        let u = Url::parse("http://backend").unwrap();
        assert_eq!((u.authority.as_str(), u.path.as_str()), ("backend:80", "/"));
        assert!(Url::parse("https://backend/").is_err());
        assert!(Url::parse("http:///x").is_err());
        assert!(Url::parse("http://u:p@h/").is_err());
    }

    #[test]
    fn lengths_chunks_and_closes() {
        let r = complete(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}");
        assert_eq!(r, Response { status: 200, body: b"{}".to_vec(), close: false });
        let r = complete(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;x=y\r\n{\"\r\n1\r\n}\r\n0\r\nT: 1\r\n\r\n",
        );
        assert_eq!(r.body, b"{\"}");
        let r = complete(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n");
        assert_eq!((r.status, r.close, r.body.len()), (204, true, 0));
        assert_eq!(parse_response(b"HTTP/1.0 200 OK\r\n\r\nab", false, 10), Ok(Parsed::Partial));
        let r = parse_response(b"HTTP/1.0 200 OK\r\n\r\nab", true, 10).unwrap();
        assert_eq!(r, Parsed::Complete(Response { status: 200, body: b"ab".to_vec(), close: true }));
    }

    #[test]
    fn bad_and_oversized_responses_are_refused() {
        let big = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n", false, 10);
        assert!(matches!(big, Err(Failure::Malformed(_))));
        let big = parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nb\r\n", false, 10);
        assert!(matches!(big, Err(Failure::Malformed(_))));
        assert!(matches!(parse_response(b"HTTP/1.1 20x OK\r\n\r\n", false, 10), Err(Failure::Malformed(_))));
        let bad = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n";
        assert!(matches!(parse_response(bad, false, 10), Err(Failure::Malformed(_))));
        let cut = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab", true, 10);
        assert!(matches!(cut, Err(Failure::Io(_))));
        let head = vec![b'a'; HEAD_BYTES_MAX + 1];
        assert!(matches!(parse_response(&head, false, 10), Err(Failure::Malformed(_))));
    }

    proptest! {
        /// A response read in any pieces parses to the same thing once whole, and never
        /// completes early.
        #[test]
        fn any_split_parses_the_same(body in proptest::collection::vec(any::<u8>(), 0..300),
                                     chunked in any::<bool>(), cut in 0usize..400) {
            let mut wire = b"HTTP/1.1 200 OK\r\n".to_vec();
            if chunked {
                wire.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
                for part in body.chunks(7) {
                    wire.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
                    wire.extend_from_slice(part);
                    wire.extend_from_slice(b"\r\n");
                }
                wire.extend_from_slice(b"0\r\n\r\n");
            } else {
                wire.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
                wire.extend_from_slice(&body);
            }
            let cut = cut.min(wire.len());
            if cut < wire.len() {
                prop_assert_eq!(parse_response(&wire[..cut], false, 1000), Ok(Parsed::Partial));
            }
            let whole = parse_response(&wire, false, 1000);
            prop_assert_eq!(whole, Ok(Parsed::Complete(Response { status: 200, body, close: false })));
        }

        /// Whatever the bytes, parsing ends in an answer, "more", or a failure: never a panic.
        #[test]
        fn junk_never_panics(junk in proptest::collection::vec(any::<u8>(), 0..600), eof in any::<bool>()) {
            let mut wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            wire.extend_from_slice(&junk);
            let _ = parse_response(&wire, eof, 100);
            let _ = parse_response(&junk, eof, 100);
        }
    }
}
