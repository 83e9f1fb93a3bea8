//! `WhatsAppLink`: the real network, on the `whatsapp-rust` crate.
//!
//! One `Bot` per session over its key store (`credentials`: its own `SqliteStore` file,
//! `<data-dir>/sessions/<id>.db`, or its rows in PostgreSQL).
//! The client's events become `LinkEvent`s; a small pairing manager keeps a live pairing
//! code while the session is unpaired (a code lives 180 s, is void after a reconnect, and
//! WhatsApp may ask for a refresh); a watcher reports the client's run loop ending
//! unexpectedly as a crash.
mod connection;
mod events;
mod locator;
mod pairing;
mod tasks;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use whatsapp_rust::prelude::*;
use whatsapp_rust::transport::{
    TokioWebSocketTransportFactory, Transport, TransportEvent, TransportFactory,
};

use botvisor_actors::{
    BoxFuture, Connection as LinkConnection, EventSink, Link, LinkError, LinkEvent, Persistence,
    SessionSpec,
};

pub use connection::WhatsAppConnection;
pub use events::{format_code, message_kind};

use super::credentials::Credentials;
use super::proxy::{Proxies, ProxyUrl};
use events::{learn_sender, open_vote, received, InlineHandler, Shared};
use pairing::pairing_manager;
use tasks::SessionTasks;

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
    /// The sessions' proxies.
    proxies: OnceLock<Arc<Proxies>>,
    /// Sessions connecting or connected: each may open its key store's files again at
    /// any time (the store closes them while the session is idle).
    running: Arc<AtomicU64>,
    /// The periodic trim of idle stores' freed memory, started by the first connect.
    trimming: std::sync::Once,
}

/// One running session, counted in [`WhatsAppLink::running`] while it lives.
pub(super) struct Running(Arc<AtomicU64>);

impl Running {
    fn new(count: &Arc<AtomicU64>) -> Running {
        count.fetch_add(1, Ordering::SeqCst);
        Running(count.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
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
            proxies: OnceLock::new(),
            running: Arc::default(),
            trimming: std::sync::Once::new(),
        }
    }

    /// Sessions connect through the proxies `proxies` names for them (read at each
    /// connect, so a change applies from a session's next connection).
    pub fn connect_through(&self, proxies: Arc<Proxies>) {
        let _ = self.proxies.set(proxies);
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
        client: Arc<Client>,
        batch: &[InboundMessage],
    ) -> anyhow::Result<()> {
        if !self.store.has_room(&self.shared.user_id) {
            anyhow::bail!(
                "the webhook backlog is full (--webhook-backlog-max): the messages stay \
                 unacknowledged and WhatsApp delivers them again"
            );
        }
        for m in batch {
            if let Some(mut msg) = received(m) {
                learn_sender(&client, &mut msg).await;
                open_vote(&client, &*self.store, &self.shared.user_id, m, &mut msg).await;
                self.store.inbound(&self.shared.user_id, &msg);
            }
        }
        self.store
            .flush()
            .await
            .map_err(|e| anyhow::anyhow!("cannot keep the received messages: {e}"))
    }
}

/// The client's transport factory, watched: a failed connect is reported to the session
/// (the client itself only logs it, then retries).
struct WatchedTransport {
    inner: Box<dyn TransportFactory>,
    shared: Arc<Shared>,
}

/// whatsapp-rust's WebSocket transport through a proxy: the tunnel, then the same TLS
/// (for `wss://`) and upgrade (with WhatsApp Web's `Origin`) its own factory makes.
struct ProxiedTransport {
    url: String,
    proxy: ProxyUrl,
}

#[async_trait::async_trait]
impl TransportFactory for ProxiedTransport {
    async fn create_transport(
        &self,
    ) -> Result<(Arc<dyn Transport>, async_channel::Receiver<TransportEvent>), anyhow::Error> {
        let uri: http::Uri = self
            .url
            .parse()
            .map_err(|e| anyhow::anyhow!("bad WhatsApp URL: {e}"))?;
        let tls = uri.scheme_str() == Some("wss");
        let host = uri
            .host()
            .ok_or_else(|| anyhow::anyhow!("the WhatsApp URL has no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let stream = self
            .proxy
            .tunnel(&host, port)
            .await
            .map_err(anyhow::Error::msg)?;
        let connector = if tls {
            whatsapp_rust::transport::default_tls_connector()
        } else {
            whatsapp_rust::transport::Connector::Plain
        };
        let stream = connector
            .wrap(&host, stream)
            .await
            .map_err(|e| anyhow::anyhow!("TLS through proxy {}: {e}", self.proxy.redacted()))?;
        let origin =
            http::HeaderValue::from_static(whatsapp_rust::wacore::net::WHATSAPP_WEB_ORIGIN);
        let (ws, _) = tokio_websockets::ClientBuilder::from_uri(uri)
            .add_header(http::header::ORIGIN, origin)
            .map_err(|e| anyhow::anyhow!("WebSocket upgrade: {e}"))?
            .connect_on(stream)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "WebSocket connect through proxy {} failed: {e}",
                    self.proxy.redacted()
                )
            })?;
        Ok(whatsapp_rust::transport::from_websocket(ws))
    }
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

/// whatsapp-rust's HTTP client (media uploads and downloads) for a session with a proxy:
/// an agent through that proxy, configured as whatsapp-rust configures its default one
/// (16 KiB buffers, 3 idle connections). `None`: the default client, direct. A test-peer
/// build always makes one, accepting the loopback peer's self-signed media host.
fn media_http_client(
    proxy: Option<&ProxyUrl>,
) -> Result<Option<whatsapp_rust::http::UreqHttpClient>, String> {
    if proxy.is_none() && !cfg!(feature = "test-peer") {
        return Ok(None);
    }
    let config = ureq::config::Config::builder()
        .input_buffer_size(16 * 1024)
        .output_buffer_size(16 * 1024)
        .max_idle_connections(3)
        .max_idle_connections_per_host(2)
        .proxy(proxy.map(ProxyUrl::for_http).transpose()?);
    #[cfg(feature = "test-peer")]
    let config = config.tls_config(
        ureq::tls::TlsConfig::builder()
            .disable_verification(true)
            .build(),
    );
    Ok(Some(whatsapp_rust::http::UreqHttpClient::with_agent(
        config.build().into(),
    )))
}

/// One session's whatsapp-rust client, not running yet: over `store`, its tasks on
/// `tasks`, its transport watched, its events handled inline (with a weak handle on the
/// client it makes), received messages made durable in `inbound` when set.
async fn build_bot(
    settings: &WhatsAppSettings,
    store: Arc<dyn whatsapp_rust::wacore::store::traits::Backend>,
    shared: &Arc<Shared>,
    inbound: Option<Arc<dyn Persistence>>,
    tasks: SessionTasks,
    proxy: Option<ProxyUrl>,
) -> Result<Bot, String> {
    let url = settings
        .url
        .clone()
        .unwrap_or_else(|| whatsapp_rust::wacore::net::WHATSAPP_WEB_WS_URL.to_string());
    let proxy_for_media = proxy.clone();
    let inner: Box<dyn TransportFactory> = match proxy {
        Some(proxy) => Box::new(ProxiedTransport { url, proxy }),
        None => Box::new(TokioWebSocketTransportFactory::new().with_url(url)),
    };
    let transport = WatchedTransport {
        inner,
        shared: shared.clone(),
    };
    let handler = InlineHandler {
        shared: shared.clone(),
        client: Arc::new(OnceLock::new()),
    };
    let client_slot = handler.client.clone();
    let http = media_http_client(proxy_for_media.as_ref())?;
    let mut builder = Bot::builder()
        .with_runtime(tasks)
        .with_backend_arc(store)
        .with_transport_factory(transport)
        .with_version(settings.version)
        .with_event_handler(handler);
    if let Some(http) = http {
        builder = builder.with_http_client(http);
    }
    if let Some(store) = inbound {
        builder = builder.with_inbound_durability_hook(DurableInbound {
            shared: shared.clone(),
            store,
        });
    }
    let bot = builder.build().await.map_err(|e| e.to_string())?;
    let _ = client_slot.set(Arc::downgrade(&bot.client()));
    Ok(bot)
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
        self.trimming
            .call_once(|| connection::trim_while_running(self.running.clone()));
        let running = Running::new(&self.running);
        let store = self.credentials.open(&spec.user_id);
        let settings = self.settings.clone();
        let inbound = self.inbound.get().cloned();
        let proxy = self
            .proxies
            .get()
            .and_then(|p| p.for_session(&spec.user_id));
        // The client, its store and its tasks allocate from the session heap.
        Box::pin(crate::session_heap::within(async move {
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
            let tasks = SessionTasks::default();
            let bot = build_bot(&settings, store, &shared, inbound, tasks.clone(), proxy)
                .await
                .map_err(|e| {
                    let failure = super::StoreFailure::other(e);
                    super::credential_error("cannot build the WhatsApp client", &path, &failure)
                })?;
            let client = bot.client();
            let paired = client.pn().is_some();
            shared.paired.store(paired, Ordering::SeqCst);
            let handle = bot.spawn();
            if paired {
                shared.events.emit(LinkEvent::Connecting);
            }
            let manager = (!paired).then(|| {
                tokio::spawn(crate::session_heap::within(pairing_manager(
                    client.clone(),
                    shared.clone(),
                    spec.phone_number.clone(),
                )))
            });
            let watched = shared.clone();
            let watcher = tokio::spawn(crate::session_heap::within(async move {
                handle.await;
                if !watched.closing.load(Ordering::SeqCst)
                    && !watched.terminal.load(Ordering::SeqCst)
                {
                    crate::session_heap::outside(|| {
                        watched.events.emit(LinkEvent::Crashed {
                            error: "the WhatsApp client stopped unexpectedly".into(),
                        })
                    });
                }
            }));
            Ok(Box::new(WhatsAppConnection {
                client,
                shared,
                watcher,
                manager,
                tasks,
                _running: running,
            }) as Box<dyn LinkConnection>)
        }))
    }

    fn remove_data(&self, user_id: &str) -> Result<(), LinkError> {
        self.credentials.remove(user_id)
    }

    fn files_per_session(&self) -> u32 {
        // The key store's (`.db`, `-wal` and `-shm` for a file), and the socket.
        self.credentials.files_per_session() + 1
    }

    /// Each session holds its store (3 descriptors) and a socket while active: refuse a
    /// new one clearly before the process runs out, counting every running session's
    /// whole share even while its idle store has its files closed.
    fn admit(&self) -> Result<(), LinkError> {
        let reserved = self.running.load(Ordering::SeqCst) * u64::from(self.files_per_session());
        crate::limits::check_headroom(reserved).map_err(|e| LinkError::new(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::pairing::is_lasting;
    use super::*;

    #[test]
    fn a_lid_sender_is_reported_by_its_phone_when_known_and_its_lid() {
        use super::events::sender_jids;
        let jid = |s: &str| s.parse::<Jid>().unwrap();
        let (phone, lid) = ("15557654321@s.whatsapp.net", "123456789012345@lid");
        let some = |s: &str| Some(s.to_string());
        assert_eq!(sender_jids(&jid(phone), None), (phone.to_string(), None));
        assert_eq!(
            sender_jids(&jid(lid), Some(&jid(phone))),
            (phone.to_string(), some(lid))
        );
        assert_eq!(sender_jids(&jid(lid), None), (lid.to_string(), some(lid)));
        assert_eq!(
            sender_jids(&jid(phone), Some(&jid(lid))),
            (phone.to_string(), some(lid))
        );
        // A device's LID names the account.
        assert_eq!(
            sender_jids(&jid("123456789012345:7@lid"), None).1,
            some(lid)
        );
    }

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
