//! The record layer after the handshake, kept by barrage itself — the user-space twin of kernel
//! TLS: per direction only the cipher, key, IV and sequence number (about 60 bytes), no record
//! buffers and no cipher state between calls. `seal` turns plaintext into records appended to a
//! buffer the caller owns (the shard's, for one send); `open` decrypts records in place in the
//! caller's receive buffer. Sans-IO. TLS 1.3 and 1.2, AES-128/256-GCM and ChaCha20-Poly1305.
//!
//! The AEAD key is expanded per call (ring's `LessSafeKey`) rather than kept: that costs about
//! a microsecond per record and keeps an idle connection's state at its secrets.
#![forbid(unsafe_code)]

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::{ConnectionTrafficSecrets, ExtractedSecrets, ProtocolVersion};

/// Largest plaintext in one record (RFC 8446 5.1).
pub const MAX_FRAGMENT: usize = 16 * 1024;
/// Record header: type, legacy version, length.
const HEADER: usize = 5;
const TAG: usize = 16;
/// TLS 1.2 GCM sends the nonce's explicit part in each record.
const EXPLICIT: usize = 8;

const APPLICATION_DATA: u8 = 23;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const CHANGE_CIPHER_SPEC: u8 = 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Cipher {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20,
}

/// One direction's keys.
#[derive(Clone)]
struct Keys {
    cipher: Cipher,
    key: [u8; 32],
    iv: [u8; 12],
    seq: u64,
}

impl Keys {
    fn new((seq, secrets): (u64, ConnectionTrafficSecrets)) -> Result<Keys, TlsError> {
        let (cipher, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (Cipher::Aes128Gcm, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (Cipher::Aes256Gcm, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (Cipher::Chacha20, key, iv),
            _ => return Err(TlsError::Unsupported),
        };
        let mut k = [0u8; 32];
        let len = key.as_ref().len();
        k[..len].copy_from_slice(key.as_ref());
        let iv: [u8; 12] = iv.as_ref().try_into().map_err(|_| TlsError::Unsupported)?;
        Ok(Keys { cipher, key: k, iv, seq })
    }

    fn aead(&self) -> LessSafeKey {
        let (alg, len) = match self.cipher {
            Cipher::Aes128Gcm => (&aead::AES_128_GCM, 16),
            Cipher::Aes256Gcm => (&aead::AES_256_GCM, 32),
            Cipher::Chacha20 => (&aead::CHACHA20_POLY1305, 32),
        };
        // The key's length is the cipher's, by construction in `new`.
        LessSafeKey::new(UnboundKey::new(alg, &self.key[..len]).unwrap_or_else(|_| unreachable!("key length")))
    }

    /// The IV xor the sequence number (TLS 1.3, and TLS 1.2 ChaCha20; TLS 1.2 GCM sends its
    /// last 8 bytes explicitly).
    fn nonce(&self) -> [u8; 12] {
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        n
    }
}

/// Why records could not be opened or sealed. Each ends the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsError {
    /// A record that does not decrypt, or is malformed.
    BadRecord,
    /// A record over the protocol's size.
    Oversized,
    /// The peer sent a fatal alert.
    Alert(u8),
    /// Something the record layer does not take after the handshake (renegotiation, a
    /// post-handshake message other than a key update, an unknown cipher).
    Unsupported,
    /// Sequence numbers ran out (2^64 records).
    Exhausted,
    /// A handshake asking for nothing this server offers.
    Incompatible,
}

/// What `open` found in the bytes it was given.
#[derive(Debug, PartialEq, Eq)]
pub enum Opened {
    /// Application data: at `range` of the buffer, decrypted in place.
    Data(std::ops::Range<usize>),
    /// The peer closed (close_notify).
    Closed,
    /// The peer rotated its keys (TLS 1.3 KeyUpdate): derive the next receive keys
    /// (`KernelConnection::update_rx_secret`) and call `rekey_rx`; if it asked us to update
    /// ours too, `update_requested`.
    KeyUpdate { update_requested: bool },
}

/// A connection's record layer.
pub struct Records {
    tls13: bool,
    tx: Keys,
    rx: Keys,
}

impl Records {
    pub fn new(version: ProtocolVersion, secrets: ExtractedSecrets) -> Result<Records, TlsError> {
        let tls13 = match version {
            ProtocolVersion::TLSv1_3 => true,
            ProtocolVersion::TLSv1_2 => false,
            _ => return Err(TlsError::Unsupported),
        };
        Ok(Records { tls13, tx: Keys::new(secrets.tx)?, rx: Keys::new(secrets.rx)? })
    }

    /// Replaces the receive keys after the peer's KeyUpdate.
    pub fn rekey_rx(&mut self, rx: (u64, ConnectionTrafficSecrets)) -> Result<(), TlsError> {
        self.rx = Keys::new(rx)?;
        Ok(())
    }

    /// Replaces the send keys (after sending our KeyUpdate).
    pub fn rekey_tx(&mut self, tx: (u64, ConnectionTrafficSecrets)) -> Result<(), TlsError> {
        self.tx = Keys::new(tx)?;
        Ok(())
    }

    /// What kernel TLS needs to take over sending (`super::kernel`): the version, cipher, key,
    /// IV and next sequence number of the send direction.
    pub(super) fn tx_parts(&self) -> (bool, Cipher, &[u8], [u8; 12], u64) {
        let len = match self.tx.cipher {
            Cipher::Aes128Gcm => 16,
            Cipher::Aes256Gcm | Cipher::Chacha20 => 32,
        };
        (self.tls13, self.tx.cipher, &self.tx.key[..len], self.tx.iv, self.tx.seq)
    }

    /// The bytes `seal` adds to `n` bytes of plaintext.
    pub fn overhead(&self, n: usize) -> usize {
        let per = HEADER
            + TAG
            + if self.tls13 {
                1
            } else if self.tx.cipher == Cipher::Chacha20 {
                0
            } else {
                EXPLICIT
            };
        n.div_ceil(MAX_FRAGMENT).max(1) * per
    }

    /// Appends `plaintext` to `out` as application-data records.
    pub fn seal(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), TlsError> {
        self.seal_all(&[plaintext], out)
    }

    /// Appends `parts`, one stream, to `out` as application-data records of up to 16 KiB each
    /// (a record may span parts: several small frames share one), with the AEAD key expanded
    /// once for them all.
    pub fn seal_all(&mut self, parts: &[&[u8]], out: &mut Vec<u8>) -> Result<(), TlsError> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        if total == 0 {
            return Ok(());
        }
        out.reserve(total + self.overhead(total));
        let aead = self.tx.aead();
        let (mut part, mut at) = (0, 0);
        let mut left = total;
        while left > 0 {
            let n = left.min(MAX_FRAGMENT);
            let body = self.open_record(APPLICATION_DATA, n, out);
            let mut need = n;
            while need > 0 {
                let p = parts[part];
                let take = (p.len() - at).min(need);
                out.extend_from_slice(&p[at..at + take]);
                (at, need) = (at + take, need - take);
                if at == p.len() {
                    (part, at) = (part + 1, 0);
                }
            }
            self.close_record(&aead, APPLICATION_DATA, body, out)?;
            left -= n;
        }
        Ok(())
    }

    /// Appends our KeyUpdate (not requesting the peer's): sealed with the current keys; call
    /// `rekey_tx` with the next ones right after.
    pub fn key_update(&mut self, out: &mut Vec<u8>) -> Result<(), TlsError> {
        self.seal_record(HANDSHAKE, &[24, 0, 0, 1, 0], out)
    }

    /// Appends a close_notify alert.
    pub fn close_notify(&mut self, out: &mut Vec<u8>) -> Result<(), TlsError> {
        self.seal_record(ALERT, &[1, 0], out)
    }

    fn seal_record(&mut self, typ: u8, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), TlsError> {
        let body = self.open_record(typ, plaintext.len(), out);
        out.extend_from_slice(plaintext);
        self.close_record(&self.tx.aead(), typ, body, out)
    }

    /// Appends a record's header (and TLS 1.2 GCM's explicit nonce) for `len` bytes of
    /// plaintext of `typ`; returns where its body starts. The caller appends the plaintext.
    fn open_record(&self, typ: u8, len: usize, out: &mut Vec<u8>) -> usize {
        let keys = &self.tx;
        // TLS 1.3 hides the type inside (the outer one is always application data).
        let (outer, inner_len) = if self.tls13 { (APPLICATION_DATA, len + 1) } else { (typ, len) };
        let explicit = if !self.tls13 && keys.cipher != Cipher::Chacha20 { EXPLICIT } else { 0 };
        let len = explicit + inner_len + TAG;
        out.extend_from_slice(&[outer, 3, 3, (len >> 8) as u8, len as u8]);
        if explicit > 0 {
            out.extend_from_slice(&keys.nonce()[4..]);
        }
        out.len()
    }

    /// Seals the record whose plaintext runs from `body` to the end of `out`, in place.
    fn close_record(&mut self, aead: &LessSafeKey, typ: u8, body: usize, out: &mut Vec<u8>) -> Result<(), TlsError> {
        let keys = &mut self.tx;
        let nonce = keys.nonce();
        let plain_len = out.len() - body;
        let start = body - HEADER - if !self.tls13 && keys.cipher != Cipher::Chacha20 { EXPLICIT } else { 0 };
        let mut aad = [0u8; 13];
        let aad_len = if self.tls13 {
            aad[..HEADER].copy_from_slice(&out[start..start + HEADER]);
            HEADER
        } else {
            aad = tls12_aad(keys.seq, typ, plain_len);
            aad.len()
        };
        if self.tls13 {
            out.push(typ);
        }
        let tag = aead
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad[..aad_len]),
                &mut out[body..],
            )
            .map_err(|_| TlsError::BadRecord)?;
        out.extend_from_slice(tag.as_ref());
        keys.seq = keys.seq.checked_add(1).ok_or(TlsError::Exhausted)?;
        Ok(())
    }

    /// Opens the first record of `buf` in place. None: the record is not all there yet.
    /// Some((consumed, what)): the record took `consumed` bytes from the front of `buf`.
    pub fn open(&mut self, buf: &mut [u8]) -> Result<Option<(usize, Opened)>, TlsError> {
        if buf.len() < HEADER {
            return Ok(None);
        }
        let (typ, len) = (buf[0], usize::from(u16::from_be_bytes([buf[3], buf[4]])));
        if len > MAX_FRAGMENT + 256 {
            return Err(TlsError::Oversized);
        }
        if buf.len() < HEADER + len {
            return Ok(None);
        }
        let consumed = HEADER + len;
        // TLS 1.3 peers may still send a ChangeCipherSpec for middlebox compatibility.
        if self.tls13 && typ == CHANGE_CIPHER_SPEC {
            return Ok(Some((consumed, Opened::Data(consumed..consumed))));
        }
        let keys = &mut self.rx;
        let explicit = if !self.tls13 && keys.cipher != Cipher::Chacha20 { EXPLICIT } else { 0 };
        if len < explicit + TAG + usize::from(self.tls13) {
            return Err(TlsError::BadRecord);
        }
        let mut nonce = keys.nonce();
        if explicit > 0 {
            nonce[4..].copy_from_slice(&buf[HEADER..HEADER + EXPLICIT]);
        }
        let mut aad = [0u8; 13];
        let aad_len = if self.tls13 {
            aad[..HEADER].copy_from_slice(&buf[..HEADER]);
            HEADER
        } else {
            aad = tls12_aad(keys.seq, typ, len - explicit - TAG);
            aad.len()
        };
        let aad = Aad::from(&aad[..aad_len]);
        let body = HEADER + explicit;
        let plain = keys
            .aead()
            .open_in_place(Nonce::assume_unique_for_key(nonce), aad, &mut buf[body..consumed])
            .map_err(|_| TlsError::BadRecord)?
            .len();
        keys.seq = keys.seq.checked_add(1).ok_or(TlsError::Exhausted)?;
        let (typ, end) = if self.tls13 {
            // The inner type is the last non-zero byte; zeros after it are padding.
            let Some(at) = buf[body..body + plain].iter().rposition(|&b| b != 0) else {
                return Err(TlsError::BadRecord);
            };
            (buf[body + at], body + at)
        } else {
            (typ, body + plain)
        };
        if end - body > MAX_FRAGMENT {
            return Err(TlsError::Oversized);
        }
        let what = match typ {
            APPLICATION_DATA => Opened::Data(body..end),
            ALERT if end - body == 2 && buf[body + 1] == 0 => Opened::Closed,
            ALERT if end - body == 2 => return Err(TlsError::Alert(buf[body + 1])),
            // KeyUpdate: type 24, length 1, request_update.
            HANDSHAKE if self.tls13 && end - body == 5 && buf[body] == 24 && buf[body + 1..body + 4] == [0, 0, 1] => {
                Opened::KeyUpdate { update_requested: buf[body + 4] == 1 }
            }
            _ => return Err(TlsError::Unsupported),
        };
        Ok(Some((consumed, what)))
    }
}

fn tls12_aad(seq: u64, typ: u8, len: usize) -> [u8; 13] {
    let mut aad = [0u8; 13];
    aad[..8].copy_from_slice(&seq.to_be_bytes());
    aad[8] = typ;
    aad[9..11].copy_from_slice(&[3, 3]);
    aad[11..].copy_from_slice(&(len as u16).to_be_bytes());
    aad
}
