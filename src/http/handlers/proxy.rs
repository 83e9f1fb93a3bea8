//! `/api/sessions/:id/proxy`: the proxy a session's WhatsApp socket goes through. The
//! sessions' own proxies are kept in the `session_proxies` setting of the session
//! database (user id → URL with its password, like the other credentials there); the API
//! and the log only ever show them with the password masked.

use std::collections::HashMap;
use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;

use super::must_exist;
use crate::http::errors::ApiError;
use crate::http::request::json_body;
use crate::http::response::ok;
use crate::http::router::{Answer, Ctx};
use crate::http::App;
use crate::link::proxy::{Proxies, ProxyUrl};
use crate::store::Store;

/// The setting the sessions' own proxies are kept in.
const SETTING: &str = "session_proxies";

/// One save at a time (each writes the whole map as it then is).
static SAVING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Loads the stored proxies of the sessions in `known` into `proxies` (an entry of a
/// session that no longer exists is dropped with the next save).
pub async fn load(
    store: &Store,
    proxies: &Proxies,
    known: &std::collections::HashSet<&str>,
) -> Result<(), botvisor_actors::StorageError> {
    let Some(json) = store.setting(SETTING).await? else {
        return Ok(());
    };
    let stored: HashMap<String, String> = serde_json::from_str(&json).unwrap_or_default();
    for (id, url) in stored {
        match ProxyUrl::parse(&url) {
            Ok(p) if known.contains(id.as_str()) => {
                proxies.set(&id, Some(p));
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(user_id = %id, error = %e, "a stored proxy does not parse; the session connects without it")
            }
        }
    }
    Ok(())
}

/// Reads every session's own proxy again (another node changed one): `proxies` becomes
/// what is stored.
pub async fn reload(store: &Store, proxies: &Proxies) -> Result<(), botvisor_actors::StorageError> {
    let stored: HashMap<String, String> = match store.setting(SETTING).await? {
        Some(json) => serde_json::from_str(&json).unwrap_or_default(),
        None => HashMap::new(),
    };
    for id in proxies.stored().keys() {
        if !stored.contains_key(id) {
            proxies.set(id, None);
        }
    }
    for (id, url) in stored {
        if let Ok(p) = ProxyUrl::parse(&url) {
            proxies.set(&id, Some(p));
        }
    }
    Ok(())
}

/// Writes one session's own proxy as this process has it now (or its absence), in one
/// atomic read-modify-write of the stored map: nodes sharing the database never undo
/// each other's change.
pub async fn save(app: &App, user_id: &str) -> Result<(), ApiError> {
    let _one = SAVING.lock().await;
    let id = user_id.to_string();
    let own = app.proxies.own_of(user_id).map(|p| p.secret_url());
    app.store
        .update_setting(SETTING, move |current| {
            let mut stored: HashMap<String, String> = current
                .map(|json| serde_json::from_str(json).unwrap_or_default())
                .unwrap_or_default();
            match &own {
                Some(url) => stored.insert(id.clone(), url.clone()),
                None => stored.remove(&id),
            };
            serde_json::to_string(&stored).ok()
        })
        .await?;
    Ok(())
}

/// A `proxy` field of a body: `Ok(None)` for absent or null.
pub fn parse_field(v: Option<Value>) -> Result<Option<ProxyUrl>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => ProxyUrl::parse(&s)
            .map(Some)
            .map_err(|e| ApiError::bad_request(format!("proxy: {e}"))),
        Some(_) => Err(ApiError::bad_request(
            "proxy must be a string such as socks5://user:password@host:port, or null",
        )),
    }
}

/// Forgets a deleted session's proxy (its password with it).
pub async fn forget(app: &Arc<App>, user_id: &str) {
    if app.proxies.set(user_id, None).is_some() {
        if let Err(e) = save(app, user_id).await {
            tracing::warn!(%user_id, error = %e.message, "could not forget a deleted session's proxy; it goes with the next save");
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ProxyView<'a> {
    user_id: &'a str,
    /// The session's own proxy, masked; `null`: none.
    proxy: Option<String>,
    /// The proxy it connects through (its own, else `--proxy`), masked.
    effective: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<&'static str>,
}

fn view<'a>(app: &App, id: &'a str, message: Option<&'static str>) -> ProxyView<'a> {
    ProxyView {
        user_id: id,
        proxy: app.proxies.own_of(id).map(|p| p.redacted()),
        effective: app.proxies.for_session(id).map(|p| p.redacted()),
        message,
    }
}

/// `GET /api/sessions/:id/proxy`.
pub async fn get(c: Ctx) -> Answer {
    must_exist(&c.app, &c.id)?;
    Ok(ok(&view(&c.app, &c.id, None)))
}

/// `PUT /api/sessions/:id/proxy` `{"proxy": "socks5://…" | null}`: from the session's
/// next connection on.
pub async fn put(c: Ctx) -> Answer {
    must_exist(&c.app, &c.id)?;
    let app = c.app.clone();
    let required = || ApiError::bad_request("proxy is required (a URL, or null for none)");
    // A map, not a struct: `null` (clear it) and a missing field (a mistake) differ.
    let mut body: serde_json::Map<String, Value> = json_body(c.req, false, app.request_timeout)
        .await?
        .ok_or_else(required)?;
    let raw = body.remove("proxy").ok_or_else(required)?;
    let proxy = parse_field(Some(raw))?;
    let before = app.proxies.set(&c.id, proxy);
    if let Err(e) = save(&app, &c.id).await {
        app.proxies.set(&c.id, before);
        return Err(e);
    }
    Ok(ok(&view(
        &app,
        &c.id,
        Some("Proxy saved; it applies from the session's next connection (stop and start it to apply now)"),
    )))
}
