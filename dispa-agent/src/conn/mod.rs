//! Client connections before and around hyper: connection limits, the PROXY protocol, HTTP/1
//! framing checks, and the header and idle timeouts hyper lacks (its header timeout also runs
//! while a keep-alive connection waits, and it has no idle timeout).
//!
//! [`watch`] decides, from plain state and the time, whether a connection must close.

pub mod chunked;
pub mod framing;
pub mod h1;
pub mod head;
pub mod limiter;
pub mod proxy_protocol;

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use dispa_proto::config::model::Limits;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub use framing::{HeadError, Tracker};
pub use limiter::{ConnLimiter, Permit, Refused};

/// The framing verdict of an HTTP/1 request's head, put in the request's extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framing(pub Result<(), HeadError>);

/// What the connection's reader, its requests and its watchdog share.
#[derive(Debug)]
pub struct ConnState {
    /// HTTP/1 framing; `None` for HTTP/2 by ALPN.
    pub tracker: Option<Tracker>,
    pub in_flight: u32,
    pub requests: u64,
    /// When the connection opened, or the last request finished.
    pub idle_since: Instant,
    /// hyper is done with the connection (an upgrade took it over).
    pub handed_off: bool,
    /// The connection closes after the response in progress (shutdown or a timeout).
    pub closing: bool,
}

/// One connection's shared state.
#[derive(Debug, Clone)]
pub struct Shared(Arc<Mutex<ConnState>>);

impl Shared {
    pub fn new(tracker: Option<Tracker>, now: Instant) -> Self {
        Shared(Arc::new(Mutex::new(ConnState {
            tracker,
            in_flight: 0,
            requests: 0,
            idle_since: now,
            handed_off: false,
            closing: false,
        })))
    }

    pub fn lock(&self) -> MutexGuard<'_, ConnState> {
        // Every update is one step; a poisoned lock still holds consistent state.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A request starts: counts it and returns its framing verdict when the head was refused
    /// (HTTP/1 only; nothing to put in the request's extensions otherwise, which would cost
    /// an allocation per request).
    pub fn begin(&self, http1: bool) -> (RequestGuard, Option<Framing>) {
        let mut s = self.lock();
        s.in_flight += 1;
        s.requests += 1;
        let verdict = if http1 {
            s.tracker.as_mut().and_then(Tracker::next_verdict)
        } else {
            None
        };
        let refused = verdict.filter(Result::is_err).map(Framing);
        (RequestGuard(self.clone()), refused)
    }
}

/// Held by a request until its response body is dropped.
#[derive(Debug)]
pub struct RequestGuard(Shared);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.in_flight = s.in_flight.saturating_sub(1);
        if s.in_flight == 0 {
            s.idle_since = crate::clock::now();
        }
    }
}

/// What the watchdog does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watch {
    /// Look again at this time.
    Until(Instant),
    Close(CloseReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// A request head took longer than `header_timeout` (slowloris), or a new connection sent
    /// no first request within it.
    HeaderTimeout,
    /// No request for `idle_timeout`.
    IdleTimeout,
}

impl CloseReason {
    pub fn reason(self) -> &'static str {
        match self {
            CloseReason::HeaderTimeout => "header_timeout",
            CloseReason::IdleTimeout => "idle_timeout",
        }
    }
}

/// Whether a connection must close now. Pure.
pub fn watch(s: &ConnState, now: Instant, limits: &Limits) -> Watch {
    let (header, idle) = (limits.header_timeout, limits.idle_timeout);
    let recheck = now + header.min(idle).max(Duration::from_millis(100));
    if s.handed_off || s.in_flight > 0 {
        return Watch::Until(recheck);
    }
    let tracker = s.tracker.as_ref().filter(|t| !t.is_passthrough());
    // A head being read, or the first request of an HTTP/1 connection, must arrive in time.
    let head_since =
        tracker.and_then(|t| t.head_since().or((s.requests == 0).then_some(s.idle_since)));
    let (since, limit, why) = match head_since {
        Some(t) => (t, header, CloseReason::HeaderTimeout),
        None => (s.idle_since, idle, CloseReason::IdleTimeout),
    };
    let deadline = since + limit;
    if now >= deadline {
        Watch::Close(why)
    } else {
        Watch::Until(deadline)
    }
}

/// A client stream: replays bytes read past a PROXY header first, and feeds what hyper reads
/// to the connection's framing tracker.
pub struct ConnIo<S> {
    inner: S,
    prefix: Bytes,
    shared: Option<Shared>,
}

impl<S> ConnIo<S> {
    pub fn new(inner: S, prefix: Bytes) -> Self {
        Self {
            inner,
            prefix,
            shared: None,
        }
    }

    /// Reports what is read to `shared`'s tracker.
    pub fn tracked(mut self, shared: Shared) -> Self {
        self.shared = Some(shared);
        self
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ConnIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        if this.prefix.has_remaining() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
        } else {
            std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        }
        if let Some(shared) = &this.shared {
            let mut s = shared.lock();
            if !s.handed_off
                && let Some(t) = s.tracker.as_mut()
                && let Err(e) = t.feed(&buf.filled()[before..], crate::clock::now())
            {
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ConnIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A client's request body: hyper's stream, or none at all (the agent's own HTTP/1.1 path,
/// [`h1`], only takes requests without a body).
#[derive(Debug)]
pub enum ClientBody {
    Stream(Incoming),
    Empty,
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ClientBody::Stream(b) => Pin::new(b).poll_frame(cx),
            ClientBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Stream(b) => b.is_end_stream(),
            ClientBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Stream(b) => b.size_hint(),
            ClientBody::Empty => SizeHint::with_exact(0),
        }
    }
}

/// A response body that keeps its request counted on the connection until it is dropped.
pub struct Tracked<B> {
    inner: Pin<Box<B>>,
    _guard: RequestGuard,
}

impl<B> Tracked<B> {
    pub fn new(inner: B, guard: RequestGuard) -> Self {
        Self {
            inner: Box::pin(inner),
            _guard: guard,
        }
    }
}

impl<B: Body> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        self.inner.as_mut().poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dispa_proto::config::model::DEFAULT_LIMITS;

    fn limits() -> Limits {
        Limits {
            header_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(10),
            ..DEFAULT_LIMITS
        }
    }

    #[test]
    fn first_request_and_heads_are_bounded_by_header_timeout() {
        let t0 = Instant::now();
        let shared = Shared::new(Some(Tracker::new(16384, 100)), t0);
        let l = limits();
        assert_eq!(
            watch(&shared.lock(), t0 + Duration::from_secs(1), &l),
            Watch::Until(t0 + Duration::from_secs(2))
        );
        assert_eq!(
            watch(&shared.lock(), t0 + Duration::from_secs(2), &l),
            Watch::Close(CloseReason::HeaderTimeout)
        );
        // A request served, then idle: the idle timeout applies, not the header timeout.
        {
            let (g, v) = shared.begin(true);
            assert_eq!(v, Some(Framing(Err(HeadError::Malformed))));
            assert!(matches!(
                watch(&shared.lock(), t0 + Duration::from_secs(60), &l),
                Watch::Until(_)
            ));
            drop(g);
        }
        let idle = shared.lock().idle_since;
        assert!(matches!(
            watch(&shared.lock(), idle + Duration::from_secs(5), &l),
            Watch::Until(_)
        ));
        assert_eq!(
            watch(&shared.lock(), idle + Duration::from_secs(10), &l),
            Watch::Close(CloseReason::IdleTimeout)
        );
        // A head that started arriving must finish within the header timeout.
        let t1 = idle + Duration::from_secs(1);
        shared
            .lock()
            .tracker
            .as_mut()
            .unwrap()
            .feed(b"GET / HT", t1)
            .unwrap();
        assert_eq!(
            watch(&shared.lock(), t1 + Duration::from_secs(2), &l),
            Watch::Close(CloseReason::HeaderTimeout)
        );
    }

    #[test]
    fn http2_connections_only_idle_out() {
        let t0 = Instant::now();
        let shared = Shared::new(None, t0);
        let l = limits();
        assert!(matches!(
            watch(&shared.lock(), t0 + Duration::from_secs(5), &l),
            Watch::Until(_)
        ));
        assert_eq!(
            watch(&shared.lock(), t0 + Duration::from_secs(10), &l),
            Watch::Close(CloseReason::IdleTimeout)
        );
    }
}
