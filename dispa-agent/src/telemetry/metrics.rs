//! Prometheus metrics. Labels are bounded: route and upstream names come from config, status
//! is a class ("2xx"), reasons are fixed strings; never raw paths or client addresses.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Per-request lookups by route and upstream name (fast hash; names come from config).
type NameMap<V> = foldhash::HashMap<String, V>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Route name, or "" when no route matched.
    pub route: String,
    /// Upstream name, or "" when none was chosen.
    pub upstream: String,
    /// "1xx".."5xx".
    pub status_class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub route: String,
    pub upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub upstream: String,
    /// The endpoint's address, from config (bounded by it).
    pub endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

fn latency_histogram() -> Histogram {
    // 0.25ms .. ~16s
    Histogram::new(exponential_buckets(0.000_25, 2.0, 17))
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Histograms<RouteLabels>,
    pub upstream_duration: Histograms<UpstreamLabels>,
    /// Requests the agent answered itself, by reason ("no_route", "upstream_timeout", ...).
    pub denied: Family<ReasonLabels, Counter>,
    pub in_flight: Gauge,
    pub retries: Counter,
    pub mirrored: Counter,
    /// Mirror copies not sent because too many were already in flight.
    pub mirror_dropped: Counter,
    /// 1 while an endpoint takes traffic (not down by checks, not ejected).
    pub endpoint_healthy: Family<EndpointLabels, Gauge>,
    pub connections_open: Gauge,
    pub connections_accepted: Counter,
    /// TLS handshakes that failed (no certificate for the name, protocol version, client
    /// certificate refused, or the client gave up).
    pub tls_handshake_failures: Counter,
    /// Connections closed at accept, by reason (max_connections, max_connections_per_ip, ...).
    pub connections_refused: Family<ReasonLabels, Counter>,
    /// Connections closed because their PROXY header was refused (untrusted, malformed, ...).
    pub proxy_protocol_rejected: Family<ReasonLabels, Counter>,
    /// Connections the agent closed for a timeout (header_timeout, idle_timeout).
    pub connections_closed: Family<ReasonLabels, Counter>,
    pub config_version: Gauge,
    pub snapshots_applied: Counter,
    pub snapshots_rejected: Counter,
    pub plane_connected: Gauge,
    /// Keys tracked by the current snapshot's rate limits (each limit holds at most
    /// `policy::rate::MAX_KEYS`).
    pub rate_limit_keys: Gauge,
    /// Requests counted in a shared overflow bucket because a limit's key table was full.
    pub rate_limit_overflow: Gauge,
    pub log_queue_depth: Gauge,
    pub log_spool_batches: Gauge,
    pub log_spool_bytes: Gauge,
    pub log_batches_shipped: Counter,
    log_dropped: Family<ReasonLabels, Counter>,
    log_dropped_total: AtomicU64,
    /// Request series handles by route, then upstream: looked up without building labels.
    meters: RwLock<NameMap<NameMap<Arc<RequestMeters>>>>,
}

/// One (route, upstream) pair's request series, each made on first use (an unused status
/// class stays out of the exposition).
#[derive(Debug, Default)]
pub struct RequestMeters {
    route: String,
    upstream: String,
    by_class: [OnceLock<Counter>; 5],
    upstream_duration: OnceLock<Histogram>,
    request_duration: OnceLock<Histogram>,
}

impl RequestMeters {
    /// The upstream of the series ("" for none).
    pub fn upstream(&self) -> &str {
        &self.upstream
    }

    /// Counts a request answered with `status`.
    pub fn answered(&self, m: &Metrics, status: u16) {
        let i = usize::from((status / 100).clamp(1, 5) - 1);
        self.by_class[i]
            .get_or_init(|| {
                m.requests
                    .get_or_create(&RequestLabels {
                        route: self.route.clone(),
                        upstream: self.upstream.clone(),
                        status_class: status_class(status).to_string(),
                    })
                    .clone()
            })
            .inc();
    }

    pub fn upstream_took(&self, m: &Metrics, seconds: f64) {
        self.upstream_duration
            .get_or_init(|| {
                m.upstream_duration
                    .get_or_create(&UpstreamLabels {
                        route: self.route.clone(),
                        upstream: self.upstream.clone(),
                    })
                    .clone()
            })
            .observe(seconds);
    }

    pub fn request_took(&self, m: &Metrics, seconds: f64) {
        self.request_duration
            .get_or_init(|| {
                m.request_duration
                    .get_or_create(&RouteLabels {
                        route: self.route.clone(),
                    })
                    .clone()
            })
            .observe(seconds);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// The request series of `route` and `upstream` ("" for none). Bounded like the series
    /// themselves: names come from config.
    pub fn meters(&self, route: &str, upstream: &str) -> Arc<RequestMeters> {
        if let Ok(m) = self.meters.read()
            && let Some(found) = m.get(route).and_then(|u| u.get(upstream))
        {
            return found.clone();
        }
        let mut m = self
            .meters
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        m.entry(route.to_string())
            .or_default()
            .entry(upstream.to_string())
            .or_insert_with(|| {
                Arc::new(RequestMeters {
                    route: route.to_string(),
                    upstream: upstream.to_string(),
                    ..RequestMeters::default()
                })
            })
            .clone()
    }

    pub fn new() -> Self {
        let mut r = Registry::with_prefix("dispa");
        let m = Metrics {
            registry: Registry::default(),
            requests: Family::default(),
            request_duration: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            upstream_duration: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            denied: Family::default(),
            in_flight: Gauge::default(),
            retries: Counter::default(),
            mirrored: Counter::default(),
            mirror_dropped: Counter::default(),
            endpoint_healthy: Family::default(),
            connections_open: Gauge::default(),
            connections_accepted: Counter::default(),
            connections_refused: Family::default(),
            proxy_protocol_rejected: Family::default(),
            connections_closed: Family::default(),
            config_version: Gauge::default(),
            snapshots_applied: Counter::default(),
            snapshots_rejected: Counter::default(),
            plane_connected: Gauge::default(),
            log_queue_depth: Gauge::default(),
            log_spool_batches: Gauge::default(),
            log_spool_bytes: Gauge::default(),
            log_batches_shipped: Counter::default(),
            log_dropped: Family::default(),
            log_dropped_total: AtomicU64::new(0),
            meters: RwLock::default(),
            tls_handshake_failures: Counter::default(),
            rate_limit_keys: Gauge::default(),
            rate_limit_overflow: Gauge::default(),
        };
        r.register(
            "requests",
            "Requests answered, by route, upstream and status class",
            m.requests.clone(),
        );
        r.register(
            "request_duration_seconds",
            "Request arrival to last response byte, by route",
            m.request_duration.clone(),
        );
        r.register(
            "upstream_duration_seconds",
            "Upstream request sent to upstream response headers, by route and upstream",
            m.upstream_duration.clone(),
        );
        r.register(
            "denied_requests",
            "Requests the agent answered itself, by reason",
            m.denied.clone(),
        );
        r.register(
            "requests_in_flight",
            "Requests being handled now",
            m.in_flight.clone(),
        );
        r.register(
            "connections_open",
            "Client connections open now",
            m.connections_open.clone(),
        );
        r.register(
            "connections_accepted",
            "Client connections accepted",
            m.connections_accepted.clone(),
        );
        r.register(
            "connections_refused",
            "Client connections closed at accept by a connection limit, by reason",
            m.connections_refused.clone(),
        );
        r.register(
            "proxy_protocol_rejected",
            "Client connections closed because their PROXY protocol header was refused, by reason",
            m.proxy_protocol_rejected.clone(),
        );
        r.register(
            "connections_closed",
            "Client connections the agent closed for a timeout, by reason",
            m.connections_closed.clone(),
        );
        r.register(
            "config_version",
            "Config version being served (0 = none)",
            m.config_version.clone(),
        );
        r.register(
            "snapshots_applied",
            "Snapshots accepted and swapped in",
            m.snapshots_applied.clone(),
        );
        r.register(
            "snapshots_rejected",
            "Snapshots rejected (NACKed)",
            m.snapshots_rejected.clone(),
        );
        r.register(
            "plane_connected",
            "1 while the config stream to the plane is open",
            m.plane_connected.clone(),
        );
        r.register(
            "log_queue_depth",
            "Access-log records waiting in memory",
            m.log_queue_depth.clone(),
        );
        r.register(
            "log_spool_batches",
            "Log batches on disk waiting for the plane's ack",
            m.log_spool_batches.clone(),
        );
        r.register(
            "log_spool_bytes",
            "Bytes of log batches on disk waiting for the plane's ack",
            m.log_spool_bytes.clone(),
        );
        r.register(
            "log_batches_shipped",
            "Log batches the plane acked",
            m.log_batches_shipped.clone(),
        );
        r.register(
            "log_records_dropped",
            "Access-log records dropped, by reason",
            m.log_dropped.clone(),
        );
        // Present at 0 from the start, so alerts and dashboards see the series before a drop.
        for reason in ["queue_full", "spool_full", "spool_error"] {
            drop(m.log_dropped.get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            }));
        }
        r.register(
            "mirrored_requests",
            "Request copies sent to mirror upstreams",
            m.mirrored.clone(),
        );
        r.register(
            "mirror_dropped",
            "Request copies not sent: too many mirror requests in flight",
            m.mirror_dropped.clone(),
        );
        r.register(
            "upstream_retries",
            "Upstream attempts after the first",
            m.retries.clone(),
        );
        r.register(
            "endpoint_healthy",
            "1 while an endpoint takes traffic, 0 while down or ejected",
            m.endpoint_healthy.clone(),
        );
        r.register(
            "tls_handshake_failures",
            "TLS handshakes on the TLS listener that failed",
            m.tls_handshake_failures.clone(),
        );
        r.register(
            "rate_limit_keys",
            "Keys (clients, API keys, header values) tracked by rate limits now",
            m.rate_limit_keys.clone(),
        );
        r.register(
            "rate_limit_overflow",
            "Requests counted in a shared bucket because a rate limit's key table was full (since the limit was configured)",
            m.rate_limit_overflow.clone(),
        );
        Metrics { registry: r, ..m }
    }

    pub fn log_dropped(&self, reason: &str, n: u64) {
        self.log_dropped
            .get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            })
            .inc_by(n);
        self.log_dropped_total.fetch_add(n, Ordering::Relaxed);
    }

    pub fn log_dropped_total(&self) -> u64 {
        self.log_dropped_total.load(Ordering::Relaxed)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// "2xx" for 204 and so on.
pub fn status_class(status: u16) -> &'static str {
    match status / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        _ => "5xx",
    }
}
