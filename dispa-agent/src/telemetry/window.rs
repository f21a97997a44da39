//! Request counts and a coarse latency histogram for the current reporting window; the
//! shipper takes and resets it every few seconds to send the plane a summary (rps, error
//! rate, p99) without the plane scraping agents.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Bucket i holds latencies below 250us * 2^i; the last bucket holds the rest.
const BUCKETS: usize = 20;

#[derive(Default)]
pub struct Window {
    requests: AtomicU64,
    errors: AtomicU64,
    buckets: [AtomicU64; BUCKETS],
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WindowSnapshot {
    pub requests: u64,
    pub errors: u64,
    /// Upper bound of the bucket holding the 99th percentile, in milliseconds.
    pub p99_ms: f64,
}

fn bucket_of(d: Duration) -> usize {
    let quarter_ms = (d.as_micros() / 250) as u64;
    // 0 -> bucket 0; [1,2) -> 1; [2,4) -> 2; ...
    ((u64::BITS - quarter_ms.leading_zeros()) as usize).min(BUCKETS - 1)
}

fn bucket_upper_ms(i: usize) -> f64 {
    0.25 * f64::from(1u32 << i.min(30))
}

impl Window {
    pub fn record(&self, status: u16, d: Duration) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if status >= 500 {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.buckets[bucket_of(d)].fetch_add(1, Ordering::Relaxed);
    }

    /// Returns the window's counts and starts a new window.
    pub fn take(&self) -> WindowSnapshot {
        let requests = self.requests.swap(0, Ordering::Relaxed);
        let errors = self.errors.swap(0, Ordering::Relaxed);
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.swap(0, Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        let target = (total * 99).div_ceil(100);
        let mut seen = 0;
        let mut p99_ms = 0.0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if total > 0 && seen >= target {
                p99_ms = bucket_upper_ms(i);
                break;
            }
        }
        WindowSnapshot {
            requests,
            errors,
            p99_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p99_and_reset() {
        let w = Window::default();
        for _ in 0..99 {
            w.record(200, Duration::from_micros(100));
        }
        w.record(503, Duration::from_millis(100));
        let s = w.take();
        assert_eq!((s.requests, s.errors), (100, 1));
        assert_eq!(s.p99_ms, 0.25);
        w.record(200, Duration::from_millis(3));
        assert_eq!(w.take().p99_ms, 4.0);
        assert_eq!(w.take().requests, 0);
        assert_eq!(bucket_of(Duration::from_secs(3600)), BUCKETS - 1);
    }
}
