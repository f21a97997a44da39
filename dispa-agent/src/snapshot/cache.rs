//! The last-known-good snapshot on local disk, so an agent restarted while the plane is down
//! serves what it served before. Written atomically: temp file, fsync, rename, fsync dir.

use std::io::Write;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use dispa_proto::v1::SnapshotEnvelope;
use prost::Message;

const FILE: &str = "snapshot.pb";
/// A cache file larger than this is treated as corrupt rather than read into memory.
const MAX_CACHE_BYTES: u64 = 256 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("snapshot cache {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("snapshot cache {path} is corrupt: {detail}")]
    Corrupt { path: PathBuf, detail: String },
}

#[derive(Clone, Debug)]
pub struct SnapshotCache {
    dir: PathBuf,
}

impl SnapshotCache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    fn path(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    /// The cached envelope (version, hash, snapshot bytes), if any.
    pub fn load(&self) -> Result<Option<SnapshotEnvelope>, CacheError> {
        let path = self.path();
        let io = |source| CacheError::Io {
            path: path.clone(),
            source,
        };
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(e)),
        };
        if meta.len() > MAX_CACHE_BYTES {
            return Err(CacheError::Corrupt {
                path,
                detail: format!(
                    "{} bytes exceeds the {MAX_CACHE_BYTES}-byte limit",
                    meta.len()
                ),
            });
        }
        let bytes = std::fs::read(&path).map_err(io)?;
        SnapshotEnvelope::decode(Bytes::from(bytes))
            .map(Some)
            .map_err(|e| CacheError::Corrupt {
                path,
                detail: e.to_string(),
            })
    }

    /// Replaces the cache atomically with this envelope.
    pub fn store(&self, env: &SnapshotEnvelope) -> Result<(), CacheError> {
        let path = self.path();
        let io = |source| CacheError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(&self.dir).map_err(io)?;
        let tmp = self.dir.join(format!("{FILE}.tmp"));
        {
            // The snapshot holds private keys: readable by the agent's user only.
            let mut f = {
                use std::os::unix::fs::OpenOptionsExt;
                std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&tmp)
                    .map_err(io)?
            };
            {
                use std::os::unix::fs::PermissionsExt;
                // A temp file left by an older build keeps its mode on open: set it.
                f.set_permissions(std::fs::Permissions::from_mode(0o600))
                    .map_err(io)?;
            }
            let cached = SnapshotEnvelope {
                nonce: String::new(),
                ..env.clone()
            };
            f.write_all(&cached.encode_to_vec()).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, &path).map_err(io)?;
        sync_dir(&self.dir).map_err(io)
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let c = SnapshotCache::new(dir.path().join("sub"));
        assert!(c.load().unwrap().is_none());
        let env = SnapshotEnvelope {
            version: 3,
            hash: "h".into(),
            snapshot: Bytes::from_static(b"x"),
            ..Default::default()
        };
        c.store(&env).unwrap();
        c.store(&SnapshotEnvelope {
            version: 4,
            ..env.clone()
        })
        .unwrap();
        assert_eq!(c.load().unwrap().unwrap().version, 4);
        std::fs::write(dir.path().join("sub").join(FILE), b"\xff\xff\xff").unwrap();
        assert!(matches!(c.load(), Err(CacheError::Corrupt { .. })));
    }
}
