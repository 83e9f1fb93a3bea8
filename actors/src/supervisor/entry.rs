//! What the supervisor keeps per session: the record, the live child, the restart
//! history, and what is in flight.

use ractor::ActorRef;
use tokio::time::Instant;

use crate::error::CmdError;
use crate::policy::RestartHistory;
use crate::record::SessionRecord;
use crate::session::{ChildSlot, SessionMsg};

use super::messages::{Reply, RestoreFn};

/// A live session actor.
pub(super) struct Child {
    pub actor: ActorRef<SessionMsg>,
    pub incarnation: u64,
    pub started: Instant,
    pub slot: std::sync::Arc<ChildSlot>,
}

/// A command waiting for the child to exit (or for off-supervisor work) to finish.
pub(super) enum Intent {
    Stop(Vec<Reply<()>>),
    Delete(Reply<()>),
    Logout(Reply<Option<String>>),
    Restore(RestoreFn, Reply<SessionRecord>),
    /// The child is gone; the restore's file work runs.
    Restoring(Reply<SessionRecord>),
    CreateAbort(CmdError),
    Hung(String),
    Shutdown,
}

impl Intent {
    pub fn describe(&self) -> &'static str {
        match self {
            Intent::Stop(_) => "a stop",
            Intent::Delete(_) => "a delete",
            Intent::Logout(_) => "a logout",
            Intent::Restore(..) | Intent::Restoring(_) => "a restore",
            Intent::CreateAbort(_) => "a create",
            Intent::Hung(_) => "a restart",
            Intent::Shutdown => "the shutdown",
        }
    }
}

/// One session.
pub(super) struct Entry {
    pub rec: SessionRecord,
    pub child: Option<Child>,
    pub history: RestartHistory,
    pub restart_token: Option<u64>,
    pub create_waiters: Vec<Reply<SessionRecord>>,
    pub create_token: Option<u64>,
    pub intent: Option<Intent>,
    /// Logged out by the phone: its credentials go once that state is durable.
    pub wipe_pending: bool,
    /// Owned by another node now: forgotten once its child is gone.
    pub released: bool,
    /// Claimed again while its child was stopping: resumed with this record once gone.
    pub readopt: Option<SessionRecord>,
}

impl Entry {
    pub fn new(rec: SessionRecord) -> Entry {
        Entry {
            rec,
            child: None,
            history: RestartHistory::default(),
            restart_token: None,
            create_waiters: Vec::new(),
            create_token: None,
            intent: None,
            wipe_pending: false,
            released: false,
            readopt: None,
        }
    }

    /// Why a command cannot run now, if it cannot.
    pub fn busy(&self) -> Option<CmdError> {
        let user_id = &self.rec.user_id;
        match &self.intent {
            Some(i) => Some(CmdError::Conflict(format!(
                "Session {user_id} is busy with {}; try again shortly",
                i.describe()
            ))),
            None if !self.create_waiters.is_empty() => Some(CmdError::Conflict(format!(
                "Session {user_id} is still being created; try again shortly"
            ))),
            None => None,
        }
    }

    /// Answers everyone waiting for the create.
    pub fn answer_creators(&mut self, result: Result<SessionRecord, CmdError>) {
        for w in self.create_waiters.drain(..) {
            let _ = w.send(result.clone());
        }
    }
}
