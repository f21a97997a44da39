//! What the agent tells operators about itself: Prometheus metrics.

mod metrics;

pub use metrics::Metrics;

/// Label values for the request path's metrics.
pub mod metrics_labels {
    pub use super::metrics::{ErrorLabels, RequestLabels, RouteLabels};

    pub fn request(route: &str, status: http::StatusCode) -> RequestLabels {
        RequestLabels {
            route: route.to_string(),
            status: status.as_str().to_string(),
        }
    }

    pub fn route(route: &str) -> RouteLabels {
        RouteLabels {
            route: route.to_string(),
        }
    }

    pub fn error(kind: &str) -> ErrorLabels {
        ErrorLabels {
            kind: kind.to_string(),
        }
    }
}
