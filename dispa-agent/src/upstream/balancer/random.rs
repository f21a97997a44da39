//! Weighted random: endpoint i with probability w_i / sum(w).

#[derive(Debug)]
pub struct WeightedRandom {
    /// Running sums of the weights.
    cumulative: Vec<u64>,
}

impl WeightedRandom {
    pub fn new(weights: &[u32]) -> Self {
        let mut sum = 0u64;
        let cumulative = weights
            .iter()
            .map(|&w| {
                sum += u64::from(w.max(1));
                sum
            })
            .collect();
        Self { cumulative }
    }

    pub fn pick(&self) -> Option<usize> {
        let total = *self.cumulative.last()?;
        let x = fastrand::u64(..total);
        Some(self.cumulative.partition_point(|&c| c <= x))
    }
}
