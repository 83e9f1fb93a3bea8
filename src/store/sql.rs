//! The SQL side of the store: opening and migrating the database, reading and writing
//! rows, and telling what kind of failure an SQLite error is.

use std::path::Path;

use rusqlite::{params, Connection, ErrorCode, OpenFlags, OptionalExtension};

use botvisor_actors::{Desired, SessionRecord, SessionState, StorageError};

const SCHEMA: &str = include_str!("../../schema.sql");
const SCHEMA_VERSION: i64 = 6;
/// Events kept per session.
pub const EVENTS_KEPT: i64 = 100;

/// The sessions table's columns, in the order `write_row` binds them.
const COLUMNS: &str = "user_id, phone_number, name, desired, state, restarts, disconnects, \
                       last_error, created_at, updated_at, last_seen_at";
const UPSERT_SQL: &str = "INSERT OR REPLACE INTO sessions (user_id, phone_number, name, \
     desired, state, restarts, disconnects, last_error, created_at, updated_at, last_seen_at) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)";
const UPDATE_SQL: &str =
    "UPDATE sessions SET phone_number = ?2, name = ?3, desired = ?4, state = ?5, \
     restarts = ?6, disconnects = ?7, last_error = ?8, created_at = ?9, updated_at = ?10, \
     last_seen_at = ?11 WHERE user_id = ?1";

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

/// An event waiting to be written.
#[derive(Debug, Clone)]
pub struct EventRow {
    pub user_id: String,
    pub event: Event,
}

impl EventRow {
    /// The event a record's current state makes.
    pub fn of(rec: &SessionRecord) -> EventRow {
        EventRow {
            user_id: rec.user_id.clone(),
            event: Event {
                at_ms: rec.updated_at_ms,
                state: rec.state.as_str().to_string(),
                detail: rec.last_error.clone(),
            },
        }
    }
}

/// What kind of failure an SQLite error is, with the open-files hint.
pub fn classify(e: &rusqlite::Error) -> StorageError {
    let text = crate::limits::open_error_hint(e.to_string());
    match e.sqlite_error_code() {
        Some(ErrorCode::DiskFull) => StorageError::Full(text),
        Some(ErrorCode::ReadOnly) => StorageError::ReadOnly(text),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked | ErrorCode::CannotOpen) => {
            StorageError::Unavailable(text)
        }
        _ => StorageError::Failed(text),
    }
}

/// [`classify`] with the errno behind a generic I/O error: a filesystem that turned
/// read-only under an open database (EROFS) or filled up mid-write (ENOSPC, EDQUOT) is
/// reported by SQLite only as "disk I/O error".
pub fn classify_on(conn: &Connection, e: &rusqlite::Error) -> StorageError {
    if e.sqlite_error_code() == Some(ErrorCode::SystemIoFailure) {
        // SAFETY: the handle is valid while `conn` lives; sqlite3_system_errno only reads
        // the errno SQLite saved for this connection's last failed system call.
        let errno = unsafe { rusqlite::ffi::sqlite3_system_errno(conn.handle()) };
        let text = format!("{e} ({})", std::io::Error::from_raw_os_error(errno));
        match errno {
            libc::EROFS => return StorageError::ReadOnly(text),
            libc::ENOSPC | libc::EDQUOT => return StorageError::Full(text),
            _ => {}
        }
    }
    classify(e)
}

/// Opens a connection with botvisor's settings (WAL, FULL sync: every commit is on the
/// disk before it is confirmed; 5 s busy wait).
pub fn open(path: &str, uri: bool) -> Result<Connection, StorageError> {
    let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    if uri {
        flags |= OpenFlags::SQLITE_OPEN_URI;
    }
    let conn = Connection::open_with_flags(Path::new(path), flags).map_err(|e| classify(&e))?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA busy_timeout = 5000;",
    )
    .map_err(|e| classify(&e))?;
    Ok(conn)
}

/// Creates or checks the schema.
pub fn migrate(conn: &Connection) -> Result<(), StorageError> {
    let fail = |e: rusqlite::Error| classify(&e);
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(fail)?;
    if version > SCHEMA_VERSION {
        return Err(StorageError::Failed(format!(
            "the database has schema version {version}, newer than this botvisor knows ({SCHEMA_VERSION}); \
             upgrade botvisor or use another --database-url"
        )));
    }
    if version < SCHEMA_VERSION {
        conn.execute_batch(SCHEMA)
            .and_then(|_| conn.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}")))
            .map_err(fail)?;
    }
    // Sanity: the table must be there whatever the version said.
    conn.query_row(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'sessions'",
        [],
        |r| r.get::<_, String>(0),
    )
    .optional()
    .map_err(fail)?
    .ok_or_else(|| StorageError::Failed("the database has no sessions table".into()))?;
    Ok(())
}

/// A stored setting.
pub fn setting(conn: &Connection, key: &str) -> Result<Option<String>, StorageError> {
    conn.query_row("SELECT value FROM settings WHERE key = ?1", [key], |r| {
        r.get(0)
    })
    .optional()
    .map_err(|e| classify(&e))
}

/// Stores a setting.
pub fn set_setting(conn: &Connection, key: &str, value: &str) -> Result<(), StorageError> {
    conn.execute(
        "INSERT OR REPLACE INTO settings (key, value) VALUES (?1, ?2)",
        params![key, value],
    )
    .map(|_| ())
    .map_err(|e| classify(&e))
}

/// Every session, oldest first.
pub fn load_all(conn: &Connection) -> Result<Vec<SessionRecord>, StorageError> {
    let fail = |e: rusqlite::Error| classify(&e);
    let mut stmt = conn
        .prepare(&format!(
            "SELECT {COLUMNS} FROM sessions ORDER BY created_at"
        ))
        .map_err(fail)?;
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
                qr: None,
            })
        })
        .map_err(fail)?;
    rows.collect::<Result<_, _>>().map_err(fail)
}

/// The newest state changes of a session, newest first.
pub fn events(conn: &Connection, user_id: &str, limit: usize) -> Result<Vec<Event>, StorageError> {
    let fail = |e: rusqlite::Error| classify(&e);
    let mut stmt = conn
        .prepare_cached(
            "SELECT at, state, detail FROM events WHERE user_id = ?1 ORDER BY id DESC LIMIT ?2",
        )
        .map_err(fail)?;
    let rows = stmt
        .query_map(params![user_id, limit as i64], |r| {
            Ok(Event {
                at_ms: r.get::<_, i64>(0)? as u64,
                state: r.get(1)?,
                detail: r.get(2)?,
            })
        })
        .map_err(fail)?;
    rows.collect::<Result<_, _>>().map_err(fail)
}

/// Writes a record: `upsert` inserts or replaces the row, otherwise it updates it.
pub fn write_row(conn: &Connection, rec: &SessionRecord, upsert: bool) -> rusqlite::Result<usize> {
    let mut stmt = conn.prepare_cached(if upsert { UPSERT_SQL } else { UPDATE_SQL })?;
    stmt.execute(params![
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
    ])
}

/// Removes a session's row and events.
pub fn delete_session(conn: &Connection, user_id: &str) -> rusqlite::Result<()> {
    conn.prepare_cached("DELETE FROM sessions WHERE user_id = ?1")?
        .execute([user_id])?;
    conn.prepare_cached("DELETE FROM events WHERE user_id = ?1")?
        .execute([user_id])?;
    conn.prepare_cached("DELETE FROM session_webhooks WHERE user_id = ?1")?
        .execute([user_id])?;
    Ok(())
}

/// Logs a state change.
pub fn insert_event(conn: &Connection, row: &EventRow) -> rusqlite::Result<()> {
    conn.prepare_cached("INSERT INTO events (user_id, at, state, detail) VALUES (?1, ?2, ?3, ?4)")?
        .execute(params![
            row.user_id,
            row.event.at_ms as i64,
            row.event.state,
            row.event.detail
        ])?;
    Ok(())
}

/// Keeps only the newest `EVENTS_KEPT` events of a session.
pub fn prune_events(conn: &Connection, user_id: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "DELETE FROM events WHERE user_id = ?1 AND id <= \
         (SELECT id FROM events WHERE user_id = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
    )?
    .execute(params![user_id, EVENTS_KEPT])?;
    Ok(())
}

/// A webhook delivery to make.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    /// Stable across retries (`X-Botvisor-Event-Id`).
    pub event_id: String,
    /// The receiver's URL.
    pub destination: String,
    /// The session it is about.
    pub user_id: String,
    /// `session.state`, `message.received`, ...
    pub kind: &'static str,
    /// The JSON body.
    pub body: String,
    /// Milliseconds since the epoch.
    pub at_ms: u64,
}

/// Queues a delivery (in the caller's transaction).
pub fn insert_outbox(conn: &Connection, row: &OutboxRow) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO outbox (event_id, destination, user_id, kind, body, created_at, next_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
        rusqlite::params![
            row.event_id,
            row.destination,
            row.user_id,
            row.kind,
            row.body,
            row.at_ms as i64
        ],
    )
    .map(|_| ())
}

/// Every session's own webhook receiver.
pub fn session_webhooks(conn: &Connection) -> Result<Vec<(String, String)>, StorageError> {
    let fail = |e: rusqlite::Error| classify(&e);
    let mut stmt = conn
        .prepare("SELECT user_id, url FROM session_webhooks")
        .map_err(fail)?;
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .map_err(fail)?;
    rows.collect::<Result<_, _>>().map_err(fail)
}

/// Sets or clears a session's own webhook receiver.
pub fn set_session_webhook(
    conn: &Connection,
    user_id: &str,
    url: Option<&str>,
) -> rusqlite::Result<()> {
    match url {
        Some(url) => conn.execute(
            "INSERT INTO session_webhooks (user_id, url) VALUES (?1, ?2) \
             ON CONFLICT (user_id) DO UPDATE SET url = excluded.url",
            [user_id, url],
        ),
        None => conn.execute("DELETE FROM session_webhooks WHERE user_id = ?1", [user_id]),
    }
    .map(|_| ())
}
