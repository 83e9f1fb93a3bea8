//! The SQLite engine: one file, opened with botvisor's settings (WAL, `synchronous=FULL`,
//! a 5 s busy wait), the schema in `schema.sql` (its version in `PRAGMA user_version`),
//! and the failure kinds told from SQLite's result codes and the errno behind them.

use std::path::Path;

use rusqlite::types::{Value as SqlValue, ValueRef};
use rusqlite::{params, Connection, ErrorCode, OpenFlags, OptionalExtension};

use botvisor_actors::{Desired, SessionRecord, SessionState, StorageError};

use super::tables::{Row, Table, Value};
use super::{
    Batch, Change, DeadLetter, Engine, Event, EventRow, Lane, MessageRow, OutboxHead, OutboxRow,
    Outcome, QueuedRow, SessionReceiver, EVENTS_KEPT,
};

const SCHEMA: &str = include_str!("../../schema.sql");
/// The schema version this build writes (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 11;

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
/// A lane's head.
pub(crate) const HEAD_SQL: &str = "SELECT id, event_id, kind, body, attempts, next_at FROM outbox \
     WHERE dead = 0 AND destination = ?1 AND user_id = ?2 ORDER BY id LIMIT 1";
/// Every lane's head and when it is due (SQLite takes a bare column from the min row).
pub(crate) const HEADS_SQL: &str = "SELECT destination, user_id, next_at, min(id) FROM outbox \
     WHERE dead = 0 GROUP BY destination, user_id";

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

/// Where an SQLite database is: a path, or a `file:` URI (the shared in-memory one).
#[derive(Debug, Clone)]
pub struct Location {
    path: String,
    uri: bool,
    /// The connection that migrated it, kept for a URI: a shared in-memory database lives
    /// only while one of its connections is open.
    keeper: Option<std::sync::Arc<std::sync::Mutex<Connection>>>,
}

impl Location {
    /// Opens the database (creating it), brings its schema up to date and returns where
    /// it is. The file itself must exist already with the wanted mode, or be a URI.
    pub fn open(path: String, uri: bool) -> Result<Location, StorageError> {
        let mut location = Location {
            path,
            uri,
            keeper: None,
        };
        let first = location.connect()?.conn;
        migrate(&first)?;
        if uri {
            location.keeper = Some(std::sync::Arc::new(std::sync::Mutex::new(first)));
        }
        Ok(location)
    }

    /// A new connection.
    pub fn connect(&self) -> Result<SqliteEngine, StorageError> {
        Ok(SqliteEngine {
            conn: open(&self.path, self.uri)?,
        })
    }
}

/// Opens a connection with botvisor's settings (WAL, FULL sync: every commit is on the
/// disk before it is confirmed; 5 s busy wait).
fn open(path: &str, uri: bool) -> Result<Connection, StorageError> {
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
fn migrate(conn: &Connection) -> Result<(), StorageError> {
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

/// Whether the SQLite file at `path` has a table of that name (read-only; false when
/// it cannot be opened). Tells which link's credential files a data directory holds.
pub fn has_table(path: &Path, table: &str) -> bool {
    let Ok(conn) = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY) else {
        return false;
    };
    conn.query_row(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1",
        [table],
        |_| Ok(()),
    )
    .is_ok()
}

/// One connection to the file.
pub struct SqliteEngine {
    conn: Connection,
}

impl SqliteEngine {
    fn fail(&self) -> impl Fn(rusqlite::Error) -> StorageError + '_ {
        |e| classify_on(&self.conn, &e)
    }
}

/// [`Engine::update_setting`] in one `BEGIN IMMEDIATE` transaction.
fn update_setting(
    conn: &mut Connection,
    key: &str,
    change: &mut dyn FnMut(Option<&str>) -> Option<String>,
) -> rusqlite::Result<bool> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let current: Option<String> = tx
        .query_row(
            "SELECT value FROM settings WHERE key = ?1",
            params![key],
            |r| r.get(0),
        )
        .optional()?;
    let Some(value) = change(current.as_deref()) else {
        return Ok(false);
    };
    tx.execute(
        "INSERT OR REPLACE INTO settings (key, value) VALUES (?1, ?2)",
        params![key, value],
    )?;
    tx.commit()?;
    Ok(true)
}

fn to_sql(v: &Value) -> SqlValue {
    match v {
        Value::Null => SqlValue::Null,
        Value::Int(i) => SqlValue::Integer(*i),
        Value::Text(t) => SqlValue::Text(t.clone()),
    }
}

/// Writes a record: `upsert` inserts or replaces the row, otherwise it updates it.
fn write_row(conn: &Connection, rec: &SessionRecord, upsert: bool) -> rusqlite::Result<usize> {
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

/// Removes a session's row, events and own receiver.
fn delete_session(conn: &Connection, user_id: &str) -> rusqlite::Result<()> {
    for sql in [
        "DELETE FROM sessions WHERE user_id = ?1",
        "DELETE FROM events WHERE user_id = ?1",
        "DELETE FROM session_webhooks WHERE user_id = ?1",
        "DELETE FROM session_webhook_options WHERE user_id = ?1",
    ] {
        conn.prepare_cached(sql)?.execute([user_id])?;
    }
    let (from, to) = super::message_keys_of(user_id);
    for sql in [
        "DELETE FROM messages WHERE key >= ?1 AND key < ?2",
        "DELETE FROM message_media WHERE key >= ?1 AND key < ?2",
        "DELETE FROM message_polls WHERE key >= ?1 AND key < ?2",
        "DELETE FROM queued WHERE key >= ?1 AND key < ?2",
    ] {
        conn.prepare_cached(sql)?.execute([&from, &to])?;
    }
    Ok(())
}

fn insert_event(conn: &Connection, row: &EventRow) -> rusqlite::Result<()> {
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
fn prune_events(conn: &Connection, user_id: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "DELETE FROM events WHERE user_id = ?1 AND id <= \
         (SELECT id FROM events WHERE user_id = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
    )?
    .execute(params![user_id, EVENTS_KEPT])?;
    Ok(())
}

fn insert_outbox(conn: &Connection, row: &OutboxRow) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO outbox (event_id, destination, user_id, kind, body, created_at, next_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
    )?
    .execute(params![
        row.event_id,
        row.destination,
        row.user_id,
        row.kind,
        row.body,
        row.at_ms as i64
    ])
    .map(|_| ())
}

fn commit(conn: &mut Connection, batch: &Batch<'_>) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    for change in &batch.changes {
        match change {
            Change::Insert(rec) => {
                write_row(&tx, rec, true)?;
            }
            Change::Delete(id) => delete_session(&tx, id)?,
        }
    }
    for rec in &batch.rows {
        write_row(&tx, rec, false)?;
    }
    let mut logged = std::collections::HashSet::new();
    for row in &batch.events {
        insert_event(&tx, row)?;
        logged.insert(row.user_id.as_str());
    }
    for user_id in logged {
        prune_events(&tx, user_id)?;
    }
    for row in batch.outbox {
        insert_outbox(&tx, row)?;
    }
    for m in &batch.messages {
        tx.prepare_cached(
            "INSERT INTO messages (key, chat, author, from_me, at) VALUES (?1, ?2, ?3, ?4, ?5) \
             ON CONFLICT (key) DO NOTHING",
        )?
        .execute(params![
            m.key(),
            m.chat,
            m.author,
            m.from_me,
            m.at_ms as i64
        ])?;
        if let Some(locator) = &m.media {
            tx.prepare_cached(
                "INSERT INTO message_media (key, locator, size, mimetype, at) \
                 VALUES (?1, ?2, ?3, ?4, ?5) \
                 ON CONFLICT (key) DO NOTHING",
            )?
            .execute(params![
                m.key(),
                locator,
                m.media_size.map(|s| s as i64),
                m.media_type,
                m.at_ms as i64
            ])?;
        }
        if let Some(options) = &m.poll_options {
            tx.prepare_cached(
                "INSERT INTO message_polls (key, options, at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (key) DO NOTHING",
            )?
            .execute(params![m.key(), options, m.at_ms as i64])?;
        }
    }
    if let Some(before) = batch.forget_messages_before {
        for sql in [
            "DELETE FROM messages WHERE at < ?1",
            "DELETE FROM message_media WHERE at < ?1",
            "DELETE FROM message_polls WHERE at < ?1",
        ] {
            tx.prepare_cached(sql)?.execute([before as i64])?;
        }
    }
    for q in batch.queued {
        tx.prepare_cached(
            "INSERT INTO queued (key, message_id, body, at) VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![q.key(), q.message_id, q.body, q.at_ms as i64])?;
    }
    for key in batch.dequeued {
        tx.prepare_cached("DELETE FROM queued WHERE key = ?1")?
            .execute([key])?;
    }
    tx.commit()
}

fn write_outcomes(conn: &mut Connection, outcomes: &[Outcome<'_>]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    for o in outcomes {
        match *o {
            Outcome::Delivered { id } => {
                tx.prepare_cached("DELETE FROM outbox WHERE id = ?1")?
                    .execute([id])?;
            }
            Outcome::Dead {
                id,
                attempts,
                error,
            } => {
                tx.prepare_cached(
                    "UPDATE outbox SET attempts = ?2, dead = 1, last_error = ?3 WHERE id = ?1",
                )?
                .execute(params![id, attempts, error])?;
            }
            Outcome::Retry {
                id,
                attempts,
                next_at,
                error,
            } => {
                tx.prepare_cached(
                    "UPDATE outbox SET attempts = ?2, next_at = ?3, last_error = ?4 WHERE id = ?1",
                )?
                .execute(params![id, attempts, next_at as i64, error])?;
            }
        }
    }
    tx.commit()
}

impl SqliteEngine {
    /// The queued sends with keys in `[from, to)`, in order.
    fn queued_in(&mut self, from: &str, to: &str) -> Result<Vec<QueuedRow>, StorageError> {
        self.conn
            .prepare_cached(
                "SELECT key, message_id, body, at FROM queued WHERE key >= ?1 AND key < ?2 ORDER BY key",
            )
            .and_then(|mut stmt| {
                let rows = stmt.query_map([from, to], |r| {
                    Ok((r.get::<_, String>(0)?, r.get(1)?, r.get(2)?, r.get::<_, i64>(3)?))
                })?;
                rows.collect::<Result<Vec<_>, _>>()
            })
            .map(|rows| {
                rows.into_iter()
                    .filter_map(|(key, id, body, at)| QueuedRow::from_key(&key, id, body, at as u64))
                    .collect()
            })
            .map_err(self.fail())
    }
}

impl Engine for SqliteEngine {
    fn load_sessions(&mut self) -> Result<Vec<SessionRecord>, StorageError> {
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT {COLUMNS} FROM sessions ORDER BY created_at"
            ))
            .map_err(self.fail())?;
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
                    by: None,
                })
            })
            .map_err(self.fail())?;
        rows.collect::<Result<_, _>>().map_err(self.fail())
    }

    fn events(&mut self, user_id: &str, limit: usize) -> Result<Vec<Event>, StorageError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT at, state, detail FROM events WHERE user_id = ?1 ORDER BY id DESC LIMIT ?2",
            )
            .map_err(self.fail())?;
        let rows = stmt
            .query_map(params![user_id, limit as i64], |r| {
                Ok(Event {
                    at_ms: r.get::<_, i64>(0)? as u64,
                    state: r.get(1)?,
                    detail: r.get(2)?,
                })
            })
            .map_err(self.fail())?;
        rows.collect::<Result<_, _>>().map_err(self.fail())
    }

    fn message(
        &mut self,
        user_id: &str,
        message_id: &str,
    ) -> Result<Option<MessageRow>, StorageError> {
        self.conn
            .prepare_cached(
                "SELECT m.chat, m.author, m.from_me, m.at, d.locator, d.size, \
                 d.mimetype, p.options FROM messages m \
                 LEFT JOIN message_media d ON d.key = m.key \
                 LEFT JOIN message_polls p ON p.key = m.key WHERE m.key = ?1",
            )
            .and_then(|mut stmt| {
                stmt.query_row([super::message_key(user_id, message_id)], |r| {
                    Ok(MessageRow {
                        user_id: user_id.to_string(),
                        message_id: message_id.to_string(),
                        chat: r.get(0)?,
                        author: r.get(1)?,
                        from_me: r.get(2)?,
                        at_ms: r.get::<_, i64>(3)? as u64,
                        media: r.get(4)?,
                        media_size: r.get::<_, Option<i64>>(5)?.map(|s| s.max(0) as u64),
                        media_type: r.get(6)?,
                        poll_options: r.get(7)?,
                    })
                })
                .optional()
            })
            .map_err(self.fail())
    }

    fn queued(&mut self) -> Result<Vec<QueuedRow>, StorageError> {
        self.queued_in("", "\u{10FFFF}")
    }

    fn queued_of(&mut self, user_id: &str) -> Result<Vec<QueuedRow>, StorageError> {
        let (from, to) = super::message_keys_of(user_id);
        self.queued_in(&from, &to)
    }

    fn setting(&mut self, key: &str) -> Result<Option<String>, StorageError> {
        self.conn
            .query_row("SELECT value FROM settings WHERE key = ?1", [key], |r| {
                r.get(0)
            })
            .optional()
            .map_err(self.fail())
    }

    fn set_setting(&mut self, key: &str, value: &str) -> Result<(), StorageError> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO settings (key, value) VALUES (?1, ?2)",
                params![key, value],
            )
            .map(|_| ())
            .map_err(self.fail())
    }

    fn update_setting(
        &mut self,
        key: &str,
        change: &mut dyn FnMut(Option<&str>) -> Option<String>,
    ) -> Result<bool, StorageError> {
        update_setting(&mut self.conn, key, change).map_err(|e| classify_on(&self.conn, &e))
    }

    fn commit(&mut self, batch: &Batch<'_>) -> Result<(), StorageError> {
        commit(&mut self.conn, batch).map_err(|e| classify_on(&self.conn, &e))
    }

    fn session_webhooks(&mut self) -> Result<Vec<SessionReceiver>, StorageError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT w.user_id, w.url, o.events, o.secret FROM session_webhooks w \
                 LEFT JOIN session_webhook_options o ON o.user_id = w.user_id",
            )
            .map_err(self.fail())?;
        let rows = stmt
            .query_map([], |r| {
                Ok(SessionReceiver {
                    user_id: r.get(0)?,
                    url: r.get(1)?,
                    events: r.get(2)?,
                    secret: r.get(3)?,
                })
            })
            .map_err(self.fail())?;
        rows.collect::<Result<_, _>>().map_err(self.fail())
    }

    fn set_session_webhook(
        &mut self,
        user_id: &str,
        receiver: Option<&SessionReceiver>,
    ) -> Result<(), StorageError> {
        let tx = self.conn.transaction().map_err(|e| classify(&e))?;
        let done = match receiver {
            Some(r) => tx
                .execute(
                    "INSERT INTO session_webhooks (user_id, url) VALUES (?1, ?2) \
                     ON CONFLICT (user_id) DO UPDATE SET url = excluded.url",
                    [user_id, &r.url],
                )
                .and_then(|_| {
                    tx.execute(
                        "INSERT INTO session_webhook_options (user_id, events, secret) \
                         VALUES (?1, ?2, ?3) ON CONFLICT (user_id) DO UPDATE \
                         SET events = excluded.events, secret = excluded.secret",
                        params![user_id, r.events, r.secret],
                    )
                }),
            None => tx
                .execute("DELETE FROM session_webhooks WHERE user_id = ?1", [user_id])
                .and_then(|_| {
                    tx.execute(
                        "DELETE FROM session_webhook_options WHERE user_id = ?1",
                        [user_id],
                    )
                }),
        };
        done.and_then(|_| tx.commit()).map_err(|e| classify(&e))
    }

    fn outbox_heads(&mut self) -> Result<Vec<(Lane, u64)>, StorageError> {
        let mut stmt = self.conn.prepare_cached(HEADS_SQL).map_err(self.fail())?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    (r.get::<_, String>(0)?, r.get::<_, String>(1)?),
                    r.get::<_, i64>(2)?.max(0) as u64,
                ))
            })
            .map_err(self.fail())?;
        rows.collect::<Result<_, _>>().map_err(self.fail())
    }

    fn outbox_head(&mut self, lane: &Lane) -> Result<Option<OutboxHead>, StorageError> {
        let mut stmt = self.conn.prepare_cached(HEAD_SQL).map_err(self.fail())?;
        stmt.query_row(params![lane.0, lane.1], |r| {
            Ok(OutboxHead {
                id: r.get(0)?,
                event_id: r.get(1)?,
                kind: r.get(2)?,
                body: r.get(3)?,
                attempts: r.get(4)?,
                next_at: r.get::<_, i64>(5)?.max(0) as u64,
            })
        })
        .optional()
        .map_err(self.fail())
    }

    fn outbox_outcomes(&mut self, outcomes: &[Outcome<'_>]) -> Result<(), StorageError> {
        write_outcomes(&mut self.conn, outcomes).map_err(|e| classify_on(&self.conn, &e))
    }

    fn outbox_backlog(&mut self) -> Result<i64, StorageError> {
        self.conn
            .query_row("SELECT count(*) FROM outbox WHERE dead = 0", [], |r| {
                r.get::<_, i64>(0)
            })
            .map_err(self.fail())
    }

    fn dead_letters(&mut self, limit: usize) -> Result<Vec<DeadLetter>, StorageError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT event_id, destination, kind, user_id, attempts, last_error, created_at \
                 FROM outbox WHERE dead = 1 ORDER BY id LIMIT ?1",
            )
            .map_err(self.fail())?;
        let rows = stmt
            .query_map([limit as i64], |r| {
                Ok(DeadLetter {
                    event_id: r.get(0)?,
                    destination: r.get(1)?,
                    event: r.get(2)?,
                    user_id: r.get(3)?,
                    attempts: r.get(4)?,
                    last_error: r.get(5)?,
                    created_at: crate::timefmt::iso(r.get::<_, i64>(6)?.max(0) as u64),
                })
            })
            .map_err(self.fail())?;
        rows.collect::<Result<_, _>>().map_err(self.fail())
    }

    fn replay(&mut self, event_id: &str, now_ms: u64) -> Result<usize, StorageError> {
        self.conn
            .execute(
                "UPDATE outbox SET dead = 0, attempts = 0, next_at = ?2, last_error = NULL \
                 WHERE event_id = ?1 AND dead = 1",
                params![event_id, now_ms as i64],
            )
            .map_err(self.fail())
    }

    fn export(
        &mut self,
        table: &Table,
        after: Option<&Value>,
        limit: usize,
    ) -> Result<Vec<Row>, StorageError> {
        let (name, key, columns) = (table.name, table.key(), table.column_list());
        let filter = if after.is_some() {
            format!("WHERE {key} > ?1")
        } else {
            String::new()
        };
        let limit = limit.min(i64::MAX as usize);
        let sql = format!("SELECT {columns} FROM {name} {filter} ORDER BY {key} LIMIT {limit}");
        let mut stmt = self.conn.prepare(&sql).map_err(self.fail())?;
        let params: Vec<SqlValue> = after.iter().map(|v| to_sql(v)).collect();
        let rows = stmt
            .query_map(rusqlite::params_from_iter(params), |r| {
                (0..table.columns.len())
                    .map(|i| {
                        Ok(match r.get_ref(i)? {
                            ValueRef::Null => Value::Null,
                            ValueRef::Integer(v) => Value::Int(v),
                            ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into()),
                            other => {
                                return Err(rusqlite::Error::InvalidColumnType(
                                    i,
                                    table.columns[i].0.into(),
                                    other.data_type(),
                                ))
                            }
                        })
                    })
                    .collect::<rusqlite::Result<Row>>()
            })
            .map_err(self.fail())?;
        rows.collect::<Result<_, _>>().map_err(self.fail())
    }

    fn import(&mut self, table: &Table, rows: &[Row]) -> Result<(), StorageError> {
        let marks = (1..=table.columns.len())
            .map(|i| format!("?{i}"))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "INSERT OR REPLACE INTO {} ({}) VALUES ({marks})",
            table.name,
            table.column_list()
        );
        let tx = self.conn.transaction().map_err(|e| classify(&e))?;
        {
            let mut stmt = tx.prepare_cached(&sql).map_err(|e| classify(&e))?;
            for row in rows {
                stmt.execute(rusqlite::params_from_iter(row.iter().map(to_sql)))
                    .map_err(|e| classify(&e))?;
            }
        }
        tx.commit().map_err(|e| classify(&e))
    }

    fn count(&mut self, table: &Table) -> Result<i64, StorageError> {
        self.conn
            .query_row(&format!("SELECT count(*) FROM {}", table.name), [], |r| {
                r.get(0)
            })
            .map_err(self.fail())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(conn: &Connection, sql: &str) -> String {
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let params =
            rusqlite::params_from_iter(["d", "u"].into_iter().take(stmt.parameter_count()));
        let rows = stmt
            .query_map(params, |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        rows.join("; ")
    }

    /// A v4 database gets the lane index (and loses the per-destination one); the
    /// dispatcher's queries use it, with no sort and no scan of the table.
    #[test]
    fn the_lane_queries_use_the_lane_index_after_a_migration_from_v4() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.db").to_str().unwrap().to_string();
        Location::open(path.clone(), false).unwrap();
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "DROP INDEX outbox_lane; \
             CREATE INDEX outbox_next ON outbox (destination, dead, id); \
             PRAGMA user_version = 4;",
        )
        .unwrap();
        drop(conn);
        Location::open(path.clone(), false).unwrap();
        let conn = Connection::open(&path).unwrap();
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let indexes: Vec<String> = conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'outbox' ORDER BY name")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(indexes, ["outbox_event", "outbox_lane"]);
        let replay = plan(
            &conn,
            "UPDATE outbox SET dead = 0 WHERE event_id = 'evt_x' AND dead = 1",
        );
        assert!(replay.contains("outbox_event"), "{replay}");
        let head = plan(&conn, HEAD_SQL);
        assert!(
            head.contains("USING INDEX outbox_lane") && !head.contains("TEMP B-TREE"),
            "{head}"
        );
        let heads = plan(&conn, HEADS_SQL);
        assert!(
            heads.contains("outbox_lane") && !heads.contains("TEMP B-TREE"),
            "{heads}"
        );
        let count = plan(&conn, "SELECT count(*) FROM outbox WHERE dead = 0");
        assert!(count.contains("outbox_lane"), "{count}");
    }

    #[test]
    fn a_shared_memory_database_outlives_its_first_connection() {
        let uri = "file:botvisor-sqlite-test?mode=memory&cache=shared".to_string();
        let location = Location::open(uri, true).unwrap();
        let mut engine = location.connect().unwrap();
        engine.set_setting("k", "v").unwrap();
        drop(engine);
        assert_eq!(
            location.connect().unwrap().setting("k").unwrap().as_deref(),
            Some("v")
        );
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch("PRAGMA user_version = 99")
            .unwrap();
        let err = Location::open(path.to_str().unwrap().into(), false)
            .err()
            .unwrap();
        assert!(err.to_string().contains("newer"), "{err}");
    }
}
