//! Where the real link keeps each session's WhatsApp keys (`--keys`):
//!
//! - `files`: one whatsapp-rust `SqliteStore` per session, `<data-dir>/sessions/<id>.db`
//!   (0600, WAL), checked before it is opened so that a corrupt file fails at once;
//! - `database`: the PostgreSQL of `--database-url`, every session's rows in one set of
//!   tables ([`crate::keys::PgKeys`]).
//!
//! Removing a session's keys is synchronous for files (the supervisor does it in line).
//! In PostgreSQL it is a transaction, which the supervisor must not wait for: the session
//! id is marked *dirty* at once and purged in the background, and a session of that id
//! is not connected until its old rows are gone (its `open` purges first and fails if it
//! cannot). What a crash leaves dirty, the boot sweep removes: keys of sessions that have
//! no row.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use botvisor_actors::{BoxFuture, LinkError, StorageError};
use whatsapp_rust::store::{SqliteStore, SqliteStoreConfig};
use whatsapp_rust::wacore::store::error::StoreError;
use whatsapp_rust::wacore::store::traits::Backend;

use crate::keys::PgKeys;
use crate::paths;

/// The key store of every session on the real link.
pub enum Credentials {
    /// A SQLite file per session under the data dir.
    Files {
        /// The data dir.
        data_dir: PathBuf,
    },
    /// Every session's rows in one PostgreSQL database.
    Database(Arc<DatabaseKeys>),
}

/// The PostgreSQL key store, with the sessions whose old rows must go before reuse.
pub struct DatabaseKeys {
    keys: PgKeys,
    /// Session ids whose rows are to be purged (removed or logged out, not yet purged).
    dirty: Mutex<HashSet<String>>,
    /// One purge at a time: a purge and an `open` of the same id never interleave.
    purging: tokio::sync::Mutex<()>,
}

impl DatabaseKeys {
    fn dirty_ids(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.dirty.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_dirty(&self, user_id: &str) -> bool {
        self.dirty_ids().contains(user_id)
    }

    /// Purges `user_id`'s rows if they are still due.
    async fn purge_if_dirty(&self, user_id: &str) -> Result<(), LinkError> {
        if !self.is_dirty(user_id) {
            return Ok(()); // the common case: no lock, so opens never queue behind a purge
        }
        let _one = self.purging.lock().await;
        if !self.is_dirty(user_id) {
            return Ok(());
        }
        match self.keys.purge_session(user_id).await {
            Ok(rows) => {
                self.dirty_ids().remove(user_id);
                tracing::debug!(%user_id, rows, "WhatsApp keys removed from PostgreSQL");
                Ok(())
            }
            Err(e) => Err(LinkError::new(format!(
                "cannot remove the old WhatsApp keys of '{user_id}' from PostgreSQL: {e}"
            ))),
        }
    }
}

impl DatabaseKeys {
    /// Writes a session's keys to a new whatsapp-rust key file at `path` (a backup's
    /// credentials). No file is made when the session has no keys yet.
    pub async fn export(&self, user_id: &str, path: &Path) -> Result<(), StorageError> {
        crate::keys::copy::session_to_file(&self.keys.session(user_id), path)
            .await
            .map(drop)
            .map_err(|e| storage("cannot copy the WhatsApp keys out of PostgreSQL", &e))
    }

    /// Replaces a stopped session's keys with those of a key file (none when `path` does
    /// not exist): a restore. All or nothing; a purge still due for this id is dropped,
    /// since the restored keys replace what it was to remove.
    pub async fn import(&self, user_id: &str, path: &Path) -> Result<(), StorageError> {
        let _one = self.purging.lock().await;
        crate::keys::copy::file_to_session(&self.keys, path, user_id)
            .await
            .map_err(|e| storage("cannot restore the WhatsApp keys into PostgreSQL", &e))?;
        self.dirty_ids().remove(user_id);
        Ok(())
    }
}

/// A key store error for the API: unavailable when PostgreSQL cannot be reached, failed
/// otherwise, with the whole chain of causes.
fn storage(what: &str, e: &StoreError) -> StorageError {
    let text = format!("{what}: {}", crate::logging::error_chain(e));
    match e {
        StoreError::Connection(_) => StorageError::Unavailable(text),
        _ => StorageError::Failed(text),
    }
}

impl Credentials {
    /// Keys in PostgreSQL, over `keys`' pool.
    pub fn database(keys: PgKeys) -> Credentials {
        Credentials::Database(Arc::new(DatabaseKeys {
            keys,
            dirty: Mutex::new(HashSet::new()),
            purging: tokio::sync::Mutex::new(()),
        }))
    }

    /// The PostgreSQL key store, when the keys are there (backups copy them out and in).
    pub fn database_keys(&self) -> Option<Arc<DatabaseKeys>> {
        match self {
            Credentials::Database(db) => Some(db.clone()),
            Credentials::Files { .. } => None,
        }
    }

    /// A name for error messages: the file's, or the session in PostgreSQL.
    pub fn describe(&self, user_id: &str) -> String {
        match self {
            Credentials::Files { data_dir } => {
                super::file_name(&paths::credentials(data_dir, user_id))
            }
            Credentials::Database(_) => format!("{user_id} (PostgreSQL)"),
        }
    }

    /// Opens one session's key store (creating it if new).
    pub fn open(&self, user_id: &str) -> BoxFuture<'static, Result<Arc<dyn Backend>, LinkError>> {
        match self {
            Credentials::Files { data_dir } => {
                let path = paths::credentials(data_dir, user_id);
                Box::pin(async move {
                    let store: Arc<dyn Backend> = Arc::new(open_store(&path).await?);
                    Ok(store)
                })
            }
            Credentials::Database(db) => {
                let (db, user_id) = (db.clone(), user_id.to_string());
                Box::pin(async move {
                    db.purge_if_dirty(&user_id).await?;
                    let keys: Arc<dyn Backend> = Arc::new(db.keys.session(&user_id));
                    Ok(keys)
                })
            }
        }
    }

    /// Removes everything kept for a session: the file at once, or (PostgreSQL) marks its
    /// rows for removal and removes them in the background. Idempotent.
    pub fn remove(&self, user_id: &str) -> Result<(), LinkError> {
        match self {
            Credentials::Files { data_dir } => paths::remove_credentials(data_dir, user_id),
            Credentials::Database(db) => {
                db.dirty_ids().insert(user_id.to_string());
                let (db, id) = (db.clone(), user_id.to_string());
                match tokio::runtime::Handle::try_current() {
                    Ok(runtime) => {
                        runtime.spawn(async move {
                            if let Err(e) = db.purge_if_dirty(&id).await {
                                // Still dirty: the next open of this id, or the next boot's
                                // sweep, tries again.
                                tracing::warn!(user_id = %id, error = %e, "WhatsApp keys not removed yet");
                            }
                        });
                    }
                    Err(_) => {
                        tracing::warn!(user_id = %id, "no runtime: keys are removed at next open or boot")
                    }
                }
                Ok(())
            }
        }
    }

    /// Removes the keys of sessions botvisor does not know (a delete or a create killed
    /// half-way). Files are swept with the store's other leftovers; this sweeps
    /// PostgreSQL. Returns how many sessions' keys were removed.
    pub async fn sweep(&self, known: &HashSet<&str>) -> Result<usize, LinkError> {
        let Credentials::Database(db) = self else {
            return Ok(0);
        };
        let stored = db.keys.session_ids().await.map_err(|e| {
            LinkError::new(format!("cannot list the WhatsApp keys in PostgreSQL: {e}"))
        })?;
        let mut removed = 0;
        for id in stored.iter().filter(|id| !known.contains(id.as_str())) {
            db.dirty_ids().insert(id.clone());
            db.purge_if_dirty(id).await?;
            removed += 1;
        }
        Ok(removed)
    }

    /// Descriptors one session holds for its keys while its store is open (a file
    /// store closes them after 30 s unused, and opens them again on the next use).
    pub fn files_per_session(&self) -> u32 {
        match self {
            // `.db`, `-wal` and `-shm`.
            Credentials::Files { .. } => 3,
            // The pool's connections are shared by every session.
            Credentials::Database(_) => 0,
        }
    }
}

/// A session store's settings. One store per session, so its page cache is paid per
/// session: whatsapp-rust's default is 512 KiB per connection, which a paired idle
/// session fills to a few hundred KiB of heap. 16 KiB keeps the hot pages (the store
/// is read mostly at login) and measured ~250 KiB less RSS per online session
/// (BENCHMARKS.md, the real link). Everything else stays at the library's defaults.
fn store_config() -> SqliteStoreConfig {
    SqliteStoreConfig {
        cache_size_kib: 16,
        ..SqliteStoreConfig::default()
    }
}

/// Checks that an existing store file is a sound SQLite database. whatsapp-rust's pool
/// retries a connection that fails its set-up for 30 s before giving up, so a corrupt
/// file is caught here first, in milliseconds, and reported as lasting.
fn check_store(path: &Path) -> Result<(), super::StoreFailure> {
    if std::fs::metadata(path).map(|m| m.len()).unwrap_or(0) == 0 {
        return Ok(()); // new: whatsapp-rust creates its schema
    }
    let conn = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    let check: String = conn.query_row("PRAGMA quick_check(1)", [], |r| r.get(0))?;
    if check == "ok" {
        Ok(())
    } else {
        Err(super::StoreFailure {
            text: format!("database disk image is malformed: {check}"),
            corrupt: true,
        })
    }
}

/// Opens (creating, 0600) a session's credential store.
async fn open_store(path: &Path) -> Result<SqliteStore, LinkError> {
    paths::create_private_file(path)
        .map_err(|e| LinkError::new(format!("cannot create {}: {e}", path.display())))?;
    let file = super::file_name(path);
    let checked = path.to_path_buf();
    tokio::task::spawn_blocking(move || check_store(&checked))
        .await
        .map_err(|e| LinkError::new(e.to_string()))?
        .map_err(|e| super::credential_error("cannot open the credential store", &file, &e))?;
    let url = path
        .to_str()
        .ok_or_else(|| LinkError::new("the data directory path is not valid UTF-8"))?;
    SqliteStore::with_config(url, store_config())
        .await
        .map_err(|e| {
            super::credential_error(
                "cannot open the credential store",
                &file,
                &super::StoreFailure::other(crate::limits::open_error_hint(e.to_string())),
            )
        })
}
