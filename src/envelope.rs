//! The envelope: a client's WebSocket message → `ClientFrame`, and a `ServerFrame` → one
//! ready-to-send WebSocket frame (header and payload in one buffer), in the subprotocol the
//! connection chose: protobuf in binary frames or proto3 canonical JSON in text frames.
#![forbid(unsafe_code)]

use prost::Message as _;

use crate::proto::{ClientFrame, ServerFrame};
use crate::wire::frame::{self, Opcode};
use crate::wire::{CloseCode, Subprotocol};

/// A connection's wire format, fixed by the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Proto,
    Json,
}

impl From<Subprotocol> for Format {
    fn from(p: Subprotocol) -> Format {
        match p {
            Subprotocol::Proto => Format::Proto,
            Subprotocol::Json => Format::Json,
        }
    }
}

/// Why a client message is not a `ClientFrame`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvelopeError {
    /// Text on a protobuf connection or binary on a JSON one.
    WrongType,
    /// Not a valid `ClientFrame` in the connection's format, or one with no frame set.
    Invalid(String),
}

impl EnvelopeError {
    /// The close code this error earns.
    pub fn close_code(&self) -> CloseCode {
        match self {
            EnvelopeError::WrongType => CloseCode::UNSUPPORTED,
            EnvelopeError::Invalid(_) => CloseCode::INVALID_DATA,
        }
    }

    /// A short reason for the Close frame.
    pub fn reason(&self) -> &str {
        match self {
            EnvelopeError::WrongType => "wrong message type for the subprotocol",
            EnvelopeError::Invalid(why) => why,
        }
    }
}

/// Decodes one complete client message. `text` says whether it came in a text frame.
pub fn decode(format: Format, text: bool, payload: &[u8]) -> Result<ClientFrame, EnvelopeError> {
    let frame = match (format, text) {
        (Format::Proto, false) => {
            ClientFrame::decode(payload).map_err(|e| EnvelopeError::Invalid(format!("bad ClientFrame: {e}")))?
        }
        (Format::Json, true) => serde_json::from_slice::<ClientFrame>(payload)
            .map_err(|e| EnvelopeError::Invalid(format!("bad ClientFrame JSON: {e}")))?,
        _ => return Err(EnvelopeError::WrongType),
    };
    if frame.frame.is_none() {
        return Err(EnvelopeError::Invalid("empty ClientFrame".into()));
    }
    Ok(frame)
}

/// Encodes a server frame as one complete WebSocket frame.
pub fn encode(frame: &ServerFrame, format: Format) -> Vec<u8> {
    match format {
        Format::Proto => {
            let len = frame.encoded_len();
            let mut out = Vec::with_capacity(frame::header_len(len) + len);
            frame::write_header(&mut out, Opcode::Binary, len);
            // Encoding into a Vec with enough capacity cannot fail.
            let _ = frame.encode(&mut out);
            out
        }
        Format::Json => {
            // pbjson's Serialize never fails for generated types.
            let body = serde_json::to_vec(frame).unwrap_or_default();
            frame::frame(Opcode::Text, &body)
        }
    }
}

/// Encodes a server frame in both formats at once (for frames fanned out to many connections).
pub fn encode_both(frame: &ServerFrame) -> (Vec<u8>, Vec<u8>) {
    (encode(frame, Format::Proto), encode(frame, Format::Json))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Join, Pong, client_frame, server_frame};

    #[test]
    fn json_join_matches_the_contract() {
        let f = decode(Format::Json, true, br#"{"join":{"room":"r2"}}"#).unwrap();
        assert_eq!(f.frame, Some(client_frame::Frame::Join(Join { room: "r2".into(), ..Join::default() })));
    }

    #[test]
    fn proto_round_trip_and_type_checks() {
        let f = ClientFrame { frame: Some(client_frame::Frame::Join(Join { room: "a".into(), ..Join::default() })) };
        let bytes = f.encode_to_vec();
        assert_eq!(decode(Format::Proto, false, &bytes).unwrap(), f);
        assert_eq!(decode(Format::Proto, true, &bytes), Err(EnvelopeError::WrongType));
        assert_eq!(decode(Format::Json, false, b"{}"), Err(EnvelopeError::WrongType));
        assert!(matches!(decode(Format::Proto, false, &[]), Err(EnvelopeError::Invalid(_))));
        assert!(matches!(decode(Format::Proto, false, &[0xff, 0xff]), Err(EnvelopeError::Invalid(_))));
        assert!(matches!(decode(Format::Json, true, b"{\"nope\":1}"), Err(EnvelopeError::Invalid(_))));
    }

    #[test]
    fn encoded_frames_carry_header_and_payload() {
        let f = ServerFrame { frame: Some(server_frame::Frame::Pong(Pong { server_ms: 7 })) };
        let bin = encode(&f, Format::Proto);
        assert_eq!(bin[0], 0x82);
        assert_eq!(usize::from(bin[1]), bin.len() - 2);
        assert_eq!(ServerFrame::decode(&bin[2..]).unwrap(), f);
        let text = encode(&f, Format::Json);
        assert_eq!(text[0], 0x81);
        assert_eq!(&text[2..], br#"{"pong":{"serverMs":"7"}}"#);
    }
}
