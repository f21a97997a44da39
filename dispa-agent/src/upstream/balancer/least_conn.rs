//! Least connections: the endpoint with the fewest requests in flight per unit of weight.
//! Ties go to the next endpoint after the last pick, so idle upstreams still rotate.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::Endpoint;

#[derive(Debug, Default)]
pub struct LeastConn {
    start: AtomicUsize,
}

impl LeastConn {
    pub fn pick(&self, eps: &[Endpoint]) -> Option<usize> {
        let n = eps.len();
        if n == 0 {
            return None;
        }
        let start = self.start.fetch_add(1, Ordering::Relaxed) % n;
        let mut best = start;
        for k in 1..n {
            let i = (start + k) % n;
            // load_i / w_i < load_best / w_best, without division.
            let lhs = u128::from(eps[i].load()) * u128::from(eps[best].weight.max(1));
            let rhs = u128::from(eps[best].load()) * u128::from(eps[i].weight.max(1));
            if lhs < rhs {
                best = i;
            }
        }
        Some(best)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::endpoints;
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn prefers_the_less_loaded_endpoint() {
        let eps = endpoints(&[1, 1, 1]);
        eps[0].in_flight.store(5, Ordering::Relaxed);
        eps[1].in_flight.store(1, Ordering::Relaxed);
        eps[2].in_flight.store(3, Ordering::Relaxed);
        let lc = LeastConn::default();
        for _ in 0..10 {
            assert_eq!(lc.pick(&eps), Some(1));
        }
        // Weighted: 4 in flight on weight 4 beats 2 on weight 1.
        let eps = endpoints(&[4, 1]);
        eps[0].in_flight.store(4, Ordering::Relaxed);
        eps[1].in_flight.store(2, Ordering::Relaxed);
        assert_eq!(lc.pick(&eps), Some(0));
    }

    #[test]
    fn idle_endpoints_rotate() {
        let eps = endpoints(&[1, 1, 1]);
        let lc = LeastConn::default();
        let picks: Vec<_> = (0..6).filter_map(|_| lc.pick(&eps)).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
    }
}
