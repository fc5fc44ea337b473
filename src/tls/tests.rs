//! The handshake and the record layer against rustls's own client, in memory: every version
//! and cipher suite barrage offers, data both ways (records split at 16 KiB), the client's key
//! update, close_notify, a tampered record, an untrusted certificate.
use std::io::{Read, Write};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, SupportedCipherSuite};

use super::handshake::{Handshake, Step};
use super::record::{Opened, Records, TlsError};
use super::server_config;

struct Pair {
    client: ClientConnection,
    records: Records,
    keys: Option<rustls::kernel::KernelConnection<rustls::server::ServerConnectionData>>,
    /// Bytes from the client not yet opened by the server.
    pending: Vec<u8>,
}

fn cert() -> (Vec<u8>, Vec<u8>, CertificateDer<'static>) {
    let c = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    (c.cert.pem().into_bytes(), c.signing_key.serialize_pem().into_bytes(), c.cert.der().clone())
}

fn client(suite: SupportedCipherSuite, trusted: CertificateDer<'static>) -> ClientConnection {
    let mut roots = RootCertStore::empty();
    roots.add(trusted).unwrap();
    let mut provider = super::provider();
    provider.cipher_suites = vec![suite];
    let config = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[suite.version()])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    ClientConnection::new(Arc::new(config), ServerName::try_from("localhost").unwrap()).unwrap()
}

/// Handshakes a client for `suite` with the server side under test; the client's first
/// application bytes (`early`) ride its last flight.
fn pair(suite: SupportedCipherSuite, early: &[u8]) -> Result<(Pair, Vec<u8>), TlsError> {
    let (cert_pem, key_pem, der) = cert();
    let mut c = client(suite, der);
    let mut hs = Handshake::new(server_config(&cert_pem, &key_pem).unwrap(), true)?;
    c.writer().write_all(early).unwrap();
    let mut input = Vec::new();
    for _ in 0..10 {
        c.write_tls(&mut input).unwrap();
        let mut out = Vec::new();
        let step = hs.feed(&mut input, &mut out)?;
        let mut rd = &out[..];
        while !rd.is_empty() {
            c.read_tls(&mut rd).unwrap();
        }
        if c.process_new_packets().is_err() {
            return Err(TlsError::BadRecord);
        }
        if let Step::Done(e) = step {
            c.write_tls(&mut input).unwrap();
            return Ok((Pair { client: c, records: e.records, keys: e.keys, pending: input }, e.plaintext));
        }
    }
    panic!("the handshake did not finish");
}

impl Pair {
    /// What the server opens from everything the client has written.
    fn server_reads(&mut self) -> Result<(Vec<u8>, Vec<Opened>), TlsError> {
        self.client.write_tls(&mut self.pending).unwrap();
        let (mut data, mut events) = (Vec::new(), Vec::new());
        while let Some((used, what)) = self.records.open(&mut self.pending)? {
            match &what {
                Opened::Data(r) => data.extend_from_slice(&self.pending[r.clone()]),
                Opened::KeyUpdate { .. } => {
                    let next = self.keys.as_mut().expect("TLS 1.3").update_rx_secret().unwrap();
                    self.records.rekey_rx(next)?;
                    events.push(what);
                }
                Opened::Closed => events.push(what),
            }
            self.pending.drain(..used);
        }
        Ok((data, events))
    }

    /// What the client reads of `records` the server sealed.
    fn client_reads(&mut self, records: &[u8]) -> Vec<u8> {
        let (mut rd, mut out) = (records, Vec::new());
        while !rd.is_empty() {
            self.client.read_tls(&mut rd).unwrap();
            self.client.process_new_packets().unwrap();
            let _ = self.client.reader().read_to_end(&mut out);
        }
        out
    }
}

fn suites() -> Vec<SupportedCipherSuite> {
    use rustls::crypto::ring::cipher_suite::*;
    vec![
        TLS13_AES_128_GCM_SHA256,
        TLS13_AES_256_GCM_SHA384,
        TLS13_CHACHA20_POLY1305_SHA256,
        TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    ]
}

#[test]
fn every_suite_carries_data_both_ways_then_closes() {
    for suite in suites() {
        let request = b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n";
        let (mut p, early) = pair(suite, request).unwrap();
        let (mut got, _) = p.server_reads().unwrap();
        got.splice(0..0, early);
        assert_eq!(got, request, "{suite:?}: the request that rode the handshake");
        // Server to client: one small frame, then one over a record's size.
        let mut out = Vec::new();
        p.records.seal(b"HTTP/1.1 101 Switching Protocols\r\n\r\n", &mut out).unwrap();
        let big: Vec<u8> = (0..40_000u32).map(|i| i as u8).collect();
        p.records.seal(&big, &mut out).unwrap();
        let read = p.client_reads(&out);
        assert_eq!(&read[..36], b"HTTP/1.1 101 Switching Protocols\r\n\r\n");
        assert_eq!(&read[36..], &big[..], "{suite:?}");
        // Client to server, several records.
        for chunk in [&b"one"[..], b"two", &[7u8; 20_000][..]] {
            p.client.writer().write_all(chunk).unwrap();
        }
        let (data, _) = p.server_reads().unwrap();
        assert_eq!(data.len(), 3 + 3 + 20_000);
        assert_eq!(&data[..6], b"onetwo");
        p.client.send_close_notify();
        assert_eq!(p.server_reads().unwrap().1, vec![Opened::Closed], "{suite:?}");
        let mut bye = Vec::new();
        p.records.close_notify(&mut bye).unwrap();
        p.client_reads(&bye);
    }
}

#[test]
fn a_client_key_update_is_followed() {
    let (mut p, _) = pair(rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256, b"").unwrap();
    p.client.writer().write_all(b"before").unwrap();
    assert_eq!(p.server_reads().unwrap().0, b"before");
    p.client.refresh_traffic_keys().unwrap();
    p.client.writer().write_all(b"after").unwrap();
    let (data, events) = p.server_reads().unwrap();
    assert_eq!(data, b"after");
    assert!(matches!(events[..], [Opened::KeyUpdate { .. }]), "{events:?}");
}

#[test]
fn a_tampered_record_and_an_untrusted_certificate_are_refused() {
    let (mut p, _) = pair(rustls::crypto::ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256, b"").unwrap();
    p.client.writer().write_all(b"secret").unwrap();
    p.client.write_tls(&mut p.pending).unwrap();
    let last = p.pending.len() - 1;
    p.pending[last] ^= 1;
    assert_eq!(p.records.open(&mut p.pending), Err(TlsError::BadRecord));
    // A record claiming more than the protocol allows is refused from its header.
    assert_eq!(p.records.open(&mut [23, 3, 3, 0xff, 0xff]), Err(TlsError::Oversized));
    assert_eq!(p.records.open(&mut [23, 3, 3, 0, 10, 1]), Ok(None), "incomplete: more bytes needed");

    // A client that does not trust the certificate aborts; the server sees its alert.
    let (cert_pem, key_pem, _) = cert();
    let (_, _, other) = cert();
    let mut c = client(rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256, other);
    let mut hs = Handshake::new(server_config(&cert_pem, &key_pem).unwrap(), true).unwrap();
    let mut input = Vec::new();
    let mut refused = false;
    for _ in 0..4 {
        c.write_tls(&mut input).unwrap();
        let mut out = Vec::new();
        match hs.feed(&mut input, &mut out) {
            Err(TlsError::Alert(_)) | Err(TlsError::BadRecord) => {
                refused = true;
                break;
            }
            Err(e) => panic!("{e:?}"),
            Ok(_) => {}
        }
        let mut rd = &out[..];
        while !rd.is_empty() {
            c.read_tls(&mut rd).unwrap();
        }
        assert!(c.process_new_packets().is_err() || !c.is_handshaking() || !refused);
    }
    assert!(refused, "the server saw the client's alert");
}

#[test]
fn an_established_connection_keeps_only_its_keys() {
    // Per direction: cipher, 32-byte key, 12-byte IV, sequence number.
    assert!(std::mem::size_of::<Records>() <= 128, "{} bytes", std::mem::size_of::<Records>());
}

#[test]
fn bad_pem_is_a_clear_error() {
    let (cert_pem, key_pem, _) = cert();
    assert!(server_config(b"", &key_pem).unwrap_err().contains("certificate"));
    assert!(server_config(&cert_pem, b"junk").unwrap_err().contains("private key"));
}

#[test]
fn the_kernel_goes_on_sealing_where_user_space_left_off() {
    for suite in suites() {
        let (mut p, _) = pair(suite, b"").unwrap();
        let mut out = Vec::new();
        p.records.seal(b"HTTP/1.1 101 Switching Protocols\r\n\r\n", &mut out).unwrap();
        p.records.seal(b"welcome", &mut out).unwrap();
        let info = super::kernel::TxInfo::new(&p.records).unwrap();
        let mut kernel = super::kernel::KernelModel::new(info.as_bytes());
        for frame in [&b"block one"[..], b"block two", &[9u8; 3000][..]] {
            kernel.seal(frame, &mut out);
        }
        let read = p.client_reads(&out);
        assert_eq!(&read[..43], b"HTTP/1.1 101 Switching Protocols\r\n\r\nwelcome", "{suite:?}");
        assert_eq!(&read[43..61], b"block oneblock two", "{suite:?}");
        assert_eq!(read.len(), 61 + 3000, "{suite:?}");
    }
}

#[test]
fn a_refused_hello_gets_an_alert() {
    let (cert_pem, key_pem, der) = cert();
    let mut roots = RootCertStore::empty();
    roots.add(der).unwrap();
    let mut config = ClientConfig::builder_with_provider(Arc::new(super::provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let mut c = ClientConnection::new(Arc::new(config), ServerName::try_from("localhost").unwrap()).unwrap();
    let mut hs = Handshake::new(server_config(&cert_pem, &key_pem).unwrap(), false).unwrap();
    let mut input = Vec::new();
    c.write_tls(&mut input).unwrap();
    let mut out = Vec::new();
    let step = hs.feed(&mut input, &mut out);
    assert!(matches!(step, Err(TlsError::Incompatible)), "{:?}", step.err());
    let mut rd = &out[..];
    while !rd.is_empty() {
        c.read_tls(&mut rd).unwrap();
    }
    let err = c.process_new_packets().unwrap_err();
    assert!(err.to_string().contains("NoApplicationProtocol"), "{err}");
}

#[test]
fn frames_sealed_together_share_records_and_read_back_in_order() {
    for suite in suites() {
        let (mut p, _) = pair(suite, b"").unwrap();
        let frames: Vec<Vec<u8>> = [3usize, 700, 20_000, 1, 16 * 1024, 5]
            .iter()
            .enumerate()
            .map(|(i, &n)| (0..n).map(|j| (i * 31 + j) as u8).collect())
            .collect();
        let parts: Vec<&[u8]> = frames.iter().map(|f| &f[..]).collect();
        let mut out = Vec::new();
        p.records.seal_all(&parts, &mut out).unwrap();
        let total: usize = frames.iter().map(|f| f.len()).sum();
        assert_eq!(out.len(), total + p.records.overhead(total), "{suite:?}: records of 16 KiB, not one per frame");
        assert_eq!(p.client_reads(&out), frames.concat(), "{suite:?}");
        // And the stream goes on with the next sequence numbers.
        let mut more = Vec::new();
        p.records.seal_all(&[b"next", b" one"], &mut more).unwrap();
        assert_eq!(p.client_reads(&more), b"next one");
    }
}

#[test]
fn sni_picks_by_name_and_falls_back_to_the_first() {
    let provider = super::provider();
    let keys: Vec<_> = ["live.example", "*.cdn.example"]
        .iter()
        .map(|n| {
            let c = rcgen::generate_simple_self_signed(vec![n.to_string()]).unwrap();
            let key = rustls::pki_types::PrivateKeyDer::try_from(c.signing_key.serialize_der()).unwrap();
            Arc::new(rustls::sign::CertifiedKey::from_der(vec![c.cert.der().clone()], key, &provider).unwrap())
        })
        .collect();
    let certs = super::sni::Certs::new(keys.clone());
    let is = |got: Option<Arc<rustls::sign::CertifiedKey>>, want: usize| Arc::ptr_eq(&got.unwrap(), &keys[want]);
    assert!(is(certs.pick(Some("live.example")), 0));
    assert!(is(certs.pick(Some("x.cdn.example")), 1));
    assert!(is(certs.pick(Some("LIVE.EXAMPLE")), 0), "names are case-insensitive");
    assert!(is(certs.pick(Some("a.b.cdn.example")), 0), "a wildcard covers one label: the first");
    assert!(is(certs.pick(Some("other.example")), 0));
    assert!(is(certs.pick(None), 0), "no SNI: the first");
}
