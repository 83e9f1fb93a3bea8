//! The links sessions connect through: `whatsapp` (the real network, on whatsapp-rust)
//! and `sim` (a simulated network for tests and demos). Both implement
//! `botvisor_actors::Link`; the supervisor never sees which one runs.

pub mod credentials;
pub mod sim;
pub mod whatsapp;

use std::path::Path;
use std::time::Duration;

use botvisor_actors::LinkError;

/// The built-in command answer (`--no-builtin-commands` turns it off): `!ping`, in any
/// case and with spaces around, is answered `pong (up …)` in the chat it came from, on
/// every link.
pub fn builtin_reply(text: &str, up: Duration) -> Option<String> {
    text.trim()
        .eq_ignore_ascii_case("!ping")
        .then(|| format!("pong (up {})", uptime(up)))
}

/// `1h 2m 3s`.
pub fn uptime(d: Duration) -> String {
    let s = d.as_secs();
    match (s / 3600, (s / 60) % 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, m, sec) => format!("{m}m {sec}s"),
        (h, m, sec) => format!("{h}h {m}m {sec}s"),
    }
}

/// The last part of a path, for messages.
pub fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A session's credential store could not be opened or read. SQLite saying the file is
/// not a database, or is malformed, is lasting: a restart reads the same bytes, so the
/// session fails at once (with what to do) instead of spending its restart budget.
/// `file` names the store in the message (a file's name; see [`file_name`]).
pub fn credential_error(context: &str, file: &str, error: &str) -> LinkError {
    let lower = error.to_ascii_lowercase();
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
        let e = credential_error("x", &file_name(p), "file is not a database");
        assert!(e.lasting && e.message().contains("u1.db is corrupt"), "{e}");
        assert!(credential_error("x", &file_name(p), "database disk image is malformed").lasting);
        assert!(!credential_error("x", &file_name(p), "database is locked").lasting);
        assert!(!credential_error("x", &file_name(p), "Too many open files").lasting);
    }

    #[test]
    fn uptime_reads_well() {
        assert_eq!(uptime(Duration::from_secs(5)), "5s");
        assert_eq!(uptime(Duration::from_secs(125)), "2m 5s");
        assert_eq!(uptime(Duration::from_secs(3725)), "1h 2m 5s");
    }

    #[test]
    fn only_ping_gets_the_builtin_answer() {
        let up = Duration::from_secs(61);
        assert_eq!(
            builtin_reply(" !PING ", up).as_deref(),
            Some("pong (up 1m 1s)")
        );
        assert_eq!(builtin_reply("!ping please", up), None);
        assert_eq!(builtin_reply("ping", up), None);
    }
}
