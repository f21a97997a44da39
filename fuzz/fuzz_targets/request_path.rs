//! The agent's HTTP/1 request path on raw bytes: the framing tracker in front of hyper's server
//! (as the agent runs it, over an in-memory stream), then the request hygiene checks, then the
//! whole body. Never panics, and never accepts a request whose head the tracker refused.
#![no_main]

use std::convert::Infallible;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dispa_agent::conn::{ConnIo, Framing, Shared, Tracker};
use dispa_agent::proxy::hygiene::check_request;
use dispa_proto::config::model::DEFAULT_LIMITS;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn serve(data: Vec<u8>) {
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    let shared = Shared::new(Some(Tracker::new(16 * 1024, 100)), Instant::now());
    let io = ConnIo::new(server, Bytes::new()).tracked(shared.clone());
    let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        let (guard, verdict) = shared.begin(true);
        let refused = matches!(verdict, Some(Framing(Err(_))));
        if let Some(v) = verdict {
            req.extensions_mut().insert(v);
        }
        async move {
            let _guard = guard;
            let checked = check_request(&mut req, &DEFAULT_LIMITS);
            assert!(!(refused && checked.is_ok()), "a refused head passed the checks");
            if checked.is_ok() {
                use http_body_util_free::drain;
                drain(req.into_body()).await;
            }
            let mut r = Response::new(String::new());
            *r.status_mut() = if checked.is_ok() {
                StatusCode::OK
            } else {
                StatusCode::BAD_REQUEST
            };
            Ok::<_, Infallible>(r)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .max_buf_size(16 * 1024)
        .serve_connection(TokioIo::new(io), svc);
    let client_side = async move {
        let _ = client.write_all(&data).await;
        let _ = client.shutdown().await;
        let mut sink = Vec::new();
        let _ = client.read_to_end(&mut sink).await;
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        tokio::join!(conn, client_side)
    })
    .await;
}

/// Reads a body to its end without http-body-util (not a dependency here).
mod http_body_util_free {
    use hyper::body::{Body, Incoming};

    pub async fn drain(mut body: Incoming) {
        let mut body = std::pin::Pin::new(&mut body);
        while let Some(Ok(_)) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {}
    }
}

fuzz_target!(|data: &[u8]| {
    thread_local! {
        static RT: Option<tokio::runtime::Runtime> = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .ok();
    }
    RT.with(|rt| {
        if let Some(rt) = rt {
            rt.block_on(serve(data.to_vec()));
        }
    });
});
