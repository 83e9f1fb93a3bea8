//! # botvisor-actors
//!
//! The supervision core of botvisor, with no HTTP and no SQL:
//!
//! - [`policy`]: `RestartPolicy`, a pure function deciding restart delays and give-ups.
//! - [`link`]: the `Link` trait every network connection implements (real or simulated).
//! - [`session`]: `SessionActor`, one per session, owning its `Connection`.
//! - [`supervisor`]: the root `Supervisor`, owning all sessions and their restarts.
//! - [`persistence`]: the `Persistence` trait the store implements (never blocks).
//! - [`record`]: `SessionRecord`, the state the API shows (desired vs actual).
//! - [`error`]: `CmdError` and `StorageError`, the kinds of refusal.

pub mod error;
pub mod link;
pub mod persistence;
pub mod policy;
pub mod record;
pub mod session;
pub mod supervisor;

pub use error::{CmdError, StorageError};
pub use link::{
    Action, BoxFuture, ChatPresence, Connection, Contact, Done, EventSink, Fault, FaultEffect,
    Fetched, FileReader, GroupInfo, GroupMember, GroupOp, InboundMessage, Link, LinkError,
    LinkEvent, Location, Media, MediaFile, MediaKind, MediaSource, MessageRef, NumberCheck,
    Outgoing, ParticipantAction, ParticipantChange, Poll, Profile, Receipt, ReceiptStatus,
    ReceivedMedia, Refers, Refusal, SessionSpec,
};
pub use persistence::Persistence;
pub use policy::{Decision, Jitter, RestartHistory, RestartPolicy};
pub use record::{now_ms, Desired, PairingCode, PairingQr, SessionRecord, SessionState};
pub use session::{ChildExit, Reporter, SessionActor, SessionMsg};
pub use supervisor::{
    Audit, Command, Health, Reply, RestoreFn, Supervisor, SupervisorArgs, SupervisorConfig,
    SupervisorMsg,
};
