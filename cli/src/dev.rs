//! `dispa dev`: a plane, one agent and a demo upstream in one process, for a laptop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use dispa_agent::{Agent, AgentOptions};
use dispa_plane::versions::{ApplyInput, ApplyOutcome};
use dispa_plane::{Plane, PlaneOptions};
use dispa_proto::AgentId;

use crate::{demo, ready, shutdown_signal};

#[derive(Args)]
pub struct DevArgs {
    /// Where the plane's versions and the agent's cache live.
    #[arg(long, default_value = "./.dispa")]
    data_dir: PathBuf,
    #[arg(long, default_value = "127.0.0.1:7070")]
    plane_listen: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:9901")]
    admin: SocketAddr,
    /// The built-in demo upstream the example config routes to.
    #[arg(long, default_value = "127.0.0.1:8081")]
    demo_listen: SocketAddr,
    /// Write the bound addresses as JSON here once listening.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

fn example(demo: SocketAddr) -> String {
    format!(
        r#"# Dispa's built-in example, applied by `dispa dev` on first start.
# Change it with: dispactl get > routes.toml; edit; dispactl apply -f routes.toml

[upstreams.demo]
endpoints = ["{demo}"]

[[routes]]
name = "demo"
hosts = ["*"]
path_prefix = "/"
upstream = "demo"
response_headers = {{ set = {{ "x-served-by" = "dispa" }} }}
"#
    )
}

pub async fn run(a: DevArgs) -> Result<()> {
    let plane = Plane::bind(PlaneOptions::new(a.data_dir.join("plane"), a.plane_listen)).await?;
    let plane_addr = plane.local_addr();
    let demo_listener = demo::bind(a.demo_listen).await?;
    let demo_addr = demo_listener
        .local_addr()
        .context("demo upstream address")?;
    tokio::spawn(demo::serve(demo_listener));

    let state = plane.state();
    if state
        .store
        .head()
        .context("reading the config store")?
        .is_none()
    {
        let input = ApplyInput {
            source_name: "built-in example".into(),
            content: example(demo_addr),
            files: Default::default(),
            author: "dispa dev".into(),
            message: "built-in example".into(),
            expect_version: None,
            dry_run: false,
        };
        let out = tokio::task::spawn_blocking(move || state.apply(input)).await??;
        if let ApplyOutcome::Created { record, .. } = out {
            tracing::info!(version = record.version.0, "applied the built-in example");
        }
    }

    let agent = Agent::bind(AgentOptions {
        plane: dispa_proto::connect::PlaneConnect::new(format!("http://{plane_addr}")),
        listen: a.listen,
        listen_tls: None,
        proxy_protocol: false,
        admin: a.admin,
        id: AgentId::new("dev"),
        labels: [("mode".to_string(), "dev".to_string())].into(),
        cache_dir: a.data_dir.join("agent"),
        drain_timeout: Duration::from_secs(5),
        access_log: Default::default(),
        log_spool_max: dispa_agent::DEFAULT_LOG_SPOOL_MAX,
        dns_refresh: Duration::from_secs(30),
        workers: 1,
        // One thread on a developer's machine: never pinned.
        pin_workers: dispa_agent::affinity::Pinning::Off,
    })
    .await?;
    let proxy = agent.proxy_addr().context("proxy address")?;
    let admin = agent.admin_addr().context("admin address")?;
    ready::write(
        a.ready_file.as_deref(),
        &[
            ("plane", plane_addr),
            ("proxy", proxy),
            ("admin", admin),
            ("demo", demo_addr),
        ],
    )?;
    let plane_flag = if plane_addr.to_string() == "127.0.0.1:7070" {
        String::new()
    } else {
        format!(" --plane http://{plane_addr}")
    };
    eprintln!(
        "\nDispa dev is running (data in {data}):\n  \
         proxy        http://{proxy}    try: curl -i http://{proxy}/hello\n  \
         plane        http://{plane_addr}    dispactl talks to it\n  \
         agent admin  http://{admin}    /healthz /readyz /metrics /config\n\n\
         Five-minute tour:\n  \
         dispactl{plane_flag} status\n  \
         dispactl{plane_flag} agents\n  \
         dispactl{plane_flag} get > routes.toml      # edit it, then\n  \
         dispactl{plane_flag} diff -f routes.toml\n  \
         dispactl{plane_flag} apply -f routes.toml -m \"my change\"\n  \
         dispactl{plane_flag} history\n  \
         dispactl{plane_flag} rollback 1\n\nCtrl-C stops everything.\n",
        data = a.data_dir.display(),
    );

    // The agent stops first: its last traffic-log batches go to the plane on the way out,
    // which needs the plane still listening (otherwise they wait in the spool for the next
    // start, and Ctrl-C waits out the agent's shipping deadline).
    let (stop_agent, agent_stop_rx) = tokio::sync::watch::channel(false);
    let (stop_plane, plane_stop_rx) = tokio::sync::watch::channel(false);
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let plane_task = tokio::spawn(plane.run(wait(plane_stop_rx)));
    let agent_task = tokio::spawn(agent.run(wait(agent_stop_rx)));
    shutdown_signal().await;
    let _ = stop_agent.send(true);
    let agent_done = agent_task.await.context("agent task");
    let _ = stop_plane.send(true);
    agent_done?;
    plane_task.await.context("plane task")??;
    Ok(())
}
