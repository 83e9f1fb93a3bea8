//! A session's backups: make one, list them, restore one.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use botvisor_actors::{CmdError, Command, RestoreFn, SupervisorMsg};

use super::{ask, must_exist};
use crate::http::errors::ApiError;
use crate::http::request::json_body;
use crate::http::response::ok;
use crate::http::router::{Answer, Ctx};
use crate::link::credentials::DatabaseKeys;
use crate::timefmt::iso;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RestoreBody {
    backup_id: Option<Value>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct BackedUp<'a> {
    message: String,
    user_id: &'a str,
    backup_id: &'a str,
    created_at: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct List<'a> {
    user_id: &'a str,
    backups: Vec<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Restored<'a> {
    message: String,
    user_id: &'a str,
    backup_id: &'a str,
    state: &'static str,
}

/// With `--keys database` a session's keys are rows in PostgreSQL: a backup copies them
/// out to a scratch key file first (whatsapp-rust's own SQLite format, so the backup is
/// the same file whatever the engine), and a restore copies such a file back in. The
/// scratch file goes once the backup or restore is done (or, after a crash, at boot).
fn drop_scratch(file: &std::path::Path) {
    if let Err(e) = crate::paths::remove_sqlite_files(file) {
        tracing::warn!(file = %file.display(), error = %e, "scratch key file not removed");
    }
}

pub async fn create(c: Ctx) -> Answer {
    let rec = c
        .app
        .store
        .view()
        .get(&c.id)
        .ok_or_else(|| ApiError::no_session(&c.id))?;
    let info = match &c.app.database_keys {
        None => c.app.store.backup(rec, None).await?,
        Some(keys) => {
            let file = c.app.store.scratch_file(&c.id, "export").await?;
            let made = match keys.export(&c.id, &file).await {
                Ok(()) => c.app.store.backup(rec, Some(file.clone())).await,
                Err(e) => Err(e.into()),
            };
            drop_scratch(&file);
            made?
        }
    };
    tracing::info!(user_id = %c.id, backup_id = %info.backup_id, "session backed up");
    Ok(ok(&BackedUp {
        message: format!("Session {} backed up", c.id),
        user_id: &c.id,
        backup_id: &info.backup_id,
        created_at: iso(info.created_at_ms),
    }))
}

pub async fn list(c: Ctx) -> Answer {
    must_exist(&c.app, &c.id)?;
    let backups = c.app.store.backups(&c.id).await?;
    Ok(ok(&List {
        user_id: &c.id,
        backups,
    }))
}

pub async fn restore(c: Ctx) -> Answer {
    let body: Option<RestoreBody> = json_body(c.req, true, c.app.request_timeout).await?;
    let wanted = match body.and_then(|b| b.backup_id) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s),
        Some(_) => return Err(ApiError::bad_request("backupId must be a string")),
    };
    must_exist(&c.app, &c.id)?;
    // Refused before the session is stopped: a wrong backup must not cost a restart.
    let (backup_id, apply) = match &c.app.database_keys {
        None => c.app.store.prepare_restore(&c.id, wanted, None).await?,
        Some(keys) => {
            let file = c.app.store.scratch_file(&c.id, "import").await?;
            let (id, apply) = c
                .app
                .store
                .prepare_restore(&c.id, wanted, Some(file.clone()))
                .await?;
            (id, into_database(apply, keys.clone(), c.id.clone(), file))
        }
    };
    let user_id = c.id.clone();
    let rec = ask(&c.app, Command::Stop, |reply| SupervisorMsg::Restore {
        user_id,
        apply,
        by: c.caller.by(),
        reply,
    })
    .await?;
    tracing::info!(user_id = %c.id, %backup_id, "session restored");
    Ok(ok(&Restored {
        message: format!("Session {} restored from backup {backup_id}", c.id),
        user_id: &c.id,
        backup_id: &backup_id,
        state: rec.state.as_str(),
    }))
}

/// A restore whose credentials go to a scratch key file, then into PostgreSQL (while the
/// session is still stopped).
fn into_database(
    apply: RestoreFn,
    keys: std::sync::Arc<DatabaseKeys>,
    user_id: String,
    file: std::path::PathBuf,
) -> RestoreFn {
    Box::new(move |rec| {
        Box::pin(async move {
            let restored = match apply(rec).await {
                Ok(rec) => keys
                    .import(&user_id, &file)
                    .await
                    .map(|()| rec)
                    .map_err(CmdError::Storage),
                Err(e) => Err(e),
            };
            drop_scratch(&file);
            restored
        })
    })
}
