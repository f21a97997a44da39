//! routes.toml as written: serde structs that reject unknown keys and keep the span of every
//! value that validation may need to point at.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    #[serde(default)]
    pub upstreams: BTreeMap<Spanned<String>, RawUpstream>,
    #[serde(default)]
    pub routes: Vec<Spanned<RawRoute>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUpstream {
    pub balance: Option<Spanned<String>>,
    pub hash_on: Option<Spanned<String>>,
    pub endpoints: Spanned<Vec<Spanned<RawEndpoint>>>,
    pub connect_timeout: Option<Spanned<String>>,
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
    pub methods: Option<Vec<Spanned<String>>>,
    pub upstream: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
    pub request_headers: Option<Spanned<RawHeaderOps>>,
    pub response_headers: Option<Spanned<RawHeaderOps>>,
    pub rewrite_prefix: Option<Spanned<String>>,
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
