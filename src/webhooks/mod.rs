//! Signed, durable webhooks. What happens (state changes, messages in and out) is written
//! to the `outbox` table in the same transaction as the change that caused it, and
//! delivered from there by one dispatcher:
//!
//! - Work is split in lanes, one per (destination, session). Only a lane's head (its lowest
//!   id not dead) is ever in flight, one request per lane at a time, so each receiver gets
//!   a session's events in order; a lane that fails waits out its own backoff and holds up
//!   no other session, not even on the same receiver.
//! - Requests are async (hyper-util's client over rustls), on a small runtime of their own
//!   (the thread `botvisor-webhook`), never the HTTP front end's or the sessions'. One
//!   semaphore bounds the requests in flight overall (`--webhook-max-inflight`); each
//!   attempt is signed and has a time limit (`--webhook-timeout`: a receiver that hangs,
//!   or closes the connection mid-request, fails that attempt). Backoff doubles from 1 s
//!   to `--webhook-retry-max` with jitter; after `--webhook-max-attempts` the row stays as
//!   a dead letter until replayed, and the lane goes on with its next event.
//! - The dispatcher (the thread `botvisor-webhook-dispatch`, with its own connection to
//!   the database) does not poll: the store's writer tells it which lanes got rows after
//!   each commit, a replay tells it to look again, a backoff is a timer for the earliest
//!   retry, and a full look at every lane every few seconds is the safety net. Outcomes
//!   are written back in one transaction per batch.
//! - At shutdown attempts in flight are abandoned: their rows stay, so they are delivered
//!   after the restart (at least once, like a kill between a 2xx and the delete).
//!
//! A receiver that is down costs disk, not memory. Past `--webhook-backlog-max` nothing
//! accepted is dropped: new messages are refused where they come in (a send or a sim
//! inbound answers 503 with `Retry-After`, a received WhatsApp batch stays unacknowledged
//! and is delivered again), while state changes, which cannot be refused, are still
//! queued.
//!
//! Each POST carries `X-Botvisor-Event-Id` (stable across retries: the receiver's
//! idempotency key), `X-Botvisor-Event`, `X-Botvisor-Timestamp` (Unix seconds) and
//! `X-Botvisor-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`.
//!
//! - [`signing`]: the signature and event ids;
//! - `client`: the HTTPS client, its CA file, and one attempt;
//! - `dispatcher`: the lanes, backoff and receiver health, and the outcomes written back
//!   through the database engine ([`crate::db::Engine`]: the outbox SQL lives there).

mod client;
mod dispatcher;
pub mod signing;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

pub use crate::db::DeadLetter;
use crate::db::Lane;
use client::http_client;
pub use client::load_ca_file;
use dispatcher::{Dispatcher, Outcome};
pub use signing::{derived_event_id, event_id, signature};

/// How webhooks are delivered.
#[derive(Clone)]
pub struct WebhookSettings {
    /// Receivers (every event goes to each).
    pub urls: Vec<String>,
    /// The HMAC key.
    pub secret: String,
    /// Attempts before a delivery becomes a dead letter.
    pub max_attempts: u32,
    /// One attempt's time limit.
    pub timeout: Duration,
    /// Deliveries waiting (all destinations) past which new events are dropped.
    pub backlog_max: u64,
    /// The longest wait between two attempts (the backoff doubles from 1 s up to it).
    pub retry_max: Duration,
    /// Requests in flight at most, over every receiver and session.
    pub max_inflight: usize,
    /// Send `session.pairing_code` events (they carry a secret).
    pub pairing_codes: bool,
    /// Which events the global receivers get (`--webhook-events`); `None`: every one.
    pub events: Option<EventFilter>,
    /// CA certificates trusted for https receivers besides the public roots.
    pub ca_certs: Vec<rustls::pki_types::CertificateDer<'static>>,
}

impl std::fmt::Debug for WebhookSettings {
    // The secret signs every delivery: never in a debug print.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookSettings")
            .field("urls", &self.urls)
            .field("secret", &"<redacted>")
            .field("max_attempts", &self.max_attempts)
            .field("timeout", &self.timeout)
            .field("backlog_max", &self.backlog_max)
            .field("retry_max", &self.retry_max)
            .field("max_inflight", &self.max_inflight)
            .field("pairing_codes", &self.pairing_codes)
            .field("ca_certs", &self.ca_certs.len())
            .finish()
    }
}

/// How long `close` waits for the dispatcher to write what it has and stop.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// What the dispatcher is told.
#[derive(Debug)]
pub(crate) enum Msg {
    /// The store committed outbox rows in these lanes.
    Committed(Vec<Lane>),
    /// Dead letters were put back in line: look at every lane again.
    Rescan,
    /// An attempt ended.
    Done(Outcome),
    /// Write what is done and stop.
    Close,
}

/// The shared state of the webhook side: settings, per-session receivers, the counters,
/// and the way to the dispatcher.
#[derive(Debug)]
pub struct Webhooks {
    /// Settings.
    pub settings: WebhookSettings,
    /// What `/metrics` shows of the deliveries. `counts.backlog` is also what `admit`
    /// checks: the dispatcher counts it about once a second while there is work, and new
    /// events add to it in between.
    pub counts: crate::metrics::WebhookCounts,
    closing: AtomicBool,
    /// Receivers set per session (`PUT /api/sessions/:id/webhook`).
    session_urls: dashmap::DashMap<String, OwnReceiver>,
    /// The dispatcher's inbox, while it runs.
    inbox: Mutex<Option<mpsc::Sender<Msg>>>,
    /// Answered when the dispatcher has stopped.
    stopped: Mutex<Option<mpsc::Receiver<()>>>,
}

/// A receiver's URL: `http(s)://host[:port]/path`, with no whitespace and no control
/// character (C0 or C1: the OpenAPI pattern excludes the same, so every URL the document
/// allows is taken).
pub fn parse_url(s: &str) -> Result<String, String> {
    let s = s.trim();
    let rest = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"))
        .filter(|r| {
            !r.is_empty()
                && !r.starts_with('/')
                && !r.contains(|c: char| c.is_whitespace() || c.is_control())
        });
    match rest {
        Some(_) if s.len() <= 2_048 => Ok(s.to_string()),
        _ => Err(format!(
            "'{}' is not a webhook URL: use http(s)://host[:port]/path",
            s.chars().take(100).collect::<String>()
        )),
    }
}

/// A session's own receiver: its URL, which events it gets (`None`: every one) and the
/// secret its deliveries are signed with (`None`: `--webhook-secret`).
#[derive(Clone)]
pub struct OwnReceiver {
    /// Where.
    pub url: String,
    /// Which events.
    pub events: Option<EventFilter>,
    /// Its own signing secret.
    pub secret: Option<String>,
}

impl std::fmt::Debug for OwnReceiver {
    // The secret signs deliveries: never in a debug print.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnReceiver")
            .field("url", &self.url)
            .field("events", &self.events)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl OwnReceiver {
    /// As stored.
    pub fn of(row: crate::db::SessionReceiver) -> OwnReceiver {
        let events = row.events.as_deref().and_then(|e| {
            let patterns: Vec<&str> = e.split(',').collect();
            EventFilter::parse(&patterns)
                .inspect_err(|err| {
                    tracing::warn!(user_id = %row.user_id, error = %err, "a stored event filter no longer parses; the receiver gets every event")
                })
                .ok()
        });
        OwnReceiver {
            url: row.url,
            events,
            secret: row.secret,
        }
    }

    /// To store for `user_id`.
    pub fn row(&self, user_id: &str) -> crate::db::SessionReceiver {
        crate::db::SessionReceiver {
            user_id: user_id.to_string(),
            url: self.url.clone(),
            events: self.events.as_ref().map(|f| f.patterns().join(",")),
            secret: self.secret.clone(),
        }
    }
}

impl Webhooks {
    /// The shared state for `settings`.
    pub fn new(settings: WebhookSettings, counts: crate::metrics::WebhookCounts) -> Arc<Webhooks> {
        Arc::new(Webhooks {
            settings,
            counts,
            closing: AtomicBool::new(false),
            session_urls: dashmap::DashMap::new(),
            inbox: Mutex::new(None),
            stopped: Mutex::new(None),
        })
    }

    /// Whether the backlog has room for events that can be refused upstream (a message
    /// received or sent): below `--webhook-backlog-max`. Past it their sources push back
    /// (503 with `Retry-After`, or a received batch left unacknowledged for WhatsApp to
    /// deliver again) instead of an accepted event being dropped; counted and warned.
    pub fn has_room(&self) -> bool {
        let pending = self.counts.backlog.get().max(0) as u64;
        if pending < self.settings.backlog_max {
            return true;
        }
        let refused = self.counts.refused.inc();
        if refused.is_power_of_two() {
            tracing::warn!(
                pending,
                cap = self.settings.backlog_max,
                refused = refused + 1,
                "webhook backlog full (are the receivers down?): new messages are refused \
                 until it drains"
            );
        }
        false
    }

    /// Counts new deliveries into the backlog. Never refused: an event whose cause was
    /// accepted (or cannot be refused, as a state change) is always queued.
    pub fn count(&self, deliveries: u64) {
        self.counts.backlog.inc_by(deliveries as i64);
    }

    /// Starts delivering: the dispatcher, with its own handle on the database, and the
    /// runtime of the requests. `session_urls` are the per-session receivers stored.
    pub fn start(
        self: &Arc<Self>,
        database: crate::db::Location,
        session_urls: Vec<crate::db::SessionReceiver>,
    ) {
        for row in session_urls {
            self.session_urls
                .insert(row.user_id.clone(), OwnReceiver::of(row));
        }
        if let Err(e) = self.spawn(&database) {
            tracing::error!(error = %e, "webhook delivery cannot start: events stay in the outbox");
        }
    }

    /// The per-session receivers become `rows` (another node changed one).
    pub fn replace_session_urls(&self, rows: Vec<crate::db::SessionReceiver>) {
        let keep: std::collections::HashSet<String> =
            rows.iter().map(|r| r.user_id.clone()).collect();
        self.session_urls.retain(|id, _| keep.contains(id));
        for row in rows {
            self.session_urls
                .insert(row.user_id.clone(), OwnReceiver::of(row));
        }
    }

    fn spawn(self: &Arc<Self>, database: &crate::db::Location) -> Result<(), String> {
        let conn = database
            .connect()
            .map_err(|e| format!("cannot open the database: {e}"))?;
        let client = http_client(&self.settings)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("botvisor-webhook")
            // Name lookups only (getaddrinfo blocks).
            .max_blocking_threads(4)
            .build()
            .map_err(|e| format!("cannot build the delivery runtime: {e}"))?;
        let handle = runtime.handle().clone();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("botvisor-webhook".into())
            .spawn(move || {
                let _ = runtime.block_on(stop_rx);
                // Attempts still in flight are abandoned: their rows stay in the outbox.
                runtime.shutdown_background();
            })
            .map_err(|e| format!("cannot start the delivery thread: {e}"))?;
        let (tx, rx) = mpsc::channel();
        let (stopped_tx, stopped_rx) = mpsc::channel();
        let dispatcher = Dispatcher::new(self.clone(), conn, client, handle, tx.clone(), rx);
        *lock(&self.inbox) = Some(tx);
        *lock(&self.stopped) = Some(stopped_rx);
        std::thread::Builder::new()
            .name("botvisor-webhook-dispatch".into())
            .spawn(move || {
                dispatcher.run();
                drop(stop_tx);
                let _ = stopped_tx.send(());
            })
            .map(|_| ())
            .map_err(|e| format!("cannot start the webhook dispatcher: {e}"))
    }

    fn tell(&self, msg: Msg) {
        if let Some(tx) = lock(&self.inbox).as_ref() {
            let _ = tx.send(msg);
        }
    }

    /// The store committed outbox rows in these lanes (destination, session): the
    /// dispatcher looks at them.
    pub fn committed<'a>(&self, lanes: impl IntoIterator<Item = (&'a str, &'a str)>) {
        let mut seen = HashSet::new();
        let lanes: Vec<Lane> = lanes
            .into_iter()
            .filter(|lane| seen.insert(*lane))
            .map(|(d, u)| (d.to_string(), u.to_string()))
            .collect();
        if !lanes.is_empty() {
            self.tell(Msg::Committed(lanes));
        }
    }

    /// Dead letters were put back in line: the dispatcher looks at every lane again.
    pub fn rescan(&self) {
        self.tell(Msg::Rescan);
    }

    /// Whether `user_id`'s events go anywhere ([`Webhooks::destinations`] is not empty),
    /// without building the list.
    pub fn has_destinations(&self, user_id: &str) -> bool {
        !self.settings.urls.is_empty() || self.session_urls.contains_key(user_id)
    }

    /// Where a session's `kind` events go: the global receivers (those `--webhook-events`
    /// lets through), then its own (if its filter lets it through).
    pub fn destinations(&self, user_id: &str, kind: &str) -> Vec<String> {
        let global = self.settings.events.as_ref().is_none_or(|f| f.allows(kind));
        let mut urls = if global {
            self.settings.urls.clone()
        } else {
            Vec::new()
        };
        if let Some(own) = self.session_urls.get(user_id) {
            let wanted = own.events.as_ref().is_none_or(|f| f.allows(kind));
            if wanted && !urls.contains(&own.url) {
                urls.push(own.url.clone());
            }
        }
        urls
    }

    /// The secret a delivery to `destination` about `user_id` is signed with: the
    /// session's own receiver's, when it has one and that is where it goes (and it is
    /// not also a global receiver), else `--webhook-secret`.
    pub fn secret_for(&self, destination: &str, user_id: &str) -> String {
        if !self.settings.urls.iter().any(|u| u == destination) {
            if let Some(own) = self.session_urls.get(user_id) {
                if own.url == destination {
                    if let Some(secret) = &own.secret {
                        return secret.clone();
                    }
                }
            }
        }
        self.settings.secret.clone()
    }

    /// Sets (`Some`) or clears a session's own receiver (already stored). What is in the
    /// outbox for it is still delivered.
    pub fn set_session_url(self: &Arc<Self>, user_id: &str, receiver: Option<OwnReceiver>) {
        match receiver {
            Some(r) => {
                self.session_urls.insert(user_id.to_string(), r);
            }
            None => {
                self.session_urls.remove(user_id);
            }
        }
    }

    /// A session's own receiver.
    pub fn session_url(&self, user_id: &str) -> Option<OwnReceiver> {
        self.session_urls.get(user_id).map(|r| r.value().clone())
    }

    /// Stops delivering: no new attempt starts, the outcomes already in are written (the
    /// wait for that is bounded), attempts in flight are abandoned (their rows stay, to be
    /// delivered after the restart). Blocks for at most a couple of seconds.
    pub fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
        let inbox = lock(&self.inbox).take();
        if let Some(tx) = inbox {
            let _ = tx.send(Msg::Close);
        }
        let stopped = lock(&self.stopped).take();
        if let Some(rx) = stopped {
            if rx.recv_timeout(CLOSE_WAIT).is_err() {
                tracing::warn!("the webhook dispatcher did not stop in time");
            }
        }
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A fetched media's SHA-256, hex (a file's was taken as it was streamed in).
pub fn media_sha256(m: &botvisor_actors::Media) -> Option<String> {
    use botvisor_actors::MediaSource;
    match &m.source {
        MediaSource::Bytes(b) => Some(hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
            b.as_slice(),
        ))),
        MediaSource::File(f) => Some(hex::encode(f.sha256)),
        MediaSource::Url(_) => None,
    }
}

/// Every kind of event botvisor delivers.
pub const EVENT_KINDS: &[&str] = &[
    "session.state",
    "session.pairing_code",
    "session.deleted",
    "message.received",
    "message.sent",
    "message.failed",
    "message.delivered",
    "message.read",
    "message.played",
    "message.reaction",
    "message.edited",
    "message.revoked",
    "message.poll_vote",
];

/// Which events a receiver gets: names (`message.received`) and families
/// (`message.*`; `*` is every event).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventFilter(Vec<String>);

impl EventFilter {
    /// A filter from its patterns; each must name at least one event botvisor delivers
    /// (a misspelt name would silently let nothing through).
    pub fn parse<S: AsRef<str>>(patterns: &[S]) -> Result<EventFilter, String> {
        let mut kept = Vec::new();
        for p in patterns {
            let p = p.as_ref().trim();
            if p.is_empty() {
                continue;
            }
            if !EVENT_KINDS.iter().any(|k| matches(p, k)) {
                return Err(format!(
                    "'{p}' names no event; events are {} (or a family such as message.*)",
                    EVENT_KINDS.join(", ")
                ));
            }
            kept.push(p.to_string());
        }
        if kept.is_empty() {
            return Err("an event filter needs at least one event".into());
        }
        Ok(EventFilter(kept))
    }

    /// Whether `kind` passes.
    pub fn allows(&self, kind: &str) -> bool {
        self.0.iter().any(|p| matches(p, kind))
    }

    /// The patterns, as given.
    pub fn patterns(&self) -> &[String] {
        &self.0
    }
}

/// `pattern` (a name, `family.*` or `*`) against an event kind.
fn matches(pattern: &str, kind: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => kind.starts_with(prefix) && (prefix.is_empty() || prefix.ends_with('.')),
        None => pattern == kind,
    }
}

/// The structured part of a message sent, as webhooks and the simulated network show it:
/// `location`, `contact` or `poll` with the fields of the send body; `None` for a text.
pub fn content_json(
    content: &botvisor_actors::Outgoing,
) -> Option<(&'static str, serde_json::Value)> {
    use botvisor_actors::Outgoing;
    match content {
        Outgoing::Text(_) => None,
        Outgoing::Location(l) => Some((
            "location",
            serde_json::json!({"latitude": l.latitude, "longitude": l.longitude, "name": l.name, "address": l.address}),
        )),
        Outgoing::Contact(c) => Some((
            "contact",
            serde_json::json!({"name": c.name, "phone": c.phone}),
        )),
        Outgoing::Poll(p) => Some((
            "poll",
            serde_json::json!({"question": p.question, "options": p.options, "selectable": p.selectable}),
        )),
        // Never the bytes: what a receiver needs to know of them (and their SHA-256, to
        // match them against what it sent).
        Outgoing::Media(m) => Some((
            m.kind.name(),
            serde_json::json!({
                "mimetype": m.mimetype,
                "size": m.size(),
                "sha256": media_sha256(m),
                "fileName": m.file_name,
                "caption": m.caption,
                "voice": m.voice,
            }),
        )),
    }
}

#[cfg(test)]
mod filter_tests {
    use super::EventFilter;

    #[test]
    fn names_and_families_pass_and_a_misspelling_is_refused() {
        let f = EventFilter::parse(&["message.received", "session.*"]).unwrap();
        assert!(f.allows("message.received"));
        assert!(f.allows("session.state") && f.allows("session.deleted"));
        assert!(!f.allows("message.sent") && !f.allows("message.received.x"));
        let all = EventFilter::parse(&["*"]).unwrap();
        assert!(all.allows("message.sent"));
        assert!(EventFilter::parse(&["message.recieved"]).is_err());
        assert!(EventFilter::parse(&["mess*"]).is_err());
        assert!(EventFilter::parse::<&str>(&[]).is_err());
        assert!(EventFilter::parse(&[" ", ""]).is_err());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_with_whitespace_or_control_characters_are_refused() {
        assert!(parse_url("https://example.com/hook").is_ok());
        assert!(parse_url("  http://10.0.0.1:9000/h?a=1  ").is_ok());
        assert!(parse_url("https://exämple.com/hook").is_ok());
        for bad in [
            "https://Q6\u{105}\u{85}5\u{8}", // found by schemathesis: NEL, backspace
            "https://a b/",
            "https://a\u{7f}b/",
            "https:///path",
            "ftp://example.com/",
            "https://",
        ] {
            assert!(parse_url(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn past_the_backlog_cap_messages_are_refused_and_accepted_events_still_count() {
        let hooks = Webhooks::new(
            WebhookSettings {
                urls: vec!["http://127.0.0.1:9/h".into()],
                secret: "0123456789abcdef".into(),
                max_attempts: 3,
                timeout: Duration::from_secs(1),
                backlog_max: 2,
                retry_max: Duration::from_secs(1),
                max_inflight: 1,
                pairing_codes: false,
                events: None,
                ca_certs: Vec::new(),
            },
            crate::metrics::WebhookCounts::default(),
        );
        assert!(hooks.has_room());
        hooks.count(1);
        assert!(hooks.has_room());
        hooks.count(1);
        assert!(!hooks.has_room(), "at the cap");
        assert!(!hooks.has_room());
        hooks.count(3);
        assert_eq!(
            hooks.counts.backlog.get(),
            5,
            "what was accepted is counted, past the cap too"
        );
        assert_eq!(hooks.counts.refused.get(), 2);
        // The dispatcher's count of the outbox is the truth again.
        hooks.counts.backlog.set(0);
        assert!(hooks.has_room());
    }
}
