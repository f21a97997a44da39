//! The Admin API's token and audit calls, and the audit records of the calls that change
//! config or read secrets.

use std::time::SystemTime;

use dispa_proto::v1;
use dispa_proto::{ErrorCode, Version};
use tonic::{Request, Status};

use super::now_ms;
use crate::PlaneState;
use crate::auth::{AuditRecord, Principal, Role, TokensError};

/// The caller the auth layer identified (every request passes through it).
pub(crate) fn principal<T>(r: &Request<T>) -> Principal {
    r.extensions()
        .get::<Principal>()
        .cloned()
        .unwrap_or_else(|| Principal {
            who: "anonymous".into(),
            role: None,
            peer: String::new(),
        })
}

fn tokens_status(e: TokensError) -> Status {
    match e {
        TokensError::NotFound(_) => ErrorCode::NotFound.status(e.to_string()),
        e => ErrorCode::Unavailable.status(e.to_string()),
    }
}

fn now() -> i64 {
    now_ms(SystemTime::now())
}

/// Records a config change (or a failed attempt) with its versions.
pub(crate) fn audit_change(
    s: &PlaneState,
    who: &Principal,
    action: &str,
    result: Result<(Version, Version), &Status>,
    message: &str,
) {
    let mut rec = who.audit(action, "ok");
    rec.message = message.to_string();
    match result {
        Ok((from, to)) => {
            rec.from_version = from.0;
            rec.to_version = to.0;
        }
        Err(status) => {
            rec.outcome = "failed";
            let first = status.message().lines().next().unwrap_or_default();
            rec.message = if message.is_empty() {
                first.to_string()
            } else {
                format!("{message}: {first}")
            };
        }
    }
    s.auth.record(rec);
}

/// Secrets are shown to admins only; every request for them is recorded.
pub(crate) fn check_show_secrets(s: &PlaneState, who: &Principal) -> Result<(), Status> {
    let allowed = who.role == Some(Role::Admin);
    let mut rec = who.audit("Get --show-secrets", if allowed { "ok" } else { "denied" });
    if !allowed {
        rec.message = "secrets are shown to admin tokens only".into();
    }
    s.auth.record(rec);
    if allowed {
        Ok(())
    } else {
        Err(Status::permission_denied(format!(
            "--show-secrets needs an admin token; this one's role is {}",
            who.role_name()
        )))
    }
}

pub(crate) fn create_token(
    s: &PlaneState,
    who: &Principal,
    r: v1::CreateTokenRequest,
) -> Result<v1::CreateTokenResponse, Status> {
    if !s.auth.enabled {
        return Err(Status::failed_precondition(
            "this plane runs without --auth, so tokens would not be checked; restart it with --auth",
        ));
    }
    let Some(role) = Role::from_wire(r.role) else {
        return Err(ErrorCode::InvalidArgument
            .status("a token needs a role: viewer, operator, admin or agent"));
    };
    let (info, token) = s
        .auth
        .tokens
        .create(role, &r.name, &who.who, now())
        .map_err(tokens_status)?;
    let mut rec = who.audit("CreateToken", "ok");
    rec.message = format!("{role} token {} ({})", info.name, info.id);
    s.auth.record(rec);
    Ok(v1::CreateTokenResponse {
        info: Some(info),
        token,
    })
}

pub(crate) fn list_tokens(s: &PlaneState) -> Result<v1::ListTokensResponse, Status> {
    Ok(v1::ListTokensResponse {
        tokens: s.auth.tokens.list().map_err(tokens_status)?,
    })
}

pub(crate) fn revoke_token(
    s: &PlaneState,
    who: &Principal,
    r: v1::RevokeTokenRequest,
) -> Result<v1::RevokeTokenResponse, Status> {
    let result = s.auth.tokens.revoke(&r.id, now());
    let mut rec: AuditRecord = who.audit("RevokeToken", "ok");
    match &result {
        Ok(info) => rec.message = format!("token {} ({})", info.name, info.id),
        Err(e) => {
            rec.outcome = "failed";
            rec.message = e.to_string();
        }
    }
    s.auth.record(rec);
    Ok(v1::RevokeTokenResponse {
        info: Some(result.map_err(tokens_status)?),
    })
}

pub(crate) fn list_audit(
    s: &PlaneState,
    r: v1::ListAuditRequest,
) -> Result<v1::ListAuditResponse, Status> {
    let limit = match r.limit {
        0 => 100,
        n => n as usize,
    };
    Ok(v1::ListAuditResponse {
        entries: s.auth.audit.list(limit).map_err(tokens_status)?,
    })
}
