//! Who a request is, and what it may do: the admin key (`--api-key`), scoped keys made
//! with `POST /api/keys`, or nobody (an open read).
//!
//! A scoped key has scopes (what it may do) and a set of sessions (which ids it may
//! touch: exact ids, prefixes written `shop_*`, or `*` for all). The secret is
//! `bvk_<id>_<64 hex>` (256 random bits), shown once; only its SHA-256 is kept, in the
//! `api_keys` setting of the session database (one JSON list: keys are few and change
//! rarely), so either engine holds them and `migrate` copies them. A key is looked up by
//! the id inside it and its hash compared in constant time.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use botvisor_actors::{now_ms, StorageError};

use crate::store::Store;

/// The setting the keys are kept in.
const SETTING: &str = "api_keys";
/// The secrets' recognisable prefix.
pub const PREFIX: &str = "bvk_";
/// A key's last use is written back at most this often (it is exact in memory).
const LAST_USE_SAVED_EVERY_MS: u64 = 60_000;
/// Session entries one key may list.
pub const MAX_SESSION_ENTRIES: usize = 1_000;
/// Keys the server keeps.
pub const MAX_KEYS: usize = 10_000;

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Read sessions, their events, queues, stats and the event stream.
    Read,
    /// Send and act on messages, chats and contacts.
    Send,
    /// Create, start, stop, log out, back up and restore sessions.
    Control,
    /// Read pairing codes and QR codes (and get them in the event stream).
    Pairing,
    /// A session's own receiver, dead letters and their replay.
    Webhooks,
    /// Delete sessions.
    Delete,
    /// Everything, and (with every session) the keys, the audit and fleet-wide reads.
    Admin,
}

/// Every scope by its name, in the order the API lists them.
pub const SCOPES: [(&str, Scope); 7] = [
    ("read", Scope::Read),
    ("send", Scope::Send),
    ("control", Scope::Control),
    ("pairing", Scope::Pairing),
    ("webhooks", Scope::Webhooks),
    ("delete", Scope::Delete),
    ("admin", Scope::Admin),
];

impl Scope {
    /// The scope's name in the API.
    pub fn name(self) -> &'static str {
        SCOPES
            .iter()
            .find(|(_, s)| *s == self)
            .map_or("admin", |(n, _)| n)
    }

    fn bit(self) -> u8 {
        1 << (SCOPES.iter().position(|(_, s)| *s == self).unwrap_or(6) as u8)
    }

    /// The scope named `name`.
    pub fn parse(name: &str) -> Option<Scope> {
        SCOPES.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
    }
}

/// One entry of a key's session set.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    /// Every session.
    All,
    /// Ids that start with this.
    Prefix(String),
    /// This id.
    Exact(String),
}

impl Pattern {
    fn parse(entry: &str) -> Option<Pattern> {
        if entry == "*" {
            return Some(Pattern::All);
        }
        let (id, prefix) = match entry.strip_suffix('*') {
            Some(p) => (p, true),
            None => (entry, false),
        };
        if !super::request::valid_user_id(id) {
            return None;
        }
        Some(if prefix {
            Pattern::Prefix(id.to_string())
        } else {
            Pattern::Exact(id.to_string())
        })
    }

    fn matches(&self, id: &str) -> bool {
        match self {
            Pattern::All => true,
            Pattern::Prefix(p) => id.starts_with(p.as_str()),
            Pattern::Exact(e) => e == id,
        }
    }

    fn text(&self) -> String {
        match self {
            Pattern::All => "*".into(),
            Pattern::Prefix(p) => format!("{p}*"),
            Pattern::Exact(e) => e.clone(),
        }
    }
}

/// A scoped key, as the server holds it (never its secret).
#[derive(Debug)]
pub struct Key {
    /// Its id (public; inside the secret). Shared with the records it is credited on.
    pub id: Arc<str>,
    /// SHA-256 of the secret.
    hash: [u8; 32],
    scopes: u8,
    sessions: Vec<Pattern>,
    /// When it stops working (ms since the epoch).
    pub expires_at: Option<u64>,
    /// The operator's note.
    pub note: Option<String>,
    /// When it was made (ms since the epoch).
    pub created_at: u64,
    /// When it was last used (ms since the epoch; 0: never).
    last_used: AtomicU64,
    /// The last use as last saved.
    saved_use: AtomicU64,
}

impl Key {
    /// Whether it may do what `scope` covers (`admin` covers every scope).
    pub fn may(&self, scope: Scope) -> bool {
        self.scopes & (scope.bit() | Scope::Admin.bit()) != 0
    }

    /// Whether it may touch session `id`.
    pub fn sees(&self, id: &str) -> bool {
        self.sessions.iter().any(|p| p.matches(id))
    }

    /// Whether it reaches every session.
    pub fn sees_all(&self) -> bool {
        self.sessions.contains(&Pattern::All)
    }

    /// Its scopes' names.
    pub fn scope_names(&self) -> Vec<&'static str> {
        SCOPES
            .iter()
            .filter(|(_, s)| self.scopes & s.bit() != 0)
            .map(|(n, _)| *n)
            .collect()
    }

    /// Its session set as written.
    pub fn session_entries(&self) -> Vec<String> {
        self.sessions.iter().map(Pattern::text).collect()
    }

    /// When it was last used (ms since the epoch).
    pub fn last_used(&self) -> Option<u64> {
        Some(self.last_used.load(Ordering::Relaxed)).filter(|&t| t > 0)
    }

    fn stored(&self) -> Stored {
        Stored {
            id: self.id.to_string(),
            hash: hex::encode(self.hash),
            scopes: self.scope_names().iter().map(|s| s.to_string()).collect(),
            sessions: self.session_entries(),
            expires_at: self.expires_at,
            note: self.note.clone(),
            created_at: self.created_at,
            last_used_at: self.last_used(),
        }
    }

    fn of(s: Stored) -> Option<Key> {
        let used = s.last_used_at.unwrap_or(0);
        Some(Key {
            scopes: scope_bits(&s.scopes)?,
            sessions: s
                .sessions
                .iter()
                .map(|e| Pattern::parse(e))
                .collect::<Option<_>>()?,
            id: s.id.into(),
            hash: hex::decode(&s.hash).ok()?.try_into().ok()?,
            expires_at: s.expires_at,
            note: s.note,
            created_at: s.created_at,
            last_used: AtomicU64::new(used),
            saved_use: AtomicU64::new(used),
        })
    }
}

/// A key as stored.
#[derive(Clone, Serialize, Deserialize)]
struct Stored {
    id: String,
    hash: String,
    scopes: Vec<String>,
    sessions: Vec<String>,
    expires_at: Option<u64>,
    note: Option<String>,
    created_at: u64,
    last_used_at: Option<u64>,
}

fn scope_bits<S: AsRef<str>>(names: &[S]) -> Option<u8> {
    names
        .iter()
        .try_fold(0u8, |bits, n| Some(bits | Scope::parse(n.as_ref())?.bit()))
}

/// What a new key is asked to be (already checked by the handler's parser).
pub struct NewKey {
    /// Scope names.
    pub scopes: Vec<String>,
    /// Session entries (`id`, `prefix*`, `*`).
    pub sessions: Vec<String>,
    /// Expiry (ms since the epoch).
    pub expires_at: Option<u64>,
    /// A note.
    pub note: Option<String>,
}

/// Why a new key's fields are refused.
pub fn check_new(scopes: &[String], sessions: &[String]) -> Result<(), String> {
    if scopes.is_empty() {
        return Err("scopes must name at least one scope".into());
    }
    if let Some(bad) = scopes.iter().find(|s| Scope::parse(s).is_none()) {
        let known: Vec<&str> = SCOPES.iter().map(|(n, _)| *n).collect();
        return Err(format!(
            "unknown scope {bad:?}; the scopes are {}",
            known.join(", ")
        ));
    }
    if sessions.is_empty() {
        return Err(
            "sessions must name at least one session id, prefix (shop_*) or * for all".into(),
        );
    }
    if sessions.len() > MAX_SESSION_ENTRIES {
        return Err(format!(
            "sessions may list at most {MAX_SESSION_ENTRIES} entries"
        ));
    }
    if let Some(bad) = sessions.iter().find(|s| Pattern::parse(s).is_none()) {
        return Err(format!(
            "sessions entry {bad:?} is not a session id (a-z, 0-9, _, -), a prefix ending in * or *"
        ));
    }
    Ok(())
}

/// The server's scoped keys.
pub struct Keys {
    store: Arc<Store>,
    keys: RwLock<HashMap<String, Arc<Key>>>,
    /// One save at a time, each writing the whole list as it then is.
    saving: tokio::sync::Mutex<()>,
}

/// A key that is not valid: why (the message of the 401).
pub type Refusal = &'static str;

impl Keys {
    /// The keys the database holds.
    pub async fn load(store: Arc<Store>) -> Result<Keys, StorageError> {
        let keys = Keys {
            store,
            keys: RwLock::new(HashMap::new()),
            saving: tokio::sync::Mutex::new(()),
        };
        keys.reload().await?;
        Ok(keys)
    }

    /// Reads the keys again (another node changed them): new ones are accepted, revoked
    /// ones refused from the next request on; a key both know keeps its latest use.
    pub async fn reload(&self) -> Result<(), StorageError> {
        let json = self.store.setting(SETTING).await?;
        self.replace(parse_stored(json.as_deref())?);
        Ok(())
    }

    /// The map becomes `stored` (a key already here keeps its object and its uses).
    fn replace(&self, stored: Vec<Stored>) {
        let mut map = self.write();
        let mut next = HashMap::with_capacity(stored.len());
        for s in stored {
            let id = s.id.clone();
            let used = s.last_used_at.unwrap_or(0);
            if let Some(kept) = map.remove(&id) {
                kept.last_used.fetch_max(used, Ordering::Relaxed);
                kept.saved_use.fetch_max(used, Ordering::Relaxed);
                next.insert(id, kept);
                continue;
            }
            match Key::of(s) {
                Some(k) => {
                    next.insert(id, Arc::new(k));
                }
                None => {
                    tracing::warn!(key = %id, "a stored API key has an unknown scope or session entry; it is not accepted")
                }
            }
        }
        *map = next;
    }

    /// Rewrites the stored list in one atomic read-modify-write of the database (nodes
    /// sharing it never undo each other's change): `change` edits the list as stored
    /// now and answers whether to write it. This process's keys then follow the list.
    async fn rewrite(
        &self,
        mut change: impl FnMut(&mut Vec<Stored>) -> bool + Send + 'static,
    ) -> Result<bool, StorageError> {
        let unreadable: Arc<std::sync::Mutex<Option<StorageError>>> = Arc::default();
        let seen = unreadable.clone();
        let written = self
            .store
            .update_setting(SETTING, move |current| match parse_stored(current) {
                Ok(mut list) => {
                    if !change(&mut list) {
                        return None;
                    }
                    serde_json::to_string(&list).ok()
                }
                Err(e) => {
                    *seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    None
                }
            })
            .await?;
        if let Some(e) = unreadable.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Err(e);
        }
        self.reload().await?;
        Ok(written)
    }

    /// How many keys there are.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<Key>>> {
        self.keys.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<Key>>> {
        self.keys.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The key `given` is, if it has the scoped keys' shape: `Ok` when it is valid now.
    /// `None`: not a scoped key at all.
    pub fn check(&self, given: &[u8]) -> Option<Result<Arc<Key>, Refusal>> {
        let text = std::str::from_utf8(given).ok()?;
        let rest = text.strip_prefix(PREFIX)?;
        let (id, _) = rest.split_once('_')?;
        let Some(key) = self.read().get(id).cloned() else {
            return Some(Err("Invalid API key"));
        };
        if !super::auth::keys_match(&hash(text), &key.hash) {
            return Some(Err("Invalid API key"));
        }
        let now = now_ms();
        if key.expires_at.is_some_and(|t| t <= now) {
            return Some(Err("This API key has expired"));
        }
        key.last_used.store(now, Ordering::Relaxed);
        Some(Ok(key))
    }

    /// Writes last uses back that are a minute or more newer than what is stored (in
    /// the background; at most one save at a time).
    pub fn save_uses_soon(self: &Arc<Self>, key: &Key) {
        let used = key.last_used.load(Ordering::Relaxed);
        let saved = key.saved_use.load(Ordering::Relaxed);
        if used < saved + LAST_USE_SAVED_EVERY_MS {
            return;
        }
        // One request schedules the save; the others of a burst see it done.
        if key
            .saved_use
            .compare_exchange(saved, used, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        let keys = self.clone();
        tokio::spawn(async move {
            if let Err(e) = keys.save().await {
                tracing::warn!(error = %e, "could not save the API keys' last uses");
            }
        });
    }

    /// Every key, oldest first.
    pub fn list(&self) -> Vec<Arc<Key>> {
        let mut all: Vec<Arc<Key>> = self.read().values().cloned().collect();
        all.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        all
    }

    /// Makes a key; it and its secret (the only time the secret exists outside the
    /// caller) once it is saved.
    pub async fn create(&self, new: NewKey) -> Result<(Arc<Key>, String), CreateError> {
        let _saving = self.saving.lock().await;
        if self.len() >= MAX_KEYS {
            return Err(CreateError::Full);
        }
        let mut random = [0u8; 40];
        rustls::crypto::ring::default_provider()
            .secure_random
            .fill(&mut random)
            .map_err(|_| CreateError::Storage(StorageError::Failed("no randomness".into())))?;
        let id = hex::encode(&random[..8]);
        let secret = format!("{PREFIX}{id}_{}", hex::encode(&random[8..]));
        let key = Arc::new(Key {
            id: id.as_str().into(),
            hash: hash(&secret),
            scopes: scope_bits(&new.scopes).unwrap_or(0),
            sessions: new
                .sessions
                .iter()
                .filter_map(|e| Pattern::parse(e))
                .collect(),
            expires_at: new.expires_at,
            note: new.note,
            created_at: now_ms(),
            last_used: AtomicU64::new(0),
            saved_use: AtomicU64::new(0),
        });
        let entry = key.stored();
        let written = self
            .rewrite(move |list| {
                if list.len() >= MAX_KEYS {
                    return false;
                }
                list.push(entry.clone());
                true
            })
            .await
            .map_err(CreateError::Storage)?;
        if !written {
            return Err(CreateError::Full);
        }
        Ok((key, secret))
    }

    /// Revokes a key at once (every request after this one is refused, on every node).
    /// `Ok(false)`: no such key. An error: revoked in this process, but not saved (the
    /// next save that works saves it).
    pub async fn delete(&self, id: &str) -> Result<bool, StorageError> {
        let _saving = self.saving.lock().await;
        let known = self.write().remove(id).is_some();
        let gone = id.to_string();
        let removed = self
            .rewrite(move |list| {
                let before = list.len();
                list.retain(|k| k.id != gone);
                list.len() != before
            })
            .await;
        match removed {
            Ok(removed) => Ok(removed || known),
            Err(e) if known => Err(e),
            Err(_) => Ok(false),
        }
    }

    /// Writes this process's last uses where they are newer than the stored ones.
    async fn save(&self) -> Result<(), StorageError> {
        let _saving = self.saving.lock().await;
        let uses: HashMap<String, u64> = self
            .read()
            .iter()
            .map(|(id, k)| (id.clone(), k.last_used.load(Ordering::Relaxed)))
            .collect();
        self.rewrite(move |list| {
            let mut newer = false;
            for k in list.iter_mut() {
                if let Some(&used) = uses.get(&k.id) {
                    if k.last_used_at.unwrap_or(0) < used {
                        k.last_used_at = Some(used);
                        newer = true;
                    }
                }
            }
            newer
        })
        .await
        .map(drop)
    }
}

/// The stored list (none: empty).
fn parse_stored(json: Option<&str>) -> Result<Vec<Stored>, StorageError> {
    match json {
        None => Ok(Vec::new()),
        Some(json) => serde_json::from_str(json)
            .map_err(|e| StorageError::Failed(format!("the stored API keys cannot be read: {e}"))),
    }
}

/// Why a key was not made.
#[derive(Debug)]
pub enum CreateError {
    /// [`MAX_KEYS`] exist.
    Full,
    /// It could not be saved.
    Storage(StorageError),
}

/// SHA-256 of a secret (stored as hex). The secrets carry 256 random bits: a fast hash is
/// enough (nothing to guess from a leaked hash).
fn hash(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Who made a request.
#[derive(Debug, Clone)]
pub enum Caller {
    /// The admin key, or any request when no key is set.
    Admin,
    /// No key, on a route open without one (reads, unless `--protect-reads`).
    Anonymous,
    /// A scoped key.
    Key(Arc<Key>),
}

impl Caller {
    /// Whether it may touch session `id` (everyone but a scoped key sees every session
    /// the route shows).
    pub fn sees(&self, id: &str) -> bool {
        match self {
            Caller::Key(k) => k.sees(id),
            _ => true,
        }
    }

    /// Whether it may see every session.
    pub fn sees_all(&self) -> bool {
        match self {
            Caller::Key(k) => k.sees_all(),
            _ => true,
        }
    }

    /// The scoped key's id, if it is one.
    pub fn key_id(&self) -> Option<&str> {
        match self {
            Caller::Key(k) => Some(&k.id),
            _ => None,
        }
    }

    /// Who a change is credited to in events and the audit: a scoped key's id, `admin`
    /// for the configured key (or anyone when none is set), `anonymous` otherwise.
    pub fn name(&self) -> &str {
        match self {
            Caller::Key(k) => &k.id,
            Caller::Admin => "admin",
            Caller::Anonymous => "anonymous",
        }
    }

    /// [`Caller::name`], for a command's `by` (see `SessionRecord::by`): shared, so the
    /// records that keep it allocate nothing for it.
    pub fn by(&self) -> Option<Arc<str>> {
        static ADMIN: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| "admin".into());
        static ANONYMOUS: std::sync::LazyLock<Arc<str>> =
            std::sync::LazyLock::new(|| "anonymous".into());
        Some(match self {
            Caller::Key(k) => k.id.clone(),
            Caller::Admin => ADMIN.clone(),
            Caller::Anonymous => ANONYMOUS.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(scopes: &[&str], sessions: &[&str]) -> Key {
        Key::of(Stored {
            id: "k".into(),
            hash: "00".repeat(32),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            sessions: sessions.iter().map(|s| s.to_string()).collect(),
            expires_at: None,
            note: None,
            created_at: 0,
            last_used_at: None,
        })
        .unwrap()
    }

    #[test]
    fn session_sets_match_ids_prefixes_and_all() {
        let k = key(&["read"], &["shop_*", "vip"]);
        assert!(k.sees("shop_1") && k.sees("shop_") && k.sees("vip"));
        assert!(!k.sees("other_1") && !k.sees("vip2") && !k.sees("shop"));
        assert!(!k.sees_all());
        assert!(key(&["read"], &["*"]).sees("anything"));
        assert_eq!(k.session_entries(), ["shop_*", "vip"]);
    }

    #[test]
    fn admin_covers_every_scope_and_others_only_themselves() {
        let admin = key(&["admin"], &["*"]);
        let send = key(&["send", "read"], &["*"]);
        for (_, s) in SCOPES {
            assert!(admin.may(s));
            assert_eq!(send.may(s), matches!(s, Scope::Send | Scope::Read), "{s:?}");
        }
        assert_eq!(send.scope_names(), ["read", "send"]);
    }

    #[test]
    fn new_keys_are_checked() {
        let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(check_new(&v(&["read"]), &v(&["shop_*"])).is_ok());
        assert!(check_new(&v(&[]), &v(&["*"])).is_err());
        assert!(check_new(&v(&["reed"]), &v(&["*"]))
            .unwrap_err()
            .contains("reed"));
        assert!(check_new(&v(&["read"]), &v(&[])).is_err());
        for bad in ["../x", "a*b", "**", "shop *", ""] {
            assert!(check_new(&v(&["read"]), &v(&[bad])).is_err(), "{bad}");
        }
    }
}
