//! The route table: each route carries its method, whether it needs the API key, and
//! its handler, in one place. Matching: 404 for an unknown path, 405 (with `Allow`) for
//! a known path with another method, then the key, then the session id.

use std::sync::{Arc, LazyLock};

use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW};
use hyper::{Method, Request, Response, StatusCode};

use botvisor_actors::BoxFuture;

use super::errors::{ApiError, INVALID_EVENT_ID, INVALID_USER_ID, SIM_ONLY};
use super::handlers::{
    backups, chats, contacts, fleet, health, lifecycle, message_acts, messages, queue, sessions,
    sim, stream, webhooks,
};
use super::request::{check_length, valid_user_id};
use super::response::Body;
use super::{auth, App};

/// What a handler gets: the app, the request, the `:id` (or `:eventId`) of its path and
/// its second parameter (`:chatId`, `:messageId`), each "" when the path has none.
pub struct Ctx {
    /// Everything a handler can reach.
    pub app: Arc<App>,
    /// The request (its body is read by handlers that take one).
    pub req: Request<Incoming>,
    /// The session id from the path, already checked.
    pub id: String,
    /// The second parameter (`:chatId`, `:messageId`), percent-decoded; the handler
    /// checks it.
    pub sub: String,
}

/// A handler's answer.
pub type Answer = Result<Response<Body>, ApiError>;
type Handler = fn(Ctx) -> BoxFuture<'static, Answer>;

/// One route.
pub struct Route {
    /// The method it answers.
    pub method: Method,
    /// `/api/sessions/:id/start`: `:id` (a session id) or `:eventId` (a dead letter's
    /// event id) matches one segment.
    pub path: &'static str,
    /// Needs the API key (when one is set).
    pub key: bool,
    /// Only on links that take injected faults.
    pub faults_only: bool,
    /// Open even with `--protect-reads` (health probes: they reveal nothing).
    pub public: bool,
    handler: Handler,
}

const fn route(method: Method, path: &'static str, key: bool, handler: Handler) -> Route {
    Route {
        method,
        path,
        key,
        faults_only: false,
        public: false,
        handler,
    }
}

const fn probe(path: &'static str, handler: Handler) -> Route {
    Route {
        method: Method::GET,
        path,
        key: false,
        faults_only: false,
        public: true,
        handler,
    }
}

/// Every route the API answers. Reads of the fleet and of one session are open; every
/// write, and reads of secrets (pairing codes, backups), need the key.
pub static ROUTES: [Route; 38] = [
    route(Method::GET, "/", false, |c| Box::pin(fleet::dashboard(c))),
    probe("/healthz", |c| Box::pin(health::healthz(c))),
    probe("/readyz", |c| Box::pin(health::readyz(c))),
    route(Method::GET, "/metrics", false, |c| {
        Box::pin(health::metrics(c))
    }),
    route(Method::GET, "/openapi.json", false, |c| {
        Box::pin(health::openapi(c))
    }),
    route(Method::GET, "/api/stats", false, |c| {
        Box::pin(fleet::stats(c))
    }),
    route(Method::GET, "/api/events", false, |c| {
        Box::pin(stream::events(c))
    }),
    route(Method::GET, "/api/audit", true, |c| {
        Box::pin(fleet::audit(c))
    }),
    route(Method::GET, "/api/sessions", false, |c| {
        Box::pin(sessions::list(c))
    }),
    route(Method::POST, "/api/sessions", true, |c| {
        Box::pin(sessions::create(c))
    }),
    route(Method::GET, "/api/sessions/:id", false, |c| {
        Box::pin(sessions::get(c))
    }),
    route(Method::DELETE, "/api/sessions/:id", true, |c| {
        Box::pin(sessions::delete(c))
    }),
    route(Method::GET, "/api/sessions/:id/pairing", true, |c| {
        Box::pin(sessions::pairing(c))
    }),
    route(Method::GET, "/api/sessions/:id/qr", true, |c| {
        Box::pin(sessions::qr(c))
    }),
    route(Method::GET, "/api/sessions/:id/events", false, |c| {
        Box::pin(sessions::events(c))
    }),
    route(Method::POST, "/api/sessions/:id/messages", true, |c| {
        Box::pin(messages::send(c))
    }),
    route(Method::GET, "/api/sessions/:id/queue", false, |c| {
        Box::pin(queue::list(c))
    }),
    route(
        Method::PUT,
        "/api/sessions/:id/messages/:messageId",
        true,
        |c| Box::pin(message_acts::edit(c)),
    ),
    route(
        Method::DELETE,
        "/api/sessions/:id/messages/:messageId",
        true,
        |c| Box::pin(message_acts::revoke(c)),
    ),
    route(
        Method::POST,
        "/api/sessions/:id/messages/:messageId/reaction",
        true,
        |c| Box::pin(message_acts::react(c)),
    ),
    route(Method::POST, "/api/sessions/:id/presence", true, |c| {
        Box::pin(chats::own_presence(c))
    }),
    route(
        Method::POST,
        "/api/sessions/:id/chats/:chatId/read",
        true,
        |c| Box::pin(chats::read(c)),
    ),
    route(
        Method::POST,
        "/api/sessions/:id/chats/:chatId/presence",
        true,
        |c| Box::pin(chats::presence(c)),
    ),
    route(
        Method::POST,
        "/api/sessions/:id/contacts/check",
        true,
        |c| Box::pin(contacts::check(c)),
    ),
    route(Method::GET, "/api/sessions/:id/webhook", true, |c| {
        Box::pin(webhooks::get_session(c))
    }),
    route(Method::PUT, "/api/sessions/:id/webhook", true, |c| {
        Box::pin(webhooks::put_session(c))
    }),
    route(Method::DELETE, "/api/sessions/:id/webhook", true, |c| {
        Box::pin(webhooks::delete_session(c))
    }),
    route(Method::GET, "/api/webhooks/dead", true, |c| {
        Box::pin(webhooks::dead(c))
    }),
    route(
        Method::POST,
        "/api/webhooks/dead/:eventId/replay",
        true,
        |c| Box::pin(webhooks::replay(c)),
    ),
    route(Method::POST, "/api/sessions/:id/start", true, |c| {
        Box::pin(lifecycle::start(c))
    }),
    route(Method::POST, "/api/sessions/:id/stop", true, |c| {
        Box::pin(lifecycle::stop(c))
    }),
    route(Method::POST, "/api/sessions/:id/logout", true, |c| {
        Box::pin(lifecycle::logout(c))
    }),
    route(Method::GET, "/api/sessions/:id/backups", true, |c| {
        Box::pin(backups::list(c))
    }),
    route(Method::POST, "/api/sessions/:id/backup", true, |c| {
        Box::pin(backups::create(c))
    }),
    route(Method::POST, "/api/sessions/:id/restore", true, |c| {
        Box::pin(backups::restore(c))
    }),
    Route {
        method: Method::POST,
        path: "/api/sim/:id/fault",
        key: true,
        faults_only: true,
        public: false,
        handler: |c| Box::pin(sim::fault(c)),
    },
    Route {
        method: Method::GET,
        path: "/api/sim/:id/messages",
        key: true,
        faults_only: true,
        public: false,
        handler: |c| Box::pin(sim::sent(c)),
    },
    Route {
        method: Method::POST,
        path: "/api/sim/:id/inbound",
        key: true,
        faults_only: true,
        public: false,
        handler: |c| Box::pin(sim::inbound(c)),
    },
];

/// The routes' paths split into segments, once.
static SEGMENTS: LazyLock<Vec<Vec<&'static str>>> =
    LazyLock::new(|| ROUTES.iter().map(|r| r.path.split('/').collect()).collect());

/// Matches a split path against a split pattern; `Some((id, sub))`, each "" when the
/// pattern has none.
fn matches<'p>(pattern: &[&str], path: &[&'p str]) -> Option<(&'p str, &'p str)> {
    if pattern.len() != path.len() {
        return None;
    }
    let (mut id, mut sub) = ("", "");
    for (want, got) in pattern.iter().zip(path) {
        match *want {
            ":id" | ":eventId" => id = got,
            ":chatId" | ":messageId" => sub = got,
            w if w == *got => {}
            _ => return None,
        }
    }
    Some((id, sub))
}

/// `%XX` escapes decoded (a JID's `@` may come as `%40`); `None` for a bad escape or
/// bytes that are not UTF-8.
fn percent_decoded(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = segment.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Answers one request (everything but CORS, which the caller adds), with the pattern of
/// the route it matched (for the metrics).
pub async fn dispatch(req: Request<Incoming>, app: Arc<App>) -> (Option<&'static str>, Answer) {
    let mut matched = None;
    let answer = route_and_answer(req, app, &mut matched).await;
    (matched, answer)
}

async fn route_and_answer(
    req: Request<Incoming>,
    app: Arc<App>,
    matched: &mut Option<&'static str>,
) -> Answer {
    check_length(&req)?;
    let method = req.method().clone();
    let raw = req.uri().path();
    let path = if raw.len() > 1 {
        raw.strip_suffix('/').unwrap_or(raw)
    } else {
        raw
    };
    let segments: Vec<&str> = path.split('/').collect();
    let mut found = ROUTES
        .iter()
        .zip(SEGMENTS.iter())
        .filter_map(|(r, pattern)| matches(pattern, &segments).map(|id| (r, id)));
    let Some((first, first_params)) = found.next() else {
        return Err(ApiError::not_found(format!("Not found: {method} {raw}")));
    };
    if first.faults_only && !app.faults {
        return Err(ApiError::not_found(SIM_ONLY));
    }
    let chosen = if first.method == method {
        Some((first, first_params))
    } else {
        found.find(|(r, _)| r.method == method)
    };
    let Some((route, (id, sub))) = chosen else {
        let allowed: Vec<&str> = ROUTES
            .iter()
            .zip(SEGMENTS.iter())
            .filter(|(_, pattern)| matches(pattern, &segments).is_some())
            .map(|(r, _)| r.method.as_str())
            .collect();
        let allowed = allowed.join(", ");
        let mut resp = ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("Method {method} is not allowed on {raw}; use {allowed}"),
        )
        .response();
        if let Ok(v) = HeaderValue::from_str(&allowed) {
            resp.headers_mut().insert(ALLOW, v);
        }
        return Ok(resp);
    };
    *matched = Some(route.path);
    if route.key || (app.protect_reads && !route.public) {
        check_key(&req, &app)?;
    }
    // Event ids share the session ids' alphabet (`evt_` and hex); the refusal names
    // the placeholder the path has.
    if route.path.contains(':') && !valid_user_id(id) {
        let refusal = if route.path.contains(":eventId") {
            INVALID_EVENT_ID
        } else {
            INVALID_USER_ID
        };
        return Err(ApiError::bad_request(refusal));
    }
    let id = id.to_string();
    let sub = percent_decoded(sub).ok_or_else(|| {
        ApiError::bad_request(if route.path.contains(":messageId") {
            "the message id in the path is not valid"
        } else {
            "the chat id in the path is not valid"
        })
    })?;
    (route.handler)(Ctx { app, req, id, sub }).await
}

/// 401 unless the request carries the API key (when one is set).
pub fn check_key(req: &Request<Incoming>, app: &App) -> Result<(), ApiError> {
    let Some(expected) = &app.api_key else {
        return Ok(());
    };
    match auth::given_key(req.headers()) {
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "Missing API key: send it in the X-API-Key header (or as Authorization: Bearer <key>)",
        )),
        Some(given) if auth::keys_match(given, expected.as_bytes()) => Ok(()),
        Some(_) => Err(ApiError::new(StatusCode::UNAUTHORIZED, "Invalid API key")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_capture_their_segments() {
        let m = |pattern: &str, path: &'static str| {
            let p: Vec<&str> = pattern.split('/').collect();
            let s: Vec<&'static str> = path.split('/').collect();
            matches(&p, &s)
        };
        assert_eq!(m("/api/sessions/:id", "/api/sessions/a1"), Some(("a1", "")));
        assert_eq!(
            m("/api/sessions/:id/stop", "/api/sessions/a1/stop"),
            Some(("a1", ""))
        );
        assert_eq!(
            m(
                "/api/sessions/:id/chats/:chatId/read",
                "/api/sessions/a1/chats/1555%40s.whatsapp.net/read"
            ),
            Some(("a1", "1555%40s.whatsapp.net"))
        );
        assert_eq!(m("/api/sessions/:id", "/api/sessions/a/b"), None);
        assert_eq!(m("/api/stats", "/api/stats"), Some(("", "")));
        assert_eq!(m("/", "/"), Some(("", "")));
        assert_eq!(m("/api/sessions/:id", "/api/sessions"), None);
    }

    #[test]
    fn path_segments_are_percent_decoded_or_refused() {
        assert_eq!(
            percent_decoded("1555%40s.whatsapp.net").as_deref(),
            Some("1555@s.whatsapp.net")
        );
        assert_eq!(percent_decoded("plain").as_deref(), Some("plain"));
        assert_eq!(percent_decoded("%4"), None);
        assert_eq!(percent_decoded("%zz"), None);
        assert_eq!(percent_decoded("%ff"), None, "not UTF-8");
    }

    #[test]
    fn every_path_and_method_pair_is_listed_once() {
        for (i, a) in ROUTES.iter().enumerate() {
            for b in &ROUTES[i + 1..] {
                assert!(
                    !(a.path == b.path && a.method == b.method),
                    "{} {} twice",
                    a.method,
                    a.path
                );
            }
        }
    }
}
