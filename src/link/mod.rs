//! The links sessions connect through: `whatsapp` (the real network, on whatsapp-rust)
//! and `sim` (a simulated network for tests and demos). Both implement
//! `botvisor_actors::Link`; the supervisor never sees which one runs.

pub mod credentials;
mod peek;
pub mod proxy;
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

/// A recipient or sender as a chat JID: phone digits become `<digits>@s.whatsapp.net`;
/// a JID is taken as it is.
pub fn chat_jid(to: &str) -> String {
    if to.contains('@') {
        to.to_string()
    } else {
        format!("{to}@s.whatsapp.net")
    }
}

/// The last part of a path, for messages.
pub fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Why a credential store could not be opened or read: what went wrong, and whether the
/// file itself is corrupt, told by SQLite's result code (never by the text).
#[derive(Debug)]
pub struct StoreFailure {
    /// What went wrong.
    pub text: String,
    /// The file is not a database, or a damaged one.
    pub corrupt: bool,
}

impl StoreFailure {
    /// A failure that says nothing of the file's bytes.
    pub fn other(text: impl Into<String>) -> StoreFailure {
        StoreFailure {
            text: text.into(),
            corrupt: false,
        }
    }
}

impl From<rusqlite::Error> for StoreFailure {
    fn from(e: rusqlite::Error) -> StoreFailure {
        use rusqlite::ErrorCode::{DatabaseCorrupt, NotADatabase};
        StoreFailure {
            corrupt: matches!(e.sqlite_error_code(), Some(NotADatabase | DatabaseCorrupt)),
            text: crate::limits::open_error_hint(e.to_string()),
        }
    }
}

impl std::fmt::Display for StoreFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// A session's credential store could not be opened or read. A corrupt file is lasting:
/// a restart reads the same bytes, so the session fails at once (with what to do)
/// instead of spending its restart budget. `file` names the store (see [`file_name`]).
pub fn credential_error(context: &str, file: &str, failure: &StoreFailure) -> LinkError {
    if failure.corrupt {
        LinkError::lasting(format!(
            "{context}: the credential file {file} is corrupt ({failure}); restore a backup \
             (POST /api/sessions/:userId/restore) or delete the session and pair again"
        ))
    } else {
        LinkError::new(format!("{context}: {failure}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_corrupt_store_is_lasting_and_a_busy_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("u1.db");
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        let garbage = rusqlite::Connection::open(&path)
            .and_then(|c| {
                c.query_row("SELECT count(*) FROM sqlite_master", [], |r| {
                    r.get::<_, i64>(0)
                })
            })
            .unwrap_err();
        let e = credential_error("x", &file_name(&path), &garbage.into());
        assert!(e.lasting && e.message().contains("u1.db is corrupt"), "{e}");

        let ok = dir.path().join("ok.db");
        let holder = rusqlite::Connection::open(&ok).unwrap();
        holder
            .execute_batch("CREATE TABLE t (x); BEGIN EXCLUSIVE")
            .unwrap();
        let busy = rusqlite::Connection::open(&ok)
            .and_then(|c| c.execute("INSERT INTO t VALUES (1)", []))
            .unwrap_err();
        let e = credential_error("x", "ok.db", &busy.into());
        assert!(!e.lasting, "{e}");
        assert!(
            !credential_error("x", "u1.db", &StoreFailure::other("Too many open files")).lasting
        );
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
