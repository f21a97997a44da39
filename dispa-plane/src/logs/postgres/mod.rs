//! [`LogStore`] on PostgreSQL (`dispa plane --log-store postgres://...`).
//!
//! `dispa_log_batches` marks stored (agent, boot id, seq) keys; `dispa_logs` holds the
//! records, range-partitioned by `ts` into one partition per UTC day, created on demand. A
//! batch is one transaction: the marker insert decides whether it is new, then a binary COPY
//! writes its records. Retention drops whole days and trims the day that straddles the cutoff.
//!
//! The connection URL may carry a password, so no error or log line here quotes it.

mod codec;
mod schema;

use std::collections::HashSet;
use std::sync::Mutex as StdMutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use dispa_proto::v1::{LogBatch, LogRecord};
use tokio::sync::{Mutex, MutexGuard};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Config, NoTls, Statement};

use self::codec::{COLUMN_TYPES, COLUMNS, Numbers, PgTs};
use self::schema::{MigrateError, Names};
use super::{LogFilter, LogStore, LogStoreError};

/// How a [`PgLogStore`] connects.
#[derive(Clone, Debug)]
pub struct PgOptions {
    /// Schema holding the tables, created if missing. `None`: the connection's
    /// `current_schema()` (normally `public`), which must exist.
    pub schema: Option<String>,
    /// Connections kept open; each ingests or queries one request at a time.
    pub connections: usize,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            schema: None,
            connections: 4,
        }
    }
}

pub struct PgLogStore {
    names: Names,
    pool: Pool,
    /// Days whose partition is known to exist, so ingest skips the catalog lookup.
    partitions: StdMutex<HashSet<i64>>,
    copy_sql: String,
}

/// A fixed set of connections, each behind its own lock, opened lazily and reopened when
/// their connection has died.
struct Pool {
    config: Config,
    mark_sql: String,
    slots: Vec<Mutex<Option<Slot>>>,
    next: AtomicUsize,
}

struct Slot {
    client: Client,
    /// The batch-marker insert, prepared once per connection.
    mark: Statement,
}

struct Lease<'a>(MutexGuard<'a, Option<Slot>>);

impl Lease<'_> {
    fn slot(&mut self) -> Result<&mut Slot, LogStoreError> {
        self.0
            .as_mut()
            .ok_or_else(|| LogStoreError::Postgres("no connection".into()))
    }

    /// Drops the connection so the next lease opens a fresh one.
    fn discard(&mut self) {
        *self.0 = None;
    }
}

fn pg_err(what: &str, e: &tokio_postgres::Error) -> LogStoreError {
    LogStoreError::Postgres(format!("{what}: {}", describe(e)))
}

/// The server's message for database errors (tokio-postgres prints only "db error"), else the
/// error and its causes. None of these quote the connection string.
fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{db} (SQLSTATE {})", db.code().code()).replace('\n', "; ");
    }
    let mut s = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// Parses the URL without ever echoing it: tokio-postgres's parse errors can quote parts of
/// it (a character, an unknown key), which may belong to the password. Only "invalid value
/// for option `name`" is passed on, as it names a fixed option.
fn parse_url(url: &str) -> Result<Config, LogStoreError> {
    let mut config: Config = url.parse().map_err(|e: tokio_postgres::Error| {
        let hint = std::error::Error::source(&e)
            .map(|c| c.to_string())
            .filter(|c| c.starts_with("invalid value for option"))
            .map_or(String::new(), |c| format!(" ({c})"));
        LogStoreError::Postgres(format!("invalid PostgreSQL connection URL{hint}"))
    })?;
    if config.get_application_name().is_none() {
        config.application_name("dispa-plane");
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    Ok(config)
}

impl Pool {
    async fn open(&self) -> Result<Slot, LogStoreError> {
        let client = connect(&self.config).await?;
        let mark = client
            .prepare(&self.mark_sql)
            .await
            .map_err(|e| pg_err("preparing statements", &e))?;
        Ok(Slot { client, mark })
    }

    /// A free connection if there is one, else waits for one in round-robin order.
    async fn lease(&self) -> Result<Lease<'_>, LogStoreError> {
        let n = self.slots.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let free = (0..n).find_map(|i| self.slots[(start + i) % n].try_lock().ok());
        let mut guard = match free {
            Some(g) => g,
            None => self.slots[start].lock().await,
        };
        if guard.as_ref().is_none_or(|s| s.client.is_closed()) {
            *guard = None;
            *guard = Some(self.open().await?);
        }
        Ok(Lease(guard))
    }
}

async fn connect(config: &Config) -> Result<Client, LogStoreError> {
    let (client, connection) = config
        .connect(NoTls)
        .await
        .map_err(|e| pg_err("connecting to PostgreSQL", &e))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!("PostgreSQL connection lost: {}", describe(&e));
        }
    });
    Ok(client)
}

impl PgLogStore {
    /// Connects, creates or migrates the schema. Tables go in the connection's current
    /// schema (normally `public`).
    pub async fn connect(url: &str) -> Result<Self, LogStoreError> {
        Self::connect_with(url, PgOptions::default()).await
    }

    /// Like [`connect`](Self::connect), with the tables in `schema` (created if missing).
    pub async fn connect_with_schema(url: &str, schema: &str) -> Result<Self, LogStoreError> {
        Self::connect_with(
            url,
            PgOptions {
                schema: Some(schema.to_string()),
                ..PgOptions::default()
            },
        )
        .await
    }

    pub async fn connect_with(url: &str, opts: PgOptions) -> Result<Self, LogStoreError> {
        let config = parse_url(url)?;
        let mut client = connect(&config).await?;
        let schema = match &opts.schema {
            Some(s) if s.is_empty() || s.contains('\0') => {
                return Err(LogStoreError::Postgres(format!(
                    "invalid schema name {s:?}"
                )));
            }
            Some(s) => s.clone(),
            None => client
                .query_one("SELECT current_schema()", &[])
                .await
                .and_then(|r| r.try_get::<_, Option<String>>(0))
                .map_err(|e| pg_err("finding the current schema", &e))?
                .ok_or_else(|| {
                    LogStoreError::Postgres(
                        "no current schema to create tables in: check search_path".into(),
                    )
                })?,
        };
        let names = Names::new(&schema);
        schema::migrate(&mut client, &names, opts.schema.is_some())
            .await
            .map_err(|e| match e {
                MigrateError::Pg(e) => pg_err("creating or migrating tables", &e),
                MigrateError::TooNew(v) => LogStoreError::Postgres(format!(
                    "schema {schema:?} is at version {v}, newer than this build supports"
                )),
            })?;
        let pool = Pool {
            config,
            mark_sql: format!(
                "INSERT INTO {} (agent, boot_id, seq) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                names.batches
            ),
            slots: (0..opts.connections.max(1))
                .map(|_| Mutex::new(None))
                .collect(),
            next: AtomicUsize::new(0),
        };
        // Keep the first connection rather than opening it again on the first request.
        let mark = client
            .prepare(&pool.mark_sql)
            .await
            .map_err(|e| pg_err("preparing statements", &e))?;
        if let Some(first) = pool.slots.first() {
            *first.lock().await = Some(Slot { client, mark });
        }
        Ok(PgLogStore {
            copy_sql: format!("COPY {} ({COLUMNS}) FROM STDIN (FORMAT binary)", names.logs),
            names,
            pool,
            partitions: StdMutex::new(HashSet::new()),
        })
    }

    fn known_partitions(&self) -> std::sync::MutexGuard<'_, HashSet<i64>> {
        // The set is only a cache; a panic elsewhere cannot leave it wrong, only incomplete.
        self.partitions.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn ensure_partitions(
        &self,
        client: &mut Client,
        records: &[LogRecord],
    ) -> Result<(), tokio_postgres::Error> {
        let mut days: Vec<i64> = Vec::new();
        for r in records {
            let d = schema::day_of(r.ts_us);
            if !days.contains(&d) {
                days.push(d);
            }
        }
        days.retain(|d| !self.known_partitions().contains(d));
        for d in days {
            schema::create_partition(client, &self.names, d).await?;
            self.known_partitions().insert(d);
        }
        Ok(())
    }

    async fn ingest_on(
        &self,
        slot: &mut Slot,
        batch: &LogBatch,
    ) -> Result<bool, tokio_postgres::Error> {
        let Slot { client, mark } = slot;
        self.ensure_partitions(client, &batch.records).await?;
        let tx = client.transaction().await?;
        // The u64 is stored by its bit pattern: distinct sequence numbers stay distinct.
        let seq = batch.seq as i64;
        let inserted = tx
            .execute(&*mark, &[&batch.agent_id, &batch.boot_id, &seq])
            .await?;
        if inserted == 0 {
            tx.commit().await?;
            return Ok(false);
        }
        if !batch.records.is_empty() {
            let sink = tx.copy_in(&self.copy_sql).await?;
            let writer = BinaryCopyInWriter::new(sink, &COLUMN_TYPES);
            let mut writer = std::pin::pin!(writer);
            for r in &batch.records {
                let nums = Numbers::of(r);
                writer.as_mut().write(&nums.row(r)).await?;
            }
            writer.as_mut().finish().await?;
        }
        tx.commit().await?;
        Ok(true)
    }
}

/// Whether a failed ingest may simply be tried again (besides a lost connection, which always
/// may: the store is idempotent, so even a commit whose outcome is unknown is safe to repeat).
fn retryable(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        // A cached partition vanished (retention, possibly by another plane).
        *c == SqlState::CHECK_VIOLATION
            || *c == SqlState::T_R_DEADLOCK_DETECTED
            || *c == SqlState::T_R_SERIALIZATION_FAILURE
    })
}

/// Errors after which the connection is not worth keeping: I/O or protocol failures, or the
/// server ending the session (restart, pg_terminate_backend).
fn connection_lost(e: &tokio_postgres::Error, client: &Client) -> bool {
    client.is_closed()
        || e.as_db_error().is_none()
        || e.code() == Some(&SqlState::ADMIN_SHUTDOWN)
        || e.code() == Some(&SqlState::CRASH_SHUTDOWN)
}

const INGEST_TRIES: u32 = 3;

#[tonic::async_trait]
impl LogStore for PgLogStore {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    async fn ingest(&self, batch: &LogBatch) -> Result<bool, LogStoreError> {
        let mut tries = 0;
        loop {
            tries += 1;
            let mut lease = self.pool.lease().await?;
            let slot = lease.slot()?;
            let err = match self.ingest_on(slot, batch).await {
                Ok(stored) => return Ok(stored),
                Err(e) => e,
            };
            let lost = connection_lost(&err, &slot.client);
            if lost {
                lease.discard();
            }
            if err.code() == Some(&SqlState::CHECK_VIOLATION) {
                self.known_partitions().clear();
            }
            if tries >= INGEST_TRIES || !(lost || retryable(&err)) {
                return Err(pg_err("storing a log batch", &err));
            }
            tracing::debug!("retrying a log batch: {}", describe(&err));
        }
    }

    async fn query(
        &self,
        filter: &LogFilter,
        limit: usize,
    ) -> Result<Vec<LogRecord>, LogStoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let (sql, params) = codec::select_sql(&self.names.logs, filter, limit);
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            params.iter().map(|p| &**p as _).collect();
        let mut tries = 0;
        let rows = loop {
            tries += 1;
            let mut lease = self.pool.lease().await?;
            let slot = lease.slot()?;
            match slot.client.query(&sql, &refs).await {
                Ok(rows) => break rows,
                // A read is safe to repeat on a fresh connection.
                Err(e) if connection_lost(&e, &slot.client) => {
                    lease.discard();
                    if tries >= 2 {
                        return Err(pg_err("querying logs", &e));
                    }
                }
                Err(e) => return Err(pg_err("querying logs", &e)),
            }
        };
        rows.iter()
            .map(codec::record_of)
            .collect::<Result<_, _>>()
            .map_err(|e| pg_err("reading a log row", &e))
    }

    /// Drops the partitions of days wholly before `before_us`, deletes older rows from the
    /// day that straddles it, and forgets batch markers received before it. The count covers
    /// both; for a dropped day it is the rows counted just before the drop, so a record
    /// stored into that day in between is removed but not counted.
    async fn retain(&self, before_us: i64) -> Result<u64, LogStoreError> {
        let cutoff = PgTs::from_unix_us(before_us);
        let mut lease = self.pool.lease().await?;
        let slot = lease.slot()?;
        let res = retain_on(&mut slot.client, &self.names, cutoff).await;
        if res
            .as_ref()
            .is_err_and(|e| connection_lost(e, &slot.client))
        {
            lease.discard();
        }
        let (removed, dropped) = res.map_err(|e| pg_err("removing expired logs", &e))?;
        if dropped {
            self.known_partitions().clear();
        }
        Ok(removed)
    }
}

/// Returns (rows removed, whether any partition was dropped).
async fn retain_on(
    client: &mut Client,
    names: &Names,
    cutoff: PgTs,
) -> Result<(u64, bool), tokio_postgres::Error> {
    let old = schema::partitions_before(client, names, schema::day_of(cutoff.0)).await?;
    let mut removed = 0u64;
    for name in &old {
        let table = names.partition(name);
        let tx = client.transaction().await?;
        schema::advisory_lock(&tx, names, "partition").await?;
        let n: i64 = tx
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await?
            .try_get(0)?;
        tx.batch_execute(&format!("DROP TABLE IF EXISTS {table}"))
            .await?;
        tx.commit().await?;
        removed += u64::try_from(n).unwrap_or(0);
    }
    removed += client
        .execute(
            &format!("DELETE FROM {} WHERE ts < $1", names.logs),
            &[&cutoff],
        )
        .await?;
    client
        .execute(
            &format!("DELETE FROM {} WHERE received_at < $1", names.batches),
            &[&cutoff],
        )
        .await?;
    Ok((removed, !old.is_empty()))
}
