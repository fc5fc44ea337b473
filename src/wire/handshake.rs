//! The first bytes on the public listener: one HTTP/1.1 request head, parsed into a [`Request`]
//! (a WebSocket upgrade or a plain GET), and the bytes of our answer (101, or a refusal).

use std::borrow::Cow;
use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use sha1::{Digest, Sha1};

/// Limits on the request head; a client that exceeds them gets 431.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HandshakeLimits {
    /// Largest request head (request line, headers, blank line) kept while it arrives.
    pub request_bytes_max: usize,
    /// Most header lines; each costs one httparse slot (4 words) during a parse.
    pub headers_max: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    Partial,
    /// `consumed` bytes of the buffer were the head; what follows may already be frames.
    Complete {
        request: Request,
        consumed: usize,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    /// A CORS preflight.
    Options,
    Other,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: Method,
    /// Request target before '?', as sent.
    pub path: String,
    /// Raw query after '?', "" if none.
    pub query: String,
    /// Token from `Authorization: Bearer <t>` (scheme any case).
    pub bearer: Option<String>,
    /// None when the request has no `Upgrade` header (a plain HTTP GET, e.g. short polling);
    /// Some(Err) when it asks for a WebSocket but the upgrade is invalid.
    pub websocket: Option<Result<Upgrade, HandshakeError>>,
    /// The `Origin` header, if sent (browsers always send it).
    pub origin: Option<String>,
    /// The connection may carry another request after the answer: HTTP/1.1 without
    /// `Connection: close` (1.0 with `keep-alive`), and no request body to skip.
    pub keep_alive: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upgrade {
    /// Sec-WebSocket-Accept value.
    pub accept: String,
    pub protocol: Subprotocol,
    /// Whether the client sent Sec-WebSocket-Protocol (we echo our choice only then).
    pub protocol_offered: bool,
    /// The client offered permessage-deflate in a form this server accepts
    /// (`deflate::accepts`).
    pub deflate: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Subprotocol {
    /// Protobuf envelopes in Binary messages; the default when the client offers none.
    Proto,
    /// JSON envelopes in Text messages.
    Json,
}

impl Subprotocol {
    pub fn name(self) -> &'static str {
        match self {
            Self::Proto => "barrage.v1.proto",
            Self::Json => "barrage.v1.json",
        }
    }

    fn from_name(name: &[u8]) -> Option<Self> {
        [Self::Proto, Self::Json].into_iter().find(|protocol| protocol.name().as_bytes() == name)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HandshakeError {
    /// Head over request_bytes_max or over headers_max headers.
    TooLarge,
    /// Not HTTP/1.1 syntax; or, for an upgrade, HTTP/1.0 or no Host.
    Malformed,
    /// An upgrade with a method other than GET.
    Method,
    /// `Connection` lacks `upgrade` or `Upgrade` lacks `websocket`.
    NotUpgrade,
    /// `Sec-WebSocket-Version` is not 13.
    Version,
    /// `Sec-WebSocket-Key` missing, repeated, or not base64 of 16 bytes.
    Key,
    /// The client offered subprotocols, none of them ours.
    Subprotocol,
}

impl HandshakeError {
    pub fn status(&self) -> u16 {
        match self {
            Self::TooLarge => 431,
            Self::Method => 405,
            Self::Version => 426,
            Self::Malformed | Self::NotUpgrade | Self::Key | Self::Subprotocol => 400,
        }
    }

    /// Metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TooLarge => "too_large",
            Self::Malformed => "malformed",
            Self::Method => "method",
            Self::NotUpgrade => "not_upgrade",
            Self::Version => "version",
            Self::Key => "key",
            Self::Subprotocol => "subprotocol",
        }
    }

    /// The body of the refusal: what the client got wrong.
    fn explain(&self) -> &'static str {
        match self {
            Self::TooLarge => "request head too large\n",
            Self::Malformed => "malformed HTTP/1.1 request\n",
            Self::Method => "websocket upgrade needs GET\n",
            Self::NotUpgrade => "needs Connection: upgrade and Upgrade: websocket\n",
            Self::Version => "Sec-WebSocket-Version must be 13\n",
            Self::Key => "Sec-WebSocket-Key must be base64 of 16 bytes\n",
            Self::Subprotocol => "supported subprotocols: barrage.v1.proto, barrage.v1.json\n",
        }
    }
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.explain().trim_end())
    }
}

impl std::error::Error for HandshakeError {}

/// RFC 6455 1.3: appended to the client's key before hashing.
const ACCEPT_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
const KEY_BYTES: usize = 0x10;
const VERSION: &[u8] = b"13";

/// Parses one HTTP request head from `buf` (bytes received so far). Partial while incomplete and
/// within limits; TooLarge once buf.len() exceeds request_bytes_max without a complete head, or
/// more than headers_max headers. Only the first request_bytes_max bytes are looked at, so a
/// head longer than that is TooLarge however it was split into reads.
pub fn parse_request(buf: &[u8], limits: &HandshakeLimits) -> Result<Parsed, HandshakeError> {
    let window = buf.get(..limits.request_bytes_max).unwrap_or(buf);
    let mut headers = vec![httparse::EMPTY_HEADER; limits.headers_max];
    let mut head = httparse::Request::new(&mut headers);
    let consumed = match head.parse(window) {
        Ok(httparse::Status::Complete(consumed)) => consumed,
        Ok(httparse::Status::Partial) if buf.len() > window.len() => {
            return Err(HandshakeError::TooLarge);
        }
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(httparse::Error::TooManyHeaders) => return Err(HandshakeError::TooLarge),
        Err(_) => return Err(HandshakeError::Malformed),
    };
    let request = request_from(&head).ok_or(HandshakeError::Malformed)?;
    Ok(Parsed::Complete { request, consumed })
}

/// None if a part httparse leaves optional is missing (it never is in a complete head).
fn request_from(head: &httparse::Request<'_, '_>) -> Option<Request> {
    let method = match head.method? {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        "OPTIONS" => Method::Options,
        _ => Method::Other,
    };
    let target = head.path?;
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let websocket = header(head.headers, "upgrade").map(|_| upgrade(head, method));
    let origin = header(head.headers, "origin").and_then(|o| std::str::from_utf8(o).ok()).map(|o| o.trim().to_owned());
    let body = header(head.headers, "content-length").is_some_and(|l| l.trim_ascii() != b"0")
        || header(head.headers, "transfer-encoding").is_some();
    let keep_alive = !body
        && match head.version? {
            1 => !has_token(head.headers, "connection", b"close"),
            _ => has_token(head.headers, "connection", b"keep-alive"),
        };
    let bearer = bearer(head.headers);
    Some(Request { method, path: path.to_owned(), query: query.to_owned(), bearer, websocket, origin, keep_alive })
}

/// RFC 6455 4.2.1, checked in the order a client most likely gets wrong.
fn upgrade(head: &httparse::Request<'_, '_>, method: Method) -> Result<Upgrade, HandshakeError> {
    if method != Method::Get {
        return Err(HandshakeError::Method);
    }
    if head.version != Some(1) || header(head.headers, "host").is_none() {
        return Err(HandshakeError::Malformed);
    }
    let connection = has_token(head.headers, "connection", b"upgrade");
    if !connection || !has_token(head.headers, "upgrade", b"websocket") {
        return Err(HandshakeError::NotUpgrade);
    }
    if single(head.headers, "sec-websocket-version").map(<[u8]>::trim_ascii) != Some(VERSION) {
        return Err(HandshakeError::Version);
    }
    let key = single(head.headers, "sec-websocket-key").ok_or(HandshakeError::Key)?;
    let key = std::str::from_utf8(key.trim_ascii()).map_err(|_| HandshakeError::Key)?;
    let decoded = BASE64.decode(key).map_err(|_| HandshakeError::Key)?;
    if decoded.len() != KEY_BYTES {
        return Err(HandshakeError::Key);
    }
    let (protocol, protocol_offered) = subprotocol(head.headers)?;
    Ok(Upgrade { accept: accept_key(key), protocol, protocol_offered, deflate: deflate_offered(head.headers) })
}

/// Whether the `Sec-WebSocket-Extensions` headers (all of them, in order) hold an acceptable
/// permessage-deflate offer.
fn deflate_offered(headers: &[httparse::Header<'_>]) -> bool {
    let agent = header(headers, "user-agent").and_then(|a| std::str::from_utf8(a).ok());
    if agent.is_some_and(super::deflate::ignores_client_no_context_takeover) {
        return false;
    }
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("sec-websocket-extensions"))
        .filter_map(|h| std::str::from_utf8(h.value).ok())
        .any(super::deflate::accepts)
}

/// The first protocol in the client's order that we speak; Proto when it offers none.
fn subprotocol(headers: &[httparse::Header<'_>]) -> Result<(Subprotocol, bool), HandshakeError> {
    let mut offered = tokens(headers, "sec-websocket-protocol").peekable();
    if offered.peek().is_none() {
        return Ok((Subprotocol::Proto, false));
    }
    let chosen = offered.find_map(Subprotocol::from_name);
    chosen.map(|protocol| (protocol, true)).ok_or(HandshakeError::Subprotocol)
}

/// The token after `Authorization: Bearer` (RFC 6750 2.1; the scheme is case-insensitive).
fn bearer(headers: &[httparse::Header<'_>]) -> Option<String> {
    let value = std::str::from_utf8(header(headers, "authorization")?).ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    let is_bearer = scheme.eq_ignore_ascii_case("bearer") && !token.is_empty();
    is_bearer.then(|| token.to_owned())
}

fn header<'h>(headers: &[httparse::Header<'h>], name: &str) -> Option<&'h [u8]> {
    headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value)
}

/// The value of a header that must appear exactly once.
fn single<'h>(headers: &[httparse::Header<'h>], name: &str) -> Option<&'h [u8]> {
    let mut values = headers.iter().filter(|h| h.name.eq_ignore_ascii_case(name));
    let first = values.next()?;
    values.next().is_none().then_some(first.value)
}

/// The non-empty comma-separated tokens of every `name` header, in order.
fn tokens<'h>(headers: &[httparse::Header<'h>], name: &str) -> impl Iterator<Item = &'h [u8]> {
    headers
        .iter()
        .filter(move |h| h.name.eq_ignore_ascii_case(name))
        .flat_map(|h| h.value.split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|token| !token.is_empty())
}

fn has_token(headers: &[httparse::Header<'_>], name: &str, token: &[u8]) -> bool {
    tokens(headers, name).any(|t| t.eq_ignore_ascii_case(token))
}

/// base64(sha1(key + 258EAFA5-E914-47DA-95CA-C5AB0DC85B11)).
pub fn accept_key(sec_websocket_key: &str) -> String {
    let mut sha1 = Sha1::new();
    sha1.update(sec_websocket_key.as_bytes());
    sha1.update(ACCEPT_GUID.as_bytes());
    BASE64.encode(sha1.finalize())
}

/// Percent-decoded value of the first `name=` parameter of a raw query string ('+' is a space).
/// A malformed escape is kept as sent; bytes that decode to invalid UTF-8 become U+FFFD.
pub fn query_param<'a>(query: &'a str, name: &str) -> Option<Cow<'a, str>> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| percent_decode(key) == name)
        .map(|(_, value)| percent_decode(value))
}

fn percent_decode(raw: &str) -> Cow<'_, str> {
    if !raw.contains(['%', '+']) {
        return Cow::Borrowed(raw);
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut bytes = raw.bytes();
    while let Some(byte) = bytes.next() {
        match byte {
            b'+' => out.push(b' '),
            b'%' => {
                let mut ahead = bytes.clone();
                match (hex_digit(ahead.next()), hex_digit(ahead.next())) {
                    // Two hex digits make one byte: the `as` cannot truncate.
                    (Some(hi), Some(lo)) => {
                        out.push((hi << 4 | lo) as u8);
                        bytes = ahead;
                    }
                    _ => out.push(b'%'),
                }
            }
            other => out.push(other),
        }
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

fn hex_digit(byte: Option<u8>) -> Option<u32> {
    char::from(byte?).to_digit(0x10)
}

/// 101 Switching Protocols with Upgrade, Connection, Sec-WebSocket-Accept,
/// Sec-WebSocket-Protocol only when the client offered one, and permessage-deflate's answer
/// when `deflate` (the server enables it and the client offered it).
pub fn response_101(upgrade: &Upgrade, deflate: bool) -> Vec<u8> {
    let protocol = if upgrade.protocol_offered {
        format!("Sec-WebSocket-Protocol: {}\r\n", upgrade.protocol.name())
    } else {
        String::new()
    };
    let extension = if deflate && upgrade.deflate {
        format!("Sec-WebSocket-Extensions: {}\r\n", super::deflate::RESPONSE)
    } else {
        String::new()
    };
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n{protocol}{extension}\r\n",
        upgrade.accept
    )
    .into_bytes()
}

/// A complete HTTP/1.1 response with Content-Length and `Connection: close`, for refusals and
/// small plain-HTTP answers. `extra_headers` are full "Name: value" lines without CRLF. An empty
/// `content_type` leaves the Content-Type header out.
pub fn http_response(status: u16, content_type: &str, extra_headers: &[&str], body: &[u8]) -> Vec<u8> {
    http_answer(status, content_type, extra_headers, body, false)
}

/// As `http_response`, with `Connection: keep-alive` when `keep_alive`.
pub fn http_answer(status: u16, content_type: &str, extra_headers: &[&str], body: &[u8], keep_alive: bool) -> Vec<u8> {
    let mut head = format!("HTTP/1.1 {status} {}\r\n", reason_phrase(status));
    if !content_type.is_empty() {
        head.push_str(&format!("Content-Type: {content_type}\r\n"));
    }
    let connection = if keep_alive { "keep-alive" } else { "close" };
    head.push_str(&format!("Content-Length: {}\r\nConnection: {connection}\r\n", body.len()));
    for line in extra_headers {
        head.push_str(line);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    out
}

/// The phrase is optional on the wire (RFC 9112 4); we name the statuses we send.
fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// The refusal for a handshake error: status, a short text/plain body naming the problem,
/// and `Sec-WebSocket-Version: 13` on a version mismatch (426).
pub fn refusal(err: &HandshakeError) -> Vec<u8> {
    let extra: &[&str] = match err {
        HandshakeError::Version => &["Sec-WebSocket-Version: 13"],
        HandshakeError::Method => &["Allow: GET"],
        _ => &[],
    };
    let body = err.explain().as_bytes();
    http_response(err.status(), "text/plain; charset=utf-8", extra, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: HandshakeLimits = HandshakeLimits { request_bytes_max: 0x1000, headers_max: 0x20 };
    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
    const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

    fn upgrade_request(extra: &str) -> String {
        format!(
            "GET /rooms/7?token=a%20b HTTP/1.1\r\nHost: example.com\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\
             {extra}\r\n"
        )
    }

    fn parse(text: &str) -> Result<Request, HandshakeError> {
        match parse_request(text.as_bytes(), &LIMITS)? {
            Parsed::Complete { request, consumed } => {
                assert_eq!(consumed, text.len());
                Ok(request)
            }
            Parsed::Partial => panic!("partial: {text:?}"),
        }
    }

    fn websocket(text: &str) -> Result<Upgrade, HandshakeError> {
        parse(text)?.websocket.expect("an upgrade request")
    }

    /// Replaces one header line of the standard upgrade request.
    fn with(from: &str, to: &str) -> String {
        let text = upgrade_request("");
        assert!(text.contains(from), "{from}");
        text.replacen(from, to, 1)
    }

    #[test]
    fn rfc_6455_example_key() {
        assert_eq!(accept_key(KEY), ACCEPT);
    }

    #[test]
    fn parses_a_valid_upgrade() {
        let request = parse(&upgrade_request("")).unwrap();
        assert_eq!(request.method, Method::Get);
        assert_eq!(request.path, "/rooms/7");
        assert_eq!(request.query, "token=a%20b");
        assert_eq!(request.bearer, None);
        let upgrade =
            Upgrade { accept: ACCEPT.into(), protocol: Subprotocol::Proto, protocol_offered: false, deflate: false };
        assert_eq!(request.websocket, Some(Ok(upgrade)));
    }

    #[test]
    fn header_names_and_tokens_in_any_case() {
        let text = "GET / HTTP/1.1\r\nhOST: x\r\nUPGRADE: WebSocket\r\n\
                    connection: keep-alive, Upgrade\r\nsec-websocket-KEY: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                    SEC-WEBSOCKET-VERSION: 13\r\n\r\n";
        assert_eq!(websocket(text).unwrap().accept, ACCEPT);
    }

    #[test]
    fn plain_get_has_no_websocket() {
        let text = "GET /poll?since=3 HTTP/1.1\r\nHost: x\r\nAuthorization: bEaReR  tok.en \r\n\r\n";
        let request = parse(text).unwrap();
        assert_eq!(request.websocket, None);
        assert_eq!(request.bearer.as_deref(), Some("tok.en"));
        assert_eq!(request.query, "since=3");
        let basic = "GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Basic abc\r\n\r\n";
        assert_eq!(parse(basic).unwrap().bearer, None);
        let head = parse("HEAD / HTTP/1.0\r\n\r\n").unwrap();
        assert_eq!((head.method, head.websocket), (Method::Head, None));
    }

    #[test]
    fn subprotocol_choice_follows_client_order() {
        let two_headers = "Sec-WebSocket-Protocol: chat, barrage.v1.json\r\n\
                           Sec-WebSocket-Protocol: barrage.v1.proto\r\n";
        let upgrade = websocket(&upgrade_request(two_headers)).unwrap();
        assert_eq!((upgrade.protocol, upgrade.protocol_offered), (Subprotocol::Json, true));
        let proto_first = "Sec-WebSocket-Protocol: barrage.v1.proto,barrage.v1.json\r\n";
        let upgrade = websocket(&upgrade_request(proto_first)).unwrap();
        assert_eq!((upgrade.protocol, upgrade.protocol_offered), (Subprotocol::Proto, true));
        let foreign = "Sec-WebSocket-Protocol: chat, superchat\r\n";
        assert_eq!(websocket(&upgrade_request(foreign)), Err(HandshakeError::Subprotocol));
        assert_eq!(Subprotocol::Json.name(), "barrage.v1.json");
    }

    #[test]
    fn upgrade_errors() {
        let cases = [
            (with("GET", "POST"), HandshakeError::Method),
            (with("HTTP/1.1", "HTTP/1.0"), HandshakeError::Malformed),
            (with("Host: example.com\r\n", ""), HandshakeError::Malformed),
            (with("Connection: Upgrade", "Connection: keep-alive"), HandshakeError::NotUpgrade),
            (with("Upgrade: websocket", "Upgrade: h2c"), HandshakeError::NotUpgrade),
            (with("Version: 13", "Version: 8"), HandshakeError::Version),
            (with("Sec-WebSocket-Version: 13\r\n", ""), HandshakeError::Version),
            (with(KEY, "c2hvcnQ="), HandshakeError::Key),
            (with(KEY, "not base64!"), HandshakeError::Key),
            (with(&format!("Sec-WebSocket-Key: {KEY}\r\n"), ""), HandshakeError::Key),
            (upgrade_request(&format!("Sec-WebSocket-Key: {KEY}\r\n")), HandshakeError::Key),
        ];
        for (text, err) in cases {
            assert_eq!(websocket(&text), Err(err), "{text}");
        }
    }

    #[test]
    fn syntax_and_size_errors() {
        let garbage = parse_request(b"\x16\x03\x01 hello\r\n\r\n", &LIMITS);
        assert_eq!(garbage, Err(HandshakeError::Malformed));
        let small = HandshakeLimits { request_bytes_max: 20, headers_max: 2 };
        assert_eq!(parse_request(b"GET / HTTP/1.1\r\n", &small), Ok(Parsed::Partial));
        let long = b"GET / HTTP/1.1\r\nHost: a\r\n";
        assert_eq!(parse_request(long, &small), Err(HandshakeError::TooLarge));
        // Complete, but longer than the limit: too large however the reads were cut.
        let whole = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(parse_request(whole, &small), Err(HandshakeError::TooLarge));
        let wide = HandshakeLimits { request_bytes_max: 0x100, headers_max: 2 };
        let many = b"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n";
        assert_eq!(parse_request(many, &wide), Err(HandshakeError::TooLarge));
    }

    #[test]
    fn frames_after_the_head_are_not_consumed() {
        let head = upgrade_request("");
        let mut bytes = head.clone().into_bytes();
        bytes.extend_from_slice(&[0x81, 0x80, 1, 2, 3, 4]);
        let Ok(Parsed::Complete { consumed, .. }) = parse_request(&bytes, &LIMITS) else {
            panic!("not complete");
        };
        assert_eq!(consumed, head.len());
    }

    #[test]
    fn query_params_are_percent_decoded() {
        let query = "a=1&token=x%2By+z%ZZ&empty=&token=second&caf%C3%A9=yes";
        assert_eq!(query_param(query, "a").as_deref(), Some("1"));
        assert_eq!(query_param(query, "token").as_deref(), Some("x+y z%ZZ"));
        assert_eq!(query_param(query, "empty").as_deref(), Some(""));
        assert_eq!(query_param(query, "café").as_deref(), Some("yes"));
        assert_eq!(query_param(query, "missing"), None);
        assert!(matches!(query_param(query, "a"), Some(Cow::Borrowed(_))));
        assert_eq!(query_param("t=%e2%82%ac%", "t").as_deref(), Some("€%"));
    }

    #[test]
    fn deflate_is_declined_for_safari_15_0_to_15_3() {
        let request = |agent: &str| {
            format!(
                "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
                 Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\
                 User-Agent: Mozilla/5.0 (iPhone) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/{agent} Safari/604.1\r\n\r\n"
            )
        };
        assert!(!websocket(&request("15.2")).unwrap().deflate);
        assert!(websocket(&request("17.1")).unwrap().deflate);
    }

    #[test]
    fn response_101_echoes_protocol_only_when_offered() {
        let mut upgrade =
            Upgrade { accept: ACCEPT.into(), protocol: Subprotocol::Json, protocol_offered: false, deflate: true };
        let plain = String::from_utf8(response_101(&upgrade, false)).unwrap();
        assert_eq!(
            plain,
            format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Accept: {ACCEPT}\r\n\r\n"
            )
        );
        upgrade.protocol_offered = true;
        let echoed = String::from_utf8(response_101(&upgrade, false)).unwrap();
        assert!(echoed.ends_with("Sec-WebSocket-Protocol: barrage.v1.json\r\n\r\n"));
        let deflate = String::from_utf8(response_101(&upgrade, true)).unwrap();
        assert!(deflate.ends_with(
            "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover\r\n\r\n"
        ));
    }

    #[test]
    fn refusals_name_the_problem() {
        let text = String::from_utf8(refusal(&HandshakeError::Version)).unwrap();
        assert!(text.starts_with("HTTP/1.1 426 Upgrade Required\r\n"), "{text}");
        assert!(text.contains("\r\nSec-WebSocket-Version: 13\r\n"));
        assert!(text.contains("\r\nConnection: close\r\n"));
        let body = HandshakeError::Version.explain();
        assert!(text.ends_with(&format!(
            "Content-Length: {}\r\nConnection: close\r\nSec-WebSocket-Version: 13\r\n\r\n{body}",
            body.len()
        )));
        let text = String::from_utf8(refusal(&HandshakeError::TooLarge)).unwrap();
        assert!(text.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"));
        let text = String::from_utf8(refusal(&HandshakeError::Method)).unwrap();
        assert!(text.contains("\r\nAllow: GET\r\n"));
    }

    #[test]
    fn statuses_and_labels() {
        use HandshakeError::*;
        let all = [TooLarge, Malformed, Method, NotUpgrade, Version, Key, Subprotocol];
        let statuses: Vec<u16> = all.iter().map(HandshakeError::status).collect();
        assert_eq!(statuses, [431, 400, 405, 400, 426, 400, 400]);
        let labels: Vec<&str> = all.iter().map(HandshakeError::reason).collect();
        let expected = ["too_large", "malformed", "method", "not_upgrade", "version", "key", "subprotocol"];
        assert_eq!(labels, expected);
    }

    #[test]
    fn http_response_shape() {
        let out = http_response(204, "", &[], b"");
        let expected = "HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
        assert_eq!(String::from_utf8(out).unwrap(), expected);
    }
}
