//! The two engines behind botvisor's rows (`botvisor::db`: SQLite and PostgreSQL) give
//! the same answers to the same sequence of calls: sessions, their event log and its
//! pruning, settings, each session's receiver, and the webhook outbox (lanes, heads,
//! outcomes, the backlog, dead letters and their replay). Their numbered migrations
//! are checked too: a second open changes nothing, a newer schema is refused.
//!
//! PostgreSQL is real (tests/common/pg.rs); where it cannot start, its half prints
//! SKIPPED (or fails, with BOTVISOR_REQUIRE_POSTGRES=1).

use botvisor::db::{
    self, Batch, Change, Engine, EventRow, Location, MessageRow, OutboxRow, Outcome, QueuedRow,
    SessionReceiver, EVENTS_KEPT,
};
use botvisor_actors::{SessionRecord, SessionState};

mod common;

fn record(id: &str, at: u64) -> SessionRecord {
    let mut rec = SessionRecord::new(id.into(), "15550001111".into());
    rec.created_at_ms = at;
    rec.updated_at_ms = at;
    rec.name = Some(format!("näme of {id} ✓"));
    rec
}

fn outbox(event: &str, destination: &str, user: &str, at: u64) -> OutboxRow {
    OutboxRow {
        event_id: event.into(),
        destination: destination.into(),
        user_id: user.into(),
        kind: "session.state",
        body: format!(r#"{{"id":"{event}"}}"#),
        at_ms: at,
    }
}

/// Everything one engine answered, in order, as text (compared across engines).
fn exercise(engine: &mut dyn Engine) -> Vec<String> {
    let mut seen = Vec::new();
    let mut note = |what: &str, value: String| seen.push(format!("{what}: {value}"));

    // Sessions: inserted, changed, one deleted; with events and deliveries.
    let (a, mut b, c) = (record("a", 1_000), record("b", 2_000), record("c", 3_000));
    let events: Vec<EventRow> = (0..(EVENTS_KEPT as u64 + 20))
        .map(|i| {
            let mut rec = b.clone();
            rec.state = if i % 2 == 0 {
                SessionState::Online
            } else {
                SessionState::Disconnected
            };
            rec.updated_at_ms = 2_000 + i;
            rec.last_error = (i % 3 == 0).then(|| format!("drop {i}"));
            EventRow::of(&rec)
        })
        .collect();
    let rows = vec![
        outbox("e1", "http://r1/h", "a", 10),
        outbox("e2", "http://r1/h", "a", 11),
        outbox("e3", "http://r2/h", "a", 12),
        outbox("e4", "http://r1/h", "b", 13),
    ];
    let message =
        |user: &str, id: &str, author: Option<&str>, from_me: bool, at_ms: u64| MessageRow {
            user_id: user.into(),
            message_id: id.into(),
            chat: format!("{id}-chat@g.us"),
            author: author.map(Into::into),
            from_me,
            at_ms,
            media: None,
            media_size: None,
            media_type: None,
            poll_options: None,
        };
    // A received media's locator is kept with its message, and goes with it.
    let with_media = |mut m: MessageRow, size: Option<u64>| {
        m.media = Some(format!("sim:{}", m.message_id));
        m.media_size = size;
        m.media_type = Some("image/png".into());
        m
    };
    let messages = [
        with_media(
            message("a", "M1", Some("1555@s.whatsapp.net"), false, 100),
            Some(10),
        ),
        with_media(message("a", "M2", None, false, 5_000), None),
        // Known already: the first row stays.
        message("a", "M1", None, true, 200),
        with_media(message("c", "M3", None, false, 300), Some(7)),
        // A poll sent keeps its options with it.
        MessageRow {
            poll_options: Some(r#"["pizza","soup"]"#.into()),
            ..message("c", "P1", None, true, 400)
        },
    ];
    let queued_row = |user: &str, seq: u64| QueuedRow {
        user_id: user.into(),
        seq,
        message_id: format!("3EB0{user}{seq}"),
        body: format!(r#"{{"to":"1555","text":"{user}-{seq}"}}"#),
        at_ms: 1_000 + seq,
    };
    // Out of order, as concurrent sends may commit: the queue reads back in seq order.
    let queued = [
        queued_row("a", 2),
        queued_row("a", 1),
        queued_row("b", 5),
        queued_row("c", 3),
        queued_row("a", 10),
    ];
    let first = Batch {
        changes: vec![Change::Insert(&a), Change::Insert(&b), Change::Insert(&c)],
        rows: vec![],
        events: events.iter().collect(),
        outbox: &rows,
        messages: messages.iter().collect(),
        forget_messages_before: None,
        queued: &queued,
        dequeued: &[],
    };
    engine.commit(&first).unwrap();
    let order = |engine: &mut dyn Engine| -> Vec<(String, u64)> {
        let q = engine.queued().unwrap();
        q.into_iter().map(|r| (r.user_id, r.seq)).collect()
    };
    let want = |pairs: &[(&str, u64)]| -> Vec<(String, u64)> {
        pairs.iter().map(|(u, s)| (u.to_string(), *s)).collect()
    };
    assert_eq!(
        order(engine),
        want(&[("a", 1), ("a", 2), ("a", 10), ("b", 5), ("c", 3)])
    );
    note("queued", format!("{:?}", engine.queued().unwrap()));
    b.state = SessionState::Online;
    b.restarts = 3;
    b.last_seen_at_ms = Some(9_999);
    note(
        "messages",
        format!(
            "{:?} {:?} {:?} {:?}",
            engine.message("a", "M1").unwrap(),
            engine.message("a", "M2").unwrap(),
            engine.message("b", "M1").unwrap(),
            engine.message("c", "P1").unwrap()
        ),
    );
    let second = Batch {
        changes: vec![Change::Delete("c")],
        rows: vec![&b],
        events: vec![],
        outbox: &[],
        messages: vec![],
        forget_messages_before: Some(1_000),
        queued: &[],
        dequeued: &[queued_row("a", 1).key()],
    };
    engine.commit(&second).unwrap();
    assert_eq!(order(engine), want(&[("a", 2), ("a", 10), ("b", 5)]));
    note(
        "queued after one is done and its session deleted",
        format!("{:?}", engine.queued().unwrap()),
    );
    note(
        "messages forgotten and deleted with their session",
        format!(
            "{:?} {:?} {:?}",
            engine.message("a", "M1").unwrap(),
            engine.message("a", "M2").unwrap().map(|m| m.at_ms),
            engine.message("c", "M3").unwrap()
        ),
    );
    // The media rows went with their messages: only M2's is left.
    let media_table = botvisor::db::tables::TABLES
        .iter()
        .find(|t| t.name == "message_media")
        .unwrap();
    assert_eq!(engine.count(media_table).unwrap(), 1);
    // The poll went with its session.
    let polls_table = botvisor::db::tables::TABLES
        .iter()
        .find(|t| t.name == "message_polls")
        .unwrap();
    assert_eq!(engine.count(polls_table).unwrap(), 0);
    assert_eq!(engine.message("c", "P1").unwrap(), None);
    let sessions = engine.load_sessions().unwrap();
    note("sessions", format!("{sessions:?}"));
    let log = engine.events("b", 1_000).unwrap();
    note("events kept", log.len().to_string());
    note("newest events", format!("{:?}", &log[..3]));
    note("limited", format!("{:?}", engine.events("b", 2).unwrap()));
    note("none", format!("{:?}", engine.events("zz", 5).unwrap()));

    // Settings and receivers.
    note(
        "setting unset",
        format!("{:?}", engine.setting("link").unwrap()),
    );
    engine.set_setting("link", "sim").unwrap();
    engine.set_setting("link", "whatsapp").unwrap();
    note("setting", format!("{:?}", engine.setting("link").unwrap()));
    let receiver =
        |user: &str, url: &str, events: Option<&str>, secret: Option<&str>| SessionReceiver {
            user_id: user.into(),
            url: url.into(),
            events: events.map(Into::into),
            secret: secret.map(Into::into),
        };
    let with_options = receiver(
        "a",
        "http://own/a",
        Some("message.received,session.*"),
        Some("own-secret-0123456789"),
    );
    engine
        .set_session_webhook("a", Some(&with_options))
        .unwrap();
    let receivers = engine.session_webhooks().unwrap();
    assert_eq!(receivers, [with_options]);
    // A new URL without options clears them.
    let plain = receiver("a", "http://own/a2", None, None);
    engine.set_session_webhook("a", Some(&plain)).unwrap();
    engine
        .set_session_webhook("b", Some(&receiver("b", "http://own/b", Some("*"), None)))
        .unwrap();
    engine.set_session_webhook("b", None).unwrap();
    let receivers = engine.session_webhooks().unwrap();
    assert_eq!(receivers, [plain]);
    note("receivers", format!("{receivers:?}"));

    // The outbox: lanes, heads, outcomes.
    let mut heads = engine.outbox_heads().unwrap();
    heads.sort();
    note("heads", format!("{heads:?}"));
    note("backlog", engine.outbox_backlog().unwrap().to_string());
    let lane = ("http://r1/h".to_string(), "a".to_string());
    let head = engine.outbox_head(&lane).unwrap().unwrap();
    note(
        "head",
        format!(
            "{} {} {} {}",
            head.event_id, head.kind, head.body, head.attempts
        ),
    );
    engine
        .outbox_outcomes(&[Outcome::Delivered { id: head.id }])
        .unwrap();
    let next = engine.outbox_head(&lane).unwrap().unwrap();
    note("next head", format!("{} {}", next.event_id, next.next_at));
    engine
        .outbox_outcomes(&[Outcome::Retry {
            id: next.id,
            attempts: 1,
            next_at: 5_000,
            error: "refused",
        }])
        .unwrap();
    let retried = engine.outbox_head(&lane).unwrap().unwrap();
    note(
        "retried",
        format!(
            "{} {} {}",
            retried.event_id, retried.attempts, retried.next_at
        ),
    );
    let other = engine
        .outbox_head(&("http://r2/h".to_string(), "a".to_string()))
        .unwrap()
        .unwrap();
    engine
        .outbox_outcomes(&[
            Outcome::Dead {
                id: other.id,
                attempts: 5,
                error: "gone for good ✗",
            },
            Outcome::Dead {
                id: retried.id,
                attempts: 2,
                error: "timeout",
            },
        ])
        .unwrap();
    note(
        "backlog after",
        engine.outbox_backlog().unwrap().to_string(),
    );
    let dead = engine.dead_letters(10).unwrap();
    note("dead", format!("{dead:?}"));
    note(
        "dead limited",
        engine.dead_letters(1).unwrap().len().to_string(),
    );
    note(
        "replay none",
        engine.replay("nope", 7_000).unwrap().to_string(),
    );
    note("replay", engine.replay("e3", 7_000).unwrap().to_string());
    note(
        "replay again",
        engine.replay("e3", 7_000).unwrap().to_string(),
    );
    let mut heads = engine.outbox_heads().unwrap();
    heads.sort();
    note("heads after replay", format!("{heads:?}"));

    // A deleted session takes its events and receiver along (not its deliveries).
    let third = Batch {
        changes: vec![Change::Delete("a")],
        ..Batch::default()
    };
    engine.commit(&third).unwrap();
    note(
        "receivers after delete",
        format!("{:?}", engine.session_webhooks().unwrap()),
    );
    note(
        "sessions after delete",
        engine.load_sessions().unwrap().len().to_string(),
    );
    seen
}

#[test]
fn both_engines_answer_the_same_sequence_the_same_way() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rows.db").to_str().unwrap().to_string();
    let sqlite = Location::Sqlite(db::sqlite::Location::open(path, false).unwrap());
    let expected = exercise(&mut *sqlite.connect().unwrap());
    assert!(
        expected.iter().any(|l| l == "events kept: 100"),
        "{expected:#?}"
    );

    let Some(pg) = common::pg::server_or_skip("both_engines_answer_the_same_sequence_the_same_way")
    else {
        return;
    };
    let url = pg.fresh_database_url("rows_contract").unwrap();
    let rows = db::postgres::Rows::open(&url, Default::default()).unwrap();
    let postgres = Location::Postgres(rows);
    let got = exercise(&mut *postgres.connect().unwrap());
    for (i, (want, have)) in expected.iter().zip(&got).enumerate() {
        assert_eq!(
            want, have,
            "answer {i} differs between SQLite and PostgreSQL"
        );
    }
    assert_eq!(expected.len(), got.len());
}

#[test]
fn postgres_migrations_are_numbered_idempotent_and_refuse_a_newer_schema() {
    let Some(pg) = common::pg::server_or_skip(
        "postgres_migrations_are_numbered_idempotent_and_refuse_a_newer_schema",
    ) else {
        return;
    };
    let url = pg.fresh_database_url("rows_migrations").unwrap();
    let latest = db::postgres::MIGRATIONS.last().unwrap().0;
    let versions = || {
        pg.psql(
            &url,
            "SELECT string_agg(version::text, ',' ORDER BY version) FROM bv_schema_version",
        )
        .unwrap()
        .trim()
        .to_string()
    };
    let rows = db::postgres::Rows::open(&url, Default::default()).unwrap();
    let mut engine = rows.engine();
    engine.set_setting("kept", "yes").unwrap();
    drop(engine);
    drop(rows);
    let numbered: Vec<String> = db::postgres::MIGRATIONS
        .iter()
        .map(|(v, _)| v.to_string())
        .collect();
    assert_eq!(versions(), numbered.join(","));
    // Opened again: nothing applied twice, nothing lost.
    let rows = db::postgres::Rows::open(&url, Default::default()).unwrap();
    assert_eq!(
        rows.engine().setting("kept").unwrap().as_deref(),
        Some("yes")
    );
    assert_eq!(versions(), numbered.join(","));
    drop(rows);
    // A schema from a newer botvisor is refused, naming both versions.
    pg.psql(
        &url,
        &format!(
            "INSERT INTO bv_schema_version (version) VALUES ({})",
            latest + 1
        ),
    )
    .unwrap();
    let err = db::postgres::Rows::open(&url, Default::default())
        .err()
        .expect("a newer schema is refused")
        .to_string();
    assert!(
        err.contains(&format!("version {}", latest + 1)) && err.contains("newer"),
        "{err}"
    );
}

#[test]
fn one_server_per_postgres_database() {
    let Some(pg) = common::pg::server_or_skip("one_server_per_postgres_database") else {
        return;
    };
    let url = pg.fresh_database_url("rows_owner").unwrap();
    let first = db::postgres::Rows::open(&url, Default::default()).unwrap();
    let second = db::postgres::Rows::open(&url, Default::default());
    let err = second.err().expect("a second owner is refused").to_string();
    assert!(err.contains("another botvisor"), "{err}");
    drop(first);
    // The lock goes with its connection: once the first is gone, a new owner may start.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match db::postgres::Rows::open(&url, Default::default()) {
            Ok(_) => break,
            Err(e) if std::time::Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err(e) => panic!("the lock outlived its owner: {e}"),
        }
    }
}

/// Several nodes on one database (`db::nodes`): a node's writes for a session land only
/// while the session's row names it and the fence it holds. Once another node claimed
/// the session (its lease ran out), the first node's write is refused in the same
/// transaction, the rest of its batch lands, and the session is reported lost.
#[test]
fn a_write_with_a_stale_fence_is_refused_and_the_session_reported_lost() {
    use db::nodes::Standing;
    use std::time::Duration;
    let Some(pg) = common::pg::server_or_skip(
        "a_write_with_a_stale_fence_is_refused_and_the_session_reported_lost",
    ) else {
        return;
    };
    let url = pg.fresh_database_url("rows_fence").unwrap();
    let node = |id: &str| {
        let standing = Standing::new(id.into(), format!("http://{id}"), Duration::from_secs(30));
        let rows =
            db::postgres::Rows::open_as(&url, Default::default(), Some(standing.clone())).unwrap();
        let (epoch, sent) = rows.register(&standing, 0).unwrap().expect("registered");
        standing.registered(epoch, sent);
        (standing, rows)
    };
    let (a, rows_a) = node("a");
    let (b, rows_b) = node("b");
    let mut engine_a = Location::Postgres(rows_a.clone()).connect().unwrap();
    let (s1, s2) = (record("s1", 1), record("s2", 2));
    engine_a
        .commit(&Batch {
            changes: vec![Change::Insert(&s1), Change::Insert(&s2)],
            ..Default::default()
        })
        .unwrap();
    assert_eq!((a.fence_of("s1"), a.fence_of("s2")), (Some(1), Some(1)));
    // Nothing to claim while a's lease lives.
    assert!(rows_b.claim(&b, Duration::ZERO, 100).unwrap().is_empty());
    // a's lease runs out; b claims both (a fair share of two with one live node).
    pg.psql(
        &url,
        "UPDATE bv_nodes SET lease_until = now() - interval '1 minute' WHERE id = 'a'",
    )
    .unwrap();
    let claimed = rows_b.claim(&b, Duration::ZERO, 100).unwrap();
    let mut got: Vec<(String, i64)> = claimed
        .iter()
        .map(|(r, f)| (r.user_id.clone(), *f))
        .collect();
    got.sort();
    assert_eq!(got, [("s1".to_string(), 2), ("s2".to_string(), 2)]);
    // a, unaware, writes s1's state and an event; nothing of it lands.
    let mut stale = s1.clone();
    stale.state = SessionState::Stopped;
    stale.last_error = Some("written by a stale owner".into());
    let event = EventRow::of(&stale);
    let delivery = outbox("evt_stale", "http://receiver", "s1", 3);
    engine_a
        .commit(&Batch {
            rows: vec![&stale],
            events: vec![&event],
            outbox: std::slice::from_ref(&delivery),
            ..Default::default()
        })
        .unwrap();
    let rows = pg
        .rows(
            &url,
            "SELECT state, last_error, owner, fence FROM bv_sessions WHERE user_id = 's1'",
        )
        .unwrap();
    assert_eq!(
        rows[0],
        [
            Some("starting".into()),
            None,
            Some("b".into()),
            Some("2".into())
        ]
    );
    let stale_events = pg
        .psql(
            &url,
            "SELECT count(*) FROM bv_events WHERE state = 'stopped'",
        )
        .unwrap();
    assert_eq!(stale_events, "0");
    assert_eq!(
        pg.psql(&url, "SELECT count(*) FROM bv_outbox").unwrap(),
        "0"
    );
    assert_eq!(a.take_lost(), ["s1"]);
    assert_eq!(a.fence_of("s1"), None);
    // b's own write with its fence lands.
    b.hold("s1", 2);
    let mut fresh = s1.clone();
    fresh.state = SessionState::Online;
    let mut engine_b = Location::Postgres(rows_b).connect().unwrap();
    engine_b
        .commit(&Batch {
            rows: vec![&fresh],
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        pg.psql(&url, "SELECT state FROM bv_sessions WHERE user_id = 's1'")
            .unwrap(),
        "online"
    );
    // A create of an id another node owns is refused too.
    let again = record("s2", 9);
    engine_a
        .commit(&Batch {
            changes: vec![Change::Insert(&again)],
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        pg.psql(&url, "SELECT owner || ':' || fence || ':' || created_at FROM bv_sessions WHERE user_id = 's2'")
            .unwrap(),
        "b:2:2"
    );
    assert_eq!(a.take_lost(), ["s2"]);
}
