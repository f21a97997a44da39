//! The log query filter: parsed once from the wire, matched as a plain function (the sled
//! store and live follow use it; PostgreSQL translates it to SQL).

use dispa_proto::v1::{LogQuery, LogRecord};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusMatch {
    Code(u16),
    /// 1..=5 for "1xx".."5xx".
    Class(u16),
}

impl StatusMatch {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim().to_ascii_lowercase();
        let bad = || format!("invalid status {s:?}: use a code like 404 or a class like 5xx");
        if let Some(d) = s.strip_suffix("xx") {
            let c: u16 = d.parse().map_err(|_| bad())?;
            return if (1..=5).contains(&c) {
                Ok(StatusMatch::Class(c))
            } else {
                Err(bad())
            };
        }
        let code: u16 = s.parse().map_err(|_| bad())?;
        if (100..=599).contains(&code) {
            Ok(StatusMatch::Code(code))
        } else {
            Err(bad())
        }
    }

    pub fn matches(self, status: u32) -> bool {
        match self {
            StatusMatch::Code(c) => status == u32::from(c),
            StatusMatch::Class(c) => status / 100 == u32::from(c),
        }
    }
}

/// Every field is optional; a record matches when it matches all that are set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogFilter {
    pub host: Option<String>,
    pub route: Option<String>,
    pub agent: Option<String>,
    pub status: Vec<StatusMatch>,
    pub method: Option<String>,
    pub path_prefix: Option<String>,
    pub client: Option<String>,
    pub since_us: Option<i64>,
    pub until_us: Option<i64>,
}

fn opt(s: &str) -> Option<String> {
    let t = s.trim();
    (!t.is_empty()).then(|| t.to_string())
}

impl LogFilter {
    pub fn from_query(q: &LogQuery) -> Result<Self, String> {
        let status = q
            .status
            .iter()
            .flat_map(|s| s.split(','))
            .filter(|s| !s.trim().is_empty())
            .map(StatusMatch::parse)
            .collect::<Result<_, _>>()?;
        Ok(LogFilter {
            host: opt(&q.host).map(|h| h.to_ascii_lowercase()),
            route: opt(&q.route),
            agent: opt(&q.agent),
            status,
            method: opt(&q.method).map(|m| m.to_ascii_uppercase()),
            path_prefix: opt(&q.path_prefix),
            client: opt(&q.client),
            since_us: (q.since_us > 0).then_some(q.since_us),
            until_us: (q.until_us > 0).then_some(q.until_us),
        })
    }

    pub fn matches(&self, r: &LogRecord) -> bool {
        let eq = |f: &Option<String>, v: &str| f.as_deref().is_none_or(|f| f == v);
        eq(&self.host, &r.host)
            && eq(&self.route, &r.route)
            && eq(&self.agent, &r.agent)
            && eq(&self.method, &r.method)
            && eq(&self.client, &r.client_ip)
            && self
                .path_prefix
                .as_deref()
                .is_none_or(|p| r.path.starts_with(p))
            && (self.status.is_empty() || self.status.iter().any(|s| s.matches(r.status)))
            && self.since_us.is_none_or(|t| r.ts_us >= t)
            && self.until_us.is_none_or(|t| r.ts_us <= t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(status: u32, path: &str) -> LogRecord {
        LogRecord {
            ts_us: 100,
            host: "api.example.com".into(),
            method: "GET".into(),
            status,
            path: path.into(),
            ..Default::default()
        }
    }

    #[test]
    fn parses_and_matches() {
        let q = LogQuery {
            host: "API.example.com".into(),
            status: vec!["404,5xx".into()],
            method: "get".into(),
            path_prefix: "/v1/".into(),
            since_us: 50,
            ..Default::default()
        };
        let f = LogFilter::from_query(&q).unwrap();
        assert!(f.matches(&rec(404, "/v1/a")));
        assert!(f.matches(&rec(503, "/v1/a")));
        assert!(!f.matches(&rec(200, "/v1/a")));
        assert!(!f.matches(&rec(404, "/v2/a")));
        let late = LogFilter {
            since_us: Some(101),
            ..f
        };
        assert!(!late.matches(&rec(404, "/v1/a")));
        assert!(
            LogFilter::from_query(&LogQuery {
                status: vec!["6xx".into()],
                ..Default::default()
            })
            .is_err()
        );
        assert!(
            LogFilter::from_query(&LogQuery {
                status: vec!["20".into()],
                ..Default::default()
            })
            .is_err()
        );
        assert!(LogFilter::default().matches(&rec(200, "/")));
    }
}
