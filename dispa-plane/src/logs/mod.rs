//! Traffic logs on the plane: a [`LogStore`] trait with sled and PostgreSQL implementations,
//! the filter and statistics shared by both, and the Telemetry ingest service.

mod filter;
mod ingest;
pub mod postgres;
mod sled_store;
mod stats;

use std::sync::Arc;

use dispa_proto::v1::{LogBatch, LogRecord};

pub use filter::{LogFilter, StatusMatch};
pub use ingest::{LiveLogs, TelemetryService};
pub use sled_store::SledLogStore;
pub use stats::compute_stats;

#[derive(Debug, thiserror::Error)]
pub enum LogStoreError {
    #[error("log store I/O failed: {0}")]
    Io(String),
    #[error("stored log record {key} is corrupt: {detail}")]
    Corrupt { key: String, detail: String },
    #[error("PostgreSQL: {0}")]
    Postgres(String),
}

/// Where traffic-log records are kept. Every implementation stores a batch at most once
/// (idempotent on agent + boot id + sequence) and durably before `ingest` returns.
#[tonic::async_trait]
pub trait LogStore: Send + Sync + 'static {
    /// A short name for status output ("sled", "postgres").
    fn kind(&self) -> &'static str;

    /// Stores the batch unless it was stored before. `Ok(true)`: stored now; `Ok(false)`: a
    /// duplicate, nothing written.
    async fn ingest(&self, batch: &LogBatch) -> Result<bool, LogStoreError>;

    /// Matching records, newest first, at most `limit`.
    async fn query(
        &self,
        filter: &LogFilter,
        limit: usize,
    ) -> Result<Vec<LogRecord>, LogStoreError>;

    /// Deletes records older than `before_us` (Unix microseconds) and whatever else the
    /// store's size bound requires. Returns how many records were removed, where known.
    async fn retain(&self, before_us: i64) -> Result<u64, LogStoreError>;
}

pub type SharedLogStore = Arc<dyn LogStore>;
