//! `SimLink`: a simulated network for tests, demos and benchmarks. Not WhatsApp.
//!
//! It keeps each session's "credentials" in a real SQLite file (the same place the real
//! link keeps its store), issues pairing codes in WhatsApp's `XXXX-XXXX` format,
//! "pairs" after `--sim-pair-delay`, and takes injected faults.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use super::StoreFailure;

use botvisor_actors::{
    now_ms, BoxFuture, ChatPresence, Connection as LinkConnection, Done, EventSink, Fault,
    FaultEffect, Fetched, InboundMessage, Link, LinkError, LinkEvent, MessageRef, NumberCheck,
    Outgoing, PairingCode, PairingQr, Profile, SessionSpec,
};

use crate::paths;

/// Settings of the simulated link.
#[derive(Debug, Clone)]
pub struct SimSettings {
    /// Pairing code validity.
    pub code_ttl: Duration,
    /// Time from code to "paired".
    pub pair_delay: Duration,
    /// Latency before the first code or connect.
    pub connect_delay: Duration,
    /// Time from "connecting" to "online" (the simulated login).
    pub login_delay: Duration,
    /// Answer `!ping` with `pong` and the uptime (`--no-builtin-commands` turns it off).
    pub builtin_commands: bool,
}

impl Default for SimSettings {
    fn default() -> Self {
        SimSettings {
            code_ttl: Duration::from_secs(3 * 60),
            pair_delay: Duration::from_secs(3),
            connect_delay: Duration::ZERO,
            login_delay: Duration::from_millis(20),
            builtin_commands: true,
        }
    }
}

/// Credential reads and writes running at once. Thousands of sessions connecting together
/// (a boot with `--boot-interval 0s`) otherwise fan out to hundreds of blocking threads that
/// mostly wait on SQLite's process-wide locks.
const FILE_WORK_AT_ONCE: usize = 4;

/// Messages the simulated network keeps per session (the newest).
const SENT_KEPT: usize = 1_000;

/// A message a simulated session sent.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SentMessage {
    /// The id the simulated network gave it.
    pub message_id: String,
    /// The recipient as given.
    pub to: String,
    /// The text (for another kind, its one-line summary: see `Outgoing::summary`).
    pub text: String,
    /// `text`, `location`, `contact` or `poll`.
    pub kind: &'static str,
    /// Who a text mentions (JIDs).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mentions: Vec<String>,
    /// The structured part of a message that is not a text, under its kind's name
    /// (`location`, `contact`, `poll`), as in the send body.
    #[serde(flatten)]
    pub content: serde_json::Map<String, serde_json::Value>,
    /// When (ms since the epoch).
    pub at_ms: u64,
}

/// The simulated network's memory: what each session sent, and which sessions are
/// connected (the live connection's event sink, which tells that connection's entry from
/// a newer one's, and when it connected).
#[derive(Default)]
struct Network {
    sent: std::sync::Mutex<HashMap<String, VecDeque<SentMessage>>>,
    live: std::sync::Mutex<HashMap<String, (EventSink, Instant)>>,
    /// Received media, by locator, oldest first.
    media: std::sync::Mutex<VecDeque<(String, Arc<Vec<u8>>)>>,
    /// The groups of the simulated network, by JID.
    groups: std::sync::Mutex<HashMap<String, SimGroup>>,
}

/// A group of the simulated network.
#[derive(Debug, Clone)]
struct SimGroup {
    info: botvisor_actors::GroupInfo,
    invite: String,
}

/// Groups the simulated network holds at most (it is a simulation: a bound, not a model).
pub const SIM_GROUPS: usize = 10_000;

/// A random invite code (22 characters of A-Z, a-z, 0-9, as WhatsApp's).
fn invite_code() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    (0..22)
        .map(|_| ALPHABET[(random_u64() % ALPHABET.len() as u64) as usize] as char)
        .collect()
}

impl SimGroup {
    /// Whether the account `me` is in the group.
    fn has(&self, me: &str) -> bool {
        self.info.participants.iter().any(|p| p.jid == me)
    }
}

/// Group `group`, when the account `me` is in it.
fn joined<'a>(
    groups: &'a mut HashMap<String, SimGroup>,
    me: &str,
    group: &str,
) -> Result<&'a mut SimGroup, LinkError> {
    groups.get_mut(group).filter(|g| g.has(me)).ok_or_else(|| {
        LinkError::refused(
            botvisor_actors::Refusal::NotFound,
            format!("The session's account is not in group {group}"),
        )
    })
}

impl Network {
    /// Does `op` for the account `me`: the simulated network keeps groups in memory, as
    /// WhatsApp would, and checks what WhatsApp checks (membership, admin rights).
    fn group(&self, me: &str, op: botvisor_actors::GroupOp) -> Result<Done, LinkError> {
        use botvisor_actors::Refusal;
        use botvisor_actors::{GroupMember, GroupOp, ParticipantAction, ParticipantChange};
        let mut groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        let admin = |g: &SimGroup| {
            g.info
                .participants
                .iter()
                .any(|p| p.jid == me && (p.admin || p.super_admin))
        };
        let not_admin = |group: &str| {
            LinkError::refused(
                Refusal::NotAllowed,
                format!("The session's account is not an admin of group {group}"),
            )
        };
        match op {
            GroupOp::List => {
                let mine = groups
                    .values()
                    .filter(|g| g.has(me))
                    .map(|g| g.info.clone())
                    .collect();
                Ok(Done::Groups(mine))
            }
            GroupOp::Create {
                subject,
                participants,
            } => {
                if groups.len() >= SIM_GROUPS {
                    return Err(LinkError::new(format!(
                        "the simulated network holds at most {SIM_GROUPS} groups"
                    )));
                }
                let id = format!("120363{:012}@g.us", random_u64() % 1_000_000_000_000);
                let mut people = vec![GroupMember {
                    jid: me.to_string(),
                    admin: true,
                    super_admin: true,
                }];
                for p in participants {
                    if p != me && !people.iter().any(|m| m.jid == p) {
                        people.push(GroupMember {
                            jid: p,
                            admin: false,
                            super_admin: false,
                        });
                    }
                }
                let info = botvisor_actors::GroupInfo {
                    id: id.clone(),
                    subject,
                    description: None,
                    owner: Some(me.to_string()),
                    created_at_ms: Some(now_ms()),
                    participants: people,
                };
                groups.insert(
                    id,
                    SimGroup {
                        info: info.clone(),
                        invite: invite_code(),
                    },
                );
                Ok(Done::Groups(vec![info]))
            }
            GroupOp::Info { group } => {
                let g = joined(&mut groups, me, &group)?;
                Ok(Done::Groups(vec![g.info.clone()]))
            }
            GroupOp::Update {
                group,
                subject,
                description,
            } => {
                let g = joined(&mut groups, me, &group)?;
                if let Some(s) = subject {
                    g.info.subject = s;
                }
                if let Some(d) = description {
                    g.info.description = d;
                }
                Ok(Done::Taken)
            }
            GroupOp::Participants {
                group,
                action,
                participants,
            } => {
                let g = joined(&mut groups, me, &group)?;
                if !admin(g) {
                    return Err(not_admin(&group));
                }
                let people = &mut g.info.participants;
                let changes = participants
                    .into_iter()
                    .map(|jid| {
                        let at = people.iter().position(|m| m.jid == jid);
                        let error = match (action, at) {
                            (ParticipantAction::Add, Some(_)) => Some("409 already a participant"),
                            (ParticipantAction::Add, None) => {
                                people.push(GroupMember {
                                    jid: jid.clone(),
                                    admin: false,
                                    super_admin: false,
                                });
                                None
                            }
                            (_, None) => Some("404 not a participant"),
                            (_, Some(i)) if people[i].super_admin => {
                                Some("403 the group's creator cannot be changed")
                            }
                            (ParticipantAction::Remove, Some(i)) => {
                                people.remove(i);
                                None
                            }
                            (ParticipantAction::Promote, Some(i)) => {
                                people[i].admin = true;
                                None
                            }
                            (ParticipantAction::Demote, Some(i)) => {
                                people[i].admin = false;
                                None
                            }
                        };
                        ParticipantChange {
                            jid,
                            error: error.map(str::to_string),
                        }
                    })
                    .collect();
                Ok(Done::Participants(changes))
            }
            GroupOp::Invite { group, reset } => {
                let g = joined(&mut groups, me, &group)?;
                if !admin(g) {
                    return Err(not_admin(&group));
                }
                if reset {
                    g.invite = invite_code();
                }
                Ok(Done::Invite(g.invite.clone()))
            }
            GroupOp::Join { code } => {
                let g = groups
                    .values_mut()
                    .find(|g| g.invite == code)
                    .ok_or_else(|| {
                        LinkError::refused(
                            Refusal::NotFound,
                            "No group has this invite code (revoked?)",
                        )
                    })?;
                if !g.has(me) {
                    g.info.participants.push(GroupMember {
                        jid: me.to_string(),
                        admin: false,
                        super_admin: false,
                    });
                }
                Ok(Done::Groups(vec![g.info.clone()]))
            }
            GroupOp::Leave { group } => {
                let g = joined(&mut groups, me, &group)?;
                g.info.participants.retain(|p| p.jid != me);
                if g.info.participants.is_empty() {
                    groups.remove(&group);
                }
                Ok(Done::Taken)
            }
        }
    }
}

impl Network {
    /// Keeps a received media's bytes; returns its locator.
    fn keep_media(&self, message_id: &str, bytes: Arc<Vec<u8>>) -> String {
        let locator = format!("sim:{message_id}");
        let mut media = self.media.lock().unwrap_or_else(|p| p.into_inner());
        media.push_back((locator.clone(), bytes));
        let mut total: usize = media.iter().map(|(_, b)| b.len()).sum();
        while media.len() > MEDIA_KEPT || (total > MEDIA_KEPT_BYTES && media.len() > 1) {
            if let Some((_, gone)) = media.pop_front() {
                total -= gone.len();
            }
        }
        locator
    }

    fn media_of(&self, locator: &str) -> Option<Arc<Vec<u8>>> {
        let media = self.media.lock().unwrap_or_else(|p| p.into_inner());
        media
            .iter()
            .rev()
            .find(|(l, _)| l == locator)
            .map(|(_, b)| b.clone())
    }
}

impl Network {
    /// Records a message the session sent; returns its id.
    fn record_sent(
        &self,
        user_id: &str,
        to: &str,
        content: &Outgoing,
        mentions: &[String],
        message_id: Option<&str>,
    ) -> String {
        let mut sent = self.sent.lock().unwrap_or_else(|p| p.into_inner());
        let queue = sent.entry(user_id.to_string()).or_default();
        // A message sent again under its id (a queued send retried after a crash) is the
        // same message, as on WhatsApp.
        if let Some(id) = message_id.filter(|id| queue.iter().any(|m| m.message_id == *id)) {
            return id.to_string();
        }
        let message = SentMessage {
            message_id: message_id.map_or_else(sim_message_id, str::to_string),
            to: to.to_string(),
            text: content.summary(),
            kind: content.kind(),
            mentions: mentions.to_vec(),
            content: crate::webhooks::content_json(content)
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            at_ms: now_ms(),
        };
        let id = message.message_id.clone();
        if queue.len() >= SENT_KEPT {
            queue.pop_front();
        }
        queue.push_back(message);
        id
    }
}

/// The simulated link.
pub struct SimLink {
    data_dir: PathBuf,
    settings: SimSettings,
    file_work: Arc<Semaphore>,
    network: Arc<Network>,
    /// Several nodes: the credentials are rows of the shared database (a session that
    /// moves to another node stays paired), not files of one node's data dir.
    rows: std::sync::OnceLock<crate::db::postgres::Rows>,
}

impl SimLink {
    /// A simulated network storing its files under `data_dir`.
    pub fn new(data_dir: PathBuf, settings: SimSettings) -> SimLink {
        SimLink {
            data_dir,
            settings,
            file_work: Arc::new(Semaphore::new(FILE_WORK_AT_ONCE)),
            network: Arc::default(),
            rows: std::sync::OnceLock::new(),
        }
    }

    /// Keeps the sessions' credentials in `rows` (several nodes on one database).
    pub fn keep_credentials_in(&self, rows: crate::db::postgres::Rows) {
        let _ = self.rows.set(rows);
    }

    /// What a session sent, oldest first (the newest 1,000).
    pub fn sent(&self, user_id: &str) -> Vec<SentMessage> {
        let sent = self.network.sent.lock().unwrap_or_else(|p| p.into_inner());
        sent.get(user_id)
            .map(|q| q.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// A message from `from` arrives for a session (as if someone wrote to the bot);
    /// `Err` when the session has no live connection. Returns the message, for the caller
    /// to keep durably before it answers (as the real link does before it acknowledges
    /// one). The bot answers `!ping` as on the real link (its `pong` is listed among what
    /// the session sent, addressed to the chat the ping came from).
    pub fn deliver(
        &self,
        user_id: &str,
        from: &str,
        group: Option<&str>,
        arrival: Arrival,
    ) -> Result<InboundMessage, LinkError> {
        let live = self.network.live.lock().unwrap_or_else(|p| p.into_inner());
        let (_, connected) = live
            .get(user_id)
            .ok_or_else(|| LinkError::new(format!("session {user_id} is not connected")))?;
        let sender = super::chat_jid(from);
        let chat = group.map_or_else(|| sender.clone(), str::to_string);
        let text = arrival.text;
        let mut msg = InboundMessage {
            id: format!("SIMIN{:016X}", random_u64()),
            chat: chat.clone(),
            from: sender.clone(),
            from_lid: sender.ends_with("@lid").then(|| sender.clone()),
            from_phone: None,
            push_name: arrival.push_name,
            timestamp_ms: now_ms(),
            text: text.clone(),
            kind: arrival.kind.into(),
            reply_to: arrival.reply_to,
            mentions: arrival.mentions,
            refers: arrival.refers,
            media: arrival.media.map(Box::new),
        };
        if let (Some(media), Some(bytes)) = (msg.media.as_mut(), arrival.media_bytes) {
            media.locator = Some(self.network.keep_media(&msg.id, bytes));
        }
        let text = text
            .as_deref()
            .filter(|_| msg.refers.is_none())
            .unwrap_or("");
        let reply = self
            .settings
            .builtin_commands
            .then(|| super::builtin_reply(text, connected.elapsed()))
            .flatten();
        drop(live);
        if let Some(reply) = reply {
            self.network
                .record_sent(user_id, &chat, &Outgoing::Text(reply), &[], None);
        }
        Ok(msg)
    }
}

/// What arrives for a simulated session, shaped as the real link reports it: a text
/// (`kind` "text"), another kind (`text` `None`), a reaction (`kind` "reaction"), an edit
/// (`kind` "text", the new text) or a revoke (`kind` "other"), maybe quoting a message.
#[derive(Debug, Clone, Default)]
pub struct Arrival {
    /// The text of a text, or an edit's new text.
    pub text: Option<String>,
    /// As `InboundMessage::kind`.
    pub kind: &'static str,
    /// The message it quotes.
    pub reply_to: Option<String>,
    /// Who a text mentions (JIDs).
    pub mentions: Vec<String>,
    /// What it does to another message.
    pub refers: Option<botvisor_actors::Refers>,
    /// A media's description.
    pub media: Option<botvisor_actors::ReceivedMedia>,
    /// A media's bytes: the simulated network keeps them for downloads (the newest
    /// [`MEDIA_KEPT`], at most [`MEDIA_KEPT_BYTES`] in all), as WhatsApp's media servers
    /// keep a real one's.
    pub media_bytes: Option<Arc<Vec<u8>>>,
    /// The sender's push name (`pushName`).
    pub push_name: Option<String>,
}

/// Received media the simulated network keeps for downloads: how many, and how many
/// bytes in all (the oldest go first).
pub const MEDIA_KEPT: usize = 256;
/// See [`MEDIA_KEPT`].
pub const MEDIA_KEPT_BYTES: usize = 64 * 1024 * 1024;

/// Numbers with this prefix have no account on the simulated network.
pub const SIM_NO_ACCOUNT: &str = "999";

/// Runs credential file work on the blocking pool, a few at a time.
async fn file_work<T: Send + 'static>(
    slots: &Semaphore,
    f: impl FnOnce() -> Result<T, StoreFailure> + Send + 'static,
) -> Result<T, StoreFailure> {
    let _slot = slots
        .acquire()
        .await
        .map_err(|e| StoreFailure::other(e.to_string()))?;
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreFailure::other(e.to_string()))
        .and_then(|r| r)
}

/// A random `XXXX-XXXX` code from A-Z and 0-9.
pub fn pairing_code() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut out = String::with_capacity(9);
    let mut bits = random_u64();
    for i in 0..8 {
        if i == 4 {
            out.push('-');
            bits = random_u64();
        }
        out.push(ALPHABET[(bits % ALPHABET.len() as u64) as usize] as char);
        bits /= ALPHABET.len() as u64;
    }
    out
}

/// A simulated QR payload: shaped like WhatsApp's (`ref,key,key,secret`) but marked as
/// simulated, so no phone can mistake it for a real one.
pub fn qr_payload() -> String {
    format!(
        "2@botvisor-sim-{:016x}{:016x},SIMULATED,NOT-A-WHATSAPP-CODE,{:016x}",
        random_u64(),
        random_u64(),
        random_u64()
    )
}

/// A message id of the simulated network (what a send, a reaction or an edit answers).
fn sim_message_id() -> String {
    format!("SIM{:016X}", random_u64())
}

fn random_u64() -> u64 {
    // RandomState is seeded per instance from the OS; good enough for a simulator.
    let mut h = RandomState::new().build_hasher();
    h.write_u64(now_ms());
    h.finish()
}

/// What the simulated network remembers of a session. It lives in a small SQLite file
/// (the same place the real link keeps its store, so backups work alike) that is read
/// when the session connects and written when it pairs: no file stays open while a
/// simulated session is idle.
#[derive(Debug, Clone, Default, PartialEq)]
struct Creds {
    paired: bool,
    name: Option<String>,
}

fn open_creds(path: &Path) -> Result<Connection, StoreFailure> {
    if !path.exists() {
        paths::create_private_file(path)
            .map_err(|e| StoreFailure::other(format!("cannot create {}: {e}", path.display())))?;
    }
    let conn = Connection::open(path)?;
    conn.execute_batch(
        "PRAGMA busy_timeout = 5000; PRAGMA synchronous = NORMAL;
         CREATE TABLE IF NOT EXISTS sim_credentials (key TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL);",
    )?;
    Ok(conn)
}

/// Reads a session's credentials (creating the file, with an identity, on first use).
fn read_creds(path: &Path) -> Result<Creds, StoreFailure> {
    if let Some(creds) = read_known_creds(path) {
        return Ok(creds);
    }
    let conn = open_creds(path)?;
    let (creds, identity) = creds_in(&conn)?;
    if !identity {
        conn.execute(
            "INSERT OR IGNORE INTO sim_credentials (key, value) VALUES ('identity', ?1)",
            params![format!("{:016x}{:016x}", random_u64(), random_u64())],
        )?;
    }
    Ok(creds)
}

/// The credentials of a session that has them, read without writing anything (read-only,
/// no pragmas, no schema statement: a boot reads 100,000 of these). `None` for anything
/// else (no file yet, no identity yet, an error): the full path creates, or reports.
fn read_known_creds(path: &Path) -> Option<Creds> {
    peek_known_creds(path).or_else(|| read_known_creds_by_sqlite(path))
}

/// [`read_known_creds`] straight from the file, without SQLite (link/peek.rs): `None`
/// where the file is not in the plain shape, or holds no identity yet.
fn peek_known_creds(path: &Path) -> Option<Creds> {
    let (mut creds, mut identity) = (Creds::default(), false);
    for row in super::peek::table_rows(path, "sim_credentials")? {
        match (
            row.first().cloned().flatten(),
            row.get(1).cloned().flatten(),
        ) {
            (Some(key), Some(value)) => creds_row(&mut creds, &mut identity, &key, value),
            _ => return None,
        }
    }
    identity.then_some(creds)
}

/// [`read_known_creds`] through SQLite.
fn read_known_creds_by_sqlite(path: &Path) -> Option<Creds> {
    let flags =
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).ok()?;
    let (creds, identity) = creds_in(&conn).ok()?;
    identity.then_some(creds)
}

/// The credentials in an open store, and whether it holds an identity yet.
fn creds_in(conn: &Connection) -> rusqlite::Result<(Creds, bool)> {
    let mut stmt = conn.prepare("SELECT key, value FROM sim_credentials")?;
    let mut rows = stmt.query([])?;
    let (mut creds, mut identity) = (Creds::default(), false);
    while let Some(row) = rows.next()? {
        let (key, value): (String, String) = (row.get(0)?, row.get(1)?);
        creds_row(&mut creds, &mut identity, &key, value);
    }
    Ok((creds, identity))
}

/// What one `sim_credentials` row says.
fn creds_row(creds: &mut Creds, identity: &mut bool, key: &str, value: String) {
    match key {
        "identity" => *identity = true,
        "paired" => creds.paired = true,
        "name" => creds.name = Some(value),
        _ => {}
    }
}

/// Where one simulated session's credentials are.
#[derive(Clone)]
enum CredsAt {
    /// Its SQLite file in the data dir.
    File(PathBuf),
    /// A row of the shared database (several nodes).
    Row(crate::db::postgres::Rows, String),
}

impl CredsAt {
    fn read(&self) -> Result<Creds, StoreFailure> {
        match self {
            CredsAt::File(path) => read_creds(path),
            CredsAt::Row(rows, user_id) => rows
                .sim_credentials(user_id)
                .map(|name| Creds {
                    paired: name.is_some(),
                    name: name.flatten(),
                })
                .map_err(|e| StoreFailure::other(e.to_string())),
        }
    }

    fn write_paired(&self, name: &str) -> Result<(), StoreFailure> {
        match self {
            CredsAt::File(path) => write_paired(path, name),
            CredsAt::Row(rows, user_id) => rows
                .sim_paired(user_id, name)
                .map_err(|e| StoreFailure::other(e.to_string())),
        }
    }

    /// What an error names.
    fn name(&self) -> String {
        match self {
            CredsAt::File(path) => super::file_name(path),
            CredsAt::Row(rows, _) => format!("bv_sim_credentials at {}", rows.target()),
        }
    }
}

/// Records that the phone paired.
fn write_paired(path: &Path, name: &str) -> Result<(), StoreFailure> {
    let conn = open_creds(path)?;
    conn.execute(
        "INSERT OR REPLACE INTO sim_credentials (key, value) VALUES ('paired', ?1), ('name', ?2)",
        params![now_ms().to_string(), name],
    )
    .map(|_| ())
    .map_err(StoreFailure::from)
}

/// A simulated session's live connection.
pub struct SimConnection {
    task: JoinHandle<()>,
    events: EventSink,
    user_id: String,
    /// The account's JID (its phone number's).
    me: String,
    network: Arc<Network>,
}

impl Drop for SimConnection {
    fn drop(&mut self) {
        self.task.abort();
        let mut live = self.network.live.lock().unwrap_or_else(|p| p.into_inner());
        // Only this connection's entry: a newer one may have taken its place.
        if live
            .get(&self.user_id)
            .is_some_and(|(s, _)| s.same(&self.events))
        {
            live.remove(&self.user_id);
        }
    }
}

impl LinkConnection for SimConnection {
    fn logout(&mut self) -> BoxFuture<'_, Result<(), LinkError>> {
        Box::pin(async { Ok(()) })
    }

    fn close(&mut self) -> BoxFuture<'_, ()> {
        self.task.abort();
        Box::pin(async {})
    }

    /// The simulated network takes every kind the API sends.
    fn send(
        &self,
        to: &str,
        content: &Outgoing,
        _reply_to: Option<&MessageRef>,
        mentions: &[String],
        message_id: Option<&str>,
    ) -> BoxFuture<'static, Result<String, LinkError>> {
        let id = self
            .network
            .record_sent(&self.user_id, to, content, mentions, message_id);
        Box::pin(async move { Ok(id) })
    }

    /// The simulated network takes reactions (it keeps no reaction state); a reaction
    /// has a message id of its own, as on WhatsApp.
    fn react(
        &self,
        _message: &MessageRef,
        _emoji: &str,
    ) -> BoxFuture<'static, Result<String, LinkError>> {
        let id = sim_message_id();
        Box::pin(async move { Ok(id) })
    }

    /// The simulated network takes edits (it keeps no message bodies).
    fn edit(
        &self,
        _message: &MessageRef,
        _text: &str,
    ) -> BoxFuture<'static, Result<String, LinkError>> {
        let id = sim_message_id();
        Box::pin(async move { Ok(id) })
    }

    /// The simulated network takes revokes (it keeps no message bodies).
    fn revoke(&self, _message: &MessageRef) -> BoxFuture<'static, Result<(), LinkError>> {
        Box::pin(async { Ok(()) })
    }

    /// Groups live in the simulated network's memory (lost with the process).
    fn group(&self, op: botvisor_actors::GroupOp) -> BoxFuture<'static, Result<Done, LinkError>> {
        let answer = self.network.group(&self.me, op);
        Box::pin(async move { answer })
    }

    /// A received media's bytes, while the simulated network still keeps them.
    fn download(&self, locator: &str) -> BoxFuture<'static, Result<Fetched, LinkError>> {
        let found = self.network.media_of(locator);
        Box::pin(async move {
            found.map(Fetched::Memory).ok_or_else(|| {
                LinkError::new(format!(
                    "the simulated network no longer keeps this media (it keeps the newest {MEDIA_KEPT})"
                ))
            })
        })
    }

    /// The simulated network has an account for every number except those starting
    /// with `999` (so that both answers can be seen); it gives no LIDs.
    fn check_numbers(
        &self,
        phones: &[String],
    ) -> BoxFuture<'static, Result<Vec<NumberCheck>, LinkError>> {
        let checks = phones
            .iter()
            .map(|phone| {
                let on_whatsapp = !phone.starts_with(SIM_NO_ACCOUNT);
                NumberCheck {
                    phone: phone.clone(),
                    on_whatsapp,
                    jid: on_whatsapp.then(|| format!("{phone}@s.whatsapp.net")),
                    lid: None,
                }
            })
            .collect();
        Box::pin(async move { Ok(checks) })
    }

    /// The simulated network keeps no profiles: it answers the contact's JID and nothing
    /// else (no LID, no "about", no picture).
    fn profile(&self, contact: &str) -> BoxFuture<'static, Result<Profile, LinkError>> {
        let jid = super::chat_jid(contact);
        Box::pin(async move {
            Ok(Profile {
                jid,
                ..Profile::default()
            })
        })
    }

    /// The simulated network takes read receipts (it keeps no read state).
    fn mark_read(
        &self,
        _chat: &str,
        _sender: Option<&str>,
        _message_ids: &[String],
    ) -> BoxFuture<'static, Result<(), LinkError>> {
        Box::pin(async { Ok(()) })
    }

    /// The simulated network takes the session's presence (nobody watches it).
    fn own_presence(&self, _available: bool) -> BoxFuture<'static, Result<(), LinkError>> {
        Box::pin(async { Ok(()) })
    }

    /// The simulated network takes chat presence (nobody watches it).
    fn chat_presence(
        &self,
        _chat: &str,
        _state: ChatPresence,
    ) -> BoxFuture<'static, Result<(), LinkError>> {
        Box::pin(async { Ok(()) })
    }

    fn inject(&mut self, fault: Fault) -> Result<FaultEffect, LinkError> {
        match fault {
            Fault::Panic => Ok(FaultEffect::Panic),
            Fault::Hang => Ok(FaultEffect::Hang),
            Fault::Disconnect => {
                self.task.abort();
                self.events.emit(LinkEvent::Crashed {
                    error: "sim: connection dropped (injected disconnect)".into(),
                });
                Ok(FaultEffect::Handled)
            }
            Fault::Logout => {
                self.task.abort();
                self.events.emit(LinkEvent::LoggedOut {
                    reason: "sim: the phone removed this device (injected)".into(),
                });
                Ok(FaultEffect::Handled)
            }
        }
    }
}

impl Link for SimLink {
    fn name(&self) -> &'static str {
        "sim"
    }

    fn connect(
        &self,
        spec: SessionSpec,
        events: EventSink,
    ) -> BoxFuture<'static, Result<Box<dyn LinkConnection>, LinkError>> {
        let at = match self.rows.get() {
            Some(rows) => CredsAt::Row(rows.clone(), spec.user_id.clone()),
            None => CredsAt::File(paths::credentials(&self.data_dir, &spec.user_id)),
        };
        let settings = self.settings.clone();
        let slots = self.file_work.clone();
        let network = self.network.clone();
        Box::pin(async move {
            // A credential file in its plain shape is read in line (two small pages,
            // a few µs: a boot of 100,000 sessions reads 100,000 of them); anything else
            // goes to SQLite on the blocking pool.
            let peeked = match &at {
                CredsAt::File(path) => peek_known_creds(path),
                CredsAt::Row(..) => None,
            };
            let creds = match peeked {
                Some(creds) => creds,
                None => {
                    let read = at.clone();
                    file_work(&slots, move || read.read()).await.map_err(|e| {
                        super::credential_error("sim: cannot read credentials", &at.name(), &e)
                    })?
                }
            };
            let sink = events.clone();
            let user_id = spec.user_id.clone();
            let me = format!("{}@s.whatsapp.net", spec.phone_number);
            network
                .live
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(user_id.clone(), (events.clone(), Instant::now()));
            let task = tokio::spawn(run(spec, settings, at, creds, slots, sink));
            Ok(Box::new(SimConnection {
                task,
                events,
                user_id,
                me,
                network,
            }) as Box<dyn LinkConnection>)
        })
    }

    fn accepts_faults(&self) -> bool {
        true
    }

    fn remove_data(&self, user_id: &str) -> Result<(), LinkError> {
        // (A row goes with the session's row, in the commit that deletes it.)
        paths::remove_credentials(&self.data_dir, user_id)
    }
}

/// Sleeps, unless `d` is zero (a zero timer still waits for tokio's next 1 ms tick).
async fn pause(d: Duration) {
    if !d.is_zero() {
        tokio::time::sleep(d).await;
    }
}

async fn run(
    spec: SessionSpec,
    s: SimSettings,
    at: CredsAt,
    creds: Creds,
    slots: Arc<Semaphore>,
    events: EventSink,
) {
    pause(s.connect_delay).await;
    let mut name = creds.name;
    if !creds.paired {
        let mut remaining = s.pair_delay;
        loop {
            let expires_at_ms = now_ms() + s.code_ttl.as_millis() as u64;
            events.emit(LinkEvent::PairingQr(PairingQr {
                data: qr_payload(),
                expires_at_ms,
            }));
            events.emit(LinkEvent::PairingCode(PairingCode {
                code: pairing_code(),
                expires_at_ms,
            }));
            if remaining <= s.code_ttl {
                tokio::time::sleep(remaining).await;
                break;
            }
            // The code expires before the phone enters it: issue a fresh one.
            tokio::time::sleep(s.code_ttl).await;
            remaining -= s.code_ttl;
        }
        let paired_name = format!("Sim {}", spec.phone_number);
        let written = paired_name.clone();
        let saved = file_work(&slots, move || at.write_paired(&written)).await;
        if let Err(e) = saved {
            events.emit(LinkEvent::Crashed {
                error: format!("sim: cannot store credentials: {e}"),
            });
            return;
        }
        name = Some(paired_name);
    }
    events.emit(LinkEvent::Connecting);
    pause(s.login_delay).await;
    events.emit(LinkEvent::Online { name });
    // "Connected": the simulated network needs nothing more until the session ends.
    std::future::pending::<()>().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_have_whatsapps_format() {
        for _ in 0..200 {
            let c = pairing_code();
            assert_eq!(c.len(), 9);
            assert_eq!(&c[4..5], "-");
            assert!(c
                .chars()
                .enumerate()
                .all(|(i, ch)| i == 4 || ch.is_ascii_uppercase() || ch.is_ascii_digit()));
        }
        assert_ne!(pairing_code(), pairing_code());
    }
}

#[cfg(test)]
mod creds_tests {
    use super::*;

    /// Descriptors of this process open on `path` (other tests run in parallel).
    fn open_on(path: &Path) -> usize {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .flatten()
            .filter(|e| std::fs::read_link(e.path()).is_ok_and(|t| t.starts_with(path)))
            .count()
    }

    #[test]
    fn credentials_are_read_and_written_without_keeping_a_file_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("u.db");
        assert_eq!(read_creds(&path).unwrap(), Creds::default());
        write_paired(&path, "Sim 1555").unwrap();
        let creds = read_creds(&path).unwrap();
        assert!(creds.paired);
        assert_eq!(creds.name.as_deref(), Some("Sim 1555"));
        // The read-only path sees what the full one does, and nothing where it must not.
        assert_eq!(read_known_creds(&path), Some(creds));
        assert_eq!(read_known_creds(&dir.path().join("none.db")), None);
        let garbage = dir.path().join("garbage.db");
        std::fs::write(&garbage, vec![7u8; 8192]).unwrap();
        assert_eq!(read_known_creds(&garbage), None);
        assert!(
            read_creds(&garbage).is_err(),
            "a corrupt file is still reported"
        );
        assert_eq!(open_on(dir.path()), 0, "no descriptor stays open");
        // Read straight from the file where it can (link/peek.rs), through SQLite where
        // not: the same answer either way.
        write_paired(&path, "Bot ✓ 🤖, renamed").unwrap();
        assert!(peek_known_creds(&path).is_some(), "read without SQLite");
        assert_eq!(peek_known_creds(&path), read_known_creds_by_sqlite(&path));
        assert_eq!(
            read_known_creds(&path).and_then(|c| c.name),
            Some("Bot ✓ 🤖, renamed".to_string())
        );
        write_paired(&path, &"long ".repeat(2_000)).unwrap();
        assert_eq!(
            peek_known_creds(&path),
            None,
            "an overflow page goes to SQLite"
        );
        assert_eq!(read_known_creds(&path), read_known_creds_by_sqlite(&path));
        assert!(read_known_creds(&path).is_some_and(|c| c.paired));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
