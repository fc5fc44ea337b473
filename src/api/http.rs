//! Business API, wire layer: bytes read from an API connection become a [`RequestHead`] (shown
//! to the authoriser before any body byte is asked for), then a [`Request`]; the routes'
//! [`Response`] becomes bytes to write. Sans-IO: the server owns the socket.
//!
//! HTTP/1.1 subset: Content-Length bodies, `Expect: 100-continue`, keep-alive and pipelining;
//! a chunked body only as a stream the server hands to a route that takes one ([`next_chunk`]
//! reads it a chunk at a time). Every size is bounded by [`Limits`] before the bytes are buffered.
#![forbid(unsafe_code)]

use std::fmt;

/// The interim response a caller writes when [`RequestReader::read`] says [`Progress::Continue100`].
pub const CONTINUE_100: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// Bounds on one request. The server's read buffer never exceeds
/// `head_bytes_max + body_bytes_max` plus one read, so these are also its memory per connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Request line plus headers. Over it: 431.
    pub head_bytes_max: usize,
    /// Content-Length. Over it: 413, decided from the header before the body is read.
    pub body_bytes_max: usize,
    /// Header fields per request. Over it: 431.
    pub headers_max: usize,
}

impl Default for Limits {
    /// 16 KiB of head holds curl's ~200 bytes many times over, plus long API keys; 1 MiB of body
    /// holds a large publish batch; 64 headers are far above what real clients send.
    fn default() -> Self {
        Limits { head_bytes_max: 16 * 1024, body_bytes_max: 1024 * 1024, headers_max: 64 }
    }
}

/// Request method; routes answer 405 to the ones they do not serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
    Put,
    Delete,
    Head,
    Other,
}

impl Method {
    /// Methods are case-sensitive (RFC 9110 §9.1): `get` is some other method.
    fn from_token(token: &str) -> Self {
        match token {
            "GET" => Method::Get,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "DELETE" => Method::Delete,
            "HEAD" => Method::Head,
            _ => Method::Other,
        }
    }
}

/// A request's head: the request line and the fields the API acts on. The server shows it to the
/// handler's authoriser before reading any of the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: Method,
    /// The request target before `?`, raw: not percent-decoded.
    pub path: String,
    /// After `?`, raw; empty when there is none.
    pub query: String,
    /// Lowercase media type without parameters: `Application/JSON; charset=utf-8` → `application/json`.
    pub content_type: Option<String>,
    /// From `Authorization: Bearer <k>`, else `X-Api-Key: <k>`.
    pub api_key: Option<String>,
    /// HTTP/1.1: true unless `Connection: close`; HTTP/1.0: only with `Connection: keep-alive`.
    pub keep_alive: bool,
    /// Content-Length, 0 without one; already within `body_bytes_max`.
    pub body_bytes: usize,
    /// `Transfer-Encoding: chunked` (HTTP/1.1, no Content-Length): the body is a stream.
    pub chunked: bool,
}

/// One complete request, owned (the connection's buffer is compacted after it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub head: RequestHead,
    /// Exactly `head.body_bytes` long.
    pub body: Vec<u8>,
}

/// What [`RequestReader::read`] made of the bytes so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress<'r> {
    /// Need more bytes.
    Partial,
    /// The head is complete: once per request, before anything else about it. The caller decides
    /// from the head alone whether to go on (authorisation); to go on, it calls `read` again
    /// with the same buffer, since the body may already be there. To refuse, it stops calling.
    Head(&'r RequestHead),
    /// Write [`CONTINUE_100`], then read on: the client waits for it before sending the body.
    Continue100,
    /// A whole request; `consumed` bytes of the buffer were its. The rest is the next request's.
    Complete { request: Request, consumed: usize },
    /// A request whose body is chunked: its head took `consumed` bytes; the body follows as a
    /// stream, read with [`next_chunk`]. The client waits for [`CONTINUE_100`] first when
    /// `expects_continue`.
    Stream { head: RequestHead, consumed: usize, expects_continue: bool },
}

/// A request the reader refuses. Each ends the connection after its error response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpError {
    /// Head over `head_bytes_max` or more than `headers_max` headers.
    HeadTooLarge,
    /// Content-Length over `body_bytes_max`.
    BodyTooLarge,
    /// Not HTTP/1.x, or a header we rely on is unreadable or contradictory.
    Malformed,
    /// Transfer-Encoding other than a chunked stream on a route that takes one: Content-Length
    /// is required.
    LengthRequired,
}

impl HttpError {
    /// Every refusal, in declaration order (`error as usize` indexes it).
    pub const ALL: [HttpError; 4] =
        [HttpError::HeadTooLarge, HttpError::BodyTooLarge, HttpError::Malformed, HttpError::LengthRequired];

    /// The response status for this refusal.
    pub fn status(&self) -> u16 {
        match self {
            HttpError::HeadTooLarge => 431,
            HttpError::BodyTooLarge => 413,
            HttpError::Malformed => 400,
            HttpError::LengthRequired => 411,
        }
    }

    /// The `error` text of the JSON error body.
    pub fn message(&self) -> &'static str {
        match self {
            HttpError::HeadTooLarge => "request head too large",
            HttpError::BodyTooLarge => "request body too large",
            HttpError::Malformed => "malformed request",
            HttpError::LengthRequired => "transfer-encoding is not supported: send Content-Length",
        }
    }
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message(), self.status())
    }
}

impl std::error::Error for HttpError {}

/// Stateful reader for one connection: feed it the connection's unread bytes each time.
///
/// Call order, per request: `read(buf)` after every receive, with `buf` holding all unconsumed
/// bytes (it only grows between calls). `Partial` until the head is whole; then `Head` once —
/// authorise, and to go on call `read` again at once with the same `buf`; then `Continue100` at
/// most once, `Partial` while the body arrives, and `Complete { consumed, .. }`: drop `consumed`
/// bytes from the front and call again, since a pipelined request may already be whole.
#[derive(Debug)]
pub struct RequestReader {
    limits: Limits,
    /// The request in progress once its head is parsed, kept while its body arrives so the head
    /// is parsed once, not once per read.
    pending: Option<Pending>,
}

#[derive(Debug)]
struct Pending {
    head: RequestHead,
    head_bytes: usize,
    expects_continue: bool,
    /// Continue100 already returned for this request.
    continued: bool,
}

impl RequestReader {
    pub fn new(limits: Limits) -> Self {
        RequestReader { limits, pending: None }
    }

    /// `buf` holds all unconsumed bytes received on the connection; see the call order above.
    /// Continue100 comes when the head has `Expect: 100-continue` and the body has not fully
    /// arrived (the caller writes [`CONTINUE_100`] and reads on); never before `Head`, so a
    /// caller refused on its head is never invited to send the body.
    pub fn read(&mut self, buf: &[u8]) -> Result<Progress<'_>, HttpError> {
        let Some(pending) = self.pending.as_mut() else {
            return Ok(match parse_head(buf, &self.limits)? {
                Some(parsed) => Progress::Head(&self.pending.insert(parsed).head),
                None => Progress::Partial,
            });
        };
        if pending.head.chunked {
            let Some(p) = self.pending.take() else { unreachable!("matched above") };
            return Ok(Progress::Stream { head: p.head, consumed: p.head_bytes, expects_continue: p.expects_continue });
        }
        let consumed = pending.head_bytes.saturating_add(pending.head.body_bytes);
        if buf.len() < consumed {
            let send_continue = pending.expects_continue && !pending.continued;
            pending.continued |= send_continue;
            return Ok(if send_continue { Progress::Continue100 } else { Progress::Partial });
        }
        let body = buf[pending.head_bytes..consumed].to_vec();
        let Some(Pending { head, .. }) = self.pending.take() else { unreachable!("matched above") };
        Ok(Progress::Complete { request: Request { head, body }, consumed })
    }
}

/// Parses the head if it is all there; `None` while it is not (and still within limits).
fn parse_head(buf: &[u8], limits: &Limits) -> Result<Option<Pending>, HttpError> {
    let mut slots = vec![httparse::EMPTY_HEADER; limits.headers_max];
    let mut parsed = httparse::Request::new(&mut slots);
    match parsed.parse(buf) {
        Ok(httparse::Status::Partial) if buf.len() >= limits.head_bytes_max => Err(HttpError::HeadTooLarge),
        Ok(httparse::Status::Partial) => Ok(None),
        Ok(httparse::Status::Complete(n)) if n > limits.head_bytes_max => Err(HttpError::HeadTooLarge),
        Ok(httparse::Status::Complete(n)) => build_head(&parsed, n, limits).map(Some),
        Err(httparse::Error::TooManyHeaders) => Err(HttpError::HeadTooLarge),
        Err(_) => Err(HttpError::Malformed),
    }
}

fn build_head(parsed: &httparse::Request<'_, '_>, head_bytes: usize, limits: &Limits) -> Result<Pending, HttpError> {
    let (Some(method), Some(target), Some(version)) = (parsed.method, parsed.path, parsed.version) else {
        return Err(HttpError::Malformed);
    };
    let fields = Fields::collect(parsed.headers)?;
    // A stream: chunked alone, HTTP/1.1, never beside a Content-Length (smuggling's root).
    let chunked = fields.transfer_encoding && fields.chunked && fields.content_length.is_none() && version == 1;
    if fields.transfer_encoding && !chunked {
        return Err(HttpError::LengthRequired);
    }
    let body_bytes = match fields.content_length {
        None => 0,
        Some(n) => usize::try_from(n).ok().filter(|n| *n <= limits.body_bytes_max).ok_or(HttpError::BodyTooLarge)?,
    };
    let http11 = version == 1;
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let head = RequestHead {
        method: Method::from_token(method),
        path: path.to_owned(),
        query: query.to_owned(),
        content_type: fields.content_type,
        api_key: fields.bearer.or(fields.x_api_key),
        keep_alive: !fields.close && (http11 || fields.keep_alive),
        body_bytes,
        chunked,
    };
    // RFC 9110 §10.1.1: never send 100 to an HTTP/1.0 client, nor when there is no body.
    let expects_continue = fields.expect_continue && http11 && (body_bytes > 0 || chunked);
    Ok(Pending { head, head_bytes, expects_continue, continued: false })
}

/// The header fields the API acts on, read once from the head.
#[derive(Default)]
struct Fields {
    content_length: Option<u64>,
    transfer_encoding: bool,
    /// Every Transfer-Encoding named exactly `chunked`.
    chunked: bool,
    close: bool,
    keep_alive: bool,
    expect_continue: bool,
    content_type: Option<String>,
    bearer: Option<String>,
    x_api_key: Option<String>,
}

impl Fields {
    fn collect(headers: &[httparse::Header<'_>]) -> Result<Self, HttpError> {
        let mut fields = Fields::default();
        for header in headers {
            fields.add(header.name, header.value)?;
        }
        Ok(fields)
    }

    fn add(&mut self, name: &str, value: &[u8]) -> Result<(), HttpError> {
        let is = |known: &str| name.eq_ignore_ascii_case(known);
        if is("content-length") {
            let n = content_length(value)?;
            // Repeats are allowed only if they agree (RFC 9110 §8.6); otherwise which one frames
            // the body is ambiguous, the root of request smuggling.
            if self.content_length.is_some_and(|seen| seen != n) {
                return Err(HttpError::Malformed);
            }
            self.content_length = Some(n);
        } else if is("transfer-encoding") {
            self.chunked =
                value.trim_ascii().eq_ignore_ascii_case(b"chunked") && (self.chunked || !self.transfer_encoding);
            self.transfer_encoding = true;
        } else if is("connection") {
            for option in value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                self.close |= option.eq_ignore_ascii_case(b"close");
                self.keep_alive |= option.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if is("expect") {
            self.expect_continue |= value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
        } else if is("content-type") {
            set_once(&mut self.content_type, media_type(value)?)?;
        } else if is("authorization") {
            set_once(&mut self.bearer, bearer_token(value)?)?;
        } else if is("x-api-key") {
            set_once(&mut self.x_api_key, non_empty(text(value)?))?;
        }
        Ok(())
    }
}

/// A chunk's data (None: the last chunk) and the bytes it took.
pub type Chunk = (Option<Vec<u8>>, usize);

/// One chunk of a chunked body from the start of `buf`: `Some((Some(data), consumed))`, or
/// `Some((None, consumed))` for the last (zero) chunk and its trailers, or None while it is not
/// all there. A chunk over `chunk_max` is refused from its size line, before it is buffered.
pub fn next_chunk(buf: &[u8], chunk_max: usize) -> Result<Option<Chunk>, HttpError> {
    let line = |from: usize| buf[from..].windows(2).position(|w| w == b"\r\n").map(|i| from + i);
    let Some(eol) = line(0) else {
        // A size line is a few hex digits and maybe extensions: a long one is junk.
        return if buf.len() > 1024 { Err(HttpError::Malformed) } else { Ok(None) };
    };
    let size_line = std::str::from_utf8(&buf[..eol]).map_err(|_| HttpError::Malformed)?;
    let hex = size_line.split(';').next().unwrap_or_default().trim();
    if hex.is_empty() || hex.len() > 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(HttpError::Malformed);
    }
    let size = usize::from_str_radix(hex, 16).map_err(|_| HttpError::BodyTooLarge)?;
    if size > chunk_max {
        return Err(HttpError::BodyTooLarge);
    }
    let start = eol + 2;
    if size == 0 {
        // Trailers, each a line, until an empty one.
        let mut at = start;
        loop {
            match line(at) {
                Some(end) if end == at => return Ok(Some((None, end + 2))),
                Some(end) if end - start > 16 * 1024 => return Err(HttpError::HeadTooLarge),
                Some(end) => at = end + 2,
                None if buf.len() - start > 16 * 1024 => return Err(HttpError::HeadTooLarge),
                None => return Ok(None),
            }
        }
    }
    if buf.len() < start + size + 2 {
        return Ok(None);
    }
    if &buf[start + size..start + size + 2] != b"\r\n" {
        return Err(HttpError::Malformed);
    }
    Ok(Some((Some(buf[start..start + size].to_vec()), start + size + 2)))
}

/// A field we act on must not appear twice: two API keys or two media types are ambiguous.
fn set_once(slot: &mut Option<String>, value: Option<String>) -> Result<(), HttpError> {
    if value.is_some() && slot.is_some() {
        return Err(HttpError::Malformed);
    }
    if value.is_some() {
        *slot = value;
    }
    Ok(())
}

/// Digits only: no sign, no list, no spaces inside. Too many digits is a too-large body.
fn content_length(value: &[u8]) -> Result<u64, HttpError> {
    let digits = value.trim_ascii();
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(HttpError::Malformed);
    }
    digits.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10).and_then(|n| n.checked_add(u64::from(d - b'0'))).ok_or(HttpError::BodyTooLarge)
    })
}

fn media_type(value: &[u8]) -> Result<Option<String>, HttpError> {
    let value = text(value)?;
    let essence = value.split(';').next().unwrap_or_default();
    Ok(non_empty(&essence.to_ascii_lowercase()))
}

/// `Bearer <token>` (scheme case-insensitive); other schemes are not ours and read as no key.
fn bearer_token(value: &[u8]) -> Result<Option<String>, HttpError> {
    let value = text(value)?;
    Ok(match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => non_empty(token),
        _ => None,
    })
}

fn text(value: &[u8]) -> Result<&str, HttpError> {
    std::str::from_utf8(value).map(str::trim).map_err(|_| HttpError::Malformed)
}

fn non_empty(s: &str) -> Option<String> {
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_owned())
}

/// A response from the routes, serialized by [`Response::to_bytes`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    /// Written after the standard fields. Do not set Content-Type, Content-Length or Connection
    /// here: `to_bytes` writes those. CR and LF in values are replaced by spaces.
    pub extra_headers: Vec<(&'static str, String)>,
}

impl Response {
    pub fn json(status: u16, value: &serde_json::Value) -> Self {
        Response::text(status, "application/json", value.to_string().into_bytes())
    }

    /// `{"error": message}` with the status — every 4xx/5xx body of the API looks like this.
    pub fn error(status: u16, message: &str) -> Self {
        Response::json(status, &serde_json::json!({ "error": message }))
    }

    pub fn text(status: u16, content_type: &'static str, body: Vec<u8>) -> Self {
        Response { status, content_type, body, extra_headers: Vec::new() }
    }

    /// Serializes with status line (standard reason phrase), Content-Type, Content-Length, and
    /// `Connection: keep-alive` or `close`. HEAD requests: the caller passes head_only=true (the
    /// Content-Length still says how long the body would be, but no body bytes follow).
    /// 1xx, 204 and 304 carry no body, so neither Content-Type nor Content-Length.
    pub fn to_bytes(&self, keep_alive: bool, head_only: bool) -> Vec<u8> {
        debug_assert!((100..=999).contains(&self.status), "status {}", self.status);
        let has_body = has_body(self.status);
        let mut head = format!("HTTP/1.1 {} {}\r\n", self.status, reason(self.status));
        if has_body {
            head.push_str(&format!("Content-Type: {}\r\n", self.content_type));
            head.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
        }
        head.push_str(if keep_alive { "Connection: keep-alive\r\n" } else { "Connection: close\r\n" });
        for (name, value) in &self.extra_headers {
            let value = value.replace(['\r', '\n'], " ");
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        if has_body && !head_only {
            bytes.extend_from_slice(&self.body);
        }
        bytes
    }
}

fn has_body(status: u16) -> bool {
    !(100..200).contains(&status) && status != 204 && status != 304
}

/// RFC 9110 §15 reason phrases for the statuses an API answers with; others get an empty one,
/// which is valid (clients ignore the phrase).
fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn reader() -> RequestReader {
        RequestReader::new(Limits::default())
    }

    /// Reads a buffer expected to hold one whole request: its head first, then all of it.
    fn complete(buf: &[u8]) -> (Request, usize) {
        complete_with(buf, Limits::default())
    }

    fn complete_with(buf: &[u8], limits: Limits) -> (Request, usize) {
        let mut r = RequestReader::new(limits);
        let head = match r.read(buf) {
            Ok(Progress::Head(head)) => head.clone(),
            other => panic!("expected Head, got {other:?}"),
        };
        match r.read(buf) {
            Ok(Progress::Complete { request, consumed }) => {
                assert_eq!(request.head, head, "Complete carries the head shown before");
                (request, consumed)
            }
            other => panic!("expected Complete, got {other:?}"),
        }
    }

    fn head_of(buf: &[u8]) -> RequestHead {
        match reader().read(buf) {
            Ok(Progress::Head(head)) => head.clone(),
            other => panic!("expected Head, got {other:?}"),
        }
    }

    fn error_of(buf: &[u8], limits: Limits) -> HttpError {
        match RequestReader::new(limits).read(buf) {
            Err(e) => e,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn get_with_query() {
        let buf = b"GET /v1/rooms/r1?x=1&y=%20 HTTP/1.1\r\nHost: a\r\n\r\n";
        let (request, consumed) = complete(buf);
        assert_eq!(consumed, buf.len());
        assert_eq!(
            request,
            Request {
                head: RequestHead {
                    method: Method::Get,
                    path: "/v1/rooms/r1".into(),
                    query: "x=1&y=%20".into(),
                    content_type: None,
                    api_key: None,
                    keep_alive: true,
                    body_bytes: 0,
                    chunked: false,
                },
                body: Vec::new(),
            }
        );
    }

    #[test]
    fn post_with_body_and_media_type() {
        let buf = b"POST /v1/broadcast HTTP/1.1\r\ncontent-TYPE: Application/JSON; charset=utf-8\r\n\
                    CONTENT-length: 13\r\n\r\n{\"text\":\"hi\"}";
        let (request, consumed) = complete(buf);
        assert_eq!(consumed, buf.len());
        assert_eq!(request.head.method, Method::Post);
        assert_eq!(request.head.content_type.as_deref(), Some("application/json"));
        assert_eq!(request.body, b"{\"text\":\"hi\"}");
    }

    #[test]
    fn methods() {
        for (token, method) in [
            ("GET", Method::Get),
            ("POST", Method::Post),
            ("PUT", Method::Put),
            ("DELETE", Method::Delete),
            ("HEAD", Method::Head),
            ("PATCH", Method::Other),
            ("get", Method::Other),
        ] {
            let buf = format!("{token} / HTTP/1.1\r\n\r\n");
            assert_eq!(complete(buf.as_bytes()).0.head.method, method, "{token}");
        }
    }

    #[test]
    fn partial_head_then_partial_body() {
        let buf = b"POST /p HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello";
        let mut r = reader();
        assert_eq!(r.read(&buf[..10]), Ok(Progress::Partial));
        assert!(matches!(r.read(&buf[..buf.len() - 3]), Ok(Progress::Head(h)) if h.body_bytes == 5));
        assert_eq!(r.read(&buf[..buf.len() - 3]), Ok(Progress::Partial));
        assert_eq!(r.read(&buf[..buf.len() - 1]), Ok(Progress::Partial));
        let Ok(Progress::Complete { request, consumed }) = r.read(buf) else { panic!() };
        assert_eq!((request.body.as_slice(), consumed), (&b"hello"[..], buf.len()));
    }

    #[test]
    fn pipelined_requests() {
        let first = b"POST /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc".as_slice();
        let second = b"GET /b HTTP/1.1\r\n\r\n".as_slice();
        let third = b"DELETE /c HTTP/1.1\r\nConnection: close\r\n\r\n".as_slice();
        let mut buf = [first, second, third].concat();
        let mut r = reader();
        let mut seen = Vec::new();
        while !buf.is_empty() {
            assert!(matches!(r.read(&buf), Ok(Progress::Head(_))));
            let Ok(Progress::Complete { request, consumed }) = r.read(&buf) else { panic!() };
            seen.push((request.head.method, request.head.path, request.body, request.head.keep_alive));
            buf.drain(..consumed);
        }
        assert_eq!(
            seen,
            [
                (Method::Post, "/a".into(), b"abc".to_vec(), true),
                (Method::Get, "/b".into(), Vec::new(), true),
                (Method::Delete, "/c".into(), Vec::new(), false),
            ]
        );
        assert_eq!(r.read(&buf), Ok(Progress::Partial));
    }

    #[test]
    fn expect_continue_once_then_complete() {
        let head = b"POST /m HTTP/1.1\r\nExpect: 100-Continue\r\nContent-Length: 4\r\n\r\n".to_vec();
        let mut r = reader();
        assert_eq!(r.read(&head[..5]), Ok(Progress::Partial));
        assert!(matches!(r.read(&head), Ok(Progress::Head(_))));
        assert_eq!(r.read(&head), Ok(Progress::Continue100));
        assert_eq!(r.read(&head), Ok(Progress::Partial));
        let with_some = [head.as_slice(), b"ab"].concat();
        assert_eq!(r.read(&with_some), Ok(Progress::Partial));
        let whole = [head.as_slice(), b"abcd"].concat();
        let Ok(Progress::Complete { request, .. }) = r.read(&whole) else { panic!() };
        assert_eq!(request.body, b"abcd");
        // The next request on the connection gets its own 100, after its own head.
        assert!(matches!(r.read(&head), Ok(Progress::Head(_))));
        assert_eq!(r.read(&head), Ok(Progress::Continue100));
    }

    #[test]
    fn expect_continue_not_sent_when_needless() {
        // Body already here.
        let buf = b"POST /m HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok";
        assert_eq!(complete(buf).0.body, b"ok");
        // No body.
        complete(b"POST /m HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n");
        complete(b"GET /m HTTP/1.1\r\nExpect: 100-continue\r\n\r\n");
        // HTTP/1.0 clients do not know 100.
        let old = b"POST /m HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n";
        let mut r = reader();
        assert!(matches!(r.read(old), Ok(Progress::Head(_))));
        assert_eq!(r.read(old), Ok(Progress::Partial));
    }

    #[test]
    fn head_is_shown_before_any_body_byte() {
        // A large announced body: the head alone is enough to decide, nothing of the body needed.
        let limits = Limits { body_bytes_max: 8 << 20, ..Limits::default() };
        let head = b"POST /v1/broadcast HTTP/1.1\r\nX-Api-Key: k\r\nContent-Length: 8388608\r\n\r\n";
        let mut r = RequestReader::new(limits);
        let Ok(Progress::Head(seen)) = r.read(head) else { panic!("no head") };
        assert_eq!(
            (seen.path.as_str(), seen.api_key.as_deref(), seen.body_bytes),
            ("/v1/broadcast", Some("k"), 8 << 20)
        );
        assert_eq!(r.read(head), Ok(Progress::Partial));
        // Head once per request, however often the caller asks while the body arrives.
        let more = [head.as_slice(), &[b'x'; 100]].concat();
        assert_eq!(r.read(&more), Ok(Progress::Partial));
    }

    #[test]
    fn head_comes_before_continue_100() {
        // A caller refused on the head stops here, so it never invites the body with a 100.
        let head = b"POST /m HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n";
        let mut r = reader();
        assert!(matches!(r.read(head), Ok(Progress::Head(h)) if h.body_bytes == 4));
        assert_eq!(r.read(head), Ok(Progress::Continue100));
    }

    #[test]
    fn keep_alive_rules() {
        let cases: [(&[u8], bool); 6] = [
            (b"GET / HTTP/1.1\r\n\r\n", true),
            (b"GET / HTTP/1.1\r\nConnection: Close\r\n\r\n", false),
            (b"GET / HTTP/1.1\r\nConnection: TE, close\r\n\r\n", false),
            (b"GET / HTTP/1.0\r\n\r\n", false),
            (b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", true),
            (b"GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n", false),
        ];
        for (buf, keep_alive) in cases {
            assert_eq!(head_of(buf).keep_alive, keep_alive, "{}", String::from_utf8_lossy(buf));
        }
    }

    #[test]
    fn api_key_sources() {
        let key = |headers: &str| {
            let buf = format!("GET / HTTP/1.1\r\n{headers}\r\n");
            head_of(buf.as_bytes()).api_key
        };
        assert_eq!(key("Authorization: Bearer k1\r\n").as_deref(), Some("k1"));
        assert_eq!(key("authorization: bearer  k2 \r\n").as_deref(), Some("k2"));
        assert_eq!(key("X-API-KEY: k3\r\n").as_deref(), Some("k3"));
        assert_eq!(key("X-Api-Key: k4\r\nAuthorization: Bearer k5\r\n").as_deref(), Some("k5"));
        assert_eq!(key("Authorization: Basic dTpw\r\n"), None);
        assert_eq!(key("Authorization: Basic dTpw\r\nX-Api-Key: k6\r\n").as_deref(), Some("k6"));
        assert_eq!(key("Authorization: Bearer \r\n"), None);
        assert_eq!(key(""), None);
    }

    #[test]
    fn ambiguous_fields_are_malformed() {
        let limits = Limits::default();
        for headers in [
            "X-Api-Key: a\r\nX-Api-Key: b\r\n",
            "Authorization: Bearer a\r\nAuthorization: Bearer b\r\n",
            "Content-Type: text/plain\r\nContent-Type: application/json\r\n",
            "Content-Length: 1\r\nContent-Length: 2\r\n",
        ] {
            let buf = format!("POST / HTTP/1.1\r\n{headers}\r\n");
            assert_eq!(error_of(buf.as_bytes(), limits), HttpError::Malformed, "{headers}");
        }
        // Agreeing repeats are fine.
        let buf = b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx";
        assert_eq!(complete(buf).0.body, b"x");
    }

    #[test]
    fn bad_content_length_is_malformed() {
        for value in ["-1", "+1", "1 2", "1,1", "0x10", "abc", ""] {
            let buf = format!("POST / HTTP/1.1\r\nContent-Length: {value}\r\n\r\n");
            assert_eq!(error_of(buf.as_bytes(), Limits::default()), HttpError::Malformed, "{value:?}");
        }
        let huge = b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999999\r\n\r\n";
        assert_eq!(error_of(huge, Limits::default()), HttpError::BodyTooLarge);
    }

    #[test]
    fn transfer_encoding_needs_length_unless_a_plain_chunked_stream() {
        let limits = Limits::default();
        for refused in [
            &b"POST / HTTP/1.1\r\nContent-Length: 3\r\ntransfer-encoding: identity\r\n\r\nabc"[..],
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert_eq!(error_of(refused, limits), HttpError::LengthRequired, "{}", String::from_utf8_lossy(refused));
        }
        let chunked =
            b"POST /v1/publish HTTP/1.1\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n3\r\nabc\r\n";
        let mut reader = RequestReader::new(limits);
        assert!(matches!(reader.read(chunked), Ok(Progress::Head(h)) if h.chunked));
        match reader.read(chunked) {
            Ok(Progress::Stream { head, consumed, expects_continue: true }) => {
                assert_eq!((head.path.as_str(), &chunked[consumed..]), ("/v1/publish", &b"3\r\nabc\r\n"[..]));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn chunks_are_read_whole_and_bounded() {
        assert_eq!(next_chunk(b"3\r\nab", 10), Ok(None));
        assert_eq!(next_chunk(b"3;ext=1\r\nabc\r\nrest", 10), Ok(Some((Some(b"abc".to_vec()), 14))));
        assert_eq!(next_chunk(b"0\r\nTrailer: x\r\n\r\nnext", 10), Ok(Some((None, 17))));
        assert_eq!(next_chunk(b"0\r\n", 10), Ok(None));
        assert_eq!(next_chunk(b"b\r\n", 10), Err(HttpError::BodyTooLarge), "refused from the size line");
        assert_eq!(next_chunk(b"ffffffffffffffffff\r\n", 10), Err(HttpError::Malformed));
        assert_eq!(next_chunk(b"zz\r\n", 10), Err(HttpError::Malformed));
        assert_eq!(next_chunk(b"3\r\nabcXY", 10), Err(HttpError::Malformed));
        assert_eq!(next_chunk(&[b'1'; 1025], 10), Err(HttpError::Malformed));
    }

    proptest::proptest! {
        /// A body cut into any chunks reads back whole, chunk by chunk, from any prefix.
        #[test]
        fn chunked_bodies_read_back(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
                                    cuts in proptest::collection::vec(1usize..50, 1..20), cut in 0usize..600) {
            let mut wire = Vec::new();
            let mut rest = &body[..];
            for c in cuts.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let (now, later) = rest.split_at((*c).min(rest.len()));
                wire.extend_from_slice(format!("{:x}\r\n", now.len()).as_bytes());
                wire.extend_from_slice(now);
                wire.extend_from_slice(b"\r\n");
                rest = later;
            }
            wire.extend_from_slice(b"0\r\n\r\n");
            let prefix = &wire[..cut.min(wire.len())];
            let (mut read, mut at) = (Vec::new(), 0);
            while let Ok(Some((data, used))) = next_chunk(&prefix[at..], 64) {
                at += used;
                match data {
                    Some(d) => read.extend_from_slice(&d),
                    None => break,
                }
            }
            proptest::prop_assert!(body.starts_with(&read));
            if cut >= wire.len() {
                proptest::prop_assert_eq!(read, body);
                proptest::prop_assert_eq!(at, wire.len());
            }
        }
    }

    #[test]
    fn body_too_large_refused_from_the_header_alone() {
        let limits = Limits { body_bytes_max: 10, ..Limits::default() };
        let head = b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 11\r\n\r\n";
        assert_eq!(error_of(head, limits), HttpError::BodyTooLarge);
        let at_limit = b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\n0123456789";
        assert_eq!(complete_with(at_limit, limits).0.body, b"0123456789");
    }

    #[test]
    fn head_too_large() {
        let limits = Limits { head_bytes_max: 64, ..Limits::default() };
        let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(100));
        assert_eq!(error_of(long.as_bytes(), limits), HttpError::HeadTooLarge);
        // Still incomplete at the limit: refused without waiting for the rest.
        assert_eq!(error_of(&long.as_bytes()[..64], limits), HttpError::HeadTooLarge);
        assert_eq!(RequestReader::new(limits).read(&long.as_bytes()[..63]), Ok(Progress::Partial));
        // Exactly at the limit is fine.
        let exact = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(64 - 18));
        assert_eq!(exact.len(), 64);
        complete_with(exact.as_bytes(), limits);
    }

    #[test]
    fn too_many_headers() {
        let limits = Limits { headers_max: 2, ..Limits::default() };
        let two = b"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\n\r\n";
        complete_with(two, limits);
        let three = b"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n";
        assert_eq!(error_of(three, limits), HttpError::HeadTooLarge);
    }

    #[test]
    fn malformed_heads() {
        for buf in [
            &b"GET / HTTP/2.0\r\n\r\n"[..],
            b"GET /\r\n\r\n",
            b"GET  / HTTP/1.1\r\n\r\n",
            b"GET /\xff HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nFolded: a\r\n b\r\n\r\n",
            b"GET / HTTP/1.1\r\nX-Api-Key: \xff\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", // a TLS ClientHello
        ] {
            assert_eq!(error_of(buf, Limits::default()), HttpError::Malformed, "{buf:?}");
        }
    }

    #[test]
    fn errors_map_to_statuses() {
        let all = [HttpError::HeadTooLarge, HttpError::BodyTooLarge, HttpError::Malformed, HttpError::LengthRequired];
        assert_eq!(all.map(|e| e.status()), [431, 413, 400, 411]);
        assert!(all.iter().all(|e| !e.message().is_empty()));
    }

    #[test]
    fn response_json_keep_alive() {
        let bytes = Response::json(200, &serde_json::json!({"ok": true})).to_bytes(true, false);
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\
             Connection: keep-alive\r\n\r\n{\"ok\":true}"
        );
    }

    #[test]
    fn response_error_close() {
        let bytes = Response::error(413, "too \"big\"").to_bytes(false, false);
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.starts_with("HTTP/1.1 413 Content Too Large\r\n"), "{text}");
        assert!(text.contains("\r\nConnection: close\r\n"), "{text}");
        let body = text.split("\r\n\r\n").nth(1).unwrap();
        let parsed: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(parsed, serde_json::json!({"error": "too \"big\""}));
    }

    #[test]
    fn response_head_only_keeps_length_drops_body() {
        let response = Response::text(200, "text/plain; version=0.0.4", b"metric 1\n".to_vec());
        let text = String::from_utf8(response.to_bytes(true, true)).unwrap();
        assert!(text.contains("Content-Length: 9\r\n") && text.ends_with("\r\n\r\n"), "{text}");
    }

    #[test]
    fn response_no_content_has_no_length() {
        let text = String::from_utf8(Response::text(204, "text/plain", b"x".to_vec()).to_bytes(true, false)).unwrap();
        assert_eq!(text, "HTTP/1.1 204 No Content\r\nConnection: keep-alive\r\n\r\n");
    }

    #[test]
    fn response_extra_headers_cannot_inject() {
        let mut response = Response::text(301, "text/plain", Vec::new());
        response.extra_headers.push(("Location", "/x\r\nSet-Cookie: a=b".into()));
        response.extra_headers.push(("Retry-After", "1".into()));
        let text = String::from_utf8(response.to_bytes(false, false)).unwrap();
        assert!(text.contains("\r\nLocation: /x  Set-Cookie: a=b\r\nRetry-After: 1\r\n\r\n"), "{text}");
        assert!(text.starts_with("HTTP/1.1 301 Moved Permanently\r\n"));
        assert!(Response::text(599, "t", Vec::new()).to_bytes(true, false).starts_with(b"HTTP/1.1 599 \r\n"));
    }

    /// A valid request with varied features, and the Request it must read as.
    fn valid_request() -> impl Strategy<Value = (Vec<u8>, Request)> {
        (
            prop::sample::select(vec!["GET", "POST", "PUT", "DELETE", "HEAD", "PATCH"]),
            "(/[a-z0-9_.-]{0,12}){1,4}",
            prop::option::of("[a-z0-9=&%]{0,20}"),
            prop::collection::vec(any::<u8>(), 0..300),
            any::<bool>(),
            prop::option::of("[A-Za-z0-9]{1,20}"),
            any::<bool>(),
        )
            .prop_map(|(method, path, query, body, expect, key, close)| {
                let mut raw = format!("{method} {path}");
                if let Some(q) = &query {
                    raw.push_str(&format!("?{q}"));
                }
                raw.push_str(" HTTP/1.1\r\nHost: localhost\r\nContent-Type: Application/Octet-Stream\r\n");
                raw.push_str(&format!("content-length: {}\r\n", body.len()));
                if expect {
                    raw.push_str("Expect: 100-continue\r\n");
                }
                if let Some(k) = &key {
                    raw.push_str(&format!("X-Api-Key: {k}\r\n"));
                }
                if close {
                    raw.push_str("Connection: close\r\n");
                }
                raw.push_str("\r\n");
                let request = Request {
                    head: RequestHead {
                        method: Method::from_token(method),
                        path,
                        query: query.unwrap_or_default(),
                        content_type: Some("application/octet-stream".into()),
                        api_key: key,
                        keep_alive: !close,
                        body_bytes: body.len(),
                        chunked: false,
                    },
                    body: body.clone(),
                };
                ([raw.into_bytes(), body].concat(), request)
            })
    }

    /// Feeds `bytes` by growing the buffer through `cuts`, like reads off a socket, and returns
    /// the requests read, dropping consumed bytes as a server would.
    fn feed_in_chunks(bytes: &[u8], cuts: &[prop::sample::Index]) -> Vec<Request> {
        let mut ends: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
        ends.push(bytes.len());
        ends.sort_unstable();
        let mut r = reader();
        let (mut buf, mut fed, mut out) = (Vec::new(), 0, Vec::new());
        for end in ends {
            buf.extend_from_slice(&bytes[fed..end]);
            fed = end;
            loop {
                match r.read(&buf) {
                    Ok(Progress::Complete { request, consumed }) => {
                        out.push(request);
                        buf.drain(..consumed);
                    }
                    Ok(Progress::Head(_)) => {}
                    Ok(Progress::Partial | Progress::Continue100) => break,
                    Ok(Progress::Stream { .. }) => panic!("no valid_request is chunked"),
                    Err(e) => panic!("valid request refused: {e}"),
                }
            }
        }
        assert!(buf.is_empty(), "bytes left over: {}", buf.len());
        out
    }

    proptest! {
        #[test]
        fn any_split_reads_the_same(
            (bytes, expected) in valid_request(),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            prop_assert_eq!(feed_in_chunks(&bytes, &cuts), vec![expected]);
        }

        #[test]
        fn any_split_of_a_pipeline_reads_the_same(
            (first, a) in valid_request(),
            (second, b) in valid_request(),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            prop_assert_eq!(feed_in_chunks(&[first, second].concat(), &cuts), vec![a, b]);
        }

        #[test]
        fn continue_100_at_most_once_per_request(
            (bytes, _) in valid_request(),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            let mut ends: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
            ends.sort_unstable();
            let mut r = reader();
            let continues = ends.iter().filter(|end| r.read(&bytes[..**end]) == Ok(Progress::Continue100)).count();
            prop_assert!(continues <= 1);
        }

        #[test]
        fn head_once_per_request_and_first(
            (first, a) in valid_request(),
            (second, b) in valid_request(),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            let bytes = [first, second].concat();
            let mut ends: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
            ends.push(bytes.len());
            ends.sort_unstable();
            let mut r = reader();
            let (mut start, mut events) = (0, Vec::new());
            for end in ends {
                loop {
                    match r.read(&bytes[start..end.max(start)]) {
                        Ok(Progress::Head(head)) => events.push(format!("head {}", head.path)),
                        Ok(Progress::Continue100) => events.push("100".into()),
                        Ok(Progress::Complete { request, consumed }) => {
                            events.push(format!("complete {}", request.head.path));
                            start += consumed;
                        }
                        Ok(Progress::Partial) => break,
                        Ok(Progress::Stream { .. }) => panic!("no valid_request is chunked"),
                        Err(e) => panic!("valid request refused: {e}"),
                    }
                }
            }
            // Each request: its head, maybe one 100, then the whole request; never interleaved.
            let mut expected_shape = Vec::new();
            for request in [&a, &b] {
                expected_shape.push(format!("head {}", request.head.path));
                expected_shape.push(format!("complete {}", request.head.path));
            }
            for (i, event) in events.iter().enumerate() {
                prop_assert!(event != "100" || (i > 0 && events[i - 1].starts_with("head ")), "{:?}", events);
            }
            events.retain(|e| e != "100");
            prop_assert_eq!(events, expected_shape);
        }

        #[test]
        fn arbitrary_bytes_never_panic(
            bytes in prop::collection::vec(any::<u8>(), 0..2000),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            let limits = Limits { head_bytes_max: 512, body_bytes_max: 256, headers_max: 8 };
            let mut ends: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
            ends.push(bytes.len());
            ends.sort_unstable();
            let mut r = RequestReader::new(limits);
            let mut start = 0;
            for end in ends {
                match r.read(&bytes[start..end.max(start)]) {
                    Ok(Progress::Complete { consumed, .. }) => start += consumed,
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        }

        #[test]
        fn arbitrary_bytes_after_a_valid_head_never_panic(
            method in "[A-Z]{1,7}",
            headers in prop::collection::vec(("[A-Za-z-]{1,16}", prop::collection::vec(any::<u8>(), 0..40)), 0..10),
        ) {
            let mut raw = format!("{method} / HTTP/1.1\r\n").into_bytes();
            for (name, value) in headers {
                raw.extend_from_slice(name.as_bytes());
                raw.extend_from_slice(b": ");
                raw.extend_from_slice(&value);
                raw.extend_from_slice(b"\r\n");
            }
            raw.extend_from_slice(b"\r\n");
            let _ = reader().read(&raw);
        }
    }
}
