//! The config store: immutable versions. The rest of the plane sees only this trait, never
//! sled types, so the backend can change without touching versioning logic.

mod sled_store;

use bytes::Bytes;
use dispa_proto::Version;
use dispa_proto::config::Attachments;

pub use sled_store::SledStore;

/// One stored version. Once written it never changes.
#[derive(Clone, Debug, PartialEq)]
pub struct VersionRecord {
    pub version: Version,
    pub meta: VersionMeta,
    /// The routes.toml text as applied.
    pub content: String,
    /// The files the routes.toml names, as uploaded.
    pub files: Attachments,
    /// The encoded snapshot agents receive.
    pub snapshot: Bytes,
}

/// What a version is, without its content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VersionMeta {
    pub hash: String,
    pub author: String,
    pub message: String,
    pub created_at_ms: i64,
    /// The version whose content this one restored, when made by a rollback.
    pub rollback_of: Option<Version>,
    pub source_name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("version conflict: expected the newest version to be {expected}, it is {actual}")]
    Conflict { expected: Version, actual: Version },
    #[error("store I/O failed: {0}")]
    Io(String),
    #[error("stored record {key} is corrupt: {detail}")]
    Corrupt { key: String, detail: String },
}

/// Versioned config storage.
pub trait ConfigStore: Send + Sync + 'static {
    /// The newest version, if any.
    fn head(&self) -> Result<Option<VersionRecord>, StoreError>;
    fn get(&self, version: Version) -> Result<Option<VersionRecord>, StoreError>;
    /// Up to `limit` versions, newest first, without content.
    fn history(&self, limit: usize) -> Result<Vec<(Version, VersionMeta)>, StoreError>;
    /// Atomically stores a new version `expected_head + 1` if the newest version is still
    /// `expected_head`, and makes it durable before returning.
    fn append(
        &self,
        expected_head: Version,
        meta: VersionMeta,
        content: String,
        files: Attachments,
        snapshot: Bytes,
    ) -> Result<VersionRecord, StoreError>;
}
