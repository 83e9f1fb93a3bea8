//! The spec's own clients (curl, Python requests, Node axios) work unchanged against
//! botvisor. Python's `requests` and the examples' `node_modules` must be installed
//! (`.ci/run` does it). Without them these tests print `SKIPPED` and what to install, or
//! fail when the run must not skip anything: `CI` (set by CI services, e.g. `CI=true`) or
//! `BOTVISOR_REQUIRE_EXAMPLES=1` (set by `.ci/run`).

mod common;

use std::process::Command;

use common::Server;

const KEY: &str = "example-key-0123456789abcdef0123";

/// Whether `program args` runs and succeeds (from the crate root); if not, the test is
/// skipped with `hint`, or fails when skipping is not allowed.
fn available(test: &str, program: &str, args: &[&str], hint: &str) -> bool {
    let run = Command::new(program)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output();
    let why = match run {
        Ok(out) if out.status.success() => return true,
        Ok(out) => {
            // The error line, not a whole stack trace.
            let err = String::from_utf8_lossy(&out.stderr).to_string();
            let line = err
                .lines()
                .find(|l| l.contains("Error"))
                .or_else(|| err.lines().rfind(|l| !l.trim().is_empty()))
                .unwrap_or("")
                .trim()
                .to_string();
            format!(
                "`{program} {}` failed ({}): {line}",
                args.join(" "),
                out.status
            )
        }
        Err(e) => format!("cannot run {program}: {e}"),
    };
    common::skip_unless_required(test, &format!("{why}; to run it: {hint}"));
    false
}

/// Runs an example with the server's URL and `KEY`; its exit status and output.
fn try_example(s: &Server, program: &str, script: &str, user_id: &str) -> (bool, String) {
    let out = Command::new(program)
        .arg(script)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("BOTVISOR_URL", format!("http://{}", s.addr))
        .env("API_KEY", KEY)
        .env("BOT_USER_ID", user_id)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// Runs an example that must succeed.
fn run_example(s: &Server, program: &str, script: &str, user_id: &str) -> String {
    let (ok, text) = try_example(s, program, script, user_id);
    assert!(ok, "{script}: {text}");
    text
}

fn pairing_line(text: &str) -> &str {
    text.lines()
        .find_map(|l| l.strip_prefix("Pairing Code: "))
        .unwrap_or_else(|| panic!("no pairing code in: {text}"))
        .trim()
}

#[test]
fn python_requests_example_gets_a_pairing_code() {
    if !available(
        "python_requests_example_gets_a_pairing_code",
        "python3",
        &["-c", "import requests"],
        "python3 -m pip install requests",
    ) {
        return;
    }
    let s = Server::start(&["--api-key", KEY]);
    let out = run_example(&s, "python3", "examples/create_bot.py", "bot_py");
    let code = pairing_line(&out);
    assert_eq!(code.len(), 9, "{out}");
    assert_eq!(s.get("/api/sessions/bot_py").json()["userId"], "bot_py");
    // Its error branch prints the spec's message and exits non-zero.
    let (ok, again) = try_example(&s, "python3", "examples/create_bot.py", "bot_py");
    assert!(!ok, "an error must fail the script: {again}");
    assert!(
        again.contains("Error: Session already exists for this user."),
        "{again}"
    );
}

#[test]
fn node_axios_example_gets_a_pairing_code() {
    if !available(
        "node_axios_example_gets_a_pairing_code",
        "node",
        &["-e", "require('./examples/node_modules/axios')"],
        "npm ci --prefix examples",
    ) {
        return;
    }
    let s = Server::start(&["--api-key", KEY]);
    let out = run_example(&s, "node", "examples/create_bot.js", "bot_js");
    assert_eq!(pairing_line(&out).len(), 9, "{out}");
    assert_eq!(s.get("/api/sessions/bot_js").json()["userId"], "bot_js");
    let (ok, again) = try_example(&s, "node", "examples/create_bot.js", "bot_js");
    assert!(!ok, "an error must fail the script: {again}");
    assert!(again.contains("Session already exists"), "{again}");
}

#[test]
fn curl_examples_run_in_order() {
    if !available(
        "curl_examples_run_in_order",
        "curl",
        &["--version"],
        "install curl",
    ) {
        return;
    }
    let s = Server::start(&["--api-key", KEY]);
    let out = run_example(&s, "bash", "examples/curl.sh", "bot_curl");
    assert!(out.contains("\"pairingCode\":"), "{out}");
    assert!(out.contains("Session bot_curl stopped"), "{out}");
    assert!(out.contains("Session bot_curl deleted"), "{out}");
    assert_eq!(s.get("/api/sessions").json()["count"], 0);
    // A refused request stops the script with a non-zero exit, after its answer.
    let body = r#"{"userId":"bot_curl","phoneNumber":"1234567890"}"#;
    let made = s.req("POST", "/api/sessions", Some(body), &[("X-API-Key", KEY)]);
    assert_eq!(made.status, 201, "{}", made.body);
    let (ok, out) = try_example(&s, "bash", "examples/curl.sh", "bot_curl");
    assert!(!ok, "a 409 must fail the script: {out}");
    assert!(out.contains("Session already exists"), "{out}");
    assert!(
        !out.contains("Example 4"),
        "the script must stop at the error: {out}"
    );
}

/// Several nodes on one PostgreSQL: the spec's clients cannot tell. Pointed at a node
/// that owns none of the sessions (drained: it takes no new ones either), every example
/// runs as against a single server; the sessions it made live on the other node.
#[test]
fn the_examples_work_unchanged_against_a_node_that_owns_no_session() {
    let test = "the_examples_work_unchanged_against_a_node_that_owns_no_session";
    let tools = [
        (
            "python3",
            &["-c", "import requests"][..],
            "python3 -m pip install requests",
        ),
        (
            "node",
            &["-e", "require('./examples/node_modules/axios')"][..],
            "npm ci --prefix examples",
        ),
        ("curl", &["--version"][..], "install curl"),
    ];
    if !tools.iter().all(|(p, a, h)| available(test, p, a, h)) {
        return;
    }
    let Some(pg) = common::pg::server_or_skip(test) else {
        return;
    };
    let url = pg.fresh_database_url("examples_fleet").unwrap();
    let node = |id: &str| {
        Server::start(&[
            "--api-key",
            KEY,
            "--database-url",
            &url,
            "--node-id",
            id,
            "--lease-ttl",
            "3s",
        ])
    };
    let (owner, front) = (node("owner"), node("front"));
    let drained = front.req(
        "POST",
        "/api/nodes/front/drain",
        None,
        &[("X-API-Key", KEY)],
    );
    assert_eq!(drained.status, 202, "{}", drained.body);
    let out = run_example(&front, "python3", "examples/create_bot.py", "bot_py");
    assert_eq!(pairing_line(&out).len(), 9, "{out}");
    let (ok, again) = try_example(&front, "python3", "examples/create_bot.py", "bot_py");
    assert!(
        !ok && again.contains("Error: Session already exists for this user."),
        "{again}"
    );
    let out = run_example(&front, "node", "examples/create_bot.js", "bot_js");
    assert_eq!(pairing_line(&out).len(), 9, "{out}");
    let out = run_example(&front, "bash", "examples/curl.sh", "bot_curl");
    assert!(out.contains("\"pairingCode\":"), "{out}");
    assert!(out.contains("Session bot_curl stopped"), "{out}");
    assert!(out.contains("Session bot_curl deleted"), "{out}");
    // Both nodes list the two sessions the examples left, each run by the owner.
    for s in [&owner, &front] {
        let listed = s.get("/api/sessions").json();
        assert_eq!(listed["count"], 2, "{listed}");
        for one in listed["sessions"].as_array().unwrap() {
            assert_eq!(one["node"], "owner", "{listed}");
        }
    }
    let nodes = owner.get("/api/nodes").json();
    let front_row = nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == "front")
        .cloned()
        .unwrap();
    assert_eq!(front_row["state"], "draining", "{nodes}");
    assert_eq!(front_row["sessions"], 0, "{nodes}");
}
