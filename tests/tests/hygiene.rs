#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! A request path that can't be abused, against the real binaries over raw TCP: request
//! smuggling, slowloris, HTTP/2 rapid reset, path normalisation, body limits, PROXY protocol.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dispa_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn config(upstream: SocketAddr, extra: &str) -> String {
    format!(
        r#"
[upstreams.up]
endpoints = ["{upstream}"]

[[routes]]
name = "all"
upstream = "up"

[policy.limits]
header_timeout = "2s"
{extra}
"#
    )
}

/// Sends `raw` on a new connection and reads until the agent closes it (or 10 s pass).
/// Returns what was read and whether the connection ended.
async fn exchange(addr: SocketAddr, raw: &[u8]) -> (String, bool) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(raw).await.unwrap();
    let mut out = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

/// Each entry carries a second request that a parser disagreeing with ours would see.
const SMUGGLING: &[(&str, &str)] = &[
    (
        "CL.TE",
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 35\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nX: x",
    ),
    (
        "TE.CL",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n1e\r\nGET /smuggled HTTP/1.1\r\nX: x\r\n\r\n0\r\n\r\n",
    ),
    (
        "TE.TE second value",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: cow\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
    ),
    (
        "TE.TE repeated chunked",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
    ),
    (
        "TE list identity, chunked",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
    ),
    (
        "TE list gzip, chunked",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
    ),
    (
        "TE xchunked",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
    ),
    (
        "TE vertical tab",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
    ),
    (
        "TE on HTTP/1.0",
        "POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
    ),
    (
        "TE space before colon",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
    ),
    (
        "CL space before colon",
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length : 30\r\n\r\nGET /smuggled HTTP/1.1\r\nX: x\r\n\r\n",
    ),
    (
        "TE obs-fold",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: x\r\n chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
    ),
    (
        "obs-fold",
        "GET / HTTP/1.1\r\nHost: a\r\nX-A: a\r\n\tb\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
    ),
    (
        "bare LF in the head",
        "GET / HTTP/1.1\r\nHost: a\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
    ),
    (
        // Bodyless: the agent's own HTTP/1.1 path takes it, not hyper.
        "bare LF in a bodyless head",
        "GET / HTTP/1.1\r\nHost: a\nX-A: b\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
    ),
    (
        "bare CR in a bodyless head",
        "GET / HTTP/1.1\r\nHost: a\r\nX-A: a\rX-B: b\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
    ),
    (
        "bare CR in the head",
        "GET / HTTP/1.1\r\nHost: a\r\nX: a\rTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
    ),
    (
        "duplicate CL, equal",
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhelloGET /smuggled HTTP/1.1\r\n\r\n",
    ),
    (
        "duplicate CL, different",
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 35\r\n\r\nhelloGET /smuggled HTTP/1.1\r\nX: x\r\n\r\n",
    ),
    (
        "CL list",
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\nhelloGET /smuggled HTTP/1.1\r\n\r\n",
    ),
    (
        "CL 0x",
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x5\r\n\r\nhelloGET /smuggled HTTP/1.1\r\n\r\n",
    ),
    (
        "CL +",
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\nhelloGET /smuggled HTTP/1.1\r\n\r\n",
    ),
    (
        "CL negative",
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
    ),
    (
        "chunk size 0x",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
    ),
    (
        "chunk size +",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n+5\r\nhello\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
    ),
    (
        "chunk size not hex",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
    ),
    (
        "chunk size overflow",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000005\r\nhello\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
    ),
    (
        "bare LF in a chunk-size line",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
    ),
    (
        "bare LF after chunk data",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
    ),
    (
        "bare LF in a chunk extension",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;a\nb\r\nhello\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
    ),
    (
        "non-token method",
        "G(T / HTTP/1.1\r\nHost: a\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
    ),
    (
        "NUL in a header value",
        "GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_corpus_is_refused_with_400_and_close() {
    let dir = tempfile::tempdir().unwrap();
    let up = TestUpstream::start("up").await;
    let (_plane, agent) = fleet_with(dir.path(), &config(up.addr, "")).await;
    // A control: a well-formed chunked request goes through.
    let (resp, _) = exchange(
        agent.proxy,
        b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert_eq!(up.hits.load(Ordering::Relaxed), 1);
    assert!(SMUGGLING.len() >= 20);
    let mut failures = Vec::new();
    for (name, raw) in SMUGGLING {
        let before = up.hits.load(Ordering::Relaxed);
        let (resp, closed) = exchange(agent.proxy, raw.as_bytes()).await;
        let hits = up.hits.load(Ordering::Relaxed) - before;
        if !resp.starts_with("HTTP/1.1 400 ") || !closed || hits != 0 {
            failures.push(format!(
                "{name}: closed={closed} upstream hits={hits} response={:?}",
                resp.lines().next().unwrap_or("")
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let metrics = HttpClient::new()
        .get(&format!("http://{}/metrics", agent.admin), None)
        .await
        .unwrap()
        .text();
    assert!(
        metrics.contains("dispa_denied_requests_total{reason=\"length_and_chunked\"}"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_are_cut_and_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let up = TestUpstream::start("up").await;
    let (_plane, agent) = fleet_with(dir.path(), &config(up.addr, "")).await;
    const SLOW: usize = 500;
    let closed = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut slow = Vec::new();
    for _ in 0..SLOW {
        let (closed, addr) = (closed.clone(), agent.proxy);
        slow.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let head =
                b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
            let mut buf = [0u8; 256];
            for b in head.iter().cycle() {
                if s.write_all(std::slice::from_ref(b)).await.is_err() {
                    break;
                }
                // One byte a second; a read that ends means the agent closed the connection.
                let read = tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await;
                if let Ok(Ok(0) | Err(_)) = read {
                    break;
                }
            }
            closed.fetch_add(1, Ordering::Relaxed);
            started.elapsed()
        }));
    }
    // Meanwhile, other clients are served promptly.
    let http = HttpClient::new();
    for i in 0..20 {
        let t = Instant::now();
        let r = http
            .get(&format!("http://{}/ok/{i}", agent.proxy), Some("a"))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "slow: {:?}",
            t.elapsed()
        );
    }
    let mut latest = Duration::ZERO;
    for t in slow {
        let took = tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .expect("a slow connection was never closed")
            .unwrap();
        // Closed after the 2 s header timeout, not before.
        assert!(took >= Duration::from_millis(1500), "closed after {took:?}");
        latest = latest.max(took);
    }
    assert_eq!(closed.load(Ordering::Relaxed), SLOW);
    assert!(
        latest < Duration::from_secs(20),
        "last closed after {latest:?}"
    );
    let metrics = http
        .get(&format!("http://{}/metrics", agent.admin), None)
        .await
        .unwrap()
        .text();
    assert!(
        metrics.contains("dispa_connections_closed_total{reason=\"header_timeout\"} "),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_rapid_reset_gets_goaway_and_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let up = TestUpstream::start("up").await;
    let (_plane, agent) = fleet_with(dir.path(), &config(up.addr, "")).await;
    let tcp = TcpStream::connect(agent.proxy).await.unwrap();
    let (mut client, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut sent = 0;
    for _ in 0..20_000 {
        let Ok(c) = client.ready().await else { break };
        client = c;
        let req = http::Request::get(format!("http://{}/", agent.proxy))
            .body(())
            .unwrap();
        let Ok((_resp, mut stream)) = client.send_request(req, true) else {
            break;
        };
        stream.send_reset(h2::Reason::CANCEL);
        sent += 1;
        if conn.is_finished() {
            break;
        }
    }
    let ended = tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .expect("the abusive connection stayed open")
        .unwrap();
    let err = ended.expect_err("the connection ended without an error");
    // The agent sends GOAWAY ENHANCE_YOUR_CALM and closes. A client still writing resets may
    // hit the closed socket (broken pipe, reset) before it reads the GOAWAY: either way the
    // server cut the connection.
    let cut = (err.is_go_away() && err.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM))
        || err.get_io().is_some_and(|e| {
            matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            )
        });
    assert!(cut, "after {sent} resets: {err:?}");
    assert!(sent < 20_000, "never cut off");
    // Others are still served, over HTTP/2 and HTTP/1.1.
    let r = dispa_tests::http_client::h2c_get(agent.proxy, "a", "/after")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let r = HttpClient::new()
        .get(&format!("http://{}/after", agent.proxy), Some("a"))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_are_normalised_and_bodies_limited() {
    let dir = tempfile::tempdir().unwrap();
    let up = TestUpstream::start("up").await;
    let cfg = format!(
        r#"
[upstreams.up]
endpoints = ["{0}"]

[[routes]]
name = "strict"
path_prefix = "/strict/"
upstream = "up"
policy = {{ encoded_slashes = "reject", limits = {{ require_content_length = true }} }}

[[routes]]
name = "all"
upstream = "up"

[policy.limits]
max_body_bytes = 16
max_uri_bytes = 1024
"#,
        up.addr
    );
    let (_plane, agent) = fleet_with(dir.path(), &cfg).await;
    let http = HttpClient::new();
    let get = |path: &str| {
        let (http, url) = (http.clone(), format!("http://{}{path}", agent.proxy));
        async move { http.get(&url, Some("a")).await.unwrap() }
    };
    // Dot segments, merged slashes and encoded unreserved characters, as the upstream sees them.
    let r = get("/a//b/./c/../%7Ed/%2e%2E/e?x=/../y").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["path"], "/a/b/e");
    assert_eq!(r.json()["query"], "x=/../y");
    // `..` cannot climb into another route's prefix... and does reach the route it resolves to.
    let r = get("/x/../strict/a%2Fb").await;
    assert_eq!(r.status, 400, "{}", r.text());
    let r = get("/a%2fb").await;
    assert_eq!(r.json()["path"], "/a%2Fb");
    assert_eq!(get("/%zz").await.status, 400);
    assert_eq!(get(&format!("/{}", "a".repeat(2000))).await.status, 414);
    // Body limits: declared too large, streamed too large, and a required Content-Length.
    let (resp, closed) = exchange(
        agent.proxy,
        b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 17\r\n\r\n01234567890123456",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 413 "), "{resp}");
    assert!(closed);
    let (resp, _) = exchange(
        agent.proxy,
        b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n0123456789abcdef\r\n1\r\nx\r\n0\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 413 "), "{resp}");
    let (resp, _) = exchange(
        agent.proxy,
        b"POST /strict/upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 411 "), "{resp}");
    let (resp, _) = exchange(
        agent.proxy,
        b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 16\r\nConnection: close\r\n\r\n0123456789abcdef",
    )
    .await;
    assert!(
        resp.starts_with("HTTP/1.1 200 ") && resp.ends_with("16"),
        "{resp}"
    );
    // Headers the client names in Connection are not forwarded.
    let mut req = http::Request::get(format!("http://{}/h", agent.proxy))
        .header("host", "a")
        .header("connection", "x-secret")
        .header("x-secret", "1")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    req.headers_mut()
        .insert("x-kept", http::HeaderValue::from_static("1"));
    let r = http.send(req).await.unwrap();
    assert!(
        r.json()["headers"].get("x-secret").is_none(),
        "{}",
        r.text()
    );
    assert_eq!(r.json()["headers"]["x-kept"], "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limits_per_ip_refuse_and_count() {
    let dir = tempfile::tempdir().unwrap();
    let up = TestUpstream::start("up").await;
    let (_plane, agent) =
        fleet_with(dir.path(), &config(up.addr, "max_connections_per_ip = 2")).await;
    // Two keep-alive connections, each known to be counted once it has been answered.
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(agent.proxy).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 16];
        s.read_exact(&mut buf).await.unwrap();
        assert!(buf.starts_with(b"HTTP/1.1 200"));
        open.push(s);
    }
    // The third from the same IP is closed at once; another IP is not affected.
    let (resp, closed) = exchange(agent.proxy, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert!(closed && resp.is_empty(), "{resp}");
    let other = HttpClient::from_ip("127.0.0.2".parse().unwrap());
    let r = other
        .get(&format!("http://{}/", agent.proxy), Some("a"))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    drop(open);
    eventually("slots released", Duration::from_secs(10), || async {
        let (resp, _) = exchange(
            agent.proxy,
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        .await;
        resp.starts_with("HTTP/1.1 200").then_some(())
    })
    .await;
    let metrics = HttpClient::new()
        .get(&format!("http://{}/metrics", agent.admin), None)
        .await
        .unwrap()
        .text();
    assert!(
        metrics.contains("dispa_connections_refused_total{reason=\"max_connections_per_ip\"} "),
        "{metrics}"
    );
}

fn proxy_v2(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (SocketAddr::V4(s), SocketAddr::V4(d)) = (src, dst) else {
        panic!("v4 only")
    };
    let mut v = b"\r\n\r\n\x00\r\nQUIT\n".to_vec();
    v.extend_from_slice(&[0x21, 0x11, 0, 12 + 4]);
    v.extend_from_slice(&s.ip().octets());
    v.extend_from_slice(&d.ip().octets());
    v.extend_from_slice(&s.port().to_be_bytes());
    v.extend_from_slice(&d.port().to_be_bytes());
    v.extend_from_slice(&[0x04, 0x00, 0x01, 0x00]); // a NOOP TLV, skipped
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_from_trusted_peers_only() {
    let dir = tempfile::tempdir().unwrap();
    let up = TestUpstream::start("up").await;
    let plane = PlaneProc::start(dir.path()).await;
    let agent =
        AgentProc::start_with(dir.path(), &plane.url(), "edge", &["--proxy-protocol"]).await;
    let with_trust = |trusted: &str| {
        format!(
            r#"
[upstreams.up]
endpoints = ["{}"]

[[routes]]
name = "all"
upstream = "up"

[policy]
trusted_proxies = ["{trusted}"]

[policy.limits]
header_timeout = "2s"
"#,
            up.addr
        )
    };
    let f = write_config(dir.path(), "routes.toml", &with_trust("127.0.0.1/32"));
    ctl(&plane.url(), &["apply", "-f", &f]).await.ok();
    wait_synced(&plane.url(), &["edge"], 1).await;
    let dst: SocketAddr = "198.51.100.2:443".parse().unwrap();
    let xff = |resp: &str| {
        let body = resp.split("\r\n\r\n").nth(1).unwrap_or("");
        let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
        v["headers"]["x-forwarded-for"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    let (resp, _) = exchange(
        agent.proxy,
        b"PROXY TCP4 203.0.113.7 198.51.100.2 40000 443\r\nGET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(xff(&resp), "203.0.113.7", "{resp}");
    let mut raw = proxy_v2("203.0.113.9:40001".parse().unwrap(), dst);
    raw.extend_from_slice(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
    let (resp, _) = exchange(agent.proxy, &raw).await;
    assert_eq!(xff(&resp), "203.0.113.9", "{resp}");
    // Without a header, or with a broken one: closed, nothing served.
    let (resp, closed) = exchange(agent.proxy, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert!(closed && resp.is_empty(), "{resp}");
    // From a peer not in trusted_proxies: closed before anything is read.
    let f = write_config(dir.path(), "routes.toml", &with_trust("10.0.0.0/8"));
    ctl(&plane.url(), &["apply", "-f", &f]).await.ok();
    wait_synced(&plane.url(), &["edge"], 2).await;
    let (resp, closed) = exchange(
        agent.proxy,
        b"PROXY TCP4 203.0.113.7 198.51.100.2 40000 443\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    .await;
    assert!(closed && resp.is_empty(), "{resp}");
    let metrics = HttpClient::new()
        .get(&format!("http://{}/metrics", agent.admin), None)
        .await
        .unwrap()
        .text();
    for reason in ["untrusted", "malformed"] {
        assert!(
            metrics.contains(&format!(
                "dispa_proxy_protocol_rejected_total{{reason=\"{reason}\"}} "
            )),
            "{metrics}"
        );
    }
}

/// One HTTP/1.1 response read from `buf` at `at`: (status, lowercased head, body, next).
fn response_at(buf: &[u8], at: usize, head_request: bool) -> (u16, String, Vec<u8>, usize) {
    let end = at
        + buf[at..]
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a whole head")
        + 4;
    let head = String::from_utf8_lossy(&buf[at..end]).to_ascii_lowercase();
    let status: u16 = head[9..12].parse().unwrap();
    let header = |name: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(": ").map(str::to_string))
    };
    if head_request {
        return (status, head, Vec::new(), end);
    }
    if let Some(n) = header("content-length") {
        let n: usize = n.parse().unwrap();
        return (status, head, buf[end..end + n].to_vec(), end + n);
    }
    assert_eq!(
        header("transfer-encoding").as_deref(),
        Some("chunked"),
        "{head}"
    );
    let (mut body, mut i) = (Vec::new(), end);
    loop {
        let line_end = i + buf[i..].windows(2).position(|w| w == b"\r\n").unwrap();
        let size =
            usize::from_str_radix(std::str::from_utf8(&buf[i..line_end]).unwrap(), 16).unwrap();
        i = line_end + 2;
        if size == 0 {
            return (status, head, body, i + 2);
        }
        body.extend_from_slice(&buf[i..i + size]);
        i += size + 2;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_carries_pipelined_requests_with_and_without_bodies() {
    let dir = tempfile::tempdir().unwrap();
    let up = TestUpstream::start("up").await;
    let (_plane, agent) = fleet_with(dir.path(), &config(up.addr, "")).await;
    // Bodyless requests are served by the agent's own HTTP/1.1 path; the POST hands the
    // connection to hyper, which serves the rest. The client notices neither.
    let raw = concat!(
        "GET /one HTTP/1.1\r\nHost: a\r\n\r\n",
        "HEAD /two HTTP/1.1\r\nHost: a\r\n\r\n",
        "GET /?bytes=100000 HTTP/1.1\r\nHost: a\r\n\r\n",
        "POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
        "GET /after HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    let mut s = TcpStream::connect(agent.proxy).await.unwrap();
    s.write_all(raw.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("the agent closes after Connection: close")
        .unwrap();
    let (status, _, body, at) = response_at(&buf, 0, false);
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).contains("\"path\":\"/one\""));
    let (status, head, body, at) = response_at(&buf, at, true);
    assert_eq!(status, 200);
    assert!(
        body.is_empty() && head.contains("content-length: "),
        "{head}"
    );
    let (status, head, body, at) = response_at(&buf, at, false);
    assert_eq!(status, 200);
    assert!(
        head.contains("transfer-encoding: chunked"),
        "streamed: {head}"
    );
    assert_eq!(body, vec![b'x'; 100_000]);
    let (status, _, body, at) = response_at(&buf, at, false);
    assert_eq!((status, &body[..]), (200, &b"5"[..]));
    let (status, head, body, at) = response_at(&buf, at, false);
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).contains("\"path\":\"/after\""));
    assert!(head.contains("connection: close"), "{head}");
    assert_eq!(at, buf.len(), "nothing after the last response");

    // HTTP/1.0: closed after the response unless the client asks to keep it.
    let (text, closed) = exchange(agent.proxy, b"GET /ten HTTP/1.0\r\nHost: a\r\n\r\n").await;
    assert!(closed && text.starts_with("HTTP/1.1 200 "), "{text}");
    let mut s = TcpStream::connect(agent.proxy).await.unwrap();
    for i in 0..2 {
        s.write_all(b"GET /ka HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        let (status, head) = loop {
            let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "closed before response {i}");
            got.extend_from_slice(&chunk[..n]);
            if let Some(p) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&got[..p]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .expect("a length")
                    .parse()
                    .unwrap();
                if got.len() >= p + 4 + length {
                    break (response_at(&got, 0, false).0, head);
                }
            }
        };
        assert_eq!(status, 200);
        assert!(head.contains("connection: keep-alive"), "{head}");
    }
}
