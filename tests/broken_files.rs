//! Broken files on disk: a garbage credential file fails only its own session, at once and
//! with a clear `lastError`; a damaged backup is refused before anything stops; a database
//! from a newer botvisor refuses to start.

mod common;

use std::path::Path;

use common::Server;

fn garbage(path: &Path, len: usize) {
    // Not random, but nothing SQLite would take for a database.
    let bytes: Vec<u8> = (0..len).map(|i| (i * 7 + 13) as u8).collect();
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn a_garbage_credential_file_fails_only_its_session_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = Server::start_in(tmp.path(), &["--restart-max", "5"]);
    for id in ["good", "bad"] {
        assert_eq!(s.create(id, "1234567890").status, 201);
        s.wait_state(id, "online");
    }
    let backup = s.post("/api/sessions/bad/backup", None);
    assert_eq!(backup.status, 200, "{}", backup.body);
    assert_eq!(s.terminate(), Some(0));
    garbage(&tmp.path().join("sessions/bad.db"), 8192);

    let s = Server::start_in(tmp.path(), &["--restart-max", "5"]);
    s.wait_state("good", "online");
    let bad = s.wait_state("bad", "failed");
    let error = bad["lastError"].as_str().unwrap();
    assert!(
        error.contains("bad.db is corrupt") && error.contains("restore a backup"),
        "{error}"
    );
    assert_eq!(
        bad["restarts"], 0,
        "no restart budget spent on a file that cannot heal"
    );
    // The operator's way out: restore the backup.
    let r = s.post("/api/sessions/bad/restore", None);
    assert_eq!(r.status, 200, "{}", r.body);
    s.wait_state("bad", "online");
}

#[cfg(feature = "test-peer")]
#[test]
fn a_garbage_whatsapp_store_fails_its_session_with_the_cause() {
    let peer = botvisor_wa_peer::Peer::start();
    let url = peer.url();
    let args = ["--link", "whatsapp", "--wa-url", url.as_str()];
    let tmp = tempfile::tempdir().unwrap();
    let mut s = Server::start_in(tmp.path(), &args);
    assert_eq!(s.create("wa_bad", "15551234567").status, 201);
    assert_eq!(s.terminate(), Some(0));
    garbage(&tmp.path().join("sessions/wa_bad.db"), 8192);
    let s = Server::start_in(tmp.path(), &args);
    let v = s.wait_state("wa_bad", "failed");
    let error = v["lastError"].as_str().unwrap();
    assert!(error.contains("wa_bad.db is corrupt"), "{error}");
    assert_eq!(v["restarts"], 0);
}

#[test]
fn a_damaged_backup_is_refused_with_400_and_the_session_keeps_running() {
    let s = Server::start(&[]);
    assert_eq!(s.create("bk", "1234567890").status, 201);
    s.wait_state("bk", "online");
    let r = s.post("/api/sessions/bk/backup", None).json();
    let id = r["backupId"].as_str().unwrap().to_string();
    let file = s.data_dir.join(format!("backups/bk/{id}.db"));
    assert!(file.is_file(), "{}", file.display());
    for damage in ["truncate", "garbage"] {
        let len = std::fs::metadata(&file).unwrap().len();
        match damage {
            "truncate" => {
                let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
                f.set_len(len / 2).unwrap();
            }
            _ => garbage(&file, len as usize),
        }
        let body = format!(r#"{{"backupId":"{id}"}}"#);
        let msg = s.post("/api/sessions/bk/restore", Some(&body)).error(400);
        assert!(
            msg.contains("damaged") || msg.contains("not a botvisor backup"),
            "{damage}: {msg}"
        );
        let v = s.session("bk");
        assert_eq!(
            v["state"], "online",
            "{damage}: the session was not touched"
        );
    }
}

#[test]
fn a_database_from_a_newer_botvisor_refuses_to_start() {
    if common::test_engine_is_postgres() {
        // It edits botvisor.db's user_version, which a PostgreSQL run does not have.
        eprintln!("SKIPPED a_database_from_a_newer_botvisor_refuses_to_start on PostgreSQL: it edits the SQLite file");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut s = Server::start_in(tmp.path(), &[]);
    assert_eq!(s.create("keep", "1234567890").status, 201);
    assert_eq!(s.terminate(), Some(0));
    let db = tmp.path().join("botvisor.db");
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute_batch("PRAGMA user_version = 99")
        .unwrap();
    let out = common::serve_once(tmp.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("schema version 99, newer than this botvisor knows"),
        "{err}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("listening"));
    // Nothing was changed: the row is still there for the newer botvisor.
    let rows: i64 = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row("SELECT count(*) FROM sessions", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 1);
}
