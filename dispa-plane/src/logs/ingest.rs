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
    tx: broadcast::Sender<Arc<Vec<LogRecord>>>,
}

impl Default for LiveLogs {
    fn default() -> Self {
        Self {
            tx: broadcast::channel(1024).0,
        }
    }
}

impl LiveLogs {
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Vec<LogRecord>>> {
        self.tx.subscribe()
    }

    fn publish(&self, records: Vec<LogRecord>) {
        // No receivers is fine.
        let _ = self.tx.send(Arc::new(records));
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
        if hello.agent_id.is_empty() || hello.agent_id.len() > 128 || hello.boot_id.is_empty() {
            return Err(ErrorCode::InvalidArgument
                .status("hello needs an agent id (<= 128 bytes) and a boot id"));
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
                let msg = match inbound.message().await {
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
