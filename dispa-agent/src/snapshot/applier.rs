//! The one path every snapshot takes, cached or fresh: verify -> decode -> resolve -> compile
//! -> swap -> cache.

use std::sync::Arc;

use dispa_proto::Version;
use dispa_proto::config::wire;
use dispa_proto::v1::SnapshotEnvelope;

use super::{CompileError, Current, SnapshotCache, compile, resolve_endpoints};
use crate::telemetry::Metrics;

pub struct Applier {
    pub current: Arc<Current>,
    cache: SnapshotCache,
    metrics: Arc<Metrics>,
}

impl Applier {
    pub fn new(current: Arc<Current>, cache: SnapshotCache, metrics: Arc<Metrics>) -> Self {
        Self {
            current,
            cache,
            metrics,
        }
    }

    /// (version, hash) being served, for the plane to skip what this agent already has.
    pub fn serving(&self) -> (Version, String) {
        self.current
            .load()
            .map_or((Version::NONE, String::new()), |s| {
                (s.version, s.hash.clone())
            })
    }

    /// Builds and swaps in the envelope's snapshot. On error nothing changes.
    pub async fn apply(&self, env: &SnapshotEnvelope) -> Result<(), CompileError> {
        // Checked here, not in the stream client, so a cached snapshot passes the same check.
        use dispa_proto::{BUILD_VERSION, PROTOCOL_VERSION, protocol_major};
        if protocol_major(&env.protocol_version) != protocol_major(PROTOCOL_VERSION) {
            return Err(CompileError::Protocol {
                theirs: env.protocol_version.clone(),
                build: env.plane_build_version.clone(),
                ours: PROTOCOL_VERSION,
                our_build: BUILD_VERSION,
            });
        }
        let actual = dispa_proto::content_hash(&env.snapshot);
        if actual != env.hash {
            return Err(CompileError::Hash {
                expected: env.hash.clone(),
                actual,
            });
        }
        let config = wire::decode(&env.snapshot)?;
        let resolved = resolve_endpoints(&config).await?;
        let previous = self.current.load();
        let next = compile(
            Version(env.version),
            env.hash.clone(),
            &config,
            &resolved,
            previous.as_deref(),
        )?;
        self.current.swap(Arc::new(next));
        self.metrics
            .config_version
            .set(i64::try_from(env.version).unwrap_or(i64::MAX));
        self.metrics.snapshots_applied.inc();
        Ok(())
    }

    /// Re-resolves the current snapshot's endpoint names; when addresses changed, rebuilds the
    /// snapshot through the same `compile` (state carried by identity) and swaps it in.
    pub async fn refresh_dns(&self) {
        let Some(current) = self.current.load() else {
            return;
        };
        let Some(resolved) =
            super::refresh_names(&current.resolved, super::resolve::system_lookup).await
        else {
            return;
        };
        match compile(
            current.version,
            current.hash.clone(),
            &current.config,
            &resolved,
            Some(&current),
        ) {
            // Only if no newer snapshot arrived meanwhile.
            Ok(next) => {
                self.current.replace_if(&current, Arc::new(next));
            }
            Err(e) => {
                tracing::warn!("cannot rebuild the snapshot with new endpoint addresses: {e}")
            }
        }
    }

    /// Applies a snapshot from the plane and makes it the last-known-good on disk.
    pub async fn apply_and_cache(&self, env: &SnapshotEnvelope) -> Result<(), CompileError> {
        if let Err(e) = self.apply(env).await {
            self.metrics.snapshots_rejected.inc();
            return Err(e);
        }
        let cache = self.cache.clone();
        let env = env.clone();
        match tokio::task::spawn_blocking(move || cache.store(&env)).await {
            Ok(Ok(())) => {}
            // Serving is unaffected; only a restart without the plane would miss this version.
            Ok(Err(e)) => tracing::warn!("could not write snapshot cache: {e}"),
            Err(e) => tracing::warn!("snapshot cache task failed: {e}"),
        }
        Ok(())
    }

    /// Boots from the on-disk cache, if there is a usable one.
    pub async fn load_cached(&self) {
        let cache = self.cache.clone();
        let loaded = tokio::task::spawn_blocking(move || cache.load()).await;
        match loaded {
            Ok(Ok(Some(env))) => match self.apply(&env).await {
                Ok(()) => tracing::info!(
                    version = env.version,
                    "serving cached snapshot until the plane answers"
                ),
                Err(e) => tracing::warn!(version = env.version, "cached snapshot is unusable: {e}"),
            },
            Ok(Ok(None)) => tracing::info!("no cached snapshot; waiting for the plane"),
            Ok(Err(e)) => tracing::warn!("{e}"),
            Err(e) => tracing::warn!("snapshot cache task failed: {e}"),
        }
    }
}
