//! HTTP/1.1 upstream connections of one thread (one lane of a [`super::Pool`]), on the request
//! path instead of hyper-util's pool: a request takes a ready connection to its endpoint or
//! opens one, and the connection goes back on the endpoint's list as soon as the request is
//! handed to it. It is taken again once hyper says it is ready (the previous response read to
//! its end). No pool key is built or hashed per request and no task is spawned per response
//! to return a connection; each connection's task stays on the thread that opened it.

// Per-request lookups keyed by endpoint address: a fast hash.
use foldhash::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, Uri};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use tokio::net::TcpStream;
use tower_service::Service;

use super::exchange::{self, OwnBody};
use crate::conn::head::HeadBuf;
use crate::proxy::CountedBody;
use crate::tls::{Connector, MaybeTls};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Connections kept per endpoint (in use or idle); more are closed once their exchange ends.
const MAX_PER_ENDPOINT: usize = 256;

/// Why an upstream exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("connecting to {0} failed")]
    Connect(SocketAddr, #[source] BoxError),
    #[error("upstream HTTP/1.1 exchange failed")]
    Exchange(#[source] hyper::Error),
    /// From the agent's own exchange ([`exchange`]).
    #[error("upstream HTTP/1.1 exchange failed")]
    Upstream(#[source] std::io::Error),
    /// From the pooled (HTTP/2) client.
    #[error("upstream request failed")]
    Pooled(#[source] hyper_util::client::legacy::Error),
}

impl SendError {
    /// No connection could be made: nothing reached the upstream.
    pub fn is_connect(&self) -> bool {
        match self {
            SendError::Connect(..) => true,
            SendError::Exchange(_) | SendError::Upstream(_) => false,
            SendError::Pooled(e) => e.is_connect(),
        }
    }
}

/// A response body from either HTTP/1.1 path.
#[derive(Debug)]
pub enum UpstreamBody {
    Hyper(Incoming),
    Own(OwnBody),
}

impl crate::conn::head::CarriesFields for UpstreamBody {
    fn take_fields(&mut self) -> Option<Box<crate::conn::head::RawFields>> {
        match self {
            UpstreamBody::Own(b) => b.take_fields(),
            UpstreamBody::Hyper(_) => None,
        }
    }

    fn fields_mut(&mut self) -> Option<&mut crate::conn::head::RawFields> {
        match self {
            UpstreamBody::Own(b) => b.fields_mut(),
            UpstreamBody::Hyper(_) => None,
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpstreamBody::Hyper(b) => std::pin::Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(Into::into))),
            UpstreamBody::Own(b) => std::pin::Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(Into::into))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Hyper(b) => b.is_end_stream(),
            UpstreamBody::Own(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Hyper(b) => b.size_hint(),
            UpstreamBody::Own(b) => b.size_hint(),
        }
    }
}

/// An idle connection of the agent's own exchange.
struct RawKept {
    raw: exchange::Raw,
    since: Instant,
}

struct Kept {
    sender: SendRequest<CountedBody>,
    /// When it last took a request.
    since: Instant,
}

/// One thread's HTTP/1.1 connections to the endpoints of one upstream (and server name).
pub struct H1Conns {
    connector: Connector,
    /// "http" or "https", for the URI the connector is given.
    scheme: &'static str,
    idle_timeout: Duration,
    by_endpoint: Mutex<HashMap<SocketAddr, Vec<Kept>>>,
    /// Idle connections of the agent's own exchange, by endpoint.
    raw: Mutex<HashMap<SocketAddr, Vec<RawKept>>>,
    sweeping: AtomicBool,
}

impl std::fmt::Debug for H1Conns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H1Conns")
            .field("connector", &self.connector)
            .finish_non_exhaustive()
    }
}

impl H1Conns {
    pub fn new(connector: Connector, scheme: &'static str, idle_timeout: Duration) -> Self {
        Self {
            connector,
            scheme,
            idle_timeout,
            by_endpoint: Mutex::default(),
            raw: Mutex::default(),
            sweeping: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<SocketAddr, Vec<Kept>>> {
        unpoisoned(&self.by_endpoint)
    }

    fn lock_raw(&self) -> MutexGuard<'_, HashMap<SocketAddr, Vec<RawKept>>> {
        unpoisoned(&self.raw)
    }

    /// Sends `req` (origin-form URI) to `addr`: on the agent's own exchange when it suits
    /// (plaintext, no body, no upgrade), else over hyper's client connection.
    /// A plain function returning either future, not an `async fn`: an `async fn` keeps its
    /// arguments twice in its state, and the own exchange needs only the encoded head, so its
    /// future (what most requests wait on) does not carry the request at all.
    pub fn send(
        self: Arc<Self>,
        addr: SocketAddr,
        mut req: Request<CountedBody>,
        added: Option<&crate::proxy::Added>,
    ) -> impl Future<Output = Result<Response<UpstreamBody>, SendError>> + Send + use<> {
        use futures_util::future::Either;
        if self.scheme == "http" && exchange::suits(&req) {
            let head = exchange::encode(&req, added);
            let method_head = req.method() == Method::HEAD;
            let repeatable = super::idempotent(req.method());
            drop(req);
            return Either::Left(async move {
                let resp = self.exchange(addr, head, method_head, repeatable).await?;
                Ok(resp.map(UpstreamBody::Own))
            });
        }
        if let Some(a) = added {
            a.insert_into(req.headers_mut());
        }
        // Boxed: hyper's connection path is the larger future, and fewer requests take it.
        Either::Right(Box::pin(async move {
            Ok(self.send_hyper(addr, req).await?.map(UpstreamBody::Hyper))
        }))
    }

    /// The own exchange of an encoded `head`. A request that may be repeated goes out once
    /// more on a new connection when a kept one turns out closed before any of the response
    /// came back; for the others a kept connection is probed first.
    async fn exchange(
        self: &Arc<Self>,
        addr: SocketAddr,
        head: HeadBuf,
        method_head: bool,
        repeatable: bool,
    ) -> Result<Response<OwnBody>, SendError> {
        let home = || (Arc::downgrade(self), addr);
        if let Some(conn) = self.checkout_raw(addr, !repeatable) {
            match exchange::round_trip(conn, &head, method_head, home()).await {
                Ok(r) => return Ok(r),
                Err(exchange::Failed::Stale(_)) if repeatable => {}
                Err(e) => return Err(SendError::Upstream(e.into_io())),
            }
        }
        let conn = Box::pin(self.connect_raw(addr)).await?;
        exchange::round_trip(exchange::Raw::new(conn), &head, method_head, home())
            .await
            .map_err(|e| SendError::Upstream(e.into_io()))
    }

    /// A kept own-exchange connection, dropping those idle too long and those with anything
    /// to read: an idle connection that became readable was closed by the upstream or got
    /// bytes no request asked for (a late body, a 408), which must never be taken as the next
    /// response. Reads clear readiness on a short read, so a quiet connection costs no system
    /// call here; a readable one gets one non-blocking read to tell. Bytes or a close the
    /// runtime has not yet seen are not caught that way (hyper's connection task and nginx's
    /// idle-connection handler have the same window); `probe`: read anyway, for a request
    /// that could not be sent again if the connection turned out closed.
    pub(super) fn checkout_raw(&self, addr: SocketAddr, probe: bool) -> Option<exchange::Raw> {
        let now = crate::clock::now();
        let mut map = self.lock_raw();
        let list = map.get_mut(&addr)?;
        while let Some(k) = list.pop() {
            if now.duration_since(k.since) >= self.idle_timeout {
                continue;
            }
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            if probe || k.raw.conn.poll_read_ready(&mut cx).is_ready() {
                let mut byte = [0u8; 1];
                match k.raw.conn.try_read(&mut byte) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    _ => continue,
                }
            }
            return Some(k.raw);
        }
        None
    }

    /// Whether the runtime has seen an idle own-exchange connection to `addr` turn readable.
    #[cfg(test)]
    pub(super) fn idle_readable(&self, addr: SocketAddr) -> bool {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        self.lock_raw().get(&addr).is_some_and(|l| {
            l.iter()
                .any(|k| k.raw.conn.poll_read_ready(&mut cx).is_ready())
        })
    }

    /// An own-exchange connection whose response ended cleanly, for the next request.
    pub(super) fn keep_raw(&self, addr: SocketAddr, raw: exchange::Raw) {
        let mut map = self.lock_raw();
        let list = map.entry(addr).or_default();
        if list.len() < MAX_PER_ENDPOINT {
            list.push(RawKept {
                raw,
                since: crate::clock::now(),
            });
        }
    }

    /// A new connection to `addr` through the connector (TCP, then TLS if configured), with
    /// the sweeper started on the first one.
    async fn dial(self: &Arc<Self>, addr: SocketAddr) -> Result<MaybeTls, SendError> {
        let connect_err = |e: BoxError| SendError::Connect(addr, e);
        let uri: Uri = format!("{}://{addr}/", self.scheme)
            .parse()
            .map_err(|e: http::uri::InvalidUri| connect_err(e.into()))?;
        let io = self
            .connector
            .clone()
            .call(uri)
            .await
            .map_err(connect_err)?;
        if !self.sweeping.swap(true, Ordering::Relaxed) {
            tokio::spawn(sweep(Arc::downgrade(self)));
        }
        Ok(io)
    }

    async fn connect_raw(self: &Arc<Self>, addr: SocketAddr) -> Result<TcpStream, SendError> {
        self.dial(addr).await?.into_plain().ok_or_else(|| {
            SendError::Connect(addr, "a TLS connection where plaintext was asked".into())
        })
    }

    /// Sends over hyper's client connection. A request a kept connection could not take
    /// (it was closing) goes out once more on a new connection.
    async fn send_hyper(
        self: &Arc<Self>,
        addr: SocketAddr,
        req: Request<CountedBody>,
    ) -> Result<Response<Incoming>, SendError> {
        let mut req = req;
        if let Some(mut sender) = self.checkout(addr) {
            let sent = sender.try_send_request(req);
            self.keep(addr, sender);
            match sent.await {
                Ok(resp) => return Ok(resp),
                Err(mut e) => match e.take_message() {
                    Some(r) => req = r,
                    None => return Err(SendError::Exchange(e.into_error())),
                },
            }
        }
        // Boxed: connecting is rare, and its future would make every request's future large.
        let mut sender = Box::pin(self.connect(addr)).await?;
        let sent = sender.send_request(req);
        self.keep(addr, sender);
        sent.await.map_err(SendError::Exchange)
    }

    /// A kept connection ready for a request, dropping closed and long-idle ones on the way.
    fn checkout(&self, addr: SocketAddr) -> Option<SendRequest<CountedBody>> {
        let now = crate::clock::now();
        let mut map = self.lock();
        let list = map.get_mut(&addr)?;
        let mut i = list.len();
        while i > 0 {
            i -= 1;
            let k = &list[i];
            if self.stale(k, now) {
                list.swap_remove(i);
            } else if k.sender.is_ready() {
                return Some(list.swap_remove(i).sender);
            }
        }
        None
    }

    /// Closed, or idle (ready, not in use) past the idle timeout.
    fn stale(&self, k: &Kept, now: Instant) -> bool {
        k.sender.is_closed()
            || (k.sender.is_ready() && now.duration_since(k.since) >= self.idle_timeout)
    }

    fn keep(&self, addr: SocketAddr, sender: SendRequest<CountedBody>) {
        let mut map = self.lock();
        let list = map.entry(addr).or_default();
        if list.len() >= MAX_PER_ENDPOINT {
            list.retain(|k| !k.sender.is_closed());
            if list.len() >= MAX_PER_ENDPOINT {
                return;
            }
        }
        list.push(Kept {
            sender,
            since: crate::clock::now(),
        });
    }

    async fn connect(
        self: &Arc<Self>,
        addr: SocketAddr,
    ) -> Result<SendRequest<CountedBody>, SendError> {
        let io = self.dial(addr).await?;
        let (sender, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(SendError::Exchange)?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(%addr, "upstream connection ended: {e}");
            }
        });
        Ok(sender)
    }

    /// Drops closed connections and those idle past the idle timeout.
    fn sweep_now(&self) {
        let now = crate::clock::now();
        let mut map = self.lock();
        map.retain(|_, list| {
            list.retain(|k| !self.stale(k, now));
            !list.is_empty()
        });
        drop(map);
        let mut raw = self.lock_raw();
        raw.retain(|_, list| {
            list.retain(|k| now.duration_since(k.since) < self.idle_timeout);
            !list.is_empty()
        });
    }
}

/// Each update of a connection list is one push or removal: a poisoned list is still
/// consistent.
fn unpoisoned<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Closes idle connections of endpoints that get no more requests; ends with the pool.
async fn sweep(conns: Weak<H1Conns>) {
    let period = match conns.upgrade() {
        Some(c) => (c.idle_timeout / 2).max(Duration::from_millis(100)),
        None => return,
    };
    loop {
        tokio::time::sleep(period).await;
        match conns.upgrade() {
            Some(c) => c.sweep_now(),
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::test_upstream::{answering, eventually};
    use http_body_util::BodyExt;
    use std::sync::atomic::AtomicUsize;

    async fn upstream(close_after: bool) -> (SocketAddr, Arc<AtomicUsize>) {
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        answering(ok, close_after).await
    }

    fn conns(idle: Duration) -> Arc<H1Conns> {
        Arc::new(H1Conns::new(
            Connector::new(Duration::from_secs(2), None),
            "http",
            idle,
        ))
    }

    /// Which client path a test request takes.
    #[derive(Clone, Copy, Debug)]
    enum Path {
        Hyper,
        /// The own exchange, with a method it may repeat or not.
        Own(&'static str),
    }

    const PATHS: [Path; 3] = [Path::Hyper, Path::Own("GET"), Path::Own("POST")];

    async fn get(c: &Arc<H1Conns>, addr: SocketAddr, path: Path) -> Result<String, SendError> {
        let mut req = Request::new(CountedBody::new(None, Arc::default()));
        *req.uri_mut() = "/".parse().unwrap();
        req.headers_mut()
            .insert(http::header::HOST, "up".parse().unwrap());
        let resp = match path {
            Path::Hyper => c.send_hyper(addr, req).await?.map(UpstreamBody::Hyper),
            Path::Own(m) => {
                *req.method_mut() = m.parse().unwrap();
                c.clone().send(addr, req, None).await?
            }
        };
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    /// Connections kept for `path`: (all, ready for a request).
    fn kept(c: &H1Conns, addr: SocketAddr, path: Path) -> (usize, usize) {
        match path {
            Path::Hyper => c.lock().get(&addr).map_or((0, 0), |l| {
                (l.len(), l.iter().filter(|k| k.sender.is_ready()).count())
            }),
            Path::Own(_) => {
                let n = c.lock_raw().get(&addr).map_or(0, Vec::len);
                (n, n)
            }
        }
    }

    #[tokio::test]
    async fn sequential_requests_reuse_one_connection() {
        for path in PATHS {
            let (addr, accepted) = upstream(false).await;
            let c = conns(Duration::from_secs(60));
            for i in 0..5 {
                // The connection is ready again once its response was read to the end.
                eventually("a kept connection is ready", || {
                    let (all, ready) = kept(&c, addr, path);
                    i == 0 || (all == 1 && ready == 1)
                })
                .await;
                assert_eq!(get(&c, addr, path).await.unwrap(), "ok");
            }
            assert_eq!(accepted.load(Ordering::SeqCst), 1, "{path:?}");
        }
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_is_not_used_again() {
        for path in PATHS {
            let (addr, accepted) = upstream(true).await;
            let c = conns(Duration::from_secs(60));
            assert_eq!(get(&c, addr, path).await.unwrap(), "ok");
            match path {
                Path::Hyper => {
                    eventually("the closed connection is noticed", || {
                        c.lock()
                            .get(&addr)
                            .is_none_or(|l| l.iter().all(|k| k.sender.is_closed()))
                    })
                    .await
                }
                Path::Own(_) => {
                    eventually("the close reaches the runtime", || c.idle_readable(addr)).await
                }
            }
            assert_eq!(get(&c, addr, path).await.unwrap(), "ok", "{path:?}");
            assert_eq!(accepted.load(Ordering::SeqCst), 2, "{path:?}");
        }
    }

    #[tokio::test]
    async fn idle_connections_are_closed_after_the_idle_timeout() {
        for path in PATHS {
            let (addr, _) = upstream(false).await;
            let c = conns(Duration::from_millis(100));
            assert_eq!(get(&c, addr, path).await.unwrap(), "ok");
            assert_eq!(kept(&c, addr, path).0, 1, "{path:?}");
            eventually("the sweeper drops the idle connection", || {
                kept(&c, addr, path).0 == 0
            })
            .await;
        }
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        for path in PATHS {
            let err = get(&conns(Duration::from_secs(60)), addr, path)
                .await
                .unwrap_err();
            assert!(err.is_connect(), "{err}");
        }
    }
}
