//! The root `Supervisor`: owns the set of sessions, spawns one linked `SessionActor`
//! per running session, restarts crashed ones under the `RestartPolicy`, and survives
//! whatever a child does.
//!
//! It never awaits a child: commands that need a child to finish (stop, delete, logout,
//! restore) record an *intent* and are answered when the child's exit arrives (or a
//! kill deadline forces it). Delays (backoff, deadlines, boot batches) are messages sent
//! to itself, so it keeps answering while sessions wait.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tokio::time::Instant;

use crate::link::{Fault, Link, LinkEvent, SessionSpec};
use crate::policy::{Decision, Jitter, RestartHistory, RestartPolicy};
use crate::record::{now_ms, Desired, SessionRecord, SessionState};
use crate::session::{ChildExit, ExitSlot, SessionActor, SessionArgs, SessionMsg};

/// Where the supervisor writes session records. Calls are short and synchronous.
pub trait Persistence: Send + Sync + 'static {
    /// Stores a new session; fails if one with this id exists.
    fn insert(&self, rec: &SessionRecord) -> Result<(), String>;
    /// Stores the current record (the pairing code is never persisted).
    fn save(&self, rec: &SessionRecord) -> Result<(), String>;
    /// Forgets a session.
    fn delete(&self, user_id: &str) -> Result<(), String>;
}

/// Why a command was refused; the front end maps each kind to an HTTP status.
#[derive(Debug, Clone, PartialEq)]
pub enum CmdError {
    /// No such session.
    NotFound(String),
    /// A session with this id exists.
    Exists,
    /// The session is not in a state that allows this.
    Conflict(String),
    /// The network refused (e.g. pairing throttled).
    Rejected(String),
    /// Not answered in time / shutting down / out of resources.
    Unavailable(String),
    /// A bug or a storage failure.
    Internal(String),
}

impl fmt::Display for CmdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CmdError::NotFound(m)
            | CmdError::Conflict(m)
            | CmdError::Rejected(m)
            | CmdError::Unavailable(m)
            | CmdError::Internal(m) => f.write_str(m),
            CmdError::Exists => f.write_str("session exists"),
        }
    }
}

/// A reply port for a command.
pub type Reply<T> = RpcReplyPort<Result<T, CmdError>>;

/// Work done on a session's files while its actor is stopped (a restore). It may update
/// the record (e.g. phone number and name from the backup).
pub type RestoreFn = Box<dyn FnOnce(&mut SessionRecord) -> Result<(), String> + Send>;

/// Tunables of the supervisor.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// When and how fast to restart crashed sessions.
    pub policy: RestartPolicy,
    /// How long a session gets to close before it is killed.
    pub shutdown_timeout: Duration,
    /// How long a session gets to answer a watchdog ping.
    pub call_timeout: Duration,
    /// How often the watchdog pings every live session.
    pub watchdog_interval: Duration,
    /// How long a create waits for the first pairing code before it is rolled back.
    pub create_timeout: Duration,
    /// Sessions started per boot batch.
    pub boot_batch: usize,
    /// Pause between boot batches (staggers first connects).
    pub boot_interval: Duration,
    /// Seed for the jitter source (`None`: from the clock).
    pub jitter_seed: Option<u64>,
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        SupervisorConfig {
            policy: RestartPolicy::default(),
            shutdown_timeout: Duration::from_secs(10),
            call_timeout: Duration::from_secs(5),
            watchdog_interval: Duration::from_secs(10),
            create_timeout: Duration::from_secs(30),
            boot_batch: 32,
            boot_interval: Duration::from_millis(200),
            jitter_seed: None,
        }
    }
}

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

/// Messages the supervisor handles.
pub enum SupervisorMsg {
    /// Create a session; answered with the record once the first pairing code is out.
    Create {
        /// New id.
        user_id: String,
        /// Phone to pair.
        phone_number: String,
        /// Answered with the record (carrying the pairing code).
        reply: Reply<SessionRecord>,
    },
    /// Start a stopped/failed/logged-out session (idempotent for a running one).
    Start {
        /// Which.
        user_id: String,
        /// Answered once the child is spawned.
        reply: Reply<SessionRecord>,
    },
    /// Stop a session and keep it stopped.
    Stop {
        /// Which.
        user_id: String,
        /// Answered once the child is gone.
        reply: Reply<()>,
    },
    /// Stop a session and delete it with its credentials.
    Delete {
        /// Which.
        user_id: String,
        /// Answered once it is gone.
        reply: Reply<()>,
    },
    /// Unlink the device from the account, then delete the session.
    Logout {
        /// Which.
        user_id: String,
        /// Answered once it is gone, with a warning if the network did not confirm.
        reply: Reply<Option<String>>,
    },
    /// Inject a fault into a running session.
    Fault {
        /// Which.
        user_id: String,
        /// What.
        fault: Fault,
        /// Answered by the session actor itself.
        reply: Reply<()>,
    },
    /// Stop the session, run `apply` on its files, start it again if it should run.
    Restore {
        /// Which.
        user_id: String,
        /// The swap.
        apply: RestoreFn,
        /// Answered with the record after the restart.
        reply: Reply<SessionRecord>,
    },
    /// One record.
    Get {
        /// Which.
        user_id: String,
        /// The record.
        reply: Reply<SessionRecord>,
    },
    /// All records.
    List(RpcReplyPort<Vec<SessionRecord>>),
    /// A session did not answer a call in time: kill it and restart it like a crash.
    Unresponsive {
        /// Which.
        user_id: String,
        /// Which incarnation was asked (`None`: the current one).
        incarnation: Option<u64>,
        /// What it failed to answer.
        what: String,
    },
    /// An event reported by a session actor.
    Child {
        /// Which.
        user_id: String,
        /// Reporter's incarnation (stale reports are dropped).
        incarnation: u64,
        /// What happened.
        event: LinkEvent,
    },
    /// A backoff elapsed.
    RestartDue {
        /// Which.
        user_id: String,
        /// Must match the pending restart.
        token: u64,
    },
    /// A create waited too long for its pairing code.
    CreateDeadline {
        /// Which.
        user_id: String,
        /// Must match the pending create.
        token: u64,
    },
    /// A stopping child took too long.
    KillDeadline {
        /// Which.
        user_id: String,
        /// Must match the child.
        incarnation: u64,
    },
    /// Ping every live child.
    Watchdog,
    /// Start the next batch of sessions restored at boot.
    BootNext,
    /// Stop every session (desired states untouched); answered when all are gone.
    Shutdown(RpcReplyPort<()>),
}

struct Child {
    actor: ActorRef<SessionMsg>,
    incarnation: u64,
    started: Instant,
    exit: ExitSlot,
}

enum Intent {
    Stop(Vec<Reply<()>>),
    Delete(Reply<()>),
    Logout(Reply<Option<String>>),
    Restore(RestoreFn, Reply<SessionRecord>),
    CreateAbort(CmdError),
    Hung(String),
    Shutdown,
}

impl Intent {
    fn describe(&self) -> &'static str {
        match self {
            Intent::Stop(_) => "a stop",
            Intent::Delete(_) => "a delete",
            Intent::Logout(_) => "a logout",
            Intent::Restore(..) => "a restore",
            Intent::CreateAbort(_) => "a create",
            Intent::Hung(_) => "a restart",
            Intent::Shutdown => "the shutdown",
        }
    }
}

struct Entry {
    rec: SessionRecord,
    child: Option<Child>,
    history: RestartHistory,
    restart_token: Option<u64>,
    create_waiters: Vec<Reply<SessionRecord>>,
    create_token: Option<u64>,
    intent: Option<Intent>,
}

impl Entry {
    fn new(rec: SessionRecord) -> Entry {
        Entry {
            rec,
            child: None,
            history: RestartHistory::default(),
            restart_token: None,
            create_waiters: Vec::new(),
            create_token: None,
            intent: None,
        }
    }
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
    shutdown: Option<Vec<RpcReplyPort<()>>>,
}

/// The root supervisor actor.
pub struct Supervisor;

fn not_found(user_id: &str) -> CmdError {
    CmdError::NotFound(format!("Session {user_id} not found"))
}

impl SupervisorState {
    fn token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }

    /// Persists a changed record (the view and the database follow it).
    fn save(&self, user_id: &str) {
        if let Some(e) = self.sessions.get(user_id) {
            if let Err(err) = self.persistence.save(&e.rec) {
                tracing::error!(%user_id, error = %err, "could not persist session");
            }
        }
    }

    fn set_state(&mut self, user_id: &str, state: SessionState) {
        if let Some(e) = self.sessions.get_mut(user_id) {
            e.rec.state = state;
            e.rec.updated_at_ms = now_ms();
            if state != SessionState::Pairing {
                e.rec.pairing = None;
            }
        }
        self.save(user_id);
    }

    async fn spawn_child(&mut self, myself: &ActorRef<SupervisorMsg>, user_id: &str) {
        self.next_incarnation += 1;
        let incarnation = self.next_incarnation;
        let Some(entry) = self.sessions.get_mut(user_id) else {
            return;
        };
        entry.restart_token = None;
        let spec = SessionSpec {
            user_id: entry.rec.user_id.clone(),
            phone_number: entry.rec.phone_number.clone(),
        };
        let exit: ExitSlot = Arc::new(Mutex::new(None));
        let args = SessionArgs {
            spec,
            incarnation,
            link: self.link.clone(),
            supervisor: myself.clone(),
            exit: exit.clone(),
            shutdown_timeout: self.config.shutdown_timeout,
        };
        match Actor::spawn_linked(None, SessionActor, args, myself.get_cell()).await {
            Ok((actor, _join)) => {
                self.children.insert(actor.get_id(), user_id.to_string());
                entry.child = Some(Child {
                    actor,
                    incarnation,
                    started: Instant::now(),
                    exit,
                });
                tracing::info!(%user_id, incarnation, "session started");
                self.set_state(user_id, SessionState::Starting);
            }
            Err(e) => {
                self.crashed(myself, user_id, format!("could not spawn the session: {e}"));
            }
        }
    }

    /// A child crashed (or could not start): restart under the policy, or fail.
    fn crashed(&mut self, myself: &ActorRef<SupervisorMsg>, user_id: &str, error: String) {
        let draw = self.jitter.next_f64();
        let token = self.token();
        let policy = self.config.policy.clone();
        let Some(entry) = self.sessions.get_mut(user_id) else {
            return;
        };
        let uptime = entry
            .child
            .as_ref()
            .map(|c| c.started.elapsed())
            .unwrap_or_default();
        entry.child = None;
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
                let uid = user_id.to_string();
                myself.send_after(delay, move || SupervisorMsg::RestartDue {
                    user_id: uid,
                    token,
                });
                self.set_state(user_id, SessionState::Restarting);
            }
            Decision::GiveUp => {
                let msg = format!(
                    "gave up after {} restarts within {:?}; last error: {error}",
                    policy.max_restarts, policy.window
                );
                tracing::error!(%user_id, %msg, "session failed");
                entry.rec.last_error = Some(msg.clone());
                let waiters = std::mem::take(&mut entry.create_waiters);
                self.set_state(user_id, SessionState::Failed);
                if !waiters.is_empty() {
                    // A create that never got going: leave nothing behind.
                    let err = CmdError::Unavailable(format!(
                        "Session could not be started ({msg}); nothing was created"
                    ));
                    if let Err(e) = self.remove_session(user_id) {
                        tracing::error!(%user_id, error = %e, "could not roll back a failed create");
                    }
                    for w in waiters {
                        let _ = w.send(Err(err.clone()));
                    }
                }
            }
        }
    }

    /// Deletes a session's record and link data.
    fn remove_session(&mut self, user_id: &str) -> Result<(), CmdError> {
        self.sessions.remove(user_id);
        self.boot_queue.retain(|u| u != user_id);
        let db = self.persistence.delete(user_id);
        let files = self.link.remove_data(user_id);
        db.map_err(|e| CmdError::Internal(format!("could not delete the session record: {e}")))?;
        files.map_err(|e| CmdError::Internal(format!("could not delete the session's files: {e}")))
    }

    /// Asks a child to stop (or to log out first) and arms the kill deadline.
    fn stop_child(&mut self, myself: &ActorRef<SupervisorMsg>, user_id: &str, logout: bool) {
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

    /// A child is gone; act on why.
    async fn child_exited(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        id: ActorId,
        failure: Option<String>,
    ) {
        let Some(user_id) = self.children.remove(&id) else {
            return;
        };
        let Some(entry) = self.sessions.get_mut(&user_id) else {
            return;
        };
        if entry.child.as_ref().map(|c| c.actor.get_id()) != Some(id) {
            return;
        }
        let exit = entry
            .child
            .as_ref()
            .and_then(|c| c.exit.lock().ok().and_then(|mut s| s.take()));
        let intent = entry.intent.take();
        match intent {
            Some(Intent::Hung(what)) => self.crashed(myself, &user_id, what),
            Some(Intent::Stop(waiters)) => {
                entry.child = None;
                self.set_state(&user_id, SessionState::Stopped);
                for w in waiters {
                    let _ = w.send(Ok(()));
                }
            }
            Some(Intent::Delete(reply)) => {
                let _ = reply.send(self.remove_session(&user_id));
            }
            Some(Intent::Logout(reply)) => {
                let warning = match exit {
                    Some(ChildExit::LogoutDone(w)) => w,
                    _ => Some("the session stopped before the logout completed".to_string()),
                };
                let _ = reply.send(self.remove_session(&user_id).map(|_| warning));
            }
            Some(Intent::Restore(apply, reply)) => {
                entry.child = None;
                let result = self.apply_restore(myself, &user_id, apply).await;
                let _ = reply.send(result);
            }
            Some(Intent::CreateAbort(err)) => {
                let waiters = std::mem::take(&mut entry.create_waiters);
                let _ = self.remove_session(&user_id);
                for w in waiters {
                    let _ = w.send(Err(err.clone()));
                }
            }
            Some(Intent::Shutdown) => {
                entry.child = None;
                self.set_state(&user_id, SessionState::Stopped);
            }
            None => match exit {
                Some(ChildExit::LoggedOut(reason)) => {
                    entry.child = None;
                    entry.rec.last_error = Some(format!(
                        "logged out from the phone (device unlinked): {reason}"
                    ));
                    tracing::warn!(%user_id, "session logged out by the phone; credentials wiped");
                    if let Err(e) = self.link.remove_data(&user_id) {
                        tracing::error!(%user_id, error = %e, "could not wipe credentials");
                    }
                    self.set_state(&user_id, SessionState::LoggedOut);
                }
                Some(ChildExit::Replaced(reason)) => {
                    entry.child = None;
                    entry.rec.desired = Desired::Stopped;
                    entry.rec.last_error = Some(format!(
                        "connection replaced: the account connected elsewhere ({reason}); not restarted"
                    ));
                    self.set_state(&user_id, SessionState::Stopped);
                }
                Some(ChildExit::Banned(reason)) => {
                    entry.child = None;
                    entry.rec.last_error = Some(format!("banned: {reason}"));
                    self.set_state(&user_id, SessionState::Failed);
                }
                Some(ChildExit::LogoutDone(_)) | None => {
                    let error =
                        failure.unwrap_or_else(|| "the session stopped unexpectedly".into());
                    self.crashed(myself, &user_id, error);
                }
            },
        }
        self.check_shutdown_done();
    }

    async fn apply_restore(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        user_id: &str,
        apply: RestoreFn,
    ) -> Result<SessionRecord, CmdError> {
        let Some(entry) = self.sessions.get_mut(user_id) else {
            return Err(not_found(user_id));
        };
        let applied = apply(&mut entry.rec);
        entry.history.reset();
        entry.rec.restarts = 0;
        let run = entry.rec.desired == Desired::Running;
        if run {
            self.spawn_child(myself, user_id).await;
        } else {
            self.set_state(user_id, SessionState::Stopped);
        }
        applied.map_err(|e| CmdError::Internal(format!("restore failed: {e}")))?;
        self.sessions
            .get(user_id)
            .map(|e| e.rec.clone())
            .ok_or_else(|| not_found(user_id))
    }

    fn check_shutdown_done(&mut self) {
        if self.children.is_empty() {
            if let Some(waiters) = self.shutdown.as_mut() {
                for w in waiters.drain(..) {
                    let _ = w.send(());
                }
            }
        }
    }

    /// Refuses commands on an entry that is between states.
    fn busy(&self, user_id: &str) -> Result<(), CmdError> {
        if self.shutdown.is_some() {
            return Err(CmdError::Unavailable("The server is shutting down".into()));
        }
        match self.sessions.get(user_id) {
            None => Err(not_found(user_id)),
            Some(e) => match &e.intent {
                Some(i) => Err(CmdError::Conflict(format!(
                    "Session {user_id} is busy with {}; try again shortly",
                    i.describe()
                ))),
                None if !e.create_waiters.is_empty() => Err(CmdError::Conflict(format!(
                    "Session {user_id} is still being created; try again shortly"
                ))),
                None => Ok(()),
            },
        }
    }

    async fn handle_msg(&mut self, myself: &ActorRef<SupervisorMsg>, msg: SupervisorMsg) {
        match msg {
            SupervisorMsg::Create {
                user_id,
                phone_number,
                reply,
            } => {
                if self.shutdown.is_some() {
                    let _ = reply.send(Err(CmdError::Unavailable(
                        "The server is shutting down".into(),
                    )));
                    return;
                }
                if self.sessions.contains_key(&user_id) {
                    let _ = reply.send(Err(CmdError::Exists));
                    return;
                }
                let rec = SessionRecord::new(user_id.clone(), phone_number);
                if let Err(e) = self.persistence.insert(&rec) {
                    let _ = reply.send(Err(CmdError::Internal(format!(
                        "could not store the session: {e}"
                    ))));
                    return;
                }
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
                self.spawn_child(myself, &user_id).await;
            }
            SupervisorMsg::Start { user_id, reply } => {
                if let Err(e) = self.busy(&user_id) {
                    let _ = reply.send(Err(e));
                    return;
                }
                let Some(entry) = self.sessions.get_mut(&user_id) else {
                    return;
                };
                entry.rec.desired = Desired::Running;
                if entry.child.is_none() {
                    entry.history.reset();
                    entry.rec.restarts = 0;
                    self.boot_queue.retain(|u| u != &user_id);
                    self.spawn_child(myself, &user_id).await;
                } else {
                    self.save(&user_id);
                }
                let rec = self.sessions.get(&user_id).map(|e| e.rec.clone());
                let _ = reply.send(rec.ok_or_else(|| not_found(&user_id)));
            }
            SupervisorMsg::Stop { user_id, reply } => {
                if let Some(Entry {
                    intent: Some(Intent::Stop(waiters)),
                    ..
                }) = self.sessions.get_mut(&user_id)
                {
                    waiters.push(reply);
                    return;
                }
                if let Err(e) = self.busy(&user_id) {
                    let _ = reply.send(Err(e));
                    return;
                }
                let Some(entry) = self.sessions.get_mut(&user_id) else {
                    return;
                };
                entry.rec.desired = Desired::Stopped;
                entry.restart_token = None;
                if entry.child.is_some() {
                    entry.intent = Some(Intent::Stop(vec![reply]));
                    self.save(&user_id);
                    self.stop_child(myself, &user_id, false);
                } else {
                    let state = match entry.rec.state {
                        s @ (SessionState::Failed | SessionState::LoggedOut) => s,
                        _ => SessionState::Stopped,
                    };
                    self.set_state(&user_id, state);
                    let _ = reply.send(Ok(()));
                }
            }
            SupervisorMsg::Delete { user_id, reply } => {
                if let Err(e) = self.busy(&user_id) {
                    let _ = reply.send(Err(e));
                    return;
                }
                let Some(entry) = self.sessions.get_mut(&user_id) else {
                    return;
                };
                if entry.child.is_some() {
                    entry.intent = Some(Intent::Delete(reply));
                    self.stop_child(myself, &user_id, false);
                } else {
                    let _ = reply.send(self.remove_session(&user_id));
                }
            }
            SupervisorMsg::Logout { user_id, reply } => {
                if let Err(e) = self.busy(&user_id) {
                    let _ = reply.send(Err(e));
                    return;
                }
                let Some(entry) = self.sessions.get_mut(&user_id) else {
                    return;
                };
                if entry.child.is_some() {
                    entry.intent = Some(Intent::Logout(reply));
                    self.stop_child(myself, &user_id, true);
                } else {
                    let warning = Some(
                        "the session was not running, so the device could not be unlinked \
                         from the phone; remove it under Linked Devices if it is still listed"
                            .to_string(),
                    );
                    let _ = reply.send(self.remove_session(&user_id).map(|_| warning));
                }
            }
            SupervisorMsg::Fault {
                user_id,
                fault,
                reply,
            } => {
                if let Err(e) = self.busy(&user_id) {
                    let _ = reply.send(Err(e));
                    return;
                }
                let Some(entry) = self.sessions.get(&user_id) else {
                    return;
                };
                match &entry.child {
                    Some(child) => {
                        if let Err(ractor::MessagingErr::SendErr(SessionMsg::Fault(_, reply))) =
                            child.actor.cast(SessionMsg::Fault(fault, reply))
                        {
                            let _ = reply.send(Err(CmdError::Conflict(format!(
                                "Session {user_id} is not running"
                            ))));
                        }
                    }
                    None => {
                        let _ = reply.send(Err(CmdError::Conflict(format!(
                            "Session {user_id} is not running (state: {})",
                            entry.rec.state
                        ))));
                    }
                }
            }
            SupervisorMsg::Restore {
                user_id,
                apply,
                reply,
            } => {
                if let Err(e) = self.busy(&user_id) {
                    let _ = reply.send(Err(e));
                    return;
                }
                let Some(entry) = self.sessions.get_mut(&user_id) else {
                    return;
                };
                entry.restart_token = None;
                if entry.child.is_some() {
                    entry.intent = Some(Intent::Restore(apply, reply));
                    self.stop_child(myself, &user_id, false);
                } else {
                    let result = self.apply_restore(myself, &user_id, apply).await;
                    let _ = reply.send(result);
                }
            }
            SupervisorMsg::Get { user_id, reply } => {
                let rec = self.sessions.get(&user_id).map(|e| e.rec.clone());
                let _ = reply.send(rec.ok_or_else(|| not_found(&user_id)));
            }
            SupervisorMsg::List(reply) => {
                let mut all: Vec<SessionRecord> =
                    self.sessions.values().map(|e| e.rec.clone()).collect();
                all.sort_by(|a, b| a.user_id.cmp(&b.user_id));
                let _ = reply.send(all);
            }
            SupervisorMsg::Unresponsive {
                user_id,
                incarnation,
                what,
            } => {
                let Some(entry) = self.sessions.get_mut(&user_id) else {
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
            SupervisorMsg::Child {
                user_id,
                incarnation,
                event,
            } => self.child_event(&user_id, incarnation, event),
            SupervisorMsg::RestartDue { user_id, token } => {
                let due = self.sessions.get(&user_id).is_some_and(|e| {
                    e.restart_token == Some(token)
                        && e.child.is_none()
                        && e.rec.desired == Desired::Running
                        && self.shutdown.is_none()
                });
                if due {
                    self.spawn_child(myself, &user_id).await;
                }
            }
            SupervisorMsg::CreateDeadline { user_id, token } => {
                let Some(entry) = self.sessions.get_mut(&user_id) else {
                    return;
                };
                if entry.create_token != Some(token) || entry.create_waiters.is_empty() {
                    return;
                }
                let err = CmdError::Unavailable(format!(
                    "Timed out after {:?} waiting for a pairing code; the session was not created",
                    self.config.create_timeout
                ));
                tracing::warn!(%user_id, "create timed out; rolling back");
                if entry.child.is_some() {
                    entry.intent = Some(Intent::CreateAbort(err));
                    if let Some(c) = &entry.child {
                        c.actor.kill();
                    }
                } else {
                    let waiters = std::mem::take(&mut entry.create_waiters);
                    let _ = self.remove_session(&user_id);
                    for w in waiters {
                        let _ = w.send(Err(err.clone()));
                    }
                }
            }
            SupervisorMsg::KillDeadline {
                user_id,
                incarnation,
            } => {
                if let Some(child) = self.sessions.get(&user_id).and_then(|e| e.child.as_ref()) {
                    if child.incarnation == incarnation {
                        tracing::warn!(%user_id, "session did not stop in time; killing it");
                        child.actor.kill();
                    }
                }
            }
            SupervisorMsg::Watchdog => self.watchdog(myself),
            SupervisorMsg::BootNext => {
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
                if !self.boot_queue.is_empty() {
                    myself.send_after(self.config.boot_interval, || SupervisorMsg::BootNext);
                }
            }
            SupervisorMsg::Shutdown(reply) => {
                let waiters = self.shutdown.get_or_insert_with(Vec::new);
                waiters.push(reply);
                self.boot_queue.clear();
                let ids: Vec<String> = self.sessions.keys().cloned().collect();
                for user_id in ids {
                    let Some(entry) = self.sessions.get_mut(&user_id) else {
                        continue;
                    };
                    entry.restart_token = None;
                    for w in entry.create_waiters.drain(..) {
                        let _ = w.send(Err(CmdError::Unavailable(
                            "The server is shutting down".into(),
                        )));
                    }
                    if entry.child.is_some() && entry.intent.is_none() {
                        entry.intent = Some(Intent::Shutdown);
                        self.stop_child(myself, &user_id, false);
                    }
                }
                self.check_shutdown_done();
            }
        }
    }

    fn child_event(&mut self, user_id: &str, incarnation: u64, event: LinkEvent) {
        let Some(entry) = self.sessions.get_mut(user_id) else {
            return;
        };
        if entry.child.as_ref().map(|c| c.incarnation) != Some(incarnation)
            || entry.intent.is_some()
        {
            return;
        }
        match event {
            LinkEvent::PairingCode(code) => {
                entry.rec.pairing = Some(code);
                entry.rec.state = SessionState::Pairing;
                entry.rec.updated_at_ms = now_ms();
                let rec = entry.rec.clone();
                for w in entry.create_waiters.drain(..) {
                    let _ = w.send(Ok(rec.clone()));
                }
                self.save(user_id);
            }
            LinkEvent::Connecting => self.set_state(user_id, SessionState::Connecting),
            LinkEvent::Online { name } => {
                if name.is_some() {
                    entry.rec.name = name;
                }
                entry.rec.last_seen_at_ms = Some(now_ms());
                self.set_state(user_id, SessionState::Online);
                if let Some(entry) = self.sessions.get_mut(user_id) {
                    let rec = entry.rec.clone();
                    for w in entry.create_waiters.drain(..) {
                        let _ = w.send(Ok(rec.clone()));
                    }
                }
            }
            LinkEvent::Disconnected { reason } => {
                entry.rec.last_error = Some(reason);
                entry.rec.disconnects = entry.rec.disconnects.saturating_add(1);
                self.set_state(user_id, SessionState::Disconnected);
            }
            LinkEvent::PairingRejected { message, throttled } => {
                entry.rec.last_error = Some(message.clone());
                if !entry.create_waiters.is_empty() {
                    let err = if throttled {
                        CmdError::Rejected(message)
                    } else {
                        CmdError::Unavailable(message)
                    };
                    entry.intent = Some(Intent::CreateAbort(err));
                    if let Some(c) = &entry.child {
                        c.actor.stop(None);
                    }
                } else {
                    self.save(user_id);
                }
            }
            // The session actor turns these into exits; they never arrive here.
            LinkEvent::Crashed { .. }
            | LinkEvent::LoggedOut { .. }
            | LinkEvent::Replaced { .. }
            | LinkEvent::Banned { .. } => {}
        }
    }

    fn watchdog(&self, myself: &ActorRef<SupervisorMsg>) {
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
                if let Ok(ractor::rpc::CallResult::Timeout) =
                    actor.call(SessionMsg::Ping, Some(timeout)).await
                {
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
        let mut state = SupervisorState {
            config: args.config,
            link: args.link,
            persistence: args.persistence,
            sessions: HashMap::new(),
            children: HashMap::new(),
            next_incarnation: 0,
            next_token: 0,
            jitter,
            boot_queue: VecDeque::new(),
            shutdown: None,
        };
        for mut rec in args.boot {
            rec.pairing = None;
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
                state.boot_queue.push_back(user_id.clone());
            }
            let stale = rec.state != now;
            state.sessions.insert(user_id.clone(), Entry::new(rec));
            // What was stored is the state before the process died (often `online`):
            // publish what is true now, before any reader sees the old one.
            if stale {
                state.set_state(&user_id, now);
            }
        }
        if !state.boot_queue.is_empty() {
            tracing::info!(
                sessions = state.boot_queue.len(),
                "resuming running sessions"
            );
            let _ = myself.cast(SupervisorMsg::BootNext);
        }
        myself.send_after(state.config.watchdog_interval, || SupervisorMsg::Watchdog);
        Ok(state)
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
