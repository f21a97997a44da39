//! The discovery client: keeps one stream open to the plane, applies each snapshot or NACKs it,
//! and reconnects with capped exponential backoff and jitter when the plane goes away.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use dispa_proto::v1::config_discovery_client::ConfigDiscoveryClient;
use dispa_proto::v1::{Ack, DiscoveryRequest, Nack, Node, discovery_request};
use dispa_proto::{AgentId, BUILD_VERSION, PROTOCOL_VERSION};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::snapshot::{Applier, CompileError};
use crate::telemetry::Metrics;

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// After the plane refuses us (protocol mismatch), retrying fast cannot help.
const REFUSED_BACKOFF: Duration = Duration::from_secs(30);

#[derive(Clone, Debug)]
pub struct SyncOptions {
    pub plane: dispa_proto::connect::PlaneConnect,
    pub id: AgentId,
    pub labels: BTreeMap<String, String>,
}

/// Runs until `shutdown` turns true.
pub async fn run(
    opts: SyncOptions,
    applier: Arc<Applier>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let outcome = tokio::select! {
            o = session(&opts, &applier, &metrics) => o,
            _ = shutdown.changed() => return,
        };
        metrics.plane_connected.set(0);
        let (wait, next) = match &outcome {
            Outcome::Ended { received } => {
                tracing::warn!(plane = %opts.plane.url, "config stream to the plane ended; reconnecting");
                // A stream that delivered something was healthy: start the backoff over.
                if *received {
                    (BACKOFF_MIN, BACKOFF_MIN)
                } else {
                    (backoff, backoff * 2)
                }
            }
            Outcome::Failed(e) => {
                tracing::warn!(plane = %opts.plane.url, "cannot reach the plane: {e}");
                (backoff, backoff * 2)
            }
            Outcome::Refused(e) => {
                tracing::error!(plane = %opts.plane.url, "the plane refused this agent: {e}");
                (REFUSED_BACKOFF, backoff)
            }
        };
        backoff = next.min(BACKOFF_MAX);
        // Jitter in [wait/2, wait] so a fleet does not reconnect in lockstep.
        let half = wait / 2;
        let jittered = half + half.mul_f64(fastrand::f64());
        tokio::select! {
            _ = tokio::time::sleep(jittered) => {}
            _ = shutdown.changed() => return,
        }
    }
}

enum Outcome {
    Ended { received: bool },
    Failed(String),
    Refused(String),
}

async fn session(opts: &SyncOptions, applier: &Applier, metrics: &Metrics) -> Outcome {
    let (endpoint, auth) = match (opts.plane.endpoint(), opts.plane.interceptor()) {
        (Ok(e), Ok(auth)) => (
            e.http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(20))
                .tcp_nodelay(true),
            auth,
        ),
        (Err(e), _) | (_, Err(e)) => return Outcome::Failed(e.to_string()),
    };
    let channel = match endpoint.connect().await {
        Ok(c) => c,
        Err(e) => return Outcome::Failed(error_chain(&e)),
    };
    let mut client = ConfigDiscoveryClient::with_interceptor(channel, auth)
        .max_decoding_message_size(256 * 1024 * 1024);
    let (tx, rx) = mpsc::channel(8);
    let (have_version, have_hash) = applier.serving();
    let hello = DiscoveryRequest {
        node: Some(Node {
            id: opts.id.to_string(),
            labels: opts.labels.clone().into_iter().collect(),
            build_version: BUILD_VERSION.to_string(),
            protocol_version: PROTOCOL_VERSION.to_string(),
            have_version: have_version.0,
            have_hash,
        }),
        response: None,
    };
    if tx.send(hello).await.is_err() {
        return Outcome::Failed("stream closed".into());
    }
    let mut stream = match client.stream(ReceiverStream::new(rx)).await {
        Ok(r) => r.into_inner(),
        // Version skew or missing credentials: retrying soon will not help.
        Err(s)
            if matches!(
                s.code(),
                tonic::Code::FailedPrecondition
                    | tonic::Code::Unauthenticated
                    | tonic::Code::PermissionDenied
            ) =>
        {
            return Outcome::Refused(s.message().to_string());
        }
        Err(s) => return Outcome::Failed(format!("{}: {}", s.code(), s.message())),
    };
    tracing::info!(plane = %opts.plane.url, have_version = have_version.0, "connected to the plane");
    metrics.plane_connected.set(1);
    let mut received = false;
    loop {
        let env = match stream.message().await {
            Ok(Some(env)) => env,
            Ok(None) => return Outcome::Ended { received },
            Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                return Outcome::Refused(s.message().to_string());
            }
            Err(s) => {
                tracing::debug!("stream error: {s}");
                return Outcome::Ended { received };
            }
        };
        received = true;
        let reply = applier.apply_and_cache(&env).await.map_err(|e| {
            if matches!(e, CompileError::Protocol { .. }) {
                tracing::error!("{e}");
            }
            e.to_string()
        });
        let response = match reply {
            Ok(()) => {
                tracing::info!(version = env.version, "serving new snapshot");
                discovery_request::Response::Ack(Ack {
                    version: env.version,
                    nonce: env.nonce,
                })
            }
            Err(error) => {
                tracing::warn!(
                    version = env.version,
                    "rejected snapshot, still serving the previous one: {error}"
                );
                discovery_request::Response::Nack(Nack {
                    version: env.version,
                    nonce: env.nonce,
                    error,
                })
            }
        };
        let req = DiscoveryRequest {
            node: None,
            response: Some(response),
        };
        if tx.send(req).await.is_err() {
            return Outcome::Ended { received };
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}
