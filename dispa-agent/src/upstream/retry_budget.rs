//! A retry budget per upstream: retries may add at most a fifth to the requests sent, so a
//! failing upstream is not hit by a retry storm. Each request earns one credit, a retry costs
//! five; a small reserve lets a quiet upstream still retry.

use std::sync::atomic::{AtomicI64, Ordering};

const COST: i64 = 5;
const RESERVE: i64 = 10 * COST;
const CAP: i64 = 1000 * COST;

#[derive(Debug)]
pub struct RetryBudget {
    credits: AtomicI64,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            credits: AtomicI64::new(RESERVE),
        }
    }
}

impl RetryBudget {
    pub fn on_request(&self) {
        let _ = self
            .credits
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                (c < CAP).then_some(c + 1)
            });
    }

    /// Takes the cost of one retry if the budget allows it.
    pub fn try_retry(&self) -> bool {
        self.credits
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                (c >= COST).then_some(c - COST)
            })
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_a_fraction_of_requests() {
        let b = RetryBudget::default();
        // The reserve: ten retries.
        assert_eq!((0..100).filter(|_| b.try_retry()).count(), 10);
        // Then one retry per five requests.
        let mut retries = 0;
        for _ in 0..1000 {
            b.on_request();
            if b.try_retry() {
                retries += 1;
            }
        }
        assert_eq!(retries, 200);
    }
}
