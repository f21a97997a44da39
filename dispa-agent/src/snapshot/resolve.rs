//! Endpoint name resolution, done before compiling so that compiling stays free of I/O.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use dispa_proto::config::Config;
use dispa_proto::config::model::EndpointAddr;

const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
#[error("upstream {upstream}: cannot resolve endpoint {endpoint}: {detail}")]
pub struct ResolveError {
    pub upstream: String,
    pub endpoint: String,
    pub detail: String,
}

/// Resolves every endpoint of every upstream. A name that does not resolve makes the
/// snapshot unusable: serving it would send that upstream's traffic nowhere.
pub async fn resolve_endpoints(
    config: &Config,
) -> Result<HashMap<EndpointAddr, Vec<SocketAddr>>, ResolveError> {
    let mut out = HashMap::new();
    for u in config.upstreams.values() {
        for e in &u.endpoints {
            if out.contains_key(&e.address) {
                continue;
            }
            let err = |detail: String| ResolveError {
                upstream: u.name.to_string(),
                endpoint: e.address.to_string(),
                detail,
            };
            let addrs = if let Ok(ip) = e.address.host.parse::<IpAddr>() {
                vec![SocketAddr::new(ip, e.address.port)]
            } else {
                let lookup = tokio::net::lookup_host((e.address.host.as_str(), e.address.port));
                let mut addrs: Vec<SocketAddr> = tokio::time::timeout(RESOLVE_TIMEOUT, lookup)
                    .await
                    .map_err(|_| err(format!("no answer within {RESOLVE_TIMEOUT:?}")))?
                    .map_err(|e| err(e.to_string()))?
                    .collect();
                addrs.sort();
                addrs.dedup();
                if addrs.is_empty() {
                    return Err(err("no addresses".into()));
                }
                addrs
            };
            out.insert(e.address.clone(), addrs);
        }
    }
    Ok(out)
}
