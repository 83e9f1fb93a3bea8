//! The rows botvisor keeps (sessions, their state-change events, settings, the webhook
//! outbox with its dead letters, and each session's own receiver) behind one seam with
//! two engines:
//!
//! - [`sqlite`]: one file through rusqlite, the embedded default (WAL,
//!   `synchronous=FULL`: a commit is fsynced before it is confirmed).
//! - [`postgres`]: one PostgreSQL database through tokio-postgres over a bounded
//!   deadpool pool (a commit is confirmed once the server has it: its own
//!   `synchronous_commit` decides how durable that is).
//!
//! An [`Engine`] is one handle on the database. The store's writer thread owns one, the
//! store's reads share a second, the webhook dispatcher owns a third; each comes from
//! [`Location::connect`]. Every method is synchronous and may block: call it from one of
//! those threads or tokio's blocking pool, never on the async runtime. A write is durable
//! when its method returns `Ok`.
//!
//! Errors come typed by kind ([`StorageError`]: full, read-only, unavailable, failed),
//! from each engine's own codes (SQLite's result codes and errno, PostgreSQL's SQLSTATE
//! and its client's connection state), never from matching message text.
//!
//! Nothing outside this module imports `rusqlite` for these rows, nor the Postgres
//! crates. (The credential files of the sim link, the whatsapp-rust SQLite stores and
//! backups are files of the links, not rows: `link::sim`, `store::backup`.)

pub mod nodes;
pub mod postgres;
pub mod sqlite;
pub mod tables;

use botvisor_actors::{SessionRecord, StorageError};

/// The channel a PostgreSQL database notifies when a setting (API keys, proxies) or a
/// session's own receiver changes: the other nodes read them again.
pub const CONFIG_CHANNEL: &str = "bv_config";

/// Events kept per session.
pub const EVENTS_KEPT: i64 = 100;

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

/// A message a session sent or received, remembered by its id: what a reaction, an edit,
/// a revoke or a reply needs to name it on the network (its chat, author, whether the
/// session wrote it). Kept `--messages-keep` ([`MESSAGES_KEPT_MS`] by default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageRow {
    /// The session.
    pub user_id: String,
    /// The network's message id.
    pub message_id: String,
    /// The chat's JID.
    pub chat: String,
    /// Who wrote it in a group (`None` in a one-to-one chat).
    pub author: Option<String>,
    /// Whether the session itself wrote it.
    pub from_me: bool,
    /// Milliseconds since the epoch.
    pub at_ms: u64,
    /// A received media's locator (how its link fetches the bytes again).
    pub media: Option<String>,
    /// Its size as the sender declared it (bytes).
    pub media_size: Option<u64>,
    /// Its MIME type as the sender declared it.
    pub media_type: Option<String>,
    /// A poll the session sent: its options' names, a JSON array (a vote names them by
    /// their hashes).
    pub poll_options: Option<String>,
}

impl MessageRow {
    /// Its key in the table: `<user_id>/<message_id>` (a user id has no `/`, a message id
    /// only letters and digits), so one b-tree serves the lookup and a session's rows are
    /// one key range ([`message_keys_of`]).
    pub fn key(&self) -> String {
        message_key(&self.user_id, &self.message_id)
    }
}

/// The key of a session's message (see [`MessageRow::key`]).
pub fn message_key(user_id: &str, message_id: &str) -> String {
    format!("{user_id}/{message_id}")
}

/// The key range of a session's messages (and of its queued sends), `[start, end)` in
/// byte order.
pub fn message_keys_of(user_id: &str) -> (String, String) {
    // '0' is the byte after '/'.
    (format!("{user_id}/"), format!("{user_id}0"))
}

/// A send waiting in its session's durable outbound queue (`?queue=true`): sent in `seq`
/// order, paced, then removed in the transaction that writes its `message.sent` or
/// `message.failed` event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedRow {
    /// The session.
    pub user_id: String,
    /// Its place in the queue (grows; orders the session's sends).
    pub seq: u64,
    /// The id the message has on the network, given when it was queued.
    pub message_id: String,
    /// The send's JSON body, as checked when it was queued.
    pub body: String,
    /// When it was queued (milliseconds since the epoch).
    pub at_ms: u64,
}

impl QueuedRow {
    /// Its key: `<user_id>/<seq>` with the seq in 20 digits, so a session's queue is one
    /// key range ([`message_keys_of`]) in send order.
    pub fn key(&self) -> String {
        queued_key(&self.user_id, self.seq)
    }

    /// The row a key and its values make.
    pub fn from_key(key: &str, message_id: String, body: String, at_ms: u64) -> Option<QueuedRow> {
        let (user_id, seq) = key.rsplit_once('/')?;
        Some(QueuedRow {
            user_id: user_id.to_string(),
            seq: seq.parse().ok()?,
            message_id,
            body,
            at_ms,
        })
    }
}

/// The key of a queued send (see [`QueuedRow::key`]).
pub fn queued_key(user_id: &str, seq: u64) -> String {
    format!("{user_id}/{seq:020}")
}

/// A session's own webhook receiver (`PUT /api/sessions/:id/webhook`).
#[derive(Clone, PartialEq, Eq)]
pub struct SessionReceiver {
    /// The session.
    pub user_id: String,
    /// Where its events go.
    pub url: String,
    /// Which events (comma-separated names and families); `None`: every event.
    pub events: Option<String>,
    /// Its own signing secret; `None`: `--webhook-secret`'s.
    pub secret: Option<String>,
}

impl std::fmt::Debug for SessionReceiver {
    // The secret signs deliveries: never in a debug print.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionReceiver")
            .field("user_id", &self.user_id)
            .field("url", &self.url)
            .field("events", &self.events)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// How long a message is remembered by its id by default (30 days, `--messages-keep`).
pub const MESSAGES_KEPT_MS: u64 = 30 * 24 * 3600 * 1000;

/// A structural change, applied in the order it was made.
#[derive(Debug, Clone, Copy)]
pub enum Change<'a> {
    /// A new session's row (replacing any row of that id).
    Insert(&'a SessionRecord),
    /// A session's row, events and own receiver.
    Delete(&'a str),
}

/// What one commit writes, in one transaction: the structural changes in order, then the
/// latest row of every session that changed, the state-change events (each session's log
/// pruned to [`EVENTS_KEPT`]) and the webhook deliveries they caused.
#[derive(Debug, Default)]
pub struct Batch<'a> {
    pub changes: Vec<Change<'a>>,
    pub rows: Vec<&'a SessionRecord>,
    pub events: Vec<&'a EventRow>,
    pub outbox: &'a [OutboxRow],
    /// Messages to remember (a message id already known keeps its first row).
    pub messages: Vec<&'a MessageRow>,
    /// Forget messages older than this (milliseconds since the epoch).
    pub forget_messages_before: Option<u64>,
    /// Sends to add to their sessions' queues.
    pub queued: &'a [QueuedRow],
    /// Sends done (sent or failed), by key ([`queued_key`]), taken out of their queues.
    pub dequeued: &'a [String],
}

/// A webhook lane: deliveries to one receiver about one session, made in order.
pub type Lane = (String, String);

/// The oldest delivery of a lane not yet made.
#[derive(Debug, Clone)]
pub struct OutboxHead {
    pub id: i64,
    pub event_id: String,
    pub kind: String,
    pub body: String,
    pub attempts: u32,
    /// When it is due (ms since the epoch).
    pub next_at: u64,
}

/// What became of an attempted delivery.
#[derive(Debug, Clone, Copy)]
pub enum Outcome<'a> {
    /// The receiver took it: the row goes.
    Delivered { id: i64 },
    /// The last attempt failed: the row stays as a dead letter.
    Dead {
        id: i64,
        attempts: u32,
        error: &'a str,
    },
    /// It failed and is tried again at `next_at` (ms since the epoch).
    Retry {
        id: i64,
        attempts: u32,
        next_at: u64,
        error: &'a str,
    },
}

/// A dead letter, as the API lists it.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    /// The event id (`X-Botvisor-Event-Id`).
    pub event_id: String,
    /// Where it was going.
    pub destination: String,
    /// The event's kind.
    pub event: String,
    /// The session.
    pub user_id: String,
    /// Attempts made.
    pub attempts: u32,
    /// The last failure.
    pub last_error: Option<String>,
    /// When the event happened (ISO 8601).
    pub created_at: String,
}

/// One handle on the database (see the module's documentation).
pub trait Engine: Send {
    /// Every session, oldest first.
    fn load_sessions(&mut self) -> Result<Vec<SessionRecord>, StorageError>;
    /// The newest state changes of a session, newest first.
    fn events(&mut self, user_id: &str, limit: usize) -> Result<Vec<Event>, StorageError>;
    /// A message the session sent or received, by its id.
    fn message(
        &mut self,
        user_id: &str,
        message_id: &str,
    ) -> Result<Option<MessageRow>, StorageError>;
    /// Every queued send, by session then in order.
    fn queued(&mut self) -> Result<Vec<QueuedRow>, StorageError>;
    /// A session's queued sends, in order.
    fn queued_of(&mut self, user_id: &str) -> Result<Vec<QueuedRow>, StorageError>;
    /// A stored setting.
    fn setting(&mut self, key: &str) -> Result<Option<String>, StorageError>;
    /// Stores a setting.
    fn set_setting(&mut self, key: &str, value: &str) -> Result<(), StorageError>;
    /// Replaces a setting with what `change` makes of its current value, with no other
    /// writer of the setting between the read and the write (several nodes share one
    /// database); `change` answering `None` leaves it as it is. Whether it was written.
    fn update_setting(
        &mut self,
        key: &str,
        change: &mut dyn FnMut(Option<&str>) -> Option<String>,
    ) -> Result<bool, StorageError>;
    /// Writes a batch in one transaction.
    fn commit(&mut self, batch: &Batch<'_>) -> Result<(), StorageError>;
    /// Every session's own webhook receiver.
    fn session_webhooks(&mut self) -> Result<Vec<SessionReceiver>, StorageError>;
    /// Sets or clears a session's own webhook receiver.
    fn set_session_webhook(
        &mut self,
        user_id: &str,
        receiver: Option<&SessionReceiver>,
    ) -> Result<(), StorageError>;
    /// Every lane's head and when it is due.
    fn outbox_heads(&mut self) -> Result<Vec<(Lane, u64)>, StorageError>;
    /// One lane's head.
    fn outbox_head(&mut self, lane: &Lane) -> Result<Option<OutboxHead>, StorageError>;
    /// Writes the outcomes of attempts, in one transaction.
    fn outbox_outcomes(&mut self, outcomes: &[Outcome<'_>]) -> Result<(), StorageError>;
    /// Deliveries not made yet (dead letters not counted).
    fn outbox_backlog(&mut self) -> Result<i64, StorageError>;
    /// The dead letters, oldest first (at most `limit`).
    fn dead_letters(&mut self, limit: usize) -> Result<Vec<DeadLetter>, StorageError>;
    /// Puts the dead letters of `event_id` back in line, due at `now_ms`; how many.
    fn replay(&mut self, event_id: &str, now_ms: u64) -> Result<usize, StorageError>;
    /// Up to `limit` rows of `table` in key order, after the key `after` (from the first
    /// when `None`): for copying the whole database.
    fn export(
        &mut self,
        table: &tables::Table,
        after: Option<&tables::Value>,
        limit: usize,
    ) -> Result<Vec<tables::Row>, StorageError>;
    /// Writes `rows` into `table` in one transaction, replacing rows of the same key (a
    /// copy run again gives the same rows); a generated key's counter moves past them.
    fn import(&mut self, table: &tables::Table, rows: &[tables::Row]) -> Result<(), StorageError>;
    /// How many rows `table` has.
    fn count(&mut self, table: &tables::Table) -> Result<i64, StorageError>;
}

/// Where the rows are, opened and migrated: hands out [`Engine`]s. Cheap to clone.
#[derive(Clone)]
pub enum Location {
    /// An SQLite file (or shared in-memory database).
    Sqlite(sqlite::Location),
    /// A PostgreSQL database.
    Postgres(postgres::Rows),
}

impl Location {
    /// A new handle on the database.
    pub fn connect(&self) -> Result<Box<dyn Engine>, StorageError> {
        match self {
            Location::Sqlite(l) => Ok(Box::new(l.connect()?)),
            Location::Postgres(rows) => Ok(Box::new(rows.engine())),
        }
    }

    /// Which engine, for logs and `/api/health`: `sqlite` or `postgres`.
    pub fn engine_name(&self) -> &'static str {
        match self {
            Location::Sqlite(_) => "sqlite",
            Location::Postgres(_) => "postgres",
        }
    }
}
