//! One small error-code enum mapped to both gRPC and HTTP status, so every API reports the
//! same kind of failure the same way.

/// What kind of failure an API call ended in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    /// The request or the config it carries is invalid.
    InvalidArgument,
    /// The named version or object does not exist.
    NotFound,
    /// An optimistic-concurrency check failed (e.g. `--expect-version` is stale).
    Conflict,
    /// The peer is incompatible (e.g. another protocol major version).
    Incompatible,
    /// A dependency (store, network) is unavailable; retrying may help.
    Unavailable,
    /// A bug or an unexpected state in the server.
    Internal,
}

impl ErrorCode {
    pub fn grpc_code(self) -> tonic::Code {
        match self {
            ErrorCode::InvalidArgument => tonic::Code::InvalidArgument,
            ErrorCode::NotFound => tonic::Code::NotFound,
            ErrorCode::Conflict => tonic::Code::Aborted,
            ErrorCode::Incompatible => tonic::Code::FailedPrecondition,
            ErrorCode::Unavailable => tonic::Code::Unavailable,
            ErrorCode::Internal => tonic::Code::Internal,
        }
    }

    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::InvalidArgument => 400,
            ErrorCode::NotFound => 404,
            ErrorCode::Conflict => 409,
            ErrorCode::Incompatible => 412,
            ErrorCode::Unavailable => 503,
            ErrorCode::Internal => 500,
        }
    }

    /// A gRPC status carrying this code and a message.
    pub fn status(self, message: impl Into<String>) -> tonic::Status {
        tonic::Status::new(self.grpc_code(), message)
    }
}
