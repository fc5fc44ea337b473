//! TLS for `wss://` at the edge (issue 16), sans-IO: a [`handshake::Handshake`] driven with
//! rustls's unbuffered API in the caller's buffers, then a [`record::Records`] layer that keeps
//! only each direction's secrets — the user-space counterpart of kernel TLS, so an idle TLS
//! connection holds its keys and no record buffers; [`kernel`] hands the send keys to the
//! kernel where it has TLS; [`sni`] picks a certificate by the name a client asks for.
#![forbid(unsafe_code)]

pub mod handshake;
pub mod kernel;
pub mod record;
pub mod sni;

use std::sync::Arc;

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A server config from a PEM certificate chain and key: TLS 1.3 and 1.2, ALPN `http/1.1`, no
/// session tickets (nothing to send after the handshake), secrets extractable (for
/// [`record::Records`]).
pub fn server_config(cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<ServerConfig>, String> {
    server_config_sni(&[(cert_pem, key_pem)])
}

/// As [`server_config`], for one or more (chain, key) pairs: with several, the client's SNI
/// picks the first certificate valid for the name it asks for ([`sni::Certs`]), and a client
/// that names none, or a name none is valid for, gets the first.
pub fn server_config_sni(pairs: &[(&[u8], &[u8])]) -> Result<Arc<ServerConfig>, String> {
    let provider = Arc::new(provider());
    let mut keys = Vec::with_capacity(pairs.len());
    for (i, (cert_pem, key_pem)) in pairs.iter().enumerate() {
        let which = if pairs.len() > 1 { format!(" {}", i + 1) } else { String::new() };
        let certs = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("certificate chain{which}: {e}"))?;
        if certs.is_empty() {
            return Err(format!("certificate chain{which}: no CERTIFICATE in the file"));
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("private key{which}: {e}"))?;
        let certified = rustls::sign::CertifiedKey::from_der(certs, key, &provider)
            .map_err(|e| format!("certificate and key{which}: {e}"))?;
        keys.push(Arc::new(certified));
    }
    if keys.is_empty() {
        return Err("no certificate".into());
    }
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(sni::Certs::new(keys)));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.send_tls13_tickets = 0;
    config.enable_secret_extraction = true;
    Ok(Arc::new(config))
}

/// rustls over ring: no C toolchain beyond `cc` and no cmake to build (aws-lc-rs needs both);
/// the cost is no post-quantum key exchange (X25519MLKEM768), which rustls marks by deprecating
/// this provider.
///
/// Key exchange prefers X25519, then P-256: ring's default puts P-384 first, whose arithmetic in
/// ring is generic bignum code (a gateway spent 669 µs of CPU per TLS join with it; the server's
/// preference decides the group a TLS 1.3 client gets).
#[allow(deprecated)]
pub fn provider() -> rustls::crypto::CryptoProvider {
    use rustls::crypto::ring::kx_group;
    let mut p = rustls::crypto::ring::default_provider();
    p.kx_groups = vec![kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1];
    p
}

#[cfg(test)]
mod tests;
