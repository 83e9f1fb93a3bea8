//! The session store: SQLite (rusqlite) for durability, plus an in-memory view that the
//! HTTP reads are served from (reads never wait on an actor or the disk).

pub mod backup;

use std::path::PathBuf;
use std::sync::Mutex;

use dashmap::DashMap;
use rusqlite::{params, Connection, OptionalExtension};

use botvisor_actors::{Desired, Persistence, SessionRecord, SessionState};

const SCHEMA: &str = include_str!("../../schema.sql");
const SCHEMA_VERSION: i64 = 1;
/// Events kept per session.
const EVENTS_KEPT: i64 = 100;

/// Where the session database lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Database {
    /// A file.
    File(PathBuf),
    /// In memory (lost at exit; for experiments).
    Memory,
}

/// One recorded state change.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Milliseconds since the epoch.
    pub at_ms: u64,
    /// The state entered.
    pub state: String,
    /// The error or reason at that moment, if any.
    pub detail: Option<String>,
}

/// SQLite plus the read view.
pub struct Store {
    conn: Mutex<Connection>,
    view: DashMap<String, SessionRecord>,
}

impl Store {
    /// Opens (creating if needed, mode 0600) and migrates the database.
    pub fn open(db: &Database) -> Result<Store, String> {
        let conn = match db {
            Database::Memory => Connection::open_in_memory(),
            Database::File(path) => {
                crate::paths::create_private_file(path)?;
                Connection::open(path)
            }
        }
        .map_err(|e| format!("cannot open the database: {}", sqlite_hint(&e)))?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 5000;",
        )
        .map_err(|e| format!("cannot configure the database: {e}"))?;
        migrate(&conn)?;
        Ok(Store {
            conn: Mutex::new(conn),
            view: DashMap::new(),
        })
    }

    /// Reads every session (at boot) and fills the view.
    pub fn load_all(&self) -> Result<Vec<SessionRecord>, String> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {COLUMNS} FROM sessions ORDER BY created_at"
            ))
            .map_err(|e| e.to_string())?;
        let rows = stmt
            .query_map([], |r| {
                Ok(SessionRecord {
                    user_id: r.get(0)?,
                    phone_number: r.get(1)?,
                    name: r.get(2)?,
                    desired: Desired::parse(&r.get::<_, String>(3)?).unwrap_or(Desired::Stopped),
                    state: SessionState::parse(&r.get::<_, String>(4)?)
                        .unwrap_or(SessionState::Stopped),
                    restarts: r.get(5)?,
                    disconnects: r.get(6)?,
                    last_error: r.get(7)?,
                    created_at_ms: r.get::<_, i64>(8)? as u64,
                    updated_at_ms: r.get::<_, i64>(9)? as u64,
                    last_seen_at_ms: r.get::<_, Option<i64>>(10)?.map(|v| v as u64),
                    pairing: None,
                })
            })
            .map_err(|e| e.to_string())?;
        let all: Vec<SessionRecord> = rows.collect::<Result<_, _>>().map_err(|e| e.to_string())?;
        for rec in &all {
            self.view.insert(rec.user_id.clone(), rec.clone());
        }
        Ok(all)
    }

    /// One session as the API shows it.
    pub fn get(&self, user_id: &str) -> Option<SessionRecord> {
        self.view.get(user_id).map(|r| r.clone())
    }

    /// All sessions, oldest first.
    pub fn list(&self) -> Vec<SessionRecord> {
        let mut all: Vec<SessionRecord> = self.view.iter().map(|r| r.clone()).collect();
        all.sort_by(|a, b| (a.created_at_ms, &a.user_id).cmp(&(b.created_at_ms, &b.user_id)));
        all
    }

    /// The newest state changes of a session, newest first.
    pub fn events(&self, user_id: &str, limit: usize) -> Result<Vec<Event>, String> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare(
                "SELECT at, state, detail FROM events WHERE user_id = ?1 ORDER BY id DESC LIMIT ?2",
            )
            .map_err(|e| e.to_string())?;
        let rows = stmt
            .query_map(params![user_id, limit as i64], |r| {
                Ok(Event {
                    at_ms: r.get::<_, i64>(0)? as u64,
                    state: r.get(1)?,
                    detail: r.get(2)?,
                })
            })
            .map_err(|e| e.to_string())?;
        rows.collect::<Result<_, _>>().map_err(|e| e.to_string())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves the connection usable: recover it.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The sessions table's columns, in the order `write_row` binds them.
const COLUMNS: &str = "user_id, phone_number, name, desired, state, restarts, disconnects, \
                       last_error, created_at, updated_at, last_seen_at";
const PLACEHOLDERS: &str = "?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11";
const UPDATE_SQL: &str =
    "UPDATE sessions SET phone_number = ?2, name = ?3, desired = ?4, state = ?5, \
     restarts = ?6, disconnects = ?7, last_error = ?8, created_at = ?9, updated_at = ?10, \
     last_seen_at = ?11 WHERE user_id = ?1";

/// Runs `sql` with a record bound to ?1..?11 in `COLUMNS` order.
fn write_row(conn: &Connection, sql: &str, rec: &SessionRecord) -> rusqlite::Result<usize> {
    conn.execute(
        sql,
        params![
            rec.user_id,
            rec.phone_number,
            rec.name,
            rec.desired.as_str(),
            rec.state.as_str(),
            rec.restarts,
            rec.disconnects,
            rec.last_error,
            rec.created_at_ms as i64,
            rec.updated_at_ms as i64,
            rec.last_seen_at_ms.map(|v| v as i64),
        ],
    )
}

fn record_event(conn: &Connection, rec: &SessionRecord) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO events (user_id, at, state, detail) VALUES (?1, ?2, ?3, ?4)",
        params![
            rec.user_id,
            rec.updated_at_ms as i64,
            rec.state.as_str(),
            rec.last_error
        ],
    )?;
    conn.execute(
        "DELETE FROM events WHERE user_id = ?1 AND id <= \
         (SELECT id FROM events WHERE user_id = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
        params![rec.user_id, EVENTS_KEPT],
    )?;
    Ok(())
}

impl Persistence for Store {
    fn insert(&self, rec: &SessionRecord) -> Result<(), String> {
        let conn = self.lock();
        let tx = conn.unchecked_transaction().map_err(|e| e.to_string())?;
        write_row(
            &tx,
            &format!("INSERT INTO sessions ({COLUMNS}) VALUES ({PLACEHOLDERS})"),
            rec,
        )
        .map_err(|e| sqlite_hint(&e))?;
        record_event(&tx, rec).map_err(|e| e.to_string())?;
        tx.commit().map_err(|e| sqlite_hint(&e))?;
        self.view.insert(rec.user_id.clone(), rec.clone());
        Ok(())
    }

    fn save(&self, rec: &SessionRecord) -> Result<(), String> {
        let changed_state = self
            .view
            .get(&rec.user_id)
            .map(|old| old.state != rec.state)
            .unwrap_or(true);
        // The view goes first: readers must see the live state even if the disk is failing.
        self.view.insert(rec.user_id.clone(), rec.clone());
        let conn = self.lock();
        let tx = conn.unchecked_transaction().map_err(|e| e.to_string())?;
        write_row(&tx, UPDATE_SQL, rec).map_err(|e| sqlite_hint(&e))?;
        if changed_state {
            record_event(&tx, rec).map_err(|e| e.to_string())?;
        }
        tx.commit().map_err(|e| sqlite_hint(&e))
    }

    fn delete(&self, user_id: &str) -> Result<(), String> {
        self.view.remove(user_id);
        let conn = self.lock();
        let tx = conn.unchecked_transaction().map_err(|e| e.to_string())?;
        tx.execute("DELETE FROM sessions WHERE user_id = ?1", params![user_id])
            .map_err(|e| sqlite_hint(&e))?;
        tx.execute("DELETE FROM events WHERE user_id = ?1", params![user_id])
            .map_err(|e| sqlite_hint(&e))?;
        tx.commit().map_err(|e| sqlite_hint(&e))
    }
}

fn migrate(conn: &Connection) -> Result<(), String> {
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|e| e.to_string())?;
    if version > SCHEMA_VERSION {
        return Err(format!(
            "the database has schema version {version}, newer than this botvisor knows ({SCHEMA_VERSION}); \
             upgrade botvisor or use another --database-url"
        ));
    }
    if version < 1 {
        conn.execute_batch(SCHEMA)
            .and_then(|_| conn.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}")))
            .map_err(|e| format!("cannot create the schema: {e}"))?;
    }
    // Sanity: the table must be there whatever the version said.
    conn.query_row(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'sessions'",
        [],
        |r| r.get::<_, String>(0),
    )
    .optional()
    .map_err(|e| e.to_string())?
    .ok_or_else(|| "the database has no sessions table".to_string())?;
    Ok(())
}

/// A rusqlite error as text, with the open-files hint.
pub fn sqlite_hint(e: &rusqlite::Error) -> String {
    crate::limits::open_error_hint(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_a_reopen_and_pairing_codes_are_not_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::File(dir.path().join("b.db"));
        let store = Store::open(&db).unwrap();
        let mut rec = SessionRecord::new("u1".into(), "15550001111".into());
        store.insert(&rec).unwrap();
        assert!(store.insert(&rec).is_err(), "duplicate insert must fail");
        rec.state = SessionState::Pairing;
        rec.pairing = Some(botvisor_actors::PairingCode {
            code: "ABCD-1234".into(),
            expires_at_ms: 1,
        });
        store.save(&rec).unwrap();
        assert!(store.get("u1").unwrap().pairing.is_some());
        drop(store);
        let store = Store::open(&db).unwrap();
        let all = store.load_all().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].state, SessionState::Pairing);
        assert_eq!(all[0].pairing, None);
        let events = store.events("u1", 10).unwrap();
        assert_eq!(
            events.iter().map(|e| e.state.as_str()).collect::<Vec<_>>(),
            ["pairing", "starting"]
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("b.db"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch("PRAGMA user_version = 99")
            .unwrap();
        let err = Store::open(&Database::File(path)).err().unwrap();
        assert!(err.contains("newer"), "{err}");
    }

    #[test]
    fn events_are_pruned_per_session() {
        let store = Store::open(&Database::Memory).unwrap();
        let mut rec = SessionRecord::new("u".into(), "15550001111".into());
        store.insert(&rec).unwrap();
        for i in 0..250 {
            rec.state = if i % 2 == 0 {
                SessionState::Online
            } else {
                SessionState::Disconnected
            };
            store.save(&rec).unwrap();
        }
        assert_eq!(store.events("u", 1000).unwrap().len(), EVENTS_KEPT as usize);
    }
}
