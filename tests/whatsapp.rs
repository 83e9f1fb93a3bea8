//! The real `WhatsAppLink` (whatsapp-rust client, real credential store) against the
//! loopback WhatsApp peer, through the public HTTP API of the real binary.
//! Needs `--features test-peer` (the peer's certificate chain is fake).
#![cfg(feature = "test-peer")]

mod common;

use std::time::{Duration, Instant};

use botvisor_wa_peer::signal::Content;
use botvisor_wa_peer::{Command, PairReply, Peer};
use common::{seed_paired, seed_paired_in_database, Server};

/// The flags that point the real link at the peer.
fn peer_args(url: &str) -> [&str; 6] {
    [
        "--link",
        "whatsapp",
        "--wa-url",
        url,
        "--create-timeout",
        "20s",
    ]
}

/// Under `BOTVISOR_TEST_ENGINE=postgres` the servers keep the WhatsApp keys in
/// PostgreSQL too (`--keys database`), so these tests run on both key stores; the few
/// that are about key files say so and return.
fn keys_in_database() -> bool {
    common::test_engine_is_postgres()
}

/// True (after printing why) when the test is about SQLite files (`why`) and this run
/// keeps everything in PostgreSQL.
fn sqlite_only(test: &str, why: &str) -> bool {
    if keys_in_database() {
        eprintln!("SKIPPED {test} on PostgreSQL: {why}");
        return true;
    }
    false
}

fn start(peer: &Peer, extra: &[&str]) -> Server {
    let url = peer.url();
    let mut args = peer_args(&url).to_vec();
    if keys_in_database() {
        args.extend_from_slice(&["--keys", "database"]);
    }
    args.extend_from_slice(extra);
    Server::start(&args)
}

fn wait_until(secs: u64, what: &str, mut pred: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !pred() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The phone number of `reconnect_probe`'s session (no other test session uses it).
const PROBE_PHONE: &str = "15550009999";

/// Proof that no reconnect is still due, instead of a sleep. A reconnect of a client
/// whose connection ended at `ended` (or before) would reach the peer at most 1.1 s
/// later (whatsapp-rust's first backoff step is 1 s ± 10 %; a supervisor restart takes at
/// most 240 ms). The probe creates session `id` (it must be the only live connection, as
/// `Command::Close` closes them all), then closes its connection and waits until its
/// client has gone through that same backoff, reconnected and asked for a fresh code (one
/// more companion_hello for `PROBE_PHONE`), and repeats until it completes a round at
/// least 1.8 s after `ended` (one round usually does: each takes over 1 s, pairing-code
/// key derivation included). Returns the connections the probe opened itself.
fn reconnect_probe(peer: &Peer, s: &Server, id: &str, ended: Instant) -> usize {
    let hellos = || {
        peer.stats()
            .companion_hellos
            .iter()
            .filter(|p| *p == PROBE_PHONE)
            .count()
    };
    assert_eq!(s.create(id, PROBE_PHONE).status, 201, "probe {id}");
    let mut opened = 1;
    assert_eq!(hellos(), opened);
    loop {
        assert!(opened <= 5, "the probe never got 1.8 s past the end");
        peer.command(Command::Close);
        wait_until(30, "the probe's reconnect", || hellos() == opened + 1);
        opened += 1;
        if ended.elapsed() >= Duration::from_millis(1800) {
            return opened;
        }
    }
}

fn is_code(code: &str) -> bool {
    code.len() == 9
        && code.as_bytes()[4] == b'-'
        && code
            .chars()
            .filter(|c| *c != '-')
            .all(|c| c.is_ascii_alphanumeric())
}

/// Whether the client sent the peer a receipt for message `id` of one of `kinds`.
fn receipted(peer: &Peer, id: &str, kinds: &[&str]) -> bool {
    peer.stats()
        .receipts
        .iter()
        .any(|(r, kind)| r == id && kinds.contains(&kind.as_str()))
}

/// Whether the client acknowledged message `id` to the peer (`inactive`: delivered to a
/// device that is not in the foreground, as in an offline batch).
fn acknowledged(peer: &Peer, id: &str) -> bool {
    receipted(peer, id, &["delivery", "inactive"])
}

fn code_of(s: &Server, id: &str) -> Option<String> {
    let r = s.get(&format!("/api/sessions/{id}/pairing"));
    (r.status == 200).then(|| r.json()["pairingCode"].as_str().unwrap().to_string())
}

#[test]
fn running_out_of_file_descriptors_refuses_new_sessions_with_a_clear_503() {
    if sqlite_only(
        "running_out_of_file_descriptors_refuses_new_sessions_with_a_clear_503",
        "it counts the key files' descriptors (keys in PostgreSQL hold none)",
    ) {
        return;
    }
    // Each WhatsApp session holds its store (3 descriptors) and a socket: under a hard
    // limit of 64 open files a create is refused cleanly before the process runs out.
    let peer = Peer::start();
    let tmp = tempfile::tempdir().unwrap();
    let wrapper = common::limited_binary(tmp.path(), 64);
    let url = peer.url();
    let s = Server::start_with_binary(&wrapper, &peer_args(&url));
    let mut created = 0;
    let refusal = loop {
        let r = s.create(&format!("fd{created}"), "15551234567");
        if r.status != 201 {
            break r;
        }
        created += 1;
        assert!(created < 30, "never refused with a 64-descriptor limit");
    };
    assert!(created >= 1, "the first session must fit");
    assert!(
        refusal.error(503).contains("Too many open files"),
        "{}",
        refusal.body
    );
    // Nothing half-created; the sessions that fit keep waiting to be paired.
    assert_eq!(s.get("/api/stats").json()["totalUsers"], created);
    assert!(!s.data_dir.join(format!("sessions/fd{created}.db")).exists());
    assert_eq!(s.session("fd0")["state"], "pairing");
}

#[test]
fn create_returns_a_real_pair_code_from_the_real_client() {
    let peer = Peer::start();
    let s = start(&peer, &[]);
    let r = s.create("wa_1", "15551234567");
    assert_eq!(r.status, 201, "{}", r.body);
    let v = r.json();
    assert_eq!(
        v["message"],
        "Session created. Use the pairing code to connect."
    );
    let code = v["pairingCode"].as_str().unwrap().to_string();
    assert!(is_code(&code), "{code}");
    assert_eq!(v["state"], "pairing");
    assert_eq!(v["name"], serde_json::Value::Null);
    // The client asked WhatsApp (the peer) for a code for this phone number.
    assert_eq!(
        peer.stats().companion_hellos,
        vec!["15551234567".to_string()]
    );
    assert_eq!(peer.stats().handshakes, 1);
    // GET .../pairing shows it, expiring ~180 s from now.
    let p = s.get("/api/sessions/wa_1/pairing").json();
    assert_eq!(p["pairingCode"], code.as_str());
    assert!(p["expiresAt"].as_str().unwrap().ends_with('Z'));
    if keys_in_database() {
        assert!(
            has_keys(&s, "wa_1"),
            "the device's keys are rows in PostgreSQL"
        );
        return;
    }
    // The credential store is a real SQLite file, private, in WAL mode.
    let db = s.data_dir.join("sessions/wa_1.db");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&db).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(s.data_dir.join("sessions/wa_1.db-wal").exists());
    let conn = rusqlite::Connection::open(&db).unwrap();
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    let tables: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type='table'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(
        tables > 5,
        "whatsapp-rust's schema should be there ({tables} tables)"
    );
}

#[test]
fn the_qr_code_is_the_real_clients_from_whatsapps_first_ref() {
    let peer = Peer::start();
    let s = start(&peer, &[]);
    assert_eq!(s.create("wa_qr", "15551234567").status, 201);
    // The client built the payload from the peer's first ref and its own keys:
    // `ref,noise key,identity key,adv secret,client type`.
    let mut qr = String::new();
    wait_until(10, "a QR code", || {
        let r = s.get("/api/sessions/wa_qr/qr");
        if r.status == 200 {
            qr = r.json()["qr"].as_str().unwrap().to_string();
        }
        r.status == 200
    });
    let parts: Vec<&str> = qr.split(',').collect();
    assert_eq!(parts.len(), 5, "{qr}");
    assert_eq!(parts[0], botvisor_wa_peer::QR_REFS[0]);
    for key in &parts[1..4] {
        assert_eq!(key.len(), 44, "a base64 32-byte key: {key}");
    }
    let png = s.get("/api/sessions/wa_qr/qr?format=png");
    assert_eq!(png.header("content-type"), Some("image/png"));
    // Paired sessions and stopped ones have none.
    assert_eq!(s.post("/api/sessions/wa_qr/stop", None).status, 200);
    assert_eq!(s.get("/api/sessions/wa_qr/qr").status, 404);
}

#[test]
fn a_dropped_connection_shows_disconnected_then_reconnects_with_a_fresh_code() {
    let peer = Peer::start();
    let s = start(&peer, &[]);
    let first = s.create("wa_drop", "15551234567").json()["pairingCode"]
        .as_str()
        .unwrap()
        .to_string();
    peer.command(Command::Close);
    let v = s.wait_for("wa_drop", 20, |v| v["state"] == "disconnected");
    assert!(
        v["lastError"]
            .as_str()
            .unwrap()
            .contains("disconnected from WhatsApp"),
        "{v}"
    );
    // The client reconnects by itself; the old code is void, so a new one is requested.
    wait_until(30, "a fresh code after the reconnect", || {
        code_of(&s, "wa_drop").is_some_and(|c| c != first)
    });
    let stats = peer.stats();
    assert!(stats.handshakes >= 2, "{stats:?}");
    assert!(stats.companion_hellos.len() >= 2, "{stats:?}");
    // A reconnect is the client's own business, not a supervisor restart; it is counted.
    let v = s.session("wa_drop");
    assert_eq!(v["restarts"], 0);
    assert!(v["disconnects"].as_u64().unwrap() >= 1, "{v}");
}

#[test]
fn a_refresh_request_from_whatsapp_gets_a_new_code() {
    let peer = Peer::start();
    let s = start(&peer, &[]);
    let first = s.create("wa_ref", "15551234567").json()["pairingCode"]
        .as_str()
        .unwrap()
        .to_string();
    peer.command(Command::RefreshCode);
    wait_until(20, "a refreshed code", || {
        code_of(&s, "wa_ref").is_some_and(|c| c != first)
    });
    assert_eq!(peer.stats().handshakes, 1, "a refresh needs no reconnect");
}

#[test]
fn logout_failure_from_whatsapp_is_terminal_and_wipes_credentials() {
    let peer = Peer::start();
    let s = start(&peer, &[]);
    assert_eq!(s.create("wa_lo", "15551234567").status, 201);
    assert!(has_keys(&s, "wa_lo"));
    let before = peer.stats();
    peer.command(Command::LoggedOut);
    let v = s.wait_state("wa_lo", "logged_out");
    let ended = Instant::now();
    assert!(
        v["lastError"]
            .as_str()
            .unwrap()
            .contains("logged out from the phone"),
        "{v}"
    );
    wait_until(10, "credentials wiped", || !has_keys(&s, "wa_lo"));
    assert_stays(&peer, &s, "wa_lo", "logged_out", &before, ended);
}

#[test]
fn a_replaced_stream_stops_the_session_without_a_restart_loop() {
    let peer = Peer::start();
    let s = start(&peer, &[]);
    s.create("wa_rep", "15551234567");
    let before = peer.stats();
    peer.command(Command::StreamReplaced);
    let v = s.wait_state("wa_rep", "stopped");
    let ended = Instant::now();
    assert_eq!(v["desired"], "stopped");
    assert!(v["lastError"].as_str().unwrap().contains("replaced"), "{v}");
    assert_stays(&peer, &s, "wa_rep", "stopped", &before, ended);
}

/// Two botvisor processes with the same account (two data dirs holding one device's
/// keys): the loopback peer, like WhatsApp, keeps one socket per device. The second login
/// is recorded as an overlap and kicks the first with `<conflict type="replaced"/>`; the
/// first session stops (its `lastError` says replaced) and does not come back, so the
/// two never fight over the account: one overlap, one kick, one live connection after.
#[test]
fn a_second_login_for_one_account_replaces_the_first_and_the_peer_counts_it() {
    let peer = Peer::start();
    let first = start(&peer, &[]);
    first.create("wa_twice", "15551234567");
    assert_eq!(first.post("/api/sessions/wa_twice/stop", None).status, 200);
    common::seed_paired_as(&first, "wa_twice", "Sender", 42);
    assert_eq!(first.post("/api/sessions/wa_twice/start", None).status, 200);
    first.wait_state("wa_twice", "online");
    assert_eq!(peer.live("15551234567"), 1);
    assert!(peer.stats().overlaps.is_empty());
    let second = start(&peer, &[]);
    second.create("wa_twice", "15551234567");
    assert_eq!(second.post("/api/sessions/wa_twice/stop", None).status, 200);
    common::seed_paired_as(&second, "wa_twice", "Sender", 42);
    assert_eq!(
        second.post("/api/sessions/wa_twice/start", None).status,
        200
    );
    second.wait_state("wa_twice", "online");
    let v = first.wait_state("wa_twice", "stopped");
    assert!(
        v["lastError"]
            .as_str()
            .unwrap_or_default()
            .contains("replaced"),
        "{v}"
    );
    let st = peer.stats();
    assert_eq!(st.overlaps, ["15551234567:42"], "{:?}", st.overlaps);
    assert_eq!(st.replaced, 1);
    // The kicked one stays down: one live connection, and no new overlap.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(peer.live("15551234567"), 1);
    assert_eq!(peer.stats().overlaps.len(), 1);
    assert_eq!(first.session("wa_twice")["state"], "stopped");
    assert_eq!(second.session("wa_twice")["state"], "online");
}

/// After a terminal event at `ended`, the session stays in `state`: once a probe shows
/// that any reconnect would have happened, no connection but the probe's was made and
/// the session's number asked for no new code.
fn assert_stays(
    peer: &Peer,
    s: &Server,
    id: &str,
    state: &str,
    before: &botvisor_wa_peer::Stats,
    ended: Instant,
) {
    let probe = reconnect_probe(peer, s, "wa_probe", ended);
    assert_eq!(s.session(id)["state"], state);
    assert_eq!(s.states_after(id, state), Vec::<String>::new());
    let after = peer.stats();
    assert_eq!(
        after.connections,
        before.connections + probe,
        "{id} must not reconnect after {state}: {after:?}"
    );
    assert!(
        !after.companion_hellos[before.companion_hellos.len()..].contains(&"15551234567".into()),
        "{after:?}"
    );
}

#[test]
fn a_temporary_ban_fails_the_session_with_its_expiry() {
    let peer = Peer::start();
    let s = start(&peer, &[]);
    s.create("wa_ban", "15551234567");
    peer.command(Command::TemporaryBan {
        code: 101,
        expire_secs: 3600,
    });
    let v = s.wait_state("wa_ban", "failed");
    let err = v["lastError"].as_str().unwrap();
    assert!(
        err.contains("banned") && err.contains("3600 s") && err.contains("until 20"),
        "{err}"
    );
}

#[test]
fn a_throttled_pair_code_request_is_a_429_with_a_retry_hint_and_leaves_nothing() {
    let peer = Peer::start();
    peer.set_pair_reply(PairReply::RateLimited { backoff_secs: 30 });
    let s = start(&peer, &[]);
    let r = s.create("wa_429", "15551234567");
    let msg = r.error(429);
    assert!(
        msg.contains("rate-limiting") && msg.contains("retry in 30 s"),
        "{msg}"
    );
    assert_eq!(s.get("/api/sessions/wa_429").status, 404);
    wait_until(5, "the keys are removed", || !has_keys(&s, "wa_429"));
    assert_eq!(peer.stats().companion_hellos.len(), 1, "no retry storm");
}

#[test]
fn stop_start_backup_restore_and_delete_on_a_real_credential_file() {
    if sqlite_only(
        "stop_start_backup_restore_and_delete_on_a_real_credential_file",
        "it reads the key file (a_backup_carries_keys_between_postgresql_and_sqlite_nodes backs up keys in PostgreSQL)",
    ) {
        return;
    }
    let peer = Peer::start();
    let s = start(&peer, &[]);
    s.create("wa_ops", "15551234567");
    let db = s.data_dir.join("sessions/wa_ops.db");
    let identity = |path: &std::path::Path| -> Vec<u8> {
        let c = rusqlite::Connection::open(path).unwrap();
        // whatsapp-rust keeps the device's noise key in its device table.
        c.query_row("SELECT noise_key FROM device LIMIT 1", [], |r| r.get(0))
            .unwrap()
    };

    let b = s.post("/api/sessions/wa_ops/backup", None).json();
    let backup_id = b["backupId"].as_str().unwrap().to_string();
    let original = identity(&s.data_dir.join(format!("backups/wa_ops/{backup_id}.db")));
    assert_eq!(
        s.post("/api/sessions/wa_ops/stop", None).json()["message"],
        "Session wa_ops stopped"
    );
    assert_eq!(
        identity(&db),
        original,
        "the backup holds the live store's identity"
    );

    // Replace the store by a fresh one (a new device identity)...
    std::fs::remove_file(&db).unwrap();
    assert_eq!(s.post("/api/sessions/wa_ops/start", None).status, 200);
    s.wait_state("wa_ops", "pairing");
    assert_ne!(identity(&db), original);
    // ...and restore: the old identity is back and the session runs again.
    let r = s.post("/api/sessions/wa_ops/restore", None).json();
    assert_eq!(r["backupId"], backup_id.as_str());
    s.wait_state("wa_ops", "pairing");
    assert_eq!(identity(&db), original);

    assert_eq!(
        s.req("DELETE", "/api/sessions/wa_ops", None, &[]).status,
        200
    );
    for sfx in ["", "-wal", "-shm"] {
        assert!(
            !s.data_dir.join(format!("sessions/wa_ops.db{sfx}")).exists(),
            "{sfx}"
        );
    }
}

#[test]
fn kill_9_while_pairing_resumes_and_asks_for_a_new_code() {
    let peer = Peer::start();
    let tmp = tempfile::tempdir().unwrap();
    let url = peer.url();
    let args = ["--link", "whatsapp", "--wa-url", url.as_str()];
    let mut s = Server::start_in(tmp.path(), &args);
    assert_eq!(s.create("wa_k9", "15551234567").status, 201);
    s.kill9();
    let s = Server::start_in(tmp.path(), &args);
    s.wait_state("wa_k9", "pairing");
    assert!(code_of(&s, "wa_k9").is_some());
    assert!(peer.stats().companion_hellos.len() >= 2);
}

#[test]
fn api_logout_unlinks_and_deletes() {
    let peer = Peer::start();
    let s = start(&peer, &[]);
    s.create("wa_out", "15551234567");
    let v = s.post("/api/sessions/wa_out/logout", None).json();
    assert_eq!(v["message"], "Session wa_out logged out and deleted");
    // Never paired, so nothing to unlink: said, not hidden.
    assert!(v["warning"].as_str().is_some(), "{v}");
    assert_eq!(s.get("/api/sessions/wa_out").status, 404);
    wait_until(5, "the keys are removed", || !has_keys(&s, "wa_out"));
}

/// The release binary (built without `test-peer`) must refuse the peer's fake
/// certificate. It is `BOTVISOR_RELEASE_BIN` when set, else the one the README's first
/// command builds (`target/release/botvisor`).
#[test]
fn the_release_binary_refuses_a_fake_server() {
    let built = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("release/botvisor");
    let Some(bin) = std::env::var_os("BOTVISOR_RELEASE_BIN")
        .filter(|b| !b.is_empty())
        .map(std::path::PathBuf::from)
        .or_else(|| built.is_file().then_some(built))
    else {
        common::skip_unless_required(
            "the_release_binary_refuses_a_fake_server",
            "no release build of botvisor; to run it: cargo build --release --bin botvisor",
        );
        return;
    };
    let peer = Peer::start();
    let url = peer.url();
    let s = Server::start_with_binary(
        &bin,
        &[
            "--link",
            "whatsapp",
            "--wa-url",
            url.as_str(),
            "--create-timeout",
            "4s",
        ],
    );
    let msg = s.create("wa_rel", "15551234567").error(503);
    assert!(msg.contains("not created"), "{msg}");
    let stats = peer.stats();
    assert!(stats.connections >= 1, "{stats:?}");
    assert_eq!(
        stats.handshakes, 0,
        "the client must not complete a handshake with a fake certificate: {stats:?}"
    );
    assert!(stats.companion_hellos.is_empty());
}

/// Whether anything of session `id`'s keys is kept: its store file (or `-wal`, `-shm`),
/// or, with the keys in PostgreSQL, any of its rows.
fn has_keys(s: &Server, id: &str) -> bool {
    if keys_in_database() {
        let url = common::database_url_for(&s.data_dir).expect("a PostgreSQL database");
        return key_rows(&url, &["wa_device", "wa_prekeys"], id) > 0;
    }
    ["", "-wal", "-shm"]
        .iter()
        .any(|sfx| s.data_dir.join(format!("sessions/{id}.db{sfx}")).exists())
}

/// Rows of session `id` in the key tables `tables` of the database at `url`, summed (one
/// query).
fn key_rows(url: &str, tables: &[&str], id: &str) -> u64 {
    let pg = common::pg::shared().expect("PostgreSQL runs");
    let counts: Vec<String> = tables
        .iter()
        .map(|t| format!("(SELECT count(*) FROM {t} WHERE session_id = '{id}')"))
        .collect();
    let sql = format!("SELECT {}", counts.join(" + "));
    pg.psql(url, &sql).unwrap().parse().unwrap()
}

#[test]
fn a_paired_session_logs_in_straight_to_online_with_its_name() {
    let peer = Peer::start();
    let s = start(&peer, &[]);
    s.create("wa_on", "15551234567");
    assert_eq!(s.post("/api/sessions/wa_on/stop", None).status, 200);
    seed_paired(&s, "wa_on", "Peer Bot ✓");
    let hellos = peer.stats().companion_hellos.len();
    assert_eq!(s.post("/api/sessions/wa_on/start", None).status, 200);
    let v = s.wait_state("wa_on", "online");
    assert_eq!(v["status"], "online");
    assert_eq!(v["name"], "Peer Bot ✓");
    assert!(v["lastSeenAt"].as_str().is_some());
    assert_eq!(peer.stats().logins, 1);
    assert_eq!(
        peer.stats().companion_hellos.len(),
        hellos,
        "no pairing code for a paired session"
    );
    assert_eq!(s.get("/api/sessions/wa_on/pairing").status, 404);
    let states = s.states_once_newest_is("wa_on", "online");
    assert_eq!(
        &states[..3],
        ["online", "connecting", "starting"],
        "{states:?}"
    );

    // The connection drops: disconnected, then the client's own reconnect logs in again.
    peer.command(Command::Close);
    s.wait_state("wa_on", "disconnected");
    s.wait_state("wa_on", "online");
    assert_eq!(peer.stats().logins, 2);
    assert_eq!(s.session("wa_on")["restarts"], 0);

    // Logout through the API unlinks the device (remove-companion-device IQ), then deletes.
    let v = s.post("/api/sessions/wa_on/logout", None).json();
    assert_eq!(v["message"], "Session wa_on logged out and deleted");
    assert!(v.get("warning").is_none(), "{v}");
    assert_eq!(peer.stats().unlinks, 1);
    wait_until(5, "the keys are removed", || !has_keys(&s, "wa_on"));
}

#[test]
fn an_outdated_client_is_a_crash_under_the_restart_policy() {
    let peer = Peer::start();
    let s = start(&peer, &["--restart-max", "1"]);
    s.create("wa_old", "15551234567");
    peer.command(Command::ClientOutdated);
    // Restarted once (a new client, a new connection, a new code)...
    let v = s.wait_for("wa_old", 20, |v| {
        v["restarts"] == 1 && v["state"] == "pairing"
    });
    assert!(v["lastError"].as_str().unwrap().contains("outdated"), "{v}");
    assert!(peer.stats().connections >= 2);
    // ...and past the budget it fails instead of looping.
    peer.command(Command::ClientOutdated);
    let v = s.wait_state("wa_old", "failed");
    assert!(
        v["lastError"]
            .as_str()
            .unwrap()
            .contains("gave up after 1 restarts"),
        "{v}"
    );
}

#[test]
fn a_backup_from_another_link_is_refused_before_anything_stops() {
    // A simulated session's backup...
    let sim_dir = tempfile::tempdir().unwrap();
    let mut sim = Server::start_in(sim_dir.path(), &[]);
    assert_eq!(sim.create("xl", "15551234567").status, 201);
    let id = sim.post("/api/sessions/xl/backup", None).json()["backupId"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(sim.terminate(), Some(0));
    // ...copied into a WhatsApp data dir, next to a session of the same id.
    let peer = Peer::start();
    let s = start(&peer, &[]);
    assert_eq!(s.create("xl", "15551234567").status, 201);
    let dest = s.data_dir.join("backups/xl");
    std::fs::create_dir_all(&dest).unwrap();
    std::fs::copy(
        sim_dir.path().join(format!("backups/xl/{id}.db")),
        dest.join(format!("{id}.db")),
    )
    .unwrap();
    let msg = s
        .post(
            "/api/sessions/xl/restore",
            Some(&format!(r#"{{"backupId":"{id}"}}"#)),
        )
        .error(400);
    assert!(msg.contains("made with the sim link"), "{msg}");
    let v = s.session("xl");
    assert_eq!(
        (v["state"].as_str(), v["restarts"].as_u64()),
        (Some("pairing"), Some(0))
    );
}

#[test]
fn a_create_that_cannot_reach_whatsapp_fails_at_once_with_the_cause() {
    // Nothing listens on port 9 of the loopback: every connect is refused. The create
    // answers with that cause instead of waiting out its 60 s for a pairing code.
    // RUST_BACKTRACE=1, as on many developer machines: the expected failure is still
    // logged as one line, with no backtrace (those belong to panics).
    let mut args = vec![
        "--link",
        "whatsapp",
        "--wa-url",
        "ws://127.0.0.1:9/ws/chat",
        "--create-timeout",
        "60s",
    ];
    if keys_in_database() {
        args.extend_from_slice(&["--keys", "database"]);
    }
    let s = Server::start_with_env(&args, &[("RUST_BACKTRACE", "1")]);
    let msg = s.create("wa_down", "15551234567").error(503);
    assert!(msg.contains("cannot reach WhatsApp"), "{msg}");
    assert!(msg.to_lowercase().contains("refused"), "{msg}");
    assert!(!msg.contains("Timed out"), "{msg}");
    // Nothing is left behind.
    assert_eq!(s.get("/api/stats").json()["totalUsers"], 0);
    wait_until(10, "credentials removed", || !has_keys(&s, "wa_down"));
    let log = std::fs::read_to_string(&s.log).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("Connection refused")),
        "the connect failure is logged: {log}"
    );
    assert!(
        !log.contains("backtrace") && !log.contains("Backtrace"),
        "no backtrace for an expected failure: {log}"
    );
}

type Hooks = common::Received;

/// A peer, and a server with a webhook receiver whose session `id` (phone 15551234567)
/// is paired (seeded) and online.
fn online_with_webhook(id: &str) -> (Peer, Server, Hooks) {
    let peer = Peer::start();
    let (hook, got) = common::json_receiver();
    let s = start(
        &peer,
        &[
            "--webhook-url",
            &hook,
            "--webhook-secret",
            "real-link-webhook-secret-0123",
        ],
    );
    s.create(id, "15551234567");
    assert_eq!(
        s.post(&format!("/api/sessions/{id}/stop"), None).status,
        200
    );
    seed_paired(&s, id, "Sender");
    assert_eq!(
        s.post(&format!("/api/sessions/{id}/start"), None).status,
        200
    );
    s.wait_state(id, "online");
    wait_until(10, "the client uploads its pre-keys", || {
        peer.stats().pre_key_uploads >= 1
    });
    (peer, s, got)
}

/// The peer's second WhatsApp user (tests/wa-peer/src/signal.rs) and the real client
/// exchange Signal-encrypted messages end to end: the API's send reaches the peer as a
/// `pkmsg` that decrypts to the same text; the peer's reply on that session (`msg`) and a
/// message from a stranger (a `pkmsg` on the pre-keys the client uploaded) are decrypted
/// by the client and become `message.received` webhooks; `!ping` is answered, encrypted.
#[test]
fn messages_go_both_ways_over_real_signal_sessions_with_the_peer() {
    let (peer, s, got) = online_with_webhook("wa_tx");

    // Out: the API's text arrives at the peer's user and decrypts to the same text.
    let text = "héllo from botvisor ✓";
    let r = s.post(
        "/api/sessions/wa_tx/messages",
        Some(&serde_json::json!({"to": "15557654321", "text": text}).to_string()),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let message_id = r.json()["messageId"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    wait_until(10, "the peer decrypts the message", || {
        peer.stats()
            .decrypted
            .iter()
            .any(|d| d.to.starts_with("15557654321") && d.text.as_deref() == Some(text))
    });
    let st = peer.stats();
    assert!(st.signal_errors.is_empty(), "{:?}", st.signal_errors);
    let d = st
        .decrypted
        .iter()
        .find(|d| d.to.starts_with("15557654321"))
        .unwrap();
    eprintln!(
        "peer decrypted: {:?}; bundles served: {:?}",
        st.decrypted, st.bundles_served
    );
    assert_eq!(d.kind, "pkmsg", "a first message opens the session");
    assert_eq!(d.id, message_id, "the stanza id is the API's message id");
    assert!(st
        .bundles_served
        .iter()
        .any(|j| j.starts_with("15557654321")));

    // The recipient's phone reports it delivered, and later read: webhooks for both.
    wait_until(10, "message.delivered", || {
        got_all(&got).iter().any(|v| {
            v["event"] == "message.delivered" && v["data"]["messageId"] == message_id.as_str()
        })
    });
    peer.command(Command::MarkRead {
        from: "15557654321".into(),
        to: "15551234567".into(),
        id: message_id.clone(),
    });
    wait_until(10, "message.read", || {
        got_all(&got)
            .iter()
            .any(|v| v["event"] == "message.read" && v["data"]["messageId"] == message_id.as_str())
    });
    let read = got_all(&got)
        .into_iter()
        .find(|v| v["event"] == "message.read")
        .unwrap();
    eprintln!("message.read: {read}");
    assert!(
        read["data"]["by"]
            .as_str()
            .unwrap()
            .starts_with("15557654321"),
        "{read}"
    );
    assert_eq!(read["data"]["userId"], "wa_tx");

    // In, on the session the client opened: the client decrypts the peer's `msg`.
    peer.command(Command::Send {
        from: "15557654321".into(),
        to: "15551234567".into(),
        id: "3EB0PEER000000000001".into(),
        content: Content::Text("reply from the peer ✓".into()),
    });
    // In, from a stranger: a `pkmsg` on the client's uploaded pre-keys.
    peer.command(Command::Send {
        from: "15550001111".into(),
        to: "15551234567".into(),
        id: "3EB0PEER000000000002".into(),
        content: Content::Text("hello from a stranger".into()),
    });
    let received = |got: &[serde_json::Value], id: &str| -> Option<serde_json::Value> {
        got.iter()
            .find(|v| v["event"] == "message.received" && v["data"]["messageId"] == id)
            .cloned()
    };
    wait_until(15, "both inbound messages reach the webhook", || {
        let got = got.lock().unwrap();
        received(&got, "3EB0PEER000000000001").is_some()
            && received(&got, "3EB0PEER000000000002").is_some()
    });
    let st = peer.stats();
    assert!(st.signal_errors.is_empty(), "{:?}", st.signal_errors);
    assert_eq!(
        st.messages_sent,
        vec![
            ("3EB0PEER000000000001".to_string(), "msg".to_string()),
            ("3EB0PEER000000000002".to_string(), "pkmsg".to_string())
        ]
    );
    let all = got_all(&got);
    let a = received(&all, "3EB0PEER000000000001").unwrap();
    eprintln!("message.received: {a}");
    assert_eq!(a["data"]["text"], "reply from the peer ✓");
    assert_eq!(a["data"]["userId"], "wa_tx");
    assert!(
        a["data"]["from"]
            .as_str()
            .unwrap()
            .starts_with("15557654321"),
        "{a}"
    );
    let b = received(&all, "3EB0PEER000000000002").unwrap();
    assert_eq!(b["data"]["text"], "hello from a stranger");

    // !ping from the peer's user: the client answers `pong`, encrypted, on the session.
    peer.command(Command::Send {
        from: "15557654321".into(),
        to: "15551234567".into(),
        id: "3EB0PEER000000000003".into(),
        content: Content::Text("!ping".into()),
    });
    wait_until(15, "the peer decrypts the pong", || {
        peer.stats().decrypted.iter().any(|d| {
            d.to.starts_with("15557654321")
                && d.text.as_deref().is_some_and(|t| t.starts_with("pong"))
        })
    });

    // Another kind (a location pin): reported with its kind and no text.
    peer.command(Command::Send {
        from: "15557654321".into(),
        to: "15551234567".into(),
        id: "3EB0PEER000000000004".into(),
        content: Content::Location {
            latitude: 52.52,
            longitude: 13.405,
        },
    });
    wait_until(15, "the location reaches the webhook", || {
        received(&got_all(&got), "3EB0PEER000000000004").is_some()
    });
    let c = received(&got_all(&got), "3EB0PEER000000000004").unwrap();
    eprintln!("message.received (location): {c}");
    assert_eq!(c["data"]["kind"], "location", "{c}");
    assert!(c["data"]["text"].is_null(), "{c}");
    // A tampered ciphertext: the client cannot decrypt it, asks for a retry, and nothing
    // is reported (a message is never made up).
    peer.command(Command::SendTampered {
        from: "15557654321".into(),
        to: "15551234567".into(),
        id: "3EB0PEER000000000005".into(),
        content: Content::Text("tampered".into()),
    });
    wait_until(15, "the client answers the tampered message", || {
        peer.stats()
            .receipts
            .iter()
            .any(|(id, _)| id == "3EB0PEER000000000005")
    });
    let st = peer.stats();
    assert!(st.signal_errors.is_empty(), "{:?}", st.signal_errors);
    eprintln!("peer: {st:?}");
    for n in 1..=4 {
        let id = format!("3EB0PEER00000000000{n}");
        assert!(
            st.receipts.contains(&(id.clone(), "delivery".into())),
            "{id} decrypted and receipted: {:?}",
            st.receipts
        );
    }
    let tampered: Vec<&String> = st
        .receipts
        .iter()
        .filter(|(id, _)| id == "3EB0PEER000000000005")
        .map(|(_, kind)| kind)
        .collect();
    assert!(!tampered.iter().any(|k| *k == "delivery"), "{tampered:?}");
    // Receipts go out after the webhook event is queued; one more clean message proves
    // the tampered one's turn has passed.
    peer.command(Command::Send {
        from: "15557654321".into(),
        to: "15551234567".into(),
        id: "3EB0PEER000000000006".into(),
        content: Content::Text("after the tampered one".into()),
    });
    wait_until(15, "the next message reaches the webhook", || {
        received(&got_all(&got), "3EB0PEER000000000006").is_some()
    });
    assert!(received(&got_all(&got), "3EB0PEER000000000005").is_none());
    assert_eq!(s.session("wa_tx")["state"], "online");
}

fn got_all(got: &std::sync::Mutex<Vec<serde_json::Value>>) -> Vec<serde_json::Value> {
    got.lock().unwrap().clone()
}

/// What a send on the real link promises. whatsapp-rust calls a send done once a copy is
/// encrypted for some device and handed to the socket: with the recipient's keys refused
/// (`<error code="404">`) but the own phone's keys served, the copy goes to the own phone
/// only and the API says 201; nothing reaches the recipient. With no device's keys to be
/// had, the send fails: a clear 502, a `message.failed` webhook, the session still online.
#[test]
fn a_send_with_no_keys_to_be_had_is_a_502_and_a_failed_event() {
    let (peer, s, got) = online_with_webhook("wa_nokeys");

    peer.refuse_keys_for("15550003333");
    peer.refuse_keys_for("15551234567");
    let t = Instant::now();
    let r = s.post(
        "/api/sessions/wa_nokeys/messages",
        Some(r#"{"to":"15550003333","text":"anyone?"}"#),
    );
    eprintln!("no keys: {} {} after {:?}", r.status, r.body, t.elapsed());
    assert_eq!(r.status, 502, "{}", r.body);
    assert_eq!(r.json()["success"], false);
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    wait_until(10, "the message.failed webhook", || {
        got_all(&got)
            .iter()
            .any(|v| v["event"] == "message.failed" && v["data"]["to"] == "15550003333")
    });
    assert!(!peer
        .stats()
        .decrypted
        .iter()
        .any(|d| d.text.as_deref() == Some("anyone?")));
    peer.serve_keys_for("15551234567");
    peer.refuse_keys_for("15550002222");
    let r = s.post(
        "/api/sessions/wa_nokeys/messages",
        Some(r#"{"to":"15550002222","text":"hello?"}"#),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    wait_until(10, "the own phone's copy", || {
        peer.stats()
            .decrypted
            .iter()
            .any(|d| d.text.as_deref() == Some("hello?"))
    });
    let st = peer.stats();
    assert!(
        st.decrypted.iter().all(|d| d.to.starts_with("15551234567")),
        "only the own phone got a copy: {:?}",
        st.decrypted
    );
    // So no recipient ever reports it delivered: the 201 alone is no proof. (The ack of
    // the stanza came before the own phone's copy was decrypted; one more send to a
    // served recipient, delivered, shows that receipts were flowing meanwhile.)
    let id = r.json()["messageId"].as_str().unwrap().to_string();
    let probe = s.post(
        "/api/sessions/wa_nokeys/messages",
        Some(r#"{"to":"15557654321","text":"probe"}"#),
    );
    let probe_id = probe.json()["messageId"].as_str().unwrap().to_string();
    wait_until(10, "the probe's message.delivered", || {
        got_all(&got).iter().any(|v| {
            v["event"] == "message.delivered" && v["data"]["messageId"] == probe_id.as_str()
        })
    });
    assert!(!got_all(&got)
        .iter()
        .any(|v| v["event"] == "message.delivered" && v["data"]["messageId"] == id.as_str()));

    assert_eq!(s.session("wa_nokeys")["state"], "online");
}

/// A received message is acknowledged to WhatsApp only once its `message.received` event
/// is durable (whatsapp-rust's inbound durability hook). While botvisor's database is
/// locked by another process the commit fails, so the client holds the delivery receipt;
/// WhatsApp (the peer) delivers the message again at the next login, and then it is
/// kept, acknowledged and delivered to the webhook, each delivery with the same event id.
#[test]
fn a_received_message_is_acknowledged_only_once_it_is_kept() {
    if sqlite_only(
        "a_received_message_is_acknowledged_only_once_it_is_kept",
        "it fails the commit by locking botvisor.db",
    ) {
        return;
    }
    let (peer, s, got) = online_with_webhook("wa_keep");
    let locker = rusqlite::Connection::open(s.data_dir.join("botvisor.db")).unwrap();
    locker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    peer.command(Command::Send {
        from: "15557654321".into(),
        to: "15551234567".into(),
        id: "3EB0KEEP000000000001".into(),
        content: Content::Text("keep me".into()),
    });
    let log = s.data_dir.join(common::SERVER_LOG);
    wait_until(30, "the commit of the received message fails", || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("suppressing acks for redelivery")
    });
    assert!(
        !peer
            .stats()
            .receipts
            .iter()
            .any(|(id, _)| id == "3EB0KEEP000000000001"),
        "not acknowledged while it is not kept"
    );
    locker.execute_batch("ROLLBACK").unwrap();
    drop(locker);

    // The next login brings it again; now it is kept and acknowledged.
    peer.command(Command::Close);
    // (A message delivered in the offline batch is receipted `inactive`: delivered to a
    // device that is not in the foreground.)
    wait_until(20, "the redelivered message is acknowledged", || {
        acknowledged(&peer, "3EB0KEEP000000000001")
    });
    assert!(peer.stats().redelivered >= 1);
    wait_until(15, "the webhook gets it", || {
        got_all(&got)
            .iter()
            .any(|v| v["data"]["messageId"] == "3EB0KEEP000000000001")
    });
    let copies: Vec<serde_json::Value> = got_all(&got)
        .into_iter()
        .filter(|v| v["data"]["messageId"] == "3EB0KEEP000000000001")
        .collect();
    eprintln!("deliveries of the kept message: {}", copies.len());
    assert_eq!(copies[0]["data"]["text"], "keep me");
    assert!(
        copies.iter().all(|v| v["id"] == copies[0]["id"]),
        "every copy carries one event id: {copies:?}"
    );
    assert_eq!(s.session("wa_keep")["state"], "online");
}

/// A session's store files that the server still has open.
fn store_files(s: &Server, id: &str) -> Vec<String> {
    let store = format!("/sessions/{id}.db");
    s.open_files()
        .into_iter()
        .filter(|f| f.contains(&store))
        .collect()
}

/// A stopped real-link session holds no descriptor and no client (issue 26): 20 sessions
/// paired and online, 5 stop/start cycles and one restore each; after each stop none of
/// the session's store files is open (a live client keeps its store, so none open means
/// the client is gone too), and after the last stop the process is back to its idle count.
#[test]
fn stopped_real_sessions_keep_no_client_and_no_descriptor() {
    if sqlite_only(
        "stopped_real_sessions_keep_no_client_and_no_descriptor",
        "it counts key files and restores backups",
    ) {
        return;
    }
    const SESSIONS: usize = 20;
    let peer = Peer::start();
    let s = start(&peer, &[]);
    // Idle: once the API has answered (its runtime starts after the address is printed).
    assert_eq!(s.get("/api/stats").status, 200);
    std::thread::sleep(Duration::from_millis(300));
    let idle = s.open_files().len();
    let ids: Vec<String> = (0..SESSIONS).map(|i| format!("wa_fd_{i:02}")).collect();
    let post = |path: String| {
        let r = s.post(&path, None);
        assert_eq!(r.status, 200, "{path}: {}", r.body);
        r
    };
    let stopped_and_closed = |id: &str| {
        post(format!("/api/sessions/{id}/stop"));
        // Aborted tasks are dropped at their next poll: a short bounded wait.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = store_files(&s, id);
            if left.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{id} is stopped and still holds {left:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    for id in &ids {
        assert_eq!(s.create(id, "15551234567").status, 201, "{id}");
    }
    // Stopped while pairing (never paired): nothing left open either.
    for id in &ids {
        stopped_and_closed(id);
        seed_paired(&s, id, "Fd Bot");
    }
    for round in 0..5 {
        for id in &ids {
            post(format!("/api/sessions/{id}/start"));
        }
        for id in &ids {
            s.wait_state(id, "online");
        }
        if round == 0 {
            for id in &ids {
                post(format!("/api/sessions/{id}/backup"));
            }
        }
        for id in &ids {
            stopped_and_closed(id);
        }
    }
    // One restore each (it stops the session, swaps the store and starts it again).
    for id in &ids {
        post(format!("/api/sessions/{id}/start"));
        s.wait_state(id, "online");
        post(format!("/api/sessions/{id}/restore"));
        s.wait_state(id, "online");
        stopped_and_closed(id);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = s.open_files();
        if now.len() <= idle {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} descriptors open after stopping everything, {idle} when idle: {now:#?}",
            now.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An idle online session's key store closes its files (issue 24: a paired idle session
/// holds its socket and nothing else) and opens them again on the next use: the Signal
/// session written before the close carries the next message both ways.
#[test]
fn an_idle_sessions_key_store_closes_its_files_and_reopens_them_on_use() {
    if sqlite_only(
        "an_idle_sessions_key_store_closes_its_files_and_reopens_them_on_use",
        "it counts key files",
    ) {
        return;
    }
    let (peer, s, got) = online_with_webhook("wa_idle");
    send_and_see_it_decrypted(&peer, &s, "wa_idle", "before the store closes");
    assert!(
        !store_files(&s, "wa_idle").is_empty(),
        "a session in use holds its store open"
    );
    // Closed 30 s after its last use, checked every 10 s.
    wait_until(60, "the idle store closes its files", || {
        store_files(&s, "wa_idle").is_empty()
    });
    assert_eq!(
        s.session("wa_idle")["state"],
        "online",
        "the session stays online with its store closed"
    );
    // In, on the Signal session kept in the closed store.
    peer.command(Command::Send {
        from: "15557654321".into(),
        to: "15551234567".into(),
        id: "3EB0PEER0000000IDLE1".into(),
        content: Content::Text("after the store closed".into()),
    });
    wait_until(15, "the message reaches the webhook", || {
        got_all(&got).iter().any(|v| {
            v["event"] == "message.received" && v["data"]["messageId"] == "3EB0PEER0000000IDLE1"
        })
    });
    send_and_see_it_decrypted(&peer, &s, "wa_idle", "after the store reopened");
    let st = peer.stats();
    assert!(st.signal_errors.is_empty(), "{:?}", st.signal_errors);
    assert!(
        st.messages_sent
            .iter()
            .any(|(id, kind)| id == "3EB0PEER0000000IDLE1" && kind == "msg"),
        "the peer went on with the same Signal session: {:?}",
        st.messages_sent
    );
}

/// Sends `text` to the peer's second user and waits until the peer decrypted it.
fn send_and_see_it_decrypted(peer: &Peer, s: &Server, id: &str, text: &str) {
    let r = s.post(
        &format!("/api/sessions/{id}/messages"),
        Some(&serde_json::json!({"to": "15557654321", "text": text}).to_string()),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    wait_until(15, "the peer decrypts the message", || {
        peer.stats()
            .decrypted
            .iter()
            .any(|d| d.to.starts_with("15557654321") && d.text.as_deref() == Some(text))
    });
    let errors = peer.stats().signal_errors;
    assert!(errors.is_empty(), "{errors:?}");
}

/// `--keys database`: the real link's keys are rows in PostgreSQL (a database of this
/// test's own, whatever the engine of the run). A session pairs, logs in and sends over
/// Signal sessions kept there, and after a kill -9 logs in again with the same keys and
/// sends again; no key file is written; a backup is one file; a delete removes its rows,
/// and rows of a session that no longer exists are swept at the next start.
#[test]
fn keys_in_postgresql_serve_a_real_session_and_go_with_it() {
    let test = "keys_in_postgresql_serve_a_real_session_and_go_with_it";
    let Some(pg) = common::pg::server_or_skip(test) else {
        return;
    };
    let url = pg.fresh_database_url("wa_keys").unwrap();
    let peer = Peer::start();
    let tmp = tempfile::tempdir().unwrap();
    let peer_url = peer.url();
    let mut args = peer_args(&peer_url).to_vec();
    args.extend_from_slice(&["--database-url", &url, "--keys", "database"]);
    let rows = |table: &str, id: &str| key_rows(&url, &[table], id);
    let mut s = Server::start_in(tmp.path(), &args);

    assert_eq!(s.create("pgk", "15551234567").status, 201);
    assert!(
        code_of(&s, "pgk").is_some(),
        "a pairing code from keys in PostgreSQL"
    );
    assert_eq!(s.post("/api/sessions/pgk/stop", None).status, 200);
    seed_paired_in_database(&url, "pgk", "Pg Bot");
    assert_eq!(s.post("/api/sessions/pgk/start", None).status, 200);
    assert_eq!(s.wait_state("pgk", "online")["name"], "Pg Bot");
    wait_until(10, "the client uploads its pre-keys", || {
        peer.stats().pre_key_uploads >= 1
    });
    assert!(rows("wa_prekeys", "pgk") > 0, "pre-keys are rows");
    send_and_see_it_decrypted(&peer, &s, "pgk", "first, keys in PostgreSQL");
    assert!(
        rows("wa_sessions", "pgk") >= 1,
        "the Signal session is a row"
    );
    assert!(
        !tmp.path().join("sessions/pgk.db").exists(),
        "no key file when the keys are in PostgreSQL"
    );

    // A backup copies the rows out to a key file (a_backup_carries_keys_between_
    // postgresql_and_sqlite_nodes goes further); the scratch copy does not stay.
    assert_eq!(s.post("/api/sessions/pgk/backup", None).status, 200);
    let backups: Vec<String> = std::fs::read_dir(tmp.path().join("backups/pgk"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(backups.len(), 1, "{backups:?}");
    assert!(!backups[0].starts_with('.'), "{backups:?}");

    // kill -9: the keys were durable when the library was told so; the session logs in
    // again without pairing and its Signal session goes on.
    let hellos = peer.stats().companion_hellos.len();
    s.kill9();
    let mut s = Server::start_in(tmp.path(), &args);
    s.wait_state("pgk", "online");
    send_and_see_it_decrypted(&peer, &s, "pgk", "second, after kill -9");
    assert_eq!(
        peer.stats().companion_hellos.len(),
        hellos,
        "no new pairing"
    );

    // A delete removes every row of the session (in the background, shortly).
    assert_eq!(s.req("DELETE", "/api/sessions/pgk", None, &[]).status, 200);
    wait_until(10, "the session's keys are removed", || {
        let tables = ["wa_device", "wa_prekeys", "wa_sessions", "wa_identities"];
        key_rows(&url, &tables, "pgk") == 0
    });

    // Rows of a session botvisor does not know (a delete killed before its purge) are
    // swept at the next start; other sessions' rows stay.
    assert_eq!(s.create("pgk2", "15551234567").status, 201);
    pg.psql(
        &url,
        "INSERT INTO wa_identities (session_id, address, key) VALUES ('ghost', 'x', '\\x00')",
    )
    .unwrap();
    assert_eq!(s.terminate(), Some(0));
    let s = Server::start_in(tmp.path(), &args);
    assert_eq!(rows("wa_identities", "ghost"), 0, "swept before serving");
    assert_eq!(
        rows("wa_device", "pgk2"),
        1,
        "a known session keeps its keys"
    );
    s.wait_state("pgk2", "pairing");
}

/// The device a key file holds: its registration id and ADV secret (random per device).
fn file_device(path: &std::path::Path) -> (i64, Vec<u8>) {
    let c = rusqlite::Connection::open(path).unwrap();
    c.query_row(
        "SELECT registration_id, adv_secret_key FROM device",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .unwrap()
}

/// The device session `id` holds in PostgreSQL (as [`file_device`]).
fn database_device(url: &str, id: &str) -> (i64, Vec<u8>) {
    let pg = common::pg::shared().expect("PostgreSQL runs");
    let rows = pg
        .rows(
            url,
            &format!(
                "SELECT registration_id, encode(adv_secret_key, 'hex') FROM wa_device \
                 WHERE session_id = '{id}'"
            ),
        )
        .unwrap();
    let row = &rows[0];
    let hex = row[1].clone().unwrap();
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    (row[0].clone().unwrap().parse().unwrap(), bytes)
}

/// A backup is one file whatever the engine: a paired session's keys in PostgreSQL are
/// backed up, restored there after its Signal sessions were lost, restored on a node
/// that keeps key files (where the session logs in and sends without pairing), backed up
/// there and restored back into PostgreSQL.
#[test]
fn a_backup_carries_keys_between_postgresql_and_sqlite_nodes() {
    let test = "a_backup_carries_keys_between_postgresql_and_sqlite_nodes";
    let Some(pg) = common::pg::server_or_skip(test) else {
        return;
    };
    let url = pg.fresh_database_url("wa_move").unwrap();
    let peer = Peer::start();
    let peer_url = peer.url();
    let (pg_dir, file_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut args = peer_args(&peer_url).to_vec();
    args.extend_from_slice(&["--database-url", &url, "--keys", "database"]);
    let a = Server::start_in(pg_dir.path(), &args);
    let rows = |table: &str| key_rows(&url, &[table], "mv");

    // A paired session with a Signal session, in PostgreSQL.
    assert_eq!(a.create("mv", "15551234567").status, 201);
    assert_eq!(a.post("/api/sessions/mv/stop", None).status, 200);
    seed_paired_in_database(&url, "mv", "Moving Bot");
    assert_eq!(a.post("/api/sessions/mv/start", None).status, 200);
    a.wait_state("mv", "online");
    send_and_see_it_decrypted(&peer, &a, "mv", "before the backup");
    let device = database_device(&url, "mv");
    let signal_sessions = rows("wa_sessions");
    assert!(signal_sessions >= 1);

    // The backup is a whatsapp-rust key file with the same device.
    let made = a.post("/api/sessions/mv/backup", None).json();
    let backup_id = made["backupId"].as_str().unwrap().to_string();
    let backup = pg_dir.path().join(format!("backups/mv/{backup_id}.db"));
    assert_eq!(file_device(&backup), device);

    // Restored in PostgreSQL after the Signal sessions were lost: they are back.
    assert_eq!(a.post("/api/sessions/mv/stop", None).status, 200);
    pg.psql(&url, "DELETE FROM wa_sessions WHERE session_id = 'mv'")
        .unwrap();
    let r = a.post("/api/sessions/mv/restore", None).json();
    assert_eq!(r["backupId"], backup_id.as_str(), "{r}");
    assert_eq!(a.post("/api/sessions/mv/start", None).status, 200);
    a.wait_state("mv", "online");
    assert_eq!(rows("wa_sessions"), signal_sessions);
    assert_eq!(database_device(&url, "mv"), device);
    let scratch: Vec<_> = std::fs::read_dir(pg_dir.path().join("backups/mv"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with('.'))
        .collect();
    assert!(scratch.is_empty(), "scratch key files stay: {scratch:?}");
    assert_eq!(a.post("/api/sessions/mv/stop", None).status, 200);

    // Restored on a node with key files: same device, online without pairing, sends.
    let hellos = peer.stats().companion_hellos.len();
    let b = Server::start_in(file_dir.path(), &peer_args(&peer_url));
    assert_eq!(b.create("mv", "15551234567").status, 201);
    assert_eq!(b.post("/api/sessions/mv/stop", None).status, 200);
    let dest = file_dir.path().join("backups/mv");
    std::fs::create_dir_all(&dest).unwrap();
    std::fs::copy(&backup, dest.join(format!("{backup_id}.db"))).unwrap();
    let r = b.post("/api/sessions/mv/restore", None).json();
    assert_eq!(r["backupId"], backup_id.as_str(), "{r}");
    assert_eq!(b.post("/api/sessions/mv/start", None).status, 200);
    assert_eq!(b.wait_state("mv", "online")["name"], "Moving Bot");
    assert_eq!(file_device(&file_dir.path().join("sessions/mv.db")), device);
    send_and_see_it_decrypted(&peer, &b, "mv", "from the node with key files");
    let hellos_now = peer.stats().companion_hellos.len();
    assert!(hellos_now <= hellos + 1, "a login, not a new pairing");

    // And back: the file node's backup restores into PostgreSQL.
    let made = b.post("/api/sessions/mv/backup", None).json();
    let back_id = made["backupId"].as_str().unwrap().to_string();
    assert_eq!(b.post("/api/sessions/mv/stop", None).status, 200);
    pg.psql(&url, "DELETE FROM wa_identities WHERE session_id = 'mv'")
        .unwrap();
    std::fs::copy(
        dest.join(format!("{back_id}.db")),
        pg_dir.path().join(format!("backups/mv/{back_id}.db")),
    )
    .unwrap();
    let r = a
        .post(
            "/api/sessions/mv/restore",
            Some(&format!(r#"{{"backupId":"{back_id}"}}"#)),
        )
        .json();
    assert_eq!(r["backupId"], back_id.as_str(), "{r}");
    assert_eq!(a.post("/api/sessions/mv/start", None).status, 200);
    a.wait_state("mv", "online");
    assert_eq!(database_device(&url, "mv"), device);
    assert!(rows("wa_identities") >= 1, "the identities came back");
    send_and_see_it_decrypted(&peer, &a, "mv", "home again in PostgreSQL");
    let errors = peer.stats().signal_errors;
    assert!(errors.is_empty(), "{errors:?}");
}

/// Runs `botvisor migrate --from --to --data-dir [--keys]`; answers (exit code, stdout
/// and stderr).
fn migrate(from: &str, to: &str, data_dir: &str, keys: Option<&str>) -> (Option<i32>, String) {
    let mut args = vec![
        "migrate",
        "--from",
        from,
        "--to",
        to,
        "--data-dir",
        data_dir,
    ];
    if let Some(keys) = keys {
        args.extend(["--keys", keys]);
    }
    let out = std::process::Command::new(common::botvisor_bin())
        .args(args)
        .env_remove("DATABASE_URL")
        .env_remove("BOTVISOR_DATA_DIR")
        .output()
        .expect("run botvisor migrate");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), said)
}

/// `migrate --keys`: a paired fleet whose keys are in PostgreSQL moves to a node with
/// SQLite and key files, and from there into another PostgreSQL with the keys as rows;
/// each time the session logs in with the same device and sends. Keys with nowhere to
/// go, and `--keys database` towards SQLite, are refused.
#[test]
fn migrate_carries_the_whatsapp_keys_between_postgresql_and_key_files() {
    let test = "migrate_carries_the_whatsapp_keys_between_postgresql_and_key_files";
    let Some(pg) = common::pg::server_or_skip(test) else {
        return;
    };
    let first = pg.fresh_database_url("mk_first").unwrap();
    let second = pg.fresh_database_url("mk_second").unwrap();
    let peer = Peer::start();
    let peer_url = peer.url();
    let tmp = tempfile::tempdir().unwrap();
    let (pg_dir, file_dir) = (tmp.path().join("pg"), tmp.path().join("files"));
    std::fs::create_dir_all(&pg_dir).unwrap();
    let on_pg = |url: &str| -> Vec<String> {
        let mut args: Vec<String> = peer_args(&peer_url).iter().map(|a| a.to_string()).collect();
        args.extend(["--database-url", url, "--keys", "database"].map(String::from));
        args
    };
    let args: Vec<String> = on_pg(&first);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut a = Server::start_in(&pg_dir, &args);
    assert_eq!(a.create("mk", "15551234567").status, 201);
    assert_eq!(a.post("/api/sessions/mk/stop", None).status, 200);
    seed_paired_in_database(&first, "mk", "Migrated Bot");
    assert_eq!(a.post("/api/sessions/mk/start", None).status, 200);
    a.wait_state("mk", "online");
    send_and_see_it_decrypted(&peer, &a, "mk", "before the move");
    let device = database_device(&first, "mk");
    let signal_sessions = key_rows(&first, &["wa_sessions"], "mk");
    assert_eq!(a.terminate(), Some(0));

    // PostgreSQL -> SQLite: the keys must be told where to go; not into SQLite rows.
    let file_db = file_dir.join("botvisor.db");
    let file_db = file_db.to_str().unwrap();
    let file_dir_s = file_dir.to_str().unwrap();
    let (code, said) = migrate(&first, file_db, file_dir_s, None);
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("--keys files"), "{said}");
    let (code, said) = migrate(&first, file_db, file_dir_s, Some("database"));
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("must be a postgres:// URL"), "{said}");
    let (code, said) = migrate(&first, file_db, file_dir_s, Some("files"));
    assert_eq!(code, Some(0), "{said}");
    assert!(said.contains("whatsapp keys     1 sessions"), "{said}");
    let key_file = file_dir.join("sessions/mk.db");
    assert_eq!(file_device(&key_file), device);
    for sfx in ["-wal", "-shm"] {
        let mut side = key_file.clone().into_os_string();
        side.push(sfx);
        assert!(
            !std::path::Path::new(&side).exists(),
            "no {sfx} beside the file"
        );
    }
    let mut b = Server::start_in(
        &file_dir,
        &[&peer_args(&peer_url)[..], &["--database-url", file_db]].concat(),
    );
    assert_eq!(b.wait_state("mk", "online")["name"], "Migrated Bot");
    send_and_see_it_decrypted(&peer, &b, "mk", "on key files");
    assert_eq!(b.terminate(), Some(0));

    // SQLite with key files -> another PostgreSQL, the keys as rows there.
    let (code, said) = migrate(file_db, &second, file_dir_s, Some("database"));
    assert_eq!(code, Some(0), "{said}");
    assert!(said.contains("--keys database"), "{said}");
    assert_eq!(database_device(&second, "mk"), device);
    assert!(key_rows(&second, &["wa_sessions"], "mk") >= signal_sessions);
    let args: Vec<String> = on_pg(&second);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let c = Server::start_in(&file_dir, &args);
    c.wait_state("mk", "online");
    send_and_see_it_decrypted(&peer, &c, "mk", "home again in PostgreSQL");
    let errors = peer.stats().signal_errors;
    assert!(errors.is_empty(), "{errors:?}");
}

/// With the webhook backlog full (its receiver failing), a received message is not taken:
/// the durability hook refuses it, so it stays unacknowledged rather than acknowledged
/// with its event dropped. Once the receiver answers and the backlog drains, WhatsApp's
/// redelivery at the next login brings it, and it is kept, acknowledged and delivered.
#[test]
fn a_full_webhook_backlog_leaves_received_messages_unacknowledged() {
    let peer = Peer::start();
    let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (hook, got) = common::json_receiver_while(up.clone());
    let s = start(
        &peer,
        &[
            "--webhook-url",
            &hook,
            "--webhook-secret",
            "real-link-webhook-secret-0123",
            "--webhook-backlog-max",
            "3",
            "--webhook-retry-max",
            "1s",
            "--webhook-max-attempts",
            "1000",
        ],
    );
    s.create("wa_full", "15551234567");
    assert_eq!(s.post("/api/sessions/wa_full/stop", None).status, 200);
    seed_paired(&s, "wa_full", "Sender");
    assert_eq!(s.post("/api/sessions/wa_full/start", None).status, 200);
    s.wait_state("wa_full", "online");
    wait_until(10, "the client uploads its pre-keys", || {
        peer.stats().pre_key_uploads >= 1
    });
    // The session's state events fill the backlog: its receiver answers 500.
    let id = "3EB0FULL000000000001";
    peer.command(Command::Send {
        from: "15557654321".into(),
        to: "15551234567".into(),
        id: id.into(),
        content: Content::Text("wait for room".into()),
    });
    let log = s.data_dir.join(common::SERVER_LOG);
    wait_until(30, "the hook refuses the message", || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("webhook backlog is full")
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !acknowledged(&peer, id),
        "not acknowledged while it cannot be kept"
    );
    let metrics = s.get("/metrics").body;
    assert!(
        metrics.lines().any(
            |l| l.starts_with("botvisor_webhook_refused_messages_total ") && !l.ends_with(" 0")
        ),
        "{metrics}"
    );

    // The receiver answers again; the backlog drains; the next login brings the message.
    up.store(true, std::sync::atomic::Ordering::SeqCst);
    // Drained as the server counts it (the refusal reads that count, which the
    // dispatcher renews about once a second), not merely delivered.
    wait_until(20, "the backlog drains", || {
        got.lock().unwrap().len() >= 4
            && s.get("/metrics")
                .body
                .lines()
                .any(|l| l == "botvisor_webhook_backlog 0")
    });
    peer.command(Command::Close);
    wait_until(30, "the redelivered message is acknowledged", || {
        acknowledged(&peer, id)
    });
    wait_until(15, "the webhook gets it", || {
        got.lock()
            .unwrap()
            .iter()
            .any(|v| v["data"]["messageId"] == id)
    });
}

/// A number check goes to WhatsApp (the peer) as a usync contact query: a number with an
/// account is answered with its JID, one without (`without_account`) is not.
#[test]
fn a_number_check_asks_whatsapp_which_numbers_have_an_account() {
    let (peer, s, _) = online_with_webhook("wa_chk");
    peer.without_account("15550000000");
    let r = s.post(
        "/api/sessions/wa_chk/contacts/check",
        Some(r#"{"phones":["15557654321","+15550000000"]}"#),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let results = r.json()["results"].as_array().unwrap().clone();
    assert_eq!(results.len(), 2, "{results:?}");
    assert_eq!(results[0]["phone"], "15557654321");
    assert_eq!(results[0]["onWhatsApp"], true, "{results:?}");
    assert_eq!(results[0]["jid"], "15557654321@s.whatsapp.net");
    assert_eq!(results[1]["phone"], "15550000000");
    assert_eq!(results[1]["onWhatsApp"], false, "{results:?}");
    assert!(results[1]["jid"].is_null());
}

/// A sender WhatsApp names by its LID alone is reported by its phone JID once a mapping
/// is known: before the number check the event says only the LID; the check's answer
/// (the peer's usync `lid`) is kept in the session's key store by the client, and the next
/// message from that LID says `from` = the phone JID, `fromLid` = the LID. A send to the
/// LID reaches the same account (one Signal identity for both names).
#[test]
fn a_lid_sender_is_reported_by_its_phone_once_a_number_check_gave_the_mapping() {
    let (peer, s, got) = online_with_webhook("wa_lid");
    let phone = "15550002222";
    let lid = format!("{}@lid", botvisor_wa_peer::lid_of(phone));
    let received = |id: &str| -> Option<serde_json::Value> {
        got_all(&got)
            .into_iter()
            .find(|v| v["event"] == "message.received" && v["data"]["messageId"] == id)
    };
    peer.command(Command::Send {
        from: lid.clone(),
        to: "15551234567".into(),
        id: "3EB0LID0000000000001".into(),
        content: Content::Text("from a hidden number".into()),
    });
    wait_until(15, "the LID's first message reaches the webhook", || {
        received("3EB0LID0000000000001").is_some()
    });
    let first = received("3EB0LID0000000000001").unwrap();
    eprintln!("before the mapping: {first}");
    assert_eq!(first["data"]["from"], lid.as_str(), "{first}");
    assert_eq!(first["data"]["fromLid"], lid.as_str(), "{first}");
    assert_eq!(first["data"]["pushName"], "Peer Contact", "{first}");

    let r = s.post(
        "/api/sessions/wa_lid/contacts/check",
        Some(&format!(r#"{{"phones":["{phone}"]}}"#)),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["results"][0]["lid"], lid.as_str(), "{}", r.body);

    peer.command(Command::Send {
        from: lid.clone(),
        to: "15551234567".into(),
        id: "3EB0LID0000000000002".into(),
        content: Content::Text("again, now known".into()),
    });
    wait_until(15, "the LID's second message reaches the webhook", || {
        received("3EB0LID0000000000002").is_some()
    });
    let second = received("3EB0LID0000000000002").unwrap();
    eprintln!("after the mapping: {second}");
    assert_eq!(
        second["data"]["from"],
        format!("{phone}@s.whatsapp.net"),
        "{second}"
    );
    assert_eq!(second["data"]["fromLid"], lid.as_str(), "{second}");
    assert_eq!(second["data"]["text"], "again, now known");

    // A send to the LID reaches the account, on the session its messages opened.
    let r = s.post(
        "/api/sessions/wa_lid/messages",
        Some(&serde_json::json!({"to": lid, "text": "to your LID"}).to_string()),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    wait_until(10, "the peer decrypts the send to the LID", || {
        peer.stats()
            .decrypted
            .iter()
            .any(|d| d.text.as_deref() == Some("to your LID"))
    });
    let st = peer.stats();
    assert!(st.signal_errors.is_empty(), "{:?}", st.signal_errors);
}

/// A contact's profile on the real link: the peer's usync user info (LID, "about",
/// picture id) and `w:profile:picture` (the URL) reach the API, with the push name the
/// contact's message carried (the stanza's `notify`, also in its `message.received`).
#[test]
fn a_profile_is_what_whatsapp_says_of_the_contact() {
    let (peer, s, got) = online_with_webhook("wa_prof");
    let phone = "15557654321";
    peer.command(Command::Send {
        from: phone.into(),
        to: "15551234567".into(),
        id: "3EB0PROF000000000001".into(),
        content: Content::Text("hello".into()),
    });
    wait_until(15, "the message reaches the webhook", || {
        got_all(&got)
            .iter()
            .any(|v| v["data"]["messageId"] == "3EB0PROF000000000001")
    });
    let event = got_all(&got)
        .into_iter()
        .find(|v| v["data"]["messageId"] == "3EB0PROF000000000001")
        .unwrap();
    assert_eq!(event["data"]["pushName"], "Peer Contact", "{event}");

    let r = s.get(&format!("/api/sessions/wa_prof/contacts/{phone}/profile"));
    assert_eq!(r.status, 200, "{}", r.body);
    let p = r.json()["profile"].clone();
    eprintln!("profile: {p}");
    assert_eq!(p["jid"], format!("{phone}@s.whatsapp.net"));
    assert_eq!(p["lid"], format!("{}@lid", botvisor_wa_peer::lid_of(phone)));
    assert_eq!(p["about"], botvisor_wa_peer::about_of(phone));
    assert_eq!(
        p["pictureId"],
        botvisor_wa_peer::picture_id_of(phone).to_string()
    );
    assert!(
        p["pictureUrl"]
            .as_str()
            .is_some_and(|u| u.ends_with(&format!("/pp/{phone}.jpg"))),
        "{p}"
    );
    assert_eq!(p["pushName"], "Peer Contact");
    assert_eq!(p["isBusiness"], false);
    assert!(peer.stats().picture_queries >= 1);

    // A number without an account: WhatsApp answers no picture.
    peer.without_account("15550000000");
    let r = s.get("/api/sessions/wa_prof/contacts/15550000000/profile");
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.json()["profile"]["pictureUrl"].is_null(), "{}", r.body);
    assert!(r.json()["profile"]["pushName"].is_null(), "{}", r.body);
}

/// Messages in a group go over sender keys, both ways: the client's text to a group of
/// two of the peer's users is one `skmsg`, with its sender key given to each member in a
/// pairwise `pkmsg`; both members decrypt it, and the second message on the same key
/// too. A member's message in the group (its sender key first, then `skmsg` alone)
/// becomes a `message.received` naming the group and its author.
#[test]
fn group_messages_go_both_ways_over_sender_keys() {
    let (peer, s, got) = online_with_webhook("wa_gmsg");
    let members = ["15557654321", "15550001111"];
    let r = s.post(
        "/api/sessions/wa_gmsg/groups",
        Some(r#"{"subject":"Crew","participants":["15557654321","15550001111"]}"#),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let group = r.json()["groupId"].as_str().unwrap().to_string();
    for text in ["first to the group ✓", "second, on the same sender key"] {
        let r = s.post(
            "/api/sessions/wa_gmsg/messages",
            Some(&serde_json::json!({"to": group, "text": text}).to_string()),
        );
        assert_eq!(r.status, 201, "{}", r.body);
        wait_until(15, "both members decrypt the group message", || {
            let st = peer.stats();
            members.iter().all(|m| {
                st.decrypted.iter().any(|d| {
                    d.kind == "skmsg" && d.to.starts_with(m) && d.text.as_deref() == Some(text)
                })
            })
        });
    }
    let st = peer.stats();
    assert!(st.signal_errors.is_empty(), "{:?}", st.signal_errors);

    for (n, text) in [(1, "hello crew"), (2, "and again")] {
        peer.command(Command::SendGroup {
            group: group.clone(),
            author: members[0].into(),
            to: "15551234567".into(),
            id: format!("3EB0GRP000000000000{n}"),
            content: Content::Text(text.into()),
        });
    }
    let received = |id: &str| {
        got_all(&got)
            .into_iter()
            .find(|v| v["event"] == "message.received" && v["data"]["messageId"] == id)
    };
    wait_until(15, "both group messages reach the webhook", || {
        received("3EB0GRP0000000000001").is_some() && received("3EB0GRP0000000000002").is_some()
    });
    for (id, text) in [
        ("3EB0GRP0000000000001", "hello crew"),
        ("3EB0GRP0000000000002", "and again"),
    ] {
        let v = received(id).unwrap();
        eprintln!("{v}");
        let d = &v["data"];
        assert_eq!(d["isGroup"], true, "{v}");
        assert_eq!(d["chat"], group.as_str(), "{v}");
        assert_eq!(d["author"], format!("{}@s.whatsapp.net", members[0]), "{v}");
        assert_eq!(d["from"], d["author"], "{v}");
        assert_eq!(d["text"], text, "{v}");
    }
    let st = peer.stats();
    assert!(st.signal_errors.is_empty(), "{:?}", st.signal_errors);
}

/// A vote on a poll the session sent, over the real link: the peer decrypts the poll,
/// keeps its secret, and votes with the option names hashed and encrypted as WhatsApp's
/// apps do; the client's `pollUpdateMessage` is opened with the secret whatsapp-rust kept
/// for the poll and the options botvisor kept, and becomes a `message.poll_vote` naming
/// the options picked. A second vote replaces the first (here: taken back, none).
#[test]
fn a_poll_vote_names_the_options_picked() {
    let (peer, s, got) = online_with_webhook("wa_vote");
    let r = s.post(
        "/api/sessions/wa_vote/messages",
        Some(r#"{"to":"15557654321","poll":{"question":"Lunch?","options":["pizza","soup","salad"],"selectable":2}}"#),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let poll = r.json()["messageId"].as_str().unwrap().to_string();
    wait_until(15, "the peer decrypts the poll", || {
        peer.stats().decrypted.iter().any(|d| d.id == poll)
    });
    let votes = |got: &Hooks| -> Vec<serde_json::Value> {
        got_all(got)
            .into_iter()
            .filter(|v| v["event"] == "message.poll_vote")
            .collect()
    };
    peer.vote("15557654321", "15551234567", &poll, &["salad", "pizza"])
        .unwrap();
    wait_until(15, "the vote's webhook", || !votes(&got).is_empty());
    let v = votes(&got).remove(0);
    eprintln!("{v}");
    assert_eq!(v["data"]["targetMessageId"], poll.as_str(), "{v}");
    // In the poll's order.
    assert_eq!(
        v["data"]["selectedOptions"],
        serde_json::json!(["pizza", "salad"]),
        "{v}"
    );
    assert_eq!(v["data"]["from"], "15557654321@s.whatsapp.net", "{v}");
    peer.vote("15557654321", "15551234567", &poll, &[]).unwrap();
    wait_until(15, "the second vote's webhook", || votes(&got).len() >= 2);
    let v = votes(&got).remove(1);
    assert_eq!(v["data"]["selectedOptions"], serde_json::json!([]), "{v}");
    let st = peer.stats();
    assert!(st.signal_errors.is_empty(), "{:?}", st.signal_errors);
}

/// Read receipts and presence go to WhatsApp (the peer): a received message marked read
/// through the API is receipted `read`; typing, recording and paused arrive as a
/// `chatstate`; the session's own presence as a `presence` stanza.
#[test]
fn a_chat_is_marked_read_and_shown_typing_on_whatsapp() {
    let (peer, s, _) = online_with_webhook("wa_read");
    let id = "3EB0READ000000000001";
    peer.command(Command::Send {
        from: "15557654321".into(),
        to: "15551234567".into(),
        id: id.into(),
        content: Content::Text("read me".into()),
    });
    wait_until(20, "the message is acknowledged", || {
        acknowledged(&peer, id)
    });
    let r = s.post(
        "/api/sessions/wa_read/chats/15557654321/read",
        Some(&format!(r#"{{"messageIds":["{id}"]}}"#)),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    wait_until(10, "the peer gets the read receipt", || {
        receipted(&peer, id, &["read"])
    });
    for (state, shown) in [
        ("typing", "composing"),
        ("recording", "composing audio"),
        ("paused", "paused"),
    ] {
        let r = s.post(
            "/api/sessions/wa_read/chats/15557654321%40s.whatsapp.net/presence",
            Some(&format!(r#"{{"state":"{state}"}}"#)),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        wait_until(10, "the peer gets the chat state", || {
            peer.stats()
                .chat_states
                .iter()
                .any(|(to, st)| to.starts_with("15557654321@") && st == shown)
        });
    }
    for state in ["unavailable", "available"] {
        let before = peer
            .stats()
            .presences
            .iter()
            .filter(|p| *p == state)
            .count();
        let r = s.post(
            "/api/sessions/wa_read/presence",
            Some(&format!(r#"{{"state":"{state}"}}"#)),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        wait_until(10, "the peer gets the presence", || {
            peer.stats()
                .presences
                .iter()
                .filter(|p| *p == state)
                .count()
                > before
        });
    }
}

/// The peer's decrypted messages that say something about `target` (`reaction …`,
/// `edit …`, `revoke …`, `reply to …`), as the peer's user saw them.
fn abouts(peer: &Peer, target: &str) -> Vec<String> {
    peer.stats()
        .decrypted
        .iter()
        .filter(|d| d.to.starts_with("15557654321"))
        .filter_map(|d| d.about.clone())
        .filter(|a| a.contains(target))
        .collect()
}

/// Reactions, a reply, an edit and a revoke go to WhatsApp (the peer) over Signal, each
/// naming its message by the id botvisor remembered: a reaction to a received message
/// and to a sent one (and its removal), a reply quoting the received message with its
/// author, an edit and a revoke of the sent one.
#[test]
fn reactions_replies_edits_and_revokes_reach_whatsapp() {
    let (peer, s, _) = online_with_webhook("wa_react");
    let theirs = "3EB0REACT00000000001";
    peer.command(Command::Send {
        from: "15557654321".into(),
        to: "15551234567".into(),
        id: theirs.into(),
        content: Content::Text("react to me".into()),
    });
    wait_until(20, "the message is acknowledged", || {
        acknowledged(&peer, theirs)
    });
    let r = s.post(
        &format!("/api/sessions/wa_react/messages/{theirs}/reaction"),
        Some(r#"{"emoji":"👍"}"#),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["chat"], "15557654321@s.whatsapp.net");
    wait_until(15, "the peer decrypts the reaction", || {
        abouts(&peer, theirs).contains(&format!("reaction 👍 to {theirs}"))
    });
    let r = s.post(
        "/api/sessions/wa_react/messages",
        Some(&format!(
            r#"{{"to":"15557654321","text":"an answer","replyTo":"{theirs}"}}"#
        )),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    wait_until(15, "the peer decrypts the reply", || {
        abouts(&peer, theirs).contains(&format!("reply to {theirs} by 15557654321@s.whatsapp.net"))
    });
    let r = s.post(
        "/api/sessions/wa_react/messages",
        Some(&format!(
            r#"{{"to":"15557654321","text":"@15557654321 see above","replyTo":"{theirs}","mentions":["15557654321","42@lid"]}}"#
        )),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    wait_until(15, "the peer decrypts the mentioning reply", || {
        abouts(&peer, theirs).contains(&format!(
            "reply to {theirs} by 15557654321@s.whatsapp.net; mentions 15557654321@s.whatsapp.net,42@lid"
        ))
    });

    let sent = s.post(
        "/api/sessions/wa_react/messages",
        Some(r#"{"to":"15557654321","text":"first text"}"#),
    );
    assert_eq!(sent.status, 201, "{}", sent.body);
    let mine = sent.json()["messageId"].as_str().unwrap().to_string();
    for (emoji, seen) in [("🎉", "reaction 🎉 "), ("", "reaction  ")] {
        let r = s.post(
            &format!("/api/sessions/wa_react/messages/{mine}/reaction"),
            Some(&format!(r#"{{"emoji":"{emoji}"}}"#)),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        wait_until(15, "the peer decrypts the reaction", || {
            abouts(&peer, &mine).contains(&format!("{seen}to {mine}"))
        });
    }
    let r = s.req(
        "PUT",
        &format!("/api/sessions/wa_react/messages/{mine}"),
        Some(r#"{"text":"second text"}"#),
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    wait_until(15, "the peer decrypts the edit", || {
        abouts(&peer, &mine).contains(&format!("edit {mine}: second text"))
    });
    let r = s.delete(&format!("/api/sessions/wa_react/messages/{mine}"));
    assert_eq!(r.status, 200, "{}", r.body);
    wait_until(15, "the peer decrypts the revoke", || {
        abouts(&peer, &mine).contains(&format!("revoke {mine}"))
    });
    let errors = peer.stats().signal_errors;
    assert!(errors.is_empty(), "{errors:?}");
}

/// A location (quoting a received message), a contact card and a poll go to WhatsApp (the
/// peer) over Signal as the messages WhatsApp's apps send: the peer decrypts each and
/// reads its fields. A queued send goes out under the id its 202 named.
#[test]
fn locations_contacts_and_polls_reach_whatsapp() {
    let (peer, s, _) = online_with_webhook("wa_kinds");
    let theirs = "3EB0KINDS00000000001";
    peer.command(Command::Send {
        from: "15557654321".into(),
        to: "15551234567".into(),
        id: theirs.into(),
        content: Content::Text("where are you?".into()),
    });
    wait_until(20, "the message is acknowledged", || {
        acknowledged(&peer, theirs)
    });
    let send = |body: &str| {
        let r = s.post("/api/sessions/wa_kinds/messages", Some(body));
        assert_eq!(r.status, 201, "{}", r.body);
        r.json()
    };
    let sent = send(&format!(
        r#"{{"to":"15557654321","location":{{"latitude":52.52,"longitude":13.405,"name":"Alexanderplatz"}},"replyTo":"{theirs}"}}"#
    ));
    assert_eq!(sent["kind"], "location");
    let place = sent["messageId"].as_str().unwrap().to_string();
    let sent =
        send(r#"{"to":"15557654321","contact":{"name":"Ada; Lovelace","phone":"15550001111"}}"#);
    let card = sent["messageId"].as_str().unwrap().to_string();
    let sent = send(
        r#"{"to":"15557654321","poll":{"question":"Lunch?","options":["pizza","soup","salad"],"selectable":2}}"#,
    );
    let poll = sent["messageId"].as_str().unwrap().to_string();
    let about = |id: &str| {
        peer.stats()
            .decrypted
            .iter()
            .filter(|d| d.to.starts_with("15557654321") && d.id == id)
            .filter_map(|d| d.about.clone())
            .next()
    };
    wait_until(15, "the peer decrypts all three", || {
        [&place, &card, &poll].iter().all(|id| about(id).is_some())
    });
    assert_eq!(
        about(&place).unwrap(),
        "location 52.52,13.405 Alexanderplatz"
    );
    let contact = about(&card).unwrap();
    assert!(
        contact.starts_with("contact Ada; Lovelace | BEGIN:VCARD")
            && contact.contains("FN:Ada\\; Lovelace")
            && contact.contains("waid=15550001111:+15550001111"),
        "{contact}"
    );
    assert_eq!(
        about(&poll).unwrap(),
        "poll Lunch? [pizza|soup|salad] pick 2"
    );
    // A queued send reaches WhatsApp under the id its 202 gave.
    let queued = s.post(
        "/api/sessions/wa_kinds/messages?queue=true",
        Some(r#"{"to":"15557654321","text":"queued hello"}"#),
    );
    assert_eq!(queued.status, 202, "{}", queued.body);
    let queued = queued.json()["messageId"].as_str().unwrap().to_string();
    wait_until(15, "the peer decrypts the queued text", || {
        peer.stats()
            .decrypted
            .iter()
            .any(|d| d.id == queued && d.text.as_deref() == Some("queued hello"))
    });
    // A poll is never a reply.
    let r = s.post(
        "/api/sessions/wa_kinds/messages",
        Some(&format!(
            r#"{{"to":"15557654321","poll":{{"question":"Q","options":["a","b"]}},"replyTo":"{theirs}"}}"#
        )),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    let errors = peer.stats().signal_errors;
    assert!(errors.is_empty(), "{errors:?}");
}

/// What WhatsApp (the peer) sends about other messages reaches the bot as events of their
/// own: a reply is a `message.received` with `replyTo`; a reaction, to a message the peer
/// sent and to one the session sent, is a `message.reaction` with `targetMessageId` and
/// `emoji`; an edit is a `message.edited` with the new text, a revoke a `message.revoked`.
#[test]
fn received_replies_and_reactions_name_their_message() {
    let (peer, s, got) = online_with_webhook("wa_got");
    let first = "3EB0GOT0000000000001";
    peer.command(Command::Send {
        from: "15557654321".into(),
        to: "15551234567".into(),
        id: first.into(),
        content: Content::Text("first".into()),
    });
    let sent = s.post(
        "/api/sessions/wa_got/messages",
        Some(r#"{"to":"15557654321","text":"from the bot"}"#),
    );
    assert_eq!(sent.status, 201, "{}", sent.body);
    let mine = sent.json()["messageId"].as_str().unwrap().to_string();
    for (id, content) in [
        (
            "3EB0GOT0000000000002",
            Content::Reply {
                text: "an answer".into(),
                quoted: first.into(),
                author: "15557654321@s.whatsapp.net".into(),
            },
        ),
        (
            "3EB0GOT0000000000003",
            Content::Reaction {
                target: first.into(),
                target_from_client: false,
                emoji: "❤".into(),
            },
        ),
        (
            "3EB0GOT0000000000004",
            Content::Reaction {
                target: mine.clone(),
                target_from_client: true,
                emoji: "👍".into(),
            },
        ),
        (
            "3EB0GOT0000000000008",
            Content::Document {
                file_name: "menu.pdf".into(),
                mimetype: "application/pdf".into(),
                caption: "today's menu".into(),
                size: 12_345,
                sha256: [0xab; 32],
            },
        ),
        (
            "3EB0GOT0000000000007",
            Content::Mention {
                text: "@15551234567 hello".into(),
                jids: vec!["15551234567@s.whatsapp.net".into()],
            },
        ),
        (
            "3EB0GOT0000000000005",
            Content::Edit {
                target: first.into(),
                text: "first, fixed".into(),
            },
        ),
        (
            "3EB0GOT0000000000006",
            Content::Revoke {
                target: "3EB0GOT0000000000002".into(),
            },
        ),
    ] {
        peer.command(Command::Send {
            from: "15557654321".into(),
            to: "15551234567".into(),
            id: id.into(),
            content,
        });
    }
    let event = |id: &str| {
        got_all(&got)
            .into_iter()
            .find(|v| v["data"]["messageId"] == id)
    };
    wait_until(20, "the seven webhooks", || {
        [
            "3EB0GOT0000000000002",
            "3EB0GOT0000000000003",
            "3EB0GOT0000000000004",
            "3EB0GOT0000000000005",
            "3EB0GOT0000000000006",
            "3EB0GOT0000000000007",
            "3EB0GOT0000000000008",
        ]
        .iter()
        .all(|id| event(id).is_some())
    });
    let doc = event("3EB0GOT0000000000008").unwrap();
    assert_eq!(doc["event"], "message.received", "{doc}");
    assert_eq!(doc["data"]["kind"], "document", "{doc}");
    assert_eq!(doc["data"]["mimetype"], "application/pdf", "{doc}");
    assert_eq!(doc["data"]["size"], 12_345, "{doc}");
    assert_eq!(doc["data"]["fileName"], "menu.pdf", "{doc}");
    assert_eq!(doc["data"]["caption"], "today's menu", "{doc}");
    assert_eq!(doc["data"]["sha256"], "ab".repeat(32), "{doc}");
    let reply = event("3EB0GOT0000000000002").unwrap();
    assert_eq!(reply["event"], "message.received", "{reply}");
    assert_eq!(reply["data"]["replyTo"], first, "{reply}");
    assert_eq!(reply["data"]["text"], "an answer", "{reply}");
    let heart = event("3EB0GOT0000000000003").unwrap();
    assert_eq!(heart["event"], "message.reaction", "{heart}");
    assert_eq!(heart["data"]["targetMessageId"], first, "{heart}");
    assert_eq!(heart["data"]["emoji"], "❤", "{heart}");
    let thumb = event("3EB0GOT0000000000004").unwrap();
    assert_eq!(thumb["event"], "message.reaction", "{thumb}");
    assert_eq!(thumb["data"]["targetMessageId"], mine.as_str(), "{thumb}");
    let mention = event("3EB0GOT0000000000007").unwrap();
    assert_eq!(mention["event"], "message.received", "{mention}");
    assert_eq!(
        mention["data"]["mentions"],
        serde_json::json!(["15551234567@s.whatsapp.net"]),
        "{mention}"
    );
    assert!(reply["data"].get("mentions").is_none(), "{reply}");
    let edit = event("3EB0GOT0000000000005").unwrap();
    assert_eq!(edit["event"], "message.edited", "{edit}");
    assert_eq!(edit["data"]["targetMessageId"], first, "{edit}");
    assert_eq!(edit["data"]["text"], "first, fixed", "{edit}");
    let revoke = event("3EB0GOT0000000000006").unwrap();
    assert_eq!(revoke["event"], "message.revoked", "{revoke}");
    assert_eq!(
        revoke["data"]["targetMessageId"], "3EB0GOT0000000000002",
        "{revoke}"
    );
    // The reply is itself a message the bot can react to; a reaction is not.
    let r = s.post(
        "/api/sessions/wa_got/messages/3EB0GOT0000000000002/reaction",
        Some(r#"{"emoji":"👍"}"#),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let r = s.post(
        "/api/sessions/wa_got/messages/3EB0GOT0000000000003/reaction",
        Some(r#"{"emoji":"👍"}"#),
    );
    assert_eq!(r.status, 404, "{}", r.body);
}

/// A media WhatsApp delivers is downloadable by its message's id: the client fetches the
/// encrypted bytes from the media host the peer names, checks and decrypts them, and the
/// answer is the very image the sender encrypted, with its type. A media whose bytes the
/// host does not have is a clean 502.
#[test]
fn received_media_is_downloaded_from_the_media_host_and_decrypted() {
    let (peer, s, got) = online_with_webhook("wa_dl");
    let image: Vec<u8> = b"\x89PNG\r\n\x1a\n"
        .iter()
        .copied()
        // Several of the chunks a download is streamed in (64 KiB), the last one short.
        .chain((0..300_000u32).map(|i| (i * 31 % 253) as u8))
        .collect();
    let content = peer.upload_image(&image, "image/png", "a picture");
    peer.command(Command::Send {
        from: "15557654321".into(),
        to: "15551234567".into(),
        id: "3EB0DL00000000000001".into(),
        content,
    });
    peer.command(Command::Send {
        from: "15557654321".into(),
        to: "15551234567".into(),
        id: "3EB0DL00000000000002".into(),
        content: Content::Document {
            file_name: "gone.pdf".into(),
            mimetype: "application/pdf".into(),
            caption: String::new(),
            size: 10,
            sha256: [1; 32],
        },
    });
    wait_until(20, "both media arrive", || {
        let all = got_all(&got);
        ["3EB0DL00000000000001", "3EB0DL00000000000002"]
            .iter()
            .all(|id| all.iter().any(|v| v["data"]["messageId"] == *id))
    });
    let (status, headers, body) =
        s.get_bytes("/api/sessions/wa_dl/messages/3EB0DL00000000000001/media");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(
        body == image,
        "the bytes differ ({} vs {})",
        body.len(),
        image.len()
    );
    assert!(
        headers
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("content-type") && v == "image/png"),
        "{headers:?}"
    );
    assert!(
        headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("content-length")
            && v == &image.len().to_string()),
        "{headers:?}"
    );
    // A document the peer's user sends, on the media host: the same bytes, its type.
    let document: Vec<u8> = b"%PDF-1.7\n"
        .iter()
        .copied()
        .chain((0..150_000u32).map(|i| (i * 17 % 241) as u8))
        .collect();
    let content = peer.upload_document(&document, "application/pdf", "minutes.pdf");
    peer.command(Command::Send {
        from: "15557654321".into(),
        to: "15551234567".into(),
        id: "3EB0DL00000000000003".into(),
        content,
    });
    wait_until(20, "the document arrives", || {
        got_all(&got)
            .iter()
            .any(|v| v["data"]["messageId"] == "3EB0DL00000000000003")
    });
    let event = got_all(&got)
        .into_iter()
        .find(|v| v["data"]["messageId"] == "3EB0DL00000000000003")
        .unwrap();
    assert_eq!(event["data"]["kind"], "document", "{event}");
    assert_eq!(event["data"]["fileName"], "minutes.pdf", "{event}");
    let (status, headers, body) =
        s.get_bytes("/api/sessions/wa_dl/messages/3EB0DL00000000000003/media");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(
        body == document,
        "the document differs ({} vs {})",
        body.len(),
        document.len()
    );
    assert!(
        headers
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("content-type") && v == "application/pdf"),
        "{headers:?}"
    );
    let r = s.get("/api/sessions/wa_dl/messages/3EB0DL00000000000002/media");
    assert!(r.error(502).contains("download failed"), "{}", r.body);
    assert_eq!(s.session("wa_dl")["state"], "online");
}

/// Groups on the real link go to WhatsApp as its `w:g2` queries, answered here by the
/// loopback peer (create, the groups a client is in, metadata, subject and description,
/// participants, invite codes, join, leave): the API's answers are what whatsapp-rust
/// read from WhatsApp's nodes, and what WhatsApp refuses as not found (a revoked code, a
/// group the account left) is a 404, the session still online.
#[test]
fn real_link_groups_are_managed_end_to_end_through_whatsapps_queries() {
    let (_peer, s, _got) = online_with_webhook("wa_grp");
    assert_eq!(s.get("/api/sessions/wa_grp/groups").json()["count"], 0);
    let r = s.post(
        "/api/sessions/wa_grp/groups",
        Some(r#"{"subject":"Team","participants":["15557654321"]}"#),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let v = r.json();
    let group = v["groupId"].as_str().unwrap().to_string();
    assert!(group.ends_with("@g.us"), "{v}");
    assert_eq!(v["group"]["subject"], "Team", "{v}");
    assert_eq!(v["group"]["size"], 2, "{v}");
    assert_eq!(v["group"]["owner"], "15551234567@s.whatsapp.net", "{v}");
    assert!(v["group"]["createdAt"].is_string(), "{v}");
    let people = v["group"]["participants"].as_array().unwrap().clone();
    assert!(
        people
            .iter()
            .any(|p| p["jid"] == "15551234567@s.whatsapp.net" && p["superAdmin"] == true),
        "{v}"
    );
    assert!(
        people
            .iter()
            .any(|p| p["jid"] == "15557654321@s.whatsapp.net" && p["admin"] == false),
        "{v}"
    );
    let list = s.get("/api/sessions/wa_grp/groups").json();
    assert_eq!(list["count"], 1, "{list}");
    assert_eq!(list["groups"][0]["groupId"], group.as_str(), "{list}");
    let info = s
        .get(&format!("/api/sessions/wa_grp/groups/{group}"))
        .json();
    assert_eq!(info["group"]["subject"], "Team", "{info}");
    // Subject and description.
    let r = s.req(
        "PATCH",
        &format!("/api/sessions/wa_grp/groups/{group}"),
        Some(r#"{"subject":"Team (EU)","description":"Write here"}"#),
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let info = s
        .get(&format!("/api/sessions/wa_grp/groups/{group}"))
        .json();
    assert_eq!(info["group"]["subject"], "Team (EU)", "{info}");
    assert_eq!(info["group"]["description"], "Write here", "{info}");
    // Participants, each answered as WhatsApp answered.
    let people = format!("/api/sessions/wa_grp/groups/{group}/participants");
    let r = s.post(
        &people,
        Some(r#"{"action":"add","participants":["15550009999","15557654321"]}"#),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let results = r.json()["results"].clone();
    assert_eq!(results[0]["ok"], true, "{results}");
    assert_eq!(results[1]["ok"], false, "already in: {results}");
    assert_eq!(results[1]["error"], "409", "{results}");
    let r = s.post(
        &people,
        Some(r#"{"action":"promote","participants":["15550009999"]}"#),
    );
    assert_eq!(r.json()["results"][0]["ok"], true, "{}", r.body);
    let info = s
        .get(&format!("/api/sessions/wa_grp/groups/{group}"))
        .json();
    assert!(
        info["group"]["participants"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["jid"] == "15550009999@s.whatsapp.net" && p["admin"] == true),
        "{info}"
    );
    let r = s.post(
        &people,
        Some(r#"{"action":"remove","participants":["15550009999"]}"#),
    );
    assert_eq!(r.json()["results"][0]["ok"], true, "{}", r.body);
    assert_eq!(
        s.get(&format!("/api/sessions/wa_grp/groups/{group}"))
            .json()["group"]["size"],
        2
    );
    // The invite link, revoked for a new one; leaving, and coming back by the link.
    let invite = s
        .get(&format!("/api/sessions/wa_grp/groups/{group}/invite"))
        .json();
    let first = invite["code"].as_str().unwrap().to_string();
    assert!(!first.is_empty(), "{invite}");
    let r = s.delete(&format!("/api/sessions/wa_grp/groups/{group}/invite"));
    assert_eq!(r.status, 200, "{}", r.body);
    let link = r.json()["inviteLink"].as_str().unwrap().to_string();
    assert!(!link.ends_with(&first), "a new code: {link}");
    let r = s.post(&format!("/api/sessions/wa_grp/groups/{group}/leave"), None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(s.get("/api/sessions/wa_grp/groups").json()["count"], 0);
    let r = s.get(&format!("/api/sessions/wa_grp/groups/{group}"));
    assert_eq!(r.status, 404, "no longer a member: {}", r.body);
    let r = s.post(
        "/api/sessions/wa_grp/groups/join",
        Some(&format!(r#"{{"code":"{}"}}"#, first)),
    );
    assert_eq!(r.status, 404, "a revoked code: {}", r.body);
    let r = s.post(
        "/api/sessions/wa_grp/groups/join",
        Some(&format!(r#"{{"code":"{link}"}}"#)),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["groupId"], group.as_str());
    assert_eq!(s.get("/api/sessions/wa_grp/groups").json()["count"], 1);
    assert_eq!(s.session("wa_grp")["state"], "online");
}
