//! Apply, rollback and diff as plain functions over a [`ConfigStore`]; time is passed in.

use dispa_proto::config::{self, Attachments, Diagnostics};
use dispa_proto::{ErrorCode, Version};

use crate::store::{ConfigStore, StoreError, VersionMeta, VersionRecord};

#[derive(Debug, thiserror::Error)]
pub enum VersionsError {
    #[error("invalid config:\n{0}")]
    Invalid(Diagnostics),
    #[error(
        "stale --expect-version: expected the current version to be {expected}, it is {actual}; nothing was stored"
    )]
    Stale { expected: Version, actual: Version },
    #[error("version {0} does not exist")]
    NotFound(Version),
    #[error("{0}")]
    Store(StoreError),
}

impl From<StoreError> for VersionsError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict { expected, actual } => VersionsError::Stale { expected, actual },
            e => VersionsError::Store(e),
        }
    }
}

impl VersionsError {
    pub fn code(&self) -> ErrorCode {
        match self {
            VersionsError::Invalid(_) => ErrorCode::InvalidArgument,
            VersionsError::Stale { .. } => ErrorCode::Conflict,
            VersionsError::NotFound(_) => ErrorCode::NotFound,
            VersionsError::Store(_) => ErrorCode::Unavailable,
        }
    }
}

/// What an operator asked to apply.
#[derive(Clone, Debug)]
pub struct ApplyInput {
    pub source_name: String,
    pub content: String,
    pub files: Attachments,
    pub author: String,
    pub message: String,
    pub expect_version: Option<Version>,
    pub dry_run: bool,
}

#[derive(Clone, Debug)]
pub enum ApplyOutcome {
    /// A new version was stored (and flushed).
    Created { record: VersionRecord, diff: String },
    /// Same content as the current version: nothing stored.
    Unchanged { current: Version, hash: String },
    /// Valid; this is what would change.
    DryRun {
        current: Version,
        hash: String,
        diff: String,
    },
}

fn check_expected(expect: Option<Version>, actual: Version) -> Result<(), VersionsError> {
    match expect {
        Some(expected) if expected != actual => Err(VersionsError::Stale { expected, actual }),
        _ => Ok(()),
    }
}

pub fn apply(
    store: &dyn ConfigStore,
    input: ApplyInput,
    now_ms: i64,
) -> Result<ApplyOutcome, VersionsError> {
    let compiled = config::compile_with_files(&input.source_name, &input.content, &input.files)
        .map_err(VersionsError::Invalid)?;
    // Keep only what the config names: a stray upload is not part of the version.
    let named = config::referenced_files(&input.source_name, &input.content)
        .map_err(VersionsError::Invalid)?;
    let files: Attachments = input
        .files
        .0
        .into_iter()
        .filter(|(path, _)| named.contains(path))
        .collect();
    let head = store.head()?;
    let current = head.as_ref().map_or(Version::NONE, |h| h.version);
    check_expected(input.expect_version, current)?;
    let old = head.as_ref().map_or("", |h| h.content.as_str());
    let mut diff = unified_diff(&label(current), old, &input.source_name, &input.content);
    diff.push_str(&files_diff(head.as_ref().map(|h| &h.files), &files));
    if let Some(h) = &head
        && h.meta.hash == compiled.hash
        && h.content == input.content
        && h.files == files
    {
        return Ok(ApplyOutcome::Unchanged {
            current,
            hash: compiled.hash,
        });
    }
    if input.dry_run {
        return Ok(ApplyOutcome::DryRun {
            current,
            hash: compiled.hash,
            diff,
        });
    }
    let meta = VersionMeta {
        hash: compiled.hash,
        author: input.author,
        message: input.message,
        created_at_ms: now_ms,
        rollback_of: None,
        source_name: input.source_name,
    };
    let record = store.append(current, meta, input.content, files, compiled.snapshot)?;
    Ok(ApplyOutcome::Created { record, diff })
}

/// Writes a new version whose content is that of `to`.
pub fn rollback(
    store: &dyn ConfigStore,
    to: Version,
    expect_version: Option<Version>,
    author: String,
    message: String,
    now_ms: i64,
) -> Result<(VersionRecord, String), VersionsError> {
    let target = store.get(to)?.ok_or(VersionsError::NotFound(to))?;
    let head = store.head()?;
    let current = head.as_ref().map_or(Version::NONE, |h| h.version);
    check_expected(expect_version, current)?;
    let old = head.as_ref().map_or("", |h| h.content.as_str());
    let mut diff = unified_diff(&label(current), old, &label(to), &target.content);
    diff.push_str(&files_diff(head.as_ref().map(|h| &h.files), &target.files));
    let message = if message.is_empty() {
        format!("rollback to version {to}")
    } else {
        format!("rollback to version {to}: {message}")
    };
    let meta = VersionMeta {
        hash: target.meta.hash.clone(),
        author,
        message,
        created_at_ms: now_ms,
        rollback_of: Some(to),
        source_name: target.meta.source_name.clone(),
    };
    let record = store.append(current, meta, target.content, target.files, target.snapshot)?;
    Ok((record, diff))
}

/// Looks up a version, or the current one for [`Version::NONE`].
pub fn get(store: &dyn ConfigStore, version: Version) -> Result<VersionRecord, VersionsError> {
    let rec = if version.is_none() {
        store.head()?
    } else {
        store.get(version)?
    };
    rec.ok_or(VersionsError::NotFound(version))
}

pub fn label(v: Version) -> String {
    if v.is_none() {
        "(empty)".into()
    } else {
        format!("version {v}")
    }
}

/// A unified line diff of two routes.toml texts with their inline secrets redacted; empty when
/// the texts are equal.
pub fn unified_diff(old_label: &str, old: &str, new_label: &str, new: &str) -> String {
    if old == new {
        return String::new();
    }
    let (old_shown, new_shown) = (
        config::redact_source(old_label, old),
        config::redact_source(new_label, new),
    );
    if old_shown == new_shown {
        return format!(
            "--- {old_label}\n+++ {new_label}\ninline secret values changed (not shown)\n"
        );
    }
    similar::TextDiff::from_lines(&old_shown, &new_shown)
        .unified_diff()
        .context_radius(3)
        .header(old_label, new_label)
        .to_string()
}

/// One line per uploaded file that was added, removed or changed. Contents never appear: a
/// file may be a private key, and a digest is enough to see that it changed.
pub fn files_diff(old: Option<&Attachments>, new: &Attachments) -> String {
    let empty = Attachments::default();
    let old = old.unwrap_or(&empty);
    let mut out = String::new();
    for (path, content) in &old.0 {
        match new.get(path) {
            None => out.push_str(&format!("file removed: {path}\n")),
            Some(c) if c != content => out.push_str(&format!(
                "file changed: {path} (sha256 {} -> {})\n",
                short_digest(content),
                short_digest(c)
            )),
            Some(_) => {}
        }
    }
    for (path, content) in &new.0 {
        if old.get(path).is_none() {
            out.push_str(&format!(
                "file added: {path} ({} bytes, sha256 {})\n",
                content.len(),
                short_digest(content)
            ));
        }
    }
    out
}

fn short_digest(b: &[u8]) -> String {
    let mut h = dispa_proto::content_hash(b);
    h.truncate(12);
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore;

    const A: &str = "[upstreams.a]\nendpoints = [\"127.0.0.1:1\"]\n";
    const B: &str = "[upstreams.a]\nendpoints = [\"127.0.0.1:2\"]\n";

    fn input(content: &str, expect: Option<u64>) -> ApplyInput {
        ApplyInput {
            source_name: "routes.toml".into(),
            content: content.into(),
            files: Attachments::default(),
            author: "me".into(),
            message: "m".into(),
            expect_version: expect.map(Version),
            dry_run: false,
        }
    }

    #[test]
    fn apply_rollback_and_stale_expectations() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        assert!(matches!(
            apply(&s, input(A, None), 1).unwrap(),
            ApplyOutcome::Created { .. }
        ));
        assert!(matches!(
            apply(&s, input(A, None), 2).unwrap(),
            ApplyOutcome::Unchanged { .. }
        ));
        let ApplyOutcome::Created { record, diff } = apply(&s, input(B, Some(1)), 3).unwrap()
        else {
            panic!("expected a new version");
        };
        assert_eq!(record.version, Version(2));
        assert!(diff.contains("-endpoints = [\"127.0.0.1:1\"]"), "{diff}");
        let stale = apply(&s, input(A, Some(1)), 4).unwrap_err();
        assert_eq!(stale.code(), ErrorCode::Conflict);
        assert_eq!(get(&s, Version::NONE).unwrap().version, Version(2));

        let (rb, _) = rollback(&s, Version(1), None, "me".into(), String::new(), 5).unwrap();
        assert_eq!(rb.version, Version(3));
        assert_eq!(rb.content, A);
        assert_eq!(rb.meta.rollback_of, Some(Version(1)));
        assert_eq!(rb.meta.hash, get(&s, Version(1)).unwrap().meta.hash);
        assert!(matches!(
            rollback(&s, Version(9), None, "me".into(), String::new(), 6),
            Err(VersionsError::NotFound(_))
        ));
    }

    #[test]
    fn invalid_config_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        let e = apply(&s, input("[[routes]]\nname = 1\n", None), 1).unwrap_err();
        assert_eq!(e.code(), ErrorCode::InvalidArgument);
        assert!(s.head().unwrap().is_none());
    }
}
