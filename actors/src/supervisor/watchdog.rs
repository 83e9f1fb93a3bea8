//! Finds hung sessions: each `watchdog_interval`, a live child that has been busy with
//! one message for longer than `call_timeout` is killed and restarted like a crash. It
//! reads each child's busy mark (`ChildSlot`) and wakes no actor: a round over an idle
//! fleet is a scan of the map, not a message to each session (at 100,000 sessions,
//! pinging each every 10 s cost 9-15 % of a core).

use ractor::ActorRef;
use tokio::time::Instant;

use super::entry::Intent;
use super::messages::SupervisorMsg;
use super::SupervisorState;

impl SupervisorState {
    pub(super) fn watchdog(&mut self, myself: &ActorRef<SupervisorMsg>) {
        let now = Instant::now();
        let limit = self.config.call_timeout;
        let hung: Vec<(String, u64)> = self
            .sessions
            .iter()
            .filter(|(_, entry)| entry.intent.is_none())
            .filter_map(|(user_id, entry)| {
                let child = entry.child.as_ref()?;
                let busy = child.slot.busy_for(now)?;
                (busy > limit).then(|| (user_id.clone(), child.incarnation))
            })
            .collect();
        for (user_id, incarnation) in hung {
            self.unresponsive(&user_id, Some(incarnation), "the watchdog's check");
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
