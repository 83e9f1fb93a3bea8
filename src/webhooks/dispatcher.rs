//! The dispatcher: reads due work from the outbox (through its own database handle),
//! starts the attempts, and writes their outcomes back. Runs on its own thread.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use botvisor_actors::now_ms;

use super::client::{attempt, HttpClient};
use super::{Msg, Webhooks};
use crate::db::{Engine, Lane, OutboxHead, Outcome as Written};

/// How often the dispatcher looks at every lane even when nothing told it to.
const RESCAN_EVERY_MS: u64 = 5_000;
/// How often, at most, the backlog is counted (for `pending`).
const COUNT_EVERY_MS: u64 = 1_000;
/// The wait before retrying a failed read or write of the outbox.
const DB_RETRY_MS: u64 = 1_000;
/// How often a lane waiting for a probe of its receiver looks again.
const PROBE_WAIT_MS: u64 = 500;

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

/// How an attempt ended.
#[derive(Debug)]
pub(crate) struct Outcome {
    lane: Lane,
    id: i64,
    event_id: String,
    kind: String,
    /// Attempts made before this one.
    attempts: u32,
    result: Result<(), String>,
}

/// Backoff before attempt `attempts + 1`: 1 s doubling to `max`, with ±20 % jitter.
fn backoff(attempts: u32, max: Duration) -> Duration {
    let base = ((1u64 << attempts.min(20)) as f64).min(max.as_secs_f64().max(0.001));
    let mut h = RandomState::new().build_hasher();
    h.write_u32(attempts);
    let jitter = 0.8 + 0.4 * (h.finish() % 1000) as f64 / 1000.0;
    Duration::from_secs_f64(base * jitter)
}

/// Reads due work from the outbox and starts the attempts; writes their outcomes back.
/// Runs on its own thread; every database access of the delivery side is here.
pub(super) struct Dispatcher {
    hooks: Arc<Webhooks>,
    conn: Box<dyn Engine>,
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

impl Dispatcher {
    pub(super) fn new(
        hooks: Arc<Webhooks>,
        conn: Box<dyn Engine>,
        client: HttpClient,
        runtime: tokio::runtime::Handle,
        tx: mpsc::Sender<Msg>,
        rx: mpsc::Receiver<Msg>,
    ) -> Dispatcher {
        let permits = Arc::new(Semaphore::new(hooks.settings.max_inflight.max(1)));
        Dispatcher {
            hooks,
            conn,
            client,
            runtime,
            permits,
            tx,
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
        }
    }

    pub(super) fn run(mut self) {
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
        match self.conn.outbox_heads() {
            Ok(heads) => {
                self.rescan_at = now + RESCAN_EVERY_MS;
                for (lane, next_at) in heads {
                    if self.busy.contains(&lane) {
                        continue;
                    }
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
            let head = self.conn.outbox_head(&lane);
            if !matches!(&head, Ok(Some(h)) if h.next_at <= now) {
                // Not started: a probe slot it took is free again.
                if let Some(h) = self.health.get_mut(&lane.0) {
                    h.probing = false;
                }
            }
            match head {
                // Nothing left in that lane.
                Ok(None) => {}
                Ok(Some(head)) if head.next_at > now => {
                    self.wait(lane, head.next_at);
                }
                Ok(Some(head)) => self.start(lane, head, permit),
                Err(e) => {
                    tracing::warn!(error = %e, "webhook dispatcher cannot read the outbox");
                    self.wait(lane, now + DB_RETRY_MS);
                }
            }
        }
    }

    fn start(&mut self, lane: Lane, head: OutboxHead, permit: OwnedSemaphorePermit) {
        self.busy.insert(lane.clone());
        let client = self.client.clone();
        let tx = self.tx.clone();
        let hooks = self.hooks.clone();
        self.runtime.spawn(async move {
            let secret = hooks.secret_for(&lane.0, &lane.1);
            let result = attempt(&client, &lane.0, &head, &secret, hooks.settings.timeout).await;
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
        let mut writes = Vec::with_capacity(self.outcomes.len());
        for o in &self.outcomes {
            let attempts = o.attempts + 1;
            let url = &o.lane.0;
            let (event_id, kind, id) = (&o.event_id, &o.kind, o.id);
            match &o.result {
                Ok(()) => {
                    writes.push(Written::Delivered { id });
                    next.push(None);
                }
                Err(error) if attempts >= settings.max_attempts => {
                    tracing::warn!(%url, %event_id, %kind, attempts, %error,
                        "webhook delivery failed for good: kept as a dead letter (GET /api/webhooks/dead)");
                    writes.push(Written::Dead {
                        id,
                        attempts,
                        error,
                    });
                    next.push(None);
                }
                Err(error) => {
                    let retry = backoff(o.attempts, settings.retry_max);
                    let next_at = now + retry.as_millis() as u64;
                    tracing::debug!(%url, %event_id, attempts, %error, ?retry,
                        "webhook delivery failed; will retry");
                    writes.push(Written::Retry {
                        id,
                        attempts,
                        next_at,
                        error,
                    });
                    next.push(Some(next_at));
                }
            }
        }
        let written = self.conn.outbox_outcomes(&writes);
        drop(writes);
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
        match self.conn.outbox_backlog() {
            Ok(n) => {
                self.hooks.counts.backlog.set(n);
                self.count_dirty = false;
            }
            Err(e) => tracing::warn!(error = %e, "webhook dispatcher cannot count the outbox"),
        }
        self.counted_at = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap() {
        let cap = Duration::from_secs(300);
        assert!(backoff(0, cap) <= Duration::from_millis(1_200));
        assert!(backoff(3, cap) >= Duration::from_secs_f64(6.4));
        assert!(backoff(30, cap) <= Duration::from_secs(360));
        assert!(backoff(30, Duration::from_secs(1)) <= Duration::from_millis(1_200));
    }
}
