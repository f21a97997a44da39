//! Pooled keep-alive HTTP client per upstream, kept across snapshots while the upstream's
//! identity (name + connect settings) is unchanged.

use std::time::Duration;

use dispa_proto::UpstreamName;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Idle upstream connections kept per endpoint; more are closed when released.
const MAX_IDLE_PER_ENDPOINT: usize = 256;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolKey {
    pub name: UpstreamName,
    pub connect_timeout: Duration,
    pub h2: bool,
    pub idle_timeout: Duration,
}

#[derive(Debug)]
pub struct Pool {
    key: PoolKey,
    client: Client<HttpConnector, crate::proxy::CountedBody>,
}

impl Pool {
    pub fn new(key: PoolKey) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(key.connect_timeout));
        connector.set_nodelay(true);
        connector.enforce_http(true);
        let client = Client::builder(TokioExecutor::new())
            .http2_only(key.h2)
            .pool_max_idle_per_host(MAX_IDLE_PER_ENDPOINT)
            .pool_idle_timeout(key.idle_timeout)
            // The proxy sets Host itself (the client's Host is preserved).
            .set_host(false)
            .build(connector);
        Self { key, client }
    }

    pub fn key(&self) -> &PoolKey {
        &self.key
    }

    pub fn client(&self) -> &Client<HttpConnector, crate::proxy::CountedBody> {
        &self.client
    }
}
