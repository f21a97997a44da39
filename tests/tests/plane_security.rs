#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The plane's own security, end to end: `--auth` with role tokens, agent join tokens and
//! client certificates, gRPC over TLS, and the audit log that records every case.

use std::path::Path;
use std::time::Duration;

use dispa_tests::tls::Pki;
use dispa_tests::*;
use serde_json::Value;

/// `dispactl --token TOKEN ARGS...`.
async fn ctl_as(plane: &str, token: &str, args: &[&str]) -> CtlOutput {
    let mut all = vec!["--token", token];
    all.extend_from_slice(args);
    ctl(plane, &all).await
}

async fn create_token(plane: &str, admin: &str, role: &str) -> String {
    let out = ctl_as(
        plane,
        admin,
        &["token", "create", "--role", role, "--name", role],
    )
    .await
    .ok();
    let token = out.stdout.trim().to_string();
    assert!(token.starts_with("dsp_"), "{out:?}");
    token
}

/// The agent ids the plane reports as SYNCED at `version`.
async fn synced(plane: &str, token: &str, version: u64) -> Vec<String> {
    let out = ctl_as(plane, token, &["agents", "-o", "json"]).await.ok();
    out.json()
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["state"] == "SYNCED" && a["acked_version"] == version)
        .map(|a| a["id"].as_str().unwrap().to_string())
        .collect()
}

/// A plane with `--auth`, and its bootstrap admin token.
async fn auth_plane(dir: &Path) -> (PlaneProc, String) {
    let token_file = dir.join("admin.token");
    let plane = PlaneProc::start_with(
        dir,
        "127.0.0.1:0".parse().unwrap(),
        &[
            "--auth",
            "--bootstrap-token-file",
            token_file.to_str().unwrap(),
        ],
    )
    .await;
    let admin = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_string();
    assert!(admin.starts_with("dsp_"));
    (plane, admin)
}

fn config(upstream: &TestUpstream) -> String {
    format!(
        "[upstreams.app]\nendpoints = [\"{}\"]\n\n[[routes]]\nname = \"all\"\nhosts = [\"*\"]\nupstream = \"app\"\n",
        upstream.addr
    )
}

/// (action, outcome, who-prefix) rows of `dispactl audit`, newest first.
async fn audit(plane: &str, token: &str) -> Vec<Value> {
    ctl_as(plane, token, &["audit", "--limit", "1000", "-o", "json"])
        .await
        .ok()
        .json()
        .as_array()
        .unwrap()
        .clone()
}

fn has(entries: &[Value], action: &str, outcome: &str, role: &str) -> bool {
    entries
        .iter()
        .any(|e| e["action"] == action && e["outcome"] == outcome && e["role"] == role)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_roles_join_tokens_and_audit() {
    let dir = tempfile::tempdir().unwrap();
    let (plane, admin) = auth_plane(dir.path()).await;
    let url = plane.url();

    // No token: refused, with a message that says what to do.
    let out = ctl(&url, &["status"]).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("requires a token"), "{out:?}");
    let out = ctl_as(&url, "dsp_000000000000_nonsense", &["status"]).await;
    assert!(out.stderr.contains("not valid"), "{out:?}");

    let viewer = create_token(&url, &admin, "viewer").await;
    let operator = create_token(&url, &admin, "operator").await;
    let join = create_token(&url, &admin, "agent").await;

    let app = TestUpstream::start("app").await;
    let file = write_config(dir.path(), "routes.toml", &config(&app));
    // Viewer reads but cannot apply; operator applies; operator cannot make tokens.
    let out = ctl_as(&url, &viewer, &["apply", "-f", &file]).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("role viewer may not call Apply"),
        "{out:?}"
    );
    ctl_as(&url, &operator, &["apply", "-f", &file, "-m", "first"])
        .await
        .ok();
    let got = ctl_as(&url, &viewer, &["get"]).await.ok();
    assert!(got.stdout.contains("[upstreams.app]"), "{got:?}");
    let out = ctl_as(&url, &viewer, &["get", "--show-secrets"]).await;
    assert_eq!(out.code, 1, "{out:?}");
    let out = ctl_as(&url, &operator, &["token", "create", "--role", "admin"]).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("needs admin"), "{out:?}");
    // An operator token is not a join token.
    let out = ctl_as(&url, &join, &["status"]).await;
    assert_eq!(out.code, 1, "{out:?}");

    // Agents: none, a wrong-role token, and a join token. Only the last one streams config.
    let bare = AgentProc::start(dir.path(), &url, "bare").await;
    let wrong = AgentProc::start_with(dir.path(), &url, "wrong", &["--join-token", &viewer]).await;
    let good = AgentProc::start_with(dir.path(), &url, "good", &["--join-token", &join]).await;
    eventually(
        "the joined agent syncs",
        Duration::from_secs(30),
        || async {
            synced(&url, &viewer, 1)
                .await
                .contains(&"good".to_string())
                .then_some(())
        },
    )
    .await;
    let http = HttpClient::new();
    let r = http
        .get(&format!("http://{}/", good.proxy), Some("x.test"))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    for (agent, why) in [(&bare, "requires a token"), (&wrong, "is for agents")] {
        eventually(
            &format!("agent {} logs its refusal", agent.id),
            Duration::from_secs(30),
            || async { agent.log_text().contains(why).then_some(()) },
        )
        .await;
        let r = http
            .get(&format!("http://{}/", agent.proxy), Some("x.test"))
            .await
            .unwrap();
        assert_eq!(r.status, 503, "{} has no config", agent.id);
    }
    let out = ctl_as(&url, &viewer, &["agents", "-o", "json"]).await.ok();
    let ids: Vec<String> = out
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["good"], "refused agents are not registered");

    // Revoked tokens stop working.
    let list = ctl_as(&url, &admin, &["token", "list", "-o", "json"])
        .await
        .ok();
    let viewer_id = list
        .json()
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "viewer")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    ctl_as(&url, &admin, &["token", "revoke", &viewer_id])
        .await
        .ok();
    let out = ctl_as(&url, &viewer, &["status"]).await;
    assert_eq!(out.code, 1, "{out:?}");
    ctl_as(&url, &operator, &["rollback", "1", "-m", "again"])
        .await
        .ok();

    // Every case is in the audit log.
    let entries = audit(&url, &operator).await;
    for (action, outcome, role) in [
        ("Status", "denied", ""),
        ("CreateToken", "ok", "admin"),
        ("Apply", "denied", "viewer"),
        ("Apply", "ok", "operator"),
        ("Get --show-secrets", "denied", "viewer"),
        ("CreateToken", "denied", "operator"),
        ("Status", "denied", "agent"),
        ("ConfigDiscovery/Stream", "denied", ""),
        ("ConfigDiscovery/Stream", "denied", "viewer"),
        ("RevokeToken", "ok", "admin"),
        ("Rollback", "ok", "operator"),
    ] {
        assert!(
            has(&entries, action, outcome, role),
            "no audit entry {action}/{outcome}/{role:?} in {entries:#?}"
        );
    }
    let apply = entries
        .iter()
        .find(|e| e["action"] == "Apply" && e["outcome"] == "ok")
        .unwrap();
    assert_eq!(
        (apply["from_version"].as_u64(), apply["to_version"].as_u64()),
        (Some(0), Some(1))
    );
    assert_eq!(apply["message"], "first");
    assert!(apply["who"].as_str().unwrap().starts_with("operator ("));
    assert!(apply["peer"].as_str().unwrap().starts_with("127.0.0.1:"));

    // The bootstrap token is printed once and never logged again; tokens are stored hashed.
    let log = plane.log_text();
    assert_eq!(log.matches(&admin).count(), 1, "{log}");
    for t in [&viewer, &operator, &join] {
        assert!(
            !log.contains(t.as_str()),
            "a token leaked into the plane log"
        );
        assert!(!dir_contains(&plane.data_dir, t.as_bytes()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plane_over_tls_with_agent_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let server_ca = Pki::new("plane CA");
    let agent_ca = Pki::new("agent CA");
    let rogue_ca = Pki::new("rogue CA");
    let server = server_ca.leaf(&["127.0.0.1", "localhost"]);
    let good = agent_ca.leaf(&["edge-good"]);
    let rogue = rogue_ca.leaf(&["edge-rogue"]);
    let p = |name: &str, pem: &str| {
        let path = d.join(name);
        std::fs::write(&path, pem).unwrap();
        path.display().to_string()
    };
    let (ca, cert, key) = (
        p("server-ca.pem", &server_ca.ca_pem),
        p("plane.pem", &server.cert_pem),
        p("plane.key", &server.key_pem),
    );
    let agent_ca_file = p("agent-ca.pem", &agent_ca.ca_pem);
    let token_file = d.join("admin.token");
    let plane = PlaneProc::start_with(
        d,
        "127.0.0.1:0".parse().unwrap(),
        &[
            "--auth",
            "--bootstrap-token-file",
            token_file.to_str().unwrap(),
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--client-ca",
            &agent_ca_file,
        ],
    )
    .await;
    let url = format!("https://{}", plane.addr);
    let admin = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_string();

    // dispactl verifies the plane with --ca-file; without it, or over plain HTTP, no luck.
    let out = ctl_as(&url, &admin, &["--ca-file", &ca, "status"])
        .await
        .ok();
    assert!(out.stdout.contains("version"), "{out:?}");
    let out = ctl_as(&url, &admin, &["status"]).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("--ca-file"), "{out:?}");
    let out = ctl_as(&url, &admin, &["--ca-file", &agent_ca_file, "status"]).await;
    assert_eq!(
        out.code, 1,
        "a plane certificate from another CA is refused: {out:?}"
    );

    let app = TestUpstream::start("app").await;
    let file = write_config(d, "routes.toml", &config(&app));
    ctl_as(&url, &admin, &["--ca-file", &ca, "apply", "-f", &file])
        .await
        .ok();

    // An agent with a certificate from the agent CA joins without a token; one from
    // another CA does not.
    let agent_args = |cert: String, key: String| {
        vec![
            "--plane-ca".to_string(),
            ca.clone(),
            "--plane-cert".to_string(),
            cert,
            "--plane-key".to_string(),
            key,
        ]
    };
    let good_args = agent_args(p("good.pem", &good.cert_pem), p("good.key", &good.key_pem));
    let rogue_args = agent_args(
        p("rogue.pem", &rogue.cert_pem),
        p("rogue.key", &rogue.key_pem),
    );
    let good_args: Vec<&str> = good_args.iter().map(String::as_str).collect();
    let rogue_args: Vec<&str> = rogue_args.iter().map(String::as_str).collect();
    let good_agent = AgentProc::start_with(d, &url, "good", &good_args).await;
    let rogue_agent = AgentProc::start_with(d, &url, "rogue", &rogue_args).await;
    eventually(
        "the agent with a good certificate syncs",
        Duration::from_secs(30),
        || async {
            let out = ctl_as(&url, &admin, &["--ca-file", &ca, "agents", "-o", "json"])
                .await
                .ok();
            out.json()
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a["id"] == "good" && a["state"] == "SYNCED")
                .then_some(())
        },
    )
    .await;
    let http = HttpClient::new();
    let reply = http
        .get(&format!("http://{}/", good_agent.proxy), Some("x.test"))
        .await
        .unwrap();
    assert_eq!(reply.status, 200);
    eventually(
        "the rogue agent is refused",
        Duration::from_secs(30),
        || async {
            rogue_agent
                .log_text()
                .contains("cannot reach the plane")
                .then_some(())
        },
    )
    .await;
    let out = ctl_as(&url, &admin, &["--ca-file", &ca, "agents", "-o", "json"])
        .await
        .ok();
    assert!(
        !out.stdout.contains("rogue"),
        "an agent with an unknown certificate is not registered: {}",
        out.stdout
    );
    let entries = ctl_as(&url, &admin, &["--ca-file", &ca, "audit", "-o", "json"])
        .await
        .ok()
        .json();
    assert!(
        entries
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "Apply" && e["outcome"] == "ok" && e["role"] == "admin"),
        "{entries:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_keys_are_never_printed_without_an_admin_asking() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("certs")).unwrap();
    let (plane, admin) = auth_plane(d).await;
    let url = plane.url();
    let operator = create_token(&url, &admin, "operator").await;
    let viewer = create_token(&url, &admin, "viewer").await;
    let join = create_token(&url, &admin, "agent").await;
    let agent = AgentProc::start_with(d, &url, "edge", &["--join-token", &join]).await;

    let pki = Pki::new("site CA");
    let (first, second) = (pki.leaf(&["site.test"]), pki.leaf(&["site.test"]));
    let app = TestUpstream::start("app").await;
    let content = format!(
        "{}\n[certificates.site]\nhosts = [\"site.test\"]\ncert_file = \"certs/site.pem\"\nkey_file = \"certs/site.key\"\n",
        config(&app)
    );
    let file = write_config(d, "routes.toml", &content);
    let mut printed = String::new();
    for (version, leaf) in [(1, &first), (2, &second)] {
        std::fs::write(d.join("certs/site.pem"), &leaf.cert_pem).unwrap();
        std::fs::write(d.join("certs/site.key"), &leaf.key_pem).unwrap();
        let out = ctl_as(&url, &operator, &["apply", "-f", &file]).await.ok();
        printed.push_str(&out.stdout);
        eventually(
            "the agent serves the new key",
            Duration::from_secs(30),
            || async {
                let out = ctl_as(&url, &viewer, &["agents", "-o", "json"]).await.ok();
                (out.json()[0]["acked_version"] == version).then_some(())
            },
        )
        .await;
    }
    assert!(
        printed.contains("file changed: certs/site.key (sha256 "),
        "a key change shows as a digest: {printed}"
    );

    // What viewers and operators can print: get (table and JSON), history, diffs.
    for (token, args) in [
        (&viewer, vec!["get"]),
        (&viewer, vec!["get", "-o", "json"]),
        (&operator, vec!["get", "--version", "1", "-o", "json"]),
        (&viewer, vec!["history", "-o", "json"]),
        (&viewer, vec!["diff", "--from", "1", "--to", "2"]),
        (&viewer, vec!["diff", "-f", &file]),
        (&viewer, vec!["audit", "-o", "json"]),
    ] {
        let out = ctl_as(&url, token, &args).await.ok();
        printed.push_str(&out.stdout);
    }
    assert!(printed.contains("certs/site.key"), "{printed}");
    assert!(printed.contains("secret: redacted"), "{printed}");
    // The certificate is public and may be shown; the keys never.
    assert!(printed.contains(&second.cert_pem.lines().nth(1).unwrap().to_string()));
    for leaf in [&first, &second] {
        assert!(
            !printed.contains(&leaf.key_body()),
            "a key in dispactl output"
        );
        for line in leaf.key_pem.lines().filter(|l| !l.starts_with("-----")) {
            assert!(
                !printed.contains(line),
                "a key line in dispactl output: {line}"
            );
        }
    }

    // Only an admin sees the key, and that read is audited.
    let out = ctl_as(&url, &operator, &["get", "--show-secrets"]).await;
    assert_eq!(out.code, 1, "{out:?}");
    let out = ctl_as(&url, &admin, &["get", "--show-secrets", "-o", "json"])
        .await
        .ok();
    let shown = out.json()["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == "certs/site.key")
        .unwrap()["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(shown, second.key_pem);
    let entries = audit(&url, &viewer).await;
    assert!(has(&entries, "Get --show-secrets", "ok", "admin"));
    assert!(has(&entries, "Get --show-secrets", "denied", "operator"));

    // Neither process logs key material, and the agent's cached snapshot is owner-only.
    for (who, log) in [("plane", plane.log_text()), ("agent", agent.log_text())] {
        for leaf in [&first, &second] {
            for line in leaf.key_pem.lines().filter(|l| !l.starts_with("-----")) {
                assert!(!log.contains(line), "a key line in the {who} log");
            }
        }
    }
    let cache = d.join("edge-cache").join("snapshot.pb");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&cache).unwrap().permissions());
    assert_eq!(mode & 0o077, 0, "snapshot cache mode {mode:o}");
}

/// Whether any file under `dir` contains `needle`.
fn dir_contains(dir: &Path, needle: &[u8]) -> bool {
    std::fs::read_dir(dir).unwrap().flatten().any(|e| {
        let p = e.path();
        if p.is_dir() {
            dir_contains(&p, needle)
        } else {
            std::fs::read(&p)
                .map(|b| b.windows(needle.len()).any(|w| w == needle))
                .unwrap_or(false)
        }
    })
}
