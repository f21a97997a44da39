//! The agent's own HTTP/1.1 server path for the common request: a whole head, no body, no
//! upgrade. hyper's connection keeps a read and a write buffer of 8 KiB each for the
//! connection's life and passes every request through its dispatcher; here an idle connection
//! holds no buffer, and a request is parsed, answered and written from the connection's task.
//!
//! Anything else (a body, an upgrade, `Expect`, CONNECT, h2c, a head httparse refuses, one
//! past 64 header lines or the head limit) hands the connection, with the bytes already read,
//! to hyper for the rest of its life, so hyper's checks and answers stay the only ones there.

use std::cell::RefCell;
use std::convert::Infallible;
use std::future::{Future, poll_fn};
use std::io::{self, Write as _};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::pin;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http::{Version, header};
use hyper::body::Body;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{ClientBody, ConnIo, Shared, head};

/// Heads with more header lines go to hyper, which applies the configured limit.
const MAX_HEADERS: usize = 64;
/// Read buffer of a request head; grows up to the head limit.
const READ_SIZE: usize = 4096;
/// Response bytes gathered into one write before the rest streams.
const COALESCE: usize = 16 * 1024;

/// How the connection left this path.
pub enum Outcome<S> {
    Closed,
    /// hyper takes over, starting with these bytes already read.
    HandOff(S, Bytes),
}

/// A stream that can wait for input without a buffer to read into.
pub trait ReadReady {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl ReadReady for ConnIo<TcpStream> {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.prefix.has_remaining() {
            return Poll::Ready(Ok(()));
        }
        self.inner.poll_read_ready(cx)
    }
}

/// rustls may hold decrypted bytes the socket no longer signals: always try the read.
impl<S> ReadReady for ConnIo<tokio_rustls::server::TlsStream<S>> {
    fn poll_read_ready(&self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// In-memory streams (the fuzz target) have no readiness to wait on: always try the read.
impl ReadReady for ConnIo<tokio::io::DuplexStream> {
    fn poll_read_ready(&self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// What the response needs to know about its request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Asked {
    head: bool,
    version: Version,
    keep_alive: bool,
}

// Returned once per head and taken apart at once: boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
enum Parse {
    /// More bytes needed.
    Partial,
    /// Not for this path: hyper serves the connection from here.
    HandOff,
    /// The request, and its head's bytes.
    Request(Request<ClientBody>, Asked, Bytes),
}

/// Serves requests on `io` until the client leaves, a response closes the connection, or a
/// request is not for this path. `max_head`: the configured head limit.
pub async fn serve<S, F, Fut, B>(
    mut io: S,
    shared: Shared,
    peer: SocketAddr,
    handler: &F,
    max_head: usize,
) -> io::Result<Outcome<S>>
where
    S: AsyncRead + AsyncWrite + ReadReady + Unpin + Send,
    F: Fn(Request<ClientBody>, SocketAddr) -> Fut,
    Fut: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: Body + head::CarriesFields + Send + 'static,
    B::Data: Send,
{
    let mut buf = BytesMut::new();
    // Heads this path takes are parsed here only, not again by the framing tracker.
    if let Some(t) = shared.lock().tracker.as_mut() {
        t.defer();
    }
    loop {
        let (mut req, asked) = loop {
            if !buf.is_empty() {
                let hand_off = match parse(&mut buf) {
                    Parse::Request(r, a, head) => {
                        if took(&shared, &head, r.headers().len(), head_begun(&buf))? {
                            break (r, a);
                        }
                        // Past the configured limits: hyper answers, the tracker refuses.
                        let _ = put_back(&mut buf, &head);
                        true
                    }
                    Parse::Partial => buf.len() >= max_head,
                    Parse::HandOff => true,
                };
                if hand_off {
                    resume(&shared, &buf)?;
                    return Ok(Outcome::HandOff(io, buf.freeze()));
                }
            }
            if fill(&mut io, &mut buf).await? == 0 {
                return Ok(Outcome::Closed);
            }
        };
        let (guard, verdict) = shared.begin(true);
        if let Some(v) = verdict {
            req.extensions_mut().insert(v);
        }
        // Boxed, like the response writer, so an idle connection's task stays small.
        let mut answer = Box::pin(handler(req, peer));
        let resp = loop {
            tokio::select! {
                biased;
                Ok(resp) = answer.as_mut() => break resp,
                // A client that leaves cancels its request (hyper does the same without
                // half_close); what a pipelining client sends meanwhile is kept.
                read = fill(&mut io, &mut buf), if buf.len() < max_head => {
                    if !matches!(read, Ok(n) if n > 0) {
                        return Ok(Outcome::Closed);
                    }
                }
            }
        };
        let closing = shared.lock().closing;
        let keep = Box::pin(write_response(&mut io, resp, asked, closing)).await;
        drop(guard);
        // Told to close while the response was being written: the client has it, now close.
        if !keep? || shared.lock().closing {
            let _ = io.shutdown().await;
            return Ok(Outcome::Closed);
        }
        if buf.is_empty() {
            recycle(std::mem::take(&mut buf));
        }
    }
}

/// Reports a head this path took to the connection's framing tracker, which queues its
/// verdict; `false` if it is past the configured limits, for hyper to refuse.
fn took(shared: &Shared, head: &[u8], lines: usize, more: bool) -> io::Result<bool> {
    let mut s = shared.lock();
    let Some(t) = s.tracker.as_mut().filter(|t| t.is_deferred()) else {
        return Ok(true);
    };
    if !t.within_limits(head.len(), lines) {
        return Ok(false);
    }
    t.own_head(head, more.then(Instant::now))
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok(true)
}

/// Whether `unread` holds the start of a head: empty lines before a request line do not
/// start one (they would start the header timeout on an idle connection).
fn head_begun(unread: &[u8]) -> bool {
    unread.iter().any(|b| !matches!(b, b'\r' | b'\n'))
}

/// The tracker follows the connection from `unread` on, as hyper reads it.
fn resume(shared: &Shared, unread: &[u8]) -> io::Result<()> {
    match shared.lock().tracker.as_mut() {
        Some(t) => t
            .resume(unread, Instant::now())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
        None => Ok(()),
    }
}

/// Reads more of the client's bytes into `buf`; 0 at the end of the stream. Nothing is
/// allocated until there is something to read, so an idle connection holds no buffer.
async fn fill<S>(io: &mut S, buf: &mut BytesMut) -> io::Result<usize>
where
    S: AsyncRead + ReadReady + Unpin,
{
    poll_fn(|cx| io.poll_read_ready(cx)).await?;
    if buf.capacity() == 0 {
        *buf = POOL.with_borrow_mut(Vec::pop).unwrap_or_default();
    }
    if buf.capacity() - buf.len() < READ_SIZE / 4 {
        buf.reserve(READ_SIZE);
    }
    io.read_buf(buf).await
}

thread_local! {
    /// Read buffers of connections that went idle, for the next ones to read into: a
    /// connection holds a buffer only while a request is in progress, without a malloc and
    /// free of 4 KiB per request.
    static POOL: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// Buffers kept per serving thread.
const POOLED: usize = 64;

fn recycle(buf: BytesMut) {
    if buf.capacity() >= READ_SIZE / 4 {
        POOL.with_borrow_mut(|p| {
            if p.len() < POOLED {
                p.push(buf);
            }
        });
    }
}

/// Parses one request head from the front of `buf`, taking it out when it is whole.
fn parse(buf: &mut BytesMut) -> Parse {
    let mut parsed = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut parsed) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parse::Partial,
        Err(_) => return Parse::HandOff,
    };
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Parse::HandOff;
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Parse::HandOff;
    };
    if method == Method::CONNECT {
        return Parse::HandOff;
    }
    let version = head::version(Some(minor));
    let target = head::span(buf, target.as_bytes());
    let mut keep_alive = version == Version::HTTP_11;
    let mut close = false;
    let mut lines = head::Lines::new();
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        if [
            &b"content-length"[..],
            b"transfer-encoding",
            b"upgrade",
            b"expect",
        ]
        .iter()
        .any(|n| name.eq_ignore_ascii_case(n))
        {
            return Parse::HandOff;
        }
        if name.eq_ignore_ascii_case(b"connection") {
            let o = super::framing::connection_options(h.value);
            close |= o.close;
            keep_alive |= o.keep_alive;
        }
        lines.push(head::line(buf, h));
    }
    let bytes = buf.split_to(len).freeze();
    let Ok(uri) = Uri::from_maybe_shared(bytes.slice(target.0..target.1)) else {
        return put_back(buf, &bytes);
    };
    // Room for the five headers the proxy adds (request id, trace context, X-Forwarded-For,
    // -Proto, -Host), and no more: a map of up to six fits glibc's thread cache (its entries
    // stay under 1 KiB), a larger one takes the slower path that also consolidates free chunks.
    let Some(headers) = head::header_map(&bytes, &lines, 5) else {
        return put_back(buf, &bytes);
    };
    let asked = Asked {
        head: method == Method::HEAD,
        version,
        keep_alive: keep_alive && !close,
    };
    let mut req = Request::new(ClientBody::Empty);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = version;
    *req.headers_mut() = headers;
    Parse::Request(req, asked, bytes)
}

/// Puts a head taken out of `buf` back in front, for hyper.
fn put_back(buf: &mut BytesMut, head: &Bytes) -> Parse {
    let mut all = BytesMut::with_capacity(head.len() + buf.len());
    all.extend_from_slice(head);
    all.extend_from_slice(buf);
    *buf = all;
    Parse::HandOff
}

/// How a response body is delimited on the wire.
#[derive(Clone, Copy)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    /// HTTP/1.0 without a length: the end of the connection ends the body.
    Close,
}

/// Writes `resp`; returns whether the connection stays open for another request.
// The head is written out before the returned future, which is boxed once per response, is
// made: it holds only the body and the bytes to send, not the response's header map.
fn write_response<'a, S, B>(
    io: &'a mut S,
    resp: Response<B>,
    asked: Asked,
    closing: bool,
) -> impl Future<Output = io::Result<bool>> + 'a
where
    S: AsyncWrite + Unpin,
    B: Body + head::CarriesFields + 'a,
{
    let (mut parts, mut body) = resp.into_parts();
    let status = parts.status;
    // An upstream's fields as it sent them, hop-by-hop ones already left out.
    let raw = body.take_fields();
    // One pass comparing names instead of a hashed lookup each; the proxy has usually removed
    // the hop-by-hop ones already.
    let (mut connection, mut coding, mut date) = (false, false, false);
    let mut declared = None;
    for (name, value) in &parts.headers {
        if name == header::CONNECTION {
            connection = true;
        } else if name == header::TRANSFER_ENCODING {
            coding = true;
        } else if name == header::DATE {
            date = true;
        } else if name == header::CONTENT_LENGTH && declared.is_none() {
            declared = Some(super::framing::parse_length(value.as_bytes()));
        }
    }
    for (name, value) in raw.iter().flat_map(|r| r.iter()) {
        if name.eq_ignore_ascii_case(b"date") {
            date = true;
        } else if name.eq_ignore_ascii_case(b"content-length") && declared.is_none() {
            declared = Some(super::framing::parse_length(value));
        }
    }
    let mut keep_alive =
        asked.keep_alive && !closing && !(connection && says_close(&parts.headers));
    // Hop-by-hop: this connection's own are written below.
    if connection {
        parts.headers.remove(header::CONNECTION);
    }
    if coding {
        parts.headers.remove(header::TRANSFER_ENCODING);
    }
    let mut out = head::HeadBuf::take();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let bodyless = asked.head
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let framing = if bodyless {
        Framing::None
    } else if let Some(Some(n)) = declared {
        Framing::Length(n)
    } else {
        if declared.is_some() {
            // Not a length: the body is framed below (the own exchange sends none such).
            parts.headers.remove(header::CONTENT_LENGTH);
        }
        if let Some(n) = body.size_hint().exact() {
            // Writing into a Vec cannot fail.
            let _ = write!(out, "content-length: {n}\r\n");
            Framing::Length(n)
        } else if asked.version == Version::HTTP_11 {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
            Framing::Chunked
        } else {
            keep_alive = false;
            Framing::Close
        }
    };
    if let Some(raw) = &raw {
        raw.push_lines(&mut out, &parts.headers);
    }
    head::push_lines(&mut out, &parts.headers);
    if !date {
        push_date(&mut out);
    }
    if !keep_alive && asked.version == Version::HTTP_11 {
        out.extend_from_slice(b"connection: close\r\n");
    } else if keep_alive && asked.version == Version::HTTP_10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
    drop(parts);
    async move {
        // Written once the thread's other ready connections have had their turn: a wake-up's
        // responses go out together, so clients and the upstream wake for several at a time
        // and preempt this thread less often (docs/BENCHMARKS.md, tenth pass: kernel time
        // per request down, RPS up 2-7%, 15% over TLS). The task wakes itself, which puts it
        // at the back of the thread's run queue; `yield_now` would also hold the write back
        // behind the work the next poll for I/O brings, which widened the tail (eleventh
        // pass: p99 at or below nginx's in 9 of 10 rounds instead of 3). Here, in the boxed
        // future, not in the connection's: an idle connection's task stays as small as before.
        let mut requeued = false;
        poll_fn(|cx| {
            if requeued {
                return Poll::Ready(());
            }
            requeued = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        })
        .await;
        let mut body = pin!(body);
        if matches!(framing, Framing::None) {
            io.write_all(&out).await?;
            io.flush().await?;
            return Ok(keep_alive);
        }
        let mut sent = 0u64;
        loop {
            // Gathered bytes go out before waiting on the body, never after.
            let step = poll_fn(|cx| match body.as_mut().poll_frame(cx) {
                Poll::Pending if !out.is_empty() => Poll::Ready(None),
                // The error itself is not needed, and need not be Send.
                other => other.map(|f| Some(f.map(|r| r.map_err(drop)))),
            })
            .await;
            let frame = match step {
                None => {
                    io.write_all(&out).await?;
                    io.flush().await?;
                    out.clear();
                    continue;
                }
                Some(None) => break,
                // The upstream broke off: the client sees the message cut short.
                Some(Some(Err(_))) => {
                    io.write_all(&out).await?;
                    return Ok(false);
                }
                Some(Some(Ok(f))) => f,
            };
            // Trailers are not passed on over HTTP/1.1.
            let Ok(mut data) = frame.into_data() else {
                continue;
            };
            let n = data.remaining() as u64;
            if n == 0 {
                continue;
            }
            sent += n;
            match framing {
                Framing::Length(total) if sent > total => {
                    io.write_all(&out).await?;
                    return Ok(false);
                }
                Framing::Chunked => {
                    let _ = write!(out, "{n:x}\r\n");
                }
                _ => {}
            }
            if out.len() as u64 + n <= COALESCE as u64 {
                while data.has_remaining() {
                    let chunk = data.chunk();
                    let l = chunk.len();
                    out.extend_from_slice(chunk);
                    data.advance(l);
                }
            } else {
                io.write_all(&out).await?;
                out.clear();
                while data.has_remaining() {
                    let l = io.write(data.chunk()).await?;
                    if l == 0 {
                        return Err(io::ErrorKind::WriteZero.into());
                    }
                    data.advance(l);
                }
            }
            if matches!(framing, Framing::Chunked) {
                out.extend_from_slice(b"\r\n");
            }
        }
        match framing {
            Framing::Chunked => out.extend_from_slice(b"0\r\n\r\n"),
            Framing::Length(total) if sent != total => keep_alive = false,
            _ => {}
        }
        if !out.is_empty() {
            io.write_all(&out).await?;
        }
        io.flush().await?;
        Ok(keep_alive)
    }
}

fn says_close(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .any(|v| super::framing::connection_options(v.as_bytes()).close)
}

/// Appends a `date` header; the text is made once a second per thread.
fn push_date(out: &mut Vec<u8>) {
    thread_local!(static DATE: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) });
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with_borrow_mut(|(at, text)| {
        if *at != secs || text.is_empty() {
            *text = httpdate::fmt_http_date(now);
            *at = secs;
        }
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(text.as_bytes());
        out.extend_from_slice(b"\r\n");
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn parsed(raw: &[u8]) -> (Option<(Request<ClientBody>, Asked)>, BytesMut) {
        let mut buf = BytesMut::from(raw);
        match parse(&mut buf) {
            Parse::Request(r, a, _) => (Some((r, a)), buf),
            Parse::Partial => panic!("partial"),
            Parse::HandOff => (None, buf),
        }
    }

    #[test]
    fn a_plain_request_is_taken_and_the_next_one_is_left() {
        let (r, rest) =
            parsed(b"GET /a?b=1 HTTP/1.1\r\nHost: x.test\r\nX-Two: 1\r\nx-two: 2\r\n\r\nGET /next");
        let (req, asked) = r.expect("taken");
        assert_eq!(req.uri(), "/a?b=1");
        assert_eq!(req.headers()["host"], "x.test");
        assert_eq!(req.headers().get_all("x-two").iter().count(), 2);
        assert!(asked.keep_alive && !asked.head);
        assert_eq!(&rest[..], b"GET /next");
    }

    #[test]
    fn keep_alive_follows_the_version_and_connection() {
        let ka = |raw: &[u8]| parsed(raw).0.expect("taken").1.keep_alive;
        assert!(!ka(b"GET / HTTP/1.0\r\n\r\n"));
        assert!(ka(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"));
        assert!(!ka(b"GET / HTTP/1.1\r\nConnection: foo, close\r\n\r\n"));
        assert!(!ka(
            b"GET / HTTP/1.0\r\nConnection: close, keep-alive\r\n\r\n"
        ));
    }

    #[test]
    fn bodies_upgrades_and_odd_heads_go_to_hyper_untouched() {
        for raw in [
            &b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi"[..],
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            b"PUT / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            b"CONNECT a:1 HTTP/1.1\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
        ] {
            let (r, rest) = parsed(raw);
            assert!(r.is_none(), "{}", String::from_utf8_lossy(raw));
            assert_eq!(&rest[..], raw, "bytes kept for hyper");
        }
    }

    #[test]
    fn only_bytes_of_a_request_line_begin_a_head() {
        assert!(!head_begun(b""));
        assert!(!head_begun(b"\r\n\r\n"));
        assert!(head_begun(b"\r\nG"));
    }

    #[test]
    fn a_head_partly_read_waits_for_more() {
        let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r\nHost: a"[..]);
        assert!(matches!(parse(&mut buf), Parse::Partial));
    }

    async fn written(resp: Response<http_body_util::Full<Bytes>>, asked: Asked) -> (String, bool) {
        let mut out = Vec::new();
        let keep = write_response(&mut out, resp, asked, false).await.unwrap();
        (String::from_utf8(out).unwrap(), keep)
    }

    const GET11: Asked = Asked {
        head: false,
        version: Version::HTTP_11,
        keep_alive: true,
    };

    #[tokio::test]
    async fn responses_are_framed_by_length_and_closed_when_they_say_so() {
        let mut resp = Response::new(http_body_util::Full::new(Bytes::from_static(b"hello")));
        resp.headers_mut()
            .insert("x-a", HeaderValue::from_static("1"));
        let (text, keep) = written(resp, GET11).await;
        assert!(text.starts_with("HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: 1\r\ndate: "));
        assert!(text.ends_with("\r\n\r\nhello"));
        assert!(keep);

        let mut resp = Response::new(http_body_util::Full::new(Bytes::new()));
        *resp.status_mut() = StatusCode::BAD_REQUEST;
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        let (text, keep) = written(resp, GET11).await;
        assert!(text.contains("connection: close\r\n"), "{text}");
        assert!(!keep);

        let head = Asked {
            head: true,
            ..GET11
        };
        let mut resp = Response::new(http_body_util::Full::new(Bytes::from_static(b"x")));
        resp.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("1"));
        let (text, _) = written(resp, head).await;
        assert!(text.ends_with("\r\n\r\n") && text.contains("content-length: 1"));

        // The upstream's own Date is kept, not doubled; a chunked coding it named is not passed on.
        let mut resp = Response::new(http_body_util::Full::new(Bytes::from_static(b"x")));
        resp.headers_mut().insert(
            header::DATE,
            HeaderValue::from_static("Tue, 01 Dec 2026 00:00:00 GMT"),
        );
        resp.headers_mut().insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        let (text, keep) = written(resp, GET11).await;
        assert_eq!(text.matches("date: ").count(), 1, "{text}");
        assert!(text.contains("date: Tue, 01 Dec 2026"), "{text}");
        assert!(!text.contains("transfer-encoding"), "{text}");
        assert!(text.contains("content-length: 1\r\n") && keep, "{text}");
    }

    #[tokio::test]
    async fn an_upstream_s_fields_are_written_as_sent_behind_the_proxy_s() {
        let head: &[u8] = b"HTTP/1.1 200 OK\r\nServer: up\r\nDate: Tue, 01 Dec 2026 00:00:00 GMT\r\nContent-Length: 2\r\nX-Request-Id: theirs\r\n\r\n";
        let fields = Some(Box::new(head::RawFields::parsed(head)));
        let mut resp = Response::new(Stream(vec![b"hi"], fields));
        resp.headers_mut()
            .insert("x-request-id", HeaderValue::from_static("ours"));
        let mut out = Vec::new();
        let keep = write_response(&mut out, resp, GET11, false).await.unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\r\nServer: up\r\nDate: Tue, 01 Dec 2026 00:00:00 GMT\r\nContent-Length: 2\r\nx-request-id: ours\r\n\r\nhi"
        );
        assert!(keep);
    }

    /// A body of unknown length, and the response fields it may carry.
    struct Stream(Vec<&'static [u8]>, Option<Box<head::RawFields>>);

    impl head::CarriesFields for Stream {
        fn take_fields(&mut self) -> Option<Box<head::RawFields>> {
            self.1.take()
        }
    }

    impl Body for Stream {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
            if self.0.is_empty() {
                return Poll::Ready(None);
            }
            let d = self.0.remove(0);
            Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::from_static(d)))))
        }
    }

    #[tokio::test]
    async fn a_stream_without_length_is_chunked_or_ends_the_connection() {
        let mut out = Vec::new();
        let keep = write_response(
            &mut out,
            Response::new(Stream(vec![b"abc", b"de"], None)),
            GET11,
            false,
        )
        .await
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("transfer-encoding: chunked\r\n"));
        assert!(
            text.ends_with("\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"),
            "{text}"
        );
        assert!(keep);

        let get10 = Asked {
            version: Version::HTTP_10,
            ..GET11
        };
        let mut out = Vec::new();
        let keep = write_response(
            &mut out,
            Response::new(Stream(vec![b"abc"], None)),
            get10,
            false,
        )
        .await
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(!text.contains("transfer-encoding") && text.ends_with("\r\n\r\nabc"));
        assert!(!keep);
    }
}
