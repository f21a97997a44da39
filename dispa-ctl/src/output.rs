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
                    "LAST ERROR",
                ],
                &rows,
            )
        }
    }
}

pub fn status(s: &v1::StatusResponse, f: Format) -> String {
    match f {
        Format::Json => pretty(&json!({
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
        Format::Table => format!(
            "version:  {}\nhash:     {}\nagents:   {} ({} synced, {} pending, {} nacked, {} disconnected)\nplane:    build {}, protocol {}\n",
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
                        v.hash.chars().take(12).collect(),
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
            pretty(&v)
        }
        // The content as stored, so `dispactl get > routes.toml` round-trips.
        Format::Table => g.content.clone(),
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

pub fn diagnostics(list: &[v1::Diagnostic]) -> String {
    let mut s = String::new();
    for d in list {
        s.push_str(&format!("{}:{}:{}: ", d.file, d.line, d.column));
        if !d.key.is_empty() {
            s.push_str(&format!("{}: ", d.key));
        }
        s.push_str(&d.message);
        s.push('\n');
    }
    s
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
