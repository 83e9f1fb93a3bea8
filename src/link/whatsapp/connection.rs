//! One session's live client, as the supervisor holds it: send, log out, close.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use whatsapp_rust::prelude::*;

use botvisor_actors::{
    BoxFuture, ChatPresence, Connection as LinkConnection, Done, Fetched, LinkError, MessageRef,
    NumberCheck, Outgoing, Profile,
};

use super::events::Shared;
use super::tasks::SessionTasks;
use super::{DISCONNECT_WAIT, RUN_LOOP_WAIT};

/// One session's live WhatsApp client.
pub struct WhatsAppConnection {
    pub(super) client: Arc<Client>,
    pub(super) shared: Arc<Shared>,
    pub(super) watcher: JoinHandle<()>,
    pub(super) manager: Option<JoinHandle<()>>,
    /// Every task whatsapp-rust spawned for this client.
    pub(super) tasks: SessionTasks,
    /// Counts this session among the link's running ones while it lives.
    pub(super) _running: super::Running,
}

impl WhatsAppConnection {
    /// Ends everything that holds the client but this connection's own reference:
    /// botvisor's pairing manager and watcher (it owns the `BotHandle`) and every task
    /// the client spawned. Once the connection is dropped, the client and its store
    /// (with its descriptors) go with it.
    fn end_tasks(&mut self) {
        self.shared.closing.store(true, Ordering::SeqCst);
        if let Some(m) = self.manager.take() {
            m.abort();
        }
        // Wakes whatever waits on the client's shutdown (keepalive, reconnect waits)
        // when no disconnect ran (a kill, a crash, a close that timed out).
        self.client.signal_shutdown_sync();
        self.tasks.abort_all();
        self.watcher.abort();
        release_freed_memory_soon();
    }
}

/// Gives the memory of stopped sessions back to the system. glibc keeps freed memory in
/// its arenas for reuse and returns it only when the top of an arena is free, so after a
/// mass stop most of what the sessions used stayed in the process (measured with
/// `wa-footprint`, BENCHMARKS.md). A stop asks for a `malloc_trim` on the blocking pool,
/// at most one per second however many sessions stop together.
fn release_freed_memory_soon() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::sync::atomic::AtomicBool;
        static PENDING: AtomicBool = AtomicBool::new(false);
        if PENDING.swap(true, Ordering::SeqCst) {
            return; // a trim is already due
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            PENDING.store(false, Ordering::SeqCst);
            return;
        };
        runtime.spawn(async {
            // Aborted tasks drop their part of the client at their next poll: wait for
            // them, and for the rest of a mass stop.
            tokio::time::sleep(Duration::from_secs(1)).await;
            PENDING.store(false, Ordering::SeqCst);
            trim().await;
            // Then once more after tokio's idle blocking threads have exited (10 s idle):
            // each gives its thread cache of freed chunks back to the arena only then.
            tokio::time::sleep(Duration::from_secs(12)).await;
            trim().await;
        });
    }
}

/// Gives back, every 30 s while sessions run, what idle key stores freed. A store idle
/// for 30 s closes its SQLite connection (vendor/r2d2, patch 3), and its page cache and
/// schema go back to glibc's arenas, whose pages stay resident among the live client's
/// until trimmed (measured with `wa-footprint`: 1,000 paired idle sessions, 281 KiB each
/// before a trim, 248 after). Started once per link, from `connect` (session code): the
/// task lives as long as the process, so it is made outside the session heap.
pub(super) fn trim_while_running(running: std::sync::Arc<std::sync::atomic::AtomicU64>) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    crate::session_heap::outside(|| {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(30));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            every.tick().await;
            loop {
                every.tick().await;
                if running.load(Ordering::SeqCst) > 0 {
                    let began = std::time::Instant::now();
                    trim().await;
                    tracing::debug!(took = ?began.elapsed(), "malloc_trim while sessions run");
                }
            }
        });
    });
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = running;
}

/// `malloc_trim(0)` on the blocking pool.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
async fn trim() {
    let _ = tokio::task::spawn_blocking(|| {
        crate::session_heap::purge();
        // SAFETY: malloc_trim only walks glibc's own arenas; it is thread-safe.
        unsafe { libc::malloc_trim(0) }
    })
    .await;
}

/// `future` as session code: what it allocates comes from the session heap
/// (`crate::session_heap`).
fn zoned<'a, T>(future: impl std::future::Future<Output = T> + Send + 'a) -> BoxFuture<'a, T> {
    Box::pin(crate::session_heap::within(future))
}

/// A JID of the API's (already checked by the HTTP layer).
fn jid_of(s: &str) -> Result<Jid, LinkError> {
    s.parse::<Jid>()
        .map_err(|e| LinkError::new(format!("not a JID: {s}: {e}")))
}

/// A group as whatsapp-rust describes it, as botvisor does.
fn group_info(g: whatsapp_rust::GroupMetadata) -> botvisor_actors::GroupInfo {
    use whatsapp_rust::ParticipantType;
    botvisor_actors::GroupInfo {
        id: g.id.to_string(),
        subject: g.subject,
        description: g.description,
        owner: g.creator_pn.or(g.creator).map(|j| j.to_string()),
        created_at_ms: g.creation_time.map(|s| s.saturating_mul(1000)),
        participants: g
            .participants
            .into_iter()
            .map(|p| botvisor_actors::GroupMember {
                admin: p.is_admin(),
                super_admin: p.participant_type == ParticipantType::SuperAdmin,
                jid: p.phone_number.unwrap_or(p.jid).to_string(),
            })
            .collect(),
    }
}

async fn group_op(client: &Arc<Client>, op: botvisor_actors::GroupOp) -> Result<Done, LinkError> {
    use botvisor_actors::{GroupOp, ParticipantAction, ParticipantChange};
    // WhatsApp's own refusals (404 item-not-found; 401/403 not-authorized) are the
    // caller's to know; the rest is the network failing.
    let refused = |e: whatsapp_rust::GroupError| {
        use botvisor_actors::Refusal;
        let message = format!("WhatsApp refused: {e}");
        match &e {
            whatsapp_rust::GroupError::Iq(whatsapp_rust::IqError::ServerError { code, .. }) => {
                match code {
                    404 | 406 => LinkError::refused(Refusal::NotFound, message),
                    401 | 403 => LinkError::refused(Refusal::NotAllowed, message),
                    _ => LinkError::new(message),
                }
            }
            _ => LinkError::new(message),
        }
    };
    let groups = client.groups();
    match op {
        GroupOp::List => {
            let all = groups
                .get_participating()
                .await
                .map_err(refused)?
                .into_values()
                .map(group_info)
                .collect();
            Ok(Done::Groups(all))
        }
        GroupOp::Create {
            subject,
            participants,
        } => {
            let mut options = whatsapp_rust::GroupCreateOptions::new(subject);
            for p in &participants {
                options = options
                    .with_participant(whatsapp_rust::GroupParticipantOptions::new(jid_of(p)?));
            }
            let made = groups.create_group(options).await.map_err(refused)?;
            Ok(Done::Groups(vec![group_info(made.metadata)]))
        }
        GroupOp::Info { group } => {
            let g = groups
                .get_metadata(&jid_of(&group)?)
                .await
                .map_err(refused)?;
            Ok(Done::Groups(vec![group_info(g)]))
        }
        GroupOp::Update {
            group,
            subject,
            description,
        } => {
            let jid = jid_of(&group)?;
            if let Some(s) = subject {
                let s = whatsapp_rust::GroupSubject::new(s)
                    .map_err(|e| LinkError::new(e.to_string()))?;
                groups.set_subject(jid.clone(), s).await.map_err(refused)?;
            }
            if let Some(d) = description {
                let d = d
                    .map(whatsapp_rust::GroupDescription::new)
                    .transpose()
                    .map_err(|e| LinkError::new(e.to_string()))?;
                groups
                    .set_description(jid, d, whatsapp_rust::PreviousDescription::Resolve)
                    .await
                    .map_err(refused)?;
            }
            Ok(Done::Taken)
        }
        GroupOp::Participants {
            group,
            action,
            participants,
        } => {
            let jid = jid_of(&group)?;
            let people = participants
                .iter()
                .map(|p| jid_of(p))
                .collect::<Result<Vec<_>, _>>()?;
            let answers = match action {
                ParticipantAction::Add => groups.add_participants(jid, &people).await,
                ParticipantAction::Remove => groups.remove_participants(jid, &people).await,
                ParticipantAction::Promote => groups.promote_participants(jid, &people).await,
                ParticipantAction::Demote => groups.demote_participants(jid, &people).await,
            }
            .map_err(refused)?;
            Ok(Done::Participants(
                answers
                    .into_iter()
                    .map(|a| ParticipantChange {
                        error: (!a.is_ok())
                            .then(|| a.error.clone().or(a.status.clone()).unwrap_or_default()),
                        jid: a.phone_number.unwrap_or(a.jid).to_string(),
                    })
                    .collect(),
            ))
        }
        GroupOp::Invite { group, reset } => {
            let link = groups
                .get_invite_link(jid_of(&group)?, reset)
                .await
                .map_err(refused)?;
            let code = link.rsplit('/').next().unwrap_or(&link).to_string();
            Ok(Done::Invite(code))
        }
        GroupOp::Join { code } => {
            let joined = groups.join_with_invite_code(&code).await.map_err(refused)?;
            let id = joined.group_jid().clone();
            // A group that asks for approval shows nothing more until it is given.
            let info = match groups.get_metadata(&id).await {
                Ok(g) => group_info(g),
                Err(_) => botvisor_actors::GroupInfo {
                    id: id.to_string(),
                    ..Default::default()
                },
            };
            Ok(Done::Groups(vec![info]))
        }
        GroupOp::Leave { group } => {
            groups.leave(jid_of(&group)?).await.map_err(refused)?;
            Ok(Done::Taken)
        }
    }
}

impl Drop for WhatsAppConnection {
    /// A session killed (watchdog, kill deadline) or failed never gets `close`: the
    /// tasks are ended here, without the disconnect's flush.
    fn drop(&mut self) {
        self.end_tasks();
    }
}

/// A text quoting `reply_to` and mentioning `mentions` (a plain text without either).
fn text_message(
    client: &Client,
    text: &str,
    reply_to: Option<&MessageRef>,
    mentions: &[String],
) -> Result<wa::Message, LinkError> {
    if reply_to.is_none() && mentions.is_empty() {
        return Ok(wa::Message::text(text));
    }
    let context = reply_to.map(|quoted| quote(client, quoted)).transpose()?;
    let context = wa::ContextInfo {
        mentioned_jid: mentions.to_vec(),
        ..context.unwrap_or_default()
    };
    Ok(wa::Message::text_with_context(text, context))
}

/// Sends a message, under `message_id` when one is given (a queued send's: sent again
/// after a crash, it is the same message to WhatsApp).
fn deliver(
    client: Arc<Client>,
    to: Result<Jid, LinkError>,
    message: Result<wa::Message, LinkError>,
    message_id: Option<String>,
) -> BoxFuture<'static, Result<String, LinkError>> {
    zoned(async move {
        let options = match message_id {
            Some(id) => whatsapp_rust::SendOptions::default().with_message_id(id),
            None => whatsapp_rust::SendOptions::default(),
        };
        client
            .send_message_with_options(to?, message?, options)
            .await
            .map(|sent| sent.message_id)
            .map_err(|e| LinkError::new(format!("WhatsApp did not take the message: {e}")))
    })
}

/// A poll as WhatsApp's apps (and whatsapp-rust's `polls().create`) write it: version 3
/// for a single choice, 1 for several, with a fresh 32-byte secret (voters derive their
/// vote keys from it; whatsapp-rust keeps it with every message it sends, which is how a
/// vote is read later, `events::open_vote`). Built here so a queued poll goes out under
/// the id its 202 gave.
/// An encrypted media in an unnamed temporary file, read from any offset (an upload that
/// resumes starts where the media host stopped) without moving a shared file position.
struct EncryptedFile {
    file: Arc<std::fs::File>,
    len: u64,
}

impl EncryptedFile {
    fn new(file: std::fs::File, len: u64) -> EncryptedFile {
        EncryptedFile {
            file: Arc::new(file),
            len,
        }
    }
}

impl whatsapp_rust::wacore::upload::UploadSource for EncryptedFile {
    fn len(&self) -> u64 {
        self.len
    }

    fn reader_from(&self, offset: u64) -> std::io::Result<Box<dyn std::io::Read + Send>> {
        Ok(Box::new(botvisor_actors::FileReader::new(
            Arc::clone(&self.file),
            offset,
        )))
    }
}

/// Uploads a media (encrypted by whatsapp-rust to WhatsApp's media servers, from the
/// media connection WhatsApp hands out) and builds its message.
async fn upload_media(
    client: &Arc<Client>,
    media: &botvisor_actors::Media,
    context: Option<wa::ContextInfo>,
) -> Result<wa::Message, LinkError> {
    use botvisor_actors::MediaKind;
    use whatsapp_rust::download::MediaType;
    use whatsapp_rust::media as build;
    let plain = media
        .reader()
        .ok_or_else(|| LinkError::new("the media was not fetched before the send (a bug)"))?;
    let media_type = match media.kind {
        MediaKind::Image => MediaType::Image,
        MediaKind::Video => MediaType::Video,
        MediaKind::Audio => MediaType::Audio,
        MediaKind::Document => MediaType::Document,
        MediaKind::Sticker => MediaType::Sticker,
    };
    // Encrypted into an unnamed temporary file as it is read (from the file it was
    // streamed into, or from the bytes of a JSON body, not copied), then streamed from it
    // to the media host: the ciphertext is never in memory.
    let (encrypted, info) = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut file = tempfile::tempfile()?;
        let mut out = std::io::BufWriter::new(&mut file);
        let info = whatsapp_rust::wacore::upload::encrypt_media_streaming(
            std::io::BufReader::new(plain),
            &mut out,
            media_type,
        )
        .map_err(std::io::Error::other)?;
        out.flush()?;
        drop(out);
        let len = file.metadata()?.len();
        Ok::<_, std::io::Error>((EncryptedFile::new(file, len), info))
    })
    .await
    .map_err(|e| LinkError::new(format!("the media encryption stopped: {e}")))?
    .map_err(|e| LinkError::new(format!("cannot encrypt the media: {e}")))?;
    let upload = client
        .upload_stream(encrypted, info, media_type)
        .await
        .map_err(|e| LinkError::new(format!("the media upload failed: {e:#}")))?;
    let context = context.map(Box::new);
    let mimetype = Some(media.mimetype.clone());
    Ok(match media.kind {
        MediaKind::Image => build::image_message(
            upload,
            build::ImageOptions {
                caption: media.caption.clone(),
                mimetype,
                context_info: context,
                ..Default::default()
            },
        ),
        MediaKind::Video => build::video_message(
            upload,
            build::VideoOptions {
                caption: media.caption.clone(),
                mimetype,
                context_info: context,
                ..Default::default()
            },
        ),
        MediaKind::Audio => build::audio_message(
            upload,
            build::AudioOptions {
                mimetype,
                ptt: Some(media.voice),
                context_info: context,
                ..Default::default()
            },
        ),
        MediaKind::Document => build::document_message(
            upload,
            build::DocumentOptions {
                mimetype,
                file_name: media.file_name.clone(),
                title: media.file_name.clone(),
                caption: media.caption.clone(),
                context_info: context,
                ..Default::default()
            },
        ),
        MediaKind::Sticker => wa::Message {
            sticker_message: whatsapp_rust::buffa::MessageField::some(
                wa::message::StickerMessage {
                    url: Some(upload.url),
                    direct_path: Some(upload.direct_path),
                    media_key: Some(upload.media_key.to_vec()),
                    file_sha256: Some(upload.file_sha256.to_vec()),
                    file_enc_sha256: Some(upload.file_enc_sha256.to_vec()),
                    file_length: Some(upload.file_length),
                    media_key_timestamp: Some(upload.media_key_timestamp),
                    mimetype,
                    context_info: context
                        .map_or_else(whatsapp_rust::buffa::MessageField::none, |c| {
                            whatsapp_rust::buffa::MessageField::some(*c)
                        }),
                    ..Default::default()
                },
            ),
            ..Default::default()
        },
    })
}

fn poll_message(poll: &botvisor_actors::Poll) -> Result<wa::Message, LinkError> {
    use whatsapp_rust::buffa::MessageField;
    let mut secret = vec![0u8; 32];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut secret)
        .map_err(|_| LinkError::new("no randomness for the poll's secret"))?;
    let creation = wa::message::PollCreationMessage {
        name: Some(poll.question.clone()),
        options: poll
            .options
            .iter()
            .map(|name| wa::message::poll_creation_message::Option {
                option_name: Some(name.clone()),
                option_hash: None,
            })
            .collect(),
        selectable_options_count: Some(poll.selectable),
        poll_content_type: Some(wa::message::PollContentType::TEXT),
        ..Default::default()
    };
    let mut message = if poll.selectable == 1 {
        wa::Message {
            poll_creation_message_v3: MessageField::some(creation),
            ..Default::default()
        }
    } else {
        wa::Message {
            poll_creation_message: MessageField::some(creation),
            ..Default::default()
        }
    };
    message.message_context_info = MessageField::some(wa::MessageContextInfo {
        message_secret: Some(secret),
        ..Default::default()
    });
    Ok(message)
}

/// A contact card as WhatsApp's apps write it: vCard 3.0 with the number's WhatsApp id.
fn vcard(name: &str, phone: &str) -> String {
    // vCard text values escape backslashes, commas, semicolons and newlines.
    let name: String = name
        .chars()
        .flat_map(|c| match c {
            '\\' | ',' | ';' => vec!['\\', c],
            '\n' => vec!['\\', 'n'],
            '\r' => vec![],
            c => vec![c],
        })
        .collect();
    format!(
        "BEGIN:VCARD\nVERSION:3.0\nFN:{name}\nTEL;type=CELL;type=VOICE;waid={phone}:+{phone}\nEND:VCARD"
    )
}

/// `15551234567` → its user JID; a full JID is taken as it is.
fn recipient(to: &str) -> Result<Jid, LinkError> {
    crate::link::chat_jid(to)
        .parse::<Jid>()
        .map_err(|e| LinkError::new(format!("'{to}' is not a WhatsApp recipient: {e}")))
}

/// The context of a reply: the quoted message's id and author (the session itself, the
/// other side of a one-to-one chat, or the group member who wrote it). botvisor keeps no
/// message bodies, so the quote carries no copy of the quoted text.
fn quote(client: &Client, quoted: &MessageRef) -> Result<wa::ContextInfo, LinkError> {
    let author = match (&quoted.author, quoted.from_me) {
        (Some(author), _) => author.clone(),
        (None, true) => client
            .pn()
            .map(|j| j.to_non_ad().to_string())
            .ok_or_else(|| LinkError::new("the session is not logged in"))?,
        (None, false) => quoted.chat.clone(),
    };
    Ok(wa::ContextInfo {
        stanza_id: Some(quoted.id.clone()),
        participant: Some(author),
        ..Default::default()
    })
}

impl LinkConnection for WhatsAppConnection {
    fn send_text(
        &self,
        to: &str,
        text: &str,
        reply_to: Option<&MessageRef>,
    ) -> BoxFuture<'static, Result<String, LinkError>> {
        let message = text_message(&self.client, text, reply_to, &[]);
        deliver(self.client.clone(), recipient(to), message, None)
    }

    fn send(
        &self,
        to: &str,
        content: &Outgoing,
        reply_to: Option<&MessageRef>,
        mentions: &[String],
        message_id: Option<&str>,
    ) -> BoxFuture<'static, Result<String, LinkError>> {
        use whatsapp_rust::buffa::MessageField;
        let client = self.client.clone();
        let to = recipient(to);
        let context = reply_to.map(|quoted| quote(&client, quoted)).transpose();
        let message = context.map(|context| {
            let context = context.map_or_else(MessageField::none, MessageField::some);
            match content {
                Outgoing::Text(_) | Outgoing::Poll(_) | Outgoing::Media(_) => None,
                Outgoing::Location(l) => Some(wa::Message {
                    location_message: MessageField::some(wa::message::LocationMessage {
                        degrees_latitude: Some(l.latitude),
                        degrees_longitude: Some(l.longitude),
                        name: l.name.clone(),
                        address: l.address.clone(),
                        context_info: context,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                Outgoing::Contact(c) => Some(wa::Message {
                    contact_message: MessageField::some(wa::message::ContactMessage {
                        display_name: Some(c.name.clone()),
                        vcard: Some(vcard(&c.name, &c.phone)),
                        context_info: context,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
            }
        });
        let message_id = message_id.map(str::to_string);
        match (content, message) {
            (Outgoing::Text(text), _) => {
                let message = text_message(&client, text, reply_to, mentions);
                deliver(client, to, message, message_id)
            }
            (Outgoing::Poll(_), _) if reply_to.is_some() => {
                Box::pin(async { Err(LinkError::new("a poll cannot be sent as a reply")) })
            }
            (Outgoing::Poll(poll), _) => deliver(client, to, poll_message(poll), message_id),
            (Outgoing::Media(media), Ok(_)) => {
                let media = media.clone();
                let context = reply_to
                    .map(|quoted| quote(&client, quoted))
                    .transpose()
                    .ok()
                    .flatten();
                zoned(async move {
                    let message = upload_media(&client, &media, context).await?;
                    deliver(client, to, Ok(message), message_id).await
                })
            }
            (_, message) => {
                let message = message.map(|m| m.expect("a location or a contact"));
                deliver(client, to, message, message_id)
            }
        }
    }

    fn react(
        &self,
        message: &MessageRef,
        emoji: &str,
    ) -> BoxFuture<'static, Result<String, LinkError>> {
        let client = self.client.clone();
        let chat = recipient(&message.chat);
        let key = wa::MessageKey {
            remote_jid: Some(message.chat.clone()),
            from_me: Some(message.from_me),
            id: Some(message.id.clone()),
            participant: message.author.clone(),
        };
        let emoji = emoji.to_string();
        zoned(async move {
            client
                .send_reaction(chat?, key, &emoji)
                .await
                .map(|sent| sent.message_id)
                .map_err(|e| LinkError::new(format!("WhatsApp did not take the reaction: {e}")))
        })
    }

    fn edit(
        &self,
        message: &MessageRef,
        text: &str,
    ) -> BoxFuture<'static, Result<String, LinkError>> {
        let client = self.client.clone();
        let chat = recipient(&message.chat);
        let (id, text) = (message.id.clone(), text.to_string());
        zoned(async move {
            client
                .edit_message(chat?, id, wa::Message::text(text))
                .await
                .map_err(|e| LinkError::new(format!("WhatsApp did not take the edit: {e}")))
        })
    }

    fn revoke(&self, message: &MessageRef) -> BoxFuture<'static, Result<(), LinkError>> {
        let client = self.client.clone();
        let chat = recipient(&message.chat);
        let id = message.id.clone();
        zoned(async move {
            client
                .revoke_message(chat?, id, whatsapp_rust::RevokeType::Sender)
                .await
                .map_err(|e| LinkError::new(format!("WhatsApp did not take the revoke: {e}")))
        })
    }

    /// Groups through whatsapp-rust's `groups()` (WhatsApp's `w:g2` IQs).
    fn group(&self, op: botvisor_actors::GroupOp) -> BoxFuture<'static, Result<Done, LinkError>> {
        let client = self.client.clone();
        zoned(async move { group_op(&client, op).await })
    }

    /// A received media's bytes: fetched from WhatsApp's media servers (through the
    /// session's proxy when it has one) and decrypted by whatsapp-rust, which checks
    /// both hashes.
    /// Downloaded and decrypted (and its hashes checked) by whatsapp-rust into an
    /// unnamed temporary file, never whole in memory.
    fn download(&self, locator: &str) -> BoxFuture<'static, Result<Fetched, LinkError>> {
        let client = self.client.clone();
        let locator = super::locator::Locator::parse(locator);
        zoned(async move {
            let locator = locator.map_err(LinkError::new)?;
            let file = tempfile::tempfile()
                .map_err(|e| LinkError::new(format!("no temporary file for the media: {e}")))?;
            let file = client
                .download_to_writer(&locator, file)
                .await
                .map_err(|e| LinkError::new(format!("the media download failed: {e:#}")))?;
            let len = file
                .metadata()
                .map_err(|e| LinkError::new(format!("the downloaded media: {e}")))?
                .len();
            Ok(Fetched::File {
                file: Arc::new(file),
                len,
            })
        })
    }

    /// A usync contact query (`contacts().is_on_whatsapp`); the LIDs WhatsApp gives
    /// are kept by the client as LID-PN mappings.
    fn check_numbers(
        &self,
        phones: &[String],
    ) -> BoxFuture<'static, Result<Vec<NumberCheck>, LinkError>> {
        let client = self.client.clone();
        let phones = phones.to_vec();
        zoned(async move {
            let jids: Vec<Jid> = phones.iter().map(|p| Jid::pn(p.as_str())).collect();
            let answers =
                client.contacts().is_on_whatsapp(&jids).await.map_err(|e| {
                    LinkError::new(format!("WhatsApp did not answer the check: {e}"))
                })?;
            Ok(phones
                .into_iter()
                .map(|phone| {
                    let found = answers.iter().find(|a| {
                        a.jid.user == phone || a.pn_jid.as_ref().is_some_and(|p| p.user == phone)
                    });
                    let on_whatsapp = found.is_some_and(|a| a.is_registered);
                    NumberCheck {
                        jid: on_whatsapp.then(|| format!("{phone}@s.whatsapp.net")),
                        lid: found
                            .filter(|_| on_whatsapp)
                            .and_then(|a| a.lid.as_ref().or(a.jid.is_lid().then_some(&a.jid)))
                            .map(|l| l.to_non_ad().to_string()),
                        on_whatsapp,
                        phone,
                    }
                })
                .collect())
        })
    }

    /// A usync user-info query (LID, "about", picture id, business) and the picture's
    /// URL (`w:profile:picture`); what the contact's privacy settings hide is `None`.
    fn profile(&self, contact: &str) -> BoxFuture<'static, Result<Profile, LinkError>> {
        let client = self.client.clone();
        let jid = recipient(contact);
        zoned(async move {
            let jid = jid?.to_non_ad();
            let failed = |e: whatsapp_rust::ContactError| {
                LinkError::new(format!("WhatsApp did not answer the profile query: {e}"))
            };
            let info = client
                .contacts()
                .get_user_info(std::slice::from_ref(&jid))
                .await
                .map_err(failed)?;
            let info = info.get(&jid).or_else(|| info.values().next()).cloned();
            let picture = client
                .contacts()
                .get_profile_picture(&jid, false)
                .await
                .map_err(failed)?;
            let lid = info
                .as_ref()
                .and_then(|i| i.lid.clone())
                .or_else(|| jid.is_lid().then(|| jid.clone()));
            Ok(Profile {
                jid: jid.to_string(),
                lid: lid.map(|l| l.to_non_ad().to_string()),
                about: info
                    .as_ref()
                    .and_then(|i| i.status.clone())
                    .filter(|s| !s.is_empty()),
                picture_id: picture
                    .as_ref()
                    .map(|p| p.id.clone())
                    .or_else(|| info.as_ref().and_then(|i| i.picture_id.clone())),
                picture_url: picture.map(|p| p.url),
                business: info.is_some_and(|i| i.is_business),
            })
        })
    }

    fn mark_read(
        &self,
        chat: &str,
        sender: Option<&str>,
        message_ids: &[String],
    ) -> BoxFuture<'static, Result<(), LinkError>> {
        let client = self.client.clone();
        let (chat, sender) = (recipient(chat), sender.map(recipient));
        let ids = message_ids.to_vec();
        zoned(async move {
            let chat = chat?;
            let sender = sender.transpose()?;
            let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
            client
                .mark_as_read(&chat, sender.as_ref(), &ids)
                .await
                .map_err(|e| LinkError::new(format!("WhatsApp did not take the receipt: {e}")))
        })
    }

    fn chat_presence(
        &self,
        chat: &str,
        state: ChatPresence,
    ) -> BoxFuture<'static, Result<(), LinkError>> {
        use whatsapp_rust::features::ChatStateType;
        let client = self.client.clone();
        let chat = recipient(chat);
        zoned(async move {
            let state = match state {
                ChatPresence::Typing => ChatStateType::Composing,
                ChatPresence::Recording => ChatStateType::Recording,
                ChatPresence::Paused => ChatStateType::Paused,
            };
            client
                .chatstate()
                .send(&chat?, state)
                .await
                .map_err(|e| LinkError::new(format!("WhatsApp did not take the presence: {e}")))
        })
    }

    fn own_presence(&self, available: bool) -> BoxFuture<'static, Result<(), LinkError>> {
        let client = self.client.clone();
        zoned(async move {
            let presence = client.presence();
            let set = if available {
                presence.set_available().await
            } else {
                presence.set_unavailable().await
            };
            set.map_err(|e| LinkError::new(format!("WhatsApp did not take the presence: {e}")))
        })
    }

    fn logout(&mut self) -> BoxFuture<'_, Result<(), LinkError>> {
        zoned(async move {
            self.shared.closing.store(true, Ordering::SeqCst);
            if !self.shared.paired.load(Ordering::SeqCst) {
                self.client.disconnect().await;
                return Err(LinkError::new(
                    "the session was never paired, so there was no linked device to remove",
                ));
            }
            if !self.client.is_connected() {
                return Err(LinkError::new(
                    "not connected to WhatsApp, so the device could not be unlinked; \
                     remove it under Linked Devices on the phone",
                ));
            }
            self.client.logout().await;
            Ok(())
        })
    }

    /// Disconnects (the client flushes its receipts and device state, closes the socket
    /// and clears its connection state), waits for the run loop to end, then ends every
    /// task the client still has.
    fn close(&mut self) -> BoxFuture<'_, ()> {
        zoned(async move {
            self.shared.closing.store(true, Ordering::SeqCst);
            if let Some(m) = self.manager.take() {
                m.abort();
            }
            if tokio::time::timeout(DISCONNECT_WAIT, self.client.disconnect())
                .await
                .is_err()
            {
                tracing::warn!(user_id = %self.shared.user_id, "the WhatsApp client did not disconnect in time; its tasks are ended");
            }
            let _ = tokio::time::timeout(RUN_LOOP_WAIT, &mut self.watcher).await;
            self.end_tasks();
        })
    }
}
