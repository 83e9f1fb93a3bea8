//! Response bodies: the body type, JSON serialization, and the session as the API shows it.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use serde::Serialize;

use botvisor_actors::{now_ms, PairingCode, PairingQr, SessionRecord, SessionState};

use crate::timefmt::iso;

/// A response body: whole (JSON, pages) or streamed (the event stream).
pub type Body = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

/// A whole body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    use http_body_util::BodyExt;
    Full::new(bytes.into()).boxed()
}

/// A body fed by a channel: it ends when the sending task drops its end.
pub struct ChannelBody(pub tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

/// Chunks a file body is read in, and how many may wait for the client: what one
/// download holds in memory (256 KiB), whatever the file's size.
const FILE_CHUNK: usize = 64 * 1024;
const FILE_CHUNKS_AHEAD: usize = 4;

/// A body read from `file`, from its start, `len` bytes: read on the blocking pool a
/// chunk at a time as the client takes them. A read error ends the body early (the
/// client, told the length, sees it short).
pub fn file_body(file: std::sync::Arc<std::fs::File>, len: u64) -> Body {
    use http_body_util::BodyExt;
    let (tx, rx) = tokio::sync::mpsc::channel(FILE_CHUNKS_AHEAD);
    tokio::task::spawn_blocking(move || {
        use std::os::unix::fs::FileExt;
        let mut at = 0u64;
        while at < len {
            let mut chunk = vec![0u8; FILE_CHUNK.min((len - at) as usize)];
            match file.read_at(&mut chunk, at) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    chunk.truncate(n);
                    at += n as u64;
                    if tx.blocking_send(Bytes::from(chunk)).is_err() {
                        return; // the client went
                    }
                }
            }
        }
    });
    ChannelBody(rx).boxed()
}

/// A JSON response.
pub fn json_response(status: StatusCode, body: &impl Serialize) -> Response<Body> {
    // Serializing our own structs cannot fail (no maps with non-string keys).
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut resp = Response::new(full(bytes));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    resp
}

/// A 200 with a body that is not JSON (a page, an image, the metrics).
pub fn typed(content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(full(body));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// [`typed`], never cached: what it carries is a secret.
pub fn secret_bytes(content_type: &'static str, body: Vec<u8>) -> Response<Body> {
    let mut resp = typed(content_type, body);
    resp.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// `{"success": true, ...body}` with 200.
pub fn ok(body: &impl Serialize) -> Response<Body> {
    json_response(StatusCode::OK, &Success::new(body))
}

/// `{"success": true, ...}` around any body.
#[derive(Serialize)]
pub struct Success<'a, T: Serialize> {
    success: bool,
    #[serde(flatten)]
    body: &'a T,
}

impl<'a, T: Serialize> Success<'a, T> {
    /// Wraps `body`.
    pub fn new(body: &'a T) -> Success<'a, T> {
        Success {
            success: true,
            body,
        }
    }
}

/// `{"message": ...}`.
#[derive(Serialize)]
pub struct Message {
    /// The spec's message.
    pub message: String,
}

/// A session as the API shows it: the spec's four fields, then ours.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionView<'a> {
    user_id: &'a str,
    phone_number: &'a str,
    status: &'static str,
    name: Option<&'a str>,
    state: &'static str,
    desired: &'static str,
    restarts: u32,
    disconnects: u32,
    last_error: Option<&'a str>,
    created_at: String,
    updated_at: String,
    last_seen_at: Option<String>,
    /// The node that runs it (several nodes on one database only).
    #[serde(skip_serializing_if = "Option::is_none")]
    node: Option<&'a str>,
}

impl<'a> SessionView<'a> {
    /// The view of a record that `node` runs (several nodes on one database).
    pub fn on(rec: &'a SessionRecord, node: Option<&'a str>) -> SessionView<'a> {
        SessionView {
            node,
            ..SessionView::of(rec)
        }
    }

    /// The view of a record.
    pub fn of(rec: &'a SessionRecord) -> SessionView<'a> {
        SessionView {
            user_id: &rec.user_id,
            phone_number: &rec.phone_number,
            status: if rec.state == SessionState::Online {
                "online"
            } else {
                "offline"
            },
            name: rec.name.as_deref(),
            state: rec.state.as_str(),
            desired: rec.desired.as_str(),
            restarts: rec.restarts,
            disconnects: rec.disconnects,
            last_error: rec.last_error.as_deref(),
            created_at: iso(rec.created_at_ms),
            updated_at: iso(rec.updated_at_ms),
            last_seen_at: rec.last_seen_at_ms.map(iso),
            node: None,
        }
    }
}

/// The pairing code a session waits with, if it is still valid.
pub fn live_pairing(rec: &SessionRecord) -> Option<&PairingCode> {
    rec.pairing
        .as_ref()
        .filter(|p| rec.state == SessionState::Pairing && p.expires_at_ms > now_ms())
}

/// The QR code a session waits with, if it is still valid. It may come before the
/// pairing code (WhatsApp sends QR refs as soon as an unpaired client connects).
pub fn live_qr(rec: &SessionRecord) -> Option<&PairingQr> {
    rec.qr.as_ref().filter(|q| {
        matches!(rec.state, SessionState::Starting | SessionState::Pairing)
            && q.expires_at_ms > now_ms()
    })
}
