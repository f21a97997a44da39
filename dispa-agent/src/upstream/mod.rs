//! Upstreams at run time: resolved endpoints, the balancer, and state that outlives a snapshot
//! (connection pool, in-flight counters, round-robin position), carried across swaps by
//! identity: upstream name, and endpoint address within it.

pub mod balancer;
mod pool;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use dispa_proto::UpstreamName;
use dispa_proto::config::model::Upstream;

pub use balancer::{Balancer, Endpoint, InFlight, PickCtx};
pub use pool::{Pool, PoolKey};

/// A resolved endpoint, before it gets run-time state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedEndpoint {
    pub addr: SocketAddr,
    pub weight: u32,
}

/// An upstream as one snapshot sees it.
#[derive(Debug)]
pub struct UpstreamRuntime {
    pub name: UpstreamName,
    pub endpoints: Vec<Endpoint>,
    pub balancer: Balancer,
    pub pool: Arc<Pool>,
    pub connect_timeout: Duration,
}

impl UpstreamRuntime {
    /// The endpoint for a request, counted in flight until the guard drops.
    pub fn pick(&self, ctx: &PickCtx<'_>) -> Option<(SocketAddr, InFlight)> {
        let e = self
            .endpoints
            .get(self.balancer.pick(&self.endpoints, ctx)?)?;
        Some((e.addr, InFlight::start(&e.in_flight)))
    }
}

/// Builds an upstream, reusing the previous snapshot's state where identity is unchanged:
/// the pool when the connect settings match, each endpoint's in-flight counter by address,
/// the balancer's position when the balance and endpoints are the same.
pub fn build(
    spec: &Upstream,
    resolved: Vec<ResolvedEndpoint>,
    previous: Option<&UpstreamRuntime>,
) -> UpstreamRuntime {
    let key = PoolKey {
        name: spec.name.clone(),
        connect_timeout: spec.connect_timeout,
    };
    let pool = match previous {
        Some(p) if p.pool.key() == &key => p.pool.clone(),
        _ => Arc::new(Pool::new(key)),
    };
    let old: HashMap<SocketAddr, &Arc<AtomicU64>> = previous
        .map(|p| p.endpoints.iter().map(|e| (e.addr, &e.in_flight)).collect())
        .unwrap_or_default();
    let endpoints: Vec<Endpoint> = resolved
        .iter()
        .map(|r| Endpoint {
            addr: r.addr,
            weight: r.weight,
            in_flight: old
                .get(&r.addr)
                .map_or_else(|| Arc::new(AtomicU64::new(0)), |c| Arc::clone(c)),
        })
        .collect();
    let same = previous.is_some_and(|p| {
        p.endpoints.len() == endpoints.len()
            && p.endpoints
                .iter()
                .zip(&endpoints)
                .all(|(a, b)| a.addr == b.addr && a.weight == b.weight)
    });
    let carried = previous
        .filter(|_| same && previous_balance_is(previous, spec))
        .map(|p| &p.balancer);
    let balancer = Balancer::new(&spec.balance, &endpoints, carried);
    UpstreamRuntime {
        name: spec.name.clone(),
        endpoints,
        balancer,
        pool,
        connect_timeout: spec.connect_timeout,
    }
}

fn previous_balance_is(previous: Option<&UpstreamRuntime>, spec: &Upstream) -> bool {
    use dispa_proto::config::model::Balance;
    matches!(
        (previous.map(|p| &p.balancer), &spec.balance),
        (
            Some(Balancer::RoundRobin(_)),
            Balance::RoundRobin | Balance::Weighted
        )
    )
}

pub type Upstreams = HashMap<UpstreamName, Arc<UpstreamRuntime>>;
