//! Several certificates on one listener: the client's SNI picks the first whose names cover it
//! (exact or wildcard, as a client would check them), else the first certificate is served —
//! to clients that send no SNI (an IP address) too.
#![forbid(unsafe_code)]

use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

#[derive(Debug)]
pub struct Certs {
    /// In configuration order; never empty.
    keys: Vec<Arc<CertifiedKey>>,
}

impl Certs {
    pub fn new(keys: Vec<Arc<CertifiedKey>>) -> Certs {
        Certs { keys }
    }

    /// The certificate for `name`: the first valid for it, else the first.
    pub fn pick(&self, name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let first = self.keys.first().cloned();
        if self.keys.len() < 2 {
            return first;
        }
        let Some(name) = name.and_then(|n| ServerName::try_from(n).ok()) else { return first };
        // Parsing a leaf costs microseconds against a handshake's ~150 µs; a handful of
        // certificates need no index.
        let covers = |k: &&Arc<CertifiedKey>| {
            k.end_entity_cert()
                .ok()
                .and_then(|der| webpki::EndEntityCert::try_from(der).ok())
                .is_some_and(|cert| cert.verify_is_valid_for_subject_name(&name).is_ok())
        };
        self.keys.iter().find(covers).cloned().or(first)
    }
}

impl ResolvesServerCert for Certs {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.pick(hello.server_name())
    }
}
