//! Header handling on the request path: Host, hop-by-hop stripping, X-Forwarded-*.

use http::{HeaderMap, HeaderName, HeaderValue, Request, header};

/// Hop-by-hop headers (RFC 9110 section 7.6.1), never forwarded. Parsed names: removing by
/// `&str` would parse the name again on every request.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

/// Other conventions for the client's address, port and path than X-Forwarded-*; dropped so
/// a client cannot spoof them past us.
const SPOOFABLE: [HeaderName; 5] = [
    header::FORWARDED,
    HeaderName::from_static("x-real-ip"),
    HeaderName::from_static("x-forwarded-port"),
    HeaderName::from_static("x-forwarded-prefix"),
    HeaderName::from_static("x-forwarded-server"),
];

use super::added::{self, Added, X_FORWARDED_FOR};

/// The request's host as sent: the URI authority (HTTP/2, absolute-form) or the Host header.
/// Shares the header's bytes (no copy per request); checked to be visible ASCII when made.
#[derive(Clone, Debug)]
pub struct RawHost(HeaderValue);

impl RawHost {
    /// A host as a client sent it: visible ASCII, not empty, no userinfo.
    pub fn new(v: HeaderValue) -> Option<Self> {
        let h = v.to_str().ok()?;
        (!h.is_empty() && !h.contains('@')).then_some(RawHost(v))
    }

    pub fn as_str(&self) -> &str {
        self.0.to_str().unwrap_or_default()
    }

    pub fn value(&self) -> &HeaderValue {
        &self.0
    }
}

pub fn request_host<B>(req: &Request<B>) -> Option<RawHost> {
    if let Some(a) = req.uri().authority() {
        // host and port only: userinfo ("user:pw@") is never part of the host.
        let s = match a.port() {
            Some(p) => format!("{}:{}", a.host(), p.as_str()),
            None => a.host().to_string(),
        };
        return HeaderValue::try_from(s).ok().and_then(RawHost::new);
    }
    RawHost::new(req.headers().get(header::HOST)?.clone())
}

/// The protocol an HTTP/1.1 request asks to upgrade to (`Connection: upgrade` + `Upgrade`).
pub fn upgrade_request<B>(req: &Request<B>) -> Option<HeaderValue> {
    let asks = req.version() == http::Version::HTTP_11
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if asks {
        req.headers().get(header::UPGRADE).cloned()
    } else {
        None
    }
}

/// Whether the client said `TE: trailers` (gRPC does).
pub fn wants_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
}

/// Whether a field name, as sent, is hop-by-hop: one of `HOP_BY_HOP` or
/// Transfer-Encoding, the names [`strip_hop_by_hop`] removes besides those Connection names.
pub fn is_hop_by_hop(name: &[u8]) -> bool {
    name.eq_ignore_ascii_case(header::TRANSFER_ENCODING.as_str().as_bytes())
        || HOP_BY_HOP
            .iter()
            .any(|h| name.eq_ignore_ascii_case(h.as_str().as_bytes()))
}

/// Removes hop-by-hop headers, including every header the Connection header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none of them, and most others only `Connection`.
    let found = present(headers, |k| {
        k == header::TRANSFER_ENCODING || HOP_BY_HOP.contains(k)
    });
    if found.is_empty() {
        return;
    }
    // "close" and "keep-alive" (what most peers send) name nothing to look up beyond the
    // fixed list: no Vec, no parsed name.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|n| !n.eq_ignore_ascii_case("close") && !n.eq_ignore_ascii_case("keep-alive"))
        .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    let mut coded = false;
    for n in found {
        coded |= n == header::TRANSFER_ENCODING;
        headers.remove(n);
    }
    // The sender's framing does not apply to the next hop, which re-frames the body; a
    // Content-Length beside a Transfer-Encoding is void (RFC 9112 section 6.3) and must not
    // travel on either.
    if coded {
        headers.remove(header::CONTENT_LENGTH);
    }
}

/// The names in `headers` that `wanted` picks, found by comparing names: each removal is a
/// hashed lookup, so only names known to be there are removed.
fn present(
    headers: &HeaderMap,
    wanted: impl Fn(&HeaderName) -> bool,
) -> smallvec::SmallVec<[HeaderName; 4]> {
    headers.keys().filter(|k| wanted(k)).cloned().collect()
}

/// Removes the names `wanted` picks from `headers`, looking up only those it holds.
fn remove_present(headers: &mut HeaderMap, wanted: impl Fn(&HeaderName) -> bool) {
    for n in present(headers, wanted) {
        headers.remove(n);
    }
}

/// Sets X-Forwarded-For/-Proto/-Host from what this agent saw, replacing client-sent values
/// (no peer is trusted to forward client addresses yet), and keeps the client's Host.
/// The X-Forwarded-For to send upstream: from a trusted peer, its chain with the peer added;
/// from anyone else, just the client's address (whatever it claimed is dropped).
pub fn forwarded_for(
    headers: &HeaderMap,
    peer: std::net::IpAddr,
    client: std::net::IpAddr,
    peer_trusted: bool,
) -> HeaderValue {
    let own = || {
        // Formatted on the stack, then cut from the thread's block of values.
        let mut buf = [0u8; 64];
        let len = match client.to_canonical() {
            // By hand: core's formatter costs about a microsecond per request here.
            std::net::IpAddr::V4(v4) => dotted_quad(v4, &mut buf),
            v6 => {
                let mut w = &mut buf[..];
                std::io::Write::write_fmt(&mut w, format_args!("{v6}")).map_err(|_| ())?;
                64 - w.len()
            }
        };
        crate::conn::head::cut_value(&buf[..len]).ok_or(())
    };
    if peer_trusted {
        let mut chain: Vec<&str> = headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        let peer = peer.to_canonical().to_string();
        chain.push(&peer);
        if let Ok(v) = HeaderValue::from_str(&chain.join(", ")) {
            return v;
        }
    }
    own().unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// `ip` in dotted-decimal form at the front of `out` (room for 15 bytes); returns its length.
fn dotted_quad(ip: std::net::Ipv4Addr, out: &mut [u8; 64]) -> usize {
    let mut n = 0;
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            out[n] = b'.';
            n += 1;
        }
        if octet >= 100 {
            out[n] = b'0' + octet / 100;
            n += 1;
        }
        if octet >= 10 {
            out[n] = b'0' + octet / 10 % 10;
            n += 1;
        }
        out[n] = b'0' + octet % 10;
        n += 1;
    }
    n
}

/// Sets the forwarded fields of `added` (X-Forwarded-For/-Proto/-Host from what this agent
/// saw) and removes from `headers` the client's fields of the names `added` holds and the
/// spoofable ones; keeps the client's Host.
pub fn forward_fields(
    headers: &mut HeaderMap,
    added: &mut Added,
    forwarded_for: HeaderValue,
    raw_host: &RawHost,
    scheme: &'static str,
) {
    remove_present(headers, |k| {
        SPOOFABLE.contains(k) || added::NAMES.contains(k)
    });
    // The Host header the client sent is usually `raw_host` already: not inserted again (an
    // insert reserves room first, even when it replaces).
    if headers.get(header::HOST) != Some(raw_host.value()) {
        headers.insert(header::HOST, raw_host.value().clone());
    }
    added.forwarded(forwarded_for, scheme, raw_host.value().clone());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dotted_quads_read_as_core_writes_them() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.30.40",
            "255.255.255.255",
            "1.100.9.99",
        ] {
            let ip: std::net::Ipv4Addr = ip.parse().unwrap();
            let mut buf = [0u8; 64];
            let n = dotted_quad(ip, &mut buf);
            assert_eq!(&buf[..n], ip.to_string().as_bytes());
        }
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, X-Secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("upgrade", HeaderValue::from_static("h2c"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
        // The same names, as sent, for fields that never enter a map.
        for n in [
            "Connection",
            "keep-alive",
            "TE",
            "Transfer-Encoding",
            "Upgrade",
        ] {
            assert!(is_hop_by_hop(n.as_bytes()), "{n}");
        }
        assert!(!is_hop_by_hop(b"X-Kept") && !is_hop_by_hop(b"Content-Length"));

        // A length beside a transfer coding goes with it; alone it stays.
        let mut h = HeaderMap::new();
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("content-length", HeaderValue::from_static("3"));
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty());
        h.insert("content-length", HeaderValue::from_static("3"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn userinfo_is_not_part_of_the_host() {
        let req = Request::get("http://user:pw@api.example.com:8080/")
            .body(())
            .unwrap();
        assert_eq!(
            request_host(&req).as_ref().map(RawHost::as_str),
            Some("api.example.com:8080")
        );
        let req = Request::get("/").header("host", "u@evil").body(()).unwrap();
        assert!(request_host(&req).is_none());
    }

    #[test]
    fn forwarded_headers_overwrite_spoofed_values() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
        h.insert("forwarded", HeaderValue::from_static("for=6.6.6.6"));
        h.insert("x-real-ip", HeaderValue::from_static("6.6.6.6"));
        let client: std::net::IpAddr = "127.0.0.9".parse().unwrap();
        // From an untrusted peer the client's claim is dropped.
        let xff = forwarded_for(&h, client, client, false);
        let host = RawHost::new(HeaderValue::from_static("api.example.com:8080")).unwrap();
        h.insert("x-request-id", HeaderValue::from_static("theirs"));
        let mut added = Added::new(
            HeaderValue::from_static("ours"),
            HeaderValue::from_static("00-tp"),
        );
        forward_fields(&mut h, &mut added, xff, &host, "http");
        // Only the Host is left in the map; ours travel beside it.
        assert_eq!(h.len(), 1);
        assert_eq!(h["host"], "api.example.com:8080");
        added.insert_into(&mut h);
        assert_eq!(h["x-forwarded-for"], "127.0.0.9");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "api.example.com:8080");
        assert_eq!(h["x-request-id"], "ours");
    }

    #[test]
    fn trusted_peers_extend_the_chain() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("198.51.100.7"));
        let peer: std::net::IpAddr = "10.1.0.1".parse().unwrap();
        let client: std::net::IpAddr = "198.51.100.7".parse().unwrap();
        assert_eq!(
            forwarded_for(&h, peer, client, true),
            "198.51.100.7, 10.1.0.1"
        );
    }
}
