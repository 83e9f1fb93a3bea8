//! The live event stream behind `GET /api/events`: every state change and pairing code,
//! numbered, kept in a bounded ring (so a client can resume with `Last-Event-ID`) and
//! broadcast to the connected clients. A leaf: the store publishes into it when a record
//! changes; the HTTP front end reads from it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;
use tokio::sync::{broadcast, watch};

use botvisor_actors::{now_ms, SessionRecord, SessionState};

use crate::timefmt::iso;

/// Events kept for resuming clients.
pub const RING: usize = 10_000;
/// Events a live client may fall behind by before it is dropped.
const BROADCAST: usize = 1_024;

/// One published event.
#[derive(Debug)]
pub struct Published {
    /// Its number (`id:` in the stream), increasing from 1.
    pub id: u64,
    /// `session.state`, `session.pairing_code`, `session.deleted`.
    pub kind: &'static str,
    /// The JSON anyone may read.
    pub public: String,
    /// The JSON with the secret in it (the pairing code), for holders of the key.
    pub secret: Option<String>,
}

impl Published {
    /// The event as `text/event-stream` lines.
    pub fn frame(&self, with_secret: bool) -> String {
        let data = match (&self.secret, with_secret) {
            (Some(s), true) => s,
            _ => &self.public,
        };
        format!("id: {}\nevent: {}\ndata: {data}\n\n", self.id, self.kind)
    }
}

#[derive(Default)]
struct Inner {
    next: u64,
    ring: VecDeque<Arc<Published>>,
    /// The last pairing code published per session (a code is announced once).
    codes: HashMap<String, String>,
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
    tx: broadcast::Sender<Arc<Published>>,
    closed: watch::Sender<bool>,
}

impl Default for EventHub {
    fn default() -> Self {
        EventHub {
            inner: Mutex::new(Inner::default()),
            tx: broadcast::channel(BROADCAST).0,
            closed: watch::channel(false).0,
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
    at: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CodeEvent<'a> {
    user_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pairing_code: Option<&'a str>,
    expires_at: String,
    at: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DeletedEvent<'a> {
    user_id: &'a str,
    at: String,
}

fn json(v: &impl Serialize) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "{}".into())
}

impl EventHub {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(
        &self,
        inner: &mut Inner,
        kind: &'static str,
        public: String,
        secret: Option<String>,
    ) {
        inner.next += 1;
        let event = Arc::new(Published {
            id: inner.next,
            kind,
            public,
            secret,
        });
        if inner.ring.len() >= RING {
            inner.ring.pop_front();
        }
        inner.ring.push_back(event.clone());
        // No receivers is fine: nobody is watching.
        let _ = self.tx.send(event);
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
                at: at.clone(),
            };
            let public = json(&e);
            out.state = Some(public.clone());
            self.publish(&mut inner, "session.state", public, None);
        }
        match (&rec.pairing, rec.state) {
            (Some(p), SessionState::Pairing) if inner.codes.get(&rec.user_id) != Some(&p.code) => {
                inner.codes.insert(rec.user_id.clone(), p.code.clone());
                let mut e = CodeEvent {
                    user_id: &rec.user_id,
                    pairing_code: None,
                    expires_at: iso(p.expires_at_ms),
                    at,
                };
                let public = json(&e);
                e.pairing_code = Some(&p.code);
                let secret = json(&e);
                out.code = Some(secret.clone());
                self.publish(&mut inner, "session.pairing_code", public, Some(secret));
            }
            (None, _) => {
                inner.codes.remove(&rec.user_id);
            }
            _ => {}
        }
        out
    }

    /// A session was deleted.
    pub fn deleted(&self, user_id: &str) {
        let mut inner = self.lock();
        inner.codes.remove(user_id);
        let e = DeletedEvent {
            user_id,
            at: iso(now_ms()),
        };
        self.publish(&mut inner, "session.deleted", json(&e), None);
    }

    /// The events after `last` still in the ring, and a receiver for the ones to come
    /// (taken together, so none is missed or seen twice).
    pub fn subscribe(
        &self,
        last: Option<u64>,
    ) -> (Vec<Arc<Published>>, broadcast::Receiver<Arc<Published>>) {
        let inner = self.lock();
        let rx = self.tx.subscribe();
        let backlog = match last {
            Some(last) => inner.ring.iter().filter(|e| e.id > last).cloned().collect(),
            None => Vec::new(),
        };
        (backlog, rx)
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
        assert_eq!(
            backlog.iter().map(|e| e.id).collect::<Vec<_>>(),
            vec![10_003, 10_004, 10_005]
        );
        let (all, _) = hub.subscribe(Some(0));
        assert_eq!(all.len(), RING, "bounded");
        assert_eq!(all[0].id, 6);
        // A pairing code is announced once, and only the secret form carries it.
        rec.state = SessionState::Pairing;
        rec.pairing = Some(PairingCode {
            code: "ABCD-1234".into(),
            expires_at_ms: 1,
        });
        hub.changed(&rec, true);
        hub.changed(&rec, false);
        let (tail, _) = hub.subscribe(Some((RING + 5) as u64));
        assert_eq!(tail.len(), 2, "one state event, one code event");
        let code = &tail[1];
        assert_eq!(code.kind, "session.pairing_code");
        assert!(!code.frame(false).contains("ABCD-1234"));
        assert!(code.frame(true).contains("ABCD-1234"));
    }
}
