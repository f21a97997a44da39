#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Plane + agents + dispactl end to end: apply, sync, rollback, NACK, plane outages, and
//! config pushes under load.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use dispa_tests::*;

fn two_host_config(api: [&TestUpstream; 2], web: [&TestUpstream; 2]) -> String {
    format!(
        r#"
[upstreams.api]
endpoints = ["{}", "{}"]

[upstreams.web]
endpoints = ["{}", "{}"]
connect_timeout = "1s"

[[routes]]
name = "api"
hosts = ["api.example.com"]
upstream = "api"

[[routes]]
name = "web"
hosts = ["*.example.org"]
path_prefix = "/"
upstream = "web"
"#,
        api[0].addr, api[1].addr, web[0].addr, web[1].addr
    )
}

async fn upstream_of(http: &HttpClient, agent: &AgentProc, host: &str, path: &str) -> String {
    let r = http
        .get(&format!("http://{}{path}", agent.proxy), Some(host))
        .await
        .expect("request");
    assert_eq!(r.status, 200, "{host}{path} via {}: {}", agent.id, r.text());
    r.json()["upstream"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_serve_two_hosts_round_robin() {
    let dir = tempfile::tempdir().unwrap();
    let (a1, a2, w1, w2) = (
        TestUpstream::start("api-1").await,
        TestUpstream::start("api-2").await,
        TestUpstream::start("web-1").await,
        TestUpstream::start("web-2").await,
    );
    let plane = PlaneProc::start(dir.path()).await;
    let agents = [
        AgentProc::start(dir.path(), &plane.url(), "edge-1").await,
        AgentProc::start(dir.path(), &plane.url(), "edge-2").await,
    ];
    let file = write_config(
        dir.path(),
        "routes.toml",
        &two_host_config([&a1, &a2], [&w1, &w2]),
    );
    let out = ctl(&plane.url(), &["apply", "-f", &file, "-m", "first"])
        .await
        .ok();
    assert!(out.stdout.contains("applied: version 1"), "{out:?}");
    wait_synced(&plane.url(), &["edge-1", "edge-2"], 1).await;

    let http = HttpClient::new();
    for agent in &agents {
        let mut seen: HashMap<String, u32> = HashMap::new();
        for _ in 0..8 {
            *seen
                .entry(upstream_of(&http, agent, "api.example.com", "/users").await)
                .or_default() += 1;
        }
        assert_eq!(
            seen.get("api-1"),
            Some(&4),
            "round robin over api endpoints via {}: {seen:?}",
            agent.id
        );
        assert_eq!(
            seen.get("api-2"),
            Some(&4),
            "round robin over api endpoints via {}: {seen:?}",
            agent.id
        );

        let mut seen: HashMap<String, u32> = HashMap::new();
        for host in [
            "a.example.org",
            "b.c.example.org",
            "A.EXAMPLE.ORG:80",
            "x.example.org",
        ] {
            *seen
                .entry(upstream_of(&http, agent, host, "/").await)
                .or_default() += 1;
        }
        assert_eq!(seen.get("web-1"), Some(&2), "{seen:?}");
        assert_eq!(seen.get("web-2"), Some(&2), "{seen:?}");

        // What the upstream saw: the client's Host, and X-Forwarded-* set by the agent.
        let r = http
            .get(
                &format!("http://{}/users?x=1", agent.proxy),
                Some("api.example.com"),
            )
            .await
            .unwrap();
        let j = r.json();
        assert_eq!(j["headers"]["host"], "api.example.com");
        assert_eq!(j["headers"]["x-forwarded-for"], "127.0.0.1");
        assert_eq!(j["headers"]["x-forwarded-host"], "api.example.com");
        assert_eq!(j["headers"]["x-forwarded-proto"], "http");
        assert_eq!(j["query"], "x=1");

        let r = http
            .get(&format!("http://{}/", agent.proxy), Some("example.org"))
            .await
            .unwrap();
        assert_eq!(r.status, 404);
        assert_eq!(r.text(), "no route for this request\n");
    }

    let status = ctl(&plane.url(), &["status", "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(status["version"], 1);
    assert_eq!(status["agents"], 2);
    assert_eq!(status["agents_synced"], 2);
    let agents_json = ctl(&plane.url(), &["agents", "-o", "json"])
        .await
        .ok()
        .json();
    for a in agents_json.as_array().unwrap() {
        assert_eq!(a["state"], "SYNCED");
        assert_eq!(a["acked_version"], 1);
        assert_eq!(a["labels"]["suite"], "e2e");
        assert!(
            a["last_seen"].as_str().is_some_and(|s| s.ends_with('Z')),
            "{a}"
        );
        assert_eq!(a["last_error"], "");
    }
    let table = ctl(&plane.url(), &["agents"]).await.ok();
    assert!(table.stdout.starts_with("ID"), "{table:?}");
    assert!(
        table.stdout.contains("edge-1") && table.stdout.contains("SYNCED"),
        "{table:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_file_is_rejected_and_nothing_changes() {
    let dir = tempfile::tempdir().unwrap();
    let up = TestUpstream::start("one").await;
    let plane = PlaneProc::start(dir.path()).await;
    let agent = AgentProc::start(dir.path(), &plane.url(), "edge").await;
    let good = format!(
        "[upstreams.u]\nendpoints = [\"{}\"]\n\n[[routes]]\nname = \"r\"\nupstream = \"u\"\n",
        up.addr
    );
    let file = write_config(dir.path(), "routes.toml", &good);
    ctl(&plane.url(), &["apply", "-f", &file]).await.ok();
    wait_synced(&plane.url(), &["edge"], 1).await;

    // Line 7, column 12 is the value of `upstream`.
    let bad = format!(
        "[upstreams.u]\nendpoints = [\"{}\"]\n\n[[routes]]\nname = \"r\"\nhosts = [\"a.example.com\"]\nupstream = \"nope\"\n",
        up.addr
    );
    let bad_file = write_config(dir.path(), "bad.toml", &bad);
    let expected = format!("{bad_file}:7:12: routes[0].upstream: unknown upstream \"nope\"");
    let v = ctl(&plane.url(), &["validate", "-f", &bad_file]).await;
    assert_eq!(v.code, 1, "{v:?}");
    assert!(v.stderr.contains(&expected), "validate: {v:?}");
    let a = ctl(&plane.url(), &["apply", "-f", &bad_file]).await;
    assert_eq!(a.code, 1, "{a:?}");
    assert!(a.stderr.contains(&expected), "apply: {a:?}");
    assert!(a.stderr.contains("nothing was stored"), "{a:?}");

    // An unknown key and a syntax error are positioned too.
    let typo = write_config(
        dir.path(),
        "typo.toml",
        "[upstreams.u]\nendpoints = [\"127.0.0.1:1\"]\nconect_timeout = \"1s\"\n",
    );
    let t = ctl(&plane.url(), &["apply", "-f", &typo]).await;
    assert_eq!(t.code, 1);
    assert!(
        t.stderr.contains(&format!("{typo}:3:1:")) && t.stderr.contains("conect_timeout"),
        "{t:?}"
    );
    let v = ctl(&plane.url(), &["validate", "-f", &file]).await.ok();
    assert!(v.stdout.contains("valid"), "{v:?}");

    let history = ctl(&plane.url(), &["history", "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(
        history.as_array().unwrap().len(),
        1,
        "nothing stored: {history}"
    );
    let http = HttpClient::new();
    let r = http
        .get(&format!("http://{}/", agent.proxy), Some("anything"))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    wait_synced(&plane.url(), &["edge"], 1).await;

    // Usage errors exit 2.
    let u = ctl(&plane.url(), &["apply"]).await;
    assert_eq!(u.code, 2, "{u:?}");
}

fn header_config(up: &TestUpstream, value: &str) -> String {
    format!(
        "[upstreams.u]\nendpoints = [\"{}\"]\n\n[[routes]]\nname = \"r\"\nupstream = \"u\"\nrequest_headers = {{ set = {{ \"x-cfg\" = \"{value}\" }} }}\nresponse_headers = {{ set = {{ \"x-cfg\" = \"{value}\" }} }}\n",
        up.addr
    )
}

async fn cfg_header(http: &HttpClient, agent: &AgentProc) -> Option<String> {
    let r = http
        .get(&format!("http://{}/", agent.proxy), Some("h"))
        .await
        .ok()?;
    r.header("x-cfg").map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_restores_old_behaviour_as_a_new_version() {
    let dir = tempfile::tempdir().unwrap();
    let up = TestUpstream::start("u").await;
    let plane = PlaneProc::start(dir.path()).await;
    let agents = [
        AgentProc::start(dir.path(), &plane.url(), "a").await,
        AgentProc::start(dir.path(), &plane.url(), "b").await,
    ];
    let f1 = write_config(dir.path(), "one.toml", &header_config(&up, "one"));
    let f2 = write_config(dir.path(), "two.toml", &header_config(&up, "two"));
    ctl(&plane.url(), &["apply", "-f", &f1]).await.ok();
    ctl(&plane.url(), &["apply", "-f", &f2, "-m", "second"])
        .await
        .ok();
    wait_synced(&plane.url(), &["a", "b"], 2).await;
    let http = HttpClient::new();
    for a in &agents {
        assert_eq!(cfg_header(&http, a).await.as_deref(), Some("two"));
    }
    let d = ctl(&plane.url(), &["diff", "--from", "1", "--to", "2"])
        .await
        .ok();
    assert!(
        d.stdout
            .contains("-request_headers = { set = { \"x-cfg\" = \"one\" } }"),
        "{d:?}"
    );

    let rb = ctl(&plane.url(), &["rollback", "1", "-m", "bad release"])
        .await
        .ok();
    assert!(rb.stdout.contains("version 3"), "{rb:?}");
    wait_synced(&plane.url(), &["a", "b"], 3).await;
    for a in &agents {
        assert_eq!(cfg_header(&http, a).await.as_deref(), Some("one"));
    }
    let h = ctl(&plane.url(), &["history", "-o", "json"])
        .await
        .ok()
        .json();
    let h = h.as_array().unwrap();
    assert_eq!(h.len(), 3);
    assert_eq!(h[0]["version"], 3);
    assert_eq!(h[0]["rollback_of"], 1);
    assert_eq!(h[0]["message"], "rollback to version 1: bad release");
    assert_eq!(h[0]["hash"], h[2]["hash"], "same content, same hash");
    let got = ctl(&plane.url(), &["get"]).await.ok();
    assert_eq!(got.stdout, header_config(&up, "one"));
    let got2 = ctl(&plane.url(), &["get", "--version", "2", "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(got2["content"], header_config(&up, "two"));
    let missing = ctl(&plane.url(), &["rollback", "42"]).await;
    assert_eq!(missing.code, 1);
    assert!(
        missing.stderr.contains("version 42 does not exist"),
        "{missing:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_snapshot_is_nacked_and_previous_version_kept() {
    let dir = tempfile::tempdir().unwrap();
    let up = TestUpstream::start("u").await;
    let plane = PlaneProc::start(dir.path()).await;
    let agent = AgentProc::start(dir.path(), &plane.url(), "edge").await;
    let f1 = write_config(dir.path(), "one.toml", &header_config(&up, "one"));
    ctl(&plane.url(), &["apply", "-f", &f1]).await.ok();
    wait_synced(&plane.url(), &["edge"], 1).await;

    // Valid for the plane (a DNS name), unusable for the agent (it does not resolve).
    let bad = header_config(&up, "two").replace(&up.addr.to_string(), "no-such-host.invalid:8080");
    let f2 = write_config(dir.path(), "two.toml", &bad);
    ctl(&plane.url(), &["apply", "-f", &f2]).await.ok();
    let (_, _, acked, err) =
        eventually("agent NACKs version 2", Duration::from_secs(30), || async {
            agent_states(&plane.url())
                .await
                .into_iter()
                .find(|(id, state, _, _)| id == "edge" && state == "NACKED")
        })
        .await;
    assert_eq!(acked, 1);
    assert!(
        err.contains("no-such-host.invalid:8080") && err.contains("cannot resolve"),
        "{err}"
    );
    let table = ctl(&plane.url(), &["agents"]).await.ok();
    assert!(
        table.stdout.contains("NACKED") && table.stdout.contains("no-such-host.invalid"),
        "{table:?}"
    );

    let http = HttpClient::new();
    assert_eq!(cfg_header(&http, &agent).await.as_deref(), Some("one"));
    assert_eq!(agent.served_version(&http).await, Some(1));
    let status = ctl(&plane.url(), &["status", "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(status["agents_nacked"], 1);

    // A fixed config is picked up.
    let f3 = write_config(dir.path(), "three.toml", &header_config(&up, "three"));
    ctl(&plane.url(), &["apply", "-f", &f3]).await.ok();
    wait_synced(&plane.url(), &["edge"], 3).await;
    assert_eq!(cfg_header(&http, &agent).await.as_deref(), Some("three"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_survive_plane_outage_and_their_own_restart() {
    let dir = tempfile::tempdir().unwrap();
    let up = TestUpstream::start("u").await;
    let mut plane = PlaneProc::start(dir.path()).await;
    let plane_url = plane.url();
    let a = AgentProc::start(dir.path(), &plane_url, "a").await;
    let mut b = AgentProc::start(dir.path(), &plane_url, "b").await;
    let f1 = write_config(dir.path(), "one.toml", &header_config(&up, "one"));
    ctl(&plane_url, &["apply", "-f", &f1]).await.ok();
    wait_synced(&plane_url, &["a", "b"], 1).await;

    plane.kill().await;
    let http = HttpClient::new();
    for agent in [&a, &b] {
        assert_eq!(
            cfg_header(&http, agent).await.as_deref(),
            Some("one"),
            "{} keeps serving",
            agent.id
        );
    }
    let down = ctl(&plane_url, &["status"]).await;
    assert_eq!(down.code, 1);
    assert!(down.stderr.contains("cannot reach the plane"), "{down:?}");

    // Restart b while the plane is down: it serves its cached snapshot.
    b.kill().await;
    let b = AgentProc::start(dir.path(), &plane_url, "b").await;
    assert_eq!(cfg_header(&http, &b).await.as_deref(), Some("one"));
    assert_eq!(b.served_version(&http).await, Some(1));
    let ready = http
        .get(&format!("http://{}/readyz", b.admin), None)
        .await
        .unwrap();
    assert_eq!(ready.status, 200);

    // The plane comes back on the same address; both agents reconnect on their own.
    let plane = PlaneProc::start_at(dir.path(), plane.addr).await;
    wait_synced(&plane.url(), &["a", "b"], 1).await;
    let f2 = write_config(dir.path(), "two.toml", &header_config(&up, "two"));
    ctl(&plane.url(), &["apply", "-f", &f2]).await.ok();
    wait_synced(&plane.url(), &["a", "b"], 2).await;
    for agent in [&a, &b] {
        assert_eq!(cfg_header(&http, agent).await.as_deref(), Some("two"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_applies_under_load_never_mix_versions() {
    let dir = tempfile::tempdir().unwrap();
    let up = TestUpstream::start("u").await;
    let plane = PlaneProc::start(dir.path()).await;
    let agent = Arc::new(AgentProc::start(dir.path(), &plane.url(), "edge").await);
    let f0 = write_config(dir.path(), "v0.toml", &header_config(&up, "v0"));
    ctl(&plane.url(), &["apply", "-f", &f0]).await.ok();
    wait_synced(&plane.url(), &["edge"], 1).await;

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed, mixed) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let mut load = Vec::new();
    for _ in 0..2 {
        let (stop, ok, failed, mixed, agent) = (
            stop.clone(),
            ok.clone(),
            failed.clone(),
            mixed.clone(),
            agent.clone(),
        );
        load.push(tokio::spawn(async move {
            let http = HttpClient::new();
            let mut seen = std::collections::BTreeSet::new();
            while !stop.load(Ordering::Relaxed) {
                match http
                    .get(&format!("http://{}/", agent.proxy), Some("h"))
                    .await
                {
                    Ok(r) if r.status == 200 => {
                        // The request header the upstream saw and the response header the
                        // client got were both set by the route: they must be one version's.
                        let sent = r.json()["headers"]["x-cfg"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string();
                        let got = r.header("x-cfg").unwrap_or_default().to_string();
                        if sent != got {
                            mixed.fetch_add(1, Ordering::Relaxed);
                        }
                        seen.insert(got);
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    other => {
                        eprintln!("failed request: {other:?}");
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            seen
        }));
    }
    for i in 1..=20 {
        let f = write_config(
            dir.path(),
            &format!("v{i}.toml"),
            &header_config(&up, &format!("v{i}")),
        );
        ctl(
            &plane.url(),
            &["apply", "-f", &f, "-m", &format!("push {i}")],
        )
        .await
        .ok();
    }
    wait_synced(&plane.url(), &["edge"], 21).await;
    let http = HttpClient::new();
    assert_eq!(cfg_header(&http, &agent).await.as_deref(), Some("v20"));
    stop.store(true, Ordering::Relaxed);
    let mut versions_seen = std::collections::BTreeSet::new();
    for l in load {
        versions_seen.extend(l.await.unwrap());
    }
    let (ok, failed, mixed) = (
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        mixed.load(Ordering::Relaxed),
    );
    assert!(ok > 50, "too little load to mean anything: {ok}");
    assert_eq!(failed, 0, "failed responses during applies");
    assert_eq!(mixed, 0, "responses that mixed two versions");
    assert!(
        versions_seen.len() >= 2,
        "load should span several versions: {versions_seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_expect_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let up = TestUpstream::start("u").await;
    let plane = PlaneProc::start(dir.path()).await;
    let f1 = write_config(dir.path(), "one.toml", &header_config(&up, "one"));
    let f2 = write_config(dir.path(), "two.toml", &header_config(&up, "two"));
    let f3 = write_config(dir.path(), "three.toml", &header_config(&up, "three"));
    ctl(&plane.url(), &["apply", "-f", &f1, "--expect-version", "0"])
        .await
        .ok();
    ctl(&plane.url(), &["apply", "-f", &f2, "--expect-version", "1"])
        .await
        .ok();
    let stale = ctl(&plane.url(), &["apply", "-f", &f3, "--expect-version", "1"]).await;
    assert_eq!(stale.code, 1, "{stale:?}");
    assert!(
        stale
            .stderr
            .contains("expected the current version to be 1, it is 2"),
        "{stale:?}"
    );
    let dry = ctl(
        &plane.url(),
        &["apply", "-f", &f3, "--dry-run", "-o", "json"],
    )
    .await
    .ok()
    .json();
    assert_eq!(dry["created"], false);
    assert!(
        dry["diff"]
            .as_str()
            .unwrap()
            .contains("+request_headers = { set = { \"x-cfg\" = \"three\" } }")
    );
    let diff = ctl(&plane.url(), &["diff", "-f", &f3]).await.ok();
    assert!(diff.stdout.contains("\"three\""), "{diff:?}");
    let h = ctl(&plane.url(), &["history", "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(
        h.as_array().unwrap().len(),
        2,
        "nothing stored by the stale or dry-run apply"
    );
    let same = ctl(&plane.url(), &["apply", "-f", &f2]).await.ok();
    assert!(same.stdout.contains("unchanged"), "{same:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plane_exits_zero_on_sigterm_with_agents_and_followers_connected() {
    let dir = tempfile::tempdir().unwrap();
    let mut plane = PlaneProc::start(dir.path()).await;
    let _agent = AgentProc::start(dir.path(), &plane.url(), "a").await;
    let up = TestUpstream::start("u").await;
    let f = write_config(dir.path(), "one.toml", &header_config(&up, "one"));
    ctl(&plane.url(), &["apply", "-f", &f]).await.ok();
    wait_synced(&plane.url(), &["a"], 1).await;
    let mut follow = tokio::process::Command::new(dispa_tests::process::bin("dispactl"))
        .args(["--plane", &plane.url(), "logs", "--follow"])
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    if let Some(pid) = plane.child.id() {
        let _ = tokio::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await;
    }
    let status = tokio::time::timeout(Duration::from_secs(20), plane.child.wait())
        .await
        .expect("plane exits")
        .unwrap();
    assert_eq!(status.code(), Some(0), "{}", plane.log_text());
    tokio::time::timeout(Duration::from_secs(10), follow.wait())
        .await
        .expect("the follow ends with the plane")
        .unwrap();
}
