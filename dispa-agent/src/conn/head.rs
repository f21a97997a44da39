//! HTTP/1 heads parsed by httparse, turned into `http` types without copying: the parse
//! records where each part lies in the read buffer, and once the head is split off that buffer
//! names are parsed and values become shared slices of it. Used by the own HTTP/1.1 server
//! path ([`super::h1`]) and the own upstream exchange (`upstream::exchange`).

use std::cell::RefCell;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Version};

use crate::telemetry::access_log::X_REQUEST_ID;

/// Where a header line's name and value lie in the head: (name start, end, value start, end).
pub type Line = (usize, usize, usize, usize);

/// The lines of one head; most heads fit inline, and nothing is zeroed per head.
pub type Lines = smallvec::SmallVec<[Line; 16]>;

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
        head.get(vs..ve)?;
        let value = HeaderValue::from_maybe_shared(head.slice(vs..ve)).ok()?;
        headers.append(name, value);
    }
    Some(headers)
}

/// An upstream response's end-to-end header fields as it sent them: its head's bytes and
/// where each field lies, hop-by-hop fields left out. Carried by the response's body
/// ([`CarriesFields`]) instead of parsed into its `HeaderMap` (each name matched and hashed,
/// each value sliced) only to be written out again: the own HTTP/1.1 writer (`conn::h1`)
/// copies them as they are, and whatever needs them in the map first calls [`materialize`].
/// A field in the map overrides those of the same name here, and so does the proxy's
/// X-Request-Id when set here (a response map allocated for that one field cost about 700
/// instructions per request). httparse accepts the same name (token) and value bytes as
/// `http`, so nothing passes here that the map would refuse. (Not in the response's extensions: their
/// map costs three allocations and two hashed lookups, a third of what this saves.)
pub struct RawFields {
    head: Bytes,
    lines: Lines,
    request_id: Option<HeaderValue>,
}

impl RawFields {
    pub fn new(head: Bytes, lines: Lines) -> Self {
        Self {
            head,
            lines,
            request_id: None,
        }
    }

    /// Sets the proxy's X-Request-Id, which replaces any the fields hold.
    pub fn set_request_id(&mut self, v: HeaderValue) {
        self.request_id = Some(v);
    }

    /// Each field's name and value, in the order sent.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.lines
            .iter()
            .filter_map(|&(ns, ne, vs, ve)| Some((self.head.get(ns..ne)?, self.head.get(vs..ve)?)))
    }

    /// The fields of `head`, a whole response head as sent (tests).
    #[cfg(test)]
    pub fn parsed(head: &'static [u8]) -> Self {
        let mut found = [httparse::EMPTY_HEADER; 16];
        let mut resp = httparse::Response::new(&mut found);
        assert!(
            resp.parse(head).is_ok_and(|s| s.is_complete()),
            "a whole head"
        );
        let lines = resp.headers.iter().map(|h| line(head, h)).collect();
        Self::new(Bytes::from_static(head), lines)
    }

    /// Appends the fields not overridden by a name in `headers`, each line as it was sent
    /// (httparse refuses folded lines, so a line is its name to its value's end).
    pub fn push_lines(&self, out: &mut Vec<u8>, headers: &HeaderMap) {
        let name = X_REQUEST_ID;
        let request_id = name.as_str().as_bytes();
        if let Some(v) = &self.request_id {
            push_field(out, request_id, v.as_bytes());
        }
        for &(ns, ne, _, ve) in &self.lines {
            let (Some(name), Some(line)) = (self.head.get(ns..ne), self.head.get(ns..ve)) else {
                continue;
            };
            if overridden(headers, name)
                || (self.request_id.is_some() && name.eq_ignore_ascii_case(request_id))
            {
                continue;
            }
            out.extend_from_slice(line);
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// A response body that may carry its response's header fields as sent.
pub trait CarriesFields {
    /// The fields, taken out; `None` if they are in the header map.
    fn take_fields(&mut self) -> Option<Box<RawFields>> {
        None
    }

    /// The fields, left in place; `None` if they are in the header map.
    fn fields_mut(&mut self) -> Option<&mut RawFields> {
        None
    }
}

// Bodies made whole by the agent (and by the request-path fuzz target) carry none.
impl CarriesFields for http_body_util::Full<Bytes> {}
impl CarriesFields for String {}

impl<L: CarriesFields, R: CarriesFields> CarriesFields for http_body_util::Either<L, R> {
    fn take_fields(&mut self) -> Option<Box<RawFields>> {
        match self {
            http_body_util::Either::Left(b) => b.take_fields(),
            http_body_util::Either::Right(b) => b.take_fields(),
        }
    }

    fn fields_mut(&mut self) -> Option<&mut RawFields> {
        match self {
            http_body_util::Either::Left(b) => b.fields_mut(),
            http_body_util::Either::Right(b) => b.fields_mut(),
        }
    }
}

/// Whether `headers` holds `name`: compared, not hashed, as the map holds a field or two.
fn overridden(headers: &HeaderMap, name: &[u8]) -> bool {
    headers
        .keys()
        .any(|k| k.as_str().as_bytes().eq_ignore_ascii_case(name))
}

/// Moves a response's [`RawFields`], if its body carries them, into its header map, behind
/// the fields the map holds (which override those of the same name).
pub fn materialize<B: CarriesFields>(resp: &mut http::Response<B>) {
    let Some(raw) = resp.body_mut().take_fields() else {
        return;
    };
    let headers = resp.headers_mut();
    if let Some(v) = raw.request_id {
        headers.insert(X_REQUEST_ID, v);
    }
    let set: smallvec::SmallVec<[HeaderName; 4]> = headers.keys().cloned().collect();
    headers.reserve(raw.lines.len());
    for &(ns, ne, vs, ve) in &raw.lines {
        let (Some(name), Some(_)) = (raw.head.get(ns..ne), raw.head.get(vs..ve)) else {
            continue;
        };
        let Ok(name) = HeaderName::from_bytes(name) else {
            continue;
        };
        if set.contains(&name) {
            continue;
        }
        if let Ok(value) = HeaderValue::from_maybe_shared(raw.head.slice(vs..ve)) {
            headers.append(name, value);
        }
    }
}

/// Appends `name: value` lines for every header in `headers`.
pub fn push_lines(out: &mut Vec<u8>, headers: &HeaderMap) {
    for (name, value) in headers {
        push_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
}

/// Appends one `name: value` line. Inlined, so that a name known at the call site is copied
/// as a constant (a loop over names makes a call to memcpy for each).
#[inline(always)]
pub fn push_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

thread_local! {
    /// Buffers heads are written into, reused by the thread's connections.
    static BUFS: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// Buffers kept per thread (a few heads are written at once at most).
const KEPT: usize = 8;

/// An empty buffer to write a head into, taken from the thread's and given back when dropped:
/// writing a head allocates nothing once the thread has written a few.
pub struct HeadBuf(Vec<u8>);

impl HeadBuf {
    pub fn take() -> Self {
        let mut v = BUFS.with_borrow_mut(Vec::pop).unwrap_or_default();
        v.clear();
        HeadBuf(v)
    }
}

impl std::ops::Deref for HeadBuf {
    type Target = Vec<u8>;

    fn deref(&self) -> &Vec<u8> {
        &self.0
    }
}

impl std::ops::DerefMut for HeadBuf {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.0
    }
}

impl Drop for HeadBuf {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.0);
        // A buffer grown by a large body chunk is not kept.
        if v.capacity() > 0 && v.capacity() <= 64 * 1024 {
            BUFS.with_borrow_mut(|b| {
                if b.len() < KEPT {
                    b.push(v);
                }
            });
        }
    }
}

thread_local! {
    /// The block header values the proxy makes per request are cut from.
    static VALUES: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}

/// Size of a block of values: a request id, a trace context and an address take ~100 bytes.
/// Small, because a value kept elsewhere keeps its whole block: an HTTP/2 connection's HPACK
/// table (4 KiB) indexes such values, about 50 of them, so at most ~25 KiB per connection.
const VALUES_BLOCK: usize = 512;

/// A header value holding `bytes`, cut from a block the serving thread shares between its
/// requests: `HeaderValue::from_bytes` allocates a copy, and the first clone of that copy
/// allocates again (its shared count); three such values per request were six of the
/// request's twenty allocations, and the small chunks outnumbered glibc's thread cache (a
/// block costs two allocations per four or five requests). A block is freed when its last
/// value is, or refilled in place when it is the last holder.
/// `None` if `bytes` is not a valid header value.
pub fn cut_value(bytes: &[u8]) -> Option<HeaderValue> {
    let cut = VALUES.with_borrow_mut(|block| {
        // `split` leaves the block empty, with what room is left.
        if block.capacity() < bytes.len() {
            block.reserve(VALUES_BLOCK.max(bytes.len()));
        }
        block.extend_from_slice(bytes);
        block.split().freeze()
    });
    HeaderValue::from_maybe_shared(cut).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_cut_from_a_block_keep_their_bytes_across_refills() {
        // More than a block's worth, all held, then some dropped and the block refilled.
        let mut held: Vec<(Vec<u8>, HeaderValue)> = (0..200u32)
            .map(|i| {
                let text = format!("{i:0>40}").into_bytes();
                let v = cut_value(&text).expect("valid");
                (text, v)
            })
            .collect();
        held.retain(|(t, _)| t[39] % 2 == 0);
        for i in 0..200u32 {
            let text = format!("again-{i}").into_bytes();
            let v = cut_value(&text).expect("valid");
            held.push((text, v));
        }
        for (text, v) in &held {
            assert_eq!(v.as_bytes(), &text[..]);
        }
        assert!(cut_value(b"bad\r\nvalue").is_none());
        assert_eq!(cut_value(b"").expect("empty is valid"), "");
    }

    #[test]
    fn raw_fields_are_written_as_sent_unless_the_map_overrides_them() {
        let fields = RawFields::parsed(
            b"HTTP/1.1 200 OK\r\nServer: up\r\nX-Request-Id: theirs\r\nVary: a\r\nVary: b\r\n\r\n",
        );
        let mut map = HeaderMap::new();
        map.insert("x-request-id", HeaderValue::from_static("ours"));
        let mut out = Vec::new();
        fields.push_lines(&mut out, &map);
        assert_eq!(out, b"Server: up\r\nVary: a\r\nVary: b\r\n");

        struct Carrier(Option<Box<RawFields>>);
        impl CarriesFields for Carrier {
            fn take_fields(&mut self) -> Option<Box<RawFields>> {
                self.0.take()
            }
        }
        let mut resp = http::Response::new(Carrier(Some(Box::new(fields))));
        resp.headers_mut()
            .insert("x-request-id", HeaderValue::from_static("ours"));
        materialize(&mut resp);
        assert!(resp.body().0.is_none());
        let h = resp.headers();
        assert_eq!(h["server"], "up");
        assert_eq!(
            h.get_all("x-request-id").iter().collect::<Vec<_>>(),
            ["ours"]
        );
        assert_eq!(h.get_all("vary").iter().collect::<Vec<_>>(), ["a", "b"]);
        // Without raw fields nothing changes.
        materialize(&mut resp);
        assert_eq!(resp.headers().len(), 4);

        // The proxy's request id, set beside the fields, replaces the upstream's, written or
        // put in the map.
        let mut fields =
            RawFields::parsed(b"HTTP/1.1 200 OK\r\nServer: up\r\nX-Request-Id: theirs\r\n\r\n");
        fields.set_request_id(HeaderValue::from_static("ours"));
        let mut out = Vec::new();
        fields.push_lines(&mut out, &HeaderMap::new());
        assert_eq!(out, b"x-request-id: ours\r\nServer: up\r\n");
        let mut resp = http::Response::new(Carrier(Some(Box::new(fields))));
        materialize(&mut resp);
        assert_eq!(
            resp.headers()
                .get_all("x-request-id")
                .iter()
                .collect::<Vec<_>>(),
            ["ours"]
        );
    }
}
