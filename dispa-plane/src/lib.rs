//! The Dispa control plane: keeps every config version, validates what operators apply,
//! streams the newest snapshot to every agent, and tracks what each agent serves.
//!
//! `Plane::bind` then `Plane::run` is the whole lifecycle; the `dispa` binary only parses flags.

pub mod admin;
pub mod auth;
pub mod distribute;
pub mod logs;
pub mod metrics;
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
use dispa_proto::v1::telemetry_server::TelemetryServer;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;

use crate::admin::{AdminService, now_ms};
use crate::auth::{AuditLog, Auth, Role, TokenStore};
use crate::distribute::{AgentRegistry, DiscoveryService, Distributor, Published};
use crate::logs::{LiveLogs, SharedLogStore, SledLogStore, TelemetryService};
use crate::metrics::PlaneMetrics;
use crate::store::{ConfigStore, SledStore, VersionRecord};
use crate::versions::{ApplyInput, ApplyOutcome, VersionsError};

/// How long shutdown waits for open connections after ending the plane's own streams.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Largest gRPC message accepted (a config upload with certificates and plugins).
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Connections the listening socket queues before they are accepted (the kernel caps it at
/// `net.core.somaxconn`). A fleet reconnecting at once, after a plane restart, is a burst of
/// one connection per agent; past a queue of 1,024 (tokio's default) the kernel answered
/// with SYN cookies, and a failed one resets the agent's connection (docs/BENCHMARKS.md,
/// eleventh pass: 2,000 streams opened at once).
const BACKLOG: u32 = 4096;

/// The plane's listening socket at `addr`.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // As `TcpListener::bind`: a restarted plane binds while old connections linger in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Where traffic logs go.
#[derive(Clone, PartialEq, Eq)]
pub enum LogStoreConfig {
    /// sled, in the data dir (the default).
    Sled,
    /// PostgreSQL at this URL, tables in `schema` (created if missing) or the connection's
    /// current schema.
    Postgres { url: String, schema: Option<String> },
}

// By hand: the URL may carry a password, and options get logged.
impl std::fmt::Debug for LogStoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LogStoreConfig::Sled => f.write_str("Sled"),
            LogStoreConfig::Postgres { schema, .. } => {
                write!(f, "Postgres {{ url: <redacted>, schema: {schema:?} }}")
            }
        }
    }
}

#[derive(Clone, Debug)]
pub struct PlaneOptions {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub log_store: LogStoreConfig,
    /// Log records older than this are deleted.
    pub log_retention: Duration,
    /// sled only: the most records kept; the oldest go first.
    pub log_max_records: usize,
    /// Require tokens (and agent credentials) on every call.
    pub auth: bool,
    /// Where the bootstrap admin token is also written (mode 0600) on first start with auth.
    pub bootstrap_token_file: Option<PathBuf>,
    /// Serve gRPC over TLS.
    pub tls: Option<PlaneTls>,
}

/// The plane's TLS identity and, optionally, the CA agents' client certificates chain to.
#[derive(Clone)]
pub struct PlaneTls {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub client_ca_pem: Option<Vec<u8>>,
}

// By hand: the key must never reach a log.
impl std::fmt::Debug for PlaneTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlaneTls")
            .field("cert_pem", &format_args!("<{} bytes>", self.cert_pem.len()))
            .field("key_pem", &"<redacted>")
            .field("client_ca", &self.client_ca_pem.is_some())
            .finish()
    }
}

impl PlaneOptions {
    pub fn new(data_dir: PathBuf, listen: SocketAddr) -> Self {
        Self {
            data_dir,
            listen,
            log_store: LogStoreConfig::Sled,
            log_retention: Duration::from_secs(7 * 24 * 3600),
            log_max_records: 10_000_000,
            auth: false,
            bootstrap_token_file: None,
            tls: None,
        }
    }
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
    #[error("log store: {0}")]
    Logs(#[from] logs::LogStoreError),
    #[error("auth store: {0}")]
    Auth(String),
    #[error("TLS: {0}")]
    Tls(String),
}

/// Everything the plane's services share.
pub struct PlaneState {
    pub store: Box<dyn ConfigStore>,
    pub distributor: Distributor,
    pub registry: Arc<AgentRegistry>,
    pub logs: SharedLogStore,
    pub live: LiveLogs,
    pub metrics: Arc<PlaneMetrics>,
    pub auth: Arc<Auth>,
}

impl PlaneState {
    fn publish(&self, r: &VersionRecord) {
        self.metrics
            .config_version
            .set(i64::try_from(r.version.0).unwrap_or(i64::MAX));
        self.distributor.publish(Published {
            version: r.version,
            hash: r.meta.hash.clone(),
            snapshot: r.snapshot.clone(),
        });
    }

    /// The plane's /metrics text, with fleet gauges refreshed from the registry.
    pub fn render_metrics(&self) -> String {
        let current = self.current_version();
        let c = self.registry.counts(current);
        self.metrics
            .agents_connected
            .set(i64::from(c.synced + c.pending + c.nacked));
        self.metrics.agents_synced.set(i64::from(c.synced));
        self.metrics.render()
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
            self.metrics.versions_created.inc();
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
        self.metrics.versions_created.inc();
        self.publish(&record);
        Ok((record, diff))
    }
}

/// A bound, not yet serving, plane.
pub struct Plane {
    state: Arc<PlaneState>,
    listener: TcpListener,
    addr: SocketAddr,
    log_retention: Duration,
    tls: Option<PlaneTls>,
}

impl Plane {
    /// Opens the store, publishes its newest version and binds the listener.
    pub async fn bind(opts: PlaneOptions) -> Result<Plane, PlaneError> {
        std::fs::create_dir_all(&opts.data_dir).map_err(|source| PlaneError::DataDir {
            dir: opts.data_dir.clone(),
            source,
        })?;
        let store = SledStore::open(&opts.data_dir.join("config"))?;
        let logs: SharedLogStore = match &opts.log_store {
            LogStoreConfig::Sled => Arc::new(SledLogStore::open(
                &opts.data_dir.join("logs"),
                opts.log_max_records,
            )?),
            LogStoreConfig::Postgres { url, schema: None } => {
                Arc::new(logs::postgres::PgLogStore::connect(url).await?)
            }
            LogStoreConfig::Postgres {
                url,
                schema: Some(schema),
            } => Arc::new(logs::postgres::PgLogStore::connect_with_schema(url, schema).await?),
        };
        tracing::info!(store = logs.kind(), "traffic-log store ready");
        let auth = Arc::new(open_auth(&opts)?);
        let state = Arc::new(PlaneState {
            store: Box::new(store),
            distributor: Distributor::new(),
            registry: Arc::new(AgentRegistry::default()),
            logs,
            live: LiveLogs::default(),
            metrics: Arc::new(PlaneMetrics::new()),
            auth,
        });
        if let Some(head) = state.store.head()? {
            tracing::info!(version = head.version.0, "loaded newest config version");
            state.publish(&head);
        }
        let listener = listen(opts.listen).map_err(|source| PlaneError::Bind {
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
            log_retention: opts.log_retention,
            tls: opts.tls,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn state(&self) -> Arc<PlaneState> {
        self.state.clone()
    }

    /// Serves gRPC (and `/metrics` over HTTP/1.1 on the same port) until `shutdown`
    /// resolves; then ends agent streams and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), PlaneError> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let discovery = DiscoveryService::new(
            self.state.distributor.clone(),
            self.state.registry.clone(),
            stop_rx.clone(),
        );
        let admin = AdminService::new(self.state.clone());
        let telemetry = TelemetryService::new(
            self.state.logs.clone(),
            self.state.live.clone(),
            self.state.registry.clone(),
            self.state.metrics.clone(),
        );
        let retention = tokio::spawn(retain_logs(
            self.state.logs.clone(),
            self.log_retention,
            stop_rx,
        ));
        tracing::info!(addr = %self.addr, "plane listening");
        let metrics_state = self.state.clone();
        let routes = tonic::service::Routes::new(
            ConfigDiscoveryServer::new(discovery)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            AdminServer::new(admin)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(TelemetryServer::new(telemetry).max_decoding_message_size(MAX_MESSAGE_BYTES))
        .into_axum_router()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let s = metrics_state.clone();
                async move { s.render_metrics() }
            }),
        )
        .layer(axum::middleware::from_fn_with_state(
            self.state.auth.clone(),
            auth::layer::check,
        ));
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(self.listener);
        let live = self.state.live.clone();
        let (deadline_tx, deadline_rx) = tokio::sync::oneshot::channel::<()>();
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = &self.tls {
            let mut cfg = tonic::transport::ServerTlsConfig::new().identity(
                tonic::transport::Identity::from_pem(&tls.cert_pem, &tls.key_pem),
            );
            if let Some(ca) = &tls.client_ca_pem {
                // Optional: operators use tokens; agents may present a certificate instead.
                cfg = cfg
                    .client_ca_root(tonic::transport::Certificate::from_pem(ca))
                    .client_auth_optional(true);
            }
            builder = builder
                .tls_config(cfg)
                .map_err(|e| PlaneError::Tls(e.to_string()))?;
        }
        let server = builder
            .accept_http1(true)
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .tcp_nodelay(true)
            .add_routes(tonic::service::Routes::from(routes))
            .serve_with_incoming_shutdown(incoming, async move {
                shutdown.await;
                // Long-lived streams (config, telemetry, log follows) would hold graceful
                // shutdown open forever: end them.
                let _ = stop_tx.send(true);
                live.close();
                let _ = deadline_tx.send(());
            });
        tokio::select! {
            r = server => r?,
            // Connections that still do not finish get this long, then are dropped.
            _ = async {
                let _ = deadline_rx.await;
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            } => tracing::warn!("connections still open after {SHUTDOWN_GRACE:?}; closing them"),
        }
        retention.abort();
        tracing::info!("plane stopped");
        Ok(())
    }
}

/// Opens the token store and audit log; on the first start with auth, makes and prints the
/// bootstrap admin token (only its digest is kept).
fn open_auth(opts: &PlaneOptions) -> Result<Auth, PlaneError> {
    let err = |e: sled::Error| PlaneError::Auth(e.to_string());
    let dir = opts.data_dir.join("auth");
    let db = sled::open(&dir)
        .map_err(|e| PlaneError::Auth(format!("opening {}: {e}", dir.display())))?;
    let auth = Auth {
        enabled: opts.auth,
        tokens: TokenStore::new(db.open_tree("tokens").map_err(err)?),
        audit: AuditLog::new(db.open_tree("audit").map_err(err)?),
    };
    if opts.auth && auth.tokens.is_empty() {
        let (info, token) = auth
            .tokens
            .create(
                Role::Admin,
                "bootstrap",
                "dispa plane",
                now_ms(SystemTime::now()),
            )
            .map_err(|e| PlaneError::Auth(e.to_string()))?;
        if let Some(path) = &opts.bootstrap_token_file {
            write_private(path, &token)
                .map_err(|e| PlaneError::Auth(format!("writing {}: {e}", path.display())))?;
        }
        // Printed once, on stdout (not the log): it is stored only as a digest.
        println!("bootstrap admin token (shown once; store it safely): {token}");
        let mut rec = crate::auth::AuditRecord {
            who: "dispa plane".into(),
            action: "CreateToken".into(),
            outcome: "ok",
            ..Default::default()
        };
        rec.message = format!("bootstrap admin token {} ({})", info.name, info.id);
        auth.record(rec);
        tracing::info!(id = %info.id, "created the bootstrap admin token");
    }
    if opts.auth {
        tracing::info!("auth on: every call needs a token or an agent certificate");
    }
    Ok(auth)
}

/// Writes a file only its owner can read.
fn write_private(path: &std::path::Path, content: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(content.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()
}

/// Deletes expired traffic logs once a minute.
async fn retain_logs(logs: SharedLogStore, retention: Duration, mut stop: watch::Receiver<bool>) {
    loop {
        let cutoff = SystemTime::now()
            .checked_sub(retention)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let cutoff_us = dispa_proto::logs::unix_us(cutoff);
        match logs.retain(cutoff_us).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "expired traffic-log records removed"),
            Err(e) => tracing::warn!("traffic-log retention failed: {e}"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
            _ = stop.changed() => return,
        }
    }
}
