//! HTTP/1 heads parsed by httparse, turned into `http` types without copying: the parse
//! records where each part lies in the read buffer, and once the head is split off that buffer
//! names are parsed and values become shared slices of it. Used by the own HTTP/1.1 server
//! path ([`super::h1`]) and the own upstream exchange (`upstream::exchange`).

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Version};

/// Where a header line's name and value lie in the head: (name start, end, value start, end).
pub type Line = (usize, usize, usize, usize);

/// HTTP/1.0 for minor version 0, else HTTP/1.1 (httparse accepts no other).
pub fn version(minor: Option<u8>) -> Version {
    if minor == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    }
}

/// Where `part`, a slice httparse returned from a parse of `buf`, lies in `buf`.
pub fn span(buf: &[u8], part: &[u8]) -> (usize, usize) {
    let start = (part.as_ptr() as usize).saturating_sub(buf.as_ptr() as usize);
    (start, start + part.len())
}

/// A header line's place in `buf`.
pub fn line(buf: &[u8], h: &httparse::Header<'_>) -> Line {
    let (ns, ne) = span(buf, h.name.as_bytes());
    let (vs, ve) = span(buf, h.value);
    (ns, ne, vs, ve)
}

/// The header map of `head` from the places of its `lines`, with `room` for more; `None` if a
/// name or value is not one `http` accepts.
pub fn header_map(head: &Bytes, lines: &[Line], room: usize) -> Option<HeaderMap> {
    let mut headers = HeaderMap::with_capacity(lines.len() + room);
    for &(ns, ne, vs, ve) in lines {
        let name = HeaderName::from_bytes(head.get(ns..ne)?).ok()?;
        let value = HeaderValue::from_maybe_shared(head.slice(vs..ve.min(head.len()))).ok()?;
        headers.append(name, value);
    }
    Some(headers)
}
