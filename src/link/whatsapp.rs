//! `WhatsAppLink`: the real network, on the `whatsapp-rust` crate.
//!
//! One `Bot` per session over its key store (`credentials`: its own `SqliteStore` file,
//! `<data-dir>/sessions/<id>.db`, or its rows in PostgreSQL).
//! The client's events become `LinkEvent`s; a small pairing manager keeps a live pairing
//! code while the session is unpaired (a code lives 180 s, is void after a reconnect, and
//! WhatsApp may ask for a refresh); a watcher reports the client's run loop ending
//! unexpectedly as a crash.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use whatsapp_rust::pair_code::{PairCodeOptions, PairCodeRejection};
use whatsapp_rust::prelude::*;
use whatsapp_rust::transport::{
    TokioWebSocketTransportFactory, Transport, TransportEvent, TransportFactory,
};

use botvisor_actors::{
    now_ms, BoxFuture, Connection as LinkConnection, EventSink, Link, LinkError, LinkEvent,
    PairingCode, PairingQr, Persistence, SessionSpec,
};

use super::credentials::Credentials;

/// WhatsApp's pairing code validity.
pub const CODE_VALIDITY: Duration = Duration::from_secs(180);
/// Ask for a fresh code this long before the old one expires.
const REFRESH_MARGIN: Duration = Duration::from_secs(5);
/// How long to wait for the client's socket before trying again.
const SOCKET_WAIT: Duration = Duration::from_secs(30);
/// Retry delay after a throttled pairing request when WhatsApp gives none.
const THROTTLE_RETRY: Duration = Duration::from_secs(60);
/// How long a stop waits for the client's own disconnect (it flushes receipts and the
/// device state, each bounded by 5 s inside whatsapp-rust) before its tasks are ended.
const DISCONNECT_WAIT: Duration = Duration::from_secs(8);
/// How long a stop waits for the run loop to end after the disconnect.
const RUN_LOOP_WAIT: Duration = Duration::from_secs(2);

/// whatsapp-rust's runtime for one session: tokio, with every task the client spawns
/// remembered, so that a stop ends all of them. Each of those tasks holds the client
/// (and through it the session's store and its descriptors); several outlive
/// `disconnect()` by design (the QR rotation for up to ~160 s, sync waits up to 60 s)
/// or wait forever for a disconnect that a kill or a crash never makes (the chat-lane
/// workers, whose senders live in the client itself: a cycle). Without this, a stopped
/// session's client and store stayed alive (issue 26).
#[derive(Clone, Default)]
struct SessionTasks(Arc<std::sync::Mutex<TaskList>>);

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
        let task = tokio::spawn(async move {
            let _untrack = untrack;
            future.await;
        });
        list.running.insert(id, task.abort_handle());
        task
    }

    /// Aborts every task of the session that is still running.
    fn abort_all(&self) {
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
            let _ = tokio::task::spawn_blocking(f).await;
        })
    }

    fn yield_now(&self) -> Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>> {
        None // a multi-threaded runtime, as whatsapp-rust's own TokioRuntime
    }
}

/// How the WhatsApp link is set up.
#[derive(Debug, Clone)]
pub struct WhatsAppSettings {
    /// The WhatsApp Web version to announce (no HTTP fetch at start).
    pub version: (u32, u32, u32),
    /// WebSocket URL; `None` is WhatsApp's own server.
    pub url: Option<String>,
    /// Answer `!ping` with `pong` and the uptime.
    pub builtin_commands: bool,
}

/// A WhatsApp Web version that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not a version such as 2.3000.1042742319")]
pub struct VersionError(String);

/// Parses `2.3000.1042742319`.
pub fn parse_version(s: &str) -> Result<(u32, u32, u32), VersionError> {
    let parts: Vec<&str> = s.trim().split('.').collect();
    match parts.as_slice() {
        [a, b, c] => match (a.parse(), b.parse(), c.parse()) {
            (Ok(a), Ok(b), Ok(c)) => Ok((a, b, c)),
            _ => Err(VersionError(s.to_string())),
        },
        _ => Err(VersionError(s.to_string())),
    }
}

/// The real WhatsApp link.
pub struct WhatsAppLink {
    credentials: Credentials,
    settings: WhatsAppSettings,
    /// Where received messages are made durable before WhatsApp is told they arrived.
    inbound: OnceLock<Arc<dyn Persistence>>,
}

impl WhatsAppLink {
    /// A link storing credentials under `data_dir`.
    pub fn new(data_dir: PathBuf, settings: WhatsAppSettings) -> WhatsAppLink {
        WhatsAppLink::with_credentials(Credentials::Files { data_dir }, settings)
    }

    /// A link keeping credentials in `credentials`.
    pub fn with_credentials(credentials: Credentials, settings: WhatsAppSettings) -> WhatsAppLink {
        WhatsAppLink {
            credentials,
            settings,
            inbound: OnceLock::new(),
        }
    }

    /// Where the sessions' keys are.
    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    /// Received messages go to `store` (their `message.received` events), durably,
    /// before the client acknowledges them to WhatsApp: a crash or a failed commit
    /// leaves them unacknowledged, and WhatsApp delivers them again on the next connect
    /// (whatsapp-rust's inbound durability hook). Sessions connected later use it.
    pub fn keep_inbound_in(&self, store: Arc<dyn Persistence>) {
        let _ = self.inbound.set(store);
    }
}

/// whatsapp-rust's inbound durability hook: a batch of received messages is handed to
/// the store and committed before the client acks them; an `Err` (the disk failing)
/// keeps them unacked, so WhatsApp redelivers them (the store's event ids are derived
/// from the message, so a redelivery repeats the same `X-Botvisor-Event-Id`).
struct DurableInbound {
    shared: Arc<Shared>,
    store: Arc<dyn Persistence>,
}

#[async_trait::async_trait]
impl whatsapp_rust::types::durability_hook::InboundDurabilityHook for DurableInbound {
    async fn on_messages(
        &self,
        _client: Arc<Client>,
        batch: &[InboundMessage],
    ) -> anyhow::Result<()> {
        for m in batch {
            if let Some(msg) = received(m) {
                self.store.inbound(&self.shared.user_id, &msg);
            }
        }
        self.store
            .flush()
            .await
            .map_err(|e| anyhow::anyhow!("cannot keep the received messages: {e}"))
    }
}

/// A received message as botvisor reports it (`None` for the account's own messages).
fn received(m: &InboundMessage) -> Option<botvisor_actors::InboundMessage> {
    if m.info.source.is_from_me {
        return None;
    }
    let text = m.message.text_content().map(str::to_string);
    Some(botvisor_actors::InboundMessage {
        id: m.info.id.to_string(),
        from: m.info.source.sender.to_string(),
        chat: m.info.source.chat.to_string(),
        timestamp_ms: m.info.timestamp.timestamp_millis().max(0) as u64,
        kind: message_kind(&m.message, text.is_some()).into(),
        text,
    })
}

/// `ABCD1234` → `ABCD-1234` (as WhatsApp shows it and the LD7 API documents it).
pub fn format_code(code: &str) -> String {
    if code.len() == 8 && code.is_ascii() {
        format!("{}-{}", &code[..4], &code[4..])
    } else {
        code.to_string()
    }
}

/// What the event handler, the pairing manager and the watcher share.
struct Shared {
    user_id: String,
    events: EventSink,
    builtin_commands: bool,
    started: Instant,
    /// Paired (pair-success seen, or the store already had an account).
    paired: AtomicBool,
    /// A terminal event was reported: the run loop's end is expected.
    terminal: AtomicBool,
    /// We are closing or logging out: events and the run loop's end are expected.
    closing: AtomicBool,
    /// Wakes the pairing manager (refresh requested, reconnect, paired).
    refresh: Notify,
    /// Received messages reach the store through the durability hook, not as events.
    durable_inbound: bool,
}

impl Shared {
    /// A connect attempt failed. An unpaired session reports it: a lasting cause ends a
    /// create waiting for its first code at once, and any cause becomes `lastError` (so a
    /// create that times out says why). A paired session's drop was already reported by
    /// the client's own `Disconnected`; its retries are the client's business.
    fn connect_failed(&self, error: &str) {
        if self.closing.load(Ordering::SeqCst) || self.paired.load(Ordering::SeqCst) {
            return;
        }
        let message = format!("cannot reach WhatsApp: {error}");
        if is_lasting(error) {
            self.events.emit(LinkEvent::PairingRejected {
                message,
                throttled: false,
            });
        } else {
            self.events
                .emit(LinkEvent::Disconnected { reason: message });
        }
    }

    fn emit_terminal(&self, event: LinkEvent) {
        if self.closing.load(Ordering::SeqCst) || self.terminal.swap(true, Ordering::SeqCst) {
            return;
        }
        self.events.emit(event);
    }

    fn on_event(self: &Arc<Self>, event: &Event, client: &Arc<Client>) {
        match event {
            Event::Connected(_) => {
                self.paired.store(true, Ordering::SeqCst);
                self.refresh.notify_one();
                let name = Some(client.push_name()).filter(|n| !n.is_empty());
                self.events.emit(LinkEvent::Online { name });
            }
            Event::PairSuccess(_) => {
                tracing::info!(user_id = %self.user_id, "paired with the phone");
                self.paired.store(true, Ordering::SeqCst);
                self.refresh.notify_one();
                self.events.emit(LinkEvent::Connecting);
            }
            Event::PairError(e) => {
                tracing::warn!(user_id = %self.user_id, error = %e.error, "pairing failed");
            }
            Event::Disconnected(d) => {
                if !self.closing.load(Ordering::SeqCst) {
                    self.events.emit(LinkEvent::Disconnected {
                        reason: format!("disconnected from WhatsApp: {}", d.reason),
                    });
                }
                // A pairing code does not survive a reconnect: the manager asks again.
                self.refresh.notify_one();
            }
            Event::PairingCodeRefresh(_) => self.refresh.notify_one(),
            Event::PairingQrCode(qr) if !self.paired.load(Ordering::SeqCst) => {
                self.events.emit(LinkEvent::PairingQr(PairingQr {
                    data: qr.code.clone(),
                    expires_at_ms: now_ms() + qr.timeout.as_millis() as u64,
                }))
            }
            Event::PairingQrCodesExhausted(q) => {
                // WhatsApp rotates a handful of QR codes per connection; the pairing code
                // flow goes on, and the next reconnect brings new QR codes.
                tracing::info!(user_id = %self.user_id, disconnected = q.disconnected, "QR codes exhausted for this connection");
            }
            Event::LoggedOut(lo) => self.emit_terminal(LinkEvent::LoggedOut {
                reason: format!("{:?}", lo.reason),
            }),
            Event::StreamReplaced(_) => self.emit_terminal(LinkEvent::Replaced {
                reason: "WhatsApp replaced this connection (stream conflict)".into(),
            }),
            Event::TemporaryBan(ban) => {
                let secs = ban.expire.num_seconds().max(0) as u64;
                let until = crate::timefmt::iso(now_ms() + secs * 1000);
                self.emit_terminal(LinkEvent::Banned {
                    reason: format!("temporary ban ({}) for {secs} s, until {until}", ban.code),
                })
            }
            Event::ClientOutdated(_) => self.emit_terminal(LinkEvent::Crashed {
                error: "WhatsApp says this client version is outdated; set a newer --wa-version"
                    .into(),
            }),
            Event::ConnectFailure(f) if !f.reason.should_reconnect() => {
                self.emit_terminal(LinkEvent::Crashed {
                    error: format!(
                        "WhatsApp refused the connection: {:?}{}",
                        f.reason,
                        f.message
                            .as_deref()
                            .map(|m| format!(" ({m})"))
                            .unwrap_or_default()
                    ),
                })
            }
            Event::ConnectFailure(f) => self.events.emit(LinkEvent::Disconnected {
                reason: format!("WhatsApp is unavailable ({:?}); reconnecting", f.reason),
            }),
            Event::SelfPushNameUpdated(u) if client.is_connected() => {
                self.events.emit(LinkEvent::Online {
                    name: Some(u.new_name.clone()).filter(|n| !n.is_empty()),
                })
            }
            Event::Receipt(r) if !r.source.is_from_me => {
                use botvisor_actors::ReceiptStatus;
                use whatsapp_rust::wacore::types::presence::ReceiptType;
                let status = match r.r#type {
                    ReceiptType::Delivered | ReceiptType::Inactive => ReceiptStatus::Delivered,
                    ReceiptType::Read => ReceiptStatus::Read,
                    ReceiptType::Played => ReceiptStatus::Played,
                    _ => return,
                };
                self.events
                    .emit(LinkEvent::Receipt(botvisor_actors::Receipt {
                        message_ids: r.message_ids.iter().map(|id| id.to_string()).collect(),
                        by: r.source.sender.to_string(),
                        status,
                        timestamp_ms: r.timestamp.timestamp_millis().max(0) as u64,
                    }));
            }
            Event::Messages(batch) => {
                for m in batch.iter() {
                    self.on_message(m, client);
                }
            }
            _ => {}
        }
    }

    /// A received message: reported to the session (for its webhooks), logged without
    /// its text; `!ping` answers `pong`.
    fn on_message(&self, m: &InboundMessage, client: &Arc<Client>) {
        tracing::debug!(user_id = %self.user_id, from_me = m.info.source.is_from_me, "message received");
        let Some(msg) = received(m) else {
            return;
        };
        if !self.durable_inbound {
            self.events.emit(LinkEvent::Message(msg));
        }
        if !self.builtin_commands {
            return;
        }
        let Some(reply) = m
            .message
            .text_content()
            .and_then(|t| super::builtin_reply(t, self.started.elapsed()))
        else {
            return;
        };
        let chat = m.info.source.chat.clone();
        let client = client.clone();
        let user_id = self.user_id.clone();
        tokio::spawn(async move {
            if let Err(e) = client.send_message(chat, wa::Message::text(reply)).await {
                tracing::warn!(%user_id, error = %e, "could not answer !ping");
            }
        });
    }
}

/// A received message's kind, from its content (the stanza's `type`/`mediatype`
/// attributes are often absent): one of a small fixed set, so it can label a metric.
pub fn message_kind(m: &wa::Message, has_text: bool) -> &'static str {
    if has_text {
        return "text";
    }
    let m = m.get_base_message();
    let set = [
        (m.image_message.is_set(), "image"),
        (m.video_message.is_set() || m.ptv_message.is_set(), "video"),
        (m.audio_message.is_set(), "audio"),
        (
            m.document_message.is_set() || m.document_with_caption_message.is_set(),
            "document",
        ),
        (
            m.sticker_message.is_set() || m.lottie_sticker_message.is_set(),
            "sticker",
        ),
        (
            m.location_message.is_set() || m.live_location_message.is_set(),
            "location",
        ),
        (
            m.contact_message.is_set() || m.contacts_array_message.is_set(),
            "contact",
        ),
        (
            m.reaction_message.is_set() || m.enc_reaction_message.is_set(),
            "reaction",
        ),
        (
            m.poll_creation_message.is_set()
                || m.poll_creation_message_v2.is_set()
                || m.poll_creation_message_v3.is_set()
                || m.poll_update_message.is_set(),
            "poll",
        ),
        (m.protocol_message.is_set(), "protocol"),
    ];
    set.iter()
        .find(|(present, _)| *present)
        .map_or("other", |(_, kind)| kind)
}

/// Runs inline on the client's dispatch path, so a terminal event is recorded before the
/// client's run loop can end (the watcher then knows the end was expected). It only flips
/// flags and casts to the session actor; slow work (replies) goes to its own task.
struct InlineHandler {
    shared: Arc<Shared>,
    client: Arc<OnceLock<Weak<Client>>>,
}

impl EventHandler for InlineHandler {
    fn handle_event(&self, event: Arc<Event>) {
        if let Some(client) = self.client.get().and_then(Weak::upgrade) {
            self.shared.on_event(&event, &client);
        }
    }
}

/// Keeps a live pairing code while the session is unpaired.
async fn pairing_manager(client: Arc<Client>, shared: Arc<Shared>, phone_number: String) {
    let done = || shared.paired.load(Ordering::SeqCst) || shared.closing.load(Ordering::SeqCst);
    loop {
        if done() {
            return;
        }
        if client.wait_for_socket(SOCKET_WAIT).await.is_err() {
            continue; // the client keeps reconnecting by itself
        }
        if done() || client.is_logged_in() {
            return;
        }
        client.cancel_pair_code().await;
        let options = PairCodeOptions {
            phone_number: phone_number.clone(),
            // Shown on the phone as "Chrome (Linux)"; WhatsApp rejects unknown OS names.
            display_os: Some("Linux".into()),
            ..Default::default()
        };
        let wait = match client.pair_with_code(options).await {
            Ok(code) => {
                shared.events.emit(LinkEvent::PairingCode(PairingCode {
                    code: format_code(&code),
                    expires_at_ms: now_ms() + CODE_VALIDITY.as_millis() as u64,
                }));
                CODE_VALIDITY.saturating_sub(REFRESH_MARGIN)
            }
            Err(e) => {
                let throttled = e.rejection().is_some_and(PairCodeRejection::is_throttled);
                let retry = e.backoff().unwrap_or(if throttled {
                    THROTTLE_RETRY
                } else {
                    Duration::from_secs(5)
                });
                if let Some(rejection) = e.rejection() {
                    let message = if throttled {
                        format!(
                            "WhatsApp is rate-limiting pairing codes for this number ({}); retry in {} s",
                            rejection.text().unwrap_or("throttled"),
                            retry.as_secs()
                        )
                    } else {
                        format!(
                            "WhatsApp refused to issue a pairing code: {}",
                            rejection.text().unwrap_or("refused")
                        )
                    };
                    shared
                        .events
                        .emit(LinkEvent::PairingRejected { message, throttled });
                } else {
                    tracing::warn!(user_id = %shared.user_id, error = %e, "pairing code request failed");
                }
                retry
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shared.refresh.notified() => {}
        }
    }
}

/// Whether a connect error will not heal in seconds (no such host, nothing listening):
/// a create waiting for its first pairing code fails at once instead of timing out.
fn is_lasting(error: &str) -> bool {
    let e = error.to_ascii_lowercase();
    [
        "dns",
        "lookup",
        "name or service not known",
        "no such host",
        "connection refused",
        "network is unreachable",
    ]
    .iter()
    .any(|needle| e.contains(needle))
}

/// The client's transport factory, watched: a failed connect is reported to the session
/// (the client itself only logs it, then retries).
struct WatchedTransport {
    inner: TokioWebSocketTransportFactory,
    shared: Arc<Shared>,
}

#[async_trait::async_trait]
impl TransportFactory for WatchedTransport {
    async fn create_transport(
        &self,
    ) -> Result<(Arc<dyn Transport>, async_channel::Receiver<TransportEvent>), anyhow::Error> {
        let result = self.inner.create_transport().await;
        if let Err(e) = &result {
            self.shared.connect_failed(&format!("{e:#}"));
        }
        result
    }
}

/// One session's live WhatsApp client.
pub struct WhatsAppConnection {
    client: Arc<Client>,
    shared: Arc<Shared>,
    watcher: JoinHandle<()>,
    manager: Option<JoinHandle<()>>,
    /// Every task whatsapp-rust spawned for this client.
    tasks: SessionTasks,
}

impl WhatsAppConnection {
    /// Ends everything that holds the client but this connection's own reference:
    /// botvisor's pairing manager and watcher (it owns the `BotHandle`) and every task
    /// the client spawned. Once the connection is dropped, the client and its store
    /// (with its descriptors) go with it.
    fn end_tasks(&mut self) {
        self.shared.closing.store(true, Ordering::SeqCst);
        if let Some(m) = self.manager.take() {
            m.abort();
        }
        // Wakes whatever waits on the client's shutdown (keepalive, reconnect waits)
        // when no disconnect ran (a kill, a crash, a close that timed out).
        self.client.signal_shutdown_sync();
        self.tasks.abort_all();
        self.watcher.abort();
        release_freed_memory_soon();
    }
}

/// Gives the memory of stopped sessions back to the system. glibc keeps freed memory in
/// its arenas for reuse and returns it only when the top of an arena is free, so after a
/// mass stop most of what the sessions used stayed in the process (measured with
/// `wa-footprint`, BENCHMARKS.md). A stop asks for a `malloc_trim` on the blocking pool,
/// at most one per second however many sessions stop together.
fn release_freed_memory_soon() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::sync::atomic::AtomicBool;
        static PENDING: AtomicBool = AtomicBool::new(false);
        if PENDING.swap(true, Ordering::SeqCst) {
            return; // a trim is already due
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            PENDING.store(false, Ordering::SeqCst);
            return;
        };
        runtime.spawn(async {
            // Aborted tasks drop their part of the client at their next poll: wait for
            // them, and for the rest of a mass stop.
            tokio::time::sleep(Duration::from_secs(1)).await;
            PENDING.store(false, Ordering::SeqCst);
            let _ = tokio::task::spawn_blocking(|| {
                // SAFETY: malloc_trim only walks glibc's own arenas; it is thread-safe.
                unsafe { libc::malloc_trim(0) }
            })
            .await;
        });
    }
}

impl Drop for WhatsAppConnection {
    /// A session killed (watchdog, kill deadline) or failed never gets `close`: the
    /// tasks are ended here, without the disconnect's flush.
    fn drop(&mut self) {
        self.end_tasks();
    }
}

/// `15551234567` → its user JID; a full JID is taken as it is.
fn recipient(to: &str) -> Result<Jid, LinkError> {
    let jid = if to.contains('@') {
        to.to_string()
    } else {
        format!("{to}@s.whatsapp.net")
    };
    jid.parse::<Jid>()
        .map_err(|e| LinkError::new(format!("'{to}' is not a WhatsApp recipient: {e}")))
}

impl LinkConnection for WhatsAppConnection {
    fn send_text(&self, to: &str, text: &str) -> BoxFuture<'static, Result<String, LinkError>> {
        let client = self.client.clone();
        let to = recipient(to);
        let text = text.to_string();
        Box::pin(async move {
            let to = to?;
            client
                .send_message(to, wa::Message::text(text))
                .await
                .map(|sent| sent.message_id)
                .map_err(|e| LinkError::new(format!("WhatsApp did not take the message: {e}")))
        })
    }

    fn logout(&mut self) -> BoxFuture<'_, Result<(), LinkError>> {
        Box::pin(async move {
            self.shared.closing.store(true, Ordering::SeqCst);
            if !self.shared.paired.load(Ordering::SeqCst) {
                self.client.disconnect().await;
                return Err(LinkError::new(
                    "the session was never paired, so there was no linked device to remove",
                ));
            }
            if !self.client.is_connected() {
                return Err(LinkError::new(
                    "not connected to WhatsApp, so the device could not be unlinked; \
                     remove it under Linked Devices on the phone",
                ));
            }
            self.client.logout().await;
            Ok(())
        })
    }

    /// Disconnects (the client flushes its receipts and device state, closes the socket
    /// and clears its connection state), waits for the run loop to end, then ends every
    /// task the client still has.
    fn close(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.shared.closing.store(true, Ordering::SeqCst);
            if let Some(m) = self.manager.take() {
                m.abort();
            }
            if tokio::time::timeout(DISCONNECT_WAIT, self.client.disconnect())
                .await
                .is_err()
            {
                tracing::warn!(user_id = %self.shared.user_id, "the WhatsApp client did not disconnect in time; its tasks are ended");
            }
            let _ = tokio::time::timeout(RUN_LOOP_WAIT, &mut self.watcher).await;
            self.end_tasks();
        })
    }
}

impl Link for WhatsAppLink {
    fn name(&self) -> &'static str {
        "whatsapp"
    }

    fn connect(
        &self,
        spec: SessionSpec,
        events: EventSink,
    ) -> BoxFuture<'static, Result<Box<dyn LinkConnection>, LinkError>> {
        let path = self.credentials.describe(&spec.user_id);
        let store = self.credentials.open(&spec.user_id);
        let settings = self.settings.clone();
        let inbound = self.inbound.get().cloned();
        Box::pin(async move {
            let store = store.await?;
            let shared = Arc::new(Shared {
                user_id: spec.user_id.clone(),
                events,
                builtin_commands: settings.builtin_commands,
                started: Instant::now(),
                paired: AtomicBool::new(false),
                terminal: AtomicBool::new(false),
                closing: AtomicBool::new(false),
                refresh: Notify::new(),
                durable_inbound: inbound.is_some(),
            });
            let transport = WatchedTransport {
                inner: match &settings.url {
                    Some(url) => TokioWebSocketTransportFactory::new().with_url(url.clone()),
                    None => TokioWebSocketTransportFactory::new(),
                },
                shared: shared.clone(),
            };
            let handler = InlineHandler {
                shared: shared.clone(),
                client: Arc::new(OnceLock::new()),
            };
            let client_slot = handler.client.clone();
            let tasks = SessionTasks::default();
            let mut builder = Bot::builder()
                .with_runtime(tasks.clone())
                .with_backend_arc(store)
                .with_transport_factory(transport)
                .with_version(settings.version)
                .with_event_handler(handler);
            if let Some(store) = inbound {
                builder = builder.with_inbound_durability_hook(DurableInbound {
                    shared: shared.clone(),
                    store,
                });
            }
            let bot = builder.build().await.map_err(|e| {
                super::credential_error("cannot build the WhatsApp client", &path, &e.to_string())
            })?;
            let client = bot.client();
            let _ = client_slot.set(Arc::downgrade(&client));
            let paired = client.pn().is_some();
            shared.paired.store(paired, Ordering::SeqCst);
            let handle = bot.spawn();
            if paired {
                shared.events.emit(LinkEvent::Connecting);
            }
            let manager = (!paired).then(|| {
                tokio::spawn(pairing_manager(
                    client.clone(),
                    shared.clone(),
                    spec.phone_number.clone(),
                ))
            });
            let watched = shared.clone();
            let watcher = tokio::spawn(async move {
                handle.await;
                if !watched.closing.load(Ordering::SeqCst)
                    && !watched.terminal.load(Ordering::SeqCst)
                {
                    watched.events.emit(LinkEvent::Crashed {
                        error: "the WhatsApp client stopped unexpectedly".into(),
                    });
                }
            });
            Ok(Box::new(WhatsAppConnection {
                client,
                shared,
                watcher,
                manager,
                tasks,
            }) as Box<dyn LinkConnection>)
        })
    }

    fn remove_data(&self, user_id: &str) -> Result<(), LinkError> {
        self.credentials.remove(user_id)
    }

    fn files_per_session(&self) -> u32 {
        // The key store's (`.db`, `-wal` and `-shm` for a file), and the socket.
        self.credentials.files_per_session() + 1
    }

    /// Each session holds its store (3 descriptors) and a socket: refuse a new one
    /// clearly before the process runs out.
    fn admit(&self) -> Result<(), LinkError> {
        crate::limits::check_headroom().map_err(|e| LinkError::new(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_messages_kind_comes_from_its_content_through_wrappers() {
        use whatsapp_rust::buffa::MessageField;
        assert_eq!(message_kind(&wa::Message::default(), true), "text");
        assert_eq!(message_kind(&wa::Message::default(), false), "other");
        let image = wa::Message {
            image_message: MessageField::some(Default::default()),
            ..Default::default()
        };
        assert_eq!(message_kind(&image, false), "image");
        let location = wa::Message {
            location_message: MessageField::some(Default::default()),
            ..Default::default()
        };
        let ephemeral = wa::Message {
            ephemeral_message: MessageField::some(wa::message::FutureProofMessage {
                message: MessageField::some(location),
            }),
            ..Default::default()
        };
        assert_eq!(message_kind(&ephemeral, false), "location");
    }

    #[test]
    fn lasting_connect_errors_are_told_from_passing_ones() {
        assert!(is_lasting("IO error: Connection refused (os error 111)"));
        assert!(is_lasting(
            "failed to lookup address information: Name or service not known"
        ));
        assert!(!is_lasting("operation timed out"));
        assert!(!is_lasting("TLS handshake eof"));
    }

    #[test]
    fn codes_are_shown_with_a_dash() {
        assert_eq!(format_code("ABCD1234"), "ABCD-1234");
        assert_eq!(format_code("odd"), "odd");
    }

    #[test]
    fn versions_parse() {
        assert_eq!(
            parse_version("2.3000.1042742319"),
            Ok((2, 3000, 1042742319))
        );
        assert!(parse_version("2.3000").is_err());
        assert!(parse_version("a.b.c").is_err());
    }
}
