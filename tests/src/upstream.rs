//! A real HTTP upstream that reports what it received: its name, the path, and every header.
//! `?sleep_ms=N` delays the answer, for timeout and drain tests.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub struct TestUpstream {
    pub name: String,
    pub addr: SocketAddr,
    pub hits: Arc<AtomicU64>,
    task: JoinHandle<()>,
    kill: tokio::sync::watch::Sender<bool>,
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        self.task.abort();
        let _ = self.kill.send(true);
    }
}

async fn answer(
    name: Arc<str>,
    hits: Arc<AtomicU64>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    hits.fetch_add(1, Ordering::Relaxed);
    if let Some(ms) = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("sleep_ms=")))
        .and_then(|v| v.parse::<u64>().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let headers: serde_json::Map<String, serde_json::Value> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                serde_json::Value::String(v.to_str().unwrap_or("").to_string()),
            )
        })
        .collect();
    let body = serde_json::json!({
        "upstream": &*name,
        "method": req.method().as_str(),
        "path": req.uri().path(),
        "query": req.uri().query(),
        "headers": headers,
    });
    Ok(Response::new(Full::new(Bytes::from(body.to_string()))))
}

impl TestUpstream {
    pub async fn start(name: &str) -> TestUpstream {
        Self::start_at(name, "127.0.0.1:0".parse().expect("addr")).await
    }

    /// Starts on a given address (to bring a stopped upstream back where it was).
    pub async fn start_at(name: &str, addr: SocketAddr) -> TestUpstream {
        let listener = TcpListener::bind(addr).await.expect("bind upstream");
        let addr = listener.local_addr().expect("upstream addr");
        let hits = Arc::new(AtomicU64::new(0));
        let name_arc: Arc<str> = name.into();
        let h = hits.clone();
        let (kill, killed) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (name, hits, mut killed) = (name_arc.clone(), h.clone(), killed.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req| answer(name.clone(), hits.clone(), req));
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let conn = builder.serve_connection(TokioIo::new(stream), svc);
                    // Stopping the upstream drops its open connections too, like a crash.
                    tokio::select! {
                        _ = conn => {}
                        _ = killed.changed() => {}
                    }
                });
            }
        });
        TestUpstream {
            name: name.into(),
            addr,
            hits,
            task,
            kill,
        }
    }
}

/// An address on loopback where nothing listens: connections to it are refused.
pub fn refused_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}
