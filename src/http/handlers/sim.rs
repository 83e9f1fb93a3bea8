//! `POST /api/sim/:id/fault`: inject a fault into a simulated session.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use botvisor_actors::{Command, Fault, Outgoing, Persistence, Refers, SupervisorMsg};

use super::ask;
use super::chats::valid_message_id;
use super::content::{mentions_of, outgoing_of, KINDS};
use super::message_acts::emoji_of;
use super::messages::text_of;
use crate::http::errors::{ApiError, SIM_ONLY};
use crate::http::request::json_body;
use crate::http::response::ok;
use crate::http::router::{Answer, Ctx};
use crate::link::sim::Arrival;

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

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Delivered<'a> {
    message_id: &'a str,
    user_id: &'a str,
}

/// `POST /api/sim/:id/inbound`: a message arrives for a simulated session, as if someone
/// wrote to the bot (it goes through the session like a real one: webhooks see it). The
/// body is a send's (`text`, `location`, `contact` or `poll`, `replyTo`) with `from`, or
/// `from` with one of `reaction` `{messageId, emoji}`, `edit` `{messageId, text}` or
/// `revoke` `{messageId}`.
pub async fn inbound(c: Ctx) -> Answer {
    let sim = simulated(&c)?;
    let user_id = c.id.clone();
    let limit = c.app.media_body_max();
    let body: serde_json::Map<String, Value> =
        crate::http::request::json_body_up_to(c.req, false, c.app.request_timeout, limit)
            .await?
            .ok_or_else(|| ApiError::bad_request("from and text are required"))?;
    let valid = crate::http::handlers::messages::valid_recipient;
    // In a group: `chat` is the group, `author` (or `from`) who wrote in it.
    let chat = match body.get("chat") {
        None => None,
        Some(Value::String(g)) if valid(g) && g.ends_with("@g.us") => Some(g.clone()),
        Some(_) => {
            return Err(ApiError::bad_request(
                "chat must be a group JID (…@g.us); leave it out for a one-to-one chat",
            ))
        }
    };
    let sender = match &chat {
        Some(_) => body.get("author").or_else(|| body.get("from")),
        None => body.get("from"),
    };
    let from = sender
        .and_then(Value::as_str)
        .filter(|f| valid(f))
        .ok_or_else(|| {
            ApiError::bad_request(if chat.is_some() {
                "author must be a phone number (digits) or a user JID: who wrote in the group"
            } else {
                "from must be a phone number (digits) or a JID"
            })
        })?
        .to_string();
    let mut arrival = arrival_of(&c.app, &user_id, &body).await?;
    arrival.push_name = push_name_of(&body)?;
    super::must_exist(&c.app, &user_id)?;
    // Refused, not accepted and dropped, when the webhooks are behind.
    if !c.app.store.webhook_room(&user_id) {
        return Ok(ApiError::backlog_full());
    }
    let msg = sim
        .deliver(&user_id, &from, chat.as_deref(), arrival)
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

/// The longest push name the simulated network takes (WhatsApp's own limit is 25
/// characters; this leaves room for what other clients allow).
const PUSH_NAME_MAX: usize = 100;

/// `pushName`: the name the sender gave WhatsApp, as a received message carries it.
fn push_name_of(body: &serde_json::Map<String, Value>) -> Result<Option<String>, ApiError> {
    match body.get("pushName") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(n))
            if !n.trim().is_empty()
                && n.chars().count() <= PUSH_NAME_MAX
                && !n.chars().any(char::is_control) =>
        {
            Ok(Some(n.clone()))
        }
        Some(_) => Err(ApiError::bad_request(format!(
            "pushName must be a name of 1 to {PUSH_NAME_MAX} characters, without control characters"
        ))),
    }
}

/// What acts on another message, besides a message's own content.
const ACTS: [&str; 4] = ["reaction", "edit", "revoke", "pollVote"];

/// What an inbound body carries, as the real link would report it.
async fn arrival_of(
    app: &crate::http::App,
    user_id: &str,
    body: &serde_json::Map<String, Value>,
) -> Result<Arrival, ApiError> {
    let reply_to = match body.get("replyTo") {
        None => None,
        Some(Value::String(id)) if valid_message_id(id) => Some(id.clone()),
        Some(_) => return Err(ApiError::bad_request("replyTo must be a message id")),
    };
    let acts: Vec<&str> = ACTS
        .iter()
        .copied()
        .filter(|k| body.contains_key(*k))
        .collect();
    let Some(act) = acts.first() else {
        let content = outgoing_of(body)?;
        let mentions = mentions_of(body, &content)?;
        // Media by URL is fetched (under the same bounds as a send's), and described as
        // WhatsApp describes a received one.
        let content = super::media::fetched(&app.media, content).await?;
        let kind = content.kind();
        let (text, media) = match content {
            Outgoing::Text(text) => (Some(text), None),
            Outgoing::Media(m) => {
                // The simulated network keeps received media in memory (capped): a
                // fetched file is read in.
                let bytes = m.load().map_err(|e| {
                    ApiError::new(
                        hyper::StatusCode::INSUFFICIENT_STORAGE,
                        format!("cannot read the media back: {e}"),
                    )
                })?;
                let media = botvisor_actors::ReceivedMedia {
                    mimetype: Some(m.mimetype.clone()),
                    size: m.size(),
                    file_name: m.file_name.clone(),
                    caption: m.caption.clone(),
                    sha256: crate::webhooks::media_sha256(&m),
                    voice: m.voice,
                    locator: None,
                };
                (m.caption, Some((media, bytes)))
            }
            _ => (None, None),
        };
        let (media, media_bytes) = match media {
            Some((m, b)) => (Some(m), b),
            None => (None, None),
        };
        return Ok(Arrival {
            text,
            kind,
            reply_to,
            mentions,
            refers: None,
            media,
            media_bytes,
            push_name: None,
        });
    };
    let others = KINDS.iter().any(|k| body.contains_key(*k)) || acts.len() > 1;
    if others || reply_to.is_some() || body.contains_key("mentions") {
        return Err(ApiError::bad_request(format!(
            "{act} comes alone (with from): not with another of {}, {}, replyTo or mentions",
            ACTS.join(", "),
            KINDS.join(", ")
        )));
    }
    let shape = match *act {
        "reaction" => r#"{"messageId": "...", "emoji": "👍"}"#,
        "edit" => r#"{"messageId": "...", "text": "..."}"#,
        "pollVote" => r#"{"messageId": "...", "options": ["..."]}"#,
        _ => r#"{"messageId": "..."}"#,
    };
    let o = body[*act]
        .as_object()
        .ok_or_else(|| ApiError::bad_request(format!("{act} must be an object: {shape}")))?;
    let message_id = o
        .get("messageId")
        .and_then(Value::as_str)
        .filter(|id| valid_message_id(id))
        .ok_or_else(|| ApiError::bad_request(format!("{act}.messageId must be a message id")))?
        .to_string();
    Ok(match *act {
        "reaction" => Arrival {
            kind: "reaction",
            refers: Some(Refers::Reaction {
                message_id,
                emoji: emoji_of(o.get("emoji").cloned())?,
            }),
            ..Arrival::default()
        },
        "edit" => Arrival {
            text: Some(text_of(o.get("text").cloned())?),
            kind: "text",
            refers: Some(Refers::Edit { message_id }),
            ..Arrival::default()
        },
        "pollVote" => {
            let options = voted(app, user_id, &message_id, o.get("options")).await?;
            Arrival {
                kind: "other",
                refers: Some(Refers::PollVote {
                    message_id,
                    options: Some(options),
                }),
                ..Arrival::default()
            }
        }
        _ => Arrival {
            kind: "other",
            refers: Some(Refers::Revoke { message_id }),
            ..Arrival::default()
        },
    })
}

/// A vote's options: names of the options of a poll the session sent, each once (none:
/// the vote taken back).
async fn voted(
    app: &crate::http::App,
    user_id: &str,
    poll: &str,
    options: Option<&Value>,
) -> Result<Vec<String>, ApiError> {
    let Some(Value::Array(picked)) = options else {
        return Err(ApiError::bad_request(
            "pollVote.options must be an array of the poll's option names (empty: the vote taken back)",
        ));
    };
    let Some(known) = app.store.sent_poll(user_id, poll).await? else {
        return Err(ApiError::not_found(format!(
            "pollVote.messageId {poll} is not a poll this session sent"
        )));
    };
    let mut names: Vec<String> = Vec::with_capacity(picked.len());
    for p in picked {
        match p.as_str() {
            Some(name) if known.iter().any(|k| k == name) && !names.iter().any(|n| n == name) => {
                names.push(name.to_string())
            }
            _ => {
                return Err(ApiError::bad_request(format!(
                    "pollVote.options must name options of the poll, each once: {}",
                    known.join(", ")
                )))
            }
        }
    }
    Ok(names)
}

fn simulated(c: &Ctx) -> Result<std::sync::Arc<crate::link::sim::SimLink>, ApiError> {
    c.app
        .sim
        .clone()
        .ok_or_else(|| ApiError::not_found(SIM_ONLY))
}
