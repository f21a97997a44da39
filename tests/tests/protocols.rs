#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Protocols through the agent with real peers: gRPC (unary and bidirectional streaming,
//! trailers) to an HTTP/2 upstream, and WebSocket upgrades.

use std::pin::Pin;
use std::time::Duration;

use dispa_proto::v1;
use dispa_tests::*;
use futures_util::{SinkExt, Stream, StreamExt};
use tokio_tungstenite::tungstenite::Message;

/// A gRPC upstream: Admin.Status (unary) and ConfigDiscovery.Stream (one envelope per request).
struct Grpc;

#[tonic::async_trait]
impl v1::admin_server::Admin for Grpc {
    type QueryLogsStream = Pin<Box<dyn Stream<Item = Result<v1::LogRecord, tonic::Status>> + Send>>;

    async fn status(
        &self,
        r: tonic::Request<v1::StatusRequest>,
    ) -> Result<tonic::Response<v1::StatusResponse>, tonic::Status> {
        let via = r
            .metadata()
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        Ok(tonic::Response::new(v1::StatusResponse {
            version: 42,
            hash: via,
            ..Default::default()
        }))
    }

    async fn query_logs(
        &self,
        _: tonic::Request<v1::LogQuery>,
    ) -> Result<tonic::Response<Self::QueryLogsStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("test server"))
    }

    async fn apply(
        &self,
        _: tonic::Request<v1::ApplyRequest>,
    ) -> Result<tonic::Response<v1::ApplyResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("test server"))
    }

    async fn validate(
        &self,
        _: tonic::Request<v1::ValidateRequest>,
    ) -> Result<tonic::Response<v1::ValidateResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("test server"))
    }

    async fn diff(
        &self,
        _: tonic::Request<v1::DiffRequest>,
    ) -> Result<tonic::Response<v1::DiffResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("test server"))
    }

    async fn get(
        &self,
        _: tonic::Request<v1::GetRequest>,
    ) -> Result<tonic::Response<v1::GetResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("test server"))
    }

    async fn create_token(
        &self,
        _: tonic::Request<v1::CreateTokenRequest>,
    ) -> Result<tonic::Response<v1::CreateTokenResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("test server"))
    }

    async fn list_tokens(
        &self,
        _: tonic::Request<v1::ListTokensRequest>,
    ) -> Result<tonic::Response<v1::ListTokensResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("test server"))
    }

    async fn revoke_token(
        &self,
        _: tonic::Request<v1::RevokeTokenRequest>,
    ) -> Result<tonic::Response<v1::RevokeTokenResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("test server"))
    }

    async fn list_audit(
        &self,
        _: tonic::Request<v1::ListAuditRequest>,
    ) -> Result<tonic::Response<v1::ListAuditResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("test server"))
    }

    async fn history(
        &self,
        _: tonic::Request<v1::HistoryRequest>,
    ) -> Result<tonic::Response<v1::HistoryResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("test server"))
    }

    async fn rollback(
        &self,
        _: tonic::Request<v1::RollbackRequest>,
    ) -> Result<tonic::Response<v1::ApplyResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("test server"))
    }

    async fn list_agents(
        &self,
        _: tonic::Request<v1::ListAgentsRequest>,
    ) -> Result<tonic::Response<v1::ListAgentsResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("test server"))
    }

    async fn query_log_stats(
        &self,
        _: tonic::Request<v1::LogQuery>,
    ) -> Result<tonic::Response<v1::LogStats>, tonic::Status> {
        Err(tonic::Status::unimplemented("test server"))
    }
}

#[tonic::async_trait]
impl v1::config_discovery_server::ConfigDiscovery for Grpc {
    type StreamStream =
        Pin<Box<dyn Stream<Item = Result<v1::SnapshotEnvelope, tonic::Status>> + Send>>;

    async fn stream(
        &self,
        r: tonic::Request<tonic::Streaming<v1::DiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::StreamStream>, tonic::Status> {
        let inbound = r.into_inner();
        // Echo: one envelope per request, carrying the request's ack version; then a trailer
        // status the client must see.
        let out = inbound
            .map(|m| {
                let m = m?;
                let v = match m.response {
                    Some(v1::discovery_request::Response::Ack(a)) => a.version,
                    _ => 0,
                };
                Ok(v1::SnapshotEnvelope {
                    version: v * 10,
                    ..Default::default()
                })
            })
            .chain(futures_util::stream::once(async {
                Err(tonic::Status::data_loss("done: trailer status"))
            }));
        Ok(tonic::Response::new(Box::pin(out)))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_and_bidirectional_streaming_through_the_agent() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc_addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(v1::admin_server::AdminServer::new(Grpc))
            .add_service(v1::config_discovery_server::ConfigDiscoveryServer::new(
                Grpc,
            ))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "[upstreams.grpc]\nprotocol = \"h2\"\nendpoints = [\"{grpc_addr}\"]\n\n[[routes]]\nname = \"grpc\"\nhosts = [\"grpc.test\"]\nupstream = \"grpc\"\n"
    );
    let (_plane, agent) = fleet_with(dir.path(), &cfg).await;

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", agent.proxy))
        .unwrap()
        .origin("http://grpc.test".parse().unwrap())
        .connect()
        .await
        .unwrap();
    let mut admin = v1::admin_client::AdminClient::new(channel.clone());
    let status = admin
        .status(v1::StatusRequest {})
        .await
        .expect("unary call")
        .into_inner();
    assert_eq!(status.version, 42);
    assert_eq!(
        status.hash, "127.0.0.1",
        "the upstream saw X-Forwarded-For set by the agent"
    );

    let mut disco = v1::config_discovery_client::ConfigDiscoveryClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut replies = disco
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for v in 1..=5u64 {
        let ack = v1::DiscoveryRequest {
            node: None,
            response: Some(v1::discovery_request::Response::Ack(v1::Ack {
                version: v,
                nonce: String::new(),
            })),
        };
        tx.send(ack).await.unwrap();
        let env = tokio::time::timeout(Duration::from_secs(10), replies.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(
            env.version,
            v * 10,
            "each message answered in turn, both ways streaming"
        );
    }
    drop(tx);
    let end = tokio::time::timeout(Duration::from_secs(10), replies.message())
        .await
        .unwrap();
    let status = end.expect_err("the trailer status reaches the client");
    assert_eq!(status.code(), tonic::Code::DataLoss);
    assert_eq!(status.message(), "done: trailer status");
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_through_the_agent() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ws_addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(m)) = ws.next().await {
                    if m.is_text() || m.is_binary() {
                        let _ = ws.send(m).await;
                    }
                }
            });
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "[upstreams.ws]\nendpoints = [\"{ws_addr}\"]\n\n[[routes]]\nname = \"ws\"\nhosts = [\"ws.test\"]\nupstream = \"ws\"\n"
    );
    let (_plane, agent) = fleet_with(dir.path(), &cfg).await;

    let tcp = tokio::net::TcpStream::connect(agent.proxy).await.unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async("ws://ws.test/chat", tcp)
        .await
        .expect("handshake through the agent");
    assert_eq!(resp.status(), 101);
    for i in 0..20 {
        ws.send(Message::text(format!("hello {i}"))).await.unwrap();
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(m.into_text().unwrap().as_str(), format!("hello {i}"));
    }
    ws.send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .unwrap();
    let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(m.into_data().as_ref(), &[0u8, 1, 2, 255]);
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_mib_up_and_down_stream_without_buffering() {
    use http_body_util::BodyExt;
    const SIZE: u64 = 100 * 1024 * 1024;
    let up = TestUpstream::start("big").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "[upstreams.u]\nendpoints = [\"{}\"]\n\n[[routes]]\nname = \"r\"\ntimeout = \"60s\"\nupstream = \"u\"\n",
        up.addr
    );
    let (_plane, agent) = fleet_with(dir.path(), &cfg).await;
    let pid = agent.child.id().unwrap();
    let baseline = dispa_tests::process::rss_kib(pid).unwrap();
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(baseline));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                if let Some(r) = dispa_tests::process::rss_kib(pid) {
                    peak.fetch_max(r, std::sync::atomic::Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    // Upload: 100 MiB generated on the fly by the client, counted by the upstream.
    let chunk = bytes::Bytes::from(vec![b'u'; 64 * 1024]);
    let chunks =
        futures_util::stream::iter((0..SIZE / chunk.len() as u64).map(move |_| {
            Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(chunk.clone()))
        }));
    let body = BodyExt::boxed(http_body_util::StreamBody::new(chunks));
    let stream = tokio::net::TcpStream::connect(agent.proxy).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post("/upload")
        .header("host", "h")
        .body(body)
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let text = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        String::from_utf8_lossy(&text),
        SIZE.to_string(),
        "the upstream got every byte"
    );

    // Download: 100 MiB streamed from the upstream, counted by the client.
    send.ready().await.unwrap();
    let req = http::Request::get(format!("/?bytes={SIZE}"))
        .header("host", "h")
        .body(BodyExt::boxed(http_body_util::Empty::<bytes::Bytes>::new()))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let mut body = resp.into_body();
    let mut got = 0u64;
    while let Some(frame) = body.frame().await {
        got += frame.unwrap().data_ref().map_or(0, |d| d.len() as u64);
    }
    assert_eq!(got, SIZE);
    sampler.abort();
    let growth_mib = (peak
        .load(std::sync::atomic::Ordering::Relaxed)
        .saturating_sub(baseline))
        / 1024;
    assert!(
        growth_mib < 64,
        "agent RSS grew {growth_mib} MiB while streaming 200 MiB"
    );
}
