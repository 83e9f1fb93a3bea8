//! Every endpoint of the LD7 contract, and every error, over real HTTP.

mod common;

use common::Server;
use serde_json::Value;

const EXISTS: &str =
    "Session already exists for this user. Delete it first or use a different userId.";
const BAD_ID: &str = "userId must be alphanumeric (a-z, 0-9, _, -)";
const KEY: &str = "k3y-for-tests-0123456789abcdef";

fn is_code(v: &Value) -> bool {
    let s = v.as_str().unwrap_or("");
    s.len() == 9
        && s.chars().enumerate().all(|(i, c)| {
            if i == 4 {
                c == '-'
            } else {
                c.is_ascii_uppercase() || c.is_ascii_digit()
            }
        })
}

#[test]
fn create_answers_201_with_a_pairing_code_in_the_spec_shape() {
    let s = Server::start(&[]);
    let r = s.create("bot_1234567890", "1234567890");
    assert_eq!(r.status, 201, "{}", r.body);
    let v = r.json();
    assert_eq!(v["success"], true);
    assert_eq!(
        v["message"],
        "Session created. Use the pairing code to connect."
    );
    assert_eq!(v["userId"], "bot_1234567890");
    assert!(is_code(&v["pairingCode"]), "{v}");
    assert!(v["expiresAt"].as_str().unwrap().ends_with('Z'));

    // The pairing endpoint shows the same live code.
    let p = s.get("/api/sessions/bot_1234567890/pairing").json();
    assert_eq!(p["success"], true);
    assert_eq!(p["pairingCode"], v["pairingCode"]);
    let expires = p["expiresAt"].as_str().unwrap();
    assert_eq!(expires.len(), "2024-01-15T12:30:00.000Z".len(), "{expires}");

    // Once paired it goes online, and there is no code any more.
    let info = s.wait_state("bot_1234567890", "online");
    assert_eq!(info["status"], "online");
    assert_eq!(info["name"], "Sim 1234567890");
    assert_eq!(info["phoneNumber"], "1234567890");
    let msg = s.get("/api/sessions/bot_1234567890/pairing").error(404);
    assert!(msg.contains("No pairing code"), "{msg}");

    assert_eq!(s.create("bot_1234567890", "1234567890").error(409), EXISTS);
}

#[test]
fn a_pairing_session_shows_its_qr_code_as_json_svg_and_png() {
    let s = Server::start(&["--sim-pair-delay", "30s", "--api-key", KEY]);
    let key = [("X-API-Key", KEY)];
    let r = s.req(
        "POST",
        "/api/sessions",
        Some(r#"{"userId":"qr1","phoneNumber":"15550001234"}"#),
        &key,
    );
    assert_eq!(r.status, 201, "{}", r.body);

    // Guarded like the pairing code.
    assert!(s.get("/api/sessions/qr1/qr").error(401).contains("API key"));
    let j = s.req("GET", "/api/sessions/qr1/qr", None, &key).json();
    assert_eq!(j["success"], true);
    assert_eq!(j["userId"], "qr1");
    let qr = j["qr"].as_str().unwrap();
    // The simulated link says so in its payload: it can never pass for a real code.
    assert!(qr.contains("SIMULATED"), "{qr}");
    assert!(j["expiresAt"].as_str().unwrap().ends_with('Z'));

    let svg = s.req("GET", "/api/sessions/qr1/qr?format=svg", None, &key);
    assert_eq!(svg.status, 200);
    assert_eq!(svg.header("content-type"), Some("image/svg+xml"));
    assert_eq!(svg.header("cache-control"), Some("no-store"));
    assert!(svg.body.contains("<svg"), "{}", svg.body);
    let by_accept = s.req(
        "GET",
        "/api/sessions/qr1/qr",
        None,
        &[("X-API-Key", KEY), ("Accept", "image/png")],
    );
    assert_eq!(by_accept.header("content-type"), Some("image/png"));
    assert!(by_accept.body.contains("PNG"), "a PNG signature");

    let bad = s.req("GET", "/api/sessions/qr1/qr?format=gif", None, &key);
    assert!(bad.error(400).contains("json, svg or png"));
    let none = s.req("GET", "/api/sessions/nobody/qr", None, &key);
    assert_eq!(none.error(404), "Session nobody not found");

    // Stopped: the code is gone with the pairing state.
    let stop = s.req("POST", "/api/sessions/qr1/stop", None, &key);
    assert_eq!(stop.status, 200, "{}", stop.body);
    let gone = s.req("GET", "/api/sessions/qr1/qr", None, &key).error(404);
    assert!(gone.contains("No QR code is pending"), "{gone}");
}

#[test]
fn health_and_readiness_probes_answer_without_a_key() {
    let s = Server::start(&["--api-key", KEY, "--protect-reads"]);
    let h = s.get("/healthz");
    assert_eq!(h.status, 200, "{}", h.body);
    assert_eq!(h.json()["status"], "ok");
    let r = s.get("/readyz").json();
    assert_eq!(r["ready"], true, "{r}");
    assert_eq!(r["store"], "ok");
    assert_eq!(r["supervisor"], "ok");
    assert_eq!(r["bootPending"], 0);
    // Everything else still needs the key.
    assert_eq!(s.get("/api/stats").status, 401);
}

#[test]
fn list_info_and_stats_follow_the_spec() {
    let s = Server::start(&[]);
    assert_eq!(s.create("a1", "1234567890").status, 201);
    assert_eq!(s.create("a2", "9876543210").status, 201);
    s.wait_state("a1", "online");
    s.wait_state("a2", "online");
    assert_eq!(s.post("/api/sessions/a2/stop", None).status, 200);

    let list = s.get("/api/sessions").json();
    assert_eq!(list["success"], true);
    assert_eq!(list["count"], 2);
    let sessions = list["sessions"].as_array().unwrap();
    assert_eq!(sessions[0]["userId"], "a1");
    assert_eq!(sessions[0]["status"], "online");
    assert_eq!(sessions[1]["status"], "offline");
    assert_eq!(sessions[1]["state"], "stopped");
    assert_eq!(sessions[1]["desired"], "stopped");
    for key in [
        "userId",
        "phoneNumber",
        "status",
        "name",
        "state",
        "desired",
        "restarts",
        "lastError",
        "createdAt",
        "updatedAt",
    ] {
        assert!(sessions[0].get(key).is_some(), "missing {key}");
    }

    let info = s.get("/api/sessions/a1").json();
    assert_eq!(info["success"], true);
    assert_eq!(info["userId"], "a1");

    let stats = s.get("/api/stats").json();
    assert_eq!(stats["success"], true);
    assert_eq!(stats["activeSessions"], 1);
    assert_eq!(stats["totalUsers"], 2);
    assert_eq!(stats["onlineSessions"], 1);

    assert_eq!(
        s.get("/api/sessions/nobody").error(404),
        "Session nobody not found"
    );
}

#[test]
fn start_stop_delete_and_logout_answer_with_the_spec_messages() {
    let s = Server::start(&[]);
    s.create("bot_1", "1234567890");
    s.wait_state("bot_1", "online");

    let r = s.post("/api/sessions/bot_1/stop", None).json();
    assert_eq!(r["message"], "Session bot_1 stopped");
    assert_eq!(s.session("bot_1")["state"], "stopped");

    let r = s.post("/api/sessions/bot_1/start", None).json();
    assert_eq!(r["success"], true);
    assert_eq!(r["message"], "Session started successfully");
    assert_eq!(r["userId"], "bot_1");
    // Credentials were kept: it comes back online without a new pairing.
    let v = s.wait_state("bot_1", "online");
    assert_eq!(v["restarts"], 0);

    let r = s.req("DELETE", "/api/sessions/bot_1", None, &[]).json();
    assert_eq!(r["message"], "Session bot_1 deleted");
    assert_eq!(s.get("/api/sessions/bot_1").status, 404);
    assert!(!s.data_dir.join("sessions/bot_1.db").exists());

    s.create("bot_2", "1234567890");
    s.wait_state("bot_2", "online");
    let r = s.post("/api/sessions/bot_2/logout", None).json();
    assert_eq!(r["message"], "Session bot_2 logged out and deleted");
    assert_eq!(s.get("/api/sessions/bot_2").status, 404);
    assert!(!s.data_dir.join("sessions/bot_2.db").exists());

    for action in ["start", "stop", "logout", "backup", "restore"] {
        assert_eq!(
            s.post(&format!("/api/sessions/ghost/{action}"), None)
                .status,
            404,
            "{action}"
        );
    }
    assert_eq!(
        s.req("DELETE", "/api/sessions/ghost", None, &[]).status,
        404
    );
}

#[test]
fn bad_input_gets_clear_errors_and_creates_nothing() {
    let s = Server::start(&[]);
    for bad in [
        r#"{"userId":"../etc","phoneNumber":"1234567890"}"#,
        r#"{"userId":"bot ü","phoneNumber":"1234567890"}"#,
        r#"{"userId":"","phoneNumber":"1234567890"}"#,
        r#"{"userId":42,"phoneNumber":"1234567890"}"#,
    ] {
        assert_eq!(
            s.post("/api/sessions", Some(bad)).error(400),
            BAD_ID,
            "{bad}"
        );
    }
    let long = format!(
        r#"{{"userId":"{}","phoneNumber":"1234567890"}}"#,
        "x".repeat(65)
    );
    assert_eq!(s.post("/api/sessions", Some(&long)).error(400), BAD_ID);
    for phone in [
        "+1234567890",
        "123",
        "12 34 56 78",
        "1234567890123456",
        "١٢٣٤٥٦٧٨٩",
    ] {
        let body = format!(r#"{{"userId":"ok","phoneNumber":"{phone}"}}"#);
        assert!(
            s.post("/api/sessions", Some(&body))
                .error(400)
                .contains("phoneNumber"),
            "{phone}"
        );
    }
    assert!(s
        .post("/api/sessions", Some(r#"{"phoneNumber":"1234567890"}"#))
        .error(400)
        .contains("userId is required"));
    assert!(s
        .post("/api/sessions", Some(r#"{"userId":"ok"}"#))
        .error(400)
        .contains("phoneNumber is required"));
    assert!(s
        .post("/api/sessions", Some("{not json"))
        .error(400)
        .contains("not valid JSON"));
    assert!(s
        .post("/api/sessions", Some("[1,2]"))
        .error(400)
        .contains("JSON object"));
    assert!(s
        .post("/api/sessions", Some(""))
        .error(400)
        .contains("empty"));

    // Wrong content type.
    let r = s.req(
        "POST",
        "/api/sessions",
        Some(r#"{"userId":"ok","phoneNumber":"1234567890"}"#),
        &[("Content-Type", "text/plain")],
    );
    assert!(r.error(415).contains("application/json"));
    // JSON with a charset parameter is fine.
    let r = s.req(
        "POST",
        "/api/sessions",
        Some(r#"{"userId":"cs","phoneNumber":"1234567890"}"#),
        &[("Content-Type", "application/json; charset=utf-8")],
    );
    assert_eq!(r.status, 201, "{}", r.body);

    // Oversized bodies: by declared length, and by actual bytes (chunked).
    let big = format!(
        r#"{{"userId":"big","phoneNumber":"1234567890","pad":"{}"}}"#,
        "x".repeat(70 * 1024)
    );
    assert!(s
        .post("/api/sessions", Some(&big))
        .error(413)
        .contains("64 KiB"));
    let mut chunked = String::from("POST /api/sessions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n");
    for _ in 0..80 {
        chunked.push_str(&format!("400\r\n{}\r\n", "x".repeat(1024)));
    }
    chunked.push_str("0\r\n\r\n");
    assert_eq!(
        s.raw(chunked.as_bytes()).error(413),
        "Request body too large (limit 64 KiB)"
    );

    // Ids in paths: traversal and odd characters never reach the disk.
    for path in [
        "/api/sessions/..%2F..%2Fetc/start",
        "/api/sessions/a.b",
        "/api/sessions/%C3%BC/pairing",
    ] {
        let method = if path.ends_with("start") {
            "POST"
        } else {
            "GET"
        };
        assert_eq!(s.req(method, path, None, &[]).error(400), BAD_ID, "{path}");
    }
    // Nothing half-created.
    let list = s.get("/api/sessions").json();
    assert_eq!(list["count"], 1, "{list}");
    assert_eq!(
        std::fs::read_dir(s.data_dir.join("sessions"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".db")
            })
            .count(),
        1
    );
}

#[test]
fn unknown_routes_and_methods_answer_in_the_spec_shape() {
    let s = Server::start(&[]);
    assert!(s.get("/nope").error(404).contains("Not found"));
    assert!(s
        .get("/api/sessions/a/b/c")
        .error(404)
        .contains("Not found"));
    assert!(s
        .post("/api/sessions/a/explode", None)
        .error(404)
        .contains("Not found"));
    let r = s.req("PUT", "/api/sessions", Some("{}"), &[]);
    r.error(405);
    assert_eq!(r.header("allow"), Some("GET, POST"));
    assert_eq!(
        s.post("/api/stats", None).error(405),
        "Method POST is not allowed on /api/stats; use GET"
    );
}

#[test]
fn concurrent_creates_of_one_id_make_exactly_one_session() {
    let s = Server::start(&[]);
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|_| scope.spawn(|| s.create("race", "1234567890").status))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(
        statuses.iter().filter(|&&c| c == 201).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|&&c| c == 409).count(),
        7,
        "{statuses:?}"
    );
    assert_eq!(s.get("/api/sessions").json()["count"], 1);
}

#[test]
fn api_key_guards_writes_and_leaves_reads_open() {
    let s = Server::start(&["--api-key", "k3y-for-tests-0123456789abcdef"]);
    let body = r#"{"userId":"guarded","phoneNumber":"1234567890"}"#;
    assert!(s
        .post("/api/sessions", Some(body))
        .error(401)
        .contains("X-API-Key"));
    assert_eq!(
        s.req(
            "POST",
            "/api/sessions",
            Some(body),
            &[("X-API-Key", "wrong")]
        )
        .error(401),
        "Invalid API key"
    );
    let ok = [("X-API-Key", "k3y-for-tests-0123456789abcdef")];
    assert_eq!(s.req("POST", "/api/sessions", Some(body), &ok).status, 201);
    // Reads the spec leaves open.
    for path in [
        "/",
        "/api/stats",
        "/api/sessions",
        "/api/sessions/guarded",
        "/api/sessions/guarded/events",
    ] {
        assert_eq!(s.get(path).status, 200, "{path}");
    }
    // The pairing code is a secret: guarded too.
    assert_eq!(s.get("/api/sessions/guarded/pairing").status, 401);
    assert_eq!(
        s.req("GET", "/api/sessions/guarded/pairing", None, &ok)
            .status,
        200
    );
    for action in ["start", "stop", "backup", "restore", "logout"] {
        assert_eq!(
            s.post(&format!("/api/sessions/guarded/{action}"), None)
                .status,
            401,
            "{action}"
        );
    }
    assert_eq!(
        s.req("DELETE", "/api/sessions/guarded", None, &[]).status,
        401
    );
    assert_eq!(s.fault("guarded", "panic").status, 401);
    // Nothing above changed the session.
    assert_eq!(s.get("/api/sessions").json()["count"], 1);
    assert_eq!(
        s.req("DELETE", "/api/sessions/guarded", None, &ok).status,
        200
    );
}

#[test]
fn a_bearer_token_works_like_the_api_key_header() {
    let key = "k3y-for-tests-0123456789abcdef";
    let s = Server::start(&["--api-key", key]);
    let body = r#"{"userId":"bearer","phoneNumber":"1234567890"}"#;
    let bearer = format!("Bearer {key}");
    let r = s.req(
        "POST",
        "/api/sessions",
        Some(body),
        &[("Authorization", &bearer)],
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let wrong = s.req(
        "POST",
        "/api/sessions/bearer/stop",
        None,
        &[("Authorization", "Bearer wrong")],
    );
    assert!(wrong.error(401).contains("Invalid API key"));
    // Reads stay open unless --protect-reads.
    assert_eq!(s.get("/api/sessions/bearer").status, 200);
}

#[test]
fn protect_reads_needs_the_key_for_every_route() {
    let key = "k3y-for-tests-0123456789abcdef";
    let s = Server::start(&["--api-key", key, "--protect-reads"]);
    for path in [
        "/",
        "/api/stats",
        "/api/sessions",
        "/api/sessions/x",
        "/api/sessions/x/events",
    ] {
        assert!(s.get(path).error(401).contains("API key"), "{path}");
    }
    let r = s.req("GET", "/api/stats", None, &[("X-API-Key", key)]);
    assert_eq!(r.status, 200, "{}", r.body);
    // Browsers' preflights still get their answer.
    let pre = s.req(
        "OPTIONS",
        "/api/stats",
        None,
        &[("Origin", "https://a.example")],
    );
    assert_eq!(pre.status, 204);
}

#[test]
fn cors_allows_any_origin_by_default_and_answers_preflight() {
    let s = Server::start(&[]);
    let r = s.req(
        "GET",
        "/api/stats",
        None,
        &[("Origin", "https://example.com")],
    );
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    let r = s.req(
        "OPTIONS",
        "/api/sessions",
        None,
        &[
            ("Origin", "https://example.com"),
            ("Access-Control-Request-Method", "POST"),
            ("Access-Control-Request-Headers", "content-type,x-api-key"),
        ],
    );
    assert_eq!(r.status, 204);
    assert!(r
        .header("access-control-allow-methods")
        .unwrap()
        .contains("POST"));
    assert!(r
        .header("access-control-allow-headers")
        .unwrap()
        .contains("X-API-Key"));
}

#[test]
fn cors_origin_flag_restricts_origins() {
    let s = Server::start(&[
        "--cors-origin",
        "https://ok.example",
        "--cors-origin",
        "https://also.example",
    ]);
    let r = s.req(
        "GET",
        "/api/stats",
        None,
        &[("Origin", "https://ok.example")],
    );
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://ok.example")
    );
    assert_eq!(r.header("vary"), Some("Origin"));
    let r = s.req(
        "GET",
        "/api/stats",
        None,
        &[("Origin", "https://evil.example")],
    );
    assert_eq!(r.header("access-control-allow-origin"), None);
    let r = s.req(
        "OPTIONS",
        "/api/sessions",
        None,
        &[
            ("Origin", "https://evil.example"),
            ("Access-Control-Request-Method", "POST"),
        ],
    );
    assert_eq!(r.error(403), "Origin not allowed");
    let r = s.req(
        "OPTIONS",
        "/api/sessions",
        None,
        &[
            ("Origin", "https://also.example"),
            ("Access-Control-Request-Method", "POST"),
        ],
    );
    assert_eq!(r.status, 204);
}

#[test]
fn dashboard_lists_sessions_with_escaped_text() {
    let s = Server::start(&[]);
    s.create("dash_1", "1234567890");
    let r = s.get("/");
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/html"));
    assert!(r.body.contains("dash_1"), "{}", r.body);
    assert!(r.body.contains("1 sessions"));
}

#[test]
fn backup_and_restore_bring_back_the_credentials() {
    let s = Server::start(&["--backup-keep", "2"]);
    s.create("bk", "1234567890");
    s.wait_state("bk", "online");
    let b1 = s.post("/api/sessions/bk/backup", None).json();
    assert_eq!(b1["success"], true);
    let id1 = b1["backupId"].as_str().unwrap().to_string();
    assert!(b1["createdAt"].as_str().unwrap().ends_with('Z'));
    let file = s.data_dir.join(format!("backups/bk/{id1}.db"));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // Lose the credentials (as a broken disk would): the session must pair again...
    assert_eq!(s.post("/api/sessions/bk/stop", None).status, 200);
    std::fs::remove_file(s.data_dir.join("sessions/bk.db")).unwrap();
    assert_eq!(s.post("/api/sessions/bk/start", None).status, 200);
    s.wait_state("bk", "pairing");
    // ...until the backup is restored (latest by default): straight back online.
    let r = s.post("/api/sessions/bk/restore", None).json();
    assert_eq!(r["success"], true, "{r}");
    assert_eq!(r["backupId"], id1);
    let v = s.wait_state("bk", "online");
    assert_eq!(v["name"], "Sim 1234567890");

    // Explicit id, unknown id, bad id; retention keeps the newest two.
    let id2 = s.post("/api/sessions/bk/backup", None).json()["backupId"]
        .as_str()
        .unwrap()
        .to_string();
    let id3 = s.post("/api/sessions/bk/backup", None).json()["backupId"]
        .as_str()
        .unwrap()
        .to_string();
    let list = s.get("/api/sessions/bk/backups").json();
    assert_eq!(list["backups"], serde_json::json!([id3, id2]));
    let r = s
        .post(
            "/api/sessions/bk/restore",
            Some(&format!(r#"{{"backupId":"{id2}"}}"#)),
        )
        .json();
    assert_eq!(r["backupId"], id2.as_str());
    assert!(s
        .post(
            "/api/sessions/bk/restore",
            Some(r#"{"backupId":"20990101T000000000Z"}"#)
        )
        .error(404)
        .contains("not found"));
    s.post(
        "/api/sessions/bk/restore",
        Some(r#"{"backupId":"../../botvisor"}"#),
    )
    .error(400);
    s.wait_state("bk", "online");

    // Delete removes the backups with the session ("all its data").
    assert_eq!(s.req("DELETE", "/api/sessions/bk", None, &[]).status, 200);
    assert!(!s.data_dir.join("backups/bk").exists());
}

#[test]
fn events_record_state_changes() {
    let s = Server::start(&[]);
    s.create("ev", "1234567890");
    s.wait_state("ev", "online");
    let states = s.states_once_newest_is("ev", "online");
    let states: Vec<&str> = states.iter().map(String::as_str).collect();
    assert_eq!(states.first(), Some(&"online"));
    assert!(
        states.contains(&"pairing") && states.contains(&"starting"),
        "{states:?}"
    );
}

#[test]
fn credential_and_database_files_are_private() {
    let s = Server::start(&[]);
    s.create("perm", "1234567890");
    s.wait_state("perm", "online");
    use std::os::unix::fs::PermissionsExt;
    // (On PostgreSQL the rows are in the database, not in botvisor.db.)
    let files: &[&str] = if common::test_engine_is_postgres() {
        &["sessions/perm.db"]
    } else {
        &["sessions/perm.db", "botvisor.db"]
    };
    for f in files {
        let mode = std::fs::metadata(s.data_dir.join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
}

/// `POST /api/sessions/:userId/contacts/check` on the simulated link: one answer per
/// number in the order asked (every number has an account but those starting with 999);
/// bad shapes are 400s, a session that is not online is a 409, an unknown one a 404.
#[test]
fn a_number_check_answers_each_number_in_order() {
    let s = Server::start(&["--sim-pair-delay", "50ms"]);
    assert_eq!(s.create("chk", "15550001111").status, 201);
    s.wait_state("chk", "online");
    let r = s.post(
        "/api/sessions/chk/contacts/check",
        Some(r#"{"phones":["15551234567","+99912345678","15551234567"]}"#),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["success"], true);
    assert_eq!(v["userId"], "chk");
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    assert_eq!(
        results[0],
        serde_json::json!({"phone": "15551234567", "onWhatsApp": true,
            "jid": "15551234567@s.whatsapp.net", "lid": null})
    );
    assert_eq!(
        results[1],
        serde_json::json!({"phone": "99912345678", "onWhatsApp": false, "jid": null, "lid": null})
    );
    assert_eq!(results[2], results[0]);

    for (body, says) in [
        (r#"{}"#, "phones must be an array"),
        (r#"{"phones":[]}"#, "phones must be an array"),
        (r#"{"phones":"15551234567"}"#, "phones must be an array"),
        (
            r#"{"phones":["555-1234"]}"#,
            "'555-1234' is not a phone number",
        ),
        (r#"{"phones":[15551234567]}"#, "phones must be an array"),
    ] {
        let msg = s
            .post("/api/sessions/chk/contacts/check", Some(body))
            .error(400);
        assert!(msg.contains(says), "{body}: {msg}");
    }
    let many = serde_json::json!({ "phones": vec!["15551234567"; 51] }).to_string();
    assert!(s
        .post("/api/sessions/chk/contacts/check", Some(&many))
        .error(400)
        .contains("1 to 50"));
    let body = Some(r#"{"phones":["15551234567"]}"#);
    assert!(s
        .post("/api/sessions/nobody/contacts/check", body)
        .error(404)
        .contains("not found"));
    assert_eq!(s.post("/api/sessions/chk/stop", None).status, 200);
    let msg = s.post("/api/sessions/chk/contacts/check", body).error(409);
    assert!(
        msg.contains("numbers can be checked only from an online session"),
        "{msg}"
    );
}

/// A contact's profile on the simulated link: the JID and the push name the contact's
/// messages gave (under its phone and its JID alike), nothing else; a bad contact id or a
/// bad push name is a 400, a session that is not online a 409.
#[test]
fn a_profile_names_the_push_name_a_contact_gave() {
    let s = Server::start(&["--sim-pair-delay", "50ms"]);
    assert_eq!(s.create("prof", "15550001111").status, 201);
    s.wait_state("prof", "online");
    let r = s.get("/api/sessions/prof/contacts/15557654321/profile");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.json(),
        serde_json::json!({"success": true, "userId": "prof", "profile": {
            "jid": "15557654321@s.whatsapp.net", "lid": null, "pushName": null, "about": null,
            "pictureId": null, "pictureUrl": null, "isBusiness": false}})
    );
    let r = s.post(
        "/api/sim/prof/inbound",
        Some(r#"{"from":"15557654321","text":"hi","pushName":"Zoë 🌻"}"#),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    for contact in [
        "15557654321",
        "15557654321@s.whatsapp.net",
        "15557654321%40s.whatsapp.net",
    ] {
        let r = s.get(&format!("/api/sessions/prof/contacts/{contact}/profile"));
        assert_eq!(r.status, 200, "{contact}: {}", r.body);
        assert_eq!(r.json()["profile"]["pushName"], "Zoë 🌻", "{contact}");
    }
    // Another session's contacts are its own.
    assert_eq!(s.create("prof2", "15550002222").status, 201);
    s.wait_state("prof2", "online");
    let r = s.get("/api/sessions/prof2/contacts/15557654321/profile");
    assert!(r.json()["profile"]["pushName"].is_null(), "{}", r.body);

    for bad in [
        "120363000000000001@g.us",
        "abc",
        "1555:1@s.whatsapp.net",
        "12",
    ] {
        let msg = s
            .get(&format!("/api/sessions/prof/contacts/{bad}/profile"))
            .error(400);
        assert!(msg.contains("contactId must be"), "{bad}: {msg}");
    }
    for name in [
        r#""""#,
        r#""   ""#,
        "42",
        r#""a\u0000b""#,
        &format!("\"{}\"", "x".repeat(101)),
    ] {
        let body = format!(r#"{{"from":"15557654321","text":"hi","pushName":{name}}}"#);
        let msg = s.post("/api/sim/prof/inbound", Some(&body)).error(400);
        assert!(msg.contains("pushName must be"), "{name}: {msg}");
    }
    assert!(s
        .get("/api/sessions/nobody/contacts/15557654321/profile")
        .error(404)
        .contains("not found"));
    assert_eq!(s.post("/api/sessions/prof/stop", None).status, 200);
    let msg = s
        .get("/api/sessions/prof/contacts/15557654321/profile")
        .error(409);
    assert!(
        msg.contains("profiles can be read only from an online session"),
        "{msg}"
    );
}

/// Read receipts and chat presence on the simulated link: taken when online, the chat
/// given as digits or a JID (its `@` percent-encoded or not); bad shapes are 400s.
#[test]
fn chats_take_read_receipts_and_presence() {
    let s = Server::start(&["--sim-pair-delay", "50ms"]);
    assert_eq!(s.create("cr", "15550001111").status, 201);
    s.wait_state("cr", "online");
    let r = s.post(
        "/api/sessions/cr/chats/15551234567/read",
        Some(r#"{"messageIds":["3EB0AB12","3EB0AB13"]}"#),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.json()["message"],
        "2 message(s) of 15551234567 marked read"
    );
    let r = s.post(
        "/api/sessions/cr/chats/15551234567%40s.whatsapp.net/presence",
        Some(r#"{"state":"typing"}"#),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["chat"], "15551234567@s.whatsapp.net");
    assert_eq!(
        r.json()["message"],
        "typing shown in 15551234567@s.whatsapp.net"
    );
    for (path, body, says) in [
        (
            "/api/sessions/cr/chats/abc/read",
            r#"{"messageIds":["A"]}"#,
            "chatId must be",
        ),
        (
            "/api/sessions/cr/chats/%zz/read",
            r#"{"messageIds":["A"]}"#,
            "chat id in the path",
        ),
        (
            "/api/sessions/cr/chats/15551234567/read",
            r#"{"messageIds":[]}"#,
            "messageIds must be",
        ),
        (
            "/api/sessions/cr/chats/15551234567/read",
            r#"{"messageIds":["a/b"]}"#,
            "messageIds must be",
        ),
        (
            "/api/sessions/cr/chats/15551234567/presence",
            r#"{"state":"dancing"}"#,
            "state must be",
        ),
        (
            "/api/sessions/cr/chats/15551234567/presence",
            r#"{}"#,
            "state must be",
        ),
    ] {
        let msg = s.post(path, Some(body)).error(400);
        assert!(msg.contains(says), "{path} {body}: {msg}");
    }
    let r = s.post(
        "/api/sessions/cr/presence",
        Some(r#"{"state":"unavailable"}"#),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["message"], "Session cr shows itself unavailable");
    let msg = s
        .post("/api/sessions/cr/presence", Some(r#"{"state":"away"}"#))
        .error(400);
    assert!(msg.contains("available"), "{msg}");
    assert_eq!(s.post("/api/sessions/cr/stop", None).status, 200);
    let msg = s
        .post(
            "/api/sessions/cr/chats/15551234567/presence",
            Some(r#"{"state":"paused"}"#),
        )
        .error(409);
    assert!(
        msg.contains("presence can be shown only from an online session"),
        "{msg}"
    );
}

/// Reactions, edits, revokes and replies name a message by its id; botvisor remembers
/// the messages a session sent or received (here on the simulated link, which takes them
/// all). Own messages only for edits and revokes; unknown ids are 404s (400 in
/// `replyTo`); the ids survive a kill -9 once their commit (≤ 200 ms) has run.
/// A location, a contact card and a poll are sent like a text: 201 with their kind, and
/// the simulated network keeps each with its fields; every bad shape is a 400 naming the
/// field (a media kind too, not sent yet), and nothing bad reaches the network.
#[test]
fn locations_contacts_and_polls_are_sent_and_bad_shapes_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start_in(tmp.path(), &["--sim-pair-delay", "50ms"]);
    assert_eq!(s.create("kinds", "15550001111").status, 201);
    s.wait_state("kinds", "online");
    let good = [
        (
            r#"{"to":"15551234567","location":{"latitude":-33.8568,"longitude":151.2153,"name":"Opera House","address":"Bennelong Point"}}"#,
            "location",
            "Opera House",
        ),
        (
            r#"{"to":"15551234567","contact":{"name":"Ada Lovelace","phone":"15550002222"}}"#,
            "contact",
            "Ada Lovelace",
        ),
        (
            r#"{"to":"15551234567","poll":{"question":"Lunch? 🍕","options":["pizza","soup"]}}"#,
            "poll",
            "Lunch? 🍕",
        ),
        (
            r#"{"to":"15551234567","text":"plain @15550002222","mentions":["15550002222","77@lid"]}"#,
            "text",
            "plain @15550002222",
        ),
    ];
    for (body, kind, _) in good {
        let r = s.post("/api/sessions/kinds/messages", Some(body));
        assert_eq!(r.status, 201, "{body}: {}", r.body);
        assert_eq!(r.json()["kind"], kind);
        assert_eq!(r.json()["message"], "Message sent");
    }
    let bad = [
        (
            r#"{"to":"15551234567","text":"a","location":{"latitude":1,"longitude":2}}"#,
            400,
            "exactly one of",
        ),
        (
            r#"{"to":"15551234567","location":{"latitude":100,"longitude":2}}"#,
            400,
            "location.latitude",
        ),
        (
            r#"{"to":"15551234567","location":"here"}"#,
            400,
            "location must be an object",
        ),
        (
            r#"{"to":"15551234567","contact":{"name":"A","phone":"+1 555"}}"#,
            400,
            "contact.phone",
        ),
        (
            r#"{"to":"15551234567","poll":{"question":"Q","options":["a"]}}"#,
            400,
            "poll.options",
        ),
        (
            r#"{"to":"15551234567","poll":{"question":"Q","options":["a","b"],"selectable":0}}"#,
            400,
            "poll.selectable",
        ),
        (
            r#"{"to":"15551234567","image":{"url":"ftp://example.com/a.png"}}"#,
            400,
            "image.url",
        ),
        (
            r#"{"to":"15551234567"}"#,
            400,
            "text must be a non-empty string",
        ),
        (
            r#"{"to":"15551234567","location":{"latitude":1,"longitude":2},"mentions":["15550002222"]}"#,
            400,
            "mentions go with a text",
        ),
        (
            r#"{"to":"15551234567","text":"x","mentions":["120363025246125486@g.us"]}"#,
            400,
            "mentions must be a list",
        ),
    ];
    for (body, status, needle) in bad {
        let r = s.post("/api/sessions/kinds/messages", Some(body));
        assert_eq!(r.status, status, "{body}: {}", r.body);
        assert_eq!(r.json()["success"], false);
        let message = r.json()["message"].as_str().unwrap().to_string();
        assert!(message.contains(needle), "{body}: {message}");
    }
    let listed = s.get("/api/sim/kinds/messages").json();
    let messages = listed["messages"].as_array().unwrap();
    assert_eq!(messages.len(), good.len(), "{listed}");
    for (m, (_, kind, text)) in messages.iter().zip(good) {
        assert_eq!(m["kind"], kind, "{m}");
        assert_eq!(m["text"], text, "{m}");
    }
    assert_eq!(messages[0]["location"]["latitude"], -33.8568);
    assert_eq!(messages[0]["location"]["address"], "Bennelong Point");
    assert_eq!(messages[1]["contact"]["phone"], "15550002222");
    assert_eq!(messages[2]["poll"]["options"][1], "soup");
    assert_eq!(messages[2]["poll"]["selectable"], 1);
    assert!(messages[3].get("poll").is_none() && messages[3].get("location").is_none());
    assert_eq!(
        messages[3]["mentions"],
        serde_json::json!(["15550002222@s.whatsapp.net", "77@lid"])
    );
    assert!(messages[0].get("mentions").is_none(), "{}", messages[0]);
}

#[test]
fn messages_are_reacted_to_edited_revoked_and_answered_by_id() {
    let tmp = tempfile::tempdir().unwrap();
    let flags = ["--sim-pair-delay", "50ms"];
    let mut s = Server::start_in(tmp.path(), &flags);
    assert_eq!(s.create("ra", "15550001111").status, 201);
    s.wait_state("ra", "online");
    let sent = s.post(
        "/api/sessions/ra/messages",
        Some(r#"{"to":"15551234567","text":"hello"}"#),
    );
    assert_eq!(sent.status, 201, "{}", sent.body);
    let mine = sent.json()["messageId"].as_str().unwrap().to_string();
    let got = s.post(
        "/api/sim/ra/inbound",
        Some(r#"{"from":"15557654321","text":"hi bot"}"#),
    );
    assert_eq!(got.status, 200, "{}", got.body);
    let theirs = got.json()["messageId"].as_str().unwrap().to_string();

    let r = s.post(
        &format!("/api/sessions/ra/messages/{theirs}/reaction"),
        Some(r#"{"emoji":"👍"}"#),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["message"], "Reaction sent");
    assert_eq!(v["messageId"], theirs.as_str());
    assert_eq!(v["chat"], "15557654321@s.whatsapp.net");
    assert!(v["sentId"].as_str().is_some_and(|i| !i.is_empty()), "{v}");
    let r = s.post(
        &format!("/api/sessions/ra/messages/{mine}/reaction"),
        Some(r#"{"emoji":""}"#),
    );
    assert_eq!(r.json()["message"], "Reaction removed", "{}", r.body);
    let r = s.req(
        "PUT",
        &format!("/api/sessions/ra/messages/{mine}"),
        Some(r#"{"text":"hello, corrected"}"#),
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["message"], "Message edited");
    assert_eq!(r.json()["chat"], "15551234567@s.whatsapp.net");
    let reply = s.post(
        "/api/sessions/ra/messages",
        Some(&format!(
            r#"{{"to":"15557654321","text":"answering","replyTo":"{theirs}"}}"#
        )),
    );
    assert_eq!(reply.status, 201, "{}", reply.body);

    // Only the session's own messages are edited or revoked.
    let msg = s
        .req(
            "PUT",
            &format!("/api/sessions/ra/messages/{theirs}"),
            Some(r#"{"text":"x"}"#),
            &[],
        )
        .error(409);
    assert!(msg.contains("only its own messages can be edited"), "{msg}");
    let msg = s
        .delete(&format!("/api/sessions/ra/messages/{theirs}"))
        .error(409);
    assert!(
        msg.contains("only its own messages can be revoked"),
        "{msg}"
    );

    // Bad shapes and unknown ids.
    let unknown = "/api/sessions/ra/messages/3EB0FFFFFFFF/reaction";
    let msg = s.post(unknown, Some(r#"{"emoji":"👍"}"#)).error(404);
    assert!(msg.contains("is not known to session ra"), "{msg}");
    let msg = s
        .post(
            "/api/sessions/ra/messages",
            Some(r#"{"to":"15551234567","text":"x","replyTo":"3EB0FFFFFFFF"}"#),
        )
        .error(404);
    assert!(msg.starts_with("replyTo: Message 3EB0FFFFFFFF"), "{msg}");
    let msg = s
        .post(
            "/api/sessions/ra/messages",
            Some(r#"{"to":"15551234567","text":"x","replyTo":"../x"}"#),
        )
        .error(400);
    assert!(msg.contains("replyTo must be"), "{msg}");
    for (path, body, says) in [
        (
            format!("/api/sessions/ra/messages/{mine}/reaction"),
            r#"{"emoji":"two words"}"#,
            "emoji must be",
        ),
        (
            format!("/api/sessions/ra/messages/{mine}/reaction"),
            r#"{"emoji":5}"#,
            "emoji must be",
        ),
        (
            format!("/api/sessions/ra/messages/{mine}/reaction"),
            r#"{}"#,
            "emoji must be",
        ),
        (
            "/api/sessions/ra/messages/a-b/reaction".to_string(),
            r#"{"emoji":"👍"}"#,
            "messageId must be",
        ),
        (
            "/api/sessions/ra/messages/%zz/reaction".to_string(),
            r#"{"emoji":"👍"}"#,
            "message id in the path",
        ),
    ] {
        let msg = s.post(&path, Some(body)).error(400);
        assert!(msg.contains(says), "{path} {body}: {msg}");
    }
    let msg = s
        .post(
            &format!("/api/sessions/nobody/messages/{mine}/reaction"),
            Some(r#"{"emoji":"👍"}"#),
        )
        .error(404);
    assert!(msg.contains("not found"), "{msg}");

    // Remembered across a kill -9 (the commit of what was remembered runs within 200 ms).
    std::thread::sleep(std::time::Duration::from_millis(600));
    s.kill9();
    let s = Server::start_in(tmp.path(), &flags);
    s.wait_state("ra", "online");
    let r = s.delete(&format!("/api/sessions/ra/messages/{mine}"));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["message"], "Message revoked");
    let r = s.post(
        &format!("/api/sessions/ra/messages/{theirs}/reaction"),
        Some(r#"{"emoji":"🎉"}"#),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(s.post("/api/sessions/ra/stop", None).status, 200);
    let msg = s
        .post(
            &format!("/api/sessions/ra/messages/{theirs}/reaction"),
            Some(r#"{"emoji":"👍"}"#),
        )
        .error(409);
    assert!(
        msg.contains("reactions can be sent only from an online session"),
        "{msg}"
    );
}
