//! A session's keys as a whatsapp-rust `SqliteStore` file, listed table by table (the
//! store's own schema, one device id) for [`super::copy`].

use std::path::Path;

use rusqlite::{Connection, OpenFlags};
use whatsapp_rust::store::SqliteStore;
use whatsapp_rust::wacore::store::error::{Result, StoreError};

use super::copy::Rows;

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
    let rows = list(&tx, device_id).map_err(db)?;
    tx.finish().map_err(db)?;
    Ok(rows)
}

fn list(c: &Connection, device: i32) -> rusqlite::Result<Rows> {
    let has_device: bool = c.query_row(
        "SELECT EXISTS (SELECT 1 FROM device WHERE id = ?1)",
        [device],
        |r| r.get(0),
    )?;
    Ok(Rows {
        device: has_device,
        identities: all(
            c,
            "SELECT address, key FROM identities WHERE device_id = ?1",
            device,
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?,
        sessions: all(
            c,
            "SELECT address, record FROM sessions WHERE device_id = ?1",
            device,
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?,
        prekeys: all(
            c,
            "SELECT id, key, uploaded FROM prekeys WHERE device_id = ?1",
            device,
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?,
        signed_prekeys: all(
            c,
            "SELECT id, record FROM signed_prekeys WHERE device_id = ?1",
            device,
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?,
        sender_keys: all(
            c,
            "SELECT address, record FROM sender_keys WHERE device_id = ?1",
            device,
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?,
        // SqliteStore's latest key is the highest id: listed last.
        sync_key_ids: all(
            c,
            "SELECT key_id FROM app_state_keys WHERE device_id = ?1 ORDER BY key_id",
            device,
            |r| r.get(0),
        )?,
        version_names: all(
            c,
            "SELECT name FROM app_state_versions WHERE device_id = ?1",
            device,
            |r| r.get(0),
        )?,
        macs: all(
            c,
            "SELECT name, version, index_mac, value_mac FROM app_state_mutation_macs \
             WHERE device_id = ?1",
            device,
            |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64, r.get(2)?, r.get(3)?)),
        )?,
        sender_key_devices: all(
            c,
            "SELECT group_jid, device_jid, has_key FROM sender_key_devices WHERE device_id = ?1",
            device,
            |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? != 0)),
        )?,
        base_keys: all(
            c,
            "SELECT address, message_id, base_key FROM base_keys WHERE device_id = ?1",
            device,
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?,
        device_users: all(
            c,
            "SELECT user_id FROM device_registry WHERE device_id = ?1",
            device,
            |r| r.get(0),
        )?,
        group_metadata: all(
            c,
            "SELECT group_jid, info FROM group_metadata WHERE device_id = ?1",
            device,
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?,
        sent_messages: all(
            c,
            "SELECT chat_jid, message_id, payload FROM sent_messages WHERE device_id = ?1",
            device,
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?,
        pending_inbound: all(
            c,
            "SELECT chat, sender, id, message FROM pending_inbound_messages WHERE device_id = ?1",
            device,
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )?,
        msg_secrets: all(
            c,
            "SELECT chat, sender, msg_id, secret, expires_at, message_ts FROM msg_secrets \
             WHERE device_id = ?1",
            device,
            |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                ))
            },
        )?,
        tc_token_jids: Vec::new(),
        lids: Vec::new(),
    })
}

fn all<T>(
    c: &Connection,
    sql: &str,
    device: i32,
    row: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<Vec<T>> {
    c.prepare(sql)?.query_map([device], row)?.collect()
}
