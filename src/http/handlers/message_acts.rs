//! What a session does to one message it sent or received, named by its id:
//! `POST /api/sessions/:userId/messages/:messageId/reaction` (`{"emoji"}`, `""` removes),
//! `PUT /api/sessions/:userId/messages/:messageId` (a new text, own messages) and
//! `DELETE /api/sessions/:userId/messages/:messageId` (revoke for everyone, own messages).
//! botvisor finds the message's chat and author in what it remembers (`db::MessageRow`).
//! Each takes one token of the session's `--send-rate`: they are sends on the network.

use hyper::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use botvisor_actors::{Action, Done, MessageRef};

use super::chats::valid_message_id;
use super::messages::{known_message, over_send_rate, text_of};
use super::{act, must_exist, wrong_answer};
use crate::http::errors::ApiError;
use crate::http::request::json_body;
use crate::http::response::ok;
use crate::http::router::{Answer, Ctx};
use crate::http::App;

/// Longest reaction accepted, in characters (an emoji with its modifiers and joiners).
const MAX_EMOJI: usize = 16;

#[derive(Deserialize)]
struct ReactionBody {
    emoji: Option<Value>,
}

#[derive(Deserialize)]
struct EditBody {
    text: Option<Value>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Acted<'a> {
    message: &'static str,
    user_id: &'a str,
    message_id: &'a str,
    chat: &'a str,
    /// The network's id of what was sent (the reaction, the edit).
    #[serde(skip_serializing_if = "Option::is_none")]
    sent_id: Option<&'a str>,
}

/// The message of the path (checked before the body is read).
pub(super) fn message_id(c: &Ctx) -> Result<String, ApiError> {
    if valid_message_id(&c.sub) {
        Ok(c.sub.clone())
    } else {
        Err(ApiError::bad_request(
            "messageId must be a message id (1 to 128 letters and digits)",
        ))
    }
}

/// The message, known to the session (which must exist).
async fn target(app: &App, user_id: &str, id: &str) -> Result<MessageRef, ApiError> {
    must_exist(app, user_id)?;
    known_message(app, user_id, id).await
}

/// 409 unless the session wrote the message.
fn own(message: &MessageRef, what: &str) -> Result<(), ApiError> {
    if message.from_me {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "Message {} was not sent by this session: only its own messages can be {what}",
                message.id
            ),
        ))
    }
}

/// One emoji (at most [`MAX_EMOJI`] characters, no spaces or controls), or `""`.
pub fn emoji_of(v: Option<Value>) -> Result<String, ApiError> {
    match v {
        Some(Value::String(e))
            if e.chars().count() <= MAX_EMOJI
                && !e.chars().any(|ch| ch.is_control() || ch.is_whitespace()) =>
        {
            Ok(e)
        }
        _ => Err(ApiError::bad_request(format!(
            "emoji must be one emoji (at most {MAX_EMOJI} characters, no spaces), or \"\" to remove the reaction"
        ))),
    }
}

pub async fn react(c: Ctx) -> Answer {
    let id = message_id(&c)?;
    let body: ReactionBody = json_body(c.req, false, c.app.request_timeout)
        .await?
        .ok_or_else(|| ApiError::bad_request("emoji is required"))?;
    let emoji = emoji_of(body.emoji)?;
    let message = target(&c.app, &c.id, &id).await?;
    if let Some(refused) = over_send_rate(&c.app, &c.id) {
        return Ok(refused);
    }
    let chat = message.chat.clone();
    let removing = emoji.is_empty();
    let sent = match act(&c.app, &c.id, Action::React { message, emoji }).await? {
        Done::Sent(id) => id,
        other => return Err(wrong_answer("reaction", &other)),
    };
    Ok(ok(&Acted {
        message: if removing {
            "Reaction removed"
        } else {
            "Reaction sent"
        },
        user_id: &c.id,
        message_id: &id,
        chat: &chat,
        sent_id: Some(&sent),
    }))
}

pub async fn edit(c: Ctx) -> Answer {
    let id = message_id(&c)?;
    let body: EditBody = json_body(c.req, false, c.app.request_timeout)
        .await?
        .ok_or_else(|| ApiError::bad_request("text is required"))?;
    let text = text_of(body.text)?;
    let message = target(&c.app, &c.id, &id).await?;
    own(&message, "edited")?;
    if let Some(refused) = over_send_rate(&c.app, &c.id) {
        return Ok(refused);
    }
    let chat = message.chat.clone();
    let sent = match act(&c.app, &c.id, Action::Edit { message, text }).await? {
        Done::Sent(id) => id,
        other => return Err(wrong_answer("edit", &other)),
    };
    Ok(ok(&Acted {
        message: "Message edited",
        user_id: &c.id,
        message_id: &id,
        chat: &chat,
        sent_id: Some(&sent),
    }))
}

pub async fn revoke(c: Ctx) -> Answer {
    let id = message_id(&c)?;
    let message = target(&c.app, &c.id, &id).await?;
    own(&message, "revoked")?;
    if let Some(refused) = over_send_rate(&c.app, &c.id) {
        return Ok(refused);
    }
    let chat = message.chat.clone();
    act(&c.app, &c.id, Action::Revoke { message }).await?;
    Ok(ok(&Acted {
        message: "Message revoked",
        user_id: &c.id,
        message_id: &id,
        chat: &chat,
        sent_id: None,
    }))
}
