//! Token-bucket rate limits (governor's GCRA), keyed per client IP, API key, header value or
//! route, with a bounded number of keys.

use std::num::NonZeroU32;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dispa_proto::config::model::RateLimit;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

/// Most keys one limit tracks. Past it, idle keys are dropped; if none are idle, new keys
/// share one overflow bucket until some are.
pub const MAX_KEYS: usize = 10_000;
/// How often a full table may be swept for idle keys.
const SWEEP_EVERY: Duration = Duration::from_millis(100);
const OVERFLOW_KEY: &str = "\u{0}overflow";

/// Why a request was limited: when to try again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limited {
    pub retry_after: Duration,
}

pub struct RateGate {
    pub rule: RateLimit,
    limiter: DefaultKeyedRateLimiter<String>,
    clock: DefaultClock,
    last_sweep: Mutex<Instant>,
    /// Requests that fell into the overflow bucket because the key table was full.
    pub overflowed: AtomicU64,
}

impl std::fmt::Debug for RateGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateGate")
            .field("rule", &self.rule)
            .field("keys", &self.limiter.len())
            .finish()
    }
}

impl RateGate {
    pub fn new(rule: RateLimit) -> Self {
        let per_second = NonZeroU32::new(rule.per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(rule.burst).unwrap_or(per_second);
        let quota = Quota::per_second(per_second).allow_burst(burst);
        Self {
            rule,
            limiter: DefaultKeyedRateLimiter::hashmap(quota),
            clock: DefaultClock::default(),
            last_sweep: Mutex::new(Instant::now()),
            overflowed: AtomicU64::new(0),
        }
    }

    /// Keys currently tracked.
    pub fn keys(&self) -> usize {
        self.limiter.len()
    }

    /// Takes one token for `key`, or says how long until one is free.
    pub fn check(&self, key: &str) -> Result<(), Limited> {
        let key = self.admit_key(key);
        match self.limiter.check_key(&key) {
            Ok(()) => Ok(()),
            Err(not_until) => Err(Limited {
                retry_after: not_until.wait_time_from(self.clock.now()),
            }),
        }
    }

    /// The key to count under: itself, or the overflow bucket when the table is full of keys
    /// that are all still active.
    fn admit_key(&self, key: &str) -> String {
        if self.limiter.len() < MAX_KEYS {
            return key.to_string();
        }
        let mut last = self.last_sweep.lock().unwrap_or_else(|p| p.into_inner());
        if last.elapsed() >= SWEEP_EVERY {
            *last = Instant::now();
            // Drops every key whose bucket has refilled: they would start fresh anyway.
            self.limiter.retain_recent();
        }
        drop(last);
        if self.limiter.len() < MAX_KEYS {
            key.to_string()
        } else {
            self.overflowed.fetch_add(1, Ordering::Relaxed);
            OVERFLOW_KEY.to_string()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dispa_proto::config::model::RateKey;

    fn gate(per_second: u32, burst: u32) -> RateGate {
        RateGate::new(RateLimit {
            per_second,
            burst,
            key: RateKey::ClientIp,
        })
    }

    #[test]
    fn burst_then_limited_per_key() {
        let g = gate(1, 3);
        for _ in 0..3 {
            assert!(g.check("a").is_ok());
        }
        let l = g.check("a").unwrap_err();
        assert!(l.retry_after > Duration::ZERO && l.retry_after <= Duration::from_secs(1));
        assert!(g.check("b").is_ok(), "other keys have their own bucket");
    }

    #[test]
    fn key_table_is_bounded() {
        let g = gate(1, 1);
        for i in 0..(MAX_KEYS * 3) {
            let _ = g.check(&format!("k{i}"));
        }
        assert!(g.keys() <= MAX_KEYS + 1, "{} keys", g.keys());
        assert!(g.overflowed.load(Ordering::Relaxed) > 0);
    }
}
