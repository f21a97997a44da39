//! PROXY protocol v1 (text) and v2 (binary) headers, as sent by L4 balancers (HAProxy, AWS NLB,
//! ...) before the client's bytes. [`parse`] is pure and total over any input (fuzzed);
//! [`read_header`] does the bounded, timed socket reads around it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// `PROXY ` ... `\r\n`, at most 107 bytes (the spec's bound).
const V1_MAX: usize = 107;
const V2_SIG: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];
/// Largest v2 address + TLV block accepted. The format allows 64 KiB; real balancers send a
/// few hundred bytes at most.
pub const V2_MAX_PAYLOAD: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("not a PROXY protocol header")]
    NotProxy,
    #[error("malformed PROXY v1 header")]
    BadV1,
    #[error("unsupported PROXY v2 version or command")]
    BadV2Command,
    #[error("PROXY v2 address block of {0} bytes is too long or too short")]
    BadV2Length(usize),
    #[error("connection closed before the PROXY header ended")]
    Eof,
    #[error("PROXY header not received within {0:?}")]
    Timeout(Duration),
    #[error("reading the PROXY header: {0}")]
    Io(String),
}

impl ProxyHeaderError {
    /// Short static label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            ProxyHeaderError::Timeout(_) => "timeout",
            ProxyHeaderError::Eof | ProxyHeaderError::Io(_) => "closed",
            _ => "malformed",
        }
    }
}

/// The outcome of parsing the start of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed.
    Incomplete,
    /// A whole header of `len` bytes. `source` is the client it declares; `None` for a v2
    /// LOCAL command (a balancer's own health check) or v1 `UNKNOWN`: keep the TCP peer.
    Complete {
        len: usize,
        source: Option<SocketAddr>,
    },
}

/// Parses a PROXY header at the start of `buf`. Never reads past the header.
pub fn parse(buf: &[u8]) -> Result<Parsed, ProxyHeaderError> {
    if buf.is_empty() {
        return Ok(Parsed::Incomplete);
    }
    if buf[0] == b'P' {
        parse_v1(buf)
    } else if buf[0] == V2_SIG[0] {
        parse_v2(buf)
    } else {
        Err(ProxyHeaderError::NotProxy)
    }
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, ProxyHeaderError> {
    let sig = b"PROXY ";
    let n = buf.len().min(sig.len());
    if buf[..n] != sig[..n] {
        return Err(ProxyHeaderError::NotProxy);
    }
    let Some(end) = buf.iter().take(V1_MAX).position(|&b| b == b'\n') else {
        return if buf.len() >= V1_MAX {
            Err(ProxyHeaderError::BadV1)
        } else {
            Ok(Parsed::Incomplete)
        };
    };
    // The line must end in CRLF; everything before it is ASCII.
    if end == 0 || buf[end - 1] != b'\r' {
        return Err(ProxyHeaderError::BadV1);
    }
    let line = std::str::from_utf8(&buf[..end - 1]).map_err(|_| ProxyHeaderError::BadV1)?;
    let mut parts = line.split(' ');
    let _proxy = parts.next();
    let proto = parts.next().ok_or(ProxyHeaderError::BadV1)?;
    let len = end + 1;
    if proto == "UNKNOWN" {
        // The rest of the line is ignored by the spec.
        return Ok(Parsed::Complete { len, source: None });
    }
    let fields: Vec<&str> = parts.collect();
    let [src, dst, sport, dport] = fields.as_slice() else {
        return Err(ProxyHeaderError::BadV1);
    };
    let ip = |s: &str| -> Result<IpAddr, ProxyHeaderError> {
        match proto {
            "TCP4" => s
                .parse::<Ipv4Addr>()
                .map(IpAddr::V4)
                .map_err(|_| ProxyHeaderError::BadV1),
            "TCP6" => s
                .parse::<Ipv6Addr>()
                .map(IpAddr::V6)
                .map_err(|_| ProxyHeaderError::BadV1),
            _ => Err(ProxyHeaderError::BadV1),
        }
    };
    // Ports are plain decimal without sign or leading zeros.
    let port = |s: &str| -> Result<u16, ProxyHeaderError> {
        if s.is_empty()
            || !s.bytes().all(|b| b.is_ascii_digit())
            || (s.len() > 1 && s.starts_with('0'))
        {
            return Err(ProxyHeaderError::BadV1);
        }
        s.parse().map_err(|_| ProxyHeaderError::BadV1)
    };
    let source = SocketAddr::new(ip(src)?, port(sport)?);
    ip(dst)?;
    port(dport)?;
    Ok(Parsed::Complete {
        len,
        source: Some(source),
    })
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, ProxyHeaderError> {
    let n = buf.len().min(V2_SIG.len());
    if buf[..n] != V2_SIG[..n] {
        return Err(ProxyHeaderError::NotProxy);
    }
    if buf.len() < 16 {
        return Ok(Parsed::Incomplete);
    }
    let ver_cmd = buf[12];
    let fam = buf[13];
    let payload = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if ver_cmd >> 4 != 2 {
        return Err(ProxyHeaderError::BadV2Command);
    }
    if payload > V2_MAX_PAYLOAD {
        return Err(ProxyHeaderError::BadV2Length(payload));
    }
    let len = 16 + payload;
    if buf.len() < len {
        return Ok(Parsed::Incomplete);
    }
    let body = &buf[16..len];
    match ver_cmd & 0x0F {
        // LOCAL: the balancer speaking for itself; the address block is ignored.
        0x0 => Ok(Parsed::Complete { len, source: None }),
        0x1 => {
            // PROXY: the address block by family; what follows it (TLVs) is skipped.
            let source = match fam >> 4 {
                0x1 => {
                    let a = body
                        .get(..12)
                        .ok_or(ProxyHeaderError::BadV2Length(payload))?;
                    let ip = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
                    Some(SocketAddr::new(ip.into(), u16::from_be_bytes([a[8], a[9]])))
                }
                0x2 => {
                    let a = body
                        .get(..36)
                        .ok_or(ProxyHeaderError::BadV2Length(payload))?;
                    let mut octets = [0u8; 16];
                    octets.copy_from_slice(&a[..16]);
                    let ip = Ipv6Addr::from(octets);
                    Some(SocketAddr::new(
                        ip.into(),
                        u16::from_be_bytes([a[32], a[33]]),
                    ))
                }
                // AF_UNSPEC or AF_UNIX: no IP to take; keep the TCP peer.
                _ => None,
            };
            Ok(Parsed::Complete { len, source })
        }
        _ => Err(ProxyHeaderError::BadV2Command),
    }
}

/// Reads a PROXY header from `io` within `timeout`. Returns the declared source (if any) and the
/// bytes read past the header, which belong to the client's stream.
pub async fn read_header<S: AsyncRead + Unpin>(
    io: &mut S,
    timeout: Duration,
) -> Result<(Option<SocketAddr>, Bytes), ProxyHeaderError> {
    let work = async {
        let mut buf = BytesMut::with_capacity(256);
        loop {
            if let Parsed::Complete { len, source } = parse(&buf)? {
                let rest = buf.split_off(len).freeze();
                return Ok((source, rest));
            }
            if buf.len() >= 16 + V2_MAX_PAYLOAD {
                return Err(ProxyHeaderError::BadV2Length(buf.len()));
            }
            // A read fills at most up to the longest possible header.
            let mut chunk = [0u8; 512];
            let want = (16 + V2_MAX_PAYLOAD - buf.len()).min(chunk.len());
            let n = io
                .read(&mut chunk[..want])
                .await
                .map_err(|e| ProxyHeaderError::Io(e.to_string()))?;
            if n == 0 {
                return Err(ProxyHeaderError::Eof);
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| ProxyHeaderError::Timeout(timeout))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
        let mut v = V2_SIG.to_vec();
        v.push(0x20 | cmd);
        v.push(fam);
        v.extend_from_slice(&(body.len() as u16).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn v1_tcp4_tcp6_unknown() {
        let h = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\nGET / HTTP/1.1\r\n";
        assert_eq!(
            parse(h),
            Ok(Parsed::Complete {
                len: 45,
                source: Some("192.0.2.1:56324".parse().unwrap())
            })
        );
        let h = b"PROXY TCP6 2001:db8::1 2001:db8::2 1000 80\r\n";
        assert_eq!(
            parse(h),
            Ok(Parsed::Complete {
                len: h.len(),
                source: Some("[2001:db8::1]:1000".parse().unwrap())
            })
        );
        let h = b"PROXY UNKNOWN ffff::1 whatever\r\n";
        assert_eq!(
            parse(h),
            Ok(Parsed::Complete {
                len: h.len(),
                source: None
            })
        );
        assert_eq!(parse(b"PROXY TCP4 1.2"), Ok(Parsed::Incomplete));
        assert_eq!(parse(b"PRO"), Ok(Parsed::Incomplete));
    }

    #[test]
    fn v1_rejects_malformed() {
        for bad in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 56324\r\n",
            b"PROXY TCP4 2001:db8::1 198.51.100.2 1 2\r\n",
            b"PROXY TCP6 192.0.2.1 198.51.100.2 1 2\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 +1 2\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 01 2\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 65536 2\r\n",
            b"PROXY TCP4  192.0.2.1 198.51.100.2 1 2\r\n",
            b"PROXY UDP4 192.0.2.1 198.51.100.2 1 2\r\n",
        ] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 200]].concat();
        assert_eq!(parse(&long), Err(ProxyHeaderError::BadV1));
    }

    #[test]
    fn v2_proxy_local_and_tlvs() {
        let mut body = vec![192, 0, 2, 1, 198, 51, 100, 2];
        body.extend_from_slice(&56324u16.to_be_bytes());
        body.extend_from_slice(&443u16.to_be_bytes());
        body.extend_from_slice(&[0x03, 0x00, 0x04, 1, 2, 3, 4]); // a CRC32c TLV, skipped
        let h = v2(1, 0x11, &body);
        let mut with_rest = h.clone();
        with_rest.extend_from_slice(b"GET /");
        assert_eq!(
            parse(&with_rest),
            Ok(Parsed::Complete {
                len: h.len(),
                source: Some("192.0.2.1:56324".parse().unwrap())
            })
        );
        assert_eq!(parse(&h[..h.len() - 1]), Ok(Parsed::Incomplete));
        let mut b6 = Vec::new();
        b6.extend_from_slice(&"2001:db8::7".parse::<Ipv6Addr>().unwrap().octets());
        b6.extend_from_slice(&[0; 16]);
        b6.extend_from_slice(&[0x1F, 0x90, 0, 80]);
        assert_eq!(
            parse(&v2(1, 0x21, &b6)),
            Ok(Parsed::Complete {
                len: 16 + 36,
                source: Some("[2001:db8::7]:8080".parse().unwrap())
            })
        );
        let local = v2(0, 0x00, &[]);
        assert_eq!(
            parse(&local),
            Ok(Parsed::Complete {
                len: 16,
                source: None
            })
        );
    }

    #[test]
    fn v2_rejects_malformed() {
        assert_eq!(
            parse(&v2(1, 0x11, &[1, 2, 3])),
            Err(ProxyHeaderError::BadV2Length(3))
        );
        assert_eq!(
            parse(&v2(2, 0x11, &[])),
            Err(ProxyHeaderError::BadV2Command)
        );
        let mut h = v2(1, 0x11, &[]);
        h[12] = 0x11; // version 1 in the binary format
        assert_eq!(parse(&h), Err(ProxyHeaderError::BadV2Command));
        let mut h = v2(1, 0x11, &[]);
        h[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
        assert_eq!(parse(&h), Err(ProxyHeaderError::BadV2Length(65535)));
        let mut h = V2_SIG.to_vec();
        h[3] = 0;
        assert_eq!(parse(&h), Err(ProxyHeaderError::NotProxy));
    }

    #[tokio::test]
    async fn read_header_keeps_the_bytes_after_it() {
        let (mut a, mut b) = tokio::io::duplex(64);
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let _ = a
                .write_all(b"PROXY TCP4 10.0.0.1 10.0.0.2 1234 80\r\nGET")
                .await;
        });
        let (src, rest) = read_header(&mut b, Duration::from_secs(5)).await.unwrap();
        assert_eq!(src, Some("10.0.0.1:1234".parse().unwrap()));
        assert_eq!(&rest[..], b"GET");
        let (_a, mut b) = tokio::io::duplex(64);
        let e = read_header(&mut b, Duration::from_millis(20))
            .await
            .unwrap_err();
        assert_eq!(e.reason(), "timeout");
    }
}
