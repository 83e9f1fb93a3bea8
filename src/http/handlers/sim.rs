//! `POST /api/sim/:id/fault`: inject a fault into a simulated session.

use serde::{Deserialize, Serialize};

use botvisor_actors::{Command, Fault, Persistence, SupervisorMsg};

use super::ask;
use crate::http::errors::{ApiError, SIM_ONLY};
use crate::http::request::json_body;
use crate::http::response::ok;
use crate::http::router::{Answer, Ctx};

#[derive(Deserialize)]
struct FaultBody {
    kind: Option<serde_json::Value>,
}

#[derive(Serialize)]
struct Empty {}

pub async fn fault(c: Ctx) -> Answer {
    let body: Option<FaultBody> = json_body(c.req, false, c.app.request_timeout).await?;
    let fault = body
        .and_then(|b| b.kind)
        .as_ref()
        .and_then(serde_json::Value::as_str)
        .and_then(Fault::parse)
        .ok_or_else(|| {
            ApiError::bad_request("kind must be one of: panic, disconnect, logout, hang")
        })?;
    let user_id = c.id.clone();
    ask(&c.app, Command::Fault, |reply| SupervisorMsg::Fault {
        user_id,
        fault,
        reply,
    })
    .await?;
    tracing::info!(user_id = %c.id, ?fault, "fault injected");
    Ok(ok(&Empty {}))
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SentList<'a> {
    user_id: &'a str,
    messages: Vec<crate::link::sim::SentMessage>,
}

/// `GET /api/sim/:id/messages`: what a simulated session sent, oldest first.
pub async fn sent(c: Ctx) -> Answer {
    let sim = simulated(&c)?;
    super::must_exist(&c.app, &c.id)?;
    Ok(ok(&SentList {
        user_id: &c.id,
        messages: sim.sent(&c.id),
    }))
}

#[derive(Deserialize)]
struct InboundBody {
    from: Option<serde_json::Value>,
    text: Option<serde_json::Value>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Delivered<'a> {
    message_id: &'a str,
    user_id: &'a str,
}

/// `POST /api/sim/:id/inbound`: a message arrives for a simulated session, as if someone
/// wrote to the bot (it goes through the session like a real one: webhooks see it).
pub async fn inbound(c: Ctx) -> Answer {
    let sim = simulated(&c)?;
    let user_id = c.id.clone();
    let body: InboundBody = json_body(c.req, false, c.app.request_timeout)
        .await?
        .ok_or_else(|| ApiError::bad_request("from and text are required"))?;
    let from = body
        .from
        .as_ref()
        .and_then(serde_json::Value::as_str)
        .filter(|f| crate::http::handlers::messages::valid_recipient(f))
        .ok_or_else(|| ApiError::bad_request("from must be a phone number (digits) or a JID"))?
        .to_string();
    let text = body
        .text
        .as_ref()
        .and_then(serde_json::Value::as_str)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::bad_request("text must be a non-empty string"))?
        .to_string();
    super::must_exist(&c.app, &user_id)?;
    // Refused, not accepted and dropped, when the webhooks are behind.
    if !c.app.store.webhook_room(&user_id) {
        return Ok(ApiError::backlog_full());
    }
    let msg = sim
        .deliver(&user_id, &from, &text)
        .map_err(|e| ApiError::new(hyper::StatusCode::CONFLICT, e.to_string()))?;
    // Its message.received event is on disk before the answer, as the real link keeps a
    // message before it acknowledges it.
    c.app.store.inbound(&user_id, &msg);
    c.app.store.flush().await?;
    Ok(ok(&Delivered {
        message_id: &msg.id,
        user_id: &user_id,
    }))
}

fn simulated(c: &Ctx) -> Result<std::sync::Arc<crate::link::sim::SimLink>, ApiError> {
    c.app
        .sim
        .clone()
        .ok_or_else(|| ApiError::not_found(SIM_ONLY))
}
