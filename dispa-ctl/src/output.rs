//! Rendering: tables for people, JSON for scripts. Every command's output goes through here.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dispa_proto::v1;
use serde_json::{Value, json};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

/// Left-aligned columns separated by two spaces.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(headers.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

pub fn rfc3339_ms(ms: i64) -> String {
    if ms <= 0 {
        return String::new();
    }
    let t = UNIX_EPOCH + Duration::from_millis(ms.unsigned_abs());
    humantime::format_rfc3339_seconds(t).to_string()
}

fn ago(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    let t = UNIX_EPOCH + Duration::from_millis(ms.unsigned_abs());
    match SystemTime::now().duration_since(t) {
        Ok(d) if d.as_secs() < 1 => "now".into(),
        Ok(d) => format!("{}s ago", d.as_secs()),
        Err(_) => "now".into(),
    }
}

fn state_name(s: i32) -> &'static str {
    match v1::AgentSyncState::try_from(s) {
        Ok(v1::AgentSyncState::Synced) => "SYNCED",
        Ok(v1::AgentSyncState::Pending) => "PENDING",
        Ok(v1::AgentSyncState::Nacked) => "NACKED",
        Ok(v1::AgentSyncState::Disconnected) => "DISCONNECTED",
        _ => "UNKNOWN",
    }
}

pub fn agents(list: &[v1::AgentInfo], f: Format) -> String {
    match f {
        Format::Json => {
            let arr: Vec<Value> = list
                .iter()
                .map(|a| {
                    let labels: serde_json::Map<String, Value> = a
                        .labels
                        .iter()
                        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                        .collect();
                    json!({
                        "id": a.id,
                        "state": state_name(a.state),
                        "acked_version": a.acked_version,
                        "sent_version": a.sent_version,
                        "last_error": a.last_error,
                        "last_seen": rfc3339_ms(a.last_seen_ms),
                        "connected_since": rfc3339_ms(a.connected_since_ms),
                        "labels": labels,
                        "build_version": a.build_version,
                        "protocol_version": a.protocol_version,
                        "peer": a.peer,
                        "endpoints_down": a.metrics.as_ref().map(|m| m.endpoints_down.clone()).unwrap_or_default(),
                    })
                })
                .collect();
            pretty(&Value::Array(arr))
        }
        Format::Table => {
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|a| {
                    let mut labels: Vec<_> =
                        a.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    labels.sort();
                    vec![
                        a.id.clone(),
                        state_name(a.state).to_string(),
                        a.acked_version.to_string(),
                        ago(a.last_seen_ms),
                        a.build_version.clone(),
                        labels.join(","),
                        a.metrics
                            .as_ref()
                            .map(|m| m.endpoints_down.join(","))
                            .filter(|d| !d.is_empty())
                            .unwrap_or_else(|| "-".into()),
                        a.last_error.clone(),
                    ]
                })
                .collect();
            table(
                &[
                    "ID",
                    "STATE",
                    "VERSION",
                    "LAST SEEN",
                    "BUILD",
                    "LABELS",
                    "ENDPOINTS DOWN",
                    "LAST ERROR",
                ],
                &rows,
            )
        }
    }
}

fn summary_json(m: Option<&v1::MetricsSummary>) -> Value {
    match m {
        None => Value::Null,
        Some(m) => json!({
            "rps": rps(m),
            "error_rate": error_rate(m),
            "p99_ms": m.p99_ms,
            "in_flight": m.in_flight,
            "log_records_dropped": m.log_records_dropped,
            "reported_at": rfc3339_ms(m.ts_ms),
        }),
    }
}

fn rps(m: &v1::MetricsSummary) -> f64 {
    if m.window_seconds > 0.0 {
        m.requests as f64 / m.window_seconds
    } else {
        0.0
    }
}

fn error_rate(m: &v1::MetricsSummary) -> f64 {
    if m.requests > 0 {
        m.errors as f64 / m.requests as f64
    } else {
        0.0
    }
}

pub fn status(s: &v1::StatusResponse, f: Format) -> String {
    match f {
        Format::Json => pretty(&json!({
            "fleet": s.fleet.iter().map(|a| json!({
                "id": a.id,
                "state": state_name(a.state),
                "acked_version": a.acked_version,
                "metrics": summary_json(a.metrics.as_ref()),
            })).collect::<Vec<_>>(),
            "log_store": s.log_store,
            "version": s.version,
            "hash": s.hash,
            "agents": s.agents,
            "agents_synced": s.agents_synced,
            "agents_pending": s.agents_pending,
            "agents_nacked": s.agents_nacked,
            "agents_disconnected": s.agents_disconnected,
            "build_version": s.build_version,
            "protocol_version": s.protocol_version,
        })),
        Format::Table => {
            let mut out = format!(
                "version:  {}\nhash:     {}\nagents:   {} ({} synced, {} pending, {} nacked, {} disconnected)\nplane:    build {}, protocol {}, log store {}\n",
                if s.version == 0 {
                    "none".to_string()
                } else {
                    s.version.to_string()
                },
                if s.hash.is_empty() { "-" } else { &s.hash },
                s.agents,
                s.agents_synced,
                s.agents_pending,
                s.agents_nacked,
                s.agents_disconnected,
                s.build_version,
                s.protocol_version,
                s.log_store,
            );
            if !s.fleet.is_empty() {
                let rows: Vec<Vec<String>> = s
                    .fleet
                    .iter()
                    .map(|a| {
                        let (r, e, p) = match &a.metrics {
                            Some(m) => (
                                format!("{:.1}", rps(m)),
                                format!("{:.2}%", error_rate(m) * 100.0),
                                format!("{:.1}ms", m.p99_ms),
                            ),
                            None => ("-".into(), "-".into(), "-".into()),
                        };
                        vec![
                            a.id.clone(),
                            state_name(a.state).to_string(),
                            a.acked_version.to_string(),
                            r,
                            e,
                            p,
                        ]
                    })
                    .collect();
                out.push('\n');
                out.push_str(&table(
                    &["AGENT", "STATE", "VERSION", "RPS", "ERRORS", "P99"],
                    &rows,
                ));
            }
            out
        }
    }
}

/// One record: a JSON line, or a table row (see [`log_header`]).
pub fn log_record(r: &v1::LogRecord, f: Format) -> String {
    match f {
        Format::Json => format!("{}\n", dispa_proto::logs::record_json(r)),
        Format::Table => {
            let path = if r.query.is_empty() {
                r.path.clone()
            } else {
                format!("{}?{}", r.path, r.query)
            };
            format!(
                "{:<27}  {:<12}  {:>3}  {:<6}  {:<24}  {:<32}  {:<14}  {:>9}  {}\n",
                dispa_proto::logs::format_ts(r.ts_us),
                r.agent,
                r.status,
                r.method,
                r.host,
                path,
                if r.route.is_empty() { "-" } else { &r.route },
                format!("{:.1}ms", r.duration_us as f64 / 1000.0),
                r.request_id
            )
        }
    }
}

pub fn log_header(f: Format) -> String {
    match f {
        Format::Json => String::new(),
        Format::Table => format!(
            "{:<27}  {:<12}  {:>3}  {:<6}  {:<24}  {:<32}  {:<14}  {:>9}  {}\n",
            "TIME", "AGENT", "ST", "METHOD", "HOST", "PATH", "ROUTE", "DURATION", "REQUEST ID"
        ),
    }
}

pub fn log_stats(s: &v1::LogStats, f: Format) -> String {
    match f {
        Format::Json => pretty(&json!({
            "total": s.total,
            "status": { "1xx": s.status_1xx, "2xx": s.status_2xx, "3xx": s.status_3xx, "4xx": s.status_4xx, "5xx": s.status_5xx },
            "p50_ms": s.p50_ms,
            "p95_ms": s.p95_ms,
            "p99_ms": s.p99_ms,
        })),
        Format::Table => format!(
            "requests: {}\n1xx: {}  2xx: {}  3xx: {}  4xx: {}  5xx: {}\nlatency:  p50 {:.1}ms  p95 {:.1}ms  p99 {:.1}ms\n",
            s.total,
            s.status_1xx,
            s.status_2xx,
            s.status_3xx,
            s.status_4xx,
            s.status_5xx,
            s.p50_ms,
            s.p95_ms,
            s.p99_ms
        ),
    }
}

fn version_json(v: &v1::VersionInfo) -> Value {
    json!({
        "version": v.version,
        "hash": v.hash,
        "author": v.author,
        "message": v.message,
        "created_at": rfc3339_ms(v.created_at_ms),
        "rollback_of": if v.rollback_of == 0 { Value::Null } else { json!(v.rollback_of) },
        "source": v.source_name,
    })
}

pub fn history(list: &[v1::VersionInfo], f: Format) -> String {
    match f {
        Format::Json => pretty(&Value::Array(list.iter().map(version_json).collect())),
        Format::Table => {
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|v| {
                    vec![
                        v.version.to_string(),
                        rfc3339_ms(v.created_at_ms),
                        v.author.clone(),
                        short(&v.hash),
                        v.message.clone(),
                    ]
                })
                .collect();
            table(&["VERSION", "CREATED", "AUTHOR", "HASH", "MESSAGE"], &rows)
        }
    }
}

pub fn get(g: &v1::GetResponse, f: Format) -> String {
    match f {
        Format::Json => {
            let mut v = g
                .info
                .as_ref()
                .map(version_json)
                .unwrap_or_else(|| json!({}));
            v["content"] = Value::String(g.content.clone());
            v["files"] = g.files.iter().map(file_json).collect();
            pretty(&v)
        }
        // The content as stored, so `dispactl get > routes.toml` round-trips; uploaded files
        // follow as TOML comments.
        Format::Table => {
            let mut s = g.content.clone();
            for file in &g.files {
                if !s.is_empty() && !s.ends_with('\n') {
                    s.push('\n');
                }
                let shown = if file.secret && file.content.is_empty() {
                    ", secret: redacted"
                } else if file.secret {
                    ", secret"
                } else {
                    ""
                };
                s.push_str(&format!(
                    "# file {}: {} bytes, sha256 {}{shown}\n",
                    file.path, file.size, file.sha256
                ));
                if file.secret && !file.content.is_empty() {
                    for line in String::from_utf8_lossy(&file.content).lines() {
                        s.push_str(&format!("#   {line}\n"));
                    }
                }
            }
            s
        }
    }
}

fn file_json(f: &v1::FileInfo) -> Value {
    let mut v = json!({
        "path": f.path,
        "size": f.size,
        "sha256": f.sha256,
        "secret": f.secret,
    });
    if !f.secret || !f.content.is_empty() {
        v["content"] = Value::String(String::from_utf8_lossy(&f.content).into_owned());
    }
    v
}

fn role_name(r: i32) -> &'static str {
    match v1::Role::try_from(r) {
        Ok(v1::Role::Viewer) => "viewer",
        Ok(v1::Role::Operator) => "operator",
        Ok(v1::Role::Admin) => "admin",
        Ok(v1::Role::Agent) => "agent",
        _ => "?",
    }
}

fn token_json(t: &v1::TokenInfo) -> Value {
    json!({
        "id": t.id,
        "name": t.name,
        "role": role_name(t.role),
        "created_at": rfc3339_ms(t.created_at_ms),
        "created_by": t.created_by,
        "revoked_at": (t.revoked_at_ms != 0).then(|| rfc3339_ms(t.revoked_at_ms)),
    })
}

pub fn token_created(r: &v1::CreateTokenResponse, f: Format) -> String {
    let info = r.info.clone().unwrap_or_default();
    match f {
        Format::Json => {
            let mut v = token_json(&info);
            v["token"] = Value::String(r.token.clone());
            pretty(&v)
        }
        // The token alone on stdout, so `TOKEN=$(dispactl token create ...)` works; the rest
        // goes to stderr.
        Format::Table => {
            eprintln!(
                "created {} token {} (id {}); it is shown only this once",
                role_name(info.role),
                info.name,
                info.id
            );
            format!("{}\n", r.token)
        }
    }
}

pub fn tokens(list: &[v1::TokenInfo], f: Format) -> String {
    match f {
        Format::Json => pretty(&Value::Array(list.iter().map(token_json).collect())),
        Format::Table => {
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|t| {
                    vec![
                        t.id.clone(),
                        t.name.clone(),
                        role_name(t.role).to_string(),
                        rfc3339_ms(t.created_at_ms),
                        t.created_by.clone(),
                        if t.revoked_at_ms == 0 {
                            "valid".into()
                        } else {
                            format!("revoked {}", rfc3339_ms(t.revoked_at_ms))
                        },
                    ]
                })
                .collect();
            table(&["ID", "NAME", "ROLE", "CREATED", "BY", "STATE"], &rows)
        }
    }
}

pub fn audit(list: &[v1::AuditEntry], f: Format) -> String {
    match f {
        Format::Json => pretty(&Value::Array(
            list.iter()
                .map(|e| {
                    json!({
                        "seq": e.seq,
                        "at": rfc3339_ms(e.at_ms),
                        "who": e.who,
                        "role": e.role,
                        "peer": e.peer,
                        "action": e.action,
                        "outcome": e.outcome,
                        "from_version": e.from_version,
                        "to_version": e.to_version,
                        "message": e.message,
                    })
                })
                .collect(),
        )),
        Format::Table => {
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|e| {
                    let versions = if e.from_version == 0 && e.to_version == 0 {
                        String::new()
                    } else {
                        format!("{} -> {}", e.from_version, e.to_version)
                    };
                    vec![
                        rfc3339_ms(e.at_ms),
                        e.who.clone(),
                        e.role.clone(),
                        e.peer.clone(),
                        e.action.clone(),
                        e.outcome.clone(),
                        versions,
                        e.message.clone(),
                    ]
                })
                .collect();
            table(
                &[
                    "AT", "WHO", "ROLE", "PEER", "ACTION", "OUTCOME", "VERSIONS", "MESSAGE",
                ],
                &rows,
            )
        }
    }
}

pub fn applied(r: &v1::ApplyResponse, dry_run: bool, f: Format) -> String {
    match f {
        Format::Json => pretty(&json!({
            "version": r.version,
            "created": r.created,
            "dry_run": dry_run,
            "hash": r.hash,
            "diff": r.diff,
        })),
        Format::Table => {
            let mut s = String::new();
            if !r.diff.is_empty() {
                s.push_str(&r.diff);
                if !r.diff.ends_with('\n') {
                    s.push('\n');
                }
            }
            if dry_run {
                s.push_str(&format!(
                    "dry run: valid; nothing stored (current version {})\n",
                    r.version
                ));
            } else if r.created {
                s.push_str(&format!(
                    "applied: version {} (hash {})\n",
                    r.version,
                    short(&r.hash)
                ));
            } else {
                s.push_str(&format!(
                    "unchanged: version {} already has this content\n",
                    r.version
                ));
            }
            s
        }
    }
}

/// The plane's diagnostics, one per line, exactly as offline `validate` prints them.
pub fn diagnostics(list: &[v1::Diagnostic]) -> String {
    list.iter()
        .map(|d| format!("{}\n", dispa_proto::config::Diagnostic::from(d.clone())))
        .collect()
}

fn short(hash: &str) -> String {
    hash.chars().take(12).collect()
}

pub fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default() + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let t = table(&["A", "BB"], &[vec!["xxx".into(), "y".into()]]);
        assert_eq!(t, "A    BB\nxxx  y\n");
    }
}
