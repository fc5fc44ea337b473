//! permessage-deflate (RFC 7692) the way a fan-out gateway can afford it: no compression or
//! decompression state per connection. The server answers every acceptable offer with
//! `server_no_context_takeover` and `client_no_context_takeover`, so each message is deflated
//! on its own: a block is compressed once (per wire format) and the same bytes go to every
//! member that negotiated the extension, and a client's message is inflated by the shard's one
//! inflater, bounded by the message size limit. Sans-IO.
//!
//! A compressed message is raw DEFLATE ending in an empty stored block whose last four bytes
//! (`00 00 ff ff`) are left off (RFC 7692 7.2.1); the inflater puts them back.
#![forbid(unsafe_code)]

use std::cell::RefCell;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The response header value for an accepted offer.
pub const RESPONSE: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

const TAIL: [u8; 4] = [0, 0, 0xff, 0xff];

/// Whether a `Sec-WebSocket-Extensions` value (every such header of the request, joined by
/// commas) holds a permessage-deflate offer this server accepts: the first offer whose
/// parameters are all known, well-formed and not repeated, and that leaves the server's
/// window at its 15-bit maximum (one compressed block serves every member, so the server
/// cannot shrink it for one; a client asking for less is declined — it gets uncompressed
/// frames). Any client window is fine: the server inflates with the largest.
pub fn accepts(offers: &str) -> bool {
    offers.split(',').any(acceptable)
}

fn acceptable(offer: &str) -> bool {
    let mut parts = offer.split(';').map(str::trim);
    if !parts.next().is_some_and(|name| name.eq_ignore_ascii_case("permessage-deflate")) {
        return false;
    }
    let mut seen = [false; 4];
    for param in parts {
        let (name, value) = match param.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
            None => (param, None),
        };
        let slot = match name.to_ascii_lowercase().as_str() {
            "server_no_context_takeover" if value.is_none() => 0,
            "client_no_context_takeover" if value.is_none() => 1,
            // Only 15 keeps the shared block valid for this client.
            "server_max_window_bits" if value == Some("15") => 2,
            "client_max_window_bits" if value.is_none_or(window_bits) => 3,
            _ => return false,
        };
        if std::mem::replace(&mut seen[slot], true) {
            return false;
        }
    }
    true
}

/// Safari 15.0 to 15.3 offer permessage-deflate but keep their compression context across
/// messages even when told `client_no_context_takeover`: their second compressed message
/// would not inflate (1007). They are declined, as uWebSockets does, and read plain frames.
pub fn ignores_client_no_context_takeover(user_agent: &str) -> bool {
    let Some((_, after)) = user_agent.split_once(" Version/15.") else { return false };
    let minor: String = after.chars().take_while(char::is_ascii_digit).collect();
    let rest = &after[minor.len()..];
    minor.parse::<u8>().is_ok_and(|m| m <= 3) && rest.starts_with([' ', '.']) && rest.contains(" Safari/")
}

/// 8..=15, no leading zero or sign (RFC 7692 7.1.2.1).
fn window_bits(v: &str) -> bool {
    !v.starts_with('0') && v.parse::<u8>().is_ok_and(|n| (8..=15).contains(&n))
}

thread_local! {
    /// Each shard's compressor (zlib's state is a few hundred KB: one per thread, reset per
    /// message, never one per connection).
    static COMPRESSOR: RefCell<Option<(u32, Compress)>> = const { RefCell::new(None) };
}

/// `payload` deflated as one message without context takeover, at `level` (1..=9), appended
/// to `out`; the bytes to send with RSV1 set.
pub fn compress(payload: &[u8], level: u32, out: &mut Vec<u8>) {
    COMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        let c = match cell.as_mut() {
            Some((l, c)) if *l == level => {
                c.reset();
                c
            }
            _ => &mut cell.insert((level, Compress::new(Compression::new(level), false))).1,
        };
        let start = out.len();
        out.reserve(payload.len() / 2 + 64);
        let mut input = payload;
        loop {
            if out.capacity() - out.len() < 64 {
                out.reserve(out.capacity().max(256));
            }
            let before = c.total_in();
            // Compressing into a Vec cannot fail: the only errors are for a misused stream.
            let _ = c.compress_vec(input, out, FlushCompress::Sync);
            input = &input[(c.total_in() - before) as usize..];
            // Done when all input is in and the sync flush fitted (room left over).
            if input.is_empty() && out.len() < out.capacity() {
                break;
            }
        }
        if out[start..].ends_with(&TAIL) {
            out.truncate(out.len() - TAIL.len());
        }
    });
}

/// The compressed twin of a whole unmasked server frame (`frame`: header then payload): the
/// same opcode with RSV1, the payload deflated at `level`. None when the payload is under
/// `min_bytes` or does not shrink (it is sent as it is then).
pub fn compress_frame(frame: &[u8], level: u32, min_bytes: usize) -> Option<Vec<u8>> {
    let header = super::frame::decode_header(frame).ok()??;
    let payload = frame.get(header.header_len..)?;
    if payload.len() < min_bytes.max(1) || header.opcode.is_control() {
        return None;
    }
    let mut z = Vec::with_capacity(payload.len() / 2 + 16);
    compress(payload, level, &mut z);
    if z.len() >= payload.len() {
        return None;
    }
    let mut out = Vec::with_capacity(z.len() + 10);
    super::frame::write_compressed_header(&mut out, header.opcode, z.len());
    out.extend_from_slice(&z);
    Some(out)
}

/// Why a client's compressed message was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InflateError {
    /// Inflated, it passes the message size limit (close 1009).
    TooBig,
    /// Not a valid DEFLATE stream (close 1007).
    Invalid,
}

/// The shard's inflater: one zlib state and one output buffer, reused for every message.
pub struct Inflater {
    d: Decompress,
    out: Vec<u8>,
}

impl Default for Inflater {
    fn default() -> Self {
        Inflater { d: Decompress::new(false), out: Vec::new() }
    }
}

impl Inflater {
    /// Inflates one message (no context takeover), refusing it as soon as its output passes
    /// `max` bytes. The buffer keeps its capacity for the next message, up to `max`.
    pub fn inflate(&mut self, payload: &[u8], max: usize) -> Result<&[u8], InflateError> {
        self.d.reset(false);
        self.out.clear();
        for input in [payload, &TAIL[..]] {
            let mut input = input;
            loop {
                if self.out.len() == self.out.capacity() {
                    if self.out.len() > max {
                        return Err(InflateError::TooBig);
                    }
                    // Grow by doubling, to one byte past the limit (to see it passed).
                    let want = (self.out.capacity() * 2).max(4096).min(max + 1);
                    self.out.reserve_exact(want - self.out.len());
                }
                let before = self.d.total_in();
                let status = self.d.decompress_vec(input, &mut self.out, FlushDecompress::Sync);
                input = &input[(self.d.total_in() - before) as usize..];
                match status {
                    Err(_) => return Err(InflateError::Invalid),
                    // A final block ends the stream: nothing may follow it but the tail.
                    Ok(Status::StreamEnd) => break,
                    Ok(_) if input.is_empty() && self.out.len() < self.out.capacity() => break,
                    Ok(_) => {}
                }
            }
            if self.out.len() > max {
                return Err(InflateError::TooBig);
            }
        }
        Ok(&self.out)
    }

    /// Bytes the inflater's buffer holds: at most one past the largest `max` it was given.
    pub fn capacity(&self) -> usize {
        self.out.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn safari_15_0_to_15_3_is_recognised() {
        let safari = |v: &str| {
            format!(
                "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/{v} Safari/605.1.15"
            )
        };
        for broken in ["15.0", "15.1", "15.2", "15.3", "15.3.1"] {
            assert!(ignores_client_no_context_takeover(&safari(broken)), "{broken}");
        }
        for fine in ["15.4", "15.6.1", "16.0", "14.1", "15.10"] {
            assert!(!ignores_client_no_context_takeover(&safari(fine)), "{fine}");
        }
        let chrome =
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36";
        assert!(!ignores_client_no_context_takeover(chrome));
        assert!(!ignores_client_no_context_takeover("Version/15.2"));
    }

    #[test]
    fn offers_are_accepted_as_rfc_7692_allows() {
        assert!(accepts("permessage-deflate"));
        assert!(accepts("permessage-deflate; client_max_window_bits"));
        assert!(accepts("permessage-deflate; client_max_window_bits=10; server_no_context_takeover"));
        assert!(accepts("Permessage-Deflate; Client_No_Context_Takeover; server_max_window_bits=15"));
        assert!(accepts("x-webkit-deflate-frame, permessage-deflate; client_max_window_bits=\"12\""));
        // A server window under 15 cannot be had from a shared block: that offer is declined,
        // a later acceptable one taken.
        assert!(!accepts("permessage-deflate; server_max_window_bits=10"));
        assert!(accepts("permessage-deflate; server_max_window_bits=10, permessage-deflate"));
        for bad in [
            "permessage-deflate; client_max_window_bits=16",
            "permessage-deflate; client_max_window_bits=7",
            "permessage-deflate; client_max_window_bits=010",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; unknown",
            "deflate-frame",
            "",
        ] {
            assert!(!accepts(bad), "{bad}");
        }
    }

    #[test]
    fn a_message_round_trips_and_drops_the_tail() {
        let text = "弹幕 danmaku 666 ".repeat(40);
        let mut z = Vec::new();
        compress(text.as_bytes(), 6, &mut z);
        assert!(z.len() < text.len() / 4, "{} of {}", z.len(), text.len());
        assert!(!z.ends_with(&TAIL));
        let mut inf = Inflater::default();
        assert_eq!(inf.inflate(&z, 1 << 20).unwrap(), text.as_bytes());
        // The same inflater, the next message: no context carried over.
        let mut z2 = Vec::new();
        compress(b"", 6, &mut z2);
        assert_eq!(inf.inflate(&z2, 10).unwrap(), b"");
    }

    #[test]
    fn a_frame_gets_a_compressed_twin_unless_small_or_incompressible() {
        use crate::wire::frame::{Opcode, decode_header, frame};
        let text = "主播好 666 gift:rocket x3 ".repeat(20);
        let plain = frame(Opcode::Text, text.as_bytes());
        let z = compress_frame(&plain, 6, 128).expect("compressed");
        let h = decode_header(&z).unwrap().unwrap();
        assert!(h.rsv1 && h.fin && h.opcode == Opcode::Text);
        let mut inf = Inflater::default();
        assert_eq!(inf.inflate(&z[h.header_len..], 1 << 20).unwrap(), text.as_bytes());
        assert_eq!(compress_frame(&frame(Opcode::Text, b"short"), 6, 128), None, "under min_bytes");
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let noise: Vec<u8> = (0..4000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect();
        assert_eq!(compress_frame(&frame(Opcode::Binary, &noise), 6, 128), None, "does not shrink");
    }

    #[test]
    fn a_bomb_is_refused_at_the_limit_without_inflating_it_all() {
        let zeros = vec![0u8; 10 << 20];
        let mut z = Vec::new();
        compress(&zeros, 9, &mut z);
        assert!(z.len() < 20_000, "{}", z.len());
        let mut inf = Inflater::default();
        assert_eq!(inf.inflate(&z, 64 << 10), Err(InflateError::TooBig));
        assert!(inf.capacity() <= (64 << 10) + 1, "the buffer stops at the limit: {}", inf.capacity());
        assert_eq!(inf.inflate(&[0xff, 0xff, 0xff], 1 << 20), Err(InflateError::Invalid));
    }

    proptest! {
        #[test]
        fn anything_compressed_inflates_back(data in proptest::collection::vec(any::<u8>(), 0..20_000), level in 1u32..=9) {
            let mut z = Vec::new();
            compress(&data, level, &mut z);
            let mut inf = Inflater::default();
            prop_assert_eq!(inf.inflate(&z, data.len()).unwrap(), &data[..]);
            if !data.is_empty() {
                prop_assert_eq!(inf.inflate(&z, data.len() - 1), Err(InflateError::TooBig));
            }
        }

        #[test]
        fn arbitrary_input_is_refused_or_bounded(data in proptest::collection::vec(any::<u8>(), 0..2000), max in 0usize..5000) {
            let mut inf = Inflater::default();
            if let Ok(out) = inf.inflate(&data, max) {
                prop_assert!(out.len() <= max);
            }
        }

        #[test]
        fn offer_parsing_never_panics(s in "\\PC{0,80}") {
            let _ = accepts(&s);
        }
    }
}
