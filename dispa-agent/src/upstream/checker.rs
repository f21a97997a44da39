//! Active health checks: every tick, endpoints of the current snapshot whose check is due get
//! `GET path`; the result feeds [`EndpointHealth::active`]. Due times live in the shared
//! endpoint state, so a config push does not cause a burst of re-probes.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::watch;

use super::health::{EndpointHealth, Transition, now_ms};
use crate::snapshot::Current;
use crate::telemetry::{EndpointLabels, Metrics};

const TICK: Duration = Duration::from_millis(100);
const GAUGE_EVERY: u64 = 10;

pub async fn run(current: Arc<Current>, metrics: Arc<Metrics>, mut stop: watch::Receiver<bool>) {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(Duration::from_secs(2)));
    connector.set_nodelay(true);
    // No pooling: a check must prove a fresh connection works.
    let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(connector);
    let mut tick = 0u64;
    loop {
        tick += 1;
        // Checks are due at a 100ms resolution; the health gauges need only a second's.
        let refresh_gauges = tick.is_multiple_of(GAUGE_EVERY);
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = stop.changed() => return,
        }
        let Some(snapshot) = current.load() else {
            continue;
        };
        let now = now_ms();
        for up in snapshot.upstreams.values() {
            for e in &up.endpoints {
                if refresh_gauges {
                    let labels = EndpointLabels {
                        upstream: up.name.to_string(),
                        endpoint: e.addr.to_string(),
                    };
                    let usable = e.health.available(now);
                    metrics
                        .endpoint_healthy
                        .get_or_create(&labels)
                        .set(i64::from(usable));
                }
                let Some(hc) = &up.health else { continue };
                if e.health
                    .next_check
                    .load(std::sync::atomic::Ordering::Relaxed)
                    > now
                    || e.health
                        .checking
                        .swap(true, std::sync::atomic::Ordering::Relaxed)
                {
                    continue;
                }
                let interval = u64::try_from(hc.interval.as_millis()).unwrap_or(u64::MAX);
                e.health.next_check.store(
                    now.saturating_add(interval),
                    std::sync::atomic::Ordering::Relaxed,
                );
                let client = if up.pool.key().tls.is_some() {
                    Probe::Tls(up.probe_client(e.addr))
                } else {
                    Probe::Plain(client.clone())
                };
                let (health, hc) = (e.health.clone(), hc.clone());
                let uri = format!("{}://{}{}", up.pool.scheme(), e.addr, hc.path);
                let name = (up.name.to_string(), e.addr);
                tokio::spawn(async move {
                    let ok = check(&client, &uri, hc.timeout, &hc.expect_status).await;
                    report(&health, ok, &hc, &name);
                    health
                        .checking
                        .store(false, std::sync::atomic::Ordering::Relaxed);
                });
            }
        }
    }
}

/// The client of one check: the shared plaintext one, or a TLS one for the upstream.
enum Probe {
    Plain(Client<HttpConnector, Empty<Bytes>>),
    Tls(Client<crate::tls::Connector, Empty<Bytes>>),
}

async fn check(client: &Probe, uri: &str, timeout: Duration, expect: &[u16]) -> bool {
    let Ok(uri) = uri.parse::<http::Uri>() else {
        return false;
    };
    let req = http::Request::get(uri)
        .header("user-agent", "dispa-health-check")
        .body(Empty::new());
    let Ok(req) = req else { return false };
    let sent = async {
        match client {
            Probe::Plain(c) => c.request(req).await,
            Probe::Tls(c) => c.request(req).await,
        }
    };
    match tokio::time::timeout(timeout, sent).await {
        Ok(Ok(resp)) if expect.is_empty() => {
            resp.status().is_success() || resp.status().is_redirection()
        }
        Ok(Ok(resp)) => expect.contains(&resp.status().as_u16()),
        _ => false,
    }
}

fn report(
    h: &EndpointHealth,
    ok: bool,
    hc: &dispa_proto::config::model::HealthCheck,
    (up, addr): &(String, std::net::SocketAddr),
) {
    match h.active(ok, hc) {
        Some(Transition::WentDown) => {
            tracing::warn!(upstream = %up, endpoint = %addr, "endpoint failed its health checks: down")
        }
        Some(Transition::CameBack) => {
            tracing::info!(upstream = %up, endpoint = %addr, "endpoint passes its health checks again: up")
        }
        _ => {}
    }
}
