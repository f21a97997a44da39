//! Endpoint health: active HTTP checks and passive outlier ejection. State lives in atomics
//! shared across snapshots by endpoint identity, so a config push never resets it; the
//! transitions are plain functions of (state, result, now).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dispa_proto::config::model::{HealthCheck, Outlier};

/// Milliseconds since this process started (monotonic).
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    u64::try_from(crate::clock::since(start).as_millis()).unwrap_or(u64::MAX)
}

#[derive(Debug, Default)]
pub struct EndpointHealth {
    /// Taken down by active checks.
    down: AtomicBool,
    active_ok: AtomicU32,
    active_fail: AtomicU32,
    passive_fail: AtomicU32,
    ejected_until: AtomicU64,
    ejections: AtomicU32,
    /// When the next active check is due (process ms); 0 = now.
    pub next_check: AtomicU64,
    pub checking: AtomicBool,
}

/// A change worth logging.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    WentDown,
    CameBack,
    Ejected(Duration),
}

impl EndpointHealth {
    /// Usable for new requests at `now`.
    pub fn available(&self, now: u64) -> bool {
        !self.down.load(Ordering::Relaxed) && now >= self.ejected_until.load(Ordering::Relaxed)
    }

    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    pub fn is_ejected(&self, now: u64) -> bool {
        now < self.ejected_until.load(Ordering::Relaxed)
    }

    /// Records an active check's result.
    pub fn active(&self, ok: bool, hc: &HealthCheck) -> Option<Transition> {
        if ok {
            self.active_fail.store(0, Ordering::Relaxed);
            let n = self.active_ok.fetch_add(1, Ordering::Relaxed) + 1;
            if n >= hc.healthy && self.down.swap(false, Ordering::Relaxed) {
                // A healthy endpoint starts with a clean passive record.
                self.ejected_until.store(0, Ordering::Relaxed);
                self.passive_fail.store(0, Ordering::Relaxed);
                return Some(Transition::CameBack);
            }
        } else {
            self.active_ok.store(0, Ordering::Relaxed);
            let n = self.active_fail.fetch_add(1, Ordering::Relaxed) + 1;
            if n >= hc.unhealthy && !self.down.swap(true, Ordering::Relaxed) {
                return Some(Transition::WentDown);
            }
        }
        None
    }

    /// Records a proxied request's outcome (false: connect failure or 5xx).
    pub fn passive(&self, ok: bool, o: &Outlier, now: u64) -> Option<Transition> {
        if o.consecutive_failures == 0 {
            return None;
        }
        if ok {
            self.passive_fail.store(0, Ordering::Relaxed);
            return None;
        }
        let n = self.passive_fail.fetch_add(1, Ordering::Relaxed) + 1;
        if n < o.consecutive_failures {
            return None;
        }
        self.passive_fail.store(0, Ordering::Relaxed);
        let k = self.ejections.fetch_add(1, Ordering::Relaxed).min(16);
        let d = o.base_ejection.saturating_mul(1 << k).min(o.max_ejection);
        let until = now.saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.ejected_until.store(until, Ordering::Relaxed);
        Some(Transition::Ejected(d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hc() -> HealthCheck {
        HealthCheck {
            path: "/".into(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            healthy: 2,
            unhealthy: 2,
            expect_status: vec![],
        }
    }

    #[test]
    fn active_thresholds() {
        let h = EndpointHealth::default();
        assert_eq!(h.active(false, &hc()), None);
        assert!(h.available(0));
        assert_eq!(h.active(false, &hc()), Some(Transition::WentDown));
        assert!(!h.available(0));
        assert_eq!(h.active(true, &hc()), None);
        assert_eq!(h.active(true, &hc()), Some(Transition::CameBack));
        assert!(h.available(0));
    }

    #[test]
    fn passive_ejection_grows_and_is_capped() {
        let o = Outlier {
            consecutive_failures: 2,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(25),
        };
        let h = EndpointHealth::default();
        assert_eq!(h.passive(false, &o, 0), None);
        assert_eq!(
            h.passive(false, &o, 0),
            Some(Transition::Ejected(Duration::from_secs(10)))
        );
        assert!(!h.available(5_000) && h.available(10_000));
        h.passive(false, &o, 10_000);
        assert_eq!(
            h.passive(false, &o, 10_000),
            Some(Transition::Ejected(Duration::from_secs(20)))
        );
        h.passive(false, &o, 30_000);
        assert_eq!(
            h.passive(false, &o, 30_000),
            Some(Transition::Ejected(Duration::from_secs(25)))
        );
        // A success resets the run of failures.
        h.passive(false, &o, 60_000);
        h.passive(true, &o, 60_000);
        assert_eq!(h.passive(false, &o, 60_000), None);
    }
}
