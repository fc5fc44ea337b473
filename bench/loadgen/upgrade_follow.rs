//! One `upgrade` client's bookkeeping: the README's client algorithm ("Client algorithm:
//! duplicates, gaps, resuming") without sockets or clocks. Per client the last seq shown of its
//! room: a message at or below it is a duplicate (dropped); one past `last + 1` is a gap (the
//! seqs between are for the short poll; the message is shown and the gap marked); a `reconnect`
//! frame says how long to wait before coming back, resuming `after=last`; an end without one is
//! unexpected and comes back after a backoff. 16 bytes a client; `upgrade_recv` drives it and
//! counts what it says.
#![forbid(unsafe_code)]

use std::time::Duration;

/// The first backoff after an unexpected end, doubled per end in a row up to the most.
pub const BACKOFF_MIN_MS: u32 = 100;
pub const BACKOFF_MAX_MS: u32 = 5_000;

/// One client.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Follower {
    /// The last seq shown (0: none yet).
    last: u64,
    /// The delay of the `reconnect` frame received on this connection.
    delay_ms: u32,
    /// A `reconnect` frame came: the close that follows is expected.
    told: bool,
    /// Unexpected ends since the last join.
    failures: u8,
}

/// What one message was to the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// Before the run's baseline was known (an earlier run's history): ignored.
    Stale,
    /// At or below the last seq shown: dropped.
    Duplicate,
    /// The next one: shown.
    Next,
    /// Shown, but `missing` seqs after `after` never came: asked of the short poll.
    Gap { after: u64, missing: u64 },
}

impl Follower {
    /// The last seq shown, or the room's baseline if higher (`floor`: the room's last seq when
    /// the run began; 0 while unknown).
    pub fn last(&self, floor: u64) -> u64 {
        self.last.max(floor)
    }

    /// A block message with `seq` in the client's room.
    pub fn message(&mut self, seq: u64, floor: u64) -> Seen {
        if floor == 0 {
            return Seen::Stale;
        }
        let last = self.last(floor);
        if seq <= last {
            self.last = last;
            return Seen::Duplicate;
        }
        self.last = seq;
        match seq - last - 1 {
            0 => Seen::Next,
            missing => Seen::Gap { after: last, missing },
        }
    }

    /// Where a new connection resumes (`after=`), if anywhere.
    pub fn resume_after(&self, floor: u64) -> Option<u64> {
        Some(self.last(floor)).filter(|&l| l > 0)
    }

    /// The welcome came: the connection works, the backoff starts over.
    pub fn joined(&mut self) {
        self.failures = 0;
    }

    /// A `reconnect` frame: the server closes next, and wants the client back after `delay_ms`.
    pub fn told_to_reconnect(&mut self, delay_ms: u32) {
        self.told = true;
        self.delay_ms = delay_ms;
    }

    /// The connection ended: whether that was announced, and how long to wait before the next.
    /// `salt` (the client's index) spreads the backoffs of clients that fail together.
    pub fn ended(&mut self, salt: u64) -> (bool, Duration) {
        if std::mem::take(&mut self.told) {
            return (true, Duration::from_millis(u64::from(self.delay_ms)));
        }
        let base = BACKOFF_MIN_MS.saturating_mul(1 << self.failures.min(16)).min(BACKOFF_MAX_MS);
        self.failures = self.failures.saturating_add(1);
        // Up to half the base again, by client: a wave of failures does not come back as one.
        let jitter = (salt.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) % u64::from(base / 2 + 1);
        (false, Duration::from_millis(u64::from(base) + jitter))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: u64 = 1_882_449_317_462_016;

    #[test]
    fn next_duplicates_and_gaps_against_the_last_shown() {
        let mut f = Follower::default();
        assert_eq!(f.message(BASE - 3, 0), Seen::Stale, "no baseline yet");
        assert_eq!(f.last(0), 0);
        assert_eq!(f.message(BASE + 1, BASE), Seen::Next);
        assert_eq!(f.message(BASE + 2, BASE), Seen::Next);
        assert_eq!(f.message(BASE + 2, BASE), Seen::Duplicate);
        assert_eq!(f.message(BASE + 1, BASE), Seen::Duplicate);
        assert_eq!(f.message(BASE, BASE), Seen::Duplicate, "the baseline itself was never ours");
        assert_eq!(f.message(BASE + 6, BASE), Seen::Gap { after: BASE + 2, missing: 3 });
        assert_eq!(f.last(BASE), BASE + 6);
        assert_eq!(f.message(BASE + 7, BASE), Seen::Next);
    }

    #[test]
    fn the_first_message_after_the_baseline_is_checked_against_it() {
        let mut f = Follower::default();
        assert_eq!(f.resume_after(0), None);
        assert_eq!(f.resume_after(BASE), Some(BASE), "never shown anything: resume from the baseline");
        assert_eq!(f.message(BASE + 3, BASE), Seen::Gap { after: BASE, missing: 2 });
        assert_eq!(f.resume_after(BASE), Some(BASE + 3));
    }

    #[test]
    fn a_resume_backfill_repeating_what_was_shown_is_all_duplicates_and_no_gap() {
        let mut f = Follower::default();
        for s in 1..=10 {
            assert_eq!(f.message(BASE + s, BASE), Seen::Next);
        }
        f.told_to_reconnect(1234);
        assert_eq!(f.ended(7), (true, Duration::from_millis(1234)));
        assert_eq!(f.resume_after(BASE), Some(BASE + 10));
        // A backfill from an older cursor: the first ten again, then the new ones.
        let seen: Vec<Seen> = (5..=14).map(|s| f.message(BASE + s, BASE)).collect();
        assert_eq!(seen.iter().filter(|s| **s == Seen::Duplicate).count(), 6);
        assert_eq!(seen.iter().filter(|s| **s == Seen::Next).count(), 4);
    }

    #[test]
    fn an_announced_close_waits_the_delay_once_and_unannounced_ones_back_off() {
        let mut f = Follower::default();
        f.told_to_reconnect(500);
        assert_eq!(f.ended(1), (true, Duration::from_millis(500)));
        // The next end was not announced: backoff, doubling, capped, with at most half again.
        let mut last = Duration::ZERO;
        for k in 0..10u32 {
            let (expected, wait) = f.ended(1);
            assert!(!expected);
            let base = (BACKOFF_MIN_MS << k).min(BACKOFF_MAX_MS);
            let ms = wait.as_millis() as u32;
            assert!((base..=base + base / 2).contains(&ms), "end {k}: {ms} ms for base {base}");
            assert!(wait >= last || base == BACKOFF_MAX_MS);
            last = wait;
        }
        f.joined();
        let (_, wait) = f.ended(1);
        assert!(wait < Duration::from_millis(u64::from(BACKOFF_MIN_MS) * 2), "a join starts the backoff over");
    }

    #[test]
    fn backoffs_of_clients_failing_together_spread() {
        let waits: std::collections::BTreeSet<Duration> =
            (0..100u64).map(|salt| Follower::default().ended(salt).1).collect();
        assert!(waits.len() > 20, "{}", waits.len());
    }

    #[test]
    fn a_client_costs_sixteen_bytes() {
        assert_eq!(std::mem::size_of::<Follower>(), 16);
    }
}
