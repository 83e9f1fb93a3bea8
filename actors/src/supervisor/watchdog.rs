//! Finds hung sessions: every live child is pinged each `watchdog_interval`; one that
//! does not answer within `call_timeout` is killed and restarted like a crash.

use ractor::rpc::CallResult;
use ractor::ActorRef;

use crate::session::SessionMsg;

use super::entry::Intent;
use super::messages::SupervisorMsg;
use super::SupervisorState;

impl SupervisorState {
    pub(super) fn watchdog(&self, myself: &ActorRef<SupervisorMsg>) {
        for (user_id, entry) in &self.sessions {
            let Some(child) = &entry.child else {
                continue;
            };
            if entry.intent.is_some() {
                continue;
            }
            let actor = child.actor.clone();
            let incarnation = child.incarnation;
            let timeout = self.config.call_timeout;
            let sup = myself.clone();
            let user_id = user_id.clone();
            tokio::spawn(async move {
                if let Ok(CallResult::Timeout) = actor.call(SessionMsg::Ping, Some(timeout)).await {
                    let _ = sup.cast(SupervisorMsg::Unresponsive {
                        user_id,
                        incarnation: Some(incarnation),
                        what: "a watchdog ping".into(),
                    });
                }
            });
        }
        myself.send_after(self.config.watchdog_interval, || SupervisorMsg::Watchdog);
    }

    pub(super) fn unresponsive(&mut self, user_id: &str, incarnation: Option<u64>, what: &str) {
        let Some(entry) = self.sessions.get_mut(user_id) else {
            return;
        };
        let Some(child) = &entry.child else {
            return;
        };
        if incarnation.is_some_and(|i| i != child.incarnation) {
            return;
        }
        tracing::warn!(%user_id, %what, "session unresponsive; killing it");
        if entry.intent.is_none() {
            entry.intent = Some(Intent::Hung(format!(
                "the session did not answer {what} in time; it was killed"
            )));
        }
        child.actor.kill();
    }
}
