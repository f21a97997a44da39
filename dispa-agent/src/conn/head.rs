//! HTTP/1 heads parsed by httparse, turned into `http` types without copying: the parse
//! records where each part lies in the read buffer, and once the head is split off that buffer
//! names are parsed and values become shared slices of it. Used by the own HTTP/1.1 server
//! path ([`super::h1`]) and the own upstream exchange (`upstream::exchange`).

use std::cell::RefCell;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Version};

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

/// Appends `name: value` lines for every header in `headers`.
pub fn push_lines(out: &mut Vec<u8>, headers: &HeaderMap) {
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
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
const VALUES_BLOCK: usize = 4096;

/// A header value holding `bytes`, cut from a block the serving thread shares between its
/// requests: `HeaderValue::from_bytes` allocates a copy, and the first clone of that copy
/// allocates again (its shared count); three such values per request were six of the
/// request's twenty allocations, and the small chunks outnumbered glibc's thread cache. A
/// block is freed when its last value is, or refilled in place when it is the last holder.
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
}
