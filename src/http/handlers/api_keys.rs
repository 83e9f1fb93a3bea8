//! `/api/keys`: scoped API keys, made, listed and revoked with a key that may do
//! everything (`--api-key`, or a key with the `admin` scope for every session).

use hyper::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::http::access::{check_new, CreateError, Key, NewKey, MAX_KEYS};
use crate::http::errors::ApiError;
use crate::http::request::json_body;
use crate::http::response::{json_response, ok, Success};
use crate::http::router::{Answer, Ctx};
use crate::timefmt::{iso, parse_iso};

/// A note's length limit (characters).
const NOTE_MAX: usize = 500;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateBody {
    scopes: Option<Value>,
    sessions: Option<Value>,
    expires_at: Option<Value>,
    note: Option<Value>,
}

/// A key as the API shows it: never its secret.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct KeyView {
    id: String,
    scopes: Vec<&'static str>,
    sessions: Vec<String>,
    expires_at: Option<String>,
    note: Option<String>,
    created_at: String,
    last_used_at: Option<String>,
}

impl KeyView {
    fn of(k: &Key) -> KeyView {
        KeyView {
            id: k.id.to_string(),
            scopes: k.scope_names(),
            sessions: k.session_entries(),
            expires_at: k.expires_at.map(iso),
            note: k.note.clone(),
            created_at: iso(k.created_at),
            last_used_at: k.last_used().map(iso),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Created {
    message: &'static str,
    /// The secret: shown here once, never again.
    key: String,
    #[serde(flatten)]
    view: KeyView,
}

#[derive(Serialize)]
struct List {
    count: usize,
    keys: Vec<KeyView>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Revoked<'a> {
    message: &'static str,
    id: &'a str,
}

/// A list of strings, or the 400 naming `field`.
fn strings(field: &str, v: Option<Value>) -> Result<Vec<String>, ApiError> {
    let bad = || ApiError::bad_request(format!("{field} must be a list of strings"));
    match v {
        None | Some(Value::Null) => Err(ApiError::bad_request(format!("{field} is required"))),
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|i| match i {
                Value::String(s) => Ok(s),
                _ => Err(bad()),
            })
            .collect(),
        Some(_) => Err(bad()),
    }
}

/// `POST /api/keys`: a new key; its secret is in this answer only.
pub async fn create(c: Ctx) -> Answer {
    if c.app.api_key.is_none() {
        return Err(ApiError::bad_request(
            "Scoped keys need an admin key: start botvisor with --api-key (BOTVISOR_API_KEY)",
        ));
    }
    let body: CreateBody = json_body(c.req, false, c.app.request_timeout)
        .await?
        .ok_or_else(|| ApiError::bad_request("scopes is required"))?;
    let scopes = strings("scopes", body.scopes)?;
    let sessions = strings("sessions", body.sessions)?;
    check_new(&scopes, &sessions).map_err(ApiError::bad_request)?;
    let expires_at = match body.expires_at {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => match parse_iso(&s) {
            Some(t) if t > botvisor_actors::now_ms() => Some(t),
            Some(_) => {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    format!(
                        "expiresAt is in the past: the server's clock reads {}",
                        iso(botvisor_actors::now_ms())
                    ),
                ))
            }
            None => {
                return Err(ApiError::bad_request(
                    "expiresAt must be an ISO 8601 time such as 2027-01-31T00:00:00Z",
                ))
            }
        },
        Some(_) => {
            return Err(ApiError::bad_request(
                "expiresAt must be an ISO 8601 time such as 2027-01-31T00:00:00Z",
            ))
        }
    };
    let note = match body.note {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.chars().count() <= NOTE_MAX => Some(s),
        Some(_) => {
            return Err(ApiError::bad_request(format!(
                "note must be a string of at most {NOTE_MAX} characters"
            )))
        }
    };
    let made = c
        .app
        .keys
        .create(NewKey {
            scopes,
            sessions,
            expires_at,
            note,
        })
        .await;
    let (key, secret) = match made {
        Ok(made) => made,
        Err(CreateError::Full) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("There are {MAX_KEYS} API keys already; revoke some first"),
            ))
        }
        Err(CreateError::Storage(e)) => return Err(e.into()),
    };
    tracing::info!(key = %key.id, by = c.caller.key_id().unwrap_or("admin"), "API key created");
    let created = Created {
        message: "API key created. Keep the key: it is not shown again.",
        key: secret,
        view: KeyView::of(&key),
    };
    Ok(json_response(StatusCode::CREATED, &Success::new(&created)))
}

/// `GET /api/keys`: every key, oldest first, without secrets.
pub async fn list(c: Ctx) -> Answer {
    let keys: Vec<KeyView> = c.app.keys.list().iter().map(|k| KeyView::of(k)).collect();
    Ok(ok(&List {
        count: keys.len(),
        keys,
    }))
}

/// `DELETE /api/keys/:keyId`: refused from the next request on.
pub async fn delete(c: Ctx) -> Answer {
    match c.app.keys.delete(&c.id).await {
        Ok(true) => {
            tracing::info!(key = %c.id, by = c.caller.key_id().unwrap_or("admin"), "API key revoked");
            Ok(ok(&Revoked {
                message: "API key revoked",
                id: &c.id,
            }))
        }
        Ok(false) => Err(ApiError::not_found(format!("No API key with id {}", c.id))),
        Err(e) => Err(ApiError::unavailable(format!(
            "The key is refused from now on, but the revocation could not be saved ({e}); \
             it is saved with the next change of keys"
        ))),
    }
}
