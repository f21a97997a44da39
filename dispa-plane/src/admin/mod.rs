//! The Admin gRPC service: decode, call the plain functions in [`crate::versions`], encode.

mod access;

use std::sync::Arc;
use std::time::SystemTime;

use dispa_proto::config::{self, Attachments, Diagnostics};
use dispa_proto::v1::admin_server::Admin;
use dispa_proto::v1::{self, diff_request};
use dispa_proto::{BUILD_VERSION, ErrorCode, PROTOCOL_VERSION, Version};
use tonic::{Request, Response, Status};

use crate::PlaneState;
use crate::distribute::SyncState;
use crate::logs::{LogFilter, compute_stats};
use crate::store::{VersionMeta, VersionRecord};
use crate::versions::{self, ApplyInput, ApplyOutcome, VersionsError};

pub struct AdminService {
    state: Arc<PlaneState>,
}

impl AdminService {
    pub fn new(state: Arc<PlaneState>) -> Self {
        Self { state }
    }
}

pub(crate) fn now_ms(t: SystemTime) -> i64 {
    dispa_proto::logs::unix_us(t) / 1000
}

fn status(e: VersionsError) -> Status {
    let code = e.code();
    let mut s = code.status(e.to_string());
    if let VersionsError::Invalid(d) = &e {
        // Structured diagnostics ride along so clients can render them precisely.
        let resp = v1::ValidateResponse {
            diagnostics: diagnostics_to_wire(d),
        };
        s = Status::with_details(
            code.grpc_code(),
            e.to_string(),
            prost::Message::encode_to_vec(&resp).into(),
        );
    }
    s
}

fn diagnostics_to_wire(d: &Diagnostics) -> Vec<v1::Diagnostic> {
    d.0.iter().map(v1::Diagnostic::from).collect()
}

fn info(version: Version, m: &VersionMeta) -> v1::VersionInfo {
    v1::VersionInfo {
        version: version.0,
        hash: m.hash.clone(),
        author: m.author.clone(),
        message: m.message.clone(),
        created_at_ms: m.created_at_ms,
        rollback_of: m.rollback_of.map_or(0, |v| v.0),
        source_name: m.source_name.clone(),
    }
}

/// A version's uploaded files; secret ones carry no content unless `show_secrets`.
fn file_infos(rec: &VersionRecord, show_secrets: bool) -> Vec<v1::FileInfo> {
    // Stored versions were valid when stored; if one no longer parses, treat every file as
    // secret rather than risk showing a key.
    let secret = config::parse_with_files(&rec.meta.source_name, &rec.content, &rec.files)
        .map(|c| c.key_files())
        .ok();
    rec.files
        .0
        .iter()
        .map(|(path, content)| {
            let is_secret = secret.as_ref().is_none_or(|s| s.contains(path));
            v1::FileInfo {
                path: path.clone(),
                size: content.len() as u64,
                sha256: dispa_proto::content_hash(content),
                secret: is_secret,
                content: if is_secret && !show_secrets {
                    Default::default()
                } else {
                    content.clone()
                },
            }
        })
        .collect()
}

fn file_of(f: Option<v1::SourceFile>) -> Result<v1::SourceFile, Status> {
    f.ok_or_else(|| ErrorCode::InvalidArgument.status("missing `file`"))
}

/// Largest `--limit` a log query may ask for.
const MAX_LOG_LIMIT: usize = 1_000_000;
/// Statistics look at up to this many of the newest matching records.
const MAX_STATS_RECORDS: usize = 1_000_000;

fn log_limit(requested: u32) -> usize {
    match requested {
        0 => 100,
        n => (n as usize).min(MAX_LOG_LIMIT),
    }
}

fn agent_info(a: crate::distribute::AgentRecord, current: Version) -> v1::AgentInfo {
    v1::AgentInfo {
        state: match a.state(current) {
            SyncState::Synced => v1::AgentSyncState::Synced,
            SyncState::Pending => v1::AgentSyncState::Pending,
            SyncState::Nacked => v1::AgentSyncState::Nacked,
            SyncState::Disconnected => v1::AgentSyncState::Disconnected,
        } as i32,
        id: a.id.to_string(),
        labels: a.labels.into_iter().collect(),
        build_version: a.build_version,
        protocol_version: a.protocol_version,
        acked_version: a.acked_version.0,
        sent_version: a.sent_version.0,
        last_error: a.last_error,
        last_seen_ms: now_ms(a.last_seen),
        connected_since_ms: if a.connection.is_some() {
            now_ms(a.connected_since)
        } else {
            0
        },
        peer: a.peer,
        metrics: a.metrics,
    }
}

impl AdminService {
    /// Runs blocking store work (sled reads, flushes) off the async workers.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&PlaneState) -> Result<T, VersionsError> + Send + 'static,
    ) -> Result<T, Status> {
        let state = self.state.clone();
        tokio::task::spawn_blocking(move || f(&state))
            .await
            .map_err(|e| ErrorCode::Internal.status(format!("store task failed: {e}")))?
            .map_err(status)
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn apply(
        &self,
        request: Request<v1::ApplyRequest>,
    ) -> Result<Response<v1::ApplyResponse>, Status> {
        let who = access::principal(&request);
        let r = request.into_inner();
        let file = file_of(r.file)?;
        let (dry_run, message) = (r.dry_run, r.message.clone());
        let input = ApplyInput {
            source_name: file.name,
            content: file.content,
            files: Attachments::from_wire(file.attachments),
            author: r.author,
            message: r.message,
            expect_version: r.expect_version.map(Version),
            dry_run: r.dry_run,
        };
        let before = self.state.current_version();
        let outcome = self.blocking(move |s| s.apply(input)).await;
        if !dry_run {
            let result = match &outcome {
                Ok(ApplyOutcome::Created { record, .. }) => Ok((before, record.version)),
                Ok(
                    ApplyOutcome::Unchanged { current, .. } | ApplyOutcome::DryRun { current, .. },
                ) => Ok((*current, *current)),
                Err(e) => Err(e),
            };
            access::audit_change(&self.state, &who, "Apply", result, &message);
        }
        Ok(Response::new(match outcome? {
            ApplyOutcome::Created { record, diff } => v1::ApplyResponse {
                version: record.version.0,
                created: true,
                hash: record.meta.hash,
                diff,
            },
            ApplyOutcome::Unchanged { current, hash } => v1::ApplyResponse {
                version: current.0,
                created: false,
                hash,
                diff: String::new(),
            },
            ApplyOutcome::DryRun {
                current,
                hash,
                diff,
            } => v1::ApplyResponse {
                version: current.0,
                created: false,
                hash,
                diff,
            },
        }))
    }

    async fn validate(
        &self,
        request: Request<v1::ValidateRequest>,
    ) -> Result<Response<v1::ValidateResponse>, Status> {
        let file = file_of(request.into_inner().file)?;
        let files = Attachments::from_wire(file.attachments);
        let diagnostics = match config::parse_with_files(&file.name, &file.content, &files) {
            Ok(_) => Vec::new(),
            Err(d) => diagnostics_to_wire(&d),
        };
        Ok(Response::new(v1::ValidateResponse { diagnostics }))
    }

    async fn diff(
        &self,
        request: Request<v1::DiffRequest>,
    ) -> Result<Response<v1::DiffResponse>, Status> {
        let r = request.into_inner();
        let Some(to) = r.to else {
            return Err(ErrorCode::InvalidArgument.status("Diff needs `to`: a version or a file"));
        };
        let resp = self
            .blocking(move |s| {
                let from = versions::get(s.store.as_ref(), Version(r.from_version));
                let (from_v, from_label, from_content, from_files) = match from {
                    Ok(rec) => (
                        rec.version,
                        versions::label(rec.version),
                        rec.content,
                        rec.files,
                    ),
                    // Diffing a file against an empty store shows the whole file as new.
                    Err(VersionsError::NotFound(v)) if v.is_none() => (
                        Version::NONE,
                        versions::label(v),
                        String::new(),
                        Attachments::default(),
                    ),
                    Err(e) => return Err(e),
                };
                let (to_label, to_content, to_files) = match to {
                    diff_request::To::ToVersion(v) => {
                        let rec = versions::get(s.store.as_ref(), Version(v))?;
                        (versions::label(rec.version), rec.content, rec.files)
                    }
                    diff_request::To::File(f) => {
                        // Diff only what would be accepted.
                        let files = Attachments::from_wire(f.attachments);
                        config::parse_with_files(&f.name, &f.content, &files)
                            .map_err(VersionsError::Invalid)?;
                        (f.name, f.content, files)
                    }
                };
                let mut diff =
                    versions::unified_diff(&from_label, &from_content, &to_label, &to_content);
                diff.push_str(&versions::files_diff(Some(&from_files), &to_files));
                Ok(v1::DiffResponse {
                    diff,
                    from_version: from_v.0,
                })
            })
            .await?;
        Ok(Response::new(resp))
    }

    async fn get(
        &self,
        request: Request<v1::GetRequest>,
    ) -> Result<Response<v1::GetResponse>, Status> {
        let who = access::principal(&request);
        let r = request.into_inner();
        if r.show_secrets {
            access::check_show_secrets(&self.state, &who)?;
        }
        let v = Version(r.version);
        let rec: VersionRecord = self
            .blocking(move |s| versions::get(s.store.as_ref(), v))
            .await?;
        let files = file_infos(&rec, r.show_secrets);
        let content = if r.show_secrets {
            rec.content
        } else {
            config::redact_source(&rec.meta.source_name, &rec.content)
        };
        Ok(Response::new(v1::GetResponse {
            info: Some(info(rec.version, &rec.meta)),
            content,
            files,
        }))
    }

    async fn history(
        &self,
        request: Request<v1::HistoryRequest>,
    ) -> Result<Response<v1::HistoryResponse>, Status> {
        let limit = match request.into_inner().limit {
            0 => 50,
            n => n.min(10_000) as usize,
        };
        let list = self
            .blocking(move |s| s.store.history(limit).map_err(VersionsError::from))
            .await?;
        Ok(Response::new(v1::HistoryResponse {
            versions: list.iter().map(|(v, m)| info(*v, m)).collect(),
        }))
    }

    async fn rollback(
        &self,
        request: Request<v1::RollbackRequest>,
    ) -> Result<Response<v1::ApplyResponse>, Status> {
        let who = access::principal(&request);
        let r = request.into_inner();
        let message = r.message.clone();
        let before = self.state.current_version();
        let result = self
            .blocking(move |s| {
                s.rollback(
                    Version(r.to_version),
                    r.expect_version.map(Version),
                    r.author,
                    r.message,
                )
            })
            .await;
        access::audit_change(
            &self.state,
            &who,
            "Rollback",
            result.as_ref().map(|(record, _)| (before, record.version)),
            &message,
        );
        let (record, diff) = result?;
        Ok(Response::new(v1::ApplyResponse {
            version: record.version.0,
            created: true,
            hash: record.meta.hash,
            diff,
        }))
    }

    async fn list_agents(
        &self,
        _: Request<v1::ListAgentsRequest>,
    ) -> Result<Response<v1::ListAgentsResponse>, Status> {
        let current = self.state.current_version();
        let agents = self
            .state
            .registry
            .list()
            .into_iter()
            .map(|a| agent_info(a, current))
            .collect();
        Ok(Response::new(v1::ListAgentsResponse { agents }))
    }

    async fn status(
        &self,
        _: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusResponse>, Status> {
        let published = self.state.distributor.current();
        let current = published.as_ref().map_or(Version::NONE, |p| p.version);
        let mut r = v1::StatusResponse {
            version: current.0,
            hash: published.map(|p| p.hash.clone()).unwrap_or_default(),
            build_version: BUILD_VERSION.to_string(),
            protocol_version: PROTOCOL_VERSION.to_string(),
            ..Default::default()
        };
        r.log_store = self.state.logs.kind().to_string();
        for a in self.state.registry.list() {
            r.agents += 1;
            match a.state(current) {
                SyncState::Synced => r.agents_synced += 1,
                SyncState::Pending => r.agents_pending += 1,
                SyncState::Nacked => r.agents_nacked += 1,
                SyncState::Disconnected => r.agents_disconnected += 1,
            }
            r.fleet.push(agent_info(a, current));
        }
        Ok(Response::new(r))
    }

    type QueryLogsStream =
        std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<v1::LogRecord, Status>> + Send>>;

    async fn query_logs(
        &self,
        request: Request<v1::LogQuery>,
    ) -> Result<Response<Self::QueryLogsStream>, Status> {
        let q = request.into_inner();
        let filter = LogFilter::from_query(&q).map_err(|e| ErrorCode::InvalidArgument.status(e))?;
        let limit = log_limit(q.limit);
        // Subscribe before querying so nothing stored in between is missed; batches published
        // before the query began are in its result, those published while it ran may be.
        let hub = self.state.live.clone();
        let mut live = q.follow.then(|| hub.subscribe());
        let before = hub.last_seq();
        let mut initial = self
            .state
            .logs
            .query(&filter, limit)
            .await
            .map_err(|e| ErrorCode::Unavailable.status(e.to_string()))?;
        let after = hub.last_seq();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<v1::LogRecord, Status>>(256);
        tokio::spawn(async move {
            let seen: std::collections::HashSet<(String, String, i64)> = if live.is_some() {
                // A tail prints oldest to newest.
                initial.reverse();
                initial
                    .iter()
                    .map(|r| (r.agent.clone(), r.request_id.clone(), r.ts_us))
                    .collect()
            } else {
                Default::default()
            };
            for r in initial {
                if tx.send(Ok(r)).await.is_err() {
                    return;
                }
            }
            let Some(live) = live.as_mut() else { return };
            loop {
                let received = tokio::select! {
                    r = live.recv() => r,
                    // The follower went away: stop waiting for records it will never read.
                    _ = tx.closed() => return,
                    _ = hub.closed() => return,
                };
                let batch = match received {
                    Ok(b) => b,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!("a log follower fell behind and skipped {n} batches");
                        continue;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                if batch.seq <= before {
                    continue;
                }
                for r in batch.records.iter() {
                    let maybe_sent = batch.seq <= after
                        && seen.contains(&(r.agent.clone(), r.request_id.clone(), r.ts_us));
                    if filter.matches(r) && !maybe_sent && tx.send(Ok(r.clone())).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn query_log_stats(
        &self,
        request: Request<v1::LogQuery>,
    ) -> Result<Response<v1::LogStats>, Status> {
        let q = request.into_inner();
        let filter = LogFilter::from_query(&q).map_err(|e| ErrorCode::InvalidArgument.status(e))?;
        let records = self
            .state
            .logs
            .query(&filter, MAX_STATS_RECORDS)
            .await
            .map_err(|e| ErrorCode::Unavailable.status(e.to_string()))?;
        Ok(Response::new(compute_stats(&records)))
    }

    async fn create_token(
        &self,
        request: Request<v1::CreateTokenRequest>,
    ) -> Result<Response<v1::CreateTokenResponse>, Status> {
        let who = access::principal(&request);
        let r = request.into_inner();
        let state = self.state.clone();
        spawn_store(move || access::create_token(&state, &who, r)).await
    }

    async fn list_tokens(
        &self,
        _: Request<v1::ListTokensRequest>,
    ) -> Result<Response<v1::ListTokensResponse>, Status> {
        let state = self.state.clone();
        spawn_store(move || access::list_tokens(&state)).await
    }

    async fn revoke_token(
        &self,
        request: Request<v1::RevokeTokenRequest>,
    ) -> Result<Response<v1::RevokeTokenResponse>, Status> {
        let who = access::principal(&request);
        let r = request.into_inner();
        let state = self.state.clone();
        spawn_store(move || access::revoke_token(&state, &who, r)).await
    }

    async fn list_audit(
        &self,
        request: Request<v1::ListAuditRequest>,
    ) -> Result<Response<v1::ListAuditResponse>, Status> {
        let r = request.into_inner();
        let state = self.state.clone();
        spawn_store(move || access::list_audit(&state, r)).await
    }
}

/// Runs a blocking token/audit store call off the async workers.
async fn spawn_store<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<Response<T>, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ErrorCode::Internal.status(format!("store task failed: {e}")))?
        .map(Response::new)
}
