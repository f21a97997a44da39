//! Validated [`Config`] <-> protobuf [`Snapshot`](crate::v1::Snapshot).
//!
//! Encoding is deterministic (no maps), so equal content gives an equal hash. Decoding re-checks
//! what an agent relies on: an agent never trusts bytes it received.

use std::collections::BTreeMap;
use std::time::Duration;

use prost::Message;

use super::model::{
    Action, Balance, Config, Endpoint, EndpointAddr, HashOn, HeaderOps, HealthCheck, HostPattern,
    MAX_TIMEOUT, Mirror, Outlier, PathMatch, Redirect, Respond, RetryOn, RetryPolicy, Route,
    Upstream, ValueMatch,
};
use crate::v1;
use crate::{RouteName, UpstreamName};

mod policy;
mod tls;

/// Why a received snapshot cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("snapshot does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("{what}: {detail}")]
    Invalid { what: String, detail: String },
}

fn invalid(what: impl Into<String>, detail: impl Into<String>) -> WireError {
    WireError::Invalid {
        what: what.into(),
        detail: detail.into(),
    }
}

pub fn to_snapshot(c: &Config) -> v1::Snapshot {
    v1::Snapshot {
        upstreams: c.upstreams.values().map(upstream_to_wire).collect(),
        routes: c.routes.iter().map(route_to_wire).collect(),
        certificates: c
            .certificates
            .values()
            .map(tls::certificate_to_wire)
            .collect(),
        policy: Some(policy::policy_to_wire(&c.policy)),
    }
}

pub fn encode(c: &Config) -> bytes::Bytes {
    bytes::Bytes::from(to_snapshot(c).encode_to_vec())
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn upstream_to_wire(u: &Upstream) -> v1::Upstream {
    v1::Upstream {
        name: u.name.to_string(),
        balance: match u.balance {
            Balance::RoundRobin => v1::Balance::RoundRobin,
            Balance::Weighted => v1::Balance::Weighted,
            Balance::LeastConn => v1::Balance::LeastConn,
            Balance::Random => v1::Balance::Random,
            Balance::P2c => v1::Balance::P2c,
            Balance::Hash(_) => v1::Balance::Hash,
        } as i32,
        h2: u.h2,
        max_requests: u.max_requests,
        max_connections: u.max_connections,
        max_pending: u.max_pending,
        idle_timeout_ms: ms(u.idle_timeout),
        health: u.health.as_ref().map(|h| v1::HealthCheck {
            path: h.path.clone(),
            interval_ms: ms(h.interval),
            timeout_ms: ms(h.timeout),
            healthy: h.healthy,
            unhealthy: h.unhealthy,
            expect_status: h.expect_status.iter().map(|s| u32::from(*s)).collect(),
        }),
        outlier: Some(v1::Outlier {
            consecutive_failures: u.outlier.consecutive_failures,
            base_ejection_ms: ms(u.outlier.base_ejection),
            max_ejection_ms: ms(u.outlier.max_ejection),
        }),
        hash_on: match &u.balance {
            Balance::Hash(on) => on.to_string(),
            _ => String::new(),
        },
        endpoints: u
            .endpoints
            .iter()
            .map(|e| v1::Endpoint {
                address: e.address.to_string(),
                weight: e.weight,
            })
            .collect(),
        connect_timeout_ms: ms(u.connect_timeout),
        tls: u.tls.as_ref().map(tls::upstream_tls_to_wire),
    }
}

fn ops_to_wire(o: &HeaderOps) -> Option<v1::HeaderOps> {
    let pairs = |v: &[(String, String)]| {
        v.iter()
            .map(|(name, value)| v1::Header {
                name: name.clone(),
                value: value.clone(),
            })
            .collect()
    };
    (!o.is_empty()).then(|| v1::HeaderOps {
        set: pairs(&o.set),
        add: pairs(&o.add),
        remove: o.remove.clone(),
    })
}

fn value_match_to_wire((name, m): &(String, ValueMatch)) -> v1::ValueMatch {
    v1::ValueMatch {
        name: name.clone(),
        kind: Some(match m {
            ValueMatch::Exact(v) => v1::value_match::Kind::Exact(v.clone()),
            ValueMatch::Regex(v) => v1::value_match::Kind::Regex(v.clone()),
            ValueMatch::Present => v1::value_match::Kind::Present(true),
        }),
    }
}

fn value_match_from_wire(m: v1::ValueMatch, what: &str) -> Result<(String, ValueMatch), WireError> {
    let vm = match m.kind {
        Some(v1::value_match::Kind::Exact(v)) => ValueMatch::Exact(v),
        Some(v1::value_match::Kind::Regex(v)) => ValueMatch::Regex(v),
        Some(v1::value_match::Kind::Present(_)) => ValueMatch::Present,
        None => return Err(invalid(what, format!("matcher {:?} has no kind", m.name))),
    };
    Ok((m.name, vm))
}

fn route_to_wire(r: &Route) -> v1::Route {
    v1::Route {
        name: r.name.to_string(),
        hosts: r.hosts.iter().map(|h| h.to_string()).collect(),
        path_match: Some(match &r.path {
            PathMatch::Exact(p) => v1::route::PathMatch::Path(p.clone()),
            PathMatch::Prefix(p) => v1::route::PathMatch::PathPrefix(p.clone()),
            PathMatch::Regex(p) => v1::route::PathMatch::PathRegex(p.clone()),
        }),
        headers: r.headers.iter().map(value_match_to_wire).collect(),
        query: r.query.iter().map(value_match_to_wire).collect(),
        split: match &r.action {
            Action::Split(s) => s
                .iter()
                .map(|(u, w)| v1::SplitTarget {
                    upstream: u.to_string(),
                    weight: *w,
                })
                .collect(),
            _ => Vec::new(),
        },
        redirect: match &r.action {
            Action::Redirect(rd) => Some(v1::Redirect {
                code: u32::from(rd.code),
                to: rd.to.clone(),
                scheme: rd.scheme.clone(),
                host: rd.host.clone(),
                path: rd.path.clone(),
            }),
            _ => None,
        },
        respond: match &r.action {
            Action::Respond(rs) => Some(v1::Respond {
                status: u32::from(rs.status),
                body: rs.body.clone(),
                headers: rs
                    .headers
                    .iter()
                    .map(|(n, v)| v1::Header {
                        name: n.clone(),
                        value: v.clone(),
                    })
                    .collect(),
            }),
            _ => None,
        },
        methods: r.methods.clone(),
        upstream: match &r.action {
            Action::Upstream(u) => u.to_string(),
            _ => String::new(),
        },
        timeout_ms: ms(r.timeout),
        request_headers: ops_to_wire(&r.request_headers),
        response_headers: ops_to_wire(&r.response_headers),
        rewrite_prefix: r.rewrite_prefix.clone(),
        host_rewrite: r.host_rewrite.clone(),
        idle_timeout_ms: r.idle_timeout.map_or(0, ms),
        mirror: r.mirror.as_ref().map(|m| v1::Mirror {
            upstream: m.upstream.to_string(),
            percent: m.percent,
        }),
        retries: r.retry.retries,
        retry_on: r.retry.on.iter().map(|o| o.name()).collect(),
        retry_non_idempotent: r.retry.non_idempotent,
        policy: Some(policy::access_to_wire(&r.policy)),
    }
}

/// Decodes and checks a received snapshot.
pub fn decode(bytes: &[u8]) -> Result<Config, WireError> {
    from_snapshot(v1::Snapshot::decode(bytes)?)
}

fn duration(what: &str, v: u64) -> Result<Duration, WireError> {
    let d = Duration::from_millis(v);
    if d.is_zero() || d > MAX_TIMEOUT {
        return Err(invalid(what, format!("duration {v}ms out of range")));
    }
    Ok(d)
}

pub fn from_snapshot(s: v1::Snapshot) -> Result<Config, WireError> {
    let mut upstreams = BTreeMap::new();
    for u in s.upstreams {
        let what = format!("upstream {:?}", u.name);
        let balance = match v1::Balance::try_from(u.balance) {
            Ok(v1::Balance::RoundRobin) => Balance::RoundRobin,
            Ok(v1::Balance::Weighted) => Balance::Weighted,
            Ok(v1::Balance::LeastConn) => Balance::LeastConn,
            Ok(v1::Balance::Random) => Balance::Random,
            Ok(v1::Balance::P2c) => Balance::P2c,
            Ok(v1::Balance::Hash) => {
                Balance::Hash(HashOn::parse(&u.hash_on).map_err(|m| invalid(&what, m))?)
            }
            Err(_) => return Err(invalid(&what, format!("unknown balance {}", u.balance))),
        };
        let mut endpoints = Vec::new();
        for e in u.endpoints {
            let address = EndpointAddr::parse(&e.address).map_err(|m| invalid(&what, m))?;
            endpoints.push(Endpoint {
                address,
                weight: e.weight.max(1),
            });
        }
        if endpoints.is_empty() {
            return Err(invalid(&what, "no endpoints"));
        }
        let tls = match u.tls {
            Some(t) => Some(tls::upstream_tls_from_wire(t, &what)?),
            None => None,
        };
        let name = UpstreamName::new(u.name);
        upstreams.insert(
            name.clone(),
            Upstream {
                h2: u.h2,
                max_requests: u.max_requests,
                max_connections: u.max_connections,
                max_pending: u.max_pending,
                idle_timeout: duration(&what, u.idle_timeout_ms)?,
                health: match u.health {
                    Some(h) => Some(HealthCheck {
                        path: h.path,
                        interval: duration(&what, h.interval_ms)?,
                        timeout: duration(&what, h.timeout_ms)?,
                        healthy: h.healthy.max(1),
                        unhealthy: h.unhealthy.max(1),
                        expect_status: h
                            .expect_status
                            .iter()
                            .filter_map(|s| u16::try_from(*s).ok())
                            .collect(),
                    }),
                    None => None,
                },
                outlier: match u.outlier {
                    Some(o) => Outlier {
                        consecutive_failures: o.consecutive_failures,
                        base_ejection: duration(&what, o.base_ejection_ms)?,
                        max_ejection: duration(&what, o.max_ejection_ms)?,
                    },
                    None => Outlier::default(),
                },
                tls,
                name,
                balance,
                endpoints,
                connect_timeout: duration(&what, u.connect_timeout_ms)?,
            },
        );
    }
    let mut routes = Vec::new();
    for r in s.routes {
        let what = format!("route {:?}", r.name);
        let hosts = r
            .hosts
            .iter()
            .map(|h| HostPattern::parse(h))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|m| invalid(&what, m))?;
        let path = match r.path_match {
            Some(v1::route::PathMatch::Path(p)) => PathMatch::Exact(p),
            Some(v1::route::PathMatch::PathPrefix(p)) => PathMatch::Prefix(p),
            Some(v1::route::PathMatch::PathRegex(p)) => PathMatch::Regex(p),
            None => return Err(invalid(&what, "no path match")),
        };
        let known = |u: &str| -> Result<UpstreamName, WireError> {
            let name = UpstreamName::new(u);
            if upstreams.contains_key(&name) {
                Ok(name)
            } else {
                Err(invalid(&what, format!("unknown upstream {u:?}")))
            }
        };
        let action = if !r.upstream.is_empty() {
            Action::Upstream(known(&r.upstream)?)
        } else if !r.split.is_empty() {
            Action::Split(
                r.split
                    .iter()
                    .map(|t| Ok((known(&t.upstream)?, t.weight)))
                    .collect::<Result<_, WireError>>()?,
            )
        } else if let Some(rd) = r.redirect {
            Action::Redirect(Redirect {
                code: u16::try_from(rd.code)
                    .map_err(|_| invalid(&what, "redirect code out of range"))?,
                to: rd.to,
                scheme: rd.scheme,
                host: rd.host,
                path: rd.path,
            })
        } else if let Some(rs) = r.respond {
            Action::Respond(Respond {
                status: u16::try_from(rs.status)
                    .map_err(|_| invalid(&what, "status out of range"))?,
                body: rs.body,
                headers: rs.headers.into_iter().map(|h| (h.name, h.value)).collect(),
            })
        } else {
            return Err(invalid(&what, "no action"));
        };
        let mirror = match r.mirror {
            Some(m) => Some(Mirror {
                upstream: known(&m.upstream)?,
                percent: m.percent.clamp(1, 100),
            }),
            None => None,
        };
        let headers = r
            .headers
            .into_iter()
            .map(|m| value_match_from_wire(m, &what))
            .collect::<Result<_, _>>()?;
        let query = r
            .query
            .into_iter()
            .map(|m| value_match_from_wire(m, &what))
            .collect::<Result<_, _>>()?;
        let ops = |o: Option<v1::HeaderOps>| {
            let o = o.unwrap_or_default();
            let pairs = |v: Vec<v1::Header>| v.into_iter().map(|h| (h.name, h.value)).collect();
            HeaderOps {
                set: pairs(o.set),
                add: pairs(o.add),
                remove: o.remove,
            }
        };
        let retry = RetryPolicy {
            retries: r.retries.min(10),
            on: r
                .retry_on
                .iter()
                .map(|o| RetryOn::parse(o))
                .collect::<Result<_, _>>()
                .map_err(|m| invalid(&what, m))?,
            non_idempotent: r.retry_non_idempotent,
        };
        let policy = policy::access_from_wire(r.policy, &what)?;
        routes.push(Route {
            policy,
            retry,
            name: RouteName::new(r.name),
            hosts,
            path,
            methods: r.methods,
            headers,
            query,
            action,
            timeout: duration(&what, r.timeout_ms)?,
            request_headers: ops(r.request_headers),
            response_headers: ops(r.response_headers),
            rewrite_prefix: r.rewrite_prefix,
            host_rewrite: r.host_rewrite,
            idle_timeout: (r.idle_timeout_ms > 0)
                .then(|| Duration::from_millis(r.idle_timeout_ms.min(3_600_000))),
            mirror,
        });
    }
    let certificates = tls::certificates_from_wire(s.certificates)?;
    let policy = policy::policy_from_wire(s.policy)?;
    Ok(Config {
        upstreams,
        routes,
        certificates,
        policy,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_hash_is_stable() {
        let src = r#"
[upstreams.b]
endpoints = ["127.0.0.1:2", "backend.internal:80"]
[upstreams.a]
endpoints = ["127.0.0.1:1"]
connect_timeout = "250ms"
[[routes]]
name = "r"
hosts = ["*.example.com", "x.org"]
path = "/exact"
methods = ["get"]
upstream = "a"
response_headers = { add = { "x-a" = "1" }, set = { "x-b" = "2" } }
"#;
        let a = crate::config::compile("f", src).expect("valid");
        let b = crate::config::compile("f", src).expect("valid");
        assert_eq!(a.hash, b.hash);
        let back = decode(&a.snapshot).expect("decodes");
        assert_eq!(back, a.config);
    }
}
