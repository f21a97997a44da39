//! The request path: request -> snapshot -> route -> endpoint -> upstream -> response, with an
//! access-log record and metrics for every request.

mod added;
mod body;
mod deny;
pub mod headers;
pub mod hygiene;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use bytes::Bytes;
use dispa_proto::v1::LogRecord;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{Either, Full};
use tracing::Instrument;

pub use added::Added;
pub use body::{CountedBody, LoggedBody};

use crate::conn::ClientBody;
use crate::routing::RequestView;
use crate::routing::normalize_host;
use crate::snapshot::{CompiledRoute, Current, RouteAction};
use crate::telemetry::access_log::{self, LogSink, X_REQUEST_ID};
use crate::telemetry::window::Window;
use crate::telemetry::{Metrics, ReasonLabels};
use crate::upstream::{UpstreamBody, UpstreamRuntime};

pub type ProxyBody = Either<UpstreamBody, Full<Bytes>>;

/// Largest request body read ahead so that a retry can resend it.
const MAX_RETRY_BODY: u64 = 64 * 1024;

/// Mirror copies in flight per agent.
const MAX_MIRRORS_IN_FLIGHT: usize = 64;

/// Who sent a request, and over what.
struct Client {
    /// The client's address (see [`crate::policy::client::client_ip`]).
    ip: std::net::IpAddr,
    /// The X-Forwarded-For to send upstream.
    forwarded_for: HeaderValue,
    /// "http" or "https": X-Forwarded-Proto.
    scheme: &'static str,
    /// The request's host as sent.
    raw_host: headers::RawHost,
    /// The fields the proxy adds upstream.
    added: Box<Added>,
}

/// Where a failure came from, for the status, the body, the log record and the metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    NoSnapshot,
    BadRequest,
    NoRoute,
    NoEndpoint,
    UpstreamRefused,
    UpstreamTimeout,
    UpstreamFailed,
    CircuitOpen,
    /// Refused by request hygiene (framing, path, limits).
    Rejected(hygiene::Rejection),
}

impl Failure {
    fn status(self) -> StatusCode {
        match self {
            Failure::NoSnapshot | Failure::NoEndpoint | Failure::CircuitOpen => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Failure::BadRequest => StatusCode::BAD_REQUEST,
            Failure::NoRoute => StatusCode::NOT_FOUND,
            Failure::UpstreamRefused | Failure::UpstreamFailed => StatusCode::BAD_GATEWAY,
            Failure::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Failure::Rejected(r) => r.status(),
        }
    }

    /// Short bodies that name no internals.
    fn body(self) -> &'static str {
        match self {
            Failure::NoSnapshot => "no configuration loaded yet\n",
            Failure::BadRequest => "bad request: missing or invalid Host\n",
            Failure::NoRoute => "no route for this request\n",
            Failure::NoEndpoint => "no healthy upstream endpoint\n",
            Failure::UpstreamRefused => "upstream refused the connection\n",
            Failure::UpstreamTimeout => "upstream timed out\n",
            Failure::UpstreamFailed => "upstream connection failed\n",
            Failure::CircuitOpen => "upstream overloaded: too many requests in flight\n",
            Failure::Rejected(r) => r.body(),
        }
    }

    fn reason(self) -> &'static str {
        match self {
            Failure::NoSnapshot => "no_snapshot",
            Failure::BadRequest => "bad_request",
            Failure::NoRoute => "no_route",
            Failure::NoEndpoint => "no_endpoint",
            Failure::UpstreamRefused => "upstream_refused",
            Failure::UpstreamTimeout => "upstream_timeout",
            Failure::UpstreamFailed => "upstream_failed",
            Failure::CircuitOpen => "circuit_open",
            Failure::Rejected(r) => r.reason(),
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
        if let Failure::Rejected(rej) = self
            && rej.closes()
        {
            // hyper closes an HTTP/1 connection after a response saying so (and drops the
            // header on HTTP/2); nothing more is read from a stream in doubt.
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        r
    }
}

/// What happened to one request, for its log record.
#[derive(Default)]
struct Exchange {
    host: String,
    route: String,
    upstream: String,
    endpoint: Option<SocketAddr>,
    upstream_us: Option<u64>,
    failure: Option<Failure>,
    /// Counts the request against its endpoint until the response ends.
    in_flight: Option<crate::upstream::InFlight>,
    attempts: u32,
    /// A connection slot of the upstream's circuit breaker, held until the response ends.
    conn_permit: Option<tokio::sync::OwnedSemaphorePermit>,
    /// The route's limit on waiting for the next piece of a response body.
    idle_timeout: Option<std::time::Duration>,
    /// The client's address once known (X-Forwarded-For from a trusted proxy).
    client_ip: Option<std::net::IpAddr>,
    /// Why the policy refused the request.
    policy_denied: Option<&'static str>,
    /// The request's series, once its route is known (`route` and `upstream`, the names,
    /// are filled in for the traffic log only).
    meters: Option<Arc<crate::telemetry::RequestMeters>>,
}

/// Shared by every connection of the proxy listener.
pub struct Proxy {
    /// Bounds mirror copies in flight; more are dropped and counted.
    mirror_slots: Arc<tokio::sync::Semaphore>,
    current: Arc<Current>,
    metrics: Arc<Metrics>,
    logs: LogSink,
    window: Arc<Window>,
}

impl Proxy {
    pub fn new(
        current: Arc<Current>,
        metrics: Arc<Metrics>,
        logs: LogSink,
        window: Arc<Window>,
    ) -> Self {
        Self {
            mirror_slots: Arc::new(tokio::sync::Semaphore::new(MAX_MIRRORS_IN_FLIGHT)),
            current,
            metrics,
            logs,
            window,
        }
    }

    /// Serves one request that arrived over `scheme` ("http" or "https").
    ///
    /// This and the steps below are plain functions returning an `async move` block rather
    /// than `async fn`s: an `async fn` keeps each argument twice in its state (as passed and
    /// as moved into its body), and each level's state is copied whole into its caller's.
    #[allow(clippy::manual_async_fn)]
    pub fn serve(
        self: Arc<Self>,
        req: Request<ClientBody>,
        peer: SocketAddr,
        scheme: &'static str,
    ) -> impl Future<Output = Result<Response<LoggedBody>, Infallible>> {
        async move {
            let start = crate::clock::now();
            let ts_us = access_log::now_us();
            self.metrics.in_flight.inc();
            let rid = access_log::request_id(req.headers());
            let tp = access_log::traceparent(req.headers());
            let added = Added::new(rid.clone(), tp.clone());
            let rid_str = rid.to_str().unwrap_or_default();
            // Without a traffic log only the status and route are needed (metrics, window).
            let logging = self.logs.enabled();
            let record = if !logging {
                LogRecord {
                    ts_us,
                    ..Default::default()
                }
            } else {
                LogRecord {
                    ts_us,
                    agent: self.logs.agent.to_string(),
                    request_id: rid_str.to_string(),
                    client_ip: peer.ip().to_canonical().to_string(),
                    method: req.method().as_str().to_string(),
                    scheme: scheme.into(),
                    path: access_log::capped(req.uri().path(), access_log::MAX_PATH),
                    query: access_log::capped(
                        &access_log::redact_query(
                            req.uri().query().unwrap_or(""),
                            &self.logs.redact_query,
                        ),
                        access_log::MAX_PATH,
                    ),
                    user_agent: header_str(req.headers(), &header::USER_AGENT),
                    traceparent: tp.to_str().unwrap_or_default().to_string(),
                    ..Default::default()
                }
            };
            let span = tracing::debug_span!("request", id = %rid_str, method = %req.method(), path = %req.uri().path());
            let bytes_in = Arc::new(AtomicU64::new(0));
            // Finishes the record (499, client_closed) if the client goes away before a response.
            let mut pending = body::Pending::new(body::Finish {
                record: Box::new(record),
                start,
                bytes_in: bytes_in.clone(),
                sink: self.logs.clone(),
                metrics: self.metrics.clone(),
                window: self.window.clone(),
                span: span.clone(),
                in_flight: None,
                conn_permit: None,
                meters: None,
            });
            // Boxed, and `forward` inside it: boxes under 1 KiB come from glibc's per-thread
            // cache, the chunk freed last first (still in the CPU's cache); one box of the
            // whole request (3 KiB) came from its bins, wherever a free chunk was, which with
            // a large route table loaded was rarely memory the CPU had cached.
            // Instrumented outside the box: the wrapper holds the box, not the future again.
            let (mut ex, mut resp) =
                Box::pin(self.handle(req, peer, scheme, bytes_in.clone(), added))
                    .instrument(span.clone())
                    .await;
            // Beside an upstream's fields as sent, if they are: no map made for this field.
            use crate::conn::head::CarriesFields;
            match resp.body_mut().fields_mut() {
                Some(raw) => raw.set_request_id(rid),
                None => {
                    resp.headers_mut().insert(X_REQUEST_ID, rid);
                }
            }

            let status = resp.status().as_u16();
            let meters = match ex.meters.take() {
                Some(m) => m,
                None => self.metrics.meters(&ex.route, &ex.upstream),
            };
            meters.answered(&self.metrics, status);
            if let Some(us) = ex.upstream_us {
                meters.upstream_took(&self.metrics, us as f64 / 1e6);
            }
            let Some(mut finish) = pending.take() else {
                return Ok(Failure::BadRequest.response().map(LoggedBody::unlogged));
            };
            let record = &mut finish.record;
            if let Some(reason) = ex.failure.map(Failure::reason).or(ex.policy_denied) {
                self.metrics
                    .denied
                    .get_or_create(&ReasonLabels {
                        reason: reason.to_string(),
                    })
                    .inc();
                record.denial_reason = reason.to_string();
            }
            record.status = u32::from(status);
            record.route = ex.route;
            if logging {
                if let Some(ip) = ex.client_ip {
                    record.client_ip = ip.to_string();
                }
                record.host = access_log::capped(&ex.host, access_log::MAX_HOST);
                record.upstream = ex.upstream;
                record.endpoint = ex.endpoint.map(|e| e.to_string()).unwrap_or_default();
                record.attempts = ex.attempts;
                record.upstream_duration_us = ex.upstream_us.unwrap_or(0);
            }
            finish.in_flight = ex.in_flight;
            finish.conn_permit = ex.conn_permit;
            finish.meters = Some(meters);
            let idle = ex.idle_timeout;
            Ok(resp.map(|b| LoggedBody::new(b, finish).with_idle_timeout(idle)))
        }
    }

    /// Sends a copy of a bodyless request to the mirror upstream; fire and forget, bounded.
    fn mirror(
        &self,
        shadow: Arc<UpstreamRuntime>,
        parts: &http::request::Parts,
        added: Option<&Added>,
        target: &http::uri::PathAndQuery,
        client_ip: std::net::IpAddr,
        timeout: std::time::Duration,
    ) {
        let Ok(permit) = self.mirror_slots.clone().try_acquire_owned() else {
            self.metrics.mirror_dropped.inc();
            return;
        };
        let ctx = crate::upstream::PickCtx {
            client_ip,
            headers: &parts.headers,
            added,
        };
        let Some(picked) = shadow.pick(&ctx, &[]) else {
            return;
        };
        let Ok(uri) = shadow.request_uri(picked.addr, target) else {
            return;
        };
        let mut req = Request::new(CountedBody::new(None, Arc::default()));
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = uri;
        *req.version_mut() = if shadow.pool.key().h2 {
            http::Version::HTTP_2
        } else {
            http::Version::HTTP_11
        };
        *req.headers_mut() = parts.headers.clone();
        if let Some(a) = added {
            a.insert_into(req.headers_mut());
        }
        self.metrics.mirrored.inc();
        tokio::spawn(async move {
            let _permit = permit;
            let _in_flight = picked.in_flight;
            // The answer is read and dropped: a mirror never affects the client.
            let sent = shadow.send(picked.addr, req, None);
            if let Ok(Ok(resp)) = tokio::time::timeout(timeout, sent).await {
                use http_body_util::BodyExt;
                let _ = tokio::time::timeout(timeout, resp.into_body().collect()).await;
            }
        });
    }

    // Not an `async fn`: see `serve`.
    #[allow(clippy::manual_async_fn)]
    fn handle(
        &self,
        mut req: Request<ClientBody>,
        peer: SocketAddr,
        scheme: &'static str,
        bytes_in: Arc<AtomicU64>,
        added: Box<Added>,
    ) -> impl Future<Output = (Exchange, Response<ProxyBody>)> {
        async move {
            let mut ex = Exchange::default();
            // One snapshot for the whole request, however many swaps happen meanwhile.
            let Some(snapshot) = self.current.load() else {
                return fail(ex, Failure::NoSnapshot);
            };
            if let Err(r) = hygiene::check_request(&mut req, &snapshot.config.policy.limits) {
                return fail(ex, Failure::Rejected(r));
            }
            let Some(raw_host) = headers::request_host(&req) else {
                return fail(ex, Failure::BadRequest);
            };
            let host = normalize_host(raw_host.as_str());
            // Names are kept for the traffic log only.
            let logging = self.logs.enabled();
            if logging {
                ex.host = host.to_string();
            }
            let view = RequestView {
                path: req.uri().path(),
                method: req.method().as_str(),
                headers: req.headers(),
                query: req.uri().query(),
            };
            let trusted = &snapshot.trusted_proxies;
            let client_ip = crate::policy::client::client_ip(peer.ip(), req.headers(), trusted);
            ex.client_ip = Some(client_ip);
            let Some(route) = snapshot.routes.lookup(&host, &view) else {
                // The global allow/deny first: a refused client learns nothing about routes.
                let u = &snapshot.unrouted;
                if !crate::policy::address_allowed(client_ip, &u.allow, &u.deny) {
                    ex.policy_denied = Some(crate::policy::Denied::Address.reason());
                    return (ex, deny::response(crate::policy::Denied::Address, u));
                }
                return fail(ex, Failure::NoRoute);
            };
            if logging {
                ex.route = route.name.to_string();
            }
            ex.meters = Some(route.meters(&self.metrics, None));
            if let Some(a) = &route.policy.auth {
                // Only the agent sets claim headers: a client's own copies are dropped.
                for h in a.claim_headers() {
                    req.headers_mut().remove(h);
                }
            }
            match route
                .policy
                .check(client_ip, req.headers(), req.uri().query())
            {
                Ok(authed) => {
                    for (n, v) in authed.forward {
                        req.headers_mut().insert(n, v);
                    }
                }
                Err(d) => {
                    ex.policy_denied = Some(d.reason());
                    return (ex, deny::response(d, &route.policy));
                }
            }
            let unsized_body = {
                use hyper::body::Body;
                !req.body().is_end_stream() && req.body().size_hint().exact().is_none()
            };
            if let Err(r) = hygiene::RouteHygiene::from(&route.policy).check(&req, unsized_body) {
                return fail(ex, Failure::Rejected(r));
            }
            ex.idle_timeout = route.idle_timeout;
            let upstream = match &route.action {
                RouteAction::Redirect(rd) => {
                    return (ex, redirect(rd, &req, raw_host.as_str(), scheme));
                }
                RouteAction::Respond {
                    status,
                    body,
                    headers,
                } => {
                    let mut r = Response::new(Either::Right(Full::new(body.clone())));
                    *r.status_mut() = *status;
                    for (n, v) in headers {
                        r.headers_mut().append(n.clone(), v.clone());
                    }
                    route.response_headers.apply(r.headers_mut());
                    return (ex, r);
                }
                action => match action.upstream() {
                    Some(u) => u.clone(),
                    None => return fail(ex, Failure::NoEndpoint),
                },
            };
            if logging {
                ex.upstream = upstream.name.to_string();
            }
            ex.meters = Some(route.meters(&self.metrics, Some(&upstream)));
            let client = Client {
                ip: client_ip,
                forwarded_for: headers::forwarded_for(
                    req.headers(),
                    peer.ip(),
                    client_ip,
                    crate::policy::client::is_trusted(peer.ip(), trusted),
                ),
                scheme,
                raw_host,
                added,
            };
            Box::pin(self.forward(ex, route, &upstream, req, client, bytes_in)).await
        }
    }

    // Not an `async fn`: see `serve`.
    #[allow(clippy::too_many_arguments, clippy::manual_async_fn)]
    fn forward(
        &self,
        mut ex: Exchange,
        route: &CompiledRoute,
        upstream: &UpstreamRuntime,
        mut req: Request<ClientBody>,
        client: Client,
        bytes_in: Arc<AtomicU64>,
    ) -> impl Future<Output = (Exchange, Response<ProxyBody>)> {
        let h2 = upstream.pool.key().h2;
        // WebSocket and other HTTP/1.1 upgrades: kept, then tunnelled if the upstream agrees.
        let upgrade = headers::upgrade_request(&req)
            .filter(|_| !h2)
            .map(|protocol| (protocol, hyper::upgrade::on(&mut req)));
        let wants_trailers = headers::wants_trailers(req.headers());
        // Taken apart before the future is made, so that it holds the parts, not the request
        // besides: it is boxed per request, and under 1 KiB it comes from glibc's thread cache.
        let (mut parts, body) = req.into_parts();
        let Client {
            ip: client_ip,
            forwarded_for,
            scheme,
            raw_host,
            mut added,
        } = client;
        // Here, not in the future: what it no longer needs takes no room in its state.
        headers::strip_hop_by_hop(&mut parts.headers);
        headers::forward_fields(
            &mut parts.headers,
            &mut added,
            forwarded_for,
            &raw_host,
            scheme,
        );
        async move {
            use dispa_proto::config::model::RetryOn;
            if upstream.saturated() {
                return fail(ex, Failure::CircuitOpen);
            }
            if let Some(gate) = &upstream.gate {
                match gate.enter().await {
                    Some(p) => ex.conn_permit = Some(p),
                    None => return fail(ex, Failure::CircuitOpen),
                }
            }
            upstream.retry_budget.on_request();
            let Some(target) = upstream_target(route, &parts.uri) else {
                return fail(ex, Failure::BadRequest);
            };
            let mut added = Some(added);
            if let Some((protocol, _)) = &upgrade {
                parts
                    .headers
                    .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                parts.headers.insert(header::UPGRADE, protocol.clone());
            }
            if wants_trailers {
                // gRPC needs it, and it is the one TE value a proxy may pass on.
                parts
                    .headers
                    .insert(header::TE, HeaderValue::from_static("trailers"));
            }
            if let Some(h) = &route.host_rewrite {
                // X-Forwarded-Host keeps what the client asked for.
                parts.headers.insert(header::HOST, h.clone());
            }
            if !route.request_headers.is_empty() {
                // The rules see (and may change) every field, the proxy's included.
                if let Some(a) = added.take() {
                    a.insert_into(&mut parts.headers);
                }
                route.request_headers.apply(&mut parts.headers);
            }
            // A request can be sent again if it has no body, or a small one (by Content-Length)
            // that is read ahead when the route retries; a streamed body is gone once sent.
            let declared = || {
                parts
                    .headers
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| crate::conn::framing::parse_length(v.as_bytes()))
            };
            let mut buffered: Option<Bytes> = None;
            let mut body = Some(body);
            if route.retry.retries > 0
                && body
                    .as_ref()
                    .is_some_and(|b| !hyper::body::Body::is_end_stream(b))
                && declared().is_some_and(|n| n > 0 && n <= MAX_RETRY_BODY)
                && let Some(b) = body.take()
            {
                use http_body_util::BodyExt;
                match http_body_util::Limited::new(b, MAX_RETRY_BODY as usize)
                    .collect()
                    .await
                {
                    Ok(c) => {
                        let bytes = c.to_bytes();
                        bytes_in
                            .fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
                        buffered = Some(bytes);
                    }
                    Err(_) => return fail(ex, Failure::BadRequest),
                }
            }
            let replayable =
                buffered.is_some() || body.as_ref().is_some_and(hyper::body::Body::is_end_stream);
            let idempotent = crate::upstream::idempotent(&parts.method);
            if let Some((shadow, percent)) = &route.mirror
                && replayable
                && buffered.is_none()
                && fastrand::u32(0..100) < *percent
            {
                self.mirror(
                    shadow.clone(),
                    &parts,
                    added.as_deref(),
                    &target,
                    client_ip,
                    route.timeout,
                );
            }
            // Only a body can be at fault; none is read from an empty one.
            let fault = body
                .as_ref()
                .is_some_and(|b| !hyper::body::Body::is_end_stream(b))
                .then(|| Arc::new(body::BodyFault::default()));
            let mut tried: smallvec::SmallVec<[SocketAddr; 1]> = smallvec::SmallVec::new();
            let mut last_failure = Failure::NoEndpoint;
            loop {
                let ctx = crate::upstream::PickCtx {
                    client_ip,
                    headers: &parts.headers,
                    added: added.as_deref(),
                };
                let Some(picked) = upstream.pick(&ctx, &tried) else {
                    return fail(ex, last_failure);
                };
                let endpoint = picked.addr;
                tried.push(endpoint);
                ex.attempts += 1;
                ex.endpoint = Some(endpoint);
                let Ok(uri) = upstream.request_uri(endpoint, &target) else {
                    return fail(ex, Failure::BadRequest);
                };
                let upstream_body = match &buffered {
                    Some(b) => CountedBody::buffered(b.clone()),
                    None => {
                        let b = CountedBody::new(body.take(), bytes_in.clone());
                        match &fault {
                            Some(f) => b.limited(route.policy.max_body_bytes, f.clone()),
                            None => b,
                        }
                    }
                };
                // In a block: the request is moved into the send future, and ended here it
                // takes no room in this future's state while the send is awaited.
                let sending = {
                    let mut upstream_req = Request::new(upstream_body);
                    *upstream_req.method_mut() = parts.method.clone();
                    *upstream_req.uri_mut() = uri;
                    *upstream_req.version_mut() = if h2 {
                        http::Version::HTTP_2
                    } else {
                        http::Version::HTTP_11
                    };
                    // The last possible attempt takes the headers; earlier ones copy them.
                    *upstream_req.headers_mut() =
                        if replayable && ex.attempts <= route.retry.retries {
                            parts.headers.clone()
                        } else {
                            std::mem::take(&mut parts.headers)
                        };
                    // Boxed: the exchange's state is most of a request's, and every future
                    // that holds it inline is copied whole when it is moved.
                    let deadline = crate::clock::now() + route.timeout;
                    Box::pin(crate::clock::Deadline::new(
                        deadline,
                        upstream.send(endpoint, upstream_req, added.as_deref()),
                    ))
                };
                let sent_at = crate::clock::now();
                let sent = sending.await;
                ex.upstream_us = Some(
                    u64::try_from(crate::clock::since(sent_at).as_micros()).unwrap_or(u64::MAX),
                );
                let mut failed: Option<String> = None;
                // What went wrong, if anything, and whether the route retries it.
                let (outcome, retry_on) = match sent {
                    // The client's body was invalid or too large: its fault, never retried.
                    Ok(Err(_)) if let Some(r) = fault.as_ref().and_then(|f| f.get()) => {
                        return fail(ex, Failure::Rejected(r));
                    }
                    Err(_) => (Err(Failure::UpstreamTimeout), None),
                    Ok(Err(e)) => {
                        let f = classify(&e);
                        failed = Some(crate::tls::error_chain(&e));
                        let on = if e.is_connect() {
                            RetryOn::ConnectFailure
                        } else {
                            RetryOn::Reset
                        };
                        (Err(f), Some(on))
                    }
                    Ok(Ok(r)) => {
                        let s = r.status().as_u16();
                        let on = matches!(s, 502..=504).then_some(RetryOn::Status(s));
                        (Ok(r), on)
                    }
                };
                let healthy = match &outcome {
                    Ok(r) => !r.status().is_server_error(),
                    Err(Failure::UpstreamTimeout) => true,
                    Err(_) => false,
                };
                if let Some(crate::upstream::health::Transition::Ejected(d)) =
                    picked.health.passive(
                        healthy,
                        &upstream.outlier,
                        crate::upstream::health::now_ms(),
                    )
                {
                    tracing::warn!(upstream = %upstream.name, %endpoint, "ejecting endpoint for {d:?} after consecutive failures");
                }
                let may_retry = retry_on.is_some_and(|on| {
                    route.retry.on.contains(&on)
                        && (idempotent
                            || route.retry.non_idempotent
                            || on == RetryOn::ConnectFailure)
                }) && replayable
                    && ex.attempts <= route.retry.retries
                    && upstream.retry_budget.try_retry();
                match outcome {
                    Ok(mut resp) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
                        let Some((_, client_side)) = upgrade else {
                            return fail(ex, Failure::UpstreamFailed);
                        };
                        let upstream_side = hyper::upgrade::on(&mut resp);
                        let in_flight = picked.in_flight;
                        tokio::spawn(async move {
                            let _in_flight = in_flight;
                            match tokio::try_join!(client_side, upstream_side) {
                                Ok((c, u)) => {
                                    let (mut c, mut u) = (
                                        hyper_util::rt::TokioIo::new(c),
                                        hyper_util::rt::TokioIo::new(u),
                                    );
                                    let _ = tokio::io::copy_bidirectional(&mut c, &mut u).await;
                                }
                                Err(e) => tracing::debug!("upgrade failed: {e}"),
                            }
                        });
                        return (ex, resp.map(Either::Left));
                    }
                    Ok(mut resp) if !may_retry => {
                        ex.in_flight = Some(picked.in_flight);
                        // Fields the own exchange left as sent are already without the
                        // hop-by-hop ones; route rules need them all in the map.
                        headers::strip_hop_by_hop(resp.headers_mut());
                        if !route.response_headers.is_empty() {
                            crate::conn::head::materialize(&mut resp);
                            route.response_headers.apply(resp.headers_mut());
                        }
                        return (ex, resp.map(Either::Left));
                    }
                    Err(f) if !may_retry => {
                        // The whole source chain, so the log names the cause (e.g. a TLS
                        // certificate verification failure).
                        if let Some(why) = &failed {
                            tracing::warn!(route = %route.name, upstream = %upstream.name, %endpoint, "upstream request failed: {why}");
                        }
                        return fail(ex, f);
                    }
                    Ok(_) => last_failure = Failure::UpstreamFailed,
                    Err(f) => {
                        if let Some(why) = &failed {
                            tracing::debug!(route = %route.name, %endpoint, "upstream request failed, retrying: {why}");
                        }
                        last_failure = f;
                    }
                }
                self.metrics.retries.inc();
                body = None;
            }
        }
    }
}

/// The Location for a redirect route: `to`, or the request's own URL with the configured
/// scheme, host and path swapped in (the query is kept).
fn redirect<B>(
    rd: &dispa_proto::config::model::Redirect,
    req: &Request<B>,
    raw_host: &str,
    request_scheme: &str,
) -> Response<ProxyBody> {
    let location = match &rd.to {
        Some(to) => to.clone(),
        None => {
            let scheme = rd.scheme.as_deref().unwrap_or(request_scheme);
            let host = rd.host.as_deref().unwrap_or(raw_host);
            let path = rd.path.as_deref().unwrap_or(req.uri().path());
            match req.uri().query() {
                Some(q) => format!("{scheme}://{host}{path}?{q}"),
                None => format!("{scheme}://{host}{path}"),
            }
        }
    };
    let mut r = Response::new(Either::Right(Full::new(Bytes::new())));
    *r.status_mut() = StatusCode::from_u16(rd.code).unwrap_or(StatusCode::FOUND);
    if let Ok(v) = HeaderValue::from_str(&location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

/// The path and query to ask the upstream for: the client's own (shared, not copied) unless
/// the route rewrites the path. `None` if a rewrite makes an invalid one.
fn upstream_target(route: &CompiledRoute, uri: &http::Uri) -> Option<http::uri::PathAndQuery> {
    let path = route.rewrite_path(uri.path());
    if let (std::borrow::Cow::Borrowed(_), Some(pq)) = (&path, uri.path_and_query())
        // An absolute-form target may have a query and no path ("http://a?b").
        && pq.as_str().starts_with('/')
    {
        return Some(pq.clone());
    }
    let target = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.into_owned(),
    };
    target.parse().ok()
}

fn fail(mut ex: Exchange, f: Failure) -> (Exchange, Response<ProxyBody>) {
    ex.failure = Some(f);
    (ex, f.response())
}

fn header_str(h: &http::HeaderMap, name: &HeaderName) -> String {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .chars()
        .take(512)
        .collect()
}

/// Maps a client error to where it came from by walking its source chain.
fn classify(e: &crate::upstream::SendError) -> Failure {
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
