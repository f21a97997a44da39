//! dispa.v1: the wire protocol between plane, agents and dispactl, and the routes.toml config
//! model (parse -> validate -> model -> wire) that plane and dispactl share, so validation
//! lives in exactly one place.

pub mod config;
pub mod connect;
mod error_code;
mod ids;
pub mod logs;

pub use error_code::ErrorCode;
pub use ids::{AgentId, RouteName, UpstreamName, Version};

/// Generated protobuf and gRPC code for package `dispa.v1`.
#[allow(clippy::all, clippy::unwrap_used, clippy::expect_used, missing_docs)]
pub mod v1 {
    tonic::include_proto!("dispa.v1");
}

/// The dispa.v1 protocol version this build speaks, "MAJOR.MINOR". Peers must share MAJOR.
pub const PROTOCOL_VERSION: &str = "1.0";

/// This build's version, exchanged for diagnostics (`dispactl agents` shows it).
pub const BUILD_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The major component of a "MAJOR.MINOR" protocol version, or `None` when malformed.
pub fn protocol_major(version: &str) -> Option<u32> {
    version.split('.').next()?.parse().ok()
}

/// Hex SHA-256 of an encoded snapshot: the content hash carried with every version.
pub fn content_hash(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_major_parses() {
        assert_eq!(protocol_major("1.0"), Some(1));
        assert_eq!(protocol_major("12.3"), Some(12));
        assert_eq!(protocol_major("x.1"), None);
        assert_eq!(protocol_major(PROTOCOL_VERSION), Some(1));
    }
}
