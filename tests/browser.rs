//! The dashboard in a real browser (headless Chromium through Selenium): create a session
//! through the page, see its pairing code and countdown, see it go online without a
//! reload, stop it; screenshots go to `target/browser/`. Needs `chromium`,
//! `chromium-driver` and Python's `selenium` (`.ci/run` installs them and sets
//! `BOTVISOR_REQUIRE_BROWSER`); elsewhere it prints SKIPPED and why.

mod common;

use std::path::Path;
use std::process::Command;

use common::Server;

const KEY: &str = "browser-k3y-0123456789abcdefghijk";

/// Whether the browser and Selenium are here (after printing SKIPPED for `test` if not).
fn have_browser(test: &str) -> bool {
    let have = Path::new("/usr/bin/chromium").exists()
        && Path::new("/usr/bin/chromedriver").exists()
        && Command::new("python3")
            .args(["-c", "import selenium"])
            .status()
            .is_ok_and(|s| s.success());
    if !have {
        common::skip_unless_required_by(
            test,
            "needs /usr/bin/chromium, /usr/bin/chromedriver and Selenium; to run it: apt-get install chromium chromium-driver && python3 -m pip install --user selenium",
            &["BOTVISOR_REQUIRE_BROWSER"],
        );
    }
    have
}

#[test]
fn the_dashboard_with_a_scoped_key_shows_only_that_keys_sessions() {
    if !have_browser("the_dashboard_with_a_scoped_key_shows_only_that_keys_sessions") {
        return;
    }
    let s = Server::start(&["--api-key", KEY, "--sim-pair-delay", "200ms"]);
    let admin = [("X-API-Key", KEY)];
    for id in ["shop_1", "other_1"] {
        let body = format!(r#"{{"userId":"{id}","phoneNumber":"15550001234"}}"#);
        assert_eq!(
            s.req("POST", "/api/sessions", Some(&body), &admin).status,
            201
        );
    }
    let made = s.req(
        "POST",
        "/api/keys",
        Some(r#"{"scopes":["read","control"],"sessions":["shop_*"]}"#),
        &admin,
    );
    assert_eq!(made.status, 201, "{}", made.body);
    let scoped = made.json()["key"].as_str().unwrap().to_string();
    run_script(
        &s,
        "scoped.py",
        &scoped,
        &[KEY],
        "dashboard-scoped-failure.png",
    );
}

/// Runs `tests/browser/<script> URL KEY OUT_DIR EXTRA...` against `s` and asserts it
/// succeeded (naming the screenshot it leaves on failure); its stdout and the out dir.
fn run_script(
    s: &Server,
    script: &str,
    key: &str,
    extra: &[&str],
    failure_png: &str,
) -> (String, std::path::PathBuf) {
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/browser");
    std::fs::create_dir_all(&out).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/browser")
        .join(script);
    let run = Command::new("python3")
        .arg(&script)
        .arg(format!("http://{}/", s.addr))
        .arg(key)
        .arg(&out)
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout).to_string();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "browser check failed:\n{stdout}\n{stderr}\nscreenshot: {}",
        out.join(failure_png).display()
    );
    (stdout, out)
}

#[test]
fn the_dashboard_creates_pairs_and_stops_a_session_live() {
    if !have_browser("the_dashboard_creates_pairs_and_stops_a_session_live") {
        return;
    }
    let s = Server::start(&["--api-key", KEY, "--sim-pair-delay", "4s"]);
    let (stdout, out) = run_script(&s, "dashboard.py", KEY, &[], "dashboard-failure.png");
    eprintln!("{stdout}screenshots: {}", out.display());
    assert!(out.join("dashboard.png").exists());
    // What the page did went through the API.
    let v = s.session("browser_bot");
    assert_eq!(v["state"], "stopped");
    assert_eq!(v["desired"], "stopped");
}
