//! The agent's HTTP/1 request path on raw bytes, as the agent runs it over an in-memory stream:
//! the framing tracker in front of the agent's own HTTP/1.1 path, which hands the connection
//! to hyper's server at the first request it does not take; then the request hygiene checks,
//! then the whole body. Never panics, and never accepts a request whose head the tracker
//! refused.
#![no_main]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dispa_agent::conn::h1::{self, Outcome};
use dispa_agent::conn::{ClientBody, ConnIo, Framing, Shared, Tracker};
use dispa_agent::proxy::hygiene::check_request;
use dispa_proto::config::model::DEFAULT_LIMITS;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the proxy service would do first: the checks, then the body.
async fn answer(mut req: Request<ClientBody>) -> Result<Response<String>, Infallible> {
    let refused = matches!(req.extensions().get::<Framing>(), Some(Framing(Err(_))));
    let checked = check_request(&mut req, &DEFAULT_LIMITS);
    assert!(!(refused && checked.is_ok()), "a refused head passed the checks");
    if checked.is_ok() {
        drain(req.into_body()).await;
    }
    let mut r = Response::new(String::new());
    *r.status_mut() = if checked.is_ok() {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    };
    Ok(r)
}

async fn serve(data: Vec<u8>) {
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    let shared = Shared::new(Some(Tracker::new(16 * 1024, 100)), Instant::now());
    let io = ConnIo::new(server, Bytes::new()).tracked(shared.clone());
    let peer: SocketAddr = ([127, 0, 0, 1], 1).into();
    let handler = |req: Request<ClientBody>, _: SocketAddr| answer(req);
    let svc_shared = shared.clone();
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let mut req = req.map(ClientBody::Stream);
        let (guard, verdict) = svc_shared.begin(true);
        if let Some(v) = verdict {
            req.extensions_mut().insert(v);
        }
        async move {
            let _guard = guard;
            answer(req).await
        }
    });
    let server_side = async move {
        if let Ok(Outcome::HandOff(io, read)) =
            h1::serve(io, shared, peer, &handler, 16 * 1024).await
        {
            let _ = hyper::server::conn::http1::Builder::new()
                .max_buf_size(16 * 1024)
                .serve_connection(TokioIo::new(ConnIo::new(io, read)), svc)
                .await;
        }
    };
    let client_side = async move {
        let _ = client.write_all(&data).await;
        let _ = client.shutdown().await;
        let mut sink = Vec::new();
        let _ = client.read_to_end(&mut sink).await;
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        tokio::join!(server_side, client_side)
    })
    .await;
}

/// Reads a body to its end without http-body-util (not a dependency here).
async fn drain(mut body: ClientBody) {
    use hyper::body::Body;
    let mut body = std::pin::Pin::new(&mut body);
    while let Some(Ok(_)) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {}
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
