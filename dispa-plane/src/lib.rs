//! The Dispa control plane: keeps every config version, validates what operators apply,
//! streams the newest snapshot to every agent, and tracks what each agent serves.
//!
//! `Plane::bind` then `Plane::run` is the whole lifecycle; the `dispa` binary only parses flags.

pub mod admin;
pub mod distribute;
pub mod store;
pub mod versions;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use dispa_proto::Version;
use dispa_proto::v1::admin_server::AdminServer;
use dispa_proto::v1::config_discovery_server::ConfigDiscoveryServer;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin::{AdminService, now_ms};
use crate::distribute::{AgentRegistry, DiscoveryService, Distributor, Published};
use crate::store::{ConfigStore, SledStore, VersionRecord};
use crate::versions::{ApplyInput, ApplyOutcome, VersionsError};

/// Largest gRPC message accepted (a config upload with certificates and plugins).
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

#[derive(Clone, Debug)]
pub struct PlaneOptions {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum PlaneError {
    #[error("config store: {0}")]
    Store(#[from] store::StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot create data dir {dir}: {source}")]
    DataDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Everything the plane's services share.
pub struct PlaneState {
    pub store: Box<dyn ConfigStore>,
    pub distributor: Distributor,
    pub registry: Arc<AgentRegistry>,
}

impl PlaneState {
    fn publish(&self, r: &VersionRecord) {
        self.distributor.publish(Published {
            version: r.version,
            hash: r.meta.hash.clone(),
            snapshot: r.snapshot.clone(),
        });
    }

    pub fn current_version(&self) -> Version {
        self.distributor
            .current()
            .map_or(Version::NONE, |p| p.version)
    }

    /// Validates, stores (durably) and publishes a config. Blocking: call off async workers.
    pub fn apply(&self, input: ApplyInput) -> Result<ApplyOutcome, VersionsError> {
        let out = versions::apply(self.store.as_ref(), input, now_ms(SystemTime::now()))?;
        if let ApplyOutcome::Created { record, .. } = &out {
            tracing::info!(version = record.version.0, author = %record.meta.author, "applied new version");
            self.publish(record);
        }
        Ok(out)
    }

    /// Stores (durably) and publishes a new version with an old version's content.
    pub fn rollback(
        &self,
        to: Version,
        expect: Option<Version>,
        author: String,
        message: String,
    ) -> Result<(VersionRecord, String), VersionsError> {
        let (record, diff) = versions::rollback(
            self.store.as_ref(),
            to,
            expect,
            author,
            message,
            now_ms(SystemTime::now()),
        )?;
        tracing::info!(version = record.version.0, rollback_of = to.0, author = %record.meta.author, "rolled back");
        self.publish(&record);
        Ok((record, diff))
    }
}

/// A bound, not yet serving, plane.
pub struct Plane {
    state: Arc<PlaneState>,
    listener: TcpListener,
    addr: SocketAddr,
}

impl Plane {
    /// Opens the store, publishes its newest version and binds the listener.
    pub async fn bind(opts: PlaneOptions) -> Result<Plane, PlaneError> {
        std::fs::create_dir_all(&opts.data_dir).map_err(|source| PlaneError::DataDir {
            dir: opts.data_dir.clone(),
            source,
        })?;
        let store = SledStore::open(&opts.data_dir.join("config"))?;
        let state = Arc::new(PlaneState {
            store: Box::new(store),
            distributor: Distributor::new(),
            registry: Arc::new(AgentRegistry::default()),
        });
        if let Some(head) = state.store.head()? {
            tracing::info!(version = head.version.0, "loaded newest config version");
            state.publish(&head);
        }
        let listener = TcpListener::bind(opts.listen)
            .await
            .map_err(|source| PlaneError::Bind {
                addr: opts.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| PlaneError::Bind {
            addr: opts.listen,
            source,
        })?;
        Ok(Plane {
            state,
            listener,
            addr,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn state(&self) -> Arc<PlaneState> {
        self.state.clone()
    }

    /// Serves gRPC until `shutdown` resolves; then ends agent streams and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), PlaneError> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let discovery = DiscoveryService::new(
            self.state.distributor.clone(),
            self.state.registry.clone(),
            stop_rx,
        );
        let admin = AdminService::new(self.state.clone());
        tracing::info!(addr = %self.addr, "plane listening");
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(self.listener);
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .tcp_nodelay(true)
            .add_service(
                ConfigDiscoveryServer::new(discovery)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
            .add_service(
                AdminServer::new(admin)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
            .serve_with_incoming_shutdown(incoming, async move {
                shutdown.await;
                // Long-lived agent streams would hold graceful shutdown open forever.
                let _ = stop_tx.send(true);
            })
            .await?;
        tracing::info!("plane stopped");
        Ok(())
    }
}
