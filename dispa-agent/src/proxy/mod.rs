//! The request path: request -> snapshot -> route -> endpoint -> upstream -> response.

mod headers;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, Uri, header};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

use crate::routing::normalize_host;
use crate::snapshot::{CompiledRoute, Current};
use crate::telemetry::Metrics;

pub type ProxyBody = Either<Incoming, Full<Bytes>>;

/// Where a failure came from, for the status, the body, and the `proxy_errors` metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    NoSnapshot,
    BadRequest,
    NoRoute,
    NoEndpoint,
    UpstreamRefused,
    UpstreamTimeout,
    UpstreamFailed,
}

impl Failure {
    fn status(self) -> StatusCode {
        match self {
            Failure::NoSnapshot | Failure::NoEndpoint => StatusCode::SERVICE_UNAVAILABLE,
            Failure::BadRequest => StatusCode::BAD_REQUEST,
            Failure::NoRoute => StatusCode::NOT_FOUND,
            Failure::UpstreamRefused | Failure::UpstreamFailed => StatusCode::BAD_GATEWAY,
            Failure::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// Short bodies that name no internals.
    fn body(self) -> &'static str {
        match self {
            Failure::NoSnapshot => "no configuration loaded yet\n",
            Failure::BadRequest => "bad request: missing or invalid Host\n",
            Failure::NoRoute => "no route for this request\n",
            Failure::NoEndpoint => "no upstream endpoint available\n",
            Failure::UpstreamRefused => "upstream refused the connection\n",
            Failure::UpstreamTimeout => "upstream timed out\n",
            Failure::UpstreamFailed => "upstream connection failed\n",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Failure::NoSnapshot => "no_snapshot",
            Failure::BadRequest => "bad_request",
            Failure::NoRoute => "no_route",
            Failure::NoEndpoint => "no_endpoint",
            Failure::UpstreamRefused => "upstream_refused",
            Failure::UpstreamTimeout => "upstream_timeout",
            Failure::UpstreamFailed => "upstream_failed",
        }
    }

    fn response(self) -> Response<ProxyBody> {
        let mut r = Response::new(Either::Right(Full::new(Bytes::from_static(
            self.body().as_bytes(),
        ))));
        *r.status_mut() = self.status();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    }
}

/// Shared by every connection of the proxy listener.
pub struct Proxy {
    current: Arc<Current>,
    metrics: Arc<Metrics>,
}

impl Proxy {
    pub fn new(current: Arc<Current>, metrics: Arc<Metrics>) -> Self {
        Self { current, metrics }
    }

    pub async fn serve(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let start = Instant::now();
        self.metrics.in_flight.inc();
        let (route, resp) = self.handle(req, peer).await;
        self.metrics.in_flight.dec();
        let route = route.unwrap_or_default();
        self.metrics
            .requests
            .get_or_create(&crate::telemetry::metrics_labels::request(
                &route,
                resp.status(),
            ))
            .inc();
        self.metrics
            .request_duration
            .get_or_create(&crate::telemetry::metrics_labels::route(&route))
            .observe(start.elapsed().as_secs_f64());
        Ok(resp)
    }

    fn fail(&self, f: Failure) -> Response<ProxyBody> {
        self.metrics
            .proxy_errors
            .get_or_create(&crate::telemetry::metrics_labels::error(f.kind()))
            .inc();
        f.response()
    }

    async fn handle(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> (Option<String>, Response<ProxyBody>) {
        // One snapshot for the whole request, however many swaps happen meanwhile.
        let Some(snapshot) = self.current.load() else {
            return (None, self.fail(Failure::NoSnapshot));
        };
        let Some(raw_host) = headers::request_host(&req) else {
            return (None, self.fail(Failure::BadRequest));
        };
        let host = normalize_host(&raw_host);
        let Some(route) = snapshot
            .routes
            .lookup(&host, req.uri().path(), req.method().as_str())
        else {
            return (None, self.fail(Failure::NoRoute));
        };
        let name = route.name.to_string();
        let resp = self.forward(route, req, peer, raw_host).await;
        (Some(name), resp)
    }

    async fn forward(
        &self,
        route: &CompiledRoute,
        req: Request<Incoming>,
        peer: SocketAddr,
        raw_host: String,
    ) -> Response<ProxyBody> {
        let Some(endpoint) = route.upstream.pick() else {
            return self.fail(Failure::NoEndpoint);
        };
        let (mut parts, body) = req.into_parts();
        let path = route.rewrite_path(parts.uri.path());
        let target = match parts.uri.query() {
            Some(q) => format!("http://{endpoint}{path}?{q}"),
            None => format!("http://{endpoint}{path}"),
        };
        let Ok(uri) = target.parse::<Uri>() else {
            return self.fail(Failure::BadRequest);
        };
        parts.uri = uri;
        parts.version = http::Version::HTTP_11;
        headers::strip_hop_by_hop(&mut parts.headers);
        headers::set_forwarded(&mut parts.headers, peer, &raw_host, "http");
        route.request_headers.apply(&mut parts.headers);
        let upstream_req = Request::from_parts(parts, body);

        let sent = tokio::time::timeout(
            route.timeout,
            route.upstream.pool.client().request(upstream_req),
        )
        .await;
        let mut resp = match sent {
            Err(_) => return self.fail(Failure::UpstreamTimeout),
            Ok(Err(e)) => {
                let f = classify(&e);
                tracing::debug!(route = %route.name, %endpoint, "upstream request failed: {e:#}");
                return self.fail(f);
            }
            Ok(Ok(r)) => r,
        };
        headers::strip_hop_by_hop(resp.headers_mut());
        route.response_headers.apply(resp.headers_mut());
        resp.map(Either::Left)
    }
}

/// Maps a client error to where it came from by walking its source chain.
fn classify(e: &hyper_util::client::legacy::Error) -> Failure {
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            match io.kind() {
                std::io::ErrorKind::ConnectionRefused => return Failure::UpstreamRefused,
                std::io::ErrorKind::TimedOut => return Failure::UpstreamTimeout,
                _ => {}
            }
        }
        src = s.source();
    }
    Failure::UpstreamFailed
}
