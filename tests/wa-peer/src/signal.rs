//! The peer's second WhatsApp user: real Signal identities (wacore-libsignal), one per
//! device address the client asks about, with in-memory stores.
//!
//! - A device the client fetches pre-keys for gets an identity, a signed pre-key and a
//!   fresh one-time pre-key per fetch; the `<user>` bundle node is built with wacore's own
//!   `PreKeyBundleUserNode`, as WhatsApp's server would answer.
//! - What the client sends to such a device is decrypted with that device's stores
//!   (`pkmsg` on a new session, `msg` after), unpadded and decoded as a `wa::Message`.
//! - The peer sends the client a message from one of its users: on the session the
//!   client opened, or else on a new one from the pre-key bundle the client uploaded
//!   (`<iq xmlns="encrypt" type="set">`), which the client must decrypt with its own
//!   private pre-keys.

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use whatsapp_rust::buffa::Message as _;
use whatsapp_rust::wacore::iq::prekeys::PreKeyBundleUserNode;
use whatsapp_rust::wacore::libsignal::protocol::{
    create_sender_key_distribution_message, error::Result as SignalResult, group_decrypt,
    group_encrypt, message_decrypt, message_encrypt, process_prekey_bundle,
    process_sender_key_distribution_message, CiphertextMessage, Direction, GenericSignedPreKey,
    IdentityChange, IdentityKey, IdentityKeyPair, IdentityKeyStore, KeyPair, PreKeyBundle,
    PreKeyId, PreKeyRecord, PreKeySignalMessage, PreKeyStore, ProtocolAddress, PublicKey,
    SenderKeyDistributionMessage, SenderKeyName, SenderKeyRecord, SenderKeyStore, SessionRecord,
    SessionStore, SignalMessage, SignalProtocolError, SignedPreKeyId, SignedPreKeyRecord,
    SignedPreKeyStore, Timestamp, UsePQRatchet,
};
use whatsapp_rust::wacore::messages::{decode_plaintext, MessageUtils};
use whatsapp_rust::wacore::protocol::ProtocolNode;
use whatsapp_rust::wacore_binary::{Jid, Node};
use whatsapp_rust::waproto::whatsapp as wap;

struct Identities {
    pair: IdentityKeyPair,
    registration_id: u32,
    known: HashMap<ProtocolAddress, IdentityKey>,
}

#[async_trait]
impl IdentityKeyStore for Identities {
    async fn get_identity_key_pair(&self) -> SignalResult<IdentityKeyPair> {
        Ok(self.pair.clone())
    }
    async fn get_local_registration_id(&self) -> SignalResult<u32> {
        Ok(self.registration_id)
    }
    async fn save_identity(
        &mut self,
        address: &ProtocolAddress,
        identity: &IdentityKey,
    ) -> SignalResult<IdentityChange> {
        let changed = self.known.get(address).is_some_and(|k| k != identity);
        self.known.insert(address.clone(), *identity);
        Ok(IdentityChange::from_changed(changed))
    }
    async fn is_trusted_identity(
        &self,
        _: &ProtocolAddress,
        _: &IdentityKey,
        _: Direction,
    ) -> SignalResult<bool> {
        Ok(true) // trust on first use, as a phone does for a new contact
    }
    async fn get_identity(&self, address: &ProtocolAddress) -> SignalResult<Option<IdentityKey>> {
        Ok(self.known.get(address).copied())
    }
}

#[derive(Default)]
struct PreKeys(HashMap<PreKeyId, PreKeyRecord>);

#[async_trait]
impl PreKeyStore for PreKeys {
    async fn get_pre_key(&self, id: PreKeyId) -> SignalResult<PreKeyRecord> {
        self.0
            .get(&id)
            .cloned()
            .ok_or(SignalProtocolError::InvalidPreKeyId)
    }
    async fn save_pre_key(&mut self, id: PreKeyId, record: &PreKeyRecord) -> SignalResult<()> {
        self.0.insert(id, record.clone());
        Ok(())
    }
    async fn remove_pre_key(&mut self, id: PreKeyId) -> SignalResult<()> {
        self.0.remove(&id);
        Ok(())
    }
}

#[derive(Default)]
struct SignedPreKeys(HashMap<SignedPreKeyId, SignedPreKeyRecord>);

#[async_trait]
impl SignedPreKeyStore for SignedPreKeys {
    async fn get_signed_pre_key(&self, id: SignedPreKeyId) -> SignalResult<SignedPreKeyRecord> {
        self.0
            .get(&id)
            .cloned()
            .ok_or(SignalProtocolError::InvalidSignedPreKeyId)
    }
    async fn save_signed_pre_key(
        &mut self,
        id: SignedPreKeyId,
        record: &SignedPreKeyRecord,
    ) -> SignalResult<()> {
        self.0.insert(id, record.clone());
        Ok(())
    }
}

#[derive(Default)]
struct Sessions(HashMap<ProtocolAddress, SessionRecord>);

#[async_trait]
impl SessionStore for Sessions {
    async fn load_session(&self, address: &ProtocolAddress) -> SignalResult<Option<SessionRecord>> {
        Ok(self.0.get(address).cloned())
    }
    async fn has_session(&self, address: &ProtocolAddress) -> SignalResult<bool> {
        Ok(self.0.contains_key(address))
    }
    async fn store_session(
        &mut self,
        address: &ProtocolAddress,
        record: SessionRecord,
    ) -> SignalResult<()> {
        self.0.insert(address.clone(), record);
        Ok(())
    }
}

/// Sender keys (group messages): each sender's chain in each group, as this device knows
/// them (its own, and those distributed to it).
#[derive(Default)]
struct SenderKeys(HashMap<SenderKeyName, SenderKeyRecord>);

#[async_trait]
impl SenderKeyStore for SenderKeys {
    async fn store_sender_key(
        &mut self,
        name: &SenderKeyName,
        record: SenderKeyRecord,
    ) -> SignalResult<()> {
        self.0.insert(name.clone(), record);
        Ok(())
    }
    async fn load_sender_key(&self, name: &SenderKeyName) -> SignalResult<Option<SenderKeyRecord>> {
        Ok(self.0.get(name).cloned())
    }
}

/// One device of a simulated WhatsApp user, with its own Signal identity.
struct Device {
    identities: Identities,
    pre_keys: PreKeys,
    signed: SignedPreKeys,
    sessions: Sessions,
    signed_id: SignedPreKeyId,
    signed_pair: KeyPair,
    signed_signature: Vec<u8>,
    next_pre_key: u32,
    sender_keys: SenderKeys,
    /// `group|client device` for each client device this device gave its sender key for
    /// that group (WhatsApp distributes a sender key once per device).
    distributed: HashSet<String>,
}

impl Device {
    fn new() -> Device {
        let mut rng = rand::rng();
        let pair = IdentityKeyPair::generate(&mut rng);
        let signed_pair = KeyPair::generate(&mut rng);
        let signed_signature = pair
            .private_key()
            .calculate_signature(&signed_pair.public_key.serialize(), &mut rng)
            .expect("sign the signed pre-key")
            .to_vec();
        let signed_id: SignedPreKeyId = 1u32.into();
        let mut signed = SignedPreKeys::default();
        signed.0.insert(
            signed_id,
            SignedPreKeyRecord::new(
                signed_id,
                Timestamp::from_epoch_millis(0),
                &signed_pair,
                &signed_signature,
            ),
        );
        Device {
            identities: Identities {
                pair,
                registration_id: rand::random::<u32>() & 0x3FFF,
                known: HashMap::new(),
            },
            pre_keys: PreKeys::default(),
            signed,
            sessions: Sessions::default(),
            signed_id,
            signed_pair,
            signed_signature,
            next_pre_key: 1,
            sender_keys: SenderKeys::default(),
            distributed: HashSet::new(),
        }
    }

    /// A bundle with a fresh one-time pre-key, as the server hands out one per fetch.
    fn bundle(&mut self, device_id: u16) -> PreKeyBundle {
        let id: PreKeyId = self.next_pre_key.into();
        self.next_pre_key += 1;
        let pair = KeyPair::generate(&mut rand::rng());
        self.pre_keys.0.insert(id, PreKeyRecord::new(id, &pair));
        PreKeyBundle::new(
            self.identities.registration_id,
            u32::from(device_id).into(),
            Some((id, pair.public_key)),
            self.signed_id,
            self.signed_pair.public_key,
            self.signed_signature.clone(),
            *self.identities.pair.identity_key(),
        )
        .expect("a valid bundle")
    }
}

/// Keys a client uploaded (`<iq xmlns="encrypt" type="set">`): what a sender needs to open
/// a session with it.
#[derive(Clone)]
struct Uploaded {
    registration_id: u32,
    identity: [u8; 32],
    signed: (u32, [u8; 32], Vec<u8>),
    pre_keys: Vec<(u32, [u8; 32])>,
}

/// A media on the peer's media host: where it is and how to read it, as a message
/// points to it.
#[derive(Debug, Clone, PartialEq)]
pub struct Hosted {
    /// Where the host keeps it, encrypted.
    pub direct_path: String,
    /// The key it was encrypted with.
    pub media_key: [u8; 32],
    /// SHA-256 of the plain file.
    pub file_sha256: [u8; 32],
    /// SHA-256 of what the host keeps.
    pub file_enc_sha256: [u8; 32],
    /// Its size (bytes, plain).
    pub size: u64,
    /// Its MIME type.
    pub mimetype: String,
}

/// What the peer's user sends a client.
#[derive(Debug, Clone, PartialEq)]
pub enum Content {
    /// A text (`conversation`).
    Text(String),
    /// A location pin (a non-text kind).
    Location {
        /// Degrees north.
        latitude: f64,
        /// Degrees east.
        longitude: f64,
    },
    /// A text quoting another message (a reply).
    Reply {
        /// The text.
        text: String,
        /// The quoted message's id.
        quoted: String,
        /// Who wrote the quoted message (JID).
        author: String,
    },
    /// A text mentioning people (`extendedTextMessage` with `mentionedJid`).
    Mention {
        /// The text.
        text: String,
        /// Who it mentions (JIDs).
        jids: Vec<String>,
    },
    /// A new text for a message the peer's user sent (`protocolMessage` MESSAGE_EDIT).
    Edit {
        /// The message edited.
        target: String,
        /// Its new text.
        text: String,
    },
    /// The peer's user deletes one of its messages for everyone (`protocolMessage`
    /// REVOKE).
    Revoke {
        /// The message deleted.
        target: String,
    },
    /// A vote on a poll the client sent, encrypted with the poll's secret (see
    /// [`crate::Peer::vote`], which makes it).
    PollVote {
        /// The chat the poll is in, as the voter names it (the client's JID).
        chat: String,
        /// The poll's message id.
        poll_id: String,
        /// The encrypted vote (payload with its tag).
        enc_payload: Vec<u8>,
        /// Its IV.
        enc_iv: Vec<u8>,
    },
    /// A document, described as WhatsApp describes one (its bytes are not on any media
    /// host: the peer has none, so it cannot be downloaded).
    Document {
        /// Its file name.
        file_name: String,
        /// Its MIME type.
        mimetype: String,
        /// The text under it.
        caption: String,
        /// Its size (bytes).
        size: u64,
        /// SHA-256 of the plain file.
        sha256: [u8; 32],
    },
    /// An image on the peer's media host (see `Peer::upload_image`), as WhatsApp sends
    /// one.
    Image {
        /// Where it is and how to read it.
        media: Hosted,
        /// The text under it.
        caption: String,
    },
    /// A document on the peer's media host (see `Peer::upload_document`).
    HostedDocument {
        /// Where it is and how to read it.
        media: Hosted,
        /// Its file name.
        file_name: String,
    },
    /// A reaction to a message of the chat (`""` removes it).
    Reaction {
        /// The message reacted to.
        target: String,
        /// Whether the client wrote that message.
        target_from_client: bool,
        /// The emoji.
        emoji: String,
    },
}

impl Content {
    /// The protobuf message.
    pub fn message(&self) -> wap::Message {
        match self {
            Content::Text(text) => wap::Message {
                conversation: Some(text.clone()),
                ..Default::default()
            },
            Content::Location {
                latitude,
                longitude,
            } => wap::Message {
                location_message: whatsapp_rust::buffa::MessageField::some(
                    wap::message::LocationMessage {
                        degrees_latitude: Some(*latitude),
                        degrees_longitude: Some(*longitude),
                        ..Default::default()
                    },
                ),
                ..Default::default()
            },
            // The same fields under the same names in each kind's message.
            Content::Image { media: m, caption } => wap::Message {
                image_message: whatsapp_rust::buffa::MessageField::some(
                    wap::message::ImageMessage {
                        direct_path: Some(m.direct_path.clone()),
                        media_key: Some(m.media_key.to_vec()),
                        file_sha256: Some(m.file_sha256.to_vec()),
                        file_enc_sha256: Some(m.file_enc_sha256.to_vec()),
                        file_length: Some(m.size),
                        mimetype: Some(m.mimetype.clone()),
                        caption: Some(caption.clone()),
                        ..Default::default()
                    },
                ),
                ..Default::default()
            },
            Content::HostedDocument {
                media: m,
                file_name,
            } => wap::Message {
                document_message: whatsapp_rust::buffa::MessageField::some(
                    wap::message::DocumentMessage {
                        direct_path: Some(m.direct_path.clone()),
                        media_key: Some(m.media_key.to_vec()),
                        file_sha256: Some(m.file_sha256.to_vec()),
                        file_enc_sha256: Some(m.file_enc_sha256.to_vec()),
                        file_length: Some(m.size),
                        mimetype: Some(m.mimetype.clone()),
                        file_name: Some(file_name.clone()),
                        ..Default::default()
                    },
                ),
                ..Default::default()
            },
            Content::Document {
                file_name,
                mimetype,
                caption,
                size,
                sha256,
            } => wap::Message {
                document_message: whatsapp_rust::buffa::MessageField::some(
                    wap::message::DocumentMessage {
                        url: Some("https://mmg.whatsapp.net/peer-has-no-media-host".into()),
                        direct_path: Some("/peer-has-no-media-host".into()),
                        media_key: Some(vec![7; 32]),
                        file_enc_sha256: Some(vec![9; 32]),
                        file_sha256: Some(sha256.to_vec()),
                        file_length: Some(*size),
                        mimetype: Some(mimetype.clone()),
                        file_name: Some(file_name.clone()),
                        caption: Some(caption.clone()),
                        ..Default::default()
                    },
                ),
                ..Default::default()
            },
            Content::Reply {
                text,
                quoted,
                author,
            } => extended_text(
                text,
                wap::ContextInfo {
                    stanza_id: Some(quoted.clone()),
                    participant: Some(author.clone()),
                    ..Default::default()
                },
            ),
            Content::Mention { text, jids } => extended_text(
                text,
                wap::ContextInfo {
                    mentioned_jid: jids.clone(),
                    ..Default::default()
                },
            ),
            Content::Edit { target, text } => protocol(
                target,
                wap::message::protocol_message::Type::MessageEdit,
                Some(wap::Message {
                    conversation: Some(text.clone()),
                    ..Default::default()
                }),
            ),
            Content::Revoke { target } => {
                protocol(target, wap::message::protocol_message::Type::Revoke, None)
            }
            Content::PollVote {
                chat,
                poll_id,
                enc_payload,
                enc_iv,
            } => wap::Message {
                poll_update_message: whatsapp_rust::buffa::MessageField::some(
                    wap::message::PollUpdateMessage {
                        poll_creation_message_key: whatsapp_rust::buffa::MessageField::some(
                            wap::MessageKey {
                                remote_jid: Some(chat.clone()),
                                from_me: Some(false),
                                id: Some(poll_id.clone()),
                                participant: None,
                            },
                        ),
                        vote: whatsapp_rust::buffa::MessageField::some(
                            wap::message::PollEncValue {
                                enc_payload: Some(enc_payload.clone()),
                                enc_iv: Some(enc_iv.clone()),
                            },
                        ),
                        sender_timestamp_ms: Some(1_700_000_000_000),
                        ..Default::default()
                    },
                ),
                ..Default::default()
            },
            Content::Reaction {
                target,
                target_from_client,
                emoji,
            } => wap::Message {
                reaction_message: whatsapp_rust::buffa::MessageField::some(
                    wap::message::ReactionMessage {
                        key: whatsapp_rust::buffa::MessageField::some(wap::MessageKey {
                            id: Some(target.clone()),
                            from_me: Some(!*target_from_client),
                            ..Default::default()
                        }),
                        text: Some(emoji.clone()),
                        sender_timestamp_ms: Some(0),
                        ..Default::default()
                    },
                ),
                ..Default::default()
            },
        }
    }

    /// The stanza's `type`.
    pub fn stanza_type(&self) -> &'static str {
        match self {
            Content::Text(_)
            | Content::Reply { .. }
            | Content::Mention { .. }
            | Content::Edit { .. } => "text",
            Content::Revoke { .. } => "text",
            Content::PollVote { .. } => "poll",
            Content::Location { .. }
            | Content::Document { .. }
            | Content::HostedDocument { .. }
            | Content::Image { .. } => "media",
            Content::Reaction { .. } => "reaction",
        }
    }

    /// The `<enc mediatype>`, for media kinds.
    pub fn media_type(&self) -> Option<&'static str> {
        match self {
            Content::Text(_)
            | Content::Reply { .. }
            | Content::Mention { .. }
            | Content::Reaction { .. }
            | Content::Edit { .. }
            | Content::Revoke { .. }
            | Content::PollVote { .. } => None,
            Content::Location { .. } => Some("location"),
            Content::Document { .. } | Content::HostedDocument { .. } => Some("document"),
            Content::Image { .. } => Some("image"),
        }
    }
}

/// A protocol message about one of the peer's user's own messages (an edit, a revoke).
fn protocol(
    target: &str,
    kind: wap::message::protocol_message::Type,
    edited: Option<wap::Message>,
) -> wap::Message {
    wap::Message {
        protocol_message: whatsapp_rust::buffa::MessageField::some(wap::message::ProtocolMessage {
            key: whatsapp_rust::buffa::MessageField::some(wap::MessageKey {
                id: Some(target.to_string()),
                from_me: Some(true),
                ..Default::default()
            }),
            r#type: Some(kind),
            edited_message: edited.map_or_else(
                whatsapp_rust::buffa::MessageField::none,
                whatsapp_rust::buffa::MessageField::some,
            ),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A text with a context (a quote, mentions).
fn extended_text(text: &str, context: wap::ContextInfo) -> wap::Message {
    wap::Message {
        extended_text_message: whatsapp_rust::buffa::MessageField::some(
            wap::message::ExtendedTextMessage {
                text: Some(text.to_string()),
                context_info: whatsapp_rust::buffa::MessageField::some(context),
                ..Default::default()
            },
        ),
        ..Default::default()
    }
}

/// A message the peer decrypted.
#[derive(Debug, Clone, PartialEq)]
pub struct Decrypted {
    /// The device it was encrypted for (`15557654321:0@s.whatsapp.net`).
    pub to: String,
    /// The stanza's id.
    pub id: String,
    /// `pkmsg` or `msg`.
    pub kind: String,
    /// The text, if the message carried one (a `DeviceSentMessage` for the sender's own
    /// devices is unwrapped).
    pub text: Option<String>,
    /// What the message does to another one, when it does: `reaction 👍 to ID`,
    /// `revoke ID`, `edit ID: TEXT`, `reply to ID by JID`.
    pub about: Option<String>,
}

/// What a decrypted message says.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plain {
    /// Its text.
    pub text: Option<String>,
    /// See [`Decrypted::about`].
    pub about: Option<String>,
    /// The media it points to, when it is an image, video, audio, document or sticker.
    pub media: Option<MediaRef>,
    /// The sender key it distributes (`SenderKeyDistributionMessage` bytes), when it is
    /// the pairwise part of a group message.
    pub skdm: Option<Vec<u8>>,
    /// A poll's secret (`messageContextInfo.messageSecret`), when it is a poll: what a
    /// vote on it is encrypted with.
    pub poll_secret: Option<Vec<u8>>,
}

/// Where a media message's bytes are and how to read them.
#[derive(Debug, Clone, PartialEq)]
pub struct MediaRef {
    /// `image`, `video`, `audio`, `voice` (an audio with `ptt`), `document`, `sticker`.
    pub kind: &'static str,
    /// The path on the media host.
    pub direct_path: String,
    /// The key the bytes were encrypted with.
    pub media_key: Vec<u8>,
    /// As the sender said.
    pub mimetype: String,
    /// The caption, when it has one.
    pub caption: Option<String>,
    /// A document's file name.
    pub file_name: Option<String>,
}

impl MediaRef {
    /// How the media host's bytes are decrypted (the HKDF info of the kind).
    pub fn media_type(&self) -> whatsapp_rust::wacore::download::MediaType {
        use whatsapp_rust::wacore::download::MediaType;
        match self.kind {
            "image" => MediaType::Image,
            "video" => MediaType::Video,
            "audio" | "voice" => MediaType::Audio,
            "sticker" => MediaType::Sticker,
            _ => MediaType::Document,
        }
    }
}

/// The media of a message (unwrapping a `DeviceSentMessage`).
fn media_of(m: &wap::Message) -> Option<MediaRef> {
    let media = |kind, path: &Option<String>, key: &Option<Vec<u8>>, mime: &Option<String>| {
        Some(MediaRef {
            kind,
            direct_path: path.clone()?,
            media_key: key.clone()?,
            mimetype: mime.clone().unwrap_or_default(),
            caption: None,
            file_name: None,
        })
    };
    if let Some(i) = m.image_message.as_option() {
        let mut r = media("image", &i.direct_path, &i.media_key, &i.mimetype)?;
        r.caption = i.caption.clone();
        return Some(r);
    }
    if let Some(v) = m.video_message.as_option() {
        let mut r = media("video", &v.direct_path, &v.media_key, &v.mimetype)?;
        r.caption = v.caption.clone();
        return Some(r);
    }
    if let Some(a) = m.audio_message.as_option() {
        let kind = if a.ptt == Some(true) {
            "voice"
        } else {
            "audio"
        };
        return media(kind, &a.direct_path, &a.media_key, &a.mimetype);
    }
    if let Some(d) = m.document_message.as_option() {
        let mut r = media("document", &d.direct_path, &d.media_key, &d.mimetype)?;
        r.caption = d.caption.clone();
        r.file_name = d.file_name.clone();
        return Some(r);
    }
    if let Some(s) = m.sticker_message.as_option() {
        return media("sticker", &s.direct_path, &s.media_key, &s.mimetype);
    }
    m.device_sent_message
        .as_option()
        .and_then(|d| d.message.as_option())
        .and_then(media_of)
}

/// Every Signal identity the peer plays, and what clients uploaded.
#[derive(Default)]
pub struct SignalPeer {
    devices: HashMap<String, Device>,
    uploads: HashMap<String, Uploaded>,
}

fn key32(bytes: Option<&[u8]>) -> Option<[u8; 32]> {
    bytes?.try_into().ok()
}

fn id3(bytes: Option<&[u8]>) -> Option<u32> {
    match bytes? {
        [a, b, c] => Some(u32::from_be_bytes([0, *a, *b, *c])),
        _ => None,
    }
}

/// The key a device is stored under: `user:device` (one identity per device address).
/// One device of one account: a LID the peer gave ([`crate::lid_of`]) names the same
/// account, identity and keys as its phone number.
fn device_key(jid: &Jid) -> String {
    let user = if jid.is_lid() {
        crate::phone_of_lid(&jid.user).unwrap_or(&jid.user)
    } else {
        &jid.user
    };
    format!("{user}:{}", jid.device)
}

/// The Signal address of a client or a peer user, as this peer names it.
fn address(jid: &Jid) -> ProtocolAddress {
    ProtocolAddress::new(&jid.user, u32::from(jid.device).into())
}

/// What a decrypted message says (its sender key aside).
fn plain_of(m: &wap::Message) -> Plain {
    Plain {
        text: text_of(m),
        about: about_of(m),
        media: media_of(m),
        skdm: None,
        poll_secret: None,
    }
}

/// The text of a message, unwrapping a `DeviceSentMessage`.
fn text_of(m: &wap::Message) -> Option<String> {
    if let Some(t) = &m.conversation {
        return Some(t.clone());
    }
    if let Some(t) = m
        .extended_text_message
        .as_option()
        .and_then(|e| e.text.clone())
    {
        return Some(t);
    }
    m.device_sent_message
        .as_option()
        .and_then(|d| d.message.as_option())
        .and_then(text_of)
}

/// What a message does to another one (see [`Decrypted::about`]), unwrapping a
/// `DeviceSentMessage`.
fn about_of(m: &wap::Message) -> Option<String> {
    use wap::message::protocol_message::Type;
    if let Some(l) = m.location_message.as_option() {
        return Some(format!(
            "location {},{} {}",
            l.degrees_latitude.unwrap_or_default(),
            l.degrees_longitude.unwrap_or_default(),
            l.name.clone().unwrap_or_default()
        ));
    }
    if let Some(c) = m.contact_message.as_option() {
        return Some(format!(
            "contact {} | {}",
            c.display_name.clone().unwrap_or_default(),
            c.vcard.clone().unwrap_or_default().replace('\n', " ")
        ));
    }
    let poll = m
        .poll_creation_message_v3
        .as_option()
        .or(m.poll_creation_message.as_option());
    if let Some(p) = poll {
        let options: Vec<String> = p
            .options
            .iter()
            .filter_map(|o| o.option_name.clone())
            .collect();
        return Some(format!(
            "poll {} [{}] pick {}",
            p.name.clone().unwrap_or_default(),
            options.join("|"),
            p.selectable_options_count.unwrap_or_default()
        ));
    }
    if let Some(r) = m.reaction_message.as_option() {
        let target = r
            .key
            .as_option()
            .and_then(|k| k.id.clone())
            .unwrap_or_default();
        return Some(format!(
            "reaction {} to {target}",
            r.text.clone().unwrap_or_default()
        ));
    }
    if let Some(p) = m.protocol_message.as_option() {
        let target = p
            .key
            .as_option()
            .and_then(|k| k.id.clone())
            .unwrap_or_default();
        match p.r#type {
            Some(Type::Revoke) => return Some(format!("revoke {target}")),
            Some(Type::MessageEdit) => {
                let text = p.edited_message.as_option().and_then(text_of);
                return Some(format!("edit {target}: {}", text.unwrap_or_default()));
            }
            _ => {}
        }
    }
    if let Some(c) = m
        .extended_text_message
        .as_option()
        .and_then(|e| e.context_info.as_option())
        .filter(|c| c.stanza_id.is_some() || !c.mentioned_jid.is_empty())
    {
        let mut about = Vec::new();
        if let Some(quoted) = &c.stanza_id {
            about.push(format!(
                "reply to {quoted} by {}",
                c.participant.clone().unwrap_or_default()
            ));
        }
        if !c.mentioned_jid.is_empty() {
            about.push(format!("mentions {}", c.mentioned_jid.join(",")));
        }
        return Some(about.join("; "));
    }
    m.device_sent_message
        .as_option()
        .and_then(|d| d.message.as_option())
        .and_then(about_of)
}

impl SignalPeer {
    /// The `<user>` node answering a pre-key fetch for `jid`.
    pub fn bundle_node(&mut self, jid: &Jid) -> Node {
        let device = self
            .devices
            .entry(device_key(jid))
            .or_insert_with(Device::new);
        let bundle = device.bundle(jid.device);
        PreKeyBundleUserNode::from_bundle(jid.clone(), &bundle, None)
            .expect("bundle node")
            .into_node()
    }

    /// Records the keys a client uploaded (`client` is its own device JID).
    pub fn record_upload(&mut self, client: &Jid, iq: &whatsapp_rust::wacore_binary::NodeRef<'_>) {
        let child = |tag: &str| iq.get_optional_child(tag).and_then(|n| n.content_bytes());
        let skey = iq.get_optional_child("skey");
        let signed = skey.and_then(|s| {
            let id = id3(s.get_optional_child("id").and_then(|n| n.content_bytes()))?;
            let value = key32(
                s.get_optional_child("value")
                    .and_then(|n| n.content_bytes()),
            )?;
            let sig = s
                .get_optional_child("signature")
                .and_then(|n| n.content_bytes())?;
            Some((id, value, sig.to_vec()))
        });
        let pre_keys: Vec<(u32, [u8; 32])> = iq
            .get_optional_child("list")
            .map(|l| {
                l.get_children_by_tag("key")
                    .filter_map(|k| {
                        Some((
                            id3(k.get_optional_child("id").and_then(|n| n.content_bytes()))?,
                            key32(
                                k.get_optional_child("value")
                                    .and_then(|n| n.content_bytes()),
                            )?,
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let registration = child("registration").and_then(|b| <[u8; 4]>::try_from(b).ok());
        if let (Some(reg), Some(identity), Some(signed)) =
            (registration, key32(child("identity")), signed)
        {
            self.uploads.insert(
                device_key(client),
                Uploaded {
                    registration_id: u32::from_be_bytes(reg),
                    identity,
                    signed,
                    pre_keys,
                },
            );
        }
    }

    /// A rotated signed pre-key (`<iq xmlns="encrypt" type="set"><rotate><skey>`).
    pub fn record_rotation(
        &mut self,
        client: &Jid,
        skey: &whatsapp_rust::wacore_binary::NodeRef<'_>,
    ) {
        let Some(up) = self.uploads.get_mut(&device_key(client)) else {
            return;
        };
        let bytes = |tag: &str| skey.get_optional_child(tag).and_then(|n| n.content_bytes());
        if let (Some(id), Some(value), Some(sig)) =
            (id3(bytes("id")), key32(bytes("value")), bytes("signature"))
        {
            up.signed = (id, value, sig.to_vec());
        }
    }

    /// How many one-time pre-keys `client` has left on the "server".
    pub fn pre_key_count(&self, client: &Jid) -> usize {
        self.uploads
            .get(&device_key(client))
            .map_or(0, |u| u.pre_keys.len())
    }

    /// Decrypts what `from` (the client) encrypted for `to` (one of the peer's devices).
    pub async fn decrypt(
        &mut self,
        from: &Jid,
        to: &Jid,
        kind: &str,
        ciphertext: &[u8],
    ) -> Result<Plain, String> {
        let device = self
            .devices
            .get_mut(&device_key(to))
            .ok_or_else(|| format!("no session: the client never fetched keys for {to}"))?;
        let message = match kind {
            "pkmsg" => CiphertextMessage::PreKeySignalMessage(
                PreKeySignalMessage::try_from(ciphertext).map_err(|e| e.to_string())?,
            ),
            "msg" => CiphertextMessage::SignalMessage(
                SignalMessage::try_from(ciphertext).map_err(|e| e.to_string())?,
            ),
            other => return Err(format!("unexpected <enc type=\"{other}\">")),
        };
        let result = message_decrypt(
            &message,
            &address(from),
            &mut device.sessions,
            &mut device.identities,
            &mut device.pre_keys,
            &device.signed,
            &mut rand::make_rng::<rand::rngs::StdRng>(),
            UsePQRatchet::No,
        )
        .await
        .map_err(|e| format!("decrypt: {e}"))?;
        if let Some(id) = result.consumed_prekey_id {
            device.pre_keys.0.remove(&id);
        }
        let message = decode_plaintext(&result.plaintext, 2).map_err(|e| e.to_string())?;
        Ok(Plain {
            skdm: message
                .sender_key_distribution_message
                .as_option()
                .and_then(|d| d.axolotl_sender_key_distribution_message.clone()),
            poll_secret: message
                .message_context_info
                .as_option()
                .and_then(|c| c.message_secret.clone())
                .filter(|_| {
                    let b = &message;
                    b.poll_creation_message.is_set()
                        || b.poll_creation_message_v2.is_set()
                        || b.poll_creation_message_v3.is_set()
                }),
            ..plain_of(&message)
        })
    }

    /// Whether the peer's `member` holds the sender key `from` gave it for `group`.
    pub fn has_sender_key(&self, group: &str, from: &Jid, member: &Jid) -> bool {
        let name = SenderKeyName::new(group.to_string(), device_key(from));
        self.devices
            .get(&device_key(member))
            .is_some_and(|d| d.sender_keys.0.contains_key(&name))
    }

    /// Decrypts a group message (`skmsg`) the client `from` sent to `group`, as the peer's
    /// member `member` reads it. `skdm`: the sender key the client gave that member with
    /// this message (in its pairwise part), if it gave one; else the one it gave before.
    pub async fn group_decrypt(
        &mut self,
        group: &str,
        from: &Jid,
        member: &Jid,
        skdm: Option<&[u8]>,
        skmsg: &[u8],
    ) -> Result<Plain, String> {
        let device = self
            .devices
            .get_mut(&device_key(member))
            .ok_or_else(|| format!("no device: the client never fetched keys for {member}"))?;
        let name = SenderKeyName::new(group.to_string(), device_key(from));
        if let Some(bytes) = skdm {
            let skdm = SenderKeyDistributionMessage::try_from(bytes)
                .map_err(|e| format!("the sender key: {e}"))?;
            process_sender_key_distribution_message(&name, &skdm, &mut device.sender_keys)
                .await
                .map_err(|e| format!("the sender key: {e}"))?;
        }
        let plain = group_decrypt(skmsg, &mut device.sender_keys, &name)
            .await
            .map_err(|e| format!("group decrypt: {e}"))?;
        let message = decode_plaintext(&plain, 2).map_err(|e| e.to_string())?;
        Ok(plain_of(&message))
    }

    /// Encrypts `message` from the peer's member `from` to `group`, for the client device
    /// `to`: the `skmsg` (sender-key encrypted), and, the first time this member writes
    /// to that group for that device, the pairwise `pkmsg`/`msg` that gives it the sender
    /// key. Returns (that pairwise part, the `skmsg` bytes).
    pub async fn group_encrypt(
        &mut self,
        group: &str,
        from: &Jid,
        to: &Jid,
        message: &wap::Message,
    ) -> Result<(Option<(&'static str, Vec<u8>)>, Vec<u8>), String> {
        let name = SenderKeyName::new(group.to_string(), device_key(from));
        let device = self
            .devices
            .entry(device_key(from))
            .or_insert_with(Device::new);
        let mut rng = rand::make_rng::<rand::rngs::StdRng>();
        let skdm = create_sender_key_distribution_message(&name, &mut device.sender_keys, &mut rng)
            .await
            .map_err(|e| format!("the sender key: {e}"))?;
        let padded = MessageUtils::pad_message_v2(message.encode_to_vec());
        let skmsg = group_encrypt(&mut device.sender_keys, &name, &padded, &mut rng)
            .await
            .map_err(|e| format!("group encrypt: {e}"))?;
        let first = device
            .distributed
            .insert(format!("{group}|{}", device_key(to)));
        let pairwise = if first {
            let carrier = wap::Message {
                sender_key_distribution_message: whatsapp_rust::buffa::MessageField::some(
                    wap::message::SenderKeyDistributionMessage {
                        group_id: Some(group.to_string()),
                        axolotl_sender_key_distribution_message: Some(skdm.serialized().to_vec()),
                    },
                ),
                ..Default::default()
            };
            Some(self.encrypt(from, to, &carrier).await?)
        } else {
            None
        };
        Ok((pairwise, skmsg.serialized().to_vec()))
    }

    /// Encrypts `message` from the peer's user `from` to the client device `to`: on the
    /// session the client opened, or else on a new one from the client's uploaded keys
    /// (taking one of its one-time pre-keys). Returns (`pkmsg` | `msg`, bytes).
    pub async fn encrypt(
        &mut self,
        from: &Jid,
        to: &Jid,
        message: &wap::Message,
    ) -> Result<(&'static str, Vec<u8>), String> {
        let device = self
            .devices
            .entry(device_key(from))
            .or_insert_with(Device::new);
        let remote = address(to);
        if !device
            .sessions
            .has_session(&remote)
            .await
            .map_err(|e| e.to_string())?
        {
            let up = self
                .uploads
                .get_mut(&device_key(to))
                .ok_or_else(|| format!("{to} uploaded no pre-keys"))?;
            let key =
                |b: &[u8; 32]| PublicKey::from_djb_public_key_bytes(b).map_err(|e| e.to_string());
            let one_time = match up.pre_keys.pop() {
                Some((id, k)) => Some((PreKeyId::from(id), key(&k)?)),
                None => None,
            };
            let bundle = PreKeyBundle::new(
                up.registration_id,
                u32::from(to.device).into(),
                one_time,
                up.signed.0.into(),
                key(&up.signed.1)?,
                up.signed.2.clone(),
                IdentityKey::new(key(&up.identity)?),
            )
            .map_err(|e| e.to_string())?;
            process_prekey_bundle(
                &remote,
                &mut device.sessions,
                &mut device.identities,
                &bundle,
                &mut rand::make_rng::<rand::rngs::StdRng>(),
                UsePQRatchet::No,
            )
            .await
            .map_err(|e| format!("the client's bundle: {e}"))?;
        }
        let padded = MessageUtils::pad_message_v2(message.encode_to_vec());
        let ct = message_encrypt(
            &padded,
            &remote,
            &mut device.sessions,
            &mut device.identities,
        )
        .await
        .map_err(|e| format!("encrypt: {e}"))?;
        Ok(match ct {
            CiphertextMessage::PreKeySignalMessage(m) => ("pkmsg", m.serialized().to_vec()),
            CiphertextMessage::SignalMessage(m) => ("msg", m.serialized().to_vec()),
            _ => return Err("unexpected ciphertext kind".into()),
        })
    }
}
