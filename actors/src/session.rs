//! `SessionActor`: one per session. Owns the session's `Connection`, turns link events
//! into reports to the supervisor, and fails (so the supervisor restarts it) when the
//! link crashes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::error::CmdError;
use crate::link::{
    Action, Connection, Done, EventSink, Fault, FaultEffect, Link, LinkEvent, SessionSpec,
};

/// Why a session actor stopped by itself; read by the supervisor when the child exits.
/// (Supervision events overtake ordinary messages in ractor, so the reason travels
/// beside the exit rather than as a message before it.)
#[derive(Debug, Clone, PartialEq)]
pub enum ChildExit {
    /// The phone unlinked the device.
    LoggedOut(String),
    /// The account connected elsewhere.
    Replaced(String),
    /// The account is banned.
    Banned(String),
    /// An API logout finished; `Some` carries a warning when the network did not confirm.
    LogoutDone(Option<String>),
    /// The link cannot work for this session whatever is retried (a corrupt credential
    /// store): the session fails without spending its restart budget.
    Broken(String),
}

/// What a session actor shares with its supervisor: why it stopped by itself, and since
/// when it has been busy with one message. The watchdog reads the latter without waking
/// the actor, so an idle fleet costs it nothing per session.
pub struct ChildSlot {
    exit: Mutex<Option<ChildExit>>,
    born: Instant,
    /// Milliseconds from `born` to the start of the current message, plus one; 0: idle.
    busy_since: AtomicU64,
}

impl ChildSlot {
    /// A slot for a new incarnation, idle, no exit reason.
    pub fn new() -> Arc<ChildSlot> {
        Arc::new(ChildSlot {
            exit: Mutex::new(None),
            born: Instant::now(),
            busy_since: AtomicU64::new(0),
        })
    }

    /// The exit reason left by the actor, once.
    pub fn take_exit(&self) -> Option<ChildExit> {
        self.exit.lock().ok().and_then(|mut s| s.take())
    }

    fn set_exit(&self, exit: ChildExit) {
        if let Ok(mut slot) = self.exit.lock() {
            *slot = Some(exit);
        }
    }

    /// Marks the actor busy until the guard is dropped.
    fn busy(&self) -> Busy<'_> {
        let since = self.born.elapsed().as_millis() as u64 + 1;
        self.busy_since.store(since, Ordering::Relaxed);
        Busy(self)
    }

    /// How long the current message has been handled, if the actor is in one.
    pub fn busy_for(&self, now: Instant) -> Option<Duration> {
        match self.busy_since.load(Ordering::Relaxed) {
            0 => None,
            since => {
                let began = self.born + Duration::from_millis(since - 1);
                Some(now.saturating_duration_since(began))
            }
        }
    }
}

/// A message being handled (see [`ChildSlot::busy`]).
struct Busy<'a>(&'a ChildSlot);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.busy_since.store(0, Ordering::Relaxed);
    }
}

/// Where a session reports its link's events (the supervisor gives each incarnation its
/// own, so stale reports can be told apart).
pub type Reporter = Arc<dyn Fn(LinkEvent) + Send + Sync>;

/// Messages a session actor handles.
pub enum SessionMsg {
    /// An event from the session's link.
    Link(LinkEvent),
    /// Inject a fault (simulated link only).
    Fault(Fault, RpcReplyPort<Result<(), CmdError>>),
    /// Unlink the device, then stop.
    Logout,
    /// Run an action on the network; answered when the network answered (or refused).
    Act {
        /// What to do (boxed: it is the largest message by far).
        action: Box<Action>,
        /// What the network answered.
        reply: RpcReplyPort<Result<Done, CmdError>>,
    },
}

/// Everything a session actor is started with.
pub struct SessionArgs {
    /// Who the session is.
    pub spec: SessionSpec,
    /// The network.
    pub link: Arc<dyn Link>,
    /// Where to report.
    pub report: Reporter,
    /// Where to leave the exit reason and the busy mark.
    pub slot: Arc<ChildSlot>,
    /// Bound on closing and logging out.
    pub shutdown_timeout: Duration,
    /// Bound on the link's connect: past it the start is a crash.
    pub connect_timeout: Duration,
    /// Called once the link's connect has returned, whatever it returned (the
    /// supervisor paces the sessions it resumes at boot by it).
    pub started: Option<Box<dyn FnOnce() + Send>>,
}

/// The session actor (stateless; its state is `SessionActorState`).
pub struct SessionActor;

/// A session actor's state.
pub struct SessionActorState {
    args: SessionArgs,
    conn: Option<Box<dyn Connection>>,
}

impl SessionActorState {
    fn report(&self, event: LinkEvent) {
        (self.args.report)(event);
    }

    fn exit_with(&self, myself: &ActorRef<SessionMsg>, exit: ChildExit) {
        self.args.slot.set_exit(exit);
        myself.stop(None);
    }

    /// Injects a fault into the connection (simulated link only) and answers; a panic
    /// or a hang is answered first, then done.
    async fn inject(&mut self, fault: Fault, reply: RpcReplyPort<Result<(), CmdError>>) {
        let effect = match self.conn.as_mut() {
            Some(conn) => conn.inject(fault),
            None => Err(crate::link::LinkError::new("the link is not connected")),
        };
        match effect {
            Err(e) => {
                let _ = reply.send(Err(CmdError::Conflict(e.message().to_string())));
            }
            Ok(FaultEffect::Handled) => {
                let _ = reply.send(Ok(()));
            }
            Ok(FaultEffect::Panic) => {
                let _ = reply.send(Ok(()));
                panic!(
                    "injected fault: panic in session {}",
                    self.args.spec.user_id
                );
            }
            Ok(FaultEffect::Hang) => {
                let _ = reply.send(Ok(()));
                tracing::warn!(user_id = %self.args.spec.user_id, "injected fault: session hangs");
                std::future::pending::<()>().await;
            }
        }
    }

    /// Acts on its own task (the actor keeps answering meanwhile); answers when the
    /// network answered or refused.
    fn act(&self, action: Action, reply: RpcReplyPort<Result<Done, CmdError>>) {
        match self.conn.as_ref() {
            Some(conn) => {
                let acting = conn.act(action);
                tokio::spawn(async move {
                    // A refusal for the request's own reason is the caller's to fix (404,
                    // 409); anything else is the network failing (502).
                    let done = acting.await.map_err(|e| {
                        let message = e.message().to_string();
                        match e.refusal {
                            Some(crate::link::Refusal::NotFound) => CmdError::NotFound(message),
                            Some(crate::link::Refusal::NotAllowed) => CmdError::Conflict(message),
                            None => CmdError::Upstream(message),
                        }
                    });
                    let _ = reply.send(done);
                });
            }
            None => {
                let _ = reply.send(Err(CmdError::Conflict(
                    "the session is not connected".into(),
                )));
            }
        }
    }

    /// Unlinks the device, within the shutdown timeout; a warning when the network did
    /// not confirm it.
    async fn logout(&mut self) -> Option<String> {
        let Some(conn) = self.conn.as_mut() else {
            return Some("the session was not connected".to_string());
        };
        match tokio::time::timeout(self.args.shutdown_timeout, conn.logout()).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("the network did not confirm the logout: {e}")),
            Err(_) => Some("the network did not confirm the logout in time".to_string()),
        }
    }
}

impl Actor for SessionActor {
    type Msg = SessionMsg;
    type State = SessionActorState;
    type Arguments = SessionArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<SessionMsg>,
        args: SessionArgs,
    ) -> Result<SessionActorState, ActorProcessingErr> {
        // Kept trivial: a failure here would reach the spawner, not the supervision tree.
        Ok(SessionActorState { args, conn: None })
    }

    async fn post_start(
        &self,
        myself: ActorRef<SessionMsg>,
        state: &mut SessionActorState,
    ) -> Result<(), ActorProcessingErr> {
        // Not judged by the watchdog: a start may wait its turn behind thousands (a boot,
        // a burst of creates); it has its own, longer bound.
        // The sink and the connecting future live as long as the connection: made as
        // session code (see the supervisor's `spawn_child`).
        let connecting = botvisor_heap_zone::run_within(|| {
            let me = myself.clone();
            let sink = EventSink::new(move |ev| {
                let _ = me.cast(SessionMsg::Link(ev));
            });
            state.args.link.connect(state.args.spec.clone(), sink)
        });
        let connected = tokio::time::timeout(state.args.connect_timeout, connecting).await;
        if let Some(started) = state.args.started.take() {
            started();
        }
        let connected = connected.unwrap_or_else(|_| {
            Err(crate::link::LinkError::new(format!(
                "the link did not connect within {} s",
                state.args.connect_timeout.as_secs_f64()
            )))
        });
        match connected {
            Ok(conn) => state.conn = Some(conn),
            Err(e) if e.lasting => state.exit_with(&myself, ChildExit::Broken(e.to_string())),
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<SessionMsg>,
        msg: SessionMsg,
        state: &mut SessionActorState,
    ) -> Result<(), ActorProcessingErr> {
        let slot = state.args.slot.clone();
        let _busy = slot.busy();
        match msg {
            SessionMsg::Link(event) => match event {
                LinkEvent::Crashed { error } => return Err(error.into()),
                LinkEvent::LoggedOut { reason } => {
                    state.exit_with(&myself, ChildExit::LoggedOut(reason))
                }
                LinkEvent::Replaced { reason } => {
                    state.exit_with(&myself, ChildExit::Replaced(reason))
                }
                LinkEvent::Banned { reason } => state.exit_with(&myself, ChildExit::Banned(reason)),
                other => state.report(other),
            },
            SessionMsg::Fault(fault, reply) => state.inject(fault, reply).await,
            SessionMsg::Act { action, reply } => state.act(*action, reply),
            SessionMsg::Logout => {
                let warning = state.logout().await;
                state.exit_with(&myself, ChildExit::LogoutDone(warning));
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<SessionMsg>,
        state: &mut SessionActorState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(mut conn) = state.conn.take() {
            let _ = tokio::time::timeout(state.args.shutdown_timeout, conn.close()).await;
        }
        Ok(())
    }
}
