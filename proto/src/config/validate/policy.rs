//! `[policy]` and `[routes.policy]`: CIDRs, authentication, rate limits and request limits.

use std::time::Duration;

use toml::Spanned;

use super::Validator;
use crate::config::model::{
    AccessPolicy, Auth, Cidr, DEFAULT_LIMITS, EncodedSlashes, Jwt, JwtKey, Limits, Policy, RateKey,
    RateLimit, Secret,
};
use crate::config::raw::{RawAuth, RawJwt, RawLimits, RawPolicy, RawRateLimit, RawSize};

/// Largest `max_body_bytes`: 1 TiB.
const MAX_BODY_LIMIT: u64 = 1 << 40;
const DEFAULT_JWT_LEEWAY: Duration = Duration::from_secs(30);

/// Parses "10MiB", "512KiB", "1GiB", "100B" or a plain number of bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = [
        ("GiB", 1u64 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
        ("B", 1),
    ]
    .iter()
    .find_map(|(suf, m)| t.strip_suffix(suf).map(|n| (n.trim(), *m)))
    .unwrap_or((t, 1));
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("invalid size {s:?}: write e.g. \"10MiB\", \"512KiB\" or 4096"))
}

impl Validator<'_> {
    pub(super) fn global_policy(&mut self, raw: Option<&Spanned<RawPolicy>>) -> Policy {
        let Some(raw) = raw else {
            return Policy::default();
        };
        let p = raw.get_ref();
        let trusted_proxies = match &p.trusted_proxies {
            Some(list) => self.cidrs(list.get_ref(), "policy.trusted_proxies"),
            None => Vec::new(),
        };
        let (access, limits) = self.access(p, "policy", true);
        Policy {
            trusted_proxies,
            access,
            limits,
        }
    }

    pub(super) fn route_policy(
        &mut self,
        raw: Option<&Spanned<RawPolicy>>,
        key: &str,
    ) -> AccessPolicy {
        let Some(raw) = raw else {
            return AccessPolicy::default();
        };
        let p = raw.get_ref();
        let key = format!("{key}.policy");
        if let Some(t) = &p.trusted_proxies {
            self.err(
                t,
                &format!("{key}.trusted_proxies"),
                "trusted_proxies applies to connections, before a route is chosen: set it in the global [policy]",
            );
        }
        self.access(p, &key, false).0
    }

    fn access(&mut self, p: &RawPolicy, key: &str, global: bool) -> (AccessPolicy, Limits) {
        let allow = p
            .allow
            .as_ref()
            .map(|l| self.cidrs(l, &format!("{key}.allow")));
        let deny = p
            .deny
            .as_ref()
            .map(|l| self.cidrs(l, &format!("{key}.deny")));
        let rate_limit = p
            .rate_limit
            .as_ref()
            .and_then(|r| self.rate_limit(r, &format!("{key}.rate_limit")));
        let auth = p
            .auth
            .as_ref()
            .and_then(|a| self.auth(a, &format!("{key}.auth")));
        let encoded_slashes = p
            .encoded_slashes
            .as_ref()
            .and_then(|e| match e.get_ref().as_str() {
                "keep" => Some(EncodedSlashes::Keep),
                "reject" => Some(EncodedSlashes::Reject),
                other => {
                    self.err(
                        e,
                        &format!("{key}.encoded_slashes"),
                        format!("unknown encoded_slashes {other:?}: use \"keep\" or \"reject\""),
                    );
                    None
                }
            });
        let mut access = AccessPolicy {
            allow,
            deny,
            auth,
            rate_limit,
            encoded_slashes,
            ..AccessPolicy::default()
        };
        let limits = match &p.limits {
            Some(l) => self.limits(l, &format!("{key}.limits"), global, &mut access),
            None => DEFAULT_LIMITS,
        };
        (access, limits)
    }

    fn cidrs(&mut self, list: &[Spanned<String>], key: &str) -> Vec<Cidr> {
        let mut out = Vec::with_capacity(list.len());
        for (i, c) in list.iter().enumerate() {
            match Cidr::parse(c.get_ref()) {
                Ok(v) => out.push(v),
                Err(m) => self.err(c, &format!("{key}[{i}]"), m),
            }
        }
        out
    }

    fn rate_limit(&mut self, r: &Spanned<RawRateLimit>, key: &str) -> Option<RateLimit> {
        let raw = r.get_ref();
        let per_second = self.count(
            &raw.per_second,
            Some(*raw.per_second.get_ref()),
            &format!("{key}.per_second"),
            1,
            1..=10_000_000,
        );
        let burst = match &raw.burst {
            Some(b) => self.count(
                b,
                Some(*b.get_ref()),
                &format!("{key}.burst"),
                per_second,
                1..=10_000_000,
            ),
            None => per_second,
        };
        let k = match &raw.key {
            None => RateKey::ClientIp,
            Some(k) => match k.get_ref().as_str() {
                "client_ip" => RateKey::ClientIp,
                "api_key" => RateKey::ApiKey,
                "route" => RateKey::Route,
                s => match s.strip_prefix("header:") {
                    Some(h) if http::HeaderName::from_bytes(h.as_bytes()).is_ok() => {
                        RateKey::Header(h.to_ascii_lowercase())
                    }
                    _ => {
                        self.err(
                            k,
                            &format!("{key}.key"),
                            format!(
                                "unknown rate-limit key {s:?}: use \"client_ip\", \"api_key\", \"route\" or \"header:NAME\""
                            ),
                        );
                        return None;
                    }
                },
            },
        };
        Some(RateLimit {
            per_second,
            burst,
            key: k,
        })
    }

    fn secrets(&mut self, list: &[Spanned<String>], key: &str) -> Vec<Secret> {
        let mut out = Vec::new();
        for (i, s) in list.iter().enumerate() {
            let v = s.get_ref();
            if v.len() < 8 || v.bytes().any(|b| !b.is_ascii_graphic()) {
                // The value is a secret: name the entry, never echo it.
                self.err(
                    s,
                    &format!("{key}[{i}]"),
                    "must be at least 8 printable characters without spaces",
                );
            } else {
                out.push(Secret(v.clone()));
            }
        }
        out
    }

    fn header_name(&mut self, h: &Spanned<String>, key: &str) -> Option<String> {
        match http::HeaderName::from_bytes(h.get_ref().as_bytes()) {
            Ok(n) => Some(n.as_str().to_string()),
            Err(_) => {
                self.err(
                    h,
                    key,
                    format!("{:?} is not a valid header name", h.get_ref()),
                );
                None
            }
        }
    }

    fn auth(&mut self, a: &Spanned<RawAuth>, key: &str) -> Option<Auth> {
        let raw = a.get_ref();
        let api_keys = raw
            .api_keys
            .as_ref()
            .map(|l| self.secrets(l, &format!("{key}.api_keys")))
            .unwrap_or_default();
        let bearer_tokens = raw
            .bearer_tokens
            .as_ref()
            .map(|l| self.secrets(l, &format!("{key}.bearer_tokens")))
            .unwrap_or_default();
        let api_key_header = match &raw.api_key_header {
            Some(h) => self
                .header_name(h, &format!("{key}.api_key_header"))
                .unwrap_or_default(),
            None => "x-api-key".to_string(),
        };
        let api_key_query = raw.api_key_query.as_ref().map(|q| q.get_ref().clone());
        let jwt = raw
            .jwt
            .as_ref()
            .and_then(|j| self.jwt(j, &format!("{key}.jwt")));
        if api_keys.is_empty() && bearer_tokens.is_empty() && jwt.is_none() {
            self.err(
                a,
                key,
                "auth needs at least one of api_keys, bearer_tokens or jwt",
            );
            return None;
        }
        Some(Auth {
            api_keys,
            api_key_header,
            api_key_query,
            bearer_tokens,
            jwt,
        })
    }

    fn jwt(&mut self, j: &Spanned<RawJwt>, key: &str) -> Option<Jwt> {
        let raw = j.get_ref();
        let k = match (&raw.hs256_secret, &raw.jwks_file) {
            (Some(s), None) => {
                let v = s.get_ref();
                if v.len() < 32 {
                    self.err(
                        s,
                        &format!("{key}.hs256_secret"),
                        "an HS256 secret must be at least 32 bytes",
                    );
                    return None;
                }
                JwtKey::Hs256(Secret(v.clone()))
            }
            (None, Some(f)) => {
                let k = format!("{key}.jwks_file");
                let content = self.files.get(f.get_ref()).cloned();
                let Some(content) = content else {
                    self.err(
                        f,
                        &k,
                        format!(
                            "file {:?} was not uploaded (dispactl apply uploads the files a routes.toml names, read relative to it)",
                            f.get_ref()
                        ),
                    );
                    return None;
                };
                let text = String::from_utf8_lossy(&content).into_owned();
                if let Err(m) = crate::config::jwks::check(&text) {
                    self.err(f, &k, format!("{:?}: {m}", f.get_ref()));
                    return None;
                }
                JwtKey::Jwks(text)
            }
            _ => {
                self.err(j, key, "jwt needs exactly one of hs256_secret or jwks_file");
                return None;
            }
        };
        let leeway = match &raw.leeway {
            Some(l) => match crate::config::parse_duration(l.get_ref()) {
                Ok(d) if d <= Duration::from_secs(3600) => d,
                Ok(_) => {
                    self.err(l, &format!("{key}.leeway"), "leeway is at most 1h");
                    DEFAULT_JWT_LEEWAY
                }
                Err(m) => {
                    self.err(l, &format!("{key}.leeway"), m);
                    DEFAULT_JWT_LEEWAY
                }
            },
            None => DEFAULT_JWT_LEEWAY,
        };
        let mut forward_claims = Vec::new();
        for (claim, header) in raw.forward_claims.iter().flatten() {
            if let Some(h) = self.header_name(header, &format!("{key}.forward_claims.{claim}")) {
                forward_claims.push((claim.clone(), h));
            }
        }
        Some(Jwt {
            key: k,
            issuer: raw.issuer.clone(),
            audience: raw.audience.clone(),
            leeway,
            forward_claims,
        })
    }

    fn opt_count(
        &mut self,
        v: &Option<Spanned<i64>>,
        key: &str,
        default: u32,
        range: std::ops::RangeInclusive<u32>,
    ) -> u32 {
        match v {
            Some(s) => self.count(s, Some(*s.get_ref()), key, default, range),
            None => default,
        }
    }

    fn limits(
        &mut self,
        l: &Spanned<RawLimits>,
        key: &str,
        global: bool,
        access: &mut AccessPolicy,
    ) -> Limits {
        let raw = l.get_ref();
        if let Some(b) = &raw.max_body_bytes {
            let size = match b.get_ref() {
                RawSize::Int(n) => u64::try_from(*n).map_err(|_| format!("{n} is negative")),
                RawSize::Text(t) => parse_size(t),
            };
            match size {
                Ok(n) if n <= MAX_BODY_LIMIT => access.max_body_bytes = Some(n),
                Ok(n) => self.err(
                    b,
                    &format!("{key}.max_body_bytes"),
                    format!("{n} is larger than 1TiB"),
                ),
                Err(m) => self.err(b, &format!("{key}.max_body_bytes"), m),
            }
        }
        access.require_content_length = raw.require_content_length.as_ref().map(|b| *b.get_ref());
        let d = DEFAULT_LIMITS;
        if !global {
            let connection_level = [
                (
                    "max_header_count",
                    raw.max_header_count.as_ref().map(|s| s.span()),
                ),
                (
                    "max_header_bytes",
                    raw.max_header_bytes.as_ref().map(|s| s.span()),
                ),
                (
                    "max_uri_bytes",
                    raw.max_uri_bytes.as_ref().map(|s| s.span()),
                ),
                (
                    "header_timeout",
                    raw.header_timeout.as_ref().map(|s| s.span()),
                ),
                ("idle_timeout", raw.idle_timeout.as_ref().map(|s| s.span())),
                (
                    "max_connections",
                    raw.max_connections.as_ref().map(|s| s.span()),
                ),
                (
                    "max_connections_per_ip",
                    raw.max_connections_per_ip.as_ref().map(|s| s.span()),
                ),
                (
                    "h2_max_concurrent_streams",
                    raw.h2_max_concurrent_streams.as_ref().map(|s| s.span()),
                ),
            ];
            for (name, span) in connection_level {
                if let Some(span) = span {
                    let d = self.pos.diagnostic(
                        span.start,
                        &format!("{key}.{name}"),
                        format!(
                            "{name} applies to connections, before a route is chosen: set it in the global [policy.limits]"
                        ),
                    );
                    self.problems.push(d);
                }
            }
            return d;
        }
        let max_header_count = self.opt_count(
            &raw.max_header_count,
            &format!("{key}.max_header_count"),
            d.max_header_count,
            1..=10_000,
        );
        let max_header_bytes = self.opt_count(
            &raw.max_header_bytes,
            &format!("{key}.max_header_bytes"),
            d.max_header_bytes,
            8192..=1 << 20,
        );
        let max_uri_bytes = self.opt_count(
            &raw.max_uri_bytes,
            &format!("{key}.max_uri_bytes"),
            d.max_uri_bytes,
            64..=1 << 20,
        );
        let max_connections = self.opt_count(
            &raw.max_connections,
            &format!("{key}.max_connections"),
            d.max_connections,
            0..=10_000_000,
        );
        let max_connections_per_ip = self.opt_count(
            &raw.max_connections_per_ip,
            &format!("{key}.max_connections_per_ip"),
            d.max_connections_per_ip,
            0..=10_000_000,
        );
        let h2_max_concurrent_streams = self.opt_count(
            &raw.h2_max_concurrent_streams,
            &format!("{key}.h2_max_concurrent_streams"),
            d.h2_max_concurrent_streams,
            1..=10_000,
        );
        let header_timeout = raw
            .header_timeout
            .as_ref()
            .and_then(|t| self.duration(t, &format!("{key}.header_timeout")))
            .unwrap_or(d.header_timeout);
        let idle_timeout = raw
            .idle_timeout
            .as_ref()
            .and_then(|t| self.duration(t, &format!("{key}.idle_timeout")))
            .unwrap_or(d.idle_timeout);
        Limits {
            max_header_count,
            max_header_bytes,
            max_uri_bytes,
            header_timeout,
            idle_timeout,
            max_connections,
            max_connections_per_ip,
            h2_max_concurrent_streams,
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::model::{EncodedSlashes, JwtKey, RateKey};
    use crate::config::{parse, redact_source};

    fn errors(src: &str) -> Vec<String> {
        match parse("routes.toml", src) {
            Ok(_) => Vec::new(),
            Err(d) => d.0.iter().map(|d| d.to_string()).collect(),
        }
    }

    const ROUTE: &str = "[upstreams.a]\nendpoints = [\"127.0.0.1:1\"]\n[[routes]]\nname = \"r\"\nupstream = \"a\"\n";

    #[test]
    fn global_and_route_policy() {
        let src = format!(
            r#"
[policy]
allow = ["10.0.0.0/8", "::1"]
deny = ["10.9.0.0/16"]
trusted_proxies = ["127.0.0.1/32"]
rate_limit = {{ per_second = 100, burst = 200, key = "header:X-User" }}
limits = {{ max_header_count = 50, max_body_bytes = "10MiB", header_timeout = "5s", max_connections_per_ip = 20 }}
auth = {{ api_keys = ["k-0123456789"], api_key_query = "api_key" }}
{ROUTE}
[routes.policy]
deny = []
auth = {{ jwt = {{ hs256_secret = "0123456789abcdef0123456789abcdef", audience = "api", forward_claims = {{ sub = "x-user" }} }} }}
limits = {{ max_body_bytes = 1024, require_content_length = true }}
encoded_slashes = "reject"
"#
        );
        let c = parse("routes.toml", &src).unwrap_or_else(|d| panic!("{d}"));
        let p = &c.policy;
        assert_eq!(p.trusted_proxies.len(), 1);
        assert_eq!(p.access.allow.as_ref().map(Vec::len), Some(2));
        assert_eq!(p.limits.max_header_count, 50);
        assert_eq!(p.limits.max_connections_per_ip, 20);
        assert_eq!(p.access.max_body_bytes, Some(10 << 20));
        let rl = p.access.rate_limit.as_ref().unwrap_or_else(|| panic!());
        assert_eq!((rl.per_second, rl.burst), (100, 200));
        assert_eq!(rl.key, RateKey::Header("x-user".into()));
        let auth = p.access.auth.as_ref().unwrap_or_else(|| panic!());
        assert_eq!(auth.api_key_header, "x-api-key");
        assert_eq!(auth.api_key_query.as_deref(), Some("api_key"));
        let r = &c.routes[0].policy;
        assert_eq!(r.deny.as_ref().map(Vec::len), Some(0));
        assert_eq!(r.allow, None);
        assert_eq!(r.max_body_bytes, Some(1024));
        assert_eq!(r.require_content_length, Some(true));
        assert_eq!(r.encoded_slashes, Some(EncodedSlashes::Reject));
        let jwt = r
            .auth
            .as_ref()
            .and_then(|a| a.jwt.as_ref())
            .unwrap_or_else(|| panic!());
        assert!(matches!(jwt.key, JwtKey::Hs256(_)));
        assert_eq!(
            jwt.forward_claims,
            vec![("sub".to_string(), "x-user".to_string())]
        );
        // Round trip through the wire.
        let back = crate::config::wire::decode(&crate::config::wire::encode(&c))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back.policy, c.policy);
        assert_eq!(back.routes[0].policy, c.routes[0].policy);
        // Secrets never in Debug output.
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("k-0123456789") && !dbg.contains("0123456789abcdef0123"));
    }

    #[test]
    fn bad_policies_name_the_key() {
        let cases = [
            (
                "[policy]\nallow = [\"10.0.0.1/8\"]\n",
                "policy.allow[0]",
                "host bits",
            ),
            (
                "[policy]\ndeny = [\"nope\"]\n",
                "policy.deny[0]",
                "not an IP",
            ),
            (
                "[policy]\nrate_limit = { per_second = 0 }\n",
                "policy.rate_limit.per_second",
                "out of range",
            ),
            (
                "[policy]\nrate_limit = { per_second = 1, key = \"cookie\" }\n",
                "policy.rate_limit.key",
                "unknown rate-limit key",
            ),
            ("[policy]\nauth = {}\n", "policy.auth", "at least one"),
            (
                "[policy]\nauth = { api_keys = [\"short\"] }\n",
                "policy.auth.api_keys[0]",
                "at least 8",
            ),
            (
                "[policy]\nauth = { jwt = { hs256_secret = \"too-short\" } }\n",
                "policy.auth.jwt.hs256_secret",
                "32 bytes",
            ),
            (
                "[policy]\nauth = { jwt = { jwks_file = \"jwks.json\" } }\n",
                "policy.auth.jwt.jwks_file",
                "not uploaded",
            ),
            (
                "[policy]\nlimits = { max_body_bytes = \"10 parsecs\" }\n",
                "policy.limits.max_body_bytes",
                "invalid size",
            ),
            ("[policy]\nbogus = 1\n", "", "unknown field"),
        ];
        for (src, key, msg) in cases {
            let e = errors(src).join("\n");
            assert!(e.contains(key) && e.contains(msg), "{src:?}: {e}");
        }
        let route_level = format!(
            "{ROUTE}[routes.policy]\ntrusted_proxies = [\"10.0.0.0/8\"]\nlimits = {{ header_timeout = \"1s\" }}\n"
        );
        let e = errors(&route_level).join("\n");
        assert!(e.contains("routes[0].policy.trusted_proxies"), "{e}");
        assert!(e.contains("routes[0].policy.limits.header_timeout"), "{e}");
        // A secret in an error message is never echoed.
        let e = errors("[policy]\nauth = { api_keys = [\"sekrit\"] }\n").join("\n");
        assert!(!e.contains("sekrit"), "{e}");
    }

    #[test]
    fn redaction_hides_every_inline_secret() {
        let src = format!(
            "[policy]\nauth = {{ api_keys = [\"key-aaaaaaaa\", \"key-bbbbbbbb\"], bearer_tokens = [\"tok-cccccccc\"] }}\n{ROUTE}[routes.policy]\nauth = {{ jwt = {{ hs256_secret = \"ssssssssssssssssssssssssssssssssss\" }} }}\n"
        );
        let r = redact_source("routes.toml", &src);
        for s in ["key-aaaaaaaa", "key-bbbbbbbb", "tok-cccccccc", "ssssssss"] {
            assert!(!r.contains(s), "{r}");
        }
        assert_eq!(r.matches("\"<redacted>\"").count(), 4, "{r}");
        // Still valid TOML with the same shape (the redacted values are too short to apply).
        assert!(r.contains("[routes.policy]"));
    }
}
