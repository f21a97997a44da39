//! A route's request matchers (path, methods, headers, query), compiled once per snapshot.

use std::cmp::Reverse;

use dispa_proto::config::model::{PathMatch, Route, ValueMatch};
use http::HeaderMap;
use regex::Regex;

/// Caps each compiled regex so a config cannot make matching expensive.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// What matching looks at in a request.
pub struct RequestView<'a> {
    pub path: &'a str,
    pub method: &'a str,
    pub headers: &'a HeaderMap,
    pub query: Option<&'a str>,
}

#[derive(Debug)]
enum PathMatcher {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

#[derive(Debug)]
enum ValueMatcher {
    Exact(String),
    Regex(Regex),
    Present,
}

impl ValueMatcher {
    fn matches(&self, v: &str) -> bool {
        match self {
            ValueMatcher::Exact(e) => v == e,
            ValueMatcher::Regex(r) => r.is_match(v),
            ValueMatcher::Present => true,
        }
    }
}

#[derive(Debug)]
pub struct Matcher {
    path: PathMatcher,
    methods: Vec<String>,
    headers: Vec<(http::HeaderName, ValueMatcher)>,
    query: Vec<(String, ValueMatcher)>,
}

fn regex(s: &str) -> Result<Regex, String> {
    regex::RegexBuilder::new(s)
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| format!("invalid regex {s:?}: {e}"))
}

fn value(m: &ValueMatch) -> Result<ValueMatcher, String> {
    Ok(match m {
        ValueMatch::Exact(v) => ValueMatcher::Exact(v.clone()),
        ValueMatch::Regex(r) => ValueMatcher::Regex(regex(r)?),
        ValueMatch::Present => ValueMatcher::Present,
    })
}

impl Matcher {
    pub fn compile(r: &Route) -> Result<Self, String> {
        let path = match &r.path {
            PathMatch::Exact(p) => PathMatcher::Exact(p.clone()),
            PathMatch::Prefix(p) => PathMatcher::Prefix(p.clone()),
            PathMatch::Regex(p) => PathMatcher::Regex(regex(p)?),
        };
        let headers = r
            .headers
            .iter()
            .map(|(n, m)| {
                let name = http::HeaderName::from_bytes(n.as_bytes())
                    .map_err(|_| format!("invalid header name {n:?}"))?;
                Ok((name, value(m)?))
            })
            .collect::<Result<_, String>>()?;
        let query = r
            .query
            .iter()
            .map(|(n, m)| Ok((n.clone(), value(m)?)))
            .collect::<Result<_, String>>()?;
        Ok(Matcher {
            path,
            methods: r.methods.clone(),
            headers,
            query,
        })
    }

    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        let path_ok = match &self.path {
            PathMatcher::Exact(p) => req.path == p,
            PathMatcher::Prefix(p) => req.path.starts_with(p.as_str()),
            PathMatcher::Regex(r) => r.is_match(req.path),
        };
        path_ok
            && (self.methods.is_empty() || self.methods.iter().any(|m| m == req.method))
            && self.headers.iter().all(|(n, m)| {
                // Any of a repeated header's values may match.
                req.headers
                    .get_all(n)
                    .iter()
                    .any(|v| v.to_str().is_ok_and(|v| m.matches(v)))
            })
            && self.query.iter().all(|(n, m)| {
                req.query.unwrap_or("").split('&').any(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    k == n && m.matches(v)
                })
            })
    }

    /// Sort key: exact paths, then longer prefixes, then regexes; then more matchers.
    pub fn rank(&self) -> (u8, Reverse<usize>, Reverse<usize>) {
        let (kind, len) = match &self.path {
            PathMatcher::Exact(p) => (0, p.len()),
            PathMatcher::Prefix(p) => (1, p.len()),
            PathMatcher::Regex(_) => (2, 0),
        };
        let matchers =
            usize::from(!self.methods.is_empty()) + self.headers.len() + self.query.len();
        (kind, Reverse(len), Reverse(matchers))
    }
}
