//! `[policy]` on the wire. Decoding re-parses every CIDR, key and JWKS: an agent never
//! enforces a policy it has not checked itself.

use std::time::Duration;

use super::{WireError, invalid, ms};
use crate::config::model::{
    AccessPolicy, Auth, Cidr, EncodedSlashes, Jwt, JwtKey, Limits, Policy, RateKey, RateLimit,
    Secret,
};
use crate::v1;

fn cidrs_to_wire(l: &[Cidr]) -> v1::CidrList {
    v1::CidrList {
        cidrs: l.iter().map(ToString::to_string).collect(),
    }
}

fn cidrs_from_wire(l: &[String], what: &str) -> Result<Vec<Cidr>, WireError> {
    l.iter()
        .map(|c| Cidr::parse(c).map_err(|e| invalid(what, e)))
        .collect()
}

fn rate_key_to_wire(k: &RateKey) -> String {
    match k {
        RateKey::ClientIp => "client_ip".into(),
        RateKey::ApiKey => "api_key".into(),
        RateKey::Route => "route".into(),
        RateKey::Header(h) => format!("header:{h}"),
    }
}

fn rate_key_from_wire(k: &str, what: &str) -> Result<RateKey, WireError> {
    Ok(match k {
        "client_ip" => RateKey::ClientIp,
        "api_key" => RateKey::ApiKey,
        "route" => RateKey::Route,
        other => match other.strip_prefix("header:") {
            Some(h) if http::HeaderName::from_bytes(h.as_bytes()).is_ok() => {
                RateKey::Header(h.to_ascii_lowercase())
            }
            _ => return Err(invalid(what, format!("unknown rate-limit key {other:?}"))),
        },
    })
}

fn secrets(l: &[Secret]) -> Vec<String> {
    l.iter().map(|s| s.0.clone()).collect()
}

fn auth_to_wire(a: &Auth) -> v1::AuthPolicy {
    v1::AuthPolicy {
        api_keys: secrets(&a.api_keys),
        api_key_header: a.api_key_header.clone(),
        api_key_query: a.api_key_query.clone(),
        bearer_tokens: secrets(&a.bearer_tokens),
        jwt: a.jwt.as_ref().map(|j| v1::JwtPolicy {
            key: Some(match &j.key {
                JwtKey::Hs256(s) => v1::jwt_policy::Key::Hs256Secret(s.0.clone()),
                JwtKey::Jwks(t) => v1::jwt_policy::Key::Jwks(t.clone()),
            }),
            issuer: j.issuer.clone(),
            audience: j.audience.clone(),
            leeway_ms: ms(j.leeway),
            forward_claims: j
                .forward_claims
                .iter()
                .map(|(claim, header)| v1::ClaimHeader {
                    claim: claim.clone(),
                    header: header.clone(),
                })
                .collect(),
        }),
    }
}

fn auth_from_wire(a: v1::AuthPolicy, what: &str) -> Result<Auth, WireError> {
    let jwt = match a.jwt {
        None => None,
        Some(j) => {
            let key = match j.key {
                Some(v1::jwt_policy::Key::Hs256Secret(s)) => JwtKey::Hs256(Secret(s)),
                Some(v1::jwt_policy::Key::Jwks(t)) => {
                    crate::config::jwks::check(&t).map_err(|e| invalid(what, e))?;
                    JwtKey::Jwks(t)
                }
                None => return Err(invalid(what, "jwt without a key")),
            };
            Some(Jwt {
                key,
                issuer: j.issuer,
                audience: j.audience,
                leeway: Duration::from_millis(j.leeway_ms),
                forward_claims: j
                    .forward_claims
                    .into_iter()
                    .map(|c| (c.claim, c.header))
                    .collect(),
            })
        }
    };
    if http::HeaderName::from_bytes(a.api_key_header.as_bytes()).is_err() {
        return Err(invalid(what, "invalid api_key_header"));
    }
    Ok(Auth {
        api_keys: a.api_keys.into_iter().map(Secret).collect(),
        api_key_header: a.api_key_header,
        api_key_query: a.api_key_query,
        bearer_tokens: a.bearer_tokens.into_iter().map(Secret).collect(),
        jwt,
    })
}

pub(super) fn access_to_wire(a: &AccessPolicy) -> v1::AccessPolicy {
    v1::AccessPolicy {
        allow: a.allow.as_deref().map(cidrs_to_wire),
        deny: a.deny.as_deref().map(cidrs_to_wire),
        auth: a.auth.as_ref().map(auth_to_wire),
        rate_limit: a.rate_limit.as_ref().map(|r| v1::RateLimitPolicy {
            per_second: r.per_second,
            burst: r.burst,
            key: rate_key_to_wire(&r.key),
        }),
        max_body_bytes: a.max_body_bytes,
        require_content_length: a.require_content_length,
        encoded_slashes: a.encoded_slashes.map(|e| match e {
            EncodedSlashes::Keep => "keep".to_string(),
            EncodedSlashes::Reject => "reject".to_string(),
        }),
    }
}

pub(super) fn access_from_wire(
    a: Option<v1::AccessPolicy>,
    what: &str,
) -> Result<AccessPolicy, WireError> {
    let Some(a) = a else {
        return Ok(AccessPolicy::default());
    };
    Ok(AccessPolicy {
        allow: a
            .allow
            .map(|l| cidrs_from_wire(&l.cidrs, what))
            .transpose()?,
        deny: a
            .deny
            .map(|l| cidrs_from_wire(&l.cidrs, what))
            .transpose()?,
        auth: a.auth.map(|x| auth_from_wire(x, what)).transpose()?,
        rate_limit: a
            .rate_limit
            .map(|r| {
                if r.per_second == 0 || r.burst == 0 {
                    return Err(invalid(what, "rate limit of zero"));
                }
                Ok(RateLimit {
                    per_second: r.per_second,
                    burst: r.burst,
                    key: rate_key_from_wire(&r.key, what)?,
                })
            })
            .transpose()?,
        max_body_bytes: a.max_body_bytes,
        require_content_length: a.require_content_length,
        encoded_slashes: match a.encoded_slashes.as_deref() {
            None => None,
            Some("keep") => Some(EncodedSlashes::Keep),
            Some("reject") => Some(EncodedSlashes::Reject),
            Some(o) => return Err(invalid(what, format!("unknown encoded_slashes {o:?}"))),
        },
    })
}

pub(super) fn policy_to_wire(p: &Policy) -> v1::Policy {
    let l = &p.limits;
    v1::Policy {
        trusted_proxies: p.trusted_proxies.iter().map(ToString::to_string).collect(),
        access: Some(access_to_wire(&p.access)),
        limits: Some(v1::Limits {
            max_header_count: l.max_header_count,
            max_header_bytes: l.max_header_bytes,
            max_uri_bytes: l.max_uri_bytes,
            header_timeout_ms: ms(l.header_timeout),
            idle_timeout_ms: ms(l.idle_timeout),
            max_connections: l.max_connections,
            max_connections_per_ip: l.max_connections_per_ip,
            h2_max_concurrent_streams: l.h2_max_concurrent_streams,
        }),
    }
}

pub(super) fn policy_from_wire(p: Option<v1::Policy>) -> Result<Policy, WireError> {
    let what = "policy";
    let Some(p) = p else {
        return Ok(Policy::default());
    };
    let limits = match p.limits {
        None => Limits::default(),
        Some(l) => {
            if l.max_header_count == 0 || l.max_header_bytes == 0 || l.max_uri_bytes == 0 {
                return Err(invalid(what, "a zero request-head limit"));
            }
            if l.header_timeout_ms == 0
                || l.idle_timeout_ms == 0
                || l.h2_max_concurrent_streams == 0
            {
                return Err(invalid(what, "a zero timeout or stream limit"));
            }
            Limits {
                max_header_count: l.max_header_count,
                max_header_bytes: l.max_header_bytes,
                max_uri_bytes: l.max_uri_bytes,
                header_timeout: Duration::from_millis(l.header_timeout_ms),
                idle_timeout: Duration::from_millis(l.idle_timeout_ms),
                max_connections: l.max_connections,
                max_connections_per_ip: l.max_connections_per_ip,
                h2_max_concurrent_streams: l.h2_max_concurrent_streams,
            }
        }
    };
    Ok(Policy {
        trusted_proxies: cidrs_from_wire(&p.trusted_proxies, what)?,
        access: access_from_wire(p.access, what)?,
        limits,
    })
}
