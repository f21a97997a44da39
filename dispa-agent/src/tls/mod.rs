//! TLS with rustls and the ring provider only: termination on `--listen-tls` (certificate
//! chosen by SNI from the snapshot's [`CertTable`]) and TLS to upstreams ([`Connector`]).

mod acceptor;
mod connector;

use std::sync::Arc;

pub use acceptor::{CertTable, accept};
pub use connector::{Connector, HandshakeError, MaybeTls, client_config, server_name};

/// The one crypto provider every TLS config uses.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// An error with its whole source chain, "outer: inner: innermost", so a log line names the
/// root cause (e.g. a certificate verification failure).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let t = inner.to_string();
        // Some errors repeat their source in their own message.
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = inner.source();
    }
    s
}
