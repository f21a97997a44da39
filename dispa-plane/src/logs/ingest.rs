//! The Telemetry service: agents stream log batches and metric summaries. A batch is acked
//! only after the store has it durably; stored batches are also fanned out to live
//! `dispactl logs --follow` streams.

use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use dispa_proto::v1::telemetry_server::Telemetry;
use dispa_proto::v1::{AgentReport, LogRecord, ReportAck, agent_report};
use dispa_proto::{AgentId, ErrorCode};
use futures_util::Stream;
use tokio::sync::{broadcast, mpsc};
use tonic::{Request, Response, Status, Streaming};

use super::SharedLogStore;
use crate::distribute::AgentRegistry;
use crate::metrics::PlaneMetrics;

/// Newly stored records for live followers. Lagging followers skip, never slow ingest.
#[derive(Clone)]
pub struct LiveLogs {
    tx: broadcast::Sender<LiveBatch>,
    seq: Arc<std::sync::atomic::AtomicU64>,
    /// Turns true when the plane shuts down: long-lived streams end.
    closing: Arc<tokio::sync::watch::Sender<bool>>,
}

/// A stored batch, numbered in publish order.
#[derive(Clone, Debug)]
pub struct LiveBatch {
    pub seq: u64,
    pub records: Arc<Vec<LogRecord>>,
}

impl Default for LiveLogs {
    fn default() -> Self {
        Self {
            tx: broadcast::channel(1024).0,
            seq: Arc::default(),
            closing: Arc::new(tokio::sync::watch::channel(false).0),
        }
    }
}

impl LiveLogs {
    pub fn subscribe(&self) -> broadcast::Receiver<LiveBatch> {
        self.tx.subscribe()
    }

    /// The number of the last batch published.
    pub fn last_seq(&self) -> u64 {
        self.seq.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn publish(&self, records: Vec<LogRecord>) {
        let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        // No receivers is fine.
        let _ = self.tx.send(LiveBatch {
            seq,
            records: Arc::new(records),
        });
    }

    /// Ends every follow and telemetry stream (plane shutdown).
    pub fn close(&self) {
        let _ = self.closing.send(true);
    }

    /// Resolves once [`close`](Self::close) was called.
    pub async fn closed(&self) {
        let mut rx = self.closing.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }
}

pub struct TelemetryService {
    store: SharedLogStore,
    live: LiveLogs,
    registry: Arc<AgentRegistry>,
    metrics: Arc<PlaneMetrics>,
}

impl TelemetryService {
    pub fn new(
        store: SharedLogStore,
        live: LiveLogs,
        registry: Arc<AgentRegistry>,
        metrics: Arc<PlaneMetrics>,
    ) -> Self {
        Self {
            store,
            live,
            registry,
            metrics,
        }
    }
}

type AckStream = Pin<Box<dyn Stream<Item = Result<ReportAck, Status>> + Send>>;

#[tonic::async_trait]
impl Telemetry for TelemetryService {
    type ReportStream = AckStream;

    async fn report(
        &self,
        request: Request<Streaming<AgentReport>>,
    ) -> Result<Response<AckStream>, Status> {
        let mut inbound = request.into_inner();
        let hello = match inbound.message().await?.and_then(|r| r.kind) {
            Some(agent_report::Kind::Hello(h)) => h,
            _ => {
                return Err(
                    ErrorCode::InvalidArgument.status("the first AgentReport must be a hello")
                );
            }
        };
        let boot_ok = !hello.boot_id.is_empty()
            && hello.boot_id.len() <= 64
            && hello.boot_id.bytes().all(|b| b.is_ascii_alphanumeric());
        if !crate::distribute::valid_agent_id(&hello.agent_id) || !boot_ok {
            return Err(ErrorCode::InvalidArgument.status(
                "hello needs a valid agent id (1-128 letters, digits, '-', '_', '.', ':') and a boot id (1-64 letters or digits)",
            ));
        }
        let agent = hello.agent_id.clone();
        let (tx, rx) = mpsc::channel::<Result<ReportAck, Status>>(64);
        let (store, live, registry, metrics) = (
            self.store.clone(),
            self.live.clone(),
            self.registry.clone(),
            self.metrics.clone(),
        );
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    m = inbound.message() => m,
                    // Plane shutdown: unacked batches stay in the agent's spool.
                    _ = live.closed() => break,
                };
                let msg = match next {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(%agent, "telemetry stream error: {e}");
                        break;
                    }
                };
                match msg.kind {
                    Some(agent_report::Kind::Logs(mut batch)) => {
                        // The stream's identity wins over what a batch claims.
                        batch.agent_id.clone_from(&agent);
                        if batch.boot_id.is_empty()
                            || batch.boot_id.len() > 64
                            || batch.boot_id.contains('\0')
                        {
                            let _ = tx
                                .send(Err(ErrorCode::InvalidArgument
                                    .status("a log batch needs a boot id (1-64 bytes)")))
                                .await;
                            break;
                        }
                        for r in &mut batch.records {
                            r.agent.clone_from(&agent);
                        }
                        let ack = ReportAck {
                            boot_id: batch.boot_id.clone(),
                            seq: batch.seq,
                        };
                        match store.ingest(&batch).await {
                            Ok(stored) => {
                                if stored {
                                    metrics
                                        .log_records_ingested
                                        .inc_by(batch.records.len() as u64);
                                    live.publish(batch.records);
                                } else {
                                    metrics.log_batches_duplicate.inc();
                                }
                                if tx.send(Ok(ack)).await.is_err() {
                                    break;
                                }
                            }
                            Err(e) => {
                                // Unacked batches stay in the agent's spool and come back later.
                                metrics.log_store_errors.inc();
                                tracing::error!(%agent, seq = batch.seq, "cannot store log batch: {e}");
                                let _ = tx
                                    .send(Err(
                                        ErrorCode::Unavailable.status(format!("log store: {e}"))
                                    ))
                                    .await;
                                break;
                            }
                        }
                    }
                    Some(agent_report::Kind::Metrics(m)) => {
                        registry.report_metrics(&AgentId::new(agent.clone()), m, SystemTime::now());
                    }
                    Some(agent_report::Kind::Hello(_)) | None => {}
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
