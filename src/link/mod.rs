//! The links sessions connect through: `whatsapp` (the real network, on whatsapp-rust)
//! and `sim` (a simulated network for tests and demos). Both implement
//! `botvisor_actors::Link`; the supervisor never sees which one runs.

pub mod sim;
pub mod whatsapp;

use std::path::Path;

use botvisor_actors::LinkError;

/// A session's credential store could not be opened or read. SQLite saying the file is
/// not a database, or is malformed, is lasting: a restart reads the same bytes, so the
/// session fails at once (with what to do) instead of spending its restart budget.
pub fn credential_error(context: &str, path: &Path, error: &str) -> LinkError {
    let lower = error.to_ascii_lowercase();
    let file = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    if lower.contains("not a database") || lower.contains("malformed") {
        LinkError::lasting(format!(
            "{context}: the credential file {file} is corrupt ({error}); restore a backup \
             (POST /api/sessions/:userId/restore) or delete the session and pair again"
        ))
    } else {
        LinkError::new(format!("{context}: {error}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_corrupt_store_is_lasting_and_a_busy_one_is_not() {
        let p = Path::new("/d/sessions/u1.db");
        let e = credential_error("x", p, "file is not a database");
        assert!(e.lasting && e.message().contains("u1.db is corrupt"), "{e}");
        assert!(credential_error("x", p, "database disk image is malformed").lasting);
        assert!(!credential_error("x", p, "database is locked").lasting);
        assert!(!credential_error("x", p, "Too many open files").lasting);
    }
}
