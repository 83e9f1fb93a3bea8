//! What the supervisor is asked, and what it tells itself.

use ractor::RpcReplyPort;

use crate::error::{CmdError, StorageError};
use crate::link::{Action, BoxFuture, Done, Fault, LinkEvent};
use crate::record::SessionRecord;

/// A reply port for a command.
pub type Reply<T> = RpcReplyPort<Result<T, CmdError>>;

/// Work done on a session's files while its actor is stopped (a restore). It runs off the
/// supervisor (file and SQLite work) and returns the record with the fields the backup
/// brings back (phone number, name).
pub type RestoreFn =
    Box<dyn FnOnce(SessionRecord) -> BoxFuture<'static, Result<SessionRecord, CmdError>> + Send>;

/// What [`SupervisorMsg::Audit`] answers.
#[derive(Debug, Clone)]
pub struct Audit {
    /// Every session's record as the supervisor holds it.
    pub records: Vec<SessionRecord>,
    /// The sessions with a live actor.
    pub live: Vec<String>,
    /// Broken invariants (empty when all is well).
    pub problems: Vec<String>,
}

/// What [`SupervisorMsg::Health`] answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Health {
    /// Sessions known.
    pub sessions: usize,
    /// Sessions resumed at boot that are still waiting for their batch.
    pub boot_pending: usize,
    /// A shutdown is under way.
    pub shutting_down: bool,
}

/// Messages the supervisor handles.
pub enum SupervisorMsg {
    /// Create a session; answered with the record once the first pairing code is out.
    Create {
        /// New id.
        user_id: String,
        /// Phone to pair.
        phone_number: String,
        /// Who asked (see [`SessionRecord::by`]).
        by: Option<std::sync::Arc<str>>,
        /// Answered with the record (carrying the pairing code).
        reply: Reply<SessionRecord>,
    },
    /// Start a stopped/failed/logged-out session (idempotent for a running one).
    Start {
        /// Which.
        user_id: String,
        /// Who asked (see [`SessionRecord::by`]).
        by: Option<std::sync::Arc<str>>,
        /// Answered once the child is spawned and the desired state is durable.
        reply: Reply<SessionRecord>,
    },
    /// Stop a session and keep it stopped.
    Stop {
        /// Which.
        user_id: String,
        /// Who asked (see [`SessionRecord::by`]).
        by: Option<std::sync::Arc<str>>,
        /// Answered once the child is gone and the stop is durable.
        reply: Reply<()>,
    },
    /// Stop a session and delete it with its credentials and backups.
    Delete {
        /// Which.
        user_id: String,
        /// Who asked (see [`SessionRecord::by`]).
        by: Option<std::sync::Arc<str>>,
        /// Answered once it is gone.
        reply: Reply<()>,
    },
    /// Unlink the device from the account, then delete the session.
    Logout {
        /// Which.
        user_id: String,
        /// Who asked (see [`SessionRecord::by`]).
        by: Option<std::sync::Arc<str>>,
        /// Answered once it is gone, with a warning if the network did not confirm.
        reply: Reply<Option<String>>,
    },
    /// Inject a fault into a running session (only links that take faults).
    Fault {
        /// Which.
        user_id: String,
        /// What.
        fault: Fault,
        /// Answered by the session, or with 503 if it does not answer in time.
        reply: Reply<()>,
    },
    /// An action of an online session on the network (a send, a number check).
    Act {
        /// Which.
        user_id: String,
        /// What.
        action: Action,
        /// Answered with what the network answered.
        reply: Reply<Done>,
    },
    /// Stop the session, run `apply` on its files, start it again if it should run.
    Restore {
        /// Which.
        user_id: String,
        /// The swap.
        apply: RestoreFn,
        /// Who asked (see [`SessionRecord::by`]).
        by: Option<std::sync::Arc<str>>,
        /// Answered with the record after the restart.
        reply: Reply<SessionRecord>,
    },
    /// One record, as the supervisor holds it.
    Get {
        /// Which.
        user_id: String,
        /// The record.
        reply: Reply<SessionRecord>,
    },
    /// The supervisor's own view of the fleet, checked against its invariants.
    Audit(RpcReplyPort<Audit>),
    /// A cheap liveness answer for `/readyz`: sessions still waiting to be resumed at boot.
    Health(RpcReplyPort<Health>),
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
    /// A created session's row is durable (or could not be written).
    Stored {
        /// Which.
        user_id: String,
        /// Must match the pending create.
        token: u64,
        /// The commit's outcome.
        result: Result<(), StorageError>,
    },
    /// A restore's file work finished.
    Restored {
        /// Which.
        user_id: String,
        /// The record with the backup's fields, or why the restore failed.
        result: Result<SessionRecord, CmdError>,
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
    /// A session logged out by the phone: its credentials are wiped once its `logged_out`
    /// state is durable (a crash in between must not reboot it as running, pairing anew).
    WipeLoggedOut {
        /// Which.
        user_id: String,
        /// The commit's outcome; `None`: wait for the next commit.
        committed: Option<Result<(), crate::error::StorageError>>,
    },
    /// Look for children stuck in one message.
    Watchdog,
    /// A child's link connect returned (sent only for sessions resumed at boot).
    ChildStarted {
        /// Which.
        user_id: String,
        /// Its incarnation.
        incarnation: u64,
    },
    /// Start the next batch of sessions restored at boot.
    BootNext,
    /// Sessions this node now owns (several nodes on one database): resumed like the
    /// sessions found at boot. Ids already here are skipped.
    Adopt(Vec<SessionRecord>),
    /// Sessions this node no longer owns: each is stopped and forgotten here, and nothing
    /// more is written for it (its new owner writes now). Commands waiting on one get an
    /// error. `None`: every session (the node fenced itself).
    Release(Option<Vec<String>>),
    /// A planned handoff: [`SupervisorMsg::Release`] of these sessions, answered once
    /// every one of them has stopped here (then another node may connect it).
    Handoff {
        user_ids: Vec<String>,
        reply: RpcReplyPort<()>,
    },
    /// Stop every session (desired states untouched); answered when all are gone.
    Shutdown(RpcReplyPort<()>),
}
