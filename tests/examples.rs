//! The spec's own clients (curl, Python requests, Node axios) work unchanged against
//! botvisor. Python's `requests` and the examples' `node_modules` must be installed
//! (`.ci/run` does it); without them these tests say what to install and, when
//! BOTVISOR_REQUIRE_EXAMPLES=1 (as in CI), fail.

mod common;

use std::process::Command;

use common::Server;

const KEY: &str = "example-key-0123456789abcdef0123";

fn available(program: &str, args: &[&str], hint: &str) -> bool {
    let ok = Command::new(program)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        assert!(
            std::env::var("BOTVISOR_REQUIRE_EXAMPLES").is_err(),
            "{program} example cannot run: {hint}"
        );
        eprintln!("SKIPPED: {hint}");
    }
    ok
}

fn run_example(s: &Server, program: &str, script: &str, user_id: &str) -> String {
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
    assert!(out.status.success(), "{script}: {text}");
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
        "python3",
        &["-c", "import requests"],
        "pip install requests",
    ) {
        return;
    }
    let s = Server::start(&["--api-key", KEY]);
    let out = run_example(&s, "python3", "examples/create_bot.py", "bot_py");
    let code = pairing_line(&out);
    assert_eq!(code.len(), 9, "{out}");
    assert_eq!(s.get("/api/sessions/bot_py").json()["userId"], "bot_py");
    // Its error branch prints the spec's message.
    let again = run_example(&s, "python3", "examples/create_bot.py", "bot_py");
    assert!(
        again.contains("Error: Session already exists for this user."),
        "{again}"
    );
}

#[test]
fn node_axios_example_gets_a_pairing_code() {
    if !available(
        "node",
        &["-e", "require('./examples/node_modules/axios')"],
        "npm install --prefix examples",
    ) {
        return;
    }
    let s = Server::start(&["--api-key", KEY]);
    let out = run_example(&s, "node", "examples/create_bot.js", "bot_js");
    assert_eq!(pairing_line(&out).len(), 9, "{out}");
    assert_eq!(s.get("/api/sessions/bot_js").json()["userId"], "bot_js");
}

#[test]
fn curl_examples_run_in_order() {
    if !available("curl", &["--version"], "install curl") {
        return;
    }
    let s = Server::start(&["--api-key", KEY]);
    let out = run_example(&s, "bash", "examples/curl.sh", "bot_curl");
    assert!(out.contains("\"pairingCode\":"), "{out}");
    assert!(out.contains("Session bot_curl stopped"), "{out}");
    assert!(out.contains("Session bot_curl deleted"), "{out}");
    assert_eq!(s.get("/api/sessions").json()["count"], 0);
}
