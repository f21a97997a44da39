//! [`ConfigStore`] on sled: tree `versions` (big-endian u64 -> record), tree `meta` (`head`).
//! An append is one transaction over both trees, flushed before it returns.

use std::path::Path;

use bytes::Bytes;
use dispa_proto::Version;
use dispa_proto::config::Attachments;
use prost::Message;
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use super::{ConfigStore, StoreError, VersionMeta, VersionRecord};

const HEAD_KEY: &[u8] = b"head";

/// The on-disk encoding of a version (protobuf, so fields can be added compatibly).
#[derive(Clone, PartialEq, prost::Message)]
struct StoredVersion {
    #[prost(uint64, tag = "1")]
    version: u64,
    #[prost(string, tag = "2")]
    hash: String,
    #[prost(string, tag = "3")]
    author: String,
    #[prost(string, tag = "4")]
    message: String,
    #[prost(int64, tag = "5")]
    created_at_ms: i64,
    #[prost(uint64, tag = "6")]
    rollback_of: u64,
    #[prost(string, tag = "7")]
    source_name: String,
    #[prost(string, tag = "8")]
    content: String,
    #[prost(bytes = "bytes", tag = "9")]
    snapshot: Bytes,
    #[prost(message, repeated, tag = "10")]
    files: Vec<StoredFile>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct StoredFile {
    #[prost(string, tag = "1")]
    path: String,
    #[prost(bytes = "bytes", tag = "2")]
    content: Bytes,
}

impl StoredVersion {
    fn into_record(self) -> VersionRecord {
        VersionRecord {
            version: Version(self.version),
            meta: VersionMeta {
                hash: self.hash,
                author: self.author,
                message: self.message,
                created_at_ms: self.created_at_ms,
                rollback_of: (self.rollback_of != 0).then_some(Version(self.rollback_of)),
                source_name: self.source_name,
            },
            content: self.content,
            files: self
                .files
                .into_iter()
                .map(|f| (f.path, f.content))
                .collect(),
            snapshot: self.snapshot,
        }
    }
}

pub struct SledStore {
    db: sled::Db,
    versions: sled::Tree,
    meta: sled::Tree,
}

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

impl SledStore {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = sled::open(dir)
            .map_err(|e| StoreError::Io(format!("opening {}: {e}", dir.display())))?;
        let versions = db.open_tree("versions").map_err(io)?;
        let meta = db.open_tree("meta").map_err(io)?;
        Ok(Self { db, versions, meta })
    }

    fn head_version(&self) -> Result<Version, StoreError> {
        match self.meta.get(HEAD_KEY).map_err(io)? {
            None => Ok(Version::NONE),
            Some(v) => decode_u64(&v).map(Version),
        }
    }
}

fn decode_u64(v: &[u8]) -> Result<u64, StoreError> {
    let arr: [u8; 8] = v.try_into().map_err(|_| StoreError::Corrupt {
        key: "meta/head".into(),
        detail: format!("{} bytes, expected 8", v.len()),
    })?;
    Ok(u64::from_be_bytes(arr))
}

fn decode_record(key: u64, bytes: &[u8]) -> Result<VersionRecord, StoreError> {
    StoredVersion::decode(bytes)
        .map(StoredVersion::into_record)
        .map_err(|e| StoreError::Corrupt {
            key: format!("versions/{key}"),
            detail: e.to_string(),
        })
}

impl ConfigStore for SledStore {
    fn head(&self) -> Result<Option<VersionRecord>, StoreError> {
        let head = self.head_version()?;
        if head.is_none() {
            return Ok(None);
        }
        self.get(head)
    }

    fn get(&self, version: Version) -> Result<Option<VersionRecord>, StoreError> {
        self.versions
            .get(version.0.to_be_bytes())
            .map_err(io)?
            .map(|b| decode_record(version.0, &b))
            .transpose()
    }

    fn history(&self, limit: usize) -> Result<Vec<(Version, VersionMeta)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.versions.iter().rev().take(limit) {
            let (k, v) = kv.map_err(io)?;
            let rec = decode_record(decode_u64(&k)?, &v)?;
            out.push((rec.version, rec.meta));
        }
        Ok(out)
    }

    fn append(
        &self,
        expected_head: Version,
        meta: VersionMeta,
        content: String,
        files: Attachments,
        snapshot: Bytes,
    ) -> Result<VersionRecord, StoreError> {
        let new = expected_head.next();
        let stored = StoredVersion {
            version: new.0,
            hash: meta.hash.clone(),
            author: meta.author.clone(),
            message: meta.message.clone(),
            created_at_ms: meta.created_at_ms,
            rollback_of: meta.rollback_of.map_or(0, |v| v.0),
            source_name: meta.source_name.clone(),
            content,
            snapshot,
            files: files
                .0
                .into_iter()
                .map(|(path, content)| StoredFile { path, content })
                .collect(),
        };
        let encoded = stored.encode_to_vec();
        let result = (&self.versions, &self.meta).transaction(|(versions, m)| {
            let actual = match m.get(HEAD_KEY)? {
                None => Version::NONE,
                Some(v) => Version(decode_u64(&v).map_err(ConflictableTransactionError::Abort)?),
            };
            if actual != expected_head {
                return Err(ConflictableTransactionError::Abort(StoreError::Conflict {
                    expected: expected_head,
                    actual,
                }));
            }
            versions.insert(&new.0.to_be_bytes(), encoded.as_slice())?;
            m.insert(HEAD_KEY, &new.0.to_be_bytes())?;
            Ok(())
        });
        match result {
            Ok(()) => {}
            Err(TransactionError::Abort(e)) => return Err(e),
            Err(TransactionError::Storage(e)) => return Err(io(e)),
        }
        self.db.flush().map_err(io)?;
        Ok(stored.into_record())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(msg: &str) -> VersionMeta {
        VersionMeta {
            hash: format!("h-{msg}"),
            author: "t".into(),
            message: msg.into(),
            created_at_ms: 1,
            rollback_of: None,
            source_name: "routes.toml".into(),
        }
    }

    /// Opens the store again in this process. sled's flusher thread holds the dropped
    /// handle's file lock for a moment after the drop (a restarted plane, a new process,
    /// never sees it held), so the reopen is retried while the lock is taken, up to 10 s.
    fn reopen(dir: &Path) -> SledStore {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match SledStore::open(dir) {
                Ok(s) => return s,
                Err(StoreError::Io(e))
                    if e.contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                Err(e) => panic!("reopening the store: {e}"),
            }
        }
    }

    #[test]
    fn append_is_compare_and_swap_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SledStore::open(dir.path()).unwrap();
            assert!(s.head().unwrap().is_none());
            let v1 = s
                .append(
                    Version::NONE,
                    meta("a"),
                    "a".into(),
                    Attachments::default(),
                    Bytes::from_static(b"1"),
                )
                .unwrap();
            assert_eq!(v1.version, Version(1));
            let stale = s.append(
                Version::NONE,
                meta("b"),
                "b".into(),
                Attachments::default(),
                Bytes::new(),
            );
            assert!(matches!(
                stale,
                Err(StoreError::Conflict {
                    actual: Version(1),
                    ..
                })
            ));
            s.append(
                Version(1),
                meta("c"),
                "c".into(),
                Attachments::default(),
                Bytes::new(),
            )
            .unwrap();
        }
        let s = reopen(dir.path());
        assert_eq!(s.head().unwrap().unwrap().content, "c");
        let h = s.history(10).unwrap();
        assert_eq!(h.iter().map(|(v, _)| v.0).collect::<Vec<_>>(), vec![2, 1]);
        assert_eq!(
            s.get(Version(1)).unwrap().unwrap().snapshot,
            Bytes::from_static(b"1")
        );
    }
}
