//! The sessions' durable outbound queues (`POST /api/sessions/:id/messages?queue=true`).
//!
//! A queued send is committed (table `queued`) with the id its message will have before
//! the 202 answers. One worker per session sends its queue in order, one message per
//! `--send-interval` (±25 % jitter, so the pace does not look like a machine's), while
//! the session is online, under the id given at enqueue: a send retried after a crash is
//! the same message to the network. Each ends once as `message.sent` or `message.failed`,
//! in the transaction that takes it out of the queue (its event id comes from the
//! message id, so a retry after a crash is the same event). A send the network refuses
//! is tried 3 times (2 s, 4 s apart) before it fails; a session that is not online (or
//! busy) only delays its queue. Sends queued for a session that is deleted go with it.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::StatusCode;
use serde_json::{Map, Value};
use tokio::sync::mpsc;

use botvisor_actors::{now_ms, Action, Done, Outgoing, SessionState};

use super::errors::ApiError;
use super::handlers::content::{mentions_of, outgoing_of};
use super::handlers::messages::known_message;
use super::App;
use crate::db::QueuedRow;

/// Tries of a send the network refuses, before it fails.
const ATTEMPTS: u32 = 3;

/// How often a worker looks again at a session that is not online.
const OFFLINE_WAIT: Duration = Duration::from_secs(1);

/// The queues' workers.
pub struct Outbound {
    /// `--send-interval`: between two sends of a session.
    interval: Duration,
    /// The channel of each session's worker.
    workers: Mutex<HashMap<String, mpsc::UnboundedSender<QueuedRow>>>,
    /// The next place in a queue (grows across sessions and restarts).
    next: AtomicU64,
}

impl Outbound {
    /// Queues paced by `interval`.
    pub fn new(interval: Duration) -> Outbound {
        Outbound {
            interval,
            workers: Mutex::default(),
            next: AtomicU64::new(now_ms() * 1_000),
        }
    }

    /// `--send-interval`.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// A new send's place in its queue.
    pub fn next_seq(&self) -> u64 {
        self.next.fetch_add(1, Ordering::SeqCst)
    }

    /// Takes up the sends still queued at boot (in order), after every one of them.
    pub fn resume(&self, app: &Arc<App>, rows: Vec<QueuedRow>) {
        if let Some(last) = rows.iter().map(|r| r.seq).max() {
            self.next.fetch_max(last + 1, Ordering::SeqCst);
        }
        if !rows.is_empty() {
            tracing::info!(sends = rows.len(), "resuming the queued sends");
        }
        for row in rows {
            self.push(app, row);
        }
    }

    fn lock_workers(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, mpsc::UnboundedSender<QueuedRow>>> {
        self.workers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands a committed send to its session's worker (starting one if none runs).
    pub fn push(&self, app: &Arc<App>, row: QueuedRow) {
        let mut workers = self.lock_workers();
        let row = match workers.get(&row.user_id) {
            Some(tx) => match tx.send(row) {
                Ok(()) => return,
                Err(mpsc::error::SendError(row)) => row,
            },
            None => row,
        };
        let user_id = row.user_id.clone();
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(row);
        workers.insert(user_id.clone(), tx);
        tokio::spawn(worker(app.clone(), user_id, rx));
    }
}

/// A message id as WhatsApp's clients make them (`3EB0` and hex digits).
pub fn new_message_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u64(now_ms());
    let a = h.finish();
    h.write_u64(a);
    format!("3EB0{a:016X}{:04X}", h.finish() & 0xFFFF)
}

/// `interval` ±25 %.
fn jittered(interval: Duration) -> Duration {
    let mut h = RandomState::new().build_hasher();
    h.write_u64(now_ms());
    let unit = (h.finish() % 10_001) as f64 / 10_000.0; // 0..=1
    interval.mul_f64(0.75 + unit * 0.5)
}

/// Sends one session's queue, in order, paced. Ends once its session is gone and
/// nothing more waits for it (a session deleted leaves no task behind).
async fn worker(app: Arc<App>, user_id: String, mut rx: mpsc::UnboundedReceiver<QueuedRow>) {
    while let Some(row) = rx.recv().await {
        if send_one(&app, &row).await {
            tokio::time::sleep(jittered(app.outbound.interval)).await;
            continue;
        }
        // Gone. Under the map's lock a push either came before (it is in the channel)
        // or comes after (it finds no worker and starts one).
        let mut workers = app.outbound.lock_workers();
        if rx.is_empty() {
            workers.remove(&user_id);
            break;
        }
    }
    tracing::debug!(%user_id, "queue worker ended");
}

/// Whether the session still holds the send: it exists and was created before the send
/// was queued (a session deleted and created again under its id does not inherit it).
fn still_queued(app: &App, row: &QueuedRow) -> bool {
    app.store
        .view()
        .read(&row.user_id, |rec| rec.created_at_ms <= row.at_ms)
        .unwrap_or(false)
}

/// Sends a queued message until it is sent or failed for good (true), or its session
/// is gone (false).
async fn send_one(app: &App, row: &QueuedRow) -> bool {
    let body: Map<String, Value> = match serde_json::from_str(&row.body) {
        Ok(body) => body,
        Err(e) => {
            let error = format!("the queued send could not be read: {e}");
            app.store.queued_done(
                row,
                ("", ""),
                &Outgoing::Text(String::new()),
                &Err::<&String, _>(error),
            );
            return true;
        }
    };
    let to = body
        .get("to")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let chat = crate::link::chat_jid(&to);
    let to_chat = (to.as_str(), chat.as_str());
    let parsed = outgoing_of(&body).and_then(|c| {
        let m = mentions_of(&body, &c)?;
        Ok((c, m))
    });
    // Media by URL is fetched when its turn comes (a URL that fails is a failed send).
    let parsed = match parsed {
        Ok((c, m)) => super::handlers::media::fetched(&app.media, c)
            .await
            .map(|c| (c, m)),
        Err(e) => Err(e),
    };
    let (content, mentions) = match parsed {
        Ok(parts) => parts,
        Err(e) => {
            let content = Outgoing::Text(String::new());
            app.store
                .queued_done(row, to_chat, &content, &Err::<&String, _>(e.message));
            return true;
        }
    };
    let mut refused = 0;
    loop {
        if !still_queued(app, row) {
            return false;
        }
        let online = app
            .store
            .view()
            .read(&row.user_id, |rec| rec.state == SessionState::Online)
            .unwrap_or(false);
        if !online {
            tokio::time::sleep(OFFLINE_WAIT).await;
            continue;
        }
        let reply_to = match body.get("replyTo").and_then(Value::as_str) {
            None => None,
            Some(id) => match known_message(app, &row.user_id, id).await {
                Ok(m) => Some(m),
                Err(e) if e.status == StatusCode::NOT_FOUND => {
                    let error = format!("replyTo: {}", e.message);
                    app.store
                        .queued_done(row, to_chat, &content, &Err::<&String, _>(error));
                    return true;
                }
                Err(_) => {
                    tokio::time::sleep(OFFLINE_WAIT).await;
                    continue;
                }
            },
        };
        let action = Action::Send {
            to: to.clone(),
            content: content.clone(),
            reply_to,
            mentions: mentions.clone(),
            message_id: Some(row.message_id.clone()),
        };
        match super::handlers::act(app, &row.user_id, action).await {
            Ok(Done::Sent(id)) => {
                app.store
                    .queued_done(row, to_chat, &content, &Ok::<_, String>(&id));
                return true;
            }
            Ok(other) => {
                let error = format!("the send answered {other:?}");
                app.store
                    .queued_done(row, to_chat, &content, &Err::<&String, _>(error));
                return true;
            }
            // Not online, or busy: the queue waits for it.
            Err(e) if waits(&e) => tokio::time::sleep(OFFLINE_WAIT).await,
            Err(e) if e.status == StatusCode::NOT_FOUND => return false,
            Err(e) => {
                refused += 1;
                if refused >= ATTEMPTS {
                    app.store
                        .queued_done(row, to_chat, &content, &Err::<&String, _>(e.message));
                    return true;
                }
                tracing::debug!(user_id = %row.user_id, error = %e.message, refused, "a queued send was refused; trying again");
                tokio::time::sleep(Duration::from_secs(1 << refused)).await;
            }
        }
    }
}

/// A refusal that only delays the queue: the session is not online, busy, or did not
/// answer in time.
fn waits(e: &ApiError) -> bool {
    matches!(
        e.status,
        StatusCode::CONFLICT | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_look_like_whatsapps_and_differ() {
        let a = new_message_id();
        let b = new_message_id();
        assert_ne!(a, b);
        assert!(a.starts_with("3EB0") && a.len() == 24, "{a}");
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric()), "{a}");
    }

    #[test]
    fn the_pace_stays_within_a_quarter_of_the_interval() {
        for _ in 0..200 {
            let d = jittered(Duration::from_secs(4));
            assert!(
                d >= Duration::from_secs(3) && d <= Duration::from_secs(5),
                "{d:?}"
            );
        }
    }
}
