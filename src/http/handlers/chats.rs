//! A session's chats: `POST /api/sessions/:userId/chats/:chatId/read` (read receipts)
//! and `POST /api/sessions/:userId/chats/:chatId/presence` (typing, recording, paused);
//! and its own presence, `POST /api/sessions/:userId/presence` (available, unavailable).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use botvisor_actors::{Action, ChatPresence};

use super::messages::valid_recipient;
use super::{act, must_exist};
use crate::http::errors::ApiError;
use crate::http::request::json_body;
use crate::http::response::ok;
use crate::http::router::{Answer, Ctx};

/// Message ids one read request may carry (WhatsApp's own cap per receipt).
pub const MAX_IDS: usize = 256;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReadBody {
    message_ids: Option<Value>,
    sender: Option<Value>,
}

#[derive(Deserialize)]
struct PresenceBody {
    state: Option<Value>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Taken<'a> {
    message: String,
    user_id: &'a str,
    chat: &'a str,
}

/// The chat of the path: phone digits or a JID.
fn chat(c: &Ctx) -> Result<String, ApiError> {
    if valid_recipient(&c.sub) {
        Ok(c.sub.clone())
    } else {
        Err(ApiError::bad_request(
            "chatId must be a phone number with the country code (digits) or a WhatsApp JID",
        ))
    }
}

/// A message id as WhatsApp makes them: 1 to 128 letters and digits.
pub fn valid_message_id(id: &str) -> bool {
    (1..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// 1 to [`MAX_IDS`] message ids (letters and digits, as WhatsApp makes them).
fn message_ids(v: Option<Value>) -> Result<Vec<String>, ApiError> {
    let refused = || {
        ApiError::bad_request(format!(
            "messageIds must be an array of 1 to {MAX_IDS} message ids (letters and digits)"
        ))
    };
    let Some(Value::Array(items)) = v else {
        return Err(refused());
    };
    if items.is_empty() || items.len() > MAX_IDS {
        return Err(refused());
    }
    items
        .iter()
        .map(|i| match i.as_str() {
            Some(id) if valid_message_id(id) => Ok(id.to_string()),
            _ => Err(refused()),
        })
        .collect()
}

pub async fn read(c: Ctx) -> Answer {
    let chat = chat(&c)?;
    let body: ReadBody = json_body(c.req, false, c.app.request_timeout)
        .await?
        .ok_or_else(|| ApiError::bad_request("messageIds is required"))?;
    let message_ids = message_ids(body.message_ids)?;
    let sender = match body.sender {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if valid_recipient(&s) => Some(s),
        Some(_) => {
            return Err(ApiError::bad_request(
                "sender must be the JID (or phone digits) of who wrote the messages",
            ))
        }
    };
    must_exist(&c.app, &c.id)?;
    let n = message_ids.len();
    let action = Action::MarkRead {
        chat: chat.clone(),
        sender,
        message_ids,
    };
    act(&c.app, &c.id, action).await?;
    Ok(ok(&Taken {
        message: format!("{n} message(s) of {chat} marked read"),
        user_id: &c.id,
        chat: &chat,
    }))
}

pub async fn presence(c: Ctx) -> Answer {
    let chat = chat(&c)?;
    let body: PresenceBody = json_body(c.req, false, c.app.request_timeout)
        .await?
        .ok_or_else(|| ApiError::bad_request("state is required"))?;
    let state = match body.state.as_ref().and_then(Value::as_str) {
        Some("typing") => ChatPresence::Typing,
        Some("recording") => ChatPresence::Recording,
        Some("paused") => ChatPresence::Paused,
        _ => {
            return Err(ApiError::bad_request(
                "state must be \"typing\", \"recording\" or \"paused\"",
            ))
        }
    };
    must_exist(&c.app, &c.id)?;
    act(
        &c.app,
        &c.id,
        Action::ChatPresence {
            chat: chat.clone(),
            state,
        },
    )
    .await?;
    Ok(ok(&Taken {
        message: format!("{state:?} shown in {chat}").to_lowercase(),
        user_id: &c.id,
        chat: &chat,
    }))
}

pub async fn own_presence(c: Ctx) -> Answer {
    let body: PresenceBody = json_body(c.req, false, c.app.request_timeout)
        .await?
        .ok_or_else(|| ApiError::bad_request("state is required"))?;
    let available = match body.state.as_ref().and_then(Value::as_str) {
        Some("available") => true,
        Some("unavailable") => false,
        _ => {
            return Err(ApiError::bad_request(
                "state must be \"available\" or \"unavailable\"",
            ))
        }
    };
    must_exist(&c.app, &c.id)?;
    act(&c.app, &c.id, Action::OwnPresence { available }).await?;
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Shown<'a> {
        message: String,
        user_id: &'a str,
    }
    let state = if available {
        "available"
    } else {
        "unavailable"
    };
    Ok(ok(&Shown {
        message: format!("Session {} shows itself {state}", c.id),
        user_id: &c.id,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_are_bounded_and_plain() {
        assert_eq!(
            message_ids(Some(serde_json::json!(["3EB0ABC", "A1"]))).unwrap(),
            ["3EB0ABC", "A1"]
        );
        for bad in [
            serde_json::json!([]),
            serde_json::json!("3EB0"),
            serde_json::json!([""]),
            serde_json::json!(["a/b"]),
            serde_json::json!([1]),
            serde_json::json!(vec!["A"; MAX_IDS + 1]),
        ] {
            assert!(message_ids(Some(bad.clone())).is_err(), "{bad}");
        }
    }
}
