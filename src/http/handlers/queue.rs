//! `GET /api/sessions/:id/queue`: the sends waiting in a session's outbound queue
//! (`?queue=true`), in the order they will go out.

use serde::Serialize;
use serde_json::{Map, Value};

use super::content::outgoing_of;
use crate::http::response::ok;
use crate::http::router::{Answer, Ctx};

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Waiting {
    message_id: String,
    to: String,
    kind: &'static str,
    /// The one-line summary (a text's text, a poll's question, ...).
    text: String,
    queued_at: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Queue<'a> {
    user_id: &'a str,
    count: usize,
    messages: Vec<Waiting>,
}

pub async fn list(c: Ctx) -> Answer {
    super::must_exist(&c.app, &c.id)?;
    let rows = c.app.store.queued_of(&c.id).await?;
    let messages = rows
        .into_iter()
        .map(|row| {
            let body: Map<String, Value> = serde_json::from_str(&row.body).unwrap_or_default();
            let content = outgoing_of(&body).ok();
            Waiting {
                message_id: row.message_id,
                to: body
                    .get("to")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                kind: content.as_ref().map_or("text", |c| c.kind()),
                text: content.map(|c| c.summary()).unwrap_or_default(),
                queued_at: crate::timefmt::iso(row.at_ms),
            }
        })
        .collect::<Vec<_>>();
    Ok(ok(&Queue {
        user_id: &c.id,
        count: messages.len(),
        messages,
    }))
}
