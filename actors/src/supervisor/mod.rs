//! The root `Supervisor`: owns the set of sessions, spawns one linked `SessionActor` per
//! running session, restarts crashed ones under the `RestartPolicy`, and survives
//! whatever a child does.
//!
//! It never awaits a child or the disk: commands that need a child to finish (stop,
//! delete, logout, restore) record an *intent* and are answered when the child's exit
//! arrives (or a kill deadline forces it); writes go to the store's queue, and a reply
//! that must be durable is sent by a small task once the store's `flush` resolves.
//! Delays (backoff, deadlines, boot batches) are messages sent to itself.
//!
//! - [`messages`]: what it is asked; [`config`]: its tunables and reply deadlines;
//! - `entry`: what it keeps per session; `commands`: the API's commands;
//! - `lifecycle`: spawn, crash, exit, restore; `link_events`: what sessions report;
//! - `boot`: resume at start, and shutdown; `watchdog`: finds hung sessions.

mod boot;
mod commands;
pub mod config;
mod entry;
mod lifecycle;
mod link_events;
pub mod messages;
mod watchdog;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use crate::error::{CmdError, StorageError};
use crate::link::Link;
use crate::persistence::Persistence;
use crate::policy::Jitter;
use crate::record::{now_ms, SessionRecord, SessionState};

pub use config::{Command, SupervisorConfig};
use entry::Entry;
pub use messages::{Audit, Health, Reply, RestoreFn, SupervisorMsg};

/// Everything the supervisor starts with.
pub struct SupervisorArgs {
    /// Tunables.
    pub config: SupervisorConfig,
    /// The network.
    pub link: Arc<dyn Link>,
    /// Where records go.
    pub persistence: Arc<dyn Persistence>,
    /// Sessions found in the store at boot.
    pub boot: Vec<SessionRecord>,
}

/// The supervisor's state.
pub struct SupervisorState {
    config: SupervisorConfig,
    link: Arc<dyn Link>,
    persistence: Arc<dyn Persistence>,
    sessions: HashMap<String, Entry>,
    children: HashMap<ActorId, String>,
    next_incarnation: u64,
    next_token: u64,
    jitter: Jitter,
    boot_queue: VecDeque<String>,
    /// Sessions resumed at boot whose link has not connected yet (at most `boot_batch`).
    booting: HashSet<String>,
    /// A `BootNext` is on its way.
    boot_scheduled: bool,
    shutdown: Option<Vec<RpcReplyPort<()>>>,
    /// Planned handoffs: the sessions each still waits for, and its reply.
    handoffs: Vec<(HashSet<String>, RpcReplyPort<()>)>,
    /// The stored sessions, from `pre_start` until `post_start` boots them (so that the
    /// spawn, and the HTTP listener after it, do not wait for a large fleet's boot).
    stored: Vec<SessionRecord>,
}

/// The root supervisor actor.
pub struct Supervisor;

impl SupervisorState {
    fn token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }

    /// Checks that every live actor belongs to a session that should have one, and every
    /// session that should run has an actor or a restart on its way.
    fn audit(&self) -> messages::Audit {
        let mut problems = Vec::new();
        let mut live = Vec::new();
        for (user_id, e) in &self.sessions {
            let busy = e.intent.is_some() || !e.create_waiters.is_empty();
            match &e.child {
                Some(c) => {
                    live.push(user_id.clone());
                    if self.children.get(&c.actor.get_id()) != Some(user_id) {
                        problems.push(format!("{user_id}: its actor is not registered as a child"));
                    }
                    if !e.rec.state.is_active() && !busy {
                        problems.push(format!(
                            "{user_id}: a live actor, but the session is {}",
                            e.rec.state
                        ));
                    }
                }
                None => {
                    let waiting =
                        e.restart_token.is_some() || self.boot_queue.contains(user_id) || busy;
                    if e.rec.state.is_active() && !waiting {
                        problems.push(format!(
                            "{user_id}: {} but no actor and no restart pending",
                            e.rec.state
                        ));
                    }
                }
            }
        }
        for (actor, user_id) in &self.children {
            let owned = self
                .sessions
                .get(user_id)
                .and_then(|e| e.child.as_ref())
                .is_some_and(|c| c.actor.get_id() == *actor);
            if !owned {
                problems.push(format!("{user_id}: a child actor the session does not own"));
            }
        }
        live.sort();
        let mut records: Vec<SessionRecord> =
            self.sessions.values().map(|e| e.rec.clone()).collect();
        records.sort_by(|a, b| a.user_id.cmp(&b.user_id));
        messages::Audit {
            records,
            live,
            problems,
        }
    }

    /// Queues a changed record (the view follows at once, the disk at the next commit).
    fn save(&self, user_id: &str) {
        if let Some(e) = self.sessions.get(user_id) {
            self.persistence.save(&e.rec);
        }
    }

    fn set_state(&mut self, user_id: &str, state: SessionState) {
        if let Some(e) = self.sessions.get_mut(user_id) {
            e.rec.state = state;
            e.rec.updated_at_ms = now_ms();
            if state != SessionState::Pairing {
                e.rec.clear_pairing();
            }
        }
        self.save(user_id);
    }

    /// The session, if it exists and nothing is in flight for it; otherwise the reply is
    /// answered with why not and `None` comes back.
    fn idle<T>(&mut self, user_id: &str, reply: Reply<T>) -> Option<(&mut Entry, Reply<T>)> {
        let refusal = if self.shutdown.is_some() {
            Some(CmdError::shutting_down())
        } else {
            match self.sessions.get(user_id) {
                None => Some(CmdError::not_found(user_id)),
                Some(e) => e.busy(),
            }
        };
        match (refusal, self.sessions.get_mut(user_id)) {
            (None, Some(entry)) => Some((entry, reply)),
            (refusal, _) => {
                let _ = reply.send(Err(refusal.unwrap_or_else(|| CmdError::not_found(user_id))));
                None
            }
        }
    }

    /// Answers `reply` with `value` once everything written so far is durable.
    fn reply_durable<T: Send + 'static>(&self, reply: Reply<T>, value: T) {
        let flushed = self.persistence.flush();
        tokio::spawn(async move {
            let _ = reply.send(flushed.await.map(|()| value).map_err(CmdError::from));
        });
    }

    /// Tells the supervisor, with `then`, once everything written so far is durable.
    fn when_durable(
        &self,
        myself: &ActorRef<SupervisorMsg>,
        then: impl FnOnce(Result<(), StorageError>) -> SupervisorMsg + Send + 'static,
    ) {
        let flushed = self.persistence.flush();
        let me = myself.clone();
        tokio::spawn(async move {
            let _ = me.cast(then(flushed.await));
        });
    }

    async fn handle_msg(&mut self, myself: &ActorRef<SupervisorMsg>, msg: SupervisorMsg) {
        match msg {
            SupervisorMsg::Create {
                user_id,
                phone_number,
                by,
                reply,
            } => self.create(myself, user_id, phone_number, by, reply),
            SupervisorMsg::Start { user_id, by, reply } => {
                self.start(myself, &user_id, by, reply).await
            }
            SupervisorMsg::Stop { user_id, by, reply } => self.stop(myself, &user_id, by, reply),
            SupervisorMsg::Delete { user_id, by, reply } => {
                self.delete(myself, &user_id, by, reply)
            }
            SupervisorMsg::Logout { user_id, by, reply } => {
                self.logout(myself, &user_id, by, reply)
            }
            SupervisorMsg::Fault {
                user_id,
                fault,
                reply,
            } => self.fault(myself, &user_id, fault, reply),
            SupervisorMsg::Act {
                user_id,
                action,
                reply,
            } => self.act(&user_id, action, reply),
            SupervisorMsg::Restore {
                user_id,
                apply,
                by,
                reply,
            } => self.restore(myself, &user_id, apply, by, reply),
            SupervisorMsg::Health(reply) => {
                let _ = reply.send(messages::Health {
                    sessions: self.sessions.len(),
                    boot_pending: self.boot_queue.len(),
                    shutting_down: self.shutdown.is_some(),
                });
            }
            SupervisorMsg::Audit(reply) => {
                let _ = reply.send(self.audit());
            }
            SupervisorMsg::Get { user_id, reply } => {
                let rec = self.sessions.get(&user_id).map(|e| e.rec.clone());
                let _ = reply.send(rec.ok_or_else(|| CmdError::not_found(&user_id)));
            }
            SupervisorMsg::Unresponsive {
                user_id,
                incarnation,
                what,
            } => self.unresponsive(&user_id, incarnation, &what),
            SupervisorMsg::Child {
                user_id,
                incarnation,
                event,
            } => self.child_event(&user_id, incarnation, event),
            SupervisorMsg::Stored {
                user_id,
                token,
                result,
            } => self.stored(myself, &user_id, token, result).await,
            SupervisorMsg::WipeLoggedOut { user_id, committed } => {
                self.wipe_logged_out(myself, &user_id, committed)
            }
            SupervisorMsg::Restored { user_id, result } => {
                self.restored(myself, &user_id, result).await
            }
            SupervisorMsg::RestartDue { user_id, token } => {
                self.restart_due(myself, &user_id, token).await
            }
            SupervisorMsg::CreateDeadline { user_id, token } => {
                self.create_deadline(&user_id, token)
            }
            SupervisorMsg::KillDeadline {
                user_id,
                incarnation,
            } => self.kill_deadline(&user_id, incarnation),
            SupervisorMsg::Watchdog => self.watchdog(myself),
            SupervisorMsg::ChildStarted {
                user_id,
                incarnation,
            } => self.child_started(myself, &user_id, incarnation),
            SupervisorMsg::BootNext => self.boot_next(myself).await,
            SupervisorMsg::Shutdown(reply) => self.begin_shutdown(myself, reply),
            SupervisorMsg::Adopt(recs) => self.adopt(myself, recs),
            SupervisorMsg::Release(ids) => self.release(myself, ids),
            SupervisorMsg::Handoff { user_ids, reply } => {
                self.handoffs
                    .push((user_ids.iter().cloned().collect(), reply));
                self.release(myself, Some(user_ids));
                self.check_handoffs();
            }
        }
    }
}

impl Actor for Supervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<SupervisorMsg>,
        args: SupervisorArgs,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        let jitter = match args.config.jitter_seed {
            Some(seed) => Jitter::seeded(seed),
            None => Jitter::from_entropy(),
        };
        let state = SupervisorState {
            config: args.config,
            link: args.link,
            persistence: args.persistence,
            sessions: HashMap::new(),
            children: HashMap::new(),
            next_incarnation: 0,
            next_token: 0,
            jitter,
            boot_queue: VecDeque::new(),
            booting: HashSet::new(),
            boot_scheduled: false,
            shutdown: None,
            handoffs: Vec::new(),
            stored: args.boot,
        };
        myself.send_after(state.config.watchdog_interval, || SupervisorMsg::Watchdog);
        Ok(state)
    }

    async fn post_start(
        &self,
        myself: ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        let stored = std::mem::take(&mut state.stored);
        state.boot(&myself, stored);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<SupervisorMsg>,
        msg: SupervisorMsg,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        state.handle_msg(&myself, msg).await;
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SupervisorMsg>,
        event: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        // Never stop the supervisor because of a child: decide per event.
        match event {
            SupervisionEvent::ActorTerminated(cell, _, _) => {
                state.child_exited(&myself, cell.get_id(), None).await
            }
            SupervisionEvent::ActorFailed(cell, err) => {
                state
                    .child_exited(&myself, cell.get_id(), Some(err.to_string()))
                    .await
            }
            _ => {}
        }
        Ok(())
    }
}
