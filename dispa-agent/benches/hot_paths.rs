//! The per-request pieces besides route lookup: balancer picks over 10 endpoints, header
//! handling (hop-by-hop stripping and X-Forwarded-*), and the policy check (client address,
//! allow/deny, rate limit, API key).
//!
//! Run: `cargo bench -p dispa-agent --bench hot_paths`
//! Recorded in docs/BENCHMARKS.md ("Hot paths").

#![allow(clippy::expect_used)]

use std::hint::black_box;
use std::net::{IpAddr, SocketAddr};

use criterion::{Criterion, criterion_group, criterion_main};
use dispa_agent::proxy::headers;
use dispa_agent::upstream::{self, PickCtx, ResolvedEndpoint};
use dispa_proto::config;
use http::{HeaderMap, HeaderValue};

fn upstream(balance: &str) -> upstream::UpstreamRuntime {
    let eps: Vec<String> = (0..10)
        .map(|i| format!("\"127.0.0.1:{}\"", 9000 + i))
        .collect();
    let src = format!(
        "[upstreams.u]\nbalance = \"{balance}\"\nendpoints = [{}]\n",
        eps.join(", ")
    );
    let c = config::parse("bench.toml", &src).expect("valid");
    let spec = c.upstreams.values().next().expect("one upstream");
    let resolved = (0..10)
        .map(|i| ResolvedEndpoint {
            addr: SocketAddr::from(([127, 0, 0, 1], 9000 + i)),
            weight: 1,
            server_name: None,
        })
        .collect();
    upstream::build(spec, resolved, None).expect("builds")
}

fn request_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("host", "api.example.com"),
        ("user-agent", "wrk/4.2"),
        ("accept", "*/*"),
        ("connection", "keep-alive, x-hop"),
        ("x-hop", "1"),
        ("x-api-key", "key-0123456789"),
        ("x-forwarded-for", "6.6.6.6"),
    ] {
        h.insert(k, HeaderValue::from_static(v));
    }
    h
}

fn bench(c: &mut Criterion) {
    let client: IpAddr = "127.0.0.9".parse().expect("ip");
    let h = request_headers();
    for balance in ["round_robin", "least_conn", "p2c", "random"] {
        let u = upstream(balance);
        let ctx = PickCtx {
            client_ip: client,
            headers: &h,
            added: None,
        };
        c.bench_function(&format!("pick {balance}, 10 endpoints"), |b| {
            b.iter(|| u.pick(black_box(&ctx), &[]).map(|p| p.addr))
        });
    }
    c.bench_function("headers: strip hop-by-hop, set X-Forwarded-*", |b| {
        b.iter(|| {
            let mut h = request_headers();
            headers::strip_hop_by_hop(&mut h);
            let xff = headers::forwarded_for(&h, client, client, false);
            let host = headers::RawHost::new(HeaderValue::from_static("api.example.com"));
            let mut added = dispa_agent::proxy::Added::new(
                HeaderValue::from_static("id"),
                HeaderValue::from_static("00-tp"),
            );
            headers::forward_fields(&mut h, &mut added, xff, &host.expect("valid"), "http");
            (h.len(), added)
        })
    });
    let src = "[policy]\ndeny = [\"10.9.0.0/16\"]\nrate_limit = { per_second = 1000000, burst = 1000000 }\nauth = { api_keys = [\"key-0123456789\"] }\n[upstreams.u]\nendpoints = [\"127.0.0.1:1\"]\n[[routes]]\nname = \"r\"\nupstream = \"u\"\n";
    let cfg = config::parse("bench.toml", src).expect("valid");
    let (policies, _, _) = dispa_agent::policy::compile(&cfg, None).expect("compiles");
    let p = &policies[0];
    c.bench_function("policy: deny list, rate limit, API key", |b| {
        b.iter(|| p.check(black_box(client), &h, None).is_ok())
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
