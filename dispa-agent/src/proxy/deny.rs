//! Responses for requests the policy refuses: 403 (address), 429 (rate limit, with
//! Retry-After and RateLimit-* headers), 401 (credentials, with a WWW-Authenticate challenge).

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Response, StatusCode, header};
use http_body_util::{Either, Full};

use super::ProxyBody;
use crate::policy::{Denied, RoutePolicy};

pub fn response(d: Denied, policy: &RoutePolicy) -> Response<ProxyBody> {
    let (status, body) = match d {
        Denied::Address => (StatusCode::FORBIDDEN, "forbidden\n"),
        Denied::RateLimited(_) => (StatusCode::TOO_MANY_REQUESTS, "too many requests\n"),
        Denied::Auth(_) => (StatusCode::UNAUTHORIZED, "unauthorized\n"),
    };
    let mut r = Response::new(Either::Right(Full::new(Bytes::from_static(
        body.as_bytes(),
    ))));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    match d {
        Denied::Address => {}
        Denied::Auth(e) => {
            h.insert(header::WWW_AUTHENTICATE, e.challenge());
        }
        Denied::RateLimited(l) => {
            // Whole seconds, rounded up: a client waiting this long gets a token.
            let secs = l.retry_after.as_millis().div_ceil(1000).max(1);
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs as u64));
            if let Some(g) = &policy.rate {
                h.insert(
                    HeaderName::from_static("ratelimit-limit"),
                    HeaderValue::from(g.rule.burst),
                );
                h.insert(
                    HeaderName::from_static("ratelimit-remaining"),
                    HeaderValue::from_static("0"),
                );
                h.insert(
                    HeaderName::from_static("ratelimit-reset"),
                    HeaderValue::from(secs as u64),
                );
                if let Ok(v) = HeaderValue::from_str(&format!(
                    "{};w=1;burst={}",
                    g.rule.per_second, g.rule.burst
                )) {
                    h.insert(HeaderName::from_static("ratelimit-policy"), v);
                }
            }
        }
    }
    r
}
