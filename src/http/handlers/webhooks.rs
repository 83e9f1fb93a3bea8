//! `/api/webhooks/dead`: webhook deliveries that gave up, and their replay; and a
//! session's own receiver (`/api/sessions/:id/webhook`).

use hyper::StatusCode;
use serde::{Deserialize, Serialize};

use crate::http::access::Caller;
use crate::http::errors::ApiError;
use crate::http::response::ok;
use crate::http::router::{Answer, Ctx};
use crate::webhooks::{DeadLetter, EventFilter, OwnReceiver};

#[derive(Serialize)]
struct Dead {
    count: usize,
    dead: Vec<DeadLetter>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Replayed<'a> {
    message: String,
    event_id: &'a str,
}

/// `GET /api/webhooks/dead`: oldest first (at most 1,000).
pub async fn dead(c: Ctx) -> Answer {
    let mut dead = c.app.store.dead_letters().await?;
    dead.retain(|d| c.caller.sees(&d.user_id));
    Ok(ok(&Dead {
        count: dead.len(),
        dead,
    }))
}

/// `POST /api/webhooks/dead/:eventId/replay`: back in line, with fresh attempts.
pub async fn replay(c: Ctx) -> Answer {
    // A scoped key replays only its sessions' letters: another's is "not found" to it.
    let mine = match &c.caller {
        Caller::Key(key) => c
            .app
            .store
            .dead_letters()
            .await?
            .iter()
            .any(|d| d.event_id == c.id && key.sees(&d.user_id)),
        _ => true,
    };
    let revived = if mine {
        c.app.store.replay(&c.id).await?
    } else {
        0
    };
    match revived {
        0 => Err(ApiError::not_found(format!(
            "No dead letter with event id {}",
            c.id
        ))),
        n => Ok(ok(&Replayed {
            message: format!("Event {} queued for delivery again ({n} receiver(s))", c.id),
            event_id: &c.id,
        })),
    }
}

#[derive(Deserialize)]
struct UrlBody {
    url: Option<serde_json::Value>,
    events: Option<serde_json::Value>,
    secret: Option<serde_json::Value>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SessionHook<'a> {
    user_id: &'a str,
    url: Option<String>,
    /// Which events it gets; `null`: every event.
    events: Option<Vec<String>>,
    /// Whether it has a signing secret of its own (never shown).
    own_secret: bool,
}

impl<'a> SessionHook<'a> {
    fn of(user_id: &'a str, own: Option<OwnReceiver>) -> SessionHook<'a> {
        SessionHook {
            user_id,
            events: own
                .as_ref()
                .and_then(|o| o.events.as_ref().map(|f| f.patterns().to_vec())),
            own_secret: own.as_ref().is_some_and(|o| o.secret.is_some()),
            url: own.map(|o| o.url),
        }
    }
}

/// `GET /api/sessions/:id/webhook`.
pub async fn get_session(c: Ctx) -> Answer {
    super::must_exist(&c.app, &c.id)?;
    Ok(ok(&SessionHook::of(
        &c.id,
        c.app.store.session_webhook(&c.id),
    )))
}

/// Shortest secret of a receiver's own (as `--webhook-secret`).
const SECRET_MIN: usize = 16;

/// `PUT /api/sessions/:id/webhook` `{"url", "events"?, "secret"?}`: this session's events
/// (those `events` names, or every one) also go to `url`, signed with `secret` (or
/// `--webhook-secret`).
pub async fn put_session(c: Ctx) -> Answer {
    let id = c.id.clone();
    let body: UrlBody = crate::http::request::json_body(c.req, false, c.app.request_timeout)
        .await?
        .ok_or_else(|| ApiError::bad_request("url is required"))?;
    let url = match body.url {
        Some(serde_json::Value::String(u)) => {
            crate::webhooks::parse_url(&u).map_err(ApiError::bad_request)?
        }
        _ => return Err(ApiError::bad_request("url is required (a string)")),
    };
    let events = match body.events {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::Array(items)) => {
            let names: Option<Vec<&str>> = items.iter().map(|v| v.as_str()).collect();
            let names = names.ok_or_else(|| {
                ApiError::bad_request("events must be a list of event names, e.g. [\"message.*\"]")
            })?;
            Some(
                EventFilter::parse(&names)
                    .map_err(|e| ApiError::bad_request(format!("events: {e}")))?,
            )
        }
        Some(_) => {
            return Err(ApiError::bad_request(
                "events must be a list of event names, e.g. [\"message.*\"]",
            ))
        }
    };
    let secret = match body.secret {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) if (SECRET_MIN..=1_024).contains(&s.chars().count()) => {
            Some(s)
        }
        Some(_) => {
            return Err(ApiError::bad_request(format!(
                "secret must be a string of {SECRET_MIN} to 1024 characters"
            )))
        }
    };
    super::must_exist(&c.app, &id)?;
    let own = OwnReceiver {
        url,
        events,
        secret,
    };
    if !c
        .app
        .store
        .set_session_webhook(&id, Some(own.clone()))
        .await?
    {
        return Err(no_secret());
    }
    Ok(ok(&SessionHook::of(&id, Some(own))))
}

/// `DELETE /api/sessions/:id/webhook`: back to the global receivers only.
pub async fn delete_session(c: Ctx) -> Answer {
    super::must_exist(&c.app, &c.id)?;
    if !c.app.store.set_session_webhook(&c.id, None).await? {
        return Err(no_secret());
    }
    Ok(ok(&SessionHook::of(&c.id, None)))
}

fn no_secret() -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "Webhooks need --webhook-secret (BOTVISOR_WEBHOOK_SECRET): every delivery is signed with it",
    )
}
