//! What the agent tells operators: access-log records (queued, spooled to disk, shipped to
//! the plane), Prometheus metrics, and periodic summaries for `dispactl status`.

pub mod access_log;
mod metrics;
pub mod shipper;
pub mod spool;
pub mod window;

pub use metrics::{EndpointLabels, Metrics, ReasonLabels, RequestMeters};
