#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The agent's request path and lifecycle, end to end: host matching, error statuses, h2c,
//! admin endpoints, serving threads pinned to CPUs, graceful drain on SIGTERM, protocol version
//! skew, and `dispa dev`.

use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::time::Duration;

use dispa_proto::v1::config_discovery_client::ConfigDiscoveryClient;
use dispa_proto::v1::{DiscoveryRequest, Node};
use dispa_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_matching_is_exact_wildcard_case_insensitive_and_ignores_port() {
    let dir = tempfile::tempdir().unwrap();
    let (w, e, d) = (
        TestUpstream::start("wild").await,
        TestUpstream::start("exact").await,
        TestUpstream::start("default").await,
    );
    let cfg = format!(
        r#"
[upstreams.wild]
endpoints = ["{}"]
[upstreams.exact]
endpoints = ["{}"]
[upstreams.default]
endpoints = ["{}"]

[[routes]]
name = "wild"
hosts = ["*.example.com"]
upstream = "wild"

[[routes]]
name = "exact"
hosts = ["www.example.com"]
path_prefix = "/"
upstream = "exact"

[[routes]]
name = "only-status"
hosts = ["status.example.net"]
path = "/status"
upstream = "exact"

[[routes]]
name = "prefix"
hosts = ["status.example.net"]
path_prefix = "/v1/"
rewrite_prefix = "/"
upstream = "default"
"#,
        w.addr, e.addr, d.addr
    );
    let (_plane, agent) = fleet_with(dir.path(), &cfg).await;
    let http = HttpClient::new();
    let cases: &[(&str, &str, Option<&str>)] = &[
        ("a.example.com", "/", Some("wild")),
        ("a.b.example.com", "/", Some("wild")),
        ("A.B.EXAMPLE.COM", "/", Some("wild")),
        ("a.example.com:8443", "/", Some("wild")),
        ("www.example.com", "/", Some("exact")),
        ("WWW.Example.Com:80", "/x", Some("exact")),
        ("example.com", "/", None),
        ("badexample.com", "/", None),
        ("a.example.com.evil.net", "/", None),
        ("status.example.net", "/status", Some("exact")),
        ("status.example.net", "/status/more", None),
        ("status.example.net", "/v1/users", Some("default")),
    ];
    for (host, path, want) in cases {
        let r = http
            .get(&format!("http://{}{path}", agent.proxy), Some(host))
            .await
            .unwrap();
        match want {
            Some(up) => {
                assert_eq!(r.status, 200, "{host}{path}");
                assert_eq!(r.json()["upstream"], *up, "{host}{path}");
            }
            None => {
                assert_eq!(r.status, 404, "{host}{path}: {}", r.text());
                assert_eq!(r.text(), "no route for this request\n");
            }
        }
    }
    let r = http
        .get(
            &format!("http://{}/v1/users", agent.proxy),
            Some("status.example.net"),
        )
        .await
        .unwrap();
    assert_eq!(r.json()["path"], "/users", "rewrite_prefix");
}

/// The CPUs a thread of `pid` may run on, from /proc (`Cpus_allowed_list`, e.g. "0-1,4").
fn cpus_allowed(pid: u32, tid: &str) -> Vec<usize> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim();
    list.split(',')
        .flat_map(|part| match part.split_once('-') {
            Some((a, b)) => a.parse().unwrap()..=b.parse().unwrap(),
            None => part.parse().unwrap()..=part.parse().unwrap(),
        })
        .collect()
}

/// The CPUs `agent` may use (its main thread's), and its `n` plain serving threads' by name
/// ("dispa-proxy-0", ...), once all `n` run.
async fn serving_cpus(
    agent: &AgentProc,
    n: usize,
) -> (Vec<usize>, std::collections::BTreeMap<String, Vec<usize>>) {
    let pid = agent.child.id().unwrap();
    let threads = eventually("the serving threads", Duration::from_secs(10), || async {
        let t: std::collections::BTreeMap<_, _> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .ok()?
            .filter_map(|t| {
                let tid = t.ok()?.file_name().into_string().ok()?;
                let comm = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).ok()?;
                let name = comm.trim().to_string();
                name.starts_with("dispa-proxy-")
                    .then(|| (name, cpus_allowed(pid, &tid)))
            })
            .collect();
        (t.len() == n).then_some(t)
    })
    .await;
    (cpus_allowed(pid, &pid.to_string()), threads)
}

/// `--pin-workers on`: serving thread i runs only on the i-th CPU the agent may use, in turn
/// when there are more threads than CPUs, and the agent serves as before; `off` leaves every
/// thread free to run anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_threads_are_pinned_to_cpus_in_turn() {
    let dir = tempfile::tempdir().unwrap();
    let up = TestUpstream::start("app").await;
    let plane = PlaneProc::start(dir.path()).await;
    let cfg = format!(
        "[upstreams.app]\nendpoints = [\"{}\"]\n\n[[routes]]\nname = \"all\"\nupstream = \"app\"\n",
        up.addr
    );
    let f = write_config(dir.path(), "routes.toml", &cfg);
    ctl(&plane.url(), &["apply", "-f", &f]).await.ok();
    let args = |pin| ["--workers", "3", "--pin-workers", pin];
    let pinned = AgentProc::start_with(dir.path(), &plane.url(), "pinned", &args("on")).await;
    let free = AgentProc::start_with(dir.path(), &plane.url(), "free", &args("off")).await;
    wait_synced(&plane.url(), &["pinned", "free"], 1).await;

    let http = HttpClient::new();
    for agent in [&pinned, &free] {
        let r = http
            .get(&format!("http://{}/", agent.proxy), None)
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}: {}", agent.id, r.text());
        assert_eq!(r.json()["upstream"], "app");
    }
    let (allowed, threads) = serving_cpus(&pinned, 3).await;
    for i in 0..3 {
        let want = [allowed[i % allowed.len()]];
        assert_eq!(
            threads[&format!("dispa-proxy-{i}")],
            want,
            "thread {i} of {allowed:?}"
        );
    }
    assert!(
        pinned
            .log_text()
            .contains("serving threads pinned to CPUs in turn"),
        "the agent says it pinned them"
    );

    let (allowed, threads) = serving_cpus(&free, 3).await;
    assert!(threads.values().all(|cpus| *cpus == allowed), "{threads:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failures_map_to_502_and_504_with_short_bodies() {
    let dir = tempfile::tempdir().unwrap();
    let slow = TestUpstream::start("slow").await;
    // A port that refuses connections: bound once, then released.
    let refused = refused_addr();
    let cfg = format!(
        r#"
[upstreams.dead]
endpoints = ["{refused}"]
[upstreams.slow]
endpoints = ["{}"]

[[routes]]
name = "dead"
path_prefix = "/dead"
upstream = "dead"

[[routes]]
name = "slow"
path_prefix = "/slow"
timeout = "300ms"
upstream = "slow"
"#,
        slow.addr
    );
    let (_plane, agent) = fleet_with(dir.path(), &cfg).await;
    let http = HttpClient::new();
    let r = http
        .get(&format!("http://{}/dead", agent.proxy), Some("h"))
        .await
        .unwrap();
    assert_eq!(r.status, 502);
    assert_eq!(r.text(), "upstream refused the connection\n");
    let r = http
        .get(
            &format!("http://{}/slow?sleep_ms=3000", agent.proxy),
            Some("h"),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 504);
    assert_eq!(r.text(), "upstream timed out\n");
    // With a body (hyper's HTTP/1.1 server path) and over HTTP/2 (a task per stream) too.
    let post = http::Request::post(format!("http://{}/slow?sleep_ms=3000", agent.proxy))
        .header("host", "h")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            b"body",
        )))
        .unwrap();
    let r = http.send(post).await.unwrap();
    assert_eq!(r.status, 504);
    let r = dispa_tests::http_client::h2c_get(agent.proxy, "h", "/slow?sleep_ms=3000")
        .await
        .unwrap();
    assert_eq!(r.status, 504);

    let m = http
        .get(&format!("http://{}/metrics", agent.admin), None)
        .await
        .unwrap()
        .text();
    assert!(
        m.contains(r#"dispa_requests_total{route="dead",upstream="dead",status_class="5xx"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(r#"dispa_denied_requests_total{reason="upstream_timeout"} 3"#),
        "{m}"
    );
    assert!(
        m.contains(r#"dispa_request_duration_seconds_count{route="slow"} 3"#),
        "{m}"
    );
    assert!(m.contains("dispa_config_version 1"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_clients_are_proxied() {
    let dir = tempfile::tempdir().unwrap();
    let up = TestUpstream::start("u").await;
    let cfg = format!(
        "[upstreams.u]\nendpoints = [\"{}\"]\n[[routes]]\nname = \"r\"\nhosts = [\"h2.example.com\"]\nupstream = \"u\"\n",
        up.addr
    );
    let (_plane, agent) = fleet_with(dir.path(), &cfg).await;
    // HTTP/2 carries the host in :authority.
    let r = dispa_tests::http_client::h2c_get(agent.proxy, "h2.example.com", "/path")
        .await
        .unwrap();
    assert_eq!(r.version, http::Version::HTTP_2);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["path"], "/path");
    // The upstream's own fields reach HTTP/2 and HTTP/1.1 clients.
    assert_eq!(r.header("x-upstream"), Some("u"));
    let r = HttpClient::new()
        .get(
            &format!("http://{}/path", agent.proxy),
            Some("h2.example.com"),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-upstream"), Some("u"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_and_readiness_before_any_config() {
    let dir = tempfile::tempdir().unwrap();
    let plane = PlaneProc::start(dir.path()).await;
    let agent = AgentProc::start(dir.path(), &plane.url(), "edge").await;
    let http = HttpClient::new();
    let health = http
        .get(&format!("http://{}/healthz", agent.admin), None)
        .await
        .unwrap();
    assert_eq!(health.status, 200);
    let ready = http
        .get(&format!("http://{}/readyz", agent.admin), None)
        .await
        .unwrap();
    assert_eq!(ready.status, 503, "no snapshot yet");
    let r = http
        .get(&format!("http://{}/", agent.proxy), Some("h"))
        .await
        .unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.text(), "no configuration loaded yet\n");
    let status = ctl(&plane.url(), &["status", "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(status["version"], 0);

    let up = TestUpstream::start("u").await;
    let f = write_config(
        dir.path(),
        "r.toml",
        &format!(
            "[upstreams.u]\nendpoints = [\"{}\"]\n[[routes]]\nname = \"r\"\nupstream = \"u\"\n",
            up.addr
        ),
    );
    ctl(&plane.url(), &["apply", "-f", &f]).await.ok();
    wait_synced(&plane.url(), &["edge"], 1).await;
    let ready = http
        .get(&format!("http://{}/readyz", agent.admin), None)
        .await
        .unwrap();
    assert_eq!(ready.status, 200);
    let cfg = http
        .get(&format!("http://{}/config", agent.admin), None)
        .await
        .unwrap()
        .json();
    assert_eq!(cfg["version"], 1);
    assert_eq!(cfg["routes"][0], "r");
    assert_eq!(cfg["upstreams"]["u"][0], up.addr.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_requests_then_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let up = TestUpstream::start("slow").await;
    let cfg = format!(
        "[upstreams.u]\nendpoints = [\"{}\"]\n[[routes]]\nname = \"r\"\ntimeout = \"20s\"\nupstream = \"u\"\n",
        up.addr
    );
    let (_plane, mut agent) = fleet_with(dir.path(), &cfg).await;
    let url = format!("http://{}/slow?sleep_ms=1500", agent.proxy);
    let in_flight = tokio::spawn(async move { HttpClient::new().get(&url, Some("h")).await });
    eventually(
        "the slow request reaches the upstream",
        Duration::from_secs(10),
        || async { (up.hits.load(Ordering::Relaxed) > 0).then_some(()) },
    )
    .await;
    agent.sigterm().await;
    let r = in_flight
        .await
        .unwrap()
        .expect("in-flight request completes");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["upstream"], "slow");
    agent.exits_cleanly(Duration::from_secs(20)).await;
    assert!(
        agent.log_text().contains("draining"),
        "{}",
        agent.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_idle_keep_alive_connections_at_once() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let up = TestUpstream::start("u").await;
    let cfg = format!(
        "[upstreams.u]\nendpoints = [\"{}\"]\n[[routes]]\nname = \"r\"\nupstream = \"u\"\n",
        up.addr
    );
    let (_plane, mut agent) = fleet_with(dir.path(), &cfg).await;
    // One request answered, then the connection waits, idle (the idle timeout is 60 s).
    let mut s = tokio::net::TcpStream::connect(agent.proxy).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("\"upstream\"") {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "answered before closing");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 200"));
    agent.sigterm().await;
    // The agent closes the idle connection and exits, well before the idle timeout.
    let closed = tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf))
        .await
        .expect("the idle connection is closed on SIGTERM");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    agent.exits_cleanly(Duration::from_secs(20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_of_another_protocol_major_is_refused_with_both_versions() {
    let dir = tempfile::tempdir().unwrap();
    let plane = PlaneProc::start(dir.path()).await;
    let mut client = ConfigDiscoveryClient::connect(plane.url()).await.unwrap();
    let hello = DiscoveryRequest {
        node: Some(Node {
            id: "future-agent".into(),
            build_version: "9.0.0".into(),
            protocol_version: "2.0".into(),
            ..Default::default()
        }),
        response: None,
    };
    let err = client
        .stream(tokio_stream::iter(vec![hello]))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    let msg = err.message();
    assert!(
        msg.contains("\"2.0\"") && msg.contains("protocol 1.0"),
        "{msg}"
    );
    let log = plane.log_text();
    assert!(
        log.contains("refused agent") && log.contains("\"2.0\"") && log.contains("protocol 1.0"),
        "{log}"
    );
    let states = agent_states(&plane.url()).await;
    let (_, state, _, last_error) = states
        .iter()
        .find(|s| s.0 == "future-agent")
        .expect("listed");
    assert_eq!(state, "DISCONNECTED");
    assert!(
        last_error.contains("major versions must match"),
        "{last_error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispa_dev_answers_at_once_prints_a_tour_and_stops_without_losing_logs() {
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("dev.ready");
    let log = dir.path().join("dev.log");
    let out = std::fs::File::create(&log).unwrap();
    let mut child = tokio::process::Command::new(dispa_tests::process::bin("dispa"))
        .args([
            "dev",
            "--plane-listen",
            "127.0.0.1:0",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--demo-listen",
            "127.0.0.1:0",
            "--ready-file",
        ])
        .arg(&ready)
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let addrs: serde_json::Value =
        eventually("dev ready file", Duration::from_secs(20), || async {
            serde_json::from_str(&std::fs::read_to_string(&ready).ok()?).ok()
        })
        .await;
    let proxy = addrs["proxy"].as_str().unwrap().to_string();
    let plane = format!("http://{}", addrs["plane"].as_str().unwrap());
    let http = HttpClient::new();
    let r = eventually("dev proxy answers", Duration::from_secs(20), || async {
        http.get(&format!("http://{proxy}/hello"), None)
            .await
            .ok()
            .filter(|r| r.status == 200)
    })
    .await;
    assert!(
        r.text().contains("Hello from the Dispa demo upstream"),
        "{}",
        r.text()
    );
    assert_eq!(r.header("x-served-by"), Some("dispa"));
    let status = ctl(&plane, &["status", "-o", "json"]).await.ok().json();
    assert_eq!(status["version"], 1);
    assert!(dir.path().join(".dispa/plane").is_dir() && dir.path().join(".dispa/agent").is_dir());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("dispactl") && text.contains("apply -f routes.toml"),
        "{text}"
    );

    // A request served just before Ctrl-C reaches the plane's log store before dev exits:
    // the agent stops before the plane it ships to.
    let last = http
        .get(&format!("http://{proxy}/hello"), None)
        .await
        .unwrap();
    assert_eq!(last.status, 200);
    let last_id = last
        .header("x-request-id")
        .expect("x-request-id")
        .to_string();
    let _ = tokio::process::Command::new("kill")
        .args(["-TERM", &child.id().unwrap().to_string()])
        .status()
        .await;
    let code = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(code.code(), Some(0));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("left in the spool"), "{text}");

    std::fs::rename(
        dir.path().join(".dispa/plane"),
        dir.path().join("plane-data"),
    )
    .unwrap();
    let plane = PlaneProc::start(dir.path()).await;
    let logs = ctl(&plane.url(), &["logs", "--since", "1h", "-o", "json"])
        .await
        .ok();
    let ids: Vec<String> = logs
        .stdout
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("JSON line");
            v["request_id"].as_str().expect("request_id").to_string()
        })
        .collect();
    assert!(ids.contains(&last_id), "{last_id} not in {ids:?}");
}

/// A plane of a future protocol major, to show the agent's side of version skew.
struct FuturePlane {
    replies: tokio::sync::mpsc::Sender<DiscoveryRequest>,
}

#[tonic::async_trait]
impl dispa_proto::v1::config_discovery_server::ConfigDiscovery for FuturePlane {
    type StreamStream = tokio_stream::wrappers::ReceiverStream<
        Result<dispa_proto::v1::SnapshotEnvelope, tonic::Status>,
    >;

    async fn stream(
        &self,
        request: tonic::Request<tonic::Streaming<DiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::StreamStream>, tonic::Status> {
        let mut inbound = request.into_inner();
        let replies = self.replies.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            let snapshot = bytes::Bytes::new();
            let env = dispa_proto::v1::SnapshotEnvelope {
                version: 7,
                nonce: "n-1".into(),
                hash: dispa_proto::content_hash(&snapshot),
                snapshot,
                plane_build_version: "9.0.0".into(),
                protocol_version: "2.0".into(),
            };
            let _ = tx.send(Ok(env)).await;
            while let Ok(Some(m)) = inbound.message().await {
                let _ = replies.send(m).await;
            }
            drop(tx);
        });
        Ok(tonic::Response::new(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_rejects_a_plane_of_another_protocol_major_naming_both_versions() {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (replies, mut rx) = tokio::sync::mpsc::channel(8);
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                dispa_proto::v1::config_discovery_server::ConfigDiscoveryServer::new(FuturePlane {
                    replies,
                }),
            )
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let agent = AgentProc::start(dir.path(), &format!("http://{addr}"), "edge").await;
    let nack = loop {
        let m = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("agent answers")
            .expect("reply");
        if let Some(dispa_proto::v1::discovery_request::Response::Nack(n)) = m.response {
            break n;
        }
    };
    assert_eq!((nack.version, nack.nonce.as_str()), (7, "n-1"));
    assert!(
        nack.error.contains("\"2.0\"")
            && nack.error.contains("speaks 1.0")
            && nack.error.contains("9.0.0"),
        "{}",
        nack.error
    );
    let log = agent.log_text();
    assert!(log.contains("protocol major versions must match"), "{log}");
    let http = HttpClient::new();
    let ready = http
        .get(&format!("http://{}/readyz", agent.admin), None)
        .await
        .unwrap();
    assert_eq!(
        ready.status, 503,
        "nothing from an incompatible plane is served"
    );
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_conn_avoids_a_busy_endpoint_and_hash_is_sticky() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        TestUpstream::start("a").await,
        TestUpstream::start("b").await,
    );
    let cfg = format!(
        r#"
[upstreams.lc]
balance = "least_conn"
endpoints = ["{a}", "{b}"]

[upstreams.sticky]
balance = "hash"
hash_on = "header:x-user"
endpoints = ["{a}", "{b}"]

[[routes]]
name = "lc"
hosts = ["lc.example.com"]
timeout = "20s"
upstream = "lc"

[[routes]]
name = "sticky"
hosts = ["sticky.example.com"]
upstream = "sticky"
"#,
        a = a.addr,
        b = b.addr
    );
    let (_plane, agent) = fleet_with(dir.path(), &cfg).await;
    let proxy = agent.proxy;
    // Occupy one endpoint with a slow request.
    let slow = tokio::spawn(async move {
        HttpClient::new()
            .get(
                &format!("http://{proxy}/?sleep_ms=3000"),
                Some("lc.example.com"),
            )
            .await
    });
    eventually(
        "the slow request is in flight",
        Duration::from_secs(10),
        || async {
            (a.hits.load(Ordering::Relaxed) + b.hits.load(Ordering::Relaxed) == 1).then_some(())
        },
    )
    .await;
    let busy = if a.hits.load(Ordering::Relaxed) == 1 {
        "a"
    } else {
        "b"
    };
    let http = HttpClient::new();
    for _ in 0..10 {
        let r = http
            .get(&format!("http://{}/", agent.proxy), Some("lc.example.com"))
            .await
            .unwrap();
        assert_ne!(
            r.json()["upstream"],
            busy,
            "least_conn sends new requests to the idle endpoint"
        );
    }
    assert_eq!(slow.await.unwrap().unwrap().json()["upstream"], busy);

    let mut placement = std::collections::HashMap::new();
    for user in 0..20 {
        for _ in 0..3 {
            let req = http::Request::get(format!("http://{}/", agent.proxy))
                .header("host", "sticky.example.com")
                .header("x-user", format!("user-{user}"))
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap();
            let up = http.send(req).await.unwrap().json()["upstream"]
                .as_str()
                .unwrap()
                .to_string();
            let first = placement.entry(user).or_insert_with(|| up.clone());
            assert_eq!(*first, up, "user-{user} always lands on one endpoint");
        }
    }
    let on_a = placement.values().filter(|u| *u == "a").count();
    assert!(
        (3..=17).contains(&on_a),
        "users spread over both endpoints: {on_a} of 20 on a"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_redirect_respond_and_request_matchers() {
    let dir = tempfile::tempdir().unwrap();
    let (stable, canary) = (
        TestUpstream::start("stable").await,
        TestUpstream::start("canary").await,
    );
    let cfg = format!(
        r#"
[upstreams.stable]
endpoints = ["{}"]
[upstreams.canary]
endpoints = ["{}"]

[[routes]]
name = "split"
hosts = ["app.example.com"]
split = {{ stable = 90, canary = 10 }}

[[routes]]
name = "beta-users"
hosts = ["app.example.com"]
headers = {{ "x-beta" = {{ regex = "^(yes|1)$" }} }}
upstream = "canary"

[[routes]]
name = "debug-query"
hosts = ["app.example.com"]
query = {{ "debug" = "1" }}
upstream = "canary"

[[routes]]
name = "old"
hosts = ["app.example.com"]
path_prefix = "/old/"
redirect = {{ code = 301, scheme = "https", path = "/new/" }}

[[routes]]
name = "maintenance"
hosts = ["app.example.com"]
path = "/status"
respond = {{ status = 503, body = "down for maintenance\n", headers = {{ "retry-after" = "120" }} }}
"#,
        stable.addr, canary.addr
    );
    let (_plane, agent) = fleet_with(dir.path(), &cfg).await;
    let http = HttpClient::new();
    let url = format!("http://{}/", agent.proxy);

    let mut canary_hits = 0;
    for _ in 0..2_000 {
        let r = http.get(&url, Some("app.example.com")).await.unwrap();
        if r.json()["upstream"] == "canary" {
            canary_hits += 1;
        }
    }
    let share = canary_hits as f64 / 2_000.0;
    assert!(
        (share - 0.10).abs() <= 0.03,
        "canary share {share} is 10% within 3 points"
    );

    let with = |name: &str, value: &str| {
        http::Request::get(&url)
            .header("host", "app.example.com")
            .header(name, value)
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap()
    };
    for _ in 0..5 {
        assert_eq!(
            http.send(with("x-beta", "yes")).await.unwrap().json()["upstream"],
            "canary"
        );
    }
    let r = http
        .get(
            &format!("http://{}/?debug=1", agent.proxy),
            Some("app.example.com"),
        )
        .await
        .unwrap();
    assert_eq!(r.json()["upstream"], "canary");

    let r = http
        .get(
            &format!("http://{}/old/page?x=1", agent.proxy),
            Some("app.example.com"),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 301);
    assert_eq!(
        r.header("location"),
        Some("https://app.example.com/new/?x=1")
    );

    let r = http
        .get(
            &format!("http://{}/status", agent.proxy),
            Some("app.example.com"),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.text(), "down for maintenance\n");
    assert_eq!(r.header("retry-after"), Some("120"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_rewrite_request_rules_and_expect_100_continue() {
    let dir = tempfile::tempdir().unwrap();
    let up = TestUpstream::start("u").await;
    let cfg = format!(
        "[upstreams.u]\nendpoints = [\"{}\"]\n\n[[routes]]\nname = \"r\"\nhost_rewrite = \"internal.svc:8080\"\nupstream = \"u\"\nrequest_headers = {{ remove = [\"x-forwarded-proto\"], set = {{ \"x-request-id\" = \"set-by-rule\" }} }}\n",
        up.addr
    );
    let (_plane, agent) = fleet_with(dir.path(), &cfg).await;
    let r = HttpClient::new()
        .get(
            &format!("http://{}/", agent.proxy),
            Some("public.example.com"),
        )
        .await
        .unwrap();
    let j = r.json();
    assert_eq!(j["headers"]["host"], "internal.svc:8080");
    assert_eq!(j["headers"]["x-forwarded-host"], "public.example.com");
    // The route's rules act on the proxy's own fields too.
    assert_eq!(j["headers"]["x-forwarded-for"], "127.0.0.1");
    assert!(j["headers"].get("x-forwarded-proto").is_none(), "{j}");
    assert_eq!(j["headers"]["x-request-id"], "set-by-rule");

    // curl sends `Expect: 100-continue` for this body and waits for the 100 before sending it.
    let body = "x".repeat(2 * 1024 * 1024);
    let file = dir.path().join("body.bin");
    std::fs::write(&file, &body).unwrap();
    let out = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "20",
            "-H",
            "Expect: 100-continue",
            "-H",
            "Host: h",
            "--data-binary",
        ])
        .arg(format!("@{}", file.display()))
        .arg(format!("http://{}/upload", agent.proxy))
        .output()
        .await
        .expect("curl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), body.len().to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrored_requests_reach_the_shadow_without_affecting_clients() {
    let dir = tempfile::tempdir().unwrap();
    let (main, shadow) = (
        TestUpstream::start("main").await,
        TestUpstream::start("shadow").await,
    );
    let cfg = format!(
        "[upstreams.main]\nendpoints = [\"{}\"]\n[upstreams.shadow]\nendpoints = [\"{}\"]\n[upstreams.dead]\nendpoints = [\"{}\"]\n\n[[routes]]\nname = \"r\"\npath_prefix = \"/api/\"\nupstream = \"main\"\nmirror = {{ upstream = \"shadow\" }}\n\n[[routes]]\nname = \"to-dead\"\npath_prefix = \"/other/\"\nupstream = \"main\"\nmirror = {{ upstream = \"dead\", percent = 100 }}\n",
        main.addr,
        shadow.addr,
        refused_addr()
    );
    let (_plane, agent) = fleet_with(dir.path(), &cfg).await;
    let http = HttpClient::new();
    for i in 0..20 {
        let r = http
            .get(&format!("http://{}/api/{i}", agent.proxy), Some("h"))
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(
            r.json()["upstream"],
            "main",
            "the client gets the main upstream's answer"
        );
    }
    eventually(
        "all 20 copies reached the shadow",
        Duration::from_secs(10),
        || async { (shadow.hits.load(Ordering::Relaxed) == 20).then_some(()) },
    )
    .await;
    // A dead mirror never shows to clients.
    for _ in 0..5 {
        let r = http
            .get(&format!("http://{}/other/x", agent.proxy), Some("h"))
            .await
            .unwrap();
        assert_eq!(r.status, 200);
    }
    let m = http
        .get(&format!("http://{}/metrics", agent.admin), None)
        .await
        .unwrap()
        .text();
    assert!(m.contains("dispa_mirrored_requests_total 25"), "{m}");
}
