//! Body wrappers on the request path: one counts request bytes as they stream upstream; the
//! other counts response bytes and, when the response ends (or the client goes away), finishes
//! the access-log record and the request's metrics. Neither buffers.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use dispa_proto::v1::LogRecord;
use hyper::body::{Body, Frame, SizeHint};

use super::ProxyBody;
use super::hygiene::Rejection;
use crate::conn::ClientBody;
use crate::telemetry::Metrics;
use crate::telemetry::access_log::LogSink;
use crate::telemetry::window::Window;

/// The client's request body on its way upstream, counted, and cut off past the route's
/// `max_body_bytes`.
pub struct CountedBody {
    inner: Source,
    count: Arc<AtomicU64>,
    /// (limit, bytes seen so far)
    limit: Option<(u64, u64)>,
    fault: Option<Arc<BodyFault>>,
}

/// What went wrong with a client's body, for the answer when the upstream request then fails:
/// the client, not the upstream, is at fault.
#[derive(Debug, Default)]
pub struct BodyFault(std::sync::atomic::AtomicU8);

impl BodyFault {
    fn set(&self, r: Rejection) {
        let v = match r {
            Rejection::BodyTooLarge => 1,
            _ => 2,
        };
        self.0.store(v, Ordering::Relaxed);
    }

    pub fn get(&self) -> Option<Rejection> {
        match self.0.load(Ordering::Relaxed) {
            1 => Some(Rejection::BodyTooLarge),
            2 => Some(Rejection::BadBody),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct ClientBodyError(Rejection);

enum Source {
    Stream(ClientBody),
    /// A small body read ahead so a retry can send it again.
    Buffered(Option<Bytes>),
    Empty,
}

impl CountedBody {
    /// The client's body as it streams; `None`: an empty body.
    pub fn new(inner: Option<ClientBody>, count: Arc<AtomicU64>) -> Self {
        Self {
            inner: inner.map_or(Source::Empty, Source::Stream),
            count,
            limit: None,
            fault: None,
        }
    }

    /// Fails the body past `max` bytes; records client-side failures in `fault`.
    pub fn limited(mut self, max: Option<u64>, fault: Arc<BodyFault>) -> Self {
        self.limit = max.map(|m| (m, 0));
        self.fault = Some(fault);
        self
    }

    /// A body already read into memory (counted once, when it was read).
    pub fn buffered(bytes: Bytes) -> Self {
        Self {
            inner: Source::Buffered(Some(bytes)),
            count: Arc::default(),
            limit: None,
            fault: None,
        }
    }
}

impl Body for CountedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let inner = match &mut this.inner {
            Source::Empty => return Poll::Ready(None),
            Source::Buffered(b) => return Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Source::Stream(inner) => inner,
        };
        let fail = |fault: &Option<Arc<BodyFault>>, r: Rejection| {
            if let Some(f) = fault {
                f.set(r);
            }
            Poll::Ready(Some(Err(Box::new(ClientBodyError(r)) as Self::Error)))
        };
        match std::task::ready!(Pin::new(inner).poll_frame(cx)) {
            Some(Ok(f)) => {
                if let Some(d) = f.data_ref() {
                    let n = d.len() as u64;
                    this.count.fetch_add(n, Ordering::Relaxed);
                    if let Some((max, seen)) = &mut this.limit {
                        *seen += n;
                        if *seen > *max {
                            return fail(&this.fault, Rejection::BodyTooLarge);
                        }
                    }
                }
                Poll::Ready(Some(Ok(f)))
            }
            // Invalid chunked framing, a body cut short, ...: the client's fault.
            Some(Err(_)) => fail(&this.fault, Rejection::BadBody),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Source::Stream(i) => i.is_end_stream(),
            Source::Buffered(b) => b.is_none(),
            Source::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Source::Stream(i) => i.size_hint(),
            Source::Buffered(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Source::Empty => SizeHint::with_exact(0),
        }
    }
}

/// What is needed to finish a request's record once its response body is done.
pub struct Finish {
    /// Boxed: a finish is moved with its response several times per request.
    pub record: Box<LogRecord>,
    pub start: Instant,
    pub bytes_in: Arc<AtomicU64>,
    pub sink: LogSink,
    pub metrics: Arc<Metrics>,
    pub window: Arc<Window>,
    pub span: tracing::Span,
    /// Released when the response ends, so least_conn and p2c see streaming responses as busy.
    pub in_flight: Option<crate::upstream::InFlight>,
    pub conn_permit: Option<tokio::sync::OwnedSemaphorePermit>,
    /// The request's series, once its route and upstream are known.
    pub meters: Option<Arc<crate::telemetry::RequestMeters>>,
}

impl Finish {
    fn done(mut self, bytes_out: u64) {
        let elapsed = crate::clock::since(self.start);
        let r = &mut self.record;
        r.duration_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        r.bytes_out = bytes_out;
        r.bytes_in = self.bytes_in.load(Ordering::Relaxed);
        self.metrics.in_flight.dec();
        let meters = match self.meters.take() {
            Some(m) => m,
            None => self.metrics.meters(&r.route, ""),
        };
        meters.request_took(&self.metrics, elapsed.as_secs_f64());
        self.window
            .record(u16::try_from(r.status).unwrap_or(0), elapsed);
        let status = r.status;
        tracing::debug!(parent: &self.span, status, duration_ms = elapsed.as_secs_f64() * 1000.0, bytes_out, "request finished");
        // Not moved out of its box (a copy of the whole record) when nothing logs it.
        if self.sink.enabled() {
            self.sink.record(*self.record);
        }
    }
}

/// Holds a request's [`Finish`] while the request is being handled; if the handler is dropped
/// (the client went away before any response), the record is finished as status 499.
pub struct Pending(Option<Finish>);

impl Pending {
    pub fn new(f: Finish) -> Self {
        Self(Some(f))
    }

    pub fn take(&mut self) -> Option<Finish> {
        self.0.take()
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(mut f) = self.0.take() {
            f.record.status = 499;
            f.record.denial_reason = "client_closed".into();
            f.metrics
                .denied
                .get_or_create(&crate::telemetry::ReasonLabels {
                    reason: "client_closed".into(),
                })
                .inc();
            f.done(0);
        }
    }
}

/// The response body sent to the client, counted; finishes the record at its end.
pub struct LoggedBody {
    inner: ProxyBody,
    bytes_out: u64,
    finish: Option<Finish>,
    /// The route's idle timeout: the longest wait for the next frame.
    idle: Option<(std::time::Duration, Pin<Box<tokio::time::Sleep>>)>,
}

#[derive(Debug, thiserror::Error)]
#[error("upstream response body idle for longer than {0:?}")]
struct IdleTimeout(std::time::Duration);

impl LoggedBody {
    /// A body with no record attached (nothing to log).
    pub fn unlogged(inner: ProxyBody) -> Self {
        Self {
            inner,
            bytes_out: 0,
            finish: None,
            idle: None,
        }
    }

    /// Cuts the response off when the next frame takes longer than `d`.
    pub fn with_idle_timeout(mut self, d: Option<std::time::Duration>) -> Self {
        self.idle = d.map(|d| (d, Box::pin(tokio::time::sleep(d))));
        self
    }

    pub fn new(inner: ProxyBody, finish: Finish) -> Self {
        let mut b = Self {
            inner,
            bytes_out: 0,
            finish: Some(finish),
            idle: None,
        };
        if b.inner.is_end_stream() {
            b.complete();
        }
        b
    }

    fn complete(&mut self) {
        if let Some(f) = self.finish.take() {
            f.done(self.bytes_out);
        }
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        // The client went away mid-body, or the body was never polled: still one record.
        self.complete();
    }
}

impl crate::conn::head::CarriesFields for LoggedBody {
    fn take_fields(&mut self) -> Option<Box<crate::conn::head::RawFields>> {
        self.inner.take_fields()
    }
}

impl Body for LoggedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let p = Pin::new(&mut self.inner).poll_frame(cx);
        if p.is_pending() {
            if let Some((d, sleep)) = self.idle.as_mut()
                && sleep.as_mut().poll(cx).is_ready()
            {
                let d = *d;
                self.complete();
                return Poll::Ready(Some(Err(Box::new(IdleTimeout(d)))));
            }
        } else if let Some((d, sleep)) = self.idle.as_mut() {
            let next = tokio::time::Instant::now() + *d;
            sleep.as_mut().reset(next);
        }
        match &p {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    self.bytes_out += d.len() as u64;
                }
                if self.inner.is_end_stream() {
                    self.complete();
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => self.complete(),
            Poll::Pending => {}
        }
        p
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
