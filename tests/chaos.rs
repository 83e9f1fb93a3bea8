//! Chaos: `kill -9` at awkward moments.
//!
//! One data dir lives through every round. Each round starts the real binary on it, fires
//! a random, sequential mix of create/start/stop/delete/logout/backup/restore at a few
//! session ids from a client thread, and kills the server with SIGKILL 0–400 ms into the
//! burst (so also during the boot that resumes the previous round's sessions): at a
//! random instant, aimed into a request on the wire, or right after a 2xx arrived (see
//! [`Kill`]). Then it restarts the server on the same dir and checks:
//!
//! - every SQLite file (`botvisor.db`, each credential file, each backup) passes
//!   `PRAGMA integrity_check`, right after the kill and again once the sessions settled;
//! - every request answered 2xx before the kill is reflected (the README: "a 2xx is sent
//!   only once the change it confirms is committed"), unless a later request on the same
//!   id, confirmed or in flight at the kill, could have changed it (see [`Model`]);
//! - a confirmed backup is listed, is a well-formed backup of its session, and restores;
//! - no orphan files: no credential or backup file of a session the API does not list;
//! - convergence: within 15 s every session that should run is `online` (or `failed` /
//!   `logged_out` with a `lastError`), every stopped one is not running, and every online
//!   session has its credential file, marked paired (the sim link creates the file when a
//!   session first connects and writes `paired` into it before it reports `online`).
//!
//! `BOTVISOR_CHAOS_SEED` (decimal or 0x-hex) and `BOTVISOR_CHAOS_ROUNDS` (default 50) tune
//! it; `BOTVISOR_CHAOS_VERBOSE=1` prints every request. The seed fixes the choices (ops,
//! ids, pauses, kill instants), not the server's timing, so a failure is reproduced by
//! running the same seed, sometimes more than once. On a failure the data dir (with its
//! `server.log`) is kept and its path printed, with the requests that led to it.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Server;
use rusqlite::{Connection, OpenFlags};
use serde_json::Value;

const DEFAULT_SEED: u64 = 0xC4A0_5EED_0000_0001;
const DEFAULT_ROUNDS: usize = 50;
/// Session ids `c0` .. `c5`.
const IDS: usize = 6;
/// The kill comes this long (at most) after the burst starts.
const KILL_WINDOW_MS: u64 = 400;
/// How long sessions get to settle after the restart.
const CONVERGE: Duration = Duration::from_secs(15);
/// API restores of this round's confirmed backups tried per round (each costs a restart).
const RESTORES_PER_ROUND: usize = 2;
/// Backups are never pruned here (`--backup-keep 1000`): pruning would let a newer backup,
/// even one whose answer was lost, remove a confirmed one, and this test is about kills.
/// Resumed sessions start at once (`--boot-interval 0s`), as recommended for the sim link.
const FLAGS: &[&str] = &["--backup-keep", "1000", "--boot-interval", "0s"];

// ---------------------------------------------------------------------------------------
// A tiny seeded PRNG (xorshift64*).

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        // Never zero (xorshift would stay at zero).
        Rng((seed ^ 0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (n > 0; the modulo bias is irrelevant here).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn index(&mut self, len: usize) -> usize {
        self.below(len as u64) as usize
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let parsed = match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    };
    Some(parsed.unwrap_or_else(|e| panic!("{name}={v:?} is not a number: {e}")))
}

/// Progress lines go straight to stderr: libtest would hold back `eprintln!` until the
/// test ends (and show it only with --nocapture).
fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn uid(id: usize) -> String {
    format!("c{id}")
}

fn phone(id: usize) -> String {
    format!("155500000{id:02}")
}

// ---------------------------------------------------------------------------------------
// Requests and their outcomes.

#[derive(Clone, Debug)]
enum Op {
    Create,
    Start,
    Stop,
    Delete,
    Logout,
    Backup,
    /// A given backup id, or the latest.
    Restore(Option<String>),
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Create => write!(f, "create"),
            Op::Start => write!(f, "start"),
            Op::Stop => write!(f, "stop"),
            Op::Delete => write!(f, "delete"),
            Op::Logout => write!(f, "logout"),
            Op::Backup => write!(f, "backup"),
            Op::Restore(None) => write!(f, "restore(latest)"),
            Op::Restore(Some(b)) => write!(f, "restore({b})"),
        }
    }
}

impl Op {
    fn request(&self, id: usize) -> (&'static str, String, Option<String>) {
        let u = uid(id);
        match self {
            Op::Create => (
                "POST",
                "/api/sessions".into(),
                Some(format!(
                    r#"{{"userId":"{u}","phoneNumber":"{}"}}"#,
                    phone(id)
                )),
            ),
            Op::Start => ("POST", format!("/api/sessions/{u}/start"), None),
            Op::Stop => ("POST", format!("/api/sessions/{u}/stop"), None),
            Op::Delete => ("DELETE", format!("/api/sessions/{u}"), None),
            Op::Logout => ("POST", format!("/api/sessions/{u}/logout"), None),
            Op::Backup => ("POST", format!("/api/sessions/{u}/backup"), None),
            Op::Restore(None) => ("POST", format!("/api/sessions/{u}/restore"), None),
            Op::Restore(Some(b)) => (
                "POST",
                format!("/api/sessions/{u}/restore"),
                Some(format!(r#"{{"backupId":"{b}"}}"#)),
            ),
        }
    }
}

#[derive(Clone, Debug)]
enum Outcome {
    /// A 2xx: the change was committed before the answer was sent. A backup's id.
    Confirmed(u16, Option<String>),
    /// A 4xx that changes nothing (bad input, unknown session, busy, exists).
    Refused(u16, String),
    /// Might or might not have happened: no answer (in flight at the kill), or a 5xx.
    Unknown(String),
    /// Never reached the server (the connection was refused: it was dead).
    NotSent,
}

impl Outcome {
    fn in_flight(&self) -> bool {
        matches!(self, Outcome::Unknown(c) if c.starts_with("no answer"))
    }
}

/// One request of a burst.
#[derive(Clone, Debug)]
struct Rec {
    id: usize,
    op: Op,
    /// Sent this long after the burst started.
    at_ms: u128,
    took_ms: u128,
    outcome: Outcome,
}

impl fmt::Display for Rec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let out = match &self.outcome {
            Outcome::Confirmed(s, Some(b)) => format!("{s} confirmed (backupId {b})"),
            Outcome::Confirmed(s, None) => format!("{s} confirmed"),
            Outcome::Refused(s, m) => format!("{s} refused: {m}"),
            Outcome::Unknown(c) => format!("UNKNOWN: {c}"),
            Outcome::NotSent => "not sent (server dead)".into(),
        };
        write!(
            f,
            "+{}ms c{} {} ({}ms) -> {out}",
            self.at_ms, self.id, self.op, self.took_ms
        )
    }
}

/// What the wire said.
enum Wire {
    Answer(u16, String),
    NotConnected,
    Broken(String),
}

/// One HTTP/1.1 request on its own connection. Unlike the harness's client, it never
/// panics: a server killed mid-request is an expected outcome here.
fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> Wire {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return Wire::NotConnected;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    match body {
        Some(b) => req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        )),
        None => req.push_str("\r\n"),
    }
    if let Err(e) = s.write_all(req.as_bytes()) {
        return Wire::Broken(format!("no answer (write failed: {e})"));
    }
    let mut buf = Vec::new();
    let read = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split_once("\r\n\r\n")
        .and_then(|(head, _)| head.lines().next())
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse::<u16>().ok());
    let Some(status) = status else {
        return Wire::Broken(match read {
            Err(e) => format!("no answer ({e})"),
            Ok(_) if buf.is_empty() => "no answer (connection closed)".into(),
            Ok(_) => format!("no answer (partial: {text:?})"),
        });
    };
    // A status line means the server decided; the body only carries details.
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_default();
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Wire::Answer(status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest.get(n + 2..).unwrap_or("");
    }
    out
}

fn message(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| body.chars().take(120).collect())
}

fn classify(op: &Op, wire: Wire) -> Outcome {
    match wire {
        Wire::NotConnected => Outcome::NotSent,
        Wire::Broken(e) => Outcome::Unknown(e),
        Wire::Answer(s, body) if (200..300).contains(&s) => {
            let backup = match op {
                Op::Backup => serde_json::from_str::<Value>(&body)
                    .ok()
                    .and_then(|v| v["backupId"].as_str().map(str::to_string)),
                _ => None,
            };
            Outcome::Confirmed(s, backup)
        }
        // Refused before anything changed. (A restore answering 400 after the session was
        // stopped and started again changed nothing the model tracks either.)
        Wire::Answer(s @ (400 | 404 | 405 | 409 | 413 | 415 | 429), body) => {
            Outcome::Refused(s, message(&body))
        }
        // 5xx: e.g. a delete whose files could not be removed answers 500 after the row
        // is gone; a timed-out command may still complete.
        Wire::Answer(s, body) => Outcome::Unknown(format!("{s} {}", message(&body))),
    }
}

/// Where the kill lands.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kill {
    /// At the drawn instant, whatever is happening.
    Instant,
    /// While a request is on the wire: after the drawn instant, 0–4 ms into the next one.
    InFlight,
    /// The moment the client has read a 2xx (the first after the drawn instant): the
    /// README promises that "a kill -9 right after a 2xx loses nothing that 2xx confirmed".
    /// The client thread sends the SIGKILL itself, to be quick.
    AfterConfirm,
}

/// Between the main thread and the client thread.
#[derive(Default)]
struct Ctl {
    /// Stop sending (the server is being killed).
    stop: AtomicBool,
    /// A request is on the wire.
    busy: AtomicBool,
}

/// The client thread: sequential random requests until told to stop. With
/// `kill_on_confirm` (after this long, this pid), it kills the server itself on the first
/// 2xx it reads after that instant, and returns when (since `t0`) it did.
fn burst(
    addr: SocketAddr,
    mut rng: Rng,
    mut known: Vec<Vec<String>>,
    ctl: Arc<Ctl>,
    t0: Instant,
    kill_on_confirm: Option<(Duration, u32)>,
) -> (Vec<Rec>, Option<Duration>) {
    let mut out = Vec::new();
    let (stop, busy) = (&ctl.stop, &ctl.busy);
    while !stop.load(Ordering::SeqCst) {
        let id = rng.index(IDS);
        let op = match rng.below(100) {
            0..=19 => Op::Create,
            20..=33 => Op::Start,
            34..=47 => Op::Stop,
            48..=55 => Op::Delete,
            56..=61 => Op::Logout,
            62..=81 => Op::Backup,
            _ if !known[id].is_empty() && rng.below(2) == 0 => {
                Op::Restore(Some(known[id][rng.index(known[id].len())].clone()))
            }
            _ => Op::Restore(None),
        };
        let (method, path, body) = op.request(id);
        let at = t0.elapsed();
        busy.store(true, Ordering::SeqCst);
        let wire = http(addr, method, &path, body.as_deref());
        busy.store(false, Ordering::SeqCst);
        let outcome = classify(&op, wire);
        let mut killed = None;
        if let (Some((after, pid)), Outcome::Confirmed(..)) = (kill_on_confirm, &outcome) {
            if t0.elapsed() >= after {
                // SAFETY: kill(2) on the server's pid; the main thread has not reaped it
                // (it waits for this thread first), so the pid is still the server's.
                unsafe {
                    libc::kill(pid as i32, libc::SIGKILL);
                }
                killed = Some(t0.elapsed());
            }
        }
        match (&op, &outcome) {
            (Op::Backup, Outcome::Confirmed(_, Some(b))) => known[id].push(b.clone()),
            (Op::Delete | Op::Logout, Outcome::Confirmed(..)) => known[id].clear(),
            _ => {}
        }
        let sent = !matches!(outcome, Outcome::NotSent);
        out.push(Rec {
            id,
            op,
            at_ms: at.as_millis(),
            took_ms: t0.elapsed().saturating_sub(at).as_millis(),
            outcome,
        });
        if killed.is_some() {
            return (out, killed);
        }
        if !sent {
            break;
        }
        // Half the requests follow at once, the others after up to 40 ms, so they meet
        // sessions in every phase (the sim pairs 300 ms after its code).
        if rng.below(2) == 0 {
            std::thread::sleep(Duration::from_millis(rng.below(40)));
        }
    }
    (out, None)
}

// ---------------------------------------------------------------------------------------
// The model: what each session may be, given what the server confirmed.

/// What the test can know about a session from outside: whether it exists, its desired
/// state, and the backups that must be listed (those confirmed or seen listed; a backup
/// whose answer was lost may exist too and is simply not required).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum World {
    Absent,
    Present {
        running: bool,
        backups: BTreeSet<String>,
    },
}

impl fmt::Display for World {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            World::Absent => write!(f, "absent"),
            World::Present { running, backups } => write!(
                f,
                "present, desired {}, backups ⊇ {:?}",
                if *running { "running" } else { "stopped" },
                backups
            ),
        }
    }
}

/// The session after `op` succeeded on it, or `None` if `op` cannot succeed there (a
/// create of an existing session answers 409, anything else on a missing one 404).
fn after(op: &Op, w: &World, backup: Option<&str>) -> Option<World> {
    match (op, w) {
        (Op::Create, World::Absent) => Some(World::Present {
            running: true,
            backups: BTreeSet::new(),
        }),
        (Op::Create, World::Present { .. }) | (_, World::Absent) => None,
        (Op::Start | Op::Stop, World::Present { backups, .. }) => Some(World::Present {
            running: matches!(op, Op::Start),
            backups: backups.clone(),
        }),
        // Delete and logout remove the credentials and every backup.
        (Op::Delete | Op::Logout, World::Present { .. }) => Some(World::Absent),
        (Op::Backup, World::Present { running, backups }) => {
            let mut backups = backups.clone();
            backups.extend(backup.map(str::to_string));
            Some(World::Present {
                running: *running,
                backups,
            })
        }
        // A restore swaps credentials, phone and name; it keeps the desired state and the
        // backups.
        (Op::Restore(_), w) => Some(w.clone()),
    }
}

/// Per session id, the set of worlds it may be in. After every round's checks the model
/// is reset to what the restarted server shows (once that was found consistent), so the
/// set only grows within a round: by the one request in flight at the kill.
struct Model {
    worlds: Vec<BTreeSet<World>>,
    /// Why a session cannot be checked against the model this round, if it cannot.
    loose: Vec<Option<String>>,
}

impl Model {
    fn new() -> Model {
        Model {
            worlds: vec![BTreeSet::from([World::Absent]); IDS],
            loose: vec![None; IDS],
        }
    }

    /// Applies a burst's requests, in the order they were made (one at a time). Returns
    /// contradictions: 2xx answers that no possible state allowed.
    fn apply(&mut self, recs: &[Rec]) -> Vec<Finding> {
        let mut findings = Vec::new();
        for (i, r) in recs.iter().enumerate() {
            let ws = &mut self.worlds[r.id];
            match &r.outcome {
                Outcome::Confirmed(_, backup) => {
                    let next: BTreeSet<World> = ws
                        .iter()
                        .filter_map(|w| after(&r.op, w, backup.as_deref()))
                        .collect();
                    if next.is_empty() {
                        findings.push(Finding::on(
                            r.id,
                            format!(
                                "the server confirmed `{}` (+{}ms), which none of the states \
                                 c{} could be in allows: {}",
                                r.op,
                                r.at_ms,
                                r.id,
                                list(ws)
                            ),
                        ));
                        self.loose[r.id] = Some("a contradiction earlier this round".into());
                    } else {
                        *ws = next;
                    }
                }
                Outcome::Unknown(cause) => {
                    // It happened or it did not. Only a request whose answer is lost at
                    // the kill is the last on its id; a 5xx answered earlier could still
                    // complete after later requests (a timed-out stop), which this model
                    // does not order, so such a session is not checked this round.
                    let later = recs[i + 1..]
                        .iter()
                        .any(|x| x.id == r.id && !matches!(x.outcome, Outcome::NotSent));
                    if later && self.loose[r.id].is_none() {
                        self.loose[r.id] =
                            Some(format!("`{}` answered {cause} before later requests", r.op));
                    }
                    let maybe: Vec<World> =
                        ws.iter().filter_map(|w| after(&r.op, w, None)).collect();
                    ws.extend(maybe);
                }
                Outcome::Refused(..) | Outcome::NotSent => {}
            }
        }
        findings
    }

    /// Backup ids known to exist, per session (for restore requests).
    fn known_backups(&self) -> Vec<Vec<String>> {
        self.worlds
            .iter()
            .map(|ws| match ws.iter().next() {
                Some(World::Present { backups, .. }) if ws.len() == 1 => {
                    backups.iter().cloned().collect()
                }
                _ => Vec::new(),
            })
            .collect()
    }
}

fn list(ws: &BTreeSet<World>) -> String {
    ws.iter()
        .map(|w| format!("[{w}]"))
        .collect::<Vec<_>>()
        .join(" or ")
}

/// The observed world may be one of the model's: same existence and desired state, and
/// every backup that must be listed is.
fn compatible(expected: &World, seen: &World) -> bool {
    match (expected, seen) {
        (World::Absent, World::Absent) => true,
        (
            World::Present { running, backups },
            World::Present {
                running: r,
                backups: b,
            },
        ) => running == r && backups.is_subset(b),
        _ => false,
    }
}

// ---------------------------------------------------------------------------------------
// Findings.

struct Finding {
    /// The session it is about, if one.
    id: Option<usize>,
    what: String,
    /// An earlier round whose requests explain it (where a stray file appeared).
    since: Option<usize>,
}

impl Finding {
    fn on(id: usize, what: String) -> Finding {
        Finding {
            id: Some(id),
            what,
            since: None,
        }
    }
    fn global(what: String) -> Finding {
        Finding {
            id: None,
            what,
            since: None,
        }
    }
}

/// What the orphan check remembers across rounds.
#[derive(Default)]
struct FileMemory {
    /// Stray files (and empty dirs) by the round they were first seen in.
    seen: BTreeMap<String, usize>,
    /// Orphans already reported (one stays until its session is created again).
    reported: BTreeSet<String>,
}

/// Which session a file name under `sessions/` or `backups/` belongs to.
fn owner(name: &str) -> Option<usize> {
    let rest = name.strip_prefix('c')?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok().filter(|&n| n < IDS)
}

// ---------------------------------------------------------------------------------------
// Files.

fn integrity_read_only(path: &Path) -> rusqlite::Result<String> {
    let c = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    c.busy_timeout(Duration::from_secs(5))?;
    let mut stmt = c.prepare("PRAGMA integrity_check")?;
    let rows = stmt
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<String>>>()?;
    Ok(rows.join("; "))
}

/// The check as the next writer would see the file: a copy with its journal or WAL,
/// opened read-write (so a hot journal left by the kill is rolled back, which a read-only
/// connection refuses to do: SQLITE_READONLY_ROLLBACK). Only for files nobody writes.
fn integrity_of_copy(path: &Path) -> Result<String, String> {
    let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
    let copy = tmp.path().join("copy.db");
    std::fs::copy(path, &copy).map_err(|e| e.to_string())?;
    for suffix in ["-journal", "-wal"] {
        let mut from = path.as_os_str().to_owned();
        from.push(suffix);
        let from = PathBuf::from(from);
        if from.exists() {
            std::fs::copy(&from, tmp.path().join(format!("copy.db{suffix}")))
                .map_err(|e| e.to_string())?;
        }
    }
    let c = Connection::open(&copy).map_err(|e| e.to_string())?;
    let mut stmt = c
        .prepare("PRAGMA integrity_check")
        .map_err(|e| e.to_string())?;
    let rows = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<String>>>())
        .map_err(|e| e.to_string())?;
    Ok(rows.join("; "))
}

/// `PRAGMA integrity_check` on one file, opened read-only. `quiet`: no process writes the
/// file, so a copy may be checked when the read-only open is refused.
fn integrity(path: &Path, quiet: bool) -> Result<(), String> {
    let first = match integrity_read_only(path) {
        Ok(v) if v == "ok" => return Ok(()),
        Ok(v) => return Err(format!("integrity_check: {v}")),
        Err(e) => e.to_string(),
    };
    if !quiet {
        return Err(format!("cannot check (read-only open): {first}"));
    }
    match integrity_of_copy(path) {
        Ok(v) if v == "ok" => Ok(()),
        Ok(v) => Err(format!("integrity_check (of a copy): {v}")),
        Err(e) => Err(format!("cannot check: {first}; a copy: {e}")),
    }
}

/// Every SQLite file of the data dir: the database, credential files, backups.
fn sqlite_files(dir: &Path) -> Vec<PathBuf> {
    // (Under BOTVISOR_TEST_ENGINE=postgres the rows are not in a file.)
    let mut files = Vec::new();
    if !common::test_engine_is_postgres() {
        files.push(dir.join("botvisor.db"));
    }
    for e in read_dir(&dir.join("sessions")) {
        if e.extension().is_some_and(|x| x == "db") {
            files.push(e);
        }
    }
    for sub in read_dir(&dir.join("backups")) {
        for e in read_dir(&sub) {
            let name = e
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string();
            if name.ends_with(".db") && !name.starts_with('.') {
                files.push(e);
            }
        }
    }
    files
}

fn read_dir(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    v.sort();
    v
}

fn rel(dir: &Path, p: &Path) -> String {
    p.strip_prefix(dir).unwrap_or(p).display().to_string()
}

/// `server_up`: a server runs on `dir`. It writes `botvisor.db` all the time, so that one
/// is only checked read-only then; once sessions settled, nothing writes credential files
/// (the sim writes one when it pairs) or backups (complete once renamed into place).
fn check_integrity(dir: &Path, server_up: bool, when: &str) -> Vec<Finding> {
    let db = dir.join("botvisor.db");
    sqlite_files(dir)
        .into_iter()
        .filter_map(|f| {
            integrity(&f, !server_up || f != db).err().map(|e| {
                let name = f.file_name().unwrap_or_default().to_string_lossy();
                let what = format!("{when}: {} is not sound: {e}", rel(dir, &f));
                match owner(&name).or_else(|| {
                    f.parent()
                        .and_then(|p| p.file_name())
                        .and_then(|n| owner(&n.to_string_lossy()))
                }) {
                    Some(id) if f != db => Finding::on(id, what),
                    _ => Finding::global(what),
                }
            })
        })
        .collect()
}

/// A sim credential file says it was paired.
fn paired(path: &Path) -> Result<bool, String> {
    let c = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| e.to_string())?;
    c.busy_timeout(Duration::from_secs(5))
        .map_err(|e| e.to_string())?;
    c.query_row(
        "SELECT count(*) FROM sim_credentials WHERE key = 'paired'",
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n > 0)
    .map_err(|e| e.to_string())
}

/// A backup's own record says it is a sim backup of `user`, in format 1 (what the server
/// checks before a restore).
fn backup_meta_ok(path: &Path, user: &str) -> Result<(), String> {
    let c = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| e.to_string())?;
    let get = |k: &str| -> Result<Option<String>, String> {
        c.query_row(
            "SELECT value FROM botvisor_backup WHERE key = ?1",
            [k],
            |r| r.get(0),
        )
        .map_err(|e| format!("{k}: {e}"))
    };
    let found = (get("format")?, get("user_id")?, get("link")?);
    let want = (Some("1".into()), Some(user.to_string()), Some("sim".into()));
    if found == want {
        Ok(())
    } else {
        Err(format!("metadata {found:?}, expected {want:?}"))
    }
}

// ---------------------------------------------------------------------------------------
// Checks against a running server.

fn api(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, Value), String> {
    match http(addr, method, path, body) {
        Wire::Answer(s, b) => Ok((s, serde_json::from_str(&b).unwrap_or(Value::Null))),
        Wire::NotConnected => Err(format!("{method} {path}: the server does not answer")),
        Wire::Broken(e) => Err(format!("{method} {path}: {e}")),
    }
}

/// The API's session list, by user id.
fn sessions(addr: SocketAddr) -> Result<BTreeMap<String, Value>, String> {
    let (status, v) = api(addr, "GET", "/api/sessions", None)?;
    if status != 200 {
        return Err(format!("GET /api/sessions answered {status}: {v}"));
    }
    let all = v["sessions"]
        .as_array()
        .ok_or_else(|| format!("GET /api/sessions: no sessions[]: {v}"))?;
    Ok(all
        .iter()
        .filter_map(|s| Some((s["userId"].as_str()?.to_string(), s.clone())))
        .collect())
}

fn backups(addr: SocketAddr, user: &str) -> Result<BTreeSet<String>, String> {
    let (status, v) = api(addr, "GET", &format!("/api/sessions/{user}/backups"), None)?;
    if status != 200 {
        return Err(format!("GET backups of {user} answered {status}: {v}"));
    }
    Ok(v["backups"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|b| b.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default())
}

fn settled(s: &Value) -> bool {
    let state = s["state"].as_str().unwrap_or("");
    let has_error = s["lastError"].as_str().is_some_and(|e| !e.is_empty());
    match s["desired"].as_str() {
        Some("running") => {
            state == "online" || (matches!(state, "failed" | "logged_out") && has_error)
        }
        _ => matches!(state, "stopped" | "failed" | "logged_out"),
    }
}

fn brief(s: &Value) -> String {
    format!(
        "{} desired={} state={} lastError={}",
        s["userId"], s["desired"], s["state"], s["lastError"]
    )
}

/// Everything checked once the server is back. Returns the sessions as found (to reset
/// the model to) and the findings.
struct Checked {
    found: Vec<World>,
    findings: Vec<Finding>,
    /// Worth knowing, not failures: about a session (if one) and what.
    notes: Vec<(Option<usize>, String)>,
    restores: usize,
}

fn check_restarted(
    s: &Server,
    model: &Model,
    recs: &[Rec],
    rng: &mut Rng,
    memory: &mut FileMemory,
    round: usize,
) -> Checked {
    let addr = s.addr;
    let dir = &s.data_dir;
    let mut findings = Vec::new();
    let mut notes = Vec::new();
    let fail = |findings: &mut Vec<Finding>, e: String| findings.push(Finding::global(e));

    // 1. The durable state, right after the restart: existence, desired, backups.
    let listed = match sessions(addr) {
        Ok(l) => l,
        Err(e) => {
            fail(&mut findings, format!("after the restart: {e}"));
            return Checked {
                found: model
                    .worlds
                    .iter()
                    .map(|w| w.iter().next().cloned().unwrap_or(World::Absent))
                    .collect(),
                findings,
                notes,
                restores: 0,
            };
        }
    };
    let mut found = Vec::new();
    for id in 0..IDS {
        let u = uid(id);
        let seen = match listed.get(&u) {
            None => World::Absent,
            Some(v) => World::Present {
                running: v["desired"] == "running",
                backups: backups(addr, &u).unwrap_or_else(|e| {
                    findings.push(Finding::on(id, e));
                    BTreeSet::new()
                }),
            },
        };
        match &model.loose[id] {
            Some(why) => notes.push((
                Some(id),
                format!("c{id} not checked against the model: {why}"),
            )),
            None if !model.worlds[id].iter().any(|w| compatible(w, &seen)) => {
                findings.push(Finding::on(
                    id,
                    format!(
                        "after the restart c{id} is [{seen}], but what was confirmed allows only {}",
                        list(&model.worlds[id])
                    ),
                ));
            }
            None => {}
        }
        if let World::Present { backups, .. } = &seen {
            for b in backups {
                let p = dir.join("backups").join(&u).join(format!("{b}.db"));
                if let Err(e) = backup_meta_ok(&p, &u) {
                    findings.push(Finding::on(
                        id,
                        format!("backup {b} of {u} is not restorable: {e}"),
                    ));
                }
            }
        }
        found.push(seen);
    }

    // 2. Confirmed backups of this round restore (each restore restarts the session).
    let mut candidates: Vec<(usize, String)> = recs
        .iter()
        .filter_map(|r| match (&r.op, &r.outcome) {
            (Op::Backup, Outcome::Confirmed(_, Some(b))) => match &found[r.id] {
                World::Present { backups, .. } if backups.contains(b) => Some((r.id, b.clone())),
                _ => None,
            },
            _ => None,
        })
        .collect();
    let mut restores = 0;
    while restores < RESTORES_PER_ROUND && !candidates.is_empty() {
        let (id, b) = candidates.swap_remove(rng.index(candidates.len()));
        let path = format!("/api/sessions/{}/restore", uid(id));
        match api(
            addr,
            "POST",
            &path,
            Some(&format!(r#"{{"backupId":"{b}"}}"#)),
        ) {
            Ok((200, v)) if v["backupId"] == b.as_str() => {}
            Ok((status, v)) => findings.push(Finding::on(
                id,
                format!("the confirmed backup {b} of c{id} does not restore: {status} {v}"),
            )),
            Err(e) => findings.push(Finding::on(id, format!("restore of {b}: {e}"))),
        }
        restores += 1;
    }

    // 3. Convergence.
    let deadline = Instant::now() + CONVERGE;
    let listed = loop {
        match sessions(addr) {
            Ok(l) if l.values().all(settled) => break Some(l),
            Ok(l) if Instant::now() > deadline => {
                for (u, v) in l.iter().filter(|(_, v)| !settled(v)) {
                    let what = format!(
                        "not settled {}s after the restart: {}",
                        CONVERGE.as_secs(),
                        brief(v)
                    );
                    match owner(u) {
                        Some(id) => findings.push(Finding::on(id, what)),
                        None => fail(&mut findings, what),
                    }
                }
                break Some(l);
            }
            Ok(_) => std::thread::sleep(Duration::from_millis(30)),
            Err(e) => {
                fail(
                    &mut findings,
                    format!("while waiting for the sessions to settle: {e}"),
                );
                break None;
            }
        }
    };
    let Some(listed) = listed else {
        return Checked {
            found,
            findings,
            notes,
            restores,
        };
    };
    for v in listed.values() {
        if matches!(v["state"].as_str(), Some("failed" | "logged_out")) {
            let u = v["userId"].as_str().unwrap_or("");
            notes.push((owner(u), format!("settled as {}", brief(v))));
        }
    }

    // 4. Credential files: an online session has one, marked paired.
    for (u, v) in &listed {
        if v["state"] != "online" {
            continue;
        }
        let id = owner(u).unwrap_or(0);
        let cred = dir.join("sessions").join(format!("{u}.db"));
        match paired(&cred) {
            Ok(true) => {}
            Ok(false) => findings.push(Finding::on(
                id,
                format!("{u} is online but {} is not marked paired", rel(dir, &cred)),
            )),
            Err(e) => findings.push(Finding::on(
                id,
                format!(
                    "{u} is online but its credential file {}: {e}",
                    rel(dir, &cred)
                ),
            )),
        }
    }

    // 5. Orphans: files of sessions the API does not list. Temp files of a listed session
    //    (an interrupted restore or backup) are noted, not failed: they are garbage, but
    //    nothing reads them; once their session is deleted they are orphans, and fail.
    let mut o = Orphans {
        dir,
        listed: &listed,
        memory,
        round,
        findings: &mut findings,
        notes: &mut notes,
    };
    for p in read_dir(&dir.join("sessions")) {
        let name = file_name(&p);
        let (base, temp) = match ["", "-wal", "-shm", "-journal"]
            .iter()
            .find_map(|s| name.strip_suffix(&format!(".db{s}")))
        {
            Some(base) => (base.to_string(), false),
            None => (name.split('.').next().unwrap_or("").to_string(), true),
        };
        o.file(&p, &base, temp);
    }
    for sub in read_dir(&dir.join("backups")) {
        let owned_by = file_name(&sub);
        let files = read_dir(&sub);
        if files.is_empty() {
            o.empty_dir(&sub, &owned_by);
        }
        for f in files {
            let name = file_name(&f);
            o.file(
                &f,
                &owned_by,
                name.starts_with('.') || !name.ends_with(".db"),
            );
        }
    }

    // 6. Every file is sound while the server runs (read-only, beside it).
    findings.extend(check_integrity(dir, true, "once settled"));
    Checked {
        found,
        findings,
        notes,
        restores,
    }
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .to_string()
}

/// The orphan check's context.
struct Orphans<'a> {
    dir: &'a Path,
    listed: &'a BTreeMap<String, Value>,
    memory: &'a mut FileMemory,
    round: usize,
    findings: &'a mut Vec<Finding>,
    notes: &'a mut Vec<(Option<usize>, String)>,
}

impl Orphans<'_> {
    /// A file that belongs to session `owned_by`; `temp`: a temp file of a restore or backup.
    fn file(&mut self, path: &Path, owned_by: &str, temp: bool) {
        let name = rel(self.dir, path);
        let id = owner(owned_by);
        if !self.listed.contains_key(owned_by) {
            if !self.memory.reported.insert(name.clone()) {
                return;
            }
            let since = self.memory.seen.get(&name).copied();
            let first = since
                .map(|r| format!(" (there since round {r})"))
                .unwrap_or_default();
            let what =
                format!("orphan file {name}{first}: no session {owned_by} in the API's list");
            self.findings.push(Finding { id, what, since });
        } else if temp && !self.memory.seen.contains_key(&name) {
            self.memory.seen.insert(name.clone(), self.round);
            self.notes.push((id, format!("stray temp file {name}")));
        }
    }

    /// An empty backup directory: not a file, so noted rather than failed.
    fn empty_dir(&mut self, path: &Path, owned_by: &str) {
        let name = rel(self.dir, path);
        if !self.listed.contains_key(owned_by) && !self.memory.seen.contains_key(&name) {
            self.memory.seen.insert(name.clone(), self.round);
            self.notes.push((
                owner(owned_by),
                format!("empty backup directory {name} of a session that does not exist"),
            ));
        }
    }
}

/// The warnings and errors the server logged since `offset` (this round's servers).
fn log_lines(log: &Path, offset: u64, max: usize) -> Vec<String> {
    let text = std::fs::read(log).unwrap_or_default();
    let text = String::from_utf8_lossy(text.get(offset as usize..).unwrap_or_default());
    let lines: Vec<String> = text
        .lines()
        .filter(|l| l.starts_with("====") || l.contains("WARN") || l.contains("ERROR"))
        // Said at every start of a test build without a key.
        .filter(|l| !l.contains("no API key is set") && !l.contains("TEST BUILD"))
        .map(str::to_string)
        .collect();
    let skip = lines.len().saturating_sub(max);
    lines.into_iter().skip(skip).collect()
}

// ---------------------------------------------------------------------------------------

#[test]
fn kill_9_at_awkward_moments_loses_nothing_confirmed_and_leaves_no_orphans() {
    let seed = env_u64("BOTVISOR_CHAOS_SEED").unwrap_or(DEFAULT_SEED);
    let rounds = env_u64("BOTVISOR_CHAOS_ROUNDS").map_or(DEFAULT_ROUNDS, |r| r as usize);
    say(&format!(
        "chaos: seed {seed:#x} ({seed}), {rounds} rounds (BOTVISOR_CHAOS_SEED / BOTVISOR_CHAOS_ROUNDS)"
    ));
    let tmp = tempfile::Builder::new()
        .prefix("botvisor-chaos-")
        .tempdir()
        .unwrap();
    let dir = tmp.path().to_path_buf();
    let log = dir.join(common::SERVER_LOG);
    let began = Instant::now();
    let mut rng = Rng::new(seed);
    let mut model = Model::new();
    let mut history: Vec<Vec<Rec>> = Vec::new();
    let mut memory = FileMemory::default();
    let mut reports: Vec<String> = Vec::new();
    let mut all_notes: Vec<String> = Vec::new();
    let (mut total_ops, mut total_confirmed, mut total_in_flight, mut total_restores) =
        (0, 0, 0, 0);

    for round in 0..rounds {
        let round_began = Instant::now();
        let log_offset = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        let kill_at = Duration::from_millis(rng.below(KILL_WINDOW_MS + 1));
        let client_rng = Rng::new(rng.next());
        let mut findings = Vec::new();

        // The burst and the kill.
        let mut server =
            match std::panic::catch_unwind(AssertUnwindSafe(|| Server::start_in(&dir, FLAGS))) {
                Ok(s) => s,
                Err(_) => {
                    reports.push(format!(
                    "round {round}: the server did not start on the data dir (see the log above)"
                ));
                    break;
                }
            };
        let mode = match rng.below(4) {
            0 => Kill::Instant,
            1 => Kill::AfterConfirm,
            _ => Kill::InFlight,
        };
        let in_flight_delay = Duration::from_micros(rng.below(4000));
        let ctl = Arc::new(Ctl::default());
        let t0 = Instant::now();
        let client = {
            let (addr, known, ctl) = (server.addr, model.known_backups(), ctl.clone());
            let on_confirm = (mode == Kill::AfterConfirm).then_some((kill_at, server.child.id()));
            std::thread::spawn(move || burst(addr, client_rng, known, ctl, t0, on_confirm))
        };
        std::thread::sleep(kill_at.saturating_sub(t0.elapsed()));
        match mode {
            Kill::Instant => {}
            Kill::InFlight => {
                let deadline = Instant::now() + Duration::from_millis(300);
                while !ctl.busy.load(Ordering::SeqCst) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_micros(100));
                }
                std::thread::sleep(in_flight_delay);
            }
            Kill::AfterConfirm => {
                // The client kills; this is the fallback if no 2xx comes.
                let deadline = Instant::now() + Duration::from_secs(1);
                while !client.is_finished() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        let main_kill = t0.elapsed();
        ctl.stop.store(true, Ordering::SeqCst);
        server.kill9();
        let (recs, client_kill) = client.join().expect("the client thread panicked");
        let kill_at = client_kill.unwrap_or(main_kill);
        drop(server);

        // The files as the kill left them.
        findings.extend(check_integrity(&dir, false, "right after the kill"));
        findings.extend(model.apply(&recs));

        // Back up, and check.
        let checked =
            match std::panic::catch_unwind(AssertUnwindSafe(|| Server::start_in(&dir, FLAGS))) {
                Ok(mut s) => {
                    let c = check_restarted(&s, &model, &recs, &mut rng, &mut memory, round);
                    // The next round starts from a kill at a quiet moment.
                    s.kill9();
                    Some(c)
                }
                Err(_) => {
                    findings.push(Finding::global(
                        "the server did not start again after the kill".into(),
                    ));
                    None
                }
            };

        let confirmed = recs
            .iter()
            .filter(|r| matches!(r.outcome, Outcome::Confirmed(..)))
            .count();
        let in_flight: Vec<&Rec> = recs.iter().filter(|r| r.outcome.in_flight()).collect();
        let sent = recs
            .iter()
            .filter(|r| !matches!(r.outcome, Outcome::NotSent))
            .count();
        total_ops += sent;
        total_confirmed += confirmed;
        total_in_flight += in_flight.len();
        let kill_desc = match (mode, client_kill, recs.last()) {
            (Kill::AfterConfirm, Some(_), Some(r)) => {
                format!("right after the 2xx of c{} {}", r.id, r.op)
            }
            (Kill::InFlight, ..) => "aimed at a request".into(),
            _ => "at a random instant".into(),
        };
        let mut summary = format!(
            "round {round:>3}/{rounds}: {sent:>3} ops, {confirmed:>3} confirmed, {} in flight at the kill{} (kill at {}ms, {kill_desc})",
            in_flight.len(),
            in_flight.first().map(|r| format!(" [c{} {}]", r.id, r.op)).unwrap_or_default(),
            kill_at.as_millis(),
        );
        if let Some(c) = checked {
            findings.extend(c.findings);
            total_restores += c.restores;
            let present = c
                .found
                .iter()
                .filter(|w| matches!(w, World::Present { .. }))
                .count();
            let running = c
                .found
                .iter()
                .filter(|w| matches!(w, World::Present { running: true, .. }))
                .count();
            summary.push_str(&format!(
                "; {present} sessions, {running} running, {} restores checked",
                c.restores
            ));
            let mut by_id: BTreeMap<Option<usize>, Vec<String>> = BTreeMap::new();
            for (id, n) in c.notes {
                by_id.entry(id).or_default().push(n);
            }
            for (id, ns) in by_id {
                let mut n = format!("round {round}: {}", ns.join("; "));
                for rec in recs.iter().filter(|r| Some(r.id) == id) {
                    n.push_str(&format!("\n      {rec}"));
                }
                all_notes.push(n);
            }
            model.worlds = c.found.into_iter().map(|w| BTreeSet::from([w])).collect();
        }
        model.loose = vec![None; IDS];
        summary.push_str(&format!(
            "; {:.1}s{}",
            round_began.elapsed().as_secs_f64(),
            if findings.is_empty() {
                String::new()
            } else {
                format!(" — {} FAILURES", findings.len())
            }
        ));
        say(&summary);
        if common::env_flag("BOTVISOR_CHAOS_VERBOSE") {
            for rec in &recs {
                say(&format!("    {rec}"));
            }
        }

        if !findings.is_empty() {
            let mut r = format!(
                "round {round} (seed {seed:#x}, kill at {}ms, {kill_desc}):\n",
                kill_at.as_millis()
            );
            // The requests on each session concerned: this round, the one before, and
            // the round a stray file appeared in.
            let mut ops_of: BTreeMap<usize, BTreeSet<usize>> = BTreeMap::new();
            for f in &findings {
                r.push_str(&format!("  FAIL {}\n", f.what));
                if let Some(id) = f.id {
                    let rounds = ops_of.entry(id).or_default();
                    rounds.extend(f.since);
                    rounds.extend(round.checked_sub(1));
                    rounds.insert(round);
                }
            }
            for (id, rounds) in &ops_of {
                for &n in rounds {
                    let of_round = if n == round {
                        Some(&recs)
                    } else {
                        history.get(n)
                    };
                    r.push_str(&format!("  ops on c{id} in round {n}:\n"));
                    for rec in of_round.into_iter().flatten().filter(|x| x.id == *id) {
                        r.push_str(&format!("    {rec}\n"));
                    }
                }
            }
            let ids: Vec<&usize> = ops_of.keys().collect();
            if ids.is_empty() {
                r.push_str(&format!("  all ops of round {round}:\n"));
                for rec in &recs {
                    r.push_str(&format!("    {rec}\n"));
                }
            }
            r.push_str("  server.log, this round (warnings and errors):\n");
            for l in log_lines(&log, log_offset, 25) {
                r.push_str(&format!("    {l}\n"));
            }
            say(&r);
            reports.push(r);
        }
        history.push(recs);
        if reports.len() >= 10 {
            say("chaos: stopping after 10 failing rounds");
            break;
        }
    }

    // A last graceful stop, and the files once more. The SIGTERM goes out as soon as the
    // server has printed its "listening" line, which the README offers as the moment the
    // server is up; a SIGTERM then must still drain and exit 0.
    if let Ok(mut s) = std::panic::catch_unwind(AssertUnwindSafe(|| Server::start_in(&dir, FLAGS)))
    {
        let code = s.terminate();
        if code != Some(0) {
            let how = match code {
                None => "was killed by the signal (no graceful shutdown)".to_string(),
                Some(c) => format!("exited with {c}"),
            };
            reports.push(format!(
                "a SIGTERM sent right after the \"listening\" line: the server {how}, not exit 0"
            ));
        }
    }
    for f in check_integrity(&dir, false, "after the final shutdown") {
        reports.push(f.what);
    }

    if !all_notes.is_empty() {
        say(
            "notes (not failures while their session exists): a kill during a backup leaves \
             backups/<id>/.<backupId>.tmp*, removed only with the session's backups; a kill \
             during a restore leaves sessions/<id>.db.restoring*, removed only by the next \
             restore of that session (a delete leaves it: an orphan, which fails)",
        );
    }
    for n in &all_notes {
        say(&format!("note: {n}"));
    }
    say(&format!(
        "chaos total: seed {seed:#x}, {} rounds, {total_ops} ops, {total_confirmed} confirmed, \
         {total_in_flight} in flight at a kill, {total_restores} restores checked, {} failing rounds, {:.1}s",
        history.len(),
        reports.len(),
        began.elapsed().as_secs_f64()
    ));
    if !reports.is_empty() {
        let kept = tmp.keep();
        panic!(
            "kill -9 chaos found {} problem(s); data dir kept at {} (server.log inside). \
             Reproduce with BOTVISOR_CHAOS_SEED={seed:#x}\n{}",
            reports.len(),
            kept.display(),
            reports.join("\n")
        );
    }
}

/// The model alone, on made-up bursts: strict about what was confirmed, lenient about the
/// one request whose answer the kill swallowed.
#[test]
fn the_model_keeps_what_is_certain_and_allows_what_was_in_flight() {
    let rec = |id, op, outcome| Rec {
        id,
        op,
        at_ms: 0,
        took_ms: 0,
        outcome,
    };
    let ok = || Outcome::Confirmed(200, None);
    let lost = || Outcome::Unknown("no answer (connection closed)".into());
    let present = |running: bool, backups: &[&str]| World::Present {
        running,
        backups: backups.iter().map(|b| b.to_string()).collect(),
    };
    let mut m = Model::new();
    let findings = m.apply(&[
        rec(0, Op::Create, Outcome::Confirmed(201, None)),
        rec(0, Op::Backup, Outcome::Confirmed(200, Some("b1".into()))),
        rec(0, Op::Stop, ok()),
        rec(1, Op::Create, Outcome::Confirmed(201, None)),
        rec(1, Op::Start, Outcome::Refused(409, "busy".into())),
        rec(1, Op::Delete, lost()),
        rec(2, Op::Start, Outcome::Refused(404, "not found".into())),
    ]);
    assert!(findings.is_empty());
    assert_eq!(m.worlds[0], BTreeSet::from([present(false, &["b1"])]));
    assert_eq!(
        m.worlds[1],
        BTreeSet::from([World::Absent, present(true, &[])])
    );
    assert_eq!(m.worlds[2], BTreeSet::from([World::Absent]));
    // What the restarted server may show.
    assert!(compatible(
        &present(false, &["b1"]),
        &present(false, &["b0", "b1"])
    ));
    assert!(!compatible(
        &present(false, &["b1"]),
        &present(false, &["b0"])
    ));
    assert!(!compatible(
        &present(false, &["b1"]),
        &present(true, &["b1"])
    ));
    assert!(!compatible(&present(false, &[]), &World::Absent));
    // A 2xx no state allows is reported, and the session is not checked further.
    let findings = m.apply(&[rec(0, Op::Create, Outcome::Confirmed(201, None))]);
    assert_eq!(
        findings.len(),
        1,
        "a create of an existing session cannot succeed"
    );
    assert!(m.loose[0].is_some());
    // A 5xx followed by more requests on the same session cannot be ordered.
    let mut m = Model::new();
    m.apply(&[
        rec(3, Op::Create, Outcome::Unknown("503 timed out".into())),
        rec(3, Op::Stop, Outcome::Refused(409, "busy".into())),
    ]);
    assert!(m.loose[3].is_some());
}
