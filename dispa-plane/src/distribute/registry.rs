//! The agent registry: what the plane knows of each agent. Plain data behind a mutex; the sync
//! state is derived from it and the current version, never stored.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::SystemTime;

use dispa_proto::v1::MetricsSummary;
use dispa_proto::{AgentId, Version};

/// An agent's sync state relative to the newest version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncState {
    /// Serving the newest version.
    Synced,
    /// Connected, newest version sent or about to be, no answer yet.
    Pending,
    /// Rejected the newest version; serving an older one.
    Nacked,
    /// No open stream.
    Disconnected,
}

#[derive(Clone, Debug)]
pub struct AgentRecord {
    pub id: AgentId,
    pub labels: BTreeMap<String, String>,
    pub build_version: String,
    pub protocol_version: String,
    pub peer: String,
    /// The open stream's id; `None` when disconnected.
    pub connection: Option<u64>,
    pub sent_version: Version,
    pub acked_version: Version,
    pub nacked_version: Version,
    pub last_error: String,
    pub last_seen: SystemTime,
    pub connected_since: SystemTime,
    /// The agent's latest metrics summary.
    pub metrics: Option<MetricsSummary>,
}

/// Agents per sync state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StateCounts {
    pub synced: u32,
    pub pending: u32,
    pub nacked: u32,
    pub disconnected: u32,
}

impl AgentRecord {
    /// A record for an agent the plane knows nothing else about yet.
    fn blank(id: AgentId, now: SystemTime) -> Self {
        AgentRecord {
            id,
            labels: BTreeMap::new(),
            build_version: String::new(),
            protocol_version: String::new(),
            peer: String::new(),
            connection: None,
            sent_version: Version::NONE,
            acked_version: Version::NONE,
            nacked_version: Version::NONE,
            last_error: String::new(),
            last_seen: now,
            connected_since: now,
            metrics: None,
        }
    }

    pub fn state(&self, current: Version) -> SyncState {
        if self.connection.is_none() {
            SyncState::Disconnected
        } else if self.acked_version == current {
            SyncState::Synced
        } else if self.nacked_version == current {
            SyncState::Nacked
        } else {
            SyncState::Pending
        }
    }
}

/// What an agent says about itself when it connects.
#[derive(Clone, Debug)]
pub struct Hello {
    pub id: AgentId,
    pub labels: BTreeMap<String, String>,
    pub build_version: String,
    pub protocol_version: String,
    pub peer: String,
    /// The version it already serves, if the plane agrees on its content.
    pub serving: Version,
}

/// Bounds the registry: disconnected agents beyond this many are forgotten, oldest first.
const MAX_AGENTS: usize = 100_000;

#[derive(Default)]
pub struct AgentRegistry {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    agents: HashMap<AgentId, AgentRecord>,
    next_connection: u64,
}

impl AgentRegistry {
    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        // A poisoned lock only means another thread panicked mid-update of plain data.
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    /// Registers a new stream and returns its connection id. A second stream with the same
    /// agent id takes over the record; the older stream's later updates are ignored.
    pub fn connect(&self, hello: Hello, now: SystemTime) -> (u64, bool) {
        self.with(|inner| {
            inner.next_connection += 1;
            let conn = inner.next_connection;
            make_room(&mut inner.agents, &hello.id);
            let prev = inner.agents.remove(&hello.id);
            let replaced = prev.as_ref().is_some_and(|a| a.connection.is_some());
            let mut rec = AgentRecord::blank(hello.id.clone(), now);
            if let Some(p) = prev {
                // What the agent was told to fix survives its reconnect.
                rec.nacked_version = p.nacked_version;
                rec.last_error = p.last_error;
                rec.metrics = p.metrics;
            }
            rec.labels = hello.labels;
            rec.build_version = hello.build_version;
            rec.protocol_version = hello.protocol_version;
            rec.peer = hello.peer;
            rec.connection = Some(conn);
            rec.acked_version = hello.serving;
            inner.agents.insert(hello.id, rec);
            (conn, replaced)
        })
    }

    /// Agents per sync state relative to `current`.
    pub fn counts(&self, current: Version) -> StateCounts {
        self.with(|inner| {
            let mut c = StateCounts::default();
            for a in inner.agents.values() {
                match a.state(current) {
                    SyncState::Synced => c.synced += 1,
                    SyncState::Pending => c.pending += 1,
                    SyncState::Nacked => c.nacked += 1,
                    SyncState::Disconnected => c.disconnected += 1,
                }
            }
            c
        })
    }

    fn update(&self, id: &AgentId, conn: u64, now: SystemTime, f: impl FnOnce(&mut AgentRecord)) {
        self.with(|inner| {
            if let Some(a) = inner.agents.get_mut(id)
                && a.connection == Some(conn)
            {
                a.last_seen = now;
                f(a);
            }
        });
    }

    pub fn sent(&self, id: &AgentId, conn: u64, version: Version, now: SystemTime) {
        self.update(id, conn, now, |a| a.sent_version = version);
    }

    pub fn acked(&self, id: &AgentId, conn: u64, version: Version, now: SystemTime) {
        self.update(id, conn, now, |a| {
            a.acked_version = version;
            if version >= a.nacked_version {
                a.last_error.clear();
            }
        });
    }

    pub fn nacked(&self, id: &AgentId, conn: u64, version: Version, error: &str, now: SystemTime) {
        self.update(id, conn, now, |a| {
            a.nacked_version = version;
            a.last_error = error.to_string();
        });
    }

    /// Records an agent's metrics summary (from its Telemetry stream).
    pub fn report_metrics(&self, id: &AgentId, m: MetricsSummary, now: SystemTime) {
        self.with(|inner| {
            if let Some(a) = inner.agents.get_mut(id) {
                a.metrics = Some(m);
                if a.connection.is_some() {
                    a.last_seen = now;
                }
            }
        });
    }

    pub fn disconnected(&self, id: &AgentId, conn: u64, now: SystemTime) {
        self.update(id, conn, now, |a| a.connection = None);
    }

    /// Records an agent the plane refused (e.g. protocol mismatch) so operators can see why.
    pub fn refused(&self, hello: Hello, error: String, now: SystemTime) {
        self.with(|inner| {
            make_room(&mut inner.agents, &hello.id);
            let e = inner
                .agents
                .entry(hello.id.clone())
                .or_insert_with(|| AgentRecord::blank(hello.id.clone(), now));
            if e.connection.is_none() {
                e.labels = hello.labels;
                e.build_version = hello.build_version;
                e.protocol_version = hello.protocol_version;
                e.peer = hello.peer;
                e.last_error = error;
                e.last_seen = now;
            }
        });
    }

    /// Every agent, sorted by id.
    pub fn list(&self) -> Vec<AgentRecord> {
        let mut v: Vec<_> = self.with(|inner| inner.agents.values().cloned().collect());
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }
}

/// Keeps the registry under its bound before `id` is added.
fn make_room(agents: &mut HashMap<AgentId, AgentRecord>, id: &AgentId) {
    if agents.len() >= MAX_AGENTS && !agents.contains_key(id) {
        evict_oldest_disconnected(agents);
    }
}

fn evict_oldest_disconnected(agents: &mut HashMap<AgentId, AgentRecord>) {
    let oldest = agents
        .values()
        .filter(|a| a.connection.is_none())
        .min_by_key(|a| a.last_seen)
        .map(|a| a.id.clone());
    if let Some(id) = oldest {
        agents.remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(id: &str, serving: u64) -> Hello {
        Hello {
            id: AgentId::new(id),
            labels: BTreeMap::new(),
            build_version: "0".into(),
            protocol_version: "1.0".into(),
            peer: "p".into(),
            serving: Version(serving),
        }
    }

    #[test]
    fn states_follow_acks_nacks_and_disconnects() {
        let r = AgentRegistry::default();
        let t = SystemTime::UNIX_EPOCH;
        let id = AgentId::new("a");
        let (c, _) = r.connect(hello("a", 0), t);
        let state = |v| r.list()[0].state(Version(v));
        assert_eq!(state(1), SyncState::Pending);
        r.acked(&id, c, Version(1), t);
        assert_eq!(state(1), SyncState::Synced);
        r.nacked(&id, c, Version(2), "bad", t);
        assert_eq!(state(2), SyncState::Nacked);
        assert_eq!(r.list()[0].last_error, "bad");
        assert_eq!(state(3), SyncState::Pending);
        r.acked(&id, c, Version(3), t);
        assert!(r.list()[0].last_error.is_empty());

        // A newer stream for the same id wins; the old one's disconnect is ignored.
        let (c2, replaced) = r.connect(hello("a", 3), t);
        assert!(replaced);
        r.disconnected(&id, c, t);
        assert_eq!(state(3), SyncState::Synced);
        r.disconnected(&id, c2, t);
        assert_eq!(state(3), SyncState::Disconnected);
    }
}
