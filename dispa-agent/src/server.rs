//! Accept loops for the agent's listeners, with graceful drain on shutdown.
//!
//! Per connection, in order: the listener's connection limit, the PROXY header (when enabled,
//! from trusted peers only), the per-client-IP limit, TLS, then HTTP/1 on the agent's own path
//! ([`h1`]) until a request it does not take, then hyper for the rest of the connection (and
//! for HTTP/2 by ALPN), configured from the limits of the snapshot current at accept time,
//! watched for header and idle timeouts.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dispa_proto::config::model::{DEFAULT_LIMITS, Limits};
use hyper::body::{Body, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use crate::conn::{
    self, ClientBody, ConnIo, ConnLimiter, Shared, Tracked, Tracker, Watch, h1, proxy_protocol,
};
use crate::snapshot::{Current, RuntimeSnapshot};
use crate::telemetry::{Metrics, ReasonLabels};
use crate::tls;

/// hyper refuses a read buffer smaller than this.
const MIN_BUF: usize = 8192;
/// HTTP/2 streams a client may reset before the agent has accepted them (rapid reset,
/// CVE-2023-44487), and streams the agent may reset for protocol errors (MadeYouReset);
/// past either the connection gets GOAWAY.
const H2_MAX_PENDING_RESETS: usize = 20;
const H2_MAX_LOCAL_ERROR_RESETS: usize = 200;
/// How long a connection told to close may take to finish what it is writing.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// What a listener speaks on top of TCP.
#[derive(Clone)]
pub enum Transport {
    /// HTTP/1.1 and h2c (prior knowledge).
    Plain,
    /// TLS with the current snapshot's certificates, then HTTP/1.1 or HTTP/2 (by ALPN).
    Tls,
}

/// How a listener treats its clients.
#[derive(Clone)]
pub struct ListenerOptions {
    pub name: &'static str,
    pub transport: Transport,
    /// Limits, trusted proxies and certificates come from here; defaults without a snapshot.
    pub current: Arc<Current>,
    /// Require a PROXY protocol header first.
    pub proxy_protocol: bool,
    pub drain: Duration,
    pub metrics: Option<Arc<Metrics>>,
    /// Open-connection counts, shared by every thread serving this listener.
    pub limiter: Arc<ConnLimiter>,
    /// Serving thread i runs only on CPU `cpus[i % len]`; empty: threads not pinned.
    pub cpus: Arc<[usize]>,
}

fn count(
    family: &prometheus_client::metrics::family::Family<
        ReasonLabels,
        prometheus_client::metrics::counter::Counter,
    >,
    reason: &str,
) {
    family
        .get_or_create(&ReasonLabels {
            reason: reason.to_string(),
        })
        .inc();
}

/// The watchdog's verdict, with the state unlocked again before anything acts on it.
fn watch_now(shared: &Shared, limits: &Limits) -> Watch {
    let state = shared.lock();
    conn::watch(&state, Instant::now(), limits)
}

/// The longest request head read, from the limits (never below hyper's minimum buffer).
fn max_head(limits: &Limits) -> usize {
    usize::try_from(limits.max_header_bytes)
        .unwrap_or(usize::MAX)
        .max(MIN_BUF)
}

/// The hyper builder for one connection, from the limits current at accept time.
fn builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        // The watchdog closes slow heads after header_timeout and idle connections after
        // idle_timeout; hyper's own head timer would cost a boxed timer per request.
        .header_read_timeout(None)
        .max_headers(usize::try_from(limits.max_header_count).unwrap_or(100))
        .max_buf_size(max_head(limits));
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
        .max_local_error_reset_streams(H2_MAX_LOCAL_ERROR_RESETS)
        .max_header_list_size(limits.max_header_bytes);
    b
}

/// Serves `listener` from `threads` OS threads, each with its own single-threaded runtime, so a
/// connection's request, its upstream exchange and its response stay on one thread (no
/// cross-thread wake-ups per request; 1.37x the RPS of one work-stealing runtime, see
/// docs/BENCHMARKS.md).
/// Each thread accepts from its own socket of `listener`'s `SO_REUSEPORT` group
/// ([`crate::reuse`]), or from `listener` itself where it cannot join one. Resolves when every
/// thread has drained.
#[allow(clippy::too_many_arguments)]
pub async fn serve_on_threads<F, Fut, B>(
    threads: usize,
    listener: TcpListener,
    opts: ListenerOptions,
    handler: F,
    shutdown: watch::Receiver<bool>,
) where
    F: Fn(http::Request<ClientBody>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<http::Response<B>, std::convert::Infallible>> + Send + 'static,
    B: Body + crate::conn::head::CarriesFields + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let name = opts.name;
    let first = match listener.into_std() {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(
                listener = name,
                "cannot hand the listener to worker threads: {e}"
            );
            return;
        }
    };
    let mut std_listeners = vec![first];
    for _ in 1..threads {
        // A socket of its own in the group, or else a share of the first.
        let first = &std_listeners[0];
        let own = first
            .local_addr()
            .and_then(crate::reuse::join)
            .and_then(TcpListener::into_std)
            .or_else(|e| {
                tracing::warn!(
                    listener = name,
                    "a serving thread shares the first socket: {e}"
                );
                first.try_clone()
            });
        match own {
            Ok(l) => std_listeners.push(l),
            Err(e) => {
                tracing::error!(listener = name, "cannot clone the listener: {e}");
                break;
            }
        }
    }
    let mut done = Vec::new();
    for (i, listener) in std_listeners.into_iter().enumerate() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (opts, handler, shutdown) = (opts.clone(), handler.clone(), shutdown.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("dispa-{name}-{i}"))
            .spawn(move || {
                if let Some(cpu) = crate::affinity::cpu_for(&opts.cpus, i)
                    && let Err(e) = crate::affinity::pin_current(cpu)
                {
                    tracing::warn!(listener = name, cpu, "serving thread not pinned: {e}");
                }
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(listener = name, "cannot start a worker runtime: {e}");
                        return;
                    }
                };
                rt.block_on(async move {
                    match TcpListener::from_std(listener) {
                        Ok(l) => serve(l, opts, handler, shutdown).await,
                        Err(e) => {
                            tracing::error!(listener = name, "cannot register the listener: {e}")
                        }
                    }
                });
                let _ = tx.send(());
            });
        match spawned {
            Ok(_) => done.push(rx),
            Err(e) => tracing::error!(listener = name, "cannot start a worker thread: {e}"),
        }
    }
    for rx in done {
        let _ = rx.await;
    }
}

/// Serves HTTP on `listener` until `shutdown` turns true, then stops accepting and waits up
/// to `drain` for in-flight requests to finish.
pub async fn serve<F, Fut, B>(
    listener: TcpListener,
    opts: ListenerOptions,
    handler: F,
    mut shutdown: watch::Receiver<bool>,
) where
    F: Fn(http::Request<ClientBody>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<http::Response<B>, std::convert::Infallible>> + Send + 'static,
    B: Body + crate::conn::head::CarriesFields + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let name = opts.name;
    let limiter = opts.limiter.clone();
    // Every connection task holds a sender; recv() returns None when all have finished.
    let (alive, mut drained) = mpsc::channel::<()>(1);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => break,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and similar: back off instead of spinning.
                tracing::warn!(listener = name, "accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let snapshot = opts.current.load();
        let limits = snapshot
            .as_ref()
            .map_or(DEFAULT_LIMITS, |s| s.config.policy.limits.clone());
        let permit = match limiter.acquire(limits.max_connections) {
            Ok(p) => p,
            Err(why) => {
                if let Some(m) = &opts.metrics {
                    count(&m.connections_refused, why.reason());
                }
                tracing::debug!(listener = name, %peer, "connection refused: {why}");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        if let Some(m) = &opts.metrics {
            m.connections_accepted.inc();
            m.connections_open.inc();
        }
        let conn = Conn {
            opts: opts.clone(),
            handler: handler.clone(),
            limits,
            snapshot,
            shutdown: shutdown.clone(),
        };
        let alive = alive.clone();
        tokio::spawn(async move {
            let metrics = conn.opts.metrics.clone();
            conn.run(stream, peer, permit).await;
            if let Some(m) = metrics {
                m.connections_open.dec();
            }
            drop(alive);
        });
    }
    drop(listener);
    drop(alive);
    tracing::info!(
        listener = name,
        "stopped accepting; draining in-flight requests"
    );
    tokio::select! {
        _ = drained.recv() => tracing::info!(listener = name, "drained"),
        _ = tokio::time::sleep(opts.drain) => tracing::warn!(listener = name, "drain deadline passed; closing remaining connections"),
    }
}

/// One accepted connection and what it needs.
struct Conn<F> {
    opts: ListenerOptions,
    handler: F,
    limits: Limits,
    snapshot: Option<Arc<RuntimeSnapshot>>,
    shutdown: watch::Receiver<bool>,
}

impl<F, Fut, B> Conn<F>
where
    F: Fn(http::Request<ClientBody>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<http::Response<B>, std::convert::Infallible>> + Send + 'static,
    B: Body + crate::conn::head::CarriesFields + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn refuse(&self, family: &'static str, reason: &'static str) {
        if let Some(m) = &self.opts.metrics {
            match family {
                "proxy" => count(&m.proxy_protocol_rejected, reason),
                _ => count(&m.connections_refused, reason),
            }
        }
    }

    async fn run(self, mut stream: TcpStream, tcp_peer: SocketAddr, mut permit: conn::Permit) {
        let name = self.opts.name;
        let mut peer = tcp_peer;
        let mut prefix = Bytes::new();
        if self.opts.proxy_protocol {
            // Only a trusted balancer may say who the client is; anyone else is cut off
            // before a byte is read.
            let trusted = self.snapshot.as_ref().is_some_and(|s| {
                s.config
                    .policy
                    .trusted_proxies
                    .iter()
                    .any(|c| c.contains(tcp_peer.ip()))
            });
            if !trusted {
                tracing::info!(listener = name, peer = %tcp_peer, "PROXY protocol from an untrusted peer; closing");
                self.refuse("proxy", "untrusted");
                return;
            }
            match proxy_protocol::read_header(&mut stream, self.limits.header_timeout).await {
                Ok((source, rest)) => {
                    if let Some(s) = source {
                        peer = s;
                    }
                    prefix = rest;
                }
                Err(e) => {
                    tracing::info!(listener = name, peer = %tcp_peer, "PROXY header refused: {e}");
                    self.refuse("proxy", e.reason());
                    return;
                }
            }
        }
        if let Err(why) = permit.for_ip(peer.ip(), self.limits.max_connections_per_ip) {
            tracing::debug!(listener = name, %peer, "connection refused: {why}");
            self.refuse("conn", why.reason());
            return;
        }
        let io = ConnIo::new(stream, prefix);
        match self.opts.transport {
            Transport::Plain => self.serve_plain(io, peer).await,
            // Boxed: a handshake's state would otherwise size every plain connection's task.
            Transport::Tls => Box::pin(self.serve_tls(io, peer)).await,
        }
        drop(permit);
    }

    async fn serve_tls(&self, io: ConnIo<TcpStream>, peer: SocketAddr) {
        match tls::accept(io, &self.opts.current).await {
            Ok(tls) => {
                let h1 = tls.get_ref().1.alpn_protocol() != Some(b"h2");
                let shared = Shared::new(self.tracker(h1), Instant::now());
                let io = ConnIo::new(tls, Bytes::new()).tracked(shared.clone());
                if h1 {
                    self.serve_h1(io, shared, peer).await;
                } else {
                    self.serve_hyper(io, shared, peer, false).await;
                }
            }
            Err(why) => {
                tracing::info!(listener = self.opts.name, %peer, "TLS handshake failed: {why}");
                if let Some(m) = &self.opts.metrics {
                    m.tls_handshake_failures.inc();
                }
            }
        }
    }

    /// The HTTP/1 framing tracker for a connection that may speak HTTP/1.
    fn tracker(&self, h1: bool) -> Option<Tracker> {
        h1.then(|| {
            Tracker::new(
                max_head(&self.limits),
                usize::try_from(self.limits.max_header_count).unwrap_or(100),
            )
        })
    }

    async fn serve_plain(&self, io: ConnIo<TcpStream>, peer: SocketAddr) {
        let shared = Shared::new(self.tracker(true), Instant::now());
        let io = io.tracked(shared.clone());
        self.serve_h1(io, shared, peer).await;
    }

    /// HTTP/1 (or h2c): the agent's own HTTP/1.1 path ([`h1`]) first; hyper takes over for the
    /// rest of the connection at the first request that path does not take (bodies, upgrades,
    /// h2c prior knowledge).
    async fn serve_h1<S>(&self, io: ConnIo<S>, shared: Shared, peer: SocketAddr)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        ConnIo<S>: h1::ReadReady,
    {
        let fast = h1::serve(
            io,
            shared.clone(),
            peer,
            &self.handler,
            max_head(&self.limits),
        );
        let stop = |_: std::pin::Pin<&mut _>| {
            let mut s = shared.lock();
            s.closing = true;
            s.in_flight == 0
        };
        match self
            .watched(&shared, peer, std::pin::pin!(fast), stop)
            .await
        {
            Some(Ok(h1::Outcome::HandOff(io, read))) => {
                // Boxed: hyper's connection would otherwise size every connection's task.
                // Past the first request the connection is HTTP/1 for good: a late h2
                // preface must not turn it into HTTP/2.
                let h1_only = shared.lock().requests > 0;
                let io = ConnIo::new(io, read);
                Box::pin(self.serve_hyper(io, shared, peer, h1_only)).await;
            }
            Some(Ok(h1::Outcome::Closed)) | None => {}
            Some(Err(e)) => {
                tracing::debug!(listener = self.opts.name, %peer, "connection ended: {e}")
            }
        }
    }

    /// Serves HTTP with hyper on a stream whose reads `shared` tracks; `h1_only`: no h2c.
    async fn serve_hyper<S>(&self, io: S, shared: Shared, peer: SocketAddr, h1_only: bool)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let h = self.handler.clone();
        let svc_shared = shared.clone();
        let svc = service_fn(move |req: http::Request<Incoming>| {
            let mut req = req.map(ClientBody::Stream);
            let http1 = req.version() <= http::Version::HTTP_11;
            let (guard, verdict) = svc_shared.begin(http1);
            if let Some(v) = verdict {
                req.extensions_mut().insert(v);
            }
            // Boxed: hyper keeps a slot for the request future in every connection for its
            // whole life; inline, its size would cost each idle connection.
            let fut = Box::pin(h(req, peer));
            async move {
                let mut resp = fut.await?;
                // hyper writes the header map only.
                crate::conn::head::materialize(&mut resp);
                Ok::<_, std::convert::Infallible>(resp.map(|b| Tracked::new(b, guard)))
            }
        });
        let mut builder = builder(&self.limits);
        if h1_only {
            builder = builder.http1_only();
        }
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(io), svc)
            .into_owned();
        let graceful = |c: std::pin::Pin<&mut _>| {
            auto::UpgradeableConnection::graceful_shutdown(c);
            false
        };
        let result = self
            .watched(&shared, peer, std::pin::pin!(conn), graceful)
            .await;
        // hyper is done with the stream; an upgraded tunnel reads it without tracking.
        shared.lock().handed_off = true;
        if let Some(Err(e)) = result {
            self.count_error(&*e);
            tracing::debug!(listener = self.opts.name, %peer, "connection ended: {e}");
        }
    }

    /// Runs a connection under the watchdog (header and idle timeouts) and the shutdown
    /// signal. `stop` asks it to finish the request in progress and end, and says whether it
    /// may be dropped at once. `None`: it was dropped, or cut off at the deadline.
    async fn watched<C: Future>(
        &self,
        shared: &Shared,
        peer: SocketAddr,
        mut conn: std::pin::Pin<&mut C>,
        mut stop: impl FnMut(std::pin::Pin<&mut C>) -> bool,
    ) -> Option<C::Output> {
        let name = self.opts.name;
        let limits = &self.limits;
        let mut shutdown = self.shutdown.clone();
        let probe = self.shutdown.clone();
        let mut closing: Option<tokio::time::Instant> = None;
        let mut stop_asked = *shutdown.borrow();
        // Made once: a `changed()` made on every wake-up would join and leave the channel's
        // waiter list (two lock round trips) each time.
        // Unconstrained: with the task's cooperative budget spent, `changed()` would return
        // Pending without joining the waiter list, and the shortcut below would never poll it
        // again.
        let stopping = tokio::task::unconstrained(async move {
            while shutdown.changed().await.is_ok() {
                if *shutdown.borrow() {
                    return;
                }
            }
        });
        tokio::pin!(stopping);
        // And polled again only when the channel moved on: `select!` polls every branch on
        // each wake-up of the task (a few per request), and a waiting `changed()` locks the
        // channel's waiter list on every poll. Its waiter holds this task's waker, which is
        // the same on every poll (checked), so nothing is missed.
        let mut waiting_with: Option<std::task::Waker> = None;
        let mut stopping = std::future::poll_fn(move |cx| {
            let same_waker = waiting_with
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()));
            if same_waker && matches!(probe.has_changed(), Ok(false)) {
                return std::task::Poll::Pending;
            }
            let polled = stopping.as_mut().poll(cx);
            if polled.is_pending() && !same_waker {
                waiting_with = Some(cx.waker().clone());
            }
            polled
        });
        // One timer for the connection's life, moved rather than remade on every wake-up
        // (moving a deadline later does not touch tokio's timer wheel).
        let timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(timer);
        loop {
            if stop_asked && closing.is_none() {
                if stop(conn.as_mut()) {
                    return None;
                }
                // Drain is bounded by the listener's deadline, not by CLOSE_GRACE.
                closing = Some(tokio::time::Instant::now() + self.opts.drain);
            }
            let next = match closing {
                Some(at) => at,
                None => match watch_now(shared, limits) {
                    Watch::Until(t) => tokio::time::Instant::from_std(t),
                    Watch::Close(why) => {
                        tracing::debug!(listener = name, %peer, "closing connection: {}", why.reason());
                        if let Some(m) = &self.opts.metrics {
                            count(&m.connections_closed, why.reason());
                        }
                        if stop(conn.as_mut()) {
                            return None;
                        }
                        let at = tokio::time::Instant::now() + CLOSE_GRACE;
                        closing = Some(at);
                        at
                    }
                },
            };
            if timer.deadline() != next {
                timer.as_mut().reset(next);
            }
            // After each poll of the connection: brought forward to the earliest deadline a
            // request inside waits for (`clock::Deadline`), so that it is polled again then.
            let timed = std::future::poll_fn(|cx| {
                if let Some(w) = crate::clock::wanted().map(tokio::time::Instant::from_std)
                    && w < timer.deadline()
                {
                    timer.as_mut().reset(w);
                }
                timer.as_mut().poll(cx)
            });
            tokio::select! {
                // The connection first: the timer reads what its poll wanted.
                biased;
                // The clock read once per wake-up of the connection (see `clock`).
                r = crate::clock::Polled(conn.as_mut()) => return Some(r),
                _ = timed => {
                    if closing.is_some_and(|at| tokio::time::Instant::now() >= at) {
                        return None;
                    }
                }
                () = &mut stopping, if !stop_asked => {
                    stop_asked = true;
                }
            }
        }
    }

    /// Counts requests hyper refused itself (malformed heads, too large, bad bodies).
    fn count_error(&self, e: &(dyn std::error::Error + 'static)) {
        let Some(m) = &self.opts.metrics else { return };
        let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(s) = src {
            if let Some(h) = s.downcast_ref::<hyper::Error>() {
                let reason = if h.is_parse_too_large() {
                    "head_too_large"
                } else if h.is_parse() {
                    "malformed_head"
                } else {
                    return;
                };
                count(&m.denied, reason);
                return;
            }
            src = s.source();
        }
    }
}
