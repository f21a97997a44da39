//! Between `LogRecord` and rows of `dispa_logs`: the column list, the binary timestamp type,
//! saturating integer conversions and the query built from a [`LogFilter`].

use std::error::Error;

use bytes::{BufMut, BytesMut};
use dispa_proto::v1::LogRecord;
use tokio_postgres::Row;
use tokio_postgres::types::{FromSql, IsNull, ToSql, Type, accepts, to_sql_checked};

use crate::logs::{LogFilter, StatusMatch};

pub(super) const DAY_US: i64 = 86_400 * 1_000_000;
/// 0001-01-01T00:00:00Z: stored times are clamped to years 1..=9999, well inside what
/// PostgreSQL accepts, so an odd `ts_us` from an agent never fails a whole batch.
pub(super) const MIN_TS_US: i64 = -62_135_596_800_000_000;
/// 9999-12-30T23:59:59.999999Z, so the last day's partition ends on 9999-12-31.
pub(super) const MAX_TS_US: i64 = 253_402_214_400_000_000 - 1;
/// PostgreSQL counts timestamps from 2000-01-01T00:00:00Z.
const PG_EPOCH_US: i64 = 946_684_800_000_000;

/// A point in time as Unix microseconds, sent and read as binary `timestamptz`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct PgTs(pub i64);

impl PgTs {
    /// Clamped to the stored range.
    pub(super) fn from_unix_us(us: i64) -> Self {
        PgTs(us.clamp(MIN_TS_US, MAX_TS_US))
    }
}

impl ToSql for PgTs {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        out.put_i64(self.0.saturating_sub(PG_EPOCH_US));
        Ok(IsNull::No)
    }

    accepts!(TIMESTAMPTZ);
    to_sql_checked!();
}

impl<'a> FromSql<'a> for PgTs {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn Error + Sync + Send>> {
        let b: [u8; 8] = raw
            .try_into()
            .map_err(|_| format!("timestamptz of {} bytes", raw.len()))?;
        // ±infinity are i64::MAX/MIN: saturate rather than fail.
        Ok(PgTs(i64::from_be_bytes(b).saturating_add(PG_EPOCH_US)))
    }

    accepts!(TIMESTAMPTZ);
}

/// The columns of `dispa_logs`, in COPY and SELECT order.
pub(super) const COLUMNS: &str = "ts, agent, request_id, client_ip, method, scheme, host, path, \
     query, status, route, upstream, endpoint, attempts, duration_us, upstream_duration_us, \
     bytes_in, bytes_out, user_agent, tls_version, sni, denial_reason, traceparent";

pub(super) const COLUMN_TYPES: [Type; 23] = [
    Type::TIMESTAMPTZ, // ts
    Type::TEXT,        // agent
    Type::TEXT,        // request_id
    Type::TEXT,        // client_ip
    Type::TEXT,        // method
    Type::TEXT,        // scheme
    Type::TEXT,        // host
    Type::TEXT,        // path
    Type::TEXT,        // query
    Type::INT4,        // status
    Type::TEXT,        // route
    Type::TEXT,        // upstream
    Type::TEXT,        // endpoint
    Type::INT4,        // attempts
    Type::INT8,        // duration_us
    Type::INT8,        // upstream_duration_us
    Type::INT8,        // bytes_in
    Type::INT8,        // bytes_out
    Type::TEXT,        // user_agent
    Type::TEXT,        // tls_version
    Type::TEXT,        // sni
    Type::TEXT,        // denial_reason
    Type::TEXT,        // traceparent
];

/// The column definitions for `CREATE TABLE dispa_logs`.
pub(super) const COLUMN_DDL: &str = "ts timestamptz NOT NULL, agent text NOT NULL, \
     request_id text NOT NULL, client_ip text NOT NULL, method text NOT NULL, \
     scheme text NOT NULL, host text NOT NULL, path text NOT NULL, query text NOT NULL, \
     status integer NOT NULL, route text NOT NULL, upstream text NOT NULL, \
     endpoint text NOT NULL, attempts integer NOT NULL, duration_us bigint NOT NULL, \
     upstream_duration_us bigint NOT NULL, bytes_in bigint NOT NULL, bytes_out bigint NOT NULL, \
     user_agent text NOT NULL, tls_version text NOT NULL, sni text NOT NULL, \
     denial_reason text NOT NULL, traceparent text NOT NULL";

/// Unsigned protobuf fields go into signed columns; values past the column's range (never
/// seen from a real agent) saturate instead of failing the batch.
pub(super) fn i32_of(v: u32) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}

pub(super) fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The numeric columns of one record, owned so the COPY row can borrow them.
pub(super) struct Numbers {
    pub ts: PgTs,
    pub status: i32,
    pub attempts: i32,
    pub duration_us: i64,
    pub upstream_duration_us: i64,
    pub bytes_in: i64,
    pub bytes_out: i64,
}

impl Numbers {
    pub(super) fn of(r: &LogRecord) -> Self {
        Numbers {
            ts: PgTs::from_unix_us(r.ts_us),
            status: i32_of(r.status),
            attempts: i32_of(r.attempts),
            duration_us: i64_of(r.duration_us),
            upstream_duration_us: i64_of(r.upstream_duration_us),
            bytes_in: i64_of(r.bytes_in),
            bytes_out: i64_of(r.bytes_out),
        }
    }

    /// One COPY row in [`COLUMNS`] order.
    pub(super) fn row<'a>(&'a self, r: &'a LogRecord) -> [&'a (dyn ToSql + Sync); 23] {
        [
            &self.ts,
            &r.agent,
            &r.request_id,
            &r.client_ip,
            &r.method,
            &r.scheme,
            &r.host,
            &r.path,
            &r.query,
            &self.status,
            &r.route,
            &r.upstream,
            &r.endpoint,
            &self.attempts,
            &self.duration_us,
            &self.upstream_duration_us,
            &self.bytes_in,
            &self.bytes_out,
            &r.user_agent,
            &r.tls_version,
            &r.sni,
            &r.denial_reason,
            &r.traceparent,
        ]
    }
}

/// A row selected with [`COLUMNS`] back into a record.
pub(super) fn record_of(row: &Row) -> Result<LogRecord, tokio_postgres::Error> {
    let u32_at = |i: usize| {
        row.try_get::<_, i32>(i)
            .map(|v| u32::try_from(v).unwrap_or(0))
    };
    let u64_at = |i: usize| {
        row.try_get::<_, i64>(i)
            .map(|v| u64::try_from(v).unwrap_or(0))
    };
    Ok(LogRecord {
        ts_us: row.try_get::<_, PgTs>(0)?.0,
        agent: row.try_get(1)?,
        request_id: row.try_get(2)?,
        client_ip: row.try_get(3)?,
        method: row.try_get(4)?,
        scheme: row.try_get(5)?,
        host: row.try_get(6)?,
        path: row.try_get(7)?,
        query: row.try_get(8)?,
        status: u32_at(9)?,
        route: row.try_get(10)?,
        upstream: row.try_get(11)?,
        endpoint: row.try_get(12)?,
        attempts: u32_at(13)?,
        duration_us: u64_at(14)?,
        upstream_duration_us: u64_at(15)?,
        bytes_in: u64_at(16)?,
        bytes_out: u64_at(17)?,
        user_agent: row.try_get(18)?,
        tls_version: row.try_get(19)?,
        sni: row.try_get(20)?,
        denial_reason: row.try_get(21)?,
        traceparent: row.try_get(22)?,
    })
}

pub(super) type Param = Box<dyn ToSql + Sync + Send>;

/// The SQL form of [`LogFilter::matches`], newest first, every value a bind parameter.
pub(super) fn select_sql(table: &str, f: &LogFilter, limit: usize) -> (String, Vec<Param>) {
    let mut params: Vec<Param> = Vec::new();
    let mut conds: Vec<String> = Vec::new();
    let bind = |params: &mut Vec<Param>, p: Param| {
        params.push(p);
        format!("${}", params.len())
    };
    for (col, v) in [
        ("host", &f.host),
        ("route", &f.route),
        ("agent", &f.agent),
        ("method", &f.method),
        ("client_ip", &f.client),
    ] {
        if let Some(v) = v {
            let p = bind(&mut params, Box::new(v.clone()));
            conds.push(format!("{col} = {p}"));
        }
    }
    if let Some(prefix) = &f.path_prefix {
        // starts_with, not LIKE: '%' and '_' in the prefix stay literal.
        let p = bind(&mut params, Box::new(prefix.clone()));
        conds.push(format!("starts_with(path, {p})"));
    }
    if !f.status.is_empty() {
        let any: Vec<String> = f
            .status
            .iter()
            .map(|s| match *s {
                StatusMatch::Code(c) => {
                    format!("status = {}", bind(&mut params, Box::new(i32::from(c))))
                }
                StatusMatch::Class(c) => {
                    let lo = bind(&mut params, Box::new(i32::from(c) * 100));
                    let hi = bind(&mut params, Box::new((i32::from(c) + 1) * 100));
                    format!("(status >= {lo} AND status < {hi})")
                }
            })
            .collect();
        conds.push(format!("({})", any.join(" OR ")));
    }
    if let Some(t) = f.since_us {
        let p = bind(&mut params, Box::new(PgTs::from_unix_us(t)));
        conds.push(format!("ts >= {p}"));
    }
    if let Some(t) = f.until_us {
        let p = bind(&mut params, Box::new(PgTs::from_unix_us(t)));
        conds.push(format!("ts <= {p}"));
    }
    let limit = bind(
        &mut params,
        Box::new(i64::try_from(limit).unwrap_or(i64::MAX)),
    );
    let filter = if conds.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conds.join(" AND "))
    };
    (
        format!("SELECT {COLUMNS} FROM {table}{filter} ORDER BY ts DESC LIMIT {limit}"),
        params,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_and_clamp() {
        let mut buf = BytesMut::new();
        for us in [0, 1, -1, 1_700_000_000_123_456, MIN_TS_US, MAX_TS_US] {
            buf.clear();
            PgTs::from_unix_us(us)
                .to_sql(&Type::TIMESTAMPTZ, &mut buf)
                .unwrap();
            assert_eq!(PgTs::from_sql(&Type::TIMESTAMPTZ, &buf).unwrap().0, us);
        }
        assert_eq!(PgTs::from_unix_us(i64::MAX).0, MAX_TS_US);
        assert_eq!(PgTs::from_unix_us(i64::MIN).0, MIN_TS_US);
        // 2000-01-01 is PostgreSQL's zero.
        buf.clear();
        PgTs(PG_EPOCH_US)
            .to_sql(&Type::TIMESTAMPTZ, &mut buf)
            .unwrap();
        assert_eq!(&buf[..], &[0u8; 8]);
        assert_eq!(
            PgTs::from_sql(&Type::TIMESTAMPTZ, &i64::MAX.to_be_bytes())
                .unwrap()
                .0,
            i64::MAX
        );
        assert!(PgTs::from_sql(&Type::TIMESTAMPTZ, &[0; 4]).is_err());
    }

    #[test]
    fn integers_saturate() {
        assert_eq!(i32_of(404), 404);
        assert_eq!(i32_of(u32::MAX), i32::MAX);
        assert_eq!(i64_of(u64::MAX), i64::MAX);
    }

    #[test]
    fn filter_becomes_bound_sql() {
        let (sql, params) = select_sql("s.t", &LogFilter::default(), 10);
        assert_eq!(
            sql,
            format!("SELECT {COLUMNS} FROM s.t ORDER BY ts DESC LIMIT $1")
        );
        assert_eq!(params.len(), 1);
        let f = LogFilter {
            host: Some("a'; DROP TABLE x; --".into()),
            status: vec![StatusMatch::Code(404), StatusMatch::Class(5)],
            path_prefix: Some("/v1/%".into()),
            since_us: Some(5),
            ..Default::default()
        };
        let (sql, params) = select_sql("s.t", &f, 10);
        assert!(!sql.contains("DROP"), "{sql}");
        assert!(
            sql.ends_with(
                " WHERE host = $1 AND starts_with(path, $2) AND (status = $3 OR \
                 (status >= $4 AND status < $5)) AND ts >= $6 ORDER BY ts DESC LIMIT $7"
            ),
            "{sql}"
        );
        assert_eq!(params.len(), 7);
    }
}
