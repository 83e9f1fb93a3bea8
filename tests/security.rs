//! The API key on every route, built from the route table itself (a new route cannot slip
//! through), and secrets that never reach the log, even at debug level.

mod common;

use botvisor::http::router::ROUTES;
use common::Server;
use hyper::Method;

const KEY: &str = "sEcReT-k3y-0123456789abcdefghijklmnop";

/// A route's path with its `:id` filled in.
fn concrete(path: &str) -> String {
    path.replace(":id", "authprobe")
}

#[test]
fn the_route_table_guards_every_write_and_every_secret() {
    let public: Vec<&str> = ROUTES.iter().filter(|r| r.public).map(|r| r.path).collect();
    assert_eq!(
        public,
        ["/healthz", "/readyz"],
        "only health probes bypass --protect-reads"
    );
    for r in ROUTES.iter() {
        let secret = ["pairing", "qr", "backups"]
            .iter()
            .any(|s| r.path.ends_with(s));
        assert!(
            r.key || (r.method == Method::GET && !secret),
            "{} {} must need the API key",
            r.method,
            r.path
        );
    }
}

#[test]
fn every_guarded_route_refuses_a_missing_or_wrong_key_with_401() {
    let s = Server::start(&["--api-key", KEY]);
    let guarded: Vec<_> = ROUTES.iter().filter(|r| r.key).collect();
    assert!(guarded.len() >= 9, "the table lost its guarded routes");
    for r in &guarded {
        let path = concrete(r.path);
        let method = r.method.as_str();
        let body = (r.method == Method::POST).then_some("{}");
        let missing = s.req(method, &path, body, &[]);
        assert_eq!(
            missing.error(401),
            "Missing API key: send it in the X-API-Key header (or as Authorization: Bearer <key>)",
            "{method} {path}"
        );
        for wrong in [
            ("X-API-Key", "wrong"),
            ("X-API-Key", &KEY[..KEY.len() - 1]),
            ("Authorization", "Bearer wrong"),
            ("Authorization", KEY),
        ] {
            let r2 = s.req(method, &path, body, &[wrong]);
            assert_eq!(
                r2.status, 401,
                "{method} {path} with {wrong:?}: {}",
                r2.body
            );
        }
        // With the key, the route is reached (whatever it then says about `authprobe`).
        let ok = s.req(method, &path, body, &[("X-API-Key", KEY)]);
        assert_ne!(ok.status, 401, "{method} {path}: {}", ok.body);
    }
    // And nothing was created by any of it.
    assert_eq!(s.get("/api/sessions").json()["count"], 0);
}

#[test]
fn protect_reads_guards_every_route_in_the_table() {
    let s = Server::start(&["--api-key", KEY, "--protect-reads"]);
    for r in ROUTES.iter().filter(|r| !r.public) {
        let path = concrete(r.path);
        let answer = s.req(r.method.as_str(), &path, None, &[]);
        assert_eq!(answer.status, 401, "{} {path}: {}", r.method, answer.body);
    }
}

/// The pending QR payload of `secret1` and each of its key fields (none if no code).
fn qr_secrets(s: &Server) -> Vec<String> {
    let qr = s.req(
        "GET",
        "/api/sessions/secret1/qr",
        None,
        &[("X-API-Key", KEY)],
    );
    if qr.status != 200 {
        return Vec::new();
    }
    let payload = qr.json()["qr"].as_str().unwrap().to_string();
    let mut out: Vec<String> = payload
        .split(',')
        .filter(|p| p.len() >= 16)
        .map(String::from)
        .collect();
    out.push(payload);
    out
}

/// Runs a whole lifecycle at debug level and returns the log and every secret it saw.
fn lifecycle_secrets(s: &Server) -> Vec<String> {
    let key = [("X-API-Key", KEY)];
    let mut secrets = vec![KEY.to_string()];
    let created = s.req(
        "POST",
        "/api/sessions",
        Some(r#"{"userId":"secret1","phoneNumber":"15550009999"}"#),
        &key,
    );
    assert_eq!(created.status, 201, "{}", created.body);
    secrets.push(created.json()["pairingCode"].as_str().unwrap().to_string());
    secrets.extend(qr_secrets(s));
    let p = s.req("GET", "/api/sessions/secret1/pairing", None, &key);
    if p.status == 200 {
        secrets.push(p.json()["pairingCode"].as_str().unwrap().to_string());
    }
    secrets
}

/// (The key is given in the environment: the harness writes the command line into the
/// log, and a key on a command line is visible to every user of the machine anyway.)
fn assert_not_logged(s: &Server, secrets: &[String]) {
    let log = std::fs::read_to_string(&s.log).unwrap();
    assert!(
        log.lines().count() > 5,
        "the debug log should have something in it:\n{log}"
    );
    for secret in secrets {
        assert!(!secret.is_empty());
        // The code is shown as ABCD-1234; look for it with and without its dash.
        for form in [secret.clone(), secret.replace('-', "")] {
            assert!(
                !log.contains(&form),
                "a secret ({} chars) is in the log:\n{}",
                form.len(),
                log.lines()
                    .filter(|l| l.contains(&form))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }
}

#[test]
fn keys_codes_and_qr_payloads_never_reach_a_debug_log_on_the_sim_link() {
    let s = Server::start_with_env(
        &["--sim-pair-delay", "1s"],
        &[("RUST_LOG", "debug"), ("API_KEY", KEY)],
    );
    let key = [("X-API-Key", KEY)];
    let secrets = lifecycle_secrets(&s);
    s.wait_state("secret1", "online");
    for op in ["stop", "start", "backup", "restore", "logout"] {
        let r = s.req("POST", &format!("/api/sessions/secret1/{op}"), None, &key);
        assert!(r.status < 300, "{op}: {}", r.body);
        if op == "start" || op == "restore" {
            s.wait_state("secret1", "online");
        }
    }
    assert_not_logged(&s, &secrets);
}

#[cfg(feature = "test-peer")]
#[test]
fn keys_codes_and_credentials_never_reach_a_debug_log_on_the_whatsapp_link() {
    let peer = botvisor_wa_peer::Peer::start();
    let url = peer.url();
    let s = Server::start_with_env(
        &["--link", "whatsapp", "--wa-url", &url],
        &[("RUST_LOG", "debug"), ("API_KEY", KEY)],
    );
    let key = [("X-API-Key", KEY)];
    // Wait for the QR code too, so its keys are among the secrets.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut secrets = lifecycle_secrets(&s);
    while !secrets.iter().any(|x| x.starts_with("2@")) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
        secrets.extend(qr_secrets(&s));
    }
    assert!(
        secrets.iter().any(|x| x.starts_with("2@")),
        "no QR code came"
    );
    let r = s.req("POST", "/api/sessions/secret1/backup", None, &key);
    assert_eq!(r.status, 200, "{}", r.body);
    let r = s.req("DELETE", "/api/sessions/secret1", None, &key);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_not_logged(&s, &secrets);
}
