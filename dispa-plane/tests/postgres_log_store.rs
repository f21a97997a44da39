//! `PgLogStore` against a real PostgreSQL (`DISPA_TEST_POSTGRES`, default
//! postgres://postgres@127.0.0.1:5432/test). Each test works in a schema of its own and drops
//! it at the end. Without a server the tests skip, except under CI=true, where they fail.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dispa_plane::logs::postgres::{PgLogStore, PgOptions};
use dispa_plane::logs::{LogFilter, LogStore, StatusMatch};
use dispa_proto::v1::{LogBatch, LogRecord};
use futures_util::FutureExt;
use tokio_postgres::{Client, NoTls};

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
const HOUR_US: i64 = 3_600 * 1_000_000;
/// 2024-03-09T00:00:00Z, 2024-03-10T00:00:00Z and 2024-03-11T00:00:00Z.
const MAR9: i64 = 1_709_942_400_000_000;
const MAR10: i64 = 1_710_028_800_000_000;
const MAR11: i64 = 1_710_115_200_000_000;

fn url() -> String {
    std::env::var("DISPA_TEST_POSTGRES").unwrap_or_else(|_| DEFAULT_URL.to_string())
}

/// The URL with any password replaced, for messages.
fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<unparsable URL>".into();
    };
    let end = rest.find('/').unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let authority = match authority.rsplit_once('@') {
        Some((user, host)) => match user.split_once(':') {
            Some((name, _)) => format!("{name}:***@{host}"),
            None => authority.to_string(),
        },
        None => authority.to_string(),
    };
    let tail = if tail.contains("password=") {
        "/...".to_string()
    } else {
        tail.to_string()
    };
    format!("{scheme}://{authority}{tail}")
}

#[derive(Clone)]
struct Ctx {
    url: String,
    schema: String,
    admin: Arc<Client>,
}

impl Ctx {
    async fn store(&self) -> PgLogStore {
        PgLogStore::connect_with_schema(&self.url, &self.schema)
            .await
            .unwrap()
    }

    /// Runs SQL that names the test schema as `{s}`.
    async fn sql(&self, sql: &str) -> Vec<tokio_postgres::Row> {
        let sql = sql.replace("{s}", &format!("\"{}\"", self.schema));
        self.admin.query(&sql, &[]).await.unwrap()
    }

    async fn count(&self) -> i64 {
        self.sql("SELECT count(*) FROM {s}.dispa_logs").await[0].get(0)
    }

    async fn partitions(&self) -> Vec<String> {
        self.admin
            .query(
                "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
                 JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace n ON n.oid = p.relnamespace \
                 WHERE n.nspname = $1 AND p.relname = 'dispa_logs' ORDER BY 1",
                &[&self.schema],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    }
}

/// Connects as admin, or skips (returns None) when no server is reachable outside CI.
async fn admin(url: &str) -> Option<Client> {
    let res = tokio::time::timeout(Duration::from_secs(10), tokio_postgres::connect(url, NoTls))
        .await
        .map_err(|_| "timed out".to_string())
        .and_then(|r| {
            r.map_err(|e| match std::error::Error::source(&e) {
                Some(cause) => format!("{e}: {cause}"),
                None => e.to_string(),
            })
        });
    match res {
        Ok((client, conn)) => {
            tokio::spawn(conn);
            Some(client)
        }
        Err(e) if std::env::var("CI").as_deref() == Ok("true") => panic!(
            "PostgreSQL not reachable at {} ({e}); CI requires it (set DISPA_TEST_POSTGRES)",
            redacted(url)
        ),
        Err(_) => {
            eprintln!(
                "skipping: PostgreSQL not reachable at {} (set DISPA_TEST_POSTGRES)",
                redacted(url)
            );
            None
        }
    }
}

fn unique_schema() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "dispa_test_{}_{nanos}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs `body` in a fresh schema, dropping it afterwards even if `body` panics.
async fn run<F, Fut>(body: F)
where
    F: FnOnce(Ctx) -> Fut,
    Fut: Future<Output = ()>,
{
    let url = url();
    let Some(admin) = admin(&url).await else {
        return;
    };
    let ctx = Ctx {
        url,
        schema: unique_schema(),
        admin: Arc::new(admin),
    };
    let result = AssertUnwindSafe(body(ctx.clone())).catch_unwind().await;
    ctx.sql("DROP SCHEMA IF EXISTS {s} CASCADE").await;
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}

fn rec(ts_us: i64, i: u32) -> LogRecord {
    LogRecord {
        ts_us,
        agent: format!("agent-{}", i % 2),
        request_id: format!("req-{i}"),
        client_ip: format!("10.0.0.{}", i % 3),
        method: ["GET", "POST", "PUT"][(i % 3) as usize].into(),
        scheme: "https".into(),
        host: ["api.example.com", "www.example.com"][(i % 2) as usize].into(),
        path: ["/v1/users", "/v1/orders", "/v2/users", "/a%b", "/axb"][(i % 5) as usize].into(),
        query: if i.is_multiple_of(4) {
            format!("page={i}")
        } else {
            String::new()
        },
        status: [200, 201, 404, 500, 503, 302, 101][(i % 7) as usize],
        route: format!("route-{}", i % 3),
        upstream: "backend".into(),
        endpoint: format!("127.0.0.1:{}", 8000 + i % 2),
        attempts: 1 + i % 2,
        duration_us: 1000 + u64::from(i),
        upstream_duration_us: 900 + u64::from(i),
        bytes_in: u64::from(i) * 10,
        bytes_out: u64::from(i) * 100,
        user_agent: "curl/8 \"quoted\" ünïcode".into(),
        tls_version: "TLSv1.3".into(),
        sni: "api.example.com".into(),
        denial_reason: if i % 7 == 6 {
            "no_route".into()
        } else {
            String::new()
        },
        traceparent: format!("00-{i:032x}-{i:016x}-01"),
    }
}

fn batch(agent: &str, seq: u64, records: Vec<LogRecord>) -> LogBatch {
    LogBatch {
        agent_id: agent.into(),
        boot_id: "boot-1".into(),
        seq,
        records,
    }
}

fn newest_first(mut v: Vec<LogRecord>) -> Vec<LogRecord> {
    v.sort_by_key(|r| std::cmp::Reverse(r.ts_us));
    v
}

#[tokio::test]
async fn ingest_is_idempotent() {
    run(|ctx| async move {
        let s = ctx.store().await;
        assert_eq!(s.kind(), "postgres");
        let b = batch("a", 1, vec![rec(MAR10, 1), rec(MAR10 + 1, 2)]);
        assert!(s.ingest(&b).await.unwrap());
        assert!(
            !s.ingest(&b).await.unwrap(),
            "same batch again is a duplicate"
        );
        assert_eq!(ctx.count().await, 2);

        // Another boot or agent with the same seq is a different batch.
        let mut other_boot = b.clone();
        other_boot.boot_id = "boot-2".into();
        assert!(s.ingest(&other_boot).await.unwrap());
        assert!(s.ingest(&batch("b", 1, vec![rec(MAR10, 3)])).await.unwrap());
        assert_eq!(ctx.count().await, 5);

        // Redelivered concurrently, through two planes: stored exactly once.
        let s2 = Arc::new(ctx.store().await);
        let s = Arc::new(s);
        let b = batch("a", 2, (0..100).map(|i| rec(MAR10 + i, 10)).collect());
        let tasks: Vec<_> = (0..6)
            .map(|i| {
                let s: Arc<PgLogStore> = if i % 2 == 0 { s.clone() } else { s2.clone() };
                let b = b.clone();
                tokio::spawn(async move { s.ingest(&b).await.unwrap() })
            })
            .collect();
        let mut stored = 0;
        for t in tasks {
            stored += usize::from(t.await.unwrap());
        }
        assert_eq!(stored, 1);
        assert_eq!(ctx.count().await, 105);

        // An empty batch is still remembered.
        assert!(s.ingest(&batch("a", 3, vec![])).await.unwrap());
        assert!(!s.ingest(&batch("a", 3, vec![])).await.unwrap());
        // Sequence numbers past i64::MAX stay distinct.
        assert!(s.ingest(&batch("a", u64::MAX, vec![])).await.unwrap());
        assert!(s.ingest(&batch("a", u64::MAX - 1, vec![])).await.unwrap());
        assert!(!s.ingest(&batch("a", u64::MAX, vec![])).await.unwrap());
    })
    .await;
}

#[tokio::test]
async fn query_matches_the_reference_filter() {
    run(|ctx| async move {
        let s = ctx.store().await;
        // Distinct times so newest-first order is fully determined.
        let all: Vec<LogRecord> = (0..140u32)
            .map(|i| rec(MAR10 + i64::from(i) * 60_000_000 + i64::from(i % 3), i))
            .collect();
        for (n, chunk) in all.chunks(30).enumerate() {
            assert!(
                s.ingest(&batch("a", n as u64, chunk.to_vec()))
                    .await
                    .unwrap()
            );
        }
        let expected =
            |f: &LogFilter| newest_first(all.iter().filter(|r| f.matches(r)).cloned().collect());
        let filters = vec![
            LogFilter::default(),
            LogFilter {
                host: Some("api.example.com".into()),
                ..Default::default()
            },
            LogFilter {
                route: Some("route-1".into()),
                ..Default::default()
            },
            LogFilter {
                agent: Some("agent-0".into()),
                ..Default::default()
            },
            LogFilter {
                method: Some("POST".into()),
                ..Default::default()
            },
            LogFilter {
                client: Some("10.0.0.2".into()),
                ..Default::default()
            },
            LogFilter {
                path_prefix: Some("/v1/".into()),
                ..Default::default()
            },
            // LIKE wildcards in a prefix are literal.
            LogFilter {
                path_prefix: Some("/a%".into()),
                ..Default::default()
            },
            LogFilter {
                path_prefix: Some("/a_".into()),
                ..Default::default()
            },
            LogFilter {
                status: vec![StatusMatch::Code(404)],
                ..Default::default()
            },
            LogFilter {
                status: vec![StatusMatch::Class(5)],
                ..Default::default()
            },
            LogFilter {
                status: vec![
                    StatusMatch::Class(1),
                    StatusMatch::Code(302),
                    StatusMatch::Class(5),
                ],
                ..Default::default()
            },
            LogFilter {
                since_us: Some(MAR10 + 60 * 60_000_000),
                ..Default::default()
            },
            LogFilter {
                until_us: Some(MAR10 + 30 * 60_000_000 + 1),
                ..Default::default()
            },
            LogFilter {
                since_us: Some(MAR10 + 10 * 60_000_000),
                until_us: Some(MAR10 + 20 * 60_000_000 + 1),
                ..Default::default()
            },
            LogFilter {
                host: Some("www.example.com".into()),
                route: Some("route-2".into()),
                status: vec![StatusMatch::Class(2), StatusMatch::Class(4)],
                method: Some("GET".into()),
                since_us: Some(MAR10 + 5 * 60_000_000),
                ..Default::default()
            },
            LogFilter {
                host: Some("nobody.example.com".into()),
                ..Default::default()
            },
            // Quotes in values are data, not SQL.
            LogFilter {
                host: Some("x' OR '1'='1".into()),
                ..Default::default()
            },
        ];
        for f in &filters {
            let want = expected(f);
            assert_eq!(s.query(f, 1000).await.unwrap(), want, "{f:?}");
            // The limit keeps the newest.
            let got = s.query(f, 7).await.unwrap();
            assert_eq!(got, want.into_iter().take(7).collect::<Vec<_>>(), "{f:?}");
        }
        assert!(s.query(&LogFilter::default(), 0).await.unwrap().is_empty());
        // Every field round-trips.
        let newest = s.query(&LogFilter::default(), 1).await.unwrap();
        assert_eq!(newest, vec![all[139].clone()]);
    })
    .await;
}

#[tokio::test]
async fn days_land_in_their_own_partitions() {
    run(|ctx| async move {
        let s = ctx.store().await;
        let late = rec(MAR10 - 1, 1); // 2024-03-09T23:59:59.999999Z
        let early = rec(MAR10, 2); // 2024-03-10T00:00:00Z
        assert!(s.ingest(&batch("a", 1, vec![late.clone(), early.clone()])).await.unwrap());
        assert_eq!(
            ctx.partitions().await,
            vec!["dispa_logs_p20240309", "dispa_logs_p20240310"]
        );
        let rows = ctx
            .sql("SELECT count(*) FROM {s}.dispa_logs_p20240309 UNION ALL SELECT count(*) FROM {s}.dispa_logs_p20240310")
            .await;
        assert_eq!((rows[0].get::<_, i64>(0), rows[1].get::<_, i64>(0)), (1, 1));
        assert_eq!(
            s.query(&LogFilter::default(), 10).await.unwrap(),
            vec![early.clone(), late.clone()]
        );
        let f = LogFilter {
            until_us: Some(MAR10 - 1),
            ..Default::default()
        };
        assert_eq!(s.query(&f, 10).await.unwrap(), vec![late]);

        // Many batches creating the same new days at once, from two planes.
        let s = Arc::new(s);
        let s2 = Arc::new(ctx.store().await);
        let tasks: Vec<_> = (0..8u64)
            .map(|i| {
                let s = if i % 2 == 0 { s.clone() } else { s2.clone() };
                let b = batch(
                    "c",
                    i,
                    vec![rec(MAR11 + 5, 1), rec(MAR11 + HOUR_US * 25, 2)],
                );
                tokio::spawn(async move { s.ingest(&b).await.unwrap() })
            })
            .collect();
        for t in tasks {
            assert!(t.await.unwrap());
        }
        assert_eq!(ctx.count().await, 18);
        assert_eq!(
            ctx.partitions().await,
            vec![
                "dispa_logs_p20240309",
                "dispa_logs_p20240310",
                "dispa_logs_p20240311",
                "dispa_logs_p20240312"
            ]
        );
    })
    .await;
}

#[tokio::test]
async fn odd_values_are_clamped_not_fatal() {
    run(|ctx| async move {
        let s = ctx.store().await;
        let mut huge = rec(i64::MAX, 1);
        huge.bytes_in = u64::MAX;
        huge.status = u32::MAX;
        let before_1970 = rec(-1, 2);
        let ancient = rec(i64::MIN, 3);
        assert!(
            s.ingest(&batch("a", 1, vec![huge, before_1970.clone(), ancient]))
                .await
                .unwrap()
        );
        let got = s.query(&LogFilter::default(), 10).await.unwrap();
        assert_eq!(got.len(), 3);
        // 9999-12-30T23:59:59.999999Z and 0001-01-01T00:00:00Z.
        assert_eq!(got[0].ts_us, 253_402_214_399_999_999);
        assert_eq!(got[0].bytes_in, i64::MAX as u64);
        assert_eq!(got[0].status, i32::MAX as u32);
        assert_eq!(got[1], before_1970);
        assert_eq!(got[2].ts_us, -62_135_596_800_000_000);
        assert_eq!(
            ctx.partitions().await,
            vec![
                "dispa_logs_p00010101",
                "dispa_logs_p19691231",
                "dispa_logs_p99991230"
            ]
        );
        // Filters at the extremes do not fail either.
        let f = LogFilter {
            since_us: Some(i64::MIN),
            until_us: Some(i64::MAX),
            ..Default::default()
        };
        assert_eq!(s.query(&f, 10).await.unwrap().len(), 3);
        s.retain(i64::MIN).await.unwrap();
        assert_eq!(ctx.count().await, 3);
    })
    .await;
}

#[tokio::test]
async fn retain_drops_old_days_and_trims_the_straddling_one() {
    run(|ctx| async move {
        let s = ctx.store().await;
        let noon = 12 * HOUR_US;
        let records = vec![
            rec(MAR9 + noon, 1),
            rec(MAR9 + noon + 1, 2),
            rec(MAR10 + HOUR_US, 3),
            rec(MAR10 + noon + HOUR_US, 4),
            rec(MAR11 + noon, 5),
        ];
        assert!(s.ingest(&batch("a", 1, records.clone())).await.unwrap());
        assert_eq!(ctx.partitions().await.len(), 3);
        // Nothing is old yet.
        assert_eq!(s.retain(MAR9).await.unwrap(), 0);
        assert_eq!(ctx.count().await, 5);

        let removed = s.retain(MAR10 + noon).await.unwrap();
        assert_eq!(
            removed, 3,
            "two rows of the dropped day and one of the straddling day"
        );
        assert_eq!(
            ctx.partitions().await,
            vec!["dispa_logs_p20240310", "dispa_logs_p20240311"]
        );
        assert_eq!(
            s.query(&LogFilter::default(), 10).await.unwrap(),
            vec![records[4].clone(), records[3].clone()]
        );
        // The batch marker was received just now, so it is kept: redelivery stays a no-op.
        assert!(!s.ingest(&batch("a", 1, records.clone())).await.unwrap());

        // Old records arriving for a dropped day recreate it.
        assert!(
            s.ingest(&batch("a", 2, vec![rec(MAR9 + 5, 6)]))
                .await
                .unwrap()
        );
        assert_eq!(ctx.partitions().await.len(), 3);

        // A cutoff past now also forgets the markers.
        let future = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_micros() as i64
            + HOUR_US;
        assert_eq!(s.retain(future).await.unwrap(), 3);
        assert!(ctx.partitions().await.is_empty());
        assert_eq!(
            ctx.sql("SELECT count(*) FROM {s}.dispa_log_batches").await[0].get::<_, i64>(0),
            0
        );
        // The store keeps working after its cached partitions were dropped.
        assert!(s.ingest(&batch("a", 1, vec![rec(MAR10, 7)])).await.unwrap());
        assert_eq!(ctx.count().await, 1);
    })
    .await;
}

#[tokio::test]
async fn a_partition_dropped_behind_the_stores_back_is_recreated() {
    run(|ctx| async move {
        let s = ctx.store().await;
        let other = ctx.store().await;
        assert!(s.ingest(&batch("a", 1, vec![rec(MAR10, 1)])).await.unwrap());
        // Another plane's retention drops the day this store has cached.
        other.retain(MAR11).await.unwrap();
        assert!(ctx.partitions().await.is_empty());
        assert!(
            s.ingest(&batch("a", 2, vec![rec(MAR10 + 1, 2)]))
                .await
                .unwrap()
        );
        assert_eq!(ctx.count().await, 1);
    })
    .await;
}

#[tokio::test]
async fn connect_uses_the_urls_search_path_and_migrates_idempotently() {
    run(|ctx| async move {
        ctx.sql("CREATE SCHEMA {s}").await;
        let sep = if ctx.url.contains('?') { '&' } else { '?' };
        let url = format!("{}{sep}options=-csearch_path%3D{}", ctx.url, ctx.schema);
        let s = PgLogStore::connect(&url).await.unwrap();
        assert!(s.ingest(&batch("a", 1, vec![rec(MAR10, 1)])).await.unwrap());
        assert_eq!(ctx.count().await, 1);
        // Connecting again (a plane restart) keeps the data and the version.
        let s = PgLogStore::connect_with(
            &url,
            PgOptions {
                connections: 1,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(s.query(&LogFilter::default(), 10).await.unwrap().len(), 1);
        let v: i32 = ctx
            .sql("SELECT version FROM {s}.dispa_schema_version")
            .await[0]
            .get(0);
        assert_eq!(v, 1);

        // A schema written by a newer build is refused.
        ctx.sql("UPDATE {s}.dispa_schema_version SET version = 99")
            .await;
        let err = PgLogStore::connect(&url).await.err().unwrap().to_string();
        assert!(err.contains("version 99"), "{err}");
    })
    .await;
}

#[tokio::test]
async fn errors_never_show_the_password() {
    for url in [
        "postgres://dispa:s3cret-pw@127.0.0.1:1/test?connect_timeout=2",
        "postgres://dispa:s3cret-pw@127.0.0.1:notaport/test",
        "postgres://dispa:s3cret-pw@127.0.0.1/test?bogus=s3cret-pw",
        "postgres://dispa@127.0.0.1/test?s3cret-pw",
        "postgres://dispa@127.0.0.1/test?s3cret-pw=1",
        "postgres://dispa:s3cret-pw@127.0.0.1/test?sslmode=s3cret-pw",
        "host=127.0.0.1 password='s3cret-pw",
    ] {
        let err = PgLogStore::connect(url).await.err().unwrap().to_string();
        assert!(!err.contains("s3cret"), "{err}");
        assert!(err.starts_with("PostgreSQL: "), "{err}");
    }
    assert_eq!(
        redacted("postgres://u:pw@h:1/db?x=1"),
        "postgres://u:***@h:1/db?x=1"
    );
}

#[tokio::test]
async fn a_missing_database_is_reported_without_the_url() {
    run(|ctx| async move {
        let Some((base, _)) = ctx.url.rsplit_once('/') else {
            return;
        };
        let err = PgLogStore::connect(&format!("{base}/dispa_no_such_db"))
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("does not exist"), "{err}");
        assert!(!err.contains("postgres://"), "{err}");
    })
    .await;
}

#[tokio::test]
async fn survives_the_server_closing_its_connections() {
    run(|ctx| async move {
        // A per-test application name, so only this store's sessions are terminated.
        let app = ctx.schema.clone();
        let sep = if ctx.url.contains('?') { '&' } else { '?' };
        let url = format!("{}{sep}application_name={app}", ctx.url);
        let s = PgLogStore::connect_with_schema(&url, &ctx.schema)
            .await
            .unwrap();
        assert!(s.ingest(&batch("a", 1, vec![rec(MAR10, 1)])).await.unwrap());
        let kill = "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                    WHERE application_name = $1";
        let killed: i64 = ctx.admin.query_one(kill, &[&app]).await.unwrap().get(0);
        assert!(killed >= 1);
        assert!(
            s.ingest(&batch("a", 2, vec![rec(MAR10 + 1, 2)]))
                .await
                .unwrap()
        );
        ctx.admin.query_one(kill, &[&app]).await.unwrap();
        assert_eq!(s.query(&LogFilter::default(), 10).await.unwrap().len(), 2);
    })
    .await;
}
