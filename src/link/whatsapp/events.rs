//! The client's events, as the session hears them: `LinkEvent`s, received messages, and
//! the state the pairing manager and the watcher share with the event handler.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Instant;

use tokio::sync::Notify;
use whatsapp_rust::prelude::*;

use botvisor_actors::{now_ms, EventSink, LinkEvent, PairingQr, Refers};

use super::locator::Locator;
use super::pairing::is_lasting;

/// A received message as botvisor reports it (`None` for the account's own messages).
pub(super) fn received(m: &InboundMessage) -> Option<botvisor_actors::InboundMessage> {
    if m.info.source.is_from_me {
        return None;
    }
    let refers = refers(&m.message);
    let text = match &refers {
        // An edit's text is the new one.
        Some(Refers::Edit { .. }) => edited_text(&m.message),
        _ => m.message.text_content().map(str::to_string),
    };
    let (from, from_lid) = sender_jids(&m.info.source.sender, m.info.source.sender_alt.as_ref());
    Some(botvisor_actors::InboundMessage {
        id: m.info.id.to_string(),
        from,
        from_lid,
        from_phone: None,
        push_name: Some(m.info.push_name.clone()).filter(|n| !n.trim().is_empty()),
        chat: m.info.source.chat.to_string(),
        timestamp_ms: m.info.timestamp.timestamp_millis().max(0) as u64,
        kind: message_kind(&m.message, text.is_some()).into(),
        reply_to: reply_to(&m.message),
        mentions: mentions(&m.message),
        media: received_media(&m.message).map(Box::new),
        refers,
        text,
    })
}

/// What the LID-to-phone mappings WhatsApp gave (whatsapp-rust keeps them in the
/// session's key store: number checks, device notifications, messages that named both)
/// add to a received message: the phone JID of a sender it named by LID alone. Only
/// then: a lookup that misses whatsapp-rust's cache reads the key store, ~100 µs a
/// message, which a sender named by phone (its LID is then only a nicety) must not pay
/// (`wa-throughput`'s received figure fell by a third when every message asked). A
/// failed lookup adds nothing.
pub(super) async fn learn_sender(client: &Client, msg: &mut botvisor_actors::InboundMessage) {
    if !msg.from.ends_with("@lid") {
        return;
    }
    let Ok(jid) = msg.from.parse::<Jid>() else {
        return;
    };
    if let Ok(Some(entry)) = client.get_lid_pn_entry(&jid).await {
        msg.from_phone = Some(Jid::pn(entry.phone_number.to_string()).to_string());
    }
}

/// Reads a vote on a poll the session sent: whatsapp-rust keeps the secret of every
/// message the session sent (under its chat, the session's own JID and the message's
/// id), botvisor the poll's options; the vote names the options it picked by their
/// hashes, encrypted with a key derived from that secret. Leaves the options `None`
/// when the poll, its secret or the vote cannot be read.
pub(super) async fn open_vote(
    client: &Client,
    store: &dyn botvisor_actors::Persistence,
    user_id: &str,
    m: &InboundMessage,
    msg: &mut botvisor_actors::InboundMessage,
) {
    let Some(Refers::PollVote {
        message_id,
        options,
    }) = msg.refers.as_mut()
    else {
        return;
    };
    let Some(vote) = m
        .message
        .get_base_message()
        .poll_update_message
        .as_option()
        .and_then(|u| u.vote.as_option())
    else {
        return;
    };
    let (Some(payload), Some(iv)) = (vote.enc_payload.as_deref(), vote.enc_iv.as_deref()) else {
        return;
    };
    let Some(names) = store.poll_options(user_id, message_id).await else {
        return;
    };
    let Some(creator) = client.pn().map(|j| j.to_non_ad()) else {
        return;
    };
    let chat = m.info.source.chat.to_non_ad();
    let mut chats = vec![chat.to_string()];
    if let Ok(Some(e)) = client.get_lid_pn_entry(&chat).await {
        chats.push(if chat.is_lid() {
            Jid::pn(e.phone_number.to_string()).to_string()
        } else {
            Jid::lid(e.lid.to_string()).to_string()
        });
    }
    let own: Vec<String> = [Some(creator.clone()), client.lid().map(|l| l.to_non_ad())]
        .into_iter()
        .flatten()
        .map(|j| j.to_string())
        .collect();
    let backend = client.persistence_manager().backend();
    // A secret is written behind the send (whatsapp-rust's buffer): a vote that comes
    // within milliseconds may find it a moment later.
    let mut secret = msg_secret(&*backend, &chats, &own, message_id).await;
    if secret.is_none() {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        secret = msg_secret(&*backend, &chats, &own, message_id).await;
    }
    let Some(secret) = secret else {
        tracing::debug!(%user_id, poll = %message_id, "a vote on a poll whose secret is unknown");
        return;
    };
    let voter = m.info.source.sender.to_non_ad();
    let ciphertext = whatsapp_rust::wacore::poll::PollVoteCiphertext {
        enc_payload: payload,
        enc_iv: iv,
    };
    match client
        .polls()
        .decrypt_vote(ciphertext, &secret, message_id, &creator, &voter)
        .await
    {
        Ok(hashes) => {
            *options = Some(
                names
                    .into_iter()
                    .filter(|n| {
                        let h = whatsapp_rust::wacore::poll::compute_option_hash(n);
                        hashes.iter().any(|got| got.as_slice() == h)
                    })
                    .collect(),
            );
        }
        Err(e) => {
            tracing::debug!(%user_id, poll = %message_id, error = %e, "a vote that does not open")
        }
    }
}

/// The secret whatsapp-rust kept for message `id`, under any of the chat's names and
/// any of the session's own (or the chat's, for a one-to-one chat it aliases).
async fn msg_secret(
    backend: &dyn whatsapp_rust::store::traits::Backend,
    chats: &[String],
    own: &[String],
    id: &str,
) -> Option<Vec<u8>> {
    for chat in chats {
        for sender in own.iter().chain(std::iter::once(chat)) {
            if let Ok(Some(s)) = backend.get_msg_secret(chat, sender, id).await {
                return Some(s);
            }
        }
    }
    None
}

/// What a received image, video, audio, document or sticker says about itself.
fn received_media(m: &wa::Message) -> Option<botvisor_actors::ReceivedMedia> {
    let m = m.get_base_message();
    let hex = |h: &Option<Vec<u8>>| h.as_deref().map(hex::encode);
    // Where its bytes are: each kind's message has the same fields under the same names.
    macro_rules! locator {
        ($kind:literal, $m:expr) => {
            Locator::of(
                $kind,
                &$m.direct_path,
                &$m.media_key,
                &$m.file_enc_sha256,
                &$m.file_sha256,
                $m.file_length,
            )
        };
    }
    if let Some(i) = m.image_message.as_option() {
        return Some(botvisor_actors::ReceivedMedia {
            mimetype: i.mimetype.clone(),
            size: i.file_length,
            caption: i.caption.clone(),
            sha256: hex(&i.file_sha256),
            locator: locator!("image", i),
            ..Default::default()
        });
    }
    if let Some(v) = m.video_message.as_option() {
        return Some(botvisor_actors::ReceivedMedia {
            mimetype: v.mimetype.clone(),
            size: v.file_length,
            caption: v.caption.clone(),
            sha256: hex(&v.file_sha256),
            locator: locator!("video", v),
            ..Default::default()
        });
    }
    if let Some(a) = m.audio_message.as_option() {
        return Some(botvisor_actors::ReceivedMedia {
            mimetype: a.mimetype.clone(),
            size: a.file_length,
            sha256: hex(&a.file_sha256),
            voice: a.ptt.unwrap_or(false),
            locator: locator!("audio", a),
            ..Default::default()
        });
    }
    let document = m.document_message.as_option().or_else(|| {
        m.document_with_caption_message
            .as_option()
            .and_then(|f| f.message.as_option())
            .and_then(|inner| inner.document_message.as_option())
    });
    if let Some(d) = document {
        return Some(botvisor_actors::ReceivedMedia {
            mimetype: d.mimetype.clone(),
            size: d.file_length,
            file_name: d.file_name.clone(),
            caption: d.caption.clone(),
            sha256: hex(&d.file_sha256),
            locator: locator!("document", d),
            ..Default::default()
        });
    }
    let s = m.sticker_message.as_option()?;
    Some(botvisor_actors::ReceivedMedia {
        mimetype: s.mimetype.clone(),
        size: s.file_length,
        sha256: hex(&s.file_sha256),
        locator: locator!("sticker", s),
        ..Default::default()
    })
}

/// Who sent a message: its phone JID when WhatsApp told it (a sender known by its LID
/// comes with its number as the alternative address when the account shows it), and its
/// LID when it has one. A sender known only by a LID is reported by the LID.
pub(super) fn sender_jids(sender: &Jid, alt: Option<&Jid>) -> (String, Option<String>) {
    if sender.is_lid() {
        let lid = sender.to_non_ad().to_string();
        let phone = alt.filter(|a| a.is_pn()).map(|a| a.to_non_ad().to_string());
        (phone.unwrap_or_else(|| lid.clone()), Some(lid))
    } else {
        let lid = alt
            .filter(|a| a.is_lid())
            .map(|a| a.to_non_ad().to_string());
        (sender.to_string(), lid)
    }
}

/// What a message does to another one: a reaction, an edit, a revoke.
fn refers(m: &wa::Message) -> Option<Refers> {
    use wa::message::protocol_message::Type;
    let m = m.get_base_message();
    let target = |key: &whatsapp_rust::buffa::MessageField<wa::MessageKey>| {
        key.as_option()
            .and_then(|k| k.id.clone())
            .unwrap_or_default()
    };
    if let Some(r) = m.reaction_message.as_option() {
        return Some(Refers::Reaction {
            message_id: target(&r.key),
            emoji: r.text.clone().unwrap_or_default(),
        });
    }
    if let Some(u) = m
        .poll_update_message
        .as_option()
        .filter(|u| u.vote.is_set())
    {
        // Its options are read with the poll's secret, later ([`open_vote`]).
        return Some(Refers::PollVote {
            message_id: target(&u.poll_creation_message_key),
            options: None,
        });
    }
    let p = m.protocol_message.as_option()?;
    match p.r#type {
        Some(Type::Revoke) => Some(Refers::Revoke {
            message_id: target(&p.key),
        }),
        Some(Type::MessageEdit) => Some(Refers::Edit {
            message_id: target(&p.key),
        }),
        _ => None,
    }
}

/// The new text of an edit.
fn edited_text(m: &wa::Message) -> Option<String> {
    let p = m.get_base_message().protocol_message.as_option()?;
    p.edited_message
        .as_option()
        .and_then(|e| e.text_content().map(str::to_string))
}

/// The id of the message a message quotes (a reply).
fn reply_to(m: &wa::Message) -> Option<String> {
    m.get_base_message()
        .extended_text_message
        .as_option()
        .and_then(|e| e.context_info.as_option())
        .and_then(|c| c.stanza_id.clone())
}

/// Who a text mentions (the JIDs its context names).
fn mentions(m: &wa::Message) -> Vec<String> {
    m.get_base_message()
        .extended_text_message
        .as_option()
        .and_then(|e| e.context_info.as_option())
        .map(|c| c.mentioned_jid.clone())
        .unwrap_or_default()
}

/// `ABCD1234` → `ABCD-1234` (as WhatsApp shows it and the LD7 API documents it).
pub fn format_code(code: &str) -> String {
    if code.len() == 8 && code.is_ascii() {
        format!("{}-{}", &code[..4], &code[4..])
    } else {
        code.to_string()
    }
}

/// What the event handler, the pairing manager and the watcher share.
pub(super) struct Shared {
    pub(super) user_id: String,
    pub(super) events: EventSink,
    pub(super) builtin_commands: bool,
    pub(super) started: Instant,
    /// Paired (pair-success seen, or the store already had an account).
    pub(super) paired: AtomicBool,
    /// A terminal event was reported: the run loop's end is expected.
    pub(super) terminal: AtomicBool,
    /// We are closing or logging out: events and the run loop's end are expected.
    pub(super) closing: AtomicBool,
    /// Wakes the pairing manager (refresh requested, reconnect, paired).
    pub(super) refresh: Notify,
    /// Received messages reach the store through the durability hook, not as events.
    pub(super) durable_inbound: bool,
}

impl Shared {
    /// A connect attempt failed. An unpaired session reports it: a lasting cause ends a
    /// create waiting for its first code at once, and any cause becomes `lastError` (so a
    /// create that times out says why). A paired session's drop was already reported by
    /// the client's own `Disconnected`; its retries are the client's business.
    pub(super) fn connect_failed(&self, error: &str) {
        if self.closing.load(Ordering::SeqCst) {
            return;
        }
        let message = format!("cannot reach WhatsApp: {error}");
        if self.paired.load(Ordering::SeqCst) {
            // The client retries by itself; the cause (a proxy down, say) is the
            // session's lastError meanwhile.
            self.events.emit(LinkEvent::Trouble { message });
            return;
        }
        if is_lasting(error) {
            self.events.emit(LinkEvent::PairingRejected {
                message,
                throttled: false,
            });
        } else {
            self.events
                .emit(LinkEvent::Disconnected { reason: message });
        }
    }

    fn emit_terminal(&self, event: LinkEvent) {
        if self.closing.load(Ordering::SeqCst) || self.terminal.swap(true, Ordering::SeqCst) {
            return;
        }
        self.events.emit(event);
    }

    fn on_event(self: &Arc<Self>, event: &Event, client: &Arc<Client>) {
        match event {
            Event::Messages(batch) => {
                for m in batch.iter() {
                    self.on_message(m, client);
                }
            }
            Event::Receipt(r) if !r.source.is_from_me => self.on_receipt(r),
            Event::SelfPushNameUpdated(u) if client.is_connected() => {
                self.events.emit(LinkEvent::Online {
                    name: Some(u.new_name.clone()).filter(|n| !n.is_empty()),
                })
            }
            _ => {
                let _ = self.on_connection_event(event, client) || self.on_refusal(event);
            }
        }
    }

    /// Connecting, pairing and disconnecting; false when `event` is none of those.
    fn on_connection_event(&self, event: &Event, client: &Arc<Client>) -> bool {
        match event {
            Event::Connected(_) => {
                self.paired.store(true, Ordering::SeqCst);
                self.refresh.notify_one();
                let name = Some(client.push_name()).filter(|n| !n.is_empty());
                self.events.emit(LinkEvent::Online { name });
            }
            Event::PairSuccess(_) => {
                tracing::info!(user_id = %self.user_id, "paired with the phone");
                self.paired.store(true, Ordering::SeqCst);
                self.refresh.notify_one();
                self.events.emit(LinkEvent::Connecting);
            }
            Event::PairError(e) => {
                tracing::warn!(user_id = %self.user_id, error = %e.error, "pairing failed");
            }
            Event::Disconnected(d) => {
                if !self.closing.load(Ordering::SeqCst) {
                    self.events.emit(LinkEvent::Disconnected {
                        reason: format!("disconnected from WhatsApp: {}", d.reason),
                    });
                }
                // A pairing code does not survive a reconnect: the manager asks again.
                self.refresh.notify_one();
            }
            Event::PairingCodeRefresh(_) => self.refresh.notify_one(),
            Event::PairingQrCode(qr) if !self.paired.load(Ordering::SeqCst) => {
                self.events.emit(LinkEvent::PairingQr(PairingQr {
                    data: qr.code.clone(),
                    expires_at_ms: now_ms() + qr.timeout.as_millis() as u64,
                }))
            }
            Event::PairingQrCodesExhausted(q) => {
                // WhatsApp rotates a handful of QR codes per connection; the pairing code
                // flow goes on, and the next reconnect brings new QR codes.
                tracing::info!(user_id = %self.user_id, disconnected = q.disconnected, "QR codes exhausted for this connection");
            }
            _ => return false,
        }
        true
    }

    /// WhatsApp ending or refusing the session (logged out, replaced, banned, outdated,
    /// refused); false when `event` is none of those.
    fn on_refusal(&self, event: &Event) -> bool {
        match event {
            Event::LoggedOut(lo) => self.emit_terminal(LinkEvent::LoggedOut {
                reason: format!("{:?}", lo.reason),
            }),
            Event::StreamReplaced(_) => self.emit_terminal(LinkEvent::Replaced {
                reason: "WhatsApp replaced this connection (stream conflict)".into(),
            }),
            Event::TemporaryBan(ban) => {
                let secs = ban.expire.num_seconds().max(0) as u64;
                let until = crate::timefmt::iso(now_ms() + secs * 1000);
                self.emit_terminal(LinkEvent::Banned {
                    reason: format!("temporary ban ({}) for {secs} s, until {until}", ban.code),
                })
            }
            Event::ClientOutdated(_) => self.emit_terminal(LinkEvent::Crashed {
                error: "WhatsApp says this client version is outdated; set a newer --wa-version"
                    .into(),
            }),
            Event::ConnectFailure(f) if !f.reason.should_reconnect() => {
                self.emit_terminal(LinkEvent::Crashed {
                    error: format!(
                        "WhatsApp refused the connection: {:?}{}",
                        f.reason,
                        f.message
                            .as_deref()
                            .map(|m| format!(" ({m})"))
                            .unwrap_or_default()
                    ),
                })
            }
            Event::ConnectFailure(f) => self.events.emit(LinkEvent::Disconnected {
                reason: format!("WhatsApp is unavailable ({:?}); reconnecting", f.reason),
            }),
            _ => return false,
        }
        true
    }

    /// A delivery, read or played receipt from someone else.
    fn on_receipt(&self, r: &whatsapp_rust::types::events::Receipt) {
        use botvisor_actors::ReceiptStatus;
        use whatsapp_rust::wacore::types::presence::ReceiptType;
        let status = match r.r#type {
            ReceiptType::Delivered | ReceiptType::Inactive => ReceiptStatus::Delivered,
            ReceiptType::Read => ReceiptStatus::Read,
            ReceiptType::Played => ReceiptStatus::Played,
            _ => return,
        };
        self.events
            .emit(LinkEvent::Receipt(botvisor_actors::Receipt {
                message_ids: r.message_ids.iter().map(|id| id.to_string()).collect(),
                by: r.source.sender.to_string(),
                status,
                timestamp_ms: r.timestamp.timestamp_millis().max(0) as u64,
            }));
    }

    /// A received message: reported to the session (for its webhooks), logged without
    /// its text; `!ping` answers `pong`.
    fn on_message(&self, m: &InboundMessage, client: &Arc<Client>) {
        tracing::debug!(user_id = %self.user_id, from_me = m.info.source.is_from_me, "message received");
        let Some(msg) = received(m) else {
            return;
        };
        if !self.durable_inbound {
            self.events.emit(LinkEvent::Message(Box::new(msg)));
        }
        if !self.builtin_commands {
            return;
        }
        let Some(reply) = m
            .message
            .text_content()
            .and_then(|t| super::super::builtin_reply(t, self.started.elapsed()))
        else {
            return;
        };
        let chat = m.info.source.chat.clone();
        let client = client.clone();
        let user_id = self.user_id.clone();
        tokio::spawn(crate::session_heap::within(async move {
            if let Err(e) = client.send_message(chat, wa::Message::text(reply)).await {
                tracing::warn!(%user_id, error = %e, "could not answer !ping");
            }
        }));
    }
}

/// A received message's kind, from its content (the stanza's `type`/`mediatype`
/// attributes are often absent): one of a small fixed set, so it can label a metric.
pub fn message_kind(m: &wa::Message, has_text: bool) -> &'static str {
    if has_text {
        return "text";
    }
    let m = m.get_base_message();
    let set = [
        (m.image_message.is_set(), "image"),
        (m.video_message.is_set() || m.ptv_message.is_set(), "video"),
        (m.audio_message.is_set(), "audio"),
        (
            m.document_message.is_set() || m.document_with_caption_message.is_set(),
            "document",
        ),
        (
            m.sticker_message.is_set() || m.lottie_sticker_message.is_set(),
            "sticker",
        ),
        (
            m.location_message.is_set() || m.live_location_message.is_set(),
            "location",
        ),
        (
            m.contact_message.is_set() || m.contacts_array_message.is_set(),
            "contact",
        ),
        (
            m.reaction_message.is_set() || m.enc_reaction_message.is_set(),
            "reaction",
        ),
        (
            m.poll_creation_message.is_set()
                || m.poll_creation_message_v2.is_set()
                || m.poll_creation_message_v3.is_set()
                || m.poll_update_message.is_set(),
            "poll",
        ),
        (m.protocol_message.is_set(), "protocol"),
    ];
    set.iter()
        .find(|(present, _)| *present)
        .map_or("other", |(_, kind)| kind)
}

/// Runs inline on the client's dispatch path, so a terminal event is recorded before the
/// client's run loop can end (the watcher then knows the end was expected). It only flips
/// flags and casts to the session actor; slow work (replies) goes to its own task.
pub(super) struct InlineHandler {
    pub(super) shared: Arc<Shared>,
    pub(super) client: Arc<OnceLock<Weak<Client>>>,
}

impl EventHandler for InlineHandler {
    fn handle_event(&self, event: Arc<Event>) {
        // Botvisor's code: what it makes (events, records' strings) may outlive the
        // session, so it comes from the process's heap, not the session's.
        if let Some(client) = self.client.get().and_then(Weak::upgrade) {
            crate::session_heap::outside(|| self.shared.on_event(&event, &client));
        }
    }
}
