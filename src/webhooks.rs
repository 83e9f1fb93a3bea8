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
//! A receiver that is down costs disk, not memory (the backlog is capped, with a warning
//! past the cap).
//!
//! Each POST carries `X-Botvisor-Event-Id` (stable across retries: the receiver's
//! idempotency key), `X-Botvisor-Event`, `X-Botvisor-Timestamp` (Unix seconds) and
//! `X-Botvisor-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rusqlite::{params, Connection, OptionalExtension};
use sha2::Sha256;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use botvisor_actors::now_ms;

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

/// How often the dispatcher looks at every lane even when nothing told it to.
const RESCAN_EVERY_MS: u64 = 5_000;
/// How often, at most, the backlog is counted (for `pending`).
const COUNT_EVERY_MS: u64 = 1_000;
/// The wait before retrying a failed read or write of the outbox.
const DB_RETRY_MS: u64 = 1_000;
/// How often a lane waiting for a probe of its receiver looks again.
const PROBE_WAIT_MS: u64 = 500;
/// How long `close` waits for the dispatcher to write what it has and stop.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// The most of a receiver's answer body that is read (then the connection is dropped).
const ANSWER_BODY_MAX: usize = 64 * 1024;

/// A delivery lane: (destination, session).
type Lane = (String, String);

/// Failed attempts in a row, with no success between them, after which a receiver is
/// taken for down: its lanes then wait while one probe at a time tries it.
const DOWN_AFTER: u32 = 3;

/// What the dispatcher knows of one receiver's health (a circuit breaker).
#[derive(Debug, Default)]
struct Health {
    /// Failed attempts in a row.
    failures: u32,
    /// Taken for down: no attempt starts before this (ms), then one probe.
    down_until: u64,
    /// A probe is in flight.
    probing: bool,
}

type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// What the dispatcher is told.
#[derive(Debug)]
enum Msg {
    /// The store committed outbox rows in these lanes.
    Committed(Vec<Lane>),
    /// Dead letters were put back in line: look at every lane again.
    Rescan,
    /// An attempt ended.
    Done(Outcome),
    /// Write what is done and stop.
    Close,
}

/// How an attempt ended.
#[derive(Debug)]
struct Outcome {
    lane: Lane,
    id: i64,
    event_id: String,
    kind: String,
    /// Attempts made before this one.
    attempts: u32,
    result: Result<(), String>,
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
    session_urls: dashmap::DashMap<String, String>,
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

/// The signature header's value for `body` sent at `timestamp`.
pub fn signature(secret: &str, timestamp: u64, body: &str) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes())
        .expect("HMAC takes any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    format!("v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// An event id derived from `parts` (SHA-256, 128 bits): the same parts, the same id.
pub fn derived_event_id(parts: &[&str]) -> String {
    use sha2::Digest;
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p.as_bytes());
    }
    format!("evt_{}", hex::encode(&h.finalize()[..16]))
}

/// A new event id (random, 128 bits).
pub fn event_id() -> String {
    let mut h = RandomState::new().build_hasher();
    h.write_u64(now_ms());
    let a = h.finish();
    let mut h = RandomState::new().build_hasher();
    h.write_u64(a);
    format!("evt_{a:016x}{:016x}", h.finish())
}

/// Backoff before attempt `attempts + 1`: 1 s doubling to `max`, with ±20 % jitter.
fn backoff(attempts: u32, max: Duration) -> Duration {
    let base = ((1u64 << attempts.min(20)) as f64).min(max.as_secs_f64().max(0.001));
    let mut h = RandomState::new().build_hasher();
    h.write_u32(attempts);
    let jitter = 0.8 + 0.4 * (h.finish() % 1000) as f64 / 1000.0;
    Duration::from_secs_f64(base * jitter)
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

    /// Whether a new event fits in the backlog (counting it); warns when it does not.
    pub fn admit(&self, deliveries: u64) -> bool {
        let pending = self.counts.backlog.inc_by(deliveries as i64).max(0) as u64;
        if pending < self.settings.backlog_max {
            return true;
        }
        self.counts.backlog.dec_by(deliveries as i64);
        let dropped = self.counts.dropped.inc();
        if dropped.is_power_of_two() {
            tracing::warn!(
                pending,
                cap = self.settings.backlog_max,
                dropped = dropped + 1,
                "webhook backlog full (are the receivers down?): new events are dropped"
            );
        }
        false
    }

    /// Starts delivering: the dispatcher, with its own connection to `path`, and the
    /// runtime of the requests. `session_urls` are the per-session receivers stored.
    pub fn start(self: &Arc<Self>, path: &str, uri: bool, session_urls: Vec<(String, String)>) {
        for (user_id, url) in session_urls {
            self.session_urls.insert(user_id, url);
        }
        if let Err(e) = self.spawn(path, uri) {
            tracing::error!(error = %e, "webhook delivery cannot start: events stay in the outbox");
        }
    }

    fn spawn(self: &Arc<Self>, path: &str, uri: bool) -> Result<(), String> {
        let conn = crate::store::open_side_connection(path, uri)
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
        let dispatcher = Dispatcher {
            hooks: self.clone(),
            conn,
            client,
            runtime: handle,
            permits: Arc::new(Semaphore::new(self.settings.max_inflight.max(1))),
            tx: tx.clone(),
            rx,
            busy: HashSet::new(),
            waiting: BTreeSet::new(),
            wait_until: HashMap::new(),
            ready: VecDeque::new(),
            queued: HashSet::new(),
            outcomes: Vec::new(),
            health: HashMap::new(),
            write_retry_at: 0,
            rescan_at: 0,
            count_dirty: true,
            counted_at: 0,
        };
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

    /// Where a session's events go: the global receivers, then its own.
    pub fn destinations(&self, user_id: &str) -> Vec<String> {
        let mut urls = self.settings.urls.clone();
        if let Some(own) = self.session_urls.get(user_id) {
            if !urls.contains(own.value()) {
                urls.push(own.value().clone());
            }
        }
        urls
    }

    /// Sets (`Some`) or clears a session's own receiver (already stored). What is in the
    /// outbox for it is still delivered.
    pub fn set_session_url(self: &Arc<Self>, user_id: &str, url: Option<String>) {
        match url {
            Some(url) => {
                self.session_urls.insert(user_id.to_string(), url);
            }
            None => {
                self.session_urls.remove(user_id);
            }
        }
    }

    /// A session's own receiver.
    pub fn session_url(&self, user_id: &str) -> Option<String> {
        self.session_urls.get(user_id).map(|u| u.value().clone())
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The certificates of a PEM file (`--webhook-ca-file`), or why not.
pub fn load_ca_file(
    path: &std::path::Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let what = format!("--webhook-ca-file {}", path.display());
    let certs = rustls::pki_types::CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {what}: {e}"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what} is not PEM: {e}"))?;
    if certs.is_empty() {
        return Err(format!(
            "{what} holds no certificate (-----BEGIN CERTIFICATE-----)"
        ));
    }
    let mut roots = rustls::RootCertStore::empty();
    let (_, refused) = roots.add_parsable_certificates(certs.iter().cloned());
    if refused > 0 {
        return Err(format!(
            "{what}: {refused} certificate(s) cannot be used as a root"
        ));
    }
    Ok(certs)
}

/// hyper-util's pooled client, http and https (rustls with ring, Mozilla's roots plus
/// `--webhook-ca-file`'s).
fn http_client(settings: &WebhookSettings) -> Result<HttpClient, String> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(settings.timeout));
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    roots.add_parsable_certificates(settings.ca_certs.iter().cloned());
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("cannot set up TLS: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(settings.max_inflight.max(1))
        .build(https))
}

/// An error with its causes (`client error (Connect): tcp connect error: Connection refused`).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

/// A row to deliver.
#[derive(Debug)]
struct Head {
    id: i64,
    event_id: String,
    kind: String,
    body: String,
    attempts: u32,
    next_at: i64,
}

/// One signed POST of `head` to `url`; `Err` says why it failed.
async fn attempt(
    client: &HttpClient,
    url: &str,
    head: &Head,
    secret: &str,
    timeout: Duration,
) -> Result<(), String> {
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| format!("the URL {url} is not usable: {e}"))?;
    let timestamp = now_ms() / 1000;
    let request = hyper::Request::post(uri)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(
            hyper::header::USER_AGENT,
            concat!("botvisor/", env!("CARGO_PKG_VERSION")),
        )
        .header("X-Botvisor-Event-Id", &head.event_id)
        .header("X-Botvisor-Event", &head.kind)
        .header("X-Botvisor-Timestamp", timestamp.to_string())
        .header(
            "X-Botvisor-Signature",
            signature(secret, timestamp, &head.body),
        )
        .body(Full::new(Bytes::from(head.body.clone())))
        .map_err(|e| format!("cannot build the request: {e}"))?;
    let deadline = tokio::time::Instant::now() + timeout;
    let answer = match tokio::time::timeout_at(deadline, client.request(request)).await {
        Err(_) => {
            return Err(format!(
                "timed out: no answer within {} (--webhook-timeout)",
                humantime::format_duration(timeout)
            ))
        }
        Ok(Err(e)) => return Err(chain(&e)),
        Ok(Ok(answer)) => answer,
    };
    let status = answer.status();
    // Read (a bounded part of) the body, so the connection can serve the next request;
    // the status alone decides.
    let _ = tokio::time::timeout_at(
        deadline,
        Limited::new(answer.into_body(), ANSWER_BODY_MAX).collect(),
    )
    .await;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("the receiver answered {status}"))
    }
}

/// Reads due work from the outbox and starts the attempts; writes their outcomes back.
/// Runs on its own thread; every database access of the delivery side is here.
struct Dispatcher {
    hooks: Arc<Webhooks>,
    conn: Connection,
    client: HttpClient,
    runtime: tokio::runtime::Handle,
    /// The bound on requests in flight.
    permits: Arc<Semaphore>,
    tx: mpsc::Sender<Msg>,
    rx: mpsc::Receiver<Msg>,
    /// Lanes with an attempt in flight, or whose outcome is not written yet.
    busy: HashSet<Lane>,
    /// Lanes whose head waits out its backoff, by when (ms since the epoch).
    waiting: BTreeSet<(u64, Lane)>,
    wait_until: HashMap<Lane, u64>,
    /// Lanes to look at (their head may be due), in the order they came.
    ready: VecDeque<Lane>,
    queued: HashSet<Lane>,
    /// Outcomes not written yet.
    outcomes: Vec<Outcome>,
    /// Receivers' health, by destination (only those that failed lately).
    health: HashMap<String, Health>,
    /// After a failed write of the outcomes, when to try again.
    write_retry_at: u64,
    /// When to look at every lane (0: at once).
    rescan_at: u64,
    /// Something changed since the backlog was last counted.
    count_dirty: bool,
    counted_at: u64,
}

const HEAD_SQL: &str = "SELECT id, event_id, kind, body, attempts, next_at FROM outbox \
     WHERE dead = 0 AND destination = ?1 AND user_id = ?2 ORDER BY id LIMIT 1";
/// Every lane's head and when it is due (SQLite takes a bare column from the min row).
const HEADS_SQL: &str = "SELECT destination, user_id, next_at, min(id) FROM outbox \
     WHERE dead = 0 GROUP BY destination, user_id";

impl Dispatcher {
    fn run(mut self) {
        let mut closing = false;
        while !closing {
            let now = now_ms();
            // (Bounded: a clock set back must not stop the loop for long.)
            let wait = self.next_due(now).saturating_sub(now).min(RESCAN_EVERY_MS);
            let first = if wait == 0 {
                self.rx.try_recv().ok()
            } else {
                match self.rx.recv_timeout(Duration::from_millis(wait)) {
                    Ok(msg) => Some(msg),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            };
            // Everything that arrived meanwhile is handled as one batch.
            let mut next = first;
            while let Some(msg) = next.take().or_else(|| self.rx.try_recv().ok()) {
                match msg {
                    Msg::Committed(lanes) => {
                        self.count_dirty = true;
                        for lane in lanes {
                            self.look_at(lane);
                        }
                    }
                    Msg::Rescan => self.rescan_at = 0,
                    Msg::Done(outcome) => self.outcomes.push(outcome),
                    Msg::Close => closing = true,
                }
            }
            closing |= self.hooks.closing.load(Ordering::SeqCst);
            let now = now_ms();
            self.write_outcomes(now);
            if closing {
                break;
            }
            self.release_due(now);
            if now >= self.rescan_at {
                self.rescan(now);
            }
            self.dispatch(now);
            self.count(now);
        }
        if !self.outcomes.is_empty() {
            tracing::warn!(
                outcomes = self.outcomes.len(),
                "webhook outcomes not written at shutdown: those events are delivered again"
            );
        }
    }

    /// When the loop must wake even if no message comes.
    fn next_due(&self, now: u64) -> u64 {
        let mut due = self.rescan_at;
        if let Some((at, _)) = self.waiting.first() {
            due = due.min(*at);
        }
        if self.count_dirty {
            due = due.min(self.counted_at + COUNT_EVERY_MS);
        }
        if !self.outcomes.is_empty() {
            due = due.min(self.write_retry_at);
        }
        if !self.ready.is_empty() && self.permits.available_permits() > 0 {
            due = now;
        }
        due
    }

    /// Queues a lane to be looked at, unless it is in flight, queued, or waiting.
    fn look_at(&mut self, lane: Lane) {
        if self.busy.contains(&lane)
            || self.queued.contains(&lane)
            || self.wait_until.contains_key(&lane)
        {
            return;
        }
        self.queued.insert(lane.clone());
        self.ready.push_back(lane);
    }

    fn wait(&mut self, lane: Lane, until: u64) {
        self.unwait(&lane);
        self.waiting.insert((until, lane.clone()));
        self.wait_until.insert(lane, until);
    }

    fn unwait(&mut self, lane: &Lane) {
        if let Some(at) = self.wait_until.remove(lane) {
            self.waiting.remove(&(at, lane.clone()));
        }
    }

    /// Lanes whose backoff is over go back in line.
    fn release_due(&mut self, now: u64) {
        while let Some((at, _)) = self.waiting.first() {
            if *at > now {
                break;
            }
            let (_, lane) = self.waiting.pop_first().expect("not empty");
            self.wait_until.remove(&lane);
            self.look_at(lane);
        }
    }

    /// Every lane's head from the database: due ones go in line, the others wait until
    /// their time (the database is right, e.g. after a replay).
    fn rescan(&mut self, now: u64) {
        let heads = (|| {
            let mut stmt = self.conn.prepare_cached(HEADS_SQL)?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    (r.get::<_, String>(0)?, r.get::<_, String>(1)?),
                    r.get::<_, i64>(2)?,
                ))
            })?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        })();
        match heads {
            Ok(heads) => {
                self.rescan_at = now + RESCAN_EVERY_MS;
                for (lane, next_at) in heads {
                    if self.busy.contains(&lane) {
                        continue;
                    }
                    let next_at = next_at.max(0) as u64;
                    if next_at > now {
                        if !self.queued.contains(&lane) {
                            self.wait(lane, next_at);
                        }
                    } else {
                        self.unwait(&lane);
                        self.look_at(lane);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "webhook dispatcher cannot read the outbox");
                self.rescan_at = now + DB_RETRY_MS;
            }
        }
    }

    /// Starts the heads of lanes in line while the bound allows.
    fn dispatch(&mut self, now: u64) {
        while !self.ready.is_empty() {
            let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                return;
            };
            let lane = self.ready.pop_front().expect("not empty");
            self.queued.remove(&lane);
            // A receiver taken for down is tried by one probe at a time; its other lanes
            // wait (spending none of their attempts) until it answers again.
            if let Some(h) = self.health.get_mut(&lane.0) {
                if h.failures >= DOWN_AFTER {
                    if h.probing || h.down_until > now {
                        let until = h.down_until.max(now + PROBE_WAIT_MS);
                        self.wait(lane, until);
                        continue;
                    }
                    h.probing = true;
                }
            }
            let head = self.conn.prepare_cached(HEAD_SQL).and_then(|mut stmt| {
                stmt.query_row(params![lane.0, lane.1], |r| {
                    Ok(Head {
                        id: r.get(0)?,
                        event_id: r.get(1)?,
                        kind: r.get(2)?,
                        body: r.get(3)?,
                        attempts: r.get(4)?,
                        next_at: r.get(5)?,
                    })
                })
                .optional()
            });
            if !matches!(&head, Ok(Some(h)) if h.next_at.max(0) as u64 <= now) {
                // Not started: a probe slot it took is free again.
                if let Some(h) = self.health.get_mut(&lane.0) {
                    h.probing = false;
                }
            }
            match head {
                // Nothing left in that lane.
                Ok(None) => {}
                Ok(Some(head)) if head.next_at.max(0) as u64 > now => {
                    self.wait(lane, head.next_at as u64);
                }
                Ok(Some(head)) => self.start(lane, head, permit),
                Err(e) => {
                    tracing::warn!(error = %e, "webhook dispatcher cannot read the outbox");
                    self.wait(lane, now + DB_RETRY_MS);
                }
            }
        }
    }

    fn start(&mut self, lane: Lane, head: Head, permit: OwnedSemaphorePermit) {
        self.busy.insert(lane.clone());
        let client = self.client.clone();
        let tx = self.tx.clone();
        let hooks = self.hooks.clone();
        self.runtime.spawn(async move {
            let result = attempt(
                &client,
                &lane.0,
                &head,
                &hooks.settings.secret,
                hooks.settings.timeout,
            )
            .await;
            // The permit goes back before the dispatcher hears of it, so it can start the
            // next attempt at once.
            drop(permit);
            let _ = tx.send(Msg::Done(Outcome {
                lane,
                id: head.id,
                event_id: head.event_id,
                kind: head.kind,
                attempts: head.attempts,
                result,
            }));
        });
    }

    /// Writes the outcomes in (one transaction): delivered rows go, failed ones wait or
    /// become dead letters. Their lanes are free again after.
    fn write_outcomes(&mut self, now: u64) {
        if self.outcomes.is_empty() || now < self.write_retry_at {
            return;
        }
        let settings = &self.hooks.settings;
        let mut next = Vec::with_capacity(self.outcomes.len());
        let written = (|| {
            let tx = self.conn.transaction()?;
            for o in &self.outcomes {
                let attempts = o.attempts + 1;
                let url = &o.lane.0;
                let (event_id, kind) = (&o.event_id, &o.kind);
                match &o.result {
                    Ok(()) => {
                        tx.prepare_cached("DELETE FROM outbox WHERE id = ?1")?
                            .execute([o.id])?;
                        next.push(None);
                    }
                    Err(error) if attempts >= settings.max_attempts => {
                        tracing::warn!(%url, %event_id, %kind, attempts, %error,
                            "webhook delivery failed for good: kept as a dead letter (GET /api/webhooks/dead)");
                        tx.prepare_cached(
                            "UPDATE outbox SET attempts = ?2, dead = 1, last_error = ?3 WHERE id = ?1",
                        )?
                        .execute(params![o.id, attempts, error])?;
                        next.push(None);
                    }
                    Err(error) => {
                        let retry = backoff(o.attempts, settings.retry_max);
                        let at = now + retry.as_millis() as u64;
                        tracing::debug!(%url, %event_id, attempts, %error, ?retry,
                            "webhook delivery failed; will retry");
                        tx.prepare_cached(
                            "UPDATE outbox SET attempts = ?2, next_at = ?3, last_error = ?4 WHERE id = ?1",
                        )?
                        .execute(params![o.id, attempts, at as i64, error])?;
                        next.push(Some(at));
                    }
                }
            }
            tx.commit()
        })();
        if let Err(e) = written {
            tracing::warn!(error = %e, "webhook dispatcher cannot update the outbox; will retry");
            self.write_retry_at = now + DB_RETRY_MS;
            return;
        }
        self.count_dirty = true;
        for (o, retry_at) in std::mem::take(&mut self.outcomes).into_iter().zip(next) {
            // Counted once written (a write that fails is retried, and counted then).
            let counts = &self.hooks.counts;
            match (&o.result, retry_at) {
                (Ok(()), _) => counts.delivered.inc(),
                (Err(_), Some(_)) => counts.failed.inc(),
                (Err(_), None) => {
                    counts.failed.inc();
                    counts.dead.inc()
                }
            };
            self.busy.remove(&o.lane);
            self.note_health(&o, now);
            match retry_at {
                Some(at) => self.wait(o.lane, at),
                None => self.look_at(o.lane),
            }
        }
    }

    /// Learns from an attempt's end whether its receiver is up: a success clears its
    /// record (and wakes the lanes that waited for it); failures in a row past
    /// `DOWN_AFTER` take it for down, for a backoff that grows like a lane's.
    fn note_health(&mut self, o: &Outcome, now: u64) {
        let url = &o.lane.0;
        if o.result.is_ok() {
            if let Some(h) = self.health.remove(url) {
                if h.failures >= DOWN_AFTER {
                    tracing::info!(%url, "webhook receiver answers again: delivering its backlog");
                    self.rescan_at = 0;
                    self.count_down();
                }
            }
            return;
        }
        let h = self.health.entry(url.clone()).or_default();
        h.failures += 1;
        h.probing = false;
        if h.failures >= DOWN_AFTER {
            if h.failures == DOWN_AFTER {
                tracing::warn!(%url, error = ?o.result.as_ref().err(),
                    "webhook receiver is failing: its events wait, and one probe at a time tries it");
            }
            let retry = backoff(h.failures - DOWN_AFTER, self.hooks.settings.retry_max);
            h.down_until = now + retry.as_millis() as u64;
        }
        self.count_down();
    }

    fn count_down(&self) {
        let down = self
            .health
            .values()
            .filter(|h| h.failures >= DOWN_AFTER)
            .count();
        self.hooks.counts.receivers_down.set(down as i64);
    }

    /// Counts the backlog (for `admit`), at most about once a second and only when
    /// something changed.
    fn count(&mut self, now: u64) {
        if !self.count_dirty || now < self.counted_at + COUNT_EVERY_MS {
            return;
        }
        match self
            .conn
            .query_row("SELECT count(*) FROM outbox WHERE dead = 0", [], |r| {
                r.get::<_, i64>(0)
            }) {
            Ok(n) => {
                self.hooks.counts.backlog.set(n);
                self.count_dirty = false;
            }
            Err(e) => tracing::warn!(error = %e, "webhook dispatcher cannot count the outbox"),
        }
        self.counted_at = now;
    }
}

/// A dead letter, as the API lists it.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    /// The event id (`X-Botvisor-Event-Id`).
    pub event_id: String,
    /// Where it was going.
    pub destination: String,
    /// The event's kind.
    pub event: String,
    /// The session.
    pub user_id: String,
    /// Attempts made.
    pub attempts: u32,
    /// The last failure.
    pub last_error: Option<String>,
    /// When the event happened (ISO 8601).
    pub created_at: String,
}

/// Every dead letter, oldest first (at most `limit`).
pub fn dead_letters(conn: &Connection, limit: usize) -> rusqlite::Result<Vec<DeadLetter>> {
    let mut stmt = conn.prepare(
        "SELECT event_id, destination, kind, user_id, attempts, last_error, created_at \
         FROM outbox WHERE dead = 1 ORDER BY id LIMIT ?1",
    )?;
    let rows = stmt.query_map([limit as i64], |r| {
        Ok(DeadLetter {
            event_id: r.get(0)?,
            destination: r.get(1)?,
            event: r.get(2)?,
            user_id: r.get(3)?,
            attempts: r.get(4)?,
            last_error: r.get(5)?,
            created_at: crate::timefmt::iso(r.get::<_, i64>(6)?.max(0) as u64),
        })
    })?;
    rows.collect()
}

/// Puts the dead letters of `event_id` back in line (fresh attempts); how many.
pub fn replay(conn: &Connection, event_id: &str) -> rusqlite::Result<usize> {
    conn.execute(
        "UPDATE outbox SET dead = 0, attempts = 0, next_at = ?2, last_error = NULL \
         WHERE event_id = ?1 AND dead = 1",
        params![event_id, now_ms() as i64],
    )
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
    fn the_signature_is_hmac_sha256_over_timestamp_dot_body() {
        // Checked against: printf '1700000000.{"a":1}' | openssl dgst -sha256 -hmac secret
        assert_eq!(
            signature("secret", 1_700_000_000, r#"{"a":1}"#),
            "v1=49f24e537407743fa4a0242bb63b94b9a47ee99cbbe071ccd8a22550ae411686"
        );
    }

    fn plan(conn: &Connection, sql: &str) -> String {
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let params =
            rusqlite::params_from_iter(["d", "u"].into_iter().take(stmt.parameter_count()));
        let rows = stmt
            .query_map(params, |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        rows.join("; ")
    }

    /// A v4 database gets the lane index (and loses the per-destination one); the
    /// dispatcher's queries use it, with no sort and no scan of the table.
    #[tokio::test]
    async fn the_lane_queries_use_the_lane_index_after_a_migration_from_v4() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.db");
        let config = || crate::store::test_config(dir.path());
        let (store, _) = crate::store::Store::open(config()).unwrap();
        store.close().await;
        drop(store);
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "DROP INDEX outbox_lane; \
             CREATE INDEX outbox_next ON outbox (destination, dead, id); \
             PRAGMA user_version = 4;",
        )
        .unwrap();
        drop(conn);
        let (store, _) = crate::store::Store::open(config()).unwrap();
        store.close().await;
        let conn = Connection::open(&path).unwrap();
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, 6);
        let indexes: Vec<String> = conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'outbox' ORDER BY name")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(indexes, ["outbox_event", "outbox_lane"]);
        let replay = plan(
            &conn,
            "UPDATE outbox SET dead = 0 WHERE event_id = 'evt_x' AND dead = 1",
        );
        assert!(replay.contains("outbox_event"), "{replay}");
        let head = plan(&conn, HEAD_SQL);
        assert!(
            head.contains("USING INDEX outbox_lane") && !head.contains("TEMP B-TREE"),
            "{head}"
        );
        let heads = plan(&conn, HEADS_SQL);
        assert!(
            heads.contains("outbox_lane") && !heads.contains("TEMP B-TREE"),
            "{heads}"
        );
        let count = plan(&conn, "SELECT count(*) FROM outbox WHERE dead = 0");
        assert!(count.contains("outbox_lane"), "{count}");
    }

    #[test]
    fn the_backlog_cap_drops_new_events_and_counts_them() {
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
                ca_certs: Vec::new(),
            },
            crate::metrics::WebhookCounts::default(),
        );
        assert!(hooks.admit(1));
        assert!(hooks.admit(1));
        assert!(!hooks.admit(1), "past the cap");
        assert!(!hooks.admit(2));
        assert_eq!(
            hooks.counts.backlog.get(),
            2,
            "a dropped event is not counted in"
        );
        assert_eq!(hooks.counts.dropped.get(), 2);
        // The dispatcher's count of the outbox is the truth again.
        hooks.counts.backlog.set(0);
        assert!(hooks.admit(2));
    }

    #[test]
    fn backoff_grows_to_its_cap() {
        let cap = Duration::from_secs(300);
        assert!(backoff(0, cap) <= Duration::from_millis(1_200));
        assert!(backoff(3, cap) >= Duration::from_secs_f64(6.4));
        assert!(backoff(30, cap) <= Duration::from_secs(360));
        assert!(backoff(30, Duration::from_secs(1)) <= Duration::from_millis(1_200));
    }
}
