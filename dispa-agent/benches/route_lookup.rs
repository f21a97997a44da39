//! Host lookup cost against table size: 10 vs 10,000 exact hosts (and as many wildcards).
//! The table is hash maps, so both should cost the same.
//!
//! Run: `cargo bench -p dispa-agent --bench route_lookup`
//! Recorded in docs/BENCHMARKS.md ("Route lookup").

#![allow(clippy::expect_used)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use dispa_agent::routing::{RequestView, RouteTable, normalize_host};
use dispa_proto::config;

fn table(hosts: usize) -> RouteTable<String> {
    let mut src = String::from("[upstreams.u]\nendpoints = [\"127.0.0.1:1\"]\n");
    for i in 0..hosts {
        src.push_str(&format!(
            "[[routes]]\nname = \"r{i}\"\nhosts = [\"host{i}.example.com\", \"*.tenant{i}.example.net\"]\nupstream = \"u\"\n"
        ));
    }
    let c = config::parse("bench.toml", &src).expect("valid");
    RouteTable::build(c.routes.iter().map(|r| (r, r.name.to_string())).collect()).expect("compiles")
}

fn bench(c: &mut Criterion) {
    let headers = http::HeaderMap::new();
    for n in [10usize, 10_000] {
        let t = table(n);
        let exact = format!("host{}.example.com", n / 2);
        let wild = format!("a.b.tenant{}.example.net", n / 2);
        let view = RequestView {
            path: "/v1/items",
            method: "GET",
            headers: &headers,
            query: None,
        };
        c.bench_function(&format!("exact host, {n} hosts"), |b| {
            b.iter(|| {
                t.lookup(black_box(&normalize_host(&exact)), &view)
                    .map(String::len)
            })
        });
        c.bench_function(&format!("wildcard host, {n} hosts"), |b| {
            b.iter(|| {
                t.lookup(black_box(&normalize_host(&wild)), &view)
                    .map(String::len)
            })
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
