//! The host table and route matching. Built once per snapshot; a lookup is a few hash probes
//! (exact host, then each wildcard suffix, longest first, then the default), never a scan of
//! every host.
//!
//! Precedence: exact host > wildcard host (longer suffix first) > `*`; within a host tier,
//! exact path > longer prefix > regex > routes with more matchers (methods, each header,
//! each query parameter) > file order. A tier whose routes
//! match the host but not the path falls through to the next tier.

mod matcher;

// Looked up on every request with keys from config; foldhash is several times faster than
// SipHash on short keys, and lookups alone give a client nothing to collide.
use std::borrow::Cow;

use foldhash::HashMap;

use dispa_proto::config::model::{HostPattern, Route};

use matcher::Matcher;
pub use matcher::RequestView;

/// Routes indexed by host. `R` is whatever the caller keeps per route.
#[derive(Debug)]
pub struct RouteTable<R> {
    routes: Vec<R>,
    matchers: Vec<Matcher>,
    exact: HashMap<String, Vec<usize>>,
    wildcard: HashMap<String, Vec<usize>>,
    /// The lengths of the wildcard suffixes: a host's suffix of any other length is not
    /// looked up (most hosts, `127.0.0.1` or `api.example.com` against `*.example.net`,
    /// have none to look up).
    suffix_lens: SuffixLens,
    any: Vec<usize>,
}

/// A set of byte lengths; a length past the last bit is always "maybe".
#[derive(Debug, Default)]
struct SuffixLens([u64; 4]);

impl SuffixLens {
    fn insert(&mut self, len: usize) {
        if let Some(word) = self.0.get_mut(len / 64) {
            *word |= 1 << (len % 64);
        }
    }

    fn may_hold(&self, len: usize) -> bool {
        self.0
            .get(len / 64)
            .is_none_or(|w| w & (1 << (len % 64)) != 0)
    }
}

impl<R> RouteTable<R> {
    /// Builds the table from routes in file order, each paired with the caller's value.
    /// Fails (naming the route) if a matcher does not compile.
    pub fn build(routes: Vec<(&Route, R)>) -> Result<Self, String> {
        let mut t = RouteTable {
            routes: Vec::with_capacity(routes.len()),
            matchers: Vec::with_capacity(routes.len()),
            exact: HashMap::default(),
            wildcard: HashMap::default(),
            suffix_lens: SuffixLens::default(),
            any: Vec::new(),
        };
        for (i, (route, value)) in routes.into_iter().enumerate() {
            t.matchers
                .push(Matcher::compile(route).map_err(|e| format!("route {}: {e}", route.name))?);
            t.routes.push(value);
            for h in &route.hosts {
                match h {
                    HostPattern::Exact(h) => t.exact.entry(h.clone()).or_default().push(i),
                    HostPattern::Wildcard(s) => {
                        t.suffix_lens.insert(s.len());
                        t.wildcard.entry(s.clone()).or_default().push(i);
                    }
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
        Ok(t)
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

    /// The route for a normalised host (see [`normalize_host`]) and request.
    pub fn lookup(&self, host: &str, req: &RequestView<'_>) -> Option<&R> {
        let scan = |ids: &Vec<usize>| ids.iter().copied().find(|&i| self.matchers[i].matches(req));
        if let Some(i) = self.exact.get(host).and_then(scan) {
            return Some(&self.routes[i]);
        }
        if !self.wildcard.is_empty() {
            // "a.b.example.com" tries "b.example.com", "example.com", "com": longest suffix first,
            // and never the whole host, so "*.example.com" does not match "example.com".
            // A byte loop: hosts are short, and a char searcher costs more to set up.
            let dots = host.bytes().enumerate().filter(|&(_, b)| b == b'.');
            for (dot, _) in dots {
                let suffix = &host[dot + 1..];
                if !self.suffix_lens.may_hold(suffix.len()) {
                    continue;
                }
                if let Some(i) = self.wildcard.get(suffix).and_then(scan) {
                    return Some(&self.routes[i]);
                }
            }
        }
        scan(&self.any).map(|i| &self.routes[i])
    }
}

/// Lower-cases a Host header / authority and strips the port and a trailing dot.
pub fn normalize_host(raw: &str) -> Cow<'_, str> {
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
    let host = host.trim_end_matches('.');
    // Most hosts arrive in lower case: borrowed, not copied.
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dispa_proto::config;

    fn table(src: &str) -> RouteTable<String> {
        let c = config::parse("t.toml", src).expect("valid config");
        RouteTable::build(c.routes.iter().map(|r| (r, r.name.to_string())).collect())
            .expect("compiles")
    }

    /// Looks up host + "path?query" + method with the given headers.
    fn look<'a>(
        t: &'a RouteTable<String>,
        host: &str,
        target: &str,
        method: &str,
        headers: &[(&str, &str)],
    ) -> Option<&'a str> {
        let mut h = http::HeaderMap::new();
        for (k, v) in headers {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (target, None),
        };
        let req = RequestView {
            path,
            method,
            headers: &h,
            query,
        };
        t.lookup(&normalize_host(host), &req).map(String::as_str)
    }

    const UP: &str = "[upstreams.u]\nendpoints = [\"127.0.0.1:1\"]\n";

    fn route(name: &str, hosts: &str, extra: &str) -> String {
        format!("[[routes]]\nname = \"{name}\"\nhosts = {hosts}\nupstream = \"u\"\n{extra}\n")
    }

    #[test]
    fn wildcard_semantics() {
        let t = table(&format!("{UP}{}", route("w", r#"["*.example.com"]"#, "")));
        let get = |h: &str| look(&t, h, "/", "GET", &[]).map(str::to_string);
        assert_eq!(get("a.example.com").as_deref(), Some("w"));
        assert_eq!(get("a.b.example.com").as_deref(), Some("w"));
        assert_eq!(get("A.B.Example.COM:8080").as_deref(), Some("w"));
        assert_eq!(get("a.example.com."), Some("w".into()));
        assert_eq!(get("example.com"), None);
        assert_eq!(get("badexample.com"), None);
        assert_eq!(get("example.com.evil"), None);
    }

    #[test]
    fn suffix_lengths_only_skip_lookups_that_cannot_match() {
        // Config caps a host at 253 bytes; past the set's 256 bits a length is "maybe".
        let long = format!("{0}.{0}.{0}.example.org", "l".repeat(60));
        let t = table(&format!(
            "{UP}{}{}",
            route("w", r#"["*.example.com"]"#, ""),
            route("long", &format!(r#"["*.{long}"]"#), ""),
        ));
        let get = |h: &str| look(&t, h, "/", "GET", &[]).map(str::to_string);
        assert_eq!(get("a.b.example.com").as_deref(), Some("w"));
        assert_eq!(get(&format!("x.{long}")).as_deref(), Some("long"));
        assert_eq!(get("127.0.0.1"), None);
        let mut lens = SuffixLens::default();
        lens.insert(11);
        lens.insert(300);
        assert!(lens.may_hold(11) && !lens.may_hold(12) && !lens.may_hold(0));
        assert!(lens.may_hold(256) && lens.may_hold(5000));
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
                look(&t, host, path, method, &[]),
                Some(want),
                "{host}{path} {method}"
            );
        }
    }

    /// Precedence over host tiers, path kinds and matcher counts, as one table.
    #[test]
    fn precedence_table() {
        let src = format!(
            "{UP}{}{}{}{}{}{}{}{}{}{}{}{}{}",
            route("any-root", r#"["*"]"#, ""),
            route(
                "regex-only",
                r#"["re.shop.test"]"#,
                "path_regex = \"^/v[0-9]+/\""
            ),
            route("any-regex", r#"["*"]"#, "path_regex = \"^/v[0-9]+/\""),
            route("any-v2-prefix", r#"["*"]"#, "path_prefix = \"/v2/\""),
            route("wild", r#"["*.shop.test"]"#, "path_prefix = \"/\""),
            route("wild-deep", r#"["*.eu.shop.test"]"#, "path_prefix = \"/\""),
            route("exact-root", r#"["www.shop.test"]"#, "path_prefix = \"/\""),
            route(
                "exact-api",
                r#"["www.shop.test"]"#,
                "path_prefix = \"/api/\""
            ),
            route(
                "exact-api-prod",
                r#"["www.shop.test"]"#,
                "path_prefix = \"/api/\"\nheaders = { \"x-env\" = \"prod\" }"
            ),
            route(
                "exact-api-beta",
                r#"["www.shop.test"]"#,
                "path_prefix = \"/api/\"\nquery = { \"beta\" = { present = true } }"
            ),
            route(
                "exact-api-re",
                r#"["www.shop.test"]"#,
                "path_prefix = \"/api/\"\nheaders = { \"x-user\" = { regex = \"^admin-\" } }\nmethods = [\"DELETE\"]"
            ),
            route(
                "exact-health",
                r#"["www.shop.test"]"#,
                "path = \"/api/health\""
            ),
            route(
                "exact-docs-re",
                r#"["docs.shop.test"]"#,
                "path_regex = \"^/(en|de)/\""
            ),
        );
        let t = table(&src);
        type Case<'a> = (
            &'a str,
            &'a str,
            &'a str,
            &'a [(&'a str, &'a str)],
            Option<&'a str>,
        );
        let cases: &[Case<'_>] = &[
            ("www.shop.test", "/", "GET", &[], Some("exact-root")),
            ("WWW.SHOP.TEST:8080", "/x", "GET", &[], Some("exact-root")),
            ("www.shop.test", "/api/items", "GET", &[], Some("exact-api")),
            (
                "www.shop.test",
                "/api/health",
                "GET",
                &[],
                Some("exact-health"),
            ),
            (
                "www.shop.test",
                "/api/health/x",
                "GET",
                &[],
                Some("exact-api"),
            ),
            (
                "www.shop.test",
                "/api/items",
                "GET",
                &[("x-env", "prod")],
                Some("exact-api-prod"),
            ),
            (
                "www.shop.test",
                "/api/items",
                "GET",
                &[("x-env", "dev")],
                Some("exact-api"),
            ),
            (
                "www.shop.test",
                "/api/items?beta",
                "GET",
                &[],
                Some("exact-api-beta"),
            ),
            (
                "www.shop.test",
                "/api/items?a=1&beta=yes",
                "GET",
                &[],
                Some("exact-api-beta"),
            ),
            (
                "www.shop.test",
                "/api/items?betamax=1",
                "GET",
                &[],
                Some("exact-api"),
            ),
            // Two matchers beat one.
            (
                "www.shop.test",
                "/api/x",
                "DELETE",
                &[("x-user", "admin-1"), ("x-env", "prod")],
                Some("exact-api-re"),
            ),
            (
                "www.shop.test",
                "/api/x",
                "DELETE",
                &[("x-user", "bob")],
                Some("exact-api"),
            ),
            (
                "www.shop.test",
                "/api/x",
                "GET",
                &[("x-user", "admin-1")],
                Some("exact-api"),
            ),
            ("a.shop.test", "/", "GET", &[], Some("wild")),
            ("a.b.shop.test", "/api/", "GET", &[], Some("wild")),
            ("x.eu.shop.test", "/", "GET", &[], Some("wild-deep")),
            ("eu.shop.test", "/", "GET", &[], Some("wild")),
            ("shop.test", "/", "GET", &[], Some("any-root")),
            // Any prefix, even "/", beats a regex in the same tier (DESIGN precedence).
            ("shop.test", "/v1/a", "GET", &[], Some("any-root")),
            // A prefix beats a regex, whatever the file order.
            ("shop.test", "/v2/a", "GET", &[], Some("any-v2-prefix")),
            ("other.test", "/vx/a", "GET", &[], Some("any-root")),
            ("re.shop.test", "/v3/x", "GET", &[], Some("regex-only")),
            (
                "docs.shop.test",
                "/en/intro",
                "GET",
                &[],
                Some("exact-docs-re"),
            ),
            // The exact-host tier has no match for this path: fall through to the wildcard tier.
            ("docs.shop.test", "/fr/intro", "GET", &[], Some("wild")),
            ("badshop.test", "/", "GET", &[], Some("any-root")),
            (
                "www.shop.test.",
                "/api/health",
                "GET",
                &[],
                Some("exact-health"),
            ),
            ("[::1]:80", "/v9/", "GET", &[], Some("any-root")),
        ];
        assert!(cases.len() >= 25);
        for (host, target, method, headers, want) in cases {
            assert_eq!(
                look(&t, host, target, method, headers),
                *want,
                "{host}{target} {method} {headers:?}"
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
        assert_eq!(look(&t, "h", "/", "GET", &[]), Some("first"));
    }

    #[test]
    fn normalizes_hosts() {
        assert_eq!(normalize_host("Example.COM:443"), "example.com");
        assert_eq!(normalize_host("[::1]:8080"), "::1");
        assert_eq!(normalize_host("example.com."), "example.com");
        assert_eq!(normalize_host("h:abc"), "h:abc");
    }
}
