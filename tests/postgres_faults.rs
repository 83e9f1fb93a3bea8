//! The server on PostgreSQL when the database misbehaves: unreachable at start, stopped
//! and restarted under a running fleet, and a second server on the same database. Each
//! test has a PostgreSQL of its own (tests/common/pg.rs), since it stops it.

use std::time::{Duration, Instant};

mod common;
use common::pg::{self, PgServer};
use common::Server;

fn own_postgres(test: &str) -> Option<PgServer> {
    match PgServer::start() {
        Ok(server) => Some(server),
        Err(reason) => {
            pg::skip(test, &reason);
            None
        }
    }
}

#[test]
fn an_unreachable_database_at_start_is_one_line_naming_host_and_port_never_the_password() {
    let dir = tempfile::tempdir().unwrap();
    // A port nothing listens on (bound, then released).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://bot:hunter2secret@127.0.0.1:{port}/fleet");
    let started = Instant::now();
    let out = common::serve_command(dir.path(), "0", &["--database-url", &url])
        .output()
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "refused at once"
    );
    let line = common::refusal_line(&out);
    assert!(
        line.contains(&format!("127.0.0.1:{port}/fleet")) && line.contains("database unavailable"),
        "{line}"
    );
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!all.contains("hunter2secret"), "the password leaked: {all}");
}

/// The database stopped under a running fleet: writes answer 503 "database unavailable"
/// at once and half-create nothing, reads of the live view go on, no session leaves
/// `online`, and once the database is back the server works again by itself: what was
/// confirmed before is there, the writes queued meanwhile are committed, and the owner
/// lock is held again (a second server is still refused).
#[test]
fn a_database_restart_under_a_running_fleet_loses_nothing_and_heals_by_itself() {
    let Some(pg) =
        own_postgres("a_database_restart_under_a_running_fleet_loses_nothing_and_heals_by_itself")
    else {
        return;
    };
    let url = pg.fresh_database_url("faults").unwrap();
    let s = Server::start(&["--database-url", &url, "--sim-pair-delay", "100ms"]);
    for i in 0..5 {
        assert_eq!(s.create(&format!("before{i}"), "1234567890").status, 201);
    }
    for i in 0..5 {
        s.wait_state(&format!("before{i}"), "online");
    }
    let events_before: Vec<usize> = (0..5)
        .map(|i| s.events(&format!("before{i}")).len())
        .collect();

    pg.stop_immediate().expect("pg_ctl stop -m immediate");
    let r = s.create("during", "1234567890");
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.error(503).contains("database unavailable"), "{}", r.body);
    // Nothing half-created: the refused session is not there.
    assert_eq!(s.get("/api/sessions/during").status, 404);
    // The live view still answers.
    assert_eq!(s.session("before0")["state"], "online");
    std::thread::sleep(Duration::from_secs(2));
    pg.start_again().expect("start PostgreSQL again");

    // Back by itself: a create goes through within a few seconds.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = s.create("after", "1234567890");
        if r.status == 201 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the server did not recover: {} {}\n{}",
            r.status,
            r.body,
            std::fs::read_to_string(&s.log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    s.wait_state("after", "online");
    // No session flapped: every one is online with no new state change.
    for (i, before) in events_before.iter().enumerate() {
        let id = format!("before{i}");
        assert_eq!(s.session(&id)["state"], "online");
        assert_eq!(s.events(&id).len(), *before, "{id} changed state");
    }
    // Confirmed rows are in the database, as committed.
    let rows = pg
        .rows(
            &url,
            "SELECT user_id, state FROM bv_sessions ORDER BY user_id",
        )
        .unwrap();
    let ids: Vec<String> = rows.iter().filter_map(|r| r[0].clone()).collect();
    assert_eq!(
        ids,
        ["after", "before0", "before1", "before2", "before3", "before4"]
    );
    // The owner lock is held again: a second server on the database is refused.
    let other = tempfile::tempdir().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, err) = run_bounded(
            common::serve_command(other.path(), "0", &["--database-url", &url]),
            Duration::from_secs(15),
        );
        if code == Some(1) && err.contains("another botvisor") {
            break;
        }
        assert!(
            Instant::now() < deadline && code.is_some(),
            "a second server was not refused ({code:?}): {err}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // And the first one still serves.
    assert_eq!(s.get("/api/stats").status, 200);
}

/// Runs `cmd` to its end, or kills it after `limit` (`None`: it was still running).
fn run_bounded(mut cmd: std::process::Command, limit: Duration) -> (Option<i32>, String) {
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut err);
    }
    (code, err)
}
