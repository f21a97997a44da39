//! Counts by status class and latency percentiles over a set of records.

use dispa_proto::v1::{LogRecord, LogStats};

/// Nearest-rank percentiles over the records' total durations.
pub fn compute_stats<'a>(records: impl IntoIterator<Item = &'a LogRecord>) -> LogStats {
    let mut s = LogStats::default();
    let mut durations: Vec<u64> = Vec::new();
    for r in records {
        s.total += 1;
        match r.status / 100 {
            1 => s.status_1xx += 1,
            2 => s.status_2xx += 1,
            3 => s.status_3xx += 1,
            4 => s.status_4xx += 1,
            5 => s.status_5xx += 1,
            _ => {}
        }
        durations.push(r.duration_us);
    }
    durations.sort_unstable();
    let pct = |p: f64| -> f64 {
        if durations.is_empty() {
            return 0.0;
        }
        let rank = ((p / 100.0) * durations.len() as f64).ceil() as usize;
        durations[rank.clamp(1, durations.len()) - 1] as f64 / 1000.0
    };
    s.p50_ms = pct(50.0);
    s.p95_ms = pct(95.0);
    s.p99_ms = pct(99.0);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_percentiles() {
        let recs: Vec<LogRecord> = (1..=100)
            .map(|i| LogRecord {
                status: if i % 10 == 0 { 503 } else { 200 },
                duration_us: i * 1000,
                ..Default::default()
            })
            .collect();
        let s = compute_stats(&recs);
        assert_eq!((s.total, s.status_2xx, s.status_5xx), (100, 90, 10));
        assert_eq!((s.p50_ms, s.p95_ms, s.p99_ms), (50.0, 95.0, 99.0));
        assert_eq!(compute_stats(&[]).p99_ms, 0.0);
    }
}
