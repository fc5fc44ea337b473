//! A TLS handshake driven over the shard's own buffers with rustls's unbuffered API: the bytes
//! received so far go in, the bytes to send are appended to the caller's buffer, nothing is
//! buffered inside. When it completes, rustls hands over the traffic secrets (its kernel-TLS
//! path) and the connection keeps only a [`Records`] layer — plus, for TLS 1.3, rustls's small
//! [`KernelConnection`] to derive keys when the peer rotates them. Sans-IO.
#![forbid(unsafe_code)]

use std::sync::Arc;

use rustls::kernel::KernelConnection;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, EncodeTlsData, UnbufferedStatus};
use rustls::{ProtocolVersion, ServerConfig};

use super::record::{Records, TlsError};

/// A connection's TLS once its handshake is done.
pub struct Established {
    pub records: Records,
    /// TLS 1.3 with key updates kept: derives the next keys after a KeyUpdate.
    pub keys: Option<KernelConnection<ServerConnectionData>>,
    /// Application data that arrived inside the handshake's flights (already decrypted).
    pub plaintext: Vec<u8>,
}

/// What one `feed` did.
pub enum Step {
    /// The handshake needs more bytes from the peer (send what was appended first).
    More,
    Done(Box<Established>),
}

/// A handshake in progress.
pub struct Handshake {
    conn: Option<UnbufferedServerConnection>,
    plaintext: Vec<u8>,
    /// Keep rustls's key-update state for TLS 1.3 (about 800 bytes a connection).
    key_updates: bool,
}

impl Handshake {
    /// `key_updates`: keep what a TLS 1.3 peer's KeyUpdate needs (else such a peer is closed).
    pub fn new(config: Arc<ServerConfig>, key_updates: bool) -> Result<Handshake, TlsError> {
        let conn = UnbufferedServerConnection::new(config).map_err(|_| TlsError::Unsupported)?;
        Ok(Handshake { conn: Some(conn), plaintext: Vec::new(), key_updates })
    }

    /// Feeds what the peer sent: `input` holds every byte received and not yet consumed (the
    /// handshake takes what it uses from its front; what is left after `Done` is records for
    /// the record layer). What to send is appended to `out`.
    pub fn feed(&mut self, input: &mut Vec<u8>, out: &mut Vec<u8>) -> Result<Step, TlsError> {
        loop {
            let Some(conn) = self.conn.as_mut() else { return Err(TlsError::Unsupported) };
            let UnbufferedStatus { mut discard, state } = conn.process_tls_records(&mut input[..]);
            let state = match state {
                Ok(state) => state,
                Err(e) => {
                    input.drain(..discard);
                    self.alert(out);
                    return Err(handshake_error(e));
                }
            };
            let done = match state {
                ConnectionState::EncodeTlsData(mut e) => {
                    encode(&mut e, out);
                    false
                }
                // The caller sends `out` after this call, in order.
                ConnectionState::TransmitTlsData(t) => {
                    t.done();
                    false
                }
                ConnectionState::ReadTraffic(mut r) => {
                    while let Some(record) = r.next_record() {
                        let record = record.map_err(handshake_error)?;
                        discard += record.discard;
                        self.plaintext.extend_from_slice(record.payload);
                    }
                    false
                }
                ConnectionState::BlockedHandshake => {
                    input.drain(..discard);
                    return Ok(Step::More);
                }
                ConnectionState::WriteTraffic(_) => true,
                ConnectionState::Closed | ConnectionState::PeerClosed => return Err(TlsError::Alert(0)),
                _ => return Err(TlsError::Unsupported),
            };
            input.drain(..discard);
            if done {
                return self.established().map(|e| Step::Done(Box::new(e)));
            }
        }
    }

    /// After a failed step: what rustls still had to send (a ServerHello the error came
    /// after) and the alert it queued for the peer (handshake_failure, no_application_protocol,
    /// …), appended to `out` to be sent before the close.
    fn alert(&mut self, out: &mut Vec<u8>) {
        let Some(conn) = self.conn.as_mut() else { return };
        // A flight is a handful of chunks; the bound only guards against a loop.
        for _ in 0..16 {
            let UnbufferedStatus { state, .. } = conn.process_tls_records(&mut []);
            let Ok(ConnectionState::EncodeTlsData(mut e)) = state else { return };
            encode(&mut e, out);
        }
    }

    fn established(&mut self) -> Result<Established, TlsError> {
        let conn = self.conn.take().ok_or(TlsError::Unsupported)?;
        let (secrets, kernel) = conn.dangerous_into_kernel_connection().map_err(|_| TlsError::Unsupported)?;
        let version = kernel.protocol_version();
        let records = Records::new(version, secrets)?;
        let keys = (version == ProtocolVersion::TLSv1_3 && self.key_updates).then_some(kernel);
        Ok(Established { records, keys, plaintext: std::mem::take(&mut self.plaintext) })
    }
}

/// Appends what rustls has to send to `out`, growing it as asked.
fn encode(e: &mut EncodeTlsData<'_, ServerConnectionData>, out: &mut Vec<u8>) {
    let start = out.len();
    let mut room = 4096;
    loop {
        out.resize(start + room, 0);
        match e.encode(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return;
            }
            Err(EncodeError::InsufficientSize(s)) => room = s.required_size,
            Err(EncodeError::AlreadyEncoded) => {
                out.truncate(start);
                return;
            }
        }
    }
}

fn handshake_error(e: rustls::Error) -> TlsError {
    match e {
        rustls::Error::AlertReceived(a) => TlsError::Alert(u8::from(a)),
        // A well-formed hello asking for what this server does not do (versions, suites,
        // groups, signature schemes, an application protocol other than http/1.1).
        rustls::Error::PeerIncompatible(_) | rustls::Error::NoApplicationProtocol => TlsError::Incompatible,
        _ => TlsError::BadRecord,
    }
}
