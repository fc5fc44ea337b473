//! A room's moderation state: muted users (cannot send), banned users (kicked and refused on
//! rejoin) and whitelisted users (their messages ride the whitelist bucket; never auto-kicked),
//! each until a time or until lifted. The room's owner applies changes from the API and every
//! shard consults a replica on join and send. Sans-IO: time comes in as `now_ms` (Unix ms).
//!
//! Memory bound per room: 3 lists × `entries_max` entries × about 250 bytes (user id up to
//! `USER_BYTES_MAX` = 128 bytes on the heap, its 24-byte `String`, a 16-byte expiry, B-tree node
//! overhead under 100 bytes per entry) ≈ 750 KB at the default `entries_max` of 1000.

use std::collections::BTreeMap;

/// Longest user id, in bytes (as in a token's subject).
pub const USER_BYTES_MAX: usize = 128;

/// Bounds of one room's moderation lists.
#[derive(Clone, Copy, Debug)]
pub struct ModerationLimits {
    /// Entries per list per room. Costs about 250 bytes each (see the module comment).
    pub entries_max: usize,
}

impl Default for ModerationLimits {
    /// 1000: room moderators mute and ban by hand, a few at a time; a longer list is an
    /// account-level matter for the business server, not per room.
    fn default() -> ModerationLimits {
        ModerationLimits { entries_max: 1000 }
    }
}

/// Which list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum List {
    Mute,
    Ban,
    Whitelist,
}

/// Why an entry was not added.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModerationError {
    /// The list holds `entries_max` unexpired entries.
    Full,
    /// The user id is longer than `USER_BYTES_MAX` bytes.
    UserTooLong,
    EmptyUser,
    /// The owner could not tell every shard now (the way to one is congested): try again.
    Busy,
    /// The rooms are being handed to a new process (an upgrade): retry, it will take it.
    HandedOver,
}

impl ModerationError {
    /// Human text for errors in the API.
    pub fn message(self) -> &'static str {
        match self {
            ModerationError::Full => "the room's moderation list is full",
            ModerationError::UserTooLong => "user id is longer than 128 bytes",
            ModerationError::EmptyUser => "user id is empty",
            ModerationError::Busy => "the gateway is busy: try again",
            ModerationError::HandedOver => "the gateway is handing its rooms to a new process: retry",
        }
    }

    /// The HTTP status of the refusal: 503 when trying again may work, else 409.
    pub fn status(self) -> u16 {
        match self {
            ModerationError::Busy | ModerationError::HandedOver => 503,
            ModerationError::Full | ModerationError::UserTooLong | ModerationError::EmptyUser => 409,
        }
    }
}

/// One list entry as reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub user: String,
    /// Until when an entry holds: Unix ms (exclusive), or None = until lifted.
    pub until_ms: Option<i64>,
}

/// The three lists of one room: user → until (exclusive Unix ms; None = until lifted).
/// Expired entries count as absent at once and are freed by `sweep` (or by an `add` to a
/// full list).
#[derive(Debug, Default)]
pub struct Moderation {
    mute: BTreeMap<String, Option<i64>>,
    ban: BTreeMap<String, Option<i64>>,
    whitelist: BTreeMap<String, Option<i64>>,
}

impl Moderation {
    /// Adds or extends an entry: the later expiry wins and None (forever) beats any time, so a
    /// shorter `until_ms` leaves a longer entry alone (`remove` first to shorten). An entry that
    /// would already be over at `now_ms` changes nothing. A full list is swept at `now_ms` first.
    pub fn add(
        &mut self,
        list: List,
        user: &str,
        until_ms: Option<i64>,
        now_ms: i64,
        limits: &ModerationLimits,
    ) -> Result<(), ModerationError> {
        check_user(user)?;
        if !holds(until_ms, now_ms) {
            return Ok(());
        }
        let map = self.map_mut(list);
        if let Some(old) = map.get_mut(user) {
            // An expired old entry is earlier than `until_ms`, so the max replaces it.
            *old = later(*old, until_ms);
            return Ok(());
        }
        if map.len() >= limits.entries_max {
            sweep_map(map, now_ms);
            if map.len() >= limits.entries_max {
                return Err(ModerationError::Full);
            }
        }
        map.insert(user.to_owned(), until_ms);
        Ok(())
    }

    /// Lifts an entry; false if absent. (An expired entry not yet swept is removed and reports
    /// true: there is no `now_ms` here to tell.)
    pub fn remove(&mut self, list: List, user: &str) -> bool {
        self.map_mut(list).remove(user).is_some()
    }

    /// Whether an unexpired entry exists at `now_ms`.
    pub fn contains(&self, list: List, user: &str, now_ms: i64) -> bool {
        self.map(list).get(user).is_some_and(|&until_ms| holds(until_ms, now_ms))
    }

    /// The expiry of an unexpired entry (Some(None): until lifted); None when absent.
    pub fn until(&self, list: List, user: &str, now_ms: i64) -> Option<Option<i64>> {
        self.map(list).get(user).copied().filter(|&until_ms| holds(until_ms, now_ms))
    }

    /// Unexpired entries of a list, sorted by user.
    pub fn entries(&self, list: List, now_ms: i64) -> Vec<Entry> {
        self.map(list)
            .iter()
            .filter(|&(_, &until_ms)| holds(until_ms, now_ms))
            .map(|(user, &until_ms)| Entry { user: user.clone(), until_ms })
            .collect()
    }

    /// Drops expired entries of every list (call now and then: it walks them all); returns how
    /// many.
    pub fn sweep(&mut self, now_ms: i64) -> usize {
        sweep_map(&mut self.mute, now_ms) + sweep_map(&mut self.ban, now_ms) + sweep_map(&mut self.whitelist, now_ms)
    }

    /// No entries stored (expired ones count until swept), so the room's state can be dropped.
    pub fn is_empty(&self) -> bool {
        self.mute.is_empty() && self.ban.is_empty() && self.whitelist.is_empty()
    }

    fn map(&self, list: List) -> &BTreeMap<String, Option<i64>> {
        match list {
            List::Mute => &self.mute,
            List::Ban => &self.ban,
            List::Whitelist => &self.whitelist,
        }
    }

    fn map_mut(&mut self, list: List) -> &mut BTreeMap<String, Option<i64>> {
        match list {
            List::Mute => &mut self.mute,
            List::Ban => &mut self.ban,
            List::Whitelist => &mut self.whitelist,
        }
    }
}

fn check_user(user: &str) -> Result<(), ModerationError> {
    if user.is_empty() {
        return Err(ModerationError::EmptyUser);
    }
    if user.len() > USER_BYTES_MAX {
        return Err(ModerationError::UserTooLong);
    }
    Ok(())
}

/// Whether an entry lasting until `until_ms` (exclusive) holds at `now_ms`.
fn holds(until_ms: Option<i64>, now_ms: i64) -> bool {
    until_ms.is_none_or(|until_ms| now_ms < until_ms)
}

/// The later of two expiries; None (forever) is the latest.
fn later(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        _ => None,
    }
}

fn sweep_map(map: &mut BTreeMap<String, Option<i64>>, now_ms: i64) -> usize {
    let before = map.len();
    map.retain(|_, &mut until_ms| holds(until_ms, now_ms));
    before - map.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMITS: ModerationLimits = ModerationLimits { entries_max: 3 };
    const LISTS: [List; 3] = [List::Mute, List::Ban, List::Whitelist];

    fn users(m: &Moderation, list: List, now_ms: i64) -> Vec<String> {
        m.entries(list, now_ms).into_iter().map(|e| e.user).collect()
    }

    #[test]
    fn lists_are_separate() {
        for list in LISTS {
            let mut m = Moderation::default();
            m.add(list, "bob", None, 0, &LIMITS).unwrap();
            m.add(list, "amy", Some(50), 0, &LIMITS).unwrap();
            for other in LISTS.into_iter().filter(|&l| l != list) {
                assert!(!m.contains(other, "bob", 0), "{list:?} leaks into {other:?}");
            }
            assert!(m.contains(list, "bob", 0));
            let expect =
                vec![Entry { user: "amy".into(), until_ms: Some(50) }, Entry { user: "bob".into(), until_ms: None }];
            assert_eq!(m.entries(list, 0), expect, "sorted by user");
            assert!(m.remove(list, "bob"));
            assert!(!m.remove(list, "bob"), "already lifted");
            assert!(!m.contains(list, "bob", 0));
        }
    }

    #[test]
    fn until_is_exclusive() {
        let mut m = Moderation::default();
        m.add(List::Mute, "u", Some(1_000), 0, &LIMITS).unwrap();
        assert!(m.contains(List::Mute, "u", 999));
        assert!(!m.contains(List::Mute, "u", 1_000));
        assert!(users(&m, List::Mute, 1_000).is_empty(), "expired before any sweep");
        assert_eq!(m.sweep(999), 0);
        assert_eq!(m.sweep(1_000), 1);
        assert!(m.is_empty());
    }

    #[test]
    fn later_expiry_wins() {
        let mut m = Moderation::default();
        m.add(List::Ban, "u", Some(100), 0, &LIMITS).unwrap();
        m.add(List::Ban, "u", Some(200), 0, &LIMITS).unwrap(); // extend
        m.add(List::Ban, "u", Some(150), 0, &LIMITS).unwrap(); // shorter: ignored
        assert_eq!(m.entries(List::Ban, 0), vec![Entry { user: "u".into(), until_ms: Some(200) }]);
        assert!(m.contains(List::Ban, "u", 199));
        m.add(List::Ban, "u", None, 0, &LIMITS).unwrap(); // forever beats any time
        m.add(List::Ban, "u", Some(300), 0, &LIMITS).unwrap();
        assert!(m.contains(List::Ban, "u", i64::MAX));
        assert_eq!(m.sweep(i64::MAX), 0);
        assert!(m.remove(List::Ban, "u"), "only lifting ends forever");
        assert!(m.is_empty());
    }

    #[test]
    fn re_adding_after_expiry_starts_afresh() {
        let mut m = Moderation::default();
        m.add(List::Mute, "u", Some(100), 0, &LIMITS).unwrap();
        m.add(List::Mute, "u", Some(50), 200, &LIMITS).unwrap(); // already over: no-op
        assert!(!m.contains(List::Mute, "u", 200));
        m.add(List::Mute, "u", Some(300), 200, &LIMITS).unwrap();
        assert!(m.contains(List::Mute, "u", 299));
    }

    #[test]
    fn full_list_refuses_until_something_expires() {
        let mut m = Moderation::default();
        m.add(List::Mute, "a", Some(100), 0, &LIMITS).unwrap();
        m.add(List::Mute, "b", None, 0, &LIMITS).unwrap();
        m.add(List::Mute, "c", None, 0, &LIMITS).unwrap();
        assert_eq!(m.add(List::Mute, "d", None, 99, &LIMITS), Err(ModerationError::Full));
        m.add(List::Mute, "c", Some(500), 99, &LIMITS).unwrap(); // an existing user is no new entry
        m.add(List::Ban, "d", None, 99, &LIMITS).unwrap(); // other lists have their own room
        m.add(List::Mute, "d", None, 100, &LIMITS).unwrap(); // "a" expired: swept to make room
        assert_eq!(users(&m, List::Mute, 100), ["b", "c", "d"]);
        assert_eq!(m.sweep(100), 0, "the add swept already");
    }

    #[test]
    fn user_ids_are_checked() {
        let mut m = Moderation::default();
        assert_eq!(m.add(List::Ban, "", None, 0, &LIMITS), Err(ModerationError::EmptyUser));
        let long = "x".repeat(USER_BYTES_MAX + 1);
        assert_eq!(m.add(List::Ban, &long, None, 0, &LIMITS), Err(ModerationError::UserTooLong));
        let longest = "é".repeat(USER_BYTES_MAX / 2); // 128 bytes
        m.add(List::Ban, &longest, None, 0, &LIMITS).unwrap();
        assert!(m.contains(List::Ban, &longest, 0));
        assert!(!m.contains(List::Ban, &long, 0));
        assert!(!ModerationError::Full.message().is_empty());
    }

    #[derive(Clone, Debug)]
    enum Op {
        Add(List, u8, Option<i64>, i64),
        Remove(List, u8),
        Sweep(i64),
    }

    fn arb_list() -> impl Strategy<Value = List> {
        prop_oneof![Just(List::Mute), Just(List::Ban), Just(List::Whitelist)]
    }

    fn arb_op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (arb_list(), 0u8..5, prop::option::of(0i64..100), 0i64..100).prop_map(|(l, u, t, n)| Op::Add(l, u, t, n)),
            1 => (arb_list(), 0u8..5).prop_map(|(l, u)| Op::Remove(l, u)),
            1 => (0i64..100).prop_map(Op::Sweep),
        ]
    }

    /// The obvious model: a flat list of (list, user, until) scanned every time.
    #[derive(Default)]
    struct Model(Vec<(List, String, Option<i64>)>);

    impl Model {
        fn add(&mut self, list: List, user: &str, until_ms: Option<i64>, now_ms: i64) -> Result<(), ModerationError> {
            if until_ms.is_some_and(|u| u <= now_ms) {
                return Ok(());
            }
            if let Some(e) = self.0.iter_mut().find(|e| e.0 == list && e.1 == user) {
                e.2 = if e.2.is_none() || until_ms.is_none() { None } else { e.2.max(until_ms) };
                return Ok(());
            }
            if self.0.iter().filter(|e| e.0 == list).count() >= LIMITS.entries_max {
                self.0.retain(|e| e.0 != list || e.2.is_none_or(|u| now_ms < u));
                if self.0.iter().filter(|e| e.0 == list).count() >= LIMITS.entries_max {
                    return Err(ModerationError::Full);
                }
            }
            self.0.push((list, user.to_owned(), until_ms));
            Ok(())
        }

        fn contains(&self, list: List, user: &str, now_ms: i64) -> bool {
            self.0.iter().any(|e| e.0 == list && e.1 == user && e.2.is_none_or(|u| now_ms < u))
        }
    }

    proptest! {
        /// After any adds, removes and sweeps at any times (forward and back), `contains` and
        /// `entries` agree with the model at every time probed.
        #[test]
        fn agrees_with_a_naive_model(ops in prop::collection::vec(arb_op(), 1..200), probes in prop::collection::vec(0i64..120, 4)) {
            let (mut m, mut model) = (Moderation::default(), Model::default());
            for op in ops {
                match op {
                    Op::Add(list, u, until_ms, now_ms) => {
                        let user = format!("user{u}");
                        prop_assert_eq!(m.add(list, &user, until_ms, now_ms, &LIMITS), model.add(list, &user, until_ms, now_ms));
                    }
                    Op::Remove(list, u) => {
                        let user = format!("user{u}");
                        let had = model.0.len();
                        model.0.retain(|e| e.0 != list || e.1 != user);
                        prop_assert_eq!(m.remove(list, &user), had != model.0.len());
                    }
                    Op::Sweep(now_ms) => {
                        let had = model.0.len();
                        model.0.retain(|e| e.2.is_none_or(|u| now_ms < u));
                        prop_assert_eq!(m.sweep(now_ms), had - model.0.len());
                    }
                }
                for (&now_ms, list) in probes.iter().zip(LISTS.iter().cycle()) {
                    for u in 0..5 {
                        let user = format!("user{u}");
                        prop_assert_eq!(m.contains(*list, &user, now_ms), model.contains(*list, &user, now_ms));
                    }
                    let mut expect: Vec<_> = model.0.iter().filter(|e| e.0 == *list && e.2.is_none_or(|u| now_ms < u)).map(|e| e.1.clone()).collect();
                    expect.sort();
                    prop_assert_eq!(users(&m, *list, now_ms), expect);
                }
                prop_assert_eq!(m.is_empty(), model.0.is_empty());
            }
        }
    }
}
