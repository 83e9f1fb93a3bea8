//! Where botvisor keeps its files under the data directory, in one place.
//!
//! ```text
//! <data-dir>/botvisor.lock                held (flock) by the one process using the dir
//! <data-dir>/botvisor.db                  sessions (unless --database-url says otherwise)
//! <data-dir>/sessions/<userId>.db         one session's credentials (0600, WAL)
//! <data-dir>/backups/<userId>/<id>.db     backups (0600)
//! ```

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The directory of credential files.
pub fn sessions_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("sessions")
}

/// A session's credential file. `user_id` is validated (`[A-Za-z0-9_-]`) before it gets here.
pub fn credentials(data_dir: &Path, user_id: &str) -> PathBuf {
    sessions_dir(data_dir).join(format!("{user_id}.db"))
}

/// Removes a session's credential file with its companions (every link keeps its
/// credentials in the same place, so this is the one way they are wiped).
pub fn remove_credentials(
    data_dir: &Path,
    user_id: &str,
) -> Result<(), botvisor_actors::LinkError> {
    let file = credentials(data_dir, user_id);
    remove_sqlite_files(&file)
        .and_then(|()| remove_sqlite_files(&restoring(&file)))
        .map_err(|e| botvisor_actors::LinkError::new(format!("cannot remove credentials: {e}")))
}

/// Where a restore writes a credential file before it renames it into place.
pub fn restoring(credentials: &Path) -> PathBuf {
    credentials.with_extension("db.restoring")
}

/// The session id a file under `sessions/` belongs to (`<id>.db`, `<id>.db-wal`,
/// `<id>.db.restoring-journal`, ...), if it is one of ours.
pub fn session_of_file(name: &str) -> Option<&str> {
    let (id, rest) = name.split_once(".db")?;
    let ours = rest.is_empty() || rest.starts_with('-') || rest.starts_with(".restoring");
    ours.then_some(id)
}

/// The directory of backups.
pub fn backups_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("backups")
}

/// Removes an SQLite file with its `-wal` and `-shm` companions; missing files are fine.
pub fn remove_sqlite_files(db: &Path) -> std::io::Result<()> {
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut name = db.as_os_str().to_owned();
        name.push(suffix);
        match std::fs::remove_file(PathBuf::from(name)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Creates a directory (and parents) readable by its owner only.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Creates an empty file readable by its owner only (0600), if it does not exist.
pub fn create_private_file(path: &Path) -> std::io::Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map(|_| ())
}

/// The lock file a process holds while it uses a data directory.
pub fn lock_file(data_dir: &Path) -> PathBuf {
    data_dir.join("botvisor.lock")
}

/// A data directory held by this process: an exclusive `flock` on its lock file, which
/// the kernel releases when the process ends, however it ends (kill -9 included).
#[derive(Debug)]
pub struct DataDirLock {
    _file: std::fs::File,
}

/// Why a data directory could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds it.
    #[error(
        "the data directory {dir} is in use by another botvisor ({holder}); stop that one first, or give this one another --data-dir"
    )]
    InUse {
        /// The directory.
        dir: String,
        /// `pid 1234`, as the holder wrote it.
        holder: String,
    },
    /// The lock file cannot be opened or locked.
    #[error("cannot lock {path}: {}", io_hint(source))]
    Io {
        /// The lock file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Takes `data_dir` for this process, or says who has it. Two servers on one data dir
/// would resume the same sessions twice (on WhatsApp: two clients for one account,
/// which WhatsApp answers by replacing one, then the other, in a loop).
pub fn lock_data_dir(data_dir: &Path) -> Result<DataDirLock, LockError> {
    use std::io::{Read, Seek, Write};
    let path = lock_file(data_dir);
    let io = |source| LockError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let holder = match text.trim() {
                "" => "its pid not yet written".to_string(),
                pid => format!("pid {pid}"),
            };
            return Err(LockError::InUse {
                dir: data_dir.display().to_string(),
                holder,
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
    }
    file.set_len(0).map_err(io)?;
    file.rewind().map_err(io)?;
    writeln!(file, "{}", std::process::id()).map_err(io)?;
    Ok(DataDirLock { _file: file })
}

/// An I/O error on the data directory, with what to do for the causes an operator can
/// fix (a read-only mount, a directory owned by another user, a full disk).
pub fn io_hint(e: &std::io::Error) -> String {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::ReadOnlyFilesystem => format!(
            "{e}: the filesystem is read-only; remount it read-write or pick another --data-dir"
        ),
        ErrorKind::PermissionDenied => format!(
            "{e}: botvisor runs as uid {}, which may not write there; fix the owner or mode (chown/chmod) or pick another --data-dir",
            // SAFETY: geteuid has no preconditions and cannot fail.
            unsafe { libc::geteuid() }
        ),
        ErrorKind::StorageFull => {
            format!("{e}: the disk is full; free space or pick another --data-dir")
        }
        _ => e.to_string(),
    }
}

/// Makes a rename (or a new file) in `dir` durable: fsync of the directory itself.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_dir_is_held_by_one_lock_at_a_time() {
        let tmp = tempfile::tempdir().unwrap();
        let held = lock_data_dir(tmp.path()).unwrap();
        let text = std::fs::read_to_string(lock_file(tmp.path())).unwrap();
        assert_eq!(text.trim(), std::process::id().to_string());
        // A second open file description is refused, as another process would be.
        let e = lock_data_dir(tmp.path()).unwrap_err().to_string();
        assert!(
            e.contains(&format!("pid {}", std::process::id())) && e.contains("--data-dir"),
            "{e}"
        );
        drop(held);
        lock_data_dir(tmp.path()).unwrap();
    }

    #[test]
    fn io_errors_say_what_to_do() {
        let ro = std::io::Error::from(std::io::ErrorKind::ReadOnlyFilesystem);
        assert!(io_hint(&ro).contains("remount it read-write"));
        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        assert!(io_hint(&denied).contains("chown"));
    }

    #[test]
    fn files_are_told_by_their_session() {
        assert_eq!(session_of_file("u1.db"), Some("u1"));
        assert_eq!(session_of_file("u1.db-wal"), Some("u1"));
        assert_eq!(session_of_file("u1.db.restoring"), Some("u1"));
        assert_eq!(session_of_file("u1.db.restoring-journal"), Some("u1"));
        assert_eq!(session_of_file("notes.txt"), None);
        assert_eq!(session_of_file("u1.dbx"), None);
        assert_eq!(
            restoring(Path::new("/d/sessions/u1.db")),
            Path::new("/d/sessions/u1.db.restoring")
        );
    }
}
