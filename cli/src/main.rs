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
use dispa_agent::affinity::Pinning;
use dispa_agent::telemetry::access_log::AccessLogOptions;
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
    /// Log format on stderr: "pretty" (human) or "json" (one object per line).
    #[arg(long, global = true, value_enum, default_value = "pretty")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Pretty,
    Json,
}

/// `--pin-workers`, as [`Pinning`].
#[derive(Clone, Copy, clap::ValueEnum)]
enum PinWorkers {
    Auto,
    On,
    Off,
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
    #[arg(
        long,
        env = "DISPA_LOG_STORE",
        hide_env_values = true,
        default_value = "sled"
    )]
    log_store: String,
    /// PostgreSQL log store: the schema for its tables (created if missing); default: the
    /// connection's current schema.
    #[arg(long)]
    log_store_schema: Option<String>,
    /// Traffic-log records older than this are deleted.
    #[arg(long, default_value = "7d", value_parser = dispa_proto::config::parse_duration)]
    log_retention: Duration,
    /// sled log store: the most records kept (oldest deleted first).
    #[arg(long, default_value_t = 10_000_000)]
    log_max_records: usize,
    /// Require a token on every call (roles viewer, operator, admin; agents use a join token
    /// or a client certificate). The first start prints a bootstrap admin token once.
    #[arg(long)]
    auth: bool,
    /// Also write the bootstrap admin token to this file (mode 0600).
    #[arg(long, requires = "auth")]
    bootstrap_token_file: Option<PathBuf>,
    /// Serve gRPC over TLS with this PEM certificate chain (with --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Accept agents that present a client certificate signed by this PEM CA bundle.
    #[arg(long, requires = "tls_cert")]
    client_ca: Option<PathBuf>,
}

#[derive(Args)]
struct AgentArgs {
    /// The plane's URL (https:// for a plane serving TLS; then --plane-ca).
    #[arg(long, env = "DISPA_PLANE", default_value = "http://127.0.0.1:7070")]
    plane: String,
    /// A join token (`dispactl token create --role agent`) for a plane run with --auth.
    #[arg(long, env = "DISPA_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// PEM CA bundle that the plane's TLS certificate chains to.
    #[arg(long)]
    plane_ca: Option<PathBuf>,
    /// PEM client certificate to present to the plane instead of a join token (with
    /// --plane-key).
    #[arg(long, requires = "plane_key")]
    plane_cert: Option<PathBuf>,
    #[arg(long, requires = "plane_cert")]
    plane_key: Option<PathBuf>,
    /// Proxy listener (HTTP/1.1 and h2c).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// TLS proxy listener (HTTP/1.1 and HTTP/2 by ALPN); certificates come from the
    /// config's [certificates.NAME] and are chosen by SNI. Off unless given.
    #[arg(long)]
    listen_tls: Option<SocketAddr>,
    /// Require a PROXY protocol v1 or v2 header on every proxy connection (plaintext and TLS,
    /// before the handshake), accepted only from the config's policy.trusted_proxies; the
    /// client address it declares replaces the TCP peer.
    #[arg(long)]
    proxy_protocol: bool,
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
    #[arg(long, default_value = "30s", value_parser = dispa_proto::config::parse_duration)]
    drain_timeout: Duration,
    /// Write {"proxy": ADDR, "admin": ADDR} (and "proxy_tls": ADDR with --listen-tls) here
    /// once listening.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Also write each access-log record as a JSON line to stdout ("stdout"), or not ("off").
    #[arg(long, default_value = "off", value_parser = ["off", "stdout"])]
    access_log: String,
    /// "off" keeps no traffic log at all (nothing shipped to the plane or printed): for
    /// benchmarks against proxies with logging off, or sites that log elsewhere.
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    traffic_log: String,
    /// A query parameter whose value access logs replace with REDACTED (repeatable; "*" = all).
    #[arg(long = "log-redact-query", value_name = "PARAM")]
    log_redact_query: Vec<String>,
    /// Bound on the on-disk access-log spool, e.g. "1GiB", "64MiB", "100000" (bytes).
    #[arg(long, default_value = "1GiB", value_parser = dispa_proto::config::parse_size)]
    log_spool_max: u64,
    /// How often endpoint DNS names are re-resolved (addresses that appear or vanish take
    /// effect without a config push).
    #[arg(long, default_value = "30s", value_parser = dispa_proto::config::parse_duration)]
    dns_refresh: Duration,
    /// Threads serving client connections, each with its own event loop (0 = one per CPU).
    #[arg(long, default_value_t = 0)]
    workers: usize,
    /// Pin serving thread i to the i-th CPU this process may use (nginx's
    /// `worker_cpu_affinity auto`). "auto": only when there is one serving thread per such
    /// CPU (a host or cpuset given to the agent), not under a CPU quota.
    #[arg(long, value_enum, default_value_t = PinWorkers::Auto)]
    pin_workers: PinWorkers,
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

fn init_logging(level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Pretty => fmt.with_ansi(ansi).init(),
        LogFormat::Json => fmt
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
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
    init_logging(&cli.log_level, cli.log_format);
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
            LogStoreConfig::Postgres {
                url: url.to_string(),
                schema: a.log_store_schema.clone(),
            }
        }
        // Not echoed: a mistyped URL may still hold a password.
        _ => anyhow::bail!("--log-store: use \"sled\" or a postgres:// (postgresql://) URL"),
    };
    opts.log_retention = a.log_retention;
    opts.log_max_records = a.log_max_records;
    opts.auth = a.auth;
    opts.bootstrap_token_file = a.bootstrap_token_file;
    if let (Some(cert), Some(key)) = (&a.tls_cert, &a.tls_key) {
        opts.tls = Some(dispa_plane::PlaneTls {
            cert_pem: read(cert, "--tls-cert")?,
            key_pem: read(key, "--tls-key")?,
            client_ca_pem: a
                .client_ca
                .as_deref()
                .map(|p| read(p, "--client-ca"))
                .transpose()?,
        });
    }
    if !a.auth {
        tracing::warn!("the plane runs without --auth: anyone who can reach it can change config");
    }
    let plane = Plane::bind(opts).await?;
    ready::write(a.ready_file.as_deref(), &[("plane", plane.local_addr())])?;
    plane.run(shutdown_signal()).await?;
    Ok(())
}

fn read(path: &std::path::Path, flag: &str) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{flag} {}", path.display()))
}

async fn run_agent(a: AgentArgs) -> Result<()> {
    let id = a.id.trim();
    anyhow::ensure!(!id.is_empty(), "--id must not be empty");
    let plane = dispa_proto::connect::PlaneConnect {
        url: a.plane,
        token: a.join_token.filter(|t| !t.is_empty()),
        ca_pem: a
            .plane_ca
            .as_deref()
            .map(|p| read(p, "--plane-ca"))
            .transpose()?,
        client_identity: match (&a.plane_cert, &a.plane_key) {
            (Some(c), Some(k)) => Some((read(c, "--plane-cert")?, read(k, "--plane-key")?)),
            _ => None,
        },
    };
    // Fail at start, not on every reconnect, when the TLS or token setup cannot work.
    plane.endpoint()?;
    plane.interceptor()?;
    let agent = Agent::bind(AgentOptions {
        plane,
        listen: a.listen,
        listen_tls: a.listen_tls,
        proxy_protocol: a.proxy_protocol,
        admin: a.admin,
        id: AgentId::new(id),
        labels: a.labels.into_iter().collect::<BTreeMap<_, _>>(),
        cache_dir: a.cache_dir,
        drain_timeout: a.drain_timeout,
        access_log: AccessLogOptions {
            stdout: a.access_log == "stdout",
            redact_query: a.log_redact_query,
            disabled: a.traffic_log == "off",
        },
        log_spool_max: a.log_spool_max,
        dns_refresh: a.dns_refresh,
        workers: match a.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        },
        pin_workers: match a.pin_workers {
            PinWorkers::Auto => Pinning::Auto,
            PinWorkers::On => Pinning::On,
            PinWorkers::Off => Pinning::Off,
        },
    })
    .await?;
    let addrs = [agent.proxy_addr(), agent.admin_addr()];
    if let [Some(proxy), Some(admin)] = addrs {
        let mut bound = vec![("proxy", proxy), ("admin", admin)];
        bound.extend(agent.tls_addr().map(|a| ("proxy_tls", a)));
        ready::write(a.ready_file.as_deref(), &bound)?;
    }
    agent.run(shutdown_signal()).await;
    Ok(())
}
