//! A loopback WhatsApp peer for botvisor's tests. Test-only: its certificate chain is
//! fake, so only a client built with `danger-skip-cert-chain-verify` accepts it.
//!
//! It accepts the client's WebSocket on 127.0.0.1, completes the Noise XX handshake,
//! decodes the binary nodes, sends an unregistered client a `pair-device` with QR refs,
//! answers the `link_code_companion_reg` companion_hello IQ
//! with a pairing ref (or a rate-limit error), answers pings and other IQs with an empty
//! result, and on command closes the sockets, sends a `<failure>` or a `<stream:error>`,
//! or asks for a pairing-code refresh.
//!
//! A client whose store says it is registered (a phone number in its device row) logs
//! in: the peer answers `<success>` and an empty offline batch, so the client reaches
//! `Connected`. The peer stops before pair-success: it never plays the phone's side of
//! pairing (`primary_hello`, `companion_finish`, the ADV-signed `pair-success`), so tests
//! of a paired session seed the store's device row instead of pairing.
//!
//! For messages the peer plays WhatsApp's server and a second WhatsApp user at once
//! ([`signal`]): it answers device-list queries (`usync`, one primary device per user),
//! hands out real Signal pre-key bundles, keeps the pre-keys a client uploads, decrypts
//! every `<enc>` a client sends to its users and records the text, and on command sends
//! a client a message encrypted on a real Signal session.
//!
//! It is also WhatsApp's media host ([`media_host`]): `media_conn` names an HTTPS host on
//! 127.0.0.1 that keeps what clients upload, and the peer decrypts the media of the
//! messages that point there (recording kind, type, length and SHA-256 of the plaintext).

pub mod harness;
pub mod media_host;
pub mod signal;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio_websockets::{Message, ServerBuilder, WebSocketStream};
use whatsapp_rust::buffa::Message as _;
use whatsapp_rust::wacore::framing::{encode_frame, FrameDecoder};
use whatsapp_rust::wacore::handshake::{NoiseCipher, NoiseHandshake};
use whatsapp_rust::wacore::libsignal::protocol::KeyPair;
use whatsapp_rust::wacore_binary::builder::NodeBuilder;
use whatsapp_rust::wacore_binary::consts::{NOISE_PATTERN_XX, WA_CONN_HEADER};
use whatsapp_rust::wacore_binary::marshal::{marshal, unmarshal_ref};
use whatsapp_rust::wacore_binary::util::unpack;
use whatsapp_rust::wacore_binary::{Jid, JidExt as _, Node, NodeRef};
use whatsapp_rust::waproto::whatsapp as wap;

/// What the peer does to every live connection on command.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Close the TCP connection without a word.
    Close,
    /// `<failure reason="401"/>`: the device was logged out.
    LoggedOut,
    /// `<failure reason="405"/>`: this client version is outdated.
    ClientOutdated,
    /// `<stream:error><conflict type="replaced"/></stream:error>`.
    StreamReplaced,
    /// `<failure reason="402" code=".." expire=".."/>`: a temporary ban.
    TemporaryBan {
        /// Ban reason code (101..106).
        code: u32,
        /// Seconds until the ban ends.
        expire_secs: u64,
    },
    /// `<notification type="link_code_companion_reg">` with stage `refresh_code`.
    RefreshCode,
    /// A message from the peer's user `from` (a phone number) to the logged-in client of
    /// phone number `to`, Signal-encrypted (see [`signal`]).
    Send {
        /// The sender's phone number (any: the peer plays whoever it is told).
        from: String,
        /// The client's phone number (only its connection sends).
        to: String,
        /// The stanza id.
        id: String,
        /// What it says.
        content: signal::Content,
    },
    /// A message the peer's user `author` (a member) writes in `group` (its JID), to the
    /// logged-in client of phone number `to`: sender-key encrypted (`skmsg`), with the
    /// author's sender key in a pairwise `pkmsg`/`msg` the first time, as WhatsApp does.
    SendGroup {
        /// The group's JID (`…@g.us`).
        group: String,
        /// Who writes (a phone number).
        author: String,
        /// The client's phone number.
        to: String,
        /// The stanza id.
        id: String,
        /// What it says.
        content: signal::Content,
    },
    /// The peer's user `from` has read message `id` that the client of phone number `to`
    /// sent it: a `read` receipt.
    MarkRead {
        /// The reader's phone number.
        from: String,
        /// The client's phone number.
        to: String,
        /// The message's id.
        id: String,
    },
    /// As `Send`, with one byte of the ciphertext flipped after encryption: the client
    /// must fail to decrypt it (and ask for a retry), never report it.
    SendTampered {
        /// The sender's phone number.
        from: String,
        /// The client's phone number.
        to: String,
        /// The stanza id.
        id: String,
        /// What it says.
        content: signal::Content,
    },
}

/// How the peer answers a companion_hello.
#[derive(Debug, Clone, PartialEq)]
pub enum PairReply {
    /// A pairing ref: the client then shows a code.
    Ref,
    /// `<error code="429" text="rate-overlimit" backoff=".."/>`.
    RateLimited {
        /// Seconds the client should wait.
        backoff_secs: u64,
    },
}

/// What the peer has seen.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    /// WebSocket connections accepted.
    pub connections: usize,
    /// Noise handshakes completed (client finish decrypted).
    pub handshakes: usize,
    /// Connections that ended before the handshake completed.
    pub failed_handshakes: usize,
    /// Phone numbers of the companion_hello IQs, in order.
    pub companion_hellos: Vec<String>,
    /// Logins (a registered client's handshake) answered with `<success>`.
    pub logins: usize,
    /// `remove-companion-device` IQs (a logout unlinking the device).
    pub unlinks: usize,
    /// Profile picture queries (`w:profile:picture`) answered.
    pub picture_queries: usize,
    /// Each time a device logged in while another connection of the same device was
    /// live (`user:device`): two sockets for one account, as WhatsApp sees them.
    pub overlaps: Vec<String>,
    /// Older connections kicked with `<conflict type="replaced"/>` by a newer login.
    pub replaced: usize,
    /// Other IQs answered (pings and the like).
    pub other_iqs: usize,
    /// Tags of the nodes the peer sent on command.
    pub commands_sent: Vec<String>,
    /// Device-list queries (`usync` with `<devices>`) answered.
    pub device_queries: usize,
    /// Pre-key bundles handed out, by device JID.
    pub bundles_served: Vec<String>,
    /// Pre-key uploads received from clients.
    pub pre_key_uploads: usize,
    /// What the peer decrypted of the clients' messages, in order.
    pub decrypted: Vec<signal::Decrypted>,
    /// What the peer could not decrypt or send, with the reason.
    pub signal_errors: Vec<String>,
    /// Messages the peer sent to clients on command: (id, `pkmsg` | `msg`).
    pub messages_sent: Vec<(String, String)>,
    /// Receipts the clients sent: (id, type; `delivery` when the type is absent).
    pub receipts: Vec<(String, String)>,
    /// Unacknowledged messages sent again at a client's login.
    pub redelivered: usize,
    /// Chat states the clients showed: (to, `composing` | `composing audio` | `paused`).
    pub chat_states: Vec<(String, String)>,
    /// Presence the clients set for themselves: `available` | `unavailable`.
    pub presences: Vec<String>,
}

struct Inner {
    stats: Mutex<Stats>,
    reply: Mutex<PairReply>,
    commands: broadcast::Sender<Command>,
    signal: tokio::sync::Mutex<signal::SignalPeer>,
    /// Phone numbers whose pre-key fetch is refused (`<error code="404">`).
    refused: Mutex<Vec<String>>,
    /// Phone numbers with no WhatsApp account (usync `<contact type="out"/>`).
    absent: Mutex<Vec<String>>,
    /// Messages sent to clients that no delivery receipt acknowledged yet, by the client's
    /// phone number: like WhatsApp's offline queue, they are sent again at its next login.
    unacked: Mutex<Vec<(String, Node)>>,
    /// The secrets of the polls clients sent, by message id (for [`Peer::vote`]).
    polls: Mutex<HashMap<String, Vec<u8>>>,
    /// The logged-in connection of each account's device (`user:device`): its number and
    /// what kicks it when another logs in as the same device.
    live: Mutex<HashMap<String, (u64, Arc<tokio::sync::Notify>)>>,
    /// Numbers connections by their login.
    next_login: std::sync::atomic::AtomicU64,
    /// What the media host keeps.
    media: Arc<media_host::Files>,
    /// Where the media host listens.
    media_addr: SocketAddr,
    /// The groups WhatsApp holds, by id (the JID's user part): subject, creation time
    /// (s), creator, and the participants with their type.
    groups: Mutex<std::collections::BTreeMap<String, PeerGroup>>,
}

/// A group as the peer keeps it.
#[derive(Debug, Clone)]
struct PeerGroup {
    subject: String,
    description: Option<String>,
    creation: u64,
    creator: String,
    participants: Vec<(String, &'static str)>,
    invite: String,
}

impl PeerGroup {
    /// The `<group>` node WhatsApp answers with.
    fn node(&self, id: &str) -> Node {
        NodeBuilder::new("group")
            .attr("id", id.to_string())
            .attr("subject", self.subject.clone())
            .attr("s_t", self.creation.to_string())
            .attr("creation", self.creation.to_string())
            .attr("creator", self.creator.clone())
            .children(
                self.participants
                    .iter()
                    .map(|(jid, kind)| {
                        let p = NodeBuilder::new("participant").attr("jid", jid.clone());
                        match *kind {
                            "member" => p.build(),
                            kind => p.attr("type", kind).build(),
                        }
                    })
                    .chain(self.description.iter().map(|d| {
                        NodeBuilder::new("description")
                            .attr("id", format!("{:X}", d.len()))
                            .children([NodeBuilder::new("body").string_content(d.clone()).build()])
                            .build()
                    })),
            )
            .build()
    }
}

/// WhatsApp's group queries (`w:g2`) the peer plays: create, the groups a client is in,
/// one group's metadata, leave. `None`: not a group query the peer knows.
fn group_iq(session: &Session, inner: &Inner, node: &NodeRef<'_>) -> Option<Node> {
    if attr_str(node, "xmlns") != "w:g2" {
        return None;
    }
    let id = attr_str(node, "id");
    let me = session.client.as_ref()?.to_non_ad().to_string();
    let mut groups = inner.groups.lock().ok()?;
    let member = |g: &PeerGroup| g.participants.iter().any(|(j, _)| *j == me);
    let not_found = || {
        NodeBuilder::new("iq")
            .attr("type", "error")
            .attr("id", id.clone())
            .attr("from", "g.us")
            .children([NodeBuilder::new("error")
                .attr("code", "404")
                .attr("text", "item-not-found")
                .build()])
            .build()
    };
    if let Some(create) = node.get_optional_child("create") {
        let gid = format!("120363{:012}", groups.len() as u64 + 1);
        let mut participants = vec![(me.clone(), "superadmin")];
        for p in create.get_children_by_tag("participant") {
            if let Some(j) = p.get_attr("jid") {
                participants.push((j.as_str().to_string(), "member"));
            }
        }
        let group = PeerGroup {
            subject: attr_str(create, "subject"),
            description: None,
            creation: unix_now(),
            creator: me.clone(),
            participants,
            invite: format!("PEERINVITE{:012}", groups.len() + 1),
        };
        let answer = group.node(&gid);
        groups.insert(gid, group);
        return Some(iq_result(&id).children([answer]).build());
    }
    if node.get_optional_child("participating").is_some() {
        let mine: Vec<Node> = groups
            .iter()
            .filter(|(_, g)| member(g))
            .map(|(gid, g)| g.node(gid))
            .collect();
        return Some(
            iq_result(&id)
                .children([NodeBuilder::new("groups").children(mine).build()])
                .build(),
        );
    }
    if node.get_optional_child("query").is_some() {
        let to = attr_str(node, "to");
        let gid = to.split('@').next().unwrap_or_default();
        return Some(match groups.get(gid).filter(|g| member(g)) {
            Some(g) => iq_result(&id).children([g.node(gid)]).build(),
            None => not_found(),
        });
    }
    // Joining by an invite code (sent to `g.us`, not to a group).
    if let Some(code) = node
        .get_optional_child("invite")
        .and_then(|i| i.get_attr("code").map(|c| c.as_str().to_string()))
    {
        let Some((gid, group)) = groups.iter_mut().find(|(_, g)| g.invite == code) else {
            return Some(not_found());
        };
        if !member(group) {
            group.participants.push((me.clone(), "member"));
        }
        return Some(
            iq_result(&id)
                .children([NodeBuilder::new("group")
                    .attr("jid", format!("{gid}@g.us"))
                    .build()])
                .build(),
        );
    }
    // The rest are about the group the IQ is sent to, and for its admins only.
    let to = attr_str(node, "to");
    let gid = to.split('@').next().unwrap_or_default().to_string();
    let admin = |g: &PeerGroup| {
        g.participants
            .iter()
            .any(|(j, kind)| *j == me && *kind != "member")
    };
    for action in ["add", "remove", "promote", "demote"] {
        let Some(change) = node.get_optional_child(action) else {
            continue;
        };
        let Some(group) = groups.get_mut(&gid).filter(|g| admin(g)) else {
            return Some(not_found());
        };
        let answers: Vec<Node> = change
            .get_children_by_tag("participant")
            .map(|p| {
                let jid = attr_str(p, "jid");
                let at = group.participants.iter().position(|(j, _)| *j == jid);
                let error = match (action, at) {
                    ("add", Some(_)) => Some("409"),
                    ("add", None) => {
                        group.participants.push((jid.clone(), "member"));
                        None
                    }
                    (_, None) => Some("404"),
                    ("remove", Some(i)) => {
                        group.participants.remove(i);
                        None
                    }
                    ("promote", Some(i)) => {
                        group.participants[i].1 = "admin";
                        None
                    }
                    (_, Some(i)) => {
                        group.participants[i].1 = "member";
                        None
                    }
                };
                let n = NodeBuilder::new("participant").attr("jid", jid);
                match error {
                    Some(e) => n.attr("error", e).build(),
                    None => n.build(),
                }
            })
            .collect();
        return Some(
            iq_result(&id)
                .children([NodeBuilder::new(action).children(answers).build()])
                .build(),
        );
    }
    if node.get_optional_child("invite").is_some() {
        let Some(group) = groups.get_mut(&gid).filter(|g| admin(g)) else {
            return Some(not_found());
        };
        if attr_str(node, "type") == "set" {
            group.invite = format!("PEERINVITE{:012}", unix_now() % 1_000_000_000_000 + 7);
        }
        return Some(
            iq_result(&id)
                .children([NodeBuilder::new("invite")
                    .attr("code", group.invite.clone())
                    .build()])
                .build(),
        );
    }
    if let Some(subject) = node.get_optional_child("subject") {
        let Some(group) = groups.get_mut(&gid).filter(|g| member(g)) else {
            return Some(not_found());
        };
        group.subject = subject.content_as_string().unwrap_or_default().to_string();
        return Some(iq_result(&id).build());
    }
    if let Some(description) = node.get_optional_child("description") {
        let Some(group) = groups.get_mut(&gid).filter(|g| member(g)) else {
            return Some(not_found());
        };
        group.description = description
            .get_optional_child("body")
            .and_then(|b| b.content_as_string())
            .map(|b| b.to_string());
        return Some(iq_result(&id).build());
    }
    if let Some(leave) = node.get_optional_child("leave") {
        for g in leave.get_children_by_tag("group") {
            let gid = attr_str(g, "id");
            let gid = gid.split('@').next().unwrap_or_default().to_string();
            if let Some(group) = groups.get_mut(&gid) {
                group.participants.retain(|(j, _)| *j != me);
            }
        }
        return Some(iq_result(&id).build());
    }
    None
}

/// A running peer; stops when dropped.
/// The LID the peer gives the account of `phone`: `9` and the number. WhatsApp's LIDs
/// are unrelated numbers; the peer derives its own so tests can name them. Number checks
/// and user-info queries (usync `lid`) answer it, a [`Command::Send`] may come from it,
/// and it shares the phone's Signal identity and keys (one account, two names).
pub fn lid_of(phone: &str) -> String {
    format!("9{phone}")
}

/// The phone number of a LID user the peer gave ([`lid_of`]).
pub fn phone_of_lid(lid_user: &str) -> Option<&str> {
    lid_user.strip_prefix('9').filter(|p| !p.is_empty())
}

/// The "about" text a user's profile has on the peer (usync `status`).
pub fn about_of(phone: &str) -> String {
    format!("Peer user {phone}")
}

/// A user's profile picture id on the peer (usync `picture`, `w:profile:picture`).
pub fn picture_id_of(phone: &str) -> u64 {
    phone.bytes().filter(u8::is_ascii_digit).fold(7u64, |h, b| {
        h.wrapping_mul(31).wrapping_add(u64::from(b - b'0'))
    }) % 1_000_000_000
}

pub struct Peer {
    addr: SocketAddr,
    inner: Arc<Inner>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Peer {
    /// Commands a connection may have queued before it loses the oldest.
    pub const COMMAND_BACKLOG: usize = 4096;

    /// Starts a peer on 127.0.0.1 with its own runtime.
    pub fn start() -> Peer {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("peer runtime");
        // Every connection sees every command; one that falls further behind than this
        // loses the oldest (wa-throughput queues up to this many sends at once).
        let (commands, _) = broadcast::channel(Self::COMMAND_BACKLOG);
        let media = Arc::new(media_host::Files::default());
        let media_addr = runtime.block_on(media_host::start(media.clone()));
        let inner = Arc::new(Inner {
            stats: Mutex::new(Stats::default()),
            reply: Mutex::new(PairReply::Ref),
            commands,
            signal: tokio::sync::Mutex::default(),
            refused: Mutex::default(),
            absent: Mutex::default(),
            unacked: Mutex::default(),
            polls: Mutex::default(),
            live: Mutex::default(),
            next_login: std::sync::atomic::AtomicU64::new(1),
            media,
            media_addr,
            groups: Mutex::default(),
        });
        let listener = runtime
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("peer bind");
        let addr = listener.local_addr().expect("peer addr");
        let accept_inner = inner.clone();
        runtime.spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let inner = accept_inner.clone();
                tokio::spawn(async move { serve(tcp, inner).await });
            }
        });
        Peer {
            addr,
            inner,
            runtime: Some(runtime),
        }
    }

    /// The URL to give the client (`--wa-url`).
    pub fn url(&self) -> String {
        format!("ws://{}/ws/chat", self.addr)
    }

    /// The media host's address (`127.0.0.1:PORT`).
    pub fn media_addr(&self) -> SocketAddr {
        self.inner.media_addr
    }

    /// Encrypts `file` as a sender's phone does a media of `kind`, and keeps it on the
    /// media host.
    fn host(
        &self,
        file: &[u8],
        kind: whatsapp_rust::wacore::download::MediaType,
        mimetype: &str,
    ) -> signal::Hosted {
        let enc =
            whatsapp_rust::wacore::upload::encrypt_media(file, kind).expect("encrypt the media");
        signal::Hosted {
            direct_path: self.inner.media.put(enc.data_to_upload),
            media_key: enc.media_key,
            file_sha256: enc.file_sha256,
            file_enc_sha256: enc.file_enc_sha256,
            size: file.len() as u64,
            mimetype: mimetype.to_string(),
        }
    }

    /// An image on the media host, and the message that points to it (send it with
    /// [`Command::Send`]).
    pub fn upload_image(&self, image: &[u8], mimetype: &str, caption: &str) -> signal::Content {
        signal::Content::Image {
            media: self.host(
                image,
                whatsapp_rust::wacore::download::MediaType::Image,
                mimetype,
            ),
            caption: caption.to_string(),
        }
    }

    /// A document on the media host, and the message that points to it (send it with
    /// [`Command::Send`]).
    pub fn upload_document(&self, file: &[u8], mimetype: &str, file_name: &str) -> signal::Content {
        signal::Content::HostedDocument {
            media: self.host(
                file,
                whatsapp_rust::wacore::download::MediaType::Document,
                mimetype,
            ),
            file_name: file_name.to_string(),
        }
    }

    /// The uploads the media host received: (direct path, encrypted length).
    pub fn media_uploads(&self) -> Vec<(String, usize)> {
        self.inner.media.uploads()
    }

    /// A snapshot of what the peer has seen.
    pub fn stats(&self) -> Stats {
        self.inner
            .stats
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// Sets how companion_hello is answered from now on.
    pub fn set_pair_reply(&self, reply: PairReply) {
        if let Ok(mut r) = self.inner.reply.lock() {
            *r = reply;
        }
    }

    /// From now on, a pre-key fetch for `phone`'s devices is refused with
    /// `<error code="404" text="item-not-found"/>` (the device is gone).
    pub fn refuse_keys_for(&self, phone: &str) {
        if let Ok(mut r) = self.inner.refused.lock() {
            r.push(phone.to_string());
        }
    }

    /// Serves `phone`'s keys again (undoes [`Peer::refuse_keys_for`]).
    pub fn serve_keys_for(&self, phone: &str) {
        if let Ok(mut r) = self.inner.refused.lock() {
            r.retain(|p| p != phone);
        }
    }

    /// From now on `phone` has no WhatsApp account: a number check (usync `contact`)
    /// answers `type="out"` for it. Every other number has one.
    pub fn without_account(&self, phone: &str) {
        if let Ok(mut a) = self.inner.absent.lock() {
            a.push(phone.to_string());
        }
    }

    /// The peer's user `from` votes `options` (names) on poll `poll_id`, which the
    /// client of phone number `to` sent it: the option names hashed and encrypted with the
    /// poll's secret (kept when the peer decrypted the poll), as a `pollUpdateMessage`.
    /// `Err` when the peer never decrypted that poll.
    pub fn vote(
        &self,
        from: &str,
        to: &str,
        poll_id: &str,
        options: &[&str],
    ) -> Result<(), String> {
        let secret = self
            .inner
            .polls
            .lock()
            .ok()
            .and_then(|p| p.get(poll_id).cloned())
            .ok_or_else(|| format!("the peer never decrypted a poll {poll_id}"))?;
        let hashes: Vec<Vec<u8>> = options
            .iter()
            .map(|o| whatsapp_rust::wacore::poll::compute_option_hash(o).to_vec())
            .collect();
        let creator = Jid::pn(to.to_string()).to_string();
        let voter = Jid::pn(from.to_string()).to_string();
        let (enc_payload, iv) = whatsapp_rust::wacore::poll::encrypt_poll_vote_with_secret(
            &hashes, &secret, poll_id, &creator, &voter,
        )
        .map_err(|e| format!("encrypt the vote: {e}"))?;
        self.command(Command::Send {
            from: from.to_string(),
            to: to.to_string(),
            id: format!("3EB0VOTE{:012X}", rand::random::<u64>() & 0xFFFF_FFFF_FFFF),
            content: signal::Content::PollVote {
                chat: creator,
                poll_id: poll_id.to_string(),
                enc_payload,
                enc_iv: iv.to_vec(),
            },
        });
        Ok(())
    }

    /// How many devices of the account of phone number `phone` are logged in now.
    pub fn live(&self, phone: &str) -> usize {
        self.inner
            .live
            .lock()
            .map(|l| {
                l.keys()
                    .filter(|k| k.split(':').next() == Some(phone))
                    .count()
            })
            .unwrap_or(0)
    }

    /// Sends a command to every live connection.
    pub fn command(&self, command: Command) {
        let _ = self.inner.commands.send(command);
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

type Ws = WebSocketStream<TcpStream>;

/// The QR refs the peer's `pair-device` offers an unregistered client, in order.
pub const QR_REFS: [&str; 2] = ["2@peer-qr-ref-one", "2@peer-qr-ref-two"];

/// Reads one Noise frame from the WebSocket (the first message carries the WA header).
async fn next_frame(ws: &mut Ws, dec: &mut FrameDecoder, first: &mut bool) -> Option<Vec<u8>> {
    loop {
        if let Some(frame) = dec.decode_frame() {
            return Some(frame.to_vec());
        }
        let msg = ws.next().await?.ok()?;
        if !msg.is_binary() {
            if msg.is_close() {
                return None;
            }
            continue;
        }
        let mut chunk = msg.as_payload().to_vec();
        if *first {
            *first = false;
            if !chunk.starts_with(&WA_CONN_HEADER) {
                return None;
            }
            chunk.drain(..WA_CONN_HEADER.len());
        }
        dec.feed(&chunk);
    }
}

struct Session {
    ws: Ws,
    dec: FrameDecoder,
    first: bool,
    read_cipher: NoiseCipher,
    write_cipher: NoiseCipher,
    read_counter: u32,
    write_counter: u32,
    pairing_ref: Vec<u8>,
    login: bool,
    /// A logged-in client's own device JID (`15551234567:7@s.whatsapp.net`).
    client: Option<Jid>,
}

impl Session {
    /// Whether this connection is the logged-in client of phone number `phone`.
    fn is_client(&self, phone: &str) -> bool {
        self.client
            .as_ref()
            .is_some_and(|c| c.user.as_str() == phone)
    }

    async fn send(&mut self, node: &Node) -> bool {
        let Ok(plain) = marshal(node) else {
            return false;
        };
        let Ok(ct) = self
            .write_cipher
            .encrypt_with_counter(self.write_counter, &plain)
        else {
            return false;
        };
        self.write_counter += 1;
        let Ok(frame) = encode_frame(&ct, None) else {
            return false;
        };
        self.ws.send(Message::binary(frame)).await.is_ok()
    }
}

async fn handshake(mut ws: Ws) -> Option<Session> {
    let mut dec = FrameDecoder::new();
    let mut first = true;
    let server_static = KeyPair::generate(&mut rand::rng());
    let static_pub: [u8; 32] = server_static
        .public_key
        .public_key_bytes()
        .try_into()
        .ok()?;
    let cert_chain = cert_chain_bytes(&static_pub);

    let hello = next_frame(&mut ws, &mut dec, &mut first).await?;
    let msg = wap::HandshakeMessage::decode_from_slice(&hello).ok()?;
    let client_eph: [u8; 32] = msg.client_hello.into_option()?.ephemeral?.try_into().ok()?;
    let mut noise = NoiseHandshake::new(NOISE_PATTERN_XX, &WA_CONN_HEADER).ok()?;
    noise.authenticate(&client_eph);
    let eph = KeyPair::generate(&mut rand::rng());
    let eph_pub: [u8; 32] = eph.public_key.public_key_bytes().try_into().ok()?;
    noise.authenticate(&eph_pub);
    noise
        .mix_shared_secret(eph.private_key.serialize(), &client_eph)
        .ok()?;
    let enc_static = noise.encrypt(&static_pub).ok()?;
    noise
        .mix_shared_secret(server_static.private_key.serialize(), &client_eph)
        .ok()?;
    let enc_cert = noise.encrypt(&cert_chain).ok()?;
    let server_hello = wap::HandshakeMessage {
        server_hello: whatsapp_rust::buffa::MessageField::some(
            wap::handshake_message::ServerHello {
                ephemeral: Some(eph_pub.to_vec()),
                r#static: Some(enc_static),
                payload: Some(enc_cert),
                ..Default::default()
            },
        ),
        ..Default::default()
    };
    let frame = encode_frame(&server_hello.encode_to_vec(), None).ok()?;
    ws.send(Message::binary(frame)).await.ok()?;

    // A client that rejects our certificate closes here.
    let finish = next_frame(&mut ws, &mut dec, &mut first).await?;
    let cf = wap::HandshakeMessage::decode_from_slice(&finish)
        .ok()?
        .client_finish
        .into_option()?;
    let client_static: [u8; 32] = noise.decrypt(&cf.r#static?).ok()?.try_into().ok()?;
    noise
        .mix_shared_secret(eph.private_key.serialize(), &client_static)
        .ok()?;
    let payload = noise.decrypt(&cf.payload?).ok()?;
    let client_payload = wap::ClientPayload::decode_from_slice(&payload).ok()?;
    // A registered device logs in with its phone number as `username`.
    let login = client_payload.username.is_some();
    let client = client_payload
        .username
        .map(|user| Jid::pn_device(user.to_string(), client_payload.device.unwrap_or(0) as u16));
    // On the responder the first cipher is the client's write key.
    let (read_cipher, write_cipher) = noise.finish().ok()?;
    let mut pairing_ref = b"botvisor-peer-ref-".to_vec();
    pairing_ref.extend_from_slice(&rand::random::<u64>().to_be_bytes());
    Some(Session {
        ws,
        dec,
        first,
        read_cipher,
        write_cipher,
        read_counter: 0,
        write_counter: 0,
        pairing_ref,
        login,
        client,
    })
}

/// A certificate chain whose leaf is our static key, with zero signatures (accepted only
/// with `danger-skip-cert-chain-verify`). Its validity ended in 2023: the client checks
/// dates only to decide whether to resume with Noise IK on reconnect, so an expired chain
/// keeps every connection on XX, which is all this peer speaks.
fn cert_chain_bytes(server_static_pub: &[u8; 32]) -> Vec<u8> {
    use wap::cert_chain::{noise_certificate::Details, NoiseCertificate};
    use whatsapp_rust::buffa::MessageField;
    let cert = |details: Details| NoiseCertificate {
        details: Some(details.encode_to_vec()),
        signature: Some(vec![0u8; 64]),
    };
    wap::CertChain {
        intermediate: MessageField::some(cert(Details {
            serial: Some(1),
            issuer_serial: Some(0),
            key: Some(vec![0xCC; 32]),
            not_before: Some(1_600_000_000),
            not_after: Some(1_700_000_000),
        })),
        leaf: MessageField::some(cert(Details {
            serial: Some(2),
            issuer_serial: Some(1),
            key: Some(server_static_pub.to_vec()),
            not_before: Some(1_600_000_500),
            not_after: Some(1_699_999_500),
        })),
    }
    .encode_to_vec()
}

fn record(inner: &Inner, f: impl FnOnce(&mut Stats)) {
    if let Ok(mut s) = inner.stats.lock() {
        f(&mut s);
    }
}

fn command_node(command: &Command, pairing_ref: &[u8]) -> Option<Node> {
    Some(match command {
        Command::Close
        | Command::Send { .. }
        | Command::SendGroup { .. }
        | Command::SendTampered { .. }
        | Command::MarkRead { .. } => return None,
        Command::LoggedOut => NodeBuilder::new("failure").attr("reason", "401").build(),
        Command::ClientOutdated => NodeBuilder::new("failure").attr("reason", "405").build(),
        Command::StreamReplaced => NodeBuilder::new("stream:error")
            .children([NodeBuilder::new("conflict")
                .attr("type", "replaced")
                .build()])
            .build(),
        Command::TemporaryBan { code, expire_secs } => NodeBuilder::new("failure")
            .attr("reason", "402")
            .attr("code", code.to_string())
            .attr("expire", expire_secs.to_string())
            .build(),
        Command::RefreshCode => NodeBuilder::new("notification")
            .attr("type", "link_code_companion_reg")
            .attr("id", "peer-refresh")
            .attr("from", "s.whatsapp.net")
            .children([NodeBuilder::new("link_code_companion_reg")
                .attr("stage", "refresh_code")
                .attr("force_manual_refresh", "true")
                .children([NodeBuilder::new("link_code_pairing_ref")
                    .bytes(pairing_ref.to_vec())
                    .build()])
                .build()])
            .build(),
    })
}

async fn serve(tcp: TcpStream, inner: Arc<Inner>) {
    let Ok((_request, ws)) = ServerBuilder::new().accept(tcp).await else {
        return;
    };
    record(&inner, |s| s.connections += 1);
    let mut commands = inner.commands.subscribe();
    let Some(mut session) = tokio::time::timeout(Duration::from_secs(20), handshake(ws))
        .await
        .ok()
        .flatten()
    else {
        record(&inner, |s| s.failed_handshakes += 1);
        return;
    };
    record(&inner, |s| s.handshakes += 1);
    // A logged-in device is one connection at a time, as on WhatsApp: a newer login kicks
    // the older socket with a conflict, and the overlap is recorded.
    let kick = Arc::new(tokio::sync::Notify::new());
    let _live = match (&session.client, session.login) {
        (Some(c), true) => Some(LiveLogin::register(&inner, c, kick.clone())),
        _ => None,
    };
    if session.login {
        record(&inner, |s| s.logins += 1);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        // The account's LID (with the client's device), as WhatsApp names it at login:
        // the client needs it to send to groups.
        let mut success = NodeBuilder::new("success").attr("t", now.to_string());
        if let Some(c) = &session.client {
            success = success.attr("lid", Jid::lid_device(lid_of(&c.user), c.device));
        }
        let success = success.build();
        if !session.send(&success).await {
            return;
        }
        // What the client did not acknowledge before is delivered again (offline).
        let user = session.client.as_ref().map(|c| c.user.to_string());
        let queued: Vec<Node> = inner
            .unacked
            .lock()
            .map(|q| {
                q.iter()
                    .filter(|(to, _)| Some(to) == user.as_ref())
                    .map(|(_, n)| n.clone())
                    .collect()
            })
            .unwrap_or_default();
        for node in &queued {
            let mut node = node.clone();
            node.attrs.insert("offline", "1");
            record(&inner, |s| s.redelivered += 1);
            if !session.send(&node).await {
                return;
            }
        }
        let offline = NodeBuilder::new("ib")
            .children([NodeBuilder::new("offline")
                .attr("count", queued.len().to_string())
                .build()])
            .build();
        if !session.send(&offline).await {
            return;
        }
    } else {
        // As WhatsApp does for an unregistered client: QR refs to rotate through.
        let pair_device = NodeBuilder::new("iq")
            .attr("type", "set")
            .attr("id", "peer-pair-device")
            .attr("from", "s.whatsapp.net")
            .attr("xmlns", "md")
            .children([NodeBuilder::new("pair-device")
                .children(
                    QR_REFS
                        .iter()
                        .map(|r| NodeBuilder::new("ref").bytes(r.as_bytes().to_vec()).build()),
                )
                .build()])
            .build();
        if !session.send(&pair_device).await {
            return;
        }
    }
    loop {
        tokio::select! {
            _ = kick.notified() => {
                let conflict = NodeBuilder::new("stream:error")
                    .children([NodeBuilder::new("conflict").attr("type", "replaced").build()])
                    .build();
                record(&inner, |s| s.replaced += 1);
                let _ = session.send(&conflict).await;
                return;
            }
            command = commands.recv() => {
                let Ok(command) = command else { return };
                if let Command::MarkRead { from, to, id } = &command {
                    let ours = session.is_client(to);
                    let read = receipt_node(&Jid::pn(from.to_string()), id, Some("read"));
                    if ours && !session.send(&read).await {
                        return;
                    }
                    continue;
                }
                if let Command::SendGroup { group, author, to, id, content } = &command {
                    if session.is_client(to)
                        && !send_group_message(&mut session, &inner, group, author, id, content).await
                    {
                        return;
                    }
                    continue;
                }
                if let Command::Send { from, to, id, content }
                | Command::SendTampered { from, to, id, content } = &command
                {
                    let tamper = matches!(command, Command::SendTampered { .. });
                    let ours = session.is_client(to);
                    if ours && !send_message(&mut session, &inner, from, id, content, tamper).await {
                        return;
                    }
                    continue;
                }
                match command_node(&command, &session.pairing_ref) {
                    None => return, // Close: drop the socket
                    Some(node) => {
                        record(&inner, |s| s.commands_sent.push(node.tag.to_string()));
                        if !session.send(&node).await {
                            return;
                        }
                    }
                }
            }
            frame = next_frame(&mut session.ws, &mut session.dec, &mut session.first) => {
                let Some(mut buf) = frame else { return };
                if session.read_cipher.decrypt_in_place_with_counter(session.read_counter, &mut buf).is_err() {
                    return;
                }
                session.read_counter += 1;
                let Ok(plain) = unpack(&buf) else { return };
                let Ok(node) = unmarshal_ref(&plain) else { return };
                match node.tag.as_ref() {
                    "iq" => {}
                    "message" => {
                        for reply in on_client_message(&session, &inner, &node).await {
                            if !session.send(&reply).await {
                                return;
                            }
                        }
                        continue;
                    }
                    "receipt" => {
                        let attr = |k: &str| node.get_attr(k).map(|v| v.as_str().to_string());
                        let id = attr("id").unwrap_or_default();
                        let kind = attr("type").unwrap_or_else(|| "delivery".into());
                        // `inactive`: delivered to a device not in the foreground.
                        if kind == "delivery" || kind == "inactive" {
                            if let Ok(mut q) = inner.unacked.lock() {
                                q.retain(|(_, n)| {
                                    n.attrs.get("id").map(|v| v.as_str()).as_deref() != Some(id.as_str())
                                });
                            }
                        }
                        record(&inner, |s| s.receipts.push((id, kind)));
                        continue;
                    }
                    "presence" => {
                        let kind = node.get_attr("type").map(|v| v.as_str().to_string()).unwrap_or_default();
                        record(&inner, |s| s.presences.push(kind));
                        continue;
                    }
                    "chatstate" => {
                        let to = node.get_attr("to").map(|v| v.as_str().to_string()).unwrap_or_default();
                        let state = node
                            .children()
                            .and_then(|c| c.first())
                            .map(|c| {
                                let media = c.get_attr("media").map(|v| v.as_str().to_string());
                                match media {
                                    Some(m) => format!("{} {m}", c.tag),
                                    None => c.tag.to_string(),
                                }
                            })
                            .unwrap_or_default();
                        record(&inner, |s| s.chat_states.push((to, state)));
                        continue;
                    }
                    _ => continue,
                }
                if let Some(reply) = group_iq(&session, &inner, &node) {
                    if !session.send(&reply).await {
                        return;
                    }
                    continue;
                }
                if let Some(reply) = signal_iq(&session, &inner, &node).await {
                    if !session.send(&reply).await {
                        return;
                    }
                    continue;
                }
                let id = node.get_attr("id").map(|v| v.as_str().to_string()).unwrap_or_default();
                let reply = match node.get_optional_child_by_tag(&["link_code_companion_reg"]) {
                    Some(reg) => {
                        let phone = reg
                            .get_attr("jid")
                            .map(|v| v.as_str().split('@').next().unwrap_or("").to_string())
                            .unwrap_or_default();
                        record(&inner, |s| s.companion_hellos.push(phone));
                        let answer = inner.reply.lock().map(|r| r.clone()).unwrap_or(PairReply::Ref);
                        match answer {
                            PairReply::Ref => NodeBuilder::new("iq")
                                .attr("type", "result")
                                .attr("id", id)
                                .attr("from", "s.whatsapp.net")
                                .children([NodeBuilder::new("link_code_companion_reg")
                                    .children([NodeBuilder::new("link_code_pairing_ref")
                                        .bytes(session.pairing_ref.clone())
                                        .build()])
                                    .build()])
                                .build(),
                            PairReply::RateLimited { backoff_secs } => NodeBuilder::new("iq")
                                .attr("type", "error")
                                .attr("id", id)
                                .attr("from", "s.whatsapp.net")
                                .children([NodeBuilder::new("error")
                                    .attr("code", "429")
                                    .attr("text", "rate-overlimit")
                                    .attr("backoff", backoff_secs.to_string())
                                    .build()])
                                .build(),
                        }
                    }
                    // A profile picture's URL: every account has one (on the media host),
                    // but those without an account (404, as WhatsApp answers).
                    None if attr_str(&node, "xmlns") == "w:profile:picture"
                        && node.get_optional_child("picture").is_some() =>
                    {
                        let target = node.get_attr("target").and_then(|v| v.to_jid());
                        let phone = target.map(|t| {
                            if t.is_lid() {
                                phone_of_lid(&t.user).unwrap_or(&t.user).to_string()
                            } else {
                                t.user.to_string()
                            }
                        });
                        let absent = phone.as_ref().is_none_or(|p| {
                            inner.absent.lock().map(|a| a.contains(p)).unwrap_or(false)
                        });
                        record(&inner, |s| s.picture_queries += 1);
                        let picture = match phone.filter(|_| !absent) {
                            Some(p) => NodeBuilder::new("picture")
                                .attr("id", picture_id_of(&p).to_string())
                                .attr("type", "image")
                                .attr("url", format!("https://{}/pp/{p}.jpg", inner.media_addr))
                                .attr("direct_path", format!("/pp/{p}.jpg"))
                                .build(),
                            None => NodeBuilder::new("picture")
                                .children([NodeBuilder::new("error")
                                    .attr("code", "404")
                                    .attr("text", "item-not-found")
                                    .build()])
                                .build(),
                        };
                        NodeBuilder::new("iq")
                            .attr("type", "result")
                            .attr("id", id)
                            .attr("from", "s.whatsapp.net")
                            .children([picture])
                            .build()
                    }
                    // The media host, as WhatsApp's `media_conn` names its own.
                    None if node.get_optional_child_by_tag(&["media_conn"]).is_some() => NodeBuilder::new("iq")
                        .attr("type", "result")
                        .attr("id", id)
                        .attr("from", "s.whatsapp.net")
                        .children([NodeBuilder::new("media_conn")
                            .attr("auth", "peer-media-auth")
                            .attr("ttl", "3600")
                            .attr("max_buckets", "1")
                            .children([NodeBuilder::new("host")
                                .attr("hostname", inner.media_addr.to_string())
                                .build()])
                            .build()])
                        .build(),
                    None if node.get_optional_child_by_tag(&["remove-companion-device"]).is_some() => {
                        record(&inner, |s| s.unlinks += 1);
                        NodeBuilder::new("iq")
                            .attr("type", "result")
                            .attr("id", id)
                            .attr("from", "s.whatsapp.net")
                            .build()
                    }
                    None => {
                        record(&inner, |s| s.other_iqs += 1);
                        NodeBuilder::new("iq")
                            .attr("type", "result")
                            .attr("id", id)
                            .attr("from", "s.whatsapp.net")
                            .build()
                    }
                };
                if !session.send(&reply).await {
                    return;
                }
            }
        }
    }
}

/// A device's live login, registered while its connection lasts.
struct LiveLogin {
    inner: Arc<Inner>,
    account: String,
    id: u64,
}

impl LiveLogin {
    /// Registers `client`'s login; an older live connection of the same device is
    /// recorded as an overlap and told to go.
    fn register(inner: &Arc<Inner>, client: &Jid, kick: Arc<tokio::sync::Notify>) -> LiveLogin {
        let account = format!("{}:{}", client.user, client.device);
        let id = inner
            .next_login
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let older = inner
            .live
            .lock()
            .ok()
            .and_then(|mut l| l.insert(account.clone(), (id, kick)));
        if let Some((_, older)) = older {
            record(inner, |s| s.overlaps.push(account.clone()));
            older.notify_one();
        }
        LiveLogin {
            inner: inner.clone(),
            account,
            id,
        }
    }
}

impl Drop for LiveLogin {
    fn drop(&mut self) {
        if let Ok(mut l) = self.inner.live.lock() {
            if l.get(&self.account).is_some_and(|(id, _)| *id == self.id) {
                l.remove(&self.account);
            }
        }
    }
}

fn attr_str(node: &NodeRef<'_>, key: &str) -> String {
    node.get_attr(key)
        .map(|v| v.as_str().to_string())
        .unwrap_or_default()
}

fn iq_result(id: &str) -> NodeBuilder {
    NodeBuilder::new("iq")
        .attr("type", "result")
        .attr("id", id.to_string())
        .attr("from", "s.whatsapp.net")
}

/// Answers the IQs a send needs, as WhatsApp's server would: device lists (`usync`),
/// pre-key bundles, pre-key uploads and counts (`encrypt`). `None` for any other IQ.
async fn signal_iq(session: &Session, inner: &Inner, node: &NodeRef<'_>) -> Option<Node> {
    let id = attr_str(node, "id");
    let xmlns = attr_str(node, "xmlns");
    match xmlns.as_str() {
        "usync" => {
            let usync = node.get_optional_child("usync")?;
            let query = usync.get_optional_child("query");
            let wants = |p: &str| query.is_some_and(|q| q.get_optional_child(p).is_some());
            if wants("devices") {
                record(inner, |s| s.device_queries += 1);
            }
            // Every user exists (but those marked `without_account`), with one device: its
            // phone (device 0).
            let users = usync
                .get_optional_child("list")
                .map(|l| {
                    l.get_children_by_tag("user")
                        .map(|u| {
                            let jid = u
                                .get_attr("jid")
                                .and_then(|v| v.to_jid())
                                .map(|j| j.to_non_ad());
                            let contact = u
                                .get_optional_child("contact")
                                .and_then(|c| c.content_as_string());
                            let mut children = Vec::new();
                            if wants("contact") {
                                let phone = jid
                                    .as_ref()
                                    .map(|j| j.user.to_string())
                                    .or_else(|| {
                                        contact
                                            .as_deref()
                                            .map(|t| t.trim_start_matches('+').to_string())
                                    })
                                    .unwrap_or_default();
                                let absent = inner
                                    .absent
                                    .lock()
                                    .map(|a| a.contains(&phone))
                                    .unwrap_or(false);
                                let kind = if absent { "out" } else { "in" };
                                let mut c = NodeBuilder::new("contact").attr("type", kind);
                                if let Some(text) = &contact {
                                    c = c.string_content(text.to_string());
                                }
                                children.push(c.build());
                            }
                            // The account's phone: the user's, or the LID's owner.
                            let account = jid
                                .as_ref()
                                .map(|j| {
                                    if j.is_lid() {
                                        phone_of_lid(&j.user).unwrap_or(&j.user).to_string()
                                    } else {
                                        j.user.to_string()
                                    }
                                })
                                .or_else(|| {
                                    contact
                                        .as_deref()
                                        .map(|t| t.trim_start_matches('+').to_string())
                                });
                            // LIDs go in number checks and user-info queries (those that
                            // ask `contact` or `status` too), not in the device lists a send
                            // asks for: there the client would move every chat to LID
                            // addressing, as WhatsApp's migrated accounts do, and the peer
                            // keeps the phone-number addressing the other tests check.
                            let lookup = wants("contact") || wants("status");
                            if let (true, Some(phone)) = (wants("lid") && lookup, &account) {
                                if !jid.as_ref().is_some_and(|j| j.is_lid()) {
                                    children.push(
                                        NodeBuilder::new("lid")
                                            .attr("val", Jid::lid(lid_of(phone)))
                                            .build(),
                                    );
                                }
                            }
                            if let (true, Some(phone)) = (wants("status"), &account) {
                                children.push(
                                    NodeBuilder::new("status")
                                        .attr("t", "1700000000")
                                        .string_content(about_of(phone))
                                        .build(),
                                );
                            }
                            if let (true, Some(phone)) = (wants("picture"), &account) {
                                children.push(
                                    NodeBuilder::new("picture")
                                        .attr("id", picture_id_of(phone).to_string())
                                        .build(),
                                );
                            }
                            if wants("devices") {
                                children.push(
                                    NodeBuilder::new("devices")
                                        .children([NodeBuilder::new("device-list")
                                            .children([NodeBuilder::new("device")
                                                .attr("id", "0")
                                                .build()])
                                            .build()])
                                        .build(),
                                );
                            }
                            let mut user = NodeBuilder::new("user");
                            if let Some(jid) = jid {
                                user = user.attr("jid", jid);
                            } else if let Some(text) = &contact {
                                let phone = text.trim_start_matches('+').to_string();
                                user = user.attr("jid", Jid::pn(phone));
                            }
                            user.children(children).build()
                        })
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default();
            Some(
                iq_result(&id)
                    .children([NodeBuilder::new("usync")
                        .children([NodeBuilder::new("list").children(users).build()])
                        .build()])
                    .build(),
            )
        }
        "encrypt" => {
            let kind = attr_str(node, "type");
            let mut signal = inner.signal.lock().await;
            if kind == "get" {
                if let Some(key) = node.get_optional_child("key") {
                    let mut served = Vec::new();
                    let users: Vec<Node> = key
                        .get_children_by_tag("user")
                        .filter_map(|u| u.get_attr("jid").and_then(|v| v.to_jid()))
                        .map(|jid| {
                            let refused = inner
                                .refused
                                .lock()
                                .map(|r| r.iter().any(|p| p.as_str() == jid.user.as_str()))
                                .unwrap_or(false);
                            if refused {
                                return NodeBuilder::new("user")
                                    .attr("jid", jid)
                                    .children([NodeBuilder::new("error")
                                        .attr("code", "404")
                                        .attr("text", "item-not-found")
                                        .build()])
                                    .build();
                            }
                            served.push(jid.to_string());
                            signal.bundle_node(&jid)
                        })
                        .collect();
                    record(inner, |s| s.bundles_served.extend(served));
                    return Some(
                        iq_result(&id)
                            .children([NodeBuilder::new("list").children(users).build()])
                            .build(),
                    );
                }
                if node.get_optional_child("count").is_some() {
                    let count = session
                        .client
                        .as_ref()
                        .map_or(0, |c| signal.pre_key_count(c));
                    return Some(
                        iq_result(&id)
                            .children([NodeBuilder::new("count")
                                .attr("value", count.to_string())
                                .build()])
                            .build(),
                    );
                }
                return None;
            }
            let client = session.client.as_ref()?;
            if node.get_optional_child("registration").is_some() {
                signal.record_upload(client, node);
                record(inner, |s| s.pre_key_uploads += 1);
            } else if let Some(skey) = node
                .get_optional_child("rotate")
                .and_then(|r| r.get_optional_child("skey"))
            {
                signal.record_rotation(client, skey);
            }
            Some(iq_result(&id).build())
        }
        _ => None,
    }
}

/// Decrypts every `<enc>` of a client's `<message>` meant for the peer's users, records
/// it, and returns the server's `<ack>`, then a delivery receipt from each recipient that
/// decrypted it (not from the sender's own phone).
async fn on_client_message(session: &Session, inner: &Inner, node: &NodeRef<'_>) -> Vec<Node> {
    let id = attr_str(node, "id");
    let to = attr_str(node, "to");
    let ack = NodeBuilder::new("ack")
        .attr("class", "message")
        .attr("id", id.clone())
        .attr("from", to.clone())
        .attr("t", unix_now().to_string())
        .build();
    let Some(client) = session.client.clone() else {
        return vec![ack];
    };
    // `<participants><to jid><enc/></to>...</participants>`, or a bare `<enc>` for `to`.
    let mut targets: Vec<(Jid, String, Vec<u8>)> = Vec::new();
    let enc_of = |n: &NodeRef<'_>| -> Option<(String, Vec<u8>)> {
        let enc = n.get_optional_child("enc")?;
        Some((attr_str(enc, "type"), enc.content_bytes()?.to_vec()))
    };
    if let Some(participants) = node.get_optional_child("participants") {
        for t in participants.get_children_by_tag("to") {
            if let (Some(jid), Some((kind, bytes))) =
                (t.get_attr("jid").and_then(|v| v.to_jid()), enc_of(t))
            {
                targets.push((jid, kind, bytes));
            }
        }
    } else if let (Some(jid), Some((kind, bytes))) =
        (node.get_attr("to").and_then(|v| v.to_jid()), enc_of(node))
    {
        targets.push((jid, kind, bytes));
    }
    // A group message: its content is the top-level `<enc type="skmsg">`, the pairwise
    // parts give each member device the client's sender key (the first time).
    let group = node
        .get_attr("to")
        .and_then(|v| v.to_jid())
        .filter(|j| j.is_group());
    let skmsg = node
        .get_children_by_tag("enc")
        .find(|e| attr_str(e, "type") == "skmsg")
        .and_then(|e| e.content_bytes().map(<[u8]>::to_vec));
    let mut skdms: Vec<(Jid, Vec<u8>)> = Vec::new();
    let mut signal = inner.signal.lock().await;
    let mut replies = vec![ack];
    for (jid, kind, bytes) in targets {
        match signal.decrypt(&client, &jid, &kind, &bytes).await {
            Ok(plain) if plain.skdm.is_some() && group.is_some() => {
                skdms.push((jid.clone(), plain.skdm.unwrap_or_default()));
            }
            Ok(plain) => {
                if let (Some(secret), Ok(mut polls)) = (&plain.poll_secret, inner.polls.lock()) {
                    polls.insert(id.clone(), secret.clone());
                }
                let about = match &plain.media {
                    Some(m) => Some(describe_media(inner, m)),
                    None => plain.about,
                };
                record(inner, |s| {
                    s.decrypted.push(signal::Decrypted {
                        to: jid.to_string(),
                        id: id.clone(),
                        kind: kind.clone(),
                        text: plain.text,
                        about,
                    })
                });
                if jid.user != client.user {
                    replies.push(receipt_node(&jid.to_non_ad(), &id, None));
                }
            }
            Err(e) => record(inner, |s| {
                s.signal_errors.push(format!("{id} for {jid}: {e}"))
            }),
        }
    }
    if let (Some(group), Some(skmsg)) = (group, skmsg) {
        // Every member but the client reads it: with the sender key this message gave
        // it, or one an earlier message did.
        let members: Vec<Jid> = inner
            .groups
            .lock()
            .ok()
            .and_then(|g| g.get(&group.user.to_string()).cloned())
            .map(|g| {
                g.participants
                    .iter()
                    .filter_map(|(j, _)| j.parse::<Jid>().ok())
                    .filter(|j| j.user != client.user)
                    .collect()
            })
            .unwrap_or_default();
        let group_jid = group.to_string();
        for member in members {
            let skdm = skdms
                .iter()
                .find(|(j, _)| j.user == member.user)
                .map(|(_, k)| k.as_slice());
            if skdm.is_none() && !signal.has_sender_key(&group_jid, &client, &member) {
                continue;
            }
            match signal
                .group_decrypt(&group_jid, &client, &member, skdm, &skmsg)
                .await
            {
                Ok(plain) => {
                    let about = match &plain.media {
                        Some(m) => Some(describe_media(inner, m)),
                        None => plain.about,
                    };
                    record(inner, |s| {
                        s.decrypted.push(signal::Decrypted {
                            to: member.to_string(),
                            id: id.clone(),
                            kind: "skmsg".into(),
                            text: plain.text,
                            about,
                        })
                    });
                    replies.push(group_receipt(&group, &member, &id));
                }
                Err(e) => record(inner, |s| {
                    s.signal_errors
                        .push(format!("{id} in {group_jid} for {member}: {e}"))
                }),
            }
        }
    }
    replies
}

/// A member's delivery receipt for a group message the client sent.
fn group_receipt(group: &Jid, member: &Jid, id: &str) -> Node {
    NodeBuilder::new("receipt")
        .attr("from", group.clone())
        .attr("participant", member.to_non_ad())
        .attr("id", id.to_string())
        .attr("t", unix_now().to_string())
        .build()
}

/// Sends the client a message the peer's member `author` writes in `group`: the `skmsg`,
/// after the pairwise part with the author's sender key when the client has not had it.
/// `false` when the socket is gone (an encryption failure is recorded).
async fn send_group_message(
    session: &mut Session,
    inner: &Inner,
    group: &str,
    author: &str,
    id: &str,
    content: &signal::Content,
) -> bool {
    let Some(client) = session.client.clone() else {
        return true;
    };
    let author = Jid::pn(author.to_string());
    let sealed = inner
        .signal
        .lock()
        .await
        .group_encrypt(group, &author, &client, &content.message())
        .await;
    let (pairwise, skmsg) = match sealed {
        Ok(x) => x,
        Err(e) => {
            record(inner, |s| {
                s.signal_errors.push(format!("group send {id}: {e}"))
            });
            return true;
        }
    };
    let mut encs = Vec::new();
    if let Some((kind, bytes)) = pairwise {
        encs.push(
            NodeBuilder::new("enc")
                .attr("v", "2")
                .attr("type", kind)
                .bytes(bytes)
                .build(),
        );
    }
    let mut enc = NodeBuilder::new("enc").attr("v", "2").attr("type", "skmsg");
    if let Some(media) = content.media_type() {
        enc = enc.attr("mediatype", media);
    }
    encs.push(enc.bytes(skmsg).build());
    let message = NodeBuilder::new("message")
        .attr("from", group.to_string())
        .attr("participant", author)
        .attr("id", id.to_string())
        .attr("t", unix_now().to_string())
        .attr("type", content.stanza_type())
        .attr("notify", "Peer Contact")
        .children(encs)
        .build();
    record(inner, |s| {
        s.messages_sent.push((id.to_string(), "skmsg".to_string()))
    });
    if let Ok(mut q) = inner.unacked.lock() {
        q.push((client.user.to_string(), message.clone()));
    }
    session.send(&message).await
}

/// A receipt from the peer's user `from` for message `id` (`None`: delivery).
/// What a media message's bytes are, read back from the media host and decrypted with
/// its key: `image image/png 1234 sha256:HEX caption CAPTION`, or why they could not be.
fn describe_media(inner: &Inner, m: &signal::MediaRef) -> String {
    use sha2::Digest;
    let Some(encrypted) = inner.media.get(&m.direct_path) else {
        return format!(
            "{} {} not on the media host ({})",
            m.kind, m.mimetype, m.direct_path
        );
    };
    let plain = match whatsapp_rust::wacore::download::DownloadUtils::decrypt_stream(
        &encrypted[..],
        &m.media_key,
        m.media_type(),
    ) {
        Ok(p) => p,
        Err(e) => return format!("{} {} undecryptable: {e}", m.kind, m.mimetype),
    };
    let hash: String = sha2::Sha256::digest(&plain)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut d = format!("{} {} {} sha256:{hash}", m.kind, m.mimetype, plain.len());
    if let Some(c) = &m.caption {
        d.push_str(&format!(" caption {c}"));
    }
    if let Some(f) = &m.file_name {
        d.push_str(&format!(" file {f}"));
    }
    d
}

fn receipt_node(from: &Jid, id: &str, kind: Option<&'static str>) -> Node {
    let mut r = NodeBuilder::new("receipt")
        .attr("from", from.clone())
        .attr("id", id.to_string())
        .attr("t", unix_now().to_string());
    if let Some(kind) = kind {
        r = r.attr("type", kind);
    }
    r.build()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Sends the client a message from the peer's user `from`, Signal-encrypted. `false`
/// when the socket is gone (an encryption failure is recorded and the connection goes on).
async fn send_message(
    session: &mut Session,
    inner: &Inner,
    from: &str,
    id: &str,
    content: &signal::Content,
    tamper: bool,
) -> bool {
    let Some(client) = session.client.clone() else {
        return true;
    };
    // A sender named by its LID (`<lid>@lid`): the stanza names it by the LID alone, as
    // WhatsApp does for an account that hides its number.
    let sender = match from.strip_suffix("@lid") {
        Some(lid) => Jid::lid(lid.to_string()),
        None => Jid::pn(from.to_string()),
    };
    let sealed = inner
        .signal
        .lock()
        .await
        .encrypt(&sender, &client, &content.message())
        .await;
    let (kind, mut bytes) = match sealed {
        Ok(x) => x,
        Err(e) => {
            record(inner, |s| s.signal_errors.push(format!("send {id}: {e}")));
            return true;
        }
    };
    if tamper {
        // The last bytes are the message's MAC: the client's check must fail.
        if let Some(b) = bytes.last_mut() {
            *b ^= 0x5a;
        }
    }
    let message = NodeBuilder::new("message")
        .attr("from", sender)
        .attr("id", id.to_string())
        .attr("t", unix_now().to_string())
        .attr("type", content.stanza_type())
        .attr("notify", "Peer Contact")
        .children([{
            let mut enc = NodeBuilder::new("enc").attr("v", "2").attr("type", kind);
            if let Some(media) = content.media_type() {
                enc = enc.attr("mediatype", media);
            }
            enc.bytes(bytes).build()
        }])
        .build();
    record(inner, |s| {
        s.messages_sent.push((id.to_string(), kind.to_string()))
    });
    if let Ok(mut q) = inner.unacked.lock() {
        q.push((client.user.to_string(), message.clone()));
    }
    session.send(&message).await
}
