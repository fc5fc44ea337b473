//! Where connections come from and go to: a loopback-only target, and the grid of source
//! addresses × source ports that gives connection `i` its own (address, port) pair.
#![forbid(unsafe_code)]

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

/// Why an address argument was refused.
#[derive(Debug, PartialEq, Eq)]
pub struct AddrError(pub String);

impl std::fmt::Display for AddrError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A target (`--target`, `--api`): an IPv4 loopback socket address.
pub fn parse_target(flag: &str, text: &str) -> Result<SocketAddrV4, AddrError> {
    let addr: SocketAddr = text.parse().map_err(|e| AddrError(format!("{flag} {text}: {e}")))?;
    match addr {
        SocketAddr::V4(v4) if v4.ip().is_loopback() && v4.port() != 0 => Ok(v4),
        SocketAddr::V4(v4) if v4.port() == 0 => Err(AddrError(format!("{flag} {text}: port 0"))),
        _ => Err(AddrError(format!("{flag} {text}: only IPv4 loopback (127.0.0.0/8) targets are allowed"))),
    }
}

/// The sources × ports grid. Connection `i` takes address `i % addresses` and port
/// `i / addresses`, so consecutive connections spread over the addresses and every pair is
/// used at most once per run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sources {
    first: u32,
    addresses: u32,
    port_first: u16,
    ports: u32,
}

impl Sources {
    /// `sources` is `A` or `A-B` (inclusive, both in 127.0.0.0/8); `ports` is `P` or `P-Q`
    /// (inclusive, 1..=65535).
    pub fn parse(sources: &str, ports: &str) -> Result<Sources, AddrError> {
        let (a, b) = split_range(sources);
        let first = parse_loopback(a)?;
        let last = parse_loopback(b)?;
        if last < first {
            return Err(AddrError(format!("--sources {sources}: the range is empty")));
        }
        let (p, q) = split_range(ports);
        let port_first = parse_port(p)?;
        let port_last = parse_port(q)?;
        if port_last < port_first {
            return Err(AddrError(format!("--ports {ports}: the range is empty")));
        }
        Ok(Sources {
            first: u32::from(first),
            addresses: u32::from(last) - u32::from(first) + 1,
            port_first,
            ports: u32::from(port_last) - u32::from(port_first) + 1,
        })
    }

    /// Distinct (address, port) pairs.
    pub fn capacity(&self) -> u64 {
        u64::from(self.addresses) * u64::from(self.ports)
    }

    pub fn addresses(&self) -> u32 {
        self.addresses
    }

    /// The source of connection `i`; None past the grid.
    pub fn pair(&self, i: u64) -> Option<SocketAddrV4> {
        if i >= self.capacity() {
            return None;
        }
        let addresses = u64::from(self.addresses);
        // Both quotients are below their u32 ranges because i < addresses × ports.
        let ip = self.first + (i % addresses) as u32;
        let port = u32::from(self.port_first) + (i / addresses) as u32;
        Some(SocketAddrV4::new(Ipv4Addr::from(ip), u16::try_from(port).ok()?))
    }

    /// Whether some source pair equals `target` (binding it would collide with the listener).
    pub fn contains(&self, target: SocketAddrV4) -> bool {
        let ip = u32::from(*target.ip());
        let port = u32::from(target.port());
        (self.first..self.first + self.addresses).contains(&ip)
            && (u32::from(self.port_first)..u32::from(self.port_first) + self.ports).contains(&port)
    }
}

impl std::fmt::Display for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let last = Ipv4Addr::from(self.first + self.addresses - 1);
        let port_last = u32::from(self.port_first) + self.ports - 1;
        write!(f, "{}-{} ports {}-{}", Ipv4Addr::from(self.first), last, self.port_first, port_last)
    }
}

fn split_range(text: &str) -> (&str, &str) {
    match text.split_once('-') {
        Some((a, b)) => (a.trim(), b.trim()),
        None => (text.trim(), text.trim()),
    }
}

fn parse_loopback(text: &str) -> Result<Ipv4Addr, AddrError> {
    let ip: Ipv4Addr = text.parse().map_err(|e| AddrError(format!("--sources {text}: {e}")))?;
    if !ip.is_loopback() {
        return Err(AddrError(format!("--sources {text}: only 127.0.0.0/8 sources are allowed")));
    }
    Ok(ip)
}

fn parse_port(text: &str) -> Result<u16, AddrError> {
    match text.parse::<u16>() {
        Ok(0) | Err(_) => Err(AddrError(format!("--ports {text}: a port is 1..=65535"))),
        Ok(p) => Ok(p),
    }
}

/// The kernel's form of an IPv4 socket address (network byte order).
pub fn sockaddr_in(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(*addr.ip()).to_be() },
        sin_zero: [0; 8],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_enumerate_the_grid_once_addresses_first() {
        let s = Sources::parse("127.0.1.1-127.0.1.3", "10000-10001").unwrap();
        assert_eq!(s.capacity(), 6);
        let pairs: Vec<String> = (0..6).map(|i| s.pair(i).unwrap().to_string()).collect();
        assert_eq!(
            pairs,
            [
                "127.0.1.1:10000",
                "127.0.1.2:10000",
                "127.0.1.3:10000",
                "127.0.1.1:10001",
                "127.0.1.2:10001",
                "127.0.1.3:10001"
            ]
        );
        assert_eq!(s.pair(6), None);
        let unique: std::collections::HashSet<_> = (0..6).map(|i| s.pair(i)).collect();
        assert_eq!(unique.len(), 6);
    }

    #[test]
    fn single_address_and_port_and_the_edges() {
        let s = Sources::parse("127.0.0.1", "65535").unwrap();
        assert_eq!(s.capacity(), 1);
        assert_eq!(s.pair(0).unwrap().to_string(), "127.0.0.1:65535");
        let wide = Sources::parse("127.0.0.1-127.255.255.254", "1-65535").unwrap();
        assert_eq!(wide.capacity(), 0xFF_FFFE * 65535);
        assert_eq!(wide.pair(wide.capacity() - 1).unwrap().to_string(), "127.255.255.254:65535");
    }

    #[test]
    fn refuses_non_loopback_and_empty_ranges() {
        assert!(Sources::parse("10.0.0.1", "1000").is_err());
        assert!(Sources::parse("127.0.0.9-127.0.0.1", "1000").is_err());
        assert!(Sources::parse("127.0.0.1-128.0.0.1", "1000").is_err());
        assert!(Sources::parse("127.0.0.1", "2000-1000").is_err());
        assert!(Sources::parse("127.0.0.1", "0-10").is_err());
        assert!(Sources::parse("127.0.0.1", "70000").is_err());
        assert!(parse_target("--target", "192.168.1.1:80").is_err());
        assert!(parse_target("--target", "[::1]:80").is_err());
        assert!(parse_target("--target", "127.0.0.1:0").is_err());
        assert_eq!(parse_target("--target", "127.0.0.1:8080").unwrap().port(), 8080);
    }

    #[test]
    fn contains_spots_the_target_inside_the_grid() {
        let s = Sources::parse("127.0.0.1-127.0.0.2", "8000-9000").unwrap();
        assert!(s.contains("127.0.0.2:8080".parse().unwrap()));
        assert!(!s.contains("127.0.0.3:8080".parse().unwrap()));
        assert!(!s.contains("127.0.0.1:9001".parse().unwrap()));
    }

    #[test]
    fn sockaddr_is_network_order() {
        let sa = sockaddr_in("127.0.1.2:10000".parse().unwrap());
        assert_eq!(sa.sin_family, libc::AF_INET as libc::sa_family_t);
        assert_eq!(u16::from_be(sa.sin_port), 10000);
        assert_eq!(sa.sin_addr.s_addr.to_ne_bytes(), [127, 0, 1, 2]);
    }
}
