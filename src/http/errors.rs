//! The one place where failures become HTTP statuses and the spec's
//! `{"success": false, "message": ...}` body.

use hyper::StatusCode;

use botvisor_actors::CmdError;

use crate::store::backup::BackupError;

/// The spec's message for an existing session.
pub const SESSION_EXISTS: &str =
    "Session already exists for this user. Delete it first or use a different userId.";
/// The spec's message for a bad userId.
pub const INVALID_USER_ID: &str = "userId must be alphanumeric (a-z, 0-9, _, -)";

/// An error answer.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// The `message` field.
    pub message: String,
}

impl ApiError {
    /// Any status with a message.
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }
    /// 400.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
    /// 404.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, message)
    }
    /// 503.
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }
    /// 500.
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
    /// 404 for an unknown session.
    pub fn no_session(user_id: &str) -> ApiError {
        ApiError::not_found(format!("Session {user_id} not found"))
    }
}

impl From<CmdError> for ApiError {
    fn from(e: CmdError) -> ApiError {
        match e {
            CmdError::NotFound(m) => ApiError::not_found(m),
            CmdError::Exists => ApiError::new(StatusCode::CONFLICT, SESSION_EXISTS),
            CmdError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, m),
            CmdError::Rejected(m) => ApiError::new(StatusCode::TOO_MANY_REQUESTS, m),
            CmdError::Unavailable(m) => ApiError::unavailable(m),
            CmdError::Internal(m) => ApiError::internal(m),
        }
    }
}

impl From<BackupError> for ApiError {
    fn from(e: BackupError) -> ApiError {
        match e {
            BackupError::NotFound(m) => ApiError::not_found(m),
            BackupError::Invalid(m) => ApiError::bad_request(m),
            BackupError::Io(m) => ApiError::internal(format!("backup storage failed: {m}")),
        }
    }
}
