//! `GET /api/sessions/:userId/messages/:messageId/media`: the bytes of a media the session
//! received, fetched again from where the network keeps them (WhatsApp's media servers,
//! decrypted by whatsapp-rust; the simulated network's memory) through the session, which
//! must be online. botvisor keeps each received media's locator with the message (30
//! days, like the message), never the bytes.

use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Response, StatusCode};

use botvisor_actors::{Action, Done, Fetched};

use super::message_acts::message_id;
use super::{act, must_exist, wrong_answer};
use crate::http::errors::ApiError;
use crate::http::response::{file_body, full};
use crate::http::router::{Answer, Ctx};

pub async fn download(c: Ctx) -> Answer {
    let id = message_id(&c)?;
    must_exist(&c.app, &c.id)?;
    let row = super::messages::known_row(&c.app, &c.id, &id).await?;
    let Some(locator) = row.media else {
        return Err(ApiError::not_found(format!(
            "Message {id} has no media to download (only received images, videos, audios, \
             documents and stickers have)"
        )));
    };
    let max = c.app.media.settings.max_bytes as u64;
    let too_big = |size: u64| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "The media of message {id} is {size} bytes, more than --media-max-bytes \
                 ({max}) lets botvisor download"
            ),
        )
    };
    if let Some(size) = row.media_size.filter(|s| *s > max) {
        return Err(too_big(size));
    }
    let fetched = match act(&c.app, &c.id, Action::Download { locator }).await? {
        Done::Media(fetched) => fetched,
        other => return Err(wrong_answer("download", &other)),
    };
    let len = fetched.len();
    if len > max {
        return Err(too_big(len));
    }
    let kind = row
        .media_type
        .as_deref()
        .and_then(|t| HeaderValue::from_str(t).ok())
        .unwrap_or(HeaderValue::from_static("application/octet-stream"));
    // A file (the real link's) is streamed from disk; the simulated network's bytes are
    // in memory already.
    let body = match fetched {
        Fetched::Memory(bytes) => full(bytes.as_ref().clone()),
        Fetched::File { file, len } => file_body(file, len),
    };
    let mut resp = Response::new(body);
    resp.headers_mut().insert(CONTENT_TYPE, kind);
    resp.headers_mut()
        .insert(CONTENT_LENGTH, HeaderValue::from(len));
    // A chat's media: for whoever asked, never for a shared cache.
    resp.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("private, no-store"));
    Ok(resp)
}
