#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Upstream failures end to end: health checks, outlier ejection and retries keep clients
//! from seeing a dying endpoint, and health state survives config pushes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use dispa_tests::*;

fn config(eps: &[std::net::SocketAddr], retries: u32, marker: &str) -> String {
    let list: Vec<String> = eps.iter().map(|e| format!("\"{e}\"")).collect();
    format!(
        r#"
[upstreams.u]
endpoints = [{}]
health = {{ path = "/healthz", interval = "200ms", timeout = "200ms", healthy = 2, unhealthy = 2 }}

[[routes]]
name = "r"
upstream = "u"
retries = {retries}
response_headers = {{ set = {{ "x-marker" = "{marker}" }} }}
"#,
        list.join(", ")
    )
}

/// Steady GET load until stopped; counts successes and failures.
fn steady_load(
    proxy: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let http = HttpClient::new();
        while !stop.load(Ordering::Relaxed) {
            match http.get(&format!("http://{proxy}/"), Some("h")).await {
                Ok(r) if r.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                other => {
                    eprintln!("client-visible failure: {other:?}");
                    failed.fetch_add(1, Ordering::Relaxed)
                }
            };
        }
    })
}

async fn health_of(http: &HttpClient, agent: &AgentProc, addr: std::net::SocketAddr) -> String {
    let cfg = http
        .get(&format!("http://{}/config", agent.admin), None)
        .await
        .unwrap()
        .json();
    cfg["health"]["u"][addr.to_string()]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dying_endpoint_is_invisible_to_clients_with_retries_and_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let ups = [
        TestUpstream::start("e0").await,
        TestUpstream::start("e1").await,
        TestUpstream::start("e2").await,
    ];
    let addrs: Vec<_> = ups.iter().map(|u| u.addr).collect();
    let plane = PlaneProc::start(dir.path()).await;
    let agent = AgentProc::start(dir.path(), &plane.url(), "edge").await;
    let f = write_config(dir.path(), "r.toml", &config(&addrs, 2, "a"));
    ctl(&plane.url(), &["apply", "-f", &f]).await.ok();
    wait_synced(&plane.url(), &["edge"], 1).await;

    let (stop, ok, failed) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let load = steady_load(agent.proxy, stop.clone(), ok.clone(), failed.clone());
    eventually("load flowing", Duration::from_secs(10), || async {
        (ok.load(Ordering::Relaxed) > 100).then_some(())
    })
    .await;

    // Kill e2 mid-load: retries hide it at once, health checks then take it out.
    let [e0, e1, e2] = ups;
    let dead = e2.addr;
    drop(e2);
    let http = HttpClient::new();
    eventually(
        "health checks mark the dead endpoint down",
        Duration::from_secs(10),
        || async { (health_of(&http, &agent, dead).await == "down").then_some(()) },
    )
    .await;
    let before = ok.load(Ordering::Relaxed);
    eventually(
        "more load after it went down",
        Duration::from_secs(10),
        || async { (ok.load(Ordering::Relaxed) > before + 200).then_some(()) },
    )
    .await;
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "no client-visible failure from the moment it died"
    );

    // The plane sees which endpoints the agent has down.
    eventually(
        "the agent reports the endpoint down",
        Duration::from_secs(20),
        || async {
            let a = ctl(&plane.url(), &["agents", "-o", "json"])
                .await
                .ok()
                .json();
            let down = a[0]["endpoints_down"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            down.iter()
                .any(|d| {
                    d.as_str()
                        .is_some_and(|d| d.contains(&dead.to_string()) && d.contains("down"))
                })
                .then_some(())
        },
    )
    .await;

    // Bring it back on the same address: it passes its checks and takes traffic again.
    let back = TestUpstream::start_at("e2", dead).await;
    eventually(
        "the endpoint is up and used again",
        Duration::from_secs(15),
        || async {
            (health_of(&http, &agent, dead).await == "up" && back.hits.load(Ordering::Relaxed) > 20)
                .then_some(())
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert_eq!(failed.load(Ordering::Relaxed), 0);
    drop((e0, e1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_retries_failures_stop_once_the_endpoint_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let ups = [
        TestUpstream::start("e0").await,
        TestUpstream::start("e1").await,
        TestUpstream::start("e2").await,
    ];
    let addrs: Vec<_> = ups.iter().map(|u| u.addr).collect();
    let plane = PlaneProc::start(dir.path()).await;
    let agent = AgentProc::start(dir.path(), &plane.url(), "edge").await;
    let f = write_config(dir.path(), "r.toml", &config(&addrs, 0, "a"));
    ctl(&plane.url(), &["apply", "-f", &f]).await.ok();
    wait_synced(&plane.url(), &["edge"], 1).await;
    let [e0, e1, e2] = ups;
    let dead = e2.addr;
    drop(e2);
    let http = HttpClient::new();
    eventually("marked down", Duration::from_secs(10), || async {
        (health_of(&http, &agent, dead).await != "up").then_some(())
    })
    .await;
    let (stop, ok, failed) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let load = steady_load(agent.proxy, stop.clone(), ok.clone(), failed.clone());
    eventually("300 requests", Duration::from_secs(20), || async {
        (ok.load(Ordering::Relaxed) >= 300).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "after the thresholds no request goes to the dead endpoint"
    );

    // All endpoints down: a fast 503 naming no internals.
    drop((e0, e1));
    eventually("all down", Duration::from_secs(10), || async {
        let mut all = true;
        for a in &addrs {
            all &= health_of(&http, &agent, *a).await != "up";
        }
        all.then_some(())
    })
    .await;
    let r = http
        .get(&format!("http://{}/", agent.proxy), Some("h"))
        .await
        .unwrap();
    // Answered without trying an endpoint: a connect attempt would have been a 502.
    assert_eq!(r.status, 503);
    assert_eq!(r.text(), "no healthy upstream endpoint\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_push_keeps_health_state_of_untouched_endpoints() {
    let dir = tempfile::tempdir().unwrap();
    let ups = [
        TestUpstream::start("e0").await,
        TestUpstream::start("e1").await,
    ];
    let addrs: Vec<_> = ups.iter().map(|u| u.addr).collect();
    let plane = PlaneProc::start(dir.path()).await;
    let agent = AgentProc::start(dir.path(), &plane.url(), "edge").await;
    let f = write_config(dir.path(), "r.toml", &config(&addrs, 0, "a"));
    ctl(&plane.url(), &["apply", "-f", &f]).await.ok();
    wait_synced(&plane.url(), &["edge"], 1).await;
    let [e0, e1] = ups;
    let dead = e1.addr;
    drop(e1);
    let http = HttpClient::new();
    eventually("marked down", Duration::from_secs(10), || async {
        (health_of(&http, &agent, dead).await == "down").then_some(())
    })
    .await;
    // A push that changes only the route: the dead endpoint stays down, with no request
    // sent to it to find out again.
    let f2 = write_config(dir.path(), "r2.toml", &config(&addrs, 0, "b"));
    ctl(&plane.url(), &["apply", "-f", &f2]).await.ok();
    wait_synced(&plane.url(), &["edge"], 2).await;
    assert_eq!(
        health_of(&http, &agent, dead).await,
        "down",
        "health survives the swap"
    );
    for _ in 0..50 {
        let r = http
            .get(&format!("http://{}/", agent.proxy), Some("h"))
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-marker"), Some("b"));
    }
    // The gauges are refreshed once a second.
    let down = format!("dispa_endpoint_healthy{{upstream=\"u\",endpoint=\"{dead}\"}} 0");
    let up = format!(
        "dispa_endpoint_healthy{{upstream=\"u\",endpoint=\"{}\"}} 1",
        e0.addr
    );
    eventually(
        "endpoint health gauges",
        Duration::from_secs(10),
        || async {
            let m = http
                .get(&format!("http://{}/metrics", agent.admin), None)
                .await
                .ok()?
                .text();
            (m.contains(&down) && m.contains(&up)).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_breaker_answers_503_beyond_max_requests() {
    let dir = tempfile::tempdir().unwrap();
    let up = TestUpstream::start("slow").await;
    let cfg = format!(
        "[upstreams.u]\nendpoints = [\"{}\"]\nmax_requests = 2\n\n[[routes]]\nname = \"r\"\ntimeout = \"20s\"\nupstream = \"u\"\n",
        up.addr
    );
    let (_plane, agent) = fleet_with(dir.path(), &cfg).await;
    let proxy = agent.proxy;
    let slow: Vec<_> = (0..2)
        .map(|_| {
            tokio::spawn(async move {
                HttpClient::new()
                    .get(&format!("http://{proxy}/?sleep_ms=2000"), Some("h"))
                    .await
            })
        })
        .collect();
    eventually(
        "two requests in flight",
        Duration::from_secs(10),
        || async { (up.hits.load(Ordering::Relaxed) == 2).then_some(()) },
    )
    .await;
    let r = HttpClient::new()
        .get(&format!("http://{proxy}/"), Some("h"))
        .await
        .unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(
        r.text(),
        "upstream overloaded: too many requests in flight\n"
    );
    for s in slow {
        assert_eq!(s.await.unwrap().unwrap().status, 200);
    }
    let r = HttpClient::new()
        .get(&format!("http://{proxy}/"), Some("h"))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "the circuit closes again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_breaker_queues_up_to_max_pending_then_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let up = TestUpstream::start("slow").await;
    let cfg = format!(
        "[upstreams.u]\nendpoints = [\"{}\"]\nmax_connections = 1\nmax_pending = 1\nidle_timeout = \"30s\"\n\n[[routes]]\nname = \"r\"\ntimeout = \"20s\"\nupstream = \"u\"\n",
        up.addr
    );
    let (_plane, agent) = fleet_with(dir.path(), &cfg).await;
    let proxy = agent.proxy;
    let slow = |ms: u64| {
        tokio::spawn(async move {
            HttpClient::new()
                .get(&format!("http://{proxy}/?sleep_ms={ms}"), Some("h"))
                .await
        })
    };
    let first = slow(1500);
    eventually(
        "one request on the connection",
        Duration::from_secs(10),
        || async { (up.hits.load(Ordering::Relaxed) == 1).then_some(()) },
    )
    .await;
    let queued = slow(10);
    // Let the second request reach the queue; it cannot reach the upstream yet.
    let m = eventually("one request waiting", Duration::from_secs(10), || async {
        let t = HttpClient::new()
            .get(&format!("http://{}/metrics", agent.admin), None)
            .await
            .ok()?
            .text();
        t.contains("dispa_requests_in_flight 2").then_some(t)
    })
    .await;
    drop(m);
    let r = HttpClient::new()
        .get(&format!("http://{proxy}/"), Some("h"))
        .await
        .unwrap();
    assert_eq!(r.status, 503, "a third request is refused at once");
    assert_eq!(first.await.unwrap().unwrap().status, 200);
    assert_eq!(
        queued.await.unwrap().unwrap().status,
        200,
        "the queued request ran once a slot freed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_idle_timeout_cuts_a_stalled_body_and_expect_status_is_honoured() {
    use http_body_util::BodyExt;
    let dir = tempfile::tempdir().unwrap();
    let up = TestUpstream::start("u").await;
    let cfg = format!(
        "[upstreams.u]\nendpoints = [\"{a}\"]\n[upstreams.picky]\nendpoints = [\"{a}\"]\nhealth = {{ path = \"/\", interval = \"200ms\", expect_status = [204] }}\n\n[[routes]]\nname = \"r\"\nhosts = [\"h\"]\nidle_timeout = \"300ms\"\nupstream = \"u\"\n\n[[routes]]\nname = \"p\"\nhosts = [\"picky\"]\nupstream = \"picky\"\n",
        a = up.addr
    );
    let (_plane, agent) = fleet_with(dir.path(), &cfg).await;

    let stream = tokio::net::TcpStream::connect(agent.proxy).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("/?bytes=200000&stall_ms=5000")
        .header("host", "h")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    // Without the idle timeout the body would arrive whole once the stall ends.
    let body = resp.into_body().collect().await;
    assert!(body.is_err(), "the stalled body is cut off");

    // The upstream answers 200 where 204 is expected: checks take it down.
    let http = HttpClient::new();
    eventually("picky endpoint down", Duration::from_secs(10), || async {
        let r = http
            .get(&format!("http://{}/", agent.proxy), Some("picky"))
            .await
            .ok()?;
        (r.status == 503).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_with_a_small_body_is_retried_on_another_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let up = TestUpstream::start("good").await;
    let cfg = format!(
        "[upstreams.u]\nendpoints = [\"{}\", \"{}\"]\noutlier = {{ consecutive_failures = 0 }}\n\n[[routes]]\nname = \"r\"\nupstream = \"u\"\nretries = 1\nretry_non_idempotent = true\n",
        refused_addr(),
        up.addr
    );
    let (_plane, agent) = fleet_with(dir.path(), &cfg).await;
    let http = HttpClient::new();
    for _ in 0..6 {
        let req = http::Request::post(format!("http://{}/upload", agent.proxy))
            .header("host", "h")
            .body(http_body_util::Full::new(bytes::Bytes::from(vec![
                b'p';
                10_000
            ])))
            .unwrap();
        let r = http.send(req).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.text(),
            "10000",
            "the retried request carried its whole body"
        );
    }
}
