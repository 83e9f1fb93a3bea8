//! `botvisor migrate`: a fleet moves from SQLite to PostgreSQL and back with every row,
//! served by a real server on each side; a copy killed half-way resumes; a database in
//! use, a target with rows of its own and a missing source are refused.
//!
//! Needs PostgreSQL (the harness starts Debian's server); prints SKIPPED without it, and
//! fails under `CI`.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{botvisor_bin, pg, Server};

fn migrate(from: &str, to: &str, extra: &[&str]) -> Output {
    Command::new(botvisor_bin())
        .args(["migrate", "--from", from, "--to", to])
        .args(extra)
        .env_remove("DATABASE_URL")
        .output()
        .expect("run botvisor migrate")
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// What a server shows of its fleet: each session's id, phone, name and desired state,
/// sorted.
fn fleet(s: &Server) -> Vec<(String, String, String, String)> {
    let list = s.get("/api/sessions").json();
    let mut out: Vec<_> = list["sessions"]
        .as_array()
        .expect("a sessions array")
        .iter()
        .map(|v| {
            (
                v["userId"].as_str().unwrap().to_string(),
                v["phoneNumber"].to_string(),
                v["name"].to_string(),
                v["desired"].to_string(),
            )
        })
        .collect();
    out.sort();
    out
}

/// A session's recorded states with their times, newest first.
fn history(s: &Server, id: &str) -> Vec<String> {
    s.events(id)
        .iter()
        .map(|e| format!("{}@{}", e["state"], e["at"]))
        .collect()
}

/// `now` is `then` with newer events in front (a server that starts adds its own).
fn kept(then: &[String], now: &[String]) -> bool {
    now.ends_with(then)
}

fn sqlite_rows(path: &Path, sql: &str) -> Vec<Vec<String>> {
    let conn = rusqlite::Connection::open(path).unwrap();
    let mut stmt = conn.prepare(sql).unwrap();
    let n = stmt.column_count();
    stmt.query_map([], |r| {
        (0..n)
            .map(|i| {
                Ok(match r.get_ref(i)? {
                    rusqlite::types::ValueRef::Null => "NULL".to_string(),
                    rusqlite::types::ValueRef::Integer(v) => v.to_string(),
                    rusqlite::types::ValueRef::Text(t) => String::from_utf8_lossy(t).into(),
                    other => format!("{other:?}"),
                })
            })
            .collect()
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

#[test]
fn a_fleet_moves_from_sqlite_to_postgresql_and_back_with_every_row() {
    let Some(pg) = pg::server_or_skip("a_fleet_moves_from_sqlite_to_postgresql_and_back") else {
        return;
    };
    let url = pg.fresh_database_url("migrate").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    std::fs::create_dir(&dir).unwrap();
    let sqlite = dir.join("botvisor.db");
    let sqlite_url = sqlite.to_str().unwrap().to_string();
    let db_flag = ["--database-url", sqlite_url.as_str()];
    // A fleet on SQLite: sessions in several states, a name with unicode, a session's own
    // receiver, and webhook deliveries still owed to a receiver that is down.
    let dead_receiver = "http://127.0.0.1:9/hook";
    let mut flags = db_flag.to_vec();
    flags.extend(["--webhook-url", dead_receiver, "--webhook-retry-max", "1h"]);
    flags.extend(["--webhook-secret", "a-secret-of-32-characters-------"]);
    let mut s = Server::start_in(&dir, &flags);
    for (id, phone) in [
        ("alice", "15550000001"),
        ("bob", "15550000002"),
        ("zoe_3", "15550000003"),
    ] {
        let r = s.create(id, phone);
        assert_eq!(r.status, 201, "{}", r.body);
    }
    for id in ["alice", "bob", "zoe_3"] {
        s.wait_state(id, "online");
    }
    assert_eq!(s.post("/api/sessions/bob/stop", None).status, 200);
    s.wait_state("bob", "stopped");
    let put = s.req(
        "PUT",
        "/api/sessions/alice/webhook",
        Some(r#"{"url":"http://127.0.0.1:9/alice"}"#),
        &[],
    );
    assert_eq!(put.status, 200, "{}", put.body);
    let ids = ["alice", "bob", "zoe_3"];
    let before = fleet(&s);
    let histories: Vec<_> = ids.iter().map(|id| history(&s, id)).collect();
    assert_eq!(s.terminate(), Some(0));
    let outbox = sqlite_rows(&sqlite, "SELECT count(*) FROM outbox")[0][0].clone();
    assert_ne!(outbox, "0", "deliveries are owed");

    // SQLite -> PostgreSQL.
    let out = migrate(&sqlite_url, &url, &[]);
    assert!(out.status.success(), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("verified"), "{said}");
    for table in [
        "sessions",
        "events",
        "outbox",
        "session_webhooks",
        "settings",
    ] {
        let in_pg = &pg
            .rows(&url, &format!("SELECT count(*) FROM bv_{table}"))
            .unwrap()[0][0];
        let in_sqlite = &sqlite_rows(&sqlite, &format!("SELECT count(*) FROM {table}"))[0][0];
        if table == "settings" {
            // The target also remembers the copy (migrate.source, migrate.state).
            let n: i64 = in_pg.clone().unwrap().parse().unwrap();
            assert_eq!(n, in_sqlite.parse::<i64>().unwrap() + 2, "{table}");
        } else {
            assert_eq!(in_pg.as_deref(), Some(in_sqlite.as_str()), "{table}");
        }
    }
    // Done once: again is refused (the target has rows now), --force copies over them.
    let again = migrate(&sqlite_url, &url, &[]);
    assert_eq!(again.status.code(), Some(1), "{}", text(&again));
    assert!(text(&again).contains("--force"), "{}", text(&again));
    let forced = migrate(&sqlite_url, &url, &["--force"]);
    assert!(forced.status.success(), "{}", text(&forced));

    // A server on PostgreSQL with the same data dir serves the same fleet, and its new
    // rows get new ids past the copied ones.
    let secret = ["--webhook-secret", "a-secret-of-32-characters-------"];
    let mut p = Server::start_in(
        &dir,
        &[&["--database-url", url.as_str()][..], &secret].concat(),
    );
    assert_eq!(fleet(&p), before, "the same sessions");
    for (id, then) in ids.iter().zip(&histories) {
        assert!(kept(then, &history(&p, id)), "{id}: {then:?} kept");
    }
    p.wait_state("alice", "online");
    p.wait_state("zoe_3", "online");
    assert_eq!(p.session("bob")["state"], "stopped", "stays stopped");
    let r = p.get("/api/sessions/alice/webhook");
    assert_eq!(r.json()["url"], "http://127.0.0.1:9/alice");
    assert_eq!(p.post("/api/sessions/bob/start", None).status, 200);
    p.wait_state("bob", "online");
    let moved = fleet(&p);
    let histories: Vec<_> = ids.iter().map(|id| history(&p, id)).collect();
    assert_eq!(p.terminate(), Some(0));

    // PostgreSQL -> a new SQLite file, and a server on it shows the same.
    let back_dir = tmp.path().join("back");
    let back = back_dir.join("botvisor.db"); // made by the copy
    let out = migrate(&url, back.to_str().unwrap(), &[]);
    assert!(out.status.success(), "{}", text(&out));
    let b = Server::start_in(
        &back_dir,
        &[&["--database-url", back.to_str().unwrap()][..], &secret].concat(),
    );
    assert_eq!(
        b.get("/api/sessions/alice/webhook").json()["url"],
        "http://127.0.0.1:9/alice"
    );
    assert_eq!(fleet(&b), moved);
    for (id, then) in ids.iter().zip(&histories) {
        assert!(kept(then, &history(&b, id)), "{id}: {then:?} kept");
    }
}

#[test]
fn a_killed_copy_resumes_and_busy_full_or_missing_databases_are_refused() {
    let Some(pg) = pg::server_or_skip("a_killed_copy_resumes") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    std::fs::create_dir(&dir).unwrap();
    let sqlite = dir.join("botvisor.db");
    let sqlite_url = sqlite.to_str().unwrap().to_string();
    let mut s = Server::start_in(&dir, &["--database-url", &sqlite_url]);
    assert_eq!(s.create("big", "15550000009").status, 201);
    s.wait_state("big", "online");

    // In use: the server holds the data dir, so its database is not copied.
    let url = pg.fresh_database_url("resume").unwrap();
    let busy = migrate(&sqlite_url, &url, &[]);
    assert_eq!(busy.status.code(), Some(1), "{}", text(&busy));
    assert!(
        text(&busy).contains("in use by another botvisor"),
        "{}",
        text(&busy)
    );
    assert_eq!(s.terminate(), Some(0));

    // Many rows, so that a kill lands in the middle.
    const EVENTS: i64 = 60_000;
    {
        let mut conn = rusqlite::Connection::open(&sqlite).unwrap();
        let tx = conn.transaction().unwrap();
        {
            let mut insert = tx
                .prepare("INSERT INTO events (user_id, at, state, detail) VALUES ('big', ?1, 'online', ?2)")
                .unwrap();
            for i in 0..EVENTS {
                insert
                    .execute(rusqlite::params![i, format!("filler {i}")])
                    .unwrap();
            }
        }
        tx.commit().unwrap();
    }
    let total: i64 = sqlite_rows(&sqlite, "SELECT count(*) FROM events")[0][0]
        .parse()
        .unwrap();
    let mut child = Command::new(botvisor_bin())
        .args([
            "migrate",
            "--from",
            &sqlite_url,
            "--to",
            &url,
            "--batch",
            "500",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let count = |sql: &str| -> i64 {
        pg.rows(&url, sql)
            .ok()
            .and_then(|r| r.first().and_then(|r| r[0].clone()))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while count("SELECT count(*) FROM bv_events") < 2_000 {
        assert!(Instant::now() < deadline, "the copy did not start");
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before the kill"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let partial = count("SELECT count(*) FROM bv_events");
    assert!(partial < total, "killed half-way: {partial} of {total}");
    assert_eq!(
        pg.rows(
            &url,
            "SELECT value FROM bv_settings WHERE key = 'migrate.state'"
        )
        .unwrap(),
        vec![vec![Some("copying".to_string())]]
    );

    // The same command again resumes (no --force needed) and ends with every row.
    let out = migrate(&sqlite_url, &url, &["--batch", "5000"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("resuming"),
        "{}",
        text(&out)
    );
    assert_eq!(count("SELECT count(*) FROM bv_events"), total);
    assert_eq!(count("SELECT count(DISTINCT id) FROM bv_events"), total);
    assert_eq!(
        pg.rows(
            &url,
            "SELECT value FROM bv_settings WHERE key = 'migrate.state'"
        )
        .unwrap(),
        vec![vec![Some("done".to_string())]]
    );

    // A target with a fleet of its own is refused; a missing source too, and nothing is
    // created for it.
    let other = tmp.path().join("other.db");
    let full = migrate(&url, other.to_str().unwrap(), &[]);
    assert!(full.status.success(), "{}", text(&full));
    let refused = migrate(&sqlite_url, other.to_str().unwrap(), &[]);
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    assert!(text(&refused).contains("already has"), "{}", text(&refused));
    let missing = tmp.path().join("nowhere/botvisor.db");
    let none = migrate(missing.to_str().unwrap(), &url, &[]);
    assert_eq!(none.status.code(), Some(1), "{}", text(&none));
    assert!(
        text(&none).contains("there is no database at"),
        "{}",
        text(&none)
    );
    assert!(!missing.exists());
    let same = migrate(&sqlite_url, &sqlite_url, &[]);
    assert!(text(&same).contains("the same database"), "{}", text(&same));
}
