//! [`LogStore`] on sled (the default): tree `records` keyed by time so a query walks newest
//! first and stops at `since`; tree `batches` marks stored (agent, boot, seq) keys. A batch's
//! records and its marker are written in one transaction and flushed before the ack.

use std::path::Path;
use std::time::SystemTime;

use dispa_proto::v1::{LogBatch, LogRecord};
use prost::Message;
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use super::{LogFilter, LogStore, LogStoreError};

/// Cheap to clone: all clones share one database.
#[derive(Clone)]
pub struct SledLogStore {
    inner: std::sync::Arc<Inner>,
}

struct Inner {
    db: sled::Db,
    records: sled::Tree,
    batches: sled::Tree,
    max_records: usize,
}

fn io(e: impl std::fmt::Display) -> LogStoreError {
    LogStoreError::Io(e.to_string())
}

/// Sorts signed times correctly as bytes.
fn time_key(ts_us: i64) -> [u8; 8] {
    ((ts_us as u64) ^ (1 << 63)).to_be_bytes()
}

fn batch_key(b: &LogBatch) -> Vec<u8> {
    // Length-prefixed parts: no choice of ids can make two batches share a key.
    let mut k = Vec::with_capacity(b.agent_id.len() + b.boot_id.len() + 16);
    for part in [&b.agent_id, &b.boot_id] {
        k.extend_from_slice(&(part.len() as u32).to_be_bytes());
        k.extend_from_slice(part.as_bytes());
    }
    k.extend_from_slice(&b.seq.to_be_bytes());
    k
}

fn now_us() -> i64 {
    dispa_proto::logs::unix_us(SystemTime::now())
}

impl SledLogStore {
    /// Opens (or creates) the store in `dir`. `max_records` bounds its size; the oldest
    /// records go first.
    pub fn open(dir: &Path, max_records: usize) -> Result<Self, LogStoreError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(64 * 1024 * 1024)
            .open()
            .map_err(|e| LogStoreError::Io(format!("opening {}: {e}", dir.display())))?;
        let records = db.open_tree("records").map_err(io)?;
        let batches = db.open_tree("batches").map_err(io)?;
        Ok(Self {
            inner: std::sync::Arc::new(Inner {
                db,
                records,
                batches,
                max_records,
            }),
        })
    }
}

impl Inner {
    fn ingest_blocking(&self, batch: &LogBatch) -> Result<bool, LogStoreError> {
        let bkey = batch_key(batch);
        // Unique per stored batch, so equal timestamps never collide.
        let uid = self.db.generate_id().map_err(io)?;
        let encoded: Vec<(Vec<u8>, Vec<u8>)> = batch
            .records
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let mut k = Vec::with_capacity(20);
                k.extend_from_slice(&time_key(r.ts_us));
                k.extend_from_slice(&uid.to_be_bytes());
                k.extend_from_slice(&(i as u32).to_be_bytes());
                (k, r.encode_to_vec())
            })
            .collect();
        let stamp = now_us().to_be_bytes();
        let res = (&self.records, &self.batches).transaction(|(records, batches)| {
            if batches.get(&bkey)?.is_some() {
                return Ok(false);
            }
            for (k, v) in &encoded {
                records.insert(k.as_slice(), v.as_slice())?;
            }
            batches.insert(bkey.as_slice(), &stamp)?;
            Ok::<bool, ConflictableTransactionError<LogStoreError>>(true)
        });
        let stored = match res {
            Ok(s) => s,
            Err(TransactionError::Abort(e)) => return Err(e),
            Err(TransactionError::Storage(e)) => return Err(io(e)),
        };
        // Flush for duplicates too: the first copy may not be durable yet (its ingest may still
        // be flushing, or its flush failed), and the caller acks on our return.
        self.db.flush().map_err(io)?;
        Ok(stored)
    }

    fn query_blocking(&self, f: &LogFilter, limit: usize) -> Result<Vec<LogRecord>, LogStoreError> {
        let upper = f
            .until_us
            .map_or([0xff; 8], |t| time_key(t.saturating_add(1)));
        let mut out = Vec::new();
        for kv in self.records.range(..upper.as_slice()).rev() {
            if out.len() >= limit {
                break;
            }
            let (k, v) = kv.map_err(io)?;
            let r = LogRecord::decode(v.as_ref()).map_err(|e| LogStoreError::Corrupt {
                key: format!("{k:?}"),
                detail: e.to_string(),
            })?;
            if f.since_us.is_some_and(|s| r.ts_us < s) {
                break;
            }
            if f.matches(&r) {
                out.push(r);
            }
        }
        Ok(out)
    }

    fn retain_blocking(&self, before_us: i64) -> Result<u64, LogStoreError> {
        let mut removed = 0u64;
        let cutoff = time_key(before_us);
        let old: Vec<sled::IVec> = self
            .records
            .range(..cutoff.as_slice())
            .keys()
            .collect::<Result<_, _>>()
            .map_err(io)?;
        let excess = self
            .records
            .len()
            .saturating_sub(old.len())
            .saturating_sub(self.max_records);
        for k in old {
            self.records.remove(k).map_err(io)?;
            removed += 1;
        }
        if excess > 0 {
            let oldest: Vec<sled::IVec> = self
                .records
                .iter()
                .keys()
                .take(excess)
                .collect::<Result<_, _>>()
                .map_err(io)?;
            for k in oldest {
                self.records.remove(k).map_err(io)?;
                removed += 1;
            }
        }
        // Batch markers only need to outlive redelivery; keep them as long as records.
        for kv in self.batches.iter() {
            let (k, v) = kv.map_err(io)?;
            let ts = v.as_ref().try_into().map(i64::from_be_bytes).unwrap_or(0);
            if ts < before_us {
                self.batches.remove(k).map_err(io)?;
            }
        }
        self.db.flush().map_err(io)?;
        Ok(removed)
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, LogStoreError> + Send + 'static,
) -> Result<T, LogStoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| LogStoreError::Io(format!("store task failed: {e}")))?
}

#[tonic::async_trait]
impl LogStore for SledLogStore {
    fn kind(&self) -> &'static str {
        "sled"
    }

    async fn ingest(&self, batch: &LogBatch) -> Result<bool, LogStoreError> {
        let (s, b) = (self.inner.clone(), batch.clone());
        blocking(move || s.ingest_blocking(&b)).await
    }

    async fn query(
        &self,
        filter: &LogFilter,
        limit: usize,
    ) -> Result<Vec<LogRecord>, LogStoreError> {
        let (s, f) = (self.inner.clone(), filter.clone());
        blocking(move || s.query_blocking(&f, limit)).await
    }

    async fn retain(&self, before_us: i64) -> Result<u64, LogStoreError> {
        let s = self.inner.clone();
        blocking(move || s.retain_blocking(before_us)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(seq: u64, ts: &[i64]) -> LogBatch {
        LogBatch {
            agent_id: "a".into(),
            boot_id: "b".into(),
            seq,
            records: ts
                .iter()
                .map(|&t| LogRecord {
                    ts_us: t,
                    request_id: format!("r{t}"),
                    status: 200,
                    ..Default::default()
                })
                .collect(),
        }
    }

    #[tokio::test]
    async fn ingest_is_idempotent_and_query_is_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledLogStore::open(dir.path(), 1000).unwrap();
        assert!(s.ingest(&batch(1, &[10, 30])).await.unwrap());
        assert!(!s.ingest(&batch(1, &[10, 30])).await.unwrap(), "duplicate");
        assert!(s.ingest(&batch(2, &[20, 30])).await.unwrap());
        let all = s.query(&LogFilter::default(), 100).await.unwrap();
        assert_eq!(
            all.iter().map(|r| r.ts_us).collect::<Vec<_>>(),
            vec![30, 30, 20, 10]
        );
        let f = LogFilter {
            since_us: Some(15),
            until_us: Some(25),
            ..Default::default()
        };
        assert_eq!(s.query(&f, 100).await.unwrap().len(), 1);
        assert_eq!(s.query(&LogFilter::default(), 2).await.unwrap().len(), 2);
        assert_eq!(s.retain(25).await.unwrap(), 2);
        assert_eq!(s.query(&LogFilter::default(), 100).await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn size_bound_drops_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledLogStore::open(dir.path(), 3).unwrap();
        s.ingest(&batch(1, &[1, 2, 3, 4, 5])).await.unwrap();
        s.retain(0).await.unwrap();
        let left: Vec<i64> = s
            .query(&LogFilter::default(), 100)
            .await
            .unwrap()
            .iter()
            .map(|r| r.ts_us)
            .collect();
        assert_eq!(left, vec![5, 4, 3]);
    }
}
