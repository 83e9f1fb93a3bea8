//! A session's keys as a whatsapp-rust `SqliteStore` file, listed table by table (the
//! store's own schema, one device id) for [`super::copy`].

use std::path::Path;

use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags};
use whatsapp_rust::store::SqliteStore;
use whatsapp_rust::wacore::store::error::{Result, StoreError};

use super::copy::{Cell, Listing, Rows, LISTED};

fn db(e: rusqlite::Error) -> StoreError {
    StoreError::Database(Box::new(e))
}

fn url(path: &Path) -> Result<&str> {
    path.to_str()
        .ok_or_else(|| StoreError::InvalidConfig("the key file's path is not UTF-8".into()))
}

/// Creates a key file (0600) at `path`, which must not exist.
pub async fn create(path: &Path) -> Result<SqliteStore> {
    if path.exists() {
        return Err(StoreError::InvalidConfig(format!(
            "{} exists already",
            path.display()
        )));
    }
    crate::paths::create_private_file(path)?;
    SqliteStore::new(url(path)?).await
}

/// Opens an existing key file.
pub async fn open(path: &Path) -> Result<SqliteStore> {
    SqliteStore::new(url(path)?).await
}

/// Makes a key file whole in itself: its write-ahead log folded in and the journal
/// mode back to `DELETE` (whatsapp-rust turns WAL on again when it opens it), so that
/// the file alone can be renamed or copied. Every connection to it must be closed.
pub fn seal(path: &Path) -> Result<()> {
    let conn = Connection::open(path).map_err(db)?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode = DELETE", [], |r| r.get(0))
        .map_err(db)?;
    if !mode.eq_ignore_ascii_case("delete") {
        return Err(StoreError::Validation(format!(
            "{} stays in journal mode {mode} (is it still open?)",
            path.display()
        )));
    }
    Ok(())
}

/// Lists a key file's rows of `device_id`, in one read transaction.
pub fn list_rows(path: &Path, device_id: i32) -> Result<Rows> {
    let mut conn =
        Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(db)?;
    let tx = conn.transaction().map_err(db)?;
    let rows = list(&tx, device_id)?;
    tx.finish().map_err(db)?;
    Ok(rows)
}

/// Each of [`LISTED`]'s listings in SqliteStore's schema.
const LISTINGS: [&str; LISTED] = [
    "SELECT address, key FROM identities WHERE device_id = ?1",
    "SELECT address, record FROM sessions WHERE device_id = ?1",
    "SELECT id, key, uploaded FROM prekeys WHERE device_id = ?1",
    "SELECT id, record FROM signed_prekeys WHERE device_id = ?1",
    "SELECT address, record FROM sender_keys WHERE device_id = ?1",
    // SqliteStore's latest key is the highest id: listed last.
    "SELECT key_id FROM app_state_keys WHERE device_id = ?1 ORDER BY key_id",
    "SELECT name FROM app_state_versions WHERE device_id = ?1",
    "SELECT name, version, index_mac, value_mac FROM app_state_mutation_macs WHERE device_id = ?1",
    "SELECT group_jid, device_jid, has_key FROM sender_key_devices WHERE device_id = ?1",
    "SELECT address, message_id, base_key FROM base_keys WHERE device_id = ?1",
    "SELECT user_id FROM device_registry WHERE device_id = ?1",
    "SELECT group_jid, info FROM group_metadata WHERE device_id = ?1",
    "SELECT chat_jid, message_id, payload FROM sent_messages WHERE device_id = ?1",
    "SELECT chat, sender, id, message FROM pending_inbound_messages WHERE device_id = ?1",
    "SELECT chat, sender, msg_id, secret, expires_at, message_ts FROM msg_secrets \
     WHERE device_id = ?1",
];

fn list(c: &Connection, device: i32) -> Result<Rows> {
    let has_device: bool = c
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM device WHERE id = ?1)",
            [device],
            |r| r.get(0),
        )
        .map_err(db)?;
    let mut listings: [Listing; LISTED] = Default::default();
    for (sql, out) in LISTINGS.iter().zip(listings.iter_mut()) {
        *out = listing(c, sql, device).map_err(db)?;
    }
    Rows::from_listings(has_device, &listings)
}

fn listing(c: &Connection, sql: &str, device: i32) -> rusqlite::Result<Listing> {
    let mut statement = c.prepare(sql)?;
    let columns = statement.column_count();
    let rows = statement.query_map([device], |r| {
        (0..columns)
            .map(|i| {
                Ok(match r.get_ref(i)? {
                    ValueRef::Integer(n) => Cell::Int(n),
                    ValueRef::Text(t) => Cell::Text(String::from_utf8_lossy(t).into_owned()),
                    ValueRef::Blob(b) => Cell::Bytes(b.to_vec()),
                    other => {
                        return Err(rusqlite::Error::InvalidColumnType(
                            i,
                            format!("{other:?}"),
                            other.data_type(),
                        ))
                    }
                })
            })
            .collect()
    })?;
    rows.collect()
}
