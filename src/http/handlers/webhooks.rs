//! `/api/webhooks/dead`: webhook deliveries that gave up, and their replay.

use serde::Serialize;

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

/// `POST /api/webhooks/dead/:id/replay`: back in line, with fresh attempts.
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
