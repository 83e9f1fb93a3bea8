//! Signed, durable webhooks. What happens (state changes, messages in and out) is written
//! to the `outbox` table in the same transaction as the change that caused it; one worker
//! thread per destination delivers the rows in id order (so in order per session), each
//! attempt signed, with a timeout, exponential backoff with jitter, and a bounded number
//! of attempts, after which the row stays as a dead letter until replayed. A receiver that
//! is down costs disk, not memory (the backlog is capped, with a warning past the cap).
//!
//! Each POST carries `X-Botvisor-Event-Id` (stable across retries: the receiver's
//! idempotency key), `X-Botvisor-Event`, `X-Botvisor-Timestamp` (Unix seconds) and
//! `X-Botvisor-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use rusqlite::{params, Connection, OptionalExtension};
use sha2::Sha256;

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
    /// Send `session.pairing_code` events (they carry a secret).
    pub pairing_codes: bool,
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
            .field("pairing_codes", &self.pairing_codes)
            .finish()
    }
}

/// The shared state of the webhook side: settings, per-session receivers, one worker per
/// receiver, and what the workers learn.
#[derive(Debug)]
pub struct Webhooks {
    /// Settings.
    pub settings: WebhookSettings,
    /// Deliveries waiting (refreshed by the workers about once a second).
    pub pending: AtomicU64,
    /// Events dropped because the backlog was full.
    pub dropped: AtomicU64,
    closing: AtomicBool,
    /// Receivers set per session (`PUT /api/sessions/:id/webhook`).
    session_urls: dashmap::DashMap<String, String>,
    /// The receivers that have a delivery thread.
    workers: std::sync::Mutex<std::collections::HashSet<String>>,
    /// The database the workers open (path, URI flag), once known.
    db: std::sync::OnceLock<(String, bool)>,
}

/// A receiver's URL: `http(s)://host[:port]/path`.
pub fn parse_url(s: &str) -> Result<String, String> {
    let s = s.trim();
    let rest = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"))
        .filter(|r| !r.is_empty() && !r.starts_with('/') && !r.contains(char::is_whitespace));
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
    pub fn new(settings: WebhookSettings) -> Arc<Webhooks> {
        Arc::new(Webhooks {
            settings,
            pending: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            closing: AtomicBool::new(false),
            session_urls: dashmap::DashMap::new(),
            workers: std::sync::Mutex::default(),
            db: std::sync::OnceLock::new(),
        })
    }

    /// Whether a new event fits in the backlog (counting it); warns when it does not.
    pub fn admit(&self, deliveries: u64) -> bool {
        let pending = self.pending.fetch_add(deliveries, Ordering::Relaxed);
        if pending < self.settings.backlog_max {
            return true;
        }
        self.pending.fetch_sub(deliveries, Ordering::Relaxed);
        let dropped = self.dropped.fetch_add(1, Ordering::Relaxed);
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

    /// Starts delivering: one thread per global receiver and per session receiver known
    /// (`session_urls`, from the database), each with its own connection to `path`.
    pub fn start(self: &Arc<Self>, path: &str, uri: bool, session_urls: Vec<(String, String)>) {
        let _ = self.db.set((path.to_string(), uri));
        for url in self.settings.urls.clone() {
            self.ensure_worker(&url);
        }
        for (user_id, url) in session_urls {
            self.ensure_worker(&url);
            self.session_urls.insert(user_id, url);
        }
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

    /// Sets (`Some`) or clears a session's own receiver (already stored).
    pub fn set_session_url(self: &Arc<Self>, user_id: &str, url: Option<String>) {
        match url {
            Some(url) => {
                self.ensure_worker(&url);
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

    /// Starts the delivery thread of `url` unless it runs. A thread stays for the life of
    /// the process (a receiver that is cleared has nothing left to deliver, and idles).
    fn ensure_worker(self: &Arc<Self>, url: &str) {
        let Some((path, uri)) = self.db.get().cloned() else {
            return;
        };
        let mut workers = self.workers.lock().unwrap_or_else(|p| p.into_inner());
        if workers.contains(url) {
            return;
        }
        let conn = match crate::store::open_side_connection(&path, uri) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(%url, error = %e, "webhook worker cannot open the database");
                return;
            }
        };
        let hooks = self.clone();
        let owned = url.to_string();
        let started = std::thread::Builder::new()
            .name("botvisor-webhook".into())
            .spawn(move || hooks.deliver_loop(&owned, &conn));
        if started.is_ok() {
            workers.insert(url.to_string());
        }
    }

    /// Asks the workers to stop (they finish the attempt in hand).
    pub fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
    }

    fn deliver_loop(&self, url: &str, conn: &Connection) {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(self.settings.timeout))
            .http_status_as_error(false)
            .build()
            .into();
        let mut counted = 0u64;
        while !self.closing.load(Ordering::SeqCst) {
            let now = now_ms();
            if now.saturating_sub(counted) >= 1_000 {
                counted = now;
                if let Ok(n) =
                    conn.query_row("SELECT count(*) FROM outbox WHERE dead = 0", [], |r| {
                        r.get::<_, i64>(0)
                    })
                {
                    self.pending.store(n.max(0) as u64, Ordering::Relaxed);
                }
            }
            let next = conn
                .query_row(
                    "SELECT id, event_id, kind, body, attempts, next_at FROM outbox \
                     WHERE destination = ?1 AND dead = 0 ORDER BY id LIMIT 1",
                    [url],
                    |r| {
                        Ok((
                            r.get::<_, i64>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, String>(2)?,
                            r.get::<_, String>(3)?,
                            r.get::<_, u32>(4)?,
                            r.get::<_, i64>(5)?,
                        ))
                    },
                )
                .optional();
            let (id, event_id, kind, body, attempts, next_at) = match next {
                Ok(Some(row)) => row,
                Ok(None) => {
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
                Err(e) => {
                    tracing::warn!(%url, error = %e, "webhook worker cannot read the outbox");
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
            };
            let wait = next_at.max(0) as u64;
            if wait > now {
                // The head of the line waits out its backoff: later events keep their order.
                std::thread::sleep(Duration::from_millis((wait - now).min(100)));
                continue;
            }
            let timestamp = now / 1000;
            let result = agent
                .post(url)
                .header("Content-Type", "application/json")
                .header(
                    "User-Agent",
                    concat!("botvisor/", env!("CARGO_PKG_VERSION")),
                )
                .header("X-Botvisor-Event-Id", &event_id)
                .header("X-Botvisor-Event", &kind)
                .header("X-Botvisor-Timestamp", timestamp.to_string())
                .header(
                    "X-Botvisor-Signature",
                    signature(&self.settings.secret, timestamp, &body),
                )
                .send(body.as_bytes());
            let failure = match result {
                Ok(resp) if resp.status().is_success() => None,
                Ok(resp) => Some(format!("the receiver answered {}", resp.status())),
                Err(e) => Some(e.to_string()),
            };
            let written = match failure {
                None => conn
                    .execute("DELETE FROM outbox WHERE id = ?1", [id])
                    .map(|_| ()),
                Some(error) if attempts + 1 >= self.settings.max_attempts => {
                    tracing::warn!(%url, %event_id, %kind, attempts = attempts + 1, %error,
                        "webhook delivery failed for good: kept as a dead letter (GET /api/webhooks/dead)");
                    conn.execute(
                        "UPDATE outbox SET attempts = ?2, dead = 1, last_error = ?3 WHERE id = ?1",
                        params![id, attempts + 1, error],
                    )
                    .map(|_| ())
                }
                Some(error) => {
                    let retry = backoff(attempts, self.settings.retry_max);
                    tracing::debug!(%url, %event_id, attempts = attempts + 1, %error, ?retry, "webhook delivery failed; will retry");
                    conn.execute(
                        "UPDATE outbox SET attempts = ?2, next_at = ?3, last_error = ?4 WHERE id = ?1",
                        params![id, attempts + 1, (now_ms() + retry.as_millis() as u64) as i64, error],
                    )
                    .map(|_| ())
                }
            };
            if let Err(e) = written {
                tracing::warn!(%url, error = %e, "webhook worker cannot update the outbox");
                std::thread::sleep(Duration::from_secs(1));
            }
        }
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
    fn the_signature_is_hmac_sha256_over_timestamp_dot_body() {
        // Checked against: printf '1700000000.{"a":1}' | openssl dgst -sha256 -hmac secret
        assert_eq!(
            signature("secret", 1_700_000_000, r#"{"a":1}"#),
            "v1=49f24e537407743fa4a0242bb63b94b9a47ee99cbbe071ccd8a22550ae411686"
        );
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
