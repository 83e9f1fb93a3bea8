//! `/healthz` (the process answers) and `/readyz` (it can do its job: the store commits,
//! the supervisor answers promptly, and the boot resume is finished or moving). Both are
//! cheap and open even with `--protect-reads` (they reveal nothing about sessions).

use std::time::Duration;

use hyper::StatusCode;
use ractor::rpc::CallResult;
use serde::Serialize;

use botvisor_actors::SupervisorMsg;

use crate::http::response::{json_response, ok, typed};
use crate::http::router::{Answer, Ctx};

/// How long the supervisor gets to answer a readiness probe.
const SUPERVISOR_BOUND: Duration = Duration::from_secs(2);

#[derive(Serialize)]
struct Healthy {
    status: &'static str,
}

pub async fn healthz(_c: Ctx) -> Answer {
    Ok(ok(&Healthy { status: "ok" }))
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Ready {
    success: bool,
    ready: bool,
    /// The spec's `message` when not ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
    store: String,
    supervisor: String,
    boot_pending: Option<usize>,
}

pub async fn readyz(c: Ctx) -> Answer {
    let store = match c.app.store.failing() {
        None => Ok("ok".to_string()),
        Some(e) => Err(format!("store: {e}")),
    };
    let health = c
        .app
        .sup
        .call(SupervisorMsg::Health, Some(SUPERVISOR_BOUND))
        .await;
    let (supervisor, boot_pending) = match health {
        Ok(CallResult::Success(h)) if h.shutting_down => (
            Err("supervisor: shutting down".to_string()),
            Some(h.boot_pending),
        ),
        Ok(CallResult::Success(h)) => (Ok("ok".to_string()), Some(h.boot_pending)),
        Ok(CallResult::Timeout) => (
            Err(format!(
                "supervisor: no answer within {} s",
                SUPERVISOR_BOUND.as_secs()
            )),
            None,
        ),
        _ => (Err("supervisor: not running".to_string()), None),
    };
    let problems: Vec<&str> = [&store, &supervisor]
        .iter()
        .filter_map(|r| r.as_ref().err().map(String::as_str))
        .collect();
    let ready = problems.is_empty();
    let text = |r: &Result<String, String>| match r {
        Ok(s) | Err(s) => s.clone(),
    };
    let body = Ready {
        success: ready,
        ready,
        message: (!ready).then(|| format!("not ready: {}", problems.join("; "))),
        store: text(&store),
        supervisor: text(&supervisor),
        boot_pending,
    };
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    Ok(json_response(status, &body))
}

/// `GET /metrics`: Prometheus text. Open like the other reads, unless `--protect-metrics`
/// (or `--protect-reads`) asks for the key.
pub async fn metrics(c: Ctx) -> Answer {
    if c.app.protect_metrics && matches!(c.caller, crate::http::access::Caller::Anonymous) {
        return Err(crate::http::router::missing_key());
    }
    let asked = std::time::Instant::now();
    let answered = c
        .app
        .sup
        .call(SupervisorMsg::Health, Some(SUPERVISOR_BOUND))
        .await;
    let supervisor =
        matches!(answered, Ok(CallResult::Success(_))).then(|| asked.elapsed().as_secs_f64());
    if let Some(node) = &c.app.node {
        let rows = node.rows.clone();
        match tokio::task::spawn_blocking(move || rows.fleet_gauges()).await {
            Ok(Ok(g)) => c.app.metrics.set_fleet(&g.sessions, &g.nodes),
            // The gauges keep their last values; the node's own metrics still answer.
            Ok(Err(e)) => tracing::debug!(error = %e, "cannot count the fleet for /metrics"),
            Err(e) => tracing::debug!(error = %e, "cannot count the fleet for /metrics"),
        }
    }
    let sessions = c.app.store.view().list();
    let text = c
        .app
        .metrics
        .render(&sessions, c.app.files_per_session, supervisor);
    Ok(typed(
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
        text,
    ))
}

/// The OpenAPI 3.1 document of every route (kept true by `tests/openapi.rs`, which walks
/// the route table against it, and by schemathesis in CI).
const OPENAPI: &str = include_str!("../openapi.json");

/// `GET /openapi.json`.
pub async fn openapi(_c: Ctx) -> Answer {
    Ok(typed("application/json", OPENAPI))
}
