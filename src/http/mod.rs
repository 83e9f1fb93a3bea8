//! The hyper front end: one task per connection, `service_fn` at the edge, CORS on
//! every answer, graceful drain on shutdown.

//!
//! - [`router`]: the route table (method, key, handler) and dispatch;
//! - [`handlers`]: one file per resource; they only translate;
//! - [`request`] / [`response`]: bodies in and out, typed with serde;
//! - [`errors`]: every failure to a status and the spec's JSON shape;
//! - [`auth`], [`cors`], [`dashboard`].

pub mod access;
pub mod auth;
pub mod cors;
pub mod dashboard;
pub mod errors;
pub mod forward;
pub mod handlers;
pub mod outbound;
pub mod ratelimit;
pub mod request;
pub mod response;
pub mod router;
pub mod spool;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::ORIGIN;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use ractor::ActorRef;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use botvisor_actors::{SupervisorConfig, SupervisorMsg};

use crate::store::Store;
use cors::Cors;
use errors::ApiError;
use response::Body;

/// Open connections served at once; more wait in the kernel's accept queue.
const MAX_CONNECTIONS: usize = 4096;
/// How long in-flight requests get to finish at shutdown.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// What every handler can reach.
pub struct App {
    /// The root supervisor.
    pub sup: ActorRef<SupervisorMsg>,
    /// This process as one node of several (`--node-id`), if so.
    pub node: Option<Arc<crate::nodes::Node>>,
    /// Session records (reads come from its in-memory view) and backups.
    pub store: Arc<Store>,
    /// API key for the write endpoints.
    pub api_key: Option<String>,
    /// The key is needed for reads too.
    pub protect_reads: bool,
    /// CORS policy.
    pub cors: Cors,
    /// Whether the link takes injected faults.
    pub faults: bool,
    /// The supervisor's tunables (its reply deadlines).
    pub supervisor: SupervisorConfig,
    /// How long a client gets to send a request's head, and then its body.
    pub request_timeout: Duration,
    /// What `/metrics` exports.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// `/metrics` needs the key.
    pub protect_metrics: bool,
    /// Descriptors one idle session holds on this link (for the capacity gauge).
    pub files_per_session: u32,
    /// The real link's WhatsApp keys in PostgreSQL (`--keys database`): backups copy a
    /// session's rows out to a key file, and restores copy them back.
    pub database_keys: Option<std::sync::Arc<crate::link::credentials::DatabaseKeys>>,
    /// The per-session send rate.
    pub send_limit: ratelimit::SendLimit,
    /// `--send-rate`, for messages.
    pub send_rate: u32,
    /// The simulated network, when that is the link (its test endpoints).
    pub sim: Option<Arc<crate::link::sim::SimLink>>,
    /// The sessions' durable outbound queues.
    pub outbound: outbound::Outbound,
    /// The scoped API keys.
    pub keys: Arc<access::Keys>,
    /// Which proxy each session's WhatsApp socket goes through.
    pub proxies: Arc<crate::link::proxy::Proxies>,
    /// Fetches and bounds the media of sends.
    pub media: Arc<handlers::media::Fetcher>,
}

impl App {
    /// The largest body of a send with media: `--media-max-bytes` as base64, and room for
    /// the rest of the JSON.
    pub fn media_body_max(&self) -> usize {
        self.media.settings.max_bytes.div_ceil(3) * 4 + request::MAX_BODY
    }
}

/// Answers one request.
pub async fn handle(req: Request<Incoming>, app: Arc<App>) -> Response<Body> {
    let origin = req.headers().get(ORIGIN).cloned();
    let preflight = req.method() == Method::OPTIONS;
    let method = req.method().clone();
    let uri = req.uri().clone();
    let started = std::time::Instant::now();
    let mut route = "unmatched";
    let mut resp = if preflight {
        if app.cors.permits(origin.as_ref()) {
            let mut r = Response::new(Body::default());
            *r.status_mut() = StatusCode::NO_CONTENT;
            r
        } else {
            ApiError::new(StatusCode::FORBIDDEN, "Origin not allowed").response()
        }
    } else {
        let (matched, answer) = router::dispatch(req, app.clone()).await;
        route = matched.route.map_or("unmatched", |r| r.path);
        let resp = match answer {
            Ok(r) => r,
            Err(e) => e.response(),
        };
        audit(&matched, &method, &uri, resp.status());
        resp
    };
    app.metrics.request(
        route,
        method.as_str(),
        resp.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    let status = resp.status();
    if status == StatusCode::REQUEST_TIMEOUT {
        // The rest of the body may still trickle in: do not keep the connection.
        resp.headers_mut().insert(
            hyper::header::CONNECTION,
            hyper::header::HeaderValue::from_static("close"),
        );
    }
    // One line per request at debug, per server-side failure at warn (a 4xx is the
    // client's business, and hostile traffic must not flood the log); never a body or a
    // header, so never a key or a code.
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    if status.is_server_error() {
        tracing::warn!(%method, route, path = uri.path(), %status, ms, "request failed");
    } else {
        tracing::debug!(%method, route, path = uri.path(), %status, ms, "request");
    }
    app.cors
        .apply(origin.as_ref(), resp.headers_mut(), preflight);
    resp
}

/// The audit trail: one line at info for every change to the fleet's sessions, keys and
/// receivers that was made (not reads, not sends: those are counted in the metrics),
/// naming the key that made it by its id (`admin`: the `--api-key`; never a secret).
fn audit(matched: &router::Matched, method: &Method, uri: &hyper::Uri, status: StatusCode) {
    use access::Scope;
    let (Some(route), Some(caller)) = (matched.route, &matched.caller) else {
        return;
    };
    let changes = matches!(
        route.scope,
        Some(Scope::Control | Scope::Delete | Scope::Webhooks | Scope::Admin)
    );
    if !changes || *method == Method::GET || !status.is_success() {
        return;
    }
    let key = caller.name();
    tracing::info!(target: "botvisor::audit", key, %method, route = route.path, path = uri.path(), %status, "change");
}

/// Serves HTTP until `shutdown` resolves, then drains in-flight requests (bounded).
pub async fn serve(listener: TcpListener, app: Arc<App>, shutdown: impl Future<Output = ()>) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Typically EMFILE: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let timeout = app.request_timeout;
        let app = app.clone();
        let service = service_fn(move |req| {
            let app = app.clone();
            async move { Ok::<_, Infallible>(handle(req, app).await) }
        });
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(timeout)
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
    drop(listener);
    // Event streams never end by themselves: end them, so the drain does not wait on them.
    app.store.hub().close();
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("some HTTP connections did not finish in time");
    }
}
