//! Kernel TLS for sending: after the handshake, the send direction's keys go to the kernel
//! (`setsockopt(TCP_ULP, "tls")`, then `setsockopt(SOL_TLS, TLS_TX, crypto_info)`), and frames
//! are sent to a TLS connection as to a plain one — the same block frame for every member, no
//! per-member copy in user space; the kernel seals as it sends. Receiving stays in user space
//! (`record::Records::open`): a multishot receive into provided buffers cannot take the
//! kernel's control messages for non-data records.
//!
//! This module builds the `crypto_info` the kernel reads (`include/uapi/linux/tls.h`), sans-IO;
//! the shard issues the setsockopts (`src/shard`).
#![forbid(unsafe_code)]

use super::record::{Cipher, Records};

const TLS_1_2_VERSION: u16 = 0x0303;
const TLS_1_3_VERSION: u16 = 0x0304;
const TLS_CIPHER_AES_GCM_128: u16 = 51;
const TLS_CIPHER_AES_GCM_256: u16 = 52;
const TLS_CIPHER_CHACHA20_POLY1305: u16 = 54;
/// `sizeof(struct tls12_crypto_info_aes_gcm_256)`, the largest of the three.
const INFO_MAX: usize = 56;

/// A `tls12_crypto_info_*` for `setsockopt(SOL_TLS, TLS_TX, ..)`: {version, cipher_type} then,
/// for AES-GCM, iv[8] key[16|32] salt[4] rec_seq[8]; for ChaCha20-Poly1305, iv[12] key[32]
/// rec_seq[8]. Integers in host order, as the kernel's struct has them.
#[derive(Clone)]
pub struct TxInfo {
    bytes: [u8; INFO_MAX],
    len: usize,
}

impl TxInfo {
    /// What the kernel needs to go on sending where `records` stands, or None past what the
    /// explicit-nonce rule below can keep unique.
    pub fn new(records: &Records) -> Option<TxInfo> {
        let (tls13, cipher, key, iv, seq) = records.tx_parts();
        let version = if tls13 { TLS_1_3_VERSION } else { TLS_1_2_VERSION };
        let mut b = [0u8; INFO_MAX];
        let mut at = 4;
        let mut put = |b: &mut [u8; INFO_MAX], bytes: &[u8]| {
            b[at..at + bytes.len()].copy_from_slice(bytes);
            at += bytes.len();
        };
        let typ = match cipher {
            Cipher::Aes128Gcm => TLS_CIPHER_AES_GCM_128,
            Cipher::Aes256Gcm => TLS_CIPHER_AES_GCM_256,
            Cipher::Chacha20 => TLS_CIPHER_CHACHA20_POLY1305,
        };
        b[..2].copy_from_slice(&version.to_ne_bytes());
        b[2..4].copy_from_slice(&typ.to_ne_bytes());
        match cipher {
            Cipher::Chacha20 => {
                put(&mut b, &iv);
                put(&mut b, key);
            }
            Cipher::Aes128Gcm | Cipher::Aes256Gcm => {
                let explicit = if tls13 { iv[4..].try_into().ok()? } else { tls12_explicit_start(&iv, seq)? };
                put(&mut b, &explicit);
                put(&mut b, key);
                put(&mut b, &iv[..4]);
            }
        }
        put(&mut b, &seq.to_be_bytes());
        Some(TxInfo { bytes: b, len: at })
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// TLS 1.2 AES-GCM sends an explicit 8-byte nonce per record. barrage's records (like rustls's)
/// use IV[4..] xor seq; the kernel sends its `iv` field and adds one per record. To never repeat
/// a nonce under the same key, the kernel starts past every value used so far: the records
/// 0..seq used IV[4..] xor k for k < seq, all inside the aligned block of IV[4..] that spans
/// the bits of seq - 1, so the kernel starts at the block's end — and wraps back into it only
/// after 2^64 - 2^bits records. None when seq is beyond 2^32 (never, in practice).
fn tls12_explicit_start(iv: &[u8; 12], seq: u64) -> Option<[u8; 8]> {
    let base = u64::from_be_bytes(iv[4..].try_into().ok()?);
    let bits = 64 - seq.saturating_sub(1).leading_zeros();
    if bits > 32 {
        return None;
    }
    let block = (1u64 << bits) - 1;
    Some((base | block).wrapping_add(1).to_be_bytes())
}

/// Seals records the way the kernel's TLS does from a `crypto_info` (net/tls: the static IV is
/// salt ‖ iv, xor the sequence number for TLS 1.3 and ChaCha20; TLS 1.2 AES-GCM sends the `iv`
/// field as its explicit nonce and adds one per record), so the info barrage hands over is
/// checked against a client here, where the kernel has no TLS.
#[cfg(test)]
pub(crate) struct KernelModel {
    tls13: bool,
    chacha: bool,
    key: Vec<u8>,
    salt_iv: [u8; 12],
    seq: u64,
}

#[cfg(test)]
impl KernelModel {
    pub(crate) fn new(info: &[u8]) -> KernelModel {
        let version = u16::from_ne_bytes([info[0], info[1]]);
        let cipher = u16::from_ne_bytes([info[2], info[3]]);
        let (key_len, chacha) = match cipher {
            51 => (16, false),
            52 => (32, false),
            54 => (32, true),
            other => panic!("cipher {other}"),
        };
        let mut salt_iv = [0u8; 12];
        let (key, seq) = if chacha {
            assert_eq!(info.len(), 4 + 12 + 32 + 8);
            salt_iv.copy_from_slice(&info[4..16]);
            (info[16..48].to_vec(), &info[48..56])
        } else {
            assert_eq!(info.len(), 4 + 8 + key_len + 4 + 8);
            salt_iv[4..].copy_from_slice(&info[4..12]);
            salt_iv[..4].copy_from_slice(&info[12 + key_len..16 + key_len]);
            (info[12..12 + key_len].to_vec(), &info[16 + key_len..])
        };
        let seq = u64::from_be_bytes(seq.try_into().unwrap());
        KernelModel { tls13: version == 0x0304, chacha, key, salt_iv, seq }
    }

    pub(crate) fn seal(&mut self, plaintext: &[u8], out: &mut Vec<u8>) {
        use ring::aead::{AES_128_GCM, AES_256_GCM, Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
        let alg = match (self.chacha, self.key.len()) {
            (true, _) => &CHACHA20_POLY1305,
            (false, 16) => &AES_128_GCM,
            _ => &AES_256_GCM,
        };
        let key = LessSafeKey::new(UnboundKey::new(alg, &self.key).unwrap());
        let mut nonce = self.salt_iv;
        let explicit = !self.tls13 && !self.chacha;
        if !explicit {
            for (b, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
                *b ^= s;
            }
        }
        let mut body = plaintext.to_vec();
        if self.tls13 {
            body.push(23);
        }
        let len = body.len() + 16 + if explicit { 8 } else { 0 };
        let header = [23, 3, 3, (len >> 8) as u8, len as u8];
        let mut aad = Vec::new();
        if self.tls13 {
            aad.extend_from_slice(&header);
        } else {
            aad.extend_from_slice(&self.seq.to_be_bytes());
            aad.extend_from_slice(&[23, 3, 3]);
            aad.extend_from_slice(&(plaintext.len() as u16).to_be_bytes());
        }
        key.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(&aad), &mut body).unwrap();
        out.extend_from_slice(&header);
        if explicit {
            out.extend_from_slice(&nonce[4..]);
            let next = u64::from_be_bytes(self.salt_iv[4..].try_into().unwrap()).wrapping_add(1);
            self.salt_iv[4..].copy_from_slice(&next.to_be_bytes());
        }
        out.extend_from_slice(&body);
        self.seq += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The kernel's explicit nonces (start, start + 1, …, for 2^40 records) miss every one
        /// user space sent before it took over.
        #[test]
        fn tls12_explicit_nonces_never_repeat(iv in any::<[u8; 12]>(), seq in 0u64..5000, later in 0u64..(1 << 40)) {
            let start = u64::from_be_bytes(tls12_explicit_start(&iv, seq).unwrap());
            let base = u64::from_be_bytes(iv[4..].try_into().unwrap());
            let kernel = start.wrapping_add(later);
            for k in 0..seq {
                prop_assert_ne!(kernel, base ^ k);
            }
        }
    }
}
