//! Token buckets for the rates a room owner and a shard enforce on the way in: a room's upstream
//! messages per second, a connection's sends per second. Sans-IO: the caller passes a monotonic
//! `now_ms` and the rate (from config) on every call, so a bucket is one word of state.
//!
//! The bucket is kept as a GCRA "theoretical arrival time" in thousandths of a token: one token
//! is 1000 units and one millisecond adds `per_s` units, so refills are exact integers. Time only
//! ever enters as a wrapping difference, so neither the clock's origin nor a far jump can
//! overflow.

/// A rate: `per_s` tokens a second, at most `burst` at once. `per_s == 0` means unlimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub per_s: u32,
    /// Tokens a full bucket holds; 0 is taken as 1 (a bucket that never gives a token is a ban,
    /// not a rate).
    pub burst: u32,
}

impl Rate {
    /// No limit.
    pub const UNLIMITED: Rate = Rate { per_s: 0, burst: 0 };
    /// Suggested per-room upstream default: 10× a block a second of 20 messages, so the mixer
    /// still chooses by priority while a flood costs a room at most 200 pushes a second.
    pub const ROOM_UPSTREAM_DEFAULT: Rate = Rate { per_s: 200, burst: 400 };
    /// Suggested per-connection send default: a person types a line or two a second; the burst
    /// lets a quick exchange through.
    pub const CONNECTION_SEND_DEFAULT: Rate = Rate { per_s: 2, burst: 5 };
}

/// Units of one token.
const TOKEN: u64 = 1000;

/// 8 bytes: cheap enough to keep one per room and one per sending connection.
#[derive(Clone, Copy, Debug)]
pub struct TokenBucket {
    /// `now × per_s` (wrapping) at which the bucket will be full again; its lead over now is the
    /// debt, in thousandths of a token, between 0 (full) and `burst × 1000` (empty).
    full_at: u64,
}

impl TokenBucket {
    /// Starts full.
    pub fn new(rate: &Rate, now_ms: u64) -> Self {
        TokenBucket { full_at: units(rate, now_ms) }
    }

    /// Takes one token if there is one.
    ///
    /// Exact while `per_s × (ms between two calls)` stays below 2^63 (292 years at 10^6/s): a
    /// longer gap may read as a clock that went backwards, which leaves the bucket empty once.
    /// A clock that goes backwards leaves it at worst empty; a jump forward fills it to `burst`.
    /// Changing the rate of a live bucket leaves it anywhere between empty and full.
    pub fn try_take(&mut self, rate: &Rate, now_ms: u64) -> bool {
        if rate.per_s == 0 {
            return true;
        }
        let now = units(rate, now_ms);
        let cap = u64::from(rate.burst.max(1)) * TOKEN;
        // Signed distance: negative = full for a while already; over cap = the clock went back.
        let lead = self.full_at.wrapping_sub(now) as i64;
        let debt = u64::try_from(lead).unwrap_or(0).min(cap);
        let taken = debt + TOKEN <= cap;
        let debt = if taken { debt + TOKEN } else { debt };
        self.full_at = now.wrapping_add(debt);
        taken
    }
}

impl TokenBucket {
    /// Whether the bucket is full at `now_ms` (it can be dropped and made anew: a new bucket
    /// starts full). Unlimited rates are always full.
    pub fn is_full(&self, rate: &Rate, now_ms: u64) -> bool {
        rate.per_s == 0 || self.full_at.wrapping_sub(units(rate, now_ms)) as i64 <= 0
    }
}

/// Time in units: a wrapping count, only ever compared as a difference.
fn units(rate: &Rate, now_ms: u64) -> u64 {
    now_ms.wrapping_mul(u64::from(rate.per_s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const _: () = assert!(std::mem::size_of::<TokenBucket>() <= 8);

    #[test]
    fn a_bucket_knows_when_it_is_full_again() {
        let rate = Rate { per_s: 2, burst: 2 };
        let mut b = TokenBucket::new(&rate, 0);
        assert!(b.is_full(&rate, 0));
        assert!(b.try_take(&rate, 0));
        assert!(!b.is_full(&rate, 0) && !b.is_full(&rate, 499));
        assert!(b.is_full(&rate, 500), "one token back after half a second");
        assert!(TokenBucket::new(&Rate::UNLIMITED, 0).is_full(&Rate::UNLIMITED, 0));
    }

    /// How many of `tries` takes at `now_ms` succeed.
    fn take_n(b: &mut TokenBucket, rate: &Rate, now_ms: u64, tries: u32) -> u32 {
        (0..tries).map(|_| b.try_take(rate, now_ms) as u32).sum()
    }

    #[test]
    fn is_one_word() {
        assert!(std::mem::size_of::<TokenBucket>() <= 8);
    }

    #[test]
    fn burst_then_refill_at_rate() {
        let rate = Rate { per_s: 10, burst: 5 };
        let mut b = TokenBucket::new(&rate, 1_000);
        assert_eq!(take_n(&mut b, &rate, 1_000, 20), 5, "starts full");
        assert_eq!(take_n(&mut b, &rate, 1_099, 5), 0, "a token takes 100 ms");
        assert_eq!(take_n(&mut b, &rate, 1_100, 5), 1);
        assert_eq!(take_n(&mut b, &rate, 1_350, 5), 2, "fractions carry over: 250 ms");
        assert_eq!(take_n(&mut b, &rate, 1_400, 5), 1, "the half token from before completes");
        assert_eq!(take_n(&mut b, &rate, 11_400, 50), 5, "refills to burst, not beyond");
    }

    #[test]
    fn fractional_rates_are_exact() {
        // 3 a second: one token every 333⅓ ms, exactly 3 000 over 1 000 s after the burst.
        // (With burst 1 a caller that asks once a millisecond would lose the ⅔ ms of refill
        // that overflows the full bucket, as any bucket of one token does.)
        let rate = Rate { per_s: 3, burst: 2 };
        let mut b = TokenBucket::new(&rate, 0);
        let taken: u32 = (0..=1_000_000).map(|t| b.try_take(&rate, t) as u32).sum();
        assert_eq!(taken, 2 + 3_000);
    }

    #[test]
    fn zero_rate_is_unlimited_and_zero_burst_is_one() {
        let mut b = TokenBucket::new(&Rate::UNLIMITED, 0);
        assert_eq!(take_n(&mut b, &Rate::UNLIMITED, 0, 1000), 1000);
        let rate = Rate { per_s: 1, burst: 0 };
        let mut b = TokenBucket::new(&rate, 0);
        assert_eq!(take_n(&mut b, &rate, 0, 3), 1);
        assert_eq!(take_n(&mut b, &rate, 5_000, 3), 1);
    }

    #[test]
    fn clock_going_back_or_jumping_neither_panics_nor_gives_extra() {
        let rate = Rate { per_s: 1000, burst: 10 };
        let mut b = TokenBucket::new(&rate, 1_000_000);
        assert_eq!(take_n(&mut b, &rate, 1_000_000, 10), 10);
        assert_eq!(take_n(&mut b, &rate, 0, 10), 0, "going back refills nothing");
        assert_eq!(take_n(&mut b, &rate, 1, 10), 1, "and the rate resumes from there");
        assert_eq!(take_n(&mut b, &rate, 1 << 40, 100), 10, "a jump of 35 years refills to burst");
        assert_eq!(take_n(&mut b, &rate, 0, 100), 0, "and back: empty");
        let huge = Rate { per_s: u32::MAX, burst: u32::MAX };
        let mut b = TokenBucket::new(&huge, u64::MAX);
        assert!(b.try_take(&huge, u64::MAX));
        for t in [3, u64::MAX, 1 << 63, 0] {
            let _ = b.try_take(&huge, t); // wraps without a panic, whatever it answers
        }
    }

    proptest! {
        /// Over any span of time T between two calls, the tokens taken are at most
        /// burst + per_s × T / 1000 (exact: no rounding slack needed).
        #[test]
        fn never_more_than_burst_plus_rate(
            per_s in 1u32..5_000,
            burst in 1u32..50,
            steps in prop::collection::vec((0u64..300, 0u32..6), 1..200),
        ) {
            let rate = Rate { per_s, burst };
            let mut now = 12_345u64;
            let mut b = TokenBucket::new(&rate, now);
            let mut calls: Vec<(u64, u32)> = Vec::new();
            for (dt, tries) in steps {
                now += dt;
                calls.push((now, take_n(&mut b, &rate, now, tries)));
            }
            for i in 0..calls.len() {
                let mut taken = 0u64;
                for &(t, n) in &calls[i..] {
                    taken += u64::from(n);
                    let bound = u64::from(burst) + u64::from(per_s) * (t - calls[i].0) / 1000;
                    prop_assert!(taken <= bound, "{taken} > {bound} over {} ms", t - calls[i].0);
                }
            }
        }

        /// Requests faster than the rate: the long-run rate is per_s (within the burst).
        #[test]
        fn saturated_rate_is_per_s(per_s in 1u32..2_000, burst in 1u32..50, gap_ms in 1u64..20, span_s in 10u64..60) {
            // A bucket must hold one step's refill, or a caller that asks only every gap_ms
            // loses the overflow (as with any bucket).
            let burst = burst.max(u32::try_from((u64::from(per_s) * gap_ms).div_ceil(1000) + 1).unwrap());
            let rate = Rate { per_s, burst };
            let mut b = TokenBucket::new(&rate, 0);
            let ask = u32::try_from(u64::from(per_s) * gap_ms / 1000 + 2).unwrap();
            let mut taken = 0u64;
            let mut now = 0;
            while now <= span_s * 1000 {
                taken += u64::from(take_n(&mut b, &rate, now, ask));
                now += gap_ms;
            }
            let end = now - gap_ms;
            let earned = u64::from(per_s) * end / 1000;
            prop_assert!(taken <= u64::from(burst) + earned);
            prop_assert!(taken + 1 >= u64::from(burst) + earned, "{taken} < {} + {earned}", burst);
        }

        /// Any clock, any rate: no panic, and never more than burst at one instant.
        #[test]
        fn any_clock_is_safe(per_s in any::<u32>(), burst in any::<u32>(), times in prop::collection::vec(any::<u64>(), 1..50)) {
            let rate = Rate { per_s, burst };
            let mut b = TokenBucket::new(&rate, times[0]);
            for t in times {
                let n = take_n(&mut b, &rate, t, 3);
                prop_assert!(per_s == 0 || n <= burst.max(1));
            }
        }
    }
}
