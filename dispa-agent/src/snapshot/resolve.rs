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

/// Re-resolves the DNS names among `previous`'s keys. A name that fails keeps its previous
/// addresses (a passing DNS outage must not empty an upstream). Returns the new map only if
/// something changed.
pub async fn refresh_names<F, Fut>(
    previous: &HashMap<EndpointAddr, Vec<SocketAddr>>,
    lookup: F,
) -> Option<HashMap<EndpointAddr, Vec<SocketAddr>>>
where
    F: Fn(EndpointAddr) -> Fut,
    Fut: std::future::Future<Output = std::io::Result<Vec<SocketAddr>>>,
{
    let mut next = previous.clone();
    let mut changed = false;
    for (name, old) in previous {
        if name.host.parse::<IpAddr>().is_ok() {
            continue;
        }
        match tokio::time::timeout(RESOLVE_TIMEOUT, lookup(name.clone())).await {
            Ok(Ok(mut addrs)) if !addrs.is_empty() => {
                addrs.sort();
                addrs.dedup();
                if &addrs != old {
                    tracing::info!(endpoint = %name, ?addrs, "endpoint name resolves to new addresses");
                    next.insert(name.clone(), addrs);
                    changed = true;
                }
            }
            Ok(Ok(_)) => {
                tracing::warn!(endpoint = %name, "endpoint name resolved to nothing; keeping its addresses")
            }
            Ok(Err(e)) => {
                tracing::warn!(endpoint = %name, "cannot re-resolve endpoint name ({e}); keeping its addresses")
            }
            Err(_) => {
                tracing::warn!(endpoint = %name, "re-resolving endpoint name timed out; keeping its addresses")
            }
        }
    }
    changed.then_some(next)
}

/// The system resolver, for [`refresh_names`].
pub async fn system_lookup(name: EndpointAddr) -> std::io::Result<Vec<SocketAddr>> {
    Ok(tokio::net::lookup_host((name.host.as_str(), name.port))
        .await?
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refresh_keeps_ips_and_failures_and_reports_changes() {
        let name = EndpointAddr {
            host: "api.internal".into(),
            port: 80,
        };
        let ip = EndpointAddr {
            host: "10.0.0.1".into(),
            port: 80,
        };
        let a: SocketAddr = "10.1.0.1:80".parse().unwrap();
        let b: SocketAddr = "10.1.0.2:80".parse().unwrap();
        let prev = HashMap::from([
            (name.clone(), vec![a]),
            (ip.clone(), vec!["10.0.0.1:80".parse().unwrap()]),
        ]);
        let same = refresh_names(&prev, |_| async move { Ok(vec![a]) }).await;
        assert!(same.is_none());
        let moved = refresh_names(&prev, |_| async move { Ok(vec![b, a, b]) })
            .await
            .unwrap();
        assert_eq!(moved[&name], vec![a, b]);
        assert_eq!(moved[&ip], prev[&ip]);
        let failed =
            refresh_names(&prev, |_| async { Err(std::io::Error::other("SERVFAIL")) }).await;
        assert!(failed.is_none(), "a failed lookup keeps the old addresses");
    }
}
