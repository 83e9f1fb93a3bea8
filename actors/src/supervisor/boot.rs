//! Start and end of the supervisor's life: resuming the sessions found in the store
//! (paced in batches), and stopping every session at shutdown.

use ractor::{ActorRef, RpcReplyPort};

use crate::error::CmdError;
use crate::record::{Desired, SessionRecord, SessionState};

use super::entry::{Entry, Intent};
use super::messages::SupervisorMsg;
use super::SupervisorState;

impl SupervisorState {
    /// Takes the stored sessions and queues the ones that should run.
    pub(super) fn boot(&mut self, myself: &ActorRef<SupervisorMsg>, stored: Vec<SessionRecord>) {
        for mut rec in stored {
            rec.clear_pairing();
            let resume = rec.desired == Desired::Running
                && !matches!(rec.state, SessionState::Failed | SessionState::LoggedOut);
            let now = if resume {
                SessionState::Starting
            } else if rec.desired == Desired::Stopped {
                SessionState::Stopped
            } else {
                rec.state
            };
            let user_id = rec.user_id.clone();
            if resume {
                self.boot_queue.push_back(user_id.clone());
            }
            let stale = rec.state != now;
            self.sessions.insert(user_id.clone(), Entry::new(rec));
            // What was stored is the state before the process died (often `online`):
            // publish what is true now, before any reader sees the old one.
            if stale {
                self.set_state(&user_id, now);
            }
        }
        if !self.boot_queue.is_empty() {
            tracing::info!(
                sessions = self.boot_queue.len(),
                batch = self.config.boot_batch,
                interval = ?self.config.boot_interval,
                "resuming running sessions"
            );
            let _ = myself.cast(SupervisorMsg::BootNext);
        }
    }

    /// Starts the next batch of resumed sessions and schedules the one after.
    pub(super) async fn boot_next(&mut self, myself: &ActorRef<SupervisorMsg>) {
        let mut started = 0;
        while started < self.config.boot_batch.max(1) {
            let Some(user_id) = self.boot_queue.pop_front() else {
                break;
            };
            let ready = self.sessions.get(&user_id).is_some_and(|e| {
                e.child.is_none()
                    && e.rec.desired == Desired::Running
                    && e.intent.is_none()
                    && e.restart_token.is_none()
            });
            if ready && self.shutdown.is_none() {
                self.spawn_child(myself, &user_id).await;
                started += 1;
            }
        }
        if self.boot_queue.is_empty() {
            return;
        }
        if self.config.boot_interval.is_zero() {
            // No pause, but other messages (API commands) get their turn between batches.
            let _ = myself.cast(SupervisorMsg::BootNext);
        } else {
            myself.send_after(self.config.boot_interval, || SupervisorMsg::BootNext);
        }
    }

    /// Stops every session (desired states untouched, so the next boot resumes them);
    /// creates still in flight are rolled back. `reply` is answered when all are gone.
    pub(super) fn begin_shutdown(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        reply: RpcReplyPort<()>,
    ) {
        self.shutdown.get_or_insert_with(Vec::new).push(reply);
        self.boot_queue.clear();
        let ids: Vec<String> = self.sessions.keys().cloned().collect();
        for user_id in ids {
            let Some(entry) = self.sessions.get_mut(&user_id) else {
                continue;
            };
            entry.restart_token = None;
            let creating = !entry.create_waiters.is_empty();
            match (&entry.child, &entry.intent, creating) {
                (None, None, true) => self.abort_create(&user_id, CmdError::shutting_down()),
                (Some(_), None, true) => {
                    entry.intent = Some(Intent::CreateAbort(CmdError::shutting_down()));
                    self.stop_child(myself, &user_id, false);
                }
                (Some(_), None, false) => {
                    entry.intent = Some(Intent::Shutdown);
                    self.stop_child(myself, &user_id, false);
                }
                _ => {}
            }
        }
        self.check_shutdown_done();
    }

    pub(super) fn check_shutdown_done(&mut self) {
        if self.children.is_empty() {
            if let Some(waiters) = self.shutdown.as_mut() {
                for w in waiters.drain(..) {
                    let _ = w.send(());
                }
            }
        }
    }
}
