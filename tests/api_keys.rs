//! Scoped API keys over real sockets: every route × every scope × a session in and out of
//! the key's set, walked from the route table itself; a `shop_` key that cannot see,
//! touch or stream `other_1`; revocation and expiry on the next request, across a
//! restart; the secret in no file of the data dir and no log line, even at debug.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use botvisor::http::access::SCOPES;
use botvisor::http::router::{whole_fleet, ROUTES};
use common::Server;
use serde_json::Value;

const ADMIN: &str = "admin-k3y-0123456789abcdefghijklmn";
const AS_ADMIN: [(&str, &str); 1] = [("X-API-Key", ADMIN)];

/// A new key (its secret and id), made with the admin key.
fn make_key(s: &Server, scopes: &[&str], sessions: &[&str], extra: &str) -> (String, String) {
    let body = serde_json::json!({"scopes": scopes, "sessions": sessions}).to_string();
    let body = match extra {
        "" => body,
        more => format!("{},{more}}}", &body[..body.len() - 1]),
    };
    let r = s.req("POST", "/api/keys", Some(&body), &AS_ADMIN);
    assert_eq!(r.status, 201, "{}", r.body);
    let v = r.json();
    let key = v["key"].as_str().unwrap().to_string();
    assert!(
        key.starts_with("bvk_") && key.len() >= 4 + 16 + 1 + 64,
        "{key}"
    );
    (key, v["id"].as_str().unwrap().to_string())
}

/// The status of one request, read from the status line only (an event stream never
/// ends).
fn status(s: &Server, method: &str, path: &str, key: &str) -> u16 {
    let mut conn = TcpStream::connect(s.addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let body = if matches!(method, "POST" | "PUT") {
        "{}"
    } else {
        ""
    };
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nX-API-Key: {key}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(req.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n") {
        match conn.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    let line = String::from_utf8_lossy(&head);
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("{method} {path}: no status line: {line:?}"))
}

/// A route's path with its parameters filled in, `:id` as `session`.
fn concrete(path: &str, session: &str) -> String {
    path.replace(":id", session)
        .replace(":messageId", "3EB0000000000000")
        .replace(":chatId", "15550001111")
        .replace(":contactId", "15550001111")
        .replace(":eventId", "evt_0000")
        .replace(":keyId", "0000000000000000")
        .replace(":groupId", "120363000000000001")
        .replace(":nodeId", "n1")
}

#[test]
fn every_route_answers_each_scope_and_hides_sessions_out_of_the_set() {
    let s = Server::start(&["--api-key", ADMIN, "--protect-reads"]);
    for id in ["in_1", "out_1"] {
        let r = s.req(
            "POST",
            "/api/sessions",
            Some(&format!(
                r#"{{"userId":"{id}","phoneNumber":"15550001111"}}"#
            )),
            &AS_ADMIN,
        );
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let mut checked = 0;
    for (set, all) in [(&["in_*"][..], false), (&["*"][..], true)] {
        for (name, scope) in SCOPES {
            let (key, _) = make_key(&s, &[name], set, "");
            for r in ROUTES.iter().filter(|r| !r.public) {
                let sessions: &[&str] = if r.path.contains("/:id") {
                    &["in_1", "out_1"]
                } else {
                    &["-"]
                };
                for session in sessions {
                    let path = concrete(r.path, session);
                    let got = status(&s, r.method.as_str(), &path, &key);
                    let allowed = r.scope.is_none_or(|need| need == scope || name == "admin");
                    let expected = if *session == "out_1" && !all {
                        Some(404)
                    } else if !allowed || (whole_fleet(r) && !all) {
                        Some(403)
                    } else {
                        None
                    };
                    match expected {
                        Some(want) => assert_eq!(
                            got, want,
                            "{} {path} with a {name} key for {set:?}",
                            r.method
                        ),
                        None => assert!(
                            got != 401 && got != 403,
                            "{} {path} with a {name} key for {set:?}: {got}",
                            r.method
                        ),
                    }
                    checked += 1;
                }
            }
        }
        if !all {
            // No key for in_* touched out_1 (in_1 may be gone: delete and logout keys
            // were allowed to).
            let r = s.req("GET", "/api/sessions/out_1", None, &AS_ADMIN);
            assert_eq!(r.status, 200, "{}", r.body);
        }
    }
    assert!(checked > 400, "the walk covered only {checked} requests");
}

/// Opens `/api/events` with `key` and returns the connection.
fn stream(s: &Server, key: &str) -> TcpStream {
    let mut conn = TcpStream::connect(s.addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    write!(
        conn,
        "GET /api/events HTTP/1.1\r\nHost: x\r\nX-API-Key: {key}\r\n\r\n"
    )
    .unwrap();
    conn
}

/// Reads from `conn` until `done` holds on all of it, or `secs` pass.
fn read_until(conn: &mut TcpStream, secs: u64, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut buf = String::new();
    let mut chunk = [0u8; 8192];
    while !done(&buf) && Instant::now() < deadline {
        if let Ok(n) = conn.read(&mut chunk) {
            if n == 0 {
                break;
            }
            buf.push_str(&String::from_utf8_lossy(&chunk[..n]));
        }
    }
    buf
}

/// Waits (10 s at most) for `id` to be online, read with the admin key.
fn online(s: &Server, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v: Value = s
            .req("GET", &format!("/api/sessions/{id}"), None, &AS_ADMIN)
            .json();
        if v["state"] == "online" {
            return;
        }
        assert!(Instant::now() < deadline, "{id} never came online: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_shop_key_cannot_see_touch_or_stream_other_sessions() {
    let s = Server::start(&["--api-key", ADMIN, "--protect-reads"]);
    let (key, _) = make_key(
        &s,
        &["read", "send", "control", "pairing", "webhooks", "delete"],
        &["shop_*"],
        r#""note":"the shop's bots""#,
    );
    let as_shop = [("X-API-Key", key.as_str())];
    let mut events = stream(&s, &key);
    // The key creates its own sessions, never another prefix.
    let r = s.req(
        "POST",
        "/api/sessions",
        Some(r#"{"userId":"shop_1","phoneNumber":"15550001111"}"#),
        &as_shop,
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let r = s.req(
        "POST",
        "/api/sessions",
        Some(r#"{"userId":"other_2","phoneNumber":"15550001112"}"#),
        &as_shop,
    );
    assert!(r.error(403).contains("other_2"));
    let r = s.req(
        "POST",
        "/api/sessions",
        Some(r#"{"userId":"other_1","phoneNumber":"15550001113"}"#),
        &AS_ADMIN,
    );
    assert_eq!(r.status, 201, "{}", r.body);
    for id in ["shop_1", "other_1"] {
        online(&s, id);
    }
    // Lists, stats and one session: only shop_1.
    let list = s.req("GET", "/api/sessions", None, &as_shop).json();
    assert_eq!(list["count"], 1, "{list}");
    assert_eq!(list["sessions"][0]["userId"], "shop_1");
    let stats = s.req("GET", "/api/stats", None, &as_shop).json();
    assert_eq!(stats["totalUsers"], 1, "{stats}");
    assert_eq!(
        s.req("GET", "/api/stats", None, &AS_ADMIN).json()["totalUsers"],
        2
    );
    // Exactly what a session that does not exist answers.
    let missing = s
        .req("GET", "/api/sessions/nobody", None, &AS_ADMIN)
        .error(404)
        .replace("nobody", "other_1");
    for (method, path) in [
        ("GET", "/api/sessions/other_1"),
        ("GET", "/api/sessions/other_1/pairing"),
        ("GET", "/api/sessions/other_1/qr"),
        ("GET", "/api/sessions/other_1/events"),
        ("POST", "/api/sessions/other_1/stop"),
        ("POST", "/api/sessions/other_1/logout"),
        ("DELETE", "/api/sessions/other_1"),
    ] {
        let r = s.req(method, path, None, &as_shop);
        assert_eq!(r.error(404), missing, "{method} {path}");
    }
    // The dashboard page renders only what the key may see.
    let page = s.req("GET", "/", None, &as_shop).body;
    assert!(page.contains("shop_1") && !page.contains("other_1"));
    // /metrics is the whole fleet's: not for a key that reaches some sessions.
    assert_eq!(s.req("GET", "/metrics", None, &as_shop).status, 403);
    // Changes to both: the key's stream carries shop_1's, none of other_1's.
    for id in ["other_1", "shop_1"] {
        let r = s.req("POST", &format!("/api/sessions/{id}/stop"), None, &AS_ADMIN);
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let seen = read_until(&mut events, 10, |b| {
        b.contains(r#""userId":"shop_1","state":"stopped""#)
    });
    assert!(
        seen.contains(r#""userId":"shop_1","state":"stopped""#),
        "{seen}"
    );
    assert!(
        seen.contains("pairingCode"),
        "the pairing scope gets codes: {seen}"
    );
    assert!(!seen.contains("other_1"), "{seen}");
    // The admin's view is whole, and the key is listed without its secret, with its use.
    assert_eq!(
        s.req("GET", "/api/sessions/other_1", None, &AS_ADMIN)
            .status,
        200
    );
    let keys = s.req("GET", "/api/keys", None, &AS_ADMIN);
    assert!(!keys.body.contains(&key), "{}", keys.body);
    let k = &keys.json()["keys"][0];
    assert_eq!(k["sessions"], serde_json::json!(["shop_*"]));
    assert_eq!(k["note"], "the shop's bots");
    assert!(k["lastUsedAt"].is_string(), "{k}");
    // A scoped key may not manage keys, even with every other scope.
    assert_eq!(s.req("GET", "/api/keys", None, &as_shop).status, 403);
}

#[test]
fn a_revoked_or_expired_key_is_refused_on_the_next_request_and_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--api-key", ADMIN];
    let mut s = Server::start_in(dir.path(), &flags);
    let (kept, _) = make_key(&s, &["read"], &["*"], "");
    let (revoked, revoked_id) = make_key(&s, &["read"], &["*"], "");
    let soon = botvisor::timefmt::iso(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
            + 1_500,
    );
    let (expiring, _) = make_key(&s, &["read"], &["*"], &format!(r#""expiresAt":"{soon}""#));
    for k in [&kept, &revoked, &expiring] {
        assert_eq!(
            s.req("GET", "/api/stats", None, &[("X-API-Key", k)]).status,
            200
        );
    }
    let r = s.req(
        "DELETE",
        &format!("/api/keys/{revoked_id}"),
        None,
        &AS_ADMIN,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    // Refused at once, even on a read that is open without a key.
    let r = s.req("GET", "/api/stats", None, &[("X-API-Key", &revoked)]);
    assert_eq!(r.error(401), "Invalid API key");
    assert_eq!(
        s.get("/api/stats").status,
        200,
        "reads stay open without a key"
    );
    let r = s.req(
        "DELETE",
        &format!("/api/keys/{revoked_id}"),
        None,
        &AS_ADMIN,
    );
    assert_eq!(r.status, 404);
    std::thread::sleep(Duration::from_millis(1_600));
    let r = s.req("GET", "/api/stats", None, &[("X-API-Key", &expiring)]);
    assert_eq!(r.error(401), "This API key has expired");
    s.terminate();
    let s = Server::start_in(dir.path(), &flags);
    assert_eq!(
        s.req("GET", "/api/stats", None, &[("X-API-Key", &kept)])
            .status,
        200
    );
    assert_eq!(
        s.req("GET", "/api/stats", None, &[("X-API-Key", &revoked)])
            .status,
        401
    );
    assert_eq!(
        s.req("GET", "/api/keys", None, &AS_ADMIN).json()["count"],
        2
    );
}

#[test]
fn bad_key_requests_get_clear_400s() {
    let s = Server::start(&["--api-key", ADMIN]);
    for (body, says) in [
        (r#"{"sessions":["*"]}"#, "scopes is required"),
        (r#"{"scopes":["read"]}"#, "sessions is required"),
        (r#"{"scopes":[],"sessions":["*"]}"#, "at least one scope"),
        (r#"{"scopes":["reed"],"sessions":["*"]}"#, "unknown scope"),
        (r#"{"scopes":"read","sessions":["*"]}"#, "list of strings"),
        (
            r#"{"scopes":["read"],"sessions":["../x"]}"#,
            "not a session id",
        ),
        (
            r#"{"scopes":["read"],"sessions":["*"],"expiresAt":"tomorrow"}"#,
            "ISO 8601",
        ),
    ] {
        let r = s.req("POST", "/api/keys", Some(body), &AS_ADMIN);
        assert!(r.error(400).contains(says), "{body}: {}", r.body);
    }
    assert_eq!(
        s.req("GET", "/api/keys", None, &AS_ADMIN).json()["count"],
        0
    );
    let past = r#"{"scopes":["read"],"sessions":["*"],"expiresAt":"2001-01-01T00:00:00Z"}"#;
    let r = s.req("POST", "/api/keys", Some(past), &AS_ADMIN);
    assert!(r.error(409).contains("in the past"), "{}", r.body);
    assert_eq!(
        s.req("GET", "/api/keys", None, &AS_ADMIN).json()["count"],
        0
    );
    let r = s.req("DELETE", "/api/keys/..", None, &AS_ADMIN);
    assert_eq!(r.status, 400);
}

/// Every file under `dir`, whole.
fn files_under(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else if let Ok(bytes) = std::fs::read(&path) {
            out.push((path, bytes));
        }
    }
    out
}

#[test]
fn the_secret_is_in_no_file_and_no_log_even_at_debug() {
    let s = Server::start_with_env(&["--api-key", ADMIN], &[("RUST_LOG", "debug")]);
    let (key, id) = make_key(&s, &["read", "control"], &["*"], "");
    let with = [("X-API-Key", key.as_str())];
    let r = s.req(
        "POST",
        "/api/sessions",
        Some(r#"{"userId":"sec_1","phoneNumber":"15550001111"}"#),
        &with,
    );
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(s.req("GET", "/api/sessions", None, &with).status, 200);
    assert_eq!(
        s.req("POST", "/api/sessions/sec_1/stop", None, &with)
            .status,
        200
    );
    let secret_part = key.rsplit('_').next().unwrap().to_string();
    let mut looked = 0;
    for (path, bytes) in files_under(&s.data_dir) {
        for needle in [&key, &secret_part] {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                "{} holds the key's secret",
                path.display()
            );
        }
        looked += 1;
    }
    assert!(looked >= 2, "the data dir has its database and log");
    // The audit trail names the key that made each change, by its id.
    let log = std::fs::read_to_string(&s.log).unwrap();
    assert!(
        log.lines().any(|l| l.contains("botvisor::audit")
            && l.contains(&format!("key=\"{id}\""))
            && l.contains("/api/sessions/sec_1/stop")),
        "no audit line for the stop: {log}"
    );
}

/// The `session.*` events' data in what a stream has read so far, in order.
fn events_in(raw: &str) -> Vec<Value> {
    raw.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str(d).ok())
        .collect()
}

#[test]
fn each_change_names_the_key_that_made_it_and_the_sessions_own_changes_name_none() {
    let s = Server::start(&["--api-key", ADMIN]);
    let (key, id) = make_key(&s, &["control", "delete"], &["shop_*"], "");
    let as_shop = [("X-API-Key", key.as_str())];
    let mut events = stream(&s, ADMIN);
    let r = s.req(
        "POST",
        "/api/sessions",
        Some(r#"{"userId":"shop_1","phoneNumber":"15550001111"}"#),
        &AS_ADMIN,
    );
    assert_eq!(r.status, 201, "{}", r.body);
    online(&s, "shop_1");
    let r = s.req("POST", "/api/sessions/shop_1/stop", None, &as_shop);
    assert_eq!(r.status, 200, "{}", r.body);
    let r = s.req("POST", "/api/sessions/shop_1/start", None, &AS_ADMIN);
    assert_eq!(r.status, 200, "{}", r.body);
    online(&s, "shop_1");
    let r = s.req("DELETE", "/api/sessions/shop_1", None, &as_shop);
    assert_eq!(r.status, 200, "{}", r.body);
    let raw = read_until(&mut events, 10, |b| b.contains("session.deleted"));
    let seen = events_in(&raw);
    let by = |state: &str| -> Vec<Value> {
        seen.iter()
            .filter(|e| e["state"] == state)
            .map(|e| e["by"].clone())
            .collect()
    };
    // Created by the admin; its pairing and coming online are the session's own doing.
    assert_eq!(by("starting").first(), Some(&Value::from("admin")), "{raw}");
    assert!(
        by("online").iter().all(Value::is_null),
        "online is never a key's doing: {raw}"
    );
    // Stopped by the shop's key (its id, never its secret); started again by the admin.
    assert_eq!(by("stopped"), vec![Value::from(id.as_str())], "{raw}");
    assert!(by("starting").contains(&Value::from("admin")), "{raw}");
    let deleted: Vec<&Value> = seen.iter().filter(|e| e.get("state").is_none()).collect();
    assert!(
        deleted.iter().any(|e| e["by"] == id.as_str()),
        "the delete is credited to the key: {raw}"
    );
    assert!(!raw.contains(&key), "no secret in any event");
}
