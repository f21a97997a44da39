//! Access-log records from the request path. Recording never blocks: a record goes into a
//! bounded queue with `try_send`; a full queue drops it and counts the drop. A batcher task
//! turns the queue into batches on the disk spool (and, when asked, JSON lines on stdout).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use dispa_proto::v1::{LogBatch, LogRecord};
use http::{HeaderMap, HeaderName, HeaderValue};
use tokio::sync::{Notify, mpsc, watch};

use super::Metrics;
use super::spool::Spool;

/// Records waiting in memory for the batcher; more are dropped and counted.
pub const QUEUE_CAPACITY: usize = 65_536;
const BATCH_MAX: usize = 1_000;
const BATCH_LINGER: Duration = Duration::from_millis(100);
const MAX_REQUEST_ID: usize = 128;

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// Longest host kept in a record: a DNS name is at most 253 bytes, and stores index it.
pub const MAX_HOST: usize = 255;
/// Longest path (and query) kept in a record.
pub const MAX_PATH: usize = 2048;

/// `s` cut to at most `max` bytes on a character boundary, marked with "..." when cut, so
/// one oversized request cannot bloat or poison a log batch.
pub fn capped(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max.saturating_sub(3);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

#[derive(Clone, Debug, Default)]
pub struct AccessLogOptions {
    /// Also print each record as a JSON line on stdout.
    pub stdout: bool,
    /// Query parameters whose values are replaced by "REDACTED"; "*" redacts every value.
    pub redact_query: Vec<String>,
    /// Keep no traffic log at all: nothing spooled, shipped or printed (`--traffic-log off`).
    pub disabled: bool,
}

/// The request path's handle: cheap to clone, never blocks.
#[derive(Clone)]
pub struct LogSink {
    tx: mpsc::Sender<LogRecord>,
    metrics: Arc<Metrics>,
    pub redact_query: Arc<[String]>,
    pub agent: Arc<str>,
    disabled: bool,
}

impl LogSink {
    /// Whether records are kept; when not, the request path skips filling them in.
    pub fn enabled(&self) -> bool {
        !self.disabled
    }

    pub fn record(&self, r: LogRecord) {
        if self.disabled {
            return;
        }
        if self.tx.try_send(r).is_err() {
            self.metrics.log_dropped("queue_full", 1);
        }
    }
}

pub fn now_us() -> i64 {
    dispa_proto::logs::unix_us(SystemTime::now())
}

/// The inbound `x-request-id` if it is sane, else a new random one.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(&X_REQUEST_ID) {
        let ok = !v.is_empty()
            && v.len() <= MAX_REQUEST_ID
            && v.as_bytes().iter().all(|b| b.is_ascii_graphic());
        if ok {
            return v.clone();
        }
    }
    let mut id = [0u8; 32];
    hex_into(&fastrand::u128(..).to_be_bytes(), &mut id);
    crate::conn::head::cut_value(&id).unwrap_or_else(|| HeaderValue::from_static("invalid"))
}

/// A W3C `traceparent`: the inbound one if well-formed, else a new trace.
pub fn traceparent(headers: &HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(&TRACEPARENT) {
        let s = v.as_bytes();
        let hex = |r: std::ops::Range<usize>| {
            s[r].iter()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        };
        if s.len() == 55
            && s[2] == b'-'
            && s[35] == b'-'
            && s[52] == b'-'
            && hex(0..2)
            && hex(3..35)
            && hex(36..52)
            && hex(53..55)
        {
            return v.clone();
        }
    }
    // "00-<32 hex trace id>-<16 hex parent id>-01", written in place (no formatter).
    let mut tp = *b"00-00000000000000000000000000000000-0000000000000000-01";
    hex_into(&fastrand::u128(1..).to_be_bytes(), &mut tp[3..35]);
    hex_into(&fastrand::u64(1..).to_be_bytes(), &mut tp[36..52]);
    crate::conn::head::cut_value(&tp).unwrap_or_else(|| HeaderValue::from_static("invalid"))
}

/// Lower-case hex of `bytes` into `out` (twice as long).
fn hex_into(bytes: &[u8], out: &mut [u8]) {
    // encode_to_slice fails only on a length mismatch, which the callers rule out.
    let _ = hex::encode_to_slice(bytes, out);
}

/// Replaces the values of the named query parameters ("*": all) with "REDACTED".
pub fn redact_query(query: &str, names: &[String]) -> String {
    if names.is_empty() || query.is_empty() {
        return query.to_string();
    }
    let all = names.iter().any(|n| n == "*");
    query
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some((k, _)) if all || names.iter().any(|n| n == k) => format!("{k}=REDACTED"),
            _ => kv.to_string(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// Creates the sink and the receiving end for [`run_batcher`].
pub fn channel(
    metrics: Arc<Metrics>,
    agent: &str,
    opts: &AccessLogOptions,
) -> (LogSink, mpsc::Receiver<LogRecord>) {
    let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
    let sink = LogSink {
        tx,
        metrics,
        redact_query: opts.redact_query.clone().into(),
        agent: agent.into(),
        disabled: opts.disabled,
    };
    (sink, rx)
}

/// Moves records from the queue into spool batches until `stop` turns true, then drains what
/// is left. Each batch gets the next sequence number of this boot.
pub async fn run_batcher(
    mut rx: mpsc::Receiver<LogRecord>,
    spool: Arc<Spool>,
    shipped: Arc<Notify>,
    metrics: Arc<Metrics>,
    ids: (String, String),
    stdout: bool,
    mut stop: watch::Receiver<bool>,
) {
    let (agent_id, boot_id) = ids;
    let mut seq = 0u64;
    let mut stopping = false;
    loop {
        let mut records = Vec::new();
        if stopping {
            while records.len() < BATCH_MAX {
                match rx.try_recv() {
                    Ok(r) => records.push(r),
                    Err(_) => break,
                }
            }
            if records.is_empty() {
                return;
            }
        } else {
            tokio::select! {
                n = rx.recv_many(&mut records, BATCH_MAX) => if n == 0 { stopping = true; continue },
                _ = stop.changed() => { stopping = true; continue }
            }
            // Let a batch fill a little before writing it: sleep, then take what arrived. Not
            // waiting on the queue meanwhile keeps request threads from waking this task once
            // per record.
            if records.len() < BATCH_MAX {
                tokio::select! {
                    _ = tokio::time::sleep(BATCH_LINGER) => {}
                    _ = stop.changed() => stopping = true,
                }
                while records.len() < BATCH_MAX {
                    match rx.try_recv() {
                        Ok(r) => records.push(r),
                        Err(_) => break,
                    }
                }
            }
        }
        metrics
            .log_queue_depth
            .set((QUEUE_CAPACITY - rx.capacity().min(QUEUE_CAPACITY)) as i64);
        if stdout {
            // A slow stdout reader must not stall a runtime worker.
            tokio::task::block_in_place(|| {
                use std::io::Write;
                let mut out = std::io::stdout().lock();
                for r in &records {
                    let _ = writeln!(out, "{}", dispa_proto::logs::record_json(r));
                }
            });
        }
        seq += 1;
        let n = records.len() as u64;
        let batch = LogBatch {
            agent_id: agent_id.clone(),
            boot_id: boot_id.clone(),
            seq,
            records,
        };
        let s = spool.clone();
        match tokio::task::spawn_blocking(move || s.push(&batch)).await {
            Ok(Ok(true)) => shipped.notify_one(),
            Ok(Ok(false)) => metrics.log_dropped("spool_full", n),
            Ok(Err(e)) => {
                tracing::warn!("cannot spool log batch: {e}");
                metrics.log_dropped("spool_error", n);
            }
            Err(e) => {
                tracing::warn!("spool task failed: {e}");
                metrics.log_dropped("spool_error", n);
            }
        }
        let (batches, bytes) = spool.depth();
        metrics.log_spool_batches.set(batches as i64);
        metrics.log_spool_bytes.set(bytes as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_propagated_when_sane() {
        let mut h = HeaderMap::new();
        h.insert("x-request-id", HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&h), "abc-123");
        h.insert("x-request-id", HeaderValue::from_static("has space"));
        assert_ne!(request_id(&h), "has space");
        assert_eq!(request_id(&HeaderMap::new()).len(), 32);
    }

    #[test]
    fn traceparent_is_kept_or_created() {
        let mut h = HeaderMap::new();
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        h.insert("traceparent", HeaderValue::from_static(tp));
        assert_eq!(traceparent(&h), tp);
        h.insert("traceparent", HeaderValue::from_static("garbage"));
        let new = traceparent(&h);
        assert_eq!(new.len(), 55);
        assert!(new.to_str().unwrap().starts_with("00-"));
        // A new one is well-formed: it is kept as is when it comes back.
        h.insert("traceparent", new.clone());
        assert_eq!(traceparent(&h), new);
        let id = request_id(&HeaderMap::new());
        assert!(
            id.as_bytes()
                .iter()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
    }

    #[test]
    fn caps_long_fields() {
        assert_eq!(capped("abc", 3), "abc");
        assert_eq!(capped("abcdef", 5), "ab...");
        assert_eq!(capped("ééé", 5), "é...");
        assert_eq!(capped("ééé", 4), "...");
        assert!(capped(&"h".repeat(10_000), MAX_HOST).len() <= MAX_HOST);
    }

    #[test]
    fn redacts_named_query_values() {
        let names = vec!["token".to_string()];
        assert_eq!(
            redact_query("a=1&token=s3cret&b", &names),
            "a=1&token=REDACTED&b"
        );
        assert_eq!(
            redact_query("a=1&b=2", &["*".to_string()]),
            "a=REDACTED&b=REDACTED"
        );
        assert_eq!(redact_query("a=1", &[]), "a=1");
    }
}
