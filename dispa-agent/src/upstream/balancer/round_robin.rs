//! Weighted round robin: a precomputed smooth schedule (an endpoint of weight 3 appears three
//! times, interleaved with the others) walked by a shared atomic cursor.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Caps the schedule length; weights beyond it are scaled down proportionally.
const MAX_SCHEDULE: u64 = 10_000;

#[derive(Debug)]
pub struct RoundRobin {
    schedule: Arc<[usize]>,
    cursor: Arc<AtomicUsize>,
}

impl RoundRobin {
    pub fn new(weights: &[u32]) -> Self {
        Self {
            schedule: smooth_schedule(weights).into(),
            cursor: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The same schedule and cursor, for a snapshot whose endpoints did not change.
    pub fn carry(&self) -> Self {
        Self {
            schedule: self.schedule.clone(),
            cursor: self.cursor.clone(),
        }
    }

    /// The index of the next endpoint.
    pub fn pick(&self) -> Option<usize> {
        if self.schedule.is_empty() {
            return None;
        }
        let n = self.cursor.fetch_add(1, Ordering::Relaxed);
        Some(self.schedule[n % self.schedule.len()])
    }
}

/// Nginx-style smooth weighted round robin, unrolled into one cycle.
fn smooth_schedule(weights: &[u32]) -> Vec<usize> {
    let total: u64 = weights.iter().map(|&w| u64::from(w.max(1))).sum();
    let scale = total.div_ceil(MAX_SCHEDULE).max(1);
    let w: Vec<i64> = weights
        .iter()
        .map(|&x| (u64::from(x.max(1)) / scale).max(1) as i64)
        .collect();
    let sum: i64 = w.iter().sum();
    let mut current = vec![0i64; w.len()];
    let mut out = Vec::with_capacity(sum as usize);
    for _ in 0..sum {
        let mut best = 0;
        for i in 0..w.len() {
            current[i] += w[i];
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= sum;
        out.push(best);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_weights_alternate() {
        let rr = RoundRobin::new(&[1, 1, 1]);
        let picks: Vec<_> = (0..6).filter_map(|_| rr.pick()).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn weights_are_honoured_and_interleaved() {
        assert_eq!(smooth_schedule(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
        let s = smooth_schedule(&[1, 3]);
        assert_eq!(s.iter().filter(|&&i| i == 1).count(), 3);
        assert!(smooth_schedule(&[1000; 1000]).len() <= MAX_SCHEDULE as usize);
        assert!(RoundRobin::new(&[]).pick().is_none());
    }

    #[test]
    fn carried_cursor_continues() {
        let a = RoundRobin::new(&[1, 1]);
        assert_eq!(a.pick(), Some(0));
        let b = a.carry();
        assert_eq!(b.pick(), Some(1));
    }
}
