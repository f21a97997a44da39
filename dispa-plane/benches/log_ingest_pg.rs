//! Ingest throughput of `PgLogStore` (no criterion: one timed run per scenario).
//!
//!   cargo bench -p dispa-plane --bench log_ingest_pg
//!
//! Uses `DISPA_TEST_POSTGRES` (default postgres://postgres@127.0.0.1:5432/test), a fresh schema
//! per scenario, dropped afterwards. `DISPA_BENCH_RECORDS` (default 200000) and
//! `DISPA_BENCH_BATCH` (default 1000) size the run; `DISPA_BENCH_RUNS` (default 3) repeats each
//! scenario and reports the median. Exits 0 with a message when no server is reachable.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dispa_plane::logs::LogStore;
use dispa_plane::logs::postgres::{PgLogStore, PgOptions};
use dispa_proto::v1::{LogBatch, LogRecord};
use prost::Message;
use tokio_postgres::NoTls;

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

/// A plausible proxied request; times spread over the last ten minutes.
fn record(i: usize, base_us: i64) -> LogRecord {
    let paths = [
        "/api/v1/users/12345/profile",
        "/api/v1/orders?page=2",
        "/static/app.8f3a2c.js",
        "/healthz",
        "/api/v2/search",
    ];
    let statuses = [200, 200, 200, 201, 204, 301, 404, 500, 503];
    LogRecord {
        ts_us: base_us - (i % 600_000) as i64 * 1_000,
        agent: format!("agent-{}", i % 4),
        request_id: format!("{:016x}{:016x}", i, i.wrapping_mul(2_654_435_761)),
        client_ip: format!("10.{}.{}.{}", i % 7, i % 251, i % 13),
        method: if i.is_multiple_of(5) { "POST" } else { "GET" }.into(),
        scheme: "https".into(),
        host: ["api.example.com", "www.example.com", "cdn.example.com"][i % 3].into(),
        path: paths[i % paths.len()].into(),
        query: if i.is_multiple_of(3) {
            format!("q=item{i}&sort=desc")
        } else {
            String::new()
        },
        status: statuses[i % statuses.len()],
        route: format!("route-{}", i % 12),
        upstream: format!("backend-{}", i % 3),
        endpoint: format!("10.1.0.{}:8080", i % 16),
        attempts: 1 + u32::from(i.is_multiple_of(10)),
        duration_us: 800 + (i % 5_000) as u64,
        upstream_duration_us: 600 + (i % 4_000) as u64,
        bytes_in: (i % 2_048) as u64,
        bytes_out: 512 + (i % 65_536) as u64,
        user_agent: "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) \
                     Chrome/126.0 Safari/537.36"
            .into(),
        tls_version: "TLSv1.3".into(),
        sni: "api.example.com".into(),
        denial_reason: String::new(),
        traceparent: format!("00-{:032x}-{:016x}-01", i, i ^ 0xabcdef),
    }
}

struct Scenario {
    ingesters: usize,
    connections: usize,
    batch: usize,
}

/// Returns records per second.
async fn run(url: &str, admin: &tokio_postgres::Client, sc: &Scenario, total: usize) -> f64 {
    let schema = format!("dispa_bench_{}_{}", std::process::id(), now_us());
    let store = Arc::new(
        PgLogStore::connect_with(
            url,
            PgOptions {
                schema: Some(schema.clone()),
                connections: sc.connections,
            },
        )
        .await
        .unwrap(),
    );
    // Built before timing: the bench measures the store, not record generation.
    let base = now_us();
    let per = total / sc.ingesters;
    let batches: Vec<Vec<LogBatch>> = (0..sc.ingesters)
        .map(|w| {
            (0..per)
                .step_by(sc.batch)
                .enumerate()
                .map(|(n, start)| LogBatch {
                    agent_id: format!("bench-{w}"),
                    boot_id: "boot".into(),
                    seq: n as u64 + 1,
                    records: (start..(start + sc.batch).min(per))
                        .map(|i| record(w * per + i, base))
                        .collect(),
                })
                .collect()
        })
        .collect();
    let records: usize = batches.iter().flatten().map(|b| b.records.len()).sum();
    let bytes: usize = batches
        .iter()
        .flatten()
        .flat_map(|b| &b.records)
        .map(|r| r.encoded_len())
        .sum();
    // Warm up: create today's partition and the connections outside the timed part.
    let warm = LogBatch {
        agent_id: "warm".into(),
        boot_id: "boot".into(),
        seq: 1,
        records: vec![record(0, base)],
    };
    store.ingest(&warm).await.unwrap();

    let started = Instant::now();
    let tasks: Vec<_> = batches
        .into_iter()
        .map(|mine| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut worst = Duration::ZERO;
                for b in &mine {
                    let t = Instant::now();
                    assert!(store.ingest(b).await.unwrap());
                    worst = worst.max(t.elapsed());
                }
                worst
            })
        })
        .collect();
    let mut worst = Duration::ZERO;
    for t in tasks {
        worst = worst.max(t.await.unwrap());
    }
    let secs = started.elapsed().as_secs_f64();
    let stored: i64 = admin
        .query_one(
            &format!("SELECT count(*) FROM \"{schema}\".dispa_logs"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored as usize, records + 1);
    println!(
        "ingesters={:<2} connections={:<2} batch={:<5} records={records:<7} time={secs:>6.2}s  \
         {:>8.0} records/s  {:>6.1} MB/s (protobuf)  slowest batch {:.0} ms",
        sc.ingesters,
        sc.connections,
        sc.batch,
        records as f64 / secs,
        bytes as f64 / secs / 1e6,
        worst.as_secs_f64() * 1e3,
    );
    drop(store);
    admin
        .batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .await
        .unwrap();
    records as f64 / secs
}

fn main() {
    let url = std::env::var("DISPA_TEST_POSTGRES").unwrap_or_else(|_| DEFAULT_URL.to_string());
    let total = env_usize("DISPA_BENCH_RECORDS", 200_000);
    let batch = env_usize("DISPA_BENCH_BATCH", 1_000).max(1);
    let runs = env_usize("DISPA_BENCH_RUNS", 3).max(1);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let connected = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_postgres::connect(&url, NoTls),
        )
        .await;
        let admin = match connected {
            Ok(Ok((client, conn))) => {
                tokio::spawn(conn);
                client
            }
            _ => {
                println!(
                    "skipping: PostgreSQL not reachable (set DISPA_TEST_POSTGRES); no benchmark run"
                );
                return;
            }
        };
        let version: String = admin
            .query_one("SHOW server_version", &[])
            .await
            .unwrap()
            .get(0);
        println!(
            "PostgreSQL {version}; {total} records per scenario; {} cores",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        for sc in [
            Scenario {
                ingesters: 1,
                connections: 1,
                batch,
            },
            Scenario {
                ingesters: 4,
                connections: 4,
                batch,
            },
        ] {
            let mut rates = Vec::new();
            for _ in 0..runs {
                rates.push(run(&url, &admin, &sc, total).await);
            }
            rates.sort_by(f64::total_cmp);
            println!(
                "=> ingesters={} batch={}: median {:.0} records/s (min {:.0}, max {:.0}) over {runs} runs",
                sc.ingesters,
                sc.batch,
                rates[rates.len() / 2],
                rates[0],
                rates[rates.len() - 1],
            );
        }
    });
}
