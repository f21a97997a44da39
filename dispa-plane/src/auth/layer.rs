//! Applies [`super::need_for`] to every request on the plane's port: identifies the caller
//! (bearer token, or a verified client certificate for agents), refuses and audits what its
//! role does not allow, and hands the [`Principal`] to the services in request extensions.

use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use super::audit::{AuditLog, AuditRecord};
use super::tokens::TokenStore;
use super::{Need, Role, action_of, allows, need_for};
use crate::admin::now_ms;

/// Who is calling.
#[derive(Clone, Debug)]
pub struct Principal {
    /// The token's name and id, "agent-cert:<digest>", or "anonymous".
    pub who: String,
    /// `None` when the caller proved nothing.
    pub role: Option<Role>,
    pub peer: String,
}

impl Principal {
    pub fn role_name(&self) -> String {
        self.role
            .map(|r| r.as_str().to_string())
            .unwrap_or_default()
    }

    /// An audit record for this caller.
    pub fn audit(&self, action: &str, outcome: &'static str) -> AuditRecord {
        AuditRecord {
            who: self.who.clone(),
            role: self.role_name(),
            peer: self.peer.clone(),
            action: action.to_string(),
            outcome,
            ..AuditRecord::default()
        }
    }
}

/// The plane's access control: whether tokens are required, the tokens, and the audit log.
pub struct Auth {
    pub enabled: bool,
    pub tokens: TokenStore,
    pub audit: AuditLog,
}

impl Auth {
    pub fn record(&self, r: AuditRecord) {
        self.audit.record(r, now_ms(SystemTime::now()));
    }
}

fn peer_of(req: &Request) -> String {
    let ext = req.extensions();
    ext.get::<TcpConnectInfo>()
        .and_then(|c| c.remote_addr())
        .or_else(|| {
            ext.get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|c| c.get_ref().remote_addr())
        })
        .map(|a| a.to_string())
        .unwrap_or_default()
}

fn bearer(req: &Request) -> Option<&str> {
    let v = req
        .headers()
        .get(http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// Identifies the caller. A token that does not verify proves nothing.
fn identify(auth: &Auth, req: &Request, peer: String) -> Principal {
    if !auth.enabled {
        return Principal {
            who: "anonymous".into(),
            role: Some(Role::Admin),
            peer,
        };
    }
    if let Some(token) = bearer(req) {
        return match auth.tokens.verify(token) {
            Ok(Some(t)) => Principal {
                who: format!("{} ({})", t.name, t.id),
                role: Some(t.role),
                peer,
            },
            Ok(None) => Principal {
                who: "invalid token".into(),
                role: None,
                peer,
            },
            Err(e) => {
                tracing::error!("token lookup failed: {e}");
                Principal {
                    who: "unverified token".into(),
                    role: None,
                    peer,
                }
            }
        };
    }
    // tonic only reports certificates that chained to --client-ca.
    let cert = req
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|c| c.peer_certs())
        .and_then(|certs| certs.first().map(|c| dispa_proto::content_hash(c.as_ref())));
    match cert {
        Some(digest) => Principal {
            who: format!("agent-cert:{}", &digest[..16]),
            role: Some(Role::Agent),
            peer,
        },
        None => Principal {
            who: "anonymous".into(),
            role: None,
            peer,
        },
    }
}

fn refusal(p: &Principal, need: Need, action: &str) -> tonic::Status {
    match (p.role, need) {
        (None, _) if p.who == "anonymous" => tonic::Status::unauthenticated(
            "this plane requires a token: pass --token or set DISPA_TOKEN (agents: --join-token or a client certificate)",
        ),
        (None, _) => tonic::Status::unauthenticated("the token is not valid (unknown or revoked)"),
        (Some(role), Need::AtLeast(min)) => tonic::Status::permission_denied(format!(
            "role {role} may not call {action}: it needs {min} or higher"
        )),
        (Some(role), Need::Agent) => tonic::Status::permission_denied(format!(
            "{action} is for agents (a join token or client certificate); this token's role is {role}"
        )),
        (Some(_), _) => tonic::Status::permission_denied(format!("{action} is not allowed")),
    }
}

/// axum middleware: identify, authorise, audit refusals.
pub async fn check(State(auth): State<Arc<Auth>>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let need = need_for(&path);
    let peer = peer_of(&req);
    let principal = identify(&auth, &req, peer);
    let allowed =
        !auth.enabled || need == Need::Open || principal.role.is_some_and(|r| allows(r, need));
    if !allowed {
        let action = action_of(&path);
        let status = refusal(&principal, need, &action);
        tracing::warn!(who = %principal.who, peer = %principal.peer, action = %action, "request denied: {}", status.message());
        let mut rec = principal.audit(&action, "denied");
        rec.message = status.message().to_string();
        auth.record(rec);
        return status.into_http::<axum::body::Body>().into_response();
    }
    req.extensions_mut().insert(principal);
    next.run(req).await
}
