#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The operator's policy at the edge, end to end against the real binaries: allow/deny,
//! X-Forwarded-For from trusted and untrusted peers, API keys, bearer tokens, JWTs (HS256 and
//! ES256 from a JWKS), rate limits, and bounded rate-limit memory.

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use dispa_tests::*;
use http::Request;
use http_body_util::Full;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

const HS_SECRET: &str = "hs256-secret-for-the-policy-test-0123";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn config(app: &TestUpstream) -> String {
    format!(
        r#"
[policy]
deny = ["127.0.0.66/32"]
trusted_proxies = ["127.0.0.5/32"]

[upstreams.app]
endpoints = ["{app}"]

[[routes]]
name = "open"
hosts = ["open.test"]
upstream = "app"

[[routes]]
name = "acl"
hosts = ["acl.test"]
upstream = "app"
[routes.policy]
allow = ["127.0.0.2/32", "198.51.100.0/24"]

[[routes]]
name = "keys"
hosts = ["keys.test"]
upstream = "app"
[routes.policy]
auth = {{ api_keys = ["key-alpha-123"], bearer_tokens = ["bearer-beta-456"] }}

[[routes]]
name = "hs"
hosts = ["hs.test"]
upstream = "app"
[routes.policy]
auth = {{ jwt = {{ hs256_secret = "{HS_SECRET}", issuer = "https://issuer.test", audience = "api", forward_claims = {{ sub = "x-user" }} }} }}

[[routes]]
name = "es"
hosts = ["es.test"]
upstream = "app"
[routes.policy]
auth = {{ jwt = {{ jwks_file = "jwks.json", audience = "api" }} }}

[[routes]]
name = "limited"
hosts = ["limited.test"]
upstream = "app"
[routes.policy]
rate_limit = {{ per_second = 1, burst = 2 }}

[[routes]]
name = "by-user"
hosts = ["by-user.test"]
upstream = "app"
[routes.policy]
rate_limit = {{ per_second = 1000, burst = 1000, key = "header:x-user" }}
"#,
        app = app.addr
    )
}

/// An EC P-256 key (rcgen) as a JWKS and an ES256 signing key.
fn es256_key(kid: &str) -> (serde_json::Value, EncodingKey) {
    let key = rcgen::KeyPair::generate().unwrap();
    let raw = key.public_key_raw();
    assert_eq!(raw.len(), 65, "uncompressed P-256 point");
    let jwk = serde_json::json!({
        "kty": "EC",
        "crv": "P-256",
        "kid": kid,
        "use": "sig",
        "alg": "ES256",
        "x": URL_SAFE_NO_PAD.encode(&raw[1..33]),
        "y": URL_SAFE_NO_PAD.encode(&raw[33..65]),
    });
    (jwk, EncodingKey::from_ec_der(&key.serialize_der()))
}

fn jwt(claims: serde_json::Value, header: Header, key: &EncodingKey) -> String {
    jsonwebtoken::encode(&header, &claims, key).unwrap()
}

struct Edge {
    agent: AgentProc,
}

impl Edge {
    async fn get(&self, from: &str, host: &str, headers: &[(&str, &str)]) -> Reply {
        let mut b = Request::get(format!("http://{}/", self.agent.proxy)).header("host", host);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        HttpClient::from_ip(ip(from))
            .send(b.body(Full::new(Bytes::new())).unwrap())
            .await
            .unwrap()
    }

    async fn status(&self, from: &str, host: &str, headers: &[(&str, &str)]) -> u16 {
        self.get(from, host, headers).await.status.as_u16()
    }

    async fn metric(&self, line_prefix: &str) -> f64 {
        let text = self
            .agent
            .metrics_text()
            .await
            .expect("the agent's /metrics");
        // A counter not yet created counts as 0.
        metric_value(&text, line_prefix).unwrap_or(0.0)
    }
}

/// A plane and an agent serving [`config`], with a JWKS holding the returned ES256 key.
async fn start(dir: &std::path::Path, app: &TestUpstream) -> (PlaneProc, Edge, EncodingKey) {
    let (es_jwk, es_key) = es256_key("k1");
    std::fs::write(
        dir.join("jwks.json"),
        serde_json::json!({ "keys": [es_jwk] }).to_string(),
    )
    .unwrap();
    let (plane, agent) = fleet_with(dir, &config(app)).await;
    (plane, Edge { agent }, es_key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_matrix() {
    let dir = tempfile::tempdir().unwrap();
    let app = TestUpstream::start("app").await;
    let (plane, edge, es_key) = start(dir.path(), &app).await;
    let (_, rogue_key) = es256_key("k1");

    // Allow/deny: deny wins globally, even for unknown hosts; a route's allow list.
    assert_eq!(edge.status("127.0.0.1", "open.test", &[]).await, 200);
    assert_eq!(edge.status("127.0.0.66", "open.test", &[]).await, 403);
    assert_eq!(edge.status("127.0.0.66", "nowhere.test", &[]).await, 403);
    assert_eq!(edge.status("127.0.0.1", "nowhere.test", &[]).await, 404);
    assert_eq!(edge.status("127.0.0.2", "acl.test", &[]).await, 200);
    assert_eq!(edge.status("127.0.0.3", "acl.test", &[]).await, 403);

    // X-Forwarded-For from an untrusted peer: ignored for policy, overwritten upstream.
    let xff = [("x-forwarded-for", "127.0.0.2")];
    assert_eq!(edge.status("127.0.0.3", "acl.test", &xff).await, 403);
    let r = edge
        .get("127.0.0.3", "open.test", &[("x-forwarded-for", "6.6.6.6")])
        .await;
    assert_eq!(r.json()["headers"]["x-forwarded-for"], "127.0.0.3");
    // From a trusted proxy: the rightmost untrusted address is the client.
    let r = edge
        .get(
            "127.0.0.5",
            "acl.test",
            &[("x-forwarded-for", "6.6.6.6, 198.51.100.7")],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()["headers"]["x-forwarded-for"],
        "6.6.6.6, 198.51.100.7, 127.0.0.5"
    );
    let spoof = [("x-forwarded-for", "203.0.113.1")];
    assert_eq!(edge.status("127.0.0.5", "acl.test", &spoof).await, 403);
    // The access log names the real client.
    eventually(
        "a log record for 198.51.100.7",
        Duration::from_secs(30),
        || async {
            let out = ctl(
                &plane.url(),
                &["logs", "--client", "198.51.100.7", "-o", "json"],
            )
            .await;
            out.stdout.contains("\"acl\"").then_some(())
        },
    )
    .await;

    // API keys and static bearer tokens.
    let r = edge.get("127.0.0.1", "keys.test", &[]).await;
    assert_eq!(r.status, 401);
    assert!(
        r.header("www-authenticate")
            .unwrap()
            .starts_with("Bearer realm=")
    );
    for (h, v, want) in [
        ("x-api-key", "key-alpha-123", 200),
        ("x-api-key", "key-alpha-124", 401),
        ("authorization", "Bearer bearer-beta-456", 200),
        ("authorization", "Bearer bearer-beta-457", 401),
    ] {
        assert_eq!(
            edge.status("127.0.0.1", "keys.test", &[(h, v)]).await,
            want,
            "{h}: {v}"
        );
    }

    // JWT, HS256: valid (claims forwarded, client's own copy dropped), expired, not yet
    // valid, wrong audience, wrong issuer, bad signature, alg=none.
    let hs = EncodingKey::from_secret(HS_SECRET.as_bytes());
    let good = serde_json::json!({"sub": "alice", "iss": "https://issuer.test", "aud": "api", "exp": now() + 300});
    let bearer = |t: &str| format!("Bearer {t}");
    let t = bearer(&jwt(good.clone(), Header::new(Algorithm::HS256), &hs));
    let r = edge
        .get(
            "127.0.0.1",
            "hs.test",
            &[("authorization", &t), ("x-user", "mallory")],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["headers"]["x-user"], "alice");
    let with = |k: &str, v: serde_json::Value| {
        let mut c = good.clone();
        c[k] = v;
        c
    };
    let cases = [
        ("expired", with("exp", (now() - 300).into())),
        ("not yet valid", with("nbf", (now() + 300).into())),
        ("wrong audience", with("aud", "other".into())),
        ("wrong issuer", with("iss", "https://evil.test".into())),
    ];
    for (what, claims) in cases {
        let t = bearer(&jwt(claims, Header::new(Algorithm::HS256), &hs));
        let r = edge
            .get("127.0.0.1", "hs.test", &[("authorization", &t)])
            .await;
        assert_eq!(r.status, 401, "{what}");
        assert!(
            r.header("www-authenticate")
                .unwrap()
                .contains("invalid_token"),
            "{what}"
        );
    }
    let forged = EncodingKey::from_secret(b"some-other-secret-some-other-secret");
    let t = bearer(&jwt(good.clone(), Header::new(Algorithm::HS256), &forged));
    assert_eq!(
        edge.status("127.0.0.1", "hs.test", &[("authorization", &t)])
            .await,
        401
    );
    let none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(good.to_string())
    );
    assert_eq!(
        edge.status("127.0.0.1", "hs.test", &[("authorization", &bearer(&none))])
            .await,
        401,
        "alg=none"
    );
    assert_eq!(
        edge.status("127.0.0.1", "hs.test", &[("x-user", "alice")])
            .await,
        401
    );

    // JWT, ES256 from the JWKS: the right key, a key not in the set, and HS256 signed with
    // the public key (algorithm confusion).
    let es_claims = serde_json::json!({"sub": "bob", "aud": "api", "exp": now() + 300});
    let mut es_header = Header::new(Algorithm::ES256);
    es_header.kid = Some("k1".into());
    let t = bearer(&jwt(es_claims.clone(), es_header.clone(), &es_key));
    assert_eq!(
        edge.status("127.0.0.1", "es.test", &[("authorization", &t)])
            .await,
        200
    );
    let t = bearer(&jwt(es_claims.clone(), es_header, &rogue_key));
    assert_eq!(
        edge.status("127.0.0.1", "es.test", &[("authorization", &t)])
            .await,
        401
    );
    let jwks_text = std::fs::read_to_string(dir.path().join("jwks.json")).unwrap();
    let confused = EncodingKey::from_secret(jwks_text.as_bytes());
    let t = bearer(&jwt(es_claims, Header::new(Algorithm::HS256), &confused));
    assert_eq!(
        edge.status("127.0.0.1", "es.test", &[("authorization", &t)])
            .await,
        401
    );

    // Rate limit: a burst of 2, then 429 with Retry-After and RateLimit-*; other clients keep
    // their own bucket.
    assert_eq!(edge.status("127.0.0.7", "limited.test", &[]).await, 200);
    assert_eq!(edge.status("127.0.0.7", "limited.test", &[]).await, 200);
    let r = edge.get("127.0.0.7", "limited.test", &[]).await;
    assert_eq!(r.status, 429);
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    assert_eq!(r.header("ratelimit-limit"), Some("2"));
    assert_eq!(r.header("ratelimit-remaining"), Some("0"));
    assert_eq!(edge.status("127.0.0.8", "limited.test", &[]).await, 200);

    // Every refusal is counted by reason.
    for reason in [
        "ip_denied",
        "auth_missing",
        "auth_invalid",
        "auth_invalid_token",
        "rate_limited",
    ] {
        let n = edge
            .metric(&format!(
                "dispa_denied_requests_total{{reason=\"{reason}\"}}"
            ))
            .await;
        assert!(n >= 1.0, "no denied_requests for {reason}");
    }
    // No key, token or secret in the agent's log.
    let log = edge.agent.log_text();
    for s in ["key-alpha-123", "bearer-beta-456", HS_SECRET] {
        assert!(!log.contains(s), "{s} in the agent log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_memory_is_bounded_over_100k_keys() {
    let dir = tempfile::tempdir().unwrap();
    let app = TestUpstream::start("app").await;
    let (_plane, edge, _) = start(dir.path(), &app).await;
    let pid = edge.agent.child.id().unwrap();
    let url = format!("http://{}/", edge.agent.proxy);
    let client = HttpClient::new();
    let send = |i: u32| {
        let (client, url) = (&client, &url);
        async move {
            let req = Request::get(url)
                .header("host", "by-user.test")
                .header("x-user", format!("user-{i}"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            client.send(req).await.unwrap().status.as_u16()
        }
    };
    // Warm up, then measure growth over 100,000 distinct keys.
    for i in 0..2_000 {
        assert_eq!(send(i).await, 200);
    }
    let before = rss_kib(pid).unwrap();
    let mut done = 2_000u32;
    while done < 102_000 {
        let batch: Vec<_> = (done..done + 64).map(send).collect();
        for s in futures_util::future::join_all(batch).await {
            assert!(s == 200 || s == 429, "status {s}");
        }
        done += 64;
    }
    let keys = edge.metric("dispa_rate_limit_keys ").await;
    assert!(keys <= 10_001.0, "{keys} keys tracked");
    assert!(keys >= 1.0);
    let after = rss_kib(pid).unwrap();
    assert!(
        after < before + 64 * 1024,
        "RSS grew from {before} KiB to {after} KiB over 100,000 keys"
    );
}
