//! Request authentication: API keys (header or query parameter), static bearer tokens, and
//! JWTs (HS256, or RS256 / ES256 keys from a JWKS). Keys and tokens are kept as SHA-256
//! digests, so lookups are hash probes that reveal nothing through timing.

use std::collections::HashSet;

use dispa_proto::config::model::{Auth, Jwt, JwtKey};
use http::{HeaderMap, HeaderName, HeaderValue};
use jsonwebtoken::jwk::AlgorithmParameters;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use sha2::{Digest, Sha256};

/// Why a request was not let in (never says which secret was close).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthError {
    /// No credentials at all.
    Missing,
    /// Credentials that are not valid.
    Invalid,
    /// A JWT that does not verify, or whose claims do not hold.
    InvalidToken,
}

impl AuthError {
    pub fn reason(self) -> &'static str {
        match self {
            AuthError::Missing => "auth_missing",
            AuthError::Invalid => "auth_invalid",
            AuthError::InvalidToken => "auth_invalid_token",
        }
    }

    /// The `WWW-Authenticate` challenge (RFC 6750 for bearer tokens).
    pub fn challenge(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            AuthError::Missing => "Bearer realm=\"dispa\"",
            AuthError::Invalid => "Bearer realm=\"dispa\", error=\"invalid_token\"",
            AuthError::InvalidToken => {
                "Bearer realm=\"dispa\", error=\"invalid_token\", error_description=\"the token is not valid\""
            }
        })
    }
}

/// Who a request proved to be.
#[derive(Debug, Default)]
pub struct Authenticated {
    /// Headers to set on the upstream request (forwarded JWT claims).
    pub forward: Vec<(HeaderName, HeaderValue)>,
}

type Digest32 = [u8; 32];

fn digest(s: &[u8]) -> Digest32 {
    Sha256::digest(s).into()
}

struct JwtVerifier {
    /// (kid, key, algorithm): HS256 has one unnamed key.
    keys: Vec<(Option<String>, DecodingKey, Algorithm)>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway_secs: u64,
    forward: Vec<(String, HeaderName)>,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("keys", &self.keys.len())
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish()
    }
}

/// An `[auth]` block compiled for checking requests.
#[derive(Debug)]
pub struct Authenticator {
    api_keys: HashSet<Digest32>,
    api_key_header: HeaderName,
    api_key_query: Option<String>,
    bearer: HashSet<Digest32>,
    jwt: Option<JwtVerifier>,
}

impl JwtVerifier {
    fn compile(j: &Jwt) -> Result<Self, String> {
        let keys = match &j.key {
            JwtKey::Hs256(s) => vec![(
                None,
                DecodingKey::from_secret(s.0.as_bytes()),
                Algorithm::HS256,
            )],
            JwtKey::Jwks(text) => {
                let set = dispa_proto::config::jwks::parse(text)?;
                let mut keys = Vec::new();
                for k in &set.keys {
                    let alg = match &k.algorithm {
                        AlgorithmParameters::RSA(_) => Algorithm::RS256,
                        AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
                        _ => return Err("JWKS: only RSA and EC keys are supported".into()),
                    };
                    let key = DecodingKey::from_jwk(k).map_err(|e| format!("JWKS key: {e}"))?;
                    keys.push((k.common.key_id.clone(), key, alg));
                }
                keys
            }
        };
        Ok(Self {
            keys,
            issuer: j.issuer.clone(),
            audience: j.audience.clone(),
            leeway_secs: j.leeway.as_secs(),
            forward: j
                .forward_claims
                .iter()
                .filter_map(|(c, h)| Some((c.clone(), HeaderName::from_bytes(h.as_bytes()).ok()?)))
                .collect(),
        })
    }

    fn verify(&self, token: &str) -> Result<Vec<(HeaderName, HeaderValue)>, AuthError> {
        // alg "none", unknown algorithms and malformed headers all fail here.
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::InvalidToken)?;
        let (_, key, alg) = self
            .keys
            .iter()
            .find(|(kid, _, alg)| {
                *alg == header.alg && (header.kid.is_none() || kid.is_none() || *kid == header.kid)
            })
            .ok_or(AuthError::InvalidToken)?;
        let mut v = Validation::new(*alg);
        v.leeway = self.leeway_secs;
        v.validate_nbf = true;
        v.set_required_spec_claims(&["exp"]);
        match &self.issuer {
            Some(i) => v.set_issuer(&[i]),
            None => v.iss = None,
        }
        match &self.audience {
            Some(a) => v.set_audience(&[a]),
            None => v.validate_aud = false,
        }
        let data = jsonwebtoken::decode::<serde_json::Value>(token, key, &v)
            .map_err(|_| AuthError::InvalidToken)?;
        let mut forward = Vec::new();
        for (claim, header) in &self.forward {
            let value = match data.claims.get(claim) {
                None => continue,
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
            };
            if let Ok(v) = HeaderValue::from_str(&value) {
                forward.push((header.clone(), v));
            }
        }
        Ok(forward)
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

impl Authenticator {
    pub fn compile(a: &Auth) -> Result<Self, String> {
        Ok(Self {
            api_keys: a.api_keys.iter().map(|k| digest(k.0.as_bytes())).collect(),
            api_key_header: HeaderName::from_bytes(a.api_key_header.as_bytes())
                .map_err(|_| format!("invalid api_key_header {:?}", a.api_key_header))?,
            api_key_query: a.api_key_query.clone(),
            bearer: a
                .bearer_tokens
                .iter()
                .map(|k| digest(k.0.as_bytes()))
                .collect(),
            jwt: a.jwt.as_ref().map(JwtVerifier::compile).transpose()?,
        })
    }

    /// Headers a client may not set itself: those that carry verified claims upstream.
    pub fn claim_headers(&self) -> impl Iterator<Item = &HeaderName> {
        self.jwt
            .iter()
            .flat_map(|j| j.forward.iter().map(|(_, h)| h))
    }

    /// The API key a request presents (not yet checked), for rate limiting by key.
    pub fn presented_key<'a>(
        &self,
        headers: &'a HeaderMap,
        query: Option<&'a str>,
    ) -> Option<&'a str> {
        headers
            .get(&self.api_key_header)
            .and_then(|v| v.to_str().ok())
            .or_else(|| {
                self.api_key_query
                    .as_deref()
                    .and_then(|q| query_param(query, q))
            })
    }

    /// Checks a request's credentials: any configured method that succeeds is enough.
    pub fn check(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
    ) -> Result<Authenticated, AuthError> {
        let mut presented = false;
        if !self.api_keys.is_empty()
            && let Some(k) = self.presented_key(headers, query)
        {
            presented = true;
            if self.api_keys.contains(&digest(k.as_bytes())) {
                return Ok(Authenticated::default());
            }
        }
        if let Some(token) = bearer(headers) {
            presented = true;
            if self.bearer.contains(&digest(token.as_bytes())) {
                return Ok(Authenticated::default());
            }
            if let Some(j) = &self.jwt {
                return j.verify(token).map(|forward| Authenticated { forward });
            }
        }
        Err(if presented {
            AuthError::Invalid
        } else {
            AuthError::Missing
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dispa_proto::config::model::Secret;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn auth(jwt: Option<Jwt>) -> Authenticator {
        Authenticator::compile(&Auth {
            api_keys: vec![Secret("key-123456789".into())],
            api_key_header: "x-api-key".into(),
            api_key_query: Some("api_key".into()),
            bearer_tokens: vec![Secret("static-token-1".into())],
            jwt,
        })
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn hs_jwt(audience: &str) -> Jwt {
        Jwt {
            key: JwtKey::Hs256(Secret(SECRET.into())),
            issuer: Some("https://issuer.test".into()),
            audience: Some(audience.into()),
            leeway: Duration::from_secs(5),
            forward_claims: vec![("sub".into(), "x-user".into())],
        }
    }

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }

    fn token(claims: serde_json::Value, alg: Algorithm, secret: &str) -> String {
        encode(
            &Header::new(alg),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap_or_else(|_| panic!()),
                v.parse().unwrap_or_else(|_| panic!()),
            );
        }
        h
    }

    #[test]
    fn api_keys_and_bearer_tokens() {
        let a = auth(None);
        assert!(
            a.check(&headers(&[("x-api-key", "key-123456789")]), None)
                .is_ok()
        );
        assert!(
            a.check(&HeaderMap::new(), Some("a=1&api_key=key-123456789"))
                .is_ok()
        );
        assert_eq!(
            a.check(&headers(&[("x-api-key", "nope")]), None)
                .unwrap_err(),
            AuthError::Invalid
        );
        assert!(
            a.check(
                &headers(&[("authorization", "Bearer static-token-1")]),
                None
            )
            .is_ok()
        );
        assert_eq!(
            a.check(&HeaderMap::new(), None).unwrap_err(),
            AuthError::Missing
        );
    }

    #[test]
    fn jwt_claims_are_checked() {
        let a = auth(Some(hs_jwt("api")));
        let good = serde_json::json!({"sub": "alice", "iss": "https://issuer.test", "aud": "api", "exp": now() + 60});
        let ok = a
            .check(
                &headers(&[(
                    "authorization",
                    &format!("Bearer {}", token(good.clone(), Algorithm::HS256, SECRET)),
                )]),
                None,
            )
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(ok.forward[0].1, "alice");
        let bad = |claims: serde_json::Value, secret: &str| {
            let t = token(claims, Algorithm::HS256, secret);
            a.check(&headers(&[("authorization", &format!("Bearer {t}"))]), None)
                .unwrap_err()
        };
        let mut expired = good.clone();
        expired["exp"] = serde_json::json!(now() - 60);
        assert_eq!(bad(expired, SECRET), AuthError::InvalidToken);
        let mut not_yet = good.clone();
        not_yet["nbf"] = serde_json::json!(now() + 60);
        assert_eq!(bad(not_yet, SECRET), AuthError::InvalidToken);
        let mut wrong_aud = good.clone();
        wrong_aud["aud"] = serde_json::json!("other");
        assert_eq!(bad(wrong_aud, SECRET), AuthError::InvalidToken);
        let mut wrong_iss = good.clone();
        wrong_iss["iss"] = serde_json::json!("https://evil.test");
        assert_eq!(bad(wrong_iss, SECRET), AuthError::InvalidToken);
        assert_eq!(
            bad(good.clone(), "another-secret-another-secret-000"),
            AuthError::InvalidToken
        );
        // alg=none: header {"alg":"none"}, no signature.
        let none = format!(
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.",
            base64_url(&good.to_string())
        );
        assert_eq!(
            a.check(
                &headers(&[("authorization", &format!("Bearer {none}"))]),
                None
            )
            .unwrap_err(),
            AuthError::InvalidToken
        );
    }

    #[test]
    fn rs256_from_a_jwks() {
        use base64::Engine;
        let fixture = include_str!("testdata/rs256-test-key.txt");
        let field = |k: &str| {
            fixture
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .unwrap_or_else(|| panic!("{k}"))
                .to_string()
        };
        let (n, der) = (field("N="), field("DER="));
        let der = base64::engine::general_purpose::STANDARD
            .decode(der)
            .unwrap_or_else(|e| panic!("{e}"));
        let jwks = serde_json::json!({"keys": [{"kty": "RSA", "kid": "r1", "alg": "RS256", "n": n, "e": "AQAB"}]});
        let a = auth(Some(Jwt {
            key: JwtKey::Jwks(jwks.to_string()),
            issuer: None,
            audience: Some("api".into()),
            leeway: Duration::from_secs(5),
            forward_claims: vec![],
        }));
        let claims = serde_json::json!({"sub": "carol", "aud": "api", "exp": now() + 60});
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some("r1".into());
        let t = encode(&header, &claims, &EncodingKey::from_rsa_der(&der))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            a.check(&headers(&[("authorization", &format!("Bearer {t}"))]), None)
                .is_ok()
        );
        // HS256 signed with the public modulus as the secret: algorithm confusion.
        let forged = token(claims, Algorithm::HS256, &n);
        assert_eq!(
            a.check(
                &headers(&[("authorization", &format!("Bearer {forged}"))]),
                None
            )
            .unwrap_err(),
            AuthError::InvalidToken
        );
    }

    fn base64_url(s: &str) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
    }
}
