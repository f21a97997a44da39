//! Plane load: N real config-discovery streams (what N agents open), then K new versions
//! applied through the Admin API; reports how long until every stream has the version and has
//! ACKed it (p50/p99/max over streams), the plane's RSS and CPU, and the bytes sent per
//! version.
//!
//! ```sh
//! plane_load --dispa target/release/dispa --agents 1000 --versions 5
//! plane_load --plane http://127.0.0.1:7070 --agents 100     # an already running plane
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dispa_proto::v1::admin_client::AdminClient;
use dispa_proto::v1::config_discovery_client::ConfigDiscoveryClient;
use dispa_proto::v1::{self, DiscoveryRequest, Node, discovery_request};
use dispa_proto::{BUILD_VERSION, PROTOCOL_VERSION};
use dispa_tests::process::proc_status_kib;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

struct Args {
    dispa: Option<PathBuf>,
    plane: Option<String>,
    agents: usize,
    versions: usize,
}

fn args() -> Args {
    let mut a = Args {
        dispa: None,
        plane: None,
        agents: 1000,
        versions: 5,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--dispa" => a.dispa = Some(v().into()),
            "--plane" => a.plane = Some(v()),
            "--agents" => a.agents = v().parse().expect("--agents N"),
            "--versions" => a.versions = v().parse().expect("--versions N"),
            _ => panic!("unknown argument {k}; see the doc comment in tests/src/bin/plane_load.rs"),
        }
    }
    assert!(
        a.dispa.is_some() != a.plane.is_some(),
        "pass --dispa PATH or --plane URL"
    );
    a
}

/// utime + stime in clock ticks (1/100 s).
fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = s.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    f.get(11).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0)
}

fn config(i: usize) -> String {
    format!(
        "[upstreams.app]\nendpoints = [\"127.0.0.1:{}\"]\n\n[[routes]]\nname = \"all\"\nupstream = \"app\"\n",
        10_000 + i
    )
}

/// Stream opens that failed and were tried again, over all agents.
static RETRIES: AtomicUsize = AtomicUsize::new(0);

/// Attempts per agent to connect and open its stream, as an agent reconnects after a refused
/// or reset connection (a fleet starting at once is a burst of connections).
const ATTEMPTS: u32 = 5;

/// What a stream reports of each envelope: (version, received at, encoded bytes).
type Seen = (u64, Instant, usize);

/// One agent's stream: ACKs every envelope and reports it on `seen`. A stream that cannot be
/// opened after `ATTEMPTS` tries reports why on `failed`, which ends the run.
async fn agent(
    url: String,
    id: usize,
    seen: mpsc::UnboundedSender<Seen>,
    failed: mpsc::UnboundedSender<String>,
    mut stop: watch::Receiver<bool>,
) {
    let mut attempt = 1;
    let (tx, mut stream) = loop {
        match open(&url, id).await {
            Ok(opened) => break opened,
            Err(_) if attempt < ATTEMPTS => {
                RETRIES.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
                attempt += 1;
            }
            Err(e) => {
                let _ = failed.send(format!(
                    "agent {id}: no stream after {ATTEMPTS} attempts: {e}"
                ));
                return;
            }
        }
    };
    loop {
        let env = tokio::select! {
            m = stream.message() => match m {
                Ok(Some(env)) => env,
                _ => return,
            },
            _ = stop.changed() => return,
        };
        let at = Instant::now();
        let bytes = prost::Message::encoded_len(&env);
        let ack = DiscoveryRequest {
            node: None,
            response: Some(discovery_request::Response::Ack(v1::Ack {
                version: env.version,
                nonce: env.nonce,
            })),
        };
        if tx.send(ack).await.is_err() {
            return;
        }
        let _ = seen.send((env.version, at, bytes));
    }
}

type Opened = (
    mpsc::Sender<DiscoveryRequest>,
    tonic::Streaming<v1::SnapshotEnvelope>,
);

/// Connects and opens one discovery stream, announcing the node `load-{id}`.
async fn open(url: &str, id: usize) -> Result<Opened, String> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut client = ConfigDiscoveryClient::new(channel).max_decoding_message_size(64 << 20);
    let (tx, rx) = mpsc::channel(4);
    tx.send(DiscoveryRequest {
        node: Some(Node {
            id: format!("load-{id}"),
            labels: Default::default(),
            build_version: BUILD_VERSION.into(),
            protocol_version: PROTOCOL_VERSION.into(),
            have_version: 0,
            have_hash: String::new(),
        }),
        response: None,
    })
    .await
    .map_err(|e| e.to_string())?;
    let stream = client
        .stream(ReceiverStream::new(rx))
        .await
        .map_err(|e| format!("open stream: {e}"))?
        .into_inner();
    Ok((tx, stream))
}

/// The next report from any stream. Panics, which drops (and so stops) a plane this tool
/// started, if a stream could not be opened or nothing arrives within 60 s.
async fn next_seen(
    seen: &mut mpsc::UnboundedReceiver<Seen>,
    failed: &mut mpsc::UnboundedReceiver<String>,
    waiting_for: &str,
) -> Seen {
    tokio::select! {
        Some(s) = seen.recv() => s,
        Some(e) = failed.recv() => panic!("{e}"),
        _ = tokio::time::sleep(Duration::from_secs(60)) => panic!("no {waiting_for} within 60 s"),
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() {
    let a = args();
    let dir = tempfile::tempdir().unwrap();
    let mut child = None;
    let url = match (&a.plane, &a.dispa) {
        (Some(u), _) => u.clone(),
        (None, Some(bin)) => {
            let ready = dir.path().join("plane.ready");
            let c = tokio::process::Command::new(bin)
                .args([
                    "--log-level",
                    "warn",
                    "plane",
                    "--listen",
                    "127.0.0.1:0",
                    "--data-dir",
                ])
                .arg(dir.path().join("data"))
                .arg("--ready-file")
                .arg(&ready)
                .kill_on_drop(true)
                .spawn()
                .expect("spawn dispa plane");
            child = Some(c);
            let addr = loop {
                if let Some(v) = std::fs::read_to_string(&ready)
                    .ok()
                    .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                {
                    break v["plane"].as_str().unwrap().to_string();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            format!("http://{addr}")
        }
        _ => unreachable!(),
    };
    let pid = child.as_ref().and_then(|c| c.id());
    let mut admin = AdminClient::new(
        tonic::transport::Endpoint::from_shared(url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let apply = |i: usize| v1::ApplyRequest {
        file: Some(v1::SourceFile {
            name: "load.toml".into(),
            content: config(i),
            attachments: Vec::new(),
        }),
        message: format!("load {i}"),
        author: "plane_load".into(),
        ..Default::default()
    };
    let first = admin
        .apply(apply(0))
        .await
        .expect("apply")
        .into_inner()
        .version;

    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
    let (failed_tx, mut failed_rx) = mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = watch::channel(false);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for id in 0..a.agents {
        tasks.push(tokio::spawn(agent(
            url.clone(),
            id,
            seen_tx.clone(),
            failed_tx.clone(),
            stop_rx.clone(),
        )));
    }
    // Every stream gets the current version on connect.
    let mut got = 0;
    while got < a.agents {
        let (v, _, _) = next_seen(
            &mut seen_rx,
            &mut failed_rx,
            "first version on every stream",
        )
        .await;
        if v == first {
            got += 1;
        }
    }
    println!(
        "{} streams connected and ACKed version {first} in {:?} ({} opens tried again)",
        a.agents,
        started.elapsed(),
        RETRIES.load(Ordering::Relaxed)
    );
    let ticks0 = pid.map(cpu_ticks).unwrap_or(0);
    let mut all_p99 = Vec::new();
    println!(
        "{:>8} {:>10} {:>10} {:>10} {:>12} {:>14}",
        "version", "p50 ms", "p99 ms", "max ms", "bytes/agent", "bytes/version"
    );
    for i in 1..=a.versions {
        let t0 = Instant::now();
        let v = admin
            .apply(apply(i))
            .await
            .expect("apply")
            .into_inner()
            .version;
        let mut lat = Vec::with_capacity(a.agents);
        let mut bytes = 0usize;
        while lat.len() < a.agents {
            let (ver, at, b) =
                next_seen(&mut seen_rx, &mut failed_rx, "new version on every stream").await;
            if ver == v {
                lat.push(at.saturating_duration_since(t0));
                bytes = b;
            }
        }
        lat.sort();
        let (p50, p99, max) = (pct(&lat, 0.5), pct(&lat, 0.99), pct(&lat, 1.0));
        all_p99.push(p99);
        println!(
            "{v:>8} {:>10.1} {:>10.1} {:>10.1} {bytes:>12} {:>14}",
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3,
            max.as_secs_f64() * 1e3,
            bytes * a.agents
        );
    }
    if let Some(pid) = pid {
        let cpu = (cpu_ticks(pid) - ticks0) as f64 / 100.0;
        println!(
            "plane: peak RSS {:.1} MiB, RSS now {:.1} MiB, CPU {cpu:.2} s over {} versions",
            proc_status_kib(pid, "VmHWM:").unwrap_or(0) as f64 / 1024.0,
            proc_status_kib(pid, "VmRSS:").unwrap_or(0) as f64 / 1024.0,
            a.versions
        );
    }
    all_p99.sort();
    println!(
        "worst p99 over {} versions: {:.1} ms ({} agents)",
        a.versions,
        all_p99.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        a.agents
    );
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
}
