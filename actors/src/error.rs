//! Why a command or a write was refused. The HTTP layer maps each kind to a status; the
//! messages are meant for the API caller.

/// A storage failure, by what an operator can do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorageError {
    /// The disk (or the database's quota) is full.
    #[error("disk full: {0}")]
    Full(String),
    /// The data directory or database is read-only.
    #[error("storage is read-only: {0}")]
    ReadOnly(String),
    /// The database is locked by another process or otherwise unavailable for now.
    #[error("storage is unavailable: {0}")]
    Unavailable(String),
    /// Anything else (a corrupt file, a bug).
    #[error("storage failed: {0}")]
    Failed(String),
}

/// Why a supervisor command was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CmdError {
    /// No such session (or backup).
    #[error("{0}")]
    NotFound(String),
    /// A session with this id exists.
    #[error("session exists")]
    Exists,
    /// The request itself is wrong (e.g. a backup of another session).
    #[error("{0}")]
    Invalid(String),
    /// The session is not in a state that allows this.
    #[error("{0}")]
    Conflict(String),
    /// The network refused (e.g. pairing throttled).
    #[error("{0}")]
    Rejected(String),
    /// Not answered in time / shutting down / out of resources.
    #[error("{0}")]
    Unavailable(String),
    /// The change could not be made durable.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The network failed to do it (e.g. a message could not be sent).
    #[error("{0}")]
    Upstream(String),
    /// A bug.
    #[error("{0}")]
    Internal(String),
}

impl CmdError {
    /// The unknown-session answer.
    pub fn not_found(user_id: &str) -> CmdError {
        CmdError::NotFound(format!("Session {user_id} not found"))
    }

    /// The answer while the server shuts down.
    pub fn shutting_down() -> CmdError {
        CmdError::Unavailable("The server is shutting down".into())
    }
}
