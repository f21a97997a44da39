//! The on-disk spool of log batches: every batch is written here before it is shipped, and
//! deleted when the plane acks it. Survives plane outages and agent restarts; bounded by
//! bytes, and what would exceed the bound is dropped and counted.
//!
//! One file per batch, `{order:020}-{boot}-{seq}.batch`, written to a temp name, fsynced and
//! renamed, so a crash leaves whole batches or none.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use dispa_proto::v1::LogBatch;
use prost::Message;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("log spool {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("log spool file {path} is corrupt: {detail}")]
    Corrupt { path: PathBuf, detail: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpoolEntry {
    pub order: u64,
    pub boot_id: String,
    pub seq: u64,
    pub bytes: u64,
    pub records: u64,
}

#[derive(Default)]
struct State {
    entries: BTreeMap<u64, SpoolEntry>,
    next_order: u64,
    bytes: u64,
}

pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    state: Mutex<State>,
}

fn parse_name(name: &str) -> Option<(u64, String, u64)> {
    let stem = name.strip_suffix(".batch")?;
    let (order, rest) = stem.split_once('-')?;
    let (boot, seq) = rest.rsplit_once('-')?;
    Some((order.parse().ok()?, boot.to_string(), seq.parse().ok()?))
}

impl Spool {
    /// Opens the spool in `dir`, indexing batches left by earlier runs.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self, SpoolError> {
        let io = |source| SpoolError::Io {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut st = State::default();
        for e in std::fs::read_dir(dir).map_err(io)? {
            let e = e.map_err(io)?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") {
                // An interrupted write: never acked, never complete.
                let _ = std::fs::remove_file(e.path());
                continue;
            }
            let Some((order, boot_id, seq)) = parse_name(&name) else {
                continue;
            };
            let bytes = e.metadata().map_err(io)?.len();
            st.bytes += bytes;
            st.next_order = st.next_order.max(order + 1);
            st.entries.insert(
                order,
                SpoolEntry {
                    order,
                    boot_id,
                    seq,
                    bytes,
                    records: 0,
                },
            );
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            max_bytes,
            state: Mutex::new(st),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn path(&self, e: &SpoolEntry) -> PathBuf {
        self.dir
            .join(format!("{:020}-{}-{}.batch", e.order, e.boot_id, e.seq))
    }

    /// Writes a batch durably. `Ok(false)`: it would exceed the bound and was not written.
    pub fn push(&self, batch: &LogBatch) -> Result<bool, SpoolError> {
        let bytes = batch.encode_to_vec();
        let entry = {
            let mut st = self.lock();
            if st.bytes + bytes.len() as u64 > self.max_bytes {
                return Ok(false);
            }
            let order = st.next_order;
            st.next_order += 1;
            // Reserve the space now so concurrent pushes respect the bound.
            st.bytes += bytes.len() as u64;
            SpoolEntry {
                order,
                boot_id: batch.boot_id.clone(),
                seq: batch.seq,
                bytes: bytes.len() as u64,
                records: batch.records.len() as u64,
            }
        };
        let path = self.path(&entry);
        let tmp = path.with_extension("tmp");
        let written = (|| {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            // The rename itself must survive a power loss too.
            std::fs::File::open(&self.dir)?.sync_all()
        })();
        if let Err(source) = written {
            self.lock().bytes -= entry.bytes;
            let _ = std::fs::remove_file(&tmp);
            return Err(SpoolError::Io { path, source });
        }
        self.lock().entries.insert(entry.order, entry);
        Ok(true)
    }

    /// Up to `n` entries after `after` (exclusive), oldest first.
    pub fn after(&self, after: Option<u64>, n: usize) -> Vec<SpoolEntry> {
        let st = self.lock();
        let from = after.map_or(0, |a| a + 1);
        st.entries
            .range(from..)
            .take(n)
            .map(|(_, e)| e.clone())
            .collect()
    }

    pub fn read(&self, e: &SpoolEntry) -> Result<LogBatch, SpoolError> {
        let path = self.path(e);
        let bytes = std::fs::read(&path).map_err(|source| SpoolError::Io {
            path: path.clone(),
            source,
        })?;
        LogBatch::decode(bytes.as_slice()).map_err(|err| SpoolError::Corrupt {
            path,
            detail: err.to_string(),
        })
    }

    /// Deletes an acked (or unreadable) batch.
    pub fn remove(&self, order: u64) {
        let removed = self.lock().entries.remove(&order);
        if let Some(e) = removed {
            let _ = std::fs::remove_file(self.path(&e));
            self.lock().bytes -= e.bytes;
        }
    }

    /// (batches, bytes) waiting to be acked.
    pub fn depth(&self) -> (usize, u64) {
        let st = self.lock();
        (st.entries.len(), st.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dispa_proto::v1::LogRecord;

    fn batch(seq: u64, n: usize) -> LogBatch {
        LogBatch {
            agent_id: "a".into(),
            boot_id: "boot1".into(),
            seq,
            records: (0..n)
                .map(|i| LogRecord {
                    request_id: format!("{seq}-{i}"),
                    ..Default::default()
                })
                .collect(),
        }
    }

    #[test]
    fn persists_in_order_across_reopen_and_respects_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path(), 10_000).unwrap();
        assert!(s.push(&batch(1, 2)).unwrap());
        assert!(s.push(&batch(2, 2)).unwrap());
        let first = s.after(None, 10);
        assert_eq!(first.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2]);
        s.remove(first[0].order);
        drop(s);
        let s = Spool::open(dir.path(), 10_000).unwrap();
        let left = s.after(None, 10);
        assert_eq!(left.len(), 1);
        assert_eq!(s.read(&left[0]).unwrap().records[1].request_id, "2-1");
        assert!(s.push(&batch(3, 1)).unwrap());
        assert_eq!(s.after(Some(left[0].order), 10)[0].seq, 3);
        assert!(!s.push(&batch(4, 5000)).unwrap(), "over the bound");
        assert_eq!(s.depth().0, 2);
    }
}
