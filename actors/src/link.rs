//! The `Link` trait: a session's connection to the messaging network.
//!
//! A `Link` is a factory shared by all sessions (the real WhatsApp link, or the simulated
//! one). `connect` returns quickly with a `Connection` handle and reports progress
//! afterwards as `LinkEvent`s through an `EventSink`; the session actor turns those into
//! state changes. The supervisor never sees a concrete link type.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::record::{PairingCode, PairingQr};

/// A boxed, sendable future (keeps the traits object-safe).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Who a connection is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionSpec {
    /// The session's id.
    pub user_id: String,
    /// The phone number to pair with (digits only).
    pub phone_number: String,
}

/// What a link reports about its connection.
#[derive(Debug, Clone, PartialEq)]
pub enum LinkEvent {
    /// A (new) pairing code for the phone to enter.
    PairingCode(PairingCode),
    /// A (new) QR code the phone can scan instead of entering the code.
    PairingQr(PairingQr),
    /// Paired (or already paired); connecting to the network.
    Connecting,
    /// Connected; `name` is the account's push name when known.
    Online {
        /// The account's push name.
        name: Option<String>,
    },
    /// The connection dropped; the link reconnects by itself.
    Disconnected {
        /// Why it dropped.
        reason: String,
    },
    /// The link cannot go on: the supervisor restarts the session under its policy.
    Crashed {
        /// What went wrong.
        error: String,
    },
    /// The device was unlinked (on the phone): terminal, credentials must be wiped.
    LoggedOut {
        /// What the network said.
        reason: String,
    },
    /// The same account connected elsewhere: stop, do not restart in a loop.
    Replaced {
        /// What the network said.
        reason: String,
    },
    /// The account is banned (temporarily or not): the session fails.
    Banned {
        /// What the network said, with the ban's expiry when known.
        reason: String,
    },
    /// A message arrived for this session.
    Message(Box<InboundMessage>),
    /// The other side reports on messages this session sent (delivered, read, played).
    Receipt(Receipt),
    /// Something keeps the link from reconnecting (a proxy down, the network
    /// unreachable) while it retries by itself: the session's `lastError`, no change of
    /// state.
    Trouble {
        /// What went wrong.
        message: String,
    },
    /// The network refused to issue a pairing code (e.g. throttled).
    PairingRejected {
        /// A clear message, with a retry hint when there is one.
        message: String,
        /// True when the refusal is rate limiting (retry later), not a hard no.
        throttled: bool,
    },
}

/// What a recipient reports on messages a session sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Receipt {
    /// The messages' ids (as the send returned them).
    pub message_ids: Vec<String>,
    /// Who reports (JID of the recipient's device).
    pub by: String,
    /// What they report.
    pub status: ReceiptStatus,
    /// When (ms since the epoch).
    pub timestamp_ms: u64,
}

/// What a receipt reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiptStatus {
    /// On the recipient's device.
    Delivered,
    /// Read.
    Read,
    /// Played (a voice message or video).
    Played,
}

/// A message that arrived for a session.
#[derive(Clone, PartialEq)]
pub struct InboundMessage {
    /// The network's message id.
    pub id: String,
    /// Who sent it (JID): the phone JID when known.
    pub from: String,
    /// The sender's LID (`<n>@lid`), when WhatsApp gave one (accounts that hide their
    /// number are known by it alone; `from` is then the LID too).
    pub from_lid: Option<String>,
    /// The sender's phone JID when the message named the sender by LID alone and a
    /// LID-to-phone mapping WhatsApp gave earlier (a number check, another message) knows
    /// the number. `from` stays as the message named it: the event id derives from it,
    /// so a redelivery keeps its id whatever was learned in between.
    pub from_phone: Option<String>,
    /// The name the sender gave WhatsApp (its push name), when the message carried one.
    pub push_name: Option<String>,
    /// The chat it is in (JID; a group's for group messages).
    pub chat: String,
    /// When it was sent (ms since the epoch).
    pub timestamp_ms: u64,
    /// Its text, for text messages.
    pub text: Option<String>,
    /// `text`, or the kind of a message that is not text (`image`, `audio`, ...).
    pub kind: String,
    /// The message it answers (quotes), by id.
    pub reply_to: Option<String>,
    /// Who it mentions (JIDs), in the order it names them.
    pub mentions: Vec<String>,
    /// What it does to another message (a reaction, an edit, a revoke), if anything.
    pub refers: Option<Refers>,
    /// What a media message carries besides its bytes (which stay on WhatsApp's media
    /// servers).
    pub media: Option<Box<ReceivedMedia>>,
}

/// A received media's description.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReceivedMedia {
    /// Its MIME type.
    pub mimetype: Option<String>,
    /// Its size (bytes).
    pub size: Option<u64>,
    /// A document's file name.
    pub file_name: Option<String>,
    /// The text under it.
    pub caption: Option<String>,
    /// SHA-256 of the plain file, hex.
    pub sha256: Option<String>,
    /// An audio sent as a voice note.
    pub voice: bool,
    /// How the link that received it fetches its bytes again ([`Action::Download`]):
    /// opaque to everything but that link, kept with the message, never in an event.
    pub locator: Option<String>,
}

/// What a received message does to another message, named by id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refers {
    /// A reaction (an empty emoji removes the sender's reaction).
    Reaction {
        /// The message reacted to.
        message_id: String,
        /// The emoji.
        emoji: String,
    },
    /// A new text for a message its sender sent.
    Edit {
        /// The message edited.
        message_id: String,
    },
    /// The sender deleted one of its messages for everyone.
    Revoke {
        /// The message deleted.
        message_id: String,
    },
    /// A vote on a poll the session sent (a new vote replaces the voter's last one; no
    /// option is a vote taken back).
    PollVote {
        /// The poll.
        message_id: String,
        /// The options picked, by name (`None`: the vote could not be read: the poll is
        /// unknown or forgotten, or its secret is).
        options: Option<Vec<String>>,
    },
}

impl fmt::Debug for InboundMessage {
    // Message text is the user's: keep it out of debug logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InboundMessage")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

/// Where a link sends its events (to its session actor).
#[derive(Clone)]
pub struct EventSink(Arc<dyn Fn(LinkEvent) + Send + Sync>);

impl EventSink {
    /// Wraps a callback.
    pub fn new(f: impl Fn(LinkEvent) + Send + Sync + 'static) -> EventSink {
        EventSink(Arc::new(f))
    }

    /// Reports an event; never blocks.
    pub fn emit(&self, event: LinkEvent) {
        (self.0)(event)
    }

    /// Whether both are the same sink (one connection's).
    pub fn same(&self, other: &EventSink) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl fmt::Debug for EventSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EventSink")
    }
}

/// An injected fault (simulated link only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Panic inside the session actor.
    Panic,
    /// Drop the link with an error.
    Disconnect,
    /// Behave as if the phone unlinked the device.
    Logout,
    /// Stop answering messages.
    Hang,
}

impl Fault {
    /// Parses the API's `kind`.
    pub fn parse(s: &str) -> Option<Fault> {
        match s {
            "panic" => Some(Fault::Panic),
            "disconnect" => Some(Fault::Disconnect),
            "logout" => Some(Fault::Logout),
            "hang" => Some(Fault::Hang),
            _ => None,
        }
    }
}

/// What the session actor must do itself after a link accepted a fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultEffect {
    /// The link handled it (it will report events).
    Handled,
    /// Panic in the actor's message handler.
    Panic,
    /// Block the actor's message handler forever.
    Hang,
}

/// A link failure, as text for the API's `lastError`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkError {
    message: String,
    /// Retrying cannot help (e.g. the session's credential store is corrupt): the session
    /// fails at once instead of burning its restart budget.
    pub lasting: bool,
    /// The network refused what was asked for a reason of the request's own (see
    /// [`Refusal`]), not because it failed.
    pub refusal: Option<Refusal>,
}

/// Why the network refused an action, when the reason is the caller's to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// What it names does not exist for this account (a group it is not in, an invite
    /// code that was revoked).
    NotFound,
    /// The account may not do it there (not an admin of the group).
    NotAllowed,
}

impl LinkError {
    /// Builds an error from anything printable.
    pub fn new(msg: impl Into<String>) -> LinkError {
        LinkError {
            message: msg.into(),
            lasting: false,
            refusal: None,
        }
    }

    /// The network's refusal, for `why`.
    pub fn refused(why: Refusal, msg: impl Into<String>) -> LinkError {
        LinkError {
            message: msg.into(),
            lasting: false,
            refusal: Some(why),
        }
    }

    /// An error that a restart cannot fix.
    pub fn lasting(msg: impl Into<String>) -> LinkError {
        LinkError {
            message: msg.into(),
            lasting: true,
            refusal: None,
        }
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for LinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for LinkError {}

/// A kind of network connection, shared by all sessions.
pub trait Link: Send + Sync + 'static {
    /// A short name for logs and the API (`whatsapp`, `sim`).
    fn name(&self) -> &'static str;

    /// Opens the session's connection. Must return promptly (seconds at most): slow work
    /// (network round trips) runs in the background and reports through `events`.
    fn connect(
        &self,
        spec: SessionSpec,
        events: EventSink,
    ) -> BoxFuture<'static, Result<Box<dyn Connection>, LinkError>>;

    /// Removes everything the link stored for a session (credentials). Idempotent.
    fn remove_data(&self, user_id: &str) -> Result<(), LinkError>;

    /// Whether one more session can be started now (e.g. enough file descriptors for
    /// its store and socket); `Err` says why not, for the API caller.
    fn admit(&self) -> Result<(), LinkError> {
        Ok(())
    }

    /// File descriptors one idle session holds (for the capacity logged at start).
    fn files_per_session(&self) -> u32 {
        0
    }

    /// Whether sessions on this link take injected faults (`POST /api/sim/:id/fault`).
    fn accepts_faults(&self) -> bool {
        false
    }
}

/// What a session does on the network besides its lifecycle, run off its actor.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// A message to `to` (phone digits or a JID).
    Send {
        /// The recipient.
        to: String,
        /// What it carries.
        content: Outgoing,
        /// The message it answers (quoted).
        reply_to: Option<MessageRef>,
        /// Who a text mentions (user JIDs).
        mentions: Vec<String>,
        /// The id the message is to have (a queued send's, given when it was queued);
        /// `None`: the network's next.
        message_id: Option<String>,
    },
    /// A reaction to a message (`""` removes the session's reaction).
    React {
        /// The message.
        message: MessageRef,
        /// One emoji, or empty.
        emoji: String,
    },
    /// A new text for a message the session sent.
    Edit {
        /// The message.
        message: MessageRef,
        /// Its new text.
        text: String,
    },
    /// Deletes a message the session sent, for everyone.
    Revoke {
        /// The message.
        message: MessageRef,
    },
    /// Which of these phone numbers (digits) have a WhatsApp account.
    CheckNumbers {
        /// The numbers.
        phones: Vec<String>,
    },
    /// What WhatsApp says of a contact (phone digits or a user JID): its LID, "about"
    /// text and profile picture.
    Profile {
        /// The contact.
        contact: String,
    },
    /// Read receipts for messages of a chat (phone digits or a JID).
    MarkRead {
        /// The chat.
        chat: String,
        /// In a group, who wrote the messages.
        sender: Option<String>,
        /// The messages' ids.
        message_ids: Vec<String>,
    },
    /// The session shows itself available (online) or unavailable to its contacts.
    OwnPresence {
        /// Available, or not.
        available: bool,
    },
    /// Typing, recording or paused, shown in a chat.
    ChatPresence {
        /// The chat.
        chat: String,
        /// What to show.
        state: ChatPresence,
    },
    /// The bytes of a received media, fetched again from where the network keeps them.
    Download {
        /// The media's [`ReceivedMedia::locator`].
        locator: String,
    },
    /// Something about groups.
    Group(GroupOp),
}

/// What a session does about groups (group ids are full JIDs, `…@g.us`; people are
/// user JIDs).
#[derive(Debug, Clone, PartialEq)]
pub enum GroupOp {
    /// The groups the session's account is in.
    List,
    /// A new group with the session's account as its admin.
    Create {
        /// Its name.
        subject: String,
        /// Who else is in it.
        participants: Vec<String>,
    },
    /// One group's metadata.
    Info {
        /// Which.
        group: String,
    },
    /// A new subject and/or description (`Some(None)` clears the description).
    Update {
        /// Which.
        group: String,
        /// Its new name.
        subject: Option<String>,
        /// Its new description.
        description: Option<Option<String>>,
    },
    /// People added, removed, promoted to admin or demoted.
    Participants {
        /// Which group.
        group: String,
        /// What to do.
        action: ParticipantAction,
        /// Whom.
        participants: Vec<String>,
    },
    /// The group's invite code (`reset`: revoke the old one and make a new one).
    Invite {
        /// Which.
        group: String,
        /// Revoke first.
        reset: bool,
    },
    /// Joins a group by an invite code (or link); answers the group's id.
    Join {
        /// The code.
        code: String,
    },
    /// Leaves a group.
    Leave {
        /// Which.
        group: String,
    },
}

/// What [`GroupOp::Participants`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParticipantAction {
    /// Adds them.
    Add,
    /// Removes them.
    Remove,
    /// Makes them admins.
    Promote,
    /// Makes them plain members.
    Demote,
}

impl ParticipantAction {
    /// Its name in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            ParticipantAction::Add => "add",
            ParticipantAction::Remove => "remove",
            ParticipantAction::Promote => "promote",
            ParticipantAction::Demote => "demote",
        }
    }
}

/// A group as the network describes it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GroupInfo {
    /// Its JID (`…@g.us`).
    pub id: String,
    /// Its name.
    pub subject: String,
    /// Its description.
    pub description: Option<String>,
    /// Who made it (JID).
    pub owner: Option<String>,
    /// When it was made (ms since the epoch).
    pub created_at_ms: Option<u64>,
    /// Who is in it.
    pub participants: Vec<GroupMember>,
}

/// One person in a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMember {
    /// Their JID.
    pub jid: String,
    /// Whether they are an admin.
    pub admin: bool,
    /// Whether they are the group's super admin (its creator).
    pub super_admin: bool,
}

/// What became of one person in a [`GroupOp::Participants`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParticipantChange {
    /// Their JID.
    pub jid: String,
    /// Why not, when the network refused (its code or text).
    pub error: Option<String>,
}

/// A message as the network names it: what a reaction, an edit, a revoke or a quote
/// needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageRef {
    /// The chat's JID.
    pub chat: String,
    /// The message's id.
    pub id: String,
    /// Whether the session wrote it.
    pub from_me: bool,
    /// Who wrote it, in a group.
    pub author: Option<String>,
}

/// What a session shows in a chat while it prepares an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatPresence {
    /// Typing.
    Typing,
    /// Recording a voice note.
    Recording,
    /// Stopped typing or recording.
    Paused,
}

impl Action {
    /// What the action does, for "… only from an online session".
    pub fn what(&self) -> &'static str {
        match self {
            Action::Send { .. } => "messages can be sent",
            Action::React { .. } => "reactions can be sent",
            Action::Edit { .. } => "messages can be edited",
            Action::Revoke { .. } => "messages can be revoked",
            Action::CheckNumbers { .. } => "numbers can be checked",
            Action::Profile { .. } => "profiles can be read",
            Action::MarkRead { .. } => "chats can be marked read",
            Action::ChatPresence { .. } | Action::OwnPresence { .. } => "presence can be shown",
            Action::Download { .. } => "media can be downloaded",
            Action::Group(_) => "groups can be managed",
        }
    }
}

/// What a message sent carries.
#[derive(Debug, Clone, PartialEq)]
pub enum Outgoing {
    /// A text.
    Text(String),
    /// A location pin.
    Location(Location),
    /// A contact card.
    Contact(Contact),
    /// A poll.
    Poll(Poll),
    /// An image, a video, an audio (or voice note), a document or a sticker.
    Media(Media),
}

/// Which media.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaKind {
    /// A picture (JPEG, PNG, WebP).
    Image,
    /// A video (MP4).
    Video,
    /// An audio, or a voice note.
    Audio,
    /// Any file, sent with its name.
    Document,
    /// A sticker (WebP).
    Sticker,
}

impl MediaKind {
    /// Every kind with its name in the API.
    pub const ALL: [(&'static str, MediaKind); 5] = [
        ("image", MediaKind::Image),
        ("video", MediaKind::Video),
        ("audio", MediaKind::Audio),
        ("document", MediaKind::Document),
        ("sticker", MediaKind::Sticker),
    ];

    /// The kind's name in the API.
    pub fn name(self) -> &'static str {
        match self {
            MediaKind::Image => "image",
            MediaKind::Video => "video",
            MediaKind::Audio => "audio",
            MediaKind::Document => "document",
            MediaKind::Sticker => "sticker",
        }
    }
}

/// Where a media's bytes are: fetched already (in memory, or streamed into a file), or
/// still a URL (the front end fetches it before the link sees it).
#[derive(Clone, PartialEq)]
pub enum MediaSource {
    /// The bytes (given as base64 in a JSON body).
    Bytes(std::sync::Arc<Vec<u8>>),
    /// A URL to fetch.
    Url(String),
    /// Streamed into an unnamed temporary file: a URL fetched, or a body uploaded.
    File(MediaFile),
}

/// A media streamed into an unnamed temporary file (deleted already: it goes when the
/// last handle does), with what was learnt on the way in.
#[derive(Debug, Clone)]
pub struct MediaFile {
    /// The file, holding the media from its start.
    pub file: std::sync::Arc<std::fs::File>,
    /// Its length.
    pub len: u64,
    /// Its SHA-256.
    pub sha256: [u8; 32],
}

impl PartialEq for MediaFile {
    fn eq(&self, other: &MediaFile) -> bool {
        std::sync::Arc::ptr_eq(&self.file, &other.file)
    }
}

impl MediaFile {
    /// A reader from `at` on (positioned reads: readers never move each other).
    pub fn reader_from(&self, at: u64) -> FileReader {
        FileReader {
            file: std::sync::Arc::clone(&self.file),
            at,
        }
    }
}

/// Reads a shared file from a position on, with positioned reads.
pub struct FileReader {
    file: std::sync::Arc<std::fs::File>,
    at: u64,
}

impl FileReader {
    /// Reads `file` from `at` on.
    pub fn new(file: std::sync::Arc<std::fs::File>, at: u64) -> FileReader {
        FileReader { file, at }
    }
}

impl std::io::Read for FileReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let n = self.file.read_at(buf, self.at)?;
        self.at += n as u64;
        Ok(n)
    }
}

impl std::fmt::Debug for MediaSource {
    // Never the bytes themselves in a debug print.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MediaSource::Bytes(b) => write!(f, "Bytes({} bytes)", b.len()),
            MediaSource::Url(u) => write!(f, "Url({u})"),
            MediaSource::File(m) => write!(f, "File({} bytes)", m.len),
        }
    }
}

/// A media message.
#[derive(Debug, Clone, PartialEq)]
pub struct Media {
    /// Which.
    pub kind: MediaKind,
    /// Its bytes (or where to get them).
    pub source: MediaSource,
    /// Its MIME type.
    pub mimetype: String,
    /// A document's file name.
    pub file_name: Option<String>,
    /// The text under it (not for audio and stickers).
    pub caption: Option<String>,
    /// An audio sent as a voice note (push to talk).
    pub voice: bool,
}

impl Media {
    /// The bytes, when they are in memory.
    pub fn bytes(&self) -> Option<&std::sync::Arc<Vec<u8>>> {
        match &self.source {
            MediaSource::Bytes(b) => Some(b),
            MediaSource::Url(_) | MediaSource::File(_) => None,
        }
    }

    /// Its size, once fetched.
    pub fn size(&self) -> Option<u64> {
        match &self.source {
            MediaSource::Bytes(b) => Some(b.len() as u64),
            MediaSource::File(f) => Some(f.len),
            MediaSource::Url(_) => None,
        }
    }

    /// A reader of its bytes from the start, once fetched.
    pub fn reader(&self) -> Option<Box<dyn std::io::Read + Send>> {
        match &self.source {
            MediaSource::Bytes(b) => Some(Box::new(std::io::Cursor::new(ArcBytes(b.clone())))),
            MediaSource::File(f) => Some(Box::new(f.reader_from(0))),
            MediaSource::Url(_) => None,
        }
    }

    /// Its bytes whole, in memory (read from its file if it is in one), once fetched.
    pub fn load(&self) -> std::io::Result<Option<std::sync::Arc<Vec<u8>>>> {
        match &self.source {
            MediaSource::Bytes(b) => Ok(Some(b.clone())),
            MediaSource::File(_) => {
                let mut all = Vec::new();
                if let Some(mut r) = self.reader() {
                    std::io::Read::read_to_end(&mut r, &mut all)?;
                }
                Ok(Some(std::sync::Arc::new(all)))
            }
            MediaSource::Url(_) => Ok(None),
        }
    }
}

/// Shared bytes as a slice (for a reader that owns its share).
struct ArcBytes(std::sync::Arc<Vec<u8>>);

impl AsRef<[u8]> for ArcBytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// A location pin.
#[derive(Debug, Clone, PartialEq)]
pub struct Location {
    /// Degrees north, -90 to 90.
    pub latitude: f64,
    /// Degrees east, -180 to 180.
    pub longitude: f64,
    /// The place's name.
    pub name: Option<String>,
    /// Its address.
    pub address: Option<String>,
}

/// A contact card: a name and a phone number.
#[derive(Debug, Clone, PartialEq)]
pub struct Contact {
    /// The name shown.
    pub name: String,
    /// The phone number's digits (with the country code).
    pub phone: String,
}

/// A poll.
#[derive(Debug, Clone, PartialEq)]
pub struct Poll {
    /// The question.
    pub question: String,
    /// The options, distinct, 2 to 12.
    pub options: Vec<String>,
    /// How many options a voter may pick (1 to the number of options).
    pub selectable: u32,
}

impl Outgoing {
    /// `text`, `location`, `contact` or `poll`.
    pub fn kind(&self) -> &'static str {
        match self {
            Outgoing::Text(_) => "text",
            Outgoing::Location(_) => "location",
            Outgoing::Contact(_) => "contact",
            Outgoing::Poll(_) => "poll",
            Outgoing::Media(m) => m.kind.name(),
        }
    }

    /// One line that stands for the message: the text, the place's name (or its
    /// coordinates), the contact's name, the poll's question.
    pub fn summary(&self) -> String {
        match self {
            Outgoing::Text(text) => text.clone(),
            Outgoing::Location(l) => match &l.name {
                Some(name) => name.clone(),
                None => format!("{}, {}", l.latitude, l.longitude),
            },
            Outgoing::Contact(c) => c.name.clone(),
            Outgoing::Poll(p) => p.question.clone(),
            Outgoing::Media(m) => m
                .caption
                .clone()
                .or_else(|| m.file_name.clone())
                .unwrap_or_else(|| format!("[{}]", m.kind.name())),
        }
    }
}

/// What an [`Action`] answered.
#[derive(Debug, Clone, PartialEq)]
pub enum Done {
    /// The network's id of the message sent.
    Sent(String),
    /// One answer per number asked, in order.
    Checked(Vec<NumberCheck>),
    /// The network took it (nothing to answer).
    Taken,
    /// A received media's bytes (decrypted).
    Media(Fetched),
    /// Groups (a list, or the one a create, an info or a join is about).
    Groups(Vec<GroupInfo>),
    /// What became of each person of a participants change.
    Participants(Vec<ParticipantChange>),
    /// A group's invite code.
    Invite(String),
    /// What WhatsApp says of a contact.
    Profile(Box<Profile>),
}

/// A received media's plain bytes: in memory (the simulated network keeps them there),
/// or in an unnamed temporary file (the real link decrypts into one as it downloads, so a
/// transfer never holds the whole file in memory).
#[derive(Debug, Clone)]
pub enum Fetched {
    /// The bytes.
    Memory(std::sync::Arc<Vec<u8>>),
    /// A file holding them from its start, `len` bytes.
    File {
        /// The file (deleted already: it goes when the last handle does).
        file: std::sync::Arc<std::fs::File>,
        /// Its length.
        len: u64,
    },
}

impl Fetched {
    /// How many bytes.
    pub fn len(&self) -> u64 {
        match self {
            Fetched::Memory(b) => b.len() as u64,
            Fetched::File { len, .. } => *len,
        }
    }

    /// No bytes at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl PartialEq for Fetched {
    fn eq(&self, other: &Fetched) -> bool {
        match (self, other) {
            (Fetched::Memory(a), Fetched::Memory(b)) => a == b,
            (Fetched::File { file: a, .. }, Fetched::File { file: b, .. }) => {
                std::sync::Arc::ptr_eq(a, b)
            }
            _ => false,
        }
    }
}

/// What WhatsApp says of a contact, as far as its privacy settings let the session see.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Profile {
    /// Its JID as asked (a phone JID, or a LID).
    pub jid: String,
    /// Its LID, when WhatsApp gave one.
    pub lid: Option<String>,
    /// Its "about" text.
    pub about: Option<String>,
    /// Its profile picture's id (changes when the picture does).
    pub picture_id: Option<String>,
    /// Where its profile picture can be fetched (a signed URL of WhatsApp's media servers
    /// that expires).
    pub picture_url: Option<String>,
    /// A business account.
    pub business: bool,
}

/// Whether one phone number has a WhatsApp account.
#[derive(Debug, Clone, PartialEq)]
pub struct NumberCheck {
    /// The number as asked (digits).
    pub phone: String,
    /// Whether it has an account.
    pub on_whatsapp: bool,
    /// Its phone JID, when it has an account.
    pub jid: Option<String>,
    /// Its LID, when WhatsApp gave one.
    pub lid: Option<String>,
}

/// One session's live connection. Dropping it must release everything (abort tasks,
/// close sockets): a panicking or killed actor never gets to call `close`.
pub trait Connection: Send + 'static {
    /// Unlinks the device from the account (the network forgets it).
    fn logout(&mut self) -> BoxFuture<'_, Result<(), LinkError>>;

    /// Closes the connection cleanly.
    fn close(&mut self) -> BoxFuture<'_, ()>;

    /// Sends a text message to `to` (a phone number's digits, or a full JID). The future
    /// owns what it needs (it runs off the session actor, which keeps answering); it
    /// resolves to the network's message id.
    fn send_text(
        &self,
        to: &str,
        text: &str,
        reply_to: Option<&MessageRef>,
    ) -> BoxFuture<'static, Result<String, LinkError>> {
        let _ = (to, text, reply_to);
        Box::pin(async { Err(LinkError::new("this link cannot send messages")) })
    }

    /// Sends `content` to `to`, quoting `reply_to`, a text mentioning `mentions` (user
    /// JIDs), under `message_id` when given; plain texts go through
    /// [`Connection::send_text`], and a link that sends more overrides this. Resolves to
    /// the network's message id.
    fn send(
        &self,
        to: &str,
        content: &Outgoing,
        reply_to: Option<&MessageRef>,
        mentions: &[String],
        message_id: Option<&str>,
    ) -> BoxFuture<'static, Result<String, LinkError>> {
        match content {
            Outgoing::Text(_) if !mentions.is_empty() || message_id.is_some() => {
                let error = LinkError::new("this link cannot mention anyone or name its messages");
                Box::pin(async move { Err(error) })
            }
            Outgoing::Text(text) => self.send_text(to, text, reply_to),
            other => {
                let error =
                    LinkError::new(format!("this link cannot send {} messages", other.kind()));
                Box::pin(async move { Err(error) })
            }
        }
    }

    /// Reacts to `message` with `emoji` (`""` removes the reaction); resolves to the
    /// reaction's own message id.
    fn react(
        &self,
        message: &MessageRef,
        emoji: &str,
    ) -> BoxFuture<'static, Result<String, LinkError>> {
        let _ = (message, emoji);
        Box::pin(async { Err(LinkError::new("this link cannot send reactions")) })
    }

    /// Replaces the text of `message` (the session's own); resolves to the edit's id.
    fn edit(
        &self,
        message: &MessageRef,
        text: &str,
    ) -> BoxFuture<'static, Result<String, LinkError>> {
        let _ = (message, text);
        Box::pin(async { Err(LinkError::new("this link cannot edit messages")) })
    }

    /// Deletes `message` (the session's own) for everyone.
    fn revoke(&self, message: &MessageRef) -> BoxFuture<'static, Result<(), LinkError>> {
        let _ = message;
        Box::pin(async { Err(LinkError::new("this link cannot revoke messages")) })
    }

    /// Does `op` about groups; answers [`Done::Groups`], [`Done::Participants`],
    /// [`Done::Invite`] or [`Done::Taken`] as the op says.
    fn group(&self, op: GroupOp) -> BoxFuture<'static, Result<Done, LinkError>> {
        let _ = op;
        Box::pin(async { Err(LinkError::new("this link cannot manage groups")) })
    }

    /// The bytes of a received media, by its [`ReceivedMedia::locator`].
    fn download(&self, locator: &str) -> BoxFuture<'static, Result<Fetched, LinkError>> {
        let _ = locator;
        Box::pin(async { Err(LinkError::new("this link cannot download media")) })
    }

    /// Which of `phones` (digits) have a WhatsApp account, with their JIDs.
    fn check_numbers(
        &self,
        phones: &[String],
    ) -> BoxFuture<'static, Result<Vec<NumberCheck>, LinkError>> {
        let _ = phones;
        Box::pin(async { Err(LinkError::new("this link cannot check numbers")) })
    }

    /// What WhatsApp says of `contact` (a user JID).
    fn profile(&self, contact: &str) -> BoxFuture<'static, Result<Profile, LinkError>> {
        let _ = contact;
        Box::pin(async { Err(LinkError::new("this link cannot read profiles")) })
    }

    /// Sends read receipts for `message_ids` of `chat` (`sender`: their author, in a
    /// group).
    fn mark_read(
        &self,
        chat: &str,
        sender: Option<&str>,
        message_ids: &[String],
    ) -> BoxFuture<'static, Result<(), LinkError>> {
        let _ = (chat, sender, message_ids);
        Box::pin(async { Err(LinkError::new("this link cannot mark chats read")) })
    }

    /// Shows typing, recording or paused in `chat`.
    fn chat_presence(
        &self,
        chat: &str,
        state: ChatPresence,
    ) -> BoxFuture<'static, Result<(), LinkError>> {
        let _ = (chat, state);
        Box::pin(async { Err(LinkError::new("this link cannot show presence")) })
    }

    /// Shows the session available (online) or unavailable to its contacts.
    fn own_presence(&self, available: bool) -> BoxFuture<'static, Result<(), LinkError>> {
        let _ = available;
        Box::pin(async { Err(LinkError::new("this link cannot show presence")) })
    }

    /// Runs an [`Action`] (what a session does on the network besides its lifecycle).
    fn act(&self, action: Action) -> BoxFuture<'static, Result<Done, LinkError>> {
        match action {
            Action::Send {
                to,
                content,
                reply_to,
                mentions,
                message_id,
            } => {
                let sending = self.send(
                    &to,
                    &content,
                    reply_to.as_ref(),
                    &mentions,
                    message_id.as_deref(),
                );
                Box::pin(async move { sending.await.map(Done::Sent) })
            }
            Action::React { message, emoji } => {
                let reacting = self.react(&message, &emoji);
                Box::pin(async move { reacting.await.map(Done::Sent) })
            }
            Action::Edit { message, text } => {
                let editing = self.edit(&message, &text);
                Box::pin(async move { editing.await.map(Done::Sent) })
            }
            Action::Revoke { message } => {
                let revoking = self.revoke(&message);
                Box::pin(async move { revoking.await.map(|()| Done::Taken) })
            }
            Action::CheckNumbers { phones } => {
                let checking = self.check_numbers(&phones);
                Box::pin(async move { checking.await.map(Done::Checked) })
            }
            Action::Profile { contact } => {
                let reading = self.profile(&contact);
                Box::pin(async move { reading.await.map(|p| Done::Profile(Box::new(p))) })
            }
            Action::MarkRead {
                chat,
                sender,
                message_ids,
            } => {
                let marking = self.mark_read(&chat, sender.as_deref(), &message_ids);
                Box::pin(async move { marking.await.map(|()| Done::Taken) })
            }
            Action::OwnPresence { available } => {
                let showing = self.own_presence(available);
                Box::pin(async move { showing.await.map(|()| Done::Taken) })
            }
            Action::ChatPresence { chat, state } => {
                let showing = self.chat_presence(&chat, state);
                Box::pin(async move { showing.await.map(|()| Done::Taken) })
            }
            Action::Download { locator } => {
                let fetching = self.download(&locator);
                Box::pin(async move { fetching.await.map(Done::Media) })
            }
            Action::Group(op) => self.group(op),
        }
    }

    /// Injects a fault; only the simulated link accepts them.
    fn inject(&mut self, fault: Fault) -> Result<FaultEffect, LinkError> {
        let _ = fault;
        Err(LinkError::new(
            "fault injection is only available with the simulated link",
        ))
    }
}
