//! whatsapp-rust's runtime for one session, with every task it spawns remembered.

use std::sync::{Arc, Weak};

use std::time::Duration;
use tokio::task::JoinHandle;

/// whatsapp-rust's runtime for one session: tokio, with every task the client spawns
/// remembered, so that a stop ends all of them. Each of those tasks holds the client
/// (and through it the session's store and its descriptors); several outlive
/// `disconnect()` by design (the QR rotation for up to ~160 s, sync waits up to 60 s)
/// or wait forever for a disconnect that a kill or a crash never makes (the chat-lane
/// workers, whose senders live in the client itself: a cycle). Without this, a stopped
/// session's client and store stayed alive (issue 26).
#[derive(Clone, Default)]
pub(super) struct SessionTasks(Arc<std::sync::Mutex<TaskList>>);

/// The session's running tasks. A task takes itself out when it ends (or is aborted), so
/// no finished task's memory is held by its handle here.
#[derive(Default)]
struct TaskList {
    next: u64,
    running: std::collections::HashMap<u64, tokio::task::AbortHandle>,
}

/// Takes a task out of its session's list when the task's future is dropped: at its end,
/// or when it is aborted.
struct Untrack {
    list: Weak<std::sync::Mutex<TaskList>>,
    id: u64,
}

impl Drop for Untrack {
    fn drop(&mut self) {
        if let Some(list) = self.list.upgrade() {
            lock_tasks(&list).running.remove(&self.id);
        }
    }
}

fn lock_tasks(list: &std::sync::Mutex<TaskList>) -> std::sync::MutexGuard<'_, TaskList> {
    list.lock().unwrap_or_else(|p| p.into_inner())
}

impl SessionTasks {
    /// Spawns `future` on tokio, remembered until it ends.
    fn spawn_tracked(
        &self,
        future: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'static>>,
    ) -> JoinHandle<()> {
        // Held while spawning: a task that ends at once takes itself out only after it
        // was put in.
        let mut list = lock_tasks(&self.0);
        let id = list.next;
        list.next += 1;
        let untrack = Untrack {
            list: Arc::downgrade(&self.0),
            id,
        };
        let task = tokio::spawn(crate::session_heap::within(async move {
            let _untrack = untrack;
            future.await;
        }));
        list.running.insert(id, task.abort_handle());
        task
    }

    /// Aborts every task of the session that is still running.
    pub(super) fn abort_all(&self) {
        let running = std::mem::take(&mut lock_tasks(&self.0).running);
        for task in running.into_values() {
            task.abort();
        }
    }
}

#[async_trait::async_trait]
impl whatsapp_rust::wacore::runtime::Runtime for SessionTasks {
    fn spawn(
        &self,
        future: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'static>>,
    ) -> whatsapp_rust::wacore::runtime::AbortHandle {
        let task = self.spawn_tracked(future);
        whatsapp_rust::wacore::runtime::AbortHandle::new(move || task.abort())
    }

    fn spawn_detached(
        &self,
        future: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'static>>,
    ) {
        self.spawn_tracked(future);
    }

    fn sleep(
        &self,
        d: Duration,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(tokio::time::sleep(d))
    }

    fn spawn_blocking(
        &self,
        f: Box<dyn FnOnce() + Send + 'static>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(async {
            let _ = tokio::task::spawn_blocking(|| crate::session_heap::run_within(f)).await;
        })
    }

    fn yield_now(&self) -> Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>> {
        None // a multi-threaded runtime, as whatsapp-rust's own TokioRuntime
    }
}
