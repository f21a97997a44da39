//! Ships spooled log batches to the plane on the Telemetry stream, oldest first, with a window
//! of unacked batches; a batch leaves the spool only when the plane acks it. Also sends a
//! metrics summary every few seconds. Reconnects with backoff; on reconnect every unacked
//! batch is sent again, and the plane's idempotent store makes that safe.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dispa_proto::v1::telemetry_client::TelemetryClient;
use dispa_proto::v1::{AgentReport, MetricsSummary, ReportHello, agent_report};
use dispa_proto::{BUILD_VERSION, PROTOCOL_VERSION};
use tokio::sync::{Notify, mpsc, watch};

use super::Metrics;
use super::spool::{Spool, SpoolError};
use super::window::Window;

/// Batches sent and not yet acked.
const WINDOW: usize = 8;
const SUMMARY_EVERY: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

pub struct Shipper {
    pub plane: dispa_proto::connect::PlaneConnect,
    pub agent_id: String,
    pub boot_id: String,
    pub spool: Arc<Spool>,
    pub notify: Arc<Notify>,
    pub window: Arc<Window>,
    pub metrics: Arc<Metrics>,
    pub current: Arc<crate::snapshot::Current>,
}

impl Shipper {
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let started = Instant::now();
            let result = tokio::select! {
                r = self.session() => r,
                _ = stop.changed() => return,
            };
            if let Err(e) = result {
                tracing::debug!(plane = %self.plane.url, "telemetry stream: {e}");
            }
            // A session that lasted was healthy: start the backoff over.
            if started.elapsed() > Duration::from_secs(10) {
                backoff = BACKOFF_MIN;
            }
            let half = backoff / 2;
            let wait = half + half.mul_f64(fastrand::f64());
            backoff = (backoff * 2).min(BACKOFF_MAX);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => return,
            }
        }
    }

    fn endpoints_down(&self) -> Vec<String> {
        let Some(s) = self.current.load() else {
            return Vec::new();
        };
        let now = crate::upstream::health::now_ms();
        let mut out = Vec::new();
        for u in s.upstreams.values() {
            for e in &u.endpoints {
                if e.health.is_down() {
                    out.push(format!("{}/{} (down)", u.name, e.addr));
                } else if e.health.is_ejected(now) {
                    out.push(format!("{}/{} (ejected)", u.name, e.addr));
                }
            }
        }
        out.sort();
        out
    }

    async fn session(&self) -> Result<(), String> {
        let endpoint = self
            .plane
            .endpoint()
            .map_err(|e| e.to_string())?
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(20));
        let auth = self.plane.interceptor().map_err(|e| e.to_string())?;
        let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
        let mut client = TelemetryClient::with_interceptor(channel, auth);
        let (tx, rx) = mpsc::channel::<AgentReport>(WINDOW * 2 + 4);
        let hello = AgentReport {
            kind: Some(agent_report::Kind::Hello(ReportHello {
                agent_id: self.agent_id.clone(),
                boot_id: self.boot_id.clone(),
                build_version: BUILD_VERSION.to_string(),
                protocol_version: PROTOCOL_VERSION.to_string(),
            })),
        };
        tx.send(hello).await.map_err(|e| e.to_string())?;
        let mut acks = client
            .report(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map_err(|s| format!("{}: {}", s.code(), s.message()))?
            .into_inner();
        tracing::info!(plane = %self.plane.url, "telemetry stream open");
        // (order, boot, seq) sent and not acked, in send order.
        let mut inflight: VecDeque<(u64, String, u64)> = VecDeque::new();
        let mut last_sent: Option<u64> = None;
        let mut summary = tokio::time::interval(SUMMARY_EVERY);
        summary.tick().await;
        let mut window_start = Instant::now();
        loop {
            // Fill the window from the spool.
            while inflight.len() < WINDOW {
                let Some(entry) = self.spool.after(last_sent, 1).pop() else {
                    break;
                };
                last_sent = Some(entry.order);
                let spool = self.spool.clone();
                let e = entry.clone();
                let read = tokio::task::spawn_blocking(move || spool.read(&e))
                    .await
                    .map_err(|e| e.to_string())?;
                match read {
                    Ok(batch) => {
                        inflight.push_back((entry.order, entry.boot_id, entry.seq));
                        let report = AgentReport {
                            kind: Some(agent_report::Kind::Logs(batch)),
                        };
                        tx.send(report).await.map_err(|e| e.to_string())?;
                    }
                    Err(e @ SpoolError::Corrupt { .. }) => {
                        tracing::warn!("dropping unreadable spooled batch: {e}");
                        self.metrics
                            .log_dropped("spool_corrupt", entry.records.max(1));
                        self.spool.remove(entry.order);
                    }
                    Err(SpoolError::Io { source, .. })
                        if source.kind() == std::io::ErrorKind::NotFound =>
                    {
                        // Removed behind our back: nothing left to send.
                        self.spool.remove(entry.order);
                    }
                    // Out of file descriptors, I/O trouble: keep the batch, retry later.
                    Err(e) => return Err(e.to_string()),
                }
            }
            tokio::select! {
                ack = acks.message() => {
                    let ack = ack.map_err(|s| format!("{}: {}", s.code(), s.message()))?.ok_or("plane closed the stream")?;
                    if let Some(pos) = inflight.iter().position(|(_, b, s)| *b == ack.boot_id && *s == ack.seq)
                        && let Some((order, _, _)) = inflight.remove(pos) {
                            self.spool.remove(order);
                            self.metrics.log_batches_shipped.inc();
                        }
                    let (batches, bytes) = self.spool.depth();
                    self.metrics.log_spool_batches.set(batches as i64);
                    self.metrics.log_spool_bytes.set(bytes as i64);
                }
                _ = self.notify.notified() => {}
                _ = summary.tick() => {
                    let w = self.window.take();
                    let secs = window_start.elapsed().as_secs_f64();
                    window_start = Instant::now();
                    let m = MetricsSummary {
                        ts_ms: super::access_log::now_us() / 1000,
                        window_seconds: secs,
                        requests: w.requests,
                        errors: w.errors,
                        p99_ms: w.p99_ms,
                        in_flight: self.metrics.in_flight.get(),
                        log_records_dropped: self.metrics.log_dropped_total(),
                        config_version: u64::try_from(self.metrics.config_version.get()).unwrap_or(0),
                        endpoints_down: self.endpoints_down(),
                    };
                    tx.send(AgentReport { kind: Some(agent_report::Kind::Metrics(m)) }).await.map_err(|e| e.to_string())?;
                }
            }
        }
    }
}
