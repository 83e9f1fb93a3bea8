//! The WhatsApp keys of many sessions in one PostgreSQL database.
//!
//! [`PgKeys`] owns a bounded connection pool and the schema; [`PgKeys::session`] gives one
//! session's [`PgSessionKeys`], which implements whatsapp-rust's storage `Backend` (the
//! five store traits of wacore 0.7: Signal, AppSync, Protocol, Device, MsgSecret). Every
//! table has a `session_id` column first in its primary key and every statement is scoped
//! by it, so sessions never see (or delete, or expire) each other's rows: the model of
//! whatsmeow's `sqlstore`, with the session id where whatsmeow has the JID.
//!
//! Durability: every write is one autocommit statement (or, for migrations and
//! [`PgKeys::purge_session`], one explicit transaction), and its future resolves only
//! after the server's `ReadyForQuery`, i.e. after the commit. The pending-inbound buffer's
//! rows share their statement with other sessions' (`keys::inbound`, group commit); the
//! same holds for them. Nothing is buffered here:
//! the library saves a Signal counter before it sends the ciphertext that used it, and
//! must not be told a write was kept when it was not. (The server's `synchronous_commit`
//! decides whether a commit survives a crash of the server; `open` warns when it is off.)
//!
//! Batches are single multi-row statements (`INSERT ... SELECT FROM UNNEST(...) ON
//! CONFLICT ... DO UPDATE`). Their rows are de-duplicated first (a key given twice in one
//! batch: the later one wins, as the trait's default loop would have it) and sorted by
//! key, so two batches over the same keys lock them in the same order and cannot
//! deadlock each other.
//!
//! Behaviour follows upstream's reference store (`InMemoryBackend`) except, deliberately
//! (each listed in `tests/keystore_contract.rs`'s `KNOWN_DIFFERENCES`):
//! - `resource_report` answers `memory_bytes: Some(0)`: the data is not in this process
//!   (the trait's documented answer for such backends);
//! - a second `create()` keeps the session's one device and answers its id, 1 (the
//!   reference counts up);
//! - re-learning a LID-PN mapping keeps its `created_at` while the phone number is the
//!   same ("when the mapping was first learned"; the reference replaces the entry).
//!
//! `get_pn_mapping` answers the mapping with the latest `updated_at` for the phone, the
//! one stored last among equals: the client writes stale sources with timestamp 0 so they
//! do not outrank a fresh mapping (the reference answers the one stored last).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::inbound::{self, InboundQueue};

use async_trait::async_trait;
use deadpool_postgres::{Pool, PoolError};

use crate::db::postgres;
pub use crate::db::postgres::PgError;
use whatsapp_rust::bytes::Bytes;
use whatsapp_rust::wacore::appstate::hash::HashState;
use whatsapp_rust::wacore::appstate::processor::AppStateMutationMAC;
use whatsapp_rust::wacore::client_profile::ClientProfile;
use whatsapp_rust::wacore::libsignal::protocol::{KeyPair, PrivateKey, PublicKey};
use whatsapp_rust::wacore::stats::StorageResourceReport;
use whatsapp_rust::wacore::store::device::{account_serde, DEVICE_PROPS};
use whatsapp_rust::wacore::store::error::{Result, StoreError};
use whatsapp_rust::wacore::store::traits::{
    merge_msg_secret_expiry, merge_msg_secret_message_ts, AppStateSyncKey, AppSyncStore,
    DeviceInfo, DeviceListRecord, DeviceStore, LidPnMappingEntry, MsgSecretEntry, MsgSecretStore,
    PendingInboundKey, PendingInboundRow, ProtocolStore, SignalStore, TcTokenEntry,
};
use whatsapp_rust::wacore::store::{CachedServerCertChain, Device};
use whatsapp_rust::wacore::time::now_secs;
use whatsapp_rust::Jid;

// ---------------------------------------------------------------------------------------
// Configuration and errors
// ---------------------------------------------------------------------------------------

/// How [`PgKeys`] talks to the server: the pool settings every botvisor pool has.
pub type PgKeysConfig = crate::db::postgres::PoolConfig;

fn into_store_error(e: PgError) -> StoreError {
    if e.is_connection() {
        StoreError::Connection(Box::new(e))
    } else {
        StoreError::Database(Box::new(e))
    }
}

fn pg(e: tokio_postgres::Error) -> StoreError {
    into_store_error(PgError::from(e))
}

fn pool_error(e: PoolError, config: &PgKeysConfig) -> StoreError {
    into_store_error(PgError::of_pool(e, config))
}

fn invalid(what: impl Into<String>) -> StoreError {
    StoreError::Validation(what.into())
}

fn to_u32(value: i64, what: &str) -> Result<u32> {
    u32::try_from(value).map_err(|_| invalid(format!("{what} {value} is out of range for u32")))
}

fn to_u64(value: i64, what: &str) -> Result<u64> {
    u64::try_from(value).map_err(|_| invalid(format!("{what} {value} is negative")))
}

fn to_i64(value: u64, what: &str) -> Result<i64> {
    i64::try_from(value).map_err(|_| invalid(format!("{what} {value} is too large to store")))
}

fn to_array<const N: usize>(bytes: Vec<u8>, what: &str) -> Result<[u8; N]> {
    let len = bytes.len();
    bytes
        .try_into()
        .map_err(|_| invalid(format!("{what} is {len} bytes, not {N}")))
}

/// Counts from `DELETE`s, which the traits give as u32.
fn count(rows: u64) -> u32 {
    u32::try_from(rows).unwrap_or(u32::MAX)
}

// ---------------------------------------------------------------------------------------
// Schema
// ---------------------------------------------------------------------------------------

/// Key for `pg_advisory_xact_lock`: migrations of this schema, one process at a time.
const MIGRATION_LOCK: i64 = 0x626f_7476_6b65_7973; // "botvkeys"

/// The numbered migrations, applied in order, each once (`wa_keys_schema_version`). Never
/// edit one that has shipped: add the next.
const MIGRATIONS: postgres::Migrations = &[(1, MIGRATION_1)];

/// Migration 1: every table. The keys are the session id first, then upstream's keys
/// (whatsapp-rust-sqlite-storage's tables, with the session id where it has a device id).
const MIGRATION_1: &str = r#"
-- Orders writes that must be told apart by when they were stored (the latest app state
-- sync key; LID-PN mappings with equal timestamps).
CREATE SEQUENCE wa_keys_store_seq;

CREATE TABLE wa_device (
    session_id TEXT PRIMARY KEY,
    pn TEXT,
    lid TEXT,
    registration_id BIGINT NOT NULL,
    noise_key BYTEA NOT NULL,
    identity_key BYTEA NOT NULL,
    signed_pre_key BYTEA NOT NULL,
    signed_pre_key_id BIGINT NOT NULL,
    signed_pre_key_signature BYTEA NOT NULL,
    adv_secret_key BYTEA NOT NULL,
    account BYTEA,
    push_name TEXT NOT NULL,
    app_version_primary BIGINT NOT NULL,
    app_version_secondary BIGINT NOT NULL,
    app_version_tertiary BIGINT NOT NULL,
    app_version_last_fetched_ms BIGINT NOT NULL,
    edge_routing_info BYTEA,
    props_hash TEXT,
    next_pre_key_id BIGINT NOT NULL,
    first_unupload_pre_key_id BIGINT NOT NULL,
    server_has_prekeys BOOLEAN NOT NULL,
    nct_salt BYTEA,
    server_cert_chain JSONB,
    login_counter INTEGER NOT NULL,
    lid_migrated BOOLEAN NOT NULL,
    last_signed_pre_key_rotation_ms BIGINT NOT NULL,
    read_receipts_disabled BOOLEAN NOT NULL
);

CREATE TABLE wa_identities (
    session_id TEXT NOT NULL,
    address TEXT NOT NULL,
    key BYTEA NOT NULL,
    PRIMARY KEY (session_id, address)
);

CREATE TABLE wa_sessions (
    session_id TEXT NOT NULL,
    address TEXT NOT NULL,
    record BYTEA NOT NULL,
    PRIMARY KEY (session_id, address)
);

CREATE TABLE wa_prekeys (
    session_id TEXT NOT NULL,
    id BIGINT NOT NULL,
    record BYTEA NOT NULL,
    uploaded BOOLEAN NOT NULL,
    PRIMARY KEY (session_id, id)
);

CREATE TABLE wa_signed_prekeys (
    session_id TEXT NOT NULL,
    id BIGINT NOT NULL,
    record BYTEA NOT NULL,
    PRIMARY KEY (session_id, id)
);

CREATE TABLE wa_sender_keys (
    session_id TEXT NOT NULL,
    address TEXT NOT NULL,
    record BYTEA NOT NULL,
    PRIMARY KEY (session_id, address)
);

CREATE TABLE wa_app_state_keys (
    session_id TEXT NOT NULL,
    key_id BYTEA NOT NULL,
    key_data BYTEA NOT NULL,
    fingerprint BYTEA NOT NULL,
    timestamp BIGINT NOT NULL,
    stored_seq BIGINT NOT NULL,
    PRIMARY KEY (session_id, key_id)
);
CREATE INDEX wa_app_state_keys_latest ON wa_app_state_keys (session_id, stored_seq);

CREATE TABLE wa_app_state_versions (
    session_id TEXT NOT NULL,
    name TEXT NOT NULL,
    version BIGINT NOT NULL,
    hash BYTEA NOT NULL,
    index_keys TEXT[] NOT NULL,
    index_values BYTEA[] NOT NULL,
    mac_mismatch_fatal BOOLEAN NOT NULL,
    PRIMARY KEY (session_id, name)
);

CREATE TABLE wa_app_state_mutation_macs (
    session_id TEXT NOT NULL,
    name TEXT NOT NULL,
    index_mac BYTEA NOT NULL,
    version BIGINT NOT NULL,
    value_mac BYTEA NOT NULL,
    PRIMARY KEY (session_id, name, index_mac)
);

CREATE TABLE wa_sender_key_devices (
    session_id TEXT NOT NULL,
    group_jid TEXT NOT NULL,
    device_jid TEXT NOT NULL,
    has_key BOOLEAN NOT NULL,
    PRIMARY KEY (session_id, group_jid, device_jid)
);
CREATE INDEX wa_sender_key_devices_device ON wa_sender_key_devices (session_id, device_jid);

CREATE TABLE wa_lid_pn_mapping (
    session_id TEXT NOT NULL,
    lid TEXT NOT NULL,
    phone_number TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    learning_source TEXT NOT NULL,
    stored_seq BIGINT NOT NULL,
    PRIMARY KEY (session_id, lid)
);
CREATE INDEX wa_lid_pn_mapping_phone ON wa_lid_pn_mapping (session_id, phone_number);

CREATE TABLE wa_base_keys (
    session_id TEXT NOT NULL,
    address TEXT NOT NULL,
    message_id TEXT NOT NULL,
    base_key BYTEA NOT NULL,
    PRIMARY KEY (session_id, address, message_id)
);

CREATE TABLE wa_device_registry (
    session_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    devices JSONB NOT NULL,
    timestamp BIGINT NOT NULL,
    phash TEXT,
    raw_id BIGINT,
    PRIMARY KEY (session_id, user_id)
);

CREATE TABLE wa_group_metadata (
    session_id TEXT NOT NULL,
    group_jid TEXT NOT NULL,
    info BYTEA NOT NULL,
    PRIMARY KEY (session_id, group_jid)
);

CREATE TABLE wa_tc_tokens (
    session_id TEXT NOT NULL,
    jid TEXT NOT NULL,
    token BYTEA NOT NULL,
    token_timestamp BIGINT NOT NULL,
    sender_timestamp BIGINT,
    PRIMARY KEY (session_id, jid)
);

CREATE TABLE wa_sent_messages (
    session_id TEXT NOT NULL,
    chat_jid TEXT NOT NULL,
    message_id TEXT NOT NULL,
    payload BYTEA NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (session_id, chat_jid, message_id)
);
CREATE INDEX wa_sent_messages_age ON wa_sent_messages (session_id, created_at);

CREATE TABLE wa_pending_inbound (
    session_id TEXT NOT NULL,
    chat TEXT NOT NULL,
    sender TEXT NOT NULL,
    id TEXT NOT NULL,
    message BYTEA NOT NULL,
    inserted_at BIGINT NOT NULL,
    PRIMARY KEY (session_id, chat, sender, id)
);
CREATE INDEX wa_pending_inbound_age ON wa_pending_inbound (session_id, inserted_at);

CREATE TABLE wa_msg_secrets (
    session_id TEXT NOT NULL,
    chat TEXT NOT NULL,
    sender TEXT NOT NULL,
    msg_id TEXT NOT NULL,
    secret BYTEA NOT NULL,
    expires_at BIGINT NOT NULL,
    message_ts BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (session_id, chat, sender, msg_id)
);
CREATE INDEX wa_msg_secrets_expiry ON wa_msg_secrets (session_id, expires_at) WHERE expires_at <> 0;
"#;

/// Every table holding a session's rows (what [`PgKeys::purge_session`] empties).
const SESSION_TABLES: &[&str] = &[
    "wa_device",
    "wa_identities",
    "wa_sessions",
    "wa_prekeys",
    "wa_signed_prekeys",
    "wa_sender_keys",
    "wa_app_state_keys",
    "wa_app_state_versions",
    "wa_app_state_mutation_macs",
    "wa_sender_key_devices",
    "wa_lid_pn_mapping",
    "wa_base_keys",
    "wa_device_registry",
    "wa_group_metadata",
    "wa_tc_tokens",
    "wa_sent_messages",
    "wa_pending_inbound",
    "wa_msg_secrets",
];

/// Deletes every row of `session_id` within `tx`; answers how many.
async fn delete_session_rows(
    tx: &tokio_postgres::Transaction<'_>,
    session_id: &str,
) -> Result<u64> {
    let mut removed = 0;
    for table in SESSION_TABLES {
        removed += tx
            .execute(
                &format!("DELETE FROM {table} WHERE session_id = $1"),
                &[&session_id],
            )
            .await
            .map_err(pg)?;
    }
    Ok(removed)
}

// ---------------------------------------------------------------------------------------
// The pool
// ---------------------------------------------------------------------------------------

/// What a restore's staging id adds to its session's id.
const STAGING_SUFFIX: &str = "\u{1}restoring";

/// The session whose keys `session_id` holds: itself, or the one a restore's staging id
/// stands for.
fn held_id(session_id: &str) -> &str {
    session_id
        .strip_suffix(STAGING_SUFFIX)
        .unwrap_or(session_id)
}

/// The node that may write a session's keys, and the fence it holds it with.
struct Owner {
    node: Arc<crate::db::nodes::Standing>,
    session: String,
    fence: i64,
}

/// Every session's WhatsApp keys in one PostgreSQL database, behind a bounded pool.
/// Cloning is cheap (the pool is shared).
#[derive(Clone)]
pub struct PgKeys {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    config: PgKeysConfig,
    /// Every session's pending-inbound writes, group-committed.
    inbound: InboundQueue,
    /// This process as one node of several: while it is not live (fenced, or past its
    /// lease's local deadline) no key is read or written, so a node that wakes from a
    /// stall does not touch the keys of sessions another node may own by now.
    node: std::sync::OnceLock<Arc<crate::db::nodes::Standing>>,
}

impl fmt::Debug for PgKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgKeys")
            .field("config", &self.inner.config)
            .field("pool", &self.inner.pool.status())
            .finish()
    }
}

impl PgKeys {
    /// Opens the pool with the default [`PgKeysConfig`] and brings the schema up to date.
    /// `url` is a libpq connection string, `postgres://user@host/db` or `host=... dbname=...`.
    pub async fn open(url: &str) -> Result<Self> {
        Self::open_with(url, PgKeysConfig::default()).await
    }

    /// Opens the pool and brings the schema up to date (numbered migrations under an
    /// advisory lock: safe when several processes start at once).
    pub async fn open_with(url: &str, config: PgKeysConfig) -> Result<Self> {
        if config.pool_size == 0 {
            return Err(StoreError::InvalidConfig(
                "the PostgreSQL key store needs a pool of at least one connection".into(),
            ));
        }
        let connect = postgres::connection_config(url, &config, "botvisor-keys")
            .map_err(StoreError::InvalidConfig)?;
        let pool = postgres::pool(connect, &config).map_err(StoreError::InvalidConfig)?;
        let keys = Self {
            inner: Arc::new(Inner {
                pool,
                config,
                inbound: InboundQueue::default(),
                node: std::sync::OnceLock::new(),
            }),
        };
        keys.migrate().await?;
        keys.warn_if_commits_are_not_durable().await;
        Ok(keys)
    }

    /// One session's keys: a whatsapp-rust storage backend over this pool.
    pub fn session(&self, session_id: &str) -> PgSessionKeys {
        PgSessionKeys {
            keys: self.clone(),
            session: Arc::from(session_id),
        }
    }

    /// Removes every row of one session, in one transaction. Returns how many.
    pub async fn purge_session(&self, session_id: &str) -> Result<u64> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await.map_err(pg)?;
        let removed = delete_session_rows(&tx, session_id).await?;
        tx.commit().await.map_err(pg)?;
        Ok(removed)
    }

    /// The id a session's restored keys are written under before
    /// [`swap_in`](Self::swap_in) (no session id the API accepts has a control character;
    /// a leftover is swept at boot like the keys of any unknown session).
    pub fn staging_id(session_id: &str) -> String {
        format!("{session_id}{STAGING_SUFFIX}")
    }

    /// Replaces `session_id`'s rows with `staging_id`'s, in one transaction.
    pub async fn swap_in(&self, staging_id: &str, session_id: &str) -> Result<()> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await.map_err(pg)?;
        delete_session_rows(&tx, session_id).await?;
        for table in SESSION_TABLES {
            tx.execute(
                &format!("UPDATE {table} SET session_id = $2 WHERE session_id = $1"),
                &[&staging_id, &session_id],
            )
            .await
            .map_err(pg)?;
        }
        tx.commit().await.map_err(pg)
    }

    /// The schema version this database is at.
    pub async fn schema_version(&self) -> Result<i32> {
        let conn = self.conn().await?;
        let row = conn
            .query_one(
                "SELECT COALESCE(MAX(version), 0) FROM wa_keys_schema_version",
                &[],
            )
            .await
            .map_err(pg)?;
        row.try_get(0).map_err(pg)
    }

    async fn migrate(&self) -> Result<()> {
        let mut conn = self.conn().await?;
        postgres::migrate(
            &mut conn,
            MIGRATION_LOCK,
            "wa_keys_schema_version",
            MIGRATIONS,
            "WhatsApp key",
        )
        .await
        .map_err(|e| StoreError::Migration(Box::new(e)))
    }

    /// A server setting as the pool's connections have it (`current_setting(name)`),
    /// e.g. `statement_timeout`.
    pub async fn setting(&self, name: &str) -> Result<String> {
        let conn = self.conn().await?;
        let row = conn
            .query_one("SELECT current_setting($1)", &[&name])
            .await
            .map_err(pg)?;
        row.try_get(0).map_err(pg)
    }

    async fn warn_if_commits_are_not_durable(&self) {
        if self.setting("synchronous_commit").await.ok().as_deref() == Some("off") {
            tracing::warn!(
                "PostgreSQL has synchronous_commit=off: a WhatsApp key write can be \
                 acknowledged and then lost if the database server crashes; set it to on \
                 for the database botvisor uses"
            );
        }
    }

    /// On a node: who may write `session_id`'s keys (this node, with the fence it holds
    /// the session with; a restore's staging id counts as its session). `None` when not a
    /// node. An error when this node does not hold the session, or is not live.
    fn owner_for(&self, session_id: &str) -> Result<Option<Owner>> {
        let Some(node) = self.inner.node.get() else {
            return Ok(None);
        };
        let session = held_id(session_id);
        match node.fence_of(session) {
            Some(fence) if node.live() => Ok(Some(Owner {
                node: node.clone(),
                session: session.to_string(),
                fence,
            })),
            _ => Err(into_store_error(PgError::client(format!(
                "node {} does not hold session {session}: its WhatsApp keys are not written here",
                node.id
            )))),
        }
    }

    /// Gates every key access on `node` (see `Inner::node`).
    pub fn set_node(&self, node: Arc<crate::db::nodes::Standing>) {
        let _ = self.inner.node.set(node);
    }

    async fn conn(&self) -> Result<deadpool_postgres::Client> {
        if let Some(node) = self.inner.node.get() {
            if !node.live() {
                return Err(into_store_error(PgError::client(format!(
                    "node {} is fenced (its lease ran out): its WhatsApp keys are not touched \
                     until it registers again",
                    node.id
                ))));
            }
        }
        self.inner
            .pool
            .get()
            .await
            .map_err(|e| pool_error(e, &self.inner.config))
    }

    /// The longest one store call may take before it is abandoned (its connection is then
    /// closed, not reused): the server's statement timeout plus a margin, so a server
    /// that stops answering (a network cut, no reset) gives an error, not a hang.
    fn deadline(&self) -> Duration {
        self.inner.config.deadline()
    }
}

/// A call that overran `deadline`: its connection is detached from the pool and dropped
/// (a statement may still be in flight on it); the error to answer.
fn abandoned(conn: deadpool_postgres::Client, deadline: Duration) -> StoreError {
    drop(deadpool_postgres::Object::take(conn));
    into_store_error(PgError::client(format!(
        "no answer from PostgreSQL within {deadline:?}; the connection was closed"
    )))
}

/// Runs `$body` (which uses `$c`, a `&deadpool_postgres::Client`, and evaluates to a
/// `Result<T>`) on a pooled connection, within [`PgKeys::deadline`]. A call that overruns
/// is abandoned with an error and its connection detached from the pool (dropped), since
/// a statement may still be in flight on it.
macro_rules! on_conn {
    ($keys:expr, |$c:ident| $body:expr) => {{
        let keys: &PgKeys = $keys;
        let conn = keys.conn().await?;
        let deadline = keys.deadline();
        let outcome = {
            let $c: &deadpool_postgres::Client = &conn;
            tokio::time::timeout(deadline, async { $body }).await
        };
        match outcome {
            Ok(result) => result,
            Err(_) => Err(abandoned(conn, deadline)),
        }
    }};
}

impl PgKeys {
    /// Every session that has a row in any table (what a sweep compares with the sessions
    /// botvisor knows).
    pub async fn session_ids(&self) -> Result<Vec<String>> {
        let union = SESSION_TABLES
            .iter()
            .map(|t| format!("SELECT session_id FROM {t}"))
            .collect::<Vec<_>>()
            .join(" UNION ");
        on_conn!(self, |c| {
            let rows = c.query(&union, &[]).await.map_err(pg)?;
            rows.iter().map(|r| r.try_get(0).map_err(pg)).collect()
        })
    }
}

// ---------------------------------------------------------------------------------------
// One session
// ---------------------------------------------------------------------------------------

/// One session's WhatsApp keys in the shared database: a whatsapp-rust storage `Backend`
/// (`Arc<dyn Backend>`). Every statement is scoped by the session id.
#[derive(Clone)]
pub struct PgSessionKeys {
    keys: PgKeys,
    session: Arc<str>,
}

impl fmt::Debug for PgSessionKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgSessionKeys")
            .field("session", &self.session)
            .finish()
    }
}

/// De-duplicates a batch by key, the later entry winning (what a loop of single writes
/// would leave), sorted by key (the order rows are locked in).
fn last_wins<K: Ord, V>(items: impl IntoIterator<Item = (K, V)>) -> Vec<(K, V)> {
    let map: BTreeMap<K, V> = items.into_iter().collect();
    map.into_iter().collect()
}

impl PgSessionKeys {
    /// The session id this store is scoped to.
    pub fn session_id(&self) -> &str {
        &self.session
    }

    /// Runs one statement that returns no rows; answers the rows it touched. On a node
    /// (several on one database) it runs in a transaction that first locks the session's
    /// row and checks this node still owns it with the fence it holds: a node that lost
    /// the session (another claimed it) writes none of its keys, not even one in flight.
    async fn exec(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<u64> {
        if let Some(owner) = self.keys.owner_for(&self.session)? {
            return self.exec_fenced(sql, params, owner).await;
        }
        on_conn!(&self.keys, |c| {
            let statement = c.prepare_cached(sql).await.map_err(pg)?;
            c.execute(&statement, params).await.map_err(pg)
        })
    }

    /// [`PgSessionKeys::exec`] gated on `owner` (see there).
    async fn exec_fenced(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        owner: Owner,
    ) -> Result<u64> {
        self.fenced(owner, sql, async |c, statement| {
            c.execute(statement, params).await.map_err(pg)
        })
        .await
    }

    /// Runs `write` (statement `sql`, prepared) in a transaction that first locks the
    /// session's row and checks that `owner` still holds it with its fence; refused (and
    /// the session reported lost) otherwise, with nothing written.
    ///
    /// One round trip: `BEGIN`, the check, the write and `COMMIT` go out together
    /// (pipelined, in that order). The check divides by the number of rows it locked, so
    /// a session not held raises an error that aborts the transaction before the write
    /// runs; the write then fails and `COMMIT` rolls back. (Sent one after the other, the
    /// four cost 2.6-3.9× a plain write on loopback; pipelined, 1.4-2.1×.)
    async fn fenced<T>(
        &self,
        owner: Owner,
        sql: &str,
        write: impl AsyncFnOnce(&deadpool_postgres::Client, &tokio_postgres::Statement) -> Result<T>,
    ) -> Result<T> {
        let keys = &self.keys;
        let conn = keys.conn().await?;
        let deadline = keys.deadline();
        let outcome = tokio::time::timeout(deadline, async {
            // Cached per connection: no round trip after the first.
            let guard = conn.prepare_cached(FENCE_CHECK).await.map_err(pg)?;
            let statement = conn.prepare_cached(sql).await.map_err(pg)?;
            let check: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
                [&owner.session, &owner.node.id, &owner.fence];
            let (begun, held, written, committed) = tokio::join!(
                biased;
                conn.batch_execute("BEGIN"),
                conn.query_one(&guard, &check),
                write(&conn, &statement),
                conn.batch_execute("COMMIT"),
            );
            begun.map_err(pg)?;
            if let Err(e) = held {
                if e.code() == Some(&tokio_postgres::error::SqlState::DIVISION_BY_ZERO) {
                    owner.node.lose(vec![owner.session.clone()]);
                    return Err(into_store_error(PgError::client(format!(
                        "session {} is no longer this node's ({}): its WhatsApp keys are not \
                         written here",
                        owner.session, owner.node.id
                    ))));
                }
                return Err(pg(e));
            }
            let out = written?;
            committed.map_err(pg)?;
            Ok(out)
        })
        .await;
        match outcome {
            Ok(result) => result,
            Err(_) => Err(abandoned(conn, deadline)),
        }
    }

    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>> {
        on_conn!(&self.keys, |c| {
            let statement = c.prepare_cached(sql).await.map_err(pg)?;
            c.query(&statement, params).await.map_err(pg)
        })
    }

    async fn query_opt(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Option<tokio_postgres::Row>> {
        on_conn!(&self.keys, |c| {
            let statement = c.prepare_cached(sql).await.map_err(pg)?;
            c.query_opt(&statement, params).await.map_err(pg)
        })
    }

    async fn query_bool(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<bool> {
        match self.query_opt(sql, params).await? {
            Some(row) => row.try_get(0).map_err(pg),
            None => Ok(false),
        }
    }

    /// The one bytea column of an optional row.
    async fn query_bytes(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Option<Vec<u8>>> {
        match self.query_opt(sql, params).await? {
            Some(row) => Ok(Some(row.try_get(0).map_err(pg)?)),
            None => Ok(None),
        }
    }

    async fn upsert_records(&self, table: &str, rows: Vec<(&str, &[u8])>) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let (addresses, records): (Vec<&str>, Vec<&[u8]>) = last_wins(rows).into_iter().unzip();
        let sql = format!(
            "INSERT INTO {table} (session_id, address, record) \
             SELECT $1, a, r FROM UNNEST($2::text[], $3::bytea[]) AS t(a, r) \
             ON CONFLICT (session_id, address) DO UPDATE SET record = EXCLUDED.record"
        );
        self.exec(&sql, &[&&*self.session, &addresses, &records])
            .await
            .map(drop)
    }
}

fn keypair_bytes(pair: &KeyPair) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(64);
    bytes.extend_from_slice(pair.private_key.serialize());
    bytes.extend_from_slice(pair.public_key.public_key_bytes());
    bytes
}

fn keypair_from(bytes: &[u8], what: &str) -> Result<KeyPair> {
    if bytes.len() != 64 {
        return Err(invalid(format!("{what} is {} bytes, not 64", bytes.len())));
    }
    let private = PrivateKey::deserialize(&bytes[..32])
        .map_err(|e| StoreError::Serialization(Box::new(e)))?;
    let public = PublicKey::from_djb_public_key_bytes(&bytes[32..])
        .map_err(|e| StoreError::Serialization(Box::new(e)))?;
    Ok(KeyPair::new(public, private))
}

fn jid_from(text: Option<String>, what: &str) -> Result<Option<Jid>> {
    text.map(|t| {
        t.parse::<Jid>()
            .map_err(|e| invalid(format!("{what} {t:?} is not a JID: {e}")))
    })
    .transpose()
}

// ---------------------------------------------------------------------------------------
// SignalStore
// ---------------------------------------------------------------------------------------

#[async_trait]
impl SignalStore for PgSessionKeys {
    async fn put_identity(&self, address: &str, key: [u8; 32]) -> Result<()> {
        self.exec(
            "INSERT INTO wa_identities (session_id, address, key) VALUES ($1, $2, $3) \
             ON CONFLICT (session_id, address) DO UPDATE SET key = EXCLUDED.key",
            &[&&*self.session, &address, &key.as_slice()],
        )
        .await
        .map(drop)
    }

    async fn put_identities_batch(&self, identities: &[(Arc<str>, [u8; 32])]) -> Result<()> {
        if identities.is_empty() {
            return Ok(());
        }
        let rows = last_wins(identities.iter().map(|(a, k)| (&**a, k.as_slice())));
        let (addresses, keys): (Vec<&str>, Vec<&[u8]>) = rows.into_iter().unzip();
        self.exec(
            "INSERT INTO wa_identities (session_id, address, key) \
             SELECT $1, a, k FROM UNNEST($2::text[], $3::bytea[]) AS t(a, k) \
             ON CONFLICT (session_id, address) DO UPDATE SET key = EXCLUDED.key",
            &[&&*self.session, &addresses, &keys],
        )
        .await
        .map(drop)
    }

    async fn load_identity(&self, address: &str) -> Result<Option<[u8; 32]>> {
        self.query_bytes(
            "SELECT key FROM wa_identities WHERE session_id = $1 AND address = $2",
            &[&&*self.session, &address],
        )
        .await?
        .map(|key| to_array(key, "a stored identity key"))
        .transpose()
    }

    async fn delete_identity(&self, address: &str) -> Result<()> {
        self.exec(
            "DELETE FROM wa_identities WHERE session_id = $1 AND address = $2",
            &[&&*self.session, &address],
        )
        .await
        .map(drop)
    }

    async fn get_session(&self, address: &str) -> Result<Option<Bytes>> {
        Ok(self
            .query_bytes(
                "SELECT record FROM wa_sessions WHERE session_id = $1 AND address = $2",
                &[&&*self.session, &address],
            )
            .await?
            .map(Bytes::from))
    }

    async fn put_session(&self, address: &str, session: &[u8]) -> Result<()> {
        self.upsert_records("wa_sessions", vec![(address, session)])
            .await
    }

    async fn put_sessions_batch(&self, sessions: &[(Arc<str>, Bytes)]) -> Result<()> {
        let rows = sessions.iter().map(|(a, r)| (&**a, &**r)).collect();
        self.upsert_records("wa_sessions", rows).await
    }

    async fn delete_session(&self, address: &str) -> Result<()> {
        self.exec(
            "DELETE FROM wa_sessions WHERE session_id = $1 AND address = $2",
            &[&&*self.session, &address],
        )
        .await
        .map(drop)
    }

    async fn has_session(&self, address: &str) -> Result<bool> {
        self.query_bool(
            "SELECT EXISTS (SELECT 1 FROM wa_sessions WHERE session_id = $1 AND address = $2)",
            &[&&*self.session, &address],
        )
        .await
    }

    async fn has_signal_state_for_user(&self, user: &str) -> Result<bool> {
        // `user@server` is the user's device 0, `user:device@server` another device; a
        // user that is a prefix of another must not match it.
        self.query_bool(
            "SELECT EXISTS (SELECT 1 FROM wa_sessions WHERE session_id = $1 \
                 AND (starts_with(address, $2::text || '@') OR starts_with(address, $2::text || ':'))) \
             OR EXISTS (SELECT 1 FROM wa_identities WHERE session_id = $1 \
                 AND (starts_with(address, $2::text || '@') OR starts_with(address, $2::text || ':')))",
            &[&&*self.session, &user],
        )
        .await
    }

    async fn store_prekey(&self, id: u32, record: &[u8], uploaded: bool) -> Result<()> {
        self.exec(
            "INSERT INTO wa_prekeys (session_id, id, record, uploaded) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (session_id, id) DO UPDATE \
             SET record = EXCLUDED.record, uploaded = EXCLUDED.uploaded",
            &[&&*self.session, &i64::from(id), &record, &uploaded],
        )
        .await
        .map(drop)
    }

    async fn store_prekeys_batch(&self, keys: &[(u32, Bytes)], uploaded: bool) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let rows = last_wins(keys.iter().map(|(id, r)| (i64::from(*id), &**r)));
        let (ids, records): (Vec<i64>, Vec<&[u8]>) = rows.into_iter().unzip();
        self.exec(
            "INSERT INTO wa_prekeys (session_id, id, record, uploaded) \
             SELECT $1, i, r, $4 FROM UNNEST($2::int8[], $3::bytea[]) AS t(i, r) \
             ON CONFLICT (session_id, id) DO UPDATE \
             SET record = EXCLUDED.record, uploaded = EXCLUDED.uploaded",
            &[&&*self.session, &ids, &records, &uploaded],
        )
        .await
        .map(drop)
    }

    async fn load_prekey(&self, id: u32) -> Result<Option<Bytes>> {
        Ok(self
            .query_bytes(
                "SELECT record FROM wa_prekeys WHERE session_id = $1 AND id = $2",
                &[&&*self.session, &i64::from(id)],
            )
            .await?
            .map(Bytes::from))
    }

    async fn load_prekeys_batch(&self, ids: &[u32]) -> Result<Vec<(u32, Bytes)>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let wanted: Vec<i64> = ids.iter().map(|id| i64::from(*id)).collect();
        let rows = self
            .query(
                "SELECT id, record FROM wa_prekeys WHERE session_id = $1 AND id = ANY($2::int8[])",
                &[&&*self.session, &wanted],
            )
            .await?;
        let mut found = HashMap::with_capacity(rows.len());
        for row in rows {
            let id: i64 = row.try_get(0).map_err(pg)?;
            let record: Vec<u8> = row.try_get(1).map_err(pg)?;
            found.insert(to_u32(id, "a stored pre-key id")?, Bytes::from(record));
        }
        // In the order asked, like the reference.
        Ok(ids
            .iter()
            .filter_map(|id| found.get(id).map(|r| (*id, r.clone())))
            .collect())
    }

    async fn mark_prekeys_uploaded(&self, ids: &[u32]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut ids: Vec<i64> = ids.iter().map(|id| i64::from(*id)).collect();
        ids.sort_unstable();
        ids.dedup();
        // An UPDATE: a key consumed meanwhile stays deleted.
        self.exec(
            "UPDATE wa_prekeys SET uploaded = TRUE WHERE session_id = $1 AND id = ANY($2::int8[])",
            &[&&*self.session, &ids],
        )
        .await
        .map(drop)
    }

    async fn remove_prekey(&self, id: u32) -> Result<()> {
        self.exec(
            "DELETE FROM wa_prekeys WHERE session_id = $1 AND id = $2",
            &[&&*self.session, &i64::from(id)],
        )
        .await
        .map(drop)
    }

    async fn get_max_prekey_id(&self) -> Result<u32> {
        let row = self
            .query_opt(
                "SELECT COALESCE(MAX(id), 0) FROM wa_prekeys WHERE session_id = $1",
                &[&&*self.session],
            )
            .await?;
        match row {
            Some(row) => to_u32(row.try_get(0).map_err(pg)?, "the largest pre-key id"),
            None => Ok(0),
        }
    }

    async fn store_signed_prekey(&self, id: u32, record: &[u8]) -> Result<()> {
        self.exec(
            "INSERT INTO wa_signed_prekeys (session_id, id, record) VALUES ($1, $2, $3) \
             ON CONFLICT (session_id, id) DO UPDATE SET record = EXCLUDED.record",
            &[&&*self.session, &i64::from(id), &record],
        )
        .await
        .map(drop)
    }

    async fn load_signed_prekey(&self, id: u32) -> Result<Option<Vec<u8>>> {
        self.query_bytes(
            "SELECT record FROM wa_signed_prekeys WHERE session_id = $1 AND id = $2",
            &[&&*self.session, &i64::from(id)],
        )
        .await
    }

    async fn load_all_signed_prekeys(&self) -> Result<Vec<(u32, Vec<u8>)>> {
        let rows = self
            .query(
                "SELECT id, record FROM wa_signed_prekeys WHERE session_id = $1 ORDER BY id",
                &[&&*self.session],
            )
            .await?;
        rows.into_iter()
            .map(|row| {
                let id: i64 = row.try_get(0).map_err(pg)?;
                Ok((
                    to_u32(id, "a stored signed pre-key id")?,
                    row.try_get(1).map_err(pg)?,
                ))
            })
            .collect()
    }

    async fn remove_signed_prekey(&self, id: u32) -> Result<()> {
        self.exec(
            "DELETE FROM wa_signed_prekeys WHERE session_id = $1 AND id = $2",
            &[&&*self.session, &i64::from(id)],
        )
        .await
        .map(drop)
    }

    async fn put_sender_key(&self, address: &str, record: &[u8]) -> Result<()> {
        self.upsert_records("wa_sender_keys", vec![(address, record)])
            .await
    }

    async fn put_sender_keys_batch(&self, sender_keys: &[(Arc<str>, Bytes)]) -> Result<()> {
        let rows = sender_keys.iter().map(|(a, r)| (&**a, &**r)).collect();
        self.upsert_records("wa_sender_keys", rows).await
    }

    async fn get_sender_key(&self, address: &str) -> Result<Option<Vec<u8>>> {
        self.query_bytes(
            "SELECT record FROM wa_sender_keys WHERE session_id = $1 AND address = $2",
            &[&&*self.session, &address],
        )
        .await
    }

    async fn delete_sender_key(&self, address: &str) -> Result<()> {
        self.exec(
            "DELETE FROM wa_sender_keys WHERE session_id = $1 AND address = $2",
            &[&&*self.session, &address],
        )
        .await
        .map(drop)
    }
}

// ---------------------------------------------------------------------------------------
// AppSyncStore
// ---------------------------------------------------------------------------------------

#[async_trait]
impl AppSyncStore for PgSessionKeys {
    async fn get_sync_key(&self, key_id: &[u8]) -> Result<Option<AppStateSyncKey>> {
        let row = self
            .query_opt(
                "SELECT key_data, fingerprint, timestamp FROM wa_app_state_keys \
                 WHERE session_id = $1 AND key_id = $2",
                &[&&*self.session, &key_id],
            )
            .await?;
        row.map(|row| {
            Ok(AppStateSyncKey {
                key_data: row.try_get(0).map_err(pg)?,
                fingerprint: row.try_get(1).map_err(pg)?,
                timestamp: row.try_get(2).map_err(pg)?,
            })
        })
        .transpose()
    }

    async fn set_sync_key(&self, key_id: &[u8], key: AppStateSyncKey) -> Result<()> {
        // Storing a key (again) makes it the latest, as in the reference.
        self.exec(
            "INSERT INTO wa_app_state_keys \
                 (session_id, key_id, key_data, fingerprint, timestamp, stored_seq) \
             VALUES ($1, $2, $3, $4, $5, nextval('wa_keys_store_seq')) \
             ON CONFLICT (session_id, key_id) DO UPDATE SET key_data = EXCLUDED.key_data, \
                 fingerprint = EXCLUDED.fingerprint, timestamp = EXCLUDED.timestamp, \
                 stored_seq = EXCLUDED.stored_seq",
            &[
                &&*self.session,
                &key_id,
                &key.key_data,
                &key.fingerprint,
                &key.timestamp,
            ],
        )
        .await
        .map(drop)
    }

    async fn get_version(&self, name: &str) -> Result<HashState> {
        let row = self
            .query_opt(
                "SELECT version, hash, index_keys, index_values, mac_mismatch_fatal \
                 FROM wa_app_state_versions WHERE session_id = $1 AND name = $2",
                &[&&*self.session, &name],
            )
            .await?;
        let Some(row) = row else {
            return Ok(HashState::default());
        };
        let version: i64 = row.try_get(0).map_err(pg)?;
        let hash: Vec<u8> = row.try_get(1).map_err(pg)?;
        let keys: Vec<String> = row.try_get(2).map_err(pg)?;
        let values: Vec<Vec<u8>> = row.try_get(3).map_err(pg)?;
        if keys.len() != values.len() {
            return Err(invalid(format!(
                "app state version {name:?}: {} index keys but {} values",
                keys.len(),
                values.len()
            )));
        }
        Ok(HashState {
            version: to_u64(version, "an app state version")?,
            hash: to_array(hash, "an app state hash")?,
            index_value_map: keys.into_iter().zip(values).collect(),
            mac_mismatch_fatal: row.try_get(4).map_err(pg)?,
        })
    }

    async fn set_version(&self, name: &str, state: HashState) -> Result<()> {
        let version = to_i64(state.version, "an app state version")?;
        let index: BTreeMap<&str, &[u8]> = state
            .index_value_map
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_slice()))
            .collect();
        let (keys, values): (Vec<&str>, Vec<&[u8]>) = index.into_iter().unzip();
        self.exec(
            "INSERT INTO wa_app_state_versions \
                 (session_id, name, version, hash, index_keys, index_values, mac_mismatch_fatal) \
             VALUES ($1, $2, $3, $4, $5::text[], $6::bytea[], $7) \
             ON CONFLICT (session_id, name) DO UPDATE SET version = EXCLUDED.version, \
                 hash = EXCLUDED.hash, index_keys = EXCLUDED.index_keys, \
                 index_values = EXCLUDED.index_values, \
                 mac_mismatch_fatal = EXCLUDED.mac_mismatch_fatal",
            &[
                &&*self.session,
                &name,
                &version,
                &state.hash.as_slice(),
                &keys,
                &values,
                &state.mac_mismatch_fatal,
            ],
        )
        .await
        .map(drop)
    }

    async fn put_mutation_macs(
        &self,
        name: &str,
        version: u64,
        mutations: &[AppStateMutationMAC],
    ) -> Result<()> {
        if mutations.is_empty() {
            return Ok(());
        }
        let version = to_i64(version, "an app state version")?;
        let rows = last_wins(
            mutations
                .iter()
                .map(|m| (m.index_mac.as_slice(), m.value_mac.as_slice())),
        );
        let (index_macs, value_macs): (Vec<&[u8]>, Vec<&[u8]>) = rows.into_iter().unzip();
        self.exec(
            "INSERT INTO wa_app_state_mutation_macs \
                 (session_id, name, index_mac, version, value_mac) \
             SELECT $1, $2, i, $3, v FROM UNNEST($4::bytea[], $5::bytea[]) AS t(i, v) \
             ON CONFLICT (session_id, name, index_mac) DO UPDATE \
             SET version = EXCLUDED.version, value_mac = EXCLUDED.value_mac",
            &[&&*self.session, &name, &version, &index_macs, &value_macs],
        )
        .await
        .map(drop)
    }

    async fn get_mutation_mac(&self, name: &str, index_mac: &[u8]) -> Result<Option<Vec<u8>>> {
        self.query_bytes(
            "SELECT value_mac FROM wa_app_state_mutation_macs \
             WHERE session_id = $1 AND name = $2 AND index_mac = $3",
            &[&&*self.session, &name, &index_mac],
        )
        .await
    }

    async fn get_mutation_macs(
        &self,
        name: &str,
        index_macs: &[[u8; 32]],
    ) -> Result<HashMap<[u8; 32], Vec<u8>>> {
        if index_macs.is_empty() {
            return Ok(HashMap::new());
        }
        let wanted: Vec<&[u8]> = index_macs.iter().map(|m| m.as_slice()).collect();
        let rows = self
            .query(
                "SELECT index_mac, value_mac FROM wa_app_state_mutation_macs \
                 WHERE session_id = $1 AND name = $2 AND index_mac = ANY($3::bytea[])",
                &[&&*self.session, &name, &wanted],
            )
            .await?;
        let mut found = HashMap::with_capacity(rows.len());
        for row in rows {
            let index: Vec<u8> = row.try_get(0).map_err(pg)?;
            found.insert(
                to_array(index, "a stored index MAC")?,
                row.try_get(1).map_err(pg)?,
            );
        }
        Ok(found)
    }

    async fn delete_mutation_macs(&self, name: &str, index_macs: &[Vec<u8>]) -> Result<()> {
        if index_macs.is_empty() {
            return Ok(());
        }
        let wanted: Vec<&[u8]> = index_macs.iter().map(Vec::as_slice).collect();
        self.exec(
            "DELETE FROM wa_app_state_mutation_macs \
             WHERE session_id = $1 AND name = $2 AND index_mac = ANY($3::bytea[])",
            &[&&*self.session, &name, &wanted],
        )
        .await
        .map(drop)
    }

    async fn clear_mutation_macs(&self, name: &str) -> Result<()> {
        self.exec(
            "DELETE FROM wa_app_state_mutation_macs WHERE session_id = $1 AND name = $2",
            &[&&*self.session, &name],
        )
        .await
        .map(drop)
    }

    async fn get_latest_sync_key_id(&self) -> Result<Option<Vec<u8>>> {
        // The key stored last (the trait: "the most recently stored"), not the highest id.
        self.query_bytes(
            "SELECT key_id FROM wa_app_state_keys WHERE session_id = $1 \
             ORDER BY stored_seq DESC LIMIT 1",
            &[&&*self.session],
        )
        .await
    }
}

// ---------------------------------------------------------------------------------------
// ProtocolStore
// ---------------------------------------------------------------------------------------

const LID_COLUMNS: &str = "lid, phone_number, created_at, updated_at, learning_source";

/// A LID-PN batch takes one value of `wa_keys_store_seq` and stores row `i` of it as
/// `value * LID_BATCH_SPAN + i`: later statements sort after earlier ones, and within one
/// the later position wins. Larger batches go in chunks of this size.
const LID_BATCH_SPAN: i64 = 1 << 20;

fn lid_entry(row: &tokio_postgres::Row) -> Result<LidPnMappingEntry> {
    Ok(LidPnMappingEntry {
        lid: row.try_get(0).map_err(pg)?,
        phone_number: row.try_get(1).map_err(pg)?,
        created_at: row.try_get(2).map_err(pg)?,
        updated_at: row.try_get(3).map_err(pg)?,
        learning_source: row.try_get(4).map_err(pg)?,
    })
}

#[async_trait]
impl ProtocolStore for PgSessionKeys {
    async fn get_sender_key_devices(&self, group_jid: &str) -> Result<Vec<(String, bool)>> {
        let rows = self
            .query(
                "SELECT device_jid, has_key FROM wa_sender_key_devices \
                 WHERE session_id = $1 AND group_jid = $2 ORDER BY device_jid",
                &[&&*self.session, &group_jid],
            )
            .await?;
        rows.iter()
            .map(|row| Ok((row.try_get(0).map_err(pg)?, row.try_get(1).map_err(pg)?)))
            .collect()
    }

    async fn set_sender_key_status(&self, group_jid: &str, entries: &[(&str, bool)]) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let rows = last_wins(entries.iter().copied());
        let (devices, has_key): (Vec<&str>, Vec<bool>) = rows.into_iter().unzip();
        self.exec(
            "INSERT INTO wa_sender_key_devices (session_id, group_jid, device_jid, has_key) \
             SELECT $1, $2, d, k FROM UNNEST($3::text[], $4::bool[]) AS t(d, k) \
             ON CONFLICT (session_id, group_jid, device_jid) DO UPDATE SET has_key = EXCLUDED.has_key",
            &[&&*self.session, &group_jid, &devices, &has_key],
        )
        .await
        .map(drop)
    }

    async fn clear_sender_key_devices(&self, group_jid: &str) -> Result<()> {
        self.exec(
            "DELETE FROM wa_sender_key_devices WHERE session_id = $1 AND group_jid = $2",
            &[&&*self.session, &group_jid],
        )
        .await
        .map(drop)
    }

    async fn delete_sender_key_device_rows(&self, device_jids: &[&str]) -> Result<()> {
        if device_jids.is_empty() {
            return Ok(());
        }
        self.exec(
            "DELETE FROM wa_sender_key_devices WHERE session_id = $1 AND device_jid = ANY($2::text[])",
            &[&&*self.session, &device_jids],
        )
        .await
        .map(drop)
    }

    async fn clear_all_sender_key_devices(&self) -> Result<()> {
        self.exec(
            "DELETE FROM wa_sender_key_devices WHERE session_id = $1",
            &[&&*self.session],
        )
        .await
        .map(drop)
    }

    async fn get_lid_mapping(&self, lid: &str) -> Result<Option<LidPnMappingEntry>> {
        let sql = format!(
            "SELECT {LID_COLUMNS} FROM wa_lid_pn_mapping WHERE session_id = $1 AND lid = $2"
        );
        self.query_opt(&sql, &[&&*self.session, &lid])
            .await?
            .as_ref()
            .map(lid_entry)
            .transpose()
    }

    async fn get_pn_mapping(&self, phone: &str) -> Result<Option<LidPnMappingEntry>> {
        let sql = format!(
            "SELECT {LID_COLUMNS} FROM wa_lid_pn_mapping WHERE session_id = $1 AND phone_number = $2 \
             ORDER BY updated_at DESC, stored_seq DESC LIMIT 1"
        );
        self.query_opt(&sql, &[&&*self.session, &phone])
            .await?
            .as_ref()
            .map(lid_entry)
            .transpose()
    }

    async fn put_lid_mapping(&self, entry: &LidPnMappingEntry) -> Result<()> {
        self.put_lid_mappings(std::slice::from_ref(entry)).await
    }

    async fn put_lid_mappings(&self, entries: &[LidPnMappingEntry]) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        if entries.len() > LID_BATCH_SPAN as usize {
            for chunk in entries.chunks(LID_BATCH_SPAN as usize) {
                self.put_lid_mappings(chunk).await?;
            }
            return Ok(());
        }
        // Fold repeats of a LID as single puts in a row would: the later entry wins, and
        // keeps the earlier created_at while the phone number is unchanged. `order` is
        // the position of the write that wins, so ties on updated_at go to the later one.
        let mut folded: BTreeMap<&str, (i64, &LidPnMappingEntry, i64)> = BTreeMap::new();
        for (order, entry) in (0_i64..).zip(entries) {
            let created_at = match folded.get(entry.lid.as_str()) {
                Some((_, earlier, created)) if earlier.phone_number == entry.phone_number => {
                    *created
                }
                _ => entry.created_at,
            };
            folded.insert(&entry.lid, (order, entry, created_at));
        }
        let mut lids = Vec::with_capacity(folded.len());
        let mut phones = Vec::with_capacity(folded.len());
        let mut created = Vec::with_capacity(folded.len());
        let mut updated = Vec::with_capacity(folded.len());
        let mut sources = Vec::with_capacity(folded.len());
        let mut orders = Vec::with_capacity(folded.len());
        for (lid, (order, entry, created_at)) in folded {
            lids.push(lid);
            phones.push(entry.phone_number.as_str());
            created.push(created_at);
            updated.push(entry.updated_at);
            sources.push(entry.learning_source.as_str());
            orders.push(order);
        }
        // One sequence value per statement, spread over the batch by position.
        self.exec(
            "WITH s AS (SELECT nextval('wa_keys_store_seq') * $8::int8 AS base) \
             INSERT INTO wa_lid_pn_mapping AS m \
                 (session_id, lid, phone_number, created_at, updated_at, learning_source, stored_seq) \
             SELECT $1, l, p, c, u, src, s.base + o \
             FROM s, UNNEST($2::text[], $3::text[], $4::int8[], $5::int8[], $6::text[], $7::int8[]) \
                 AS t(l, p, c, u, src, o) \
             ORDER BY l \
             ON CONFLICT (session_id, lid) DO UPDATE SET \
                 created_at = CASE WHEN m.phone_number = EXCLUDED.phone_number \
                     THEN m.created_at ELSE EXCLUDED.created_at END, \
                 phone_number = EXCLUDED.phone_number, updated_at = EXCLUDED.updated_at, \
                 learning_source = EXCLUDED.learning_source, stored_seq = EXCLUDED.stored_seq",
            &[
                &&*self.session,
                &lids,
                &phones,
                &created,
                &updated,
                &sources,
                &orders,
                &LID_BATCH_SPAN,
            ],
        )
        .await
        .map(drop)
    }

    async fn get_all_lid_mappings(&self) -> Result<Vec<LidPnMappingEntry>> {
        let sql = format!(
            "SELECT {LID_COLUMNS} FROM wa_lid_pn_mapping WHERE session_id = $1 ORDER BY lid"
        );
        self.query(&sql, &[&&*self.session])
            .await?
            .iter()
            .map(lid_entry)
            .collect()
    }

    async fn save_base_key(&self, address: &str, message_id: &str, base_key: &[u8]) -> Result<()> {
        self.exec(
            "INSERT INTO wa_base_keys (session_id, address, message_id, base_key) \
             VALUES ($1, $2, $3, $4) \
             ON CONFLICT (session_id, address, message_id) DO UPDATE SET base_key = EXCLUDED.base_key",
            &[&&*self.session, &address, &message_id, &base_key],
        )
        .await
        .map(drop)
    }

    async fn has_same_base_key(
        &self,
        address: &str,
        message_id: &str,
        current_base_key: &[u8],
    ) -> Result<bool> {
        self.query_bool(
            "SELECT EXISTS (SELECT 1 FROM wa_base_keys WHERE session_id = $1 AND address = $2 \
                 AND message_id = $3 AND base_key = $4)",
            &[&&*self.session, &address, &message_id, &current_base_key],
        )
        .await
    }

    async fn delete_base_key(&self, address: &str, message_id: &str) -> Result<()> {
        self.exec(
            "DELETE FROM wa_base_keys WHERE session_id = $1 AND address = $2 AND message_id = $3",
            &[&&*self.session, &address, &message_id],
        )
        .await
        .map(drop)
    }

    async fn update_device_list(&self, record: DeviceListRecord) -> Result<()> {
        self.update_device_lists(vec![record]).await
    }

    async fn update_device_lists(&self, records: Vec<DeviceListRecord>) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let rows = last_wins(records.into_iter().map(|r| (r.user.clone(), r)));
        let mut users = Vec::with_capacity(rows.len());
        let mut devices = Vec::with_capacity(rows.len());
        let mut timestamps = Vec::with_capacity(rows.len());
        let mut phashes = Vec::with_capacity(rows.len());
        let mut raw_ids = Vec::with_capacity(rows.len());
        for (user, record) in &rows {
            users.push(user.as_str());
            devices.push(
                serde_json::to_string(&record.devices)
                    .map_err(|e| StoreError::Serialization(Box::new(e)))?,
            );
            timestamps.push(record.timestamp);
            phashes.push(record.phash.as_deref());
            raw_ids.push(record.raw_id.map(i64::from));
        }
        self.exec(
            "INSERT INTO wa_device_registry (session_id, user_id, devices, timestamp, phash, raw_id) \
             SELECT $1, u, d::jsonb, ts, ph, r \
             FROM UNNEST($2::text[], $3::text[], $4::int8[], $5::text[], $6::int8[]) \
                 AS t(u, d, ts, ph, r) \
             ON CONFLICT (session_id, user_id) DO UPDATE SET devices = EXCLUDED.devices, \
                 timestamp = EXCLUDED.timestamp, phash = EXCLUDED.phash, raw_id = EXCLUDED.raw_id",
            &[&&*self.session, &users, &devices, &timestamps, &phashes, &raw_ids],
        )
        .await
        .map(drop)
    }

    async fn get_devices(&self, user: &str) -> Result<Option<DeviceListRecord>> {
        let row = self
            .query_opt(
                "SELECT devices::text, timestamp, phash, raw_id FROM wa_device_registry \
                 WHERE session_id = $1 AND user_id = $2",
                &[&&*self.session, &user],
            )
            .await?;
        let Some(row) = row else { return Ok(None) };
        let devices: String = row.try_get(0).map_err(pg)?;
        let devices: Vec<DeviceInfo> =
            serde_json::from_str(&devices).map_err(|e| StoreError::Serialization(Box::new(e)))?;
        let raw_id: Option<i64> = row.try_get(3).map_err(pg)?;
        Ok(Some(DeviceListRecord {
            user: user.to_string(),
            devices,
            timestamp: row.try_get(1).map_err(pg)?,
            phash: row.try_get(2).map_err(pg)?,
            raw_id: raw_id
                .map(|r| to_u32(r, "a stored ADV raw id"))
                .transpose()?,
        }))
    }

    async fn delete_devices(&self, user: &str) -> Result<()> {
        self.exec(
            "DELETE FROM wa_device_registry WHERE session_id = $1 AND user_id = $2",
            &[&&*self.session, &user],
        )
        .await
        .map(drop)
    }

    async fn get_group_metadata(&self, group_jid: &str) -> Result<Option<Vec<u8>>> {
        self.query_bytes(
            "SELECT info FROM wa_group_metadata WHERE session_id = $1 AND group_jid = $2",
            &[&&*self.session, &group_jid],
        )
        .await
    }

    async fn put_group_metadata(&self, group_jid: &str, blob: &[u8]) -> Result<()> {
        self.exec(
            "INSERT INTO wa_group_metadata (session_id, group_jid, info) VALUES ($1, $2, $3) \
             ON CONFLICT (session_id, group_jid) DO UPDATE SET info = EXCLUDED.info",
            &[&&*self.session, &group_jid, &blob],
        )
        .await
        .map(drop)
    }

    async fn delete_group_metadata(&self, group_jid: &str) -> Result<()> {
        self.exec(
            "DELETE FROM wa_group_metadata WHERE session_id = $1 AND group_jid = $2",
            &[&&*self.session, &group_jid],
        )
        .await
        .map(drop)
    }

    async fn get_tc_token(&self, jid: &str) -> Result<Option<TcTokenEntry>> {
        let row = self
            .query_opt(
                "SELECT token, token_timestamp, sender_timestamp FROM wa_tc_tokens \
                 WHERE session_id = $1 AND jid = $2",
                &[&&*self.session, &jid],
            )
            .await?;
        row.map(|row| {
            Ok(TcTokenEntry {
                token: row.try_get(0).map_err(pg)?,
                token_timestamp: row.try_get(1).map_err(pg)?,
                sender_timestamp: row.try_get(2).map_err(pg)?,
            })
        })
        .transpose()
    }

    async fn put_tc_token(&self, jid: &str, entry: &TcTokenEntry) -> Result<()> {
        self.exec(
            "INSERT INTO wa_tc_tokens (session_id, jid, token, token_timestamp, sender_timestamp) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (session_id, jid) DO UPDATE SET token = EXCLUDED.token, \
                 token_timestamp = EXCLUDED.token_timestamp, \
                 sender_timestamp = EXCLUDED.sender_timestamp",
            &[
                &&*self.session,
                &jid,
                &entry.token,
                &entry.token_timestamp,
                &entry.sender_timestamp,
            ],
        )
        .await
        .map(drop)
    }

    async fn delete_tc_token(&self, jid: &str) -> Result<()> {
        self.exec(
            "DELETE FROM wa_tc_tokens WHERE session_id = $1 AND jid = $2",
            &[&&*self.session, &jid],
        )
        .await
        .map(drop)
    }

    async fn get_all_tc_token_jids(&self) -> Result<Vec<String>> {
        self.query(
            "SELECT jid FROM wa_tc_tokens WHERE session_id = $1 ORDER BY jid",
            &[&&*self.session],
        )
        .await?
        .iter()
        .map(|row| row.try_get(0).map_err(pg))
        .collect()
    }

    async fn delete_expired_tc_tokens(&self, token_cutoff: i64, sender_cutoff: i64) -> Result<u32> {
        // Kept while either window is live: a real token at or after its cutoff, or a
        // sender bucket at or after its own.
        self.exec(
            "DELETE FROM wa_tc_tokens WHERE session_id = $1 AND NOT ( \
                 (octet_length(token) > 0 AND token_timestamp >= $2) \
                 OR (sender_timestamp IS NOT NULL AND sender_timestamp >= $3))",
            &[&&*self.session, &token_cutoff, &sender_cutoff],
        )
        .await
        .map(count)
    }

    async fn touch_tc_token_sender_timestamp(
        &self,
        jid: &str,
        sender_timestamp: i64,
    ) -> Result<()> {
        // One atomic upsert: a byte-less placeholder when absent, the token left alone
        // otherwise, and the sender bucket only ever moving forward.
        self.exec(
            "INSERT INTO wa_tc_tokens AS t (session_id, jid, token, token_timestamp, sender_timestamp) \
             VALUES ($1, $2, ''::bytea, $3, $3) \
             ON CONFLICT (session_id, jid) DO UPDATE \
             SET sender_timestamp = GREATEST(t.sender_timestamp, EXCLUDED.sender_timestamp)",
            &[&&*self.session, &jid, &sender_timestamp],
        )
        .await
        .map(drop)
    }

    async fn store_received_tc_token(
        &self,
        jid: &str,
        token: &[u8],
        token_timestamp: i64,
    ) -> Result<()> {
        // Newer wins, atomically; a placeholder never blocks the first real token; the
        // sender bucket is left as it is.
        self.exec(
            "INSERT INTO wa_tc_tokens AS t (session_id, jid, token, token_timestamp, sender_timestamp) \
             VALUES ($1, $2, $3, $4, NULL) \
             ON CONFLICT (session_id, jid) DO UPDATE \
             SET token = EXCLUDED.token, token_timestamp = EXCLUDED.token_timestamp \
             WHERE octet_length(t.token) = 0 OR EXCLUDED.token_timestamp >= t.token_timestamp",
            &[&&*self.session, &jid, &token, &token_timestamp],
        )
        .await
        .map(drop)
    }

    async fn store_sent_message(
        &self,
        chat_jid: &str,
        message_id: &str,
        payload: &[u8],
    ) -> Result<()> {
        self.exec(
            "INSERT INTO wa_sent_messages (session_id, chat_jid, message_id, payload, created_at) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (session_id, chat_jid, message_id) DO UPDATE \
             SET payload = EXCLUDED.payload, created_at = EXCLUDED.created_at",
            &[
                &&*self.session,
                &chat_jid,
                &message_id,
                &payload,
                &now_secs(),
            ],
        )
        .await
        .map(drop)
    }

    async fn take_sent_message(&self, chat_jid: &str, message_id: &str) -> Result<Option<Vec<u8>>> {
        // One statement: two concurrent takes cannot both get it.
        const TAKE: &str = "DELETE FROM wa_sent_messages \
             WHERE session_id = $1 AND chat_jid = $2 AND message_id = $3 RETURNING payload";
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
            [&&*self.session, &chat_jid, &message_id];
        let Some(owner) = self.keys.owner_for(&self.session)? else {
            return self.query_bytes(TAKE, &params).await;
        };
        self.fenced(owner, TAKE, async |c, statement| {
            match c.query_opt(statement, &params).await.map_err(pg)? {
                Some(row) => Ok(Some(row.try_get(0).map_err(pg)?)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn delete_expired_sent_messages(&self, cutoff_timestamp: i64) -> Result<u32> {
        self.exec(
            "DELETE FROM wa_sent_messages WHERE session_id = $1 AND created_at < $2",
            &[&&*self.session, &cutoff_timestamp],
        )
        .await
        .map(count)
    }

    async fn store_pending_inbound(
        &self,
        chat: &str,
        sender: &str,
        id: &str,
        message: &[u8],
    ) -> Result<()> {
        self.store_pending_inbound_batch(&[PendingInboundRow {
            chat,
            sender,
            id,
            message,
        }])
        .await
    }

    async fn get_pending_inbound(
        &self,
        chat: &str,
        sender: &str,
        id: &str,
    ) -> Result<Option<Vec<u8>>> {
        self.send_deferred_deletes().await?;
        self.query_bytes(
            "SELECT message FROM wa_pending_inbound \
             WHERE session_id = $1 AND chat = $2 AND sender = $3 AND id = $4",
            &[&&*self.session, &chat, &sender, &id],
        )
        .await
    }

    async fn delete_pending_inbound(&self, chat: &str, sender: &str, id: &str) -> Result<()> {
        self.delete_pending_inbound_batch(&[PendingInboundKey { chat, sender, id }])
            .await
    }

    async fn delete_expired_pending_inbound(&self, cutoff_timestamp: i64) -> Result<u32> {
        self.send_deferred_deletes().await?;
        self.exec(
            "DELETE FROM wa_pending_inbound WHERE session_id = $1 AND inserted_at < $2",
            &[&&*self.session, &cutoff_timestamp],
        )
        .await
        .map(count)
    }

    /// Group-committed with every session's: see `keys::inbound`.
    async fn store_pending_inbound_batch(&self, rows: &[PendingInboundRow<'_>]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let rows = rows
            .iter()
            .map(|r| (self.inbound_key(r.chat, r.sender, r.id), r.message.to_vec()))
            .collect();
        inbound::put(&self.keys, rows).await
    }

    /// Deferred: see `keys::inbound`.
    async fn delete_pending_inbound_batch(&self, keys: &[PendingInboundKey<'_>]) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let keys = keys
            .iter()
            .map(|k| self.inbound_key(k.chat, k.sender, k.id))
            .collect();
        inbound::delete(&self.keys, keys).await
    }
}

impl PgSessionKeys {
    fn inbound_key(&self, chat: &str, sender: &str, id: &str) -> inbound::Key {
        (
            self.session.clone(),
            chat.to_string(),
            sender.to_string(),
            id.to_string(),
        )
    }

    /// Sends the deferred pending-inbound deletes (every session's) now.
    async fn send_deferred_deletes(&self) -> Result<()> {
        inbound::flush(&self.keys).await
    }
}

/// A node's check that it still holds a session (`$1`) as owner `$2` with fence `$3`,
/// the row locked for the transaction: a division by zero when it does not (see
/// [`PgSessionKeys::fenced`]).
const FENCE_CHECK: &str = "SELECT 1 / count(*)::int FROM (SELECT 1 FROM bv_sessions \
     WHERE user_id = $1 AND owner = $2 AND fence = $3 FOR SHARE) AS held";

/// The pending-inbound group commit: the deletes, then the inserts.
const INBOUND_WRITE: &str = "WITH gone AS (DELETE FROM wa_pending_inbound p \
     USING UNNEST($1::text[], $2::text[], $3::text[], $4::text[]) AS k(n, c, s, i) \
     WHERE p.session_id = k.n AND p.chat = k.c AND p.sender = k.s AND p.id = k.i) \
     INSERT INTO wa_pending_inbound (session_id, chat, sender, id, message, inserted_at) \
     SELECT n, c, s, i, m, $10 FROM UNNEST($5::text[], $6::text[], $7::text[], \
     $8::text[], $9::bytea[]) AS t(n, c, s, i, m) \
     ON CONFLICT (session_id, chat, sender, id) DO UPDATE \
     SET message = EXCLUDED.message, inserted_at = EXCLUDED.inserted_at";

/// [`INBOUND_WRITE`] on a node: each row only while the node (`$15`) holds its session
/// (`u`) with the fence (`f`) it believes, the session's row locked for the statement.
const INBOUND_WRITE_FENCED: &str = "WITH gone AS (DELETE FROM wa_pending_inbound p \
     USING UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $13::text[], \
     $14::bigint[]) AS k(n, c, s, i, u, f) \
     WHERE p.session_id = k.n AND p.chat = k.c AND p.sender = k.s AND p.id = k.i \
     AND EXISTS (SELECT 1 FROM bv_sessions b \
       WHERE b.user_id = k.u AND b.owner = $15 AND b.fence = k.f FOR SHARE)) \
     INSERT INTO wa_pending_inbound (session_id, chat, sender, id, message, inserted_at) \
     SELECT n, c, s, i, m, $10 FROM UNNEST($5::text[], $6::text[], $7::text[], \
     $8::text[], $9::bytea[], $11::text[], $12::bigint[]) AS t(n, c, s, i, m, u, f) \
     WHERE EXISTS (SELECT 1 FROM bv_sessions b \
       WHERE b.user_id = t.u AND b.owner = $15 AND b.fence = t.f FOR SHARE) \
     ON CONFLICT (session_id, chat, sender, id) DO UPDATE \
     SET message = EXCLUDED.message, inserted_at = EXCLUDED.inserted_at";

impl inbound::Writer for PgKeys {
    /// One statement: the deletes, then the inserts (each key is in one list only). On a
    /// node, only rows of sessions it holds, each gated on its fence in the statement (a
    /// row of a session another node claimed meanwhile is not written).
    async fn write(&self, write: &inbound::Write) -> Result<()> {
        let node = self.inner.node.get();
        // On a node, each key with its session and the fence this node holds it with (a
        // session it does not hold has no rows written); on a single server, every key.
        fn held<'k>(
            node: Option<&Arc<crate::db::nodes::Standing>>,
            k: &'k inbound::Key,
        ) -> Option<(&'k str, i64)> {
            match node {
                None => Some(("", 0)),
                Some(n) => {
                    let session = held_id(&k.0);
                    Some((session, n.fence_of(session)?))
                }
            }
        }
        let deletes: Vec<(&inbound::Key, (&str, i64))> = write
            .deletes
            .iter()
            .filter_map(|k| Some((k, held(node, k)?)))
            .collect();
        let puts: Vec<(&inbound::Key, &[u8], (&str, i64))> = write
            .puts
            .iter()
            .filter_map(|(k, m)| Some((k, m.as_slice(), held(node, k)?)))
            .collect();
        let gone = columns(deletes.iter().map(|(k, _)| *k));
        let put = columns(puts.iter().map(|(k, _, _)| *k));
        let messages: Vec<&[u8]> = puts.iter().map(|(_, m, _)| *m).collect();
        let now = now_secs();
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![
            &gone.0, &gone.1, &gone.2, &gone.3, &put.0, &put.1, &put.2, &put.3, &messages, &now,
        ];
        // The node's gate: each row's session and fence (built only on a node).
        let (put_held, put_fences): (Vec<&str>, Vec<i64>) = match node {
            Some(_) => puts.iter().map(|(_, _, h)| *h).unzip(),
            None => Default::default(),
        };
        let (gone_held, gone_fences): (Vec<&str>, Vec<i64>) = match node {
            Some(_) => deletes.iter().map(|(_, h)| *h).unzip(),
            None => Default::default(),
        };
        let sql = match node {
            None => INBOUND_WRITE,
            Some(n) => {
                params.extend([
                    &put_held as &(dyn tokio_postgres::types::ToSql + Sync),
                    &put_fences,
                    &gone_held,
                    &gone_fences,
                    &n.id,
                ]);
                INBOUND_WRITE_FENCED
            }
        };
        on_conn!(self, |c| {
            let statement = c.prepare_cached(sql).await.map_err(pg)?;
            c.execute(&statement, &params).await.map(drop).map_err(pg)
        })
    }

    fn queue(&self) -> &InboundQueue {
        &self.inner.inbound
    }
}

/// The columns of pending-inbound keys, for UNNEST.
fn columns<'a>(
    keys: impl Iterator<Item = &'a inbound::Key>,
) -> (Vec<&'a str>, Vec<&'a str>, Vec<&'a str>, Vec<&'a str>) {
    let mut columns = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (n, c, s, i) in keys {
        columns.0.push(&**n);
        columns.1.push(c.as_str());
        columns.2.push(s.as_str());
        columns.3.push(i.as_str());
    }
    columns
}

// ---------------------------------------------------------------------------------------
// MsgSecretStore
// ---------------------------------------------------------------------------------------

#[async_trait]
impl MsgSecretStore for PgSessionKeys {
    async fn put_msg_secrets(&self, entries: Vec<MsgSecretEntry>) -> Result<usize> {
        let stored = entries.len();
        if stored == 0 {
            return Ok(0);
        }
        // Repeats within the batch merge as successive puts would.
        let mut merged: BTreeMap<(Arc<str>, Arc<str>, Arc<str>), ([u8; 32], i64, i64)> =
            BTreeMap::new();
        for e in entries {
            let key = (e.chat, e.sender, e.msg_id);
            let value = match merged.get(&key) {
                Some((_, expires, ts)) => (
                    e.secret,
                    merge_msg_secret_expiry(*expires, e.expires_at),
                    merge_msg_secret_message_ts(*ts, e.message_ts),
                ),
                None => (e.secret, e.expires_at, e.message_ts),
            };
            merged.insert(key, value);
        }
        let mut chats = Vec::with_capacity(merged.len());
        let mut senders = Vec::with_capacity(merged.len());
        let mut ids = Vec::with_capacity(merged.len());
        let mut secrets = Vec::with_capacity(merged.len());
        let mut expiries = Vec::with_capacity(merged.len());
        let mut timestamps = Vec::with_capacity(merged.len());
        for ((chat, sender, id), (secret, expires, ts)) in &merged {
            chats.push(&**chat);
            senders.push(&**sender);
            ids.push(&**id);
            secrets.push(secret.as_slice());
            expiries.push(*expires);
            timestamps.push(*ts);
        }
        // On conflict: the new secret; the later deadline, 0 ("never") winning; the later
        // parent time, 0 ("unknown") never replacing a known one.
        self.exec(
            "INSERT INTO wa_msg_secrets AS s \
                 (session_id, chat, sender, msg_id, secret, expires_at, message_ts, created_at) \
             SELECT $1, c, se, i, sec, e, ts, $8 \
             FROM UNNEST($2::text[], $3::text[], $4::text[], $5::bytea[], $6::int8[], $7::int8[]) \
                 AS t(c, se, i, sec, e, ts) \
             ON CONFLICT (session_id, chat, sender, msg_id) DO UPDATE SET \
                 secret = EXCLUDED.secret, \
                 expires_at = CASE WHEN s.expires_at = 0 OR EXCLUDED.expires_at = 0 THEN 0 \
                     ELSE GREATEST(s.expires_at, EXCLUDED.expires_at) END, \
                 message_ts = GREATEST(s.message_ts, EXCLUDED.message_ts)",
            &[
                &&*self.session,
                &chats,
                &senders,
                &ids,
                &secrets,
                &expiries,
                &timestamps,
                &now_secs(),
            ],
        )
        .await?;
        Ok(stored)
    }

    async fn get_msg_secret(
        &self,
        chat: &str,
        sender: &str,
        msg_id: &str,
    ) -> Result<Option<Vec<u8>>> {
        Ok(self
            .get_msg_secret_with_ts(chat, sender, msg_id)
            .await?
            .map(|(secret, _)| secret))
    }

    async fn get_msg_secret_with_ts(
        &self,
        chat: &str,
        sender: &str,
        msg_id: &str,
    ) -> Result<Option<(Vec<u8>, i64)>> {
        let row = self
            .query_opt(
                "SELECT secret, message_ts FROM wa_msg_secrets \
                 WHERE session_id = $1 AND chat = $2 AND sender = $3 AND msg_id = $4",
                &[&&*self.session, &chat, &sender, &msg_id],
            )
            .await?;
        row.map(|row| Ok((row.try_get(0).map_err(pg)?, row.try_get(1).map_err(pg)?)))
            .transpose()
    }

    async fn delete_expired_msg_secrets(&self, cutoff_timestamp: i64) -> Result<u32> {
        self.exec(
            "DELETE FROM wa_msg_secrets \
             WHERE session_id = $1 AND expires_at <> 0 AND expires_at <= $2",
            &[&&*self.session, &cutoff_timestamp],
        )
        .await
        .map(count)
    }
}

// ---------------------------------------------------------------------------------------
// DeviceStore
// ---------------------------------------------------------------------------------------

const DEVICE_COLUMNS: &str = "pn, lid, registration_id, noise_key, identity_key, \
    signed_pre_key, signed_pre_key_id, signed_pre_key_signature, adv_secret_key, account, \
    push_name, app_version_primary, app_version_secondary, app_version_tertiary, \
    app_version_last_fetched_ms, edge_routing_info, props_hash, next_pre_key_id, \
    first_unupload_pre_key_id, server_has_prekeys, nct_salt, server_cert_chain, \
    login_counter, lid_migrated, last_signed_pre_key_rotation_ms, read_receipts_disabled";

impl PgSessionKeys {
    /// Writes the device row: every persisted field, replacing the old values (`None`
    /// included). With `keep_existing`, an existing row is left as it is.
    async fn write_device(&self, d: &Device, keep_existing: bool) -> Result<()> {
        let cert_chain = d
            .server_cert_chain
            .as_ref()
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| StoreError::Serialization(Box::new(e)))?;
        let account = d.account.as_ref().map(|a| account_serde::to_bytes(a));
        let conflict = if keep_existing {
            "DO NOTHING".to_string()
        } else {
            let sets: Vec<String> = DEVICE_COLUMNS
                .split(',')
                .map(|c| format!("{0} = EXCLUDED.{0}", c.trim()))
                .collect();
            format!("DO UPDATE SET {}", sets.join(", "))
        };
        let sql = format!(
            "INSERT INTO wa_device (session_id, {DEVICE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, \
             $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, \
             $23::text::jsonb, $24, $25, $26, $27) ON CONFLICT (session_id) {conflict}"
        );
        self.exec(
            &sql,
            &[
                &&*self.session,
                &d.pn.as_ref().map(|j| j.to_string()),
                &d.lid.as_ref().map(|j| j.to_string()),
                &i64::from(d.registration_id),
                &keypair_bytes(&d.noise_key),
                &keypair_bytes(&d.identity_key),
                &keypair_bytes(&d.signed_pre_key),
                &i64::from(d.signed_pre_key_id),
                &d.signed_pre_key_signature.as_slice(),
                &d.adv_secret_key.as_slice(),
                &account,
                &d.push_name,
                &i64::from(d.app_version_primary),
                &i64::from(d.app_version_secondary),
                &i64::from(d.app_version_tertiary),
                &d.app_version_last_fetched_ms,
                &d.edge_routing_info,
                &d.props_hash,
                &i64::from(d.next_pre_key_id),
                &i64::from(d.first_unupload_pre_key_id),
                &d.server_has_prekeys,
                &d.nct_salt,
                &cert_chain,
                &d.login_counter,
                &d.lid_migrated,
                &d.last_signed_pre_key_rotation_ms,
                &d.read_receipts_disabled,
            ],
        )
        .await
        .map(drop)
    }
}

fn device_from(row: &tokio_postgres::Row) -> Result<Device> {
    let get_u32 =
        |i: usize, what: &str| -> Result<u32> { to_u32(row.try_get(i).map_err(pg)?, what) };
    let account: Option<Vec<u8>> = row.try_get(9).map_err(pg)?;
    let account = account
        .map(|bytes| {
            account_serde::from_bytes(&bytes).map_err(|e| StoreError::Serialization(Box::new(e)))
        })
        .transpose()?;
    let cert_chain: Option<String> = row.try_get(21).map_err(pg)?;
    let server_cert_chain = cert_chain
        .map(|json| {
            serde_json::from_str::<CachedServerCertChain>(&json)
                .map_err(|e| StoreError::Serialization(Box::new(e)))
        })
        .transpose()?;
    let noise_key: Vec<u8> = row.try_get(3).map_err(pg)?;
    let identity_key: Vec<u8> = row.try_get(4).map_err(pg)?;
    let signed_pre_key: Vec<u8> = row.try_get(5).map_err(pg)?;
    Ok(Device {
        pn: jid_from(row.try_get(0).map_err(pg)?, "the device's phone number")?,
        lid: jid_from(row.try_get(1).map_err(pg)?, "the device's LID")?,
        registration_id: get_u32(2, "the registration id")?,
        noise_key: keypair_from(&noise_key, "the noise key")?,
        identity_key: keypair_from(&identity_key, "the identity key")?,
        signed_pre_key: keypair_from(&signed_pre_key, "the signed pre-key")?,
        signed_pre_key_id: get_u32(6, "the signed pre-key id")?,
        signed_pre_key_signature: to_array(
            row.try_get(7).map_err(pg)?,
            "the signed pre-key signature",
        )?,
        adv_secret_key: to_array(row.try_get(8).map_err(pg)?, "the ADV secret key")?,
        account: account.map(Arc::new),
        push_name: row.try_get(10).map_err(pg)?,
        app_version_primary: get_u32(11, "the app version")?,
        app_version_secondary: get_u32(12, "the app version")?,
        app_version_tertiary: get_u32(13, "the app version")?,
        app_version_last_fetched_ms: row.try_get(14).map_err(pg)?,
        // Runtime-only fields: what a fresh device has (as upstream's stores do).
        device_props: Arc::new(DEVICE_PROPS.clone()),
        client_profile: ClientProfile::web(),
        edge_routing_info: row.try_get(15).map_err(pg)?,
        props_hash: row.try_get(16).map_err(pg)?,
        next_pre_key_id: get_u32(17, "the next pre-key id")?,
        first_unupload_pre_key_id: get_u32(18, "the first pre-key id not uploaded")?,
        server_has_prekeys: row.try_get(19).map_err(pg)?,
        nct_salt: row.try_get(20).map_err(pg)?,
        nct_salt_sync_seen: false,
        server_cert_chain,
        login_counter: row.try_get(22).map_err(pg)?,
        lid_migrated: row.try_get(23).map_err(pg)?,
        last_signed_pre_key_rotation_ms: row.try_get(24).map_err(pg)?,
        read_receipts_disabled: row.try_get(25).map_err(pg)?,
    })
}

#[async_trait]
impl DeviceStore for PgSessionKeys {
    async fn save(&self, device: &Device) -> Result<()> {
        self.write_device(device, false).await
    }

    async fn load(&self) -> Result<Option<Device>> {
        let columns = DEVICE_COLUMNS.replace("server_cert_chain", "server_cert_chain::text");
        let sql = format!("SELECT {columns} FROM wa_device WHERE session_id = $1");
        let row = self.query_opt(&sql, &[&&*self.session]).await?;
        row.as_ref().map(device_from).transpose()
    }

    async fn exists(&self) -> Result<bool> {
        self.query_bool(
            "SELECT EXISTS (SELECT 1 FROM wa_device WHERE session_id = $1)",
            &[&&*self.session],
        )
        .await
    }

    async fn create(&self) -> Result<i32> {
        // A session has one device: a second create() keeps it (its keys are the
        // account's) and answers the same id.
        self.write_device(&Device::new(), true).await?;
        Ok(1)
    }

    async fn resource_report(&self) -> StorageResourceReport {
        // The rows live in the database server, not in this process.
        StorageResourceReport {
            memory_bytes: Some(0),
            ..StorageResourceReport::default()
        }
    }
}

// ---------------------------------------------------------------------------------------
// Listing a session's rows (for copies between key stores, `super::copy`)
// ---------------------------------------------------------------------------------------

/// Each of `copy::LISTED`'s listings in this schema.
const LISTINGS: [&str; super::copy::LISTED] = [
    "SELECT address, key FROM wa_identities WHERE session_id = $1",
    "SELECT address, record FROM wa_sessions WHERE session_id = $1",
    "SELECT id, record, uploaded FROM wa_prekeys WHERE session_id = $1",
    "SELECT id, record FROM wa_signed_prekeys WHERE session_id = $1",
    "SELECT address, record FROM wa_sender_keys WHERE session_id = $1",
    // The latest key (stored last) is listed last.
    "SELECT key_id FROM wa_app_state_keys WHERE session_id = $1 ORDER BY stored_seq",
    "SELECT name FROM wa_app_state_versions WHERE session_id = $1",
    "SELECT name, version, index_mac, value_mac FROM wa_app_state_mutation_macs \
     WHERE session_id = $1",
    "SELECT group_jid, device_jid, has_key FROM wa_sender_key_devices WHERE session_id = $1",
    "SELECT address, message_id, base_key FROM wa_base_keys WHERE session_id = $1",
    "SELECT user_id FROM wa_device_registry WHERE session_id = $1",
    "SELECT group_jid, info FROM wa_group_metadata WHERE session_id = $1",
    "SELECT chat_jid, message_id, payload FROM wa_sent_messages WHERE session_id = $1",
    "SELECT chat, sender, id, message FROM wa_pending_inbound WHERE session_id = $1",
    "SELECT chat, sender, msg_id, secret, expires_at, message_ts FROM wa_msg_secrets \
     WHERE session_id = $1",
];

/// A listed row's cells, by their column types.
fn cells(row: &tokio_postgres::Row) -> Result<Vec<super::copy::Cell>> {
    use super::copy::Cell;
    use tokio_postgres::types::Type;
    (0..row.len())
        .map(|i| {
            let ty = row.columns()[i].type_();
            Ok(match *ty {
                Type::INT8 => Cell::Int(row.try_get(i).map_err(pg)?),
                Type::INT4 => Cell::Int(i64::from(row.try_get::<_, i32>(i).map_err(pg)?)),
                Type::BOOL => Cell::Bool(row.try_get(i).map_err(pg)?),
                Type::TEXT | Type::VARCHAR => Cell::Text(row.try_get(i).map_err(pg)?),
                Type::BYTEA => Cell::Bytes(row.try_get(i).map_err(pg)?),
                _ => return Err(invalid(format!("a listed column of type {ty}"))),
            })
        })
        .collect()
}

impl PgSessionKeys {
    /// Every key of this session, listed in one read-only snapshot.
    pub async fn list_rows(&self) -> Result<super::copy::Rows> {
        self.send_deferred_deletes().await?;
        let mut conn = self.keys.conn().await?;
        let tx = conn
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(pg)?;
        let id: &str = &self.session;
        let device = tx
            .query_opt("SELECT 1 FROM wa_device WHERE session_id = $1", &[&id])
            .await
            .map_err(pg)?
            .is_some();
        let mut listings: [super::copy::Listing; super::copy::LISTED] = Default::default();
        for (sql, out) in LISTINGS.iter().zip(listings.iter_mut()) {
            let rows = tx.query(*sql, &[&id]).await.map_err(pg)?;
            *out = rows.iter().map(cells).collect::<Result<_>>()?;
        }
        tx.commit().await.map_err(pg)?;
        super::copy::Rows::from_listings(device, &listings)
    }
}
