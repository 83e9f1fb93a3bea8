//! One session's WhatsApp keys moved whole from one key store to another: a session's
//! rows in PostgreSQL written out as a whatsapp-rust `SqliteStore` file (a portable
//! backup), and such a file read back into PostgreSQL (a restore).
//!
//! whatsapp-rust's storage traits read a key by its key and never list them, so each
//! engine lists what it holds ([`Rows`]: the keys, and the values whose bytes both
//! engines keep as they are given); the values an engine keeps in a form of its own (the
//! device, app-state keys and versions, device lists, LID mappings, tc tokens) are read
//! through the source's getters. Everything is written through the target's setters, so
//! each engine keeps its own format. A copy is checked by listing the target again: the
//! same rows, or an error.

use std::path::Path;
use std::sync::Arc;

use whatsapp_rust::bytes::Bytes;
use whatsapp_rust::store::SqliteStore;
use whatsapp_rust::wacore::appstate::processor::AppStateMutationMAC;
use whatsapp_rust::wacore::store::error::{Result, StoreError};
use whatsapp_rust::wacore::store::traits::{Backend, MsgSecretEntry, PendingInboundRow};

use super::files;
use super::postgres::{PgKeys, PgSessionKeys};

/// What one engine lists of one session's keys. Order does not matter ([`Rows::sorted`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Rows {
    /// Whether the session has a device (its account keys). Without one nothing else is
    /// worth keeping: a copy of a session without a device is empty.
    pub device: bool,
    /// `(address, identity key)`.
    pub identities: Vec<(String, Vec<u8>)>,
    /// `(address, session record)`.
    pub sessions: Vec<(String, Vec<u8>)>,
    /// `(id, record, uploaded)`.
    pub prekeys: Vec<(u32, Vec<u8>, bool)>,
    /// `(id, record)`.
    pub signed_prekeys: Vec<(u32, Vec<u8>)>,
    /// `(address, record)`.
    pub sender_keys: Vec<(String, Vec<u8>)>,
    /// App-state sync key ids, the one the source calls latest last.
    pub sync_key_ids: Vec<Vec<u8>>,
    /// App-state collections with a stored version.
    pub version_names: Vec<String>,
    /// `(collection, version, index MAC, value MAC)`.
    pub macs: Vec<(String, u64, Vec<u8>, Vec<u8>)>,
    /// `(group, device, has key)`.
    pub sender_key_devices: Vec<(String, String, bool)>,
    /// `(address, message id, base key)`.
    pub base_keys: Vec<(String, String, Vec<u8>)>,
    /// Users with a stored device list.
    pub device_users: Vec<String>,
    /// `(group, metadata)`.
    pub group_metadata: Vec<(String, Vec<u8>)>,
    /// `(chat, message id, payload)`.
    pub sent_messages: Vec<(String, String, Vec<u8>)>,
    /// `(chat, sender, id, message)`.
    pub pending_inbound: Vec<(String, String, String, Vec<u8>)>,
    /// `(chat, sender, message id, secret, expires at, message ts)`.
    pub msg_secrets: Vec<(String, String, String, Vec<u8>, i64, i64)>,
    /// JIDs with a tc token (listed through the trait, which can).
    pub tc_token_jids: Vec<String>,
    /// LID of each LID-PN mapping (listed through the trait, which can).
    pub lids: Vec<String>,
}

/// A value as an engine lists it.
#[derive(Debug)]
pub enum Cell {
    Int(i64),
    Bool(bool),
    Text(String),
    Bytes(Vec<u8>),
}

/// What each engine lists, in this order (its own SQL for each, see `LISTINGS` in
/// `files.rs` and `postgres.rs`): the columns of each line of [`Rows`] after `device`.
pub const LISTED: usize = 15;

/// One listing's rows.
pub type Listing = Vec<Vec<Cell>>;

fn cell_error(what: &str, cell: Option<&Cell>) -> StoreError {
    StoreError::Validation(format!(
        "a listed key has {cell:?} where {what} was expected"
    ))
}

fn text(row: &[Cell], i: usize) -> Result<String> {
    match row.get(i) {
        Some(Cell::Text(t)) => Ok(t.clone()),
        other => Err(cell_error("text", other)),
    }
}

fn bytes(row: &[Cell], i: usize) -> Result<Vec<u8>> {
    match row.get(i) {
        Some(Cell::Bytes(b)) => Ok(b.clone()),
        other => Err(cell_error("bytes", other)),
    }
}

fn int(row: &[Cell], i: usize) -> Result<i64> {
    match row.get(i) {
        Some(Cell::Int(n)) => Ok(*n),
        other => Err(cell_error("an integer", other)),
    }
}

fn flag(row: &[Cell], i: usize) -> Result<bool> {
    match row.get(i) {
        Some(Cell::Bool(b)) => Ok(*b),
        Some(Cell::Int(n)) => Ok(*n != 0),
        other => Err(cell_error("a flag", other)),
    }
}

fn id(row: &[Cell], i: usize) -> Result<u32> {
    let n = int(row, i)?;
    u32::try_from(n).map_err(|_| StoreError::Validation(format!("key id {n} is out of range")))
}

fn each<T>(listing: &Listing, f: impl Fn(&[Cell]) -> Result<T>) -> Result<Vec<T>> {
    listing.iter().map(|r| f(r)).collect()
}

impl Rows {
    /// Rows from an engine's [`LISTED`] listings, in the order of [`Rows`]' fields.
    pub fn from_listings(device: bool, l: &[Listing; LISTED]) -> Result<Rows> {
        let pair = |r: &[Cell]| Ok((text(r, 0)?, bytes(r, 1)?));
        let triple = |r: &[Cell]| Ok((text(r, 0)?, text(r, 1)?, bytes(r, 2)?));
        Ok(Rows {
            device,
            identities: each(&l[0], pair)?,
            sessions: each(&l[1], pair)?,
            prekeys: each(&l[2], |r| Ok((id(r, 0)?, bytes(r, 1)?, flag(r, 2)?)))?,
            signed_prekeys: each(&l[3], |r| Ok((id(r, 0)?, bytes(r, 1)?)))?,
            sender_keys: each(&l[4], pair)?,
            sync_key_ids: each(&l[5], |r| bytes(r, 0))?,
            version_names: each(&l[6], |r| text(r, 0))?,
            macs: each(&l[7], |r| {
                Ok((text(r, 0)?, int(r, 1)? as u64, bytes(r, 2)?, bytes(r, 3)?))
            })?,
            sender_key_devices: each(&l[8], |r| Ok((text(r, 0)?, text(r, 1)?, flag(r, 2)?)))?,
            base_keys: each(&l[9], triple)?,
            device_users: each(&l[10], |r| text(r, 0))?,
            group_metadata: each(&l[11], pair)?,
            sent_messages: each(&l[12], triple)?,
            pending_inbound: each(&l[13], |r| {
                Ok((text(r, 0)?, text(r, 1)?, text(r, 2)?, bytes(r, 3)?))
            })?,
            msg_secrets: each(&l[14], |r| {
                let (chat, sender, msg_id) = (text(r, 0)?, text(r, 1)?, text(r, 2)?);
                Ok((chat, sender, msg_id, bytes(r, 3)?, int(r, 4)?, int(r, 5)?))
            })?,
            tc_token_jids: Vec::new(),
            lids: Vec::new(),
        })
    }

    /// Every list sorted, except `sync_key_ids`, whose order says which key is the
    /// latest (compare two listings with [`Rows::same_as`]).
    fn sorted(mut self) -> Rows {
        self.identities.sort();
        self.sessions.sort();
        self.prekeys.sort();
        self.signed_prekeys.sort();
        self.sender_keys.sort();
        self.version_names.sort();
        self.macs.sort();
        self.sender_key_devices.sort();
        self.base_keys.sort();
        self.device_users.sort();
        self.group_metadata.sort();
        self.sent_messages.sort();
        self.pending_inbound.sort();
        self.msg_secrets.sort();
        self.tc_token_jids.sort();
        self.lids.sort();
        self
    }

    /// The same rows, whatever their order.
    pub fn same_as(&self, other: &Rows) -> bool {
        let (mut a, mut b) = (self.clone().sorted(), other.clone().sorted());
        a.sync_key_ids.sort();
        b.sync_key_ids.sort();
        a == b
    }

    /// How many rows (the device counts as one).
    pub fn len(&self) -> usize {
        usize::from(self.device)
            + self.identities.len()
            + self.sessions.len()
            + self.prekeys.len()
            + self.signed_prekeys.len()
            + self.sender_keys.len()
            + self.sync_key_ids.len()
            + self.version_names.len()
            + self.macs.len()
            + self.sender_key_devices.len()
            + self.base_keys.len()
            + self.device_users.len()
            + self.group_metadata.len()
            + self.sent_messages.len()
            + self.pending_inbound.len()
            + self.msg_secrets.len()
            + self.tc_token_jids.len()
            + self.lids.len()
    }

    /// True when nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds what the traits can list themselves.
    async fn complete(mut self, src: &dyn Backend) -> Result<Rows> {
        self.tc_token_jids = src.get_all_tc_token_jids().await?;
        self.lids = src
            .get_all_lid_mappings()
            .await?
            .into_iter()
            .map(|m| m.lid)
            .collect();
        Ok(self)
    }
}

/// Writes `rows`, and what `src` answers for them, into `dst`. Returns the rows written.
async fn write(src: &dyn Backend, rows: &Rows, dst: &dyn Backend) -> Result<usize> {
    let Some(device) = src.load().await? else {
        return Ok(0);
    };
    dst.save(&device).await?;
    let pairs = |v: &[(String, Vec<u8>)]| -> Vec<(Arc<str>, Bytes)> {
        v.iter()
            .map(|(k, b)| (Arc::from(k.as_str()), Bytes::copy_from_slice(b)))
            .collect()
    };
    let mut identities = Vec::with_capacity(rows.identities.len());
    for (address, key) in &rows.identities {
        let key: [u8; 32] = key.as_slice().try_into().map_err(|_| {
            StoreError::Validation(format!("identity key of {address} is not 32 bytes"))
        })?;
        identities.push((Arc::from(address.as_str()), key));
    }
    dst.put_identities_batch(&identities).await?;
    dst.put_sessions_batch(&pairs(&rows.sessions)).await?;
    for uploaded in [false, true] {
        let batch: Vec<(u32, Bytes)> = rows
            .prekeys
            .iter()
            .filter(|p| p.2 == uploaded)
            .map(|(id, record, _)| (*id, Bytes::copy_from_slice(record)))
            .collect();
        if !batch.is_empty() {
            dst.store_prekeys_batch(&batch, uploaded).await?;
        }
    }
    for (id, record) in &rows.signed_prekeys {
        dst.store_signed_prekey(*id, record).await?;
    }
    dst.put_sender_keys_batch(&pairs(&rows.sender_keys)).await?;
    write_app_state(src, rows, dst).await?;
    write_protocol(src, rows, dst).await?;
    Ok(rows.len())
}

/// The app-state part of [`write`]: sync keys (the latest last), versions, MACs.
async fn write_app_state(src: &dyn Backend, rows: &Rows, dst: &dyn Backend) -> Result<()> {
    for key_id in &rows.sync_key_ids {
        if let Some(key) = src.get_sync_key(key_id).await? {
            dst.set_sync_key(key_id, key).await?;
        }
    }
    for name in &rows.version_names {
        dst.set_version(name, src.get_version(name).await?).await?;
    }
    for (name, version, index_mac, value_mac) in &rows.macs {
        let mac = AppStateMutationMAC {
            index_mac: index_mac.clone(),
            value_mac: value_mac.clone(),
        };
        dst.put_mutation_macs(name, *version, &[mac]).await?;
    }
    Ok(())
}

/// The protocol part of [`write`]: what whatsapp-rust keeps about groups, devices,
/// messages and contacts.
async fn write_protocol(src: &dyn Backend, rows: &Rows, dst: &dyn Backend) -> Result<()> {
    for (group, device, has_key) in &rows.sender_key_devices {
        dst.set_sender_key_status(group, &[(device.as_str(), *has_key)])
            .await?;
    }
    for (address, message_id, base_key) in &rows.base_keys {
        dst.save_base_key(address, message_id, base_key).await?;
    }
    for user in &rows.device_users {
        if let Some(record) = src.get_devices(user).await? {
            dst.update_device_list(record).await?;
        }
    }
    for (group, info) in &rows.group_metadata {
        dst.put_group_metadata(group, info).await?;
    }
    for (chat, id, payload) in &rows.sent_messages {
        dst.store_sent_message(chat, id, payload).await?;
    }
    let inbound: Vec<PendingInboundRow<'_>> = rows
        .pending_inbound
        .iter()
        .map(|(chat, sender, id, message)| PendingInboundRow {
            chat,
            sender,
            id,
            message,
        })
        .collect();
    if !inbound.is_empty() {
        dst.store_pending_inbound_batch(&inbound).await?;
    }
    let mut secrets = Vec::with_capacity(rows.msg_secrets.len());
    for (chat, sender, msg_id, secret, expires_at, message_ts) in &rows.msg_secrets {
        secrets.push(MsgSecretEntry {
            chat: Arc::from(chat.as_str()),
            sender: Arc::from(sender.as_str()),
            msg_id: Arc::from(msg_id.as_str()),
            secret: secret.as_slice().try_into().map_err(|_| {
                StoreError::Validation(format!("message secret of {msg_id} has the wrong size"))
            })?,
            expires_at: *expires_at,
            message_ts: *message_ts,
        });
    }
    if !secrets.is_empty() {
        dst.put_msg_secrets(secrets).await?;
    }
    for jid in &rows.tc_token_jids {
        if let Some(entry) = src.get_tc_token(jid).await? {
            dst.put_tc_token(jid, &entry).await?;
        }
    }
    let mappings = src.get_all_lid_mappings().await?;
    if !mappings.is_empty() {
        dst.put_lid_mappings(&mappings).await?;
    }
    Ok(())
}

fn mismatch(what: &str, from: &Rows, to: &Rows) -> StoreError {
    StoreError::Validation(format!(
        "the copy of the WhatsApp keys {what} does not match its source \
         ({} rows listed in the source, {} in the copy)",
        from.len(),
        to.len()
    ))
}

/// A session's rows, listed from PostgreSQL.
async fn session_rows(keys: &PgSessionKeys) -> Result<Rows> {
    let rows = keys.list_rows().await?;
    if !rows.device {
        return Ok(Rows::default());
    }
    rows.complete(keys).await
}

/// A key file's rows (its store must be open on it).
async fn file_rows(store: &SqliteStore, path: &Path) -> Result<Rows> {
    let (path, device_id) = (path.to_path_buf(), store.device_id());
    let rows = tokio::task::spawn_blocking(move || files::list_rows(&path, device_id))
        .await
        .map_err(|e| StoreError::Database(Box::new(e)))??;
    if !rows.device {
        return Ok(Rows::default());
    }
    rows.complete(store).await
}

/// Writes one session's keys in PostgreSQL to a new whatsapp-rust `SqliteStore` file at
/// `path` (which must not exist), checked by listing the file again, and left whole in
/// itself (no `-wal` beside it). Returns the rows
/// copied (0: the session has no device yet, and the file is not made).
pub async fn session_to_file(keys: &PgSessionKeys, path: &Path) -> Result<usize> {
    let rows = session_rows(keys).await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let store = files::create(path).await?;
    let written = write(keys, &rows, &store).await?;
    let copied = file_rows(&store, path).await?;
    drop(store);
    if !copied.same_as(&rows) {
        return Err(mismatch("written to a file", &rows, &copied));
    }
    let sealed = path.to_path_buf();
    tokio::task::spawn_blocking(move || files::seal(&sealed))
        .await
        .map_err(|e| StoreError::Database(Box::new(e)))??;
    Ok(written)
}

/// Replaces one session's keys in PostgreSQL with those of a whatsapp-rust `SqliteStore`
/// file (none, when `path` does not exist). The rows are written under a staging id,
/// checked, then swapped in with one transaction: a failure or a kill half-way leaves the
/// session's old keys (and staging rows, which the boot sweep removes). Returns the rows.
pub async fn file_to_session(keys: &PgKeys, path: &Path, session_id: &str) -> Result<usize> {
    if !path.exists() {
        keys.purge_session(session_id).await?;
        return Ok(0);
    }
    let store = files::open(path).await?;
    let rows = file_rows(&store, path).await?;
    let staging_id = PgKeys::staging_id(session_id);
    keys.purge_session(&staging_id).await?;
    let staging = keys.session(&staging_id);
    let written = write(&store, &rows, &staging).await?;
    drop(store);
    let copied = session_rows(&staging).await?;
    if !copied.same_as(&rows) {
        let _ = keys.purge_session(&staging_id).await;
        return Err(mismatch("written to PostgreSQL", &rows, &copied));
    }
    keys.swap_in(&staging_id, session_id).await?;
    Ok(written)
}
