//! A received snapshot compiled into an immutable runtime table, and the atomic swap.
//!
//! Every snapshot, the cached one at boot and each one from the plane, goes through the same
//! path: decode -> resolve -> [`compile`] -> [`Current::swap`].

mod applier;
mod cache;
mod resolve;

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use dispa_proto::config::Config;
use dispa_proto::config::model::{Action, EndpointAddr, HeaderOps, PathMatch, Route};
use dispa_proto::{RouteName, Version};
use http::{HeaderName, HeaderValue};

use crate::routing::RouteTable;
use crate::upstream::{self, ResolvedEndpoint, UpstreamRuntime, Upstreams};

pub use applier::Applier;
pub use cache::{CacheError, SnapshotCache};
pub use resolve::{ResolveError, refresh_names, resolve_endpoints};

/// Why a snapshot cannot be served (sent to the plane as the NACK reason).
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error(
        "plane speaks dispa protocol {theirs:?} (build {build}), this agent speaks {ours} (build {our_build}); protocol major versions must match"
    )]
    Protocol {
        theirs: String,
        build: String,
        ours: &'static str,
        our_build: &'static str,
    },
    #[error("content hash mismatch: envelope says {expected}, content hashes to {actual}")]
    Hash { expected: String, actual: String },
    #[error(transparent)]
    Wire(#[from] dispa_proto::config::wire::WireError),
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error("{0}")]
    Matcher(String),
    #[error("policy: {0}")]
    Policy(String),
    #[error("route {route}: {detail}")]
    Route { route: String, detail: String },
    #[error("{what}: TLS: {detail}")]
    Tls { what: String, detail: String },
}

/// Header changes with names and values parsed once.
#[derive(Debug, Default)]
pub struct CompiledHeaderOps {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl CompiledHeaderOps {
    fn compile(ops: &HeaderOps, route: &RouteName) -> Result<Self, CompileError> {
        let bad = |detail: String| CompileError::Route {
            route: route.to_string(),
            detail,
        };
        let pair = |(n, v): &(String, String)| -> Result<(HeaderName, HeaderValue), CompileError> {
            Ok((
                HeaderName::from_bytes(n.as_bytes())
                    .map_err(|_| bad(format!("invalid header name {n:?}")))?,
                HeaderValue::from_str(v)
                    .map_err(|_| bad(format!("invalid value for header {n:?}")))?,
            ))
        };
        Ok(Self {
            set: ops.set.iter().map(pair).collect::<Result<_, _>>()?,
            add: ops.add.iter().map(pair).collect::<Result<_, _>>()?,
            remove: ops
                .remove
                .iter()
                .map(|n| {
                    HeaderName::from_bytes(n.as_bytes())
                        .map_err(|_| bad(format!("invalid header name {n:?}")))
                })
                .collect::<Result<_, _>>()?,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }

    pub fn apply(&self, headers: &mut http::HeaderMap) {
        for n in &self.remove {
            headers.remove(n);
        }
        for (n, v) in &self.set {
            headers.insert(n.clone(), v.clone());
        }
        for (n, v) in &self.add {
            headers.append(n.clone(), v.clone());
        }
    }
}

/// What a route does, with upstreams resolved.
#[derive(Debug)]
pub enum RouteAction {
    Upstream(Arc<UpstreamRuntime>),
    /// Weighted choice per request; `total` is the sum of the weights.
    Split {
        targets: Vec<(Arc<UpstreamRuntime>, u32)>,
        total: u64,
    },
    Redirect(dispa_proto::config::model::Redirect),
    Respond {
        status: http::StatusCode,
        body: bytes::Bytes,
        headers: Vec<(HeaderName, HeaderValue)>,
    },
}

impl RouteAction {
    /// The upstream for one request, if the route proxies.
    pub fn upstream(&self) -> Option<&Arc<UpstreamRuntime>> {
        match self {
            RouteAction::Upstream(u) => Some(u),
            RouteAction::Split { targets, total } => {
                let mut x = fastrand::u64(..(*total).max(1));
                for (u, w) in targets {
                    if x < u64::from(*w) {
                        return Some(u);
                    }
                    x -= u64::from(*w);
                }
                targets.last().map(|(u, _)| u)
            }
            RouteAction::Redirect(_) | RouteAction::Respond { .. } => None,
        }
    }
}

/// A route ready to serve.
#[derive(Debug)]
pub struct CompiledRoute {
    pub name: RouteName,
    pub action: RouteAction,
    pub retry: dispa_proto::config::model::RetryPolicy,
    /// The Host sent upstream instead of the client's.
    pub host_rewrite: Option<HeaderValue>,
    pub idle_timeout: Option<std::time::Duration>,
    /// Where a copy of bodyless requests goes, and for what percent of them.
    pub mirror: Option<(Arc<UpstreamRuntime>, u32)>,
    pub timeout: std::time::Duration,
    pub request_headers: CompiledHeaderOps,
    pub response_headers: CompiledHeaderOps,
    /// (matched prefix, replacement)
    pub rewrite: Option<(PathMatch, String)>,
    /// Allow/deny, rate limit, auth and body limits: the route's own, else the global ones.
    pub policy: crate::policy::RoutePolicy,
    /// The route's request series, without an upstream and with its own, found once per
    /// snapshot instead of by name on every request.
    meters: [std::sync::OnceLock<Arc<crate::telemetry::RequestMeters>>; 2],
}

impl CompiledRoute {
    /// The route's request series, with `upstream` or without. The first upstream asked for
    /// is kept; a split route's others are looked up by name.
    pub fn meters(
        &self,
        metrics: &crate::telemetry::Metrics,
        upstream: Option<&UpstreamRuntime>,
    ) -> Arc<crate::telemetry::RequestMeters> {
        let (slot, name) = match upstream {
            Some(u) => (&self.meters[1], u.name.as_str()),
            None => (&self.meters[0], ""),
        };
        let kept = slot.get_or_init(|| metrics.meters(self.name.as_str(), name));
        if kept.upstream() == name {
            kept.clone()
        } else {
            metrics.meters(self.name.as_str(), name)
        }
    }

    /// The path to send upstream.
    pub fn rewrite_path<'a>(&self, path: &'a str) -> std::borrow::Cow<'a, str> {
        match &self.rewrite {
            None => path.into(),
            Some((PathMatch::Exact(_), to)) => to.clone().into(),
            // Validation refuses rewrite_prefix with a regex; keep the path if one arrives.
            Some((PathMatch::Regex(_), _)) => path.into(),
            Some((PathMatch::Prefix(p), to)) => {
                let rest = path.get(p.len()..).unwrap_or("");
                // "/v1/" -> "/" maps "/v1/users" to "/users", not "//users".
                match rest.strip_prefix('/') {
                    Some(r) if to.ends_with('/') => format!("{to}{r}").into(),
                    _ => format!("{to}{rest}").into(),
                }
            }
        }
    }
}

/// One whole snapshot, immutable once built. Requests hold an `Arc` to it start to end.
#[derive(Debug)]
pub struct RuntimeSnapshot {
    pub version: Version,
    pub hash: String,
    pub routes: RouteTable<CompiledRoute>,
    pub upstreams: Upstreams,
    /// What it was built from, so a DNS refresh can rebuild it through the same `compile`.
    pub config: Arc<Config>,
    pub resolved: Resolved,
    /// The TLS listener's certificates by SNI.
    pub tls: Arc<crate::tls::CertTable>,
    /// Peers whose X-Forwarded-For is believed.
    pub trusted_proxies: Vec<dispa_proto::config::model::Cidr>,
    /// The global policy, for requests no route matches.
    pub unrouted: crate::policy::RoutePolicy,
    /// Rate-limit buckets, carried to the next snapshot while their rules are unchanged.
    pub rate_gates: crate::policy::RateGates,
}

/// Endpoint names and the addresses they resolved to.
pub type Resolved = HashMap<EndpointAddr, Vec<std::net::SocketAddr>>;

/// Compiles a validated config with resolved endpoints. Pure: no I/O, no clock.
/// State of upstreams whose identity is unchanged is carried over from `previous`.
pub fn compile(
    version: Version,
    hash: String,
    config: &Config,
    resolved: &HashMap<EndpointAddr, Vec<std::net::SocketAddr>>,
    previous: Option<&RuntimeSnapshot>,
) -> Result<RuntimeSnapshot, CompileError> {
    let mut upstreams: Upstreams = HashMap::new();
    for spec in config.upstreams.values() {
        let endpoints: Vec<ResolvedEndpoint> = spec
            .endpoints
            .iter()
            .flat_map(|e| {
                resolved
                    .get(&e.address)
                    .into_iter()
                    .flatten()
                    .map(move |addr| ResolvedEndpoint {
                        addr: *addr,
                        weight: e.weight,
                        server_name: e
                            .address
                            .host
                            .parse::<std::net::IpAddr>()
                            .is_err()
                            .then(|| e.address.host.clone()),
                    })
            })
            .collect();
        let prev = previous
            .and_then(|p| p.upstreams.get(&spec.name))
            .map(Arc::as_ref);
        let built = upstream::build(spec, endpoints, prev).map_err(|detail| CompileError::Tls {
            what: format!("upstream {}", spec.name),
            detail,
        })?;
        if spec.tls.as_ref().is_some_and(|t| t.insecure_skip_verify)
            && previous.is_none_or(|p| p.version != version)
        {
            tracing::warn!(
                upstream = %spec.name,
                %version,
                "INSECURE: upstream TLS certificates are NOT verified (insecure_skip_verify = true); anyone on the path can impersonate its endpoints"
            );
        }
        upstreams.insert(spec.name.clone(), Arc::new(built));
    }
    // Certificates are compiled once per snapshot; a DNS refresh (same config) reuses them.
    let tls =
        match previous {
            Some(p) if p.config.certificates == config.certificates => p.tls.clone(),
            _ => Arc::new(crate::tls::CertTable::build(&config.certificates).map_err(
                |detail| CompileError::Tls {
                    what: "certificates".into(),
                    detail,
                },
            )?),
        };
    let (policies, rate_gates, unrouted) =
        crate::policy::compile(config, previous.map(|p| &p.rate_gates))
            .map_err(CompileError::Policy)?;
    let mut compiled = Vec::with_capacity(config.routes.len());
    for (r, policy) in config.routes.iter().zip(policies) {
        compiled.push((r, compile_route(r, &upstreams, policy)?));
    }
    Ok(RuntimeSnapshot {
        version,
        hash,
        routes: RouteTable::build(compiled).map_err(CompileError::Matcher)?,
        upstreams,
        config: Arc::new(config.clone()),
        resolved: resolved.clone(),
        tls,
        trusted_proxies: config.policy.trusted_proxies.clone(),
        unrouted,
        rate_gates,
    })
}

fn compile_route(
    r: &Route,
    upstreams: &Upstreams,
    policy: crate::policy::RoutePolicy,
) -> Result<CompiledRoute, CompileError> {
    let bad = |detail: String| CompileError::Route {
        route: r.name.to_string(),
        detail,
    };
    let get = |name: &dispa_proto::UpstreamName| {
        upstreams
            .get(name)
            .cloned()
            .ok_or_else(|| bad(format!("unknown upstream {name}")))
    };
    let action = match &r.action {
        Action::Upstream(u) => RouteAction::Upstream(get(u)?),
        Action::Split(targets) => {
            let targets = targets
                .iter()
                .map(|(u, w)| Ok((get(u)?, *w)))
                .collect::<Result<Vec<_>, CompileError>>()?;
            let total = targets.iter().map(|(_, w)| u64::from(*w)).sum();
            if total == 0 {
                return Err(bad("split weights add up to 0".into()));
            }
            RouteAction::Split { targets, total }
        }
        Action::Redirect(rd) => RouteAction::Redirect(rd.clone()),
        Action::Respond(rs) => RouteAction::Respond {
            status: http::StatusCode::from_u16(rs.status)
                .map_err(|_| bad(format!("invalid status {}", rs.status)))?,
            body: bytes::Bytes::from(rs.body.clone()),
            headers: rs
                .headers
                .iter()
                .map(|(n, v)| {
                    Ok((
                        HeaderName::from_bytes(n.as_bytes())
                            .map_err(|_| bad(format!("invalid header {n:?}")))?,
                        HeaderValue::from_str(v)
                            .map_err(|_| bad(format!("invalid value for {n:?}")))?,
                    ))
                })
                .collect::<Result<_, CompileError>>()?,
        },
    };
    Ok(CompiledRoute {
        name: r.name.clone(),
        action,
        retry: r.retry.clone(),
        idle_timeout: r.idle_timeout,
        mirror: match &r.mirror {
            Some(m) => Some((get(&m.upstream)?, m.percent)),
            None => None,
        },
        host_rewrite: match &r.host_rewrite {
            Some(h) => Some(HeaderValue::from_str(h).map_err(|_| CompileError::Route {
                route: r.name.to_string(),
                detail: format!("invalid host_rewrite {h:?}"),
            })?),
            None => None,
        },
        timeout: r.timeout,
        request_headers: CompiledHeaderOps::compile(&r.request_headers, &r.name)?,
        response_headers: CompiledHeaderOps::compile(&r.response_headers, &r.name)?,
        rewrite: r.rewrite_prefix.clone().map(|to| (r.path.clone(), to)),
        policy,
        meters: Default::default(),
    })
}

/// The snapshot being served; swapped atomically.
#[derive(Default)]
pub struct Current {
    inner: ArcSwapOption<RuntimeSnapshot>,
}

impl Current {
    pub fn load(&self) -> Option<Arc<RuntimeSnapshot>> {
        self.inner.load_full()
    }

    pub fn swap(&self, s: Arc<RuntimeSnapshot>) {
        self.inner.store(Some(s));
    }

    /// Swaps in `next` only if `expected` is still current (a newer snapshot wins).
    pub fn replace_if(&self, expected: &Arc<RuntimeSnapshot>, next: Arc<RuntimeSnapshot>) -> bool {
        let prev = self
            .inner
            .compare_and_swap(&Some(expected.clone()), Some(next));
        prev.as_ref().is_some_and(|p| Arc::ptr_eq(p, expected))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(src: &str, prev: Option<&RuntimeSnapshot>) -> RuntimeSnapshot {
        let c = dispa_proto::config::parse("t", src).unwrap();
        let mut resolved = HashMap::new();
        for u in c.upstreams.values() {
            for e in &u.endpoints {
                resolved.insert(
                    e.address.clone(),
                    vec![format!("{}", e.address).parse().unwrap()],
                );
            }
        }
        compile(Version(1), "h".into(), &c, &resolved, prev).unwrap()
    }

    fn pick(u: &UpstreamRuntime) -> Option<std::net::SocketAddr> {
        let headers = http::HeaderMap::new();
        let ctx = crate::upstream::PickCtx {
            client_ip: "127.0.0.1".parse().unwrap(),
            headers: &headers,
            added: None,
        };
        u.pick(&ctx, &[]).map(|p| p.addr)
    }

    #[test]
    fn a_route_s_series_are_kept_per_upstream_and_split_routes_get_each_their_own() {
        let s = snapshot(
            "[upstreams.a]\nendpoints=[\"127.0.0.1:1\"]\n[upstreams.b]\nendpoints=[\"127.0.0.1:2\"]\n[[routes]]\nname=\"r\"\nsplit={ a = 1, b = 1 }\n",
            None,
        );
        let metrics = crate::telemetry::Metrics::new();
        let route = s.routes.routes().next().unwrap();
        let (a, b) = (
            &s.upstreams[&dispa_proto::UpstreamName::new("a")],
            &s.upstreams[&dispa_proto::UpstreamName::new("b")],
        );
        assert_eq!(route.meters(&metrics, Some(a)).upstream(), "a");
        assert_eq!(route.meters(&metrics, Some(b)).upstream(), "b");
        assert_eq!(route.meters(&metrics, Some(a)).upstream(), "a");
        assert_eq!(route.meters(&metrics, None).upstream(), "");
        // The same series the registry hands out by name.
        assert!(Arc::ptr_eq(
            &route.meters(&metrics, Some(b)),
            &metrics.meters("r", "b")
        ));
    }

    #[test]
    fn untouched_upstreams_keep_their_pool_and_cursor() {
        let a = "[upstreams.a]\nendpoints=[\"127.0.0.1:1\",\"127.0.0.1:2\"]\n[upstreams.b]\nendpoints=[\"127.0.0.1:3\"]\n";
        let s1 = snapshot(a, None);
        pick(&s1.upstreams[&dispa_proto::UpstreamName::new("a")]);
        let b = a.replace("127.0.0.1:3", "127.0.0.1:4");
        let s2 = snapshot(&b, Some(&s1));
        let name = |n: &str| dispa_proto::UpstreamName::new(n);
        assert!(Arc::ptr_eq(
            &s1.upstreams[&name("a")].pool,
            &s2.upstreams[&name("a")].pool
        ));
        // The cursor continues: the next pick is the second endpoint.
        assert_eq!(
            pick(&s2.upstreams[&name("a")]),
            Some("127.0.0.1:2".parse().unwrap())
        );
        // b's endpoints changed; its pool is kept since its identity (name, timeouts) is unchanged.
        assert!(Arc::ptr_eq(
            &s1.upstreams[&name("b")].pool,
            &s2.upstreams[&name("b")].pool
        ));
        let c = a.replace(
            "[upstreams.b]\n",
            "[upstreams.b]\nconnect_timeout = \"9s\"\n",
        );
        let s3 = snapshot(&c, Some(&s2));
        assert!(!Arc::ptr_eq(
            &s2.upstreams[&name("b")].pool,
            &s3.upstreams[&name("b")].pool
        ));
    }

    #[test]
    fn in_flight_counts_survive_a_swap_for_unchanged_endpoints() {
        let a = "[upstreams.a]\nbalance = \"least_conn\"\nendpoints=[\"127.0.0.1:1\",\"127.0.0.1:2\"]\n";
        let s1 = snapshot(a, None);
        let name = dispa_proto::UpstreamName::new("a");
        let headers = http::HeaderMap::new();
        let ctx = crate::upstream::PickCtx {
            client_ip: "127.0.0.1".parse().unwrap(),
            headers: &headers,
            added: None,
        };
        let picked = s1.upstreams[&name].pick(&ctx, &[]).unwrap();
        let first = picked.addr;
        // A push that adds an endpoint keeps the busy one's count: the next picks avoid it.
        let s2 = snapshot(
            &a.replace("\"127.0.0.1:2\"]", "\"127.0.0.1:2\",\"127.0.0.1:3\"]"),
            Some(&s1),
        );
        for _ in 0..6 {
            assert_ne!(pick(&s2.upstreams[&name]), Some(first));
        }
    }

    #[test]
    fn rewrites_prefixes() {
        let src = "[upstreams.a]\nendpoints=[\"127.0.0.1:1\"]\n[[routes]]\nname=\"r\"\npath_prefix=\"/v1/\"\nrewrite_prefix=\"/\"\nupstream=\"a\"\n[[routes]]\nname=\"s\"\npath_prefix=\"/api\"\nrewrite_prefix=\"/x\"\nupstream=\"a\"\n";
        let s = snapshot(src, None);
        let h = http::HeaderMap::new();
        let view = |path| crate::routing::RequestView {
            path,
            method: "GET",
            headers: &h,
            query: None,
        };
        let r = s.routes.lookup("h", &view("/v1/users")).unwrap();
        assert_eq!(r.rewrite_path("/v1/users"), "/users");
        assert_eq!(r.rewrite_path("/v1/"), "/");
        let r = s.routes.lookup("h", &view("/api/a")).unwrap();
        assert_eq!(r.rewrite_path("/api/a"), "/x/a");
        assert_eq!(r.rewrite_path("/api"), "/x");
    }
}
