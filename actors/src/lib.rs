//! # botvisor-actors
//!
//! The supervision core of botvisor, with no HTTP and no SQL:
//!
//! - [`policy`]: `RestartPolicy`, a pure function deciding restart delays and give-ups.
//! - [`link`]: the `Link` trait every network connection implements (real or simulated).
//! - [`session`]: `SessionActor`, one per session, owning its `Connection`.
//! - [`supervisor`]: the root `Supervisor`, owning all sessions and their restarts.
//! - [`record`]: `SessionRecord`, the state the API shows (desired vs actual).

pub mod link;
pub mod policy;
pub mod record;
pub mod session;
pub mod supervisor;

pub use link::{
    BoxFuture, Connection, EventSink, Fault, FaultEffect, Link, LinkError, LinkEvent, SessionSpec,
};
pub use policy::{Decision, Jitter, RestartHistory, RestartPolicy};
pub use record::{now_ms, Desired, PairingCode, SessionRecord, SessionState};
pub use session::{ChildExit, SessionActor, SessionMsg};
pub use supervisor::{
    CmdError, Persistence, Reply, RestoreFn, Supervisor, SupervisorArgs, SupervisorConfig,
    SupervisorMsg,
};
