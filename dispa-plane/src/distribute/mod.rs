//! Snapshot distribution: the newest version is published once (encoded once) into a watch
//! channel; every agent stream reads the newest value when it can send, so a burst of applies
//! coalesces to the newest version per agent.

mod discovery;
mod registry;

use std::sync::Arc;

use bytes::Bytes;
use dispa_proto::Version;
use tokio::sync::watch;

pub use discovery::{DiscoveryService, valid_agent_id};
pub use registry::{AgentRecord, AgentRegistry, StateCounts, SyncState};

/// A version ready to send: encoded once, shared by every stream.
#[derive(Debug)]
pub struct Published {
    pub version: Version,
    pub hash: String,
    pub snapshot: Bytes,
}

/// The newest published snapshot.
#[derive(Clone)]
pub struct Distributor {
    tx: Arc<watch::Sender<Option<Arc<Published>>>>,
}

impl Default for Distributor {
    fn default() -> Self {
        Self::new()
    }
}

impl Distributor {
    pub fn new() -> Self {
        let (tx, _) = watch::channel(None);
        Self { tx: Arc::new(tx) }
    }

    /// Publishes a version if it is newer than what is published.
    pub fn publish(&self, p: Published) {
        self.tx.send_if_modified(|cur| match cur {
            Some(c) if c.version >= p.version => false,
            _ => {
                *cur = Some(Arc::new(p));
                true
            }
        });
    }

    pub fn current(&self) -> Option<Arc<Published>> {
        self.tx.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Published>>> {
        self.tx.subscribe()
    }
}
