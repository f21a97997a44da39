//! `dispa`: the server binary. Parses flags, builds options, calls the plane and agent libraries.

mod demo;
mod dev;
mod ready;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use dispa_agent::{Agent, AgentOptions};
use dispa_plane::{LogStoreConfig, Plane, PlaneOptions};
use dispa_proto::AgentId;

#[derive(Parser)]
#[command(
    name = "dispa",
    version,
    about = "Dispa L7 proxy fleet: control plane, agent, and a one-process dev mode"
)]
struct Cli {
    /// Log filter (e.g. "info", "debug", "dispa_agent=debug"); RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the control plane.
    Plane(PlaneArgs),
    /// Run a proxy agent.
    Agent(AgentArgs),
    /// Run a plane, one agent and a demo upstream in one process, data under ./.dispa.
    Dev(dev::DevArgs),
}

#[derive(Args)]
struct PlaneArgs {
    /// Where versions are stored.
    #[arg(long, default_value = "./dispa-data")]
    data_dir: PathBuf,
    /// gRPC address for agents and dispactl (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Write {"plane": ADDR} here once listening.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Where traffic logs are stored: "sled" (in the data dir) or a postgres:// URL.
    #[arg(long, env = "DISPA_LOG_STORE", default_value = "sled")]
    log_store: String,
    /// Traffic-log records older than this are deleted.
    #[arg(long, default_value = "7d", value_parser = humantime_duration)]
    log_retention: Duration,
    /// sled log store: the most records kept (oldest deleted first).
    #[arg(long, default_value_t = 10_000_000)]
    log_max_records: usize,
}

#[derive(Args)]
struct AgentArgs {
    /// The plane's URL.
    #[arg(long, env = "DISPA_PLANE", default_value = "http://127.0.0.1:7070")]
    plane: String,
    /// Proxy listener (HTTP/1.1 and h2c).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Admin listener: /healthz /readyz /metrics /config.
    #[arg(long, default_value = "127.0.0.1:9901")]
    admin: SocketAddr,
    /// This agent's id, unique in the fleet.
    #[arg(long)]
    id: String,
    /// Where the last-known-good snapshot is kept.
    #[arg(long, default_value = "./dispa-agent-cache")]
    cache_dir: PathBuf,
    /// A label reported to the plane, KEY=VALUE (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// How long SIGTERM waits for in-flight requests.
    #[arg(long, default_value = "30s", value_parser = humantime_duration)]
    drain_timeout: Duration,
    /// Write {"proxy": ADDR, "admin": ADDR} here once listening.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("label {s:?} must be KEY=VALUE"))?;
    if k.is_empty() {
        return Err(format!("label {s:?} has an empty key"));
    }
    Ok((k.to_string(), v.to_string()))
}

pub(crate) fn humantime_duration(s: &str) -> Result<Duration, String> {
    dispa_proto::config::parse_duration(s)
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .init();
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = term => tracing::info!("SIGTERM received; shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupt received; shutting down"),
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    init_logging(&cli.log_level);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        match cli.command {
            Command::Plane(a) => run_plane(a).await,
            Command::Agent(a) => run_agent(a).await,
            Command::Dev(a) => dev::run(a).await,
        }
    })
}

async fn run_plane(a: PlaneArgs) -> Result<()> {
    let mut opts = PlaneOptions::new(a.data_dir, a.listen);
    opts.log_store = match a.log_store.as_str() {
        "sled" => LogStoreConfig::Sled,
        url if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            LogStoreConfig::Postgres(url.to_string())
        }
        other => anyhow::bail!("--log-store {other:?}: use \"sled\" or a postgres:// URL"),
    };
    opts.log_retention = a.log_retention;
    opts.log_max_records = a.log_max_records;
    let plane = Plane::bind(opts).await?;
    ready::write(a.ready_file.as_deref(), &[("plane", plane.local_addr())])?;
    plane.run(shutdown_signal()).await?;
    Ok(())
}

async fn run_agent(a: AgentArgs) -> Result<()> {
    let id = a.id.trim();
    anyhow::ensure!(!id.is_empty(), "--id must not be empty");
    let agent = Agent::bind(AgentOptions {
        plane: a.plane,
        listen: a.listen,
        admin: a.admin,
        id: AgentId::new(id),
        labels: a.labels.into_iter().collect::<BTreeMap<_, _>>(),
        cache_dir: a.cache_dir,
        drain_timeout: a.drain_timeout,
    })
    .await?;
    let addrs = [agent.proxy_addr(), agent.admin_addr()];
    if let [Some(proxy), Some(admin)] = addrs {
        ready::write(
            a.ready_file.as_deref(),
            &[("proxy", proxy), ("admin", admin)],
        )?;
    }
    agent.run(shutdown_signal()).await;
    Ok(())
}
