//! Where botvisor keeps its files under the data directory, in one place.
//!
//! ```text
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

/// Makes a rename (or a new file) in `dir` durable: fsync of the directory itself.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

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
