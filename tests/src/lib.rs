//! End-to-end harness: spawns the real `dispa` and `dispactl` binaries on port 0, waits on
//! their `--ready-file`s, runs real upstream servers and real HTTP clients.
//!
//! The binaries must be built first (`cargo build --workspace --bins`, part of the README's
//! test command); `DISPA_BIN_DIR` overrides where they are looked for.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod http_client;
pub mod postgres;
pub mod process;
pub mod tls;
pub mod upstream;

use std::future::Future;
use std::time::{Duration, Instant};

pub use http_client::{HttpClient, Reply};
pub use process::{AgentProc, CtlOutput, PlaneProc, ctl, metric_value, rss_kib};
pub use upstream::{TestUpstream, refused_addr};

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(10);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(200));
    }
}

/// `dispactl agents -o json` as (id, state, acked_version, last_error) tuples.
pub async fn agent_states(plane_url: &str) -> Vec<(String, String, u64, String)> {
    let out = ctl(plane_url, &["agents", "-o", "json"]).await.ok();
    out.json()
        .as_array()
        .expect("agents array")
        .iter()
        .map(|a| {
            (
                a["id"].as_str().unwrap_or_default().to_string(),
                a["state"].as_str().unwrap_or_default().to_string(),
                a["acked_version"].as_u64().unwrap_or_default(),
                a["last_error"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// Waits until every named agent is SYNCED at `version` according to the plane.
pub async fn wait_synced(plane_url: &str, ids: &[&str], version: u64) {
    eventually(
        &format!("agents {ids:?} SYNCED at version {version}"),
        Duration::from_secs(30),
        || async {
            let states = agent_states(plane_url).await;
            ids.iter()
                .all(|id| {
                    states
                        .iter()
                        .any(|(i, s, v, _)| i == id && s == "SYNCED" && *v == version)
                })
                .then_some(())
        },
    )
    .await
}

/// Writes a routes.toml into `dir` and returns its path as a string.
pub fn write_config(dir: &std::path::Path, name: &str, content: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, content).expect("write config");
    p.display().to_string()
}

/// A plane and one agent ("edge") serving `config` (applied as version 1).
pub async fn fleet_with(dir: &std::path::Path, config: &str) -> (PlaneProc, AgentProc) {
    let plane = PlaneProc::start(dir).await;
    let agent = AgentProc::start(dir, &plane.url(), "edge").await;
    let f = write_config(dir, "routes.toml", config);
    ctl(&plane.url(), &["apply", "-f", &f]).await.ok();
    wait_synced(&plane.url(), &["edge"], 1).await;
    (plane, agent)
}
