//! Routing and handlers: each request becomes one supervisor message (or one read of the
//! store view) and its reply becomes JSON.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use ractor::rpc::CallResult;
use serde_json::{json, Map, Value};

use botvisor_actors::{now_ms, CmdError, Fault, Reply, SessionRecord, SessionState, SupervisorMsg};

use super::errors::{ApiError, INVALID_USER_ID};
use super::response::{json_response, Body};
use super::{auth, dashboard, App};
use crate::paths;
use crate::store::backup::{restore_into, verify, BackupError};
use crate::timefmt::iso;

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;

enum Route<'a> {
    Dashboard,
    Stats,
    Sessions,
    Session(&'a str),
    Action(&'a str, &'a str),
    SimFault(&'a str),
}

fn parse_route(path: &str) -> Option<Route<'_>> {
    let trimmed = if path.len() > 1 {
        path.strip_suffix('/').unwrap_or(path)
    } else {
        path
    };
    let segs: Vec<&str> = trimmed.split('/').skip(1).collect();
    Some(match segs.as_slice() {
        [""] => Route::Dashboard,
        ["api", "stats"] => Route::Stats,
        ["api", "sessions"] => Route::Sessions,
        ["api", "sessions", id] => Route::Session(id),
        ["api", "sessions", id, action] => Route::Action(id, action),
        ["api", "sim", id, "fault"] => Route::SimFault(id),
        _ => return None,
    })
}

/// `[A-Za-z0-9_-]{1,64}`: also keeps ids safe as file names.
pub fn valid_user_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Digits only, 7 to 15 of them (E.164 without `+`).
pub fn valid_phone(p: &str) -> bool {
    (7..=15).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit())
}

/// The spec's error shape.
pub fn error_response(e: &ApiError) -> Response<Body> {
    json_response(e.status, json!({"success": false, "message": e.message}))
}

fn ok(mut fields: Map<String, Value>) -> Response<Body> {
    fields.insert("success".into(), Value::Bool(true));
    json_response(StatusCode::OK, Value::Object(fields))
}

fn fields(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// A session as the API shows it: the spec's four fields, then ours.
pub fn session_json(rec: &SessionRecord) -> Map<String, Value> {
    fields(json!({
        "userId": rec.user_id,
        "phoneNumber": rec.phone_number,
        "status": if rec.state == SessionState::Online { "online" } else { "offline" },
        "name": rec.name,
        "state": rec.state.as_str(),
        "desired": rec.desired.as_str(),
        "restarts": rec.restarts,
        "disconnects": rec.disconnects,
        "lastError": rec.last_error,
        "createdAt": iso(rec.created_at_ms),
        "updatedAt": iso(rec.updated_at_ms),
        "lastSeenAt": rec.last_seen_at_ms.map(iso),
    }))
}

fn live_pairing(rec: &SessionRecord) -> Option<&botvisor_actors::PairingCode> {
    rec.pairing
        .as_ref()
        .filter(|p| rec.state == SessionState::Pairing && p.expires_at_ms > now_ms())
}

/// Handles one request (everything but CORS, which the caller adds).
pub async fn route(req: Request<Incoming>, app: &Arc<App>) -> Result<Response<Body>, ApiError> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    if let Some(len) = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
    {
        if len
            .trim()
            .parse::<u64>()
            .map_or(true, |n| n > MAX_BODY as u64)
        {
            return Err(too_large());
        }
    }
    let Some(route) = parse_route(&path) else {
        return Err(ApiError::not_found(format!("Not found: {method} {path}")));
    };
    let allowed = match route {
        Route::Dashboard | Route::Stats => "GET",
        Route::Sessions => "GET, POST",
        Route::Session(_) => "GET, DELETE",
        Route::Action(_, "pairing" | "events" | "backups") => "GET",
        Route::Action(_, "start" | "stop" | "logout" | "backup" | "restore") => "POST",
        Route::Action(..) => {
            return Err(ApiError::not_found(format!("Not found: {method} {path}")))
        }
        Route::SimFault(_) if app.link_name != "sim" => {
            return Err(ApiError::not_found(
                "Fault injection is only available with the simulated link (--link sim)",
            ))
        }
        Route::SimFault(_) => "POST",
    };
    if !allowed.split(", ").any(|m| m == method.as_str()) {
        let mut resp = error_response(&ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("Method {method} is not allowed on {path}; use {allowed}"),
        ));
        resp.headers_mut()
            .insert(ALLOW, HeaderValue::from_static(allowed));
        return Ok(resp);
    }
    let guarded = match route {
        Route::Dashboard | Route::Stats | Route::Sessions | Route::Session(_) => {
            method == Method::POST || method == Method::DELETE
        }
        Route::Action(_, action) => action != "events",
        Route::SimFault(_) => true,
    };
    if guarded {
        check_key(&req, app)?;
    }
    let id = match route {
        Route::Session(id) | Route::Action(id, _) | Route::SimFault(id) => {
            if !valid_user_id(id) {
                return Err(ApiError::bad_request(INVALID_USER_ID));
            }
            id
        }
        _ => "",
    };
    match (route, method) {
        (Route::Dashboard, _) => Ok(dashboard::page(&app.store.list())),
        (Route::Stats, _) => Ok(stats(app)),
        (Route::Sessions, Method::GET) => Ok(list(app)),
        (Route::Sessions, _) => create(req, app).await,
        (Route::Session(_), Method::GET) => app
            .store
            .get(id)
            .map(|rec| ok(session_json(&rec)))
            .ok_or_else(|| ApiError::no_session(id)),
        (Route::Session(_), _) => delete(app, id).await,
        (Route::Action(_, "pairing"), _) => pairing(app, id),
        (Route::Action(_, "events"), _) => events(app, id),
        (Route::Action(_, "backups"), _) => list_backups(app, id),
        (Route::Action(_, "start"), _) => start(app, id).await,
        (Route::Action(_, "stop"), _) => stop(app, id).await,
        (Route::Action(_, "logout"), _) => logout(app, id).await,
        (Route::Action(_, "backup"), _) => backup(app, id).await,
        (Route::Action(_, _), _) => restore(req, app, id).await,
        (Route::SimFault(_), _) => fault(req, app, id).await,
    }
}

fn check_key(req: &Request<Incoming>, app: &App) -> Result<(), ApiError> {
    let Some(expected) = &app.api_key else {
        return Ok(());
    };
    match req.headers().get("x-api-key") {
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "Missing API key: send it in the X-API-Key header",
        )),
        Some(given) if auth::keys_match(given.as_bytes(), expected.as_bytes()) => Ok(()),
        Some(_) => Err(ApiError::new(StatusCode::UNAUTHORIZED, "Invalid API key")),
    }
}

fn too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("Request body too large (limit {} KiB)", MAX_BODY / 1024),
    )
}

/// Reads a JSON body: `None` when the body is empty and `optional`.
async fn json_body(req: Request<Incoming>, optional: bool) -> Result<Option<Value>, ApiError> {
    let content_type = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
    let bytes = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                too_large()
            } else {
                ApiError::bad_request("Could not read the request body")
            }
        })?
        .to_bytes();
    if bytes.iter().all(|b| b.is_ascii_whitespace()) && optional && content_type.is_none() {
        return Ok(None);
    }
    if content_type.as_deref() != Some("application/json") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Content-Type must be application/json",
        ));
    }
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        if optional {
            return Ok(None);
        }
        return Err(ApiError::bad_request(
            "Request body is empty; send a JSON object",
        ));
    }
    let value: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("Request body is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::bad_request("Request body must be a JSON object"));
    }
    Ok(Some(value))
}

/// Sends one message to the supervisor and waits for its answer.
async fn ask<T: Send + 'static>(
    app: &App,
    timeout: Duration,
    build: impl FnOnce(Reply<T>) -> SupervisorMsg,
) -> Result<Result<T, CmdError>, ApiError> {
    match app.sup.call(build, Some(timeout)).await {
        Ok(CallResult::Success(r)) => Ok(r),
        Ok(CallResult::Timeout) => Err(ApiError::unavailable("The request timed out; try again")),
        Ok(CallResult::SenderError) | Err(_) => Err(ApiError::unavailable(
            "The supervisor is not available (shutting down?)",
        )),
    }
}

fn stats(app: &App) -> Response<Body> {
    let all = app.store.list();
    ok(fields(json!({
        "activeSessions": all.iter().filter(|r| r.state.is_active()).count(),
        "totalUsers": all.len(),
        "onlineSessions": all.iter().filter(|r| r.state == SessionState::Online).count(),
    })))
}

fn list(app: &App) -> Response<Body> {
    let sessions: Vec<Value> = app
        .store
        .list()
        .iter()
        .map(|r| Value::Object(session_json(r)))
        .collect();
    ok(fields(
        json!({"count": sessions.len(), "sessions": sessions}),
    ))
}

async fn create(req: Request<Incoming>, app: &Arc<App>) -> Result<Response<Body>, ApiError> {
    let body = json_body(req, false).await?.unwrap_or(Value::Null);
    let user_id = match body.get("userId") {
        None | Some(Value::Null) => return Err(ApiError::bad_request("userId is required")),
        Some(Value::String(s)) if valid_user_id(s) => s.clone(),
        Some(_) => return Err(ApiError::bad_request(INVALID_USER_ID)),
    };
    let phone_number = match body.get("phoneNumber") {
        None | Some(Value::Null) => return Err(ApiError::bad_request("phoneNumber is required")),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) if n.is_u64() => n.to_string(),
        Some(_) => String::new(),
    };
    if !valid_phone(&phone_number) {
        return Err(ApiError::bad_request(
            "phoneNumber must be 7 to 15 digits with the country code, no spaces or special characters (e.g. 1234567890)",
        ));
    }
    crate::limits::check_headroom().map_err(ApiError::unavailable)?;
    let t = app.timeouts.create_timeout + app.timeouts.call_timeout;
    let uid = user_id.clone();
    let rec = ask(app, t, |reply| SupervisorMsg::Create {
        user_id: uid,
        phone_number,
        reply,
    })
    .await??;
    let mut out = fields(json!({
        "message": "Session created. Use the pairing code to connect.",
        "pairingCode": live_pairing(&rec).map(|p| p.code.clone()),
        "userId": rec.user_id,
        "expiresAt": live_pairing(&rec).map(|p| iso(p.expires_at_ms)),
    }));
    for (k, v) in session_json(&rec) {
        out.entry(k).or_insert(v);
    }
    out.insert("success".into(), Value::Bool(true));
    Ok(json_response(StatusCode::CREATED, Value::Object(out)))
}

fn pairing(app: &App, id: &str) -> Result<Response<Body>, ApiError> {
    let rec = app.store.get(id).ok_or_else(|| ApiError::no_session(id))?;
    match live_pairing(&rec) {
        Some(p) => Ok(ok(fields(json!({
            "pairingCode": p.code,
            "expiresAt": iso(p.expires_at_ms),
            "userId": rec.user_id,
        })))),
        None => Err(ApiError::not_found(format!(
            "No pairing code is pending for session {id} (state: {}); codes exist only while a session waits to be paired",
            rec.state
        ))),
    }
}

fn events(app: &App, id: &str) -> Result<Response<Body>, ApiError> {
    if app.store.get(id).is_none() {
        return Err(ApiError::no_session(id));
    }
    let events = app.store.events(id, 100).map_err(ApiError::internal)?;
    let list: Vec<Value> = events
        .iter()
        .map(|e| json!({"at": iso(e.at_ms), "state": e.state, "detail": e.detail}))
        .collect();
    Ok(ok(fields(json!({"userId": id, "events": list}))))
}

async fn start(app: &Arc<App>, id: &str) -> Result<Response<Body>, ApiError> {
    let uid = id.to_string();
    let rec = ask(app, app.timeouts.call_timeout, |reply| {
        SupervisorMsg::Start {
            user_id: uid,
            reply,
        }
    })
    .await??;
    Ok(ok(fields(json!({
        "message": "Session started successfully",
        "userId": rec.user_id,
        "state": rec.state.as_str(),
    }))))
}

fn lifecycle_timeout(app: &App, steps: u32) -> Duration {
    app.timeouts.shutdown_timeout * steps + app.timeouts.call_timeout
}

async fn stop(app: &Arc<App>, id: &str) -> Result<Response<Body>, ApiError> {
    let uid = id.to_string();
    ask(app, lifecycle_timeout(app, 2), |reply| {
        SupervisorMsg::Stop {
            user_id: uid,
            reply,
        }
    })
    .await??;
    Ok(ok(fields(
        json!({"message": format!("Session {id} stopped")}),
    )))
}

async fn delete(app: &Arc<App>, id: &str) -> Result<Response<Body>, ApiError> {
    let uid = id.to_string();
    ask(app, lifecycle_timeout(app, 2), |reply| {
        SupervisorMsg::Delete {
            user_id: uid,
            reply,
        }
    })
    .await??;
    remove_backups(app, id);
    Ok(ok(fields(
        json!({"message": format!("Session {id} deleted")}),
    )))
}

async fn logout(app: &Arc<App>, id: &str) -> Result<Response<Body>, ApiError> {
    let uid = id.to_string();
    let warning = ask(app, lifecycle_timeout(app, 3), |reply| {
        SupervisorMsg::Logout {
            user_id: uid,
            reply,
        }
    })
    .await??;
    remove_backups(app, id);
    let mut out = fields(json!({"message": format!("Session {id} logged out and deleted")}));
    if let Some(w) = warning {
        out.insert("warning".into(), Value::String(w));
    }
    Ok(ok(out))
}

fn remove_backups(app: &App, id: &str) {
    if let Err(e) = app.backups.remove_all(id) {
        tracing::error!(user_id = %id, error = %e, "could not remove the session's backups");
    }
}

fn backup_message(e: BackupError) -> String {
    match e {
        BackupError::NotFound(m) | BackupError::Invalid(m) | BackupError::Io(m) => m,
    }
}

async fn backup(app: &Arc<App>, id: &str) -> Result<Response<Body>, ApiError> {
    let rec = app.store.get(id).ok_or_else(|| ApiError::no_session(id))?;
    let backups = app.backups.clone();
    let cred = paths::credentials(&app.data_dir, id);
    let link = app.link_name;
    let info = tokio::task::spawn_blocking(move || backups.create(&rec, &cred, link))
        .await
        .map_err(|e| ApiError::internal(format!("backup failed: {e}")))??;
    tracing::info!(user_id = %id, backup_id = %info.backup_id, "session backed up");
    Ok(ok(fields(json!({
        "message": format!("Session {id} backed up"),
        "userId": id,
        "backupId": info.backup_id,
        "createdAt": iso(info.created_at_ms),
    }))))
}

fn list_backups(app: &App, id: &str) -> Result<Response<Body>, ApiError> {
    if app.store.get(id).is_none() {
        return Err(ApiError::no_session(id));
    }
    Ok(ok(fields(
        json!({"userId": id, "backups": app.backups.list(id)}),
    )))
}

async fn restore(
    req: Request<Incoming>,
    app: &Arc<App>,
    id: &str,
) -> Result<Response<Body>, ApiError> {
    let body = json_body(req, true).await?;
    let wanted = match body.as_ref().and_then(|b| b.get("backupId")) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(ApiError::bad_request("backupId must be a string")),
    };
    if app.store.get(id).is_none() {
        return Err(ApiError::no_session(id));
    }
    let (backup_id, path) = app.backups.find(id, wanted.as_deref())?;
    // Refused before the session is stopped: a wrong backup must not cost a restart.
    verify(&path, id, app.link_name)?;
    let cred = paths::credentials(&app.data_dir, id);
    let link = app.link_name;
    let apply: botvisor_actors::RestoreFn =
        Box::new(move |rec| restore_into(&path, &cred, link, rec).map_err(backup_message));
    let uid = id.to_string();
    let rec = ask(app, lifecycle_timeout(app, 2), |reply| {
        SupervisorMsg::Restore {
            user_id: uid,
            apply,
            reply,
        }
    })
    .await??;
    tracing::info!(user_id = %id, %backup_id, "session restored");
    Ok(ok(fields(json!({
        "message": format!("Session {id} restored from backup {backup_id}"),
        "userId": id,
        "backupId": backup_id,
        "state": rec.state.as_str(),
    }))))
}

async fn fault(
    req: Request<Incoming>,
    app: &Arc<App>,
    id: &str,
) -> Result<Response<Body>, ApiError> {
    let body = json_body(req, false).await?.unwrap_or(Value::Null);
    let fault = body
        .get("kind")
        .and_then(Value::as_str)
        .and_then(Fault::parse)
        .ok_or_else(|| {
            ApiError::bad_request("kind must be one of: panic, disconnect, logout, hang")
        })?;
    let uid = id.to_string();
    let answer = ask(app, app.timeouts.call_timeout, |reply| {
        SupervisorMsg::Fault {
            user_id: uid,
            fault,
            reply,
        }
    })
    .await;
    match answer {
        Ok(result) => {
            result?;
            tracing::info!(user_id = %id, ?fault, "fault injected");
            Ok(ok(Map::new()))
        }
        Err(_) => {
            // The session (not the supervisor, which forwards at once) did not answer.
            let _ = app.sup.cast(SupervisorMsg::Unresponsive {
                user_id: id.to_string(),
                incarnation: None,
                what: "an API call".into(),
            });
            Err(ApiError::unavailable(format!(
                "Session {id} did not answer in time; it is being restarted"
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids() {
        for good in ["bot_1234567890", "a", "A-b_9", &"x".repeat(64)] {
            assert!(valid_user_id(good), "{good}");
        }
        for bad in ["", "..", "a/b", "a.b", "ü", "a b", "%2e", &"x".repeat(65)] {
            assert!(!valid_user_id(bad), "{bad}");
        }
    }

    #[test]
    fn phones() {
        assert!(valid_phone("1234567"));
        assert!(valid_phone("123456789012345"));
        for bad in [
            "123456",
            "1234567890123456",
            "+1234567890",
            "123 4567",
            "١٢٣٤٥٦٧٨",
        ] {
            assert!(!valid_phone(bad), "{bad}");
        }
    }
}
