//! A typed client for the plane's Admin API.

use std::time::Duration;

use dispa_proto::connect::{BearerToken, PlaneConnect};
use dispa_proto::v1::admin_client::AdminClient;
use dispa_proto::v1::{self, ValidateResponse};
use prost::Message;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// How a call failed, mapped to dispactl's exit codes.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the plane at {url}: {detail}")]
    Unreachable { url: String, detail: String },
    /// The plane rejected the config; the diagnostics say where.
    #[error("{message}")]
    Invalid {
        message: String,
        diagnostics: Vec<v1::Diagnostic>,
    },
    #[error("{message}")]
    Rejected { code: tonic::Code, message: String },
}

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> Self {
        if s.code() == tonic::Code::InvalidArgument
            && let Ok(v) = ValidateResponse::decode(s.details())
            && !v.diagnostics.is_empty()
        {
            return ClientError::Invalid {
                message: s.message().to_string(),
                diagnostics: v.diagnostics,
            };
        }
        ClientError::Rejected {
            code: s.code(),
            message: s.message().to_string(),
        }
    }
}

pub struct Client {
    inner: AdminClient<InterceptedService<Channel, BearerToken>>,
}

impl Client {
    pub async fn connect(plane: &PlaneConnect) -> Result<Self, ClientError> {
        let url = plane.url.as_str();
        let unreachable = |detail: String| ClientError::Unreachable {
            url: url.to_string(),
            detail,
        };
        let endpoint = plane
            .endpoint()
            .map_err(|e| unreachable(e.to_string()))?
            .timeout(Duration::from_secs(60));
        let auth = plane
            .interceptor()
            .map_err(|e| unreachable(e.to_string()))?;
        let channel = endpoint.connect().await.map_err(|e| {
            let mut detail = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                detail = format!("{detail}: {s}");
                src = s.source();
            }
            unreachable(detail)
        })?;
        let inner = AdminClient::with_interceptor(channel, auth)
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024);
        Ok(Self { inner })
    }

    pub async fn apply(&mut self, r: v1::ApplyRequest) -> Result<v1::ApplyResponse, ClientError> {
        Ok(self.inner.apply(r).await?.into_inner())
    }

    pub async fn diff(&mut self, r: v1::DiffRequest) -> Result<v1::DiffResponse, ClientError> {
        Ok(self.inner.diff(r).await?.into_inner())
    }

    pub async fn get(
        &mut self,
        version: u64,
        show_secrets: bool,
    ) -> Result<v1::GetResponse, ClientError> {
        Ok(self
            .inner
            .get(v1::GetRequest {
                version,
                show_secrets,
            })
            .await?
            .into_inner())
    }

    pub async fn history(&mut self, limit: u32) -> Result<Vec<v1::VersionInfo>, ClientError> {
        Ok(self
            .inner
            .history(v1::HistoryRequest { limit })
            .await?
            .into_inner()
            .versions)
    }

    pub async fn rollback(
        &mut self,
        r: v1::RollbackRequest,
    ) -> Result<v1::ApplyResponse, ClientError> {
        Ok(self.inner.rollback(r).await?.into_inner())
    }

    pub async fn agents(&mut self) -> Result<Vec<v1::AgentInfo>, ClientError> {
        Ok(self
            .inner
            .list_agents(v1::ListAgentsRequest {})
            .await?
            .into_inner()
            .agents)
    }

    /// Matching log records as a stream (newest first; with `follow`, then live).
    pub async fn query_logs(
        &mut self,
        q: v1::LogQuery,
    ) -> Result<tonic::Streaming<v1::LogRecord>, ClientError> {
        Ok(self.inner.query_logs(q).await?.into_inner())
    }

    pub async fn log_stats(&mut self, q: v1::LogQuery) -> Result<v1::LogStats, ClientError> {
        Ok(self.inner.query_log_stats(q).await?.into_inner())
    }

    pub async fn status(&mut self) -> Result<v1::StatusResponse, ClientError> {
        Ok(self.inner.status(v1::StatusRequest {}).await?.into_inner())
    }

    pub async fn create_token(
        &mut self,
        r: v1::CreateTokenRequest,
    ) -> Result<v1::CreateTokenResponse, ClientError> {
        Ok(self.inner.create_token(r).await?.into_inner())
    }

    pub async fn list_tokens(&mut self) -> Result<Vec<v1::TokenInfo>, ClientError> {
        Ok(self
            .inner
            .list_tokens(v1::ListTokensRequest {})
            .await?
            .into_inner()
            .tokens)
    }

    pub async fn revoke_token(&mut self, id: String) -> Result<v1::TokenInfo, ClientError> {
        Ok(self
            .inner
            .revoke_token(v1::RevokeTokenRequest { id })
            .await?
            .into_inner()
            .info
            .unwrap_or_default())
    }

    pub async fn audit(&mut self, limit: u32) -> Result<Vec<v1::AuditEntry>, ClientError> {
        Ok(self
            .inner
            .list_audit(v1::ListAuditRequest { limit })
            .await?
            .into_inner()
            .entries)
    }
}
