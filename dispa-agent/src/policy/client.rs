//! The client's address: the connection's peer (which the PROXY protocol may already have
//! replaced), or, when that peer is a trusted proxy, the rightmost untrusted address of
//! X-Forwarded-For.

use std::net::IpAddr;

use dispa_proto::config::model::Cidr;
use http::HeaderMap;

/// Most X-Forwarded-For entries looked at; a longer chain is cut from the left.
const MAX_HOPS: usize = 32;

pub fn is_trusted(ip: IpAddr, trusted: &[Cidr]) -> bool {
    trusted.iter().any(|c| c.contains(ip))
}

/// Who the request is from. X-Forwarded-For counts only when `peer` is trusted; then the chain
/// is walked from the right, skipping trusted hops, and the first untrusted address wins. An
/// entry that is not an address ends the walk at the hop that added it.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[Cidr]) -> IpAddr {
    let peer = peer.to_canonical();
    if !is_trusted(peer, trusted) {
        return peer;
    }
    let mut hops: Vec<&str> = Vec::new();
    for v in headers.get_all("x-forwarded-for") {
        let Ok(s) = v.to_str() else { return peer };
        hops.extend(s.split(',').map(str::trim).filter(|h| !h.is_empty()));
    }
    let mut client = peer;
    for hop in hops.iter().rev().take(MAX_HOPS) {
        let Some(ip) = parse_hop(hop) else { break };
        client = ip;
        if !is_trusted(ip, trusted) {
            break;
        }
    }
    client
}

/// An X-Forwarded-For entry: an address, `[v6]`, or either with a port.
fn parse_hop(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    if let Ok(sa) = s.parse::<std::net::SocketAddr>() {
        return Some(sa.ip().to_canonical());
    }
    s.strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .and_then(|v| v.parse::<IpAddr>().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or_else(|_| panic!("{s}"))
    }

    fn xff(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            v.parse().unwrap_or_else(|_| panic!("{v}")),
        );
        h
    }

    #[test]
    fn trusts_only_trusted_peers_and_takes_rightmost_untrusted() {
        let trusted = [
            Cidr::parse("10.1.0.0/16").unwrap_or_else(|e| panic!("{e}")),
            Cidr::parse("127.0.0.1").unwrap_or_else(|e| panic!("{e}")),
        ];
        // Untrusted peer: the header is ignored, whatever it says.
        assert_eq!(
            client_ip(ip("203.0.113.9"), &xff("1.2.3.4"), &trusted),
            ip("203.0.113.9")
        );
        // Trusted peer: the rightmost untrusted entry, skipping trusted hops.
        assert_eq!(
            client_ip(
                ip("127.0.0.1"),
                &xff("6.6.6.6, 198.51.100.7, 10.1.2.3"),
                &trusted
            ),
            ip("198.51.100.7")
        );
        // Everything trusted: the leftmost.
        assert_eq!(
            client_ip(ip("127.0.0.1"), &xff("10.1.0.5"), &trusted),
            ip("10.1.0.5")
        );
        // No header: the peer.
        assert_eq!(
            client_ip(ip("127.0.0.1"), &HeaderMap::new(), &trusted),
            ip("127.0.0.1")
        );
        // Garbage stops the walk at the last good hop.
        assert_eq!(
            client_ip(ip("127.0.0.1"), &xff("1.1.1.1, junk, 10.1.0.9"), &trusted),
            ip("10.1.0.9")
        );
        // Ports and brackets.
        assert_eq!(
            client_ip(ip("127.0.0.1"), &xff("[2001:db8::1]:443"), &trusted),
            ip("2001:db8::1")
        );
        // Several header lines form one list.
        let mut h = xff("9.9.9.9");
        h.append(
            "x-forwarded-for",
            "8.8.8.8".parse().unwrap_or_else(|_| panic!()),
        );
        assert_eq!(client_ip(ip("127.0.0.1"), &h, &trusted), ip("8.8.8.8"));
        // Mapped IPv4 peers count as IPv4.
        assert_eq!(
            client_ip(ip("::ffff:127.0.0.1"), &xff("5.5.5.5"), &trusted),
            ip("5.5.5.5")
        );
    }
}
