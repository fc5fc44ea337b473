//! Business API, who may call: decided from a request's head and the peer's address alone, so
//! the server can refuse a caller as soon as the head is in, before reading a byte of its body.
//! Sans-IO: a pure check, no socket.
#![forbid(unsafe_code)]

use std::net::SocketAddr;

use super::http::{RequestHead, Response};

/// Served to anyone, key or not: load balancers probe health without one.
const OPEN_PATHS: [&str; 1] = ["/healthz"];

/// Why a caller is refused. The server answers with [`Denied::response`] and closes the
/// connection without reading the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// A key is configured and the request carries none: 401.
    KeyMissing,
    /// The request's key is not the configured one: 401.
    KeyWrong,
    /// No key is configured and the peer is not on loopback: 403.
    NotLoopback,
}

impl Denied {
    /// Every reason, in declaration order (`denied as usize` indexes it).
    pub const ALL: [Denied; 3] = [Denied::KeyMissing, Denied::KeyWrong, Denied::NotLoopback];

    pub fn status(&self) -> u16 {
        match self {
            Denied::KeyMissing | Denied::KeyWrong => 401,
            Denied::NotLoopback => 403,
        }
    }

    pub fn message(&self) -> &'static str {
        match self {
            Denied::KeyMissing => "API key required (Authorization: Bearer or X-Api-Key)",
            Denied::KeyWrong => "wrong API key",
            Denied::NotLoopback => "no API key is configured: only loopback callers are served",
        }
    }

    /// The JSON error; a 401 names the scheme it wants (RFC 9110 §11.6.1).
    pub fn response(&self) -> Response {
        let mut response = Response::error(self.status(), self.message());
        if self.status() == 401 {
            response.extra_headers.push(("WWW-Authenticate", "Bearer".into()));
        }
        response
    }
}

/// The API key check: with a key, every caller must present it; without one, only loopback
/// callers are served. `/healthz` is served either way.
#[derive(Debug, Clone)]
pub struct Access {
    /// Empty: no key configured.
    key: String,
}

impl Access {
    pub fn new(key: &str) -> Self {
        Access { key: key.to_owned() }
    }

    pub fn check(&self, head: &RequestHead, peer: SocketAddr) -> Result<(), Denied> {
        if OPEN_PATHS.contains(&head.path.as_str()) {
            return Ok(());
        }
        if self.key.is_empty() {
            return if peer.ip().is_loopback() { Ok(()) } else { Err(Denied::NotLoopback) };
        }
        match &head.api_key {
            Some(k) if constant_time_eq(k.as_bytes(), self.key.as_bytes()) => Ok(()),
            Some(_) => Err(Denied::KeyWrong),
            None => Err(Denied::KeyMissing),
        }
    }
}

/// Compares without an early exit on the first differing byte, so the time taken does not
/// tell a caller how much of a guessed key was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::http::Method;

    fn head(path: &str, key: Option<&str>) -> RequestHead {
        RequestHead {
            method: Method::Post,
            path: path.into(),
            query: String::new(),
            content_type: None,
            api_key: key.map(Into::into),
            keep_alive: true,
            body_bytes: 8 << 20,
            chunked: false,
        }
    }

    fn peer(ip: &str) -> SocketAddr {
        SocketAddr::new(ip.parse().unwrap(), 40000)
    }

    #[test]
    fn with_a_key_every_caller_must_present_it() {
        let access = Access::new("k3y");
        let far = peer("10.1.2.3");
        assert_eq!(access.check(&head("/v1/broadcast", Some("k3y")), far), Ok(()));
        assert_eq!(access.check(&head("/v1/broadcast", Some("k3y!")), far), Err(Denied::KeyWrong));
        assert_eq!(access.check(&head("/v1/broadcast", None), far), Err(Denied::KeyMissing));
        // Loopback is no excuse once a key is set.
        assert_eq!(access.check(&head("/metrics", None), peer("127.0.0.1")), Err(Denied::KeyMissing));
        assert_eq!(access.check(&head("/metrics", Some("k")), peer("::1")), Err(Denied::KeyWrong));
    }

    #[test]
    fn without_a_key_only_loopback_is_served() {
        let access = Access::new("");
        assert_eq!(access.check(&head("/v1/broadcast", None), peer("127.0.0.1")), Ok(()));
        assert_eq!(access.check(&head("/v1/broadcast", None), peer("::1")), Ok(()));
        assert_eq!(access.check(&head("/v1/broadcast", Some("x")), peer("192.168.0.9")), Err(Denied::NotLoopback));
    }

    #[test]
    fn health_is_open() {
        for access in [Access::new(""), Access::new("k3y")] {
            assert_eq!(access.check(&head("/healthz", None), peer("10.1.2.3")), Ok(()));
            assert_eq!(access.check(&head("/healthz", Some("wrong")), peer("10.1.2.3")), Ok(()));
        }
        // Only that exact path: no prefix or suffix tricks.
        let access = Access::new("k3y");
        for path in ["/healthz/", "/healthz/../v1/broadcast", "/healthzz"] {
            assert_eq!(access.check(&head(path, None), peer("10.1.2.3")), Err(Denied::KeyMissing), "{path}");
        }
    }

    #[test]
    fn refusals_answer_401_or_403_as_json() {
        assert_eq!(Denied::ALL.map(|d| d.status()), [401, 401, 403]);
        let text = String::from_utf8(Denied::KeyMissing.response().to_bytes(false, false)).unwrap();
        assert!(text.starts_with("HTTP/1.1 401 Unauthorized\r\n"), "{text}");
        assert!(text.contains("\r\nWWW-Authenticate: Bearer\r\n"), "{text}");
        assert!(text.ends_with(r#"{"error":"API key required (Authorization: Bearer or X-Api-Key)"}"#), "{text}");
        let forbidden = String::from_utf8(Denied::NotLoopback.response().to_bytes(false, false)).unwrap();
        assert!(!forbidden.contains("WWW-Authenticate"), "{forbidden}");
    }

    #[test]
    fn key_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
