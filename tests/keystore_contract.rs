//! Contract suite for whatsapp-rust key stores: anything the client takes as its storage
//! `Backend`, i.e. the five store traits of wacore 0.7 (`SignalStore`, `AppSyncStore`,
//! `ProtocolStore`, `DeviceStore`, `MsgSecretStore`).
//!
//! One fixed, deterministic sequence of calls (`contract_sequence`, then `read_back`) runs
//! against a backend and writes every answer down as a line of text, e.g.
//! `a.load_identity(ALICE) -> Ok(Some([0x05; 32]))`. Upstream's `InMemoryBackend` is the
//! reference: every other engine must produce the very same transcript, line for line,
//! except for the few answers listed (with the reason) in `KNOWN_DIFFERENCES`. Durable
//! engines must also give the same `read_back` answers after their stores are dropped and
//! opened again. Errors are answers too: a call that fails is recorded as `Err(..)`.
//!
//! Every engine opens the stores of two sessions, "a" and "b", that must never see each
//! other's rows: the sequence writes in one and reads (and sweeps) in the other.
//!
//! How a new backend (e.g. botvisor's PostgreSQL store) joins: write a function that opens
//! the two sessions' stores under a directory (or in a fresh database/schema named after
//! it) and returns them as a `Pair`, add an `Engine` for it to `ENGINES`, and run
//!     cargo test --features test-peer --test keystore_contract
//! The first line where its transcript leaves the reference's is printed. Fix the backend,
//! or, if the deviation is deliberate, document it in `KNOWN_DIFFERENCES`. An engine that
//! needs something of the machine (the PostgreSQL one: a server the harness starts, see
//! tests/common/pg.rs) says so in `available`; where it cannot run it is skipped with a
//! SKIPPED line, and the other engines still run.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Debug};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use botvisor::keys::PgKeys;
use whatsapp_rust::bytes::Bytes;
use whatsapp_rust::store::{SqliteStore, SqliteStoreConfig};
use whatsapp_rust::wacore::appstate::hash::HashState;
use whatsapp_rust::wacore::appstate::processor::AppStateMutationMAC;
use whatsapp_rust::wacore::libsignal::protocol::{KeyPair, PrivateKey};
use whatsapp_rust::wacore::store::device::account_serde;
use whatsapp_rust::wacore::store::error::Result as StoreResult;
use whatsapp_rust::wacore::store::traits::{
    AppStateSyncKey, AppSyncStore, Backend, DeviceInfo, DeviceListRecord, DeviceStore,
    LidPnMappingEntry, MsgSecretEntry, MsgSecretStore, PendingInboundKey, PendingInboundRow,
    ProtocolStore, SignalStore, TcTokenEntry,
};
use whatsapp_rust::wacore::store::{
    CachedNoiseCert, CachedServerCertChain, Device, InMemoryBackend,
};
use whatsapp_rust::waproto::whatsapp::ADVSignedDeviceIdentity;

mod common;

// ---------------------------------------------------------------------------------------
// Engines
// ---------------------------------------------------------------------------------------

type Store = Arc<dyn Backend>;
type Opening = Pin<Box<dyn Future<Output = Pair> + Send>>;

/// The stores of two sessions that must never see each other's rows.
struct Pair {
    a: Store,
    b: Store,
}

struct Engine {
    /// Short name, used by `KNOWN_DIFFERENCES`.
    id: &'static str,
    about: &'static str,
    /// Opens both sessions' stores under `dir`. A durable engine is called a second time
    /// with the same `dir` and must then find what it wrote the first time.
    open: fn(PathBuf) -> Opening,
    durable: bool,
    /// Whether the engine can run on this machine; when not, it prints why (as
    /// `SKIPPED <test>: ...`, or fails the test where it is required) and answers false.
    available: fn(test: &str) -> bool,
}

fn always(_test: &str) -> bool {
    true
}

/// The engines compared against the reference, `InMemoryBackend`.
const ENGINES: &[Engine] = &[
    Engine {
        id: "sqlite-shared-file",
        about: "SqliteStore, both sessions in one file as device ids 1 and 2 (upstream's multi-account scoping)",
        open: open_sqlite_shared_file,
        durable: true,
        available: always,
    },
    Engine {
        id: "sqlite-file-per-session",
        about: "SqliteStore, one file per session (botvisor's layout: each a device id 1)",
        open: open_sqlite_file_per_session,
        durable: true,
        available: always,
    },
    Engine {
        id: "postgres",
        about: "botvisor's PgKeys, both sessions in one fresh PostgreSQL database (a real server the harness starts)",
        open: open_postgres,
        durable: true,
        available: postgres_available,
    },
];

fn open_in_memory(_dir: PathBuf) -> Opening {
    // Isolation is per instance: nothing is shared between two InMemoryBackends.
    Box::pin(async {
        Pair {
            a: Arc::new(InMemoryBackend::new()),
            b: Arc::new(InMemoryBackend::new()),
        }
    })
}

fn open_sqlite_shared_file(dir: PathBuf) -> Opening {
    Box::pin(async move {
        let path = dir.join("shared.db");
        Pair {
            a: open_sqlite(&path, 1).await,
            b: open_sqlite(&path, 2).await,
        }
    })
}

fn open_sqlite_file_per_session(dir: PathBuf) -> Opening {
    Box::pin(async move {
        Pair {
            a: open_sqlite(&dir.join("session-a.db"), 1).await,
            b: open_sqlite(&dir.join("session-b.db"), 1).await,
        }
    })
}

fn postgres_available(test: &str) -> bool {
    common::pg::server_or_skip(&format!("{test} (postgres engine)")).is_some()
}

/// Sessions "a" and "b" of one `PgKeys` over a fresh database. The database is made on
/// the first opening under `dir` and its address kept there, so the second opening (a new
/// pool) finds what the first wrote.
fn open_postgres(dir: PathBuf) -> Opening {
    Box::pin(async move {
        let server = common::pg::shared().expect("checked by postgres_available");
        let marker = dir.join("postgres-url");
        let url = match std::fs::read_to_string(&marker) {
            Ok(url) => url,
            Err(_) => {
                let url = server
                    .fresh_database("keystore_contract")
                    .unwrap_or_else(|e| panic!("cannot create a database: {e}"));
                std::fs::write(&marker, &url).expect("write the database's address");
                url
            }
        };
        let keys = PgKeys::open(&url)
            .await
            .unwrap_or_else(|e| panic!("cannot open PgKeys on {url}: {e:?}\n{}", server.log()));
        Pair {
            a: Arc::new(keys.session("a")),
            b: Arc::new(keys.session("b")),
        }
    })
}

/// Opens a SqliteStore the way botvisor does (src/link/credentials.rs `store_config`), on
/// a real file so WAL, migrations and reopening are the production ones.
async fn open_sqlite(path: &Path, device_id: i32) -> Store {
    let url = path
        .to_str()
        .expect("the temporary directory path is UTF-8");
    let config = SqliteStoreConfig {
        cache_size_kib: 16,
        ..SqliteStoreConfig::default()
    };
    let store = SqliteStore::with_config_for_device(url, device_id, config)
        .await
        .unwrap_or_else(|e| panic!("cannot open {} as device {device_id}: {e}", path.display()));
    Arc::new(store)
}

// ---------------------------------------------------------------------------------------
// Known differences between the reference and an engine
// ---------------------------------------------------------------------------------------

/// An answer on which an engine deliberately (or knowingly) differs from the reference.
/// Only the exact pair of answers below is accepted, at a line with exactly this call; if
/// either side changes, or the difference goes away, the comparison fails so that this
/// list stays true.
struct KnownDifference {
    engines: &'static [&'static str],
    call: &'static str,
    reference: &'static str,
    engine: &'static str,
    why: &'static str,
}

const SQLITE: &[&str] = &["sqlite-shared-file", "sqlite-file-per-session"];

const KNOWN_DIFFERENCES: &[KnownDifference] = &[
    KnownDifference {
        engines: SQLITE,
        call: "a.resource_report()",
        reference: "memory_bytes: not reported, pages: not reported, io_read_bytes: not reported, io_write_bytes: not reported",
        engine: "memory_bytes: reported, pages: reported, io_read_bytes: not reported, io_write_bytes: not reported",
        why: "by design: SqliteStore overrides the default to report its page cache; InMemoryBackend keeps the all-None default",
    },
    KnownDifference {
        engines: SQLITE,
        call: "a.create()",
        reference: "Ok(2)",
        engine: "Err(database operation error: UNIQUE constraint failed: device.id)",
        why: "a second create(): InMemoryBackend hands out a fresh id from a counter, SqliteStore inserts its one fixed device id again",
    },
    KnownDifference {
        engines: &["sqlite-shared-file"],
        call: "b.create()",
        reference: "Ok(1)",
        engine: "Ok(2)",
        why: "create() returns the store's own device id; session b is device id 2 in the shared file, a fresh InMemoryBackend starts at 1",
    },
    KnownDifference {
        engines: SQLITE,
        call: "b.put_lid_mapping(&mapping(ORPHAN_LID, ORPHAN_PHONE, 1000, 1000, \"usync\"))",
        reference: "Ok(())",
        engine: "Err(database operation error: FOREIGN KEY constraint failed)",
        why: "SqliteStore's lid_pn_mapping rows reference the device row, so a mapping cannot be written before create()/save(); no other table has that constraint",
    },
    KnownDifference {
        engines: SQLITE,
        call: "a.get_latest_sync_key_id()",
        reference: "Ok(Some(b\"\\x00\\x00\\x00\\x00\\x10\\x02\"))",
        engine: "Ok(Some(b\"\\x00\\x00\\x00\\x00\\x10\\x03\"))",
        why: "after a lower key id is stored last: InMemoryBackend answers the key stored last, SqliteStore the highest key id",
    },
    KnownDifference {
        engines: SQLITE,
        call: "a.get_lid_mapping(LID1)",
        reference: "Ok(Some(LidPnMappingEntry { lid: \"100000000000011\", phone_number: \"5511987650011\", created_at: 5000, updated_at: 5000, learning_source: \"peer_pn_message\" }))",
        engine: "Ok(Some(LidPnMappingEntry { lid: \"100000000000011\", phone_number: \"5511987650011\", created_at: 1000, updated_at: 5000, learning_source: \"peer_pn_message\" }))",
        why: "re-learning a mapping: SqliteStore keeps the first created_at (\"when the mapping was first learned\"), InMemoryBackend replaces the whole entry",
    },
    KnownDifference {
        engines: &["postgres"],
        call: "a.resource_report()",
        reference: "memory_bytes: not reported, pages: not reported, io_read_bytes: not reported, io_write_bytes: not reported",
        engine: "memory_bytes: reported, pages: not reported, io_read_bytes: not reported, io_write_bytes: not reported",
        why: "by the trait's doc: a backend whose data lives outside the process reports memory_bytes Some(0); InMemoryBackend keeps the all-None default",
    },
    KnownDifference {
        engines: &["postgres"],
        call: "a.create()",
        reference: "Ok(2)",
        engine: "Ok(1)",
        why: "a second create(): a session has one device, and PgKeys keeps it (its keys are the account's, never overwritten) and answers its id, 1; InMemoryBackend counts up (SqliteStore fails)",
    },
    KnownDifference {
        engines: &["postgres"],
        call: "a.get_lid_mapping(LID1)",
        reference: "Ok(Some(LidPnMappingEntry { lid: \"100000000000011\", phone_number: \"5511987650011\", created_at: 5000, updated_at: 5000, learning_source: \"peer_pn_message\" }))",
        engine: "Ok(Some(LidPnMappingEntry { lid: \"100000000000011\", phone_number: \"5511987650011\", created_at: 1000, updated_at: 5000, learning_source: \"peer_pn_message\" }))",
        why: "re-learning a mapping for the same phone number: PgKeys keeps the first created_at (\"when the mapping was first learned\"; a new phone number starts a new one), InMemoryBackend replaces the whole entry",
    },
];

/// Replaces each known difference between `reference` and `engine` by a marker in both,
/// so that only unexplained differences remain. Returns the listed differences for this
/// engine that were not seen: the list must not outlive the behaviour it explains.
fn normalise_known_differences(
    engine: &Engine,
    reference: &mut [String],
    theirs: &mut [String],
) -> Vec<&'static KnownDifference> {
    let mut seen = vec![false; KNOWN_DIFFERENCES.len()];
    for (r, e) in reference.iter_mut().zip(theirs.iter_mut()) {
        if r == e {
            continue;
        }
        let (Some((call, r_answer)), Some((e_call, e_answer))) =
            (r.split_once(" -> "), e.split_once(" -> "))
        else {
            continue;
        };
        if call != e_call {
            continue;
        }
        let known = KNOWN_DIFFERENCES.iter().position(|k| {
            k.engines.contains(&engine.id)
                && k.call == call
                && k.reference == r_answer
                && k.engine == e_answer
        });
        if let Some(i) = known {
            seen[i] = true;
            let marker = format!("{call} -> <known difference: {}>", KNOWN_DIFFERENCES[i].why);
            *r = marker.clone();
            *e = marker;
        }
    }
    KNOWN_DIFFERENCES
        .iter()
        .zip(seen)
        .filter(|(k, seen)| !seen && k.engines.contains(&engine.id))
        .map(|(k, _)| k)
        .collect()
}

/// Fails with the first line where `theirs` leaves `reference`, and the lines before it.
fn assert_same_transcript(what: &str, reference: &[String], theirs: &[String]) {
    if reference == theirs {
        return;
    }
    let first = reference
        .iter()
        .zip(theirs)
        .position(|(r, e)| r != e)
        .unwrap_or(reference.len().min(theirs.len()));
    let context: Vec<&str> = reference[first.saturating_sub(3)..first]
        .iter()
        .map(String::as_str)
        .collect();
    panic!(
        "{what}: the transcripts differ first at line {} (of {} vs {})\n\
         preceding lines:\n    {}\n\
         expected: {}\n\
         got:      {}",
        first + 1,
        reference.len(),
        theirs.len(),
        context.join("\n    "),
        reference
            .get(first)
            .map_or("<end of transcript>", String::as_str),
        theirs
            .get(first)
            .map_or("<end of transcript>", String::as_str),
    );
}

// ---------------------------------------------------------------------------------------
// Methods the sequence must cover
// ---------------------------------------------------------------------------------------

/// Every method of the five traits, required and provided, as of wacore 0.7.0. The
/// sequence must call each one (`reference_transcript_covers_every_method` checks it).
///
/// When whatsapp-rust is upgraded, list the trait methods with
///     grep -n "async fn" ~/.cargo/registry/src/*/wacore-<version>/src/store/traits.rs
/// (the test does the same when that source is on disk and fails on any mismatch), add
/// new ones here and give each a few calls in `contract_sequence`.
const METHODS: &[&str] = &[
    // SignalStore (25)
    "put_identity",
    "put_identities_batch",
    "load_identity",
    "delete_identity",
    "get_session",
    "put_session",
    "put_sessions_batch",
    "delete_session",
    "has_session",
    "has_signal_state_for_user",
    "store_prekey",
    "store_prekeys_batch",
    "load_prekey",
    "load_prekeys_batch",
    "mark_prekeys_uploaded",
    "remove_prekey",
    "get_max_prekey_id",
    "store_signed_prekey",
    "load_signed_prekey",
    "load_all_signed_prekeys",
    "remove_signed_prekey",
    "put_sender_key",
    "put_sender_keys_batch",
    "get_sender_key",
    "delete_sender_key",
    // AppSyncStore (10)
    "get_sync_key",
    "set_sync_key",
    "get_version",
    "set_version",
    "put_mutation_macs",
    "get_mutation_mac",
    "get_mutation_macs",
    "delete_mutation_macs",
    "clear_mutation_macs",
    "get_latest_sync_key_id",
    // ProtocolStore (36)
    "get_sender_key_devices",
    "set_sender_key_status",
    "clear_sender_key_devices",
    "delete_sender_key_device_rows",
    "clear_all_sender_key_devices",
    "get_lid_mapping",
    "get_pn_mapping",
    "put_lid_mapping",
    "put_lid_mappings",
    "get_all_lid_mappings",
    "save_base_key",
    "has_same_base_key",
    "delete_base_key",
    "update_device_list",
    "update_device_lists",
    "get_devices",
    "delete_devices",
    "get_group_metadata",
    "put_group_metadata",
    "delete_group_metadata",
    "get_tc_token",
    "put_tc_token",
    "delete_tc_token",
    "get_all_tc_token_jids",
    "delete_expired_tc_tokens",
    "touch_tc_token_sender_timestamp",
    "store_received_tc_token",
    "store_sent_message",
    "take_sent_message",
    "delete_expired_sent_messages",
    "store_pending_inbound",
    "get_pending_inbound",
    "delete_pending_inbound",
    "delete_expired_pending_inbound",
    "store_pending_inbound_batch",
    "delete_pending_inbound_batch",
    // DeviceStore (6)
    "save",
    "load",
    "exists",
    "create",
    "snapshot_db",
    "resource_report",
    // MsgSecretStore (5)
    "put_msg_secret",
    "put_msg_secrets",
    "get_msg_secret",
    "get_msg_secret_with_ts",
    "delete_expired_msg_secrets",
];

const TRAITS: &[&str] = &[
    "SignalStore",
    "AppSyncStore",
    "ProtocolStore",
    "DeviceStore",
    "MsgSecretStore",
];

/// The `async fn` names declared in the five traits of the wacore source this build uses,
/// when that source is on disk (a normal cargo registry checkout). `None` when it cannot
/// be found, e.g. vendored sources: then only the hand-kept `METHODS` list is checked.
fn trait_methods_on_disk() -> Option<(PathBuf, BTreeSet<String>)> {
    let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.lock")).ok()?;
    let mut lines = lock.lines();
    let version = loop {
        if lines.next()? == "name = \"wacore\"" {
            let line = lines.next()?;
            break line
                .strip_prefix("version = \"")?
                .strip_suffix('"')?
                .to_string();
        }
    };
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))?;
    let source = std::fs::read_dir(cargo_home.join("registry/src"))
        .ok()?
        .filter_map(Result::ok)
        .map(|entry| {
            entry
                .path()
                .join(format!("wacore-{version}/src/store/traits.rs"))
        })
        .find(|path| path.is_file())?;
    let text = std::fs::read_to_string(&source).ok()?;
    let mut methods = BTreeSet::new();
    let mut inside = false;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("pub trait ") {
            inside = TRAITS.iter().any(|t| {
                rest.strip_prefix(t)
                    .is_some_and(|after| after.starts_with(':') || after.starts_with(' '))
            });
        } else if line == "}" {
            inside = false;
        } else if inside {
            if let Some(rest) = line.trim_start().strip_prefix("async fn ") {
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                methods.insert(name);
            }
        }
    }
    Some((source, methods))
}

// ---------------------------------------------------------------------------------------
// Transcript
// ---------------------------------------------------------------------------------------

#[derive(Default)]
struct Transcript {
    lines: Vec<String>,
}

impl Transcript {
    /// A section heading: not an answer, but it makes a failure easier to place.
    fn section(&mut self, name: &str) {
        self.lines.push(format!("== {name} =="));
    }

    fn push(&mut self, line: String) {
        self.lines.push(line);
    }

    fn record<T: Debug>(&mut self, call: String, answer: StoreResult<T>) {
        let answer = match answer {
            Ok(value) => format!("Ok({value:?})"),
            Err(e) => format!("Err({})", error_chain(&e)),
        };
        self.lines.push(format!("{call} -> {answer}"));
    }
}

/// The error and its sources, as the operator would read them in a log.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

/// One session's store, with the name ("a" or "b") its lines carry.
struct Session<'a> {
    name: &'static str,
    store: &'a dyn Backend,
}

/// Calls a store method and records `session.method(args as written) -> answer`. The
/// optional `=> f` maps the `Ok` value first, to render it readably and to sort results
/// whose order the trait leaves open.
macro_rules! call {
    ($t:ident, $s:ident . $method:ident ( $($arg:expr),* ) $(=> $map:expr)?) => {{
        let answer = $s.store.$method($($arg),*).await;
        $( let answer = answer.map($map); )?
        // The arguments as written, on one line whatever rustfmt made of them.
        let args = stringify!($($arg),*).split_whitespace().collect::<Vec<_>>().join(" ");
        $t.record(format!("{}.{}({args})", $s.name, stringify!($method)), answer);
    }};
}

/// Bytes rendered for people: `b"text"` when printable, `[0xNN; len]` for a fill, hex
/// otherwise.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Blob(Vec<u8>);

impl Debug for Blob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = &self.0;
        if b.len() > 8 && b.iter().all(|x| *x == b[0]) {
            write!(f, "[{:#04x}; {}]", b[0], b.len())
        } else if b.iter().all(|x| x.is_ascii_graphic() || *x == b' ') || b.len() <= 8 {
            write!(f, "b\"{}\"", b.escape_ascii())
        } else {
            write!(f, "hex:{}", hex::encode(b))
        }
    }
}

/// An answer already rendered as text, shown without quotes.
struct Shown(String);

impl Debug for Shown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn blob(bytes: impl AsRef<[u8]>) -> Blob {
    Blob(bytes.as_ref().to_vec())
}

fn opt_blob<B: AsRef<[u8]>>(bytes: Option<B>) -> Option<Blob> {
    bytes.map(blob)
}

fn sorted<T: Ord>(mut items: Vec<T>) -> Vec<T> {
    items.sort();
    items
}

fn pairs_sorted<B: AsRef<[u8]>>(items: Vec<(u32, B)>) -> Vec<(u32, Blob)> {
    sorted(items.into_iter().map(|(id, b)| (id, blob(b))).collect())
}

fn show_sync_key(key: Option<AppStateSyncKey>) -> Option<Shown> {
    key.map(|k| {
        Shown(format!(
            "key_data={:?} fingerprint={:?} timestamp={}",
            blob(k.key_data),
            blob(k.fingerprint),
            k.timestamp
        ))
    })
}

fn show_version(state: HashState) -> Shown {
    let map: BTreeMap<String, Blob> = state
        .index_value_map
        .into_iter()
        .map(|(k, v)| (k, blob(v)))
        .collect();
    Shown(format!(
        "version={} hash={:?} index_value_map={map:?} mac_mismatch_fatal={}",
        state.version,
        blob(state.hash),
        state.mac_mismatch_fatal
    ))
}

fn show_macs(macs: std::collections::HashMap<[u8; 32], Vec<u8>>) -> BTreeMap<Blob, Blob> {
    macs.into_iter().map(|(k, v)| (blob(k), blob(v))).collect()
}

fn show_tc(entry: Option<TcTokenEntry>) -> Option<Shown> {
    entry.map(|e| {
        Shown(format!(
            "token={:?} token_timestamp={} sender_timestamp={:?}",
            blob(e.token),
            e.token_timestamp,
            e.sender_timestamp
        ))
    })
}

fn mappings_sorted(mut entries: Vec<LidPnMappingEntry>) -> Vec<LidPnMappingEntry> {
    entries.sort_by(|x, y| x.lid.cmp(&y.lid));
    entries
}

fn show_report(present: [Option<u64>; 4]) -> String {
    // The figures follow the page cache and the file size; whether each is reported is
    // the contract.
    let shown = |v: Option<u64>| {
        if v.is_some() {
            "reported"
        } else {
            "not reported"
        }
    };
    format!(
        "memory_bytes: {}, pages: {}, io_read_bytes: {}, io_write_bytes: {}",
        shown(present[0]),
        shown(present[1]),
        shown(present[2]),
        shown(present[3])
    )
}

// ---------------------------------------------------------------------------------------
// Fixture values
// ---------------------------------------------------------------------------------------

// Signal addresses: `user@server` is a user's device 0, `user:device@server` another one.
const ALICE: &str = "100000000000001@lid";
const ALICE_DEV: &str = "100000000000001:7@lid";
const ALICE_USER: &str = "100000000000001";
/// A prefix of Alice's user: must not count as Alice.
const ALICE_USER_PREFIX: &str = "10000000000000";
const BOB: &str = "100000000000002@lid";
const BOB_USER: &str = "100000000000002";
const CAROL_DEV: &str = "5511987650003:2@s.whatsapp.net";
const DAVE_DEV: &str = "100000000000004:3@lid";
const DAVE_USER: &str = "100000000000004";
const ERIN: &str = "100000000000005@lid";

const SENDER_KEY_1: &str = "120363000000000001@g.us::100000000000001::7";
const SENDER_KEY_2: &str = "120363000000000001@g.us::100000000000002::0";
const SENDER_KEY_3: &str = "120363000000000002@g.us::100000000000001::7";

const SYNC_KEY_1: &[u8] = &[0, 0, 0, 0, 0x10, 0x01];
const SYNC_KEY_2: &[u8] = &[0, 0, 0, 0, 0x10, 0x02];
const SYNC_KEY_3: &[u8] = &[0, 0, 0, 0, 0x10, 0x03];
const SYNC_KEY_ABSENT: &[u8] = &[0, 0, 0, 0, 0x10, 0x09];

const GROUP1: &str = "120363000000000001@g.us";
const GROUP2: &str = "120363000000000002@g.us";
const GROUP3: &str = "120363000000000003@g.us";
const DEVICE1: &str = "100000000000001:7@lid";
const DEVICE2: &str = "100000000000002@lid";
const DEVICE3: &str = "5511987650003:2@s.whatsapp.net";
const DEVICE4: &str = "100000000000004:3@lid";

// LID-PN mappings hold user parts only.
const LID1: &str = "100000000000011";
const LID2: &str = "100000000000012";
const LID3: &str = "100000000000013";
const PHONE1: &str = "5511987650011";
const PHONE2: &str = "5511987650012";
const PHONE4: &str = "5511987650014";
const ORPHAN_LID: &str = "100000000000019";
const ORPHAN_PHONE: &str = "5511987650019";

const MSG1: &str = "3EB0000000000001";
const MSG2: &str = "3EB0000000000002";

const USER1: &str = "100000000000001";
const USER2: &str = "100000000000002";
const USER3: &str = "5511987650003";

const TC1: &str = "100000000000021@lid";
const TC2: &str = "100000000000022@lid";
const TC3: &str = "100000000000023@lid";
const TC4: &str = "100000000000024@lid";

const CHAT1: &str = "120363000000000001@g.us";
const CHAT2: &str = "100000000000001@lid";
const CHAT3: &str = "100000000000002@lid";
const SENDER1: &str = "100000000000001@lid";
const SENDER2: &str = "100000000000002@lid";

/// A cutoff after every timestamp the stores take from the clock (2100-01-01): a sweep
/// with it removes everything it may remove, one with 0 removes nothing.
const FAR_FUTURE: i64 = 4_102_444_800;

fn key(fill: u8) -> [u8; 32] {
    [fill; 32]
}

fn id_key(address: &str, fill: u8) -> (Arc<str>, [u8; 32]) {
    (Arc::from(address), key(fill))
}

fn record(address: &str, bytes: &'static [u8]) -> (Arc<str>, Bytes) {
    (Arc::from(address), Bytes::from_static(bytes))
}

fn prekey(id: u32, bytes: &'static [u8]) -> (u32, Bytes) {
    (id, Bytes::from_static(bytes))
}

/// App state sync keys are 32 bytes; SqliteStore treats any other length as corrupt and
/// answers "absent", so the sequence only uses valid ones.
fn sync_key(fill: u8, timestamp: i64) -> AppStateSyncKey {
    AppStateSyncKey {
        key_data: vec![fill; 32],
        fingerprint: vec![fill, 0xf0],
        timestamp,
    }
}

fn hash_state(version: u64, fill: u8, index: &[(&str, &[u8])], fatal: bool) -> HashState {
    HashState {
        version,
        hash: [fill; 128],
        index_value_map: index
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_vec()))
            .collect(),
        mac_mismatch_fatal: fatal,
    }
}

/// Index MACs are HMAC-SHA256 outputs: 32 bytes.
fn index_mac(fill: u8) -> [u8; 32] {
    [fill; 32]
}

fn mac(index: u8, value: u8) -> AppStateMutationMAC {
    AppStateMutationMAC {
        index_mac: index_mac(index).to_vec(),
        value_mac: vec![value; 32],
    }
}

fn mapping(lid: &str, phone: &str, created: i64, updated: i64, source: &str) -> LidPnMappingEntry {
    LidPnMappingEntry {
        lid: lid.to_string(),
        phone_number: phone.to_string(),
        created_at: created,
        updated_at: updated,
        learning_source: source.to_string(),
    }
}

fn device_list(
    user: &str,
    devices: &[(u32, Option<u32>, bool)],
    timestamp: i64,
    phash: Option<&str>,
    raw_id: Option<u32>,
) -> DeviceListRecord {
    DeviceListRecord {
        user: user.to_string(),
        devices: devices
            .iter()
            .map(|(id, key_index, hosted)| DeviceInfo::new(*id, *key_index).with_hosting(*hosted))
            .collect(),
        timestamp,
        phash: phash.map(str::to_string),
        raw_id,
    }
}

fn tc(token: &[u8], token_timestamp: i64, sender_timestamp: Option<i64>) -> TcTokenEntry {
    TcTokenEntry {
        token: token.to_vec(),
        token_timestamp,
        sender_timestamp,
    }
}

fn inbound<'a>(
    chat: &'a str,
    sender: &'a str,
    id: &'a str,
    message: &'a [u8],
) -> PendingInboundRow<'a> {
    PendingInboundRow {
        chat,
        sender,
        id,
        message,
    }
}

fn inbound_key<'a>(chat: &'a str, sender: &'a str, id: &'a str) -> PendingInboundKey<'a> {
    PendingInboundKey { chat, sender, id }
}

fn secret(
    chat: &str,
    sender: &str,
    id: &str,
    fill: u8,
    expires_at: i64,
    message_ts: i64,
) -> MsgSecretEntry {
    MsgSecretEntry {
        chat: Arc::from(chat),
        sender: Arc::from(sender),
        msg_id: Arc::from(id),
        secret: [fill; 32],
        expires_at,
        message_ts,
    }
}

fn keypair(seed: u8) -> KeyPair {
    let private = PrivateKey::deserialize(&[seed; 32]).expect("32 bytes make a private key");
    KeyPair::try_from(private).expect("a private key derives its public key")
}

/// A device whose every persisted field is set to a fixed, non-default value, so that a
/// store that drops or mangles one is seen.
fn fixture_device(seed: u8, push_name: &str) -> Device {
    let mut d = Device::new();
    d.pn = Some(
        format!("55119876500{seed:02}:12@s.whatsapp.net")
            .parse()
            .expect("the fixture PN parses"),
    );
    d.lid = Some(
        format!("1000000000000{seed:02}:12@lid")
            .parse()
            .expect("the fixture LID parses"),
    );
    d.registration_id = 100_000 + u32::from(seed);
    d.noise_key = keypair(seed);
    d.identity_key = keypair(seed.wrapping_add(1));
    d.signed_pre_key = keypair(seed.wrapping_add(2));
    d.signed_pre_key_id = 7;
    d.signed_pre_key_signature = [seed.wrapping_add(3); 64];
    d.adv_secret_key = [seed.wrapping_add(4); 32];
    d.account = Some(Arc::new(ADVSignedDeviceIdentity {
        details: Some(b"adv details".to_vec()),
        account_signature_key: Some(vec![seed.wrapping_add(5); 32]),
        account_signature: Some(vec![seed.wrapping_add(6); 64]),
        device_signature: Some(vec![seed.wrapping_add(7); 64]),
    }));
    d.push_name = push_name.to_string();
    d.app_version_primary = 2;
    d.app_version_secondary = 3000;
    d.app_version_tertiary = 1_023_456_789;
    d.app_version_last_fetched_ms = 1_700_000_000_123;
    d.edge_routing_info = Some(vec![8, 9, 10, seed]);
    d.props_hash = Some(format!("props-{seed}"));
    d.next_pre_key_id = 812;
    d.first_unupload_pre_key_id = 800;
    d.server_has_prekeys = true;
    d.nct_salt = Some(b"nct salt".to_vec());
    d.server_cert_chain = Some(CachedServerCertChain {
        intermediate: CachedNoiseCert {
            key: [0xab; 32],
            not_before: 1_700_000_000,
            not_after: 1_900_000_000,
        },
        leaf: CachedNoiseCert {
            key: [0xcd; 32],
            not_before: 1_700_000_500,
            not_after: 1_899_999_500,
        },
    });
    d.login_counter = 3;
    d.lid_migrated = true;
    d.last_signed_pre_key_rotation_ms = 1_700_000_000_456;
    d.read_receipts_disabled = true;
    d
}

/// The fixture after a later save that clears every optional field: an upsert must
/// overwrite with "none", not keep the old value.
fn fixture_device_updated(seed: u8) -> Device {
    let mut d = fixture_device(seed, "Contract Bot (renamed)");
    d.account = None;
    d.edge_routing_info = None;
    d.props_hash = None;
    d.nct_salt = None;
    d.server_cert_chain = None;
    d.pn = None;
    d.login_counter = 4;
    d.next_pre_key_id = 900;
    d.server_has_prekeys = false;
    d.read_receipts_disabled = false;
    d
}

/// Fields a fresh `create()` fills with random values.
const GENERATED_FIELDS: &[&str] = &[
    "registration_id",
    "noise_key",
    "identity_key",
    "signed_pre_key",
    "signed_pre_key_signature",
    "adv_secret_key",
    "last_signed_pre_key_rotation_ms",
];

/// The persisted fields of a device, one per line. `device_props`, `client_profile` and
/// `nct_salt_sync_seen` are runtime-only (not serialized, set on every start), so they
/// are not part of what a store keeps.
fn describe_device(d: &Device) -> Vec<(&'static str, String)> {
    let pair = |k: &KeyPair| {
        format!(
            "public={} private={}",
            hex::encode(k.public_key.public_key_bytes()),
            hex::encode(k.private_key.serialize())
        )
    };
    vec![
        ("pn", format!("{:?}", d.pn.as_ref().map(|j| j.to_string()))),
        (
            "lid",
            format!("{:?}", d.lid.as_ref().map(|j| j.to_string())),
        ),
        ("registration_id", d.registration_id.to_string()),
        ("noise_key", pair(&d.noise_key)),
        ("identity_key", pair(&d.identity_key)),
        ("signed_pre_key", pair(&d.signed_pre_key)),
        ("signed_pre_key_id", d.signed_pre_key_id.to_string()),
        (
            "signed_pre_key_signature",
            format!("{:?}", blob(d.signed_pre_key_signature)),
        ),
        ("adv_secret_key", format!("{:?}", blob(d.adv_secret_key))),
        (
            "account",
            format!(
                "{:?}",
                d.account.as_ref().map(|a| blob(account_serde::to_bytes(a)))
            ),
        ),
        ("push_name", format!("{:?}", d.push_name)),
        (
            "app_version",
            format!(
                "{}.{}.{}",
                d.app_version_primary, d.app_version_secondary, d.app_version_tertiary
            ),
        ),
        (
            "app_version_last_fetched_ms",
            d.app_version_last_fetched_ms.to_string(),
        ),
        (
            "edge_routing_info",
            format!("{:?}", opt_blob(d.edge_routing_info.as_ref())),
        ),
        ("props_hash", format!("{:?}", d.props_hash)),
        ("next_pre_key_id", d.next_pre_key_id.to_string()),
        (
            "first_unupload_pre_key_id",
            d.first_unupload_pre_key_id.to_string(),
        ),
        ("server_has_prekeys", d.server_has_prekeys.to_string()),
        ("nct_salt", format!("{:?}", opt_blob(d.nct_salt.as_ref()))),
        (
            "server_cert_chain",
            format!(
                "{:?}",
                d.server_cert_chain.as_ref().map(|c| Shown(format!(
                    "intermediate: key={:?} valid={}..{}, leaf: key={:?} valid={}..{}",
                    blob(c.intermediate.key),
                    c.intermediate.not_before,
                    c.intermediate.not_after,
                    blob(c.leaf.key),
                    c.leaf.not_before,
                    c.leaf.not_after
                )))
            ),
        ),
        ("login_counter", d.login_counter.to_string()),
        ("lid_migrated", d.lid_migrated.to_string()),
        (
            "last_signed_pre_key_rotation_ms",
            d.last_signed_pre_key_rotation_ms.to_string(),
        ),
        (
            "read_receipts_disabled",
            d.read_receipts_disabled.to_string(),
        ),
    ]
}

/// Records `load()`, and each persisted field on its own line so a diff names the field.
async fn record_load(t: &mut Transcript, s: &Session<'_>, freshly_created: bool) {
    let call = format!("{}.load()", s.name);
    match s.store.load().await {
        Ok(Some(device)) => {
            t.push(format!("{call} -> Ok(Some(device))"));
            for (field, value) in describe_device(&device) {
                let value = if freshly_created && GENERATED_FIELDS.contains(&field) {
                    "<generated>".to_string()
                } else {
                    value
                };
                t.push(format!("{call}.{field} -> {value}"));
            }
        }
        other => t.record(call, other.map(|d| d.map(|_| "device"))),
    }
}

async fn record_resource_report(t: &mut Transcript, s: &Session<'_>) {
    let r = s.store.resource_report().await;
    t.push(format!(
        "{}.resource_report() -> {}",
        s.name,
        show_report([r.memory_bytes, r.pages, r.io_read_bytes, r.io_write_bytes])
    ));
}

// ---------------------------------------------------------------------------------------
// The sequence
// ---------------------------------------------------------------------------------------

fn sessions_of(pair: &Pair) -> (Session<'_>, Session<'_>) {
    let a = Session {
        name: "a",
        store: &*pair.a,
    };
    let b = Session {
        name: "b",
        store: &*pair.b,
    };
    (a, b)
}

/// Runs the whole contract against one pair of sessions and returns the transcript.
async fn transcript(pair: &Pair) -> Vec<String> {
    let (a, b) = sessions_of(pair);
    let mut t = Transcript::default();
    contract_sequence(&mut t, &a, &b).await;
    read_back(&mut t, &a, &b).await;
    t.lines
}

/// The fixed sequence of calls. It only ever appends: a backend's answers never change
/// which calls follow, so two transcripts line up line by line.
async fn contract_sequence(t: &mut Transcript, a: &Session<'_>, b: &Session<'_>) {
    device_store(t, a, b).await;
    identities(t, a, b).await;
    sessions(t, a, b).await;
    prekeys(t, a, b).await;
    signed_prekeys(t, a, b).await;
    sender_keys(t, a, b).await;
    sync_keys(t, a, b).await;
    versions_and_macs(t, a, b).await;
    sender_key_devices(t, a, b).await;
    lid_mappings(t, a, b).await;
    base_keys(t, a, b).await;
    device_registry(t, a, b).await;
    group_metadata(t, a, b).await;
    tc_tokens(t, a, b).await;
    sent_messages(t, a, b).await;
    pending_inbound(t, a, b).await;
    msg_secrets(t, a, b).await;
}

async fn device_store(t: &mut Transcript, a: &Session<'_>, b: &Session<'_>) {
    t.section("DeviceStore");
    call!(t, a.exists());
    record_load(t, a, false).await;
    record_resource_report(t, a).await;
    call!(t, a.create());
    call!(t, a.exists());
    record_load(t, a, true).await;
    // The client only creates when nothing exists; a second create shows each store's id
    // scheme (see KNOWN_DIFFERENCES).
    call!(t, a.create());
    let device_a = fixture_device(0x21, "Contract Bot");
    call!(t, a.save(&device_a));
    record_load(t, a, false).await;
    let device_a = fixture_device_updated(0x21);
    call!(t, a.save(&device_a));
    record_load(t, a, false).await;
    call!(t, a.snapshot_db("contract", None));
    call!(
        t,
        a.snapshot_db("contract-extra", Some(b"{\"why\":\"contract\"}".as_slice()))
    );

    // Session b sees none of a's device, and a write before b has a device row shows the
    // one table that needs it (see KNOWN_DIFFERENCES).
    call!(t, b.exists());
    record_load(t, b, false).await;
    call!(
        t,
        b.put_lid_mapping(&mapping(ORPHAN_LID, ORPHAN_PHONE, 1000, 1000, "usync"))
    );
    call!(t, b.create());
    call!(t, b.exists());
    let device_b = fixture_device(0x61, "Other Bot");
    call!(t, b.save(&device_b));
    record_load(t, b, false).await;
    // b's save must not have touched a's row.
    record_load(t, a, false).await;
}

async fn identities(t: &mut Transcript, a: &Session<'_>, b: &Session<'_>) {
    t.section("SignalStore: identities");
    call!(t, a.load_identity(ALICE) => opt_blob);
    call!(t, a.put_identity(ALICE, key(1)));
    call!(t, a.load_identity(ALICE) => opt_blob);
    call!(t, a.put_identity(ALICE, key(2)));
    call!(t, a.load_identity(ALICE) => opt_blob);
    call!(
        t,
        a.put_identities_batch(&[id_key(BOB, 3), id_key(CAROL_DEV, 4), id_key(ALICE, 5)])
    );
    call!(t, a.put_identities_batch(&[]));
    call!(t, a.load_identity(ALICE) => opt_blob);
    call!(t, a.load_identity(BOB) => opt_blob);
    call!(t, a.load_identity(CAROL_DEV) => opt_blob);
    call!(t, a.load_identity(ALICE_DEV) => opt_blob);
    call!(t, a.has_signal_state_for_user(ALICE_USER));
    call!(t, a.has_signal_state_for_user(ALICE_USER_PREFIX));
    call!(t, a.has_signal_state_for_user(BOB_USER));
    call!(t, a.delete_identity(BOB));
    call!(t, a.load_identity(BOB) => opt_blob);
    call!(t, a.has_signal_state_for_user(BOB_USER));
    call!(t, a.delete_identity(BOB));
    call!(t, b.load_identity(ALICE) => opt_blob);
    call!(t, b.has_signal_state_for_user(ALICE_USER));
    call!(t, b.put_identity(ALICE, key(9)));
    call!(t, b.load_identity(ALICE) => opt_blob);
    call!(t, a.load_identity(ALICE) => opt_blob);
}

async fn sessions(t: &mut Transcript, a: &Session<'_>, b: &Session<'_>) {
    t.section("SignalStore: sessions");
    call!(t, a.get_session(ALICE_DEV) => opt_blob);
    call!(t, a.has_session(ALICE_DEV));
    call!(t, a.put_session(ALICE_DEV, b"session alice:7 v1"));
    call!(t, a.get_session(ALICE_DEV) => opt_blob);
    call!(t, a.has_session(ALICE_DEV));
    call!(t, a.put_session(ALICE_DEV, b"session alice:7 v2"));
    call!(t, a.get_session(ALICE_DEV) => opt_blob);
    call!(
        t,
        a.put_sessions_batch(&[
            record(ALICE_DEV, b"session alice:7 v3"),
            record(DAVE_DEV, b"session dave:3 v1"),
            record(ERIN, b"session erin v1"),
        ])
    );
    call!(t, a.put_sessions_batch(&[]));
    call!(t, a.get_session(ALICE_DEV) => opt_blob);
    call!(t, a.get_session(DAVE_DEV) => opt_blob);
    call!(t, a.get_session(ERIN) => opt_blob);
    // Dave has a session and no identity: still Signal state for his user.
    call!(t, a.has_signal_state_for_user(DAVE_USER));
    call!(t, a.delete_session(ERIN));
    call!(t, a.get_session(ERIN) => opt_blob);
    call!(t, a.has_session(ERIN));
    call!(t, a.delete_session(ERIN));
    call!(t, b.get_session(ALICE_DEV) => opt_blob);
    call!(t, b.has_session(DAVE_DEV));
    call!(t, b.has_signal_state_for_user(DAVE_USER));
    call!(t, b.put_session(DAVE_DEV, b"session dave:3 in b"));
    call!(t, a.get_session(DAVE_DEV) => opt_blob);
}

async fn prekeys(t: &mut Transcript, a: &Session<'_>, b: &Session<'_>) {
    t.section("SignalStore: pre-keys");
    call!(t, a.get_max_prekey_id());
    call!(t, a.load_prekey(1) => opt_blob);
    call!(t, a.store_prekey(1, b"prekey 1 v1", false));
    call!(t, a.load_prekey(1) => opt_blob);
    call!(t, a.store_prekey(1, b"prekey 1 v2", true));
    call!(t, a.load_prekey(1) => opt_blob);
    call!(
        t,
        a.store_prekeys_batch(
            &[
                prekey(2, b"prekey 2"),
                prekey(3, b"prekey 3"),
                prekey(4, b"prekey 4")
            ],
            false
        )
    );
    call!(t, a.store_prekeys_batch(&[], true));
    call!(t, a.load_prekeys_batch(&[4, 2, 99, 1]) => pairs_sorted);
    call!(t, a.load_prekeys_batch(&[]) => pairs_sorted);
    call!(t, a.get_max_prekey_id());
    // Marking is an UPDATE: it must never create a key that is not (or no longer) there.
    call!(t, a.mark_prekeys_uploaded(&[2, 3, 77]));
    call!(t, a.load_prekey(77) => opt_blob);
    call!(t, a.remove_prekey(3));
    call!(t, a.load_prekey(3) => opt_blob);
    call!(t, a.mark_prekeys_uploaded(&[3]));
    call!(t, a.load_prekey(3) => opt_blob);
    call!(t, a.mark_prekeys_uploaded(&[]));
    call!(t, a.remove_prekey(4));
    call!(t, a.get_max_prekey_id());
    call!(t, a.remove_prekey(12345));
    call!(t, a.load_prekeys_batch(&[1, 2, 3, 4]) => pairs_sorted);
    call!(t, b.load_prekey(1) => opt_blob);
    call!(t, b.get_max_prekey_id());
    call!(t, b.load_prekeys_batch(&[1, 2]) => pairs_sorted);
    call!(t, b.store_prekey(50, b"prekey 50 in b", false));
    call!(t, a.get_max_prekey_id());
    call!(t, a.load_prekey(50) => opt_blob);
}

async fn signed_prekeys(t: &mut Transcript, a: &Session<'_>, b: &Session<'_>) {
    t.section("SignalStore: signed pre-keys");
    call!(t, a.load_all_signed_prekeys() => pairs_sorted);
    call!(t, a.load_signed_prekey(1) => opt_blob);
    call!(t, a.store_signed_prekey(1, b"signed prekey 1 v1"));
    call!(t, a.store_signed_prekey(2, b"signed prekey 2"));
    call!(t, a.store_signed_prekey(1, b"signed prekey 1 v2"));
    call!(t, a.load_signed_prekey(1) => opt_blob);
    call!(t, a.load_all_signed_prekeys() => pairs_sorted);
    call!(t, a.remove_signed_prekey(2));
    call!(t, a.load_signed_prekey(2) => opt_blob);
    call!(t, a.remove_signed_prekey(2));
    call!(t, a.load_all_signed_prekeys() => pairs_sorted);
    call!(t, b.load_all_signed_prekeys() => pairs_sorted);
    call!(t, b.load_signed_prekey(1) => opt_blob);
}

async fn sender_keys(t: &mut Transcript, a: &Session<'_>, b: &Session<'_>) {
    t.section("SignalStore: sender keys");
    call!(t, a.get_sender_key(SENDER_KEY_1) => opt_blob);
    call!(t, a.put_sender_key(SENDER_KEY_1, b"sender key 1 v1"));
    call!(t, a.get_sender_key(SENDER_KEY_1) => opt_blob);
    // The same address twice in one batch: the later record wins.
    call!(
        t,
        a.put_sender_keys_batch(&[
            record(SENDER_KEY_1, b"sender key 1 v2"),
            record(SENDER_KEY_2, b"sender key 2"),
            record(SENDER_KEY_3, b"sender key 3"),
            record(SENDER_KEY_1, b"sender key 1 v3"),
        ])
    );
    call!(t, a.put_sender_keys_batch(&[]));
    call!(t, a.get_sender_key(SENDER_KEY_1) => opt_blob);
    call!(t, a.get_sender_key(SENDER_KEY_2) => opt_blob);
    call!(t, a.get_sender_key(SENDER_KEY_3) => opt_blob);
    call!(t, a.delete_sender_key(SENDER_KEY_2));
    call!(t, a.get_sender_key(SENDER_KEY_2) => opt_blob);
    call!(t, a.delete_sender_key(SENDER_KEY_2));
    call!(t, b.get_sender_key(SENDER_KEY_1) => opt_blob);
}

async fn sync_keys(t: &mut Transcript, a: &Session<'_>, b: &Session<'_>) {
    t.section("AppSyncStore: sync keys");
    call!(t, a.get_sync_key(SYNC_KEY_1) => show_sync_key);
    call!(t, a.get_latest_sync_key_id() => opt_blob);
    call!(t, a.set_sync_key(SYNC_KEY_1, sync_key(1, 1_700_000_001)));
    call!(t, a.get_latest_sync_key_id() => opt_blob);
    call!(t, a.set_sync_key(SYNC_KEY_3, sync_key(3, 1_700_000_003)));
    call!(t, a.get_latest_sync_key_id() => opt_blob);
    // A lower key id stored last (see KNOWN_DIFFERENCES). Overwriting a key is storing it
    // too, so the answers only agree again once the highest id is the last one stored.
    call!(t, a.set_sync_key(SYNC_KEY_2, sync_key(2, 1_700_000_002)));
    call!(t, a.get_latest_sync_key_id() => opt_blob);
    call!(t, a.set_sync_key(SYNC_KEY_1, sync_key(0x11, 1_700_000_011)));
    call!(t, a.set_sync_key(SYNC_KEY_3, sync_key(0x33, 1_700_000_033)));
    call!(t, a.get_latest_sync_key_id() => opt_blob);
    call!(t, a.get_sync_key(SYNC_KEY_1) => show_sync_key);
    call!(t, a.get_sync_key(SYNC_KEY_2) => show_sync_key);
    call!(t, a.get_sync_key(SYNC_KEY_3) => show_sync_key);
    call!(t, a.get_sync_key(SYNC_KEY_ABSENT) => show_sync_key);
    call!(t, b.get_sync_key(SYNC_KEY_1) => show_sync_key);
    call!(t, b.get_latest_sync_key_id() => opt_blob);
}

async fn versions_and_macs(t: &mut Transcript, a: &Session<'_>, b: &Session<'_>) {
    t.section("AppSyncStore: versions");
    // An unknown collection is version 0 with a zero hash, not an error.
    call!(t, a.get_version("regular") => show_version);
    call!(
        t,
        a.set_version(
            "regular",
            hash_state(
                5,
                0x05,
                &[("idx-b", b"value b"), ("idx-a", b"value a")],
                true
            )
        )
    );
    call!(t, a.get_version("regular") => show_version);
    call!(t, a.set_version("regular", hash_state(6, 0x06, &[], false)));
    call!(t, a.get_version("regular") => show_version);
    call!(
        t,
        a.set_version(
            "critical_block",
            hash_state(2, 0x02, &[("idx", b"v")], false)
        )
    );
    call!(t, a.get_version("critical_block") => show_version);
    call!(t, a.get_version("critical_unblock_low") => show_version);
    call!(t, b.get_version("regular") => show_version);

    t.section("AppSyncStore: mutation MACs");
    call!(t, a.get_mutation_mac("regular", &index_mac(1)) => opt_blob);
    call!(
        t,
        a.put_mutation_macs("regular", 1, &[mac(1, 0x10), mac(2, 0x20), mac(3, 0x30)])
    );
    call!(t, a.put_mutation_macs("regular", 2, &[mac(1, 0x11)]));
    call!(t, a.put_mutation_macs("regular", 3, &[]));
    // The same index MAC in another collection is another row.
    call!(t, a.put_mutation_macs("regular_high", 1, &[mac(1, 0x91)]));
    call!(t, a.get_mutation_mac("regular", &index_mac(1)) => opt_blob);
    call!(t, a.get_mutation_mac("regular", &index_mac(2)) => opt_blob);
    call!(t, a.get_mutation_mac("regular_high", &index_mac(1)) => opt_blob);
    call!(t, a.get_mutation_macs("regular", &[index_mac(1), index_mac(2), index_mac(9)]) => show_macs);
    call!(t, a.get_mutation_macs("regular", &[]) => show_macs);
    call!(
        t,
        a.delete_mutation_macs("regular", &[index_mac(2).to_vec(), index_mac(9).to_vec()])
    );
    call!(t, a.delete_mutation_macs("regular", &[]));
    call!(t, a.get_mutation_mac("regular", &index_mac(2)) => opt_blob);
    call!(t, a.get_mutation_macs("regular", &[index_mac(1), index_mac(2), index_mac(3)]) => show_macs);
    call!(t, a.clear_mutation_macs("regular"));
    call!(t, a.get_mutation_macs("regular", &[index_mac(1), index_mac(2), index_mac(3)]) => show_macs);
    call!(t, a.get_mutation_mac("regular_high", &index_mac(1)) => opt_blob);
    call!(t, a.clear_mutation_macs("regular"));
    call!(t, a.put_mutation_macs("regular", 4, &[mac(4, 0x40)]));
    call!(t, b.get_mutation_mac("regular_high", &index_mac(1)) => opt_blob);
    call!(t, b.get_mutation_macs("regular", &[index_mac(4)]) => show_macs);
    call!(t, b.clear_mutation_macs("regular_high"));
    call!(t, a.get_mutation_mac("regular_high", &index_mac(1)) => opt_blob);
}

async fn sender_key_devices(t: &mut Transcript, a: &Session<'_>, b: &Session<'_>) {
    t.section("ProtocolStore: sender key devices");
    call!(t, a.get_sender_key_devices(GROUP1) => sorted);
    call!(
        t,
        a.set_sender_key_status(
            GROUP1,
            &[(DEVICE1, true), (DEVICE2, false), (DEVICE3, true)]
        )
    );
    call!(t, a.set_sender_key_status(GROUP1, &[(DEVICE2, true)]));
    call!(t, a.set_sender_key_status(GROUP1, &[]));
    call!(
        t,
        a.set_sender_key_status(GROUP2, &[(DEVICE1, true), (DEVICE4, false)])
    );
    call!(t, a.get_sender_key_devices(GROUP1) => sorted);
    call!(t, a.get_sender_key_devices(GROUP2) => sorted);
    // Deleting a device's rows removes it from every group.
    call!(t, a.delete_sender_key_device_rows(&[DEVICE1]));
    call!(t, a.delete_sender_key_device_rows(&[]));
    call!(t, a.get_sender_key_devices(GROUP1) => sorted);
    call!(t, a.get_sender_key_devices(GROUP2) => sorted);
    call!(t, a.clear_sender_key_devices(GROUP1));
    call!(t, a.get_sender_key_devices(GROUP1) => sorted);
    call!(t, a.get_sender_key_devices(GROUP2) => sorted);
    call!(t, a.clear_all_sender_key_devices());
    call!(t, a.get_sender_key_devices(GROUP2) => sorted);
    call!(
        t,
        a.set_sender_key_status(GROUP3, &[(DEVICE1, true), (DEVICE2, false)])
    );
    call!(t, b.get_sender_key_devices(GROUP3) => sorted);
    // A "clear all" in one session must stay in that session.
    call!(t, b.clear_all_sender_key_devices());
    call!(t, b.delete_sender_key_device_rows(&[DEVICE2]));
    call!(t, a.get_sender_key_devices(GROUP3) => sorted);
}

async fn lid_mappings(t: &mut Transcript, a: &Session<'_>, b: &Session<'_>) {
    t.section("ProtocolStore: LID-PN mappings");
    call!(t, a.get_lid_mapping(LID1));
    call!(t, a.get_pn_mapping(PHONE1));
    call!(t, a.get_all_lid_mappings() => mappings_sorted);
    call!(
        t,
        a.put_lid_mapping(&mapping(LID1, PHONE1, 1000, 1000, "usync"))
    );
    call!(t, a.get_lid_mapping(LID1));
    call!(t, a.get_pn_mapping(PHONE1));
    // A second LID for the same phone number, learnt later: the phone now means LID3.
    call!(
        t,
        a.put_lid_mappings(&[
            mapping(LID2, PHONE2, 1100, 1100, "usync"),
            mapping(LID3, PHONE1, 1200, 1200, "peer_pn_message"),
        ])
    );
    call!(t, a.put_lid_mappings(&[]));
    call!(t, a.get_pn_mapping(PHONE1));
    call!(t, a.get_lid_mapping(LID1));
    // Re-learning LID1 (see KNOWN_DIFFERENCES for created_at); learning it once more with
    // its original created_at brings both answers together again.
    call!(
        t,
        a.put_lid_mapping(&mapping(LID1, PHONE1, 5000, 5000, "peer_pn_message"))
    );
    call!(t, a.get_lid_mapping(LID1));
    call!(
        t,
        a.put_lid_mapping(&mapping(LID1, PHONE1, 1000, 5001, "usync"))
    );
    call!(t, a.get_lid_mapping(LID1));
    call!(t, a.get_pn_mapping(PHONE1));
    // LID2 moves to another phone number: the old number maps to nothing.
    call!(
        t,
        a.put_lid_mapping(&mapping(LID2, PHONE4, 1100, 1300, "usync"))
    );
    call!(t, a.get_pn_mapping(PHONE2));
    call!(t, a.get_pn_mapping(PHONE4));
    call!(t, a.get_all_lid_mappings() => mappings_sorted);
    // b's own mappings are left unread: with SqliteStore its one write failed (no device
    // row yet), so they differ by the known difference already recorded.
    call!(t, b.get_lid_mapping(LID1));
    call!(t, b.get_pn_mapping(PHONE1));
    call!(t, a.get_lid_mapping(ORPHAN_LID));
}

async fn base_keys(t: &mut Transcript, a: &Session<'_>, b: &Session<'_>) {
    t.section("ProtocolStore: base keys");
    call!(t, a.has_same_base_key(ALICE_DEV, MSG1, b"base key 1"));
    call!(t, a.save_base_key(ALICE_DEV, MSG1, b"base key 1"));
    call!(t, a.has_same_base_key(ALICE_DEV, MSG1, b"base key 1"));
    call!(t, a.has_same_base_key(ALICE_DEV, MSG1, b"base key 2"));
    call!(t, a.save_base_key(ALICE_DEV, MSG1, b"base key 2"));
    call!(t, a.has_same_base_key(ALICE_DEV, MSG1, b"base key 1"));
    call!(t, a.has_same_base_key(ALICE_DEV, MSG1, b"base key 2"));
    call!(t, a.save_base_key(ALICE_DEV, MSG2, b"base key 1"));
    call!(t, a.has_same_base_key(DAVE_DEV, MSG2, b"base key 1"));
    call!(t, a.delete_base_key(ALICE_DEV, MSG1));
    call!(t, a.has_same_base_key(ALICE_DEV, MSG1, b"base key 2"));
    call!(t, a.has_same_base_key(ALICE_DEV, MSG2, b"base key 1"));
    call!(t, a.delete_base_key(ALICE_DEV, MSG1));
    call!(t, b.has_same_base_key(ALICE_DEV, MSG2, b"base key 1"));
    call!(t, b.delete_base_key(ALICE_DEV, MSG2));
    call!(t, a.has_same_base_key(ALICE_DEV, MSG2, b"base key 1"));
}

async fn device_registry(t: &mut Transcript, a: &Session<'_>, b: &Session<'_>) {
    t.section("ProtocolStore: device registry");
    call!(t, a.get_devices(USER1));
    call!(
        t,
        a.update_device_list(device_list(
            USER1,
            &[(0, None, false), (3, Some(7), true)],
            1_700_000_000,
            Some("2:abc"),
            Some(42)
        ))
    );
    call!(t, a.get_devices(USER1));
    // Overwrite, clearing the optional fields.
    call!(
        t,
        a.update_device_list(device_list(
            USER1,
            &[(0, Some(1), false)],
            1_700_000_100,
            None,
            None
        ))
    );
    call!(t, a.get_devices(USER1));
    call!(
        t,
        a.update_device_lists(vec![
            device_list(
                USER2,
                &[(0, None, false)],
                1_700_000_200,
                Some("2:def"),
                None
            ),
            device_list(
                USER3,
                &[(0, None, false), (2, Some(2), false), (5, Some(3), true)],
                1_700_000_300,
                None,
                Some(7)
            ),
        ])
    );
    call!(t, a.update_device_lists(vec![]));
    call!(t, a.get_devices(USER2));
    call!(t, a.get_devices(USER3));
    call!(t, a.delete_devices(USER2));
    call!(t, a.get_devices(USER2));
    call!(t, a.delete_devices(USER2));
    call!(t, b.get_devices(USER1));
    call!(t, b.delete_devices(USER1));
    call!(t, a.get_devices(USER1));
}

async fn group_metadata(t: &mut Transcript, a: &Session<'_>, b: &Session<'_>) {
    t.section("ProtocolStore: group metadata");
    call!(t, a.get_group_metadata(GROUP1) => opt_blob);
    call!(t, a.put_group_metadata(GROUP1, b"group info v1"));
    call!(t, a.get_group_metadata(GROUP1) => opt_blob);
    call!(t, a.put_group_metadata(GROUP1, b"group info v2"));
    call!(t, a.get_group_metadata(GROUP1) => opt_blob);
    call!(t, a.put_group_metadata(GROUP2, b"group 2 info"));
    call!(t, a.delete_group_metadata(GROUP1));
    call!(t, a.get_group_metadata(GROUP1) => opt_blob);
    call!(t, a.delete_group_metadata(GROUP1));
    call!(t, b.get_group_metadata(GROUP2) => opt_blob);
    call!(t, b.delete_group_metadata(GROUP2));
    call!(t, a.get_group_metadata(GROUP2) => opt_blob);
}

async fn tc_tokens(t: &mut Transcript, a: &Session<'_>, b: &Session<'_>) {
    t.section("ProtocolStore: trusted contact tokens");
    call!(t, a.get_tc_token(TC1) => show_tc);
    call!(t, a.get_all_tc_token_jids() => sorted);
    call!(t, a.put_tc_token(TC1, &tc(b"token 1 v1", 1000, Some(900))));
    call!(t, a.get_tc_token(TC1) => show_tc);
    // A plain put overwrites everything, the sender bucket included.
    call!(t, a.put_tc_token(TC1, &tc(b"token 1 v2", 1100, None)));
    call!(t, a.get_tc_token(TC1) => show_tc);
    call!(t, a.store_received_tc_token(TC2, b"token 2 v1", 2000));
    call!(t, a.get_tc_token(TC2) => show_tc);
    // Newer-wins: an older token is dropped, an equally new one replaces.
    call!(t, a.store_received_tc_token(TC2, b"token 2 stale", 1500));
    call!(t, a.get_tc_token(TC2) => show_tc);
    call!(t, a.store_received_tc_token(TC2, b"token 2 v2", 2000));
    call!(t, a.get_tc_token(TC2) => show_tc);
    // The sender bucket only moves forward and leaves the token alone.
    call!(t, a.touch_tc_token_sender_timestamp(TC2, 2100));
    call!(t, a.get_tc_token(TC2) => show_tc);
    call!(t, a.touch_tc_token_sender_timestamp(TC2, 2050));
    call!(t, a.get_tc_token(TC2) => show_tc);
    // Touching an unknown contact leaves a byte-less placeholder, which never blocks the
    // first real token however old, and whose sender bucket that token keeps.
    call!(t, a.touch_tc_token_sender_timestamp(TC3, 3000));
    call!(t, a.get_tc_token(TC3) => show_tc);
    call!(t, a.store_received_tc_token(TC3, b"token 3", 10));
    call!(t, a.get_tc_token(TC3) => show_tc);
    call!(t, a.put_tc_token(TC4, &tc(b"", 0, None)));
    call!(t, a.get_all_tc_token_jids() => sorted);
    // Even with cutoffs of 0, TC4 goes: an empty token and no sender bucket hold nothing.
    call!(t, a.delete_expired_tc_tokens(0, 0));
    // Token cutoff 1200, sender cutoff 2500: TC1 (token 1100, no sender bucket) goes; TC2
    // keeps a live token, TC3 a live sender bucket.
    call!(t, a.delete_expired_tc_tokens(1200, 2500));
    call!(t, a.get_all_tc_token_jids() => sorted);
    call!(t, a.delete_tc_token(TC2));
    call!(t, a.get_tc_token(TC2) => show_tc);
    call!(t, a.delete_tc_token(TC2));
    call!(t, b.get_tc_token(TC3) => show_tc);
    call!(t, b.get_all_tc_token_jids() => sorted);
    call!(t, b.delete_expired_tc_tokens(i64::MAX, i64::MAX));
    call!(t, b.delete_tc_token(TC3));
    call!(t, a.get_all_tc_token_jids() => sorted);
}

async fn sent_messages(t: &mut Transcript, a: &Session<'_>, b: &Session<'_>) {
    t.section("ProtocolStore: sent messages");
    call!(t, a.take_sent_message(CHAT1, MSG1) => opt_blob);
    call!(t, a.store_sent_message(CHAT1, MSG1, b"payload 1 v1"));
    call!(t, a.store_sent_message(CHAT1, MSG2, b"payload 2"));
    call!(t, a.store_sent_message(CHAT2, MSG1, b"payload 3"));
    call!(t, a.store_sent_message(CHAT1, MSG1, b"payload 1 v2"));
    // A take consumes: a retry receipt must not be answered twice.
    call!(t, a.take_sent_message(CHAT1, MSG1) => opt_blob);
    call!(t, a.take_sent_message(CHAT1, MSG1) => opt_blob);
    call!(t, a.delete_expired_sent_messages(0));
    call!(t, b.take_sent_message(CHAT1, MSG2) => opt_blob);
    call!(t, b.delete_expired_sent_messages(FAR_FUTURE));
    call!(t, a.delete_expired_sent_messages(FAR_FUTURE));
    call!(t, a.take_sent_message(CHAT1, MSG2) => opt_blob);
    call!(t, a.take_sent_message(CHAT2, MSG1) => opt_blob);
    call!(
        t,
        a.store_sent_message(CHAT3, MSG2, b"payload that survives")
    );
}

async fn pending_inbound(t: &mut Transcript, a: &Session<'_>, b: &Session<'_>) {
    t.section("ProtocolStore: pending inbound (durability hook buffer)");
    call!(t, a.get_pending_inbound(CHAT1, SENDER1, "ID1") => opt_blob);
    call!(
        t,
        a.store_pending_inbound(CHAT1, SENDER1, "ID1", b"message 1 v1")
    );
    call!(t, a.get_pending_inbound(CHAT1, SENDER1, "ID1") => opt_blob);
    call!(
        t,
        a.store_pending_inbound(CHAT1, SENDER1, "ID1", b"message 1 v2")
    );
    call!(t, a.get_pending_inbound(CHAT1, SENDER1, "ID1") => opt_blob);
    // Stanza ids are unique only within a (chat, sender): the same id from another sender
    // is another row.
    call!(
        t,
        a.store_pending_inbound(CHAT1, SENDER2, "ID1", b"message from sender 2")
    );
    call!(t, a.get_pending_inbound(CHAT1, SENDER1, "ID1") => opt_blob);
    call!(t, a.get_pending_inbound(CHAT1, SENDER2, "ID1") => opt_blob);
    call!(
        t,
        a.store_pending_inbound_batch(&[
            inbound(CHAT1, SENDER1, "ID2", b"message 2"),
            inbound(CHAT1, SENDER1, "ID3", b"message 3"),
            inbound(CHAT2, SENDER1, "ID1", b"message in chat 2"),
        ])
    );
    call!(t, a.store_pending_inbound_batch(&[]));
    call!(t, a.get_pending_inbound(CHAT1, SENDER1, "ID2") => opt_blob);
    call!(t, a.get_pending_inbound(CHAT1, SENDER1, "ID3") => opt_blob);
    call!(t, a.get_pending_inbound(CHAT2, SENDER1, "ID1") => opt_blob);
    call!(t, a.delete_pending_inbound(CHAT1, SENDER1, "ID1"));
    call!(t, a.get_pending_inbound(CHAT1, SENDER1, "ID1") => opt_blob);
    call!(t, a.get_pending_inbound(CHAT1, SENDER2, "ID1") => opt_blob);
    call!(t, a.delete_pending_inbound(CHAT1, SENDER1, "ID1"));
    call!(
        t,
        a.delete_pending_inbound_batch(&[
            inbound_key(CHAT1, SENDER1, "ID2"),
            inbound_key(CHAT1, SENDER1, "ID9")
        ])
    );
    call!(t, a.delete_pending_inbound_batch(&[]));
    call!(t, a.get_pending_inbound(CHAT1, SENDER1, "ID2") => opt_blob);
    call!(t, a.get_pending_inbound(CHAT1, SENDER1, "ID3") => opt_blob);
    call!(t, a.delete_expired_pending_inbound(0));
    call!(t, b.get_pending_inbound(CHAT1, SENDER1, "ID3") => opt_blob);
    call!(t, b.delete_expired_pending_inbound(FAR_FUTURE));
    call!(
        t,
        b.delete_pending_inbound_batch(&[inbound_key(CHAT1, SENDER1, "ID3")])
    );
    call!(t, a.get_pending_inbound(CHAT1, SENDER1, "ID3") => opt_blob);
    call!(t, a.delete_expired_pending_inbound(FAR_FUTURE));
    call!(t, a.get_pending_inbound(CHAT1, SENDER1, "ID3") => opt_blob);
    // Buffered and not yet acknowledged when the process stops: must be there after a
    // restart (read_back), that is the point of the buffer.
    call!(
        t,
        a.store_pending_inbound(CHAT1, SENDER1, "ID4", b"message awaiting its hook")
    );
}

async fn msg_secrets(t: &mut Transcript, a: &Session<'_>, b: &Session<'_>) {
    t.section("MsgSecretStore");
    call!(t, a.get_msg_secret(CHAT2, SENDER1, MSG1) => opt_blob);
    call!(t, a.get_msg_secret_with_ts(CHAT2, SENDER1, MSG1) => |s| s.map(|(v, ts)| (blob(v), ts)));
    call!(t, a.put_msg_secret(CHAT2, SENDER1, MSG1, &[1; 32]));
    call!(t, a.get_msg_secret(CHAT2, SENDER1, MSG1) => opt_blob);
    call!(t, a.get_msg_secret_with_ts(CHAT2, SENDER1, MSG1) => |s| s.map(|(v, ts)| (blob(v), ts)));
    call!(
        t,
        a.put_msg_secrets(vec![
            secret(CHAT2, SENDER1, MSG2, 2, 1000, 500),
            secret(CHAT2, SENDER1, "MSG3", 3, FAR_FUTURE, 600),
            secret(CHAT2, SENDER2, MSG1, 4, 0, 0),
        ])
    );
    call!(t, a.put_msg_secrets(vec![]));
    // Re-persisting merges: the new secret, the later deadline (0 = never wins), and the
    // known parent time is not clobbered by 0.
    call!(
        t,
        a.put_msg_secrets(vec![secret(CHAT2, SENDER1, MSG2, 5, 2000, 0)])
    );
    call!(
        t,
        a.put_msg_secrets(vec![secret(CHAT2, SENDER1, MSG1, 6, 1500, 700)])
    );
    call!(t, a.get_msg_secret_with_ts(CHAT2, SENDER1, MSG2) => |s| s.map(|(v, ts)| (blob(v), ts)));
    call!(t, a.get_msg_secret_with_ts(CHAT2, SENDER1, MSG1) => |s| s.map(|(v, ts)| (blob(v), ts)));
    call!(t, a.get_msg_secret(CHAT2, SENDER2, MSG1) => opt_blob);
    call!(t, a.delete_expired_msg_secrets(1999));
    call!(t, a.delete_expired_msg_secrets(2000));
    call!(t, a.get_msg_secret(CHAT2, SENDER1, MSG2) => opt_blob);
    call!(t, a.get_msg_secret(CHAT2, SENDER1, MSG1) => opt_blob);
    call!(t, b.get_msg_secret(CHAT2, SENDER1, MSG1) => opt_blob);
    call!(t, b.get_msg_secret_with_ts(CHAT2, SENDER1, "MSG3") => |s| s.map(|(v, ts)| (blob(v), ts)));
    call!(t, b.delete_expired_msg_secrets(i64::MAX));
    call!(t, a.get_msg_secret_with_ts(CHAT2, SENDER1, "MSG3") => |s| s.map(|(v, ts)| (blob(v), ts)));
    call!(t, a.delete_expired_msg_secrets(FAR_FUTURE));
    call!(t, a.get_msg_secret_with_ts(CHAT2, SENDER1, "MSG3") => |s| s.map(|(v, ts)| (blob(v), ts)));
}

/// Reads back every kind of row the sequence leaves behind. Running it twice gives the
/// same answers (the one consuming read puts its row back), so it can be compared before
/// and after the stores are closed and reopened.
async fn read_back(t: &mut Transcript, a: &Session<'_>, b: &Session<'_>) {
    t.section("read back");
    call!(t, a.exists());
    record_load(t, a, false).await;
    call!(t, a.load_identity(ALICE) => opt_blob);
    call!(t, a.load_identity(CAROL_DEV) => opt_blob);
    call!(t, a.load_identity(BOB) => opt_blob);
    call!(t, a.has_signal_state_for_user(ALICE_USER));
    call!(t, a.get_session(ALICE_DEV) => opt_blob);
    call!(t, a.get_session(DAVE_DEV) => opt_blob);
    call!(t, a.has_session(ERIN));
    call!(t, a.load_prekeys_batch(&[1, 2, 3, 4, 50]) => pairs_sorted);
    call!(t, a.get_max_prekey_id());
    call!(t, a.load_all_signed_prekeys() => pairs_sorted);
    call!(t, a.get_sender_key(SENDER_KEY_1) => opt_blob);
    call!(t, a.get_sender_key(SENDER_KEY_3) => opt_blob);
    call!(t, a.get_sync_key(SYNC_KEY_1) => show_sync_key);
    call!(t, a.get_sync_key(SYNC_KEY_2) => show_sync_key);
    call!(t, a.get_sync_key(SYNC_KEY_3) => show_sync_key);
    call!(t, a.get_latest_sync_key_id() => opt_blob);
    call!(t, a.get_version("regular") => show_version);
    call!(t, a.get_version("critical_block") => show_version);
    call!(t, a.get_mutation_macs("regular", &[index_mac(1), index_mac(4)]) => show_macs);
    call!(t, a.get_mutation_mac("regular_high", &index_mac(1)) => opt_blob);
    call!(t, a.get_sender_key_devices(GROUP3) => sorted);
    call!(t, a.get_all_lid_mappings() => mappings_sorted);
    call!(t, a.get_pn_mapping(PHONE4));
    call!(t, a.has_same_base_key(ALICE_DEV, MSG2, b"base key 1"));
    call!(t, a.get_devices(USER1));
    call!(t, a.get_devices(USER3));
    call!(t, a.get_group_metadata(GROUP2) => opt_blob);
    call!(t, a.get_all_tc_token_jids() => sorted);
    call!(t, a.get_tc_token(TC3) => show_tc);
    call!(t, a.take_sent_message(CHAT3, MSG2) => opt_blob);
    call!(
        t,
        a.store_sent_message(CHAT3, MSG2, b"payload that survives")
    );
    call!(t, a.get_pending_inbound(CHAT1, SENDER1, "ID4") => opt_blob);
    call!(t, a.get_msg_secret_with_ts(CHAT2, SENDER1, MSG1) => |s| s.map(|(v, ts)| (blob(v), ts)));
    call!(t, a.get_msg_secret_with_ts(CHAT2, SENDER2, MSG1) => |s| s.map(|(v, ts)| (blob(v), ts)));
    call!(t, b.exists());
    record_load(t, b, false).await;
    call!(t, b.load_identity(ALICE) => opt_blob);
    call!(t, b.get_session(DAVE_DEV) => opt_blob);
    call!(t, b.load_prekey(50) => opt_blob);
    call!(t, b.get_max_prekey_id());
}

// ---------------------------------------------------------------------------------------
// A backend with only the required methods, to record what the trait defaults answer
// ---------------------------------------------------------------------------------------

/// Delegates the required methods to an `InMemoryBackend` and leaves every provided one
/// to the trait's default, which is what a backend gets that does not override it.
struct RequiredOnly(InMemoryBackend);

#[async_trait]
impl SignalStore for RequiredOnly {
    async fn put_identity(&self, address: &str, key: [u8; 32]) -> StoreResult<()> {
        self.0.put_identity(address, key).await
    }
    async fn load_identity(&self, address: &str) -> StoreResult<Option<[u8; 32]>> {
        self.0.load_identity(address).await
    }
    async fn delete_identity(&self, address: &str) -> StoreResult<()> {
        self.0.delete_identity(address).await
    }
    async fn get_session(&self, address: &str) -> StoreResult<Option<Bytes>> {
        self.0.get_session(address).await
    }
    async fn put_session(&self, address: &str, session: &[u8]) -> StoreResult<()> {
        self.0.put_session(address, session).await
    }
    async fn delete_session(&self, address: &str) -> StoreResult<()> {
        self.0.delete_session(address).await
    }
    async fn store_prekey(&self, id: u32, record: &[u8], uploaded: bool) -> StoreResult<()> {
        self.0.store_prekey(id, record, uploaded).await
    }
    async fn load_prekey(&self, id: u32) -> StoreResult<Option<Bytes>> {
        self.0.load_prekey(id).await
    }
    async fn mark_prekeys_uploaded(&self, ids: &[u32]) -> StoreResult<()> {
        self.0.mark_prekeys_uploaded(ids).await
    }
    async fn remove_prekey(&self, id: u32) -> StoreResult<()> {
        self.0.remove_prekey(id).await
    }
    async fn get_max_prekey_id(&self) -> StoreResult<u32> {
        self.0.get_max_prekey_id().await
    }
    async fn store_signed_prekey(&self, id: u32, record: &[u8]) -> StoreResult<()> {
        self.0.store_signed_prekey(id, record).await
    }
    async fn load_signed_prekey(&self, id: u32) -> StoreResult<Option<Vec<u8>>> {
        self.0.load_signed_prekey(id).await
    }
    async fn load_all_signed_prekeys(&self) -> StoreResult<Vec<(u32, Vec<u8>)>> {
        self.0.load_all_signed_prekeys().await
    }
    async fn remove_signed_prekey(&self, id: u32) -> StoreResult<()> {
        self.0.remove_signed_prekey(id).await
    }
    async fn put_sender_key(&self, address: &str, record: &[u8]) -> StoreResult<()> {
        self.0.put_sender_key(address, record).await
    }
    async fn get_sender_key(&self, address: &str) -> StoreResult<Option<Vec<u8>>> {
        self.0.get_sender_key(address).await
    }
    async fn delete_sender_key(&self, address: &str) -> StoreResult<()> {
        self.0.delete_sender_key(address).await
    }
}

#[async_trait]
impl AppSyncStore for RequiredOnly {
    async fn get_sync_key(&self, key_id: &[u8]) -> StoreResult<Option<AppStateSyncKey>> {
        self.0.get_sync_key(key_id).await
    }
    async fn set_sync_key(&self, key_id: &[u8], key: AppStateSyncKey) -> StoreResult<()> {
        self.0.set_sync_key(key_id, key).await
    }
    async fn get_version(&self, name: &str) -> StoreResult<HashState> {
        self.0.get_version(name).await
    }
    async fn set_version(&self, name: &str, state: HashState) -> StoreResult<()> {
        self.0.set_version(name, state).await
    }
    async fn put_mutation_macs(
        &self,
        name: &str,
        version: u64,
        mutations: &[AppStateMutationMAC],
    ) -> StoreResult<()> {
        self.0.put_mutation_macs(name, version, mutations).await
    }
    async fn get_mutation_mac(&self, name: &str, index_mac: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        self.0.get_mutation_mac(name, index_mac).await
    }
    async fn delete_mutation_macs(&self, name: &str, index_macs: &[Vec<u8>]) -> StoreResult<()> {
        self.0.delete_mutation_macs(name, index_macs).await
    }
    async fn clear_mutation_macs(&self, name: &str) -> StoreResult<()> {
        self.0.clear_mutation_macs(name).await
    }
    async fn get_latest_sync_key_id(&self) -> StoreResult<Option<Vec<u8>>> {
        self.0.get_latest_sync_key_id().await
    }
}

#[async_trait]
impl ProtocolStore for RequiredOnly {
    async fn get_sender_key_devices(&self, group_jid: &str) -> StoreResult<Vec<(String, bool)>> {
        self.0.get_sender_key_devices(group_jid).await
    }
    async fn set_sender_key_status(
        &self,
        group_jid: &str,
        entries: &[(&str, bool)],
    ) -> StoreResult<()> {
        self.0.set_sender_key_status(group_jid, entries).await
    }
    async fn clear_sender_key_devices(&self, group_jid: &str) -> StoreResult<()> {
        self.0.clear_sender_key_devices(group_jid).await
    }
    async fn delete_sender_key_device_rows(&self, device_jids: &[&str]) -> StoreResult<()> {
        self.0.delete_sender_key_device_rows(device_jids).await
    }
    async fn clear_all_sender_key_devices(&self) -> StoreResult<()> {
        self.0.clear_all_sender_key_devices().await
    }
    async fn get_lid_mapping(&self, lid: &str) -> StoreResult<Option<LidPnMappingEntry>> {
        self.0.get_lid_mapping(lid).await
    }
    async fn get_pn_mapping(&self, phone: &str) -> StoreResult<Option<LidPnMappingEntry>> {
        self.0.get_pn_mapping(phone).await
    }
    async fn put_lid_mapping(&self, entry: &LidPnMappingEntry) -> StoreResult<()> {
        self.0.put_lid_mapping(entry).await
    }
    async fn get_all_lid_mappings(&self) -> StoreResult<Vec<LidPnMappingEntry>> {
        self.0.get_all_lid_mappings().await
    }
    async fn save_base_key(
        &self,
        address: &str,
        message_id: &str,
        base_key: &[u8],
    ) -> StoreResult<()> {
        self.0.save_base_key(address, message_id, base_key).await
    }
    async fn has_same_base_key(
        &self,
        address: &str,
        message_id: &str,
        current_base_key: &[u8],
    ) -> StoreResult<bool> {
        self.0
            .has_same_base_key(address, message_id, current_base_key)
            .await
    }
    async fn delete_base_key(&self, address: &str, message_id: &str) -> StoreResult<()> {
        self.0.delete_base_key(address, message_id).await
    }
    async fn update_device_list(&self, record: DeviceListRecord) -> StoreResult<()> {
        self.0.update_device_list(record).await
    }
    async fn get_devices(&self, user: &str) -> StoreResult<Option<DeviceListRecord>> {
        self.0.get_devices(user).await
    }
    async fn delete_devices(&self, user: &str) -> StoreResult<()> {
        self.0.delete_devices(user).await
    }
    async fn get_tc_token(&self, jid: &str) -> StoreResult<Option<TcTokenEntry>> {
        self.0.get_tc_token(jid).await
    }
    async fn put_tc_token(&self, jid: &str, entry: &TcTokenEntry) -> StoreResult<()> {
        self.0.put_tc_token(jid, entry).await
    }
    async fn delete_tc_token(&self, jid: &str) -> StoreResult<()> {
        self.0.delete_tc_token(jid).await
    }
    async fn get_all_tc_token_jids(&self) -> StoreResult<Vec<String>> {
        self.0.get_all_tc_token_jids().await
    }
    async fn delete_expired_tc_tokens(
        &self,
        token_cutoff: i64,
        sender_cutoff: i64,
    ) -> StoreResult<u32> {
        self.0
            .delete_expired_tc_tokens(token_cutoff, sender_cutoff)
            .await
    }
    async fn store_sent_message(
        &self,
        chat_jid: &str,
        message_id: &str,
        payload: &[u8],
    ) -> StoreResult<()> {
        self.0
            .store_sent_message(chat_jid, message_id, payload)
            .await
    }
    async fn take_sent_message(
        &self,
        chat_jid: &str,
        message_id: &str,
    ) -> StoreResult<Option<Vec<u8>>> {
        self.0.take_sent_message(chat_jid, message_id).await
    }
    async fn delete_expired_sent_messages(&self, cutoff_timestamp: i64) -> StoreResult<u32> {
        self.0.delete_expired_sent_messages(cutoff_timestamp).await
    }
}

#[async_trait]
impl DeviceStore for RequiredOnly {
    async fn save(&self, device: &Device) -> StoreResult<()> {
        self.0.save(device).await
    }
    async fn load(&self) -> StoreResult<Option<Device>> {
        self.0.load().await
    }
    async fn exists(&self) -> StoreResult<bool> {
        self.0.exists().await
    }
    async fn create(&self) -> StoreResult<i32> {
        self.0.create().await
    }
}

#[async_trait]
impl MsgSecretStore for RequiredOnly {
    async fn put_msg_secrets(&self, entries: Vec<MsgSecretEntry>) -> StoreResult<usize> {
        self.0.put_msg_secrets(entries).await
    }
    async fn get_msg_secret(
        &self,
        chat: &str,
        sender: &str,
        msg_id: &str,
    ) -> StoreResult<Option<Vec<u8>>> {
        self.0.get_msg_secret(chat, sender, msg_id).await
    }
    async fn delete_expired_msg_secrets(&self, cutoff_timestamp: i64) -> StoreResult<u32> {
        self.0.delete_expired_msg_secrets(cutoff_timestamp).await
    }
}

/// The provided methods whose default answers differ from `InMemoryBackend`'s overrides.
/// Every other provided method's default (the batch loops, `has_session`, the tc-token
/// read-modify-writes, `put_msg_secret`, ...) must answer exactly like the reference.
const DEFAULTS_THAT_DIFFER: &[&str] = &[
    // Conservative `true`: the caller then scans every device.
    "has_signal_state_for_user",
    // No group persistence: always absent (put and delete are no-ops).
    "get_group_metadata",
    // No stored parent time: always 0.
    "get_msg_secret_with_ts",
    // The durability buffer fails closed (an error, the message stays unacked) ...
    "store_pending_inbound",
    "get_pending_inbound",
    "delete_pending_inbound",
    "store_pending_inbound_batch",
    "delete_pending_inbound_batch",
    // ... except the keepalive sweep, which answers Ok(0) for every backend.
    "delete_expired_pending_inbound",
];

/// `b.method(args)` → `method`.
fn method_of(line: &str) -> Option<&str> {
    let call = line.split_once(" -> ")?.0;
    let after_session = call.split_once('.')?.1;
    Some(after_session.split_once('(')?.0)
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

async fn reference_transcript() -> Vec<String> {
    let dir = tempfile::tempdir().expect("create a temporary directory");
    transcript(&open_in_memory(dir.path().to_path_buf()).await).await
}

#[tokio::test]
async fn reference_transcript_covers_every_method() {
    let lines = reference_transcript().await;
    assert!(
        lines.len() > 100,
        "the reference transcript is too short: {lines:#?}"
    );

    let called: BTreeSet<&str> = lines.iter().filter_map(|l| method_of(l)).collect();
    let missing: Vec<&&str> = METHODS.iter().filter(|m| !called.contains(**m)).collect();
    assert!(missing.is_empty(), "the sequence never calls {missing:?}");
    let listed: BTreeSet<&str> = METHODS.iter().copied().collect();
    assert_eq!(listed.len(), METHODS.len(), "METHODS lists a method twice");

    match trait_methods_on_disk() {
        Some((source, declared)) => {
            let declared: BTreeSet<&str> = declared.iter().map(String::as_str).collect();
            let new: Vec<&&str> = declared.difference(&listed).collect();
            let gone: Vec<&&str> = listed.difference(&declared).collect();
            assert!(
                new.is_empty() && gone.is_empty(),
                "{} declares methods METHODS does not list: {new:?}; METHODS lists methods it \
                 does not declare: {gone:?}. Update METHODS and contract_sequence.",
                source.display()
            );
        }
        None => eprintln!(
            "note: the wacore source is not on disk; METHODS was not compared with the traits"
        ),
    }
}

#[tokio::test]
async fn engines_match_the_reference() {
    let reference = reference_transcript().await;
    for engine in ENGINES {
        if !(engine.available)("engines_match_the_reference") {
            continue;
        }
        let dir = tempfile::tempdir().expect("create a temporary directory");
        let pair = (engine.open)(dir.path().to_path_buf()).await;
        let mut theirs = transcript(&pair).await;
        let mut expected = reference.clone();
        let unseen = normalise_known_differences(engine, &mut expected, &mut theirs);
        assert_same_transcript(
            &format!("{} ({})", engine.id, engine.about),
            &expected,
            &theirs,
        );
        let unseen: Vec<String> = unseen
            .iter()
            .map(|k| format!("`{}` ({})", k.call, k.why))
            .collect();
        assert!(
            unseen.is_empty(),
            "{}: these known differences are not there any more, remove them from \
             KNOWN_DIFFERENCES: {unseen:#?}",
            engine.id
        );
    }
}

#[tokio::test]
async fn durable_engines_survive_reopening() {
    for engine in ENGINES.iter().filter(|e| e.durable) {
        if !(engine.available)("durable_engines_survive_reopening") {
            continue;
        }
        let dir = tempfile::tempdir().expect("create a temporary directory");
        let before = {
            let pair = (engine.open)(dir.path().to_path_buf()).await;
            let (a, b) = sessions_of(&pair);
            let mut written = Transcript::default();
            contract_sequence(&mut written, &a, &b).await;
            let mut before = Transcript::default();
            read_back(&mut before, &a, &b).await;
            before.lines
            // Both stores are dropped here, closing their connections.
        };
        let pair = (engine.open)(dir.path().to_path_buf()).await;
        let (a, b) = sessions_of(&pair);
        let mut after = Transcript::default();
        read_back(&mut after, &a, &b).await;
        assert_same_transcript(
            &format!("{}: read back after reopening", engine.id),
            &before,
            &after.lines,
        );
    }
}

#[tokio::test]
async fn trait_defaults_are_part_of_the_contract() {
    let reference = reference_transcript().await;
    let pair = Pair {
        a: Arc::new(RequiredOnly(InMemoryBackend::new())),
        b: Arc::new(RequiredOnly(InMemoryBackend::new())),
    };
    let defaults = transcript(&pair).await;
    assert_eq!(
        reference.len(),
        defaults.len(),
        "the transcripts do not line up"
    );

    let mut differing = BTreeSet::new();
    for (r, d) in reference.iter().zip(&defaults) {
        if r != d {
            let method = method_of(d).unwrap_or(d);
            assert!(
                DEFAULTS_THAT_DIFFER.contains(&method),
                "a trait default answers unlike the reference:\n  reference: {r}\n  default:   {d}"
            );
            differing.insert(method);
        }
    }
    let unchanged: Vec<&&str> = DEFAULTS_THAT_DIFFER
        .iter()
        .filter(|m| !differing.contains(**m))
        .collect();
    assert!(
        unchanged.is_empty(),
        "these defaults now answer like the reference; update DEFAULTS_THAT_DIFFER: {unchanged:?}"
    );

    // Fail closed: a backend without the buffer refuses to hold a message it cannot keep.
    let refused = "a.store_pending_inbound(CHAT1, SENDER1, \"ID1\", b\"message 1 v1\") -> \
                   Err(data validation failed: backend does not support the pending inbound \
                   buffer required by the durability hook)";
    assert!(
        defaults.iter().any(|l| l == refused),
        "the default store_pending_inbound no longer fails closed: {:#?}",
        defaults
            .iter()
            .filter(|l| l.contains(".store_pending_inbound("))
            .collect::<Vec<_>>()
    );
    let sweep = "a.delete_expired_pending_inbound(FAR_FUTURE) -> Ok(0)";
    assert!(
        defaults.iter().any(|l| l == sweep),
        "the default pending-inbound sweep must answer Ok(0)"
    );
}
