//! `GET /api/events`: Server-Sent Events of every state change and pairing code.
//!
//! Each event has an `id:`; a client that reconnects with `Last-Event-ID` gets what it
//! missed from the hub's ring (the last 10,000 events). A comment line every 15 s keeps
//! proxies from closing an idle stream. A client that does not keep up (its buffer of
//! 256 events full, or 1,024 behind the broadcast) is dropped: it can never hold memory or
//! slow anything else; it reconnects and resumes. Pairing codes are in the events only for
//! holders of the key (or when no key is set).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::Response;
use tokio::sync::{broadcast, mpsc};

use crate::events::{Backlog, EventHub};
use crate::http::access::{Caller, Key, Scope};
use crate::http::response::ChannelBody;
use crate::http::router::{Answer, Ctx};

/// Frames buffered per client before it counts as too slow.
const CLIENT_BUFFER: usize = 256;
/// A comment this often keeps an idle stream open through proxies.
const HEARTBEAT: Duration = Duration::from_secs(15);

/// A client's backlog and its receiver for what comes next.
type Subscribed = (Backlog, broadcast::Receiver<u64>);

/// Feeds one client: the backlog after `last`, then live events and heartbeats, until the
/// client goes, falls behind, or the hub closes.
async fn pump(
    hub: Arc<EventHub>,
    subscribed: Subscribed,
    secrets: bool,
    only: Option<Arc<Key>>,
    tx: mpsc::Sender<Bytes>,
) {
    let (backlog, mut rx) = subscribed;
    // `Some(None)`: an event this reader may not see (skipped); `None`: forgotten.
    let frame = |id: u64| match &only {
        None => hub.frame(id, secrets).map(Some),
        Some(key) => hub.frame_if(id, secrets, |user| key.sees(user)),
    };
    let mut closed = hub.closed();
    let send = |text: String| tx.try_send(Bytes::from(text));
    if send("retry: 2000\n\n".into()).is_err() {
        return;
    }
    // The backlog may be bigger than the buffer: wait for the client to take it, for a
    // while. An event the ring forgot meanwhile ends the stream: the client resumes from
    // what it got.
    for id in backlog {
        let frame = match frame(id) {
            Some(Some(frame)) => frame,
            Some(None) => continue,
            None => return,
        };
        match tokio::time::timeout(HEARTBEAT, tx.send(Bytes::from(frame))).await {
            Ok(Ok(())) => {}
            _ => return,
        }
    }
    let mut beat = tokio::time::interval(HEARTBEAT);
    beat.tick().await;
    loop {
        let text = tokio::select! {
            got = rx.recv() => match got {
                Ok(id) => match frame(id) {
                    Some(Some(frame)) => frame,
                    Some(None) => continue,
                    None => return, // forgotten already: far behind
                },
                // Fell behind the broadcast, or the hub is gone: drop the client.
                Err(broadcast::error::RecvError::Lagged(_) | broadcast::error::RecvError::Closed) => return,
            },
            _ = beat.tick() => ": keep-alive\n\n".to_string(),
            _ = closed.changed() => return,
            _ = tx.closed() => return,
        };
        if send(text).is_err() {
            return; // the client does not read: drop it
        }
    }
}

pub async fn events(c: Ctx) -> Answer {
    // Pairing codes for the admin, and for a key with the pairing scope (about its own
    // sessions: it sees no other).
    let (secrets, only) = match &c.caller {
        Caller::Admin => (true, None),
        Caller::Anonymous => (false, None),
        Caller::Key(key) => (key.may(Scope::Pairing), Some(key.clone())),
    };
    let last = c
        .req
        .headers()
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let hub = c.app.store.hub().clone();
    let (tx, body_rx) = mpsc::channel::<Bytes>(CLIENT_BUFFER);
    // Subscribed before the answer goes out: a client that has the response head misses
    // nothing that happens after it.
    let subscribed = hub.subscribe(last);
    tokio::spawn(pump(hub, subscribed, secrets, only, tx));
    let mut resp = Response::new(ChannelBody(body_rx).boxed());
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use botvisor_actors::SessionRecord;

    #[tokio::test]
    async fn a_client_that_does_not_read_is_dropped_at_its_buffer() {
        let hub = Arc::new(EventHub::default());
        let (tx, mut rx) = mpsc::channel::<Bytes>(CLIENT_BUFFER);
        let task = tokio::spawn(pump(hub.clone(), hub.subscribe(None), false, None, tx));
        tokio::task::yield_now().await;
        let rec = SessionRecord::new("u".into(), "1234567".into());
        for _ in 0..CLIENT_BUFFER + 10 {
            hub.changed(&rec, true);
            tokio::task::yield_now().await;
        }
        // The pump gave up on the client: it ended, and its side of the channel is gone.
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the pump ends")
            .unwrap();
        let mut frames = 0;
        while rx.recv().await.is_some() {
            frames += 1;
        }
        assert_eq!(frames, CLIENT_BUFFER, "exactly the buffer, then dropped");
    }

    #[tokio::test]
    async fn a_reading_client_gets_every_event_and_the_stream_ends_at_close() {
        let hub = Arc::new(EventHub::default());
        let (tx, mut rx) = mpsc::channel::<Bytes>(CLIENT_BUFFER);
        let task = tokio::spawn(pump(hub.clone(), hub.subscribe(None), false, None, tx));
        tokio::task::yield_now().await;
        let rec = SessionRecord::new("u".into(), "1234567".into());
        let mut got = 0;
        for _ in 0..2_000 {
            hub.changed(&rec, true);
            while let Ok(frame) = rx.try_recv() {
                got += usize::from(frame.starts_with(b"id: "));
            }
            tokio::task::yield_now().await;
        }
        tokio::task::yield_now().await;
        while let Ok(frame) = rx.try_recv() {
            got += usize::from(frame.starts_with(b"id: "));
        }
        assert_eq!(got, 2_000);
        hub.close();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("ends at close")
            .unwrap();
    }
}
