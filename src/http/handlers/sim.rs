//! `POST /api/sim/:id/fault`: inject a fault into a simulated session.

use serde::{Deserialize, Serialize};

use botvisor_actors::{Command, Fault, SupervisorMsg};

use super::ask;
use crate::http::errors::ApiError;
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
