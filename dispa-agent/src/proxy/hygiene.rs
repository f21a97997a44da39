//! Request hygiene, checked before a request is routed or forwarded: framing (from the
//! connection's tracker), method, URI length, path normalisation; then, once the route is known,
//! its encoded-slash, Content-Length and body-size rules. Pure functions over the request.
//!
//! The normalised path is the one routes match and the one sent upstream, so the agent and the
//! upstream never disagree about which resource was asked for.

use std::borrow::Cow;

use dispa_proto::config::model::{EncodedSlashes, Limits};
use http::{HeaderMap, Request, StatusCode, Uri, header};

use crate::conn::{Framing, HeadError};

/// Why a request is refused before it reaches an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("{0}")]
    Framing(HeadError),
    #[error("request target too long")]
    UriTooLong,
    #[error("invalid method")]
    BadMethod,
    #[error("invalid path")]
    BadPath,
    #[error("encoded slash in path")]
    EncodedSlash,
    #[error("Content-Length required")]
    LengthRequired,
    #[error("request body too large")]
    BodyTooLarge,
    #[error("invalid request body")]
    BadBody,
}

impl Rejection {
    pub fn status(self) -> StatusCode {
        match self {
            Rejection::UriTooLong => StatusCode::URI_TOO_LONG,
            Rejection::LengthRequired => StatusCode::LENGTH_REQUIRED,
            Rejection::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Rejection::Framing(HeadError::TooLarge) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    /// Short static label: the `denied_requests` reason and the access log's denial reason.
    pub fn reason(self) -> &'static str {
        match self {
            Rejection::Framing(e) => e.reason(),
            Rejection::UriTooLong => "uri_too_long",
            Rejection::BadMethod => "bad_method",
            Rejection::BadPath => "bad_path",
            Rejection::EncodedSlash => "encoded_slash",
            Rejection::LengthRequired => "length_required",
            Rejection::BodyTooLarge => "body_too_large",
            Rejection::BadBody => "bad_body",
        }
    }

    /// Body of the agent's answer; names no internals.
    pub fn body(self) -> &'static str {
        match self {
            Rejection::UriTooLong => "request target too long\n",
            Rejection::LengthRequired => "Content-Length required\n",
            Rejection::BodyTooLarge => "request body too large\n",
            Rejection::Framing(HeadError::TooLarge) => "request header fields too large\n",
            _ => "bad request\n",
        }
    }

    /// Whether the connection must close after the answer: anything that may have left the
    /// byte stream in doubt, and an unread body.
    pub fn closes(self) -> bool {
        !matches!(
            self,
            Rejection::EncodedSlash | Rejection::UriTooLong | Rejection::BadPath
        )
    }
}

/// Checks made before routing; rewrites the request's path to its normal form.
pub fn check_request<B>(req: &mut Request<B>, limits: &Limits) -> Result<(), Rejection> {
    if let Some(Framing(Err(e))) = req.extensions().get::<Framing>() {
        return Err(Rejection::Framing(*e));
    }
    if !req.method().as_str().bytes().all(is_tchar) {
        return Err(Rejection::BadMethod);
    }
    let uri_len = req.uri().path_and_query().map_or(0, |p| p.as_str().len())
        + req.uri().authority().map_or(0, |a| a.as_str().len());
    if uri_len > usize::try_from(limits.max_uri_bytes).unwrap_or(usize::MAX) {
        return Err(Rejection::UriTooLong);
    }
    // HTTP/1 heads had their framing checked byte for byte (the framing tracker, or the own
    // path, which hands any head with a Content-Length to hyper and so to the tracker).
    if req.version() >= http::Version::HTTP_2 {
        check_lengths(req.headers())?;
    }
    if let Cow::Owned(path) = normalize_path(req.uri().path())? {
        let pq = match req.uri().query() {
            Some(q) => format!("{path}?{q}"),
            None => path,
        };
        let mut parts = req.uri().clone().into_parts();
        parts.path_and_query = Some(pq.parse().map_err(|_| Rejection::BadPath)?);
        *req.uri_mut() = Uri::from_parts(parts).map_err(|_| Rejection::BadPath)?;
    }
    Ok(())
}

/// HTTP/2 carries its own framing, but a Content-Length it forwards must still be single and
/// numeric (HTTP/1 heads were checked byte for byte already).
fn check_lengths(h: &HeaderMap) -> Result<(), Rejection> {
    let mut lengths = h.get_all(header::CONTENT_LENGTH).iter();
    if let Some(v) = lengths.next()
        && (lengths.next().is_some() || crate::conn::framing::parse_length(v.as_bytes()).is_none())
    {
        return Err(Rejection::Framing(HeadError::BadLength));
    }
    Ok(())
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~".contains(&b)
}

/// The normal form of an origin-form path: percent-encoded unreserved characters decoded
/// (`%7E` -> `~`), other escapes upper-cased and kept (`%2f` -> `%2F`, never a separator),
/// repeated slashes merged, `.` and `..` segments removed (never above the root).
/// Malformed escapes are refused. Paths not starting with `/` (`*`, authority form) are kept.
pub fn normalize_path(path: &str) -> Result<Cow<'_, str>, Rejection> {
    if !path.starts_with('/') || is_normal(path) {
        return Ok(Cow::Borrowed(path));
    }
    let b = path.as_bytes();
    let mut decoded: Vec<u8> = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3).ok_or(Rejection::BadPath)?;
            let v = std::str::from_utf8(hex)
                .ok()
                .filter(|h| h.bytes().all(|c| c.is_ascii_hexdigit()))
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or(Rejection::BadPath)?;
            if is_unreserved(v) {
                decoded.push(v);
            } else {
                decoded.push(b'%');
                decoded.extend(hex.iter().map(u8::to_ascii_uppercase));
            }
            i += 3;
        } else {
            decoded.push(b[i]);
            i += 1;
        }
    }
    // Only ASCII was decoded, so this cannot fail; refuse rather than panic if it did.
    let decoded = String::from_utf8(decoded).map_err(|_| Rejection::BadPath)?;
    // Segments after merging slashes; a trailing slash is kept.
    let trailing = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    let mut out: Vec<&str> = Vec::new();
    for seg in decoded.split('/').filter(|s| !s.is_empty()) {
        match seg {
            "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut norm = String::with_capacity(decoded.len());
    for s in &out {
        norm.push('/');
        norm.push_str(s);
    }
    if trailing || out.is_empty() {
        norm.push('/');
    }
    Ok(if norm == path {
        Cow::Borrowed(path)
    } else {
        Cow::Owned(norm)
    })
}

/// Already normal: nothing escaped, no empty, `.` or `..` segment (most paths). One pass over
/// the bytes: string searches and a split cost several times as much on this per-request path.
fn is_normal(path: &str) -> bool {
    // Within the segment being read: its length, how many of its bytes are dots, and whether
    // the byte before was a slash.
    let (mut len, mut dots, mut after_slash) = (0usize, 0usize, false);
    let dot_segment = |len: usize, dots: usize| len == dots && (len == 1 || len == 2);
    for &b in path.as_bytes() {
        match b {
            b'%' => return false,
            b'/' => {
                if after_slash || dot_segment(len, dots) {
                    return false;
                }
                (len, dots, after_slash) = (0, 0, true);
            }
            _ => {
                len += 1;
                dots += usize::from(b == b'.');
                after_slash = false;
            }
        }
    }
    !dot_segment(len, dots)
}

/// A route's body and path rules, from its effective policy (`[routes.policy]` over `[policy]`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RouteHygiene {
    pub max_body_bytes: Option<u64>,
    pub require_content_length: bool,
    pub encoded_slashes: EncodedSlashes,
}

impl From<&crate::policy::RoutePolicy> for RouteHygiene {
    /// The route's effective policy already has the global values merged in.
    fn from(p: &crate::policy::RoutePolicy) -> Self {
        Self {
            max_body_bytes: p.max_body_bytes,
            require_content_length: p.require_content_length,
            encoded_slashes: p.encoded_slashes,
        }
    }
}

impl RouteHygiene {
    /// Checks made once the route is known. `has_body`: the request has a body whose length
    /// the head does not declare (chunked, or HTTP/2 without Content-Length).
    pub fn check<B>(&self, req: &Request<B>, has_body: bool) -> Result<(), Rejection> {
        if self.encoded_slashes == EncodedSlashes::Reject && req.uri().path().contains("%2F") {
            return Err(Rejection::EncodedSlash);
        }
        // Looked up only when a setting asks: most routes set neither.
        let wants = (self.require_content_length && has_body) || self.max_body_bytes.is_some();
        if !wants {
            return Ok(());
        }
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| crate::conn::framing::parse_length(v.as_bytes()));
        if self.require_content_length && declared.is_none() && has_body {
            return Err(Rejection::LengthRequired);
        }
        if let (Some(max), Some(n)) = (self.max_body_bytes, declared)
            && n > max
        {
            return Err(Rejection::BodyTooLarge);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dispa_proto::config::model::DEFAULT_LIMITS;

    #[test]
    fn the_one_pass_normal_check_agrees_with_its_definition() {
        let defined = |p: &str| {
            !p.contains('%') && !p.contains("//") && p.split('/').all(|s| s != "." && s != "..")
        };
        for p in [
            "", "/", "//", "/a", "/a/", "/a//b", "/.", "/..", "/...", "/./", "/../", "/a/.",
            "/a/..", "/a/.../b", "/.a", "/a.", "/..a/", "/a/%41", "%", "/a/b/c.d", ".", "..",
            "a/b", "/a/./b", "/a/../b", "/a/b//",
        ] {
            assert_eq!(is_normal(p), defined(p), "{p:?}");
        }
    }

    #[test]
    fn paths_are_normalised() {
        for (input, want) in [
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("//a///b", "/a/b"),
            ("/a/./b/../c", "/a/c"),
            ("/../../etc/passwd", "/etc/passwd"),
            ("/a/%2e%2E/b", "/b"),
            ("/%7Euser/%41", "/~user/A"),
            ("/a%2fb", "/a%2Fb"),
            ("/a%2F..%2Fb", "/a%2F..%2Fb"),
            ("/a/b/", "/a/b/"),
            ("/a/b/..", "/a/"),
            ("/a/.", "/a/"),
            ("/%20x", "/%20x"),
            ("*", "*"),
        ] {
            assert_eq!(normalize_path(input).unwrap(), want, "{input}");
        }
        for bad in ["/%", "/%4", "/%zz", "/a%G1"] {
            assert_eq!(normalize_path(bad), Err(Rejection::BadPath), "{bad}");
        }
    }

    #[test]
    fn requests_are_checked_and_rewritten() {
        let mut req = Request::get("/v1//x/../users?q=/../a").body(()).unwrap();
        check_request(&mut req, &DEFAULT_LIMITS).unwrap();
        assert_eq!(req.uri(), "/v1/users?q=/../a");
        let long = format!("/{}", "a".repeat(9000));
        let mut req = Request::get(long.as_str()).body(()).unwrap();
        assert_eq!(
            check_request(&mut req, &DEFAULT_LIMITS),
            Err(Rejection::UriTooLong)
        );
        // HTTP/2's lengths are checked here; HTTP/1's by the framing tracker, whose verdict
        // arrives in the extensions (below).
        let mut req = Request::post("/")
            .version(http::Version::HTTP_2)
            .header("content-length", "5")
            .header("content-length", "5")
            .body(())
            .unwrap();
        assert_eq!(
            check_request(&mut req, &DEFAULT_LIMITS),
            Err(Rejection::Framing(HeadError::BadLength))
        );
        let mut req = Request::get("/").body(()).unwrap();
        req.extensions_mut()
            .insert(Framing(Err(HeadError::LengthAndChunked)));
        assert_eq!(
            check_request(&mut req, &DEFAULT_LIMITS).map_err(Rejection::reason),
            Err("length_and_chunked")
        );
    }

    #[test]
    fn route_rules_apply() {
        let h = RouteHygiene {
            max_body_bytes: Some(100),
            require_content_length: true,
            encoded_slashes: EncodedSlashes::Reject,
        };
        let req = Request::get("/a%2Fb").body(()).unwrap();
        assert_eq!(h.check(&req, false), Err(Rejection::EncodedSlash));
        let req = Request::post("/").body(()).unwrap();
        assert_eq!(h.check(&req, true), Err(Rejection::LengthRequired));
        assert_eq!(h.check(&req, false), Ok(()));
        let req = Request::post("/")
            .header("content-length", "101")
            .body(())
            .unwrap();
        assert_eq!(h.check(&req, false), Err(Rejection::BodyTooLarge));
        assert_eq!(RouteHygiene::default().check(&req, true), Ok(()));
    }
}
