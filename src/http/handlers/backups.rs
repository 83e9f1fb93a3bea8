//! A session's backups: make one, list them, restore one.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use botvisor_actors::{Command, SupervisorMsg};

use super::{ask, must_exist};
use crate::http::errors::ApiError;
use crate::http::request::json_body;
use crate::http::response::ok;
use crate::http::router::{Answer, Ctx};
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

/// With `--keys database` a session's keys are rows in PostgreSQL, not a file: a backup
/// made of the file alone would restore a session without its keys (or, restored, leave
/// the rows it meant to replace). Refused until backups carry rows too.
fn keys_are_files(app: &crate::http::App) -> Result<(), ApiError> {
    if app.keys_in_database {
        return Err(ApiError::new(
            hyper::StatusCode::NOT_IMPLEMENTED,
            "backups are not available when the WhatsApp keys are kept in PostgreSQL \
             (--keys database): back up the database itself (pg_dump)",
        ));
    }
    Ok(())
}

pub async fn create(c: Ctx) -> Answer {
    let rec = c
        .app
        .store
        .view()
        .get(&c.id)
        .ok_or_else(|| ApiError::no_session(&c.id))?;
    keys_are_files(&c.app)?;
    let info = c.app.store.backup(rec).await?;
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
    keys_are_files(&c.app)?;
    // Refused before the session is stopped: a wrong backup must not cost a restart.
    let (backup_id, apply) = c.app.store.prepare_restore(&c.id, wanted).await?;
    let user_id = c.id.clone();
    let rec = ask(&c.app, Command::Stop, |reply| SupervisorMsg::Restore {
        user_id,
        apply,
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
