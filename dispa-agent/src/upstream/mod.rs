//! Upstreams at run time: resolved endpoints, the balancer, and state that outlives a snapshot
//! (connection pool, in-flight counters, round-robin position), carried across swaps by
//! identity: upstream name, and endpoint address within it.

pub mod balancer;
pub mod checker;
mod exchange;
mod h1;
pub mod health;
mod pool;
mod retry_budget;
#[cfg(test)]
mod test_upstream;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use dispa_proto::UpstreamName;
use dispa_proto::config::model::{HealthCheck, Outlier, Upstream};

pub use balancer::{Balancer, Endpoint, InFlight, PickCtx};
pub use h1::{SendError, UpstreamBody};
pub use pool::{Pool, PoolKey, UpstreamClient};
pub use retry_budget::RetryBudget;

/// Methods whose requests may be sent again (RFC 9110 section 9.2.2): by route retries, and
/// when a kept connection turns out closed before any of the response arrived.
pub fn idempotent(m: &http::Method) -> bool {
    matches!(
        m.as_str(),
        "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
    )
}

/// A resolved endpoint, before it gets run-time state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedEndpoint {
    pub addr: SocketAddr,
    pub weight: u32,
    /// The DNS name it was resolved from (None for an IP literal): the TLS server name
    /// when the upstream sets no `sni`.
    pub server_name: Option<String>,
}

/// An upstream as one snapshot sees it.
#[derive(Debug)]
pub struct UpstreamRuntime {
    pub name: UpstreamName,
    pub endpoints: Vec<Endpoint>,
    pub balancer: Balancer,
    pub pool: Arc<Pool>,
    pub connect_timeout: Duration,
    pub health: Option<HealthCheck>,
    pub outlier: Outlier,
    pub retry_budget: Arc<RetryBudget>,
    /// Circuit breaker: most requests in flight at once (0 = no limit).
    pub max_requests: u32,
    /// Circuit breaker on connections in use and requests waiting for one.
    pub gate: Option<Arc<ConnGate>>,
    /// TLS without a configured sni: each named endpoint's server name.
    pub server_names: foldhash::HashMap<SocketAddr, String>,
}

/// At most `max_connections` requests use an upstream connection at once; up to
/// `max_pending` more wait for one; the rest are refused.
#[derive(Debug)]
pub struct ConnGate {
    permits: Arc<tokio::sync::Semaphore>,
    max_connections: u32,
    waiting: std::sync::atomic::AtomicU32,
    max_pending: u32,
}

impl ConnGate {
    fn new(max_connections: u32, max_pending: u32) -> Self {
        Self {
            permits: Arc::new(tokio::sync::Semaphore::new(max_connections as usize)),
            max_connections,
            waiting: std::sync::atomic::AtomicU32::new(0),
            max_pending,
        }
    }

    /// A connection slot, waiting if allowed; `None` when the breaker is open.
    pub async fn enter(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        use std::sync::atomic::Ordering;
        if let Ok(p) = self.permits.clone().try_acquire_owned() {
            return Some(p);
        }
        let waiting = self.waiting.fetch_add(1, Ordering::Relaxed);
        let permit = if waiting < self.max_pending {
            self.permits.clone().acquire_owned().await.ok()
        } else {
            None
        };
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        permit
    }
}

/// The endpoint a request goes to, counted in flight until dropped.
#[derive(Debug)]
pub struct Picked {
    pub addr: SocketAddr,
    pub health: Arc<health::EndpointHealth>,
    pub in_flight: InFlight,
}

impl UpstreamRuntime {
    /// The URI a request to `addr` carries: origin form for HTTP/1.1 (what goes on the wire),
    /// absolute for the pooled HTTP/2 client (which connects by it).
    pub fn request_uri(
        &self,
        addr: SocketAddr,
        path_and_query: &http::uri::PathAndQuery,
    ) -> Result<http::Uri, http::uri::InvalidUri> {
        if self.pool.key().h2 {
            format!("{}://{addr}{path_and_query}", self.pool.scheme()).parse()
        } else {
            Ok(path_and_query.clone().into())
        }
    }

    /// Sends `req` to `addr` with the proxy's `added` fields: over this thread's HTTP/1.1
    /// connections (the URI in origin form), or the pooled HTTP/2 client (the URI absolute).
    /// Not an `async fn`, which would keep `req` twice in its state (see [`h1::H1Conns::send`]).
    pub fn send(
        &self,
        addr: SocketAddr,
        mut req: http::Request<crate::proxy::CountedBody>,
        added: Option<&crate::proxy::Added>,
    ) -> impl Future<Output = Result<http::Response<UpstreamBody>, SendError>> + Send + use<> {
        use futures_util::future::{Either, TryFutureExt};
        let name = self.server_names.get(&addr).map(String::as_str);
        if self.pool.key().h2 {
            if let Some(a) = added {
                a.insert_into(req.headers_mut());
            }
            // The pooled client's future is boxed inside hyper-util.
            let sent = self.pool.client_for(name).request(req);
            return Either::Left(
                sent.map_ok(|r| r.map(UpstreamBody::Hyper))
                    .map_err(SendError::Pooled),
            );
        }
        Either::Right(self.pool.h1_for(name).send(addr, req, added))
    }

    /// A non-pooling client for a health check of `addr`, for TLS upstreams.
    pub fn probe_client(
        &self,
        addr: SocketAddr,
    ) -> hyper_util::client::legacy::Client<
        crate::tls::Connector,
        http_body_util::Empty<bytes::Bytes>,
    > {
        self.pool
            .probe_client(self.server_names.get(&addr).map(String::as_str))
    }

    /// Whether the circuit breaker refuses another request now.
    pub fn saturated(&self) -> bool {
        self.max_requests > 0
            && self.endpoints.iter().map(Endpoint::load).sum::<u64>()
                >= u64::from(self.max_requests)
    }

    /// The balancer's choice among endpoints that are up and not in `avoid` (earlier
    /// attempts); when its choice is not usable, the next usable endpoint after it.
    /// `None` when no endpoint is usable: the caller answers 503 at once.
    pub fn pick(&self, ctx: &PickCtx<'_>, avoid: &[SocketAddr]) -> Option<Picked> {
        let now = health::now_ms();
        let usable = |e: &Endpoint| e.health.available(now) && !avoid.contains(&e.addr);
        let first = self.balancer.pick(&self.endpoints, ctx)?;
        let n = self.endpoints.len();
        let i = (0..n)
            .map(|k| (first + k) % n)
            .find(|&i| usable(&self.endpoints[i]))?;
        let e = &self.endpoints[i];
        Some(Picked {
            addr: e.addr,
            health: e.health.clone(),
            in_flight: InFlight::start(&e.in_flight),
        })
    }
}

/// Builds an upstream, reusing the previous snapshot's state where identity is unchanged:
/// the pool when the connect settings match, each endpoint's in-flight counter and health by
/// address, the retry budget, and the balancer's position when balance and endpoints match.
/// Fails only on TLS settings rustls refuses.
pub fn build(
    spec: &Upstream,
    resolved: Vec<ResolvedEndpoint>,
    previous: Option<&UpstreamRuntime>,
) -> Result<UpstreamRuntime, String> {
    let key = PoolKey {
        name: spec.name.clone(),
        connect_timeout: spec.connect_timeout,
        h2: spec.h2,
        idle_timeout: spec.idle_timeout,
        tls: spec.tls.clone(),
    };
    let pool = match previous {
        Some(p) if p.pool.key() == &key => p.pool.clone(),
        _ => Arc::new(Pool::new(key)?),
    };
    let server_names = match &spec.tls {
        Some(t) if t.sni.is_none() => resolved
            .iter()
            .filter_map(|r| Some((r.addr, r.server_name.clone()?)))
            .collect(),
        _ => foldhash::HashMap::default(),
    };
    let old: HashMap<SocketAddr, &Endpoint> = previous
        .map(|p| p.endpoints.iter().map(|e| (e.addr, e)).collect())
        .unwrap_or_default();
    let endpoints: Vec<Endpoint> = resolved
        .iter()
        .map(|r| Endpoint {
            addr: r.addr,
            weight: r.weight,
            in_flight: old
                .get(&r.addr)
                .map_or_else(|| Arc::new(AtomicU64::new(0)), |e| e.in_flight.clone()),
            health: old
                .get(&r.addr)
                .map_or_else(Arc::default, |e| e.health.clone()),
        })
        .collect();
    let same = previous.is_some_and(|p| {
        p.endpoints.len() == endpoints.len()
            && p.endpoints
                .iter()
                .zip(&endpoints)
                .all(|(a, b)| a.addr == b.addr && a.weight == b.weight)
    });
    // Balancer::new carries a round-robin position only from a round-robin balancer.
    let carried = previous.filter(|_| same).map(|p| &p.balancer);
    let balancer = Balancer::new(&spec.balance, &endpoints, carried);
    Ok(UpstreamRuntime {
        server_names,
        name: spec.name.clone(),
        endpoints,
        balancer,
        pool,
        connect_timeout: spec.connect_timeout,
        health: spec.health.clone(),
        outlier: spec.outlier.clone(),
        retry_budget: previous.map_or_else(Arc::default, |p| p.retry_budget.clone()),
        max_requests: spec.max_requests,
        gate: (spec.max_connections > 0).then(|| match previous.and_then(|p| p.gate.as_ref()) {
            // Same limits: keep the gate, so requests in flight across a push still count.
            Some(g)
                if g.max_connections == spec.max_connections
                    && g.max_pending == spec.max_pending =>
            {
                g.clone()
            }
            _ => Arc::new(ConnGate::new(spec.max_connections, spec.max_pending)),
        }),
    })
}

pub type Upstreams = HashMap<UpstreamName, Arc<UpstreamRuntime>>;
