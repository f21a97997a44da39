//! routes.toml as written: serde structs that reject unknown keys and keep the span of every
//! value that validation may need to point at.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use toml::Spanned;

mod policy;

pub(crate) use policy::{RawAuth, RawJwt, RawLimits, RawPolicy, RawRateLimit, RawSize};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    #[serde(default)]
    pub upstreams: BTreeMap<Spanned<String>, RawUpstream>,
    #[serde(default)]
    pub routes: Vec<Spanned<RawRoute>>,
    #[serde(default)]
    pub certificates: BTreeMap<Spanned<String>, Spanned<RawCertificate>>,
    pub policy: Option<Spanned<RawPolicy>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCertificate {
    #[serde(default)]
    pub hosts: Vec<Spanned<String>>,
    pub cert_file: Spanned<String>,
    pub key_file: Spanned<String>,
    pub default: Option<bool>,
    pub client_ca_file: Option<Spanned<String>>,
    pub min_version: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUpstreamTls {
    pub sni: Option<Spanned<String>>,
    pub ca_file: Option<Spanned<String>>,
    pub insecure_skip_verify: Option<bool>,
    pub cert_file: Option<Spanned<String>>,
    pub key_file: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUpstream {
    pub balance: Option<Spanned<String>>,
    pub hash_on: Option<Spanned<String>>,
    pub endpoints: Spanned<Vec<Spanned<RawEndpoint>>>,
    pub connect_timeout: Option<Spanned<String>>,
    pub protocol: Option<Spanned<String>>,
    /// Most requests in flight to the upstream at once (per agent).
    pub max_requests: Option<Spanned<i64>>,
    pub max_connections: Option<Spanned<i64>>,
    pub max_pending: Option<Spanned<i64>>,
    pub idle_timeout: Option<Spanned<String>>,
    pub health: Option<Spanned<RawHealth>>,
    pub outlier: Option<Spanned<RawOutlier>>,
    pub tls: Option<Spanned<RawUpstreamTls>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHealth {
    pub path: Option<String>,
    pub interval: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
    pub healthy: Option<i64>,
    pub unhealthy: Option<i64>,
    pub expect_status: Option<Vec<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawOutlier {
    pub consecutive_failures: Option<i64>,
    pub base_ejection: Option<Spanned<String>>,
    pub max_ejection: Option<Spanned<String>>,
}

/// An endpoint: `"host:port"` or `{ addr = "host:port", weight = 3 }`.
#[derive(Debug)]
pub(crate) struct RawEndpoint {
    pub addr: String,
    pub weight: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpointTable {
    addr: String,
    weight: Option<i64>,
}

impl<'de> Deserialize<'de> for RawEndpoint {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct EndpointVisitor;
        impl<'de> Visitor<'de> for EndpointVisitor {
            type Value = RawEndpoint;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#""host:port" or { addr = "host:port", weight = N }"#)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawEndpoint, E> {
                Ok(RawEndpoint {
                    addr: v.to_string(),
                    weight: None,
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawEndpoint, A::Error> {
                let t = RawEndpointTable::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(RawEndpoint {
                    addr: t.addr,
                    weight: t.weight,
                })
            }
        }
        d.deserialize_any(EndpointVisitor)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRoute {
    pub name: Option<Spanned<String>>,
    pub hosts: Option<Spanned<Vec<Spanned<String>>>>,
    pub path: Option<Spanned<String>>,
    pub path_prefix: Option<Spanned<String>>,
    pub path_regex: Option<Spanned<String>>,
    pub methods: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pub headers: BTreeMap<Spanned<String>, Spanned<RawValueMatch>>,
    #[serde(default)]
    pub query: BTreeMap<Spanned<String>, Spanned<RawValueMatch>>,
    pub upstream: Option<Spanned<String>>,
    pub split: Option<Spanned<BTreeMap<Spanned<String>, Spanned<i64>>>>,
    pub redirect: Option<Spanned<RawRedirect>>,
    pub respond: Option<Spanned<RawRespond>>,
    pub timeout: Option<Spanned<String>>,
    pub request_headers: Option<Spanned<RawHeaderOps>>,
    pub response_headers: Option<Spanned<RawHeaderOps>>,
    pub rewrite_prefix: Option<Spanned<String>>,
    pub host_rewrite: Option<Spanned<String>>,
    pub idle_timeout: Option<Spanned<String>>,
    pub mirror: Option<Spanned<RawMirror>>,
    pub retries: Option<Spanned<i64>>,
    pub retry_on: Option<Vec<Spanned<String>>>,
    pub retry_non_idempotent: Option<bool>,
    pub policy: Option<Spanned<RawPolicy>>,
}

/// `"value"` (exact), `{ regex = "..." }` or `{ present = true }`.
#[derive(Debug)]
pub(crate) enum RawValueMatch {
    Exact(String),
    Table(RawValueMatchTable),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawValueMatchTable {
    pub regex: Option<String>,
    pub present: Option<bool>,
}

impl<'de> Deserialize<'de> for RawValueMatch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawValueMatch;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#""value", { regex = "..." } or { present = true }"#)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawValueMatch, E> {
                Ok(RawValueMatch::Exact(v.to_string()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawValueMatch, A::Error> {
                RawValueMatchTable::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(RawValueMatch::Table)
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMirror {
    pub upstream: Spanned<String>,
    pub percent: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRedirect {
    pub to: Option<String>,
    pub code: Option<i64>,
    pub scheme: Option<String>,
    pub host: Option<String>,
    pub path: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRespond {
    pub status: Option<i64>,
    #[serde(default)]
    pub body: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHeaderOps {
    #[serde(default)]
    pub set: BTreeMap<Spanned<String>, Spanned<String>>,
    #[serde(default)]
    pub add: BTreeMap<Spanned<String>, Spanned<String>>,
    #[serde(default)]
    pub remove: Vec<Spanned<String>>,
}
