//! Accept loops for the agent's listeners, with graceful drain on shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::snapshot::Current;
use crate::telemetry::Metrics;
use crate::tls;

/// What a listener speaks on top of TCP.
#[derive(Clone)]
pub enum Transport {
    /// HTTP/1.1 and h2c (prior knowledge).
    Plain,
    /// TLS with the current snapshot's certificates, then HTTP/1.1 or HTTP/2 (by ALPN).
    Tls(Arc<Current>),
}

/// Serves `listener` from `threads` OS threads, each with its own single-threaded runtime, so a
/// connection's request, its upstream exchange and its response stay on one thread (no
/// cross-thread wake-ups per request, the largest cost of a work-stealing runtime for a proxy).
/// Every thread accepts from the same socket. Resolves when every thread has drained.
#[allow(clippy::too_many_arguments)]
pub async fn serve_on_threads<F, Fut, B>(
    name: &'static str,
    threads: usize,
    listener: TcpListener,
    transport: Transport,
    handler: F,
    shutdown: watch::Receiver<bool>,
    drain: Duration,
    metrics: Option<Arc<Metrics>>,
) where
    F: Fn(http::Request<Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<http::Response<B>, std::convert::Infallible>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let std_listener = match listener.into_std() {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(
                listener = name,
                "cannot hand the listener to worker threads: {e}"
            );
            return;
        }
    };
    let mut done = Vec::new();
    for i in 0..threads.max(1) {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let listener = match std_listener.try_clone() {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(listener = name, "cannot clone the listener: {e}");
                break;
            }
        };
        let (transport, handler, shutdown, metrics) = (
            transport.clone(),
            handler.clone(),
            shutdown.clone(),
            metrics.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name(format!("dispa-{name}-{i}"))
            .spawn(move || {
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
                        Ok(l) => serve(name, l, transport, handler, shutdown, drain, metrics).await,
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
    name: &'static str,
    listener: TcpListener,
    transport: Transport,
    handler: F,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
    metrics: Option<Arc<Metrics>>,
) where
    F: Fn(http::Request<Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<http::Response<B>, std::convert::Infallible>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let graceful = GracefulShutdown::new();
    let builder = auto::Builder::new(TokioExecutor::new());
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
        let _ = stream.set_nodelay(true);
        let h = handler.clone();
        let svc = service_fn(move |req| h(req, peer));
        let m = metrics.clone();
        if let Some(m) = &m {
            m.connections_accepted.inc();
            m.connections_open.inc();
        }
        let ended = move |r: Result<(), Box<dyn std::error::Error + Send + Sync>>| {
            if let Err(e) = r {
                tracing::debug!(listener = name, %peer, "connection ended: {e}");
            }
            if let Some(m) = m {
                m.connections_open.dec();
            }
        };
        match &transport {
            Transport::Plain => {
                let conn = builder
                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                    .into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move { ended(conn.await) });
            }
            Transport::Tls(current) => {
                let (builder, watcher, current) =
                    (builder.clone(), graceful.watcher(), current.clone());
                tokio::spawn(async move {
                    match tls::accept(stream, &current).await {
                        Ok(tls) => {
                            let conn = builder
                                .serve_connection_with_upgrades(TokioIo::new(tls), svc)
                                .into_owned();
                            ended(watcher.watch(conn).await);
                        }
                        Err(why) => {
                            tracing::info!(listener = name, %peer, "TLS handshake failed: {why}");
                            ended(Ok(()));
                        }
                    }
                });
            }
        }
    }
    drop(listener);
    tracing::info!(
        listener = name,
        "stopped accepting; draining in-flight requests"
    );
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!(listener = name, "drained"),
        _ = tokio::time::sleep(drain) => tracing::warn!(listener = name, "drain deadline passed; closing remaining connections"),
    }
}
