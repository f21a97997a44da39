//! The route matcher: any host, path, method, header and query against a table with every
//! kind of matcher, after the agent's path normalisation. Never panics.
#![no_main]

use std::sync::OnceLock;

use dispa_agent::proxy::hygiene::normalize_path;
use dispa_agent::routing::{RequestView, RouteTable, normalize_host};
use dispa_proto::config::Config;
use libfuzzer_sys::fuzz_target;

const ROUTES: &str = r#"
[upstreams.u]
endpoints = ["127.0.0.1:1"]

[[routes]]
name = "exact"
hosts = ["api.example.com"]
path = "/healthz"
upstream = "u"

[[routes]]
name = "prefix"
hosts = ["api.example.com", "*.example.org"]
path_prefix = "/v1/"
methods = ["GET", "POST"]
headers = { "x-env" = "prod", "x-re" = { regex = "^a+b$" }, "x-p" = { present = true } }
query = { "q" = { regex = "[0-9]{2,}" } }
upstream = "u"

[[routes]]
name = "regex"
hosts = ["*.example.com"]
path_regex = "^/v[0-9]+/(users|items)/[^/]+$"
upstream = "u"

[[routes]]
name = "ip"
hosts = ["10.0.0.1", "::1"]
upstream = "u"

[[routes]]
name = "default"
upstream = "u"
"#;

fn table() -> &'static (Config, RouteTable<usize>) {
    static T: OnceLock<(Config, RouteTable<usize>)> = OnceLock::new();
    T.get_or_init(|| {
        let c = dispa_proto::config::parse("routes.toml", ROUTES).unwrap_or_else(|e| panic!("{e}"));
        let t = RouteTable::build(c.routes.iter().enumerate().map(|(i, r)| (r, i)).collect())
            .unwrap_or_else(|e| panic!("{e}"));
        (c, t)
    })
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\n');
    let host = normalize_host(parts.next().unwrap_or(""));
    let path = parts.next().unwrap_or("/");
    let method = parts.next().unwrap_or("GET");
    let query = parts.next();
    let mut headers = http::HeaderMap::new();
    for line in parts {
        if let Some((n, v)) = line.split_once(':')
            && let (Ok(n), Ok(v)) = (
                http::HeaderName::from_bytes(n.as_bytes()),
                http::HeaderValue::from_str(v.trim()),
            )
        {
            headers.append(n, v);
        }
    }
    let path = match normalize_path(path) {
        Ok(p) => p.into_owned(),
        Err(_) => return,
    };
    // Normalising is idempotent: a normal path stays as it is.
    assert_eq!(normalize_path(&path).map(|p| p.into_owned()), Ok(path.clone()));
    let (config, t) = table();
    let view = RequestView {
        path: &path,
        method,
        headers: &headers,
        query,
    };
    if let Some(&i) = t.lookup(&host, &view) {
        assert!(i < config.routes.len());
    }
});
