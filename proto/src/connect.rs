//! How agents and dispactl reach the plane: the URL (`https://` for TLS), an optional CA
//! bundle to verify it with, an optional client certificate (agent mTLS), and an optional
//! bearer token sent with every call.

use std::fmt;
use std::time::Duration;

use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

#[derive(Clone, Default)]
pub struct PlaneConnect {
    pub url: String,
    /// A token (`dsp_...`): an operator's, or an agent's join token.
    pub token: Option<String>,
    /// PEM CA bundle the plane's certificate must chain to (required for `https://`).
    pub ca_pem: Option<Vec<u8>>,
    /// PEM client certificate chain and key, for a plane that verifies agents by certificate.
    pub client_identity: Option<(Vec<u8>, Vec<u8>)>,
}

// By hand: the token and key must never reach a log.
impl fmt::Debug for PlaneConnect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PlaneConnect")
            .field("url", &self.url)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("ca_pem", &self.ca_pem.as_ref().map(|c| c.len()))
            .field("client_identity", &self.client_identity.is_some())
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("invalid plane URL {url:?}: {detail}")]
    Url { url: String, detail: String },
    #[error("the plane URL is https:// but no CA was given to verify it (--ca-file)")]
    NoCa,
    #[error("TLS setup for {url}: {detail}")]
    Tls { url: String, detail: String },
    #[error("the token is not a valid header value (it must be printable ASCII)")]
    Token,
}

impl PlaneConnect {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ..Self::default()
        }
    }

    /// An endpoint with TLS configured when the URL is `https://`. Timeouts are the caller's.
    pub fn endpoint(&self) -> Result<Endpoint, ConnectError> {
        let endpoint = Endpoint::from_shared(self.url.clone()).map_err(|e| ConnectError::Url {
            url: self.url.clone(),
            detail: e.to_string(),
        })?;
        if !self.url.starts_with("https://") {
            return Ok(endpoint.connect_timeout(Duration::from_secs(5)));
        }
        let ca = self.ca_pem.as_ref().ok_or(ConnectError::NoCa)?;
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
        if let Some((cert, key)) = &self.client_identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        endpoint
            .tls_config(tls)
            .map(|e| e.connect_timeout(Duration::from_secs(5)))
            .map_err(|e| ConnectError::Tls {
                url: self.url.clone(),
                detail: e.to_string(),
            })
    }

    /// Adds `authorization: Bearer <token>` to every call when a token is set.
    pub fn interceptor(&self) -> Result<BearerToken, ConnectError> {
        let value = match &self.token {
            None => None,
            Some(t) => {
                let mut v: AsciiMetadataValue = MetadataValue::try_from(format!("Bearer {t}"))
                    .map_err(|_| ConnectError::Token)?;
                v.set_sensitive(true);
                Some(v)
            }
        };
        Ok(BearerToken(value))
    }
}

/// Sends a bearer token with every request.
#[derive(Clone)]
pub struct BearerToken(Option<AsciiMetadataValue>);

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}
