//! Newtypes for identities, so an agent id is never confused with a route name.

use std::fmt;

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            pub fn new(s: impl Into<String>) -> Self {
                Self(s.into())
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

string_id!(
    /// An agent's identity (`dispa agent --id`), unique in a fleet.
    AgentId
);
string_id!(
    /// The name of an upstream (`[upstreams.NAME]`).
    UpstreamName
);
string_id!(
    /// The name of a route (`[[routes]] name = ...`).
    RouteName
);

/// A config version number: monotonic, starting at 1; 0 means "none".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version(pub u64);

impl Version {
    pub const NONE: Version = Version(0);

    pub fn next(self) -> Version {
        Version(self.0 + 1)
    }

    pub fn is_none(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}
