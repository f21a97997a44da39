#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Traffic logs end to end: records from real agents reach the plane's store exactly once
//! across plane and agent restarts, `dispactl logs` filters and follows them, the pipeline
//! never blocks requests, and /metrics is valid Prometheus text with the documented series.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use dispa_tests::*;
use tokio::io::AsyncBufReadExt;

fn config(up: &TestUpstream) -> String {
    format!(
        r#"
[upstreams.u]
endpoints = ["{}"]

[[routes]]
name = "r"
hosts = ["*"]
upstream = "u"
"#,
        up.addr
    )
}

/// Sends `n` GETs spread over `agents` with `concurrency` workers; returns the request ids
/// the clients saw (from `x-request-id`), asserting every request succeeded.
async fn load(n: usize, agents: &[SocketAddr], concurrency: usize) -> Vec<String> {
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let agents = agents.to_vec();
        tasks.push(tokio::spawn(async move {
            let http = HttpClient::new();
            let mut ids = Vec::new();
            let mut i = w;
            while i < n {
                let agent = agents[i % agents.len()];
                let r = http
                    .get(
                        &format!("http://{agent}/load/{i}"),
                        Some("load.example.com"),
                    )
                    .await
                    .expect("request");
                assert_eq!(r.status, 200, "{}", r.text());
                ids.push(r.header("x-request-id").expect("x-request-id").to_string());
                i += concurrency;
            }
            ids
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

/// Waits until the plane holds exactly `expected` records, then checks they are exactly the
/// ids the clients saw, each once.
async fn assert_exactly(plane: &str, expected: &[String]) {
    let want = expected.len();
    let limit = (want * 2).to_string();
    let got: Vec<String> = eventually(
        &format!("{want} log records at the plane"),
        Duration::from_secs(60),
        || async {
            let out = ctl(
                plane,
                &["logs", "--since", "1h", "-o", "json", "--limit", &limit],
            )
            .await;
            if out.code != 0 {
                return None;
            }
            let ids: Vec<String> = out
                .stdout
                .lines()
                .map(|l| {
                    serde_json::from_str::<serde_json::Value>(l).expect("JSON line")["request_id"]
                        .as_str()
                        .unwrap()
                        .to_string()
                })
                .collect();
            assert!(
                ids.len() <= want,
                "more records than requests: {} > {want}",
                ids.len()
            );
            (ids.len() == want).then_some(ids)
        },
    )
    .await;
    let got_set: HashSet<&String> = got.iter().collect();
    assert_eq!(got_set.len(), want, "duplicate records");
    let want_set: HashSet<&String> = expected.iter().collect();
    assert_eq!(want_set.len(), want, "clients saw duplicate request ids");
    assert_eq!(
        got_set, want_set,
        "records are the requests the clients saw"
    );
}

async fn ten_thousand_through_two_agents(plane_flags: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let up = TestUpstream::start("u").await;
    let plane =
        PlaneProc::start_with(dir.path(), "127.0.0.1:0".parse().unwrap(), plane_flags).await;
    let a = AgentProc::start(dir.path(), &plane.url(), "a").await;
    let b = AgentProc::start(dir.path(), &plane.url(), "b").await;
    let f = write_config(dir.path(), "r.toml", &config(&up));
    ctl(&plane.url(), &["apply", "-f", &f]).await.ok();
    wait_synced(&plane.url(), &["a", "b"], 1).await;
    let ids = load(10_000, &[a.proxy, b.proxy], 16).await;
    assert_exactly(&plane.url(), &ids).await;
    let stats = ctl(
        &plane.url(),
        &["logs", "--since", "1h", "--stats", "-o", "json"],
    )
    .await
    .ok()
    .json();
    assert_eq!(stats["total"], 10_000);
    assert_eq!(stats["status"]["2xx"], 10_000);
    let status = ctl(&plane.url(), &["status", "-o", "json"])
        .await
        .ok()
        .json();
    let want = if plane_flags.is_empty() {
        "sled"
    } else {
        "postgres"
    };
    assert_eq!(status["log_store"], want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_requests_ten_thousand_records_sled() {
    ten_thousand_through_two_agents(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_requests_ten_thousand_records_postgres() {
    let Some(pg) = dispa_tests::postgres::TestSchema::new("dispa_e2e").await else {
        return;
    };
    ten_thousand_through_two_agents(&["--log-store", &pg.url, "--log-store-schema", &pg.schema])
        .await;
    pg.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_loss_no_duplicates_across_plane_and_agent_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let up = TestUpstream::start("u").await;
    let mut plane = PlaneProc::start(dir.path()).await;
    let plane_url = plane.url();
    let a = AgentProc::start(dir.path(), &plane_url, "a").await;
    let mut b = AgentProc::start(dir.path(), &plane_url, "b").await;
    let f = write_config(dir.path(), "r.toml", &config(&up));
    ctl(&plane_url, &["apply", "-f", &f]).await.ok();
    wait_synced(&plane_url, &["a", "b"], 1).await;

    let mut ids = load(5_000, &[a.proxy, b.proxy], 8).await;
    // Kill the plane while batches of that load are still being shipped and acked.
    plane.kill().await;
    ids.extend(load(5_000, &[a.proxy, b.proxy], 8).await);
    // Restart b while the plane is down: its queue goes to its spool, then it boots from
    // its cached snapshot and keeps serving.
    b.sigterm().await;
    b.exits_cleanly(Duration::from_secs(30)).await;
    let b = AgentProc::start(dir.path(), &plane_url, "b").await;
    ids.extend(load(5_000, &[a.proxy, b.proxy], 8).await);
    let plane = PlaneProc::start_at(dir.path(), plane.addr).await;
    ids.extend(load(5_000, &[a.proxy, b.proxy], 8).await);
    assert_eq!(ids.len(), 20_000);
    assert_exactly(&plane.url(), &ids).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_and_follow() {
    let dir = tempfile::tempdir().unwrap();
    let up = TestUpstream::start("u").await;
    let refused = refused_addr();
    let plane = PlaneProc::start(dir.path()).await;
    let a = AgentProc::start(dir.path(), &plane.url(), "a").await;
    let b = AgentProc::start(dir.path(), &plane.url(), "b").await;
    let cfg = format!(
        r#"
[upstreams.u]
endpoints = ["{}"]
[upstreams.dead]
endpoints = ["{refused}"]

[[routes]]
name = "api"
hosts = ["api.example.com"]
upstream = "u"

[[routes]]
name = "web"
hosts = ["web.example.com"]
path_prefix = "/"
upstream = "u"

[[routes]]
name = "broken"
hosts = ["broken.example.com"]
upstream = "dead"
"#,
        up.addr
    );
    let f = write_config(dir.path(), "r.toml", &cfg);
    ctl(&plane.url(), &["apply", "-f", &f]).await.ok();
    wait_synced(&plane.url(), &["a", "b"], 1).await;

    let local = HttpClient::new();
    let other = HttpClient::from_ip("127.0.0.2".parse().unwrap());
    let send = |client: &HttpClient, agent: SocketAddr, method: &str, host: &str, path: &str| {
        let req = http::Request::builder()
            .method(method)
            .uri(format!("http://{agent}{path}"))
            .header("host", host)
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                b"12345",
            )))
            .unwrap();
        let c = client.clone();
        async move { c.send(req).await.unwrap() }
    };
    // The known set: 3 api GETs via a, 2 web POSTs via b from 127.0.0.2, 1 broken (502),
    // 2 unknown hosts (404).
    for i in 0..3 {
        assert_eq!(
            send(
                &local,
                a.proxy,
                "GET",
                "api.example.com",
                &format!("/v1/items/{i}")
            )
            .await
            .status,
            200
        );
    }
    let before_web = humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string();
    for _ in 0..2 {
        assert_eq!(
            send(&other, b.proxy, "POST", "web.example.com", "/submit")
                .await
                .status,
            200
        );
    }
    assert_eq!(
        send(&local, a.proxy, "GET", "broken.example.com", "/")
            .await
            .status,
        502
    );
    for _ in 0..2 {
        assert_eq!(
            send(&local, b.proxy, "GET", "nowhere.example.com", "/x")
                .await
                .status,
            404
        );
    }
    let count = |args: Vec<&str>| {
        let args: Vec<String> = args.into_iter().map(str::to_string).collect();
        let url = plane.url();
        async move {
            let mut full = vec!["logs", "-o", "json"];
            if !args.iter().any(|a| a == "--limit") {
                full.extend(["--limit", "1000"]);
            }
            full.extend(args.iter().map(String::as_str));
            let out = ctl(&url, &full).await.ok();
            out.stdout
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
                .collect::<Vec<_>>()
        }
    };
    eventually("all 8 records stored", Duration::from_secs(30), || async {
        (count(vec![]).await.len() == 8).then_some(())
    })
    .await;
    assert_eq!(count(vec!["--host", "api.example.com"]).await.len(), 3);
    assert_eq!(
        count(vec!["--host", "API.Example.com"]).await.len(),
        3,
        "host filter is case-insensitive"
    );
    assert_eq!(count(vec!["--route", "web"]).await.len(), 2);
    assert_eq!(count(vec!["--agent", "b"]).await.len(), 4);
    assert_eq!(count(vec!["--status", "404"]).await.len(), 2);
    assert_eq!(count(vec!["--status", "5xx"]).await.len(), 1);
    assert_eq!(count(vec!["--status", "404,5xx"]).await.len(), 3);
    assert_eq!(count(vec!["--status", "2xx"]).await.len(), 5);
    assert_eq!(count(vec!["--method", "post"]).await.len(), 2);
    assert_eq!(count(vec!["--path-prefix", "/v1/"]).await.len(), 3);
    assert_eq!(count(vec!["--client", "127.0.0.2"]).await.len(), 2);
    assert_eq!(count(vec!["--since", "1h"]).await.len(), 8);
    let before = before_web.as_str();
    assert_eq!(
        count(vec!["--until", before]).await.len(),
        3,
        "--until an RFC 3339 time"
    );
    assert_eq!(
        count(vec!["--since", before]).await.len(),
        5,
        "--since an RFC 3339 time"
    );
    let newest = count(vec!["--limit", "2"]).await;
    assert_eq!(newest.len(), 2);
    assert_eq!(newest[0]["host"], "nowhere.example.com", "newest first");
    let r = &count(vec!["--route", "web"]).await[0];
    for key in [
        "ts",
        "agent",
        "request_id",
        "client_ip",
        "method",
        "host",
        "path",
        "status",
        "route",
        "upstream",
        "endpoint",
        "duration_ms",
        "bytes_in",
        "bytes_out",
    ] {
        assert!(r.get(key).is_some(), "record has {key}: {r}");
    }
    assert_eq!(r["bytes_in"], 5);
    assert_eq!(r["client_ip"], "127.0.0.2");
    let broken = &count(vec!["--route", "broken"]).await[0];
    assert_eq!(broken["denial_reason"], "upstream_refused");
    let table = ctl(&plane.url(), &["logs", "--route", "api"]).await.ok();
    assert!(table.stdout.starts_with("TIME"), "{table:?}");
    assert_eq!(table.stdout.lines().count(), 4);
    let stats = ctl(&plane.url(), &["logs", "--stats", "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(
        (
            stats["total"].as_u64(),
            stats["status"]["4xx"].as_u64(),
            stats["status"]["5xx"].as_u64()
        ),
        (Some(8), Some(2), Some(1))
    );
    let bad = ctl(&plane.url(), &["logs", "--status", "6xx"]).await;
    assert_eq!(bad.code, 1, "{bad:?}");

    // --follow shows a new request within 2 seconds.
    let mut follow = tokio::process::Command::new(dispa_tests::process::bin("dispactl"))
        .args([
            "--plane",
            &plane.url(),
            "logs",
            "--follow",
            "--host",
            "api.example.com",
            "-o",
            "json",
            "--limit",
            "1",
        ])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(follow.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        first.contains("/v1/items/2"),
        "the newest existing record first: {first}"
    );
    let fresh = send(&local, a.proxy, "GET", "api.example.com", "/v1/fresh").await;
    let line = tokio::time::timeout(Duration::from_secs(2), lines.next_line())
        .await
        .expect("within 2 s")
        .unwrap()
        .unwrap();
    assert!(
        line.contains(fresh.header("x-request-id").unwrap()) && line.contains("/v1/fresh"),
        "{line}"
    );
    let _ = follow.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logging_never_blocks_requests_when_the_plane_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let up = TestUpstream::start("u").await;
    let mut plane = PlaneProc::start(dir.path()).await;
    let agent = AgentProc::start_with(
        dir.path(),
        &plane.url(),
        "a",
        &["--log-spool-max", "500000"],
    )
    .await;
    let f = write_config(dir.path(), "r.toml", &config(&up));
    ctl(&plane.url(), &["apply", "-f", &f]).await.ok();
    wait_synced(&plane.url(), &["a"], 1).await;
    plane.kill().await;
    let ids = load(6_000, &[agent.proxy], 8).await;
    assert_eq!(
        ids.len(),
        6_000,
        "every request succeeded with the plane down and the spool full"
    );
    let http = HttpClient::new();
    let dropped = eventually("spool drops counted", Duration::from_secs(10), || async {
        let text = http
            .get(&format!("http://{}/metrics", agent.admin), None)
            .await
            .ok()?
            .text();
        let v = metric(
            &text,
            "dispa_log_records_dropped_total",
            &[("reason", "spool_full")],
        )?;
        (v > 0.0).then_some(v)
    })
    .await;
    assert!(
        dropped < 6_000.0,
        "some records fit in the spool: dropped {dropped}"
    );
    let text = http
        .get(&format!("http://{}/metrics", agent.admin), None)
        .await
        .unwrap()
        .text();
    let spooled = metric(&text, "dispa_log_spool_bytes", &[]).unwrap();
    assert!(
        spooled > 0.0 && spooled <= 500_000.0,
        "spool stays within its bound: {spooled}"
    );
}

/// A sample's value from Prometheus text, parsed with a real text-format parser.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("valid Prometheus text");
    scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == name
                && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
                && s.labels.len() == labels.len()
        })
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

fn histogram_count(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("valid Prometheus text");
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .and_then(|s| match &s.value {
            prometheus_parse::Value::Histogram(h) => h.last().map(|b| b.count),
            _ => None,
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_valid_prometheus_text_with_the_documented_series() {
    let dir = tempfile::tempdir().unwrap();
    let up = TestUpstream::start("u").await;
    let refused = refused_addr();
    let plane = PlaneProc::start(dir.path()).await;
    let agent = AgentProc::start(dir.path(), &plane.url(), "a").await;
    let cfg = format!(
        "[upstreams.u]\nendpoints = [\"{}\"]\n[upstreams.dead]\nendpoints = [\"{refused}\"]\n[[routes]]\nname = \"r\"\nhosts = [\"ok.example.com\"]\nupstream = \"u\"\n[[routes]]\nname = \"broken\"\nhosts = [\"broken.example.com\"]\nupstream = \"dead\"\n",
        up.addr
    );
    let f = write_config(dir.path(), "r.toml", &cfg);
    ctl(&plane.url(), &["apply", "-f", &f]).await.ok();
    wait_synced(&plane.url(), &["a"], 1).await;
    let http = HttpClient::new();
    let mut statuses = HashMap::new();
    for (host, n) in [
        ("ok.example.com", 5),
        ("nowhere.example.com", 2),
        ("broken.example.com", 1),
    ] {
        for _ in 0..n {
            let r = http
                .get(&format!("http://{}/", agent.proxy), Some(host))
                .await
                .unwrap();
            *statuses.entry(r.status.as_u16()).or_insert(0) += 1;
        }
    }
    assert_eq!(statuses, HashMap::from([(200, 5), (404, 2), (502, 1)]));
    let text = eventually("all requests finished", Duration::from_secs(10), || async {
        let t = http
            .get(&format!("http://{}/metrics", agent.admin), None)
            .await
            .ok()?
            .text();
        (metric(&t, "dispa_requests_in_flight", &[]) == Some(0.0)).then_some(t)
    })
    .await;
    let m = |name: &str, labels: &[(&str, &str)]| metric(&text, name, labels);
    assert_eq!(
        m(
            "dispa_requests_total",
            &[("route", "r"), ("upstream", "u"), ("status_class", "2xx")]
        ),
        Some(5.0)
    );
    assert_eq!(
        m(
            "dispa_requests_total",
            &[("route", ""), ("upstream", ""), ("status_class", "4xx")]
        ),
        Some(2.0)
    );
    assert_eq!(
        m(
            "dispa_requests_total",
            &[
                ("route", "broken"),
                ("upstream", "dead"),
                ("status_class", "5xx")
            ]
        ),
        Some(1.0)
    );
    assert_eq!(
        m("dispa_denied_requests_total", &[("reason", "no_route")]),
        Some(2.0)
    );
    assert_eq!(
        m(
            "dispa_denied_requests_total",
            &[("reason", "upstream_refused")]
        ),
        Some(1.0)
    );
    assert_eq!(
        histogram_count(&text, "dispa_request_duration_seconds", &[("route", "r")]),
        Some(5.0)
    );
    assert_eq!(
        histogram_count(
            &text,
            "dispa_upstream_duration_seconds",
            &[("route", "r"), ("upstream", "u")]
        ),
        Some(5.0)
    );
    assert_eq!(m("dispa_config_version", &[]), Some(1.0));
    assert_eq!(m("dispa_plane_connected", &[]), Some(1.0));
    assert_eq!(m("dispa_snapshots_applied_total", &[]), Some(1.0));
    assert!(m("dispa_connections_accepted_total", &[]).unwrap_or(0.0) >= 1.0);
    for s in [
        "dispa_connections_open",
        "dispa_log_queue_depth",
        "dispa_log_spool_bytes",
        "dispa_log_spool_batches",
    ] {
        assert!(m(s, &[]).is_some(), "{s} present");
    }
    assert_eq!(
        m(
            "dispa_log_records_dropped_total",
            &[("reason", "spool_full")]
        ),
        Some(0.0)
    );

    // The plane's own /metrics on its gRPC port.
    let plane_text = eventually(
        "plane ingested 8 records",
        Duration::from_secs(20),
        || async {
            let t = http
                .get(&format!("{}/metrics", plane.url()), None)
                .await
                .ok()?
                .text();
            (metric(&t, "dispa_plane_log_records_ingested_total", &[]) == Some(8.0)).then_some(t)
        },
    )
    .await;
    assert_eq!(
        metric(&plane_text, "dispa_plane_config_version", &[]),
        Some(1.0)
    );
    assert_eq!(
        metric(&plane_text, "dispa_plane_agents_synced", &[]),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdout_access_log_json_tracing_traceparent_and_fleet_summary() {
    let dir = tempfile::tempdir().unwrap();
    let up = TestUpstream::start("u").await;
    let plane = PlaneProc::start(dir.path()).await;
    let flags = [
        "--access-log",
        "stdout",
        "--log-format",
        "json",
        "--log-level",
        "debug",
        "--log-redact-query",
        "token",
    ];
    let agent = AgentProc::start_with(dir.path(), &plane.url(), "a", &flags).await;
    let f = write_config(dir.path(), "r.toml", &config(&up));
    ctl(&plane.url(), &["apply", "-f", &f]).await.ok();
    wait_synced(&plane.url(), &["a"], 1).await;

    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let req = http::Request::get(format!(
        "http://{}/search?token=s3cr3t-value&q=1",
        agent.proxy
    ))
    .header("host", "h")
    .header("traceparent", tp)
    .header("x-request-id", "client-chosen-id")
    .body(http_body_util::Full::new(bytes::Bytes::new()))
    .unwrap();
    let r = HttpClient::new().send(req).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-request-id"), Some("client-chosen-id"));
    let seen = r.json();
    assert_eq!(
        seen["headers"]["traceparent"], tp,
        "traceparent propagated upstream"
    );
    assert_eq!(seen["headers"]["x-request-id"], "client-chosen-id");

    let (access, span_line) = eventually(
        "access-log line and request span on the agent's output",
        Duration::from_secs(10),
        || async {
            let log = agent.log_text();
            let lines: Vec<serde_json::Value> = log
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
            let access = lines
                .iter()
                .find(|j| j["request_id"] == "client-chosen-id")?
                .clone();
            let span = lines
                .iter()
                .find(|j| {
                    j["span"]["name"] == "request"
                        && j["span"]["id"] == "client-chosen-id"
                        && j["fields"]["message"] == "request finished"
                })?
                .clone();
            Some((access, span))
        },
    )
    .await;
    assert_eq!(access["query"], "token=REDACTED&q=1");
    assert_eq!(access["traceparent"], tp);
    assert_eq!(access["status"], 200);
    assert_eq!(span_line["fields"]["status"], 200);
    assert!(
        !agent.log_text().contains("s3cr3t-value"),
        "redacted query values never reach the agent's output"
    );
    let stored = ctl(&plane.url(), &["logs", "-o", "json"]).await.ok();
    assert!(stored.stdout.contains("token=REDACTED") && !stored.stdout.contains("s3cr3t-value"));

    // Agents report summaries; `dispactl status` shows them per agent.
    let status = eventually(
        "a metrics summary from agent a",
        Duration::from_secs(20),
        || async {
            let s = ctl(&plane.url(), &["status", "-o", "json"])
                .await
                .ok()
                .json();
            (!s["fleet"][0]["metrics"].is_null()).then_some(s)
        },
    )
    .await;
    let m = &status["fleet"][0]["metrics"];
    assert_eq!(status["fleet"][0]["id"], "a");
    assert!(
        m["rps"].as_f64().is_some()
            && m["error_rate"].as_f64() == Some(0.0)
            && m["p99_ms"].as_f64().is_some(),
        "{m}"
    );
    let table = ctl(&plane.url(), &["status"]).await.ok();
    assert!(
        table.stdout.contains("RPS") && table.stdout.contains("P99"),
        "{table:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_gives_up_is_logged_and_not_left_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let up = TestUpstream::start("slow").await;
    let plane = PlaneProc::start(dir.path()).await;
    let agent = AgentProc::start(dir.path(), &plane.url(), "a").await;
    let f = write_config(dir.path(), "r.toml", &config(&up));
    ctl(&plane.url(), &["apply", "-f", &f]).await.ok();
    wait_synced(&plane.url(), &["a"], 1).await;
    let url = format!("http://{}/?sleep_ms=5000", agent.proxy);
    let req = tokio::spawn(async move { HttpClient::new().get(&url, Some("h")).await });
    eventually(
        "the request reaches the upstream",
        Duration::from_secs(10),
        || async { (up.hits.load(std::sync::atomic::Ordering::Relaxed) == 1).then_some(()) },
    )
    .await;
    req.abort();
    let http = HttpClient::new();
    eventually(
        "in-flight back to 0 and a 499 record stored",
        Duration::from_secs(20),
        || async {
            let text = http
                .get(&format!("http://{}/metrics", agent.admin), None)
                .await
                .ok()?
                .text();
            let idle = metric(&text, "dispa_requests_in_flight", &[]) == Some(0.0);
            let out = ctl(&plane.url(), &["logs", "--status", "499", "-o", "json"]).await;
            let logged = out.stdout.contains("\"denial_reason\":\"client_closed\"");
            (idle && logged).then_some(())
        },
    )
    .await;
}
