//! `/api/webhooks/dead`: webhook deliveries that gave up, and their replay; and a
//! session's own receiver (`/api/sessions/:id/webhook`).

use hyper::StatusCode;
use serde::{Deserialize, Serialize};

use crate::http::errors::ApiError;
use crate::http::response::ok;
use crate::http::router::{Answer, Ctx};
use crate::webhooks::DeadLetter;

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
    let dead = c.app.store.dead_letters().await?;
    Ok(ok(&Dead {
        count: dead.len(),
        dead,
    }))
}

/// `POST /api/webhooks/dead/:eventId/replay`: back in line, with fresh attempts.
pub async fn replay(c: Ctx) -> Answer {
    match c.app.store.replay(&c.id).await? {
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
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SessionHook<'a> {
    user_id: &'a str,
    url: Option<String>,
}

/// `GET /api/sessions/:id/webhook`.
pub async fn get_session(c: Ctx) -> Answer {
    super::must_exist(&c.app, &c.id)?;
    Ok(ok(&SessionHook {
        user_id: &c.id,
        url: c.app.store.session_webhook(&c.id),
    }))
}

/// `PUT /api/sessions/:id/webhook` `{"url": ...}`: this session's events also go there.
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
    super::must_exist(&c.app, &id)?;
    if !c
        .app
        .store
        .set_session_webhook(&id, Some(url.clone()))
        .await?
    {
        return Err(no_secret());
    }
    Ok(ok(&SessionHook {
        user_id: &id,
        url: Some(url),
    }))
}

/// `DELETE /api/sessions/:id/webhook`: back to the global receivers only.
pub async fn delete_session(c: Ctx) -> Answer {
    super::must_exist(&c.app, &c.id)?;
    if !c.app.store.set_session_webhook(&c.id, None).await? {
        return Err(no_secret());
    }
    Ok(ok(&SessionHook {
        user_id: &c.id,
        url: None,
    }))
}

fn no_secret() -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "Webhooks need --webhook-secret (BOTVISOR_WEBHOOK_SECRET): every delivery is signed with it",
    )
}
