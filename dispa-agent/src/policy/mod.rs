//! The operator's policy, enforced per request: client address, allow/deny lists, rate
//! limits and authentication. Compiled once per snapshot ([`RoutePolicy`] per route, the
//! global policy merged in); rate-limit state is carried across snapshots while its identity
//! (scope and rule) is unchanged.

pub mod auth;
pub mod client;
pub mod rate;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use dispa_proto::config::Config;
use dispa_proto::config::model::{AccessPolicy, Cidr, EncodedSlashes, RateKey, RateLimit};
use http::HeaderMap;

pub use auth::{AuthError, Authenticated, Authenticator};
pub use rate::{Limited, RateGate};

/// Where a rate limit's buckets live: the global policy's, or one route's own.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RateScope {
    Global,
    Route(String),
}

/// Rate-limit gates of a snapshot, by scope.
pub type RateGates = HashMap<RateScope, Arc<RateGate>>;

/// A route's effective policy: its own fields, the global policy's for the rest.
#[derive(Debug, Default)]
pub struct RoutePolicy {
    pub allow: Vec<Cidr>,
    pub deny: Vec<Cidr>,
    pub auth: Option<Arc<Authenticator>>,
    pub rate: Option<Arc<RateGate>>,
    pub max_body_bytes: Option<u64>,
    pub require_content_length: bool,
    pub encoded_slashes: EncodedSlashes,
}

/// Why a request is refused by policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Denied {
    /// Not in `allow`, or in `deny`.
    Address,
    RateLimited(Limited),
    Auth(AuthError),
}

impl Denied {
    pub fn reason(self) -> &'static str {
        match self {
            Denied::Address => "ip_denied",
            Denied::RateLimited(_) => "rate_limited",
            Denied::Auth(e) => e.reason(),
        }
    }
}

/// Whether `ip` may connect: deny wins; an empty allow list allows everyone.
pub fn address_allowed(ip: IpAddr, allow: &[Cidr], deny: &[Cidr]) -> bool {
    if deny.iter().any(|c| c.contains(ip)) {
        return false;
    }
    allow.is_empty() || allow.iter().any(|c| c.contains(ip))
}

/// The rate-limit gate for `rule` in `scope`: the previous snapshot's if the rule is the
/// same, so buckets survive config pushes; otherwise a fresh one.
fn gate(
    scope: RateScope,
    rule: &RateLimit,
    previous: Option<&RateGates>,
    gates: &mut RateGates,
) -> Arc<RateGate> {
    if let Some(g) = gates.get(&scope) {
        return g.clone();
    }
    let g = previous
        .and_then(|p| p.get(&scope))
        .filter(|g| g.rule == *rule)
        .cloned()
        .unwrap_or_else(|| Arc::new(RateGate::new(rule.clone())));
    gates.insert(scope, g.clone());
    g
}

/// Compiles every route's effective policy (same order as `config.routes`).
pub fn compile(
    config: &Config,
    previous: Option<&RateGates>,
) -> Result<(Vec<RoutePolicy>, RateGates, RoutePolicy), String> {
    let global = &config.policy.access;
    let mut gates = RateGates::new();
    let global_auth = global
        .auth
        .as_ref()
        .map(|a| Authenticator::compile(a).map(Arc::new))
        .transpose()?;
    let mut per_route = Vec::with_capacity(config.routes.len());
    for r in &config.routes {
        per_route.push(effective(
            global,
            &r.policy,
            RateScope::Route(r.name.to_string()),
            &global_auth,
            previous,
            &mut gates,
        )?);
    }
    let unrouted = effective(
        global,
        &AccessPolicy::default(),
        RateScope::Global,
        &global_auth,
        previous,
        &mut gates,
    )?;
    Ok((per_route, gates, unrouted))
}

fn effective(
    global: &AccessPolicy,
    own: &AccessPolicy,
    scope: RateScope,
    global_auth: &Option<Arc<Authenticator>>,
    previous: Option<&RateGates>,
    gates: &mut RateGates,
) -> Result<RoutePolicy, String> {
    let auth = match &own.auth {
        Some(a) => Some(Arc::new(Authenticator::compile(a)?)),
        None => global_auth.clone(),
    };
    let rate = match (&own.rate_limit, &global.rate_limit) {
        (Some(r), _) => Some(gate(scope, r, previous, gates)),
        (None, Some(r)) => Some(gate(RateScope::Global, r, previous, gates)),
        (None, None) => None,
    };
    Ok(RoutePolicy {
        allow: own
            .allow
            .clone()
            .or_else(|| global.allow.clone())
            .unwrap_or_default(),
        deny: own
            .deny
            .clone()
            .or_else(|| global.deny.clone())
            .unwrap_or_default(),
        auth,
        rate,
        max_body_bytes: own.max_body_bytes.or(global.max_body_bytes),
        require_content_length: own
            .require_content_length
            .or(global.require_content_length)
            .unwrap_or(false),
        encoded_slashes: own
            .encoded_slashes
            .or(global.encoded_slashes)
            .unwrap_or_default(),
    })
}

/// What a request is counted under for its rate limit.
fn rate_key(
    rule: &RateLimit,
    client: IpAddr,
    headers: &HeaderMap,
    query: Option<&str>,
    auth: Option<&Authenticator>,
) -> String {
    use sha2::Digest;
    match &rule.key {
        RateKey::ClientIp => client.to_string(),
        RateKey::Route => String::new(),
        RateKey::Header(h) => headers
            .get(h.as_str())
            .map(|v| {
                let b = v.as_bytes();
                String::from_utf8_lossy(&b[..b.len().min(256)]).into_owned()
            })
            .unwrap_or_default(),
        // A digest, so keys are not kept in memory in the clear.
        RateKey::ApiKey => match auth.and_then(|a| a.presented_key(headers, query)) {
            Some(k) => hex::encode(&sha2::Sha256::digest(k.as_bytes())[..16]),
            None => client.to_string(),
        },
    }
}

impl RoutePolicy {
    /// Address, then rate limit, then credentials. On success, the headers to add upstream.
    pub fn check(
        &self,
        client: IpAddr,
        headers: &HeaderMap,
        query: Option<&str>,
    ) -> Result<Authenticated, Denied> {
        if !address_allowed(client, &self.allow, &self.deny) {
            return Err(Denied::Address);
        }
        if let Some(g) = &self.rate {
            let key = rate_key(&g.rule, client, headers, query, self.auth.as_deref());
            g.check(&key).map_err(Denied::RateLimited)?;
        }
        match &self.auth {
            None => Ok(Authenticated::default()),
            Some(a) => a.check(headers, query).map_err(Denied::Auth),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or_else(|_| panic!("{s}"))
    }

    fn cidrs(l: &[&str]) -> Vec<Cidr> {
        l.iter()
            .map(|c| Cidr::parse(c).unwrap_or_else(|e| panic!("{e}")))
            .collect()
    }

    #[test]
    fn deny_wins_and_empty_allow_allows_all() {
        let allow = cidrs(&["10.0.0.0/8", "2001:db8::/32"]);
        let deny = cidrs(&["10.9.0.0/16"]);
        assert!(address_allowed(ip("10.1.1.1"), &allow, &deny));
        assert!(!address_allowed(ip("10.9.1.1"), &allow, &deny));
        assert!(!address_allowed(ip("11.0.0.1"), &allow, &deny));
        assert!(address_allowed(ip("2001:db8::7"), &allow, &deny));
        assert!(address_allowed(ip("11.0.0.1"), &[], &deny));
        assert!(!address_allowed(ip("10.9.0.1"), &[], &deny));
    }

    #[test]
    fn routes_inherit_and_override_and_gates_survive_pushes() {
        let src = r#"
[policy]
deny = ["10.9.0.0/16"]
rate_limit = { per_second = 5 }
[upstreams.a]
endpoints = ["127.0.0.1:1"]
[[routes]]
name = "plain"
upstream = "a"
[[routes]]
name = "own"
path_prefix = "/own"
upstream = "a"
[routes.policy]
deny = []
rate_limit = { per_second = 1 }
"#;
        let c = dispa_proto::config::parse("t", src).unwrap_or_else(|d| panic!("{d}"));
        let (routes, gates, _) = compile(&c, None).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(routes[0].deny.len(), 1);
        assert!(routes[1].deny.is_empty());
        let (g0, g1) = (routes[0].rate.clone(), routes[1].rate.clone());
        assert_eq!(g0.as_ref().map(|g| g.rule.per_second), Some(5));
        assert_eq!(g1.as_ref().map(|g| g.rule.per_second), Some(1));
        // Same rules in the next snapshot: the same gates (and buckets).
        let (again, _, _) = compile(&c, Some(&gates)).unwrap_or_else(|e| panic!("{e}"));
        assert!(Arc::ptr_eq(
            again[0].rate.as_ref().unwrap_or_else(|| panic!()),
            g0.as_ref().unwrap_or_else(|| panic!())
        ));
    }
}
