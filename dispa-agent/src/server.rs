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
