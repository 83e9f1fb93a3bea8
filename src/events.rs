//! The live event stream behind `GET /api/events`: every state change and pairing code,
//! numbered, kept in a bounded ring (so a client can resume with `Last-Event-ID`) and
//! announced to the connected clients. A leaf: the store publishes into it when a record
//! changes; the HTTP front end reads from it.
//!
//! The ring is two buffers reserved once, at start: the events' JSON back to back in one
//! byte ring, and a fixed-size entry per event. Publishing allocates nothing that outlives
//! the call, and the broadcast carries only event numbers. Kept events used to be one
//! small heap allocation or three each, made while sessions were running and scattered
//! among theirs: ten thousand of them held tens of MiB of freed session memory resident
//! after every session had stopped (issue 26).

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

use serde::Serialize;
use tokio::sync::{broadcast, watch};

use botvisor_actors::{now_ms, SessionRecord, SessionState};

use crate::timefmt::iso;

/// Events kept for resuming clients.
pub const RING: usize = 10_000;
/// Bytes of event JSON kept for resuming clients (reserved, touched as it fills: an event
/// is a few hundred bytes, so [`RING`] events take a few MiB of it).
const RING_BYTES: usize = 8 << 20;
/// Events a live client may fall behind by before it is dropped.
const BROADCAST: usize = 1_024;

/// What kind of event: its `event:` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    State,
    PairingCode,
    Deleted,
}

impl Kind {
    /// The kind an `event:` line names.
    pub fn parse(s: &str) -> Option<Kind> {
        [Kind::State, Kind::PairingCode, Kind::Deleted]
            .into_iter()
            .find(|k| k.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::State => "session.state",
            Kind::PairingCode => "session.pairing_code",
            Kind::Deleted => "session.deleted",
        }
    }
}

/// One kept event: where its JSON is in the byte ring.
#[derive(Debug, Clone, Copy)]
struct Entry {
    kind: Kind,
    /// Offset of its public JSON, counted from the first byte ever kept.
    at: u64,
    /// Length of the JSON anyone may read.
    public: u32,
    /// Length of the JSON with the secret in it (the pairing code), right after the public
    /// one; 0: none.
    secret: u32,
    /// Published by another node and relayed here (never relayed on).
    relayed: bool,
}

/// The kept events. Event numbers are consecutive, so event `id` is
/// `entries[id - first]`.
struct Ring {
    bytes: VecDeque<u8>,
    entries: VecDeque<Entry>,
    /// Number of the oldest kept event.
    first: u64,
    /// Offset of `bytes[0]`, counted from the first byte ever kept.
    dropped: u64,
}

impl Ring {
    fn new(events: usize, bytes: usize) -> Ring {
        Ring {
            bytes: VecDeque::with_capacity(bytes),
            entries: VecDeque::with_capacity(events),
            first: 1,
            dropped: 0,
        }
    }

    fn forget_oldest(&mut self) {
        if let Some(e) = self.entries.pop_front() {
            let len = e.public as usize + e.secret as usize;
            self.bytes.drain(..len);
            self.dropped += len as u64;
            self.first += 1;
        }
    }

    /// Keeps event `id` (the next number), forgetting the oldest ones it needs room of.
    /// Within the reserved capacity, so the buffers never grow.
    fn push(&mut self, id: u64, kind: Kind, public: &str, secret: Option<&str>, relayed: bool) {
        let secret = secret.unwrap_or("");
        let len = public.len() + secret.len();
        while !self.entries.is_empty()
            && (self.entries.len() >= self.entries.capacity()
                || self.bytes.len() + len > self.bytes.capacity())
        {
            self.forget_oldest();
        }
        if self.entries.is_empty() {
            self.first = id;
        }
        let at = self.dropped + self.bytes.len() as u64;
        self.bytes.extend(public.as_bytes());
        self.bytes.extend(secret.as_bytes());
        self.entries.push_back(Entry {
            kind,
            at,
            public: public.len() as u32,
            secret: secret.len() as u32,
            relayed,
        });
    }

    fn entry(&self, id: u64) -> Option<&Entry> {
        self.entries
            .get(usize::try_from(id.checked_sub(self.first)?).ok()?)
    }

    /// Event `e`'s JSON, the secret form `with_secret` if it has one.
    fn data(&self, e: &Entry, with_secret: bool) -> String {
        let mut start = (e.at - self.dropped) as usize;
        let mut len = e.public as usize;
        if with_secret && e.secret > 0 {
            start += len;
            len = e.secret as usize;
        }
        let data: Vec<u8> = self.bytes.range(start..start + len).copied().collect();
        String::from_utf8_lossy(&data).into_owned()
    }

    /// Event `id` as `text/event-stream` lines, if it is still kept.
    fn frame(&self, id: u64, with_secret: bool) -> Option<String> {
        let e = self.entry(id)?;
        Some(format!(
            "id: {id}\nevent: {}\ndata: {}\n\n",
            e.kind.as_str(),
            self.data(e, with_secret)
        ))
    }
}

struct Inner {
    next: u64,
    ring: Ring,
    /// The last pairing code published per session (a code is announced once).
    codes: HashMap<String, String>,
}

/// The numbers of the events a resuming client missed.
pub type Backlog = std::ops::Range<u64>;

/// What [`EventHub::own_since`] found.
#[derive(Debug, Default)]
pub struct OwnEvents {
    /// The newest event's number (whoever published it).
    pub last: u64,
    /// Events in the range (this node's or relayed) the ring had already forgotten.
    pub forgotten: u64,
    /// (number, kind, public JSON) of each of this node's own.
    pub events: Vec<(u64, Kind, String)>,
}

/// What [`EventHub::changed`] published.
#[derive(Debug, Default)]
pub struct Changed {
    /// A `session.state` event's JSON.
    pub state: Option<String>,
    /// A `session.pairing_code` event's JSON, code included.
    pub code: Option<String>,
}

/// The hub.
pub struct EventHub {
    inner: Mutex<Inner>,
    /// This process's node id, named in every event (several nodes on one database).
    node: std::sync::OnceLock<String>,
    /// Announces each new event's number.
    tx: broadcast::Sender<u64>,
    closed: watch::Sender<bool>,
}

impl Default for EventHub {
    fn default() -> Self {
        EventHub {
            inner: Mutex::new(Inner {
                next: 0,
                ring: Ring::new(RING, RING_BYTES),
                codes: HashMap::new(),
            }),
            tx: broadcast::channel(BROADCAST).0,
            closed: watch::channel(false).0,
            node: std::sync::OnceLock::new(),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct StateEvent<'a> {
    user_id: &'a str,
    state: &'static str,
    status: &'static str,
    desired: &'static str,
    restarts: u32,
    disconnects: u32,
    last_error: Option<&'a str>,
    name: Option<&'a str>,
    /// Who made the change by a command (a key's id, `admin`); absent when the session
    /// changed by itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    by: Option<&'a str>,
    /// The node that runs the session (several nodes on one database).
    #[serde(skip_serializing_if = "Option::is_none")]
    node: Option<&'a str>,
    at: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CodeEvent<'a> {
    user_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pairing_code: Option<&'a str>,
    expires_at: String,
    /// The node that runs the session (several nodes on one database).
    #[serde(skip_serializing_if = "Option::is_none")]
    node: Option<&'a str>,
    at: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DeletedEvent<'a> {
    user_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    by: Option<&'a str>,
    /// The node that runs the session (several nodes on one database).
    #[serde(skip_serializing_if = "Option::is_none")]
    node: Option<&'a str>,
    at: String,
}

fn json(v: &impl Serialize) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "{}".into())
}

impl EventHub {
    /// Names this node in every event from now on.
    pub fn set_node(&self, id: &str) {
        let _ = self.node.set(id.to_string());
    }

    fn node(&self) -> Option<&str> {
        self.node.get().map(String::as_str)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, inner: &mut Inner, kind: Kind, public: &str, secret: Option<&str>) {
        self.keep(inner, kind, public, secret, false);
    }

    fn keep(
        &self,
        inner: &mut Inner,
        kind: Kind,
        public: &str,
        secret: Option<&str>,
        relayed: bool,
    ) {
        if public.len() + secret.map_or(0, str::len) > RING_BYTES / 2 {
            // Cannot happen with the fields an event has; never let one evict the ring.
            tracing::warn!(
                kind = kind.as_str(),
                "event too large to keep; not published"
            );
            return;
        }
        inner.next += 1;
        let id = inner.next;
        inner.ring.push(id, kind, public, secret, relayed);
        // No receivers is fine: nobody is watching.
        let _ = self.tx.send(id);
    }

    /// A record changed: a state event when its state did, a pairing event for a new code.
    /// Returns the JSON of what it published (the code's with the code), for webhooks.
    pub fn changed(&self, rec: &SessionRecord, state_changed: bool) -> Changed {
        let mut out = Changed::default();
        let at = iso(now_ms());
        let mut inner = self.lock();
        if state_changed {
            let e = StateEvent {
                user_id: &rec.user_id,
                state: rec.state.as_str(),
                status: if rec.state == SessionState::Online {
                    "online"
                } else {
                    "offline"
                },
                desired: rec.desired.as_str(),
                restarts: rec.restarts,
                disconnects: rec.disconnects,
                last_error: rec.last_error.as_deref(),
                name: rec.name.as_deref(),
                by: rec.by.as_deref(),
                node: self.node(),
                at: at.clone(),
            };
            let public = json(&e);
            self.publish(&mut inner, Kind::State, &public, None);
            out.state = Some(public);
        }
        match (&rec.pairing, rec.state) {
            (Some(p), SessionState::Pairing) if inner.codes.get(&rec.user_id) != Some(&p.code) => {
                inner.codes.insert(rec.user_id.clone(), p.code.clone());
                let mut e = CodeEvent {
                    user_id: &rec.user_id,
                    pairing_code: None,
                    expires_at: iso(p.expires_at_ms),
                    node: self.node(),
                    at,
                };
                let public = json(&e);
                e.pairing_code = Some(&p.code);
                let secret = json(&e);
                self.publish(&mut inner, Kind::PairingCode, &public, Some(&secret));
                out.code = Some(secret);
            }
            (None, _) => {
                inner.codes.remove(&rec.user_id);
            }
            _ => {}
        }
        out
    }

    /// A session was deleted.
    pub fn deleted(&self, user_id: &str, by: Option<&str>) {
        let mut inner = self.lock();
        inner.codes.remove(user_id);
        let e = DeletedEvent {
            user_id,
            by,
            node: self.node(),
            at: iso(now_ms()),
        };
        self.publish(&mut inner, Kind::Deleted, &json(&e), None);
    }

    /// The numbers of the events after `last` still in the ring, and a receiver for the
    /// numbers of the ones to come (taken together, so none is missed or seen twice).
    pub fn subscribe(&self, last: Option<u64>) -> (Backlog, broadcast::Receiver<u64>) {
        let inner = self.lock();
        let rx = self.tx.subscribe();
        let end = inner.next + 1;
        let backlog = match last {
            Some(last) => last.saturating_add(1).max(inner.ring.first).min(end)..end,
            None => end..end,
        };
        (backlog, rx)
    }

    /// Event `id` as `text/event-stream` lines, the pairing code in it only
    /// `with_secret`; `None` once the ring has forgotten it (or before it was published).
    pub fn frame(&self, id: u64, with_secret: bool) -> Option<String> {
        self.lock().ring.frame(id, with_secret)
    }

    /// As [`EventHub::frame`], for a reader that sees only some sessions: `Some(None)`
    /// for an event about a session `sees` refuses.
    pub fn frame_if(
        &self,
        id: u64,
        with_secret: bool,
        sees: impl Fn(&str) -> bool,
    ) -> Option<Option<String>> {
        let frame = self.frame(id, with_secret)?;
        #[derive(serde::Deserialize)]
        struct About {
            #[serde(rename = "userId")]
            user_id: String,
        }
        let data = frame.split_once("\ndata: ")?.1.trim_end();
        let seen = serde_json::from_str::<About>(data).is_ok_and(|a| sees(&a.user_id));
        Some(seen.then_some(frame))
    }

    /// An event another node published (its public JSON: a pairing code never leaves its
    /// node), kept and announced like this node's own, under this node's next number.
    pub fn relay_in(&self, kind: Kind, public: &str) {
        let mut inner = self.lock();
        self.keep(&mut inner, kind, public, None, true);
    }

    /// This node's own events after `after`, up to the newest, as (number, kind, public
    /// JSON) for the other nodes; `forgotten` counts the ones the ring no longer holds.
    pub fn own_since(&self, after: u64) -> OwnEvents {
        let inner = self.lock();
        let ring = &inner.ring;
        let from = after + 1;
        let mut out = OwnEvents {
            last: inner.next,
            forgotten: ring
                .first
                .saturating_sub(from)
                .min(inner.next.saturating_sub(after)),
            events: Vec::new(),
        };
        for id in from.max(ring.first)..=inner.next {
            if let Some(e) = ring.entry(id).filter(|e| !e.relayed) {
                out.events.push((id, e.kind, ring.data(e, false)));
            }
        }
        out
    }

    /// The id of the newest event (0: none yet).
    pub fn last_id(&self) -> u64 {
        self.lock().next
    }

    /// Ends every stream (at shutdown).
    pub fn close(&self) {
        let _ = self.closed.send(true);
    }

    /// Resolves once [`EventHub::close`] was called.
    pub fn closed(&self) -> watch::Receiver<bool> {
        self.closed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use botvisor_actors::PairingCode;

    #[test]
    fn the_ring_resumes_after_an_id_and_forgets_the_oldest() {
        let hub = EventHub::default();
        let mut rec = SessionRecord::new("u1".into(), "1234567".into());
        for _ in 0..RING + 5 {
            hub.changed(&rec, true);
        }
        assert_eq!(hub.last_id(), (RING + 5) as u64);
        let (backlog, _) = hub.subscribe(Some((RING + 2) as u64));
        assert_eq!(backlog.collect::<Vec<_>>(), vec![10_003, 10_004, 10_005]);
        let (all, _) = hub.subscribe(Some(0));
        assert_eq!(all.clone().count(), RING, "bounded");
        assert_eq!(all.start, 6);
        assert!(hub.frame(5, false).is_none(), "forgotten");
        assert!(hub
            .frame(6, false)
            .unwrap()
            .starts_with("id: 6\nevent: session.state\n"));
        // A pairing code is announced once, and only the secret form carries it.
        rec.state = SessionState::Pairing;
        rec.pairing = Some(PairingCode {
            code: "ABCD-1234".into(),
            expires_at_ms: 1,
        });
        hub.changed(&rec, true);
        hub.changed(&rec, false);
        let (tail, _) = hub.subscribe(Some((RING + 5) as u64));
        assert_eq!(tail.clone().count(), 2, "one state event, one code event");
        let public = hub.frame(tail.end - 1, false).unwrap();
        let secret = hub.frame(tail.end - 1, true).unwrap();
        assert!(public.contains("event: session.pairing_code\n"));
        assert!(!public.contains("ABCD-1234"));
        assert!(secret.contains("ABCD-1234"));
        let state = hub.frame(tail.start, true).unwrap();
        assert!(state.contains("\"state\":\"pairing\""), "{state}");
        assert!(hub.frame(tail.end, false).is_none(), "not yet published");
        // A client that has seen everything gets no backlog.
        assert_eq!(hub.subscribe(Some(tail.end - 1)).0.count(), 0);
        assert_eq!(hub.subscribe(Some(u64::MAX)).0.count(), 0);
    }

    #[test]
    fn relayed_events_are_numbered_here_and_never_relayed_on() {
        let hub = EventHub::default();
        let rec = SessionRecord::new("u1".into(), "1234567".into());
        hub.changed(&rec, true);
        hub.relay_in(
            Kind::State,
            r#"{"userId":"u2","state":"online","node":"n2"}"#,
        );
        hub.deleted("u1", None);
        assert_eq!(hub.last_id(), 3);
        let (backlog, _) = hub.subscribe(Some(0));
        assert_eq!(backlog, 1..4);
        assert!(hub.frame(2, true).unwrap().contains(r#""userId":"u2""#));
        // Only this node's own go to the others, in order.
        let own = hub.own_since(0);
        assert_eq!(own.last, 3);
        assert_eq!(own.forgotten, 0);
        let kinds: Vec<(u64, Kind)> = own.events.iter().map(|(i, k, _)| (*i, *k)).collect();
        assert_eq!(kinds, vec![(1, Kind::State), (3, Kind::Deleted)]);
        assert!(hub.own_since(3).events.is_empty());
        // What the ring forgot before it was relayed is counted.
        for _ in 0..RING + 2 {
            hub.deleted("u1", None);
        }
        let own = hub.own_since(3);
        assert_eq!(own.forgotten, 2);
        assert_eq!(own.events.len(), RING);
        assert_eq!(Kind::parse("session.deleted"), Some(Kind::Deleted));
        assert_eq!(Kind::parse("message.received"), None);
    }

    #[test]
    fn the_byte_ring_forgets_by_size_too_and_never_grows() {
        let mut ring = Ring::new(100, 1_000);
        let (events, bytes) = (ring.entries.capacity(), ring.bytes.capacity());
        let big = "x".repeat(300);
        for id in 1..=50 {
            ring.push(id, Kind::State, &format!("{id}{big}"), Some("s"), false);
            assert!(ring.bytes.len() <= bytes);
        }
        assert_eq!(ring.entries.len(), bytes / 304, "as many as fit");
        assert_eq!(ring.first, 51 - ring.entries.len() as u64);
        assert!(ring
            .frame(50, false)
            .unwrap()
            .contains(&format!("data: 50{big}\n")));
        assert!(ring.frame(50, true).unwrap().ends_with("data: s\n\n"));
        assert!(ring.frame(ring.first - 1, false).is_none());
        // Small events: bounded by count.
        for id in 51..=1_000 {
            ring.push(id, Kind::Deleted, "{}", None, false);
        }
        assert_eq!(ring.entries.len(), events);
        assert_eq!(ring.first, 1_001 - events as u64);
        assert_eq!(
            ring.frame(1_000, false).unwrap(),
            "id: 1000\nevent: session.deleted\ndata: {}\n\n"
        );
        assert_eq!(ring.entries.capacity(), events, "never grew");
        assert_eq!(ring.bytes.capacity(), bytes, "never grew");
    }
}
