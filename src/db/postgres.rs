//! The PostgreSQL engine, and what botvisor's two uses of PostgreSQL share (the rows
//! here, the WhatsApp keys in `keys::postgres`): the pool settings, the error type, the
//! numbered migrations under an advisory lock.
//!
//! [`Rows`] owns a small runtime of its own (one thread, `botvisor-pg`) on which its
//! connections run, and a bounded pool. An [`Engine`] call runs its statements from the
//! calling thread (the store's writer, the webhook dispatcher, the blocking pool) and
//! waits for them; it is bounded by the statement timeout plus a margin, so a server
//! that stops answering gives an error, not a hang. A connection that broke is dropped
//! when it comes back to the pool, and the next call opens a new one: after a restart of
//! the server, botvisor recovers by itself.
//!
//! One server per database: [`Rows::open`] takes a session-level advisory lock on a
//! connection of its own, held as long as the process runs (PostgreSQL releases it when
//! the process dies, whatever the way), so a second botvisor on the same database is
//! refused at start, as a second one on the same data directory is.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use tokio_postgres::types::ToSql;
use tokio_postgres::{error::SqlState, NoTls};

use botvisor_actors::{Desired, SessionRecord, SessionState, StorageError};

use super::nodes::Standing;
use super::tables::{Kind, Row, Table, Value};
use super::{
    Batch, Change, DeadLetter, Engine, Event, Lane, MessageRow, OutboxHead, Outcome, QueuedRow,
    SessionReceiver, EVENTS_KEPT,
};

// ---------------------------------------------------------------------------------------
// Shared: pool settings, errors, migrations
// ---------------------------------------------------------------------------------------

/// How a pool talks to the server.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Connections in the pool, at most (opened on demand). Default 16.
    pub pool_size: usize,
    /// The server cancels a statement that runs longer (`statement_timeout`, set on every
    /// connection at its start). Default 10 s.
    pub statement_timeout: Duration,
    /// Opening a connection gives up after this long. Default 10 s.
    pub connect_timeout: Duration,
    /// Waiting for a free connection when all `pool_size` are busy gives up after this
    /// long. Default 10 s.
    pub wait_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            pool_size: 16,
            statement_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            wait_timeout: Duration::from_secs(10),
        }
    }
}

impl PoolConfig {
    /// The longest one call may take before it is abandoned: the server's statement
    /// timeout plus a margin.
    pub fn deadline(&self) -> Duration {
        self.statement_timeout + Duration::from_secs(5)
    }
}

/// A connection string, parsed: the server's settings plus how to secure the connection.
#[derive(Clone)]
pub struct Connect {
    /// What tokio-postgres connects with.
    pub pg: tokio_postgres::Config,
    tls: Tls,
}

/// How connections are secured, from the connection string's `sslmode`:
///
/// - absent or `disable`: plain TCP;
/// - `prefer`: TLS when the server offers it;
/// - `require`, `verify-ca`, `verify-full`: TLS or no connection.
///
/// Whenever TLS is used the server's certificate is verified, host name included,
/// against the public roots plus `sslrootcert=PATH` (PEM) when given: botvisor does not
/// send its rows and WhatsApp keys over a channel it has not authenticated. (This is
/// stricter than libpq, whose `prefer` and `require` do not verify; a server with a
/// private CA needs `sslrootcert`.)
#[derive(Clone)]
enum Tls {
    Plain,
    Rustls(tokio_postgres_rustls::MakeRustlsConnect),
}

/// libpq's TLS parameters taken out of a connection string (URL or `key=value` form):
/// tokio-postgres knows neither `sslrootcert` nor the `verify-*` modes. The string left,
/// and the mode and root certificate found.
fn split_tls(url: &str) -> (String, Option<String>, Option<String>) {
    let (mut mode, mut root) = (None, None);
    let mut take = |key: &str, value: &str| match key {
        "sslmode" => {
            mode = Some(value.to_string());
            true
        }
        "sslrootcert" => {
            root = Some(value.to_string());
            true
        }
        _ => false,
    };
    let rest = if url.contains("://") {
        match url.split_once('?') {
            Some((base, query)) => {
                let kept: Vec<&str> = query
                    .split('&')
                    .filter(|kv| {
                        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                        !take(k, v)
                    })
                    .collect();
                if kept.is_empty() {
                    base.to_string()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
            None => url.to_string(),
        }
    } else {
        url.split_whitespace()
            .filter(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                !take(k.trim(), v.trim())
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    (rest, mode, root)
}

/// The TLS client: the public roots plus `sslrootcert`'s.
fn rustls_connector(
    root: Option<&str>,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, String> {
    let extra = match root {
        Some(path) => crate::tls::load_ca_file(Path::new(path), &format!("sslrootcert {path}"))?,
        None => Vec::new(),
    };
    let config = crate::tls::client_config(&extra)?;
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// A connection string, parsed, with the settings every botvisor connection gets
/// (`statement_timeout`, the connect timeout, an application name) and its TLS.
pub fn connection_config(
    url: &str,
    config: &PoolConfig,
    application: &str,
) -> Result<Connect, String> {
    let (rest, mode, root) = split_tls(url);
    let mut pg = tokio_postgres::Config::from_str(&rest)
        .map_err(|e| format!("the PostgreSQL connection string: {e}"))?;
    let tls = match mode.as_deref() {
        None | Some("disable") => {
            pg.ssl_mode(tokio_postgres::config::SslMode::Disable);
            Tls::Plain
        }
        Some("prefer") => {
            pg.ssl_mode(tokio_postgres::config::SslMode::Prefer);
            Tls::Rustls(rustls_connector(root.as_deref())?)
        }
        Some("require" | "verify-ca" | "verify-full") => {
            pg.ssl_mode(tokio_postgres::config::SslMode::Require);
            Tls::Rustls(rustls_connector(root.as_deref())?)
        }
        Some(other) => {
            return Err(format!(
                "the PostgreSQL connection string: sslmode={other} is not one of disable, \
                 prefer, require, verify-ca, verify-full"
            ))
        }
    };
    // statement_timeout on every connection, from its start: a statement stuck on a lock
    // or a slow server fails instead of holding a session.
    let timeout = format!(
        "-c statement_timeout={}",
        config.statement_timeout.as_millis().max(1)
    );
    let options = match pg.get_options() {
        Some(given) if !given.trim().is_empty() => format!("{given} {timeout}"),
        _ => timeout,
    };
    pg.options(&options);
    pg.connect_timeout(config.connect_timeout);
    if pg.get_application_name().is_none() {
        pg.application_name(application);
    }
    Ok(Connect { pg, tls })
}

impl Connect {
    /// One connection outside any pool, its connection task spawned on the current
    /// runtime.
    pub async fn connect(
        &self,
    ) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), tokio_postgres::Error> {
        match &self.tls {
            Tls::Plain => {
                let (client, connection) = self.pg.connect(NoTls).await?;
                Ok((
                    client,
                    tokio::spawn(async move {
                        let _ = connection.await;
                    }),
                ))
            }
            Tls::Rustls(tls) => {
                let (client, connection) = self.pg.connect(tls.clone()).await?;
                Ok((
                    client,
                    tokio::spawn(async move {
                        let _ = connection.await;
                    }),
                ))
            }
        }
    }
}

impl Connect {
    /// One connection whose notifications go to `heard` (its task spawned on the current
    /// runtime; `heard` is dropped when the connection ends).
    pub async fn connect_listening(
        &self,
        heard: tokio::sync::mpsc::UnboundedSender<Heard>,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        match &self.tls {
            Tls::Plain => {
                let (client, connection) = self.pg.connect(NoTls).await?;
                tokio::spawn(pump_notifications(connection, heard));
                Ok(client)
            }
            Tls::Rustls(tls) => {
                let (client, connection) = self.pg.connect(tls.clone()).await?;
                tokio::spawn(pump_notifications(connection, heard));
                Ok(client)
            }
        }
    }
}

/// A notification: its channel and payload.
pub type Heard = (String, String);

/// Drives a connection, passing on each notification, until it ends.
async fn pump_notifications<S, T>(
    mut connection: tokio_postgres::Connection<S, T>,
    heard: tokio::sync::mpsc::UnboundedSender<Heard>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                if heard
                    .send((n.channel().to_string(), n.payload().to_string()))
                    .is_err()
                {
                    return;
                }
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return,
        }
    }
}

fn lock(listening: &std::sync::Mutex<Listening>) -> std::sync::MutexGuard<'_, Listening> {
    listening.lock().unwrap_or_else(|p| p.into_inner())
}

/// The handlers of `channel` (every one when `None`).
fn handlers(listening: &std::sync::Mutex<Listening>, channel: Option<&str>) -> Vec<Handler> {
    lock(listening)
        .handlers
        .iter()
        .filter(|(c, _)| channel.is_none_or(|channel| *c == channel))
        .map(|(_, h)| h.clone())
        .collect()
}

/// `LISTEN`s on `channels` on `client`; false (logged) when it could not.
async fn listen_on(client: &tokio_postgres::Client, channels: &[&str], target: &str) -> bool {
    let statements: String = channels.iter().map(|c| format!("LISTEN {c};")).collect();
    match client.batch_execute(&statements).await {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(database = %target, error = %e, "cannot LISTEN");
            false
        }
    }
}

/// The task behind [`Rows::listen`]: one connection for every channel, handed each
/// notification; channels asked for later come on `added`.
async fn listen_all(
    connect: Connect,
    target: String,
    listening: Arc<std::sync::Mutex<Listening>>,
    mut added: tokio::sync::mpsc::UnboundedReceiver<&'static str>,
) {
    loop {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        match connect.connect_listening(tx).await {
            Ok(client) => {
                // Every channel asked for so far is in the list; the ones asked for from
                // now on come on `added` (listening twice on one is harmless).
                while added.try_recv().is_ok() {}
                let mut channels: Vec<&'static str> =
                    lock(&listening).handlers.iter().map(|(c, _)| *c).collect();
                channels.sort_unstable();
                channels.dedup();
                if listen_on(&client, &channels, &target).await {
                    for heard in handlers(&listening, None) {
                        heard(None);
                    }
                    loop {
                        tokio::select! {
                            notified = rx.recv() => match notified {
                                Some((channel, payload)) => {
                                    for heard in handlers(&listening, Some(&channel)) {
                                        heard(Some(&payload));
                                    }
                                }
                                None => break,
                            },
                            channel = added.recv() => match channel {
                                Some(channel) => {
                                    if !listen_on(&client, &[channel], &target).await {
                                        break;
                                    }
                                    for heard in handlers(&listening, Some(channel)) {
                                        heard(None);
                                    }
                                }
                                None => return,
                            },
                        }
                    }
                }
            }
            Err(e) => tracing::debug!(database = %target, error = %e, "cannot connect to LISTEN"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A bounded pool (connections opened on demand, on the current runtime).
pub fn pool(connect: Connect, config: &PoolConfig) -> Result<Pool, String> {
    if config.pool_size == 0 {
        return Err("a PostgreSQL pool needs at least one connection".into());
    }
    let manager_config = ManagerConfig {
        // A closed connection is dropped when it comes back to be reused; one that
        // breaks mid-statement fails that statement, then is dropped.
        recycling_method: RecyclingMethod::Fast,
    };
    let manager = match connect.tls {
        Tls::Plain => Manager::from_config(connect.pg, NoTls, manager_config),
        Tls::Rustls(tls) => Manager::from_config(connect.pg, tls, manager_config),
    };
    Pool::builder(manager)
        .max_size(config.pool_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(config.wait_timeout))
        .create_timeout(Some(config.connect_timeout))
        .recycle_timeout(Some(config.connect_timeout))
        .build()
        .map_err(|e| format!("the PostgreSQL pool: {e}"))
}

/// Where a connection string points, for messages: `host:port/dbname` (no user, no
/// password).
pub fn target(pg: &tokio_postgres::Config) -> String {
    use tokio_postgres::config::Host;
    let host = match pg.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    match pg.get_dbname() {
        Some(db) => format!("{host}:{port}/{db}"),
        None => format!("{host}:{port}"),
    }
}

/// A PostgreSQL error: the server's message and SQLSTATE, or the client's reason when
/// there was no answer.
#[derive(Debug, Clone)]
pub struct PgError {
    code: Option<SqlState>,
    message: String,
    connection: bool,
}

impl PgError {
    /// The SQLSTATE the server answered with, if it answered.
    pub fn code(&self) -> Option<&SqlState> {
        self.code.as_ref()
    }

    /// True when the connection failed or broke (no answer, refused, closed, the server
    /// shutting down): the statement may be retried on another connection.
    pub fn is_connection(&self) -> bool {
        self.connection
    }

    /// An error the client made up (no answer from the server).
    pub fn client(message: impl Into<String>) -> Self {
        Self {
            code: None,
            message: message.into(),
            connection: true,
        }
    }

    /// The kind of failure, for the store's callers: a connection that failed or broke
    /// (and a statement cancelled by its timeout) is `Unavailable` ("database
    /// unavailable", HTTP 503), a full disk `Full`, a read-only server `ReadOnly`.
    pub fn into_storage(self, target: &str) -> StorageError {
        let text = format!("database unavailable: PostgreSQL at {target}: {self}");
        if self.connection {
            return StorageError::Unavailable(text);
        }
        match self.code {
            Some(SqlState::DISK_FULL) => {
                StorageError::Full(format!("PostgreSQL at {target}: {self}"))
            }
            Some(SqlState::READ_ONLY_SQL_TRANSACTION) => {
                StorageError::ReadOnly(format!("PostgreSQL at {target}: {self}"))
            }
            Some(
                SqlState::QUERY_CANCELED
                | SqlState::T_R_SERIALIZATION_FAILURE
                | SqlState::T_R_DEADLOCK_DETECTED
                | SqlState::LOCK_NOT_AVAILABLE
                | SqlState::TOO_MANY_CONNECTIONS,
            ) => StorageError::Unavailable(text),
            _ => StorageError::Failed(format!("PostgreSQL at {target}: {self}")),
        }
    }
}

impl fmt::Display for PgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.code {
            Some(code) => write!(f, "{} (SQLSTATE {})", self.message, code.code()),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for PgError {}

/// SQLSTATEs after which the connection is gone: class 08 (connection exception) and the
/// server shutting down or starting.
fn is_connection_state(code: &SqlState) -> bool {
    code.code().starts_with("08")
        || *code == SqlState::ADMIN_SHUTDOWN
        || *code == SqlState::CRASH_SHUTDOWN
        || *code == SqlState::CANNOT_CONNECT_NOW
}

impl From<tokio_postgres::Error> for PgError {
    fn from(e: tokio_postgres::Error) -> Self {
        if let Some(db) = e.as_db_error() {
            let code = db.code().clone();
            return Self {
                connection: is_connection_state(&code),
                message: db.message().to_string(),
                code: Some(code),
            };
        }
        // No answer from the server: the client's reason and its causes, e.g. "error
        // connecting to server: Connection refused (os error 111)".
        let mut message = e.to_string();
        let mut io = false;
        let mut source = std::error::Error::source(&e);
        while let Some(inner) = source {
            io |= inner.is::<std::io::Error>();
            message.push_str(": ");
            message.push_str(&inner.to_string());
            source = inner.source();
        }
        let connection = io
            || e.is_closed()
            || message.starts_with("error connecting")
            || message.starts_with("timeout");
        Self {
            code: None,
            message,
            connection,
        }
    }
}

impl PgError {
    /// A pool's failure to hand out a connection.
    pub fn of_pool(e: PoolError, config: &PoolConfig) -> Self {
        match e {
            PoolError::Backend(e) => e.into(),
            PoolError::Timeout(what) => PgError::client(format!(
                "no PostgreSQL connection within the time allowed ({what:?}; pool of {}, wait \
                 {:?}, connect {:?})",
                config.pool_size, config.wait_timeout, config.connect_timeout
            )),
            other => PgError::client(format!("PostgreSQL connection pool: {other}")),
        }
    }
}

/// Numbered migrations: `(version, sql)`, applied in order, each once, recorded in
/// `table`. Never edit one that has shipped: add the next.
pub type Migrations = &'static [(i32, &'static str)];

/// Brings a schema up to date in one transaction, under `pg_advisory_xact_lock(lock)` (a
/// second process starting at once waits, then finds the schema made). A database newer
/// than this build is refused (`Err` names both versions).
pub async fn migrate(
    conn: &mut tokio_postgres::Client,
    lock: i64,
    table: &str,
    migrations: Migrations,
    what: &str,
) -> Result<(), PgError> {
    let tx = conn.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&lock])
        .await?;
    tx.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS {table} (
             version INTEGER PRIMARY KEY,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
         )"
    ))
    .await?;
    let current: i32 = tx
        .query_one(
            &format!("SELECT COALESCE(MAX(version), 0) FROM {table}"),
            &[],
        )
        .await?
        .try_get(0)?;
    let latest = migrations.last().map_or(0, |(v, _)| *v);
    if current > latest {
        return Err(PgError {
            code: None,
            message: format!(
                "the database's {what} schema is version {current}, newer than this build \
                 knows ({latest}): run a newer botvisor, or use another database"
            ),
            connection: false,
        });
    }
    for (version, sql) in migrations.iter().filter(|(v, _)| *v > current) {
        tx.batch_execute(sql).await?;
        tx.execute(
            &format!("INSERT INTO {table} (version) VALUES ($1)"),
            &[version],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The rows
// ---------------------------------------------------------------------------------------

/// Key for `pg_advisory_xact_lock`: migrations of the rows' schema.
const MIGRATION_LOCK: i64 = 0x626f_7476_726f_7773; // "botvrows"
/// Key for the session-level advisory lock the serving process holds.
const OWNER_LOCK: i64 = 0x626f_7476_6f77_6e72; // "botvownr"

/// The rows' numbered migrations (`bv_schema_version`).
pub const MIGRATIONS: Migrations = &[
    (1, MIGRATION_1),
    (2, MIGRATION_2),
    (3, MIGRATION_3),
    (4, MIGRATION_4),
    (5, MIGRATION_5),
    (6, MIGRATION_6),
    (7, MIGRATION_7),
    (8, MIGRATION_8),
];

/// Migration 1: the tables of `schema.sql`, in PostgreSQL's types and with a `bv_`
/// prefix (the database may be shared). Times are milliseconds since the epoch.
const MIGRATION_1: &str = r#"
CREATE TABLE bv_sessions (
    user_id      TEXT PRIMARY KEY,
    phone_number TEXT NOT NULL,
    name         TEXT,
    desired      TEXT NOT NULL CHECK (desired IN ('running', 'stopped')),
    state        TEXT NOT NULL,
    restarts     BIGINT NOT NULL DEFAULT 0,
    disconnects  BIGINT NOT NULL DEFAULT 0,
    last_error   TEXT,
    created_at   BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL,
    last_seen_at BIGINT
);
CREATE INDEX bv_sessions_created ON bv_sessions (created_at);
CREATE TABLE bv_events (
    id      BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id TEXT NOT NULL,
    at      BIGINT NOT NULL,
    state   TEXT NOT NULL,
    detail  TEXT
);
CREATE INDEX bv_events_by_user ON bv_events (user_id, id);
CREATE TABLE bv_settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE bv_outbox (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id    TEXT NOT NULL,
    destination TEXT NOT NULL,
    user_id     TEXT NOT NULL,
    kind        TEXT NOT NULL,
    body        TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    next_at     BIGINT NOT NULL,
    dead        BOOLEAN NOT NULL DEFAULT false,
    last_error  TEXT
);
CREATE INDEX bv_outbox_lane ON bv_outbox (dead, destination, user_id, id);
CREATE INDEX bv_outbox_event ON bv_outbox (event_id);
CREATE TABLE bv_session_webhooks (
    user_id TEXT PRIMARY KEY,
    url     TEXT NOT NULL
);
"#;

/// Migration 2: messages sent and received, by id (schema.sql v7).
const MIGRATION_2: &str = r#"
CREATE TABLE bv_messages (
    key     TEXT COLLATE "C" PRIMARY KEY,
    chat    TEXT NOT NULL,
    author  TEXT,
    from_me BOOLEAN NOT NULL,
    at      BIGINT NOT NULL
);
"#;

/// Migration 3: the sessions' durable outbound queues (schema.sql v8).
const MIGRATION_3: &str = r#"
CREATE TABLE bv_queued (
    key        TEXT COLLATE "C" PRIMARY KEY,
    message_id TEXT NOT NULL,
    body       TEXT NOT NULL,
    at         BIGINT NOT NULL
);
"#;

/// Migration 5: where received media's bytes are (schema.sql v10).
const MIGRATION_5: &str = r#"
CREATE TABLE bv_message_media (
    key     TEXT COLLATE "C" PRIMARY KEY,
    locator TEXT NOT NULL,
    size    BIGINT,
    mimetype TEXT,
    at      BIGINT NOT NULL
);
"#;

/// Migration 6: the options of the polls a session sent (schema.sql v11).
const MIGRATION_6: &str = r#"
CREATE TABLE bv_message_polls (
    key     TEXT COLLATE "C" PRIMARY KEY,
    options TEXT NOT NULL,
    at      BIGINT NOT NULL
);
"#;

/// Migration 7: several nodes on one database (`db::nodes`): the nodes' leases, and each
/// session's owner with its fence. (No SQLite twin: nodes need PostgreSQL.)
const MIGRATION_7: &str = r#"
CREATE TABLE bv_nodes (
    id          TEXT PRIMARY KEY,
    http_addr   TEXT NOT NULL,
    epoch       BIGINT NOT NULL,
    lease_until TIMESTAMPTZ NOT NULL,
    renewed_at  TIMESTAMPTZ NOT NULL,
    started_at  TIMESTAMPTZ NOT NULL,
    state       TEXT NOT NULL
);
ALTER TABLE bv_sessions ADD COLUMN owner TEXT;
ALTER TABLE bv_sessions ADD COLUMN owner_epoch BIGINT NOT NULL DEFAULT 0;
ALTER TABLE bv_sessions ADD COLUMN fence BIGINT NOT NULL DEFAULT 0;
CREATE INDEX bv_sessions_owner ON bv_sessions (owner);
"#;

/// Migration 8: the simulated link's credentials, for nodes (a session that moves stays
/// paired; a single server keeps them in files of its data dir).
const MIGRATION_8: &str = r#"
CREATE TABLE bv_sim_credentials (
    user_id   TEXT PRIMARY KEY,
    paired_at BIGINT NOT NULL,
    name      TEXT
);
"#;

/// Migration 4: a session's own receiver's options (schema.sql v9).
const MIGRATION_4: &str = r#"
CREATE TABLE bv_session_webhook_options (
    user_id TEXT PRIMARY KEY,
    events  TEXT,
    secret  TEXT
);
"#;

pub(super) const SESSION_COLUMNS: &str = "user_id, phone_number, name, desired, state, restarts, \
     disconnects, last_error, created_at, updated_at, last_seen_at";

/// The rows in one PostgreSQL database: a pool, the runtime its connections run on, and
/// the owner lock. Cheap to clone.
#[derive(Clone)]
pub struct Rows {
    inner: Arc<RowsInner>,
}

struct RowsInner {
    /// `Some` until dropped (shut down in the background: it may be dropped on a runtime).
    runtime: Option<tokio::runtime::Runtime>,
    pool: Pool,
    config: PoolConfig,
    target: String,
    /// This process as one node of several (`--node-id`): every commit is gated on it.
    node: Option<Arc<Standing>>,
    /// How to open a connection of its own (a node's `LISTEN`).
    connect: Connect,
    /// The channels `LISTEN`ed on, all on one connection of their own.
    listening: Arc<std::sync::Mutex<Listening>>,
}

/// What is listened for, and how to tell the listening task of a new channel.
#[derive(Default)]
struct Listening {
    handlers: Vec<(&'static str, Handler)>,
    /// `None` until the first [`Rows::listen`] starts the task.
    added: Option<tokio::sync::mpsc::UnboundedSender<&'static str>>,
}

/// Called once listening (`None`) and with each notification's payload.
type Handler = Arc<dyn Fn(Option<&str>) + Send + Sync>;

impl Drop for RowsInner {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Why the rows did not open.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Another botvisor serves this database.
    #[error(
        "another botvisor is serving the database at {0} (it holds the database's owner \
         lock): stop it first, or give this one another database"
    )]
    Taken(String),
    /// Anything else.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl Rows {
    /// Connects (failing at once when the server cannot be reached: the error names host
    /// and port), takes the owner lock, and brings the schema up to date.
    pub fn open(url: &str, config: PoolConfig) -> Result<Rows, OpenError> {
        Rows::open_as(url, config, None)
    }

    /// [`Rows::open`] for one node of several: no owner lock (the nodes share the
    /// database); every commit is gated on `node`'s ownership of the sessions it writes.
    pub fn open_as(
        url: &str,
        config: PoolConfig,
        node: Option<Arc<Standing>>,
    ) -> Result<Rows, OpenError> {
        let connect = connection_config(url, &config, "botvisor")
            .map_err(|e| OpenError::Storage(StorageError::Failed(e)))?;
        let target = target(&connect.pg);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("botvisor-pg")
            .enable_all()
            .build()
            .map_err(|e| {
                StorageError::Failed(format!("cannot start the PostgreSQL runtime: {e}"))
            })?;
        let pool = {
            let _entered = runtime.enter();
            pool(connect.clone(), &config).map_err(StorageError::Failed)?
        };
        let rows = Rows {
            inner: Arc::new(RowsInner {
                runtime: Some(runtime),
                pool,
                config,
                target,
                node,
                connect: connect.clone(),
                listening: Default::default(),
            }),
        };
        if rows.inner.node.is_none() {
            rows.take_owner_lock(connect)?;
        }
        let target = rows.inner.target.clone();
        rows.run(|c| async move {
            let mut c = c;
            migrate(
                &mut c,
                MIGRATION_LOCK,
                "bv_schema_version",
                MIGRATIONS,
                "botvisor",
            )
            .await
        })
        .map_err(|e| e.into_storage(&target))?;
        Ok(rows)
    }

    /// The owner lock, on a connection of its own that lives as long as the runtime. When
    /// that connection breaks (the server restarted) the lock is gone with it: it is
    /// taken again as soon as the server answers, and should another botvisor have taken
    /// it meanwhile, this process exits (two servers must not write the same rows).
    fn take_owner_lock(&self, connect: Connect) -> Result<(), OpenError> {
        let target = self.inner.target.clone();
        let (first_tx, first_rx) = std::sync::mpsc::channel();
        let rt = self.inner.runtime.as_ref().expect("running until dropped");
        rt.spawn(async move {
            let mut first = Some(first_tx);
            loop {
                match lock_once(&connect, &target).await {
                    Ok(Some((client, connection))) => {
                        match first.take() {
                            Some(tx) => {
                                let _ = tx.send(Ok(true));
                            }
                            None => tracing::info!(database = %target,
                                "the database's owner lock is held again"),
                        }
                        let _ = connection.await;
                        drop(client);
                        tracing::warn!(database = %target,
                            "the connection holding the database's owner lock broke; taking it again");
                    }
                    Ok(None) => {
                        if let Some(tx) = first.take() {
                            let _ = tx.send(Ok(false));
                            return;
                        }
                        tracing::error!(database = %target,
                            "another botvisor took the database's owner lock while the \
                             connection was down: exiting, so that only one server writes it");
                        std::process::exit(1);
                    }
                    Err(e) => {
                        if let Some(tx) = first.take() {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        match first_rx.recv() {
            Ok(Ok(true)) => Ok(()),
            Ok(Ok(false)) => Err(OpenError::Taken(self.inner.target.clone())),
            Ok(Err(e)) => Err(OpenError::Storage(e)),
            Err(_) => Err(OpenError::Storage(StorageError::Failed(
                "the PostgreSQL runtime stopped".into(),
            ))),
        }
    }

    /// Sessions whose WhatsApp keys this database keeps (`--keys database`): 0 when it
    /// has none, or no key tables.
    pub fn key_sessions(&self) -> Result<i64, StorageError> {
        self.run(|c| async move {
            let tables: bool = c
                .query_one("SELECT to_regclass('wa_device') IS NOT NULL", &[])
                .await?
                .try_get(0)?;
            if !tables {
                return Ok(0);
            }
            Ok(c.query_one("SELECT count(*) FROM wa_device", &[])
                .await?
                .try_get(0)?)
        })
        .map_err(|e| e.into_storage(&self.inner.target))
    }

    /// `host:port/dbname`, for messages.
    pub fn target(&self) -> &str {
        &self.inner.target
    }

    /// A handle for one thread.
    pub fn engine(&self) -> PgEngine {
        PgEngine { rows: self.clone() }
    }

    /// LISTENs on `channel` for as long as the rows live: `heard` gets `None` once
    /// listening (whatever was notified while not listening is to be caught up), then each
    /// notification's payload. Every channel shares one connection of its own, opened
    /// again after it breaks (each listening connection is woken by every notification
    /// of the database).
    pub fn listen(
        &self,
        channel: &'static str,
        heard: impl Fn(Option<&str>) + Send + Sync + 'static,
    ) {
        let mut listening = lock(&self.inner.listening);
        listening.handlers.push((channel, Arc::new(heard)));
        match &listening.added {
            Some(added) => {
                let _ = added.send(channel);
            }
            None => {
                let (added, channels) = tokio::sync::mpsc::unbounded_channel();
                listening.added = Some(added);
                let rt = self.inner.runtime.as_ref().expect("running until dropped");
                rt.spawn(listen_all(
                    self.inner.connect.clone(),
                    self.inner.target.clone(),
                    self.inner.listening.clone(),
                    channels,
                ));
            }
        }
    }

    /// [`Rows::run`] with the error as the store reports it.
    pub(super) fn run_storage<T, F, Fut>(&self, f: F) -> Result<T, StorageError>
    where
        F: FnOnce(deadpool_postgres::Object) -> Fut,
        Fut: Future<Output = Result<T, PgError>>,
    {
        self.run(f).map_err(|e| e.into_storage(&self.inner.target))
    }

    /// Runs `fut` to its end on this thread, with the rows' runtime as the context (its
    /// connections run there). Never call it on an async runtime's thread.
    fn block<T>(&self, fut: impl Future<Output = T>) -> T {
        let rt = self.inner.runtime.as_ref().expect("running until dropped");
        let _entered = rt.enter();
        futures_executor::block_on(fut)
    }

    /// Runs `f` on a pooled connection, within the deadline; a call that overruns is
    /// abandoned and its connection dropped (a statement may still be in flight on it).
    fn run<T, F, Fut>(&self, f: F) -> Result<T, PgError>
    where
        F: FnOnce(deadpool_postgres::Object) -> Fut,
        Fut: Future<Output = Result<T, PgError>>,
    {
        let config = &self.inner.config;
        let deadline = config.deadline();
        self.block(async move {
            let conn = self
                .inner
                .pool
                .get()
                .await
                .map_err(|e| PgError::of_pool(e, config))?;
            match tokio::time::timeout(deadline, f(conn)).await {
                Ok(result) => result,
                Err(_) => Err(PgError::client(format!(
                    "no answer from PostgreSQL within {deadline:?}; the connection was closed"
                ))),
            }
        })
    }
}

/// The connection's task, running until it ends.
type ConnectionTask = tokio::task::JoinHandle<()>;

/// Connects and tries the owner lock: the connection (which holds it) when taken, `None`
/// when another session holds it.
async fn lock_once(
    connect: &Connect,
    target: &str,
) -> Result<Option<(tokio_postgres::Client, ConnectionTask)>, StorageError> {
    let storage = |e| PgError::from(e).into_storage(target);
    let (client, task) = connect.connect().await.map_err(storage)?;
    let got: bool = client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&OWNER_LOCK])
        .await
        .and_then(|r| r.try_get(0))
        .map_err(storage)?;
    Ok(got.then_some((client, task)))
}

/// One thread's handle on the rows (every call takes a pooled connection).
pub struct PgEngine {
    rows: Rows,
}

impl PgEngine {
    fn run<T, F, Fut>(&self, f: F) -> Result<T, StorageError>
    where
        F: FnOnce(deadpool_postgres::Object) -> Fut,
        Fut: Future<Output = Result<T, PgError>>,
    {
        self.rows.run_storage(f)
    }
}

/// A value as a parameter of a column of `kind`.
fn param(v: &Value, kind: Kind) -> Box<dyn ToSql + Sync + Send> {
    match (v, kind) {
        (Value::Text(t), _) => Box::new(t.clone()),
        (Value::Int(i), Kind::Bool) => Box::new(*i != 0),
        (Value::Int(i), Kind::Int32) => Box::new(i32::try_from(*i).unwrap_or(i32::MAX)),
        (Value::Int(i), _) => Box::new(*i),
        (Value::Null, Kind::Text) => Box::new(None::<String>),
        (Value::Null, Kind::Bool) => Box::new(None::<bool>),
        (Value::Null, Kind::Int32) => Box::new(None::<i32>),
        (Value::Null, Kind::Int) => Box::new(None::<i64>),
    }
}

/// A row read back by the columns' kinds.
fn row_of(r: &tokio_postgres::Row, table: &Table) -> Result<Row, tokio_postgres::Error> {
    let int = |v: Option<i64>| v.map_or(Value::Null, Value::Int);
    table
        .columns
        .iter()
        .enumerate()
        .map(|(i, (_, kind))| {
            Ok(match kind {
                Kind::Text => r
                    .try_get::<_, Option<String>>(i)?
                    .map_or(Value::Null, Value::Text),
                Kind::Int => int(r.try_get(i)?),
                Kind::Int32 => int(r.try_get::<_, Option<i32>>(i)?.map(i64::from)),
                Kind::Bool => int(r.try_get::<_, Option<bool>>(i)?.map(i64::from)),
            })
        })
        .collect()
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    v.max(0) as u64
}

pub(super) fn session_of(r: &tokio_postgres::Row) -> Result<SessionRecord, tokio_postgres::Error> {
    Ok(SessionRecord {
        user_id: r.try_get(0)?,
        phone_number: r.try_get(1)?,
        name: r.try_get(2)?,
        desired: Desired::parse(r.try_get::<_, &str>(3)?).unwrap_or(Desired::Stopped),
        state: SessionState::parse(r.try_get::<_, &str>(4)?).unwrap_or(SessionState::Stopped),
        restarts: u32::try_from(r.try_get::<_, i64>(5)?).unwrap_or(u32::MAX),
        disconnects: u32::try_from(r.try_get::<_, i64>(6)?).unwrap_or(u32::MAX),
        last_error: r.try_get(7)?,
        created_at_ms: to_u64(r.try_get(8)?),
        updated_at_ms: to_u64(r.try_get(9)?),
        last_seen_at_ms: r.try_get::<_, Option<i64>>(10)?.map(to_u64),
        pairing: None,
        qr: None,
        by: None,
    })
}

/// The latest row of every session that changed: one statement for the whole batch
/// (a commit after a mass stop or a boot carries thousands).
async fn update_sessions(
    tx: &deadpool_postgres::Transaction<'_>,
    recs: &[&SessionRecord],
) -> Result<(), tokio_postgres::Error> {
    let ids: Vec<&str> = recs.iter().map(|r| r.user_id.as_str()).collect();
    let phones: Vec<&str> = recs.iter().map(|r| r.phone_number.as_str()).collect();
    let names: Vec<Option<&str>> = recs.iter().map(|r| r.name.as_deref()).collect();
    let desired: Vec<&str> = recs.iter().map(|r| r.desired.as_str()).collect();
    let states: Vec<&str> = recs.iter().map(|r| r.state.as_str()).collect();
    let restarts: Vec<i64> = recs.iter().map(|r| i64::from(r.restarts)).collect();
    let disconnects: Vec<i64> = recs.iter().map(|r| i64::from(r.disconnects)).collect();
    let errors: Vec<Option<&str>> = recs.iter().map(|r| r.last_error.as_deref()).collect();
    let created: Vec<i64> = recs.iter().map(|r| to_i64(r.created_at_ms)).collect();
    let updated: Vec<i64> = recs.iter().map(|r| to_i64(r.updated_at_ms)).collect();
    let seen: Vec<Option<i64>> = recs.iter().map(|r| r.last_seen_at_ms.map(to_i64)).collect();
    let stmt = tx
        .prepare_cached(
            "UPDATE bv_sessions s SET phone_number = u.phone_number, name = u.name, \
             desired = u.desired, state = u.state, restarts = u.restarts, \
             disconnects = u.disconnects, last_error = u.last_error, \
             created_at = u.created_at, updated_at = u.updated_at, \
             last_seen_at = u.last_seen_at \
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
             $6::bigint[], $7::bigint[], $8::text[], $9::bigint[], $10::bigint[], \
             $11::bigint[]) AS u(user_id, phone_number, name, desired, state, restarts, \
             disconnects, last_error, created_at, updated_at, last_seen_at) \
             WHERE s.user_id = u.user_id",
        )
        .await?;
    tx.execute(
        &stmt,
        &[
            &ids,
            &phones,
            &names,
            &desired,
            &states,
            &restarts,
            &disconnects,
            &errors,
            &created,
            &updated,
            &seen,
        ],
    )
    .await?;
    Ok(())
}

/// A new session's row (replacing any row of that id).
async fn insert_session(
    tx: &deadpool_postgres::Transaction<'_>,
    rec: &SessionRecord,
    owner: Option<&Owned>,
) -> Result<(), tokio_postgres::Error> {
    let (node, epoch, fence) = match owner {
        Some(o) => (
            Some(o.node.as_str()),
            o.epoch,
            o.fences.get(&rec.user_id).copied().unwrap_or(1),
        ),
        None => (None, 0, 0),
    };
    let stmt = tx
        .prepare_cached(
            "INSERT INTO bv_sessions (user_id, phone_number, name, desired, state, restarts, \
             disconnects, last_error, created_at, updated_at, last_seen_at, owner, \
             owner_epoch, fence) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) \
             ON CONFLICT (user_id) DO UPDATE SET phone_number = excluded.phone_number, \
             name = excluded.name, desired = excluded.desired, state = excluded.state, \
             restarts = excluded.restarts, disconnects = excluded.disconnects, \
             last_error = excluded.last_error, created_at = excluded.created_at, \
             updated_at = excluded.updated_at, last_seen_at = excluded.last_seen_at, \
             owner = excluded.owner, owner_epoch = excluded.owner_epoch, \
             fence = excluded.fence",
        )
        .await?;
    tx.execute(
        &stmt,
        &[
            &rec.user_id,
            &rec.phone_number,
            &rec.name,
            &rec.desired.as_str(),
            &rec.state.as_str(),
            &i64::from(rec.restarts),
            &i64::from(rec.disconnects),
            &rec.last_error,
            &to_i64(rec.created_at_ms),
            &to_i64(rec.updated_at_ms),
            &rec.last_seen_at_ms.map(to_i64),
            &node,
            &epoch,
            &fence,
        ],
    )
    .await?;
    Ok(())
}

/// The rows a node inserts are its own: its id, epoch, and each new row's fence.
struct Owned {
    node: String,
    epoch: i64,
    fences: HashMap<String, i64>,
}

async fn commit(
    mut conn: deadpool_postgres::Object,
    batch: &Batch<'_>,
    node: Option<&Standing>,
) -> Result<(), tokio_postgres::Error> {
    let tx = conn.transaction().await?;
    let Some(node) = node else {
        write_batch(&tx, batch, None).await?;
        return tx.commit().await;
    };
    let gate = Gate::check(&tx, batch, node).await?;
    let kept = gate.keep(batch);
    let owned = Owned {
        node: node.id.clone(),
        epoch: node.epoch(),
        fences: gate.inserted.clone(),
    };
    write_batch(&tx, &kept.batch(), Some(&owned)).await?;
    tx.commit().await?;
    gate.settle(batch, node);
    Ok(())
}

/// Which sessions of a batch this node may write (see `db::nodes`): those it holds with
/// the fence their row has, locked `FOR SHARE` until the commit, and new ones whose id no
/// other node's row has.
struct Gate {
    allowed: HashSet<String>,
    /// New rows and their fences.
    inserted: HashMap<String, i64>,
    /// Held sessions whose row names another owner or fence.
    lost: Vec<String>,
}

/// The session a queued send's key names.
fn user_of_key(key: &str) -> &str {
    key.rsplit_once('/').map_or(key, |(u, _)| u)
}

impl Gate {
    async fn check(
        tx: &deadpool_postgres::Transaction<'_>,
        batch: &Batch<'_>,
        node: &Standing,
    ) -> Result<Gate, tokio_postgres::Error> {
        let mut ids: Vec<&str> = batch
            .changes
            .iter()
            .map(|c| match c {
                Change::Insert(rec) => rec.user_id.as_str(),
                Change::Delete(id) => id,
            })
            .chain(batch.rows.iter().map(|r| r.user_id.as_str()))
            .chain(batch.events.iter().map(|e| e.user_id.as_str()))
            .chain(batch.outbox.iter().map(|o| o.user_id.as_str()))
            .chain(batch.messages.iter().map(|m| m.user_id.as_str()))
            .chain(batch.queued.iter().map(|q| q.user_id.as_str()))
            .chain(batch.dequeued.iter().map(|k| user_of_key(k)))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        let mut gate = Gate {
            allowed: HashSet::new(),
            inserted: HashMap::new(),
            lost: Vec::new(),
        };
        if ids.is_empty() {
            return Ok(gate);
        }
        let stmt = tx
            .prepare_cached(
                "SELECT user_id, owner, fence FROM bv_sessions WHERE user_id = ANY($1) \
                 ORDER BY user_id FOR SHARE",
            )
            .await?;
        let mut rows: HashMap<String, (Option<String>, i64)> = HashMap::new();
        for r in tx.query(&stmt, &[&ids]).await? {
            rows.insert(r.try_get(0)?, (r.try_get(1)?, r.try_get(2)?));
        }
        let inserts: HashSet<&str> = batch
            .changes
            .iter()
            .filter_map(|c| match c {
                Change::Insert(rec) => Some(rec.user_id.as_str()),
                Change::Delete(_) => None,
            })
            .collect();
        for id in ids {
            let row = rows.get(id);
            let mine = row.is_some_and(|(owner, fence)| {
                owner.as_deref() == Some(node.id.as_str()) && node.fence_of(id) == Some(*fence)
            });
            if inserts.contains(id) {
                match row {
                    None => {
                        gate.inserted.insert(id.to_string(), 1);
                    }
                    Some((_, fence)) if mine => {
                        gate.inserted.insert(id.to_string(), fence + 1);
                    }
                    Some(_) => {
                        gate.lost.push(id.to_string());
                        continue;
                    }
                }
                gate.allowed.insert(id.to_string());
            } else if mine {
                gate.allowed.insert(id.to_string());
            } else if node.holds(id) {
                gate.lost.push(id.to_string());
            }
        }
        Ok(gate)
    }

    fn allows(&self, user_id: &str) -> bool {
        self.allowed.contains(user_id)
    }

    /// The part of `batch` this node may write.
    fn keep<'a>(&self, batch: &Batch<'a>) -> Kept<'a> {
        Kept {
            changes: batch
                .changes
                .iter()
                .copied()
                .filter(|c| match c {
                    Change::Insert(rec) => self.allows(&rec.user_id),
                    Change::Delete(id) => self.allows(id),
                })
                .collect(),
            rows: batch
                .rows
                .iter()
                .copied()
                .filter(|r| self.allows(&r.user_id))
                .collect(),
            events: batch
                .events
                .iter()
                .copied()
                .filter(|e| self.allows(&e.user_id))
                .collect(),
            outbox: batch
                .outbox
                .iter()
                .filter(|o| self.allows(&o.user_id))
                .cloned()
                .collect(),
            messages: batch
                .messages
                .iter()
                .copied()
                .filter(|m| self.allows(&m.user_id))
                .collect(),
            forget_messages_before: batch.forget_messages_before,
            queued: batch
                .queued
                .iter()
                .filter(|q| self.allows(&q.user_id))
                .cloned()
                .collect(),
            dequeued: batch
                .dequeued
                .iter()
                .filter(|k| self.allows(user_of_key(k)))
                .cloned()
                .collect(),
        }
    }

    /// After the commit: new rows are held, deleted ones let go, lost ones reported.
    fn settle(self, batch: &Batch<'_>, node: &Standing) {
        for (id, fence) in &self.inserted {
            node.hold(id, *fence);
        }
        for change in &batch.changes {
            if let Change::Delete(id) = change {
                if self.allows(id) {
                    node.let_go(id);
                }
            }
        }
        if !self.lost.is_empty() {
            tracing::warn!(sessions = ?self.lost,
                "sessions now owned by another node (or with a newer fence): their writes \
                 were refused and they stop here");
        }
        node.lose(self.lost);
    }
}

/// The part of a batch a gate let through, owned where the batch lends slices.
struct Kept<'a> {
    changes: Vec<Change<'a>>,
    rows: Vec<&'a SessionRecord>,
    events: Vec<&'a super::EventRow>,
    outbox: Vec<super::OutboxRow>,
    messages: Vec<&'a MessageRow>,
    forget_messages_before: Option<u64>,
    queued: Vec<QueuedRow>,
    dequeued: Vec<String>,
}

impl<'a> Kept<'a> {
    fn batch(&self) -> Batch<'_> {
        Batch {
            changes: self.changes.clone(),
            rows: self.rows.clone(),
            events: self.events.clone(),
            outbox: &self.outbox,
            messages: self.messages.clone(),
            forget_messages_before: self.forget_messages_before,
            queued: &self.queued,
            dequeued: &self.dequeued,
        }
    }
}

/// Writes a batch in `tx` (see [`Batch`]); `owner`: the node whose rows new ones are.
async fn write_batch(
    tx: &deadpool_postgres::Transaction<'_>,
    batch: &Batch<'_>,
    owner: Option<&Owned>,
) -> Result<(), tokio_postgres::Error> {
    for change in &batch.changes {
        match change {
            Change::Insert(rec) => insert_session(tx, rec, owner).await?,
            Change::Delete(id) => {
                for table in [
                    "bv_sessions",
                    "bv_events",
                    "bv_session_webhooks",
                    "bv_session_webhook_options",
                    "bv_sim_credentials",
                ] {
                    let stmt = tx
                        .prepare_cached(&format!("DELETE FROM {table} WHERE user_id = $1"))
                        .await?;
                    tx.execute(&stmt, &[id]).await?;
                }
                let (from, to) = super::message_keys_of(id);
                for table in [
                    "bv_messages",
                    "bv_message_media",
                    "bv_message_polls",
                    "bv_queued",
                ] {
                    let stmt = tx
                        .prepare_cached(&format!(
                            "DELETE FROM {table} WHERE key >= $1 AND key < $2"
                        ))
                        .await?;
                    tx.execute(&stmt, &[&from, &to]).await?;
                }
            }
        }
    }
    if !batch.rows.is_empty() {
        update_sessions(tx, &batch.rows).await?;
    }
    if !batch.events.is_empty() {
        // One multi-row statement for the events, one for the pruning.
        let users: Vec<&str> = batch.events.iter().map(|e| e.user_id.as_str()).collect();
        let ats: Vec<i64> = batch.events.iter().map(|e| to_i64(e.event.at_ms)).collect();
        let states: Vec<&str> = batch
            .events
            .iter()
            .map(|e| e.event.state.as_str())
            .collect();
        let details: Vec<Option<&str>> = batch
            .events
            .iter()
            .map(|e| e.event.detail.as_deref())
            .collect();
        let stmt = tx
            .prepare_cached(
                "INSERT INTO bv_events (user_id, at, state, detail) \
                 SELECT u, a, s, d FROM UNNEST($1::text[], $2::bigint[], $3::text[], $4::text[]) \
                 WITH ORDINALITY AS t(u, a, s, d, n) ORDER BY n",
            )
            .await?;
        tx.execute(&stmt, &[&users, &ats, &states, &details])
            .await?;
        let mut logged: Vec<&str> = users;
        logged.sort_unstable();
        logged.dedup();
        let prune = tx
            .prepare_cached(
                "DELETE FROM bv_events e USING UNNEST($1::text[]) AS u(user_id) \
                 WHERE e.user_id = u.user_id AND e.id <= \
                 (SELECT id FROM bv_events WHERE user_id = u.user_id \
                  ORDER BY id DESC LIMIT 1 OFFSET $2)",
            )
            .await?;
        tx.execute(&prune, &[&logged, &EVENTS_KEPT]).await?;
    }
    if !batch.outbox.is_empty() {
        let o = batch.outbox;
        let ids: Vec<&str> = o.iter().map(|r| r.event_id.as_str()).collect();
        let dests: Vec<&str> = o.iter().map(|r| r.destination.as_str()).collect();
        let users: Vec<&str> = o.iter().map(|r| r.user_id.as_str()).collect();
        let kinds: Vec<&str> = o.iter().map(|r| r.kind).collect();
        let bodies: Vec<&str> = o.iter().map(|r| r.body.as_str()).collect();
        let ats: Vec<i64> = o.iter().map(|r| to_i64(r.at_ms)).collect();
        let stmt = tx
            .prepare_cached(
                "INSERT INTO bv_outbox (event_id, destination, user_id, kind, body, created_at, next_at) \
                 SELECT e, d, u, k, b, a, a FROM UNNEST($1::text[], $2::text[], $3::text[], \
                 $4::text[], $5::text[], $6::bigint[]) WITH ORDINALITY AS t(e, d, u, k, b, a, n) \
                 ORDER BY n",
            )
            .await?;
        tx.execute(&stmt, &[&ids, &dests, &users, &kinds, &bodies, &ats])
            .await?;
    }
    if !batch.messages.is_empty() {
        remember_messages(tx, &batch.messages).await?;
    }
    if let Some(before) = batch.forget_messages_before {
        let stmt = tx
            .prepare_cached("DELETE FROM bv_messages WHERE at < $1")
            .await?;
        tx.execute(&stmt, &[&to_i64(before)]).await?;
        for table in ["bv_message_media", "bv_message_polls"] {
            let stmt = tx
                .prepare_cached(&format!("DELETE FROM {table} WHERE at < $1"))
                .await?;
            tx.execute(&stmt, &[&to_i64(before)]).await?;
        }
    }
    for q in batch.queued {
        let stmt = tx
            .prepare_cached(
                "INSERT INTO bv_queued (key, message_id, body, at) VALUES ($1, $2, $3, $4)",
            )
            .await?;
        tx.execute(&stmt, &[&q.key(), &q.message_id, &q.body, &to_i64(q.at_ms)])
            .await?;
    }
    if !batch.dequeued.is_empty() {
        let stmt = tx
            .prepare_cached("DELETE FROM bv_queued WHERE key = ANY($1)")
            .await?;
        tx.execute(&stmt, &[&batch.dequeued]).await?;
    }
    Ok(())
}

/// One multi-row statement; a message id already known keeps its first row.
async fn remember_messages(
    tx: &deadpool_postgres::Transaction<'_>,
    messages: &[&MessageRow],
) -> Result<(), tokio_postgres::Error> {
    let keys: Vec<String> = messages.iter().map(|m| m.key()).collect();
    let chats: Vec<&str> = messages.iter().map(|m| m.chat.as_str()).collect();
    let authors: Vec<Option<&str>> = messages.iter().map(|m| m.author.as_deref()).collect();
    let mine: Vec<bool> = messages.iter().map(|m| m.from_me).collect();
    let ats: Vec<i64> = messages.iter().map(|m| to_i64(m.at_ms)).collect();
    let stmt = tx
        .prepare_cached(
            "INSERT INTO bv_messages (key, chat, author, from_me, at) \
             SELECT k, c, a, f, t FROM UNNEST($1::text[], $2::text[], $3::text[], \
             $4::bool[], $5::bigint[]) WITH ORDINALITY AS x(k, c, a, f, t, n) \
             ORDER BY n ON CONFLICT (key) DO NOTHING",
        )
        .await?;
    tx.execute(&stmt, &[&keys, &chats, &authors, &mine, &ats])
        .await?;
    let media: Vec<&MessageRow> = messages
        .iter()
        .copied()
        .filter(|m| m.media.is_some())
        .collect();
    if !media.is_empty() {
        let stmt = tx
            .prepare_cached(
                "INSERT INTO bv_message_media (key, locator, size, mimetype, at) \
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::text[], \
                 $5::bigint[]) \
                 ON CONFLICT (key) DO NOTHING",
            )
            .await?;
        let keys: Vec<String> = media.iter().map(|m| m.key()).collect();
        let locators: Vec<Option<&str>> = media.iter().map(|m| m.media.as_deref()).collect();
        let sizes: Vec<Option<i64>> = media.iter().map(|m| m.media_size.map(to_i64)).collect();
        let types: Vec<Option<&str>> = media.iter().map(|m| m.media_type.as_deref()).collect();
        let ats: Vec<i64> = media.iter().map(|m| to_i64(m.at_ms)).collect();
        tx.execute(&stmt, &[&keys, &locators, &sizes, &types, &ats])
            .await?;
    }
    // A poll sent (one at a time: a batch rarely holds more than one).
    for m in messages.iter().filter(|m| m.poll_options.is_some()) {
        let stmt = tx
            .prepare_cached(
                "INSERT INTO bv_message_polls (key, options, at) VALUES ($1, $2, $3) \
                 ON CONFLICT (key) DO NOTHING",
            )
            .await?;
        tx.execute(&stmt, &[&m.key(), &m.poll_options, &to_i64(m.at_ms)])
            .await?;
    }
    Ok(())
}

async fn write_outcomes(
    mut conn: deadpool_postgres::Object,
    outcomes: &[Outcome<'_>],
) -> Result<(), tokio_postgres::Error> {
    let tx = conn.transaction().await?;
    for o in outcomes {
        match *o {
            Outcome::Delivered { id } => {
                let stmt = tx
                    .prepare_cached("DELETE FROM bv_outbox WHERE id = $1")
                    .await?;
                tx.execute(&stmt, &[&id]).await?;
            }
            Outcome::Dead {
                id,
                attempts,
                error,
            } => {
                let stmt = tx
                    .prepare_cached(
                        "UPDATE bv_outbox SET attempts = $2, dead = true, last_error = $3 WHERE id = $1",
                    )
                    .await?;
                tx.execute(&stmt, &[&id, &(attempts as i32), &error])
                    .await?;
            }
            Outcome::Retry {
                id,
                attempts,
                next_at,
                error,
            } => {
                let stmt = tx
                    .prepare_cached(
                        "UPDATE bv_outbox SET attempts = $2, next_at = $3, last_error = $4 WHERE id = $1",
                    )
                    .await?;
                tx.execute(&stmt, &[&id, &(attempts as i32), &to_i64(next_at), &error])
                    .await?;
            }
        }
    }
    tx.commit().await
}

impl PgEngine {
    /// The queued sends (with keys in `range`, when given), in order.
    fn queued_in(
        &mut self,
        range: Option<(String, String)>,
    ) -> Result<Vec<QueuedRow>, StorageError> {
        self.run(|c| async move {
            let rows = match &range {
                None => {
                    c.query(
                        "SELECT key, message_id, body, at FROM bv_queued ORDER BY key",
                        &[],
                    )
                    .await?
                }
                Some((from, to)) => {
                    c.query(
                        "SELECT key, message_id, body, at FROM bv_queued \
                         WHERE key >= $1 AND key < $2 ORDER BY key",
                        &[from, to],
                    )
                    .await?
                }
            };
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                let key: String = r.try_get(0)?;
                let at: i64 = r.try_get(3)?;
                if let Some(q) = QueuedRow::from_key(&key, r.try_get(1)?, r.try_get(2)?, at as u64)
                {
                    out.push(q);
                }
            }
            Ok(out)
        })
    }
}

impl Engine for PgEngine {
    fn load_sessions(&mut self) -> Result<Vec<SessionRecord>, StorageError> {
        self.run(|c| async move {
            let rows = c
                .query(
                    &format!("SELECT {SESSION_COLUMNS} FROM bv_sessions ORDER BY created_at"),
                    &[],
                )
                .await?;
            Ok(rows.iter().map(session_of).collect::<Result<_, _>>()?)
        })
    }

    fn events(&mut self, user_id: &str, limit: usize) -> Result<Vec<Event>, StorageError> {
        self.run(|c| async move {
            let stmt = c
                .prepare_cached(
                    "SELECT at, state, detail FROM bv_events WHERE user_id = $1 \
                     ORDER BY id DESC LIMIT $2",
                )
                .await?;
            let rows = c
                .query(&stmt, &[&user_id, &(limit.min(i64::MAX as usize) as i64)])
                .await?;
            let events = rows
                .iter()
                .map(|r| {
                    Ok(Event {
                        at_ms: to_u64(r.try_get(0)?),
                        state: r.try_get(1)?,
                        detail: r.try_get(2)?,
                    })
                })
                .collect::<Result<_, tokio_postgres::Error>>()?;
            Ok(events)
        })
    }

    fn message(
        &mut self,
        user_id: &str,
        message_id: &str,
    ) -> Result<Option<MessageRow>, StorageError> {
        self.run(|c| async move {
            let stmt = c
                .prepare_cached(
                    "SELECT m.chat, m.author, m.from_me, m.at, d.locator, d.size, \
                     d.mimetype, p.options FROM bv_messages m \
                     LEFT JOIN bv_message_media d ON d.key = m.key \
                     LEFT JOIN bv_message_polls p ON p.key = m.key WHERE m.key = $1",
                )
                .await?;
            let key = super::message_key(user_id, message_id);
            let Some(r) = c.query_opt(&stmt, &[&key]).await? else {
                return Ok(None);
            };
            Ok(Some(MessageRow {
                user_id: user_id.to_string(),
                message_id: message_id.to_string(),
                chat: r.try_get(0)?,
                author: r.try_get(1)?,
                from_me: r.try_get(2)?,
                at_ms: to_u64(r.try_get(3)?),
                media: r.try_get(4)?,
                media_size: r.try_get::<_, Option<i64>>(5)?.map(to_u64),
                media_type: r.try_get(6)?,
                poll_options: r.try_get(7)?,
            }))
        })
    }

    fn queued(&mut self) -> Result<Vec<QueuedRow>, StorageError> {
        self.queued_in(None)
    }

    fn queued_of(&mut self, user_id: &str) -> Result<Vec<QueuedRow>, StorageError> {
        self.queued_in(Some(super::message_keys_of(user_id)))
    }

    fn setting(&mut self, key: &str) -> Result<Option<String>, StorageError> {
        self.run(|c| async move {
            let row = c
                .query_opt("SELECT value FROM bv_settings WHERE key = $1", &[&key])
                .await?;
            Ok(row.map(|r| r.try_get(0)).transpose()?)
        })
    }

    fn set_setting(&mut self, key: &str, value: &str) -> Result<(), StorageError> {
        self.run(|c| async move {
            c.execute(
                "INSERT INTO bv_settings (key, value) VALUES ($1, $2) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                &[&key, &value],
            )
            .await?;
            Ok(())
        })
    }

    fn update_setting(
        &mut self,
        key: &str,
        change: &mut dyn FnMut(Option<&str>) -> Option<String>,
    ) -> Result<bool, StorageError> {
        self.run(|mut c| async move {
            let tx = c.transaction().await?;
            // One writer of this setting at a time, row or no row yet.
            tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&key])
                .await?;
            let current: Option<String> = tx
                .query_opt("SELECT value FROM bv_settings WHERE key = $1", &[&key])
                .await?
                .map(|r| r.try_get(0))
                .transpose()?;
            let Some(value) = change(current.as_deref()) else {
                return Ok(false);
            };
            tx.execute(
                "INSERT INTO bv_settings (key, value) VALUES ($1, $2) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                &[&key, &value],
            )
            .await?;
            tx.execute("SELECT pg_notify($1, $2)", &[&super::CONFIG_CHANNEL, &key])
                .await?;
            tx.commit().await?;
            Ok(true)
        })
    }

    fn commit(&mut self, batch: &Batch<'_>) -> Result<(), StorageError> {
        let node = self.rows.inner.node.clone();
        self.run(|c| async move { Ok(commit(c, batch, node.as_deref()).await?) })
    }

    fn session_webhooks(&mut self) -> Result<Vec<SessionReceiver>, StorageError> {
        self.run(|c| async move {
            let rows = c
                .query(
                    "SELECT w.user_id, w.url, o.events, o.secret FROM bv_session_webhooks w \
                     LEFT JOIN bv_session_webhook_options o ON o.user_id = w.user_id",
                    &[],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| {
                    Ok(SessionReceiver {
                        user_id: r.try_get(0)?,
                        url: r.try_get(1)?,
                        events: r.try_get(2)?,
                        secret: r.try_get(3)?,
                    })
                })
                .collect::<Result<_, tokio_postgres::Error>>()?)
        })
    }

    fn set_session_webhook(
        &mut self,
        user_id: &str,
        receiver: Option<&SessionReceiver>,
    ) -> Result<(), StorageError> {
        self.run(|mut c| async move {
            let tx = c.transaction().await?;
            match receiver {
                Some(r) => {
                    tx.execute(
                        "INSERT INTO bv_session_webhooks (user_id, url) VALUES ($1, $2) \
                         ON CONFLICT (user_id) DO UPDATE SET url = excluded.url",
                        &[&user_id, &r.url],
                    )
                    .await?;
                    tx.execute(
                        "INSERT INTO bv_session_webhook_options (user_id, events, secret) \
                         VALUES ($1, $2, $3) ON CONFLICT (user_id) DO UPDATE \
                         SET events = excluded.events, secret = excluded.secret",
                        &[&user_id, &r.events, &r.secret],
                    )
                    .await?;
                }
                None => {
                    for table in ["bv_session_webhooks", "bv_session_webhook_options"] {
                        tx.execute(
                            &format!("DELETE FROM {table} WHERE user_id = $1"),
                            &[&user_id],
                        )
                        .await?;
                    }
                }
            }
            tx.execute("SELECT pg_notify($1, 'webhook')", &[&super::CONFIG_CHANNEL])
                .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn outbox_heads(&mut self) -> Result<Vec<(Lane, u64)>, StorageError> {
        // A node delivers the lanes of the sessions it owns, and the first live node (by
        // id) those of sessions gone (a deletion's last events): one node per lane.
        let node = self.rows.inner.node.as_ref().map(|n| n.id.clone());
        self.run(|c| async move {
            let rows = match &node {
                None => {
                    c.query(
                        "SELECT DISTINCT ON (destination, user_id) destination, user_id, \
                         next_at FROM bv_outbox WHERE NOT dead \
                         ORDER BY destination, user_id, id",
                        &[],
                    )
                    .await?
                }
                Some(node) => {
                    c.query(
                        "SELECT DISTINCT ON (o.destination, o.user_id) o.destination, \
                         o.user_id, o.next_at FROM bv_outbox o \
                         LEFT JOIN bv_sessions s ON s.user_id = o.user_id \
                         WHERE NOT o.dead AND (s.owner = $1 OR (s.user_id IS NULL AND $1 = \
                         (SELECT min(id) FROM bv_nodes WHERE lease_until > now()))) \
                         ORDER BY o.destination, o.user_id, o.id",
                        &[node],
                    )
                    .await?
                }
            };
            Ok(rows
                .iter()
                .map(|r| Ok(((r.try_get(0)?, r.try_get(1)?), to_u64(r.try_get(2)?))))
                .collect::<Result<_, tokio_postgres::Error>>()?)
        })
    }

    fn outbox_head(&mut self, lane: &Lane) -> Result<Option<OutboxHead>, StorageError> {
        self.run(|c| async move {
            let stmt = c
                .prepare_cached(
                    "SELECT id, event_id, kind, body, attempts, next_at FROM bv_outbox \
                     WHERE NOT dead AND destination = $1 AND user_id = $2 ORDER BY id LIMIT 1",
                )
                .await?;
            let row = c.query_opt(&stmt, &[&lane.0, &lane.1]).await?;
            let head = row
                .map(|r| {
                    Ok::<_, tokio_postgres::Error>(OutboxHead {
                        id: r.try_get(0)?,
                        event_id: r.try_get(1)?,
                        kind: r.try_get(2)?,
                        body: r.try_get(3)?,
                        attempts: r.try_get::<_, i32>(4)?.max(0) as u32,
                        next_at: to_u64(r.try_get(5)?),
                    })
                })
                .transpose()?;
            Ok(head)
        })
    }

    fn outbox_outcomes(&mut self, outcomes: &[Outcome<'_>]) -> Result<(), StorageError> {
        self.run(|c| async move { Ok(write_outcomes(c, outcomes).await?) })
    }

    fn outbox_backlog(&mut self) -> Result<i64, StorageError> {
        self.run(|c| async move {
            Ok(
                c.query_one("SELECT count(*) FROM bv_outbox WHERE NOT dead", &[])
                    .await?
                    .try_get(0)?,
            )
        })
    }

    fn dead_letters(&mut self, limit: usize) -> Result<Vec<DeadLetter>, StorageError> {
        self.run(|c| async move {
            let rows = c
                .query(
                    "SELECT event_id, destination, kind, user_id, attempts, last_error, created_at \
                     FROM bv_outbox WHERE dead ORDER BY id LIMIT $1",
                    &[&(limit.min(i64::MAX as usize) as i64)],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| {
                    Ok(DeadLetter {
                        event_id: r.try_get(0)?,
                        destination: r.try_get(1)?,
                        event: r.try_get(2)?,
                        user_id: r.try_get(3)?,
                        attempts: r.try_get::<_, i32>(4)?.max(0) as u32,
                        last_error: r.try_get(5)?,
                        created_at: crate::timefmt::iso(to_u64(r.try_get(6)?)),
                    })
                })
                .collect::<Result<_, tokio_postgres::Error>>()?)
        })
    }

    fn replay(&mut self, event_id: &str, now_ms: u64) -> Result<usize, StorageError> {
        self.run(|c| async move {
            let n = c
                .execute(
                    "UPDATE bv_outbox SET dead = false, attempts = 0, next_at = $2, \
                     last_error = NULL WHERE event_id = $1 AND dead",
                    &[&event_id, &to_i64(now_ms)],
                )
                .await?;
            Ok(n as usize)
        })
    }

    fn export(
        &mut self,
        table: &Table,
        after: Option<&Value>,
        limit: usize,
    ) -> Result<Vec<Row>, StorageError> {
        let (name, key, columns) = (table.name, table.key(), table.column_list());
        let filter = if after.is_some() {
            format!("WHERE {key} > $1")
        } else {
            String::new()
        };
        let sql = format!(
            "SELECT {columns} FROM bv_{name} {filter} ORDER BY {key} LIMIT {}",
            limit.min(i64::MAX as usize)
        );
        self.run(|c| async move {
            let params: Vec<Box<dyn ToSql + Sync + Send>> =
                after.iter().map(|v| param(v, table.columns[0].1)).collect();
            let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| &**p as _).collect();
            let rows = c.query(&sql, &refs).await?;
            Ok(rows
                .iter()
                .map(|r| row_of(r, table))
                .collect::<Result<_, tokio_postgres::Error>>()?)
        })
    }

    fn import(&mut self, table: &Table, rows: &[Row]) -> Result<(), StorageError> {
        let marks = (1..=table.columns.len())
            .map(|i| format!("${i}"))
            .collect::<Vec<_>>()
            .join(", ");
        let updates = table.columns[1..]
            .iter()
            .map(|(c, _)| format!("{c} = EXCLUDED.{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        let (name, key) = (table.name, table.key());
        let overriding = if table.generated_key {
            "OVERRIDING SYSTEM VALUE"
        } else {
            ""
        };
        let sql = format!(
            "INSERT INTO bv_{name} ({}) {overriding} VALUES ({marks}) \
             ON CONFLICT ({key}) DO UPDATE SET {updates}",
            table.column_list()
        );
        self.run(|mut c| async move {
            let tx = c.transaction().await?;
            let stmt = tx.prepare(&sql).await?;
            for row in rows {
                let params: Vec<Box<dyn ToSql + Sync + Send>> = row
                    .iter()
                    .zip(table.columns)
                    .map(|(v, (_, kind))| param(v, *kind))
                    .collect();
                let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| &**p as _).collect();
                tx.execute(&stmt, &refs).await?;
            }
            if table.generated_key {
                tx.execute(
                    &format!(
                        "SELECT setval(pg_get_serial_sequence('bv_{name}', '{key}'), \
                         GREATEST((SELECT max({key}) FROM bv_{name}), 1))"
                    ),
                    &[],
                )
                .await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    fn count(&mut self, table: &Table) -> Result<i64, StorageError> {
        let sql = format!("SELECT count(*) FROM bv_{}", table.name);
        self.run(|c| async move { Ok(c.query_one(&sql, &[]).await?.try_get(0)?) })
    }
}
