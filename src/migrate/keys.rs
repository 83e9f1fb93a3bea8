//! The WhatsApp keys of a migrated fleet (`--keys files|database`).
//!
//! Keys are read from where the source keeps them: its PostgreSQL rows when it has any
//! (`--keys database` on the source's server), else the key files of `--data-dir`. They
//! are written where `--keys` says: `database` into the target's PostgreSQL, `files` as
//! `<data-dir>/sessions/<id>.db`. Each session is copied whole through a whatsapp-rust
//! key file (`keys::copy`) and checked against its source, row by row; a target
//! session's old keys are replaced (in PostgreSQL by one transaction, a file by a
//! rename). Without `--keys`, key files stay where they are and keys in a PostgreSQL
//! source are refused, as they would be left behind.

use std::path::{Path, PathBuf};

use crate::config::KeysAt;
use crate::keys::copy::{file_to_session, session_to_file};
use crate::keys::PgKeys;
use crate::logging::error_chain;
use crate::paths;
use crate::store::Database;

/// Where the keys come from.
pub enum Source {
    /// Rows in the source PostgreSQL (its URL).
    Database(String),
    /// Key files in the data dir.
    Files,
}

/// Where they go.
pub enum Target {
    /// Stay where they are (key files in the data dir).
    Stay,
    /// Rows in the target PostgreSQL (its URL).
    Database(String),
    /// Key files in the data dir.
    Files,
}

/// The copy of the keys, decided before any row is copied.
pub struct Plan {
    pub from: Source,
    pub to: Target,
    pub data_dir: PathBuf,
}

/// Decides where keys come from and go, or why the command must refuse.
pub fn plan(
    keys: Option<KeysAt>,
    source: &Database,
    source_key_sessions: i64,
    target: &Database,
    data_dir: &Path,
) -> Result<Plan, String> {
    let from = match source {
        Database::Postgres { url, .. } if source_key_sessions > 0 => Source::Database(url.clone()),
        _ => Source::Files,
    };
    let to = match (keys, target) {
        (None, _) => match from {
            Source::Database(_) => {
                return Err(format!(
                    "--from keeps the WhatsApp keys of {source_key_sessions} session(s) in \
                     PostgreSQL; say where they go: --keys database (into --to, which must \
                     be PostgreSQL) or --keys files (key files in --data-dir)"
                ))
            }
            Source::Files => Target::Stay,
        },
        (Some(KeysAt::Database), Database::Postgres { url, .. }) => Target::Database(url.clone()),
        (Some(KeysAt::Database), _) => {
            return Err(
                "--keys database keeps the WhatsApp keys in PostgreSQL: --to must be a \
                 postgres:// URL"
                    .into(),
            )
        }
        (Some(KeysAt::Files), _) => match from {
            Source::Files => Target::Stay,
            Source::Database(_) => Target::Files,
        },
    };
    Ok(Plan {
        from,
        to,
        data_dir: data_dir.to_path_buf(),
    })
}

impl Plan {
    /// Whether the data dir is read or written (and so must be taken).
    pub fn uses_data_dir(&self) -> bool {
        !matches!((&self.from, &self.to), (Source::Files, Target::Stay))
    }

    /// Refuses to write key files over existing ones (unless `overwrite`).
    pub fn check_files(&self, sessions: &[String], overwrite: bool) -> Result<(), String> {
        if !matches!(self.to, Target::Files) || overwrite {
            return Ok(());
        }
        let there: Vec<&str> = sessions
            .iter()
            .filter(|id| paths::credentials(&self.data_dir, id).exists())
            .map(String::as_str)
            .collect();
        if let Some(first) = there.first() {
            return Err(format!(
                "{} already holds the key files of {} of these sessions (first: {first}); \
                 give an empty --data-dir, or --force to replace them",
                self.data_dir.join("sessions").display(),
                there.len()
            ));
        }
        Ok(())
    }

    /// Copies every session's keys; returns (sessions with keys, rows), or what failed.
    pub fn run(&self, sessions: &[String]) -> Result<(usize, usize), String> {
        if matches!(self.to, Target::Stay) {
            return Ok((0, 0));
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the key copy: {e}"))?;
        runtime.block_on(self.copy_all(sessions))
    }

    async fn copy_all(&self, sessions: &[String]) -> Result<(usize, usize), String> {
        let open = |url: &str, role: &'static str| {
            let url = url.to_string();
            async move {
                PgKeys::open(&url)
                    .await
                    .map_err(|e| format!("--{role}: the WhatsApp key tables: {}", error_chain(&e)))
            }
        };
        let source = match &self.from {
            Source::Database(url) => Some(open(url, "from").await?),
            Source::Files => None,
        };
        let target = match &self.to {
            Target::Database(url) => Some(open(url, "to").await?),
            _ => None,
        };
        let dir = paths::sessions_dir(&self.data_dir);
        paths::create_private_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let (mut with_keys, mut rows) = (0, 0);
        for id in sessions {
            // StoreError says little by itself: its causes carry the reason.
            let fail = |e: &(dyn std::error::Error + 'static)| {
                format!("the WhatsApp keys of session {id}: {}", error_chain(e))
            };
            let file = paths::credentials(&self.data_dir, id);
            let scratch = dir.join(format!(".{id}.migrating.db"));
            paths::remove_sqlite_files(&scratch).map_err(|e| fail(&e))?;
            // Out of the source, into a key file: the scratch one unless the source is
            // the file itself.
            let copied = match &source {
                Some(keys) => session_to_file(&keys.session(id), &scratch)
                    .await
                    .map_err(|e| fail(&e))?,
                None => 0,
            };
            let file_in = if source.is_some() { &scratch } else { &file };
            let written = match &target {
                Some(keys) => file_to_session(keys, file_in, id)
                    .await
                    .map_err(|e| fail(&e))?,
                None => {
                    // Into the data dir: the checked copy replaces the file by a rename.
                    paths::remove_sqlite_files(&file).map_err(|e| fail(&e))?;
                    if copied > 0 {
                        std::fs::rename(&scratch, &file).map_err(|e| fail(&e))?;
                        paths::sync_dir(&dir).map_err(|e| fail(&e))?;
                    }
                    copied
                }
            };
            paths::remove_sqlite_files(&scratch).map_err(|e| fail(&e))?;
            if written > 0 {
                with_keys += 1;
                rows += written;
            }
        }
        Ok((with_keys, rows))
    }
}
