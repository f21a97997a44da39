//! The validated config: typed, with every default filled in. Plane and agents reason about
//! this, never about raw TOML.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

mod policy;

use crate::{RouteName, UpstreamName};
pub use policy::{
    AccessPolicy, Auth, Cidr, DEFAULT_LIMITS, EncodedSlashes, Jwt, JwtKey, Limits, Policy, RateKey,
    RateLimit, Secret,
};

pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
pub const DEFAULT_ROUTE_TIMEOUT: Duration = Duration::from_secs(15);
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);
pub const MAX_WEIGHT: u32 = 1000;
pub const MAX_ENDPOINTS: usize = 1000;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub upstreams: BTreeMap<UpstreamName, Upstream>,
    /// In file order; the agent computes precedence from this.
    pub routes: Vec<Route>,
    /// Certificates the agents' TLS listener serves, by entry name.
    pub certificates: BTreeMap<String, Certificate>,
    /// The global `[policy]`.
    pub policy: Policy,
}

impl Config {
    /// The paths (as written) of every private-key file the config names (certificate keys,
    /// upstream client keys): never shown without an admin's `--show-secrets`.
    pub fn key_files(&self) -> std::collections::BTreeSet<String> {
        let certs = self.certificates.values().map(|c| c.key.path.clone());
        let clients = self
            .upstreams
            .values()
            .filter_map(|u| u.tls.as_ref()?.client_cert.as_ref())
            .map(|(_, key)| key.path.clone());
        certs.chain(clients).collect()
    }
}

/// An uploaded PEM file: the path the routes.toml writes, and its content. Debug prints the
/// path and size only, never the content (it may be a private key).
#[derive(Clone, PartialEq, Eq)]
pub struct PemFile {
    pub path: String,
    pub content: bytes::Bytes,
}

impl fmt::Debug for PemFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PemFile({:?}, <{} bytes>)",
            self.path,
            self.content.len()
        )
    }
}

/// The lowest TLS version a listener accepts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    #[default]
    V1_2,
    V1_3,
}

impl TlsVersion {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "1.2" => Ok(TlsVersion::V1_2),
            "1.3" => Ok(TlsVersion::V1_3),
            _ => Err(format!("unknown TLS version {s:?} (\"1.2\" or \"1.3\")")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            TlsVersion::V1_2 => "1.2",
            TlsVersion::V1_3 => "1.3",
        }
    }
}

/// `[certificates.NAME]`: a certificate chain and key served for `hosts` (by SNI).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Certificate {
    pub name: String,
    /// Exact or wildcard hosts (never `*`); may be empty for a default-only certificate.
    pub hosts: Vec<HostPattern>,
    /// PEM chain, leaf first.
    pub cert: PemFile,
    /// PEM private key (a secret).
    pub key: PemFile,
    /// Served to clients without SNI or with an SNI no entry lists.
    pub default: bool,
    /// mTLS: a client certificate signed by one of these CAs is required.
    pub client_ca: Option<PemFile>,
    pub min_version: TlsVersion,
}

/// TLS to an upstream's endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamTls {
    /// The server name sent and verified; None: the endpoint's host (DNS name or IP).
    pub sni: Option<String>,
    /// CA bundle the endpoints' certificates must chain to (required unless
    /// `insecure_skip_verify`).
    pub ca: Option<PemFile>,
    /// No certificate verification at all (loudly warned by agents).
    pub insecure_skip_verify: bool,
    /// A client certificate and key presented to the endpoints.
    pub client_cert: Option<(PemFile, PemFile)>,
}

/// How an upstream spreads requests over its endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Balance {
    /// Smooth weighted round robin (weights default to 1, so plain rotation).
    RoundRobin,
    /// The same as round robin; the name says weights matter.
    Weighted,
    /// Fewest requests in flight per unit of weight.
    LeastConn,
    /// Weighted random.
    Random,
    /// Power of two choices: two random endpoints, the one with fewer requests in flight.
    P2c,
    /// Consistent hashing of a request key onto a ring of endpoints.
    Hash(HashOn),
}

impl Balance {
    pub fn name(&self) -> &'static str {
        match self {
            Balance::RoundRobin => "round_robin",
            Balance::Weighted => "weighted",
            Balance::LeastConn => "least_conn",
            Balance::Random => "random",
            Balance::P2c => "p2c",
            Balance::Hash(_) => "hash",
        }
    }
}

/// What a hash balancer hashes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HashOn {
    /// A request header's value (name stored lower-case).
    Header(String),
    /// A cookie's value.
    Cookie(String),
    ClientIp,
}

impl HashOn {
    /// Parses `header:NAME`, `cookie:NAME` or `client_ip`.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s == "client_ip" {
            return Ok(HashOn::ClientIp);
        }
        let bad = || {
            format!("invalid hash_on {s:?}: use \"header:NAME\", \"cookie:NAME\" or \"client_ip\"")
        };
        let (kind, name) = s.split_once(':').ok_or_else(bad)?;
        match kind {
            "header" if http::HeaderName::from_bytes(name.as_bytes()).is_ok() => {
                Ok(HashOn::Header(name.to_ascii_lowercase()))
            }
            "cookie"
                if !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_graphic() && !b"=;,\"".contains(&b)) =>
            {
                Ok(HashOn::Cookie(name.to_string()))
            }
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for HashOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HashOn::Header(h) => write!(f, "header:{h}"),
            HashOn::Cookie(c) => write!(f, "cookie:{c}"),
            HashOn::ClientIp => f.write_str("client_ip"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream {
    pub name: UpstreamName,
    pub balance: Balance,
    pub endpoints: Vec<Endpoint>,
    pub connect_timeout: Duration,
    /// HTTP/2 (prior knowledge) to the endpoints instead of HTTP/1.1; needed for gRPC.
    pub h2: bool,
    /// Circuit breaker: most requests in flight to the upstream at once (0 = no limit).
    pub max_requests: u32,
    /// Circuit breaker: most requests using an upstream connection at once (0 = no limit);
    /// more wait, up to `max_pending` of them.
    pub max_connections: u32,
    /// Requests allowed to wait for one of `max_connections`; beyond, 503.
    pub max_pending: u32,
    /// How long an idle pooled connection to an endpoint is kept.
    pub idle_timeout: Duration,
    /// Active HTTP health checks; none when absent.
    pub health: Option<HealthCheck>,
    /// Passive outlier detection (always on unless `consecutive_failures = 0`).
    pub outlier: Outlier,
    /// TLS to the endpoints; plaintext when None.
    pub tls: Option<UpstreamTls>,
}

/// Active checks: `GET path` every `interval`; 2xx/3xx within `timeout` is a success.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successes that make a down endpoint healthy again.
    pub healthy: u32,
    /// Consecutive failures that take an endpoint down.
    pub unhealthy: u32,
    /// Statuses that count as healthy; empty = any 2xx or 3xx.
    pub expect_status: Vec<u16>,
}

/// Ejects an endpoint after consecutive connect failures or 5xx answers, for
/// `base_ejection * 2^(ejections so far)`, at most `max_ejection`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outlier {
    pub consecutive_failures: u32,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
}

impl Default for Outlier {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(300),
        }
    }
}

/// What a failed attempt may be retried on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryOn {
    ConnectFailure,
    /// The connection failed after the request was sent (reset, closed).
    Reset,
    Status(u16),
}

impl RetryOn {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "connect_failure" => Ok(RetryOn::ConnectFailure),
            "reset" => Ok(RetryOn::Reset),
            "502" => Ok(RetryOn::Status(502)),
            "503" => Ok(RetryOn::Status(503)),
            "504" => Ok(RetryOn::Status(504)),
            _ => Err(format!(
                "invalid retry_on {s:?}: use \"connect_failure\", \"reset\", \"502\", \"503\" or \"504\""
            )),
        }
    }

    pub fn name(self) -> String {
        match self {
            RetryOn::ConnectFailure => "connect_failure".into(),
            RetryOn::Reset => "reset".into(),
            RetryOn::Status(s) => s.to_string(),
        }
    }

    pub const DEFAULT: [RetryOn; 5] = [
        RetryOn::ConnectFailure,
        RetryOn::Reset,
        RetryOn::Status(502),
        RetryOn::Status(503),
        RetryOn::Status(504),
    ];
}

/// Retries of one route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Extra attempts after the first (0 = none).
    pub retries: u32,
    pub on: Vec<RetryOn>,
    /// Retry methods that are not idempotent too (connect failures are always retried).
    pub non_idempotent: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub address: EndpointAddr,
    pub weight: u32,
}

/// `host:port`, where host is an IP literal or a DNS name (resolved by the agent).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointAddr {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for EndpointAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl EndpointAddr {
    /// Parses `host:port` / `[v6]:port`. The host is checked for syntax only.
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Ok(sa) = s.parse::<std::net::SocketAddr>() {
            if sa.port() == 0 {
                return Err(format!("endpoint {s:?} has port 0"));
            }
            return Ok(EndpointAddr {
                host: sa.ip().to_string(),
                port: sa.port(),
            });
        }
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("endpoint {s:?} must be \"host:port\""))?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("endpoint {s:?} has an invalid port {port:?} (1-65535)"))?;
        if port == 0 {
            return Err(format!("endpoint {s:?} has port 0"));
        }
        if !is_dns_name(host) {
            return Err(format!(
                "endpoint {s:?}: {host:?} is neither an IP address nor a DNS name"
            ));
        }
        Ok(EndpointAddr {
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

/// A syntactically valid DNS host name (letters, digits, hyphens; dot-separated labels).
pub fn is_dns_name(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// A host a route serves.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HostPattern {
    /// `api.example.com` (stored lower-case).
    Exact(String),
    /// `*.example.com`, stored as the suffix `example.com`: matches one or more labels before it.
    Wildcard(String),
    /// `*`: any host.
    Any,
}

impl HostPattern {
    pub fn parse(s: &str) -> Result<Self, String> {
        let lower = s.to_ascii_lowercase();
        if lower == "*" {
            return Ok(HostPattern::Any);
        }
        if let Some(suffix) = lower.strip_prefix("*.") {
            if is_dns_name(suffix) {
                return Ok(HostPattern::Wildcard(
                    suffix.trim_end_matches('.').to_string(),
                ));
            }
        } else if is_dns_name(&lower) || lower.parse::<std::net::IpAddr>().is_ok() {
            return Ok(HostPattern::Exact(lower.trim_end_matches('.').to_string()));
        }
        Err(format!(
            "invalid host {s:?}: expected \"name.example.com\", \"*.example.com\" or \"*\" (no port, no scheme)"
        ))
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(h) => f.write_str(h),
            HostPattern::Wildcard(s) => write!(f, "*.{s}"),
            HostPattern::Any => f.write_str("*"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
    /// A regular expression (Rust `regex` syntax), checked at validation.
    Regex(String),
}

/// How a header or query parameter must look for a route to match.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ValueMatch {
    Exact(String),
    Regex(String),
    /// Present with any value.
    Present,
}

/// What a route does with a matched request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Upstream(UpstreamName),
    /// Weighted choice per request, e.g. a 90/10 canary.
    Split(Vec<(UpstreamName, u32)>),
    Redirect(Redirect),
    Respond(Respond),
}

/// A redirect. `to` replaces the whole location; otherwise each part set replaces the
/// request's, and the query is kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redirect {
    pub code: u16,
    pub to: Option<String>,
    pub scheme: Option<String>,
    pub host: Option<String>,
    pub path: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mirror {
    pub upstream: UpstreamName,
    /// 1-100: the share of requests copied.
    pub percent: u32,
}

/// A fixed answer from the agent itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Respond {
    pub status: u16,
    pub body: String,
    pub headers: Vec<(String, String)>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderOps {
    pub set: Vec<(String, String)>,
    pub add: Vec<(String, String)>,
    pub remove: Vec<String>,
}

impl HeaderOps {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub name: RouteName,
    pub hosts: Vec<HostPattern>,
    pub path: PathMatch,
    /// Upper-case; empty = any.
    pub methods: Vec<String>,
    /// Lower-case header names; all must match.
    pub headers: Vec<(String, ValueMatch)>,
    /// Query parameter names; all must match.
    pub query: Vec<(String, ValueMatch)>,
    pub action: Action,
    pub timeout: Duration,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
    pub rewrite_prefix: Option<String>,
    /// The Host sent upstream instead of the client's.
    pub host_rewrite: Option<String>,
    /// Longest wait for the next piece of the upstream's response body; then the response is
    /// cut off. None: no limit.
    pub idle_timeout: Option<Duration>,
    /// A copy of requests (without a body) sent to another upstream, answer ignored.
    pub mirror: Option<Mirror>,
    pub retry: RetryPolicy,
    /// `[routes.policy]`: what this route overrides of the global policy.
    pub policy: AccessPolicy,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_addr_parses() {
        let a = EndpointAddr::parse("127.0.0.1:9001").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.to_string(), "127.0.0.1:9001");
        let a = EndpointAddr::parse("[::1]:80").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.to_string(), "[::1]:80");
        let a = EndpointAddr::parse("API.internal:8080").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.host, "api.internal");
        assert!(EndpointAddr::parse("127.0.0.1").is_err());
        assert!(EndpointAddr::parse("host:0").is_err());
        assert!(EndpointAddr::parse("host:99999").is_err());
        assert!(EndpointAddr::parse("bad host:80").is_err());
        assert!(EndpointAddr::parse("http://x:80").is_err());
    }

    #[test]
    fn host_patterns_parse() {
        assert_eq!(HostPattern::parse("*"), Ok(HostPattern::Any));
        assert_eq!(
            HostPattern::parse("*.Example.com"),
            Ok(HostPattern::Wildcard("example.com".into()))
        );
        assert_eq!(
            HostPattern::parse("API.example.com"),
            Ok(HostPattern::Exact("api.example.com".into()))
        );
        assert!(HostPattern::parse("a.*.com").is_err());
        assert!(HostPattern::parse("example.com:80").is_err());
        assert!(HostPattern::parse("*.").is_err());
    }
}
