//! The agent's admin port: /healthz (alive), /readyz (has a snapshot), /metrics, /config.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::Full;

use crate::snapshot::Current;
use crate::telemetry::Metrics;

pub struct AdminApi {
    pub current: Arc<Current>,
    pub metrics: Arc<Metrics>,
    pub id: String,
}

fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

impl AdminApi {
    pub async fn serve(
        self: Arc<Self>,
        req: Request<crate::conn::ClientBody>,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        Ok(match req.uri().path() {
            "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n"),
            "/readyz" => match self.current.load() {
                Some(s) => reply(
                    StatusCode::OK,
                    "text/plain",
                    format!("ready: serving version {}\n", s.version),
                ),
                None => reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "not ready: no snapshot yet\n",
                ),
            },
            "/metrics" => {
                self.refresh_gauges();
                reply(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    self.metrics.render(),
                )
            }
            "/config" => reply(StatusCode::OK, "application/json", self.config_json()),
            _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
        })
    }

    /// Gauges read from the current snapshot at scrape time.
    fn refresh_gauges(&self) {
        let (mut keys, mut overflow) = (0u64, 0u64);
        if let Some(s) = self.current.load() {
            for g in s.rate_gates.values() {
                keys += g.keys() as u64;
                overflow += g.overflowed.load(std::sync::atomic::Ordering::Relaxed);
            }
        }
        let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.metrics.rate_limit_keys.set(gauge(keys));
        self.metrics.rate_limit_overflow.set(gauge(overflow));
    }

    fn config_json(&self) -> String {
        let body = match self.current.load() {
            None => {
                serde_json::json!({ "agent": self.id, "version": 0, "hash": null, "routes": [], "upstreams": {} })
            }
            Some(s) => {
                let upstreams: serde_json::Map<String, serde_json::Value> = s
                    .upstreams
                    .iter()
                    .map(|(n, u)| {
                        let eps: Vec<String> =
                            u.endpoints.iter().map(|e| e.addr.to_string()).collect();
                        (n.to_string(), serde_json::json!(eps))
                    })
                    .collect();
                let now = crate::upstream::health::now_ms();
                let health: serde_json::Map<String, serde_json::Value> = s
                    .upstreams
                    .iter()
                    .map(|(n, u)| {
                        let eps: serde_json::Map<String, serde_json::Value> = u
                            .endpoints
                            .iter()
                            .map(|e| {
                                let state = if e.health.is_down() {
                                    "down"
                                } else if e.health.is_ejected(now) {
                                    "ejected"
                                } else {
                                    "up"
                                };
                                (e.addr.to_string(), serde_json::json!(state))
                            })
                            .collect();
                        (n.to_string(), serde_json::Value::Object(eps))
                    })
                    .collect();
                let routes: Vec<String> = s.routes.routes().map(|r| r.name.to_string()).collect();
                // Names and hosts only: never key material.
                let certificates: serde_json::Map<String, serde_json::Value> = s
                    .config
                    .certificates
                    .values()
                    .map(|c| {
                        let hosts: Vec<String> = c.hosts.iter().map(ToString::to_string).collect();
                        (
                            c.name.clone(),
                            serde_json::json!({ "hosts": hosts, "default": c.default, "mtls": c.client_ca.is_some() }),
                        )
                    })
                    .collect();
                serde_json::json!({
                    "agent": self.id,
                    "version": s.version.0,
                    "hash": s.hash,
                    "routes": routes,
                    "upstreams": upstreams,
                    "health": health,
                    "certificates": certificates,
                })
            }
        };
        format!("{body}\n")
    }
}
