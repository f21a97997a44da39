//! A real HTTP/1.1 client (hyper) with keep-alive, for sending traffic through agents.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub version: http::Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// Reads a whole response.
    pub async fn read(resp: http::Response<hyper::body::Incoming>) -> Result<Reply, String> {
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok(Reply {
            status: parts.status,
            version: parts.version,
            headers: parts.headers,
            body,
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The JSON body a [`crate::TestUpstream`] answers with.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

#[derive(Clone)]
pub struct HttpClient {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Default for HttpClient {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpClient {
    /// A client whose connections come from `ip` (any 127.0.0.0/8 address works on loopback).
    pub fn from_ip(ip: std::net::IpAddr) -> Self {
        let mut c = HttpConnector::new();
        c.set_local_address(Some(ip));
        Self {
            client: Client::builder(TokioExecutor::new()).build(c),
        }
    }

    /// A request with any method, extra headers and a body.
    pub async fn send(&self, req: Request<Full<Bytes>>) -> Result<Reply, String> {
        let fut = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| format!("{e:?}"))?;
            Reply::read(resp).await
        };
        tokio::time::timeout(Duration::from_secs(30), fut)
            .await
            .map_err(|_| "timed out".to_string())?
    }

    pub fn new() -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
        }
    }

    /// GET `url`, with an optional Host header. Times out after 30 s.
    pub async fn get(&self, url: &str, host: Option<&str>) -> Result<Reply, String> {
        let mut b = Request::get(url);
        if let Some(h) = host {
            b = b.header(http::header::HOST, h);
        }
        let req = b.body(Full::new(Bytes::new())).map_err(|e| e.to_string())?;
        self.send(req).await
    }
}

/// One HTTP/2 request with prior knowledge (h2c) to `addr`, with `:authority` = `authority`.
pub async fn h2c_get(
    addr: std::net::SocketAddr,
    authority: &str,
    path: &str,
) -> Result<Reply, String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = Request::get(format!("http://{authority}{path}"))
        .version(http::Version::HTTP_2)
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    Reply::read(resp).await
}
