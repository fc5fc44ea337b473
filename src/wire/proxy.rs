//! PROXY protocol v2: the binary header an L4 load balancer sends before the client's bytes,
//! naming the client's address (the TCP peer is the balancer). Sans-IO: the bytes received so
//! far in, the client's address and how many bytes the header took out. Only v2 (binary) is
//! spoken; a connection that does not start with its signature is refused.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The 12 bytes every v2 header starts with.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Longest header taken: the fixed 16 bytes, the addresses, and the TLVs balancers add (an
/// AWS endpoint id, a TLS summary); anything longer is refused.
pub const HEADER_BYTES_MAX: usize = 1024;

const FIXED: usize = 16;
const CMD_LOCAL: u8 = 0x0;
const CMD_PROXY: u8 = 0x1;
const AF_INET_STREAM: u8 = 0x11;
const AF_INET6_STREAM: u8 = 0x21;

/// What the bytes so far hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// A valid beginning; more is needed.
    Partial,
    /// The whole header: the client's address (None for a LOCAL header — the balancer's own
    /// health check — or an address family other than TCP over IPv4/IPv6) and its length.
    Complete { source: Option<SocketAddr>, consumed: usize },
}

/// Why a header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyError {
    /// The bytes do not start with the v2 signature.
    Signature,
    /// Version other than 2, or a command other than LOCAL and PROXY.
    Version,
    /// Longer than `HEADER_BYTES_MAX`.
    TooLarge,
    /// The address block is shorter than its family needs.
    Address,
}

impl ProxyError {
    /// Metric label.
    pub fn reason(self) -> &'static str {
        match self {
            ProxyError::Signature => "signature",
            ProxyError::Version => "version",
            ProxyError::TooLarge => "too_large",
            ProxyError::Address => "address",
        }
    }
}

/// Parses a v2 header from the start of `buf`. Refuses as early as the bytes allow: a wrong
/// signature byte fails before the rest arrives.
pub fn parse(buf: &[u8]) -> Result<Parsed, ProxyError> {
    let seen = buf.len().min(SIGNATURE.len());
    if buf[..seen] != SIGNATURE[..seen] {
        return Err(ProxyError::Signature);
    }
    let Some(&ver_cmd) = buf.get(12) else { return Ok(Parsed::Partial) };
    if ver_cmd >> 4 != 2 || !matches!(ver_cmd & 0xF, CMD_LOCAL | CMD_PROXY) {
        return Err(ProxyError::Version);
    }
    let Some(&[family, hi, lo]) = buf.get(13..16).and_then(|b| <&[u8; 3]>::try_from(b).ok()) else {
        return Ok(Parsed::Partial);
    };
    let len = usize::from(u16::from_be_bytes([hi, lo]));
    let total = FIXED + len;
    if total > HEADER_BYTES_MAX {
        return Err(ProxyError::TooLarge);
    }
    let Some(block) = buf.get(FIXED..total) else { return Ok(Parsed::Partial) };
    if ver_cmd & 0xF == CMD_LOCAL {
        return Ok(Parsed::Complete { source: None, consumed: total });
    }
    let source = match family {
        AF_INET_STREAM => {
            let a: &[u8; 12] = block.get(..12).and_then(|b| b.try_into().ok()).ok_or(ProxyError::Address)?;
            let ip = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
            Some(SocketAddr::new(IpAddr::V4(ip), u16::from_be_bytes([a[8], a[9]])))
        }
        AF_INET6_STREAM => {
            let a: &[u8; 36] = block.get(..36).and_then(|b| b.try_into().ok()).ok_or(ProxyError::Address)?;
            let mut ip = [0u8; 16];
            ip.copy_from_slice(&a[..16]);
            Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), u16::from_be_bytes([a[32], a[33]])))
        }
        _ => None,
    };
    Ok(Parsed::Complete { source, consumed: total })
}

/// A v2 PROXY header for `source` → `dest` (TCP), with `tlv` appended: what a balancer sends
/// (for tests and the load generator).
pub fn header(source: SocketAddr, dest: SocketAddr, tlv: &[u8]) -> Vec<u8> {
    let mut block = Vec::new();
    let family = match (source, dest) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            block.extend_from_slice(&s.ip().octets());
            block.extend_from_slice(&d.ip().octets());
            AF_INET_STREAM
        }
        (s, d) => {
            block.extend_from_slice(&v6(s.ip()).octets());
            block.extend_from_slice(&v6(d.ip()).octets());
            AF_INET6_STREAM
        }
    };
    block.extend_from_slice(&source.port().to_be_bytes());
    block.extend_from_slice(&dest.port().to_be_bytes());
    block.extend_from_slice(tlv);
    let mut out = SIGNATURE.to_vec();
    out.push(0x20 | CMD_PROXY);
    out.push(family);
    out.extend_from_slice(&(block.len() as u16).to_be_bytes());
    out.extend_from_slice(&block);
    out
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv4_and_ipv6_headers_name_the_client() {
        let h = header(addr("203.0.113.7:51000"), addr("10.0.0.1:8080"), &[]);
        assert_eq!(parse(&h), Ok(Parsed::Complete { source: Some(addr("203.0.113.7:51000")), consumed: h.len() }));
        let h = header(addr("[2001:db8::1]:443"), addr("[2001:db8::2]:8080"), b"\x04\x00\x01x");
        let got = parse(&h).unwrap();
        assert_eq!(
            got,
            Parsed::Complete { source: Some(addr("[2001:db8::1]:443")), consumed: h.len() },
            "TLVs skipped"
        );
    }

    #[test]
    fn local_headers_and_other_families_name_nobody() {
        let mut local = SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
        assert_eq!(parse(&local), Ok(Parsed::Complete { source: None, consumed: 16 }));
        let mut unix = SIGNATURE.to_vec();
        unix.extend_from_slice(&[0x21, 0x31, 0x00, 0x02, 0, 0]);
        assert_eq!(parse(&unix), Ok(Parsed::Complete { source: None, consumed: 18 }));
    }

    #[test]
    fn bad_headers_are_refused_early() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(ProxyError::Signature));
        assert_eq!(parse(b"\r\n\r\nX"), Err(ProxyError::Signature), "one wrong byte is enough");
        let mut v1 = SIGNATURE.to_vec();
        v1.push(0x11);
        assert_eq!(parse(&v1), Err(ProxyError::Version));
        let mut cmd = SIGNATURE.to_vec();
        cmd.push(0x2F);
        assert_eq!(parse(&cmd), Err(ProxyError::Version));
        let mut big = SIGNATURE.to_vec();
        big.extend_from_slice(&[0x21, 0x11, 0xFF, 0xFF]);
        assert_eq!(parse(&big), Err(ProxyError::TooLarge));
        let mut short = SIGNATURE.to_vec();
        short.extend_from_slice(&[0x21, 0x11, 0x00, 0x04, 1, 2, 3, 4]);
        assert_eq!(parse(&short), Err(ProxyError::Address));
    }

    proptest! {
        /// Every prefix of a valid header is Partial, the whole is Complete with the address,
        /// whatever follows it; arbitrary bytes never panic.
        #[test]
        fn prefixes_are_partial(ip in any::<[u8; 4]>(), port in any::<u16>(), tlv in prop::collection::vec(any::<u8>(), 0..64), tail in prop::collection::vec(any::<u8>(), 0..32)) {
            let source = SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port);
            let h = header(source, addr("10.0.0.1:80"), &tlv);
            for cut in 0..h.len() {
                prop_assert_eq!(parse(&h[..cut]), Ok(Parsed::Partial));
            }
            let mut with_tail = h.clone();
            with_tail.extend_from_slice(&tail);
            prop_assert_eq!(parse(&with_tail), Ok(Parsed::Complete { source: Some(source), consumed: h.len() }));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..128)) {
            let _ = parse(&bytes);
            let mut signed = SIGNATURE.to_vec();
            signed.extend_from_slice(&bytes);
            if let Ok(Parsed::Complete { consumed, .. }) = parse(&signed) {
                prop_assert!(consumed <= signed.len());
            }
        }
    }
}
