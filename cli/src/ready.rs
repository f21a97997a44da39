//! `--ready-file`: the bound addresses as JSON, written atomically once listening, so scripts
//! and tests can use port 0 and never guess a free port.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context, Result};

pub fn write(path: Option<&Path>, addrs: &[(&str, SocketAddr)]) -> Result<()> {
    let map: serde_json::Map<String, serde_json::Value> = addrs
        .iter()
        .map(|(k, v)| ((*k).to_string(), serde_json::Value::String(v.to_string())))
        .collect();
    for (k, v) in addrs {
        tracing::info!("{k} listening on {v}");
    }
    let Some(path) = path else { return Ok(()) };
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::Value::Object(map).to_string())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
