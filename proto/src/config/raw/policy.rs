//! `[policy]` and `[routes.policy]` as written.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPolicy {
    pub allow: Option<Vec<Spanned<String>>>,
    pub deny: Option<Vec<Spanned<String>>>,
    /// Global only.
    pub trusted_proxies: Option<Spanned<Vec<Spanned<String>>>>,
    pub rate_limit: Option<Spanned<RawRateLimit>>,
    pub limits: Option<Spanned<RawLimits>>,
    pub auth: Option<Spanned<RawAuth>>,
    pub encoded_slashes: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRateLimit {
    pub per_second: Spanned<i64>,
    pub burst: Option<Spanned<i64>>,
    pub key: Option<Spanned<String>>,
}

/// A byte size: an integer, or a string like "10MiB".
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum RawSize {
    Int(i64),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLimits {
    pub max_header_count: Option<Spanned<i64>>,
    pub max_header_bytes: Option<Spanned<i64>>,
    pub max_uri_bytes: Option<Spanned<i64>>,
    pub max_body_bytes: Option<Spanned<RawSize>>,
    pub require_content_length: Option<Spanned<bool>>,
    pub header_timeout: Option<Spanned<String>>,
    pub idle_timeout: Option<Spanned<String>>,
    pub max_connections: Option<Spanned<i64>>,
    pub max_connections_per_ip: Option<Spanned<i64>>,
    pub h2_max_concurrent_streams: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAuth {
    pub api_keys: Option<Vec<Spanned<String>>>,
    pub api_key_header: Option<Spanned<String>>,
    pub api_key_query: Option<Spanned<String>>,
    pub bearer_tokens: Option<Vec<Spanned<String>>>,
    pub jwt: Option<Spanned<RawJwt>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawJwt {
    pub hs256_secret: Option<Spanned<String>>,
    pub jwks_file: Option<Spanned<String>>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway: Option<Spanned<String>>,
    /// claim -> request header.
    pub forward_claims: Option<BTreeMap<String, Spanned<String>>>,
}

impl RawPolicy {
    /// Byte ranges of every secret value (API keys, bearer tokens, HS256 secrets).
    pub fn secret_spans(&self, out: &mut Vec<std::ops::Range<usize>>) {
        let Some(auth) = &self.auth else { return };
        let auth = auth.get_ref();
        for v in auth
            .api_keys
            .iter()
            .chain(auth.bearer_tokens.iter())
            .flatten()
        {
            out.push(v.span());
        }
        if let Some(j) = &auth.jwt
            && let Some(s) = &j.get_ref().hs256_secret
        {
            out.push(s.span());
        }
    }

    /// The JWKS file, if any.
    pub fn jwks_file(&self) -> Option<&Spanned<String>> {
        self.auth
            .as_ref()?
            .get_ref()
            .jwt
            .as_ref()?
            .get_ref()
            .jwks_file
            .as_ref()
    }
}
