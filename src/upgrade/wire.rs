//! The hand-over conversation on the control socket, as bytes (sans-IO):
//!
//! 1. new → old: a request, one JSON line (`Request`): protocol version, the new process's pid,
//!    and how the old one should drain its clients into it.
//! 2. old → new: an offer — a fixed header (`Offer`) sent with the listening sockets attached
//!    (SCM_RIGHTS: the API listener, then one per old shard), then `snapshot_bytes` of
//!    protobuf `StateSnapshot` — or a refusal: its own header and a reason.
//! 3. new → old: `READY` once it serves the listeners; the old process then drains and exits.
//!    Anything else, or silence until `upgrade.timeout_ms`, and the old process keeps its rooms.

use serde::{Deserialize, Serialize};

use crate::drain::Overrides;

/// Bumped when the conversation changes; each side refuses another version.
pub const VERSION: u16 = 1;
/// A request line is at most this long.
pub const REQUEST_BYTES_MAX: usize = 4096;
/// Descriptors in one message (the kernel's SCM_MAX_FD is 253): the API listener and at most
/// this many less one public listeners.
pub const FDS_MAX: usize = 253;
/// Sent by the new process when it serves the listeners.
pub const READY: &[u8; 6] = b"READY\n";
/// Length of an offer or refusal header.
pub const HEADER_BYTES: usize = 16;

const OFFER_MAGIC: [u8; 4] = *b"BRGO";
const REFUSAL_MAGIC: [u8; 4] = *b"BRGR";
/// A refusal's reason is at most this long.
pub const REASON_BYTES_MAX: usize = 1024;

/// What the new process asks for.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub version: u16,
    pub pid: u32,
    /// How the old process moves its clients to the new one (its url defaults to "": the same
    /// address).
    #[serde(default)]
    pub drain: DrainRequest,
}

/// The drain part of a request (`drain::Overrides` without the url, which stays "").
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DrainRequest {
    pub rate_per_s: Option<u32>,
    pub deadline_ms: Option<u64>,
    pub delay_ms: Option<u32>,
    pub jitter_ms: Option<u32>,
}

impl DrainRequest {
    /// The drain the old process runs: to the same address, with reason "upgrade".
    pub fn overrides(&self) -> Overrides {
        Overrides {
            url: Some(String::new()),
            reason: Some("upgrade".into()),
            rate_per_s: self.rate_per_s,
            deadline_ms: self.deadline_ms,
            delay_ms: self.delay_ms,
            jitter_ms: self.jitter_ms,
        }
    }
}

impl Request {
    pub fn encode(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).unwrap_or_default();
        line.push(b'\n');
        line
    }

    /// Parses one request line (without its newline).
    pub fn decode(line: &[u8]) -> Result<Request, WireError> {
        if line.len() > REQUEST_BYTES_MAX {
            return Err(WireError::TooLong);
        }
        let r: Request = serde_json::from_slice(line).map_err(|_| WireError::Malformed)?;
        if r.version != VERSION {
            return Err(WireError::Version(r.version));
        }
        Ok(r)
    }
}

/// The old process's answer header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// `public` public listeners (after the API listener) are attached; `snapshot_bytes` of
    /// state follow.
    Offer { public: u16, snapshot_bytes: u64 },
    /// `reason_bytes` of UTF-8 follow.
    Refusal { reason_bytes: u16 },
}

impl Answer {
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut h = [0u8; HEADER_BYTES];
        h[4..6].copy_from_slice(&VERSION.to_le_bytes());
        match *self {
            Answer::Offer { public, snapshot_bytes } => {
                h[..4].copy_from_slice(&OFFER_MAGIC);
                h[6..8].copy_from_slice(&public.to_le_bytes());
                h[8..16].copy_from_slice(&snapshot_bytes.to_le_bytes());
            }
            Answer::Refusal { reason_bytes } => {
                h[..4].copy_from_slice(&REFUSAL_MAGIC);
                h[6..8].copy_from_slice(&reason_bytes.to_le_bytes());
            }
        }
        h
    }

    pub fn decode(h: &[u8; HEADER_BYTES]) -> Result<Answer, WireError> {
        let version = u16::from_le_bytes([h[4], h[5]]);
        let count = u16::from_le_bytes([h[6], h[7]]);
        let mut len = [0u8; 8];
        len.copy_from_slice(&h[8..16]);
        let answer = match [h[0], h[1], h[2], h[3]] {
            OFFER_MAGIC => Answer::Offer { public: count, snapshot_bytes: u64::from_le_bytes(len) },
            REFUSAL_MAGIC => Answer::Refusal { reason_bytes: count },
            _ => return Err(WireError::Malformed),
        };
        if version != VERSION {
            return Err(WireError::Version(version));
        }
        match answer {
            Answer::Offer { public, .. } if public == 0 || usize::from(public) + 1 > FDS_MAX => {
                Err(WireError::Malformed)
            }
            Answer::Refusal { reason_bytes } if usize::from(reason_bytes) > REASON_BYTES_MAX => Err(WireError::TooLong),
            a => Ok(a),
        }
    }
}

/// A message that is not what the conversation expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireError {
    Malformed,
    TooLong,
    /// The other side speaks another version of the conversation.
    Version(u16),
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireError::Malformed => f.write_str("malformed hand-over message"),
            WireError::TooLong => f.write_str("hand-over message too long"),
            WireError::Version(v) => write!(f, "hand-over version {v}, this barrage speaks {VERSION}"),
        }
    }
}

impl std::error::Error for WireError {}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_request_round_trips_and_its_drain_goes_to_the_same_address() {
        let r = Request {
            version: VERSION,
            pid: 42,
            drain: DrainRequest { rate_per_s: Some(5_000), ..Default::default() },
        };
        let line = r.encode();
        assert_eq!(line.last(), Some(&b'\n'));
        let back = Request::decode(&line[..line.len() - 1]).unwrap();
        assert_eq!(back, r);
        let o = back.drain.overrides();
        assert_eq!((o.url.as_deref(), o.reason.as_deref(), o.rate_per_s), (Some(""), Some("upgrade"), Some(5_000)));
        // Defaults: the old process's own [drain] settings.
        let bare = Request::decode(br#"{"version":1,"pid":7}"#).unwrap();
        assert_eq!(bare.drain, DrainRequest::default());
    }

    #[test]
    fn requests_of_another_version_or_shape_are_refused() {
        assert_eq!(Request::decode(br#"{"version":2,"pid":7}"#), Err(WireError::Version(2)));
        assert_eq!(Request::decode(br#"{"version":1,"pid":7,"x":1}"#), Err(WireError::Malformed));
        assert_eq!(Request::decode(b"GET / HTTP/1.1"), Err(WireError::Malformed));
        assert_eq!(Request::decode(&[b' '; REQUEST_BYTES_MAX + 1]), Err(WireError::TooLong));
    }

    #[test]
    fn answers_round_trip_and_bounds_hold() {
        for a in [Answer::Offer { public: 2, snapshot_bytes: 1 << 33 }, Answer::Refusal { reason_bytes: 12 }] {
            assert_eq!(Answer::decode(&a.encode()), Ok(a));
        }
        let none = Answer::Offer { public: 0, snapshot_bytes: 0 }.encode();
        assert_eq!(Answer::decode(&none), Err(WireError::Malformed), "an offer without a public listener");
        let many = Answer::Offer { public: FDS_MAX as u16, snapshot_bytes: 0 }.encode();
        assert_eq!(Answer::decode(&many), Err(WireError::Malformed), "more descriptors than one message carries");
        let mut other = Answer::Refusal { reason_bytes: 1 }.encode();
        other[4] = 9;
        assert_eq!(Answer::decode(&other), Err(WireError::Version(9)));
        let long = Answer::Refusal { reason_bytes: REASON_BYTES_MAX as u16 + 1 }.encode();
        assert_eq!(Answer::decode(&long), Err(WireError::TooLong));
    }

    proptest! {
        #[test]
        fn decoding_anything_never_panics(bytes in proptest::collection::vec(any::<u8>(), HEADER_BYTES..=HEADER_BYTES), line in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut h = [0u8; HEADER_BYTES];
            h.copy_from_slice(&bytes);
            let _ = Answer::decode(&h);
            let _ = Request::decode(&line);
        }
    }
}
