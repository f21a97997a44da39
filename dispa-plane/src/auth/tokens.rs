//! API tokens: `dsp_<id>_<secret>`. Only the SHA-256 of the secret is stored, so a copy of the
//! data dir does not leak usable tokens; the id finds the record without scanning.

use dispa_proto::v1;
use prost::Message;
use sha2::Digest;

use super::Role;

const PREFIX: &str = "dsp_";
const ID_BYTES: usize = 6;
const SECRET_BYTES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    #[error("token store I/O failed: {0}")]
    Io(String),
    #[error("no token with id {0:?}")]
    NotFound(String),
    #[error("the system random source failed: {0}")]
    Random(String),
}

fn io(e: impl std::fmt::Display) -> TokensError {
    TokensError::Io(e.to_string())
}

/// The stored form (protobuf, so fields can be added compatibly).
#[derive(Clone, PartialEq, prost::Message)]
struct StoredToken {
    #[prost(string, tag = "1")]
    id: String,
    #[prost(string, tag = "2")]
    name: String,
    #[prost(enumeration = "v1::Role", tag = "3")]
    role: i32,
    #[prost(int64, tag = "4")]
    created_at_ms: i64,
    #[prost(string, tag = "5")]
    created_by: String,
    #[prost(int64, tag = "6")]
    revoked_at_ms: i64,
    #[prost(bytes = "vec", tag = "7")]
    secret_sha256: Vec<u8>,
}

impl StoredToken {
    fn info(&self) -> v1::TokenInfo {
        v1::TokenInfo {
            id: self.id.clone(),
            name: self.name.clone(),
            role: self.role,
            created_at_ms: self.created_at_ms,
            created_by: self.created_by.clone(),
            revoked_at_ms: self.revoked_at_ms,
        }
    }
}

/// A valid token's identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenIdentity {
    pub id: String,
    pub name: String,
    pub role: Role,
}

pub struct TokenStore {
    tree: sled::Tree,
}

fn random_hex(n: usize) -> Result<String, TokensError> {
    let mut buf = vec![0u8; n];
    getrandom::fill(&mut buf).map_err(|e| TokensError::Random(e.to_string()))?;
    Ok(hex::encode(buf))
}

/// Splits `dsp_<id>_<secret>`; `None` when it is not shaped like a token.
fn split(token: &str) -> Option<(&str, &str)> {
    let rest = token.strip_prefix(PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    (id.len() == ID_BYTES * 2 && secret.len() == SECRET_BYTES * 2).then_some((id, secret))
}

impl TokenStore {
    pub fn new(tree: sled::Tree) -> Self {
        Self { tree }
    }

    pub fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }

    /// Makes a token; returns its record and the token text, which is never stored.
    pub fn create(
        &self,
        role: Role,
        name: &str,
        created_by: &str,
        now_ms: i64,
    ) -> Result<(v1::TokenInfo, String), TokensError> {
        let id = random_hex(ID_BYTES)?;
        let secret = random_hex(SECRET_BYTES)?;
        let stored = StoredToken {
            id: id.clone(),
            name: if name.is_empty() {
                format!("{role}-{id}")
            } else {
                name.to_string()
            },
            role: role.to_wire() as i32,
            created_at_ms: now_ms,
            created_by: created_by.to_string(),
            revoked_at_ms: 0,
            secret_sha256: sha2::Sha256::digest(secret.as_bytes()).to_vec(),
        };
        self.tree
            .insert(id.as_bytes(), stored.encode_to_vec())
            .map_err(io)?;
        self.tree.flush().map_err(io)?;
        Ok((stored.info(), format!("{PREFIX}{id}_{secret}")))
    }

    fn load(&self, id: &str) -> Result<Option<StoredToken>, TokensError> {
        self.tree
            .get(id.as_bytes())
            .map_err(io)?
            .map(|b| StoredToken::decode(b.as_ref()).map_err(io))
            .transpose()
    }

    /// The identity of a valid, unrevoked token; `None` for anything else.
    pub fn verify(&self, token: &str) -> Result<Option<TokenIdentity>, TokensError> {
        let Some((id, secret)) = split(token) else {
            return Ok(None);
        };
        let Some(t) = self.load(id)? else {
            return Ok(None);
        };
        // Comparing digests, not secrets: timing reveals nothing about the secret itself.
        let digest = sha2::Sha256::digest(secret.as_bytes());
        if t.revoked_at_ms != 0 || digest.as_slice() != t.secret_sha256.as_slice() {
            return Ok(None);
        }
        Ok(Role::from_wire(t.role).map(|role| TokenIdentity {
            id: t.id,
            name: t.name,
            role,
        }))
    }

    pub fn list(&self) -> Result<Vec<v1::TokenInfo>, TokensError> {
        let mut out = Vec::new();
        for kv in self.tree.iter() {
            let (_, v) = kv.map_err(io)?;
            out.push(StoredToken::decode(v.as_ref()).map_err(io)?.info());
        }
        out.sort_by_key(|t| t.created_at_ms);
        Ok(out)
    }

    /// Revokes a token (kept, marked, so the audit trail still names it).
    pub fn revoke(&self, id: &str, now_ms: i64) -> Result<v1::TokenInfo, TokensError> {
        let mut t = self
            .load(id)?
            .ok_or_else(|| TokensError::NotFound(id.to_string()))?;
        if t.revoked_at_ms == 0 {
            t.revoked_at_ms = now_ms;
            self.tree
                .insert(id.as_bytes(), t.encode_to_vec())
                .map_err(io)?;
            self.tree.flush().map_err(io)?;
        }
        Ok(t.info())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_verify_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let s = TokenStore::new(db.open_tree("tokens").unwrap());
        assert!(s.is_empty());
        let (info, token) = s.create(Role::Operator, "ci", "admin", 1).unwrap();
        assert!(token.starts_with("dsp_"));
        let who = s.verify(&token).unwrap().unwrap();
        assert_eq!((who.role, who.name.as_str()), (Role::Operator, "ci"));
        // A wrong secret with the right id, garbage, and an empty string are all refused.
        let mut forged = token.clone();
        forged.pop();
        forged.push(if token.ends_with('0') { '1' } else { '0' });
        assert_eq!(s.verify(&forged).unwrap(), None);
        assert_eq!(s.verify("nonsense").unwrap(), None);
        assert_eq!(s.verify("").unwrap(), None);
        // Only the digest is stored.
        let raw = db
            .open_tree("tokens")
            .unwrap()
            .get(info.id.as_bytes())
            .unwrap()
            .unwrap();
        let secret = token.rsplit('_').next().unwrap();
        assert!(!raw.windows(secret.len()).any(|w| w == secret.as_bytes()));
        s.revoke(&info.id, 2).unwrap();
        assert_eq!(s.verify(&token).unwrap(), None);
        assert_eq!(s.list().unwrap()[0].revoked_at_ms, 2);
    }
}
