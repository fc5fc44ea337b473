//! The shard's edge: per client address, how fast it opens connections and sends requests (a
//! WebSocket upgrade or a short poll). The address is the TCP peer's, or the one a PROXY v2
//! header names when the listener sits behind a balancer. Addresses are kept only while their
//! buckets refill (a few seconds after their last connection), in a table of bounded size; a
//! new address while the table is full is refused, not let through.

use std::collections::HashMap;
use std::net::IpAddr;

use crate::room::limit::{Rate, TokenBucket};

/// The edge's knobs.
#[derive(Clone, Copy, Debug)]
pub struct EdgeLimits {
    /// New connections per address.
    pub connections: Rate,
    /// Requests (upgrades, polls) per address.
    pub requests: Rate,
    /// Addresses tracked at once (about 64 B each).
    pub addresses_max: usize,
}

/// What the edge says about one more connection or request from an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    Yes,
    /// Over the address's rate.
    Limited,
    /// A new address and the table is full.
    TableFull,
}

struct Buckets {
    connections: TokenBucket,
    requests: TokenBucket,
}

/// Rate state per client address.
pub struct Edge {
    limits: EdgeLimits,
    addresses: HashMap<IpAddr, Buckets>,
}

impl Edge {
    pub fn new(limits: EdgeLimits) -> Edge {
        Edge { limits, addresses: HashMap::new() }
    }

    /// One more connection from `addr`.
    pub fn connection(&mut self, addr: IpAddr, now_ms: u64) -> Admit {
        let rate = self.limits.connections;
        self.admit(addr, now_ms, rate, |b| &mut b.connections)
    }

    /// One more request from `addr`.
    pub fn request(&mut self, addr: IpAddr, now_ms: u64) -> Admit {
        let rate = self.limits.requests;
        self.admit(addr, now_ms, rate, |b| &mut b.requests)
    }

    fn admit(&mut self, addr: IpAddr, now_ms: u64, rate: Rate, pick: fn(&mut Buckets) -> &mut TokenBucket) -> Admit {
        if rate.per_s == 0 {
            return Admit::Yes;
        }
        if !self.addresses.contains_key(&addr) && self.addresses.len() >= self.limits.addresses_max {
            self.sweep(now_ms);
            if self.addresses.len() >= self.limits.addresses_max {
                return Admit::TableFull;
            }
        }
        let (c, r) = (self.limits.connections, self.limits.requests);
        let buckets = self.addresses.entry(addr).or_insert_with(|| Buckets {
            connections: TokenBucket::new(&c, now_ms),
            requests: TokenBucket::new(&r, now_ms),
        });
        if pick(buckets).try_take(&rate, now_ms) { Admit::Yes } else { Admit::Limited }
    }

    /// Forgets addresses whose buckets are full again (a new one starts full).
    pub fn sweep(&mut self, now_ms: u64) {
        let (c, r) = (self.limits.connections, self.limits.requests);
        self.addresses.retain(|_, b| !(b.connections.is_full(&c, now_ms) && b.requests.is_full(&r, now_ms)));
    }

    /// Addresses tracked (a gauge).
    pub fn len(&self) -> usize {
        self.addresses.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge(max: usize) -> Edge {
        let rate = Rate { per_s: 1, burst: 2 };
        Edge::new(EdgeLimits { connections: rate, requests: rate, addresses_max: max })
    }

    #[test]
    fn each_address_has_its_own_rates_and_the_table_is_bounded() {
        let mut e = edge(2);
        let (a, b, c): (IpAddr, IpAddr, IpAddr) =
            ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap(), "10.0.0.3".parse().unwrap());
        assert_eq!(
            (e.connection(a, 0), e.connection(a, 0), e.connection(a, 0)),
            (Admit::Yes, Admit::Yes, Admit::Limited)
        );
        assert_eq!(e.request(a, 0), Admit::Yes, "requests have their own bucket");
        assert_eq!(e.connection(b, 0), Admit::Yes, "another address is not limited");
        assert_eq!(e.connection(c, 0), Admit::TableFull, "a third address while two are tracked");
        assert_eq!(e.connection(a, 1_000), Admit::Yes, "a token back after a second");
        assert_eq!(e.connection(c, 5_000), Admit::Yes, "full buckets are forgotten to make room");
        e.sweep(10_000);
        assert_eq!(e.len(), 0);
        let mut off =
            Edge::new(EdgeLimits { connections: Rate::UNLIMITED, requests: Rate::UNLIMITED, addresses_max: 0 });
        assert_eq!(off.connection(a, 0), Admit::Yes, "0 = no limit, nothing tracked");
    }
}
