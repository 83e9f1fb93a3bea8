//! Start, stop and logout of one session.

use serde::Serialize;

use botvisor_actors::{Command, SupervisorMsg};

use super::ask;
use crate::http::response::{ok, Message};
use crate::http::router::{Answer, Ctx};

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Started<'a> {
    message: &'static str,
    user_id: &'a str,
    state: &'static str,
}

#[derive(Serialize)]
struct LoggedOut {
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    warning: Option<String>,
}

pub async fn start(c: Ctx) -> Answer {
    let user_id = c.id.clone();
    let rec = ask(&c.app, Command::Start, |reply| SupervisorMsg::Start {
        user_id,
        by: c.caller.by(),
        reply,
    })
    .await?;
    Ok(ok(&Started {
        message: "Session started successfully",
        user_id: &rec.user_id,
        state: rec.state.as_str(),
    }))
}

pub async fn stop(c: Ctx) -> Answer {
    let user_id = c.id.clone();
    ask(&c.app, Command::Stop, |reply| SupervisorMsg::Stop {
        user_id,
        by: c.caller.by(),
        reply,
    })
    .await?;
    Ok(ok(&Message {
        message: format!("Session {} stopped", c.id),
    }))
}

pub async fn logout(c: Ctx) -> Answer {
    let user_id = c.id.clone();
    let warning = ask(&c.app, Command::Logout, |reply| SupervisorMsg::Logout {
        user_id,
        by: c.caller.by(),
        reply,
    })
    .await?;
    super::proxy::forget(&c.app, &c.id).await;
    Ok(ok(&LoggedOut {
        message: format!("Session {} logged out and deleted", c.id),
        warning,
    }))
}
