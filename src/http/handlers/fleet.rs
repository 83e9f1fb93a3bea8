//! The whole fleet: `/api/stats` (from counters, O(1)) and the `GET /` dashboard.

use std::collections::BTreeSet;

use ractor::rpc::CallResult;
use serde::Serialize;

use botvisor_actors::{Persistence, SessionRecord, SessionState, SupervisorMsg};

use crate::http::access::Caller;
use crate::http::errors::ApiError;

use crate::http::dashboard;
use crate::http::response::ok;
use crate::http::router::{Answer, Ctx};

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Stats {
    active_sessions: usize,
    total_users: usize,
    online_sessions: usize,
}

pub async fn stats(c: Ctx) -> Answer {
    if let Caller::Key(key) = &c.caller {
        if !key.sees_all() {
            // Counted over the key's own sessions (O(sessions), for scoped keys only).
            let mine: Vec<SessionRecord> = c
                .app
                .store
                .view()
                .list()
                .into_iter()
                .filter(|r| key.sees(&r.user_id))
                .collect();
            return Ok(ok(&Stats {
                active_sessions: mine.iter().filter(|r| r.state.is_active()).count(),
                total_users: mine.len(),
                online_sessions: mine
                    .iter()
                    .filter(|r| r.state == SessionState::Online)
                    .count(),
            }));
        }
    }
    let n = c.app.store.view().counts();
    Ok(ok(&Stats {
        active_sessions: n.active,
        total_users: n.total,
        online_sessions: n.online,
    }))
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AuditView {
    sessions: usize,
    live_actors: usize,
    consistent: bool,
    problems: Vec<String>,
}

/// `GET /api/audit`: the supervisor, the read view and the rows on disk must agree (ids,
/// states, desired states), every live actor must belong to a session that should run,
/// and every session that should run must have an actor or a restart on its way. Meant
/// for a quiet fleet: a session changing state during the audit can show as a difference.
pub async fn audit(c: Ctx) -> Answer {
    let sup = c
        .app
        .sup
        .call(SupervisorMsg::Audit, Some(c.app.supervisor.call_timeout))
        .await;
    let sup = match sup {
        Ok(CallResult::Success(a)) => a,
        _ => {
            return Err(ApiError::unavailable(
                "The supervisor did not answer the audit in time",
            ))
        }
    };
    c.app.store.flush().await?;
    let disk = c.app.store.rows_on_disk().await?;
    let view = c.app.store.view().list();
    let key = |r: &SessionRecord| (r.user_id.clone(), r.state.as_str(), r.desired.as_str());
    let mut problems = sup.problems;
    let sup_rows: BTreeSet<_> = sup.records.iter().map(key).collect();
    for (name, rows) in [("the read view", &view), ("the database", &disk)] {
        let other: BTreeSet<_> = rows.iter().map(key).collect();
        for (id, state, desired) in sup_rows.difference(&other) {
            problems.push(format!(
                "{id}: the supervisor has it {state}/{desired} but {name} does not"
            ));
        }
        for (id, state, desired) in other.difference(&sup_rows) {
            problems.push(format!(
                "{id}: {name} has it {state}/{desired} but the supervisor does not"
            ));
        }
    }
    Ok(ok(&AuditView {
        sessions: sup.records.len(),
        live_actors: sup.live.len(),
        consistent: problems.is_empty(),
        problems,
    }))
}

pub async fn dashboard(c: Ctx) -> Answer {
    let mut sessions = c.app.store.view().list();
    sessions.retain(|r| c.caller.sees(&r.user_id));
    Ok(dashboard::page(&sessions))
}
