//! [`LogStore`] on PostgreSQL (`dispa plane --log-store postgres://...`).

use dispa_proto::v1::{LogBatch, LogRecord};

use super::{LogFilter, LogStore, LogStoreError};

pub struct PgLogStore {}

impl PgLogStore {
    /// Connects, creates or migrates the schema.
    pub async fn connect(url: &str) -> Result<Self, LogStoreError> {
        let _ = url;
        Err(LogStoreError::Postgres("not built yet".into()))
    }
}

#[tonic::async_trait]
impl LogStore for PgLogStore {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    async fn ingest(&self, _batch: &LogBatch) -> Result<bool, LogStoreError> {
        Err(LogStoreError::Postgres("not built yet".into()))
    }

    async fn query(
        &self,
        _filter: &LogFilter,
        _limit: usize,
    ) -> Result<Vec<LogRecord>, LogStoreError> {
        Err(LogStoreError::Postgres("not built yet".into()))
    }

    async fn retain(&self, _before_us: i64) -> Result<u64, LogStoreError> {
        Err(LogStoreError::Postgres("not built yet".into()))
    }
}
