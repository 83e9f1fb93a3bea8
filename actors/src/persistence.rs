//! Where the supervisor writes session records. Every call returns at once: the store
//! queues the write and commits it off the runtime (group commit). `flush` is the one way
//! to wait: it resolves once everything queued before it is durable, so a command's reply
//! can be held until its row is on disk.

use crate::error::StorageError;
use crate::link::{BoxFuture, InboundMessage, Receipt};
use crate::record::SessionRecord;

/// A session store that never blocks its caller.
pub trait Persistence: Send + Sync + 'static {
    /// Queues a new session (the read view shows it at once).
    fn insert(&self, rec: &SessionRecord);
    /// Queues the current record (the pairing code is never persisted). Successive saves
    /// of one session that are still queued are merged; each state change is logged.
    fn save(&self, rec: &SessionRecord);
    /// Queues the removal of a session and everything the store keeps for it; `by`: who
    /// asked (see [`crate::SessionRecord::by`]).
    fn delete(&self, user_id: &str, by: Option<&str>);
    /// Resolves once every write queued before this call is durable (or failed).
    fn flush(&self) -> BoxFuture<'static, Result<(), StorageError>>;
    /// Whether a received message of `user_id` can be taken now. When not (the webhook
    /// backlog is full), the link leaves it unacknowledged and WhatsApp delivers it again
    /// later, rather than it being taken and its event dropped.
    fn has_room(&self, user_id: &str) -> bool {
        let _ = user_id;
        true
    }
    /// A message arrived for a session (for its webhooks); by default nothing is kept.
    fn inbound(&self, user_id: &str, msg: &InboundMessage) {
        let _ = (user_id, msg);
    }
    /// The options of a poll `user_id` sent, by its message id (`None`: not a poll it
    /// sent, or one forgotten): a vote names the options it picked by their hashes.
    fn poll_options<'a>(
        &'a self,
        user_id: &'a str,
        message_id: &'a str,
    ) -> BoxFuture<'a, Option<Vec<String>>> {
        let _ = (user_id, message_id);
        Box::pin(async { None })
    }
    /// A recipient reported on messages a session sent; by default nothing is kept.
    /// The session is this process's now (it claimed it from the database, where its
    /// row is): readers see it at once, before its first change.
    fn adopted(&self, rec: &SessionRecord) {
        let _ = rec;
    }
    /// The session is no longer this process's (another node owns it): forget it, and
    /// drop the writes queued for it.
    fn release(&self, user_id: &str) {
        let _ = user_id;
    }
    fn receipt(&self, user_id: &str, receipt: &Receipt) {
        let _ = (user_id, receipt);
    }
}
