//! The real PostgreSQL the log-store tests use (`DISPA_TEST_POSTGRES`, default
//! postgres://postgres@127.0.0.1:5432/test). Each test gets its own schema, dropped at the end.
//! Without a server a test skips with a message, except under `CI=true`, where it fails.

use tokio_postgres::NoTls;

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

pub struct TestSchema {
    pub url: String,
    pub schema: String,
}

impl TestSchema {
    /// A fresh schema name, or `None` (after saying why) when there is no server here.
    pub async fn new(prefix: &str) -> Option<TestSchema> {
        let url = std::env::var("DISPA_TEST_POSTGRES").unwrap_or_else(|_| DEFAULT_URL.to_string());
        let reachable = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            tokio_postgres::connect(&url, NoTls),
        )
        .await;
        if !matches!(reachable, Ok(Ok(_))) {
            let msg = "PostgreSQL not reachable at DISPA_TEST_POSTGRES (default 127.0.0.1:5432, user postgres, database test)";
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{msg}; CI=true requires it"
            );
            eprintln!("skipping: {msg}");
            return None;
        }
        let schema = format!("{prefix}_{:016x}", fastrand::u64(..));
        Some(TestSchema { url, schema })
    }

    /// Drops the schema and everything in it.
    pub async fn drop_schema(&self) {
        if let Ok((client, conn)) = tokio_postgres::connect(&self.url, NoTls).await {
            tokio::spawn(conn);
            let _ = client
                .batch_execute(&format!(
                    "DROP SCHEMA IF EXISTS \"{}\" CASCADE",
                    self.schema
                ))
                .await;
        }
    }
}
