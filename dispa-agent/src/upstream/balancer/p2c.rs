//! Power of two choices: two distinct random endpoints, the one with fewer requests in
//! flight. Near least-conn quality without scanning every endpoint.

use super::Endpoint;

pub fn pick(eps: &[Endpoint]) -> Option<usize> {
    match eps.len() {
        0 => None,
        1 => Some(0),
        n => {
            let a = fastrand::usize(..n);
            let b = (a + 1 + fastrand::usize(..n - 1)) % n;
            Some(if eps[b].load() < eps[a].load() { b } else { a })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{endpoints, shares};
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn prefers_the_less_loaded_endpoint() {
        let eps = endpoints(&[1, 1]);
        eps[0].in_flight.store(10, Ordering::Relaxed);
        for _ in 0..100 {
            assert_eq!(pick(&eps), Some(1));
        }
        // Of three, the busiest is never chosen (it loses every pair it is in).
        let eps = endpoints(&[1, 1, 1]);
        eps[2].in_flight.store(10, Ordering::Relaxed);
        let s = shares(3_000, || pick(&eps).unwrap(), 3);
        assert_eq!(s[2], 0.0, "{s:?}");
    }
}
