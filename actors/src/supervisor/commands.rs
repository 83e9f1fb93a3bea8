//! The API's commands. Each checks the session is idle (or answers why not), changes the
//! record, and is answered once the change is durable, or records an intent that the
//! child's exit completes.

use ractor::rpc::CallResult;
use ractor::ActorRef;

use crate::error::CmdError;
use crate::link::{Action, Done, Fault};
use crate::record::{Desired, SessionRecord, SessionState};
use crate::session::SessionMsg;

use super::config::SEND_TIMEOUT;
use super::entry::{Entry, Intent};
use super::messages::{Reply, RestoreFn, SupervisorMsg};
use super::SupervisorState;

/// Said when an API logout finds the session not running.
const NOT_RUNNING_LOGOUT: &str = "the session was not running, so the device could not be \
     unlinked from the phone; remove it under Linked Devices if it is still listed";

impl SupervisorState {
    /// Stores the new session; its child is spawned once the row is durable (`stored`).
    pub(super) fn create(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        user_id: String,
        phone_number: String,
        by: Option<std::sync::Arc<str>>,
        reply: Reply<SessionRecord>,
    ) {
        let refusal = if self.shutdown.is_some() {
            Some(CmdError::shutting_down())
        } else if self.sessions.contains_key(&user_id) {
            Some(CmdError::Exists)
        } else {
            self.link
                .admit()
                .err()
                .map(|e| CmdError::Unavailable(e.to_string()))
        };
        if let Some(e) = refusal {
            let _ = reply.send(Err(e));
            return;
        }
        let mut rec = SessionRecord::new(user_id.clone(), phone_number);
        rec.by = by;
        self.persistence.insert(&rec);
        let token = self.token();
        let mut entry = Entry::new(rec);
        entry.create_waiters.push(reply);
        entry.create_token = Some(token);
        self.sessions.insert(user_id.clone(), entry);
        let uid = user_id.clone();
        myself.send_after(self.config.create_timeout, move || {
            SupervisorMsg::CreateDeadline {
                user_id: uid,
                token,
            }
        });
        self.when_durable(myself, move |result| SupervisorMsg::Stored {
            user_id,
            token,
            result,
        });
    }

    pub(super) async fn start(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        user_id: &str,
        by: Option<std::sync::Arc<str>>,
        reply: Reply<SessionRecord>,
    ) {
        let Some((entry, reply)) = self.idle(user_id, reply) else {
            return;
        };
        entry.rec.by = by;
        entry.rec.desired = Desired::Running;
        // (A logged-out session started before its wipe came due starts from nothing.)
        self.wipe_now(user_id);
        let Some(entry) = self.sessions.get_mut(user_id) else {
            return;
        };
        if entry.child.is_none() {
            entry.history.reset();
            entry.rec.restarts = 0;
            // (Still in the boot queue, it is skipped there: it has a child by then.)
            self.spawn_child(myself, user_id).await;
        } else {
            self.save(user_id);
        }
        self.reply_with_record(user_id, reply);
    }

    pub(super) fn stop(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        user_id: &str,
        by: Option<std::sync::Arc<str>>,
        reply: Reply<()>,
    ) {
        // A second stop waits with the first.
        if let Some(Entry {
            intent: Some(Intent::Stop(waiters)),
            ..
        }) = self.sessions.get_mut(user_id)
        {
            waiters.push(reply);
            return;
        }
        let Some((entry, reply)) = self.idle(user_id, reply) else {
            return;
        };
        entry.rec.by = by;
        entry.rec.desired = Desired::Stopped;
        entry.restart_token = None;
        if entry.child.is_some() {
            entry.intent = Some(Intent::Stop(vec![reply]));
            self.save(user_id);
            self.stop_child(myself, user_id, false);
        } else {
            let state = match entry.rec.state {
                s @ (SessionState::Failed | SessionState::LoggedOut) => s,
                _ => SessionState::Stopped,
            };
            self.set_state(user_id, state);
            self.reply_durable(reply, ());
        }
    }

    pub(super) fn delete(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        user_id: &str,
        by: Option<std::sync::Arc<str>>,
        reply: Reply<()>,
    ) {
        let Some((entry, reply)) = self.idle(user_id, reply) else {
            return;
        };
        entry.rec.by = by;
        if entry.child.is_some() {
            entry.intent = Some(Intent::Delete(reply));
            self.stop_child(myself, user_id, false);
        } else {
            self.finish_removal(user_id, reply, ());
        }
    }

    pub(super) fn logout(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        user_id: &str,
        by: Option<std::sync::Arc<str>>,
        reply: Reply<Option<String>>,
    ) {
        let Some((entry, reply)) = self.idle(user_id, reply) else {
            return;
        };
        entry.rec.by = by;
        if entry.child.is_some() {
            entry.intent = Some(Intent::Logout(reply));
            self.stop_child(myself, user_id, true);
        } else {
            self.finish_removal(user_id, reply, Some(NOT_RUNNING_LOGOUT.to_string()));
        }
    }

    /// Hands an action (a send, a number check) to an online session; its link runs it
    /// off the actor, and the caller is answered with what the network answered (or why
    /// not) within [`SEND_TIMEOUT`].
    pub(super) fn act(&mut self, user_id: &str, action: Action, reply: Reply<Done>) {
        let Some((entry, reply)) = self.idle(user_id, reply) else {
            return;
        };
        let child = match &entry.child {
            Some(c) if entry.rec.state == SessionState::Online => c,
            _ => {
                let _ = reply.send(Err(CmdError::Conflict(format!(
                    "Session {user_id} is not online (state: {}); {} only from an online session",
                    entry.rec.state,
                    action.what()
                ))));
                return;
            }
        };
        let actor = child.actor.clone();
        let user_id = user_id.to_string();
        let action = Box::new(action);
        tokio::spawn(async move {
            let answer = match actor
                .call(|r| SessionMsg::Act { action, reply: r }, Some(SEND_TIMEOUT))
                .await
            {
                Ok(CallResult::Success(r)) => r,
                Ok(CallResult::Timeout) => Err(CmdError::Unavailable(format!(
                    "Session {user_id} got no answer from the network within {} s",
                    SEND_TIMEOUT.as_secs()
                ))),
                Ok(CallResult::SenderError) | Err(_) => Err(CmdError::Conflict(format!(
                    "Session {user_id} stopped before the network answered"
                ))),
            };
            let _ = reply.send(answer);
        });
    }

    /// Forwards a fault to the session; a session that does not answer in time is
    /// declared hung (killed and restarted like a crash) and the caller gets 503.
    pub(super) fn fault(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        user_id: &str,
        fault: Fault,
        reply: Reply<()>,
    ) {
        let Some((entry, reply)) = self.idle(user_id, reply) else {
            return;
        };
        let Some(child) = &entry.child else {
            let _ = reply.send(Err(CmdError::Conflict(format!(
                "Session {user_id} is not running (state: {})",
                entry.rec.state
            ))));
            return;
        };
        let actor = child.actor.clone();
        let incarnation = child.incarnation;
        let timeout = self.config.call_timeout;
        let sup = myself.clone();
        let user_id = user_id.to_string();
        tokio::spawn(async move {
            let answer = match actor
                .call(|r| SessionMsg::Fault(fault, r), Some(timeout))
                .await
            {
                Ok(CallResult::Success(r)) => r,
                Ok(CallResult::Timeout) => {
                    let _ = sup.cast(SupervisorMsg::Unresponsive {
                        user_id: user_id.clone(),
                        incarnation: Some(incarnation),
                        what: "an API call".into(),
                    });
                    Err(CmdError::Unavailable(format!(
                        "Session {user_id} did not answer in time; it is being restarted"
                    )))
                }
                Ok(CallResult::SenderError) | Err(_) => Err(CmdError::Conflict(format!(
                    "Session {user_id} is not running"
                ))),
            };
            let _ = reply.send(answer);
        });
    }

    pub(super) fn restore(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        user_id: &str,
        apply: RestoreFn,
        by: Option<std::sync::Arc<str>>,
        reply: Reply<SessionRecord>,
    ) {
        let Some((entry, reply)) = self.idle(user_id, reply) else {
            return;
        };
        entry.rec.by = by;
        entry.restart_token = None;
        if entry.child.is_some() {
            entry.intent = Some(Intent::Restore(apply, reply));
            self.stop_child(myself, user_id, false);
        } else {
            self.begin_restore(myself, user_id, apply, reply);
        }
    }

    /// Answers with the session's record once it is durable.
    pub(super) fn reply_with_record(&self, user_id: &str, reply: Reply<SessionRecord>) {
        match self.sessions.get(user_id).map(|e| e.rec.clone()) {
            Some(rec) => self.reply_durable(reply, rec),
            None => {
                let _ = reply.send(Err(CmdError::not_found(user_id)));
            }
        }
    }

    /// Removes the session and answers `value` once the removal is durable.
    pub(super) fn finish_removal<T: Send + 'static>(
        &mut self,
        user_id: &str,
        reply: Reply<T>,
        value: T,
    ) {
        match self.remove_session(user_id) {
            Ok(()) => self.reply_durable(reply, value),
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }
}
