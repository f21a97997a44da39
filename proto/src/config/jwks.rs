//! JWKS documents (RFC 7517) for JWT verification: checked at validate time, so an agent never
//! receives keys it cannot use.

use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};

/// Why a JWKS file cannot be used.
pub fn check(text: &str) -> Result<(), String> {
    let set = parse(text)?;
    if set.keys.is_empty() {
        return Err("the JWKS has no keys".into());
    }
    for (i, k) in set.keys.iter().enumerate() {
        match &k.algorithm {
            AlgorithmParameters::RSA(_) | AlgorithmParameters::EllipticCurve(_) => {}
            _ => {
                return Err(format!(
                    "keys[{i}]: only RSA (RS256) and EC (ES256) keys are supported"
                ));
            }
        }
        jsonwebtoken::DecodingKey::from_jwk(k).map_err(|e| format!("keys[{i}]: {e}"))?;
    }
    Ok(())
}

pub fn parse(text: &str) -> Result<JwkSet, String> {
    serde_json::from_str(text).map_err(|e| format!("not a JWKS document ({e})"))
}
