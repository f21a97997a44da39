//! Who may call what. With `--auth`, every call but `/metrics` carries a token (or, for agents,
//! a verified client certificate); its role decides which RPCs it may use. Decisions are plain
//! functions over the RPC path and the caller's role; [`layer`] applies them to requests and
//! records every denial in the [`audit`] log.

pub mod audit;
pub mod layer;
pub mod tokens;

use std::fmt;

use dispa_proto::v1;

pub use audit::{AuditLog, AuditRecord};
pub use layer::{Auth, Principal};
pub use tokens::{TokenStore, TokensError};

/// A token's role. Viewer < operator < admin for the Admin API; an agent role (join token or
/// client certificate) may only stream config and report telemetry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Viewer,
    Operator,
    Admin,
    Agent,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
            Role::Agent => "agent",
        }
    }

    pub fn from_wire(r: i32) -> Option<Role> {
        match v1::Role::try_from(r).ok()? {
            v1::Role::Viewer => Some(Role::Viewer),
            v1::Role::Operator => Some(Role::Operator),
            v1::Role::Admin => Some(Role::Admin),
            v1::Role::Agent => Some(Role::Agent),
            v1::Role::Unspecified => None,
        }
    }

    pub fn to_wire(self) -> v1::Role {
        match self {
            Role::Viewer => v1::Role::Viewer,
            Role::Operator => v1::Role::Operator,
            Role::Admin => v1::Role::Admin,
            Role::Agent => v1::Role::Agent,
        }
    }

    /// Rank on the Admin API; agents have none.
    fn admin_rank(self) -> Option<u8> {
        match self {
            Role::Viewer => Some(1),
            Role::Operator => Some(2),
            Role::Admin => Some(3),
            Role::Agent => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a call needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// No credentials (Prometheus scrapes `/metrics`).
    Open,
    /// At least this Admin-API role.
    AtLeast(Role),
    /// An agent's credentials.
    Agent,
    /// Nothing may call it (an unknown path).
    Nobody,
}

/// The requirement for a request path (`/dispa.v1.Admin/Apply`, `/metrics`, ...).
pub fn need_for(path: &str) -> Need {
    if path == "/metrics" {
        return Need::Open;
    }
    if path.starts_with("/dispa.v1.ConfigDiscovery/") || path.starts_with("/dispa.v1.Telemetry/") {
        return Need::Agent;
    }
    let Some(method) = path.strip_prefix("/dispa.v1.Admin/") else {
        return Need::Nobody;
    };
    match method {
        "Apply" | "Rollback" => Need::AtLeast(Role::Operator),
        "CreateToken" | "ListTokens" | "RevokeToken" => Need::AtLeast(Role::Admin),
        "Validate" | "Diff" | "Get" | "History" | "ListAgents" | "Status" | "QueryLogs"
        | "QueryLogStats" | "ListAudit" => Need::AtLeast(Role::Viewer),
        _ => Need::Nobody,
    }
}

/// Whether `role` satisfies `need`.
pub fn allows(role: Role, need: Need) -> bool {
    match need {
        Need::Open => true,
        Need::Nobody => false,
        Need::Agent => role == Role::Agent,
        Need::AtLeast(min) => match (role.admin_rank(), min.admin_rank()) {
            (Some(have), Some(want)) => have >= want,
            _ => false,
        },
    }
}

/// The short action name the audit log shows: the RPC method, or service/method for agents.
pub fn action_of(path: &str) -> String {
    let p = path.trim_start_matches('/');
    match p.strip_prefix("dispa.v1.") {
        Some(rest) => match rest.strip_prefix("Admin/") {
            Some(method) => method.to_string(),
            None => rest.to_string(),
        },
        None => p.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_and_paths() {
        let table = [
            ("/dispa.v1.Admin/Get", Role::Viewer, true),
            ("/dispa.v1.Admin/ListAudit", Role::Viewer, true),
            ("/dispa.v1.Admin/Apply", Role::Viewer, false),
            ("/dispa.v1.Admin/Apply", Role::Operator, true),
            ("/dispa.v1.Admin/Rollback", Role::Admin, true),
            ("/dispa.v1.Admin/CreateToken", Role::Operator, false),
            ("/dispa.v1.Admin/CreateToken", Role::Admin, true),
            ("/dispa.v1.Admin/Get", Role::Agent, false),
            ("/dispa.v1.ConfigDiscovery/Stream", Role::Agent, true),
            ("/dispa.v1.ConfigDiscovery/Stream", Role::Admin, false),
            ("/dispa.v1.Telemetry/Report", Role::Agent, true),
            ("/dispa.v1.Admin/Unknown", Role::Admin, false),
            (
                "/grpc.reflection.v1.ServerReflection/Info",
                Role::Admin,
                false,
            ),
            ("/metrics", Role::Viewer, true),
        ];
        for (path, role, want) in table {
            assert_eq!(allows(role, need_for(path)), want, "{path} as {role}");
        }
        assert_eq!(action_of("/dispa.v1.Admin/Apply"), "Apply");
        assert_eq!(
            action_of("/dispa.v1.ConfigDiscovery/Stream"),
            "ConfigDiscovery/Stream"
        );
    }
}
