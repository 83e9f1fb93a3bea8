//! Any node answers any request (several nodes on one database, `--node-id`): a command
//! or read of a session another node owns is forwarded to its owner over HTTP, the API
//! key and body going along, with a hop header naming this node. An owner asked (by a
//! hop) about a session it no longer holds answers 421; the forwarder looks the owner up
//! again and tries once more. A node fenced (its lease ran out) answers 503 for sessions
//! until it has registered again.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::errors::ApiError;
use super::response::Body;
use super::router::{Answer, Route};
use super::App;
use crate::db::nodes::Owner;
use crate::nodes::Node;

/// Names the node a request was forwarded by (a forwarded request is never forwarded
/// again).
pub const HOP: &str = "x-botvisor-hop";
/// On a forwarded answer: the node that answered.
pub const SERVED_BY: &str = "x-botvisor-node";

/// A forwarded request gives up after this long.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(120);

fn client() -> &'static Client<HttpConnector, Full<Bytes>> {
    static CLIENT: OnceLock<Client<HttpConnector, Full<Bytes>>> = OnceLock::new();
    CLIENT.get_or_init(|| {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(http)
    })
}

/// Whether the route names one session (and so has an owner).
fn of_one_session(route: &Route) -> bool {
    route.path.starts_with("/api/sessions/:id") || route.path.starts_with("/api/sim/:id")
}

/// 503 while the node is fenced.
pub fn fenced(node: &Node) -> ApiError {
    ApiError::unavailable(format!(
        "node fenced: node {} could not renew its lease in time and serves no session until it \
         has registered again; try again shortly",
        node.standing.id
    ))
}

fn moving(user_id: &str) -> Response<Body> {
    ApiError::unavailable(format!(
        "Session {user_id} is moving between nodes (its owner left); try again shortly"
    ))
    .response_retry_after(2)
}

async fn owner_of(node: &Arc<Node>, user_id: &str) -> Result<Option<Owner>, ApiError> {
    let rows = node.rows.clone();
    let id = user_id.to_string();
    tokio::task::spawn_blocking(move || rows.owner_of(&id))
        .await
        .map_err(|e| ApiError::unavailable(format!("cannot look up the session's node: {e}")))?
        .map_err(ApiError::from)
}

/// `GET /api/sessions/:id` of a session no live node holds, from its row.
async fn read_row(node: &Arc<Node>, user_id: &str) -> Answer {
    let rows = node.rows.clone();
    let id = user_id.to_string();
    let row = tokio::task::spawn_blocking(move || rows.fleet_row(&id))
        .await
        .map_err(|e| ApiError::unavailable(format!("cannot read the session: {e}")))??
        .ok_or_else(|| ApiError::no_session(user_id))?;
    let (rec, owner) = super::handlers::fleet::as_read(row);
    Ok(super::response::ok(&super::response::SessionView::on(
        &rec,
        owner.as_deref(),
    )))
}

/// Answers the request here (`Err(req)`: it is this node's to answer) or elsewhere.
pub async fn elsewhere(
    app: &Arc<App>,
    route: &Route,
    user_id: &str,
    req: Request<Incoming>,
) -> Result<Answer, Request<Incoming>> {
    let Some(node) = &app.node else {
        return Err(req);
    };
    if !of_one_session(route) {
        return Err(req);
    }
    if !node.standing.live() {
        return Ok(Err(fenced(node)));
    }
    if node.standing.holds(user_id) {
        return Err(req);
    }
    let hop = req.headers().contains_key(HOP);
    let owner = match owner_of(node, user_id).await {
        Ok(o) => o,
        Err(e) => return Ok(Err(e)),
    };
    let address = match owner {
        None => return Ok(Err(ApiError::no_session(user_id))),
        Some(Owner {
            node: Some(ref owner),
            ..
        }) if *owner == node.standing.id => return Err(req),
        Some(_) if hop => {
            return Ok(Err(ApiError::new(
                StatusCode::MISDIRECTED_REQUEST,
                format!(
                    "Session {user_id} is not on node {}; ask again",
                    node.standing.id
                ),
            )))
        }
        Some(Owner {
            address: Some(address),
            ..
        }) => address,
        Some(Owner { address: None, .. }) => {
            // A read of the session is answered from its row meanwhile.
            if route.path == "/api/sessions/:id" && req.method() == hyper::Method::GET {
                return Ok(read_row(node, user_id).await);
            }
            return Ok(Ok(moving(user_id)));
        }
    };
    let limit = route.body_max(app);
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, limit).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return Ok(Err(ApiError::bad_request(
                "the request body could not be read (too large, or cut off)",
            )))
        }
    };
    let first = send(node, &address, &parts, body.clone()).await;
    Ok(match first {
        Ok(resp) if resp.status() == StatusCode::MISDIRECTED_REQUEST => {
            // The owner moved meanwhile: once more, to the new one.
            match owner_of(node, user_id).await {
                Ok(Some(Owner {
                    address: Some(again),
                    ..
                })) if again != address => send(node, &again, &parts, body).await,
                Ok(None) => Err(ApiError::no_session(user_id)),
                Ok(Some(_)) => Ok(moving(user_id)),
                Err(e) => Err(e),
            }
        }
        other => other,
    })
}

/// Sends one request to the node at `address` and returns its answer as it came.
pub async fn send(
    node: &Node,
    address: &str,
    parts: &hyper::http::request::Parts,
    body: Bytes,
) -> Answer {
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let uri: hyper::Uri = format!("{}{path}", address.trim_end_matches('/'))
        .parse()
        .map_err(|e| ApiError::unavailable(format!("node address {address}: {e}")))?;
    let mut out = Request::builder().method(parts.method.clone()).uri(uri);
    for (name, value) in &parts.headers {
        if !matches!(
            name.as_str(),
            "host" | "connection" | "transfer-encoding" | "content-length" | "keep-alive"
        ) {
            out = out.header(name, value);
        }
    }
    let out = out
        .header(HOP, node.standing.id.as_str())
        .body(Full::new(body))
        .map_err(|e| ApiError::unavailable(format!("cannot forward the request: {e}")))?;
    let unreachable = |e: String| {
        ApiError::unavailable(format!(
            "the session's node at {address} did not answer ({e}); try again shortly"
        ))
    };
    let resp = tokio::time::timeout(FORWARD_TIMEOUT, client().request(out))
        .await
        .map_err(|_| unreachable("timed out".into()))?
        .map_err(|e| unreachable(e.to_string()))?;
    let (mut head, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|e| unreachable(e.to_string()))?
        .to_bytes();
    for name in ["connection", "transfer-encoding", "keep-alive"] {
        head.headers.remove(name);
    }
    Ok(Response::from_parts(
        head,
        Full::new(body).map_err(|never| match never {}).boxed(),
    ))
}
