//! TLS to upstreams: a connector that wraps hyper's `HttpConnector` with tokio-rustls, one
//! `ClientConfig` per upstream (CA bundle or no verification, optional client certificate,
//! ALPN by the upstream's protocol) and a fixed or per-endpoint server name.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use dispa_proto::config::model::UpstreamTls;
use dispa_proto::config::pem;
use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Connects to `http://` or `https://ip:port` URIs; TLS when built with a client config.
#[derive(Clone)]
pub struct Connector {
    http: HttpConnector,
    tls: Option<TlsTarget>,
}

#[derive(Clone)]
struct TlsTarget {
    config: Arc<ClientConfig>,
    /// None: the URI's host (the endpoint's IP address) is sent and verified.
    server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("tls", &self.tls.is_some())
            .field(
                "server_name",
                &self.tls.as_ref().and_then(|t| t.server_name.as_ref()),
            )
            .finish()
    }
}

impl Connector {
    pub fn new(connect_timeout: Duration, tls: Option<Arc<ClientConfig>>) -> Self {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(connect_timeout));
        http.set_nodelay(true);
        // The URI scheme is https for TLS upstreams; TLS itself is this connector's job.
        http.enforce_http(false);
        Self {
            http,
            tls: tls.map(|config| TlsTarget {
                config,
                server_name: None,
            }),
        }
    }

    /// The same connector sending and verifying `name` (a no-op without TLS).
    pub fn with_server_name(&self, name: ServerName<'static>) -> Self {
        let mut c = self.clone();
        if let Some(t) = &mut c.tls {
            t.server_name = Some(name);
        }
        c
    }
}

/// A server name from config text (a DNS name or an IP address).
pub fn server_name(s: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(s.to_string()).map_err(|e| format!("invalid server name {s:?}: {e}"))
}

/// The client config of one upstream.
pub fn client_config(tls: &UpstreamTls, h2: bool) -> Result<ClientConfig, String> {
    let provider = super::provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match &tls.ca {
        Some(ca) if !tls.insecure_skip_verify => {
            builder.with_root_certificates(pem::root_store(&ca.content)?)
        }
        _ => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider))),
    };
    let mut config = match &tls.client_cert {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                pem::certificates(&cert.content)?,
                pem::private_key(&key.content)?,
            )
            .map_err(|e| format!("client certificate: {e}"))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = if h2 {
        vec![b"h2".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok(config)
}

/// Why a TLS connection to an endpoint failed; the source says what rustls saw.
#[derive(Debug, thiserror::Error)]
#[error("TLS handshake with {endpoint} (server name {server_name}) failed")]
pub struct HandshakeError {
    endpoint: String,
    server_name: String,
    #[source]
    source: io::Error,
}

impl tower_service::Service<Uri> for Connector {
    type Response = MaybeTls;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<MaybeTls, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let mut http = self.http.clone();
        let tls = self.tls.clone();
        Box::pin(async move {
            let tcp = http.call(uri.clone()).await?;
            let Some(t) = tls else {
                return Ok(MaybeTls::Plain(tcp));
            };
            let name = match t.server_name {
                Some(n) => n,
                None => {
                    let host = uri.host().unwrap_or_default();
                    server_name(host.trim_start_matches('[').trim_end_matches(']'))?
                }
            };
            let endpoint = uri.authority().map(ToString::to_string).unwrap_or_default();
            let shown = name.to_str().into_owned();
            let stream = TlsConnector::from(t.config)
                .connect(name, tcp.into_inner())
                .await
                .map_err(|source| HandshakeError {
                    endpoint,
                    server_name: shown,
                    source,
                })?;
            Ok(MaybeTls::Tls(Box::new(TokioIo::new(stream))))
        })
    }
}

/// An upstream connection, plaintext or TLS.
pub enum MaybeTls {
    Plain(TokioIo<TcpStream>),
    Tls(Box<TokioIo<TlsStream<TcpStream>>>),
}

impl MaybeTls {
    /// The TCP stream of a plaintext connection.
    pub fn into_plain(self) -> Option<TcpStream> {
        match self {
            MaybeTls::Plain(s) => Some(s.into_inner()),
            MaybeTls::Tls(_) => None,
        }
    }
}

impl Connection for MaybeTls {
    fn connected(&self) -> Connected {
        match self {
            MaybeTls::Plain(s) => s.connected(),
            MaybeTls::Tls(s) => {
                let (tcp, conn) = s.inner().get_ref();
                let c = tcp.connected();
                if conn.alpn_protocol() == Some(b"h2") {
                    c.negotiated_h2()
                } else {
                    c
                }
            }
        }
    }
}

impl Read for MaybeTls {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl Write for MaybeTls {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MaybeTls::Plain(s) => s.is_write_vectored(),
            MaybeTls::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
}

/// `insecure_skip_verify = true`: any certificate is accepted (signatures are still checked,
/// so the handshake itself is sound). Agents warn about it loudly.
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
