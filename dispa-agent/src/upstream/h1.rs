//! HTTP/1.1 upstream connections of one thread (one lane of a [`super::Pool`]), on the request
//! path instead of hyper-util's pool: a request takes a ready connection to its endpoint or
//! opens one, and the connection goes back on the endpoint's list as soon as the request is
//! handed to it. It is taken again once hyper says it is ready (the previous response read to
//! its end). No pool key is built or hashed per request and no task is spawned per response
//! to return a connection; each connection's task stays on the thread that opened it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use tower_service::Service;

use crate::proxy::CountedBody;
use crate::tls::Connector;

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
    /// From the pooled (HTTP/2) client.
    #[error("upstream request failed")]
    Pooled(#[source] hyper_util::client::legacy::Error),
}

impl SendError {
    /// No connection could be made: nothing reached the upstream.
    pub fn is_connect(&self) -> bool {
        match self {
            SendError::Connect(..) => true,
            SendError::Exchange(_) => false,
            SendError::Pooled(e) => e.is_connect(),
        }
    }
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
            sweeping: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<SocketAddr, Vec<Kept>>> {
        // Each update is one push or removal; a poisoned map is still consistent.
        self.by_endpoint
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sends `req` (origin-form URI) to `addr`. A request a kept connection could not take
    /// (it was closing) goes out once more on a new connection.
    pub async fn send(
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
        let now = Instant::now();
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
            since: Instant::now(),
        });
    }

    async fn connect(
        self: &Arc<Self>,
        addr: SocketAddr,
    ) -> Result<SendRequest<CountedBody>, SendError> {
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
        let (sender, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(SendError::Exchange)?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(%addr, "upstream connection ended: {e}");
            }
        });
        if !self.sweeping.swap(true, Ordering::Relaxed) {
            tokio::spawn(sweep(Arc::downgrade(self)));
        }
        Ok(sender)
    }

    /// Drops closed connections and those idle past the idle timeout.
    fn sweep_now(&self) {
        let now = Instant::now();
        let mut map = self.lock();
        map.retain(|_, list| {
            list.retain(|k| !self.stale(k, now));
            !list.is_empty()
        });
    }
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
    use http_body_util::BodyExt;
    use std::sync::atomic::AtomicUsize;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// An upstream answering "ok" to each request head; `close_after` closes the connection
    /// after each response (without saying so). Counts accepted connections.
    async fn upstream(close_after: bool) -> (SocketAddr, Arc<AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    loop {
                        let Ok(n) = s.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            let resp = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if s.write_all(resp).await.is_err() || close_after {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    fn conns(idle: Duration) -> Arc<H1Conns> {
        Arc::new(H1Conns::new(
            Connector::new(Duration::from_secs(2), None),
            "http",
            idle,
        ))
    }

    async fn get(c: &Arc<H1Conns>, addr: SocketAddr) -> Result<String, SendError> {
        let mut req = Request::new(CountedBody::new(None, Arc::default()));
        *req.uri_mut() = "/".parse().unwrap();
        req.headers_mut()
            .insert(http::header::HOST, "up".parse().unwrap());
        let resp = c.send(addr, req).await?;
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    /// Waits (bounded) until `f` holds.
    async fn eventually(what: &str, f: impl Fn() -> bool) {
        for _ in 0..500 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("never: {what}");
    }

    #[tokio::test]
    async fn sequential_requests_reuse_one_connection() {
        let (addr, accepted) = upstream(false).await;
        let c = conns(Duration::from_secs(60));
        for _ in 0..5 {
            // The connection is ready again once its response was read to the end.
            eventually("a kept connection is ready", || {
                c.lock()
                    .get(&addr)
                    .is_none_or(|l| l.iter().any(|k| k.sender.is_ready()))
            })
            .await;
            assert_eq!(get(&c, addr).await.unwrap(), "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_is_not_used_again() {
        let (addr, accepted) = upstream(true).await;
        let c = conns(Duration::from_secs(60));
        assert_eq!(get(&c, addr).await.unwrap(), "ok");
        eventually("the closed connection is noticed", || {
            c.lock()
                .get(&addr)
                .is_none_or(|l| l.iter().all(|k| k.sender.is_closed()))
        })
        .await;
        assert_eq!(get(&c, addr).await.unwrap(), "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn idle_connections_are_closed_after_the_idle_timeout() {
        let (addr, _) = upstream(false).await;
        let c = conns(Duration::from_millis(100));
        assert_eq!(get(&c, addr).await.unwrap(), "ok");
        assert_eq!(c.lock().get(&addr).map(Vec::len), Some(1));
        eventually("the sweeper drops the idle connection", || {
            c.lock().get(&addr).is_none()
        })
        .await;
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let err = get(&conns(Duration::from_secs(60)), addr)
            .await
            .unwrap_err();
        assert!(err.is_connect(), "{err}");
    }
}
