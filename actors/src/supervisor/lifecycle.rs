//! A session's life: spawn, crash and restart under the policy, exit (with or without an
//! intent), removal, and the restore that runs while the child is gone.

use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorId, ActorRef};
use tokio::time::Instant;

use crate::error::{CmdError, StorageError};
use crate::link::{LinkEvent, SessionSpec};
use crate::policy::Decision;
use crate::record::{now_ms, Desired, SessionRecord, SessionState};
use crate::session::{ChildExit, ChildSlot, Reporter, SessionActor, SessionArgs, SessionMsg};

use super::entry::{Child, Intent};
use super::messages::{Reply, RestoreFn, SupervisorMsg};
use super::SupervisorState;

impl SupervisorState {
    pub(super) async fn spawn_child(&mut self, myself: &ActorRef<SupervisorMsg>, user_id: &str) {
        self.next_incarnation += 1;
        let incarnation = self.next_incarnation;
        let Some(entry) = self.sessions.get_mut(user_id) else {
            return;
        };
        entry.restart_token = None;
        // What lives exactly as long as the child (its mailboxes, its task, the slot, the
        // reporter) is made as session code: with the real link's session heap, it is
        // freed there at the stop instead of leaving holes among the records that outlive
        // it (which kept glibc's pages resident after a mass stop). Without a session heap
        // the flag changes nothing.
        let (slot, args) = botvisor_heap_zone::run_within(|| {
            let spec = SessionSpec {
                user_id: entry.rec.user_id.clone(),
                phone_number: entry.rec.phone_number.clone(),
            };
            let slot = ChildSlot::new();
            let sup = myself.clone();
            let uid = user_id.to_string();
            let report: Reporter = Arc::new(move |event: LinkEvent| {
                let _ = sup.cast(SupervisorMsg::Child {
                    user_id: uid.clone(),
                    incarnation,
                    event,
                });
            });
            // A session resumed at boot holds a boot slot until its connect returns.
            let started = self.booting.contains(user_id).then(|| {
                let sup = myself.clone();
                let uid = user_id.to_string();
                Box::new(move || {
                    let _ = sup.cast(SupervisorMsg::ChildStarted {
                        user_id: uid,
                        incarnation,
                    });
                }) as Box<dyn FnOnce() + Send>
            });
            let args = SessionArgs {
                spec,
                link: self.link.clone(),
                report,
                slot: slot.clone(),
                shutdown_timeout: self.config.shutdown_timeout,
                connect_timeout: self.config.create_timeout,
                started,
            };
            (slot, args)
        });
        let spawning = Actor::spawn_linked(None, SessionActor, args, myself.get_cell());
        match botvisor_heap_zone::within(spawning).await {
            Ok((actor, _join)) => {
                self.children.insert(actor.get_id(), user_id.to_string());
                entry.child = Some(Child {
                    actor,
                    incarnation,
                    started: Instant::now(),
                    slot,
                });
                tracing::debug!(%user_id, incarnation, "session started");
                self.set_state(user_id, SessionState::Starting);
            }
            Err(e) => {
                self.crashed(myself, user_id, format!("could not spawn the session: {e}"));
            }
        }
    }

    /// A child crashed (or could not start): restart under the policy, or fail.
    pub(super) fn crashed(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        user_id: &str,
        error: String,
    ) {
        let draw = self.jitter.next_f64();
        let token = self.token();
        let policy = self.config.policy.clone();
        let Some(entry) = self.sessions.get_mut(user_id) else {
            return;
        };
        let uptime = entry
            .child
            .take()
            .map(|c| c.started.elapsed())
            .unwrap_or_default();
        entry.rec.by = None;
        if entry.rec.desired != Desired::Running {
            self.set_state(user_id, SessionState::Stopped);
            return;
        }
        entry.rec.last_error = Some(error.clone());
        match policy.on_crash(&mut entry.history, Instant::now(), uptime, draw) {
            Decision::Restart { delay } => {
                entry.rec.restarts = entry.rec.restarts.saturating_add(1);
                entry.restart_token = Some(token);
                tracing::warn!(%user_id, %error, delay_ms = delay.as_millis() as u64, "session crashed; restarting");
                let due = SupervisorMsg::RestartDue {
                    user_id: user_id.to_string(),
                    token,
                };
                if delay.is_zero() {
                    // A timer, even of 0, waits for the next tick of tokio's 1 ms wheel.
                    let _ = myself.cast(due);
                } else {
                    myself.send_after(delay, move || due);
                }
                self.set_state(user_id, SessionState::Restarting);
            }
            Decision::GiveUp => {
                let msg = format!(
                    "gave up after {} restarts within {:?}; last error: {error}",
                    policy.max_restarts, policy.window
                );
                tracing::error!(%user_id, %msg, "session failed");
                entry.rec.last_error = Some(msg.clone());
                let creating = !entry.create_waiters.is_empty();
                self.set_state(user_id, SessionState::Failed);
                if creating {
                    // A create that never got going: leave nothing behind.
                    self.abort_create(
                        user_id,
                        CmdError::Unavailable(format!(
                            "Session could not be started ({msg}); nothing was created"
                        )),
                    );
                }
            }
        }
    }

    pub(super) async fn restart_due(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        user_id: &str,
        token: u64,
    ) {
        let due = self.sessions.get(user_id).is_some_and(|e| {
            e.restart_token == Some(token)
                && e.child.is_none()
                && e.rec.desired == Desired::Running
                && self.shutdown.is_none()
        });
        if due {
            self.spawn_child(myself, user_id).await;
        }
    }

    /// Forgets a session: its record (and what the store keeps for it) and its link data.
    pub(super) fn remove_session(&mut self, user_id: &str) -> Result<(), CmdError> {
        let by = self.sessions.remove(user_id).and_then(|e| e.rec.by);
        self.persistence.delete(user_id, by.as_deref());
        self.link
            .remove_data(user_id)
            .map_err(|e| CmdError::Internal(format!("could not delete the session's files: {e}")))
    }

    /// Asks a child to stop (or to log out first) and arms the kill deadline.
    pub(super) fn stop_child(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        user_id: &str,
        logout: bool,
    ) {
        let Some(child) = self.sessions.get(user_id).and_then(|e| e.child.as_ref()) else {
            return;
        };
        let mut deadline = self.config.shutdown_timeout + Duration::from_millis(250);
        if logout {
            let _ = child.actor.cast(SessionMsg::Logout);
            deadline += self.config.shutdown_timeout;
        } else {
            child.actor.stop(None);
        }
        let incarnation = child.incarnation;
        let uid = user_id.to_string();
        myself.send_after(deadline, move || SupervisorMsg::KillDeadline {
            user_id: uid,
            incarnation,
        });
    }

    pub(super) fn kill_deadline(&mut self, user_id: &str, incarnation: u64) {
        if let Some(child) = self.sessions.get(user_id).and_then(|e| e.child.as_ref()) {
            if child.incarnation == incarnation {
                tracing::warn!(%user_id, "session did not stop in time; killing it");
                child.actor.kill();
            }
        }
    }

    /// A child is gone; act on why.
    pub(super) async fn child_exited(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        id: ActorId,
        failure: Option<String>,
    ) {
        let Some(user_id) = self.children.remove(&id) else {
            return;
        };
        self.boot_slot_freed(myself, &user_id);
        let Some(entry) = self.sessions.get_mut(&user_id) else {
            return;
        };
        if entry.child.as_ref().map(|c| c.actor.get_id()) != Some(id) {
            return;
        }
        if entry.released {
            self.forget_released(myself, &user_id);
            self.check_shutdown_done();
            return;
        }
        let exit = entry.child.as_ref().and_then(|c| c.slot.take_exit());
        let intent = entry.intent.take();
        if !matches!(intent, Some(Intent::Hung(_)) | None) {
            entry.child = None;
        }
        match intent {
            Some(Intent::Hung(what)) => self.crashed(myself, &user_id, what),
            Some(Intent::Stop(waiters)) => {
                self.set_state(&user_id, SessionState::Stopped);
                for w in waiters {
                    self.reply_durable(w, ());
                }
            }
            Some(Intent::Delete(reply)) => self.finish_removal(&user_id, reply, ()),
            Some(Intent::Logout(reply)) => {
                let warning = match exit {
                    Some(ChildExit::LogoutDone(w)) => w,
                    _ => Some("the session stopped before the logout completed".to_string()),
                };
                self.finish_removal(&user_id, reply, warning);
            }
            Some(Intent::Restore(apply, reply)) => {
                self.begin_restore(myself, &user_id, apply, reply)
            }
            Some(Intent::Restoring(reply)) => {
                // Cannot happen (no child while restoring); keep the restore going.
                if let Some(e) = self.sessions.get_mut(&user_id) {
                    e.intent = Some(Intent::Restoring(reply));
                }
            }
            Some(Intent::CreateAbort(err)) => self.abort_create(&user_id, err),
            Some(Intent::Shutdown) => self.set_state(&user_id, SessionState::Stopped),
            None => self.exited_by_itself(myself, &user_id, exit, failure),
        }
        self.check_shutdown_done();
    }

    /// The child ended without being asked: a terminal network event, or a crash.
    fn exited_by_itself(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        user_id: &str,
        exit: Option<ChildExit>,
        failure: Option<String>,
    ) {
        let Some(entry) = self.sessions.get_mut(user_id) else {
            return;
        };
        let state = match exit {
            Some(ChildExit::LoggedOut(reason)) => {
                entry.rec.last_error = Some(format!(
                    "logged out from the phone (device unlinked): {reason}"
                ));
                tracing::warn!(%user_id, "session logged out by the phone; its credentials are wiped once that is stored");
                entry.wipe_pending = true;
                SessionState::LoggedOut
            }
            Some(ChildExit::Replaced(reason)) => {
                entry.rec.desired = Desired::Stopped;
                entry.rec.last_error = Some(format!(
                    "connection replaced: the account connected elsewhere ({reason}); not restarted"
                ));
                SessionState::Stopped
            }
            Some(ChildExit::Banned(reason)) => {
                entry.rec.last_error = Some(format!("banned: {reason}"));
                SessionState::Failed
            }
            Some(ChildExit::Broken(reason)) => {
                tracing::error!(%user_id, error = %reason, "session failed: its link cannot work");
                entry.rec.last_error = Some(reason);
                if !entry.create_waiters.is_empty() {
                    let error = entry.rec.last_error.clone().unwrap_or_default();
                    entry.child = None;
                    return self.abort_create(
                        user_id,
                        CmdError::Unavailable(format!(
                            "Session could not be started ({error}); nothing was created"
                        )),
                    );
                }
                SessionState::Failed
            }
            Some(ChildExit::LogoutDone(_)) | None => {
                let error = failure.unwrap_or_else(|| "the session stopped unexpectedly".into());
                return self.crashed(myself, user_id, error);
            }
        };
        if let Some(entry) = self.sessions.get_mut(user_id) {
            entry.child = None;
        }
        self.set_state(user_id, state);
        if state == SessionState::LoggedOut {
            let id = user_id.to_string();
            self.when_durable(myself, move |result| SupervisorMsg::WipeLoggedOut {
                user_id: id,
                committed: Some(result),
            });
        }
    }

    /// The credentials of a session logged out by the phone go once `logged_out` is
    /// durable; while commits fail, this waits for the next one that succeeds.
    pub(super) fn wipe_logged_out(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        user_id: &str,
        committed: Option<Result<(), StorageError>>,
    ) {
        if !self.sessions.get(user_id).is_some_and(|e| e.wipe_pending) {
            return; // started, deleted or already wiped meanwhile
        }
        let id = user_id.to_string();
        match committed {
            None => self.when_durable(myself, move |result| SupervisorMsg::WipeLoggedOut {
                user_id: id,
                committed: Some(result),
            }),
            Some(Ok(())) => self.wipe_now(user_id),
            Some(Err(e)) => {
                tracing::warn!(%user_id, error = %e,
                    "logged_out is not stored yet; its credentials are wiped once it is");
                let me = myself.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    let _ = me.cast(SupervisorMsg::WipeLoggedOut {
                        user_id: id,
                        committed: None,
                    });
                });
            }
        }
    }

    /// Wipes a logged-out session's credentials now, if they are due.
    pub(super) fn wipe_now(&mut self, user_id: &str) {
        let Some(entry) = self.sessions.get_mut(user_id) else {
            return;
        };
        if !std::mem::take(&mut entry.wipe_pending) {
            return;
        }
        match self.link.remove_data(user_id) {
            Ok(()) => tracing::info!(%user_id, "credentials of the logged-out session wiped"),
            Err(e) => tracing::error!(%user_id, error = %e, "could not wipe credentials"),
        }
    }

    /// A create that will not complete: remove what it made and answer its callers.
    pub(super) fn abort_create(&mut self, user_id: &str, err: CmdError) {
        let Some(entry) = self.sessions.get_mut(user_id) else {
            return;
        };
        let waiters = std::mem::take(&mut entry.create_waiters);
        if let Err(e) = self.remove_session(user_id) {
            tracing::error!(%user_id, error = %e, "could not roll back a create");
        }
        for w in waiters {
            let _ = w.send(Err(err.clone()));
        }
    }

    /// The created session's row is durable: start it (or roll back if it is not).
    pub(super) async fn stored(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        user_id: &str,
        token: u64,
        result: Result<(), StorageError>,
    ) {
        let pending = self.sessions.get(user_id).is_some_and(|e| {
            e.create_token == Some(token)
                && !e.create_waiters.is_empty()
                && e.child.is_none()
                && e.intent.is_none()
        });
        if !pending || self.shutdown.is_some() {
            return;
        }
        match result {
            Ok(()) => self.spawn_child(myself, user_id).await,
            Err(e) => {
                tracing::error!(%user_id, error = %e, "could not store a new session");
                self.abort_create(user_id, CmdError::Storage(e));
            }
        }
    }

    pub(super) fn create_deadline(&mut self, user_id: &str, token: u64) {
        let Some(entry) = self.sessions.get_mut(user_id) else {
            return;
        };
        if entry.create_token != Some(token) || entry.create_waiters.is_empty() {
            return;
        }
        let cause = entry
            .rec
            .last_error
            .as_deref()
            .map(|e| format!(" (last error: {e})"))
            .unwrap_or_default();
        let err = CmdError::Unavailable(format!(
            "Timed out after {:?} waiting for a pairing code{cause}; the session was not created",
            self.config.create_timeout
        ));
        tracing::warn!(%user_id, "create timed out; rolling back");
        match &entry.child {
            Some(c) => {
                c.actor.kill();
                entry.intent = Some(Intent::CreateAbort(err));
            }
            None => self.abort_create(user_id, err),
        }
    }

    /// The child is gone: run the restore's file work off the supervisor.
    pub(super) fn begin_restore(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        user_id: &str,
        apply: RestoreFn,
        reply: Reply<SessionRecord>,
    ) {
        let Some(entry) = self.sessions.get_mut(user_id) else {
            let _ = reply.send(Err(CmdError::not_found(user_id)));
            return;
        };
        let rec = entry.rec.clone();
        entry.intent = Some(Intent::Restoring(reply));
        let me = myself.clone();
        let user_id = user_id.to_string();
        tokio::spawn(async move {
            let result = apply(rec).await;
            let _ = me.cast(SupervisorMsg::Restored { user_id, result });
        });
    }

    /// The restore's file work is done: start the session again if it should run.
    pub(super) async fn restored(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        user_id: &str,
        result: Result<SessionRecord, CmdError>,
    ) {
        let Some(entry) = self.sessions.get_mut(user_id) else {
            return;
        };
        let reply = match entry.intent.take() {
            Some(Intent::Restoring(reply)) => reply,
            other => {
                entry.intent = other;
                return;
            }
        };
        if let Ok(restored) = &result {
            entry.rec.phone_number = restored.phone_number.clone();
            entry.rec.name = restored.name.clone();
            entry.rec.updated_at_ms = now_ms();
        }
        entry.history.reset();
        entry.rec.restarts = 0;
        if entry.rec.desired == Desired::Running && self.shutdown.is_none() {
            self.spawn_child(myself, user_id).await;
        } else {
            self.set_state(user_id, SessionState::Stopped);
        }
        match result {
            Ok(_) => self.reply_with_record(user_id, reply),
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
        self.check_shutdown_done();
    }
}
