//! `POST /api/sessions/:id/messages`: send a message from an online session (a text, a
//! location, a contact card or a poll: see `content.rs`), optionally as a reply
//! (`replyTo`, a message the session sent or received).

use std::time::Instant;

use hyper::{Response, StatusCode};
use serde::Serialize;
use serde_json::Value;

use botvisor_actors::{Action, Done, MessageRef, Outgoing, Persistence};

use super::chats::valid_message_id;
use super::{act, wrong_answer};
use crate::db::QueuedRow;
use crate::http::errors::ApiError;
use crate::http::request::{json_body_up_to, valid_phone};
use crate::http::response::{json_response, Body, Success};
use crate::http::router::{Answer, Ctx};
use crate::http::App;

/// Longest text accepted (WhatsApp's own limit is about 65,000 characters).
pub const MAX_TEXT: usize = 4_096;

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Sent<'a> {
    message: &'static str,
    message_id: &'a str,
    user_id: &'a str,
    to: &'a str,
    /// `text`, `location`, `contact` or `poll`.
    kind: &'static str,
    /// Queued (`?queue=true`), not sent yet.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    queued: bool,
}

/// A phone number's digits, or a JID (`<digits>@s.whatsapp.net`, `...@g.us`, `...@lid`).
pub fn valid_recipient(to: &str) -> bool {
    match to.split_once('@') {
        None => valid_phone(to),
        Some((user, server)) => {
            (1..=64).contains(&user.len())
                && user
                    .bytes()
                    .all(|b| b.is_ascii_digit() || b == b'-' || b == b':' || b == b'.')
                && matches!(server, "s.whatsapp.net" | "g.us" | "lid" | "newsletter")
        }
    }
}

/// A non-empty text of at most [`MAX_TEXT`] characters.
pub fn text_of(v: Option<Value>) -> Result<String, ApiError> {
    match v {
        Some(Value::String(s)) if !s.trim().is_empty() && s.chars().count() <= MAX_TEXT => Ok(s),
        Some(Value::String(s)) if !s.trim().is_empty() => Err(ApiError::bad_request(format!(
            "text is too long ({} characters; at most {MAX_TEXT})",
            s.chars().count()
        ))),
        _ => Err(ApiError::bad_request("text must be a non-empty string")),
    }
}

/// A message the session sent or received, as the network names it; 404 when botvisor
/// does not know it.
pub async fn known_message(app: &App, user_id: &str, id: &str) -> Result<MessageRef, ApiError> {
    let m = known_row(app, user_id, id).await?;
    Ok(MessageRef {
        chat: m.chat,
        id: m.message_id,
        from_me: m.from_me,
        author: m.author,
    })
}

/// What botvisor remembers of a message (404 when nothing).
pub async fn known_row(
    app: &App,
    user_id: &str,
    id: &str,
) -> Result<crate::db::MessageRow, ApiError> {
    match app.store.message(user_id, id).await? {
        Some(m) => Ok(m),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "Message {id} is not known to session {user_id} (botvisor remembers the \
                 messages a session sent or received in the last 30 days)"
            ),
        )),
    }
}

/// 429 with `Retry-After` when the session is past `--send-rate` (a send, or a number
/// check, takes one from its bucket); `None` when it may go on.
pub fn over_send_rate(app: &App, user_id: &str) -> Option<Response<Body>> {
    let wait = app.send_limit.take(user_id, Instant::now()).err()?;
    let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
    let resp = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        format!(
            "Session {user_id} is sending faster than --send-rate ({} a minute); retry in {secs} s",
            app.send_rate
        ),
    )
    .response_retry_after(secs);
    Some(resp)
}

/// `?queue=true` (or `1`): the send goes to the session's durable outbound queue.
fn wants_queue(uri: &hyper::Uri) -> Result<bool, ApiError> {
    let asked = uri
        .query()
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|kv| kv.strip_prefix("queue="));
    match asked {
        None | Some("false") | Some("0") => Ok(false),
        Some("true") | Some("1") => Ok(true),
        Some(_) => Err(ApiError::bad_request("queue must be true or false")),
    }
}

/// The query's parameters, `%XX` and `+` decoded (`None`: a bad escape).
fn query_params(uri: &hyper::Uri) -> Result<serde_json::Map<String, Value>, ApiError> {
    let mut params = serde_json::Map::new();
    for pair in uri.query().unwrap_or_default().split('&') {
        if pair.is_empty() {
            continue;
        }
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let decode = |s: &str| crate::http::router::percent_decoded(&s.replace('+', " "));
        match (decode(k), decode(v)) {
            (Some(k), Some(v)) => {
                params.insert(k, Value::String(v));
            }
            _ => return Err(ApiError::bad_request("the query has a bad %-escape")),
        }
    }
    Ok(params)
}

/// `POST …/messages/upload?kind=<image|video|audio|document|sticker>&to=…` with the media
/// as the body (any `Content-Type` but JSON: the media's MIME type;
/// `application/octet-stream` says nothing, so the type is then sniffed): streamed into a
/// temporary file as it arrives, never whole in memory, bounded by `--media-max-bytes` and
/// `--media-fetch-timeout`. `caption`, `filename`, `voice`, `replyTo` ride in the query.
async fn uploaded(
    req: hyper::Request<hyper::body::Incoming>,
    app: &crate::http::App,
    kind: &str,
    params: serde_json::Map<String, Value>,
) -> Result<(serde_json::Map<String, Value>, botvisor_actors::Outgoing), ApiError> {
    if !botvisor_actors::MediaKind::ALL
        .iter()
        .any(|(n, _)| *n == kind)
    {
        return Err(ApiError::bad_request(
            "kind must be image, video, audio, document or sticker (the media is the body)",
        ));
    }
    for key in params.keys() {
        if ![
            "kind", "to", "caption", "filename", "voice", "replyTo", "queue",
        ]
        .contains(&key.as_str())
        {
            return Err(ApiError::bad_request(format!(
                "{key} is not a parameter of an uploaded media (to, kind, caption, filename, voice, replyTo)"
            )));
        }
    }
    let mimetype = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|m| m.trim().to_ascii_lowercase())
        .filter(|m| super::content::valid_mimetype(m) && !m.starts_with("application/json"))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "an uploaded media needs its MIME type as the Content-Type (not JSON)",
            )
        })?;
    let mut details = params.clone();
    if let Some(v) = details.get_mut("voice") {
        *v = match v.as_str() {
            Some("true") | Some("1") => Value::Bool(true),
            Some("false") | Some("0") => Value::Bool(false),
            _ => return Err(ApiError::bad_request("voice must be true or false")),
        };
    }
    let max = app.media.settings.max_bytes;
    let timeout = app.media.settings.fetch_timeout;
    let file = tokio::time::timeout(timeout, crate::http::spool::spool(req.into_body(), max))
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "The media did not arrive within --media-fetch-timeout ({} s)",
                    timeout.as_secs()
                ),
            )
        })?
        .map_err(|e| {
            e.answer(max, |_| {
                ApiError::bad_request("Could not read the request body")
            })
        })?;
    if file.len == 0 {
        return Err(ApiError::bad_request("the uploaded media is empty"));
    }
    let mimetype = Some(mimetype).filter(|m| !m.starts_with("application/octet-stream"));
    let media = super::content::uploaded_media(kind, &details, mimetype, file)?;
    Ok((params, botvisor_actors::Outgoing::Media(media)))
}

pub async fn send(c: Ctx) -> Answer {
    let queue = wants_queue(c.req.uri())?;
    let limit = c.app.media_body_max();
    let body: serde_json::Map<String, Value> =
        json_body_up_to(c.req, false, c.app.request_timeout, limit)
            .await?
            .ok_or_else(|| ApiError::bad_request("to and text are required"))?;
    let content = super::content::outgoing_of(&body)?;
    send_parsed(&c.app, &c.id, body, content, queue).await
}

/// `POST /api/sessions/:userId/messages/upload?kind=…&to=…`: the media is the body (see
/// [`uploaded`]); answered like a send.
pub async fn upload(c: Ctx) -> Answer {
    let params = query_params(c.req.uri())?;
    if wants_queue(c.req.uri())? {
        return Err(ApiError::bad_request(
            "a media uploaded as the body cannot be queued: give it by url (or as data in a \
             JSON body to POST …/messages) to queue it",
        ));
    }
    let kind = params
        .get("kind")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| {
            ApiError::bad_request("kind is required: image, video, audio, document or sticker")
        })?;
    // Nothing is read for a session that does not exist.
    super::must_exist(&c.app, &c.id)?;
    let (params, content) = uploaded(c.req, &c.app, &kind, params).await?;
    send_parsed(&c.app, &c.id, params, content, false).await
}

/// A send once its body is read: `body` gives `to`, `replyTo` and `mentions`, `content`
/// what goes.
async fn send_parsed(
    app: &std::sync::Arc<crate::http::App>,
    user_id: &str,
    body: serde_json::Map<String, Value>,
    content: botvisor_actors::Outgoing,
    queue: bool,
) -> Answer {
    let to = match body.get("to").cloned() {
        Some(Value::String(s)) if valid_recipient(&s) => s,
        None | Some(Value::Null) => return Err(ApiError::bad_request("to is required")),
        Some(_) => {
            return Err(ApiError::bad_request(
                "to must be a phone number with the country code (digits only, e.g. 15551234567) or a WhatsApp JID",
            ))
        }
    };
    let mentions = super::content::mentions_of(&body, &content)?;
    let reply_to = match body.get("replyTo").cloned() {
        None | Some(Value::Null) => None,
        Some(Value::String(id)) if valid_message_id(&id) => Some(id),
        Some(_) => {
            return Err(ApiError::bad_request(
                "replyTo must be the id of a message the session sent or received",
            ))
        }
    };
    if reply_to.is_some() && matches!(content, botvisor_actors::Outgoing::Poll(_)) {
        return Err(ApiError::bad_request(
            "replyTo cannot be used with a poll (WhatsApp sends polls on their own)",
        ));
    }
    // No bucket and no event for a session that does not exist (ids are free to invent).
    super::must_exist(app, user_id)?;
    let reply_to = match reply_to {
        None => None,
        // 404 like the message routes: the message named does not exist here.
        Some(id) => Some(known_message(app, user_id, &id).await.map_err(|e| {
            if e.status == StatusCode::NOT_FOUND {
                ApiError::new(StatusCode::NOT_FOUND, format!("replyTo: {}", e.message))
            } else {
                e
            }
        })?),
    };
    if queue {
        return enqueue(app, user_id, body, &to, &content).await;
    }
    if let Some(refused) = over_send_rate(app, user_id) {
        return Ok(refused);
    }
    if !app.store.webhook_room(user_id) {
        return Ok(ApiError::backlog_full());
    }
    // Media by URL is fetched now (bounded), and its type settled.
    let content = super::media::fetched(&app.media, content).await?;
    let kind = content.kind();
    let action = Action::Send {
        to: to.clone(),
        content: content.clone(),
        reply_to,
        mentions,
        message_id: None,
    };
    let sent = act(app, user_id, action).await.and_then(|done| match done {
        Done::Sent(id) => Ok(id),
        other => Err(wrong_answer("send", &other)),
    });
    let outcome = sent.as_ref().map_err(|e| e.message.clone());
    // A session deleted meanwhile has no one to tell.
    if !matches!(&sent, Err(e) if e.status == StatusCode::NOT_FOUND) {
        app.store.message_event(user_id, &to, &content, &outcome);
    }
    let message_id = sent?;
    app.store
        .sent_message(user_id, &message_id, &crate::link::chat_jid(&to), &content);
    // The message.sent webhook is on disk before the 201: a kill right after loses nothing.
    app.store.flush().await?;
    Ok(json_response(
        StatusCode::CREATED,
        &Success::new(&Sent {
            message: "Message sent",
            message_id: &message_id,
            user_id,
            to: &to,
            kind,
            queued: false,
        }),
    ))
}

/// 202 once the send is committed to the session's outbound queue, with the id its
/// message will have. The queue paces it (`--send-interval`), so no `--send-rate` token
/// is taken.
async fn enqueue(
    app: &std::sync::Arc<App>,
    user_id: &str,
    body: serde_json::Map<String, Value>,
    to: &str,
    content: &Outgoing,
) -> Answer {
    if !app.store.webhook_room(user_id) {
        return Ok(ApiError::backlog_full());
    }
    let row = QueuedRow {
        user_id: user_id.to_string(),
        seq: app.outbound.next_seq(),
        message_id: crate::http::outbound::new_message_id(),
        body: Value::Object(body).to_string(),
        at_ms: botvisor_actors::now_ms(),
    };
    app.store.enqueue(row.clone());
    // Committed before the 202: a kill right after loses nothing.
    app.store.flush().await?;
    let message_id = row.message_id.clone();
    app.outbound.push(app, row);
    Ok(json_response(
        StatusCode::ACCEPTED,
        &Success::new(&Sent {
            message: "Message queued",
            message_id: &message_id,
            user_id,
            to,
            kind: content.kind(),
            queued: true,
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::valid_recipient;

    #[test]
    fn recipients() {
        for good in [
            "15551234567",
            "15551234567@s.whatsapp.net",
            "120363025246125486@g.us",
            "123456@lid",
        ] {
            assert!(valid_recipient(good), "{good}");
        }
        for bad in [
            "",
            "+15551234567",
            "abc",
            "1@example.com",
            "1@s.whatsapp.net@x",
            "../x",
        ] {
            assert!(!valid_recipient(bad), "{bad}");
        }
    }
}
