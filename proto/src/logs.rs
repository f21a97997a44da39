//! The JSON form of a traffic-log record, shared by the agent's `--access-log stdout` and
//! `dispactl logs -o json`, so both print the same field names.

use std::time::{Duration, UNIX_EPOCH};

use crate::v1::LogRecord;

/// A time as Unix microseconds (0 before the epoch, saturating far in the future): the one
/// conversion records, queries and stores use.
pub fn unix_us(t: std::time::SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// RFC 3339 with microseconds, UTC.
pub fn format_ts(ts_us: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_micros(ts_us.max(0).unsigned_abs());
    humantime::format_rfc3339_micros(t).to_string()
}

/// One record as a JSON object with snake_case field names.
pub fn record_json(r: &LogRecord) -> serde_json::Value {
    serde_json::json!({
        "ts": format_ts(r.ts_us),
        "agent": r.agent,
        "request_id": r.request_id,
        "client_ip": r.client_ip,
        "method": r.method,
        "scheme": r.scheme,
        "host": r.host,
        "path": r.path,
        "query": r.query,
        "status": r.status,
        "route": r.route,
        "upstream": r.upstream,
        "endpoint": r.endpoint,
        "attempts": r.attempts,
        "duration_ms": r.duration_us as f64 / 1000.0,
        "upstream_duration_ms": r.upstream_duration_us as f64 / 1000.0,
        "bytes_in": r.bytes_in,
        "bytes_out": r.bytes_out,
        "user_agent": r.user_agent,
        "tls_version": r.tls_version,
        "sni": r.sni,
        "denial_reason": r.denial_reason,
        "traceparent": r.traceparent,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fields_in_snake_case() {
        let r = LogRecord {
            ts_us: 1_500_000,
            request_id: "x".into(),
            duration_us: 2500,
            ..Default::default()
        };
        let j = record_json(&r);
        assert_eq!(j["ts"], "1970-01-01T00:00:01.500000Z");
        assert_eq!(j["request_id"], "x");
        assert_eq!(j["duration_ms"], 2.5);
    }
}
