//! Files a routes.toml names (certificates, keys, CA bundles). dispactl reads them relative to
//! the config file and uploads them beside it; the plane stores them with the version.

use std::collections::BTreeMap;
use std::fmt;

use bytes::Bytes;

/// Uploaded files keyed by the path exactly as the routes.toml writes it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Attachments(pub BTreeMap<String, Bytes>);

impl Attachments {
    pub fn get(&self, path: &str) -> Option<&Bytes> {
        self.0.get(path)
    }

    /// From the wire; a path sent twice keeps its last content.
    pub fn from_wire(files: Vec<crate::v1::Attachment>) -> Self {
        files.into_iter().map(|a| (a.path, a.content)).collect()
    }
}

// By hand: the content may be a private key; only names and sizes are printed.
impl fmt::Debug for Attachments {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(
                self.0
                    .iter()
                    .map(|(k, v)| (k, format!("<{} bytes>", v.len()))),
            )
            .finish()
    }
}

impl FromIterator<(String, Bytes)> for Attachments {
    fn from_iter<I: IntoIterator<Item = (String, Bytes)>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}
