//! Upstreams at run time: resolved endpoints, the balancer, and state that outlives a snapshot
//! (connection pool, round-robin position), carried across swaps by upstream identity.

mod pool;
mod round_robin;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dispa_proto::UpstreamName;
use dispa_proto::config::model::Upstream;

pub use pool::{Pool, PoolKey};
pub use round_robin::RoundRobin;

/// A resolved endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedEndpoint {
    pub addr: SocketAddr,
    pub weight: u32,
}

/// An upstream as one snapshot sees it.
#[derive(Debug)]
pub struct UpstreamRuntime {
    pub name: UpstreamName,
    pub endpoints: Vec<ResolvedEndpoint>,
    pub balancer: RoundRobin,
    pub pool: Arc<Pool>,
    pub connect_timeout: Duration,
}

impl UpstreamRuntime {
    pub fn pick(&self) -> Option<SocketAddr> {
        self.balancer
            .pick()
            .and_then(|i| self.endpoints.get(i))
            .map(|e| e.addr)
    }
}

/// Builds an upstream, reusing the previous snapshot's state when its identity is unchanged:
/// the pool when the connect settings match, the round-robin position when the endpoints do.
pub fn build(
    spec: &Upstream,
    endpoints: Vec<ResolvedEndpoint>,
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
    let weights: Vec<u32> = endpoints.iter().map(|e| e.weight).collect();
    let balancer = match previous {
        Some(p) if p.endpoints == endpoints => p.balancer.carry(),
        _ => RoundRobin::new(&weights),
    };
    UpstreamRuntime {
        name: spec.name.clone(),
        endpoints,
        balancer,
        pool,
        connect_timeout: spec.connect_timeout,
    }
}

pub type Upstreams = HashMap<UpstreamName, Arc<UpstreamRuntime>>;
