//! Session backups: one SQLite file per backup, made with SQLite's online backup API.
//!
//! `<data-dir>/backups/<userId>/<backupId>.db` holds a copy of the session's credential
//! database (all its tables, as the link wrote them) plus a `botvisor_backup` table of
//! key/value rows: `format` (1), `user_id`, `phone_number`, `name`, `link`,
//! `created_at` (ms), `session_created_at` (ms), `has_credentials` (0/1).
//! Backups are written to a temp file and renamed into place (0600); the newest
//! `--backup-keep` are kept.

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension};

use botvisor_actors::{now_ms, CmdError, SessionRecord, StorageError};

use crate::paths;

const FORMAT: &str = "1";
const META_TABLE: &str = "botvisor_backup";

/// A finished backup.
#[derive(Debug, Clone, PartialEq)]
pub struct BackupInfo {
    /// `YYYYMMDDTHHMMSSmmmZ`, sortable.
    pub backup_id: String,
    /// Milliseconds since the epoch.
    pub created_at_ms: u64,
}

/// Why a backup or restore did not happen.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum BackupError {
    /// No such backup.
    #[error("{0}")]
    NotFound(String),
    /// Malformed id or a backup of another session or link.
    #[error("{0}")]
    Invalid(String),
    /// Disk or SQLite failure.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl From<BackupError> for CmdError {
    fn from(e: BackupError) -> CmdError {
        match e {
            BackupError::NotFound(m) => CmdError::NotFound(m),
            BackupError::Invalid(m) => CmdError::Invalid(m),
            BackupError::Storage(e) => CmdError::Storage(e),
        }
    }
}

/// The backups of all sessions.
#[derive(Debug, Clone)]
pub struct Backups {
    dir: PathBuf,
    keep: usize,
}

/// True for ids we generate (no path separators, no dots).
pub fn valid_backup_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// A file-system error, by what an operator can do about it.
pub fn io(e: std::io::Error) -> BackupError {
    let text = e.to_string();
    BackupError::Storage(match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => StorageError::Full(text),
        Some(libc::EROFS) => StorageError::ReadOnly(text),
        _ => StorageError::Failed(text),
    })
}

fn db(e: rusqlite::Error) -> BackupError {
    BackupError::Storage(crate::db::sqlite::classify(&e))
}

fn set_private(path: &Path) -> Result<(), BackupError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)
}

impl Backups {
    /// Backups under `dir`, keeping `keep` per session.
    pub fn new(dir: PathBuf, keep: usize) -> Backups {
        Backups { dir, keep }
    }

    fn session_dir(&self, user_id: &str) -> PathBuf {
        self.dir.join(user_id)
    }

    /// Backs up a session's record and credential file (which may be open and in use).
    pub fn create(
        &self,
        rec: &SessionRecord,
        credentials: &Path,
        link: &str,
    ) -> Result<BackupInfo, BackupError> {
        let dir = self.session_dir(&rec.user_id);
        paths::create_private_dir(&dir).map_err(io)?;
        let created_at_ms = now_ms();
        let stamp = backup_stamp(created_at_ms);
        let mut backup_id = stamp.clone();
        let mut n = 1;
        while dir.join(format!("{backup_id}.db")).exists() {
            backup_id = format!("{stamp}-{n}");
            n += 1;
        }
        let tmp = dir.join(format!(".{backup_id}.tmp"));
        paths::remove_sqlite_files(&tmp).map_err(io)?;
        let result = self.write(rec, credentials, link, &tmp, created_at_ms);
        if let Err(e) = result {
            let _ = paths::remove_sqlite_files(&tmp);
            return Err(e);
        }
        set_private(&tmp)?;
        let dest = dir.join(format!("{backup_id}.db"));
        // The file is complete and synced (SQLite syncs the copy's commit); the rename and
        // its directory entry are made durable before the backup is confirmed.
        std::fs::rename(&tmp, &dest).map_err(io)?;
        paths::sync_dir(&dir).map_err(io)?;
        self.prune(&rec.user_id)?;
        Ok(BackupInfo {
            backup_id,
            created_at_ms,
        })
    }

    fn write(
        &self,
        rec: &SessionRecord,
        credentials: &Path,
        link: &str,
        tmp: &Path,
        created_at_ms: u64,
    ) -> Result<(), BackupError> {
        paths::create_private_file(tmp).map_err(io)?;
        let has_credentials = credentials.exists();
        if has_credentials {
            let src = Connection::open_with_flags(
                credentials,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
                    | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .map_err(db)?;
            src.backup("main", tmp, None).map_err(db)?;
        }
        let dst = Connection::open(tmp).map_err(db)?;
        // The copy keeps the source's WAL mode; a backup is one self-contained file.
        dst.execute_batch("PRAGMA journal_mode = DELETE;")
            .map_err(db)?;
        dst.execute_batch(&format!(
            "CREATE TABLE {META_TABLE} (key TEXT PRIMARY KEY NOT NULL, value TEXT)"
        ))
        .map_err(db)?;
        let rows: [(&str, Option<String>); 8] = [
            ("format", Some(FORMAT.into())),
            ("user_id", Some(rec.user_id.clone())),
            ("phone_number", Some(rec.phone_number.clone())),
            ("name", rec.name.clone()),
            ("link", Some(link.into())),
            ("created_at", Some(created_at_ms.to_string())),
            ("session_created_at", Some(rec.created_at_ms.to_string())),
            (
                "has_credentials",
                Some(if has_credentials { "1" } else { "0" }.into()),
            ),
        ];
        for (k, v) in rows {
            dst.execute(
                &format!("INSERT INTO {META_TABLE} (key, value) VALUES (?1, ?2)"),
                params![k, v],
            )
            .map_err(db)?;
        }
        Ok(())
    }

    /// A new path (nothing there) for a scratch file of a session, `.<what>-<stamp>.db`
    /// in its backup folder (created); [`Backups::sweep`] removes leftovers at boot.
    pub fn scratch_file(&self, user_id: &str, what: &str) -> Result<PathBuf, BackupError> {
        let dir = self.session_dir(user_id);
        paths::create_private_dir(&dir).map_err(io)?;
        let stamp = backup_stamp(now_ms());
        let mut path = dir.join(format!(".{what}-{stamp}.db"));
        let mut n = 1;
        while path.exists() {
            path = dir.join(format!(".{what}-{stamp}-{n}.db"));
            n += 1;
        }
        Ok(path)
    }

    /// The ids of a session's backups, newest first.
    pub fn list(&self, user_id: &str) -> Vec<String> {
        let mut ids: Vec<String> = std::fs::read_dir(self.session_dir(user_id))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let id = name.strip_suffix(".db")?;
                valid_backup_id(id).then(|| id.to_string())
            })
            .collect();
        ids.sort_by(|a, b| b.cmp(a));
        ids
    }

    fn prune(&self, user_id: &str) -> Result<(), BackupError> {
        for old in self.list(user_id).into_iter().skip(self.keep) {
            std::fs::remove_file(self.session_dir(user_id).join(format!("{old}.db")))
                .map_err(io)?;
        }
        Ok(())
    }

    /// At boot: removes the backups of sessions that no longer exist (a delete killed
    /// before its backups were gone) and half-written backups (`.<id>.tmp*`, a backup
    /// killed mid-copy). Returns how many entries went.
    pub fn sweep(&self, known: &std::collections::HashSet<&str>) -> usize {
        let mut removed = 0;
        for entry in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if !known.contains(name.as_str()) {
                let gone = if path.is_dir() {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
                if gone.is_ok() {
                    removed += 1;
                }
                continue;
            }
            for file in std::fs::read_dir(&path).into_iter().flatten().flatten() {
                if file.file_name().to_string_lossy().starts_with('.')
                    && std::fs::remove_file(file.path()).is_ok()
                {
                    removed += 1;
                }
            }
        }
        removed
    }

    /// Removes every backup of a session (after a delete).
    pub fn remove_all(&self, user_id: &str) -> std::io::Result<()> {
        match std::fs::remove_dir_all(self.session_dir(user_id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Finds a backup: the given id, or the newest.
    pub fn find(
        &self,
        user_id: &str,
        backup_id: Option<&str>,
    ) -> Result<(String, PathBuf), BackupError> {
        let id = match backup_id {
            Some(id) if !valid_backup_id(id) => {
                return Err(BackupError::Invalid(
                    "backupId must be the id of a backup (letters, digits and -)".into(),
                ))
            }
            Some(id) => id.to_string(),
            None => self.list(user_id).into_iter().next().ok_or_else(|| {
                BackupError::NotFound(format!("No backup found for session {user_id}"))
            })?,
        };
        let path = self.session_dir(user_id).join(format!("{id}.db"));
        if !path.is_file() {
            return Err(BackupError::NotFound(format!(
                "Backup {id} not found for session {user_id}"
            )));
        }
        Ok((id, path))
    }
}

/// Reads one key of a backup's `botvisor_backup` table.
fn meta(src: &Connection, key: &str) -> Result<Option<String>, BackupError> {
    src.query_row(
        &format!("SELECT value FROM {META_TABLE} WHERE key = ?1"),
        [key],
        |r| r.get(0),
    )
    .optional()
    .map(Option::flatten)
    .map_err(|e| BackupError::Invalid(format!("not a botvisor backup: {e}")))
}

fn open_backup(backup: &Path) -> Result<Connection, BackupError> {
    Connection::open_with_flags(backup, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(db)
}

fn check_meta(src: &Connection, user_id: &str, link: &str) -> Result<(), BackupError> {
    if meta(src, "format")?.as_deref() != Some(FORMAT) {
        return Err(BackupError::Invalid("unsupported backup format".into()));
    }
    if meta(src, "user_id")?.as_deref() != Some(user_id) {
        return Err(BackupError::Invalid(
            "the backup belongs to another session".into(),
        ));
    }
    let made_with = meta(src, "link")?.unwrap_or_default();
    if made_with != link {
        return Err(BackupError::Invalid(format!(
            "the backup was made with the {made_with} link; this server runs the {link} link"
        )));
    }
    Ok(())
}

/// Checks that a backup can be restored into a session (before the session is stopped).
pub fn verify(backup: &Path, user_id: &str, link: &str) -> Result<(), BackupError> {
    let src = open_backup(backup)?;
    // A truncated or damaged file can still answer the first pages: check it whole
    // before anything is stopped.
    let damaged = |e: String| BackupError::Invalid(format!("the backup file is damaged ({e})"));
    let check: String = src
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(|e| damaged(e.to_string()))?;
    if check != "ok" {
        return Err(damaged(check));
    }
    check_meta(&src, user_id, link)
}

/// Swaps a backup's credentials into place (the session must be stopped) and applies its
/// record fields. The old file stays until the new one is complete; the swap is a rename.
pub fn restore_into(
    backup: &Path,
    credentials: &Path,
    link: &str,
    rec: &mut SessionRecord,
) -> Result<(), BackupError> {
    let src = open_backup(backup)?;
    check_meta(&src, &rec.user_id, link)?;
    let meta = |key: &str| meta(&src, key);
    let has_credentials = meta("has_credentials")?.as_deref() == Some("1");
    let phone = meta("phone_number")?;
    let name = meta("name")?;
    if has_credentials {
        let tmp = paths::restoring(credentials);
        paths::remove_sqlite_files(&tmp).map_err(io)?;
        paths::create_private_file(&tmp).map_err(io)?;
        let copy = (|| -> rusqlite::Result<()> {
            src.backup("main", &tmp, None)?;
            let dst = Connection::open(&tmp)?;
            dst.execute_batch(&format!(
                "DROP TABLE {META_TABLE}; PRAGMA journal_mode = WAL;"
            ))?;
            Ok(())
        })();
        if let Err(e) = copy {
            let _ = paths::remove_sqlite_files(&tmp);
            return Err(db(e));
        }
        set_private(&tmp)?;
        // Stale -wal/-shm of the old file must not be replayed onto the new one.
        for suffix in ["-wal", "-shm"] {
            let mut p = credentials.as_os_str().to_owned();
            p.push(suffix);
            let _ = std::fs::remove_file(PathBuf::from(p));
        }
        std::fs::rename(&tmp, credentials).map_err(io)?;
        if let Some(dir) = credentials.parent() {
            paths::sync_dir(dir).map_err(io)?;
        }
        let _ = paths::remove_sqlite_files(&tmp);
    } else {
        paths::remove_sqlite_files(credentials).map_err(io)?;
    }
    if let Some(phone) = phone {
        rec.phone_number = phone;
    }
    rec.name = name;
    rec.updated_at_ms = now_ms();
    Ok(())
}

/// `20261125T101500123Z` for a time in ms.
fn backup_stamp(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    let iso = humantime::format_rfc3339_millis(t).to_string();
    iso.chars().filter(|c| c.is_ascii_alphanumeric()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cred_db(path: &Path, value: &str) {
        let c = Connection::open(path).unwrap();
        c.execute_batch(
            "PRAGMA journal_mode = WAL; CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v TEXT)",
        )
        .unwrap();
        c.execute("INSERT OR REPLACE INTO kv VALUES ('identity', ?1)", [value])
            .unwrap();
    }

    fn read(path: &Path) -> String {
        Connection::open(path)
            .unwrap()
            .query_row("SELECT v FROM kv WHERE k = 'identity'", [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn backup_then_restore_round_trips_credentials_and_record() {
        let dir = tempfile::tempdir().unwrap();
        let cred = dir.path().join("u.db");
        cred_db(&cred, "first");
        let backups = Backups::new(dir.path().join("backups"), 3);
        let mut rec = SessionRecord::new("u".into(), "15550001111".into());
        rec.name = Some("Bot ü".into());
        let info = backups.create(&rec, &cred, "sim").unwrap();
        use std::os::unix::fs::PermissionsExt;
        let (id, path) = backups.find("u", None).unwrap();
        assert_eq!(id, info.backup_id);
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        cred_db(&cred, "second");
        rec.name = None;
        restore_into(&path, &cred, "sim", &mut rec).unwrap();
        assert_eq!(read(&cred), "first");
        assert_eq!(rec.name.as_deref(), Some("Bot ü"));
        let other = &mut SessionRecord::new("v".into(), "1555".into());
        assert!(matches!(
            restore_into(&path, &cred, "sim", other),
            Err(BackupError::Invalid(_))
        ));
        let err = verify(&path, "u", "whatsapp").unwrap_err();
        assert!(
            matches!(&err, BackupError::Invalid(m) if m.contains("made with the sim link")),
            "{err:?}"
        );
        assert_eq!(verify(&path, "u", "sim"), Ok(()));
    }

    #[test]
    fn only_the_newest_backups_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let cred = dir.path().join("u.db");
        cred_db(&cred, "x");
        let backups = Backups::new(dir.path().join("backups"), 2);
        let rec = SessionRecord::new("u".into(), "15550001111".into());
        let ids: Vec<String> = (0..4)
            .map(|_| backups.create(&rec, &cred, "sim").unwrap().backup_id)
            .collect();
        assert_eq!(backups.list("u"), vec![ids[3].clone(), ids[2].clone()]);
    }

    #[test]
    fn ids_with_path_tricks_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let backups = Backups::new(dir.path().to_path_buf(), 2);
        for bad in ["../x", "a/b", "", "a.b"] {
            assert!(
                matches!(backups.find("u", Some(bad)), Err(BackupError::Invalid(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            backups.find("u", None),
            Err(BackupError::NotFound(_))
        ));
    }
}
