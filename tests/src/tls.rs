//! TLS for the end-to-end tests: a private CA and leaf certificates made with rcgen, and a real
//! rustls client (tokio-rustls + hyper) that reports the certificate and ALPN it got.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls_pki_types::pem::PemObject;
use tokio::net::TcpStream;

use crate::Reply;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A private certificate authority.
pub struct Pki {
    pub ca_pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

/// A leaf certificate and its key, as PEM and DER.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
}

impl Pki {
    pub fn new(name: &str) -> Pki {
        let key = rcgen::KeyPair::generate().expect("CA key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let ca = params.self_signed(&key).expect("CA cert");
        Pki {
            ca_pem: ca.pem(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A certificate for `hosts` (DNS names, wildcards or IPs) signed by this CA.
    pub fn leaf(&self, hosts: &[&str]) -> Leaf {
        let key = rcgen::KeyPair::generate().expect("leaf key");
        let names: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names).expect("params");
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            hosts.first().copied().unwrap_or("client"),
        );
        let cert = params.signed_by(&key, &self.issuer).expect("leaf cert");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }

    pub fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            roots.add(c.expect("CA PEM")).expect("CA cert");
        }
        roots
    }
}

impl Leaf {
    /// The base64 body of the key PEM: what must never appear in a log.
    pub fn key_body(&self) -> String {
        self.key_pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect()
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).expect("key PEM")
    }

    /// A server config presenting this certificate, offering `alpn`.
    pub fn server_config(&self, alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
        let mut c = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![self.der.clone()], self.key())
            .expect("server config");
        c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(c)
    }
}

/// An open TLS connection to the agent: what the handshake gave, and a request sender.
pub struct TlsConn {
    pub peer_cert: CertificateDer<'static>,
    pub alpn: Option<Vec<u8>>,
    sender: Sender,
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

/// An error with its source chain.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(i) = src {
        s.push_str(": ");
        s.push_str(&i.to_string());
        src = i.source();
    }
    s
}

async fn handshake(
    addr: SocketAddr,
    sni: &str,
    roots: RootCertStore,
    client: Option<&Leaf>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    handshake_with(addr, sni, roots, client, rustls::DEFAULT_VERSIONS).await
}

/// A handshake offering only `versions` (e.g. `&[&rustls::version::TLS12]`); the negotiated
/// protocol version on success.
pub async fn negotiate(
    addr: SocketAddr,
    sni: &str,
    roots: RootCertStore,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Result<rustls::ProtocolVersion, String> {
    let tls = handshake_with(addr, sni, roots, None, versions).await?;
    tls.get_ref()
        .1
        .protocol_version()
        .ok_or_else(|| "no protocol version".to_string())
}

async fn handshake_with(
    addr: SocketAddr,
    sni: &str,
    roots: RootCertStore,
    client: Option<&Leaf>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let mut config = match client {
        Some(l) => builder
            .with_client_auth_cert(vec![l.der.clone()], l.key())
            .map_err(|e| e.to_string())?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = ServerName::try_from(sni.to_string()).map_err(|e| e.to_string())?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {}", chain(&e)))
}

/// How the server refused a handshake (`Err` if it accepted it). With TLS 1.3 a client learns
/// of a refused client certificate from the server's alert after its own side is done, so
/// this reads once: an accepting server sends nothing until asked.
pub async fn refusal(
    addr: SocketAddr,
    sni: &str,
    roots: RootCertStore,
    client: Option<&Leaf>,
) -> Result<String, String> {
    use tokio::io::AsyncReadExt;
    let mut tls = match handshake(addr, sni, roots, client).await {
        Ok(t) => t,
        Err(e) => return Ok(e),
    };
    let mut buf = [0u8; 1];
    match tokio::time::timeout(std::time::Duration::from_secs(5), tls.read(&mut buf)).await {
        Ok(Err(e)) => Ok(chain(&e)),
        Ok(Ok(0)) => Ok("closed".into()),
        Ok(Ok(_)) => Err("the server sent data".into()),
        Err(_) => Err("the server accepted the handshake".into()),
    }
}

/// Connects to `addr` with SNI `sni`, trusting `roots`, offering h2 and http/1.1, presenting
/// `client` if given; then speaks HTTP/2 or HTTP/1.1 as ALPN says.
pub async fn connect(
    addr: SocketAddr,
    sni: &str,
    roots: RootCertStore,
    client: Option<&Leaf>,
) -> Result<TlsConn, String> {
    let tls = handshake(addr, sni, roots, client).await?;
    let (_, conn) = tls.get_ref();
    let peer_cert = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .cloned()
        .ok_or("no peer certificate")?;
    let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
    let io = TokioIo::new(tls);
    let sender = if alpn.as_deref() == Some(b"h2") {
        let (s, c) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| chain(&e))?;
        tokio::spawn(c);
        Sender::H2(s)
    } else {
        let (s, c) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| chain(&e))?;
        tokio::spawn(c);
        Sender::H1(s)
    };
    Ok(TlsConn {
        peer_cert,
        alpn,
        sender,
    })
}

impl TlsConn {
    /// `GET https://host/path` on this connection.
    pub async fn get(&mut self, host: &str, path: &str) -> Result<Reply, String> {
        let resp = match &mut self.sender {
            Sender::H2(s) => {
                let req = Request::get(format!("https://{host}{path}"))
                    .body(Full::new(Bytes::new()))
                    .map_err(|e| e.to_string())?;
                s.ready().await.map_err(|e| chain(&e))?;
                s.send_request(req).await.map_err(|e| chain(&e))?
            }
            Sender::H1(s) => {
                let req = Request::get(path)
                    .header("host", host)
                    .body(Full::new(Bytes::new()))
                    .map_err(|e| e.to_string())?;
                s.ready().await.map_err(|e| chain(&e))?;
                s.send_request(req).await.map_err(|e| chain(&e))?
            }
        };
        Reply::read(resp).await
    }
}
