//! The audit log: every apply, rollback, token change, secret read and denied request, newest
//! last, in sled. Bounded: each append past [`MAX_ENTRIES`] drops the oldest entry.

use std::sync::Mutex;

use dispa_proto::v1;
use prost::Message;

use super::TokensError;

/// Most audit entries kept.
pub const MAX_ENTRIES: u64 = 100_000;

/// What happened, before it gets a sequence number and a time.
#[derive(Clone, Debug, Default)]
pub struct AuditRecord {
    pub who: String,
    pub role: String,
    pub peer: String,
    pub action: String,
    /// "ok", "denied" or "failed".
    pub outcome: &'static str,
    pub from_version: u64,
    pub to_version: u64,
    pub message: String,
}

pub struct AuditLog {
    tree: sled::Tree,
    /// Serialises appends so sequence numbers are dense.
    append: Mutex<()>,
}

fn io(e: impl std::fmt::Display) -> TokensError {
    TokensError::Io(e.to_string())
}

fn seq_of(k: &[u8]) -> u64 {
    k.try_into().map(u64::from_be_bytes).unwrap_or(0)
}

impl AuditLog {
    pub fn new(tree: sled::Tree) -> Self {
        Self {
            tree,
            append: Mutex::new(()),
        }
    }

    /// Appends and flushes an entry; an entry that cannot be stored is logged instead.
    pub fn record(&self, r: AuditRecord, now_ms: i64) {
        if let Err(e) = self.try_record(&r, now_ms) {
            tracing::error!(action = %r.action, who = %r.who, outcome = r.outcome, "audit log write failed: {e}");
        }
    }

    fn try_record(&self, r: &AuditRecord, now_ms: i64) -> Result<(), TokensError> {
        let _guard = self.append.lock().unwrap_or_else(|p| p.into_inner());
        let seq = match self.tree.last().map_err(io)? {
            Some((k, _)) => seq_of(&k) + 1,
            None => 1,
        };
        let entry = v1::AuditEntry {
            seq,
            at_ms: now_ms,
            who: r.who.clone(),
            role: r.role.clone(),
            peer: r.peer.clone(),
            action: r.action.clone(),
            outcome: r.outcome.to_string(),
            from_version: r.from_version,
            to_version: r.to_version,
            message: r.message.clone(),
        };
        self.tree
            .insert(seq.to_be_bytes(), entry.encode_to_vec())
            .map_err(io)?;
        if seq > MAX_ENTRIES {
            self.tree
                .remove((seq - MAX_ENTRIES).to_be_bytes())
                .map_err(io)?;
        }
        // Changes are on disk before the caller answers. Refusals are not flushed one by one:
        // anyone can cause them, and an fsync each would let a flood of bad requests stall the
        // plane; sled writes them out within its flush interval (500 ms).
        if r.outcome != "denied" {
            self.tree.flush().map_err(io)?;
        }
        Ok(())
    }

    /// Up to `limit` entries, newest first.
    pub fn list(&self, limit: usize) -> Result<Vec<v1::AuditEntry>, TokensError> {
        let mut out = Vec::new();
        for kv in self.tree.iter().rev().take(limit) {
            let (_, v) = kv.map_err(io)?;
            out.push(v1::AuditEntry::decode(v.as_ref()).map_err(io)?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_first_and_dense() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let log = AuditLog::new(db.open_tree("audit").unwrap());
        for (i, action) in ["Apply", "Rollback", "CreateToken"].iter().enumerate() {
            log.record(
                AuditRecord {
                    who: "ci".into(),
                    action: action.to_string(),
                    outcome: "ok",
                    ..Default::default()
                },
                i as i64,
            );
        }
        let l = log.list(2).unwrap();
        assert_eq!(
            l.iter()
                .map(|e| (e.seq, e.action.as_str()))
                .collect::<Vec<_>>(),
            vec![(3, "CreateToken"), (2, "Rollback")]
        );
    }
}
