//! Churn for the `soak` scenario, the parts without sockets: which held connection closes next
//! (a seeded generator, so a run is repeatable), which source pair a reconnect binds (a pool
//! that lets each pair rest past TIME_WAIT before it is bound again), when a close the server
//! has not answered is given up (deadlines in start order), and the Close frame a leaving client
//! sends. `worker` drives them with the time and the slots; nothing here reads a clock.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// A masked WebSocket Close with status 1000 (normal closure): FIN|close, MASK|2, the mask key
/// of `PING_FRAME`, then 0x03E8 masked with its first two bytes.
pub static CLOSE_FRAME: [u8; 8] = [0x88, 0x82, 0x5A, 0x17, 0xC3, 0x9E, 0x03 ^ 0x5A, 0xE8 ^ 0x17];

/// How long a source pair rests after its connection closed before it is bound again: past
/// TCP's TIME_WAIT (60 s on Linux) on whichever end closed first, so a reconnect never meets
/// the last connection's ghost (`connect_EADDRNOTAVAIL`, or a SYN answered by a stale ACK).
pub const PAIR_REST: Duration = Duration::from_secs(61);

/// SplitMix64 (Steele, Lea, Flood 2014): 8 bytes of state, good enough to pick victims
/// uniformly, and the same sequence for the same seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (Lemire's multiply-shift; the bias is below n ÷ 2⁶⁴). `n` > 0.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "an empty range has no member");
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// Source pairs `first..first + count` of the `Sources` grid, owned by one worker: fresh ones in
/// order first, then those given back, oldest first, once they have rested `rest`.
#[derive(Debug)]
pub struct PairPool {
    next: u64,
    end: u64,
    rest: Duration,
    /// Pairs given back, with when; in order of `given` (the caller's clock never goes back).
    resting: VecDeque<(u64, Instant)>,
}

impl PairPool {
    pub fn new(first: u64, count: u64, rest: Duration) -> PairPool {
        PairPool { next: first, end: first + count, rest, resting: VecDeque::new() }
    }

    /// A pair to bind at `now`, or None: every pair is in use or still resting.
    pub fn take(&mut self, now: Instant) -> Option<u64> {
        if self.next < self.end {
            self.next += 1;
            return Some(self.next - 1);
        }
        match self.resting.front() {
            Some(&(pair, given)) if now.saturating_duration_since(given) >= self.rest => {
                self.resting.pop_front();
                Some(pair)
            }
            _ => None,
        }
    }

    /// `pair`'s connection closed (or never opened) at `now`.
    pub fn give_back(&mut self, pair: u64, now: Instant) {
        self.resting.push_back((pair, now));
    }

    /// Pairs resting or waiting to be taken again.
    pub fn resting(&self) -> usize {
        self.resting.len()
    }
}

/// Source pairs one run needs: every connection held, plus what `churn_per_s` closes leave
/// resting for `rest`, plus those between close and rest (closing, or dialing again: at most
/// `in_flight_max` of each), with a quarter more so a late turn never finds the pool dry.
pub fn pairs_needed(connections: u64, churn_per_s: f64, rest: Duration, in_flight_max: u64) -> u64 {
    let resting = (churn_per_s * rest.as_secs_f64()).ceil() as u64;
    let base = connections + resting + 2 * in_flight_max;
    base + base / 4
}

/// Closes sent and not yet answered, in start order (every close waits equally long, so the
/// front is always the first due). An entry names the slot and the connection's serial: the
/// slot may hold a newer connection by the time the entry comes due, which then is not touched.
#[derive(Debug, Default)]
pub struct Deadlines {
    queue: VecDeque<Due>,
}

/// One close that may come due.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Due {
    pub at: Instant,
    pub lane: u32,
    pub slot: u32,
    pub serial: u32,
}

impl Deadlines {
    pub fn push(&mut self, due: Due) {
        debug_assert!(self.queue.back().is_none_or(|b| b.at <= due.at), "pushed in start order");
        self.queue.push_back(due);
    }

    /// The next entry due by `now`, if any.
    pub fn pop_due(&mut self, now: Instant) -> Option<Due> {
        if self.queue.front().is_some_and(|d| d.at <= now) {
            return self.queue.pop_front();
        }
        None
    }

    /// How long from `now` until the first entry is due (None: nothing waits).
    pub fn wait(&self, now: Instant) -> Option<Duration> {
        self.queue.front().map(|d| d.at.saturating_duration_since(now))
    }
}

/// Where a run-wide slot number `k` lives when every lane has `files` slots: (lane, slot).
pub fn locate(k: u64, files: u32) -> (usize, u32) {
    ((k / u64::from(files)) as usize, (k % u64::from(files)) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_close_frame_is_a_masked_1000() {
        assert_eq!(CLOSE_FRAME[0], 0x88, "FIN and opcode close");
        assert_eq!(CLOSE_FRAME[1], 0x80 | 2, "masked, two payload bytes");
        let mut payload = CLOSE_FRAME[6..].to_vec();
        let mask: [u8; 4] = CLOSE_FRAME[2..6].try_into().unwrap();
        barrage::wire::frame::apply_mask(&mut payload, mask, 0);
        assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 1000);
    }

    #[test]
    fn rng_is_repeatable_and_spreads_evenly() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        let xs: Vec<u64> = (0..5).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..5).map(|_| b.next_u64()).collect();
        assert_eq!(xs, ys);
        assert_ne!(Rng::new(8).next_u64(), xs[0]);
        let mut r = Rng::new(1);
        let mut buckets = [0u32; 10];
        for _ in 0..100_000 {
            buckets[r.below(10) as usize] += 1;
        }
        // 10,000 expected each; 5 standard deviations is ±475.
        assert!(buckets.iter().all(|&n| (9_500..=10_500).contains(&n)), "{buckets:?}");
        assert_eq!(r.below(1), 0);
    }

    #[test]
    fn fresh_pairs_go_first_then_rested_ones_oldest_first() {
        let t0 = Instant::now();
        let mut p = PairPool::new(100, 2, Duration::from_secs(61));
        assert_eq!(p.take(t0), Some(100));
        assert_eq!(p.take(t0), Some(101));
        assert_eq!(p.take(t0), None, "both in use");
        p.give_back(101, t0 + Duration::from_secs(1));
        p.give_back(100, t0 + Duration::from_secs(2));
        assert_eq!(p.resting(), 2);
        assert_eq!(p.take(t0 + Duration::from_secs(61)), None, "101 has rested 60 s only");
        assert_eq!(p.take(t0 + Duration::from_secs(62)), Some(101));
        assert_eq!(p.take(t0 + Duration::from_secs(62)), None, "100 has rested 60 s only");
        assert_eq!(p.take(t0 + Duration::from_secs(70)), Some(100));
        assert_eq!(p.resting(), 0);
    }

    #[test]
    fn a_pair_is_never_handed_out_twice_while_held() {
        let mut t = Instant::now();
        let mut p = PairPool::new(0, 50, Duration::from_secs(2));
        let mut rng = Rng::new(3);
        let mut held: Vec<u64> = (0..40).map(|_| p.take(t).unwrap()).collect();
        for _ in 0..10_000 {
            t += Duration::from_millis(10);
            if !held.is_empty() {
                let i = rng.below(held.len() as u64) as usize;
                p.give_back(held.swap_remove(i), t);
            }
            if let Some(pair) = p.take(t) {
                assert!(!held.contains(&pair), "{pair} is held");
                held.push(pair);
            }
        }
        // 10 spare pairs, one closing every 10 ms, 2 s of rest: the pool runs dry and refuses
        // rather than handing out a held pair.
        assert!(held.len() < 40, "{}", held.len());
    }

    #[test]
    fn pairs_needed_covers_the_held_the_resting_and_the_in_flight() {
        // 100,000 held, 1,000/s resting 61 s, 4,096 in flight twice: 169,192, and a quarter.
        assert_eq!(pairs_needed(100_000, 1000.0, PAIR_REST, 4096), 169_192 + 42_298);
        assert_eq!(pairs_needed(10, 0.0, PAIR_REST, 0), 12);
    }

    #[test]
    fn deadlines_come_due_in_order_and_say_how_long_to_wait() {
        let t0 = Instant::now();
        let mut d = Deadlines::default();
        assert_eq!(d.wait(t0), None);
        let due = |ms, slot| Due { at: t0 + Duration::from_millis(ms), lane: 0, slot, serial: slot };
        d.push(due(100, 1));
        d.push(due(100, 2));
        d.push(due(250, 3));
        assert_eq!(d.wait(t0), Some(Duration::from_millis(100)));
        assert_eq!(d.pop_due(t0 + Duration::from_millis(99)), None);
        let now = t0 + Duration::from_millis(200);
        assert_eq!(d.pop_due(now).map(|d| d.slot), Some(1));
        assert_eq!(d.pop_due(now).map(|d| d.slot), Some(2));
        assert_eq!(d.pop_due(now), None);
        assert_eq!(d.wait(now), Some(Duration::from_millis(50)));
        assert_eq!(d.pop_due(t0 + Duration::from_millis(250)).map(|d| d.slot), Some(3));
        assert_eq!(d.wait(now), None);
    }

    #[test]
    fn locate_splits_by_lane_size() {
        assert_eq!(locate(0, 100), (0, 0));
        assert_eq!(locate(99, 100), (0, 99));
        assert_eq!(locate(100, 100), (1, 0));
        assert_eq!(locate(250, 100), (2, 50));
    }
}
