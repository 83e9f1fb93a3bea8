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
use crate::http::App;

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Stats {
    active_sessions: usize,
    total_users: usize,
    online_sessions: usize,
}

impl Stats {
    /// Counted over `recs` (O(sessions): for scoped keys and several nodes).
    fn of<'a>(recs: impl Iterator<Item = &'a SessionRecord>) -> Stats {
        let mut n = Stats {
            active_sessions: 0,
            total_users: 0,
            online_sessions: 0,
        };
        for r in recs {
            n.total_users += 1;
            n.active_sessions += usize::from(r.state.is_active());
            n.online_sessions += usize::from(r.state == SessionState::Online);
        }
        n
    }
}

/// Several nodes: every session of the fleet with the node that owns it, from the
/// database; the ones this node runs as its view has them (fresher). A session whose
/// owner is not live is shown `disconnected` (its row may still say `online`: its owner
/// stopped writing when it fenced itself or died) until another node claims it. `None`
/// for a single process (its view is the fleet).
pub async fn fleet_records(
    app: &App,
) -> Result<Option<Vec<(SessionRecord, Option<String>)>>, ApiError> {
    let Some(node) = &app.node else {
        return Ok(None);
    };
    let rows = node.rows.clone();
    let all = tokio::task::spawn_blocking(move || rows.fleet())
        .await
        .map_err(|e| ApiError::unavailable(format!("cannot read the fleet: {e}")))??;
    let view = app.store.view();
    Ok(Some(
        all.into_iter()
            .map(|row| {
                if node.standing.holds(&row.rec.user_id) {
                    if let Some(live) = view.get(&row.rec.user_id) {
                        return (live, Some(node.standing.id.clone()));
                    }
                }
                as_read(row)
            })
            .collect(),
    ))
}

/// A session's row as the fleet's reads show it (see [`fleet_records`]).
pub fn as_read(row: crate::db::nodes::FleetRow) -> (SessionRecord, Option<String>) {
    let mut rec = row.rec;
    if !row.owner_live && rec.state.is_active() {
        rec.state = SessionState::Disconnected;
        rec.last_error = Some(match &row.owner {
            Some(owner) => format!(
                "its node {owner} is not live (its lease ran out, or it left): another node \
                 takes the session over"
            ),
            None => "moving to another node".to_string(),
        });
    }
    (rec, row.owner)
}

/// `GET /api/nodes`: the nodes sharing this database, their sessions and leases (empty
/// for a single process).
pub async fn nodes(c: Ctx) -> Answer {
    #[derive(Serialize)]
    struct Nodes {
        node: Option<String>,
        count: usize,
        nodes: Vec<crate::db::nodes::NodeRow>,
    }
    let Some(node) = &c.app.node else {
        return Ok(ok(&Nodes {
            node: None,
            count: 0,
            nodes: Vec::new(),
        }));
    };
    let rows = node.rows.clone();
    let nodes = tokio::task::spawn_blocking(move || rows.nodes())
        .await
        .map_err(|e| ApiError::unavailable(format!("cannot read the nodes: {e}")))??;
    Ok(ok(&Nodes {
        node: Some(node.standing.id.clone()),
        count: nodes.len(),
        nodes,
    }))
}

/// `POST /api/nodes/:nodeId/drain`: the node hands its sessions to the others (a few at a
/// time, each batch stopped, given up and claimed at once) and takes no new ones. Asked
/// of another node, the request goes to it.
pub async fn drain(c: Ctx) -> Answer {
    let Some(node) = &c.app.node else {
        return Err(ApiError::not_found(format!(
            "Node {} not found: this botvisor is not one of several nodes (--node-id)",
            c.id
        )));
    };
    if c.id != node.standing.id {
        let rows = node.rows.clone();
        let nodes = tokio::task::spawn_blocking(move || rows.nodes())
            .await
            .map_err(|e| ApiError::unavailable(format!("cannot read the nodes: {e}")))??;
        let Some(target) = nodes.into_iter().find(|n| n.id == c.id) else {
            return Err(ApiError::not_found(format!("Node {} not found", c.id)));
        };
        if c.req.headers().contains_key(crate::http::forward::HOP) || target.state != "live" {
            return Err(ApiError::new(
                hyper::StatusCode::CONFLICT,
                format!(
                    "Node {} is {}: it cannot drain now",
                    target.id, target.state
                ),
            ));
        }
        let (parts, _) = c.req.into_parts();
        return crate::http::forward::send(node, &target.address, &parts, Default::default()).await;
    }
    let sessions = node.standing.count();
    if node.standing.draining() {
        return Ok(ok(&crate::http::response::Message {
            message: format!("Node {} is already draining", c.id),
        }));
    }
    let (n, sup) = (node.clone(), c.app.sup.clone());
    node.standing.set_draining(true);
    tokio::spawn(async move { n.drain(&sup).await });
    Ok(crate::http::response::json_response(
        hyper::StatusCode::ACCEPTED,
        &crate::http::response::Success::new(&crate::http::response::Message {
            message: format!(
                "Node {} is draining: its {sessions} sessions move to the other nodes",
                c.id
            ),
        }),
    ))
}

pub async fn stats(c: Ctx) -> Answer {
    if let Some(node) = &c.app.node {
        if c.caller.sees_all() {
            // Counted by the database: no row leaves it.
            let rows = node.rows.clone();
            let (total, active, online) = tokio::task::spawn_blocking(move || rows.fleet_counts())
                .await
                .map_err(|e| ApiError::unavailable(format!("cannot count the fleet: {e}")))??;
            let n = |v: i64| usize::try_from(v).unwrap_or(0);
            return Ok(ok(&Stats {
                active_sessions: n(active),
                total_users: n(total),
                online_sessions: n(online),
            }));
        }
    }
    if let Some(all) = fleet_records(&c.app).await? {
        let mine = all.iter().map(|(r, _)| r);
        return Ok(ok(&Stats::of(mine.filter(|r| c.caller.sees(&r.user_id)))));
    }
    if let Caller::Key(key) = &c.caller {
        if !key.sees_all() {
            // Counted over the key's own sessions (O(sessions), for scoped keys only).
            let all = c.app.store.view().list();
            return Ok(ok(&Stats::of(all.iter().filter(|r| key.sees(&r.user_id)))));
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
    let mut disk = c.app.store.rows_on_disk().await?;
    if let Some(node) = &c.app.node {
        // Several nodes: this node's supervisor has this node's sessions only.
        disk.retain(|r| node.standing.holds(&r.user_id));
    }
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
    let mut sessions = match fleet_records(&c.app).await? {
        Some(all) => all.into_iter().map(|(r, _)| r).collect(),
        None => c.app.store.view().list(),
    };
    sessions.retain(|r| c.caller.sees(&r.user_id));
    Ok(dashboard::page(&sessions))
}
