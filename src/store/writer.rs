//! The store's writer: one thread owns the database connection and commits whatever was
//! queued while the previous commit ran, in one transaction (group commit).
//!
//! The queue is bounded by the fleet, not by time: a session's queued record is replaced
//! by its newer one, so it holds at most one row per session, plus inserts, deletes, and
//! state-change events (capped; past the cap the oldest are dropped with a warning).
//! A failed commit (disk full, read-only, locked) is answered to every `flush` waiting on
//! it and its writes are queued again; the writer retries with a backoff until the disk
//! recovers, so nothing queued is lost while the process lives.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use botvisor_actors::{SessionRecord, StorageError};

use super::backup::Backups;
use crate::db::{Batch, Change, Engine, EventRow, MessageRow, OutboxRow, QueuedRow};

/// State-change events held while the disk is failing; older ones are dropped past this.
const EVENTS_QUEUED_MAX: usize = 200_000;
/// Messages to remember are committed at most this long after they were queued (in one
/// commit with whatever else is queued then; a lookup sees them before, in the queue).
const MESSAGES_WAIT: Duration = Duration::from_millis(200);
/// Messages waiting that are committed at once.
const MESSAGES_MAX: usize = 1_000;
/// Messages held while the disk is failing; older ones are dropped past this.
const MESSAGES_QUEUED_MAX: usize = 200_000;
/// How often messages older than `--messages-keep` are forgotten.
const FORGET_EVERY: Duration = Duration::from_secs(3600);
/// Longest pause between retries of a failing commit.
const RETRY_MAX: Duration = Duration::from_secs(2);

/// A write that must keep its order.
enum Op {
    /// A new session's row.
    Insert(SessionRecord),
    /// A session's row, events and backups.
    Delete(String),
    /// Answered once everything before it is committed.
    Flush(oneshot::Sender<Result<(), StorageError>>),
}

#[derive(Default)]
struct Pending {
    ops: Vec<Op>,
    /// Latest record per session (applied after `ops`).
    dirty: HashMap<String, SessionRecord>,
    events: VecDeque<EventRow>,
    dropped_events: u64,
    /// Webhook deliveries, committed with the changes queued with them.
    outbox: Vec<OutboxRow>,
    /// Messages to remember, and since when the oldest waits (see [`MESSAGES_WAIT`]).
    messages: VecDeque<MessageRow>,
    messages_since: Option<Instant>,
    /// Sends to add to their sessions' outbound queues.
    queued: Vec<QueuedRow>,
    /// Queued sends done, by key, taken out with the events queued with them.
    dequeued: Vec<String>,
    closing: bool,
    /// Why the last commit failed, until one succeeds: a flush asked meanwhile is
    /// answered at once (a full or read-only disk is a prompt 507/503, not a wait for the
    /// next retry); the writes behind it stay queued and are retried.
    failing: Option<StorageError>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.ops.is_empty() && !self.writes() && self.messages.is_empty()
    }

    /// Writes that commit at once (everything but flushes and messages to remember).
    fn writes(&self) -> bool {
        self.ops.iter().any(|op| !matches!(op, Op::Flush(_)))
            || !self.dirty.is_empty()
            || !self.events.is_empty()
            || !self.outbox.is_empty()
            || !self.queued.is_empty()
            || !self.dequeued.is_empty()
    }

    /// Whether the messages to remember have waited long enough (or are many enough).
    fn messages_due(&self) -> bool {
        self.messages.len() >= MESSAGES_MAX
            || self
                .messages_since
                .is_some_and(|since| since.elapsed() >= MESSAGES_WAIT)
    }

    fn push_event(&mut self, row: EventRow) {
        if self.events.len() >= EVENTS_QUEUED_MAX {
            self.events.pop_front();
            self.dropped_events += 1;
        }
        self.events.push_back(row);
    }

    /// A structural change supersedes what is queued for that session.
    fn forget(&mut self, user_id: &str) {
        self.dirty.remove(user_id);
        self.events.retain(|e| e.user_id != user_id);
        self.queued.retain(|q| q.user_id != user_id);
    }
}

/// The queue between the runtime and the writer thread.
#[derive(Default)]
pub struct Queue {
    pending: Mutex<Pending>,
    ready: Condvar,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a new session's row and its first event.
    pub fn insert(&self, rec: &SessionRecord) {
        let mut p = self.lock();
        p.forget(&rec.user_id);
        p.ops.push(Op::Insert(rec.clone()));
        p.push_event(EventRow::of(rec));
        drop(p);
        self.ready.notify_one();
    }

    /// Drops what is queued for a session another node owns now (its writes would be
    /// refused).
    pub fn release(&self, user_id: &str) {
        let mut p = self.lock();
        p.forget(user_id);
        p.outbox.retain(|o| o.user_id != user_id);
        p.messages.retain(|m| m.user_id != user_id);
    }

    /// Queues a record (replacing a queued older one), with an event if the state changed.
    pub fn save(&self, rec: &SessionRecord, state_changed: bool) {
        let mut p = self.lock();
        p.dirty.insert(rec.user_id.clone(), rec.clone());
        if state_changed {
            p.push_event(EventRow::of(rec));
        }
        drop(p);
        self.ready.notify_one();
    }

    /// Queues webhook deliveries; they commit in the same transaction as what was queued
    /// before them. None is nothing to do.
    pub fn outbox(&self, rows: Vec<OutboxRow>) {
        if rows.is_empty() {
            return;
        }
        let mut p = self.lock();
        p.outbox.extend(rows);
        drop(p);
        self.ready.notify_one();
    }

    /// Queues a message to remember; it is committed within [`MESSAGES_WAIT`] (or once
    /// [`MESSAGES_MAX`] wait). A flush does not wait for it.
    pub fn message(&self, row: MessageRow) {
        self.received(Vec::new(), row);
    }

    /// Queues a received message's webhook deliveries (see [`Queue::outbox`]) and the
    /// message to remember (see [`Queue::message`]), under one lock.
    pub fn received(&self, deliveries: Vec<OutboxRow>, row: MessageRow) {
        let mut p = self.lock();
        let mut wake = !deliveries.is_empty();
        p.outbox.extend(deliveries);
        if p.messages.len() >= MESSAGES_QUEUED_MAX {
            p.messages.pop_front();
        }
        p.messages.push_back(row);
        wake |= p.messages_since.is_none() || p.messages.len() >= MESSAGES_MAX;
        p.messages_since.get_or_insert_with(Instant::now);
        drop(p);
        if wake {
            self.ready.notify_one();
        }
    }

    /// Queues a send for its session's durable outbound queue.
    pub fn enqueue(&self, row: QueuedRow) {
        let mut p = self.lock();
        p.queued.push(row);
        drop(p);
        self.ready.notify_one();
    }

    /// Takes a queued send (by key) out of its queue, with its event's deliveries in the
    /// same transaction, and queues the message to remember (if it was sent).
    pub fn dequeue(&self, key: String, deliveries: Vec<OutboxRow>, sent: Option<MessageRow>) {
        let mut p = self.lock();
        p.dequeued.push(key);
        p.outbox.extend(deliveries);
        if let Some(row) = sent {
            if p.messages.len() >= MESSAGES_QUEUED_MAX {
                p.messages.pop_front();
            }
            p.messages.push_back(row);
            p.messages_since.get_or_insert_with(Instant::now);
        }
        drop(p);
        self.ready.notify_one();
    }

    /// A message to remember that is still queued.
    pub fn queued_message(&self, user_id: &str, message_id: &str) -> Option<MessageRow> {
        self.lock()
            .messages
            .iter()
            .find(|m| m.user_id == user_id && m.message_id == message_id)
            .cloned()
    }

    /// Queues a session's removal.
    pub fn delete(&self, user_id: &str) {
        let mut p = self.lock();
        p.forget(user_id);
        p.messages.retain(|m| m.user_id != user_id);
        p.ops.push(Op::Delete(user_id.to_string()));
        drop(p);
        self.ready.notify_one();
    }

    /// Why the last commit failed, while commits are failing.
    pub fn failing(&self) -> Option<StorageError> {
        self.lock().failing.clone()
    }

    /// A receiver answered once everything queued so far is committed.
    pub fn flush(&self) -> oneshot::Receiver<Result<(), StorageError>> {
        let (tx, rx) = oneshot::channel();
        let mut p = self.lock();
        if p.closing {
            let _ = tx.send(Err(StorageError::Unavailable("the store is closed".into())));
        } else if let Some(e) = &p.failing {
            let _ = tx.send(Err(e.clone()));
        } else {
            p.ops.push(Op::Flush(tx));
        }
        drop(p);
        self.ready.notify_one();
        rx
    }

    /// Asks the writer to commit what is queued and stop.
    pub fn close(&self) {
        self.lock().closing = true;
        self.ready.notify_one();
    }

    /// Waits for work; `None` once closing and drained.
    fn take(&self) -> Option<Pending> {
        let mut p = self.lock();
        loop {
            if !p.ops.is_empty() || p.writes() || p.messages_due() {
                break;
            }
            if p.closing {
                if p.messages.is_empty() {
                    return None;
                }
                break;
            }
            p = match p.messages_since {
                Some(since) => {
                    let left = MESSAGES_WAIT.saturating_sub(since.elapsed());
                    self.ready
                        .wait_timeout(p, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
                None => self.ready.wait(p).unwrap_or_else(|e| e.into_inner()),
            };
        }
        // Messages go once due (with whatever else is queued then), in few large
        // commits: riding with every commit rewrote the same index pages into the WAL
        // every time (-12 % of sim inbound messages per second, measured).
        let with_messages = p.messages_due() || p.closing;
        let closing = p.closing;
        let dropped = std::mem::take(&mut p.dropped_events);
        if dropped > 0 {
            tracing::warn!(
                dropped,
                "the event log fell behind a failing disk; oldest state-change events dropped"
            );
        }
        let mut batch = std::mem::take(&mut *p);
        p.closing = closing;
        if !with_messages {
            p.messages = std::mem::take(&mut batch.messages);
            p.messages_since = batch.messages_since.take();
        }
        Some(batch)
    }

    /// Puts a failed batch's writes back in front of what arrived since.
    fn requeue(&self, mut batch: Pending) {
        let mut p = self.lock();
        let touched: HashSet<String> = p
            .ops
            .iter()
            .filter_map(|op| match op {
                Op::Insert(r) => Some(r.user_id.clone()),
                Op::Delete(id) => Some(id.clone()),
                Op::Flush(_) => None,
            })
            .collect();
        batch.ops.append(&mut p.ops);
        p.ops = batch.ops;
        for (id, rec) in batch.dirty {
            if !touched.contains(&id) {
                p.dirty.entry(id).or_insert(rec);
            }
        }
        let mut events: VecDeque<EventRow> = batch
            .events
            .into_iter()
            .filter(|e| !touched.contains(&e.user_id))
            .collect();
        events.append(&mut p.events);
        while events.len() > EVENTS_QUEUED_MAX {
            events.pop_front();
            p.dropped_events += 1;
        }
        p.events = events;
        // Deliveries keep their order: the failed batch's before the ones queued since.
        let mut outbox = batch.outbox;
        outbox.append(&mut p.outbox);
        p.outbox = outbox;
        let mut queued: Vec<QueuedRow> = batch
            .queued
            .into_iter()
            .filter(|q| !touched.contains(&q.user_id))
            .collect();
        queued.append(&mut p.queued);
        p.queued = queued;
        let mut dequeued = batch.dequeued;
        dequeued.append(&mut p.dequeued);
        p.dequeued = dequeued;
        let mut messages = batch.messages;
        messages.append(&mut p.messages);
        let over = messages.len().saturating_sub(MESSAGES_QUEUED_MAX);
        messages.drain(..over);
        p.messages = messages;
        p.messages_since = batch.messages_since.or(p.messages_since);
    }
}

impl Pending {
    /// What the engine commits of this batch (its flushes taken out before), forgetting
    /// messages older than `forget_messages_before` when given.
    fn as_batch(&self, forget_messages_before: Option<u64>) -> Batch<'_> {
        Batch {
            changes: self
                .ops
                .iter()
                .filter_map(|op| match op {
                    Op::Insert(rec) => Some(Change::Insert(rec)),
                    Op::Delete(id) => Some(Change::Delete(id)),
                    Op::Flush(_) => None,
                })
                .collect(),
            rows: self.dirty.values().collect(),
            events: self.events.iter().collect(),
            outbox: &self.outbox,
            messages: self.messages.iter().collect(),
            forget_messages_before,
            queued: &self.queued,
            dequeued: &self.dequeued,
        }
    }
}

/// The writer thread's loop: runs until the queue is closed and drained. After a commit
/// that wrote outbox rows it tells `webhooks` which lanes got them (the dispatcher does not
/// poll).
pub fn run(
    queue: &Queue,
    mut conn: Box<dyn Engine>,
    backups: Backups,
    commit_seconds: Option<prometheus_client::metrics::histogram::Histogram>,
    webhooks: Option<std::sync::Arc<crate::webhooks::Webhooks>>,
    keep_ms: u64,
) {
    let mut retry = Duration::from_millis(50);
    let mut forgot: Option<Instant> = None;
    while let Some(mut batch) = queue.take() {
        let (flushes, writes): (Vec<Op>, Vec<Op>) = std::mem::take(&mut batch.ops)
            .into_iter()
            .partition(|op| matches!(op, Op::Flush(_)));
        batch.ops = writes;
        let forget = !batch.is_empty() && forgot.is_none_or(|t| t.elapsed() >= FORGET_EVERY);
        let forget_before = forget.then(|| botvisor_actors::now_ms().saturating_sub(keep_ms));
        let result = if batch.is_empty() {
            // Only flushes: what was queued before them is committed already (this thread
            // commits in order), so they are answered without an empty transaction. A
            // received message with no webhook to deliver asks this once per batch.
            Ok(())
        } else {
            let started = std::time::Instant::now();
            let result = conn.commit(&batch.as_batch(forget_before));
            if let Some(h) = &commit_seconds {
                h.observe(started.elapsed().as_secs_f64());
            }
            result
        };
        if let (Ok(()), Some(hooks)) = (&result, &webhooks) {
            if !batch.outbox.is_empty() {
                hooks.committed(
                    batch
                        .outbox
                        .iter()
                        .map(|r| (r.destination.as_str(), r.user_id.as_str())),
                );
            }
        }
        if result.is_ok() {
            // A deleted session's backups go before its delete is confirmed: a kill right
            // after the 2xx must not leave them behind (a kill before is swept at boot).
            for op in &batch.ops {
                if let Op::Delete(id) = op {
                    if let Err(e) = backups.remove_all(id) {
                        tracing::error!(user_id = %id, error = %e, "could not remove the session's backups");
                    }
                }
            }
        }
        for op in flushes {
            if let Op::Flush(tx) = op {
                let _ = tx.send(result.clone());
            }
        }
        queue.lock().failing = result.clone().err();
        match result {
            Ok(()) => {
                if forget {
                    forgot = Some(Instant::now());
                }
                retry = Duration::from_millis(50);
            }
            Err(e) => {
                tracing::error!(error = %e, retry_in = ?retry, "could not commit session changes; will retry");
                let closing = queue.lock().closing;
                queue.requeue(batch);
                if closing && retry >= RETRY_MAX {
                    tracing::error!("giving up on the failing database at shutdown");
                    return;
                }
                std::thread::sleep(retry);
                retry = (retry * 2).min(RETRY_MAX);
            }
        }
    }
}
