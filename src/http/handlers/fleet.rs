//! The whole fleet: `/api/stats` (from counters, O(1)) and the `GET /` dashboard.

use serde::Serialize;

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
    let n = c.app.store.view().counts();
    Ok(ok(&Stats {
        active_sessions: n.active,
        total_users: n.total,
        online_sessions: n.online,
    }))
}

pub async fn dashboard(c: Ctx) -> Answer {
    Ok(dashboard::page(&c.app.store.view().list()))
}
