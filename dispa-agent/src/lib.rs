//! The Dispa agent: a stateless L7 proxy serving the newest snapshot from the plane, or its
//! last-known-good cached snapshot while the plane is away.
//!
//! `Agent::bind` then `Agent::run` is the whole lifecycle; the `dispa` binary only parses flags.

pub mod admin;
pub mod affinity;
pub mod clock;
pub mod conn;
pub mod policy;
pub mod proxy;
mod reuse;
pub mod routing;
mod server;
pub mod snapshot;
pub mod sync;
pub mod telemetry;
pub mod tls;
pub mod upstream;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use dispa_proto::AgentId;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};

use crate::admin::AdminApi;
use crate::proxy::Proxy;
use crate::snapshot::{Applier, Current, SnapshotCache};
use crate::telemetry::Metrics;
use crate::telemetry::access_log::{self, AccessLogOptions};
use crate::telemetry::shipper::Shipper;
use crate::telemetry::spool::Spool;
use crate::telemetry::window::Window;

#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// How to reach the plane: URL (e.g. `http://127.0.0.1:7070`), TLS, join token.
    pub plane: dispa_proto::connect::PlaneConnect,
    pub listen: SocketAddr,
    /// TLS proxy listener (certificates from the snapshot, chosen by SNI); off when None.
    pub listen_tls: Option<SocketAddr>,
    pub admin: SocketAddr,
    pub id: AgentId,
    pub labels: BTreeMap<String, String>,
    pub cache_dir: PathBuf,
    /// How long SIGTERM waits for in-flight requests.
    pub drain_timeout: Duration,
    pub access_log: AccessLogOptions,
    /// Bound on the on-disk log spool (under `cache_dir/spool`); batches beyond it are dropped
    /// and counted.
    pub log_spool_max: u64,
    /// How often endpoint DNS names are re-resolved.
    pub dns_refresh: Duration,
    /// Threads serving client connections, each with its own event loop (default: one per
    /// CPU).
    pub workers: usize,
    /// Whether serving thread i of each proxy listener runs only on the i-th CPU the process
    /// may use.
    pub pin_workers: affinity::Pinning,
    /// The proxy listeners require a PROXY protocol (v1 or v2) header from a trusted peer.
    pub proxy_protocol: bool,
}

/// On exit, how long the agent waits for the plane to ack its last log batches.
const SHIP_ON_EXIT: Duration = Duration::from_secs(5);

/// Default `--log-spool-max`: 1 GiB.
pub const DEFAULT_LOG_SPOOL_MAX: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Spool(#[from] telemetry::spool::SpoolError),
}

/// A bound agent: listeners open, cached snapshot (if any) loaded, not yet serving.
pub struct Agent {
    opts: AgentOptions,
    proxy_listener: TcpListener,
    tls_listener: Option<TcpListener>,
    admin_listener: TcpListener,
    applier: Arc<Applier>,
    metrics: Arc<Metrics>,
    spool: Arc<Spool>,
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, AgentError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AgentError::Bind { what, addr, source })
}

/// A proxy listener: the first socket of the group its serving threads join.
fn bind_proxy(what: &'static str, addr: SocketAddr) -> Result<TcpListener, AgentError> {
    reuse::bind(addr).map_err(|source| AgentError::Bind { what, addr, source })
}

/// The CPUs the serving threads are pinned to in turn (see [`affinity::plan`]); none, with a
/// warning, when the kernel will not say which the process may use.
fn pinned_cpus(pinning: affinity::Pinning, workers: usize) -> Arc<[usize]> {
    if pinning == affinity::Pinning::Off {
        return Arc::from([]);
    }
    let cpus = match affinity::allowed() {
        Ok(allowed) => affinity::plan(pinning, workers, allowed),
        Err(e) => {
            tracing::warn!(
                "cannot read the CPUs this process may use ({e}); serving threads not pinned"
            );
            Vec::new()
        }
    };
    if !cpus.is_empty() {
        tracing::info!(workers, ?cpus, "serving threads pinned to CPUs in turn");
    }
    cpus.into()
}

impl Agent {
    pub async fn bind(opts: AgentOptions) -> Result<Agent, AgentError> {
        let metrics = Arc::new(Metrics::new());
        let current = Arc::new(Current::default());
        let applier = Arc::new(Applier::new(
            current,
            SnapshotCache::new(&opts.cache_dir),
            metrics.clone(),
        ));
        applier.load_cached().await;
        let spool = Arc::new(Spool::open(
            &opts.cache_dir.join("spool"),
            opts.log_spool_max,
        )?);
        let (batches, bytes) = spool.depth();
        if batches > 0 {
            tracing::info!(
                batches,
                bytes,
                "log batches from an earlier run will be shipped to the plane"
            );
        }
        let proxy_listener = bind_proxy("proxy", opts.listen)?;
        let tls_listener = match opts.listen_tls {
            Some(addr) => Some(bind_proxy("proxy-tls", addr)?),
            None => None,
        };
        let admin_listener = bind("admin", opts.admin).await?;
        Ok(Agent {
            opts,
            proxy_listener,
            tls_listener,
            admin_listener,
            applier,
            metrics,
            spool,
        })
    }

    pub fn proxy_addr(&self) -> Option<SocketAddr> {
        self.proxy_listener.local_addr().ok()
    }

    /// The TLS proxy listener's bound address, when `listen_tls` is set.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_listener.as_ref()?.local_addr().ok()
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_listener.local_addr().ok()
    }

    /// Serves until `shutdown` resolves, then drains in-flight requests and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) {
        let (stop_tx, stop_rx) = watch::channel(false);
        let current = self.applier.current.clone();
        let boot_id = format!("{:016x}", fastrand::u64(..));
        let agent_id = self.opts.id.to_string();
        let (sink, records) =
            access_log::channel(self.metrics.clone(), &agent_id, &self.opts.access_log);
        let window = Arc::new(Window::default());
        let shipped = Arc::new(Notify::new());
        let (log_stop_tx, log_stop_rx) = watch::channel(false);
        let (ship_stop_tx, ship_stop_rx) = watch::channel(false);
        let batcher = tokio::spawn(access_log::run_batcher(
            records,
            self.spool.clone(),
            shipped.clone(),
            self.metrics.clone(),
            (agent_id.clone(), boot_id.clone()),
            self.opts.access_log.stdout,
            log_stop_rx,
        ));
        let shipper = tokio::spawn(
            Shipper {
                plane: self.opts.plane.clone(),
                agent_id,
                boot_id,
                spool: self.spool.clone(),
                notify: shipped,
                window: window.clone(),
                metrics: self.metrics.clone(),
                current: current.clone(),
            }
            .run(ship_stop_rx),
        );
        let dns = {
            let (applier, every, mut stop) =
                (self.applier.clone(), self.opts.dns_refresh, stop_rx.clone());
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(every) => applier.refresh_dns().await,
                        _ = stop.changed() => return,
                    }
                }
            })
        };
        let checks = tokio::spawn(upstream::checker::run(
            current.clone(),
            self.metrics.clone(),
            stop_rx.clone(),
        ));
        let proxy = Arc::new(Proxy::new(
            current.clone(),
            self.metrics.clone(),
            sink,
            window,
        ));
        let admin = Arc::new(AdminApi {
            current,
            metrics: self.metrics.clone(),
            id: self.opts.id.to_string(),
        });
        tracing::info!(
            agent = %self.opts.id,
            proxy = ?self.proxy_addr(),
            proxy_tls = ?self.tls_addr(),
            admin = ?self.admin_addr(),
            plane = %self.opts.plane.url,
            "agent listening"
        );
        let sync = tokio::spawn(sync::run(
            sync::SyncOptions {
                plane: self.opts.plane.clone(),
                id: self.opts.id.clone(),
                labels: self.opts.labels.clone(),
            },
            self.applier.clone(),
            self.metrics.clone(),
            stop_rx.clone(),
        ));
        let drain = self.opts.drain_timeout;
        let workers = self.opts.workers;
        let cpus = pinned_cpus(self.opts.pin_workers, workers);
        let listener = |name, transport, proxy_protocol| server::ListenerOptions {
            name,
            transport,
            current: self.applier.current.clone(),
            proxy_protocol,
            drain,
            metrics: Some(self.metrics.clone()),
            limiter: Default::default(),
            cpus: cpus.clone(),
        };
        let pp = self.opts.proxy_protocol;
        let tls_task = self.tls_listener.map(|l| {
            let proxy = proxy.clone();
            tokio::spawn(server::serve_on_threads(
                workers,
                l,
                listener("proxy-tls", server::Transport::Tls, pp),
                move |req, peer| proxy.clone().serve(req, peer, "https"),
                stop_rx.clone(),
            ))
        });
        let proxy_task = tokio::spawn(server::serve_on_threads(
            workers,
            self.proxy_listener,
            listener("proxy", server::Transport::Plain, pp),
            move |req, peer| proxy.clone().serve(req, peer, "http"),
            stop_rx.clone(),
        ));
        let admin_task = tokio::spawn(server::serve(
            self.admin_listener,
            server::ListenerOptions {
                metrics: None,
                ..listener("admin", server::Transport::Plain, false)
            },
            move |req, _peer| admin.clone().serve(req),
            stop_rx,
        ));
        shutdown.await;
        let _ = stop_tx.send(true);
        if let Some(t) = tls_task {
            let _ = t.await;
        }
        let _ = tokio::join!(proxy_task, admin_task, sync, checks, dns);
        // Requests are drained: write every queued record to the spool, then give the shipper a
        // moment to deliver it (what it cannot deliver stays spooled for the next start).
        let _ = log_stop_tx.send(true);
        let _ = batcher.await;
        let deadline = tokio::time::Instant::now() + SHIP_ON_EXIT;
        while self.spool.depth().0 > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let _ = ship_stop_tx.send(true);
        let _ = shipper.await;
        let (batches, _) = self.spool.depth();
        if batches > 0 {
            tracing::info!(
                batches,
                "log batches left in the spool; they are shipped on the next start"
            );
        }
        tracing::info!(agent = %self.opts.id, "agent stopped");
    }
}
