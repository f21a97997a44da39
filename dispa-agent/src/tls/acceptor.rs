//! TLS termination: the snapshot's certificates as one `ServerConfig` each (built once per
//! snapshot), chosen per handshake by the ClientHello's SNI.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use dispa_proto::config::model::{Certificate, HostPattern, TlsVersion};
use dispa_proto::config::pem;
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use tokio_rustls::LazyConfigAcceptor;
use tokio_rustls::server::TlsStream;

use crate::snapshot::Current;

/// Longest a client may take from connecting to finishing its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Certificates by SNI: exact names, wildcard suffixes, and the default.
#[derive(Default)]
pub struct CertTable {
    exact: HashMap<String, Arc<ServerConfig>>,
    /// `*.example.com` stored as `example.com`.
    wildcard: HashMap<String, Arc<ServerConfig>>,
    default: Option<Arc<ServerConfig>>,
    /// Entry names, for Debug.
    names: Vec<String>,
}

impl std::fmt::Debug for CertTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertTable")
            .field("certificates", &self.names)
            .finish()
    }
}

impl CertTable {
    /// One `ServerConfig` per entry, with its own client verifier and protocol versions.
    pub fn build(certs: &BTreeMap<String, Certificate>) -> Result<CertTable, String> {
        let mut table = CertTable::default();
        for c in certs.values() {
            let config =
                Arc::new(server_config(c).map_err(|e| format!("certificate {:?}: {e}", c.name))?);
            for h in &c.hosts {
                match h {
                    HostPattern::Exact(n) => table.exact.insert(n.clone(), config.clone()),
                    HostPattern::Wildcard(s) => table.wildcard.insert(s.clone(), config.clone()),
                    HostPattern::Any => None,
                };
            }
            if c.default {
                table.default = Some(config);
            }
            table.names.push(c.name.clone());
        }
        Ok(table)
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The config for a ClientHello's server name: exact beats wildcard, the longest
    /// wildcard wins; else the default; `None` refuses the handshake.
    pub fn select(&self, sni: Option<&str>) -> Option<&Arc<ServerConfig>> {
        if let Some(name) = sni {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            if let Some(c) = self.exact.get(&name) {
                return Some(c);
            }
            let mut rest = name.as_str();
            while let Some((_, suffix)) = rest.split_once('.') {
                if let Some(c) = self.wildcard.get(suffix) {
                    return Some(c);
                }
                rest = suffix;
            }
        }
        self.default.as_ref()
    }
}

/// The server side's suites: AES-128-GCM-SHA256 first (Mozilla's recommended order), chosen
/// over the client's order. Clients commonly ask for AES-256-GCM-SHA384 first, whose SHA-384
/// key schedule runs on ring's generic SHA-512 code here: a tenth of a handshake's CPU
/// (docs/BENCHMARKS.md).
fn server_provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::CipherSuite as S;
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites.sort_by_key(|s| {
        !matches!(
            s.suite(),
            S::TLS13_AES_128_GCM_SHA256
                | S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                | S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        )
    });
    Arc::new(p)
}

fn server_config(c: &Certificate) -> Result<ServerConfig, String> {
    let provider = server_provider();
    let versions: &[&rustls::SupportedProtocolVersion] = match c.min_version {
        TlsVersion::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::V1_3 => &[&rustls::version::TLS13],
    };
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| e.to_string())?;
    let builder = match &c.client_ca {
        Some(ca) => {
            let roots = pem::root_store(&ca.content)?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("client CA: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let chain = pem::certificates(&c.cert.content)?;
    let key = pem::private_key(&c.key.content)?;
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.ignore_client_order = true;
    Ok(config)
}

/// Reads the ClientHello, picks the certificate of the snapshot current at that moment, and
/// completes the handshake. The error says why, never with key material.
pub async fn accept<S>(stream: S, current: &Current) -> Result<TlsStream<S>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream)
            .await
            .map_err(|e| format!("reading the ClientHello: {e}"))?;
        let sni = start.client_hello().server_name().map(str::to_string);
        let config = current
            .load()
            .and_then(|s| s.tls.select(sni.as_deref()).cloned())
            .ok_or_else(|| match &sni {
                Some(n) => format!("no certificate for server name {n:?} and no default"),
                None => "no server name (SNI) and no default certificate".to_string(),
            })?;
        start
            .into_stream(config)
            .await
            .map_err(|e| format!("handshake with SNI {sni:?}: {}", super::error_chain(&e)))
    })
    .await
    .map_err(|_| format!("handshake not finished within {HANDSHAKE_TIMEOUT:?}"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sni_selection_exact_then_longest_wildcard_then_default() {
        let cfg = |_: &str| -> Arc<ServerConfig> {
            Arc::new(
                ServerConfig::builder_with_provider(crate::tls::provider())
                    .with_safe_default_protocol_versions()
                    .unwrap()
                    .with_no_client_auth()
                    .with_cert_resolver(
                        Arc::new(rustls::server::ResolvesServerCertUsingSni::new()),
                    ),
            )
        };
        let (a, b, c, d) = (cfg("a"), cfg("b"), cfg("c"), cfg("d"));
        let mut t = CertTable::default();
        t.exact.insert("api.example.com".into(), a.clone());
        t.wildcard.insert("example.com".into(), b.clone());
        t.wildcard.insert("x.example.com".into(), c.clone());
        let pick = |t: &CertTable, n: Option<&str>| t.select(n).cloned();
        let same = |x: Option<Arc<ServerConfig>>, y: &Arc<ServerConfig>| {
            x.is_some_and(|x| Arc::ptr_eq(&x, y))
        };
        assert!(same(pick(&t, Some("API.example.com")), &a));
        assert!(same(pick(&t, Some("www.example.com")), &b));
        assert!(same(pick(&t, Some("a.x.example.com")), &c));
        assert!(same(pick(&t, Some("a.b.example.com")), &b));
        assert!(pick(&t, Some("example.com")).is_none());
        assert!(pick(&t, None).is_none());
        t.default = Some(d.clone());
        assert!(same(pick(&t, Some("example.com")), &d));
        assert!(same(pick(&t, None), &d));
    }
}
