//! The agent's own HTTP/1.1 exchange with a plaintext upstream, for a request without a body
//! that asks for no upgrade (most proxied requests): the head is written and the response head
//! read from the request's own task, and the response body reads straight from the connection,
//! which goes back to its thread's idle list when the body ends. hyper's client connection
//! (in [`super::h1`]) runs a task per connection and passes every exchange through a channel
//! to it; it stays the path for request bodies, upgrades and TLS upstreams.

use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Weak;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::h1::H1Conns;
use crate::conn::chunked::{Chunked, Next};
use crate::conn::head::{self, HeadBuf};
use crate::proxy::headers::is_hop_by_hop;

/// Largest response head read; hyper's client allows about as much by default.
const MAX_HEAD: usize = 64 * 1024;
/// Header lines in a response head.
const MAX_HEADERS: usize = 100;
/// First read of a response; the head and a small body fit.
const READ_SIZE: usize = 8 * 1024;
/// Body reads past what came with the head.
const BODY_READ: usize = 64 * 1024;

/// Whether a request can take this path.
pub fn suits<B: Body>(req: &Request<B>) -> bool {
    use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING, UPGRADE};
    // One pass comparing the few names, not three hashed lookups.
    req.body().is_end_stream()
        && req.method() != Method::CONNECT
        && !req
            .headers()
            .keys()
            .any(|k| k == UPGRADE || k == CONTENT_LENGTH || k == TRANSFER_ENCODING)
}

/// An upstream connection of the own exchange, with its read buffer (kept with it while it
/// idles, so an exchange on a kept connection allocates none).
pub struct Raw {
    pub(super) conn: TcpStream,
    buf: BytesMut,
}

impl Raw {
    pub fn new(conn: TcpStream) -> Self {
        Self {
            conn,
            buf: BytesMut::new(),
        }
    }
}

/// The request head as it goes on the wire: origin form, HTTP/1.1, the proxy's `added`
/// fields after the request's own.
pub fn encode<B>(req: &Request<B>, added: Option<&crate::proxy::Added>) -> HeadBuf {
    let mut out = HeadBuf::take();
    out.extend_from_slice(req.method().as_str().as_bytes());
    out.push(b' ');
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    head::push_lines(&mut out, req.headers());
    if let Some(a) = added {
        a.push_lines(&mut out);
    }
    // A method whose requests carry a body says this one is empty (as hyper does).
    if matches!(req.method().as_str(), "POST" | "PUT" | "PATCH") {
        out.extend_from_slice(b"content-length: 0\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Why an exchange failed.
#[derive(Debug)]
pub enum Failed {
    /// A kept connection was closed before any of the response arrived: the request may be
    /// sent again on a new one.
    Stale(io::Error),
    Io(io::Error),
}

impl Failed {
    pub fn into_io(self) -> io::Error {
        match self {
            Failed::Stale(e) | Failed::Io(e) => e,
        }
    }
}

fn invalid(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// Writes `head` on `conn` and reads the response head. `home`: where the connection goes
/// back when the response body ends.
pub async fn round_trip(
    raw: Raw,
    head: &[u8],
    method_head: bool,
    home: (Weak<H1Conns>, SocketAddr),
) -> Result<Response<OwnBody>, Failed> {
    let Raw { mut conn, mut buf } = raw;
    if let Err(e) = conn.write_all(head).await {
        return Err(Failed::Stale(e));
    }
    buf.clear();
    let mut got_any = false;
    loop {
        if buf.capacity() - buf.len() < READ_SIZE / 4 {
            buf.reserve(READ_SIZE);
        }
        match conn.read_buf(&mut buf).await {
            Ok(0) if !got_any => return Err(Failed::Stale(io::ErrorKind::UnexpectedEof.into())),
            Ok(0) => {
                return Err(Failed::Io(invalid(
                    "upstream closed inside a response head",
                )));
            }
            Ok(_) => got_any = true,
            Err(e) if !got_any => return Err(Failed::Stale(e)),
            Err(e) => return Err(Failed::Io(e)),
        }
        loop {
            match parse(&mut buf, method_head).map_err(Failed::Io)? {
                Parsed::Partial if buf.len() >= MAX_HEAD => {
                    return Err(Failed::Io(invalid("upstream response head too large")));
                }
                Parsed::Partial => break,
                // 1xx (but 101) are informational: the real response follows.
                Parsed::Informational => continue,
                Parsed::Response(parts, framing, reuse) => {
                    let (fields, headers) = match parts.2 {
                        Fields::Raw(raw) => (Some(raw), HeaderMap::new()),
                        Fields::Map(map) => (None, map),
                    };
                    let body = OwnBody {
                        conn: Some(conn),
                        buf,
                        framing,
                        reuse,
                        home,
                        fields,
                    };
                    let mut resp = Response::new(body);
                    *resp.status_mut() = parts.0;
                    *resp.version_mut() = parts.1;
                    *resp.headers_mut() = headers;
                    // A response without a body hands its connection back at once.
                    resp.body_mut().finish_if_done();
                    return Ok(resp);
                }
            }
        }
    }
}

enum Parsed {
    Partial,
    Informational,
    Response((StatusCode, Version, Fields), Framing, bool),
}

/// A response's header fields: as sent, or in a map when they needed changes beyond leaving
/// out the hop-by-hop ones (a Content-Length void beside a coding, repeated lengths, fields
/// Connection names). Boxed: the places of the fields take half a kilobyte, moved with the
/// response otherwise.
enum Fields {
    Raw(Box<head::RawFields>),
    Map(HeaderMap),
}

/// Parses a response head from the front of `buf`, taking it out when whole.
fn parse(buf: &mut BytesMut, method_head: bool) -> io::Result<Parsed> {
    let mut parsed = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        buf,
        &mut parsed,
    ) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(_) => return Err(invalid("malformed upstream response head")),
    };
    let code = resp.code.unwrap_or(0);
    let status = StatusCode::from_u16(code).map_err(|_| invalid("invalid upstream status"))?;
    if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
        buf.advance(len);
        return Ok(Parsed::Informational);
    }
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Err(invalid("upstream switched protocols unasked"));
    }
    let version = head::version(resp.version);
    let mut reuse = version == Version::HTTP_11;
    let mut close = false;
    let mut lengths = 0;
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut coded = false;
    let mut lines = head::Lines::new();
    // Hop-by-hop fields seen, and whether Connection names fields of its own (rare: those
    // are removed from the header map, as before).
    let (mut hop, mut names_fields) = (false, false);
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = crate::conn::framing::parse_length(h.value.trim_ascii())
                .ok_or_else(|| invalid("invalid upstream Content-Length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(invalid("conflicting upstream Content-Length"));
            }
            length = Some(n);
            lengths += 1;
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            coded = true;
            // Only the last coding frames the message.
            chunked = h
                .value
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case(b"connection") {
            let o = crate::conn::framing::connection_options(h.value);
            close |= o.close;
            reuse |= o.keep_alive;
            names_fields |= o.names_fields;
            hop = true;
        } else {
            hop |= is_hop_by_hop(name);
        }
        lines.push(head::line(buf, h));
    }
    let bytes = buf.split_to(len).freeze();
    let framing_fields = coded || lengths > 1;
    if !framing_fields && !names_fields {
        // The usual response: its fields travel as sent, hop-by-hop ones left out.
        if hop {
            lines.retain(|l| !is_hop_by_hop(bytes.get(l.0..l.1).unwrap_or_default()));
        }
        let framing = body_framing(status, method_head, false, false, length);
        let reuse = reuse && !close && !matches!(framing, Framing::ToEof);
        let fields = Fields::Raw(Box::new(head::RawFields::new(bytes, lines)));
        return Ok(Parsed::Response((status, version, fields), framing, reuse));
    }
    // Room for the request id the proxy adds (sized as in `conn::h1`).
    let mut headers =
        head::header_map(&bytes, &lines, 1).ok_or_else(|| invalid("invalid upstream header"))?;
    if coded {
        // Transfer-Encoding overrides a Content-Length, which must not travel on with it
        // (RFC 9112 section 6.3): the body is re-framed downstream. Such a message, or a
        // coding on HTTP/1.0, is faulty framing: the connection is not used again.
        headers.remove(http::header::CONTENT_LENGTH);
        if length.is_some() || version == Version::HTTP_10 {
            reuse = false;
        }
    } else if let Some(n) = length.filter(|_| lengths > 1) {
        // Repeated equal lengths travel on as one.
        headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    if close {
        reuse = false;
    }
    let framing = body_framing(status, method_head, chunked, coded, length);
    if matches!(framing, Framing::ToEof) {
        reuse = false;
    }
    Ok(Parsed::Response(
        (status, version, Fields::Map(headers)),
        framing,
        reuse,
    ))
}

/// How a response's body ends, from its status and framing fields.
fn body_framing(
    status: StatusCode,
    method_head: bool,
    chunked: bool,
    coded: bool,
    length: Option<u64>,
) -> Framing {
    if method_head || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        Framing::Length(0)
    } else if chunked {
        Framing::Chunked(Chunked::default())
    } else if coded {
        Framing::ToEof
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        Framing::ToEof
    }
}

/// Where a response body is in its framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// Bytes left.
    Length(u64),
    Chunked(Chunked),
    /// Until the upstream closes.
    ToEof,
    Done,
}

/// A response body read from the upstream connection; at its end the connection goes back
/// to its thread's idle list when the response allows.
pub struct OwnBody {
    conn: Option<TcpStream>,
    /// Bytes read and not yet yielded.
    buf: BytesMut,
    framing: Framing,
    reuse: bool,
    home: (Weak<H1Conns>, SocketAddr),
    /// The response's header fields as sent, until they are written or put in the map.
    fields: Option<Box<head::RawFields>>,
}

impl head::CarriesFields for OwnBody {
    fn take_fields(&mut self) -> Option<Box<head::RawFields>> {
        self.fields.take()
    }

    fn fields_mut(&mut self) -> Option<&mut head::RawFields> {
        self.fields.as_deref_mut()
    }
}

impl std::fmt::Debug for OwnBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnBody")
            .field("framing", &self.framing)
            .finish_non_exhaustive()
    }
}

impl OwnBody {
    fn finish_if_done(&mut self) {
        if self.framing == Framing::Length(0) {
            self.framing = Framing::Done;
        }
        if self.framing != Framing::Done {
            return;
        }
        let Some(conn) = self.conn.take() else { return };
        // Bytes past the response mean the upstream is out of step: never reuse that.
        if self.reuse
            && self.buf.is_empty()
            && let Some(h) = self.home.0.upgrade()
        {
            let buf = std::mem::take(&mut self.buf);
            h.keep_raw(self.home.1, Raw { conn, buf });
        }
    }

    /// Reads more from the upstream into `buf`; 0 at its end.
    fn poll_fill(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(Ok(0));
        };
        if self.buf.capacity() - self.buf.len() < want.min(BODY_READ) / 2 + 1 {
            self.buf.reserve(want.clamp(1, BODY_READ));
        }
        // tokio's read clears readiness on a short read, so a connection put back idle shows
        // readable again only when something arrives (see `H1Conns::checkout_raw`).
        tokio_util::io::poll_read_buf(Pin::new(conn), cx, &mut self.buf)
    }
}

impl Body for OwnBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        loop {
            match this.framing {
                Framing::Done => {
                    this.finish_if_done();
                    return Poll::Ready(None);
                }
                Framing::Length(0) => {
                    this.framing = Framing::Done;
                }
                Framing::Length(left) => {
                    if !this.buf.is_empty() {
                        let n = usize::try_from(left)
                            .unwrap_or(usize::MAX)
                            .min(this.buf.len());
                        let data = this.buf.split_to(n).freeze();
                        this.framing = Framing::Length(left - n as u64);
                        if this.framing == Framing::Length(0) {
                            this.finish_if_done();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    let want = usize::try_from(left).unwrap_or(usize::MAX);
                    if ready!(this.poll_fill(cx, want))? == 0 {
                        this.conn = None;
                        return Poll::Ready(Some(Err(io::ErrorKind::UnexpectedEof.into())));
                    }
                }
                Framing::ToEof => {
                    if !this.buf.is_empty() {
                        let data = this.buf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    if ready!(this.poll_fill(cx, BODY_READ))? == 0 {
                        this.conn = None;
                        this.framing = Framing::Done;
                    }
                }
                Framing::Chunked(mut c) if !this.buf.is_empty() => {
                    let next = c
                        .next(&this.buf)
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    this.framing = Framing::Chunked(c);
                    match next {
                        Next::Data(n) => {
                            let data = this.buf.split_to(n).freeze();
                            return Poll::Ready(Some(Ok(Frame::data(data))));
                        }
                        Next::Framing(n) => this.buf.advance(n),
                        Next::End(n) => {
                            this.buf.advance(n);
                            this.framing = Framing::Done;
                        }
                    }
                }
                Framing::Chunked(_) => {
                    if ready!(this.poll_fill(cx, BODY_READ))? == 0 {
                        this.conn = None;
                        return Poll::Ready(Some(Err(io::ErrorKind::UnexpectedEof.into())));
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.framing == Framing::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            Framing::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::test_upstream::{answering, eventually};
    use http_body_util::BodyExt;
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::net::TcpListener;

    #[test]
    fn response_heads_say_how_the_body_ends() {
        let framing = |raw: &[u8], head: bool| match parse(&mut BytesMut::from(raw), head) {
            Ok(Parsed::Response(_, f, reuse)) => Some((f, reuse)),
            _ => None,
        };
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
        assert_eq!(framing(ok, false), Some((Framing::Length(5), true)));
        assert_eq!(framing(ok, true), Some((Framing::Length(0), true)));
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n";
        assert_eq!(
            framing(chunked, false),
            Some((Framing::Chunked(Chunked::default()), true))
        );
        let both = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
        match parse(&mut BytesMut::from(&both[..]), false) {
            Ok(Parsed::Response((_, _, Fields::Map(h)), Framing::Chunked(_), _)) => {
                assert!(!h.contains_key(http::header::CONTENT_LENGTH), "dropped");
            }
            _ => panic!("chunked wins"),
        }
        let to_eof = b"HTTP/1.1 200 OK\r\n\r\nall of it";
        assert_eq!(framing(to_eof, false), Some((Framing::ToEof, false)));
        let close = b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n";
        assert_eq!(framing(close, false), Some((Framing::Length(0), false)));
        let old = b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(framing(old, false), Some((Framing::Length(0), false)));
        let two = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n";
        assert_eq!(framing(two, false), None);
        let plus = b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello";
        assert_eq!(framing(plus, false), None);
        let close_wins =
            b"HTTP/1.0 200 OK\r\nConnection: close, keep-alive\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(
            framing(close_wins, false),
            Some((Framing::Length(0), false))
        );
        // The usual response keeps its fields as sent, without the hop-by-hop ones; one
        // whose Connection names a field goes into a map, for the proxy to remove it.
        let usual = b"HTTP/1.1 200 OK\r\nServer: up\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nContent-Length: 0\r\nTE: trailers\r\n\r\n";
        match parse(&mut BytesMut::from(&usual[..]), false) {
            Ok(Parsed::Response((_, _, Fields::Raw(raw)), Framing::Length(0), true)) => {
                let names: Vec<&[u8]> = raw.iter().map(|(n, _)| n).collect();
                assert_eq!(names, [&b"Server"[..], b"Content-Length"]);
            }
            _ => panic!("kept as sent"),
        }
        let naming =
            b"HTTP/1.1 200 OK\r\nConnection: x-secret\r\nX-Secret: 1\r\nContent-Length: 0\r\n\r\n";
        assert!(matches!(
            parse(&mut BytesMut::from(&naming[..]), false),
            Ok(Parsed::Response((_, _, Fields::Map(h)), _, true)) if h.contains_key("x-secret")
        ));
        let mut info = BytesMut::from(
            &b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\n"[..],
        );
        assert!(matches!(parse(&mut info, false), Ok(Parsed::Informational)));
        assert!(info.starts_with(b"HTTP/1.1 200"));
    }

    async fn upstream(answer: &'static [u8], close: bool) -> SocketAddr {
        answering(answer, close).await.0
    }

    async fn fetch(conns: &Arc<H1Conns>, addr: SocketAddr) -> io::Result<(StatusCode, Vec<u8>)> {
        let conn = TcpStream::connect(addr).await?;
        let head = b"GET / HTTP/1.1\r\nhost: up\r\n\r\n";
        let resp = round_trip(Raw::new(conn), head, false, (Arc::downgrade(conns), addr))
            .await
            .map_err(Failed::into_io)?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, body.to_vec()))
    }

    fn conns() -> Arc<H1Conns> {
        Arc::new(H1Conns::new(
            crate::tls::Connector::new(Duration::from_secs(2), None),
            "http",
            Duration::from_secs(60),
        ))
    }

    #[tokio::test]
    async fn bodies_stream_off_real_connections_which_are_kept_only_when_clean() {
        let c = conns();
        let chunked = upstream(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\nwiki\r\n5\r\npedia\r\n0\r\n\r\n",
            false,
        )
        .await;
        assert_eq!(
            fetch(&c, chunked).await.unwrap(),
            (StatusCode::OK, b"wikipedia".to_vec())
        );
        assert!(
            c.checkout_raw(chunked, false).is_some(),
            "kept after a clean end"
        );

        let to_eof = upstream(b"HTTP/1.1 200 OK\r\n\r\nuntil the end", true).await;
        assert_eq!(fetch(&c, to_eof).await.unwrap().1, b"until the end");
        assert!(
            c.checkout_raw(to_eof, true).is_none(),
            "a close-delimited body ends its connection"
        );

        let short = upstream(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort", true).await;
        assert!(
            fetch(&c, short).await.is_err(),
            "a body cut short is an error"
        );
        assert!(c.checkout_raw(short, true).is_none());

        let garbage = upstream(b"SMTP ready\r\n\r\n", true).await;
        assert_eq!(
            fetch(&c, garbage).await.unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }

    #[tokio::test]
    async fn bytes_arriving_on_an_idle_connection_are_never_a_response() {
        // An upstream that answers 204, then (when told) sends bytes nobody asked for.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let stray = Arc::new(tokio::sync::Notify::new());
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (go, count) = (stray.clone(), accepted.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let first = count.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0;
                let go = go.clone();
                tokio::spawn(async move {
                    let mut chunk = [0u8; 1024];
                    while let Ok(n) = s.read(&mut chunk).await {
                        if n == 0 {
                            return;
                        }
                        let _ = s.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").await;
                        if first {
                            go.notified().await;
                            let _ = s
                                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nPOISON")
                                .await;
                        }
                    }
                });
            }
        });
        let c = conns();
        assert_eq!(fetch(&c, addr).await.unwrap().0, StatusCode::NO_CONTENT);
        stray.notify_one();
        eventually("the runtime sees the kept connection turn readable", || {
            c.idle_readable(addr)
        })
        .await;
        let mut req = Request::new(crate::proxy::CountedBody::new(None, Arc::default()));
        *req.uri_mut() = "/".parse().unwrap();
        let resp = c.clone().send(addr, req, None).await.unwrap();
        assert_eq!(resp.status(), StatusCode::NO_CONTENT, "not the stray bytes");
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
    }
}
