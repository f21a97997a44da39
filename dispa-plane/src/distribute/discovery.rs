//! The `ConfigDiscovery.Stream` handler. One task reads the agent's ACK/NACKs into the registry;
//! the response stream pulls the newest published snapshot whenever the transport can send, so a
//! slow agent is never queued stale versions.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use dispa_proto::v1::config_discovery_server::ConfigDiscovery;
use dispa_proto::v1::{DiscoveryRequest, SnapshotEnvelope, discovery_request};
use dispa_proto::{AgentId, BUILD_VERSION, ErrorCode, PROTOCOL_VERSION, Version, protocol_major};
use futures_util::Stream;
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};

use super::registry::Hello;
use super::{AgentRegistry, Distributor, Published};

pub struct DiscoveryService {
    distributor: Distributor,
    registry: Arc<AgentRegistry>,
    shutdown: watch::Receiver<bool>,
}

impl DiscoveryService {
    pub fn new(
        distributor: Distributor,
        registry: Arc<AgentRegistry>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            distributor,
            registry,
            shutdown,
        }
    }
}

/// 1-128 letters, digits, '-', '_', '.', ':'.
pub fn valid_agent_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

type EnvelopeStream = Pin<Box<dyn Stream<Item = Result<SnapshotEnvelope, Status>> + Send>>;

struct Outbound {
    id: AgentId,
    conn: u64,
    /// (version, hash) the agent has or was last sent.
    last: Option<(Version, String)>,
    seq: u64,
    rx: watch::Receiver<Option<Arc<Published>>>,
    shutdown: watch::Receiver<bool>,
    registry: Arc<AgentRegistry>,
}

impl Outbound {
    async fn next(mut self) -> Option<(Result<SnapshotEnvelope, Status>, Self)> {
        loop {
            if *self.shutdown.borrow() {
                return None;
            }
            let newest = self.rx.borrow_and_update().clone();
            if let Some(p) = newest {
                let already = self
                    .last
                    .as_ref()
                    .is_some_and(|(v, h)| *v == p.version && *h == p.hash);
                if !already {
                    self.seq += 1;
                    let nonce = format!("{}-{}", self.conn, self.seq);
                    self.registry
                        .sent(&self.id, self.conn, p.version, SystemTime::now());
                    self.last = Some((p.version, p.hash.clone()));
                    let env = SnapshotEnvelope {
                        version: p.version.0,
                        nonce,
                        hash: p.hash.clone(),
                        // A reference-counted clone: the bytes were encoded once at apply time.
                        snapshot: p.snapshot.clone(),
                        plane_build_version: BUILD_VERSION.to_string(),
                        protocol_version: PROTOCOL_VERSION.to_string(),
                    };
                    return Some((Ok(env), self));
                }
            }
            tokio::select! {
                changed = self.rx.changed() => if changed.is_err() { return None },
                _ = self.shutdown.changed() => return None,
            }
        }
    }
}

#[tonic::async_trait]
impl ConfigDiscovery for DiscoveryService {
    type StreamStream = EnvelopeStream;

    async fn stream(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let peer = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let mut inbound = request.into_inner();
        let first = inbound.message().await?.ok_or_else(|| {
            ErrorCode::InvalidArgument.status("stream closed before the agent said who it is")
        })?;
        let node = first.node.ok_or_else(|| {
            ErrorCode::InvalidArgument.status("the first DiscoveryRequest must carry `node`")
        })?;
        if !valid_agent_id(&node.id) {
            return Err(ErrorCode::InvalidArgument.status(format!(
                "invalid agent id {:?}: use 1-128 letters, digits, '-', '_', '.' or ':'",
                node.id
            )));
        }
        let id = AgentId::new(node.id.clone());
        let labels: BTreeMap<_, _> = node.labels.into_iter().collect();
        let hello = Hello {
            id: id.clone(),
            labels,
            build_version: node.build_version.clone(),
            protocol_version: node.protocol_version.clone(),
            peer: peer.clone(),
            serving: Version::NONE,
        };
        let ours = protocol_major(PROTOCOL_VERSION);
        if protocol_major(&node.protocol_version) != ours {
            let msg = format!(
                "agent {id} speaks dispa protocol {:?} (build {}), this plane speaks protocol {PROTOCOL_VERSION} (build {BUILD_VERSION}); protocol major versions must match",
                node.protocol_version, node.build_version
            );
            tracing::warn!(agent = %id, %peer, "refused agent: {msg}");
            self.registry.refused(hello, msg.clone(), SystemTime::now());
            return Err(ErrorCode::Incompatible.status(msg));
        }

        // The agent already serves the newest version: record it as synced, send nothing.
        let current = self.distributor.current();
        let have = (Version(node.have_version), node.have_hash);
        let serving = match &current {
            Some(p) if p.version == have.0 && p.hash == have.1 => have.0,
            _ => Version::NONE,
        };
        let (conn, replaced) = self
            .registry
            .connect(Hello { serving, ..hello }, SystemTime::now());
        if replaced {
            tracing::warn!(agent = %id, %peer, "agent id connected again; the newer stream replaces the older one");
        }
        tracing::info!(agent = %id, %peer, have_version = have.0.0, build = %node.build_version, "agent connected");

        let registry = self.registry.clone();
        let reader_id = id.clone();
        tokio::spawn(async move {
            loop {
                match inbound.message().await {
                    Ok(Some(req)) => handle_reply(&registry, &reader_id, conn, req),
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(agent = %reader_id, "stream error: {e}");
                        break;
                    }
                }
            }
            registry.disconnected(&reader_id, conn, SystemTime::now());
            tracing::info!(agent = %reader_id, "agent disconnected");
        });

        let out = Outbound {
            id,
            conn,
            last: (!have.0.is_none()).then_some(have),
            seq: 0,
            rx: self.distributor.subscribe(),
            shutdown: self.shutdown.clone(),
            registry: self.registry.clone(),
        };
        let stream = futures_util::stream::unfold(out, Outbound::next);
        Ok(Response::new(Box::pin(stream)))
    }
}

fn handle_reply(registry: &AgentRegistry, id: &AgentId, conn: u64, req: DiscoveryRequest) {
    let now = SystemTime::now();
    match req.response {
        Some(discovery_request::Response::Ack(a)) => {
            tracing::info!(agent = %id, version = a.version, "agent acked");
            registry.acked(id, conn, Version(a.version), now);
        }
        Some(discovery_request::Response::Nack(n)) => {
            let error: String = n.error.chars().take(4096).collect();
            tracing::warn!(agent = %id, version = n.version, "agent rejected version: {error}");
            registry.nacked(id, conn, Version(n.version), &error, now);
        }
        None => {}
    }
}
