//! Pooled keep-alive HTTP clients per upstream, kept across snapshots while the upstream's
//! identity (name + connect and TLS settings) is unchanged. Inside, hyper pools connections
//! by endpoint address; a TLS upstream without a configured `sni` gets one client per
//! endpoint DNS name, so connections are keyed by endpoint and server name.
//!
//! Every thread gets clients of its own (a lane): an upstream connection's task runs on the
//! thread that opened it, so a request served on another thread would cross threads twice
//! (a wake-up through the kernel each way). Lanes keep each exchange on one thread.
use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use dispa_proto::UpstreamName;
use dispa_proto::config::model::UpstreamTls;
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::h1::H1Conns;
use crate::tls::Connector;

/// Idle upstream connections kept per endpoint and lane; more are closed when released.
const MAX_IDLE_PER_ENDPOINT: usize = 256;

/// Most per-server-name clients one pool keeps (an upstream has at most 1000 endpoints).
const MAX_NAMED_CLIENTS: usize = 2048;

/// Lanes per pool; threads past this many share lanes (round robin). Serving threads are
/// few (one per core and listener), and an unused lane costs about 200 bytes.
const LANES: usize = 16;

static NEXT_LANE: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static LANE: Cell<Option<usize>> = const { Cell::new(None) };
}

/// This thread's lane, assigned on first use.
fn lane() -> usize {
    LANE.with(|l| match l.get() {
        Some(i) => i,
        None => {
            let i = NEXT_LANE.fetch_add(1, Ordering::Relaxed) % LANES;
            l.set(Some(i));
            i
        }
    })
}

pub type UpstreamClient = Client<Connector, crate::proxy::CountedBody>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolKey {
    pub name: UpstreamName,
    pub connect_timeout: Duration,
    pub h2: bool,
    pub idle_timeout: Duration,
    pub tls: Option<UpstreamTls>,
}

#[derive(Debug)]
pub struct Pool {
    key: PoolKey,
    connector: Connector,
    lanes: Box<[Lane]>,
}

/// One thread's clients of a pool.
#[derive(Debug, Default)]
struct Lane {
    /// Plaintext; or TLS with the configured sni, else the endpoint's IP as server name.
    client: OnceLock<UpstreamClient>,
    /// TLS without a configured sni: a client per endpoint DNS name.
    named: Mutex<HashMap<String, UpstreamClient>>,
    /// HTTP/1.1 upstreams: the request path's connections, as `client` and `named` above.
    h1: OnceLock<Arc<H1Conns>>,
    h1_named: Mutex<HashMap<String, Arc<H1Conns>>>,
}

impl Pool {
    /// Fails only on TLS settings rustls refuses (snapshots are checked before).
    pub fn new(key: PoolKey) -> Result<Self, String> {
        let connector = match &key.tls {
            None => Connector::new(key.connect_timeout, None),
            Some(tls) => {
                let config = Arc::new(crate::tls::client_config(tls, key.h2)?);
                let c = Connector::new(key.connect_timeout, Some(config));
                match &tls.sni {
                    Some(sni) => c.with_server_name(crate::tls::server_name(sni)?),
                    None => c,
                }
            }
        };
        Ok(Self {
            key,
            connector,
            lanes: (0..LANES).map(|_| Lane::default()).collect(),
        })
    }

    fn build(key: &PoolKey, connector: Connector) -> UpstreamClient {
        Client::builder(TokioExecutor::new())
            .http2_only(key.h2)
            .pool_max_idle_per_host(MAX_IDLE_PER_ENDPOINT)
            .pool_idle_timeout(key.idle_timeout)
            // The proxy sets Host itself (the client's Host is preserved).
            .set_host(false)
            .build(connector)
    }

    pub fn key(&self) -> &PoolKey {
        &self.key
    }

    /// `https` for TLS upstreams (what request URIs and HTTP/2 `:scheme` say).
    pub fn scheme(&self) -> &'static str {
        if self.key.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// The client for an endpoint whose certificate is checked against `server_name` (its
    /// DNS name when the upstream sets no sni); `None`: the configured sni or the address.
    pub fn client_for(&self, server_name: Option<&str>) -> UpstreamClient {
        let lane = &self.lanes[lane()];
        self.for_name(server_name, &lane.client, &lane.named, |c| {
            Self::build(&self.key, c)
        })
    }

    /// This thread's HTTP/1.1 connections for endpoints with `server_name` (as
    /// [`Self::client_for`]).
    pub fn h1_for(&self, server_name: Option<&str>) -> Arc<H1Conns> {
        let lane = &self.lanes[lane()];
        self.for_name(server_name, &lane.h1, &lane.h1_named, |c| {
            Arc::new(H1Conns::new(c, self.scheme(), self.key.idle_timeout))
        })
    }

    /// `default` (made on first use), or for TLS without a configured sni the entry of
    /// `named` for `server_name`, made with a connector that sends and checks that name.
    fn for_name<T: Clone>(
        &self,
        server_name: Option<&str>,
        default: &OnceLock<T>,
        named: &Mutex<HashMap<String, T>>,
        make: impl Fn(Connector) -> T,
    ) -> T {
        let default = || default.get_or_init(|| make(self.connector.clone())).clone();
        let Some(name) = server_name.filter(|_| self.named_clients()) else {
            return default();
        };
        let Ok(mut named) = named.lock() else {
            return default();
        };
        if let Some(c) = named.get(name) {
            return c.clone();
        }
        let Ok(sn) = crate::tls::server_name(name) else {
            return default();
        };
        if named.len() >= MAX_NAMED_CLIENTS {
            // Names from old configs: dropping them closes only idle connections.
            named.clear();
        }
        let c = make(self.connector.with_server_name(sn));
        named.insert(name.to_string(), c.clone());
        c
    }

    fn named_clients(&self) -> bool {
        self.key.tls.as_ref().is_some_and(|t| t.sni.is_none())
    }

    /// A client that keeps no idle connection, for health checks: a check must prove a
    /// fresh connection (and TLS handshake) works.
    pub fn probe_client(&self, server_name: Option<&str>) -> Client<Connector, Empty<Bytes>> {
        let connector = match server_name.filter(|_| self.named_clients()) {
            Some(n) => match crate::tls::server_name(n) {
                Ok(sn) => self.connector.with_server_name(sn),
                Err(_) => self.connector.clone(),
            },
            None => self.connector.clone(),
        };
        Client::builder(TokioExecutor::new())
            .http2_only(self.key.h2)
            .pool_max_idle_per_host(0)
            .build(connector)
    }
}
