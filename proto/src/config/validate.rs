//! Raw TOML -> validated [`Config`], collecting every problem with its file:line:column.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use toml::Spanned;

use super::diagnostic::{Diagnostics, Positions};
use super::model::{
    Action, HealthCheck, Mirror, Outlier, Redirect, Respond, RetryOn, RetryPolicy, ValueMatch,
    is_dns_name,
};
use super::model::{
    Balance, Config, DEFAULT_CONNECT_TIMEOUT, DEFAULT_ROUTE_TIMEOUT, Endpoint, EndpointAddr,
    HashOn, HeaderOps, HostPattern, MAX_ENDPOINTS, MAX_TIMEOUT, MAX_WEIGHT, PathMatch, Route,
    Upstream,
};
use super::raw::{
    RawConfig, RawHeaderOps, RawHealth, RawOutlier, RawRoute, RawUpstream, RawValueMatch,
};
use crate::{RouteName, UpstreamName};

/// Largest config file accepted, so a mistaken upload cannot exhaust memory.
pub const MAX_CONFIG_BYTES: usize = 16 * 1024 * 1024;

pub(crate) fn parse_and_validate(
    name: &str,
    content: &str,
    files: &super::Attachments,
) -> Result<Config, Diagnostics> {
    let pos = Positions::new(name, content);
    let raw = parse_raw(&pos, content)?;
    let mut v = Validator {
        pos: &pos,
        files,
        problems: Vec::new(),
    };
    let config = v.config(raw);
    if v.problems.is_empty() {
        Ok(config)
    } else {
        v.problems.sort_by_key(|d| (d.line, d.column));
        Err(Diagnostics(v.problems))
    }
}

fn parse_raw(pos: &Positions<'_>, content: &str) -> Result<RawConfig, Diagnostics> {
    if content.len() > MAX_CONFIG_BYTES {
        return Err(Diagnostics(vec![pos.diagnostic(
            0,
            "",
            format!(
                "file is {} bytes; the limit is {MAX_CONFIG_BYTES}",
                content.len()
            ),
        )]));
    }
    toml::from_str(content).map_err(|e| {
        let offset = e.span().map_or(0, |s| s.start);
        Diagnostics(vec![pos.diagnostic(
            offset,
            "",
            e.message().trim().to_string(),
        )])
    })
}

/// Every file path the config names (certificates, keys, CA bundles), once each, in the
/// order: certificate entries by name, then upstreams by name.
pub(crate) fn referenced_files(name: &str, content: &str) -> Result<Vec<String>, Diagnostics> {
    let pos = Positions::new(name, content);
    let raw = parse_raw(&pos, content)?;
    let mut out: Vec<String> = Vec::new();
    let mut add = |p: Option<&Spanned<String>>| {
        if let Some(p) = p
            && !out.iter().any(|o| o == p.get_ref())
        {
            out.push(p.get_ref().clone());
        }
    };
    for c in raw.certificates.values() {
        let c = c.get_ref();
        add(Some(&c.cert_file));
        add(Some(&c.key_file));
        add(c.client_ca_file.as_ref());
    }
    for u in raw.upstreams.values() {
        if let Some(t) = &u.tls {
            let t = t.get_ref();
            add(t.ca_file.as_ref());
            add(t.cert_file.as_ref());
            add(t.key_file.as_ref());
        }
    }
    let policies = raw.policy.iter().chain(
        raw.routes
            .iter()
            .filter_map(|r| r.get_ref().policy.as_ref()),
    );
    for p in policies {
        add(p.get_ref().jwks_file());
    }
    Ok(out)
}

/// The routes.toml text with every inline secret (API keys, bearer tokens, HS256 secrets)
/// replaced by `"<redacted>"`. Text that does not parse is returned whole: it was never
/// accepted, so it holds no stored secret... but callers only pass stored versions.
pub(crate) fn redact_source(name: &str, content: &str) -> String {
    let pos = Positions::new(name, content);
    let Ok(raw) = parse_raw(&pos, content) else {
        return content.to_string();
    };
    let mut spans = Vec::new();
    if let Some(p) = &raw.policy {
        p.get_ref().secret_spans(&mut spans);
    }
    for r in &raw.routes {
        if let Some(p) = &r.get_ref().policy {
            p.get_ref().secret_spans(&mut spans);
        }
    }
    spans.sort_by_key(|s| s.start);
    let mut out = String::with_capacity(content.len());
    let mut at = 0;
    for s in spans {
        if s.start < at || s.end > content.len() {
            continue;
        }
        out.push_str(content.get(at..s.start).unwrap_or_default());
        out.push_str("\"<redacted>\"");
        at = s.end;
    }
    out.push_str(content.get(at..).unwrap_or_default());
    out
}

mod policy;
mod tls;

pub use policy::parse_size;

struct Validator<'a> {
    pos: &'a Positions<'a>,
    files: &'a super::Attachments,
    problems: Vec<super::Diagnostic>,
}

impl Validator<'_> {
    fn err<T>(&mut self, at: &Spanned<T>, key: &str, message: impl Into<String>) {
        let d = self.pos.diagnostic(at.span().start, key, message.into());
        self.problems.push(d);
    }

    fn config(&mut self, raw: RawConfig) -> Config {
        let mut upstreams = BTreeMap::new();
        for (name, up) in raw.upstreams {
            let key = format!("upstreams.{}", name.get_ref());
            self.check_name(&name, &key, "upstream");
            let u = self.upstream(UpstreamName::new(name.get_ref().clone()), up, &key);
            upstreams.insert(u.name.clone(), u);
        }
        let mut routes = Vec::new();
        let mut seen = HashSet::new();
        for (i, r) in raw.routes.into_iter().enumerate() {
            let key = format!("routes[{i}]");
            let span_start = r.span().start;
            if let Some(route) = self.route(r.into_inner(), span_start, &key, &upstreams) {
                if !seen.insert(route.name.clone()) {
                    self.problems.push(self.pos.diagnostic(
                        span_start,
                        &format!("{key}.name"),
                        format!("duplicate route name {:?}", route.name.as_str()),
                    ));
                }
                routes.push(route);
            }
        }
        let certificates = self.certificates(raw.certificates);
        let policy = self.global_policy(raw.policy.as_ref());
        Config {
            upstreams,
            routes,
            certificates,
            policy,
        }
    }

    fn check_name(&mut self, name: &Spanned<String>, key: &str, what: &str) {
        let n = name.get_ref();
        let ok = !n.is_empty()
            && n.len() <= 128
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
        if !ok {
            self.err(
                name,
                key,
                format!("invalid {what} name {n:?}: use 1-128 letters, digits, '-', '_' or '.'"),
            );
        }
    }

    fn duration(&mut self, d: &Spanned<String>, key: &str) -> Option<Duration> {
        match super::parse_duration(d.get_ref()) {
            Ok(v) if v.is_zero() => {
                self.err(d, key, "duration must be greater than zero");
                None
            }
            Ok(v) if v > MAX_TIMEOUT => {
                self.err(
                    d,
                    key,
                    format!("duration {:?} is longer than 1h", d.get_ref()),
                );
                None
            }
            Ok(v) => Some(v),
            Err(m) => {
                self.err(d, key, m);
                None
            }
        }
    }

    fn upstream(&mut self, name: UpstreamName, raw: RawUpstream, key: &str) -> Upstream {
        let balance = match &raw.balance {
            None => Balance::RoundRobin,
            Some(b) => match b.get_ref().as_str() {
                "round_robin" => Balance::RoundRobin,
                "weighted" => Balance::Weighted,
                "least_conn" => Balance::LeastConn,
                "random" => Balance::Random,
                "p2c" => Balance::P2c,
                "hash" => match &raw.hash_on {
                    Some(h) => match HashOn::parse(h.get_ref()) {
                        Ok(on) => Balance::Hash(on),
                        Err(m) => {
                            self.err(h, &format!("{key}.hash_on"), m);
                            Balance::RoundRobin
                        }
                    },
                    None => {
                        self.err(b, &format!("{key}.balance"), "balance = \"hash\" needs hash_on = \"header:NAME\", \"cookie:NAME\" or \"client_ip\"");
                        Balance::RoundRobin
                    }
                },
                other => {
                    self.err(
                        b,
                        &format!("{key}.balance"),
                        format!("unknown balance {other:?} (round_robin, weighted, least_conn, random, p2c, hash)"),
                    );
                    Balance::RoundRobin
                }
            },
        };
        if let Some(h) = &raw.hash_on
            && raw.balance.as_ref().is_none_or(|b| b.get_ref() != "hash")
        {
            self.err(
                h,
                &format!("{key}.hash_on"),
                "hash_on needs balance = \"hash\"",
            );
        }
        let connect_timeout = match &raw.connect_timeout {
            Some(d) => self
                .duration(d, &format!("{key}.connect_timeout"))
                .unwrap_or(DEFAULT_CONNECT_TIMEOUT),
            None => DEFAULT_CONNECT_TIMEOUT,
        };
        let ekey = format!("{key}.endpoints");
        if raw.endpoints.get_ref().is_empty() {
            self.err(
                &raw.endpoints,
                &ekey,
                "an upstream needs at least one endpoint",
            );
        }
        if raw.endpoints.get_ref().len() > MAX_ENDPOINTS {
            self.err(
                &raw.endpoints,
                &ekey,
                format!("more than {MAX_ENDPOINTS} endpoints"),
            );
        }
        let mut endpoints = Vec::new();
        let mut seen = HashSet::new();
        for (i, e) in raw.endpoints.get_ref().iter().enumerate() {
            let k = format!("{ekey}[{i}]");
            let raw_e = e.get_ref();
            let weight = match raw_e.weight {
                None => 1,
                Some(w) if (1..=i64::from(MAX_WEIGHT)).contains(&w) => w as u32,
                Some(w) => {
                    self.err(
                        e,
                        &format!("{k}.weight"),
                        format!("weight {w} is out of range 1-{MAX_WEIGHT}"),
                    );
                    1
                }
            };
            match EndpointAddr::parse(&raw_e.addr) {
                Ok(address) => {
                    if !seen.insert(address.clone()) {
                        self.err(e, &k, format!("duplicate endpoint {address}"));
                    }
                    endpoints.push(Endpoint { address, weight });
                }
                Err(m) => self.err(e, &k, m),
            }
        }
        let h2 = match &raw.protocol {
            None => false,
            Some(p) => match p.get_ref().as_str() {
                "http1" => false,
                "h2" => true,
                other => {
                    self.err(
                        p,
                        &format!("{key}.protocol"),
                        format!("unknown protocol {other:?} (\"http1\" or \"h2\")"),
                    );
                    false
                }
            },
        };
        let mut limit = |v: &Option<Spanned<i64>>, name: &str, min: i64| match v {
            None => 0,
            Some(n) => match u32::try_from(*n.get_ref()) {
                Ok(v) if i64::from(v) >= min => v,
                _ => {
                    self.err(
                        n,
                        &format!("{key}.{name}"),
                        format!("{name} {} must be at least {min}", n.get_ref()),
                    );
                    0
                }
            },
        };
        let max_requests = limit(&raw.max_requests, "max_requests", 1);
        let max_connections = limit(&raw.max_connections, "max_connections", 1);
        let max_pending = limit(&raw.max_pending, "max_pending", 0);
        if let (Some(p), None) = (&raw.max_pending, &raw.max_connections) {
            self.err(
                p,
                &format!("{key}.max_pending"),
                "max_pending needs max_connections",
            );
        }
        let idle_timeout = raw
            .idle_timeout
            .as_ref()
            .and_then(|d| self.duration(d, &format!("{key}.idle_timeout")))
            .unwrap_or(Duration::from_secs(60));
        let health = raw
            .health
            .as_ref()
            .map(|h| self.health(h, &format!("{key}.health")));
        let outlier = raw.outlier.as_ref().map_or_else(Outlier::default, |o| {
            self.outlier(o, &format!("{key}.outlier"))
        });
        let tls = raw
            .tls
            .as_ref()
            .and_then(|t| self.upstream_tls(t, &format!("{key}.tls")));
        Upstream {
            name,
            balance,
            endpoints,
            connect_timeout,
            h2,
            max_requests,
            max_connections,
            max_pending,
            idle_timeout,
            health,
            outlier,
            tls,
        }
    }

    fn count(
        &mut self,
        at: &Spanned<impl Sized>,
        v: Option<i64>,
        key: &str,
        default: u32,
        range: std::ops::RangeInclusive<u32>,
    ) -> u32 {
        match v {
            None => default,
            Some(n) => match u32::try_from(n) {
                Ok(n) if range.contains(&n) => n,
                _ => {
                    self.err(
                        at,
                        key,
                        format!("{n} is out of range {}-{}", range.start(), range.end()),
                    );
                    default
                }
            },
        }
    }

    fn health(&mut self, h: &Spanned<RawHealth>, key: &str) -> HealthCheck {
        let raw = h.get_ref();
        let path = raw.path.clone().unwrap_or_else(|| "/".into());
        if !path.starts_with('/') || path.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            self.err(
                h,
                &format!("{key}.path"),
                format!("health path {path:?} must start with '/' and have no spaces"),
            );
        }
        let interval = raw
            .interval
            .as_ref()
            .and_then(|d| self.duration(d, &format!("{key}.interval")))
            .unwrap_or(Duration::from_secs(5));
        let timeout = raw
            .timeout
            .as_ref()
            .and_then(|d| self.duration(d, &format!("{key}.timeout")))
            .unwrap_or(Duration::from_secs(1));
        if interval < Duration::from_millis(100) {
            self.err(
                h,
                &format!("{key}.interval"),
                "interval must be at least 100ms",
            );
        }
        let mut expect_status = Vec::new();
        for s in raw.expect_status.iter().flatten() {
            match u16::try_from(*s) {
                Ok(v) if (100..=599).contains(&v) => expect_status.push(v),
                _ => self.err(
                    h,
                    &format!("{key}.expect_status"),
                    format!("status {s} is out of range 100-599"),
                ),
            }
        }
        HealthCheck {
            expect_status,
            path,
            interval,
            timeout,
            healthy: self.count(h, raw.healthy, &format!("{key}.healthy"), 2, 1..=100),
            unhealthy: self.count(h, raw.unhealthy, &format!("{key}.unhealthy"), 2, 1..=100),
        }
    }

    fn outlier(&mut self, o: &Spanned<RawOutlier>, key: &str) -> Outlier {
        let raw = o.get_ref();
        let d = Outlier::default();
        let base_ejection = raw
            .base_ejection
            .as_ref()
            .and_then(|v| self.duration(v, &format!("{key}.base_ejection")))
            .unwrap_or(d.base_ejection);
        let max_ejection = raw
            .max_ejection
            .as_ref()
            .and_then(|v| self.duration(v, &format!("{key}.max_ejection")))
            .unwrap_or(d.max_ejection);
        if max_ejection < base_ejection {
            self.err(
                o,
                &format!("{key}.max_ejection"),
                "max_ejection must be at least base_ejection",
            );
        }
        Outlier {
            consecutive_failures: self.count(
                o,
                raw.consecutive_failures,
                &format!("{key}.consecutive_failures"),
                5,
                0..=1000,
            ),
            base_ejection,
            max_ejection,
        }
    }

    fn route(
        &mut self,
        r: RawRoute,
        at: usize,
        key: &str,
        upstreams: &BTreeMap<UpstreamName, Upstream>,
    ) -> Option<Route> {
        let name = match &r.name {
            Some(n) => {
                self.check_name(n, &format!("{key}.name"), "route");
                RouteName::new(n.get_ref().clone())
            }
            None => {
                self.problems.push(self.pos.diagnostic(
                    at,
                    &format!("{key}.name"),
                    "missing required key `name`".into(),
                ));
                RouteName::new(format!("route-{key}"))
            }
        };
        let hosts = match &r.hosts {
            None => vec![HostPattern::Any],
            Some(hs) => {
                if hs.get_ref().is_empty() {
                    self.err(
                        hs,
                        &format!("{key}.hosts"),
                        "hosts must not be empty (use [\"*\"] for any host)",
                    );
                }
                let mut out = Vec::new();
                for (i, h) in hs.get_ref().iter().enumerate() {
                    match HostPattern::parse(h.get_ref()) {
                        Ok(p) if !out.contains(&p) => out.push(p),
                        Ok(p) => self.err(
                            h,
                            &format!("{key}.hosts[{i}]"),
                            format!("duplicate host {p}"),
                        ),
                        Err(m) => self.err(h, &format!("{key}.hosts[{i}]"), m),
                    }
                }
                out
            }
        };
        let set: Vec<&Spanned<String>> = [&r.path, &r.path_prefix, &r.path_regex]
            .into_iter()
            .flatten()
            .collect();
        let path = match (&r.path, &r.path_prefix, &r.path_regex) {
            _ if set.len() > 1 => {
                self.err(
                    set[1],
                    &format!("{key}.path"),
                    "set only one of `path`, `path_prefix` and `path_regex`",
                );
                None
            }
            (Some(p), _, _) => self.path(p, &format!("{key}.path")).map(PathMatch::Exact),
            (_, Some(p), _) => self
                .path(p, &format!("{key}.path_prefix"))
                .map(PathMatch::Prefix),
            (_, _, Some(p)) => self
                .regex(p, &format!("{key}.path_regex"))
                .map(PathMatch::Regex),
            (None, None, None) => Some(PathMatch::Prefix("/".into())),
        };
        let headers = self.value_matches(&r.headers, &format!("{key}.headers"), true);
        let query = self.value_matches(&r.query, &format!("{key}.query"), false);
        let mut methods = Vec::new();
        for (i, m) in r.methods.iter().flatten().enumerate() {
            let up = m.get_ref().to_ascii_uppercase();
            if up.is_empty()
                || !up
                    .bytes()
                    .all(|b| b.is_ascii_alphabetic() || b == b'-' || b == b'_')
            {
                self.err(
                    m,
                    &format!("{key}.methods[{i}]"),
                    format!("invalid method {:?}", m.get_ref()),
                );
            } else if !methods.contains(&up) {
                methods.push(up);
            }
        }
        let action = self.action(&r, at, key, upstreams);
        let timeout = match &r.timeout {
            Some(d) => self
                .duration(d, &format!("{key}.timeout"))
                .unwrap_or(DEFAULT_ROUTE_TIMEOUT),
            None => DEFAULT_ROUTE_TIMEOUT,
        };
        let request_headers = self.header_ops(
            r.request_headers.as_ref(),
            &format!("{key}.request_headers"),
        );
        let response_headers = self.header_ops(
            r.response_headers.as_ref(),
            &format!("{key}.response_headers"),
        );
        let host_rewrite = r.host_rewrite.as_ref().and_then(|h| {
            let host = h
                .get_ref()
                .rsplit_once(':')
                .filter(|(_, p)| p.parse::<u16>().is_ok())
                .map_or(h.get_ref().as_str(), |(h, _)| h);
            if is_dns_name(host) || host.parse::<std::net::IpAddr>().is_ok() {
                Some(h.get_ref().clone())
            } else {
                self.err(
                    h,
                    &format!("{key}.host_rewrite"),
                    format!("invalid host {:?}", h.get_ref()),
                );
                None
            }
        });
        let rewrite_prefix = match &r.rewrite_prefix {
            Some(p) => {
                let k = format!("{key}.rewrite_prefix");
                if r.path_prefix.is_none() && r.path.is_none() {
                    // A regex match has no fixed part to replace.
                    self.err(
                        p,
                        &k,
                        "rewrite_prefix needs `path_prefix` or `path` to say what it replaces",
                    );
                }
                self.path(p, &k)
            }
            None => None,
        };
        let retry = self.retry(&r, at, key);
        let mirror = r.mirror.as_ref().map(|m| {
            let raw = m.get_ref();
            let k = format!("{key}.mirror");
            let upstream = self.upstream_ref(&raw.upstream, &format!("{k}.upstream"), upstreams);
            let percent = match raw.percent {
                None => 100,
                Some(p) if (1..=100).contains(&p) => p as u32,
                Some(p) => {
                    self.err(
                        m,
                        &format!("{k}.percent"),
                        format!("percent {p} is out of range 1-100"),
                    );
                    100
                }
            };
            Mirror { upstream, percent }
        });
        let idle_timeout = r
            .idle_timeout
            .as_ref()
            .and_then(|d| self.duration(d, &format!("{key}.idle_timeout")));
        let policy = self.route_policy(r.policy.as_ref(), key);
        Some(Route {
            policy,
            idle_timeout,
            mirror,
            host_rewrite,
            retry,
            name,
            hosts,
            path: path?,
            methods,
            headers,
            query,
            action: action?,
            timeout,
            request_headers,
            response_headers,
            rewrite_prefix,
        })
    }

    fn upstream_ref(
        &mut self,
        u: &Spanned<String>,
        key: &str,
        upstreams: &BTreeMap<UpstreamName, Upstream>,
    ) -> UpstreamName {
        let name = UpstreamName::new(u.get_ref().clone());
        if !upstreams.contains_key(&name) {
            let known: Vec<_> = upstreams.keys().map(|k| k.as_str()).collect();
            let known = if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            };
            self.err(
                u,
                key,
                format!("unknown upstream {:?} (defined: {known})", u.get_ref()),
            );
        }
        name
    }

    /// Exactly one of `upstream`, `split`, `redirect`, `respond`.
    fn action(
        &mut self,
        r: &RawRoute,
        at: usize,
        key: &str,
        upstreams: &BTreeMap<UpstreamName, Upstream>,
    ) -> Option<Action> {
        let given = [
            r.upstream.is_some(),
            r.split.is_some(),
            r.redirect.is_some(),
            r.respond.is_some(),
        ];
        match given.iter().filter(|g| **g).count() {
            0 => {
                let d = self.pos.diagnostic(
                    at,
                    &format!("{key}.upstream"),
                    "a route needs one of `upstream`, `split`, `redirect` or `respond`".into(),
                );
                self.problems.push(d);
                return None;
            }
            1 => {}
            _ => {
                let d = self.pos.diagnostic(
                    at,
                    key,
                    "set only one of `upstream`, `split`, `redirect` and `respond`".into(),
                );
                self.problems.push(d);
                return None;
            }
        }
        if let Some(u) = &r.upstream {
            return Some(Action::Upstream(self.upstream_ref(
                u,
                &format!("{key}.upstream"),
                upstreams,
            )));
        }
        if let Some(split) = &r.split {
            let mut out = Vec::new();
            for (name, w) in split.get_ref() {
                let k = format!("{key}.split.{}", name.get_ref());
                let up = self.upstream_ref(name, &k, upstreams);
                match u32::try_from(*w.get_ref()) {
                    Ok(w) if (0..=10_000).contains(&w) => out.push((up, w)),
                    _ => self.err(
                        w,
                        &k,
                        format!("split weight {} is out of range 0-10000", w.get_ref()),
                    ),
                }
            }
            if out.iter().map(|(_, w)| u64::from(*w)).sum::<u64>() == 0 {
                self.err(
                    split,
                    &format!("{key}.split"),
                    "split needs at least one upstream with a weight above 0",
                );
            }
            return Some(Action::Split(out));
        }
        if let Some(rd) = &r.redirect {
            let k = format!("{key}.redirect");
            let raw = rd.get_ref();
            let code = raw.code.unwrap_or(302);
            if ![301, 302, 303, 307, 308].contains(&code) {
                self.err(
                    rd,
                    &format!("{k}.code"),
                    format!("redirect code {code} is not one of 301, 302, 303, 307, 308"),
                );
            }
            if raw.to.is_some()
                && (raw.scheme.is_some() || raw.host.is_some() || raw.path.is_some())
            {
                self.err(
                    rd,
                    &k,
                    "set either `to`, or any of `scheme`, `host`, `path`",
                );
            }
            if raw.to.is_none() && raw.scheme.is_none() && raw.host.is_none() && raw.path.is_none()
            {
                self.err(
                    rd,
                    &k,
                    "a redirect needs `to`, or at least one of `scheme`, `host`, `path`",
                );
            }
            if let Some(sc) = &raw.scheme
                && sc != "http"
                && sc != "https"
            {
                self.err(
                    rd,
                    &format!("{k}.scheme"),
                    format!("scheme {sc:?} must be \"http\" or \"https\""),
                );
            }
            if let Some(h) = &raw.host
                && !is_dns_name(h.split(':').next().unwrap_or(""))
            {
                self.err(rd, &format!("{k}.host"), format!("invalid host {h:?}"));
            }
            if let Some(p) = &raw.path
                && !p.starts_with('/')
            {
                self.err(
                    rd,
                    &format!("{k}.path"),
                    format!("path {p:?} must start with '/'"),
                );
            }
            if let Some(to) = &raw.to
                && (http::HeaderValue::from_str(to).is_err() || to.is_empty())
            {
                self.err(
                    rd,
                    &format!("{k}.to"),
                    format!("invalid redirect target {to:?}"),
                );
            }
            return Some(Action::Redirect(Redirect {
                code: u16::try_from(code).unwrap_or(302),
                to: raw.to.clone(),
                scheme: raw.scheme.clone(),
                host: raw.host.clone(),
                path: raw.path.clone(),
            }));
        }
        let rs = r.respond.as_ref()?;
        let k = format!("{key}.respond");
        let raw = rs.get_ref();
        let status = raw.status.unwrap_or(200);
        if !(200..=599).contains(&status) {
            self.err(
                rs,
                &format!("{k}.status"),
                format!("status {status} is out of range 200-599"),
            );
        }
        let mut headers = Vec::new();
        for (n, v) in &raw.headers {
            if http::HeaderName::from_bytes(n.to_ascii_lowercase().as_bytes()).is_err()
                || http::HeaderValue::from_str(v).is_err()
            {
                self.err(
                    rs,
                    &format!("{k}.headers.{n}"),
                    format!("invalid header {n:?}"),
                );
            } else {
                headers.push((n.to_ascii_lowercase(), v.clone()));
            }
        }
        if raw.body.len() > 1024 * 1024 {
            self.err(rs, &format!("{k}.body"), "body is larger than 1 MiB");
        }
        Some(Action::Respond(Respond {
            status: u16::try_from(status).unwrap_or(200),
            body: raw.body.clone(),
            headers,
        }))
    }

    fn retry(&mut self, r: &RawRoute, at: usize, key: &str) -> RetryPolicy {
        let retries = match &r.retries {
            None => 0,
            Some(n) => match u32::try_from(*n.get_ref()) {
                Ok(v) if v <= 10 => v,
                _ => {
                    self.err(
                        n,
                        &format!("{key}.retries"),
                        format!("retries {} is out of range 0-10", n.get_ref()),
                    );
                    0
                }
            },
        };
        let on = match &r.retry_on {
            None => RetryOn::DEFAULT.to_vec(),
            Some(list) => {
                let mut out = Vec::new();
                for (i, v) in list.iter().enumerate() {
                    match RetryOn::parse(v.get_ref()) {
                        Ok(o) if !out.contains(&o) => out.push(o),
                        Ok(_) => {}
                        Err(m) => self.err(v, &format!("{key}.retry_on[{i}]"), m),
                    }
                }
                out
            }
        };
        if retries == 0 && (r.retry_on.is_some() || r.retry_non_idempotent.is_some()) {
            let d = self.pos.diagnostic(
                at,
                &format!("{key}.retries"),
                "retry_on and retry_non_idempotent need retries > 0".into(),
            );
            self.problems.push(d);
        }
        RetryPolicy {
            retries,
            on,
            non_idempotent: r.retry_non_idempotent.unwrap_or(false),
        }
    }

    fn regex(&mut self, p: &Spanned<String>, key: &str) -> Option<String> {
        match regex::RegexBuilder::new(p.get_ref())
            .size_limit(1 << 20)
            .build()
        {
            Ok(_) => Some(p.get_ref().clone()),
            Err(e) => {
                self.err(p, key, format!("invalid regex: {e}"));
                None
            }
        }
    }

    fn value_matches(
        &mut self,
        m: &BTreeMap<Spanned<String>, Spanned<RawValueMatch>>,
        key: &str,
        header: bool,
    ) -> Vec<(String, ValueMatch)> {
        let mut out = Vec::new();
        for (name, v) in m {
            let k = format!("{key}.{}", name.get_ref());
            let n = if header {
                name.get_ref().to_ascii_lowercase()
            } else {
                name.get_ref().clone()
            };
            if n.is_empty() || (header && http::HeaderName::from_bytes(n.as_bytes()).is_err()) {
                self.err(name, &k, format!("invalid name {:?}", name.get_ref()));
                continue;
            }
            let vm = match v.get_ref() {
                RawValueMatch::Exact(s) => ValueMatch::Exact(s.clone()),
                RawValueMatch::Table(t) => match (&t.regex, t.present) {
                    (Some(re), None) => {
                        let spanned = Spanned::new(v.span(), re.clone());
                        match self.regex(&spanned, &k) {
                            Some(re) => ValueMatch::Regex(re),
                            None => continue,
                        }
                    }
                    (None, Some(true)) => ValueMatch::Present,
                    _ => {
                        self.err(
                            v,
                            &k,
                            "use exactly one of `regex = \"...\"` or `present = true`",
                        );
                        continue;
                    }
                },
            };
            out.push((n, vm));
        }
        out
    }

    fn path(&mut self, p: &Spanned<String>, key: &str) -> Option<String> {
        let s = p.get_ref();
        if !s.starts_with('/') {
            self.err(p, key, format!("path {s:?} must start with '/'"));
            return None;
        }
        if s.bytes()
            .any(|b| b.is_ascii_control() || b == b' ' || b == b'?' || b == b'#')
        {
            self.err(
                p,
                key,
                format!("path {s:?} contains a space, control character, '?' or '#'"),
            );
            return None;
        }
        Some(s.clone())
    }

    fn header_ops(&mut self, ops: Option<&Spanned<RawHeaderOps>>, key: &str) -> HeaderOps {
        let Some(ops) = ops else {
            return HeaderOps::default();
        };
        let raw = ops.get_ref();
        let mut out = HeaderOps::default();
        for (which, map, dst) in [
            ("set", &raw.set, &mut out.set),
            ("add", &raw.add, &mut out.add),
        ] {
            for (n, v) in map {
                let k = format!("{key}.{which}.{}", n.get_ref());
                let name = n.get_ref().to_ascii_lowercase();
                if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                    self.err(n, &k, format!("invalid header name {:?}", n.get_ref()));
                } else if http::HeaderValue::from_str(v.get_ref()).is_err() {
                    self.err(
                        v,
                        &k,
                        "header value contains characters not allowed in HTTP headers",
                    );
                } else {
                    dst.push((name, v.get_ref().clone()));
                }
            }
        }
        for (i, n) in raw.remove.iter().enumerate() {
            let name = n.get_ref().to_ascii_lowercase();
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                self.err(
                    n,
                    &format!("{key}.remove[{i}]"),
                    format!("invalid header name {:?}", n.get_ref()),
                );
            } else {
                out.remove.push(name);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(src: &str) -> Vec<String> {
        match crate::config::parse("routes.toml", src) {
            Ok(_) => vec![],
            Err(d) => d.0.iter().map(|d| d.to_string()).collect(),
        }
    }

    #[test]
    fn valid_config_parses_with_defaults() {
        let src = r#"
[upstreams.api]
endpoints = ["127.0.0.1:9001", { addr = "127.0.0.1:9002", weight = 3 }]

[[routes]]
name = "api"
hosts = ["API.example.com", "*.example.org"]
path_prefix = "/v1/"
upstream = "api"
rewrite_prefix = "/"
request_headers = { set = { "X-Dispa" = "1" }, remove = ["x-internal"] }
"#;
        let c = crate::config::parse("routes.toml", src).expect("valid");
        assert_eq!(c.routes.len(), 1);
        let r = &c.routes[0];
        assert_eq!(r.hosts[0], HostPattern::Exact("api.example.com".into()));
        assert_eq!(r.hosts[1], HostPattern::Wildcard("example.org".into()));
        assert_eq!(r.timeout, DEFAULT_ROUTE_TIMEOUT);
        assert_eq!(r.request_headers.set, vec![("x-dispa".into(), "1".into())]);
        let u = &c.upstreams[&UpstreamName::new("api")];
        assert_eq!(u.endpoints[1].weight, 3);
    }

    #[test]
    fn unknown_upstream_names_position_and_key() {
        let src = "[upstreams.api]\nendpoints = [\"127.0.0.1:1\"]\n\n[[routes]]\nname = \"r\"\nupstream = \"apx\"\n";
        let e = errors(src);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with("routes.toml:6:12: routes[0].upstream: unknown upstream \"apx\""),
            "{}",
            e[0]
        );
    }

    #[test]
    fn unknown_key_is_an_error_with_position() {
        let e = errors("[upstreams.api]\nendpoints = [\"127.0.0.1:1\"]\nbogus = 1\n");
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with("routes.toml:3:1:"), "{}", e[0]);
        assert!(e[0].contains("bogus"), "{}", e[0]);
    }

    #[test]
    fn syntax_error_has_position() {
        let e = errors("[[routes]]\nname = \"a\nupstream = 1\n");
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with("routes.toml:2:"), "{}", e[0]);
    }

    #[test]
    fn collects_every_problem() {
        let src = r#"
[upstreams.a]
endpoints = ["nope", "127.0.0.1:99999"]
connect_timeout = "soon"
balance = "hash"
hash_on = "header:bad header"

[[routes]]
name = "x"
hosts = ["a.*.com"]
path = "v1"
upstream = "a"
timeout = "0s"
"#;
        let e = errors(src);
        assert_eq!(e.len(), 7, "{e:#?}");
        assert!(e.iter().any(|m| m.contains("invalid hash_on")), "{e:#?}");
    }

    #[test]
    fn balancers_and_hash_on() {
        let up = |extra: &str| format!("[upstreams.a]\nendpoints=[\"127.0.0.1:1\"]\n{extra}\n");
        for b in ["round_robin", "weighted", "least_conn", "random", "p2c"] {
            assert!(errors(&up(&format!("balance = \"{b}\""))).is_empty(), "{b}");
        }
        for on in ["header:X-User", "cookie:sid", "client_ip"] {
            assert!(
                errors(&up(&format!("balance = \"hash\"\nhash_on = \"{on}\""))).is_empty(),
                "{on}"
            );
        }
        assert!(errors(&up("balance = \"hash\""))[0].contains("needs hash_on"));
        assert!(errors(&up("hash_on = \"client_ip\""))[0].contains("needs balance = \"hash\""));
        assert!(errors(&up("balance = \"fastest\""))[0].contains("unknown balance"));
        let c = crate::config::parse("f", &up("balance = \"hash\"\nhash_on = \"header:X-User\""))
            .unwrap();
        let u = &c.upstreams[&UpstreamName::new("a")];
        assert_eq!(u.balance, Balance::Hash(HashOn::Header("x-user".into())));
    }

    #[test]
    fn duplicate_route_names_rejected() {
        let src = "[upstreams.a]\nendpoints=[\"127.0.0.1:1\"]\n[[routes]]\nname=\"r\"\nupstream=\"a\"\n[[routes]]\nname=\"r\"\nupstream=\"a\"\n";
        let e = errors(src);
        assert_eq!(e.len(), 1);
        assert!(e[0].contains("duplicate route name"));
    }
}
