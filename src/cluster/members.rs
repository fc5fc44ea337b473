//! The live node set and who should own a room (sans-IO: built from what the heartbeat read).
//!
//! A node is live while its heartbeat entry has not expired (Redis's own clock decides, so the
//! nodes' clocks need not agree). A room's preferred owner is the live node with the highest
//! rendezvous weight `mix(hash(node), hash(room))`: every node computes the same answer from
//! the same set with no round trip, rooms spread evenly, and when a node joins or leaves only
//! the rooms it wins or held move. The lease in Redis (issue 13's next step) confirms it, so two
//! nodes that briefly disagree on the set never both run a room's mixer.

/// One live node as its heartbeat announced it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// `cluster.node_id`: unique in the cluster.
    pub id: String,
    /// Where clients reach it (`cluster.public_url`): drains send clients here.
    pub url: String,
    /// Its heartbeat expires then (Redis server time, Unix ms).
    pub expires_ms: i64,
}

/// The cluster as one node last saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Members {
    me: String,
    /// Live nodes, sorted by id.
    nodes: Vec<Node>,
    /// Redis server time of the read.
    as_of_ms: i64,
}

impl Members {
    /// The set from a heartbeat read: `(id, expires_ms, url)` per entry, taken at `now_ms`
    /// (Redis server time). Entries already expired are left out (their keys are swept by
    /// whichever node sees them first); a missing URL reads as "".
    pub fn read(me: &str, entries: Vec<(String, i64, Option<String>)>, now_ms: i64) -> Members {
        let mut nodes: Vec<Node> = entries
            .into_iter()
            .filter(|(_, expires_ms, _)| *expires_ms > now_ms)
            .map(|(id, expires_ms, url)| Node { id, url: url.unwrap_or_default(), expires_ms })
            .collect();
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        nodes.dedup_by(|a, b| a.id == b.id);
        Members { me: me.to_string(), nodes, as_of_ms: now_ms }
    }

    pub fn me(&self) -> &str {
        &self.me
    }

    pub fn live(&self) -> &[Node] {
        &self.nodes
    }

    pub fn as_of_ms(&self) -> i64 {
        self.as_of_ms
    }

    /// This node is in the set it read (its heartbeat landed).
    pub fn includes_me(&self) -> bool {
        self.nodes.iter().any(|n| n.id == self.me)
    }

    /// The live node a room should be owned by (None: no node is live).
    pub fn owner_of(&self, room: &str) -> Option<&Node> {
        let r = hash(room.as_bytes());
        self.nodes.iter().max_by_key(|n| (weight(hash(n.id.as_bytes()), r), std::cmp::Reverse(n.id.as_str())))
    }

    /// Where a draining node sends client `salt` (a connection's number spreads them): another
    /// live node with a URL, chosen evenly; None when this node is alone.
    pub fn drain_target(&self, salt: u64) -> Option<&Node> {
        let peers: Vec<&Node> = self.nodes.iter().filter(|n| n.id != self.me && !n.url.is_empty()).collect();
        if peers.is_empty() {
            return None;
        }
        Some(peers[(mix(salt) % peers.len() as u64) as usize])
    }
}

/// FNV-1a 64: stable across processes, builds and platforms (the std hasher is keyed at random
/// per process, and every node must agree on a room's weights).
fn hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// A node's weight for a room: the two hashes mixed (splitmix64's finaliser), so that nearby
/// names do not favour one node.
fn weight(node: u64, room: u64) -> u64 {
    mix(node ^ room.rotate_left(32))
}

fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn set(me: &str, ids: &[&str]) -> Members {
        let entries = ids.iter().map(|id| (id.to_string(), 2_000, Some(format!("ws://{id}/ws")))).collect();
        Members::read(me, entries, 1_000)
    }

    #[test]
    fn expired_entries_are_not_live_and_the_set_is_sorted() {
        let entries = vec![
            ("c".to_string(), 5_000, Some("ws://c".to_string())),
            ("a".to_string(), 5_000, None),
            ("b".to_string(), 999, Some("ws://b".to_string())),
            ("a".to_string(), 4_000, None),
        ];
        let m = Members::read("a", entries, 1_000);
        let ids: Vec<&str> = m.live().iter().map(|n| n.id.as_str()).collect();
        assert_eq!(ids, ["a", "c"]);
        assert_eq!(m.live()[0].url, "");
        assert!(m.includes_me());
        assert!(!Members::read("b", vec![("b".into(), 999, None)], 1_000).includes_me());
    }

    #[test]
    fn every_node_agrees_on_the_owner_whatever_order_it_read() {
        let a = set("a", &["n1", "n2", "n3"]);
        let b = set("n3", &["n3", "n1", "n2"]);
        for room in ["lobby", "room1", "直播间", ""] {
            assert_eq!(a.owner_of(room).map(|n| &n.id), b.owner_of(room).map(|n| &n.id));
        }
        assert_eq!(Members::read("a", vec![], 0).owner_of("x"), None);
    }

    #[test]
    fn rooms_spread_evenly_over_the_nodes() {
        let m = set("n0", &["n0", "n1", "n2"]);
        let mut counts = [0usize; 3];
        for i in 0..30_000 {
            let owner = m.owner_of(&format!("room{i}")).map(|n| n.id.clone()).unwrap_or_default();
            counts[owner[1..].parse::<usize>().unwrap_or(0)] += 1;
        }
        // 10,000 expected each; a fair split is within a few percent at this count.
        assert!(counts.iter().all(|&c| (9_400..=10_600).contains(&c)), "{counts:?}");
    }

    #[test]
    fn the_drain_target_is_another_live_node_with_a_url() {
        let m = set("n1", &["n1", "n2", "n3"]);
        let mut seen = std::collections::BTreeSet::new();
        for salt in 0..100 {
            let t = m.drain_target(salt).map(|n| n.id.clone());
            assert!(matches!(t.as_deref(), Some("n2" | "n3")), "{t:?}");
            seen.insert(t);
        }
        assert_eq!(seen.len(), 2, "clients are spread over the peers");
        assert_eq!(set("n1", &["n1"]).drain_target(7), None);
        let no_url = Members::read("n1", vec![("n1".into(), 9, None), ("n2".into(), 9, None)], 0);
        assert_eq!(no_url.drain_target(7), None);
    }

    proptest! {
        /// A node leaving moves only the rooms it owned; a node joining takes rooms only for
        /// itself: ownership never shuffles between the nodes that stay.
        #[test]
        fn only_the_rooms_of_a_node_that_comes_or_goes_move(
            n in 2usize..8, gone in 0usize..8, rooms in proptest::collection::vec("[a-z0-9]{1,12}", 1..64),
        ) {
            let ids: Vec<String> = (0..n).map(|i| format!("node-{i}")).collect();
            let gone = &ids[gone % n];
            let all: Vec<&str> = ids.iter().map(String::as_str).collect();
            let rest: Vec<&str> = all.iter().copied().filter(|id| id != gone).collect();
            let (before, after) = (set("x", &all), set("x", &rest));
            for room in &rooms {
                let was = before.owner_of(room).map(|n| n.id.clone()).unwrap_or_default();
                let now = after.owner_of(room).map(|n| n.id.clone()).unwrap_or_default();
                if &was != gone {
                    prop_assert_eq!(&was, &now, "room {} moved off a node that stayed", room);
                }
                prop_assert_ne!(&now, gone);
            }
        }
    }
}
