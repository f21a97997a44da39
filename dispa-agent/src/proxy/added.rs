//! The fields the proxy adds to each request it forwards (X-Request-Id, traceparent,
//! X-Forwarded-For/-Proto/-Host), kept beside the client's header map instead of inserted
//! into it: each insert hashes its name and probes the map (about 260 instructions, five per
//! request), only for the own upstream exchange to write the map out again. The client's
//! fields of these names are removed from the map ([`super::headers::forward_fields`]), so the
//! upstream sees one of each, ours. Whatever needs them in a map gets them there with
//! [`Added::insert_into`]: hyper's client paths, mirrors, route request rules.

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::telemetry::access_log::{TRACEPARENT, X_REQUEST_ID};

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The names [`Added`] holds, in the order they are written.
pub const NAMES: [HeaderName; 5] = [
    X_REQUEST_ID,
    TRACEPARENT,
    X_FORWARDED_FOR,
    X_FORWARDED_PROTO,
    X_FORWARDED_HOST,
];

/// The proxy's own fields of one forwarded request, in the order of [`NAMES`]. Made with the
/// request's ids when it arrives (boxed, so the request futures carry a pointer, not 160
/// bytes); the forwarded fields are set once the request is routed, before it is sent.
#[derive(Debug)]
pub struct Added([HeaderValue; 5]);

impl Added {
    pub fn new(request_id: HeaderValue, traceparent: HeaderValue) -> Box<Self> {
        let unset = || HeaderValue::from_static("");
        Box::new(Added([request_id, traceparent, unset(), unset(), unset()]))
    }

    /// Sets X-Forwarded-For, -Proto and -Host.
    pub fn forwarded(&mut self, r#for: HeaderValue, proto: &'static str, host: HeaderValue) {
        self.0[2] = r#for;
        self.0[3] = HeaderValue::from_static(proto);
        self.0[4] = host;
    }

    /// The value of `name` (any case) if it is one of ours.
    pub fn get(&self, name: &str) -> Option<&HeaderValue> {
        NAMES
            .iter()
            .position(|n| n.as_str().eq_ignore_ascii_case(name))
            .map(|i| &self.0[i])
    }

    /// Puts the fields into `headers`, replacing any of the same names.
    pub fn insert_into(&self, headers: &mut HeaderMap) {
        for (n, v) in NAMES.iter().zip(&self.0) {
            headers.insert(n.clone(), v.clone());
        }
    }

    /// Appends a `name: value` line for each field. Spelled out, so that each name is a
    /// copy of known length (a loop over [`NAMES`] made ten calls to memcpy); the test checks
    /// the spelling against [`NAMES`].
    pub fn push_lines(&self, out: &mut Vec<u8>) {
        use crate::conn::head::push_field;
        let [id, tp, r#for, proto, host] = &self.0;
        out.reserve(96 + self.0.iter().map(HeaderValue::len).sum::<usize>());
        push_field(out, b"x-request-id", id.as_bytes());
        push_field(out, b"traceparent", tp.as_bytes());
        push_field(out, b"x-forwarded-for", r#for.as_bytes());
        push_field(out, b"x-forwarded-proto", proto.as_bytes());
        push_field(out, b"x-forwarded-host", host.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_as_lines_and_into_a_map_the_same() {
        let mut added = Added::new(
            HeaderValue::from_static("id1"),
            HeaderValue::from_static("00-tp"),
        );
        added.forwarded(
            HeaderValue::from_static("127.0.0.9"),
            "https",
            HeaderValue::from_static("api.example.com"),
        );
        let mut out = Vec::new();
        added.push_lines(&mut out);
        assert_eq!(
            out,
            b"x-request-id: id1\r\ntraceparent: 00-tp\r\nx-forwarded-for: 127.0.0.9\r\n\
              x-forwarded-proto: https\r\nx-forwarded-host: api.example.com\r\n"
        );
        // Written in the order and spelling of NAMES, which the map and `get` use.
        let written: Vec<&[u8]> = out
            .split(|&b| b == b'\n')
            .filter_map(|l| l.split(|&b| b == b':').next())
            .filter(|n| !n.is_empty())
            .collect();
        let all = NAMES;
        let names: Vec<&[u8]> = all.iter().map(|n| n.as_str().as_bytes()).collect();
        assert_eq!(written, names);
        let mut map = HeaderMap::new();
        map.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
        map.insert("x-kept", HeaderValue::from_static("1"));
        added.insert_into(&mut map);
        assert_eq!(map.len(), 6);
        assert_eq!(map["x-forwarded-for"], "127.0.0.9");
        assert_eq!(map["x-forwarded-proto"], "https");
        assert_eq!(added.get("x-forwarded-host").unwrap(), "api.example.com");
        assert_eq!(added.get("x-request-id").unwrap(), "id1");
        assert!(added.get("x-kept").is_none());
    }
}
