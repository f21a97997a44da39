//! PEM files named by a routes.toml (certificate chains, private keys, CA bundles): parsed and
//! checked with rustls (ring provider), the same way at validation, at snapshot decode and in
//! the agent. Messages never include key material.

use std::sync::Arc;

use rustls::RootCertStore;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The certificates of a PEM chain (leaf first), at least one.
pub fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM certificate file: {e}"))?;
    if certs.is_empty() {
        return Err("no PEM CERTIFICATE block found".into());
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in a PEM file.
pub fn private_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    // The parser's error names the PEM section kind at most, never key bytes.
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| format!("no usable PEM private key: {e}"))
}

/// A CA bundle as a root store: every certificate must parse as a trust anchor.
pub fn root_store(pem: &[u8]) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for (i, c) in certificates(pem)?.into_iter().enumerate() {
        roots
            .add(c)
            .map_err(|e| format!("CA certificate {} does not parse: {e}", i + 1))?;
    }
    Ok(roots)
}

/// A certificate chain with its key, checked to belong together (ring provider).
pub fn certified_key(chain_pem: &[u8], key_pem: &[u8]) -> Result<Arc<CertifiedKey>, String> {
    let chain = certificates(chain_pem).map_err(|e| format!("certificate: {e}"))?;
    let key = private_key(key_pem).map_err(|e| format!("key: {e}"))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| format!("key: unsupported private key ({e})"))?;
    let ck = CertifiedKey::new(chain, signer);
    ck.keys_match().map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => {
            "the private key does not match the certificate".to_string()
        }
        other => format!("certificate: {other}"),
    })?;
    Ok(Arc::new(ck))
}
