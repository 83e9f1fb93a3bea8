//! `/api/sessions`: list, create, one session, delete, its pairing code and its events.

use hyper::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use botvisor_actors::{Command, SupervisorMsg};

use super::{ask, must_exist};
use crate::http::errors::{ApiError, INVALID_USER_ID};
use crate::http::request::{json_body, valid_phone, valid_user_id};
use crate::http::response::{
    json_response, live_pairing, live_qr, ok, secret_bytes, Message, SessionView, Success,
};
use crate::http::router::{Answer, Ctx};
use crate::timefmt::iso;

/// Events shown per session.
const EVENTS_SHOWN: usize = 100;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateBody {
    user_id: Option<Value>,
    phone_number: Option<Value>,
    proxy: Option<Value>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Created<'a> {
    message: &'static str,
    pairing_code: Option<&'a str>,
    expires_at: Option<String>,
    #[serde(flatten)]
    session: SessionView<'a>,
}

#[derive(Serialize)]
struct List<'a> {
    count: usize,
    sessions: Vec<SessionView<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Pairing<'a> {
    pairing_code: &'a str,
    expires_at: String,
    user_id: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Qr<'a> {
    qr: &'a str,
    expires_at: String,
    user_id: &'a str,
}

#[derive(Serialize)]
struct EventView<'a> {
    at: String,
    state: &'a str,
    detail: Option<&'a str>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Events<'a> {
    user_id: &'a str,
    events: Vec<EventView<'a>>,
}

pub async fn list(c: Ctx) -> Answer {
    if let Some(all) = super::fleet::fleet_records(&c.app).await? {
        let sessions: Vec<SessionView> = all
            .iter()
            .filter(|(r, _)| c.caller.sees(&r.user_id))
            .map(|(r, owner)| SessionView::on(r, owner.as_deref()))
            .collect();
        return Ok(ok(&List {
            count: sessions.len(),
            sessions,
        }));
    }
    let all = c.app.store.view().list();
    let sessions: Vec<SessionView> = all
        .iter()
        .filter(|r| c.caller.sees(&r.user_id))
        .map(SessionView::of)
        .collect();
    Ok(ok(&List {
        count: sessions.len(),
        sessions,
    }))
}

pub async fn get(c: Ctx) -> Answer {
    let node = c.app.node.as_ref().map(|n| n.standing.id.as_str());
    c.app
        .store
        .view()
        .read(&c.id, |rec| ok(&SessionView::on(rec, node)))
        .ok_or_else(|| ApiError::no_session(&c.id))
}

pub async fn create(c: Ctx) -> Answer {
    let head = c
        .app
        .node
        .as_ref()
        .map(|_| (c.req.uri().clone(), c.req.headers().clone()));
    let body: CreateBody = json_body(c.req, false, c.app.request_timeout)
        .await?
        .ok_or_else(|| ApiError::bad_request("userId is required"))?;
    let user_id = match body.user_id {
        None | Some(Value::Null) => return Err(ApiError::bad_request("userId is required")),
        Some(Value::String(s)) if valid_user_id(&s) => s,
        Some(_) => return Err(ApiError::bad_request(INVALID_USER_ID)),
    };
    if !c.caller.sees(&user_id) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("This API key may not create a session named {user_id}: it reaches only the sessions it lists"),
        ));
    }
    let phone_number = match body.phone_number {
        None | Some(Value::Null) => return Err(ApiError::bad_request("phoneNumber is required")),
        Some(Value::String(s)) => s,
        Some(Value::Number(n)) if n.is_u64() => n.to_string(),
        // A whole number written as a float (`1234567890.0`, `1.2e9`: what JSON encoders
        // of floats write) is the same number; 15 digits are exact in an f64.
        Some(Value::Number(n))
            if n.as_f64()
                .is_some_and(|f| f.fract() == 0.0 && (0.0..1e15).contains(&f)) =>
        {
            format!("{:.0}", n.as_f64().unwrap_or_default())
        }
        Some(_) => String::new(),
    };
    if !valid_phone(&phone_number) {
        return Err(ApiError::bad_request(
            "phoneNumber must be 7 to 15 digits with the country code, no spaces or special characters (e.g. 1234567890)",
        ));
    }
    if let (Some(node), Some(head)) = (&c.app.node, &head) {
        if let Some(answer) =
            place(node, head, &user_id, &phone_number, body.proxy.as_ref()).await?
        {
            return Ok(answer);
        }
    }
    // A session's own proxy is saved before it first connects (through it), and
    // undone if the create fails.
    let proxy = super::proxy::parse_field(body.proxy)?;
    // With a proxy, one create of an id at a time, and none of an id that exists: its
    // proxy must not be replaced, even for the moment before the refusal.
    let _hold = match &proxy {
        Some(_) => {
            let exists =
                || ApiError::new(StatusCode::CONFLICT, crate::http::errors::SESSION_EXISTS);
            if c.app.store.view().read(&user_id, |_| ()).is_some() {
                return Err(exists());
            }
            Some(c.app.proxies.hold_for_create(&user_id).ok_or_else(exists)?)
        }
        None => None,
    };
    let undo = match proxy {
        Some(p) => {
            let before = c.app.proxies.set(&user_id, Some(p));
            if let Err(e) = super::proxy::save(&c.app, &user_id).await {
                c.app.proxies.set(&user_id, before);
                return Err(e);
            }
            Some((user_id.clone(), before))
        }
        None => None,
    };
    let rec_id = user_id.clone();
    let created = ask(&c.app, Command::Create, |reply| SupervisorMsg::Create {
        user_id,
        phone_number,
        by: c.caller.by(),
        reply,
    })
    .await;
    if let (Err(_), Some(node)) = (&created, &c.app.node) {
        // Nothing was created: the id this node reserved is free again.
        let (n, id) = (node.clone(), rec_id.clone());
        let undone = tokio::task::spawn_blocking(move || n.rows.unreserve(&n.standing, &id)).await;
        if let Ok(Err(e)) = undone {
            tracing::warn!(user_id = %rec_id, error = %e, "could not free a reserved session id");
        }
    }
    let rec = match (created, undo) {
        (Ok(rec), _) => rec,
        (Err(e), Some((user_id, before))) => {
            c.app.proxies.set(&user_id, before);
            if let Err(e) = super::proxy::save(&c.app, &user_id).await {
                tracing::warn!(%user_id, error = %e.message, "could not undo a failed create's proxy; it goes with the next save");
            }
            return Err(e);
        }
        (Err(e), None) => return Err(e),
    };
    let pairing = live_pairing(&rec);
    let node = c.app.node.as_ref().map(|n| n.standing.id.as_str());
    let created = Created {
        message: "Session created. Use the pairing code to connect.",
        pairing_code: pairing.map(|p| p.code.as_str()),
        expires_at: pairing.map(|p| iso(p.expires_at_ms)),
        session: SessionView::on(&rec, node),
    };
    Ok(json_response(StatusCode::CREATED, &Success::new(&created)))
}

/// Several nodes: a create of an id the fleet has is a 409 here, a node fenced answers
/// 503, and a new session goes to the least-loaded live node (this one unless another
/// has fewer sessions, or the create was forwarded here). `None`: create it here.
async fn place(
    node: &std::sync::Arc<crate::nodes::Node>,
    (uri, headers): &(hyper::Uri, hyper::HeaderMap),
    user_id: &str,
    phone_number: &str,
    proxy: Option<&Value>,
) -> Result<Option<hyper::Response<crate::http::response::Body>>, ApiError> {
    if !node.standing.live() {
        return Err(crate::http::forward::fenced(node));
    }
    let draining = node.standing.draining();
    let n = node.clone();
    let rec = botvisor_actors::SessionRecord::new(user_id.to_string(), phone_number.to_string());
    let forwarded = headers.contains_key(crate::http::forward::HOP);
    // Exists: 409. Else the least-loaded node takes it (forwarded), or this one reserves
    // the id (one of two nodes creating it at once gets it, the other answers 409).
    let (exists, elsewhere) = tokio::task::spawn_blocking(move || {
        if n.rows.owner_of(&rec.user_id)?.is_some() {
            return Ok((true, None));
        }
        let elsewhere = if forwarded {
            None
        } else {
            // A draining node takes no new session: any other live node does.
            n.rows
                .less_loaded(&n.standing, if draining { None } else { Some(0) })?
        };
        if elsewhere.is_none() && !n.rows.reserve(&n.standing, &rec)? {
            return Ok((true, None));
        }
        Ok::<_, botvisor_actors::StorageError>((false, elsewhere))
    })
    .await
    .map_err(|e| ApiError::unavailable(format!("cannot place the session: {e}")))??;
    if exists {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            crate::http::errors::SESSION_EXISTS,
        ));
    }
    let Some((_, address)) = elsewhere else {
        return Ok(None);
    };
    let mut body = serde_json::json!({"userId": user_id, "phoneNumber": phone_number});
    if let Some(p) = proxy {
        body["proxy"] = p.clone();
    }
    let (mut parts, ()) = hyper::Request::builder()
        .method(hyper::Method::POST)
        .uri(uri.clone())
        .body(())
        .map_err(|e| ApiError::unavailable(e.to_string()))?
        .into_parts();
    parts.headers = headers.clone();
    parts.headers.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    crate::http::forward::send(node, &address, &parts, body.to_string().into())
        .await
        .map(Some)
}

pub async fn delete(c: Ctx) -> Answer {
    let id = c.id;
    let user_id = id.clone();
    let by = c.caller.by();
    ask(&c.app, Command::Stop, |reply| SupervisorMsg::Delete {
        user_id,
        by,
        reply,
    })
    .await?;
    c.app.send_limit.forget(&id);
    super::proxy::forget(&c.app, &id).await;
    Ok(ok(&Message {
        message: format!("Session {id} deleted"),
    }))
}

pub async fn pairing(c: Ctx) -> Answer {
    let found = c.app.store.view().read(&c.id, |rec| match live_pairing(rec) {
        Some(p) => Ok(ok(&Pairing {
            pairing_code: &p.code,
            expires_at: iso(p.expires_at_ms),
            user_id: &rec.user_id,
        })),
        None => Err(ApiError::not_found(format!(
            "No pairing code is pending for session {} (state: {}); codes exist only while a session waits to be paired",
            c.id, rec.state
        ))),
    });
    found.unwrap_or_else(|| Err(ApiError::no_session(&c.id)))
}

/// How `GET .../qr` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QrFormat {
    Json,
    Svg,
    Png,
}

/// `?format=svg|png|json` wins; otherwise an `Accept` that names only an image.
fn qr_format(req: &hyper::Request<hyper::body::Incoming>) -> Result<QrFormat, ApiError> {
    let asked = req
        .uri()
        .query()
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|kv| kv.strip_prefix("format="));
    match asked {
        Some("json") => return Ok(QrFormat::Json),
        Some("svg") => return Ok(QrFormat::Svg),
        Some("png") => return Ok(QrFormat::Png),
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "format must be json, svg or png (got '{}')",
                other.chars().take(20).collect::<String>()
            )))
        }
        None => {}
    }
    let accept = req
        .headers()
        .get(hyper::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    Ok(if accept.contains("json") || accept.is_empty() {
        QrFormat::Json
    } else if accept.contains("image/svg+xml") {
        QrFormat::Svg
    } else if accept.contains("image/png") {
        QrFormat::Png
    } else {
        QrFormat::Json
    })
}

pub async fn qr(c: Ctx) -> Answer {
    let format = qr_format(&c.req)?;
    let found = c.app.store.view().read(&c.id, |rec| match live_qr(rec) {
        Some(q) => Ok((q.data.clone(), q.expires_at_ms)),
        None => Err(ApiError::not_found(format!(
            "No QR code is pending for session {} (state: {}); QR codes exist only while a session waits to be paired, \
             and WhatsApp issues them for about 160 s per connection: enter the pairing code instead, or stop and start the session for new ones",
            c.id, rec.state
        ))),
    });
    let (data, expires_at_ms) = found.unwrap_or_else(|| Err(ApiError::no_session(&c.id)))?;
    let image_failed =
        |e: crate::qr::QrError| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    Ok(match format {
        QrFormat::Json => ok(&Qr {
            qr: &data,
            expires_at: iso(expires_at_ms),
            user_id: &c.id,
        }),
        QrFormat::Svg => secret_bytes(
            "image/svg+xml",
            crate::qr::svg(&data).map_err(image_failed)?.into_bytes(),
        ),
        QrFormat::Png => secret_bytes("image/png", crate::qr::png(&data).map_err(image_failed)?),
    })
}

pub async fn events(c: Ctx) -> Answer {
    must_exist(&c.app, &c.id)?;
    let events = c.app.store.events(&c.id, EVENTS_SHOWN).await?;
    let events = events
        .iter()
        .map(|e| EventView {
            at: iso(e.at_ms),
            state: &e.state,
            detail: e.detail.as_deref(),
        })
        .collect();
    Ok(ok(&Events {
        user_id: &c.id,
        events,
    }))
}
