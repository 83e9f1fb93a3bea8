//! The PostgreSQL key store (`botvisor::keys::PgKeys`) at the edges the contract suite
//! (tests/keystore_contract.rs, one call at a time) does not reach: many tasks writing
//! batches into two sessions at once, and the server going away under the pool.
//!
//! Both need a real PostgreSQL, which the harness starts (tests/common/pg.rs); where it
//! cannot, they print SKIPPED (or fail, with BOTVISOR_REQUIRE_POSTGRES=1).

use std::sync::Arc;
use std::time::{Duration, Instant};

use botvisor::keys::{PgKeys, PgKeysConfig, PgSessionKeys};
use whatsapp_rust::bytes::Bytes;
use whatsapp_rust::wacore::store::error::StoreError;
use whatsapp_rust::wacore::store::traits::{PendingInboundRow, ProtocolStore, SignalStore};

mod common;

const TASKS: usize = 8;
const WRITES: usize = 100;

/// Keys every task of a session writes too, in a different order per task: two batches
/// locking the same rows in opposite orders would deadlock unless the store orders them.
const HOT: [&str; 3] = [
    "100000000000901:1@lid",
    "100000000000902:1@lid",
    "100000000000903:1@lid",
];

fn session_of(task: usize) -> &'static str {
    if task.is_multiple_of(2) {
        "a"
    } else {
        "b"
    }
}

fn address(task: usize, i: usize) -> String {
    format!("1000000{task:02}{i:06}:2@lid")
}

fn value(session: &str, task: usize, i: usize, kind: &str) -> Vec<u8> {
    format!("{kind} of session {session}, task {task}, write {i}").into_bytes()
}

/// One task's 100 writes, each a batch: Signal sessions, identities, sender keys and
/// pending inbound messages in turn, each with one key of its own and the hot keys.
async fn writer(store: PgSessionKeys, task: usize) {
    let session = session_of(task);
    for i in 0..WRITES {
        let own = address(task, i);
        let mut keys: Vec<&str> = vec![own.as_str()];
        if task % 4 < 2 {
            keys.extend(HOT);
        } else {
            keys.extend(HOT.iter().rev());
        }
        let result = match i % 4 {
            0 => {
                let batch: Vec<(Arc<str>, Bytes)> = keys
                    .iter()
                    .map(|k| {
                        (
                            Arc::from(*k),
                            Bytes::from(value(session, task, i, "session")),
                        )
                    })
                    .collect();
                store.put_sessions_batch(&batch).await
            }
            1 => {
                let batch: Vec<(Arc<str>, [u8; 32])> = keys
                    .iter()
                    .map(|k| (Arc::from(*k), [u8::try_from(task).unwrap_or(0); 32]))
                    .collect();
                store.put_identities_batch(&batch).await
            }
            2 => {
                let batch: Vec<(Arc<str>, Bytes)> = keys
                    .iter()
                    .map(|k| {
                        (
                            Arc::from(*k),
                            Bytes::from(value(session, task, i, "sender key")),
                        )
                    })
                    .collect();
                store.put_sender_keys_batch(&batch).await
            }
            _ => {
                let message = value(session, task, i, "message");
                let rows: Vec<PendingInboundRow<'_>> = keys
                    .iter()
                    .map(|k| PendingInboundRow {
                        chat: "120363000000000001@g.us",
                        sender: k,
                        id: "3EB0000000000001",
                        message: &message,
                    })
                    .collect();
                store.store_pending_inbound_batch(&rows).await
            }
        };
        if let Err(e) = result {
            panic!("task {task} write {i} (session {session}) failed: {e:?}");
        }
    }
}

/// Checks that every task's own rows are there, hold what that task wrote, and are not
/// in the other session; the hot keys hold a value some task of the same session wrote.
async fn check_all(keys: &PgKeys) {
    for task in 0..TASKS {
        let session = session_of(task);
        let store = keys.session(session);
        let other = keys.session(session_of(task + 1));
        for i in 0..WRITES {
            let own = address(task, i);
            let what = format!("task {task} write {i} (session {session}, {own})");
            match i % 4 {
                0 => {
                    let got = store.get_session(&own).await.expect("get_session");
                    assert_eq!(
                        got.as_deref(),
                        Some(value(session, task, i, "session").as_slice()),
                        "{what}"
                    );
                    assert_eq!(
                        other.get_session(&own).await.expect("get_session"),
                        None,
                        "{what}: seen by the other session"
                    );
                }
                1 => {
                    let got = store.load_identity(&own).await.expect("load_identity");
                    assert_eq!(got, Some([u8::try_from(task).unwrap_or(0); 32]), "{what}");
                    assert_eq!(
                        other.load_identity(&own).await.expect("load_identity"),
                        None,
                        "{what}: seen by the other session"
                    );
                }
                2 => {
                    let got = store.get_sender_key(&own).await.expect("get_sender_key");
                    assert_eq!(got, Some(value(session, task, i, "sender key")), "{what}");
                    assert_eq!(
                        other.get_sender_key(&own).await.expect("get_sender_key"),
                        None,
                        "{what}: seen by the other session"
                    );
                }
                _ => {
                    let got = store
                        .get_pending_inbound("120363000000000001@g.us", &own, "3EB0000000000001")
                        .await
                        .expect("get_pending_inbound");
                    assert_eq!(got, Some(value(session, task, i, "message")), "{what}");
                }
            }
        }
    }
    for session in ["a", "b"] {
        let store = keys.session(session);
        for hot in HOT {
            let got = store
                .get_session(hot)
                .await
                .expect("get_session")
                .expect("a hot key is there");
            let text = String::from_utf8_lossy(&got).into_owned();
            assert!(
                text.starts_with(&format!("session of session {session}, task ")),
                "hot key {hot} of session {session} holds {text:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn interleaved_batches_of_two_sessions_from_many_tasks_are_all_kept() {
    let test = "interleaved_batches_of_two_sessions_from_many_tasks_are_all_kept";
    let Some(server) = common::pg::server_or_skip(test) else {
        return;
    };
    let url = server.fresh_database(test).expect("create a database");
    // Fewer connections than tasks: they queue for connections as well as for rows. (Six:
    // enough overlap that unordered batches deadlock here at once.)
    let config = PgKeysConfig {
        pool_size: 6,
        ..PgKeysConfig::default()
    };
    let keys = PgKeys::open_with(&url, config.clone())
        .await
        .expect("open the key store");

    let tasks: Vec<_> = (0..TASKS)
        .map(|task| tokio::spawn(writer(keys.session(session_of(task)), task)))
        .collect();
    for task in tasks {
        task.await.expect("a writer task panicked");
    }

    // Every write was acknowledged, so every one must be there, also through a new pool.
    check_all(&keys).await;
    drop(keys);
    let keys = PgKeys::open_with(&url, config)
        .await
        .expect("reopen the key store");
    check_all(&keys).await;

    // Deleting one session's keys leaves the other's.
    let removed = keys.purge_session("a").await.expect("purge session a");
    // Four kinds of rows: each task's own 25 of each, and the hot keys.
    let per_kind = (TASKS / 2) * (WRITES / 4) + HOT.len();
    assert_eq!(removed, 4 * per_kind as u64);
    let a = keys.session("a");
    let b = keys.session("b");
    assert_eq!(a.get_session(HOT[0]).await.expect("get_session"), None);
    assert!(b.get_session(HOT[0]).await.expect("get_session").is_some());
    assert!(b
        .load_identity(&address(1, 1))
        .await
        .expect("load_identity")
        .is_some());
}

/// The one error a store call may answer while the server is away: a connection error,
/// not a hang (bounded here), not a panic.
async fn expect_connection_error(
    what: &str,
    call: impl std::future::Future<Output = Result<(), StoreError>>,
) {
    let answer = tokio::time::timeout(Duration::from_secs(60), call)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within 60 s (the store hung)"));
    match answer {
        Err(StoreError::Connection(e)) => eprintln!("{what}: {e}"),
        other => panic!("{what}: expected a connection error, got {other:?}"),
    }
}

async fn expect_ok<T: std::fmt::Debug>(
    what: &str,
    call: impl std::future::Future<Output = Result<T, StoreError>>,
) -> T {
    tokio::time::timeout(Duration::from_secs(60), call)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within 60 s (the store hung)"))
        .unwrap_or_else(|e| panic!("{what}: {e:?}"))
}

#[tokio::test]
async fn broken_connections_fail_one_call_and_the_pool_reconnects() {
    let test = "broken_connections_fail_one_call_and_the_pool_reconnects";
    // A server of its own: this test restarts it.
    let server = match common::pg::PgServer::start() {
        Ok(server) => server,
        Err(reason) => return common::pg::skip(test, &reason),
    };
    let url = server.fresh_database(test).expect("create a database");
    let keys = PgKeys::open_with(
        &url,
        PgKeysConfig {
            pool_size: 2,
            ..PgKeysConfig::default()
        },
    )
    .await
    .expect("open the key store");
    let store = keys.session("a");
    expect_ok(
        "write before the restart",
        store.put_identity("1@lid", [1; 32]),
    )
    .await;

    // Every backend killed at once; the pooled connection is now dead, and this thread
    // (a current-thread runtime, blocked in pg_ctl) has not yet seen it close.
    server
        .restart_immediate()
        .expect("pg_ctl restart -m immediate");
    expect_connection_error(
        "the first call after the restart (on the broken connection)",
        store.put_identity("2@lid", [2; 32]),
    )
    .await;
    // The broken connection was dropped: the next call gets a new one.
    expect_ok("the next call", store.put_identity("3@lid", [3; 32])).await;
    assert_eq!(
        expect_ok("read back", store.load_identity("1@lid")).await,
        Some([1; 32]),
        "a write acknowledged before the restart is kept"
    );
    assert_eq!(
        expect_ok("read back", store.load_identity("3@lid")).await,
        Some([3; 32])
    );

    // The server down: calls fail at once (refused), then work again once it is back.
    server.stop_immediate().expect("pg_ctl stop -m immediate");
    expect_connection_error(
        "a call while the server is down",
        store.put_identity("4@lid", [4; 32]),
    )
    .await;
    expect_connection_error(
        "another call while the server is down",
        store.store_sent_message("chat@lid", "ID", b"payload"),
    )
    .await;
    server.start_again().expect("pg_ctl start");
    expect_ok(
        "a call once the server is back",
        store.put_identity("5@lid", [5; 32]),
    )
    .await;
    assert_eq!(
        expect_ok("read back", store.load_identity("5@lid")).await,
        Some([5; 32])
    );
    drop(keys);

    // A server that stops answering with the socket still open (its backend frozen: what
    // a network cut looks like): the call gives up after the store's deadline (statement
    // timeout + 5 s) instead of hanging, and the next call gets a new connection.
    let url = format!("{url} application_name=frozen_backend");
    let keys = PgKeys::open_with(
        &url,
        PgKeysConfig {
            pool_size: 1,
            statement_timeout: Duration::from_secs(1),
            ..PgKeysConfig::default()
        },
    )
    .await
    .expect("open the key store");
    let store = keys.session("a");
    expect_ok(
        "warm the one connection",
        store.put_identity("6@lid", [6; 32]),
    )
    .await;
    let pid: i32 = server
        .psql(
            &url,
            "SELECT pid FROM pg_stat_activity \
             WHERE application_name = 'frozen_backend' AND pid <> pg_backend_pid()",
        )
        .expect("find the pool's backend")
        .parse()
        .expect("one backend pid");
    // SAFETY: signals a process of the server this test started.
    assert_eq!(
        unsafe { libc::kill(pid, libc::SIGSTOP) },
        0,
        "SIGSTOP {pid}"
    );
    let started = Instant::now();
    let answer = tokio::time::timeout(
        Duration::from_secs(60),
        store.put_identity("7@lid", [7; 32]),
    )
    .await;
    let waited = started.elapsed();
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    match answer {
        Ok(Err(StoreError::Connection(e))) => eprintln!("a frozen backend: {e} after {waited:?}"),
        Ok(other) => panic!("a frozen backend: expected a connection error, got {other:?}"),
        Err(_) => panic!("a frozen backend: the store hung for 60 s"),
    }
    assert!(
        waited >= Duration::from_secs(5) && waited < Duration::from_secs(30),
        "gave up after {waited:?}, not after about 6 s"
    );
    expect_ok("the call after", store.put_identity("8@lid", [8; 32])).await;
    assert_eq!(
        expect_ok("read back", store.load_identity("8@lid")).await,
        Some([8; 32])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn processes_opening_at_once_migrate_once_and_connections_have_the_timeout() {
    let test = "processes_opening_at_once_migrate_once_and_connections_have_the_timeout";
    let Some(server) = common::pg::server_or_skip(test) else {
        return;
    };
    let url = server.fresh_database(test).expect("create a database");
    // Three pools on an empty database at once, as three processes starting together:
    // the advisory lock lets one make the schema; the others wait, then find it made.
    let (a, b, c) = tokio::join!(PgKeys::open(&url), PgKeys::open(&url), PgKeys::open(&url));
    let keys = a.expect("first open");
    b.expect("second open");
    c.expect("third open");
    assert_eq!(keys.schema_version().await.expect("schema version"), 1);
    assert_eq!(
        server
            .psql(&url, "SELECT count(*) FROM wa_keys_schema_version")
            .expect("psql"),
        "1",
        "migration 1 recorded once"
    );
    // Opening again changes nothing.
    let again = PgKeys::open(&url).await.expect("open again");
    assert_eq!(again.schema_version().await.expect("schema version"), 1);

    assert_eq!(
        keys.setting("statement_timeout").await.expect("setting"),
        "10s"
    );
    let custom = PgKeys::open_with(
        &url,
        PgKeysConfig {
            statement_timeout: Duration::from_millis(2500),
            ..PgKeysConfig::default()
        },
    )
    .await
    .expect("open with a statement timeout");
    assert_eq!(
        custom.setting("statement_timeout").await.expect("setting"),
        "2500ms"
    );

    // A database at a schema version this build does not know is refused, not used.
    server
        .psql(
            &url,
            "INSERT INTO wa_keys_schema_version (version) VALUES (99)",
        )
        .expect("psql");
    match PgKeys::open(&url).await {
        Err(StoreError::Migration(e)) => assert!(e.to_string().contains("version 99"), "{e}"),
        other => panic!("a newer schema: expected a migration error, got {other:?}"),
    }
}

/// A handled message's pending-inbound delete is deferred: it rides with the next
/// message's insert, or goes on its own shortly after. No read sees the row meanwhile,
/// and a message stored again after its delete is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_inbound_deletes_ride_with_the_next_insert_or_go_shortly() {
    let test = "pending_inbound_deletes_ride_with_the_next_insert_or_go_shortly";
    let Some(server) = common::pg::server_or_skip(test) else {
        return;
    };
    let url = server.fresh_database(test).expect("create a database");
    let keys = PgKeys::open(&url).await.expect("open the key store");
    let store = keys.session("s");
    // A second handle on the same session has no deferred deletes of its own: what it
    // reads is what the database has.
    let database = keys.session("s");
    let stored = |id: &'static str| {
        let database = database.clone();
        async move {
            database
                .get_pending_inbound("chat", "sender", id)
                .await
                .unwrap()
        }
    };

    // The delete rides with the next insert.
    store
        .store_pending_inbound("chat", "sender", "1", b"one")
        .await
        .unwrap();
    store
        .delete_pending_inbound("chat", "sender", "1")
        .await
        .unwrap();
    assert_eq!(
        store
            .get_pending_inbound("chat", "sender", "1")
            .await
            .unwrap(),
        None
    );
    store
        .store_pending_inbound("chat", "sender", "2", b"two")
        .await
        .unwrap();
    assert_eq!(stored("1").await, None, "sent with the insert of 2");
    assert_eq!(stored("2").await.as_deref(), Some(&b"two"[..]));

    // Deleted, then received again: the new row stays.
    store
        .delete_pending_inbound("chat", "sender", "2")
        .await
        .unwrap();
    store
        .store_pending_inbound("chat", "sender", "2", b"two again")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(stored("2").await.as_deref(), Some(&b"two again"[..]));

    // Alone, a delete goes shortly after.
    store
        .delete_pending_inbound("chat", "sender", "2")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while stored("2").await.is_some() {
        assert!(
            Instant::now() < deadline,
            "the deferred delete was never sent"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rows = server
        .rows(&url, "SELECT count(*) FROM wa_pending_inbound")
        .unwrap();
    assert_eq!(rows, vec![vec![Some("0".to_string())]]);
}

/// A session with a row in every table is written to a whatsapp-rust key file and read
/// back into another session (`botvisor::keys::copy`): the same rows, and the getters of
/// the values each engine keeps in its own form answer the same. The target's old rows
/// are replaced, and a missing file leaves it empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_with_a_row_in_every_table_goes_to_a_key_file_and_back() {
    use botvisor::keys::copy::{file_to_session, session_to_file};
    use whatsapp_rust::wacore::appstate::hash::HashState;
    use whatsapp_rust::wacore::appstate::processor::AppStateMutationMAC;
    use whatsapp_rust::wacore::store::traits::{
        AppStateSyncKey, AppSyncStore, DeviceInfo, DeviceListRecord, DeviceStore,
        LidPnMappingEntry, MsgSecretEntry, MsgSecretStore, TcTokenEntry,
    };
    use whatsapp_rust::wacore::store::Device;

    let test = "a_session_with_a_row_in_every_table_goes_to_a_key_file_and_back";
    let Some(server) = common::pg::server_or_skip(test) else {
        return;
    };
    let url = server.fresh_database(test).expect("create a database");
    let keys = PgKeys::open(&url).await.expect("open the key store");
    let src = keys.session("src");
    let mut device = Device::new();
    device.push_name = "Copied Bot ✓".into();
    device.pn = Some("15551234567:7@s.whatsapp.net".parse().unwrap());
    src.save(&device).await.unwrap();
    src.put_identity("a@lid", [1; 32]).await.unwrap();
    src.put_session("a@lid", b"signal session").await.unwrap();
    src.store_prekeys_batch(&[(1, Bytes::from_static(b"p1"))], false)
        .await
        .unwrap();
    src.store_prekeys_batch(&[(2, Bytes::from_static(b"p2"))], true)
        .await
        .unwrap();
    src.store_signed_prekey(3, b"signed").await.unwrap();
    src.put_sender_key("g@g.us::a", b"sender key")
        .await
        .unwrap();
    let sync_key = |fill: u8| AppStateSyncKey {
        key_data: vec![fill; 32],
        fingerprint: vec![fill, 0xf0],
        timestamp: 1_700_000_000 + i64::from(fill),
    };
    // The latest key is the one stored last, which is also the highest id.
    src.set_sync_key(&[1], sync_key(1)).await.unwrap();
    src.set_sync_key(&[2], sync_key(2)).await.unwrap();
    let version = HashState {
        version: 9,
        hash: [7; 128],
        index_value_map: [("idx".to_string(), vec![1, 2, 3])].into_iter().collect(),
        mac_mismatch_fatal: true,
    };
    src.set_version("regular", version.clone()).await.unwrap();
    let mac = AppStateMutationMAC {
        index_mac: vec![4; 32],
        value_mac: vec![5; 32],
    };
    src.put_mutation_macs("regular", 9, &[mac]).await.unwrap();
    src.set_sender_key_status("g@g.us", &[("b:1@lid", true), ("c:2@lid", false)])
        .await
        .unwrap();
    let mapping = LidPnMappingEntry {
        lid: "100000000000001".into(),
        phone_number: "15557654321".into(),
        created_at: 1_700_000_001,
        updated_at: 1_700_000_002,
        learning_source: "usync".into(),
    };
    src.put_lid_mapping(&mapping).await.unwrap();
    src.save_base_key("a@lid", "m1", b"base").await.unwrap();
    let devices = DeviceListRecord {
        user: "15557654321".into(),
        devices: vec![DeviceInfo::new(0, None), DeviceInfo::new(3, Some(2))],
        timestamp: 1_700_000_003,
        phash: Some("2:abc".into()),
        raw_id: Some(77),
    };
    src.update_device_list(devices.clone()).await.unwrap();
    src.put_group_metadata("g@g.us", b"group info")
        .await
        .unwrap();
    let tc = TcTokenEntry {
        token: b"token".to_vec(),
        token_timestamp: 1_700_000_004,
        sender_timestamp: Some(1_700_000_005),
    };
    src.put_tc_token("15557654321@s.whatsapp.net", &tc)
        .await
        .unwrap();
    src.store_sent_message("15557654321@s.whatsapp.net", "s1", b"payload")
        .await
        .unwrap();
    src.store_pending_inbound_batch(&[PendingInboundRow {
        chat: "c",
        sender: "s",
        id: "i",
        message: b"inbound",
    }])
    .await
    .unwrap();
    src.put_msg_secrets(vec![MsgSecretEntry {
        chat: Arc::from("c"),
        sender: Arc::from("s"),
        msg_id: Arc::from("m"),
        secret: [9; 32],
        expires_at: 0,
        message_ts: 1_700_000_006,
    }])
    .await
    .unwrap();
    let listed = src.list_rows().await.unwrap();
    let per_table = [
        listed.identities.len(),
        listed.sessions.len(),
        listed.prekeys.len(),
        listed.signed_prekeys.len(),
        listed.sender_keys.len(),
        listed.sync_key_ids.len(),
        listed.version_names.len(),
        listed.macs.len(),
        listed.sender_key_devices.len(),
        listed.base_keys.len(),
        listed.device_users.len(),
        listed.group_metadata.len(),
        listed.sent_messages.len(),
        listed.pending_inbound.len(),
        listed.msg_secrets.len(),
    ];
    assert_eq!(per_table, [1, 1, 2, 1, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 1]);

    // Out to a file; the target already has a row the copy must replace.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.db");
    let written = session_to_file(&src, &file).await.unwrap();
    assert_eq!(
        written,
        listed.len() + 2,
        "plus the tc token and the mapping"
    );
    let dst = keys.session("dst");
    dst.put_identity("stale@lid", [8; 32]).await.unwrap();
    assert_eq!(file_to_session(&keys, &file, "dst").await.unwrap(), written);
    assert!(dst.list_rows().await.unwrap().same_as(&listed));
    assert_eq!(dst.load_identity("stale@lid").await.unwrap(), None);
    let back = dst.load().await.unwrap().expect("a device");
    assert_eq!(back.push_name, device.push_name);
    assert_eq!(back.registration_id, device.registration_id);
    assert_eq!(back.adv_secret_key, device.adv_secret_key);
    assert_eq!(back.pn, device.pn);
    let got = dst.get_version("regular").await.unwrap();
    assert_eq!(
        (got.version, got.hash, got.index_value_map),
        (version.version, version.hash, version.index_value_map)
    );
    assert_eq!(dst.get_latest_sync_key_id().await.unwrap(), Some(vec![2]));
    assert_eq!(
        dst.get_sync_key(&[1]).await.unwrap().map(|k| k.key_data),
        Some(vec![1; 32])
    );
    let got = dst.get_devices("15557654321").await.unwrap().unwrap();
    assert_eq!(
        (got.devices.len(), got.phash, got.raw_id),
        (2, devices.phash, devices.raw_id)
    );
    let got = dst
        .get_tc_token("15557654321@s.whatsapp.net")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (got.token, got.sender_timestamp),
        (tc.token, tc.sender_timestamp)
    );
    let got = dst.get_all_lid_mappings().await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].created_at, got[0].learning_source.as_str()),
        (mapping.created_at, "usync")
    );
    assert_eq!(
        dst.get_pending_inbound("c", "s", "i").await.unwrap(),
        Some(b"inbound".to_vec())
    );
    // No staging rows are left.
    assert_eq!(
        keys.session_ids().await.unwrap().len(),
        2,
        "src and dst only"
    );

    // A backup without keys restores to none.
    file_to_session(&keys, &dir.path().join("none.db"), "dst")
        .await
        .unwrap();
    assert!(dst.list_rows().await.unwrap().is_empty());
    assert!(!dst.exists().await.unwrap());
}

/// Several nodes on one database: a node writes a session's WhatsApp keys only while the
/// session's row names it with the fence it holds, checked in the write's own
/// transaction. Once another node claimed the session, the first node's write is refused
/// (and the session reported lost there), even though its own lease has not run out in
/// its own eyes.
#[test]
fn a_node_writes_a_session_s_keys_only_while_it_owns_the_session() {
    use botvisor::db::nodes::Standing;
    use botvisor::db::postgres::Rows;
    let test = "a_node_writes_a_session_s_keys_only_while_it_owns_the_session";
    let Some(server) = common::pg::server_or_skip(test) else {
        return;
    };
    let url = server.fresh_database_url("keys_fence").unwrap();
    let node = |id: &str| {
        let standing = Standing::new(id.into(), format!("http://{id}"), Duration::from_secs(30));
        let rows = Rows::open_as(&url, Default::default(), Some(standing.clone())).unwrap();
        let (epoch, sent) = rows.register(&standing, 0).unwrap().expect("registered");
        standing.registered(epoch, sent);
        (standing, rows)
    };
    let (a, rows_a) = node("a");
    let (b, rows_b) = node("b");
    let rec = botvisor_actors::SessionRecord::new("s1".into(), "15550001111".into());
    assert!(rows_a.reserve(&a, &rec).unwrap());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let keys = rt.block_on(PgKeys::open(&url)).unwrap();
    keys.set_node(a.clone());
    let store = keys.session("s1");
    rt.block_on(store.put_identity("1555:1@s.whatsapp.net", [1; 32]))
        .expect("the owner writes");
    for id in ["m1", "m2"] {
        rt.block_on(store.store_sent_message("chat@s.whatsapp.net", id, b"sent"))
            .expect("the owner writes");
    }
    rt.block_on(store.store_pending_inbound("chat", "sender", "p1", b"held"))
        .expect("the owner buffers a message");
    assert_eq!(
        rt.block_on(store.take_sent_message("chat@s.whatsapp.net", "m1"))
            .unwrap()
            .as_deref(),
        Some(&b"sent"[..]),
        "the owner takes a sent message"
    );
    // Not a's any more: its lease ran out in the database and b claimed the session.
    server
        .psql(
            &url,
            "UPDATE bv_nodes SET lease_until = now() - interval '1 minute' WHERE id = 'a'",
        )
        .unwrap();
    let claimed = rows_b.claim(&b, Duration::ZERO, 100).unwrap();
    assert_eq!(claimed.len(), 1);
    assert!(a.live(), "a still believes its lease holds");
    // Taking a sent message (a delete) is a write: checked in its own transaction.
    assert!(
        rt.block_on(store.take_sent_message("chat@s.whatsapp.net", "m2"))
            .is_err(),
        "a stale owner's take must be refused"
    );
    assert_eq!(a.take_lost(), ["s1"]);
    // As if a still believed it held the session with its old fence (the loss not seen
    // yet): the key write is refused in its own transaction.
    a.hold("s1", 1);
    // The pending-inbound buffer (group-committed with every session's): a stale owner's
    // rows are not written, and its deletes do not land.
    rt.block_on(store.store_pending_inbound("chat", "sender", "p2", b"stale"))
        .unwrap();
    rt.block_on(store.delete_pending_inbound("chat", "sender", "p1"))
        .unwrap();
    rt.block_on(store.delete_expired_pending_inbound(i64::MAX))
        .ok();
    assert_eq!(
        server
            .rows(
                &url,
                "SELECT id FROM wa_pending_inbound WHERE session_id = 's1'"
            )
            .unwrap(),
        vec![vec![Some("p1".to_string())]]
    );
    a.take_lost();
    a.hold("s1", 1);
    let refused = rt.block_on(store.put_identity("1555:1@s.whatsapp.net", [2; 32]));
    assert!(
        refused.is_err(),
        "a stale owner's key write must be refused"
    );
    assert_eq!(
        rt.block_on(store.load_identity("1555:1@s.whatsapp.net"))
            .unwrap(),
        Some([1; 32]),
        "the key is the one the owner wrote"
    );
    assert_eq!(a.take_lost(), ["s1"]);
    // Lost here: refused before any statement from now on; taking a sent message (a
    // delete) too, the message kept.
    assert!(rt
        .block_on(store.take_sent_message("chat@s.whatsapp.net", "m2"))
        .is_err());
    assert_eq!(
        server
            .rows(
                &url,
                "SELECT message_id FROM wa_sent_messages WHERE session_id = 's1'"
            )
            .unwrap(),
        vec![vec![Some("m2".to_string())]]
    );
    // A session this node never held: refused before any statement.
    let other = keys.session("s2");
    assert!(rt.block_on(other.put_identity("x", [3; 32])).is_err());
}
