//! The host table and route matching. Built once per snapshot; a lookup is a few hash probes
//! (exact host, then each wildcard suffix, longest first, then the default), never a scan of
//! every host.
//!
//! Precedence: exact host > wildcard host (longer suffix first) > `*`; within a host tier,
//! exact path > longer prefix > routes with more matchers > file order. A tier whose routes
//! match the host but not the path falls through to the next tier.

use std::collections::HashMap;

use dispa_proto::config::model::{HostPattern, PathMatch, Route};

/// Routes indexed by host. `R` is whatever the caller keeps per route.
#[derive(Debug)]
pub struct RouteTable<R> {
    routes: Vec<R>,
    matchers: Vec<Matcher>,
    exact: HashMap<String, Vec<usize>>,
    wildcard: HashMap<String, Vec<usize>>,
    any: Vec<usize>,
}

#[derive(Debug, Clone)]
struct Matcher {
    path: PathMatch,
    methods: Vec<String>,
}

impl Matcher {
    fn matches(&self, path: &str, method: &str) -> bool {
        let path_ok = match &self.path {
            PathMatch::Exact(p) => path == p,
            PathMatch::Prefix(p) => path.starts_with(p.as_str()),
        };
        path_ok && (self.methods.is_empty() || self.methods.iter().any(|m| m == method))
    }

    /// Sort key: exact paths first, then longer prefixes, then more matchers.
    fn rank(&self) -> (u8, std::cmp::Reverse<usize>, std::cmp::Reverse<usize>) {
        let (kind, len) = match &self.path {
            PathMatch::Exact(p) => (0, p.len()),
            PathMatch::Prefix(p) => (1, p.len()),
        };
        (
            kind,
            std::cmp::Reverse(len),
            std::cmp::Reverse(usize::from(!self.methods.is_empty())),
        )
    }
}

impl<R> RouteTable<R> {
    /// Builds the table from routes in file order, each paired with the caller's value.
    pub fn build(routes: Vec<(&Route, R)>) -> Self {
        let mut t = RouteTable {
            routes: Vec::with_capacity(routes.len()),
            matchers: Vec::with_capacity(routes.len()),
            exact: HashMap::new(),
            wildcard: HashMap::new(),
            any: Vec::new(),
        };
        for (i, (route, value)) in routes.into_iter().enumerate() {
            t.matchers.push(Matcher {
                path: route.path.clone(),
                methods: route.methods.clone(),
            });
            t.routes.push(value);
            for h in &route.hosts {
                match h {
                    HostPattern::Exact(h) => t.exact.entry(h.clone()).or_default().push(i),
                    HostPattern::Wildcard(s) => t.wildcard.entry(s.clone()).or_default().push(i),
                    HostPattern::Any => t.any.push(i),
                }
            }
        }
        let matchers = &t.matchers;
        // Stable sort keeps file order among equals.
        let sort = |v: &mut Vec<usize>| v.sort_by_key(|&i| matchers[i].rank());
        t.exact.values_mut().for_each(sort);
        t.wildcard.values_mut().for_each(sort);
        sort(&mut t.any);
        t
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    pub fn routes(&self) -> impl Iterator<Item = &R> {
        self.routes.iter()
    }

    /// The route for a normalised host (see [`normalize_host`]), path and method.
    pub fn lookup(&self, host: &str, path: &str, method: &str) -> Option<&R> {
        let scan = |ids: &Vec<usize>| {
            ids.iter()
                .copied()
                .find(|&i| self.matchers[i].matches(path, method))
        };
        if let Some(i) = self.exact.get(host).and_then(scan) {
            return Some(&self.routes[i]);
        }
        if !self.wildcard.is_empty() {
            // "a.b.example.com" tries "b.example.com", "example.com", "com": longest suffix first,
            // and never the whole host, so "*.example.com" does not match "example.com".
            for (dot, _) in host.match_indices('.') {
                if let Some(i) = self.wildcard.get(&host[dot + 1..]).and_then(scan) {
                    return Some(&self.routes[i]);
                }
            }
        }
        scan(&self.any).map(|i| &self.routes[i])
    }
}

/// Lower-cases a Host header / authority and strips the port and a trailing dot.
pub fn normalize_host(raw: &str) -> String {
    let host = if let Some(rest) = raw.strip_prefix('[') {
        // IPv6 literal: "[::1]:8080" -> "::1"
        rest.split(']').next().unwrap_or(rest)
    } else {
        raw.rsplit_once(':').map_or(raw, |(h, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                raw
            }
        })
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;
    use dispa_proto::config;

    fn table(src: &str) -> RouteTable<String> {
        let c = config::parse("t.toml", src).expect("valid config");
        RouteTable::build(c.routes.iter().map(|r| (r, r.name.to_string())).collect())
    }

    const UP: &str = "[upstreams.u]\nendpoints = [\"127.0.0.1:1\"]\n";

    fn route(name: &str, hosts: &str, extra: &str) -> String {
        format!("[[routes]]\nname = \"{name}\"\nhosts = {hosts}\nupstream = \"u\"\n{extra}\n")
    }

    #[test]
    fn wildcard_semantics() {
        let t = table(&format!("{UP}{}", route("w", r#"["*.example.com"]"#, "")));
        let get = |h: &str| t.lookup(&normalize_host(h), "/", "GET").cloned();
        assert_eq!(get("a.example.com").as_deref(), Some("w"));
        assert_eq!(get("a.b.example.com").as_deref(), Some("w"));
        assert_eq!(get("A.B.Example.COM:8080").as_deref(), Some("w"));
        assert_eq!(get("a.example.com."), Some("w".into()));
        assert_eq!(get("example.com"), None);
        assert_eq!(get("badexample.com"), None);
        assert_eq!(get("example.com.evil"), None);
    }

    #[test]
    fn precedence() {
        let src = format!(
            "{UP}{}{}{}{}{}{}{}",
            route("default", r#"["*"]"#, ""),
            route("wild", r#"["*.example.com"]"#, ""),
            route("deep-wild", r#"["*.api.example.com"]"#, ""),
            route(
                "exact-prefix",
                r#"["api.example.com"]"#,
                "path_prefix = \"/v1/\""
            ),
            route(
                "exact-longer",
                r#"["api.example.com"]"#,
                "path_prefix = \"/v1/admin/\""
            ),
            route(
                "exact-path",
                r#"["api.example.com"]"#,
                "path = \"/v1/admin/\""
            ),
            route(
                "exact-post",
                r#"["api.example.com"]"#,
                "path_prefix = \"/v1/\"\nmethods = [\"POST\"]"
            ),
        );
        let t = table(&src);
        let cases = [
            ("api.example.com", "/v1/users", "GET", "exact-prefix"),
            ("api.example.com", "/v1/users", "POST", "exact-post"),
            ("api.example.com", "/v1/admin/x", "GET", "exact-longer"),
            ("api.example.com", "/v1/admin/", "GET", "exact-path"),
            // No exact-host route matches the path: fall through to the wildcard tier.
            ("api.example.com", "/other", "GET", "wild"),
            ("x.api.example.com", "/", "GET", "deep-wild"),
            ("x.example.com", "/", "GET", "wild"),
            ("example.com", "/", "GET", "default"),
            ("other.org", "/", "GET", "default"),
        ];
        for (host, path, method, want) in cases {
            assert_eq!(
                t.lookup(host, path, method).map(String::as_str),
                Some(want),
                "{host}{path} {method}"
            );
        }
    }

    #[test]
    fn file_order_breaks_ties() {
        let t = table(&format!(
            "{UP}{}{}",
            route("first", r#"["*"]"#, ""),
            route("second", r#"["*"]"#, "")
        ));
        assert_eq!(t.lookup("h", "/", "GET").map(String::as_str), Some("first"));
    }

    #[test]
    fn normalizes_hosts() {
        assert_eq!(normalize_host("Example.COM:443"), "example.com");
        assert_eq!(normalize_host("[::1]:8080"), "::1");
        assert_eq!(normalize_host("example.com."), "example.com");
        assert_eq!(normalize_host("h:abc"), "h:abc");
    }
}
