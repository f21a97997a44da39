//! Balancers: which endpoint of an upstream serves a request. Each algorithm is plain data
//! and a `pick` over the endpoints' shared in-flight counters; no I/O.

mod hash;
mod least_conn;
mod p2c;
mod random;
mod round_robin;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dispa_proto::config::model::{Balance, HashOn};
use http::HeaderMap;

pub use hash::HashRing;
pub use least_conn::LeastConn;
pub use random::WeightedRandom;
pub use round_robin::RoundRobin;

/// An endpoint as balancers see it. `in_flight` is shared with earlier snapshots while the
/// endpoint's identity (upstream + address) is unchanged.
#[derive(Debug)]
pub struct Endpoint {
    pub addr: std::net::SocketAddr,
    pub weight: u32,
    pub in_flight: Arc<AtomicU64>,
    pub health: Arc<super::health::EndpointHealth>,
}

impl Endpoint {
    pub fn load(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// What a balancer may look at in a request.
pub struct PickCtx<'a> {
    pub client_ip: IpAddr,
    pub headers: &'a HeaderMap,
    /// The proxy's own fields, which the request carries beside `headers`.
    pub added: Option<&'a crate::proxy::Added>,
}

/// Counts a request against its endpoint until dropped (when the response ends).
#[derive(Debug)]
pub struct InFlight(Arc<AtomicU64>);

impl InFlight {
    pub fn start(counter: &Arc<AtomicU64>) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug)]
pub enum Balancer {
    RoundRobin(RoundRobin),
    LeastConn(LeastConn),
    Random(WeightedRandom),
    P2c,
    Hash {
        ring: HashRing,
        on: HashOn,
        fallback: RoundRobin,
    },
}

impl Balancer {
    /// Builds a balancer; a round-robin position is carried from `previous` when the
    /// endpoints are unchanged, so a config push does not restart the rotation.
    pub fn new(balance: &Balance, endpoints: &[Endpoint], previous: Option<&Balancer>) -> Self {
        let weights: Vec<u32> = endpoints.iter().map(|e| e.weight).collect();
        let rr = || match previous {
            Some(Balancer::RoundRobin(p)) => p.carry(),
            _ => RoundRobin::new(&weights),
        };
        match balance {
            Balance::RoundRobin | Balance::Weighted => Balancer::RoundRobin(rr()),
            Balance::LeastConn => Balancer::LeastConn(LeastConn::default()),
            Balance::Random => Balancer::Random(WeightedRandom::new(&weights)),
            Balance::P2c => Balancer::P2c,
            Balance::Hash(on) => Balancer::Hash {
                ring: HashRing::new(endpoints),
                on: on.clone(),
                fallback: RoundRobin::new(&vec![1; endpoints.len()]),
            },
        }
    }

    /// The index of the endpoint to use, or `None` when there are none.
    pub fn pick(&self, endpoints: &[Endpoint], ctx: &PickCtx<'_>) -> Option<usize> {
        if endpoints.is_empty() {
            return None;
        }
        match self {
            Balancer::RoundRobin(rr) => rr.pick(),
            Balancer::LeastConn(lc) => lc.pick(endpoints),
            Balancer::Random(r) => r.pick(),
            Balancer::P2c => p2c::pick(endpoints),
            Balancer::Hash { ring, on, fallback } => match hash_key(on, ctx) {
                Some(key) => ring.pick(&key),
                // No key in this request: spread it rather than pile it on one endpoint.
                None => fallback.pick(),
            },
        }
    }
}

/// The bytes a hash balancer hashes, if the request has them.
fn hash_key(on: &HashOn, ctx: &PickCtx<'_>) -> Option<Vec<u8>> {
    match on {
        HashOn::ClientIp => Some(ctx.client_ip.to_canonical().to_string().into_bytes()),
        HashOn::Header(name) => ctx
            .added
            .and_then(|a| a.get(name.as_str()))
            .or_else(|| ctx.headers.get(name.as_str()))
            .map(|v| v.as_bytes().to_vec()),
        HashOn::Cookie(name) => ctx
            .headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|kv| {
                let (k, v) = kv.trim().split_once('=')?;
                (k == name).then(|| v.as_bytes().to_vec())
            }),
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    pub fn endpoints(weights: &[u32]) -> Vec<Endpoint> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| Endpoint {
                addr: format!("127.0.0.1:{}", 9000 + i).parse().unwrap(),
                weight: w,
                in_flight: Arc::new(AtomicU64::new(0)),
                health: Arc::default(),
            })
            .collect()
    }

    /// Share of picks per endpoint over `n` picks.
    pub fn shares(n: usize, mut pick: impl FnMut() -> usize, len: usize) -> Vec<f64> {
        let mut counts = vec![0usize; len];
        for _ in 0..n {
            counts[pick()] += 1;
        }
        counts.into_iter().map(|c| c as f64 / n as f64).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;

    fn ctx(headers: &HeaderMap) -> PickCtx<'_> {
        PickCtx {
            client_ip: "127.0.0.1".parse().unwrap(),
            headers,
            added: None,
        }
    }

    #[test]
    fn weights_are_honoured_within_five_percent_by_weighted_and_random() {
        let eps = endpoints(&[1, 2, 7]);
        let h = HeaderMap::new();
        for balance in [Balance::Weighted, Balance::Random] {
            let b = Balancer::new(&balance, &eps, None);
            // 100,000 picks keep a random share within 5% of its weight (5 sigma at 10%).
            let s = shares(100_000, || b.pick(&eps, &ctx(&h)).unwrap(), 3);
            for (got, want) in s.iter().zip([0.1, 0.2, 0.7]) {
                assert!((got - want).abs() <= 0.05 * want, "{balance:?}: {s:?}");
            }
        }
    }

    #[test]
    fn hash_keys_come_from_headers_cookies_and_client_ip() {
        let eps = endpoints(&[1, 1, 1, 1]);
        let mut h = HeaderMap::new();
        h.insert("x-user", "alice".parse().unwrap());
        h.insert("cookie", "a=1; sid=abc; b=2".parse().unwrap());
        for on in [
            HashOn::Header("x-user".into()),
            HashOn::Cookie("sid".into()),
            HashOn::ClientIp,
        ] {
            let b = Balancer::new(&Balance::Hash(on.clone()), &eps, None);
            let first = b.pick(&eps, &ctx(&h));
            for _ in 0..20 {
                assert_eq!(b.pick(&eps, &ctx(&h)), first, "{on:?} is sticky");
            }
        }
        assert_eq!(
            hash_key(&HashOn::Cookie("sid".into()), &ctx(&h)),
            Some(b"abc".to_vec())
        );
        assert_eq!(hash_key(&HashOn::Cookie("none".into()), &ctx(&h)), None);
        // The proxy's own fields travel beside the map and hash the same.
        let mut added = crate::proxy::Added::new("id".parse().unwrap(), "tp".parse().unwrap());
        added.forwarded(
            "198.51.100.7".parse().unwrap(),
            "http",
            "a".parse().unwrap(),
        );
        let with = PickCtx {
            added: Some(&added),
            ..ctx(&h)
        };
        assert_eq!(
            hash_key(&HashOn::Header("X-Forwarded-For".into()), &with),
            Some(b"198.51.100.7".to_vec())
        );
        assert_eq!(
            hash_key(&HashOn::Header("x-user".into()), &with),
            Some(b"alice".to_vec())
        );
        // No key: spread like round robin.
        let b = Balancer::new(
            &Balance::Hash(HashOn::Header("x-missing".into())),
            &eps,
            None,
        );
        let s = shares(400, || b.pick(&eps, &ctx(&h)).unwrap(), 4);
        assert!(s.iter().all(|&x| x == 0.25), "{s:?}");
    }

    #[test]
    fn in_flight_guard_counts_until_dropped() {
        let eps = endpoints(&[1]);
        let g = InFlight::start(&eps[0].in_flight);
        assert_eq!(eps[0].load(), 1);
        drop(g);
        assert_eq!(eps[0].load(), 0);
    }
}
