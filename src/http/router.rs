//! The route table: each route carries its method, whether it needs the API key, and
//! its handler, in one place. Matching: 404 for an unknown path, 405 (with `Allow`) for
//! a known path with another method, then the key, then the session id.

use std::sync::{Arc, LazyLock};

use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW};
use hyper::{Method, Request, Response, StatusCode};

use botvisor_actors::BoxFuture;

use super::access::{Caller, Scope};
use super::errors::{
    ApiError, INVALID_EVENT_ID, INVALID_KEY_ID, INVALID_NODE_ID, INVALID_USER_ID, SIM_ONLY,
};
use super::handlers::{
    api_keys, backups, chats, contacts, fleet, groups, health, lifecycle, message_acts, messages,
    proxy, queue, received_media, sessions, sim, stream, webhooks,
};
use super::request::{check_length, valid_user_id, MAX_BODY};
use super::response::Body;
use super::{auth, App};

/// What a handler gets: the app, the request, the `:id` (or `:eventId`) of its path and
/// its second parameter (`:chatId`, `:contactId`, `:messageId`, `:groupId`), each "" when the path has none.
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
    /// Who asks: a scoped key sees only its sessions in what the handler lists.
    pub caller: Caller,
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
    /// What a scoped key needs for it (`None`: nothing, the route reveals nothing).
    pub scope: Option<Scope>,
    handler: Handler,
}

const fn route(
    method: Method,
    path: &'static str,
    key: bool,
    scope: Option<Scope>,
    handler: Handler,
) -> Route {
    Route {
        method,
        path,
        key,
        faults_only: false,
        public: false,
        scope,
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
        scope: None,
        handler,
    }
}

/// Every route the API answers. Reads of the fleet and of one session are open; every
/// write, and reads of secrets (pairing codes, backups), need the key.
pub static ROUTES: [Route; 57] = [
    route(Method::GET, "/", false, None, |c| {
        Box::pin(fleet::dashboard(c))
    }),
    probe("/healthz", |c| Box::pin(health::healthz(c))),
    probe("/readyz", |c| Box::pin(health::readyz(c))),
    route(Method::GET, "/metrics", false, Some(Scope::Read), |c| {
        Box::pin(health::metrics(c))
    }),
    route(Method::GET, "/openapi.json", false, None, |c| {
        Box::pin(health::openapi(c))
    }),
    route(Method::GET, "/api/stats", false, Some(Scope::Read), |c| {
        Box::pin(fleet::stats(c))
    }),
    route(Method::GET, "/api/events", false, Some(Scope::Read), |c| {
        Box::pin(stream::events(c))
    }),
    route(Method::GET, "/api/nodes", false, Some(Scope::Read), |c| {
        Box::pin(fleet::nodes(c))
    }),
    route(
        Method::POST,
        "/api/nodes/:nodeId/drain",
        true,
        Some(Scope::Admin),
        |c| Box::pin(fleet::drain(c)),
    ),
    route(Method::GET, "/api/audit", true, Some(Scope::Admin), |c| {
        Box::pin(fleet::audit(c))
    }),
    route(
        Method::GET,
        "/api/sessions",
        false,
        Some(Scope::Read),
        |c| Box::pin(sessions::list(c)),
    ),
    route(
        Method::POST,
        "/api/sessions",
        true,
        Some(Scope::Control),
        |c| Box::pin(sessions::create(c)),
    ),
    route(
        Method::GET,
        "/api/sessions/:id",
        false,
        Some(Scope::Read),
        |c| Box::pin(sessions::get(c)),
    ),
    route(
        Method::DELETE,
        "/api/sessions/:id",
        true,
        Some(Scope::Delete),
        |c| Box::pin(sessions::delete(c)),
    ),
    route(
        Method::GET,
        "/api/sessions/:id/pairing",
        true,
        Some(Scope::Pairing),
        |c| Box::pin(sessions::pairing(c)),
    ),
    route(
        Method::GET,
        "/api/sessions/:id/qr",
        true,
        Some(Scope::Pairing),
        |c| Box::pin(sessions::qr(c)),
    ),
    route(
        Method::GET,
        "/api/sessions/:id/events",
        false,
        Some(Scope::Read),
        |c| Box::pin(sessions::events(c)),
    ),
    route(
        Method::POST,
        "/api/sessions/:id/messages",
        true,
        Some(Scope::Send),
        |c| Box::pin(messages::send(c)),
    ),
    route(
        Method::GET,
        "/api/sessions/:id/queue",
        false,
        Some(Scope::Read),
        |c| Box::pin(queue::list(c)),
    ),
    route(
        Method::POST,
        "/api/sessions/:id/messages/upload",
        true,
        Some(Scope::Send),
        |c| Box::pin(messages::upload(c)),
    ),
    route(
        Method::PUT,
        "/api/sessions/:id/messages/:messageId",
        true,
        Some(Scope::Send),
        |c| Box::pin(message_acts::edit(c)),
    ),
    route(
        Method::DELETE,
        "/api/sessions/:id/messages/:messageId",
        true,
        Some(Scope::Send),
        |c| Box::pin(message_acts::revoke(c)),
    ),
    route(
        Method::GET,
        "/api/sessions/:id/groups",
        false,
        Some(Scope::Read),
        |c| Box::pin(groups::list(c)),
    ),
    route(
        Method::POST,
        "/api/sessions/:id/groups",
        true,
        Some(Scope::Send),
        |c| Box::pin(groups::create(c)),
    ),
    route(
        Method::POST,
        "/api/sessions/:id/groups/join",
        true,
        Some(Scope::Send),
        |c| Box::pin(groups::join(c)),
    ),
    route(
        Method::GET,
        "/api/sessions/:id/groups/:groupId",
        false,
        Some(Scope::Read),
        |c| Box::pin(groups::info(c)),
    ),
    route(
        Method::PATCH,
        "/api/sessions/:id/groups/:groupId",
        true,
        Some(Scope::Send),
        |c| Box::pin(groups::update(c)),
    ),
    route(
        Method::POST,
        "/api/sessions/:id/groups/:groupId/participants",
        true,
        Some(Scope::Send),
        |c| Box::pin(groups::participants(c)),
    ),
    route(
        Method::GET,
        "/api/sessions/:id/groups/:groupId/invite",
        true,
        Some(Scope::Send),
        |c| Box::pin(groups::invite(c)),
    ),
    route(
        Method::DELETE,
        "/api/sessions/:id/groups/:groupId/invite",
        true,
        Some(Scope::Send),
        |c| Box::pin(groups::revoke_invite(c)),
    ),
    route(
        Method::POST,
        "/api/sessions/:id/groups/:groupId/leave",
        true,
        Some(Scope::Send),
        |c| Box::pin(groups::leave(c)),
    ),
    route(
        Method::GET,
        "/api/sessions/:id/messages/:messageId/media",
        false,
        Some(Scope::Read),
        |c| Box::pin(received_media::download(c)),
    ),
    route(
        Method::POST,
        "/api/sessions/:id/messages/:messageId/reaction",
        true,
        Some(Scope::Send),
        |c| Box::pin(message_acts::react(c)),
    ),
    route(
        Method::POST,
        "/api/sessions/:id/presence",
        true,
        Some(Scope::Send),
        |c| Box::pin(chats::own_presence(c)),
    ),
    route(
        Method::POST,
        "/api/sessions/:id/chats/:chatId/read",
        true,
        Some(Scope::Send),
        |c| Box::pin(chats::read(c)),
    ),
    route(
        Method::POST,
        "/api/sessions/:id/chats/:chatId/presence",
        true,
        Some(Scope::Send),
        |c| Box::pin(chats::presence(c)),
    ),
    route(
        Method::POST,
        "/api/sessions/:id/contacts/check",
        true,
        Some(Scope::Send),
        |c| Box::pin(contacts::check(c)),
    ),
    route(
        Method::GET,
        "/api/sessions/:id/contacts/:contactId/profile",
        true,
        Some(Scope::Send),
        |c| Box::pin(contacts::profile(c)),
    ),
    route(
        Method::GET,
        "/api/sessions/:id/webhook",
        true,
        Some(Scope::Webhooks),
        |c| Box::pin(webhooks::get_session(c)),
    ),
    route(
        Method::PUT,
        "/api/sessions/:id/webhook",
        true,
        Some(Scope::Webhooks),
        |c| Box::pin(webhooks::put_session(c)),
    ),
    route(
        Method::DELETE,
        "/api/sessions/:id/webhook",
        true,
        Some(Scope::Webhooks),
        |c| Box::pin(webhooks::delete_session(c)),
    ),
    route(
        Method::GET,
        "/api/sessions/:id/proxy",
        true,
        Some(Scope::Control),
        |c| Box::pin(proxy::get(c)),
    ),
    route(
        Method::PUT,
        "/api/sessions/:id/proxy",
        true,
        Some(Scope::Control),
        |c| Box::pin(proxy::put(c)),
    ),
    route(Method::GET, "/api/keys", true, Some(Scope::Admin), |c| {
        Box::pin(api_keys::list(c))
    }),
    route(Method::POST, "/api/keys", true, Some(Scope::Admin), |c| {
        Box::pin(api_keys::create(c))
    }),
    route(
        Method::DELETE,
        "/api/keys/:keyId",
        true,
        Some(Scope::Admin),
        |c| Box::pin(api_keys::delete(c)),
    ),
    route(
        Method::GET,
        "/api/webhooks/dead",
        true,
        Some(Scope::Webhooks),
        |c| Box::pin(webhooks::dead(c)),
    ),
    route(
        Method::POST,
        "/api/webhooks/dead/:eventId/replay",
        true,
        Some(Scope::Webhooks),
        |c| Box::pin(webhooks::replay(c)),
    ),
    route(
        Method::POST,
        "/api/sessions/:id/start",
        true,
        Some(Scope::Control),
        |c| Box::pin(lifecycle::start(c)),
    ),
    route(
        Method::POST,
        "/api/sessions/:id/stop",
        true,
        Some(Scope::Control),
        |c| Box::pin(lifecycle::stop(c)),
    ),
    route(
        Method::POST,
        "/api/sessions/:id/logout",
        true,
        Some(Scope::Control),
        |c| Box::pin(lifecycle::logout(c)),
    ),
    route(
        Method::GET,
        "/api/sessions/:id/backups",
        true,
        Some(Scope::Control),
        |c| Box::pin(backups::list(c)),
    ),
    route(
        Method::POST,
        "/api/sessions/:id/backup",
        true,
        Some(Scope::Control),
        |c| Box::pin(backups::create(c)),
    ),
    route(
        Method::POST,
        "/api/sessions/:id/restore",
        true,
        Some(Scope::Control),
        |c| Box::pin(backups::restore(c)),
    ),
    Route {
        method: Method::POST,
        path: "/api/sim/:id/fault",
        key: true,
        faults_only: true,
        public: false,
        scope: Some(Scope::Admin),
        handler: |c| Box::pin(sim::fault(c)),
    },
    Route {
        method: Method::GET,
        path: "/api/sim/:id/messages",
        key: true,
        faults_only: true,
        public: false,
        scope: Some(Scope::Admin),
        handler: |c| Box::pin(sim::sent(c)),
    },
    Route {
        method: Method::POST,
        path: "/api/sim/:id/inbound",
        key: true,
        faults_only: true,
        public: false,
        scope: Some(Scope::Admin),
        handler: |c| Box::pin(sim::inbound(c)),
    },
];

/// The routes' paths split into segments, once.
static SEGMENTS: LazyLock<Vec<Vec<&'static str>>> =
    LazyLock::new(|| ROUTES.iter().map(|r| r.path.split('/').collect()).collect());

/// How many literal segments each route's path has: where a path matches a literal
/// (`/groups/join`) and a parameter (`/groups/:groupId`), only the literal's routes count.
static LITERALS: LazyLock<Vec<usize>> = LazyLock::new(|| {
    SEGMENTS
        .iter()
        .map(|p| p.iter().filter(|s| !s.starts_with(':')).count())
        .collect()
});

/// The routes whose pattern matches `segments` and is the most literal of those that
/// do, with their path parameters.
fn candidates<'a>(
    segments: &'a [&'a str],
) -> impl Iterator<Item = (&'static Route, (&'a str, &'a str))> + 'a {
    let best = ROUTES
        .iter()
        .zip(SEGMENTS.iter())
        .zip(LITERALS.iter())
        .filter(|((_, pattern), _)| matches(pattern, segments).is_some())
        .map(|(_, literal)| *literal)
        .max()
        .unwrap_or(0);
    ROUTES
        .iter()
        .zip(SEGMENTS.iter())
        .zip(LITERALS.iter())
        .filter(move |(_, literal)| **literal == best)
        .filter_map(|((r, pattern), _)| matches(pattern, segments).map(|id| (r, id)))
}

/// Matches a split path against a split pattern; `Some((id, sub))`, each "" when the
/// pattern has none.
fn matches<'p>(pattern: &[&str], path: &[&'p str]) -> Option<(&'p str, &'p str)> {
    if pattern.len() != path.len() {
        return None;
    }
    let (mut id, mut sub) = ("", "");
    for (want, got) in pattern.iter().zip(path) {
        match *want {
            ":id" | ":eventId" | ":keyId" | ":nodeId" => id = got,
            ":chatId" | ":contactId" | ":messageId" | ":groupId" => sub = got,
            w if w == *got => {}
            _ => return None,
        }
    }
    Some((id, sub))
}

/// `%XX` escapes decoded (a JID's `@` may come as `%40`); `None` for a bad escape or
/// bytes that are not UTF-8.
pub fn percent_decoded(segment: &str) -> Option<String> {
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
pub async fn dispatch(req: Request<Incoming>, app: Arc<App>) -> (Matched, Answer) {
    let mut matched = Matched::default();
    let answer = route_and_answer(req, app, &mut matched).await;
    (matched, answer)
}

/// What a request matched: its route, and who it was (once the key was checked).
#[derive(Default)]
pub struct Matched {
    /// The route.
    pub route: Option<&'static Route>,
    /// Who asked.
    pub caller: Option<Caller>,
}

async fn route_and_answer(req: Request<Incoming>, app: Arc<App>, matched: &mut Matched) -> Answer {
    // The largest body any route takes, before anything else; the route's own below.
    check_length(&req, app.media_body_max().max(MAX_BODY))?;
    let method = req.method().clone();
    let raw = req.uri().path();
    let path = if raw.len() > 1 {
        raw.strip_suffix('/').unwrap_or(raw)
    } else {
        raw
    };
    let segments: Vec<&str> = path.split('/').collect();
    let mut found = candidates(&segments);
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
    drop(found);
    let Some((route, (id, sub))) = chosen else {
        let allowed: Vec<&str> = candidates(&segments)
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
    matched.route = Some(route);
    check_length(&req, route.body_max(&app))?;
    let caller = caller_of(
        &req,
        &app,
        route.key || (app.protect_reads && !route.public),
    )?;
    matched.caller = Some(caller.clone());
    // Event and key ids share the session ids' alphabet (`evt_` and hex); the refusal
    // names the placeholder the path has.
    if route.path.contains(':') && !valid_user_id(id) {
        let refusal = if route.path.contains(":eventId") {
            INVALID_EVENT_ID
        } else if route.path.contains(":nodeId") {
            INVALID_NODE_ID
        } else if route.path.contains(":keyId") {
            INVALID_KEY_ID
        } else {
            INVALID_USER_ID
        };
        return Err(ApiError::bad_request(refusal));
    }
    if let Caller::Key(key) = &caller {
        // A session the key may not touch does not exist for it: 404, whatever the scope
        // (no probing of ids).
        if route.path.contains("/:id") && !key.sees(id) {
            return Err(ApiError::no_session(id));
        }
        if let Some(scope) = route.scope {
            if !key.may(scope) {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    format!("This API key does not have the {} scope", scope.name()),
                ));
            }
        }
        if whole_fleet(route) && !key.sees_all() {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "{} covers every session; this API key reaches only some",
                    route.path
                ),
            ));
        }
        app.keys.save_uses_soon(key);
    }
    let id = id.to_string();
    let sub = percent_decoded(sub).ok_or_else(|| {
        ApiError::bad_request(if route.path.contains(":messageId") {
            "the message id in the path is not valid"
        } else {
            "the chat id in the path is not valid"
        })
    })?;
    // Several nodes: a session another node owns is answered there.
    let req = match super::forward::elsewhere(&app, route, &id, req).await {
        Ok(answer) => return answer,
        Err(req) => req,
    };
    (route.handler)(Ctx {
        app,
        req,
        id,
        sub,
        caller,
    })
    .await
}

impl Route {
    /// The largest body it takes: sends (and the simulated network's inbound, which takes
    /// the same bodies) may carry media as base64.
    pub fn body_max(&self, app: &App) -> usize {
        if self.method == Method::POST
            && matches!(
                self.path,
                "/api/sessions/:id/messages" | "/api/sim/:id/inbound"
            )
        {
            app.media_body_max().max(MAX_BODY)
        } else if self.method == Method::POST && self.path == "/api/sessions/:id/messages/upload" {
            // The media itself, streamed to a file as it comes.
            app.media.settings.max_bytes.max(MAX_BODY)
        } else {
            MAX_BODY
        }
    }
}

/// The routes about the whole fleet rather than sessions: only keys that reach every
/// session may use them (the keys, the audit, `/metrics`, the simulated network's).
pub fn whole_fleet(route: &Route) -> bool {
    route.scope == Some(Scope::Admin) || route.path == "/metrics"
}

/// The 401 of a request without a key where one is needed.
pub fn missing_key() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "Missing API key: send it in the X-API-Key header (or as Authorization: Bearer <key>)",
    )
}

/// Who the request is. With no admin key set, everyone is the admin. A key that is given
/// must be valid, on every route (a revoked key is refused at once, even on an open
/// read); without one, only routes that do not `need` a key are reached.
fn caller_of(req: &Request<Incoming>, app: &App, need: bool) -> Result<Caller, ApiError> {
    let Some(expected) = &app.api_key else {
        return Ok(Caller::Admin);
    };
    let refused = |why: &str| ApiError::new(StatusCode::UNAUTHORIZED, why.to_string());
    match auth::given_key(req.headers()) {
        None if need => Err(missing_key()),
        None => Ok(Caller::Anonymous),
        Some(given) if auth::keys_match(given, expected.as_bytes()) => Ok(Caller::Admin),
        Some(given) => match app.keys.check(given) {
            Some(Ok(key)) => Ok(Caller::Key(key)),
            Some(Err(why)) => Err(refused(why)),
            None => Err(refused("Invalid API key")),
        },
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
