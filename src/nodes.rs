//! This process as one node of several sharing one PostgreSQL database (`--node-id`):
//! its registration and lease, its claims, and fencing itself when the lease cannot be
//! renewed in time. The protocol and the statements are in [`crate::db::nodes`].
//!
//! Two loops:
//! - the lease thread (`botvisor-node`) registers, renews every fifth of the ttl and,
//!   after each confirmed renewal, claims a fair share of the sessions nobody holds;
//! - the deadline watch (a task, every 100 ms) fences the node once the lease's local
//!   deadline passes without a confirmed renewal, however stuck the lease thread is (a
//!   statement to a database cut off waits for its timeout), and stops the sessions a
//!   commit found owned elsewhere.
//!
//! Fencing drops every session at once (their sockets close), then the lease thread
//! registers again with a new epoch and claims afresh.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use ractor::ActorRef;

use botvisor_actors::{SessionRecord, SupervisorMsg};

use crate::db::nodes::{Standing, EVENTS_CHANNEL, EVENT_PAYLOAD_MAX, FLEET_CHANNEL};
use crate::db::postgres::Rows;
use crate::events::{EventHub, Kind};

/// Sessions one claim takes at most.
const CLAIM_MAX: i64 = 2_000;
/// Sessions handed over together in a drain.
const HANDOFF_BATCH: usize = 25;
/// How long a drain waits for a batch to stop.
const HANDOFF_WAIT: Duration = Duration::from_secs(30);
/// Notifications (each a few events) sent to the other nodes in one statement at most.
const RELAY_BATCH: usize = 100;
/// How long the relay waits after an event for more to send with it.
const RELAY_WINDOW: Duration = Duration::from_millis(20);
/// How often the deadline watch looks.
const WATCH_EVERY: Duration = Duration::from_millis(100);

/// This node: its standing and its database.
pub struct Node {
    pub standing: Arc<Standing>,
    pub rows: Rows,
    /// `--handoff`: SIGTERM drains first.
    pub handoff: bool,
    stop: AtomicBool,
    /// Set (and the lease thread woken) when another node gave sessions up.
    wake: (Mutex<bool>, Condvar),
}

impl Node {
    pub fn new(rows: Rows, standing: Arc<Standing>, handoff: bool) -> Arc<Node> {
        Arc::new(Node {
            standing,
            rows,
            handoff,
            stop: AtomicBool::new(false),
            wake: (Mutex::new(false), Condvar::new()),
        })
    }

    /// Renewals come this often.
    fn renew_every(&self) -> Duration {
        self.standing.ttl / 5
    }

    /// A claim waits this long past an owner's lease (clock rates differ a little; its
    /// owner, if it lives, has had this long to close its sockets).
    fn grace(&self) -> Duration {
        self.renew_every()
    }

    /// Starts the lease thread and the deadline watch, and waits for the first
    /// registration (another process may hold this id's lease until it runs out).
    pub async fn start(self: &Arc<Self>, sup: ActorRef<SupervisorMsg>) -> Result<(), String> {
        let (first_tx, first_rx) = tokio::sync::oneshot::channel();
        let node = self.clone();
        let lease_sup = sup.clone();
        std::thread::Builder::new()
            .name("botvisor-node".into())
            .spawn(move || node.lease_loop(lease_sup, first_tx))
            .map_err(|e| format!("cannot start the node's lease thread: {e}"))?;
        let node = self.clone();
        tokio::spawn(async move { node.watch(sup).await });
        let node = Arc::downgrade(self);
        self.rows.listen(FLEET_CHANNEL, move |_| {
            if let Some(node) = node.upgrade() {
                node.ring();
            }
        });
        first_rx
            .await
            .map_err(|_| "the node's lease thread stopped".to_string())
    }

    /// Makes `GET /api/events` on this node the fleet's: this node's own events go to the
    /// others ([`EVENTS_CHANNEL`], in batches, their public form: a pairing code stays on
    /// its node), and theirs are kept and announced here under this node's numbers.
    /// Start it before [`Node::start`], so the first claims' events travel too.
    pub fn relay_events(self: &Arc<Self>, hub: Arc<EventHub>) {
        let me = self.standing.id.clone();
        let inbound = hub.clone();
        self.rows.listen(EVENTS_CHANNEL, move |payload| {
            for (kind, json) in unpack(payload.unwrap_or_default(), &me) {
                inbound.relay_in(kind, json);
            }
        });
        let node = self.clone();
        tokio::spawn(async move { node.relay_out(hub).await });
    }

    /// Sends this node's events to the others as they are published: whatever was
    /// published within [`RELAY_WINDOW`] of the first goes together, packed into as few
    /// notifications as fit, in one statement (each notification wakes every listening
    /// connection of the database).
    async fn relay_out(self: Arc<Self>, hub: Arc<EventHub>) {
        use tokio::sync::broadcast::error::{RecvError, TryRecvError};
        let (_, mut rx) = hub.subscribe(None);
        let mut closed = hub.closed();
        let mut sent = hub.last_id();
        let mut failing = false;
        while !self.stop.load(Ordering::Acquire) {
            tokio::select! {
                r = rx.recv() => if let Err(RecvError::Closed) = r { return },
                _ = closed.changed() => return,
            }
            tokio::time::sleep(RELAY_WINDOW).await;
            while !matches!(
                rx.try_recv(),
                Err(TryRecvError::Empty | TryRecvError::Closed)
            ) {}
            let own = hub.own_since(sent);
            sent = own.last;
            if own.forgotten > 0 {
                tracing::warn!(
                    events = own.forgotten,
                    "events published faster than they could be relayed to the other nodes; those are not in their streams"
                );
            }
            let payloads = pack(&self.standing.id, &own.events);
            for batch in payloads.chunks(RELAY_BATCH) {
                let (rows, batch) = (self.rows.clone(), batch.to_vec());
                let done = tokio::task::spawn_blocking(move || rows.notify_events(batch)).await;
                match done
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|e| e.to_string()))
                {
                    Ok(()) if failing => {
                        failing = false;
                        tracing::info!("events reach the other nodes again");
                    }
                    Ok(()) => {}
                    Err(e) if !failing => {
                        failing = true;
                        tracing::warn!(error = %e, "cannot relay events to the other nodes; their streams miss this node's until the database answers");
                    }
                    Err(_) => {}
                }
            }
        }
    }

    fn lease_loop(
        self: Arc<Self>,
        sup: ActorRef<SupervisorMsg>,
        first: tokio::sync::oneshot::Sender<()>,
    ) {
        let mut first = Some(first);
        let mut previous = 0;
        let mut waiting_logged = false;
        while !self.stop.load(Ordering::Acquire) {
            let s = &self.standing;
            if s.is_fenced() {
                match self.rows.register(s, previous) {
                    Ok(Some((epoch, sent))) => {
                        s.registered(epoch, sent);
                        previous = epoch;
                        waiting_logged = false;
                        tracing::info!(node = %s.id, epoch, lease = ?s.ttl, "node registered");
                        match self.rows.reclaim_own(s) {
                            Ok(own) => self.adopt(&sup, own),
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot take back this node's sessions")
                            }
                        }
                        if let Some(tx) = first.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(None) => {
                        if !waiting_logged {
                            tracing::warn!(node = %s.id,
                                "another process holds this node id's lease: waiting for it to run out (two processes must not share a --node-id)");
                            waiting_logged = true;
                        }
                        std::thread::sleep(Duration::from_secs(1));
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot register the node; trying again");
                        std::thread::sleep(Duration::from_secs(1));
                        continue;
                    }
                }
            } else {
                match self.rows.renew(s) {
                    Ok(Some(sent)) => s.renewed(sent),
                    Ok(None) => {
                        self.fence(
                            &sup,
                            "the node's lease is gone (it ran out, or its epoch moved)",
                        );
                        continue;
                    }
                    // The watch fences at the deadline if no renewal gets through.
                    Err(e) => tracing::warn!(error = %e, "cannot renew the node's lease"),
                }
                // Claim until nothing is left to claim: a share another node skipped
                // (locked by its claim) is taken now, not at the next round.
                while s.live() && !s.draining() && !self.stop.load(Ordering::Acquire) {
                    match self.rows.claim(s, self.grace(), CLAIM_MAX) {
                        Ok(claimed) if claimed.is_empty() => break,
                        Ok(claimed) => self.adopt(&sup, claimed),
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot claim sessions");
                            break;
                        }
                    }
                }
            }
            self.sleep(self.renew_every());
        }
    }

    /// Sleeps, waking early when stopped or when another node gave sessions up.
    fn sleep(&self, total: Duration) {
        let until = Instant::now() + total;
        let (woken, bell) = &self.wake;
        let mut woken = woken.lock().unwrap_or_else(|p| p.into_inner());
        while !*woken && !self.stop.load(Ordering::Acquire) {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            woken = bell
                .wait_timeout(woken, left.min(Duration::from_millis(100)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        *woken = false;
    }

    /// Wakes the lease thread (sessions were given up: claim now).
    fn ring(&self) {
        let (woken, bell) = &self.wake;
        *woken.lock().unwrap_or_else(|p| p.into_inner()) = true;
        bell.notify_all();
    }

    /// Hands every session this node holds to the others, a few at a time: each batch
    /// stops here, is given up, and the other nodes claim it at once (notified). The
    /// node takes no new session meanwhile, and none after. Returns how many moved.
    pub async fn drain(self: &Arc<Self>, sup: &ActorRef<SupervisorMsg>) -> usize {
        self.standing.set_draining(true);
        let mut moved = 0;
        loop {
            let mut held = self.standing.held();
            if held.is_empty() || !self.standing.live() {
                break;
            }
            held.sort();
            held.truncate(HANDOFF_BATCH);
            let stopped = ractor::call_t!(
                sup,
                |reply| SupervisorMsg::Handoff {
                    user_ids: held.clone(),
                    reply,
                },
                HANDOFF_WAIT.as_millis() as u64
            );
            if let Err(e) = stopped {
                tracing::warn!(error = %e, "sessions did not stop in time for their handoff; handing them over anyway");
            }
            for id in &held {
                self.standing.let_go(id);
            }
            let node = self.clone();
            let ids = held.clone();
            let released =
                tokio::task::spawn_blocking(move || node.rows.release(&node.standing, &ids)).await;
            match released {
                Ok(Ok(n)) => moved += n as usize,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot give sessions up; their lease runs out instead")
                }
                Err(e) => tracing::warn!(error = %e, "cannot give sessions up"),
            }
        }
        tracing::info!(node = %self.standing.id, sessions = moved, "node drained");
        moved
    }

    /// Holds claimed sessions with their fences and hands them to the supervisor.
    fn adopt(&self, sup: &ActorRef<SupervisorMsg>, claimed: Vec<(SessionRecord, i64)>) {
        if claimed.is_empty() {
            return;
        }
        let s = &self.standing;
        if !s.live() {
            // Fenced while the claim ran: a new registration claims again.
            return;
        }
        let recs: Vec<SessionRecord> = claimed
            .into_iter()
            .map(|(rec, fence)| {
                s.hold(&rec.user_id, fence);
                rec
            })
            .collect();
        tracing::info!(node = %s.id, sessions = recs.len(), "sessions claimed");
        let _ = sup.cast(SupervisorMsg::Adopt(recs));
    }

    /// Fences the node (unless it is already): every session stops here now.
    fn fence(&self, sup: &ActorRef<SupervisorMsg>, why: &str) {
        let Some(held) = self.standing.fence() else {
            return;
        };
        tracing::error!(node = %self.standing.id, sessions = held,
            "{why}: node fenced, stopping every session it held");
        let _ = sup.cast(SupervisorMsg::Release(None));
    }

    async fn watch(self: Arc<Self>, sup: ActorRef<SupervisorMsg>) {
        let mut tick = tokio::time::interval(WATCH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !self.stop.load(Ordering::Acquire) {
            tick.tick().await;
            let s = &self.standing;
            if !s.is_fenced() && s.past_deadline() {
                self.fence(
                    &sup,
                    "the node's lease ran out locally without a confirmed renewal",
                );
            }
            let lost = s.take_lost();
            if !lost.is_empty() {
                let _ = sup.cast(SupervisorMsg::Release(Some(lost)));
            }
        }
    }

    /// Leaves the fleet after the sessions stopped: with `--handoff` every session goes to
    /// the other nodes at once; without, they wait for this node (or its lease's end).
    pub async fn leave(self: &Arc<Self>) {
        self.stop.store(true, Ordering::Release);
        let node = self.clone();
        let handoff = self.handoff;
        let left = tokio::task::spawn_blocking(move || node.rows.leave(&node.standing, handoff))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        match left {
            Ok(released) if handoff => {
                tracing::info!(
                    sessions = released,
                    "node left; its sessions go to the others"
                )
            }
            Ok(_) => tracing::info!("node left; its sessions wait for its return"),
            Err(e) => tracing::warn!(error = %e, "could not leave cleanly; the lease runs out"),
        }
    }
}

/// [`EVENTS_CHANNEL`] payloads carrying `events` (number, kind, public JSON) from node
/// `me`: the node's id on the first line, then one event per line (`<number>\t<kind>\t
/// <json>`; JSON has no raw newline), as many per payload as fit in
/// [`EVENT_PAYLOAD_MAX`] bytes. An event too large for a payload of its own stays here.
fn pack(me: &str, events: &[(u64, Kind, String)]) -> Vec<String> {
    let mut out = Vec::new();
    let mut payload = String::new();
    for (number, kind, json) in events {
        let line = format!("\n{number}\t{}\t{json}", kind.as_str());
        if me.len() + line.len() > EVENT_PAYLOAD_MAX {
            tracing::debug!(
                bytes = line.len(),
                "event too large to relay; it stays on this node"
            );
            continue;
        }
        if !payload.is_empty() && payload.len() + line.len() > EVENT_PAYLOAD_MAX {
            out.push(std::mem::take(&mut payload));
        }
        if payload.is_empty() {
            payload.push_str(me);
        }
        payload.push_str(&line);
    }
    if !payload.is_empty() {
        out.push(payload);
    }
    out
}

/// The events of a [`pack`]ed payload, unless node `me` sent it (or it is not one).
fn unpack<'a>(payload: &'a str, me: &str) -> Vec<(Kind, &'a str)> {
    let mut lines = payload.split('\n');
    if lines.next().is_none_or(|from| from == me) {
        return Vec::new();
    }
    lines
        .filter_map(|line| {
            let mut parts = line.splitn(3, '\t');
            let (_number, kind, json) = (parts.next()?, parts.next()?, parts.next()?);
            Some((Kind::parse(kind)?, json))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_packed_into_payloads_that_fit_and_unpacked_by_the_others() {
        let event = |i: u64, n: usize| {
            (
                i,
                Kind::State,
                format!(r#"{{"userId":"u{i}","x":"{}"}}"#, "a".repeat(n)),
            )
        };
        let events: Vec<_> = (1..=40).map(|i| event(i, 300)).collect();
        let payloads = pack("n1", &events);
        assert!(
            payloads.len() > 1 && payloads.len() < 5,
            "{}",
            payloads.len()
        );
        assert!(payloads.iter().all(|p| p.len() <= EVENT_PAYLOAD_MAX));
        let back: Vec<(Kind, &str)> = payloads.iter().flat_map(|p| unpack(p, "n2")).collect();
        assert_eq!(back.len(), 40, "every event, in order");
        for ((_, _, json), (kind, got)) in events.iter().zip(&back) {
            assert_eq!((*kind, *got), (Kind::State, json.as_str()));
        }
        // Its own payloads are not taken in again; a stray payload is ignored.
        assert!(unpack(&payloads[0], "n1").is_empty());
        assert!(unpack("", "n2").is_empty());
        assert!(unpack("n3\nnot an event", "n2").is_empty());
        // An event that fits no payload stays here; the others still go.
        let mixed = vec![event(1, 10), event(2, EVENT_PAYLOAD_MAX), event(3, 10)];
        let payloads = pack("n1", &mixed);
        assert_eq!(payloads.len(), 1);
        assert_eq!(unpack(&payloads[0], "n2").len(), 2);
    }
}
