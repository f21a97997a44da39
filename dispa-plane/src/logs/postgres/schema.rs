//! Tables, migrations and daily partitions. Identifiers are quoted here; every value elsewhere
//! is a bind parameter (DDL cannot take parameters, so partition bounds are formatted from
//! integers, never from input text).

use tokio_postgres::{Client, GenericClient};

use super::codec::{COLUMN_DDL, DAY_US, MAX_TS_US, MIN_TS_US};

/// The schema version this build writes; a database at a newer one is refused.
const CURRENT_VERSION: i32 = 1;
/// First key of the advisory locks that serialize migrations and partition creation across
/// connections and plane processes; the second is a hash of the schema name.
const LOCK_KEY: i32 = 0x6469_7370; // "disp"

const PARTITION_PREFIX: &str = "dispa_logs_p";

/// `"name"` with embedded quotes doubled.
pub(super) fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Fully qualified names, computed once per store.
#[derive(Clone, Debug)]
pub(super) struct Names {
    /// The unquoted schema name (for advisory-lock keys and catalog lookups).
    pub schema: String,
    pub schema_q: String,
    pub logs: String,
    pub batches: String,
    pub version: String,
}

impl Names {
    pub(super) fn new(schema: &str) -> Self {
        let q = quote_ident(schema);
        Names {
            schema: schema.to_string(),
            logs: format!("{q}.dispa_logs"),
            batches: format!("{q}.dispa_log_batches"),
            version: format!("{q}.dispa_schema_version"),
            schema_q: q,
        }
    }

    pub(super) fn partition(&self, name: &str) -> String {
        format!("{}.{}", self.schema_q, quote_ident(name))
    }
}

pub(super) async fn advisory_lock(
    c: &impl GenericClient,
    names: &Names,
    what: &str,
) -> Result<(), tokio_postgres::Error> {
    c.execute(
        "SELECT pg_advisory_xact_lock($1, hashtext($2))",
        &[&LOCK_KEY, &format!("{what}:{}", names.schema)],
    )
    .await
    .map(drop)
}

/// Creates the tables if missing and brings an older schema up to date, under an advisory
/// lock so planes starting together do not race.
pub(super) async fn migrate(
    client: &mut Client,
    names: &Names,
    create_schema: bool,
) -> Result<(), MigrateError> {
    let tx = client.transaction().await?;
    advisory_lock(&tx, names, "migrate").await?;
    if create_schema {
        tx.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {}", names.schema_q))
            .await?;
    }
    tx.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS {} (id integer PRIMARY KEY CHECK (id = 1), \
         version integer NOT NULL)",
        names.version
    ))
    .await?;
    let version: i32 = tx
        .query_opt(
            &format!("SELECT version FROM {} WHERE id = 1", names.version),
            &[],
        )
        .await?
        .map(|r| r.try_get(0))
        .transpose()?
        .unwrap_or(0);
    if version > CURRENT_VERSION {
        return Err(MigrateError::TooNew(version));
    }
    if version < 1 {
        let (logs, batches) = (&names.logs, &names.batches);
        tx.batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {batches} (
                 agent text NOT NULL,
                 boot_id text NOT NULL,
                 seq bigint NOT NULL,
                 received_at timestamptz NOT NULL DEFAULT now(),
                 PRIMARY KEY (agent, boot_id, seq));
             CREATE INDEX IF NOT EXISTS dispa_log_batches_received_at_idx
                 ON {batches} (received_at);
             CREATE TABLE IF NOT EXISTS {logs} ({COLUMN_DDL}) PARTITION BY RANGE (ts);
             CREATE INDEX IF NOT EXISTS dispa_logs_ts_idx ON {logs} (ts);
             CREATE INDEX IF NOT EXISTS dispa_logs_host_ts_idx ON {logs} (host, ts);
             CREATE INDEX IF NOT EXISTS dispa_logs_status_ts_idx ON {logs} (status, ts);
             CREATE INDEX IF NOT EXISTS dispa_logs_route_ts_idx ON {logs} (route, ts);"
        ))
        .await?;
    }
    if version < CURRENT_VERSION {
        tx.execute(
            &format!(
                "INSERT INTO {} (id, version) VALUES (1, $1) \
                 ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version",
                names.version
            ),
            &[&CURRENT_VERSION],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

#[derive(Debug)]
pub(super) enum MigrateError {
    Pg(tokio_postgres::Error),
    TooNew(i32),
}

impl From<tokio_postgres::Error> for MigrateError {
    fn from(e: tokio_postgres::Error) -> Self {
        MigrateError::Pg(e)
    }
}

/// The UTC day (days since 1970-01-01) holding `ts_us`, after clamping.
pub(super) fn day_of(ts_us: i64) -> i64 {
    ts_us.clamp(MIN_TS_US, MAX_TS_US).div_euclid(DAY_US)
}

/// Proleptic Gregorian (year, month, day) of a day count since 1970-01-01, by splitting the
/// calendar into 400-year eras that start on March 1 (so leap days fall at an era's end).
pub(super) fn civil_date(days: i64) -> (i64, u32, u32) {
    const DAYS_PER_ERA: i64 = 146_097;
    // 0000-03-01 is 719_468 days before 1970-01-01.
    let z = days + 719_468;
    let era = z.div_euclid(DAYS_PER_ERA);
    let day_of_era = z.rem_euclid(DAYS_PER_ERA);
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    // Months counted from March; 153 days per five months.
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    // Both are in small ranges by construction (1..=12, 1..=31).
    (
        year,
        u32::try_from(month).unwrap_or(1),
        u32::try_from(day).unwrap_or(1),
    )
}

fn date_text(days: i64) -> String {
    let (y, m, d) = civil_date(days);
    format!("{y:04}-{m:02}-{d:02}")
}

/// `dispa_logs_pYYYYMMDD`: names sort in date order, which retention relies on.
pub(super) fn partition_name(day: i64) -> String {
    let (y, m, d) = civil_date(day);
    format!("{PARTITION_PREFIX}{y:04}{m:02}{d:02}")
}

/// Whether `name` is one of our daily partitions (and so comparable by name).
pub(super) fn is_partition_name(name: &str) -> bool {
    name.strip_prefix(PARTITION_PREFIX)
        .is_some_and(|d| d.len() == 8 && d.bytes().all(|b| b.is_ascii_digit()))
}

/// Creates the partition for `day` unless it exists. The advisory lock makes concurrent
/// creators (other connections, other planes) wait for each other, so the loser sees the
/// table and skips; "already exists" errors are still tolerated in case someone else created
/// it without the lock.
pub(super) async fn create_partition(
    client: &mut Client,
    names: &Names,
    day: i64,
) -> Result<(), tokio_postgres::Error> {
    let name = partition_name(day);
    let exists = client
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL",
            &[&names.partition(&name)],
        )
        .await?
        .try_get::<_, bool>(0)?;
    if exists {
        return Ok(());
    }
    let sql = format!(
        "CREATE TABLE IF NOT EXISTS {} PARTITION OF {} \
         FOR VALUES FROM ('{} 00:00:00+00') TO ('{} 00:00:00+00')",
        names.partition(&name),
        names.logs,
        date_text(day),
        date_text(day + 1),
    );
    let tx = client.transaction().await?;
    advisory_lock(&tx, names, "partition").await?;
    let res = match tx.batch_execute(&sql).await {
        Ok(()) => tx.commit().await,
        Err(e) => Err(e),
    };
    match res {
        Err(e) if is_already_exists(&e) => Ok(()),
        other => other,
    }
}

fn is_already_exists(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    e.code()
        .is_some_and(|c| *c == SqlState::DUPLICATE_TABLE || *c == SqlState::UNIQUE_VIOLATION)
}

/// Our partitions of `dispa_logs` whose whole day is before `cutoff_day`.
pub(super) async fn partitions_before(
    client: &Client,
    names: &Names,
    cutoff_day: i64,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             WHERE i.inhparent = to_regclass($1) ORDER BY 1",
            &[&names.logs],
        )
        .await?;
    let cutoff = partition_name(cutoff_day);
    let mut out = Vec::new();
    for r in rows {
        let name: String = r.try_get(0)?;
        if is_partition_name(&name) && name < cutoff {
            out.push(name);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_date(0), (1970, 1, 1));
        assert_eq!(civil_date(-1), (1969, 12, 31));
        assert_eq!(civil_date(59), (1970, 3, 1));
        assert_eq!(civil_date(10_957), (2000, 1, 1));
        assert_eq!(civil_date(11_016), (2000, 2, 29));
        assert_eq!(civil_date(19_782), (2024, 2, 29));
        assert_eq!(civil_date(19_783), (2024, 3, 1));
        assert_eq!(civil_date(10_957 + 146_097), (2400, 1, 1));
        assert_eq!(civil_date(day_of(MIN_TS_US)), (1, 1, 1));
        assert_eq!(civil_date(day_of(MAX_TS_US)), (9999, 12, 30));
        assert_eq!(civil_date(day_of(MAX_TS_US) + 1), (9999, 12, 31));
        // Consecutive days never skip or repeat a date.
        let mut prev = civil_date(day_of(MIN_TS_US));
        for d in day_of(MIN_TS_US) + 1..=day_of(MAX_TS_US) + 1 {
            let cur = civil_date(d);
            assert!(cur > prev, "{d}: {cur:?} after {prev:?}");
            if cur.1 == prev.1 {
                assert_eq!(cur.2, prev.2 + 1, "{d}");
            } else {
                assert!(cur.2 == 1 && (28..=31).contains(&prev.2), "{d}");
            }
            prev = cur;
        }
    }

    #[test]
    fn partition_names_sort_by_date() {
        assert_eq!(partition_name(0), "dispa_logs_p19700101");
        assert_eq!(partition_name(day_of(i64::MIN)), "dispa_logs_p00010101");
        assert!(partition_name(day_of(-1)) < partition_name(0));
        assert!(partition_name(400) < partition_name(40_000));
        assert!(is_partition_name("dispa_logs_p20240229"));
        assert!(!is_partition_name("dispa_logs_p2024022"));
        assert!(!is_partition_name("dispa_logs_default"));
        assert_eq!(day_of(-1), -1);
        assert_eq!(day_of(DAY_US), 1);
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        let n = Names::new("t s");
        assert_eq!(n.logs, "\"t s\".dispa_logs");
        assert_eq!(n.partition("x"), "\"t s\".\"x\"");
    }
}
