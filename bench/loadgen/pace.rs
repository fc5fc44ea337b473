//! How fast new connections start: a token bucket the loop asks every turn ("how many may I
//! open now?"). Time comes in as an argument, so tests drive it with made-up instants.
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

/// `rate_per_s` tokens a second, at most `burst` saved up. Starts empty: the first tokens
/// arrive one interval after `start`, so a ramp never opens with a spike.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate_per_s: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate_per_s: f64, burst: u32, start: Instant) -> TokenBucket {
        assert!(rate_per_s > 0.0, "the rate is validated as positive");
        TokenBucket { rate_per_s, burst: f64::from(burst.max(1)), tokens: 0.0, last: start }
    }

    /// A burst of about 10 ms at `rate_per_s` (at least one token): enough for a loop turn
    /// that wakes late, small enough that a slow accept queue sees a smooth rate.
    pub fn default_burst(rate_per_s: f64) -> u32 {
        (rate_per_s / 100.0).clamp(1.0, 65536.0) as u32
    }

    /// Takes up to `want` whole tokens at `now`; returns how many were taken.
    pub fn take(&mut self, now: Instant, want: u64) -> u64 {
        self.refill(now);
        let n = (self.tokens.floor() as u64).min(want);
        self.tokens -= n as f64;
        n
    }

    /// How long from `now` until the next whole token (zero if one is there).
    pub fn wait(&mut self, now: Instant) -> Duration {
        self.refill(now);
        if self.tokens >= 1.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64((1.0 - self.tokens) / self.rate_per_s)
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate_per_s).min(self.burst);
        self.last = now.max(self.last);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_is_kept_over_many_small_turns() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000.0, 10, t0);
        let mut taken = 0;
        for ms in 1..=2000u64 {
            taken += b.take(t0 + Duration::from_micros(ms * 500), u64::MAX);
        }
        // One second at 1000/s, give or take the fraction still in the bucket.
        assert!((999..=1000).contains(&taken), "{taken}");
    }

    #[test]
    fn burst_caps_what_a_late_turn_gets_and_want_caps_the_take() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000.0, 10, t0);
        assert_eq!(b.take(t0 + Duration::from_secs(5), u64::MAX), 10);
        assert_eq!(b.take(t0 + Duration::from_secs(5), u64::MAX), 0);
        assert_eq!(b.take(t0 + Duration::from_secs(6), 3), 3);
        assert_eq!(b.take(t0 + Duration::from_secs(6), 100), 7);
    }

    #[test]
    fn starts_empty_and_says_how_long_to_wait() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100.0, 5, t0);
        assert_eq!(b.take(t0, 1), 0);
        let w = b.wait(t0);
        assert!(w > Duration::from_micros(9_900) && w <= Duration::from_millis(10), "{w:?}");
        assert_eq!(b.wait(t0 + Duration::from_millis(10)), Duration::ZERO);
        assert_eq!(b.take(t0 + Duration::from_millis(10), 9), 1);
    }

    #[test]
    fn time_going_backwards_adds_nothing() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000.0, 100, t0 + Duration::from_secs(1));
        assert_eq!(b.take(t0, 100), 0);
        assert_eq!(b.take(t0 + Duration::from_millis(1010), 100), 10);
    }

    #[test]
    fn default_burst_is_ten_milliseconds() {
        assert_eq!(TokenBucket::default_burst(30_000.0), 300);
        assert_eq!(TokenBucket::default_burst(5.0), 1);
    }
}
