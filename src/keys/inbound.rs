//! The received messages' pending-inbound rows of every session, group-committed.
//!
//! whatsapp-rust keeps a received message's plaintext in the pending-inbound buffer
//! before it acknowledges the message, and deletes the row once botvisor has it. A live
//! message is a batch of one: one row, one statement, one commit, per message, per
//! session. Here the rows of every session of a [`super::PgKeys`] go through one queue:
//! while one statement is in flight, what arrives waits, and the next statement carries
//! all of it (every session's rows, and the deletes). Each caller is answered only once
//! its rows are committed (nothing is acknowledged before it is kept); under load,
//! PostgreSQL runs one statement and one commit for many messages instead of one each.
//!
//! Deletes are not urgent: they ride with the next insert, or go on their own after
//! [`DEFER_DELETES`] (or once [`DEFER_MAX`] wait). Lost in a crash, a deferred delete
//! leaves a row that whatsapp-rust hands back at the next start: that message is handled
//! again (at least once, never lost). A read of the buffer sends what waits first
//! ([`InboundQueue::flush`]), so the trait's answers are the same as with no queue.
//!
//! Order: requests are applied in the order they were queued, the last write of a key
//! winning, and only one statement is in flight at a time, so a delete and a later
//! insert of the same key never race.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;
use whatsapp_rust::wacore::store::error::{Result, StoreError};

/// A pending-inbound row's key: session, chat, sender, message id.
pub(super) type Key = (Arc<str>, String, String, String);

/// How long a delete may wait for the next insert to carry it.
pub(super) const DEFER_DELETES: Duration = Duration::from_millis(50);
/// Deletes waiting that are sent at once.
pub(super) const DEFER_MAX: usize = 256;
/// Message bytes one statement carries at most (more waits for the next one).
const STATEMENT_BYTES: usize = 8 * 1024 * 1024;

/// What one statement writes: rows to insert (or replace) and keys to delete, each key
/// once, sorted (the order rows are locked in).
#[derive(Default)]
pub(super) struct Write {
    pub puts: Vec<(Key, Vec<u8>)>,
    pub deletes: Vec<Key>,
}

/// Runs a [`Write`] as one statement (the PostgreSQL side, in `postgres.rs`).
pub(super) trait Writer: Clone + Send + Sync + 'static {
    fn write(&self, write: &Write) -> impl std::future::Future<Output = Result<()>> + Send;
    fn queue(&self) -> &InboundQueue;
}

struct Request {
    /// In order; `None` deletes the key.
    ops: Vec<(Key, Option<Vec<u8>>)>,
    done: Option<oneshot::Sender<Result<()>>>,
}

#[derive(Default)]
struct State {
    requests: VecDeque<Request>,
    /// Deletes queued (they wait for a ride, or for the timer).
    deletes: usize,
    /// A writer task is sending.
    sending: bool,
    /// Deletes are due: send even with no caller waiting.
    due: bool,
    /// A timer will make the deletes due.
    timer: bool,
}

impl State {
    fn has_work(&self) -> bool {
        self.requests.iter().any(|r| r.done.is_some())
            || (!self.requests.is_empty() && (self.due || self.deletes >= DEFER_MAX))
    }
}

/// The queue; one per [`super::PgKeys`].
#[derive(Default)]
pub struct InboundQueue {
    state: Mutex<State>,
}

impl InboundQueue {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Queues rows to insert; resolves once they (and everything queued before) are
/// committed.
pub(super) async fn put<W: Writer>(writer: &W, rows: Vec<(Key, Vec<u8>)>) -> Result<()> {
    let ops = rows.into_iter().map(|(k, m)| (k, Some(m))).collect();
    submit(writer, ops, true).await
}

/// Queues deletes; they are sent later (see the module's text).
pub(super) async fn delete<W: Writer>(writer: &W, keys: Vec<Key>) -> Result<()> {
    let ops = keys.into_iter().map(|k| (k, None)).collect();
    submit(writer, ops, false).await
}

/// Sends everything queued now; resolves once it is committed.
pub(super) async fn flush<W: Writer>(writer: &W) -> Result<()> {
    submit(writer, Vec::new(), true).await
}

async fn submit<W: Writer>(writer: &W, ops: Vec<(Key, Option<Vec<u8>>)>, wait: bool) -> Result<()> {
    let (tx, rx) = oneshot::channel();
    let start = {
        let mut s = writer.queue().lock();
        s.deletes += ops.iter().filter(|(_, m)| m.is_none()).count();
        s.requests.push_back(Request {
            ops,
            done: wait.then_some(tx),
        });
        let arm_timer = !wait && !s.timer;
        s.timer |= arm_timer;
        if arm_timer {
            let writer = writer.clone();
            spawn_or_run(async move {
                tokio::time::sleep(DEFER_DELETES).await;
                let start = {
                    let mut s = writer.queue().lock();
                    s.timer = false;
                    s.due = true;
                    !std::mem::replace(&mut s.sending, true)
                };
                if start {
                    drain(writer).await;
                }
            });
        }
        s.has_work() && !std::mem::replace(&mut s.sending, true)
    };
    if start {
        let writer = writer.clone();
        spawn_or_run(drain(writer));
    }
    if !wait {
        return Ok(());
    }
    rx.await.unwrap_or_else(|_| {
        Err(StoreError::Validation(
            "the pending-inbound writer stopped before it answered".into(),
        ))
    })
}

/// Runs `task` on the runtime, detached (it must finish even if the caller is dropped).
fn spawn_or_run(task: impl std::future::Future<Output = ()> + Send + 'static) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(task);
    } else {
        // No runtime: nothing can drive PostgreSQL's connections either; say so once.
        tracing::error!("the PostgreSQL key store was used outside a tokio runtime");
    }
}

/// Sends statements until nothing urgent is queued. Only one runs at a time (`sending`).
async fn drain<W: Writer>(writer: W) {
    loop {
        let (ops, dones) = {
            let mut s = writer.queue().lock();
            if !s.has_work() {
                s.sending = false;
                return;
            }
            take(&mut s)
        };
        let write = merge(ops);
        let result = writer.write(&write).await;
        let failed = result.as_ref().err().map(copy_error);
        if let Err(e) = &result {
            // The deletes go again with the next statement; the inserts' callers are told.
            tracing::debug!("pending-inbound rows not written: {e}");
            let mut s = writer.queue().lock();
            s.deletes += write.deletes.len();
            s.requests.push_front(Request {
                ops: write.deletes.into_iter().map(|k| (k, None)).collect(),
                done: None,
            });
        }
        for done in dones {
            let _ = done.send(match &failed {
                None => Ok(()),
                Some(e) => Err(copy_error(e)),
            });
        }
    }
}

/// Takes the requests the next statement carries: from the front, up to
/// [`STATEMENT_BYTES`] of messages (at least one request). Answers their ops, in order,
/// and who waits for them.
type Taken = (
    Vec<(Key, Option<Vec<u8>>)>,
    Vec<oneshot::Sender<Result<()>>>,
);

fn take(s: &mut State) -> Taken {
    let (mut ops, mut dones) = (Vec::new(), Vec::new());
    let (mut taken, mut bytes) = (0, 0);
    while let Some(r) = s.requests.front() {
        let size: usize = r
            .ops
            .iter()
            .map(|(_, m)| m.as_ref().map_or(0, Vec::len))
            .sum();
        if taken > 0 && bytes + size > STATEMENT_BYTES {
            break;
        }
        taken += 1;
        bytes += size;
        let r = s.requests.pop_front().expect("front");
        s.deletes -= r.ops.iter().filter(|(_, m)| m.is_none()).count();
        ops.extend(r.ops);
        dones.extend(r.done);
    }
    s.due = false;
    (ops, dones)
}

/// The ops in order, the last of each key winning, split into inserts and deletes.
fn merge(ops: Vec<(Key, Option<Vec<u8>>)>) -> Write {
    let last: BTreeMap<Key, Option<Vec<u8>>> = ops.into_iter().collect();
    let mut write = Write::default();
    for (key, message) in last {
        match message {
            Some(m) => write.puts.push((key, m)),
            None => write.deletes.push(key),
        }
    }
    write
}

/// The same error again, for each caller a statement answers.
fn copy_error(e: &StoreError) -> StoreError {
    let pg = |s: &(dyn std::error::Error + Send + Sync + 'static)| {
        s.downcast_ref::<super::PgError>().cloned()
    };
    match e {
        StoreError::Connection(s) => match pg(s.as_ref()) {
            Some(p) => StoreError::Connection(Box::new(p)),
            None => StoreError::Connection(s.to_string().into()),
        },
        StoreError::Database(s) => match pg(s.as_ref()) {
            Some(p) => StoreError::Database(Box::new(p)),
            None => StoreError::Database(s.to_string().into()),
        },
        other => StoreError::Validation(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A statement's inserted and deleted keys, as `session/id`.
    type Statement = (Vec<String>, Vec<String>);

    /// Records the statements; fails while `fail` is set; a statement waits for a permit
    /// of `gate`.
    #[derive(Clone)]
    struct Recorder {
        queue: Arc<InboundQueue>,
        writes: Arc<Mutex<Vec<Statement>>>,
        fail: Arc<AtomicBool>,
        gate: Arc<tokio::sync::Semaphore>,
    }

    impl Writer for Recorder {
        async fn write(&self, write: &Write) -> Result<()> {
            let _permit = self.gate.acquire().await.expect("gate");
            if self.fail.load(Ordering::SeqCst) {
                return Err(StoreError::Database("refused".into()));
            }
            let name = |k: &Key| format!("{}/{}", k.0, k.3);
            self.writes.lock().unwrap().push((
                write.puts.iter().map(|(k, _)| name(k)).collect(),
                write.deletes.iter().map(name).collect(),
            ));
            Ok(())
        }
        fn queue(&self) -> &InboundQueue {
            &self.queue
        }
    }

    impl Default for Recorder {
        fn default() -> Self {
            Self {
                queue: Arc::default(),
                writes: Arc::default(),
                fail: Arc::default(),
                gate: Arc::new(tokio::sync::Semaphore::new(0)),
            }
        }
    }

    fn key(session: &str, id: &str) -> Key {
        (Arc::from(session), "c".into(), "s".into(), id.into())
    }

    #[tokio::test]
    async fn rows_queued_while_a_statement_runs_go_together_in_the_next() {
        let w = Recorder::default();
        // The first statement is held (no permit); two sessions queue behind it.
        let first = tokio::spawn({
            let w = w.clone();
            async move { put(&w, vec![(key("a", "1"), vec![1])]).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let second = tokio::spawn({
            let w = w.clone();
            async move { put(&w, vec![(key("b", "2"), vec![2])]).await }
        });
        let third = tokio::spawn({
            let w = w.clone();
            async move { put(&w, vec![(key("a", "3"), vec![3])]).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!second.is_finished() && !first.is_finished());
        w.gate.add_permits(10);
        for t in [first, second, third] {
            t.await.unwrap().unwrap();
        }
        let writes = w.writes.lock().unwrap().clone();
        assert_eq!(
            writes,
            vec![
                (vec!["a/1".to_string()], vec![]),
                (vec!["a/3".to_string(), "b/2".to_string()], vec![]),
            ]
        );
    }

    #[tokio::test]
    async fn a_delete_rides_with_the_next_insert_and_the_last_write_of_a_key_wins() {
        let w = Recorder::default();
        w.gate.add_permits(100);
        put(&w, vec![(key("a", "1"), vec![1])]).await.unwrap();
        delete(&w, vec![key("a", "1"), key("a", "2")])
            .await
            .unwrap();
        // Written again after its delete: the row stays.
        put(&w, vec![(key("a", "2"), vec![2])]).await.unwrap();
        let writes = w.writes.lock().unwrap().clone();
        assert_eq!(writes.len(), 2, "{writes:?}");
        assert_eq!(
            writes[1],
            (vec!["a/2".to_string()], vec!["a/1".to_string()])
        );
    }

    #[tokio::test]
    async fn deletes_alone_go_after_the_timer_and_a_flush_sends_them_at_once() {
        let w = Recorder::default();
        w.gate.add_permits(100);
        delete(&w, vec![key("a", "1")]).await.unwrap();
        assert!(w.writes.lock().unwrap().is_empty());
        tokio::time::sleep(DEFER_DELETES * 3).await;
        assert_eq!(w.writes.lock().unwrap().len(), 1);
        delete(&w, vec![key("a", "2")]).await.unwrap();
        flush(&w).await.unwrap();
        assert_eq!(
            w.writes.lock().unwrap()[1],
            (vec![], vec!["a/2".to_string()])
        );
    }

    #[tokio::test]
    async fn a_failed_statement_fails_its_inserts_and_keeps_its_deletes() {
        let w = Recorder::default();
        w.gate.add_permits(100);
        delete(&w, vec![key("a", "1")]).await.unwrap();
        w.fail.store(true, Ordering::SeqCst);
        let err = put(&w, vec![(key("b", "1"), vec![1])]).await.unwrap_err();
        assert!(err.to_string().contains("database"), "{err}");
        w.fail.store(false, Ordering::SeqCst);
        flush(&w).await.unwrap();
        assert_eq!(
            w.writes.lock().unwrap().clone(),
            vec![(vec![], vec!["a/1".to_string()])]
        );
    }
}
