//! The one place where failures become HTTP statuses and the spec's
//! `{"success": false, "message": ...}` body.

use hyper::{Response, StatusCode};
use serde::Serialize;

use botvisor_actors::{CmdError, StorageError};

use super::response::{json_response, Body};
use crate::store::backup::BackupError;

/// The spec's message for an existing session.
pub const SESSION_EXISTS: &str =
    "Session already exists for this user. Delete it first or use a different userId.";
/// The spec's message for a bad userId.
pub const INVALID_USER_ID: &str = "userId must be alphanumeric (a-z, 0-9, _, -)";
/// An API key's id in a path that cannot be one.
pub const INVALID_KEY_ID: &str = "keyId must be alphanumeric (a-z, 0-9, _, -)";
/// A dead letter's id in a path that cannot be one (same alphabet as a `userId`).
pub const INVALID_NODE_ID: &str = "nodeId must be alphanumeric (a-z, 0-9, _, -)";

pub const INVALID_EVENT_ID: &str = "eventId must be alphanumeric (a-z, 0-9, _, -)";

/// The answer on a simulated-link route when another link runs.
pub const SIM_ONLY: &str = "Fault injection is only available with the simulated link (--link sim)";

/// An error answer.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// The `message` field.
    pub message: String,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    success: bool,
    message: &'a str,
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
    /// 503 with `Retry-After`: the webhook backlog is full, so a message that would add
    /// to it is refused rather than accepted and its event dropped.
    pub fn backlog_full() -> Response<Body> {
        ApiError::unavailable(
            "the webhook backlog is full (--webhook-backlog-max): the receivers are behind; \
             retry later",
        )
        .response_retry_after(5)
    }
    /// 404 for an unknown session.
    pub fn no_session(user_id: &str) -> ApiError {
        ApiError::not_found(format!("Session {user_id} not found"))
    }

    /// [`ApiError::response`] with `Retry-After: secs`.
    pub fn response_retry_after(&self, secs: u64) -> Response<Body> {
        let mut resp = self.response();
        resp.headers_mut().insert(
            hyper::header::RETRY_AFTER,
            hyper::header::HeaderValue::from(secs),
        );
        resp
    }

    /// The spec's error shape.
    pub fn response(&self) -> Response<Body> {
        json_response(
            self.status,
            &ErrorBody {
                success: false,
                message: &self.message,
            },
        )
    }
}

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> ApiError {
        let status = match &e {
            StorageError::Full(_) => StatusCode::INSUFFICIENT_STORAGE,
            StorageError::ReadOnly(_) | StorageError::Unavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            StorageError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

impl From<CmdError> for ApiError {
    fn from(e: CmdError) -> ApiError {
        match e {
            CmdError::NotFound(m) => ApiError::not_found(m),
            CmdError::Exists => ApiError::new(StatusCode::CONFLICT, SESSION_EXISTS),
            CmdError::Invalid(m) => ApiError::bad_request(m),
            CmdError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, m),
            CmdError::Rejected(m) => ApiError::new(StatusCode::TOO_MANY_REQUESTS, m),
            CmdError::Unavailable(m) => ApiError::unavailable(m),
            CmdError::Storage(e) => e.into(),
            CmdError::Upstream(m) => ApiError::new(StatusCode::BAD_GATEWAY, m),
            CmdError::Internal(m) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, m),
        }
    }
}

impl From<BackupError> for ApiError {
    fn from(e: BackupError) -> ApiError {
        CmdError::from(e).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_failures_say_what_an_operator_can_do() {
        let full: ApiError = CmdError::Storage(StorageError::Full("x".into())).into();
        assert_eq!(full.status, StatusCode::INSUFFICIENT_STORAGE);
        assert!(full.message.contains("disk full"));
        let ro: ApiError = StorageError::ReadOnly("x".into()).into();
        assert_eq!(ro.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(ro.message.contains("read-only"));
        let bad: ApiError = BackupError::Invalid("other session".into()).into();
        assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    }
}
