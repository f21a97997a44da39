//! Prometheus metrics. Labels are bounded: route names come from config and status codes are
//! three digits, never raw paths or client addresses.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Route name, or "" when no route matched.
    pub route: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// Where the failure came from: "upstream_refused", "upstream_timeout", ...
    pub kind: String,
}

fn latency_histogram() -> Histogram {
    // 0.25ms .. ~16s
    Histogram::new(exponential_buckets(0.000_25, 2.0, 17))
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<RouteLabels, Histogram, fn() -> Histogram>,
    pub proxy_errors: Family<ErrorLabels, Counter>,
    pub in_flight: Gauge,
    pub config_version: Gauge,
    pub snapshots_applied: Counter,
    pub snapshots_rejected: Counter,
    pub plane_connected: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("dispa");
        let m = Metrics {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            proxy_errors: Family::default(),
            in_flight: Gauge::default(),
            config_version: Gauge::default(),
            snapshots_applied: Counter::default(),
            snapshots_rejected: Counter::default(),
            plane_connected: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "Requests answered, by route and status code",
            m.requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request received to response headers sent, by route",
            m.request_duration.clone(),
        );
        registry.register(
            "proxy_errors",
            "Requests that failed in the proxy, by kind",
            m.proxy_errors.clone(),
        );
        registry.register(
            "requests_in_flight",
            "Requests being handled now",
            m.in_flight.clone(),
        );
        registry.register(
            "config_version",
            "Config version being served (0 = none)",
            m.config_version.clone(),
        );
        registry.register(
            "snapshots_applied",
            "Snapshots accepted and swapped in",
            m.snapshots_applied.clone(),
        );
        registry.register(
            "snapshots_rejected",
            "Snapshots rejected (NACKed)",
            m.snapshots_rejected.clone(),
        );
        registry.register(
            "plane_connected",
            "1 while the config stream to the plane is open",
            m.plane_connected.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
