//! The routes.toml config model, in stages:
//! [`raw`] (serde structs, `deny_unknown_fields`) -> [`validate`] (diagnostics with
//! file:line:column) -> [`model`] (typed, validated) -> [`wire`] (protobuf snapshot).
//!
//! The plane is the validation authority; dispactl runs this same code offline.

mod diagnostic;
mod files;
pub mod jwks;
pub mod model;
pub mod pem;
mod raw;
mod validate;
pub mod wire;

pub use diagnostic::{Diagnostic, Diagnostics};
pub use files::Attachments;
pub use model::Config;

/// Parses and validates a routes.toml that names no files. `name` is the file name
/// diagnostics report.
pub fn parse(name: &str, content: &str) -> Result<Config, Diagnostics> {
    parse_with_files(name, content, &Attachments::default())
}

/// Parses and validates a routes.toml with the files it names (see [`referenced_files`]).
pub fn parse_with_files(
    name: &str,
    content: &str,
    files: &Attachments,
) -> Result<Config, Diagnostics> {
    validate::parse_and_validate(name, content, files)
}

/// The text with every inline secret (API keys, bearer tokens, JWT secrets) replaced by
/// `"<redacted>"`, for showing a stored version to someone who may not see secrets.
pub fn redact_source(name: &str, content: &str) -> String {
    validate::redact_source(name, content)
}

pub use validate::parse_size;

/// The paths (as written) of every file a routes.toml names, so a client can upload them.
pub fn referenced_files(name: &str, content: &str) -> Result<Vec<String>, Diagnostics> {
    validate::referenced_files(name, content)
}

/// A validated config compiled to its wire form: the encoded snapshot and its content hash.
#[derive(Clone, Debug)]
pub struct Compiled {
    pub config: Config,
    pub snapshot: bytes::Bytes,
    pub hash: String,
}

/// Parses, validates and encodes a routes.toml into the snapshot agents receive.
pub fn compile(name: &str, content: &str) -> Result<Compiled, Diagnostics> {
    compile_with_files(name, content, &Attachments::default())
}

/// [`compile`] for a routes.toml that names files.
pub fn compile_with_files(
    name: &str,
    content: &str,
    files: &Attachments,
) -> Result<Compiled, Diagnostics> {
    let config = parse_with_files(name, content, files)?;
    let snapshot = wire::encode(&config);
    let hash = crate::content_hash(&snapshot);
    Ok(Compiled {
        config,
        snapshot,
        hash,
    })
}

/// Parses a duration as routes.toml and the CLIs write it ("250ms", "5s", "1m").
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("invalid duration {s:?} ({e}); write e.g. \"250ms\", \"5s\", \"1m\""))
}
