//! The validated `[policy]`: who may reach the agent, how they prove it, how fast, and how big
//! their requests may be. The global policy applies everywhere; a route's `[routes.policy]`
//! replaces the fields it sets.

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

/// An IPv4 or IPv6 network, `10.0.0.0/8`, or one address (`/32`, `/128`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    /// Parses `ADDR/PREFIX` or a bare address; host bits must be zero.
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or CIDR (e.g. \"10.0.0.0/8\")"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0..={max}"))?,
        };
        let c = Cidr { addr, prefix };
        if c.network() != addr {
            return Err(format!(
                "{s:?} has host bits set; did you mean \"{}/{prefix}\"?",
                c.network()
            ));
        }
        Ok(c)
    }

    fn mask_bits(bits: u128, width: u32, prefix: u8) -> u128 {
        if prefix == 0 {
            0
        } else {
            bits & (!0u128 << (width - u32::from(prefix))) & (!0u128 >> (128 - width))
        }
    }

    fn network(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => IpAddr::V4(
                (Self::mask_bits(u128::from(u32::from(a)), 32, self.prefix) as u32).into(),
            ),
            IpAddr::V6(a) => IpAddr::V6(Self::mask_bits(u128::from(a), 128, self.prefix).into()),
        }
    }

    /// Whether `ip` is inside; IPv4-mapped IPv6 addresses count as IPv4.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                Self::mask_bits(u128::from(u32::from(ip)), 32, self.prefix)
                    == u128::from(u32::from(net))
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                Self::mask_bits(u128::from(ip), 128, self.prefix) == u128::from(net)
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A value that must never be printed: API keys, bearer tokens, JWT secrets.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// What a rate limit counts by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RateKey {
    ClientIp,
    /// The API key the request authenticated with (client IP when it had none).
    ApiKey,
    /// A request header's value (lower-case name); requests without it share one bucket.
    Header(String),
    /// One bucket for the whole route (or, globally, the whole agent).
    Route,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimit {
    pub per_second: u32,
    pub burst: u32,
    pub key: RateKey,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JwtKey {
    Hs256(Secret),
    /// A JWKS document (JSON) with RS256 / ES256 keys.
    Jwks(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Jwt {
    pub key: JwtKey,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// Slack for `exp` and `nbf`.
    pub leeway: Duration,
    /// (claim, header): claims copied into request headers for the upstream.
    pub forward_claims: Vec<(String, String)>,
}

/// How a request proves who it is. Any configured method that succeeds is enough.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Auth {
    pub api_keys: Vec<Secret>,
    /// Lower-case header name carrying an API key.
    pub api_key_header: String,
    /// A query parameter carrying an API key, if allowed.
    pub api_key_query: Option<String>,
    pub bearer_tokens: Vec<Secret>,
    pub jwt: Option<Jwt>,
}

/// What to do with `%2F` (an encoded slash) in a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum EncodedSlashes {
    /// Pass it on encoded; it is not a path separator for matching.
    #[default]
    Keep,
    /// Refuse the request (400).
    Reject,
}

/// Policy a route may override, field by field (`None`: inherit).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccessPolicy {
    pub allow: Option<Vec<Cidr>>,
    pub deny: Option<Vec<Cidr>>,
    pub auth: Option<Auth>,
    pub rate_limit: Option<RateLimit>,
    pub max_body_bytes: Option<u64>,
    pub require_content_length: Option<bool>,
    pub encoded_slashes: Option<EncodedSlashes>,
}

/// Connection and request-head limits: global only, applied before a route is known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_header_count: u32,
    pub max_header_bytes: u32,
    pub max_uri_bytes: u32,
    /// Time for a client to send a whole request head.
    pub header_timeout: Duration,
    /// A keep-alive connection with no request for this long is closed.
    pub idle_timeout: Duration,
    /// Open client connections per agent (0 = no limit).
    pub max_connections: u32,
    /// Open client connections per client IP (0 = no limit).
    pub max_connections_per_ip: u32,
    pub h2_max_concurrent_streams: u32,
}

pub const DEFAULT_LIMITS: Limits = Limits {
    max_header_count: 100,
    max_header_bytes: 16 * 1024,
    max_uri_bytes: 8 * 1024,
    header_timeout: Duration::from_secs(10),
    idle_timeout: Duration::from_secs(60),
    max_connections: 50_000,
    max_connections_per_ip: 0,
    h2_max_concurrent_streams: 100,
};

impl Default for Limits {
    fn default() -> Self {
        DEFAULT_LIMITS
    }
}

/// The global `[policy]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// Peers whose X-Forwarded-For and PROXY protocol headers are believed.
    pub trusted_proxies: Vec<Cidr>,
    pub access: AccessPolicy,
    pub limits: Limits,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs() {
        let c = Cidr::parse("10.0.0.0/8").unwrap_or_else(|e| panic!("{e}"));
        assert!(c.contains("10.9.8.7".parse().unwrap_or_else(|_| panic!())));
        assert!(!c.contains("11.0.0.1".parse().unwrap_or_else(|_| panic!())));
        assert!(c.contains("::ffff:10.1.2.3".parse().unwrap_or_else(|_| panic!())));
        let one = Cidr::parse("127.0.0.1").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(one.prefix, 32);
        assert!(one.contains("127.0.0.1".parse().unwrap_or_else(|_| panic!())));
        assert!(!one.contains("127.0.0.2".parse().unwrap_or_else(|_| panic!())));
        let v6 = Cidr::parse("2001:db8::/32").unwrap_or_else(|e| panic!("{e}"));
        assert!(v6.contains("2001:db8:1::5".parse().unwrap_or_else(|_| panic!())));
        assert!(!v6.contains("10.0.0.1".parse().unwrap_or_else(|_| panic!())));
        let all = Cidr::parse("0.0.0.0/0").unwrap_or_else(|e| panic!("{e}"));
        assert!(all.contains("8.8.8.8".parse().unwrap_or_else(|_| panic!())));
        assert!(Cidr::parse("10.0.0.1/8").unwrap_err().contains("host bits"));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("nope").is_err());
    }
}
