//! Open-connection counts per agent listener and per client IP. The per-IP map holds only IPs
//! with an open connection and is capped, so it cannot grow with traffic.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Distinct client IPs tracked at once; a new IP past this is refused (and counted).
pub const MAX_TRACKED_IPS: usize = 100_000;

/// Why a connection is refused before any byte is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("the listener has max_connections open")]
    Total,
    #[error("this client IP has max_connections_per_ip open")]
    PerIp,
    #[error("too many distinct client IPs connected")]
    TooManyIps,
}

impl Refused {
    pub fn reason(self) -> &'static str {
        match self {
            Refused::Total => "max_connections",
            Refused::PerIp => "max_connections_per_ip",
            Refused::TooManyIps => "ip_table_full",
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    total: u32,
    per_ip: HashMap<IpAddr, u32>,
}

/// Shared by one listener's connections.
#[derive(Debug, Default)]
pub struct ConnLimiter {
    counts: Mutex<Counts>,
}

/// One counted connection; dropping it gives the slots back.
#[derive(Debug)]
pub struct Permit {
    limiter: Arc<ConnLimiter>,
    ip: Option<IpAddr>,
}

impl ConnLimiter {
    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        // A poisoned lock still holds valid counts (every update is a single step).
        self.counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts a new connection against `max` (0: no limit).
    pub fn acquire(self: &Arc<Self>, max: u32) -> Result<Permit, Refused> {
        let mut c = self.lock();
        if max > 0 && c.total >= max {
            return Err(Refused::Total);
        }
        c.total += 1;
        Ok(Permit {
            limiter: self.clone(),
            ip: None,
        })
    }

    pub fn open(&self) -> (u32, usize) {
        let c = self.lock();
        (c.total, c.per_ip.len())
    }
}

impl Permit {
    /// Also counts the connection against its client IP (0: no limit). Call once.
    pub fn for_ip(&mut self, ip: IpAddr, max: u32) -> Result<(), Refused> {
        let ip = ip.to_canonical();
        let mut c = self.limiter.lock();
        let tracked = c.per_ip.len();
        let n = match c.per_ip.get_mut(&ip) {
            Some(n) => n,
            None if tracked >= MAX_TRACKED_IPS => return Err(Refused::TooManyIps),
            None => c.per_ip.entry(ip).or_insert(0),
        };
        if max > 0 && *n >= max {
            if *n == 0 {
                c.per_ip.remove(&ip);
            }
            return Err(Refused::PerIp);
        }
        *n += 1;
        drop(c);
        self.ip = Some(ip);
        Ok(())
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut c = self.limiter.lock();
        c.total = c.total.saturating_sub(1);
        if let Some(ip) = self.ip
            && let Some(n) = c.per_ip.get_mut(&ip)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.per_ip.remove(&ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn total_and_per_ip_limits_release_on_drop() {
        let l = Arc::new(ConnLimiter::default());
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "::ffff:10.0.0.2".parse().unwrap();
        let mut p1 = l.acquire(3).unwrap();
        p1.for_ip(a, 1).unwrap();
        let mut p2 = l.acquire(3).unwrap();
        assert_eq!(p2.for_ip(a, 1), Err(Refused::PerIp));
        p2.for_ip(b, 1).unwrap();
        let p3 = l.acquire(3).unwrap();
        assert_eq!(l.acquire(3).err(), Some(Refused::Total));
        assert_eq!(l.open(), (3, 2));
        drop(p1);
        drop(p3);
        assert_eq!(l.open(), (1, 1));
        let mut p4 = l.acquire(0).unwrap();
        p4.for_ip(a, 0).unwrap();
        drop((p2, p4));
        assert_eq!(l.open(), (0, 0));
    }
}
