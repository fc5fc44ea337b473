//! A room's custom attributes (mic seats, game roles): the owner applies `set`/`delete` from the
//! API, and clients sync by version — a full snapshot once, then the changes after the version
//! they hold (`since`); the owner's block tick broadcasts `changes_after` the version it last
//! sent. Sans-IO: no clocks, no sockets.
//!
//! Versions count up by one per change from `base`, so the change log holds a consecutive range
//! of versions and `since` finds its start by arithmetic.

use std::collections::{BTreeMap, HashSet, VecDeque};

/// Bounds of one room's attributes.
///
/// Memory of one room: at most `keys_max` entries of at most `key_bytes_max + value_bytes_max`
/// each, plus at most `log_len_max` logged changes of at most `key_bytes_max + value_bytes_max`
/// each, plus about 48 B per entry and 56 B per logged change of bookkeeping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttrLimits {
    /// Keys in one room. A `set` of a new key beyond it fails with `TooManyKeys`.
    pub keys_max: usize,
    /// Bytes of one key.
    pub key_bytes_max: usize,
    /// Bytes of one value.
    pub value_bytes_max: usize,
    /// Changes kept for `since`: a client further behind gets a snapshot instead.
    pub log_len_max: usize,
}

impl AttrLimits {
    /// Defaults: 64 mic seats / roles of up to 1 KiB each, and 128 changes kept so a client that
    /// reconnects after a short drop gets a delta, not a snapshot. Worst case per room:
    /// (64 + 128) × (64 + 1024) B ≈ 204 KiB (× rooms_max if the business fills every room; set
    /// only through the private API, typical rooms hold a few small keys).
    pub const DEFAULT: AttrLimits =
        AttrLimits { keys_max: 64, key_bytes_max: 64, value_bytes_max: 1024, log_len_max: 128 };
}

impl Default for AttrLimits {
    fn default() -> Self {
        AttrLimits::DEFAULT
    }
}

/// Why a `set` was refused: capacity errors first, then bad input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttrError {
    TooManyKeys,
    KeyTooLong,
    /// Empty, or a byte outside `[A-Za-z0-9_.:-]`.
    BadKey,
    ValueTooLarge,
    /// The rooms are being handed to a new process (an upgrade): retry, it will take it.
    HandedOver,
}

impl AttrError {
    /// The HTTP status of the refusal.
    pub fn status(&self) -> u16 {
        match self {
            AttrError::ValueTooLarge => 413,
            AttrError::HandedOver => 503,
            AttrError::TooManyKeys | AttrError::KeyTooLong | AttrError::BadKey => 400,
        }
    }

    /// Human text for API 4xx answers and error frames.
    pub fn message(&self) -> &'static str {
        match self {
            AttrError::TooManyKeys => "room has too many attributes",
            AttrError::KeyTooLong => "attribute key is too long",
            AttrError::BadKey => "attribute key must be 1 or more of A-Z a-z 0-9 _ . : -",
            AttrError::ValueTooLarge => "attribute value is too large",
            AttrError::HandedOver => "the gateway is handing its rooms to a new process: retry",
        }
    }
}

/// One logged change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub version: u64,
    pub key: String,
    /// None = deleted.
    pub value: Option<Vec<u8>>,
}

/// What a client at some version needs.
#[derive(Debug, PartialEq, Eq)]
pub enum Since<'a> {
    /// Nothing changed.
    UpToDate,
    /// Every change after the client's version, only the newest per key, in version order (the
    /// last one carries the current version).
    Delta(Vec<&'a Change>),
    /// The client's version is older than the log, or unknown here: send `snapshot()`.
    Snapshot,
}

/// One room's attributes and its recent changes.
#[derive(Debug)]
pub struct AttrLog {
    entries: BTreeMap<String, Vec<u8>>,
    /// Changes `version - log.len() + 1 ..= version`, oldest first.
    log: VecDeque<Change>,
    version: u64,
    /// Bytes of keys and values in `entries` and `log`.
    payload_bytes: usize,
    /// The log bound of the last `set`, for `delete` (which always follows a `set` of its key).
    log_len_max: usize,
}

impl AttrLog {
    /// `base` = the version before the first change (the owner passes the room's seq base,
    /// `owner::seq_base`, so versions keep increasing across restarts).
    pub fn new(base: u64) -> Self {
        AttrLog { entries: BTreeMap::new(), log: VecDeque::new(), version: base, payload_bytes: 0, log_len_max: 0 }
    }

    /// Attributes handed over by another process at `version`, with no change log: a client
    /// behind `version` gets a snapshot. Entries over `limits` are skipped (the count is
    /// returned), so the restored log obeys this process's bounds.
    pub fn restore(version: u64, entries: Vec<(String, Vec<u8>)>, limits: &AttrLimits) -> (AttrLog, usize) {
        let mut log = AttrLog::new(version);
        log.log_len_max = limits.log_len_max;
        let mut skipped = 0;
        for (key, value) in entries {
            let fits = check_key(&key, limits).is_ok()
                && value.len() <= limits.value_bytes_max
                && log.entries.len() < limits.keys_max;
            if fits {
                log.payload_bytes += key.len() + value.len();
                log.entries.insert(key, value);
            } else {
                skipped += 1;
            }
        }
        (log, skipped)
    }

    /// The version of the newest change (`base` before any).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Sets a key; returns the new version, or the current one unchanged if the value is
    /// identical (no new change logged).
    pub fn set(&mut self, key: &str, value: &[u8], limits: &AttrLimits) -> Result<u64, AttrError> {
        check_key(key, limits)?;
        if value.len() > limits.value_bytes_max {
            return Err(AttrError::ValueTooLarge);
        }
        let keys = self.entries.len();
        match self.entries.get_mut(key) {
            Some(old) if old.as_slice() == value => return Ok(self.version),
            Some(old) => {
                self.payload_bytes = self.payload_bytes - old.len() + value.len();
                value.clone_into(old);
            }
            None if keys >= limits.keys_max => return Err(AttrError::TooManyKeys),
            None => {
                self.payload_bytes += key.len() + value.len();
                self.entries.insert(key.to_owned(), value.to_vec());
            }
        }
        self.log_len_max = limits.log_len_max;
        Ok(self.record(key, Some(value.to_vec())))
    }

    /// Deletes a key; returns the new version, or None if it was absent. The log keeps the bound
    /// of the last `set` (a key exists only after one).
    pub fn delete(&mut self, key: &str) -> Option<u64> {
        let old = self.entries.remove(key)?;
        self.payload_bytes -= key.len() + old.len();
        Some(self.record(key, None))
    }

    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.entries.get(key).map(Vec::as_slice)
    }

    /// All entries in key order.
    pub fn snapshot(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v.as_slice()))
    }

    /// What a client at version `v` needs: UpToDate if `v` is the current version; Delta if every
    /// change after `v` is still in the log; Snapshot if `v` is older than the log or newer than
    /// the current version (a client from before a restart). Versions from an earlier incarnation
    /// of the room fall below `base` unless it made over 2^20 changes a second.
    pub fn since(&self, v: u64) -> Since<'_> {
        if v == self.version {
            Since::UpToDate
        } else if v > self.version || v < self.oldest_covered() {
            Since::Snapshot
        } else {
            Since::Delta(self.changes_after(v))
        }
    }

    /// Changes made after `v`, newest per key, in version order; never a snapshot. The owner
    /// calls it with the version it last broadcast. If more than `log_len_max` changes happened
    /// since, the evicted ones are missing: check `since(v)` for `Snapshot` first.
    pub fn changes_after(&self, v: u64) -> Vec<&Change> {
        // The log holds consecutive versions, so the first change after `v` is found by position.
        let skip = v.saturating_sub(self.oldest_covered());
        let skip = usize::try_from(skip).unwrap_or(usize::MAX).min(self.log.len());
        let mut seen = HashSet::new();
        let mut out: Vec<&Change> = self.log.iter().skip(skip).rev().filter(|c| seen.insert(c.key.as_str())).collect();
        out.reverse();
        out
    }

    /// Approximate heap bytes held (keys + values + log, with container overhead), for metrics
    /// and bounds.
    pub fn heap_bytes(&self) -> usize {
        // A BTreeMap node entry is a key and a value header; a log slot is a whole Change.
        let entry = std::mem::size_of::<String>() + std::mem::size_of::<Vec<u8>>();
        self.payload_bytes + self.entries.len() * entry + self.log.capacity() * std::mem::size_of::<Change>()
    }

    /// The oldest version a client may hold and still get a delta.
    fn oldest_covered(&self) -> u64 {
        self.version - self.log.len() as u64
    }

    /// Logs one change at the next version and evicts the oldest beyond `log_len_max`.
    fn record(&mut self, key: &str, value: Option<Vec<u8>>) -> u64 {
        self.version += 1;
        let change = Change { version: self.version, key: key.to_owned(), value };
        self.payload_bytes += change_bytes(&change);
        self.log.push_back(change);
        while self.log.len() > self.log_len_max {
            if let Some(old) = self.log.pop_front() {
                self.payload_bytes -= change_bytes(&old);
            }
        }
        self.version
    }
}

fn change_bytes(c: &Change) -> usize {
    c.key.len() + c.value.as_ref().map_or(0, Vec::len)
}

fn check_key(key: &str, limits: &AttrLimits) -> Result<(), AttrError> {
    if key.len() > limits.key_bytes_max {
        return Err(AttrError::KeyTooLong);
    }
    let ok = !key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b));
    if !ok {
        return Err(AttrError::BadKey);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMITS: AttrLimits = AttrLimits { keys_max: 3, key_bytes_max: 8, value_bytes_max: 4, log_len_max: 4 };
    const BASE: u64 = 7 << 20;

    /// A client's copy: what it got from snapshots and deltas.
    #[derive(Clone, Debug, Default, PartialEq)]
    struct Client {
        version: u64,
        entries: BTreeMap<String, Vec<u8>>,
    }

    impl Client {
        fn sync(&mut self, log: &AttrLog) -> &'static str {
            let kind = match log.since(self.version) {
                Since::UpToDate => "up-to-date",
                Since::Delta(changes) => {
                    for c in changes {
                        assert!(c.version > self.version);
                        match &c.value {
                            Some(v) => self.entries.insert(c.key.clone(), v.clone()),
                            None => self.entries.remove(&c.key),
                        };
                    }
                    "delta"
                }
                Since::Snapshot => {
                    self.entries = log.snapshot().map(|(k, v)| (k.to_owned(), v.to_vec())).collect();
                    "snapshot"
                }
            };
            self.version = log.version();
            kind
        }

        fn matches(&self, log: &AttrLog) -> bool {
            self.entries.iter().map(|(k, v)| (k.as_str(), v.as_slice())).eq(log.snapshot())
        }
    }

    fn keys(changes: &[&Change]) -> Vec<(u64, String)> {
        changes.iter().map(|c| (c.version - BASE, c.key.clone())).collect()
    }

    #[test]
    fn set_get_delete_and_versions() {
        let mut a = AttrLog::new(BASE);
        assert!(a.is_empty());
        assert_eq!(a.set("seat.1", b"ann", &LIMITS), Ok(BASE + 1));
        assert_eq!(a.set("seat.1", b"ann", &LIMITS), Ok(BASE + 1), "same value: no change");
        assert_eq!(a.set("seat.1", b"bob", &LIMITS), Ok(BASE + 2));
        assert_eq!(a.get("seat.1"), Some(&b"bob"[..]));
        assert_eq!(a.delete("seat.2"), None);
        assert_eq!(a.delete("seat.1"), Some(BASE + 3));
        assert_eq!(a.get("seat.1"), None);
        assert_eq!((a.len(), a.version()), (0, BASE + 3));
    }

    #[test]
    fn limits_are_enforced() {
        let mut a = AttrLog::new(0);
        assert_eq!(a.set("", b"", &LIMITS), Err(AttrError::BadKey));
        assert_eq!(a.set("a b", b"", &LIMITS), Err(AttrError::BadKey));
        assert_eq!(a.set("ü", b"", &LIMITS), Err(AttrError::BadKey));
        assert_eq!(a.set("123456789", b"", &LIMITS), Err(AttrError::KeyTooLong));
        assert_eq!(a.set("k", b"12345", &LIMITS), Err(AttrError::ValueTooLarge));
        for k in ["a", "b", "c"] {
            a.set(k, b"", &LIMITS).unwrap();
        }
        assert_eq!(a.set("d", b"", &LIMITS), Err(AttrError::TooManyKeys));
        assert_eq!(a.set("a", b"1234", &LIMITS), Ok(4), "existing keys may still change");
        assert_eq!(a.version(), 4, "refused sets log nothing");
        assert!(AttrError::TooManyKeys.message().contains("too many"));
    }

    #[test]
    fn since_gives_newest_per_key_then_snapshot_when_evicted() {
        let mut a = AttrLog::new(BASE);
        assert_eq!(a.since(BASE), Since::UpToDate);
        assert_eq!(a.since(0), Since::Snapshot, "a new client gets a snapshot");
        a.set("a", b"1", &LIMITS).unwrap();
        a.set("b", b"1", &LIMITS).unwrap();
        a.set("a", b"2", &LIMITS).unwrap();
        let Since::Delta(d) = a.since(BASE) else { panic!("delta expected") };
        assert_eq!(keys(&d), vec![(2, "b".to_owned()), (3, "a".to_owned())]);
        let Since::Delta(d) = a.since(BASE + 2) else { panic!("delta expected") };
        assert_eq!(keys(&d), vec![(3, "a".to_owned())]);
        a.set("c", b"1", &LIMITS).unwrap();
        a.set("c", b"2", &LIMITS).unwrap(); // evicts version 1
        assert_eq!(a.since(BASE), Since::Snapshot);
        assert!(matches!(a.since(BASE + 1), Since::Delta(_)));
        assert_eq!(a.since(BASE + 6), Since::Snapshot, "a version from the future");
        assert_eq!(keys(&a.changes_after(BASE)), keys(&a.changes_after(BASE + 1)), "never a snapshot");
        assert!(a.changes_after(BASE + 9).is_empty());
    }

    #[test]
    fn zero_log_always_snapshots() {
        let limits = AttrLimits { log_len_max: 0, ..LIMITS };
        let mut a = AttrLog::new(0);
        a.set("a", b"1", &limits).unwrap();
        assert_eq!(a.since(0), Since::Snapshot);
        assert_eq!(a.since(1), Since::UpToDate);
        assert!(a.changes_after(0).is_empty());
    }

    #[test]
    fn heap_bytes_follow_contents() {
        let limits = AttrLimits { value_bytes_max: 1000, ..LIMITS };
        let mut a = AttrLog::new(0);
        let empty = a.heap_bytes();
        a.set("k", &[0; 1000], &limits).unwrap();
        let one = a.heap_bytes();
        assert!(one >= empty + 2 * 1001, "entry and log: {one}");
        a.delete("k").unwrap();
        assert!(a.heap_bytes() < one);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Set(u8, Vec<u8>),
        Delete(u8),
        /// A client takes a snapshot at the current version.
        Join,
        /// Syncs client n (mod the clients taken) to the current version.
        Sync(usize),
    }

    fn arb_op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..5, prop::collection::vec(0u8..3, 0..6)).prop_map(|(k, v)| Op::Set(k, v)),
            2 => (0u8..5).prop_map(Op::Delete),
            1 => Just(Op::Join),
            2 => any::<usize>().prop_map(Op::Sync),
        ]
    }

    proptest! {
        /// For any sequence of sets and deletes, a client copy taken at any earlier version
        /// reproduces `snapshot()` after applying `since`; versions strictly increase; bounds hold.
        #[test]
        fn clients_converge(ops in prop::collection::vec(arb_op(), 1..120), log_len_max in 0usize..6) {
            let limits = AttrLimits { log_len_max, ..LIMITS };
            let mut a = AttrLog::new(BASE);
            let mut clients = vec![Client::default()];
            let mut broadcast = Client::default();
            broadcast.sync(&a);
            for op in ops {
                let before = a.version();
                match op {
                    Op::Set(k, v) => match a.set(&format!("k{k}"), &v, &limits) {
                        Ok(ver) => prop_assert!(ver == before || ver == before + 1),
                        Err(e) => prop_assert!(matches!(e, AttrError::TooManyKeys | AttrError::ValueTooLarge)),
                    },
                    Op::Delete(k) => if let Some(ver) = a.delete(&format!("k{k}")) {
                        prop_assert_eq!(ver, before + 1);
                    },
                    Op::Join => {
                        let entries = a.snapshot().map(|(k, v)| (k.to_owned(), v.to_vec())).collect();
                        clients.push(Client { version: a.version(), entries });
                    }
                    Op::Sync(n) => {
                        let n = n % clients.len();
                        clients[n].sync(&a);
                        prop_assert!(clients[n].matches(&a));
                    }
                }
                prop_assert!(a.version() >= before);
                prop_assert!(a.len() <= limits.keys_max);
                prop_assert!(a.log.len() <= limits.log_len_max);
                // The owner's per-tick broadcast: deltas while the log covers it.
                if a.since(broadcast.version) != Since::Snapshot {
                    for c in a.changes_after(broadcast.version) {
                        match &c.value {
                            Some(v) => broadcast.entries.insert(c.key.clone(), v.clone()),
                            None => broadcast.entries.remove(&c.key),
                        };
                    }
                    broadcast.version = a.version();
                    prop_assert!(broadcast.matches(&a));
                }
            }
            for c in &mut clients {
                c.sync(&a);
                prop_assert!(c.matches(&a));
                prop_assert_eq!(c.sync(&a), "up-to-date");
            }
            let mut stranger = Client { version: a.version() + 1, ..Client::default() };
            prop_assert_eq!(stranger.sync(&a), "snapshot");
            prop_assert!(stranger.matches(&a));
            let payload: usize = a.entries.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
                + a.log.iter().map(change_bytes).sum::<usize>();
            prop_assert_eq!(payload, a.payload_bytes);
        }
    }
}
