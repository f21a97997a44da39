//! The plane's own Prometheus metrics, served at `/metrics` on the plane's port.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

pub struct PlaneMetrics {
    registry: Registry,
    pub config_version: Gauge,
    pub versions_created: Counter,
    pub agents_connected: Gauge,
    pub agents_synced: Gauge,
    pub log_records_ingested: Counter,
    pub log_batches_duplicate: Counter,
    pub log_store_errors: Counter,
}

impl Default for PlaneMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl PlaneMetrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("dispa_plane");
        let m = PlaneMetrics {
            registry: Registry::default(),
            config_version: Gauge::default(),
            versions_created: Counter::default(),
            agents_connected: Gauge::default(),
            agents_synced: Gauge::default(),
            log_records_ingested: Counter::default(),
            log_batches_duplicate: Counter::default(),
            log_store_errors: Counter::default(),
        };
        r.register(
            "config_version",
            "Newest config version",
            m.config_version.clone(),
        );
        r.register(
            "versions_created",
            "Versions stored by apply or rollback",
            m.versions_created.clone(),
        );
        r.register(
            "agents_connected",
            "Agents with an open config stream",
            m.agents_connected.clone(),
        );
        r.register(
            "agents_synced",
            "Agents serving the newest version",
            m.agents_synced.clone(),
        );
        r.register(
            "log_records_ingested",
            "Traffic-log records stored",
            m.log_records_ingested.clone(),
        );
        r.register(
            "log_batches_duplicate",
            "Redelivered log batches recognised and skipped",
            m.log_batches_duplicate.clone(),
        );
        r.register(
            "log_store_errors",
            "Log batches the store failed to write",
            m.log_store_errors.clone(),
        );
        PlaneMetrics { registry: r, ..m }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
