//! The hyper front end: one task per connection, `service_fn` at the edge, CORS on
//! every answer, graceful drain on shutdown.

pub mod auth;
pub mod cors;
pub mod dashboard;
pub mod errors;
pub mod response;
pub mod routes;

use std::convert::Infallible;
use std::future::Future;
use std::path::PathBuf;
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

use crate::store::backup::Backups;
use crate::store::Store;
use cors::Cors;
use errors::ApiError;
use response::Body;
use routes::error_response;

/// Open connections served at once; more wait in the kernel's accept queue.
const MAX_CONNECTIONS: usize = 4096;
/// How long in-flight requests get to finish at shutdown.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// What every handler can reach.
pub struct App {
    /// The root supervisor.
    pub sup: ActorRef<SupervisorMsg>,
    /// Session records (reads come from its in-memory view).
    pub store: Arc<Store>,
    /// Backups.
    pub backups: Backups,
    /// API key for the write endpoints.
    pub api_key: Option<String>,
    /// CORS policy.
    pub cors: Cors,
    /// `sim` or `whatsapp`.
    pub link_name: &'static str,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Timeouts to wait for the supervisor with.
    pub timeouts: SupervisorConfig,
}

/// Answers one request.
pub async fn handle(req: Request<Incoming>, app: Arc<App>) -> Response<Body> {
    let origin = req.headers().get(ORIGIN).cloned();
    let preflight = req.method() == Method::OPTIONS;
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let mut resp = if preflight {
        if app.cors.permits(origin.as_ref()) {
            let mut r = Response::new(Body::default());
            *r.status_mut() = StatusCode::NO_CONTENT;
            r
        } else {
            error_response(&ApiError::new(StatusCode::FORBIDDEN, "Origin not allowed"))
        }
    } else {
        match routes::route(req, &app).await {
            Ok(r) => r,
            Err(e) => error_response(&e),
        }
    };
    let status = resp.status();
    if status.is_server_error() {
        tracing::warn!(%method, %path, %status, "request failed");
    } else {
        tracing::debug!(%method, %path, %status, "request");
    }
    app.cors
        .apply(origin.as_ref(), resp.headers_mut(), preflight);
    resp
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
        let app = app.clone();
        let service = service_fn(move |req| {
            let app = app.clone();
            async move { Ok::<_, Infallible>(handle(req, app).await) }
        });
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(30))
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("some HTTP connections did not finish in time");
    }
}
