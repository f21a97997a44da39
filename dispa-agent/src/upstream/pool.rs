//! Pooled keep-alive HTTP client per upstream, kept across snapshots while the upstream's
//! identity (name + connect and TLS settings) is unchanged. Inside, hyper pools connections
//! by endpoint address; a TLS upstream without a configured `sni` gets one client per
//! endpoint DNS name, so connections are keyed by endpoint and server name.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use dispa_proto::UpstreamName;
use dispa_proto::config::model::UpstreamTls;
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::tls::Connector;

/// Idle upstream connections kept per endpoint; more are closed when released.
const MAX_IDLE_PER_ENDPOINT: usize = 256;

/// Most per-server-name clients one pool keeps (an upstream has at most 1000 endpoints).
const MAX_NAMED_CLIENTS: usize = 2048;

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
    /// Plaintext; or TLS with the configured sni, else the endpoint's IP as server name.
    client: UpstreamClient,
    /// TLS without a configured sni: a client per endpoint DNS name.
    named: Mutex<HashMap<String, UpstreamClient>>,
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
        let client = Self::build(&key, connector.clone());
        Ok(Self {
            key,
            connector,
            client,
            named: Mutex::default(),
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
        let Some(name) = server_name.filter(|_| self.named_clients()) else {
            return self.client.clone();
        };
        let Ok(mut named) = self.named.lock() else {
            return self.client.clone();
        };
        if let Some(c) = named.get(name) {
            return c.clone();
        }
        let Ok(sn) = crate::tls::server_name(name) else {
            return self.client.clone();
        };
        if named.len() >= MAX_NAMED_CLIENTS {
            // Names from old configs: dropping them closes only idle connections.
            named.clear();
        }
        let c = Self::build(&self.key, self.connector.with_server_name(sn));
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
