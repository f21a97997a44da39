#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! TLS end to end against the real binaries: SNI certificate selection with ALPN h2,
//! certificate rotation under a held keep-alive connection, mTLS, and upstream TLS with a
//! private CA. Certificates are made here with rcgen; `dispactl apply` uploads the PEM files
//! routes.toml names.

use std::path::Path;
use std::time::Duration;

use dispa_tests::tls::{Leaf, Pki, connect, negotiate, refusal};
use dispa_tests::*;

fn write(dir: &Path, name: &str, content: &str) {
    std::fs::write(dir.join(name), content).unwrap();
}

fn write_leaf(dir: &Path, stem: &str, leaf: &Leaf) {
    write(dir, &format!("{stem}.pem"), &leaf.cert_pem);
    write(dir, &format!("{stem}.key"), &leaf.key_pem);
}

/// Applies `config` (with the files beside it) and waits until the agent serves `version`.
async fn apply(plane: &PlaneProc, dir: &Path, config: &str, version: u64) {
    let f = write_config(dir, "routes.toml", config);
    ctl(&plane.url(), &["apply", "-f", &f]).await.ok();
    wait_synced(&plane.url(), &["edge"], version).await;
}

/// No private key's bytes in the agent's log.
fn assert_no_keys(agent: &AgentProc, leaves: &[&Leaf]) {
    let log = agent.log_text();
    for l in leaves {
        assert!(
            !log.contains(&l.key_body()),
            "private key bytes in the agent log"
        );
        // Nor any longer piece of one.
        for line in l.key_pem.lines().filter(|l| l.len() >= 40) {
            assert!(!log.contains(line), "a key PEM line in the agent log");
        }
    }
}

fn sites(upstream: &TestUpstream) -> String {
    format!(
        r#"
[upstreams.web]
endpoints = ["{}"]

[[routes]]
name = "all"
upstream = "web"

[certificates.a]
hosts = ["a.example.test"]
cert_file = "certs/a.pem"
key_file = "certs/a.key"

[certificates.b]
hosts = ["*.b.example.test"]
cert_file = "certs/b.pem"
key_file = "certs/b.key"
"#,
        upstream.addr
    )
}

/// A plane and a TLS agent serving [`sites`]: `a.example.test` and `*.b.example.test`, each
/// with its own certificate from one CA (files under `dir/certs`), applied as version 1.
struct Sites {
    pki: Pki,
    a: Leaf,
    b: Leaf,
    web: TestUpstream,
    plane: PlaneProc,
    agent: AgentProc,
}

impl Sites {
    async fn start(dir: &Path, ca: &str) -> Sites {
        let certs = dir.join("certs");
        std::fs::create_dir(&certs).unwrap();
        let pki = Pki::new(ca);
        let a = pki.leaf(&["a.example.test"]);
        let b = pki.leaf(&["*.b.example.test"]);
        write_leaf(&certs, "a", &a);
        write_leaf(&certs, "b", &b);
        let web = TestUpstream::start("web").await;
        let plane = PlaneProc::start(dir).await;
        let agent = AgentProc::start_tls(dir, &plane.url(), "edge").await;
        apply(&plane, dir, &sites(&web), 1).await;
        Sites {
            pki,
            a,
            b,
            web,
            plane,
            agent,
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sni_picks_each_hosts_certificate_and_alpn_negotiates_h2() {
    let dir = tempfile::tempdir().unwrap();
    let Sites {
        pki,
        a,
        b,
        web: _web,
        plane,
        agent,
    } = Sites::start(dir.path(), "sites CA").await;
    let tls_addr = agent.proxy_tls.unwrap();

    for (sni, leaf) in [("a.example.test", &a), ("x.b.example.test", &b)] {
        let mut conn = connect(tls_addr, sni, pki.roots(), None)
            .await
            .unwrap_or_else(|e| panic!("{sni}: {e}"));
        assert!(conn.peer_cert == leaf.der, "{sni}: wrong certificate");
        assert_eq!(conn.alpn.as_deref(), Some(&b"h2"[..]), "{sni}: ALPN");
        let r = conn.get(sni, "/hello").await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.version, http::Version::HTTP_2);
        let seen = r.json();
        assert_eq!(seen["upstream"], "web");
        assert_eq!(seen["headers"]["x-forwarded-proto"], "https");
    }
    // A name no entry lists, and no default: the handshake is refused.
    let e = connect(tls_addr, "other.example.test", pki.roots(), None).await;
    assert!(e.is_err(), "a handshake without a certificate succeeded");
    // The access log still records TLS requests, with their scheme.
    eventually(
        "https records in the plane's log store",
        Duration::from_secs(20),
        || async {
            let out = ctl(&plane.url(), &["logs", "-o", "json"]).await;
            (out.code == 0 && out.stdout.contains("https")).then_some(())
        },
    )
    .await;
    // The admin /config lists the certificates by name and hosts, the snapshot cache on disk
    // (it holds the keys) is readable by the agent's user only.
    let cfg = HttpClient::new()
        .get(&format!("http://{}/config", agent.admin), None)
        .await
        .unwrap()
        .json();
    assert_eq!(cfg["certificates"]["b"]["hosts"][0], "*.b.example.test");
    assert!(!cfg.to_string().contains(&a.key_body()));
    let mode = {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(dir.path().join("edge-cache/snapshot.pb"))
            .unwrap()
            .permissions()
            .mode()
    };
    assert_eq!(mode & 0o077, 0, "snapshot cache mode {mode:o}");
    assert_no_keys(&agent, &[&a, &b]);
}

#[tokio::test(flavor = "multi_thread")]
async fn rotation_keeps_open_connections_and_new_handshakes_get_the_new_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let Sites {
        pki,
        a: old,
        b,
        web,
        plane,
        agent,
    } = Sites::start(dir.path(), "rotation CA").await;
    let certs = dir.path().join("certs");
    let tls_addr = agent.proxy_tls.unwrap();

    let mut held = connect(tls_addr, "a.example.test", pki.roots(), None)
        .await
        .unwrap();
    assert!(held.peer_cert == old.der);
    assert_eq!(held.get("a.example.test", "/1").await.unwrap().status, 200);

    // Rotate: same config text, new files.
    let new = pki.leaf(&["a.example.test"]);
    write_leaf(&certs, "a", &new);
    apply(&plane, dir.path(), &sites(&web), 2).await;

    // The connection opened before the rotation keeps working.
    let r = held.get("a.example.test", "/2").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    // New handshakes see the new certificate.
    let fresh = connect(tls_addr, "a.example.test", pki.roots(), None)
        .await
        .unwrap();
    assert!(
        fresh.peer_cert == new.der,
        "new handshake got the old certificate"
    );
    assert!(fresh.peer_cert != old.der);
    assert_no_keys(&agent, &[&old, &new, &b]);
}

#[tokio::test(flavor = "multi_thread")]
async fn min_version_refuses_older_clients_and_failures_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("versions CA");
    let (modern, classic) = (
        pki.leaf(&["modern.example.test"]),
        pki.leaf(&["classic.example.test"]),
    );
    write_leaf(dir.path(), "modern", &modern);
    write_leaf(dir.path(), "classic", &classic);
    let web = TestUpstream::start("web").await;
    let plane = PlaneProc::start(dir.path()).await;
    let agent = AgentProc::start_tls(dir.path(), &plane.url(), "edge").await;
    let config = format!(
        r#"
[upstreams.web]
endpoints = ["{}"]

[[routes]]
name = "all"
upstream = "web"

[certificates.modern]
hosts = ["modern.example.test"]
cert_file = "modern.pem"
key_file = "modern.key"
min_version = "1.3"

[certificates.classic]
hosts = ["classic.example.test"]
cert_file = "classic.pem"
key_file = "classic.key"
"#,
        web.addr
    );
    apply(&plane, dir.path(), &config, 1).await;
    let addr = agent.proxy_tls.unwrap();
    let tls12: &[&'static rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];
    let tls13: &[&'static rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
    // A TLS 1.2-only client is refused by the 1.3-only host and served by the default one.
    let refused = negotiate(addr, "modern.example.test", pki.roots(), tls12).await;
    assert!(
        refused.is_err(),
        "TLS 1.2 accepted by a min_version 1.3 host"
    );
    assert_eq!(
        negotiate(addr, "modern.example.test", pki.roots(), tls13).await,
        Ok(rustls::ProtocolVersion::TLSv1_3)
    );
    assert_eq!(
        negotiate(addr, "classic.example.test", pki.roots(), tls12).await,
        Ok(rustls::ProtocolVersion::TLSv1_2)
    );
    // The refusal is counted.
    eventually(
        "a counted handshake failure",
        Duration::from_secs(10),
        || async {
            let text = agent.metrics_text().await?;
            let n = metric_value(&text, "dispa_tls_handshake_failures_total ")?;
            (n >= 1.0).then_some(())
        },
    )
    .await;
    assert_no_keys(&agent, &[&modern, &classic]);
}

#[tokio::test(flavor = "multi_thread")]
async fn mtls_host_requires_a_client_certificate_from_its_ca() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("server CA");
    let clients = Pki::new("client CA");
    let server = pki.leaf(&["mtls.example.test"]);
    write_leaf(dir.path(), "server", &server);
    write(dir.path(), "clients-ca.pem", &clients.ca_pem);
    let web = TestUpstream::start("web").await;
    let plane = PlaneProc::start(dir.path()).await;
    let agent = AgentProc::start_tls(dir.path(), &plane.url(), "edge").await;
    let config = format!(
        r#"
[upstreams.web]
endpoints = ["{}"]

[[routes]]
name = "all"
upstream = "web"

[certificates.m]
hosts = ["mtls.example.test"]
cert_file = "server.pem"
key_file = "server.key"
client_ca_file = "clients-ca.pem"
"#,
        web.addr
    );
    apply(&plane, dir.path(), &config, 1).await;
    let tls_addr = agent.proxy_tls.unwrap();

    // Without a client certificate: refused at the handshake.
    let why = refusal(tls_addr, "mtls.example.test", pki.roots(), None)
        .await
        .unwrap_or_else(|e| panic!("no client certificate: {e}"));
    assert!(why.contains("CertificateRequired"), "{why}");
    // A certificate from another CA is refused too.
    let stranger = Pki::new("other CA").leaf(&["client"]);
    let why = refusal(tls_addr, "mtls.example.test", pki.roots(), Some(&stranger))
        .await
        .unwrap_or_else(|e| panic!("a client certificate from an unknown CA: {e}"));
    assert!(why.contains("alert"), "{why}");
    assert_eq!(web.hits.load(std::sync::atomic::Ordering::Relaxed), 0);

    // With one signed by the configured CA it works.
    let good = clients.leaf(&["client"]);
    let mut c = connect(tls_addr, "mtls.example.test", pki.roots(), Some(&good))
        .await
        .unwrap();
    let r = c.get("mtls.example.test", "/").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_no_keys(&agent, &[&server, &good]);
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_tls_with_private_ca_and_sni_and_wrong_ca_gives_502() {
    let dir = tempfile::tempdir().unwrap();
    let upstream_ca = Pki::new("upstream CA");
    let other_ca = Pki::new("some other CA");
    // The certificate names only api.internal: verification passes only with that SNI.
    let leaf = upstream_ca.leaf(&["api.internal"]);
    let secure = TestUpstream::start_tls("secure", leaf.server_config(&[b"http/1.1"])).await;
    // Verified against its IP address (no sni, an IP endpoint), with health checks over TLS.
    let by_ip = upstream_ca.leaf(&["127.0.0.1"]);
    let ip_upstream = TestUpstream::start_tls("by-ip", by_ip.server_config(&[b"http/1.1"])).await;
    write(dir.path(), "upstream-ca.pem", &upstream_ca.ca_pem);
    write(dir.path(), "other-ca.pem", &other_ca.ca_pem);
    let config = format!(
        r#"
[upstreams.good]
endpoints = ["{addr}"]
tls = {{ sni = "api.internal", ca_file = "upstream-ca.pem" }}

[upstreams.wrong-ca]
endpoints = ["{addr}"]
tls = {{ sni = "api.internal", ca_file = "other-ca.pem" }}

[upstreams.insecure]
endpoints = ["{addr}"]
tls = {{ insecure_skip_verify = true }}

[[routes]]
name = "insecure"
hosts = ["insecure.test"]
upstream = "insecure"

[upstreams.by-ip]
endpoints = ["{ip_addr}"]
tls = {{ ca_file = "upstream-ca.pem" }}
health = {{ path = "/healthz", interval = "100ms", unhealthy = 1 }}

[[routes]]
name = "good"
hosts = ["good.test"]
upstream = "good"

[[routes]]
name = "by-ip"
hosts = ["ip.test"]
upstream = "by-ip"

[[routes]]
name = "wrong-ca"
hosts = ["wrong.test"]
upstream = "wrong-ca"
"#,
        addr = secure.addr,
        ip_addr = ip_upstream.addr,
    );
    let (plane, agent) = fleet_with(dir.path(), &config).await;
    let _ = &plane;
    let http = HttpClient::new();
    let url = format!("http://{}/through-tls", agent.proxy);

    let r = http.get(&url, Some("good.test")).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = r.json();
    assert_eq!(seen["upstream"], "secure");
    assert_eq!(seen["path"], "/through-tls");
    // Keep-alive: a second request reuses the pooled TLS connection and works too.
    assert_eq!(http.get(&url, Some("good.test")).await.unwrap().status, 200);

    // insecure_skip_verify connects to anything, and the agent says so loudly.
    let r = http.get(&url, Some("insecure.test")).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        agent
            .log_text()
            .lines()
            .any(|l| l.contains("WARN") && l.contains("INSECURE") && l.contains("insecure")),
        "no warning for insecure_skip_verify"
    );

    // Health checks reach the TLS endpoint (a failed one would take it down: 503).
    eventually("TLS health checks", Duration::from_secs(10), || async {
        (ip_upstream.hits.load(std::sync::atomic::Ordering::Relaxed) >= 5).then_some(())
    })
    .await;
    let r = http.get(&url, Some("ip.test")).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["upstream"], "by-ip");

    let r = http.get(&url, Some("wrong.test")).await.unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    let line = eventually(
        "the agent's log names the certificate verification failure",
        Duration::from_secs(10),
        || async {
            agent
                .log_text()
                .lines()
                .find(|l| l.contains("upstream request failed") && l.contains("wrong-ca"))
                .map(str::to_string)
        },
    )
    .await;
    assert!(
        line.contains("invalid peer certificate") && line.contains("UnknownIssuer"),
        "{line}"
    );
    assert_no_keys(&agent, &[&leaf, &by_ip]);
}
