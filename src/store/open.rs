//! Opening the store: where the database is ([`Database`]), its first connection and
//! migrations, the link a data directory belongs to, and what boot cleans up.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use botvisor_actors::{SessionRecord, StorageError};

use super::backup::Backups;
use super::StoreConfig;
use crate::db::{self, Engine};
use crate::paths;

/// Where the session database lives. (Its `Debug` hides a password in a PostgreSQL URL.)
#[derive(Clone, PartialEq, Eq)]
pub enum Database {
    /// A file.
    File(PathBuf),
    /// In memory (lost at exit; for experiments).
    Memory,
    /// A PostgreSQL database (`postgres://...`), through a pool of at most `pool_size`
    /// connections for the rows.
    Postgres {
        /// The connection string as given.
        url: String,
        /// Connections for the rows, at most.
        pool_size: usize,
    },
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Database::File(p) => f.debug_tuple("File").field(p).finish(),
            Database::Memory => f.write_str("Memory"),
            Database::Postgres { url, pool_size } => f
                .debug_struct("Postgres")
                .field("url", &redact_password(url))
                .field("pool_size", pool_size)
                .finish(),
        }
    }
}

/// A connection URL with its password, if any, replaced by `***`
/// (`postgres://user:secret@host/db` → `postgres://user:***@host/db`).
pub fn redact_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, tail) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

impl Database {
    /// Which engine: `sqlite` or `postgres`.
    pub fn engine(&self) -> &'static str {
        match self {
            Database::File(_) | Database::Memory => "sqlite",
            Database::Postgres { .. } => "postgres",
        }
    }
}

/// Why the store did not open.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The database cannot be read or written.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// Another botvisor serves this (PostgreSQL) database.
    #[error(transparent)]
    Taken(db::postgres::OpenError),
    /// The data directory holds another link's sessions.
    #[error(
        "the data directory {data_dir} holds sessions of the {found} link, not {wanted}: \
         start with --link {found} to run them, or use another --data-dir for the {wanted} link"
    )]
    OtherLink {
        /// The data directory.
        data_dir: String,
        /// The link its sessions belong to.
        found: String,
        /// The link asked for.
        wanted: &'static str,
    },
}

/// Removes what interrupted operations left behind (nothing runs yet at boot): credential
/// files without a session row (a create or delete killed half-way), a restore's
/// temporary file, backups of deleted sessions, half-written backups. Every such file is
/// unreachable through the API; left alone it would be picked up by a later session of
/// the same id.
pub(super) fn sweep(data_dir: &std::path::Path, backups: &Backups, boot: &[SessionRecord]) {
    let known: std::collections::HashSet<&str> = boot.iter().map(|r| r.user_id.as_str()).collect();
    let mut removed = backups.sweep(&known);
    let sessions = paths::sessions_dir(data_dir);
    for entry in std::fs::read_dir(&sessions).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(id) = paths::session_of_file(&name) else {
            continue;
        };
        let leftover = !known.contains(id) || name.contains(".restoring");
        if leftover && std::fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    if removed > 0 {
        tracing::info!(
            files = removed,
            "removed files left by interrupted operations"
        );
    }
}

/// A data directory belongs to one link: the first start records it, and a start with
/// another link is refused (it would resume the old sessions under the new link and mix
/// their credential files).
pub(super) fn claim_link(
    conn: &mut dyn Engine,
    config: &StoreConfig,
    has_sessions: bool,
) -> Result<(), OpenError> {
    let found = match conn.setting("link")? {
        Some(link) => Some(link),
        // Data from before the link was recorded: tell it by a credential file.
        None if has_sessions => link_of_credentials(&paths::sessions_dir(&config.data_dir)),
        None => None,
    };
    match found {
        Some(found) if found != config.link => Err(OpenError::OtherLink {
            data_dir: config.data_dir.display().to_string(),
            found,
            wanted: config.link,
        }),
        Some(_) => Ok(()),
        None => Ok(conn.set_setting("link", config.link)?),
    }
}

/// The link whose credential files are in `dir`, told by their tables.
fn link_of_credentials(dir: &std::path::Path) -> Option<String> {
    let file = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "db"))?;
    let has = |table: &str| db::sqlite::has_table(&file, table);
    if has("sim_credentials") {
        Some("sim".into())
    } else if has("device") {
        Some("whatsapp".into())
    } else {
        None
    }
}

/// Opens (creating a file if needed, mode 0600) and migrates the database.
pub fn open_database(database: &Database) -> Result<db::Location, OpenError> {
    open_node_database(database, None)
}

/// [`open_database`] for one node of several (`node`: PostgreSQL only, checked by the
/// configuration).
pub fn open_node_database(
    database: &Database,
    node: Option<std::sync::Arc<db::nodes::Standing>>,
) -> Result<db::Location, OpenError> {
    let (path, uri) = match database {
        Database::Postgres { url, pool_size } => {
            let config = db::postgres::PoolConfig {
                pool_size: *pool_size,
                ..Default::default()
            };
            return match db::postgres::Rows::open_as(url, config, node) {
                Ok(rows) => Ok(db::Location::Postgres(rows)),
                Err(db::postgres::OpenError::Storage(e)) => Err(e.into()),
                Err(taken) => Err(OpenError::Taken(taken)),
            };
        }
        Database::Memory => {
            // Shared cache, so the reader sees the writer's in-memory database.
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let id = std::process::id();
            (
                format!("file:botvisor-mem-{id}-{n}?mode=memory&cache=shared"),
                true,
            )
        }
        Database::File(path) => {
            paths::create_private_file(path).map_err(|e| {
                let text = format!("cannot create {}: {}", path.display(), paths::io_hint(&e));
                match e.kind() {
                    std::io::ErrorKind::ReadOnlyFilesystem => StorageError::ReadOnly(text),
                    std::io::ErrorKind::StorageFull => StorageError::Full(text),
                    _ => StorageError::Failed(text),
                }
            })?;
            let text = path.to_str().ok_or_else(|| {
                StorageError::Failed("the database path is not valid UTF-8".into())
            })?;
            (text.to_string(), false)
        }
    };
    Ok(db::Location::Sqlite(db::sqlite::Location::open(path, uri)?))
}
