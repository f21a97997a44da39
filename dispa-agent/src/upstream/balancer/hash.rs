//! Consistent hashing: each endpoint owns points on a ring (more for more weight); a key goes
//! to the first point at or after its hash. Adding one endpoint of ten moves about a tenth
//! of the keys.

use super::Endpoint;

/// Points per unit of weight; enough for an even spread over tens of endpoints.
const POINTS_PER_WEIGHT: u64 = 160;
/// Bound on the ring's size whatever the weights.
const MAX_POINTS: u64 = 160_000;

#[derive(Debug)]
pub struct HashRing {
    /// (point, endpoint index), sorted by point.
    points: Vec<(u64, usize)>,
}

/// FNV-1a followed by a SplitMix64 finaliser: stable across builds and platforms, so every
/// agent maps a key to the same endpoint.
pub fn hash64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

impl HashRing {
    pub fn new(eps: &[Endpoint]) -> Self {
        let total: u64 = eps
            .iter()
            .map(|e| u64::from(e.weight.max(1)) * POINTS_PER_WEIGHT)
            .sum();
        let scale = total.div_ceil(MAX_POINTS).max(1);
        let mut points = Vec::new();
        for (i, e) in eps.iter().enumerate() {
            // Points are named by address, not index, so they stay put when others change.
            let n = (u64::from(e.weight.max(1)) * POINTS_PER_WEIGHT / scale).max(1);
            let name = e.addr.to_string();
            for k in 0..n {
                points.push((hash64(format!("{name}#{k}").as_bytes()), i));
            }
        }
        points.sort_unstable();
        Self { points }
    }

    pub fn pick(&self, key: &[u8]) -> Option<usize> {
        if self.points.is_empty() {
            return None;
        }
        let h = hash64(key);
        let at = self.points.partition_point(|&(p, _)| p < h);
        Some(self.points[at % self.points.len()].1)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::endpoints;
    use super::*;

    #[test]
    fn adding_one_of_ten_moves_few_keys_and_spreads_evenly() {
        let ten = endpoints(&[1; 10]);
        let eleven = endpoints(&[1; 11]);
        let (a, b) = (HashRing::new(&ten), HashRing::new(&eleven));
        let keys: Vec<String> = (0..10_000).map(|i| format!("user-{i}")).collect();
        let mut counts = [0usize; 10];
        let mut moved = 0;
        for k in &keys {
            let (x, y) = (a.pick(k.as_bytes()).unwrap(), b.pick(k.as_bytes()).unwrap());
            counts[x] += 1;
            // Same index means same address here (the 11th endpoint is appended).
            if x != y {
                moved += 1;
            }
        }
        let share = moved as f64 / keys.len() as f64;
        assert!(share <= 0.15, "moved {share}");
        assert!(share >= 0.04, "the new endpoint takes its share: {share}");
        assert!(
            counts.iter().all(|&c| (600..=1400).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn hash_is_stable() {
        assert_eq!(hash64(b"dispa"), hash64(b"dispa"));
        assert_ne!(hash64(b"a"), hash64(b"b"));
    }
}
