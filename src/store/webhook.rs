//! What the store queues for webhooks (in the same transaction as the change behind it),
//! the per-session receivers, and the dead letters.

use botvisor_actors::{SessionRecord, StorageError};

use super::Store;
use crate::db::{self, OutboxRow};

impl Store {
    /// Queues a webhook event for every receiver (nothing without receivers). It commits
    /// with whatever was queued before it, so with the change that caused it.
    pub fn webhook(&self, user_id: &str, kind: &'static str, data: &str) {
        self.webhook_as(user_id, kind, data, crate::webhooks::event_id());
    }

    /// As [`Store::webhook`], under a given event id (one derived from what happened, so
    /// the same thing reported twice carries the same `X-Botvisor-Event-Id`).
    pub(super) fn webhook_as(
        &self,
        user_id: &str,
        kind: &'static str,
        data: &str,
        event_id: String,
    ) {
        self.queue
            .outbox(self.webhook_rows(user_id, kind, data, event_id));
    }

    /// The deliveries of one event, one per receiver of `user_id` (none without any).
    pub(super) fn webhook_rows(
        &self,
        user_id: &str,
        kind: &'static str,
        data: &str,
        event_id: String,
    ) -> Vec<OutboxRow> {
        let Some(hooks) = &self.webhooks else {
            return Vec::new();
        };
        let urls = hooks.destinations(user_id, kind);
        if urls.is_empty() {
            return Vec::new();
        }
        hooks.count(urls.len() as u64);
        let at_ms = botvisor_actors::now_ms();
        let node = self.config.node.as_ref().map(|n| n.id.as_str());
        let Some(body) = envelope(&event_id, kind, at_ms, data, node) else {
            tracing::error!(%user_id, kind, "a webhook event's data is not JSON; not queued (a bug)");
            return Vec::new();
        };
        urls.iter()
            .map(|url| OutboxRow {
                event_id: event_id.clone(),
                destination: url.clone(),
                user_id: user_id.to_string(),
                kind,
                body: body.clone(),
                at_ms,
            })
            .collect()
    }

    /// Whether a message event of `user_id` can be taken now: no receivers, or room in
    /// the backlog (see `Webhooks::has_room`). Its sources ask before they accept.
    pub fn webhook_room(&self, user_id: &str) -> bool {
        match &self.webhooks {
            Some(hooks) => !hooks.has_destinations(user_id) || hooks.has_room(),
            None => true,
        }
    }

    pub(super) fn webhook_changes(&self, rec: &SessionRecord, published: crate::events::Changed) {
        if let Some(state) = published.state {
            self.webhook(&rec.user_id, "session.state", &state);
        }
        let codes = self
            .webhooks
            .as_ref()
            .is_some_and(|w| w.settings.pairing_codes);
        if let (Some(code), true) = (published.code, codes) {
            self.webhook(&rec.user_id, "session.pairing_code", &code);
        }
    }

    /// A message sent through the API (`Ok`: its id), or one that could not be. `text`
    /// is the content's one-line summary; a message that is not a text also carries
    /// `kind` and its structured part (`location`, `contact` or `poll`).
    pub fn message_event<E: std::fmt::Display>(
        &self,
        user_id: &str,
        to: &str,
        content: &botvisor_actors::Outgoing,
        result: &Result<&String, E>,
    ) {
        if let Some((kind, data)) = self.message_event_data(user_id, to, content, result, None) {
            self.webhook(user_id, kind, &data);
        }
    }

    /// A queued send is done (`Ok`: sent with its id; `Err`: failed for good): it leaves
    /// its queue in the transaction that writes its `message.sent` or `message.failed`
    /// event (whose id comes from the message's, so a send retried after a crash is the
    /// same event), and a sent message is remembered by its id (in `chat`, the JID `to`
    /// names).
    pub fn queued_done<E: std::fmt::Display>(
        &self,
        row: &crate::db::QueuedRow,
        (to, chat): (&str, &str),
        content: &botvisor_actors::Outgoing,
        result: &Result<&String, E>,
    ) {
        let queued = Some(row.message_id.as_str());
        let deliveries = match self.message_event_data(&row.user_id, to, content, result, queued) {
            Some((kind, data)) => {
                let event_id =
                    crate::webhooks::derived_event_id(&[&row.user_id, "queued", &row.message_id]);
                self.webhook_rows(&row.user_id, kind, &data, event_id)
            }
            None => Vec::new(),
        };
        let sent = result.is_ok().then(|| crate::db::MessageRow {
            user_id: row.user_id.clone(),
            message_id: row.message_id.clone(),
            chat: chat.to_string(),
            author: None,
            from_me: true,
            at_ms: botvisor_actors::now_ms(),
            media: None,
            media_size: None,
            media_type: None,
            poll_options: super::poll_options(content),
        });
        self.queue.dequeue(row.key(), deliveries, sent);
    }

    /// Counts a send and makes its event's kind and data (`None` without webhooks). A
    /// queued send's (`queued`: its id) says so, and its failure names the id too.
    fn message_event_data<E: std::fmt::Display>(
        &self,
        user_id: &str,
        to: &str,
        content: &botvisor_actors::Outgoing,
        result: &Result<&String, E>,
        queued: Option<&str>,
    ) -> Option<(&'static str, String)> {
        if let Some(m) = &self.config.messages {
            match result {
                Ok(_) => m.sent.inc(),
                Err(_) => m.failed.inc(),
            };
        }
        self.webhooks.as_ref()?;
        let at = crate::timefmt::iso(botvisor_actors::now_ms());
        let text = content.summary();
        let (kind, mut data) = match result {
            Ok(id) => (
                "message.sent",
                serde_json::json!({"userId": user_id, "messageId": id, "to": to, "text": text, "at": at}),
            ),
            Err(e) => (
                "message.failed",
                serde_json::json!({"userId": user_id, "to": to, "text": text, "error": e.to_string(), "at": at}),
            ),
        };
        if let Some((key, part)) = crate::webhooks::content_json(content) {
            data["kind"] = content.kind().into();
            data[key] = part;
        }
        if let Some(id) = queued {
            data["messageId"] = id.into();
            data["queued"] = true.into();
        }
        Some((kind, data.to_string()))
    }

    /// Sets (`Some`) or clears a session's own webhook receiver, durably; `Ok(false)`
    /// when no `--webhook-secret` is configured (nothing could be signed).
    pub async fn set_session_webhook(
        &self,
        user_id: &str,
        receiver: Option<crate::webhooks::OwnReceiver>,
    ) -> Result<bool, StorageError> {
        let Some(hooks) = self.webhooks.clone() else {
            return Ok(false);
        };
        let (id, stored) = (
            user_id.to_string(),
            receiver.as_ref().map(|r| r.row(user_id)),
        );
        self.on_reader(move |conn| conn.set_session_webhook(&id, stored.as_ref()))
            .await?;
        hooks.set_session_url(user_id, receiver);
        Ok(true)
    }

    /// A session's own webhook receiver.
    pub fn session_webhook(&self, user_id: &str) -> Option<crate::webhooks::OwnReceiver> {
        self.webhooks.as_ref().and_then(|w| w.session_url(user_id))
    }

    /// The webhook deliveries that gave up, oldest first.
    pub async fn dead_letters(&self) -> Result<Vec<db::DeadLetter>, StorageError> {
        self.on_reader(|conn| conn.dead_letters(1_000)).await
    }

    /// Puts a dead letter back in line; how many deliveries (one per receiver) it revived.
    pub async fn replay(&self, event_id: &str) -> Result<usize, StorageError> {
        let event_id = event_id.to_string();
        let revived = self
            .on_reader(move |conn| conn.replay(&event_id, botvisor_actors::now_ms()))
            .await?;
        if let (Some(hooks), true) = (&self.webhooks, revived > 0) {
            hooks.rescan();
        }
        Ok(revived)
    }
}

/// A webhook body: `{"id", "event", "at", "data"}` with `data` (already JSON) kept as it
/// is, and `node` when several nodes share the database; `None` if `data` is not JSON.
pub(super) fn envelope(
    event_id: &str,
    kind: &str,
    at_ms: u64,
    data: &str,
    node: Option<&str>,
) -> Option<String> {
    #[derive(serde::Serialize)]
    struct Envelope<'a> {
        id: &'a str,
        event: &'a str,
        at: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        node: Option<&'a str>,
        data: &'a serde_json::value::RawValue,
    }
    let data: &serde_json::value::RawValue = serde_json::from_str(data).ok()?;
    serde_json::to_string(&Envelope {
        id: event_id,
        event: kind,
        at: crate::timefmt::iso(at_ms),
        node,
        data,
    })
    .ok()
}
