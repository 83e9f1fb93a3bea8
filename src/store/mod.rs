//! The session store: the rows in a database engine ([`crate::db`]: SQLite or
//! PostgreSQL), written by one writer thread (group commit), plus an in-memory view that
//! the HTTP reads are served from (reads never wait on an actor or the disk). Backups live
//! here too.
//!
//! - `view`: records, their order and counts by state;
//! - `writer`: the queue and the thread that commits it;
//! - [`backup`]: one SQLite file per backup.
//!
//! What is durable when: a command's reply (create, start, stop, delete, logout,
//! restore) is sent after its row is committed (SQLite: WAL, `synchronous=FULL`, the
//! commit is fsynced, so it survives a kill of the process, a power cut, or the
//! filesystem turning read-only on an error; PostgreSQL: the server confirmed the
//! commit). Group commit pays one commit per batch, not per request. Plain state
//! transitions ride the next group commit, usually within a millisecond.

pub mod backup;
mod names;
mod open;
mod view;
mod webhook;
mod writer;

use std::path::PathBuf;

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use botvisor_actors::{BoxFuture, Persistence, RestoreFn, SessionRecord, StorageError};

use crate::db::{self, Engine};
use crate::paths;
use backup::{BackupError, BackupInfo, Backups};
pub use db::{Event, EVENTS_KEPT};
pub use view::{Counts, View};
use writer::Queue;

use open::{claim_link, sweep};
pub use open::{open_database, redact_password, Database, OpenError};

/// Where the store keeps its files.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// The session database.
    pub database: Database,
    /// The data directory (credentials and backups live under it).
    pub data_dir: PathBuf,
    /// Backups kept per session.
    pub backup_keep: usize,
    /// How long messages are remembered by id (then forgotten by the writer).
    pub messages_keep: std::time::Duration,
    /// The link whose credentials the sessions hold (`sim`, `whatsapp`).
    pub link: &'static str,
    /// Where the writer records each commit's duration (the metrics), if anywhere.
    pub commit_seconds: Option<prometheus_client::metrics::histogram::Histogram>,
    /// Where crash-to-online times go (the metrics), if anywhere.
    pub recovery_seconds: Option<prometheus_client::metrics::histogram::Histogram>,
    /// Webhook receivers, if any: events go to the outbox with the changes behind them.
    pub webhooks: Option<Arc<crate::webhooks::Webhooks>>,
    /// Where messages in and out are counted (the metrics), if anywhere.
    pub messages: Option<crate::metrics::MessageCounts>,
    /// This process as one node of several (`--node-id`, PostgreSQL only): the database
    /// is shared, every commit gated on this node's ownership, and no session is resumed
    /// at open (the node claims its sessions once registered).
    pub node: Option<Arc<crate::db::nodes::Standing>>,
}

/// A sent poll's options as its message row keeps them (a JSON array); `None` for any
/// other message.
pub(crate) fn poll_options(content: &botvisor_actors::Outgoing) -> Option<String> {
    match content {
        botvisor_actors::Outgoing::Poll(p) => serde_json::to_string(&p.options).ok(),
        _ => None,
    }
}

/// The database behind a writer thread, plus the read view.
pub struct Store {
    view: Arc<View>,
    /// The PostgreSQL rows, when the database is one (nodes read the fleet from them).
    rows: Option<db::postgres::Rows>,
    webhooks: Option<Arc<crate::webhooks::Webhooks>>,
    /// When each session that crashed or dropped went down (for crash-to-online times).
    down_since: Mutex<std::collections::HashMap<String, std::time::Instant>>,
    recovery_seconds: Option<prometheus_client::metrics::histogram::Histogram>,
    hub: Arc<crate::events::EventHub>,
    queue: Arc<Queue>,
    reader: Arc<Mutex<Box<dyn Engine>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    backups: Backups,
    config: StoreConfig,
    /// The push names of the senders of messages received since the process started.
    push_names: names::PushNames,
}

impl Store {
    /// The push name the sender known as `jid` gave in a message `user_id` received
    /// since the process started.
    pub fn push_name(&self, user_id: &str, jid: &str) -> Option<String> {
        self.push_names.get(user_id, jid)
    }

    /// Opens (creating if needed, mode 0600) and migrates the database, loads every
    /// session into the view, and starts the writer. Returns the stored sessions.
    pub fn open(config: StoreConfig) -> Result<(Store, Vec<SessionRecord>), OpenError> {
        let location = open::open_node_database(&config.database, config.node.clone())?;
        let mut conn = location.connect()?;
        let boot = conn.load_sessions()?;
        claim_link(&mut *conn, &config, !boot.is_empty())?;
        let backups = Backups::new(paths::backups_dir(&config.data_dir), config.backup_keep);
        // The sweep of leftovers (a directory listing as long as the fleet) runs beside the
        // view's filling; both end before anything runs.
        let (reader, view) = std::thread::scope(|scope| {
            if config.database != Database::Memory {
                // (An in-memory database starts empty: every file would look orphaned.)
                scope.spawn(|| sweep(&config.data_dir, &backups, &boot));
            }
            let reader = location.connect();
            // A node's view holds the sessions it runs, added as it claims them.
            let view = match config.node {
                None => {
                    // Each record as the boot will make it (the supervisor publishes the
                    // same states and their events once it runs): the API may answer
                    // before it has, and must never show the `online` of before a kill.
                    let view = View::with_capacity(boot.len());
                    let now = botvisor_actors::record::now_ms();
                    for rec in &boot {
                        let state = rec.state_at_boot();
                        if state == rec.state {
                            view.put(rec);
                        } else {
                            let mut at_boot = rec.clone();
                            at_boot.state = state;
                            at_boot.updated_at_ms = now;
                            at_boot.clear_pairing();
                            view.put(&at_boot);
                        }
                    }
                    view
                }
                Some(_) => View::default(),
            };
            (reader, Arc::new(view))
        });
        let reader = reader?;
        let queue = Arc::new(Queue::default());
        let writer = {
            let commit_seconds = config.commit_seconds.clone();
            let queue = queue.clone();
            let backups = backups.clone();
            let keep_ms = u64::try_from(config.messages_keep.as_millis()).unwrap_or(u64::MAX);
            let webhooks = config.webhooks.clone();
            std::thread::Builder::new()
                .name("botvisor-store".into())
                .spawn(move || {
                    writer::run(&queue, conn, backups, commit_seconds, webhooks, keep_ms)
                })
                .map_err(|e| StorageError::Failed(format!("cannot start the store writer: {e}")))
                .map_err(OpenError::from)?
        };
        let store = Store {
            view,
            queue,
            hub: Arc::default(),
            webhooks: config.webhooks.clone(),
            down_since: Mutex::default(),
            recovery_seconds: config.recovery_seconds.clone(),
            reader: Arc::new(Mutex::new(reader)),
            rows: match &location {
                db::Location::Postgres(rows) => Some(rows.clone()),
                db::Location::Sqlite(_) => None,
            },
            writer: Mutex::new(Some(writer)),
            backups,
            config,
            push_names: names::PushNames::default(),
        };
        if let Some(node) = &store.config.node {
            store.hub.set_node(&node.id);
        }
        if let Some(w) = &store.webhooks {
            let own = store
                .reader
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .session_webhooks()?;
            w.start(location, own);
        }
        Ok((store, boot))
    }

    /// The PostgreSQL rows, when the database is one.
    pub fn rows(&self) -> Option<&db::postgres::Rows> {
        self.rows.as_ref()
    }

    /// The read view.
    pub fn view(&self) -> &View {
        &self.view
    }

    /// Runs `f` on the side connection, off the runtime.
    async fn on_reader<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn Engine) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, StorageError> {
        let reader = self.reader.clone();
        blocking(move || f(&mut **reader.lock().unwrap_or_else(|p| p.into_inner()))).await?
    }

    /// A stored setting (off the runtime).
    pub async fn setting(&self, key: &str) -> Result<Option<String>, StorageError> {
        let key = key.to_string();
        self.on_reader(move |conn| conn.setting(&key)).await
    }

    /// Stores a setting, durably, before it returns.
    pub async fn set_setting(&self, key: &str, value: String) -> Result<(), StorageError> {
        let key = key.to_string();
        self.on_reader(move |conn| conn.set_setting(&key, &value))
            .await
    }

    /// Reads the per-session webhook receivers again into the webhooks (another node
    /// changed one).
    pub async fn reload_session_webhooks(&self) -> Result<(), StorageError> {
        let Some(w) = self.webhooks.clone() else {
            return Ok(());
        };
        let rows = self.on_reader(|conn| conn.session_webhooks()).await?;
        w.replace_session_urls(rows);
        Ok(())
    }

    /// Replaces a setting with what `change` makes of its current value, atomically
    /// (see [`db::Engine::update_setting`]); whether it was written.
    pub async fn update_setting(
        &self,
        key: &str,
        mut change: impl FnMut(Option<&str>) -> Option<String> + Send + 'static,
    ) -> Result<bool, StorageError> {
        let key = key.to_string();
        self.on_reader(move |conn| conn.update_setting(&key, &mut change))
            .await
    }

    /// Crash (`restarting`) or drop (`disconnected`) to `online`: observed into the
    /// metrics; any other end (stopped, failed, ...) forgets it.
    fn track_recovery(&self, rec: &SessionRecord) {
        use botvisor_actors::SessionState as S;
        let Some(histogram) = &self.recovery_seconds else {
            return;
        };
        let mut down = self.down_since.lock().unwrap_or_else(|p| p.into_inner());
        match rec.state {
            S::Restarting | S::Disconnected => {
                down.entry(rec.user_id.clone())
                    .or_insert_with(std::time::Instant::now);
            }
            S::Online => {
                if let Some(since) = down.remove(&rec.user_id) {
                    histogram.observe(since.elapsed().as_secs_f64());
                }
            }
            S::Stopped | S::Failed | S::LoggedOut => {
                down.remove(&rec.user_id);
            }
            S::Starting | S::Pairing | S::Connecting => {}
        }
    }

    /// The live event stream (every change the view sees).
    pub fn hub(&self) -> &Arc<crate::events::EventHub> {
        &self.hub
    }

    /// The newest state changes of a session, newest first (read off the runtime).
    pub async fn events(&self, user_id: &str, limit: usize) -> Result<Vec<Event>, StorageError> {
        let user_id = user_id.to_string();
        self.on_reader(move |conn| conn.events(&user_id, limit))
            .await
    }

    /// Remembers a message the session sent to `chat` (a JID), for reactions, edits,
    /// revokes and replies (and a poll's options, for its votes).
    pub fn sent_message(
        &self,
        user_id: &str,
        message_id: &str,
        chat: &str,
        content: &botvisor_actors::Outgoing,
    ) {
        self.queue.message(db::MessageRow {
            user_id: user_id.to_string(),
            message_id: message_id.to_string(),
            chat: chat.to_string(),
            author: None,
            from_me: true,
            at_ms: botvisor_actors::now_ms(),
            media: None,
            media_size: None,
            media_type: None,
            poll_options: poll_options(content),
        });
    }

    /// Queues a send in its session's durable outbound queue; the next flush commits it.
    pub fn enqueue(&self, row: db::QueuedRow) {
        self.queue.enqueue(row);
    }

    /// A session's sends still queued, in order.
    pub async fn queued_of(&self, user_id: &str) -> Result<Vec<db::QueuedRow>, StorageError> {
        let user_id = user_id.to_string();
        self.on_reader(move |conn| conn.queued_of(&user_id)).await
    }

    /// Every send still queued (at boot), by session then in order.
    pub async fn queued(&self) -> Result<Vec<db::QueuedRow>, StorageError> {
        self.on_reader(|conn| conn.queued()).await
    }

    /// A message the session sent or received, by its id (still queued, or committed).
    pub async fn message(
        &self,
        user_id: &str,
        message_id: &str,
    ) -> Result<Option<db::MessageRow>, StorageError> {
        if let Some(m) = self.queue.queued_message(user_id, message_id) {
            return Ok(Some(m));
        }
        // A commit in flight may hold it: the flush is answered after that commit. (A
        // failing disk answers at once; what it could not write is still queued.)
        let _ = self.queue.flush().await;
        if let Some(m) = self.queue.queued_message(user_id, message_id) {
            return Ok(Some(m));
        }
        let (user_id, message_id) = (user_id.to_string(), message_id.to_string());
        self.on_reader(move |conn| conn.message(&user_id, &message_id))
            .await
    }

    /// The options of a poll the session sent, by its message id (`None`: no such
    /// message, or not a poll).
    pub async fn sent_poll(
        &self,
        user_id: &str,
        message_id: &str,
    ) -> Result<Option<Vec<String>>, StorageError> {
        Ok(self
            .message(user_id, message_id)
            .await?
            .and_then(|m| m.poll_options)
            .and_then(|o| serde_json::from_str(&o).ok()))
    }

    /// Why commits are failing right now (`None`: the last one succeeded).
    pub fn failing(&self) -> Option<StorageError> {
        self.queue.failing()
    }

    /// Every session row as committed on disk (read off the runtime; for audits).
    pub async fn rows_on_disk(&self) -> Result<Vec<SessionRecord>, StorageError> {
        self.on_reader(|conn| conn.load_sessions()).await
    }

    /// Backs up a session's record and credential file (read off the runtime): the
    /// session's own file, or `credentials` (keys copied out of PostgreSQL).
    pub async fn backup(
        &self,
        rec: SessionRecord,
        credentials: Option<PathBuf>,
    ) -> Result<BackupInfo, BackupError> {
        let backups = self.backups.clone();
        let cred =
            credentials.unwrap_or_else(|| paths::credentials(&self.config.data_dir, &rec.user_id));
        let link = self.config.link;
        blocking(move || backups.create(&rec, &cred, link)).await?
    }

    /// A new path for a scratch key file of a session (a copy of its keys on the way to
    /// or from a backup). Hidden in the session's backup folder: the boot sweep removes
    /// what a crash leaves there.
    pub async fn scratch_file(&self, user_id: &str, what: &str) -> Result<PathBuf, BackupError> {
        let backups = self.backups.clone();
        let (user_id, what) = (user_id.to_string(), what.to_string());
        blocking(move || backups.scratch_file(&user_id, &what)).await?
    }

    /// The ids of a session's backups, newest first.
    pub async fn backups(&self, user_id: &str) -> Result<Vec<String>, StorageError> {
        let backups = self.backups.clone();
        let user_id = user_id.to_string();
        blocking(move || backups.list(&user_id)).await
    }

    /// Finds and checks a backup (the given id, or the newest) and returns its id with
    /// the swap that restores it into the stopped session. A backup of another session
    /// or link is refused here, before anything stops.
    ///
    /// The credentials go to the session's own file, or to `into` (a key file that the
    /// caller copies into PostgreSQL after `apply`; absent if the backup has none).
    pub async fn prepare_restore(
        &self,
        user_id: &str,
        wanted: Option<String>,
        into: Option<PathBuf>,
    ) -> Result<(String, RestoreFn), BackupError> {
        let backups = self.backups.clone();
        let uid = user_id.to_string();
        let link = self.config.link;
        let (backup_id, path) = blocking(move || {
            let (id, path) = backups.find(&uid, wanted.as_deref())?;
            backup::verify(&path, &uid, link)?;
            Ok::<_, BackupError>((id, path))
        })
        .await??;
        let cred = into.unwrap_or_else(|| paths::credentials(&self.config.data_dir, user_id));
        let apply: RestoreFn = Box::new(move |mut rec: SessionRecord| {
            Box::pin(async move {
                blocking(move || {
                    backup::restore_into(&path, &cred, link, &mut rec)?;
                    Ok::<_, BackupError>(rec)
                })
                .await?
                .map_err(Into::into)
            })
        });
        Ok((backup_id, apply))
    }

    /// Commits what is queued and stops the writer (at shutdown).
    pub async fn close(&self) {
        self.queue.close();
        let handle = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = handle {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
        // Everything queued is committed: the outbox keeps what is not delivered yet. The
        // dispatcher writes the outcomes it has and stops; attempts in flight are abandoned
        // (delivered again after the restart). Bounded: a hung receiver cannot hold it.
        if let Some(w) = self.webhooks.clone() {
            let _ = tokio::task::spawn_blocking(move || w.close()).await;
        }
    }
}

/// Runs blocking file or SQLite work on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, StorageError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StorageError::Failed(format!("storage task failed: {e}")))
}

impl Persistence for Store {
    fn insert(&self, rec: &SessionRecord) {
        self.view.put(rec);
        self.queue.insert(rec);
        let published = self.hub.changed(rec, true);
        self.webhook_changes(rec, published);
    }

    fn save(&self, rec: &SessionRecord) {
        // The view goes first: readers see the live state even while the disk is failing.
        let before = self.view.put(rec);
        let state_changed = before != Some(rec.state);
        self.queue.save(rec, state_changed);
        let published = self.hub.changed(rec, state_changed);
        self.webhook_changes(rec, published);
        if state_changed {
            self.track_recovery(rec);
        }
    }

    fn delete(&self, user_id: &str, by: Option<&str>) {
        if let Some(w) = &self.webhooks {
            w.set_session_url(user_id, None);
        }
        self.view.remove(user_id);
        self.push_names.forget(user_id);
        self.queue.delete(user_id);
        self.hub.deleted(user_id, by);
        self.down_since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(user_id);
    }

    fn adopted(&self, rec: &SessionRecord) {
        self.view.put(rec);
    }

    fn release(&self, user_id: &str) {
        self.view.remove(user_id);
        self.push_names.forget(user_id);
        self.queue.release(user_id);
        self.down_since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(user_id);
    }

    fn poll_options<'a>(
        &'a self,
        user_id: &'a str,
        message_id: &'a str,
    ) -> BoxFuture<'a, Option<Vec<String>>> {
        Box::pin(async move { self.sent_poll(user_id, message_id).await.ok()? })
    }

    fn receipt(&self, user_id: &str, receipt: &botvisor_actors::Receipt) {
        use botvisor_actors::ReceiptStatus;
        #[derive(serde::Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Reported<'a> {
            user_id: &'a str,
            message_id: &'a str,
            by: &'a str,
            timestamp: String,
        }
        let kind = match receipt.status {
            ReceiptStatus::Delivered => "message.delivered",
            ReceiptStatus::Read => "message.read",
            ReceiptStatus::Played => "message.played",
        };
        for id in &receipt.message_ids {
            let data = serde_json::to_string(&Reported {
                user_id,
                message_id: id,
                by: &receipt.by,
                timestamp: crate::timefmt::iso(receipt.timestamp_ms),
            })
            .unwrap_or_default();
            // A receipt WhatsApp sends again is the same event.
            let event_id = crate::webhooks::derived_event_id(&[user_id, kind, id, &receipt.by]);
            self.webhook_as(user_id, kind, &data, event_id);
        }
    }

    fn has_room(&self, user_id: &str) -> bool {
        self.webhook_room(user_id)
    }

    fn inbound(&self, user_id: &str, msg: &botvisor_actors::InboundMessage) {
        use botvisor_actors::Refers;
        if let Some(m) = &self.config.messages {
            m.received(&msg.kind);
        }
        #[derive(serde::Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Received<'a> {
            user_id: &'a str,
            message_id: &'a str,
            from: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            from_lid: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            push_name: Option<&'a str>,
            chat: &'a str,
            /// A group's message: `chat` is the group, `author` who wrote it.
            is_group: bool,
            #[serde(skip_serializing_if = "Option::is_none")]
            author: Option<&'a str>,
            kind: &'a str,
            text: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            reply_to: Option<&'a str>,
            #[serde(skip_serializing_if = "<[String]>::is_empty")]
            mentions: &'a [String],
            /// The message a reaction, an edit, a revoke or a vote is about.
            #[serde(skip_serializing_if = "Option::is_none")]
            target_message_id: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            emoji: Option<&'a str>,
            /// A vote's options (`null`: it could not be read).
            #[serde(skip_serializing_if = "Option::is_none")]
            selected_options: Option<Option<&'a [String]>>,
            #[serde(flatten, skip_serializing_if = "Option::is_none")]
            media: Option<MediaFields<'a>>,
            timestamp: String,
        }
        /// A received media's description, as fields of the event.
        #[derive(serde::Serialize)]
        #[serde(rename_all = "camelCase")]
        struct MediaFields<'a> {
            mimetype: Option<&'a str>,
            size: Option<u64>,
            #[serde(skip_serializing_if = "Option::is_none")]
            file_name: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            caption: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            sha256: Option<&'a str>,
            #[serde(skip_serializing_if = "std::ops::Not::not")]
            voice: bool,
        }
        // A reaction, an edit or a revoke is an event of its own, about its target.
        let (event, target, emoji) = match &msg.refers {
            None => ("message.received", None, None),
            Some(Refers::Reaction { message_id, emoji }) => {
                ("message.reaction", Some(message_id), Some(emoji.as_str()))
            }
            Some(Refers::Edit { message_id }) => ("message.edited", Some(message_id), None),
            Some(Refers::Revoke { message_id }) => ("message.revoked", Some(message_id), None),
            Some(Refers::PollVote { message_id, .. }) => {
                ("message.poll_vote", Some(message_id), None)
            }
        };
        let selected_options = match &msg.refers {
            Some(Refers::PollVote { options, .. }) => Some(options.as_deref()),
            _ => None,
        };
        // The phone JID a stored mapping gave for a LID-only sender, else as named.
        let from = msg.from_phone.as_deref().unwrap_or(&msg.from);
        if let Some(name) = &msg.push_name {
            // Under each name the sender is known by (as named, its phone, its LID).
            let jids = [&*msg.from, from, msg.from_lid.as_deref().unwrap_or(from)];
            self.push_names.remember(user_id, &jids, name);
        }
        let data = serde_json::to_string(&Received {
            user_id,
            message_id: &msg.id,
            from,
            from_lid: msg.from_lid.as_deref(),
            push_name: msg.push_name.as_deref(),
            chat: &msg.chat,
            is_group: msg.chat.ends_with("@g.us"),
            author: msg.chat.ends_with("@g.us").then_some(from),
            kind: &msg.kind,
            text: msg.text.as_deref(),
            reply_to: msg.reply_to.as_deref(),
            mentions: &msg.mentions,
            target_message_id: target.map(String::as_str),
            emoji,
            selected_options,
            media: msg.media.as_ref().map(|m| MediaFields {
                mimetype: m.mimetype.as_deref(),
                size: m.size,
                file_name: m.file_name.as_deref(),
                caption: m.caption.as_deref(),
                sha256: m.sha256.as_deref(),
                voice: m.voice,
            }),
            timestamp: crate::timefmt::iso(msg.timestamp_ms),
        })
        .unwrap_or_default();
        // WhatsApp may deliver a message again (it is acknowledged only once this event
        // is durable): the event id comes from the message, so receivers see one id.
        let event_id = crate::webhooks::derived_event_id(&[user_id, &msg.chat, &msg.from, &msg.id]);
        let rows = self.webhook_rows(user_id, event, &data, event_id);
        if target.is_some() {
            self.queue.outbox(rows);
            return;
        }
        let group = msg.chat.ends_with("@g.us");
        // The deliveries and the message to remember are queued together (one lock).
        self.queue.received(
            rows,
            db::MessageRow {
                user_id: user_id.to_string(),
                message_id: msg.id.clone(),
                chat: msg.chat.clone(),
                author: group.then(|| msg.from.clone()),
                from_me: false,
                at_ms: botvisor_actors::now_ms(),
                media: msg.media.as_ref().and_then(|m| m.locator.clone()),
                media_size: msg.media.as_ref().and_then(|m| m.size),
                media_type: msg.media.as_ref().and_then(|m| m.mimetype.clone()),
                poll_options: None,
            },
        );
    }

    fn flush(&self) -> BoxFuture<'static, Result<(), StorageError>> {
        let rx = self.queue.flush();
        Box::pin(async move {
            rx.await
                .unwrap_or_else(|_| Err(StorageError::Unavailable("the store is closed".into())))
        })
    }
}

/// A store on `<dir>/b.db` with nothing attached (for unit tests).
#[cfg(test)]
pub(crate) fn test_config(dir: &std::path::Path) -> StoreConfig {
    StoreConfig {
        database: Database::File(dir.join("b.db")),
        data_dir: dir.to_path_buf(),
        backup_keep: 3,
        messages_keep: std::time::Duration::from_millis(db::MESSAGES_KEPT_MS),
        link: "sim",
        commit_seconds: None,
        recovery_seconds: None,
        webhooks: None,
        messages: None,
        node: None,
    }
}

#[cfg(test)]
mod tests {
    use super::webhook::envelope;
    use super::*;
    use botvisor_actors::SessionState;
    use rusqlite::Connection;

    fn config(dir: &std::path::Path) -> StoreConfig {
        super::test_config(dir)
    }

    fn rows_on_disk(dir: &std::path::Path) -> Vec<(String, String)> {
        let conn = Connection::open(dir.join("b.db")).unwrap();
        let mut stmt = conn
            .prepare("SELECT user_id, state FROM sessions ORDER BY user_id")
            .unwrap();
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        rows
    }

    #[test]
    fn a_webhook_envelope_is_json_with_its_data_as_given() {
        let body = envelope("evt_1", "session.state", 0, r#"{"state":"on\"line"}"#, None).unwrap();
        assert_eq!(
            body,
            r#"{"id":"evt_1","event":"session.state","at":"1970-01-01T00:00:00.000Z","data":{"state":"on\"line"}}"#
        );
        assert!(envelope("evt_2", "x", 0, "not json", None).is_none());
    }

    #[test]
    fn a_postgres_password_never_reaches_debug_output() {
        let db = Database::Postgres {
            url: "postgres://bot:s3cret@db.example:5433/fleet?sslmode=require".into(),
            pool_size: 4,
        };
        let shown = format!("{db:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(
            shown.contains("postgres://bot:***@db.example:5433/fleet?sslmode=require"),
            "{shown}"
        );
        assert_eq!(
            redact_password("postgres://bot@h/db"),
            "postgres://bot@h/db"
        );
    }

    #[tokio::test]
    async fn a_flush_resolves_once_the_rows_are_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let (store, boot) = Store::open(config(dir.path())).unwrap();
        assert!(boot.is_empty());
        let mut rec = SessionRecord::new("u1".into(), "15550001111".into());
        store.insert(&rec);
        for state in [
            SessionState::Pairing,
            SessionState::Connecting,
            SessionState::Online,
        ] {
            rec.state = state;
            store.save(&rec);
        }
        store.flush().await.unwrap();
        // Another connection (another process would see the same) reads the final row.
        assert_eq!(
            rows_on_disk(dir.path()),
            [("u1".to_string(), "online".to_string())]
        );
        // Every state change is logged, even when the row writes were merged.
        let states: Vec<String> = store
            .events("u1", 10)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.state)
            .collect();
        assert_eq!(states, ["online", "connecting", "pairing", "starting"]);
        store.delete("u1", None);
        store.flush().await.unwrap();
        assert!(rows_on_disk(dir.path()).is_empty());
        assert!(store.events("u1", 10).await.unwrap().is_empty());
        store.close().await;
        assert!(store.flush().await.is_err(), "a closed store says so");
    }

    #[tokio::test]
    async fn records_survive_a_reopen_and_pairing_codes_are_not_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(config(dir.path())).unwrap();
        let mut rec = SessionRecord::new("u1".into(), "15550001111".into());
        store.insert(&rec);
        rec.state = SessionState::Pairing;
        rec.pairing = Some(botvisor_actors::PairingCode {
            code: "ABCD-1234".into(),
            expires_at_ms: 1,
        });
        store.save(&rec);
        assert!(store.view().get("u1").unwrap().pairing.is_some());
        store.close().await;
        drop(store);
        let (store, boot) = Store::open(config(dir.path())).unwrap();
        assert_eq!(boot.len(), 1);
        assert_eq!(boot[0].state, SessionState::Pairing);
        assert_eq!(boot[0].pairing, None);
        assert_eq!(store.view().counts().total, 1);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("b.db"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[tokio::test]
    async fn events_are_pruned_per_session_and_memory_databases_work() {
        let mut cfg = config(std::path::Path::new("/nonexistent"));
        cfg.database = Database::Memory;
        let (store, _) = Store::open(cfg).unwrap();
        let mut rec = SessionRecord::new("u".into(), "15550001111".into());
        store.insert(&rec);
        for i in 0..250 {
            rec.state = if i % 2 == 0 {
                SessionState::Online
            } else {
                SessionState::Disconnected
            };
            store.save(&rec);
            if i % 7 == 0 {
                store.flush().await.unwrap();
            }
        }
        store.flush().await.unwrap();
        assert_eq!(
            store.events("u", 1000).await.unwrap().len(),
            EVENTS_KEPT as usize
        );
    }
}
